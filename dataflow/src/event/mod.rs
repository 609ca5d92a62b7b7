//! The event model, and the one parser every path uses.
//!
//! An event arrives as JSON in the seed's shape. [`parse_event_ref`]
//! validates it without failing on the first problem: each field that is
//! wrong becomes a [`FieldError`], so a client learns everything that is
//! wrong with a batch in one answer. The result, [`EventRef`], borrows from
//! the input, so reading an event costs little more than scanning it.
//!
//! The log keeps each accepted event as a compact record ([`record`],
//! written by [`parse_batch`]), which the workers read without parsing
//! JSON again. An event without a `timestamp` is given the time it was
//! received, so that every replay reads the same time. Users see a record
//! as the event's canonical JSON ([`record::to_json`]).
//!
//! # Layout
//!
//! - this module: the event model and its validation rules.
//! - `batch`: request bodies (one event, an array, NDJSON) into log records.
//! - `limits`: the bounds on an event's fields, checked at the edge only.
//! - `record`: the log's compact record of an event, which the workers
//!   read without parsing JSON.
//! - `lenient`: the field reader that records a wrong type instead of
//!   failing, so that every problem of an event is reported at once.

mod batch;
mod lenient;
mod limits;
pub mod record;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess};
use serde::{Deserialize, Serialize};

pub use self::batch::{parse_batch, spread, Accepted, BatchError};
use self::lenient::{DimValue, Lenient, LenientMap, LenientVisit, Timestamp};
pub use self::limits::{
    EventLimits, DEFAULT_MAX_DIMENSIONS, DEFAULT_MAX_DIMENSION_VALUE, DEFAULT_MAX_EVENT_ID,
    DEFAULT_MAX_NAME, DEFAULT_MAX_VALUES,
};
use crate::time::Millis;

/// A validated, normalised event.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// The client's id for the event, if it sent one.
    #[serde(rename = "eventId", skip_serializing_if = "Option::is_none", default)]
    pub event_id: Option<String>,
    /// The kind of event, such as `ad_click`. Metrics filter on it.
    #[serde(rename = "eventType")]
    pub event_type: String,
    /// Event time, in Unix milliseconds.
    pub timestamp: Millis,
    /// String attributes that metrics group and filter by.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub dimensions: BTreeMap<String, String>,
    /// Numeric fields that `sum` and `avg` metrics read.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub values: BTreeMap<String, f64>,
}

impl Event {
    /// The event as JSON, its `timestamp` in milliseconds, which the parser
    /// reads back as it was.
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising a struct of strings, integers and finite floats cannot fail.
        serde_json::to_vec(self).expect("an event always serialises")
    }
}

/// One problem with one field of one event.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// The field's path, such as `timestamp` or `dimensions.country`.
    pub field: String,
    /// What is wrong with it.
    pub problem: String,
}

impl FieldError {
    fn new(field: impl Into<String>, problem: impl Into<String>) -> Self {
        FieldError {
            field: field.into(),
            problem: problem.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.problem)
    }
}

/// A validated event that borrows its strings from the JSON or the log
/// record it was read from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EventRef<'a> {
    /// The client's id for the event, if it sent one.
    pub event_id: Option<Cow<'a, str>>,
    /// The kind of event.
    pub event_type: Cow<'a, str>,
    /// Event time in Unix milliseconds, if the event has one.
    pub timestamp: Option<Millis>,
    /// Dimensions, in the order sent.
    pub dimensions: Vec<(Cow<'a, str>, Cow<'a, str>)>,
    /// Numeric values, in the order sent.
    pub values: Vec<(Cow<'a, str>, f64)>,
}

impl EventRef<'_> {
    /// The JSON of [`Self::to_owned`], written without copying the event:
    /// its dimensions and values by name, the last of a name given twice,
    /// as the owned event's maps hold them.
    pub fn to_json(&self, received_at: Millis) -> Vec<u8> {
        let canonical = Canonical {
            event_id: self.event_id.as_deref(),
            event_type: &self.event_type,
            timestamp: self.timestamp.unwrap_or(received_at),
            dimensions: ByName::of(&self.dimensions),
            values: ByName::of(&self.values),
        };
        // Strings, integers and finite floats cannot fail to serialise.
        serde_json::to_vec(&canonical).expect("an event always serialises")
    }

    /// An owned copy, with `received_at` for a missing timestamp.
    pub fn to_owned(&self, received_at: Millis) -> Event {
        Event {
            event_id: self.event_id.as_deref().map(str::to_owned),
            event_type: self.event_type.to_string(),
            timestamp: self.timestamp.unwrap_or(received_at),
            dimensions: self
                .dimensions
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            values: self
                .values
                .iter()
                .map(|(k, v)| (k.to_string(), *v))
                .collect(),
        }
    }
}

/// A borrowed event as [`Event`] serialises: the same fields, in the same
/// order.
#[derive(Serialize)]
struct Canonical<'e> {
    #[serde(rename = "eventId", skip_serializing_if = "Option::is_none")]
    event_id: Option<&'e str>,
    #[serde(rename = "eventType")]
    event_type: &'e str,
    timestamp: Millis,
    #[serde(skip_serializing_if = "ByName::is_empty")]
    dimensions: ByName<'e, Cow<'e, str>, Cow<'e, str>>,
    #[serde(skip_serializing_if = "ByName::is_empty")]
    values: ByName<'e, Cow<'e, str>, f64>,
}

/// Named fields as a `BTreeMap` of them serialises: by name, and of a name
/// given more than once, the last.
struct ByName<'e, K, V>(Vec<&'e (K, V)>);

impl<'e, K: Ord, V> ByName<'e, K, V> {
    fn of(fields: &'e [(K, V)]) -> Self {
        let mut sorted: Vec<&(K, V)> = fields.iter().collect();
        // Stable: the fields of one name stay in the order given.
        sorted.sort_by(|a, b| a.0.cmp(&b.0));
        let mut kept: Vec<&(K, V)> = Vec::with_capacity(sorted.len());
        for field in sorted {
            match kept.last_mut() {
                Some(last) if last.0 == field.0 => *last = field,
                _ => kept.push(field),
            }
        }
        ByName(kept)
    }

    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<K: Serialize, V: Serialize> Serialize for ByName<'_, K, V> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// The fields an aggregate reads, for owned and borrowed events alike.
pub trait Fields {
    /// The value of dimension `name`.
    fn dimension(&self, name: &str) -> Option<&str>;
    /// The value of numeric field `name`.
    fn value(&self, name: &str) -> Option<f64>;
}

impl Fields for Event {
    fn dimension(&self, name: &str) -> Option<&str> {
        self.dimensions.get(name).map(String::as_str)
    }
    fn value(&self, name: &str) -> Option<f64> {
        self.values.get(name).copied()
    }
}

impl Fields for EventRef<'_> {
    fn dimension(&self, name: &str) -> Option<&str> {
        // Later duplicates win, as they would in a map.
        self.dimensions
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_ref())
    }
    fn value(&self, name: &str) -> Option<f64> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| k == name)
            .map(|(_, v)| *v)
    }
}

/// The largest magnitude of a numeric value. Sums are kept exactly to a
/// billionth in 128 bits, which holds about 1.7e29: this leaves room for
/// a hundred billion such values in one window.
pub const MAX_VALUE: f64 = 1e18;

/// Parses and validates one event from JSON bytes, borrowing from them.
///
/// On failure, every field error found is returned, or one error for the
/// whole value when it is not a JSON object at all.
pub fn parse_event_ref(json: &[u8]) -> Result<EventRef<'_>, Vec<FieldError>> {
    match sonic_rs::from_slice(json) {
        Ok(element) => validate(element),
        Err(e) => Err(vec![FieldError::new(
            "",
            format!("not valid JSON: {}", json_error(&e)),
        )]),
    }
}

/// The parser's error, by its first line, which says what and where,
/// without the excerpt of the input it goes on with.
fn json_error(e: &sonic_rs::Error) -> String {
    let message = e.to_string();
    message.lines().next().unwrap_or_default().to_owned()
}

/// An event as sent, or what was sent in its place.
type Element<'a> = Lenient<RawEvent<'a>>;

/// Validates an element of a request: an event object, or a value that
/// is not one.
fn validate(element: Element<'_>) -> Result<EventRef<'_>, Vec<FieldError>> {
    match element {
        Lenient::Ok(raw) => raw.validate(),
        Lenient::Wrong(found) => Err(vec![FieldError::new(
            "",
            format!("must be a JSON object, found {found}"),
        )]),
    }
}

/// Whether `s` holds a control character (Unicode's `Cc`).
fn has_control(s: &str) -> bool {
    if s.is_ascii() {
        s.bytes().any(|b| b < 0x20 || b == 0x7f)
    } else {
        s.chars().any(char::is_control)
    }
}

/// The event as sent. Every field is lenient: a wrong type, or a field
/// given twice, is recorded, not raised, so that all problems of an event
/// are reported together and an array's other events are still read.
#[derive(Default)]
struct RawEvent<'a> {
    event_id: Option<Lenient<Cow<'a, str>>>,
    event_type: Option<Lenient<Cow<'a, str>>>,
    timestamp: Option<Lenient<Timestamp>>,
    dimensions: Option<LenientMap<'a, DimValue<'a>>>,
    values: Option<LenientMap<'a, f64>>,
    /// The fields given more than once.
    repeated: Vec<&'static str>,
}

impl<'de> LenientVisit<'de> for RawEvent<'de> {
    fn visit_map<A: MapAccess<'de>>(mut map: A) -> Result<Option<Self>, A::Error> {
        fn once<'de, A: MapAccess<'de>, T: serde::Deserialize<'de>>(
            map: &mut A,
            slot: &mut Option<T>,
            name: &'static str,
            repeated: &mut Vec<&'static str>,
        ) -> Result<(), A::Error> {
            if slot.is_some() {
                map.next_value::<IgnoredAny>()?;
                repeated.push(name);
            } else {
                *slot = Some(map.next_value()?);
            }
            Ok(())
        }
        let mut raw = RawEvent::default();
        let repeated = &mut raw.repeated;
        while let Some(key) = map.next_key::<Key>()? {
            match key {
                Key::EventId => once(&mut map, &mut raw.event_id, "eventId", repeated)?,
                Key::EventType => once(&mut map, &mut raw.event_type, "eventType", repeated)?,
                Key::Timestamp => once(&mut map, &mut raw.timestamp, "timestamp", repeated)?,
                Key::Dimensions => once(&mut map, &mut raw.dimensions, "dimensions", repeated)?,
                Key::Values => once(&mut map, &mut raw.values, "values", repeated)?,
                Key::Other => {
                    map.next_value::<IgnoredAny>()?;
                }
            }
        }
        Ok(Some(raw))
    }
}

/// A field name of an event, read without allocating.
enum Key {
    EventId,
    EventType,
    Timestamp,
    Dimensions,
    Values,
    Other,
}

impl<'de> serde::Deserialize<'de> for Key {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a field name")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(match v {
                    "eventId" => Key::EventId,
                    "eventType" => Key::EventType,
                    "timestamp" => Key::Timestamp,
                    "dimensions" => Key::Dimensions,
                    "values" => Key::Values,
                    _ => Key::Other,
                })
            }
        }
        deserializer.deserialize_identifier(V)
    }
}

impl<'a> RawEvent<'a> {
    fn validate(self) -> Result<EventRef<'a>, Vec<FieldError>> {
        let mut errors: Vec<FieldError> = self
            .repeated
            .iter()
            .map(|field| FieldError::new(*field, "is given more than once"))
            .collect();
        let event_id = match self.event_id {
            None => None,
            Some(Lenient::Ok(id)) if id.is_empty() => {
                errors.push(FieldError::new("eventId", "must not be empty"));
                None
            }
            Some(Lenient::Ok(id)) => Some(id),
            Some(Lenient::Wrong(found)) => {
                errors.push(FieldError::new(
                    "eventId",
                    format!("must be a string, found {found}"),
                ));
                None
            }
        };
        let event_type = match self.event_type {
            None => {
                errors.push(FieldError::new("eventType", "is required"));
                Cow::Borrowed("")
            }
            Some(Lenient::Ok(t)) if t.is_empty() => {
                errors.push(FieldError::new("eventType", "must not be empty"));
                t
            }
            Some(Lenient::Ok(t)) => t,
            Some(Lenient::Wrong(found)) => {
                errors.push(FieldError::new(
                    "eventType",
                    format!("must be a string, found {found}"),
                ));
                Cow::Borrowed("")
            }
        };
        let timestamp = match self.timestamp {
            None => None,
            Some(Lenient::Ok(Timestamp(Ok(ms)))) => Some(ms),
            Some(Lenient::Ok(Timestamp(Err(problem)))) => {
                errors.push(FieldError::new("timestamp", problem));
                None
            }
            Some(Lenient::Wrong(found)) => {
                errors.push(FieldError::new(
                    "timestamp",
                    format!("must be Unix seconds, Unix milliseconds or an RFC 3339 string, found {found}"),
                ));
                None
            }
        };
        // Each map's entries are filtered where they lie, with no new allocation.
        let dimensions = match self.dimensions {
            None => Vec::new(),
            Some(Lenient::Wrong(found)) => {
                errors.push(FieldError::new(
                    "dimensions",
                    format!("must be an object, found {found}"),
                ));
                Vec::new()
            }
            Some(Lenient::Ok(entries)) => entries
                .into_iter()
                .filter_map(|(name, value)| match value {
                    Lenient::Ok(DimValue(v)) if has_control(&v) => {
                        errors.push(FieldError::new(
                            format!("dimensions.{name}"),
                            "must not contain control characters",
                        ));
                        None
                    }
                    Lenient::Ok(DimValue(v)) => Some((name, v)),
                    Lenient::Wrong(found) => {
                        errors.push(FieldError::new(
                            format!("dimensions.{name}"),
                            format!("must be a string, number or boolean, found {found}"),
                        ));
                        None
                    }
                })
                .collect(),
        };
        let values = match self.values {
            None => Vec::new(),
            Some(Lenient::Wrong(found)) => {
                errors.push(FieldError::new(
                    "values",
                    format!("must be an object, found {found}"),
                ));
                Vec::new()
            }
            Some(Lenient::Ok(entries)) => entries
                .into_iter()
                .filter_map(|(name, value)| match value {
                    Lenient::Ok(v) if v.is_finite() && v.abs() <= MAX_VALUE => Some((name, v)),
                    Lenient::Ok(_) => {
                        errors.push(FieldError::new(
                            format!("values.{name}"),
                            format!("must be a finite number of magnitude at most {MAX_VALUE:e}"),
                        ));
                        None
                    }
                    Lenient::Wrong(found) => {
                        errors.push(FieldError::new(
                            format!("values.{name}"),
                            format!("must be a number, found {found}"),
                        ));
                        None
                    }
                })
                .collect(),
        };
        if errors.is_empty() {
            Ok(EventRef {
                event_id,
                event_type,
                timestamp,
                dimensions,
                values,
            })
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(super) fn parse_event(json: &[u8], received_at: Millis) -> Result<Event, Vec<FieldError>> {
        parse_event_ref(json).map(|e| e.to_owned(received_at))
    }

    pub(super) const SEED: &str = r#"{
  "eventId": "evt_uuid_00981a",
  "eventType": "ad_click",
  "timestamp": 1780821960,
  "dimensions": {
    "campaignId": "camp_5541",
    "country": "US",
    "deviceType": "MOBILE",
    "userId": "usr_9981a2"
  }
}"#;

    #[test]
    fn seed_payload_is_accepted_as_is() {
        let e = parse_event(SEED.as_bytes(), 0).unwrap();
        assert_eq!(e.event_type, "ad_click");
        assert_eq!(e.timestamp, 1_780_821_960_000);
        assert_eq!(e.dimensions["country"], "US");
        assert!(e.values.is_empty());
    }

    #[test]
    fn timestamps_in_every_form_agree() {
        let at = |ts: &str| {
            parse_event(
                format!(r#"{{"eventType":"x","timestamp":{ts}}}"#).as_bytes(),
                7,
            )
            .unwrap()
            .timestamp
        };
        assert_eq!(at("1780821960"), 1_780_821_960_000);
        assert_eq!(at("1780821960.5"), 1_780_821_960_500);
        assert_eq!(at("1780821960500"), 1_780_821_960_500);
        assert_eq!(at(r#""2026-06-07T09:26:00.5Z""#), 1_780_824_360_500);
        assert_eq!(at(r#""2026-06-07T11:26:00.5+02:00""#), 1_780_824_360_500);
        let missing = parse_event(br#"{"eventType":"x"}"#, 42).unwrap();
        assert_eq!(missing.timestamp, 42);
    }

    #[test]
    fn every_bad_field_is_named() {
        let errors = parse_event(
            br#"{"eventId":5,"timestamp":"yesterday","dimensions":{"a":"x","b":[1]},"values":{"amount":"12"}}"#,
            0,
        )
        .unwrap_err();
        let fields: Vec<_> = errors.iter().map(|e| e.field.as_str()).collect();
        assert_eq!(
            fields,
            [
                "eventId",
                "eventType",
                "timestamp",
                "dimensions.b",
                "values.amount"
            ]
        );
    }

    #[test]
    fn canonical_form_round_trips() {
        let mut e = parse_event(SEED.as_bytes(), 0).unwrap();
        e.values.insert("amount".into(), 12.5);
        assert_eq!(parse_event(&e.to_json(), 0).unwrap(), e);
    }

    #[test]
    fn a_borrowed_event_writes_the_json_of_its_owned_copy() {
        for json in [
            SEED,
            r#"{"eventType":"x","timestamp":5}"#,
            r#"{"eventType":"x"}"#,
            // Out of order, a name given twice, escapes, and odd numbers.
            r#"{"eventId":"i\"d","eventType":"t\u00e9","timestamp":3,
                "dimensions":{"b":"1","a":"x\\y","b":"2","c":"","a":"last"},
                "values":{"z":1e17,"y":-0.0,"z":0.1,"x":3}}"#,
        ] {
            let event = parse_event_ref(json.as_bytes()).unwrap();
            if json.contains("last") {
                assert_eq!(event.dimensions.len(), 5, "the names given twice are kept");
            }
            assert_eq!(
                String::from_utf8(event.to_json(9)).unwrap(),
                String::from_utf8(event.to_owned(9).to_json()).unwrap(),
                "{json}"
            );
        }
    }

    #[test]
    fn non_objects_are_rejected_whole() {
        assert_eq!(parse_event(b"5", 0).unwrap_err().len(), 1);
        assert_eq!(parse_event(br#""x""#, 0).unwrap_err().len(), 1);
        assert_eq!(parse_event(b"{", 0).unwrap_err().len(), 1);
    }
}
