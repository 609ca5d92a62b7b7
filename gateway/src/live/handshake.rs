//! The WebSocket opening handshake (RFC 6455, 4.2.1), done by the gateway
//! itself, and the answers to requests that are not one.

use std::sync::Arc;

use hyper::upgrade::OnUpgrade;
use tally_dataflow::config::LiveConfig;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use warp::http::header::{self, HeaderMap, HeaderValue};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Rejection, Reply};

use super::connection;
use super::hub::Hub;
use super::resume::Resumes;
use crate::backend::History;
use crate::ops::Ops;
use crate::origins::Origins;
use crate::reply::ApiError;

/// The answer to `GET /v1/live`, to be given once the request's key has
/// passed: the switch to the WebSocket, with the client's connection
/// served from then on, or a refusal.
pub type Handshake = Box<dyn FnOnce() -> Response + Send>;

/// `GET /v1/live`: the WebSocket handshake, then the client's connection.
///
/// The handshake is done here rather than by warp's `ws()` filter so that
/// the connection's buffers can be sized. warp gives each connection the
/// WebSocket library's default 128 KiB read buffer, which is zero-filled
/// before every read: 128 KiB of memory per client and, under fan-out, a
/// large share of the server's CPU.
///
/// Each connection gets a queue of `live.queue` updates and may hold
/// `live.max_subscriptions` subscriptions; a subscription that resumes
/// reads what the hub forgot from `history`. A browser's page must be of an
/// origin `origins` allows.
pub fn route(
    hub: Hub,
    live: &LiveConfig,
    history: Arc<dyn History>,
    ops: Arc<Ops>,
    origins: Arc<Origins>,
) -> impl Filter<Extract = (Handshake,), Error = Rejection> + Clone {
    let resumes = Resumes::new(history, live);
    let bounds = connection::Bounds {
        queue: live.queue,
        max_subscriptions: live.max_subscriptions,
    };
    warp::get()
        .and(warp::header::headers_cloned())
        .and(warp::ext::optional::<OnUpgrade>())
        .map(move |headers: HeaderMap, upgrade: Option<OnUpgrade>| {
            let (hub, ops, origins) = (hub.clone(), Arc::clone(&ops), Arc::clone(&origins));
            let resumes = resumes.clone();
            Box::new(move || {
                let origin = headers.get(header::ORIGIN).map(|o| o.to_str().unwrap_or("null"));
                let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
                if origin.is_some_and(|origin| !origins.allows(origin, host)) {
                    ops.auth_refused("", "origin");
                    return ApiError::new(
                        StatusCode::FORBIDDEN,
                        "a page of this origin may not open /v1/live: list it in server.allowed_origins",
                    )
                    .into_response();
                }
                let (key, upgrade) = match handshake(&headers, upgrade) {
                    Ok(accepted) => accepted,
                    Err(refusal) => return refusal.into_response(),
                };
                tokio::spawn(async move {
                    match upgrade.await {
                        Ok(upgraded) => {
                            connection::serve(hub, resumes, upgraded, bounds, ops).await
                        }
                        Err(e) => tracing::debug!("a WebSocket upgrade failed: {e}"),
                    }
                });
                let mut response = Response::default();
                *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
                let headers = response.headers_mut();
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                // The accept key is base64, which is always a valid header value.
                let accept = HeaderValue::try_from(derive_accept_key(key.as_bytes()))
                    .expect("base64 is a valid header value");
                headers.insert(header::SEC_WEBSOCKET_ACCEPT, accept);
                response
            }) as Handshake
        })
}

/// Why a handshake was refused: 426 for a request that is not a WebSocket
/// upgrade or asks for a version other than 13, 400 for a malformed one.
enum Refusal {
    UpgradeRequired(&'static str),
    BadRequest(&'static str),
}

impl Refusal {
    fn into_response(self) -> Response {
        match self {
            Refusal::BadRequest(message) => ApiError::bad_request(message).into_response(),
            Refusal::UpgradeRequired(message) => {
                let mut response =
                    ApiError::new(StatusCode::UPGRADE_REQUIRED, message).into_response();
                let headers = response.headers_mut();
                headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
                headers.insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                response
            }
        }
    }
}

/// Checks a WebSocket opening handshake (RFC 6455, 4.2.1), and returns its
/// `Sec-WebSocket-Key` and the connection to take over.
fn handshake(
    headers: &HeaderMap,
    upgrade: Option<OnUpgrade>,
) -> Result<(HeaderValue, OnUpgrade), Refusal> {
    let has = |name: header::HeaderName, token: &str| {
        headers.get_all(name).iter().any(|value| {
            value
                .to_str()
                .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        })
    };
    if !(has(header::CONNECTION, "upgrade") && has(header::UPGRADE, "websocket")) {
        return Err(Refusal::UpgradeRequired(
            "GET /v1/live is a WebSocket: connect with a WebSocket client",
        ));
    }
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .is_none_or(|v| v != "13")
    {
        return Err(Refusal::UpgradeRequired(
            "this server speaks WebSocket version 13 only",
        ));
    }
    // The key is 16 random bytes in base64.
    let key = headers
        .get(header::SEC_WEBSOCKET_KEY)
        .filter(|key| key.len() == 24)
        .ok_or(Refusal::BadRequest(
            "Sec-WebSocket-Key must be 16 bytes in base64",
        ))?;
    // hyper offers the connection only for an HTTP/1.1 upgrade request.
    let upgrade = upgrade.ok_or(Refusal::BadRequest(
        "a WebSocket needs an HTTP/1.1 connection",
    ))?;
    Ok((key.clone(), upgrade))
}
