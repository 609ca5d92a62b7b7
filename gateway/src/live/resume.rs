//! Resuming a subscription: what a subscribe with `since` reads of the store
//! before the hub replays it.
//!
//! The hub holds only the windows a late event can still revise. A client
//! that was away longer, or a gateway that restarted, needs the others from
//! the store: the stored results of the topic's metric and window from
//! `since` on, newest first, at most `live.max_resume_rows` of them. The
//! connection reads them before it hands the subscription to the hub, at
//! most `live.resume_reads` at once per gateway, so the hub, which never
//! waits, gets them with the subscription.

use std::sync::Arc;

use tally_connectors::store::Recent;
use tally_dataflow::config::{LiveConfig, MetricSpec};
use tally_dataflow::fingerprint;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::time::Millis;
use tally_dataflow::window::Span;
use tokio::sync::Semaphore;

use super::topic::Topic;
use crate::backend::History;

/// A subscription's stored windows, read for the hub.
pub(super) struct Resume {
    /// The window start the client asked to resume from.
    pub(super) since: Millis,
    /// Every group's stored result of the windows from `complete_from` on,
    /// as final updates of the topic's metric and window.
    pub(super) stored: Vec<Arc<WindowUpdate>>,
    /// From which window start `stored` holds every stored result: `since`,
    /// or a later start when the rows past `live.max_resume_rows` were left
    /// unread; `None` when the store could not be read.
    pub(super) complete_from: Option<Millis>,
}

/// Reads the stored windows of resuming subscriptions, within the bounds.
#[derive(Clone)]
pub(super) struct Resumes {
    history: Arc<dyn History>,
    reads: Arc<Semaphore>,
    max_rows: usize,
}

impl Resumes {
    /// Reads from `history`, within `live`'s bounds.
    pub(super) fn new(history: Arc<dyn History>, live: &LiveConfig) -> Resumes {
        Resumes {
            history,
            reads: Arc::new(Semaphore::new(live.resume_reads)),
            max_rows: live.max_resume_rows,
        }
    }

    /// The stored windows of `topic`, one of `metrics`, from `since` on.
    pub(super) async fn read(
        &self,
        topic: &Topic,
        metrics: &[MetricSpec],
        since: Millis,
    ) -> Resume {
        let spec = &metrics[topic.metric() as usize];
        let window = spec.windows[topic.window() as usize];
        let recent = Recent {
            metric: spec.name.clone(),
            version: fingerprint::metric(spec),
            window: window.to_string(),
            dimensions: spec.dimensions.len(),
            since,
            limit: self.max_rows + 1,
        };
        let read = {
            // The semaphore is never closed.
            let _turn = self.reads.acquire().await;
            self.history.recent(recent).await
        };
        let mut rows = match read {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, topic = topic.text(), "a resuming subscription could not read the store; it replays only what the hub holds");
                return Resume {
                    since,
                    stored: Vec::new(),
                    complete_from: None,
                };
            }
        };
        let mut complete_from = since;
        if rows.len() > self.max_rows {
            // The oldest window read may be missing groups: leave it out.
            let oldest = rows.last().map_or(since, |r| r.start);
            rows.retain(|r| r.start > oldest);
            complete_from = oldest + window.slide();
        }
        let stored = rows
            .into_iter()
            .map(|row| {
                Arc::new(WindowUpdate {
                    metric: topic.metric(),
                    window: topic.window(),
                    span: Span {
                        start: row.start,
                        end: row.end,
                    },
                    group: row.group,
                    state: row.state,
                    revision: row.revision,
                    is_final: true,
                    appended_at: None,
                })
            })
            .collect();
        Resume {
            since,
            stored,
            complete_from: Some(complete_from),
        }
    }
}
