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
//! The layers: [`args`] (the flags, size lists and their validation),
//! [`suite`] (runs, checks and prints the operations on one group),
//! [`harness`] (timing modes, calibration, cross-rank maxima), [`ops`] (one
//! descriptor per operation: sizes, busbw factor, pattern, run, check),
//! [`report`] (table, CSV, JSON), [`plot`] (SVG), [`spawn`] (`--nproc`).
//! Every operation runs on a [`ProcessGroup`] directly.

pub mod args;
pub mod busy;
pub mod harness;
pub mod ops;
pub mod plot;
pub mod report;
pub mod spawn;
pub mod store;
pub mod suite;

use args::{parse_list, parse_modes};
pub use args::{BenchArgs, BenchOptions, Config};
use ops::OpKind;
use rankweave::message_queue::MessageQueue;
use rankweave::{Error, GroupOptions, PrefixStore, ProcessGroup, Result, SharedStore};
use report::Record;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use suite::{run_suite, Out, MQ_CHUNKS, MQ_CHUNK_BYTES};

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
    if args.backend.parse::<rankweave::parallel_state::Backend>()? == rankweave::parallel_state::Backend::Mpi {
        return run_mpi(&cfg);
    }
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
    let busy = match cfg.busy_threads {
        0 => None,
        n => {
            println!("# {}", busy::tag(n));
            Some(busy::BusyThreads::start(n, busy::MAX_RUN)?)
        }
    };
    for &n in &cfg.nproc {
        let (c, mut recs) = spawn::run_world(n, cfg.bind)?;
        if cfg.busy_threads > 0 {
            let tag = busy::tag(cfg.busy_threads);
            for r in &mut recs {
                r.note = if r.note.is_empty() { tag.clone() } else { format!("{}; {tag}", r.note) };
            }
        }
        records.extend(recs);
        if c != 0 {
            code = c;
            break;
        }
    }
    if let Some(b) = busy {
        b.stop();
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
        let gstore: SharedStore = Arc::new(PrefixStore::new(format!("bench-{t}"), store.clone()));
        let opts = GroupOptions { timeout: cfg.timeout, transport: t, ..GroupOptions::default() };
        let label = format!("rankweave-{t}");
        let group = ProcessGroup::new_world(gstore, rank, world, opts)?;
        let used = group.transport_kind();
        let shown = if used == t { t.to_string() } else { format!("{t}(uses-{used})") };
        let (recs, w) = bench_group(&group, cfg, ti == 0, &label, &shown, &mut out)?;
        records.extend(recs);
        wrong += w;
    }
    finish_worker(cfg, rank, &records, wrong)
}

/// Runs the suite on one group. The MessageQueue does not depend on the
/// group's backend: it is built once, over the `first` group, as the seed's
/// TP coordinator does (4 MiB x 6 chunks, writer = the root).
fn bench_group(
    group: &ProcessGroup,
    cfg: &Config,
    first: bool,
    label: &str,
    shown: &str,
    out: &mut Out,
) -> Result<(Vec<Record>, u64)> {
    let mq = if cfg.ops.contains(&OpKind::Mq) && first {
        Some(MessageQueue::create_from_process_group(group, MQ_CHUNK_BYTES, MQ_CHUNKS, cfg.root)?)
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
    run_suite(group, mq.as_ref(), cfg_here, label, shown, out)
}

/// `--backend mpi`: one world over `MPI_COMM_WORLD`, started by `mpirun`.
#[cfg(feature = "mpi")]
fn run_mpi(cfg: &Config) -> Result<i32> {
    if !cfg.nproc.is_empty() {
        return Err(Error::invalid("--backend mpi runs under `mpirun -n N`; leave --nproc out"));
    }
    let token = std::env::var("RANKWEAVE_TOKEN").ok();
    let opts = GroupOptions { timeout: cfg.timeout, ..GroupOptions::default() };
    // MASTER_ADDR, when set, is where the other nodes reach rank 0's store.
    let master = std::env::var("MASTER_ADDR").ok();
    let w = rankweave::backend::mpi::world(opts, token.as_deref(), master.as_deref())?;
    let rank = w.rank;
    let progress = rank == 0 && cfg.csv.is_none() && cfg.json.is_none() && std::io::stderr().is_terminal();
    let mut out = Out::new(rank == 0, progress);
    let (records, wrong) = bench_group(&w.group, cfg, true, "rankweave-mpi", "mpi", &mut out)?;
    let code = finish_worker(cfg, rank, &records, wrong);
    w.group.barrier()?;
    code
}

#[cfg(not(feature = "mpi"))]
fn run_mpi(_cfg: &Config) -> Result<i32> {
    Err(Error::Unsupported(
        "--backend mpi: this rankweave was built without MPI; build it with `--features mpi`".into(),
    ))
}

fn finish_worker(cfg: &Config, rank: usize, records: &[Record], wrong: u64) -> Result<i32> {
    if rank == 0 {
        match std::env::var_os(spawn::RESULTS_ENV) {
            Some(p) if spawn::is_worker() => report::write_file(Path::new(&p), &report::csv_string(records, true))?,
            _ => write_outputs(cfg, records)?,
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
