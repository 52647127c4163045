//! `moe`: the one binary of moe-cluster. Thin: parses flags and calls into the library crates.

mod cluster;
mod commands;
mod engine;
mod metrics_http;
mod progress;
mod signal;

use clap::{Parser, Subcommand};

/// moe-cluster: a serving cluster for DeepSeek-V3-class Mixture-of-Experts models.
#[derive(Debug, Parser)]
#[command(name = "moe", version, about)]
struct Cli {
    /// Compute threads (default: all cores).
    #[arg(long, global = true, env = "MOE_THREADS")]
    threads: Option<usize>,
    /// Log filter, as RUST_LOG (e.g. `info`, `moe_model=debug`).
    #[arg(long, global = true, env = "MOE_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Generate text (experts in-process, or on expert nodes with --experts-at).
    Generate(commands::generate::Args),
    /// Write the logits of every prompt position to a safetensors file.
    Logits(commands::logits::Args),
    /// Write a random-weight model in the Hugging Face layout.
    GenModel(commands::gen_model::Args),
    /// Serve a slice of the routed experts over gRPC.
    ExpertNode(commands::expert_node::Args),
    /// OpenAI-compatible API with every expert in this process.
    Serve(commands::serve::ServeArgs),
    /// OpenAI-compatible API with the routed experts on expert nodes.
    Router(commands::serve::RouterArgs),
    /// Load generator for an OpenAI-compatible server.
    Bench(commands::bench::Args),
    /// A coordinator replica (membership and placement on etcd).
    Coordinator(commands::coordinator::Args),
    /// A whole local cluster in one process: coordinator, expert nodes, router.
    Up(commands::up::Args),
    /// Inspect a coordinated cluster.
    #[command(subcommand)]
    Cluster(commands::cluster_cmd::ClusterCommand),
    /// Inspect the placement of a coordinated cluster.
    #[command(subcommand)]
    Placement(commands::cluster_cmd::PlacementCommand),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let _telemetry = moe_meta::telemetry::init(&cli.log).map_err(anyhow::Error::msg)?;
    if let Some(n) = cli.threads {
        rayon::ThreadPoolBuilder::new()
            .num_threads(n)
            .build_global()?;
    }
    match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::GenModel(a) => commands::gen_model::run(a),
        Command::ExpertNode(a) => commands::expert_node::run(a),
        Command::Serve(a) => commands::serve::run_serve(a),
        Command::Router(a) => commands::serve::run_router(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Coordinator(a) => commands::coordinator::run(a),
        Command::Up(a) => commands::up::run(a),
        Command::Cluster(c) => commands::cluster_cmd::run_cluster(c),
        Command::Placement(c) => commands::cluster_cmd::run_placement(c),
    }
}
