//! The gateway's producer: one request in, acknowledged messages out.
//!
//! The producer is idempotent with `acks=all`, so a message is written once
//! and in order even when librdkafka retries, and an acknowledgement means
//! every in-sync replica has it. Messages are lz4-compressed. The gateway
//! answers `202` only once every message of the request is acknowledged.
//!
//! An event with an `eventId` goes to the partition its id picks, so that
//! its repeats meet in one partition ([`tally_dataflow::dedupe`]); the
//! others of a request go together to one partition, in turn.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures_util::future::try_join_all;
use rdkafka::error::{KafkaError as ClientError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord};
use tally_dataflow::config::KafkaConfig;
use tally_dataflow::event::{record, spread, Accepted};

use super::{client_config, KafkaError};

/// The largest payload put in one message. Brokers refuse messages over
/// 1 MB by default; a larger request is split between records.
const MAX_MESSAGE_BYTES: usize = 900 * 1024;
/// How long a message may wait for room in the producer's queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);

/// An idempotent producer to one topic.
pub struct KafkaProducer {
    producer: FutureProducer,
    topic: String,
    /// The events topic's partitions, once known; 0 before.
    partitions: AtomicU32,
    /// Picks the partition of a request's events without an id, in turn.
    next: AtomicU64,
}

impl KafkaProducer {
    /// A producer to the events topic of `config`.
    pub fn new(config: &KafkaConfig) -> Result<KafkaProducer, KafkaError> {
        let producer = client_config(&config.brokers)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000")
            .create()?;
        Ok(KafkaProducer {
            producer,
            topic: config.topic.clone(),
            partitions: AtomicU32::new(0),
            next: AtomicU64::new(0),
        })
    }

    /// Says how many partitions the events topic has; appends wait for it.
    pub fn set_partitions(&self, partitions: u32) {
        self.partitions.store(partitions, Ordering::Relaxed);
    }

    /// Appends one request's events; resolves once the brokers have
    /// acknowledged all of them. Each partition's records go
    /// in as few messages as fit, in order. On an error some of the
    /// messages may be in the topic; [`KafkaError::is_retryable`] says
    /// whether to try again.
    pub fn append(
        &self,
        events: Vec<Accepted>,
    ) -> impl std::future::Future<Output = Result<(), KafkaError>> + Send + 'static {
        let partitions = self.partitions.load(Ordering::Relaxed);
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let (producer, topic) = (self.producer.clone(), self.topic.clone());
        async move {
            if partitions == 0 {
                // Not yet known: the gateway is not ready, and says so.
                return Err(KafkaError::Unavailable(ClientError::MetadataFetch(
                    RDKafkaErrorCode::UnknownTopicOrPartition,
                )));
            }
            let fallback = (turn % u64::from(partitions)) as u32;
            let payloads: Vec<(u32, Vec<u8>)> = spread(events, partitions, fallback)
                .into_iter()
                .flat_map(|(partition, records)| {
                    messages(&records).into_iter().map(move |m| (partition, m))
                })
                .collect();
            let sends = payloads.iter().map(|(partition, payload)| {
                producer.send::<(), _, _>(
                    FutureRecord::to(&topic)
                        .partition(*partition as i32)
                        .payload(payload.as_slice()),
                    QUEUE_TIMEOUT,
                )
            });
            try_join_all(sends)
                .await
                .map_err(|(e, _)| KafkaError::from(e))?;
            Ok(())
        }
    }
}

/// Packs records into batches ([`record::push_to_batch`]) of at most
/// [`MAX_MESSAGE_BYTES`] (a single larger record gets a message of its own).
fn messages(records: &[Vec<u8>]) -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut current: Vec<u8> = Vec::new();
    for r in records {
        if !current.is_empty() && current.len() + record::batch_len(1, r.len()) > MAX_MESSAGE_BYTES
        {
            out.push(std::mem::take(&mut current));
        }
        record::push_to_batch(&mut current, r);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The records of a message: a batch, or, in a topic written before the
/// batch format, the events' JSON one per line.
pub fn records(payload: &[u8]) -> Vec<Vec<u8>> {
    match record::unbatch(payload) {
        Some(records) => records.into_iter().map(<[u8]>::to_vec).collect(),
        None => payload
            .split(|&b| b == b'\n')
            .filter(|line| !line.is_empty())
            .map(<[u8]>::to_vec)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_split_into_messages_that_read_back_whole() {
        let small: Vec<Vec<u8>> = (0..3)
            .map(|i| format!("{{\"n\":{i}}}").into_bytes())
            .collect();
        let packed = messages(&small);
        assert_eq!(packed.len(), 1);
        assert_eq!(records(&packed[0]), small);

        let big: Vec<Vec<u8>> = (0..5).map(|_| vec![b'x'; 400 * 1024]).collect();
        let packed = messages(&big);
        assert_eq!(packed.len(), 3);
        assert!(packed.iter().all(|m| m.len() <= MAX_MESSAGE_BYTES));
        let back: Vec<Vec<u8>> = packed.iter().flat_map(|m| records(m)).collect();
        assert_eq!(back, big);
    }

    #[test]
    fn a_topic_written_as_ndjson_is_read_by_line() {
        let ndjson =
            b"{\"eventType\":\"a\",\"timestamp\":1}\n{\"eventType\":\"b\",\"timestamp\":2}";
        let back = records(ndjson);
        assert_eq!(back.len(), 2);
        assert_eq!(back[1], b"{\"eventType\":\"b\",\"timestamp\":2}");
    }
}
