//! One rank of `rankweave demo`.
//!
//! Each decoding step:
//!
//! 1. rank 0 broadcasts the step's inputs (token ids, positions) to the world
//!    with `broadcast_tensor_dict`;
//! 2. the first pipeline stage embeds the ids (vocab-parallel, one TP
//!    all-reduce); every other stage receives the hidden state from the
//!    previous stage with `recv_tensor_dict`, each TP rank receiving a 1/tp
//!    slice and all-gathering the rest inside its TP group;
//! 3. the stage runs its layers (two TP all-reduces per layer) and, unless it
//!    is the last, sends the hidden state on with `send_tensor_dict`;
//! 4. the last stage computes the logits (vocab-parallel LM head and a TP
//!    all-gather) and picks the next token; with more than one stage it sends
//!    token and logits round the pipeline ring to the first stage.
//!
//! Every communication call is timed (the TP collectives inside
//! [`model::Tp`], the coordinator calls here), so the report can say what
//! share of the decoding time each communication operation took.

use super::model::{self, argmax, Generation, ModelConfig, Stage, Tp};
use super::DemoArgs;
use ndarray::Array2;
use rankweave::coordinator::GroupCoordinator;
use rankweave::parallel_state;
use rankweave::tensor::{Device, Tensor, TensorDict};
use rankweave::{Error, Result};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The communication operations the report breaks time down into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// TP all-reduce (embedding, attention output, MLP down).
    AllReduce,
    /// TP all-gather of the logits.
    AllGather,
    /// World broadcast of each step's inputs.
    Broadcast,
    /// Pipeline send of hidden states, tokens and logits.
    SendDict,
    /// Pipeline receive (includes waiting for the previous stage to compute).
    RecvDict,
}

impl Op {
    /// Every op, in report order.
    pub const ALL: [Op; 5] = [Op::AllReduce, Op::AllGather, Op::Broadcast, Op::SendDict, Op::RecvDict];

    /// The column title.
    pub fn name(self) -> &'static str {
        match self {
            Op::AllReduce => "all_reduce",
            Op::AllGather => "all_gather",
            Op::Broadcast => "broadcast_tensor_dict",
            Op::SendDict => "send_tensor_dict",
            Op::RecvDict => "recv_tensor_dict",
        }
    }
}

/// Time and calls per operation on this rank.
#[derive(Debug, Default)]
pub struct OpTimes {
    totals: Mutex<[(Duration, u64); 5]>,
}

impl OpTimes {
    /// Runs `f`, charging its wall time to `op`.
    pub fn time<T>(&self, op: Op, f: impl FnOnce() -> T) -> T {
        let start = Instant::now();
        let out = f();
        let spent = start.elapsed();
        let mut t = self.totals.lock().unwrap_or_else(|p| p.into_inner());
        let slot = &mut t[Op::ALL.iter().position(|o| *o == op).unwrap_or(0)];
        slot.0 += spent;
        slot.1 += 1;
        out
    }

    /// Seconds and call counts, in [`Op::ALL`] order.
    pub fn snapshot(&self) -> [(Duration, u64); 5] {
        *self.totals.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Forgets everything timed so far.
    pub fn reset(&self) {
        *self.totals.lock().unwrap_or_else(|p| p.into_inner()) = Default::default();
    }
}

/// A row-major `[rows, cols]` f32 tensor from a matrix.
pub fn to_tensor(x: &Array2<f32>) -> Result<Tensor> {
    Tensor::from_vec(x.iter().copied().collect::<Vec<f32>>(), vec![x.nrows(), x.ncols()])
}

/// The matrix inside a 2-D f32 tensor.
pub fn to_array(t: &Tensor) -> Result<Array2<f32>> {
    let &[rows, cols] = t.shape() else {
        return Err(Error::invalid(format!("expected a 2-D tensor, got shape {:?}", t.shape())));
    };
    Array2::from_shape_vec((rows, cols), t.to_vec::<f32>()?)
        .map_err(|e| Error::invalid(format!("tensor of shape {:?}: {e}", t.shape())))
}

fn get_tensor<'a>(dict: &'a TensorDict, key: &str) -> Result<&'a Tensor> {
    dict.get_tensor(key).ok_or_else(|| Error::invalid(format!("tensor dict has no tensor {key:?}")))
}

/// The dict a group of more than one receives (a group of one gets `None`).
fn expect_dict(got: Option<TensorDict>) -> Result<TensorDict> {
    got.ok_or_else(|| Error::invalid("recv_tensor_dict returned nothing in a group of more than one rank"))
}

/// What rank 0 reports: the run's numbers on every rank.
struct RankReport {
    rank: usize,
    times: [(Duration, u64); 5],
    wall: Duration,
}

/// Runs one worker; returns its exit code.
pub fn run(args: &DemoArgs, backend: parallel_state::Backend) -> Result<i32> {
    let cfg = args.model();
    parallel_state::init_distributed_environment(-1, -1, "env://", -1, backend.name())?;
    let world = parallel_state::get_world_group()?.world_size();
    let result = if world == args.tp * args.pp {
        run_initialized(args, &cfg, backend)
    } else {
        Err(rankweave::Error::invalid(format!(
            "the world has {world} ranks, the demo needs tp ({}) x pp ({}) = {} (mpirun -n {})",
            args.tp,
            args.pp,
            args.tp * args.pp,
            args.tp * args.pp
        )))
    };
    parallel_state::destroy_model_parallel();
    parallel_state::destroy_distributed_environment();
    result
}

fn run_initialized(args: &DemoArgs, cfg: &ModelConfig, backend: parallel_state::Backend) -> Result<i32> {
    parallel_state::initialize_model_parallel(args.tp, args.pp, Some(backend.name()))?;
    let world = parallel_state::get_world_group()?;
    let tp = parallel_state::get_tp_group()?;
    let pp = parallel_state::get_pp_group()?;
    let rank = world.rank_in_group();
    let stage_idx = pp.rank_in_group();
    let (first, last) = (pp.is_first_rank(), pp.is_last_rank());
    let layers = model::stage_layers(cfg.layers, args.pp, stage_idx);
    println!(
        "rank {rank}: tp group {:?} (rank {} in it), pp group {:?} (stage {stage_idx} of {}): layers {}..{}{}{}",
        tp.ranks(),
        tp.rank_in_group(),
        pp.ranks(),
        args.pp,
        layers.start,
        layers.end,
        if first { " + embedding" } else { "" },
        if last { " + LM head" } else { "" },
    );

    let times = Arc::new(OpTimes::default());
    // The layers use the TP group's device group directly (on CPU, the
    // library's backend seam; with --device cuda, NCCL); the coordinator
    // carries the pipeline and the inputs.
    let comm = Tp::on_device_group(tp.device_group()?, times.clone());
    let dev = tp.device();
    if rank == 0 {
        println!("tensor collectives on {dev} ({} backend)", backend.name());
    }
    let prompt = model::prompt(cfg, args.prompt_len);
    let mut stage = Stage::new(cfg, args.pp, stage_idx, args.prompt_len + args.tokens, args.sequences, comm);
    world.barrier()?;
    times.reset();

    if args.sequences > 1 {
        let start = Instant::now();
        let (outs, first_token_at) = decode_pipelined(args, cfg, &mut stage, &tp, &pp, &times)?;
        let wall = start.elapsed();
        return finish(args, cfg, &world, &times, wall, first_token_at, &outs);
    }

    let start = Instant::now();
    let mut first_token_at = Duration::ZERO;
    let mut out = Generation { tokens: Vec::new(), logits: Vec::new() };
    for step in 0..args.tokens {
        // 1. The step's inputs, from rank 0 to everyone.
        let mine = (rank == 0).then(|| inputs_dict(&prompt, &out.tokens)).transpose()?;
        let inputs = times.time(Op::Broadcast, || world.broadcast_tensor_dict(mine.as_ref(), 0))?;
        let ids: Vec<i64> = get_tensor(&inputs, "input_ids")?.to_vec()?;
        let positions: Vec<i64> = get_tensor(&inputs, "positions")?.to_vec()?;

        // 2. This stage's input hidden state.
        let hidden = match &stage.embed {
            Some(embed) => embed.forward(&ids)?,
            None => {
                let got = times.time(Op::RecvDict, || pp.recv_tensor_dict(None, Some(&tp)))?;
                to_array(&get_tensor(&expect_dict(got)?, "hidden")?.clone().to_device(Device::Cpu)?)?
            }
        };

        // 3. This stage's layers.
        let hidden = stage.run_layers(hidden, &positions, 0)?;

        // 4. On to the next stage, or the logits and the next token.
        if let Some(head) = &stage.head {
            let logits = head.forward(&hidden)?;
            let token = argmax(&logits) as i64;
            if args.pp > 1 {
                let dict = token_dict(token, logits.clone())?;
                times.time(Op::SendDict, || pp.send_tensor_dict(&dict, None, Some(&tp)))?;
            }
            out.tokens.push(token);
            out.logits.push(logits);
        } else {
            // On a device group the hidden state travels as a device tensor.
            let dict = TensorDict::new().with("hidden", to_tensor(&hidden)?.to_device(dev)?);
            times.time(Op::SendDict, || pp.send_tensor_dict(&dict, None, Some(&tp)))?;
        }
        if first && !last {
            let got = times.time(Op::RecvDict, || pp.recv_tensor_dict(None, Some(&tp)))?;
            push_token(&mut out, &expect_dict(got)?)?;
        }
        if step == 0 {
            first_token_at = start.elapsed();
        }
    }
    let wall = start.elapsed();
    finish(args, cfg, &world, &times, wall, first_token_at, &[out])
}

/// The step inputs of one sequence as a dict: token ids and positions.
fn inputs_dict(prompt: &[i64], generated: &[i64]) -> Result<TensorDict> {
    let (ids, positions) = model::step_inputs(prompt, generated);
    let n = ids.len();
    Ok(TensorDict::new()
        .with("input_ids", Tensor::from_vec(ids, vec![n])?)
        .with("positions", Tensor::from_vec(positions, vec![n])?))
}

/// What the last stage sends the first: the step's token and logits.
fn token_dict(token: i64, logits: Vec<f32>) -> Result<TensorDict> {
    let n = logits.len();
    Ok(TensorDict::new()
        .with("next_token", Tensor::from_vec(vec![token], vec![1])?)
        .with("logits", Tensor::from_vec(logits, vec![n])?))
}

/// Appends the token and logits of a [`token_dict`] to `out`.
fn push_token(out: &mut Generation, dict: &TensorDict) -> Result<()> {
    let token: Vec<i64> = get_tensor(dict, "next_token")?.to_vec()?;
    let &[token] = token.as_slice() else {
        return Err(Error::invalid(format!("expected one next token, got {token:?}")));
    };
    out.tokens.push(token);
    out.logits.push(get_tensor(dict, "logits")?.to_vec()?);
    Ok(())
}

/// The one-element `seq` tensor of a dict received over `pp` from the
/// previous stage, checked against the sequence this stage expects next
/// (the stages visit them in one order).
fn check_seq(dict: &TensorDict, want: usize, pp: &GroupCoordinator) -> Result<()> {
    let got: Vec<i64> = get_tensor(dict, "seq")?.to_vec()?;
    if got != [want as i64] {
        let (me, n) = (pp.rank_in_group(), pp.world_size());
        return Err(Error::invalid(format!(
            "recv_tensor_dict in group {} on rank {me}: pipeline out of order: expected sequence {want} from rank {}, \
             received {got:?}",
            pp.unique_name(),
            (me + n - 1) % n
        )));
    }
    Ok(())
}

/// Decodes `args.sequences` sequences at once, round robin: the first
/// stage starts step t of sequence s as soon as sequence s's token of step
/// t - 1 has come back round the pipeline, and in the meantime the other
/// stages work on the sequences ahead of it. The inputs go from rank 0 to
/// its TP group only (the other stages learn the positions from the dict
/// they receive), so no call makes every stage wait for every other.
/// Returns every sequence's generation (on the first stage; empty
/// elsewhere) and when the first token of sequence 0 arrived.
fn decode_pipelined(
    args: &DemoArgs,
    cfg: &ModelConfig,
    stage: &mut Stage,
    tp: &GroupCoordinator,
    pp: &GroupCoordinator,
    times: &OpTimes,
) -> Result<(Vec<Generation>, Duration)> {
    let (first, last) = (pp.is_first_rank(), pp.is_last_rank());
    let n = args.sequences;
    let prompts: Vec<Vec<i64>> = (0..n).map(|s| model::prompt_of(cfg, args.prompt_len, s)).collect();
    let mut outs: Vec<Generation> = (0..n).map(|_| Generation { tokens: Vec::new(), logits: Vec::new() }).collect();
    let dev = tp.device();
    let start = Instant::now();
    let mut first_token_at = None;
    let seq_tensor = |s: usize| Tensor::from_vec(vec![s as i64], vec![1]);
    for step in 0..=args.tokens {
        for s in 0..n {
            // The token of the step before, back from the last stage.
            if first && !last && step > 0 {
                let got = expect_dict(times.time(Op::RecvDict, || pp.recv_tensor_dict(None, Some(tp)))?)?;
                check_seq(&got, s, pp)?;
                push_token(&mut outs[s], &got)?;
            }
            if first && s == 0 && !outs[0].tokens.is_empty() && first_token_at.is_none() {
                first_token_at = Some(start.elapsed());
            }
            if step == args.tokens {
                continue;
            }
            let (hidden, positions) = match &stage.embed {
                Some(embed) => {
                    let mine = (tp.rank_in_group() == 0).then(|| inputs_dict(&prompts[s], &outs[s].tokens));
                    let mine = mine.transpose()?;
                    let inputs = times.time(Op::Broadcast, || tp.broadcast_tensor_dict(mine.as_ref(), 0))?;
                    let ids: Vec<i64> = get_tensor(&inputs, "input_ids")?.to_vec()?;
                    (embed.forward(&ids)?, get_tensor(&inputs, "positions")?.to_vec::<i64>()?)
                }
                None => {
                    let got = expect_dict(times.time(Op::RecvDict, || pp.recv_tensor_dict(None, Some(tp)))?)?;
                    check_seq(&got, s, pp)?;
                    let hidden = to_array(&get_tensor(&got, "hidden")?.clone().to_device(Device::Cpu)?)?;
                    (hidden, get_tensor(&got, "positions")?.to_vec::<i64>()?)
                }
            };
            let hidden = stage.run_layers(hidden, &positions, s)?;
            match &stage.head {
                Some(head) => {
                    let logits = head.forward(&hidden)?;
                    let token = argmax(&logits) as i64;
                    if first {
                        // One stage: the token stays here.
                        outs[s].tokens.push(token);
                        outs[s].logits.push(logits);
                        if s == 0 && first_token_at.is_none() {
                            first_token_at = Some(start.elapsed());
                        }
                    } else {
                        let dict = token_dict(token, logits)?.with("seq", seq_tensor(s)?);
                        times.time(Op::SendDict, || pp.send_tensor_dict(&dict, None, Some(tp)))?;
                    }
                }
                None => {
                    let n_pos = positions.len();
                    let dict = TensorDict::new()
                        .with("seq", seq_tensor(s)?)
                        .with("positions", Tensor::from_vec(positions, vec![n_pos])?)
                        .with("hidden", to_tensor(&hidden)?.to_device(dev)?);
                    times.time(Op::SendDict, || pp.send_tensor_dict(&dict, None, Some(tp)))?;
                }
            }
        }
    }
    Ok((outs, first_token_at.unwrap_or_default()))
}

/// Gathers every rank's timings on rank 0, which prints the report and
/// checks each sequence against the single-process model; returns the
/// exit code (0 elsewhere).
fn finish(
    args: &DemoArgs,
    cfg: &ModelConfig,
    world: &GroupCoordinator,
    times: &OpTimes,
    wall: Duration,
    first_token_at: Duration,
    outs: &[Generation],
) -> Result<i32> {
    let rank = world.rank_in_group();
    // Everyone's timings to rank 0: [wall, (seconds, calls) per op].
    let mut row = vec![wall.as_secs_f64()];
    for (d, n) in times.snapshot() {
        row.push(d.as_secs_f64());
        row.push(n as f64);
    }
    let width = row.len();
    let all = world.all_gather(&Tensor::from_vec(row, vec![1, width])?.to_device(world.device())?, 0)?;
    let all: Vec<f64> = all.to_device(Device::Cpu)?.to_vec()?;
    if rank != 0 {
        return Ok(0);
    }
    let reports: Vec<RankReport> = all
        .chunks(width)
        .enumerate()
        .map(|(rank, r)| {
            let mut times = [(Duration::ZERO, 0u64); 5];
            for (i, t) in times.iter_mut().enumerate() {
                *t = (Duration::from_secs_f64(r[1 + 2 * i]), r[2 + 2 * i] as u64);
            }
            RankReport { rank, times, wall: Duration::from_secs_f64(r[0]) }
        })
        .collect();
    print_report(args, &reports, wall, first_token_at);
    let mut code = 0;
    for (s, out) in outs.iter().enumerate() {
        if outs.len() > 1 {
            println!("sequence {s}:");
        }
        code = code.max(verify(args, cfg, &model::prompt_of(cfg, args.prompt_len, s), out)?);
    }
    Ok(code)
}

fn print_report(args: &DemoArgs, reports: &[RankReport], wall: Duration, first_token_at: Duration) {
    let secs = wall.as_secs_f64();
    let total = args.tokens * args.sequences;
    println!(
        "generated {total} tokens{} in {:.3} s: {:.1} tokens/s (first token, the {}-token prefill, after {:.1} ms)",
        if args.sequences > 1 { format!(" ({} sequences of {})", args.sequences, args.tokens) } else { String::new() },
        secs,
        total as f64 / secs,
        args.prompt_len,
        first_token_at.as_secs_f64() * 1e3
    );
    println!(
        "share of each rank's decoding time spent in communication (recv includes waiting for the previous stage):"
    );
    let mut header = format!("{:>6}", "rank");
    for op in Op::ALL {
        header.push_str(&format!(" {:>22}", op.name()));
    }
    header.push_str(&format!(" {:>8}", "other"));
    println!("{header}");
    for r in reports {
        let wall = r.wall.as_secs_f64().max(1e-9);
        let mut line = format!("{:>6}", r.rank);
        let mut comm = 0.0;
        for (d, n) in r.times {
            let s = d.as_secs_f64();
            comm += s;
            line.push_str(&format!(" {:>13.1}% ({:>5})", 100.0 * s / wall, n));
        }
        line.push_str(&format!(" {:>7.1}%", 100.0 * (1.0 - comm / wall).max(0.0)));
        println!("{line}");
    }
}

fn verify(args: &DemoArgs, cfg: &ModelConfig, prompt: &[i64], got: &Generation) -> Result<i32> {
    let start = Instant::now();
    let reference = model::generate_single(cfg, prompt, args.tokens)?;
    let diff = model::max_abs_diff(&got.logits, &reference.logits);
    println!(
        "single-process reference: {:.3} s; tokens {:?}{}",
        start.elapsed().as_secs_f64(),
        &reference.tokens[..reference.tokens.len().min(12)],
        if reference.tokens.len() > 12 { " ..." } else { "" }
    );
    let tokens_equal = got.tokens == reference.tokens;
    let within = diff <= args.tolerance;
    if tokens_equal && within {
        println!(
            "PASS: {} generated token ids equal the single-process model's; max |logit difference| {diff:.2e} <= {:.0e}",
            got.tokens.len(),
            args.tolerance
        );
        Ok(0)
    } else {
        if !tokens_equal {
            let at = got.tokens.iter().zip(&reference.tokens).position(|(a, b)| a != b);
            println!(
                "FAIL: token ids differ (first at step {at:?}): parallel {:?}, single {:?}",
                got.tokens, reference.tokens
            );
        }
        if !within {
            println!("FAIL: max |logit difference| {diff:.3e} > tolerance {:.0e}", args.tolerance);
        }
        Ok(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matrices_round_trip_through_tensors() {
        let x = Array2::from_shape_fn((3, 4), |(i, j)| (10 * i + j) as f32);
        let t = to_tensor(&x).unwrap();
        assert_eq!(t.shape(), &[3, 4]);
        assert_eq!(t.to_vec::<f32>().unwrap()[..5], [0.0, 1.0, 2.0, 3.0, 10.0]);
        assert_eq!(to_array(&t).unwrap(), x);
        // A transposed view is copied in logical order.
        let xt = x.t().to_owned();
        assert_eq!(to_array(&to_tensor(&x.t().to_owned()).unwrap()).unwrap(), xt);
        let bad = Tensor::from_vec(vec![1.0f32; 6], vec![6]).unwrap();
        assert!(to_array(&bad).unwrap_err().to_string().contains("expected a 2-D tensor"));
    }

    #[test]
    fn op_times_count_calls_per_op() {
        let t = OpTimes::default();
        assert_eq!(t.time(Op::AllReduce, || 7), 7);
        t.time(Op::AllReduce, || ());
        t.time(Op::RecvDict, || std::thread::sleep(Duration::from_millis(2)));
        let s = t.snapshot();
        assert_eq!(s[0].1, 2);
        assert_eq!(s[4].1, 1);
        assert!(s[4].0 >= Duration::from_millis(2));
        assert_eq!(s[1].1 + s[2].1 + s[3].1, 0);
        t.reset();
        assert!(t.snapshot().iter().all(|&(d, n)| d.is_zero() && n == 0));
    }
}
