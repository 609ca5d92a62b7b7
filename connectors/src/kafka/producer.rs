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
//!
//! **Brokers lost.** When librdkafka reports every broker down and a
//! metadata request confirms it (within 2 s), the producer is taken out of
//! service: what it still holds is purged, so the requests waiting on it
//! get their `503` now rather than at the message timeout, and appends are refused, without waiting, until a
//! metadata request to the brokers succeeds again ([`KafkaProducer::watch`]).
//! Then a new producer takes over, with a producer id of its own. The old
//! one is never used again: an idempotent producer whose messages were
//! purged or timed out moves to a new epoch on its own, without telling the
//! brokers, and its next message after their return can be refused as out
//! of sequence, or, by some brokers, not answered at all.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use futures_util::future::try_join_all;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError as ClientError, RDKafkaErrorCode};
use rdkafka::producer::{FutureProducer, FutureRecord, Producer, PurgeConfig};
use tally_dataflow::config::KafkaConfig;
use tally_dataflow::event::{record, spread, Accepted};
use tracing::{info, warn};

use super::{client_config, KafkaError};

/// The largest payload put in one message. Brokers refuse messages over
/// 1 MB by default; a larger request is split between records.
const MAX_MESSAGE_BYTES: usize = 900 * 1024;
/// How long a message may wait for room in the producer's queue.
const QUEUE_TIMEOUT: Duration = Duration::from_secs(5);
/// How often [`KafkaProducer::watch`] looks at the brokers.
const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How long the metadata request that says the brokers are back may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long after a producer is taken out of service a message a request
/// gave it just before is purged too.
const LAST_PURGE_AFTER: Duration = Duration::from_secs(1);

/// An idempotent producer to one topic.
pub struct KafkaProducer {
    config: ClientConfig,
    /// The producer in service.
    current: RwLock<Generation>,
    /// Whether the brokers are reachable: appends are refused while not.
    reachable: AtomicBool,
    topic: String,
    /// The events topic's partitions, once known; 0 before.
    partitions: AtomicU32,
    /// Picks the partition of a request's events without an id, in turn.
    next: AtomicU64,
}

/// A producer, and whether librdkafka has said that its brokers are lost.
#[derive(Clone)]
struct Generation {
    producer: FutureProducer<Watch>,
    lost: Arc<AtomicBool>,
}

/// A producer's context: notes librdkafka's word that every broker is down.
struct Watch {
    lost: Arc<AtomicBool>,
}

impl ClientContext for Watch {
    fn error(&self, error: ClientError, reason: &str) {
        if error.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            self.lost.store(true, Ordering::Relaxed);
        }
        warn!("librdkafka: {error}: {reason}");
    }
}

impl KafkaProducer {
    /// A producer to the events topic of `config`.
    pub fn new(config: &KafkaConfig) -> Result<KafkaProducer, KafkaError> {
        let mut client = client_config(&config.brokers);
        client
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", "lz4")
            .set("linger.ms", "2")
            .set("message.timeout.ms", "30000");
        let current = RwLock::new(create(&client)?);
        Ok(KafkaProducer {
            config: client,
            current,
            reachable: AtomicBool::new(true),
            topic: config.topic.clone(),
            partitions: AtomicU32::new(0),
            next: AtomicU64::new(0),
        })
    }

    /// Says how many partitions the events topic has; appends wait for it.
    pub fn set_partitions(&self, partitions: u32) {
        self.partitions.store(partitions, Ordering::Relaxed);
    }

    /// Whether appends are taken: the brokers are not known to be away.
    pub fn is_available(&self) -> bool {
        self.reachable.load(Ordering::Relaxed)
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
        let available = self.is_available();
        let producer = self.current().producer;
        let topic = self.topic.clone();
        async move {
            if partitions == 0 {
                // Not yet known: the gateway is not ready, and says so.
                return Err(KafkaError::Unavailable(ClientError::MetadataFetch(
                    RDKafkaErrorCode::UnknownTopicOrPartition,
                )));
            }
            if !available {
                return Err(KafkaError::Unavailable(ClientError::MessageProduction(
                    RDKafkaErrorCode::AllBrokersDown,
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

    /// Takes the producer out of service when its brokers are lost, and
    /// puts a new one in once they answer again (see the module's
    /// documentation). Runs for as long as the gateway does.
    pub async fn watch(self: Arc<Self>) {
        let mut lost = self.current().lost;
        loop {
            tokio::time::sleep(WATCH_EVERY).await;
            if self.is_available() {
                // librdkafka says so too when a broker merely closed an idle
                // connection: the brokers are asked before anything is done.
                if !lost.swap(false, Ordering::Relaxed) || self.answers().await {
                    continue;
                }
                warn!("every Kafka broker is down; refusing events until one answers");
                self.reachable.store(false, Ordering::Relaxed);
                match self.replace() {
                    Ok(flag) => lost = flag,
                    Err(e) => warn!(error = %e, "cannot make a new Kafka producer; retrying"),
                }
                continue;
            }
            if self.answers().await {
                lost.store(false, Ordering::Relaxed);
                self.reachable.store(true, Ordering::Relaxed);
                info!("Kafka answers again; taking events");
            }
        }
    }

    /// Puts a new producer in service and purges the old one's messages,
    /// so that the requests waiting on them are answered now. Returns the
    /// new producer's lost flag.
    fn replace(&self) -> Result<Arc<AtomicBool>, KafkaError> {
        let fresh = create(&self.config)?;
        let lost = Arc::clone(&fresh.lost);
        let old = std::mem::replace(&mut *self.current.write().expect("not poisoned"), fresh);
        let old = old.producer;
        let purge = PurgeConfig::default().queue().inflight();
        old.purge(purge);
        // A request that took the old producer just before the swap may
        // still give it a message: purge once more, then let it go.
        tokio::task::spawn_blocking(move || {
            std::thread::sleep(LAST_PURGE_AFTER);
            old.purge(purge);
        });
        Ok(lost)
    }

    /// The producer in service.
    fn current(&self) -> Generation {
        self.current.read().expect("not poisoned").clone()
    }

    /// Whether the brokers answer a metadata request for the topic, asked
    /// on the blocking pool.
    async fn answers(self: &Arc<Self>) -> bool {
        let probe = Arc::clone(self);
        tokio::task::spawn_blocking(move || probe.probe())
            .await
            .unwrap_or(false)
    }

    /// Whether the brokers answer a metadata request for the topic.
    fn probe(&self) -> bool {
        self.current()
            .producer
            .client()
            .fetch_metadata(Some(&self.topic), PROBE_TIMEOUT)
            .is_ok()
    }
}

/// A producer of `config`.
fn create(config: &ClientConfig) -> Result<Generation, KafkaError> {
    let lost = Arc::new(AtomicBool::new(false));
    let producer = config.create_with_context(Watch {
        lost: Arc::clone(&lost),
    })?;
    Ok(Generation { producer, lost })
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
