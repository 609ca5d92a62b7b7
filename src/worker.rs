//! `tally worker --process i`: one timely process of the cluster.
//!
//! The processes named in `[cluster]` form one timely computation: timely
//! connects them to each other at `cluster.addresses`, and its exchange
//! routes each (metric, group) to one worker across all of them. Worker `w`
//! of `W` (process `w / threads`) reads the partitions `p` of the events
//! topic with `p % W == w`. Each process writes its workers' results to
//! ClickHouse, publishes live values to Redis, archives its partitions' raw
//! events, and writes its share of every checkpoint.
//!
//! Services that are down are waited for with backoff, and said so in the
//! logs; once running, a ClickHouse outage stalls the dataflow (Kafka keeps
//! the backlog) and a Redis outage drops live updates only.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use tally_connectors::archive::Archive;
use tally_connectors::bus::redis::RedisPublisher;
use tally_connectors::checkpoint::{CheckpointStore, Committer, Members};
use tally_connectors::kafka::dead_letters::DeadLetterTopic;
use tally_connectors::kafka::{self, source::KafkaSource};
use tally_connectors::store::clickhouse::ClickHouseStore;
use tally_dataflow::checkpoint::Schedule;
use tally_dataflow::job::{JobSettings, Sinks};
use tally_dataflow::operators::deliver::Backpressure;
use tally_dataflow::stats::JobStats;
use tally_gateway::ops::JobMetrics;
use tracing::info;

use crate::job::Shared;
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
    let partitions = runtime.block_on(kafka::ensure_topics(&config.kafka));
    let store = ClickHouseStore::new(&config.clickhouse);
    runtime.block_on(store.prepare());
    let writer = store
        .writer(config.metrics.clone())
        .context("starting the ClickHouse writer")?;
    let lateness = config.dataflow.allowed_lateness + config.dataflow.out_of_orderness;
    let (live, publisher) = RedisPublisher::start(&config.redis, &config.metrics, lateness)
        .context("configuring the Redis publisher")?;
    let owned: Vec<u32> = (0..partitions)
        .filter(|p| *p as usize % workers / threads == process)
        .collect();
    let archive = Archive::start(&config.kafka, store.clone(), owned.clone(), process == 0)
        .context("starting the raw-event archive")?;

    // Checkpoints live in a store every process shares.
    let checkpoints = CheckpointStore::open(
        config.checkpoint.url.as_deref(),
        &config.storage.data_dir.join("checkpoints"),
        format!("{:?}", config.metrics),
    )
    .context("opening the checkpoint store")?;
    let restored = checkpoints
        .latest()
        .context("reading the last checkpoint")?;
    let boundary = restored.as_ref().map_or(0, |c| c.boundary);
    if let Some(checkpoint) = &restored {
        let cuts: Vec<(u32, u64)> = checkpoint
            .cuts
            .iter()
            .map(|c| (c.partition, c.next_offset))
            .collect();
        let kafka = config.kafka.clone();
        runtime
            .block_on(async move {
                tokio::task::spawn_blocking(move || kafka::check_offsets(&kafka, &cuts)).await
            })?
            .context("checking the checkpoint's offsets against the events topic")?;
    }
    if process == 0 {
        // The peers cannot write before process 0 joins the computation.
        let discarded = checkpoints
            .discard_unfinished(boundary)
            .context("deleting unfinished checkpoints")?;
        if discarded > 0 {
            info!(
                discarded,
                "deleted the previous run's unfinished checkpoints"
            );
        }
    }
    match &restored {
        Some(c) => info!(
            boundary,
            workers = c.workers,
            "restoring the last checkpoint"
        ),
        None => info!("no checkpoint to restore; reading the topic from the start"),
    }
    // Processes decide boundaries independently; without a wall-clock gap
    // they decide alike whenever the watermark steps through each boundary.
    let interval = config.checkpoint.interval;
    let gap = if cluster.processes == 1 {
        interval / 2
    } else {
        Duration::ZERO
    };
    let schedule = Arc::new(Schedule::new(interval, gap, boundary));
    let durable = writer.durable();
    let (committer, part_sinks) = Committer::start(
        checkpoints,
        members,
        config.checkpoint.keep,
        Arc::clone(&schedule),
        move || durable.through(),
    )
    .context("starting the checkpoint thread")?;

    let stats = Arc::new(JobStats::new(workers));
    let metrics_server = match args.metrics_listen {
        Some(address) => {
            let listener = runtime
                .block_on(tokio::net::TcpListener::bind(address))
                .with_context(|| format!("binding {address}"))?;
            // A line for scripts that start workers on port 0.
            println!("metrics on http://{}", listener.local_addr()?);
            let live = live.clone();
            let observe = job_observer(
                Arc::clone(&stats),
                Arc::clone(&committer.stats),
                // The brokers hold the log; their own metrics give its size.
                Box::new(|| 0),
                Box::new(move || live.dropped()),
            );
            let (quit, stopped) = tokio::sync::oneshot::channel::<()>();
            let server = runtime.spawn(tally_gateway::serve_worker(
                listener,
                Arc::new(JobMetrics::new(observe)),
                async {
                    let _ = stopped.await;
                },
            ));
            Some((quit, server))
        }
        None => None,
    };
    let stop = Arc::new(AtomicBool::new(false));
    let settings = JobSettings {
        processes: cluster.processes,
        ..JobSettings::from_config(&config)
    };
    let store_sinks: Vec<_> = (0..threads).map(|_| writer.window_sink()).collect();
    let dead_sinks: Vec<_> = (0..threads).map(|_| writer.dead_letter_sink()).collect();
    let timely_config = timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads,
            process,
            addresses: cluster.addresses.clone(),
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    };
    info!(
        process,
        processes = cluster.processes,
        threads,
        partitions = ?owned,
        "connecting to the other processes"
    );
    let guards = {
        let (kafka, live) = (config.kafka.clone(), live.clone());
        let shared = Shared {
            partitions,
            restored,
            settings,
            stats: Arc::clone(&stats),
            backpressure: Backpressure::default(),
            schedule,
            stop: Arc::clone(&stop),
        };
        timely::execute(timely_config, move |worker| {
            let local = worker.index() - process * threads;
            let sinks = Sinks {
                store: store_sinks[local].clone(),
                live: live.clone(),
                dead_letters: DeadLetterTopic::new(&kafka, dead_sinks[local].clone())
                    .expect("the Kafka configuration was accepted at start-up"),
            };
            shared.run(
                worker,
                |mine, starts| {
                    KafkaSource::new(&kafka, mine, starts)
                        .expect("the Kafka configuration was accepted at start-up")
                },
                sinks,
                part_sinks[local].clone(),
            );
        })
        .map_err(|e| anyhow::anyhow!("starting timely workers: {e}"))?
    };
    drop(live);
    info!(process, "tally worker is running");
    runtime.block_on(shutdown_signal());
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
    stop.store(true, Ordering::Relaxed);
    for result in guards.join() {
        if let Err(e) = result {
            tracing::error!(error = %e, "a worker panicked");
        }
    }
    committer.join();
    writer.close();
    archive.stop();
    if publisher.join().is_err() {
        tracing::error!("the redis publisher panicked");
    }
    info!("stopped cleanly");
    Ok(())
}
