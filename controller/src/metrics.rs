//! Prometheus metrics and the health endpoints (`/metrics`, `/healthz`, `/readyz`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGaugeVec, Opts,
    Registry, TextEncoder,
};

/// The controller's metrics, and what the per-job gauges are computed from at each scrape.
#[derive(Debug)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounter,
    pub failures: IntCounterVec,
    pub duration: Histogram,
    /// Upgrades by mode and how they ended: completed, rolled-back, refused.
    pub upgrades: IntCounterVec,
    /// From the start of an upgrade to the new version running.
    pub upgrade_duration: Histogram,
    /// Savepoints the controller took, by reason and result (completed, failed).
    pub savepoints: IntCounterVec,
    jobs_by_phase: IntGaugeVec,
    checkpoint_age: GaugeVec,
    jobs: Mutex<BTreeMap<(String, String), JobFacts>>,
    /// Whether this replica leads (and so reconciles).
    pub leading: std::sync::atomic::AtomicBool,
}

#[derive(Debug, Clone, Default)]
struct JobFacts {
    phase: String,
    /// When the last checkpoint completed, in seconds since the epoch.
    last_checkpoint: Option<f64>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let registry =
            Registry::new_custom(Some("weir_controller".into()), None).expect("a valid prefix");
        let reconciles = IntCounter::new("reconciles_total", "Reconciles run to their end")
            .expect("a valid metric");
        let failures = IntCounterVec::new(
            Opts::new("reconcile_failures_total", "Reconciles that failed, by reason"),
            &["reason"],
        )
        .expect("a valid metric");
        let duration = Histogram::with_opts(
            HistogramOpts::new("reconcile_duration_seconds", "How long a reconcile took")
                .buckets(vec![0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0]),
        )
        .expect("a valid metric");
        let upgrades = IntCounterVec::new(
            Opts::new("upgrades_total", "Upgrades by mode and how they ended"),
            &["mode", "result"],
        )
        .expect("a valid metric");
        let upgrade_duration = Histogram::with_opts(
            HistogramOpts::new(
                "upgrade_duration_seconds",
                "From the start of an upgrade to the new version running",
            )
            .buckets(vec![1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]),
        )
        .expect("a valid metric");
        let savepoints = IntCounterVec::new(
            Opts::new("savepoints_total", "Savepoints the controller took, by reason and result"),
            &["reason", "result"],
        )
        .expect("a valid metric");
        let jobs_by_phase = IntGaugeVec::new(
            Opts::new("jobs", "StreamJobs by phase (as this replica last reconciled them)"),
            &["phase"],
        )
        .expect("a valid metric");
        let checkpoint_age = GaugeVec::new(
            Opts::new(
                "checkpoint_age_seconds",
                "Seconds since the last completed checkpoint of each job",
            ),
            &["namespace", "job"],
        )
        .expect("a valid metric");
        for c in [
            Box::new(reconciles.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(failures.clone()),
            Box::new(duration.clone()),
            Box::new(upgrades.clone()),
            Box::new(upgrade_duration.clone()),
            Box::new(savepoints.clone()),
            Box::new(jobs_by_phase.clone()),
            Box::new(checkpoint_age.clone()),
        ] {
            registry.register(c).expect("metrics registered once");
        }
        Metrics {
            registry,
            reconciles,
            failures,
            duration,
            upgrades,
            upgrade_duration,
            savepoints,
            jobs_by_phase,
            checkpoint_age,
            jobs: Mutex::default(),
            leading: Default::default(),
        }
    }

    /// Starts timing a reconcile; the time is recorded and the reconcile counted when the
    /// guard drops.
    pub fn reconcile(&self) -> ReconcileTimer<'_> {
        ReconcileTimer { m: self, start: Instant::now() }
    }

    /// Records what a reconcile saw of a job.
    pub fn job(&self, ns: &str, name: &str, phase: &str, last_checkpoint_ms: Option<i64>) {
        let facts = JobFacts {
            phase: phase.to_string(),
            last_checkpoint: last_checkpoint_ms.map(|ms| ms as f64 / 1000.0),
        };
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).insert((ns.into(), name.into()), facts);
    }

    /// Forgets a deleted job.
    pub fn forget(&self, ns: &str, name: &str) {
        self.jobs.lock().unwrap_or_else(|e| e.into_inner()).remove(&(ns.into(), name.into()));
    }

    /// The text exposition, with the per-job gauges computed now.
    pub fn render(&self) -> String {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
        self.jobs_by_phase.reset();
        self.checkpoint_age.reset();
        for ((ns, name), f) in self.jobs.lock().unwrap_or_else(|e| e.into_inner()).iter() {
            self.jobs_by_phase.with_label_values(&[f.phase.as_str()]).inc();
            if let Some(t) = f.last_checkpoint {
                self.checkpoint_age
                    .with_label_values(&[ns.as_str(), name.as_str()])
                    .set((now - t).max(0.0));
            }
        }
        let mut out = Vec::new();
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Records a reconcile's duration when dropped.
#[derive(Debug)]
pub struct ReconcileTimer<'a> {
    m: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.m.duration.observe(self.start.elapsed().as_secs_f64());
        self.m.reconciles.inc();
    }
}

/// `/metrics`, `/healthz` (the process serves) and `/readyz` (200 on every replica that is
/// up: a standby is ready to take over).
pub fn router(metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route(
            "/metrics",
            get(|State(m): State<Arc<Metrics>>| async move {
                ([("content-type", "text/plain; version=0.0.4")], m.render())
            }),
        )
        .route("/healthz", get(|| async { (StatusCode::OK, "ok\n") }))
        .route(
            "/readyz",
            get(|State(m): State<Arc<Metrics>>| async move {
                let role = if m.leading.load(std::sync::atomic::Ordering::Relaxed) {
                    "leader"
                } else {
                    "standby"
                };
                (StatusCode::OK, format!("ok ({role})\n"))
            }),
        )
        .with_state(metrics)
}
