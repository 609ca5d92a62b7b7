//! `POST /v1/events`: validate, make durable, then answer 202.
//!
//! A request is one event, a JSON array of events, or NDJSON
//! (`Content-Type: application/x-ndjson`). It is all or nothing: if any event
//! is invalid, nothing is written and the 400 names every bad index and
//! field. Accepted events are written as one batch, and the 202 is sent only
//! once the event sink says they are durable.

use std::sync::Arc;

use bytes::{Buf, BytesMut};
use futures_util::{Stream, StreamExt};
use serde_json::json;
use tally_dataflow::event::{parse_batch, BatchError};
use tally_dataflow::time::format_rfc3339;
use warp::http::StatusCode;
use warp::reply::{json, with_status};
use warp::Reply;

use crate::backend::AppendError;
use crate::reply::{ApiError, ApiResult};
use crate::{now_ms, Gateway};

/// Bodies larger than this are parsed on the blocking pool, so one large
/// request does not hold up the connections sharing its runtime thread.
const INLINE_PARSE_BYTES: usize = 64 * 1024;

/// Handles one ingest request.
pub async fn ingest<S, B>(
    gateway: Arc<Gateway>,
    content_type: Option<String>,
    content_length: Option<u64>,
    body: S,
) -> ApiResult
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let limit = gateway.config.server.max_body_bytes;
    let ops = &gateway.ops;
    let mut body = body;
    if content_length.is_some_and(|len| len > limit) {
        ops.rejected("too_large", 0);
        drain(&mut body, limit).await;
        return Err(too_large(limit));
    }
    let body = match read_limited(&mut body, limit).await {
        Ok(body) => body,
        Err(e) => {
            ops.rejected("too_large", 0);
            drain(&mut body, limit).await;
            return Err(e);
        }
    };
    let ndjson = content_type.is_some_and(|t| t.contains("ndjson") || t.contains("jsonlines"));
    let received_at = now_ms();
    let max_future = gateway.config.server.max_future;
    let parsed = if body.len() <= INLINE_PARSE_BYTES {
        parse_batch(&body, ndjson, received_at, max_future)
    } else {
        tokio::task::spawn_blocking(move || parse_batch(&body, ndjson, received_at, max_future))
            .await
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?
    };
    let records = match parsed {
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
/// producer splits it to fit the brokers' limit. So each is a 503, even one
/// that a retry will not cure, for which an operator must act.
fn unavailable(e: &AppendError) -> ApiError {
    match e {
        AppendError::Log(_) | AppendError::Kafka(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "the event log is unavailable; retry",
        ),
    }
}

fn too_large(limit: u64) -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        format!("the body exceeds the limit of {limit} bytes"),
    )
}

/// Reads and discards what is left of a refused body, up to as much again
/// as the limit (at least 1 MiB), so the client, still sending, reads the
/// `413` rather than a connection reset. A larger body is cut off.
async fn drain<S, B>(body: &mut S, limit: u64)
where
    S: Stream<Item = Result<B, warp::Error>> + Unpin,
    B: Buf,
{
    let bound = limit.max(1 << 20);
    let mut drained = 0u64;
    while drained <= bound {
        match body.next().await {
            Some(Ok(chunk)) => drained += chunk.remaining() as u64,
            Some(Err(_)) | None => break,
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
