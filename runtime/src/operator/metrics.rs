//! An operator's own metrics: counters and gauges it registers by name when it opens
//! ([`super::Info::metrics`]), which each subtask reports with the job's, in `/v1/job`
//! (`operators[].metrics`) and on `/metrics` as `weir_user_<name>` with the operator and
//! the subtask as labels.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex};

pub use weir_crds::api::{MetricKind, UserMetric};

use crate::error::RuntimeError;

/// The most metrics one subtask of an operator may register.
pub const MAX_METRICS: usize = 64;

/// Whether `name` may name a user metric: a lowercase letter, then lowercase letters, digits
/// and `_`, at most 63 in all (it becomes part of a Prometheus metric name).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A metric a subtask registered.
#[derive(Debug)]
pub(crate) struct Registered {
    pub operator: usize,
    pub subtask: u32,
    pub name: String,
    pub kind: MetricKind,
    pub value: Arc<AtomicI64>,
}

/// The metrics of the subtasks a worker runs.
pub(crate) type Registry = Arc<Mutex<Vec<Registered>>>;

/// Where a subtask of an operator registers its metrics.
#[derive(Debug, Clone, Default)]
pub struct Metrics {
    registry: Registry,
    operator: usize,
    subtask: u32,
    uid: String,
}

/// A count that only goes up (events seen, alerts raised).
#[derive(Debug, Clone)]
pub struct Counter(Arc<AtomicI64>);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }

    pub fn add(&self, n: u64) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        // Saturates instead of wrapping into negative counts. Release: a report that reads
        // this count (Acquire) sees the engine's counts of the records that led to it.
        let _ = self
            .0
            .fetch_update(Ordering::Release, Ordering::Relaxed, |v| Some(v.saturating_add(n)));
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down (entries in a map, the lag behind a clock).
#[derive(Debug, Clone)]
pub struct Gauge(Arc<AtomicI64>);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Release);
    }

    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Metrics {
    pub(crate) fn new(registry: Registry, operator: usize, subtask: u32, uid: &str) -> Self {
        Self { registry, operator, subtask, uid: uid.to_string() }
    }

    /// The counter `name` of this subtask (the same one when asked twice).
    pub fn counter(&self, name: &str) -> Result<Counter, RuntimeError> {
        self.register(name, MetricKind::Counter).map(Counter)
    }

    /// The gauge `name` of this subtask (the same one when asked twice).
    pub fn gauge(&self, name: &str) -> Result<Gauge, RuntimeError> {
        self.register(name, MetricKind::Gauge).map(Gauge)
    }

    fn register(&self, name: &str, kind: MetricKind) -> Result<Arc<AtomicI64>, RuntimeError> {
        if !valid_name(name) {
            return Err(RuntimeError::user(format!(
                "operator {:?}: metric {name:?} cannot be registered: a metric's name is a lowercase letter, then lowercase letters, digits and _, at most 63 in all",
                self.uid
            )));
        }
        let mut all = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        let mine = |m: &&Registered| m.operator == self.operator && m.subtask == self.subtask;
        if let Some(m) = all.iter().filter(mine).find(|m| m.name == name) {
            if m.kind != kind {
                return Err(RuntimeError::user(format!(
                    "operator {:?}: metric {name:?} is registered as a {:?} already, and cannot be a {kind:?} too",
                    self.uid, m.kind
                )));
            }
            return Ok(m.value.clone());
        }
        if all.iter().filter(mine).count() >= MAX_METRICS {
            return Err(RuntimeError::user(format!(
                "operator {:?}: metric {name:?} is one more than the {MAX_METRICS} metrics a subtask may register",
                self.uid
            )));
        }
        let value = Arc::new(AtomicI64::new(0));
        all.push(Registered {
            operator: self.operator,
            subtask: self.subtask,
            name: name.to_string(),
            kind,
            value: value.clone(),
        });
        Ok(value)
    }
}

/// What a worker reports of its subtasks' metrics: (operator index, metric) each.
pub(crate) fn report(registry: &Registry) -> Vec<(u32, UserMetric)> {
    let all = registry.lock().unwrap_or_else(|e| e.into_inner());
    all.iter()
        .map(|m| {
            let metric = UserMetric {
                name: m.name.clone(),
                kind: m.kind,
                subtask: m.subtask,
                value: m.value.load(Ordering::Acquire),
            };
            (m.operator as u32, metric)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_are_per_subtask_by_name_and_bad_names_kinds_and_counts_are_refused() {
        let registry = Registry::default();
        let a = Metrics::new(registry.clone(), 1, 0, "op");
        let b = Metrics::new(registry.clone(), 1, 1, "op");
        let c = a.counter("alerts").unwrap();
        c.inc();
        a.counter("alerts").unwrap().add(2);
        b.counter("alerts").unwrap().add(10);
        a.gauge("keys").unwrap().set(-4);
        assert_eq!(c.get(), 3, "the same counter when asked twice");
        c.add(u64::MAX);
        assert_eq!(c.get(), i64::MAX, "saturates");
        let mut got = report(&registry);
        got.sort_by(|x, y| (&x.1.name, x.1.subtask).cmp(&(&y.1.name, y.1.subtask)));
        let got: Vec<_> =
            got.iter().map(|(o, m)| (*o, m.name.as_str(), m.subtask, m.value)).collect();
        assert_eq!(got, [(1, "alerts", 0, i64::MAX), (1, "alerts", 1, 10), (1, "keys", 0, -4)]);
        for bad in ["", "Alerts", "9lives", "a-b", &"x".repeat(64)] {
            let e = a.counter(bad).unwrap_err();
            assert!(
                e.message.contains("\"op\"") && e.message.contains("cannot be registered"),
                "{e}"
            );
        }
        let e = a.gauge("alerts").unwrap_err();
        assert!(e.message.contains("registered as a Counter already"), "{e}");
        for i in 0..MAX_METRICS - 1 {
            b.gauge(&format!("g{i}")).unwrap();
        }
        let e = b.gauge("one_more").unwrap_err();
        assert!(e.message.contains("one more than the 64"), "{e}");
    }
}
