//! The admin HTTP endpoint: status, metrics, health and the live mesh page.
//!
//! Off unless [`NodeBuilder::admin`](crate::NodeBuilder::admin) is set. It
//! serves plain HTTP/1.1 (no TLS, no authentication: bind it to loopback or a
//! private interface):
//!
//! | path | answer |
//! |---|---|
//! | `/` | the live mesh page: one self-contained HTML file, no external assets |
//! | `/status` | JSON: the [`Status`] fields plus uptime, store figures, fault settings and recent events |
//! | `/metrics` | Prometheus text format (0.0.4); names in [`metrics`] |
//! | `/healthz` | `200 ok` while the node runs, `503 shutting down` once shutdown began |
//! | `/events` | server-sent events: `status` (the `/status` JSON) every 500 ms, `mesh` for each [`MeshEvent`] |
//!
//! Bounds: [`MAX_CONNECTIONS`] connections at once (more are closed at
//! once), request headers within [`HEADER_TIMEOUT`], event buffers of
//! [`EVENT_BUFFER`] per viewer.

pub mod events;
pub mod metrics;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{CACHE_CONTROL, CONTENT_TYPE, HeaderValue};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use peerbus_transport::Faults;
use serde::Serialize;
use tokio::sync::{Semaphore, broadcast};
use tracing::{Instrument, debug, info, info_span, warn};

pub use events::{EVENT_BUFFER, EVENT_HISTORY, EventKind, MeshEvent};

use crate::error::StartError;
use crate::node::{Node, Status};
use crate::store::StoreStats;

/// Most admin connections served at once; further ones are closed right away.
pub const MAX_CONNECTIONS: usize = 64;
/// Time a client has to send its request headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Interval of the status snapshots on `/events`.
pub const SNAPSHOT_INTERVAL: Duration = Duration::from_millis(500);

/// The live mesh page.
const PAGE: &str = include_str!("page.html");

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// Binds the admin listener (before the node starts, so a bad address fails `start()` early).
pub(crate) fn bind(addr: SocketAddr) -> Result<std::net::TcpListener, StartError> {
    let fail = |e: std::io::Error| StartError::Admin {
        addr,
        reason: e.to_string(),
    };
    let l = std::net::TcpListener::bind(addr).map_err(fail)?;
    l.set_nonblocking(true).map_err(fail)?;
    Ok(l)
}

/// What every request handler sees.
struct AdminState {
    node: Node,
    faults: Option<Faults>,
}

/// Starts serving on `listener` (bound to `addr`) until the node stops.
pub(crate) fn spawn(
    node: &Node,
    listener: std::net::TcpListener,
    addr: SocketAddr,
    faults: Option<Faults>,
) -> Result<(), StartError> {
    let listener = tokio::net::TcpListener::from_std(listener).map_err(|e| StartError::Admin {
        addr,
        reason: e.to_string(),
    })?;
    let state = Arc::new(AdminState {
        node: node.clone(),
        faults,
    });
    let span = info_span!(parent: &node.inner.span, "admin", %addr);
    info!(parent: &span, "admin endpoint: http://{addr}/ (status, metrics, healthz, live mesh page)");
    let tracker = node.shared.tracker.clone();
    tracker.spawn(accept_loop(state.clone(), listener).instrument(span.clone()));
    if state.faults.is_some() {
        tracker.spawn(watch_faults(state).instrument(span));
    }
    Ok(())
}

async fn accept_loop(state: Arc<AdminState>, listener: tokio::net::TcpListener) {
    let cancel = state.node.shared.cancel.clone();
    let tracker = state.node.shared.tracker.clone();
    let limit = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            r = listener.accept() => r,
            () = cancel.cancelled() => break,
        };
        let (stream, remote) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of file descriptors and the like: wait a little instead of spinning.
                warn!(error = %e, "admin accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = limit.clone().try_acquire_owned() else {
            debug!(%remote, limit = MAX_CONNECTIONS, "admin connection limit reached; closing");
            continue;
        };
        let state = state.clone();
        let cancel = cancel.clone();
        tracker.spawn(
            async move {
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, req).await) }
                });
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(HEADER_TIMEOUT)
                    .serve_connection(TokioIo::new(stream), svc);
                tokio::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => {
                        if let Err(e) = r {
                            debug!(error = %e, "admin connection ended with an error");
                        }
                    }
                    () = cancel.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        let _ = tokio::time::timeout(Duration::from_secs(1), conn).await;
                    }
                }
                drop(permit);
            }
            .instrument(info_span!("admin_conn", %remote)),
        );
    }
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(Full::new(body.into()).boxed_unsync());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", body)
}

async fn route(state: &Arc<AdminState>, req: Request<Incoming>) -> Response<Body> {
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut r = text(
            StatusCode::METHOD_NOT_ALLOWED,
            "only GET is supported here\n",
        );
        r.headers_mut()
            .insert(hyper::header::ALLOW, HeaderValue::from_static("GET, HEAD"));
        return r;
    }
    match req.uri().path() {
        "/" | "/index.html" => full(StatusCode::OK, "text/html; charset=utf-8", PAGE),
        "/healthz" => {
            if state.node.is_shutting_down() {
                text(StatusCode::SERVICE_UNAVAILABLE, "shutting down\n")
            } else {
                text(StatusCode::OK, "ok\n")
            }
        }
        "/status" => match status_json(state).await {
            Some(json) => full(StatusCode::OK, "application/json", json),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "node stopped\n"),
        },
        "/metrics" => match state.node.status().await {
            Some(s) => full(
                StatusCode::OK,
                "text/plain; version=0.0.4; charset=utf-8",
                metrics::render(
                    &s,
                    &state.node.store_stats(),
                    &state.node.shared.counters,
                    crate::message::now_unix_ms(),
                ),
            ),
            None => text(StatusCode::SERVICE_UNAVAILABLE, "node stopped\n"),
        },
        "/events" => events_stream(state.clone()),
        "/entries" => {
            let limit = query_limit(req.uri().query()).unwrap_or(100);
            let limit = limit.min(crate::control::MAX_ENTRIES_LISTED);
            match state.node.log_entries(limit).await {
                Some(list) => match serde_json::to_string(&list) {
                    Ok(json) => full(StatusCode::OK, "application/json", json),
                    Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
                },
                None => text(StatusCode::SERVICE_UNAVAILABLE, "node stopped\n"),
            }
        }
        other => text(
            StatusCode::NOT_FOUND,
            format!(
                "no such page: {other}; try /, /status, /metrics, /healthz, /events or \
                 /entries?limit=N\n"
            ),
        ),
    }
}

/// The `limit=N` of a query string (`/entries?limit=20`), when there is a valid one.
fn query_limit(query: Option<&str>) -> Option<usize> {
    query?
        .split('&')
        .find_map(|kv| kv.strip_prefix("limit="))?
        .parse()
        .ok()
}

/// Fault injector settings, for chaos runs.
#[derive(Serialize)]
struct FaultView {
    loss: f64,
    duplicate: f64,
    reorder: f64,
    delay_ms: u64,
    jitter_ms: u64,
    /// Peer addresses currently partitioned away.
    partitioned: Vec<SocketAddr>,
    datagrams_sent: u64,
    datagrams_dropped: u64,
    datagrams_duplicated: u64,
    datagrams_delayed: u64,
}

impl FaultView {
    fn new(f: &Faults, s: &Status) -> Self {
        let c = f.config();
        let st = f.stats();
        let mut partitioned: Vec<SocketAddr> = s
            .peers
            .iter()
            .flat_map(|p| p.addrs.iter().copied())
            .filter(|a| f.is_partitioned(*a))
            .collect();
        partitioned.sort();
        partitioned.dedup();
        Self {
            loss: c.loss,
            duplicate: c.duplicate,
            reorder: c.reorder,
            delay_ms: c.delay.as_millis() as u64,
            jitter_ms: c.jitter.as_millis() as u64,
            partitioned,
            datagrams_sent: st.sent,
            datagrams_dropped: st.dropped,
            datagrams_duplicated: st.duplicated,
            datagrams_delayed: st.delayed,
        }
    }
}

/// The `/status` document.
#[derive(Serialize)]
struct StatusView {
    #[serde(flatten)]
    status: Status,
    /// When this snapshot was taken (Unix ms).
    now_ms: u64,
    /// Milliseconds since the node started.
    uptime_ms: u64,
    durability: String,
    store: StoreStats,
    /// Store commits timed so far (see `peerbus_store_commit_seconds`).
    store_commits_timed: u64,
    duplicates_dropped: u64,
    faults: Option<FaultView>,
    /// Recent mesh events, oldest first.
    events: Vec<MeshEvent>,
}

async fn status_json(state: &AdminState) -> Option<String> {
    let node = &state.node;
    let status = node.status().await?;
    let view = StatusView {
        faults: state.faults.as_ref().map(|f| FaultView::new(f, &status)),
        status,
        now_ms: crate::message::now_unix_ms(),
        uptime_ms: node.shared.now(),
        durability: format!("{:?}", node.durability()),
        store: node.store_stats(),
        store_commits_timed: node.shared.counters.commit_latency.count(),
        duplicates_dropped: node.delivery_counts().duplicates_dropped,
        events: node.shared.events.recent(),
    };
    match serde_json::to_string(&view) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(error = %e, "could not encode the status as JSON");
            None
        }
    }
}

/// One server-sent event.
fn sse(event: &str, data: &str) -> Frame<Bytes> {
    Frame::data(Bytes::from(format!("event: {event}\ndata: {data}\n\n")))
}

/// State of one `/events` stream.
struct Viewer {
    state: Arc<AdminState>,
    rx: broadcast::Receiver<Arc<MeshEvent>>,
    tick: tokio::time::Interval,
    started: bool,
}

fn events_stream(state: Arc<AdminState>) -> Response<Body> {
    let mut tick = tokio::time::interval(SNAPSHOT_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let viewer = Viewer {
        rx: state.node.shared.events.subscribe(),
        state,
        tick,
        started: false,
    };
    let stream = futures_util::stream::unfold(viewer, |mut v| async move {
        if !v.started {
            v.started = true;
            return Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"retry: 1000\n\n"))),
                v,
            ));
        }
        let cancel = v.state.node.shared.cancel.clone();
        let frame = tokio::select! {
            () = cancel.cancelled() => return None,
            ev = v.rx.recv() => match ev {
                Ok(ev) => sse("mesh", &serde_json::to_string(&*ev).unwrap_or_default()),
                Err(broadcast::error::RecvError::Lagged(n)) => sse("lagged", &n.to_string()),
                Err(broadcast::error::RecvError::Closed) => return None,
            },
            _ = v.tick.tick() => sse("status", &status_json(&v.state).await?),
        };
        Some((Ok(frame), v))
    });
    let mut r = Response::new(StreamBody::new(stream).boxed_unsync());
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    r.headers_mut()
        .insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Emits a `fault` event whenever the fault injector's settings or partitions change.
async fn watch_faults(state: Arc<AdminState>) {
    let Some(faults) = state.faults.clone() else {
        return;
    };
    let cancel = state.node.shared.cancel.clone();
    let mut last: Option<String> = None;
    loop {
        tokio::select! {
            () = tokio::time::sleep(SNAPSHOT_INTERVAL) => {}
            () = cancel.cancelled() => break,
        }
        let Some(s) = state.node.status().await else {
            break;
        };
        let v = FaultView::new(&faults, &s);
        let now = format!(
            "loss {:.0}% dup {:.0}% reorder {:.0}% delay {}±{} ms; partitioned: {}",
            v.loss * 100.0,
            v.duplicate * 100.0,
            v.reorder * 100.0,
            v.delay_ms,
            v.jitter_ms,
            if v.partitioned.is_empty() {
                "none".to_string()
            } else {
                v.partitioned
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            }
        );
        if last.as_ref() != Some(&now) {
            state
                .node
                .shared
                .events
                .emit(EventKind::Fault, None, None, now.clone());
            last = Some(now);
        }
    }
}
