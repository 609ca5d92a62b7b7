//! `GET /v1/metrics` query strings: read strictly, then planned against the
//! repository's metrics.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use tally_dataflow::config::Config;
use tally_dataflow::query::Query;
use tally_gateway::history::parse_params;

/// The repository's configuration, read once.
static CONFIG: LazyLock<Config> = LazyLock::new(|| {
    Config::load(Some(include_str!("../../cluster.toml")), []).expect("cluster.toml")
});

fuzz_target!(|data: &[u8]| {
    let Ok(raw) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(params) = parse_params(raw) {
        let _ = Query::parse(&params, &CONFIG.metrics, &CONFIG.history, 1_780_000_000_000);
    }
});
