//! (f) Fan-out across gateways: 50,000 WebSocket clients on three cluster
//! gateways that the workers feed through Redis.
//!
//! One process may hold about 19,500 sockets here (the open-file limit is
//! 20,000 and cannot be raised), so the clients run in three processes of
//! this benchmark, one per gateway, and connect to it directly. Each client
//! subscribes to one of four topics (`metrics:events:country:<c>`, tumbling
//! 10 s), which an event a second per country updates, so every client gets
//! a message in the same burst, once a second. The delay of a message is the
//! client's receive time minus the `timestamp` its gateway wrote into it.
//!
//! The floor, in the same run: three processes that each write one
//! WebSocket text frame of the same size, with the time in it, to each of
//! as many loopback TCP connections in turn, once a second, read by the
//! same client code: what a burst to that many sockets costs with no
//! server-side WebSocket library, task, queue or JSON. The clients share
//! the two cores with the servers, so both sides' clients do the same work
//! per message. Both are measured for 20 s, with the CPU of the servers
//! (the gateways, or the three writers) and of the clients.
//!
//! While tally is measured, a thread posts an event to each gateway in
//! turn every 20 ms and times its `202`: what the bursts cost ingest.
//!
//! The gateways run with `server.threads = 1`: three of them share two
//! cores, as the README advises for gateways that share a machine.
//!
//! Needs the services of `scripts/services.sh`, named by `KAFKA_BROKERS`,
//! `CLICKHOUSE_URL` and `REDIS_URL`.

use std::io::{BufRead, BufReader, Lines, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tally_dataflow::time::format_rfc3339;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::cluster::{Cluster, Services};
use crate::fanout::{
    client_config, connect_from, open, raise_open_files, server_time, COUNTRIES, FRAME,
};
use crate::support::{agent, cpu_seconds, now_ms, quantile, rss_kb, scrape};

/// The variable that makes this benchmark's binary a client or writer
/// process: `raw-writer COUNT`, `raw-clients ADDRESS COUNT FIRST` or
/// `ws-clients URL COUNT FIRST`.
pub const SHARD: &str = "TALLY_BENCH_SHARD";
const CLIENTS: usize = 50_000;
const GATEWAYS: usize = 3;
const MEASURE: Duration = Duration::from_secs(20);
/// Delays are counted by the millisecond, up to a minute.
const BUCKETS: usize = 60_000;

pub fn run() {
    let Some(services) = Services::from_env() else {
        println!("(f) fan-out across gateways: skipped; start the services with scripts/services.sh and export their addresses");
        return;
    };
    let limit = raise_open_files() as usize;
    let per = (CLIENTS / GATEWAYS).min(limit.saturating_sub(500));
    let clients = per * GATEWAYS;
    println!(
        "(f) fan-out across {GATEWAYS} gateways: {clients} clients, {per} per process, a message each a second, measured for {} s",
        MEASURE.as_secs()
    );

    // The floor: three writers, each to its own clients.
    let mut writers: Vec<Shard> = (0..GATEWAYS)
        .map(|_| Shard::spawn(&format!("raw-writer {per}")))
        .collect();
    let addresses: Vec<String> = writers.iter_mut().map(|w| w.expect("listening")).collect();
    let mut readers: Vec<Shard> = addresses
        .iter()
        .enumerate()
        .map(|(g, a)| Shard::spawn(&format!("raw-clients {a} {per} {}", g * per)))
        .collect();
    for shard in writers.iter_mut().chain(&mut readers) {
        shard.expect("ready");
    }
    let floor = measure(&mut writers, &mut readers, &[]);
    drop(readers);
    drop(writers);
    report("floor: raw loopback writes", &floor, None);

    let dir = tempfile::tempdir().unwrap();
    let cluster = Cluster::start(
        &services,
        dir.path(),
        // Room for every client: each gateway lowers it to fit its
        // descriptor limit, as it logs.
        &[
            ("TALLY__SERVER__MAX_CONNECTIONS", "1000000"),
            ("TALLY__SERVER__THREADS", "1"),
        ],
        GATEWAYS,
    );
    let gateways: Vec<u32> = cluster.gateways.iter().map(|g| g.pid()).collect();
    let stop = Arc::new(AtomicBool::new(false));
    let feeder = feed(cluster.gateways[0].url.clone(), Arc::clone(&stop));
    let rss_before: u64 = gateways.iter().map(|&p| rss_kb(p)).sum();
    let dropped = || -> f64 {
        cluster
            .gateways
            .iter()
            .map(|g| scrape(&g.url)["tally_ws_slow_clients_dropped_total"])
            .sum()
    };
    let dropped_before = dropped();
    let mut shards: Vec<Shard> = cluster
        .gateways
        .iter()
        .enumerate()
        .map(|(g, gateway)| Shard::spawn(&format!("ws-clients {} {per} {}", gateway.url, g * per)))
        .collect();
    for shard in &mut shards {
        shard.expect("ready");
    }
    std::thread::sleep(Duration::from_secs(3));
    let rss = (gateways.iter().map(|&p| rss_kb(p)).sum::<u64>() - rss_before) as f64 * 1024.0
        / clients as f64;
    let stop_probing = Arc::new(AtomicBool::new(false));
    let prober = probe(
        cluster.gateways.iter().map(|g| g.url.clone()).collect(),
        Arc::clone(&stop_probing),
    );
    let tally = measure(&mut [], &mut shards, &gateways);
    stop_probing.store(true, Ordering::Relaxed);
    let mut posts = prober.join().unwrap();
    posts.sort_by(f64::total_cmp);
    let dropped = dropped() - dropped_before;
    report("tally: 3 gateways", &tally, Some(rss));
    println!(
        "    meanwhile, POST /v1/events of one event to each gateway in turn every 20 ms: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} posts)",
        quantile(&posts, 0.5),
        quantile(&posts, 0.99),
        posts.last().copied().unwrap_or(f64::NAN),
        posts.len()
    );
    println!(
        "    p99 {:.2}x the floor's; server CPU per delivered message {:.1} µs, {:.1}x the floor's write; dropped for a full queue: {dropped}",
        tally.quantile(0.99) / floor.quantile(0.99),
        tally.cpu_per_message() * 1e6,
        tally.cpu_per_message() / floor.cpu_per_message(),
    );
    drop(shards);
    stop.store(true, Ordering::Relaxed);
    feeder.join().unwrap();
}

/// What one measurement saw.
struct Round {
    /// Messages received, by delay in milliseconds.
    delays: Vec<u64>,
    /// Connections the servers closed.
    closed: u64,
    /// The servers' CPU, in cores.
    server_cores: f64,
    /// The clients' CPU, in cores.
    client_cores: f64,
}

impl Round {
    fn messages(&self) -> u64 {
        self.delays.iter().sum()
    }

    /// The delay below which a fraction `q` of the messages arrived, in ms.
    fn quantile(&self, q: f64) -> f64 {
        let rank = (q * self.messages() as f64).ceil() as u64;
        let mut seen = 0;
        for (ms, &n) in self.delays.iter().enumerate() {
            seen += n;
            if seen >= rank.max(1) {
                return ms as f64;
            }
        }
        f64::NAN
    }

    fn cpu_per_message(&self) -> f64 {
        self.server_cores * MEASURE.as_secs_f64() / self.messages() as f64
    }
}

fn report(name: &str, round: &Round, rss: Option<f64>) {
    let memory = rss.map_or(String::new(), |b| {
        format!(", {:.1} KB/connection", b / 1024.0)
    });
    println!(
        "    {name:<28} delay p50 {:>5.0} ms, p99 {:>5.0} ms, {} messages, {} closed by the server, server CPU {:.2} cores, clients {:.2}{memory}",
        round.quantile(0.5),
        round.quantile(0.99),
        round.messages(),
        round.closed,
        round.server_cores,
        round.client_cores,
    );
}

/// Measures for [`MEASURE`]: the clients' delays and CPU, and the CPU of
/// the writer shards or of the server processes `servers`.
fn measure(writers: &mut [Shard], clients: &mut [Shard], servers: &[u32]) -> Round {
    let cpu = || servers.iter().map(|&p| cpu_seconds(p)).sum::<f64>();
    let before = cpu();
    for shard in writers.iter_mut().chain(clients.iter_mut()) {
        shard.say("measure");
    }
    std::thread::sleep(MEASURE);
    let mut round = Round {
        delays: vec![0; BUCKETS],
        closed: 0,
        server_cores: (cpu() - before) / MEASURE.as_secs_f64(),
        client_cores: 0.0,
    };
    for shard in writers.iter_mut() {
        shard.say("report");
        round.server_cores +=
            shard.expect("report").parse::<f64>().unwrap() / MEASURE.as_secs_f64();
    }
    for shard in clients.iter_mut() {
        shard.say("report");
        let line = shard.expect("report");
        let mut fields = line.split_whitespace();
        round.closed += fields.next().unwrap().parse::<u64>().unwrap();
        round.client_cores +=
            fields.next().unwrap().parse::<f64>().unwrap() / MEASURE.as_secs_f64();
        for bucket in fields {
            let (ms, n) = bucket.split_once(':').unwrap();
            round.delays[ms.parse::<usize>().unwrap()] += n.parse::<u64>().unwrap();
        }
    }
    round
}

/// Posts an event per country once a second, until stopped.
fn feed(url: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let agent = agent();
        while !stop.load(Ordering::Relaxed) {
            let now = now_ms();
            let events: Vec<_> = COUNTRIES
                .iter()
                .map(|c| serde_json::json!({"eventType": "ad_click", "timestamp": now, "dimensions": {"country": c, "campaignId": "camp_1"}}))
                .collect();
            let _ = agent.post(format!("{url}/v1/events")).send_json(&events);
            std::thread::sleep(Duration::from_secs(1));
        }
    })
}

/// Posts one event to each of `urls` in turn, every 20 ms, until stopped:
/// what the bursts cost ingest on the same gateways. Returns each post's
/// time to its `202`, in ms. Its country is no client's.
fn probe(urls: Vec<String>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Vec<f64>> {
    std::thread::spawn(move || {
        let agent = agent();
        let mut took = Vec::new();
        for url in urls.iter().cycle() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let event = serde_json::json!([{"eventType": "ad_click", "timestamp": now_ms(), "dimensions": {"country": "probe", "campaignId": "camp_1"}}]);
            let start = Instant::now();
            let answer = agent.post(format!("{url}/v1/events")).send_json(&event);
            assert_eq!(answer.map(|a| a.status().as_u16()).ok(), Some(202));
            took.push(start.elapsed().as_secs_f64() * 1e3);
            std::thread::sleep(Duration::from_millis(20));
        }
        took
    })
}

/// A process of this binary in a [`SHARD`] role, spoken to by lines: it
/// says `listening ADDRESS` (a writer) and `ready`; `measure` starts a
/// measurement and `report` ends it.
struct Shard {
    child: Child,
    stdin: ChildStdin,
    lines: Lines<BufReader<ChildStdout>>,
}

impl Shard {
    fn spawn(role: &str) -> Shard {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .env(SHARD, role)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start a shard");
        let stdin = child.stdin.take().unwrap();
        let lines = BufReader::new(child.stdout.take().unwrap()).lines();
        Shard {
            child,
            stdin,
            lines,
        }
    }

    fn say(&mut self, line: &str) {
        writeln!(self.stdin, "{line}").unwrap();
    }

    /// The rest of the next line, which must start with `word`.
    fn expect(&mut self, word: &str) -> String {
        let line = self.lines.next().expect("a line from the shard").unwrap();
        let rest = line
            .strip_prefix(word)
            .unwrap_or_else(|| panic!("{word}, not {line}"));
        rest.trim().to_string()
    }
}

impl Drop for Shard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs this process as the shard `role` (the value of [`SHARD`]).
pub fn shard(role: &str) {
    raise_open_files();
    let args: Vec<&str> = role.split_whitespace().collect();
    let number = |i: usize| args[i].parse::<usize>().unwrap();
    match args[0] {
        "raw-writer" => raw_writer(number(1)),
        "raw-clients" => clients(args[1], number(2), number(3), false),
        "ws-clients" => clients(args[1], number(2), number(3), true),
        other => panic!("no shard role {other}"),
    }
}

/// Takes `count` connections, then writes a [`FRAME`]-byte WebSocket text
/// frame with the time in it to each of them in turn, on every whole
/// second.
/// `report` answers with its CPU seconds since `measure`.
fn raw_writer(count: usize) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    println!("listening {}", listener.local_addr().unwrap());
    let mut sockets: Vec<TcpStream> = (0..count)
        .map(|_| {
            let (socket, _) = listener.accept().unwrap();
            socket.set_nodelay(true).unwrap();
            socket
        })
        .collect();
    println!("ready");
    std::thread::spawn(move || {
        // A text frame from a server: unmasked, with a 16-bit length.
        let payload = FRAME - 4;
        let mut frame = vec![0x81, 126, (payload >> 8) as u8, payload as u8];
        loop {
            let now = now_ms();
            std::thread::sleep(Duration::from_millis((1000 - now.rem_euclid(1000)) as u64));
            frame.truncate(4);
            let message = format!(
                r#"{{"type":"update","timestamp":"{}""#,
                format_rfc3339(now_ms())
            );
            frame.extend_from_slice(message.as_bytes());
            frame.resize(FRAME - 1, b' ');
            frame.push(b'}');
            for socket in &mut sockets {
                let _ = socket.write_all(&frame);
            }
        }
    });
    let own = std::process::id();
    let mut before = 0.0;
    for line in std::io::stdin().lines() {
        match line.unwrap().as_str() {
            "measure" => before = cpu_seconds(own),
            "report" => println!("report {}", cpu_seconds(own) - before),
            _ => {}
        }
    }
}

/// Opens `count` clients to `address`, numbered from `first` (which picks
/// the topic and the source address): WebSockets that subscribe to a topic,
/// or TCP connections to a writer, read as WebSockets already open. Each
/// counts its messages by delay.
/// `report` answers with the connections closed by the server, its CPU
/// seconds and the delays (`MS:COUNT` …), all since `measure`.
fn clients(address: &str, count: usize, first: usize, websocket: bool) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let delays: Arc<Vec<AtomicU64>> = Arc::new((0..BUCKETS).map(|_| AtomicU64::new(0)).collect());
    let closed = Arc::new(AtomicU64::new(0));
    let record = {
        let delays = Arc::clone(&delays);
        move |sent: i64| {
            let delay = (now_ms() - sent).clamp(0, BUCKETS as i64 - 1) as usize;
            delays[delay].fetch_add(1, Ordering::Relaxed);
        }
    };
    runtime.block_on(async {
        for i in first..first + count {
            let (record, closed) = (record.clone(), Arc::clone(&closed));
            let mut ws = if websocket {
                let mut ws = open(address, i, None).await;
                let topic = format!("metrics:events:country:{}", COUNTRIES[i % COUNTRIES.len()]);
                let subscribe = serde_json::json!({"action": "subscribe", "topic": topic, "window": "tumbling 10s"});
                ws.send(Message::text(subscribe.to_string())).await.unwrap();
                ws
            } else {
                let stream = connect_from(address.parse().unwrap(), i, None).await;
                WebSocketStream::from_raw_socket(stream, Role::Client, Some(client_config())).await
            };
            tokio::spawn(async move {
                while let Some(frame) = ws.next().await {
                    match frame {
                        Ok(Message::Text(text)) => {
                            if let Some(sent) = server_time(&text) {
                                record(sent);
                            }
                        }
                        Ok(Message::Close(_)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
                closed.fetch_add(1, Ordering::Relaxed);
            });
        }
    });
    println!("ready");
    let own = std::process::id();
    let (mut cpu, mut closed_before) = (0.0, 0);
    for line in std::io::stdin().lines() {
        match line.unwrap().as_str() {
            "measure" => {
                cpu = cpu_seconds(own);
                closed_before = closed.load(Ordering::Relaxed);
                for d in delays.iter() {
                    d.store(0, Ordering::Relaxed);
                }
            }
            "report" => {
                let mut line = format!(
                    "report {} {}",
                    closed.load(Ordering::Relaxed) - closed_before,
                    cpu_seconds(own) - cpu
                );
                for (ms, d) in delays.iter().enumerate() {
                    let n = d.load(Ordering::Relaxed);
                    if n > 0 {
                        line.push_str(&format!(" {ms}:{n}"));
                    }
                }
                println!("{line}");
            }
            _ => {}
        }
    }
}
