//! What a changed configuration runs while its new metrics are backfilled,
//! and the checkpoint that ends the backfill.
//!
//! A checkpoint names the definitions its state was made by. Starting with
//! other definitions, tally compares them by [`fingerprint::metric`]:
//!
//! - a metric whose definition is unchanged keeps its state and goes on
//!   where the checkpoint left it;
//! - a metric whose definition changed keeps running its old definition,
//!   which serves history and live as before, while a backfill job
//!   computes the new one from the log's beginning;
//! - a new metric is computed by the backfill job alone;
//! - a removed metric stops, and its state is dropped.
//!
//! Both jobs stamp every batch by the log alone, so once the backfill has
//! caught up the two take checkpoints at the same boundaries over the same
//! prefix of the log. At the first such boundary the two checkpoints are
//! [`merge`]d into one of the configured metrics, and the live job starts
//! again from it, with the new definitions active and nothing recomputed.

use crate::checkpoint::{GroupSnapshot, PartitionCut};
use crate::config::MetricSpec;
use crate::fingerprint;
use crate::rollup::{expand, routes};
use crate::routing::group_hash;

/// The metrics each job runs, for a configuration started on a checkpoint
/// made by other definitions.
#[derive(Clone, Debug, PartialEq)]
pub struct Plan {
    /// What the live job runs: in configuration order, each configured
    /// metric whose name the checkpoint holds, by the definition the
    /// checkpoint holds.
    pub live: Vec<MetricSpec>,
    /// What the backfill job computes from the log's beginning: the
    /// configured metrics the checkpoint does not hold, changed or new.
    pub backfill: Vec<MetricSpec>,
    /// The metrics of the checkpoint no longer configured.
    pub removed: Vec<String>,
}

impl Plan {
    /// The plan for `configured` metrics over a checkpoint made by
    /// `restored`.
    pub fn new(configured: &[MetricSpec], restored: &[MetricSpec]) -> Plan {
        let mut plan = Plan {
            live: Vec::new(),
            backfill: Vec::new(),
            removed: Vec::new(),
        };
        for metric in configured {
            let old = restored.iter().find(|r| r.name == metric.name);
            if let Some(old) = old {
                plan.live.push(old.clone());
            }
            if old.is_none_or(|old| fingerprint::metric(old) != fingerprint::metric(metric)) {
                plan.backfill.push(metric.clone());
            }
        }
        plan.removed = restored
            .iter()
            .filter(|r| configured.iter().all(|m| m.name != r.name))
            .map(|r| r.name.clone())
            .collect();
        plan
    }

    /// Whether there is nothing to backfill.
    pub fn is_settled(&self) -> bool {
        self.backfill.is_empty()
    }
}

/// The groups of `groups`, made by metrics `from`, that belong to a metric
/// of `to` (the same definition, by fingerprint), re-indexed and re-hashed
/// for `to`. The others are dropped. A metric's rollups
/// ([`expand`]) go with it.
pub fn remap(
    groups: Vec<GroupSnapshot>,
    from: &[MetricSpec],
    to: &[MetricSpec],
) -> Vec<GroupSnapshot> {
    // State is indexed by the metrics' tables, which follow them.
    let to = expand(to);
    let targets: Vec<String> = to.iter().map(fingerprint::metric).collect();
    let routes = routes(&to);
    let index: Vec<Option<u16>> = expand(from)
        .iter()
        .map(|m| {
            let version = fingerprint::metric(m);
            targets.iter().position(|t| *t == version).map(|i| i as u16)
        })
        .collect();
    groups
        .into_iter()
        .filter_map(|mut g| {
            let metric = index.get(g.metric as usize).copied().flatten()?;
            g.metric = metric;
            g.hash = group_hash(routes[metric as usize], &g.group);
            Some(g)
        })
        .collect()
}

/// One job's side of a merge: the cuts and groups of its checkpoint at the
/// boundary, and the metrics that made them.
pub struct Side<'a> {
    /// Where each partition stands.
    pub cuts: &'a [PartitionCut],
    /// The state.
    pub groups: Vec<GroupSnapshot>,
    /// The metrics the state is indexed by.
    pub metrics: &'a [MetricSpec],
}

/// The groups of a checkpoint of `configured` metrics made of the live
/// job's and the backfill job's checkpoints at one boundary: each metric's
/// state from the backfill if it computed it, or else from the live job.
/// `None` unless both read the same prefix of the log, partition by
/// partition, which is what makes their states one consistent cut.
pub fn merge(live: Side, backfill: Side, configured: &[MetricSpec]) -> Option<Vec<GroupSnapshot>> {
    if !same_cuts(live.cuts, backfill.cuts) {
        return None;
    }
    let built: Vec<String> = backfill.metrics.iter().map(fingerprint::metric).collect();
    let kept: Vec<MetricSpec> = configured
        .iter()
        .filter(|m| !built.contains(&fingerprint::metric(m)))
        .cloned()
        .collect();
    // Index by `kept` first, which holds no backfilled definition, then
    // onto `configured`.
    let mut groups = remap(remap(live.groups, live.metrics, &kept), &kept, configured);
    groups.extend(remap(backfill.groups, backfill.metrics, configured));
    Some(groups)
}

/// Whether two checkpoints cut every partition at the same offset.
fn same_cuts(a: &[PartitionCut], b: &[PartitionCut]) -> bool {
    let sorted = |cuts: &[PartitionCut]| {
        let mut offsets: Vec<(u32, u64)> =
            cuts.iter().map(|c| (c.partition, c.next_offset)).collect();
        offsets.sort_unstable();
        offsets
    };
    sorted(a) == sorted(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::AggregateKind;
    use crate::model::Group;
    use crate::window::{pane_width, WindowSpec};

    fn metric(name: &str, dimensions: &[&str]) -> MetricSpec {
        let windows = vec![WindowSpec::parse("tumbling 1m").unwrap()];
        MetricSpec {
            name: name.into(),
            event_type: None,
            aggregate: AggregateKind::Count,
            field: None,
            dimensions: dimensions.iter().map(|d| d.to_string()).collect(),
            pane: pane_width(&windows),
            windows,
            keep: Vec::new(),
            rollups: Vec::new(),
            projections: Vec::new(),
            rollup_of: None,
            max_groups: crate::config::DEFAULT_MAX_GROUPS,
        }
    }

    fn group(metric: u16, value: &str) -> GroupSnapshot {
        let group: Group = vec![value.to_string()].into();
        GroupSnapshot {
            metric,
            hash: group_hash(metric, &group),
            group,
            panes: Vec::new(),
            open: Vec::new(),
            closed: Vec::new(),
        }
    }

    fn cut(partition: u32, next_offset: u64) -> PartitionCut {
        PartitionCut {
            partition,
            next_offset,
            watermark: None,
            dedupe_from: None,
        }
    }

    #[test]
    fn a_changed_metric_runs_its_old_definition_while_the_new_one_is_backfilled() {
        let (clicks, views, gone) = (
            metric("clicks", &["c"]),
            metric("views", &["p"]),
            metric("gone", &[]),
        );
        let wider = metric("clicks", &["c", "country"]);
        let added = metric("added", &[]);
        let plan = Plan::new(
            &[wider.clone(), views.clone(), added.clone()],
            &[gone, clicks.clone(), views.clone()],
        );
        assert_eq!(plan.live, [clicks, views]);
        assert_eq!(plan.backfill, [wider, added]);
        assert_eq!(plan.removed, ["gone"]);
        assert!(!plan.is_settled());
    }

    #[test]
    fn the_same_definitions_need_no_backfill() {
        let metrics = [metric("clicks", &["c"]), metric("views", &[])];
        let plan = Plan::new(&metrics, &metrics);
        assert!(plan.is_settled());
        assert_eq!(plan.live, metrics);
    }

    #[test]
    fn remapping_reindexes_and_rehashes_and_drops_what_is_gone() {
        let (a, b, c) = (metric("a", &[]), metric("b", &[]), metric("c", &[]));
        let groups = vec![group(0, "x"), group(1, "y"), group(2, "z")];
        let moved = remap(groups, &[a.clone(), b.clone(), c.clone()], &[c, a]);
        let keys: Vec<(u16, &str, u64)> = moved
            .iter()
            .map(|g| (g.metric, g.group[0].as_str(), g.hash))
            .collect();
        assert_eq!(
            keys,
            [
                (1, "x", group_hash(1, &["x".into()])),
                (0, "z", group_hash(0, &["z".into()]))
            ]
        );
    }

    #[test]
    fn a_merge_takes_each_metric_from_the_job_that_computed_it_and_needs_the_same_cuts() {
        let (clicks, views) = (metric("clicks", &["c"]), metric("views", &["p"]));
        let wider = metric("clicks", &["c", "country"]);
        let configured = [wider.clone(), views.clone()];
        let cuts = [cut(0, 10), cut(1, 7)];
        let live_metrics = [clicks, views];
        let backfill_metrics = [wider];
        let (reordered, behind) = ([cut(1, 7), cut(0, 10)], [cut(0, 10), cut(1, 8)]);
        fn side<'a>(
            cuts: &'a [PartitionCut],
            groups: Vec<GroupSnapshot>,
            metrics: &'a [MetricSpec],
        ) -> Side<'a> {
            Side {
                cuts,
                groups,
                metrics,
            }
        }
        let merged = merge(
            side(
                &cuts,
                vec![group(0, "old"), group(1, "kept")],
                &live_metrics,
            ),
            side(&reordered, vec![group(0, "new")], &backfill_metrics),
            &configured,
        )
        .unwrap();
        let keys: Vec<(u16, &str)> = merged
            .iter()
            .map(|g| (g.metric, g.group[0].as_str()))
            .collect();
        assert_eq!(keys, [(1, "kept"), (0, "new")]);
        assert!(merge(
            side(&cuts, Vec::new(), &live_metrics),
            side(&behind, Vec::new(), &backfill_metrics),
            &configured,
        )
        .is_none());
    }
}
