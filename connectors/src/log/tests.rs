//! End-to-end tests of the event log on a temporary directory.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tally_dataflow::config::{Fsync, LogConfig};
use tally_dataflow::time::now_ms;

use super::*;

/// A config with tiny segments, so a few appends roll several of them.
fn config(partitions: u32) -> LogConfig {
    LogConfig {
        segment_bytes: 200,
        ..LogConfig::new(partitions)
    }
}

/// Appends from a test thread.
fn append(log: &EventLog, partition: u32, records: &[&str]) -> u64 {
    let records = records
        .iter()
        .map(|record| record.as_bytes().to_vec())
        .collect();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(log.append(partition, records)).unwrap()
}

/// Every record of a partition from `from`, as `(offset, text)`, skipping
/// the records of the first batch below `from`.
fn read_from(log: &EventLog, partition: u32, from: u64) -> Vec<(u64, String)> {
    let mut reader = log.reader(partition, from).unwrap();
    let mut out = Vec::new();
    loop {
        let batches = reader.poll(100).unwrap();
        if batches.is_empty() {
            break;
        }
        for batch in batches {
            assert_eq!(batch.partition, partition);
            for (offset, record) in (batch.base_offset..).zip(batch.records) {
                if offset >= from {
                    out.push((offset, String::from_utf8(record).unwrap()));
                }
            }
        }
    }
    assert_eq!(reader.position(), log.next_offsets()[partition as usize]);
    out
}

/// The segment files of a partition, oldest first.
fn segments(dir: &Path, partition: u32) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir.join(partition.to_string()))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    files.sort();
    files
}

#[test]
fn round_trip_across_partitions_and_rolls() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), &config(3)).unwrap();
    let mut expected: HashMap<u32, Vec<(u64, String)>> = HashMap::new();

    for i in 0..60u32 {
        let partition = i % 3;
        let records: Vec<String> = (0..=i % 3).map(|j| format!("event {i}.{j}")).collect();
        let texts: Vec<&str> = records.iter().map(String::as_str).collect();
        let base = append(&log, partition, &texts);
        let sent = expected.entry(partition).or_default();
        assert_eq!(base, sent.len() as u64, "offsets continue per partition");
        sent.extend((base..).zip(records));
    }

    for partition in 0..3 {
        assert!(
            segments(dir.path(), partition).len() > 3,
            "small segments roll"
        );
        assert_eq!(read_from(&log, partition, 0), expected[&partition]);
    }
    let ends: Vec<u64> = (0..3)
        .map(|partition| expected[&partition].len() as u64)
        .collect();
    assert_eq!(log.next_offsets(), ends);
    assert!(log.size_bytes() > 0);

    // Partition 1 got batches of two records, so offset 5 sits inside the
    // batch starting at 4, and the reader starts there.
    let mut reader = log.reader(1, 5).unwrap();
    assert_eq!(reader.position(), 4);
    assert_eq!(reader.poll(1).unwrap()[0].base_offset, 4);
    assert_eq!(read_from(&log, 1, 5), expected[&1][5..]);
    log.close().unwrap();
}

#[test]
fn reader_follows_new_appends() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), &config(1)).unwrap();
    let mut reader = log.reader(0, 0).unwrap();
    assert!(reader.poll(1024).unwrap().is_empty());

    let writer = log.clone();
    let appender = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(50));
        append(&writer, 0, &["late"])
    });
    log.wait_for_append(Duration::from_secs(10));
    assert_eq!(appender.join().unwrap(), 0);

    let batches = reader.poll(1024).unwrap();
    assert_eq!(batches.len(), 1);
    assert_eq!(batches[0].records, vec![b"late".to_vec()]);
    assert_eq!(reader.position(), 1);
}

#[test]
fn reopen_continues_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), &config(2)).unwrap();
    for i in 0..10 {
        append(&log, 0, &["a", "b"]);
        append(&log, 1, &[&format!("c{i}")]);
    }
    log.close().unwrap();

    let log = EventLog::open(dir.path(), &config(2)).unwrap();
    assert_eq!(log.next_offsets(), vec![20, 10]);
    assert_eq!(append(&log, 0, &["d"]), 20);
    assert_eq!(append(&log, 1, &["e"]), 10);
    let records = read_from(&log, 1, 0);
    assert_eq!(records.len(), 11);
    assert_eq!(records[10], (10, "e".to_owned()));
}

#[test]
fn interval_policy_acknowledges_writes_and_syncs_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let interval = LogConfig {
        fsync: Fsync::Interval(Duration::from_millis(5)),
        ..config(1)
    };
    let log = EventLog::open(dir.path(), &interval).unwrap();
    for i in 0..10 {
        assert_eq!(append(&log, 0, &[&format!("r{i}")]), i);
        std::thread::sleep(Duration::from_millis(1));
    }
    log.close().unwrap();

    let log = EventLog::open(dir.path(), &interval).unwrap();
    assert_eq!(read_from(&log, 0, 0).len(), 10);
}

/// Appends three batches to partition 0, closes the log, lets `damage`
/// change the last segment, and reopens.
fn reopen_after_damage(damage: impl FnOnce(&Path, u64)) -> (tempfile::TempDir, EventLog) {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), &LogConfig::new(1)).unwrap();
    append(&log, 0, &["one"]);
    append(&log, 0, &["two", "three"]);
    let before_last = log.size_bytes();
    append(&log, 0, &["four", "five"]);
    log.close().unwrap();

    let segment = segments(dir.path(), 0).pop().unwrap();
    damage(&segment, before_last);
    let log = EventLog::open(dir.path(), &LogConfig::new(1)).unwrap();
    assert_eq!(log.next_offsets(), vec![3], "the last batch is cut");
    assert_eq!(fs::metadata(&segment).unwrap().len(), before_last);
    (dir, log)
}

/// Checks that the first two batches survived and appends continue.
fn assert_survivors_and_continue(log: &EventLog) {
    let expected = [(0, "one"), (1, "two"), (2, "three")];
    let expected: Vec<_> = expected
        .iter()
        .map(|&(offset, text)| (offset, text.to_owned()))
        .collect();
    assert_eq!(read_from(log, 0, 0), expected);
    assert_eq!(append(log, 0, &["six"]), 3);
    assert_eq!(read_from(log, 0, 3), vec![(3, "six".to_owned())]);
}

#[test]
fn torn_tail_is_cut() {
    let (_dir, log) = reopen_after_damage(|segment, _| {
        let file = OpenOptions::new().write(true).open(segment).unwrap();
        let len = file.metadata().unwrap().len();
        file.set_len(len - 3).unwrap();
    });
    assert_survivors_and_continue(&log);
}

#[test]
fn garbled_length_past_eof_is_cut() {
    let (_dir, log) = reopen_after_damage(|segment, last_start| {
        let mut bytes = fs::read(segment).unwrap();
        let len_field = last_start as usize + 1;
        bytes[len_field..len_field + 4].copy_from_slice(&u32::MAX.to_le_bytes());
        fs::write(segment, bytes).unwrap();
    });
    assert_survivors_and_continue(&log);
}

#[test]
fn flipped_byte_is_caught_by_crc() {
    let (_dir, log) = reopen_after_damage(|segment, last_start| {
        let mut bytes = fs::read(segment).unwrap();
        let middle = (last_start as usize + bytes.len()) / 2;
        bytes[middle] ^= 0x01;
        fs::write(segment, bytes).unwrap();
    });
    assert_survivors_and_continue(&log);
}

#[test]
fn retention_deletes_old_sealed_segments_only() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        retention: Duration::from_secs(60),
        ..config(2)
    };
    let log = EventLog::open(dir.path(), &config).unwrap();
    for i in 0..20 {
        append(&log, 0, &[&format!("record number {i}")]);
    }
    append(&log, 1, &["lonely"]);
    let segment_count = segments(dir.path(), 0).len();
    assert!(segment_count > 2);
    let mut reader = log.reader(0, 0).unwrap();

    assert_eq!(
        log.enforce_retention(now_ms()).unwrap(),
        0,
        "nothing is old yet"
    );
    let deleted = log.enforce_retention(now_ms() + 61_000).unwrap();
    assert_eq!(deleted, segment_count - 1, "all but the active segment");
    assert_eq!(segments(dir.path(), 0).len(), 1);
    assert_eq!(
        segments(dir.path(), 1).len(),
        1,
        "an active segment is never deleted"
    );
    assert_eq!(log.next_offsets(), vec![20, 1]);

    // The reader's segment is gone: it skips to what is left.
    let remaining = reader.poll(usize::MAX).unwrap();
    assert_eq!(remaining.last().unwrap().end_offset(), 20);
    assert!(remaining[0].base_offset > 0);
    assert_eq!(append(&log, 0, &["after"]), 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_with_fsync_always_get_contiguous_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let config = LogConfig {
        segment_bytes: 4096,
        ..LogConfig::new(2)
    };
    assert_eq!(config.fsync, Fsync::Always);
    let log = EventLog::open(dir.path(), &config).unwrap();

    let tasks: Vec<_> = (0..400u32)
        .map(|i| {
            let records = vec![format!("{i}").into_bytes(); 1 + i as usize % 3];
            let count = records.len() as u64;
            let append = log.append(i % 2, records);
            tokio::spawn(async move { (i % 2, append.await.unwrap(), count) })
        })
        .collect();
    let mut batches = Vec::new();
    for task in tasks {
        batches.push(task.await.unwrap());
    }

    batches.sort();
    for partition in 0..2 {
        let mut next = 0;
        for &(_, base, count) in batches.iter().filter(|batch| batch.0 == partition) {
            assert_eq!(base, next, "offsets are unique and contiguous");
            next += count;
        }
        assert_eq!(log.next_offsets()[partition as usize], next);
    }
    tokio::task::spawn_blocking(move || log.close())
        .await
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_committed_together_share_a_batch_per_partition() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), &config(2)).unwrap();
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let mine =
                move |p: u32| vec![format!("{i}/{p}").into_bytes(); 1 + (i + p) as usize % 3];
            let append = log.append_all(vec![(0, mine(0)), (1, mine(1))]);
            tokio::spawn(async move { (append.await.unwrap(), [mine(0), mine(1)]) })
        })
        .collect();
    let mut appended = Vec::new();
    for task in tasks {
        appended.push(task.await.unwrap());
    }
    for partition in 0..2u32 {
        let batches = log.reader(partition, 0).unwrap().poll(usize::MAX).unwrap();
        assert!(
            batches.len() < appended.len(),
            "appends of one group share a batch: {} batches",
            batches.len()
        );
        let records: Vec<Vec<u8>> = batches.into_iter().flat_map(|b| b.records).collect();
        for (offsets, mine) in &appended {
            let (at, mine) = (
                offsets[partition as usize] as usize,
                &mine[partition as usize],
            );
            assert_eq!(
                &records[at..at + mine.len()],
                &mine[..],
                "each append's records at its offset"
            );
        }
    }
    tokio::task::spawn_blocking(move || log.close())
        .await
        .unwrap()
        .unwrap();
}

#[test]
fn partition_count_mismatch_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    EventLog::open(dir.path(), &config(3))
        .unwrap()
        .close()
        .unwrap();
    match EventLog::open(dir.path(), &config(4)) {
        Err(LogError::PartitionCountMismatch {
            found: 3,
            configured: 4,
        }) => {}
        other => panic!("expected a mismatch, got {:?}", other.err()),
    }
}

#[test]
fn bad_appends_and_closed_log_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let log = EventLog::open(dir.path(), &config(1)).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    let error = runtime
        .block_on(log.append(1, vec![b"x".to_vec()]))
        .unwrap_err();
    assert!(matches!(error, LogError::PartitionOutOfRange(1)));
    let error = runtime.block_on(log.append(0, Vec::new())).unwrap_err();
    assert!(matches!(error, LogError::EmptyBatch));
    assert!(matches!(
        log.reader(0, 1),
        Err(LogError::OffsetOutOfRange { end: 0, .. })
    ));

    let other = log.clone();
    log.close().unwrap();
    let error = runtime
        .block_on(other.append(0, vec![b"x".to_vec()]))
        .unwrap_err();
    assert!(matches!(error, LogError::Closed));
}
