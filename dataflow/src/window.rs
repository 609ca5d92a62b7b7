//! Window specifications and the pane arithmetic behind them.
//!
//! Windows are aligned to the epoch. A metric's events are kept in *panes*:
//! consecutive slices of event time whose width divides every window size and
//! slide of the metric. An event updates exactly one pane, whatever windows
//! the metric declares; a window's value is the merge of the panes it covers.
//! A sliding window of width W every S therefore costs one pane update per
//! event, the same as a tumbling window, plus W/S pane merges when it closes.

use serde::{Deserialize, Serialize};
use std::fmt;

use crate::time::{format_millis, parse_millis, Millis};

/// One window declaration of a metric.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum WindowSpec {
    /// Back-to-back windows of `size` milliseconds.
    Tumbling {
        /// Width of each window.
        size: Millis,
    },
    /// Windows of `size` milliseconds, one ending every `slide` milliseconds.
    Sliding {
        /// Width of each window.
        size: Millis,
        /// Distance between the ends of consecutive windows; divides `size`.
        slide: Millis,
    },
}

/// A window instance: `[start, end)` in event time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Span {
    /// First millisecond in the window.
    pub start: Millis,
    /// First millisecond after the window.
    pub end: Millis,
}

impl WindowSpec {
    /// Parses `tumbling 10s` or `sliding 5m every 10s`.
    pub fn parse(text: &str) -> Result<WindowSpec, String> {
        let words: Vec<&str> = text.split_whitespace().collect();
        let spec = match words.as_slice() {
            ["tumbling", size] => WindowSpec::Tumbling { size: parse_millis(size)? },
            ["sliding", size, "every", slide] => {
                let (size, slide) = (parse_millis(size)?, parse_millis(slide)?);
                if size % slide != 0 {
                    return Err(format!("in '{text}', the width must be a multiple of the slide"));
                }
                if size == slide {
                    return Err(format!("'{text}' slides by its own width: declare it as 'tumbling'"));
                }
                WindowSpec::Sliding { size, slide }
            }
            _ => {
                return Err(format!(
                    "'{text}' is not a window: write 'tumbling <duration>' or 'sliding <duration> every <duration>'"
                ))
            }
        };
        Ok(spec)
    }

    /// The width of each window.
    pub fn size(&self) -> Millis {
        match *self {
            WindowSpec::Tumbling { size } | WindowSpec::Sliding { size, .. } => size,
        }
    }

    /// The distance between consecutive window ends.
    pub fn slide(&self) -> Millis {
        match *self {
            WindowSpec::Tumbling { size } => size,
            WindowSpec::Sliding { slide, .. } => slide,
        }
    }

    /// True for tumbling windows, the ones history is answered from.
    pub fn is_tumbling(&self) -> bool {
        matches!(self, WindowSpec::Tumbling { .. })
    }

    /// The windows that contain the pane starting at `pane`, oldest first.
    /// The pane width must divide this spec's size and slide.
    pub fn windows_of_pane(&self, pane: Millis) -> impl Iterator<Item = Span> {
        let (size, slide) = (self.size(), self.slide());
        // Window ends are the multiples of `slide` in (pane, pane + size].
        let first_end = (pane.div_euclid(slide) + 1) * slide;
        (0..size / slide).map(move |k| {
            let end = first_end + k * slide;
            Span {
                start: end - size,
                end,
            }
        })
    }
}

impl fmt::Display for WindowSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            WindowSpec::Tumbling { size } => write!(f, "tumbling {}", format_millis(size)),
            WindowSpec::Sliding { size, slide } => {
                write!(
                    f,
                    "sliding {} every {}",
                    format_millis(size),
                    format_millis(slide)
                )
            }
        }
    }
}

/// The pane width for a set of windows: the greatest common divisor of their
/// sizes and slides.
pub fn pane_width(specs: &[WindowSpec]) -> Millis {
    specs
        .iter()
        .flat_map(|s| [s.size(), s.slide()])
        .fold(0, gcd)
}

/// The longest tick: data waits for the frontier to pass its tick before
/// it is applied, so a late event's revision goes out up to this long after
/// the watermark has passed the event's stamp.
pub const MAX_TICK: Millis = 1_000;

/// The step a job's event time moves in: the largest divisor, no longer
/// than [`MAX_TICK`], of the greatest common divisor of the tables' panes
/// (window ends, pane expiries and rollup merges all fall on their
/// multiples), the allowed lateness (which puts expiries off by that much)
/// and the checkpoint interval (boundaries are its multiples), if any.
///
/// Nothing in the window state, the cap or the checkpoints happens strictly
/// between two multiples of it. So two stamps with no multiple of it in
/// between close, expire, cap and cut alike, and data stamped `s` may travel
/// at `s` rounded down to a multiple of it, together with the other data
/// rounded to the same multiple (see [`crate::operators::source`]).
pub fn tick(
    panes: impl IntoIterator<Item = Millis>,
    allowed_lateness: Millis,
    checkpoint_interval: Option<Millis>,
) -> Millis {
    let common = panes
        .into_iter()
        .chain([allowed_lateness])
        .chain(checkpoint_interval)
        .fold(0, gcd)
        .max(1);
    // The fewest parts of `common` that are each no longer than MAX_TICK.
    let parts = ((common + MAX_TICK - 1) / MAX_TICK..)
        .find(|parts| common % parts == 0)
        .expect("common divides into common parts");
    common / parts
}

fn gcd(a: Millis, b: Millis) -> Millis {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The start of the bucket of width `width` that contains `t`.
pub fn align(t: Millis, width: Millis) -> Millis {
    t.div_euclid(width) * width
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tick_divides_every_pane_the_lateness_and_the_checkpoint_interval() {
        let ticks = [
            tick([10_000, 60_000, 3_600_000], 30_000, Some(10_000)),
            tick([300], 30_000, Some(10_000)),
            tick([1_500], 0, None),
            tick([7_000], 0, None),
            tick([60_000], 30_000, Some(7)),
            tick([1_009_000], 0, None),
        ];
        assert_eq!(ticks, [1_000, 100, 750, 1_000, 1, 1_000]);
    }

    #[test]
    fn parses_and_prints_specs() {
        for text in [
            "tumbling 10s",
            "tumbling 1m",
            "sliding 5m every 10s",
            "tumbling 1h",
        ] {
            assert_eq!(WindowSpec::parse(text).unwrap().to_string(), text);
        }
        assert!(WindowSpec::parse("sliding 5m every 7s").is_err());
        assert!(WindowSpec::parse("hopping 5m").is_err());
        assert!(WindowSpec::parse("tumbling 0s").is_err());
    }

    #[test]
    fn tumbling_pane_lies_in_one_window() {
        let spec = WindowSpec::parse("tumbling 1m").unwrap();
        let spans: Vec<_> = spec.windows_of_pane(130_000).collect();
        assert_eq!(
            spans,
            [Span {
                start: 120_000,
                end: 180_000
            }]
        );
    }

    #[test]
    fn sliding_pane_lies_in_width_over_slide_windows() {
        let spec = WindowSpec::parse("sliding 30s every 10s").unwrap();
        let spans: Vec<_> = spec.windows_of_pane(20_000).collect();
        assert_eq!(
            spans,
            [
                Span {
                    start: 0,
                    end: 30_000
                },
                Span {
                    start: 10_000,
                    end: 40_000
                },
                Span {
                    start: 20_000,
                    end: 50_000
                }
            ]
        );
        for span in spans {
            assert!(span.start <= 20_000 && 30_000 <= span.end);
        }
    }

    #[test]
    fn negative_times_align_down() {
        assert_eq!(align(-1, 10), -10);
        let spec = WindowSpec::parse("tumbling 10s").unwrap();
        assert_eq!(
            spec.windows_of_pane(-10_000).next().unwrap(),
            Span {
                start: -10_000,
                end: 0
            }
        );
    }

    #[test]
    fn pane_width_divides_everything() {
        let specs: Vec<_> = ["tumbling 10s", "tumbling 1m", "sliding 5m every 10s"]
            .iter()
            .map(|s| WindowSpec::parse(s).unwrap())
            .collect();
        assert_eq!(pane_width(&specs), 10_000);
        assert_eq!(
            pane_width(&[WindowSpec::parse("sliding 1m every 15s").unwrap(), specs[0]]),
            5_000
        );
    }
}
