//! One client's connection: a task that reads the client's requests, and
//! hands what the client is sent to its writer (`writers`).
//!
//! Every request gets an answer: a subscribe an acknowledgement from the
//! hub (`{"subscribed": topic, "window", "groupBy"}`) or an error (`{"error",
//! "topic"}`), an unsubscribe `{"unsubscribed": topic}`, and a message that
//! is not a request an error. A binary frame closes the connection with
//! 1003 (unsupported data): the protocol is JSON text, and a client sending
//! anything else is not one of tally's.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use futures_util::stream::SplitStream;
use futures_util::StreamExt;
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::oneshot;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::hub::{Command, Hub};
use super::resume::Resumes;
use super::topic::{Topic, TopicError};
use super::writers::{Heard, Outbox, Reply};
use crate::ops::Ops;
use tally_dataflow::config::MetricSpec;
use tally_dataflow::time::{parse_rfc3339, Millis};

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
/// upgraded, until it leaves or its writer ends it, within `bounds`. The
/// connection's task reads the client's requests; a writer, shared with
/// other clients, writes to it.
pub(super) async fn serve(
    hub: Hub,
    resumes: Resumes,
    upgraded: Upgraded,
    bounds: Bounds,
    ops: Arc<Ops>,
) {
    let config = WebSocketConfig::default()
        .read_buffer_size(READ_BUFFER)
        .max_message_size(Some(MAX_REQUEST))
        .max_frame_size(Some(MAX_REQUEST));
    let ws =
        WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, Some(config)).await;
    let client = hub.next_client.fetch_add(1, Ordering::Relaxed);
    let outbox = hub.writers.outbox(client);
    let (sink, stream) = ws.split();
    let heard = Heard::new();
    let (end, ended) = oneshot::channel();
    // The writer has the client before the hub can send it anything.
    outbox.join(Box::new(sink), heard.clone(), bounds.queue, end);
    let join = Command::Join {
        client,
        queue: outbox.clone(),
        max_subscriptions: bounds.max_subscriptions,
    };
    if hub.commands.send(join).await.is_err() {
        outbox.leave();
        return;
    }
    ops.ws_clients.inc();
    let reader = read_requests(
        stream,
        client,
        hub.clone(),
        resumes,
        outbox.clone(),
        Arc::clone(&ops),
        heard,
    );
    tokio::select! {
        () = reader => {}
        // The writer ended it: it fell behind, went silent, or was closed.
        _ = ended => {}
    }
    outbox.leave();
    let _ = hub.commands.send(Command::Leave { client }).await;
    ops.ws_clients.dec();
}

/// Reads a client's requests until it closes: subscriptions, checked
/// against the hub's metrics, go to the hub, which answers each (one that
/// resumes with what `resumes` read of the store first), and so do
/// unsubscriptions; the errors of unreadable messages go back to the client
/// through its writer, and so does the close for a binary frame. Every
/// frame, pongs included, is noted in `heard`.
async fn read_requests(
    mut stream: SplitStream<Socket>,
    client: u64,
    hub: Hub,
    resumes: Resumes,
    replies: Outbox,
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
                replies.reply(Reply::Close(close));
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
        replies.reply(Reply::Text(json!({ "error": error }).to_string()));
    }
}
