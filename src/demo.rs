//! `--demo`: a synthetic clickstream, so a new user sees numbers move at once.
//!
//! About 200 events a second: ad clicks across 12 campaigns, 7 countries and
//! 3 device types by a pool of users, each with the latency of serving its
//! ad and the creative shown, and some purchases with an amount. Latencies
//! are long-tailed, slower on mobile. Creatives follow a Zipf law, and
//! another goes viral each minute, so the top list has newcomers. A
//! few events are out of order (up to 3 s old), a few are late but within
//! the allowed lateness (10 to 25 s old, so windows get revisions), and a
//! very few are too late (1 to 2 minutes old, so they go to the dead letters).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use tally_dataflow::dedupe::IdKey;
use tally_dataflow::event::{Accepted, Event};
use tally_dataflow::time::now_ms;
use tally_gateway::backend::EventSink;

const CAMPAIGNS: usize = 12;
const COUNTRIES: [&str; 7] = ["US", "GB", "DE", "FR", "IN", "BR", "JP"];
const DEVICES: [&str; 3] = ["MOBILE", "DESKTOP", "TABLET"];
const USERS: u32 = 5_000;
const CREATIVES: u64 = 400;
/// Events per tick, ten ticks a second.
const PER_TICK: usize = 20;

/// Appends synthetic events until the task is aborted.
pub async fn feed(sink: Arc<dyn EventSink>) {
    let mut rng = fastrand::Rng::new();
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    // Ids unique to this run: a restarted feed must not repeat the last one's.
    let run = rng.u64(..);
    let mut serial: u64 = 0;
    loop {
        tick.tick().await;
        let now = now_ms();
        let records: Vec<Accepted> = (0..PER_TICK)
            .map(|_| {
                serial += 1;
                let id = format!("demo_{run:x}_{serial}");
                Accepted {
                    id: Some(IdKey::of(&id)),
                    record: event(&mut rng, now, id).to_record(),
                }
            })
            .collect();
        if let Err(e) = sink.append(records).await {
            tracing::warn!(error = %e, "the demo feed cannot append");
        }
    }
}

fn event(rng: &mut fastrand::Rng, now: i64, id: String) -> Event {
    // Skewed choices, so some campaigns and countries lead.
    let campaign = 1000 + (rng.usize(..CAMPAIGNS) * rng.usize(..CAMPAIGNS)) / CAMPAIGNS;
    let country = COUNTRIES[rng
        .usize(..COUNTRIES.len())
        .min(rng.usize(..COUNTRIES.len()))];
    let device = DEVICES[rng.usize(..DEVICES.len())];
    let user = rng.u32(..USERS);
    let lateness = match rng.u32(..1000) {
        0..=1 => rng.i64(60_000..120_000),
        2..=11 => rng.i64(10_000..25_000),
        12..=61 => rng.i64(0..3_000),
        _ => 0,
    };
    let purchase = rng.u32(..100) < 4;
    let mut values = BTreeMap::new();
    if purchase {
        values.insert("amount".to_string(), (rng.u32(500..20_000) as f64) / 100.0);
    } else {
        values.insert("latency_ms".to_string(), latency(rng, device));
    }
    Event {
        event_id: Some(id),
        event_type: if purchase { "purchase" } else { "ad_click" }.to_string(),
        timestamp: now - lateness,
        dimensions: [
            ("campaignId", format!("camp_{campaign}")),
            ("country", country.to_string()),
            ("deviceType", device.to_string()),
            ("userId", format!("usr_{user:05}")),
            ("creativeId", creative(rng, now)),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect(),
        values,
    }
}

/// A long-tailed latency in milliseconds: log-normal around 40 ms, twice
/// that on mobile, with a rare slow request.
fn latency(rng: &mut fastrand::Rng, device: &str) -> f64 {
    // A standard normal from two uniforms (Box-Muller).
    let normal = (-2.0 * (1.0 - rng.f64()).ln()).sqrt() * (std::f64::consts::TAU * rng.f64()).cos();
    let base = if device == "MOBILE" { 80.0 } else { 40.0 };
    let slow = if rng.u32(..100) == 0 { 10.0 } else { 1.0 };
    (base * slow * (0.5 * normal).exp() * 10.0).round() / 10.0
}

/// A creative: most from a Zipf law (exponent about 1) over
/// [`CREATIVES`], and 4% from the one that goes viral for the current
/// minute of `now`, which enters the top list and leaves it a minute later.
fn creative(rng: &mut fastrand::Rng, now: i64) -> String {
    let id = if rng.u32(..100) < 4 {
        (now / 60_000) as u64 * 37 % CREATIVES
    } else {
        // Inverse transform of a continuous 1/x law over [1, CREATIVES + 1).
        ((CREATIVES + 1) as f64).powf(rng.f64()) as u64 - 1
    };
    format!("cr_{id:03}")
}
