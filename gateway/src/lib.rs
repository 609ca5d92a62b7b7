//! tally's HTTP and WebSocket front.
//!
//! The gateway validates and accepts events (`POST /v1/events`), answers
//! history (`GET /v1/metrics`), fans live values out to WebSocket clients
//! (`GET /v1/live`), lists dead letters (`GET /v1/deadletters`), and serves
//! operations endpoints (`/metrics`, `/healthz`, `/readyz`), and serves the
//! dashboard and the browser SDK ([`dashboard`]). It reaches the
//! rest of tally only through the traits in [`backend`], so the same handlers
//! serve the embedded mode and a cluster.
//!
//! # Layout
//!
//! - [`auth`]: keys, their scopes and their rate limits.
//! - [`backend`]: the event sink and history traits, their errors, and
//!   their embedded and cluster forms.
//! - [`catalog`]: the active metrics, the backfill under way, and
//!   `GET /v1/catalog`.
//! - [`dashboard`]: the page at `/` and `/sdk/tally.js`.
//! - [`ingest`]: `POST /v1/events`.
//! - [`history`]: `GET /v1/metrics` and `GET /v1/deadletters`.
//! - [`live`]: `GET /v1/live`, the WebSocket fan-out: `handshake`,
//!   `connection` (one client), `hub` (the fan-out task) and `topic` (a
//!   subscription, parsed once).
//! - [`ops`]: Prometheus metrics and health.
//! - [`origins`]: CORS, and which pages may open a WebSocket.
//! - [`reply`]: JSON errors.
//! - `server`: the accept loop, with each connection's socket options and
//!   the bounds on connections: the cap, its health reserve, and the
//!   timeout for a request head.

pub mod auth;
pub mod backend;
pub mod catalog;
pub mod dashboard;
pub mod history;
pub mod ingest;
pub mod live;
pub mod ops;
pub mod origins;
pub mod reply;
mod server;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use serde_json::json;
use tally_dataflow::config::{Config, ServerConfig};
use tally_dataflow::time::now_ms;
use tokio::net::TcpListener;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;
use warp::{Filter, Reply};

use tally_dataflow::config::Scope;

use crate::auth::{Access, Auth};
use crate::backend::{EventSink, History};
use crate::catalog::Catalog;
use crate::live::Hub;
use crate::ops::{ConnectionMetrics, Ops};
use crate::origins::Origins;
use crate::reply::{render, ApiError, ApiResult};

/// Everything a request handler can reach.
pub struct Gateway {
    /// The loaded configuration.
    pub config: Arc<Config>,
    /// The metrics served, and the backfill under way.
    pub catalog: Arc<Catalog>,
    /// Where accepted events go.
    pub events: Arc<dyn EventSink>,
    /// Where history comes from.
    pub history: Arc<dyn History>,
    /// The live fan-out.
    pub hub: Hub,
    /// Metrics and readiness.
    pub ops: Arc<Ops>,
}

/// The HTTP API as an OpenAPI 3.1 document, written by hand and checked
/// against the running server by the integration tests.
const OPENAPI: &str = include_str!("../assets/openapi.json");

/// All routes.
///
/// Every route but health, the dashboard and the SDK needs a key with its
/// scope once keys are configured ([`auth`]); pages of other origins reach
/// them only as [`origins`] allows.
pub fn routes(gateway: Arc<Gateway>) -> BoxedFilter<(Response,)> {
    let with = {
        let gateway = Arc::clone(&gateway);
        warp::any().map(move || Arc::clone(&gateway))
    };
    let auth = Arc::new(Auth::new(&gateway.config.auth));
    let origins = Arc::new(Origins::new(&gateway.config.server.allowed_origins));
    // The caller's key checked for `scope`, and the query without it.
    let guard = |scope: Scope| {
        let (auth, ops) = (Arc::clone(&auth), Arc::clone(&gateway.ops));
        warp::header::optional::<String>("authorization")
            .and(warp::query::raw().or(warp::any().map(String::new)).unify())
            .map(move |authorization: Option<String>, query: String| {
                auth.check(authorization.as_deref(), &query, scope, &ops)
            })
    };

    let events = {
        let (auth, ops) = (Arc::clone(&auth), Arc::clone(&gateway.ops));
        warp::path!("v1" / "events")
            .and(warp::post())
            .and(guard(Scope::Write))
            .and(with.clone())
            .and(warp::header::optional::<String>("content-type"))
            .and(warp::header::optional::<u64>("content-length"))
            .and(warp::body::stream())
            .then(move |access: Result<Access, ApiError>, gw, ct, len, body| {
                let (auth, ops) = (Arc::clone(&auth), Arc::clone(&ops));
                async move {
                    let caller = match access {
                        Ok(access) => access.caller,
                        Err(refused) => return refused.into_response(),
                    };
                    let admit = move |events| auth.admit(caller, events, &ops);
                    render(ingest::ingest(gw, ct, len, Box::pin(body), admit).await)
                }
            })
    };
    let metrics = warp::path!("v1" / "metrics")
        .and(warp::get())
        .and(guard(Scope::Read))
        .and(with.clone())
        .then(|access, gw| guarded(access, |a: Access| history::metrics(gw, a.query)));
    let dead = warp::path!("v1" / "deadletters")
        .and(warp::get())
        .and(guard(Scope::Admin))
        .and(with.clone())
        .then(|access, gw| guarded(access, |a: Access| history::dead_letters(gw, a.query)));
    let live = warp::path!("v1" / "live")
        .and(guard(Scope::Read))
        .and(live::route(
            gateway.hub.clone(),
            &gateway.config.live,
            Arc::clone(&gateway.history),
            Arc::clone(&gateway.ops),
            Arc::clone(&origins),
        ))
        .map(
            |access: Result<Access, ApiError>, handshake: live::Handshake| match access {
                Ok(_) => handshake(),
                Err(refused) => refused.into_response(),
            },
        );
    let prometheus = warp::path!("metrics")
        .and(warp::get())
        .and(guard(Scope::Admin))
        .and(with.clone())
        .map(
            |access: Result<Access, ApiError>, gw: Arc<Gateway>| match access {
                Ok(_) => warp::reply::with_header(
                    gw.ops.render(now_ms()),
                    "content-type",
                    "text/plain; version=0.0.4",
                )
                .into_response(),
                Err(refused) => refused.into_response(),
            },
        );
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})).into_response());
    let readyz = warp::path!("readyz")
        .and(warp::get())
        .and(with.clone())
        .map(|gw: Arc<Gateway>| {
            if gw.ops.is_ready() {
                warp::reply::json(&json!({"status": "ready"})).into_response()
            } else {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "starting").into_response()
            }
        });
    let catalog = warp::path!("v1" / "catalog")
        .and(warp::get())
        .and(guard(Scope::Read))
        .and(with)
        .then(|access, gw| guarded(access, |_| catalog::describe(gw)));
    let openapi = warp::path!("v1" / "openapi.json").and(warp::get()).map(|| {
        warp::reply::with_header(OPENAPI, "content-type", "application/json").into_response()
    });
    let index = warp::path!("v1").and(warp::get()).map(|| {
        warp::reply::json(&json!({
            "name": "tally",
            "endpoints": {
                "GET /": "the dashboard",
                "GET /sdk/tally.js": "the browser SDK, an ES module",
                "GET /v1/catalog": "the configured metrics: version, aggregate, dimensions, windows",
                "POST /v1/events": "ingest one event, a JSON array, or NDJSON",
                "GET /v1/metrics": "history: ?metric=&start=&end=&resolution=&<dimension>=<value>&groupBy=",
                "GET /v1/live": "WebSocket: {\"action\":\"subscribe\",\"topic\":\"metrics:<metric>[:<dimension>:<value>]\"}",
                "GET /v1/deadletters": "events too late to count: ?limit=",
                "GET /v1/openapi.json": "this API as an OpenAPI 3.1 document",
                "GET /metrics": "Prometheus text",
                "GET /healthz": "liveness",
                "GET /readyz": "readiness",
            }
        }))
        .into_response()
    });
    let preflight = {
        let origins = Arc::clone(&origins);
        warp::options()
            .and(warp::header::optional::<String>("origin"))
            .map(move |origin: Option<String>| origins.preflight(origin.as_deref()))
    };

    let routes = preflight
        .or(events)
        .unify()
        .or(metrics)
        .unify()
        .or(dead)
        .unify()
        .or(live)
        .unify()
        .or(prometheus)
        .unify()
        .or(healthz)
        .unify()
        .or(readyz)
        .unify()
        .or(catalog)
        .unify()
        .or(openapi)
        .unify()
        .or(index)
        .unify()
        .or(dashboard::routes())
        .unify()
        .recover(rejection)
        .unify();
    warp::header::optional::<String>("origin")
        .and(routes)
        .map(move |origin: Option<String>, response| origins.decorate(origin.as_deref(), response))
        .boxed()
}

/// Runs `handler` for a request whose key passed, or answers the refusal.
async fn guarded<F, Fut>(access: Result<Access, ApiError>, handler: F) -> Response
where
    F: FnOnce(Access) -> Fut,
    Fut: Future<Output = ApiResult>,
{
    match access {
        Ok(access) => render(handler(access).await),
        Err(refused) => refused.into_response(),
    }
}

/// Turns warp's rejections into JSON errors.
async fn rejection(rejection: warp::Rejection) -> Result<Response, Infallible> {
    let error = if rejection.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
    } else if rejection.find::<warp::reject::MethodNotAllowed>().is_some() {
        ApiError::new(StatusCode::METHOD_NOT_ALLOWED, "method not allowed")
    } else if let Some(e) = rejection.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request(e.to_string())
    } else {
        ApiError::bad_request(format!("{rejection:?}"))
    };
    Ok(error.into_response())
}

/// Serves the routes on a bound listener until `shutdown` resolves, then
/// waits for the requests in flight.
pub async fn serve(
    listener: TcpListener,
    gateway: Arc<Gateway>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let metrics = Arc::clone(&gateway.ops.connections);
    let config = Arc::clone(&gateway.config);
    server::serve_routes(listener, routes(gateway), &config.server, metrics, shutdown).await;
}

/// Serves a worker process's own endpoints on `listener` until `shutdown`,
/// within the connection bounds of `server`: `GET /metrics` with the job's
/// metrics and the connections', and `GET /healthz`.
pub async fn serve_worker(
    listener: TcpListener,
    job: Arc<ops::JobMetrics>,
    server: ServerConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let connections = Arc::new(ConnectionMetrics::new());
    let metrics = Arc::clone(&connections);
    let prometheus = warp::path!("metrics").and(warp::get()).map(move || {
        let mut out = Vec::new();
        job.render(now_ms(), &mut out);
        metrics.render(&mut out);
        warp::reply::with_header(out, "content-type", "text/plain; version=0.0.4").into_response()
    });
    let healthz = warp::path!("healthz")
        .and(warp::get())
        .map(|| warp::reply::json(&json!({"status": "ok"})).into_response());
    let routes = prometheus.or(healthz).unify().boxed();
    server::serve_routes(listener, routes, &server, connections, shutdown).await;
}
