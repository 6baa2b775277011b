//! The coordinator's HTTP API (types in [`weir_crds::api`]): `GET /v1/job`,
//! `GET|POST /v1/checkpoints`, `GET|POST /v1/savepoints`, `GET /v1/savepoints/{id}`,
//! `/metrics`, `/healthz`, `/readyz`. Served on its own thread, so
//! a slow client never touches the job.
//!
//! Requests that change the job (`POST`) need `Authorization: Bearer <token>`, the token in
//! the coordinator's `WEIR_API_TOKEN` environment variable (from a Secret in pods); without
//! it they are refused.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use prometheus::{
    Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder,
};
use weir_crds::api::JobState;

use crate::coordinator::{SavepointRefused, Status};
use crate::error::RuntimeError;

/// Listens on `addr` and serves the API until the process ends; returns the bound address.
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
    let listener = std::net::TcpListener::bind(addr)
        .map_err(|e| RuntimeError::user(format!("--api-addr {addr}: cannot listen: {e}")))?;
    let bound = listener.local_addr().map_err(|e| RuntimeError::internal(e.to_string()))?;
    listener.set_nonblocking(true).map_err(|e| RuntimeError::internal(e.to_string()))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()
        .map_err(|e| RuntimeError::internal(format!("starting the HTTP server: {e}")))?;
    std::thread::Builder::new()
        .name("http-api".into())
        .spawn(move || {
            rt.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => return eprintln!("weir: HTTP API: {e}"),
                };
                if let Err(e) = axum::serve(listener, router(status, token)).await {
                    eprintln!("weir: HTTP API: {e}");
                }
            })
        })
        .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
    Ok(bound)
}

/// Whether a request carries the API token.
fn authorized(headers: &axum::http::HeaderMap, token: Option<&str>) -> Result<(), Box<Response>> {
    let Some(token) = token else {
        return Err(Box::new((
            StatusCode::FORBIDDEN,
            "changes through the API are disabled: start the coordinator with WEIR_API_TOKEN set\n",
        )
            .into_response()));
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in constant time, so the answer's timing says nothing of the token.
    let same = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes().zip(token.bytes()).fold(0u8, |a, (x, y)| a | (x ^ y)) == 0
    });
    if same {
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

fn router(status: Arc<Status>, token: Option<String>) -> Router {
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
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| async move {
            if let Err(r) = authorized(&headers, token.as_deref()) {
                return *r;
            }
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
    for op in &i.operators {
        rin.with_label_values(&[op.uid.as_str(), op.type_.as_str()]).inc_by(op.records_in);
        rout.with_label_values(&[op.uid.as_str(), op.type_.as_str()]).inc_by(op.records_out);
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
    r.register(Box::new(uptime))?;
    r.register(Box::new(state))?;
    r.register(Box::new(rin))?;
    r.register(Box::new(rout))?;
    let mut out = Vec::new();
    TextEncoder::new().encode(&r.gather(), &mut out)?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}
