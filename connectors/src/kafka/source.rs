//! A worker's partitions of the events topic, as a timely source.
//!
//! The consumer is assigned its partitions by hand and positioned at the
//! offsets tally's own checkpoint names; nothing is committed to the broker
//! and no consumer group decides who reads what. librdkafka fetches on its
//! own threads into a bounded queue; [`KafkaSource::poll`] only takes what is
//! queued, without blocking, and the queue wakes the source operator when it
//! goes from empty to non-empty. While the dataflow is stalled the queue
//! fills, librdkafka stops fetching, and the backlog stays in Kafka.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as ClientError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use rdkafka::{Offset, TopicPartitionList};
use tally_dataflow::config::KafkaConfig;
use tally_dataflow::event::record;
use tally_dataflow::ports::{BatchSource, Poll, SourceBatch, Waker, POLL_RECORDS};
use tally_dataflow::time::Millis;
use tracing::warn;

use super::producer::records;
use super::{client_config, consumer_config, KafkaError};

/// Messages taken per poll, so one activation stays short.
const MESSAGES_PER_POLL: usize = 256;
/// Errors from the consumer are logged at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// One worker's partitions of the events topic.
pub struct KafkaSource {
    consumer: BaseConsumer,
    /// Sends watermark marks: fire and forget, as a lost one is asked
    /// again, and not idempotent, as a repeated one changes nothing.
    marks: ThreadedProducer<DefaultProducerContext>,
    topic: String,
    partitions: Vec<u32>,
    starts: Vec<(u32, u64)>,
    waker: Option<Waker>,
    last_warning: Option<Instant>,
}

impl KafkaSource {
    /// A source over `partitions` of the events topic, each read from its
    /// offset in `starts` (a partition not named there is read from its
    /// first offset).
    pub fn new(
        config: &KafkaConfig,
        partitions: Vec<u32>,
        starts: &[(u32, u64)],
    ) -> Result<KafkaSource, KafkaError> {
        let consumer = consumer_config(&config.brokers).create()?;
        let marks = client_config(&config.brokers)
            .set("enable.idempotence", "false")
            .set("acks", "all")
            .set("message.timeout.ms", "10000")
            .create()?;
        Ok(KafkaSource {
            consumer,
            marks,
            topic: config.topic.clone(),
            partitions,
            starts: starts.to_vec(),
            waker: None,
            last_warning: None,
        })
    }

    fn assign(&self) -> Result<(), ClientError> {
        let mut list = TopicPartitionList::new();
        for &partition in &self.partitions {
            let offset = self
                .starts
                .iter()
                .find(|(p, _)| *p == partition)
                .map_or(Offset::Beginning, |&(_, o)| Offset::Offset(o as i64));
            list.add_partition_offset(&self.topic, partition as i32, offset)?;
        }
        self.consumer.assign(&list)
    }

    fn warn(&mut self, error: &ClientError) {
        if self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
            warn!(%error, topic = %self.topic, "cannot read from Kafka; librdkafka keeps retrying");
            self.last_warning = Some(Instant::now());
        }
    }
}

impl BatchSource for KafkaSource {
    fn partitions(&self) -> Vec<u32> {
        self.partitions.clone()
    }

    fn start(&mut self, waker: Waker) {
        let wake = waker.clone();
        self.consumer.set_nonempty_callback(move || wake());
        self.waker = Some(waker);
        if let Err(e) = self.assign() {
            // Assignment is local to the client; it fails only on a bad
            // configuration, which start-up has already checked.
            panic!("cannot assign Kafka partitions {:?}: {e}", self.partitions);
        }
    }

    fn poll(&mut self) -> Poll {
        let mut batches = Vec::new();
        let mut taken = 0;
        while batches.len() < MESSAGES_PER_POLL && taken < POLL_RECORDS {
            match self.consumer.poll(Duration::ZERO) {
                None => break,
                Some(Ok(message)) => {
                    let offset = message.offset() as u64;
                    let message_records = records(message.payload().unwrap_or_default());
                    taken += message_records.len();
                    batches.push(SourceBatch {
                        partition: message.partition() as u32,
                        offset,
                        next_offset: offset + 1,
                        records: message_records,
                        // The producer's create time, which librdkafka sets
                        // when the gateway produces the request.
                        appended_at: message.timestamp().to_millis(),
                    });
                }
                Some(Err(ClientError::MessageConsumption(RDKafkaErrorCode::AutoOffsetReset))) => {
                    // The checkpoint names offsets the topic no longer
                    // holds: retention deleted them, or the topic was made
                    // anew. Going on would skip or misplace events.
                    panic!(
                        "partitions {:?} of topic '{}' do not hold the offsets the checkpoint names {:?}; \
                         the topic was recreated or its retention deleted unread events. \
                         Restore a matching topic, or remove the checkpoints to start over",
                        self.partitions, self.topic, self.starts
                    );
                }
                Some(Err(e)) => {
                    self.warn(&e);
                    break;
                }
            }
        }
        if batches.is_empty() {
            return Poll::Pending;
        }
        if batches.len() == MESSAGES_PER_POLL || taken >= POLL_RECORDS {
            // More may be queued, and the queue only calls when it was empty.
            if let Some(waker) = &self.waker {
                waker();
            }
            return Poll::Behind(batches);
        }
        Poll::Ready(batches)
    }

    fn mark(&mut self, partition: u32, watermark: Millis) {
        let mut mark = Vec::new();
        record::push_to_batch(&mut mark, &record::mark(watermark));
        let record = BaseRecord::<(), [u8]>::to(&self.topic)
            .partition(partition as i32)
            .payload(&mark[..]);
        if let Err((error, _)) = self.marks.send(record) {
            self.warn(&error);
        }
    }
}
