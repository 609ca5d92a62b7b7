//! Deduplication by `eventId`: which partition an identified event goes
//! to, and which of its repeats the source drops.
//!
//! A client that retries a request whose answer it lost sends the same
//! events again, with the same ids. Every gateway sends an event with an
//! id to the partition its id hashes to ([`IdKey::partition`]), so every
//! repeat of an id, from the same request, a retry, or another gateway, is
//! in one partition, and the source that reads it sees them in log order.
//! Within `dedupe.horizon` of event time the first counts and the others
//! are dropped ([`Remembered`]). Events without an id are never deduplicated.
//!
//! The decision is a function of the partition's log alone: an id is
//! remembered until the partition's watermark passes its latest occurrence's
//! time plus the horizon, and the partition's watermark depends on nothing
//! else. A checkpoint does not hold the ids; it names the first offset a
//! restore must read again to remember them ([`Remembered::from`]), and a
//! restore reads the log from there without counting, up to the cut.

use std::collections::VecDeque;

use hashbrown::HashTable;
use xxhash_rust::xxh3::xxh3_128;

use crate::time::Millis;

/// 96 bits of an id's 128-bit XXH3 hash: which partition the id goes to,
/// and what the source remembers of it. XXH3's output is fixed by its
/// specification, so every gateway and every build agree.
///
/// The chance that two of the ids remembered at once share a key is about
/// n² / 2⁹⁷: for the 60 million ids of ten minutes at 100,000 events a
/// second, one in 10¹³.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IdKey {
    high: u64,
    low: u32,
}

impl IdKey {
    /// The key of `id`.
    pub fn of(id: &str) -> IdKey {
        let hash = xxh3_128(id.as_bytes());
        IdKey {
            high: (hash >> 64) as u64,
            low: hash as u32,
        }
    }

    /// The partition, of `partitions`, that events with this id go to.
    pub fn partition(self, partitions: u32) -> u32 {
        // The high half times the count, shifted: a uniform pick without a
        // division.
        ((u128::from(self.high) * u128::from(partitions)) >> 64) as u32
    }
}

/// One remembered id: its key, and the second after the newest time it
/// was seen at.
struct Entry {
    high: u64,
    low: u32,
    until: u32,
}

/// The ids one partition's source remembers, and where they were read.
///
/// Each entry costs 16 bytes in a hash table kept between 7/16 and 7/8
/// full: 18 to 37 bytes an id.
pub struct Remembered {
    horizon: Millis,
    ids: HashTable<Entry>,
    /// (offset, newest time of an identified event) of the batches that
    /// may hold a remembered id, in log order.
    batches: VecDeque<(u64, Millis)>,
    /// The watermark of the last sweep.
    swept: Millis,
}

/// What the source does with an identified event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Seen {
    /// The first occurrence within the horizon: it counts.
    First,
    /// Its id was seen within the horizon: it is dropped.
    Repeat,
}

impl Remembered {
    /// Remembers ids for `horizon` of event time.
    pub fn new(horizon: Millis) -> Remembered {
        Remembered {
            horizon,
            ids: HashTable::new(),
            batches: VecDeque::new(),
            swept: Millis::MIN,
        }
    }

    /// Notes an event with key `key` and time `time`, read while the
    /// partition's watermark was `watermark`: whether its id was seen
    /// within the horizon. Either way the id is remembered from `time`,
    /// unless it already was from later.
    pub fn see(&mut self, key: IdKey, time: Millis, watermark: Millis) -> Seen {
        let until = seconds_after(time);
        let horizon = self.horizon;
        let live = |until: u32| Millis::from(until) * 1000 + horizon > watermark;
        let hash = key.high;
        match self
            .ids
            .find_mut(hash, |e| e.high == key.high && e.low == key.low)
        {
            Some(entry) => {
                let seen = if live(entry.until) {
                    Seen::Repeat
                } else {
                    Seen::First
                };
                entry.until = entry.until.max(until);
                seen
            }
            None => {
                self.ids.insert_unique(
                    hash,
                    Entry {
                        high: key.high,
                        low: key.low,
                        until,
                    },
                    |e| e.high,
                );
                Seen::First
            }
        }
    }

    /// Notes that the batch at `offset` held identified events, the newest
    /// at `newest`.
    pub fn read(&mut self, offset: u64, newest: Millis) {
        self.batches.push_back((offset, newest));
    }

    /// The first offset that holds an id still remembered once the
    /// partition's watermark is `watermark`, if any does. Forgets the ids
    /// and batches that watermark has passed, now and then.
    pub fn from(&mut self, watermark: Millis) -> Option<u64> {
        let horizon = self.horizon;
        while self.batches.front().is_some_and(|&(_, newest)| {
            seconds_after(newest) as Millis * 1000 + horizon <= watermark
        }) {
            self.batches.pop_front();
        }
        if watermark.saturating_sub(self.swept) >= horizon / 8 {
            self.ids
                .retain(|e| Millis::from(e.until) * 1000 + horizon > watermark);
            self.swept = watermark;
        }
        self.batches.front().map(|&(offset, _)| offset)
    }

    /// The ids remembered now, some of which may have passed the horizon.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.ids.len()
    }
}

/// The second after `time`, in Unix seconds: ids are remembered to the
/// second, so an entry's time fits in 32 bits.
fn seconds_after(time: Millis) -> u32 {
    (time.max(0) / 1000 + 1).min(Millis::from(u32::MAX)) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Millis = 60_000;

    #[test]
    fn the_key_and_partition_of_an_id_are_pinned() {
        // Gateways of different builds must send an id to one partition.
        let key = IdKey::of("evt_uuid_00981a");
        assert_eq!(
            (key.partition(8), key.partition(3), key.partition(1)),
            (2, 0, 0)
        );
        let spread: std::collections::BTreeSet<u32> = (0..200)
            .map(|i| IdKey::of(&format!("e{i}")).partition(8))
            .collect();
        assert_eq!(spread.len(), 8);
    }

    #[test]
    fn a_repeat_within_the_horizon_is_dropped_and_one_past_it_counts() {
        let mut ids = Remembered::new(10 * MINUTE);
        let (a, b) = (IdKey::of("a"), IdKey::of("b"));
        assert_eq!(ids.see(a, 1_000, 0), Seen::First);
        assert_eq!(ids.see(a, 1_000, 0), Seen::Repeat);
        assert_eq!(ids.see(b, 1_000, 0), Seen::First);
        // Remembered to the second after its time, plus the horizon.
        assert_eq!(ids.see(a, 1_000, 2_000 + 10 * MINUTE - 1), Seen::Repeat);
        assert_eq!(ids.see(b, 1_000, 2_000 + 10 * MINUTE), Seen::First);
        // A repeat with a later time keeps the id for longer.
        assert_eq!(ids.see(a, 5 * MINUTE, 5 * MINUTE), Seen::Repeat);
        assert_eq!(ids.see(a, 1_000, 12 * MINUTE), Seen::Repeat);
    }

    #[test]
    fn the_restore_offset_is_the_first_batch_with_a_live_id() {
        let mut ids = Remembered::new(10 * MINUTE);
        ids.read(0, MINUTE);
        ids.read(10, 30 * MINUTE);
        ids.read(20, 2 * MINUTE);
        assert_eq!(ids.from(0), Some(0));
        assert_eq!(ids.from(11 * MINUTE + 1_000), Some(10));
        // A later batch whose ids are gone stays behind an earlier live one.
        assert_eq!(ids.from(13 * MINUTE), Some(10));
        assert_eq!(ids.from(41 * MINUTE), None);
    }

    #[test]
    fn a_sweep_forgets_only_what_the_watermark_has_passed() {
        let mut ids = Remembered::new(10 * MINUTE);
        for i in 0..100 {
            ids.see(IdKey::of(&format!("old{i}")), 0, 0);
            ids.see(IdKey::of(&format!("new{i}")), 20 * MINUTE, 0);
        }
        ids.from(15 * MINUTE);
        assert_eq!(ids.len(), 100);
        assert_eq!(
            ids.see(IdKey::of("new7"), 20 * MINUTE, 15 * MINUTE),
            Seen::Repeat
        );
    }
}
