//! (f) Fan-out: many WebSocket clients on one `tally run`.
//!
//! Clients connect from 127.0.0.1-4 and each subscribes to one of four
//! topics (`metrics:events:country:<c>`, tumbling 10 s), which a steady trickle
//! of events updates once a second. For each delivered message the delay is
//! the client's receive time minus the `timestamp` the server put in it. The
//! server's memory per connection is its resident-memory growth over the
//! connections, and its CPU is its user and system time over the measurement.
//! The baselines, in the same run, are the same measurement with 100
//! clients, and a hand-written loop that writes a frame of the same size to
//! each of 5,000 loopback TCP connections in turn: what one message costs the
//! kernel, with no WebSocket library, task or queue. Then 1,000 stalled
//! clients (they subscribe to every topic and never read) join the largest
//! group: three rounds with them alternate with three without, and the
//! rounds of each kind are pooled, since the effect is smaller than the
//! spread between rounds.
//!
//! The client count is bounded by the open-file limit of the two processes;
//! `ulimit -n` is raised to its hard limit first.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::TcpSocket;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::Message;

use crate::support::{agent, cpu_seconds, now_ms, quantile, rss_kb, scrape, Tally};
use tally_dataflow::time::parse_rfc3339;

pub const COUNTRIES: [&str; 4] = ["US", "GB", "DE", "FR"];
const MEASURE: Duration = Duration::from_secs(20);
const STALLED: usize = 1000;
/// Rounds without and with stalled clients.
const PAIRS: usize = 3;
/// About the size of a live message, header included.
pub const FRAME: usize = 230;

/// What the healthy clients saw in one measurement.
struct Round {
    delays: Vec<f64>,
    closed: u64,
    cpu_cores: f64,
    /// The clients' own CPU: they share the machine with the server.
    client_cores: f64,
}

pub fn run() {
    let limit = raise_open_files();
    // Each process needs a descriptor per connection, and some to spare.
    let most = (limit as usize).saturating_sub(STALLED + 500).min(50_000);
    let dir = tempfile::tempdir().unwrap();
    // Room for every client and the feeder: tally lowers the cap to fit its
    // descriptor limit, as it logs.
    let tally = Tally::start(dir.path(), &[("TALLY__SERVER__MAX_CONNECTIONS", "1000000")]);
    let pid = tally.pid();
    // One thread of its own, so clients read while the bench sleeps.
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(tally.url.clone(), Arc::clone(&stop));
    std::thread::sleep(Duration::from_secs(2));

    println!("(f) fan-out: clients on 4 topics updated every 250 ms, measured for {} s; open-file limit {limit}", MEASURE.as_secs());
    let raw = raw_writes(5_000, FRAME);
    println!(
        "    baseline: one thread writing {FRAME}-byte frames to 5,000 loopback TCP connections: {:.1} µs per write",
        raw * 1e6
    );
    let mut sizes = vec![100, 10_000, most];
    sizes.dedup();
    let mut biggest = None;
    for &n in &sizes {
        let rss_before = rss_kb(pid);
        let clients = runtime.block_on(Clients::connect(&tally.url, n));
        std::thread::sleep(Duration::from_secs(3));
        let rss = rss_kb(pid).saturating_sub(rss_before) as f64 * 1024.0 / n as f64;
        let round = runtime.block_on(clients.measure(pid));
        report(&format!("{n} clients"), &round, Some(rss));
        let per_message = round.cpu_cores * MEASURE.as_secs_f64() / round.delays.len() as f64;
        println!(
            "    server CPU per delivered message {:.1} µs, {:.1}x the baseline's write",
            per_message * 1e6,
            per_message / raw
        );
        if n == *sizes.last().unwrap() {
            biggest = Some((clients, round));
        } else {
            runtime.block_on(clients.close());
        }
    }
    if let Some((clients, first)) = biggest {
        // The effect is smaller than the spread between rounds, so rounds
        // without and with stalled clients alternate, and are pooled.
        let mut without = vec![first];
        let mut with = Vec::new();
        let dropped_before = scrape(&tally.url)["tally_ws_slow_clients_dropped_total"];
        let mut stalled_at = Instant::now();
        for pair in 0..PAIRS {
            if pair > 0 {
                without.push(runtime.block_on(clients.measure(pid)));
            }
            // Measured from when they stop reading: through their buffers
            // and queues filling, and the server dropping them.
            let stalled = runtime.block_on(stall(&tally.url, STALLED));
            stalled_at = Instant::now();
            with.push(runtime.block_on(clients.measure(pid)));
            if pair + 1 < PAIRS {
                drop(stalled);
                wait_for_clients(&tally.url, clients.count, Duration::from_secs(30));
            } else {
                // The last ones stay, to see when the server lets them go:
                // when a queue overflows, or at the ping deadline.
                wait_for_clients(&tally.url, clients.count, Duration::from_secs(300));
                drop(stalled);
            }
        }
        let pooled = |rounds: &[Round]| {
            let mut delays: Vec<f64> = rounds
                .iter()
                .flat_map(|r| r.delays.iter().copied())
                .collect();
            delays.sort_by(f64::total_cmp);
            delays
        };
        let p99s = |rounds: &[Round]| {
            let p99s: Vec<String> = rounds
                .iter()
                .map(|r| format!("{:.0}", quantile(&r.delays, 0.99)))
                .collect();
            p99s.join(", ")
        };
        println!(
            "    p99 per round, ms: without {}; with {}",
            p99s(&without),
            p99s(&with)
        );
        let (without, with) = (pooled(&without), pooled(&with));
        println!(
            "    {} clients over {PAIRS} rounds: p50 {:.1} ms, p99 {:.1} ms; with {STALLED} stalled, {PAIRS} rounds between them: p50 {:.1} ms, p99 {:.1} ms",
            clients.count,
            quantile(&without, 0.5),
            quantile(&without, 0.99),
            quantile(&with, 0.5),
            quantile(&with, 0.99),
        );
        println!(
            "    healthy p99 with the stalled clients: {:+.1}% against without them",
            (quantile(&with, 0.99) / quantile(&without, 0.99) - 1.0) * 100.0
        );
        println!(
            "    the last stalled clients gone {:.0} s after they stopped reading ({} for a full queue); healthy clients closed: {}",
            stalled_at.elapsed().as_secs_f64(),
            scrape(&tally.url)["tally_ws_slow_clients_dropped_total"] - dropped_before,
            clients.closed.load(Ordering::Relaxed)
        );
        runtime.block_on(clients.close());
    }
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
}

fn report(name: &str, round: &Round, rss: Option<f64>) {
    let memory = rss.map_or(String::new(), |b| {
        format!(", {:.1} KB/connection", b / 1024.0)
    });
    println!(
        "    {name:<28} delay p50 {:>6.1} ms, p99 {:>6.1} ms, {} messages, {} closed by the server, server CPU {:.2} cores, clients {:.2}{memory}",
        quantile(&round.delays, 0.5),
        quantile(&round.delays, 0.99),
        round.delays.len(),
        round.closed,
        round.cpu_cores,
        round.client_cores,
    );
}

/// Healthy clients, reading everything they are sent.
struct Clients {
    count: usize,
    delays: Arc<Mutex<Vec<f64>>>,
    closed: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Clients {
    async fn connect(url: &str, count: usize) -> Clients {
        let delays: Arc<Mutex<Vec<f64>>> = Arc::default();
        let closed = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::with_capacity(count);
        for i in 0..count {
            let mut ws = open(url, i, None).await;
            let topic = format!("metrics:events:country:{}", COUNTRIES[i % COUNTRIES.len()]);
            let subscribe = serde_json::json!({"action": "subscribe", "topic": topic, "window": "tumbling 10s"});
            ws.send(Message::text(subscribe.to_string())).await.unwrap();
            let (delays, closed) = (Arc::clone(&delays), Arc::clone(&closed));
            tasks.push(tokio::spawn(async move {
                while let Some(frame) = ws.next().await {
                    match frame {
                        Ok(Message::Text(text)) => {
                            let now = now_ms();
                            if let Some(sent) = server_time(&text) {
                                delays.lock().unwrap().push((now - sent) as f64);
                            }
                        }
                        Ok(Message::Close(_)) | Err(_) => {
                            closed.fetch_add(1, Ordering::Relaxed);
                            return;
                        }
                        Ok(_) => {}
                    }
                }
            }));
        }
        Clients {
            count,
            delays,
            closed,
            tasks,
        }
    }

    async fn measure(&self, pid: u32) -> Round {
        self.delays.lock().unwrap().clear();
        let closed = self.closed.load(Ordering::Relaxed);
        let (cpu, own) = (cpu_seconds(pid), cpu_seconds(std::process::id()));
        let started = Instant::now();
        tokio::time::sleep(MEASURE).await;
        let cpu_cores = (cpu_seconds(pid) - cpu) / started.elapsed().as_secs_f64();
        let client_cores =
            (cpu_seconds(std::process::id()) - own) / started.elapsed().as_secs_f64();
        let mut delays = std::mem::take(&mut *self.delays.lock().unwrap());
        delays.sort_by(f64::total_cmp);
        Round {
            delays,
            closed: self.closed.load(Ordering::Relaxed) - closed,
            cpu_cores,
            client_cores,
        }
    }

    async fn close(self) {
        for task in self.tasks {
            task.abort();
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
}

pub type Socket = tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>;

/// How the bench's clients read. Messages are small: the library's default
/// 128 KiB read buffer, zeroed before every read, would make the clients
/// the bottleneck.
pub fn client_config() -> WebSocketConfig {
    WebSocketConfig::default().read_buffer_size(4096)
}

/// A TCP connection to `address` from 127.0.0.(1 + i % 4): four source
/// addresses have four times the ephemeral ports of one.
pub async fn connect_from(
    address: std::net::SocketAddr,
    i: usize,
    receive_buffer: Option<u32>,
) -> tokio::net::TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    if let Some(bytes) = receive_buffer {
        socket.set_recv_buffer_size(bytes).unwrap();
    }
    socket
        .bind(format!("127.0.0.{}:0", 1 + i % 4).parse().unwrap())
        .unwrap();
    socket.connect(address).await.unwrap()
}

/// A WebSocket to `/v1/live` from 127.0.0.(1 + i % 4).
pub async fn open(url: &str, i: usize, receive_buffer: Option<u32>) -> Socket {
    let address: std::net::SocketAddr = url.trim_start_matches("http://").parse().unwrap();
    let stream = connect_from(address, i, receive_buffer).await;
    let (ws, _) = tokio_tungstenite::client_async_with_config(
        format!("ws://{address}/v1/live"),
        stream,
        Some(client_config()),
    )
    .await
    .unwrap();
    ws
}

/// Clients that subscribe to every topic, in both windows and by country,
/// and never read again. Their receive buffers are small, so their
/// server-side queues fill within seconds.
async fn stall(url: &str, count: usize) -> Vec<Socket> {
    let mut sockets = Vec::with_capacity(count);
    for i in 0..count {
        let mut ws = open(url, i, Some(4096)).await;
        for window in ["tumbling 10s", "tumbling 1m"] {
            let mut subscriptions: Vec<_> = COUNTRIES
                .iter()
                .map(|c| serde_json::json!({"action": "subscribe", "topic": format!("metrics:events:country:{c}"), "window": window}))
                .collect();
            subscriptions.push(serde_json::json!({"action": "subscribe", "topic": "metrics:events", "window": window, "groupBy": "country"}));
            for subscribe in subscriptions {
                ws.send(Message::text(subscribe.to_string())).await.unwrap();
            }
        }
        sockets.push(ws);
    }
    sockets
}

/// The server's `timestamp` in a live message.
pub fn server_time(text: &str) -> Option<i64> {
    let at = text.find("\"timestamp\":\"")? + 13;
    let end = at + text[at..].find('"')?;
    parse_rfc3339(&text[at..end])
}

/// Posts events for every topic, a few times a second, until stopped.
fn feed(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let agent = agent();
        while !stop.load(Ordering::Relaxed) {
            let now = now_ms();
            let events: Vec<_> = (0..200)
                .map(|i| serde_json::json!({"eventType": "ad_click", "timestamp": now, "dimensions": {"country": COUNTRIES[i % 4], "campaignId": "camp_1"}}))
                .collect();
            let _ = agent.post(format!("{url}/v1/events")).send_json(&events);
            std::thread::sleep(Duration::from_millis(250));
        }
    })
}

/// Waits until the server counts `count` WebSocket clients, or `limit`.
fn wait_for_clients(url: &str, count: usize, limit: Duration) {
    let deadline = Instant::now() + limit;
    while scrape(url)["tally_ws_clients"] > count as f64 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Writes a `len`-byte frame to each of `n` loopback TCP connections in
/// turn, for several rounds, and returns the median seconds per write. The
/// receiving ends are drained between rounds, untimed.
pub fn raw_writes(n: usize, len: usize) -> f64 {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let mut pairs: Vec<_> = (0..n)
        .map(|_| {
            let reader = std::net::TcpStream::connect(address).unwrap();
            reader.set_nonblocking(true).unwrap();
            let (writer, _) = listener.accept().unwrap();
            writer.set_nodelay(true).unwrap();
            (writer, reader)
        })
        .collect();
    let frame = vec![b'x'; len];
    let mut buffer = vec![0; 64 * 1024];
    let mut rounds: Vec<f64> = (0..10)
        .map(|_| {
            let started = Instant::now();
            for (writer, _) in &mut pairs {
                writer.write_all(&frame).unwrap();
            }
            let elapsed = started.elapsed().as_secs_f64();
            for (_, reader) in &mut pairs {
                while reader.read(&mut buffer).is_ok_and(|read| read > 0) {}
            }
            elapsed / n as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[rounds.len() / 2]
}

/// Raises this process's open-file limit to its hard limit; the server,
/// started after, inherits it. Returns the limit.
pub fn raise_open_files() -> u64 {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct given.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
        limit.rlim_cur = limit.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit);
    }
    limit.rlim_cur
}
