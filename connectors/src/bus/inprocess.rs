//! The in-process live bus: a bounded tokio channel.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tally_dataflow::model::WindowUpdate;
use tally_dataflow::ports::Sink;
use tokio::sync::mpsc::{self, error::TrySendError, Receiver, Sender};

/// The publishing end, cloned once per worker.
#[derive(Clone)]
pub struct LivePublisher {
    tx: Sender<Vec<Arc<WindowUpdate>>>,
    dropped: Arc<AtomicU64>,
}

impl LivePublisher {
    /// Updates dropped because the subscriber was behind.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// A bus holding at most `capacity` batches in flight.
pub fn channel(capacity: usize) -> (LivePublisher, Receiver<Vec<Arc<WindowUpdate>>>) {
    let (tx, rx) = mpsc::channel(capacity);
    (
        LivePublisher {
            tx,
            dropped: Arc::default(),
        },
        rx,
    )
}

impl Sink<Arc<WindowUpdate>> for LivePublisher {
    fn offer(&mut self, items: &mut Vec<Arc<WindowUpdate>>) {
        match self.tx.try_send(std::mem::take(items)) {
            Ok(()) => {}
            Err(TrySendError::Full(lost) | TrySendError::Closed(lost)) => {
                self.dropped.fetch_add(lost.len() as u64, Ordering::Relaxed);
            }
        }
    }
}
