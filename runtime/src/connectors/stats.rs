//! What connectors tell of the systems they read and write: a Kafka source's partitions
//! (where it is in each and how far behind the end) and the bytes it read, a transactional
//! sink's commits and open transactions. Each subtask of such a connector keeps its figures
//! in a [`ConnectorMetrics`]; the worker sends them with its progress, and the coordinator
//! checks them (they come over a socket) and shows them in `/v1/job` and on `/metrics`.

use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

/// The most partitions one subtask reports, and the coordinator shows per operator.
pub const MAX_PARTITIONS: usize = 10_000;

/// A partition a subtask reads.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionStats {
    pub topic: String,
    pub partition: i32,
    /// The next offset to read; `None` before the first.
    #[serde(default)]
    pub offset: Option<i64>,
    /// Records behind the partition's end; `None` until the end is known.
    #[serde(default)]
    pub lag: Option<u64>,
}

/// One connector subtask's figures.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConnectorStats {
    /// Bytes read (a record's key and value).
    #[serde(default)]
    pub bytes_in: u64,
    #[serde(default)]
    pub partitions: Vec<PartitionStats>,
    /// Whether it commits transactions (the `commits` figures mean something).
    #[serde(default)]
    pub transactional: bool,
    #[serde(default)]
    pub commits: u64,
    /// Time spent committing, in microseconds.
    #[serde(default)]
    pub commit_micros: u64,
    #[serde(default)]
    pub open_transactions: u32,
}

/// Where a connector subtask keeps its figures, shared with the worker's progress reports.
#[derive(Debug, Clone, Default)]
pub struct ConnectorMetrics(Arc<Mutex<ConnectorStats>>);

impl ConnectorMetrics {
    pub fn update(&self, f: impl FnOnce(&mut ConnectorStats)) {
        f(&mut self.0.lock().unwrap_or_else(|e| e.into_inner()));
    }

    pub fn get(&self) -> ConnectorStats {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The connector subtasks of a worker's attempt: (operator index in plan order, subtask,
/// figures).
pub(crate) type ConnectorRegistry = Arc<Mutex<Vec<(u32, u32, ConnectorMetrics)>>>;

/// The figures of subtask `subtask` of operator `operator`, made on first ask.
pub(crate) fn register(
    registry: &ConnectorRegistry,
    operator: usize,
    subtask: u32,
) -> ConnectorMetrics {
    let mut all = registry.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, m)) = all.iter().find(|(o, s, _)| *o as usize == operator && *s == subtask) {
        return m.clone();
    }
    let m = ConnectorMetrics::default();
    all.push((operator as u32, subtask, m.clone()));
    m
}

/// What a worker reports: (operator index, subtask, figures) each.
pub(crate) fn report(registry: &ConnectorRegistry) -> Vec<(u32, u32, ConnectorStats)> {
    let all = registry.lock().unwrap_or_else(|e| e.into_inner());
    all.iter().map(|(o, s, m)| (*o, *s, m.get())).collect()
}

/// Operator `k`'s figures as the coordinator shows them, from what the workers reported of
/// its subtasks: a subtask that is not the job's, a partition number below 0, a topic name
/// that cannot be one, are left out, and at most [`MAX_PARTITIONS`] partitions are shown.
/// `None` when no subtask of it reported.
pub(crate) fn operator_stats<'a>(
    reports: impl Iterator<Item = &'a (u32, u32, ConnectorStats)>,
    k: usize,
    parallelism: u32,
) -> Option<OperatorStats> {
    let mut by_subtask: std::collections::BTreeMap<u32, &ConnectorStats> = Default::default();
    for (op, s, st) in reports {
        if *op as usize == k && *s < parallelism {
            by_subtask.insert(*s, st);
        }
    }
    if by_subtask.is_empty() {
        return None;
    }
    let mut out = OperatorStats::default();
    let mut seen = std::collections::BTreeSet::new();
    let mut all_known = true;
    for (&s, st) in &by_subtask {
        out.bytes_in = out.bytes_in.saturating_add(st.bytes_in);
        if st.transactional {
            let c = out.commits.get_or_insert_with(Default::default);
            c.committed = c.committed.saturating_add(st.commits);
            c.seconds += st.commit_micros as f64 / 1e6;
            c.open_transactions = c.open_transactions.saturating_add(st.open_transactions);
        }
        for p in &st.partitions {
            let name_ok = !p.topic.is_empty()
                && p.topic.len() <= 249
                && p.topic.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
            if !name_ok || p.partition < 0 || out.partitions.len() >= MAX_PARTITIONS {
                continue;
            }
            // A partition two subtasks claim (a report from before a rescale) counts once.
            if !seen.insert((p.topic.clone(), p.partition)) {
                continue;
            }
            all_known &= p.lag.is_some();
            out.partitions.push(weir_crds::api::PartitionInfo {
                topic: p.topic.clone(),
                partition: p.partition,
                subtask: s,
                offset: p.offset,
                lag: p.lag,
            });
        }
    }
    if !out.partitions.is_empty() && all_known {
        out.lag = Some(out.partitions.iter().filter_map(|p| p.lag).fold(0, u64::saturating_add));
    }
    out.partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Some(out)
}

/// What [`operator_stats`] gives.
#[derive(Debug, Default, Clone, PartialEq)]
pub(crate) struct OperatorStats {
    pub bytes_in: u64,
    pub partitions: Vec<weir_crds::api::PartitionInfo>,
    pub lag: Option<u64>,
    pub commits: Option<weir_crds::api::CommitInfo>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(topic: &str, partition: i32, lag: Option<u64>) -> PartitionStats {
        PartitionStats { topic: topic.into(), partition, offset: Some(7), lag }
    }

    #[test]
    fn figures_are_summed_over_subtasks_and_what_cannot_be_is_left_out() {
        let registry = ConnectorRegistry::default();
        let a = register(&registry, 0, 0);
        let b = register(&registry, 0, 1);
        a.update(|s| {
            s.bytes_in = 10;
            s.partitions = vec![part("orders", 0, Some(5)), part("orders", 2, Some(1))];
        });
        b.update(|s| {
            s.bytes_in = 32;
            s.partitions = vec![
                part("orders", 1, Some(4)),
                // Claimed by subtask 0 already, not a topic, not a partition.
                part("orders", 0, Some(100)),
                part("no/such topic", 3, Some(9)),
                part("orders", -1, Some(9)),
            ];
        });
        register(&registry, 0, 0).update(|s| s.bytes_in += 1);
        let mut reports = report(&registry);
        // A subtask that is not the job's.
        reports.push((0, 9, ConnectorStats { bytes_in: 1 << 40, ..Default::default() }));
        let st = operator_stats(reports.iter(), 0, 2).unwrap();
        assert_eq!(st.bytes_in, 43);
        assert_eq!(st.lag, Some(10));
        let got: Vec<_> = st.partitions.iter().map(|p| (p.partition, p.subtask, p.lag)).collect();
        assert_eq!(got, [(0, 0, Some(5)), (1, 1, Some(4)), (2, 0, Some(1))]);
        assert_eq!(st.commits, None, "no transactional subtask");
        assert!(operator_stats(reports.iter(), 1, 2).is_none());

        // One partition whose end is not known yet: no total.
        b.update(|s| s.partitions = vec![part("orders", 1, None)]);
        let st = operator_stats(report(&registry).iter(), 0, 2).unwrap();
        assert_eq!(st.lag, None);
    }

    #[test]
    fn commits_are_summed_over_transactional_subtasks() {
        let registry = ConnectorRegistry::default();
        for s in 0..2 {
            register(&registry, 3, s).update(|st| {
                st.transactional = true;
                st.commits = 4;
                st.commit_micros = 250_000;
                st.open_transactions = 1 + s;
            });
        }
        let st = operator_stats(report(&registry).iter(), 3, 2).unwrap();
        let c = st.commits.unwrap();
        assert_eq!((c.committed, c.open_transactions), (8, 3));
        assert!((c.seconds - 0.5).abs() < 1e-9, "{}", c.seconds);
    }
}
