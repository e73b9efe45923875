//! A small decoder-only transformer, written once for any tensor-parallel
//! degree.
//!
//! Terms: `tp` is the tensor-parallel degree and `tp_rank` this rank's
//! position among those ranks. Every weight exists once as a full matrix,
//! generated from the seed; a rank keeps only its shard:
//!
//! - column-parallel: the rank keeps a block of output columns, so its output
//!   is a block of columns and needs no communication (QKV, MLP up, LM head);
//! - row-parallel: the rank keeps the matching block of input rows, so its
//!   output is a partial sum over its rows, and the ranks all-reduce
//!   (attention output, MLP down);
//! - vocab-parallel embedding: the rank keeps a block of the vocabulary; ids
//!   outside it give zero rows, and an all-reduce fills them in.
//!
//! With `tp == 1` the same code is the single-process model: the shards are
//! the full matrices and every reduction is the identity. Layers talk to their
//! group through [`Tp`], a [`ProcessGroup`] (the library's backend seam), so
//! the same structs run over the TP group of a real job, over ranks as
//! threads in a test, or over a group of one.

use super::worker::{Op, OpTimes};
use ndarray::{concatenate, s, Array1, Array2, ArrayView2, Axis};
use rankweave::backend::tcp::InProcessFactory;
use rankweave::coordinator::DeviceGroup;
use rankweave::tensor::{Device, Tensor};
use rankweave::{DType, Error, GroupOptions, HashStore, ProcessGroup, ReduceOp};
use std::ops::Range;
use std::sync::Arc;

/// Model hyper-parameters. Every rank builds the same value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    /// Vocabulary size.
    pub vocab: usize,
    /// Hidden (model) width.
    pub hidden: usize,
    /// Attention heads; `hidden` must divide by it.
    pub heads: usize,
    /// Decoder layers.
    pub layers: usize,
    /// MLP inner width.
    pub ffn: usize,
    /// Seed of every weight and of the prompt.
    pub seed: u64,
}

impl ModelConfig {
    /// Width of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Checks that the model splits evenly over `tp` x `pp` ranks.
    pub fn validate(&self, tp: usize, pp: usize) -> Result<(), String> {
        let mut bad = Vec::new();
        if tp == 0 || pp == 0 {
            bad.push(format!("tp ({tp}) and pp ({pp}) must be at least 1"));
            return Err(bad.join("; "));
        }
        if self.vocab == 0 || self.hidden == 0 || self.heads == 0 || self.layers == 0 || self.ffn == 0 {
            bad.push("vocab, hidden, heads, layers and ffn must all be at least 1".to_string());
        }
        if self.heads != 0 && self.hidden % self.heads != 0 {
            bad.push(format!("hidden ({}) must divide by heads ({})", self.hidden, self.heads));
        }
        if self.heads != 0 && self.hidden % self.heads == 0 && self.head_dim() % 2 != 0 {
            bad.push(format!("head_dim = hidden / heads ({}) must be even for rotary embeddings", self.head_dim()));
        }
        if self.heads % tp != 0 {
            bad.push(format!("heads ({}) must divide by tp ({tp})", self.heads));
        }
        if self.vocab % tp != 0 {
            bad.push(format!("vocab ({}) must divide by tp ({tp})", self.vocab));
        }
        if self.ffn % tp != 0 {
            bad.push(format!("ffn ({}) must divide by tp ({tp})", self.ffn));
        }
        if self.layers < pp {
            bad.push(format!("layers ({}) must be at least pp ({pp})", self.layers));
        }
        if bad.is_empty() {
            Ok(())
        } else {
            Err(bad.join("; "))
        }
    }
}

/// The layers a pipeline stage owns: an even split, the first stages taking
/// one more when `layers` does not divide by `pp`.
pub fn stage_layers(layers: usize, pp: usize, stage: usize) -> Range<usize> {
    let base = layers / pp;
    let extra = layers % pp;
    let start = stage * base + stage.min(extra);
    let len = base + usize::from(stage < extra);
    start..start + len
}

/// The contiguous block `rank` of `size` equal blocks of `0..n`.
pub fn block(n: usize, rank: usize, size: usize) -> Range<usize> {
    let len = n / size;
    rank * len..(rank + 1) * len
}

/// How a layer reaches the other ranks of its tensor-parallel group: the
/// group itself, with the time of its collectives charged to an [`OpTimes`].
///
/// `all_reduce` sums element-wise over the group; `all_gather_cols`
/// concatenates the ranks' matrices along the last axis in rank order.
///
/// On a device group (`--device cuda`) each collective copies the matrix
/// to the device, runs there and copies the result back: the layers' math
/// stays on the CPU, the traffic goes through the device group.
#[derive(Clone)]
pub struct Tp {
    group: DeviceGroup,
    times: Arc<OpTimes>,
}

impl Tp {
    /// The layers' view of `group`, timing into `times`.
    pub fn new(group: ProcessGroup, times: Arc<OpTimes>) -> Tp {
        Tp { group: DeviceGroup::Cpu(group), times }
    }

    /// The layers' view of a coordinator's device group (CPU or NCCL).
    pub fn on_device_group(group: DeviceGroup, times: Arc<OpTimes>) -> Tp {
        Tp { group, times }
    }

    /// Where the group's collectives run.
    pub fn device(&self) -> Device {
        self.group.device()
    }

    /// A group of one (the single-process model): every collective is the
    /// identity, short-circuited by the group.
    pub fn single() -> Result<Tp, Error> {
        let store = Arc::new(HashStore::new());
        let group =
            ProcessGroup::new_world_with(Arc::new(InProcessFactory::default()), store, 0, 1, GroupOptions::builtin())?;
        Ok(Tp::new(group, Arc::new(OpTimes::default())))
    }

    /// This rank's position in the tensor-parallel group.
    pub fn rank(&self) -> usize {
        self.group.rank()
    }

    /// Tensor-parallel degree.
    pub fn size(&self) -> usize {
        self.group.size()
    }

    /// Element-wise sum over the group.
    pub fn all_reduce(&self, x: Array2<f32>) -> Result<Array2<f32>, Error> {
        let mut x = x.as_standard_layout().into_owned();
        let buf = x.as_slice_mut().ok_or_else(|| Error::invalid("all_reduce: matrix is not contiguous"))?;
        if let Some(pg) = self.group.as_process_group() {
            self.times.time(Op::AllReduce, || pg.all_reduce(buf, ReduceOp::Sum))?;
        } else {
            let mut t = Tensor::vec1(&*buf).to_device(self.device())?;
            self.times.time(Op::AllReduce, || self.group.all_reduce(&mut t, ReduceOp::Sum))?;
            buf.copy_from_slice(t.to_device(Device::Cpu)?.as_slice::<f32>()?);
        }
        Ok(x)
    }

    /// Concatenation along the last axis in rank order.
    pub fn all_gather_cols(&self, x: Array2<f32>) -> Result<Array2<f32>, Error> {
        let x = x.as_standard_layout().into_owned();
        let input = x.as_slice().ok_or_else(|| Error::invalid("all_gather: matrix is not contiguous"))?;
        let mut out = vec![0f32; input.len() * self.size()];
        if let Some(pg) = self.group.as_process_group() {
            self.times.time(Op::AllGather, || pg.all_gather(input, &mut out))?;
        } else {
            let t = Tensor::vec1(input).to_device(self.device())?;
            let mut all = Tensor::zeros_on([self.size(), input.len()], DType::F32, self.device())?;
            self.times.time(Op::AllGather, || self.group.all_gather(&t, &mut all))?;
            out.copy_from_slice(all.to_device(Device::Cpu)?.as_slice::<f32>()?);
        }
        let shape = x.dim();
        let blocks = out
            .chunks(input.len().max(1))
            .take(self.size())
            .map(|c| ArrayView2::from_shape(shape, c))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| Error::invalid(format!("all_gather: {e}")))?;
        concatenate(Axis(1), &blocks).map_err(|e| Error::invalid(format!("all_gather: {e}")))
    }
}

/// splitmix64 (Steele, Lea, Flood 2014): a tiny, well-mixed generator whose
/// output depends only on the seed, so every rank regenerates identical weights.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator for the tensor named by (`seed`, `layer`, `kind`).
    pub fn for_tensor(seed: u64, layer: u64, kind: u64) -> Self {
        let mut g = SplitMix64(seed);
        let a = g.next_u64();
        let mut g = SplitMix64(a ^ layer.wrapping_mul(0xA076_1D64_78BD_642F));
        let b = g.next_u64();
        SplitMix64(b ^ kind.wrapping_mul(0xE703_7ED1_A0B4_28DB))
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[-1, 1)`, from the top 24 bits.
    pub fn next_unit(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32) * (2.0 / (1u64 << 24) as f32) - 1.0
    }
}

/// Which tensor a generator belongs to (part of its seed).
#[derive(Debug, Clone, Copy)]
#[repr(u64)]
enum Kind {
    Embed = 1,
    Qkv = 2,
    Out = 3,
    Up = 4,
    Down = 5,
    AttnNorm = 6,
    MlpNorm = 7,
    FinalNorm = 8,
    LmHead = 9,
    Prompt = 10,
}

/// A `rows` x `cols` matrix, uniform in `[-scale, scale)`.
fn gen_matrix(cfg: &ModelConfig, layer: usize, kind: Kind, rows: usize, cols: usize, scale: f32) -> Array2<f32> {
    let mut g = SplitMix64::for_tensor(cfg.seed, layer as u64, kind as u64);
    Array2::from_shape_simple_fn((rows, cols), || g.next_unit() * scale)
}

/// RMSNorm gains near one.
fn gen_gain(cfg: &ModelConfig, layer: usize, kind: Kind) -> Array1<f32> {
    let mut g = SplitMix64::for_tensor(cfg.seed, layer as u64, kind as u64);
    Array1::from_shape_simple_fn(cfg.hidden, || 1.0 + 0.1 * g.next_unit())
}

/// Uniform initialisation with the variance of a unit Gaussian over `fan_in`.
fn init_scale(fan_in: usize) -> f32 {
    (3.0 / fan_in as f32).sqrt()
}

/// The prompt: `len` token ids drawn from the seed.
pub fn prompt(cfg: &ModelConfig, len: usize) -> Vec<i64> {
    prompt_of(cfg, len, 0)
}

/// The prompt of sequence `seq` (sequence 0's is [`prompt`]).
pub fn prompt_of(cfg: &ModelConfig, len: usize, seq: usize) -> Vec<i64> {
    let mut g = SplitMix64::for_tensor(cfg.seed, seq as u64, Kind::Prompt as u64);
    (0..len).map(|_| (g.next_u64() % cfg.vocab as u64) as i64).collect()
}

/// Element `i` of the greatest value (the first one on ties).
pub fn argmax(xs: &[f32]) -> usize {
    let mut best = 0;
    for (i, &x) in xs.iter().enumerate() {
        if x > xs[best] {
            best = i;
        }
    }
    best
}

/// Root-mean-square normalisation with a learned gain, row by row.
#[derive(Debug)]
pub struct RmsNorm {
    gain: Array1<f32>,
    eps: f32,
}

impl RmsNorm {
    /// Normalises every row of `x`.
    pub fn forward(&self, x: &Array2<f32>) -> Array2<f32> {
        let mut y = x.clone();
        for mut row in y.rows_mut() {
            let ms = row.dot(&row) / row.len() as f32;
            let inv = 1.0 / (ms + self.eps).sqrt();
            row *= inv;
            row *= &self.gain;
        }
        y
    }
}

/// Embedding whose vocabulary is split over the TP ranks.
pub struct VocabParallelEmbedding {
    /// Rows `vocab_range` of the full table.
    weight: Array2<f32>,
    vocab_range: Range<usize>,
    tp: Tp,
}

impl VocabParallelEmbedding {
    /// This rank's shard of the embedding table.
    pub fn new(cfg: &ModelConfig, tp: Tp) -> Self {
        let full = gen_matrix(cfg, 0, Kind::Embed, cfg.vocab, cfg.hidden, 1.0);
        let vocab_range = block(cfg.vocab, tp.rank(), tp.size());
        let weight = full.slice(s![vocab_range.clone(), ..]).to_owned();
        VocabParallelEmbedding { weight, vocab_range, tp }
    }

    /// One row per id: the local rows where the id is in this shard, zeros
    /// elsewhere, then a sum over the group (exact: one rank is non-zero).
    pub fn forward(&self, ids: &[i64]) -> Result<Array2<f32>, rankweave::Error> {
        let mut out = Array2::<f32>::zeros((ids.len(), self.weight.ncols()));
        for (i, &id) in ids.iter().enumerate() {
            let id = usize::try_from(id).map_err(|_| rankweave::Error::invalid(format!("token id {id} < 0")))?;
            if self.vocab_range.contains(&id) {
                out.row_mut(i).assign(&self.weight.row(id - self.vocab_range.start));
            }
        }
        self.tp.all_reduce(out)
    }
}

/// Keys and values of the past positions, for this rank's heads.
#[derive(Debug)]
pub struct KvCache {
    k: Array2<f32>,
    v: Array2<f32>,
    len: usize,
}

impl KvCache {
    fn new(capacity: usize, width: usize) -> Self {
        KvCache { k: Array2::zeros((capacity, width)), v: Array2::zeros((capacity, width)), len: 0 }
    }
}

/// Rotates each (even, odd) pair of a head's dimensions by the position times
/// that pair's frequency (rotary position embedding).
fn apply_rotary(x: &mut Array2<f32>, positions: &[i64], head_dim: usize) {
    let half = head_dim / 2;
    let freqs: Vec<f32> = (0..half).map(|i| 10000f32.powf(-(2.0 * i as f32) / head_dim as f32)).collect();
    for (mut row, &pos) in x.rows_mut().into_iter().zip(positions) {
        let cols = row.len();
        for base in (0..cols).step_by(head_dim) {
            for (i, f) in freqs.iter().enumerate() {
                let (sin, cos) = (pos as f32 * f).sin_cos();
                let (a, b) = (row[base + 2 * i], row[base + 2 * i + 1]);
                row[base + 2 * i] = a * cos - b * sin;
                row[base + 2 * i + 1] = a * sin + b * cos;
            }
        }
    }
}

/// Row-wise softmax in place.
fn softmax_rows(x: &mut Array2<f32>) {
    for mut row in x.rows_mut() {
        let max = row.fold(f32::NEG_INFINITY, |m, &v| m.max(v));
        row.mapv_inplace(|v| (v - max).exp());
        let sum = row.sum();
        row /= sum;
    }
}

/// Causal self-attention with this rank's heads: QKV column-parallel (by
/// head), output projection row-parallel, one all-reduce.
pub struct Attention {
    /// `[hidden, 3 * local_heads * head_dim]`: this rank's Q, then K, then V columns.
    wqkv: Array2<f32>,
    /// `[local_heads * head_dim, hidden]`: the rows for this rank's heads.
    wo: Array2<f32>,
    local_heads: usize,
    head_dim: usize,
    /// One cache per sequence in flight.
    caches: Vec<KvCache>,
    tp: Tp,
}

impl Attention {
    /// This rank's shard of layer `layer`'s attention, with a cache of
    /// `max_seq` positions for each of `sequences` sequences.
    pub fn new(cfg: &ModelConfig, layer: usize, max_seq: usize, sequences: usize, tp: Tp) -> Self {
        let h = cfg.hidden;
        let full_qkv = gen_matrix(cfg, layer, Kind::Qkv, h, 3 * h, init_scale(h));
        let full_wo = gen_matrix(cfg, layer, Kind::Out, h, h, init_scale(h));
        let local_heads = cfg.heads / tp.size();
        let cols = block(h, tp.rank(), tp.size());
        let parts: Vec<ArrayView2<f32>> =
            (0..3).map(|p| full_qkv.slice(s![.., p * h + cols.start..p * h + cols.end])).collect();
        let wqkv = concatenate(Axis(1), &parts).expect("equal row counts");
        let wo = full_wo.slice(s![cols.clone(), ..]).to_owned();
        let caches = (0..sequences.max(1)).map(|_| KvCache::new(max_seq, cols.len())).collect();
        Attention { wqkv, wo, local_heads, head_dim: cfg.head_dim(), caches, tp }
    }

    /// Attends the new rows `x` of sequence `seq` (at `positions`, which
    /// continue that sequence's cache) to every cached position up to their own.
    pub fn forward(&mut self, x: &Array2<f32>, positions: &[i64], seq: usize) -> Result<Array2<f32>, rankweave::Error> {
        let t = x.nrows();
        let w = self.local_heads * self.head_dim;
        let n_caches = self.caches.len();
        let cache = self.caches.get_mut(seq).ok_or_else(|| {
            rankweave::Error::invalid(format!("sequence {seq} out of range: the stage holds {n_caches} caches"))
        })?;
        let start = cache.len;
        let end = start + t;
        if positions.len() != t || positions.iter().enumerate().any(|(i, &p)| p != (start + i) as i64) {
            return Err(rankweave::Error::invalid(format!(
                "positions {positions:?} do not continue the KV cache at {start}"
            )));
        }
        if end > cache.k.nrows() {
            return Err(rankweave::Error::invalid(format!(
                "KV cache holds {} positions; {end} requested",
                cache.k.nrows()
            )));
        }
        let qkv = x.dot(&self.wqkv);
        let mut q = qkv.slice(s![.., 0..w]).to_owned();
        let mut k = qkv.slice(s![.., w..2 * w]).to_owned();
        apply_rotary(&mut q, positions, self.head_dim);
        apply_rotary(&mut k, positions, self.head_dim);
        cache.k.slice_mut(s![start..end, ..]).assign(&k);
        cache.v.slice_mut(s![start..end, ..]).assign(&qkv.slice(s![.., 2 * w..3 * w]));
        cache.len = end;

        let scale = 1.0 / (self.head_dim as f32).sqrt();
        let mut out = Array2::<f32>::zeros((t, w));
        for head in 0..self.local_heads {
            let cols = head * self.head_dim..(head + 1) * self.head_dim;
            let qh = q.slice(s![.., cols.clone()]);
            let kh = cache.k.slice(s![..end, cols.clone()]);
            let vh = cache.v.slice(s![..end, cols.clone()]);
            let mut scores = qh.dot(&kh.t()) * scale;
            for (i, mut row) in scores.rows_mut().into_iter().enumerate() {
                row.slice_mut(s![start + i + 1..]).fill(f32::NEG_INFINITY);
            }
            softmax_rows(&mut scores);
            out.slice_mut(s![.., cols]).assign(&scores.dot(&vh));
        }
        self.tp.all_reduce(out.dot(&self.wo))
    }
}

/// SiLU MLP: up projection column-parallel, down projection row-parallel,
/// one all-reduce.
pub struct Mlp {
    /// `[hidden, ffn / tp]`.
    up: Array2<f32>,
    /// `[ffn / tp, hidden]`.
    down: Array2<f32>,
    tp: Tp,
}

impl Mlp {
    /// This rank's shard of layer `layer`'s MLP.
    pub fn new(cfg: &ModelConfig, layer: usize, tp: Tp) -> Self {
        let cols = block(cfg.ffn, tp.rank(), tp.size());
        let up = gen_matrix(cfg, layer, Kind::Up, cfg.hidden, cfg.ffn, init_scale(cfg.hidden));
        let down = gen_matrix(cfg, layer, Kind::Down, cfg.ffn, cfg.hidden, init_scale(cfg.ffn));
        Mlp { up: up.slice(s![.., cols.clone()]).to_owned(), down: down.slice(s![cols, ..]).to_owned(), tp }
    }

    /// `down(silu(up(x)))`, summed over the group.
    pub fn forward(&self, x: &Array2<f32>) -> Result<Array2<f32>, rankweave::Error> {
        let mut a = x.dot(&self.up);
        a.mapv_inplace(|v| v / (1.0 + (-v).exp()));
        self.tp.all_reduce(a.dot(&self.down))
    }
}

/// Pre-norm decoder layer: `x + attn(norm(x))`, then `x + mlp(norm(x))`.
pub struct DecoderLayer {
    attn_norm: RmsNorm,
    attn: Attention,
    mlp_norm: RmsNorm,
    mlp: Mlp,
}

impl DecoderLayer {
    /// This rank's shard of layer `layer`.
    pub fn new(cfg: &ModelConfig, layer: usize, max_seq: usize, sequences: usize, tp: Tp) -> Self {
        DecoderLayer {
            attn_norm: RmsNorm { gain: gen_gain(cfg, layer, Kind::AttnNorm), eps: 1e-5 },
            attn: Attention::new(cfg, layer, max_seq, sequences, tp.clone()),
            mlp_norm: RmsNorm { gain: gen_gain(cfg, layer, Kind::MlpNorm), eps: 1e-5 },
            mlp: Mlp::new(cfg, layer, tp),
        }
    }

    /// Runs the layer on the new rows `x` of sequence `seq`.
    pub fn forward(&mut self, x: Array2<f32>, positions: &[i64], seq: usize) -> Result<Array2<f32>, rankweave::Error> {
        let h = &x + &self.attn.forward(&self.attn_norm.forward(&x), positions, seq)?;
        let out = &h + &self.mlp.forward(&self.mlp_norm.forward(&h))?;
        Ok(out)
    }
}

/// Final norm and the LM head, vocab-parallel, with an all-gather of the
/// logits.
pub struct LmHead {
    norm: RmsNorm,
    /// `[hidden, vocab / tp]`.
    weight: Array2<f32>,
    tp: Tp,
}

impl LmHead {
    /// This rank's shard of the LM head.
    pub fn new(cfg: &ModelConfig, tp: Tp) -> Self {
        let cols = block(cfg.vocab, tp.rank(), tp.size());
        let full = gen_matrix(cfg, cfg.layers, Kind::LmHead, cfg.hidden, cfg.vocab, init_scale(cfg.hidden));
        LmHead {
            norm: RmsNorm { gain: gen_gain(cfg, cfg.layers, Kind::FinalNorm), eps: 1e-5 },
            weight: full.slice(s![.., cols]).to_owned(),
            tp,
        }
    }

    /// Full-vocabulary logits of the last row of `x`, on every rank of the group.
    pub fn forward(&self, x: &Array2<f32>) -> Result<Vec<f32>, rankweave::Error> {
        let last = x.slice(s![x.nrows() - 1.., ..]).to_owned();
        let local = self.norm.forward(&last).dot(&self.weight);
        let full = self.tp.all_gather_cols(local)?;
        Ok(full.into_iter().collect())
    }
}

/// What one pipeline stage holds: the embedding on the first stage, its
/// layers, the LM head on the last stage.
pub struct Stage {
    /// Present on the first stage.
    pub embed: Option<VocabParallelEmbedding>,
    /// This stage's layers, in order.
    pub layers: Vec<DecoderLayer>,
    /// Present on the last stage.
    pub head: Option<LmHead>,
}

impl Stage {
    /// This rank's part of the model: stage `stage` of `pp`, TP shard from
    /// `tp`, with KV caches for `sequences` sequences of up to `max_seq`
    /// positions (the weights are shared by all of them).
    pub fn new(cfg: &ModelConfig, pp: usize, stage: usize, max_seq: usize, sequences: usize, tp: Tp) -> Self {
        let range = stage_layers(cfg.layers, pp, stage);
        Stage {
            embed: (stage == 0).then(|| VocabParallelEmbedding::new(cfg, tp.clone())),
            layers: range.map(|l| DecoderLayer::new(cfg, l, max_seq, sequences, tp.clone())).collect(),
            head: (stage + 1 == pp).then(|| LmHead::new(cfg, tp.clone())),
        }
    }

    /// Runs this stage's layers on `hidden`, the new rows of sequence `seq`.
    pub fn run_layers(
        &mut self,
        mut hidden: Array2<f32>,
        positions: &[i64],
        seq: usize,
    ) -> Result<Array2<f32>, rankweave::Error> {
        for layer in &mut self.layers {
            hidden = layer.forward(hidden, positions, seq)?;
        }
        Ok(hidden)
    }
}

/// The result of greedy decoding.
#[derive(Debug, Clone, PartialEq)]
pub struct Generation {
    /// The generated token ids (not the prompt).
    pub tokens: Vec<i64>,
    /// The full logits of every step (the step's last position).
    pub logits: Vec<Vec<f32>>,
}

/// The step inputs: the prompt first, then one token at a time.
pub fn step_inputs(prompt: &[i64], generated: &[i64]) -> (Vec<i64>, Vec<i64>) {
    if generated.is_empty() {
        (prompt.to_vec(), (0..prompt.len() as i64).collect())
    } else {
        let pos = (prompt.len() + generated.len() - 1) as i64;
        (vec![*generated.last().expect("non-empty")], vec![pos])
    }
}

/// The single-process model: greedy decoding of `tokens` tokens after `prompt`.
pub fn generate_single(cfg: &ModelConfig, prompt: &[i64], tokens: usize) -> Result<Generation, rankweave::Error> {
    let mut stage = Stage::new(cfg, 1, 0, prompt.len() + tokens, 1, Tp::single()?);
    let mut out = Generation { tokens: Vec::new(), logits: Vec::new() };
    for _ in 0..tokens {
        let (ids, positions) = step_inputs(prompt, &out.tokens);
        let hidden = stage.embed.as_ref().expect("single stage has the embedding").forward(&ids)?;
        let hidden = stage.run_layers(hidden, &positions, 0)?;
        let logits = stage.head.as_ref().expect("single stage has the head").forward(&hidden)?;
        out.tokens.push(argmax(&logits) as i64);
        out.logits.push(logits);
    }
    Ok(out)
}

/// Largest absolute element difference over all steps (infinite when the
/// shapes differ).
pub fn max_abs_diff(a: &[Vec<f32>], b: &[Vec<f32>]) -> f32 {
    if a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.len() != y.len()) {
        return f32::INFINITY;
    }
    a.iter().zip(b).flat_map(|(x, y)| x.iter().zip(y).map(|(p, q)| (p - q).abs())).fold(0.0, f32::max)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn tiny() -> ModelConfig {
        ModelConfig { vocab: 96, hidden: 32, heads: 4, layers: 3, ffn: 64, seed: 7 }
    }

    /// The `tp` groups of one stage: ranks as threads on the in-process
    /// backend, each building its part of the stage.
    fn stage_ranks(cfg: &ModelConfig, tp: usize, pp: usize, stage: usize, max_seq: usize) -> Vec<Stage> {
        let factory: Arc<dyn rankweave::group::BackendFactory> = Arc::new(InProcessFactory::default());
        let store: rankweave::SharedStore = Arc::new(HashStore::new());
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..tp)
                .map(|rank| {
                    let (factory, store) = (factory.clone(), store.clone());
                    s.spawn(move || {
                        let group =
                            ProcessGroup::new_world_with(factory, store, rank, tp, GroupOptions::builtin()).unwrap();
                        Stage::new(cfg, pp, stage, max_seq, 1, Tp::new(group, Arc::default()))
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    /// Runs the sharded model: `tp` threads per stage, the stages one after
    /// another in each step (the hidden state handed over in memory).
    fn generate_sharded(cfg: &ModelConfig, tp: usize, pp: usize, prompt: &[i64], tokens: usize) -> Generation {
        let max_seq = prompt.len() + tokens;
        let stages: Vec<Vec<Stage>> = (0..pp).map(|stage| stage_ranks(cfg, tp, pp, stage, max_seq)).collect();
        let stages: Vec<Vec<Mutex<Stage>>> =
            stages.into_iter().map(|s| s.into_iter().map(Mutex::new).collect()).collect();
        let mut out = Generation { tokens: Vec::new(), logits: Vec::new() };
        for _ in 0..tokens {
            let (ids, positions) = step_inputs(prompt, &out.tokens);
            // Each TP rank of a stage receives the same hidden state; the
            // stage's ranks must agree on their output.
            let mut hidden: Option<Array2<f32>> = None;
            let mut logits = None;
            for ranks in &stages {
                let results: Vec<(Array2<f32>, Option<Vec<f32>>)> = std::thread::scope(|s| {
                    let handles: Vec<_> = ranks
                        .iter()
                        .map(|st| {
                            let (ids, positions, hidden) = (&ids, &positions, hidden.clone());
                            s.spawn(move || {
                                let mut st = st.lock().unwrap();
                                let h = match hidden {
                                    Some(h) => h,
                                    None => st.embed.as_ref().unwrap().forward(ids).unwrap(),
                                };
                                let h = st.run_layers(h, positions, 0).unwrap();
                                let l = st.head.as_ref().map(|hd| hd.forward(&h).unwrap());
                                (h, l)
                            })
                        })
                        .collect();
                    handles.into_iter().map(|h| h.join().unwrap()).collect()
                });
                for (h, _) in &results[1..] {
                    assert_eq!(h, &results[0].0, "TP ranks of a stage disagree on the hidden state");
                }
                logits = results[0].1.clone();
                hidden = Some(results.into_iter().next().unwrap().0);
            }
            let logits = logits.expect("last stage has the head");
            out.tokens.push(argmax(&logits) as i64);
            out.logits.push(logits);
        }
        out
    }

    #[test]
    fn interleaved_sequences_keep_their_own_caches() {
        let cfg = tiny();
        let (len, tokens, n) = (5, 4, 3);
        let prompts: Vec<Vec<i64>> = (0..n).map(|s| prompt_of(&cfg, len, s)).collect();
        assert_eq!(prompts[0], prompt(&cfg, len));
        assert_ne!(prompts[0], prompts[1]);
        let mut stage = Stage::new(&cfg, 1, 0, len + tokens, n, Tp::single().unwrap());
        let mut outs: Vec<Generation> = (0..n).map(|_| Generation { tokens: vec![], logits: vec![] }).collect();
        for _ in 0..tokens {
            for (s, p) in prompts.iter().enumerate() {
                let (ids, positions) = step_inputs(p, &outs[s].tokens);
                let h = stage.embed.as_ref().unwrap().forward(&ids).unwrap();
                let h = stage.run_layers(h, &positions, s).unwrap();
                let logits = stage.head.as_ref().unwrap().forward(&h).unwrap();
                outs[s].tokens.push(argmax(&logits) as i64);
                outs[s].logits.push(logits);
            }
        }
        for (s, p) in prompts.iter().enumerate() {
            assert_eq!(outs[s], generate_single(&cfg, p, tokens).unwrap(), "sequence {s}");
        }
        // A sequence the stage holds no cache for is an error, not a panic.
        let h = stage.embed.as_ref().unwrap().forward(&[1]).unwrap();
        let e = stage.run_layers(h, &[0], n).unwrap_err().to_string();
        assert!(e.contains("sequence 3 out of range"), "{e}");
    }

    #[test]
    fn splitmix_is_deterministic_and_in_range() {
        let mut a = SplitMix64::for_tensor(1, 2, 3);
        let mut b = SplitMix64::for_tensor(1, 2, 3);
        let mut c = SplitMix64::for_tensor(1, 2, 4);
        let xs: Vec<f32> = (0..1000).map(|_| a.next_unit()).collect();
        let ys: Vec<f32> = (0..1000).map(|_| b.next_unit()).collect();
        let zs: Vec<f32> = (0..1000).map(|_| c.next_unit()).collect();
        assert_eq!(xs, ys);
        assert_ne!(xs, zs);
        assert!(xs.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f32>() / 1000.0;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }

    #[test]
    fn stage_layers_cover_all_layers_in_order() {
        assert_eq!(stage_layers(8, 2, 0), 0..4);
        assert_eq!(stage_layers(8, 2, 1), 4..8);
        assert_eq!(stage_layers(7, 3, 0), 0..3);
        assert_eq!(stage_layers(7, 3, 1), 3..5);
        assert_eq!(stage_layers(7, 3, 2), 5..7);
        assert_eq!(block(12, 2, 3), 8..12);
    }

    #[test]
    fn validate_names_the_problem() {
        let cfg = tiny();
        assert!(cfg.validate(2, 3).is_ok());
        assert!(cfg.validate(4, 1).is_ok());
        let err = cfg.validate(3, 1).unwrap_err();
        assert!(err.contains("heads (4) must divide by tp (3)"), "{err}");
        let err = cfg.validate(1, 4).unwrap_err();
        assert!(err.contains("layers (3) must be at least pp (4)"), "{err}");
        let odd = ModelConfig { hidden: 12, heads: 4, ..cfg };
        assert!(odd.validate(1, 1).unwrap_err().contains("must be even"));
    }

    #[test]
    fn embedding_shards_sum_to_the_full_rows() {
        let cfg = tiny();
        let full = gen_matrix(&cfg, 0, Kind::Embed, cfg.vocab, cfg.hidden, 1.0);
        let ids = [0i64, 95, 40, 47, 48, 3];
        let single = VocabParallelEmbedding::new(&cfg, Tp::single().unwrap()).forward(&ids).unwrap();
        for (i, &id) in ids.iter().enumerate() {
            assert_eq!(single.row(i), full.row(id as usize));
        }
        assert!(VocabParallelEmbedding::new(&cfg, Tp::single().unwrap()).forward(&[-1]).is_err());
    }

    #[test]
    fn single_process_generation_is_deterministic_and_not_degenerate() {
        let cfg = tiny();
        let p = prompt(&cfg, 5);
        assert!(p.iter().all(|&t| (0..cfg.vocab as i64).contains(&t)));
        let a = generate_single(&cfg, &p, 6).unwrap();
        let b = generate_single(&cfg, &p, 6).unwrap();
        assert_eq!(a, b);
        assert_eq!(a.tokens.len(), 6);
        assert_eq!(a.logits[0].len(), cfg.vocab);
        assert!(a.logits.iter().flatten().all(|x| x.is_finite()));
        // The prompt matters.
        let c = generate_single(&cfg, &[1, 2, 3, 4, 5], 6).unwrap();
        assert_ne!(a.logits, c.logits);
    }

    #[test]
    fn cached_decoding_matches_recomputing_the_whole_sequence() {
        // Decoding step by step with the KV cache gives the logits that a
        // fresh prefill of the whole sequence gives at its last position.
        let cfg = tiny();
        let p = prompt(&cfg, 4);
        let g = generate_single(&cfg, &p, 4).unwrap();
        let mut seq = p.clone();
        seq.extend_from_slice(&g.tokens[..3]);
        let again = generate_single(&cfg, &seq, 1).unwrap();
        let diff = max_abs_diff(&again.logits, &g.logits[3..]);
        assert!(diff <= 1e-4, "max abs diff {diff}");
    }

    #[test]
    fn sharded_model_matches_single_process() {
        let cfg = tiny();
        let p = prompt(&cfg, 5);
        let reference = generate_single(&cfg, &p, 5).unwrap();
        for (tp, pp) in [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (4, 3)] {
            let got = generate_sharded(&cfg, tp, pp, &p, 5);
            assert_eq!(got.tokens, reference.tokens, "tp {tp} pp {pp}");
            let diff = max_abs_diff(&got.logits, &reference.logits);
            assert!(diff <= 1e-4, "tp {tp} pp {pp}: max abs diff {diff}");
            if tp == 1 {
                assert_eq!(diff, 0.0, "tp 1 pp {pp} does the same arithmetic");
            }
        }
    }
}
