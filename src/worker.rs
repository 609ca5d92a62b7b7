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
//! A changed metric is backfilled as in `tally run` (see `crate::backfill`),
//! each process running its share of the backfill in a second timely
//! computation at `cluster.backfill_addresses`; process 0 records in
//! ClickHouse which definitions are active, and the gateways follow.
//!
//! Services that are down are waited for with backoff, and said so in the
//! logs; once running, a ClickHouse outage stalls the dataflow (Kafka keeps
//! the backlog) and a Redis outage drops live updates only.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use tally_connectors::archive::Archive;
use tally_connectors::bus::redis::{Progress, RedisPublisher};
use tally_connectors::checkpoint::{Checkpoint, Members};
use tally_connectors::kafka::dead_letters::DeadLetterTopic;
use tally_connectors::kafka::{self, source::KafkaSource, TopicEnds};
use tally_connectors::retry;
use tally_connectors::store::clickhouse::ClickHouseStore;
use tally_connectors::store::{DeadLetterSink, StoreWriter};
use tally_dataflow::config::{Config, MetricSpec};
use tally_dataflow::fingerprint;
use tally_dataflow::routing::process_partitions;
use tally_gateway::catalog;
use tally_gateway::ops::{JobMetrics, Observed};
use tracing::info;

use crate::backfill::{Host, Start, Supervisor};
use crate::job::{Counters, Job, Mode, Spec};
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
    let start = Start::plan(&config, process == 0)?;
    let store = ClickHouseStore::new(&config.clickhouse);
    runtime.block_on(store.prepare(&start.in_use(), config.backfill.keep_old));
    if process == 0 {
        // The gateways serve what the live job computes, until a backfill
        // ends.
        let boundary = start.live.restored.as_ref().map_or(0, |c| c.boundary);
        runtime.block_on(retry::until_ok(
            "record the active metrics in ClickHouse",
            || store.activate(&start.live.metrics, boundary),
        ));
    }
    let writer = Arc::new(
        store
            .writer(
                start.in_use(),
                config.backfill.keep_old,
                config.dataflow.store_queue,
            )
            .context("starting the ClickHouse writer")?,
    );
    let lateness = config.dataflow.revision_horizon();
    let (live, publisher) = RedisPublisher::start(
        &config.redis,
        &start.live.metrics,
        lateness,
        (process, cluster.processes),
        config.live.bus_queue,
    )
    .context("configuring the Redis publisher")?;
    let owned = process_partitions(partitions, process, threads, workers);
    let archive = Archive::start(&config.kafka, store.clone(), owned.clone(), process == 0)
        .context("starting the raw-event archive")?;
    let counters = Counters::new(workers);
    let share = Arc::new(Mutex::new(None));
    let metrics_server = match metrics_listener {
        Some(listener) => {
            // A line for scripts that start workers on port 0.
            println!("metrics on http://{}", listener.local_addr()?);
            let live = live.clone();
            let job = job_observer(
                &counters,
                writer.stalls(),
                // The brokers hold the log; their own metrics give its size.
                Box::new(|| 0),
                Box::new(move || live.dropped()),
            );
            let share = Arc::clone(&share);
            let observe = Box::new(move || Observed {
                backfill: share.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                ..job()
            });
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
    info!(
        process,
        processes = cluster.processes,
        threads,
        partitions = ?owned,
        "connecting to the other processes"
    );
    let host = Process {
        config: Arc::clone(&config),
        members,
        partitions,
        owned,
        writer: Arc::clone(&writer),
        live,
        store,
        ends: TopicEnds::new(&config.kafka).context("configuring the Kafka client")?,
        progress: Progress::new(&config.redis).context("configuring the Redis client")?,
        share,
        runtime: runtime.handle().clone(),
    };
    let supervisor = Supervisor::start(Arc::clone(&config), host, counters, start)?;
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
    supervisor.stop();
    match Arc::try_unwrap(writer) {
        Ok(writer) => writer.close(),
        Err(_) => tracing::error!(
            "the store writer is still shared; its queue is recomputed from the last checkpoint"
        ),
    }
    archive.stop();
    if publisher.join().is_err() {
        tracing::error!("the redis publisher panicked");
    }
    info!("stopped cleanly");
    Ok(())
}

/// One worker process of the cluster, as the jobs' supervisor sees it.
struct Process {
    config: Arc<Config>,
    members: Members,
    /// Partitions of the events topic.
    partitions: u32,
    /// Those this process reads.
    owned: Vec<u32>,
    writer: Arc<StoreWriter>,
    /// The live job's publisher.
    live: RedisPublisher,
    /// Where the active metrics are recorded.
    store: ClickHouseStore,
    ends: TopicEnds,
    /// Where the gateways read this process's share of a backfill.
    progress: Progress,
    /// The same, for this process's `/metrics`.
    share: Arc<Mutex<Option<catalog::Backfill>>>,
    runtime: tokio::runtime::Handle,
}

impl Host for Process {
    fn leads(&self) -> bool {
        self.members.process == 0
    }

    fn workers(&self) -> usize {
        self.members.processes * self.members.threads
    }

    fn start(&self, spec: Spec, counters: &Counters) -> anyhow::Result<Job> {
        let cluster = &self.config.cluster;
        let mode = Cluster {
            config: Arc::clone(&self.config),
            process: self.members.process,
            threads: self.members.threads,
            addresses: if spec.live {
                cluster.addresses.clone()
            } else {
                cluster.backfill_addresses.clone()
            },
            live: self.live.clone(),
            runtime: self.runtime.clone(),
        };
        Job::prepare(
            &self.config,
            self.members,
            self.partitions,
            &self.writer,
            &mode,
            spec,
            counters,
        )?
        .run(mode)
    }

    fn reads(&self, partition: u32) -> bool {
        self.owned.contains(&partition)
    }

    fn ends(&mut self) -> anyhow::Result<Vec<u64>> {
        Ok(self.ends.read(self.partitions)?)
    }

    fn report(&mut self, share: Option<&catalog::Backfill>) {
        *self.share.lock().unwrap_or_else(|e| e.into_inner()) = share.cloned();
        let json = share.map(|s| serde_json::to_string(s).expect("a backfill's share serializes"));
        self.progress.report(self.members.process, json.as_deref());
    }

    fn decide(&mut self, metrics: &[MetricSpec], boundary: u64) -> anyhow::Result<()> {
        self.runtime.block_on(retry::until_ok(
            "record the backfilled metrics as active in ClickHouse",
            || self.store.activate(metrics, boundary),
        ));
        Ok(())
    }

    fn decided(&mut self, metrics: &[MetricSpec]) -> anyhow::Result<Option<u64>> {
        let active = self
            .runtime
            .block_on(self.store.active())
            .context("reading the active metrics from ClickHouse")?;
        let job = fingerprint::job(metrics);
        Ok(active
            .filter(|a| fingerprint::job(&a.metrics) == job)
            .map(|a| a.boundary))
    }

    fn activate(&mut self, metrics: &[MetricSpec]) {
        self.writer.in_use(metrics.to_vec());
        self.live = self.live.renew(metrics);
    }
}

/// `tally worker`: one process of a timely cluster, reading the events
/// topic and publishing to Redis.
struct Cluster {
    config: Arc<Config>,
    process: usize,
    threads: usize,
    /// Where the processes of this computation connect.
    addresses: Vec<String>,
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
            addresses: self.addresses.clone(),
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
        let oldest = self
            .runtime
            .block_on(async move {
                tokio::task::spawn_blocking(move || kafka::check_offsets(&kafka, &cuts)).await
            })?
            .context("checking the checkpoint's offsets against the events topic")?;
        // Ids in events retention deleted are forgotten: their repeats count.
        for (cut, oldest) in checkpoint.cuts.iter_mut().zip(oldest) {
            if let Some(from) = cut.dedupe_from.filter(|&from| from < oldest) {
                tracing::warn!(
                    partition = cut.partition,
                    from,
                    oldest,
                    "retention deleted events whose ids the checkpoint remembers; their repeats will count"
                );
                cut.dedupe_from = Some(oldest);
            }
        }
        Ok(())
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
