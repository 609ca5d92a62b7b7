//! Reading the events topic from its oldest retained message to where it
//! ends now: for `tally log dump`.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError as ClientError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};
use tally_dataflow::config::KafkaConfig;

use super::{consumer_config, partition_count, KafkaError, REQUEST_TIMEOUT};

/// How long the dump waits for the next message before it gives up.
const STALL: Duration = Duration::from_secs(30);

/// Calls `each` with the records of every message of `partition` of the
/// events topic, or of every partition, with the message's partition,
/// offset and create time, up to each partition's end when it is called.
pub fn read_topic(
    config: &KafkaConfig,
    partition: Option<u32>,
    each: &mut dyn FnMut(u32, u64, Option<i64>, Vec<Vec<u8>>),
) -> Result<(), KafkaError> {
    let consumer: BaseConsumer = consumer_config(&config.brokers)
        .set("group.id", "tally-log-dump")
        .create()?;
    let partitions = match partition {
        Some(p) => vec![p],
        None => (0..partition_count(&consumer, &config.topic)?).collect(),
    };
    for partition in partitions {
        let (low, high) =
            consumer.fetch_watermarks(&config.topic, partition as i32, REQUEST_TIMEOUT)?;
        if low >= high {
            continue;
        }
        let mut assignment = TopicPartitionList::new();
        assignment.add_partition_offset(&config.topic, partition as i32, Offset::Offset(low))?;
        consumer.assign(&assignment)?;
        let mut last_read = Instant::now();
        let mut next = low;
        while next < high {
            match consumer.poll(Duration::from_millis(200)) {
                Some(Ok(message)) => {
                    next = message.offset() + 1;
                    last_read = Instant::now();
                    each(
                        partition,
                        message.offset() as u64,
                        message.timestamp().to_millis(),
                        super::producer::records(message.payload().unwrap_or_default()),
                    );
                }
                Some(Err(e)) => return Err(e.into()),
                None if last_read.elapsed() > STALL => {
                    return Err(KafkaError::TimedOut(ClientError::MessageConsumption(
                        RDKafkaErrorCode::OperationTimedOut,
                    )))
                }
                None => {}
            }
        }
    }
    Ok(())
}
