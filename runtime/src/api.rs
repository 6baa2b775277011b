//! The coordinator's HTTP API (types in [`weir_crds::api`]): `GET /v1/job`, `/metrics`,
//! `/healthz`, `/readyz`. Served on its own thread, so a slow client never touches the job.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::get;
use prometheus::{Encoder, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use weir_crds::api::JobState;

use crate::coordinator::Status;
use crate::error::RuntimeError;

/// Listens on `addr` and serves the API until the process ends; returns the bound address.
pub fn serve(addr: &str, status: Arc<Status>) -> Result<SocketAddr, RuntimeError> {
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
                if let Err(e) = axum::serve(listener, router(status)).await {
                    eprintln!("weir: HTTP API: {e}");
                }
            })
        })
        .map_err(|e| RuntimeError::internal(format!("starting a thread: {e}")))?;
    Ok(bound)
}

fn router(status: Arc<Status>) -> Router {
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
