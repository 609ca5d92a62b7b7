//! The stable identity of a metric's definition.
//!
//! A metric's stored results and its checkpointed state mean something only
//! for the definition that produced them: its name, event type, aggregate,
//! field, dimensions and windows, and the
//! rollups it is also kept as. [`metric`] gives that definition a
//! fingerprint that is the same on every build and every machine, so a
//! restart can tell whether what it finds was made by the metrics it runs.
//!
//! The fingerprint hashes a canonical text of the definition with SHA-256,
//! and starts with the version of that text (`m1-`). Adding a field to a
//! Rust type does not change it; changing what the text holds does, and
//! then the version changes too, so an old fingerprint is never mistaken
//! for a new one.

use sha2::{Digest, Sha256};

use crate::config::MetricSpec;

/// The version of the canonical text, the prefix of every fingerprint.
pub const VERSION: &str = "m1";

/// The fingerprint of one metric's definition, such as `m1-3f9a…` (16 hex
/// digits after the version).
pub fn metric(spec: &MetricSpec) -> String {
    hashed(&canonical(spec))
}

/// The fingerprint of a job's metrics, in order: checkpoints index window
/// state by a metric's place in the configuration, so the order counts.
pub fn job(metrics: &[MetricSpec]) -> String {
    let text: Vec<String> = metrics.iter().map(metric).collect();
    hashed(&text.join("\n"))
}

/// The definition as text, each part length-prefixed so that no two
/// definitions share it.
fn canonical(spec: &MetricSpec) -> String {
    let mut text = String::new();
    let mut part = |key: &str, value: &str| {
        text.push_str(&format!("{key}={}:{value}\n", value.len()));
    };
    part("name", &spec.name);
    part("event_type", spec.event_type.as_deref().unwrap_or("*"));
    part("aggregate", &spec.aggregate.to_string());
    if let Some(k) = spec.aggregate.k() {
        part("k", &k.to_string());
    }
    part(
        "field",
        &spec
            .field
            .as_ref()
            .map(ToString::to_string)
            .unwrap_or_default(),
    );
    for dimension in &spec.dimensions {
        part("dimension", dimension);
    }
    for window in &spec.windows {
        part("window", &window.to_string());
    }
    // What a metric is also kept as, and what a table is of. Absent, they
    // leave the text as it was before rollups.
    for (rollup, _) in &spec.rollups {
        part("rollup", &rollup.to_string());
    }
    for projection in &spec.projections {
        part("projection", &projection.join(","));
    }
    if spec.rollup_of.is_some() {
        part("table_of", &spec.name);
    }
    text
}

fn hashed(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    format!("{VERSION}-{hex}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::aggregate::{AggregateKind, Field};
    use crate::window::{pane_width, WindowSpec};

    fn clicks() -> MetricSpec {
        let windows: Vec<_> = ["tumbling 1m", "sliding 5m every 10s"]
            .map(|w| WindowSpec::parse(w).unwrap())
            .to_vec();
        MetricSpec {
            name: "ad_clicks".into(),
            event_type: Some("ad_click".into()),
            aggregate: AggregateKind::Count,
            field: None,
            dimensions: vec!["campaignId".into(), "country".into()],
            pane: pane_width(&windows),
            windows,
            keep: Vec::new(),
            rollups: Vec::new(),
            projections: Vec::new(),
            rollup_of: None,
            max_groups: crate::config::DEFAULT_MAX_GROUPS,
        }
    }

    #[test]
    fn the_fingerprint_is_pinned() {
        // Stored results and checkpoints carry this value: if it changes,
        // every deployment recomputes its metrics, so change `VERSION` with it.
        assert_eq!(metric(&clicks()), "m1-cbea250dd434b6fb");
    }

    #[test]
    fn every_part_of_the_definition_counts() {
        let base = metric(&clicks());
        let changes: [fn(&mut MetricSpec); 6] = [
            |m| m.name = "clicks".into(),
            |m| m.event_type = None,
            |m| m.aggregate = AggregateKind::Uniq,
            |m| m.field = Some(Field::Dimension("userId".into())),
            |m| m.dimensions.push("deviceType".into()),
            |m| m.windows.pop().map(drop).unwrap_or(()),
        ];
        for change in changes {
            let mut spec = clicks();
            change(&mut spec);
            assert_ne!(metric(&spec), base, "{spec:?}");
        }
        // Moving a dimension's name into the metric's name is another definition.
        let mut a = clicks();
        a.dimensions = vec!["ab".into()];
        let mut b = clicks();
        b.dimensions = vec!["a".into(), "b".into()];
        assert_ne!(metric(&a), metric(&b));
    }

    #[test]
    fn a_jobs_fingerprint_follows_its_metrics_and_their_order() {
        let mut other = clicks();
        other.name = "views".into();
        let ab = job(&[clicks(), other.clone()]);
        assert_eq!(ab, job(&[clicks(), other.clone()]));
        assert_ne!(ab, job(&[other, clicks()]));
        assert!(ab.starts_with("m1-"));
    }
}
