//! JSON replies and errors.

use serde::Serialize;
use tally_dataflow::aggregate::Value;
use warp::http::header::{HeaderMap, HeaderValue, CONNECTION};
use warp::http::StatusCode;
use warp::reply::{json, with_status, Response};
use warp::Reply;

/// An error a client sees: a status and a JSON body `{"error": …}` with
/// optional details.
#[derive(Debug)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// What went wrong, in one sentence.
    pub message: String,
    /// Structured details, such as the invalid fields of a batch.
    pub details: Option<serde_json::Value>,
    /// Whether the connection closes after this answer (`Connection:
    /// close`), as it must when the rest of the request cannot be read.
    pub close: bool,
    /// Headers the answer carries, such as `Retry-After`; boxed, so that
    /// an error stays small beside the values it is returned instead of.
    pub headers: Box<HeaderMap>,
}

impl ApiError {
    /// An error with no details.
    pub fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            details: None,
            close: false,
            headers: Box::default(),
        }
    }

    /// A 400 Bad Request.
    pub fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    error: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    details: Option<&'a serde_json::Value>,
}

impl Reply for ApiError {
    fn into_response(self) -> Response {
        let mut response = with_status(
            json(&ErrorBody {
                error: &self.message,
                details: self.details.as_ref(),
            }),
            self.status,
        )
        .into_response();
        response.headers_mut().extend(*self.headers);
        if self.close {
            response
                .headers_mut()
                .insert(CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}

/// A handler's result: a reply or an error, both rendered as JSON.
pub type ApiResult = Result<Response, ApiError>;

/// Renders a handler's result.
pub fn render(result: ApiResult) -> Response {
    match result {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

/// A window's value as JSON, the same in history and live: a number;
/// for `quantiles` an object from each quantile asked to its value, such as
/// `{"0.5": 41.2, "0.99": 240.5}`; for `topk` a list, largest first, of
/// `{"item", "count", "lower", "upper"}`.
pub fn value_json(value: &Value) -> serde_json::Value {
    match value {
        Value::Number(n) => number(*n),
        Value::Quantiles(quantiles) => serde_json::Value::Object(
            quantiles
                .iter()
                .map(|(q, v)| (q.to_string(), number(*v)))
                .collect(),
        ),
        Value::Items(items) => items
            .iter()
            .map(|i| {
                serde_json::json!({
                    "item": i.item,
                    "count": i.count,
                    "lower": i.lower,
                    "upper": i.upper,
                })
            })
            .collect(),
    }
}

/// A number as JSON: whole numbers print without a fraction, as counts
/// should.
pub fn number(v: f64) -> serde_json::Value {
    if v.fract() == 0.0 && v.abs() < 9e15 {
        serde_json::json!(v as i64)
    } else {
        serde_json::json!(v)
    }
}
