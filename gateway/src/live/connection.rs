//! One client's connection: a task that writes what the hub queues for the
//! client, with pings, and a task of its own that reads the client's
//! requests.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::SplitStream;
use futures_util::{SinkExt, StreamExt};
use hyper::upgrade::Upgraded;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use serde_json::json;
use tally_dataflow::config::MetricSpec;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use super::hub::{Batch, Command, Hub};
use super::topic::Topic;
use crate::ops::Ops;

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
}

/// Serves one WebSocket client, on a connection that has just been
/// upgraded, until it leaves or falls behind. Its queue holds `queue`
/// entries.
pub(super) async fn serve(hub: Hub, upgraded: Upgraded, queue: usize, ops: Arc<Ops>) {
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
        .send(Command::Join { client, queue: tx })
        .await
        .is_err()
    {
        return;
    }
    ops.ws_clients.inc();
    let (mut sink, stream) = ws.split();
    // Reading runs in a task of its own, woken only when the client sends
    // something, so sending never polls the socket for reads.
    let started = Instant::now();
    let heard = Arc::new(AtomicU64::new(0));
    let (replies_tx, mut replies) = mpsc::channel::<String>(8);
    let mut reader = tokio::spawn(read_requests(
        stream,
        client,
        Arc::clone(&hub.metrics),
        hub.commands.clone(),
        replies_tx,
        Arc::clone(&heard),
        started,
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
                Some(text) => Outgoing::Frame(Message::text(text)),
                // The client closed, or its connection failed.
                None => break,
            },
            _ = ping.tick() => {
                let heard = Duration::from_millis(heard.load(Ordering::Relaxed));
                if started.elapsed().saturating_sub(heard) > SILENCE_LIMIT {
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
        if !matches!(tokio::time::timeout(SEND_LIMIT, send).await, Ok(Ok(()))) {
            break;
        }
    }
    reader.abort();
    let _ = hub.commands.send(Command::Leave { client }).await;
    ops.ws_clients.dec();
}

/// What a client's task sends next.
enum Outgoing {
    Live(Batch),
    Frame(Message),
}

/// Reads a client's requests until it closes: subscriptions, checked
/// against `metrics`, go to the hub, and so do the errors of the ones
/// refused; the errors of unreadable messages go back to the client through
/// `replies`. Every frame, pongs included, is noted in `heard`, in
/// milliseconds since `started`.
async fn read_requests(
    mut stream: SplitStream<Socket>,
    client: u64,
    metrics: Arc<Vec<MetricSpec>>,
    commands: mpsc::Sender<Command>,
    replies: mpsc::Sender<String>,
    heard: Arc<AtomicU64>,
    started: Instant,
) {
    while let Some(Ok(frame)) = stream.next().await {
        heard.store(started.elapsed().as_millis() as u64, Ordering::Relaxed);
        let text = match frame {
            Message::Text(text) => text,
            // The next read sends the reply to a close, then ends.
            _ => continue,
        };
        let error = match serde_json::from_str::<Request>(&text) {
            Ok(request) if request.action == "subscribe" => {
                let command = match Topic::parse(
                    &request.topic,
                    request.window.as_deref(),
                    request.group_by.as_deref(),
                    &metrics,
                ) {
                    Ok(topic) => Command::Subscribe { client, topic },
                    Err(error) => Command::Refuse {
                        client,
                        topic: request.topic,
                        error,
                    },
                };
                let _ = commands.send(command).await;
                continue;
            }
            Ok(request) if request.action == "unsubscribe" => {
                let topic = request.topic;
                let _ = commands.send(Command::Unsubscribe { client, topic }).await;
                continue;
            }
            Ok(request) => format!(
                "unknown action '{}': use subscribe or unsubscribe",
                request.action
            ),
            Err(e) => format!("cannot read the message: {e}"),
        };
        if replies
            .send(json!({ "error": error }).to_string())
            .await
            .is_err()
        {
            return;
        }
    }
}
