//! Results: the nccl-tests table on stdout, the anchors' CSV, JSON, and the
//! reader that brings CSVs back (for `bench plot` and `--compare`).

use rankweave::{Error, Result};
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::Path;

/// The CSV columns shared with ../bench-anchors (compare.py merges on them).
pub const CSV_COLUMNS: [&str; 12] = [
    "impl",
    "op",
    "mode",
    "world_size",
    "bytes",
    "iters",
    "median_us",
    "mean_us",
    "min_us",
    "algbw_GBps",
    "busbw_GBps",
    "note",
];

/// Columns the extended CSV (the spawner's hand-over file) adds.
pub const EXTRA_COLUMNS: [&str; 6] = ["count", "dtype", "redop", "root", "in_place", "wrong"];

/// One measured point.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Record {
    /// Implementation label (`rankweave-tcp`, `torch-gloo`, ...).
    pub impl_name: String,
    /// Operation (`all_reduce`, `bcast_obj`, ...).
    pub op: String,
    /// `loop` or `sync`.
    pub mode: String,
    /// Ranks.
    pub world_size: usize,
    /// Size `S` in bytes (nccl-tests convention).
    pub bytes: u64,
    /// Timed iterations.
    pub iters: u64,
    /// Median time per operation, µs.
    pub median_us: f64,
    /// Mean time per operation, µs.
    pub mean_us: f64,
    /// Fastest operation, µs.
    pub min_us: f64,
    /// `bytes / median`, GB/s (1e9).
    pub algbw_gbps: f64,
    /// `algbw * factor`, GB/s.
    pub busbw_gbps: f64,
    /// Free text (never contains a comma or a newline).
    pub note: String,
    /// Elements in `S` (0 when unknown).
    pub count: u64,
    /// Element type (`float32`), empty when unknown.
    pub dtype: String,
    /// Reduce operator or `none`.
    pub redop: String,
    /// Root rank, -1 for unrooted operations.
    pub root: i64,
    /// Measured in place.
    pub in_place: bool,
    /// Wrong elements found by the check, summed over ranks.
    pub wrong: u64,
}

fn clean_note(s: &str) -> String {
    s.chars().map(|c| if c == ',' || c == '\n' || c == '\r' || c == '"' { ';' } else { c }).collect()
}

/// The CSV text of `records`: the shared columns, plus [`EXTRA_COLUMNS`]
/// when `extended`.
pub fn csv_string(records: &[Record], extended: bool) -> String {
    let mut s = CSV_COLUMNS.join(",");
    if extended {
        s.push(',');
        s.push_str(&EXTRA_COLUMNS.join(","));
    }
    s.push('\n');
    for r in records {
        let _ = write!(
            s,
            "{},{},{},{},{},{},{:.4},{:.4},{:.4},{:.4},{:.4},{}",
            clean_note(&r.impl_name),
            clean_note(&r.op),
            clean_note(&r.mode),
            r.world_size,
            r.bytes,
            r.iters,
            r.median_us,
            r.mean_us,
            r.min_us,
            r.algbw_gbps,
            r.busbw_gbps,
            clean_note(&r.note)
        );
        if extended {
            let _ = write!(
                s,
                ",{},{},{},{},{},{}",
                r.count,
                clean_note(&r.dtype),
                clean_note(&r.redop),
                r.root,
                u8::from(r.in_place),
                r.wrong
            );
        }
        s.push('\n');
    }
    s
}

/// Writes `text` to `path`, naming the path in the error.
pub fn write_file(path: &Path, text: &str) -> Result<()> {
    let mut f = std::fs::File::create(path)
        .map_err(|e| Error::io(rankweave::Context::op(format!("bench: create {}", path.display())), e))?;
    f.write_all(text.as_bytes())
        .map_err(|e| Error::io(rankweave::Context::op(format!("bench: write {}", path.display())), e))
}

/// Splits one CSV line into fields (double quotes protect commas; `""` is a quote).
fn split_csv_line(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut quoted = false;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match (c, quoted) {
            ('"', true) if chars.peek() == Some(&'"') => {
                cur.push('"');
                chars.next();
            }
            ('"', _) => quoted = !quoted,
            (',', false) => out.push(std::mem::take(&mut cur)),
            (c, _) => cur.push(c),
        }
    }
    out.push(cur);
    out
}

/// Parses CSV text with the shared columns (extra columns are used when
/// they are [`EXTRA_COLUMNS`], ignored otherwise). `what` names the source in errors.
pub fn parse_csv(text: &str, what: &str) -> Result<Vec<Record>> {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let header = lines.next().ok_or_else(|| Error::invalid(format!("{what}: empty CSV")))?;
    let cols: Vec<String> =
        split_csv_line(header.trim_start_matches('\u{feff}')).into_iter().map(|c| c.trim().to_string()).collect();
    let idx = |name: &str| cols.iter().position(|c| c == name);
    for need in ["impl", "op", "world_size", "bytes", "median_us", "busbw_GBps"] {
        if idx(need).is_none() {
            return Err(Error::invalid(format!(
                "{what}: missing column `{need}` (expected {})",
                CSV_COLUMNS.join(",")
            )));
        }
    }
    let mut out = Vec::new();
    for (lineno, line) in lines.enumerate() {
        let f = split_csv_line(line);
        let get = |name: &str| idx(name).and_then(|i| f.get(i)).map(|s| s.trim()).unwrap_or("");
        let num = |name: &str| -> Result<f64> {
            let v = get(name);
            if v.is_empty() {
                return Ok(0.0);
            }
            v.parse::<f64>()
                .map_err(|_| Error::invalid(format!("{what} line {}: `{name}` is not a number: `{v}`", lineno + 2)))
        };
        let int = |name: &str| -> Result<u64> {
            let v = num(name)?;
            if v < 0.0 || !v.is_finite() {
                return Err(Error::invalid(format!("{what} line {}: `{name}` must be a count", lineno + 2)));
            }
            Ok(v as u64)
        };
        out.push(Record {
            impl_name: get("impl").to_string(),
            op: get("op").to_string(),
            mode: if get("mode").is_empty() { "loop".into() } else { get("mode").to_string() },
            world_size: int("world_size")? as usize,
            bytes: int("bytes")?,
            iters: int("iters")?,
            median_us: num("median_us")?,
            mean_us: num("mean_us")?,
            min_us: num("min_us")?,
            algbw_gbps: num("algbw_GBps")?,
            busbw_gbps: num("busbw_GBps")?,
            note: get("note").to_string(),
            count: int("count")?,
            dtype: get("dtype").to_string(),
            redop: get("redop").to_string(),
            root: num("root")? as i64,
            in_place: get("in_place") == "1",
            wrong: int("wrong")?,
        });
    }
    Ok(out)
}

/// Reads a CSV file written by `rankweave bench --csv` or an anchor script.
pub fn read_csv(path: &Path) -> Result<Vec<Record>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| Error::io(rankweave::Context::op(format!("bench: read {}", path.display())), e))?;
    parse_csv(&text, &path.display().to_string())
}

fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            '\r' => o.push_str("\\r"),
            '\t' => o.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn json_num(v: f64) -> String {
    if v.is_finite() {
        format!("{v}")
    } else {
        "null".into()
    }
}

/// The JSON document `--json` writes: the command line and every record.
pub fn json_string(command: &str, records: &[Record]) -> String {
    let mut s = String::from("{\n  \"tool\": \"rankweave bench\",\n");
    let _ = writeln!(s, "  \"command\": {},", json_str(command));
    s.push_str("  \"results\": [");
    for (i, r) in records.iter().enumerate() {
        s.push_str(if i == 0 { "\n    " } else { ",\n    " });
        let _ = write!(
            s,
            "{{\"impl\": {}, \"op\": {}, \"mode\": {}, \"world_size\": {}, \"bytes\": {}, \"count\": {}, \
             \"dtype\": {}, \"redop\": {}, \"root\": {}, \"in_place\": {}, \"iters\": {}, \"median_us\": {}, \
             \"mean_us\": {}, \"min_us\": {}, \"algbw_GBps\": {}, \"busbw_GBps\": {}, \"wrong\": {}, \"note\": {}}}",
            json_str(&r.impl_name),
            json_str(&r.op),
            json_str(&r.mode),
            r.world_size,
            r.bytes,
            r.count,
            json_str(&r.dtype),
            json_str(&r.redop),
            r.root,
            r.in_place,
            r.iters,
            json_num(r.median_us),
            json_num(r.mean_us),
            json_num(r.min_us),
            json_num(r.algbw_gbps),
            json_num(r.busbw_gbps),
            r.wrong,
            json_str(&r.note)
        );
    }
    s.push_str(if records.is_empty() { "]\n}\n" } else { "\n  ]\n}\n" });
    s
}

/// Formats a time in µs the way nccl-tests does (more decimals for short times).
pub fn fmt_time(us: f64) -> String {
    if us < 10.0 {
        format!("{us:.2}")
    } else if us < 100_000.0 {
        format!("{us:.1}")
    } else {
        format!("{us:.0}")
    }
}

/// One measured form (out-of-place or in-place) of a table row.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cell {
    /// Median µs.
    pub time_us: f64,
    /// GB/s.
    pub algbw: f64,
    /// GB/s.
    pub busbw: f64,
    /// Wrong elements (`None` when the check is off).
    pub wrong: Option<u64>,
}

/// The nccl-tests table: a title, the two-level column header, rows, a footer.
#[derive(Debug, Default)]
pub struct Table {
    busbw_sum: f64,
    busbw_n: usize,
    wrong: u64,
}

/// Header lines of one table (`title` names op, mode, transport).
pub fn table_header(title: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "#\n# {title}");
    let _ = writeln!(s, "#{:47}{:^34}{:^34}", "", "out-of-place", "in-place");
    let _ = writeln!(
        s,
        "#{:>11} {:>12} {:>9} {:>6} {:>5}  {:>9} {:>7} {:>7} {:>6}  {:>9} {:>7} {:>7} {:>6}",
        "size",
        "count",
        "type",
        "redop",
        "root",
        "time",
        "algbw",
        "busbw",
        "#wrong",
        "time",
        "algbw",
        "busbw",
        "#wrong"
    );
    let _ = writeln!(
        s,
        "#{:>11} {:>12} {:>9} {:>6} {:>5}  {:>9} {:>7} {:>7} {:>6}  {:>9} {:>7} {:>7} {:>6}",
        "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", "", "(us)", "(GB/s)", "(GB/s)", ""
    );
    s
}

fn fmt_cell(c: Option<Cell>) -> String {
    match c {
        None => format!("  {:>9} {:>7} {:>7} {:>6}", "N/A", "N/A", "N/A", "N/A"),
        Some(c) => format!(
            "  {:>9} {:>7.3} {:>7.3} {:>6}",
            fmt_time(c.time_us),
            c.algbw,
            c.busbw,
            c.wrong.map_or("N/A".to_string(), |w| w.to_string())
        ),
    }
}

impl Table {
    /// A new, empty table.
    pub fn new() -> Table {
        Table::default()
    }

    /// One row: `size count type redop root` then out-of-place and in-place cells.
    #[allow(clippy::too_many_arguments)]
    pub fn row(
        &mut self,
        bytes: u64,
        count: u64,
        dtype: &str,
        redop: &str,
        root: i64,
        oop: Option<Cell>,
        ip: Option<Cell>,
    ) -> String {
        for c in [oop, ip].into_iter().flatten() {
            self.busbw_sum += c.busbw;
            self.busbw_n += 1;
            self.wrong += c.wrong.unwrap_or(0);
        }
        format!(" {:>11} {:>12} {:>9} {:>6} {:>5}{}{}", bytes, count, dtype, redop, root, fmt_cell(oop), fmt_cell(ip))
    }

    /// Wrong values counted so far.
    #[cfg(test)]
    pub fn wrong(&self) -> u64 {
        self.wrong
    }

    /// Average bus bandwidth over the measured cells.
    pub fn avg_busbw(&self) -> f64 {
        if self.busbw_n == 0 {
            0.0
        } else {
            self.busbw_sum / self.busbw_n as f64
        }
    }

    /// nccl-tests' footer.
    pub fn footer(&self) -> String {
        format!(
            "# Out of bounds values : {} {}\n# Avg bus bandwidth    : {:.4} \n",
            self.wrong,
            if self.wrong == 0 { "OK" } else { "FAILED" },
            self.avg_busbw()
        )
    }
}

/// Human size: `8 B`, `4 KiB`, `256 MiB` (exact powers only; else bytes).
pub fn fmt_size(b: u64) -> String {
    for (unit, div) in [("GiB", 1u64 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)] {
        if b >= div && b % div == 0 {
            return format!("{} {unit}", b / div);
        }
    }
    format!("{b} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(op: &str, bytes: u64) -> Record {
        Record {
            impl_name: "rankweave-tcp".into(),
            op: op.into(),
            mode: "loop".into(),
            world_size: 2,
            bytes,
            iters: 20,
            median_us: 4.5,
            mean_us: 5.25,
            min_us: 3.0,
            algbw_gbps: 0.002,
            busbw_gbps: 0.002,
            note: "a, b\n\"c\"".into(),
            count: bytes / 4,
            dtype: "float32".into(),
            redop: "sum".into(),
            root: -1,
            in_place: true,
            wrong: 0,
        }
    }

    #[test]
    fn csv_has_the_shared_columns_and_round_trips() {
        let recs = vec![rec("all_reduce", 8), rec("all_gather", 1 << 20)];
        let text = csv_string(&recs, false);
        let first = text.lines().next().unwrap();
        assert_eq!(first, "impl,op,mode,world_size,bytes,iters,median_us,mean_us,min_us,algbw_GBps,busbw_GBps,note");
        assert_eq!(
            text.lines().nth(1).unwrap(),
            "rankweave-tcp,all_reduce,loop,2,8,20,4.5000,5.2500,3.0000,0.0020,0.0020,a; b;;c;"
        );
        let back = parse_csv(&text, "t").unwrap();
        assert_eq!(back.len(), 2);
        assert_eq!(back[1].bytes, 1 << 20);
        assert_eq!(back[1].median_us, 4.5);
        assert_eq!(back[0].count, 0, "extras absent from the plain CSV");
        let ext = parse_csv(&csv_string(&recs, true), "t").unwrap();
        assert_eq!(ext[1].count, (1 << 20) / 4);
        assert!(ext[1].in_place);
        assert_eq!(ext[1].dtype, "float32");
    }

    #[test]
    fn reads_the_anchor_csvs_and_rejects_bad_ones() {
        let anchor = "impl,op,mode,world_size,bytes,iters,median_us,mean_us,min_us,algbw_GBps,busbw_GBps,note\n\
                      torch-gloo,all_reduce,loop,2,8,296,215.8950,303.1324,77.6410,0.0000,0.0000,\n\
                      mpi4py-openmpi-shm,bcast_obj,loop,2,103,5000,2.2370,2.3421,2.0420,0.0460,0.0460,obj=small pickled=103B\n";
        let r = parse_csv(anchor, "a").unwrap();
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].note, "obj=small pickled=103B");
        assert!(parse_csv("", "e").is_err());
        assert!(parse_csv("impl,op\nx,y\n", "e").unwrap_err().to_string().contains("world_size"));
        let bad = "impl,op,mode,world_size,bytes,iters,median_us,mean_us,min_us,algbw_GBps,busbw_GBps,note\nx,y,loop,2,eight,1,1,1,1,1,1,\n";
        assert!(parse_csv(bad, "b").unwrap_err().to_string().contains("line 2"));
        assert_eq!(split_csv_line("a,\"b,c\",\"d\"\"e\""), vec!["a", "b,c", "d\"e"]);
    }

    #[test]
    fn json_is_escaped() {
        let j = json_string("rankweave bench \"x\"", &[rec("all_reduce", 8)]);
        assert!(j.contains("\"command\": \"rankweave bench \\\"x\\\"\""));
        assert!(j.contains("\"note\": \"a, b\\n\\\"c\\\"\""));
        assert!(j.contains("\"median_us\": 4.5"));
        let e = json_string("c", &[]);
        assert!(e.ends_with("\"results\": []\n}\n"));
    }

    #[test]
    fn table_rows_and_footer() {
        let mut t = Table::new();
        let cell = Cell { time_us: 12.345, algbw: 1.5, busbw: 1.5, wrong: Some(0) };
        let row = t.row(1024, 256, "float32", "sum", -1, None, Some(cell));
        assert!(row.contains("N/A"));
        assert!(row.contains("12.3"));
        t.row(2048, 512, "float32", "sum", -1, None, Some(Cell { busbw: 2.5, wrong: Some(3), ..cell }));
        assert_eq!(t.avg_busbw(), 2.0);
        assert_eq!(t.wrong(), 3);
        assert!(t.footer().contains("# Out of bounds values : 3 FAILED"));
        assert!(t.footer().contains("# Avg bus bandwidth    : 2.0000"));
        assert!(table_header("x").contains("#wrong"));
        assert_eq!(fmt_time(0.312), "0.31");
        assert_eq!(fmt_time(146.24), "146.2");
        assert_eq!(fmt_time(137_111.0), "137111");
        assert_eq!(fmt_size(256 << 20), "256 MiB");
        assert_eq!(fmt_size(103), "103 B");
    }
}
