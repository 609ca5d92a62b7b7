//! The `tally` command.
//!
//! `tally run` is the whole pipeline in one process: the gateway, the
//! embedded event log, the timely workers, the SQLite result store and the
//! in-process live bus. The cluster runs the same pipeline as `tally worker`
//! processes (Kafka in, ClickHouse and Redis out) and `tally gateway` nodes.

mod backfill;
mod demo;
mod dump;
mod gateway;
mod job;
mod run;
mod worker;

// Events turn into many short-lived strings and maps on every thread;
// mimalloc serves that pattern far better than the system allocator.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use std::sync::atomic::Ordering;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
use tally_connectors::store::StallCounter;
use tally_dataflow::config::Config;
use tally_gateway::ops::{Observe, Observed};
use tracing::info;

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
    /// Runs one timely process of the cluster described by `[cluster]`: it
    /// reads its workers' share of the Kafka partitions and writes results
    /// to ClickHouse and live values to Redis.
    Worker(WorkerArgs),
    /// Runs a stateless HTTP and WebSocket node of the cluster: it produces
    /// events to Kafka, answers history from ClickHouse and fans out live
    /// values from Redis.
    Gateway(GatewayArgs),
    /// Reads the event log.
    #[command(subcommand)]
    Log(LogCommand),
}

#[derive(Subcommand)]
enum LogCommand {
    /// Prints every record of the event log as JSON, one per line: the
    /// embedded log of `tally run` (which may be running), or with
    /// `--kafka` the cluster's events topic.
    Dump(dump::DumpArgs),
}

/// Options of `tally run`. Each one overrides the configuration file and the
/// `TALLY__*` environment variables.
#[derive(clap::Args, Debug, Clone)]
pub struct RunArgs {
    /// Configuration file. Without it, `./cluster.toml` is read if it exists,
    /// and the built-in defaults (the `cluster.toml` tally ships with, and
    /// its metrics) are used otherwise.
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

/// Options of `tally worker`.
#[derive(clap::Args, Debug, Clone)]
pub struct WorkerArgs {
    /// Configuration file, as for `tally run`.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// This process's index in `cluster.addresses`, from 0.
    #[arg(long, value_name = "I")]
    pub process: usize,
    /// Serve the job's Prometheus metrics (`/metrics`) and `/healthz` at this
    /// address; port 0 picks a free port, printed on start-up.
    #[arg(long, value_name = "ADDR")]
    pub metrics_listen: Option<SocketAddr>,
}

/// Options of `tally gateway`.
#[derive(clap::Args, Debug, Clone)]
pub struct GatewayArgs {
    /// Configuration file, as for `tally run`.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Address for HTTP and WebSocket; port 0 picks a free port, which is
    /// printed on start-up. Overrides `server.listen`.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
}

/// The configuration used when there is no file: the repository's
/// `cluster.toml`, with the default metrics, built into the binary so that
/// `tally run --demo` works from any directory.
const BUILT_IN: &str = include_str!("../cluster.toml");

/// Loads the configuration: defaults, then the file (`path`, or
/// `./cluster.toml` if it exists, or [`BUILT_IN`]), then `TALLY__*`
/// variables, then `overrides` of `section.key` from the command line.
pub fn load_config(path: Option<&Path>, overrides: &[(&str, String)]) -> anyhow::Result<Config> {
    let path = path
        .map(Path::to_owned)
        .or_else(|| Some(PathBuf::from("cluster.toml")).filter(|p| p.exists()));
    let text = match &path {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?
        }
        None => BUILT_IN.to_owned(),
    };
    let mut env: Vec<(String, String)> = std::env::vars().collect();
    for (key, value) in overrides {
        env.push((
            format!("TALLY__{}", key.replace('.', "__").to_uppercase()),
            value.clone(),
        ));
    }
    match Config::load(Some(&text), env) {
        Ok(config) => Ok(config),
        Err(errors) => {
            let source = path.map_or("the built-in defaults".to_string(), |p| {
                p.display().to_string()
            });
            bail!(
                "invalid configuration ({source}):\n  - {}",
                errors.join("\n  - ")
            )
        }
    }
}

/// A TOML string literal.
pub fn toml_string(s: &str) -> String {
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

/// What a process's job `/metrics` reads at scrape time: the job's counters,
/// its checkpoints, its store writer's stalls, and two values its log and
/// live bus know.
pub fn job_observer(
    counters: &job::Counters,
    store_stalls: StallCounter,
    log_bytes: Box<dyn Fn() -> u64 + Send + Sync>,
    live_dropped: Box<dyn Fn() -> u64 + Send + Sync>,
) -> Observe {
    let (stats, checkpoints) = (Arc::clone(&counters.job), Arc::clone(&counters.checkpoints));
    Box::new(move || Observed {
        checkpoints: checkpoints.committed.load(Ordering::Relaxed),
        checkpoint_failures: checkpoints.failures.load(Ordering::Relaxed),
        checkpoint_parts_dropped: checkpoints.parts_dropped.load(Ordering::Relaxed),
        checkpoint_boundary: checkpoints.boundary.load(Ordering::Relaxed),
        checkpoint_bytes: checkpoints.bytes.load(Ordering::Relaxed),
        checkpoint_duration_ms: checkpoints.duration_ms.load(Ordering::Relaxed),
        log_bytes: log_bytes(),
        watermarks: stats.watermarks(),
        windows_emitted: stats.windows_emitted.load(Ordering::Relaxed),
        late_updates: stats.late_updates.load(Ordering::Relaxed),
        dead_letters: stats.dead_letters.load(Ordering::Relaxed),
        duplicates: stats.duplicates.load(Ordering::Relaxed),
        events_read: stats.events_read.load(Ordering::Relaxed),
        live_dropped: live_dropped(),
        backfill: None,
        groups: stats.groups(),
        store_stalls: store_stalls.read(),
    })
}

/// The runtime that serves HTTP and WebSocket and drives the connectors,
/// with `server.threads` threads (0: one per core).
pub fn server_runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if config.server.threads > 0 {
        builder.worker_threads(config.server.threads);
    }
    builder.enable_all().thread_name("gateway").build()
}

/// Resolves on SIGTERM or Ctrl-C. The handlers are installed when this is
/// called, not when the future is first polled: call it before saying that
/// tally listens, so that a signal sent on that word stops it cleanly
/// rather than killing it. Call it within the runtime.
pub fn shutdown_signal() -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, Signal, SignalKind};
    let listen = |kind: SignalKind, name: &'static str| {
        signal(kind)
            .inspect_err(|e| tracing::warn!(error = %e, "cannot listen for {name}"))
            .ok()
    };
    /// Resolves on the signal, or never if it cannot be listened for.
    async fn received(signal: Option<Signal>) {
        match signal {
            Some(mut signal) => {
                signal.recv().await;
            }
            None => std::future::pending().await,
        }
    }
    let terminate = received(listen(SignalKind::terminate(), "SIGTERM"));
    let interrupt = received(listen(SignalKind::interrupt(), "Ctrl-C"));
    async move {
        tokio::select! {
            _ = terminate => info!("received SIGTERM"),
            _ = interrupt => info!("received Ctrl-C"),
        }
    }
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
        Command::Worker(args) => worker::worker(args).context("tally worker"),
        Command::Gateway(args) => gateway::gateway(args).context("tally gateway"),
        Command::Log(LogCommand::Dump(args)) => dump::dump(args).context("tally log dump"),
    }
}
