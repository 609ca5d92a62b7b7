//! The embedded log as a timely source: a reader thread per worker.
//!
//! A timely worker must never block, so the files are read on a thread of
//! their own, which follows the worker's partitions and hands complete record
//! batches over a bounded channel. A full channel stops the reader, which is
//! how a slow dataflow leaves its backlog on disk. After handing over data the
//! reader wakes the source operator; while caught up it sleeps until the
//! next append.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::{bounded, Receiver, TryRecvError};
use tally_dataflow::event::record;
use tally_dataflow::ports::{BatchSource, Poll, SourceBatch, Waker, POLL_RECORDS};
use tally_dataflow::time::Millis;
use tracing::{debug, error, warn};

use super::{EventLog, LogError};

/// Batches in flight between a reader thread and its worker.
const CHANNEL_BATCHES: usize = 64;
/// Bytes read from one partition per pass, so partitions take turns.
const READ_BYTES: usize = 1 << 20;
/// Longest sleep while caught up; appends wake the reader sooner.
const IDLE_WAIT: Duration = Duration::from_millis(50);

/// One worker's partitions of the embedded log.
pub struct LogSource {
    log: EventLog,
    partitions: Vec<u32>,
    /// Where each partition starts, by position in `partitions`.
    starts: Vec<u64>,
    rx: Option<Receiver<SourceBatch>>,
    waker: Option<Waker>,
    stop: Arc<AtomicBool>,
}

impl LogSource {
    /// A source over `partitions`, each read from its offset in `starts`
    /// (a partition not named there is read from its first offset).
    pub fn new(log: EventLog, partitions: Vec<u32>, starts: &[(u32, u64)]) -> LogSource {
        let starts = partitions
            .iter()
            .map(|p| {
                starts
                    .iter()
                    .find(|(q, _)| q == p)
                    .map_or(0, |&(_, offset)| offset)
            })
            .collect();
        LogSource {
            log,
            partitions,
            starts,
            rx: None,
            waker: None,
            stop: Arc::default(),
        }
    }
}

impl Drop for LogSource {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl BatchSource for LogSource {
    fn partitions(&self) -> Vec<u32> {
        self.partitions.clone()
    }

    fn start(&mut self, waker: Waker) {
        let (tx, rx) = bounded(CHANNEL_BATCHES);
        self.rx = Some(rx);
        self.waker = Some(Arc::clone(&waker));
        let (log, stop) = (self.log.clone(), Arc::clone(&self.stop));
        let (partitions, starts) = (self.partitions.clone(), self.starts.clone());
        let spawned = std::thread::Builder::new().name("log-reader".into()).spawn(move || {
            if let Err(e) = read_loop(&log, &partitions, &starts, &stop, |batch| {
                let sent = tx.send(batch).is_ok();
                waker();
                sent
            }) {
                error!(error = %e, ?partitions, "the log reader stopped; the dataflow will not see new events");
            }
        });
        if let Err(e) = spawned {
            error!(error = %e, "cannot start a log reader thread");
        }
    }

    fn poll(&mut self) -> Poll {
        let Some(rx) = &self.rx else {
            return Poll::Pending;
        };
        let mut batches = Vec::new();
        let mut records = 0;
        while records < POLL_RECORDS {
            match rx.try_recv() {
                Ok(batch) => {
                    records += batch.records.len();
                    batches.push(batch);
                }
                Err(TryRecvError::Empty) => break,
                // The reader has stopped and logged why, at ERROR. Its
                // partitions go idle and stop holding the watermark back.
                Err(TryRecvError::Disconnected) => break,
            }
        }
        if batches.is_empty() {
            return Poll::Pending;
        }
        if records >= POLL_RECORDS && !rx.is_empty() {
            // The reader wakes the source only when it hands a batch over.
            if let Some(waker) = &self.waker {
                waker();
            }
            return Poll::Behind(batches);
        }
        Poll::Ready(batches)
    }

    fn mark(&mut self, partition: u32, watermark: Millis) {
        if !self
            .log
            .append_detached(partition, vec![record::mark(watermark)])
        {
            debug!(
                partition,
                "the log did not take a watermark mark; asking again later"
            );
        }
    }
}

/// Follows `partitions` from `starts` until `stop` is raised or `deliver`
/// refuses a batch.
fn read_loop(
    log: &EventLog,
    partitions: &[u32],
    starts: &[u64],
    stop: &AtomicBool,
    mut deliver: impl FnMut(SourceBatch) -> bool,
) -> Result<(), LogError> {
    let mut readers = partitions
        .iter()
        .zip(starts)
        .map(|(&p, &offset)| log.reader(p, offset))
        .collect::<Result<Vec<_>, _>>()?;
    while !stop.load(Ordering::Relaxed) {
        let mut read_any = false;
        for reader in &mut readers {
            let batches = match reader.poll(READ_BYTES) {
                Ok(batches) => batches,
                Err(e) if e.is_retryable() => {
                    warn!(error = %e, "cannot read the log; retrying");
                    std::thread::sleep(IDLE_WAIT);
                    continue;
                }
                Err(e) => return Err(e),
            };
            for mut batch in batches {
                read_any = true;
                // A reader starts at the whole batch holding its offset.
                let start = starts[partitions
                    .iter()
                    .position(|&p| p == batch.partition)
                    .unwrap_or(0)];
                if batch.base_offset < start {
                    let skip = ((start - batch.base_offset) as usize).min(batch.records.len());
                    batch.records.drain(..skip);
                    batch.base_offset += skip as u64;
                    if batch.records.is_empty() {
                        continue;
                    }
                }
                let source_batch = SourceBatch {
                    partition: batch.partition,
                    offset: batch.base_offset,
                    next_offset: batch.base_offset + batch.records.len() as u64,
                    records: batch.records,
                    appended_at: Some(batch.append_time_ms),
                };
                if !deliver(source_batch) {
                    return Ok(());
                }
            }
        }
        if !read_any {
            log.wait_for_append(IDLE_WAIT);
        }
    }
    Ok(())
}
