//! `GET /v1/metrics` and `GET /v1/deadletters`.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use tally_dataflow::fingerprint;
use tally_dataflow::query::{Fold, Pass, Query, QueryError};
use tally_dataflow::time::format_rfc3339;
use warp::http::StatusCode;
use warp::reply::json;
use warp::Reply;

use crate::backend::HistoryError;
use crate::reply::{number, value_json, ApiError, ApiResult};
use tally_dataflow::time::now_ms;

use crate::Gateway;

/// Answers a history query.
pub async fn metrics(gateway: Arc<Gateway>, raw_query: String) -> ApiResult {
    let refused = |e: QueryError| {
        gateway.ops.history_refused(e.refusal.reason());
        ApiError::bad_request(e.to_string())
    };
    let params =
        parse_params(&raw_query).inspect_err(|_| gateway.ops.history_refused("invalid"))?;
    let active = gateway.catalog.active();
    if let Some(b) = gateway.catalog.backfill() {
        let named = params.iter().find(|(k, _)| k == "metric").map(|(_, v)| v);
        let new = b
            .metrics
            .iter()
            .find(|m| named == Some(&m.name) && active.iter().all(|a| a.name != m.name));
        if let Some(new) = new {
            gateway.ops.history_refused("backfilling");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "metric '{}' is new and its backfill has read {:.0}% of the log; it answers once the backfill is done",
                    new.name,
                    b.progress() * 100.0
                ),
            ));
        }
    }
    let query =
        Query::parse(&params, &active, &gateway.config.history, now_ms()).map_err(refused)?;
    let mut fold = Fold::new(query.clone());
    let answer = loop {
        fold = gateway.history.scan(fold).await.map_err(unavailable)?;
        match fold.finish().map_err(refused)? {
            Pass::Done(answer) => break answer,
            Pass::Again(again) => fold = *again,
        }
    };
    // A bucket that ended before the version's first window is not a
    // zero: the version holds nothing from then, as the answer says.
    let since = gateway
        .history
        .since(
            query.metric.clone(),
            query.reads.iter().map(|r| r.version.clone()).collect(),
        )
        .await
        .map_err(unavailable)?;
    let covered = |t: i64| since.is_some_and(|s| t.saturating_add(query.resolution) > s);
    let points = |points: &[(i64, Option<tally_dataflow::aggregate::Value>)]| -> Vec<Value> {
        points
            .iter()
            .map(|(t, v)| {
                let value = v.as_ref().filter(|_| covered(*t)).map(value_json);
                json!({"time": format_rfc3339(*t), "value": value})
            })
            .collect()
    };
    let coverage = json!({ "since": since.map(format_rfc3339) });
    let dimensions: Map<String, Value> = query
        .filter_names()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let resolution = tally_dataflow::time::format_millis(query.resolution);
    // The table the planner read, which says what a coarser resolution
    // than asked came from.
    let rollup = active
        .iter()
        .find(|m| m.name == query.metric)
        .is_some_and(|m| fingerprint::metric(m) != query.version);
    gateway
        .ops
        .history_read(if rollup { "rollup" } else { "metric" }, answer.rows);
    let read = json!({
        "window": query.window.to_string(),
        "dimensions": query.dimensions,
        "rollup": rollup,
        "rows": answer.rows,
    });
    let mut body = match query.group_by {
        None => json!({
            "metric": query.metric,
            "dimensions": dimensions,
            "resolution": resolution,
            "read": read,
            "coverage": coverage,
            "dataPoints": points(&answer.series[0].points),
        }),
        Some(d) => json!({
            "metric": query.metric,
            "dimensions": dimensions,
            "groupBy": query.dimensions[d],
            "top": query.top,
            "groups": answer.groups,
            "resolution": resolution,
            "read": read,
            "coverage": coverage,
            "series": answer.series.iter().map(|s| json!({
                "group": s.group.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<Map<String, Value>>(),
                "dataPoints": points(&s.points),
            })).collect::<Vec<_>>(),
        }),
    };
    // What a sketch's answer means: the quantiles' rank error, the items'
    // count.
    if let Some(error) = query.aggregate.rank_error() {
        body["quantiles"] = json!(query.ask.quantiles);
        body["rankError"] = number(error);
    }
    if let tally_dataflow::aggregate::AggregateKind::TopK { .. } = query.aggregate {
        body["k"] = json!(query.ask.items);
    }
    Ok(json(&body).into_response())
}

/// Lists the newest dead letters.
pub async fn dead_letters(gateway: Arc<Gateway>, raw_query: String) -> ApiResult {
    let params = parse_params(&raw_query)?;
    if let Some((key, _)) = params.iter().find(|(k, _)| k != "limit") {
        return Err(ApiError::bad_request(format!(
            "{key}: unknown parameter; dead letters take only limit"
        )));
    }
    let limit = match params.as_slice() {
        [] => 100,
        [_, _, ..] => {
            return Err(ApiError::bad_request(
                "limit: is given twice; it takes one value",
            ))
        }
        [(_, v)] => v
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=10_000).contains(n))
            .ok_or_else(|| ApiError::bad_request("limit: must be an integer from 1 to 10000"))?,
    };
    let letters = gateway
        .history
        .dead_letters(limit)
        .await
        .map_err(unavailable)?;
    let items: Vec<Value> = letters
        .iter()
        .map(|d| {
            json!({
                "partition": d.partition,
                "offset": d.offset,
                "index": d.index,
                "reason": d.reason,
                "watermark": format_rfc3339(d.watermark),
                "event": serde_json::from_slice::<Value>(&d.record).unwrap_or(Value::Null),
            })
        })
        .collect();
    Ok(json(&json!({"deadLetters": items})).into_response())
}

/// Reads a query string strictly: `+` is a space, and a `%` must start an
/// escape of two hex digits that decodes, with the rest, to UTF-8. A lenient
/// reader would turn `campaignId=%zz` into a filter no group matches, and
/// answer zeros where the client made a mistake.
pub fn parse_params(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    let decode = |text: &str| {
        let bytes = text.as_bytes();
        let escapes = text.match_indices('%').all(|(i, _)| {
            bytes
                .get(i + 1..i + 3)
                .is_some_and(|hex| hex.iter().all(u8::is_ascii_hexdigit))
        });
        let unreadable = || {
            ApiError::bad_request(format!(
                "cannot read the query string: '{text}' is not percent-encoded UTF-8"
            ))
        };
        if !escapes {
            return Err(unreadable());
        }
        let spaced = text.replace('+', " ");
        percent_encoding::percent_decode_str(&spaced)
            .decode_utf8()
            .map(|text| text.into_owned())
            .map_err(|_| unreadable())
    };
    raw.split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(key)?, decode(value)?))
        })
        .collect()
}

/// The answer to a failed read. Every failure is the store's, not the
/// query's (the query was checked before it was sent), so each is a 503,
/// even one that a retry will not cure, for which an operator must act.
pub(crate) fn unavailable(e: HistoryError) -> ApiError {
    tracing::error!(error = %e, retryable = e.is_retryable(), "the result store failed a read");
    match e {
        HistoryError::Sqlite(_) | HistoryError::Task(_) | HistoryError::ClickHouse(_) => {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the result store is unavailable; retry",
            )
        }
    }
}
