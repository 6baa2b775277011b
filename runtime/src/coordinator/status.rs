//! What the coordinator shows of the job: the status the API serves (checkpoints,
//! savepoints, metrics), updated as the job runs.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use weir_crds::StorageUri;
use weir_crds::api::{
    CheckpointInfo, CheckpointStatus, Checkpoints, JobInfo, JobState, OperatorInfo, SavepointInfo,
    SavepointStatus,
};

use crate::checkpoint::{self};
use crate::plan::Plan;

use super::*;

/// The job as the coordinator sees it; read by the HTTP API and the progress display.
#[derive(Debug)]
pub struct Status {
    pub info: Mutex<JobInfo>,
    pub started: Instant,
    pub checkpoints: Mutex<Checkpoints>,
    /// Set by `POST /v1/checkpoints`: take a checkpoint as soon as the settings allow.
    pub trigger: AtomicBool,
    /// Whether the job takes checkpoints (`POST /v1/checkpoints` is refused otherwise).
    pub checkpointing: AtomicBool,
    /// Whether the job can take savepoints (it has checkpoint storage).
    pub savepoints_allowed: AtomicBool,
    /// Savepoints requested and not triggered yet, oldest first.
    pub(super) savepoint_requests: Mutex<VecDeque<SavepointRequested>>,
    /// The savepoints of this run, newest first.
    pub(super) savepoints: Mutex<Vec<SavepointInfo>>,
    pub(super) savepoint_counter: std::sync::atomic::AtomicU64,
    /// The result of the savepoint that stopped the job (completed) was read through the API.
    pub(super) stop_result_read: AtomicBool,
}

/// A savepoint request waiting for its trigger.
#[derive(Debug, Clone)]
pub(super) struct SavepointRequested {
    pub(super) id: String,
    pub(super) stop: bool,
    pub(super) directory: Option<StorageUri>,
}

/// Why a savepoint cannot be requested now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SavepointRefused {
    /// The request is wrong (400).
    BadRequest(String),
    /// Not now (409).
    Conflict(String),
}

impl Status {
    pub fn new(name: &str, run_id: &str, plan: &Plan, workers_expected: u32) -> Self {
        Self {
            info: Mutex::new(JobInfo {
                name: name.to_string(),
                run_id: run_id.to_string(),
                job_id: String::new(),
                state: JobState::Starting,
                parallelism: plan.parallelism,
                max_parallelism: plan.max_parallelism,
                workers_connected: 0,
                workers_expected,
                uptime_seconds: 0.0,
                started_at: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64),
                state_bytes: 0,
                subtask_state_bytes: Vec::new(),
                operators: plan
                    .ops
                    .iter()
                    .map(|o| OperatorInfo {
                        records_dropped: 0,
                        records_late: 0,
                        watermark: None,
                        metrics: Vec::new(),
                        uid: o.uid.clone(),
                        type_: o.type_name.clone(),
                        records_in: 0,
                        records_out: 0,
                        lag: None,
                        partitions: Vec::new(),
                        bytes_in: 0,
                        commits: None,
                    })
                    .collect(),
                restarts: 0,
                last_checkpoint: None,
                last_savepoint: None,
                error: None,
            }),
            started: Instant::now(),
            checkpoints: Mutex::default(),
            trigger: AtomicBool::new(false),
            checkpointing: AtomicBool::new(false),
            savepoints_allowed: AtomicBool::new(false),
            savepoint_requests: Mutex::default(),
            savepoints: Mutex::default(),
            savepoint_counter: Default::default(),
            stop_result_read: AtomicBool::new(false),
        }
    }

    /// Asks for a savepoint (`POST /v1/savepoints`); returns its id. It is taken as soon as
    /// the job runs and no other savepoint is in flight.
    pub fn request_savepoint(
        &self,
        stop: bool,
        directory: Option<&str>,
        request_id: Option<&str>,
    ) -> Result<String, SavepointRefused> {
        let request_id = request_id.map(str::trim).filter(|r| !r.is_empty());
        if let Some(key) = request_id {
            let all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(s) = all.iter().find(|s| {
                s.request_id.as_deref() == Some(key) && s.status != SavepointStatus::Failed
            }) {
                return Ok(s.id.clone());
            }
        }
        let directory = match directory.map(str::trim).filter(|d| !d.is_empty()) {
            Some(d) => Some(d.parse::<StorageUri>().map_err(|e| {
                SavepointRefused::BadRequest(format!(
                    "directory {d:?}: {e}: give s3://bucket/prefix or an absolute directory"
                ))
            })?),
            None => None,
        };
        if !self.savepoints_allowed.load(Ordering::Relaxed) {
            return Err(SavepointRefused::Conflict(
                "this job takes no checkpoints, and savepoints need them: set spec.checkpointing.interval above 0s".into(),
            ));
        }
        let state = self.snapshot().state;
        if state != JobState::Running {
            return Err(SavepointRefused::Conflict(format!(
                "the job is {state:?}, not running: a savepoint needs a running job"
            )));
        }
        let mut queue = self.savepoint_requests.lock().unwrap_or_else(|e| e.into_inner());
        let mut all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.iter().find(|s| s.stop && s.status == SavepointStatus::InProgress) {
            return Err(SavepointRefused::Conflict(format!(
                "savepoint {} is already stopping the job",
                s.id
            )));
        }
        let n = self.savepoint_counter.fetch_add(1, Ordering::Relaxed);
        let id = format!("{:011x}{:03x}", checkpoint::now_ms(), n & 0xfff);
        queue.push_back(SavepointRequested { id: id.clone(), stop, directory });
        all.insert(
            0,
            SavepointInfo {
                id: id.clone(),
                status: SavepointStatus::InProgress,
                stop,
                checkpoint_id: None,
                requested_at: checkpoint::now_ms(),
                duration_ms: 0,
                size_bytes: 0,
                path: None,
                failure: None,
                request_id: request_id.map(str::to_string),
            },
        );
        all.truncate(100);
        Ok(id)
    }

    /// Savepoint `id` of this run, now.
    pub fn savepoint(&self, id: &str) -> Option<SavepointInfo> {
        let all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().find(|s| s.id == id).cloned().map(with_duration)
    }

    /// Savepoint `id` as a client asks for it: reading that a savepoint stopped the job lets
    /// the coordinator exit. Reading that one failed does not: the job goes on, and a later
    /// stop's result must still be read.
    pub fn read_savepoint(&self, id: &str) -> Option<SavepointInfo> {
        let sp = self.savepoint(id)?;
        if sp.stop && sp.status == SavepointStatus::Completed {
            self.stop_result_read.store(true, Ordering::Relaxed);
        }
        Some(sp)
    }

    /// The savepoint that stopped the job, while nobody has read its result through the API.
    pub fn unread_stop_savepoint(&self) -> Option<String> {
        if self.stop_result_read.load(Ordering::Relaxed) {
            return None;
        }
        let all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().find(|s| s.stop && s.status == SavepointStatus::Completed).map(|s| s.id.clone())
    }

    /// The savepoints of this run, newest first.
    pub fn savepoints(&self) -> Vec<SavepointInfo> {
        let all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        all.iter().cloned().map(with_duration).collect()
    }

    /// Changes savepoint `id`'s record.
    pub(super) fn update_savepoint(&self, id: &str, f: impl FnOnce(&mut SavepointInfo)) {
        let mut all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = all.iter_mut().find(|s| s.id == id) {
            f(s);
            if s.status != SavepointStatus::InProgress {
                s.duration_ms = checkpoint::now_ms().saturating_sub(s.requested_at);
            }
            if s.status == SavepointStatus::Completed {
                let done = s.clone();
                drop(all);
                self.update(|i| i.last_savepoint = Some(done));
            }
        }
    }

    /// The next savepoint request, if any.
    pub(super) fn next_savepoint_request(&self) -> Option<SavepointRequested> {
        self.savepoint_requests.lock().unwrap_or_else(|e| e.into_inner()).pop_front()
    }

    /// Fails the savepoint requests that have waited for their trigger longer than
    /// `timeout` (`spec.savepoints.timeout`): a savepoint completes or fails within it.
    pub(super) fn expire_savepoint_requests(&self, timeout: Duration) {
        let now = checkpoint::now_ms();
        let limit = timeout.as_millis() as u64;
        let mut q = self.savepoint_requests.lock().unwrap_or_else(|e| e.into_inner());
        if q.is_empty() {
            return;
        }
        let mut all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        q.retain(|r| {
            let Some(s) = all.iter_mut().find(|s| s.id == r.id) else { return false };
            if now.saturating_sub(s.requested_at) <= limit {
                return true;
            }
            s.status = SavepointStatus::Failed;
            s.failure = Some(format!(
                "it was not taken within spec.savepoints.timeout ({} s): the job was not running with every subtask able to take it (restarting, or another savepoint in flight)",
                timeout.as_secs()
            ));
            s.duration_ms = now.saturating_sub(s.requested_at);
            false
        });
    }

    /// Fails every savepoint in progress (queued ones too when `queued`).
    pub(super) fn fail_savepoints(&self, why: &str, queued: bool) {
        let waiting: Vec<String> = if queued {
            let mut q = self.savepoint_requests.lock().unwrap_or_else(|e| e.into_inner());
            q.drain(..).map(|r| r.id).collect()
        } else {
            Vec::new()
        };
        let mut all = self.savepoints.lock().unwrap_or_else(|e| e.into_inner());
        for s in all.iter_mut().filter(|s| s.status == SavepointStatus::InProgress) {
            if s.checkpoint_id.is_some() || waiting.contains(&s.id) {
                s.status = SavepointStatus::Failed;
                s.failure = Some(why.to_string());
                s.duration_ms = checkpoint::now_ms().saturating_sub(s.requested_at);
            }
        }
    }

    /// A copy of the job's state, now.
    pub fn snapshot(&self) -> JobInfo {
        let mut i = self.info.lock().unwrap_or_else(|e| e.into_inner()).clone();
        i.uptime_seconds = self.started.elapsed().as_secs_f64();
        i
    }

    /// A copy of the checkpoint statistics, now.
    pub fn checkpoints(&self) -> Checkpoints {
        self.checkpoints.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    pub(super) fn update(&self, f: impl FnOnce(&mut JobInfo)) {
        f(&mut self.info.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// Records what happened to a checkpoint (newest first in the history).
    pub(super) fn record(&self, c: CheckpointInfo) {
        let mut s = self.checkpoints.lock().unwrap_or_else(|e| e.into_inner());
        match c.status {
            CheckpointStatus::Completed => s.completed += 1,
            CheckpointStatus::Failed => s.failed += 1,
            CheckpointStatus::InProgress => {}
        }
        s.history.retain(|h| h.id != c.id || c.final_ != h.final_);
        s.history.insert(0, c.clone());
        s.history.truncate(20);
        s.in_progress =
            s.history.iter().filter(|h| h.status == CheckpointStatus::InProgress).count() as u32;
        drop(s);
        if c.status == CheckpointStatus::Completed {
            self.update(|i| i.last_checkpoint = Some(c));
        }
    }
}

/// A savepoint with its duration so far while it is in progress.
pub(super) fn with_duration(mut s: SavepointInfo) -> SavepointInfo {
    if s.status == SavepointStatus::InProgress {
        s.duration_ms = checkpoint::now_ms().saturating_sub(s.requested_at);
    }
    s
}

/// Operator `k`'s watermark: the least over its subtasks, once every subtask of the job has
/// one (a subtask index that is not the job's is left out, as anything from a socket).
fn watermark_of(progress: &[Progress], k: usize, parallelism: u32) -> Option<i64> {
    let mut by: BTreeMap<u32, i64> = BTreeMap::new();
    for &(op, s, t) in progress.iter().flat_map(|p| &p.watermarks) {
        if op as usize == k && s < parallelism {
            by.insert(s, t);
        }
    }
    (by.len() == parallelism as usize).then(|| by.into_values().min()).flatten()
}

impl Driver<'_> {
    pub(super) fn publish(&self, progress: &[Progress]) {
        // Counters from the workers saturate rather than overflow.
        let sum = |it: &mut dyn Iterator<Item = u64>| it.fold(0u64, u64::saturating_add);
        self.c.status.update(|i| {
            for (k, op) in i.operators.iter_mut().enumerate() {
                let of = |p: &Progress| p.records.get(k).copied().unwrap_or_default();
                op.records_in = sum(&mut progress.iter().map(|p| of(p).0));
                op.records_out = sum(&mut progress.iter().map(|p| of(p).1));
                op.records_dropped =
                    sum(&mut progress.iter().filter_map(|p| p.dropped.get(k).copied()));
                op.records_late = sum(&mut progress.iter().filter_map(|p| p.late.get(k).copied()));
                op.watermark = watermark_of(progress, k, i.parallelism);
                op.metrics = user_metrics_of(progress, k, i.parallelism);
                let reports = progress.iter().flat_map(|p| &p.connectors);
                let st = crate::connectors::stats::operator_stats(reports, k, i.parallelism)
                    .unwrap_or_default();
                op.lag = st.lag;
                op.partitions = st.partitions;
                op.bytes_in = st.bytes_in;
                op.commits = st.commits;
            }
            i.state_bytes = sum(&mut progress.iter().map(|p| p.state_bytes));
            // A subtask index a worker reports that is not the job's is left out.
            let mut by = vec![0u64; i.parallelism as usize];
            for (s, bytes) in progress.iter().flat_map(|p| &p.subtask_state_bytes) {
                if let Some(b) = by.get_mut(*s as usize) {
                    *b = b.saturating_add(*bytes);
                }
            }
            i.subtask_state_bytes = by;
        });
    }
}
