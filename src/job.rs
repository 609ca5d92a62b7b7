//! The job, as `tally run` and `tally worker` both start it.
//!
//! Starting the job is one sequence in both modes: open the checkpoint
//! store under the fingerprint of the configured metrics, take its newest
//! committed checkpoint, check it against the log, delete the previous
//! run's unfinished checkpoints, start the thread that commits new ones,
//! and start the timely workers, each with its share of the partitions, the
//! restored state and its sinks. Stopping is one sequence too: stop the
//! workers, join them, then join the committer.
//!
//! [`Job::prepare`] does everything up to the workers, so that a worker
//! process can serve its counters while timely connects the processes;
//! [`Starting::run`] starts the workers.
//!
//! What differs between the modes is a [`Mode`]: how timely connects the
//! workers, which log a worker reads, where its live values and dead
//! letters go, and how a restored checkpoint is checked against the log.
//! What a mode owns besides (the store writer, the log, the archive, the
//! Redis publisher) it closes itself after [`Job::stop`].
//!
//! What a job computes is a [`Spec`]: its metrics, its checkpoints, and
//! whether it is the live job or a backfill, which only writes results
//! (see `crate::backfill`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tally_connectors::checkpoint::{
    Checkpoint, CheckpointStats, CheckpointStore, Committer, Members, PartSink,
};
use tally_connectors::store::{DeadLetterSink, StoreWriter, WindowSink};
use tally_dataflow::checkpoint::{Restore, Schedule};
use tally_dataflow::config::{Config, MetricSpec};
use tally_dataflow::coordination::Coordination;
use tally_dataflow::job::{self, JobSettings, Sinks};
use tally_dataflow::model::{DeadLetter, WindowUpdate};
use tally_dataflow::ports::{BatchSource, Sink};
use tally_dataflow::routing::worker_partitions;
use tally_dataflow::stats::JobStats;
use timely::worker::Worker;
use timely::WorkerConfig;
use tracing::info;

/// What `tally run` and `tally worker` do differently.
pub trait Mode: Send + Sync + 'static {
    /// What a worker reads its partitions through.
    type Source: BatchSource;
    /// Where a worker's live values go.
    type Live: Sink<Arc<WindowUpdate>>;
    /// Where a worker's dead letters go.
    type DeadLetters: Sink<DeadLetter>;

    /// How timely connects this process's workers to the others.
    fn communication(&self) -> timely::CommunicationConfig;

    /// Makes a restored checkpoint fit the log it resumes on, or refuses
    /// to start with one that does not.
    fn check_restore(&self, checkpoint: &mut Checkpoint) -> anyhow::Result<()>;

    /// The source of `partitions`, each resuming at its offset in `starts`
    /// (a partition without one starts at the log's beginning).
    fn source(&self, partitions: Vec<u32>, starts: &[(u32, u64)]) -> Self::Source;

    /// A worker's live sink.
    fn live(&self) -> Self::Live;

    /// A worker's dead-letter sink, around the store's.
    fn dead_letters(&self, store: DeadLetterSink) -> Self::DeadLetters;
}

/// What a job computes, and where its checkpoints go.
pub struct Spec {
    /// The metrics, whose indices its state and results use.
    pub metrics: Vec<MetricSpec>,
    /// Where its checkpoints are, of these metrics.
    pub checkpoints: CheckpointStore,
    /// The checkpoint it resumes from, indexed by `metrics`.
    pub restored: Option<Checkpoint>,
    /// Whether it is the live job, which publishes live values and writes
    /// dead letters. A backfill writes only results, and its threads yield
    /// the processor to the live job's.
    pub live: bool,
}

/// The checkpoint store of the live job under `config`, holding `metrics`.
pub fn checkpoint_store(
    config: &Config,
    metrics: &[MetricSpec],
) -> anyhow::Result<CheckpointStore> {
    let dir = config.storage.data_dir.join("checkpoints");
    CheckpointStore::open(config.checkpoint.url.as_deref(), &dir, metrics)
        .context("opening the checkpoint store")
}

/// A job's counters, which outlive the job: the live job that takes over
/// from a finished backfill counts on where the one before left off.
#[derive(Clone)]
pub struct Counters {
    /// The workers'.
    pub job: Arc<JobStats>,
    /// The checkpoints'.
    pub checkpoints: Arc<CheckpointStats>,
}

impl Counters {
    /// Counters for a job of `workers` workers.
    pub fn new(workers: usize) -> Counters {
        Counters {
            job: Arc::new(JobStats::new(workers)),
            checkpoints: Arc::default(),
        }
    }
}

/// A job whose checkpoint is restored and whose committer runs, about to
/// start its workers.
pub struct Starting {
    shared: Shared,
    committer: Committer,
    parts: Vec<PartSink>,
    members: Members,
    store_sinks: Vec<WindowSink>,
    dead_sinks: Vec<DeadLetterSink>,
    live: bool,
}

/// A running job: the timely workers of this process and the checkpoint
/// committer.
pub struct Job {
    committer: Committer,
    workers: timely::communication::WorkerGuards<()>,
    stop: Arc<AtomicBool>,
}

impl Job {
    /// Prepares this process's share of the job `spec`, `members` saying
    /// which share that is, over a log of `partitions` partitions, writing
    /// results through `writer` and counting in `counters`: checks the
    /// checkpoint it restores with `mode`, and starts the committer.
    /// [`Starting::run`] then starts the workers; in between, the job's
    /// counters can already be served.
    pub fn prepare(
        config: &Config,
        members: Members,
        partitions: u32,
        writer: &StoreWriter,
        mode: &impl Mode,
        spec: Spec,
        counters: &Counters,
    ) -> anyhow::Result<Starting> {
        let Spec {
            metrics,
            checkpoints,
            mut restored,
            live,
        } = spec;
        if let Some(checkpoint) = restored.as_mut() {
            mode.check_restore(checkpoint)?;
        }
        let boundary = restored.as_ref().map_or(0, |c| c.boundary);
        if members.process == 0 {
            // A checkpoint the previous run began and never committed would
            // otherwise be taken for this run's. Process 0 deletes them
            // before it joins the computation, and the other processes
            // cannot write before it has joined.
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
                groups = c.groups.len(),
                "restoring the last checkpoint"
            ),
            None => info!("no checkpoint to restore; reading the log from the start"),
        }
        // Processes decide boundaries independently; without a wall-clock
        // gap they decide alike whenever the watermark steps through each
        // boundary. A single process may rate-limit them.
        let interval = config.checkpoint.interval;
        let gap = if members.processes == 1 {
            interval / 2
        } else {
            Duration::ZERO
        };
        let schedule = Arc::new(Schedule::new(interval, gap, boundary));
        // One store sink of each kind per worker: checkpoints wait for all
        // of them.
        let sinks = writer.sinks(&metrics, members.threads, live);
        let durable = sinks.durable;
        let (committer, parts) = Committer::start(
            checkpoints,
            members,
            config.checkpoint.keep,
            Arc::clone(&schedule),
            move || durable.through(),
            Arc::clone(&counters.checkpoints),
        )
        .context("starting the checkpoint thread")?;
        let shared = Shared {
            partitions,
            restored,
            settings: JobSettings {
                metrics,
                processes: members.processes,
                ..JobSettings::from_config(config)
            },
            stats: Arc::clone(&counters.job),
            coordination: Coordination::default(),
            schedule,
            stop: Arc::new(AtomicBool::new(false)),
        };
        Ok(Starting {
            shared,
            committer,
            parts,
            members,
            store_sinks: sinks.windows,
            dead_sinks: sinks.dead_letters,
            live,
        })
    }

    /// Stops the workers and waits for them, then for the committer. What
    /// the workers held is recomputed from the log on the next start.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        for result in self.workers.join() {
            if let Err(e) = result {
                tracing::error!(error = %e, "a worker panicked");
            }
        }
        self.committer.join();
    }
}

impl Starting {
    /// Starts the timely workers of this process, which read, write and
    /// connect as `mode` says. In a cluster, this waits for timely to
    /// connect every process.
    pub fn run<M: Mode>(self, mode: M) -> anyhow::Result<Job> {
        let Starting {
            shared,
            committer,
            parts,
            members,
            store_sinks,
            dead_sinks,
            live,
        } = self;
        let stop = Arc::clone(&shared.stop);
        let timely_config = timely::Config {
            communication: mode.communication(),
            worker: WorkerConfig::default(),
        };
        let first = members.process * members.threads;
        let workers = timely::execute(timely_config, move |worker| {
            let local = worker.index() - first;
            if !live {
                yield_processor();
            }
            // A backfill's dead letters are the live job's too, which writes
            // them; what it would publish live is long past.
            let sinks = Sinks {
                store: store_sinks[local].clone(),
                live: live.then(|| mode.live()),
                dead_letters: dead_sinks.get(local).map(|d| mode.dead_letters(d.clone())),
            };
            shared.run(
                worker,
                |mine, starts| mode.source(mine, starts),
                sinks,
                parts[local].clone(),
            );
        })
        .map_err(|e| anyhow::anyhow!("starting timely workers: {e}"))?;
        Ok(Job {
            committer,
            workers,
            stop,
        })
    }
}

/// Lowers the calling thread's scheduling priority to the lowest, so that
/// a backfill takes only what the live job leaves of the processors.
fn yield_processor() {
    // On Linux a thread has a nice value of its own; `who` is its id.
    // SAFETY: plain system calls on the calling thread.
    let done = unsafe {
        let thread = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, thread, 19)
    };
    if done != 0 {
        tracing::warn!(error = %std::io::Error::last_os_error(), "cannot lower a backfill thread's priority");
    }
}

/// What every worker of a process shares.
struct Shared {
    /// Partitions of the event log.
    partitions: u32,
    /// The checkpoint the job resumes from.
    restored: Option<Checkpoint>,
    settings: JobSettings,
    stats: Arc<JobStats>,
    coordination: Coordination,
    /// The checkpoint boundaries the process takes.
    schedule: Arc<Schedule>,
    /// Set to stop the workers.
    stop: Arc<AtomicBool>,
}

impl Shared {
    /// Runs the job on `worker` until `stop`: it reads its partitions
    /// (see [`worker_partitions`]) through the source `source` makes of
    /// them and of the offsets they resume from, restores its share of the
    /// checkpoint, and writes to `sinks` and its checkpoint parts to `parts`.
    fn run<S, St, Li, De>(
        &self,
        worker: &mut Worker,
        source: impl FnOnce(Vec<u32>, &[(u32, u64)]) -> S,
        sinks: Sinks<St, Li, De>,
        parts: PartSink,
    ) where
        S: BatchSource,
        St: Sink<Arc<WindowUpdate>>,
        Li: Sink<Arc<WindowUpdate>>,
        De: Sink<DeadLetter>,
    {
        let (index, workers) = (worker.index(), worker.peers());
        let mine = worker_partitions(self.partitions, index, workers);
        let restore = self.restored.as_ref().map_or_else(Restore::default, |c| {
            Restore::share(c.boundary, &c.cuts, &c.groups, &mine, index, workers)
        });
        // Read again from the first id still remembered at the cut.
        let starts: Vec<(u32, u64)> = restore
            .cuts
            .iter()
            .map(|c| {
                (
                    c.partition,
                    c.next_offset.min(c.dedupe_from.unwrap_or(u64::MAX)),
                )
            })
            .collect();
        let source = source(mine.clone(), &starts);
        let target = (Arc::clone(&self.schedule), Box::new(parts) as Box<_>);
        worker.dataflow::<u64, _, _>(|scope| {
            job::build(
                scope,
                source,
                &self.settings,
                Arc::clone(&self.stats),
                sinks,
                &self.coordination,
                restore,
                Some(target),
            );
        });
        info!(worker = index, partitions = ?mine, "worker started");
        while !self.stop.load(Ordering::Relaxed) {
            worker.step_or_park(Some(Duration::from_millis(100)));
        }
        // The sources never finish, so stop the dataflow rather than wait
        // for it; what it held is recomputed from the log on restart.
        for dataflow in worker.installed_dataflows() {
            worker.drop_dataflow(dataflow);
        }
    }
}
