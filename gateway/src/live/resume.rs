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
//!
//! When a gateway dies, its clients come back to the others all within a
//! second or two, and those that follow the same topic and saw the same
//! windows ask to resume from the same window. A read still waiting for its
//! turn is shared by every subscription that asks the same of the store
//! meanwhile, so a crowd of resumes costs the store one query per distinct
//! request instead of one per client. A read that has begun is not joined:
//! it may have been answered before a newer window was stored.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tally_connectors::store::Recent;
use tally_dataflow::config::{LiveConfig, MetricSpec};
use tally_dataflow::fingerprint;
use tally_dataflow::model::WindowUpdate;
use tally_dataflow::time::Millis;
use tally_dataflow::window::Span;
use tokio::sync::{OnceCell, Semaphore};

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

/// What one read of the store answered, shared by those who asked it.
type Answer = Result<Arc<Vec<Arc<WindowUpdate>>>, String>;

/// A read of the store: metric, window, first window start, and how many
/// rows at most.
type Request = (u16, u8, Millis, usize);

/// Reads the stored windows of resuming subscriptions, within the bounds.
#[derive(Clone)]
pub(super) struct Resumes {
    history: Arc<dyn History>,
    reads: Arc<Semaphore>,
    max_rows: usize,
    /// The reads waiting for their turn, which a like request joins.
    waiting: Arc<Mutex<HashMap<Request, Arc<OnceCell<Answer>>>>>,
}

impl Resumes {
    /// Reads from `history`, within `live`'s bounds.
    pub(super) fn new(history: Arc<dyn History>, live: &LiveConfig) -> Resumes {
        Resumes {
            history,
            reads: Arc::new(Semaphore::new(live.resume_reads)),
            max_rows: live.max_resume_rows,
            waiting: Arc::default(),
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
            Ok(stored) => Vec::clone(&stored),
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
                    self.window(spec, m, w, since, self.max_rows)
                        .await
                        .map(|rows| Vec::clone(&rows))
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
    /// in a turn of its own, or of a like read still waiting for its turn,
    /// within [`READ_LIMIT`].
    async fn window(
        &self,
        spec: &MetricSpec,
        m: u16,
        w: u8,
        since: Millis,
        limit: usize,
    ) -> Answer {
        let request = (m, w, since, limit);
        let asking = Asking::new(&self.waiting, request);
        // The first to ask reads; the others wait for its answer. Should
        // it give up (its client left), the next one reads instead.
        asking
            .read()
            .get_or_init(|| self.read_window(spec, request))
            .await
            .clone()
    }

    /// [`Resumes::window`]'s read, which stops taking others once it has
    /// its turn.
    async fn read_window(&self, spec: &MetricSpec, request: Request) -> Answer {
        let (m, w, since, limit) = request;
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
            // Begun: not one to join any more.
            self.waiting
                .lock()
                .expect("resume reads lock")
                .remove(&request);
            self.history.recent(recent).await
        };
        let rows = tokio::time::timeout(READ_LIMIT, read)
            .await
            .map_err(|_| format!("no answer within {READ_LIMIT:?}"))?
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(
            rows.into_iter()
                .map(|row| {
                    Arc::new(WindowUpdate {
                        metric: m,
                        window: w,
                        span: Span {
                            start: row.start,
                            end: row.end,
                        },
                        group: row.group.into(),
                        state: row.state,
                        revision: row.revision,
                        is_final: true,
                        appended_at: None,
                    })
                })
                .collect(),
        ))
    }
}

/// A request's hold on a waiting read. On its way out it takes the read
/// out of the waiting ones if nobody else waits for it (every asker left
/// before its turn) or it was answered before its turn (it timed out
/// waiting), so only reads still to begin stay there to be joined.
struct Asking<'a> {
    waiting: &'a Mutex<HashMap<Request, Arc<OnceCell<Answer>>>>,
    request: Request,
    read: Option<Arc<OnceCell<Answer>>>,
}

impl<'a> Asking<'a> {
    /// Joins the waiting read of `request`, or starts one.
    fn new(waiting: &'a Mutex<HashMap<Request, Arc<OnceCell<Answer>>>>, request: Request) -> Self {
        let read = Arc::clone(
            waiting
                .lock()
                .expect("resume reads lock")
                .entry(request)
                .or_default(),
        );
        Asking {
            waiting,
            request,
            read: Some(read),
        }
    }

    fn read(&self) -> &OnceCell<Answer> {
        self.read.as_ref().expect("held until dropped")
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        let mut waiting = self.waiting.lock().expect("resume reads lock");
        let read = self.read.take().expect("held until dropped");
        let last = waiting.get(&self.request).is_some_and(|r| {
            Arc::ptr_eq(r, &read) && (read.initialized() || Arc::strong_count(&read) == 2)
        });
        if last {
            waiting.remove(&self.request);
        }
        // Let go under the lock, so that of two askers leaving at once the
        // second sees the first gone.
        drop(read);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use tally_connectors::store::StoredWindow;
    use tally_dataflow::aggregate::AggState;
    use tally_dataflow::config::Config;
    use tally_dataflow::query::Fold;
    use tokio::sync::Semaphore;

    use super::*;
    use crate::backend::{BoxFuture, HistoryError};

    /// A store that answers `recent` with one row per read, once `gate`
    /// lets each read through, and counts the reads it was asked for.
    struct Gated {
        gate: Arc<Semaphore>,
        reads: Arc<AtomicUsize>,
    }

    impl History for Gated {
        fn scan(&self, _: Fold) -> BoxFuture<Result<Fold, HistoryError>> {
            unreachable!("a resume only reads recent windows")
        }
        fn since(
            &self,
            _: String,
            _: Vec<String>,
        ) -> BoxFuture<Result<Option<Millis>, HistoryError>> {
            unreachable!("a resume only reads recent windows")
        }
        fn dead_letters(
            &self,
            _: usize,
        ) -> BoxFuture<Result<Vec<tally_dataflow::model::DeadLetter>, HistoryError>> {
            unreachable!("a resume only reads recent windows")
        }
        fn recent(&self, recent: Recent) -> BoxFuture<Result<Vec<StoredWindow>, HistoryError>> {
            let read = self.reads.fetch_add(1, Ordering::SeqCst) as u64;
            let gate = Arc::clone(&self.gate);
            Box::pin(async move {
                gate.acquire().await.unwrap().forget();
                Ok(vec![StoredWindow {
                    start: recent.since,
                    end: recent.since + 10_000,
                    group: vec!["US".into()],
                    state: AggState {
                        count: read,
                        ..Default::default()
                    },
                    revision: 0,
                }])
            })
        }
    }

    #[tokio::test]
    async fn resumes_asking_the_same_share_a_read_that_has_not_begun() {
        let config = Config::load(
            Some("[live]\nresume_reads = 1\n[[metric]]\nname = \"ad_clicks\"\ndimensions = [\"country\"]\nwindows = [\"tumbling 10s\"]\n"),
            [],
        )
        .unwrap();
        let metrics = Arc::new(config.metrics);
        let topic = Topic::parse("metrics:ad_clicks", None, None, &metrics).unwrap();
        let gate = Arc::new(Semaphore::new(0));
        let reads = Arc::new(AtomicUsize::new(0));
        let history = Gated {
            gate: Arc::clone(&gate),
            reads: Arc::clone(&reads),
        };
        let resumes = Resumes::new(Arc::new(history), &config.live);
        let resume = |since| {
            let (resumes, topic, metrics) = (resumes.clone(), topic.clone(), Arc::clone(&metrics));
            tokio::spawn(async move { resumes.read(&topic, &metrics, since).await })
        };
        let asked = || async {
            // Let the spawned reads run up to their wait.
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
        };

        // The one turn goes to a read from 0, which the store holds.
        let first = resume(0);
        asked().await;
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        // Ten from 10 s wait for the turn, with one from 20 s, and one more
        // from 0: the read from 0 has begun, so it is not joined.
        let crowd: Vec<_> = (0..10).map(|_| resume(10_000)).collect();
        let other = resume(20_000);
        let again = resume(0);
        asked().await;
        // One pass each for the four reads.
        gate.add_permits(4);
        let first = first.await.unwrap();
        let crowd: Vec<Resume> = futures_util::future::join_all(crowd)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect();
        let (other, again) = (other.await.unwrap(), again.await.unwrap());
        assert_eq!(
            reads.load(Ordering::SeqCst),
            4,
            "0, 10 s once for all ten, 20 s, 0 again"
        );
        let read_as = |r: &Resume| (r.stored[0].span.start, r.stored[0].state.count);
        assert_eq!(read_as(&first), (0, 0));
        let shared = read_as(&crowd[0]);
        assert_eq!(shared.0, 10_000);
        assert!(crowd
            .iter()
            .all(|r| read_as(r) == shared && r.complete_from == Some(10_000)));
        assert_eq!(read_as(&other).0, 20_000);
        assert_eq!(read_as(&again).0, 0);
        assert_ne!(read_as(&again), read_as(&first), "a read of its own");

        // Once answered, a read is not kept: the next one asks the store.
        gate.add_permits(1);
        let later = resume(10_000).await.unwrap();
        assert_eq!(reads.load(Ordering::SeqCst), 5);
        assert_ne!(read_as(&later), shared);

        // A read whose askers all leave before its turn is not kept either.
        let holding = resume(0);
        asked().await;
        let left = resume(30_000);
        asked().await;
        assert_eq!(resumes.waiting.lock().unwrap().len(), 1);
        left.abort();
        asked().await;
        assert!(resumes.waiting.lock().unwrap().is_empty());
        gate.add_permits(1);
        holding.await.unwrap();
        assert_eq!(
            reads.load(Ordering::SeqCst),
            6,
            "the read left behind never asked"
        );
    }
}
