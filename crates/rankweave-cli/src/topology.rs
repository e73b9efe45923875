//! `rankweave topology`: prints the model-parallel layout for given sizes.
//!
//! A pure computation (no ranks are started): which global ranks form each
//! tensor-, pipeline- and data-parallel group, and each rank's position.

use rankweave::parallel_state::model_parallel_layout;

/// Arguments of `rankweave topology`.
#[derive(Debug, clap::Args)]
pub struct TopologyArgs {
    /// Number of ranks in the world.
    #[arg(long)]
    pub world: usize,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    pub tp: usize,
    /// Pipeline-parallel size.
    #[arg(long, default_value_t = 1)]
    pub pp: usize,
    /// Data-parallel size.
    #[arg(long, default_value_t = 1)]
    pub dp: usize,
}

/// Runs `rankweave topology`; returns the exit code.
pub fn run(args: TopologyArgs) -> rankweave::Result<i32> {
    let layout = model_parallel_layout(args.world, args.tp, args.pp, args.dp)?;
    print!("{layout}");
    Ok(0)
}
