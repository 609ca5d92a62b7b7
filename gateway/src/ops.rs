//! Operations: Prometheus text at `/metrics`, `/healthz` and `/readyz`.
//!
//! Request counters are updated by the handlers, once per request. Values
//! owned elsewhere (log size, watermarks, the job's counters) are read when
//! Prometheus scrapes, through the [`Observe`] callback, so nothing is
//! counted per record.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::catalog::Backfill;
use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use tally_connectors::store::Stalls;

/// The bounds of the live freshness histogram, in seconds: fine around
/// the 100 ms that a live value should take at most.
const FRESHNESS_BUCKETS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Values read at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Observed {
    /// Bytes held by the event log.
    pub log_bytes: u64,
    /// Each worker's watermark, in Unix milliseconds.
    pub watermarks: Vec<Option<i64>>,
    /// Final window results emitted, revisions included.
    pub windows_emitted: u64,
    /// Late contributions that revised a closed window.
    pub late_updates: u64,
    /// Events sent to the dead letters.
    pub dead_letters: u64,
    /// Events dropped as repeats of an `eventId`.
    pub duplicates: u64,
    /// Records the job has read from the log.
    pub events_read: u64,
    /// Live updates dropped because the gateway was behind.
    pub live_dropped: u64,
    /// Checkpoints committed since start.
    pub checkpoints: u64,
    /// Failed attempts to write a checkpoint file.
    pub checkpoint_failures: u64,
    /// Checkpoint parts dropped because the committer was behind.
    pub checkpoint_parts_dropped: u64,
    /// Boundary of the newest committed checkpoint, in Unix milliseconds.
    pub checkpoint_boundary: u64,
    /// Size of the newest committed checkpoint.
    pub checkpoint_bytes: u64,
    /// Time from the newest checkpoint's first part to its commit.
    pub checkpoint_duration_ms: u64,
    /// The backfill under way, if one is.
    pub backfill: Option<Backfill>,
    /// Per metric name: the groups it holds, and the events counted in its
    /// overflow group.
    pub groups: BTreeMap<String, (u64, u64)>,
    /// How often the workers' results waited for the result store.
    pub store_stalls: Stalls,
}

/// Reads the values owned outside the gateway.
pub type Observe = Box<dyn Fn() -> Observed + Send + Sync>;

/// The gateway's metrics, and the job's when the job runs in the same
/// process.
pub struct Ops {
    registry: Registry,
    /// Events accepted into the log.
    pub events_accepted: IntCounter,
    events_rejected: IntCounter,
    requests_rejected: IntCounterVec,
    /// Connected WebSocket clients.
    pub ws_clients: IntGauge,
    /// WebSocket clients dropped for falling behind.
    pub ws_slow_dropped: IntCounter,
    /// From when the log took a batch to when a partial including it
    /// reached the hub.
    pub live_freshness: Histogram,
    ws_refused: IntCounterVec,
    live_resumes: IntCounterVec,
    auth_refused: IntCounterVec,
    history_refused: IntCounterVec,
    history_rows: IntCounterVec,
    /// The accept loop's connections and refusals.
    pub connections: Arc<ConnectionMetrics>,
    job: Option<JobMetrics>,
    ready: AtomicBool,
}

/// The accept loop's metrics: open connections, their cap, and the
/// connections refused or closed by a bound. They have a registry of their
/// own because a worker's `/metrics` serves them too, beside the job's.
pub struct ConnectionMetrics {
    registry: Registry,
    /// Open HTTP connections, WebSockets included.
    pub open: IntGauge,
    /// The cap on open connections, as lowered to the descriptor limit.
    pub limit: IntGauge,
    refused: IntCounterVec,
}

impl ConnectionMetrics {
    /// Registers the connection metrics.
    pub fn new() -> ConnectionMetrics {
        let registry = Registry::new();
        let refused = labelled(
            &registry,
            "tally_connections_refused_total",
            "Connections closed or requests refused by a connection bound, by reason: \
             header_timeout (no complete request head in time), at_capacity (a 503 at the \
             connection cap), over_capacity (closed unanswered past the cap and its reserve).",
        );
        ConnectionMetrics {
            open: gauge(
                &registry,
                "tally_connections",
                "Open HTTP connections, WebSockets included.",
            ),
            limit: gauge(
                &registry,
                "tally_connections_limit",
                "The cap on open connections: server.max_connections, lowered to fit the descriptor limit.",
            ),
            refused,
            registry,
        }
    }

    /// Counts a connection or request refused for `reason`.
    pub fn refused(&self, reason: &str) {
        self.refused.with_label_values(&[reason]).inc();
    }

    /// Appends the Prometheus text of the connection metrics to `out`.
    pub fn render(&self, out: &mut Vec<u8>) {
        text(&self.registry, out);
    }
}

impl Default for ConnectionMetrics {
    fn default() -> ConnectionMetrics {
        ConnectionMetrics::new()
    }
}

/// The job's metrics, read from the job at scrape time: served by `tally
/// run` beside the gateway's, and by each `tally worker` on its own.
pub struct JobMetrics {
    registry: Registry,
    log_bytes: IntGauge,
    watermark_lag: IntGaugeVec,
    windows_emitted: IntCounter,
    late_updates: IntCounter,
    dead_letters: IntCounter,
    duplicates: IntCounter,
    events_read: IntCounter,
    live_dropped: IntCounter,
    checkpoints: IntCounter,
    checkpoint_failures: IntCounter,
    checkpoint_parts_dropped: IntCounter,
    checkpoint_boundary: IntGauge,
    checkpoint_bytes: IntGauge,
    checkpoint_duration: Gauge,
    backfill_running: IntGauge,
    backfill_behind: IntGauge,
    backfill_lag: IntGauge,
    backfill_rate: Gauge,
    groups: IntGaugeVec,
    overflowed: IntCounterVec,
    store_stalls: IntCounterVec,
    observe: Observe,
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let c = IntCounter::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let g = IntGauge::new(name, help).expect("valid metric name");
    registry
        .register(Box::new(g.clone()))
        .expect("registered once");
    g
}

fn labelled(registry: &Registry, name: &str, help: &str) -> IntCounterVec {
    labelled_by(registry, name, help, "reason")
}

fn labelled_by(registry: &Registry, name: &str, help: &str, label: &str) -> IntCounterVec {
    let c = IntCounterVec::new(Opts::new(name, help), &[label]).expect("valid metric");
    registry
        .register(Box::new(c.clone()))
        .expect("registered once");
    c
}

fn text(registry: &Registry, out: &mut Vec<u8>) {
    // Encoding into a Vec cannot fail.
    TextEncoder::new()
        .encode(&registry.gather(), out)
        .expect("text encoding");
}

impl JobMetrics {
    /// Registers the job's metrics, to be read from `observe`.
    pub fn new(observe: Observe) -> JobMetrics {
        let registry = Registry::new();
        let watermark_lag = IntGaugeVec::new(
            Opts::new(
                "tally_watermark_lag_seconds",
                "Wall-clock time minus the worker's event-time watermark.",
            ),
            &["worker"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(watermark_lag.clone()))
            .expect("registered once");
        let checkpoint_duration = Gauge::new(
            "tally_checkpoint_duration_seconds",
            "Time from the newest checkpoint's first part to its commit.",
        )
        .expect("valid metric name");
        registry
            .register(Box::new(checkpoint_duration.clone()))
            .expect("registered once");
        let backfill_rate = Gauge::new(
            "tally_backfill_events_per_second",
            "Events the backfill reads per second, lately; 0 when none runs.",
        )
        .expect("valid metric name");
        registry
            .register(Box::new(backfill_rate.clone()))
            .expect("registered once");
        let groups = IntGaugeVec::new(
            Opts::new(
                "tally_metric_groups",
                "Groups the metric holds by all its dimensions, of at most about its max_groups.",
            ),
            &["metric"],
        )
        .expect("valid metric");
        registry
            .register(Box::new(groups.clone()))
            .expect("registered once");
        let overflowed = labelled_by(
            &registry,
            "tally_overflowed_events_total",
            "Events counted in the metric's __overflow__ group because it held max_groups groups.",
            "metric",
        );
        let store_stalls = labelled(
            &registry,
            "tally_store_stalls_total",
            "Times a worker's results waited for the result store, which stops the job's reading \
             of the log until it catches up, by reason: full (its writer held dataflow.store_queue \
             results), failing (its last write had failed).",
        );
        JobMetrics {
            groups,
            overflowed,
            store_stalls,
            backfill_running: gauge(
                &registry,
                "tally_backfill_running",
                "1 while a backfill computes changed or new metrics from the log.",
            ),
            backfill_behind: gauge(
                &registry,
                "tally_backfill_events_behind",
                "Events in the log the backfill has yet to read.",
            ),
            backfill_lag: gauge(
                &registry,
                "tally_backfill_lag_seconds",
                "The live job's event-time watermark minus the backfill's.",
            ),
            backfill_rate,
            log_bytes: gauge(&registry, "tally_log_bytes", "Bytes held by the event log."),
            watermark_lag,
            windows_emitted: counter(
                &registry,
                "tally_windows_emitted_total",
                "Final window results emitted, revisions included.",
            ),
            late_updates: counter(
                &registry,
                "tally_late_updates_total",
                "Late contributions that revised a closed window.",
            ),
            dead_letters: counter(
                &registry,
                "tally_dead_letters_total",
                "Events too late for any kept window.",
            ),
            duplicates: counter(
                &registry,
                "tally_duplicate_events_total",
                "Events dropped because an event with the same eventId was read within dedupe.horizon.",
            ),
            events_read: counter(
                &registry,
                "tally_events_read_total",
                "Records the job has read from the log since start.",
            ),
            live_dropped: counter(
                &registry,
                "tally_live_updates_dropped_total",
                "Live updates dropped because the fan-out was behind.",
            ),
            checkpoints: counter(
                &registry,
                "tally_checkpoints_total",
                "Checkpoints committed.",
            ),
            checkpoint_failures: counter(
                &registry,
                "tally_checkpoint_failures_total",
                "Failed attempts to write a checkpoint file.",
            ),
            checkpoint_parts_dropped: counter(
                &registry,
                "tally_checkpoint_parts_dropped_total",
                "Checkpoint parts dropped because the checkpoint store was behind; their checkpoints are never committed.",
            ),
            checkpoint_boundary: gauge(
                &registry,
                "tally_checkpoint_boundary_seconds",
                "Event-time boundary of the newest committed checkpoint.",
            ),
            checkpoint_bytes: gauge(
                &registry,
                "tally_checkpoint_bytes",
                "Size of the newest committed checkpoint.",
            ),
            checkpoint_duration,
            registry,
            observe,
        }
    }

    /// Appends the Prometheus text of the job's metrics to `out`.
    pub fn render(&self, now_ms: i64, out: &mut Vec<u8>) {
        let o = (self.observe)();
        self.log_bytes.set(o.log_bytes as i64);
        for (worker, watermark) in o.watermarks.iter().enumerate() {
            if let Some(w) = watermark {
                self.watermark_lag
                    .with_label_values(&[&worker.to_string()])
                    .set((now_ms - w) / 1000);
            }
        }
        for (counter, value) in [
            (&self.windows_emitted, o.windows_emitted),
            (&self.late_updates, o.late_updates),
            (&self.dead_letters, o.dead_letters),
            (&self.duplicates, o.duplicates),
            (&self.events_read, o.events_read),
            (&self.live_dropped, o.live_dropped),
            (&self.checkpoints, o.checkpoints),
            (&self.checkpoint_failures, o.checkpoint_failures),
            (&self.checkpoint_parts_dropped, o.checkpoint_parts_dropped),
        ] {
            counter.inc_by(value.saturating_sub(counter.get()));
        }
        self.checkpoint_boundary
            .set((o.checkpoint_boundary / 1000) as i64);
        self.checkpoint_bytes.set(o.checkpoint_bytes as i64);
        self.checkpoint_duration
            .set(o.checkpoint_duration_ms as f64 / 1000.0);
        for (metric, (held, overflowed)) in &o.groups {
            self.groups.with_label_values(&[metric]).set(*held as i64);
            let counter = self.overflowed.with_label_values(&[metric]);
            counter.inc_by(overflowed.saturating_sub(counter.get()));
        }
        for (reason, value) in [
            ("full", o.store_stalls.full),
            ("failing", o.store_stalls.failing),
        ] {
            let counter = self.store_stalls.with_label_values(&[reason]);
            counter.inc_by(value.saturating_sub(counter.get()));
        }
        let backfill = o.backfill.unwrap_or_default();
        self.backfill_running
            .set(i64::from(!backfill.metrics.is_empty()));
        self.backfill_behind
            .set(backfill.to_read.saturating_sub(backfill.read) as i64);
        self.backfill_lag.set(backfill.lag / 1000);
        self.backfill_rate.set(backfill.rate);
        text(&self.registry, out);
    }
}

impl Ops {
    /// Registers the gateway's metrics, and the job's if `job` is given.
    pub fn new(job: Option<JobMetrics>) -> Ops {
        let registry = Registry::new();
        let requests_rejected = labelled(
            &registry,
            "tally_ingest_requests_rejected_total",
            "Ingest requests rejected, by reason.",
        );
        let ws_refused = labelled(
            &registry,
            "tally_ws_refused_total",
            "WebSocket client messages refused, by reason: bad_subscription, \
             too_many_subscriptions, unreadable (not a request), binary (closes the connection).",
        );
        let live_resumes = labelled_by(
            &registry,
            "tally_live_resumes_total",
            "Subscriptions that resumed from a time, by outcome: complete (every window since \
             then replayed), truncated (the oldest left out, past live.max_resume_rows), \
             unavailable (the store could not be read; only the windows the hub holds).",
            "outcome",
        );
        let auth_refused = {
            let c = IntCounterVec::new(
                Opts::new(
                    "tally_auth_refused_total",
                    "Requests refused by key and reason: missing (no secret, 401), unknown (a secret \
                     of no key, 401; key=\"\"), scope (the key may not, 403), rate (over the key's \
                     events per second, 429), burst (more events in one request than the key's \
                     burst, 413), origin (a WebSocket from an origin not allowed, 403; key=\"\").",
                ),
                &["key", "reason"],
            )
            .expect("valid metric");
            registry
                .register(Box::new(c.clone()))
                .expect("registered once");
            c
        };
        let history_refused = labelled(
            &registry,
            "tally_history_queries_refused_total",
            "History queries refused with a 400, by reason: invalid (a parameter is missing, \
             unknown, repeated or malformed), max_points, max_groups, max_sketches.",
        );
        let history_rows = labelled_by(
            &registry,
            "tally_history_rows_read_total",
            "Stored rows history queries read, by table: metric (every dimension, the \
             metric's own windows) or rollup (fewer dimensions or a coarser window).",
            "table",
        );
        Ops {
            events_accepted: counter(
                &registry,
                "tally_events_accepted_total",
                "Events accepted into the log.",
            ),
            events_rejected: counter(
                &registry,
                "tally_events_rejected_total",
                "Invalid events in rejected batches.",
            ),
            requests_rejected,
            ws_clients: gauge(
                &registry,
                "tally_ws_clients",
                "Connected WebSocket clients.",
            ),
            ws_slow_dropped: counter(
                &registry,
                "tally_ws_slow_clients_dropped_total",
                "WebSocket clients disconnected for a full queue.",
            ),
            live_freshness: {
                let h = Histogram::with_opts(
                    HistogramOpts::new(
                        "tally_live_freshness_seconds",
                        "From when the log took the newest batch a partial value includes to when the value reached the live hub, which sends it on at once.",
                    )
                    .buckets(FRESHNESS_BUCKETS.to_vec()),
                )
                .expect("valid metric");
                registry
                    .register(Box::new(h.clone()))
                    .expect("registered once");
                h
            },
            ws_refused,
            live_resumes,
            auth_refused,
            history_refused,
            history_rows,
            connections: Arc::new(ConnectionMetrics::new()),
            registry,
            job,
            ready: AtomicBool::new(false),
        }
    }

    /// Counts a rejected request, and the invalid events in it.
    pub fn rejected(&self, reason: &str, events: u64) {
        self.requests_rejected.with_label_values(&[reason]).inc();
        self.events_rejected.inc_by(events);
    }

    /// Counts a WebSocket client's message refused for `reason`.
    pub fn ws_refused(&self, reason: &str) {
        self.ws_refused.with_label_values(&[reason]).inc();
    }

    /// Counts a subscription that resumed, by how completely.
    pub fn live_resumed(&self, outcome: &str) {
        self.live_resumes.with_label_values(&[outcome]).inc();
    }

    /// Counts a request refused for `reason`, by the key it came with.
    pub fn auth_refused(&self, key: &str, reason: &str) {
        self.auth_refused.with_label_values(&[key, reason]).inc();
    }

    /// Counts a history query refused for `reason`.
    pub fn history_refused(&self, reason: &str) {
        self.history_refused.with_label_values(&[reason]).inc();
    }

    /// Counts the rows a history query read from a `table` (`metric` or
    /// `rollup`).
    pub fn history_read(&self, table: &str, rows: u64) {
        self.history_rows.with_label_values(&[table]).inc_by(rows);
    }

    /// Marks the node ready (or not) for `/readyz`.
    pub fn set_ready(&self, ready: bool) {
        self.ready.store(ready, Ordering::Relaxed);
    }

    /// Whether the node is ready.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    /// The Prometheus text exposition.
    pub fn render(&self, now_ms: i64) -> String {
        let mut out = Vec::new();
        text(&self.registry, &mut out);
        self.connections.render(&mut out);
        if let Some(job) = &self.job {
            job.render(now_ms, &mut out);
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}
