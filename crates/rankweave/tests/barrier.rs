//! barrier: nobody leaves before everybody entered, world sizes 1..=8.

mod common;

use common::*;
use rankweave::collectives;
use rankweave::Error;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

#[test]
fn nobody_leaves_early() {
    for n in WORLD_SIZES {
        let entered = AtomicUsize::new(0);
        run_mem(n, |rk| {
            for round in 0..20 {
                // Stagger arrivals so a broken barrier would be caught.
                if rk.rank() == round % n {
                    std::thread::sleep(Duration::from_millis(2));
                }
                entered.fetch_add(1, Ordering::SeqCst);
                collectives::barrier(&mut rk.comm()).unwrap();
                let seen = entered.load(Ordering::SeqCst);
                assert!(seen >= (round + 1) * n, "n={n} round {round}: left after only {seen} entries");
                // Second barrier so nobody starts the next round's count early.
                collectives::barrier(&mut rk.comm()).unwrap();
            }
        });
    }
}

#[test]
fn missing_rank_times_out() {
    let res = run_mem_timeout(4, Duration::from_millis(200), |rk| {
        if rk.rank() == 3 {
            std::thread::sleep(Duration::from_millis(600));
            return None;
        }
        Some(collectives::barrier(&mut rk.comm()))
    });
    // Rank 0 waits on rank 3 in the first round and times out naming it;
    // the others fail too, by timeout or because a failed peer went away.
    let e = res[0].as_ref().unwrap().as_ref().unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "rank 0: {e}");
    assert_eq!(e.peer(), Some(3));
    assert!(e.to_string().contains("barrier"), "{e}");
    for (r, res) in res.iter().enumerate().take(3).skip(1) {
        let e = res.as_ref().unwrap().as_ref().unwrap_err();
        assert!(matches!(e, Error::Timeout { .. } | Error::PeerLost { .. }), "rank {r}: {e}");
    }
}

#[test]
fn group_barrier() {
    for n in [1, 2, 3, 5, 8] {
        let entered = AtomicUsize::new(0);
        run_group(n, |pg| {
            for round in 0..5 {
                entered.fetch_add(1, Ordering::SeqCst);
                pg.barrier().unwrap();
                assert!(entered.load(Ordering::SeqCst) >= (round + 1) * n);
                pg.barrier().unwrap();
            }
        });
    }
}
