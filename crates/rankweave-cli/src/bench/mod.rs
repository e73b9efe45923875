//! `rankweave bench`: nccl-tests for rankweave.
//!
//! Measures one or more operations over a range of sizes, verifies every
//! result with exactly representable data, and prints nccl-tests' table:
//! `size count type redop root | time algbw busbw #wrong` for the
//! out-of-place and the in-place form. `--csv` writes the columns of
//! ../shared/bench-anchors (so `compare.py` puts rankweave beside torch gloo
//! and OpenMPI), `--json` the same records with more fields, `--plot` an SVG.
//!
//! It runs under `rankweave launch` (every rank reads the `env://`
//! variables) or, with `--nproc N`, starts N local ranks itself.
//!
//! The layers: [`harness`] (timing modes, calibration, cross-rank maxima),
//! [`ops`] (one descriptor per operation: sizes, busbw factor, pattern, run,
//! check), [`report`] (table, CSV, JSON), [`plot`] (SVG), [`spawn`] (`--nproc`).

pub mod harness;
pub mod ops;
pub mod plot;
pub mod report;
pub mod spawn;
pub mod store;

use harness::{Comm, Mode, Plan};
use ops::{CollBench, ObjSize, OpKind};
use rankweave::message_queue::MessageQueue;
use rankweave::{DType, Error, GroupOptions, PrefixStore, ProcessGroup, ReduceOp, Result, SharedStore, TransportKind};
use report::{Cell, Record, Table};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
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
    /// broadcast, reduce, gather, all_to_all, sendrecv, bcast_obj, mq;
    /// `anchors` (the five the anchor benchmarks measure) or `all`.
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

    /// Start this many local ranks (a comma list runs several world sizes in turn).
    #[arg(long, value_name = "N")]
    pub nproc: Option<String>,

    /// Per-operation deadline in seconds.
    #[arg(long, default_value_t = 120.0)]
    pub timeout: f64,

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

/// Parses `tcp`, `shm`, `auto`.
pub fn parse_transport(s: &str) -> Result<TransportKind> {
    match s.trim().to_ascii_lowercase().as_str() {
        "tcp" => Ok(TransportKind::Tcp),
        "shm" => Ok(TransportKind::Shm),
        "auto" => Ok(TransportKind::Auto),
        o => Err(Error::invalid(format!("unknown transport `{o}`; expected tcp, shm or auto"))),
    }
}

/// `tcp`, `shm`, `auto`.
pub fn transport_name(t: TransportKind) -> &'static str {
    match t {
        TransportKind::Tcp => "tcp",
        TransportKind::Shm => "shm",
        TransportKind::Auto => "auto",
    }
}

fn parse_modes(s: Option<&str>) -> Result<Vec<Mode>> {
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

fn parse_list<T>(s: &str, what: &str, f: impl Fn(&str) -> Result<T>) -> Result<Vec<T>> {
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
    /// Per-operation deadline.
    pub timeout: Duration,
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
        let transports = parse_list(&a.transport, "--transport", parse_transport)?;
        let nproc = match &a.nproc {
            None => Vec::new(),
            Some(s) => parse_list(s, "--nproc", |p| match p.parse::<usize>() {
                Ok(n) if (1..=1024).contains(&n) => Ok(n),
                _ => Err(Error::invalid(format!("--nproc: `{p}` is not a number of ranks (1..=1024)"))),
            })?,
        };
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
            timeout: Duration::from_secs_f64(a.timeout),
            csv: a.csv.clone(),
            json: a.json.clone(),
            plot: a.plot.clone(),
            compare: a.compare.clone(),
            command,
        })
    }
}

/// Runs `rankweave bench`. Returns the process exit code: 0 when every
/// value checked out, 1 when some were wrong (or a spawned rank failed
/// with that code). Communication failures are errors.
pub fn run(args: impl std::borrow::Borrow<BenchArgs>) -> Result<i32> {
    let args: &BenchOptions = &args.borrow().opts;
    if args.op.trim().eq_ignore_ascii_case("plot") {
        return run_plot(args);
    }
    if args.op.trim().eq_ignore_ascii_case("store") {
        return store::run(args);
    }
    let cfg = Config::from_args(args)?;
    if !cfg.nproc.is_empty() && !spawn::is_worker() {
        if std::env::var_os("RANK").is_some() && std::env::var_os("WORLD_SIZE").is_some() {
            return Err(Error::invalid(
                "--nproc starts its own ranks; under `rankweave launch` (RANK and WORLD_SIZE set) leave it out",
            ));
        }
        return run_spawner(&cfg);
    }
    run_worker(&cfg)
}

fn run_spawner(cfg: &Config) -> Result<i32> {
    let mut records = Vec::new();
    let mut code = 0;
    for &n in &cfg.nproc {
        let (c, recs) = spawn::run_world(n)?;
        records.extend(recs);
        if c != 0 {
            code = c;
            break;
        }
    }
    write_outputs(cfg, &records)?;
    Ok(code)
}

fn rendezvous(cfg: &Config) -> Result<(SharedStore, usize, usize)> {
    let rv = rankweave::store::init::rendezvous("env://", None, None, cfg.timeout).map_err(|e| match e {
        Error::InvalidArgument(m) => {
            Error::invalid(format!("{m}; run under `rankweave launch`, or pass --nproc N to start N local ranks"))
        }
        other => other,
    })?;
    Ok((rv.store, rv.rank, rv.world_size))
}

fn run_worker(cfg: &Config) -> Result<i32> {
    let (store, rank, world) = rendezvous(cfg)?;
    if let Some(code) = injected_failure(rank) {
        return Ok(code);
    }
    let progress = rank == 0 && cfg.csv.is_none() && cfg.json.is_none() && std::io::stderr().is_terminal();
    let mut out = Out::new(rank == 0, progress);
    let mut records = Vec::new();
    let mut wrong = 0;
    for (ti, &t) in cfg.transports.iter().enumerate() {
        let gstore: SharedStore = Arc::new(PrefixStore::new(format!("bench-{}", transport_name(t)), store.clone()));
        let opts = GroupOptions { timeout: cfg.timeout, transport: t, ..GroupOptions::default() };
        let label = format!("rankweave-{}", transport_name(t));
        let group = ProcessGroup::new_world(gstore, rank, world, opts)?;
        let used = group.transport_kind();
        let shown = if used == t {
            transport_name(t).to_string()
        } else {
            format!("{}(uses-{})", transport_name(t), transport_name(used))
        };
        // The MessageQueue does not depend on the group's transport: build it
        // once, over the first group, as the seed's TP coordinator does
        // (4 MiB x 6 chunks, writer = the root).
        let mq = if cfg.ops.contains(&OpKind::Mq) && ti == 0 {
            Some(MessageQueue::create_from_process_group(&group, MQ_CHUNK_BYTES, MQ_CHUNKS, cfg.root)?)
        } else {
            None
        };
        let suite_cfg;
        let cfg_here = if mq.is_none() && cfg.ops.contains(&OpKind::Mq) {
            suite_cfg = Config { ops: cfg.ops.iter().copied().filter(|o| *o != OpKind::Mq).collect(), ..cfg.clone() };
            &suite_cfg
        } else {
            cfg
        };
        let (recs, w) = run_suite(&group, mq.as_ref(), cfg_here, &label, &shown, &mut out)?;
        records.extend(recs);
        wrong += w;
    }
    if rank == 0 {
        match std::env::var_os(spawn::RESULTS_ENV) {
            Some(p) if spawn::is_worker() => report::write_file(Path::new(&p), &report::csv_string(&records, true))?,
            _ => write_outputs(cfg, &records)?,
        }
    }
    Ok(if wrong > 0 { 1 } else { 0 })
}

/// Fault injection for the spawner's tests: with
/// `RANKWEAVE_BENCH_FAIL_RANK=R`, rank R says so and exits with code 3
/// right after the rendezvous, leaving its peers waiting for it.
fn injected_failure(rank: usize) -> Option<i32> {
    let r = std::env::var("RANKWEAVE_BENCH_FAIL_RANK").ok()?;
    if r.trim().parse::<usize>().ok()? != rank {
        return None;
    }
    eprintln!("rank {rank}: failing on purpose (RANKWEAVE_BENCH_FAIL_RANK={rank})");
    Some(3)
}

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
        if op == OpKind::SendRecv && n < 2 {
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
    comm: &dyn Comm,
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
            if op == OpKind::SendRecv { "  (ping-pong rank 0 <-> 1, half round trip)" } else { "" }
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
                let mut bench = CollBench::new(op, layout, cfg.dtype, cfg.redop, cfg.root, rank, n)?;
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
                let rec = record(op, mode, n, layout.bytes, layout.count as u64, stats, cfg, impl_name, wrong);
                let cell = cell_of(&rec, cfg.check);
                let (oop, ip) = if op.in_place() { (None, Some(cell)) } else { (Some(cell), None) };
                let redop = if op.reduces() { cfg.redop.name() } else { "none" };
                let root = if op.rooted() { cfg.root as i64 } else { -1 };
                out.line(&table.row(layout.bytes, layout.count as u64, cfg.dtype.name(), redop, root, oop, ip));
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
    st: harness::Stats,
    cfg: &Config,
    impl_name: &str,
    wrong: u64,
) -> Record {
    let algbw = if st.median_s > 0.0 { bytes as f64 / st.median_s / 1e9 } else { 0.0 };
    Record {
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
    }
}

fn measure_object(
    comm: &dyn Comm,
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
        wrong = harness::sum_over_ranks(comm, u64::from(got != obj))?;
    }
    let mut f = || ops::broadcast_object(comm, mine, root).map(|_| ());
    let stats = harness::measure(comm, mode, &cfg.plan, 1.0, &mut f)?;
    let mut rec = record(op, mode, comm.size(), size.anchor_bytes(), encoded, stats, cfg, impl_name, wrong);
    rec.note = format!("obj={} encoded={encoded}B (postcard); bytes = the anchors' pickled size", size.label());
    Ok((rec, wrong))
}

/// Chunk size of the benchmarked MessageQueue (the seed's 4 MiB).
pub const MQ_CHUNK_BYTES: usize = 4 << 20;
/// Chunks of the benchmarked MessageQueue (the seed's 6).
pub const MQ_CHUNKS: usize = 6;

fn measure_mq(comm: &dyn Comm, q: &MessageQueue, cfg: &Config, mode: Mode, size: ObjSize) -> Result<(Record, u64)> {
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
        record(OpKind::Mq, mode, comm.size(), size.anchor_bytes(), encoded, stats, cfg, "rankweave-mq", wrong);
    rec.note = format!(
        "obj={} encoded={encoded}B (postcard) readers={}; bytes = the anchors' pickled size",
        size.label(),
        comm.size().saturating_sub(1)
    );
    Ok((rec, wrong))
}

fn write_outputs(cfg: &Config, records: &[Record]) -> Result<()> {
    if let Some(p) = &cfg.csv {
        report::write_file(p, &report::csv_string(records, false))?;
    }
    if let Some(p) = &cfg.json {
        report::write_file(p, &report::json_string(&cfg.command, records))?;
    }
    if let Some(p) = &cfg.plot {
        let keys: Vec<(String, String, usize)> =
            records.iter().map(|r| (r.op.clone(), r.mode.clone(), r.world_size)).collect();
        let mut all: Vec<(String, Record)> = records.iter().map(|r| (String::new(), r.clone())).collect();
        for c in &cfg.compare {
            let src = c.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            for r in report::read_csv(c)? {
                if keys.contains(&(r.op.clone(), r.mode.clone(), r.world_size)) {
                    all.push((src.clone(), r));
                }
            }
        }
        let ops: Vec<&str> = cfg.ops.iter().map(|o| o.csv_name()).collect();
        let title = format!("rankweave bench {}", ops.join(","));
        report::write_file(p, &plot::render_svg(&title, &plot::series(&all)))?;
    }
    Ok(())
}

fn run_plot(a: &BenchOptions) -> Result<i32> {
    let output =
        a.plot.clone().or_else(|| a.redop.as_ref().map(PathBuf::from)).ok_or_else(|| {
            Error::invalid("`rankweave bench plot` needs an output file: -o FILE.svg or --plot FILE.svg")
        })?;
    let files: Vec<PathBuf> = a.files.iter().chain(a.compare.iter()).cloned().collect();
    if files.is_empty() {
        return Err(Error::invalid("`rankweave bench plot` needs at least one CSV file"));
    }
    let only = match &a.only {
        Some(s) => Some(parse_list(s, "--only", |p| Ok(p.to_string()))?),
        None => None,
    };
    let modes = match &a.mode {
        Some(m) => Some(parse_modes(Some(m))?.into_iter().map(|m| m.name().to_string()).collect::<Vec<_>>()),
        None => None,
    };
    let mut all = Vec::new();
    for f in &files {
        let src = f.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        for r in report::read_csv(f)? {
            let keep = only.as_ref().map_or(true, |o| o.contains(&r.op))
                && modes.as_ref().map_or(true, |m| m.contains(&r.mode))
                && a.world.map_or(true, |w| w == r.world_size);
            if keep {
                all.push((src.clone(), r));
            }
        }
    }
    if all.is_empty() {
        return Err(Error::invalid("no rows left to plot (check the files and --only/--mode/--world)"));
    }
    let mut title = String::from("rankweave bench plot");
    if let Some(o) = &only {
        title.push_str(&format!(": {}", o.join(",")));
    }
    if let Some(w) = a.world {
        title.push_str(&format!(" N={w}"));
    }
    let series = plot::series(&all);
    report::write_file(&output, &plot::render_svg(&title, &series))?;
    println!("wrote {} ({} series, {} points)", output.display(), series.len(), all.len());
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        bench: BenchArgs,
    }

    fn args(s: &str) -> BenchOptions {
        *Cli::try_parse_from(std::iter::once("bench").chain(s.split_whitespace())).unwrap().bench.opts
    }

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
