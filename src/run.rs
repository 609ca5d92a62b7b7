//! `tally run`: the embedded pipeline in one process.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_connectors::bus::inprocess;
use tally_connectors::checkpoint::{CheckpointStore, Committer, Members};
use tally_connectors::log::{EventLog, LogSource};
use tally_connectors::store::sqlite::SqliteStore;
use tally_dataflow::checkpoint::{PartitionCut, Schedule};
use tally_dataflow::config::Config;
use tally_dataflow::job::{JobSettings, Sinks};
use tally_dataflow::operators::deliver::Backpressure;
use tally_dataflow::stats::JobStats;
use tally_gateway::backend::{EmbeddedLog, EmbeddedStore, EventSink};
use tally_gateway::live::Hub;
use tally_gateway::ops::{JobMetrics, Ops};
use tally_gateway::Gateway;
use tracing::info;

use crate::job::Shared;
use crate::{job_observer, load_config, shutdown_signal, toml_string, RunArgs};

/// Batches of live updates in flight between the workers and the fan-out.
const LIVE_BUS_BATCHES: usize = 1024;

/// Runs until SIGTERM or Ctrl-C.
pub fn run(args: RunArgs) -> anyhow::Result<()> {
    let mut overrides = Vec::new();
    if let Some(listen) = args.listen {
        overrides.push(("server.listen", toml_string(&listen.to_string())));
    }
    if let Some(dir) = &args.data_dir {
        overrides.push(("storage.data_dir", toml_string(&dir.to_string_lossy())));
    }
    if let Some(workers) = args.workers {
        overrides.push(("dataflow.workers", workers.to_string()));
    }
    let config = Arc::new(load_config(args.config.as_deref(), &overrides)?);
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let log = open_log(&config, &data_dir.join("log"))?;
    let (store, writer) = SqliteStore::open(&data_dir.join("results.db"), config.metrics.clone())
        .context("opening the result store")?;
    let workers = config.workers();
    let stats = Arc::new(JobStats::new(workers));
    let (live, bus) = inprocess::channel(LIVE_BUS_BATCHES);

    // The last committed checkpoint, if any, and the thread that commits
    // the next ones.
    let checkpoints = CheckpointStore::open(
        config.checkpoint.url.as_deref(),
        &data_dir.join("checkpoints"),
        format!("{:?}", config.metrics),
    )
    .context("opening the checkpoint store")?;
    let mut restored = checkpoints
        .latest()
        .context("reading the last checkpoint")?;
    if let Some(checkpoint) = restored.as_mut() {
        clamp_to_log(&mut checkpoint.cuts, &log.next_offsets());
    }
    let boundary = restored.as_ref().map_or(0, |c| c.boundary);
    match &restored {
        Some(c) => info!(
            boundary,
            workers = c.workers,
            groups = c.groups.len(),
            "restoring the last checkpoint"
        ),
        None => info!("no checkpoint to restore; reading the log from the start"),
    }
    let interval = config.checkpoint.interval;
    let schedule = Arc::new(Schedule::new(interval, interval / 2, boundary));
    let durable = writer.durable();
    let (committer, part_sinks) = Committer::start(
        checkpoints,
        Members::single(workers),
        config.checkpoint.keep,
        Arc::clone(&schedule),
        move || durable.through(),
    )
    .context("starting the checkpoint thread")?;

    // The timely workers, one thread each, reading their share of partitions.
    let stop = Arc::new(AtomicBool::new(false));
    let settings = JobSettings::from_config(&config);
    let guards = {
        let (log, live) = (log.clone(), live.clone());
        // One store sink of each kind per worker: checkpoints wait for all of them.
        let store_sinks: Vec<_> = (0..workers).map(|_| writer.window_sink()).collect();
        let dead_sinks: Vec<_> = (0..workers).map(|_| writer.dead_letter_sink()).collect();
        let shared = Shared {
            partitions: log.partitions(),
            restored,
            settings,
            stats: Arc::clone(&stats),
            backpressure: Backpressure::default(),
            schedule,
            stop: Arc::clone(&stop),
        };
        timely::execute(timely::Config::process(workers), move |worker| {
            let index = worker.index();
            let sinks = Sinks {
                store: store_sinks[index].clone(),
                live: live.clone(),
                dead_letters: dead_sinks[index].clone(),
            };
            shared.run(
                worker,
                |mine, starts| LogSource::new(log.clone(), mine, starts),
                sinks,
                part_sinks[index].clone(),
            );
        })
        .map_err(|e| anyhow::anyhow!("starting timely workers: {e}"))?
    };

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("gateway")
        .build()?;
    let events = Arc::new(EmbeddedLog::new(log.clone()));
    let observe = {
        let (events, live) = (Arc::clone(&events), live.clone());
        job_observer(
            Arc::clone(&stats),
            Arc::clone(&committer.stats),
            Box::new(move || events.log_bytes()),
            Box::new(move || live.dropped()),
        )
    };
    drop(live);
    let ops = Arc::new(Ops::new(Some(JobMetrics::new(observe))));
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("binding {}", config.server.listen))?;
        let address = listener.local_addr()?;
        let lateness = config.dataflow.allowed_lateness + config.dataflow.out_of_orderness;
        let hub = Hub::start(
            Arc::new(config.metrics.clone()),
            lateness,
            bus,
            Arc::clone(&ops),
            None,
        );
        let gateway = Arc::new(Gateway {
            config: Arc::clone(&config),
            events: Arc::clone(&events) as Arc<dyn EventSink>,
            history: Arc::new(EmbeddedStore(Arc::new(store))),
            hub,
            ops: Arc::clone(&ops),
        });
        let retention = tokio::spawn(enforce_retention(log.clone()));
        let demo = args
            .demo
            .then(|| tokio::spawn(crate::demo::feed(Arc::clone(&events) as Arc<dyn EventSink>)));
        ops.set_ready(true);
        info!(%address, workers, data_dir = %data_dir.display(), "tally is listening");
        // A line for scripts and tests that start tally on port 0.
        println!("listening on http://{address}");
        tally_gateway::serve(listener, gateway, shutdown_signal()).await;
        info!("shutting down");
        retention.abort();
        if let Some(demo) = demo {
            demo.abort();
        }
        anyhow::Ok(())
    })?;
    drop(runtime);

    stop.store(true, Ordering::Relaxed);
    for result in guards.join() {
        if let Err(e) = result {
            tracing::error!(error = %e, "a worker panicked");
        }
    }
    drop(events);
    committer.join();
    writer.close();
    log.close().context("closing the event log")?;
    info!("stopped cleanly");
    Ok(())
}

/// A log written with `fsync` other than `always` can lose its tail in a
/// machine crash, after a checkpoint named offsets in it. New events take
/// those offsets again, so reading resumes at the log's end, not past it.
fn clamp_to_log(cuts: &mut [PartitionCut], ends: &[u64]) {
    for cut in cuts {
        let end = ends.get(cut.partition as usize).copied().unwrap_or(0);
        if cut.next_offset > end {
            tracing::warn!(
                partition = cut.partition,
                checkpoint = cut.next_offset,
                log = end,
                "the log ends before the checkpoint's offset; events after the log's end were lost"
            );
            cut.next_offset = end;
        }
    }
}

fn open_log(config: &Config, dir: &Path) -> anyhow::Result<EventLog> {
    EventLog::open(dir, &config.log)
        .with_context(|| format!("opening the event log in {}", dir.display()))
}

/// Deletes log segments older than the retention, once a minute.
async fn enforce_retention(log: EventLog) {
    let mut tick = tokio::time::interval(Duration::from_secs(60));
    loop {
        tick.tick().await;
        let log = log.clone();
        let now = tally_gateway::now_ms();
        match tokio::task::spawn_blocking(move || log.enforce_retention(now)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(deleted)) => info!(deleted, "deleted log segments past retention"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot enforce log retention"),
            Err(e) => tracing::warn!(error = %e, "the retention task failed"),
        }
    }
}
