//! `rankweave demo`: a tensor- and pipeline-parallel decoder-only transformer
//! on CPU that checks itself against the same model run in one process.
//!
//! The command starts `tp * pp` copies of this binary as `demo --worker`
//! through the launcher (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set as
//! torchrun sets them). Each worker joins the world with `env://`, builds the
//! tensor- and pipeline-parallel groups with `initialize_model_parallel`,
//! builds its shard of the model ([`model`]) and decodes greedily
//! ([`worker`]). Rank 0 then runs the unsharded model alone and compares.
//!
//! Across nodes, `rankweave demo --nnodes M --node-rank K --master-addr A`
//! on each node starts that node's `tp * pp / M` workers through a launcher
//! of an M-node job (node 0's hosts the store). Each node holds whole TP
//! groups, so TP stays inside a node and the pipeline crosses nodes; rank 0,
//! on node 0, prints the verdict. The workers can also be started by hand:
//! `rankweave launch --nnodes M ... -- rankweave demo --worker --tp T --pp P`.

pub mod model;
pub mod worker;

use crate::launch::{self, JobSpec};
use model::ModelConfig;
use rankweave::parallel_state::model_parallel_layout;
use rankweave::{Context, Error, Result};
use std::ffi::OsString;
use std::time::Duration;

/// Arguments of `rankweave demo`.
#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Number of worker processes; must equal tp * pp (the default).
    #[arg(long, value_name = "N")]
    pub nproc: Option<usize>,
    /// Tensor-parallel degree: heads, MLP columns and vocabulary split over this many ranks.
    #[arg(long, default_value_t = 2)]
    pub tp: usize,
    /// Pipeline-parallel degree: layers split into this many stages.
    #[arg(long, default_value_t = 2)]
    pub pp: usize,
    /// Decoder layers.
    #[arg(long, default_value_t = 8)]
    pub layers: usize,
    /// Hidden width.
    #[arg(long, default_value_t = 512)]
    pub hidden: usize,
    /// Attention heads.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Vocabulary size.
    #[arg(long, default_value_t = 1024)]
    pub vocab: usize,
    /// MLP inner width [default: 4 * hidden].
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Tokens to generate.
    #[arg(long, default_value_t = 32)]
    pub tokens: usize,
    /// Length of the (seeded, random) prompt.
    #[arg(long, default_value_t = 8)]
    pub prompt_len: usize,
    /// Sequences decoded at once, each with its own prompt. With more than
    /// one, the stages work on different sequences at the same time (as
    /// vLLM keeps one in flight per pipeline stage): stage k runs step t of
    /// sequence s while stage k+1 runs the sequence before it, instead of
    /// waiting for the one token in flight. `--pp` of them fill the pipeline.
    #[arg(long, default_value_t = 1)]
    pub sequences: usize,
    /// Seed of the weights and the prompt.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Largest accepted absolute difference between the parallel and the
    /// single-process logits.
    #[arg(long, default_value_t = 1e-3)]
    pub tolerance: f32,
    /// Where this node stands in the job: each node runs `rankweave demo`
    /// with the same options and its own --node-rank.
    #[command(flatten)]
    pub node: crate::launch::NodeArgs,
    /// Where the tensor collectives run: `cpu` (CPU process groups) or
    /// `cuda` (NCCL groups, rank r on cuda:r; needs the `nccl` feature and
    /// one GPU per rank: NCCL refuses two ranks on one GPU, so with one GPU
    /// run `--tp 1 --pp 1`).
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// Process-group backend: `gloo` (CPU: shared memory and TCP, the
    /// demo starts its own workers) or `mpi` (run under `mpirun -n TP*PP`;
    /// every process is a worker; needs the cargo feature `mpi`).
    #[arg(long, default_value = "gloo")]
    pub backend: String,
    /// Pin each worker to a CPU of its own, as `rankweave launch --bind-to`
    /// (`auto`: only when every worker of this node gets one).
    #[arg(long, value_enum, value_name = "POLICY", default_value_t = crate::bind::BindTo::None)]
    pub bind_to: crate::bind::BindTo,
    /// Run as one worker of a demo (set by the demo itself).
    #[arg(long, hide = true)]
    pub worker: bool,
}

impl DemoArgs {
    /// The model these arguments describe.
    pub fn model(&self) -> ModelConfig {
        ModelConfig {
            vocab: self.vocab,
            hidden: self.hidden,
            heads: self.heads,
            layers: self.layers,
            ffn: self.ffn.unwrap_or(4 * self.hidden),
            seed: self.seed,
        }
    }

    /// Checks every size before any process starts.
    fn validate(&self) -> Result<usize> {
        let world = self.tp.checked_mul(self.pp).ok_or_else(|| Error::invalid("tp * pp overflows"))?;
        if let Some(n) = self.nproc {
            if n != world {
                return Err(Error::invalid(format!(
                    "--nproc ({n}) must equal tp ({}) x pp ({}) = {world}",
                    self.tp, self.pp
                )));
            }
        }
        self.node.check()?;
        let nnodes = self.node.nnodes;
        if world % nnodes != 0 || (world / nnodes) % self.tp != 0 {
            return Err(Error::invalid(format!(
                "tp ({}) x pp ({}) = {world} ranks over --nnodes {}: each node must hold whole TP groups \
                 (tp x pp divisible by nnodes, and ranks per node divisible by tp)",
                self.tp, self.pp, nnodes
            )));
        }
        self.model().validate(self.tp, self.pp).map_err(Error::invalid)?;
        if self.tokens == 0 || self.prompt_len == 0 || self.sequences == 0 {
            return Err(Error::invalid("--tokens, --prompt-len and --sequences must be at least 1"));
        }
        self.device_kind()?;
        if self.tolerance.is_nan() || self.tolerance < 0.0 {
            return Err(Error::invalid(format!("--tolerance ({}) must be a non-negative number", self.tolerance)));
        }
        Ok(world)
    }

    /// `false` for `cpu`, `true` for `cuda`; other names, and `cuda` in a
    /// build without the `nccl` feature, are errors.
    fn device_kind(&self) -> Result<bool> {
        match self.device.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(false),
            "cuda" if cfg!(feature = "nccl") => Ok(true),
            "cuda" => Err(Error::Unsupported(
                "--device cuda needs a build with the `nccl` feature (cargo build --features nccl)".into(),
            )),
            other => Err(Error::invalid(format!("--device `{other}`: expected `cpu` or `cuda`"))),
        }
    }

    /// The parallel-state backend: `nccl` for `--device cuda`, else
    /// `--backend` (`gloo` or `mpi`).
    pub fn pg_backend(&self) -> Result<rankweave::parallel_state::Backend> {
        use rankweave::parallel_state::Backend;
        let named = self.backend.parse::<Backend>()?;
        match (self.device_kind()?, named) {
            (true, Backend::Cpu) => Ok(Backend::Nccl),
            (true, other) => Err(Error::invalid(format!(
                "--device cuda runs on NCCL groups; it does not combine with --backend {other}"
            ))),
            (false, b) => Ok(b),
        }
    }

    /// The worker's command line: every model argument, then `--worker`.
    fn worker_args(&self) -> Vec<OsString> {
        let m = self.model();
        let pairs = [
            ("--tp", self.tp.to_string()),
            ("--pp", self.pp.to_string()),
            ("--layers", m.layers.to_string()),
            ("--hidden", m.hidden.to_string()),
            ("--heads", m.heads.to_string()),
            ("--vocab", m.vocab.to_string()),
            ("--ffn", m.ffn.to_string()),
            ("--tokens", self.tokens.to_string()),
            ("--prompt-len", self.prompt_len.to_string()),
            ("--sequences", self.sequences.to_string()),
            ("--seed", self.seed.to_string()),
            ("--tolerance", self.tolerance.to_string()),
            ("--device", self.device.clone()),
        ];
        let mut args: Vec<OsString> = vec!["demo".into(), "--worker".into()];
        for (k, v) in pairs {
            args.push(k.into());
            args.push(v.into());
        }
        args
    }
}

/// Runs `rankweave demo`; returns the exit code (0 on PASS).
pub fn run(args: DemoArgs) -> Result<i32> {
    let world = args.validate()?;
    let backend = args.pg_backend()?;
    if args.worker {
        return worker::run(&args, backend);
    }
    if backend == rankweave::parallel_state::Backend::Mpi {
        // Started by mpirun: this process is one of the workers.
        return worker::run(&args, backend);
    }
    let m = args.model();
    let node = &args.node;
    let per_node = world / node.nnodes;
    if node.nnodes > 1 {
        println!(
            "rankweave demo: node {} of {}: ranks {}..{} of {world}",
            node.node_rank,
            node.nnodes,
            node.node_rank * per_node,
            (node.node_rank + 1) * per_node - 1
        );
    }
    println!(
        "rankweave demo: {world} processes, tp {} x pp {}; model: {} layers, hidden {}, {} heads, ffn {}, vocab {}; \
         prompt {} tokens, generating {}{}",
        args.tp,
        args.pp,
        m.layers,
        m.hidden,
        m.heads,
        m.ffn,
        m.vocab,
        args.prompt_len,
        args.tokens,
        if args.sequences > 1 { format!(" for each of {} sequences", args.sequences) } else { String::new() }
    );
    let layout = model_parallel_layout(world, args.tp, args.pp, 1)?;
    let show = |groups: &[Vec<usize>]| groups.iter().map(|g| format!("{g:?}")).collect::<Vec<_>>().join(" ");
    println!("groups: tp {}; pp {}", show(&layout.tp_groups), show(&layout.pp_groups));
    let exe = std::env::current_exe().map_err(|e| Error::io(Context::op("demo: locate own executable"), e))?;
    let spec = JobSpec {
        nproc_per_node: per_node,
        nnodes: node.nnodes,
        node_rank: node.node_rank,
        master_addr: node.master_addr.clone(),
        master_port: node.master_port,
        grace: Duration::from_secs(5),
        node_timeout: launch::DEFAULT_NODE_TIMEOUT,
        prefix: true,
        bind: args.bind_to,
        program: exe.into_os_string(),
        args: args.worker_args(),
    };
    let code = launch::run_job(&spec)?;
    if code != 0 {
        println!("FAIL: the workers ended with exit code {code}");
    } else if node.node_rank != 0 {
        println!("node {}: every worker finished; rank 0 on node 0 checked the result", node.node_rank);
    }
    Ok(code)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Wrap {
        #[command(flatten)]
        demo: DemoArgs,
    }

    fn parse(args: &[&str]) -> DemoArgs {
        Wrap::parse_from(std::iter::once("demo").chain(args.iter().copied())).demo
    }

    #[test]
    fn defaults_are_a_valid_four_process_run() {
        let a = parse(&[]);
        assert_eq!(a.validate().unwrap(), 4);
        assert_eq!(a.model().ffn, 2048);
    }

    #[test]
    fn worker_args_round_trip() {
        let a = parse(&["--tp", "4", "--pp", "1", "--hidden", "64", "--layers", "2", "--seed", "9"]);
        let w = a.worker_args();
        assert_eq!(w[0], "demo");
        let strs: Vec<String> = w[1..].iter().map(|s| s.to_string_lossy().into_owned()).collect();
        let refs: Vec<&str> = strs.iter().map(String::as_str).collect();
        let b = parse(&refs);
        assert!(b.worker);
        assert_eq!(b.model(), a.model());
        assert_eq!((b.tp, b.pp, b.tokens, b.prompt_len), (a.tp, a.pp, a.tokens, a.prompt_len));
    }

    #[test]
    fn bad_sizes_are_named() {
        let e = parse(&["--nproc", "3"]).validate().unwrap_err().to_string();
        assert!(e.contains("--nproc (3) must equal tp (2) x pp (2) = 4"), "{e}");
        let e = parse(&["--tp", "3", "--pp", "1"]).validate().unwrap_err().to_string();
        assert!(e.contains("heads (8) must divide by tp (3)"), "{e}");
        let e = parse(&["--tokens", "0"]).validate().unwrap_err().to_string();
        assert!(e.contains("--tokens"), "{e}");
        let e = parse(&["--nnodes", "3"]).validate().unwrap_err().to_string();
        assert!(e.contains("whole TP groups"), "{e}");
        let e = parse(&["--tp", "4", "--pp", "1", "--nnodes", "2"]).validate().unwrap_err().to_string();
        assert!(e.contains("whole TP groups"), "{e}");
        assert_eq!(parse(&["--nnodes", "2", "--node-rank", "1"]).validate().unwrap(), 4);
        let e = parse(&["--nnodes", "2", "--node-rank", "2"]).validate().unwrap_err().to_string();
        assert!(e.contains("--node-rank 2"), "{e}");
        let e = parse(&["--device", "tpu"]).validate().unwrap_err().to_string();
        assert!(e.contains("--device `tpu`"), "{e}");
        let cuda = parse(&["--device", "cuda", "--tp", "1", "--pp", "1"]);
        if cfg!(feature = "nccl") {
            assert_eq!(cuda.validate().unwrap(), 1);
            assert_eq!(cuda.pg_backend().unwrap().name(), "nccl");
        } else {
            let e = cuda.validate().unwrap_err().to_string();
            assert!(e.contains("`nccl` feature"), "{e}");
        }
        assert_eq!(parse(&[]).pg_backend().unwrap().name(), "gloo");
    }
}
