//! How large an event may be, field by field, at the edge.
//!
//! A request body is bounded as a whole (`server.max_body`), but within it
//! one event could carry a dimension value of megabytes, or thousands of
//! dimensions, and every such string is kept in the log, in the result
//! store's groups and in checkpoints. These bounds are checked only when a
//! request is accepted ([`super::parse_batch`]), never when the log is read
//! back, so that lowering one never makes accepted events unreadable.

use super::{EventRef, FieldError};

/// The default of `server.max_event_id`: 256 bytes, several times the
/// longest id scheme in use (a UUID is 36 characters, a prefixed one such
/// as `evt_…` some 50).
pub const DEFAULT_MAX_EVENT_ID: usize = 256;

/// The default of `server.max_name`: 128 bytes for an `eventType` and for
/// the name of a dimension or value. Names are identifiers such as
/// `campaignId`; analytics tools allow 40 to 255 characters.
pub const DEFAULT_MAX_NAME: usize = 128;

/// The default of `server.max_dimension_value`: 2 KiB. A dimension value
/// is a label to group by, such as a campaign id or a country; the longest
/// that a user may reasonably send is a URL, and 2,048 bytes is the
/// practical limit that browsers and CDNs keep URLs under.
pub const DEFAULT_MAX_DIMENSION_VALUE: usize = 2048;

/// The default of `server.max_dimensions`: 64 dimensions per event. The
/// seed's events have four, and a metric groups by a handful.
pub const DEFAULT_MAX_DIMENSIONS: usize = 64;

/// The default of `server.max_values`: 64 numeric values per event.
pub const DEFAULT_MAX_VALUES: usize = 64;

/// Bounds on one event's fields, in bytes of UTF-8 and in entries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventLimits {
    /// The longest `eventId`. Default [`DEFAULT_MAX_EVENT_ID`].
    pub max_event_id: usize,
    /// The longest `eventType`, dimension name or value name. Default
    /// [`DEFAULT_MAX_NAME`].
    pub max_name: usize,
    /// The longest dimension value. Default [`DEFAULT_MAX_DIMENSION_VALUE`].
    pub max_dimension_value: usize,
    /// The most dimensions in one event. Default [`DEFAULT_MAX_DIMENSIONS`].
    pub max_dimensions: usize,
    /// The most numeric values in one event. Default [`DEFAULT_MAX_VALUES`].
    pub max_values: usize,
}

impl Default for EventLimits {
    fn default() -> EventLimits {
        EventLimits {
            max_event_id: DEFAULT_MAX_EVENT_ID,
            max_name: DEFAULT_MAX_NAME,
            max_dimension_value: DEFAULT_MAX_DIMENSION_VALUE,
            max_dimensions: DEFAULT_MAX_DIMENSIONS,
            max_values: DEFAULT_MAX_VALUES,
        }
    }
}

impl EventLimits {
    /// The fields of `event` past a bound. A problem says the bound and
    /// the size found, never the value, so that the answer stays small
    /// however large the value was. A name past its bound is reported
    /// under its object (`dimensions` or `values`) for the same reason.
    pub fn check(&self, event: &EventRef<'_>) -> Vec<FieldError> {
        let mut errors = Vec::new();
        let too_long =
            |len: usize, max: usize| format!("is {len} bytes; at most {max} are allowed");
        if let Some(id) = &event.event_id {
            if id.len() > self.max_event_id {
                errors.push(FieldError::new(
                    "eventId",
                    too_long(id.len(), self.max_event_id),
                ));
            }
        }
        if event.event_type.len() > self.max_name {
            errors.push(FieldError::new(
                "eventType",
                too_long(event.event_type.len(), self.max_name),
            ));
        }
        let too_many = |n: usize, max: usize| format!("has {n} entries; at most {max} are allowed");
        if event.dimensions.len() > self.max_dimensions {
            // One error, not one per entry: they could be thousands.
            errors.push(FieldError::new(
                "dimensions",
                too_many(event.dimensions.len(), self.max_dimensions),
            ));
        } else {
            for (name, value) in &event.dimensions {
                if name.len() > self.max_name {
                    errors.push(FieldError::new(
                        "dimensions",
                        format!("a name {}", too_long(name.len(), self.max_name)),
                    ));
                } else if value.len() > self.max_dimension_value {
                    errors.push(FieldError::new(
                        format!("dimensions.{name}"),
                        too_long(value.len(), self.max_dimension_value),
                    ));
                }
            }
        }
        if event.values.len() > self.max_values {
            errors.push(FieldError::new(
                "values",
                too_many(event.values.len(), self.max_values),
            ));
        } else {
            for (name, _) in &event.values {
                if name.len() > self.max_name {
                    errors.push(FieldError::new(
                        "values",
                        format!("a name {}", too_long(name.len(), self.max_name)),
                    ));
                }
            }
        }
        errors
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::parse_event_ref;

    fn check(limits: &EventLimits, json: &str) -> Vec<(String, String)> {
        limits
            .check(&parse_event_ref(json.as_bytes()).unwrap())
            .into_iter()
            .map(|e| (e.field, e.problem))
            .collect()
    }

    #[test]
    fn each_bound_is_inclusive_and_names_its_field() {
        let limits = EventLimits {
            max_event_id: 3,
            max_name: 4,
            max_dimension_value: 5,
            max_dimensions: 2,
            max_values: 1,
        };
        let at = r#"{"eventId":"abc","eventType":"four","dimensions":{"a":"12345","b":"x"},"values":{"v":1}}"#;
        assert_eq!(check(&limits, at), []);
        let past = r#"{"eventId":"abcd","eventType":"fives","dimensions":{"a":"123456","named":"x"},"values":{"v":1,"w":2}}"#;
        assert_eq!(
            check(&limits, past),
            [
                ("eventId".into(), "is 4 bytes; at most 3 are allowed".into()),
                (
                    "eventType".into(),
                    "is 5 bytes; at most 4 are allowed".into()
                ),
                (
                    "dimensions.a".into(),
                    "is 6 bytes; at most 5 are allowed".into()
                ),
                (
                    "dimensions".into(),
                    "a name is 5 bytes; at most 4 are allowed".into()
                ),
                (
                    "values".into(),
                    "has 2 entries; at most 1 are allowed".into()
                ),
            ]
        );
        let crowded = r#"{"eventType":"x","dimensions":{"a":"1","b":"2","c":"33333333"}}"#;
        assert_eq!(
            check(&limits, crowded),
            [(
                "dimensions".into(),
                "has 3 entries; at most 2 are allowed".into()
            )]
        );
    }

    #[test]
    fn lengths_are_bytes_of_utf8() {
        let limits = EventLimits {
            max_dimension_value: 4,
            ..EventLimits::default()
        };
        // Two characters of two bytes each fit; a third does not.
        assert_eq!(
            check(&limits, r#"{"eventType":"x","dimensions":{"c":"éé"}}"#),
            []
        );
        assert_eq!(
            check(&limits, r#"{"eventType":"x","dimensions":{"c":"ééé"}}"#).len(),
            1
        );
    }
}
