//! The dashboard (`GET /`) and the browser SDK (`GET /sdk/tally.js`), served
//! from files compiled into the binary: no CDN, no network, no build step.

use warp::filters::BoxedFilter;
use warp::reply::Response;
use warp::{Filter, Reply};

const INDEX: &str = include_str!("../assets/index.html");
const APP: &str = include_str!("../assets/app.js");
const STYLE: &str = include_str!("../assets/style.css");
const SDK: &str = include_str!("../assets/tally.js");

/// The dashboard's routes.
pub fn routes() -> BoxedFilter<(Response,)> {
    let file = |body: &'static str, content_type: &'static str| {
        move || {
            let reply = warp::reply::with_header(body, "content-type", content_type);
            // A new binary may serve new files: browsers check each time.
            warp::reply::with_header(reply, "cache-control", "no-cache").into_response()
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
