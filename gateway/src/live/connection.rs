//! One client's connection: a task that writes what the hub queues for the
//! client, with pings, and a task of its own that reads the client's
//! requests.
//!
//! Every request gets an answer: a subscribe an acknowledgement from the
//! hub (`{"subscribed": topic, "window", "groupBy"}`) or an error (`{"error",
//! "topic"}`), an unsubscribe `{"unsubscribed": topic}`, and a message that
//! is not a request an error. A binary frame closes the connection with
//! 1003 (unsupported data): the protocol is JSON text, and a client sending
//! anything else is not one of tally's.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitStream;
use futures_util::{FutureExt, SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::hub::{Batch, Command, Hub};
use super::resume::Resumes;
use super::topic::{Topic, TopicError};
use crate::ops::Ops;
use tally_dataflow::config::MetricSpec;
use tally_dataflow::time::{parse_rfc3339, Millis};

/// How often the server pings a client.
const PING_EVERY: Duration = Duration::from_secs(15);
/// A client silent for this long (no pong, no message) is disconnected.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// A client that takes this long to accept one write (a message, and what
/// was queued behind it) is disconnected, so a stalled socket never holds
/// its task.
const SEND_LIMIT: Duration = Duration::from_secs(10);
/// How long a client dropped for a full queue has to answer its close.
const CLOSE_GRACE: Duration = Duration::from_secs(5);
/// What a connection reads into at a time. Clients send only small
/// subscription messages.
const READ_BUFFER: usize = 4096;
/// The largest message a client may send.
const MAX_REQUEST: usize = 64 * 1024;

/// A client's connection.
type Socket = WebSocketStream<TokioIo<Upgraded>>;

/// What one connection may hold.
#[derive(Clone, Copy, Debug)]
pub(super) struct Bounds {
    /// Entries in its queue (`live.queue`).
    pub(super) queue: usize,
    /// Subscriptions it may hold (`live.max_subscriptions`).
    pub(super) max_subscriptions: usize,
}

/// What the reader has the writer send.
enum Reply {
    /// An error, as JSON text.
    Text(String),
    /// A close frame, after which the connection ends.
    Close(CloseFrame),
}

/// A client's message.
#[derive(Debug, Deserialize)]
struct Request {
    /// `subscribe` or `unsubscribe`.
    action: String,
    /// The topic, as `metrics:<metric>[:<dimension>:<value>]…`.
    topic: String,
    /// The window to follow, as a window spec; for a subscription only.
    window: Option<String>,
    /// The dimension whose groups are sent one by one; for a subscription
    /// only.
    #[serde(rename = "groupBy")]
    group_by: Option<String>,
    /// For a subscription, the start of the first window to replay, as
    /// RFC 3339: a client that reconnects resumes from there.
    since: Option<String>,
}

/// What a client's message asks for.
pub(super) enum Read {
    /// A subscription, checked against the metrics it was checked with,
    /// and the window start it resumes from, if it does.
    Subscribe(Topic, Arc<Vec<MetricSpec>>, Option<Millis>),
    /// A subscription refused, with the topic's text and why.
    Refuse(String, TopicError),
    /// An unsubscription from the topic with this text.
    Unsubscribe(String),
}

/// Reads a client's text message against the active `metrics`; an error
/// says why it cannot be read at all.
pub(super) fn read_request(text: &str, metrics: &Arc<Vec<MetricSpec>>) -> Result<Read, String> {
    match serde_json::from_str::<Request>(text) {
        Ok(request) if request.action == "subscribe" => {
            let since = match request.since {
                None => None,
                Some(text) => match parse_rfc3339(&text) {
                    Some(since) => Some(since),
                    None => return Ok(Read::Refuse(request.topic, TopicError::BadSince(text))),
                },
            };
            Ok(
                match Topic::parse(
                    &request.topic,
                    request.window.as_deref(),
                    request.group_by.as_deref(),
                    metrics,
                ) {
                    Ok(topic) => Read::Subscribe(topic, Arc::clone(metrics), since),
                    Err(error) => Read::Refuse(request.topic, error),
                },
            )
        }
        Ok(request) if request.action == "unsubscribe" => Ok(Read::Unsubscribe(request.topic)),
        Ok(request) => Err(format!(
            "unknown action '{}': use subscribe or unsubscribe",
            request.action
        )),
        Err(e) => Err(format!("cannot read the message: {e}")),
    }
}

/// Serves one WebSocket client, on a connection that has just been
/// upgraded, until it leaves or falls behind, within `bounds`.
pub(super) async fn serve(
    hub: Hub,
    resumes: Resumes,
    upgraded: Upgraded,
    bounds: Bounds,
    ops: Arc<Ops>,
) {
    let queue = bounds.queue;
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_REQUEST))
        .max_frame_size(Some(MAX_REQUEST));
    let ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let client = hub.next_client.fetch_add(1, Ordering::Relaxed);
    let (tx, mut rx) = mpsc::channel::<Batch>(queue);
    if hub
        .commands
        .send(Command::Join {
            client,
            queue: tx,
            max_subscriptions: bounds.max_subscriptions,
        })
        .await
        .is_err()
    {
        return;
    }
    ops.ws_clients.inc();
    let (mut sink, stream) = ws.split();
    // Reading runs in a task of its own, woken only when the client sends
    // something, so sending never polls the socket for reads.
    let heard = Heard::new();
    let (replies_tx, mut replies) = mpsc::channel::<Reply>(8);
    let mut reader = tokio::spawn(read_requests(
        stream,
        client,
        hub.clone(),
        resumes,
        replies_tx,
        Arc::clone(&ops),
        heard.clone(),
    ));
    let mut ping = tokio::time::interval(PING_EVERY);
    loop {
        let outgoing = tokio::select! {
            batch = rx.recv() => match batch {
                Some(batch) => Outgoing::Live(batch),
                None => {
                    // The hub dropped us: our queue overflowed.
                    let close = CloseFrame {
                        code: CloseCode::Policy,
                        reason: "too slow: the message queue overflowed".into(),
                    };
                    let close = sink.send(Message::Close(Some(close)));
                    let _ = tokio::time::timeout(SEND_LIMIT, close).await;
                    // The reader reads on until the client's answering
                    // close, so the connection ends with a FIN rather
                    // than a reset that would discard what it has yet
                    // to read.
                    let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
                    break;
                }
            },
            reply = replies.recv() => match reply {
                Some(Reply::Text(text)) => Outgoing::Frame(Message::text(text)),
                Some(Reply::Close(close)) => {
                    let close = sink.send(Message::Close(Some(close)));
                    let _ = tokio::time::timeout(SEND_LIMIT, close).await;
                    // As above: the reader reads on until the client's
                    // answering close.
                    let _ = tokio::time::timeout(CLOSE_GRACE, &mut reader).await;
                    break;
                }
                // The client closed, or its connection failed.
                None => break,
            },
            _ = ping.tick() => {
                if heard.silent_for() > SILENCE_LIMIT {
                    break;
                }
                Outgoing::Frame(Message::Ping(Default::default()))
            }
        };
        // What else is queued, up to a queue's worth of entries, goes
        // out in the same write.
        let send = async {
            let mut batch = match outgoing {
                Outgoing::Frame(frame) => {
                    sink.feed(frame).await?;
                    rx.try_recv().ok()
                }
                Outgoing::Live(batch) => Some(batch),
            };
            let mut taken = 0;
            while let Some(messages) = batch {
                for text in messages.iter() {
                    sink.feed(Message::Text(text.clone())).await?;
                }
                taken += 1;
                batch = if taken < queue {
                    rx.try_recv().ok()
                } else {
                    None
                };
            }
            sink.flush().await
        };
        // Nearly every write is taken at once: the limit's timer is armed
        // only for one that has to wait, as it costs more than the write.
        let mut send = std::pin::pin!(send);
        let sent = match (&mut send).now_or_never() {
            Some(sent) => sent,
            None => match tokio::time::timeout(SEND_LIMIT, send).await {
                Ok(sent) => sent,
                Err(_) => break,
            },
        };
        if sent.is_err() {
            break;
        }
    }
    reader.abort();
    let _ = hub.commands.send(Command::Leave { client }).await;
    ops.ws_clients.dec();
}

/// When a client was last heard from, shared by its reader and its writer.
#[derive(Clone)]
struct Heard {
    /// When the connection started.
    started: Instant,
    /// The last frame's time, in milliseconds since `started`.
    last: Arc<AtomicU64>,
}

impl Heard {
    fn new() -> Heard {
        Heard {
            started: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Notes that a frame arrived now.
    fn note(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// How long since the last frame, or since the start.
    fn silent_for(&self) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        self.started.elapsed().saturating_sub(last)
    }
}

/// What a client's task sends next.
enum Outgoing {
    Live(Batch),
    Frame(Message),
}

/// Reads a client's requests until it closes: subscriptions, checked
/// against the hub's metrics, go to the hub, which answers each (one that
/// resumes with what `resumes` read of the store first), and so do
/// unsubscriptions; the errors of unreadable messages go back to the client
/// through `replies`, and so does the close for a binary frame. Every
/// frame, pongs included, is noted in `heard`.
async fn read_requests(
    mut stream: SplitStream<Socket>,
    client: u64,
    hub: Hub,
    resumes: Resumes,
    replies: mpsc::Sender<Reply>,
    ops: Arc<Ops>,
    heard: Heard,
) {
    while let Some(Ok(frame)) = stream.next().await {
        heard.note();
        let text = match frame {
            Message::Text(text) => text,
            Message::Binary(_) => {
                ops.ws_refused("binary");
                let close = CloseFrame {
                    code: CloseCode::Unsupported,
                    reason: "tally's live protocol is JSON text frames".into(),
                };
                if replies.send(Reply::Close(close)).await.is_err() {
                    return;
                }
                // Read on, ignoring what comes, until the client answers
                // the close, so the connection ends with a FIN.
                while let Some(Ok(_)) = stream.next().await {}
                return;
            }
            // The next read sends the reply to a close, then ends.
            _ => continue,
        };
        let error = match read_request(&text, &hub.catalog.active()) {
            Ok(Read::Subscribe(topic, metrics, since)) => {
                let resume = match since {
                    Some(since) => {
                        let resume = resumes.read(&topic, &metrics, since).await;
                        // The client was not listened to meanwhile: what it
                        // sent is read now, so the wait is not its silence.
                        heard.note();
                        Some(resume)
                    }
                    None => None,
                };
                let _ = hub
                    .commands
                    .send(Command::Subscribe {
                        client,
                        topic,
                        metrics,
                        resume,
                    })
                    .await;
                continue;
            }
            Ok(Read::Refuse(topic, error)) => {
                let _ = hub
                    .commands
                    .send(Command::Refuse {
                        client,
                        topic,
                        error,
                    })
                    .await;
                continue;
            }
            Ok(Read::Unsubscribe(topic)) => {
                let _ = hub
                    .commands
                    .send(Command::Unsubscribe { client, topic })
                    .await;
                continue;
            }
            Err(error) => error,
        };
        ops.ws_refused("unreadable");
        let reply = Reply::Text(json!({ "error": error }).to_string());
        if replies.send(reply).await.is_err() {
            return;
        }
    }
}
