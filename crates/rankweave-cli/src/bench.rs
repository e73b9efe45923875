//! `rankweave bench`: collective benchmarks (placeholder until the bench issue lands).

/// Arguments of `rankweave bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {
    /// Arguments for the future benchmark harness (ignored for now).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
    pub rest: Vec<String>,
}

/// Runs `rankweave bench`; returns the exit code.
pub fn run(_args: BenchArgs) -> rankweave::Result<i32> {
    eprintln!("rankweave bench: not built yet");
    Ok(2)
}
