//! Waiting for the controller to act on a change, with progress on stderr.
//!
//! The job is watched from the version the change produced, so every status the controller
//! writes after it is seen, including one that says a savepoint failed (that Degraded
//! condition lasts only until the next reconcile, and polling could miss it). What each
//! command waits for is a "look": a pure function of the job that says wait (and what is
//! going on), done, or failed.

use std::time::{Duration, Instant};

use futures::StreamExt;
use kube::ResourceExt;
use kube::api::{WatchEvent, WatchParams};
use weir_crds::StreamJob;
use weir_crds::streamjob::{JobPhase, SavepointInfo, SavepointReason, StreamJobStatus};

use crate::Failure;
use crate::cluster::Cluster;

/// What one look at the job says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Look<T> {
    /// Not there yet; what is going on.
    Wait(String),
    Done(T),
    /// It will not get there; why, in the controller's words where it has some.
    Fail(String),
}

/// Watches job `name` from `start` (as the change left it) until `look` says done or failed,
/// or `timeout` passes. Prints each new progress message on stderr.
pub async fn until<T>(
    cluster: &Cluster,
    name: &str,
    start: StreamJob,
    timeout: Duration,
    what: &str,
    mut look: impl FnMut(&StreamJob) -> Look<T>,
) -> Result<T, Failure> {
    let api = cluster.jobs();
    let deadline = Instant::now() + timeout;
    let mut last = String::new();
    let mut progress = |msg: String| {
        if msg != last {
            eprintln!("{name}: {msg}");
            last = msg;
        }
    };
    let mut version = start.resource_version().unwrap_or_default();
    let mut current = Some(start);
    loop {
        if let Some(j) = current.take() {
            match look(&j) {
                Look::Done(v) => return Ok(v),
                Look::Fail(why) => return Err(Failure::Failed(why)),
                Look::Wait(msg) => progress(msg),
            }
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Failure::Failed(format!(
                "timed out after {} s waiting for {what} ({name}: {last}); the change stays in the spec, and the controller goes on with it (kubectl weir status {name})",
                timeout.as_secs()
            )));
        }
        // The apiserver ends a watch after its timeout; then it is started again from the
        // last version seen.
        let wp = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .timeout(left.as_secs().clamp(1, 290) as u32);
        let mut stream = match api.watch(&wp, &version).await {
            Ok(s) => s.boxed(),
            Err(e) => {
                // A connection that broke is tried again until the deadline.
                eprintln!("{name}: {}", cluster.error("watching the job", e));
                tokio::time::sleep(Duration::from_secs(1)).await;
                current = reread(cluster, name, &mut version).await?;
                continue;
            }
        };
        loop {
            let next = tokio::time::timeout(left, stream.next()).await;
            match next {
                // The deadline: the outer loop says so.
                Err(_) => break,
                Ok(None) => break,
                Ok(Some(Ok(WatchEvent::Added(j) | WatchEvent::Modified(j)))) => {
                    version = j.resource_version().unwrap_or_default();
                    current = Some(j);
                    break;
                }
                Ok(Some(Ok(WatchEvent::Deleted(_)))) => {
                    return Err(Failure::Failed(format!(
                        "streamjob {name:?} was deleted while waiting for {what}"
                    )));
                }
                Ok(Some(Ok(WatchEvent::Bookmark(b)))) => version = b.metadata.resource_version,
                // 410 Gone: the version is too old to watch from; read the job afresh.
                Ok(Some(Ok(WatchEvent::Error(_)))) | Ok(Some(Err(_))) => {
                    current = reread(cluster, name, &mut version).await?;
                    break;
                }
            }
        }
    }
}

async fn reread(
    cluster: &Cluster,
    name: &str,
    version: &mut String,
) -> Result<Option<StreamJob>, Failure> {
    match cluster.jobs().get_opt(name).await {
        Ok(Some(j)) => {
            *version = j.resource_version().unwrap_or_default();
            Ok(Some(j))
        }
        Ok(None) => Err(Failure::Failed(format!("streamjob {name:?} was deleted"))),
        Err(_) => Ok(None),
    }
}

fn status(j: &StreamJob) -> StreamJobStatus {
    j.status.clone().unwrap_or_default()
}

fn observed(j: &StreamJob, generation: i64) -> bool {
    status(j).observed_generation.is_some_and(|g| g >= generation)
}

fn phase(s: &StreamJobStatus) -> String {
    s.phase.map_or("no phase yet".into(), |p| format!("{p:?}"))
}

fn condition(s: &StreamJobStatus, type_: &str) -> Option<(bool, String, String)> {
    s.conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| (c.status == "True", c.reason.clone(), c.message.clone()))
}

/// The Degraded message when Degraded is true with `reason`.
fn degraded(s: &StreamJobStatus, reason: &str) -> Option<String> {
    condition(s, "Degraded").filter(|(on, r, _)| *on && r == reason).map(|(_, _, m)| m)
}

/// What is going on, in one line: the phase and the step under way.
fn going_on(s: &StreamJobStatus) -> String {
    let mut msg = phase(s);
    if let Some(u) = &s.upgrade {
        msg.push_str(&format!(", upgrade to generation {} at step {:?}", u.to_generation, u.step));
    }
    if let Some(p) = &s.savepoint_in_progress {
        msg.push_str(&format!(
            ", savepoint ({:?}{}) {}",
            p.reason,
            if p.stop { ", stopping the job" } else { "" },
            p.trigger_id.as_ref().map_or("requested".into(), |id| format!("{id} in progress"))
        ));
        if let Some(why) = &p.last_failure {
            msg.push_str(&format!(" after {} failed attempt(s): {why}", p.failed_attempts));
        }
    }
    msg
}

/// Waiting for the savepoint asked for with trigger nonce `nonce`.
#[derive(Debug)]
pub struct SavepointWait {
    nonce: i64,
    /// The last savepoint before this one; a new one is ours once the controller took our
    /// request (it takes one savepoint at a time).
    before: Option<SavepointInfo>,
    taken: bool,
}

impl SavepointWait {
    pub fn new(nonce: i64, j: &StreamJob) -> Self {
        Self { nonce, before: status(j).last_savepoint, taken: false }
    }

    pub fn look(&mut self, j: &StreamJob) -> Look<String> {
        let s = status(j);
        let ours = s
            .savepoint_in_progress
            .as_ref()
            .is_some_and(|p| p.reason == SavepointReason::Requested);
        // The controller records the nonce it acted on (a later one acts on ours too).
        let acted_on = s.observed_savepoint_nonce.is_some_and(|n| n >= self.nonce);
        if !acted_on {
            return match s.phase {
                Some(p @ (JobPhase::Suspended | JobPhase::Finished | JobPhase::Failed)) => {
                    Look::Fail(format!(
                        "the job is {p:?}: the controller takes a savepoint only of a running job (the request stays in spec.savepoints.triggerNonce {} and is taken when it runs again)",
                        self.nonce
                    ))
                }
                _ => Look::Wait(format!(
                    "waiting for the controller to take the request ({})",
                    going_on(&s)
                )),
            };
        }
        if !self.taken {
            // The write that records our nonce records our savepoint as in progress: the
            // last savepoint then is the one before ours.
            self.taken = true;
            if ours {
                self.before = s.last_savepoint.clone();
            }
        }
        if ours {
            return Look::Wait(going_on(&s));
        }
        match &s.last_savepoint {
            Some(sp) if Some(sp) != self.before.as_ref() => Look::Done(sp.path.clone()),
            _ => Look::Fail(degraded(&s, "SavepointFailed").unwrap_or_else(|| {
                format!(
                    "the controller took the request but recorded no savepoint (kubectl describe streamjob {} shows its events)",
                    j.name_any()
                )
            })),
        }
    }
}

/// Waiting for a suspend that takes a savepoint (upgradeMode savepoint): the new savepoint's
/// path once the job is suspended, `None` when it was suspended without one (it was not
/// running). A failed attempt at the savepoint fails the wait: the controller tries again
/// after a back-off and the job runs meanwhile, which the message says.
pub fn stopped(
    j: &StreamJob,
    generation: i64,
    before: Option<&SavepointInfo>,
) -> Look<Option<String>> {
    let s = status(j);
    let name = j.name_any();
    if observed(j, generation) && s.phase == Some(JobPhase::Suspended) {
        return Look::Done(
            s.last_savepoint
                .filter(|sp| Some(sp) != before && sp.reason == SavepointReason::Suspend)
                .map(|sp| sp.path),
        );
    }
    if let Some(p) = s.savepoint_in_progress.as_ref().filter(|p| p.stop && p.failed_attempts > 0) {
        return Look::Fail(format!(
            "the savepoint to stop the job failed (attempt {}): {}; the job goes on running and the controller tries again after a back-off (kubectl weir status {name}); `kubectl weir resume {name}` calls the suspend off",
            p.failed_attempts,
            p.last_failure.as_deref().unwrap_or("no reason given")
        ));
    }
    Look::Wait(going_on(&s))
}

/// Waiting for a suspend in a mode without a savepoint.
pub fn suspended(j: &StreamJob, generation: i64) -> Look<()> {
    let s = status(j);
    if observed(j, generation) && s.phase == Some(JobPhase::Suspended) {
        return Look::Done(());
    }
    Look::Wait(going_on(&s))
}

/// Waiting for the job to run and be Ready at generation `generation` or later, at
/// `parallelism` when given.
pub fn running(j: &StreamJob, generation: i64, parallelism: Option<i32>) -> Look<()> {
    let s = status(j);
    // The controller records the generation it observed at the end of a reconcile; the steps
    // of an upgrade it writes on the way still carry the one before.
    let seen = observed(j, generation);
    if seen {
        if let Some(r) = s.rolled_back.as_ref().filter(|r| r.generation >= generation) {
            return Look::Fail(format!(
                "generation {} was rolled back: {}",
                r.generation, r.reason
            ));
        }
        for reason in ["UpgradeRefused", "UpgradeFailed", "InvalidSpec", "JobFailed"] {
            if let Some(m) = degraded(&s, reason) {
                return Look::Fail(format!("{reason}: {m}"));
            }
        }
    } else if s.upgrade.is_none() && s.savepoint_in_progress.is_none() {
        return Look::Wait(format!(
            "waiting for the controller to see the change ({})",
            going_on(&s)
        ));
    }
    let at = s.job.as_ref().map(|r| r.parallelism);
    let ready = condition(&s, "Ready").is_some_and(|(on, _, _)| on);
    let done = seen
        && s.phase == Some(JobPhase::Running)
        && ready
        && s.upgrade.is_none()
        && parallelism.is_none_or(|n| at == Some(n));
    if done {
        return Look::Done(());
    }
    let mut msg = going_on(&s);
    if let (Some(n), Some(a)) = (parallelism, at) {
        msg.push_str(&format!(", running at {a} of {n}"));
    }
    Look::Wait(msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn job(generation: i64, status: Value) -> StreamJob {
        serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
            "metadata": {"name": "wc", "namespace": "prod", "generation": generation},
            "spec": {"pipeline": {"operators": [{"uid": "g", "type": "generator"}]}},
            "status": status,
        }))
        .unwrap()
    }

    fn sp(path: &str, reason: &str) -> Value {
        json!({"path": path, "completedAt": "2025-01-01T00:00:00Z", "reason": reason})
    }

    fn in_progress(reason: &str, stop: bool, failed: i32) -> Value {
        json!({"reason": reason, "stop": stop, "generation": 1,
               "requestedAt": "2025-01-01T00:00:00Z", "failedAttempts": failed,
               "lastFailure": if failed > 0 { json!("S3 said 503") } else { Value::Null }})
    }

    #[test]
    fn a_requested_savepoint_is_done_when_a_new_one_is_recorded_after_the_nonce_is_taken() {
        let start =
            job(2, json!({"phase": "Running", "lastSavepoint": sp("s3://b/sp-1", "Periodic")}));
        let mut w = SavepointWait::new(3, &start);
        assert!(
            matches!(w.look(&start), Look::Wait(m) if m.contains("waiting for the controller"))
        );
        let taken = job(
            2,
            json!({"phase": "Running", "observedSavepointNonce": 3,
            "lastSavepoint": sp("s3://b/sp-1", "Periodic"),
            "savepointInProgress": in_progress("Requested", false, 0)}),
        );
        assert!(matches!(w.look(&taken), Look::Wait(_)));
        let done = job(
            2,
            json!({"phase": "Running", "observedSavepointNonce": 3,
            "lastSavepoint": sp("s3://b/sp-2", "Requested")}),
        );
        assert_eq!(w.look(&done), Look::Done("s3://b/sp-2".into()));
    }

    #[test]
    fn a_requested_savepoint_that_failed_fails_with_the_controllers_message() {
        let start =
            job(2, json!({"phase": "Running", "lastSavepoint": sp("s3://b/sp-1", "Periodic")}));
        let mut w = SavepointWait::new(1, &start);
        let failed = job(
            2,
            json!({"phase": "Running", "observedSavepointNonce": 1,
            "lastSavepoint": sp("s3://b/sp-1", "Periodic"),
            "conditions": [{"type": "Degraded", "status": "True", "reason": "SavepointFailed",
                "message": "the savepoint failed: S3 said 503",
                "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
        );
        assert_eq!(w.look(&failed), Look::Fail("the savepoint failed: S3 said 503".into()));
    }

    #[test]
    fn a_savepoint_of_a_suspended_job_fails_at_once() {
        let mut w = SavepointWait::new(1, &job(2, json!({})));
        let j = job(2, json!({"phase": "Suspended"}));
        assert!(matches!(w.look(&j), Look::Fail(m) if m.contains("only of a running job")));
    }

    #[test]
    fn a_stop_is_done_when_suspended_with_a_new_suspend_savepoint() {
        let before = serde_json::from_value(sp("s3://b/sp-1", "Requested")).unwrap();
        let stopping = job(
            3,
            json!({"phase": "Running", "observedGeneration": 3,
            "lastSavepoint": sp("s3://b/sp-1", "Requested"),
            "savepointInProgress": in_progress("Suspend", true, 0)}),
        );
        assert!(
            matches!(stopped(&stopping, 3, Some(&before)), Look::Wait(m) if m.contains("stopping the job"))
        );
        let done = job(
            3,
            json!({"phase": "Suspended", "observedGeneration": 3,
            "lastSavepoint": sp("s3://b/sp-2", "Suspend")}),
        );
        assert_eq!(stopped(&done, 3, Some(&before)), Look::Done(Some("s3://b/sp-2".into())));
        // Suspended without a new savepoint (it was not running).
        let bare = job(
            3,
            json!({"phase": "Suspended", "observedGeneration": 3,
            "lastSavepoint": sp("s3://b/sp-1", "Requested")}),
        );
        assert_eq!(stopped(&bare, 3, Some(&before)), Look::Done(None));
        // The old status's Suspended phase (generation not observed yet) is not the answer.
        let old = job(3, json!({"phase": "Suspended", "observedGeneration": 2}));
        assert!(matches!(stopped(&old, 3, None), Look::Wait(_)));
    }

    #[test]
    fn a_failed_attempt_at_the_stopping_savepoint_fails_the_stop_saying_what_goes_on() {
        let j = job(
            3,
            json!({"phase": "Running", "observedGeneration": 3,
            "savepointInProgress": in_progress("Suspend", true, 1)}),
        );
        let Look::Fail(m) = stopped(&j, 3, None) else { panic!() };
        assert!(m.contains("failed (attempt 1): S3 said 503"), "{m}");
        assert!(m.contains("kubectl weir resume wc"), "{m}");
    }

    #[test]
    fn running_waits_for_the_new_generation_ready_at_the_parallelism() {
        let ready = |g: i64, p: i32| {
            job(
                5,
                json!({"phase": "Running", "observedGeneration": g,
                "job": {"id": "wc-2", "parallelism": p},
                "conditions": [{"type": "Ready", "status": "True", "reason": "Running",
                    "message": "", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
            )
        };
        assert!(
            matches!(running(&ready(4, 2), 5, Some(1)), Look::Wait(m) if m.contains("to see the change"))
        );
        // An upgrade under way was seen, though the observed generation is written later.
        let mut upgrading = ready(4, 1);
        upgrading.status.as_mut().unwrap().upgrade =
            serde_json::from_value(json!({"toGeneration": 5,
            "mode": "savepoint", "step": "Restoring", "startedAt": "2025-01-01T00:00:00Z"}))
            .unwrap();
        assert!(
            matches!(running(&upgrading, 5, Some(1)), Look::Wait(m) if m.contains("step Restoring"))
        );
        assert!(
            matches!(running(&ready(5, 2), 5, Some(1)), Look::Wait(m) if m.contains("running at 2 of 1"))
        );
        assert_eq!(running(&ready(5, 1), 5, Some(1)), Look::Done(()));
        assert_eq!(running(&ready(5, 1), 5, None), Look::Done(()));
    }

    #[test]
    fn running_fails_on_a_refused_or_rolled_back_change() {
        let refused = job(
            5,
            json!({"phase": "Running", "observedGeneration": 5,
            "conditions": [{"type": "Degraded", "status": "True", "reason": "UpgradeRefused",
                "message": "maxParallelism cannot change", "lastTransitionTime": "2025-01-01T00:00:00Z"}]}),
        );
        assert!(
            matches!(running(&refused, 5, Some(3)), Look::Fail(m) if m.contains("maxParallelism cannot change"))
        );
        let back = job(
            5,
            json!({"phase": "Running", "observedGeneration": 5,
            "rolledBack": {"generation": 5, "specHash": "h", "reason": "it crashed", "at": "2025-01-01T00:00:00Z"}}),
        );
        assert!(matches!(running(&back, 5, None), Look::Fail(m) if m.contains("it crashed")));
    }
}
