//! The coordinator's HTTP API, version 1: the JSON the runtime serves and the controller,
//! the CLI and people read.
//!
//! | Method and path | Answer |
//! |---|---|
//! | `GET /v1/job` | [`JobInfo`] |
//! | `GET /metrics` | Prometheus text format |
//! | `GET /healthz` | 200 while the coordinator works, 503 once the job failed |
//! | `GET /readyz` | 200 while every worker is connected and the job runs, 503 otherwise |
//! | `GET /v1/checkpoints` | [`Checkpoints`] |
//! | `POST /v1/checkpoints` | triggers a checkpoint now (needs the API token): 202 and [`Triggered`] |
//! | `POST /v1/savepoints` | [`SavepointRequest`]: takes a savepoint (needs the API token): 202 and [`SavepointTriggered`] |
//! | `GET /v1/savepoints` | [`Savepoints`]: the savepoints of this run, the newest first |
//! | `GET /v1/savepoints/{id}` | [`SavepointInfo`], 404 for an id this coordinator does not know |
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
    /// A part failed: restarting from the last completed checkpoint.
    Restarting,
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
    /// The id its checkpoints are stored under (`--job-id`, else the run id).
    #[serde(default)]
    pub job_id: String,
    pub state: JobState,
    pub parallelism: u32,
    pub max_parallelism: u32,
    /// Workers connected to the coordinator, and how many the job needs.
    pub workers_connected: u32,
    pub workers_expected: u32,
    /// Seconds since the coordinator started.
    pub uptime_seconds: f64,
    /// When the coordinator started, in milliseconds since the Unix epoch.
    #[serde(default)]
    pub started_at: u64,
    /// Bytes of keyed state held by the workers (RocksDB's estimate of live data).
    pub state_bytes: u64,
    /// The same per subtask, by subtask index (to see a subtask's state outgrow its memory
    /// coming); empty until the workers report it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub subtask_state_bytes: Vec<u64>,
    pub operators: Vec<OperatorInfo>,
    /// Times the job restarted after a failure in this run.
    #[serde(default)]
    pub restarts: u32,
    /// The last completed checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointInfo>,
    /// The last completed savepoint of this run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_savepoint: Option<SavepointInfo>,
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
    /// Records the operator could not use and dropped (a `sum` of a field that is not a
    /// number).
    #[serde(default)]
    pub records_dropped: u64,
    /// Records that came after the event time had passed them, too late to use (a window's
    /// record after its allowed lateness).
    #[serde(default)]
    pub records_late: u64,
    /// The event time the operator has reached, in milliseconds since the epoch: the least
    /// over its subtasks of the watermark each has taken in. Absent until every subtask has
    /// one (and without event time); `9223372036854775807` once its input has ended.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub watermark: Option<i64>,
    /// The metrics the operator's own code registered, per subtask, by name.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metrics: Vec<UserMetric>,
    /// A source that knows where its input ends (a `kafka_source`): the records it has yet to
    /// read, summed over its partitions. Absent until every partition's end is known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
    /// A `kafka_source`'s partitions: where each subtask is in each, and how far behind its
    /// end, by topic and partition.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partitions: Vec<PartitionInfo>,
    /// Bytes a source read (a Kafka record's key and value).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub bytes_in: u64,
    /// A transactional sink's commits (a `kafka_sink` with `delivery: exactly-once`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub commits: Option<CommitInfo>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A partition a source reads ([`OperatorInfo::partitions`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PartitionInfo {
    pub topic: String,
    pub partition: i32,
    pub subtask: u32,
    /// The next offset the subtask reads; absent before it read any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// Records behind the partition's end (its last stable offset with `read_committed`,
    /// its high watermark otherwise); 0 once a bounded read reached its end. Absent until
    /// the client has heard the end from the partition's leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<u64>,
}

/// A transactional sink's commits, over its subtasks ([`OperatorInfo::commits`]).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CommitInfo {
    /// Transactions committed in this attempt of the job.
    pub committed: u64,
    /// Seconds spent committing them (the marker and the commit's round trips).
    pub seconds: f64,
    /// Transactions open now: the one being written and those pre-committed at a barrier,
    /// waiting for their checkpoint to complete.
    pub open_transactions: u32,
}

/// A metric an operator's code registered ([`OperatorInfo::metrics`]); on `/metrics` it is
/// `weir_user_<name>`, labelled with the operator and the subtask.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UserMetric {
    pub name: String,
    pub kind: MetricKind,
    pub subtask: u32,
    pub value: i64,
}

/// What a [`UserMetric`] counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum MetricKind {
    /// Only goes up.
    Counter,
    /// Goes up and down.
    Gauge,
}

/// Where a checkpoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum CheckpointStatus {
    InProgress,
    Completed,
    Failed,
}

/// One checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInfo {
    pub id: u64,
    pub status: CheckpointStatus,
    /// Milliseconds since the epoch.
    pub trigger_time: u64,
    /// From the trigger to the metadata written (so far, while in progress).
    pub duration_ms: u64,
    /// Bytes of state the checkpoint refers to, and the bytes uploaded for it (less with
    /// incremental checkpoints).
    pub size_bytes: u64,
    pub uploaded_bytes: u64,
    /// The longest barrier alignment of any subtask.
    pub alignment_ms: u64,
    /// Some subtask took its part unaligned, storing records its barrier overtook:
    /// `inFlightBytes` of them in all.
    #[serde(default)]
    pub unaligned: bool,
    #[serde(default)]
    pub in_flight_bytes: u64,
    /// Subtasks that acknowledged, of all.
    pub acknowledged: u32,
    pub subtasks: u32,
    /// Taken when every source had ended.
    #[serde(rename = "final")]
    pub final_: bool,
    /// Where the metadata is (completed ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
}

/// `GET /v1/checkpoints`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Checkpoints {
    pub completed: u64,
    pub failed: u64,
    pub in_progress: u32,
    /// The most recent first, up to 20.
    pub history: Vec<CheckpointInfo>,
}

/// `POST /v1/checkpoints`: the request was taken; the checkpoint starts as soon as the
/// settings allow (at most `maxConcurrent` in flight).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Triggered {
    pub message: String,
}

/// `POST /v1/savepoints`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SavepointRequest {
    /// Stop the job once the savepoint is complete: the sources take no more input after its
    /// barrier, the sinks commit what came before it, and the job finishes.
    #[serde(default)]
    pub stop: bool,
    /// Where the savepoint goes (`s3://bucket/prefix` or a directory) instead of
    /// `spec.savepoints.directory`; the savepoint is `<directory>/<namespace>/<job>/sp-<id>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<String>,
    /// An idempotency key: a request with the key of an earlier one of this run that has not
    /// failed answers that savepoint's id instead of taking another (a client that died
    /// before it read the answer asks again safely).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `POST /v1/savepoints`: the request was taken; poll `GET /v1/savepoints/{id}`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavepointTriggered {
    pub id: String,
}

/// Where a savepoint is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SavepointStatus {
    /// Requested, or its barrier is on its way.
    InProgress,
    Completed,
    Failed,
}

/// One savepoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SavepointInfo {
    pub id: String,
    pub status: SavepointStatus,
    /// It stops the job.
    pub stop: bool,
    /// The checkpoint id its barrier carries (once triggered).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub checkpoint_id: Option<u64>,
    /// Milliseconds since the epoch: when it was requested.
    pub requested_at: u64,
    /// From the request to completion or failure (so far, while in progress).
    pub duration_ms: u64,
    /// Bytes of state written.
    pub size_bytes: u64,
    /// Its directory (completed ones): what `weir run --from-savepoint` and
    /// `spec.restore.path` take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Why it failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// The request's idempotency key, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// `GET /v1/savepoints`.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Savepoints {
    /// The newest first.
    pub savepoints: Vec<SavepointInfo>,
}
