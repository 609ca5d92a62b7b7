//! The in-process live bus: a bounded tokio channel, which carries the
//! workers' updates and, once every worker has passed it, their watermark.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tally_dataflow::config::MetricSpec;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::ports::Sink;
use tokio::sync::mpsc::{self, error::TrySendError, Receiver, Sender};

use super::{Full, Live, Watermarks};

/// The publishing end. Each worker takes its own with
/// [`LivePublisher::worker`].
#[derive(Clone)]
pub struct LivePublisher {
    tx: Sender<Live>,
    dropped: Arc<AtomicU64>,
    watermarks: Watermarks,
    /// This worker's slot in `watermarks`.
    worker: Option<usize>,
}

impl LivePublisher {
    /// Updates dropped because the subscriber was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// The publisher of a job that starts anew, with the metrics of
    /// `metrics`: what the workers of the job before passed on no longer
    /// holds the new workers' watermark back. The hub hears of the metrics
    /// before any update of theirs. Blocks while the bus is full; call it
    /// from no runtime's thread.
    pub fn renew(&self, metrics: Arc<Vec<MetricSpec>>) -> LivePublisher {
        // Closed only at shutdown, when nobody is listening.
        let _ = self.tx.blocking_send(Live::Metrics(metrics));
        LivePublisher {
            watermarks: Watermarks::default(),
            worker: None,
            ..self.clone()
        }
    }

    /// A worker's publisher. The bus passes on a watermark once every
    /// worker that took one has passed it.
    pub fn worker(&self) -> LivePublisher {
        LivePublisher {
            worker: Some(self.watermarks.register()),
            ..self.clone()
        }
    }
}

/// A bus holding at most `capacity` batches in flight.
pub fn channel(capacity: usize) -> (LivePublisher, Receiver<Live>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        LivePublisher {
            tx,
            dropped: Arc::default(),
            watermarks: Watermarks::default(),
            worker: None,
        },
        rx,
    )
}

impl Sink<Arc<WindowUpdate>> for LivePublisher {
    fn offer(&mut self, items: &mut Vec<Arc<WindowUpdate>>) {
        match self.tx.try_send(Live::Updates(std::mem::take(items))) {
            Ok(()) => {}
            Err(
                TrySendError::Full(Live::Updates(lost)) | TrySendError::Closed(Live::Updates(lost)),
            ) => {
                self.dropped.fetch_add(lost.len() as u64, Ordering::Relaxed);
            }
            Err(_) => unreachable!("updates were sent"),
        }
    }

    fn advance(&mut self, frontier: u64) -> bool {
        self.watermarks
            .pass_on(self.worker, frontier, |live| match self.tx.try_send(live) {
                Err(TrySendError::Full(_)) => Err(Full),
                // Closed only at shutdown, when nobody is listening.
                Ok(()) | Err(TrySendError::Closed(_)) => Ok(()),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watermark_passes_once_every_worker_has_passed_it() {
        let (publisher, mut rx) = channel(8);
        let (mut a, mut b) = (publisher.worker(), publisher.worker());
        let mut through = || match rx.try_recv() {
            Ok(Live::Through(t)) => Some(t),
            Ok(_) => panic!("no updates were offered"),
            Err(_) => None,
        };
        assert!(a.advance(100));
        assert_eq!(through(), None, "worker b is still at 0");
        assert!(b.advance(50));
        assert_eq!(through(), Some(50));
        assert!(b.advance(200));
        assert_eq!(through(), Some(100));
        assert!(b.advance(300));
        assert_eq!(through(), None, "worker a is still at 100");
    }
}
