//! The `tally` command.
//!
//! `tally run` is the whole pipeline in one process: the gateway, the
//! embedded event log, the timely workers, the SQLite result store and the
//! in-process live bus.

mod demo;
mod run;

// Events turn into many short-lived strings and maps on every thread;
// mimalloc serves that pattern far better than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};

/// Real-time analytics: ingest events, aggregate them in event-time windows
/// on timely dataflow, query history, and push live values over WebSocket.
#[derive(Parser)]
#[command(name = "tally", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Runs everything in one process on the embedded defaults: event log,
    /// timely workers, SQLite results and in-process live bus.
    Run(RunArgs),
}

/// Options of `tally run`. Each one overrides the configuration file and the
/// `TALLY__*` environment variables.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Configuration file. Without it, `./cluster.toml` is read if it exists,
    /// and the built-in defaults are used otherwise.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address for HTTP and WebSocket, such as 127.0.0.1:8080; port 0 picks a
    /// free port, which is printed on start-up. Overrides `server.listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Directory for the event log and the result store. Overrides
    /// `storage.data_dir` (default `./data`).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Timely worker threads; default one per core. Overrides `dataflow.workers`.
    #[arg(long, value_name = "N")]
    pub workers: Option<usize>,
    /// Feeds a synthetic clickstream (ad clicks across campaigns, countries
    /// and devices, some purchases, and a few out-of-order and late events),
    /// so the numbers move at once.
    #[arg(long)]
    pub demo: bool,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Run(args) => run::run(args).context("tally run"),
    }
}
