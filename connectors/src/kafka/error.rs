//! [`KafkaError`]: what can go wrong with the cluster's event log.

use rdkafka::error::{KafkaError as ClientError, RDKafkaErrorCode};

/// Errors of the events topic, sorted by what a caller can do about them:
/// [`KafkaError::is_retryable`] says whether trying again may succeed.
#[derive(Debug, thiserror::Error)]
pub enum KafkaError {
    /// No broker, or no leader for the partition, can be reached just now.
    /// Nothing was written, or what was may be written again by a retry,
    /// which the idempotent producer keeps from doubling.
    #[error("Kafka is unreachable: {0}")]
    Unavailable(#[source] ClientError),
    /// The producer's queue stayed full for the whole time a message may
    /// wait for it: the brokers take messages slower than they come.
    #[error("the Kafka producer's queue is full: {0}")]
    QueueFull(#[source] ClientError),
    /// The brokers did not acknowledge a message or answer a request in
    /// time; a message may or may not be in the topic.
    #[error("Kafka did not answer in time: {0}")]
    TimedOut(#[source] ClientError),
    /// The brokers refuse a message this large; it will never be accepted.
    #[error("a message is larger than the Kafka brokers accept: {0}")]
    MessageTooLarge(#[source] ClientError),
    /// A checkpoint resumes a partition at an offset the topic does not
    /// hold: the topic was made anew, or its retention deleted events that
    /// were never read. Reading on would skip or misplace events.
    #[error(
        "the checkpoint resumes partition {partition} of topic '{topic}' at offset {offset}, \
         but the partition holds offsets {low} to {high}: the topic was made anew, or \
         its retention deleted events that were never read. Restore the topic, or \
         delete the checkpoints (and the results) to start over"
    )]
    OffsetOutOfRange {
        /// The events topic.
        topic: String,
        /// The partition.
        partition: u32,
        /// The offset the checkpoint resumes it at.
        offset: u64,
        /// The partition's oldest offset.
        low: i64,
        /// The partition's end: one past its newest offset.
        high: i64,
    },
    /// Anything else librdkafka reports: a configuration it refuses, a
    /// topic that does not exist, a request the brokers refuse.
    #[error("Kafka: {0}")]
    Client(#[source] ClientError),
}

impl KafkaError {
    /// Whether the same call may succeed later, once the brokers are back
    /// or have caught up.
    pub fn is_retryable(&self) -> bool {
        match self {
            KafkaError::Unavailable(_) | KafkaError::QueueFull(_) | KafkaError::TimedOut(_) => true,
            KafkaError::MessageTooLarge(_)
            | KafkaError::OffsetOutOfRange { .. }
            | KafkaError::Client(_) => false,
        }
    }
}

impl From<ClientError> for KafkaError {
    /// Sorts librdkafka's error by its code.
    fn from(error: ClientError) -> KafkaError {
        use RDKafkaErrorCode as Code;
        match error.rdkafka_error_code() {
            Some(Code::QueueFull) => KafkaError::QueueFull(error),
            Some(Code::MessageSizeTooLarge) => KafkaError::MessageTooLarge(error),
            Some(Code::MessageTimedOut | Code::RequestTimedOut | Code::OperationTimedOut) => {
                KafkaError::TimedOut(error)
            }
            Some(
                Code::BrokerTransportFailure
                | Code::AllBrokersDown
                | Code::Resolve
                | Code::NetworkException
                | Code::LeaderNotAvailable
                | Code::NotLeaderForPartition
                | Code::PreferredLeaderNotAvailable
                | Code::NotEnoughReplicas
                | Code::NotEnoughReplicasAfterAppend
                // Purged by the producer when its brokers were lost.
                | Code::PurgeQueue
                | Code::PurgeInflight,
            ) => KafkaError::Unavailable(error),
            _ => KafkaError::Client(error),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_sorted_by_whether_a_retry_can_help() {
        let produce = |code| KafkaError::from(ClientError::MessageProduction(code));
        assert!(matches!(
            produce(RDKafkaErrorCode::QueueFull),
            KafkaError::QueueFull(_)
        ));
        assert!(produce(RDKafkaErrorCode::QueueFull).is_retryable());
        assert!(produce(RDKafkaErrorCode::AllBrokersDown).is_retryable());
        assert!(produce(RDKafkaErrorCode::MessageTimedOut).is_retryable());
        assert!(!produce(RDKafkaErrorCode::MessageSizeTooLarge).is_retryable());
        assert!(!produce(RDKafkaErrorCode::TopicAuthorizationFailed).is_retryable());
        let out_of_range = KafkaError::OffsetOutOfRange {
            topic: "events".into(),
            partition: 3,
            offset: 10,
            low: 20,
            high: 30,
        };
        assert!(!out_of_range.is_retryable());
        assert!(out_of_range
            .to_string()
            .contains("partition 3 of topic 'events' at offset 10"));
    }
}
