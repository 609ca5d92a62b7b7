//! The event model, and the one parser every path uses.
//!
//! An event arrives as JSON in the seed's shape. [`parse_event_ref`]
//! validates it without failing on the first problem: each field that is
//! wrong becomes a [`FieldError`], so a client learns everything that is
//! wrong with a batch in one answer. The result, [`EventRef`], borrows from
//! the input, so reading an event costs little more than scanning it.
//!
//! The log keeps each accepted event as the client sent it
//! ([`parse_batch`]), which is what users see when they read the log or the
//! dead letters. Only an event without a `timestamp` is rewritten, with the
//! time it was received, so that every replay reads the same time.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Event time in milliseconds since the Unix epoch.
pub type Millis = i64;

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

/// A validated event that borrows its strings from the JSON it was read from.
#[derive(Clone, Debug, PartialEq)]
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

/// Unix timestamps below this are seconds; at or above it, milliseconds.
/// 10^11 seconds is the year 5138, and 10^11 milliseconds is March 1973.
const MILLIS_THRESHOLD: f64 = 1e11;

/// Parses and validates one event from JSON bytes, borrowing from them.
///
/// On failure, every field error found is returned, or one error for the
/// whole value when it is not a JSON object at all.
pub fn parse_event_ref(json: &[u8]) -> Result<EventRef<'_>, Vec<FieldError>> {
    let raw: RawEvent = serde_json::from_slice(json).map_err(|e| {
        vec![FieldError::new(
            "",
            format!("not a valid event object: {e}"),
        )]
    })?;
    raw.validate()
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

/// Parses a request body (one event, a JSON array of events, or, when
/// `ndjson` is set, one event per line) into log records, one per event.
///
/// The batch is all or nothing: any invalid event fails it, and every invalid
/// event is reported. A record is the event's JSON as sent; an event without
/// a `timestamp` is written out again with `received_at` as its time.
///
/// An event whose timestamp is more than `max_future` past `received_at`
/// is invalid.
pub fn parse_batch(
    body: &[u8],
    ndjson: bool,
    received_at: Millis,
    max_future: Millis,
) -> Result<Vec<Vec<u8>>, BatchError> {
    let raws: Vec<&[u8]> = if ndjson {
        body.split(|&b| b == b'\n')
            .filter(|line| line.iter().any(|b| !b.is_ascii_whitespace()))
            .collect()
    } else {
        match body.iter().find(|b| !b.is_ascii_whitespace()) {
            None => return Err(BatchError::Empty),
            Some(b'[') => {
                let elements: Vec<&serde_json::value::RawValue> = serde_json::from_slice(body)
                    .map_err(|e| BatchError::Malformed(e.to_string()))?;
                elements.into_iter().map(|e| e.get().as_bytes()).collect()
            }
            Some(_) => {
                serde_json::from_slice::<IgnoredAny>(body)
                    .map_err(|e| BatchError::Malformed(e.to_string()))?;
                vec![body]
            }
        }
    };
    if raws.is_empty() {
        return Err(BatchError::Empty);
    }
    let mut records = Vec::with_capacity(raws.len());
    let mut invalid = Vec::new();
    for (index, raw) in raws.into_iter().enumerate() {
        match parse_event_ref(raw) {
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
            Ok(event) if event.timestamp.is_some() => records.push(raw.to_vec()),
            Ok(event) => records.push(event.to_owned(received_at).to_json()),
            Err(errors) => invalid.push((index, errors)),
        }
    }
    if !invalid.is_empty() {
        return Err(BatchError::Invalid(invalid));
    }
    Ok(records)
}

/// An object's entries, each value read leniently.
type LenientMap<'a, V> = Lenient<Vec<(Cow<'a, str>, Lenient<V>)>>;

/// The event as sent. Every field is lenient: a wrong type is recorded, not
/// raised, so that all problems of an event are reported together.
#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(rename = "eventId", borrow = "'a", default)]
    event_id: Option<Lenient<Cow<'a, str>>>,
    #[serde(rename = "eventType", borrow = "'a", default)]
    event_type: Option<Lenient<Cow<'a, str>>>,
    #[serde(default)]
    timestamp: Option<Lenient<Timestamp>>,
    #[serde(borrow = "'a", default)]
    dimensions: Option<LenientMap<'a, DimValue<'a>>>,
    #[serde(borrow = "'a", default)]
    values: Option<LenientMap<'a, f64>>,
}

impl<'a> RawEvent<'a> {
    fn validate(self) -> Result<EventRef<'a>, Vec<FieldError>> {
        let mut errors = Vec::new();
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
        let mut dimensions = Vec::new();
        match self.dimensions {
            None => {}
            Some(Lenient::Wrong(found)) => errors.push(FieldError::new(
                "dimensions",
                format!("must be an object, found {found}"),
            )),
            Some(Lenient::Ok(entries)) => {
                for (name, value) in entries {
                    match value {
                        Lenient::Ok(DimValue(v)) if v.chars().any(char::is_control) => {
                            errors.push(FieldError::new(
                                format!("dimensions.{name}"),
                                "must not contain control characters",
                            ))
                        }
                        Lenient::Ok(DimValue(v)) => dimensions.push((name, v)),
                        Lenient::Wrong(found) => errors.push(FieldError::new(
                            format!("dimensions.{name}"),
                            format!("must be a string, number or boolean, found {found}"),
                        )),
                    }
                }
            }
        }
        let mut values = Vec::new();
        match self.values {
            None => {}
            Some(Lenient::Wrong(found)) => errors.push(FieldError::new(
                "values",
                format!("must be an object, found {found}"),
            )),
            Some(Lenient::Ok(entries)) => {
                for (name, value) in entries {
                    match value {
                        Lenient::Ok(v) if v.is_finite() && v.abs() <= MAX_VALUE => {
                            values.push((name, v))
                        }
                        Lenient::Ok(_) => errors.push(FieldError::new(
                            format!("values.{name}"),
                            format!("must be a finite number of magnitude at most {MAX_VALUE:e}"),
                        )),
                        Lenient::Wrong(found) => errors.push(FieldError::new(
                            format!("values.{name}"),
                            format!("must be a number, found {found}"),
                        )),
                    }
                }
            }
        }
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

/// A field that either parsed as `T` or held some other JSON type, named in
/// the `Wrong` variant. A wrong value is skipped whole, never half-read.
enum Lenient<T> {
    Ok(T),
    Wrong(&'static str),
}

/// Deserialises a value as `T`, and anything else as `Lenient::Wrong`.
///
/// It buffers nothing: `T`'s visitor sees the value once, and the types it
/// does not accept are consumed by the fallback visitor below.
trait LenientVisit<'de>: Sized {
    fn visit_str(v: Cow<'de, str>) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_i64(v: i64) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_u64(v: u64) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_f64(v: f64) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_bool(v: bool) -> Option<Self> {
        let _ = v;
        None
    }
    fn visit_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        drain_map(map).map(|()| None)
    }
}

fn drain_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

impl<'de, T: LenientVisit<'de>> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: LenientVisit<'de>> Visitor<'de> for V<T> {
            type Value = Lenient<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(T::visit_str(Cow::Borrowed(v)).map_or(Lenient::Wrong("a string"), Lenient::Ok))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(T::visit_str(Cow::Owned(v.to_owned()))
                    .map_or(Lenient::Wrong("a string"), Lenient::Ok))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(T::visit_str(Cow::Owned(v)).map_or(Lenient::Wrong("a string"), Lenient::Ok))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(T::visit_i64(v).map_or(Lenient::Wrong("a number"), Lenient::Ok))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(T::visit_u64(v).map_or(Lenient::Wrong("a number"), Lenient::Ok))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
                Ok(T::visit_f64(v).map_or(Lenient::Wrong("a number"), Lenient::Ok))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Self::Value, E> {
                Ok(T::visit_bool(v).map_or(Lenient::Wrong("a boolean"), Lenient::Ok))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient::Wrong("null"))
            }
            fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Lenient::Wrong("null"))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                while seq.next_element::<IgnoredAny>()?.is_some() {}
                Ok(Lenient::Wrong("an array"))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                Ok(T::visit_map(map)?.map_or(Lenient::Wrong("an object"), Lenient::Ok))
            }
        }
        deserializer.deserialize_any(V(std::marker::PhantomData))
    }
}

impl<'de: 'a, 'a> LenientVisit<'de> for Cow<'a, str> {
    fn visit_str(v: Cow<'de, str>) -> Option<Self> {
        Some(v)
    }
}

impl LenientVisit<'_> for f64 {
    fn visit_i64(v: i64) -> Option<Self> {
        Some(v as f64)
    }
    fn visit_u64(v: u64) -> Option<Self> {
        Some(v as f64)
    }
    fn visit_f64(v: f64) -> Option<Self> {
        Some(v)
    }
}

/// A dimension value: strings are kept, numbers and booleans become their text.
struct DimValue<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> LenientVisit<'de> for DimValue<'a> {
    fn visit_str(v: Cow<'de, str>) -> Option<Self> {
        Some(DimValue(v))
    }
    fn visit_i64(v: i64) -> Option<Self> {
        Some(DimValue(Cow::Owned(v.to_string())))
    }
    fn visit_u64(v: u64) -> Option<Self> {
        Some(DimValue(Cow::Owned(v.to_string())))
    }
    fn visit_f64(v: f64) -> Option<Self> {
        Some(DimValue(Cow::Owned(v.to_string())))
    }
    fn visit_bool(v: bool) -> Option<Self> {
        Some(DimValue(Cow::Owned(v.to_string())))
    }
}

/// A timestamp, already converted to milliseconds, or the reason it is bad.
struct Timestamp(Result<Millis, String>);

impl Timestamp {
    fn from_number(v: f64) -> Self {
        if !v.is_finite() || v < 0.0 {
            return Timestamp(Err("must be a non-negative Unix time".into()));
        }
        let ms = if v < MILLIS_THRESHOLD { v * 1000.0 } else { v };
        if ms > 253_402_300_799_999.0 {
            return Timestamp(Err("is after the year 9999".into()));
        }
        Timestamp(Ok(ms.round() as Millis))
    }
}

impl<'de> LenientVisit<'de> for Timestamp {
    fn visit_str(v: Cow<'de, str>) -> Option<Self> {
        Some(Timestamp(
            parse_rfc3339(&v).ok_or_else(|| format!("'{v}' is not an RFC 3339 time")),
        ))
    }
    fn visit_i64(v: i64) -> Option<Self> {
        Some(Timestamp::from_number(v as f64))
    }
    fn visit_u64(v: u64) -> Option<Self> {
        Some(Timestamp::from_number(v as f64))
    }
    fn visit_f64(v: f64) -> Option<Self> {
        Some(Timestamp::from_number(v))
    }
}

impl<'de: 'a, 'a> LenientVisit<'de> for Vec<(Cow<'a, str>, Lenient<DimValue<'a>>)> {
    fn visit_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        collect_map(map).map(Some)
    }
}

impl<'de: 'a, 'a> LenientVisit<'de> for Vec<(Cow<'a, str>, Lenient<f64>)> {
    fn visit_map<A: MapAccess<'de>>(map: A) -> Result<Option<Self>, A::Error> {
        collect_map(map).map(Some)
    }
}

fn collect_map<'de, A, V>(mut map: A) -> Result<Vec<(Cow<'de, str>, V)>, A::Error>
where
    A: MapAccess<'de>,
    V: Deserialize<'de>,
{
    let mut entries = Vec::with_capacity(map.size_hint().unwrap_or(4));
    while let Some(key) = map.next_key::<BorrowedKey<'de>>()? {
        entries.push((key.0, map.next_value()?));
    }
    Ok(entries)
}

/// A map key that borrows from the input when it has no escapes.
struct BorrowedKey<'a>(Cow<'a, str>);

impl<'de> Deserialize<'de> for BorrowedKey<'de> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BorrowedKey<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string key")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedKey(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BorrowedKey(Cow::Owned(v.to_owned())))
            }
        }
        deserializer.deserialize_str(V)
    }
}

/// Parses an RFC 3339 time into Unix milliseconds.
pub fn parse_rfc3339(s: &str) -> Option<Millis> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.timestamp_millis())
}

/// Formats Unix milliseconds as RFC 3339 in UTC, with milliseconds only when
/// they are not zero: `2026-06-07T10:00:00Z`, `2026-06-07T11:26:00.102Z`.
pub fn format_rfc3339(ms: Millis) -> String {
    let Some(t) = chrono::DateTime::from_timestamp_millis(ms) else {
        return ms.to_string();
    };
    if ms % 1000 == 0 {
        t.format("%Y-%m-%dT%H:%M:%SZ").to_string()
    } else {
        t.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_event(json: &[u8], received_at: Millis) -> Result<Event, Vec<FieldError>> {
        parse_event_ref(json).map(|e| e.to_owned(received_at))
    }

    const SEED: &str = r#"{
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
    fn non_objects_are_rejected_whole() {
        assert_eq!(parse_event(b"5", 0).unwrap_err().len(), 1);
        assert_eq!(parse_event(br#""x""#, 0).unwrap_err().len(), 1);
        assert_eq!(parse_event(b"{", 0).unwrap_err().len(), 1);
    }

    #[test]
    fn batches_are_all_or_nothing_and_name_each_bad_index() {
        let now = 1_780_821_960_123;
        let ok = parse_batch(
            br#"[{"eventType":"a"}, {"eventType":"b","timestamp":1780821960}]"#,
            false,
            now,
            300_000,
        )
        .unwrap();
        let Err(BatchError::Invalid(future)) = parse_batch(
            br#"{"eventType":"a","timestamp":1780822960}"#,
            false,
            now,
            300_000,
        ) else {
            panic!("an event from the future must be refused");
        };
        assert_eq!(future[0].1[0].field, "timestamp");
        // Sent as is, unless the time had to be filled in.
        assert_eq!(ok[1], br#"{"eventType":"b","timestamp":1780821960}"#);
        assert_eq!(parse_event(&ok[0], 0).unwrap().timestamp, now);
        let Err(BatchError::Invalid(bad)) = parse_batch(
            br#"[{"eventType":"a"},{"timestamp":"x"},7,{"eventType":"c"}]"#,
            false,
            0,
            0,
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
        )
        .unwrap();
        assert_eq!(nd.len(), 2);
        assert!(matches!(
            parse_batch(b"[{]", false, 0, i64::MAX / 2),
            Err(BatchError::Malformed(_))
        ));
        assert_eq!(
            parse_batch(b"[]", false, 0, i64::MAX / 2),
            Err(BatchError::Empty)
        );
        assert_eq!(
            parse_batch(SEED.as_bytes(), false, 1_780_821_960_000, 300_000)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn formats_rfc3339() {
        assert_eq!(format_rfc3339(1_780_826_760_000), "2026-06-07T10:06:00Z");
        assert_eq!(
            format_rfc3339(1_780_826_760_102),
            "2026-06-07T10:06:00.102Z"
        );
    }
}
