//! tally's benchmarks. Each prints its figure beside a baseline measured in
//! the same run, so a noisy machine still gives a fair ratio.
//!
//! ```text
//! cargo bench --bench tally                 # all of them
//! cargo bench --bench tally -- ingest       # (a) HTTP ingest vs raw serde_json parsing
//! cargo bench --bench tally -- dataflow     # (b) the timely job vs a hand-written HashMap loop
//! cargo bench --bench tally -- freshness    # (c) POST to WebSocket frame, p50 and p99; tally run, and the cluster with scripts/services.sh
//! cargo bench --bench tally -- history      # (d) GET /v1/metrics over a day vs SQLite's own sum
//! cargo bench --bench tally -- recovery     # (e) checkpoint cost at 100k events/s; restart with 60 s of backlog
//! cargo bench --bench tally -- fanout       # (f) WebSocket clients on one server: delay, memory, CPU, stalled clients
//! cargo bench --bench tally -- gateways     # (f) 50,000 WebSocket clients on three cluster gateways fed by Redis (needs scripts/services.sh)
//! cargo bench --bench tally -- cluster      # (g) cluster mode vs tally run: ingest and end to end (needs scripts/services.sh)
//! cargo bench --bench tally -- memory       # (h) resident memory before, at the peak of and after a burst of 200k new groups
//! cargo bench --bench tally -- backfill     # (i) a changed metric's backfill rate, and live freshness during it vs without
//! ```

mod backfill;
mod cluster;
mod dataflow;
mod fanout;
mod freshness;
mod gateways;
mod history;
mod ingest;
mod memory;
mod recovery;
mod support;

// The allocator of the `tally` binary, so the figures are its figures.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    // The benchmark's own client and writer processes.
    if let Ok(role) = std::env::var(gateways::SHARD) {
        gateways::shard(&role);
        return;
    }
    let wanted: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let run = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    if run("ingest") {
        ingest::run();
    }
    if run("dataflow") {
        dataflow::run();
    }
    if run("freshness") {
        freshness::run();
    }
    if run("history") {
        history::run();
    }
    if run("recovery") {
        recovery::run();
    }
    if run("fanout") {
        fanout::run();
    }
    if run("gateways") {
        gateways::run();
    }
    if run("cluster") {
        cluster::run();
    }
    if run("memory") {
        memory::run();
    }
    if run("backfill") {
        backfill::run();
    }
}
