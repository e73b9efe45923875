//! The arguments of `rankweave bench`: the clap structs, the size lists and
//! their validation into a [`Config`].

use super::harness::{self, Mode, Plan};
use super::ops::{self, OpKind};
use rankweave::{DType, Error, ReduceOp, Result, TransportKind};
use std::path::PathBuf;
use std::time::Duration;

/// Arguments of `rankweave bench` (nccl-tests' short flags where they exist).
#[derive(clap::Args, Debug, Clone)]
#[command(after_help = "Examples:\n  \
    rankweave bench all_reduce --nproc 2 -b 8 -e 64M -f 4\n  \
    rankweave bench anchors --nproc 2,4 --sizes anchors --mode both --iters-time 0.2 --csv rankweave.csv\n  \
    rankweave launch --nproc-per-node 4 -- rankweave bench all_gather -e 16M --transport shm\n  \
    rankweave bench plot results/*.csv --only all_reduce --mode loop -o all_reduce.svg")]
pub struct BenchArgs {
    /// The options, boxed so the CLI's command enum stays small.
    #[command(flatten)]
    pub opts: Box<BenchOptions>,
}

impl std::ops::Deref for BenchArgs {
    type Target = BenchOptions;
    fn deref(&self) -> &BenchOptions {
        &self.opts
    }
}

/// The options of `rankweave bench`.
#[derive(clap::Args, Debug, Clone)]
pub struct BenchOptions {
    /// Operation(s), comma-separated: all_reduce, all_gather, reduce_scatter,
    /// broadcast, reduce, gather, all_to_all, sendrecv, sendrecv_shm (a
    /// zero-copy buffer ping-pong; shared-memory groups), bcast_obj, mq;
    /// `anchors` (the five the anchor benchmarks measure) or `all` (all but
    /// sendrecv_shm and mq).
    /// `plot` draws the CSV files that follow instead of measuring.
    #[arg(value_name = "OP")]
    pub op: String,

    /// With `plot`: the CSV files to draw.
    #[arg(value_name = "CSV")]
    pub files: Vec<PathBuf>,

    /// Smallest size in bytes (suffixes K, M, G: powers of 1024).
    #[arg(short = 'b', long = "minbytes", value_name = "BYTES", value_parser = parse_size_arg)]
    pub min_bytes: Option<u64>,

    /// Largest size in bytes [default: 32M].
    #[arg(short = 'e', long = "maxbytes", value_name = "BYTES", value_parser = parse_size_arg)]
    pub max_bytes: Option<u64>,

    /// Multiply the size by this factor between steps.
    #[arg(short = 'f', long = "stepfactor", value_name = "FACTOR", default_value_t = 2)]
    pub step_factor: u64,

    /// Timed iterations per size (ignored with --iters-time).
    #[arg(short = 'n', long = "iters", default_value_t = 20)]
    pub iters: usize,

    /// Warm-up iterations per size (ignored with --iters-time).
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 5)]
    pub warmup: usize,

    /// Element type: float (f32), double, half, bfloat16, int8, uint8, int32, int64.
    #[arg(short = 'd', long = "datatype", default_value = "float")]
    pub dtype: String,

    /// Reduce operator: sum, prod, min, max, avg [default: sum].
    /// With `plot`: the output file.
    #[arg(short = 'o', long = "op", value_name = "OP|FILE")]
    pub redop: Option<String>,

    /// Root rank of broadcast, reduce, gather and the object broadcasts.
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    pub root: usize,

    /// Check results (1) or not (0).
    #[arg(short = 'c', long = "check", default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub check: u8,

    /// Timing mode: loop (back-to-back ops), sync (barrier-separated
    /// latency), both, or a comma list.
    #[arg(long, value_name = "MODE")]
    pub mode: Option<String>,

    /// Sizes instead of the -b/-e/-f sweep: `anchors` (8 B, then powers of 4
    /// from 16 B to 256 MiB) or a comma list (`8,1K,64M`).
    #[arg(long, value_name = "LIST")]
    pub sizes: Option<String>,

    /// Cap on every size (applies to --sizes too).
    #[arg(long = "max-bytes", value_name = "BYTES", value_parser = parse_size_arg)]
    pub max_bytes_cap: Option<u64>,

    /// Largest size also measured in sync mode when loop mode runs too [default: 1M].
    #[arg(long = "sync-max-bytes", value_name = "BYTES", value_parser = parse_size_arg)]
    pub sync_max_bytes: Option<u64>,

    /// Calibrate the iteration count so each size lasts about this many seconds (at least 3 iterations).
    #[arg(long = "iters-time", value_name = "SECONDS")]
    pub iters_time: Option<f64>,

    /// Most iterations a calibrated loop-mode size runs.
    #[arg(long = "max-iters", default_value_t = 20_000)]
    pub max_iters: usize,

    /// Most iterations a calibrated sync-mode size runs.
    #[arg(long = "sync-max-iters", default_value_t = 2_000)]
    pub sync_max_iters: usize,

    /// Transport(s) for the group: tcp, shm, auto, or a comma list (one group each).
    #[arg(long, default_value = "auto")]
    pub transport: String,

    /// Process-group backend: `gloo` (rankweave's CPU backends, as
    /// --transport picks) or `mpi` (one MPI group; run under `mpirun -n N`;
    /// needs the cargo feature `mpi`).
    #[arg(long, default_value = "gloo")]
    pub backend: String,

    /// Start this many local ranks (a comma list runs several world sizes in turn).
    #[arg(long, value_name = "N")]
    pub nproc: Option<String>,

    /// With --nproc: pin each rank to a CPU of its own (`auto`: only when
    /// every rank gets one, as mpirun places two ranks on two cores; `core`;
    /// `none`).
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = crate::bind::BindTo::Auto)]
    pub bind_to: crate::bind::BindTo,

    /// Per-operation deadline in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,

    /// Also print each rank's own median and mean per size (and add them
    /// to the CSV's note), to see which rank sets the reported time.
    #[arg(long = "per-rank")]
    pub per_rank: bool,

    /// Allocate each rank's buffers on transparent huge pages (a mapping
    /// of whole 2 MiB pages each) instead of plain heap memory; the CSV's
    /// note says so. The kernel's copy between processes pins pages one by
    /// one, so large shared-memory messages between huge-page buffers move
    /// faster (docs/PERFORMANCE.md, run 18).
    #[arg(long = "huge-pages")]
    pub huge_pages: bool,

    /// With --nproc: run this many CPU-bound threads in the spawning
    /// process while the ranks run (as an engine's other threads or another
    /// program would); the CSV's note says so.
    #[arg(long = "busy-threads", value_name = "N", default_value_t = 0)]
    pub busy_threads: usize,

    /// Write the results as CSV (the anchors' columns).
    #[arg(long, value_name = "FILE")]
    pub csv: Option<PathBuf>,

    /// Write the results as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Draw bus bandwidth and latency against size as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,

    /// CSV files drawn beside this run's results in --plot.
    #[arg(long, value_name = "CSV", num_args = 1..)]
    pub compare: Vec<PathBuf>,

    /// With `plot`: only these operations (comma list).
    #[arg(long, value_name = "OPS")]
    pub only: Option<String>,

    /// With `plot`: only this world size.
    #[arg(long, value_name = "N")]
    pub world: Option<usize>,
}

/// Parses a byte count: `8`, `1K`, `64M`, `1G`, `4KiB`, `16kb` (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let upper = t.to_ascii_uppercase();
    let body = upper.strip_suffix("IB").or_else(|| upper.strip_suffix('B')).unwrap_or(&upper);
    let (num, mult) = match body.chars().last() {
        Some('K') => (&body[..body.len() - 1], 1u64 << 10),
        Some('M') => (&body[..body.len() - 1], 1 << 20),
        Some('G') => (&body[..body.len() - 1], 1 << 30),
        Some('T') => (&body[..body.len() - 1], 1 << 40),
        _ => (body, 1),
    };
    let bad = || Error::invalid(format!("bad size `{s}`: expected bytes like 8, 1K, 64M or 1G"));
    let num = num.trim();
    if num.is_empty() {
        return Err(bad());
    }
    if let Ok(v) = num.parse::<u64>() {
        return v.checked_mul(mult).ok_or_else(bad);
    }
    let v: f64 = num.parse().map_err(|_| bad())?;
    let bytes = v * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 || bytes.fract() != 0.0 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

fn parse_size_arg(s: &str) -> std::result::Result<u64, String> {
    parse_size(s).map_err(|e| e.to_string())
}

/// 8 B, then powers of 4 from 16 B to 256 MiB: the anchors' sizes.
pub fn anchor_sizes() -> Vec<u64> {
    let mut v = vec![8u64];
    let mut s = 16u64;
    while s <= 256 << 20 {
        v.push(s);
        s *= 4;
    }
    v
}

/// nccl-tests' sweep: `min`, `min*f`, ... up to `max`.
pub fn sweep_sizes(min: u64, max: u64, factor: u64) -> Result<Vec<u64>> {
    if min == 0 {
        return Err(Error::invalid("-b/--minbytes must be at least 1"));
    }
    if max < min {
        return Err(Error::invalid(format!("-e/--maxbytes ({max}) is below -b/--minbytes ({min})")));
    }
    if factor < 2 {
        return Err(Error::invalid("-f/--stepfactor must be at least 2"));
    }
    let mut v = Vec::new();
    let mut s = min;
    loop {
        v.push(s);
        match s.checked_mul(factor) {
            Some(n) if n <= max => s = n,
            _ => break,
        }
    }
    Ok(v)
}

pub(crate) fn parse_modes(s: Option<&str>) -> Result<Vec<Mode>> {
    let Some(s) = s else { return Ok(vec![Mode::Loop]) };
    let mut out = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let add: &[Mode] = match p.to_ascii_lowercase().as_str() {
            "loop" => &[Mode::Loop],
            "sync" => &[Mode::Sync],
            "both" => &[Mode::Loop, Mode::Sync],
            o => return Err(Error::invalid(format!("unknown mode `{o}`; expected loop, sync or both"))),
        };
        for m in add {
            if !out.contains(m) {
                out.push(*m);
            }
        }
    }
    if out.is_empty() {
        return Err(Error::invalid("--mode is empty"));
    }
    Ok(out)
}

pub(crate) fn parse_list<T>(s: &str, what: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
    let v = s.split(',').map(str::trim).filter(|p| !p.is_empty()).map(f).collect::<Result<Vec<T>>>()?;
    if v.is_empty() {
        return Err(Error::invalid(format!("{what} is empty")));
    }
    Ok(v)
}

/// Validated settings of a measuring run.
#[derive(Debug, Clone)]
pub struct Config {
    /// Operations, in order.
    pub ops: Vec<OpKind>,
    /// Requested sizes (before each operation's rounding).
    pub sizes: Vec<u64>,
    /// Whether the 1 MiB object is sent by the object broadcasts.
    pub big_object: bool,
    /// Element type.
    pub dtype: DType,
    /// Reduce operator.
    pub redop: ReduceOp,
    /// Root rank.
    pub root: usize,
    /// Check results.
    pub check: bool,
    /// Timing modes.
    pub modes: Vec<Mode>,
    /// Largest size measured in sync mode.
    pub sync_max_bytes: u64,
    /// Iterations.
    pub plan: Plan,
    /// Transports, one group each.
    pub transports: Vec<TransportKind>,
    /// World sizes to spawn (`--nproc`), empty under a launcher.
    pub nproc: Vec<usize>,
    /// CPU placement of spawned ranks (`--bind-to`).
    pub bind: crate::bind::BindTo,
    /// Per-operation deadline.
    pub timeout: Duration,
    /// `--per-rank`.
    pub per_rank: bool,
    /// `--huge-pages`.
    pub huge_pages: bool,
    /// `--busy-threads`.
    pub busy_threads: usize,
    /// `--csv`.
    pub csv: Option<PathBuf>,
    /// `--json`.
    pub json: Option<PathBuf>,
    /// `--plot`.
    pub plot: Option<PathBuf>,
    /// `--compare`.
    pub compare: Vec<PathBuf>,
    /// The command line, for headers.
    pub command: String,
}

impl Config {
    /// Validates `args` for a measuring run.
    pub fn from_args(a: &BenchOptions) -> Result<Config> {
        if !a.files.is_empty() {
            return Err(Error::invalid(format!(
                "unexpected argument `{}`: only `rankweave bench plot` takes files (use --compare to draw CSVs beside a run)",
                a.files[0].display()
            )));
        }
        let ops = ops::parse_ops(&a.op)?;
        let cap = a.max_bytes_cap.unwrap_or(u64::MAX);
        let mut sizes = match &a.sizes {
            Some(s) if s.trim().eq_ignore_ascii_case("anchors") => anchor_sizes(),
            Some(s) => parse_list(s, "--sizes", parse_size)?,
            None => sweep_sizes(a.min_bytes.unwrap_or(8), a.max_bytes.unwrap_or(32 << 20), a.step_factor)?,
        };
        if a.sizes.is_some() {
            let (lo, hi) = (a.min_bytes.unwrap_or(0), a.max_bytes.unwrap_or(u64::MAX));
            sizes.retain(|s| (lo..=hi).contains(s));
        }
        sizes.retain(|s| *s <= cap && *s > 0);
        sizes.sort_unstable();
        sizes.dedup();
        let sized_ops = ops.iter().any(|o| !o.is_object());
        if sizes.is_empty() && sized_ops {
            return Err(Error::invalid("no size left to measure (check -b, -e, --sizes and --max-bytes)"));
        }
        let max_obj = cap.min(a.max_bytes.unwrap_or(u64::MAX));
        let dtype: DType = a.dtype.parse()?;
        let redop: ReduceOp = a.redop.as_deref().unwrap_or("sum").parse()?;
        let modes = parse_modes(a.mode.as_deref())?;
        let sync_max_bytes = match a.sync_max_bytes {
            Some(b) => b,
            None if modes.contains(&Mode::Loop) => 1 << 20,
            None => u64::MAX,
        };
        if let Some(t) = a.iters_time {
            if !(t.is_finite() && t > 0.0) {
                return Err(Error::invalid("--iters-time must be a positive number of seconds"));
            }
        }
        if a.iters == 0 {
            return Err(Error::invalid("-n/--iters must be at least 1"));
        }
        if !(a.timeout.is_finite() && a.timeout > 0.0) {
            return Err(Error::invalid("--timeout must be a positive number of seconds"));
        }
        let transports = parse_list(&a.transport, "--transport", str::parse::<TransportKind>)?;
        let nproc = match &a.nproc {
            None => Vec::new(),
            Some(s) => parse_list(s, "--nproc", |p| match p.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => Ok(n),
                _ => Err(Error::invalid(format!("--nproc: `{p}` is not a number of ranks (1..=1024)"))),
            })?,
        };
        if a.busy_threads > 0 && nproc.is_empty() {
            return Err(Error::invalid("--busy-threads needs --nproc (the spawning process runs them)"));
        }
        if a.busy_threads > 64 {
            return Err(Error::invalid(format!("--busy-threads {} is more than 64", a.busy_threads)));
        }
        for &n in &nproc {
            if a.root >= n && ops.iter().any(|o| o.rooted()) {
                return Err(Error::invalid(format!("-r/--root {} is out of range for {n} ranks", a.root)));
            }
        }
        let command =
            std::iter::once("rankweave".to_string()).chain(std::env::args().skip(1)).collect::<Vec<_>>().join(" ");
        Ok(Config {
            ops,
            sizes,
            big_object: max_obj >= 1 << 20,
            dtype,
            redop,
            root: a.root,
            check: a.check == 1,
            modes,
            sync_max_bytes,
            plan: Plan {
                iters: a.iters,
                warmup: a.warmup,
                iters_time: a.iters_time,
                max_iters: a.max_iters.max(harness::MIN_ITERS),
                sync_max_iters: a.sync_max_iters.max(harness::MIN_ITERS),
            },
            transports,
            nproc,
            bind: a.bind_to,
            timeout: Duration::from_secs_f64(a.timeout),
            per_rank: a.per_rank,
            huge_pages: a.huge_pages,
            busy_threads: a.busy_threads,
            csv: a.csv.clone(),
            json: a.json.clone(),
            plot: a.plot.clone(),
            compare: a.compare.clone(),
            command,
        })
    }
}

#[cfg(test)]
pub(crate) mod testing {
    //! Parsing a command line in tests.

    use super::{BenchArgs, BenchOptions};
    use clap::Parser;

    /// The bench's arguments as a command of their own.
    #[derive(clap::Parser)]
    pub struct Cli {
        #[command(flatten)]
        pub bench: BenchArgs,
    }

    /// The options of `rankweave bench <s>`.
    pub fn options(s: &str) -> BenchOptions {
        *Cli::try_parse_from(std::iter::once("bench").chain(s.split_whitespace())).unwrap().bench.opts
    }
}

#[cfg(test)]
mod tests {
    use super::testing::{options as args, Cli};
    use super::*;
    use clap::Parser;

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("8").unwrap(), 8);
        assert_eq!(parse_size("1K").unwrap(), 1024);
        assert_eq!(parse_size("1k").unwrap(), 1024);
        assert_eq!(parse_size("64M").unwrap(), 64 << 20);
        assert_eq!(parse_size("1G").unwrap(), 1 << 30);
        assert_eq!(parse_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_size("16kb").unwrap(), 16 << 10);
        assert_eq!(parse_size("8B").unwrap(), 8);
        assert_eq!(parse_size("1.5K").unwrap(), 1536);
        for bad in ["", "K", "-1", "1.2", "1X", "abc", "99999999999999999999G", "1e400"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn sweeps_and_anchor_sizes() {
        assert_eq!(sweep_sizes(8, 64, 2).unwrap(), vec![8, 16, 32, 64]);
        assert_eq!(sweep_sizes(8, 65536, 4).unwrap(), vec![8, 32, 128, 512, 2048, 8192, 32768]);
        assert_eq!(sweep_sizes(8, 8, 2).unwrap(), vec![8]);
        assert!(sweep_sizes(0, 8, 2).is_err());
        assert!(sweep_sizes(16, 8, 2).is_err());
        assert!(sweep_sizes(8, 16, 1).is_err());
        assert_eq!(sweep_sizes(1 << 62, u64::MAX, 4).unwrap(), vec![1 << 62]);
        let a = anchor_sizes();
        assert_eq!(a.len(), 14);
        assert_eq!(&a[..4], &[8, 16, 64, 256]);
        assert_eq!(*a.last().unwrap(), 256 << 20);
    }

    #[test]
    fn config_from_nccl_tests_flags() {
        let c = Config::from_args(&args("all_reduce -b 8 -e 64K -f 4 -n 5 -w 1 -d half -o max -c 0")).unwrap();
        assert_eq!(c.ops, vec![OpKind::AllReduce]);
        assert_eq!(c.sizes, vec![8, 32, 128, 512, 2048, 8192, 32768]);
        assert_eq!((c.plan.iters, c.plan.warmup), (5, 1));
        assert_eq!(c.dtype, DType::F16);
        assert_eq!(c.redop, ReduceOp::Max);
        assert!(!c.check);
        assert_eq!(c.modes, vec![Mode::Loop]);
        let c = Config::from_args(&args(
            "anchors --sizes anchors --max-bytes 1M --mode both --transport tcp,shm --nproc 2,4",
        ))
        .unwrap();
        assert_eq!(c.sizes.last(), Some(&(1 << 20)));
        assert_eq!(c.sizes.len(), 10);
        assert_eq!(c.modes, vec![Mode::Loop, Mode::Sync]);
        assert_eq!(c.sync_max_bytes, 1 << 20);
        assert_eq!(c.transports, vec![TransportKind::Tcp, TransportKind::Shm]);
        assert_eq!(c.nproc, vec![2, 4]);
        assert!(c.big_object);
        let c = Config::from_args(&args("bcast_obj --mode sync -e 64K")).unwrap();
        assert!(!c.big_object);
        assert_eq!(c.sync_max_bytes, u64::MAX);
        for bad in [
            "all_reduce -d float8",
            "all_reduce -o median",
            "nope",
            "all_reduce --mode fast",
            "all_reduce --transport ib",
            "all_reduce --nproc 0",
            "broadcast --nproc 2 -r 2",
            "all_reduce --sizes 1K --max-bytes 512",
            "all_reduce --iters-time 0",
            "all_reduce extra.csv",
        ] {
            assert!(Config::from_args(&args(bad)).is_err(), "{bad}");
        }
        assert!(Cli::try_parse_from(["bench", "all_reduce", "-c", "2"]).is_err());
        assert!(Cli::try_parse_from(["bench", "all_reduce", "-b", "1Q"]).is_err());
    }
}
