//! The coordinator's HTTP API, version 1: the JSON the runtime serves and the controller,
//! the CLI and people read.
//!
//! | Method and path | Answer |
//! |---|---|
//! | `GET /v1/job` | [`JobInfo`] |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the coordinator works, 503 once the job failed |
//! | `GET /readyz` | 200 while every worker is connected and the job runs, 503 otherwise |
//!
//! Fields are only ever added to a version; a client ignores fields it does not know.

use serde::{Deserialize, Serialize};

/// The path prefix of this version.
pub const V1: &str = "/v1";

/// Where a job is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum JobState {
    /// Waiting for the workers to connect.
    Starting,
    Running,
    /// Told to stop: the sources stop and the operators flush.
    Stopping,
    /// Ended after its sources were exhausted or it was stopped.
    Finished,
    Failed,
}

/// `GET /v1/job`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct JobInfo {
    /// `metadata.name` of the StreamJob (empty when the manifest had none).
    pub name: String,
    /// Unique per run of the job.
    pub run_id: String,
    pub state: JobState,
    pub parallelism: u32,
    pub max_parallelism: u32,
    /// Workers connected to the coordinator, and how many the job needs.
    pub workers_connected: u32,
    pub workers_expected: u32,
    /// Seconds since the coordinator started.
    pub uptime_seconds: f64,
    /// Bytes of keyed state held by the workers (RocksDB's estimate of live data).
    pub state_bytes: u64,
    pub operators: Vec<OperatorInfo>,
    /// Why the job failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One operator of a job, all its subtasks together.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OperatorInfo {
    pub uid: String,
    #[serde(rename = "type")]
    pub type_: String,
    pub records_in: u64,
    pub records_out: u64,
}
