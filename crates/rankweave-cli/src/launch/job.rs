//! One job across nodes: the launchers of a multi-node job meet at the store
//! node 0's launcher hosts and act as one job.
//!
//! # Protocol (keys under `rankweave.launch/` in the job's store)
//!
//! - `config` (`"<nnodes> <nproc_per_node>"`, set by node 0) and `node/<K>`
//!   (`"<host>\t<pid>"`): every launcher checks that it runs the same shape
//!   as node 0 and that its node rank is not taken.
//! - `hb/<K>`: a counter every launcher but node 0's adds 1 to every
//!   [`HEARTBEAT`]. Node 0 reads them all; a node whose counter stops for
//!   the node timeout (5 s by default) is lost: its launcher was killed or
//!   the node is unreachable.
//! - `fail/<K>` (`"<unix µs>\t<code>\t<message>"`, the first failure on node
//!   K: a worker that exited non-zero or died from a signal, or the launcher
//!   getting a signal) and the counter `failures`.
//! - `done`: how many nodes' workers all exited 0.
//! - `verdict` (`"ok"` or `"fail\t<code>\t<message>"`): written once, by
//!   node 0's launcher, the arbiter. The first failure it sees starts a
//!   settling window of [`SETTLE`]: a node that stopped beating within it is
//!   named (when a node dies its peers' workers fail too, a moment later,
//!   and those failures are consequences), else the failure that happened
//!   first (by the failing launcher's clock). Every launcher reads the
//!   verdict, stops its workers if they still run and exits with it.
//! - `left`: launchers that have read the verdict. Node 0's launcher keeps
//!   the store up until all live ones have (bounded), so none of them
//!   mistakes the store's end for node 0's loss.
//!
//! The other launchers watch node 0 through their store calls: a refused,
//! reset or unanswered (after [`OP_TIMEOUT`]) call means node 0's launcher,
//! which hosts the store, is gone, and the job fails naming node 0.
//! Every wait is bounded: joining and waiting for the other nodes to finish
//! by the rendezvous timeout (`RANKWEAVE_TIMEOUT`, 300 s by default).

use super::signals;
use rankweave::{Error, Result, Store, TcpStore};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;

/// How often a launcher other than node 0's shows it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(500);
/// Default time without a heartbeat after which a node counts as lost.
pub const DEFAULT_NODE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often node 0's launcher looks at the job.
const ARBITER_TICK: Duration = Duration::from_millis(250);
/// Time from the first failure seen to the verdict: failures that are its
/// consequences, or the heartbeat of a dead node missing, show up within it.
pub const SETTLE: Duration = Duration::from_secs(2);
/// Within the settling window, a node silent this long is lost.
const LOST_IN_SETTLE: Duration = Duration::from_millis(1500);
/// Longest wait for one store call of a launcher.
pub const OP_TIMEOUT: Duration = Duration::from_secs(3);
/// Longest time node 0 keeps the store up after the verdict for the other
/// launchers to read it.
const DRAIN: Duration = Duration::from_secs(6);
/// Key prefix of the launchers' keys.
const PREFIX: &str = "rankweave.launch/";

fn key(name: &str) -> String {
    format!("{PREFIX}{name}")
}

/// Why a job failed, as every launcher reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// Exit code of the launchers (the failed worker's code, 128 + signal,
    /// or 1 for a lost node).
    pub code: i32,
    /// What happened, naming the rank(s) and node.
    pub message: String,
}

/// The end of a job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Every worker of every node exited 0.
    Success,
    /// The first failure.
    Failed(Failure),
}

impl Verdict {
    fn encode(&self) -> Vec<u8> {
        match self {
            Verdict::Success => b"ok".to_vec(),
            Verdict::Failed(f) => format!("fail\t{}\t{}", f.code, f.message).into_bytes(),
        }
    }

    fn decode(raw: &[u8]) -> Verdict {
        let text = String::from_utf8_lossy(raw);
        if text == "ok" {
            return Verdict::Success;
        }
        let mut parts = text.splitn(3, '\t');
        match (parts.next(), parts.next().and_then(|c| c.parse::<i32>().ok()), parts.next()) {
            (Some("fail"), Some(code), Some(message)) => {
                Verdict::Failed(Failure { code: code.max(1), message: message.to_string() })
            }
            _ => Verdict::Failed(Failure { code: 1, message: format!("unreadable job verdict {text:?} in the store") }),
        }
    }
}

/// One node's first failure, as stored under `fail/<K>`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Report {
    at_us: u64,
    code: i32,
    message: String,
}

impl Report {
    fn now(code: i32, message: String) -> Report {
        let at_us = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
        Report { at_us, code, message }
    }

    fn encode(&self) -> Vec<u8> {
        format!("{}\t{}\t{}", self.at_us, self.code, self.message).into_bytes()
    }

    fn decode(raw: &[u8]) -> Report {
        let text = String::from_utf8_lossy(raw);
        let mut parts = text.splitn(3, '\t');
        match (
            parts.next().and_then(|t| t.parse::<u64>().ok()),
            parts.next().and_then(|c| c.parse::<i32>().ok()),
            parts.next(),
        ) {
            (Some(at_us), Some(code), Some(message)) => Report { at_us, code, message: message.to_string() },
            _ => Report { at_us: u64::MAX, code: 1, message: format!("unreadable failure report {text:?}") },
        }
    }
}

/// `rank 2` or `ranks 2-3`: the ranks of `node`.
pub fn ranks_of(node: usize, nproc_per_node: usize) -> String {
    let first = node * nproc_per_node;
    if nproc_per_node == 1 {
        format!("rank {first}")
    } else {
        format!("ranks {first}-{}", first + nproc_per_node - 1)
    }
}

/// The shape of the job and this launcher's place in it.
#[derive(Debug, Clone)]
pub struct Topology {
    /// Nodes in the job (at least 2 for a link).
    pub nnodes: usize,
    /// Workers per node.
    pub nproc_per_node: usize,
    /// This node's rank.
    pub node_rank: usize,
    /// This node's host name.
    pub host: String,
    /// `host:port` of the store, for messages.
    pub store_addr: String,
}

/// Tunables of a link.
#[derive(Debug, Clone, Copy)]
pub struct Timing {
    /// Bound on joining, and on waiting for other nodes to finish.
    pub job_timeout: Duration,
    /// No heartbeat for this long: the node is lost.
    pub node_timeout: Duration,
}

enum Event {
    Failure(Report),
    Done,
    Finish,
}

#[derive(Default)]
struct Shared {
    verdict: Mutex<Option<Verdict>>,
    /// Node 0: the other launchers have read the verdict (or the drain
    /// bound passed). Others: set with the verdict.
    drained: AtomicBool,
}

impl Shared {
    fn verdict(&self) -> Option<Verdict> {
        self.verdict.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records `v` unless a verdict is already known; returns the one in force.
    fn decide(&self, v: Verdict) -> Verdict {
        self.verdict.lock().unwrap_or_else(|p| p.into_inner()).get_or_insert(v).clone()
    }
}

/// What joining the job gave.
pub enum Joined {
    /// This launcher is part of the job.
    Link(JobLink),
    /// A signal arrived while waiting for node 0's store.
    Interrupted(Signal),
}

/// This launcher's part in a multi-node job: a thread talking to the store.
pub struct JobLink {
    events: mpsc::Sender<Event>,
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    topo: Topology,
    timing: Timing,
    signalled: bool,
}

impl std::fmt::Debug for JobLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JobLink").field("topo", &self.topo).finish_non_exhaustive()
    }
}

/// Connects to the store at `host:port`, retrying until `timeout` passes,
/// giving up at once on a refused token, and returning early on a signal.
fn connect(
    host: &str,
    port: u16,
    timeout: Duration,
    store_addr: &str,
) -> Result<std::result::Result<TcpStore, Signal>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match TcpStore::builder(host, port)
            .timeout(left.clamp(Duration::from_millis(10), Duration::from_secs(1)))
            .connect()
        {
            Ok(s) => return Ok(Ok(s)),
            Err(e @ Error::Unauthorized(_)) => return Err(e),
            Err(e) if left.is_zero() || Instant::now() >= deadline => {
                return Err(Error::Store(format!(
                    "cannot reach the job's store at {store_addr} (hosted by node 0's launcher) within {:.0} s: {e}",
                    timeout.as_secs_f64()
                )))
            }
            Err(_) => {}
        }
        if let Some(sig) = signals::take() {
            return Ok(Err(sig));
        }
    }
}

impl JobLink {
    /// Joins the job through the store at `connect_host:port` and starts the
    /// link's thread. Node 0 calls this after binding the store.
    pub fn join(topo: Topology, connect_host: &str, port: u16, timing: Timing) -> Result<Joined> {
        let store = match connect(connect_host, port, timing.job_timeout, &topo.store_addr)? {
            Ok(s) => s,
            Err(sig) => return Ok(Joined::Interrupted(sig)),
        };
        store.set_timeout(OP_TIMEOUT);
        let k = topo.node_rank;
        let register = || -> Result<()> {
            let me = format!("{}\t{}", topo.host, std::process::id());
            let owner = store.compare_set(&key(&format!("node/{k}")), b"", me.as_bytes())?;
            if owner != me.as_bytes() {
                let owner = String::from_utf8_lossy(&owner).replace('\t', ", pid ");
                return Err(Error::invalid(format!("--node-rank {k} is already taken in this job (by host {owner})")));
            }
            Ok(())
        };
        let config = format!("{} {}", topo.nnodes, topo.nproc_per_node);
        let theirs = if k == 0 {
            // Registered before the shape is published, which the others
            // wait for: node 0's host name is there when they look.
            register()?;
            store.compare_set(&key("config"), b"", config.as_bytes())?
        } else {
            store.get_timeout(&key("config"), OP_TIMEOUT)?
        };
        if theirs != config.as_bytes() {
            let theirs = String::from_utf8_lossy(&theirs);
            let (n, p) = theirs.split_once(' ').unwrap_or((&theirs, "?"));
            let message = format!(
                "node 0 runs --nnodes {n} --nproc-per-node {p}, but the launcher of node {k} (host {}) was given \
                 --nnodes {} --nproc-per-node {}",
                topo.host, topo.nnodes, topo.nproc_per_node
            );
            // Fail the job at once rather than leave node 0 waiting for a
            // node that will not come (best effort).
            if k < topo.nnodes.min(n.parse().unwrap_or(0)) {
                let report = Report::now(2, message.clone());
                let _ = store.compare_set(&key(&format!("fail/{k}")), b"", &report.encode());
                let _ = store.add(&key("failures"), 1);
            }
            return Err(Error::invalid(message));
        }
        if k != 0 {
            register()?;
        }
        if k != 0 {
            store.add(&key(&format!("hb/{k}")), 1)?;
        }
        let shared = Arc::new(Shared::default());
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            store,
            rx,
            shared: Arc::clone(&shared),
            topo: topo.clone(),
            timing,
            hosts: vec![None; topo.nnodes],
        };
        let name = format!("launch-job-{k}");
        let thread = std::thread::Builder::new()
            .name(name)
            .spawn(move || if k == 0 { worker.arbiter() } else { worker.follower() })
            .map_err(|e| Error::io(rankweave::Context::op("launch: start the job thread"), e))?;
        Ok(Joined::Link(JobLink { events: tx, shared, thread: Some(thread), topo, timing, signalled: false }))
    }

    /// `node K (host H)`.
    pub fn node_label(&self) -> String {
        format!("node {} (host {})", self.topo.node_rank, self.topo.host)
    }

    /// Reports a failure on this node (only the first one counts).
    pub fn report_failure(&self, code: i32, message: String) {
        let _ = self.events.send(Event::Failure(Report::now(code, message)));
    }

    /// Reports that every worker of this node exited 0.
    pub fn report_done(&self) {
        let _ = self.events.send(Event::Done);
    }

    /// The job's verdict, once known.
    pub fn verdict(&self) -> Option<Verdict> {
        self.shared.verdict()
    }

    /// Reports a signal the launcher got as this node's failure (once).
    pub fn report_signal(&mut self, sig: Signal) {
        if !self.signalled {
            self.signalled = true;
            self.report_failure(
                128 + sig as i32,
                format!("the launcher of {} received {}", self.node_label(), sig.as_str()),
            );
        }
    }

    /// Waits (bounded) for the job's verdict once this node's workers have
    /// all ended; node 0 also waits for the other launchers to read it.
    /// `local` is this node's own failure, used if no verdict comes.
    pub fn finish(mut self, local: Option<Failure>) -> Verdict {
        let limit = self.timing.job_timeout + self.timing.node_timeout + SETTLE + DRAIN + OP_TIMEOUT * 2;
        let deadline = Instant::now() + limit;
        let verdict = loop {
            if let Some(v) = self.shared.verdict() {
                if self.shared.drained.load(Ordering::Acquire) || Instant::now() >= deadline {
                    break v;
                }
            } else if Instant::now() >= deadline {
                break Verdict::Failed(local.clone().unwrap_or_else(|| Failure {
                    code: 1,
                    message: format!("no verdict on the job within {:.0} s", limit.as_secs_f64()),
                }));
            }
            if let Some(sig) = signals::take() {
                self.report_signal(sig);
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let _ = self.events.send(Event::Finish);
        if let Some(t) = self.thread.take() {
            // The thread ends right after the verdict and drain; a store call
            // in flight is bounded by OP_TIMEOUT.
            let _ = t.join();
        }
        verdict
    }
}

impl Drop for JobLink {
    fn drop(&mut self) {
        let _ = self.events.send(Event::Finish);
    }
}

/// The link's thread.
struct Worker {
    store: TcpStore,
    rx: mpsc::Receiver<Event>,
    shared: Arc<Shared>,
    topo: Topology,
    timing: Timing,
    hosts: Vec<Option<String>>,
}

impl Worker {
    /// The host name node `j` registered, if it can be read.
    fn host_of(&mut self, j: usize) -> String {
        if let Some(Some(h)) = self.hosts.get(j) {
            return h.clone();
        }
        let k = key(&format!("node/{j}"));
        let found = match self.store.check(&[&k]) {
            Ok(true) => self.store.get_timeout(&k, OP_TIMEOUT).ok(),
            _ => None,
        };
        let host = found
            .map(|v| String::from_utf8_lossy(&v).split('\t').next().unwrap_or("?").to_string())
            .unwrap_or_else(|| "?".to_string());
        if host != "?" {
            if let Some(slot) = self.hosts.get_mut(j) {
                *slot = Some(host.clone());
            }
        }
        host
    }

    fn lost_message(&mut self, j: usize, why: &str) -> String {
        let ranks = ranks_of(j, self.topo.nproc_per_node);
        let verb = if self.topo.nproc_per_node == 1 { "was" } else { "were" };
        format!("{ranks} on node {j} (host {}) {verb} lost: {why}", self.host_of(j))
    }

    /// Stores this node's first failure.
    fn store_failure(&self, r: &Report) -> Result<()> {
        let k = key(&format!("fail/{}", self.topo.node_rank));
        self.store.compare_set(&k, b"", &r.encode())?;
        self.store.add(&key("failures"), 1)?;
        Ok(())
    }

    /// Every node but 0: heartbeats, reports, and the verdict.
    fn follower(mut self) {
        let k = self.topo.node_rank;
        // Node 0's host, for the message if its store goes away.
        let _ = self.host_of(0);
        let mut reported = false;
        let mut next_beat = Instant::now() + HEARTBEAT;
        loop {
            let wait = next_beat.saturating_duration_since(Instant::now());
            let step: Result<()> = match self.rx.recv_timeout(wait) {
                Ok(Event::Failure(r)) if !reported => {
                    reported = true;
                    self.store_failure(&r)
                }
                Ok(Event::Failure(_)) => Ok(()),
                Ok(Event::Done) => self.store.add(&key("done"), 1).map(drop),
                Ok(Event::Finish) | Err(RecvTimeoutError::Disconnected) => return,
                Err(RecvTimeoutError::Timeout) => Ok(()),
            };
            let step = step.and_then(|()| {
                if Instant::now() < next_beat {
                    return Ok(None);
                }
                next_beat = Instant::now() + HEARTBEAT;
                self.store.add(&key(&format!("hb/{k}")), 1)?;
                let vk = key("verdict");
                if self.store.check(&[&vk])? {
                    Ok(Some(Verdict::decode(&self.store.get_timeout(&vk, OP_TIMEOUT)?)))
                } else {
                    Ok(None)
                }
            });
            match step {
                Ok(None) => {}
                Ok(Some(v)) => {
                    self.shared.decide(v);
                    let _ = self.store.add(&key("left"), 1);
                    self.shared.drained.store(true, Ordering::Release);
                    return;
                }
                Err(e) => {
                    let why = format!(
                        "the job's store at {} went away (its launcher ended or the node is unreachable): {e}",
                        self.topo.store_addr
                    );
                    let message = self.lost_message(0, &why);
                    self.shared.decide(Verdict::Failed(Failure { code: 1, message }));
                    self.shared.drained.store(true, Ordering::Release);
                    return;
                }
            }
        }
    }

    /// Node 0: watches every node and writes the verdict.
    fn arbiter(mut self) {
        let n = self.topo.nnodes;
        let start = Instant::now();
        let mut beats = vec![0i64; n];
        let mut seen_at = vec![start; n];
        let mut joined = vec![false; n];
        joined[0] = true;
        let mut reports: Vec<Option<Report>> = vec![None; n];
        let mut failures_seen = 0i64;
        let mut first_failure_at: Option<Instant> = None;
        let mut local_done_at: Option<Instant> = None;
        let mut drain_from: Option<(Instant, usize)> = None;
        loop {
            let step: Result<bool> = (|| {
                match self.rx.recv_timeout(ARBITER_TICK) {
                    Ok(Event::Failure(r)) => {
                        if reports[0].is_none() {
                            self.store_failure(&r)?;
                            reports[0] = Some(r);
                            first_failure_at.get_or_insert_with(Instant::now);
                        }
                    }
                    Ok(Event::Done) => {
                        self.store.add(&key("done"), 1)?;
                        local_done_at = Some(Instant::now());
                    }
                    Ok(Event::Finish) | Err(RecvTimeoutError::Disconnected) => return Ok(true),
                    Err(RecvTimeoutError::Timeout) => {}
                }
                let now = Instant::now();
                if let Some((since, expected)) = drain_from {
                    let left = self.store.add(&key("left"), 0)?;
                    if usize::try_from(left).unwrap_or(0) >= expected || now.duration_since(since) >= DRAIN {
                        self.shared.drained.store(true, Ordering::Release);
                        return Ok(true);
                    }
                    return Ok(false);
                }
                for j in 1..n {
                    let b = self.store.add(&key(&format!("hb/{j}")), 0)?;
                    if b != beats[j] {
                        beats[j] = b;
                        seen_at[j] = now;
                        joined[j] = true;
                    }
                }
                let failures = self.store.add(&key("failures"), 0)?;
                if failures != failures_seen {
                    failures_seen = failures;
                    for (j, slot) in reports.iter_mut().enumerate().skip(1) {
                        let k = key(&format!("fail/{j}"));
                        if slot.is_none() && self.store.check(&[&k])? {
                            *slot = Some(Report::decode(&self.store.get_timeout(&k, OP_TIMEOUT)?));
                        }
                    }
                    first_failure_at.get_or_insert(now);
                }
                let done = self.store.add(&key("done"), 0)?;
                let silent = |j: usize, limit: Duration| joined[j] && now.duration_since(seen_at[j]) >= limit;
                let settled = first_failure_at.is_some_and(|t| now.duration_since(t) >= SETTLE);
                let lost_limit = if settled { LOST_IN_SETTLE } else { self.timing.node_timeout };
                let verdict = if let Some(j) = (1..n).find(|&j| silent(j, lost_limit)) {
                    let why = format!(
                        "no heartbeat from its launcher for {:.1} s (the launcher was killed or the node is \
                         unreachable)",
                        now.duration_since(seen_at[j]).as_secs_f64()
                    );
                    let message = self.lost_message(j, &why);
                    Some(Verdict::Failed(Failure { code: 1, message }))
                } else if settled {
                    let first = reports.iter().flatten().min_by_key(|r| r.at_us).cloned();
                    let first = first.unwrap_or_else(|| Report::now(1, "a node reported a failure".into()));
                    Some(Verdict::Failed(Failure { code: first.code.max(1), message: first.message }))
                } else if let Some(j) =
                    (1..n).find(|&j| !joined[j] && now.duration_since(start) >= self.timing.job_timeout)
                {
                    let message = format!(
                        "{} on node {j} never joined: no launcher with --node-rank {j} reached the store at {} \
                         within {:.0} s",
                        ranks_of(j, self.topo.nproc_per_node),
                        self.topo.store_addr,
                        self.timing.job_timeout.as_secs_f64()
                    );
                    Some(Verdict::Failed(Failure { code: 1, message }))
                } else if usize::try_from(done).unwrap_or(0) >= n {
                    Some(Verdict::Success)
                } else if local_done_at.is_some_and(|t| now.duration_since(t) >= self.timing.job_timeout) {
                    let message = format!(
                        "the workers of some nodes were still running {:.0} s after node 0's had finished \
                         ({done} of {n} nodes done)",
                        self.timing.job_timeout.as_secs_f64()
                    );
                    Some(Verdict::Failed(Failure { code: 1, message }))
                } else {
                    None
                };
                if let Some(v) = verdict {
                    let v = self.shared.decide(v);
                    self.store.set(&key("verdict"), &v.encode())?;
                    // Everyone alive reads it; the lost are not waited for.
                    let lost = |j: usize| silent(j, LOST_IN_SETTLE);
                    let expected = (1..n).filter(|&j| joined[j] && !lost(j)).count();
                    drain_from = Some((Instant::now(), expected));
                }
                Ok(false)
            })();
            match step {
                Ok(false) => {}
                Ok(true) => return,
                Err(e) => {
                    let message = format!("the job's store on node 0 failed: {e}");
                    self.shared.decide(Verdict::Failed(Failure { code: 1, message }));
                    self.shared.drained.store(true, Ordering::Release);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_and_reports_round_trip() {
        for v in [Verdict::Success, Verdict::Failed(Failure { code: 3, message: "rank 1\ton node 0".into() })] {
            assert_eq!(Verdict::decode(&v.encode()), v);
        }
        assert!(matches!(Verdict::decode(b"garbage"), Verdict::Failed(Failure { code: 1, .. })));
        let r = Report { at_us: 17, code: 137, message: "x\ty".into() };
        assert_eq!(Report::decode(&r.encode()), r);
        assert_eq!(Report::decode(b"zz").at_us, u64::MAX);
    }

    fn make_links(n: usize, node_timeout: Duration) -> (rankweave::TcpStoreServer, Vec<JobLink>) {
        let server = rankweave::TcpStoreServer::builder().token(None).bind("127.0.0.1:0").unwrap();
        let port = server.port();
        let timing = Timing { job_timeout: Duration::from_secs(20), node_timeout };
        let links = (0..n)
            .map(|k| {
                let topo = Topology {
                    nnodes: n,
                    nproc_per_node: 2,
                    node_rank: k,
                    host: format!("h{k}"),
                    store_addr: format!("127.0.0.1:{port}"),
                };
                match JobLink::join(topo, "127.0.0.1", port, timing).unwrap() {
                    Joined::Link(l) => l,
                    Joined::Interrupted(sig) => panic!("interrupted by {sig}"),
                }
            })
            .collect();
        (server, links)
    }

    fn wait_verdict(link: &JobLink) -> Verdict {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(v) = link.verdict() {
                return v;
            }
            assert!(Instant::now() < deadline, "no verdict");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn the_earliest_failure_is_everyones_verdict() {
        let (_server, links) = make_links(3, Duration::from_secs(5));
        // Node 2 fails first; node 0 a moment later (a consequence).
        links[2].report_failure(3, "rank 5 on node 2 (host h2) exited with code 3".into());
        std::thread::sleep(Duration::from_millis(100));
        links[0].report_failure(1, "rank 0 on node 0 (host h0) exited with code 1".into());
        let want =
            Verdict::Failed(Failure { code: 3, message: "rank 5 on node 2 (host h2) exited with code 3".into() });
        for l in &links {
            assert_eq!(wait_verdict(l), want);
        }
        for l in links {
            assert_eq!(l.finish(None), want);
        }
    }

    #[test]
    fn all_done_is_success_and_a_silent_node_is_lost() {
        let (_server, links) = make_links(2, Duration::from_secs(5));
        for l in &links {
            l.report_done();
        }
        for l in links {
            assert_eq!(l.finish(None), Verdict::Success);
        }
        // Node 1's link ends without a word (as if its launcher died).
        let (_server, mut links) = make_links(2, Duration::from_secs(1));
        let start = Instant::now();
        drop(links.pop());
        match wait_verdict(&links[0]) {
            Verdict::Failed(f) => assert!(f.message.starts_with("ranks 2-3 on node 1 (host h1) were lost"), "{f:?}"),
            v => panic!("{v:?}"),
        }
        assert!(start.elapsed() < Duration::from_secs(4), "{:?}", start.elapsed());
    }

    #[test]
    fn rank_ranges() {
        assert_eq!(ranks_of(1, 2), "ranks 2-3");
        assert_eq!(ranks_of(2, 1), "rank 2");
    }
}
