//! The accept loop: each connection's socket options, and the bounds that
//! keep one client from taking the server's descriptors.
//!
//! **Silent sockets.** A connection must send a complete request head
//! within `server.header_timeout` of being accepted, and again of each
//! answer while it is kept alive; else it is closed. hyper's own header
//! timeout covers only the second: it starts once hyper reads for a
//! request, and before that hyper-util's check for an HTTP/2 preface waits
//! for the first bytes with no timeout at all, so the first deadline is
//! kept here.
//!
//! **The cap.** At most `server.max_connections` are open at once,
//! WebSockets included, and fewer where the process's descriptor limit,
//! read at start, would not leave [`RESERVED_DESCRIPTORS`] for the log, the
//! result store and the job besides. A connection holds its place until
//! its socket is closed, after a WebSocket upgrade too.
//!
//! **At the cap.** [`HEALTH_RESERVE`] more connections are still accepted,
//! and served only `/healthz` and `/readyz`; any other request gets a `503`
//! with `Connection: close`. A load balancer or orchestrator that probes a
//! node at its cap must get an answer: if the node stopped accepting, the
//! probe would time out and the node would be taken out, or restarted,
//! dropping every client it serves, while it was only full. Serving the
//! probes from a small reserve of their own, rather than from the cap,
//! keeps that answer without letting anyone grow the descriptors used
//! past cap and reserve. Past the reserve too, a connection is accepted
//! and closed at once, rather than left in the kernel's backlog, so that
//! the backlog never fills and a probe arriving after a flood still
//! reaches this loop.

use std::convert::Infallible;
use std::future::Future;
use std::io::{ErrorKind, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::future::{ready, Either};
use hyper::body::Incoming;
use hyper::service::Service as _;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tally_dataflow::config::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use warp::filters::BoxedFilter;
use warp::http::header::{HeaderValue, RETRY_AFTER};
use warp::http::{Request, StatusCode};
use warp::reply::Response;
use warp::Reply;

use crate::ops::ConnectionMetrics;
use crate::reply::ApiError;

/// What the kernel may hold unsent for a connection before writes wait.
/// Data in flight is not limited, so neither is throughput to a distant
/// client; but a WebSocket client that stops reading stops taking messages
/// within seconds, so its queue of `live.queue` fills and it is dropped,
/// rather than the kernel's autotuned buffer taking megabytes for it.
const UNSENT_LIMIT: u32 = 16 * 1024;

/// Descriptors left for everything but connections: the log's segments
/// (two per partition, one written and one read), SQLite's three files,
/// checkpoint files while they are written, the runtime's epoll and event
/// descriptors, and standard streams. `tally run` holds about 35 with the
/// default 8 partitions; this leaves room for several times that.
pub const RESERVED_DESCRIPTORS: u64 = 128;

/// Connections accepted past the cap to answer `/healthz` and `/readyz`.
pub const HEALTH_RESERVE: usize = 32;

/// Serves `routes` on `listener` until `shutdown` resolves, then waits for
/// the requests in flight, within the bounds of `server` (its connection
/// cap and header timeout), counted in `metrics`.
///
/// The accept loop is this one rather than warp's so that every connection
/// gets its socket options: TCP_NODELAY, so that a live message or a reply
/// goes out when it is written rather than when the previous one is
/// acknowledged, and [`UNSENT_LIMIT`]; and so that it can bound them.
pub(crate) async fn serve_routes(
    listener: TcpListener,
    routes: BoxedFilter<(Response,)>,
    server: &ServerConfig,
    metrics: Arc<ConnectionMetrics>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let max_connections = connection_cap(server.max_connections, descriptor_limit());
    metrics.limit.set(max_connections as i64);
    let places = Arc::new(Semaphore::new(max_connections));
    let reserve = Arc::new(Semaphore::new(HEALTH_RESERVE));
    let header_timeout = server.header_timeout;
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                // The client gave up before it was accepted.
                Err(e) if matches!(
                    e.kind(),
                    ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
                ) => continue,
                Err(e) => {
                    // Out of file descriptors, say: wait rather than spin.
                    tracing::warn!(error = %e, "cannot accept connections");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let (place, health_only) = match Arc::clone(&places).try_acquire_owned() {
            Ok(place) => (place, false),
            Err(_) => match Arc::clone(&reserve).try_acquire_owned() {
                Ok(place) => (place, true),
                Err(_) => {
                    metrics.refused("over_capacity");
                    drop(stream);
                    continue;
                }
            },
        };
        if let Err(e) = socket_options(&stream) {
            tracing::debug!(error = %e, "cannot set a connection's socket options");
        }
        let connection = Connection::open(stream, place, &metrics);
        let requested = Arc::new(AtomicBool::new(false));
        let service = {
            let routes = TowerToHyperService::new(warp::service(routes.clone()));
            let (requested, metrics) = (Arc::clone(&requested), Arc::clone(&metrics));
            hyper::service::service_fn(move |request: Request<Incoming>| {
                requested.store(true, Ordering::Relaxed);
                if health_only && !matches!(request.uri().path(), "/healthz" | "/readyz") {
                    metrics.refused("at_capacity");
                    Either::Left(ready(Ok::<_, Infallible>(at_capacity(max_connections))))
                } else {
                    Either::Right(routes.call(request))
                }
            })
        };
        let watcher = graceful.watcher();
        let metrics = Arc::clone(&metrics);
        tokio::spawn(async move {
            let mut http = auto::Builder::new(TokioExecutor::new());
            http.http1()
                .timer(TokioTimer::new())
                .header_read_timeout(header_timeout)
                // A client may shut down its sending side once its request
                // is written (`shutdown(SHUT_WR)`), and still read the
                // answer. Without this, hyper takes the end of input that
                // arrives while the handler runs for a client gone away,
                // and drops the connection unanswered: every answer that
                // takes a moment, such as history read from the store, was
                // lost.
                .half_close(true)
                // A connection served from the reserve takes one request.
                .keep_alive(!health_only);
            let served = http.serve_connection_with_upgrades(TokioIo::new(connection), service);
            let mut served = std::pin::pin!(watcher.watch(served));
            let first = tokio::select! {
                result = &mut served => Some(result),
                () = tokio::time::sleep(header_timeout) => None,
            };
            let result = match first {
                Some(result) => result,
                None if !requested.load(Ordering::Relaxed) => {
                    // Dropping the connection closes its socket.
                    metrics.refused("header_timeout");
                    return;
                }
                None => served.await,
            };
            if let Err(e) = result {
                if e.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout)
                {
                    metrics.refused("header_timeout");
                } else {
                    tracing::debug!(error = %e, "connection ended");
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The cap on open connections: `configured`, lowered if need be so that
/// the connections, the health reserve and [`RESERVED_DESCRIPTORS`] fit
/// in the descriptor limit; at least one.
fn connection_cap(configured: usize, descriptors: Option<u64>) -> usize {
    let Some(descriptors) = descriptors else {
        tracing::info!(max_connections = configured, "connection limit");
        return configured;
    };
    let room = descriptors.saturating_sub(RESERVED_DESCRIPTORS + HEALTH_RESERVE as u64);
    let cap = usize::try_from(room).unwrap_or(usize::MAX).min(configured);
    // Lowering is the expected case under a shell's default of 1,024, not
    // something to act on, so it is logged at INFO like the cap itself.
    if cap < configured {
        tracing::info!(
            descriptor_limit = descriptors,
            configured,
            max_connections = cap.max(1),
            "server.max_connections lowered to fit the descriptor limit (raise it with ulimit -n)"
        );
    } else {
        tracing::info!(
            descriptor_limit = descriptors,
            max_connections = cap,
            "connection limit"
        );
    }
    cap.max(1)
}

/// The process's soft limit on open descriptors, if it has one.
#[cfg(unix)]
fn descriptor_limit() -> Option<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit only writes the struct it is handed, which lives
    // for the whole call.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    (ok && limit.rlim_cur != libc::RLIM_INFINITY).then_some(limit.rlim_cur)
}

/// Elsewhere the limit is not known, and the configured cap applies as is.
#[cfg(not(unix))]
fn descriptor_limit() -> Option<u64> {
    None
}

/// The answer to a request, other than health, on a connection taken past
/// the cap.
fn at_capacity(max_connections: usize) -> Response {
    let mut error = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        format!("the server holds its limit of {max_connections} connections; retry shortly"),
    );
    error.close = true;
    let mut response = error.into_response();
    response
        .headers_mut()
        .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn socket_options(stream: &TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    #[cfg(any(target_os = "linux", target_os = "android"))]
    socket2::SockRef::from(stream).set_tcp_notsent_lowat(UNSENT_LIMIT)?;
    Ok(())
}

/// A connection's socket, which holds its place under the cap, and counts
/// as open, until it is dropped: when hyper is done with it or, after a
/// WebSocket upgrade, when the WebSocket ends.
struct Connection {
    stream: TcpStream,
    _place: OwnedSemaphorePermit,
    metrics: Arc<ConnectionMetrics>,
}

impl Connection {
    fn open(
        stream: TcpStream,
        place: OwnedSemaphorePermit,
        metrics: &Arc<ConnectionMetrics>,
    ) -> Connection {
        metrics.open.inc();
        Connection {
            stream,
            _place: place,
            metrics: Arc::clone(metrics),
        }
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.metrics.open.dec();
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cap_leaves_room_under_the_descriptor_limit() {
        assert_eq!(connection_cap(10_000, None), 10_000);
        assert_eq!(connection_cap(10_000, Some(1_048_576)), 10_000);
        // The limit many shells start with: 1,024 less what the process
        // itself and the health reserve need.
        assert_eq!(connection_cap(10_000, Some(1024)), 1024 - 128 - 32);
        assert_eq!(connection_cap(100, Some(1024)), 100);
        assert_eq!(connection_cap(100, Some(64)), 1);
    }
}
