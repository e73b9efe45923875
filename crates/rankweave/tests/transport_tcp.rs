//! The TCP transport between ranks running as threads over an in-process store:
//! mesh creation, framing, deadlines, lost peers, abort propagation, mismatches.

use rankweave::transport::tcp::{group_id_of, TcpOptions, TcpTransport};
use rankweave::transport::{OpCode, Tag, Transport};
use rankweave::{Error, GroupOptions, HashStore, ProcessGroup, SharedStore, TransportKind};
use std::io::Write;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

/// Counts allocations per thread, to check the hot path allocates nothing.
struct CountingAlloc;

thread_local! {
    static ALLOCS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

// SAFETY: forwards every call unchanged to the system allocator; the counter
// is a const-initialized thread-local without a destructor.
unsafe impl std::alloc::GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn allocations() -> u64 {
    ALLOCS.with(|c| c.get())
}

fn opts(timeout: Duration) -> GroupOptions {
    GroupOptions {
        timeout,
        transport: TransportKind::Tcp,
        listen_host: Some("127.0.0.1".into()),
        ..GroupOptions::builtin()
    }
}

/// Runs `f(world)` on `n` thread-ranks of a fresh world; returns results in rank order.
fn spawn<R, F>(n: usize, timeout: Duration, f: F) -> Vec<R>
where
    R: Send + 'static,
    F: Fn(ProcessGroup) -> R + Send + Sync + 'static,
{
    let store: SharedStore = Arc::new(HashStore::new());
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let (store, f) = (store.clone(), f.clone());
            std::thread::spawn(move || {
                let g = ProcessGroup::new_world(store, r, n, opts(timeout)).expect("new_world");
                f(g)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank thread panicked")).collect()
}

fn soon(secs: u64) -> Instant {
    Instant::now() + Duration::from_secs(secs)
}

const T: Duration = Duration::from_secs(20);

#[test]
fn mesh_all_pairs_exchange_for_world_sizes_1_to_8() {
    for n in 1..=8usize {
        let out = spawn(n, T, move |g| {
            let t = g.transport().unwrap();
            assert_eq!((t.rank(), t.size(), t.group_name()), (g.rank(), n, "world:0"));
            let me = g.rank();
            let mut got = vec![usize::MAX; n];
            got[me] = me;
            for d in 1..n {
                let to = (me + d) % n;
                let from = (me + n - d) % n;
                let msg = [me as u8, to as u8, d as u8];
                let mut buf = [0u8; 3];
                let tag = Tag::new(OpCode::AllToAll, d as u64);
                t.send_recv(to, tag, &msg, from, tag, &mut buf, soon(20)).unwrap();
                assert_eq!(buf, [from as u8, me as u8, d as u8]);
                got[from] = buf[0] as usize;
            }
            got
        });
        for got in out {
            assert_eq!(got, (0..n).collect::<Vec<_>>(), "world size {n}");
        }
    }
}

fn pattern(rank: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + rank * 7 + (i >> 12)) % 251) as u8).collect()
}

#[test]
fn ring_of_16_mib_per_rank_does_not_deadlock() {
    for n in [2usize, 4] {
        let len = 16 << 20;
        spawn(n, T, move |g| {
            let t = g.transport().unwrap();
            let me = g.rank();
            let data = pattern(me, len);
            let mut buf = vec![0u8; len];
            let (to, from) = ((me + 1) % n, (me + n - 1) % n);
            for step in 0..2u64 {
                let tag = Tag::new(OpCode::AllReduce, step);
                t.send_recv(to, tag, &data, from, tag, &mut buf, soon(30)).unwrap();
                assert!(buf == pattern(from, len), "rank {me} step {step} got corrupted data");
            }
        });
    }
}

#[test]
fn plain_send_and_recv_in_order_including_empty_messages() {
    spawn(2, T, |g| {
        let t = g.transport().unwrap();
        for (i, len) in [0usize, 1, 7, 100_000].into_iter().enumerate() {
            let tag = Tag::new(OpCode::SendRecv, i as u64);
            if g.rank() == 0 {
                t.send(1, tag, &pattern(i, len), soon(20)).unwrap();
            } else {
                let mut buf = vec![0u8; len];
                t.recv(0, tag, &mut buf, soon(20)).unwrap();
                assert_eq!(buf, pattern(i, len));
            }
        }
    });
}

#[test]
fn recv_times_out_naming_the_silent_peer() {
    let done = Arc::new(Barrier::new(2));
    spawn(2, T, move |g| {
        if g.rank() == 0 {
            let start = Instant::now();
            let mut buf = [0u8; 8];
            let err = g
                .transport()
                .unwrap()
                .recv(1, Tag::new(OpCode::Broadcast, 3), &mut buf, Instant::now() + Duration::from_millis(300))
                .unwrap_err();
            let waited = start.elapsed();
            assert!(matches!(err, Error::Timeout { .. }), "{err}");
            assert_eq!(err.peer(), Some(1));
            let msg = err.to_string();
            assert!(msg.contains("broadcast") && msg.contains("world:0") && msg.contains("rank 1"), "{msg}");
            assert!(waited >= Duration::from_millis(300) && waited < Duration::from_secs(3), "{waited:?}");
            let again = g.transport().unwrap().recv(1, Tag::new(OpCode::Broadcast, 4), &mut buf, soon(1)).unwrap_err();
            assert!(matches!(again, Error::Poisoned { .. }), "{again}");
        }
        done.wait();
    });
}

#[test]
fn a_closed_peer_is_reported_lost_by_name() {
    let ready = Arc::new(Barrier::new(2));
    spawn(2, T, move |g| {
        if g.rank() == 1 {
            ready.wait();
            g.destroy();
            drop(g);
            return;
        }
        ready.wait();
        let mut buf = vec![0u8; 1 << 20];
        let start = Instant::now();
        let err = g.transport().unwrap().recv(1, Tag::new(OpCode::Gather, 1), &mut buf, soon(20)).unwrap_err();
        assert!(matches!(err, Error::PeerLost { .. }), "{err}");
        assert_eq!(err.peer(), Some(1));
        assert!(err.to_string().contains("rank 1 lost"), "{err}");
        assert!(start.elapsed() < Duration::from_secs(3));
        assert!(matches!(g.barrier(), Err(Error::Poisoned { .. })));
    });
}

#[test]
fn sending_to_a_closed_peer_is_reported_lost() {
    let ready = Arc::new(Barrier::new(2));
    spawn(2, T, move |g| {
        if g.rank() == 1 {
            ready.wait();
            drop(g);
            return;
        }
        ready.wait();
        let data = vec![1u8; 32 << 20];
        let err = g.transport().unwrap().send(1, Tag::new(OpCode::Scatter, 1), &data, soon(20)).unwrap_err();
        assert!(matches!(err, Error::PeerLost { .. }), "{err}");
        assert_eq!(err.peer(), Some(1));
    });
}

#[test]
fn abort_propagates_around_a_ring_naming_the_dropped_rank() {
    let n = 4;
    let victim = 2;
    let out = spawn(n, T, move |g| {
        let t = g.transport().unwrap();
        let me = g.rank();
        let len = 1 << 20;
        let data = pattern(me, len);
        let mut buf = vec![0u8; len];
        let (to, from) = ((me + 1) % n, (me + n - 1) % n);
        for step in 0..1000u64 {
            if me == victim && step == 3 {
                drop(g);
                return Err(Instant::now());
            }
            let tag = Tag::new(OpCode::AllReduce, step);
            if let Err(e) = t.send_recv(to, tag, &data, from, tag, &mut buf, soon(20)) {
                return Ok((step, Instant::now(), e));
            }
        }
        panic!("rank {me} never noticed rank {victim} leaving");
    });
    let dropped_at = *out[victim].as_ref().unwrap_err();
    for (rank, res) in out.into_iter().enumerate() {
        if rank == victim {
            continue;
        }
        let (step, at, err) = res.expect("survivor result");
        eprintln!("rank {rank} at step {step}: {err}");
        // Sends of earlier steps may still fit in socket buffers; what counts is time.
        assert!(step <= 10, "rank {rank} failed late, at step {step}");
        let after = at.saturating_duration_since(dropped_at);
        assert!(after < Duration::from_secs(3), "rank {rank} noticed {after:?} after the drop");
        assert!(matches!(err, Error::PeerLost { .. }), "rank {rank}: {err}");
        assert_eq!(err.peer(), Some(victim), "rank {rank}: {err}");
        assert!(err.to_string().contains("rank 2"), "rank {rank}: {err}");
    }
}

#[test]
fn length_mismatch_errors_on_both_ranks_naming_each_other() {
    let out = spawn(2, T, |g| {
        let me = g.rank();
        let len = if me == 0 { 40 } else { 48 };
        let data = vec![me as u8; len];
        let mut buf = vec![0u8; len];
        let tag = Tag::new(OpCode::AllReduce, 5);
        let peer = 1 - me;
        g.transport().unwrap().send_recv(peer, tag, &data, peer, tag, &mut buf, soon(20)).unwrap_err()
    });
    for (me, err) in out.iter().enumerate() {
        assert!(matches!(err, Error::Mismatch { .. }), "rank {me}: {err}");
        assert_eq!(err.peer(), Some(1 - me));
    }
    let msg = out[0].to_string();
    assert!(
        msg.contains("rank 0 expected all_reduce seq 5 of 40 bytes from rank 1, got all_reduce seq 5 of 48 bytes"),
        "{msg}"
    );
    let msg = out[1].to_string();
    assert!(
        msg.contains("rank 1 expected all_reduce seq 5 of 48 bytes from rank 0, got all_reduce seq 5 of 40 bytes"),
        "{msg}"
    );
}

#[test]
fn op_and_sequence_mismatches_are_reported() {
    let out = spawn(2, T, |g| {
        let me = g.rank();
        let (op, seq) = if me == 0 { (OpCode::AllReduce, 1) } else { (OpCode::Broadcast, 2) };
        let tag = Tag::new(op, seq);
        let mut buf = [0u8; 4];
        g.transport().unwrap().send_recv(1 - me, tag, &[1, 2, 3, 4], 1 - me, tag, &mut buf, soon(20)).unwrap_err()
    });
    assert!(out[0].to_string().contains("expected all_reduce seq 1 of 4 bytes from rank 1, got broadcast seq 2"));
    assert!(out[1].to_string().contains("expected broadcast seq 2 of 4 bytes from rank 0, got all_reduce seq 1"));
}

#[test]
fn invalid_peers_are_rejected_without_poisoning() {
    spawn(2, T, |g| {
        let t = g.transport().unwrap();
        let tag = Tag::new(OpCode::SendRecv, 0);
        let me = g.rank();
        assert!(matches!(t.send(me, tag, &[1], soon(1)), Err(Error::InvalidArgument(_))));
        assert!(matches!(t.recv(5, tag, &mut [0], soon(1)), Err(Error::InvalidArgument(_))));
        assert!(g.poisoned().is_none());
        // Still usable afterwards.
        let mut buf = [0u8];
        t.send_recv(1 - me, tag, &[me as u8], 1 - me, tag, &mut buf, soon(20)).unwrap();
        assert_eq!(buf[0] as usize, 1 - me);
    });
}

#[test]
fn mesh_creation_times_out_naming_the_absent_rank() {
    let store: SharedStore = Arc::new(HashStore::new());
    let start = Instant::now();
    let err = ProcessGroup::new_world(store, 0, 3, opts(Duration::from_millis(300))).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(err.peer(), Some(1));
    assert!(start.elapsed() < Duration::from_secs(3));
    // A rank that dials a peer which never publishes its address.
    let store: SharedStore = Arc::new(HashStore::new());
    let err = ProcessGroup::new_world(store, 2, 3, opts(Duration::from_millis(300))).unwrap_err();
    assert!(matches!(err, Error::Timeout { .. }), "{err}");
    assert_eq!(err.peer(), Some(0));
}

#[test]
fn stray_connections_are_rejected_and_the_mesh_still_forms() {
    let store: SharedStore = Arc::new(HashStore::new());
    let gid = group_id_of("test/stray");
    let s0 = store.clone();
    let rank0 =
        std::thread::spawn(move || TcpTransport::connect(s0, 0, 2, "stray:0", gid, &TcpOptions::default(), soon(20)));
    let addr = String::from_utf8(store.get_timeout("tcp/addr/0", Duration::from_secs(10)).unwrap()).unwrap();
    // Garbage bytes, then a well-formed hello of another group.
    let mut junk = std::net::TcpStream::connect(&addr).unwrap();
    junk.write_all(b"GET / HTTP/1.1\r\n\r\n plus some more bytes to fill a header").unwrap();
    let other = std::thread::spawn({
        let store: SharedStore = Arc::new(HashStore::new());
        store.set("tcp/addr/0", addr.as_bytes()).unwrap();
        move || {
            TcpTransport::connect(
                store,
                1,
                2,
                "other:0",
                gid ^ 1,
                &TcpOptions::default(),
                Instant::now() + Duration::from_secs(2),
            )
        }
    });
    let other_err = other.join().unwrap().unwrap_err();
    assert!(matches!(other_err, Error::Protocol { .. }), "{other_err}");
    assert!(other_err.to_string().contains("rank 0 of group stray:0 rejected the handshake"), "{other_err}");
    let s1 = store.clone();
    let rank1 =
        std::thread::spawn(move || TcpTransport::connect(s1, 1, 2, "stray:0", gid, &TcpOptions::default(), soon(20)));
    let (t0, t1) = (rank0.join().unwrap().unwrap(), rank1.join().unwrap().unwrap());
    let tag = Tag::new(OpCode::Object, 9);
    t0.send(1, tag, b"hello", soon(5)).unwrap();
    let mut buf = [0u8; 5];
    t1.recv(0, tag, &mut buf, soon(5)).unwrap();
    assert_eq!(&buf, b"hello");
}

#[test]
fn world_of_one_opens_no_socket_and_rejects_peers() {
    let store: SharedStore = Arc::new(HashStore::new());
    let g = ProcessGroup::new_world(store.clone(), 0, 1, opts(T)).unwrap();
    assert_eq!((g.rank(), g.size(), g.name()), (0, 1, "world:0"));
    assert!(!store.check(&["rankweave/world:0/tcp/addr/0"]).unwrap());
    assert!(matches!(
        g.transport().unwrap().send(0, Tag::new(OpCode::SendRecv, 1), &[1], soon(1)),
        Err(Error::InvalidArgument(_))
    ));
}

fn exchange_over(listen_host: &'static str) {
    let store: SharedStore = Arc::new(HashStore::new());
    let hs: Vec<_> = (0..2)
        .map(|r| {
            let store = store.clone();
            std::thread::spawn(move || {
                let o = GroupOptions { listen_host: Some(listen_host.into()), ..opts(T) };
                let g = ProcessGroup::new_world(store, r, 2, o).unwrap();
                let mut buf = [0u8; 2];
                let tag = Tag::new(OpCode::SendRecv, 1);
                g.transport().unwrap().send_recv(1 - r, tag, &[r as u8, 9], 1 - r, tag, &mut buf, soon(20)).unwrap();
                assert_eq!(buf, [1 - r as u8, 9]);
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let published = String::from_utf8(store.get("rankweave/world:0/tcp/addr/0").unwrap()).unwrap();
    let addr: std::net::SocketAddr = published.parse().unwrap();
    assert!(!addr.ip().is_unspecified(), "a wildcard address was published: {published}");
}

#[test]
fn wildcard_listen_host_publishes_a_reachable_address() {
    exchange_over("0.0.0.0");
}

#[test]
fn ipv6_loopback_works_where_available() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    exchange_over("::1");
}

#[test]
fn steady_state_exchanges_allocate_nothing() {
    spawn(3, T, |g| {
        let t = g.transport().unwrap();
        let me = g.rank();
        let (to, from) = ((me + 1) % 3, (me + 2) % 3);
        let data = pattern(me, 1 << 20);
        let mut buf = vec![0u8; 1 << 20];
        let deadline = soon(20);
        let before = allocations();
        for step in 0..50u64 {
            let tag = Tag::new(OpCode::ReduceScatter, step);
            let len = if step % 2 == 0 { 1 << 20 } else { 8 };
            t.send_recv(to, tag, &data[..len], from, tag, &mut buf[..len], deadline).unwrap();
        }
        assert_eq!(allocations() - before, 0, "rank {me} allocated on the hot path");
    });
}

#[test]
fn a_relay_waiting_on_a_silent_rank_blames_that_rank_not_the_relay() {
    // Rank 1 never sends; rank 2 relays from 1 to 0. Both 2 and 0 time out
    // at about the same moment; rank 0 must learn from rank 2 that rank 1 is
    // the one to look at.
    let sync = Arc::new(Barrier::new(3));
    let out = spawn(3, T, move |g| {
        sync.wait();
        let deadline = Instant::now() + Duration::from_millis(400);
        let t = g.transport().unwrap();
        let tag = Tag::new(OpCode::Broadcast, 1);
        let mut buf = [0u8; 16];
        let res = match g.rank() {
            0 => t.recv(2, tag, &mut buf, deadline),
            2 => t.recv(1, tag, &mut buf, deadline).and_then(|_| t.send(0, tag, &buf, deadline)),
            _ => Ok(()),
        };
        sync.wait();
        res
    });
    for r in [0, 2] {
        let e = out[r].as_ref().unwrap_err();
        assert_eq!(e.peer(), Some(1), "rank {r}: {e}");
        assert!(e.to_string().contains("rank 1"), "rank {r}: {e}");
    }
}
