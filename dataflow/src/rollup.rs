//! Rollups: the tables a metric's results are kept in, and which of them
//! answers a history query.
//!
//! A metric's own windows keep its results by every dimension: a day of
//! one-minute windows over 252 groups is 362,880 rows, which a query for
//! the day's total would otherwise read. Each metric is therefore also kept
//! as *tables* with fewer rows:
//!
//! - **projections** onto subsets of its dimensions (the total and each
//!   single dimension unless it names its own), over its tumbling windows;
//! - **time rollups**: coarser tumbling windows (an hour and a day unless it
//!   names its own), by every dimension and by each projection, each on
//!   panes of its own width, so that a day's window holds one pane per group
//!   rather than 1,440.
//!
//! [`expand`] lists the tables as metric specs after the configured
//! metrics, whose indices stay as they were, so that the job computes them
//! as it computes any metric and the stores key their rows by their own
//! version. [`made`] says where each table's contributions come from. The
//! source derives a projection from its metric's pre-aggregated batch, one
//! merge per (table, group, pane) and batch rather than per event. A time
//! rollup has the dimensions of a table the job has already (the metric or
//! one of its projections), so it needs no exchange of its own: its groups
//! are routed with that table's, and the window state merges each of that
//! table's contributions into the rollup's pane as it applies it. Tables
//! have no partials, and never reach the live bus. Counts and sums add up
//! and sketches merge, so every table holds exactly what its metric's rows
//! would sum to.
//!
//! [`choose`] is the query planner: of the tables that hold the dimensions a
//! query filters on or groups by, and a window that divides its resolution,
//! it reads the one with the fewest rows. When no window that fine still
//! holds the range (see [`MetricSpec::keep`]), it reads the finest coarser
//! window that does, and the answer says which resolution it used. A
//! coarse window is stored once it closes: after the last one stored, the
//! store reads on from the finer windows of the same dimensions
//! ([`Choice::finer`]), so that the hour still open counts its closed
//! minutes.

use crate::config::MetricSpec;
use crate::time::Millis;
use crate::window::{pane_width, WindowSpec};

/// The configured metrics followed by their tables: projections (with the
/// metric's tumbling windows), then the time rollups by every dimension and
/// by each projection. A table has the name of its metric.
pub fn expand(metrics: &[MetricSpec]) -> Vec<MetricSpec> {
    let mut tables = metrics.to_vec();
    for (i, metric) in metrics.iter().enumerate() {
        if metric.rollup_of.is_some() {
            continue;
        }
        let table = |dimensions: &[String], windows: Vec<(WindowSpec, Option<Millis>)>| {
            let (windows, keep): (Vec<_>, Vec<_>) = windows.into_iter().unzip();
            MetricSpec {
                dimensions: dimensions.to_vec(),
                pane: pane_width(&windows).max(1),
                windows,
                keep,
                rollups: Vec::new(),
                projections: Vec::new(),
                rollup_of: Some(i as u16),
                ..metric.clone()
            }
        };
        let tumbling: Vec<(WindowSpec, Option<Millis>)> = metric
            .windows
            .iter()
            .enumerate()
            .filter(|(_, w)| w.is_tumbling())
            .map(|(w, spec)| (*spec, metric.keep(w)))
            .collect();
        let projections: Vec<&Vec<String>> = metric
            .projections
            .iter()
            .filter(|p| **p != metric.dimensions)
            .collect();
        for projection in &projections {
            tables.push(table(projection, tumbling.clone()));
        }
        for dimensions in std::iter::once(&metric.dimensions).chain(projections) {
            for rollup in &metric.rollups {
                tables.push(table(dimensions, vec![*rollup]));
            }
        }
    }
    tables
}

/// Where the contributions of a table of [`expand`] come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Made {
    /// A configured metric: from events.
    Events,
    /// A projection: from the batch of the metric with this index.
    Batch(u16),
    /// A time rollup: from the contributions of the table with this index,
    /// which has the same dimensions, as the window state applies them. Its
    /// groups are routed with that table's.
    Table(u16),
}

/// How each of `tables` (as [`expand`] lists them) is made: a table is made
/// from the first of its metric's tables with the same dimensions, or from
/// the metric's batch when that is itself.
pub fn made(tables: &[MetricSpec]) -> Vec<Made> {
    tables
        .iter()
        .enumerate()
        .map(|(i, table)| {
            let Some(of) = table.rollup_of else {
                return Made::Events;
            };
            let first = (of as usize..tables.len())
                .find(|&j| {
                    (j == of as usize || tables[j].rollup_of == Some(of))
                        && tables[j].dimensions == table.dimensions
                })
                .unwrap_or(i);
            if first == i {
                Made::Batch(of)
            } else {
                Made::Table(first as u16)
            }
        })
        .collect()
}

/// The metric index whose routing hash each of `tables` uses for its
/// groups: its own, or for a time rollup the table it is made from.
pub fn routes(tables: &[MetricSpec]) -> Vec<u16> {
    made(tables)
        .into_iter()
        .enumerate()
        .map(|(i, made)| match made {
            Made::Table(from) => from,
            Made::Events | Made::Batch(_) => i as u16,
        })
        .collect()
}

/// The tables of one metric: itself first, then its rollups.
pub fn tables(metric: &MetricSpec) -> Vec<MetricSpec> {
    expand(std::slice::from_ref(metric))
}

/// What a query reads: a table of its metric, one of its windows, and the
/// resolution the answer has.
#[derive(Clone, Debug, PartialEq)]
pub struct Choice<'a> {
    /// The table, as [`expand`] made it.
    pub table: &'a MetricSpec,
    /// The window read.
    pub window: WindowSpec,
    /// The resolution asked for, or a coarser one when nothing that fine
    /// still holds the range.
    pub resolution: Millis,
    /// The finer windows, widest first, of tables with the same dimensions,
    /// that also divide the resolution: what is read after the last window
    /// `window` has closed, so that the hour still open is counted by its
    /// minutes.
    pub finer: Vec<(&'a MetricSpec, WindowSpec)>,
}

/// A guess at how many distinct values a dimension has, to rank tables by
/// their rows: what counts is that each dimension multiplies them.
const VALUES_PER_DIMENSION: f64 = 10.0;

/// The cheapest table of `tables` (one metric's) with every dimension of
/// `needed`, and a window of it that answers `resolution` over the range
/// from `start`; see the [module](self) for the order of preference. `None`
/// when no tumbling window divides the resolution.
pub fn choose<'a>(
    tables: &'a [MetricSpec],
    needed: &[&str],
    start: Millis,
    end: Millis,
    resolution: Millis,
    now: Millis,
) -> Option<Choice<'a>> {
    let candidates = || {
        tables
            .iter()
            .filter(|t| needed.iter().all(|d| t.dimensions.iter().any(|x| x == d)))
            .flat_map(|t| {
                t.windows
                    .iter()
                    .enumerate()
                    .filter(|(_, w)| w.is_tumbling())
                    .map(move |(w, spec)| (t, *spec, t.keep(w)))
            })
    };
    let holds = |keep: Option<Millis>| keep.is_none_or(|k| start >= now.saturating_sub(k));
    let rows = |t: &MetricSpec, w: &WindowSpec| {
        let windows = ((end - start) as f64 / w.size() as f64).ceil().max(1.0);
        windows * VALUES_PER_DIMENSION.powi(t.dimensions.len() as i32)
    };
    let cheapest = |matching: &dyn Fn(&WindowSpec, Option<Millis>) -> bool| {
        candidates()
            .filter(|(_, w, keep)| matching(w, *keep))
            .min_by(|(a, wa, _), (b, wb, _)| rows(a, wa).total_cmp(&rows(b, wb)))
    };
    let exact = |w: &WindowSpec| resolution % w.size() == 0;
    let finer = |table: &MetricSpec, window: WindowSpec, resolution: Millis| {
        let mut finer: Vec<(&'a MetricSpec, WindowSpec)> = Vec::new();
        for (t, w, _) in candidates() {
            let divides = resolution % w.size() == 0 && w.size() < window.size();
            if divides && t.dimensions == table.dimensions && finer.iter().all(|(_, f)| *f != w) {
                finer.push((t, w));
            }
        }
        finer.sort_by_key(|(_, w)| std::cmp::Reverse(w.size()));
        finer
    };
    let choice = |table: &'a MetricSpec, window: WindowSpec, resolution: Millis| Choice {
        table,
        window,
        resolution,
        finer: finer(table, window, resolution),
    };
    if let Some((table, window, _)) = cheapest(&|w, keep| exact(w) && holds(keep)) {
        return Some(choice(table, window, resolution));
    }
    let (table, window, _) = cheapest(&|w, _| exact(w))?;
    let coarser = candidates()
        .filter(|(_, w, keep)| w.size() > resolution && holds(*keep))
        .map(|(_, w, _)| w.size())
        .min();
    if let Some(size) = coarser {
        let (table, window, _) = cheapest(&|w, keep| w.size() == size && holds(keep))?;
        return Some(choice(table, window, size));
    }
    Some(choice(table, window, resolution))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const DAY: Millis = 86_400_000;

    fn clicks(extra: &str) -> MetricSpec {
        let toml = format!(
            r#"
            [[metric]]
            name = "clicks"
            dimensions = ["campaign", "country", "device"]
            windows = ["tumbling 10s", "tumbling 1m", "sliding 5m every 10s"]
            {extra}
            "#
        );
        Config::load(Some(&toml), []).unwrap().metrics.remove(0)
    }

    fn read<'a>(choice: &Choice<'a>) -> (Vec<&'a str>, String, Millis) {
        let dims = choice.table.dimensions.iter().map(String::as_str).collect();
        (dims, choice.window.to_string(), choice.resolution)
    }

    #[test]
    fn a_metric_is_kept_by_the_total_each_dimension_an_hour_and_a_day() {
        let tables = tables(&clicks(""));
        let listed: Vec<(Vec<&str>, Vec<String>)> = tables
            .iter()
            .map(|t| {
                let dims = t.dimensions.iter().map(String::as_str).collect();
                (dims, t.windows.iter().map(ToString::to_string).collect())
            })
            .collect();
        let fine = || vec!["tumbling 10s".to_string(), "tumbling 1m".to_string()];
        assert_eq!(listed[1], (vec![], fine()));
        assert_eq!(listed[2], (vec!["campaign"], fine()));
        assert_eq!(listed[4], (vec!["device"], fine()));
        assert_eq!(
            listed[5],
            (
                vec!["campaign", "country", "device"],
                vec!["tumbling 1h".into()]
            )
        );
        assert_eq!(listed.len(), 1 + 4 + 5 * 2);
        assert!(tables[1..].iter().all(|t| t.rollup_of == Some(0)));
        // Projections from the batch; each hour and day from the table of
        // its dimensions.
        let made = made(&tables);
        assert_eq!(
            made[..5],
            [
                Made::Events,
                Made::Batch(0),
                Made::Batch(0),
                Made::Batch(0),
                Made::Batch(0)
            ]
        );
        assert_eq!(made[5..7], [Made::Table(0), Made::Table(0)]);
        assert_eq!(made[7..9], [Made::Table(1), Made::Table(1)]);
        assert_eq!(routes(&tables)[14], 4);
        // A day's rollup keeps one pane per group.
        assert_eq!(tables[6].pane, DAY);
    }

    #[test]
    fn the_planner_reads_the_fewest_rows_that_answer_exactly() {
        let tables = tables(&clicks(""));
        let now = 100 * DAY;
        let day = (now - DAY, now);
        let plan = |needed: &[&str], resolution, (start, end): (Millis, Millis)| {
            read(&choose(&tables, needed, start, end, resolution, now).unwrap())
        };
        assert_eq!(
            plan(&[], 60_000, day),
            (vec![], "tumbling 1m".into(), 60_000)
        );
        assert_eq!(
            plan(&["country"], 60_000, day),
            (vec!["country"], "tumbling 1m".into(), 60_000)
        );
        assert_eq!(
            plan(&["campaign", "country"], 60_000, day),
            (
                vec!["campaign", "country", "device"],
                "tumbling 1m".into(),
                60_000
            )
        );
        assert_eq!(
            plan(&["country"], 3_600_000, (now - 7 * DAY, now)),
            (vec!["country"], "tumbling 1h".into(), 3_600_000)
        );
        assert_eq!(
            plan(&[], 2 * DAY, day),
            (vec![], "tumbling 1d".into(), 2 * DAY)
        );
    }

    #[test]
    fn a_range_the_fine_window_no_longer_holds_is_answered_coarser() {
        let tables = tables(&clicks(""));
        let now = 100 * DAY;
        // One-minute windows are kept 30 days, ten-second ones one.
        let old = choose(&tables, &[], now - 40 * DAY, now - 39 * DAY, 60_000, now).unwrap();
        assert_eq!(read(&old), (vec![], "tumbling 1h".into(), 3_600_000));
        let recent = choose(&tables, &[], now - 2 * DAY, now, 10_000, now).unwrap();
        assert_eq!(read(&recent), (vec![], "tumbling 1m".into(), 60_000));
    }

    #[test]
    fn rollups_and_projections_are_configured_per_metric() {
        let metric = clicks(
            r#"rollups = ["tumbling 1d keep 400d"]
            projections = [["country", "campaign"]]"#,
        );
        assert_eq!(metric.projections, vec![vec!["campaign", "country"]]);
        assert_eq!(metric.rollups.len(), 1);
        assert_eq!(metric.rollups[0].1, Some(400 * DAY));
        assert_eq!(tables(&metric).len(), 1 + 1 + 2);
        let none = clicks("rollups = []\nprojections = []");
        assert_eq!(tables(&none).len(), 1);
    }

    #[test]
    fn each_window_says_how_long_it_is_kept() {
        let kept = |text| crate::config::parse_kept_window(text).map(|(_, keep)| keep);
        assert_eq!(kept("tumbling 10s"), Ok(Some(DAY)));
        assert_eq!(kept("tumbling 1m"), Ok(Some(30 * DAY)));
        assert_eq!(kept("tumbling 1h"), Ok(None));
        assert_eq!(kept("tumbling 1m keep 7d"), Ok(Some(7 * DAY)));
        assert_eq!(kept("tumbling 10s keep forever"), Ok(None));
        assert!(kept("tumbling 1h keep 10m").is_err());
    }
}
