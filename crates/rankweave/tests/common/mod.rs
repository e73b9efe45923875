//! Shared test harness: ranks as threads, over the in-process transport
//! ([`run_mem`]) or over real process groups on an in-process store
//! ([`run_group`]), plus exactly representable test data.
#![allow(dead_code)]

use half::{bf16, f16};
use rankweave::collectives::Comm;
use rankweave::transport::mem::MemTransport;
use rankweave::transport::{OpDesc, Transport};
use rankweave::{DType, GroupOptions, HashStore, ProcessGroup, ReduceOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// World sizes every matrix covers.
pub const WORLD_SIZES: std::ops::RangeInclusive<usize> = 1..=8;
/// Element counts every matrix covers (1 << 20 runs separately, on a subset).
pub const COUNTS: [usize; 4] = [0, 1, 7, 1000];
/// The large count.
pub const LARGE: usize = 1 << 20;

/// One rank's state in [`run_mem`]: its transport, a scratch buffer reused
/// across calls and the sequence counter every rank advances in step.
pub struct Rank {
    /// The transport.
    pub t: MemTransport,
    /// Scratch reused across calls.
    pub scratch: Vec<u8>,
    /// Last sequence number used.
    pub seq: u64,
    /// Per-operation timeout.
    pub timeout: Duration,
}

impl Rank {
    /// This rank.
    pub fn rank(&self) -> usize {
        self.t.rank()
    }
    /// World size.
    pub fn size(&self) -> usize {
        self.t.size()
    }
    /// A [`Comm`] for the next collective call.
    pub fn comm(&mut self) -> Comm<'_> {
        self.seq += 1;
        Comm {
            transport: &self.t,
            seq: self.seq,
            deadline: Instant::now() + self.timeout,
            scratch: &mut self.scratch,
            desc: OpDesc::NONE,
        }
    }
}

/// Runs `f` on `n` ranks as threads over a [`MemTransport`] mesh and returns
/// each rank's result in rank order. A panic on any rank fails the test.
pub fn run_mem<R: Send>(n: usize, f: impl Fn(&mut Rank) -> R + Sync) -> Vec<R> {
    run_mem_timeout(n, Duration::from_secs(30), f)
}

/// [`run_mem`] with a given per-operation timeout.
pub fn run_mem_timeout<R: Send>(n: usize, timeout: Duration, f: impl Fn(&mut Rank) -> R + Sync) -> Vec<R> {
    let ts = MemTransport::mesh(n, &format!("mem{n}:0"));
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = ts
            .into_iter()
            .map(|t| {
                s.spawn(move || {
                    let mut rank = Rank { t, scratch: Vec::new(), seq: 0, timeout };
                    f(&mut rank)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

/// Runs `f` on `n` ranks as threads, each with its world [`ProcessGroup`]
/// built over one shared [`HashStore`] (30 s timeout), and returns each
/// rank's result in rank order.
pub fn run_group<R: Send>(n: usize, f: impl Fn(ProcessGroup) -> R + Sync) -> Vec<R> {
    let store: rankweave::SharedStore = Arc::new(HashStore::new());
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let store = store.clone();
                s.spawn(move || {
                    let opts = GroupOptions { timeout: Duration::from_secs(30), ..Default::default() };
                    let pg = ProcessGroup::new_world(store, r, n, opts).expect("new_world");
                    f(pg)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

fn signed(dtype: DType) -> bool {
    dtype != DType::U8
}

/// Rank `r`'s element `i` for a reduction with `op`: small integers chosen so
/// every result is exact in every dtype (sums of up to 8 ranks stay within
/// +-64; products have at most three factors of 2 and some -1).
pub fn contribution(dtype: DType, op: ReduceOp, r: usize, i: usize) -> i64 {
    let sg = signed(dtype);
    match op {
        ReduceOp::Sum | ReduceOp::Avg => {
            let v = ((r * 5 + i * 3) % 9) as i64;
            if sg {
                v - 4
            } else {
                v
            }
        }
        ReduceOp::Prod => match (r + 2 * i) % 3 {
            0 => 2,
            1 if sg && (r + i) % 4 == 1 => -1,
            _ => 1,
        },
        ReduceOp::Min | ReduceOp::Max => {
            let v = ((r * 7 + i * 3) % 11) as i64;
            if sg {
                v - 5
            } else {
                v
            }
        }
    }
}

/// Rank `r`'s input of `count` elements for `op`, as bytes.
pub fn input(dtype: DType, op: ReduceOp, r: usize, count: usize) -> Vec<u8> {
    let v: Vec<i64> = (0..count).map(|i| contribution(dtype, op, r, i)).collect();
    encode(dtype, &v)
}

/// The exact reduction over ranks `0..n` of [`input`], as bytes.
pub fn expected(dtype: DType, op: ReduceOp, n: usize, count: usize) -> Vec<u8> {
    let vals: Vec<i64> = (0..count)
        .map(|i| {
            let it = (0..n).map(|r| contribution(dtype, op, r, i));
            match op {
                ReduceOp::Sum | ReduceOp::Avg => it.sum(),
                ReduceOp::Prod => it.product(),
                ReduceOp::Min => it.min().unwrap_or(0),
                ReduceOp::Max => it.max().unwrap_or(0),
            }
        })
        .collect();
    if op == ReduceOp::Avg {
        encode_avg(dtype, &vals, n)
    } else {
        encode(dtype, &vals)
    }
}

/// Small integers as `dtype` bytes (exact for the values tests use).
pub fn encode(dtype: DType, v: &[i64]) -> Vec<u8> {
    fn b<T: bytemuck::Pod>(v: Vec<T>) -> Vec<u8> {
        bytemuck::cast_slice(&v).to_vec()
    }
    match dtype {
        DType::F32 => b(v.iter().map(|x| *x as f32).collect()),
        DType::F64 => b(v.iter().map(|x| *x as f64).collect()),
        DType::F16 => b(v.iter().map(|x| f16::from_f32(*x as f32)).collect()),
        DType::BF16 => b(v.iter().map(|x| bf16::from_f32(*x as f32)).collect()),
        DType::I8 => b(v.iter().map(|x| *x as i8).collect()),
        DType::U8 => b(v.iter().map(|x| *x as u8).collect()),
        DType::I32 => b(v.iter().map(|x| *x as i32).collect()),
        DType::I64 => b(v.to_vec()),
    }
}

/// Sums divided by `n` the way the crate defines Avg: floats divide in their
/// own precision (f16/bf16 in f32, rounded once), integers truncate.
pub fn encode_avg(dtype: DType, sums: &[i64], n: usize) -> Vec<u8> {
    fn b<T: bytemuck::Pod>(v: Vec<T>) -> Vec<u8> {
        bytemuck::cast_slice(&v).to_vec()
    }
    let q32 = |s: &i64| *s as f32 / n as f32;
    match dtype {
        DType::F32 => b(sums.iter().map(q32).collect()),
        DType::F64 => b(sums.iter().map(|s| *s as f64 / n as f64).collect()),
        DType::F16 => b(sums.iter().map(|s| f16::from_f32(q32(s))).collect()),
        DType::BF16 => b(sums.iter().map(|s| bf16::from_f32(q32(s))).collect()),
        _ => encode(dtype, &sums.iter().map(|s| s / n as i64).collect::<Vec<_>>()),
    }
}

/// A byte pattern that differs per rank, block and position.
pub fn pattern(r: usize, len: usize, salt: usize) -> Vec<u8> {
    (0..len).map(|i| ((r * 131 + i * 7 + salt * 31 + (i >> 8)) % 251) as u8).collect()
}

/// A reproducible pseudo-random stream (xorshift64*).
pub struct Rng(pub u64);

impl Rng {
    /// Next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    /// Uniform in [-1, 1) with a random scale, to make rounding order visible.
    pub fn next_f64(&mut self) -> f64 {
        let u = (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64;
        let scale = [1e-3, 1.0, 1e3, 1e6][(self.next_u64() % 4) as usize];
        (2.0 * u - 1.0) * scale
    }
}

/// `count` random floats of `dtype` (a float dtype) as bytes.
pub fn random_floats(dtype: DType, seed: u64, count: usize) -> Vec<u8> {
    let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let v: Vec<f64> = (0..count).map(|_| rng.next_f64()).collect();
    fn b<T: bytemuck::Pod>(v: Vec<T>) -> Vec<u8> {
        bytemuck::cast_slice(&v).to_vec()
    }
    match dtype {
        DType::F32 => b(v.iter().map(|x| *x as f32).collect()),
        DType::F64 => b(v),
        DType::F16 => b(v.iter().map(|x| f16::from_f64(*x / 1e3)).collect()),
        DType::BF16 => b(v.iter().map(|x| bf16::from_f64(*x)).collect()),
        _ => panic!("random_floats: {dtype} is not a float dtype"),
    }
}

/// Describes the first differing element, for assertion messages.
pub fn first_diff(got: &[u8], want: &[u8], es: usize) -> String {
    if got.len() != want.len() {
        return format!("length {} vs {}", got.len(), want.len());
    }
    match got.chunks(es).zip(want.chunks(es)).position(|(a, b)| a != b) {
        Some(i) => format!("element {i}: got {:?} want {:?}", &got[i * es..(i + 1) * es], &want[i * es..(i + 1) * es]),
        None => "equal".into(),
    }
}

/// Which backend a test world runs on.
#[derive(Clone, Copy, Debug)]
pub enum Under {
    /// TCP, forced.
    Tcp,
    /// Shared memory, forced.
    Shm,
    /// Ranks spread over this many simulated nodes (every node populated,
    /// then an uneven, interleaved spread): the hierarchical backend.
    Hier(usize),
    /// The in-process backend, through [`rankweave::group::BackendFactory`].
    Mem,
}

impl Under {
    /// The backend name a group of more than one rank reports.
    pub fn name(self) -> &'static str {
        match self {
            Under::Tcp => "tcp",
            Under::Shm => "shm",
            Under::Hier(_) => "hier",
            Under::Mem => "mem",
        }
    }
}

/// Runs `f(rank, group)` on `n` rank threads of a fresh world built over
/// `under` with per-operation `timeout`, and returns each rank's result in
/// rank order. Checks that the world got the backend asked for.
pub fn run_world<R: Send>(
    under: Under,
    n: usize,
    timeout: Duration,
    f: impl Fn(usize, ProcessGroup) -> R + Sync,
) -> Vec<R> {
    use rankweave::backend::tcp::InProcessFactory;
    use rankweave::group::BackendFactory;
    use rankweave::TransportKind;
    let store: rankweave::SharedStore = Arc::new(HashStore::new());
    let mem: Arc<dyn BackendFactory> = Arc::new(InProcessFactory::default());
    let f = &f;
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..n)
            .map(|r| {
                let (store, mem) = (store.clone(), mem.clone());
                s.spawn(move || {
                    let mut opts = GroupOptions { timeout, ..GroupOptions::builtin() };
                    let pg = match under {
                        Under::Mem => ProcessGroup::new_world_with(mem, store, r, n, opts),
                        Under::Tcp | Under::Shm | Under::Hier(_) => {
                            opts.transport = match under {
                                Under::Tcp => TransportKind::Tcp,
                                Under::Shm => TransportKind::Shm,
                                _ => TransportKind::Auto,
                            };
                            if let Under::Hier(nodes) = under {
                                let k = if r < nodes { r } else { (r * 7 / 3) % nodes };
                                opts.node = Some(format!("node{k}"));
                            }
                            ProcessGroup::new_world(store, r, n, opts)
                        }
                    }
                    .expect("new_world");
                    if n > 1 {
                        assert_eq!(pg.backend_name(), under.name(), "{under:?} n={n}");
                    }
                    f(r, pg)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|e| std::panic::resume_unwind(e))).collect()
    })
}

/// Runs `f` on `n` ranks (threads) sharing one fresh shared-memory
/// communicator (a unique group name over an in-process store); returns
/// their results in rank order.
pub fn run_shm<R: Send + 'static>(
    n: usize,
    opts: rankweave::collectives::shm::ShmOptions,
    f: impl Fn(&mut rankweave::collectives::shm::ShmComm) -> R + Send + Sync + 'static,
) -> Vec<R> {
    static GROUP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let group = format!("shmtest{}-{}", std::process::id(), GROUP.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    let store = Arc::new(HashStore::new());
    let f = Arc::new(f);
    let handles: Vec<_> = (0..n)
        .map(|r| {
            let (store, f, opts, group) = (store.clone(), f.clone(), opts.clone(), group.clone());
            std::thread::spawn(move || {
                let mut comm =
                    rankweave::collectives::shm::ShmComm::create(r, n, &group, &*store, "shm", &opts).expect("create");
                f(&mut comm)
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().expect("rank panicked")).collect()
}
