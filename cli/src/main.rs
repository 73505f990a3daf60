//! `runc-architect`: the command line of runc-architect (node install, checkpoint store,
//! hibernation status and metrics).

mod install;
mod install_cmd;
mod metrics_cmd;
mod status_cmd;
mod store_cmd;

use clap::{Parser, Subcommand};

/// runc-architect: a containerd shim v2 that freezes idle containers, checkpoints them with
/// CRIU into a content-addressed store and restores them on wake or on another node.
#[derive(Parser, Debug)]
#[command(name = "runc-architect", version, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Administer a checkpoint store (put, get, ls, inspect, verify, gc, stats, export, import).
    Store(store_cmd::StoreArgs),
    /// Install the shim on this node and register it in containerd's config.toml.
    Install(install_cmd::InstallArgs),
    /// Remove the handler from containerd's config.toml and the shim from the node.
    Uninstall(install_cmd::UninstallArgs),
    /// Show the hibernation state of every container that has it on (all namespaces).
    Status(status_cmd::StatusArgs),
    /// Print hibernation metrics in Prometheus text format, or serve them (--listen).
    Metrics(metrics_cmd::MetricsArgs),
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let res = match cli.command {
        Command::Store(args) => store_cmd::run(args),
        Command::Install(args) => install_cmd::install(args),
        Command::Uninstall(args) => install_cmd::uninstall(args),
        Command::Status(args) => status_cmd::run(args),
        Command::Metrics(args) => metrics_cmd::run(args),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("runc-architect: error: {e:#}");
            std::process::exit(1);
        }
    }
}
