//! The shared-memory broadcaster with readers as threads (and one real child
//! process killed with SIGKILL).

mod common;

use rankweave::message_queue::{Handle, MessageQueue, MqOptions};
use rankweave::Error;
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

fn opts() -> MqOptions {
    MqOptions { timeout: Duration::from_secs(20), read_timeout: Some(Duration::from_secs(20)), ..Default::default() }
}

/// A writer plus its readers (rank order: local, then remote).
fn queue(
    n_local: usize,
    n_remote: usize,
    chunk: usize,
    chunks: usize,
    o: MqOptions,
) -> (MessageQueue, Vec<MessageQueue>) {
    let (w, h) = MessageQueue::new_writer(n_local, n_remote, chunk, chunks, o.clone()).unwrap();
    let readers = (1..=n_local + n_remote).map(|r| MessageQueue::from_handle(&h, r, o.clone()).unwrap()).collect();
    (w, readers)
}

/// Message `m`: its length varies and every byte depends on `m`.
fn message(m: usize, chunk: usize) -> Vec<u8> {
    let len = match m % 7 {
        0 => 0,
        1 => 1,
        2 => chunk - 1,
        3 => chunk,
        4 => chunk + 1,
        5 => 3 * chunk + 5,
        _ => m % chunk,
    };
    (0..len).map(|i| (i * 31 + m * 7) as u8).collect()
}

fn spawn_readers(readers: Vec<MessageQueue>, count: usize, chunk: usize) -> Vec<JoinHandle<usize>> {
    readers
        .into_iter()
        .map(|q| {
            std::thread::spawn(move || {
                for m in 0..count {
                    let got = q.dequeue_bytes().unwrap();
                    assert!(got == message(m, chunk), "reader {} message {m}: {} bytes", q.rank(), got.len());
                }
                count
            })
        })
        .collect()
}

#[test]
fn one_to_four_local_readers_every_size() {
    let chunk = 256;
    for n in 1..=4 {
        let (w, readers) = queue(n, 0, chunk, 4, opts());
        let hs = spawn_readers(readers, 70, chunk);
        for m in 0..70 {
            w.enqueue_bytes(&message(m, chunk)).unwrap();
        }
        for h in hs {
            assert_eq!(h.join().unwrap(), 70);
        }
    }
}

#[test]
fn remote_readers_get_every_message_through_the_socket() {
    let chunk = 128;
    let (w, readers) = queue(2, 2, chunk, 3, opts());
    assert_eq!(w.handle().remote_reader_ranks, vec![3, 4]);
    let hs = spawn_readers(readers, 200, chunk);
    for m in 0..200 {
        w.enqueue_bytes(&message(m, chunk)).unwrap();
    }
    for h in hs {
        assert_eq!(h.join().unwrap(), 200);
    }
}

#[test]
fn only_remote_readers_need_no_segment() {
    let (w, readers) = queue(0, 2, 64, 2, opts());
    assert_eq!(w.handle().segment, None);
    let hs = spawn_readers(readers, 30, 64);
    for m in 0..30 {
        w.enqueue_bytes(&message(m, 64)).unwrap();
    }
    for h in hs {
        assert_eq!(h.join().unwrap(), 30);
    }
}

#[test]
fn fifo_stress_with_two_chunks_and_three_readers() {
    // Small chunk count: the writer constantly waits for the slowest reader,
    // exercising every flag transition.
    let chunk = 64;
    let count = 5000;
    let (w, readers) = queue(3, 0, chunk, 2, opts());
    let hs: Vec<_> = readers
        .into_iter()
        .map(|q| {
            std::thread::spawn(move || {
                for m in 0..count as u64 {
                    let got: (u64, Vec<u8>) = q.dequeue().unwrap();
                    assert_eq!(got.0, m, "reader {} out of order", q.rank());
                    assert!(got.1.iter().all(|&b| b == m as u8), "reader {} message {m} torn", q.rank());
                    if m % 1000 == (q.rank() as u64) * 100 {
                        std::thread::sleep(Duration::from_millis(2));
                    }
                }
            })
        })
        .collect();
    for m in 0..count as u64 {
        // Mostly inside one chunk, every 50th overflowing through the sockets.
        let len = if m % 50 == 0 { 300 } else { (m % 40) as usize };
        w.enqueue(&(m, vec![m as u8; len])).unwrap();
    }
    for h in hs {
        h.join().unwrap();
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Request {
    id: u32,
    name: String,
    values: Vec<f32>,
}

#[test]
fn objects_and_broadcast_object() {
    let (w, readers) = queue(2, 1, 4 << 10, 6, opts());
    let hs: Vec<_> = readers
        .into_iter()
        .map(|q| {
            std::thread::spawn(move || {
                let a: Request = q.broadcast_object(None).unwrap();
                let b: String = q.dequeue().unwrap();
                (a, b)
            })
        })
        .collect();
    let req = Request { id: 7, name: "step".into(), values: vec![1.5, -2.0] };
    assert_eq!(w.broadcast_object(Some(req.clone())).unwrap(), req);
    w.enqueue("done").unwrap();
    for h in hs {
        assert_eq!(h.join().unwrap(), (req.clone(), "done".to_string()));
    }
    // Roles are enforced.
    assert!(matches!(w.dequeue_bytes(), Err(Error::InvalidArgument(_))));
}

#[test]
fn a_reader_that_stops_reading_is_named_by_the_writer() {
    // Long enough that the reading reader is never that late.
    let o = MqOptions { timeout: Duration::from_millis(1500), ..opts() };
    let (w, mut readers) = queue(2, 0, 64, 2, o);
    let lazy = readers.pop().unwrap(); // rank 2
    let good = readers.pop().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let lazy_t = std::thread::spawn(move || {
        lazy.dequeue_bytes().unwrap();
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(lazy);
    });
    let good_t = std::thread::spawn(move || while good.dequeue_bytes().is_ok() {});
    let start = Instant::now();
    let err = (0..10).find_map(|_| w.enqueue_bytes(b"x").err()).expect("the writer must give up");
    assert!(start.elapsed() < Duration::from_secs(10));
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(err.peer(), Some(2), "{err}");
    assert!(err.to_string().contains("reader rank(s) [2]"), "{err}");
    assert!(matches!(w.enqueue_bytes(b"y"), Err(Error::Poisoned { .. })));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    lazy_t.join().unwrap();
    drop(w);
    good_t.join().unwrap();
}

#[test]
fn a_reader_that_went_away_is_reported_lost_before_the_timeout() {
    let o = MqOptions { timeout: Duration::from_secs(30), ..opts() };
    let (w, mut readers) = queue(1, 0, 64, 2, o);
    let r = readers.pop().unwrap();
    let t = std::thread::spawn(move || {
        r.dequeue_bytes().unwrap();
        // dropped here: socket closed, flags stop
    });
    w.enqueue_bytes(b"first").unwrap();
    t.join().unwrap();
    let start = Instant::now();
    let err = (0..10).find_map(|_| w.enqueue_bytes(b"x").err()).expect("the writer must give up");
    assert!(start.elapsed() < Duration::from_secs(5), "{:?}", start.elapsed());
    assert!(matches!(err, Error::PeerLost { .. }), "{err}");
    assert_eq!(err.peer(), Some(1));
}

#[test]
fn a_silent_writer_times_out_the_reader() {
    let o = MqOptions { read_timeout: Some(Duration::from_millis(200)), ..opts() };
    let (w, mut readers) = queue(1, 0, 64, 2, o);
    let r = readers.pop().unwrap();
    let t = std::thread::spawn(move || r.dequeue_bytes().unwrap_err());
    w.wait_until_ready().unwrap();
    let err = t.join().unwrap();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(err.peer(), Some(0));
}

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn the_writer_warns_periodically_naming_late_readers() {
    let o = MqOptions { timeout: Duration::from_millis(600), warn_interval: Duration::from_millis(100), ..opts() };
    let (w, readers) = queue(1, 0, 64, 1, o);
    let log = Captured::default();
    let sink = log.clone();
    let subscriber = tracing_subscriber::fmt().with_writer(move || sink.clone()).with_ansi(false).finish();
    let r = readers.into_iter().next().unwrap();
    let t = std::thread::spawn(move || {
        r.dequeue_bytes().unwrap();
        std::thread::sleep(Duration::from_secs(1));
    });
    let err = tracing::subscriber::with_default(subscriber, || {
        w.enqueue_bytes(b"first").unwrap();
        w.enqueue_bytes(b"second").unwrap();
        w.enqueue_bytes(b"third").unwrap_err()
    });
    assert_eq!(err.peer(), Some(1));
    let text = String::from_utf8(log.0.lock().unwrap().clone()).unwrap();
    let warnings = text.lines().filter(|l| l.contains("WARN") && l.contains("reader rank(s) [1]")).count();
    assert!(warnings >= 3, "expected periodic warnings, got:\n{text}");
    t.join().unwrap();
}

#[test]
fn handles_round_trip_and_reject_garbage() {
    let (_w, h) = MessageQueue::new_writer(2, 1, 1024, 3, opts()).unwrap();
    assert_eq!(Handle::from_bytes(&h.to_bytes()).unwrap(), h);
    assert!(Handle::from_bytes(&[0xff; 3]).is_err());
    assert!(MessageQueue::from_handle(&h, 9, opts()).is_err());
    // A handle with absurd sizes is an error, not a panic or an allocation.
    for (chunks, bytes) in [(usize::MAX, 1), (1, usize::MAX), (1 << 30, 1 << 30), (0, 8)] {
        let bad = Handle { max_chunks: chunks, max_chunk_bytes: bytes, ..h.clone() };
        assert!(MessageQueue::from_handle(&bad, 1, opts()).is_err(), "{chunks} x {bytes}");
    }
    assert!(MessageQueue::new_writer(1, 0, usize::MAX, 2, opts()).is_err());
}

/// Child-process entry: a reader that reads two messages and then hangs
/// until it is killed. Does nothing unless started by the SIGKILL test.
#[test]
fn child_reader_entry() {
    let Ok(hex) = std::env::var("RANKWEAVE_MQ_CHILD_HANDLE") else { return };
    let bytes: Vec<u8> = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
    let h = Handle::from_bytes(&bytes).unwrap();
    let q = MessageQueue::from_handle(&h, 1, opts()).unwrap();
    for _ in 0..2 {
        q.dequeue_bytes().unwrap();
    }
    println!("CHILD-READ-TWO");
    std::io::stdout().flush().unwrap();
    std::thread::sleep(Duration::from_secs(60));
}

#[test]
fn a_sigkilled_reader_process_does_not_wedge_the_writer() {
    let o = MqOptions { timeout: Duration::from_secs(10), ..opts() };
    let (w, h) = MessageQueue::new_writer(1, 0, 64, 2, o).unwrap();
    let hex: String = h.to_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_reader_entry", "--nocapture", "--test-threads=1"])
        .env("RANKWEAVE_MQ_CHILD_HANDLE", hex)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    w.enqueue_bytes(b"one").unwrap();
    w.enqueue_bytes(b"two").unwrap();
    // The third message needs chunk 0 back: the child has read it.
    w.enqueue_bytes(b"three").unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut seen = String::new();
    let mut buf = [0u8; 256];
    while !seen.contains("CHILD-READ-TWO") {
        let n = std::io::Read::read(&mut out, &mut buf).unwrap();
        assert!(n > 0, "child exited early: {seen}");
        seen.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    let start = Instant::now();
    let err = (0..10).find_map(|_| w.enqueue_bytes(b"more").err()).expect("the writer must give up");
    assert!(start.elapsed() < Duration::from_secs(5));
    assert!(matches!(err, Error::PeerLost { .. }), "{err}");
    assert_eq!(err.peer(), Some(1));
}

#[test]
fn create_from_process_group_with_one_to_four_readers() {
    for n in 2..=5 {
        let writer = n - 2; // not always rank 0
        let got = common::run_group(n, |pg| {
            let q = MessageQueue::create_from_process_group(&pg, 1024, 4, writer).unwrap();
            let h = q.handle().clone();
            let mut seen = Vec::new();
            for m in 0..50usize {
                let obj = (m, "x".repeat(m * 37)); // grows past the chunk: overflow
                if pg.rank() == writer {
                    q.broadcast_object(Some(obj)).unwrap();
                } else {
                    let got: (usize, String) = q.broadcast_object(None).unwrap();
                    assert_eq!(got, obj);
                    seen.push(got.0);
                }
            }
            (h, seen)
        });
        for (r, (h, seen)) in got.iter().enumerate() {
            assert_eq!(h.writer_rank, writer);
            let mut readers = h.local_reader_ranks.clone();
            readers.sort_unstable();
            assert_eq!(readers, (0..n).filter(|&q| q != writer).collect::<Vec<_>>(), "all threads share a node");
            assert!(h.remote_reader_ranks.is_empty());
            if r != writer {
                assert_eq!(*seen, (0..50).collect::<Vec<_>>());
            }
        }
    }
}

#[test]
fn in_the_same_node_as_sees_every_thread_rank() {
    let got = common::run_group(3, |pg| rankweave::message_queue::in_the_same_node_as(&pg, 1).unwrap());
    assert!(got.iter().all(|v| *v == vec![true; 3]));
}

#[test]
fn a_reader_timeout_can_be_retried() {
    let o = MqOptions { read_timeout: Some(Duration::from_millis(50)), ..opts() };
    let (w, readers) = queue(1, 1, 64, 2, o);
    let ts: Vec<_> = readers
        .into_iter()
        .map(|q| {
            std::thread::spawn(move || {
                let mut timeouts = 0;
                loop {
                    match q.dequeue_bytes() {
                        Ok(b) => return (timeouts, b),
                        Err(Error::Timeout { .. }) => timeouts += 1,
                        Err(e) => panic!("reader {}: {e}", q.rank()),
                    }
                }
            })
        })
        .collect();
    w.wait_until_ready().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    w.enqueue_bytes(b"late but fine").unwrap();
    for t in ts {
        let (timeouts, b) = t.join().unwrap();
        assert!(timeouts >= 1);
        assert_eq!(b, b"late but fine");
    }
}

#[test]
fn queues_and_communicators_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<MessageQueue>();
    send_sync::<rankweave::collectives::shm::ShmComm>();
}

#[test]
fn a_wildcard_listener_advertises_a_reachable_address() {
    let o = MqOptions { listen_host: "0.0.0.0".into(), ..opts() };
    let (w, readers) = queue(0, 1, 64, 2, o);
    assert!(!w.handle().addr.starts_with("0.0.0.0"), "{}", w.handle().addr);
    let hs = spawn_readers(readers, 20, 64);
    for m in 0..20 {
        w.enqueue_bytes(&message(m, 64)).unwrap();
    }
    for h in hs {
        assert_eq!(h.join().unwrap(), 20);
    }
}
