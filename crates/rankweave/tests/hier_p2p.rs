//! Point-to-point in a group spanning (simulated) nodes: pairs on one node
//! go through that node's shared-memory channels, pairs across nodes over
//! TCP; values, order (also interleaved across both paths), ranks that send
//! to each other before receiving, and errors that name group ranks.
//!
//! `Under::Hier(2)` with 4 ranks puts ranks 0 and 2 on node 0, 1 and 3 on
//! node 1.

mod common;

use common::{pattern, run_world, Under};
use rankweave::Error;
use std::time::{Duration, Instant};

const T: Duration = Duration::from_secs(30);
const SIZES: [usize; 9] = [0, 8, 64, 65, 5000, 32 << 10, 40_000, 1 << 20, (3 << 20) + 7];

fn node_of(r: usize) -> usize {
    r % 2
}

#[test]
fn node_local_pairs_use_shared_memory_and_pairs_across_nodes_use_tcp() {
    run_world(Under::Hier(2), 4, T, |r, pg| {
        let n = pg.size();
        let pairs: Vec<(usize, usize)> = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).collect();
        let mut sent = [0u64; 4];
        for (round, &len) in SIZES.iter().enumerate() {
            // Every pair in one global order: deadlock free whatever blocks.
            for &(a, b) in &pairs {
                let (me_first, peer) = match r {
                    _ if r == a => (true, b),
                    _ if r == b => (false, a),
                    _ => continue,
                };
                // Two messages per direction: the second checks the order.
                let out = [pattern(r * 10 + peer, len, round), pattern(r * 10 + peer, len / 3 + 1, round + 50)];
                let mut got = [vec![0u8; len], vec![0u8; len / 3 + 1]];
                let send = |pg: &rankweave::ProcessGroup| {
                    for m in &out {
                        pg.send_bytes(m, peer).unwrap();
                    }
                };
                if me_first {
                    send(&pg);
                }
                for g in got.iter_mut() {
                    pg.recv_bytes(g, peer).unwrap();
                }
                if !me_first {
                    send(&pg);
                }
                sent[peer] += 2;
                assert!(got[0] == pattern(peer * 10 + r, len, round), "rank {r} from {peer}, {len} bytes");
                assert!(got[1] == pattern(peer * 10 + r, len / 3 + 1, round + 50), "rank {r} from {peer}, second");
            }
        }
        for peer in (0..n).filter(|&p| p != r) {
            let via_shm = pg.shm_messages_sent(peer);
            if node_of(peer) == node_of(r) {
                assert_eq!(via_shm, sent[peer], "rank {r} to its node-local peer {peer}");
            } else {
                assert_eq!(via_shm, 0, "rank {r} to {peer} on the other node");
            }
        }
    });
}

#[test]
fn messages_interleaved_across_both_paths_keep_their_order() {
    run_world(Under::Hier(2), 4, T, |r, pg| {
        // Rank 0 alternates between its node-local peer (2) and a remote
        // one (1) without waiting; each receiver reads its messages in order.
        let lens = [3usize, 64, 100, 20_000, 7, 32 << 10, 1, 9_000];
        match r {
            0 => {
                for round in 0..10 {
                    for (i, &len) in lens.iter().enumerate() {
                        let dst = if i % 2 == 0 { 2 } else { 1 };
                        pg.send_bytes(&pattern(dst, len, round * 100 + i), dst).unwrap();
                    }
                }
                assert_eq!(pg.shm_messages_sent(2), 40);
                assert_eq!(pg.shm_messages_sent(1), 0);
            }
            1 | 2 => {
                let first = if r == 2 { 0 } else { 1 };
                for round in 0..10 {
                    for (i, &len) in lens.iter().enumerate().skip(first).step_by(2) {
                        let mut got = vec![0u8; len];
                        pg.recv_bytes(&mut got, 0).unwrap();
                        assert!(got == pattern(r, len, round * 100 + i), "rank {r} round {round} message {i}");
                    }
                }
            }
            _ => {}
        }
        pg.barrier().unwrap();
    });
}

#[test]
fn node_local_ranks_that_send_large_messages_to_each_other_first_do_not_deadlock() {
    run_world(Under::Hier(2), 4, T, |r, pg| {
        let peer = (r + 2) % 4;
        for &len in &[100_000usize, 4 << 20] {
            pg.send_bytes(&pattern(r, len, 1), peer).unwrap();
            pg.send_bytes(&pattern(r, len, 2), peer).unwrap();
            for salt in [1, 2] {
                let mut got = vec![0u8; len];
                pg.recv_bytes(&mut got, peer).unwrap();
                assert!(got == pattern(peer, len, salt), "rank {r} from {peer}, {len} bytes");
            }
        }
        assert_eq!(pg.shm_messages_sent(peer), 4);
    });
}

#[test]
fn node_local_errors_name_group_ranks() {
    // A length mismatch between ranks 0 and 2 (members 0 and 1 of node 0's
    // segment) names group rank 2 and both lengths.
    let errs = run_world(Under::Hier(2), 4, Duration::from_secs(5), |r, pg| match r {
        2 => {
            pg.send_bytes(&[9u8; 100], 0).unwrap();
            None
        }
        0 => {
            let mut buf = [0u8; 99];
            Some(pg.recv_bytes(&mut buf, 2).unwrap_err())
        }
        _ => None,
    });
    let e = errs[0].as_ref().unwrap();
    assert!(matches!(e, Error::Mismatch { .. }), "{e}");
    assert_eq!(e.peer(), Some(2), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("100 bytes") && msg.contains("99 bytes") && msg.contains("rank 2 sent"), "{msg}");

    // A node-local peer that never sends: the deadline names it.
    let errs = run_world(Under::Hier(2), 4, Duration::from_secs(2), |r, pg| {
        if r == 1 {
            // Alive, silent, past rank 3's deadline.
            std::thread::sleep(Duration::from_secs(3));
        }
        if r != 3 {
            return None;
        }
        let start = Instant::now();
        let mut buf = [0u8; 16];
        let e = pg.recv_bytes(&mut buf, 1).unwrap_err();
        Some((e, start.elapsed()))
    });
    let (e, waited) = errs[3].as_ref().unwrap();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert_eq!(e.peer(), Some(1), "{e}");
    assert!(*waited >= Duration::from_secs(2) && *waited < Duration::from_secs(10), "{waited:?}");
    assert!(e.to_string().contains("send/recv"), "{e}");

    // A node-local peer that closes the group: found at once, by group rank.
    let errs = run_world(Under::Hier(2), 4, T, |r, pg| {
        if r != 3 {
            return None;
        }
        let start = Instant::now();
        let mut buf = vec![0u8; 1 << 20];
        let e = pg.recv_bytes(&mut buf, 1).unwrap_err();
        Some((e, start.elapsed()))
    });
    let (e, waited) = errs[3].as_ref().unwrap();
    assert!(matches!(e, Error::PeerLost { .. }) && e.peer() == Some(1), "{e}");
    assert!(*waited < Duration::from_secs(10), "{waited:?}");
}
