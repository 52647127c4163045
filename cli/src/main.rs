//! `moe`: the one binary of moe-cluster. Thin: parses flags and calls into the library crates.

mod cluster;
mod commands;
mod engine;
mod metrics_http;
mod progress;
mod signal;
mod tls_args;

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
    /// Export traces over OTLP/gRPC to this collector (e.g. `http://127.0.0.1:4317`); wins
    /// over OTEL_EXPORTER_OTLP_TRACES_ENDPOINT and OTEL_EXPORTER_OTLP_ENDPOINT. No endpoint:
    /// no export. OTEL_SERVICE_NAME, OTEL_TRACES_SAMPLER(_ARG), OTEL_RESOURCE_ATTRIBUTES and
    /// OTEL_BSP_* are read as usual.
    #[arg(long, global = true)]
    otlp_endpoint: Option<String>,
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
    /// Simulate a fleet's control plane (store traffic, convergence) for capacity planning.
    Simulate(commands::simulate::Args),
    /// A TCP proxy adding a fixed delay each way (benchmarks: bench/overlap.sh).
    #[command(hide = true)]
    DelayProxy(commands::delay_proxy::Args),
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

impl Command {
    /// The default service name and instance id of this process's traces.
    fn identity(&self) -> (&'static str, Option<String>) {
        match self {
            Command::ExpertNode(a) => ("moe-expert-node", a.node_id()),
            Command::Serve(_) | Command::Router(_) => ("moe-router", None),
            Command::Coordinator(a) => ("moe-coordinator", a.id()),
            Command::Up(_) => ("moe-up", None),
            _ => ("moe", None),
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let (service, instance) = cli.command.identity();
    let who = moe_meta::telemetry::Identity {
        service: service.to_string(),
        instance,
        otlp_endpoint: cli.otlp_endpoint.clone(),
    };
    // The simulator runs thousands of roles: their info logs would drown the table.
    let log = match (&cli.command, cli.log.as_str()) {
        (Command::Simulate(_), "info") => "warn",
        (_, log) => log,
    };
    let _telemetry = moe_meta::telemetry::init(log, &who).map_err(anyhow::Error::msg)?;
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
        Command::Simulate(a) => commands::simulate::run(a),
        Command::DelayProxy(a) => commands::delay_proxy::run(a),
    }
}
