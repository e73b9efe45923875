//! The conformance suite (`conformance/mod.rs`) over every backend of the
//! crate: TCP, shared memory, the hierarchical backend (ranks on simulated
//! nodes) and the in-process backend, plugged in through a
//! [`BackendFactory`], at world sizes 1..=8, ranks as threads.

mod common;
mod conformance;

use common::{run_world, Under};
use conformance::{suite, Level, FULL};
use rankweave::ProcessGroup;
use std::time::Duration;

fn world(under: Under, n: usize, f: impl Fn(ProcessGroup) + Sync) {
    run_world(under, n, Duration::from_secs(60), |_, pg| f(pg));
}

fn every_size(under: Under, sizes: std::ops::RangeInclusive<usize>) {
    for n in sizes {
        world(under, n, |pg| {
            suite(&pg, FULL);
            // Subgroups get the same kind of backend and pass too.
            if n >= 3 {
                let evens: Vec<usize> = (0..n).step_by(2).collect();
                if let Some(sub) = pg.new_group(&evens, "evens").unwrap() {
                    suite(&sub, Level { counts: &[0, 7], large: false });
                }
            }
        });
    }
}

#[test]
fn tcp_backend_conforms() {
    every_size(Under::Tcp, 1..=8);
}

#[test]
fn shm_backend_conforms() {
    every_size(Under::Shm, 1..=8);
}

#[test]
fn hierarchical_backend_conforms() {
    every_size(Under::Hier(2), 2..=6);
    every_size(Under::Hier(3), 3..=7);
}

#[test]
fn in_process_backend_plugged_in_from_outside_conforms() {
    every_size(Under::Mem, 1..=8);
}

#[test]
fn large_counts_conform_on_every_backend() {
    for under in [Under::Tcp, Under::Shm, Under::Hier(2), Under::Mem] {
        for n in [2, 3] {
            world(under, n, |pg| conformance::large(&pg));
        }
    }
}
