//! The jobs of `tally run`: the live one, and a backfill while a changed
//! configuration needs one.
//!
//! On start, the newest checkpoint says which definitions made it, and
//! [`Plan`] compares them with the configured ones. Unchanged metrics go on
//! in the live job from the checkpoint; a changed metric goes on there by
//! its old definition, which keeps serving history and live, while a
//! backfill job computes the new definition, and any new metric, from the
//! log's beginning. The backfill writes only results, of the new versions,
//! checkpoints in a store of its own (`checkpoints/backfill`), so that a
//! restart resumes it, and runs on threads of the lowest priority.
//!
//! Once the backfill has caught up, both jobs commit a checkpoint at the
//! same boundary over the same offsets. They meet on live traffic: at the
//! first such checkpoint that holds events appended after the backfill
//! started, once event time has moved on by a `checkpoint.interval`. The supervisor then stops both,
//! [`merge`]s the two checkpoints into one of the configured metrics,
//! installs it as the live job's newest, activates the new definitions in
//! the catalog and the hub, and starts the live job again from it.
//!
//! What differs between `tally run` and a cluster is a [`Host`]. In a
//! cluster each worker process runs its share of both jobs, the backfill a
//! second timely computation on `cluster.backfill_addresses`. Process 0
//! leads: it alone deletes what a plan leaves behind, and it decides where
//! the backfill ends, recording the new definitions as active from that
//! boundary (in ClickHouse, where the gateways read them). Every process
//! stops both jobs on that word, and the others start the live job again
//! once process 0 has installed the merged checkpoint.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use tally_connectors::checkpoint::{Checkpoint, CheckpointStore};
use tally_dataflow::backfill::{merge, remap, Plan, Side};
use tally_dataflow::checkpoint::PartitionCut;
use tally_dataflow::config::{Config, MetricSpec};
use tally_dataflow::fingerprint;
use tally_gateway::catalog;
use tracing::{info, warn};

use crate::job::{checkpoint_store, Counters, Job, Spec};

/// How often the supervisor looks at the backfill.
const TICK: Duration = Duration::from_millis(250);

/// How often `tally run` logs a backfill's progress.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// How often the end of the log is read again for the progress.
const ENDS_EVERY: Duration = Duration::from_secs(1);

/// How long a process that did not lead waits for the merged checkpoint.
const INSTALL_DEADLINE: Duration = Duration::from_secs(60);

/// Where the jobs of a process run: `tally run`, or one worker process of
/// a cluster.
pub trait Host: Send + 'static {
    /// Whether this process leads: it deletes what a plan leaves behind,
    /// and decides where a backfill ends.
    fn leads(&self) -> bool;

    /// Workers in a job, over every process.
    fn workers(&self) -> usize;

    /// Starts this process's share of the job `spec`, counting in
    /// `counters`. In a cluster this waits for every process to start it.
    fn start(&self, spec: Spec, counters: &Counters) -> anyhow::Result<Job>;

    /// Whether this process reads `partition`.
    fn reads(&self, partition: u32) -> bool;

    /// Where each partition of the log ends now, in partition order.
    fn ends(&mut self) -> anyhow::Result<Vec<u64>>;

    /// Shows this process's share of the backfill, or that none runs.
    fn report(&mut self, share: Option<&catalog::Backfill>);

    /// Tells every process that the backfill ends at `boundary`, where the
    /// live job goes on with `metrics`. Only the leader decides.
    fn decide(&mut self, metrics: &[MetricSpec], boundary: u64) -> anyhow::Result<()>;

    /// The boundary the leader decided that the backfill to `metrics`
    /// ends at, once it has.
    fn decided(&mut self, metrics: &[MetricSpec]) -> anyhow::Result<Option<u64>>;

    /// Serves `metrics` from now on: the live job that starts next computes
    /// them.
    fn activate(&mut self, metrics: &[MetricSpec]);
}

/// What `tally run` starts with: the live job's spec, the backfill's if
/// one is needed, and the metrics the live job runs meanwhile.
pub struct Start {
    /// The live job.
    pub live: Spec,
    /// The backfill, if the configuration needs one.
    pub backfill: Option<Spec>,
}

impl Start {
    /// Compares the configured metrics with those of the newest checkpoint
    /// and says what to run. Only a process that `leads` deletes the
    /// checkpoints of a backfill that is cancelled or begun anew; the others
    /// come to the same plan over the same checkpoints.
    pub fn plan(config: &Config, leads: bool) -> anyhow::Result<Start> {
        let configured = &config.metrics;
        let checkpoints = checkpoint_store(config, configured)?;
        let newest = checkpoints
            .latest()
            .context("reading the last checkpoint")?;
        let (live, plan) = match newest {
            None => {
                let live = Spec {
                    metrics: configured.clone(),
                    checkpoints,
                    restored: None,
                    live: true,
                };
                (live, None)
            }
            Some(mut restored) => {
                let plan = Plan::new(configured, &restored.metrics);
                if !plan.removed.is_empty() {
                    info!(metrics = ?plan.removed, "metrics no longer configured stop; their results are kept for backfill.keep_old");
                }
                restored.groups = remap(restored.groups, &restored.metrics, &plan.live);
                restored.metrics.clone_from(&plan.live);
                let live = Spec {
                    checkpoints: checkpoint_store(config, &plan.live)?,
                    metrics: plan.live.clone(),
                    restored: Some(restored),
                    live: true,
                };
                (live, Some(plan).filter(|p| !p.is_settled()))
            }
        };
        let Some(plan) = plan else {
            // A backfill the last run left is of definitions no longer
            // configured: it is cancelled.
            if leads {
                backfill_store(config, &[])?
                    .clear()
                    .context("deleting a backfill's checkpoints")?;
            }
            return Ok(Start {
                live,
                backfill: None,
            });
        };
        let checkpoints = backfill_store(config, &plan.backfill)?;
        let resumed = checkpoints
            .latest()
            .context("reading the backfill's last checkpoint")?
            .filter(|c| fingerprint::job(&c.metrics) == fingerprint::job(&plan.backfill));
        match &resumed {
            Some(c) => info!(
                boundary = c.boundary,
                "resuming the backfill from its checkpoint"
            ),
            None if leads => checkpoints
                .clear()
                .context("deleting a backfill's checkpoints")?,
            None => {}
        }
        info!(
            metrics = ?plan.backfill.iter().map(|m| &m.name).collect::<Vec<_>>(),
            "backfilling changed and new metrics from the log; the old definitions serve meanwhile"
        );
        Ok(Start {
            live,
            backfill: Some(Spec {
                metrics: plan.backfill,
                checkpoints,
                restored: resumed,
                live: false,
            }),
        })
    }

    /// Every metric whose results the jobs write: both definitions of a
    /// changed metric are in use while its backfill runs.
    pub fn in_use(&self) -> Vec<MetricSpec> {
        let mut metrics = self.live.metrics.clone();
        metrics.extend(self.backfill.iter().flat_map(|b| b.metrics.iter().cloned()));
        metrics
    }
}

/// The backfill job's checkpoint store under `config`, of `metrics`.
fn backfill_store(config: &Config, metrics: &[MetricSpec]) -> anyhow::Result<CheckpointStore> {
    let dir = config.storage.data_dir.join("checkpoints").join("backfill");
    let url = config
        .checkpoint
        .url
        .as_ref()
        .map(|u| format!("{}/backfill", u.trim_end_matches('/')));
    CheckpointStore::open(url.as_deref(), &dir, metrics)
        .context("opening the backfill's checkpoint store")
}

/// The thread that runs the jobs of a process and ends a backfill.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Supervisor {
    /// Starts the jobs of `start` on `host` and watches them, the live
    /// job counting in `counters`.
    pub fn start<H: Host>(
        config: Arc<Config>,
        mut host: H,
        counters: Counters,
        start: Start,
    ) -> anyhow::Result<Supervisor> {
        let job = host.start(start.live, &counters)?;
        let mut backfill = match start.backfill {
            Some(spec) => Some(Backfill::start(&config, &mut host, spec)?),
            None => None,
        };
        if let Some(backfill) = backfill.as_mut() {
            let share = backfill.status(&mut host, &counters);
            host.report(Some(&share));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let jobs = Jobs {
            config,
            host,
            counters,
            job: Some(job),
            backfill,
        };
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("supervisor".into())
                .spawn(move || jobs.supervise(&stop))?
        };
        Ok(Supervisor { stop, thread })
    }

    /// Stops every job and waits for them.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            tracing::error!("the job supervisor panicked");
        }
    }
}

/// The running jobs.
struct Jobs<H> {
    config: Arc<Config>,
    host: H,
    /// The live job's.
    counters: Counters,
    /// The live job; `None` only while it is replaced.
    job: Option<Job>,
    backfill: Option<Backfill>,
}

impl<H: Host> Jobs<H> {
    fn supervise(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            let Some(backfill) = self.backfill.as_mut() else {
                continue;
            };
            let share = backfill.status(&mut self.host, &self.counters);
            self.host.report(Some(&share));
            let configured = &self.config.metrics;
            let end = if self.host.leads() {
                backfill
                    .ready(configured)
                    .map(|ready| ready.map(End::Merged))
            } else {
                self.host
                    .decided(configured)
                    .map(|decided| decided.map(End::Installed))
            };
            match end {
                Ok(Some(end)) => {
                    if let Err(e) = self.switch(end) {
                        // Both jobs are stopped; a restart resumes from the
                        // newest checkpoints, which are whole.
                        tracing::error!(
                            error = format!("{e:#}"),
                            "cannot activate the backfilled metrics; exiting"
                        );
                        std::process::exit(1);
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    warn!(
                        error = format!("{e:#}"),
                        "cannot tell whether the backfill has ended; trying again"
                    );
                }
            }
        }
        if let Some(backfill) = self.backfill.take() {
            backfill.job.stop();
        }
        if let Some(job) = self.job.take() {
            job.stop();
        }
    }

    /// Ends the backfill: the live job starts again at the end's boundary,
    /// with the configured metrics active.
    fn switch(&mut self, end: End) -> anyhow::Result<()> {
        let backfill = self.backfill.take().expect("a backfill to end");
        let configured = self.config.metrics.clone();
        let boundary = match &end {
            End::Merged(merged) => merged.boundary,
            End::Installed(boundary) => *boundary,
        };
        if let End::Merged(_) = end {
            self.host.decide(&configured, boundary)?;
        }
        // Every process stops both jobs, in this order, on the decision.
        backfill.job.stop();
        if let Some(job) = self.job.take() {
            job.stop();
        }
        let checkpoints = checkpoint_store(&self.config, &configured)?;
        match end {
            End::Merged(merged) => {
                checkpoints
                    .install(merged)
                    .context("installing the merged checkpoint")?;
                backfill
                    .checkpoints
                    .clear()
                    .context("deleting the backfill's checkpoints")?;
            }
            End::Installed(_) => wait_for_install(&checkpoints, &configured, boundary)?,
        }
        self.host.activate(&configured);
        self.host.report(None);
        let restored = checkpoints
            .latest()
            .context("reading the merged checkpoint")?;
        self.job = Some(self.host.start(
            Spec {
                metrics: configured,
                checkpoints,
                restored,
                live: true,
            },
            &self.counters,
        )?);
        info!(
            boundary,
            took = ?backfill.started.elapsed(),
            "backfill done; the new definitions are active"
        );
        Ok(())
    }
}

/// How a process learns that the backfill ends.
enum End {
    /// It leads, and has merged the two jobs' checkpoints into this one.
    Merged(Checkpoint),
    /// The leader decided on this boundary, and installs the merged
    /// checkpoint there.
    Installed(u64),
}

/// Waits until the leader has installed the merged checkpoint of `metrics`
/// at `boundary` (or one after it) in `checkpoints`.
fn wait_for_install(
    checkpoints: &CheckpointStore,
    metrics: &[MetricSpec],
    boundary: u64,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + INSTALL_DEADLINE;
    let job = fingerprint::job(metrics);
    loop {
        // Only a checkpoint at the boundary or after it is worth reading.
        let newest = checkpoints
            .newest()
            .context("reading the last checkpoint")?;
        if newest.is_some_and(|b| b >= boundary) {
            let latest = checkpoints
                .latest()
                .context("reading the last checkpoint")?;
            if latest.is_some_and(|c| fingerprint::job(&c.metrics) == job) {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("process 0 did not install the merged checkpoint at {boundary} within {INSTALL_DEADLINE:?}");
        }
        std::thread::sleep(TICK);
    }
}

/// A backfill job and what the supervisor knows of it.
struct Backfill {
    job: Job,
    counters: Counters,
    /// Its checkpoints, to read.
    checkpoints: CheckpointStore,
    /// The live job's checkpoints, to read.
    live: CheckpointStore,
    /// What it computes.
    metrics: Vec<MetricSpec>,
    /// Log positions before the checkpoint it resumed from, in the
    /// partitions this process reads.
    resumed: u64,
    /// The end of each partition of the log when it started: the two jobs
    /// meet at a checkpoint past it, one both took side by side on events
    /// that arrived since.
    ends: Vec<u64>,
    /// Log positions in this process's partitions, when last read.
    to_read: (u64, Instant),
    started: Instant,
    /// The newest of its checkpoints that did not end it.
    tried: Option<u64>,
    /// Events read at the last look, and when, for the rate.
    last: (u64, Instant),
    rate: f64,
    logged: Instant,
}

impl Backfill {
    fn start(config: &Config, host: &mut impl Host, spec: Spec) -> anyhow::Result<Backfill> {
        let ends = host.ends().context("reading where the log ends")?;
        let metrics = spec.metrics.clone();
        let resumed = spec.restored.as_ref().map_or(0, |c| {
            c.cuts
                .iter()
                .filter(|c| host.reads(c.partition))
                .map(|c| c.next_offset)
                .sum()
        });
        let counters = Counters::new(host.workers());
        let job = host.start(spec, &counters)?;
        let now = Instant::now();
        Ok(Backfill {
            job,
            counters,
            checkpoints: backfill_store(config, &metrics)?,
            live: checkpoint_store(config, &[])?,
            metrics,
            resumed,
            to_read: (read_here(host, &ends), now),
            ends,
            started: now,
            tried: None,
            last: (resumed, now),
            rate: 0.0,
            logged: now,
        })
    }

    /// Where this process's share stands, beside the live job counting in
    /// `live`, and its progress in the log now and then.
    fn status(&mut self, host: &mut impl Host, live: &Counters) -> catalog::Backfill {
        let read = self.resumed + self.counters.job.positions_read.load(Ordering::Relaxed);
        if self.to_read.1.elapsed() >= ENDS_EVERY {
            match host.ends() {
                Ok(ends) => self.to_read = (read_here(host, &ends), Instant::now()),
                Err(e) => warn!(error = format!("{e:#}"), "cannot read where the log ends"),
            }
        }
        let to_read = self.to_read.0;
        let (before, at) = self.last;
        let elapsed = at.elapsed().as_secs_f64();
        if elapsed > 0.0 {
            // Smoothed over a few seconds.
            let now = read.saturating_sub(before) as f64 / elapsed;
            self.rate = if self.rate == 0.0 {
                now
            } else {
                0.8 * self.rate + 0.2 * now
            };
        }
        self.last = (read, Instant::now());
        let lowest = |counters: &Counters| counters.job.watermarks().into_iter().flatten().min();
        let lag = match (lowest(live), lowest(&self.counters)) {
            (Some(live), Some(backfill)) => live.saturating_sub(backfill).max(0),
            (Some(live), None) => live,
            _ => 0,
        };
        let status = catalog::Backfill {
            metrics: self.metrics.clone(),
            read: read.min(to_read),
            to_read,
            rate: self.rate,
            lag,
        };
        if self.logged.elapsed() >= LOG_EVERY {
            self.logged = Instant::now();
            if status.read >= status.to_read {
                info!(
                    read = status.read,
                    "the backfill has read the log; its metrics become active at a checkpoint on the next events"
                );
            } else {
                info!(
                    progress = format!("{:.1}%", status.progress() * 100.0),
                    read = status.read,
                    to_read = status.to_read,
                    events_per_second = status.rate.round(),
                    lag_seconds = lag / 1000,
                    "backfilling"
                );
            }
        }
        status
    }

    /// The checkpoint of the configured metrics that ends the backfill,
    /// once its newest checkpoint and the live job's at the same boundary
    /// cut the log at the same offsets.
    fn ready(&mut self, configured: &[MetricSpec]) -> anyhow::Result<Option<Checkpoint>> {
        let Some(boundary) = self.checkpoints.newest()? else {
            return Ok(None);
        };
        if self.tried == Some(boundary) {
            return Ok(None);
        }
        let Some(live) = self.live.at(boundary)? else {
            if self.live.newest()?.is_some_and(|newest| newest > boundary) {
                // The live job passed it without a checkpoint there.
                self.tried = Some(boundary);
            }
            return Ok(None);
        };
        let past = |c: &PartitionCut| {
            c.next_offset > self.ends.get(c.partition as usize).copied().unwrap_or(0)
        };
        if !live.cuts.iter().any(past) {
            // Both replayed what the log held at the start.
            self.tried = Some(boundary);
            return Ok(None);
        }
        let Some(built) = self.checkpoints.at(boundary)? else {
            return Ok(None);
        };
        let workers = live.workers;
        let groups = merge(
            Side {
                cuts: &live.cuts,
                groups: live.groups,
                metrics: &live.metrics,
            },
            Side {
                cuts: &built.cuts,
                groups: built.groups,
                metrics: &built.metrics,
            },
            configured,
        );
        let Some(groups) = groups else {
            // An idle partition was stamped otherwise in one of them; the
            // next boundary will do.
            self.tried = Some(boundary);
            return Ok(None);
        };
        Ok(Some(Checkpoint {
            boundary,
            workers,
            cuts: live.cuts,
            groups,
            metrics: configured.to_vec(),
        }))
    }
}

/// The log positions up to `ends` in the partitions `host` reads.
fn read_here(host: &impl Host, ends: &[u64]) -> u64 {
    (0u32..)
        .zip(ends)
        .filter(|(partition, _)| host.reads(*partition))
        .map(|(_, end)| end)
        .sum()
}
