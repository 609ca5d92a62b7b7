//! The record batch format: encoding, and decoding with every check that
//! recovery and readers rely on.
//!
//! ```text
//! [magic u8 = 1][len u32][crc32 u32][base_offset u64][append_time_ms i64][count u32]
//! count × [len u32][bytes]
//! ```

use std::io::{self, Read};

/// The first byte of every batch.
const MAGIC: u8 = 1;
/// The bytes before the checksummed part: magic, length and CRC.
const PREFIX_LEN: usize = 9;
/// The fixed fields at the start of the checksummed part: base offset,
/// append time and record count.
const FIXED_LEN: usize = 20;
/// The bytes read before the records.
const HEADER_LEN: usize = PREFIX_LEN + FIXED_LEN;

/// The fixed part of a batch.
#[derive(Debug, Clone, Copy)]
pub(super) struct Header {
    /// The length of everything after the CRC.
    len: u32,
    crc: u32,
    /// The offset of the first record.
    pub base_offset: u64,
    /// When the writer appended the batch, in Unix milliseconds.
    pub append_time_ms: i64,
    /// The number of records.
    pub count: u32,
}

impl Header {
    /// The size of the whole batch on disk.
    pub fn batch_len(&self) -> u64 {
        PREFIX_LEN as u64 + u64::from(self.len)
    }

    /// The offset after the batch's last record.
    pub fn end_offset(&self) -> u64 {
        self.base_offset + u64::from(self.count)
    }

    /// The bytes between the header and the end of the batch.
    pub fn records_len(&self) -> u64 {
        u64::from(self.len) - FIXED_LEN as u64
    }
}

/// Why bytes could not be decoded as a batch.
#[derive(Debug)]
pub(super) enum DecodeError {
    /// The bytes are not a valid batch; the reason says which check failed.
    Invalid(&'static str),
    /// Reading failed for a reason other than running out of bytes.
    Io(io::Error),
}

impl From<io::Error> for DecodeError {
    fn from(error: io::Error) -> Self {
        if error.kind() == io::ErrorKind::UnexpectedEof {
            DecodeError::Invalid("short read")
        } else {
            DecodeError::Io(error)
        }
    }
}

/// The encoded size of a batch of `records`, or `None` if its length would
/// not fit the `u32` length field.
pub(super) fn batch_len(records: &[Vec<u8>]) -> Option<usize> {
    let body = records
        .iter()
        .try_fold(FIXED_LEN, |sum, record| sum.checked_add(4 + record.len()))?;
    u32::try_from(body).ok()?;
    Some(PREFIX_LEN + body)
}

/// The encoded size of one batch holding the records of two batches of
/// sizes `a` and `b`, or `None` if it would not fit the `u32` length field.
pub(super) fn merged_len(a: usize, b: usize) -> Option<usize> {
    let merged = a.checked_add(b)? - HEADER_LEN;
    u32::try_from(merged - PREFIX_LEN).ok()?;
    Some(merged)
}

/// Encodes a batch into `buf`, replacing its contents. The caller has checked
/// [`batch_len`], so every length fits its field.
pub(super) fn encode(
    buf: &mut Vec<u8>,
    base_offset: u64,
    append_time_ms: i64,
    records: &[Vec<u8>],
) {
    buf.clear();
    buf.push(MAGIC);
    buf.extend_from_slice(&[0; 8]); // The length and CRC, filled in below.
    buf.extend_from_slice(&base_offset.to_le_bytes());
    buf.extend_from_slice(&append_time_ms.to_le_bytes());
    buf.extend_from_slice(&(records.len() as u32).to_le_bytes());
    for record in records {
        buf.extend_from_slice(&(record.len() as u32).to_le_bytes());
        buf.extend_from_slice(record);
    }
    let len = (buf.len() - PREFIX_LEN) as u32;
    let crc = crc32fast::hash(&buf[PREFIX_LEN..]);
    buf[1..5].copy_from_slice(&len.to_le_bytes());
    buf[5..9].copy_from_slice(&crc.to_le_bytes());
}

/// Reads the next batch header, given that only `available` bytes remain.
/// It checks the magic byte and that the length fits, not the CRC.
pub(super) fn read_header(reader: &mut impl Read, available: u64) -> Result<Header, DecodeError> {
    let mut bytes = [0; HEADER_LEN];
    reader.read_exact(&mut bytes)?;
    parse_header(&bytes, available)
}

/// Reads and fully checks the next batch, given that only `available` bytes
/// remain, and returns its header and records.
pub(super) fn read_batch(
    reader: &mut impl Read,
    available: u64,
) -> Result<(Header, Vec<Vec<u8>>), DecodeError> {
    let mut head = [0; HEADER_LEN];
    reader.read_exact(&mut head)?;
    let header = parse_header(&head, available)?;
    // The length was checked against `available`, so this allocation is
    // bounded by the file, never by a garbled length.
    let mut body = vec![0; header.records_len() as usize];
    reader.read_exact(&mut body)?;

    let mut crc = crc32fast::Hasher::new();
    crc.update(&head[PREFIX_LEN..]);
    crc.update(&body);
    if crc.finalize() != header.crc {
        return Err(DecodeError::Invalid("crc mismatch"));
    }
    let records = split_records(&body, header.count)?;
    Ok((header, records))
}

/// Parses and checks the fixed fields.
fn parse_header(bytes: &[u8; HEADER_LEN], available: u64) -> Result<Header, DecodeError> {
    if bytes[0] != MAGIC {
        return Err(DecodeError::Invalid("bad magic byte"));
    }
    let header = Header {
        len: u32::from_le_bytes(field(bytes, 1)),
        crc: u32::from_le_bytes(field(bytes, 5)),
        base_offset: u64::from_le_bytes(field(bytes, 9)),
        append_time_ms: i64::from_le_bytes(field(bytes, 17)),
        count: u32::from_le_bytes(field(bytes, 25)),
    };
    if (header.len as usize) < FIXED_LEN {
        return Err(DecodeError::Invalid("length shorter than the header"));
    }
    if header.batch_len() > available {
        return Err(DecodeError::Invalid("length past the end"));
    }
    Ok(header)
}

/// Copies the `N` bytes at `at` out of a header.
fn field<const N: usize>(bytes: &[u8; HEADER_LEN], at: usize) -> [u8; N] {
    let mut out = [0; N];
    out.copy_from_slice(&bytes[at..at + N]);
    out
}

/// Splits the record section of a batch into its `count` records.
fn split_records(mut body: &[u8], count: u32) -> Result<Vec<Vec<u8>>, DecodeError> {
    // Each record takes at least four bytes, which bounds the allocation.
    let mut records = Vec::with_capacity((count as usize).min(body.len() / 4));
    for _ in 0..count {
        let (len, rest) = body
            .split_first_chunk::<4>()
            .ok_or(DecodeError::Invalid("record length past the batch"))?;
        let len = u32::from_le_bytes(*len) as usize;
        if rest.len() < len {
            return Err(DecodeError::Invalid("record past the batch"));
        }
        let (record, rest) = rest.split_at(len);
        records.push(record.to_vec());
        body = rest;
    }
    if !body.is_empty() {
        return Err(DecodeError::Invalid("bytes after the last record"));
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn encoded(records: &[Vec<u8>]) -> Vec<u8> {
        let mut buf = Vec::new();
        encode(&mut buf, 42, 1_700_000_000_000, records);
        buf
    }

    #[test]
    fn round_trips() {
        let records = vec![b"a".to_vec(), Vec::new(), b"hello".to_vec()];
        let buf = encoded(&records);
        assert_eq!(Some(buf.len()), batch_len(&records));

        let (header, decoded) = read_batch(&mut &buf[..], buf.len() as u64).unwrap();
        assert_eq!(decoded, records);
        assert_eq!(header.base_offset, 42);
        assert_eq!(header.end_offset(), 45);
        assert_eq!(header.append_time_ms, 1_700_000_000_000);
        assert_eq!(header.batch_len(), buf.len() as u64);
    }

    #[test]
    fn rejects_damage() {
        let buf = encoded(&[b"some record".to_vec()]);
        let len = buf.len() as u64;
        let invalid = |bytes: &[u8], available: u64| match read_batch(&mut &bytes[..], available) {
            Err(DecodeError::Invalid(reason)) => reason,
            other => panic!("expected an invalid batch, got {other:?}"),
        };

        assert_eq!(invalid(&buf[..buf.len() - 1], len), "short read");
        assert_eq!(invalid(&buf, len - 1), "length past the end");

        let mut flipped = buf.clone();
        flipped[HEADER_LEN + 6] ^= 0x40;
        assert_eq!(invalid(&flipped, len), "crc mismatch");

        let mut magic = buf;
        magic[0] = 0;
        assert_eq!(invalid(&magic, len), "bad magic byte");
    }
}
