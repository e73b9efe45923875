//! `rankweave topology`: the model-parallel layout (placeholder until its issue lands).

/// Arguments of `rankweave topology`.
#[derive(Debug, clap::Args)]
pub struct TopologyArgs {
    /// Arguments for the future topology printer (ignored for now).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Runs `rankweave topology`; returns the exit code.
pub fn run(_args: TopologyArgs) -> rankweave::Result<i32> {
    eprintln!("rankweave topology: not built yet");
    Ok(2)
}
