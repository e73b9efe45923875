//! The conformance suite (`conformance/mod.rs`) over every backend of the
//! crate: TCP, shared memory, the hierarchical backend (ranks on simulated
//! nodes) and the in-process backend, plugged in through a
//! [`BackendFactory`], at world sizes 1..=8, ranks as threads.

mod common;
mod conformance;

use conformance::{suite, Level, FULL};
use rankweave::backend::tcp::InProcessFactory;
use rankweave::group::BackendFactory;
use rankweave::{GroupOptions, HashStore, ProcessGroup, SharedStore, TransportKind};
use std::sync::Arc;
use std::time::Duration;

/// Which backend a world is built on.
#[derive(Clone, Copy, Debug)]
enum Under {
    Tcp,
    Shm,
    /// Ranks spread over this many simulated nodes (unevenly).
    Hier(usize),
    Mem,
}

fn world(under: Under, n: usize, f: impl Fn(ProcessGroup) + Sync) {
    let store: SharedStore = Arc::new(HashStore::new());
    let mem: Arc<dyn BackendFactory> = Arc::new(InProcessFactory::default());
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (store, mem) = (store.clone(), mem.clone());
                s.spawn(move || {
                    let mut opts = GroupOptions { timeout: Duration::from_secs(60), ..GroupOptions::builtin() };
                    let pg = match under {
                        Under::Tcp | Under::Shm | Under::Hier(_) => {
                            opts.transport = match under {
                                Under::Tcp => TransportKind::Tcp,
                                Under::Shm => TransportKind::Shm,
                                _ => TransportKind::Auto,
                            };
                            if let Under::Hier(nodes) = under {
                                // Every node populated, then an uneven, interleaved spread.
                                let k = if r < nodes { r } else { (r * 7 / 3) % nodes };
                                opts.node = Some(format!("node{k}"));
                            }
                            ProcessGroup::new_world(store, r, n, opts).unwrap()
                        }
                        Under::Mem => ProcessGroup::new_world_with(mem, store, r, n, opts).unwrap(),
                    };
                    let want = match under {
                        _ if n == 1 => pg.backend_name(),
                        Under::Tcp => "tcp",
                        Under::Shm => "shm",
                        Under::Hier(_) => "hier",
                        Under::Mem => "mem",
                    };
                    assert_eq!(pg.backend_name(), want);
                    f(pg)
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap_or_else(|e| std::panic::resume_unwind(e));
        }
    });
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
