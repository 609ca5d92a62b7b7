//! `GET /v1/metrics` and `GET /v1/deadletters`.

use std::sync::Arc;

use serde_json::{json, Map, Value};
use tally_dataflow::query::Query;
use tally_dataflow::time::format_rfc3339;
use warp::http::StatusCode;
use warp::reply::json;
use warp::Reply;

use crate::backend::HistoryError;
use crate::reply::{number, ApiError, ApiResult};
use crate::{now_ms, Gateway};

/// Answers a history query.
pub async fn metrics(gateway: Arc<Gateway>, raw_query: String) -> ApiResult {
    let params = parse_params(&raw_query)?;
    let query = Query::parse(&params, &gateway.config, now_ms())
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    let rows = gateway
        .history
        .windows(query.clone())
        .await
        .map_err(unavailable)?;
    let series = query.assemble(rows);
    let points = |points: &[(i64, Option<f64>)]| -> Vec<Value> {
        points
            .iter()
            .map(|(t, v)| json!({"time": format_rfc3339(*t), "value": v.map(number)}))
            .collect()
    };
    let dimensions: Map<String, Value> = query
        .filter_names()
        .into_iter()
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let body = match query.group_by {
        None => json!({
            "metric": query.metric,
            "dimensions": dimensions,
            "resolution": tally_dataflow::time::format_millis(query.resolution),
            "dataPoints": points(&series[0].points),
        }),
        Some(d) => json!({
            "metric": query.metric,
            "dimensions": dimensions,
            "groupBy": query.dimensions[d],
            "resolution": tally_dataflow::time::format_millis(query.resolution),
            "series": series.iter().map(|s| json!({
                "group": s.group.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect::<Map<String, Value>>(),
                "dataPoints": points(&s.points),
            })).collect::<Vec<_>>(),
        }),
    };
    Ok(json(&body).into_response())
}

/// Lists the newest dead letters.
pub async fn dead_letters(gateway: Arc<Gateway>, raw_query: String) -> ApiResult {
    let params = parse_params(&raw_query)?;
    let limit = match params.iter().find(|(k, _)| k == "limit") {
        None => 100,
        Some((_, v)) => v
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

fn parse_params(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    serde_urlencoded::from_str::<Vec<(String, String)>>(raw)
        .map_err(|e| ApiError::bad_request(format!("cannot read the query string: {e}")))
}

/// The answer to a failed read. Every failure is the store's, not the
/// query's (the query was checked before it was sent), so each is a 503,
/// even one that a retry will not cure, for which an operator must act.
fn unavailable(e: HistoryError) -> ApiError {
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
