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
use tally_dataflow::operators::source::{BatchSource, Poll, SourceBatch, Waker};
use tracing::{error, warn};

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
    rx: Option<Receiver<SourceBatch>>,
    stop: Arc<AtomicBool>,
}

impl LogSource {
    /// A source over `partitions`, read from their first offset.
    pub fn new(log: EventLog, partitions: Vec<u32>) -> LogSource {
        LogSource { log, partitions, rx: None, stop: Arc::default() }
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
        let (log, partitions, stop) = (self.log.clone(), self.partitions.clone(), Arc::clone(&self.stop));
        let spawned = std::thread::Builder::new().name("log-reader".into()).spawn(move || {
            if let Err(e) = read_loop(&log, &partitions, &stop, |batch| {
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
        let Some(rx) = &self.rx else { return Poll::Pending };
        let mut batches = Vec::new();
        while batches.len() < CHANNEL_BATCHES {
            match rx.try_recv() {
                Ok(batch) => batches.push(batch),
                Err(TryRecvError::Empty) => break,
                // The reader has stopped and logged why, at ERROR. Its
                // partitions go idle and stop holding the watermark back.
                Err(TryRecvError::Disconnected) => break,
            }
        }
        if batches.is_empty() {
            Poll::Pending
        } else {
            Poll::Ready(batches)
        }
    }
}

/// Follows `partitions` until `stop` is raised or `deliver` refuses a batch.
fn read_loop(
    log: &EventLog,
    partitions: &[u32],
    stop: &AtomicBool,
    mut deliver: impl FnMut(SourceBatch) -> bool,
) -> Result<(), LogError> {
    let mut readers = partitions.iter().map(|&p| log.reader(p, 0)).collect::<Result<Vec<_>, _>>()?;
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
            for batch in batches {
                read_any = true;
                let source_batch =
                    SourceBatch { partition: batch.partition, offset: batch.base_offset, records: batch.records };
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
