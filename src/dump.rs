//! `tally log dump`: the event log as JSON, one record per line, for the
//! embedded log of `tally run` or the cluster's Kafka topic.

use std::io::{BufWriter, ErrorKind, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};
use tally_connectors::kafka::read_topic;
use tally_connectors::log::{partitions_in, read_files};
use tally_dataflow::event::record::{self, Record};
use tally_dataflow::event::EventRef;
use tally_dataflow::time::format_rfc3339;

use crate::{load_config, toml_string};

/// Options of `tally log dump`.
#[derive(clap::Args, Debug, Clone)]
pub struct DumpArgs {
    /// Configuration file, as for `tally run`: where the log is.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The data directory of `tally run`, whose `log/` is read. Overrides
    /// `storage.data_dir`.
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Read the cluster's events topic (`[kafka]`) instead.
    #[arg(long)]
    pub kafka: bool,
    /// Only this partition.
    #[arg(long, value_name = "N")]
    pub partition: Option<u32>,
}

/// Writes every record to stdout, partition by partition, in log order:
/// `{"partition", "offset", "index", "appendedAt"}` and then `"event"` (its
/// canonical JSON), `"watermark"` (a mark, in Unix milliseconds) or
/// `"unreadable"` (why, with the record's bytes in hex).
pub fn dump(args: DumpArgs) -> anyhow::Result<()> {
    let mut overrides = Vec::new();
    if let Some(dir) = &args.data_dir {
        overrides.push(("storage.data_dir", toml_string(&dir.to_string_lossy())));
    }
    let config = load_config(args.config.as_deref(), &overrides)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut failed = Ok(());
    let mut write =
        |partition: u32, offset: u64, index: usize, appended_at: Option<i64>, bytes: &[u8]| {
            if failed.is_ok() {
                let line = line(partition, offset, index, appended_at, bytes);
                failed = writeln!(out, "{line}");
            }
        };
    if args.kafka {
        read_topic(
            &config.kafka,
            args.partition,
            &mut |partition, offset, appended_at, records| {
                for (index, bytes) in records.iter().enumerate() {
                    write(partition, offset, index, appended_at, bytes);
                }
            },
        )
        .with_context(|| format!("reading topic '{}'", config.kafka.topic))?;
    } else {
        let dir = config.storage.data_dir.join("log");
        let count = if dir.is_dir() {
            partitions_in(&dir)?
        } else {
            0
        };
        if count == 0 {
            bail!("{} holds no event log", dir.display());
        }
        let partitions = match args.partition {
            Some(p) if p >= count => bail!("{} has partitions 0 to {}", dir.display(), count - 1),
            Some(p) => vec![p],
            None => (0..count).collect(),
        };
        for partition in partitions {
            read_files(&dir, partition, &mut |batch| {
                for (i, bytes) in batch.records.iter().enumerate() {
                    let offset = batch.base_offset + i as u64;
                    write(partition, offset, 0, Some(batch.append_time_ms), bytes);
                }
            })
            .with_context(|| format!("reading partition {partition} of {}", dir.display()))?;
        }
    }
    match failed.and_then(|()| out.flush()) {
        // The reader had enough, as `head` does.
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        written => written.context("writing to stdout"),
    }
}

/// One record's line.
fn line(
    partition: u32,
    offset: u64,
    index: usize,
    appended_at: Option<i64>,
    bytes: &[u8],
) -> Value {
    let mut line = json!({
        "partition": partition,
        "offset": offset,
        "index": index,
        "appendedAt": appended_at.map(format_rfc3339),
    });
    let mut event = EventRef::default();
    let (key, value) = match record::read(bytes, &mut event) {
        Ok(Record::Event) => (
            "event",
            serde_json::to_value(event.to_owned(0)).expect("an event always serialises"),
        ),
        Ok(Record::Mark(watermark)) => ("watermark", json!(watermark)),
        Err(e) => {
            line["bytes"] = json!(bytes.iter().map(|b| format!("{b:02x}")).collect::<String>());
            ("unreadable", json!(e.to_string()))
        }
    };
    line[key] = value;
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kind_of_record_has_its_line() {
        let sent = br#"{"eventType":"a","timestamp":1780821960,"dimensions":{"k":"v"}}"#;
        let event =
            tally_dataflow::event::parse_batch(sent, false, 0, i64::MAX / 2, &Default::default())
                .unwrap()
                .remove(0)
                .record;
        assert_eq!(
            line(1, 7, 0, Some(0), &event),
            json!({"partition": 1, "offset": 7, "index": 0, "appendedAt": "1970-01-01T00:00:00Z",
                   "event": {"eventType": "a", "timestamp": 1_780_821_960_000_i64, "dimensions": {"k": "v"}}})
        );
        assert_eq!(line(1, 8, 2, None, &record::mark(5))["watermark"], 5);
        let broken = line(1, 9, 0, None, &[0xC1, 1, 0]);
        assert_eq!(broken["unreadable"], "cut short");
        assert_eq!(broken["bytes"], "c10100");
    }
}
