//! Process groups over shared memory, ranks as threads over an in-process
//! store: every collective the groups send through shared memory gives the
//! same bytes as a TCP-forced group on the same inputs (world sizes 1..=6,
//! every dtype and op at small sizes, a sample above one shm segment),
//! bitwise identical on every rank; forcing the transport through
//! [`GroupOptions`] and `RANKWEAVE_TRANSPORT`; a peer that never comes; and
//! nothing of this process left in `/dev/shm` once the groups are gone.

mod common;

use common::{expected, input, pattern, random_floats};
use rankweave::collectives::shm::DEFAULT_SLOT_BYTES;
use rankweave::segments::{job_id, list_job};
use rankweave::{DType, Error, GroupOptions, HashStore, ProcessGroup, ReduceOp, SharedStore, TransportKind};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

/// Tests hold it shared; the `/dev/shm` check holds it exclusively, so no
/// other test of this process is creating a segment while it looks.
static SHM_LOCK: RwLock<()> = RwLock::new(());

fn shared() -> std::sync::RwLockReadGuard<'static, ()> {
    SHM_LOCK.read().unwrap_or_else(|e| e.into_inner())
}

fn opts(transport: TransportKind) -> GroupOptions {
    GroupOptions {
        timeout: Duration::from_secs(30),
        transport,
        listen_host: Some("127.0.0.1".into()),
        ..GroupOptions::builtin()
    }
}

/// What a group built with `requested` reports, given this process's environment.
fn expected_kind(requested: TransportKind, size: usize) -> TransportKind {
    match TransportKind::resolve_from_env(requested).unwrap() {
        TransportKind::Tcp => TransportKind::Tcp,
        _ if size == 1 => TransportKind::Shm,
        // One node: Auto finds every member here.
        _ => TransportKind::Shm,
    }
}

/// Runs `f(rank, shm_world, tcp_world)` on `n` threads: two worlds on one
/// store, one forced to shared memory, one to TCP.
fn run_pair<R: Send>(n: usize, f: impl Fn(usize, &ProcessGroup, &ProcessGroup) -> R + Sync) -> Vec<R> {
    let store: SharedStore = Arc::new(HashStore::new());
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let store = store.clone();
                s.spawn(move || {
                    let shm = ProcessGroup::new_world(store.clone(), r, n, opts(TransportKind::Shm)).unwrap();
                    let tcp = ProcessGroup::new_world(store, r, n, opts(TransportKind::Tcp)).unwrap();
                    assert_eq!(shm.transport_kind(), expected_kind(TransportKind::Shm, n));
                    assert_eq!(tcp.transport_kind(), expected_kind(TransportKind::Tcp, n));
                    f(r, &shm, &tcp)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

/// (dtype, op, element count): every pair at 1 and 7 elements, every third
/// pair at 0 and 1000, every thirteenth above one shm segment (half a slot).
fn cases() -> Vec<(DType, ReduceOp, usize)> {
    let pairs = DType::ALL.iter().flat_map(|&d| ReduceOp::ALL.iter().map(move |&o| (d, o)));
    let mut out = Vec::new();
    for (i, (d, o)) in pairs.enumerate() {
        out.extend([(d, o, 1), (d, o, 7)]);
        if i % 3 == 0 {
            out.extend([(d, o, 0), (d, o, 1000)]);
        }
        if i % 13 == 0 {
            out.push((d, o, DEFAULT_SLOT_BYTES / 2 / d.size() + 37));
        }
    }
    out
}

fn assert_all_equal(what: &str, outs: &[Vec<u8>]) {
    for (r, o) in outs.iter().enumerate() {
        assert!(o == &outs[0], "{what}: rank {r} differs from rank 0");
    }
}

#[test]
fn reductions_over_shm_match_tcp_and_the_exact_result() {
    let _g = shared();
    for n in 1..=6 {
        let outs = run_pair(n, |r, shm, tcp| {
            let mut all = Vec::new();
            {
                for (dtype, op, count) in cases() {
                    let es = dtype.size();
                    {
                        let what = format!("n={n} {dtype} {op} count={count}");
                        // all_reduce
                        let want = expected(dtype, op, n, count);
                        let mut a = input(dtype, op, r, count);
                        let mut b = a.clone();
                        shm.all_reduce_bytes(&mut a, dtype, op).unwrap();
                        tcp.all_reduce_bytes(&mut b, dtype, op).unwrap();
                        assert!(a == b && a == want, "all_reduce {what}");
                        all.extend_from_slice(&a);
                        // reduce to a root that moves with the case
                        let root = (count + es) % n;
                        let mut a = input(dtype, op, r, count);
                        let mut b = a.clone();
                        shm.reduce_bytes(&mut a, dtype, op, root).unwrap();
                        tcp.reduce_bytes(&mut b, dtype, op, root).unwrap();
                        if r == root {
                            assert!(a == b && a == want, "reduce {what}");
                        }
                        // reduce_scatter: block j of the full reduction; a
                        // shm segment holds 1/n of a half slot per block.
                        let count = if count * es > 4096 { count / n + 1 } else { count };
                        let full = expected(dtype, op, n, n * count);
                        let inp = input(dtype, op, r, n * count);
                        let mut a = vec![0xa5u8; count * es];
                        let mut b = vec![0x5au8; count * es];
                        shm.reduce_scatter_bytes(&inp, &mut a, dtype, op).unwrap();
                        tcp.reduce_scatter_bytes(&inp, &mut b, dtype, op).unwrap();
                        assert!(a == b && a[..] == full[r * count * es..(r + 1) * count * es], "reduce_scatter {what}");
                    }
                }
            }
            all
        });
        assert_all_equal(&format!("all_reduce results, n={n}"), &outs);
    }
}

#[test]
fn data_movement_over_shm_matches_tcp() {
    let _g = shared();
    for n in 1..=6 {
        run_pair(n, |r, shm, tcp| {
            for s in [0usize, 1, 7, 1000, DEFAULT_SLOT_BYTES / 2 + 13] {
                let root = (s + 1) % n;
                let what = format!("n={n} bytes={s}");
                // broadcast
                let mut a = if r == root { pattern(r, s, 1) } else { vec![0; s] };
                let mut b = a.clone();
                shm.broadcast_bytes(&mut a, root).unwrap();
                tcp.broadcast_bytes(&mut b, root).unwrap();
                assert!(a == b && a == pattern(root, s, 1), "broadcast {what}");
                // all_gather
                let inp = pattern(r, s, 2);
                let want: Vec<u8> = (0..n).flat_map(|j| pattern(j, s, 2)).collect();
                let (mut a, mut b) = (vec![0; n * s], vec![1; n * s]);
                shm.all_gather_bytes(&inp, &mut a).unwrap();
                tcp.all_gather_bytes(&inp, &mut b).unwrap();
                assert!(a == b && a == want, "all_gather {what}");
                // gather
                let (mut a, mut b) = (vec![0; n * s], vec![1; n * s]);
                let me = r == root;
                shm.gather_bytes(&inp, me.then_some(&mut a[..]), root).unwrap();
                tcp.gather_bytes(&inp, me.then_some(&mut b[..]), root).unwrap();
                if me {
                    assert!(a == b && a == want, "gather {what}");
                }
                // scatter: root's block j goes to rank j
                let blocks: Vec<u8> = (0..n).flat_map(|j| pattern(j, s, 3)).collect();
                let (mut a, mut b) = (vec![0; s], vec![1; s]);
                shm.scatter_bytes(me.then_some(&blocks[..]), &mut a, root).unwrap();
                tcp.scatter_bytes(me.then_some(&blocks[..]), &mut b, root).unwrap();
                assert!(a == b && a == pattern(r, s, 3), "scatter {what}");
                // all_to_all: block j of rank i lands in block i of rank j
                let inp: Vec<u8> = (0..n).flat_map(|j| pattern(r * 8 + j, s, 4)).collect();
                let want: Vec<u8> = (0..n).flat_map(|i| pattern(i * 8 + r, s, 4)).collect();
                let (mut a, mut b) = (vec![0; n * s], vec![1; n * s]);
                shm.all_to_all_bytes(&inp, &mut a).unwrap();
                tcp.all_to_all_bytes(&inp, &mut b).unwrap();
                assert!(a == b && a == want, "all_to_all {what}");
                // barrier
                shm.barrier().unwrap();
                tcp.barrier().unwrap();
            }
        });
    }
}

#[test]
fn rounding_sensitive_sums_are_bitwise_identical_on_every_rank() {
    let _g = shared();
    for n in [2, 3, 5] {
        for dtype in [DType::F32, DType::BF16, DType::F64] {
            for count in [3, 1000, DEFAULT_SLOT_BYTES / dtype.size() + 5] {
                let outs = run_pair(n, |r, shm, _| {
                    let mut x = random_floats(dtype, (r * 1000 + count) as u64, count);
                    shm.all_reduce_bytes(&mut x, dtype, ReduceOp::Sum).unwrap();
                    x
                });
                assert_all_equal(&format!("n={n} {dtype} count={count}"), &outs);
            }
        }
    }
}

#[test]
fn the_transport_override_parses_and_beats_the_options() {
    use TransportKind::*;
    assert_eq!(TransportKind::resolve(Auto, None).unwrap(), Auto);
    assert_eq!(TransportKind::resolve(Shm, Some("")).unwrap(), Shm);
    assert_eq!(TransportKind::resolve(Auto, Some("tcp")).unwrap(), Tcp);
    assert_eq!(TransportKind::resolve(Tcp, Some("SHM")).unwrap(), Shm);
    assert_eq!(TransportKind::resolve(Shm, Some(" auto ")).unwrap(), Auto);
    let e = TransportKind::resolve(Tcp, Some("udp")).unwrap_err();
    assert!(matches!(&e, Error::InvalidArgument(m) if m.contains("RANKWEAVE_TRANSPORT") && m.contains("udp")), "{e}");
    assert_eq!("Tcp".parse::<TransportKind>().unwrap(), Tcp);
    assert_eq!(Shm.to_string(), "shm");
    assert_eq!(rankweave::group::TRANSPORT_ENV, "RANKWEAVE_TRANSPORT");
}

#[test]
fn options_choose_the_transport_and_subgroups_inherit_it() {
    let _g = shared();
    for requested in [TransportKind::Auto, TransportKind::Tcp, TransportKind::Shm] {
        let store: SharedStore = Arc::new(HashStore::new());
        std::thread::scope(|s| {
            for r in 0..4 {
                let store = store.clone();
                s.spawn(move || {
                    let w = ProcessGroup::new_world(store, r, 4, opts(requested)).unwrap();
                    let kind = expected_kind(requested, 4);
                    assert_eq!(w.transport_kind(), kind, "{requested}");
                    // Every rank creates every group, in the same order.
                    let low = w.new_group(&[0, 1], "pair").unwrap();
                    let high = w.new_group(&[2, 3], "pair").unwrap();
                    let pair = low.or(high).expect("member");
                    assert_eq!(pair.transport_kind(), kind);
                    let mut x = [r as i64 + 1; 5];
                    pair.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                    assert_eq!(x, [if r < 2 { 3 } else { 7 }; 5]);
                    let solos: Vec<_> = (0..4).map(|j| w.new_group(&[j], "solo").unwrap()).collect();
                    let one = solos.into_iter().flatten().next().expect("member");
                    let one_kind = if kind == TransportKind::Tcp { kind } else { TransportKind::Shm };
                    assert_eq!(one.transport_kind(), one_kind);
                    // Point-to-point still goes over TCP beside shm collectives.
                    let peer = r ^ 1;
                    if r % 2 == 0 {
                        w.send(&[r as i32; 3], peer).unwrap();
                    } else {
                        let mut b = [0i32; 3];
                        w.recv(&mut b, peer).unwrap();
                        assert_eq!(b, [peer as i32; 3]);
                    }
                    w.barrier().unwrap();
                });
            }
        });
    }
}

#[test]
fn a_peer_that_never_arrives_times_out_naming_it() {
    let _g = shared();
    let store: SharedStore = Arc::new(HashStore::new());
    let o = GroupOptions { timeout: Duration::from_millis(400), ..opts(TransportKind::Shm) };
    let start = Instant::now();
    let e = ProcessGroup::new_world(store, 0, 2, o).unwrap_err();
    assert!(matches!(e, Error::Timeout { .. }), "{e}");
    assert_eq!(e.peer(), Some(1), "{e}");
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_peer_that_skips_a_collective_times_out_naming_it_and_poisons_the_group() {
    let _g = shared();
    if expected_kind(TransportKind::Shm, 2) != TransportKind::Shm {
        return;
    }
    let store: SharedStore = Arc::new(HashStore::new());
    let done = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        for r in 0..2 {
            let (store, done) = (store.clone(), &done);
            s.spawn(move || {
                let o = GroupOptions { timeout: Duration::from_millis(500), ..opts(TransportKind::Shm) };
                let w = ProcessGroup::new_world(store, r, 2, o).unwrap();
                if r == 0 {
                    let start = Instant::now();
                    let e = w.all_reduce(&mut [1.0f32; 4], ReduceOp::Sum).unwrap_err();
                    assert!(matches!(&e, Error::Timeout { ctx, .. } if ctx.group == "world:0"), "{e}");
                    assert_eq!(e.peer(), Some(1), "{e}");
                    assert!(start.elapsed() < Duration::from_secs(10));
                    let e = w.barrier().unwrap_err();
                    assert!(matches!(e, Error::Poisoned { .. }), "{e}");
                }
                done.wait();
            });
        }
    });
}

#[test]
fn nothing_of_this_process_stays_in_dev_shm() {
    let _g = SHM_LOCK.write().unwrap_or_else(|e| e.into_inner());
    let job = job_id();
    assert_eq!(list_job(&job).unwrap(), Vec::<String>::new(), "before");
    let store: SharedStore = Arc::new(HashStore::new());
    std::thread::scope(|s| {
        for r in 0..3 {
            let store = store.clone();
            let job = &job;
            s.spawn(move || {
                let w = ProcessGroup::new_world(store, r, 3, opts(TransportKind::Auto)).unwrap();
                let sub = w.new_group(&[2, 0], "tp").unwrap();
                let mut x = [2u8; 100];
                w.all_reduce(&mut x, ReduceOp::Max).unwrap();
                w.barrier().unwrap();
                // Alive and attached, yet unlinked already.
                assert_eq!(list_job(job).unwrap(), Vec::<String>::new(), "while alive");
                drop(sub);
            });
        }
    });
    // A creation that fails midway (the peer never comes) unlinks too.
    let o = GroupOptions { timeout: Duration::from_millis(300), ..opts(TransportKind::Shm) };
    assert!(ProcessGroup::new_world(Arc::new(HashStore::new()), 0, 2, o).is_err());
    assert_eq!(list_job(&job).unwrap(), Vec::<String>::new(), "after");
}

/// Run by [`the_environment_override_reaches_new_groups`] in a child process
/// whose environment sets `RANKWEAVE_TRANSPORT` (never racing this process's
/// environment): groups requesting shared memory must get what it says.
#[test]
#[ignore = "child of the_environment_override_reaches_new_groups"]
fn child_env_override() {
    let Ok(want) = std::env::var("GROUP_SHM_CHILD_EXPECT") else { return };
    let store: SharedStore = Arc::new(HashStore::new());
    let res: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..2)
            .map(|r| {
                let store = store.clone();
                s.spawn(move || {
                    ProcessGroup::new_world(store, r, 2, opts(TransportKind::Shm)).map(|g| {
                        let mut x = [r as i32 + 1; 3];
                        g.all_reduce(&mut x, ReduceOp::Sum).unwrap();
                        assert_eq!(x, [3; 3]);
                        g.transport_kind()
                    })
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in res {
        match (want.as_str(), r) {
            ("invalid", Err(Error::InvalidArgument(m))) => assert!(m.contains("RANKWEAVE_TRANSPORT"), "{m}"),
            ("tcp", Ok(k)) => assert_eq!(k, TransportKind::Tcp),
            (w, r) => panic!("expected {w}, got {r:?}"),
        }
    }
}

#[test]
fn the_environment_override_reaches_new_groups() {
    for (value, expect) in [("tcp", "tcp"), ("TCP", "tcp"), ("udp", "invalid")] {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--ignored", "--exact", "child_env_override", "--test-threads=1"])
            .env("RANKWEAVE_TRANSPORT", value)
            .env("GROUP_SHM_CHILD_EXPECT", expect)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.contains("1 passed"), "{value}: {text}");
    }
}

/// An object of every shape the codec carries, about `len` bytes encoded.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
struct Obj {
    id: u64,
    name: String,
    tags: Vec<(u32, bool)>,
    #[serde(with = "serde_bytes_like")]
    body: Vec<u8>,
}

/// `Vec<u8>` as one byte string (as a user's `serde_bytes` field would be).
mod serde_bytes_like {
    pub fn serialize<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }
    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(V)
    }
}

fn obj(root: usize, len: usize) -> Obj {
    Obj {
        id: root as u64 * 1000 + len as u64,
        name: format!("from {root}"),
        tags: (0..(len % 7) as u32).map(|i| (i, i % 2 == 0)).collect(),
        body: pattern(root, len, 3),
    }
}

#[test]
fn objects_broadcast_over_shm_and_tcp_arrive_equal_in_place_or_staged() {
    let _g = shared();
    let limits = rankweave::tensor::DecodeLimits::default();
    for n in [2, 3] {
        // Up to an area of n half slots in one step; above, staged.
        let area = n * DEFAULT_SLOT_BYTES / 2;
        let lens = [0, 100, area - 64, area + 5000, 2 * area + 1];
        let outs = run_pair(n, |r, shm, tcp| {
            for &len in &lens {
                for root in 0..n {
                    let want = obj(root, len);
                    for g in [shm, tcp] {
                        let got = g.broadcast_object((r == root).then_some(&want), root, &limits).unwrap();
                        match got {
                            None => assert_eq!(r, root),
                            Some(o) => {
                                assert!(o == want, "n={n} len={len} root={root} rank {r} ({:?})", g.transport_kind())
                            }
                        }
                    }
                }
            }
            true
        });
        assert_eq!(outs, vec![true; n]);
    }
}

/// Serializing it always fails.
#[derive(Debug, serde::Deserialize)]
struct Unencodable;

impl serde::Serialize for Unencodable {
    fn serialize<S: serde::Serializer>(&self, _s: S) -> Result<S::Ok, S::Error> {
        Err(serde::ser::Error::custom("this object refuses to be encoded"))
    }
}

#[test]
fn object_broadcast_errors_name_the_root_and_leave_the_group_usable() {
    let _g = shared();
    let outs = run_pair(3, |r, shm, tcp| {
        for g in [shm, tcp] {
            // The root cannot encode: it gets the encoder's error, the others one naming it.
            let res = g.broadcast_object::<Unencodable>((r == 1).then_some(&Unencodable), 1, &Default::default());
            let err = res.unwrap_err();
            if r == 1 {
                // postcard keeps only the kind of a serializer's error; the
                // context names the operation, the group and this rank.
                let text = err.to_string();
                assert!(matches!(err, Error::Serialization { .. }), "{err:?}");
                assert!(text.contains("broadcast_object [encode_object]"), "{text}");
                assert!(text.contains(&format!("in group {} on rank 1", g.name())), "{text}");
            } else {
                assert_eq!(err.peer(), Some(1), "{err:?}");
                assert!(err.to_string().contains("could not encode"), "{err}");
                assert!(err.to_string().contains(&format!("in group {} on rank {r}", g.name())), "{err}");
            }
            // A receiver past its limit refuses before allocating. Over TCP the
            // refused bytes stay unreceived, so only shared memory goes on after it.
            if g.transport_kind() == TransportKind::Shm {
                let limits = rankweave::tensor::DecodeLimits {
                    max_object_bytes: if r == 2 { 1000 } else { u64::MAX },
                    ..Default::default()
                };
                let want = obj(0, 5000);
                let res = g.broadcast_object((r == 0).then_some(&want), 0, &limits);
                if r == 2 {
                    let err = res.unwrap_err();
                    assert_eq!(err.peer(), Some(0), "{err:?}");
                    assert!(err.to_string().contains("above this rank's limit of 1000 bytes"), "{err}");
                } else if r == 1 {
                    assert!(res.unwrap().unwrap() == want);
                }
            }
            // The group still works.
            let want = obj(2, 300);
            let got = g.broadcast_object((r == 2).then_some(&want), 2, &Default::default()).unwrap();
            assert!(got.is_none_or(|o| o == want));
        }
        true
    });
    assert_eq!(outs, vec![true; 3]);
}
