//! Zero-copy buffers (`shm_buffer` / `send_shm` / `recv_shm`): the same bytes
//! change hands (a ping-pong and a pipeline chain), blocks return to their
//! owner's pool when dropped on any rank, mapping is cached, kinds that do
//! not match are errors, groups that are not on one node are refused, and
//! across processes a buffer outlives its owner's death.

mod common;

use common::{pattern, run_world, Under};
use rankweave::collectives::shm::{ShmComm, ShmOptions};
use rankweave::Error;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

fn opts() -> ShmOptions {
    ShmOptions { timeout: T, ..ShmOptions::default() }
}

#[test]
fn a_ping_pong_passes_the_same_bytes_back_and_forth() {
    common::run_shm(2, opts(), |c| {
        let len = (1 << 20) + 5;
        let mut addrs = Vec::new();
        for round in 0..20usize {
            if c.rank() == 0 {
                let mut buf = c.shm_buffer(len).unwrap();
                assert_eq!(buf.len(), len);
                assert_eq!(buf.capacity(), 2 << 20);
                let want = pattern(0, len, round);
                buf.copy_from_slice(&want);
                let sent_at = buf.as_ptr();
                c.send_shm(buf, 1, T).unwrap();
                let back = c.recv_shm(1, T).unwrap();
                // The owner gets its own block back: same address, no copy.
                assert_eq!(back.as_ptr(), sent_at);
                assert_eq!(back.owner(), 0);
                let got: Vec<u8> = back.iter().map(|b| b ^ 0x5a).collect();
                assert!(got == want, "round {round}");
                // Dropped here: the next round reuses the block.
            } else {
                let mut buf = c.recv_shm(0, T).unwrap();
                assert!(buf[..] == pattern(0, len, round)[..], "round {round}");
                addrs.push(buf.as_ptr() as usize);
                for b in buf.iter_mut() {
                    *b ^= 0x5a;
                }
                c.send_shm(buf, 0, T).unwrap();
            }
        }
        if c.rank() == 0 {
            // One block served every round.
            assert_eq!(c.shm_pool_bytes(), 2 << 20);
        } else {
            // Mapped once, then the cached mapping.
            assert!(addrs.windows(2).all(|w| w[0] == w[1]), "{addrs:x?}");
        }
    });
}

#[test]
fn a_chain_forwards_one_buffer_and_the_last_rank_drops_it_back_to_the_owner() {
    common::run_shm(4, opts(), |c| {
        let (r, n) = (c.rank(), c.size());
        for round in 0..10usize {
            let len = [100usize, 70_000, 3 << 20][round % 3];
            if r == 0 {
                let before = c.shm_pool_bytes();
                let mut buf = c.shm_buffer(len).unwrap();
                buf.copy_from_slice(&pattern(round, len, 9));
                c.send_shm(buf, 1, T).unwrap();
                // Rank n-1 drops it; once the barrier passed it is free again.
                c.barrier().unwrap();
                let again = c.shm_buffer(len).unwrap();
                if round >= 3 {
                    assert_eq!(c.shm_pool_bytes(), before, "round {round}: a free block was not reused");
                }
                drop(again);
            } else {
                let mut buf = c.recv_shm(r - 1, T).unwrap();
                assert_eq!(buf.owner(), 0);
                let want: Vec<u8> = pattern(round, len, 9).iter().map(|b| b.wrapping_add(r as u8 - 1)).collect();
                assert!(buf[..] == want[..], "rank {r} round {round}");
                for b in buf.iter_mut() {
                    *b = b.wrapping_add(1);
                }
                if r + 1 < n {
                    c.send_shm(buf, r + 1, T).unwrap();
                } else {
                    drop(buf);
                }
                c.barrier().unwrap();
            }
        }
    });
}

#[test]
fn buffers_and_plain_messages_keep_their_order_and_kinds_are_checked() {
    let errs = common::run_shm(2, opts(), |c| {
        if c.rank() == 0 {
            let mut buf = c.shm_buffer(10).unwrap();
            buf.copy_from_slice(b"0123456789");
            c.send(b"before", 1, T).unwrap();
            c.send_shm(buf, 1, T).unwrap();
            c.send(b"after", 1, T).unwrap();
            // Now a buffer where rank 1 expects bytes.
            let b8 = c.shm_buffer(8).unwrap();
            c.send_shm(b8, 1, T).unwrap();
            None
        } else {
            let mut b = [0u8; 6];
            c.recv(&mut b, 0, T).unwrap();
            assert_eq!(&b, b"before");
            let buf = c.recv_shm(0, T).unwrap();
            assert_eq!(&buf[..], b"0123456789");
            let mut a = [0u8; 5];
            c.recv(&mut a, 0, T).unwrap();
            assert_eq!(&a, b"after");
            let mut x = [0u8; 8];
            Some(c.recv(&mut x, 0, T).unwrap_err())
        }
    });
    let e = errs[1].as_ref().unwrap();
    assert!(matches!(e, Error::Mismatch { .. }) && e.peer() == Some(0), "{e}");
    assert!(e.to_string().contains("zero-copy"), "{e}");

    let errs = common::run_shm(2, opts(), |c| {
        if c.rank() == 0 {
            c.send(&[1u8; 32], 1, T).unwrap();
            None
        } else {
            Some(c.recv_shm(0, T).unwrap_err())
        }
    });
    let e = errs[1].as_ref().unwrap();
    assert!(matches!(e, Error::Mismatch { .. }) && e.peer() == Some(0), "{e}");
    assert!(e.to_string().contains("expected a zero-copy"), "{e}");
}

#[test]
fn a_recv_shm_that_nobody_serves_times_out_naming_the_peer() {
    common::run_shm(2, opts(), |c| {
        if c.rank() == 0 {
            let e = c.recv_shm(1, Duration::from_millis(200)).unwrap_err();
            assert!(matches!(e, Error::Timeout { .. }) && e.peer() == Some(1), "{e}");
        }
        std::thread::sleep(Duration::from_millis(400));
    });
}

#[test]
fn the_group_api_moves_buffers_and_other_backends_refuse_them() {
    run_world(Under::Shm, 3, T, |r, pg| {
        if r == 0 {
            let mut buf = pg.shm_buffer(5000).unwrap();
            buf.copy_from_slice(&pattern(7, 5000, 1));
            pg.send_shm(buf, 2).unwrap();
            pg.send_bytes(&[1, 2, 3], 2).unwrap();
        } else if r == 2 {
            let buf = pg.recv_shm(0).unwrap();
            assert!(buf[..] == pattern(7, 5000, 1)[..]);
            let mut b = [0u8; 3];
            pg.recv_bytes(&mut b, 0).unwrap();
            assert_eq!(b, [1, 2, 3]);
        }
        pg.barrier().unwrap();
    });
    // Two ranks on two nodes: neither shares its node, so neither has a pool.
    for under in [Under::Tcp, Under::Hier(2)] {
        run_world(under, 2, T, |_, pg| {
            let e = pg.shm_buffer(100).unwrap_err();
            assert!(matches!(e, Error::Unsupported(_)), "{under:?}: {e}");
            assert!(e.to_string().contains(pg.name()), "{e}");
            // Not poisoned: the group keeps working.
            pg.barrier().unwrap();
        });
    }
}

#[test]
fn a_group_spanning_nodes_moves_buffers_inside_a_node_and_refuses_them_across() {
    // Under::Hier(2) with 4 ranks: node 0 holds ranks 0 and 2, node 1
    // ranks 1 and 3.
    run_world(Under::Hier(2), 4, T, |r, pg| {
        match r {
            0 => {
                let mut buf = pg.shm_buffer(70_000).unwrap();
                buf.copy_from_slice(&pattern(3, 70_000, 1));
                pg.send_shm(buf, 2).unwrap();
                pg.send_bytes(&[4, 5], 2).unwrap();
                // Rank 2 sends the buffer back with every byte plus one.
                let back = pg.recv_shm(2).unwrap();
                let want: Vec<u8> = pattern(3, 70_000, 1).iter().map(|b| b.wrapping_add(1)).collect();
                assert!(back[..] == want[..]);
                let e = pg.send_shm(back, 1).unwrap_err();
                assert!(matches!(e, Error::Unsupported(_)), "{e}");
                assert!(e.to_string().contains("group rank 1 runs on another"), "{e}");
                assert!(e.to_string().contains(pg.name()), "{e}");
            }
            2 => {
                let mut buf = pg.recv_shm(0).unwrap();
                let mut b = [0u8; 2];
                pg.recv_bytes(&mut b, 0).unwrap();
                assert_eq!(b, [4, 5]);
                for x in buf.iter_mut() {
                    *x = x.wrapping_add(1);
                }
                pg.send_shm(buf, 0).unwrap();
            }
            1 => {
                let e = pg.recv_shm(0).unwrap_err();
                assert!(e.to_string().contains("group rank 0 runs on another"), "{e}");
                // Its own node's pool works.
                let mut buf = pg.shm_buffer(8).unwrap();
                buf.copy_from_slice(&[9; 8]);
                pg.send_shm(buf, 3).unwrap();
            }
            _ => {
                let buf = pg.recv_shm(1).unwrap();
                assert_eq!(&buf[..], &[9; 8]);
            }
        }
        // Not poisoned: the group keeps working, across nodes too.
        let mut v = [r as i32 + 1];
        pg.all_reduce(&mut v, rankweave::ReduceOp::Sum).unwrap();
        assert_eq!(v, [10]);
    });
}

/// Child-process entry: rank 1. Owner mode (`..._OWNER`): fills a buffer,
/// hands it to rank 0 and waits to be killed; else echoes buffers back
/// after adding 1 to every byte.
#[test]
fn zero_copy_child_entry() {
    let Ok(name) = std::env::var("RANKWEAVE_ZC_CHILD_SEGMENT") else { return };
    let mut comm = ShmComm::create_with(1, 2, "zc-procs", &opts(), |_| Ok(name)).unwrap();
    if std::env::var("RANKWEAVE_ZC_CHILD_OWNER").is_ok() {
        let mut buf = comm.shm_buffer(3 << 20).unwrap();
        buf.copy_from_slice(&pattern(1, 3 << 20, 2));
        comm.send_shm(buf, 0, T).unwrap();
        std::thread::sleep(Duration::from_secs(60));
        return;
    }
    loop {
        let mut buf = comm.recv_shm(0, T).unwrap();
        if buf.is_empty() {
            return;
        }
        for b in buf.iter_mut() {
            *b = b.wrapping_add(1);
        }
        comm.send_shm(buf, 0, T).unwrap();
    }
}

fn spawn_child(owner: bool) -> (ShmComm, std::process::Child) {
    let mut child = None;
    let comm = ShmComm::create_with(0, 2, "zc-procs", &opts(), |name| {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args(["--exact", "zero_copy_child_entry", "--test-threads=1"])
            .env("RANKWEAVE_ZC_CHILD_SEGMENT", name.unwrap())
            .stdout(std::process::Stdio::null());
        if owner {
            cmd.env("RANKWEAVE_ZC_CHILD_OWNER", "1");
        }
        child = Some(cmd.spawn().unwrap());
        Ok(name.unwrap().to_string())
    })
    .unwrap();
    (comm, child.unwrap())
}

fn job_segments() -> Vec<String> {
    rankweave::segments::list_job(&rankweave::segments::job_id()).unwrap()
}

#[test]
fn two_processes_pass_buffers_back_and_forth_without_leaving_files() {
    let before = job_segments();
    let (mut comm, mut child) = spawn_child(false);
    for (i, len) in [1usize, 4096, 100_000, 1 << 20, 9 << 20].into_iter().enumerate() {
        let mut buf = comm.shm_buffer(len).unwrap();
        buf.copy_from_slice(&pattern(0, len, i));
        let at = buf.as_ptr();
        comm.send_shm(buf, 1, T).unwrap();
        let back = comm.recv_shm(1, T).unwrap();
        assert_eq!(back.as_ptr(), at, "the child worked in place on our block");
        let want: Vec<u8> = pattern(0, len, i).iter().map(|b| b.wrapping_add(1)).collect();
        assert!(back[..] == want[..], "len {len}");
    }
    let end = comm.shm_buffer(0).unwrap();
    comm.send_shm(end, 1, T).unwrap();
    assert!(child.wait().unwrap().success());
    drop(comm);
    // Pools are anonymous memory: nothing new in /dev/shm.
    let after = job_segments();
    assert!(after.iter().all(|s| before.contains(s)), "{before:?} -> {after:?}");
}

#[test]
fn a_buffer_outlives_its_killed_owner() {
    let (mut comm, mut child) = spawn_child(true);
    let buf = comm.recv_shm(1, T).unwrap();
    assert_eq!(buf.owner(), 1);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::Signal::SIGKILL).unwrap();
    child.wait().unwrap();
    // Still mapped here: reading it is safe and the bytes are intact.
    assert!(buf[..] == pattern(1, 3 << 20, 2)[..]);
    drop(buf);
    drop(comm);
}
