//! Kafka: the cluster's event log.
//!
//! The events topic holds one message per accepted request and partition,
//! or per part of a large request: a batch of the events' log records
//! ([`tally_dataflow::event::record`], documented in the README so that
//! any Kafka client can read the topic). A message is what the
//! embedded log calls a record batch: the dataflow stamps it with one
//! watermark, so results depend only on the topic's content, never on how
//! a consumer's fetches happened to split it.
//!
//! - [`producer`]: the gateway's idempotent producer.
//! - [`source`]: a worker's partitions, read without blocking the worker.
//! - [`dead_letters`]: copies dead letters to the dead-letter topic.
//! - [`read_topic`]: the topic's messages up to its end, for `tally log dump`.
//! - [`ensure_topics`]: creates the events topic and its dead-letter topic.
//! - [`TopicEnds`]: where the events topic ends now, for a backfill.
//! - [`KafkaError`]: what these return, and whether a retry can help.

pub mod dead_letters;
mod dump;
mod error;
pub mod producer;
pub mod source;

pub use dump::read_topic;
pub use error::KafkaError;

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError as ClientError;
use rdkafka::types::RDKafkaErrorCode;
use tally_dataflow::config::KafkaConfig;
use tracing::info;

use crate::retry;

/// How long one metadata or admin request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// A client configuration for `brokers`.
fn client_config(brokers: &str) -> ClientConfig {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", brokers)
        .set("client.id", "tally")
        // librdkafka's own logs go through its default logger at warning level.
        .set("log_level", "4");
    config
}

/// A consumer configuration for `brokers`: partitions are assigned by
/// hand and offsets are kept by tally, never committed to the brokers. An
/// offset the partition does not hold is an error (`auto.offset.reset`), not
/// a silent jump to its end.
pub(crate) fn consumer_config(brokers: &str) -> ClientConfig {
    let mut config = client_config(brokers);
    config
        .set("group.id", "tally-workers")
        .set("auto.offset.reset", "error")
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("enable.partition.eof", "false")
        .set("fetch.wait.max.ms", "50")
        // Bounds what a stalled consumer holds in memory.
        .set("queued.max.messages.kbytes", "16384");
    config
}

/// Creates the events topic (with `config.partitions` partitions) and its
/// dead-letter topic if they are missing, waiting out brokers that are down,
/// and returns the events topic's partition count.
pub async fn ensure_topics(config: &KafkaConfig) -> u32 {
    retry::until_ok("create the Kafka topics", || create_topics(config)).await;
    let consumer: BaseConsumer = retry::blocking("connect to Kafka", || {
        client_config(&config.brokers).create::<BaseConsumer>()
    });
    let topic = config.topic.clone();
    let partitions = tokio::task::spawn_blocking(move || {
        retry::blocking("read the events topic's metadata", || {
            partition_count(&consumer, &topic)
        })
    })
    .await
    .expect("the metadata task does not panic");
    if partitions != config.partitions {
        info!(
            topic = %config.topic,
            partitions,
            configured = config.partitions,
            "the events topic exists with another partition count; using it"
        );
    }
    partitions
}

async fn create_topics(config: &KafkaConfig) -> Result<(), ClientError> {
    let admin: AdminClient<DefaultClientContext> = client_config(&config.brokers).create()?;
    let dead_letters = config.dead_letter_topic();
    let replication = || TopicReplication::Fixed(i32::from(config.replication));
    let topics = [
        NewTopic::new(&config.topic, config.partitions as i32, replication()),
        NewTopic::new(&dead_letters, config.partitions as i32, replication()),
    ];
    let options = AdminOptions::new().operation_timeout(Some(REQUEST_TIMEOUT));
    for result in admin.create_topics(&topics, &options).await? {
        match result {
            Ok(topic) => info!(%topic, partitions = config.partitions, "created topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                tracing::warn!(%topic, %code, "the broker refused to create a topic");
                return Err(ClientError::AdminOp(code));
            }
        }
    }
    Ok(())
}

/// Checks that the events topic holds every offset a checkpoint resumes
/// from (`(partition, next offset)`): each must lie between the partition's
/// oldest offset and its end. One outside means the topic was made anew or
/// its retention deleted events never read, and reading on would skip or
/// misplace events: [`KafkaError::OffsetOutOfRange`] says which. Returns
/// each partition's oldest offset, in the order of `cuts`.
pub fn check_offsets(config: &KafkaConfig, cuts: &[(u32, u64)]) -> Result<Vec<u64>, KafkaError> {
    let consumer: BaseConsumer = retry::blocking("connect to Kafka", || {
        client_config(&config.brokers).create::<BaseConsumer>()
    });
    let mut oldest = Vec::with_capacity(cuts.len());
    for &(partition, offset) in cuts {
        let (low, high) = retry::blocking("read the events topic's offsets", || {
            consumer.fetch_watermarks(&config.topic, partition as i32, REQUEST_TIMEOUT)
        });
        if (offset as i64) < low || (offset as i64) > high {
            return Err(KafkaError::OffsetOutOfRange {
                topic: config.topic.clone(),
                partition,
                offset,
                low,
                high,
            });
        }
        oldest.push(low.max(0) as u64);
    }
    Ok(oldest)
}

/// Where the events topic's partitions end: a backfill reads up to there.
pub struct TopicEnds {
    consumer: BaseConsumer,
    topic: String,
}

impl TopicEnds {
    /// A client of the brokers in `config`; it connects when first asked.
    pub fn new(config: &KafkaConfig) -> Result<TopicEnds, KafkaError> {
        Ok(TopicEnds {
            consumer: client_config(&config.brokers).create::<BaseConsumer>()?,
            topic: config.topic.clone(),
        })
    }

    /// The offset after the last record of each of the first `partitions`
    /// partitions, in partition order.
    pub fn read(&self, partitions: u32) -> Result<Vec<u64>, KafkaError> {
        (0..partitions)
            .map(|partition| {
                let (_, high) = self.consumer.fetch_watermarks(
                    &self.topic,
                    partition as i32,
                    REQUEST_TIMEOUT,
                )?;
                Ok(high.max(0) as u64)
            })
            .collect()
    }
}

/// The number of partitions of `topic`, or an error if it has none yet.
fn partition_count(consumer: &BaseConsumer, topic: &str) -> Result<u32, ClientError> {
    let metadata = consumer.fetch_metadata(Some(topic), REQUEST_TIMEOUT)?;
    match metadata.topics().first() {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().len() as u32)
        }
        Some(t) => Err(ClientError::MetadataFetch(
            t.error()
                .map_or(RDKafkaErrorCode::UnknownTopicOrPartition, Into::into),
        )),
        None => Err(ClientError::MetadataFetch(
            RDKafkaErrorCode::UnknownTopicOrPartition,
        )),
    }
}
