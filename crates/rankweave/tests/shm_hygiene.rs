//! Shared-memory hygiene: free-space errors, no leftovers in /dev/shm, and
//! cleanup of what a SIGKILLed process left behind.

use rankweave::collectives::shm::{ShmComm, ShmOptions};
use rankweave::message_queue::{MessageQueue, MqOptions};
use rankweave::segments::{
    check_free_space_at, cleanup_job, cleanup_job_of, creator_pid, job_id, list_job, ShmSegment,
};
use rankweave::{DType, Error, HashStore, ReduceOp};
use std::io::{BufRead, BufReader};
use std::sync::Arc;
use std::time::Duration;

#[test]
fn too_little_shared_memory_is_a_clear_error() {
    let err = check_free_space_at("/dev/shm", u64::MAX / 2).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, Error::SharedMemory(_)), "{msg}");
    assert!(msg.contains(&format!("needs {} bytes", u64::MAX / 2)), "{msg}");
    assert!(msg.contains("bytes (") && msg.contains("free"), "{msg}");
    assert!(msg.contains("--shm-size") && msg.contains("--ipc=host"), "{msg}");
    check_free_space_at("/dev/shm", 1).unwrap();
    // Creating a segment checks first; nothing is left behind.
    let err = ShmSegment::create_unique("huge", usize::MAX / 4).unwrap_err();
    assert!(err.to_string().contains("--shm-size"), "{err}");
    assert!(!list_job(&job_id()).unwrap().iter().any(|n| n.contains("huge")));
}

#[test]
fn cleanup_job_rejects_odd_job_ids() {
    assert!(cleanup_job("").is_err());
    assert!(cleanup_job("a/b").is_err());
    assert!(cleanup_job("x-y").is_err());
}

/// Child-process entry: creates segments under the job id it was given and
/// hangs until killed. Does nothing unless started by the SIGKILL test.
#[test]
fn child_holding_segments_entry() {
    if std::env::var("RANKWEAVE_HYGIENE_CHILD").is_err() {
        return;
    }
    let seg = ShmSegment::create_unique("killed", 4096).unwrap();
    let (_q, h) = MessageQueue::new_writer(2, 0, 1024, 2, MqOptions::default()).unwrap();
    println!("SEGMENTS {} {}", seg.name(), h.segment.unwrap());
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn segments_of_a_sigkilled_process_are_removed_by_cleanup_job() {
    let job = format!("hygiene{}", std::process::id());
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_holding_segments_entry", "--nocapture", "--test-threads=1"])
        .env("RANKWEAVE_HYGIENE_CHILD", "1")
        .env("RANKWEAVE_JOB_ID", &job)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let names: Vec<String> = loop {
        let line = lines.next().expect("child exited early").unwrap();
        // The harness may have printed the test's name on the same line.
        if let Some((_, rest)) = line.split_once("SEGMENTS ") {
            break rest.split_whitespace().map(str::to_string).collect();
        }
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert_eq!(names.len(), 2);
    for n in &names {
        assert!(n.starts_with(&format!("/rankweave-{job}-")), "{n}");
        assert!(std::path::Path::new(&format!("/dev/shm{n}")).exists(), "{n} should survive SIGKILL");
    }
    let mut removed = cleanup_job(&job).unwrap();
    removed.sort();
    let mut want = names.clone();
    want.sort();
    assert_eq!(removed, want);
    assert!(list_job(&job).unwrap().is_empty());
    assert!(cleanup_job(&job).unwrap().is_empty());
}

#[test]
fn nothing_of_this_job_stays_in_dev_shm() {
    // Communicators: normal use, a failed creation, a timed-out peer.
    for n in [1, 2, 3] {
        let store = Arc::new(HashStore::new());
        let ts: Vec<_> = (0..n)
            .map(|r| {
                let store = store.clone();
                std::thread::spawn(move || {
                    let opts = ShmOptions { slot_bytes: 4096, timeout: Duration::from_secs(10), ..Default::default() };
                    let mut c = ShmComm::create(r, n, "hyg", &*store, "k", &opts).unwrap();
                    let mut buf = vec![1u8; 5000];
                    c.all_reduce(&mut buf, DType::U8, ReduceOp::Sum).unwrap();
                    assert!(buf.iter().all(|&b| b as usize == n));
                })
            })
            .collect();
        ts.into_iter().for_each(|t| t.join().unwrap());
    }
    let store = HashStore::new();
    let opts = ShmOptions { timeout: Duration::from_millis(100), ..Default::default() };
    // Rank 1 never shows up: creation times out and the segment goes.
    assert!(ShmComm::create(0, 2, "lonely", &store, "k", &opts).is_err());

    // Queues: used, dropped before the handshake, and a reader that left.
    let o = MqOptions { timeout: Duration::from_secs(10), ..Default::default() };
    let (w, h) = MessageQueue::new_writer(2, 0, 256, 2, o.clone()).unwrap();
    let readers: Vec<_> = (1..=2).map(|r| MessageQueue::from_handle(&h, r, o.clone()).unwrap()).collect();
    let ts: Vec<_> = readers.into_iter().map(|q| std::thread::spawn(move || q.dequeue_bytes().unwrap())).collect();
    w.enqueue_bytes(&[5; 1000]).unwrap();
    ts.into_iter().for_each(|t| assert_eq!(t.join().unwrap(), vec![5; 1000]));
    drop(w);
    let (never_ready, _) = MessageQueue::new_writer(3, 0, 256, 2, o).unwrap();
    drop(never_ready);

    assert_eq!(list_job(&job_id()).unwrap(), Vec::<String>::new());
}

/// Two jobs sharing one job id: cleaning up after one (its processes'
/// pids) leaves the other's live segments alone.
#[test]
fn cleanup_of_one_job_spares_another_with_the_same_id() {
    let job = job_id();
    let mine = ShmSegment::create_unique("isolation", 4096).unwrap();
    let me = std::process::id();
    assert_eq!(creator_pid(mine.name()), Some(me), "{}", mine.name());
    // A segment "of another process" of the same job id (pid 1 is never us).
    let other_name = format!("/rankweave-{job}-isolation-1-7");
    let other = ShmSegment::create(&other_name, 4096).unwrap();
    let removed = cleanup_job_of(&job, &[1]).unwrap();
    assert_eq!(removed, vec![other_name.clone()]);
    assert!(list_job(&job).unwrap().contains(&mine.name().to_string()), "our live segment was removed");
    drop(other);
    drop(mine);
    assert_eq!(creator_pid("/rankweave-j-tp_0-123-4"), Some(123));
    assert_eq!(creator_pid("/rankweave-j-keep"), None);
}
