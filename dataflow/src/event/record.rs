//! The log's record of an event: written once by the gateway, read by the
//! workers without parsing JSON.
//!
//! ```text
//! record := 0xC1 version kind body          version = 1
//! kind 0, an event:
//!     timestamp   i64 little-endian, Unix milliseconds
//!     d, v        varint each: the numbers of dimensions and of values
//!     lengths     varint × (2 + 2d + v): of eventId (0: the event has none),
//!                 eventType, each dimension's name and value, each value's name
//!     values      f64 little-endian × v
//!     strings     the strings, UTF-8, one after the other in the order of lengths
//! kind 1, a watermark mark:
//!     watermark   i64 little-endian, Unix milliseconds
//! kind 2, a batch of records, as one Kafka message holds them:
//!     count × (length varint, record)
//! varint := unsigned LEB128, at most 32 bits
//! ```
//!
//! Dimensions and values keep the order sent. The strings come last and
//! together, so that a reader checks their UTF-8 in one pass.
//!
//! The first byte, `0xC1`, is never the first byte of UTF-8 text, so a
//! record cannot be mistaken for JSON: a log written before this format,
//! whose records are the events' JSON, is still read ([`read`] falls back
//! to the JSON parser). A later version changes the version byte, and a
//! reader refuses a version it does not know, by name.
//!
//! Names may repeat, as they may in the JSON sent; the last one counts.
//! Reading checks the structure, that every string is UTF-8 and that every
//! value is a finite number of magnitude at most [`MAX_VALUE`]: a record
//! that fails is unreadable, and its event a dead letter.

use std::borrow::Cow;
use std::fmt;

use super::{parse_event_ref, Event, EventRef, MAX_VALUE};
use crate::time::Millis;

/// The first byte of every record: a byte no UTF-8 text begins with.
pub const MAGIC: u8 = 0xC1;
/// The format version this code writes and reads.
pub const VERSION: u8 = 1;
const EVENT: u8 = 0;
const MARK: u8 = 1;
const BATCH: u8 = 2;

/// What a record holds, once [`read`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Record {
    /// An event, read into the caller's [`EventRef`].
    Event,
    /// A watermark mark: the partition's watermark rises to this.
    Mark(Millis),
}

/// Why a record cannot be read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unreadable(pub String);

impl fmt::Display for Unreadable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The record of a validated event at `timestamp`.
pub fn encode(event: &EventRef<'_>, timestamp: Millis) -> Vec<u8> {
    let id = event.event_id.as_deref().unwrap_or_default();
    let (dimensions, values) = (&event.dimensions, &event.values);
    let bytes = id.len()
        + event.event_type.len()
        + dimensions
            .iter()
            .map(|(k, v)| k.len() + v.len())
            .sum::<usize>()
        + values.iter().map(|(k, _)| k.len()).sum::<usize>();
    let count = 2 + 2 * dimensions.len() + values.len();
    let mut out = Vec::with_capacity(13 + 5 * count + 8 * values.len() + bytes);
    out.extend_from_slice(&[MAGIC, VERSION, EVENT]);
    out.extend_from_slice(&timestamp.to_le_bytes());
    put_varint(&mut out, dimensions.len());
    put_varint(&mut out, values.len());
    put_varint(&mut out, id.len());
    put_varint(&mut out, event.event_type.len());
    for (name, value) in dimensions {
        put_varint(&mut out, name.len());
        put_varint(&mut out, value.len());
    }
    for (name, _) in values {
        put_varint(&mut out, name.len());
    }
    for (_, value) in values {
        out.extend_from_slice(&value.to_le_bytes());
    }
    out.extend_from_slice(id.as_bytes());
    out.extend_from_slice(event.event_type.as_bytes());
    for (name, value) in dimensions {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(value.as_bytes());
    }
    for (name, _) in values {
        out.extend_from_slice(name.as_bytes());
    }
    out
}

/// The record of a watermark mark, which raises its partition's
/// watermark to `watermark` when it is read.
pub fn mark(watermark: Millis) -> Vec<u8> {
    let mut out = vec![MAGIC, VERSION, MARK];
    out.extend_from_slice(&watermark.to_le_bytes());
    out
}

/// Appends `record` to `batch`, which it starts if it is empty.
pub fn push_to_batch(batch: &mut Vec<u8>, record: &[u8]) {
    if batch.is_empty() {
        batch.extend_from_slice(&[MAGIC, VERSION, BATCH]);
    }
    put_varint(batch, record.len());
    batch.extend_from_slice(record);
}

/// The size a batch of `records` bytes in `count` records takes at most.
pub fn batch_len(count: usize, records: usize) -> usize {
    3 + 5 * count + records
}

/// The records of a batch, or `None` if `bytes` is not one. When its
/// framing is damaged, the rest of the batch is one last record, which
/// [`read`] refuses.
pub fn unbatch(bytes: &[u8]) -> Option<Vec<&[u8]>> {
    let mut r = Reader(bytes.strip_prefix(&[MAGIC, VERSION, BATCH])?);
    let mut records = Vec::new();
    while !r.0.is_empty() {
        let rest = r.0;
        match r.varint().and_then(|n| r.bytes(n)) {
            Ok(record) => records.push(record),
            Err(_) => {
                records.push(rest);
                break;
            }
        }
    }
    Some(records)
}

/// Reads `bytes`: an event into `event`, whose vectors it reuses, or a
/// mark. A record in the JSON of an earlier log is read as well.
pub fn read<'a>(bytes: &'a [u8], event: &mut EventRef<'a>) -> Result<Record, Unreadable> {
    let Some((&MAGIC, rest)) = bytes.split_first() else {
        return read_json(bytes, event);
    };
    let mut r = Reader(rest);
    match r.byte()? {
        VERSION => {}
        v => {
            return Err(Unreadable(format!(
                "record format version {v}, which this tally does not read (it reads {VERSION}); run a newer tally"
            )))
        }
    }
    let record = match r.byte()? {
        EVENT => {
            event.timestamp = Some(r.i64()?);
            read_event(&mut r, event)?;
            Record::Event
        }
        MARK => Record::Mark(r.i64()?),
        BATCH => return Err(Unreadable("a batch where a record belongs".into())),
        kind => return Err(Unreadable(format!("unknown record kind {kind}"))),
    };
    if !r.0.is_empty() {
        return Err(Unreadable(format!(
            "trailing bytes after its end: {}",
            r.0.len()
        )));
    }
    Ok(record)
}

/// Reads the rest of an event's record.
fn read_event<'a>(r: &mut Reader<'a>, event: &mut EventRef<'a>) -> Result<(), Unreadable> {
    let (dimensions, values) = (r.varint()?, r.varint()?);
    // Each length takes a byte at least: this bounds the counts by the record.
    let count = 2usize
        .checked_add(2 * dimensions + values)
        .filter(|&n| n <= r.0.len())
        .ok_or_else(|| Unreadable("more fields than it has bytes".into()))?;
    let start = r.0;
    let mut total = 0usize;
    for _ in 0..count {
        total = total.saturating_add(r.varint()?);
    }
    let mut lengths = Reader(&start[..start.len() - r.0.len()]);
    let numbers = r.bytes(8 * values)?;
    let strings = std::str::from_utf8(r.bytes(total)?)
        .map_err(|_| Unreadable("a string that is not UTF-8".into()))?;
    let mut at = 0;
    let mut next = || -> Result<&'a str, Unreadable> {
        let len = lengths.varint()?;
        let s = strings
            .get(at..at + len)
            .ok_or_else(|| Unreadable("a string cut inside a character".into()))?;
        at += len;
        Ok(s)
    };
    let id = next()?;
    event.event_id = (!id.is_empty()).then_some(Cow::Borrowed(id));
    event.event_type = Cow::Borrowed(next()?);
    if event.event_type.is_empty() {
        return Err(Unreadable("empty eventType".into()));
    }
    event.dimensions.clear();
    for _ in 0..dimensions {
        event
            .dimensions
            .push((Cow::Borrowed(next()?), Cow::Borrowed(next()?)));
    }
    event.values.clear();
    for number in numbers.chunks_exact(8) {
        let name = next()?;
        let value = f64::from_le_bytes(number.try_into().expect("8 bytes"));
        if !(value.is_finite() && value.abs() <= MAX_VALUE) {
            return Err(Unreadable(format!(
                "values.{name}: {value} is out of range"
            )));
        }
        event.values.push((Cow::Borrowed(name), value));
    }
    Ok(())
}

/// Reads a record of an earlier log: the event's JSON, or a mark's.
fn read_json<'a>(json: &'a [u8], event: &mut EventRef<'a>) -> Result<Record, Unreadable> {
    if let Some(to) = json_mark(json) {
        return Ok(Record::Mark(to));
    }
    *event = parse_event_ref(json).map_err(|errors| {
        Unreadable(
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; "),
        )
    })?;
    match event.timestamp {
        // The gateway gives every event a time; this one is damaged.
        None => Err(Unreadable("no timestamp".into())),
        Some(_) => Ok(Record::Event),
    }
}

/// The watermark of a mark in the JSON of an earlier log.
fn json_mark(record: &[u8]) -> Option<Millis> {
    let digits = record
        .strip_prefix(b"{\"tally.watermark\":")?
        .strip_suffix(b"}")?;
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The record as canonical JSON: what users see of it in dead letters, the
/// raw-event archive and `tally log dump`. A mark is
/// `{"tally.watermark": W}`; an unreadable record is returned as it is.
pub fn to_json(bytes: &[u8]) -> Cow<'_, [u8]> {
    if bytes.first() != Some(&MAGIC) {
        return Cow::Borrowed(bytes);
    }
    let mut event = EventRef::default();
    match read(bytes, &mut event) {
        Ok(Record::Event) => event_json(bytes, &event),
        Ok(Record::Mark(to)) => Cow::Owned(format!("{{\"tally.watermark\":{to}}}").into_bytes()),
        Err(_) => Cow::Borrowed(bytes),
    }
}

/// The canonical JSON of the event record `bytes`, which [`read`] has read
/// into `event`, as [`to_json`] gives it without reading the record again.
pub fn event_json<'b>(bytes: &'b [u8], event: &EventRef) -> Cow<'b, [u8]> {
    if bytes.first() == Some(&MAGIC) {
        Cow::Owned(event.to_json(0))
    } else {
        Cow::Borrowed(bytes)
    }
}

impl Event {
    /// The event's log record.
    pub fn to_record(&self) -> Vec<u8> {
        let event = EventRef {
            event_id: self.event_id.as_deref().map(Cow::Borrowed),
            event_type: Cow::Borrowed(&self.event_type),
            timestamp: Some(self.timestamp),
            dimensions: self
                .dimensions
                .iter()
                .map(|(k, v)| (Cow::Borrowed(k.as_str()), Cow::Borrowed(v.as_str())))
                .collect(),
            values: self
                .values
                .iter()
                .map(|(k, v)| (Cow::Borrowed(k.as_str()), *v))
                .collect(),
        };
        encode(&event, self.timestamp)
    }
}

fn put_varint(out: &mut Vec<u8>, n: usize) {
    let mut n = u32::try_from(n).expect("the gateway bounds every length far below 4 GiB");
    while n >= 0x80 {
        out.push(n as u8 | 0x80);
        n >>= 7;
    }
    out.push(n as u8);
}

/// The bytes of a record not yet read.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn bytes(&mut self, n: usize) -> Result<&'a [u8], Unreadable> {
        if self.0.len() < n {
            return Err(Unreadable("cut short".into()));
        }
        let (taken, rest) = self.0.split_at(n);
        self.0 = rest;
        Ok(taken)
    }

    fn take<const N: usize>(&mut self) -> Result<[u8; N], Unreadable> {
        Ok(self.bytes(N)?.try_into().expect("N bytes"))
    }

    fn byte(&mut self) -> Result<u8, Unreadable> {
        Ok(self.take::<1>()?[0])
    }

    fn i64(&mut self) -> Result<i64, Unreadable> {
        Ok(i64::from_le_bytes(self.take()?))
    }

    /// A length: one byte for most, which is read inline.
    #[inline]
    fn varint(&mut self) -> Result<usize, Unreadable> {
        match self.0.split_first() {
            Some((&b, rest)) if b < 0x80 => {
                self.0 = rest;
                Ok(usize::from(b))
            }
            _ => self.long_varint(),
        }
    }

    fn long_varint(&mut self) -> Result<usize, Unreadable> {
        let mut n = 0u64;
        for (i, &b) in self.0.iter().take(5).enumerate() {
            n |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                self.0 = &self.0[i + 1..];
                return u32::try_from(n)
                    .map(|n| n as usize)
                    .map_err(|_| Unreadable("a length past 32 bits".into()));
            }
        }
        Err(Unreadable(if self.0.len() < 5 {
            "cut short".into()
        } else {
            "a length past 32 bits".into()
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::tests::{parse_event, SEED};

    fn event_of(record: &[u8]) -> Result<Event, Unreadable> {
        let mut event = EventRef::default();
        assert_eq!(read(record, &mut event)?, Record::Event);
        Ok(event.to_owned(0))
    }

    #[test]
    fn an_event_reads_back_as_it_was_validated() {
        let event = parse_event(SEED.as_bytes(), 0).unwrap();
        assert_eq!(event_of(&event.to_record()).unwrap(), event);
        let bare = parse_event(br#"{"eventType":"x","timestamp":5}"#, 0).unwrap();
        assert_eq!(event_of(&bare.to_record()).unwrap(), bare);
    }

    #[test]
    fn the_format_is_pinned() {
        let event = parse_event_ref(
            br#"{"eventId":"i","eventType":"t","timestamp":1000,"dimensions":{"k":"v"},"values":{"n":1.5}}"#,
        )
        .unwrap();
        let mut expected = vec![0xC1, 1, 0];
        expected.extend_from_slice(&1000i64.to_le_bytes());
        expected.extend_from_slice(b"\x01\x01\x01\x01\x01\x01\x01");
        expected.extend_from_slice(&1.5f64.to_le_bytes());
        expected.extend_from_slice(b"itkvn");
        assert_eq!(encode(&event, 1000), expected);
        let mut mark_bytes = vec![0xC1, 1, 1];
        mark_bytes.extend_from_slice(&(-7i64).to_le_bytes());
        assert_eq!(mark(-7), mark_bytes);
        assert_eq!(
            read(&mark_bytes, &mut EventRef::default()),
            Ok(Record::Mark(-7))
        );
    }

    #[test]
    fn a_long_string_takes_a_longer_length() {
        let mut event = parse_event(SEED.as_bytes(), 0).unwrap();
        event.dimensions.insert("long".into(), "x".repeat(70_000));
        assert_eq!(event_of(&event.to_record()).unwrap(), event);
    }

    #[test]
    fn an_earlier_logs_json_is_read() {
        let event = event_of(SEED.as_bytes()).unwrap();
        assert_eq!(event, parse_event(SEED.as_bytes(), 0).unwrap());
        let mut reused = EventRef::default();
        assert_eq!(
            read(br#"{"tally.watermark":90000}"#, &mut reused),
            Ok(Record::Mark(90_000))
        );
        assert_eq!(
            read(br#"{"eventType":"x"}"#, &mut reused),
            Err(Unreadable("no timestamp".into()))
        );
        assert!(read(b"not json", &mut reused).is_err());
    }

    #[test]
    fn damaged_records_are_refused_with_their_fault() {
        let record = parse_event(SEED.as_bytes(), 0).unwrap().to_record();
        let fault = |bytes: &[u8]| read(bytes, &mut EventRef::default()).unwrap_err().0;
        for cut in 1..record.len() {
            assert!(
                read(&record[..cut], &mut EventRef::default()).is_err(),
                "cut at {cut}"
            );
        }
        assert!(fault(&[0xC1, 2, 0]).contains("version 2"));
        assert_eq!(fault(&[0xC1, 1, 9]), "unknown record kind 9");
        let mut longer = record.clone();
        longer.push(0);
        assert_eq!(fault(&longer), "trailing bytes after its end: 1");
        let mut not_utf8 = mark(0);
        not_utf8[2] = EVENT;
        not_utf8.extend_from_slice(b"\x00\x00\x00\x01\xff");
        assert_eq!(fault(&not_utf8), "a string that is not UTF-8");
        let mut split = mark(0);
        split[2] = EVENT;
        split.extend_from_slice("\x00\x00\x01\x01é".as_bytes());
        assert_eq!(fault(&split), "a string cut inside a character");
        let mut many = mark(0);
        many[2] = EVENT;
        many.extend_from_slice(b"\xe8\x07\x00\x01\x01");
        assert_eq!(fault(&many), "more fields than it has bytes");
        let mut nan = mark(0);
        nan[2] = EVENT;
        nan.extend_from_slice(b"\x00\x01\x00\x01\x01");
        nan.extend_from_slice(&f64::NAN.to_le_bytes());
        nan.extend_from_slice(b"tn");
        assert!(fault(&nan).starts_with("values.n:"), "{}", fault(&nan));
        let mut huge = mark(0);
        huge[2] = EVENT;
        huge.extend_from_slice(b"\x00\xff\xff\xff\xff\x7f");
        assert_eq!(fault(&huge), "a length past 32 bits");
    }

    #[test]
    fn a_batch_frames_its_records() {
        let records = [mark(1), vec![0; 200], Vec::new(), mark(2)];
        let mut batch = Vec::new();
        for r in &records {
            push_to_batch(&mut batch, r);
        }
        assert!(batch.len() <= batch_len(4, 211));
        assert_eq!(
            unbatch(&batch).unwrap(),
            records.iter().map(Vec::as_slice).collect::<Vec<_>>()
        );
        assert_eq!(unbatch(b"{}"), None);
        let cut = &batch[..batch.len() - 3];
        let damaged = unbatch(cut).unwrap();
        assert_eq!(damaged.len(), 4);
        assert!(read(damaged[3], &mut EventRef::default()).is_err());
    }

    #[test]
    fn records_are_shown_as_canonical_json() {
        let event = parse_event(SEED.as_bytes(), 0).unwrap();
        assert_eq!(to_json(&event.to_record()), event.to_json());
        assert_eq!(&*to_json(&mark(5)), br#"{"tally.watermark":5}"#);
        assert_eq!(&*to_json(SEED.as_bytes()), SEED.as_bytes());
    }
}
