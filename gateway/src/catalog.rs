//! The metrics the gateway serves, and the backfill under way.
//!
//! The active metrics are the definitions the live job computes: a changed
//! metric keeps its old definition here until its backfill finishes, and
//! then the new one takes its place at once. History queries and live
//! subscriptions are checked against, and read the version of, what is
//! active when they arrive, so an answer never mixes versions.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};
use tally_dataflow::config::MetricSpec;
use tally_dataflow::fingerprint;
use tally_dataflow::rollup;
use tally_dataflow::time::{format_millis, format_rfc3339, Millis};
use warp::Reply;

use crate::history::unavailable;
use crate::reply::{number, ApiResult};
use tally_dataflow::time::now_ms;

use crate::Gateway;

/// The active metrics and the backfill, shared by every request.
pub struct Catalog {
    active: RwLock<Arc<Vec<MetricSpec>>>,
    backfill: RwLock<Option<Backfill>>,
}

/// Where a backfill stands: in a cluster, each worker process reports its
/// share, and [`Backfill::combine`] makes the whole of them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Backfill {
    /// The definitions it computes: changed metrics and new ones.
    pub metrics: Vec<MetricSpec>,
    /// Records read from the log so far: events in the embedded log,
    /// messages (one per accepted request or part of one) in Kafka.
    pub read: u64,
    /// Records in the log to read, those already read included.
    pub to_read: u64,
    /// Records read per second, lately.
    pub rate: f64,
    /// How far its event-time watermark is behind the live job's.
    pub lag: Millis,
}

impl Backfill {
    /// The whole of the processes' shares: what they read and have to
    /// read, at the sum of their rates, as far behind as the furthest.
    /// `None` if no process has a share.
    pub fn combine(shares: impl IntoIterator<Item = Backfill>) -> Option<Backfill> {
        shares.into_iter().reduce(|mut whole, share| {
            whole.read += share.read;
            whole.to_read += share.to_read;
            whole.rate += share.rate;
            whole.lag = whole.lag.max(share.lag);
            whole
        })
    }

    /// How much of the log it has read, from 0 to 1.
    pub fn progress(&self) -> f64 {
        if self.to_read == 0 {
            return 1.0;
        }
        (self.read as f64 / self.to_read as f64).min(1.0)
    }

    /// How long it will take yet at its rate, if it is moving.
    pub fn remaining(&self) -> Option<Duration> {
        let left = self.to_read.saturating_sub(self.read) as f64;
        (self.rate > 0.0).then(|| Duration::from_secs_f64(left / self.rate))
    }
}

impl Catalog {
    /// A catalog serving `metrics`, with no backfill.
    pub fn new(metrics: Vec<MetricSpec>) -> Catalog {
        Catalog {
            active: RwLock::new(Arc::new(metrics)),
            backfill: RwLock::new(None),
        }
    }

    /// The active metrics.
    pub fn active(&self) -> Arc<Vec<MetricSpec>> {
        Arc::clone(&self.active.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Makes `metrics` the active ones.
    pub fn activate(&self, metrics: Arc<Vec<MetricSpec>>) {
        *self.active.write().unwrap_or_else(|e| e.into_inner()) = metrics;
    }

    /// The backfill under way, if one is.
    pub fn backfill(&self) -> Option<Backfill> {
        self.backfill
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Records where the backfill stands, or that none runs.
    pub fn set_backfill(&self, backfill: Option<Backfill>) {
        *self.backfill.write().unwrap_or_else(|e| e.into_inner()) = backfill;
    }
}

/// `GET /v1/catalog`: per metric, its definition, the version active, from
/// when that version holds data, and the backfill that builds its next
/// version, while one runs. A new metric that is being backfilled is
/// listed with no version yet.
pub async fn describe(gateway: Arc<Gateway>) -> ApiResult {
    let active = gateway.catalog.active();
    let backfill = gateway.catalog.backfill();
    let mut metrics = Vec::new();
    let building = |name: &str| {
        backfill.as_ref().and_then(|b| {
            let metric = b.metrics.iter().find(|m| m.name == name)?;
            Some(json!({
                "version": fingerprint::metric(metric),
                "progress": number(b.progress()),
                "eventsRead": b.read,
                "eventsToRead": b.to_read,
                "eventsPerSecond": number(b.rate),
                "expectedEnd": b.remaining().map(|left| {
                    format_rfc3339(now_ms().saturating_add(left.as_millis() as i64))
                }),
            }))
        })
    };
    for metric in active.iter() {
        let version = fingerprint::metric(metric);
        let since = gateway
            .history
            .since(
                metric.name.clone(),
                rollup::tables(metric)
                    .iter()
                    .map(fingerprint::metric)
                    .collect(),
            )
            .await
            .map_err(unavailable)?;
        let mut entry = definition(metric);
        entry["version"] = json!(version);
        entry["coverage"] = json!({ "since": since.map(format_rfc3339) });
        if let Some(b) = building(&metric.name) {
            entry["backfill"] = b;
        }
        metrics.push(entry);
    }
    let added = backfill.iter().flat_map(|b| &b.metrics);
    for metric in added.filter(|m| active.iter().all(|a| a.name != m.name)) {
        let mut entry = definition(metric);
        entry["version"] = Value::Null;
        entry["coverage"] = Value::Null;
        entry["backfill"] = building(&metric.name).unwrap_or(Value::Null);
        metrics.push(entry);
    }
    Ok(warp::reply::json(&json!({ "metrics": metrics })).into_response())
}

/// What a metric computes, as the catalog shows it.
///
/// `keep` says how long each window's results are kept (`null`: for
/// ever), and `rollups` the tables history may read instead of the
/// metric's own rows (see `tally_dataflow::rollup`). A `quantiles` or
/// `topk` metric also shows its `k`, and a `quantiles` one its rank error.
fn definition(metric: &MetricSpec) -> Value {
    let tables = rollup::tables(metric);
    let mut definition = json!({
        "name": metric.name,
        "aggregate": metric.aggregate.to_string(),
        "field": metric.field.as_ref().map(ToString::to_string),
        "dimensions": metric.dimensions,
        "windows": metric.windows.iter().map(ToString::to_string).collect::<Vec<_>>(),
        "keep": keep(metric),
        "rollups": tables[1..].iter().map(|t| json!({
            "dimensions": t.dimensions,
            "windows": t.windows.iter().map(ToString::to_string).collect::<Vec<_>>(),
            "keep": keep(t),
            "version": fingerprint::metric(t),
        })).collect::<Vec<_>>(),
    });
    if let Some(k) = metric.aggregate.k() {
        definition["k"] = json!(k);
    }
    if let Some(error) = metric.aggregate.rank_error() {
        definition["rankError"] = json!(error);
    }
    definition
}

/// Each window's retention, by the window.
fn keep(metric: &MetricSpec) -> Map<String, Value> {
    metric
        .windows
        .iter()
        .enumerate()
        .map(|(w, window)| {
            let keep = metric.keep(w).map(|k| json!(format_millis(k)));
            (window.to_string(), keep.unwrap_or(Value::Null))
        })
        .collect()
}
