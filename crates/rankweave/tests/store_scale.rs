//! The store under many idle, abandoned or hostile clients: what each costs
//! the server (threads, descriptors) and whether legitimate ranks are still
//! served promptly.
//!
//! Threads and descriptors are counted process-wide (/proc/self/task,
//! /proc/self/fd), so the tests of this binary run one at a time (`SERIAL`)
//! and every socket the test itself opens is accounted for.

use rankweave::store::protocol::{self, Request, Response};
use rankweave::{Error, Store, TcpStore, TcpStoreServer};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Mutex;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(10);
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn count(dir: &str) -> usize {
    std::fs::read_dir(dir).map(|d| d.count()).unwrap_or(0)
}
fn threads() -> usize {
    count("/proc/self/task")
}
fn fds() -> usize {
    count("/proc/self/fd")
}

/// Raises the soft descriptor limit to at least `want` (up to the hard limit).
fn raise_nofile(want: u64) {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if soft < want {
        assert!(hard >= want, "this test needs {want} descriptors, the hard limit is {hard}");
        setrlimit(Resource::RLIMIT_NOFILE, want, hard).unwrap();
    }
}

/// Polls `cond` every 5 ms for at most `limit`; returns whether it held.
fn wait_until(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    cond()
}

/// Time for a fresh client to connect, set and get; the best of three
/// tries, so one unlucky scheduling slice on a loaded machine does not count.
fn legit_round_trip(srv: &TcpStoreServer, token: Option<&[u8]>, key: &str) -> Duration {
    (0..3)
        .map(|i| {
            let start = Instant::now();
            let c = TcpStore::builder("127.0.0.1", srv.port()).token(token).timeout(T).connect().unwrap();
            let v = format!("{key}-{i}");
            c.set(key, v.as_bytes()).unwrap();
            assert_eq!(c.get(key).unwrap(), v.as_bytes());
            start.elapsed()
        })
        .min()
        .unwrap()
}

#[test]
fn two_thousand_idle_connections_cost_no_threads() {
    const IDLE: usize = 2000;
    let _g = serial();
    raise_nofile(3 * IDLE as u64 + 512);
    let srv = TcpStoreServer::builder().token(None).bind("127.0.0.1:0").unwrap();
    let (threads0, fds0) = (threads(), fds());
    let idle: Vec<TcpStream> = (0..IDLE).map(|_| TcpStream::connect(srv.local_addr()).unwrap()).collect();
    assert!(wait_until(T, || srv.num_connections() == IDLE), "server saw {} of {IDLE}", srv.num_connections());
    // One descriptor per connection on each side, no thread per connection.
    let (threads1, fds1) = (threads(), fds());
    assert!(threads1 <= threads0 + 2, "threads grew from {threads0} to {threads1} for {IDLE} idle connections");
    assert!(fds1 <= fds0 + 2 * IDLE + 16, "descriptors grew from {fds0} to {fds1} for {IDLE} connections");
    let took = legit_round_trip(&srv, None, "legit");
    assert!(took < Duration::from_millis(10), "a legitimate client took {took:?} beside {IDLE} idle connections");
    // The legitimate clients have left; every idle one is kept (no token:
    // no handshake deadline).
    assert!(wait_until(T, || srv.num_connections() == IDLE), "{} connections", srv.num_connections());
    drop(idle);
    assert!(wait_until(T, || srv.num_connections() <= 1), "{} left", srv.num_connections());
}

#[test]
fn abandoned_waiters_are_freed() {
    const WAITERS: usize = 1000;
    let _g = serial();
    raise_nofile(3 * WAITERS as u64 + 512);
    let srv = TcpStoreServer::builder().token(None).bind("127.0.0.1:0").unwrap();
    let legit = TcpStore::builder("127.0.0.1", srv.port()).token(None).timeout(T).connect().unwrap();
    legit.set("warm", b"up").unwrap();
    let before = legit_round_trip(&srv, None, "before");
    let (threads0, fds0) = (threads(), fds());
    let mut conns = Vec::with_capacity(WAITERS);
    for i in 0..WAITERS {
        // Half on one shared key, half on keys of their own; all "forever".
        let key = if i % 2 == 0 { "never".to_string() } else { format!("never-{i}") };
        let frame = protocol::encode_request(&Request::Get { key, timeout_ms: u64::MAX }).unwrap();
        let mut s = TcpStream::connect(srv.local_addr()).unwrap();
        s.write_all(&frame).unwrap();
        conns.push(s);
    }
    assert!(wait_until(T, || srv.num_waiters() == WAITERS), "{} of {WAITERS} parked", srv.num_waiters());
    assert!(threads() <= threads0 + 2, "parked waiters cost threads: {} -> {}", threads0, threads());
    drop(conns);
    assert!(
        wait_until(T, || srv.num_waiters() == 0 && srv.num_connections() <= 2),
        "after the clients left: {} waiters, {} connections",
        srv.num_waiters(),
        srv.num_connections()
    );
    let (threads1, fds1) = (threads(), fds());
    assert!(threads1 <= threads0 + 1, "threads {threads0} -> {threads1}");
    assert!(fds1 <= fds0 + 8, "descriptors {fds0} -> {fds1}: abandoned waiters leaked");
    let after = legit_round_trip(&srv, None, "after");
    assert!(after < Duration::from_millis(10), "set+get took {after:?} after the waiters left (before: {before:?})");
    assert_eq!(legit.get("warm").unwrap(), b"up");
    // The shared key still works for a real waiter.
    std::thread::scope(|s| {
        let h = s.spawn(|| legit.get_timeout("never", T).unwrap());
        std::thread::sleep(Duration::from_millis(20));
        let c = TcpStore::builder("127.0.0.1", srv.port()).token(None).timeout(T).connect().unwrap();
        c.set("never", b"now").unwrap();
        assert_eq!(h.join().unwrap(), b"now");
    });
    assert_eq!(srv.num_waiters(), 0);
}

/// Reads until the server closes `s` or `limit` passes; returns when it closed.
fn closed_within(
    s: &mut TcpStream,
    start: Instant,
    limit: Duration,
    mut tick: impl FnMut(&mut TcpStream),
) -> Option<Duration> {
    s.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
    let mut buf = [0u8; 256];
    while start.elapsed() < limit {
        tick(s);
        match s.read(&mut buf) {
            Ok(0) => return Some(start.elapsed()),
            Ok(_) => {}
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return Some(start.elapsed()),
        }
    }
    None
}

#[test]
fn drip_fed_handshake_is_closed_at_its_deadline() {
    let _g = serial();
    let token = b"a-token-long-enough-to-take-many-drips";
    let deadline = Duration::from_secs(1);
    let srv = TcpStoreServer::builder()
        .token(Some(token))
        .handshake_timeout(deadline)
        .pending_idle_timeout(Duration::from_secs(10))
        .bind("127.0.0.1:0")
        .unwrap();
    let ok = TcpStore::builder("127.0.0.1", srv.port()).token(Some(token)).timeout(T).connect().unwrap();
    ok.set("k", b"v").unwrap();

    // A valid Auth frame, one byte every 100 ms: well under the idle limit,
    // but the whole frame would take over 4 s.
    let frame = protocol::encode_request(&Request::Auth { token: token.to_vec() }).unwrap();
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    let start = Instant::now();
    let mut sent = 0;
    let closed = closed_within(&mut s, start, Duration::from_secs(5), |s| {
        if sent < frame.len() && s.write_all(&frame[sent..sent + 1]).is_ok() {
            sent += 1;
        }
    });
    let closed = closed.expect("the drip-fed connection was never closed");
    assert!(sent < frame.len(), "the frame completed ({sent} bytes) before the deadline closed it");
    assert!(closed >= deadline - Duration::from_millis(50), "closed too early: {closed:?}");
    assert!(closed < deadline + Duration::from_millis(700), "closed at {closed:?}, deadline {deadline:?}");

    // The authenticated client, idle meanwhile, is unaffected.
    assert_eq!(ok.get("k").unwrap(), b"v");
    assert!(wait_until(T, || srv.num_connections() == 1), "{} connections", srv.num_connections());
}

#[test]
fn silent_unauthenticated_connections_are_closed() {
    let _g = serial();
    let srv = TcpStoreServer::builder()
        .token(Some(b"tok"))
        .pending_idle_timeout(Duration::from_millis(300))
        .bind("127.0.0.1:0")
        .unwrap();
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    let start = Instant::now();
    let closed = closed_within(&mut s, start, Duration::from_secs(5), |_| {}).expect("never closed");
    assert!(closed >= Duration::from_millis(250) && closed < Duration::from_millis(1500), "{closed:?}");
    // Without a token nothing is closed for silence.
    let open =
        TcpStoreServer::builder().token(None).pending_idle_timeout(Duration::from_millis(100)).bind("127.0.0.1:0");
    let open = open.unwrap();
    let mut s = TcpStream::connect(open.local_addr()).unwrap();
    assert_eq!(closed_within(&mut s, Instant::now(), Duration::from_millis(500), |_| {}), None);
}

#[test]
fn unauthenticated_connections_are_shed_before_ranks() {
    const CAP: usize = 64;
    let _g = serial();
    let token = b"tok";
    let srv =
        TcpStoreServer::builder().token(Some(token)).max_connections(CAP).max_pending(8).bind("127.0.0.1:0").unwrap();
    assert_eq!(srv.max_connections(), CAP);
    let ranks: Vec<TcpStore> = (0..8)
        .map(|_| TcpStore::builder("127.0.0.1", srv.port()).token(Some(token)).timeout(T).connect().unwrap())
        .collect();
    for (i, r) in ranks.iter().enumerate() {
        r.set(&format!("rank{i}"), b"up").unwrap();
    }
    // Twice the cap in idle, unauthenticated sockets.
    let hostile: Vec<TcpStream> = (0..2 * CAP).map(|_| TcpStream::connect(srv.local_addr()).unwrap()).collect();
    assert!(wait_until(T, || srv.num_connections() == ranks.len() + 8), "{} connections", srv.num_connections());
    // Ranks already served keep being served, and new ranks get in.
    for (i, r) in ranks.iter().enumerate() {
        assert_eq!(r.get(&format!("rank{i}")).unwrap(), b"up");
    }
    let took = legit_round_trip(&srv, Some(token), "late-rank");
    assert!(took < Duration::from_millis(50), "a new rank took {took:?}");
    assert!(srv.num_connections() <= CAP);
    drop(hostile);
}

#[test]
fn client_timeouts_are_capped_by_the_server() {
    let _g = serial();
    let cap = Duration::from_millis(300);
    let srv = TcpStoreServer::builder().token(None).max_wait(cap).bind("127.0.0.1:0").unwrap();
    let c = TcpStore::builder("127.0.0.1", srv.port()).token(None).timeout(T).connect().unwrap();
    let start = Instant::now();
    let err = c.get_timeout("missing", Duration::from_secs(3600)).unwrap_err();
    let took = start.elapsed();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert!(took >= cap - Duration::from_millis(20) && took < Duration::from_secs(2), "{took:?}");
    // A raw u64::MAX timeout is answered at the cap too.
    let frame = protocol::encode_request(&Request::Wait { keys: vec!["a".into()], timeout_ms: u64::MAX }).unwrap();
    let mut s = TcpStream::connect(srv.local_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(&frame).unwrap();
    let mut reply = [0u8; protocol::HEADER_LEN];
    s.read_exact(&mut reply).unwrap();
    assert_eq!(protocol::decode_response(&reply).unwrap(), Response::Timeout);
    assert_eq!(srv.num_waiters(), 0);
}
