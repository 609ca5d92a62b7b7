//! Waiting out an external system that is down: retries with exponential
//! backoff, each failure logged with what was being attempted.
//!
//! A connector never spins on a dead service and never gives up silently:
//! it says what it cannot do, waits longer each time (up to
//! [`MAX_DELAY`]), and says so again when it has recovered.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tracing::{info, warn};

/// The first wait after a failure.
const FIRST_DELAY: Duration = Duration::from_millis(100);
/// The longest wait between attempts.
pub const MAX_DELAY: Duration = Duration::from_secs(5);

/// Backoff state for one thing being retried.
#[derive(Debug)]
pub struct Backoff {
    what: String,
    failures: u32,
}

impl Backoff {
    /// Backoff for attempts to `what` (written to follow "cannot").
    pub fn new(what: impl Into<String>) -> Backoff {
        Backoff {
            what: what.into(),
            failures: 0,
        }
    }

    /// Logs a failure and returns how long to wait before the next attempt.
    pub fn failed(&mut self, error: &dyn Display) -> Duration {
        self.failures += 1;
        let delay = FIRST_DELAY
            .saturating_mul(1 << self.failures.min(16).saturating_sub(1))
            .min(MAX_DELAY);
        warn!(
            error = %error,
            attempt = self.failures,
            retry_in = ?delay,
            "cannot {}; retrying", self.what
        );
        delay
    }

    /// Notes a success; logs the recovery if there were failures.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(attempts = self.failures + 1, "managed to {}", self.what);
            self.failures = 0;
        }
    }

    /// Failures since the last success.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

/// Runs `op` until it succeeds, sleeping the thread between attempts.
pub fn blocking<T, E: Display>(what: &str, mut op: impl FnMut() -> Result<T, E>) -> T {
    let mut backoff = Backoff::new(what);
    loop {
        match op() {
            Ok(value) => {
                backoff.succeeded();
                return value;
            }
            Err(e) => std::thread::sleep(backoff.failed(&e)),
        }
    }
}

/// Runs `op` until it succeeds, sleeping the task between attempts.
pub async fn until_ok<T, E: Display, F: Future<Output = Result<T, E>>>(
    what: &str,
    mut op: impl FnMut() -> F,
) -> T {
    let mut backoff = Backoff::new(what);
    loop {
        match op().await {
            Ok(value) => {
                backoff.succeeded();
                return value;
            }
            Err(e) => tokio::time::sleep(backoff.failed(&e)).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_double_up_to_the_cap() {
        let mut backoff = Backoff::new("test");
        let delays: Vec<Duration> = (0..8).map(|_| backoff.failed(&"down")).collect();
        assert_eq!(delays[0], Duration::from_millis(100));
        assert_eq!(delays[1], Duration::from_millis(200));
        assert_eq!(delays[5], Duration::from_millis(3200));
        assert_eq!(delays[7], MAX_DELAY);
        backoff.succeeded();
        assert_eq!(backoff.failures(), 0);
        assert_eq!(backoff.failed(&"down"), Duration::from_millis(100));
    }
}
