//! Which web pages may call the API from a browser: CORS for the HTTP API,
//! and the `Origin` check of a WebSocket handshake.
//!
//! The server's own pages (the dashboard) may always call it. Pages of the
//! origins in `server.allowed_origins` may too: their preflight `OPTIONS`
//! is answered, and their requests' answers carry
//! `Access-Control-Allow-Origin`, so that `track()` works from a page on
//! another origin. Any other page's preflight gets `403`, and the browser
//! does not let it read an answer. A WebSocket handshake is not covered by
//! CORS, so one whose `Origin` is neither the server's own nor listed gets
//! `403`; a client that is not a browser sends no `Origin` and is judged by
//! its key alone.

use warp::http::header::{
    HeaderValue, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_EXPOSE_HEADERS, ACCESS_CONTROL_MAX_AGE, VARY,
};
use warp::http::StatusCode;
use warp::reply::Response;
use warp::Reply;

use crate::reply::ApiError;

/// The origins allowed besides the server's own.
pub struct Origins {
    allowed: Vec<String>,
}

impl Origins {
    /// Allows the origins of `server.allowed_origins`.
    pub fn new(allowed: &[String]) -> Origins {
        // Each was checked, when the configuration was read, to be a
        // scheme and a host with no path; they compare without case.
        Origins {
            allowed: allowed.to_vec(),
        }
    }

    /// Whether `origin` is listed.
    fn listed(&self, origin: &str) -> bool {
        self.allowed.iter().any(|a| a.eq_ignore_ascii_case(origin))
    }

    /// Whether a page of `origin` may open a WebSocket on a server reached
    /// as `host`: the server's own page, or a listed one.
    pub fn allows(&self, origin: &str, host: Option<&str>) -> bool {
        let own = origin
            .split_once("://")
            .is_some_and(|(_, h)| host.is_some_and(|host| h.eq_ignore_ascii_case(host)));
        own || self.listed(origin)
    }

    /// The answer to a preflight `OPTIONS` from `origin`.
    pub fn preflight(&self, origin: Option<&str>) -> Response {
        match origin {
            Some(origin) if self.listed(origin) => {
                let mut response = StatusCode::NO_CONTENT.into_response();
                let headers = response.headers_mut();
                headers.insert(
                    ACCESS_CONTROL_ALLOW_METHODS,
                    HeaderValue::from_static("GET, POST"),
                );
                headers.insert(
                    ACCESS_CONTROL_ALLOW_HEADERS,
                    HeaderValue::from_static("authorization, content-type"),
                );
                headers.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from_static("600"));
                self.decorate(Some(origin), response)
            }
            _ => ApiError::new(
                StatusCode::FORBIDDEN,
                "this origin may not call the API from a browser: list it in server.allowed_origins",
            )
            .into_response(),
        }
    }

    /// Lets a listed `origin` read `response`.
    pub fn decorate(&self, origin: Option<&str>, mut response: Response) -> Response {
        let Some(origin) = origin.filter(|o| self.listed(o)) else {
            return response;
        };
        let headers = response.headers_mut();
        // A listed origin is ASCII (it was checked when the configuration
        // was read), and so is what the browser sent to match it.
        if let Ok(value) = HeaderValue::try_from(origin) {
            headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, value);
            headers.insert(
                ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static("retry-after"),
            );
        }
        headers.append(VARY, HeaderValue::from_static("origin"));
        response
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_servers_own_pages_and_listed_origins_are_allowed() {
        let origins = Origins::new(&["https://app.example.com".into()]);
        assert!(origins.allows("http://127.0.0.1:8080", Some("127.0.0.1:8080")));
        assert!(origins.allows("https://app.example.com", Some("tally:8080")));
        assert!(!origins.allows("https://evil.example", Some("tally:8080")));
        assert!(!origins.allows("null", Some("tally:8080")));
        let ok = origins.preflight(Some("https://app.example.com"));
        assert_eq!(ok.status(), StatusCode::NO_CONTENT);
        assert_eq!(
            ok.headers()[ACCESS_CONTROL_ALLOW_ORIGIN],
            "https://app.example.com"
        );
        let refused = origins.preflight(Some("https://evil.example"));
        assert_eq!(refused.status(), StatusCode::FORBIDDEN);
        let plain = origins.decorate(Some("https://evil.example"), Response::default());
        assert!(!plain.headers().contains_key(ACCESS_CONTROL_ALLOW_ORIGIN));
    }
}
