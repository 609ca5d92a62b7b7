//! The log source: reads a worker's partitions, stamps records with event-time
//! watermarks, and pre-aggregates each batch.
//!
//! Each partition has its own watermark: the largest event time seen in it,
//! minus `out_of_orderness`. An event counts toward that at most at the time
//! the log took it: a client whose clock runs ahead may store events in the
//! future (up to the gateway's `max_future`), but cannot drag the watermark
//! past the wall clock and turn everyone else's events into dead letters.
//! The log records when it took each batch, so this, too, is a function of
//! the log. A batch is stamped with its partition's watermark from
//! *before* the batch, so the order of events inside one batch never matters,
//! and the stamp depends only on the partition's content. That is what
//! makes results independent of the number of workers.
//!
//! A batch travels at its stamp rounded down to a multiple of the job's
//! tick ([`crate::window::tick`]): nothing downstream happens between two
//! multiples of it, so this changes no result, and the batches of one poll
//! that travel at the same time, whatever their partitions, are folded
//! together. The busier the job, the more a poll reads, and the fewer
//! contributions per event cross the exchange. While the input is behind
//! (a poll took its fill and more is waiting), the source goes on folding
//! the next polls' batches into the same contributions, holding its
//! capability, up to [`FOLD_RECORDS`] records or [`FOLD_WAIT`]: a backlog
//! is caught up with a quarter of the contributions, and a job that keeps
//! up sends each poll's at once.
//!
//! The source holds a capability at the least watermark of its partitions,
//! rounded down to a tick; that is timely's frontier, and windows close when
//! it passes their end.
//!
//! A partition without new events for `idle_timeout` must not hold the
//! frontier back, and once no partition of the job has had any for that
//! long, the frontier must move on with the wall clock, so that the last
//! windows close. Both are decisions by the wall clock, which a replay would
//! take otherwise, so the source does not act on them: it records them in
//! the log, as a watermark mark appended to the idle partition
//! ([`BatchSource::mark`]), and acts on the mark when it reads it, as on any
//! record. An idle partition is marked up to the least watermark of its
//! worker's busy partitions; when the worker has none, just past the
//! highest watermark any worker has reached with events, so that an idle
//! worker does not stall the others; and when the whole job is idle and
//! has a watermark, on from there as the wall clock moves: the highest
//! watermark plus the time since the job last read an event. For events
//! that arrive as they happen, that is the wall clock less
//! `out_of_orderness`; for events from the past, it moves no faster than
//! time, so a pause in sending them does not turn the next ones into dead
//! letters. So the stamps, and all that follows from them, are a function
//! of the log alone.
//!
//! An event whose `eventId` the partition's source remembers is a repeat,
//! and is dropped (see [`crate::dedupe`]). An event earlier than its
//! batch's stamp minus `allowed_lateness` can no longer reach window
//! state that is kept; it leaves as a [`DeadLetter`]. Every other event is
//! folded, with the others that travel at its time, into one
//! [`Contribution`] per (metric, group, pane), which is what crosses the
//! exchange.
//!
//! After a restore, a partition is read from the first offset that holds an
//! id the source remembered at the cut; the batches before the cut are read
//! for their ids alone.

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hashbrown::HashTable;
use rustc_hash::FxHashMap as HashMap;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::operators::generic::operator::source;
use timely::dataflow::operators::generic::OutputBuilderSession;
use timely::dataflow::operators::Capability;
use timely::dataflow::{Scope, Stream};

use crate::aggregate::AggState;
use crate::checkpoint::{Progress, Restore, Stood};
use crate::config::MetricSpec;
use crate::coordination::Coordination;
use crate::dedupe::{IdKey, Remembered, Seen};
use crate::event::record::{self, Record};
use crate::event::EventRef;
use crate::model::{Contribution, DeadLetter, Group};
use crate::ports::{BatchSource, Poll, SourceBatch, POLL_RECORDS};
use crate::rollup::{made, Made};
use crate::routing::group_hash_of;
use crate::stats::JobStats;
use crate::time::{now_ms, Millis};
use crate::window::align;

/// Event-time rules the source applies.
#[derive(Clone, Debug)]
pub struct SourceSettings {
    /// The watermark trails the newest event time by this much.
    pub out_of_orderness: Millis,
    /// A partition without events for this long is marked up to the
    /// others' watermark, or with every partition of the job so, to the
    /// wall clock.
    pub idle_timeout: Duration,
    /// Window state is kept this long after the window closes.
    pub allowed_lateness: Millis,
    /// Repeats of an `eventId` within this much event time are dropped;
    /// 0 counts them all.
    pub dedupe_horizon: Millis,
}

/// Per-partition watermark tracking.
struct PartitionClock {
    partition: u32,
    watermark: Option<u64>,
    /// The watermark its events alone have raised it to, marks aside.
    by_events: Option<u64>,
    /// When the partition last had events, or the source started.
    last_data: Instant,
    /// When the source last asked for a mark on it; a mark not yet read
    /// back is asked for again a step later.
    marked: Option<Instant>,
    /// The ids read, when the job deduplicates.
    ids: Option<Remembered>,
    /// Batches before this offset were counted before the restored cut:
    /// they are read again for their ids alone.
    counted_from: u64,
}

/// Either half of the source's output, split by the caller.
pub type SourceRecord = Result<Contribution, DeadLetter>;

/// Builds the source operator over `input`.
///
/// `coordination.backpressure` is raised by a sink that cannot keep up; the
/// source stops reading while it is up, which leaves the backlog in the log.
/// `coordination.high_watermark` is where an idle worker marks its partitions to.
///
/// The source resumes from `restore`: its partitions' watermarks, and its
/// capability at the checkpoint's boundary (`input` must already be
/// positioned at the restored offsets). It records in `progress` where
/// each batch leaves its partition, so checkpoints can name their offsets.
/// Batches travel at their stamps rounded down to a multiple of `tick`
/// ([`crate::window::tick`]).
#[allow(clippy::too_many_arguments)]
pub fn log_source<'scope, S: BatchSource>(
    scope: Scope<'scope, u64>,
    mut input: S,
    metrics: Rc<Vec<MetricSpec>>,
    settings: SourceSettings,
    tick: Millis,
    stats: Arc<JobStats>,
    coordination: Coordination,
    restore: &Restore,
    progress: Rc<RefCell<Progress>>,
) -> Stream<'scope, u64, Vec<SourceRecord>> {
    let boundary = restore.boundary;
    let cuts: HashMap<u32, (Option<u64>, u64)> = restore
        .cuts
        .iter()
        .map(|c| (c.partition, (c.watermark, c.next_offset)))
        .collect();
    let worker = scope.index();
    let mut shapes = Shapes::new(&metrics);
    let derived = Derived::new(&metrics, &mut shapes);
    let tick = tick.max(1) as u64;
    source(scope, "LogSource", move |capability, info| {
        let activator = scope.activator_for(Rc::clone(&info.address));
        let sync = scope.worker().sync_activator_for(info.address.to_vec());
        input.start(Arc::new(move || {
            // The worker may be gone at shutdown; nothing is lost by not waking it.
            let _ = sync.activate();
        }));
        let started = Instant::now();
        // A job that just started is not idle, whatever it restored.
        busy_now(&coordination);
        let mut clocks: Vec<PartitionClock> = input
            .partitions()
            .into_iter()
            .map(|partition| {
                let (watermark, counted_from) = cuts.get(&partition).copied().unwrap_or_default();
                PartitionClock {
                    partition,
                    watermark,
                    by_events: watermark,
                    last_data: started,
                    marked: None,
                    ids: (settings.dedupe_horizon > 0)
                        .then(|| Remembered::new(settings.dedupe_horizon)),
                    counted_from,
                }
            })
            .collect();
        let mut capability = Some(capability);
        if let Some(cap) = capability.as_mut() {
            cap.downgrade(&boundary);
        }
        let heartbeat = settings
            .idle_timeout
            .min(Duration::from_millis(100))
            .max(Duration::from_millis(1));
        if clocks.is_empty() {
            // A worker without partitions never produces data.
            capability = None;
        }
        let mut held = Held::default();
        move |output| {
            let Some(cap) = capability.as_mut() else {
                return;
            };
            if coordination.backpressure.stalled() {
                held.send(cap, output, &metrics, &derived);
                // Time spent waiting on a sink is not idleness: the backlog
                // is in the log, and must not be stamped as late when it moves.
                let now = Instant::now();
                for clock in &mut clocks {
                    clock.last_data = now;
                }
                busy_now(&coordination);
                activator.activate_after(Duration::from_millis(10));
                return;
            }
            let (batches, behind) = match input.poll() {
                Poll::Finished => {
                    held.send(cap, output, &metrics, &derived);
                    capability = None;
                    return;
                }
                Poll::Pending => (Vec::new(), false),
                Poll::Ready(batches) => (batches, false),
                Poll::Behind(batches) => (batches, true),
            };
            let now = Instant::now();
            let (mut dead, mut repeats, mut read, mut passed) = (0, 0, 0, 0);
            held.since.get_or_insert(now);
            for batch in batches {
                let Some(clock) = clocks.iter_mut().find(|c| c.partition == batch.partition) else {
                    continue;
                };
                let watermark = clock.watermark.unwrap_or(0) as Millis;
                if batch.offset < clock.counted_from {
                    clock.last_data = now;
                    if let Some(ids) = clock.ids.as_mut() {
                        remember(&batch, ids, watermark);
                    }
                    continue;
                }
                passed += batch.next_offset - batch.offset;
                held.records += batch.records.len();
                // Never below the capability: only a partition the restored
                // checkpoint did not know can be.
                let stamp = clock.watermark.unwrap_or(0).max(*cap.time());
                let time = (stamp / tick * tick).max(*cap.time());
                let (folding, dead_letters) = held.at(time);
                let folded = fold_batch(
                    &batch,
                    &metrics,
                    &shapes,
                    Judge {
                        watermark: stamp as Millis,
                        allowed_lateness: settings.allowed_lateness,
                        ids: clock.ids.as_mut().map(|ids| (ids, watermark)),
                    },
                    folding,
                    dead_letters,
                );
                dead += folded.dead;
                repeats += folded.repeats;
                read += folded.events;
                if folded.events > 0 {
                    clock.last_data = now;
                    busy_now(&coordination);
                }
                let by_events = folded
                    .newest
                    .map(|newest| (newest - settings.out_of_orderness).max(0) as u64);
                clock.by_events = clock.by_events.max(by_events);
                let mark = folded.mark.map(|w| w.max(0) as u64);
                clock.watermark = clock.watermark.max(by_events).max(mark);
                let dedupe_from = clock
                    .ids
                    .as_mut()
                    .and_then(|ids| ids.from(clock.watermark.unwrap_or(0) as Millis));
                progress.borrow_mut().record(
                    batch.partition,
                    time,
                    Stood {
                        next_offset: batch.next_offset,
                        watermark: clock.watermark,
                        dedupe_from,
                    },
                );
            }
            // A backlog is folded a few polls at a time (see `Held`).
            if !behind || held.full(now) {
                held.send(cap, output, &metrics, &derived);
            }
            for (counter, value) in [
                (&stats.events_read, read as u64),
                (&stats.positions_read, passed),
                (&stats.dead_letters, dead as u64),
                (&stats.duplicates, repeats as u64),
            ] {
                if value > 0 {
                    counter.fetch_add(value, Ordering::Relaxed);
                }
            }

            let own_max = clocks.iter().filter_map(|c| c.by_events).max().unwrap_or(0);
            coordination.high_watermark.raise(own_max);
            mark_idle(&mut clocks, &mut input, now, &settings, &coordination);
            let target = clocks
                .iter()
                .map(|c| c.watermark.unwrap_or(0))
                .min()
                .unwrap_or(0)
                .max(*cap.time());
            let to = target / tick * tick;
            // Held folds travel at times the capability must still hold.
            if to > *cap.time() && held.folds.is_empty() {
                cap.downgrade(&to);
            }
            stats.set_watermark(worker, target);
            activator.activate_after(heartbeat);
        }
    })
}

/// The most records the source folds together while its input is behind
/// ([`Poll::Behind`]): four polls' worth. The larger a fold, the fewer
/// contributions per event cross the exchange (a busy group is met once per
/// fold, not once per poll), but the window operator sees nothing of a fold
/// until it is sent.
pub(crate) const FOLD_RECORDS: usize = 4 * POLL_RECORDS;

/// The longest the source holds a fold while its input is behind, so that
/// a slow job still shows a backlog's progress: at most half of the
/// default live interval.
const FOLD_WAIT: Duration = Duration::from_millis(50);

/// The batches folded and not sent yet, by the time they travel at: one
/// poll's, or while the input is behind, several polls' (see
/// [`FOLD_RECORDS`]). While the watermarks stay within one tick, that is
/// one fold.
#[derive(Default)]
struct Held {
    folds: Vec<(u64, Folding, Vec<DeadLetter>)>,
    /// The records of the batches held.
    records: usize,
    /// When the first of them was polled.
    since: Option<Instant>,
}

impl Held {
    /// The fold of `time`, made if there is none.
    fn at(&mut self, time: u64) -> (&mut Folding, &mut Vec<DeadLetter>) {
        let at = match self.folds.iter().position(|(t, ..)| *t == time) {
            Some(at) => at,
            None => {
                self.folds.push((time, Folding::default(), Vec::new()));
                self.folds.len() - 1
            }
        };
        let (_, folding, dead_letters) = &mut self.folds[at];
        (folding, dead_letters)
    }

    /// Whether the folds are as large, or as old, as a fold may be.
    fn full(&self, now: Instant) -> bool {
        self.records >= FOLD_RECORDS
            || self
                .since
                .is_some_and(|since| now.duration_since(since) >= FOLD_WAIT)
    }

    /// Sends every fold, at its time.
    fn send(
        &mut self,
        cap: &Capability<u64>,
        output: &mut OutputBuilderSession<'_, u64, CapacityContainerBuilder<Vec<SourceRecord>>>,
        metrics: &[MetricSpec],
        derived: &Derived,
    ) {
        for (time, folding, dead_letters) in self.folds.drain(..) {
            let contributions = folding.finish(metrics, derived);
            if dead_letters.is_empty() && contributions.is_empty() {
                continue;
            }
            let records = dead_letters
                .into_iter()
                .map(Err)
                .chain(contributions.into_iter().map(Ok));
            output.session(&cap.delayed(&time)).give_iterator(records);
        }
        self.records = 0;
        self.since = None;
    }
}

/// Notes that the job read events, or had to wait for a sink, now: it is
/// not idle.
fn busy_now(coordination: &Coordination) {
    coordination.last_data.raise(now_ms().max(0) as u64);
}

/// Asks for a mark on each partition that has been idle for the timeout,
/// if that moves it, at most once per fifth of the timeout: the busy
/// partitions move on, and an idle one follows them in steps that short
/// (see the module's documentation).
fn mark_idle<S: BatchSource>(
    clocks: &mut [PartitionClock],
    input: &mut S,
    now: Instant,
    settings: &SourceSettings,
    coordination: &Coordination,
) {
    let timeout = settings.idle_timeout;
    let idle = |c: &PartitionClock| now.duration_since(c.last_data) >= timeout;
    let busy_min = clocks
        .iter()
        .filter(|c| !idle(c))
        .map(|c| c.watermark.unwrap_or(0))
        .min();
    // Marks do not raise the highest watermark, so this one is made once;
    // with the whole job idle, the watermark moves on from it as the wall
    // clock does. A job without a watermark has nothing to close.
    let idle_for = now_ms() - coordination.last_data.get() as Millis;
    let to = busy_min.unwrap_or_else(|| match coordination.high_watermark.get() {
        0 => 0,
        high if idle_for >= timeout.as_millis() as i64 => high + idle_for as u64,
        high => high + 1,
    });
    let step = (timeout / 5).max(Duration::from_millis(100)).min(timeout);
    for clock in clocks.iter_mut() {
        let due = clock.marked.is_none_or(|at| now.duration_since(at) >= step);
        if idle(clock) && due && to > clock.watermark.unwrap_or(0) {
            input.mark(clock.partition, to as Millis);
            clock.marked = Some(now);
        }
    }
}

/// How a batch's events are judged.
struct Judge<'a> {
    /// The batch's stamp: events before it less `allowed_lateness` are dead
    /// letters.
    pub watermark: Millis,
    /// See [`SourceSettings::allowed_lateness`].
    pub allowed_lateness: Millis,
    /// The ids the partition's source remembers, and the partition's
    /// watermark before the batch, when the job deduplicates.
    pub ids: Option<(&'a mut Remembered, Millis)>,
}

/// What folding a batch found besides its contributions.
struct Folded {
    /// Its dead letters.
    pub dead: usize,
    /// The newest event time in it, no later than the time the log took it.
    pub newest: Option<Millis>,
    /// The events dropped as repeats of an id.
    pub repeats: usize,
    /// Its records that are events, not marks.
    pub events: usize,
    /// The highest watermark mark in it.
    pub mark: Option<Millis>,
}

/// Splits a batch into repeats, dead letters (onto `dead_letters`) and
/// contributions, which it folds into `folding` per (metric, group, pane).
fn fold_batch(
    batch: &SourceBatch,
    metrics: &[MetricSpec],
    shapes: &Shapes,
    judge: Judge<'_>,
    folding: &mut Folding,
    dead_letters: &mut Vec<DeadLetter>,
) -> Folded {
    let Judge {
        watermark,
        allowed_lateness,
        mut ids,
    } = judge;
    let dead_before = dead_letters.len();
    let (mut newest, mut newest_id, mut repeats) = (None, None, 0);
    let (mut mark, mut marks): (Option<Millis>, usize) = (None, 0);
    folding.appended_at = folding.appended_at.max(batch.appended_at);
    // Read into again for each record: no allocation per event.
    let mut event = EventRef::default();
    for (i, bytes) in batch.records.iter().enumerate() {
        let (offset, index) = batch.address(i);
        let dead_letter = |reason: String| DeadLetter {
            partition: batch.partition,
            offset,
            index,
            reason,
            watermark,
            record: record::to_json(bytes).into_owned(),
        };
        let timestamp = match record::read(bytes, &mut event) {
            Ok(Record::Event) => event.timestamp.expect("a record read holds its time"),
            Ok(Record::Mark(to)) => {
                mark = mark.max(Some(to));
                marks += 1;
                continue;
            }
            Err(e) => {
                dead_letters.push(dead_letter(format!("unreadable record: {e}")));
                continue;
            }
        };
        newest = Some(newest.map_or(timestamp, |n: Millis| n.max(timestamp)));
        if let (Some((ids, before)), Some(id)) = (ids.as_mut(), event.event_id.as_deref()) {
            newest_id = Some(newest_id.map_or(timestamp, |n: Millis| n.max(timestamp)));
            if ids.see(IdKey::of(id), timestamp, *before) == Seen::Repeat {
                repeats += 1;
                continue;
            }
        }
        if timestamp < watermark - allowed_lateness {
            dead_letters.push(dead_letter(format!(
                "{} ms behind the watermark, past the allowed lateness of {} ms",
                watermark - timestamp,
                allowed_lateness
            )));
            continue;
        }
        folding.event(&event, timestamp, metrics, shapes);
    }
    if let (Some((ids, _)), Some(newest_id)) = (ids, newest_id) {
        ids.read(batch.offset, newest_id);
    }
    let newest = match (newest, batch.appended_at) {
        (Some(newest), Some(appended)) => Some(newest.min(appended)),
        (newest, _) => newest,
    };
    Folded {
        dead: dead_letters.len() - dead_before,
        newest,
        repeats,
        events: batch.records.len() - marks,
        mark,
    }
}

/// Remembers the ids of a batch counted before the restored cut, as
/// [`fold_batch`] did when it counted it.
fn remember(batch: &SourceBatch, ids: &mut Remembered, watermark: Millis) {
    let mut newest = None;
    let mut event = EventRef::default();
    for bytes in &batch.records {
        if record::read(bytes, &mut event) != Ok(Record::Event) {
            continue;
        }
        if let (Some(id), Some(time)) = (event.event_id.as_deref(), event.timestamp) {
            ids.see(IdKey::of(id), time, watermark);
            newest = Some(newest.map_or(time, |n: Millis| n.max(time)));
        }
    }
    if let Some(newest) = newest {
        ids.read(batch.offset, newest);
    }
}

/// The contributions of the batches that travel at one time, while they
/// are folded: one per (table, pane, group), in the order their keys first
/// appear.
///
/// An event finds its group once per list of dimensions ([`Shapes`]),
/// whatever the number of metrics grouped by it, by a hash of the values it
/// borrows from the record; then each metric's entry among the group's few.
/// A list within a wider one takes its group from the wider list's (a group
/// remembers the groups it was narrowed to), and a projection's entries are
/// found the same way, from their metric's group. A group is built once per
/// time and fold, not once per event.
#[derive(Default)]
struct Folding {
    entries: Vec<Entry>,
    /// The groups events have, by list of dimensions.
    groups: Vec<Local>,
    /// Indices into `groups`, by [`Local::hash`].
    group_index: HashTable<usize>,
    /// When the log took the newest of the batches, if it says.
    appended_at: Option<Millis>,
    /// Per shape, the event's group while it is folded.
    event_groups: Vec<Option<usize>>,
    /// Where the event's dimensions are ([`Shapes::find`]) while it is
    /// folded.
    found: Vec<usize>,
    /// Per [`Shapes::types`], whether the event is of it, while it is
    /// folded.
    event_types: Vec<bool>,
    /// Per [`Shapes::widths`], the event's pane, while it is folded.
    panes: Vec<Millis>,
}

/// The dimension values of one [`Shapes`] list, and the entries of the
/// metrics grouped by it.
struct Local {
    shape: usize,
    /// [`group_hash_of`] the values, under the shape's index.
    hash: u64,
    values: Group,
    /// (metric, pane, index into `entries`).
    entries: Vec<(u16, Millis, usize)>,
    /// The groups its values were narrowed to: (shape, index into `groups`).
    narrowed: Vec<(usize, usize)>,
}

/// The configured metrics and their projections by the dimensions they
/// group by.
#[derive(Default)]
struct Shapes {
    /// Each distinct list of dimensions.
    dimensions: Vec<Vec<String>>,
    /// Per configured metric: its index, its list's, and the index of
    /// its event type in `types` and of its pane width in `widths`.
    metrics: Vec<ShapedMetric>,
    /// The event types the configured metrics take, each once: an event's
    /// is compared with each once.
    types: Vec<String>,
    /// The pane widths of the configured metrics, each once: an event's
    /// time is aligned to each once.
    widths: Vec<Millis>,
    /// The dimensions the configured metrics group by, each once: an
    /// event's are found once, whatever the number of lists they are in.
    names: Vec<String>,
    /// Per list of a configured metric, its dimensions' places in `names`.
    places: Vec<Vec<usize>>,
    /// Per list of a configured metric, the widest other such list that
    /// holds all its dimensions and whose metrics take every event type
    /// its own do, if any, and their places in it: its groups are narrowed
    /// from that list's.
    within: Vec<Option<(usize, Vec<usize>)>>,
}

/// A configured metric, as [`Shapes`] sees it.
struct ShapedMetric {
    index: u16,
    shape: usize,
    /// `None` for a metric of every event type.
    event_type: Option<usize>,
    width: usize,
}

impl Shapes {
    /// The lists of dimensions of the configured metrics among `metrics`.
    fn new(metrics: &[MetricSpec]) -> Shapes {
        let mut shapes = Shapes::default();
        for (index, metric) in metrics.iter().enumerate() {
            if metric.rollup_of.is_none() {
                let shaped = ShapedMetric {
                    index: index as u16,
                    shape: shapes.shape(&metric.dimensions),
                    event_type: metric
                        .event_type
                        .as_deref()
                        .map(|t| place_of(&mut shapes.types, t)),
                    width: place_of(&mut shapes.widths, &metric.pane),
                };
                shapes.metrics.push(shaped);
            }
        }
        let names = &mut shapes.names;
        shapes.places = shapes
            .dimensions
            .iter()
            .map(|list| list.iter().map(|d| place_of(names, d)).collect())
            .collect();
        let lists = &shapes.dimensions;
        let types = |shape: usize| {
            shapes
                .metrics
                .iter()
                .filter(move |m| m.shape == shape)
                .map(|m| m.event_type)
        };
        // A wider list serves a narrower one only if it is needed for every
        // event the narrower one is: else an event would make a group it
        // has no use for, of a list that may hold far more of them.
        let serves = |wider: usize, shape: usize| {
            types(shape).all(|t| types(wider).any(|w| w.is_none() || w == t))
        };
        shapes.within = (0..lists.len())
            .map(|shape| {
                let wider = (0..lists.len())
                    .filter(|&w| w != shape && lists[w].len() > lists[shape].len())
                    .filter(|&w| lists[shape].iter().all(|d| lists[w].contains(d)))
                    .filter(|&w| serves(w, shape))
                    .max_by_key(|&w| (lists[w].len(), std::cmp::Reverse(w)))?;
                let places = lists[shape]
                    .iter()
                    .map(|d| lists[wider].iter().position(|w| w == d).expect("within"))
                    .collect();
                Some((wider, places))
            })
            .collect();
        shapes
    }

    /// The index of the list `dimensions`, added if it is new.
    fn shape(&mut self, dimensions: &[String]) -> usize {
        place_of(&mut self.dimensions, dimensions)
    }

    /// Where in `event`'s dimensions each of [`Self::names`] is, into
    /// `found`: [`ABSENT`] for one it lacks. Later duplicates win, as they
    /// would in a map.
    fn find(&self, event: &EventRef<'_>, found: &mut Vec<usize>) {
        found.clear();
        found.resize(self.names.len(), ABSENT);
        for (at, (name, _)) in event.dimensions.iter().enumerate() {
            if let Some(place) = self.names.iter().position(|n| n == name) {
                found[place] = at;
            }
        }
    }
}

/// The place of a dimension an event lacks.
const ABSENT: usize = usize::MAX;

/// The place of `item` in `list`, added at the end if it is not there.
fn place_of<T, Q>(list: &mut Vec<T>, item: &Q) -> usize
where
    T: PartialEq<Q>,
    Q: ToOwned<Owned = T> + ?Sized,
{
    match list.iter().position(|known| known == item) {
        Some(place) => place,
        None => {
            list.push(item.to_owned());
            list.len() - 1
        }
    }
}

struct Entry {
    metric: u16,
    pane: Millis,
    /// Its group, an index into [`Folding::groups`].
    local: usize,
    /// The routing hash of (metric, group).
    hash: u64,
    state: AggState,
}

impl Folding {
    /// The contributions, with their projections' after them: the same
    /// batches folded in the same order always make the same ones.
    fn finish(mut self, metrics: &[MetricSpec], derived: &Derived) -> Vec<Contribution> {
        derived.fold(metrics, &mut self);
        let appended_at = self.appended_at;
        let groups = self.groups;
        self.entries
            .into_iter()
            .map(|e| Contribution {
                metric: e.metric,
                group: groups[e.local].values.clone(),
                hash: e.hash,
                pane: e.pane,
                state: e.state,
                appended_at,
            })
            .collect()
    }

    /// Adds one event, at `timestamp`, to every metric it counts toward.
    fn event(
        &mut self,
        event: &EventRef<'_>,
        timestamp: Millis,
        metrics: &[MetricSpec],
        shapes: &Shapes,
    ) {
        self.event_groups.clear();
        self.event_groups.resize(shapes.dimensions.len(), None);
        let mut found = std::mem::take(&mut self.found);
        shapes.find(event, &mut found);
        self.event_types.clear();
        let event_type = event.event_type.as_ref();
        self.event_types
            .extend(shapes.types.iter().map(|t| t == event_type));
        self.panes.clear();
        self.panes
            .extend(shapes.widths.iter().map(|&width| align(timestamp, width)));
        for shaped in &shapes.metrics {
            if shaped.event_type.is_some_and(|t| !self.event_types[t]) {
                continue;
            }
            let local = self.group_of(shaped.shape, event, &found, shapes);
            let e = self.entry(local, shaped.index, self.panes[shaped.width]);
            let metric = &metrics[shaped.index as usize];
            self.entries[e]
                .state
                .observe(metric.aggregate, metric.field.as_ref(), event);
        }
        self.found = found;
    }

    /// The event's group in list `shape`: looked up by its values, or
    /// narrowed from its group in a wider list.
    fn group_of(
        &mut self,
        shape: usize,
        event: &EventRef<'_>,
        found: &[usize],
        shapes: &Shapes,
    ) -> usize {
        if let Some(local) = self.event_groups[shape] {
            return local;
        }
        let local = match &shapes.within[shape] {
            Some((wider, places)) => {
                let wider = self.group_of(*wider, event, found, shapes);
                self.narrow(wider, shape, places)
            }
            None => {
                let values = shapes.places[shape]
                    .iter()
                    .map(|&place| match found[place] {
                        ABSENT => "",
                        at => event.dimensions[at].1.as_ref(),
                    });
                self.local(shape, values)
            }
        };
        self.event_groups[shape] = Some(local);
        local
    }

    /// The group of list `shape` that group `from` narrows to, its values
    /// at `places` of `from`'s.
    fn narrow(&mut self, from: usize, shape: usize, places: &[usize]) -> usize {
        if let Some(&(_, local)) = self.groups[from].narrowed.iter().find(|(s, _)| *s == shape) {
            return local;
        }
        // `local` borrows the folding mutably, so `from`'s values are read
        // through a second handle on their shared allocation.
        let values = Arc::clone(&self.groups[from].values);
        let local = self.local(shape, places.iter().map(|&p| values[p].as_str()));
        self.groups[from].narrowed.push((shape, local));
        local
    }

    /// The group of `values` in list `shape`, made if the time has none yet.
    fn local<'v>(
        &mut self,
        shape: usize,
        values: impl ExactSizeIterator<Item = &'v str> + Clone,
    ) -> usize {
        let hash = group_hash_of(shape as u16, values.clone());
        let groups = &self.groups;
        let found = self.group_index.entry(
            hash,
            |&g| {
                let local = &groups[g];
                local.hash == hash
                    && local.shape == shape
                    && local.values.iter().map(String::as_str).eq(values.clone())
            },
            |&g| groups[g].hash,
        );
        match found {
            hashbrown::hash_table::Entry::Occupied(g) => *g.get(),
            hashbrown::hash_table::Entry::Vacant(slot) => {
                let g = self.groups.len();
                slot.insert(g);
                self.groups.push(Local {
                    shape,
                    hash,
                    values: values.map(str::to_owned).collect(),
                    entries: Vec::new(),
                    narrowed: Vec::new(),
                });
                g
            }
        }
    }

    /// The entry of (`metric`, `pane`) of group `local`, made empty if the
    /// time has none yet.
    fn entry(&mut self, local: usize, metric: u16, pane: Millis) -> usize {
        let group = &mut self.groups[local];
        if let Some(&(_, _, e)) = group
            .entries
            .iter()
            .find(|&&(m, p, _)| m == metric && p == pane)
        {
            return e;
        }
        let e = self.entries.len();
        group.entries.push((metric, pane, e));
        self.entries.push(Entry {
            metric,
            pane,
            hash: group_hash_of(metric, group.values.iter().map(String::as_str)),
            local,
            state: AggState::default(),
        });
        e
    }
}

/// How each metric's projections ([`crate::rollup`]) are made of its
/// batch: per metric, each projection's index, its list of dimensions in
/// [`Shapes`] and the places of its dimensions in the metric's group.
struct Derived(Vec<Vec<(u16, usize, Vec<usize>)>>);

impl Derived {
    /// The projections among `metrics`, by the metric they are of, their
    /// lists of dimensions added to `shapes`.
    fn new(metrics: &[MetricSpec], shapes: &mut Shapes) -> Derived {
        let mut derived = vec![Vec::new(); metrics.len()];
        for (index, made) in made(metrics).into_iter().enumerate() {
            let Made::Batch(of) = made else { continue };
            let table = &metrics[index];
            let metric = &metrics[of as usize];
            let places = table
                .dimensions
                .iter()
                .filter_map(|d| metric.dimensions.iter().position(|m| m == d))
                .collect();
            derived[of as usize].push((index as u16, shapes.shape(&table.dimensions), places));
        }
        Derived(derived)
    }

    /// Adds to `folding` the projections' contributions, from their
    /// metrics'. A projection's panes are whole numbers of its metric's, so
    /// each of the metric's panes lies in one of the projection's.
    fn fold(&self, metrics: &[MetricSpec], folding: &mut Folding) {
        if self.0.iter().all(Vec::is_empty) {
            return;
        }
        for e in 0..folding.entries.len() {
            let metric = folding.entries[e].metric as usize;
            for (table, shape, places) in &self.0[metric] {
                let pane = align(folding.entries[e].pane, metrics[*table as usize].pane);
                let local = folding.narrow(folding.entries[e].local, *shape, places);
                // A projection's entries follow all its metrics'.
                let projected = folding.entry(local, *table, pane);
                let (metric, table) = folding.entries.split_at_mut(projected);
                table[0].state.merge(&metric[e].state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::config::Config;
    use crate::event::parse_event_ref;
    use crate::job::JobSettings;
    use crate::rollup;

    /// Metrics by nested lists of dimensions, one list beside them, and
    /// their projections, over events that lack some dimensions and repeat
    /// one: every table counts each event under the group of its values,
    /// whether an event's group was looked up or narrowed from a wider one.
    #[test]
    fn every_list_and_projection_counts_each_event_in_its_group() {
        let text = r#"
            [[metric]]
            name = "wide"
            aggregate = "count"
            dimensions = ["a", "b", "c"]
            windows = ["tumbling 10s"]
            rollups = []
            projections = [[], ["c"], ["b", "a"]]
            [[metric]]
            name = "within"
            aggregate = "count"
            dimensions = ["c", "b"]
            windows = ["tumbling 10s"]
            rollups = []
            projections = []
            [[metric]]
            name = "narrowest"
            event_type = "click"
            aggregate = "count"
            dimensions = ["b"]
            windows = ["tumbling 10s"]
            rollups = []
            projections = [[]]
            [[metric]]
            name = "beside"
            aggregate = "count"
            dimensions = ["b", "d"]
            windows = ["tumbling 10s"]
            rollups = []
            projections = []
            [[metric]]
            name = "widest"
            event_type = "click"
            aggregate = "count"
            dimensions = ["d", "c", "b", "a"]
            windows = ["tumbling 10s"]
            rollups = []
            projections = []
        "#;
        let settings = JobSettings::from_config(&Config::load(Some(text), []).unwrap());
        let metrics = rollup::expand(&settings.metrics);
        let mut shapes = Shapes::new(&metrics);
        let derived = Derived::new(&metrics, &mut shapes);
        // Only a list whose metrics take every event the narrower one's do
        // serves it: the widest, of clicks alone, serves only "narrowest".
        let within = |name: &str| {
            let list = &metrics.iter().find(|m| m.name == name).unwrap().dimensions;
            let shape = shapes.dimensions.iter().position(|l| l == list).unwrap();
            shapes.within[shape]
                .as_ref()
                .map(|(wider, _)| shapes.dimensions[*wider].join(","))
        };
        assert_eq!(within("wide"), None);
        assert_eq!(within("within").as_deref(), Some("a,b,c"));
        assert_eq!(within("narrowest").as_deref(), Some("d,c,b,a"));
        assert_eq!(within("beside"), None);
        let mut expected: BTreeMap<(u16, Group), u64> = BTreeMap::new();
        let mut folding = Folding::default();
        // Each of a, b, c and d absent or one of three values, in every
        // combination, twice: as clicks and as views.
        for i in 0..2 * 4usize.pow(4) {
            let mut dimensions = BTreeMap::new();
            let mut json = Vec::from(&b"{\"dimensions\": {"[..]);
            for (k, name) in ["a", "b", "c", "d"].into_iter().enumerate() {
                match (i / 4usize.pow(k as u32)) % 4 {
                    0 => {}
                    v => {
                        let value = ["x", "y", "z"][v - 1];
                        json.extend(format!("\"{name}\": \"{value}\", ").bytes());
                        dimensions.insert(name, value);
                    }
                }
            }
            if i % 3 == 0 {
                // A name given twice: the last one counts.
                json.extend(br#""b": "again", "#);
                dimensions.insert("b", "again");
            }
            let event_type = if i < 4usize.pow(4) { "click" } else { "view" };
            json.extend(
                format!("\"e\": 0}}, \"eventType\": \"{event_type}\", \"timestamp\": 1000}}")
                    .bytes(),
            );
            let event = parse_event_ref(&json).unwrap();
            folding.event(&event, 1_000, &metrics, &shapes);
            for (index, metric) in metrics.iter().enumerate() {
                if !metric.accepts(event_type) {
                    continue;
                }
                let group = metric
                    .dimensions
                    .iter()
                    .map(|d| {
                        dimensions
                            .get(d.as_str())
                            .copied()
                            .unwrap_or_default()
                            .to_owned()
                    })
                    .collect();
                *expected.entry((index as u16, group)).or_default() += 1;
            }
        }
        let mut made: BTreeMap<(u16, Group), u64> = BTreeMap::new();
        for c in folding.finish(&metrics, &derived) {
            assert_eq!(
                c.hash,
                group_hash_of(c.metric, c.group.iter().map(String::as_str))
            );
            *made.entry((c.metric, c.group)).or_default() += c.state.count;
        }
        let tables: std::collections::BTreeSet<u16> = made.keys().map(|(m, _)| *m).collect();
        assert_eq!(tables.len(), 9, "five metrics and four projections");
        assert_eq!(made, expected);
    }
}
