//! The multi-step operations of a job: upgrades (savepoint, last-state, stateless), suspend
//! and resume, savepoints asked for by nonce, and the final savepoint before deletion.
//!
//! The status is their write-ahead log. Each step is recorded (and the status written) before
//! it is taken, and every step is idempotent or recognises that it was already taken, so a
//! controller killed at any moment resumes where it stopped:
//!
//! ```text
//!   savepoint upgrade   Accepted ─► SavepointRequested ─► OldJobStopped ─► NewSpecApplied ─► done
//!                                  (savepointInProgress:    (restorePath)    (deployed: new
//!                                   triggerId once known)                     job id, restore)
//!   last-state          Accepted ─────────────────────────────────────────► NewSpecApplied ─► done
//!                       (same job id: the new coordinator resumes from the last checkpoint)
//!   stateless           Accepted ─────────────────────────────────────────► NewSpecApplied ─► done
//!                       (a new job id, nothing to restore)
//! ```
//!
//! A new version that does not run within `spec.upgrade.readyTimeout` of NewSpecApplied (or
//! fails on start) is rolled back: `rolledBack`, `deployed` (built from `lastStableSpec`, from
//! the state the failed version started from) and an upgrade with `rollback: true` at
//! NewSpecApplied are recorded in one write, then applied like any new version.
//!
//! A savepoint is driven by `savepointInProgress`: recorded with an idempotency key, then
//! requested with it (a controller that died before recording the answer asks again with the
//! same key and gets the same savepoint), then polled until it completes (a StreamSnapshot
//! records it) or fails (retried with back-off under a new key, the old job left running).

use std::time::Duration;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;
use weir_crds::api::{JobInfo, JobState, SavepointStatus};
use weir_crds::snapshot::{
    SnapshotPhase, StreamSnapshot, StreamSnapshotSpec, StreamSnapshotStatus,
};
use weir_crds::streamjob::{
    DeployedRun, OnCancel, RolledBack, SavepointInProgress, SavepointInfo, SavepointReason,
    StreamJobSpec, StreamJobStatus, UpgradeMode, UpgradeProgress, UpgradeStep,
};
use weir_crds::{LABEL_JOB, StreamJob};

use crate::build::{self, Run};
use crate::validate::{self, Observed, Valid};
use crate::{Context, Error, Step, coordinator, kube_err};

/// Where a savepoint stands after one look.
#[derive(Debug)]
pub enum Savepoint {
    /// Not done yet.
    Pending,
    /// Done: its path.
    Completed(String),
    /// It failed (the job, when it was to stop, keeps running); why.
    Failed(String),
}

/// The run a job's first deployment starts: its own job id, and the state named by
/// `spec.restore`, else the newest snapshot of an earlier job of the same name.
pub async fn first_run(
    ctx: &Context,
    job: &StreamJob,
    ns: &str,
) -> Result<Result<(String, Option<String>), String>, Error> {
    let job_id = crate::build::job_id(job);
    let snaps: Api<StreamSnapshot> = Api::namespaced(ctx.client.clone(), ns);
    if let Some(r) = &job.spec.restore {
        if let Some(p) = &r.path {
            return Ok(Ok((job_id, Some(p.to_string()))));
        }
        if let Some(name) = &r.snapshot {
            let found = snaps
                .get_opt(name)
                .await
                .map_err(kube_err(format!("reading StreamSnapshot {ns}/{name}")))?;
            if let Some(changed) = found.as_ref().and_then(|s| s.path_changed()) {
                return Ok(Err(format!("spec.restore.snapshot: {changed}")));
            }
            return Ok(match found {
                Some(s)
                    if s.status.as_ref().and_then(|s| s.phase)
                        == Some(SnapshotPhase::Completed) =>
                {
                    Ok((job_id, Some(s.spec.path.to_string())))
                }
                Some(_) => Err(format!(
                    "spec.restore.snapshot: StreamSnapshot {name:?} is not a completed savepoint: name a completed one"
                )),
                None => Err(format!(
                    "spec.restore.snapshot: StreamSnapshot {name:?} does not exist in namespace {ns:?}: name one that does (kubectl get streamsnapshots)"
                )),
            });
        }
    }
    // A job created again under a name picks up where the last one of that name stopped.
    let name = job.name_any();
    let list = snaps
        .list(&ListParams::default().labels(&format!("{LABEL_JOB}={name}")))
        .await
        .map_err(kube_err(format!("listing the StreamSnapshots of {ns}/{name}")))?;
    let newest = list
        .items
        .into_iter()
        .filter(|s| s.spec.job == name)
        .filter(|s| s.status.as_ref().and_then(|s| s.phase) == Some(SnapshotPhase::Completed))
        .filter(|s| match s.path_changed() {
            // Never restored from: its path is not the savepoint it recorded.
            Some(changed) => {
                tracing::warn!(namespace = ns, job = %name, "not restored from: {changed}");
                false
            }
            None => true,
        })
        .max_by_key(|s| s.status.as_ref().and_then(|s| s.completed_at.as_ref()).map(|t| t.0));
    Ok(Ok((job_id, newest.map(|s| s.spec.path.to_string()))))
}

/// The deployed run of `job` (its spec now) under `job_id` from `restore_path`.
pub fn deployed(
    job: &StreamJob,
    hash: String,
    max_parallelism: i32,
    job_id: String,
    restore_path: Option<String>,
) -> DeployedRun {
    DeployedRun {
        generation: job.metadata.generation.unwrap_or(0),
        spec_hash: hash,
        job_id,
        restore_path,
        stateful_uids: job.spec.pipeline.stateful_uids(),
        max_parallelism,
        state_backend: job.spec.state_backend,
    }
}

/// How long a job must have been not Ready before a savepoint upgrade whose old job does
/// not answer goes on from the last checkpoint instead (one failed look is not enough).
const NOT_READY_BEFORE_LAST_STATE: i64 = 30;

/// Whether the status has said not Ready (or nothing) for [`NOT_READY_BEFORE_LAST_STATE`].
pub fn long_not_ready(st: &StreamJobStatus, now: Timestamp) -> bool {
    match st.conditions.iter().find(|c| c.type_ == "Ready") {
        Some(c) if c.status == "True" => false,
        Some(c) => {
            now.duration_since(c.last_transition_time.0).as_secs() >= NOT_READY_BEFORE_LAST_STATE
        }
        None => true,
    }
}

/// A metric label for an upgrade mode.
fn mode_label(m: UpgradeMode) -> &'static str {
    match m {
        UpgradeMode::Savepoint => "savepoint",
        UpgradeMode::LastState => "last-state",
        UpgradeMode::Stateless => "stateless",
    }
}

/// A metric label for why a savepoint is taken.
fn reason_label(r: SavepointReason) -> &'static str {
    match r {
        SavepointReason::Requested => "requested",
        SavepointReason::Periodic => "periodic",
        SavepointReason::Upgrade => "upgrade",
        SavepointReason::Suspend => "suspend",
        SavepointReason::Deletion => "deletion",
    }
}

/// How often retention looks at a job's snapshots for age (it also looks after every new
/// savepoint).
const RETENTION_EVERY: Duration = Duration::from_secs(60);

/// Records a savepoint to take (the caller writes the status before calling [`drive`]).
pub fn intend(st: &mut StreamJobStatus, job: &StreamJob, reason: SavepointReason, stop: bool) {
    if st.savepoint_in_progress.is_none() {
        st.savepoint_in_progress = Some(SavepointInProgress {
            reason,
            stop,
            trigger_id: None,
            generation: job.metadata.generation.unwrap_or(0),
            requested_at: now(),
            failed_attempts: 0,
            last_failure: None,
            request_id: None,
            run_id: None,
        });
    }
}

/// How long after a failed savepoint the next attempt is made: 10 s, doubling, at most 5 min.
pub fn backoff(failed_attempts: i32) -> std::time::Duration {
    let s = 10u64.saturating_mul(1 << failed_attempts.clamp(0, 5) as u64).min(300);
    std::time::Duration::from_secs(s)
}

/// Takes the savepoint `st.savepoint_in_progress` records one step further. Writes the
/// status whenever it learns the coordinator's id for it.
pub async fn drive(
    ctx: &Context,
    job: &StreamJob,
    addr: &str,
    st: &mut StreamJobStatus,
    written: &mut StreamJobStatus,
) -> Result<Savepoint, Error> {
    let Some(sp) = st.savepoint_in_progress.clone() else {
        return Ok(Savepoint::Failed("no savepoint is in progress".into()));
    };
    let id = match sp.trigger_id.clone() {
        Some(id) => id,
        None => {
            // After a failure, wait out the back-off before asking again.
            if sp.failed_attempts > 0 {
                let since = Timestamp::now().duration_since(sp.requested_at.0);
                if since.as_secs() < backoff(sp.failed_attempts - 1).as_secs() as i64 {
                    return Ok(Savepoint::Pending);
                }
            }
            // The key goes into the status before the request: a controller that dies after
            // asking asks again with it, and the coordinator answers the same savepoint.
            let key = request_key(&sp);
            if let Some(p) = st.savepoint_in_progress.as_mut() {
                p.request_id = Some(key.clone());
            }
            ctx.save_status(job, written, st).await?;
            // The run the savepoint belongs to: another run id later means the coordinator
            // restarted, and the savepoint went with it.
            let run_id = match coordinator::job(addr).await {
                Ok(i) => i.run_id,
                Err(e) => return Ok(Savepoint::Failed(coordinator::bounded(&e))),
            };
            let token = ctx.api_token(job).await?;
            let id = match coordinator::trigger_savepoint(addr, &token, sp.stop, &key).await {
                Ok(id) => {
                    crash_point("savepoint-requested");
                    id
                }
                Err(e) => return Ok(Savepoint::Failed(coordinator::bounded(&e))),
            };
            if let Some(p) = st.savepoint_in_progress.as_mut() {
                p.trigger_id = Some(id.clone());
                p.run_id = Some(run_id);
            }
            ctx.save_status(job, written, st).await?;
            id
        }
    };
    let Some(sp) = st.savepoint_in_progress.clone() else {
        return Ok(Savepoint::Failed("no savepoint is in progress".into()));
    };
    let run = coordinator::job(addr).await.map(|i| i.run_id);
    let answer = coordinator::savepoint(addr, &id).await;
    let limit = job.spec.savepoints.timeout.as_std();
    let verdict = judge(&sp, &id, &run, &answer, limit, Timestamp::now());
    match (&verdict, &answer) {
        (Savepoint::Completed(p), Ok(Some(info))) => {
            record(ctx, job, st, info, p, sp.reason).await?;
            ctx.metrics.savepoints.with_label_values(&[reason_label(sp.reason), "completed"]).inc();
        }
        (Savepoint::Pending, Err(e)) => {
            tracing::info!(job = %job.name_any(), "reading savepoint {id}: {e}");
        }
        _ => {}
    }
    Ok(verdict)
}

/// Where savepoint `id` (what `sp` records) stands after one look: `run` is the run id the
/// coordinator answers now, `answer` its `GET /v1/savepoints/{id}` (`None`: 404). A
/// coordinator of another run than the one that took the request (it restarted), or one
/// that does not know the savepoint, lost it: failed. Every wait (in progress, coordinator
/// unreachable) ends at `limit` (`spec.savepoints.timeout`, 0: none) after the request:
/// failed too. The caller goes on by the rules of the upgrade mode.
pub fn judge(
    sp: &SavepointInProgress,
    id: &str,
    run: &Result<String, String>,
    answer: &Result<Option<weir_crds::api::SavepointInfo>, String>,
    limit: Duration,
    now: Timestamp,
) -> Savepoint {
    if let (Ok(now_run), Some(then)) = (run, sp.run_id.as_ref())
        && now_run != then
    {
        return Savepoint::Failed(format!(
            "the coordinator restarted (run {then}, now run {now_run}) after it took savepoint {id}: the savepoint is lost"
        ));
    }
    // From the request: after a failed attempt, from the end of its back-off.
    let pause = if sp.failed_attempts > 0 { backoff(sp.failed_attempts - 1).as_secs() } else { 0 };
    let waited = now.duration_since(sp.requested_at.0).as_secs() - pause as i64;
    let late = |why: String| {
        if !limit.is_zero() && waited > limit.as_secs() as i64 {
            Savepoint::Failed(format!(
                "savepoint {id} did not complete within spec.savepoints.timeout ({} s){why}",
                limit.as_secs()
            ))
        } else {
            Savepoint::Pending
        }
    };
    match answer {
        Ok(Some(info)) => match info.status {
            SavepointStatus::InProgress => late(String::new()),
            SavepointStatus::Completed => match info.path.clone() {
                Some(p) => Savepoint::Completed(p),
                None => Savepoint::Failed(format!("savepoint {id} completed without a path")),
            },
            SavepointStatus::Failed => Savepoint::Failed(coordinator::bounded(
                info.failure.as_deref().unwrap_or(&format!("savepoint {id} failed")),
            )),
        },
        Ok(None) => Savepoint::Failed(format!(
            "the coordinator has no savepoint {id} (404): it restarted after it took the request, and the savepoint is lost"
        )),
        // The coordinator may be restarting; the next look decides, until the timeout.
        Err(e) => late(format!(": the coordinator does not answer ({})", coordinator::bounded(e))),
    }
}

/// The idempotency key of the request `sp` records: its generation, when it was first
/// recorded and the attempt, so that each attempt is a request of its own.
pub fn request_key(sp: &SavepointInProgress) -> String {
    sp.request_id.clone().unwrap_or_else(|| {
        format!("g{}-{}-a{}", sp.generation, sp.requested_at.0.as_second(), sp.failed_attempts)
    })
}

/// After a failed attempt: count it, forget the request, keep the old job.
pub fn failed(st: &mut StreamJobStatus, why: &str) -> i32 {
    match st.savepoint_in_progress.as_mut() {
        Some(p) => {
            p.failed_attempts += 1;
            p.trigger_id = None;
            p.run_id = None;
            p.requested_at = now();
            p.last_failure = Some(coordinator::bounded(why));
            p.request_id = None;
            p.failed_attempts
        }
        None => 0,
    }
}

/// Degraded while a stopping savepoint that failed is tried again: `what` failed, the job
/// goes on, and when the next attempt is.
pub fn retrying(st: &StreamJobStatus, what: &str) -> Option<(&'static str, String)> {
    let p = st.savepoint_in_progress.as_ref().filter(|p| p.failed_attempts > 0)?;
    let n = p.failed_attempts;
    let wait = k8s_openapi::jiff::SignedDuration::from_secs(backoff(n - 1).as_secs() as i64);
    let next = match p.requested_at.0.checked_add(wait) {
        Ok(at) if p.trigger_id.is_none() => format!("the savepoint is tried again at {at}"),
        _ => "it is being tried again".to_string(),
    };
    Some((
        "SavepointFailed",
        format!(
            "{what} failed (attempt {n}): {}; the job goes on running, and {next}",
            p.last_failure.as_deref().unwrap_or("no reason given")
        ),
    ))
}

/// A completed savepoint: a StreamSnapshot (created once; its name comes from the
/// savepoint's id) and `status.lastSavepoint`.
async fn record(
    ctx: &Context,
    job: &StreamJob,
    st: &mut StreamJobStatus,
    info: &weir_crds::api::SavepointInfo,
    path: &str,
    reason: SavepointReason,
) -> Result<(), Error> {
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    let name = job.name_any();
    let snap_name = snapshot_name(&name, &info.id);
    let completed = Time(
        Timestamp::from_millisecond(((info.requested_at + info.duration_ms) / 1000 * 1000) as i64)
            .unwrap_or(Timestamp::UNIX_EPOCH),
    );
    let spec = StreamSnapshotSpec {
        job: name.clone(),
        job_id: st.deployed.as_ref().map(|d| d.job_id.clone()),
        generation: st.deployed.as_ref().map(|d| d.generation),
        path: path
            .parse()
            .map_err(|e| Error::Coordinator(format!("savepoint path {path}: {e}")))?,
        parallelism: st.job.as_ref().map(|j| j.parallelism),
        max_parallelism: st.max_parallelism.or(st.deployed.as_ref().map(|d| d.max_parallelism)),
        operator_uids: st.deployed.as_ref().map(|d| d.stateful_uids.clone()).unwrap_or_default(),
        reason: Some(reason),
        keep: false,
    };
    let mut snap = StreamSnapshot::new(&snap_name, spec);
    snap.metadata.namespace = Some(ns.clone());
    snap.metadata.labels = Some([(LABEL_JOB.to_string(), name.clone())].into());
    let api: Api<StreamSnapshot> = Api::namespaced(ctx.client.clone(), &ns);
    match api.create(&PostParams::default(), &snap).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(kube_err(format!("creating StreamSnapshot {ns}/{snap_name}"))(e)),
    }
    let status = StreamSnapshotStatus {
        phase: Some(SnapshotPhase::Completed),
        completed_at: Some(completed.clone()),
        size_bytes: Some(info.size_bytes as i64),
        message: None,
        // What spec.path must stay (a CEL rule holds it; the controller checks it too).
        path: Some(snap.spec.path.clone()),
    };
    api.patch_status(
        &snap_name,
        &crate::apply_params(),
        &Patch::Apply(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "StreamSnapshot", "status": status,
        })),
    )
    .await
    .map_err(kube_err(format!("writing the status of StreamSnapshot {ns}/{snap_name}")))?;
    st.last_savepoint = Some(SavepointInfo {
        snapshot: Some(snap_name),
        path: path.to_string(),
        completed_at: completed,
        reason,
    });
    st.savepoint_in_progress = None;
    Ok(())
}

/// Makes `new` a JSON merge patch from `old`: every key of an object in `old` that `new`
/// lacks, at any depth, is set to null (a merge patch keeps what it does not mention).
/// Arrays are replaced whole by a merge patch, so they are left as they are.
pub fn null_removed(new: &mut serde_json::Value, old: &serde_json::Value) {
    let (Some(n), Some(o)) = (new.as_object_mut(), old.as_object()) else { return };
    for (k, ov) in o {
        match n.get_mut(k) {
            None => {
                n.insert(k.clone(), serde_json::Value::Null);
            }
            Some(nv) => null_removed(nv, ov),
        }
    }
}

/// For the tests that kill the controller at each step boundary of an upgrade: with
/// `WEIR_CONTROLLER_CRASH_AT` set to a point's name, the process exits (code 86, no clean-up,
/// like a kill) when it gets there. The points: `savepoint-requested` (the coordinator took
/// the request, its id not recorded yet), `savepoint-completed` (OldJobStopped recorded),
/// `new-spec-recorded` (the new run recorded, nothing applied), `objects-applied` (the new
/// objects applied), `restoring` (Restoring recorded).
fn crash_point(name: &str) {
    if std::env::var("WEIR_CONTROLLER_CRASH_AT").is_ok_and(|v| v == name) {
        tracing::warn!("WEIR_CONTROLLER_CRASH_AT={name}: exiting here");
        std::process::exit(86);
    }
}

/// Degraded's reason and message while a version is rolled back, and after.
pub fn rolled_back_problem(r: &RolledBack, rolling: bool) -> (&'static str, String) {
    let to = r.to_generation.unwrap_or(0);
    if rolling {
        ("RollingBack", format!("{}; rolling back to generation {to}", r.reason))
    } else {
        (
            "RolledBack",
            format!(
                "{}; rolled back to generation {to}, which runs; generation {} is not tried again until the spec changes",
                r.reason, r.generation
            ),
        )
    }
}

/// The StreamSnapshot name of savepoint `id` of job `job`.
pub fn snapshot_name(job: &str, id: &str) -> String {
    let mut n = format!("{job}-{}", id.to_ascii_lowercase());
    n.truncate(253);
    n
}

/// The upgrade mode an upgrade uses: the spec's, except that a savepoint cannot be asked of
/// a job that does not run, which then goes on from its last checkpoint.
pub fn mode_for(spec_mode: UpgradeMode, info: Option<&JobInfo>) -> UpgradeMode {
    match (spec_mode, info.map(|i| i.state)) {
        (UpgradeMode::Savepoint, Some(JobState::Running)) => UpgradeMode::Savepoint,
        (UpgradeMode::Savepoint, _) => UpgradeMode::LastState,
        (m, _) => m,
    }
}

/// The Warning's text when a savepoint mode job's savepoint (`what`) is not taken because the
/// job does not run: `deployed` whether its objects (the coordinator's Deployment) exist,
/// `answer` the coordinator's, `job_id` the deployed run's; `then` what happens instead.
pub fn skipped_savepoint(
    what: &str,
    then: &str,
    deployed: bool,
    answer: Option<&Result<JobInfo, String>>,
    job_id: Option<&str>,
) -> String {
    let why = match answer {
        _ if !deployed => {
            "the job's Deployment is already gone, so no coordinator can take it".into()
        }
        None => "the coordinator was not read".into(),
        Some(Err(e)) => format!("the coordinator does not answer ({})", coordinator::bounded(e)),
        Some(Ok(i)) if job_id.is_some_and(|j| j != i.job_id) => format!(
            "the coordinator runs job id {}, not {}",
            coordinator::bounded(&i.job_id),
            job_id.unwrap_or_default()
        ),
        Some(Ok(i)) => format!("the job is {:?}, not running", i.state),
    };
    format!("{what} is skipped: {why}; {then}")
}

/// Whether a job needs the finalizer [`crate::FINALIZER`]: in savepoint mode for its final
/// savepoint, with `spec.checkpointing.onCancel: delete` to delete its checkpoints.
pub fn needs_finalizer(job: &StreamJob) -> bool {
    job.spec.upgrade_mode == UpgradeMode::Savepoint
        || job.spec.checkpointing.on_cancel == OnCancel::Delete
}

/// What became of a deleted job's final savepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinalSavepoint {
    /// None was asked for (not savepoint mode, or the job did not run).
    NotTried,
    /// It completed: the job stopped with a savepoint.
    Taken,
    /// Every attempt failed: the last checkpoint is the job's only state.
    Failed,
}

/// Whether a deleted job's checkpoints go: with `spec.checkpointing.onCancel: delete`, when it
/// stopped without a savepoint tried, and it takes checkpoints. A job stopped with a
/// savepoint was not cancelled; one whose final savepoint failed keeps its last checkpoint,
/// its only state.
pub fn deletes_checkpoints(job: &StreamJob, final_savepoint: FinalSavepoint) -> bool {
    job.spec.checkpointing.on_cancel == OnCancel::Delete
        && final_savepoint == FinalSavepoint::NotTried
        && !job.spec.checkpointing.interval.as_std().is_zero()
}

/// The checkpoint directory of run `job_id` of `job`, `<storage>/<namespace>/<name>/<job-id>`:
/// the job's checkpoint storage, else the operator's default.
pub fn checkpoint_dir(
    job: &StreamJob,
    default_storage: Option<&weir_crds::StorageUri>,
    job_id: &str,
) -> Option<weir_crds::StorageUri> {
    let storage = job.spec.checkpointing.storage.as_ref().or(default_storage)?;
    let ns = job.namespace().unwrap_or_else(|| "default".into());
    Some(storage.join(&format!("{ns}/{}/{job_id}", job.name_any())))
}

/// Whether `path` (a location, as written) is `dir` or below it.
pub fn is_below(path: &str, dir: &weir_crds::StorageUri) -> bool {
    let dir = format!("{}/", dir.to_string().trim_end_matches('/'));
    format!("{}/", path.trim_end_matches('/')).starts_with(&dir)
}

pub fn now() -> Time {
    Time(Timestamp::from_second(Timestamp::now().as_second()).unwrap_or(Timestamp::UNIX_EPOCH))
}

// ---------------------------------------------------------------------------------------------
// The steps, as the reconciler takes them.

impl Context {
    /// Desired state running: deploy, upgrade (and roll back), take the savepoints asked for.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn run(
        &self,
        job: &StreamJob,
        valid: &Valid,
        observed: &Observed,
        info: Option<&Result<JobInfo, String>>,
        st: &mut StreamJobStatus,
        written: &mut StreamJobStatus,
        step: &mut Step,
    ) -> Result<(), Error> {
        let (ns, name, addr) = self.names(job);
        let (ns, name, addr) = (ns.as_str(), name.as_str(), addr.as_str());
        if !self.ensure_secrets(job, ns, name).await? {
            step.requeue = Some(Duration::from_secs(1));
            return Ok(());
        }
        let hash = build::spec_hash(job, valid, &self.config.build);
        let answer = info;
        let info = info.and_then(|r| r.as_ref().ok());
        let generation = job.metadata.generation.unwrap_or(0);
        if st.deployed.is_none() {
            match first_run(self, job, ns).await? {
                Err(message) => {
                    step.problem = Some(("InvalidSpec", message));
                    return Ok(());
                }
                Ok((job_id, restore)) => {
                    st.deployed =
                        Some(deployed(job, hash.clone(), valid.max_parallelism, job_id, restore));
                    self.save_status(job, written, st).await?;
                }
            }
        }
        if needs_finalizer(job) {
            self.add_finalizer(job, ns, name).await?;
        }
        let Some(mut d) = st.deployed.clone() else { return Ok(()) };
        // Before any pod: a job's pods are never up without their NetworkPolicy.
        self.ensure_network_policy(job, ns, name, &mut step.applied).await?;

        // A version rolled back is not tried again while the spec asks for it; any other
        // spec (a fix, or the stable one again) is.
        if st.upgrade.is_none() && st.rolled_back.as_ref().is_some_and(|r| r.spec_hash != hash) {
            st.rolled_back = None;
            self.save_status(job, written, st).await?;
        }
        // What the objects are built from: the spec, or after a rollback the last stable one.
        let stable;
        let (tjob, tvalid, thash) = match &st.rolled_back {
            None => (job, valid, hash.clone()),
            Some(r) => match self.stable(job, st, observed) {
                Ok(s) => {
                    step.problem = Some(rolled_back_problem(r, st.upgrade.is_some()));
                    stable = s;
                    (&stable.0, &stable.1, stable.2.clone())
                }
                Err(why) => {
                    step.problem = Some((
                        "UpgradeFailed",
                        format!(
                            "generation {} was rolled back, but the last stable spec cannot be run: {why}; change the spec",
                            r.generation
                        ),
                    ));
                    return Ok(());
                }
            },
        };

        // A stopping savepoint no upgrade asked for: a suspend taken back while it was under
        // way. Once it completes the job has stopped, and a new run starts from it.
        if st.upgrade.is_none() && st.savepoint_in_progress.as_ref().is_some_and(|p| p.stop) {
            match drive(self, job, addr, st, written).await? {
                Savepoint::Pending => {
                    step.requeue = Some(Duration::from_secs(1));
                    return Ok(());
                }
                Savepoint::Completed(path) => {
                    d.job_id = build::next_job_id(&d.job_id);
                    d.restore_path = Some(path);
                    st.deployed = Some(d.clone());
                    self.save_status(job, written, st).await?;
                }
                Savepoint::Failed(_) => {
                    st.savepoint_in_progress = None;
                    self.save_status(job, written, st).await?;
                }
            }
        }

        // A new spec: an upgrade, once any savepoint under way is done.
        if st.upgrade.is_none() && d.spec_hash != thash && st.savepoint_in_progress.is_none() {
            if let Err(refused) = validate::preflight(job, &d, st) {
                // Counted once per refused spec, not once per reconcile.
                if job.status.as_ref().and_then(|s| s.observed_generation) != Some(generation) {
                    let mode = mode_label(job.spec.upgrade_mode);
                    self.metrics.upgrades.with_label_values(&[mode, "refused"]).inc();
                }
                step.problem = Some(("UpgradeRefused", refused.message));
                return Ok(());
            }
            let old = info.filter(|i| i.job_id == d.job_id);
            // A coordinator that does not answer once is no reason to give up the savepoint:
            // the job must have been not Ready for a while before last-state is the way.
            if job.spec.upgrade_mode == UpgradeMode::Savepoint
                && old.is_none()
                && !long_not_ready(st, Timestamp::now())
            {
                step.requeue = Some(Duration::from_secs(2));
                return Ok(());
            }
            let mode = mode_for(job.spec.upgrade_mode, old);
            // A savepoint upgrade whose old job does not answer would go on from the last
            // checkpoint, which the new backend cannot read: it waits for a savepoint instead.
            if let Err(refused) = validate::backend_change(job, &d, st, mode) {
                step.problem = Some(("UpgradeRefused", refused.message));
                step.requeue = Some(Duration::from_secs(10));
                return Ok(());
            }
            if job.spec.upgrade_mode == UpgradeMode::Savepoint && mode != UpgradeMode::Savepoint {
                let then = "the upgrade goes on from the last checkpoint (last-state)";
                let text = skipped_savepoint(
                    "the upgrade's savepoint",
                    then,
                    step.deployed,
                    answer,
                    Some(&d.job_id),
                );
                self.warn(job, "SavepointSkipped", text).await;
            }
            let mut u = UpgradeProgress {
                from_generation: Some(d.generation),
                to_generation: generation,
                mode,
                step: UpgradeStep::Accepted,
                restore_path: None,
                started_at: now(),
                applied_at: None,
                from_run_id: old.map(|i| i.run_id.clone()),
                rollback: false,
            };
            if mode == UpgradeMode::Savepoint {
                intend(st, job, SavepointReason::Upgrade, true);
                u.step = UpgradeStep::SavepointRequested;
            }
            st.upgrade = Some(u);
            self.save_status(job, written, st).await?;
            self.note(
                job,
                "UpgradeStarted",
                format!(
                    "upgrading from generation {} to {generation} ({mode:?} mode)",
                    d.generation
                ),
            )
            .await;
        }

        while let Some(mut u) = st.upgrade.clone() {
            match (u.mode, u.step) {
                (
                    UpgradeMode::Savepoint,
                    UpgradeStep::Accepted | UpgradeStep::SavepointRequested,
                ) => {
                    intend(st, job, SavepointReason::Upgrade, true);
                    let what = "the upgrade's savepoint";
                    let Some(path) =
                        self.stop_with_savepoint(job, addr, st, written, step, what).await?
                    else {
                        return Ok(());
                    };
                    u.restore_path = Some(path);
                    u.step = UpgradeStep::OldJobStopped;
                }
                (
                    _,
                    UpgradeStep::OldJobStopped
                    | UpgradeStep::Accepted
                    | UpgradeStep::SavepointRequested,
                ) => {
                    let (job_id, restore) = match u.mode {
                        // The new coordinator resumes from the last checkpoint of this job id.
                        UpgradeMode::LastState => (d.job_id.clone(), d.restore_path.clone()),
                        UpgradeMode::Savepoint => {
                            (build::next_job_id(&d.job_id), u.restore_path.clone())
                        }
                        UpgradeMode::Stateless => (build::next_job_id(&d.job_id), None),
                    };
                    d = deployed(job, hash.clone(), valid.max_parallelism, job_id, restore);
                    st.deployed = Some(d.clone());
                    u.step = UpgradeStep::NewSpecApplied;
                    u.applied_at = Some(now());
                }
                (_, UpgradeStep::NewSpecApplied | UpgradeStep::Restoring) => {
                    self.apply_run(tjob, tvalid, ns, &d, tjob.spec.parallelism, step).await?;
                    step.deployed = true;
                    crash_point("objects-applied");
                    // The new version: the deployed job id, another coordinator than the one
                    // the upgrade started from.
                    let new = info.filter(|i| {
                        i.job_id == d.job_id && u.from_run_id.as_ref() != Some(&i.run_id)
                    });
                    let applied = u.applied_at.as_ref().unwrap_or(&u.started_at).0;
                    let waited = Timestamp::now().duration_since(applied).as_secs().max(0) as u64;
                    let limit = job.spec.upgrade.ready_timeout.as_std();
                    let failure = match new {
                        Some(i) if i.state == JobState::Running => {
                            return self.upgraded(job, i, &d, &u, st, written, step).await;
                        }
                        Some(i) if i.state == JobState::Failed => Some(format!(
                            "generation {} failed on start: {}",
                            u.to_generation,
                            i.error
                                .as_deref()
                                .map_or_else(|| "no reason given".into(), coordinator::bounded)
                        )),
                        _ if waited > limit.as_secs() => Some(format!(
                            "generation {} was not running within spec.upgrade.readyTimeout ({} s){}",
                            u.to_generation,
                            limit.as_secs(),
                            match new {
                                Some(i) => format!(": it is {:?}", i.state),
                                None => String::new(),
                            }
                        )),
                        _ => None,
                    };
                    if let Some(why) = failure {
                        return self
                            .roll_back(job, new, &d, &u, why, observed, st, written, step)
                            .await;
                    }
                    if u.step == UpgradeStep::NewSpecApplied {
                        u.step = UpgradeStep::Restoring;
                        st.upgrade = Some(u);
                        self.save_status(job, written, st).await?;
                        crash_point("restoring");
                    }
                    step.requeue = Some(Duration::from_secs(1));
                    return Ok(());
                }
            }
            let at = u.step;
            st.upgrade = Some(u);
            self.save_status(job, written, st).await?;
            match at {
                UpgradeStep::OldJobStopped => crash_point("savepoint-completed"),
                UpgradeStep::NewSpecApplied => crash_point("new-spec-recorded"),
                _ => {}
            }
        }

        // Steady: the objects of the deployed run (created again if someone deleted them; a
        // new restart nonce restarts the coordinator, which resumes from the last checkpoint).
        if d.generation != generation && d.spec_hash == hash {
            d.generation = generation;
            st.deployed = Some(d.clone());
        }
        let over = info.is_some_and(|i| {
            i.job_id == d.job_id && matches!(i.state, JobState::Finished | JobState::Failed)
        }) && st.savepoint_in_progress.is_none();
        let workers = if over { 0 } else { tjob.spec.parallelism };
        if d.spec_hash == thash {
            self.apply_run(tjob, tvalid, ns, &d, workers, step).await?;
            st.observed_restart_nonce = job.spec.restart_nonce;
        }
        let running = info.is_some_and(|i| i.job_id == d.job_id && i.state == JobState::Running);
        // The spec runs: it is what a later failed upgrade rolls back to.
        if running
            && st.rolled_back.is_none()
            && d.spec_hash == hash
            && st.last_stable_generation != Some(d.generation)
        {
            st.last_stable_generation = Some(d.generation);
            st.last_stable_spec = serde_json::to_value(&job.spec).ok();
        }

        // Savepoints asked for: by nonce, or every `savepoints.interval`.
        if st.savepoint_in_progress.is_none() && running {
            let nonce = job.spec.savepoints.trigger_nonce;
            let due = job
                .spec
                .savepoints
                .interval
                .map(|i| i.as_std())
                .filter(|i| !i.is_zero())
                .is_some_and(|every| {
                    let since = st
                        .last_savepoint
                        .as_ref()
                        .map(|s| s.completed_at.0)
                        .or(info.map(|i| {
                            Timestamp::from_millisecond(i.started_at as i64)
                                .unwrap_or(Timestamp::UNIX_EPOCH)
                        }))
                        .unwrap_or(Timestamp::UNIX_EPOCH);
                    Timestamp::now().duration_since(since).as_secs() >= every.as_secs() as i64
                });
            if nonce.is_some() && nonce != st.observed_savepoint_nonce {
                st.observed_savepoint_nonce = nonce;
                intend(st, job, SavepointReason::Requested, false);
                self.save_status(job, written, st).await?;
            } else if due {
                intend(st, job, SavepointReason::Periodic, false);
                self.save_status(job, written, st).await?;
            }
        }
        if st.savepoint_in_progress.as_ref().is_some_and(|p| !p.stop) {
            match drive(self, job, addr, st, written).await? {
                Savepoint::Pending => step.requeue = Some(Duration::from_secs(1)),
                Savepoint::Completed(path) => {
                    self.note(job, "SavepointCompleted", format!("savepoint at {path}")).await;
                }
                Savepoint::Failed(why) => {
                    // One asked for by nonce or period is not retried: the next nonce or
                    // period asks again.
                    if let Some(p) = st.savepoint_in_progress.take() {
                        let r = reason_label(p.reason);
                        self.metrics.savepoints.with_label_values(&[r, "failed"]).inc();
                    }
                    step.problem =
                        Some(("SavepointFailed", format!("the savepoint failed: {why}")));
                }
            }
        }

        // Retention: after a new savepoint, and once a minute for age.
        let recorded = job.status.as_ref().and_then(|s| s.last_savepoint.as_ref())
            != st.last_savepoint.as_ref();
        if st.upgrade.is_none() && st.savepoint_in_progress.is_none() {
            let key = format!("{ns}/{name}");
            let due = {
                let mut passes = self.retention_passes.lock().unwrap_or_else(|e| e.into_inner());
                let due =
                    recorded || passes.get(&key).is_none_or(|t| t.elapsed() >= RETENTION_EVERY);
                if due {
                    passes.insert(key, std::time::Instant::now());
                }
                due
            };
            if due {
                self.save_status(job, written, st).await?;
                self.retain(job, st, observed.credentials_secret.as_ref()).await?;
            }
        }
        Ok(())
    }

    /// Desired state suspended: in savepoint mode stop with a savepoint first; then delete
    /// the pods. Resuming starts from that savepoint (or the last checkpoint in last-state
    /// mode, or empty in stateless mode).
    pub(crate) async fn suspend(
        &self,
        job: &StreamJob,
        info: Option<&Result<JobInfo, String>>,
        st: &mut StreamJobStatus,
        written: &mut StreamJobStatus,
        step: &mut Step,
    ) -> Result<(), Error> {
        if !step.deployed {
            return Ok(());
        }
        let (ns, name, addr) = self.names(job);
        let (ns, name, addr) = (ns.as_str(), name.as_str(), addr.as_str());
        let answer = info;
        let info = info.and_then(|r| r.as_ref().ok());
        if let Some(d) = st.deployed.clone() {
            let running =
                info.is_some_and(|i| i.job_id == d.job_id && i.state == JobState::Running);
            let stopping = st.savepoint_in_progress.as_ref().is_some_and(|p| p.stop);
            let mut next = d.clone();
            match job.spec.upgrade_mode {
                UpgradeMode::Savepoint if running || stopping => {
                    intend(st, job, SavepointReason::Suspend, true);
                    let what = "the savepoint to suspend the job";
                    let Some(path) =
                        self.stop_with_savepoint(job, addr, st, written, step, what).await?
                    else {
                        return Ok(());
                    };
                    next.job_id = build::next_job_id(&d.job_id);
                    next.restore_path = Some(path);
                }
                UpgradeMode::Stateless => {
                    next.job_id = build::next_job_id(&d.job_id);
                    next.restore_path = None;
                }
                UpgradeMode::Savepoint => {
                    let then =
                        "the job is suspended without one and resumes from its last checkpoint";
                    let text = skipped_savepoint(
                        "the savepoint to suspend the job",
                        then,
                        step.deployed,
                        answer,
                        Some(&d.job_id),
                    );
                    self.warn(job, "SavepointSkipped", text).await;
                }
                // Last-state: resume from the last checkpoint.
                UpgradeMode::LastState => {}
            }
            st.deployed = Some(next);
            st.upgrade = None;
            self.save_status(job, written, st).await?;
        }
        self.delete_objects(ns, name).await?;
        self.forget_secrets(job, ns, name);
        step.deployed = false;
        Ok(())
    }

    /// A deleted job: in savepoint mode, a final savepoint (recorded as a StreamSnapshot)
    /// before the finalizer lets it go; with `spec.checkpointing.onCancel: delete` and no final
    /// savepoint tried, its pods, then the checkpoints of the run they ran.
    pub(crate) async fn finalize(
        &self,
        job: &StreamJob,
        ns: &str,
        name: &str,
        exists: bool,
        addr: &str,
        mut st: StreamJobStatus,
    ) -> Result<Action, Error> {
        self.metrics.forget(ns, name);
        if !job.finalizers().iter().any(|f| f == crate::FINALIZER) {
            return Ok(Action::await_change());
        }
        let mut written = st.clone();
        let answer = if exists { Some(coordinator::job(addr).await) } else { None };
        let info = answer.as_ref().and_then(|r| r.as_ref().ok());
        let running = info.is_some_and(|i| {
            st.deployed.as_ref().is_some_and(|d| d.job_id == i.job_id)
                && i.state == JobState::Running
        });
        let stopping = st.savepoint_in_progress.as_ref().is_some_and(|p| p.stop);
        let savepoint_mode = job.spec.upgrade_mode == UpgradeMode::Savepoint;
        let delete = job.spec.checkpointing.on_cancel == OnCancel::Delete;
        // Pods on their way out (the checkpoints are to go, see below): no savepoint now.
        let going = self.pods_going(ns, name);
        // Checkpoints are deleted only when no final savepoint was tried: a coordinator that
        // does not answer just now is waited for a while rather than taken for a job that
        // does not run, whose checkpoints would go with it.
        if savepoint_mode && delete && !stopping && !going && matches!(answer, Some(Err(_))) {
            let since = job
                .metadata
                .deletion_timestamp
                .as_ref()
                .map_or(0, |t| Timestamp::now().duration_since(t.0).as_secs());
            if since < NOT_READY_BEFORE_LAST_STATE {
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
        }
        let mut final_savepoint = FinalSavepoint::NotTried;
        if savepoint_mode && exists && ((running && !going) || stopping) {
            intend(&mut st, job, SavepointReason::Deletion, true);
            match drive(self, job, addr, &mut st, &mut written).await? {
                Savepoint::Pending => return Ok(Action::requeue(Duration::from_secs(1))),
                Savepoint::Completed(path) => {
                    final_savepoint = FinalSavepoint::Taken;
                    self.note(
                        job,
                        "FinalSavepoint",
                        format!("the job stopped with a savepoint at {path}"),
                    )
                    .await;
                }
                Savepoint::Failed(why) => {
                    let n = failed(&mut st, &why);
                    if n < crate::FINAL_SAVEPOINT_ATTEMPTS {
                        self.warn(
                            job,
                            "SavepointFailed",
                            format!(
                                "the final savepoint failed (attempt {n} of {}): {why}",
                                crate::FINAL_SAVEPOINT_ATTEMPTS
                            ),
                        )
                        .await;
                        self.save_status(job, &mut written, &st).await?;
                        return Ok(Action::requeue(backoff(n - 1)));
                    }
                    final_savepoint = FinalSavepoint::Failed;
                    let kept = if delete {
                        " (spec.checkpointing.onCancel: delete applies to a job stopped without a savepoint tried, not to one whose savepoint failed)"
                    } else {
                        ""
                    };
                    self.warn(job, "SavepointFailed", format!("the final savepoint failed {n} times ({why}): the job is deleted without one; its last checkpoint stays in storage{kept}")).await;
                }
            }
        }
        if deletes_checkpoints(job, final_savepoint)
            && let Some(wait) = self.delete_checkpoints(job, ns, name, &st).await?
        {
            return Ok(Action::requeue(wait));
        }
        if savepoint_mode && final_savepoint == FinalSavepoint::NotTried {
            let job_id = st.deployed.as_ref().map(|d| d.job_id.as_str());
            let then =
                "the job is deleted without one, and its last checkpoint (if any) stays in storage";
            let text =
                skipped_savepoint("the final savepoint", then, exists, answer.as_ref(), job_id);
            self.warn(job, "SavepointSkipped", text).await;
        }
        let api: Api<StreamJob> = Api::namespaced(self.client.clone(), ns);
        let left: Vec<String> =
            job.finalizers().iter().filter(|f| *f != crate::FINALIZER).cloned().collect();
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Json::<()>(
                serde_json::from_value(json!([
                    {"op": "test", "path": "/metadata/finalizers", "value": job.finalizers()},
                    {"op": "replace", "path": "/metadata/finalizers", "value": left},
                ]))
                .expect("a JSON patch"),
            ),
        )
        .await
        .map_err(kube_err(format!("removing the finalizer of StreamJob {ns}/{name}")))?;
        Ok(Action::await_change())
    }

    /// `spec.checkpointing.onCancel: delete` for a deleted job stopped without a savepoint: its
    /// pods go first (a coordinator still up would write its next checkpoint), then the
    /// checkpoint directory of the run they ran, on S3 (a local one is not reachable from the
    /// controller: left, with a log line). Never one that holds a savepoint or a restore point
    /// a StreamSnapshot or a StreamJob of the namespace names. `Some(wait)`: look again then.
    async fn delete_checkpoints(
        &self,
        job: &StreamJob,
        ns: &str,
        name: &str,
        st: &StreamJobStatus,
    ) -> Result<Option<Duration>, Error> {
        let Some(d) = st.deployed.as_ref() else { return Ok(None) };
        if !self.pods_gone(ns, name).await? {
            return Ok(Some(Duration::from_secs(1)));
        }
        let defaults = self.config.defaults.checkpoint_storage.as_ref();
        let Some(dir) = checkpoint_dir(job, defaults, &d.job_id) else { return Ok(None) };
        let weir_crds::StorageUri::S3 { bucket, prefix } = dir.clone() else {
            tracing::warn!(
                namespace = ns,
                job = name,
                "spec.checkpointing.onCancel is delete, but the checkpoints at {dir} are in a local directory, which the controller cannot reach: left as they are"
            );
            return Ok(None);
        };
        if let Some(p) = self.protected_below(job, st, ns, &dir).await? {
            self.warn(job, "CheckpointsKept", format!("spec.checkpointing.onCancel is delete, but the checkpoints at {dir} stay: {p} is below them")).await;
            return Ok(None);
        }
        let creds = crate::retention::credentials(
            job.spec.s3.as_ref(),
            self.credentials_secret(job, ns).await?.as_ref(),
        );
        let spec = job.spec.s3.clone();
        let under = format!("{prefix}/");
        let deleted = tokio::task::spawn_blocking(move || {
            weir_storage::objstore::S3Client::with_credentials(spec.as_ref(), creds)?
                .delete_prefix(&bucket, &under)
        })
        .await
        .map_err(|e| weir_storage::error::RuntimeError::internal(e.to_string()))
        .and_then(|r| r);
        let key = job.uid().unwrap_or_else(|| format!("{ns}/{name}"));
        match deleted {
            Ok(n) => {
                self.cleanups.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                tracing::info!(namespace = ns, job = name, "deleted {n} objects under {dir}");
                self.note(job, "CheckpointsDeleted", format!("deleted the checkpoints of job id {} at {dir} ({n} objects): spec.checkpointing.onCancel is delete and the job was stopped without a savepoint", d.job_id)).await;
                Ok(None)
            }
            Err(e) => {
                let n = {
                    let mut c = self.cleanups.lock().unwrap_or_else(|e| e.into_inner());
                    let n = c.entry(key.clone()).or_insert(0);
                    *n += 1;
                    *n
                };
                if n < crate::CHECKPOINT_DELETE_ATTEMPTS {
                    self.warn(job, "CheckpointsDeleteFailed", format!("deleting the checkpoints at {dir} failed (attempt {n} of {}): {}; tried again", crate::CHECKPOINT_DELETE_ATTEMPTS, e.message)).await;
                    return Ok(Some(backoff(n - 1)));
                }
                self.cleanups.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
                self.warn(job, "CheckpointsDeleteFailed", format!("deleting the checkpoints at {dir} failed {n} times ({}): the job is deleted, and what is left there stays", e.message)).await;
                Ok(None)
            }
        }
    }

    /// The first location below `dir` that must stay: the job's savepoint directory, the path
    /// of a StreamSnapshot of the namespace, or a restore point of a StreamJob there (this
    /// one's included).
    async fn protected_below(
        &self,
        job: &StreamJob,
        st: &StreamJobStatus,
        ns: &str,
        dir: &weir_crds::StorageUri,
    ) -> Result<Option<String>, Error> {
        let snaps: Api<StreamSnapshot> = Api::namespaced(self.client.clone(), ns);
        let snaps = snaps
            .list(&ListParams::default())
            .await
            .map_err(kube_err(format!("listing the StreamSnapshots of {ns}")))?
            .items;
        let jobs: Api<StreamJob> = Api::namespaced(self.client.clone(), ns);
        let jobs = jobs
            .list(&ListParams::default())
            .await
            .map_err(kube_err(format!("listing the StreamJobs of {ns}")))?
            .items;
        let mut paths: Vec<String> =
            job.spec.savepoints.directory.iter().map(|d| d.to_string()).collect();
        paths.extend(st.last_savepoint.as_ref().map(|s| s.path.clone()));
        paths.extend(snaps.iter().map(|s| s.spec.path.to_string()));
        paths.extend(crate::retention::protected(job, st, &snaps));
        for other in jobs.iter().filter(|j| j.uid() != job.uid()) {
            let ost = other.status.clone().unwrap_or_default();
            paths.extend(crate::retention::protected(other, &ost, &snaps));
        }
        Ok(paths.into_iter().find(|p| is_below(p, dir)))
    }

    /// Takes the stopping savepoint `savepointInProgress` records one step further: its path
    /// once complete; `None` while it is under way or after a failed attempt (Degraded says
    /// so, and it is tried again after the back-off), when the caller stops here.
    async fn stop_with_savepoint(
        &self,
        job: &StreamJob,
        addr: &str,
        st: &mut StreamJobStatus,
        written: &mut StreamJobStatus,
        step: &mut Step,
        what: &str,
    ) -> Result<Option<String>, Error> {
        match drive(self, job, addr, st, written).await? {
            Savepoint::Pending => {
                step.problem = retrying(st, what);
                step.requeue = Some(Duration::from_secs(1));
                Ok(None)
            }
            Savepoint::Failed(why) => {
                self.retry_later(job, st, written, step, what, &why).await?;
                Ok(None)
            }
            Savepoint::Completed(path) => Ok(Some(path)),
        }
    }

    /// A stopping savepoint failed: the job goes on running; count the attempt, say so
    /// (Degraded), and try again after the back-off.
    async fn retry_later(
        &self,
        job: &StreamJob,
        st: &mut StreamJobStatus,
        written: &mut StreamJobStatus,
        step: &mut Step,
        what: &str,
        why: &str,
    ) -> Result<(), Error> {
        let reason = st.savepoint_in_progress.as_ref().map(|p| p.reason);
        if let Some(r) = reason {
            self.metrics.savepoints.with_label_values(&[reason_label(r), "failed"]).inc();
        }
        let n = failed(st, why);
        step.problem = retrying(st, what);
        step.requeue = Some(backoff(n - 1));
        self.save_status(job, written, st).await
    }

    /// The last stable spec as a job to build objects from: the job with
    /// `status.lastStableSpec` for its spec, validated, and its hash.
    fn stable(
        &self,
        job: &StreamJob,
        st: &StreamJobStatus,
        observed: &Observed,
    ) -> Result<(StreamJob, Valid, String), String> {
        let Some(spec) = st.last_stable_spec.clone() else {
            return Err("no version of the job has run yet (status.lastStableSpec is empty)".into());
        };
        let spec: StreamJobSpec = serde_json::from_value(spec)
            .map_err(|e| format!("status.lastStableSpec cannot be read: {e}"))?;
        let mut stable = job.clone();
        stable.spec = spec;
        let valid = validate::validate(&stable, observed, &self.config.defaults)
            .map_err(|e| format!("the last stable spec is no longer valid: {e}"))?;
        let hash = build::spec_hash(&stable, &valid, &self.config.build);
        Ok((stable, valid, hash))
    }

    /// The new version runs: the upgrade (or the rollback) is done.
    #[allow(clippy::too_many_arguments)]
    async fn upgraded(
        &self,
        job: &StreamJob,
        i: &JobInfo,
        d: &DeployedRun,
        u: &UpgradeProgress,
        st: &mut StreamJobStatus,
        written: &mut StreamJobStatus,
        step: &mut Step,
    ) -> Result<(), Error> {
        let took = Timestamp::now().duration_since(u.started_at.0).as_secs();
        let mode = mode_label(u.mode);
        if !u.rollback {
            self.metrics.upgrades.with_label_values(&[mode, "completed"]).inc();
            self.metrics
                .upgrade_duration
                .observe(Timestamp::now().duration_since(u.started_at.0).as_secs_f64());
        }
        let from = d.restore_path.as_ref().map_or(String::new(), |p| format!(", from {p}"));
        st.upgrade = None;
        self.save_status(job, written, st).await?;
        if u.rollback {
            step.problem = st.rolled_back.as_ref().map(|r| rolled_back_problem(r, false));
            let failed = st.rolled_back.as_ref().map_or(0, |r| r.generation);
            self.warn(
                job,
                "RolledBack",
                format!(
                    "generation {} runs again at parallelism {} ({} s{from}); generation {failed} is not tried again until the spec changes",
                    u.to_generation, i.parallelism, took
                ),
            )
            .await;
        } else {
            self.note(
                job,
                "UpgradeCompleted",
                format!(
                    "generation {} runs at parallelism {} ({:?} upgrade, {took} s{from})",
                    u.to_generation, i.parallelism, u.mode
                ),
            )
            .await;
        }
        Ok(())
    }

    /// The new version failed to start or did not run in time: go back to the last stable
    /// spec, from the state the new version started from (the upgrade's savepoint, or in
    /// last-state mode the last checkpoint). Recorded before anything is applied; the next
    /// reconcile applies it. Not done when it would lose or repeat something, then the
    /// failure is reported instead (Degraded UpgradeFailed).
    #[allow(clippy::too_many_arguments)]
    async fn roll_back(
        &self,
        job: &StreamJob,
        new: Option<&JobInfo>,
        d: &DeployedRun,
        u: &UpgradeProgress,
        why: String,
        observed: &Observed,
        st: &mut StreamJobStatus,
        written: &mut StreamJobStatus,
        step: &mut Step,
    ) -> Result<(), Error> {
        let mut no = |reason: String| {
            step.problem = Some(("UpgradeFailed", format!("{why}; {reason}")));
            step.requeue = Some(Duration::from_secs(5));
            Ok(())
        };
        if u.rollback {
            return no("this was the rollback to the last stable spec, which is not rolled back again: fix the spec or what keeps the job from starting".into());
        }
        // Output the new version committed would be produced again from the savepoint.
        let applied = u.applied_at.as_ref().unwrap_or(&u.started_at).0;
        let own = format!("/{}/", d.job_id);
        let checkpointed =
            new.and_then(|i| i.last_checkpoint.as_ref()).map(|c| c.id).or_else(|| {
                st.last_checkpoint
                    .as_ref()
                    .filter(|c| c.completed_at.0 >= applied)
                    .filter(|c| c.path.as_deref().is_some_and(|p| p.contains(&own)))
                    .map(|c| c.id as u64)
            });
        if let Some(id) = checkpointed {
            return no(format!(
                "it is not rolled back: it completed checkpoint {id}, and the output committed with it would be counted twice by a job going back to the state before it; fix the spec"
            ));
        }
        let (stable, valid, hash) = match self.stable(job, st, observed) {
            Ok(s) => s,
            Err(e) => return no(format!("it cannot be rolled back: {e}")),
        };
        let (job_id, restore) = match u.mode {
            UpgradeMode::LastState => (d.job_id.clone(), d.restore_path.clone()),
            UpgradeMode::Savepoint => (build::next_job_id(&d.job_id), u.restore_path.clone()),
            UpgradeMode::Stateless => (build::next_job_id(&d.job_id), None),
        };
        let to = st.last_stable_generation.unwrap_or(0);
        let mut back = deployed(&stable, hash, valid.max_parallelism, job_id, restore);
        back.generation = to;
        st.rolled_back = Some(RolledBack {
            generation: u.to_generation,
            spec_hash: d.spec_hash.clone(),
            to_generation: Some(to),
            reason: why.clone(),
            at: now(),
        });
        st.upgrade = Some(UpgradeProgress {
            from_generation: Some(u.to_generation),
            to_generation: to,
            mode: u.mode,
            step: UpgradeStep::NewSpecApplied,
            restore_path: back.restore_path.clone(),
            started_at: now(),
            applied_at: Some(now()),
            from_run_id: new.map(|i| i.run_id.clone()),
            rollback: true,
        });
        self.metrics.upgrades.with_label_values(&[mode_label(u.mode), "rolled-back"]).inc();
        let from = back.restore_path.as_ref().map_or(String::new(), |p| format!(" from {p}"));
        st.deployed = Some(back);
        self.save_status(job, written, st).await?;
        self.warn(job, "RollingBack", format!("{why}; rolling back to generation {to}{from}"))
            .await;
        step.problem = st.rolled_back.as_ref().map(|r| rolled_back_problem(r, true));
        step.requeue = Some(Duration::from_secs(1));
        Ok(())
    }

    /// Applies the objects of run `d` (those that changed).
    async fn apply_run(
        &self,
        job: &StreamJob,
        valid: &Valid,
        ns: &str,
        d: &DeployedRun,
        workers: i32,
        step: &mut Step,
    ) -> Result<(), Error> {
        // Never start empty in place of a restore point that cannot be read.
        let restore_path = match &d.restore_path {
            Some(p) => Some(p.parse().map_err(|e| {
                Error::Status(format!(
                    "status.deployed.restorePath {p:?} is not a storage location ({e}): set it to the savepoint or checkpoint to start from"
                ))
            })?),
            None => None,
        };
        let run = Run { job_id: d.job_id.clone(), restore_path };
        let objs = build::objects(job, valid, &self.config.build, workers, &run);
        let s = &self.stores;
        let applied = &mut step.applied;
        self.apply_if_changed(&s.config_maps, ns, objs.config_map, applied).await?;
        self.apply_if_changed(&s.services, ns, objs.coordinator_service, applied).await?;
        self.apply_if_changed(&s.services, ns, objs.worker_service, applied).await?;
        self.apply_if_changed(&s.stateful_sets, ns, objs.workers, applied).await?;
        self.apply_if_changed(&s.deployments, ns, objs.coordinator, applied).await?;
        step.deployed = true;
        Ok(())
    }

    async fn add_finalizer(&self, job: &StreamJob, ns: &str, name: &str) -> Result<(), Error> {
        if job.finalizers().iter().any(|f| f == crate::FINALIZER) {
            return Ok(());
        }
        let mut all = job.finalizers().to_vec();
        all.push(crate::FINALIZER.into());
        let api: Api<StreamJob> = Api::namespaced(self.client.clone(), ns);
        api.patch(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"finalizers": all}})),
        )
        .await
        .map_err(kube_err(format!("adding a finalizer to StreamJob {ns}/{name}")))?;
        Ok(())
    }

    /// A job's namespace, name and coordinator API address.
    fn names(&self, job: &StreamJob) -> (String, String, String) {
        let ns = job.namespace().unwrap_or_else(|| "default".into());
        (ns, job.name_any(), build::api_address(job, &self.config.build))
    }

    /// The coordinator's API token, from the Secret the controller made.
    pub(crate) async fn api_token(&self, job: &StreamJob) -> Result<String, Error> {
        let ns = job.namespace().unwrap_or_else(|| "default".into());
        let secret = build::token_secret_name(&job.name_any());
        let api: Api<k8s_openapi::api::core::v1::Secret> =
            Api::namespaced(self.client.clone(), &ns);
        let s =
            api.get(&secret).await.map_err(kube_err(format!("reading Secret {ns}/{secret}")))?;
        s.data
            .and_then(|d| d.get("token").map(|t| String::from_utf8_lossy(&t.0).into_owned()))
            .ok_or_else(|| Error::Coordinator(format!("Secret {ns}/{secret} has no key \"token\"")))
    }

    /// Writes `st` as the status when it differs from `written` (a merge patch that removes
    /// the fields `st` no longer has), then remembers it as written.
    pub(crate) async fn save_status(
        &self,
        job: &StreamJob,
        written: &mut StreamJobStatus,
        st: &StreamJobStatus,
    ) -> Result<(), Error> {
        if st == written {
            return Ok(());
        }
        let ns = job.namespace().unwrap_or_else(|| "default".into());
        let name = job.name_any();
        let api: Api<StreamJob> = Api::namespaced(self.client.clone(), &ns);
        let mut v = serde_json::to_value(st).unwrap_or_default();
        if let Ok(before) = serde_json::to_value(&*written) {
            null_removed(&mut v, &before);
        }
        api.patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({ "status": v })))
            .await
            .map_err(kube_err(format!("writing the status of StreamJob {ns}/{name}")))?;
        *written = st.clone();
        Ok(())
    }

    async fn note(&self, job: &StreamJob, reason: &str, message: String) {
        self.publish(job, false, reason, message).await;
    }

    async fn warn(&self, job: &StreamJob, reason: &str, message: String) {
        self.publish(job, true, reason, message).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

    #[test]
    fn a_status_patch_removes_what_the_new_status_dropped_at_any_depth() {
        let old = json!({
            "phase": "Upgrading",
            "savepointInProgress": {"stop": true, "triggerId": "7", "failedAttempts": 1},
            "deployed": {"jobId": "a-2", "restorePath": "s3://b/sp-1", "statefulUids": ["c"]},
            "conditions": [{"type": "Ready"}],
        });
        let mut new = json!({
            "phase": "Running",
            "savepointInProgress": {"stop": true, "failedAttempts": 2},
            "deployed": {"jobId": "a-3", "statefulUids": []},
        });
        null_removed(&mut new, &old);
        assert_eq!(
            new,
            json!({
                "phase": "Running",
                "savepointInProgress": {"stop": true, "failedAttempts": 2, "triggerId": null},
                "deployed": {"jobId": "a-3", "statefulUids": [], "restorePath": null},
                "conditions": null,
            })
        );
    }

    #[test]
    fn each_attempt_at_a_savepoint_has_a_key_of_its_own_and_keeps_it() {
        let mut st = StreamJobStatus {
            savepoint_in_progress: Some(SavepointInProgress {
                reason: SavepointReason::Requested,
                stop: false,
                trigger_id: None,
                generation: 3,
                requested_at: Time(Timestamp::from_second(1_000).unwrap()),
                failed_attempts: 0,
                last_failure: None,
                request_id: None,
                run_id: None,
            }),
            ..Default::default()
        };
        let first = request_key(st.savepoint_in_progress.as_ref().unwrap());
        assert_eq!(first, "g3-1000-a0");
        st.savepoint_in_progress.as_mut().unwrap().request_id = Some(first.clone());
        // Recorded, it stays (a controller that comes back asks with the same key).
        assert_eq!(request_key(st.savepoint_in_progress.as_ref().unwrap()), first);
        // A failed attempt forgets it; the next attempt has another.
        assert_eq!(failed(&mut st, "S3 was away"), 1);
        let p = st.savepoint_in_progress.as_ref().unwrap();
        assert_eq!((p.request_id.as_ref(), p.trigger_id.as_ref()), (None, None));
        assert_ne!(request_key(p), first);
        assert_eq!(p.last_failure.as_deref(), Some("S3 was away"));
    }

    #[test]
    fn a_savepoint_upgrade_waits_out_a_coordinator_that_stopped_answering_just_now() {
        let at = |secs: i64| Time(Timestamp::from_second(secs).unwrap());
        let ready = |status: &str, since: i64| StreamJobStatus {
            conditions: vec![Condition {
                type_: "Ready".into(),
                status: status.into(),
                last_transition_time: at(since),
                message: String::new(),
                observed_generation: None,
                reason: "R".into(),
            }],
            ..Default::default()
        };
        let now = Timestamp::from_second(1_000).unwrap();
        assert!(!long_not_ready(&ready("True", 0), now));
        assert!(!long_not_ready(&ready("False", 990), now));
        assert!(long_not_ready(&ready("False", 900), now));
        assert!(long_not_ready(&StreamJobStatus::default(), now));
    }

    #[test]
    fn backoff_doubles_from_ten_seconds_to_five_minutes() {
        let s: Vec<u64> = (0..8).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(s, [10, 20, 40, 80, 160, 300, 300, 300]);
    }

    #[test]
    fn a_savepoint_upgrade_of_a_job_that_does_not_run_goes_on_from_its_last_checkpoint() {
        let info = |state| {
            JobInfo { state, ..serde_json::from_value(json!({"name": "j", "runId": "r", "state": "running", "parallelism": 1, "maxParallelism": 128, "workersConnected": 1, "workersExpected": 1, "uptimeSeconds": 1.0, "startedAt": 0, "stateBytes": 0, "operators": [], "restarts": 0})).unwrap() }
        };
        let running = info(JobState::Running);
        let failed = info(JobState::Failed);
        assert_eq!(mode_for(UpgradeMode::Savepoint, Some(&running)), UpgradeMode::Savepoint);
        assert_eq!(mode_for(UpgradeMode::Savepoint, Some(&failed)), UpgradeMode::LastState);
        assert_eq!(mode_for(UpgradeMode::Savepoint, None), UpgradeMode::LastState);
        assert_eq!(mode_for(UpgradeMode::Stateless, Some(&running)), UpgradeMode::Stateless);
    }

    fn in_progress(run_id: Option<&str>, failed_attempts: i32) -> SavepointInProgress {
        SavepointInProgress {
            reason: SavepointReason::Upgrade,
            stop: true,
            trigger_id: Some("sp1".into()),
            generation: 2,
            requested_at: Time(Timestamp::from_second(1_000).unwrap()),
            failed_attempts,
            last_failure: None,
            request_id: Some("g2-1000-a0".into()),
            run_id: run_id.map(str::to_string),
        }
    }

    fn answer(status: SavepointStatus) -> Result<Option<weir_crds::api::SavepointInfo>, String> {
        Ok(Some(
            serde_json::from_value(json!({
                "id": "sp1", "status": status, "stop": true, "requestedAt": 0, "durationMs": 0,
                "sizeBytes": 0, "path": "s3://b/sp/ns/j/sp-sp1",
            }))
            .unwrap(),
        ))
    }

    #[test]
    fn a_savepoint_is_failed_when_its_coordinator_restarted_or_forgot_it() {
        let at = |s: i64| Timestamp::from_second(s).unwrap();
        let limit = Duration::from_secs(60);
        let sp = in_progress(Some("run-a"), 0);
        let same: Result<String, String> = Ok("run-a".into());
        let other: Result<String, String> = Ok("run-b".into());
        let pending = answer(SavepointStatus::InProgress);
        // Another run id: the coordinator restarted, even while it says in progress.
        let v = judge(&sp, "sp1", &other, &pending, limit, at(1_010));
        assert!(
            matches!(&v, Savepoint::Failed(w) if w.contains("restarted") && w.contains("run-a") && w.contains("run-b")),
            "{v:?}"
        );
        // A 404: it has no such savepoint.
        let v = judge(&sp, "sp1", &same, &Ok(None), limit, at(1_010));
        assert!(matches!(&v, Savepoint::Failed(w) if w.contains("404")), "{v:?}");
        // The same run, in progress: pending until spec.savepoints.timeout.
        assert!(matches!(judge(&sp, "sp1", &same, &pending, limit, at(1_060)), Savepoint::Pending));
        let v = judge(&sp, "sp1", &same, &pending, limit, at(1_061));
        assert!(matches!(&v, Savepoint::Failed(w) if w.contains("spec.savepoints.timeout (60 s)")));
        // A coordinator that does not answer at all: pending, then failed at the timeout.
        let down: Result<String, String> = Err("connection refused".into());
        let gone: Result<Option<_>, String> = Err("connection refused".into());
        assert!(matches!(judge(&sp, "sp1", &down, &gone, limit, at(1_030)), Savepoint::Pending));
        let v = judge(&sp, "sp1", &down, &gone, limit, at(1_100));
        assert!(
            matches!(&v, Savepoint::Failed(w) if w.contains("timeout") && w.contains("connection refused")),
            "{v:?}"
        );
        // 0s: no limit on the wait (a lost savepoint still fails).
        let none = Duration::ZERO;
        assert!(matches!(judge(&sp, "sp1", &down, &gone, none, at(99_999)), Savepoint::Pending));
        assert!(matches!(
            judge(&sp, "sp1", &same, &Ok(None), none, at(1_001)),
            Savepoint::Failed(_)
        ));
        // Completed; and failed with the coordinator's reason, cut like an event.
        let v = judge(&sp, "sp1", &same, &answer(SavepointStatus::Completed), limit, at(1_001));
        assert!(matches!(&v, Savepoint::Completed(p) if p == "s3://b/sp/ns/j/sp-sp1"));
        let mut failed = answer(SavepointStatus::Failed);
        failed.as_mut().unwrap().as_mut().unwrap().failure = Some("x".repeat(50_000));
        let v = judge(&sp, "sp1", &same, &failed, limit, at(1_001));
        assert!(matches!(&v, Savepoint::Failed(w) if w.len() <= coordinator::MAX_TEXT), "{v:?}");
        // Recorded by a controller that kept no run id: the 404 still decides.
        let old = in_progress(None, 0);
        assert!(matches!(
            judge(&old, "sp1", &other, &pending, limit, at(1_001)),
            Savepoint::Pending
        ));
        assert!(matches!(
            judge(&old, "sp1", &other, &Ok(None), limit, at(1_001)),
            Savepoint::Failed(_)
        ));
        // After a failed attempt the wait counts from the end of its back-off (10 s).
        let retry = in_progress(Some("run-a"), 1);
        assert!(matches!(
            judge(&retry, "sp1", &same, &pending, limit, at(1_070)),
            Savepoint::Pending
        ));
        assert!(matches!(
            judge(&retry, "sp1", &same, &pending, limit, at(1_071)),
            Savepoint::Failed(_)
        ));
    }

    #[test]
    fn a_failed_attempt_forgets_the_run_and_keeps_a_bounded_reason() {
        let mut st = StreamJobStatus {
            savepoint_in_progress: Some(in_progress(Some("run-a"), 0)),
            ..Default::default()
        };
        failed(&mut st, &"y".repeat(10_000));
        let p = st.savepoint_in_progress.unwrap();
        assert_eq!((p.run_id, p.trigger_id), (None, None));
        assert!(p.last_failure.unwrap().len() <= coordinator::MAX_TEXT);
    }

    #[test]
    fn a_skipped_savepoint_says_why() {
        let info: JobInfo = serde_json::from_value(json!({"name": "j", "runId": "r", "jobId": "u-2", "state": "failed", "parallelism": 1, "maxParallelism": 128, "workersConnected": 1, "workersExpected": 1, "uptimeSeconds": 1.0, "startedAt": 0, "stateBytes": 0, "operators": [], "restarts": 0})).unwrap();
        let then = "the job is deleted without one";
        let gone = skipped_savepoint("the final savepoint", then, false, None, Some("u-2"));
        assert_eq!(
            gone,
            "the final savepoint is skipped: the job's Deployment is already gone, so no coordinator can take it; the job is deleted without one"
        );
        let down = Err("connection refused".to_string());
        let s = skipped_savepoint("the final savepoint", then, true, Some(&down), Some("u-2"));
        assert!(s.contains("the coordinator does not answer (connection refused)"), "{s}");
        let s = skipped_savepoint("x", then, true, Some(&Ok(info.clone())), Some("u-2"));
        assert!(s.contains("the job is Failed, not running"), "{s}");
        let s = skipped_savepoint("x", then, true, Some(&Ok(info)), Some("u-3"));
        assert!(s.contains("runs job id u-2, not u-3"), "{s}");
    }
}
