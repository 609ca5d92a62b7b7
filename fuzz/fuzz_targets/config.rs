//! `cluster.toml` as an operator might write it: every input gives a
//! configuration or a list of errors.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_dataflow::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = Config::load(Some(text), []);
});
