//! Aggregates and their mergeable state.
//!
//! Every aggregate keeps the same state, [`AggState`]: an event count, an exact
//! sum, and for `uniq`, `quantiles` and `topk` a sketch from Apache
//! DataSketches: HyperLogLog (HLL_8, lg_k = 12, about 1.6% standard error),
//! KLL, or frequent items. All of them merge associatively and commutatively,
//! so a window's value does not depend on how its events were split among
//! workers, batches or panes: exactly for count, sum, avg and uniq, and for
//! KLL and frequent items within the error bound each states (see
//! [`AggregateKind::Quantiles`] and [`AggregateKind::TopK`]). The sum is kept
//! in fixed point (nanounits, `i128`) for that reason: floating-point addition
//! is not associative, and W = 1 and W = 4 must store the same numbers.

use std::fmt;

use datasketches::common::SearchCriteria;
use datasketches::frequencies::{ErrorType, FrequentItemsSketch};
use datasketches::hll::{HllSketch, HllType, HllUnion};
use datasketches::kll::{KllFloat, KllSketch};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::Fields;

/// log2 of the number of HLL registers.
const LG_K: u8 = 12;
/// Fixed-point scale of sums: values are kept to a billionth.
const SUM_SCALE: f64 = 1e9;
/// KLL's `k` when a `quantiles` metric names none: a normalized rank error
/// of about 1.3%.
pub const DEFAULT_QUANTILES_K: u16 = 200;
/// How many items a `topk` metric shows when it names no `k`.
pub const DEFAULT_TOPK_K: u16 = 10;
/// A frequent-items sketch keeps a map of at least this many entries per
/// item shown: exact counts for up to 48 distinct items per item shown, and
/// otherwise bounds no wider than 3.5 / (64 · k) of the events.
const FREQUENT_MAP_PER_ITEM: usize = 64;

/// What a metric computes over its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AggregateKind {
    /// The number of events.
    Count,
    /// The sum of a numeric value.
    Sum,
    /// The mean of a numeric value; empty windows have none.
    Avg,
    /// The approximate number of distinct values of a field (HyperLogLog).
    Uniq,
    /// Quantiles of a numeric value (KLL): each answered quantile's rank is
    /// within [`AggregateKind::rank_error`] of the one asked, with high
    /// probability. The count, the minimum and the maximum are exact.
    Quantiles {
        /// KLL's accuracy parameter.
        k: u16,
    },
    /// The most frequent values of a dimension (frequent items, a
    /// Misra-Gries sketch), largest first, each with bounds that always
    /// hold its true count.
    #[serde(rename = "topk")]
    TopK {
        /// How many items a value shows, at most.
        k: u16,
    },
}

impl AggregateKind {
    /// Parses `count`, `sum`, `avg`, `uniq`, `quantiles` or `topk`, the
    /// last two with their default `k`.
    pub fn parse(text: &str) -> Result<AggregateKind, String> {
        match text {
            "count" => Ok(AggregateKind::Count),
            "sum" => Ok(AggregateKind::Sum),
            "avg" => Ok(AggregateKind::Avg),
            "uniq" => Ok(AggregateKind::Uniq),
            "quantiles" => Ok(AggregateKind::Quantiles {
                k: DEFAULT_QUANTILES_K,
            }),
            "topk" => Ok(AggregateKind::TopK { k: DEFAULT_TOPK_K }),
            other => Err(format!(
                "unknown aggregate '{other}': use count, sum, avg, uniq, quantiles or topk"
            )),
        }
    }

    /// Whether this aggregate reads a field of the event.
    pub fn needs_field(&self) -> bool {
        !matches!(self, AggregateKind::Count)
    }

    /// The `k` of `quantiles` and `topk`.
    pub fn k(&self) -> Option<u16> {
        match self {
            AggregateKind::Quantiles { k } | AggregateKind::TopK { k } => Some(*k),
            _ => None,
        }
    }

    /// Whether a value of this aggregate is a large sketch (`quantiles`,
    /// `topk`): what `history.max_sketches` bounds in a query.
    pub fn holds_large_sketch(&self) -> bool {
        matches!(
            self,
            AggregateKind::Quantiles { .. } | AggregateKind::TopK { .. }
        )
    }

    /// For `quantiles`, KLL's normalized rank error for its `k`: an
    /// answered quantile's true rank is within it of the rank asked, with
    /// 99% confidence, over one window or any merge of windows and groups.
    pub fn rank_error(&self) -> Option<f64> {
        match self {
            AggregateKind::Quantiles { k } => Some(kll(*k).normalized_rank_error()),
            _ => None,
        }
    }
}

impl fmt::Display for AggregateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AggregateKind::Count => "count",
            AggregateKind::Sum => "sum",
            AggregateKind::Avg => "avg",
            AggregateKind::Uniq => "uniq",
            AggregateKind::Quantiles { .. } => "quantiles",
            AggregateKind::TopK { .. } => "topk",
        })
    }
}

/// The event field an aggregate reads.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Field {
    /// `values.<name>`: a number.
    Value(String),
    /// `dimensions.<name>`: a string, for `uniq`.
    Dimension(String),
}

impl Field {
    /// Parses `values.<name>` or `dimensions.<name>`.
    pub fn parse(text: &str) -> Result<Field, String> {
        match text.split_once('.') {
            Some(("values", name)) if !name.is_empty() => Ok(Field::Value(name.to_owned())),
            Some(("dimensions", name)) if !name.is_empty() => Ok(Field::Dimension(name.to_owned())),
            _ => Err(format!(
                "field '{text}' must be 'values.<name>' or 'dimensions.<name>'"
            )),
        }
    }
}

impl fmt::Display for Field {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Field::Value(name) => write!(f, "values.{name}"),
            Field::Dimension(name) => write!(f, "dimensions.{name}"),
        }
    }
}

/// What a window of one aggregate shows.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    /// count, sum, avg and uniq.
    Number(f64),
    /// quantiles: `(quantile, value)`, in the order asked.
    Quantiles(Vec<(f64, f64)>),
    /// topk: the most frequent items, largest first.
    Items(Vec<Item>),
}

/// One item of a `topk` value, with bounds that hold its true count.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Item {
    /// The dimension's value.
    pub item: String,
    /// The estimated count.
    pub count: u64,
    /// The true count is at least this.
    pub lower: u64,
    /// The true count is at most this.
    pub upper: u64,
}

/// What is asked of a sketch's value: which quantiles, how many items.
#[derive(Clone, Debug, PartialEq)]
pub struct Ask {
    /// The quantiles a `quantiles` value holds, each in `[0, 1]`.
    pub quantiles: Vec<f64>,
    /// The most items a `topk` value holds.
    pub items: usize,
}

/// The quantiles a `quantiles` value holds when none are asked for.
pub const DEFAULT_QUANTILES: [f64; 3] = [0.5, 0.9, 0.99];

impl Ask {
    /// What a metric's values show when the asker names nothing: the
    /// default quantiles, or the metric's `k` items.
    pub fn default_for(kind: AggregateKind) -> Ask {
        Ask {
            quantiles: DEFAULT_QUANTILES.to_vec(),
            items: match kind {
                AggregateKind::TopK { k } => k as usize,
                _ => 0,
            },
        }
    }
}

/// The mergeable state of one aggregate over some set of events.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AggState {
    /// Events seen.
    pub count: u64,
    /// Sum of the field, in billionths.
    pub sum: i128,
    /// The sketch of `uniq`, `quantiles` or `topk`.
    pub sketch: Option<Sketch>,
}

impl AggState {
    /// Adds one event. Events without the field still count, but add nothing
    /// to a sum or a sketch.
    pub fn observe(&mut self, kind: AggregateKind, field: Option<&Field>, event: &impl Fields) {
        self.count += 1;
        match (kind, field) {
            (AggregateKind::Sum | AggregateKind::Avg, Some(Field::Value(name))) => {
                if let Some(v) = event.value(name) {
                    self.sum = self.sum.saturating_add((v * SUM_SCALE).round() as i128);
                }
            }
            (AggregateKind::Uniq, Some(field)) => {
                let Form::Hll(sketch) = self.sketch(kind) else {
                    return;
                };
                match field {
                    Field::Dimension(name) => {
                        if let Some(item) = event.dimension(name) {
                            sketch.update(item);
                        }
                    }
                    Field::Value(name) => {
                        if let Some(v) = event.value(name) {
                            sketch.update(v.to_bits());
                        }
                    }
                }
            }
            (AggregateKind::Quantiles { .. }, Some(Field::Value(name))) => {
                // Values are finite: the event's validation refuses others.
                if let Some(v) = event.value(name).and_then(|v| KllFloat::<f64>::new(v).ok()) {
                    if let Form::Kll(sketch) = self.sketch(kind) {
                        sketch.update(v);
                    }
                }
            }
            (AggregateKind::TopK { .. }, Some(Field::Dimension(name))) => {
                if let Some(item) = event.dimension(name) {
                    if let Form::Frequent(sketch) = self.sketch(kind) {
                        sketch.update_ref(item);
                    }
                }
            }
            _ => {}
        }
    }

    /// The sketch of `kind`, made empty on first use.
    fn sketch(&mut self, kind: AggregateKind) -> &mut Form {
        &mut self.sketch.get_or_insert_with(|| Sketch::for_kind(kind)).0
    }

    /// Folds `other` into this state.
    pub fn merge(&mut self, other: &AggState) {
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        if let Some(theirs) = &other.sketch {
            match &mut self.sketch {
                Some(mine) => mine.merge(theirs),
                None => self.sketch = Some(theirs.clone()),
            }
        }
    }

    /// What a user sees: `None` for the mean, the quantiles or the top
    /// items of nothing.
    pub fn value(&self, kind: AggregateKind, ask: &Ask) -> Option<Value> {
        let sketch = self.sketch.as_ref().map(|s| &s.0);
        match kind {
            AggregateKind::Count => Some(Value::Number(self.count as f64)),
            AggregateKind::Sum => Some(Value::Number(self.sum as f64 / SUM_SCALE)),
            AggregateKind::Avg => (self.count > 0)
                .then(|| Value::Number(self.sum as f64 / SUM_SCALE / self.count as f64)),
            AggregateKind::Uniq => Some(Value::Number(
                self.sketch
                    .as_ref()
                    .and_then(Sketch::estimate)
                    .unwrap_or(0.0),
            )),
            AggregateKind::Quantiles { .. } => match sketch {
                Some(Form::Kll(kll)) if !kll.is_empty() => Some(Value::Quantiles(
                    ask.quantiles
                        .iter()
                        .filter_map(|q| {
                            let v = kll.quantile(*q, SearchCriteria::Inclusive).ok()??;
                            Some((*q, v.into_inner()))
                        })
                        .collect(),
                )),
                _ => None,
            },
            AggregateKind::TopK { .. } => match sketch {
                Some(Form::Frequent(sketch)) if !sketch.is_empty() => {
                    Some(Value::Items(top_items(sketch, ask.items)))
                }
                _ => None,
            },
        }
    }

    /// The number groups are ranked by, largest first: the value, the
    /// highest quantile asked, or for `topk` the count of events.
    pub fn rank(&self, kind: AggregateKind, ask: &Ask) -> Option<f64> {
        if let AggregateKind::TopK { .. } = kind {
            return Some(self.count as f64);
        }
        match self.value(kind, ask)? {
            Value::Number(n) => Some(n),
            Value::Quantiles(q) => q.iter().max_by(|a, b| a.0.total_cmp(&b.0)).map(|(_, v)| *v),
            Value::Items(_) => None,
        }
    }

    /// The sum as a float, for storage.
    pub fn sum_f64(&self) -> f64 {
        self.sum as f64 / SUM_SCALE
    }

    /// Rebuilds a state from stored parts.
    pub fn from_parts(count: u64, sum: f64, sketch: Option<Sketch>) -> AggState {
        AggState {
            count,
            sum: (sum * SUM_SCALE).round() as i128,
            sketch,
        }
    }
}

/// A frequent-items sketch's `n` most frequent items, by estimate, ties in
/// the items' order.
fn top_items(sketch: &FrequentItemsSketch<String>, n: usize) -> Vec<Item> {
    let mut rows = sketch.frequent_items(ErrorType::NoFalseNegatives);
    rows.sort_by(|a, b| {
        b.estimate()
            .cmp(&a.estimate())
            .then_with(|| a.item().cmp(b.item()))
    });
    rows.into_iter()
        .take(n)
        .map(|row| Item {
            item: row.item().clone(),
            count: row.estimate(),
            lower: row.lower_bound(),
            upper: row.upper_bound(),
        })
        .collect()
}

/// An empty KLL sketch of `k`, which [`AggregateKind`]'s bounds keep valid.
fn kll(k: u16) -> KllSketch<KllFloat<f64>> {
    KllSketch::new(k).expect("k is within KLL's range")
}

/// The sketch of an aggregate: a HyperLogLog sketch of distinct values, a
/// KLL sketch of a value's distribution, or a frequent-items sketch of a
/// dimension's values. A HyperLogLog estimate depends only on the set of
/// values, never on the order they arrived in; KLL and frequent items
/// depend on it within their error bounds.
///
/// A HyperLogLog sketch that takes values or other sketches is kept as a
/// DataSketches union, so folding many sketches into one (a pane taking
/// contributions, a query merging rows) costs one pass over each incoming
/// sketch, never a copy of the accumulated one. A sketch read from storage
/// stays as it was read until something is folded into it.
#[derive(Clone)]
pub struct Sketch(Form);

/// KLL and frequent items are boxed: a count's state has no sketch, and
/// its size is what every contribution moves.
#[derive(Clone)]
enum Form {
    Hll(Hll),
    Kll(Box<KllSketch<KllFloat<f64>>>),
    Frequent(Box<FrequentItemsSketch<String>>),
}

/// A HyperLogLog is one sketch until another is merged into it. A
/// contribution's sketch, made by its events, never becomes a union, so
/// merging it reads its coupons in place: a union must first be copied out
/// as a sketch.
#[derive(Clone)]
enum Hll {
    Union(HllUnion),
    /// Read from storage (as HLL_4), or made by updates (as HLL_8).
    One(HllSketch),
}

/// The most events a stored sketch may claim: 2^48, some thousand years
/// of a million events a second, so that merging 65,536 of them cannot
/// overflow a count.
pub const MAX_EVENTS: u64 = 1 << 48;

/// DataSketches' family ids, the third byte of every serialized sketch.
const FAMILY_FREQUENCY: u8 = 10;
const FAMILY_KLL: u8 = 15;

impl Sketch {
    /// An empty HyperLogLog sketch.
    pub fn new() -> Sketch {
        // LG_K is in the library's valid range [4, 21].
        Sketch(Form::Hll(Hll::One(
            HllSketch::new(LG_K, HllType::Hll8).expect("valid lg_k"),
        )))
    }

    /// An empty sketch of `kind`'s.
    fn for_kind(kind: AggregateKind) -> Sketch {
        match kind {
            AggregateKind::Quantiles { k } => Sketch(Form::Kll(Box::new(kll(k)))),
            AggregateKind::TopK { k } => {
                let size = (FREQUENT_MAP_PER_ITEM * k as usize).next_power_of_two();
                Sketch(Form::Frequent(Box::new(
                    FrequentItemsSketch::new(size).expect("a power of two map size"),
                )))
            }
            _ => Sketch::new(),
        }
    }

    /// Folds `other` into this sketch. Sketches of different families never
    /// meet: a metric has one aggregate, and its version names it.
    pub fn merge(&mut self, other: &Sketch) {
        match (&mut self.0, &other.0) {
            (Form::Hll(mine), Form::Hll(theirs)) => mine.merge(theirs),
            (Form::Kll(mine), Form::Kll(theirs)) => {
                // Only a stream weight past u64::MAX fails.
                mine.merge(theirs)
                    .expect("KLL sketches of one metric merge");
            }
            (Form::Frequent(mine), Form::Frequent(theirs)) => mine.merge(theirs),
            _ => debug_assert!(false, "sketches of different families merged"),
        }
    }

    /// The estimated number of distinct values of a HyperLogLog sketch,
    /// rounded to a whole number; `None` for the other sketches.
    pub fn estimate(&self) -> Option<f64> {
        match &self.0 {
            Form::Hll(Hll::Union(union)) => Some(union.composite_estimate().round()),
            Form::Hll(Hll::One(sketch)) => Some(sketch.composite_estimate().round()),
            Form::Kll(_) | Form::Frequent(_) => None,
        }
    }

    /// The sketch in DataSketches' portable binary form, which names its
    /// family. HyperLogLog is written as HLL_4: half the bytes of HLL_8 for
    /// a dense sketch, the same registers, and so the same estimate. A
    /// day's minutes of a metric's total are 1,440 dense sketches, which a
    /// history query reads over the network from ClickHouse.
    pub fn to_bytes(&self) -> Vec<u8> {
        match &self.0 {
            Form::Hll(Hll::Union(union)) => union.to_sketch(HllType::Hll4).serialize(),
            Form::Hll(Hll::One(sketch)) if sketch.target_type() == HllType::Hll4 => {
                sketch.serialize()
            }
            Form::Hll(Hll::One(sketch)) => union_of(sketch).to_sketch(HllType::Hll4).serialize(),
            Form::Kll(sketch) => sketch.serialize(),
            Form::Frequent(sketch) => sketch.serialize(),
        }
    }

    /// Reads a sketch written by [`Sketch::to_bytes`], of any family. A
    /// sketch that claims more than [`MAX_EVENTS`] events is refused:
    /// merging such sketches could overflow their count, which the library
    /// answers with a panic.
    pub fn from_bytes(bytes: &[u8]) -> Result<Sketch, String> {
        let form = match bytes.get(2) {
            Some(&FAMILY_KLL) => KllSketch::deserialize(bytes).map(|s| Form::Kll(Box::new(s))),
            Some(&FAMILY_FREQUENCY) => {
                FrequentItemsSketch::deserialize(bytes).map(|s| Form::Frequent(Box::new(s)))
            }
            // HyperLogLog, whose reader refuses bytes of any other family.
            _ => HllSketch::deserialize(bytes).map(|s| Form::Hll(Hll::One(s))),
        };
        let form = form.map_err(|e| e.to_string())?;
        let events = match &form {
            Form::Kll(s) => s.n(),
            Form::Frequent(s) => {
                // The library checks that its items' counts add up to no
                // more than its events, but not its error, which it adds
                // to them: in a sound sketch, the error is less.
                if s.maximum_error() > s.total_weight() {
                    return Err("the sketch's error exceeds its events".into());
                }
                s.total_weight()
            }
            Form::Hll(_) => 0,
        };
        if events > MAX_EVENTS {
            return Err(format!(
                "the sketch claims {events} events, more than any window holds"
            ));
        }
        Ok(Sketch(form))
    }

    /// A KLL sketch's count, minimum and maximum, which are exact.
    pub fn extremes(&self) -> Option<(u64, f64, f64)> {
        match &self.0 {
            Form::Kll(kll) => Some((
                kll.n(),
                kll.min_item().map_or(f64::NAN, |v| **v),
                kll.max_item().map_or(f64::NAN, |v| **v),
            )),
            _ => None,
        }
    }

    /// A KLL sketch's answer for the quantile `q`.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        match &self.0 {
            Form::Kll(kll) => kll
                .quantile(q, SearchCriteria::Inclusive)
                .ok()
                .flatten()
                .map(KllFloat::into_inner),
            _ => None,
        }
    }

    /// A frequent-items sketch's items, most frequent first, with the
    /// events it has seen.
    pub fn items(&self) -> Option<(Vec<Item>, u64)> {
        match &self.0 {
            Form::Frequent(sketch) => Some((top_items(sketch, usize::MAX), sketch.total_weight())),
            _ => None,
        }
    }
}

/// A union of one sketch.
fn union_of(sketch: &HllSketch) -> HllUnion {
    let mut union = HllUnion::new(LG_K).expect("valid lg_k");
    union.update(sketch);
    union
}

impl Hll {
    /// The union form, converting one sketch on first use.
    fn union(&mut self) -> &mut HllUnion {
        if let Hll::One(sketch) = self {
            *self = Hll::Union(union_of(sketch));
        }
        match self {
            Hll::Union(union) => union,
            Hll::One(_) => unreachable!("converted above"),
        }
    }

    /// Adds one value.
    fn update(&mut self, value: impl std::hash::Hash) {
        match self {
            Hll::One(sketch) => sketch.update(value),
            Hll::Union(union) => union.update_value(value),
        }
    }

    fn merge(&mut self, other: &Hll) {
        match other {
            Hll::One(sketch) => self.union().update(sketch),
            Hll::Union(union) => {
                let sketch = union.to_sketch(HllType::Hll8);
                self.union().update(&sketch);
            }
        }
    }
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch::new()
    }
}

impl fmt::Debug for Sketch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Form::Hll(_) => write!(f, "Sketch(~{:?})", self.estimate()),
            Form::Kll(kll) => write!(f, "Kll(n={})", kll.n()),
            Form::Frequent(s) => write!(f, "Frequent(n={})", s.total_weight()),
        }
    }
}

impl Serialize for Sketch {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(&self.to_bytes())
    }
}

impl<'de> Deserialize<'de> for Sketch {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let bytes: Vec<u8> = Deserialize::deserialize(deserializer)?;
        Sketch::from_bytes(&bytes).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::Event;

    fn event(user: &str, amount: f64) -> Event {
        Event {
            event_id: None,
            event_type: "purchase".into(),
            timestamp: 0,
            dimensions: [("userId".to_string(), user.to_string())].into(),
            values: [("amount".to_string(), amount)].into(),
        }
    }

    #[test]
    fn merge_is_order_independent() {
        let amount = Some(Field::Value("amount".into()));
        let user = Some(Field::Dimension("userId".into()));
        let events: Vec<_> = (0..1000)
            .map(|i| event(&format!("u{}", i % 300), 0.1 * i as f64))
            .collect();
        let ask = Ask::default_for(AggregateKind::Sum);
        let fold = |chunks: &[&[Event]]| {
            let mut total = AggState::default();
            let mut users = AggState::default();
            for chunk in chunks {
                let (mut a, mut u) = (AggState::default(), AggState::default());
                for e in *chunk {
                    a.observe(AggregateKind::Sum, amount.as_ref(), e);
                    u.observe(AggregateKind::Uniq, user.as_ref(), e);
                }
                total.merge(&a);
                users.merge(&u);
            }
            (
                total.value(AggregateKind::Sum, &ask),
                users.value(AggregateKind::Uniq, &ask),
            )
        };
        let (head, tail) = events.split_at(377);
        let one = fold(&[&events]);
        assert_eq!(one, fold(&[tail, head]));
        assert_eq!(one.0, Some(Value::Number(49950.0)));
        let Some(Value::Number(uniq)) = one.1 else {
            panic!("uniq is a number")
        };
        assert!((uniq - 300.0).abs() <= 6.0, "uniq estimate {uniq}");
    }

    #[test]
    fn avg_of_nothing_is_none() {
        let ask = Ask::default_for(AggregateKind::Avg);
        let empty = AggState::default();
        assert_eq!(empty.value(AggregateKind::Avg, &ask), None);
        assert_eq!(
            empty.value(AggregateKind::Uniq, &ask),
            Some(Value::Number(0.0))
        );
    }

    #[test]
    fn sketches_round_trip_through_bytes() {
        let mut s = AggState::default();
        for i in 0..100 {
            s.observe(
                AggregateKind::Uniq,
                Some(&user()),
                &event(&format!("u{i}"), 0.0),
            );
        }
        let s = s.sketch.unwrap();
        let back = Sketch::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back.estimate(), s.estimate());
        assert!(s.estimate().is_some());
    }

    fn user() -> Field {
        Field::Dimension("userId".into())
    }

    /// A value of a known, skewed distribution: exponential with mean 50,
    /// from a deterministic sequence.
    fn latency(i: u64) -> f64 {
        let mut z = i.wrapping_add(1).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        let u = ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64;
        (-50.0 * (1.0 - u).ln() * 1000.0).round() / 1000.0
    }

    fn quantiles_of(values: impl Iterator<Item = f64>) -> AggState {
        let kind = AggregateKind::Quantiles { k: 200 };
        let field = Field::Value("amount".into());
        let mut state = AggState::default();
        for v in values {
            state.observe(kind, Some(&field), &event("u", v));
        }
        state
    }

    /// How far the answers of `state` for the default quantiles are from
    /// the ranks asked, in the exact ranks of `truth`: the largest miss.
    fn rank_miss(state: &AggState, truth: &mut [f64]) -> f64 {
        truth.sort_by(f64::total_cmp);
        let n = truth.len() as f64;
        let kind = AggregateKind::Quantiles { k: 200 };
        let Some(Value::Quantiles(answers)) = state.value(kind, &Ask::default_for(kind)) else {
            panic!("quantiles of events have a value")
        };
        assert_eq!(answers.len(), DEFAULT_QUANTILES.len());
        answers
            .iter()
            .map(|(q, v)| {
                // The answer's true rank is any from the values below it
                // to the values at or below it.
                let below = truth.partition_point(|x| x < v) as f64 / n;
                let at_or_below = truth.partition_point(|x| x <= v) as f64 / n;
                (below - q).max(q - at_or_below).max(0.0)
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn quantiles_are_within_the_stated_rank_error() {
        let kind = AggregateKind::Quantiles { k: 200 };
        let epsilon = kind.rank_error().unwrap();
        assert!((0.01..0.02).contains(&epsilon), "rank error {epsilon}");
        let mut misses = Vec::new();
        // KLL's bound holds with 99% confidence for each answer; forty
        // rounds of three answers in each of three shapes show it holding
        // across its coin flips, where one round alone could be the 1%.
        for round in 0..40u64 {
            let base = round * 1_000_000;
            // One window of 20,000 values.
            let mut one: Vec<f64> = (0..20_000).map(|i| latency(base + i)).collect();
            misses.push(rank_miss(&quantiles_of(one.iter().copied()), &mut one));
            // A day of 1,440 one-minute windows merged.
            let mut day = AggState::default();
            let mut all = Vec::new();
            for minute in 0..1_440u64 {
                let values: Vec<f64> = (0..50).map(|i| latency(base + minute * 50 + i)).collect();
                day.merge(&quantiles_of(values.iter().copied()));
                all.extend(values);
            }
            assert_eq!(day.count, 72_000);
            misses.push(rank_miss(&day, &mut all));
            // A total merged from 500 groups, each of its own scale.
            let mut total = AggState::default();
            let mut all = Vec::new();
            for group in 0..500u64 {
                let values: Vec<f64> = (0..100)
                    .map(|i| latency(base + 500_000 + group * 100 + i) * (1 + group % 7) as f64)
                    .collect();
                total.merge(&quantiles_of(values.iter().copied()));
                all.extend(values);
            }
            misses.push(rank_miss(&total, &mut all));
        }
        let over = misses.iter().filter(|m| **m > epsilon).count();
        let worst = misses.iter().copied().fold(0.0, f64::max);
        assert!(
            over * 100 <= misses.len() * 3 && worst <= 2.0 * epsilon,
            "{over} of {} answers missed by more than {epsilon}; the worst by {worst}",
            misses.len()
        );
    }

    #[test]
    fn quantiles_keep_an_exact_count_minimum_and_maximum() {
        let state = quantiles_of((0..10_000).map(|i| i as f64));
        let (n, min, max) = state.sketch.as_ref().unwrap().extremes().unwrap();
        assert_eq!((n, min, max), (10_000, 0.0, 9_999.0));
        let kind = AggregateKind::Quantiles { k: 200 };
        let ask = Ask {
            quantiles: vec![0.0, 1.0],
            items: 0,
        };
        assert_eq!(
            state.value(kind, &ask),
            Some(Value::Quantiles(vec![(0.0, 0.0), (1.0, 9_999.0)]))
        );
        assert_eq!(AggState::default().value(kind, &ask), None);
        let back = Sketch::from_bytes(&state.sketch.as_ref().unwrap().to_bytes()).unwrap();
        assert_eq!(back.extremes(), state.sketch.unwrap().extremes());
    }

    /// Item `i` of a Zipf distribution over `n` items with exponent 1.1:
    /// each item's count, for `total` events, rounded.
    fn zipf_counts(n: usize, total: f64) -> Vec<u64> {
        let weights: Vec<f64> = (1..=n).map(|r| 1.0 / (r as f64).powf(1.1)).collect();
        let sum: f64 = weights.iter().sum();
        weights
            .iter()
            .map(|w| (w / sum * total).round() as u64)
            .collect()
    }

    #[test]
    fn topk_finds_the_true_top_items_of_a_zipf_stream_within_its_bounds() {
        let kind = AggregateKind::TopK { k: 10 };
        let field = Field::Dimension("userId".into());
        let counts = zipf_counts(20_000, 400_000.0);
        // The events in an interleaved order, over 24 panes merged.
        let mut stream: Vec<usize> = counts
            .iter()
            .enumerate()
            .flat_map(|(item, c)| std::iter::repeat_n(item, *c as usize))
            .collect();
        let mut z: u64 = 7;
        for i in (1..stream.len()).rev() {
            z = z
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            stream.swap(i, (z >> 33) as usize % (i + 1));
        }
        let mut total = AggState::default();
        for pane in stream.chunks(stream.len() / 24 + 1) {
            let mut state = AggState::default();
            for item in pane {
                state.observe(kind, Some(&field), &event(&format!("item_{item}"), 0.0));
            }
            total.merge(&state);
        }
        let Some(Value::Items(items)) = total.value(kind, &Ask::default_for(kind)) else {
            panic!("topk has items")
        };
        assert_eq!(items.len(), 10);
        let (_, weight) = total.sketch.as_ref().unwrap().items().unwrap();
        assert_eq!(weight, stream.len() as u64);
        for (rank, item) in items.iter().enumerate() {
            let truth = counts[rank];
            assert_eq!(item.item, format!("item_{rank}"), "rank {rank}: {items:?}");
            assert!(
                (item.lower..=item.upper).contains(&truth) && item.lower <= item.count,
                "{item:?} does not hold the true count {truth}"
            );
            // The bound is at most 3.5 / (64 · k) of the events.
            assert!((item.upper - item.lower) as f64 <= 3.5 / 640.0 * weight as f64);
        }
        let back = Sketch::from_bytes(&total.sketch.as_ref().unwrap().to_bytes()).unwrap();
        assert_eq!(back.items(), total.sketch.as_ref().unwrap().items());
    }

    #[test]
    fn topk_is_exact_for_few_items_and_answers_k_at_most() {
        let kind = AggregateKind::TopK { k: 3 };
        let field = Field::Dimension("userId".into());
        let mut state = AggState::default();
        for (item, n) in [("a", 5), ("b", 9), ("c", 1), ("d", 5)] {
            for _ in 0..n {
                state.observe(kind, Some(&field), &event(item, 0.0));
            }
        }
        let ask = Ask::default_for(kind);
        let exact = |item: &str, n| Item {
            item: item.into(),
            count: n,
            lower: n,
            upper: n,
        };
        assert_eq!(
            state.value(kind, &ask),
            Some(Value::Items(vec![
                exact("b", 9),
                exact("a", 5),
                exact("d", 5)
            ]))
        );
        assert_eq!(state.rank(kind, &ask), Some(20.0));
        assert_eq!(AggState::default().value(kind, &ask), None);
    }

    /// Found by the `sketches` fuzz target: a stored frequent-items sketch
    /// whose error or events are past any window's made merging panic.
    #[test]
    fn a_damaged_frequent_items_sketch_is_refused_not_merged() {
        let kind = AggregateKind::TopK { k: 10 };
        let mut state = AggState::default();
        for i in 0..50 {
            state.observe(kind, Some(&user()), &event(&format!("u{}", i % 7), 0.0));
        }
        let bytes = state.sketch.unwrap().to_bytes();
        assert!(Sketch::from_bytes(&bytes).is_ok());
        // The preamble: 8 bytes, the items and 4 unused, then the events
        // (16..24) and the error (24..32).
        let patched = |at: usize, value: u64| {
            let mut b = bytes.clone();
            b[at..at + 8].copy_from_slice(&value.to_le_bytes());
            Sketch::from_bytes(&b)
        };
        assert!(
            patched(24, u64::MAX - 1).is_err(),
            "an error past the events"
        );
        assert!(
            patched(16, MAX_EVENTS + 1).is_err(),
            "more events than any window"
        );
        assert!(patched(24, 3).is_ok());
    }
}
