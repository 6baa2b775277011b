//! `StreamJob`: one stateful stream-processing job, as a user declares it (spec) and as the
//! controller reports it (status).
//!
//! The doc comments on the fields are the user's documentation: `kubectl explain streamjob.spec`
//! shows them. Every constraint the schema can express (ranges, enums, patterns) is in the
//! schema, so the apiserver refuses a bad manifest with a message naming the field; so are the
//! rules between fields, in CEL ([`crate::rules`]). [`StreamJobSpec::validate`], which the
//! runtime and the controller both call, checks those rules again with the same messages, and
//! what CEL cannot express.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::duration::Duration;
use crate::pipeline::{MAX_MAX_PARALLELISM, Pipeline, PipelineError, default_max_parallelism};
use crate::rules::{
    self, MAX_INPUTS, MAX_OPERATORS, PARALLELISM_ABOVE_MAX, PIPELINE, RESTORE_BOTH, TOO_MANY,
    UNALIGNED_AT_LEAST_ONCE,
};
use crate::storage_uri::StorageUri;
use crate::{is_default, preserve_unknown_object, quantity_map};

/// A stateful stream-processing job: its pipeline, its parallelism, how it checkpoints, and
/// how it moves to a new version with its state.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "StreamJob",
    plural = "streamjobs",
    namespaced,
    shortname = "sj",
    category = "weir",
    status = "StreamJobStatus",
    derive = "PartialEq",
    doc = "A stateful stream-processing job run by Weir: its pipeline, parallelism, checkpoints and upgrades.",
    scale(
        spec_replicas_path = ".spec.parallelism",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn = r#"{"name":"Phase", "type":"string", "jsonPath":".status.phase", "description":"Where the job is in its lifecycle"}"#,
    printcolumn = r#"{"name":"Parallelism", "type":"integer", "jsonPath":".spec.parallelism", "description":"Desired number of parallel subtasks"}"#,
    printcolumn = r#"{"name":"Last Checkpoint", "type":"date", "jsonPath":".status.lastCheckpoint.completedAt", "description":"When the last checkpoint completed"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp", "description":"Time since the StreamJob was created"}"#,
    printcolumn = r#"{"name":"Checkpoint", "type":"integer", "jsonPath":".status.lastCheckpoint.id", "description":"Id of the last completed checkpoint", "priority":1}"#,
    printcolumn = r#"{"name":"Savepoint", "type":"string", "jsonPath":".status.lastSavepoint.snapshot", "description":"StreamSnapshot of the last savepoint", "priority":1}"#,
    validation = rules::root_rule()
)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::spec)]
pub struct StreamJobSpec {
    /// Container image of the Weir runtime that runs the job's coordinator and workers. When
    /// empty, the operator's default runtime image is used. Changing it is an upgrade. An
    /// image of a user's own `weir` binary (built with the SDK) may run operator types it
    /// registers: a job that names an image may use types that are not built in, which its
    /// binary checks when the job starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,

    /// When the runtime image is pulled: Always, IfNotPresent or Never.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_pull_policy: Option<ImagePullPolicy>,

    /// Number of parallel subtasks, one worker pod each, from 1 to maxParallelism. `kubectl
    /// scale sj/NAME --replicas N` and a HorizontalPodAutoscaler change this field; a change
    /// is an upgrade that redistributes the key groups over the new subtasks.
    #[serde(default = "default_parallelism")]
    #[schemars(range(min = 1, max = 32768))]
    pub parallelism: i32,

    /// Number of key groups: the most subtasks the job's keyed state can ever be spread over.
    /// Fixed when the job first takes state; changing it afterwards is refused. When empty:
    /// the next power of two of 1.5 x parallelism, at least 128, at most 32768.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32768))]
    pub max_parallelism: Option<i32>,

    /// Desired state: `running`, or `suspended` (remove the pods; in savepoint mode the job
    /// first stops with a savepoint, which `running` restores; in last-state mode `running`
    /// resumes from the last checkpoint, in stateless mode from nothing).
    #[serde(default)]
    pub state: DesiredState,

    /// How the job moves to a new spec: `savepoint` (stop with a savepoint, start the new spec
    /// from it), `last-state` (start the new spec from the last completed checkpoint without
    /// asking the old job; works when the old job is unhealthy), or `stateless` (start empty).
    #[serde(default)]
    pub upgrade_mode: UpgradeMode,

    /// Where keyed state lives while the job runs: `rocksdb` (on the worker's disk, any size;
    /// incremental checkpoints) or `heap` (in the worker's memory, per key group: the fastest
    /// for small state; each checkpoint is a full copy). A savepoint restores into either, so
    /// a job changes its backend through a savepoint; a checkpoint restores only into the
    /// backend that took it.
    #[serde(default, skip_serializing_if = "is_default")]
    pub state_backend: StateBackendKind,

    /// The job's operators and how they connect.
    pub pipeline: Pipeline,

    /// How and where the job takes checkpoints.
    #[serde(default, skip_serializing_if = "is_default")]
    pub checkpointing: CheckpointingSpec,

    /// Savepoints: where they go, when they are taken, how long they are kept.
    #[serde(default, skip_serializing_if = "is_default")]
    pub savepoints: SavepointsSpec,

    /// State to start from when the job has none of its own yet: a StreamSnapshot or a path.
    /// When empty, a job created again with the name of a deleted one starts from that job's
    /// latest StreamSnapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore: Option<RestoreSpec>,

    /// How the job restarts after a failure (a lost worker, a crashed task, too many failed
    /// checkpoints): it always restarts from the last completed checkpoint.
    #[serde(default, skip_serializing_if = "is_default")]
    pub restart_strategy: RestartStrategy,

    /// Change this number to restart the job from its last completed checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restart_nonce: Option<i64>,

    /// Upgrade behaviour: how long a new version has to start running before it is rolled
    /// back.
    #[serde(default, skip_serializing_if = "is_default")]
    pub upgrade: UpgradeSpec,

    /// S3 endpoint, region and credentials, for checkpoint, savepoint and job data on S3.
    /// What is left out comes from the standard AWS environment of the pods (`AWS_REGION`,
    /// `AWS_ENDPOINT_URL`, ...); a region is needed from one or the other.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Spec>,

    /// Compute resources of the coordinator and worker containers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<PodResources>,

    /// A Pod template merged into the coordinator and worker pods (labels, annotations,
    /// node selector, tolerations, service account, extra env and volumes, sidecars), as a
    /// JSON merge patch over the pods Weir builds, with containers merged by name (the
    /// runtime's are `coordinator` and `worker`; another name adds a sidecar). What it sets
    /// wins, so leave the runtime containers' image, args and ports to Weir (set `image`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub pod_template: Option<serde_json::Value>,

    /// The NetworkPolicy `<job>-ingress` the operator creates for the job's pods, on by
    /// default. Changing it is no upgrade: the pods keep running.
    #[serde(default, skip_serializing_if = "is_default")]
    pub network_policy: NetworkPolicySpec,
}

fn default_parallelism() -> i32 {
    1
}

/// When the runtime image is pulled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ImagePullPolicy {
    Always,
    IfNotPresent,
    Never,
}

/// The state the user wants the job in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DesiredState {
    /// The job runs.
    #[default]
    Running,
    /// The job is stopped with a savepoint and its pods are removed.
    Suspended,
}

/// Where a job keeps its keyed state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum StateBackendKind {
    /// RocksDB on the worker's disk.
    #[default]
    Rocksdb,
    /// Maps in the worker's memory, one per key group.
    Heap,
}

impl StateBackendKind {
    /// Its name in `spec.stateBackend`.
    pub fn as_str(self) -> &'static str {
        match self {
            StateBackendKind::Rocksdb => "rocksdb",
            StateBackendKind::Heap => "heap",
        }
    }
}

impl std::fmt::Display for StateBackendKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a job moves to a new spec.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum UpgradeMode {
    /// Stop with a savepoint, start the new spec from it.
    #[default]
    Savepoint,
    /// Start the new spec from the last completed checkpoint, without asking the old job.
    LastState,
    /// Start the new spec with empty state.
    Stateless,
}

/// Checkpointing settings. Defaults follow Flink's where Flink has one.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::checkpointing)]
pub struct CheckpointingSpec {
    /// Time between the start of one checkpoint and the next. `0s` turns checkpoints off, and
    /// savepoints with them (the coordinator refuses a savepoint of a job that takes no
    /// checkpoints), so the operator takes `0s` only with `upgradeMode: stateless`.
    #[serde(default = "default_checkpoint_interval")]
    pub interval: Duration,

    /// `exactly-once` aligns barriers so that every record is in the state exactly once;
    /// `at-least-once` skips alignment (faster under skew, records may be replayed).
    #[serde(default)]
    pub mode: CheckpointMode,

    /// A checkpoint not completed within this time is abandoned and counts as failed.
    #[serde(default = "default_checkpoint_timeout")]
    pub timeout: Duration,

    /// Least time between the end of one checkpoint and the start of the next.
    #[serde(default = "Duration::default")]
    pub min_pause: Duration,

    /// Most checkpoints in flight at once.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 64))]
    pub max_concurrent: i32,

    /// Consecutive failed checkpoints tolerated before the job restarts from the last
    /// completed one.
    #[serde(default)]
    #[schemars(range(min = 0))]
    pub tolerable_failures: i32,

    /// Let barriers overtake buffered records, storing those records with the checkpoint, so
    /// that checkpoints complete under backpressure.
    #[serde(default)]
    pub unaligned: bool,

    /// With `unaligned: true`: start each checkpoint aligned and switch to unaligned once
    /// alignment takes longer than this; `0s` means unaligned from the start.
    #[serde(default = "Duration::default")]
    pub alignment_timeout: Duration,

    /// Upload only the RocksDB files that earlier checkpoints do not already hold.
    #[serde(default = "yes")]
    pub incremental: bool,

    /// Number of completed checkpoints to keep.
    #[serde(default = "one")]
    #[schemars(range(min = 1, max = 100))]
    pub retained: i32,

    /// Where checkpoints go: `s3://bucket/prefix`, or a local directory (an absolute path or
    /// `file:///path`) for `weir run` on one machine. When empty: the operator's default
    /// checkpoint storage in a cluster, `/var/tmp/weir/checkpoints` for `weir run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage: Option<StorageUri>,

    /// What happens to the job's checkpoints when it is stopped without a savepoint
    /// (`weir run` stopped by Ctrl-C; in a cluster, the StreamJob deleted without a final
    /// savepoint tried): `retain` keeps them in storage; `delete` deletes the checkpoint
    /// directory of the run that stopped, `<storage>/<namespace>/<name>/<job-id>/` (in a
    /// cluster the controller does, once the job's pods are gone). Savepoints are never
    /// deleted by this. Changing it is no upgrade.
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(extend("default" = "retain"))]
    pub on_cancel: OnCancel,
}

/// What happens to a job's checkpoints when it is stopped without a savepoint. *Flink:*
/// `RETAIN_ON_CANCELLATION` and `DELETE_ON_CANCELLATION`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnCancel {
    /// Keep the checkpoints in storage.
    #[default]
    Retain,
    /// Delete the checkpoint directory of the run that was stopped.
    Delete,
}

fn default_checkpoint_interval() -> Duration {
    Duration::from_secs(10)
}
fn default_checkpoint_timeout() -> Duration {
    Duration::from_secs(600)
}
fn one() -> i32 {
    1
}
fn yes() -> bool {
    true
}

impl Default for CheckpointingSpec {
    fn default() -> Self {
        Self {
            interval: default_checkpoint_interval(),
            mode: CheckpointMode::default(),
            timeout: default_checkpoint_timeout(),
            min_pause: Duration::default(),
            max_concurrent: 1,
            tolerable_failures: 0,
            unaligned: false,
            alignment_timeout: Duration::default(),
            incremental: true,
            retained: 1,
            storage: None,
            on_cancel: OnCancel::Retain,
        }
    }
}

/// Processing guarantee of checkpoints.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum CheckpointMode {
    #[default]
    ExactlyOnce,
    AtLeastOnce,
}

/// Savepoint settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavepointsSpec {
    /// Where savepoints go (`s3://bucket/prefix` or a local directory). When empty:
    /// `savepoints` beside the checkpoint storage (`s3://b/p/checkpoints` gives
    /// `s3://b/p/savepoints`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub directory: Option<StorageUri>,

    /// Change this number to take a savepoint now; it is recorded as a StreamSnapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_nonce: Option<i64>,

    /// Take a savepoint periodically at this interval. When empty, only on request and on
    /// upgrades.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<Duration>,

    /// The controller gives up on a savepoint not completed within this time (`0s`: no
    /// limit) and counts it as failed; the job keeps running. A stopping savepoint (an
    /// upgrade's, a suspend's) is then tried again with back-off.
    #[serde(default = "default_savepoint_timeout")]
    pub timeout: Duration,

    /// Which StreamSnapshots of this job are kept; the controller deletes the others and
    /// their data. Never deleted: the newest, one marked `keep`, one imported by hand (no
    /// reason), and one the job may restore from.
    #[serde(default, skip_serializing_if = "is_default")]
    pub retention: SnapshotRetention,
}

fn default_savepoint_timeout() -> Duration {
    Duration::from_secs(600)
}

impl Default for SavepointsSpec {
    fn default() -> Self {
        Self {
            directory: None,
            trigger_nonce: None,
            interval: None,
            timeout: default_savepoint_timeout(),
            retention: SnapshotRetention::default(),
        }
    }
}

/// Retention of a job's StreamSnapshots, by count and by age.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SnapshotRetention {
    /// Keep at most this many snapshots.
    #[serde(default = "default_retention_count")]
    #[schemars(range(min = 1))]
    pub max_count: i32,
    /// Delete snapshots older than this.
    #[serde(default = "default_retention_age")]
    pub max_age: Duration,
}

fn default_retention_count() -> i32 {
    10
}
fn default_retention_age() -> Duration {
    Duration::from_secs(86_400)
}

impl Default for SnapshotRetention {
    fn default() -> Self {
        Self { max_count: default_retention_count(), max_age: default_retention_age() }
    }
}

/// Where a job's first state comes from.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
#[schemars(transform = rules::restore)]
pub struct RestoreSpec {
    /// Name of a StreamSnapshot in the job's namespace to start from (its phase must be
    /// Completed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Path of a savepoint or checkpoint to start from (`s3://...` or a local directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StorageUri>,
    /// Start even when the snapshot holds state of an operator uid that the pipeline no
    /// longer has; that state is dropped.
    #[serde(default)]
    pub allow_non_restored_state: bool,
    /// When the job resumes from its own checkpoints (the operator's coordinators always do,
    /// `weir run --resume`) and a checkpoint's metadata is damaged or not signed by the job's
    /// secret: resume from the newest usable checkpoint (when there is none, from the run's
    /// restore point or from the beginning) instead of refusing to start. Output committed
    /// after that checkpoint is written again. Changing it is an upgrade.
    #[serde(default, skip_serializing_if = "is_default")]
    #[schemars(extend("default" = false))]
    pub resume_from_older: bool,
}

/// How a failed job restarts. Every restart is from the last completed checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestartStrategy {
    /// `exponential-delay` (the delay grows after each failure and resets after a healthy
    /// period), `fixed-delay` (a fixed delay, a limited number of attempts), `failure-rate`
    /// (give up when failures in an interval exceed a limit), or `none` (fail the job).
    #[serde(default, rename = "type")]
    pub kind: RestartStrategyType,
    /// First delay (exponential-delay) or the delay (fixed-delay, failure-rate).
    #[serde(default = "default_restart_delay")]
    pub delay: Duration,
    /// exponential-delay: the largest delay.
    #[serde(default = "default_restart_max_delay")]
    pub max_delay: Duration,
    /// exponential-delay: factor applied to the delay after each failure.
    #[serde(default = "default_backoff_multiplier")]
    #[schemars(range(min = 1.0, max = 100.0))]
    pub backoff_multiplier: f64,
    /// exponential-delay: running this long without failure resets the delay.
    #[serde(default = "default_reset_after")]
    pub reset_after: Duration,
    /// exponential-delay: random share added to or taken from each delay, 0 to 1.
    #[serde(default = "default_jitter")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub jitter: f64,
    /// fixed-delay: restarts before the job fails.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 0))]
    pub attempts: i32,
    /// failure-rate: failures allowed within `failureRateInterval` before the job fails.
    #[serde(default = "one")]
    #[schemars(range(min = 1))]
    pub max_failures_per_interval: i32,
    /// failure-rate: the interval over which failures are counted.
    #[serde(default = "default_restart_max_delay")]
    pub failure_rate_interval: Duration,
}

fn default_restart_delay() -> Duration {
    Duration::from_secs(1)
}
fn default_restart_max_delay() -> Duration {
    Duration::from_secs(60)
}
fn default_backoff_multiplier() -> f64 {
    1.5
}
fn default_reset_after() -> Duration {
    Duration::from_secs(3600)
}
fn default_jitter() -> f64 {
    0.1
}
fn default_attempts() -> i32 {
    3
}

impl Default for RestartStrategy {
    fn default() -> Self {
        Self {
            kind: RestartStrategyType::default(),
            delay: default_restart_delay(),
            max_delay: default_restart_max_delay(),
            backoff_multiplier: default_backoff_multiplier(),
            reset_after: default_reset_after(),
            jitter: default_jitter(),
            attempts: default_attempts(),
            max_failures_per_interval: 1,
            failure_rate_interval: default_restart_max_delay(),
        }
    }
}

/// The kinds of restart strategy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartStrategyType {
    #[default]
    ExponentialDelay,
    FixedDelay,
    FailureRate,
    None,
}

/// Upgrade behaviour.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeSpec {
    /// A new version that does not report Running within this time of its objects being
    /// applied (or that fails on start) is rolled back to the last stable spec, from the state
    /// it started from: the upgrade's savepoint, or the last checkpoint in last-state mode. A
    /// new version that completed a checkpoint is not rolled back (Degraded UpgradeFailed).
    #[serde(default = "default_ready_timeout")]
    pub ready_timeout: Duration,
}

fn default_ready_timeout() -> Duration {
    Duration::from_secs(300)
}

impl Default for UpgradeSpec {
    fn default() -> Self {
        Self { ready_timeout: default_ready_timeout() }
    }
}

/// The job's NetworkPolicy.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Create the NetworkPolicy: ingress to the job's pods only from the job's own pods
    /// (ports 6123, control, and 6124, data) and from the operator's namespace (port 8081, the
    /// coordinator's API), everything else into them refused; egress left open. `false`
    /// deletes it. It takes effect only where the cluster's network plugin enforces
    /// NetworkPolicies.
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for NetworkPolicySpec {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// S3 connection settings. Anything left empty comes from the standard AWS environment
/// (`AWS_ENDPOINT_URL`, `AWS_REGION`, ...) of the runtime pods.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Spec {
    /// Endpoint URL of an S3-compatible server, e.g. `https://minio.storage:9000`. Empty
    /// means AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^https?://[^\s/]+(/.*)?$"))]
    pub endpoint: Option<String>,
    /// Region, e.g. `eu-west-1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Address buckets as `endpoint/bucket` rather than `bucket.endpoint`. When empty: true
    /// when an endpoint is given, false for AWS S3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub force_path_style: Option<bool>,
    /// Secret in the job's namespace holding the access key. The pods get its keys as
    /// `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY` (and `AWS_SESSION_TOKEN`) from the
    /// Secret; the controller reads them to delete expired savepoints. Never copied into
    /// logs, status or events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_secret: Option<S3CredentialsRef>,
    /// `when-supported` sends request checksums on every upload; `when-required` only where
    /// the API needs them, for S3-compatible servers that reject them.
    #[serde(default)]
    pub request_checksums: RequestChecksums,
}

/// A reference to the keys of a Secret that hold S3 credentials.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3CredentialsRef {
    /// Name of the Secret, in the job's namespace.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
    /// Key of the access key id in the Secret.
    #[serde(default = "default_access_key_key")]
    pub access_key_id_key: String,
    /// Key of the secret access key in the Secret.
    #[serde(default = "default_secret_key_key")]
    pub secret_access_key_key: String,
    /// Key of a session token in the Secret, for temporary credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_token_key: Option<String>,
}

fn default_access_key_key() -> String {
    "AWS_ACCESS_KEY_ID".into()
}
fn default_secret_key_key() -> String {
    "AWS_SECRET_ACCESS_KEY".into()
}

/// When uploads carry request checksums.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RequestChecksums {
    #[default]
    WhenSupported,
    WhenRequired,
}

/// Compute resources of the job's containers.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodResources {
    /// Resources of the coordinator container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator: Option<ContainerResources>,
    /// Resources of each worker container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<ContainerResources>,
}

/// Requests and limits of one container, as in a Pod (`{cpu: 500m, memory: 1Gi}`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ContainerResources {
    /// Resources the container is guaranteed, e.g. `{cpu: 500m, memory: 1Gi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    pub requests: BTreeMap<String, Quantity>,
    /// Most resources the container may use, e.g. `{memory: 2Gi}`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(schema_with = "quantity_map")]
    pub limits: BTreeMap<String, Quantity>,
}

// ---------------------------------------------------------------------------------------------
// Status

/// What the controller observed and did. Written only when something changed.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamJobStatus {
    /// The metadata.generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// Where the job is in its lifecycle.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<JobPhase>,

    /// Ready (the job runs and checkpoints), Progressing (a change is being rolled out),
    /// Degraded (something needs attention; the message says what).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,

    /// The running job, as its coordinator reports it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job: Option<RunningJob>,

    /// The number of key groups in force: fixed once the job has state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_parallelism: Option<i32>,

    /// The last completed checkpoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_checkpoint: Option<CheckpointInfo>,

    /// The last completed savepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_savepoint: Option<SavepointInfo>,

    /// A savepoint requested and not finished yet (recorded before it is requested).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub savepoint_in_progress: Option<SavepointInProgress>,

    /// What the job's objects were last built from: written before they are applied.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deployed: Option<DeployedRun>,

    /// The upgrade in progress, step by step (each step recorded before it is taken).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upgrade: Option<UpgradeProgress>,

    /// The spec of the last version that ran and became ready; an upgrade that fails rolls
    /// back to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "preserve_unknown_object")]
    pub last_stable_spec: Option<serde_json::Value>,

    /// The metadata.generation of `lastStableSpec`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_stable_generation: Option<i64>,

    /// The last upgrade that was rolled back, while the spec still asks for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rolled_back: Option<RolledBack>,

    /// The `restartNonce` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_restart_nonce: Option<i64>,

    /// The `savepoints.triggerNonce` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_savepoint_nonce: Option<i64>,

    /// Number of workers connected to the coordinator (scale subresource).
    #[serde(default)]
    pub replicas: i32,

    /// Label selector of the worker pods (scale subresource, for HorizontalPodAutoscalers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
}

/// Where the job is in its lifecycle: `Created` (accepted, nothing deployed yet),
/// `Deploying` (pods starting, or the job restoring), `Running`, `Finished` (a bounded job's
/// sources are exhausted and its output committed), `Upgrading` (moving to a new spec),
/// `Suspended` (stopped, no pods), `Failed` (the conditions say why), `RollingBack` (a new
/// version failed to run; going back to the last stable spec).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum JobPhase {
    /// Accepted, nothing deployed yet.
    Created,
    /// Pods are being created or the job is being restored.
    Deploying,
    /// The job runs.
    Running,
    /// A bounded job ended after its sources were exhausted; its output is committed.
    Finished,
    /// Moving to a new spec.
    Upgrading,
    /// Stopped with a savepoint, no pods.
    Suspended,
    /// Stopped by failure; the conditions say why.
    Failed,
    /// A new version failed to become ready; going back to the last stable spec.
    RollingBack,
}

/// The job as its coordinator reports it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RunningJob {
    /// Job id of the run, under which its checkpoints are stored: an upgrade or a suspend in
    /// savepoint or stateless mode starts a new one, last-state mode keeps it.
    pub id: String,
    /// Parallelism the job runs at.
    pub parallelism: i32,
    /// When this run started.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    /// Restarts from a checkpoint since this run started.
    #[serde(default)]
    pub restarts: i64,
}

/// A completed checkpoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CheckpointInfo {
    /// Checkpoint id, increasing within a run.
    pub id: i64,
    /// When it completed.
    pub completed_at: Time,
    /// Total size of the state it refers to, in bytes.
    #[serde(default)]
    pub size_bytes: i64,
    /// Where its metadata is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
}

/// A completed savepoint.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavepointInfo {
    /// The StreamSnapshot that records it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot: Option<String>,
    /// Where it is.
    pub path: String,
    /// When it completed.
    pub completed_at: Time,
    /// Why it was taken.
    pub reason: SavepointReason,
}

/// Why the savepoint was taken: `Requested` (`savepoints.triggerNonce` changed), `Periodic`
/// (`savepoints.interval` elapsed), `Upgrade` (an upgrade in savepoint mode), `Suspend`
/// (`state: suspended`) or `Deletion` (the StreamJob was deleted). Empty for a savepoint
/// imported by hand.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SavepointReason {
    /// `savepoints.triggerNonce` changed.
    Requested,
    /// `savepoints.interval` elapsed.
    Periodic,
    /// An upgrade in savepoint mode.
    Upgrade,
    /// `state: suspended`.
    Suspend,
    /// The StreamJob was deleted.
    Deletion,
}

/// A savepoint recorded before it is requested from the coordinator.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SavepointInProgress {
    /// Why it is taken.
    pub reason: SavepointReason,
    /// Whether the job stops with it.
    #[serde(default)]
    pub stop: bool,
    /// The coordinator's id for it, once the coordinator accepted the request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trigger_id: Option<String>,
    /// The run id (`GET /v1/job`'s `runId`) of the coordinator that took the request,
    /// recorded with `triggerId`: a coordinator answering with another run id restarted, and
    /// the savepoint is lost (failed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_id: Option<String>,
    /// The spec generation it was taken for.
    pub generation: i64,
    /// When it was first requested.
    pub requested_at: Time,
    /// Failed attempts so far (a failed savepoint is retried with backoff).
    #[serde(default)]
    pub failed_attempts: i32,
    /// Why the last attempt failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure: Option<String>,
    /// The idempotency key the request carries (new for each attempt): a controller that
    /// died after asking asks again with it and gets the same savepoint.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub request_id: Option<String>,
}

/// The version of the job its objects run, as the controller decided it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DeployedRun {
    /// The metadata.generation of the spec the objects were built from.
    pub generation: i64,
    /// Hash of the objects the spec builds (without the job id and restore path): a spec
    /// change that changes it is an upgrade; one that does not (a nonce, retention) is not.
    pub spec_hash: String,
    /// The job id the pods run under (it names the checkpoints). A savepoint or stateless
    /// upgrade starts a new one; last-state keeps it.
    pub job_id: String,
    /// The savepoint or checkpoint the run started from, when it had no checkpoint of its
    /// own yet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_path: Option<String>,
    /// Uids of the operators that keep state in this version: a new version must claim them
    /// or allow non-restored state.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub stateful_uids: Vec<String>,
    /// `maxParallelism` of this version.
    pub max_parallelism: i32,
    /// `stateBackend` of this version: its checkpoints restore only into it.
    #[serde(default, skip_serializing_if = "is_default")]
    pub state_backend: StateBackendKind,
}

/// An upgrade in progress.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UpgradeProgress {
    /// The generation being left.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_generation: Option<i64>,
    /// The generation being rolled out.
    pub to_generation: i64,
    /// The upgrade mode in force.
    pub mode: UpgradeMode,
    /// The step the upgrade is at; recorded before the step is taken.
    pub step: UpgradeStep,
    /// The state the new version starts from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restore_path: Option<String>,
    /// When the upgrade started.
    pub started_at: Time,
    /// When the new version's objects were applied: it has `upgrade.readyTimeout` from then
    /// to run, or it is rolled back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub applied_at: Option<Time>,
    /// The run id of the coordinator that ran when the upgrade started: the new version is
    /// a coordinator with another (in last-state mode both have the same job id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_run_id: Option<String>,
    /// True when this is the way back to the last stable spec after a failed upgrade (which
    /// is not rolled back again).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub rollback: bool,
}

/// A version that failed to become ready and was rolled back. The controller does not try
/// that spec again: a change of the spec (or back to the stable one) clears it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolledBack {
    /// The generation that failed.
    pub generation: i64,
    /// `deployed.specHash` of that generation.
    pub spec_hash: String,
    /// The generation of the stable spec the job went back to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to_generation: Option<i64>,
    /// Why the new version was rolled back.
    pub reason: String,
    /// When.
    pub at: Time,
}

/// The steps of an upgrade, in order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum UpgradeStep {
    /// The new spec passed the pre-flight checks; nothing stopped yet.
    Accepted,
    /// Stop-with-savepoint requested from the old job.
    SavepointRequested,
    /// The old job stopped; `restorePath` holds its state.
    OldJobStopped,
    /// The new spec's objects are applied.
    NewSpecApplied,
    /// The new job is restoring and has not been ready yet.
    Restoring,
}

// ---------------------------------------------------------------------------------------------
// Checks that the schema cannot express

/// A spec that breaks a rule; the message names the field. The apiserver refuses the same
/// (but the ranges, which its schema refuses in its own words) with the same message
/// ([`crate::rules`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpecError {
    ParallelismAboveMax {
        parallelism: i32,
        max_parallelism: i32,
    },
    ParallelismOutOfRange(i32),
    MaxParallelismOutOfRange(i32),
    /// A list longer than the schema allows: `field` names it.
    TooMany {
        field: String,
        count: usize,
        max: usize,
    },
    Pipeline(PipelineError),
    RestoreBoth,
    UnalignedAtLeastOnce,
}

impl fmt::Display for SpecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = match self {
            SpecError::ParallelismAboveMax { parallelism, max_parallelism } => {
                PARALLELISM_ABOVE_MAX
                    .render(&[("parallelism", parallelism), ("maxParallelism", max_parallelism)])
            }
            SpecError::ParallelismOutOfRange(p) => {
                format!("spec.parallelism {p} is out of range: it must be from 1 to 32768")
            }
            SpecError::MaxParallelismOutOfRange(m) => {
                format!("spec.maxParallelism {m} is out of range: it must be from 1 to 32768")
            }
            SpecError::TooMany { field, count, max } => {
                TOO_MANY.render(&[("field", field), ("count", count), ("max", max)])
            }
            SpecError::Pipeline(e) => PIPELINE.render(&[("error", e)]),
            SpecError::RestoreBoth => RESTORE_BOTH.0.to_string(),
            SpecError::UnalignedAtLeastOnce => UNALIGNED_AT_LEAST_ONCE.0.to_string(),
        };
        f.write_str(&text)
    }
}

impl std::error::Error for SpecError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            SpecError::Pipeline(e) => Some(e),
            _ => None,
        }
    }
}

impl From<PipelineError> for SpecError {
    fn from(e: PipelineError) -> Self {
        SpecError::Pipeline(e)
    }
}

impl StreamJobSpec {
    /// The number of key groups this spec asks for: `maxParallelism`, or the default for its
    /// parallelism.
    pub fn effective_max_parallelism(&self) -> i32 {
        self.max_parallelism.unwrap_or_else(|| {
            default_max_parallelism(self.parallelism.clamp(1, MAX_MAX_PARALLELISM as i32) as u32)
                as i32
        })
    }

    /// Checks the rules between fields that the apiserver checks in CEL (again: a StreamJob
    /// stored before a rule existed, or by an apiserver without CEL, and `weir run`, which
    /// has no apiserver), the bounds of the lists, and what CEL cannot: parallelism within
    /// maxParallelism, the pipeline's graph, restore naming one source. A job that names its
    /// own image may use operator types that are not built in (the image's binary checks
    /// them when the job starts).
    pub fn validate(&self) -> Result<(), SpecError> {
        self.validate_types(self.image.is_some())
    }

    /// [`Self::validate`], with `open_types` saying whether a type that is not built in
    /// passes (the runtime passes it, and checks the types against its registry itself).
    pub fn validate_types(&self, open_types: bool) -> Result<(), SpecError> {
        if !(1..=MAX_MAX_PARALLELISM as i32).contains(&self.parallelism) {
            return Err(SpecError::ParallelismOutOfRange(self.parallelism));
        }
        if let Some(m) = self.max_parallelism
            && !(1..=MAX_MAX_PARALLELISM as i32).contains(&m)
        {
            return Err(SpecError::MaxParallelismOutOfRange(m));
        }
        let max = self.effective_max_parallelism();
        if self.parallelism > max {
            return Err(SpecError::ParallelismAboveMax {
                parallelism: self.parallelism,
                max_parallelism: max,
            });
        }
        let ops = &self.pipeline.operators;
        if ops.len() > MAX_OPERATORS {
            return Err(SpecError::TooMany {
                field: "spec.pipeline.operators".into(),
                count: ops.len(),
                max: MAX_OPERATORS,
            });
        }
        if let Some((i, op)) = ops.iter().enumerate().find(|(_, o)| o.inputs.len() > MAX_INPUTS) {
            return Err(SpecError::TooMany {
                field: format!("spec.pipeline.operators[{i}].inputs"),
                count: op.inputs.len(),
                max: MAX_INPUTS,
            });
        }
        self.pipeline.validate_graph(open_types)?;
        if let Some(r) = &self.restore
            && r.snapshot.is_some()
            && r.path.is_some()
        {
            return Err(SpecError::RestoreBoth);
        }
        if self.checkpointing.unaligned && self.checkpointing.mode == CheckpointMode::AtLeastOnce {
            return Err(SpecError::UnalignedAtLeastOnce);
        }
        Ok(())
    }
}
