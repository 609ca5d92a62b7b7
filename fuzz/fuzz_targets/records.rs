//! Log records and Kafka message payloads, which a worker reads from a log
//! anyone with access to the topic may have written: any bytes must read
//! as an event, a mark, or a reason they cannot, never a panic; and an
//! event read writes back to a record that reads the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tally_dataflow::event::record::{self, Record};
use tally_dataflow::event::EventRef;

fuzz_target!(|data: &[u8]| {
    let records = record::unbatch(data).unwrap_or_else(|| vec![data]);
    for bytes in records {
        let _ = record::to_json(bytes);
        let mut event = EventRef::default();
        if record::read(bytes, &mut event) == Ok(Record::Event) {
            let time = event.timestamp.expect("an event read has a time");
            let again = record::encode(&event, time);
            let mut back = EventRef::default();
            assert_eq!(record::read(&again, &mut back), Ok(Record::Event));
            assert_eq!(back, event);
        }
    }
});
