//! `StreamSnapshot`: one savepoint as a Kubernetes object. It has no owner reference, so it
//! outlives the job it came from, and a job created again with the same name (or any job
//! whose `spec.restore.snapshot` names it) can start from it.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::storage_uri::StorageUri;
use crate::streamjob::SavepointReason;

/// One savepoint of a StreamJob: where it is and what it holds.
#[derive(CustomResource, Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[kube(
    group = "weir.dev",
    version = "v1alpha1",
    kind = "StreamSnapshot",
    plural = "streamsnapshots",
    namespaced,
    shortname = "ssnap",
    category = "weir",
    status = "StreamSnapshotStatus",
    derive = "PartialEq",
    doc = "One savepoint of a StreamJob, kept after the job is gone so that a job can start from it.",
    printcolumn = r#"{"name":"Job", "type":"string", "jsonPath":".spec.job", "description":"The StreamJob whose state this is"}"#,
    printcolumn = r#"{"name":"Phase", "type":"string", "jsonPath":".status.phase", "description":"Completed, Failed or Disposing"}"#,
    printcolumn = r#"{"name":"Parallelism", "type":"integer", "jsonPath":".spec.parallelism", "description":"Parallelism of the job that took it"}"#,
    printcolumn = r#"{"name":"Path", "type":"string", "jsonPath":".spec.path", "priority":1, "description":"Where the savepoint is"}"#,
    printcolumn = r#"{"name":"Age", "type":"date", "jsonPath":".metadata.creationTimestamp", "description":"Time since the savepoint was recorded"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct StreamSnapshotSpec {
    /// Name of the StreamJob (in this namespace) whose state this is.
    #[schemars(length(min = 1, max = 253))]
    pub job: String,
    /// Id of the run of the job that took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    /// The StreamJob's metadata.generation when it was taken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<i64>,
    /// Where the savepoint is (`s3://...` or a local directory); self-contained, so it can be
    /// copied elsewhere. Immutable: a copy elsewhere is another StreamSnapshot.
    #[schemars(transform = crate::rules::snapshot_path)]
    pub path: StorageUri,
    /// Parallelism of the job that took it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32768))]
    pub parallelism: Option<i32>,
    /// Number of key groups of its keyed state; a job restoring it must have the same.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 32768))]
    pub max_parallelism: Option<i32>,
    /// Operator uids that have state in it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub operator_uids: Vec<String>,
    /// Why it was taken; empty for a savepoint imported by hand.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<SavepointReason>,
    /// Keep it regardless of the job's retention settings.
    #[serde(default)]
    pub keep: bool,
}

/// What the controller knows of the savepoint.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct StreamSnapshotStatus {
    /// Completed (usable), Failed, or Disposing (its data is being deleted by retention).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<SnapshotPhase>,
    /// When the savepoint completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<Time>,
    /// Total size of the savepoint in bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// What went wrong, for a failed snapshot; why retention deletes it, while Disposing, or
    /// why it keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `spec.path` the controller recorded the savepoint with. A snapshot whose
    /// `spec.path` differs (changed where the apiserver does not enforce its immutability) is
    /// refused: neither restored from nor deleted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<StorageUri>,
}

impl StreamSnapshot {
    /// Why the snapshot is refused, when its `spec.path` is not the one recorded with it
    /// ([`crate::rules::SNAPSHOT_PATH_IMMUTABLE`], the CEL rule's words, with both paths).
    pub fn path_changed(&self) -> Option<String> {
        let recorded = self.status.as_ref()?.path.as_ref()?;
        (recorded != &self.spec.path).then(|| {
            format!(
                "StreamSnapshot {}: {} (recorded {recorded}, now {})",
                self.metadata.name.as_deref().unwrap_or_default(),
                crate::rules::SNAPSHOT_PATH_IMMUTABLE,
                self.spec.path
            )
        })
    }
}

/// The phases of a StreamSnapshot.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum SnapshotPhase {
    Completed,
    Failed,
    Disposing,
}
