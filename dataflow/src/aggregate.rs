//! Aggregates and their mergeable state.
//!
//! Every aggregate keeps the same state, [`AggState`]: an event count, an exact
//! sum, and for `uniq` a HyperLogLog sketch (Apache DataSketches, HLL_8,
//! lg_k = 12, about 1.6% standard error). All three merge associatively and
//! commutatively, so a window's value does not depend on how its events were
//! split among workers, batches or panes. The sum is kept in fixed point
//! (nanounits, `i128`) for that reason: floating-point addition is not
//! associative, and W = 1 and W = 4 must store the same numbers.

use std::fmt;

use datasketches::hll::{HllSketch, HllType, HllUnion};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::event::Fields;

/// log2 of the number of HLL registers.
const LG_K: u8 = 12;
/// Fixed-point scale of sums: values are kept to a billionth.
const SUM_SCALE: f64 = 1e9;

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
}

impl AggregateKind {
    /// Parses `count`, `sum`, `avg` or `uniq`.
    pub fn parse(text: &str) -> Result<AggregateKind, String> {
        match text {
            "count" => Ok(AggregateKind::Count),
            "sum" => Ok(AggregateKind::Sum),
            "avg" => Ok(AggregateKind::Avg),
            "uniq" => Ok(AggregateKind::Uniq),
            other => Err(format!(
                "unknown aggregate '{other}': use count, sum, avg or uniq"
            )),
        }
    }

    /// Whether this aggregate reads a field of the event.
    pub fn needs_field(&self) -> bool {
        !matches!(self, AggregateKind::Count)
    }
}

impl fmt::Display for AggregateKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AggregateKind::Count => "count",
            AggregateKind::Sum => "sum",
            AggregateKind::Avg => "avg",
            AggregateKind::Uniq => "uniq",
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

/// The mergeable state of one aggregate over some set of events.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct AggState {
    /// Events seen.
    pub count: u64,
    /// Sum of the field, in billionths.
    pub sum: i128,
    /// Distinct values of the field, for `uniq`.
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
                let sketch = self.sketch.get_or_insert_with(Sketch::new);
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
            _ => {}
        }
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

    /// The number a user sees: `None` only for the mean of nothing.
    pub fn value(&self, kind: AggregateKind) -> Option<f64> {
        match kind {
            AggregateKind::Count => Some(self.count as f64),
            AggregateKind::Sum => Some(self.sum as f64 / SUM_SCALE),
            AggregateKind::Avg => {
                (self.count > 0).then(|| self.sum as f64 / SUM_SCALE / self.count as f64)
            }
            AggregateKind::Uniq => Some(self.sketch.as_ref().map_or(0.0, Sketch::estimate)),
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

/// A HyperLogLog sketch of distinct values. Its estimate depends only on the
/// set of values, never on the order they arrived in.
///
/// A sketch that takes values or other sketches is kept as a DataSketches
/// union, so folding many sketches into one (a pane taking contributions, a
/// query merging rows) costs one pass over each incoming sketch, never a copy
/// of the accumulated one. A sketch read from storage stays as it was read
/// until something is folded into it.
#[derive(Clone)]
pub struct Sketch(Form);

#[derive(Clone)]
enum Form {
    Union(HllUnion),
    Read(HllSketch),
}

impl Sketch {
    /// An empty sketch.
    pub fn new() -> Sketch {
        // LG_K is in the library's valid range [4, 21].
        Sketch(Form::Union(HllUnion::new(LG_K).expect("valid lg_k")))
    }

    /// The union form, converting a sketch read from storage on first use.
    fn union(&mut self) -> &mut HllUnion {
        if let Form::Read(sketch) = &self.0 {
            let mut union = HllUnion::new(LG_K).expect("valid lg_k");
            union.update(sketch);
            self.0 = Form::Union(union);
        }
        match &mut self.0 {
            Form::Union(union) => union,
            Form::Read(_) => unreachable!("converted above"),
        }
    }

    /// Adds one value.
    fn update(&mut self, value: impl std::hash::Hash) {
        self.union().update_value(value);
    }

    /// Folds `other` into this sketch.
    pub fn merge(&mut self, other: &Sketch) {
        match &other.0 {
            Form::Read(sketch) => self.union().update(sketch),
            Form::Union(union) => {
                let sketch = union.to_sketch(HllType::Hll8);
                self.union().update(&sketch);
            }
        }
    }

    /// The estimated number of distinct values, rounded to a whole number.
    pub fn estimate(&self) -> f64 {
        match &self.0 {
            Form::Union(union) => union.composite_estimate(),
            Form::Read(sketch) => sketch.composite_estimate(),
        }
        .round()
    }

    /// The sketch in DataSketches' portable binary form, HLL_4: half the
    /// bytes of HLL_8 for a dense sketch, the same registers, and so the
    /// same estimate. A day's minutes of a metric's total are 1,440 dense
    /// sketches, which a history query reads over the network from
    /// ClickHouse.
    pub fn to_bytes(&self) -> Vec<u8> {
        match &self.0 {
            Form::Union(union) => union.to_sketch(HllType::Hll4).serialize(),
            Form::Read(sketch) => sketch.serialize(),
        }
    }

    /// Reads a sketch written by [`Sketch::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Sketch, String> {
        HllSketch::deserialize(bytes)
            .map(|s| Sketch(Form::Read(s)))
            .map_err(|e| e.to_string())
    }
}

impl Default for Sketch {
    fn default() -> Self {
        Sketch::new()
    }
}

impl fmt::Debug for Sketch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Sketch(~{})", self.estimate())
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
                total.value(AggregateKind::Sum),
                users.value(AggregateKind::Uniq),
            )
        };
        let (head, tail) = events.split_at(377);
        let one = fold(&[&events]);
        assert_eq!(one, fold(&[tail, head]));
        assert_eq!(one.0, Some(49950.0));
        let uniq = one.1.unwrap();
        assert!((uniq - 300.0).abs() <= 6.0, "uniq estimate {uniq}");
    }

    #[test]
    fn avg_of_nothing_is_none() {
        assert_eq!(AggState::default().value(AggregateKind::Avg), None);
        assert_eq!(AggState::default().value(AggregateKind::Uniq), Some(0.0));
    }

    #[test]
    fn sketches_round_trip_through_bytes() {
        let mut s = Sketch::new();
        for i in 0..100 {
            s.update(i);
        }
        let back = Sketch::from_bytes(&s.to_bytes()).unwrap();
        assert_eq!(back.estimate(), s.estimate());
    }
}
