//! `tally run`: the embedded pipeline in one process.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_connectors::bus::inprocess::{self, LivePublisher};
use tally_connectors::checkpoint::{Checkpoint, Members};
use tally_connectors::log::{EventLog, LogSource};
use tally_connectors::store::sqlite::SqliteStore;
use tally_connectors::store::{DeadLetterSink, StoreWriter};
use tally_dataflow::checkpoint::PartitionCut;
use tally_dataflow::config::{Config, MetricSpec};
use tally_gateway::backend::{EmbeddedLog, EmbeddedStore, EventSink, History};
use tally_gateway::catalog::{self, Catalog};
use tally_gateway::live::Hub;
use tally_gateway::ops::{JobMetrics, Observed, Ops};
use tally_gateway::Gateway;
use tracing::info;

use crate::backfill::{Host, Start, Supervisor};
use crate::job::{Counters, Job, Mode, Spec};
use crate::{job_observer, load_config, server_runtime, shutdown_signal, toml_string, RunArgs};

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
    // The address is taken first: a second tally on the same port must stop
    // at once, not start its workers and then wait on them forever.
    let runtime = server_runtime(&config)?;
    let listener = runtime
        .block_on(tokio::net::TcpListener::bind(config.server.listen))
        .with_context(|| format!("binding {}", config.server.listen))?;
    let address = listener.local_addr()?;
    let data_dir = config.storage.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    let log = open_log(&config, &data_dir.join("log"))?;
    let start = Start::plan(&config, true)?;
    let (store, writer) = SqliteStore::open(
        &data_dir.join("results.db"),
        start.in_use(),
        config.backfill.keep_old,
        config.dataflow.store_queue,
    )
    .context("opening the result store")?;
    let writer = Arc::new(writer);
    let workers = config.workers();
    let (live, bus) = inprocess::channel(config.live.bus_queue);
    let catalog = Arc::new(Catalog::new(start.live.metrics.clone()));
    let counters = Counters::new(workers);
    let supervisor = Supervisor::start(
        Arc::clone(&config),
        Process {
            config: Arc::clone(&config),
            log: log.clone(),
            writer: Arc::clone(&writer),
            live: live.clone(),
            catalog: Arc::clone(&catalog),
        },
        counters.clone(),
        start,
    )?;

    let events = Arc::new(EmbeddedLog::new(log.clone()));
    let observe = {
        let (events, live) = (Arc::clone(&events), live.clone());
        let job = job_observer(
            &counters,
            writer.stalls(),
            Box::new(move || events.log_bytes()),
            Box::new(move || live.dropped()),
        );
        let catalog = Arc::clone(&catalog);
        Box::new(move || Observed {
            backfill: catalog.backfill(),
            ..job()
        })
    };
    drop(live);
    let ops = Arc::new(Ops::new(Some(JobMetrics::new(observe))));
    runtime.block_on(async {
        let lateness = config.dataflow.revision_horizon();
        let hub = Hub::start(Arc::clone(&catalog), lateness, bus, Arc::clone(&ops), None);
        let history: Arc<dyn History> = Arc::new(EmbeddedStore(Arc::new(store)));
        hub.seed(Arc::clone(&history), &config.live, lateness);
        let gateway = Arc::new(Gateway {
            config: Arc::clone(&config),
            catalog: Arc::clone(&catalog),
            events: Arc::clone(&events) as Arc<dyn EventSink>,
            history,
            hub,
            ops: Arc::clone(&ops),
        });
        let retention = tokio::spawn(enforce_retention(log.clone()));
        let demo = args
            .demo
            .then(|| tokio::spawn(crate::demo::feed(Arc::clone(&events) as Arc<dyn EventSink>)));
        ops.set_ready(true);
        // Before the word that tally listens: see `shutdown_signal`.
        let shutdown = shutdown_signal();
        info!(%address, workers, data_dir = %data_dir.display(), "tally is listening");
        // A line for scripts and tests that start tally on port 0.
        println!("listening on http://{address}");
        tally_gateway::serve(listener, gateway, shutdown).await;
        info!("shutting down");
        retention.abort();
        if let Some(demo) = demo {
            demo.abort();
        }
    });
    drop(runtime);

    supervisor.stop();
    drop(events);
    match Arc::try_unwrap(writer) {
        Ok(writer) => writer.close(),
        Err(_) => tracing::error!("the store writer is still shared; results queued at shutdown are written on the next start"),
    }
    log.close().context("closing the event log")?;
    info!("stopped cleanly");
    Ok(())
}

/// `tally run`: the workers are threads of this process, reading the
/// embedded log and publishing to the in-process bus.
struct Embedded {
    /// The log the workers read.
    log: EventLog,
    /// The bus they publish to.
    live: LivePublisher,
    /// Workers in the job.
    workers: usize,
}

impl Mode for Embedded {
    type Source = LogSource;
    type Live = LivePublisher;
    type DeadLetters = DeadLetterSink;

    fn communication(&self) -> timely::CommunicationConfig {
        timely::CommunicationConfig::Process(self.workers)
    }

    fn check_restore(&self, checkpoint: &mut Checkpoint) -> anyhow::Result<()> {
        clamp_to_log(&mut checkpoint.cuts, &self.log.next_offsets());
        Ok(())
    }

    fn source(&self, partitions: Vec<u32>, starts: &[(u32, u64)]) -> LogSource {
        LogSource::new(self.log.clone(), partitions, starts)
    }

    fn live(&self) -> LivePublisher {
        self.live.worker()
    }

    fn dead_letters(&self, store: DeadLetterSink) -> DeadLetterSink {
        store
    }
}

/// The one process of `tally run`, as the jobs' supervisor sees it.
struct Process {
    config: Arc<Config>,
    log: EventLog,
    writer: Arc<StoreWriter>,
    /// The bus the live job publishes to.
    live: LivePublisher,
    /// What the gateway serves.
    catalog: Arc<Catalog>,
}

impl Host for Process {
    fn leads(&self) -> bool {
        true
    }

    fn workers(&self) -> usize {
        self.config.workers()
    }

    fn start(&self, spec: Spec, counters: &Counters) -> anyhow::Result<Job> {
        let workers = self.config.workers();
        let mode = Embedded {
            log: self.log.clone(),
            live: self.live.clone(),
            workers,
        };
        Job::prepare(
            &self.config,
            Members::single(workers),
            self.log.partitions(),
            &self.writer,
            &mode,
            spec,
            counters,
        )?
        .run(mode)
    }

    fn reads(&self, _: u32) -> bool {
        true
    }

    fn ends(&mut self) -> anyhow::Result<Vec<u64>> {
        Ok(self.log.next_offsets())
    }

    fn report(&mut self, share: Option<&catalog::Backfill>) {
        self.catalog.set_backfill(share.cloned());
    }

    fn decide(&mut self, _: &[MetricSpec], _: u64) -> anyhow::Result<()> {
        Ok(())
    }

    fn decided(&mut self, _: &[MetricSpec]) -> anyhow::Result<Option<u64>> {
        Ok(None)
    }

    fn activate(&mut self, metrics: &[MetricSpec]) {
        let metrics = Arc::new(metrics.to_vec());
        self.writer.in_use(metrics.to_vec());
        self.catalog.activate(Arc::clone(&metrics));
        self.live = self.live.renew(metrics);
    }
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
        let now = tally_dataflow::time::now_ms();
        match tokio::task::spawn_blocking(move || log.enforce_retention(now)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(deleted)) => info!(deleted, "deleted log segments past retention"),
            Ok(Err(e)) => tracing::warn!(error = %e, "cannot enforce log retention"),
            Err(e) => tracing::warn!(error = %e, "the retention task failed"),
        }
    }
}
