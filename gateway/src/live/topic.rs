//! A subscription's topic, checked against the configuration once, when the
//! client's message arrives.
//!
//! A topic is `metrics:<metric>[:<dimension>:<value>]…`; the subscription
//! may add a `window` (default: the metric's first) and a `groupBy`
//! dimension. Everything after the parse works on the indices a [`Topic`]
//! holds, so a topic is never read again.

use tally_dataflow::config::MetricSpec;
use tally_dataflow::window::WindowSpec;

/// A checked subscription: which metric, window, filters and grouping it
/// follows. It is also the subscription's identity in the hub: two clients
/// that send the same topic, window and grouping share one subscription.
///
/// The metric and the filters follow from the topic's text, so comparing
/// every field, as the derived `Eq` and `Hash` do, compares the topic, the
/// window and the grouping.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(super) struct Topic {
    text: String,
    metric: u16,
    window: u8,
    filters: Vec<(usize, String)>,
    group_by: Option<usize>,
}

/// Why a subscription was refused. The messages are what the client reads.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub(super) enum TopicError {
    /// The topic does not start with `metrics:`.
    #[error("a topic is metrics:<metric>[:<dimension>:<value>]…")]
    NotMetrics,
    /// No configured metric has this name.
    #[error("unknown metric '{0}'")]
    UnknownMetric(String),
    /// The filters after the metric are not `<dimension>:<value>` pairs.
    #[error("filters come in pairs: <dimension>:<value>")]
    UnpairedFilter,
    /// A filter or the `groupBy` names a dimension the metric does not have.
    #[error("'{dimension}' is not a dimension of {metric}")]
    UnknownDimension {
        /// The dimension asked for.
        dimension: String,
        /// The metric's name.
        metric: String,
    },
    /// A dimension is filtered twice: so that a topic holds at most one
    /// filter per dimension, which bounds what the hub checks per group.
    #[error("'{0}' is filtered twice; a topic filters each dimension once")]
    RepeatedFilter(String),
    /// The `window` is not a window spec; the message says why.
    #[error("{0}")]
    BadWindow(String),
    /// The `since` of a resuming subscription is not a time.
    #[error("since: '{0}' is not an RFC 3339 time, such as 2026-11-29T10:25:00Z")]
    BadSince(String),
    /// The metric is not computed over the `window` asked for.
    #[error("{metric} has no window '{window}'")]
    NoSuchWindow {
        /// The metric's name.
        metric: String,
        /// The window as the client wrote it.
        window: String,
    },
}

impl Topic {
    /// Checks a subscription to `text`, over `window` and grouped by
    /// `group_by` if given, against the configured `metrics`.
    pub(super) fn parse(
        text: &str,
        window: Option<&str>,
        group_by: Option<&str>,
        metrics: &[MetricSpec],
    ) -> Result<Topic, TopicError> {
        let mut parts = text.split(':');
        if parts.next() != Some("metrics") {
            return Err(TopicError::NotMetrics);
        }
        let name = parts.next().unwrap_or_default();
        let (metric, spec) = metrics
            .iter()
            .enumerate()
            .find(|(_, m)| m.name == name)
            .ok_or_else(|| TopicError::UnknownMetric(name.to_owned()))?;
        let rest: Vec<&str> = parts.collect();
        if !rest.len().is_multiple_of(2) {
            return Err(TopicError::UnpairedFilter);
        }
        let dimension = |d: &str| {
            spec.dimensions.iter().position(|x| x == d).ok_or_else(|| {
                TopicError::UnknownDimension {
                    dimension: d.to_owned(),
                    metric: spec.name.clone(),
                }
            })
        };
        let filters = rest
            .chunks(2)
            .map(|pair| Ok((dimension(pair[0])?, pair[1].to_owned())))
            .collect::<Result<Vec<_>, TopicError>>()?;
        for (i, (d, _)) in filters.iter().enumerate() {
            if filters[..i].iter().any(|(e, _)| e == d) {
                return Err(TopicError::RepeatedFilter(spec.dimensions[*d].clone()));
            }
        }
        let window = match window {
            None => 0,
            Some(text) => {
                let wanted = WindowSpec::parse(text).map_err(TopicError::BadWindow)?;
                spec.windows
                    .iter()
                    .position(|w| *w == wanted)
                    .ok_or_else(|| TopicError::NoSuchWindow {
                        metric: spec.name.clone(),
                        window: text.to_owned(),
                    })?
            }
        };
        let group_by = group_by.map(dimension).transpose()?;
        Ok(Topic {
            text: text.to_owned(),
            metric: metric as u16,
            window: window as u8,
            filters,
            group_by,
        })
    }

    /// The topic as the client wrote it, which every message echoes.
    pub(super) fn text(&self) -> &str {
        &self.text
    }

    /// The metric's index in the configuration.
    pub(super) fn metric(&self) -> u16 {
        self.metric
    }

    /// The window's index among the metric's windows.
    pub(super) fn window(&self) -> u8 {
        self.window
    }

    /// The filters, as (dimension index, value) pairs.
    pub(super) fn filters(&self) -> &[(usize, String)] {
        &self.filters
    }

    /// The index of the dimension whose groups are sent one by one.
    pub(super) fn group_by(&self) -> Option<usize> {
        self.group_by
    }
}

#[cfg(test)]
mod tests {
    use tally_dataflow::config::Config;

    use super::*;

    fn metrics() -> Vec<MetricSpec> {
        Config::load(
            Some(
                "[[metric]]\nname = \"ad_clicks\"\ndimensions = [\"campaignId\", \"country\"]\n\
                 windows = [\"tumbling 10s\", \"tumbling 1m\"]\n",
            ),
            [],
        )
        .unwrap()
        .metrics
    }

    fn parse(
        text: &str,
        window: Option<&str>,
        group_by: Option<&str>,
    ) -> Result<Topic, TopicError> {
        Topic::parse(text, window, group_by, &metrics())
    }

    #[test]
    fn a_bare_metric_follows_its_first_window_ungrouped() {
        let topic = parse("metrics:ad_clicks", None, None).unwrap();
        assert_eq!(topic.text(), "metrics:ad_clicks");
        assert_eq!(topic.metric(), 0);
        assert_eq!(topic.window(), 0);
        assert!(topic.filters().is_empty());
        assert_eq!(topic.group_by(), None);
    }

    #[test]
    fn filters_window_and_grouping_become_indices() {
        let topic = parse(
            "metrics:ad_clicks:campaignId:camp_5541:country:US",
            Some("tumbling 1m"),
            Some("country"),
        )
        .unwrap();
        assert_eq!(
            topic.filters(),
            [(0, "camp_5541".to_owned()), (1, "US".to_owned())]
        );
        assert_eq!(topic.window(), 1);
        assert_eq!(topic.group_by(), Some(1));
    }

    #[test]
    fn a_topic_must_start_with_metrics() {
        assert_eq!(
            parse("events:ad_clicks", None, None),
            Err(TopicError::NotMetrics)
        );
        assert_eq!(parse("", None, None), Err(TopicError::NotMetrics));
    }

    #[test]
    fn an_unknown_metric_is_named() {
        let error = parse("metrics:ad_views", None, None).unwrap_err();
        assert_eq!(error, TopicError::UnknownMetric("ad_views".into()));
        assert_eq!(error.to_string(), "unknown metric 'ad_views'");
        assert_eq!(
            parse("metrics", None, None),
            Err(TopicError::UnknownMetric(String::new()))
        );
    }

    #[test]
    fn a_dimension_is_filtered_once() {
        assert_eq!(
            parse("metrics:ad_clicks:country:US:country:US", None, None),
            Err(TopicError::RepeatedFilter("country".into()))
        );
    }

    #[test]
    fn a_filter_without_a_value_is_refused() {
        assert_eq!(
            parse("metrics:ad_clicks:country", None, None),
            Err(TopicError::UnpairedFilter)
        );
    }

    #[test]
    fn an_unknown_dimension_is_named_in_a_filter_or_a_grouping() {
        let error = parse("metrics:ad_clicks:device:mobile", None, None).unwrap_err();
        assert_eq!(
            error.to_string(),
            "'device' is not a dimension of ad_clicks"
        );
        assert_eq!(
            parse("metrics:ad_clicks", None, Some("device")),
            Err(TopicError::UnknownDimension {
                dimension: "device".into(),
                metric: "ad_clicks".into(),
            })
        );
    }

    #[test]
    fn a_window_must_be_a_spec_and_one_of_the_metrics() {
        assert!(matches!(
            parse("metrics:ad_clicks", Some("hopping"), None),
            Err(TopicError::BadWindow(_))
        ));
        let error = parse("metrics:ad_clicks", Some("tumbling 5m"), None).unwrap_err();
        assert_eq!(error.to_string(), "ad_clicks has no window 'tumbling 5m'");
    }

    #[test]
    fn the_same_subscription_is_the_same_topic() {
        let a = parse("metrics:ad_clicks:country:US", None, None).unwrap();
        let b = parse("metrics:ad_clicks:country:US", Some("tumbling 10s"), None).unwrap();
        assert_eq!(a, b);
        assert_ne!(
            a,
            parse("metrics:ad_clicks:country:US", None, Some("country")).unwrap()
        );
    }
}
