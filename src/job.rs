//! One timely worker of tally, as `tally run` and `tally worker` both run it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tally_connectors::checkpoint::{Checkpoint, PartSink};
use tally_dataflow::checkpoint::{Restore, Schedule};
use tally_dataflow::job::{self, JobSettings, Sinks};
use tally_dataflow::operators::deliver::{Backpressure, Sink};
use tally_dataflow::operators::source::{BatchSource, DeadLetter};
use tally_dataflow::operators::windows::WindowUpdate;
use tally_dataflow::stats::JobStats;
use timely::worker::Worker;
use tracing::info;

/// What every worker of a process shares.
pub struct Shared {
    /// Partitions of the event log.
    pub partitions: u32,
    /// The checkpoint the job resumes from.
    pub restored: Option<Checkpoint>,
    pub settings: JobSettings,
    pub stats: Arc<JobStats>,
    pub backpressure: Backpressure,
    /// The checkpoint boundaries the process takes.
    pub schedule: Arc<Schedule>,
    /// Set to stop the workers.
    pub stop: Arc<AtomicBool>,
}

impl Shared {
    /// Runs the job on `worker` until `stop`: it reads the partitions `p`
    /// with `p % peers == index`, through the source `source` makes of them
    /// and of the offsets they resume from, restores its share of the
    /// checkpoint, and writes to `sinks` and its checkpoint parts to `parts`.
    pub fn run<S, St, Li, De>(
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
        let mine: Vec<u32> = (0..self.partitions)
            .filter(|p| *p as usize % workers == index)
            .collect();
        let restore = self.restored.as_ref().map_or_else(Restore::default, |c| {
            Restore::share(c.boundary, &c.cuts, &c.groups, &mine, index, workers)
        });
        let starts: Vec<(u32, u64)> = restore
            .cuts
            .iter()
            .map(|c| (c.partition, c.next_offset))
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
                &self.backpressure,
                restore,
                Some(target),
            )
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
