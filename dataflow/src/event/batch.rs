//! Request-body framing: one event, a JSON array of events, or NDJSON, into
//! log records, all or nothing.

use super::{
    json_error, parse_event_ref, record, validate, Element, EventLimits, EventRef, FieldError,
};
use crate::dedupe::IdKey;
use crate::time::Millis;

/// An accepted event, as the log takes it.
#[derive(Clone, Debug, PartialEq)]
pub struct Accepted {
    /// Its [`record`](super::record), with its receive time if it was sent
    /// without one.
    pub record: Vec<u8>,
    /// The key of its `eventId`, which picks its partition.
    pub id: Option<IdKey>,
}

/// Why a request's events were not accepted.
#[derive(Clone, Debug, PartialEq)]
pub enum BatchError {
    /// The body is not JSON (or NDJSON) at all.
    Malformed(String),
    /// The body held no events.
    Empty,
    /// Some events are invalid: `(index, problems)` for each of them.
    Invalid(Vec<(usize, Vec<FieldError>)>),
}

/// An event read from a body.
type Parsed<'a> = Result<EventRef<'a>, Vec<FieldError>>;

/// The error of a body that is not JSON.
fn malformed(e: sonic_rs::Error) -> BatchError {
    BatchError::Malformed(json_error(&e))
}

/// Splits a request's events by the partition, of `partitions`, each goes
/// to: one with an id to its id's, the others together to `fallback`. Each
/// partition's records keep the request's order.
pub fn spread(events: Vec<Accepted>, partitions: u32, fallback: u32) -> Vec<(u32, Vec<Vec<u8>>)> {
    let mut by_partition: Vec<(u32, Vec<Vec<u8>>)> = Vec::new();
    for event in events {
        let partition = event.id.map_or(fallback, |id| id.partition(partitions));
        match by_partition.iter_mut().find(|(p, _)| *p == partition) {
            Some((_, records)) => records.push(event.record),
            None => by_partition.push((partition, vec![event.record])),
        }
    }
    by_partition
}

/// Parses a request body (one event, a JSON array of events, or, when
/// `ndjson` is set, one event per line) into log records, one per event,
/// each with the key of its id.
///
/// The batch is all or nothing: any invalid event fails it, and every invalid
/// event is reported. An event without a `timestamp` is recorded at
/// `received_at`.
///
/// An event whose timestamp is more than `max_future` past `received_at`
/// is invalid, and so is one past any of `limits`.
pub fn parse_batch(
    body: &[u8],
    ndjson: bool,
    received_at: Millis,
    max_future: Millis,
    limits: &EventLimits,
) -> Result<Vec<Accepted>, BatchError> {
    let events: Vec<Parsed<'_>> = if ndjson {
        body.split(|&b| b == b'\n')
            .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
            .map(parse_event_ref)
            .collect()
    } else {
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            None => return Err(BatchError::Empty),
            // Each element is read once, in place, and an element that is
            // not an event does not stop the others from being read.
            Some(b'[') => sonic_rs::from_slice::<Vec<Element<'_>>>(body)
                .map_err(malformed)?
                .into_iter()
                .map(validate)
                .collect(),
            Some(_) => {
                let element = sonic_rs::from_slice::<Element<'_>>(body).map_err(malformed)?;
                vec![validate(element)]
            }
        }
    };
    if events.is_empty() {
        return Err(BatchError::Empty);
    }
    let mut records = Vec::with_capacity(events.len());
    let mut invalid = Vec::new();
    for (index, parsed) in events.into_iter().enumerate() {
        let parsed = parsed.and_then(|event| {
            let errors = limits.check(&event);
            if errors.is_empty() {
                Ok(event)
            } else {
                Err(errors)
            }
        });
        match parsed {
            Ok(EventRef {
                timestamp: Some(t), ..
            }) if t > received_at + max_future => invalid.push((
                index,
                vec![FieldError::new(
                    "timestamp",
                    format!(
                        "is {} s after the time it was received; at most {} s is allowed",
                        (t - received_at) / 1000,
                        max_future / 1000
                    ),
                )],
            )),
            Ok(event) => records.push(Accepted {
                id: event.event_id.as_deref().map(IdKey::of),
                record: record::encode(&event, event.timestamp.unwrap_or(received_at)),
            }),
            Err(errors) => invalid.push((index, errors)),
        }
    }
    if !invalid.is_empty() {
        return Err(BatchError::Invalid(invalid));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::{parse_event, SEED};

    #[test]
    fn a_request_is_spread_by_id_and_keeps_its_order() {
        let event = |id: Option<&str>, n: u8| Accepted {
            record: vec![n],
            id: id.map(IdKey::of),
        };
        let to = |id: &str| IdKey::of(id).partition(8);
        let (a, b) = (
            "a",
            (0..)
                .map(|i| format!("b{i}"))
                .find(|b| to(b) != to("a"))
                .unwrap(),
        );
        let spread = spread(
            vec![
                event(Some(a), 0),
                event(None, 1),
                event(Some(&b), 2),
                event(Some(a), 3),
                event(None, 4),
            ],
            8,
            to(&b),
        );
        assert_eq!(
            spread,
            [
                (to(a), vec![vec![0], vec![3]]),
                (to(&b), vec![vec![1], vec![2], vec![4]])
            ]
        );
    }

    /// An array is read in one pass; an element that is not an event, or
    /// holds a field twice, is reported and the others are still read.
    #[test]
    fn each_element_of_an_array_is_judged_on_its_own() {
        let body = r#" [ {"eventType":"\u00e9\"]","timestamp":1780821960,"x":[1,{"y":"]"}]},7,"x",[],null,
            {"eventType":1,"timestamp":"x"},{"eventType":"a","eventType":"b","timestamp":1780821960}] "#;
        let Err(BatchError::Invalid(bad)) = parse_batch(
            body.as_bytes(),
            false,
            0,
            i64::MAX / 2,
            &EventLimits::default(),
        ) else {
            panic!("expected invalid events");
        };
        let problems: Vec<(usize, &str, &str)> = bad
            .iter()
            .flat_map(|(i, errors)| {
                errors
                    .iter()
                    .map(move |e| (*i, e.field.as_str(), e.problem.as_str()))
            })
            .collect();
        assert_eq!(
            problems,
            [
                (1, "", "must be a JSON object, found a number"),
                (2, "", "must be a JSON object, found a string"),
                (3, "", "must be a JSON object, found an array"),
                (4, "", "must be a JSON object, found null"),
                (5, "eventType", "must be a string, found a number"),
                (5, "timestamp", "'x' is not an RFC 3339 time"),
                (6, "eventType", "is given more than once"),
            ]
        );
        for malformed in [
            r#"[{"eventType":"a"},]"#,
            r#"[{"eventType":"a"}] x"#,
            r#"[{"eventType":"a"} {"eventType":"b"}]"#,
            r#"[{"eventType":"a","values":{"n":1e400}}]"#,
            r#"[{"eventType":"a","dimensions":{"k":"\ud800"}}]"#,
            "[",
        ] {
            let read = parse_batch(
                malformed.as_bytes(),
                false,
                0,
                i64::MAX / 2,
                &EventLimits::default(),
            );
            assert!(
                matches!(read, Err(BatchError::Malformed(_))),
                "{malformed}: {read:?}"
            );
        }
        for empty in ["[]", " [ ] "] {
            let read = parse_batch(
                empty.as_bytes(),
                false,
                0,
                i64::MAX / 2,
                &EventLimits::default(),
            );
            assert_eq!(read, Err(BatchError::Empty));
        }
    }

    #[test]
    fn batches_are_all_or_nothing_and_name_each_bad_index() {
        let now = 1_780_821_960_123;
        let ok = parse_batch(
            br#"[{"eventType":"a"}, {"eventType":"b","timestamp":1780821960}]"#,
            false,
            now,
            300_000,
            &EventLimits::default(),
        )
        .unwrap();
        let Err(BatchError::Invalid(future)) = parse_batch(
            br#"{"eventType":"a","timestamp":1780822960}"#,
            false,
            now,
            300_000,
            &EventLimits::default(),
        ) else {
            panic!("an event from the future must be refused");
        };
        assert_eq!(future[0].1[0].field, "timestamp");
        // Records, with the receive time where none was sent.
        let time_of = |accepted: &Accepted| {
            let mut event = EventRef::default();
            record::read(&accepted.record, &mut event).unwrap();
            event.timestamp.unwrap()
        };
        assert_eq!(time_of(&ok[0]), now);
        assert_eq!(time_of(&ok[1]), 1_780_821_960_000);
        assert_eq!(ok[0].id, None);
        let Err(BatchError::Invalid(bad)) = parse_batch(
            br#"[{"eventType":"a"},{"timestamp":"x"},7,{"eventType":"c"}]"#,
            false,
            0,
            0,
            &EventLimits::default(),
        ) else {
            panic!("expected invalid");
        };
        assert_eq!(bad.iter().map(|(i, _)| *i).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(bad[0].1.len(), 2);
        let nd = parse_batch(
            b"{\"eventType\":\"a\"}\n\n{\"eventType\":\"b\"}\n",
            true,
            0,
            i64::MAX / 2,
            &EventLimits::default(),
        )
        .unwrap();
        assert_eq!(nd.len(), 2);
        assert!(matches!(
            parse_batch(b"[{]", false, 0, i64::MAX / 2, &EventLimits::default(),),
            Err(BatchError::Malformed(_))
        ));
        assert_eq!(
            parse_batch(b"[]", false, 0, i64::MAX / 2, &EventLimits::default(),),
            Err(BatchError::Empty)
        );
        assert_eq!(
            parse_batch(
                SEED.as_bytes(),
                false,
                1_780_821_960_000,
                300_000,
                &EventLimits::default(),
            )
            .unwrap(),
            [Accepted {
                record: parse_event(SEED.as_bytes(), 0).unwrap().to_record(),
                id: Some(IdKey::of("evt_uuid_00981a")),
            }]
        );
    }
}
