//! The whole job: source, exchange, windows, and the three sinks.
//!
//! ```text
//! log partitions ─▶ LogSource ─┬─▶ Cap ─▶ Windows (both exchanged by shard) ─┬─▶ finals  ─▶ store
//!                              │                                            └─▶ all     ─▶ live bus
//!                              └─▶ dead letters ────────────────────────────────────────▶ dead-letter sink
//! ```

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

use timely::dataflow::operators::core::{Filter, OkErr};
use timely::dataflow::{Scope, Stream};

use crate::cap::Overflowed;
use crate::checkpoint::{Progress, Restore, Schedule};
use crate::config::{Config, MetricSpec};
use crate::coordination::Coordination;
use crate::model::{Contribution, DeadLetter, WindowUpdate};
use crate::operators::cap::Cap;
use crate::operators::deliver::Deliver;
use crate::operators::gossip;
use crate::operators::source::{log_source, SourceSettings};
use crate::operators::windows::{Checkpointing, WindowSettings, Windows};
use crate::ports::{BatchSource, CheckpointSink, Sink};
use crate::rollup;
use crate::stats::JobStats;

/// Everything the job needs to know, taken from the configuration.
#[derive(Clone, Debug)]
pub struct JobSettings {
    /// The metrics to compute, in configuration order; the job also
    /// computes their rollups ([`rollup::expand`]), whose results the store
    /// sink gets after theirs.
    pub metrics: Vec<MetricSpec>,
    /// Event-time rules of the source.
    pub source: SourceSettings,
    /// Timing rules of the window operator.
    pub windows: WindowSettings,
    /// Processes the job runs in; with more than one, they share their
    /// high watermarks and backpressure (see [`crate::operators::gossip`]).
    pub processes: usize,
}

impl JobSettings {
    /// Takes the job's settings from a loaded configuration.
    pub fn from_config(config: &Config) -> JobSettings {
        JobSettings {
            metrics: config.metrics.clone(),
            source: SourceSettings {
                out_of_orderness: config.dataflow.out_of_orderness,
                idle_timeout: config.dataflow.idle_timeout,
                allowed_lateness: config.dataflow.allowed_lateness,
                dedupe_horizon: config.dedupe.horizon,
            },
            windows: WindowSettings {
                allowed_lateness: config.dataflow.allowed_lateness,
                live_interval: config.live.interval,
            },
            processes: 1,
        }
    }
}

/// The sinks of one worker.
pub struct Sinks<St, Li, De> {
    /// Receives final window values and revisions; may push back.
    pub store: St,
    /// Receives partial and final values; best effort, drops when full.
    pub live: Li,
    /// Receives events too late to count.
    pub dead_letters: De,
}

/// Where a worker's checkpoint parts go, and which boundaries to take.
pub type CheckpointTarget = (Arc<Schedule>, Box<dyn CheckpointSink>);

/// The streams the job hands to its sinks, for a caller that also wants to
/// observe them (the tests capture them).
pub struct Outputs<'scope> {
    /// Every window update: partials, finals and revisions.
    pub updates: Stream<'scope, u64, Vec<Arc<WindowUpdate>>>,
    /// Events too late to count.
    pub dead_letters: Stream<'scope, u64, Vec<DeadLetter>>,
}

/// Builds the job in `scope`, reading from `input` and writing to `sinks`.
/// `coordination` is shared by all the workers of the process.
///
/// The job resumes from `restore`, with `input` positioned at its offsets,
/// and takes checkpoints into `checkpoints` if given.
#[allow(clippy::too_many_arguments)]
pub fn build<'scope, S, St, Li, De>(
    scope: Scope<'scope, u64>,
    input: S,
    settings: &JobSettings,
    stats: Arc<JobStats>,
    sinks: Sinks<St, Li, De>,
    coordination: &Coordination,
    restore: Restore,
    checkpoints: Option<CheckpointTarget>,
) -> Outputs<'scope>
where
    S: BatchSource,
    St: Sink<Arc<WindowUpdate>>,
    Li: Sink<Arc<WindowUpdate>>,
    De: Sink<DeadLetter>,
{
    // The configured metrics keep their indices; their rollups follow.
    let metrics = Rc::new(rollup::expand(&settings.metrics));
    let configured = settings.metrics.len();
    let progress = Rc::new(RefCell::new(Progress::new(&restore.cuts)));
    let partitions = input.partitions();
    if settings.processes > 1 {
        gossip::share(scope, coordination.clone());
    }
    let tick = crate::window::tick(
        metrics.iter().map(|m| m.pane),
        settings.windows.allowed_lateness,
        checkpoints
            .as_ref()
            .map(|(schedule, _)| schedule.interval()),
    );
    let records = log_source(
        scope,
        input,
        Rc::clone(&metrics),
        settings.source.clone(),
        tick,
        Arc::clone(&stats),
        coordination.clone(),
        &restore,
        Rc::clone(&progress),
    );
    let (contributions, dead) =
        records.ok_err::<Vec<Contribution>, _, Vec<DeadLetter>, _, _>(|r| r);
    let overflowed = Rc::new(RefCell::new(Overflowed::new()));
    let capped = contributions.cap(
        Rc::clone(&metrics),
        settings.windows.allowed_lateness,
        &restore.groups,
        Arc::clone(&stats),
        Rc::clone(&overflowed),
    );
    let checkpointing = Checkpointing {
        progress,
        partitions,
        resume: (restore.boundary, restore.groups),
        target: checkpoints,
    };
    let updates = capped.windows(
        metrics,
        settings.windows.clone(),
        stats,
        checkpointing,
        overflowed,
        coordination.backpressure.clone(),
    );
    let backpressure = &coordination.backpressure;
    updates
        .clone()
        .filter(move |u: &Arc<WindowUpdate>| (u.metric as usize) < configured)
        .deliver("LiveSink", sinks.live, backpressure);
    updates
        .clone()
        .filter(|u: &Arc<WindowUpdate>| u.is_final)
        .deliver("StoreSink", sinks.store, backpressure);
    dead.clone()
        .deliver("DeadLetterSink", sinks.dead_letters, backpressure);
    Outputs {
        updates,
        dead_letters: dead,
    }
}

#[cfg(test)]
mod tests {
    //! The job's semantics on small, hand-checked inputs: windows, panes,
    //! watermarks, late revisions and dead letters.

    use std::collections::{BTreeMap, BTreeSet, VecDeque};
    use std::sync::Mutex;
    use std::time::Duration;

    use timely::dataflow::operators::capture::Extract;
    use timely::dataflow::operators::vec::Map;
    use timely::dataflow::operators::Capture;

    use super::*;
    use crate::aggregate::AggregateKind;
    use crate::checkpoint::WorkerPart;
    use crate::event::record;
    use crate::operators::source::FOLD_RECORDS;
    use crate::ports::{Poll, SourceBatch, Waker};
    use crate::time::Millis;
    use crate::window::WindowSpec;

    /// A bounded source: one batch per poll, then the end.
    struct VecSource {
        batches: VecDeque<SourceBatch>,
        waker: Option<Waker>,
        /// Says it is behind after every batch, as a source that took its
        /// fill does, even when no more comes: the source operator must
        /// send what it holds when the input ends.
        behind: bool,
    }

    impl VecSource {
        fn new(batches: VecDeque<SourceBatch>) -> VecSource {
            VecSource {
                batches,
                waker: None,
                behind: false,
            }
        }

        fn behind(batches: VecDeque<SourceBatch>) -> VecSource {
            VecSource {
                behind: true,
                ..VecSource::new(batches)
            }
        }
    }

    impl BatchSource for VecSource {
        fn partitions(&self) -> Vec<u32> {
            let mut p: Vec<u32> = self.batches.iter().map(|b| b.partition).collect();
            p.sort_unstable();
            p.dedup();
            p
        }
        fn start(&mut self, waker: Waker) {
            self.waker = Some(waker);
        }
        fn poll(&mut self) -> Poll {
            match self.batches.pop_front() {
                None => Poll::Finished,
                Some(batch) => {
                    if let Some(wake) = &self.waker {
                        wake();
                    }
                    if self.behind {
                        Poll::Behind(vec![batch])
                    } else {
                        Poll::Ready(vec![batch])
                    }
                }
            }
        }
        /// The batches are the whole log; a test writes its marks itself.
        fn mark(&mut self, _partition: u32, _watermark: Millis) {}
    }

    fn event(seconds: i64) -> Vec<u8> {
        event_in(seconds, "US")
    }

    fn event_in(seconds: i64, country: &str) -> Vec<u8> {
        record_of(
            serde_json::json!({"eventType": "ad_click", "timestamp": seconds, "dimensions": {"country": country}}),
        )
    }

    /// The record of the event `json`, whose timestamp is in seconds (it
    /// may be before 1970, which the gateway refuses).
    fn record_of(json: serde_json::Value) -> Vec<u8> {
        let mut event: crate::event::Event = serde_json::from_value(json).unwrap();
        event.timestamp *= 1000;
        event.to_record()
    }

    fn batches(times: &[&[i64]]) -> VecDeque<SourceBatch> {
        log(times
            .iter()
            .map(|ts| ts.iter().map(|&t| event(t)).collect()))
    }

    /// Partition 0 of a log holding these batches of records, in order.
    fn log(batches: impl IntoIterator<Item = Vec<Vec<u8>>>) -> VecDeque<SourceBatch> {
        let mut offset = 0;
        batches
            .into_iter()
            .map(|records| {
                let batch = SourceBatch {
                    partition: 0,
                    offset,
                    next_offset: offset + records.len() as u64,
                    records,
                    appended_at: None,
                };
                offset = batch.next_offset;
                batch
            })
            .collect()
    }

    /// What the store holds after taking `finals`, by group: per (table,
    /// window, start, group), the highest revision and its count.
    fn stored_groups<'a>(
        finals: impl IntoIterator<Item = &'a Emitted>,
    ) -> BTreeMap<(u16, u8, i64, String), (u32, u64)> {
        let mut table = BTreeMap::new();
        for (metric, window, start, _, group, count, revision) in finals {
            let key = (*metric, *window, *start, group.clone());
            let row = table.entry(key).or_insert((*revision, *count));
            if *revision >= row.0 {
                *row = (*revision, *count);
            }
        }
        table
    }

    fn settings() -> JobSettings {
        let windows = ["tumbling 10s", "sliding 30s every 10s"]
            .map(|w| WindowSpec::parse(w).unwrap())
            .to_vec();
        JobSettings {
            metrics: vec![MetricSpec {
                name: "ad_clicks".into(),
                event_type: Some("ad_click".into()),
                aggregate: AggregateKind::Count,
                field: None,
                dimensions: vec!["country".into()],
                pane: crate::window::pane_width(&windows),
                windows,
                keep: Vec::new(),
                // The total, and a minute's rollup of each: tables made
                // from the batch and in the window state, which a restore
                // must also go on with.
                rollups: vec![(WindowSpec::parse("tumbling 1m").unwrap(), None)],
                projections: vec![Vec::new()],
                rollup_of: None,
                max_groups: crate::config::DEFAULT_MAX_GROUPS,
            }],
            source: SourceSettings {
                out_of_orderness: 2_000,
                idle_timeout: std::time::Duration::from_secs(60),
                allowed_lateness: 30_000,
                dedupe_horizon: crate::config::DEFAULT_DEDUPE_HORIZON,
            },
            windows: WindowSettings {
                allowed_lateness: 30_000,
                live_interval: std::time::Duration::from_secs(3600),
            },
            processes: 1,
        }
    }

    /// ((table, window), start s, end s, count, revision) for each final,
    /// and the offsets of the dead letters.
    type Finals = Vec<Final>;
    type Final = ((u16, u8), i64, i64, u64, u32);
    /// Finals with the time they were emitted at.
    type Timed = Vec<(u64, Final)>;

    /// A checkpoint sink that keeps parts in memory.
    #[derive(Clone, Default)]
    struct Parts(Arc<Mutex<Vec<WorkerPart>>>);

    impl CheckpointSink for Parts {
        fn submit(&mut self, part: WorkerPart) {
            self.0.lock().unwrap().push(part);
        }
    }

    /// A sink that takes everything: the tests read the job's outputs.
    struct Discard;

    impl<T: 'static> Sink<T> for Discard {
        fn offer(&mut self, items: &mut Vec<T>) {
            items.clear();
        }
    }

    /// Runs the job from `restore` over `input`, taking a checkpoint at
    /// every 10 s boundary into `parts`.
    fn run_from(input: VecSource, restore: Restore, parts: Parts) -> (Timed, Vec<u64>) {
        let (finals, dead) = run_with(settings(), input, restore, parts);
        let timed = finals
            .into_iter()
            .map(|(time, (metric, window, start, end, _, count, revision))| {
                let f = ((metric, window), start / 1000, end / 1000, count, revision);
                (time, f)
            })
            .collect();
        (timed, dead)
    }

    /// A final as captured: table, window, start, end, group (its values
    /// joined by '/'), count, revision.
    type Emitted = (u16, u8, i64, i64, String, u64, u32);

    /// Runs the job with `settings`: the finals with the time they were
    /// emitted at, and the offsets of the dead letters.
    fn run_with(
        settings: JobSettings,
        source: VecSource,
        restore: Restore,
        parts: Parts,
    ) -> (Vec<(u64, Emitted)>, Vec<u64>) {
        let (updates, dead) = timely::example(move |scope| {
            let schedule = Arc::new(Schedule::new(
                Duration::from_secs(10),
                Duration::ZERO,
                restore.boundary,
            ));
            let sinks = Sinks {
                store: Discard,
                live: Discard,
                dead_letters: Discard,
            };
            let outputs = build(
                scope,
                source,
                &settings,
                Arc::new(JobStats::new(1)),
                sinks,
                &Coordination::default(),
                restore,
                Some((schedule, Box::new(parts))),
            );
            let finals = outputs
                .updates
                .filter(|u: &Arc<WindowUpdate>| u.is_final)
                .map(|u| {
                    (
                        u.metric,
                        u.window,
                        u.span.start,
                        u.span.end,
                        u.group.join("/"),
                        u.state.count,
                        u.revision,
                    )
                })
                .capture();
            (finals, outputs.dead_letters.map(|d| d.offset).capture())
        });
        let timed = updates
            .extract()
            .into_iter()
            .flat_map(|(time, data)| data.into_iter().map(move |f| (time, f)))
            .collect();
        (
            timed,
            dead.extract()
                .into_iter()
                .flat_map(|(_, data)| data)
                .collect(),
        )
    }

    fn run(input: VecDeque<SourceBatch>) -> (Finals, Vec<u64>) {
        let (timed, dead) = run_from(VecSource::new(input), Restore::default(), Parts::default());
        let mut finals: Finals = timed.into_iter().map(|(_, f)| f).collect();
        finals.sort_by_key(|&(w, start, _, _, rev)| (w, start, rev));
        (finals, dead)
    }

    /// The batches of `input` from offset `offset` on: what a restore reads.
    fn from_offset(input: &VecDeque<SourceBatch>, offset: u64) -> VecDeque<SourceBatch> {
        input
            .iter()
            .filter(|b| b.offset >= offset)
            .cloned()
            .collect()
    }

    /// What the store holds after taking `finals` in order: per window, the
    /// value of the highest revision.
    fn store(finals: impl IntoIterator<Item = Final>) -> BTreeMap<((u16, u8), i64), (u32, u64)> {
        let mut table = BTreeMap::new();
        for (w, start, _, count, revision) in finals {
            let row = table.entry((w, start)).or_insert((revision, count));
            if revision > row.0 {
                *row = (revision, count);
            }
        }
        table
    }

    /// Two minutes of events, out of order within a batch, with late ones
    /// (within the lateness) and too-late ones mixed in.
    fn two_minutes() -> VecDeque<SourceBatch> {
        let times: Vec<Vec<i64>> = (0..40)
            .map(|i| {
                let t = i * 3;
                let mut batch = vec![t + 2, t, t + 1];
                if i % 2 == 1 {
                    batch.push(t - 15);
                }
                if i % 11 == 5 {
                    batch.push(t - 60);
                }
                batch
            })
            .collect();
        let refs: Vec<&[i64]> = times.iter().map(Vec::as_slice).collect();
        batches(&refs)
    }

    /// Asserts that restoring each checkpoint in `parts` and reading
    /// `input` on from its cut stores what the run without failure stored
    /// (`full`, `full_dead`), and returns what that is.
    fn assert_restores(
        input: &VecDeque<SourceBatch>,
        (full, full_dead): &(Timed, Vec<u64>),
        parts: Vec<WorkerPart>,
    ) -> BTreeMap<((u16, u8), i64), (u32, u64)> {
        let expected = store(full.iter().map(|&(_, f)| f));
        for part in parts {
            let resume_at = part.cuts[0].next_offset;
            let rest = from_offset(input, resume_at);
            assert!(
                input.iter().any(|b| b.offset == resume_at) || rest.is_empty(),
                "cuts fall between batches"
            );
            let restore = Restore {
                boundary: part.boundary,
                cuts: part.cuts,
                groups: part.groups,
            };
            let (after, dead_after) = run_from(VecSource::new(rest), restore, Parts::default());
            // What the sinks held at the checkpoint, then what the restored
            // run emits on top of it.
            let before = full
                .iter()
                .filter(|(time, _)| *time < part.boundary)
                .map(|&(_, f)| f);
            let stored = store(before.chain(after.into_iter().map(|(_, f)| f)));
            assert_eq!(stored, expected, "restored at boundary {}", part.boundary);
            let mut dead: Vec<u64> = full_dead
                .iter()
                .copied()
                .filter(|&o| o < resume_at)
                .chain(dead_after)
                .collect();
            dead.sort_unstable();
            assert_eq!(
                &dead, full_dead,
                "dead letters restored at boundary {}",
                part.boundary
            );
        }
        expected
    }

    #[test]
    fn restoring_any_checkpoint_stores_what_a_run_without_failure_stores() {
        let input = two_minutes();
        let parts = Parts::default();
        let full = run_from(
            VecSource::new(input.clone()),
            Restore::default(),
            parts.clone(),
        );
        let parts = parts.0.lock().unwrap().clone();
        assert!(parts.len() >= 8, "{} checkpoints", parts.len());
        assert!(!full.1.is_empty(), "the input has too-late events");
        let expected = assert_restores(&input, &full, parts);
        assert!(
            expected.values().any(|&(revision, _)| revision > 1),
            "the input revises windows more than once"
        );
        assert!(
            expected
                .iter()
                .any(|(((table, _), _), &(revision, _))| *table == 3 && revision > 0),
            "the minute's rollup of the total takes late data"
        );
    }

    /// The contributions the source makes of `source`'s batches: per
    /// (time, table, pane), how many and their events.
    fn contributions(source: VecSource) -> BTreeMap<(u64, u16, Millis), (usize, u64)> {
        let captured = timely::example(move |scope| {
            let settings = settings();
            let metrics = rollup::expand(&settings.metrics);
            let tick = crate::window::tick(
                metrics.iter().map(|m| m.pane),
                settings.windows.allowed_lateness,
                None,
            );
            let stream = crate::operators::source::log_source(
                scope,
                source,
                Rc::new(metrics),
                settings.source.clone(),
                tick,
                Arc::new(JobStats::new(1)),
                Coordination::default(),
                &Restore::default(),
                Rc::new(RefCell::new(Progress::new(&[]))),
            );
            stream
                .map(|r| r.ok().map(|c| (c.metric, c.pane, c.state.count)))
                .capture()
        });
        let mut made = BTreeMap::new();
        for (time, records) in captured.extract() {
            for (metric, pane, count) in records.into_iter().flatten() {
                let entry = made.entry((time, metric, pane)).or_insert((0, 0));
                *entry = (entry.0 + 1, entry.1 + count);
            }
        }
        made
    }

    #[test]
    fn a_source_behind_folds_its_polls_together_and_stores_the_same() {
        let input = two_minutes();
        // Folded a poll at a time, and while behind, a few polls at once:
        // the same events at the same times, in fewer contributions.
        let each = contributions(VecSource::new(input.clone()));
        let together = contributions(VecSource::behind(input.clone()));
        let events = |made: &BTreeMap<_, (usize, u64)>| {
            made.iter()
                .map(|(k, &(_, events))| (*k, events))
                .collect::<Vec<_>>()
        };
        assert_eq!(events(&together), events(&each));
        let count =
            |made: &BTreeMap<_, (usize, u64)>| made.values().map(|&(n, _)| n).sum::<usize>();
        assert!(
            count(&together) < count(&each),
            "{} contributions behind, {} a poll at a time",
            count(&together),
            count(&each)
        );

        let (ready, mut ready_dead) = run_from(
            VecSource::new(input.clone()),
            Restore::default(),
            Parts::default(),
        );
        let parts = Parts::default();
        let behind = run_from(
            VecSource::behind(input.clone()),
            Restore::default(),
            parts.clone(),
        );
        ready_dead.sort_unstable();
        let mut behind_dead = behind.1.clone();
        behind_dead.sort_unstable();
        assert_eq!(behind_dead, ready_dead);
        let parts = parts.0.lock().unwrap().clone();
        assert!(!parts.is_empty(), "the run behind takes checkpoints");
        let expected = assert_restores(&input, &behind, parts);
        assert_eq!(expected, store(ready.into_iter().map(|(_, f)| f)));
    }

    #[test]
    fn a_backlog_is_sent_a_fold_at_a_time() {
        // More than a fold's records, all of one time after the first
        // batch, and read as a backlog: held, but not to the end.
        let batches = FOLD_RECORDS / 1000 + 2;
        let input = log((0..batches).map(|_| (0..1000).map(|_| event(10)).collect()));
        let made = contributions(VecSource::behind(input));
        let events: u64 = made
            .iter()
            .filter(|((_, table, _), _)| *table == 0)
            .map(|(_, &(_, events))| events)
            .sum();
        assert_eq!(events, batches as u64 * 1000);
        let busiest = made.values().map(|&(n, _)| n).max().unwrap();
        assert!(busiest >= 2, "{made:?}");
    }

    #[test]
    fn a_capped_metric_counts_every_event_and_restores_to_the_same_groups() {
        // A cap of one group per shard, and two minutes of events from 600
        // countries, a few late ones among them.
        let mut settings = settings();
        settings.metrics[0].max_groups = 1;
        let input = log((0..40i64).map(|i| {
            (0..30i64)
                .map(|k| {
                    let late = if k == 0 && i >= 10 { 15 } else { 0 };
                    event_in(
                        i * 3 + k % 3 - late,
                        &format!("c{}", (i * 37 + k * 11) % 600),
                    )
                })
                .collect()
        }));
        let parts = Parts::default();
        let (full, dead) = run_with(
            settings.clone(),
            VecSource::new(input.clone()),
            Restore::default(),
            parts.clone(),
        );
        let expected = stored_groups(full.iter().map(|(_, f)| f));
        assert!(dead.is_empty());
        // Every event counts: in its group, or in the overflow group.
        let counted = |table: u16| -> u64 {
            expected
                .iter()
                .filter(|(k, _)| k.0 == table && k.1 == 0)
                .map(|(_, (_, count))| count)
                .sum()
        };
        assert_eq!(counted(0), 1200);
        assert_eq!(counted(2), 1200, "the minute's rollup by country");
        let groups = |table: u16| -> BTreeSet<&str> {
            expected
                .keys()
                .filter(|k| k.0 == table)
                .map(|k| k.3.as_str())
                .collect()
        };
        assert!(groups(0).contains(crate::cap::OVERFLOW));
        assert!(
            groups(0).len() <= crate::routing::SHARDS * 3,
            "{}",
            groups(0).len()
        );
        assert_eq!(groups(1).len(), 1, "the total has one group");
        let parts = parts.0.lock().unwrap().clone();
        assert!(parts.len() >= 8, "{} checkpoints", parts.len());
        for part in parts {
            let rest = from_offset(&input, part.cuts[0].next_offset);
            let boundary = part.boundary;
            let restore = Restore {
                boundary,
                cuts: part.cuts,
                groups: part.groups,
            };
            let (after, _) = run_with(
                settings.clone(),
                VecSource::new(rest),
                restore,
                Parts::default(),
            );
            let before = full.iter().filter(|(time, _)| *time < boundary);
            let stored = stored_groups(before.chain(&after).map(|(_, f)| f));
            assert_eq!(stored, expected, "restored at boundary {boundary}");
        }
    }

    #[test]
    fn repeats_of_an_id_count_once_also_after_a_restore() {
        // Two minutes of batches, 3 s apart, with ids remembered for 20 s.
        let mut settings = settings();
        settings.source.dedupe_horizon = 20_000;
        let event = |id: String, seconds: i64, country: &str| {
            record_of(
                serde_json::json!({"eventId": id, "eventType": "ad_click", "timestamp": seconds,
                "dimensions": {"country": country}}),
            )
        };
        let fresh = |i: i64, k: i64| event(format!("e{i}-{k}"), i * 3 + k % 3, "US");
        // Per batch, in order: a retried request (batch i - 4 again, 9 s
        // late), the batch's own events, and an id of its own again, with
        // other content. Only the own events count, and, every tenth
        // batch, an id from 27 s before, past the horizon, late.
        let batch = |i: i64, with_repeats: bool| -> Vec<Vec<u8>> {
            let mut records = Vec::new();
            if with_repeats && i >= 4 {
                records.extend((0..5).map(|k| fresh(i - 4, k)));
            }
            records.extend((0..5).map(|k| fresh(i, k)));
            if with_repeats && i % 7 == 3 {
                records.push(event(format!("e{i}-1"), i * 3, "FR"));
            }
            if i % 10 == 9 && i >= 10 {
                records.push(fresh(i - 10, 0));
            }
            records
        };
        let with_repeats = |repeats: bool| log((0..40).map(|i| batch(i, repeats)));
        let store = |finals: &[(u64, Emitted)]| stored_groups(finals.iter().map(|(_, f)| f));
        let (input, parts) = (with_repeats(true), Parts::default());
        let (full, dead) = run_with(
            settings.clone(),
            VecSource::new(input.clone()),
            Restore::default(),
            parts.clone(),
        );
        let (clean, clean_dead) = run_with(
            settings.clone(),
            VecSource::new(with_repeats(false)),
            Restore::default(),
            Parts::default(),
        );
        let expected = store(&clean);
        assert_eq!(store(&full), expected);
        assert_eq!(dead.len(), clean_dead.len());
        let counted: u64 = expected
            .iter()
            .filter(|(k, _)| k.0 == 0 && k.1 == 0)
            .map(|(_, (_, count))| count)
            .sum();
        assert_eq!(counted, 200 + 3, "every first occurrence, once");
        assert!(expected.values().any(|&(revision, _)| revision > 0));
        let parts = parts.0.lock().unwrap().clone();
        assert!(parts.len() >= 8, "{} checkpoints", parts.len());
        let cut = &parts[3].cuts[0];
        assert!(
            cut.dedupe_from.is_some_and(|from| from < cut.next_offset),
            "a restore reads ids before its cut again: {cut:?}"
        );
        for part in parts {
            let cut = &part.cuts[0];
            let from = cut.next_offset.min(cut.dedupe_from.unwrap_or(u64::MAX));
            let rest = from_offset(&input, from);
            let boundary = part.boundary;
            let restore = Restore {
                boundary,
                cuts: part.cuts,
                groups: part.groups,
            };
            let (after, _) = run_with(
                settings.clone(),
                VecSource::new(rest),
                restore,
                Parts::default(),
            );
            let before = full.iter().filter(|(time, _)| *time < boundary).cloned();
            let stored = store(&before.chain(after).collect::<Vec<_>>());
            assert_eq!(stored, expected, "restored at boundary {boundary}");
        }
    }

    #[test]
    fn windows_close_on_the_watermark_and_late_events_revise_them() {
        // Batch by batch: the watermark before each batch is the newest time
        // of the batches before it, minus the 2 s out-of-orderness.
        let (finals, dead) = run(batches(&[
            &[1, 5, 12], // travels at 0; watermark becomes 10 s
            &[25],       // at 10 s: closes [0,10); watermark 23 s
            &[8],        // at 23 s: late for [0,10) and [-10,20), within the lateness
            &[40],       // at 23 s; watermark 38 s
            &[1],        // at 38 s: 37 s late, past the 30 s allowed: dead letter
        ]));
        let tumbling: Vec<_> = finals
            .iter()
            .filter(|f| f.0 == (0, 0))
            .map(|f| (f.1, f.3, f.4))
            .collect();
        assert_eq!(
            tumbling,
            [(0, 2, 0), (0, 3, 1), (10, 1, 0), (20, 1, 0), (40, 1, 0)]
        );
        let sliding: Vec<_> = finals
            .iter()
            .filter(|f| f.0 == (0, 1))
            .map(|f| (f.1, f.2, f.3, f.4))
            .collect();
        assert_eq!(
            sliding,
            [
                (-20, 10, 2, 0),
                (-20, 10, 3, 1),
                (-10, 20, 3, 0),
                (-10, 20, 4, 1),
                (0, 30, 5, 0),
                (10, 40, 2, 0),
                (20, 50, 2, 0),
                (30, 60, 1, 0),
                (40, 70, 1, 0),
            ]
        );
        assert_eq!(dead, [6]);
    }

    #[test]
    fn a_mark_in_the_log_moves_the_watermark_as_an_event_would() {
        // A mark raises the watermark to 60 s: the event after it is
        // judged against that, a dead letter past the lateness, and the
        // events after it travel at 60 s.
        let (finals, dead) = run(log([
            vec![event(1), event(12)],
            vec![event(15)],
            vec![record::mark(60_000)],
            vec![event(20)],
            // A mark among events, as the log's writer may merge them.
            vec![event(61), record::mark(90_000), event(62)],
        ]));
        assert!(finals.contains(&((0, 0), 10, 20, 2, 0)), "{finals:?}");
        assert_eq!(dead, [4], "20 s is 40 s behind the marked watermark");
        assert!(finals.contains(&((0, 0), 60, 70, 2, 0)), "{finals:?}");
    }

    /// A log written before the record format holds each event's JSON,
    /// and marks as JSON too; it is read as its records would be.
    #[test]
    fn a_log_of_json_stores_what_its_records_do() {
        let times: [&[i64]; 4] = [&[1, 5, 12], &[14, 3, 30], &[], &[31, 8, 44]];
        let log_of = |json: bool| {
            let mut batches: Vec<Vec<Vec<u8>>> = times
                .iter()
                .map(|ts| {
                    ts.iter()
                        .map(|&t| {
                            let sent = serde_json::json!({"eventId": format!("e{t}"),
                                "eventType": "ad_click", "timestamp": t,
                                "dimensions": {"country": if t % 2 == 0 { "US" } else { "DE" }}});
                            if json {
                                sent.to_string().into_bytes()
                            } else {
                                record_of(sent)
                            }
                        })
                        .collect()
                })
                .collect();
            batches[2] = vec![if json {
                b"{\"tally.watermark\":60000}".to_vec()
            } else {
                record::mark(60_000)
            }];
            log(batches)
        };
        let (records, json) = (run(log_of(false)), run(log_of(true)));
        assert_eq!(records, json);
        assert!(
            !records.0.is_empty() && !records.1.is_empty(),
            "{records:?}"
        );
    }

    #[test]
    fn order_inside_a_batch_does_not_matter() {
        let forward = run(batches(&[&[1, 5, 12, 14], &[30]]));
        let backward = run(batches(&[&[14, 12, 5, 1], &[30]]));
        assert_eq!(forward, backward);
        assert!(forward.1.is_empty());
    }

    #[test]
    fn a_window_that_closed_empty_takes_late_data_as_a_revision() {
        let (finals, _) = run(batches(&[&[30], &[5]]));
        // [0,10) had no data when the watermark (28 s) passed it; the late
        // event makes it a correction of an empty window.
        assert!(finals.contains(&((0, 0), 0, 10, 1, 1)));
    }

    #[test]
    fn an_event_from_a_fast_clock_does_not_drag_the_watermark() {
        // The first batch holds an event stamped 290 s after the log took
        // it; the others are on time.
        let mut input = batches(&[&[300], &[11, 12], &[25]]);
        for (batch, appended_s) in input.iter_mut().zip([10, 12, 26]) {
            batch.appended_at = Some(appended_s * 1000);
        }
        let (finals, dead) = run(input);
        assert_eq!(dead, [] as [u64; 0], "on-time events were dead-lettered");
        assert!(finals.contains(&((0, 0), 10, 20, 2, 0)), "{finals:?}");
        // The early event is kept at its own time.
        assert!(finals.contains(&((0, 0), 300, 310, 1, 0)), "{finals:?}");
    }
}
