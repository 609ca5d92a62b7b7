//! (b) The timely job on the default metrics, one worker, against a
//! hand-written single-threaded loop that does the same work: decode each
//! record, fold it into per-(metric, group, pane) state in a HashMap, and
//! merge panes into every window at the end.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use tally_dataflow::aggregate::AggState;
use tally_dataflow::checkpoint::Restore;
use tally_dataflow::config::{Config, MetricSpec};
use tally_dataflow::coordination::Coordination;
use tally_dataflow::event::record;
use tally_dataflow::event::Fields;
use tally_dataflow::event::{parse_event_ref, EventRef};
use tally_dataflow::job::{self, JobSettings, Sinks};
use tally_dataflow::model::Group;
use tally_dataflow::ports::Sink;
use tally_dataflow::ports::{BatchSource, Poll, SourceBatch, Waker};
use tally_dataflow::routing::worker_partitions;
use tally_dataflow::stats::JobStats;
use tally_dataflow::time::Millis;
use tally_dataflow::window::{align, WindowSpec};

use crate::support::{default_config, event};
use tally_dataflow::rollup;

const EVENTS: usize = 1_000_000;
const ROUNDS: usize = 3;
const BATCH: usize = 1000;
const PARTITIONS: u32 = 8;
/// Event time covered: ten minutes, so windows open and close throughout.
/// At 1,667 events a second of event time, most (group, pane)s hold a few
/// events, and the per-window work weighs as much as the per-event work.
const SPAN_MS: i64 = 600_000;
/// Event time covered at the headline's density: the same events in one
/// second, as a stream of a million events a second has them. Every window
/// closes at the end of the run.
const DENSE_SPAN_MS: i64 = 1_000;

/// A bounded source over pre-built batches.
struct Batches {
    batches: VecDeque<SourceBatch>,
    partitions: Vec<u32>,
    waker: Option<Waker>,
}

impl BatchSource for Batches {
    fn partitions(&self) -> Vec<u32> {
        self.partitions.clone()
    }
    fn start(&mut self, waker: Waker) {
        self.waker = Some(waker);
    }
    fn poll(&mut self) -> Poll {
        if self.batches.is_empty() {
            return Poll::Finished;
        }
        let take = self.batches.len().min(16);
        let batches = self.batches.drain(..take).collect();
        // Woken to say the input has finished, or for the rest, which
        // waits as a backlog in the log does.
        if let Some(wake) = &self.waker {
            wake();
        }
        if self.batches.is_empty() {
            Poll::Ready(batches)
        } else {
            Poll::Behind(batches)
        }
    }
    /// The batches are the whole log, read before any partition idles.
    fn mark(&mut self, _partition: u32, _watermark: Millis) {}
}

/// Counts what reaches a sink.
#[derive(Clone)]
struct Count(Arc<AtomicUsize>);

impl<T> Sink<T> for Count {
    fn offer(&mut self, items: &mut Vec<T>) {
        self.0.fetch_add(items.len(), Ordering::Relaxed);
        items.clear();
    }
}

/// The bench's events over `span` ms of event time, a second of it out of
/// order at most.
fn batches(span: i64) -> Vec<SourceBatch> {
    let mut rng = fastrand::Rng::with_seed(2);
    let base = 1_780_826_400_000;
    let records: Vec<Vec<u8>> = (0..EVENTS)
        .map(|i| {
            let t = base + (i as i64 * span) / EVENTS as i64 + rng.i64(0..1000.min(span));
            // What the gateway writes to the log: the event's record.
            let json = serde_json::to_vec(&event(&mut rng, t)).unwrap();
            record::encode(&parse_event_ref(&json).unwrap(), t)
        })
        .collect();
    let mut offsets = vec![0u64; PARTITIONS as usize];
    records
        .chunks(BATCH)
        .enumerate()
        .map(|(i, chunk)| {
            let partition = i as u32 % PARTITIONS;
            let offset = offsets[partition as usize];
            offsets[partition as usize] += chunk.len() as u64;
            SourceBatch {
                partition,
                offset,
                next_offset: offset + chunk.len() as u64,
                records: chunk.to_vec(),
                appended_at: None,
            }
        })
        .collect()
}

/// The hand-written baseline: returns the number of window results. It
/// computes each of the metrics' rollups as a metric of its own, from every
/// event.
fn hand_written(batches: &[SourceBatch], settings: &JobSettings) -> usize {
    let metrics = &rollup::expand(&settings.metrics);
    let panes = panes(batches, metrics);
    let mut windows: HashMap<(u16, usize, Millis, &Group), AggState> = HashMap::new();
    for ((m, group, pane), state) in &panes {
        for (w, spec) in metrics[*m as usize].windows.iter().enumerate() {
            for span in WindowSpec::windows_of_pane(spec, *pane) {
                windows
                    .entry((*m, w, span.end, group))
                    .or_default()
                    .merge(state);
            }
        }
    }
    windows.len()
}

/// Each record of `batches` decoded and folded into the state of its
/// (metric, group, pane) for every metric that takes it.
fn panes(
    batches: &[SourceBatch],
    metrics: &[MetricSpec],
) -> HashMap<(u16, Group, Millis), AggState> {
    let mut panes: HashMap<(u16, Group, Millis), AggState> = HashMap::new();
    let mut event = EventRef::default();
    for bytes in batches.iter().flat_map(|b| &b.records) {
        record::read(bytes, &mut event).unwrap();
        let timestamp = event.timestamp.unwrap();
        for (m, metric) in metrics.iter().enumerate() {
            if !metric.accepts(&event.event_type) {
                continue;
            }
            let group: Group = metric
                .dimensions
                .iter()
                .map(|d| event.dimension(d).unwrap_or_default().to_owned())
                .collect();
            panes
                .entry((m as u16, group, align(timestamp, metric.pane)))
                .or_default()
                .observe(metric.aggregate, metric.field.as_ref(), &event);
        }
    }
    panes
}

/// Runs the job on `batches` with `workers` workers: the events a second it
/// took them at, and the finals it stored. The clock starts once each
/// worker's copy of the batches is made, as the baseline's reads the
/// batches it is given.
fn timely_job(batches: &[SourceBatch], settings: &JobSettings, workers: usize) -> (f64, usize) {
    let finals = Arc::new(AtomicUsize::new(0));
    let per_worker: Vec<std::sync::Mutex<Option<Batches>>> = (0..workers)
        .map(|w| {
            let mine: VecDeque<SourceBatch> = batches
                .iter()
                .filter(|b| b.partition as usize % workers == w)
                .cloned()
                .collect();
            let partitions = worker_partitions(PARTITIONS, w, workers);
            std::sync::Mutex::new(Some(Batches {
                batches: mine,
                partitions,
                waker: None,
            }))
        })
        .collect();
    let (settings, count) = (settings.clone(), Count(Arc::clone(&finals)));
    let stats = Arc::new(JobStats::new(workers));
    let coordination = Coordination::default();
    let started = Instant::now();
    timely::execute(timely::Config::process(workers), move |worker| {
        let source = per_worker[worker.index()].lock().unwrap().take().unwrap();
        let sinks = Sinks {
            store: count.clone(),
            live: Count(Arc::default()),
            dead_letters: Count(Arc::default()),
        };
        worker.dataflow::<u64, _, _>(|scope| {
            job::build(
                scope,
                source,
                &settings,
                Arc::clone(&stats),
                sinks,
                &coordination,
                Restore::default(),
                None,
            );
        });
    })
    .unwrap()
    .join();
    let rate = EVENTS as f64 / started.elapsed().as_secs_f64();
    (rate, finals.load(Ordering::Relaxed))
}

pub fn run() {
    let config = default_config();
    let settings = JobSettings::from_config(&config);
    let batches = batches(SPAN_MS);

    // Alternate the contenders and keep each one's median, so a noisy
    // neighbour on the machine hurts both alike.
    // The same metrics without their rollups: what the rollups cost.
    let mut plain = settings.clone();
    for metric in &mut plain.metrics {
        metric.rollups.clear();
        metric.projections.clear();
    }
    // Every event has an eventId; without deduplication they are not looked up.
    let mut kept = settings.clone();
    kept.source.dedupe_horizon = 0;
    let (mut baseline, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new());
    let (mut without, mut repeats_kept) = (Vec::new(), Vec::new());
    let mut windows = 0;
    for _ in 0..ROUNDS {
        let (r, w) = rate(&mut || hand_written(&batches, &settings));
        baseline.push(r);
        windows = w;
        let (r, finals) = timely_job(&batches, &settings, 1);
        one.push(r);
        assert_eq!(
            finals, windows,
            "the job and the baseline must compute the same windows"
        );
        two.push(timely_job(&batches, &settings, 2).0);
        without.push(timely_job(&batches, &plain, 1).0);
        repeats_kept.push(timely_job(&batches, &kept, 1).0);
    }
    let (baseline, one, two) = (median(baseline), median(one), median(two));
    let (without, repeats_kept) = (median(without), median(repeats_kept));
    println!("(b) aggregation of the default metrics (7 metrics, 16 windows, and their rollups), {EVENTS} events, {windows} window results, median of {ROUNDS}");
    println!(
        "    baseline hand-written HashMap loop, 1 thread: {:>10.0} events/s",
        baseline
    );
    println!("    timely job, 1 worker:                         {:>10.0} events/s  ({:.2}x the baseline)", one, one / baseline);
    println!("    timely job, 2 workers:                        {:>10.0} events/s  ({:.2}x the baseline)", two, two / baseline);
    println!("    timely job, 1 worker, without rollups:        {:>10.0} events/s  (the rollups cost {:.0}%)", without, (1.0 - one / without) * 100.0);
    println!("    timely job, 1 worker, without deduplication:  {:>10.0} events/s  (deduplication costs {:.1}%)", repeats_kept, (1.0 - one / repeats_kept) * 100.0);
    dense(&settings);
    kinds(&batches);
}

/// The same events and metrics at the headline's density (see
/// [`DENSE_SPAN_MS`]).
fn dense(settings: &JobSettings) {
    let batches = batches(DENSE_SPAN_MS);
    let (mut baseline, mut one, mut two) = (Vec::new(), Vec::new(), Vec::new());
    let mut windows = 0;
    for _ in 0..ROUNDS {
        let (r, w) = rate(&mut || hand_written(&batches, settings));
        baseline.push(r);
        windows = w;
        let (r, finals) = timely_job(&batches, settings, 1);
        assert_eq!(
            finals, windows,
            "the job and the baseline must compute the same windows"
        );
        one.push(r);
        two.push(timely_job(&batches, settings, 2).0);
    }
    let (baseline, one, two) = (median(baseline), median(one), median(two));
    println!("    the same {EVENTS} events in {DENSE_SPAN_MS} ms of event time, as a million events a second have them ({windows} window results):");
    println!("      baseline hand-written HashMap loop, 1 thread: {baseline:>10.0} events/s");
    println!("      timely job, 1 worker:                         {one:>10.0} events/s  ({:.2}x the baseline)", one / baseline);
    println!("      timely job, 2 workers:                        {two:>10.0} events/s  ({:.2}x the baseline)", two / baseline);
}

/// What each aggregate costs: one metric of each kind, alone, on the same
/// events (the ad clicks, by country and device, in 10 s and 1 m windows,
/// without rollups), through the job on one worker, beside `count`; and
/// the bytes a (group, pane) state takes in a checkpoint (its bincode, as
/// a checkpoint part holds it).
fn kinds(batches: &[SourceBatch]) {
    let kinds = [
        ("count", ""),
        ("uniq", "dimensions.userId"),
        ("quantiles", "values.latency_ms"),
        ("topk", "dimensions.creativeId"),
    ];
    let settings: Vec<JobSettings> = kinds
        .iter()
        .map(|(kind, field)| {
            let field = if field.is_empty() { String::new() } else { format!("field = \"{field}\"") };
            let text = format!(
                "[[metric]]\nname = \"m\"\nevent_type = \"ad_click\"\naggregate = \"{kind}\"\n{field}\n\
                 dimensions = [\"country\", \"deviceType\"]\nwindows = [\"tumbling 10s\", \"tumbling 1m\"]\n\
                 rollups = []\nprojections = []\n"
            );
            JobSettings::from_config(&Config::load(Some(&text), []).unwrap())
        })
        .collect();
    let mut rates = vec![Vec::new(); kinds.len()];
    for _ in 0..ROUNDS {
        for (k, settings) in settings.iter().enumerate() {
            rates[k].push(timely_job(batches, settings, 1).0);
        }
    }
    let count = median(rates[0].clone());
    println!("    each aggregate alone on the ad clicks (by country and device, 10 s and 1 m windows, no rollups), 1 worker:");
    for ((kind, _), (rates, settings)) in kinds.iter().zip(rates.into_iter().zip(&settings)) {
        let rate = median(rates);
        let (states, bytes) = pane_bytes(batches, settings);
        println!(
            "      {kind:<10} {rate:>10.0} events/s  ({:.2}x count)   {:>6.0} bytes per group and pane in a checkpoint ({states} of them)",
            rate / count,
            bytes as f64 / states as f64
        );
    }
}

/// The (group, pane) states of the one metric of `settings` over the
/// batches, and their bincode's bytes in all.
fn pane_bytes(batches: &[SourceBatch], settings: &JobSettings) -> (usize, u64) {
    let panes = panes(batches, &settings.metrics);
    let bytes = panes
        .values()
        .map(|state| bincode::serialized_size(state).unwrap())
        .sum();
    (panes.len(), bytes)
}

/// The events a second `f` takes the bench's events at, and what it returns.
fn rate(f: &mut dyn FnMut() -> usize) -> (f64, usize) {
    let started = Instant::now();
    let windows = f();
    (EVENTS as f64 / started.elapsed().as_secs_f64(), windows)
}

fn median(mut rates: Vec<f64>) -> f64 {
    rates.sort_by(f64::total_cmp);
    rates[rates.len() / 2]
}
