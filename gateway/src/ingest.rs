//! `POST /v1/events`: validate, make durable, then answer 202.
//!
//! A request is one event, a JSON array of events, or NDJSON
//! (`Content-Type: application/x-ndjson`). It is all or nothing: if any event
//! is invalid, nothing is written and the 400 names every bad index and
//! field. Accepted events are written as one batch, and the 202 is sent only
//! once the event sink says they are durable.
//!
//! **Content types.** Only JSON and NDJSON bodies are read; any other type,
//! or none, gets a `415`. A browser sends `text/plain`, form and multipart
//! bodies to any origin without asking the server first (no CORS
//! preflight), so accepting them would let any web page a user opens post
//! events. `application/json` is never sent cross-origin without a
//! preflight.
//!
//! **Slow bodies.** The body, and what is drained of a refused one, must
//! arrive within `server.body_timeout` of the request's head; a slower one
//! gets a `408` and its connection is closed, so a client trickling a large
//! body cannot hold a connection, and its buffer, for as long as it likes.

use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tally_dataflow::event::{parse_batch, BatchError};
use tally_dataflow::time::format_rfc3339;
use tokio::time::{timeout_at, Instant};
use warp::http::header::{HeaderValue, RETRY_AFTER};
use warp::http::StatusCode;
use warp::reply::{json, with_status};
use warp::Reply;

use crate::backend::AppendError;
use crate::reply::{ApiError, ApiResult};
use tally_dataflow::time::now_ms;

use crate::Gateway;

/// Bodies larger than this are parsed on the blocking pool, so one large
/// request does not hold up the connections sharing its runtime thread.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// Handles one ingest request. Once its events are valid, `admit` says
/// whether they may go in (the caller's rate limit), all or none.
pub async fn ingest<S, B>(
    gateway: Arc<Gateway>,
    content_type: Option<String>,
    content_length: Option<u64>,
    body: S,
    admit: impl FnOnce(usize) -> Result<(), ApiError>,
) -> ApiResult
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let server = &gateway.config.server;
    let limit = server.max_body_bytes;
    let ops = &gateway.ops;
    let mut body = body;
    let deadline = Instant::now() + server.body_timeout;
    let format = match BodyFormat::of(content_type.as_deref()) {
        Ok(format) => format,
        Err(refusal) => {
            ops.rejected("unsupported_media_type", 0);
            drain(&mut body, limit, deadline).await;
            return Err(refusal);
        }
    };
    if content_length.is_some_and(|len| len > limit) {
        ops.rejected("too_large", 0);
        drain(&mut body, limit, deadline).await;
        return Err(too_large(limit));
    }
    let body = match timeout_at(deadline, read_limited(&mut body, limit)).await {
        Ok(Ok(body)) => body,
        Ok(Err(e)) => {
            ops.rejected("too_large", 0);
            drain(&mut body, limit, deadline).await;
            return Err(e);
        }
        Err(_elapsed) => {
            ops.rejected("body_timeout", 0);
            return Err(too_slow(server.body_timeout));
        }
    };
    let ndjson = format == BodyFormat::Ndjson;
    let received_at = now_ms();
    let (max_future, limits) = (server.max_future, server.event_limits);
    let parsed = if body.len() <= INLINE_PARSE_BYTES {
        parse_batch(&body, ndjson, received_at, max_future, &limits)
    } else {
        tokio::task::spawn_blocking(move || {
            parse_batch(&body, ndjson, received_at, max_future, &limits)
        })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    };
    let mut records = match parsed {
        Ok(records) => records,
        Err(BatchError::Malformed(e)) => {
            ops.rejected("malformed", 0);
            return Err(ApiError::bad_request(format!("malformed JSON: {e}")));
        }
        Err(BatchError::Empty) => {
            ops.rejected("empty", 0);
            return Err(ApiError::bad_request("the request holds no events"));
        }
        Err(BatchError::Invalid(invalid)) => {
            ops.rejected("invalid", invalid.len() as u64);
            let details: Vec<_> = invalid
                .iter()
                .flat_map(|(index, errors)| {
                    errors.iter().map(
                        move |e| json!({"index": index, "field": e.field, "problem": e.problem}),
                    )
                })
                .collect();
            let mut error = ApiError::bad_request(format!(
                "{} invalid event(s); nothing was accepted",
                invalid.len()
            ));
            error.details = Some(details.into());
            return Err(error);
        }
    };
    let accepted = records.len();
    if gateway.config.dedupe.horizon == 0 {
        // Ids pick partitions only so that repeats meet; without
        // deduplication the request stays one batch.
        records.iter_mut().for_each(|r| r.id = None);
    }
    // The caller's rate limit, for the whole request or none of it.
    admit(accepted)?;
    if let Err(e) = gateway.events.append(records).await {
        tracing::error!(
            error = %e,
            retryable = e.is_retryable(),
            events = accepted,
            "cannot append to the event log"
        );
        ops.rejected("unavailable", 0);
        return Err(unavailable(&e));
    }
    ops.events_accepted.inc_by(accepted as u64);
    let body = json!({"status": "ACCEPTED", "receivedAt": format_rfc3339(received_at), "accepted": accepted});
    Ok(with_status(json(&body), StatusCode::ACCEPTED).into_response())
}

/// The answer to a failed append. Every failure is the log's, not the
/// request's: the request was checked before it was appended, and the
/// producer splits it to fit the brokers' limit. So each is a 503 with
/// `Retry-After`, even one that a retry will not cure, for which an
/// operator must act.
fn unavailable(e: &AppendError) -> ApiError {
    let mut error = match e {
        AppendError::Log(_) | AppendError::Kafka(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the event log is unavailable; retry",
        ),
    };
    error
        .headers
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    error
}

/// How a body is framed, from its `Content-Type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BodyFormat {
    /// One event or an array of events: `application/json`, or a JSON-based
    /// type such as `application/cloudevents+json`.
    Json,
    /// One event per line: `application/x-ndjson`, `application/ndjson`,
    /// `application/jsonlines` or `application/x-jsonlines`.
    Ndjson,
}

impl BodyFormat {
    /// The format of a body sent with `content_type`, or the `415` for a
    /// type that is neither JSON nor NDJSON, for a charset other than
    /// UTF-8 (JSON is UTF-8, RFC 8259), and for no type at all.
    fn of(content_type: Option<&str>) -> Result<BodyFormat, ApiError> {
        let refuse = |found: &str| {
            ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                format!(
                    "{found}: send events as JSON (Content-Type: application/json) \
                     or NDJSON (Content-Type: application/x-ndjson)"
                ),
            )
        };
        let Some(content_type) = content_type else {
            return Err(refuse("no Content-Type"));
        };
        let mut parts = content_type.split(';');
        let essence = parts.next().unwrap_or_default().trim().to_ascii_lowercase();
        let format = match essence.strip_prefix("application/") {
            Some("json") => BodyFormat::Json,
            Some("x-ndjson" | "ndjson" | "jsonlines" | "x-jsonlines") => BodyFormat::Ndjson,
            Some(subtype) if subtype.ends_with("+json") => BodyFormat::Json,
            _ => return Err(refuse(&format!("Content-Type {content_type}"))),
        };
        let utf8 = parts.all(|parameter| match parameter.split_once('=') {
            Some((name, value)) if name.trim().eq_ignore_ascii_case("charset") => {
                let value = value.trim().trim_matches('"');
                value.eq_ignore_ascii_case("utf-8") || value.eq_ignore_ascii_case("utf8")
            }
            _ => true,
        });
        if !utf8 {
            return Err(refuse(&format!("Content-Type {content_type}")));
        }
        Ok(format)
    }
}

/// The `408` for a body that took longer than `timeout`. It closes the
/// connection: what is left of the body is still on its way, and reading
/// it would hand the slow client the time the timeout took away.
fn too_slow(timeout: Duration) -> ApiError {
    let mut error = ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        format!("the body did not arrive within {} s", timeout.as_secs_f64()),
    );
    error.close = true;
    error
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body exceeds the limit of {limit} bytes"),
    )
}

/// Reads and discards what is left of a refused body, up to as much again
/// as the limit (at least 1 MiB) and until `deadline`, so the client,
/// still sending, reads the refusal rather than a connection reset. A
/// larger or slower body is cut off.
async fn drain<S, B>(body: &mut S, limit: u64, deadline: Instant)
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let bound = limit.max(1 << 20);
    let mut drained = 0u64;
    while drained <= bound {
        match timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(chunk))) => drained += chunk.remaining() as u64,
            Ok(Some(Err(_)) | None) | Err(_) => break,
        }
    }
}

/// Reads the body, failing as soon as it passes `limit` bytes.
async fn read_limited<S, B>(body: &mut S, limit: u64) -> Result<Vec<u8>, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::bad_request(format!("cannot read the body: {e}")))?;
        if (buf.len() + chunk.remaining()) as u64 > limit {
            return Err(too_large(limit));
        }
        while chunk.has_remaining() {
            let part = chunk.chunk();
            buf.extend_from_slice(part);
            let n = part.len();
            chunk.advance(n);
        }
    }
    Ok(buf.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_json_and_ndjson_types_in_utf8_are_read() {
        let of = |t: Option<&str>| BodyFormat::of(t).ok();
        assert_eq!(of(Some("application/json")), Some(BodyFormat::Json));
        assert_eq!(
            of(Some("Application/JSON; charset=\"UTF-8\"")),
            Some(BodyFormat::Json)
        );
        assert_eq!(of(Some("application/vnd.api+json")), Some(BodyFormat::Json));
        assert_eq!(of(Some("application/x-ndjson")), Some(BodyFormat::Ndjson));
        assert_eq!(of(Some("application/jsonlines")), Some(BodyFormat::Ndjson));
        for refused in [
            None,
            Some(""),
            Some("text/plain"),
            Some("text/json"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
            Some("application/json; charset=latin1"),
        ] {
            assert_eq!(of(refused), None, "{refused:?}");
        }
        let error = BodyFormat::of(Some("text/plain")).unwrap_err();
        assert_eq!(error.status, StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
}
