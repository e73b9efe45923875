//! `--nproc N`: start N local ranks of this same command and supervise them.
//!
//! Each child is this executable with the same arguments and the torch
//! environment (RANK, LOCAL_RANK, WORLD_SIZE, LOCAL_WORLD_SIZE, MASTER_ADDR,
//! MASTER_PORT on a free port, RANKWEAVE_JOB_ID), plus a marker that makes it
//! a worker instead of another spawner. Rank 0 inherits stdout and stderr;
//! the others' output is captured and shown only when something fails. When
//! a rank fails the others get SIGTERM, then SIGKILL after a grace period.

use super::report::Record;
use rankweave::{Context, Error, Result};
use std::io::Read;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Set in the children: this process is a rank, not a spawner.
pub const WORKER_ENV: &str = "RANKWEAVE_BENCH_WORKER";
/// Set in rank 0's environment: where to write the extended CSV of results.
pub const RESULTS_ENV: &str = "RANKWEAVE_BENCH_RESULTS";
/// How long failed ranks' peers get between SIGTERM and SIGKILL.
pub const GRACE: Duration = Duration::from_secs(3);
/// Bytes of a non-zero rank's output kept for the failure report.
const KEEP_OUTPUT: usize = 64 * 1024;

/// True inside a child started by [`run_world`].
pub fn is_worker() -> bool {
    std::env::var_os(WORKER_ENV).is_some()
}

struct Rank {
    child: Child,
    output: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    status: Option<ExitStatus>,
}

fn capture(src: impl Read + Send + 'static, sink: Arc<Mutex<Vec<u8>>>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut src = src;
        let mut buf = [0u8; 8192];
        loop {
            match src.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => {
                    let mut out = sink.lock().unwrap_or_else(|e| e.into_inner());
                    out.extend_from_slice(&buf[..k]);
                    if out.len() > 2 * KEEP_OUTPUT {
                        let cut = out.len() - KEEP_OUTPUT;
                        out.drain(..cut);
                    }
                }
            }
        }
    })
}

fn describe(st: &ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (st.code(), st.signal()) {
        (Some(c), _) => format!("exit code {c}"),
        (None, Some(s)) => format!("killed by signal {s}"),
        _ => "unknown status".into(),
    }
}

fn exit_code(st: &ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0))
}

fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        // The child may already be gone; ESRCH is fine.
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Runs one world of `n` ranks of this command. Returns the exit code (0
/// when every rank succeeded, else the first failed rank's) and rank 0's
/// records (empty when it wrote none).
pub fn run_world(n: usize, bind: crate::bind::BindTo) -> Result<(i32, Vec<Record>)> {
    let cpus = crate::bind::plan_here(bind, n)?;
    if let Some(c) = &cpus {
        eprintln!(
            "rankweave bench: {n} ranks bound to CPUs {c:?}, rank k on the k-th (--bind-to none leaves them unbound)"
        );
    }
    let exe = std::env::current_exe().map_err(|e| Error::io(Context::op("bench: find own executable"), e))?;
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).collect();
    let port = crate::launch::free_port()?;
    // The library's job-id rule; the `bench` prefix marks the segments as ours.
    let job = format!("bench{}", rankweave::segments::new_job_id());
    let results: PathBuf = std::env::temp_dir().join(format!("rankweave-{job}.csv"));
    let mut ranks: Vec<Rank> = Vec::with_capacity(n);
    for r in 0..n {
        let mut cmd = Command::new(&exe);
        cmd.args(&args)
            .env(WORKER_ENV, "1")
            .env("RANK", r.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("GROUP_RANK", "0")
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env(rankweave::segments::JOB_ID_ENV, &job)
            // This world's rank 0 hosts its own store, even when the bench
            // itself runs under a launcher that hosts another one.
            .env_remove(rankweave::store::init::STORE_HOSTED_ENV)
            .stdin(Stdio::null());
        if std::env::var_os("OMP_NUM_THREADS").is_none() && n > 1 {
            cmd.env("OMP_NUM_THREADS", "1");
        }
        let pinned = match &cpus {
            Some(cpus) => crate::bind::pin(&mut cmd, cpus[r]),
            None => Ok(()),
        };
        if r == 0 {
            cmd.env(RESULTS_ENV, &results);
        } else {
            cmd.env_remove(RESULTS_ENV).stdout(Stdio::piped()).stderr(Stdio::piped());
        }
        let mut child = match pinned.and_then(|()| cmd.spawn()) {
            Ok(c) => c,
            Err(e) => {
                for rk in &mut ranks {
                    signal(&rk.child, nix::sys::signal::Signal::SIGKILL);
                    let _ = rk.child.wait();
                }
                return Err(Error::io(Context::op(format!("bench: start rank {r} ({})", exe.display())), e));
            }
        };
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut readers = Vec::new();
        if let Some(o) = child.stdout.take() {
            readers.push(capture(o, output.clone()));
        }
        if let Some(e) = child.stderr.take() {
            readers.push(capture(e, output.clone()));
        }
        ranks.push(Rank { child, output, readers, status: None });
    }

    let mut first_failure: Option<(usize, ExitStatus)> = None;
    let mut term_sent: Option<Instant> = None;
    let mut killed = false;
    loop {
        for (r, rk) in ranks.iter_mut().enumerate() {
            if rk.status.is_none() {
                if let Ok(Some(st)) = rk.child.try_wait() {
                    rk.status = Some(st);
                    if !st.success() && first_failure.is_none() {
                        first_failure = Some((r, st));
                    }
                }
            }
        }
        if ranks.iter().all(|rk| rk.status.is_some()) {
            break;
        }
        if first_failure.is_some() {
            match term_sent {
                None => {
                    for rk in ranks.iter().filter(|rk| rk.status.is_none()) {
                        signal(&rk.child, nix::sys::signal::Signal::SIGTERM);
                    }
                    term_sent = Some(Instant::now());
                }
                Some(t) if !killed && t.elapsed() > GRACE => {
                    for rk in ranks.iter().filter(|rk| rk.status.is_none()) {
                        signal(&rk.child, nix::sys::signal::Signal::SIGKILL);
                    }
                    killed = true;
                }
                _ => {}
            }
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    for rk in &mut ranks {
        for h in rk.readers.drain(..) {
            let _ = h.join();
        }
    }

    let records = match std::fs::read_to_string(&results) {
        Ok(text) => super::report::parse_csv(&text, &results.display().to_string())?,
        Err(_) => Vec::new(),
    };
    let _ = std::fs::remove_file(&results);

    let Some((failed, st)) = first_failure else {
        return Ok((0, records));
    };
    eprintln!(
        "rankweave bench: rank {failed} of {n} failed ({}); output of the other failed ranks follows",
        describe(&st)
    );
    for (r, rk) in ranks.iter().enumerate() {
        let Some(s) = rk.status else { continue };
        if r == 0 || s.success() {
            continue;
        }
        let out = rk.output.lock().unwrap_or_else(|e| e.into_inner());
        eprintln!("----- rank {r} ({}) -----", describe(&s));
        eprint!("{}", String::from_utf8_lossy(&out));
        if !out.ends_with(b"\n") && !out.is_empty() {
            eprintln!();
        }
    }
    Ok((exit_code(&st).max(1), records))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn free_ports_are_nonzero() {
        assert_ne!(crate::launch::free_port().unwrap(), 0);
    }

    #[test]
    fn exit_codes_of_signals_follow_the_shell() {
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(exit_code(&ExitStatus::from_raw(3 << 8)), 3);
        assert_eq!(exit_code(&ExitStatus::from_raw(9)), 137);
        assert_eq!(describe(&ExitStatus::from_raw(9)), "killed by signal 9");
    }
}
