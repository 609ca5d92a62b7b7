//! The raw-event archive: every event of the events topic, copied into
//! ClickHouse's `raw_events` table, so users can query what was sent with
//! SQL, next to the window results.
//!
//! Each worker process archives the partitions its workers read, on a thread
//! of its own with its own consumer. After each insert, which covers a
//! contiguous range of offsets per partition, the `archived` table records
//! where each partition goes on; on start, reading resumes there. So a range
//! is inserted once, unless a failure falls between an insert and its record
//! (a crash, or a reply lost after the server wrote the rows): then the range
//! is inserted again, with the same keys, and the table's `ReplacingMergeTree`
//! folds the repeat away (read with `FINAL` for exact counts before it does).
//!
//! Retention drops whole daily partitions older than
//! `clickhouse.raw_retention`: `ALTER TABLE … DROP PARTITION`, which every
//! ClickHouse version has.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use clickhouse::{Client, Row};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use tally_dataflow::config::KafkaConfig;
use tally_dataflow::event::record::{self, Record};
use tally_dataflow::event::EventRef;
use tracing::{info, warn};

use crate::kafka::consumer_config;
use crate::kafka::producer::records;
use crate::retry;
use crate::store::clickhouse::{insert_into, io_runtime, ClickHouseStore, Error};

const DAY_MS: i64 = 86_400_000;
/// How often old partitions are looked for.
const RETENTION_EVERY: Duration = Duration::from_secs(600);

#[derive(Row, Serialize, Deserialize)]
struct RawRow {
    day: u16,
    time: u32,
    partition: u32,
    offset: u64,
    idx: u32,
    event_type: String,
    #[serde(with = "serde_bytes")]
    event: Vec<u8>,
}

#[derive(Row, Serialize, Deserialize)]
struct Archived {
    partition: u32,
    next: u64,
}

/// The archive thread of one worker process.
pub struct Archive {
    thread: JoinHandle<()>,
    stop: Arc<AtomicBool>,
}

impl Archive {
    /// Starts archiving `partitions`. With `retention`, this archive also
    /// drops expired days (one process of the cluster does).
    pub fn start(
        kafka: &KafkaConfig,
        store: ClickHouseStore,
        partitions: Vec<u32>,
        retention: bool,
    ) -> std::io::Result<Archive> {
        let stop = Arc::new(AtomicBool::new(false));
        let kafka = kafka.clone();
        let thread = {
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("archive".into())
                .spawn(move || {
                    let runtime = io_runtime();
                    archive_loop(&runtime, &kafka, &store, &partitions, retention, &stop);
                })?
        };
        Ok(Archive { thread, stop })
    }

    /// Stops after the rows read so far are inserted.
    pub fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        if self.thread.join().is_err() {
            warn!("the archive thread panicked");
        }
    }
}

fn archive_loop(
    runtime: &tokio::runtime::Runtime,
    kafka: &KafkaConfig,
    store: &ClickHouseStore,
    partitions: &[u32],
    retention: bool,
    stop: &AtomicBool,
) {
    let (client, config) = (store.client(), store.config());
    let archived: HashMap<u32, u64> = runtime
        .block_on(retry::until_ok(
            "read how far raw events are archived",
            || {
                client
                    .query("SELECT partition, max(next) AS next FROM archived GROUP BY partition")
                    .fetch_all::<Archived>()
            },
        ))
        .into_iter()
        .map(|a| (a.partition, a.next))
        .collect();
    // Events the topic no longer holds cannot be archived; the archive
    // goes on from the oldest it has.
    let consumer: BaseConsumer = retry::blocking("create the archive's Kafka consumer", || {
        consumer_config(&kafka.brokers)
            .set("auto.offset.reset", "earliest")
            .create()
    });
    let mut list = TopicPartitionList::new();
    for &p in partitions {
        let offset = archived
            .get(&p)
            .map_or(Offset::Beginning, |&o| Offset::Offset(o as i64));
        if let Err(e) = list.add_partition_offset(&kafka.topic, p as i32, offset) {
            warn!(error = %e, partition = p, "cannot assign a partition to the archive");
        }
    }
    if let Err(e) = consumer.assign(&list) {
        warn!(error = %e, "cannot assign partitions to the archive; raw events are not archived");
        return;
    }
    info!(?partitions, "archiving raw events");
    let mut rows: Vec<RawRow> = Vec::new();
    let mut since = Instant::now();
    let mut retention_due = retention.then(Instant::now);
    let mut backoff = retry::Backoff::new("read the events topic for the archive");
    while !stop.load(Ordering::Relaxed) {
        match consumer.poll(Duration::from_millis(100)) {
            Some(Ok(message)) => {
                backoff.succeeded();
                let payload = message.payload().unwrap_or_default();
                let (partition, offset) = (message.partition() as u32, message.offset() as u64);
                for (i, record) in records(payload).iter().enumerate() {
                    rows.extend(raw_row(partition, offset, i as u32, record));
                }
            }
            Some(Err(e)) => std::thread::sleep(backoff.failed(&e)),
            None => {}
        }
        if rows.len() >= config.batch_rows
            || (!rows.is_empty() && since.elapsed() >= config.batch_interval)
        {
            runtime.block_on(retry::until_ok("archive raw events in ClickHouse", || {
                insert(client, &rows, config.insert_timeout)
            }));
            rows.clear();
            since = Instant::now();
        }
        if rows.is_empty() {
            since = Instant::now();
        }
        if retention_due.is_some_and(|t| t <= Instant::now()) {
            let today = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
                / DAY_MS;
            match runtime.block_on(drop_expired(client, config.raw_retention, today)) {
                Ok(dropped) if !dropped.is_empty() => {
                    info!(?dropped, "dropped raw-event days past retention")
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, "cannot enforce raw-event retention"),
            }
            retention_due = Some(Instant::now() + RETENTION_EVERY);
        }
    }
    if !rows.is_empty() {
        runtime.block_on(retry::until_ok("archive raw events in ClickHouse", || {
            insert(client, &rows, config.insert_timeout)
        }));
    }
}

/// The row of a record: the event as canonical JSON, or as it is if it is
/// unreadable. A watermark mark is the job's note, not an event: it has none.
fn raw_row(partition: u32, offset: u64, idx: u32, record: &[u8]) -> Option<RawRow> {
    let mut event = EventRef::default();
    let (time, event_type, json) = match record::read(record, &mut event) {
        Ok(Record::Mark(_)) => return None,
        Ok(Record::Event) => (
            event.timestamp.unwrap_or(0),
            event.event_type.to_string(),
            record::event_json(record, &event).into_owned(),
        ),
        Err(_) => (0, String::new(), record.to_vec()),
    };
    let time = time.max(0);
    Some(RawRow {
        day: (time / DAY_MS) as u16,
        time: (time / 1000) as u32,
        partition,
        offset,
        idx,
        event_type,
        event: json,
    })
}

/// Inserts the rows, then records where their partitions go on.
async fn insert(client: &Client, rows: &[RawRow], timeout: Duration) -> Result<(), Error> {
    let mut insert = insert_into::<RawRow>(client, "raw_events", timeout).await?;
    for row in rows {
        insert.write(row).await?;
    }
    insert.end().await?;
    let mut next: HashMap<u32, u64> = HashMap::new();
    for row in rows {
        let n = next.entry(row.partition).or_default();
        *n = (*n).max(row.offset + 1);
    }
    let mut record = insert_into::<Archived>(client, "archived", timeout).await?;
    for (partition, next) in next {
        record.write(&Archived { partition, next }).await?;
    }
    record.end().await
}

/// Drops the daily partitions of `raw_events` that ended more than
/// `retention` before day `today` (days since the epoch); returns them.
pub async fn drop_expired(
    client: &Client,
    retention: Duration,
    today: i64,
) -> Result<Vec<String>, Error> {
    let keep_days = retention.as_secs().div_ceil(86_400) as i64;
    let oldest_kept = (today - keep_days).max(0) as u16;
    let days: Vec<String> = client
        .query(
            "SELECT DISTINCT toString(min_date) FROM system.parts
             WHERE database = currentDatabase() AND table = 'raw_events' AND active
               AND toUInt16(max_date) < ?",
        )
        .bind(oldest_kept)
        .fetch_all()
        .await?;
    for day in &days {
        client
            .query("ALTER TABLE raw_events DROP PARTITION ?")
            .bind(day.as_str())
            .execute()
            .await?;
    }
    Ok(days)
}
