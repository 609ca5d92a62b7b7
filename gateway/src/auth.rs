//! Who may call the API, and how fast.
//!
//! Each `[[auth.keys]]` entry is a secret with scopes: `write` may post
//! events, `read` may query history and the catalog and open `/v1/live`,
//! `admin` may do everything, dead letters and `/metrics` included. A
//! request carries its secret as `Authorization: Bearer <secret>`, or, where
//! a browser cannot set that header (a WebSocket), as the query parameter
//! `access_token` (RFC 6750, 2.3), which is taken out of the query before
//! the handler reads it.
//!
//! Secrets are compared by their SHA-256 digests, in constant time, against
//! every key: neither how long a wrong secret took to refuse nor which key
//! was tried says anything about the secrets. They are never logged.
//!
//! A key may have `events_per_second` with a `burst`: a token bucket (the
//! GCRA of `governor`) that a request takes as many tokens from as it holds
//! events, all or none. A request the bucket cannot cover now gets `429`
//! with `Retry-After`; one larger than the bucket itself, `413`. Each
//! gateway keeps its own buckets.
//!
//! With no keys configured every request is served: the configuration
//! allows that only on a loopback address, or with `auth.allow_anonymous`.

use std::num::NonZeroU32;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tally_dataflow::config::{AuthConfig, Scope};
use warp::http::header::{HeaderValue, RETRY_AFTER, WWW_AUTHENTICATE};
use warp::http::StatusCode;

use crate::history::parse_params;
use crate::ops::Ops;
use crate::reply::ApiError;

/// The query parameter a browser may carry its secret in.
pub const ACCESS_TOKEN: &str = "access_token";

/// The keys of a gateway, with their buckets.
pub struct Auth {
    keys: Vec<Key>,
    clock: DefaultClock,
}

struct Key {
    name: String,
    digest: [u8; 32],
    scopes: Vec<Scope>,
    bucket: Option<(DefaultDirectRateLimiter, u32)>,
}

/// Who made a request: a key, or anyone where no keys are configured.
#[derive(Clone, Copy, Debug)]
pub struct Caller(Option<usize>);

/// A request that passed: its caller, and its query without the secret.
#[derive(Debug)]
pub struct Access {
    /// The key the request came with.
    pub caller: Caller,
    /// The raw query, less any `access_token`.
    pub query: String,
}

impl Auth {
    /// The keys of `config`.
    pub fn new(config: &AuthConfig) -> Auth {
        let clock = DefaultClock::default();
        let keys = config
            .keys
            .iter()
            .map(|key| Key {
                name: key.name.clone(),
                digest: digest(&key.secret.0),
                scopes: key.scopes.clone(),
                bucket: key.events_per_second.map(|rate| {
                    let burst = key.burst.unwrap_or(rate);
                    let quota = Quota::per_second(NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN))
                        .allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
                    (RateLimiter::direct_with_clock(quota, clock.clone()), burst)
                }),
            })
            .collect();
        Auth { keys, clock }
    }

    /// Whether requests need a key.
    pub fn required(&self) -> bool {
        !self.keys.is_empty()
    }

    /// Checks that a request with this `Authorization` header and raw query
    /// may do what `scope` allows.
    pub fn check(
        &self,
        authorization: Option<&str>,
        query: &str,
        scope: Scope,
        ops: &Ops,
    ) -> Result<Access, ApiError> {
        let (token, query) = split_token(query);
        if !self.required() {
            return Ok(Access {
                caller: Caller(None),
                query,
            });
        }
        let presented = authorization
            .and_then(|h| {
                let (scheme, rest) = h.trim().split_once(' ')?;
                scheme
                    .eq_ignore_ascii_case("bearer")
                    .then(|| rest.trim().to_owned())
            })
            .or(token);
        let Some(presented) = presented else {
            ops.auth_refused("", "missing");
            return Err(unauthorized(
                "this endpoint needs a key: send Authorization: Bearer <secret>, or access_token=<secret> in the query",
                None,
            ));
        };
        let presented = digest(&presented);
        // Every key is compared, whichever matches.
        let mut found = None;
        for (i, key) in self.keys.iter().enumerate() {
            if bool::from(key.digest.ct_eq(&presented)) {
                found = Some(i);
            }
        }
        let Some(i) = found else {
            ops.auth_refused("", "unknown");
            return Err(unauthorized(
                "the key is not known",
                Some("error=\"invalid_token\""),
            ));
        };
        let key = &self.keys[i];
        if !key.scopes.iter().any(|s| *s == scope || *s == Scope::Admin) {
            ops.auth_refused(&key.name, "scope");
            return Err(ApiError::new(
                StatusCode::FORBIDDEN,
                format!(
                    "the key '{}' may not do this: it needs the {} scope",
                    key.name,
                    scope.as_str()
                ),
            ));
        }
        Ok(Access {
            caller: Caller(Some(i)),
            query,
        })
    }

    /// Takes `events` from the caller's bucket, all or none.
    pub fn admit(&self, caller: Caller, events: usize, ops: &Ops) -> Result<(), ApiError> {
        let Some(key) = caller.0.map(|i| &self.keys[i]) else {
            return Ok(());
        };
        let Some((bucket, burst)) = &key.bucket else {
            return Ok(());
        };
        let n =
            NonZeroU32::new(u32::try_from(events).unwrap_or(u32::MAX)).unwrap_or(NonZeroU32::MIN);
        match bucket.check_n(n) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(not_until)) => {
                ops.auth_refused(&key.name, "rate");
                let wait = not_until.wait_time_from(self.clock.now());
                // Whole seconds, rounded up, and at least one.
                let seconds = wait.as_millis().div_ceil(1000).max(1);
                let mut error = ApiError::new(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "the key '{}' is over its rate of events; nothing was accepted, retry after {seconds} s",
                        key.name
                    ),
                );
                error
                    .headers
                    .insert(RETRY_AFTER, HeaderValue::from(seconds as u64));
                Err(error)
            }
            Err(_insufficient) => {
                ops.auth_refused(&key.name, "burst");
                Err(ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    format!(
                        "{events} events are more than the key '{}' may send at once ({burst}); nothing was accepted, send smaller batches",
                        key.name
                    ),
                ))
            }
        }
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

fn unauthorized(message: &str, error: Option<&str>) -> ApiError {
    let mut e = ApiError::new(StatusCode::UNAUTHORIZED, message);
    let challenge = match error {
        Some(error) => format!("Bearer realm=\"tally\", {error}"),
        None => "Bearer realm=\"tally\"".to_owned(),
    };
    // The challenge is ASCII built from literals.
    e.headers.insert(
        WWW_AUTHENTICATE,
        HeaderValue::try_from(challenge).expect("an ASCII challenge"),
    );
    e
}

/// Takes `access_token` out of a raw query: its decoded value, and the
/// query without it.
fn split_token(query: &str) -> (Option<String>, String) {
    let mut token = None;
    let rest: Vec<&str> = query
        .split('&')
        .filter(|pair| match pair.split_once('=') {
            Some((ACCESS_TOKEN, _)) => {
                // Decoded by the API's one query reader; a malformed
                // escape leaves no token.
                token = parse_params(pair)
                    .ok()
                    .and_then(|params| params.into_iter().next())
                    .map(|(_, value)| value);
                false
            }
            _ => !pair.is_empty(),
        })
        .collect();
    (token, rest.join("&"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tally_dataflow::config::{ApiKey, Secret};

    fn auth(rate: Option<u32>, burst: Option<u32>) -> Auth {
        Auth::new(&AuthConfig {
            keys: vec![
                ApiKey {
                    name: "sdk".into(),
                    secret: Secret("wk_0123456789abcdef".into()),
                    scopes: vec![Scope::Write],
                    events_per_second: rate,
                    burst,
                },
                ApiKey {
                    name: "ops".into(),
                    secret: Secret("ak_0123456789abcdef".into()),
                    scopes: vec![Scope::Admin],
                    events_per_second: None,
                    burst: None,
                },
            ],
            allow_anonymous: false,
        })
    }

    #[test]
    fn a_key_is_taken_from_the_header_or_the_query_and_checked_for_its_scope() {
        let (auth, ops) = (auth(None, None), Ops::new(None));
        let write = auth.check(Some("Bearer wk_0123456789abcdef"), "", Scope::Write, &ops);
        assert!(write.is_ok());
        let read = auth.check(Some("bearer wk_0123456789abcdef"), "", Scope::Read, &ops);
        assert_eq!(read.unwrap_err().status, StatusCode::FORBIDDEN);
        let admin = auth
            .check(
                None,
                "metric=a&access_token=ak_0123456789abcdef&x=1",
                Scope::Read,
                &ops,
            )
            .unwrap();
        assert_eq!(admin.query, "metric=a&x=1");
        let missing = auth.check(None, "", Scope::Read, &ops).unwrap_err();
        assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
        assert!(missing.headers.contains_key(WWW_AUTHENTICATE));
        let unknown = auth.check(Some("Bearer nope"), "", Scope::Read, &ops);
        assert_eq!(unknown.unwrap_err().status, StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn without_keys_anyone_is_served_and_the_token_is_still_taken_out() {
        let auth = Auth::new(&AuthConfig::default());
        let access = auth
            .check(
                None,
                "access_token=x&metric=a",
                Scope::Admin,
                &Ops::new(None),
            )
            .unwrap();
        assert_eq!(access.query, "metric=a");
    }

    #[test]
    fn a_bucket_refuses_a_request_whole_and_says_when_to_retry() {
        let (auth, ops) = (auth(Some(10), Some(20)), Ops::new(None));
        let caller = auth
            .check(Some("Bearer wk_0123456789abcdef"), "", Scope::Write, &ops)
            .unwrap()
            .caller;
        assert!(auth.admit(caller, 15, &ops).is_ok());
        let over = auth.admit(caller, 15, &ops).unwrap_err();
        assert_eq!(over.status, StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(over.headers[RETRY_AFTER], "1");
        // What is left is still there: the refused request took nothing.
        assert!(auth.admit(caller, 5, &ops).is_ok());
        let huge = auth.admit(caller, 21, &ops).unwrap_err();
        assert_eq!(huge.status, StatusCode::PAYLOAD_TOO_LARGE);
    }
}
