//! The dead-letter topic: every dead letter, also written to `<topic>-dlq`,
//! so users can follow late events with their own Kafka tools.
//!
//! The result store stays the record: a dead letter is produced to the topic
//! only once the store's sink has taken it, and a replay after a restart may
//! produce it again (the store keys it by its place in the log, so there it
//! is never doubled). Producing never blocks the worker: a full producer
//! queue drops the copy, with a warning.

use std::time::{Duration, Instant};

use rdkafka::error::{KafkaError as ClientError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DefaultProducerContext, ThreadedProducer};
use serde_json::json;
use tally_dataflow::config::KafkaConfig;
use tally_dataflow::model::DeadLetter;
use tally_dataflow::ports::Sink;
use tally_dataflow::time::format_rfc3339;
use tracing::warn;

use super::{client_config, KafkaError};

/// Dropped copies are reported at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// A dead-letter sink that also produces what `inner` takes to the topic.
pub struct DeadLetterTopic<S> {
    inner: S,
    producer: ThreadedProducer<DefaultProducerContext>,
    topic: String,
    last_warning: Option<Instant>,
}

impl<S> DeadLetterTopic<S> {
    /// Wraps `inner`, producing to `config`'s dead-letter topic.
    pub fn new(config: &KafkaConfig, inner: S) -> Result<DeadLetterTopic<S>, KafkaError> {
        let producer = client_config(&config.brokers)
            .set("compression.type", "lz4")
            .set("linger.ms", "50")
            .create()?;
        Ok(DeadLetterTopic {
            inner,
            producer,
            topic: config.dead_letter_topic(),
            last_warning: None,
        })
    }

    fn produce(&mut self, letter: &DeadLetter) {
        let key = format!("{}:{}:{}", letter.partition, letter.offset, letter.index);
        let payload = json!({
            "partition": letter.partition,
            "offset": letter.offset,
            "index": letter.index,
            "reason": letter.reason,
            "watermark": format_rfc3339(letter.watermark),
            "event": serde_json::from_slice::<serde_json::Value>(&letter.record)
                .unwrap_or(serde_json::Value::Null),
        })
        .to_string();
        let record = BaseRecord::to(&self.topic).key(&key).payload(&payload);
        if let Err((e, _)) = self.producer.send(record) {
            if self.last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                let full = matches!(
                    e,
                    ClientError::MessageProduction(RDKafkaErrorCode::QueueFull)
                );
                warn!(error = %e, full, topic = %self.topic, "a dead letter was not copied to the dead-letter topic; the result store has it");
                self.last_warning = Some(Instant::now());
            }
        }
    }
}

impl<S: Sink<DeadLetter>> Sink<DeadLetter> for DeadLetterTopic<S> {
    fn offer(&mut self, items: &mut Vec<DeadLetter>) {
        let offered = items.clone();
        self.inner.offer(items);
        let taken = offered.len() - items.len();
        for letter in &offered[..taken] {
            self.produce(letter);
        }
    }

    fn advance(&mut self, frontier: u64) -> bool {
        self.inner.advance(frontier)
    }
}
