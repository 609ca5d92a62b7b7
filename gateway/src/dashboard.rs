//! The dashboard (`GET /`) and the browser SDK (`GET /sdk/tally.js`), served
//! from files compiled into the binary: no CDN, no network, no build step.

use warp::filters::BoxedFilter;
use warp::http::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, REFERRER_POLICY, X_CONTENT_TYPE_OPTIONS,
};
use warp::reply::Response;
use warp::{Filter, Reply};

const INDEX: &str = include_str!("../assets/index.html");
const APP: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");
const SDK: &str = include_str!("../assets/tally.js");

/// What the page may load and connect to: its own files and its own
/// server, over HTTP and WebSocket, and nothing inline. No other site may
/// frame it.
const POLICY: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
    style-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; \
    form-action 'self'; frame-ancestors 'none'";

/// The dashboard's routes.
pub fn routes() -> BoxedFilter<(Response,)> {
    let file = |body: &'static str, content_type: &'static str| {
        move || {
            let mut reply =
                warp::reply::with_header(body, "content-type", content_type).into_response();
            let headers = reply.headers_mut();
            // A new binary may serve new files: browsers check each time.
            headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
            headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
            headers.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
            headers.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
            reply
        }
    };
    let index = warp::path::end()
        .and(warp::get())
        .map(file(INDEX, "text/html; charset=utf-8"));
    let app = warp::path!("assets" / "app.js")
        .and(warp::get())
        .map(file(APP, "text/javascript; charset=utf-8"));
    let style = warp::path!("assets" / "style.css")
        .and(warp::get())
        .map(file(STYLE, "text/css; charset=utf-8"));
    let sdk = warp::path!("sdk" / "tally.js")
        .and(warp::get())
        .map(file(SDK, "text/javascript; charset=utf-8"));
    index
        .or(app)
        .unify()
        .or(style)
        .unify()
        .or(sdk)
        .unify()
        .boxed()
}
