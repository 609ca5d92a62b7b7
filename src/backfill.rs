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

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::Context;
use tally_connectors::bus::inprocess::LivePublisher;
use tally_connectors::checkpoint::{Checkpoint, CheckpointStore, Members};
use tally_connectors::log::EventLog;
use tally_connectors::store::StoreWriter;
use tally_dataflow::backfill::{merge, remap, Plan, Side};
use tally_dataflow::checkpoint::PartitionCut;
use tally_dataflow::config::{Config, MetricSpec};
use tally_dataflow::fingerprint;
use tally_gateway::catalog::{self, Catalog};
use tracing::{info, warn};

use crate::job::{checkpoint_store, Counters, Job, Spec};
use crate::run::Embedded;

/// How often the supervisor looks at the backfill.
const TICK: Duration = Duration::from_millis(250);

/// How often `tally run` logs a backfill's progress.
const LOG_EVERY: Duration = Duration::from_secs(10);

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
    /// and says what to run.
    pub fn plan(config: &Config) -> anyhow::Result<Start> {
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
            backfill_store(config, &[])?
                .clear()
                .context("deleting a backfill's checkpoints")?;
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
            None => checkpoints
                .clear()
                .context("deleting a backfill's checkpoints")?,
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

/// What the supervisor needs to start jobs.
pub struct Wiring {
    /// The configuration.
    pub config: Arc<Config>,
    /// The log both jobs read.
    pub log: EventLog,
    /// The store both jobs write.
    pub writer: Arc<StoreWriter>,
    /// The live bus, which the live job publishes to.
    pub live: LivePublisher,
    /// What the gateway serves.
    pub catalog: Arc<Catalog>,
    /// The live job's counters.
    pub counters: Counters,
}

/// The thread that runs the jobs of `tally run` and ends a backfill.
pub struct Supervisor {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<()>,
}

impl Supervisor {
    /// Starts the jobs of `start` and watches them.
    pub fn start(context: Wiring, start: Start) -> anyhow::Result<Supervisor> {
        let job = context.run(start.live)?;
        let mut backfill = match start.backfill {
            Some(spec) => Some(Backfill::start(&context, spec)?),
            None => None,
        };
        if let Some(backfill) = backfill.as_mut() {
            context
                .catalog
                .set_backfill(Some(backfill.status(&context)));
        }
        let stop = Arc::new(AtomicBool::new(false));
        let jobs = Jobs {
            context,
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

impl Wiring {
    /// Starts the live job of `spec`, counting in the live job's counters.
    fn run(&self, spec: Spec) -> anyhow::Result<Job> {
        self.job(spec, &self.counters)
    }

    /// Starts the job of `spec`, counting in `counters`.
    fn job(&self, spec: Spec, counters: &Counters) -> anyhow::Result<Job> {
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
}

/// The running jobs.
struct Jobs {
    context: Wiring,
    /// The live job; `None` only while it is replaced.
    job: Option<Job>,
    backfill: Option<Backfill>,
}

impl Jobs {
    fn supervise(mut self, stop: &AtomicBool) {
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(TICK);
            let Some(backfill) = self.backfill.as_mut() else {
                continue;
            };
            let status = backfill.status(&self.context);
            self.context.catalog.set_backfill(Some(status));
            let ready = match backfill.ready(&self.context.config.metrics) {
                Ok(ready) => ready,
                Err(e) => {
                    warn!(error = %e, "cannot read the checkpoints that would end the backfill; trying again");
                    None
                }
            };
            if let Some(merged) = ready {
                if let Err(e) = self.switch(merged) {
                    // Both jobs are stopped; a restart resumes from the
                    // newest checkpoints, which are whole.
                    tracing::error!(
                        error = format!("{e:#}"),
                        "cannot activate the backfilled metrics; exiting"
                    );
                    std::process::exit(1);
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

    /// Ends the backfill: the live job starts again from `merged`, with the
    /// configured metrics active.
    fn switch(&mut self, merged: Checkpoint) -> anyhow::Result<()> {
        let backfill = self.backfill.take().expect("a backfill to end");
        let boundary = merged.boundary;
        backfill.job.stop();
        if let Some(job) = self.job.take() {
            job.stop();
        }
        let context = &mut self.context;
        let configured = context.config.metrics.clone();
        let checkpoints = checkpoint_store(&context.config, &configured)?;
        checkpoints
            .install(merged)
            .context("installing the merged checkpoint")?;
        backfill
            .checkpoints
            .clear()
            .context("deleting the backfill's checkpoints")?;
        let metrics = Arc::new(configured.clone());
        context.writer.in_use(configured.clone());
        context.catalog.activate(Arc::clone(&metrics));
        context.catalog.set_backfill(None);
        context.live = context.live.renew(metrics);
        let restored = checkpoints
            .latest()
            .context("reading the merged checkpoint")?;
        self.job = Some(context.run(Spec {
            metrics: configured,
            checkpoints,
            restored,
            live: true,
        })?);
        info!(
            boundary,
            took = ?backfill.started.elapsed(),
            "backfill done; the new definitions are active"
        );
        Ok(())
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
    /// Events before the checkpoint it resumed from.
    resumed: u64,
    /// The end of each partition of the log when it started: the two jobs
    /// meet at a checkpoint past it, one both took side by side on events
    /// that arrived since.
    ends: Vec<u64>,
    started: Instant,
    /// The newest of its checkpoints that did not end it.
    tried: Option<u64>,
    /// Events read at the last look, and when, for the rate.
    last: (u64, Instant),
    rate: f64,
    logged: Instant,
}

impl Backfill {
    fn start(context: &Wiring, spec: Spec) -> anyhow::Result<Backfill> {
        let ends = context.log.next_offsets();
        let metrics = spec.metrics.clone();
        let resumed = spec
            .restored
            .as_ref()
            .map_or(0, |c| c.cuts.iter().map(|c| c.next_offset).sum());
        let counters = Counters::new(context.config.workers());
        let job = context.job(spec, &counters)?;
        let now = Instant::now();
        Ok(Backfill {
            job,
            counters,
            checkpoints: backfill_store(&context.config, &metrics)?,
            live: checkpoint_store(&context.config, &[])?,
            metrics,
            resumed,
            ends,
            started: now,
            tried: None,
            last: (resumed, now),
            rate: 0.0,
            logged: now,
        })
    }

    /// Where it stands, and its progress in the log now and then.
    fn status(&mut self, context: &Wiring) -> catalog::Backfill {
        let read = self.resumed + self.counters.job.events_read.load(Ordering::Relaxed);
        let to_read: u64 = context.log.next_offsets().iter().sum();
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
        let lag = match (lowest(&context.counters), lowest(&self.counters)) {
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
            info!(
                progress = format!("{:.1}%", status.progress() * 100.0),
                read = status.read,
                to_read = status.to_read,
                events_per_second = status.rate.round(),
                lag_seconds = lag / 1000,
                "backfilling"
            );
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
            workers: 1,
            cuts: live.cuts,
            groups,
            metrics: configured.to_vec(),
        }))
    }
}
