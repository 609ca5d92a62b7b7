//! The writers: tasks that each write what the hub sends to many clients.
//!
//! A task per client would be woken, and its queue taken from, once per
//! client for every batch the hub fans out, which costs more than the
//! write itself. A writer instead owns the writing half of many
//! connections. The hub gathers what a batch brings the clients by writer
//! ([`Mail`]) and hands each writer its share in one send; the writer
//! hands each entry to its client's socket at once, with writes that never
//! wait. Only a client whose socket does not take everything waits, in a
//! write of its own, while the entries that come for it meanwhile are
//! kept. A client with more than its queue's bound (`live.queue`) of
//! entries not yet taken by its socket is dropped: sent a close, and
//! disconnected. The bound counts entries, not messages: a grouped topic's
//! many groups from one batch take one place.
//!
//! A writer also pings each of its clients every [`PING_EVERY`], and
//! disconnects one not heard from for [`SILENCE_LIMIT`], or whose socket
//! takes nothing for [`SEND_LIMIT`].

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::task::noop_waker_ref;
use futures_util::{Sink, SinkExt, StreamExt};
use tokio::sync::{mpsc, oneshot};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};

use super::hub::{Batch, Command};
use crate::ops::Ops;

/// How often a client is pinged.
const PING_EVERY: Duration = Duration::from_secs(15);
/// A client silent for this long (no pong, no message) is disconnected.
const SILENCE_LIMIT: Duration = Duration::from_secs(45);
/// A client whose socket takes nothing of a write for this long is
/// disconnected, so a stalled socket never holds on to its entries.
const SEND_LIMIT: Duration = Duration::from_secs(10);
/// How long a client sent a close has to answer it before it is
/// disconnected.
const CLOSE_GRACE: Duration = Duration::from_secs(5);

/// Writers per runtime thread: a writer takes its share of a burst in one
/// turn, so many small shares, which the runtime's threads balance between
/// them and run other tasks (ingest, history) between, rather than a few
/// long ones. With 8, one process with two threads and 18,500 clients
/// delivered the same bursts 12–17% later (BENCHMARKS.md (f)). Still, a
/// burst to many thousands of clients wakes a few dozen tasks.
const WRITERS_PER_THREAD: usize = 64;

/// A connection's writing half.
pub(super) type WsSink = Box<dyn Sink<Message, Error = WsError> + Send + Unpin>;

/// What goes to a writer.
pub(super) enum Work {
    /// A client's connection, written to from now on. Dropping `end`, or
    /// sending on it, ends the connection's task.
    Join {
        client: u64,
        sink: WsSink,
        heard: Heard,
        queue: usize,
        end: oneshot::Sender<()>,
    },
    /// Entries from the hub, each for one of the writer's clients, in the
    /// order the hub sent them.
    Deliver(Vec<(u64, Batch)>),
    /// What the client's reader has the writer send.
    Reply(u64, Reply),
    /// The client's connection has ended.
    Leave(u64),
}

/// What a client's reader has the writer send.
pub(super) enum Reply {
    /// An error, as JSON text.
    Text(String),
    /// A close, after which the connection ends.
    Close(CloseFrame),
}

/// The way to each writer.
#[derive(Clone)]
pub(super) struct Writers {
    shards: Arc<[mpsc::UnboundedSender<Work>]>,
}

impl Writers {
    /// Starts [`WRITERS_PER_THREAD`] writers per runtime thread, which tell
    /// the hub, through `hub`, of the clients they drop.
    pub(super) fn start(hub: mpsc::Sender<Command>, ops: Arc<Ops>) -> Writers {
        let threads = tokio::runtime::Handle::current().metrics().num_workers();
        let shards = (0..(threads * WRITERS_PER_THREAD).max(1))
            .map(|_| {
                let (tx, rx) = mpsc::unbounded_channel();
                let writer = Writer {
                    clients: HashMap::new(),
                    waiting: FuturesUnordered::new(),
                    hub: hub.clone(),
                    ops: Arc::clone(&ops),
                };
                // A writer's writes are its whole work, thousands in a
                // burst: under tokio's budget, every write past the 128th
                // of a turn would wait for the next turn, and wake the
                // client's reader on the way. The writer ends its turns on
                // its own instead (see `run`).
                tokio::spawn(tokio::task::unconstrained(writer.run(rx)));
                tx
            })
            .collect();
        Writers { shards }
    }

    /// The way to `client`'s writer.
    pub(super) fn outbox(&self, client: u64) -> Outbox {
        let writer = (client % self.shards.len() as u64) as usize;
        Outbox {
            client,
            writer,
            shard: self.shards[writer].clone(),
        }
    }
}

/// The way to one client's writer.
#[derive(Clone)]
pub(super) struct Outbox {
    client: u64,
    /// Which writer: its place in [`Writers`].
    writer: usize,
    shard: mpsc::UnboundedSender<Work>,
}

impl Outbox {
    /// An outbox whose work arrives on the receiver: for tests of the hub.
    #[cfg(test)]
    pub(super) fn detached(client: u64) -> (Outbox, mpsc::UnboundedReceiver<Work>) {
        let (shard, rx) = mpsc::unbounded_channel();
        let writer = client as usize;
        (
            Outbox {
                client,
                writer,
                shard,
            },
            rx,
        )
    }

    /// Hands the writer the client's connection; see [`Work::Join`].
    pub(super) fn join(&self, sink: WsSink, heard: Heard, queue: usize, end: oneshot::Sender<()>) {
        let client = self.client;
        let _ = self.shard.send(Work::Join {
            client,
            sink,
            heard,
            queue,
            end,
        });
    }

    pub(super) fn reply(&self, reply: Reply) {
        let _ = self.shard.send(Work::Reply(self.client, reply));
    }

    pub(super) fn leave(&self) {
        let _ = self.shard.send(Work::Leave(self.client));
    }
}

/// The hub's entries for many clients, gathered by writer until it sends
/// them, so that a burst costs a send and a wake-up per writer, not per
/// client, and a writer finds the whole burst waiting when it wakes.
#[derive(Default)]
pub(super) struct Mail {
    /// By writer.
    bags: Vec<Option<Bag>>,
}

/// A writer's share of the mail: the way to it, and its clients' entries.
type Bag = (mpsc::UnboundedSender<Work>, Vec<(u64, Batch)>);

impl Mail {
    /// Puts an entry for `outbox`'s client in its writer's bag.
    pub(super) fn put(&mut self, outbox: &Outbox, batch: Batch) {
        if self.bags.len() <= outbox.writer {
            self.bags.resize_with(outbox.writer + 1, || None);
        }
        let (_, entries) =
            self.bags[outbox.writer].get_or_insert_with(|| (outbox.shard.clone(), Vec::new()));
        entries.push((outbox.client, batch));
    }

    /// Hands every writer its bag. A writer that is gone has no clients.
    pub(super) fn send(&mut self) {
        for (shard, entries) in self.bags.iter_mut().flatten() {
            if !entries.is_empty() {
                let _ = shard.send(Work::Deliver(std::mem::take(entries)));
            }
        }
    }
}

/// When a client was last heard from, shared by its reader and its writer.
#[derive(Clone)]
pub(super) struct Heard {
    /// When the connection started.
    started: Instant,
    /// The last frame's time, in milliseconds since `started`.
    last: Arc<AtomicU64>,
}

impl Heard {
    pub(super) fn new() -> Heard {
        Heard {
            started: Instant::now(),
            last: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Notes that a frame arrived now.
    pub(super) fn note(&self) {
        let now = self.started.elapsed().as_millis() as u64;
        self.last.store(now, Ordering::Relaxed);
    }

    /// How long before `now` the last frame came, or the connection
    /// started.
    fn silent_at(&self, now: Instant) -> Duration {
        let last = Duration::from_millis(self.last.load(Ordering::Relaxed));
        now.saturating_duration_since(self.started)
            .saturating_sub(last)
    }
}

/// What a client is sent: a hub's entry, or a frame of the connection's own.
enum Entry {
    Live(Batch),
    Frame(Message),
}

/// A client, as its writer holds it.
struct Client {
    /// The writing half; `None` while a write waits for the socket.
    sink: Option<WsSink>,
    /// What came while a write waited, to write once it is done.
    kept: Vec<Entry>,
    /// Entries the socket has not taken yet, kept ones included.
    untaken: usize,
    /// Entries it may have untaken before it is dropped.
    queue: usize,
    heard: Heard,
    next_ping: Instant,
    /// Ends the connection's task.
    end: oneshot::Sender<()>,
    /// Set once the client is sent a close: nothing more is written.
    closing: Option<CloseFrame>,
}

/// A write that waits for a client's socket: the client, and the sink once
/// the write is done, or `None` if it failed or went past [`SEND_LIMIT`].
type Waiting = Pin<Box<dyn Future<Output = (u64, Option<WsSink>)> + Send>>;

/// One writer's task.
struct Writer {
    clients: HashMap<u64, Client>,
    waiting: FuturesUnordered<Waiting>,
    hub: mpsc::Sender<Command>,
    ops: Arc<Ops>,
}

impl Writer {
    async fn run(mut self, mut inbox: mpsc::UnboundedReceiver<Work>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        // A writer without clients is not woken every second: most of a
        // large machine's writers have none. A tick missed meanwhile is
        // not made up.
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                work = inbox.recv() => {
                    let Some(work) = work else { break };
                    // A turn is what has come by now: a burst is written
                    // whole, which is what keeps its last client's delay
                    // near the first's, and then the thread's other tasks
                    // run, however fast the hub goes on sending.
                    let arrived = inbox.len();
                    self.work(work);
                    for _ in 0..arrived {
                        let Ok(work) = inbox.try_recv() else { break };
                        self.work(work);
                    }
                }
                Some((client, sink)) = self.waiting.next(), if !self.waiting.is_empty() => {
                    self.written(client, sink);
                }
                _ = tick.tick(), if !self.clients.is_empty() => self.tick(),
            }
        }
    }

    fn work(&mut self, work: Work) {
        match work {
            Work::Join {
                client,
                sink,
                heard,
                queue,
                end,
            } => {
                self.clients.insert(
                    client,
                    Client {
                        sink: Some(sink),
                        kept: Vec::new(),
                        untaken: 0,
                        queue,
                        heard,
                        next_ping: Instant::now() + PING_EVERY,
                        end,
                        closing: None,
                    },
                );
            }
            Work::Deliver(entries) => {
                for (client, batch) in entries {
                    self.send(client, Entry::Live(batch));
                }
            }
            Work::Reply(client, Reply::Text(text)) => {
                self.send(client, Entry::Frame(Message::text(text)))
            }
            Work::Reply(client, Reply::Close(close)) => self.close(client, close),
            Work::Leave(client) => {
                self.clients.remove(&client);
            }
        }
    }

    /// Writes `entry` to `client` now if its socket takes it, else keeps
    /// it; drops the client past its bound.
    fn send(&mut self, client: u64, entry: Entry) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        if c.closing.is_some() {
            return;
        }
        c.untaken += 1;
        if c.untaken > c.queue {
            self.ops.ws_slow_dropped.inc();
            // The hub stops sending it anything; it may take a while to
            // hear, so what it sends meanwhile is dropped here.
            let _ = self.hub.try_send(Command::Leave { client });
            let close = CloseFrame {
                code: CloseCode::Policy,
                reason: "too slow: the message queue overflowed".into(),
            };
            self.close(client, close);
            return;
        }
        match c.sink.take() {
            Some(sink) => self.write(client, sink, vec![entry]),
            None => c.kept.push(entry),
        }
    }

    /// Hands `entries` to `client`'s socket. Most writes are taken at
    /// once; one that is not waits on its own, within [`SEND_LIMIT`].
    fn write(&mut self, client: u64, mut sink: WsSink, entries: Vec<Entry>) {
        let mut write = Box::pin(async move {
            for entry in entries {
                match entry {
                    Entry::Live(batch) => {
                        for text in batch.iter() {
                            sink.feed(Message::Text(text.clone())).await?;
                        }
                    }
                    Entry::Frame(frame) => sink.feed(frame).await?,
                }
            }
            sink.flush().await?;
            Ok::<_, WsError>(sink)
        });
        match write
            .as_mut()
            .poll(&mut Context::from_waker(noop_waker_ref()))
        {
            Poll::Ready(written) => self.written(client, written.ok()),
            Poll::Pending => self.waiting.push(Box::pin(async move {
                let written = tokio::time::timeout(SEND_LIMIT, write).await;
                (client, written.ok().and_then(Result::ok))
            })),
        }
    }

    /// A write to `client` is done: its socket took everything (`sink`),
    /// or failed (`None`), which ends the connection.
    fn written(&mut self, client: u64, sink: Option<WsSink>) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        let Some(sink) = sink else {
            self.clients.remove(&client);
            return;
        };
        if let Some(close) = c.closing.take() {
            let c = self.clients.remove(&client).expect("the client");
            tokio::spawn(send_close(sink, close, c.end));
            return;
        }
        if c.kept.is_empty() {
            c.untaken = 0;
            c.sink = Some(sink);
        } else {
            let kept = std::mem::take(&mut c.kept);
            c.untaken = kept.len();
            self.write(client, sink, kept);
        }
    }

    /// Sends `client` a close, once what it has been sent is written, and
    /// ends its connection when it answers, or after [`CLOSE_GRACE`].
    fn close(&mut self, client: u64, close: CloseFrame) {
        let Some(c) = self.clients.get_mut(&client) else {
            return;
        };
        c.kept.clear();
        match c.sink.take() {
            Some(sink) => {
                let c = self.clients.remove(&client).expect("the client");
                tokio::spawn(send_close(sink, close, c.end));
            }
            // Sent once the write that waits is done.
            None => c.closing = Some(close),
        }
    }

    /// Pings the clients whose turn it is, and disconnects the silent ones.
    fn tick(&mut self) {
        let now = Instant::now();
        let mut silent = Vec::new();
        let mut due = Vec::new();
        for (&client, c) in &mut self.clients {
            if c.closing.is_some() {
                continue;
            }
            if c.heard.silent_at(now) > SILENCE_LIMIT {
                silent.push(client);
            } else if c.next_ping <= now {
                c.next_ping = now + PING_EVERY;
                due.push(client);
            }
        }
        for client in silent {
            // Dropping its `end` ends the connection.
            self.clients.remove(&client);
        }
        for client in due {
            self.send(client, Entry::Frame(Message::Ping(Default::default())));
        }
    }
}

/// Sends `close` on `sink`, within [`SEND_LIMIT`], then waits up to
/// [`CLOSE_GRACE`] for the connection's task to end, which it does when the
/// client answers: the connection then ends with a FIN rather than a reset
/// that would discard what the client has yet to read. Then ends it.
async fn send_close(mut sink: WsSink, close: CloseFrame, mut end: oneshot::Sender<()>) {
    let sent = sink.send(Message::Close(Some(close)));
    if tokio::time::timeout(SEND_LIMIT, sent).await.is_ok() {
        let _ = tokio::time::timeout(CLOSE_GRACE, end.closed()).await;
    }
    let _ = end.send(());
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::task::Waker;

    use tokio_tungstenite::tungstenite::Utf8Bytes;

    use super::*;

    /// A connection's writing half, as its writer sees it: it takes `room`
    /// messages, then waits for more room.
    #[derive(Clone, Default)]
    struct Socket(Arc<Mutex<Room>>);

    #[derive(Default)]
    struct Room {
        room: usize,
        taken: Vec<String>,
        waker: Option<Waker>,
    }

    impl Socket {
        fn with_room(room: usize) -> Socket {
            let socket = Socket::default();
            socket.0.lock().unwrap().room = room;
            socket
        }

        fn make_room(&self, more: usize) {
            let mut room = self.0.lock().unwrap();
            room.room += more;
            if let Some(waker) = room.waker.take() {
                waker.wake();
            }
        }

        fn taken(&self) -> Vec<String> {
            self.0.lock().unwrap().taken.clone()
        }
    }

    impl Sink<Message> for Socket {
        type Error = WsError;

        fn poll_ready(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            let mut room = self.0.lock().unwrap();
            if room.room > 0 {
                Poll::Ready(Ok(()))
            } else {
                room.waker = Some(cx.waker().clone());
                Poll::Pending
            }
        }

        fn start_send(self: Pin<&mut Self>, message: Message) -> Result<(), WsError> {
            let mut room = self.0.lock().unwrap();
            room.room -= 1;
            room.taken.push(message.into_text().unwrap().to_string());
            Ok(())
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Ready(Ok(()))
        }

        fn poll_close(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Result<(), WsError>> {
            Poll::Ready(Ok(()))
        }
    }

    /// An entry of two messages, `i` and `i+`.
    fn entry(i: usize) -> Batch {
        Arc::from([
            Utf8Bytes::from(format!("{i}")),
            Utf8Bytes::from(format!("{i}+")),
        ])
    }

    fn messages(entries: std::ops::Range<usize>) -> Vec<String> {
        entries
            .flat_map(|i| [format!("{i}"), format!("{i}+")])
            .collect()
    }

    /// Lets the writer work through what it was given.
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn a_client_past_its_bound_is_dropped_and_the_others_get_everything_in_order() {
        let (hub, mut told) = mpsc::channel(16);
        let ops = Arc::new(Ops::new(None));
        let writers = Writers::start(hub, Arc::clone(&ops));
        let (healthy, slow, stalled) = (
            Socket::with_room(usize::MAX),
            Socket::with_room(4),
            Socket::with_room(10),
        );
        let mut ended = Vec::new();
        for (client, socket) in [(1, &healthy), (2, &slow), (3, &stalled)] {
            let (end, on_end) = oneshot::channel();
            writers
                .outbox(client)
                .join(Box::new(socket.clone()), Heard::new(), 50, end);
            ended.push(on_end);
        }
        let mut mail = Mail::default();
        for i in 0..200 {
            for client in [1, 3] {
                mail.put(&writers.outbox(client), entry(i));
            }
            mail.send();
        }
        // A client whose socket is full for a while, within its bound.
        for i in 0..40 {
            mail.put(&writers.outbox(2), entry(i));
        }
        mail.send();
        settle().await;
        assert_eq!(slow.taken(), messages(0..2), "two entries fit");
        slow.make_room(1000);
        settle().await;

        assert_eq!(healthy.taken(), messages(0..200));
        assert_eq!(
            slow.taken(),
            messages(0..40),
            "the kept entries follow, in order"
        );
        // Five entries fit; the 51st one not taken dropped it. An entry
        // of two messages takes one place.
        assert_eq!(stalled.taken(), messages(0..5));
        assert_eq!(ops.ws_slow_dropped.get(), 1);
        let leave = tokio::time::timeout(Duration::from_secs(5), told.recv()).await;
        assert!(matches!(leave, Ok(Some(Command::Leave { client: 3 }))));
        for on_end in &mut ended[..2] {
            assert_eq!(
                on_end.try_recv(),
                Err(oneshot::error::TryRecvError::Empty),
                "still connected"
            );
        }
    }
}
