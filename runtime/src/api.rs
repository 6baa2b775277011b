//! The coordinator's HTTP API (types in [`weir_crds::api`]): `GET /v1/job`,
//! `GET|POST /v1/checkpoints`, `GET|POST /v1/savepoints`, `GET /v1/savepoints/{id}`,
//! `/metrics`, `/healthz`, `/readyz`. Served on its own thread and tokio runtime, so a slow
//! client never touches the job.
//!
//! Requests that change the job (`POST`) need `Authorization: Bearer <token>`, the token in
//! the coordinator's `WEIR_API_TOKEN` environment variable (from a Secret in pods); without
//! it they are refused. The token is compared in constant time (through an HMAC under a key
//! of this process, so neither its bytes nor its length show in the answer's timing), is
//! checked before a request's body is read, and is never logged.
//!
//! What a client may hold, so that no client (nor many) can take the API away from the
//! kubelet's probes, the operator and Prometheus:
//!
//! - a connection has [`HEADER_TIMEOUT`] to send a request's head (request line and
//!   headers), counted from its opening, and again from each answer on a kept-alive
//!   connection: so the same limit is the idle keep-alive timeout. A connection that sends
//!   nothing, half a request line or half its headers is closed when it runs out;
//! - a request has [`REQUEST_TIMEOUT`] from its head to its answer, its body included
//!   (a body that trickles in gets `408 Request Timeout`);
//! - a head has at most [`MAX_HEADER_BYTES`] (`431` beyond), a body at most [`MAX_BODY`]
//!   (`413 Payload Too Large` at once when its `Content-Length` says more, and as soon as
//!   more arrives otherwise: no more than that is held in memory);
//! - at most [`MAX_CONNECTIONS`] connections are open at once. A new connection beyond
//!   them is accepted and the oldest connection without a request being answered (one idle
//!   between requests or still sending its head) is closed to make room; when every
//!   connection has a request in hand, the new one is closed at once (the client sees it
//!   closed before any answer, and retries). So a flood of idle or half-open connections only ever
//!   evicts its own oldest members, and a client that sends its request promptly is served.
//! - when accepting fails (out of file descriptors, `EMFILE`), the error is logged (at most
//!   every 10 s), the oldest idle connection is closed to free a descriptor, and accepting
//!   is retried after [`ACCEPT_RETRY`]; the API never stops over it.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::extract::rejection::{BytesRejection, FailedToBufferBody};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use hyper::service::Service as _;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};
use weir_crds::api::JobState;

use crate::coordinator::{SavepointRefused, Status};
use crate::error::RuntimeError;

/// How long a connection has to send a request's head, from its opening or from the
/// previous answer (so also how long a kept-alive connection may stay idle).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request may take from its head to its answer, reading its body included.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections open at once; beyond them the oldest idle one is closed (see the module doc).
pub const MAX_CONNECTIONS: usize = 128;
/// The largest request body read (`POST /v1/savepoints` takes a small JSON object).
pub const MAX_BODY: usize = 16 * 1024;
/// The largest request head: the request line and the headers.
pub const MAX_HEADER_BYTES: usize = 16 * 1024;
/// How long to wait before accepting again after accepting failed.
pub const ACCEPT_RETRY: Duration = Duration::from_millis(100);

/// Listens on `addr` and serves the API until the process ends; returns the bound address.
/// Changes need the token in `WEIR_API_TOKEN` (unset or empty: they are refused).
pub fn serve(addr: &str, status: Arc<Status>) -> Result<SocketAddr, RuntimeError> {
    let token = std::env::var("WEIR_API_TOKEN").ok().filter(|t| !t.is_empty());
    serve_with_token(addr, status, token)
}

/// [`serve`] with the token given (`None`: changes are refused).
pub fn serve_with_token(
    addr: &str,
    status: Arc<Status>,
    token: Option<String>,
) -> Result<SocketAddr, RuntimeError> {
    let token = token.filter(|t| !t.is_empty()).map(|t| Token::new(&t)).transpose()?;
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| RuntimeError::user(format!("--api-addr {addr}: cannot listen: {e}")))?;
    let bound = listener.local_addr().map_err(|e| RuntimeError::internal(e.to_string()))?;
    listener.set_nonblocking(true).map_err(|e| RuntimeError::internal(e.to_string()))?;
    // Timers for the timeouts and the retry after a failed accept, I/O for the sockets.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| RuntimeError::internal(format!("starting the HTTP server: {e}")))?;
    let router = router(status, token.map(Arc::new));
    std::thread::Builder::new()
        .name("http-api".into())
        .spawn(move || {
            rt.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => accept_loop(l, router).await,
                    Err(e) => eprintln!("weir: HTTP API on {bound}: {e}; the API is off"),
                }
            })
        })
        .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
    Ok(bound)
}

/// Accepts connections for ever: each is served by a task of its own.
async fn accept_loop(listener: tokio::net::TcpListener, router: Router) {
    let conns = Arc::new(Mutex::new(Conns::default()));
    let mut logged: Option<Instant> = None;
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            // That one connection went before it was accepted.
            Err(e) if is_connection_error(&e) => continue,
            Err(e) => {
                if logged.is_none_or(|t| t.elapsed() >= Duration::from_secs(10)) {
                    eprintln!(
                        "weir: HTTP API: accepting a connection: {e}; retrying every {} ms (when this is \"Too many open files\", raise the limit, ulimit -n)",
                        ACCEPT_RETRY.as_millis()
                    );
                    logged = Some(Instant::now());
                }
                lock(&conns).evict_oldest_idle();
                tokio::time::sleep(ACCEPT_RETRY).await;
                continue;
            }
        };
        let Some((id, conn)) = lock(&conns).admit() else {
            // Every connection has a request in hand: this one is closed at once.
            drop(stream);
            continue;
        };
        tokio::spawn(serve_connection(stream, router.clone(), id, conn, conns.clone()));
    }
}

/// Errors of accepting that concern only the connection being accepted.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset)
}

fn lock(conns: &Mutex<Conns>) -> std::sync::MutexGuard<'_, Conns> {
    conns.lock().unwrap_or_else(PoisonError::into_inner)
}

/// One HTTP/1.1 connection, with the limits of the module doc, until it ends, fails, times
/// out or is evicted.
async fn serve_connection(
    stream: tokio::net::TcpStream,
    router: Router,
    id: u64,
    conn: Arc<Conn>,
    conns: Arc<Mutex<Conns>>,
) {
    // Unregistered however this ends.
    let _registered = Registered { id, conns };
    let _ = stream.set_nodelay(true);
    let app = hyper_util::service::TowerToHyperService::new(router);
    let service = {
        let conn = conn.clone();
        hyper::service::service_fn(move |req| {
            let busy = Busy::new(conn.clone());
            let answer = app.call(req);
            async move {
                let _busy = busy;
                match tokio::time::timeout(REQUEST_TIMEOUT, answer).await {
                    Ok(r) => r,
                    Err(_) => Ok::<_, Infallible>(
                        (
                            StatusCode::REQUEST_TIMEOUT,
                            format!(
                                "the request was not complete within {} s: send its body at once\n",
                                REQUEST_TIMEOUT.as_secs()
                            ),
                        )
                            .into_response(),
                    ),
                }
            }
        })
    };
    let http = hyper::server::conn::http1::Builder::new()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_header_size(MAX_HEADER_BYTES)
        .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
    // Errors (a timeout, a malformed request, a client gone) concern that client only and
    // are not logged: they are what an attack is made of.
    tokio::select! {
        _ = http => {}
        () = conn.evicted.notified() => {}
    }
}

/// A connection's place in [`Conns`], given up when dropped.
struct Registered {
    id: u64,
    conns: Arc<Mutex<Conns>>,
}

impl Drop for Registered {
    fn drop(&mut self) {
        lock(&self.conns).open.remove(&self.id);
    }
}

/// The open connections, by the order they were accepted in.
#[derive(Debug, Default)]
struct Conns {
    next: u64,
    open: BTreeMap<u64, Arc<Conn>>,
}

/// What the accept loop knows of a connection.
#[derive(Debug, Default)]
struct Conn {
    /// Requests being answered (0: idle, or still sending a head).
    in_flight: AtomicUsize,
    /// Told to close.
    evicted: tokio::sync::Notify,
}

impl Conns {
    /// Makes room for a new connection and registers it; `None` when every open connection
    /// has a request in hand.
    fn admit(&mut self) -> Option<(u64, Arc<Conn>)> {
        if self.open.len() >= MAX_CONNECTIONS && !self.evict_oldest_idle() {
            return None;
        }
        let id = self.next;
        self.next += 1;
        let conn = Arc::new(Conn::default());
        self.open.insert(id, conn.clone());
        Some((id, conn))
    }

    /// Closes the oldest connection that has no request in hand; whether there was one.
    fn evict_oldest_idle(&mut self) -> bool {
        let Some(id) = self
            .open
            .iter()
            .find(|(_, c)| c.in_flight.load(Ordering::Relaxed) == 0)
            .map(|(id, _)| *id)
        else {
            return false;
        };
        if let Some(c) = self.open.remove(&id) {
            // Kept for the connection's task if it is not waiting yet.
            c.evicted.notify_one();
        }
        true
    }
}

/// Counts a request in hand on its connection while it lives.
struct Busy(Arc<Conn>);

impl Busy {
    fn new(conn: Arc<Conn>) -> Self {
        conn.in_flight.fetch_add(1, Ordering::Relaxed);
        Self(conn)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The API token, kept as its HMAC under a random key of this process: a token given is
/// compared by its own HMAC, in constant time, so the comparison's timing depends neither on
/// the token's bytes nor on its length. `Debug` never shows it.
struct Token {
    key: hmac::Key,
    tag: hmac::Tag,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

impl Token {
    fn new(token: &str) -> Result<Self, RuntimeError> {
        let mut k = [0u8; 32];
        SystemRandom::new().fill(&mut k).map_err(|_| {
            RuntimeError::internal(
                "the system's random source failed (a key to compare the API token with)",
            )
        })?;
        let key = hmac::Key::new(hmac::HMAC_SHA256, &k);
        let tag = hmac::sign(&key, token.as_bytes());
        Ok(Self { key, tag })
    }

    fn matches(&self, given: &str) -> bool {
        hmac::verify(&self.key, given.as_bytes(), self.tag.as_ref()).is_ok()
    }
}

/// Whether a request carries the API token.
fn authorized(headers: &axum::http::HeaderMap, token: Option<&Token>) -> Result<(), Box<Response>> {
    let Some(token) = token else {
        return Err(Box::new((
            StatusCode::FORBIDDEN,
            "changes through the API are disabled: start the coordinator with WEIR_API_TOKEN set\n",
        )
            .into_response()));
    };
    // `Bearer`, in any case (RFC 9110: the scheme is case-insensitive), then the token.
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, t)| t.trim());
    if given.is_some_and(|g| token.matches(g)) {
        Ok(())
    } else {
        Err(Box::new(
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                "a valid token is needed: Authorization: Bearer <WEIR_API_TOKEN>\n",
            )
                .into_response(),
        ))
    }
}

/// The body of an authorized request, at most [`MAX_BODY`] bytes: `413` when its
/// `Content-Length` says more (before reading any of it) or when more arrives.
async fn small_body(req: axum::extract::Request) -> Result<axum::body::Bytes, Response> {
    let too_large = || {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the body is larger than {MAX_BODY} bytes: send {{\"stop\": true|false, \"directory\": \"s3://…\"}}\n"
            ),
        )
            .into_response()
    };
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > MAX_BODY as u64) {
        return Err(too_large());
    }
    // The router's DefaultBodyLimit bounds what this reads.
    match <axum::body::Bytes as axum::extract::FromRequest<()>>::from_request(req, &()).await {
        Ok(b) => Ok(b),
        Err(BytesRejection::FailedToBufferBody(FailedToBufferBody::LengthLimitError(_))) => {
            Err(too_large())
        }
        Err(e) => Err((
            StatusCode::BAD_REQUEST,
            format!("the body could not be read: {}\n", e.body_text()),
        )
            .into_response()),
    }
}

fn router(status: Arc<Status>, token: Option<Arc<Token>>) -> Router {
    let checkpoints = {
        let s = status.clone();
        move || async move { Json(s.checkpoints()) }
    };
    let trigger = {
        let (s, token) = (status.clone(), token.clone());
        move |headers: axum::http::HeaderMap| async move {
            if let Err(r) = authorized(&headers, token.as_deref()) {
                return *r;
            }
            if !s.checkpointing.load(std::sync::atomic::Ordering::Relaxed) {
                return (
                    StatusCode::CONFLICT,
                    "this job takes no checkpoints: set spec.checkpointing.interval above 0s\n",
                )
                    .into_response();
            }
            let state = s.snapshot().state;
            if state != JobState::Running {
                return (StatusCode::CONFLICT, format!("the job is {state:?}, not running\n"))
                    .into_response();
            }
            s.trigger.store(true, std::sync::atomic::Ordering::Relaxed);
            (
                StatusCode::ACCEPTED,
                Json(weir_crds::api::Triggered {
                    message:
                        "a checkpoint starts as soon as no more than maxConcurrent are in flight"
                            .into(),
                }),
            )
                .into_response()
        }
    };
    let take_savepoint = {
        let (s, token) = (status.clone(), token.clone());
        move |req: axum::extract::Request| async move {
            // The token first: the body of a request without it is never read.
            if let Err(r) = authorized(req.headers(), token.as_deref()) {
                return *r;
            }
            let body = match small_body(req).await {
                Ok(b) => b,
                Err(r) => return r,
            };
            let req: weir_crds::api::SavepointRequest = if body.iter().all(u8::is_ascii_whitespace)
            {
                Default::default()
            } else {
                match serde_json::from_slice(&body) {
                    Ok(r) => r,
                    Err(e) => {
                        return (
                            StatusCode::BAD_REQUEST,
                            format!("the body must be {{\"stop\": true|false, \"directory\": \"s3://…\"}}: {e}\n"),
                        )
                            .into_response();
                    }
                }
            };
            match s.request_savepoint(req.stop, req.directory.as_deref(), req.request_id.as_deref())
            {
                Ok(id) => (StatusCode::ACCEPTED, Json(weir_crds::api::SavepointTriggered { id }))
                    .into_response(),
                Err(SavepointRefused::BadRequest(m)) => {
                    (StatusCode::BAD_REQUEST, format!("{m}\n")).into_response()
                }
                Err(SavepointRefused::Conflict(m)) => {
                    (StatusCode::CONFLICT, format!("{m}\n")).into_response()
                }
            }
        }
    };
    let savepoints = {
        let s = status.clone();
        move || async move { Json(weir_crds::api::Savepoints { savepoints: s.savepoints() }) }
    };
    let savepoint = {
        let s = status.clone();
        move |axum::extract::Path(id): axum::extract::Path<String>| async move {
            match s.read_savepoint(&id) {
                Some(sp) => Json(sp).into_response(),
                None => {
                    (StatusCode::NOT_FOUND, format!("no savepoint {id:?} in this run of the job\n"))
                        .into_response()
                }
            }
        }
    };
    let job = {
        let s = status.clone();
        move || async move { Json(s.snapshot()) }
    };
    let metrics = {
        let s = status.clone();
        move || async move { render_metrics(&s) }
    };
    let healthz = {
        let s = status.clone();
        move || async move {
            match s.snapshot().state {
                JobState::Failed => (StatusCode::SERVICE_UNAVAILABLE, "job failed\n"),
                _ => (StatusCode::OK, "ok\n"),
            }
        }
    };
    let readyz = {
        let s = status;
        move || async move {
            let i = s.snapshot();
            match i.state {
                JobState::Running if i.workers_connected == i.workers_expected => {
                    (StatusCode::OK, "ready\n".to_string())
                }
                state => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    format!(
                        "not ready: job {state:?}, {} of {} workers connected\n",
                        i.workers_connected, i.workers_expected
                    ),
                ),
            }
        }
    };
    Router::new()
        .route("/v1/job", get(job))
        .route("/v1/checkpoints", get(checkpoints).post(trigger))
        .route("/v1/savepoints", get(savepoints).post(take_savepoint))
        .route("/v1/savepoints/{id}", get(savepoint))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .layer(DefaultBodyLimit::max(MAX_BODY))
}

/// The operators' own metrics, as `weir_user_<name>{operator, type, subtask}`. A name that
/// two operators give different kinds keeps the kind the first gave (the other's are left
/// out: one name is one kind in Prometheus).
fn register_user_metrics(
    r: &Registry,
    i: &weir_crds::api::JobInfo,
    job: &dyn Fn(&str, &str) -> Opts,
) -> Result<(), prometheus::Error> {
    use crate::operator::metrics::MetricKind;
    let labels = ["operator", "type", "subtask"];
    let mut counters: BTreeMap<&str, IntCounterVec> = BTreeMap::new();
    let mut gauges: BTreeMap<&str, IntGaugeVec> = BTreeMap::new();
    for op in &i.operators {
        for m in &op.metrics {
            let name = m.name.as_str();
            let subtask = m.subtask.to_string();
            let values = [op.uid.as_str(), op.type_.as_str(), subtask.as_str()];
            let help = "A metric the operator's own code registered";
            match m.kind {
                MetricKind::Counter if !gauges.contains_key(name) => {
                    if !counters.contains_key(name) {
                        let v = IntCounterVec::new(job(&format!("user_{name}"), help), &labels)?;
                        counters.insert(name, v);
                    }
                    counters[name].with_label_values(&values).inc_by(m.value.max(0) as u64);
                }
                MetricKind::Gauge if !counters.contains_key(name) => {
                    if !gauges.contains_key(name) {
                        let v = IntGaugeVec::new(job(&format!("user_{name}"), help), &labels)?;
                        gauges.insert(name, v);
                    }
                    gauges[name].with_label_values(&values).set(m.value);
                }
                _ => {}
            }
        }
    }
    for (_, c) in counters {
        r.register(Box::new(c))?;
    }
    for (_, g) in gauges {
        r.register(Box::new(g))?;
    }
    Ok(())
}

/// What the connectors tell of the systems they read and write: a Kafka source's lag (per
/// partition and in all) and bytes read, a transactional sink's commits.
fn register_connector_metrics(
    r: &Registry,
    i: &weir_crds::api::JobInfo,
    job: &dyn Fn(&str, &str) -> Opts,
) -> Result<(), prometheus::Error> {
    let op_labels = ["operator", "type"];
    let lag = IntGaugeVec::new(
        job(
            "source_lag_records",
            "Records a source has yet to read, over its partitions (a kafka_source: behind each partition's end); absent until every partition's end is known",
        ),
        &op_labels,
    )?;
    let part_lag = IntGaugeVec::new(
        job(
            "source_partition_lag_records",
            "Records behind a partition's end (its last stable offset with read_committed, its high watermark otherwise)",
        ),
        &["operator", "type", "topic", "partition", "subtask"],
    )?;
    let bytes_in = IntCounterVec::new(
        job("source_bytes_in_total", "Bytes a source read (a Kafka record's key and value)"),
        &op_labels,
    )?;
    let commits = IntCounterVec::new(
        job("sink_commits_total", "Transactions a sink committed (kafka_sink, exactly-once)"),
        &op_labels,
    )?;
    let commit_seconds = prometheus::CounterVec::new(
        job(
            "sink_commit_seconds_total",
            "Seconds a sink spent committing its transactions (the marker and the commit)",
        ),
        &op_labels,
    )?;
    let open = IntGaugeVec::new(
        job(
            "sink_open_transactions",
            "A sink's transactions open now: being written, or pre-committed and waiting for their checkpoint to complete",
        ),
        &op_labels,
    )?;
    let clamp = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    for op in &i.operators {
        let labels = [op.uid.as_str(), op.type_.as_str()];
        if let Some(l) = op.lag {
            lag.with_label_values(&labels).set(clamp(l));
        }
        for p in &op.partitions {
            if let Some(l) = p.lag {
                let (part, subtask) = (p.partition.to_string(), p.subtask.to_string());
                part_lag
                    .with_label_values(&[&op.uid, &op.type_, &p.topic, &part, &subtask])
                    .set(clamp(l));
            }
        }
        if op.bytes_in > 0 || !op.partitions.is_empty() {
            bytes_in.with_label_values(&labels).inc_by(op.bytes_in);
        }
        if let Some(c) = &op.commits {
            commits.with_label_values(&labels).inc_by(c.committed);
            commit_seconds.with_label_values(&labels).inc_by(c.seconds.max(0.0));
            open.with_label_values(&labels).set(i64::from(c.open_transactions));
        }
    }
    r.register(Box::new(lag))?;
    r.register(Box::new(part_lag))?;
    r.register(Box::new(bytes_in))?;
    r.register(Box::new(commits))?;
    r.register(Box::new(commit_seconds))?;
    r.register(Box::new(open))?;
    Ok(())
}

fn render_metrics(status: &Status) -> Response {
    match metrics_text(status) {
        Ok(text) => ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

/// The job's metrics in the Prometheus text format.
pub fn metrics_text(status: &Status) -> Result<String, prometheus::Error> {
    let i = status.snapshot();
    let r = Registry::new_custom(Some("weir".into()), None)?;
    let job =
        |name: &str, help: &str| Opts::new(name, help).const_label("job_name", i.name.clone());
    let parallelism = IntGauge::with_opts(job("job_parallelism", "Subtasks of every operator"))?;
    parallelism.set(i64::from(i.parallelism));
    let max_p = IntGauge::with_opts(job("job_max_parallelism", "Key groups of the job"))?;
    max_p.set(i64::from(i.max_parallelism));
    let workers =
        IntGauge::with_opts(job("job_workers_connected", "Workers connected to the coordinator"))?;
    workers.set(i64::from(i.workers_connected));
    let state_bytes =
        IntGauge::with_opts(job("job_state_bytes", "Bytes of keyed state held by the workers"))?;
    state_bytes.set(i64::try_from(i.state_bytes).unwrap_or(i64::MAX));
    let subtask_state = IntGaugeVec::new(
        job("subtask_state_bytes", "Bytes of keyed state held by a subtask"),
        &["subtask"],
    )?;
    for (s, bytes) in i.subtask_state_bytes.iter().enumerate() {
        subtask_state
            .with_label_values(&[s.to_string().as_str()])
            .set(i64::try_from(*bytes).unwrap_or(i64::MAX));
    }
    let uptime = prometheus::Gauge::with_opts(job(
        "job_uptime_seconds",
        "Seconds since the coordinator started",
    ))?;
    uptime.set(i.uptime_seconds);
    let state = IntGaugeVec::new(job("job_state", "1 for the state the job is in"), &["state"])?;
    for s in [
        JobState::Starting,
        JobState::Running,
        JobState::Stopping,
        JobState::Restarting,
        JobState::Finished,
        JobState::Failed,
    ] {
        let name = format!("{s:?}").to_lowercase();
        state.with_label_values(&[name.as_str()]).set(i64::from(s == i.state));
    }
    let rin = IntCounterVec::new(
        job("operator_records_in_total", "Records into an operator"),
        &["operator", "type"],
    )?;
    let rout = IntCounterVec::new(
        job("operator_records_out_total", "Records out of an operator"),
        &["operator", "type"],
    )?;
    let rdropped = IntCounterVec::new(
        job(
            "operator_records_dropped_total",
            "Records an operator could not use and dropped (a sum of a field that is not a number, a source's line that does not parse with onError: skip)",
        ),
        &["operator", "type"],
    )?;
    let rlate = IntCounterVec::new(
        job(
            "operator_late_records_total",
            "Records that came after the event time had passed them, too late to use (a window's record after its allowed lateness)",
        ),
        &["operator", "type"],
    )?;
    let wm = IntGaugeVec::new(
        job(
            "operator_watermark_milliseconds",
            "The event time an operator has reached (the least watermark over its subtasks), in milliseconds since the epoch; absent without event time, and once its input has ended",
        ),
        &["operator", "type"],
    )?;
    for op in &i.operators {
        if let Some(t) = op.watermark.filter(|&t| t < i64::MAX) {
            wm.with_label_values(&[op.uid.as_str(), op.type_.as_str()]).set(t);
        }
        rin.with_label_values(&[op.uid.as_str(), op.type_.as_str()]).inc_by(op.records_in);
        rout.with_label_values(&[op.uid.as_str(), op.type_.as_str()]).inc_by(op.records_out);
        let labels = [op.uid.as_str(), op.type_.as_str()];
        rdropped.with_label_values(&labels).inc_by(op.records_dropped);
        rlate.with_label_values(&labels).inc_by(op.records_late);
    }
    let c = status.checkpoints();
    let counter = |name: &str, help: &str, v: u64| -> Result<IntCounter, prometheus::Error> {
        let c = IntCounter::with_opts(job(name, help))?;
        c.inc_by(v);
        Ok(c)
    };
    let restarts =
        counter("job_restarts_total", "Restarts after a failure", u64::from(i.restarts))?;
    let ck_done = counter("checkpoints_completed_total", "Checkpoints completed", c.completed)?;
    let ck_failed = counter("checkpoints_failed_total", "Checkpoints that failed", c.failed)?;
    let ck_in_progress =
        IntGauge::with_opts(job("checkpoints_in_progress", "Checkpoints in flight"))?;
    ck_in_progress.set(i64::from(c.in_progress));
    let last = i.last_checkpoint.clone();
    let last_gauge =
        |name: &str, help: &str, v: Option<u64>| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::with_opts(job(name, help))?;
            g.set(v.map_or(0, |v| i64::try_from(v).unwrap_or(i64::MAX)));
            Ok(g)
        };
    let ck_id = last_gauge(
        "last_checkpoint_id",
        "Id of the last completed checkpoint",
        last.as_ref().map(|l| l.id),
    )?;
    let ck_dur = last_gauge(
        "last_checkpoint_duration_milliseconds",
        "Trigger to completion of the last completed checkpoint",
        last.as_ref().map(|l| l.duration_ms),
    )?;
    let ck_size = last_gauge(
        "last_checkpoint_size_bytes",
        "Bytes of state the last completed checkpoint refers to",
        last.as_ref().map(|l| l.size_bytes),
    )?;
    let ck_up = last_gauge(
        "last_checkpoint_uploaded_bytes",
        "Bytes uploaded for the last completed checkpoint",
        last.as_ref().map(|l| l.uploaded_bytes),
    )?;
    let ck_align = last_gauge(
        "last_checkpoint_alignment_milliseconds",
        "Longest barrier alignment in the last completed checkpoint",
        last.as_ref().map(|l| l.alignment_ms),
    )?;
    for m in [ck_in_progress, ck_id, ck_dur, ck_size, ck_up, ck_align] {
        r.register(Box::new(m))?;
    }
    r.register(Box::new(restarts))?;
    r.register(Box::new(ck_done))?;
    r.register(Box::new(ck_failed))?;
    r.register(Box::new(parallelism))?;
    r.register(Box::new(max_p))?;
    r.register(Box::new(workers))?;
    r.register(Box::new(state_bytes))?;
    r.register(Box::new(subtask_state))?;
    r.register(Box::new(uptime))?;
    r.register(Box::new(state))?;
    r.register(Box::new(rin))?;
    r.register(Box::new(rout))?;
    r.register(Box::new(rdropped))?;
    r.register(Box::new(rlate))?;
    r.register(Box::new(wm))?;
    register_user_metrics(&r, &i, &job)?;
    register_connector_metrics(&r, &i, &job)?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(auth: Option<&str>) -> axum::http::HeaderMap {
        let mut h = axum::http::HeaderMap::new();
        if let Some(a) = auth {
            h.insert(header::AUTHORIZATION, a.parse().unwrap());
        }
        h
    }

    #[test]
    fn only_the_token_itself_is_authorized_and_it_never_shows() {
        let t = Token::new("s3cret-token").unwrap();
        assert!(!format!("{t:?}").contains("s3cret"));
        for ok in ["Bearer s3cret-token", "bearer s3cret-token", "BEARER  s3cret-token "] {
            assert!(authorized(&headers(Some(ok)), Some(&t)).is_ok(), "{ok}");
        }
        for bad in [
            None,
            Some("Bearer"),
            Some("Bearer "),
            Some("Bearer s3cret"),
            Some("Bearer s3cret-token2"),
            Some("Bearer S3CRET-TOKEN"),
            Some("Basic s3cret-token"),
            Some("s3cret-token"),
        ] {
            let r = authorized(&headers(bad), Some(&t)).unwrap_err();
            assert_eq!(r.status(), StatusCode::UNAUTHORIZED, "{bad:?}");
        }
        let r = authorized(&headers(Some("Bearer s3cret-token")), None).unwrap_err();
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        // Each process compares under a key of its own.
        let u = Token::new("s3cret-token").unwrap();
        assert_ne!(t.tag.as_ref(), u.tag.as_ref());
        assert!(u.matches("s3cret-token"));
    }

    #[test]
    fn beyond_the_limit_the_oldest_idle_connection_makes_room() {
        let mut c = Conns::default();
        let mut all: Vec<_> = (0..MAX_CONNECTIONS).map(|_| c.admit().unwrap()).collect();
        // The two oldest have a request in hand.
        let busy = [Busy::new(all[0].1.clone()), Busy::new(all[1].1.clone())];
        let (id, _) = c.admit().unwrap();
        assert_eq!(id, MAX_CONNECTIONS as u64);
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        assert!(c.open.contains_key(&0) && c.open.contains_key(&1) && !c.open.contains_key(&2));
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let told = |conn: &Arc<Conn>| {
            rt.block_on(async {
                tokio::time::timeout(Duration::from_millis(50), conn.evicted.notified())
                    .await
                    .is_ok()
            })
        };
        assert!(told(&all[2].1), "the evicted connection is told to close");
        assert!(!told(&all[3].1));
        // Every connection busy: a new one is refused, none evicted.
        let _more: Vec<_> = c.open.values().map(|conn| Busy::new(conn.clone())).collect();
        assert!(c.admit().is_none());
        assert_eq!(c.open.len(), MAX_CONNECTIONS);
        drop(busy);
        drop(_more);
        assert_eq!(all[0].1.in_flight.load(Ordering::Relaxed), 0);
        all.clear();
    }
}
