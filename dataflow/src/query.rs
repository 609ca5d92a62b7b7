//! History queries: what `GET /v1/metrics` asks, checked against the
//! configuration, and how stored windows become its answer.
//!
//! History is answered from a metric's tumbling windows. A query's
//! `resolution` must be a whole multiple of one of them; the widest such
//! window is read, and its rows are merged into buckets of the resolution.
//! Buckets are aligned to the epoch, the first one being the bucket that holds
//! `start`, and every bucket up to `end` is present in the answer, empty or
//! not. Because stored rows keep full aggregate state (sketches included),
//! merging them over buckets and groups gives exact counts and sums and
//! correct distinct-count estimates.

use std::collections::BTreeMap;

use crate::aggregate::{AggState, AggregateKind};
use crate::config::Config;
use crate::time::{parse_millis, parse_rfc3339, Millis};
use crate::window::{align, WindowSpec};

/// Most buckets one answer may hold.
pub const MAX_BUCKETS: i64 = 100_000;

/// A validated history query.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    /// The metric's name.
    pub metric: String,
    /// Its aggregate.
    pub aggregate: AggregateKind,
    /// The stored tumbling window the answer is built from.
    pub window: WindowSpec,
    /// `(dimension index, value)` filters.
    pub filters: Vec<(usize, String)>,
    /// The dimension index to group by.
    pub group_by: Option<usize>,
    /// The metric's dimension names.
    pub dimensions: Vec<String>,
    /// First bucket's start.
    pub start: Millis,
    /// End of the range, exclusive.
    pub end: Millis,
    /// Bucket width.
    pub resolution: Millis,
}

/// A query the client must fix, with the parameter at fault.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{parameter}: {problem}")]
pub struct QueryError {
    /// The query parameter that is wrong.
    pub parameter: String,
    /// What is wrong with it.
    pub problem: String,
}

fn bad(parameter: &str, problem: impl Into<String>) -> QueryError {
    QueryError {
        parameter: parameter.to_owned(),
        problem: problem.into(),
    }
}

/// A stored window as the store returns it.
#[derive(Clone, Debug)]
pub struct StoredWindow {
    /// Window start.
    pub start: Millis,
    /// The value of the query's `groupBy` dimension, if it has one.
    pub group_value: Option<String>,
    /// The aggregate state.
    pub state: AggState,
}

/// One series of an answer: its group (empty without `groupBy`) and one
/// value per bucket, `None` where the aggregate has no value (avg of nothing).
#[derive(Clone, Debug, PartialEq)]
pub struct Series {
    /// `(dimension, value)` of the group.
    pub group: Vec<(String, String)>,
    /// `(bucket start, value)`.
    pub points: Vec<(Millis, Option<f64>)>,
}

impl Query {
    /// Checks raw parameters against the configuration.
    ///
    /// `now` stands in for a missing `end`; a missing `start` means one hour
    /// before `end`; a missing `resolution` means the metric's narrowest
    /// tumbling window.
    pub fn parse(
        params: &[(String, String)],
        config: &Config,
        now: Millis,
    ) -> Result<Query, QueryError> {
        let get = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_str())
        };
        let name = get("metric").ok_or_else(|| bad("metric", "is required"))?;
        let metric = config.metric(name).ok_or_else(|| {
            let known: Vec<&str> = config.metrics.iter().map(|m| m.name.as_str()).collect();
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
        let resolution = match get("resolution") {
            None => tumbling
                .iter()
                .map(WindowSpec::size)
                .min()
                .unwrap_or(60_000),
            Some(v) => parse_millis(v).map_err(|e| bad("resolution", e))?,
        };
        let window = tumbling
            .iter()
            .filter(|w| resolution % w.size() == 0)
            .max_by_key(|w| w.size())
            .copied()
            .ok_or_else(|| {
                let sizes: Vec<String> = tumbling.iter().map(|w| w.to_string()).collect();
                bad(
                    "resolution",
                    format!(
                        "must be a multiple of one of the metric's windows: {}",
                        sizes.join(", ")
                    ),
                )
            })?;
        let start = align(start, resolution);
        if (end - start + resolution - 1) / resolution > MAX_BUCKETS {
            return Err(bad(
                "resolution",
                format!("the range would hold more than {MAX_BUCKETS} buckets"),
            ));
        }
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
        let mut filters = Vec::new();
        for (key, value) in params {
            if !matches!(
                key.as_str(),
                "metric" | "start" | "end" | "resolution" | "groupBy"
            ) {
                filters.push((dimension(key, key)?, value.clone()));
            }
        }
        Ok(Query {
            metric: metric.name.clone(),
            aggregate: metric.aggregate,
            window,
            filters,
            group_by,
            dimensions: metric.dimensions.clone(),
            start,
            end,
            resolution,
        })
    }

    /// The filters as `(dimension, value)` names.
    pub fn filter_names(&self) -> Vec<(String, String)> {
        self.filters
            .iter()
            .map(|(d, v)| (self.dimensions[*d].clone(), v.clone()))
            .collect()
    }

    /// Whether a stored group, given as its dimension values, passes the
    /// filters; if so, its value of the `groupBy` dimension.
    pub fn select(&self, group: &[&str]) -> Option<Option<String>> {
        if !self
            .filters
            .iter()
            .all(|(d, v)| group.get(*d) == Some(&v.as_str()))
        {
            return None;
        }
        Some(
            self.group_by
                .map(|d| group.get(d).copied().unwrap_or_default().to_owned()),
        )
    }

    /// Merges stored windows, already filtered by [`Query::select`], into the
    /// answer's series. Rows outside the range are ignored; every bucket is
    /// present.
    pub fn assemble(&self, rows: impl IntoIterator<Item = StoredWindow>) -> Vec<Series> {
        let buckets = ((self.end - self.start) + self.resolution - 1) / self.resolution;
        let mut groups: BTreeMap<Option<String>, Vec<AggState>> = BTreeMap::new();
        if self.group_by.is_none() {
            groups.insert(None, vec![AggState::default(); buckets as usize]);
        }
        for row in rows {
            if row.start < self.start || row.start >= self.end {
                continue;
            }
            let series = groups
                .entry(row.group_value)
                .or_insert_with(|| vec![AggState::default(); buckets as usize]);
            series[((row.start - self.start) / self.resolution) as usize].merge(&row.state);
        }
        groups
            .into_iter()
            .map(|(key, states)| Series {
                group: key
                    .map(|v| vec![(self.dimensions[self.group_by.unwrap_or(0)].clone(), v)])
                    .unwrap_or_default(),
                points: states
                    .iter()
                    .enumerate()
                    .map(|(i, s)| {
                        (
                            self.start + i as Millis * self.resolution,
                            s.value(self.aggregate),
                        )
                    })
                    .collect(),
            })
            .collect()
    }
}

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

    fn config() -> Config {
        Config::load(
            Some(
                r#"
[[metric]]
name = "ad_clicks"
event_type = "ad_click"
dimensions = ["campaignId", "country"]
windows = ["tumbling 10s", "tumbling 1m", "sliding 5m every 10s"]
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

    #[test]
    fn picks_the_widest_dividing_window() {
        let q = Query::parse(
            &params(&[
                ("metric", "ad_clicks"),
                ("start", "0"),
                ("end", "3600"),
                ("resolution", "5m"),
            ]),
            &config(),
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
            &config(),
            0,
        )
        .unwrap();
        assert_eq!(q.window.to_string(), "tumbling 10s");
    }

    #[test]
    fn names_the_bad_parameter() {
        let c = config();
        let err = |p: &[(&str, &str)]| Query::parse(&params(p), &c, 0).unwrap_err().parameter;
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

    #[test]
    fn every_bucket_is_present_and_groups_split() {
        let q = Query::parse(
            &params(&[
                ("metric", "ad_clicks"),
                ("start", "2026-06-07T10:00:00Z"),
                ("end", "2026-06-07T10:03:00Z"),
                ("resolution", "1m"),
                ("groupBy", "country"),
            ]),
            &config(),
            0,
        )
        .unwrap();
        let row = |offset: Millis, country: &str, count| StoredWindow {
            start: q.start + offset,
            group_value: q.select(&["c1", country]).unwrap(),
            state: AggState {
                count,
                ..Default::default()
            },
        };
        let series = q.assemble([row(0, "US", 2), row(0, "DE", 1), row(120_000, "US", 5)]);
        assert_eq!(series.len(), 2);
        assert_eq!(series[1].group, [("country".to_string(), "US".to_string())]);
        assert_eq!(
            series[1].points.iter().map(|p| p.1).collect::<Vec<_>>(),
            [Some(2.0), Some(0.0), Some(5.0)]
        );
        assert_eq!(
            series[0].points.iter().map(|p| p.1).collect::<Vec<_>>(),
            [Some(1.0), Some(0.0), Some(0.0)]
        );
    }
}
