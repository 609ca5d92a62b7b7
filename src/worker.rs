//! `tally worker --process i`: one timely process of the cluster.
//!
//! The processes named in `[cluster]` form one timely computation: timely
//! connects them to each other at `cluster.addresses`, and its exchange
//! routes each (metric, group) to one worker across all of them. Worker `w`
//! of `W` (process `w / threads`) reads the partitions `p` of the events
//! topic with `p % W == w` (see `tally_dataflow::routing`). Each process writes its workers' results to
//! ClickHouse, publishes live values to Redis, archives its partitions' raw
//! events, and writes its share of every checkpoint.
//!
//! Services that are down are waited for with backoff, and said so in the
//! logs; once running, a ClickHouse outage stalls the dataflow (Kafka keeps
//! the backlog) and a Redis outage drops live updates only.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tally_connectors::archive::Archive;
use tally_connectors::bus::redis::RedisPublisher;
use tally_connectors::checkpoint::{Checkpoint, Members};
use tally_connectors::kafka::dead_letters::DeadLetterTopic;
use tally_connectors::kafka::{self, source::KafkaSource};
use tally_connectors::store::clickhouse::ClickHouseStore;
use tally_connectors::store::DeadLetterSink;
use tally_dataflow::config::Config;
use tally_dataflow::routing::process_partitions;
use tally_gateway::ops::JobMetrics;
use tracing::info;

use crate::job::{checkpoint_store, Counters, Job, Mode, Spec};
use crate::{job_observer, load_config, shutdown_signal, WorkerArgs};

/// How long a stopping worker may take to flush what it holds.
const STOP_DEADLINE: Duration = Duration::from_secs(30);

/// Makes any panic end the process. A timely computation cannot go on
/// without one of its threads or peers (a peer that dies panics the thread
/// that reads from it), and a half-dead process would neither work nor let
/// its supervisor restart it; a restart resumes from the last checkpoint.
fn exit_on_panic() {
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        tracing::error!(%info, "a worker thread failed; stopping the process so it can be restarted");
        std::process::exit(70);
    }));
}

/// Runs until SIGTERM or Ctrl-C.
pub fn worker(args: WorkerArgs) -> anyhow::Result<()> {
    let config = Arc::new(load_config(args.config.as_deref(), &[])?);
    exit_on_panic();
    let cluster = &config.cluster;
    let process = args.process;
    if process >= cluster.processes {
        bail!(
            "--process {process}: the cluster has {} processes (0 to {})",
            cluster.processes,
            cluster.processes - 1
        );
    }
    let threads = config.cluster_threads();
    let workers = cluster.processes * threads;
    let members = Members {
        process,
        processes: cluster.processes,
        threads,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("worker-io")
        .build()?;
    // The address is taken before anything starts, so a port in use stops
    // the worker at once.
    let metrics_listener = args
        .metrics_listen
        .map(|address| {
            runtime
                .block_on(tokio::net::TcpListener::bind(address))
                .with_context(|| format!("binding {address}"))
        })
        .transpose()?;
    let partitions = runtime.block_on(kafka::ensure_topics(&config.kafka));
    let store = ClickHouseStore::new(&config.clickhouse);
    runtime.block_on(store.prepare(&config.metrics, config.backfill.keep_old));
    let writer = store
        .writer(config.metrics.clone(), config.backfill.keep_old)
        .context("starting the ClickHouse writer")?;
    let lateness = config.dataflow.revision_horizon();
    let (live, publisher) = RedisPublisher::start(
        &config.redis,
        &config.metrics,
        lateness,
        (process, cluster.processes),
    )
    .context("configuring the Redis publisher")?;
    let owned = process_partitions(partitions, process, threads, workers);
    let archive = Archive::start(&config.kafka, store.clone(), owned.clone(), process == 0)
        .context("starting the raw-event archive")?;
    info!(
        process,
        processes = cluster.processes,
        threads,
        partitions = ?owned,
        "connecting to the other processes"
    );
    let mode = Cluster {
        config: Arc::clone(&config),
        process,
        threads,
        live: live.clone(),
        runtime: runtime.handle().clone(),
    };
    let spec = Spec::configured(&config, checkpoint_store(&config, &config.metrics)?)?;
    let counters = Counters::new(workers);
    let starting = Job::prepare(
        &config, members, partitions, &writer, &mode, spec, &counters,
    )?;
    let metrics_server = match metrics_listener {
        Some(listener) => {
            // A line for scripts that start workers on port 0.
            println!("metrics on http://{}", listener.local_addr()?);
            let live = live.clone();
            let observe = job_observer(
                &counters,
                // The brokers hold the log; their own metrics give its size.
                Box::new(|| 0),
                Box::new(move || live.dropped()),
            );
            let (quit, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = runtime.spawn(tally_gateway::serve_worker(
                listener,
                Arc::new(JobMetrics::new(observe)),
                config.server.clone(),
                async {
                    let _ = stopped.await;
                },
            ));
            Some((quit, server))
        }
        None => None,
    };
    let shutdown = {
        let _runtime = runtime.enter();
        shutdown_signal()
    };
    let job = starting.run(mode)?;
    drop(live);
    info!(process, "tally worker is running");
    runtime.block_on(shutdown);
    // A peer that is gone, or a store that is down, can hold the steps
    // below; a restart resumes from the last checkpoint anyway.
    std::thread::spawn(|| {
        std::thread::sleep(STOP_DEADLINE);
        tracing::error!(deadline = ?STOP_DEADLINE, "did not stop cleanly in time; exiting");
        std::process::exit(1);
    });
    if let Some((quit, server)) = metrics_server {
        let _ = quit.send(());
        let _ = runtime.block_on(server);
    }
    job.stop();
    writer.close();
    archive.stop();
    if publisher.join().is_err() {
        tracing::error!("the redis publisher panicked");
    }
    info!("stopped cleanly");
    Ok(())
}

/// `tally worker`: one process of a timely cluster, reading the events
/// topic and publishing to Redis.
struct Cluster {
    config: Arc<Config>,
    process: usize,
    threads: usize,
    live: RedisPublisher,
    /// Where the restored offsets are checked against the brokers.
    runtime: tokio::runtime::Handle,
}

impl Mode for Cluster {
    type Source = KafkaSource;
    type Live = RedisPublisher;
    type DeadLetters = DeadLetterTopic<DeadLetterSink>;

    fn communication(&self) -> timely::CommunicationConfig {
        timely::CommunicationConfig::Cluster {
            threads: self.threads,
            process: self.process,
            addresses: self.config.cluster.addresses.clone(),
            report: false,
            zerocopy: false,
        }
    }

    fn check_restore(&self, checkpoint: &mut Checkpoint) -> anyhow::Result<()> {
        // The topic must still hold every offset the checkpoint resumes
        // from: one that retention deleted would lose events silently.
        let cuts: Vec<(u32, u64)> = checkpoint
            .cuts
            .iter()
            .map(|c| (c.partition, c.next_offset))
            .collect();
        let kafka = self.config.kafka.clone();
        self.runtime
            .block_on(async move {
                tokio::task::spawn_blocking(move || kafka::check_offsets(&kafka, &cuts)).await
            })?
            .context("checking the checkpoint's offsets against the events topic")
    }

    fn source(&self, partitions: Vec<u32>, starts: &[(u32, u64)]) -> KafkaSource {
        KafkaSource::new(&self.config.kafka, partitions, starts)
            .expect("the Kafka configuration was accepted at start-up")
    }

    fn live(&self) -> RedisPublisher {
        self.live.worker()
    }

    fn dead_letters(&self, store: DeadLetterSink) -> DeadLetterTopic<DeadLetterSink> {
        DeadLetterTopic::new(&self.config.kafka, store)
            .expect("the Kafka configuration was accepted at start-up")
    }
}
