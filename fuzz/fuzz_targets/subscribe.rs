//! A WebSocket client's messages: the JSON request and its topic, checked
//! against the repository's metrics.
#![no_main]

use std::sync::{Arc, LazyLock};

use libfuzzer_sys::fuzz_target;
use tally_dataflow::config::{Config, MetricSpec};
use tally_gateway::live::read_message;

/// The repository's metrics, read once.
static METRICS: LazyLock<Arc<Vec<MetricSpec>>> = LazyLock::new(|| {
    let config = Config::load(Some(include_str!("../../cluster.toml")), []).expect("cluster.toml");
    Arc::new(config.metrics)
});

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = read_message(text, &METRICS);
});
