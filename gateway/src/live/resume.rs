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
use std::time::Duration;

use tally_connectors::store::Recent;
use tally_dataflow::config::{LiveConfig, MetricSpec};
use tally_dataflow::fingerprint;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::time::Millis;
use tally_dataflow::window::Span;
use tokio::sync::Semaphore;

use super::topic::Topic;
use crate::backend::History;

/// How long a read of the store may take, its wait for a turn included,
/// before the subscription goes on without it, so a slow store or a crowd
/// of resumes never holds a connection's reader for long.
const READ_LIMIT: Duration = Duration::from_secs(10);

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
        let read = self
            .window(
                spec,
                topic.metric(),
                topic.window(),
                since,
                self.max_rows + 1,
            )
            .await;
        let mut stored = match read {
            Ok(stored) => stored,
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
        if stored.len() > self.max_rows {
            // The oldest window read may be missing groups: leave it out.
            let oldest = stored.last().map_or(since, |u| u.span.start);
            stored.retain(|u| u.span.start > oldest);
            complete_from = oldest + window.slide();
        }
        Resume {
            since,
            stored,
            complete_from: Some(complete_from),
        }
    }

    /// What the store holds of the windows a late event may still revise,
    /// for every window of every metric: the newest stored window's, and
    /// those that ended within `lateness` of its start. A job that restarts
    /// does not send again the windows it restored; the hub of `tally run`
    /// takes these instead, so that a revision after a restart shows the
    /// whole window, not only the groups that changed since.
    pub(super) async fn revisable(
        &self,
        metrics: &[MetricSpec],
        lateness: Millis,
    ) -> Vec<Arc<WindowUpdate>> {
        let mut stored = Vec::new();
        for (m, spec) in metrics.iter().enumerate() {
            for (w, window) in spec.windows.iter().enumerate() {
                let (m, w) = (m as u16, w as u8);
                let revisable = async {
                    let newest = self.window(spec, m, w, Millis::MIN, 1).await?;
                    let Some(newest) = newest.first() else {
                        return Ok(Vec::new());
                    };
                    let since = newest.span.start - lateness - window.size();
                    self.window(spec, m, w, since, self.max_rows).await
                };
                match revisable.await {
                    Ok(rows) => stored.extend(rows),
                    Err(e) => {
                        tracing::warn!(error = %e, metric = %spec.name, "could not read the newest stored windows for the live hub");
                    }
                }
            }
        }
        stored
    }

    /// Every group's stored result of window `w` of metric `m` (`spec`),
    /// from `since` on, newest first, at most `limit`, as final updates;
    /// in a turn of its own, within [`READ_LIMIT`].
    async fn window(
        &self,
        spec: &MetricSpec,
        m: u16,
        w: u8,
        since: Millis,
        limit: usize,
    ) -> Result<Vec<Arc<WindowUpdate>>, String> {
        let recent = Recent {
            metric: spec.name.clone(),
            version: fingerprint::metric(spec),
            window: spec.windows[w as usize].to_string(),
            dimensions: spec.dimensions.len(),
            since,
            limit,
        };
        // The wait for a turn counts against the limit too.
        let read = async {
            // The semaphore is never closed.
            let _turn = self.reads.acquire().await;
            self.history.recent(recent).await
        };
        let rows = tokio::time::timeout(READ_LIMIT, read)
            .await
            .map_err(|_| format!("no answer within {READ_LIMIT:?}"))?
            .map_err(|e| e.to_string())?;
        Ok(rows
            .into_iter()
            .map(|row| {
                Arc::new(WindowUpdate {
                    metric: m,
                    window: w,
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
            .collect())
    }
}
