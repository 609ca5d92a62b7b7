//! Counters the job keeps for operators, read by the `/metrics` endpoint.
//!
//! They are plain atomics, updated once per batch or activation, never per
//! record, so that observing the job costs nothing measurable. Nothing the
//! job decides reads them: coordination state is in [`crate::coordination`].

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;

use crate::config::MetricSpec;

/// Shared counters of one process's timely workers.
#[derive(Debug)]
pub struct JobStats {
    /// Each worker's watermark, in Unix milliseconds; -1 before the first.
    watermarks: Vec<AtomicI64>,
    /// Window results emitted as final, revisions included.
    pub windows_emitted: AtomicU64,
    /// Contributions applied to windows that had already closed.
    pub late_updates: AtomicU64,
    /// Events sent to the dead letters.
    pub dead_letters: AtomicU64,
    /// Events dropped as repeats of an `eventId` (see [`crate::dedupe`]).
    pub duplicates: AtomicU64,
    /// Records the sources have read from the log.
    pub events_read: AtomicU64,
    /// Log positions the sources have passed: records of the embedded
    /// log, messages of Kafka. A backfill's progress is counted in them.
    pub positions_read: AtomicU64,
    /// Per worker, the groups each metric holds by all its dimensions, by
    /// name; updated when the cap decides a time.
    groups: Vec<Mutex<BTreeMap<String, u64>>>,
    /// Events each metric counted in its overflow group, by name.
    overflowed: Mutex<BTreeMap<String, u64>>,
}

impl JobStats {
    /// Counters for `workers` workers.
    pub fn new(workers: usize) -> JobStats {
        JobStats {
            watermarks: (0..workers).map(|_| AtomicI64::new(-1)).collect(),
            windows_emitted: AtomicU64::new(0),
            late_updates: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            events_read: AtomicU64::new(0),
            positions_read: AtomicU64::new(0),
            groups: (0..workers).map(|_| Mutex::default()).collect(),
            overflowed: Mutex::default(),
        }
    }

    /// Records the groups worker `worker` holds of each metric of `tables`
    /// (its table by all its dimensions), as `held` says by table index.
    pub fn set_groups(&self, worker: usize, tables: &[MetricSpec], held: impl Fn(usize) -> usize) {
        let Some(groups) = self.groups.get(worker) else {
            return;
        };
        let mut groups = groups.lock().unwrap_or_else(|e| e.into_inner());
        for (table, spec) in tables.iter().enumerate() {
            if spec.rollup_of.is_none() {
                let held = held(table) as u64;
                match groups.get_mut(&spec.name) {
                    Some(n) => *n = held,
                    None => {
                        groups.insert(spec.name.clone(), held);
                    }
                }
            }
        }
    }

    /// Adds the events each of `tables` sent to its overflow group, by
    /// table index, to its metric's count.
    pub fn add_overflowed(&self, tables: &[MetricSpec], events: &[u64]) {
        if events.iter().all(|&n| n == 0) {
            return;
        }
        let mut overflowed = self.overflowed.lock().unwrap_or_else(|e| e.into_inner());
        for (spec, &n) in tables.iter().zip(events) {
            if spec.rollup_of.is_none() && n > 0 {
                *overflowed.entry(spec.name.clone()).or_default() += n;
            }
        }
    }

    /// Per metric name: the groups it holds, and the events it counted in
    /// its overflow group.
    pub fn groups(&self) -> BTreeMap<String, (u64, u64)> {
        let mut all: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        for worker in &self.groups {
            for (name, &n) in worker.lock().unwrap_or_else(|e| e.into_inner()).iter() {
                all.entry(name.clone()).or_default().0 += n;
            }
        }
        for (name, &n) in self
            .overflowed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            all.entry(name.clone()).or_default().1 = n;
        }
        all
    }

    /// Records worker `worker`'s watermark.
    pub fn set_watermark(&self, worker: usize, watermark: u64) {
        if let Some(w) = self.watermarks.get(worker) {
            w.store(watermark as i64, Ordering::Relaxed);
        }
    }

    /// Each worker's watermark, or `None` before it has one.
    pub fn watermarks(&self) -> Vec<Option<i64>> {
        self.watermarks
            .iter()
            .map(|w| Some(w.load(Ordering::Relaxed)).filter(|&w| w > 0))
            .collect()
    }
}
