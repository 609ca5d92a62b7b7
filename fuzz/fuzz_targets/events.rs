//! `POST /v1/events` bodies: one event, an array, or NDJSON (the first
//! byte chooses), through the validating parse. Any input must give events
//! or an error, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_dataflow::event::{parse_batch, EventLimits};

fuzz_target!(|data: &[u8]| {
    let Some((&mode, body)) = data.split_first() else {
        return;
    };
    let received_at = 1_780_000_000_000;
    let _ = parse_batch(body, mode & 1 == 1, received_at, 300_000, &EventLimits::default());
});
