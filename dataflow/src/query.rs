//! History queries: what `GET /v1/metrics` asks, checked against the
//! configuration, and how stored windows become its answer.
//!
//! History is answered from the tumbling windows of a metric or of one of
//! its rollups. A query's `resolution` must be a whole multiple of one of
//! the metric's windows; the planner ([`rollup::choose`]) picks the table
//! and window with the fewest rows that answer it exactly, and their rows
//! are merged into buckets of the resolution.
//! Buckets are aligned to the epoch, the first one being the bucket that holds
//! `start`, and every bucket up to `end` is present in the answer, empty or
//! not. Because stored rows keep full aggregate state (sketches included),
//! merging them over buckets and groups gives exact counts and sums and
//! correct distinct-count estimates.

use std::collections::HashMap;
use std::ops::ControlFlow;

use crate::aggregate::{AggState, AggregateKind, Ask, Value};
use crate::config::{HistoryConfig, MetricSpec};
use crate::rollup;
use crate::time::{parse_millis, parse_rfc3339, Millis};
use crate::window::{align, WindowSpec};

/// The parameters a query may name besides dimension filters.
const PARAMETERS: [&str; 8] = [
    "metric",
    "start",
    "end",
    "resolution",
    "groupBy",
    "top",
    "quantiles",
    "k",
];

/// A validated history query.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// The metric's name.
    pub metric: String,
    /// The version of the results to read: the fingerprint of the table
    /// the planner chose, the metric's own or one of its rollups.
    pub version: String,
    /// Its aggregate.
    pub aggregate: AggregateKind,
    /// The quantiles a `quantiles` value holds, and how many items a
    /// `topk` value does.
    pub ask: Ask,
    /// The stored tumbling window the answer is built from.
    pub window: WindowSpec,
    /// What the store reads, in order: `version` and `window` first, then
    /// from the end of the last window stored, the finer windows of the same
    /// dimensions ([`rollup::Choice::finer`]).
    pub reads: Vec<Read>,
    /// `(dimension index, value)` filters.
    pub filters: Vec<(usize, String)>,
    /// The dimension index to group by.
    pub group_by: Option<usize>,
    /// With `group_by`, how many groups the answer holds: the largest by
    /// their total over the range.
    pub top: usize,
    /// Where a grouped `uniq` ranks its groups from, when coarser windows
    /// of the table fit in the range (see [`Query::by_estimate`]): the
    /// ranking then merges one sketch per group and coarse window, not one
    /// per bucket. Empty when the ranking reads the query's own rows.
    pub rank: Vec<Span>,
    /// The dimension names of the table read, which `filters` and
    /// `group_by` index: the metric's, or a rollup's (see [`rollup`]).
    pub dimensions: Vec<String>,
    /// First bucket's start.
    pub start: Millis,
    /// End of the range, exclusive.
    pub end: Millis,
    /// Bucket width: the one asked for, or a coarser one when no window
    /// that fine still holds the range.
    pub resolution: Millis,
    /// Groups the query may rank before it is refused.
    pub max_groups: usize,
    /// Points its answer may hold.
    pub max_points: usize,
    /// Sketches of `quantiles` and `topk` it may hold at once.
    pub max_sketches: usize,
}

/// One stored table and window a query reads.
#[derive(Clone, Debug, PartialEq)]
pub struct Read {
    /// The table's version.
    pub version: String,
    /// The window.
    pub window: WindowSpec,
}

/// A part of a query's range and what is read for it.
#[derive(Clone, Debug, PartialEq)]
pub struct Span {
    /// First window's start.
    pub start: Millis,
    /// End of the span, exclusive.
    pub end: Millis,
    /// The reads, as [`Query::reads`].
    pub reads: Vec<Read>,
}

/// What a store reads for one scan of a [`Fold`].
#[derive(Clone, Debug, PartialEq)]
pub struct Scan {
    /// The metric's name.
    pub metric: String,
    /// What is read, in order; each read goes on from the end of the last
    /// window the one before it found.
    pub reads: Vec<Read>,
    /// The first read's start.
    pub start: Millis,
    /// End of the range, exclusive.
    pub end: Millis,
    /// The one group to read, as [`Query::only_group`].
    pub only: Option<Vec<String>>,
    /// The width of a bucket, when each bucket of a group is one stored
    /// window of a read that wide, whose estimate answers it: such a read
    /// may leave its sketches out.
    estimates: Option<Millis>,
}

impl Scan {
    /// Whether the rows of `read` may carry their estimates in place of
    /// their sketches, for [`Fold::add_estimated`].
    pub fn by_estimate(&self, read: &Read) -> bool {
        self.estimates == Some(read.window.size())
    }
}

/// A query the client must fix, with the parameter at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {problem}")]
pub struct QueryError {
    /// The query parameter that is wrong.
    pub parameter: String,
    /// What is wrong with it.
    pub problem: String,
    /// Which rule it broke.
    pub refusal: Refusal,
}

/// Why a query was refused, as `/metrics` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// A parameter is missing, unknown, repeated or malformed.
    Invalid,
    /// The answer would hold more than `history.max_points` points.
    Points,
    /// The query would hold more than `history.max_sketches` sketches of
    /// `quantiles` or `topk`.
    Sketches,
    /// The range holds more than `history.max_groups` groups to rank.
    Groups,
}

impl Refusal {
    /// The `reason` label of the refusal.
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Invalid => "invalid",
            Refusal::Points => "max_points",
            Refusal::Sketches => "max_sketches",
            Refusal::Groups => "max_groups",
        }
    }
}

fn bad(parameter: &str, problem: impl Into<String>) -> QueryError {
    QueryError {
        parameter: parameter.to_owned(),
        problem: problem.into(),
        refusal: Refusal::Invalid,
    }
}

/// One series of an answer: its group (empty without `groupBy`) and one
/// value per bucket, `None` where the aggregate has no value (the avg or
/// the quantiles of nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// `(dimension, value)` of the group.
    pub group: Vec<(String, String)>,
    /// `(bucket start, value)`.
    pub points: Vec<(Millis, Option<Value>)>,
}

impl Query {
    /// Checks raw parameters against the configuration. A parameter may be
    /// given once; so may each dimension's filter.
    ///
    /// `now` stands in for a missing `end`; a missing `start` means one hour
    /// before `end`; a missing `resolution` means the metric's narrowest
    /// tumbling window; a missing `top` means `history.top`.
    pub fn parse(
        params: &[(String, String)],
        metrics: &[MetricSpec],
        limits: &HistoryConfig,
        now: Millis,
    ) -> Result<Query, QueryError> {
        for (i, (key, _)) in params.iter().enumerate() {
            if params[..i].iter().any(|(k, _)| k == key) {
                return Err(bad(key, "is given twice; it takes one value"));
            }
        }
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let name = get("metric").ok_or_else(|| bad("metric", "is required"))?;
        let metric = metrics.iter().find(|m| m.name == name).ok_or_else(|| {
            let known: Vec<&str> = metrics.iter().map(|m| m.name.as_str()).collect();
            bad(
                "metric",
                format!("unknown metric '{name}'; known: {}", known.join(", ")),
            )
        })?;
        let end = get("end")
            .map(|v| parse_time("end", v))
            .transpose()?
            .unwrap_or(now);
        let start = get("start")
            .map(|v| parse_time("start", v))
            .transpose()?
            .unwrap_or((end - 3_600_000).max(0));
        if start >= end {
            return Err(bad("start", "must be before end"));
        }
        let tumbling: Vec<WindowSpec> = metric
            .windows
            .iter()
            .copied()
            .filter(WindowSpec::is_tumbling)
            .collect();
        let asked = match get("resolution") {
            None => tumbling
                .iter()
                .map(WindowSpec::size)
                .min()
                .unwrap_or(60_000),
            Some(v) => parse_millis(v).map_err(|e| bad("resolution", e))?,
        };
        let dimension = |parameter: &str, dim: &str| {
            metric
                .dimensions
                .iter()
                .position(|d| d == dim)
                .ok_or_else(|| {
                    bad(
                        parameter,
                        format!(
                            "'{dim}' is not a dimension of {}; it has: {}",
                            metric.name,
                            metric.dimensions.join(", ")
                        ),
                    )
                })
        };
        let group_by = get("groupBy")
            .map(|d| dimension("groupBy", d))
            .transpose()?;
        let top = match (get("top"), group_by) {
            (None, _) => limits.top,
            (Some(_), None) => return Err(bad("top", "needs groupBy")),
            (Some(v), Some(_)) => v
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=limits.max_top).contains(n))
                .ok_or_else(|| {
                    bad(
                        "top",
                        format!("'{v}' must be an integer from 1 to {}", limits.max_top),
                    )
                })?,
        };
        let ask = ask(metric.aggregate, get("quantiles"), get("k"))?;
        let mut filters = Vec::new();
        for (key, value) in params {
            if !PARAMETERS.contains(&key.as_str()) {
                filters.push((dimension(key, key)?, value.clone()));
            }
        }
        let needed: Vec<&str> = filters
            .iter()
            .map(|(d, _)| *d)
            .chain(group_by)
            .map(|d| metric.dimensions[d].as_str())
            .collect();
        let tables = rollup::tables(metric);
        let choice = rollup::choose(&tables, &needed, start, end, asked, now).ok_or_else(|| {
            let sizes: Vec<String> = tumbling.iter().map(|w| w.to_string()).collect();
            bad(
                "resolution",
                format!(
                    "must be a multiple of one of the metric's windows: {}",
                    sizes.join(", ")
                ),
            )
        })?;
        let (table, window, resolution) = (choice.table, choice.window, choice.resolution);
        let reads = reads(&choice);
        // Filters and the grouping index the table's dimensions.
        let place = |d: usize| {
            table
                .dimensions
                .iter()
                .position(|t| *t == metric.dimensions[d])
                .expect("the planner chose a table with every dimension needed")
        };
        let filters = filters.into_iter().map(|(d, v)| (place(d), v)).collect();
        let group_by = group_by.map(place);
        let start = align(start, resolution);
        let buckets = bucket_count(start, end, resolution) as i64;
        let series = if group_by.is_some() { top } else { 1 };
        if buckets.saturating_mul(series as i64) > limits.max_points as i64 {
            let (parameter, problem) = if group_by.is_some() {
                (
                    if get("top").is_some() {
                        "top"
                    } else {
                        "resolution"
                    },
                    format!("{series} series of {buckets} buckets"),
                )
            } else {
                ("resolution", format!("{buckets} buckets"))
            };
            return Err(QueryError {
                parameter: parameter.into(),
                problem: format!(
                    "the answer would hold {problem}, more than {} points (history.max_points); \
                     widen the resolution, shorten the range or lower top",
                    limits.max_points
                ),
                refusal: Refusal::Points,
            });
        }
        if metric.aggregate.holds_large_sketch()
            && buckets.saturating_mul(series as i64) > limits.max_sketches as i64
        {
            return Err(QueryError {
                parameter: if group_by.is_some() && get("top").is_some() {
                    "top"
                } else {
                    "resolution"
                }
                .into(),
                problem: format!(
                    "the answer would hold {} sketches of {}, more than {} (history.max_sketches); \
                     widen the resolution, shorten the range or lower top",
                    buckets.saturating_mul(series as i64),
                    metric.aggregate,
                    limits.max_sketches
                ),
                refusal: Refusal::Sketches,
            });
        }
        let mut query = Query {
            metric: metric.name.clone(),
            version: crate::fingerprint::metric(table),
            aggregate: metric.aggregate,
            ask,
            window,
            reads,
            filters,
            group_by,
            top,
            rank: Vec::new(),
            dimensions: table.dimensions.clone(),
            start,
            end,
            resolution,
            max_groups: limits.max_groups,
            max_points: limits.max_points,
            max_sketches: limits.max_sketches,
        };
        if query.group_by.is_some() && query.by_estimate(&query.reads[0]) {
            query.rank = query.rank_spans(&tables, now);
        }
        Ok(query)
    }

    /// The spans a grouped `uniq` answered by estimates ranks from: the
    /// part of the range the widest coarser window of the table tiles, read
    /// from that window, and the edges around it from the query's own
    /// reads. Empty when no coarser window fits whole in the range.
    fn rank_spans(&self, tables: &[MetricSpec], now: Millis) -> Vec<Span> {
        let last = self.start + self.buckets() as Millis * self.resolution;
        let mut sizes: Vec<Millis> = tables
            .iter()
            .filter(|t| t.dimensions == self.dimensions)
            .flat_map(|t| t.windows.iter().filter(|w| w.is_tumbling()))
            .map(WindowSpec::size)
            .filter(|size| *size > self.resolution && size % self.resolution == 0)
            .collect();
        sizes.sort_unstable_by(|a, b| b.cmp(a));
        let needed: Vec<&str> = self.dimensions.iter().map(String::as_str).collect();
        for size in sizes {
            let (from, to) = (align(self.start + size - 1, size), align(last, size));
            if to <= from {
                continue;
            }
            let Some(choice) = rollup::choose(tables, &needed, from, to, size, now) else {
                continue;
            };
            if choice.table.dimensions != self.dimensions || choice.resolution != size {
                continue;
            }
            let own = |start, end| Span {
                start,
                end,
                reads: self.reads.clone(),
            };
            let mut spans = Vec::new();
            if self.start < from {
                spans.push(own(self.start, from));
            }
            spans.push(Span {
                start: from,
                end: to,
                reads: reads(&choice),
            });
            if to < self.end {
                spans.push(own(to, self.end));
            }
            return spans;
        }
        Vec::new()
    }

    /// The filters as `(dimension, value)` names.
    pub fn filter_names(&self) -> Vec<(String, String)> {
        self.filters
            .iter()
            .map(|(d, v)| (self.dimensions[*d].clone(), v.clone()))
            .collect()
    }

    /// The one group a store needs to read, when the filters name a value
    /// for every dimension of the table read: its values in the table's
    /// order. A store may then read that group's rows alone.
    pub fn only_group(&self) -> Option<Vec<String>> {
        (0..self.dimensions.len())
            .map(|d| {
                self.filters
                    .iter()
                    .find(|(f, _)| *f == d)
                    .map(|(_, v)| v.clone())
            })
            .collect()
    }

    /// Whether each bucket of a series is one stored window of `read`, so
    /// that a `uniq` needs the estimate stored with its sketch rather than
    /// the sketch: a filter on every dimension of the table but the one
    /// grouped by (or none to filter), and the read's window as wide as a
    /// bucket. A grouped query still merges sketches to rank its groups.
    pub fn by_estimate(&self, read: &Read) -> bool {
        self.aggregate == AggregateKind::Uniq
            && read.window.size() == self.resolution
            && (0..self.dimensions.len())
                .all(|d| self.group_by == Some(d) || self.filters.iter().any(|(f, _)| *f == d))
    }

    /// The buckets a first pass may hold for the groups it ranks: points,
    /// and for `quantiles` and `topk` sketches.
    fn max_held(&self) -> usize {
        if self.aggregate.holds_large_sketch() {
            self.max_points.min(self.max_sketches)
        } else {
            self.max_points
        }
    }

    /// The buckets of the answer.
    fn buckets(&self) -> usize {
        bucket_count(self.start, self.end, self.resolution)
    }

    /// The bucket of a stored window of `group` starting at `start`; `None`
    /// outside the range or the filters.
    fn bucket(&self, start: Millis, group: &[&str]) -> Option<usize> {
        (start >= self.start && start < self.end && self.passes(group))
            .then(|| ((start - self.start) / self.resolution) as usize)
    }

    /// Whether a stored group, given as its dimension values, passes the
    /// filters.
    fn passes(&self, group: &[&str]) -> bool {
        self.filters
            .iter()
            .all(|(d, v)| group.get(*d) == Some(&v.as_str()))
    }
}

/// Stored windows folded, one row at a time, into a query's answer.
///
/// Without `groupBy` one pass reads the rows into the answer's buckets.
/// With it, the first pass totals each group over the range, and keeps the
/// groups' buckets too while they fit in `history.max_points`; if they did
/// not, a second pass reads the buckets of the `top` groups alone. Memory
/// is therefore bounded by the totals of `max_groups` groups and by
/// `max_points` buckets, however many rows the store holds. A query with
/// [`Query::rank`] spans totals its groups over them, one pass each, and
/// then reads the buckets of the `top` groups.
#[derive(Clone, Debug)]
pub struct Fold {
    query: Query,
    stage: Stage,
    /// Set when a bound was hit; the scan stops there.
    refused: Option<QueryError>,
    /// Rows the store has streamed in, over every pass.
    rows: u64,
}

#[derive(Clone, Debug)]
enum Stage {
    /// No `groupBy`: one series.
    Single(Buckets),
    /// Each group's total, and each group's buckets until they no longer
    /// fit in the answer (or, ranking from `query.rank`, none); `span` is
    /// the rank span this pass reads.
    Rank {
        totals: HashMap<String, AggState>,
        buckets: Option<HashMap<String, Buckets>>,
        span: usize,
    },
    /// The chosen groups' buckets, ranked, after a first pass found
    /// `groups` groups.
    Chosen {
        groups: usize,
        ranked: Vec<String>,
        buckets: HashMap<String, Buckets>,
    },
}

/// One series' buckets: the states merged into each, and the estimate
/// that answers a bucket which is one stored window (see
/// [`Fold::add_estimated`]).
#[derive(Clone, Debug, Default)]
struct Buckets {
    states: Vec<AggState>,
    estimates: Vec<Option<f64>>,
}

impl Buckets {
    fn new(width: usize) -> Buckets {
        Buckets {
            states: vec![AggState::default(); width],
            estimates: Vec::new(),
        }
    }

    fn estimate(&mut self, bucket: usize, estimate: f64) {
        self.estimates.resize(self.states.len(), None);
        self.estimates[bucket] = Some(estimate);
    }

    fn value(&self, bucket: usize, aggregate: AggregateKind, ask: &Ask) -> Option<Value> {
        match self.estimates.get(bucket) {
            Some(Some(estimate)) => Some(Value::Number(*estimate)),
            _ => self.states[bucket].value(aggregate, ask),
        }
    }
}

/// Where a scan of the store leaves a [`Fold`].
#[derive(Debug)]
pub enum Pass {
    /// The answer is complete.
    Done(Answer),
    /// The store must be scanned again with this fold.
    Again(Box<Fold>),
}

/// A history query's answer.
#[derive(Debug, PartialEq)]
pub struct Answer {
    /// The series: one without `groupBy`, else at most `top`, largest first.
    pub series: Vec<Series>,
    /// With `groupBy`, how many groups the range holds.
    pub groups: usize,
    /// Rows read from the store to make it, over every pass.
    pub rows: u64,
}

impl Fold {
    /// A fold for the first scan of `query`.
    pub fn new(query: Query) -> Fold {
        let stage = match query.group_by {
            None => Stage::Single(Buckets::new(query.buckets())),
            Some(_) => Stage::Rank {
                totals: HashMap::new(),
                buckets: query.rank.is_empty().then(HashMap::new),
                span: 0,
            },
        };
        Fold {
            query,
            stage,
            refused: None,
            rows: 0,
        }
    }

    /// The query being answered.
    pub fn query(&self) -> &Query {
        &self.query
    }

    /// What the store must read for this pass.
    pub fn scan(&self) -> Scan {
        let q = &self.query;
        let (start, end, reads) = match &self.stage {
            Stage::Rank { span, .. } if !q.rank.is_empty() => {
                let span = &q.rank[*span];
                (span.start, span.end, span.reads.clone())
            }
            _ => (q.start, q.end, q.reads.clone()),
        };
        let ranking = matches!(self.stage, Stage::Rank { .. });
        Scan {
            metric: q.metric.clone(),
            reads,
            start,
            end,
            only: q.only_group(),
            estimates: (!ranking && q.by_estimate(&q.reads[0])).then_some(q.resolution),
        }
    }

    /// Folds in one stored window: its start, its group's dimension values
    /// and its state. Rows outside the range or the filters are ignored.
    /// Breaks when the query has hit a bound; [`Fold::finish`] says which.
    pub fn add(&mut self, start: Millis, group: &[&str], state: &AggState) -> ControlFlow<()> {
        self.rows += 1;
        let q = &self.query;
        let Some(bucket) = q.bucket(start, group) else {
            return ControlFlow::Continue(());
        };
        match &mut self.stage {
            Stage::Single(series) => series.states[bucket].merge(state),
            Stage::Rank {
                totals, buckets, ..
            } => {
                let value = q.group_value(group);
                // A topk ranks its groups by their events: the total needs
                // no sketch.
                let ranked = match q.aggregate {
                    AggregateKind::TopK { .. } => &AggState::from_parts(state.count, 0.0, None),
                    _ => state,
                };
                let bound = match q.aggregate {
                    AggregateKind::Quantiles { .. } => q.max_groups.min(q.max_sketches),
                    _ => q.max_groups,
                };
                if let Some(total) = totals.get_mut(value) {
                    total.merge(ranked);
                } else if totals.len() == bound && bound < q.max_groups {
                    self.refused = Some(QueryError {
                        parameter: "groupBy".into(),
                        problem: format!(
                            "ranking the groups of {} by their quantiles would hold more than {} sketches \
                             (history.max_sketches); filter by another dimension or shorten the range",
                            q.dimensions[q.group_by.unwrap_or(0)],
                            q.max_sketches
                        ),
                        refusal: Refusal::Sketches,
                    });
                    return ControlFlow::Break(());
                } else if totals.len() == q.max_groups {
                    self.refused = Some(QueryError {
                        parameter: "groupBy".into(),
                        problem: format!(
                            "the range holds more than {} groups of {} (history.max_groups); \
                             filter by another dimension or shorten the range",
                            q.max_groups,
                            q.dimensions[q.group_by.unwrap_or(0)]
                        ),
                        refusal: Refusal::Groups,
                    });
                    return ControlFlow::Break(());
                } else {
                    totals.insert(value.to_owned(), ranked.clone());
                }
                if let Some(series) = buckets {
                    let width = q.buckets();
                    if !series.contains_key(value) && (series.len() + 1) * width > q.max_held() {
                        // From here on the second pass reads the buckets.
                        *buckets = None;
                    } else {
                        series
                            .entry(value.to_owned())
                            .or_insert_with(|| Buckets::new(width))
                            .states[bucket]
                            .merge(state);
                    }
                }
            }
            Stage::Chosen { buckets, .. } => {
                if let Some(series) = buckets.get_mut(q.group_value(group)) {
                    series.states[bucket].merge(state);
                }
            }
        }
        ControlFlow::Continue(())
    }

    /// Folds in a stored window of a read the scan answers by estimates
    /// ([`Scan::by_estimate`]): `state` without its sketch, and the value
    /// the sketch estimated when it was stored. The window is the only one
    /// its bucket holds, so its estimate is the bucket's value.
    pub fn add_estimated(
        &mut self,
        start: Millis,
        group: &[&str],
        state: &AggState,
        estimate: f64,
    ) -> ControlFlow<()> {
        let flow = self.add(start, group, state);
        if let Some(bucket) = self.query.bucket(start, group) {
            let series = match &mut self.stage {
                Stage::Single(series) => Some(series),
                Stage::Chosen { buckets, .. } => buckets.get_mut(self.query.group_value(group)),
                Stage::Rank { .. } => None,
            };
            if let Some(series) = series {
                series.estimate(bucket, estimate);
            }
        }
        flow
    }

    /// The answer after a scan, or the fold for another scan, or the bound
    /// the query hit.
    pub fn finish(self) -> Result<Pass, QueryError> {
        if let Some(refused) = self.refused {
            return Err(refused);
        }
        let Fold {
            query, stage, rows, ..
        } = self;
        let done = |mut answer: Answer| {
            answer.rows = rows;
            Pass::Done(answer)
        };
        let again = |query, stage| {
            Pass::Again(Box::new(Fold {
                query,
                stage,
                refused: None,
                rows,
            }))
        };
        Ok(match stage {
            Stage::Single(series) => done(Answer {
                series: vec![query.series(Vec::new(), &series)],
                groups: 0,
                rows,
            }),
            Stage::Rank {
                totals,
                buckets,
                span,
            } if span + 1 < query.rank.len() => again(
                query,
                Stage::Rank {
                    totals,
                    buckets,
                    span: span + 1,
                },
            ),
            Stage::Rank {
                totals, buckets, ..
            } => {
                let groups = totals.len();
                let ranked = query.rank(totals);
                match buckets {
                    Some(mut buckets) => done(query.answer(groups, ranked, &mut buckets)),
                    None => {
                        let width = query.buckets();
                        let buckets = ranked
                            .iter()
                            .map(|g| (g.clone(), Buckets::new(width)))
                            .collect();
                        again(
                            query,
                            Stage::Chosen {
                                groups,
                                ranked,
                                buckets,
                            },
                        )
                    }
                }
            }
            Stage::Chosen {
                groups,
                ranked,
                mut buckets,
            } => done(query.answer(groups, ranked, &mut buckets)),
        })
    }
}

impl Query {
    /// The value of the dimension grouped by in a stored group.
    fn group_value<'g>(&self, group: &[&'g str]) -> &'g str {
        self.group_by
            .and_then(|d| group.get(d).copied())
            .unwrap_or_default()
    }

    /// The `top` groups, largest total first (see [`AggState::rank`]);
    /// groups without a value (avg of nothing) last, and ties in the order
    /// of their names.
    fn rank(&self, totals: HashMap<String, AggState>) -> Vec<String> {
        let mut ranked: Vec<(Option<f64>, String)> = totals
            .into_iter()
            .map(|(group, total)| (total.rank(self.aggregate, &self.ask), group))
            .collect();
        ranked.sort_by(|(a, ga), (b, gb)| {
            let by_value = match (a, b) {
                (Some(a), Some(b)) => b.total_cmp(a),
                (a, b) => b.is_some().cmp(&a.is_some()),
            };
            by_value.then_with(|| ga.cmp(gb))
        });
        ranked.truncate(self.top);
        ranked.into_iter().map(|(_, group)| group).collect()
    }

    fn answer(
        &self,
        groups: usize,
        ranked: Vec<String>,
        buckets: &mut HashMap<String, Buckets>,
    ) -> Answer {
        let dimension = &self.dimensions[self.group_by.unwrap_or(0)];
        let series = ranked
            .into_iter()
            .map(|group| {
                let series = buckets.remove(&group).unwrap_or_default();
                self.series(vec![(dimension.clone(), group)], &series)
            })
            .collect();
        Answer {
            series,
            groups,
            rows: 0,
        }
    }

    fn series(&self, group: Vec<(String, String)>, series: &Buckets) -> Series {
        Series {
            group,
            points: (0..series.states.len())
                .map(|i| {
                    (
                        self.start + i as Millis * self.resolution,
                        series.value(i, self.aggregate, &self.ask),
                    )
                })
                .collect(),
        }
    }
}

/// What is read for a planner's choice: its window, then the finer ones.
fn reads(choice: &rollup::Choice) -> Vec<Read> {
    std::iter::once((choice.table, choice.window))
        .chain(choice.finer.iter().copied())
        .map(|(t, window)| Read {
            version: crate::fingerprint::metric(t),
            window,
        })
        .collect()
}

/// The buckets of `resolution` from `start`, which is aligned to it, that
/// cover the range up to `end`.
fn bucket_count(start: Millis, end: Millis, resolution: Millis) -> usize {
    ((end - start + resolution - 1) / resolution) as usize
}

/// What a query asks of a sketch's values: `quantiles=0.5,0.9,0.99` of a
/// `quantiles` metric (those by default), `k=N` items of a `topk` one (at
/// most, and by default, its configured `k`).
fn ask(kind: AggregateKind, quantiles: Option<&str>, k: Option<&str>) -> Result<Ask, QueryError> {
    let mut ask = Ask::default_for(kind);
    match (kind, quantiles) {
        (_, None) => {}
        (AggregateKind::Quantiles { .. }, Some(text)) => {
            ask.quantiles = text
                .split(',')
                .map(|q| {
                    q.trim()
                        .parse::<f64>()
                        .ok()
                        .filter(|q| (0.0..=1.0).contains(q))
                        .ok_or_else(|| {
                            bad(
                                "quantiles",
                                format!("'{q}' must be a number from 0 to 1, such as 0.99"),
                            )
                        })
                })
                .collect::<Result<_, _>>()?;
            if ask.quantiles.len() > MAX_QUANTILES {
                return Err(bad(
                    "quantiles",
                    format!("asks for more than {MAX_QUANTILES} quantiles"),
                ));
            }
        }
        (_, Some(_)) => return Err(bad("quantiles", format!("a {kind} metric has none"))),
    }
    match (kind, k) {
        (_, None) => {}
        (AggregateKind::TopK { k: most }, Some(text)) => {
            ask.items = text
                .parse::<usize>()
                .ok()
                .filter(|n| (1..=most as usize).contains(n))
                .ok_or_else(|| {
                    bad(
                        "k",
                        format!("'{text}' must be an integer from 1 to the metric's k, {most}"),
                    )
                })?;
        }
        (_, Some(_)) => return Err(bad("k", format!("a {kind} metric has no items"))),
    }
    Ok(ask)
}

/// The most quantiles one query may ask for.
const MAX_QUANTILES: usize = 20;

/// The latest time a query may name: the end of the year 9999, as for events.
const LAST_MS: Millis = 253_402_300_799_999;

/// Parses RFC 3339 or Unix seconds, between 1970 and 9999.
fn parse_time(parameter: &str, value: &str) -> Result<Millis, QueryError> {
    let ms = match value.parse::<f64>() {
        Ok(seconds) if seconds.is_finite() => Some((seconds * 1000.0).round() as Millis),
        _ => parse_rfc3339(value),
    }
    .ok_or_else(|| {
        bad(
            parameter,
            format!("'{value}' is neither RFC 3339 nor Unix seconds"),
        )
    })?;
    if !(0..=LAST_MS).contains(&ms) {
        return Err(bad(parameter, format!("'{value}' is outside 1970 to 9999")));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::Field;
    use crate::config::Config;

    fn config() -> Config {
        Config::load(
            Some(
                r#"
[[metric]]
name = "ad_clicks"
event_type = "ad_click"
dimensions = ["campaignId", "country"]
windows = ["tumbling 10s", "tumbling 1m", "sliding 5m every 10s"]
# The fold is tested on the metric's own rows; the planner in rollup.rs.
rollups = []
projections = []
"#,
            ),
            [],
        )
        .unwrap()
    }

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// A quantiles and a topk metric by endpoint, minutes, at most 100
    /// sketches a query.
    fn sketched() -> Config {
        let metric = |name: &str, kind: &str, field: &str| {
            format!(
                "[[metric]]\nname = \"{name}\"\naggregate = \"{kind}\"\nfield = \"{field}\"\n\
                 dimensions = [\"endpoint\"]\nwindows = [\"tumbling 1m\"]\nrollups = []\nprojections = []\n"
            )
        };
        let text = format!(
            "[history]\nmax_sketches = 100\n{}{}",
            metric("latency", "quantiles", "values.ms"),
            metric("paths", "topk", "dimensions.path")
        );
        Config::load(Some(&text), []).unwrap()
    }

    /// An event of `endpoint` with a latency and a path.
    struct Request(String, f64);

    impl crate::event::Fields for Request {
        fn dimension(&self, name: &str) -> Option<&str> {
            (name == "path").then_some(self.0.as_str())
        }
        fn value(&self, name: &str) -> Option<f64> {
            (name == "ms").then_some(self.1)
        }
    }

    #[test]
    fn a_query_holds_at_most_max_sketches_of_quantiles_or_topk() {
        let c = sketched();
        let parse = |p: &[(&str, &str)]| Query::parse(&params(p), &c.metrics, &c.history, 0);
        // A day at one minute: 1,440 sketches.
        let refused =
            parse(&[("metric", "latency"), ("start", "0"), ("end", "86400")]).unwrap_err();
        assert_eq!(
            (refused.parameter.as_str(), refused.refusal),
            ("resolution", Refusal::Sketches)
        );
        assert!(
            refused.problem.contains("history.max_sketches"),
            "{refused}"
        );
        // An hour by endpoint, top 1: 60 sketches of points, but ranking
        // 150 endpoints by their quantiles would hold 150 more.
        let hour = [
            ("start", "0"),
            ("end", "3600"),
            ("groupBy", "endpoint"),
            ("top", "1"),
        ];
        let fold = |metric: &str| -> Result<Pass, QueryError> {
            let mut p = vec![("metric", metric)];
            p.extend(hour);
            let q = parse(&p).unwrap();
            let kind = q.aggregate;
            let field = c
                .metrics
                .iter()
                .find(|m| m.name == metric)
                .unwrap()
                .field
                .clone();
            let rows: Vec<(String, AggState)> = (0..150)
                .map(|endpoint| {
                    let mut state = AggState::default();
                    let request = Request(format!("/p{}", endpoint % 7), endpoint as f64);
                    for _ in 0..=endpoint {
                        state.observe(kind, field.as_ref(), &request);
                    }
                    (format!("/e{endpoint}"), state)
                })
                .collect();
            let mut fold = Fold::new(q);
            loop {
                for (name, state) in &rows {
                    if fold.add(0, &[name.as_str()], state).is_break() {
                        break;
                    }
                }
                match fold.finish()? {
                    Pass::Again(again) => fold = *again,
                    done => return Ok(done),
                }
            }
        };
        let refused = fold("latency").unwrap_err();
        assert_eq!(
            (refused.parameter.as_str(), refused.refusal),
            ("groupBy", Refusal::Sketches)
        );
        // A topk ranks by events, with no sketch: the busiest endpoint.
        let Ok(Pass::Done(answer)) = fold("paths") else {
            panic!("topk ranks 150 groups")
        };
        assert_eq!((answer.groups, answer.series.len()), (150, 1));
        assert_eq!(
            answer.series[0].group,
            [("endpoint".to_string(), "/e149".to_string())]
        );
        let Some(Value::Items(items)) = &answer.series[0].points[0].1 else {
            panic!("a list of items")
        };
        assert_eq!((items[0].item.as_str(), items[0].count), ("/p2", 150));
    }

    #[test]
    fn picks_the_widest_dividing_window() {
        let q = Query::parse(
            &params(&[
                ("metric", "ad_clicks"),
                ("start", "0"),
                ("end", "3600"),
                ("resolution", "5m"),
            ]),
            &config().metrics,
            &config().history,
            0,
        )
        .unwrap();
        assert_eq!(q.window.to_string(), "tumbling 1m");
        let q = Query::parse(
            &params(&[
                ("metric", "ad_clicks"),
                ("start", "0"),
                ("end", "60"),
                ("resolution", "30s"),
            ]),
            &config().metrics,
            &config().history,
            0,
        )
        .unwrap();
        assert_eq!(q.window.to_string(), "tumbling 10s");
    }

    #[test]
    fn names_the_bad_parameter() {
        let c = config();
        let err = |p: &[(&str, &str)]| {
            Query::parse(&params(p), &c.metrics, &c.history, 0)
                .unwrap_err()
                .parameter
        };
        assert_eq!(err(&[("metric", "nope")]), "metric");
        assert_eq!(
            err(&[("metric", "ad_clicks"), ("start", "yesterday")]),
            "start"
        );
        assert_eq!(
            err(&[("metric", "ad_clicks"), ("start", "-9e15"), ("end", "9e15")]),
            "end"
        );
        assert_eq!(
            err(&[
                ("metric", "ad_clicks"),
                ("start", "0"),
                ("end", "9e9"),
                ("resolution", "1m")
            ]),
            "resolution"
        );
        assert_eq!(
            err(&[
                ("metric", "ad_clicks"),
                ("start", "0"),
                ("end", "60"),
                ("resolution", "15s")
            ]),
            "resolution"
        );
        assert_eq!(
            err(&[
                ("metric", "ad_clicks"),
                ("start", "0"),
                ("end", "60"),
                ("planet", "mars")
            ]),
            "planet"
        );
        assert_eq!(
            err(&[
                ("metric", "ad_clicks"),
                ("start", "0"),
                ("end", "60"),
                ("groupBy", "planet")
            ]),
            "groupBy"
        );
    }

    fn query(pairs: &[(&str, &str)]) -> Query {
        let mut all = vec![
            ("metric", "ad_clicks"),
            ("start", "2026-06-07T10:00:00Z"),
            ("end", "2026-06-07T10:03:00Z"),
            ("resolution", "1m"),
        ];
        all.extend_from_slice(pairs);
        Query::parse(&params(&all), &config().metrics, &config().history, 0).unwrap()
    }

    fn count(n: u64) -> AggState {
        AggState {
            count: n,
            ..Default::default()
        }
    }

    /// Scans `rows` as a store would, as often as the fold asks.
    fn scan(query: Query, rows: &[(Millis, [&str; 2], u64)]) -> Result<Answer, QueryError> {
        let mut fold = Fold::new(query);
        let mut scans = 0;
        loop {
            scans += 1;
            assert!(scans <= 2, "a query takes at most two scans");
            for (offset, group, n) in rows {
                let start = fold.query().start + offset;
                if fold.add(start, group, &count(*n)).is_break() {
                    break;
                }
            }
            match fold.finish()? {
                Pass::Done(answer) => return Ok(answer),
                Pass::Again(again) => fold = *again,
            }
        }
    }

    fn values(series: &Series) -> Vec<Option<f64>> {
        series
            .points
            .iter()
            .map(|p| match &p.1 {
                Some(Value::Number(n)) => Some(*n),
                None => None,
                Some(other) => panic!("{other:?} is not a number"),
            })
            .collect()
    }

    #[test]
    fn every_bucket_is_present_and_groups_rank_by_their_total() {
        let rows = [
            (0, ["c1", "US"], 2),
            (0, ["c1", "DE"], 1),
            (120_000, ["c1", "US"], 5),
            (60_000, ["c2", "FR"], 9),
            // Outside the range, and outside the filter below.
            (180_000, ["c1", "US"], 100),
        ];
        let answer = scan(query(&[("groupBy", "country")]), &rows).unwrap();
        assert_eq!(answer.groups, 3);
        let groups: Vec<&str> = answer
            .series
            .iter()
            .map(|s| s.group[0].1.as_str())
            .collect();
        assert_eq!(groups, ["FR", "US", "DE"]);
        assert_eq!(values(&answer.series[1]), [Some(2.0), Some(0.0), Some(5.0)]);

        let answer = scan(
            query(&[("groupBy", "country"), ("campaignId", "c1")]),
            &rows,
        )
        .unwrap();
        assert_eq!(answer.groups, 2);
        assert_eq!(values(&answer.series[0]), [Some(2.0), Some(0.0), Some(5.0)]);

        let answer = scan(query(&[]), &rows).unwrap();
        assert_eq!(values(&answer.series[0]), [Some(3.0), Some(9.0), Some(5.0)]);
    }

    #[test]
    fn top_keeps_the_largest_groups_in_bounded_memory() {
        let rows: Vec<(Millis, [&str; 2], u64)> = (0..50u64)
            .map(|i| (60_000 * (i as i64 % 3), ["c1", COUNTRIES[i as usize]], i))
            .collect();
        let mut q = query(&[("groupBy", "country"), ("top", "3")]);
        // Buckets for two groups fit, so the first scan cannot answer.
        q.max_points = 6;
        let answer = scan(q.clone(), &rows).unwrap();
        assert_eq!(answer.groups, 50);
        let groups: Vec<&str> = answer
            .series
            .iter()
            .map(|s| s.group[0].1.as_str())
            .collect();
        assert_eq!(groups, [COUNTRIES[49], COUNTRIES[48], COUNTRIES[47]]);
        assert_eq!(
            values(&answer.series[0]),
            [None, Some(49.0), None].map(|v| v.or(Some(0.0)))
        );

        q.max_groups = 49;
        let refused = scan(q, &rows).unwrap_err();
        assert_eq!(
            (refused.parameter.as_str(), refused.refusal),
            ("groupBy", Refusal::Groups)
        );
    }

    /// A store of `(read, start, country, state)` rows, scanned as
    /// SQLite and ClickHouse do; the answer, and how many rows came with
    /// their sketch.
    fn scan_store(query: Query, rows: &[(Read, Millis, &str, AggState)]) -> (Answer, usize) {
        let mut fold = Fold::new(query);
        let mut sketches = 0;
        loop {
            let scan = fold.scan();
            let mut from = scan.start;
            for read in &scan.reads {
                let mut last = None;
                for (_, start, country, state) in rows
                    .iter()
                    .filter(|(r, start, ..)| r == read && (from..scan.end).contains(start))
                {
                    last = Some(*start);
                    let group = [*country];
                    if scan.by_estimate(read) {
                        let bare = AggState::from_parts(state.count, 0.0, None);
                        let estimate = state.sketch.as_ref().unwrap().estimate().unwrap();
                        let _ = fold.add_estimated(*start, &group, &bare, estimate);
                    } else {
                        sketches += 1;
                        let _ = fold.add(*start, &group, state);
                    }
                }
                if let Some(last) = last {
                    from = last + read.window.size();
                }
            }
            match fold.finish().unwrap() {
                Pass::Done(answer) => return (answer, sketches),
                Pass::Again(again) => fold = *again,
            }
        }
    }

    #[test]
    fn a_grouped_uniq_ranks_from_the_days_and_answers_from_the_hours_estimates() {
        struct User(String);
        impl crate::event::Fields for User {
            fn dimension(&self, _: &str) -> Option<&str> {
                Some(&self.0)
            }
            fn value(&self, _: &str) -> Option<f64> {
                None
            }
        }
        let config = Config::load(
            Some(
                r#"
[[metric]]
name = "visitors"
event_type = "visit"
dimensions = ["country"]
aggregate = "uniq"
field = "dimensions.userId"
windows = ["tumbling 1h"]
rollups = ["tumbling 1d"]
projections = []
"#,
            ),
            [],
        )
        .unwrap();
        let tables = rollup::tables(&config.metrics[0]);
        let read = |t: usize| Read {
            version: crate::fingerprint::metric(&tables[t]),
            window: tables[t].windows[0],
        };
        let (hour, day) = (read(0), read(1));
        const H: Millis = 3_600_000;
        let day0 = 20_000 * 24 * H;
        let field = Field::Dimension("userId".into());
        let users = |ids: &mut dyn Iterator<Item = u64>| {
            let mut state = AggState::default();
            for id in ids {
                state.observe(AggregateKind::Uniq, Some(&field), &User(format!("u{id}")));
            }
            state
        };
        // US: the same 20 users every hour. DE: 5 new users each hour, so
        // more over the range, fewer in any hour. The day rollup of day 2
        // is not made yet: its hours are read instead.
        let mut rows = Vec::new();
        for h in 0..4 * 24 {
            let start = day0 + h * H;
            rows.push((hour.clone(), start, "US", users(&mut (0..20))));
            rows.push((
                hour.clone(),
                start,
                "DE",
                users(&mut (h as u64 * 5..h as u64 * 5 + 5)),
            ));
        }
        for d in [0, 1, 3] {
            for country in ["US", "DE"] {
                let mut total = AggState::default();
                for (_, start, c, state) in &rows {
                    if *c == country && (start - day0) / (24 * H) == d {
                        total.merge(state);
                    }
                }
                rows.push((day.clone(), day0 + d * 24 * H, country, total));
            }
        }
        let q = Query::parse(
            &params(&[
                ("metric", "visitors"),
                ("start", &((day0 + 20 * H) / 1000).to_string()),
                ("end", &((day0 + 3 * 24 * H + 5 * H) / 1000).to_string()),
                ("resolution", "1h"),
                ("groupBy", "country"),
            ]),
            &config.metrics,
            &config.history,
            day0 + 10 * 24 * H,
        )
        .unwrap();
        let spans: Vec<(Millis, Millis, usize)> = q
            .rank
            .iter()
            .map(|s| ((s.start - day0) / H, (s.end - day0) / H, s.reads.len()))
            .collect();
        assert_eq!(spans, [(20, 24, 1), (24, 72, 2), (72, 77, 1)]);

        let (answer, sketches) = scan_store(q.clone(), &rows);
        let plain = Query {
            rank: Vec::new(),
            ..q
        };
        let (expected, all) = scan_store(plain, &rows);
        assert_eq!(answer.series, expected.series);
        assert_eq!(answer.series[0].group[0].1, "DE");
        assert_eq!(values(&answer.series[1])[..2], [Some(20.0), Some(20.0)]);
        // 4 + 5 hours at the edges, day 1, and the 24 hours of day 2, for
        // each country; the plain plan merges all 57 hours.
        assert_eq!((sketches, all), (2 * (4 + 1 + 24 + 5), 2 * 57));
    }

    const COUNTRIES: [&str; 50] = [
        "a0", "a1", "a2", "a3", "a4", "a5", "a6", "a7", "a8", "a9", "b0", "b1", "b2", "b3", "b4",
        "b5", "b6", "b7", "b8", "b9", "c0", "c1", "c2", "c3", "c4", "c5", "c6", "c7", "c8", "c9",
        "d0", "d1", "d2", "d3", "d4", "d5", "d6", "d7", "d8", "d9", "e0", "e1", "e2", "e3", "e4",
        "e5", "e6", "e7", "e8", "e9",
    ];

    #[test]
    fn repeated_parameters_and_oversized_answers_are_refused() {
        let c = config();
        let refusal = |p: &[(&str, &str)]| {
            let e = Query::parse(&params(p), &c.metrics, &c.history, 3_600_000).unwrap_err();
            (e.parameter, e.refusal)
        };
        let invalid = |name: &str| (name.to_string(), Refusal::Invalid);
        let m = ("metric", "ad_clicks");
        assert_eq!(refusal(&[m, m]), invalid("metric"));
        assert_eq!(
            refusal(&[m, ("country", "US"), ("country", "DE")]),
            invalid("country")
        );
        assert_eq!(refusal(&[m, ("top", "5")]), invalid("top"));
        assert_eq!(
            refusal(&[m, ("groupBy", "country"), ("top", "0")]),
            invalid("top")
        );
        assert_eq!(
            refusal(&[m, ("groupBy", "country"), ("top", "1001")]),
            invalid("top")
        );
        let day = [m, ("start", "0"), ("end", "86400"), ("resolution", "10s")];
        assert!(
            Query::parse(&params(&day), &c.metrics, &c.history, 0).is_ok(),
            "8,640 buckets fit"
        );
        let grouped = [&day[..], &[("groupBy", "country"), ("top", "20")]].concat();
        assert_eq!(refusal(&grouped), ("top".to_string(), Refusal::Points));
        let grouped = [&day[..], &[("groupBy", "country")]].concat();
        assert!(
            Query::parse(&params(&grouped), &c.metrics, &c.history, 0).is_ok(),
            "10 series of 8,640 fit"
        );
        let year = [m, ("start", "0"), ("end", "31536000"), ("resolution", "1m")];
        assert_eq!(refusal(&year), ("resolution".to_string(), Refusal::Points));
    }
}
