//! `rankweave launch`: start the workers of one node and supervise them.
//!
//! torchrun's job for any program: every worker gets `RANK`, `LOCAL_RANK`,
//! `WORLD_SIZE`, `LOCAL_WORLD_SIZE`, `GROUP_RANK` (the node rank),
//! `MASTER_ADDR`, `MASTER_PORT`, `RANKWEAVE_JOB_ID` and, with more than one
//! worker per node, `OMP_NUM_THREADS=1` unless it is already set. With
//! `--bind-to core` (or `auto`) each worker runs on a CPU of its own
//! ([`crate::bind`]).
//!
//! Supervision: each worker runs in its own process group. When one exits
//! non-zero or dies from a signal, or the launcher gets SIGINT, SIGTERM or
//! SIGHUP, every other worker's group gets SIGTERM, then SIGKILL after the
//! grace period (at once on a second signal). The launcher exits with the
//! first failed worker's code (128 + signal for a signal) or 128 + the signal
//! it received. When a worker ends, whatever is left in its process group is
//! killed, so nothing it started outlives the job. Finally the shared-memory
//! segments named `rankweave-<job>-*` in `/dev/shm` are removed.
//!
//! The store: node 0's launcher hosts the job's rendezvous store on the
//! master port ([`store_host`]), listening on the master address when it is
//! one of this machine's, else on every interface, and requiring
//! `RANKWEAVE_TOKEN` when it is set. Every worker gets
//! `RANKWEAVE_STORE_HOSTED=1`, so rank 0 connects to it like the others and
//! no worker's exit takes it away. It lives until the launcher ends.
//!
//! With several nodes each node runs its own launcher, and the launchers act
//! as one job ([`job`]): they meet at node 0's store, and when a worker on
//! any node fails (or a launcher gets a signal, or a node's launcher stops
//! beating for `--node-timeout` seconds, or node 0's store goes away) every
//! launcher stops its workers as above and exits non-zero, all naming the
//! same first failure (`rank 3 on node 1 (host X) exited with code 1`).
//! When a node's workers have all exited 0 its launcher waits, bounded by
//! `RANKWEAVE_TIMEOUT` (300 s by default), for the other nodes to finish,
//! and node 0's launcher keeps the store up until the others have left.
//! Each worker dies with its launcher (`PR_SET_PDEATHSIG`), so a killed
//! launcher leaves no worker behind; processes a worker started outside
//! its process group are then not cleaned up.

mod adopt;
mod job;
mod output;
mod signals;
mod store_host;

use crate::bind::{self, BindTo};
pub use job::DEFAULT_NODE_TIMEOUT;
use job::{Failure, JobLink, Joined, Timing, Topology, Verdict};
use output::{Forwarders, Stream};
use rankweave::{Context, Error, Result};
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

/// Master port used by default when there is more than one node.
pub const DEFAULT_MULTINODE_PORT: u16 = 29500;

/// How often the supervisor polls its workers and the signal flag.
const POLL: Duration = Duration::from_millis(5);

/// Arguments of `rankweave launch`.
#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  rankweave launch --nproc-per-node 4 -- sh -c 'echo rank $RANK of $WORLD_SIZE'")]
pub struct LaunchArgs {
    /// Worker processes to start on this node.
    #[arg(long, value_name = "N")]
    pub nproc_per_node: usize,
    /// Where this node stands in the job.
    #[command(flatten)]
    pub node: NodeArgs,
    /// Seconds between SIGTERM and SIGKILL when stopping workers.
    #[arg(long, value_name = "SECONDS", default_value_t = 5.0)]
    pub grace: f64,
    /// With several nodes: seconds without a heartbeat from a node's launcher after which the node counts as lost.
    #[arg(long, value_name = "SECONDS", default_value_t = job::DEFAULT_NODE_TIMEOUT.as_secs_f64())]
    pub node_timeout: f64,
    /// Pass worker output through untouched instead of prefixing lines with `[rank] `.
    #[arg(long)]
    pub no_prefix: bool,
    /// Pin each worker to a CPU of its own: `none`, `core` (local rank k on
    /// the k-th CPU this launcher may use; more workers than CPUs is an
    /// error) or `auto` (`core` when every worker gets its own CPU).
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = BindTo::None)]
    pub bind_to: BindTo,
    /// The program to run and its arguments (after `--`).
    #[arg(value_name = "PROGRAM", trailing_var_arg = true, allow_hyphen_values = true)]
    pub command: Vec<OsString>,
}

/// This node's place in a job of one or more nodes: the options `launch`
/// and `demo` share. Every node of a job is started with the same values
/// but its own `--node-rank`.
#[derive(Debug, Clone, clap::Args)]
pub struct NodeArgs {
    /// Number of nodes in the job.
    #[arg(long, value_name = "M", default_value_t = 1)]
    pub nnodes: usize,
    /// This node's index, 0 <= K < M (exported as GROUP_RANK).
    #[arg(long, value_name = "K", default_value_t = 0)]
    pub node_rank: usize,
    /// Address of node 0, whose launcher hosts the rendezvous store (IPv6 literals work).
    #[arg(long, value_name = "A", default_value = "127.0.0.1")]
    pub master_addr: String,
    /// Rendezvous port [default: a free port on one node, 29500 on several; 0 picks a free one on one node].
    #[arg(long, value_name = "P")]
    pub master_port: Option<u16>,
}

impl Default for NodeArgs {
    /// One node, on loopback, with a free port.
    fn default() -> Self {
        NodeArgs { nnodes: 1, node_rank: 0, master_addr: "127.0.0.1".into(), master_port: None }
    }
}

impl NodeArgs {
    /// Checks the node count, this node's index and the address; every
    /// problem is an `InvalidArgument` naming the option.
    pub fn check(&self) -> Result<()> {
        if self.nnodes == 0 {
            return Err(Error::invalid("--nnodes must be at least 1"));
        }
        if self.node_rank >= self.nnodes {
            return Err(Error::invalid(format!(
                "--node-rank {} is out of range for --nnodes {} (valid: 0..={})",
                self.node_rank,
                self.nnodes,
                self.nnodes - 1
            )));
        }
        if self.master_addr.is_empty() {
            return Err(Error::invalid("--master-addr must not be empty"));
        }
        Ok(())
    }
}

/// A validated description of one node's share of a job.
#[derive(Debug, Clone)]
pub struct JobSpec {
    /// Workers on this node (at least 1).
    pub nproc_per_node: usize,
    /// Nodes in the job (at least 1).
    pub nnodes: usize,
    /// This node's index.
    pub node_rank: usize,
    /// `MASTER_ADDR` for the workers.
    pub master_addr: String,
    /// `MASTER_PORT`; `None` or 0 picks the default.
    pub master_port: Option<u16>,
    /// Time between SIGTERM and SIGKILL.
    pub grace: Duration,
    /// A node whose launcher sends no heartbeat this long is lost.
    pub node_timeout: Duration,
    /// Prefix worker output lines with `[rank] `.
    pub prefix: bool,
    /// CPU placement of the workers.
    pub bind: BindTo,
    /// Program to run.
    pub program: OsString,
    /// Its arguments.
    pub args: Vec<OsString>,
}

impl JobSpec {
    /// Checks the arguments; every problem is an `InvalidArgument` (exit 2).
    pub fn from_args(a: LaunchArgs) -> Result<Self> {
        if a.nproc_per_node == 0 {
            return Err(Error::invalid("--nproc-per-node must be at least 1"));
        }
        a.node.check()?;
        if a.nproc_per_node.checked_mul(a.node.nnodes).is_none() {
            return Err(Error::invalid("--nproc-per-node times --nnodes overflows"));
        }
        if !a.grace.is_finite() || a.grace < 0.0 || a.grace > 86_400.0 {
            return Err(Error::invalid(format!("--grace {} must be between 0 and 86400 seconds", a.grace)));
        }
        if !a.node_timeout.is_finite() || a.node_timeout < 1.0 || a.node_timeout > 86_400.0 {
            return Err(Error::invalid(format!(
                "--node-timeout {} must be between 1 and 86400 seconds",
                a.node_timeout
            )));
        }
        let mut command = a.command.into_iter();
        let program = command.next().ok_or_else(|| {
            Error::invalid("no program given; usage: rankweave launch --nproc-per-node N -- PROGRAM ARGS...")
        })?;
        Ok(JobSpec {
            nproc_per_node: a.nproc_per_node,
            nnodes: a.node.nnodes,
            node_rank: a.node.node_rank,
            master_addr: a.node.master_addr,
            master_port: a.node.master_port,
            grace: Duration::from_secs_f64(a.grace),
            node_timeout: Duration::from_secs_f64(a.node_timeout),
            prefix: !a.no_prefix,
            bind: a.bind_to,
            program,
            args: command.collect(),
        })
    }

    /// Total number of ranks in the job.
    pub fn world_size(&self) -> usize {
        self.nproc_per_node * self.nnodes
    }

    /// The store port: the given one; [`DEFAULT_MULTINODE_PORT`] on several
    /// nodes by default; 0 (the store picks a free one) on one node by
    /// default or when asked for, which only node 0 may do.
    pub fn port(&self) -> Result<u16> {
        match self.master_port {
            Some(p) if p != 0 => Ok(p),
            None if self.nnodes > 1 => Ok(DEFAULT_MULTINODE_PORT),
            _ if self.nnodes == 1 => Ok(0),
            _ => Err(Error::invalid(
                "--master-port 0 with several nodes: the other nodes could not know the port; give a real one",
            )),
        }
    }
}

/// Runs `rankweave launch`; returns the exit code.
pub fn run(args: LaunchArgs) -> Result<i32> {
    run_job(&JobSpec::from_args(args)?)
}

/// Starts the workers of `spec`, supervises them until all have ended and
/// cleans up; returns the launcher's exit code (0 when every worker exited 0).
pub fn run_job(spec: &JobSpec) -> Result<i32> {
    let cpus = bind::plan_here(spec.bind, spec.nproc_per_node)?;
    signals::install().map_err(|e| Error::io(Context::op("launch: install signal handlers"), e))?;
    adopt::become_subreaper();
    let port = spec.port()?;
    let host = nix::unistd::gethostname().map(|h| h.to_string_lossy().into_owned()).unwrap_or_else(|_| "?".into());
    // Node 0 hosts the store for the whole job; it lives until we return.
    let (server, connect_host) = if spec.node_rank == 0 {
        let (server, connect) = store_host::host_store(&spec.master_addr, port)?;
        (Some(server), connect)
    } else {
        (None, store_host::bare_host(&spec.master_addr).to_string())
    };
    let port = server.as_ref().map_or(port, |s| s.port());
    let mut link = None;
    if spec.nnodes > 1 {
        let topo = Topology {
            nnodes: spec.nnodes,
            nproc_per_node: spec.nproc_per_node,
            node_rank: spec.node_rank,
            host: host.clone(),
            store_addr: store_host::host_port(&spec.master_addr, port),
        };
        let timing = Timing { job_timeout: rankweave::store::default_timeout(), node_timeout: spec.node_timeout };
        match JobLink::join(topo, &connect_host, port, timing)? {
            Joined::Link(l) => link = Some(l),
            Joined::Interrupted(sig) => {
                output::message(&format!("received {} while joining the job", sig.as_str()));
                return Ok(128 + sig as i32);
            }
        }
    }
    let job = job_id();
    tracing::info!(job, port, world = spec.world_size(), "launching {} workers", spec.nproc_per_node);

    let mut forwarders = Forwarders::new();
    let mut workers: Vec<Worker> = Vec::with_capacity(spec.nproc_per_node);
    let mut code = None;
    for local_rank in 0..spec.nproc_per_node {
        let rank = spec.node_rank * spec.nproc_per_node + local_rank;
        match spawn_worker(spec, local_rank, cpus.as_ref().map(|c| c[local_rank]), port, &job) {
            Ok(mut child) => {
                if spec.prefix {
                    if let Some(out) = child.stdout.take() {
                        forwarders.spawn(out, Stream::Stdout, rank, true);
                    }
                    if let Some(err) = child.stderr.take() {
                        forwarders.spawn(err, Stream::Stderr, rank, true);
                    }
                }
                let pid = Pid::from_raw(child.id() as i32);
                workers.push(Worker { rank, pid, child, status: None });
            }
            Err(e) => {
                output::message(&format!(
                    "cannot start {:?} for rank {rank}: {e}; stopping {} started workers",
                    spec.program,
                    workers.len()
                ));
                let c = match e.kind() {
                    std::io::ErrorKind::NotFound => 127,
                    std::io::ErrorKind::PermissionDenied => 126,
                    _ => 1,
                };
                code = Some(Failure {
                    code: c,
                    message: format!(
                        "rank {rank} on node {} (host {host}) could not start {:?}: {e}",
                        spec.node_rank, spec.program
                    ),
                });
                break;
            }
        }
    }
    let (mut code, local_failure) = match code {
        None => supervise(&mut workers, spec, &host, link.as_mut()),
        Some(failure) => {
            if let Some(l) = &link {
                l.report_failure(failure.code, failure.message.clone());
            }
            kill_and_reap(&mut workers);
            (failure.code, Some(failure))
        }
    };
    let stray = adopt::kill_adopted(Duration::from_secs(2));
    if stray > 0 {
        tracing::warn!("killed {stray} processes the workers left running outside their process groups");
    }
    forwarders.finish(Duration::from_secs(2));
    let pids: Vec<u32> = workers.iter().filter_map(|w| u32::try_from(w.pid.as_raw()).ok()).collect();
    let removed = remove_job_segments(&job, &pids);
    if removed > 0 {
        tracing::info!(job, "removed {removed} shared-memory segments left in /dev/shm");
    }
    if let Some(link) = link {
        if local_failure.is_none() {
            link.report_done();
        }
        if let Verdict::Failed(f) = link.finish(local_failure) {
            output::message(&format!("job failed: {}", f.message));
            code = f.code.max(1);
        }
    }
    drop(server);
    Ok(code)
}

/// The environment one worker gets on top of the launcher's.
pub fn worker_env(spec: &JobSpec, local_rank: usize, port: u16, job: &str) -> Vec<(&'static str, String)> {
    let rank = spec.node_rank * spec.nproc_per_node + local_rank;
    let mut env = vec![
        ("RANK", rank.to_string()),
        ("LOCAL_RANK", local_rank.to_string()),
        ("WORLD_SIZE", spec.world_size().to_string()),
        ("LOCAL_WORLD_SIZE", spec.nproc_per_node.to_string()),
        ("GROUP_RANK", spec.node_rank.to_string()),
        ("MASTER_ADDR", spec.master_addr.clone()),
        ("MASTER_PORT", port.to_string()),
        (rankweave::segments::JOB_ID_ENV, job.to_string()),
        // Node 0's launcher hosts the store: rank 0 must not.
        (rankweave::store::init::STORE_HOSTED_ENV, "1".to_string()),
    ];
    if spec.nproc_per_node > 1 && std::env::var_os("OMP_NUM_THREADS").is_none() {
        env.push(("OMP_NUM_THREADS", "1".to_string()));
    }
    env
}

fn spawn_worker(spec: &JobSpec, local_rank: usize, cpu: Option<usize>, port: u16, job: &str) -> std::io::Result<Child> {
    let mut cmd = Command::new(&spec.program);
    cmd.args(&spec.args).envs(worker_env(spec, local_rank, port, job)).stdin(Stdio::null());
    if let Some(cpu) = cpu {
        bind::pin(&mut cmd, cpu)?;
        tracing::debug!(local_rank, cpu, "worker bound");
    }
    // Its own process group: signals reach everything the worker started,
    // and a terminal's Ctrl-C reaches only the launcher, which forwards it.
    cmd.process_group(0);
    let launcher = nix::unistd::getpid();
    // SAFETY: the closure runs in the forked child before exec and makes only
    // async-signal-safe system calls (prctl, getppid); it allocates nothing
    // and touches no lock.
    unsafe {
        cmd.pre_exec(move || {
            // If the launcher is SIGKILLed the worker dies with it...
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)?;
            // ...including when that happened before the line above.
            if nix::unistd::getppid() != launcher {
                return Err(std::io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            Ok(())
        });
    }
    if spec.prefix {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    }
    cmd.spawn()
}

/// A port nobody listens on right now (bind 127.0.0.1:0, read, drop).
pub fn free_port() -> Result<u16> {
    let listener = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::io(Context::op("launch: pick a free master port"), e))?;
    let addr = listener.local_addr().map_err(|e| Error::io(Context::op("launch: pick a free master port"), e))?;
    Ok(addr.port())
}

/// `RANKWEAVE_JOB_ID` from the environment when it is valid (the library's
/// rule, [`rankweave::segments::is_valid_job_id`]), else a fresh id.
pub fn job_id() -> String {
    use rankweave::segments::{is_valid_job_id, new_job_id, JOB_ID_ENV};
    match std::env::var(JOB_ID_ENV) {
        Ok(id) if is_valid_job_id(&id) => id,
        Ok(id) => {
            tracing::warn!("ignoring {JOB_ID_ENV}={id:?} (1 to 64 letters, digits and _); using a fresh id");
            new_job_id()
        }
        Err(_) => new_job_id(),
    }
}

/// Removes `/dev/shm/rankweave-<job>-*` (through the library's
/// `segments::cleanup_job_of`, which knows how segments are named), only
/// those the given worker processes created; returns how
/// many were removed.
pub fn remove_job_segments(job: &str, pids: &[u32]) -> usize {
    // Only what this launcher's workers created: another job may share the id.
    match rankweave::segments::cleanup_job_of(job, pids) {
        Ok(removed) => removed.len(),
        Err(e) => {
            tracing::warn!("cannot remove the shared-memory segments of job {job}: {e}");
            0
        }
    }
}

/// One started worker.
#[derive(Debug)]
struct Worker {
    rank: usize,
    pid: Pid,
    child: Child,
    /// Set once the worker has been reaped.
    status: Option<ExitStatus>,
}

impl Worker {
    /// Reaps the worker if it has ended. Before reaping, whatever is left in
    /// its process group is killed: until the zombie is reaped its pid (the
    /// group id) cannot be reused, so the kill cannot hit a stranger.
    fn poll(&mut self) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let flags = WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT;
        match waitid(Id::Pid(self.pid), flags) {
            Ok(WaitStatus::StillAlive) => return None,
            Ok(_) => {
                let _ = killpg(self.pid, Signal::SIGKILL);
            }
            // E.g. a real-time signal nix cannot name; try_wait decides.
            Err(_) => {}
        }
        match self.child.try_wait() {
            Ok(Some(status)) => self.status = Some(status),
            Ok(None) => {}
            Err(e) => {
                tracing::warn!("rank {} (pid {}): wait failed: {e}; counting it as failed", self.rank, self.pid);
                self.status = Some(ExitStatus::from_raw(1 << 8));
            }
        }
        self.status
    }

    /// Sends `sig` to the worker's process group (to the worker alone if it
    /// left its group).
    fn signal(&self, sig: Signal) {
        if self.status.is_none() && killpg(self.pid, sig).is_err() {
            let _ = kill(self.pid, sig);
        }
    }
}

fn signal_all(workers: &mut [Worker], sig: Signal) {
    for w in workers.iter_mut() {
        if w.poll().is_none() {
            w.signal(sig);
        }
    }
}

/// SIGKILL to every worker's group, then reap them all.
fn kill_and_reap(workers: &mut [Worker]) {
    signal_all(workers, Signal::SIGKILL);
    while workers.iter_mut().any(|w| w.poll().is_none()) {
        std::thread::sleep(POLL);
    }
}

/// The exit code for a worker status: its code, or 128 + signal.
fn status_code(status: ExitStatus) -> i32 {
    match (status.code(), status.signal()) {
        (Some(c), _) => c,
        (None, Some(s)) => 128 + s,
        (None, None) => 1,
    }
}

fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exited with code {c}"),
        (None, Some(s)) => match Signal::try_from(s) {
            Ok(sig) => format!("was killed by signal {s} ({})", sig.as_str()),
            Err(_) => format!("was killed by signal {s}"),
        },
        (None, None) => format!("ended with status {status}"),
    }
}

/// Waits for every worker; stops them all on the first failure, on a
/// forwarded signal or on the job's failure elsewhere (`link`). Returns the
/// launcher's exit code and this node's failure, if it had one.
fn supervise(
    workers: &mut [Worker],
    spec: &JobSpec,
    host: &str,
    mut link: Option<&mut JobLink>,
) -> (i32, Option<Failure>) {
    let grace = spec.grace;
    let mut local: Option<Failure> = None;
    let mut code = 0;
    let mut stopping = false;
    let mut kill_at: Option<Instant> = None;
    let mut killed = false;
    let pids: Vec<Pid> = workers.iter().map(|w| w.pid).collect();
    loop {
        adopt::reap_adopted(&pids);
        let mut failed: Option<(usize, Pid, ExitStatus)> = None;
        let mut running = 0;
        for w in workers.iter_mut() {
            match (w.status.is_some(), w.poll()) {
                (false, Some(status)) if !status.success() && failed.is_none() => {
                    failed = Some((w.rank, w.pid, status));
                }
                (_, None) => running += 1,
                _ => {}
            }
        }
        let signal = signals::take();
        if let (Some(sig), Some(l)) = (signal, link.as_deref_mut()) {
            l.report_signal(sig);
        }
        if !stopping {
            let remote = match link.as_deref().and_then(JobLink::verdict) {
                Some(Verdict::Failed(f)) => Some(f),
                _ => None,
            };
            let reason = match (failed, signal, remote) {
                (Some((rank, pid, status)), _, _) => {
                    code = status_code(status);
                    let message = format!("rank {rank} on node {} (host {host}) {}", spec.node_rank, describe(status));
                    if let Some(l) = link.as_deref() {
                        l.report_failure(code, message.clone());
                    }
                    local = Some(Failure { code, message });
                    Some(format!("rank {rank} (pid {pid}) {}", describe(status)))
                }
                (None, Some(sig), _) => {
                    code = 128 + sig as i32;
                    let message =
                        format!("the launcher of node {} (host {host}) received {}", spec.node_rank, sig.as_str());
                    local = Some(Failure { code, message });
                    Some(format!("received {}", sig.as_str()))
                }
                (None, None, Some(f)) => {
                    code = f.code.max(1);
                    Some(format!("job failed: {}", f.message))
                }
                (None, None, None) => None,
            };
            if let Some(reason) = reason {
                stopping = true;
                let others = if failed.is_some() { "other " } else { "" };
                let plural = if running == 1 { "" } else { "s" };
                output::message(&format!("{reason}; stopping {running} {others}worker{plural}"));
                signal_all(workers, Signal::SIGTERM);
                kill_at = Some(Instant::now() + grace);
            }
        } else if signal.is_some() && !killed {
            // A second signal while stopping: no more grace.
            kill_at = Some(Instant::now());
        }
        if running == 0 {
            return (code, local);
        }
        if let Some(t) = kill_at {
            if !killed && Instant::now() >= t {
                killed = true;
                signal_all(workers, Signal::SIGKILL);
            }
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(n: usize, nnodes: usize, node_rank: usize, cmd: &[&str]) -> LaunchArgs {
        LaunchArgs {
            nproc_per_node: n,
            node: NodeArgs { nnodes, node_rank, ..NodeArgs::default() },
            grace: 5.0,
            node_timeout: 5.0,
            no_prefix: false,
            bind_to: BindTo::None,
            command: cmd.iter().map(OsString::from).collect(),
        }
    }

    #[test]
    fn rejects_bad_arguments() {
        for a in [args(0, 1, 0, &["true"]), args(1, 0, 0, &["true"]), args(2, 2, 2, &["true"]), args(2, 1, 0, &[])] {
            assert!(matches!(JobSpec::from_args(a), Err(Error::InvalidArgument(_))));
        }
        let mut a = args(1, 1, 0, &["true"]);
        a.grace = -1.0;
        assert!(matches!(JobSpec::from_args(a), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn ranks_follow_node_rank() {
        let spec = JobSpec::from_args(args(3, 2, 1, &["prog", "x"])).unwrap();
        assert_eq!(spec.world_size(), 6);
        assert_eq!(spec.args, vec![OsString::from("x")]);
        let env = worker_env(&spec, 2, 1234, "j1");
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RANK"), Some("5"));
        assert_eq!(get("LOCAL_RANK"), Some("2"));
        assert_eq!(get("WORLD_SIZE"), Some("6"));
        assert_eq!(get("LOCAL_WORLD_SIZE"), Some("3"));
        assert_eq!(get("GROUP_RANK"), Some("1"));
        assert_eq!(get("MASTER_PORT"), Some("1234"));
        assert_eq!(get("RANKWEAVE_JOB_ID"), Some("j1"));
        assert_eq!(get("RANKWEAVE_STORE_HOSTED"), Some("1"));
    }

    #[test]
    fn default_ports() {
        let spec = |nnodes, node_rank, port| {
            let mut a = args(1, nnodes, node_rank, &["true"]);
            a.node.master_port = port;
            JobSpec::from_args(a).unwrap()
        };
        assert_eq!(spec(2, 1, None).port().unwrap(), DEFAULT_MULTINODE_PORT);
        assert_eq!(spec(2, 0, Some(7)).port().unwrap(), 7);
        assert_eq!(spec(1, 0, None).port().unwrap(), 0);
        assert_eq!(spec(1, 0, Some(0)).port().unwrap(), 0);
        assert!(matches!(spec(2, 0, Some(0)).port(), Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn fresh_job_ids_are_short_alphanumeric_and_differ() {
        let a = rankweave::segments::new_job_id();
        let b = rankweave::segments::new_job_id();
        assert_eq!(a.len(), 10);
        assert!(rankweave::segments::is_valid_job_id(&a));
        assert_ne!(a, b);
        assert!(!rankweave::segments::is_valid_job_id("a-b"));
        assert!(!rankweave::segments::is_valid_job_id(""));
    }
}
