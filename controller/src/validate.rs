//! Validate: the checks a StreamJob must pass before anything is created or changed, beyond
//! what the CRD's schema already refused at `kubectl apply`.
//!
//! Pure: the only input from the cluster is what [`Observed`] holds (read beforehand). A
//! refusal names the field and says what to do; the reconciler turns it into a Degraded
//! condition and a Warning event, and leaves a running job untouched.

use std::collections::BTreeMap;
use weir_crds::streamjob::{DeployedRun, StreamJobStatus};

use k8s_openapi::ByteString;
use weir_crds::streamjob::{DesiredState, UpgradeMode};
use weir_crds::{SpecError, StorageUri, StreamJob, rules};

/// What validation needs to know about the cluster.
#[derive(Debug, Default, Clone)]
pub struct Observed {
    /// The data keys of the Secret named by `spec.s3.credentialsSecret`, when it exists.
    pub credentials_secret: Option<BTreeMap<String, ByteString>>,
}

/// Operator-wide defaults a spec may rely on.
#[derive(Debug, Default, Clone)]
pub struct Defaults {
    /// Checkpoint storage of jobs that set none (`--default-checkpoint-storage`).
    pub checkpoint_storage: Option<StorageUri>,
}

/// A refused spec.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct Invalid {
    /// The field at fault (`spec.maxParallelism`), for the event and the tests.
    pub field: String,
    /// The whole message: names the field and the value, and says what to do.
    pub message: String,
    /// True when the fix may come from outside the StreamJob (a Secret created later), so
    /// the check is worth repeating without a change of the spec.
    pub external: bool,
}

impl Invalid {
    fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        Invalid { field: field.into(), message: message.into(), external: false }
    }
}

/// The spec after validation: what [`crate::build`] needs on top of the StreamJob.
#[derive(Debug, Clone, PartialEq)]
pub struct Valid {
    /// Where checkpoints go (the spec's, or the operator's default); `None` when the job takes
    /// no checkpoints.
    pub checkpoint_storage: Option<StorageUri>,
    /// The number of key groups.
    pub max_parallelism: i32,
}

/// Checks `job` against the spec's rules: those the CRD's CEL rules refuse at apply too, with
/// the same messages (for a StreamJob they did not check: stored before a rule existed, or by
/// an apiserver without CEL), and those that need the cluster or the operator's defaults.
pub fn validate(
    job: &StreamJob,
    observed: &Observed,
    defaults: &Defaults,
) -> Result<Valid, Invalid> {
    let spec = &job.spec;
    spec.validate().map_err(|e| {
        let text = e.to_string();
        let field = text.split([' ', ':']).next().unwrap_or("spec").to_string();
        Invalid::new(field, text)
    })?;
    // The apiserver refuses the same change (a CEL rule on status.maxParallelism, with the
    // same message): this is for a change it did not check.
    let max_parallelism = spec.effective_max_parallelism();
    if let Some(fixed) = job.status.as_ref().and_then(|s| s.max_parallelism)
        && fixed != max_parallelism
    {
        return Err(Invalid::new(
            "spec.maxParallelism",
            rules::max_parallelism_fixed(spec.max_parallelism, max_parallelism, fixed),
        ));
    }

    let checkpointing = &spec.checkpointing;
    // Savepoints ride on the checkpoint machinery: without checkpoints, every upgrade,
    // suspend and deletion in savepoint mode would fail and be retried for ever, and
    // last-state would have nothing to go on from.
    // (A CEL rule of the CRD refuses the same, with the same message.)
    if checkpointing.interval.is_zero() && spec.upgrade_mode != UpgradeMode::Stateless {
        let mode = match spec.upgrade_mode {
            UpgradeMode::Savepoint => "savepoint",
            _ => "last-state",
        };
        return Err(Invalid::new("spec.checkpointing.interval", rules::checkpoints_off(mode)));
    }
    let checkpoint_storage = if checkpointing.interval.is_zero() {
        None
    } else {
        let storage = checkpointing.storage.clone().or_else(|| defaults.checkpoint_storage.clone());
        match storage {
            None => {
                return Err(Invalid::new(
                    "spec.checkpointing.storage",
                    "spec.checkpointing.storage is not set and the operator has no default: set it to s3://bucket/prefix (pods share no file system)",
                ));
            }
            Some(StorageUri::Local(p)) => {
                return Err(Invalid::new(
                    "spec.checkpointing.storage",
                    format!(
                        "spec.checkpointing.storage {} is a local directory, which the job's pods do not share: set s3://bucket/prefix",
                        p.display()
                    ),
                ));
            }
            Some(s3) => Some(s3),
        }
    };
    if let Some(StorageUri::Local(p)) = &spec.savepoints.directory {
        return Err(Invalid::new(
            "spec.savepoints.directory",
            format!(
                "spec.savepoints.directory {} is a local directory, which outlives no pod: set s3://bucket/prefix",
                p.display()
            ),
        ));
    }
    // Locations among the operators' parameters (a file source's or sink's `path`).
    for (i, op) in spec.pipeline.operators.iter().enumerate() {
        for (key, value) in &op.params {
            let Some(text) = value.as_str() else { continue };
            if !(key == "path" || text.contains("://")) {
                continue;
            }
            if let Err(e) = text.parse::<StorageUri>() {
                return Err(Invalid::new(
                    format!("spec.pipeline.operators[{i}].{key}"),
                    format!("spec.pipeline.operators[{i}].{key} (operator {:?}): {e}", op.uid),
                ));
            }
        }
    }
    // Every operator's parameters, fields and connections, with the runtime's own planner:
    // what `weir run` refuses is refused here, in the same words, before anything deploys.
    // A job with an image of its own may use the types its binary registers: they pass here,
    // and what reads them is checked when the job starts.
    let types: &dyn weir_crds::plan::Extensions = match spec.image {
        Some(_) => &weir_crds::plan::ImageTypes,
        None => &weir_crds::plan::BuiltinOnly,
    };
    if let Err(e) = weir_crds::plan::build_with(spec, None, None, types) {
        let field = spec
            .pipeline
            .operators
            .iter()
            .position(|op| e.uid.as_ref() == Some(&op.uid))
            .map_or_else(
                || "spec.pipeline".to_string(),
                |i| format!("spec.pipeline.operators[{i}]"),
            );
        return Err(Invalid::new(field.clone(), format!("{field}: {e}")));
    }

    if let Some(s3) = &spec.s3 {
        if let Some(endpoint) = &s3.endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(Invalid::new(
                "spec.s3.endpoint",
                format!(
                    "spec.s3.endpoint {endpoint:?} is not a URL: write http://host:port or https://host"
                ),
            ));
        }
        if let Some(secret) = &s3.credentials_secret
            && spec.state == DesiredState::Running
        {
            let field = "spec.s3.credentialsSecret";
            let Some(data) = &observed.credentials_secret else {
                return Err(Invalid {
                    field: field.into(),
                    message: format!(
                        "spec.s3.credentialsSecret.name: Secret {:?} does not exist in namespace {:?}: create it with the keys {} and {}",
                        secret.name,
                        job_namespace(job),
                        secret.access_key_id_key,
                        secret.secret_access_key_key
                    ),
                    external: true,
                });
            };
            let mut keys = vec![
                ("accessKeyIdKey", &secret.access_key_id_key),
                ("secretAccessKeyKey", &secret.secret_access_key_key),
            ];
            if let Some(k) = &secret.session_token_key {
                keys.push(("sessionTokenKey", k));
            }
            for (what, key) in keys {
                if !data.contains_key(key) {
                    return Err(Invalid {
                        field: format!("{field}.{what}"),
                        message: format!(
                            "spec.s3.credentialsSecret.{what}: Secret {:?} has no key {key:?}: add it, or name the key that holds the value",
                            secret.name
                        ),
                        external: true,
                    });
                }
            }
        }
    }
    Ok(Valid { checkpoint_storage, max_parallelism })
}

fn job_namespace(job: &StreamJob) -> &str {
    job.metadata.namespace.as_deref().unwrap_or("default")
}

/// A new `spec.stateBackend` needs a savepoint: an upgrade in `mode` from the last checkpoint
/// (last-state) would hand the new backend a checkpoint of the old one, which it refuses.
pub fn backend_change(
    job: &StreamJob,
    deployed: &DeployedRun,
    status: &StreamJobStatus,
    mode: UpgradeMode,
) -> Result<(), Invalid> {
    let (from, to) = (deployed.state_backend, job.spec.state_backend);
    if from == to || mode != UpgradeMode::LastState || status.last_checkpoint.is_none() {
        return Ok(());
    }
    Err(Invalid::new(
        "spec.stateBackend",
        format!(
            "spec.stateBackend: changing it from {from} to {to} needs a savepoint (a checkpoint restores only into the backend that took it), and this upgrade would go on from the last checkpoint: set spec.upgradeMode: savepoint, with the running job healthy, to change it"
        ),
    ))
}

/// Pre-flight of an upgrade, before anything stops: can the new spec restore the state of
/// the version that runs (`deployed`)?
pub fn preflight(
    job: &StreamJob,
    deployed: &DeployedRun,
    status: &StreamJobStatus,
) -> Result<(), Invalid> {
    let spec = &job.spec;
    backend_change(job, deployed, status, spec.upgrade_mode)?;
    let has_state = status.last_checkpoint.is_some() || status.last_savepoint.is_some();
    let max = spec.effective_max_parallelism();
    if has_state && max != deployed.max_parallelism {
        return Err(Invalid::new(
            "spec.maxParallelism",
            rules::max_parallelism_fixed(spec.max_parallelism, max, deployed.max_parallelism),
        ));
    }
    if spec.parallelism > max {
        return Err(Invalid::new(
            "spec.parallelism",
            SpecError::ParallelismAboveMax { parallelism: spec.parallelism, max_parallelism: max }
                .to_string(),
        ));
    }
    let allow = spec.restore.as_ref().is_some_and(|r| r.allow_non_restored_state);
    if !allow {
        let now: Vec<&str> = spec.pipeline.operators.iter().map(|o| o.uid.as_str()).collect();
        let dropped: Vec<&String> =
            deployed.stateful_uids.iter().filter(|u| !now.contains(&u.as_str())).collect();
        if !dropped.is_empty() {
            return Err(Invalid::new(
                "spec.pipeline.operators",
                format!(
                    "spec.pipeline.operators: the running version keeps state for operator uid(s) {dropped:?}, which the new pipeline does not have: keep their uids, or set spec.restore.allowNonRestoredState: true to drop their state"
                ),
            ));
        }
    }
    Ok(())
}
