//! The `rankweave` command: `launch`, `demo`, `bench`, `topology`.
//!
//! Each subcommand lives in its own module with its own argument struct and a
//! `run(args) -> rankweave::Result<i32>` entry returning the exit code.
//! `Error::InvalidArgument` exits with 2, every other error with 1.
#![warn(missing_docs)]
#![warn(unsafe_op_in_unsafe_fn)]
#![warn(clippy::undocumented_unsafe_blocks)]

mod bench;
mod bind;
mod demo;
mod launch;
mod selftest;
mod topology;

use clap::{Parser, Subcommand};
use std::io::{IsTerminal, Write};

/// rankweave: vLLM's distributed state layer for Rust inference engines.
#[derive(Debug, Parser)]
#[command(name = "rankweave", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Start N worker processes per node with RANK, WORLD_SIZE, MASTER_ADDR... set (like torchrun).
    Launch(launch::LaunchArgs),
    /// Run the end-to-end demonstration through the launcher.
    Demo(demo::DemoArgs),
    /// Benchmark the collectives.
    Bench(bench::BenchArgs),
    /// Print the model-parallel layout for a world size.
    Topology(topology::TopologyArgs),
    /// Worker half of `demo` (started by the launcher).
    #[command(hide = true)]
    Selftest(selftest::SelftestArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    // A second initialisation can only fail if something else installed a
    // subscriber first; logging then goes there, which is fine.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

fn main() {
    let cli = Cli::parse();
    init_tracing();
    let (name, result) = match cli.command {
        Command::Launch(a) => ("launch", launch::run(a)),
        Command::Demo(a) => ("demo", demo::run(a)),
        Command::Bench(a) => ("bench", bench::run(a)),
        Command::Topology(a) => ("topology", topology::run(a)),
        Command::Selftest(a) => ("selftest", selftest::run(a)),
    };
    let code = match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rankweave {name}: {e}");
            match e {
                rankweave::Error::InvalidArgument(_) => 2,
                _ => 1,
            }
        }
    };
    let _ = std::io::stdout().flush();
    std::process::exit(code);
}

#[cfg(test)]
mod tests {
    use super::Cli;
    use clap::{CommandFactory, Parser};

    #[test]
    fn the_command_line_definition_is_consistent() {
        // clap's own checks: no two options of a subcommand share a name,
        // every default parses, flattened structs (NodeArgs) fit in.
        Cli::command().debug_assert();
    }

    #[test]
    fn launch_and_demo_read_the_same_node_options() {
        let node = ["--nnodes", "2", "--node-rank", "1", "--master-addr", "10.0.0.1", "--master-port", "29501"];
        let launch = Cli::parse_from(["rankweave", "launch", "--nproc-per-node", "2"].into_iter().chain(node));
        let demo = Cli::parse_from(["rankweave", "demo"].into_iter().chain(node));
        let (super::Command::Launch(l), super::Command::Demo(d)) = (launch.command, demo.command) else {
            panic!("parsed into the wrong subcommands");
        };
        for n in [&l.node, &d.node] {
            assert_eq!((n.nnodes, n.node_rank, n.master_addr.as_str(), n.master_port), (2, 1, "10.0.0.1", Some(29501)));
        }
    }
}
