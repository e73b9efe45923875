//! The suite: measures every configured operation on one group, checks the
//! results, prints nccl-tests' tables on rank 0 and returns the records.

use super::args::Config;
use super::harness::{self, Mode};
use super::ops::{self, CollBench, ObjSize, OpKind};
use super::report::{self, Cell, Record, Table};
use rankweave::message_queue::MessageQueue;
use rankweave::{DType, Error, ProcessGroup, ReduceOp, Result};
use std::io::Write;

/// Rank 0's output: stdout lines, and a progress line on a terminal.
pub struct Out {
    enabled: bool,
    progress: bool,
    shown: bool,
    buffer: Option<Vec<String>>,
}

impl Out {
    /// Prints when `enabled`; draws progress on stderr when `progress`.
    pub fn new(enabled: bool, progress: bool) -> Out {
        Out { enabled, progress: enabled && progress, shown: false, buffer: None }
    }
    /// Collects lines instead of printing them (tests).
    #[cfg(test)]
    pub fn capture() -> Out {
        Out { enabled: true, progress: false, shown: false, buffer: Some(Vec::new()) }
    }
    /// The captured lines.
    #[cfg(test)]
    pub fn captured(&self) -> &[String] {
        self.buffer.as_deref().unwrap_or(&[])
    }
    fn clear_progress(&mut self) {
        if self.shown {
            eprint!("\r\x1b[K");
            self.shown = false;
        }
    }
    /// Prints `s` (it may hold several lines).
    pub fn line(&mut self, s: &str) {
        if !self.enabled {
            return;
        }
        self.clear_progress();
        match &mut self.buffer {
            Some(b) => b.extend(s.lines().map(str::to_string)),
            None => {
                let mut o = std::io::stdout().lock();
                let _ = writeln!(o, "{}", s.trim_end_matches('\n'));
                let _ = o.flush();
            }
        }
    }
    /// Shows `[done/total] what` on the terminal.
    pub fn progress(&mut self, done: usize, total: usize, what: &str) {
        if self.progress {
            eprint!("\r\x1b[K[{done}/{total}] {what}");
            let _ = std::io::stderr().flush();
            self.shown = true;
        }
    }
    /// Removes the progress line.
    pub fn finish(&mut self) {
        self.clear_progress();
    }
}

fn steps(cfg: &Config, n: usize) -> Vec<(OpKind, Mode, usize)> {
    let mut v = Vec::new();
    for &op in &cfg.ops {
        if op.pairwise() && n < 2 {
            continue;
        }
        for &mode in &cfg.modes {
            let k = if op.is_object() {
                1 + usize::from(cfg.big_object)
            } else {
                cfg.sizes.iter().filter(|s| mode == Mode::Loop || **s <= cfg.sync_max_bytes).count()
            };
            if k > 0 {
                v.push((op, mode, k));
            }
        }
    }
    v
}

/// Measures every configured operation on one group: prints the tables on
/// rank 0 and returns the records (identical on every rank) and the number
/// of wrong values found over all ranks.
pub fn run_suite(
    comm: &ProcessGroup,
    mq: Option<&MessageQueue>,
    cfg: &Config,
    impl_name: &str,
    transport: &str,
    out: &mut Out,
) -> Result<(Vec<Record>, u64)> {
    let (rank, n) = (comm.rank(), comm.size());
    let pids = harness::gather_i64(comm, &[std::process::id() as i64])?;
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
    out.line(&format!("# {}", cfg.command));
    out.line(&format!(
        "# world_size {n}  transport {transport}  dtype {}  redop {}  root {}  check {}  host {host}",
        cfg.dtype,
        cfg.redop,
        cfg.root,
        u8::from(cfg.check)
    ));
    out.line(&match cfg.plan.iters_time {
        Some(t) => format!(
            "# iterations calibrated to {t} s per size (at least {}, at most {} loop / {} sync); times are medians, max over ranks",
            harness::MIN_ITERS,
            cfg.plan.max_iters,
            cfg.plan.sync_max_iters
        ),
        None => format!(
            "# warmup {} iters, {} timed iters per size; times are medians, max over ranks",
            cfg.plan.warmup, cfg.plan.iters
        ),
    });
    for (r, pid) in pids.iter().enumerate() {
        out.line(&format!("#  Rank {r:>3} Pid {pid:>7}"));
    }
    let plan_steps = steps(cfg, n);
    let total: usize = plan_steps.iter().map(|s| s.2).sum();
    let mut done = 0;
    let mut records = Vec::new();
    let mut wrong_total = 0;
    for (op, mode, _) in plan_steps {
        if op.rooted() && cfg.root >= n {
            return Err(Error::invalid(format!("-r/--root {} is out of range for {n} ranks", cfg.root)));
        }
        out.line(&report::table_header(&format!(
            "{}  mode={}  transport={transport}  world_size={n}{}",
            op.name(),
            mode.name(),
            if op.pairwise() { "  (ping-pong rank 0 <-> 1, half round trip)" } else { "" }
        )));
        let mut table = Table::new();
        if op.is_object() {
            let objs: Vec<ObjSize> =
                ObjSize::BOTH.into_iter().filter(|o| *o == ObjSize::Small || cfg.big_object).collect();
            for o in objs {
                done += 1;
                out.progress(done, total, &format!("{} {} obj={}", op.name(), mode.name(), o.label()));
                let (rec, wrong) = match op {
                    OpKind::Mq => {
                        let q = mq.ok_or_else(|| Error::invalid("mq: no MessageQueue was created for this group"))?;
                        measure_mq(comm, q, cfg, mode, o)?
                    }
                    _ => measure_object(comm, cfg, op, mode, o, impl_name)?,
                };
                wrong_total += wrong;
                let cell = cell_of(&rec, cfg.check);
                out.line(&table.row(rec.bytes, rec.count, "object", "none", cfg.root as i64, Some(cell), None));
                if let Some(line) = per_rank_line(&rec) {
                    out.line(&line);
                }
                records.push(rec);
            }
        } else {
            let mut seen = Vec::new();
            for &size in cfg.sizes.iter().filter(|s| mode == Mode::Loop || **s <= cfg.sync_max_bytes) {
                done += 1;
                let layout = ops::layout(op, size, cfg.dtype, n);
                if seen.contains(&layout.bytes) {
                    continue;
                }
                seen.push(layout.bytes);
                out.progress(done, total, &format!("{} {} {}", op.name(), mode.name(), report::fmt_size(layout.bytes)));
                let mut bench =
                    CollBench::new(op, layout, cfg.dtype, cfg.redop, cfg.root, rank, n)?.huge_pages(cfg.huge_pages)?;
                let wrong = if cfg.check {
                    bench.prepare_check();
                    bench.run(comm)?;
                    harness::sum_over_ranks(comm, bench.verify())?
                } else {
                    0
                };
                wrong_total += wrong;
                bench.prepare_timing();
                let stats = harness::measure(comm, mode, &cfg.plan, op.time_divisor(), &mut || bench.run(comm))?;
                let rec = record(op, mode, n, layout.bytes, layout.count as u64, &stats, cfg, impl_name, wrong);
                let cell = cell_of(&rec, cfg.check);
                let (oop, ip) = if op.in_place() { (None, Some(cell)) } else { (Some(cell), None) };
                let redop = if op.reduces() { cfg.redop.name() } else { "none" };
                let root = if op.rooted() { cfg.root as i64 } else { -1 };
                out.line(&table.row(layout.bytes, layout.count as u64, cfg.dtype.name(), redop, root, oop, ip));
                if let Some(line) = per_rank_line(&rec) {
                    out.line(&line);
                }
                records.push(rec);
            }
        }
        out.line(&table.footer());
    }
    out.finish();
    Ok((records, wrong_total))
}

fn cell_of(r: &Record, check: bool) -> Cell {
    Cell { time_us: r.median_us, algbw: r.algbw_gbps, busbw: r.busbw_gbps, wrong: check.then_some(r.wrong) }
}

#[allow(clippy::too_many_arguments)]
fn record(
    op: OpKind,
    mode: Mode,
    n: usize,
    bytes: u64,
    count: u64,
    st: &harness::Stats,
    cfg: &Config,
    impl_name: &str,
    wrong: u64,
) -> Record {
    let algbw = if st.median_s > 0.0 { bytes as f64 / st.median_s / 1e9 } else { 0.0 };
    let mut rec = Record {
        impl_name: impl_name.to_string(),
        op: op.csv_name().to_string(),
        mode: mode.name().to_string(),
        world_size: n,
        bytes,
        iters: st.iters as u64,
        median_us: st.median_s * 1e6,
        mean_us: st.mean_s * 1e6,
        min_us: st.min_s * 1e6,
        algbw_gbps: algbw,
        busbw_gbps: algbw * op.busbw_factor(n),
        note: match op {
            OpKind::SendRecv => "half round trip r0<->r1".into(),
            OpKind::SendRecvShm => "half round trip r0<->r1, zero-copy buffer, one word per page touched".into(),
            _ if cfg.dtype != DType::F32 || (op.reduces() && cfg.redop != ReduceOp::Sum) => {
                format!("dtype={} redop={}", cfg.dtype, if op.reduces() { cfg.redop.name() } else { "none" })
            }
            _ => String::new(),
        },
        count,
        dtype: if op.is_object() { "object".into() } else { cfg.dtype.name().into() },
        redop: if op.reduces() { cfg.redop.name().into() } else { "none".into() },
        root: if op.rooted() { cfg.root as i64 } else { -1 },
        in_place: op.in_place(),
        wrong,
    };
    if cfg.huge_pages && !op.is_object() && op != OpKind::SendRecvShm {
        rec.note = if rec.note.is_empty() { HUGE_TAG.into() } else { format!("{}; {HUGE_TAG}", rec.note) };
    }
    add_per_rank(&mut rec, st, cfg);
    rec
}

/// What the note of a record measured with `--huge-pages` says.
pub const HUGE_TAG: &str = "buffers on huge pages";

/// Where `--per-rank` puts each rank's own figures in a record's note.
const PER_RANK_TAG: &str = "per-rank median/mean us:";

/// With `--per-rank`: appends each rank's own median and mean to the note
/// (`r0 5.62/5.84 r1 5.86/5.84`; no commas, so it survives the CSV).
fn add_per_rank(rec: &mut Record, st: &harness::Stats, cfg: &Config) {
    if !cfg.per_rank {
        return;
    }
    let figures: Vec<String> = st
        .per_rank
        .iter()
        .enumerate()
        .map(|(r, [median, mean])| format!("r{r} {:.3}/{:.3}", median * 1e6, mean * 1e6))
        .collect();
    let text = format!("{PER_RANK_TAG} {}", figures.join(" "));
    rec.note = if rec.note.is_empty() { text } else { format!("{}; {text}", rec.note) };
}

/// The `--per-rank` line printed under a record's row, if its note has one.
fn per_rank_line(rec: &Record) -> Option<String> {
    rec.note.find(PER_RANK_TAG).map(|i| format!("#   {}", &rec.note[i..]))
}

fn measure_object(
    comm: &ProcessGroup,
    cfg: &Config,
    op: OpKind,
    mode: Mode,
    size: ObjSize,
    impl_name: &str,
) -> Result<(Record, u64)> {
    let obj = size.object();
    let encoded = ops::encode(&obj)?.len() as u64;
    let root = cfg.root;
    let mine = (comm.rank() == root).then_some(&obj);
    let mut wrong = 0;
    if cfg.check {
        let got = ops::broadcast_object(comm, mine, root)?;
        wrong = harness::sum_over_ranks(comm, u64::from(got.is_some_and(|g| g != obj)))?;
    }
    let mut f = || ops::broadcast_object(comm, mine, root).map(|_| ());
    let stats = harness::measure(comm, mode, &cfg.plan, 1.0, &mut f)?;
    let mut rec = record(op, mode, comm.size(), size.anchor_bytes(), encoded, &stats, cfg, impl_name, wrong);
    rec.note = format!("obj={} encoded={encoded}B (postcard); bytes = the anchors' pickled size", size.label());
    add_per_rank(&mut rec, &stats, cfg);
    Ok((rec, wrong))
}

/// Chunk size of the benchmarked MessageQueue (the seed's 4 MiB).
pub const MQ_CHUNK_BYTES: usize = rankweave::message_queue::DEFAULT_MAX_CHUNK_BYTES;
/// Chunks of the benchmarked MessageQueue (the seed's 6).
pub const MQ_CHUNKS: usize = rankweave::message_queue::DEFAULT_MAX_CHUNKS;

fn measure_mq(comm: &ProcessGroup, q: &MessageQueue, cfg: &Config, mode: Mode, size: ObjSize) -> Result<(Record, u64)> {
    let obj = size.object();
    let encoded = ops::encode(&obj)?.len() as u64;
    // The writer enqueues a reference (no per-call clone of the 1 MiB
    // object); readers decode a fresh object each time, as users get it.
    let once = || -> Result<Option<ops::BenchObject>> {
        if q.is_writer() {
            q.enqueue(&obj)?;
            Ok(None)
        } else {
            q.dequeue::<ops::BenchObject>().map(Some)
        }
    };
    let mut wrong = 0;
    if cfg.check {
        let got = once()?;
        wrong = harness::sum_over_ranks(comm, u64::from(got.is_some_and(|g| g != obj)))?;
    }
    let stats = harness::measure(comm, mode, &cfg.plan, 1.0, &mut || once().map(|_| ()))?;
    let mut rec =
        record(OpKind::Mq, mode, comm.size(), size.anchor_bytes(), encoded, &stats, cfg, "rankweave-mq", wrong);
    rec.note = format!(
        "obj={} encoded={encoded}B (postcard) readers={}; bytes = the anchors' pickled size",
        size.label(),
        comm.size().saturating_sub(1)
    );
    add_per_rank(&mut rec, &stats, cfg);
    Ok((rec, wrong))
}

#[cfg(test)]
mod tests {
    use super::super::args::testing::options as args;
    use super::*;
    use rankweave::TransportKind;

    fn suite(n: usize, cmd: &str, corrupt: Option<usize>) -> Vec<(Vec<Record>, u64, Vec<String>)> {
        let cfg = Config::from_args(&args(cmd)).unwrap();
        harness::testing::run_world(n, corrupt, |c| {
            let mut out = if c.rank() == 0 { Out::capture() } else { Out::new(false, false) };
            let (recs, wrong) = run_suite(c, None, &cfg, "rankweave-test", "threads", &mut out).unwrap();
            (recs, wrong, out.captured().to_vec())
        })
    }

    #[test]
    fn every_collective_checks_out_on_thread_ranks() {
        for n in [2, 3] {
            let res = suite(n, "all -b 4 -e 256 -f 4 -n 2 -w 1 -r 1 --mode both", None);
            let (recs, wrong, lines) = &res[0];
            assert_eq!(*wrong, 0, "{}", lines.join("\n"));
            assert_eq!(res[1].1, 0);
            for r in recs {
                assert_eq!(r.wrong, 0, "{r:?}");
                assert_eq!(r.world_size, n);
                assert!(r.median_us > 0.0 && r.iters == 2, "{r:?}");
            }
            let ops: std::collections::BTreeSet<&str> = recs.iter().map(|r| r.op.as_str()).collect();
            assert_eq!(ops.len(), 9, "{ops:?}");
            assert!(lines.iter().any(|l| l.contains("# Out of bounds values : 0 OK")));
            assert!(lines.iter().any(|l| l.contains("#  Rank   1 Pid")));
            let obj = recs.iter().find(|r| r.op == "bcast_obj").unwrap();
            assert_eq!(obj.bytes, 103);
            assert!(obj.note.starts_with("obj=small encoded="));
        }
    }

    #[test]
    fn checks_out_over_real_tcp_and_shared_memory_groups() {
        let cfg =
            Config::from_args(&args("all_reduce,all_gather,sendrecv,bcast_obj -b 8 -e 4K -f 8 -n 2 -w 1")).unwrap();
        for kind in [TransportKind::Tcp, TransportKind::Shm] {
            let res = harness::testing::run_cpu_world(kind, 3, |pg| {
                assert_eq!(pg.transport_kind(), kind);
                let mut out = Out::new(false, false);
                run_suite(pg, None, &cfg, "rankweave-test", kind.name(), &mut out).unwrap()
            });
            assert!(res.iter().all(|(recs, wrong)| *wrong == 0 && recs.iter().all(|r| r.wrong == 0)), "{kind}");
        }
    }

    #[test]
    fn the_check_catches_a_wrong_value_on_any_rank() {
        let res = suite(2, "all_reduce -b 8 -e 32 -n 1 -w 0", Some(1));
        let (recs, wrong, lines) = &res[0];
        assert_eq!(*wrong, 3, "one bad element per size");
        assert!(recs.iter().all(|r| r.wrong == 1));
        assert!(lines.iter().any(|l| l.contains("# Out of bounds values : 3 FAILED")));
    }

    #[test]
    fn every_dtype_and_redop_checks_out() {
        for d in ["float", "double", "half", "bfloat16", "int8", "uint8", "int32", "int64"] {
            for o in ["sum", "prod", "min", "max", "avg"] {
                let res =
                    suite(3, &format!("all_reduce,reduce_scatter,reduce -b 64 -e 64 -n 1 -w 0 -d {d} -o {o}"), None);
                assert_eq!(res[0].1, 0, "{d} {o}: {}", res[0].2.join("\n"));
            }
        }
    }

    #[test]
    fn per_rank_figures_are_printed_and_kept_in_the_note_only_when_asked() {
        let res = suite(3, "all_reduce,sendrecv,bcast_obj --sizes 8,1K -n 2 -w 0 --mode both --per-rank", None);
        let (recs, wrong, lines) = &res[0];
        assert_eq!(*wrong, 0);
        assert!(!recs.is_empty());
        for r in recs {
            let i = r.note.find(PER_RANK_TAG).unwrap_or_else(|| panic!("no per-rank figures: {r:?}"));
            let figures: Vec<&str> = r.note[i + PER_RANK_TAG.len()..].split_whitespace().collect();
            assert_eq!(figures.len(), 6, "three ranks, a label and a pair each: {}", r.note);
            for (k, rank) in figures.chunks(2).enumerate() {
                assert_eq!(rank[0], format!("r{k}"));
                let (median, mean) = rank[1].split_once('/').unwrap();
                assert!(median.parse::<f64>().unwrap() >= 0.0 && mean.parse::<f64>().unwrap() >= 0.0, "{}", r.note);
            }
            assert!(!r.note.contains(','), "the note stays one CSV field: {}", r.note);
        }
        let sr = recs.iter().find(|r| r.op == "sendrecv").unwrap();
        assert!(sr.note.starts_with("half round trip r0<->r1; per-rank"), "{}", sr.note);
        let printed = lines.iter().filter(|l| l.starts_with(&format!("#   {PER_RANK_TAG} r0 "))).count();
        assert_eq!(printed, recs.len(), "{}", lines.join("\n"));
        let plain = suite(2, "all_reduce --sizes 8 -n 2 -w 0", None);
        assert!(plain[0].0.iter().all(|r| !r.note.contains(PER_RANK_TAG)));
        assert!(plain[0].2.iter().all(|l| !l.contains(PER_RANK_TAG)));
    }

    #[test]
    fn huge_page_buffers_are_checked_and_named_in_the_note() {
        let res = suite(2, "all_reduce,sendrecv,all_gather,bcast_obj --sizes 8,3M -n 2 -w 0 --huge-pages", None);
        let (recs, wrong, _) = &res[0];
        assert_eq!(*wrong, 0);
        for r in recs {
            assert_eq!(r.note.contains(HUGE_TAG), r.op != "bcast_obj", "{r:?}");
        }
        let sr = recs.iter().find(|r| r.op == "sendrecv" && r.bytes == 3 << 20).unwrap();
        assert_eq!(sr.note, format!("half round trip r0<->r1; {HUGE_TAG}"));
        let plain = suite(2, "sendrecv --sizes 8 -n 2 -w 0", None);
        assert!(plain[0].0.iter().all(|r| !r.note.contains(HUGE_TAG)));
    }

    #[test]
    fn records_follow_the_anchor_conventions() {
        let res = suite(2, "all_gather,sendrecv,all_reduce --sizes 8,1K -n 2 -w 0", None);
        let recs = &res[0].0;
        let ag = recs.iter().find(|r| r.op == "all_gather" && r.bytes == 1024).unwrap();
        assert!((ag.busbw_gbps - ag.algbw_gbps * 0.5).abs() < 1e-12);
        assert!((ag.algbw_gbps - 1024.0 / (ag.median_us * 1e-6) / 1e9).abs() < 1e-9);
        let ar = recs.iter().find(|r| r.op == "all_reduce" && r.bytes == 8).unwrap();
        assert_eq!(ar.busbw_gbps, ar.algbw_gbps);
        assert!(ar.in_place);
        let sr = recs.iter().find(|r| r.op == "sendrecv").unwrap();
        assert_eq!(sr.note, "half round trip r0<->r1");
        let csv = report::csv_string(recs, false);
        assert!(csv
            .starts_with("impl,op,mode,world_size,bytes,iters,median_us,mean_us,min_us,algbw_GBps,busbw_GBps,note\n"));
    }
}
