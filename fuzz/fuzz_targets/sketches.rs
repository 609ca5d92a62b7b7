//! Stored sketches, as a result store's `sketch` column and a checkpoint
//! hold them: any bytes are read as a sketch of the family they name, or
//! refused; never a panic. A KLL or frequent-items sketch read answers,
//! merges with itself, and writes its bytes again. (Bytes the library
//! accepts but did not write may not read back the same.)
//!
//! A HyperLogLog sketch read is not used further: on some damaged
//! registers DataSketches 0.6's own arithmetic overflows or fails an
//! assertion when it estimates or merges. tally's stores give it only the
//! sketches it wrote.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_dataflow::aggregate::Sketch;

fuzz_target!(|data: &[u8]| {
    let Ok(sketch) = Sketch::from_bytes(data) else {
        return;
    };
    if sketch.extremes().is_none() && sketch.items().is_none() {
        return;
    }
    let _ = sketch.quantile(0.99);
    let mut merged = sketch.clone();
    merged.merge(&sketch);
    let _ = Sketch::from_bytes(&merged.to_bytes());
});
