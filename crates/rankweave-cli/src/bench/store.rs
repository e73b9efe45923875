//! `rankweave bench store`: the TCP store at scale.
//!
//! For each client count N (`--nproc 1000,4000,10000`), a store server runs
//! in a child process of its own (so its threads and memory can be read
//! from `/proc/<pid>/status`), and this process opens N real [`TcpStore`]
//! clients, one thread each. Once all are connected they start together:
//! every client sets its key, waits for all N keys (in `wait` calls of at
//! most [`MAX_KEYS`] keys, the protocol's limit), then meets the others at a
//! barrier made of `add` (the last to arrive sets a key everyone waits on).
//!
//! Reported per N: time to connect everyone, time until the last client has
//! seen every key (the rendezvous), time until the last client is through
//! the barrier, and the server process's thread count and resident memory
//! (largest sample during the run, and the kernel's high-water mark).
//! The client threads run at nice +10 (`RANKWEAVE_BENCH_CLIENT_NICE`), so
//! that thousands of runnable clients on a small machine do not starve the
//! server process of CPU.
//! `docs/bench/store_torch.py` runs the same workload against torch's
//! `TCPStore` (libuv backend).

use rankweave::store::protocol::MAX_KEYS;
use rankweave::{Error, Result, Store, TcpStore, TcpStoreServer};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Barrier, Mutex};
use std::time::{Duration, Instant};

use super::BenchOptions;

/// Set in the child that hosts the server.
const SERVE_ENV: &str = "RANKWEAVE_BENCH_STORE_SERVE";
/// Stack of each client thread (the client needs little).
const CLIENT_STACK: usize = 256 * 1024;
/// Niceness of the client threads unless `RANKWEAVE_BENCH_CLIENT_NICE`
/// says otherwise (the server process keeps its own).
const CLIENT_NICE: i32 = 10;

fn client_nice() -> i32 {
    std::env::var("RANKWEAVE_BENCH_CLIENT_NICE").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(CLIENT_NICE)
}

/// One measured client count.
#[derive(Debug, Clone, Default)]
pub struct StoreRun {
    /// Number of clients.
    pub clients: usize,
    /// Seconds until every client was connected.
    pub connect_s: f64,
    /// Seconds from the start until the last client had seen all N keys.
    pub rendezvous_s: f64,
    /// Seconds from the start until the last client passed the barrier.
    pub total_s: f64,
    /// Server threads, largest sample.
    pub server_threads: u64,
    /// Server resident memory with N idle connections, KiB.
    pub server_rss_idle_kib: u64,
    /// Server resident memory, largest sample during the run, KiB.
    pub server_rss_max_kib: u64,
    /// Server resident high-water mark (`VmHWM`), KiB.
    pub server_hwm_kib: u64,
}

/// Raises the soft descriptor limit to the hard one (`ulimit -n` inside the bench).
fn raise_nofile() -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 0,
    }
}

/// `(threads, VmRSS KiB, VmHWM KiB)` of process `pid`.
fn proc_status(pid: u32) -> Option<(u64, u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        let line = s.lines().find(|l| l.starts_with(name))?;
        line[name.len()..].split_whitespace().next()?.parse().ok()
    };
    Some((field("Threads:")?, field("VmRSS:")?, field("VmHWM:")?))
}

/// The child: serves on a free loopback port, prints it, and stops when its
/// stdin closes.
fn serve_child() -> Result<i32> {
    raise_nofile();
    let srv = TcpStoreServer::builder().token(None).bind("127.0.0.1:0")?;
    println!("{}", srv.port());
    std::io::stdout().flush().map_err(|e| Error::io(rankweave::Context::op("bench.store"), e))?;
    let mut sink = Vec::new();
    let _ = std::io::stdin().read_to_end(&mut sink);
    drop(srv);
    Ok(0)
}

struct ServerChild {
    child: Child,
    port: u16,
}

impl ServerChild {
    fn start() -> Result<ServerChild> {
        let ctx = || rankweave::Context::op("bench.store.spawn");
        let exe = std::env::current_exe().map_err(|e| Error::io(ctx(), e))?;
        let mut child = Command::new(exe)
            .args(["bench", "store"])
            .env(SERVE_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| Error::io(ctx(), e))?;
        let out = child.stdout.take().ok_or_else(|| Error::Store("server child has no stdout".into()))?;
        let mut line = String::new();
        BufReader::new(out).read_line(&mut line).map_err(|e| Error::io(ctx(), e))?;
        let port = line.trim().parse().map_err(|_| Error::Store(format!("server child printed `{}`", line.trim())))?;
        Ok(ServerChild { child, port })
    }
}

impl Drop for ServerChild {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.wait();
    }
}

/// One client's part: its key, every key, then the barrier. Returns the
/// instants it had seen all keys and passed the barrier.
fn client_work(store: &TcpStore, rank: usize, keys: &[&str], n: usize, t: Duration) -> Result<(Instant, Instant)> {
    store.set(keys[rank], rank.to_string().as_bytes())?;
    for chunk in keys.chunks(MAX_KEYS) {
        store.wait(chunk, t)?;
    }
    let seen = Instant::now();
    if store.add("barrier/arrived", 1)? == n as i64 {
        store.set("barrier/go", b"1")?;
    }
    store.wait(&["barrier/go"], t)?;
    Ok((seen, Instant::now()))
}

/// Runs the workload with `n` clients against a fresh server child.
pub fn run_one(n: usize, timeout: Duration) -> Result<StoreRun> {
    let server = ServerChild::start()?;
    let (port, pid) = (server.port, server.child.id());
    let names: Vec<String> = (0..n).map(|i| format!("rdv/{i}")).collect();
    let keys: Vec<&str> = names.iter().map(String::as_str).collect();
    let connected = Barrier::new(n + 1);
    let start = Barrier::new(n + 1);
    let results: Mutex<Vec<Result<(Instant, Instant)>>> = Mutex::new(Vec::with_capacity(n));
    let stop = AtomicBool::new(false);
    let peak = Mutex::new((0u64, 0u64));
    let mut run = StoreRun { clients: n, ..Default::default() };
    let t0 = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let (keys, connected, start, results) = (&keys, &connected, &start, &results);
        // The clients run at a lower priority than the server process (nice
        // is per thread on Linux and inherited by the threads a thread
        // creates): thousands of runnable client threads would otherwise
        // starve the one server process of the two cores, which measures the
        // scheduler, not the store. The torch script does the same.
        let nice = client_nice();
        let launcher = s.spawn(move || -> Result<()> {
            if nice != 0 {
                let _ = rustix::process::nice(nice);
            }
            for rank in 0..n {
                let spawned = std::thread::Builder::new()
                    .name(format!("client-{rank}"))
                    .stack_size(CLIENT_STACK)
                    .spawn_scoped(s, move || {
                        let store = TcpStore::builder("127.0.0.1", port).token(None).timeout(timeout).connect();
                        connected.wait();
                        start.wait();
                        let r = store.and_then(|st| client_work(&st, rank, keys, n, timeout));
                        results.lock().unwrap_or_else(|e| e.into_inner()).push(r);
                    });
                if let Err(e) = spawned {
                    // The threads already started wait at the barrier for
                    // ever: give up on the whole run.
                    eprintln!("rankweave bench store: cannot start client thread {rank}: {e}");
                    std::process::exit(1);
                }
            }
            Ok(())
        });
        launcher.join().map_err(|_| Error::Store("client launcher panicked".into()))??;
        connected.wait();
        run.connect_s = t0.elapsed().as_secs_f64();
        // Let the server settle, then read its idle footprint.
        std::thread::sleep(Duration::from_millis(200));
        run.server_rss_idle_kib = proc_status(pid).map_or(0, |p| p.1);
        let (stop, peak) = (&stop, &peak);
        s.spawn(move || {
            while !stop.load(Ordering::Acquire) {
                if let Some((th, rss, _)) = proc_status(pid) {
                    let mut p = peak.lock().unwrap_or_else(|e| e.into_inner());
                    *p = (p.0.max(th), p.1.max(rss));
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let begin = Instant::now();
        start.wait();
        // The scope joins the clients; the sampler stops after them.
        let deadline = begin + timeout + Duration::from_secs(5);
        while results.lock().unwrap_or_else(|e| e.into_inner()).len() < n && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(10));
        }
        stop.store(true, Ordering::Release);
        let results = std::mem::take(&mut *results.lock().unwrap_or_else(|e| e.into_inner()));
        let mut seen_max = begin;
        let mut done_max = begin;
        for r in results {
            let (seen, done) = r?;
            seen_max = seen_max.max(seen);
            done_max = done_max.max(done);
        }
        run.rendezvous_s = (seen_max - begin).as_secs_f64();
        run.total_s = (done_max - begin).as_secs_f64();
        Ok(())
    })?;
    let (th, rss) = *peak.lock().unwrap_or_else(|e| e.into_inner());
    run.server_threads = th;
    run.server_rss_max_kib = rss;
    run.server_hwm_kib = proc_status(pid).map_or(0, |p| p.2);
    Ok(run)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The table's header lines.
pub fn header() -> String {
    format!(
        "{:>8} {:>10} {:>13} {:>9} {:>8} {:>12} {:>12} {:>12}",
        "clients", "connect_s", "rendezvous_s", "total_s", "threads", "rss_idle_MiB", "rss_max_MiB", "rss_hwm_MiB"
    )
}

/// One row of the table.
pub fn row(r: &StoreRun) -> String {
    format!(
        "{:>8} {:>10.3} {:>13.3} {:>9.3} {:>8} {:>12.1} {:>12.1} {:>12.1}",
        r.clients,
        r.connect_s,
        r.rendezvous_s,
        r.total_s,
        r.server_threads,
        mib(r.server_rss_idle_kib),
        mib(r.server_rss_max_kib),
        mib(r.server_hwm_kib)
    )
}

/// `rankweave bench store [--nproc 1000,4000,10000] [--timeout S]`.
pub fn run(args: &BenchOptions) -> Result<i32> {
    if std::env::var_os(SERVE_ENV).is_some() {
        return serve_child();
    }
    let counts: Vec<usize> = match &args.nproc {
        None => vec![1000, 4000, 10_000],
        Some(s) => s
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(|p| {
                p.parse::<usize>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| Error::invalid(format!("bad client count `{p}`")))
            })
            .collect::<Result<_>>()?,
    };
    let limit = raise_nofile();
    let timeout = Duration::from_secs_f64(args.timeout.max(1.0));
    println!("# rankweave bench store: N clients (one thread each, real TcpStore) set a key each,");
    println!("# wait for all N keys (lists of <= {MAX_KEYS}), then meet at an add-barrier; server in its own process");
    println!("# RLIMIT_NOFILE {limit}, client threads at nice +{} (RANKWEAVE_BENCH_CLIENT_NICE)", client_nice());
    println!("{}", header());
    for n in counts {
        let r = run_one(n, timeout)?;
        println!("{}", row(&r));
        if let Some(path) = &args.json {
            let line = format!(
                "{{\"impl\":\"rankweave\",\"clients\":{},\"connect_s\":{:.4},\"rendezvous_s\":{:.4},\"total_s\":{:.4},\"server_threads\":{},\"rss_idle_kib\":{},\"rss_max_kib\":{},\"rss_hwm_kib\":{}}}\n",
                r.clients, r.connect_s, r.rendezvous_s, r.total_s, r.server_threads, r.server_rss_idle_kib, r.server_rss_max_kib, r.server_hwm_kib
            );
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::io(rankweave::Context::op("bench.store.json"), e))?;
            f.write_all(line.as_bytes()).map_err(|e| Error::io(rankweave::Context::op("bench.store.json"), e))?;
        }
    }
    Ok(0)
}
