//! A tensor- and pipeline-parallel decoder-only transformer, wired into
//! rankweave the way an inference engine does it.
//!
//! Each layer is a small struct that holds its shard of the weights and the
//! `GroupCoordinator` it talks to:
//!
//! - `ColumnParallel` keeps a block of output columns: no communication;
//! - `RowParallel` keeps the matching block of input rows: its outputs are
//!   partial sums, so it calls `tp.all_reduce`;
//! - `VocabEmbedding` keeps a block of the vocabulary: zeros for other ids,
//!   then `tp.all_reduce`;
//! - `LmHead` is column-parallel over the vocabulary, then `tp.all_gather`.
//!
//! Pipeline stages hand the hidden state on with `send_tensor_dict` /
//! `recv_tensor_dict`, passing the TP group as `all_gather_group` so each TP
//! rank moves only 1/tp of it. Global rank 0 drives: it broadcasts each
//! step's inputs with `broadcast_tensor_dict` and receives the next token
//! from the last stage.
//!
//! The check: the same structs built over a world of one rank (every group a
//! group of one, every collective the identity) are the single-process model;
//! the parallel run must produce the same tokens and, within 1e-3, the same
//! logits. (`rankweave demo` runs a fuller version: rotary positions, norm
//! gains, timings.)
//!
//! Run it as 4 ranks in threads over an in-process store (tp 2 x pp 2):
//!     cargo run -p rankweave --example tp_pp_transformer
//! or as processes (`TP` picks the tensor-parallel degree, default 2 when the
//! world size is even):
//!     rankweave launch --nproc-per-node 4 -- target/debug/examples/tp_pp_transformer

use ndarray::{concatenate, s, Array2, Axis};
use rankweave::coordinator::GroupCoordinator;
use rankweave::parallel_state::{self as ps, ParallelState};
use rankweave::tensor::{Tensor, TensorDict};
use rankweave::{HashStore, Result};
use std::sync::Arc;

const VOCAB: usize = 256;
const HIDDEN: usize = 64;
const HEADS: usize = 4;
const LAYERS: usize = 4;
const FFN: usize = 128;
const PROMPT: [i64; 5] = [3, 141, 59, 26, 53];
const NEW_TOKENS: usize = 6;

/// The full `rows x cols` matrix `id`, the same on every rank (splitmix64).
fn weight(id: u64, rows: usize, cols: usize) -> Array2<f32> {
    let mut state = id.wrapping_mul(0x2545_F491_4F6C_DD1D);
    let scale = (3.0 / rows as f32).sqrt();
    Array2::from_shape_simple_fn((rows, cols), || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        (((z ^ (z >> 31)) >> 40) as f32 / (1u64 << 23) as f32 - 1.0) * scale
    })
}

fn to_tensor(x: &Array2<f32>) -> Result<Tensor> {
    Tensor::from_vec(x.iter().copied().collect::<Vec<f32>>(), [x.nrows(), x.ncols()])
}

fn to_array(t: &Tensor) -> Result<Array2<f32>> {
    let (rows, cols) = (t.shape()[0], t.shape()[1]);
    Ok(Array2::from_shape_vec((rows, cols), t.to_vec::<f32>()?).expect("shape matches"))
}

/// This rank's block of `n` when `n` is split over the TP group.
fn my_block(n: usize, tp: &GroupCoordinator) -> std::ops::Range<usize> {
    let len = n / tp.world_size();
    tp.rank_in_group() * len..(tp.rank_in_group() + 1) * len
}

fn rms_norm(x: &Array2<f32>) -> Array2<f32> {
    let mut y = x.clone();
    for mut row in y.rows_mut() {
        let inv = 1.0 / (row.dot(&row) / row.len() as f32 + 1e-5).sqrt();
        row *= inv;
    }
    y
}

/// `y = x W[:, my columns]`: no communication.
struct ColumnParallel {
    w: Array2<f32>,
}

/// `y = sum over ranks of x_mine W[my rows, :]`: one all_reduce.
struct RowParallel {
    w: Array2<f32>,
    tp: GroupCoordinator,
}

impl RowParallel {
    fn forward(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        to_array(&self.tp.all_reduce(to_tensor(&x.dot(&self.w))?)?)
    }
}

struct VocabEmbedding {
    w: Array2<f32>,
    vocab: std::ops::Range<usize>,
    tp: GroupCoordinator,
}

impl VocabEmbedding {
    fn new(tp: &GroupCoordinator) -> Self {
        let vocab = my_block(VOCAB, tp);
        VocabEmbedding { w: weight(1, VOCAB, HIDDEN).slice(s![vocab.clone(), ..]).to_owned(), vocab, tp: tp.clone() }
    }
    fn forward(&self, ids: &[i64]) -> Result<Array2<f32>> {
        let mut x = Array2::zeros((ids.len(), HIDDEN));
        for (i, &id) in ids.iter().enumerate() {
            if self.vocab.contains(&(id as usize)) {
                x.row_mut(i).assign(&self.w.row(id as usize - self.vocab.start));
            }
        }
        to_array(&self.tp.all_reduce(to_tensor(&x)?)?)
    }
}

/// Causal attention over this rank's heads, with a KV cache.
struct Attention {
    qkv: ColumnParallel,
    out: RowParallel,
    width: usize,
    k_cache: Array2<f32>,
    v_cache: Array2<f32>,
}

impl Attention {
    fn new(layer: u64, tp: &GroupCoordinator) -> Self {
        let cols = my_block(HIDDEN, tp);
        let full = weight(10 * layer + 2, HIDDEN, 3 * HIDDEN);
        let parts: Vec<_> =
            (0..3).map(|p| full.slice(s![.., p * HIDDEN + cols.start..p * HIDDEN + cols.end])).collect();
        let out = weight(10 * layer + 3, HIDDEN, HIDDEN).slice(s![cols.clone(), ..]).to_owned();
        Attention {
            qkv: ColumnParallel { w: concatenate(Axis(1), &parts).expect("same rows") },
            out: RowParallel { w: out, tp: tp.clone() },
            width: cols.len(),
            k_cache: Array2::zeros((0, cols.len())),
            v_cache: Array2::zeros((0, cols.len())),
        }
    }

    fn forward(&mut self, x: &Array2<f32>) -> Result<Array2<f32>> {
        let (w, d) = (self.width, HIDDEN / HEADS);
        let qkv = x.dot(&self.qkv.w);
        let past = self.k_cache.nrows();
        self.k_cache = concatenate(Axis(0), &[self.k_cache.view(), qkv.slice(s![.., w..2 * w])]).expect("same width");
        self.v_cache = concatenate(Axis(0), &[self.v_cache.view(), qkv.slice(s![.., 2 * w..])]).expect("same width");
        let mut heads_out = Array2::zeros((x.nrows(), w));
        for h in (0..w).step_by(d) {
            let q = qkv.slice(s![.., h..h + d]);
            let mut p = q.dot(&self.k_cache.slice(s![.., h..h + d]).t()) / (d as f32).sqrt();
            for (i, mut row) in p.rows_mut().into_iter().enumerate() {
                row.slice_mut(s![past + i + 1..]).fill(f32::NEG_INFINITY);
                let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
                row.mapv_inplace(|v| (v - max).exp());
                let sum = row.sum();
                row /= sum;
            }
            heads_out.slice_mut(s![.., h..h + d]).assign(&p.dot(&self.v_cache.slice(s![.., h..h + d])));
        }
        self.out.forward(&heads_out)
    }
}

/// `down(silu(up(x)))`: column- then row-parallel.
struct Mlp {
    up: ColumnParallel,
    down: RowParallel,
}

impl Mlp {
    fn new(layer: u64, tp: &GroupCoordinator) -> Self {
        let cols = my_block(FFN, tp);
        Mlp {
            up: ColumnParallel { w: weight(10 * layer + 4, HIDDEN, FFN).slice(s![.., cols.clone()]).to_owned() },
            down: RowParallel { w: weight(10 * layer + 5, FFN, HIDDEN).slice(s![cols, ..]).to_owned(), tp: tp.clone() },
        }
    }
    fn forward(&self, x: &Array2<f32>) -> Result<Array2<f32>> {
        self.down.forward(&x.dot(&self.up.w).mapv(|v| v / (1.0 + (-v).exp())))
    }
}

struct Layer {
    attn: Attention,
    mlp: Mlp,
}

impl Layer {
    fn forward(&mut self, x: Array2<f32>) -> Result<Array2<f32>> {
        let x = &x + &self.attn.forward(&rms_norm(&x))?;
        Ok(&x + &self.mlp.forward(&rms_norm(&x))?)
    }
}

struct LmHead {
    w: Array2<f32>,
    tp: GroupCoordinator,
}

impl LmHead {
    /// Full-vocabulary logits of the last position, on every TP rank.
    fn forward(&self, x: &Array2<f32>) -> Result<Vec<f32>> {
        let local = rms_norm(&x.slice(s![x.nrows() - 1.., ..]).to_owned()).dot(&self.w);
        self.tp.all_gather(&to_tensor(&local)?, -1)?.to_vec()
    }
}

/// Greedy decoding on one rank of `state`; global rank 0 returns the tokens
/// and the last step's logits.
fn generate(state: &ParallelState) -> Result<Option<(Vec<i64>, Vec<f32>)>> {
    let (world, tp, pp) = (state.get_world_group()?, state.get_tp_group()?, state.get_pp_group()?);
    let (stage, stages) = (pp.rank_in_group(), pp.world_size());
    let embed = pp.is_first_rank().then(|| VocabEmbedding::new(&tp));
    let mut layers: Vec<Layer> = (stage * LAYERS / stages..(stage + 1) * LAYERS / stages)
        .map(|l| Layer { attn: Attention::new(l as u64, &tp), mlp: Mlp::new(l as u64, &tp) })
        .collect();
    let head = pp
        .is_last_rank()
        .then(|| LmHead { w: weight(9, HIDDEN, VOCAB).slice(s![.., my_block(VOCAB, &tp)]).to_owned(), tp: tp.clone() });

    let (mut tokens, mut logits) = (Vec::new(), Vec::new());
    for step in 0..NEW_TOKENS {
        // The driver's inputs for this step: the prompt, then the last token.
        let inputs = (world.rank() == 0).then(|| {
            let ids = if step == 0 { PROMPT.to_vec() } else { vec![*tokens.last().unwrap()] };
            TensorDict::new().with("input_ids", Tensor::vec1(&ids))
        });
        let inputs = world.broadcast_tensor_dict(inputs.as_ref(), 0)?;
        let ids = inputs.get_tensor("input_ids").expect("sent by rank 0").to_vec::<i64>()?;

        let mut x = match &embed {
            Some(e) => e.forward(&ids)?,
            None => to_array(pp.recv_tensor_dict(None, Some(&tp))?.expect("pp > 1").get_tensor("hidden").unwrap())?,
        };
        for layer in &mut layers {
            x = layer.forward(x)?;
        }
        match &head {
            None => pp.send_tensor_dict(&TensorDict::new().with("hidden", to_tensor(&x)?), None, Some(&tp))?,
            Some(h) => {
                logits = h.forward(&x)?;
                let best = (0..VOCAB).fold(0, |b, i| if logits[i] > logits[b] { i } else { b });
                tokens.push(best as i64);
                // Round the pipeline ring to the first stage (a no-op when pp == 1).
                let back =
                    TensorDict::new().with("token", Tensor::vec1(&[best as i64])).with("logits", Tensor::vec1(&logits));
                pp.send_tensor_dict(&back, None, Some(&tp))?;
            }
        }
        if pp.is_first_rank() && !pp.is_last_rank() {
            let back = pp.recv_tensor_dict(None, Some(&tp))?.expect("pp > 1");
            tokens.push(back.get_tensor("token").unwrap().to_vec::<i64>()?[0]);
            logits = back.get_tensor("logits").unwrap().to_vec()?;
        }
    }
    Ok((world.rank() == 0).then_some((tokens, logits)))
}

/// The same structs over a world of one: the single-process model.
fn reference() -> Result<(Vec<i64>, Vec<f32>)> {
    let state = ParallelState::init_with_store(Arc::new(HashStore::new()), 1, 0, 0)?;
    state.initialize_model_parallel(1, 1, None)?;
    Ok(generate(&state)?.expect("rank 0 of 1"))
}

fn check(parallel: (Vec<i64>, Vec<f32>), tp: usize, pp: usize) -> Result<()> {
    let single = reference()?;
    assert_eq!(parallel.0, single.0, "generated tokens differ from the single-process model");
    let diff = parallel.1.iter().zip(&single.1).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max);
    assert!(diff <= 1e-3, "logits differ by {diff}");
    println!(
        "tp_pp_transformer: tp {tp} x pp {pp} generated {:?}, as one process does (max |dlogit| {diff:.1e})",
        parallel.0
    );
    Ok(())
}

fn main() -> Result<()> {
    if std::env::var_os("WORLD_SIZE").is_some() {
        ps::init_distributed_environment(-1, -1, "env://", -1, "gloo")?;
        let world = ps::get_world_group()?.world_size();
        let tp = std::env::var("TP").ok().and_then(|v| v.parse().ok()).unwrap_or(if world % 2 == 0 { 2 } else { 1 });
        ps::initialize_model_parallel(tp, world / tp, None)?;
        if let Some(result) = generate(ps::global_state())? {
            check(result, tp, world / tp)?;
        }
        ps::get_world_group()?.barrier()?;
        ps::destroy_model_parallel();
        ps::destroy_distributed_environment();
        return Ok(());
    }
    // Ranks as threads: one ParallelState per rank over a shared in-process store.
    let (tp, pp) = (2, 2);
    let store: rankweave::SharedStore = Arc::new(HashStore::new());
    let ranks: Vec<_> = (0..tp * pp)
        .map(|rank| {
            let store = store.clone();
            std::thread::spawn(move || -> Result<_> {
                let state = ParallelState::init_with_store(store, tp * pp, rank, rank)?;
                state.initialize_model_parallel(tp, pp, None)?;
                generate(&state)
            })
        })
        .collect();
    let mut results: Vec<_> =
        ranks.into_iter().map(|h| h.join().expect("rank thread panicked")).collect::<Result<_>>()?;
    check(results.remove(0).expect("rank 0 returns the result"), tp, pp)
}
