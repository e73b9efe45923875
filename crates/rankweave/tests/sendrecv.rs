//! Point-to-point: the transport contract the algorithms rely on, over the
//! in-process transport (and, once it lands, process groups): FIFO per
//! peer, exact lengths, tags checked, send_recv in a ring of large buffers
//! never deadlocks, deadlines.

mod common;

use common::*;
use rankweave::transport::mem::MemTransport;
use rankweave::transport::{OpCode, Tag, Transport};
use rankweave::Error;
use std::time::{Duration, Instant};

fn deadline() -> Instant {
    Instant::now() + Duration::from_secs(20)
}

#[test]
fn ring_send_recv_large_buffers() {
    for n in WORLD_SIZES {
        run_mem(n, |rk| {
            let (r, n) = (rk.rank(), rk.size());
            if n == 1 {
                return;
            }
            let tag = Tag::new(OpCode::SendRecv, 1);
            for len in [0usize, 1, 7, 1000, 4 << 20] {
                let data = pattern(r, len, 1);
                let mut got = vec![0u8; len];
                rk.t.send_recv((r + 1) % n, tag, &data, (r + n - 1) % n, tag, &mut got, deadline()).unwrap();
                assert!(got == pattern((r + n - 1) % n, len, 1), "n={n} len={len}");
            }
        });
    }
}

#[test]
fn messages_arrive_in_order_with_their_lengths() {
    run_mem(3, |rk| {
        let r = rk.rank();
        let tag = Tag::new(OpCode::SendRecv, 9);
        if r == 0 {
            for len in 0..50 {
                rk.t.send(2, tag, &pattern(0, len, len), deadline()).unwrap();
            }
        } else if r == 2 {
            for len in 0..50 {
                let mut b = vec![0u8; len];
                rk.t.recv(0, tag, &mut b, deadline()).unwrap();
                assert_eq!(b, pattern(0, len, len));
            }
        }
    });
}

#[test]
fn wrong_tag_or_length_is_a_mismatch_naming_both_ranks() {
    let t = MemTransport::mesh(2, "p2p:0");
    t[0].send(1, Tag::new(OpCode::SendRecv, 1), &[1, 2, 3], deadline()).unwrap();
    let mut b = [0u8; 3];
    let e = t[1].recv(0, Tag::new(OpCode::SendRecv, 2), &mut b, deadline()).unwrap_err();
    assert!(matches!(e, Error::Mismatch { .. }), "{e}");
    let msg = e.to_string();
    assert!(msg.contains("rank 1 expected") && msg.contains("rank 0 sent") && msg.contains("seq 1"), "{msg}");
    t[0].send(1, Tag::new(OpCode::SendRecv, 3), &[1, 2, 3], deadline()).unwrap();
    let mut b = [0u8; 4];
    let e = t[1].recv(0, Tag::new(OpCode::SendRecv, 3), &mut b, deadline()).unwrap_err();
    assert!(e.to_string().contains("4 bytes") && e.to_string().contains("3 bytes"), "{e}");
}

#[test]
fn recv_deadline() {
    let t = MemTransport::mesh(2, "p2p:1");
    let start = Instant::now();
    let mut b = [0u8; 1];
    let e =
        t[0].recv(1, Tag::new(OpCode::SendRecv, 1), &mut b, Instant::now() + Duration::from_millis(100)).unwrap_err();
    assert!(start.elapsed() >= Duration::from_millis(100) && start.elapsed() < Duration::from_secs(5));
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert_eq!(e.peer(), Some(1));
    assert!(e.to_string().contains("send/recv") && e.to_string().contains("p2p:1"), "{e}");
}

#[test]
fn group_send_recv() {
    for n in [2, 3, 4, 7] {
        run_group(n, |pg| {
            let (r, n) = (pg.rank(), pg.size());
            for len in [0usize, 1, 7, 1000, 1 << 20] {
                if r == 0 {
                    for peer in 1..n {
                        pg.send_bytes(&pattern(peer, len, len), peer).unwrap();
                    }
                } else {
                    let mut b = vec![0u8; len];
                    pg.recv_bytes(&mut b, 0).unwrap();
                    assert_eq!(b, pattern(r, len, len));
                }
            }
        });
    }
}
