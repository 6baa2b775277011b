//! What the changing commands write to a StreamJob's spec, and the checks made before.
//!
//! Every change is a JSON merge patch of a spec field, sent without a field manager of the
//! controller's (`weir-controller` applies the objects it builds, never a StreamJob's spec):
//! to a GitOps tool it is an ordinary edit of a field it manages, which it shows as drift and
//! reverts on its next sync unless the same change is made in git.

use serde_json::{Value, json};
use weir_crds::StreamJob;
use weir_crds::streamjob::{DesiredState, JobPhase, UpgradeMode};

use crate::show::{max_parallelism, mode};

/// `rescale JOB N`: spec.parallelism.
pub fn parallelism_patch(n: i32) -> Value {
    json!({"spec": {"parallelism": n}})
}

/// `suspend` / `resume`: spec.state.
pub fn state_patch(state: DesiredState) -> Value {
    let s = match state {
        DesiredState::Running => "running",
        DesiredState::Suspended => "suspended",
    };
    json!({"spec": {"state": s}})
}

/// `savepoint`: a new spec.savepoints.triggerNonce, made only against the version of the
/// job it was computed from (two people asking at once must not send the same nonce, which
/// would make one savepoint of two requests).
pub fn nonce_patch(nonce: i64, resource_version: &str) -> Value {
    json!({
        "metadata": {"resourceVersion": resource_version},
        "spec": {"savepoints": {"triggerNonce": nonce}},
    })
}

/// The nonce that asks for a new savepoint: one above both the spec's and the one the
/// controller last acted on.
pub fn next_nonce(j: &StreamJob) -> i64 {
    let observed = j.status.as_ref().and_then(|s| s.observed_savepoint_nonce);
    j.spec.savepoints.trigger_nonce.max(observed).unwrap_or(0) + 1
}

/// Parses the N of `rescale JOB N` (a usage error, exit 2, when it is not a parallelism).
pub fn parse_parallelism(s: &str) -> Result<i32, String> {
    let n: i64 = s.trim().parse().map_err(|_| {
        format!(
            "parallelism {s:?} is not a whole number: give the number of parallel subtasks, e.g. 4"
        )
    })?;
    if n < 1 {
        return Err(format!("parallelism {n} is too small: a job runs at least 1 subtask"));
    }
    i32::try_from(n)
        .ok()
        .filter(|n| *n <= 32768)
        .ok_or_else(|| format!("parallelism {n} is too large: the most is 32768"))
}

/// The rescale's refusal when `n` is above the job's maxParallelism.
pub fn check_rescale(j: &StreamJob, n: i32) -> Result<(), String> {
    let st = j.status.clone().unwrap_or_default();
    let (max, whence) = max_parallelism(&j.spec, &st);
    if n > max {
        return Err(format!(
            "parallelism {n} is above the job's maxParallelism {max} ({whence}): choose 1 to {max}"
        ));
    }
    Ok(())
}

/// What a rescale does, for the line that reports it.
pub fn rescale_says(j: &StreamJob) -> &'static str {
    match j.spec.upgrade_mode {
        UpgradeMode::Savepoint => {
            "the controller stops the job with a savepoint and starts it again from it at the new parallelism"
        }
        UpgradeMode::LastState => {
            "the controller starts the job again from its last checkpoint at the new parallelism"
        }
        UpgradeMode::Stateless => {
            "the controller starts the job again at the new parallelism with empty state (upgradeMode: stateless)"
        }
    }
}

/// What a suspend does, for the line that reports it.
pub fn suspend_says(j: &StreamJob, name: &str) -> String {
    match j.spec.upgrade_mode {
        UpgradeMode::Savepoint => format!(
            "the controller stops the job with a savepoint, then removes its pods; `kubectl weir resume {name}` starts it again from that savepoint"
        ),
        UpgradeMode::LastState => format!(
            "the controller removes the job's pods; `kubectl weir resume {name}` starts it again from its last checkpoint (upgradeMode: last-state takes no savepoint)"
        ),
        UpgradeMode::Stateless => format!(
            "the controller removes the job's pods; `kubectl weir resume {name}` starts it again with empty state (upgradeMode: stateless)"
        ),
    }
}

/// What a resume does, for the line that reports it.
pub fn resume_says(j: &StreamJob) -> String {
    let from =
        j.status.as_ref().and_then(|s| s.deployed.as_ref()).and_then(|d| d.restore_path.clone());
    match (j.spec.upgrade_mode, from) {
        (UpgradeMode::Stateless, _) => "the controller starts the job with empty state".into(),
        (UpgradeMode::Savepoint, Some(p)) => {
            format!("the controller starts the job again from its savepoint {p}")
        }
        _ => "the controller starts the job again from its last checkpoint".into(),
    }
}

/// Why a savepoint cannot be asked of the job as it stands, if it cannot.
pub fn check_savepoint(j: &StreamJob, name: &str) -> Result<(), String> {
    let phase = j.status.as_ref().and_then(|s| s.phase);
    if j.spec.state == DesiredState::Suspended || phase == Some(JobPhase::Suspended) {
        return Err(format!(
            "streamjob {name:?} is suspended: a savepoint is taken of a running job; `kubectl weir resume {name}` first (its last savepoint is in `kubectl weir status {name}`)"
        ));
    }
    match phase {
        Some(p @ (JobPhase::Finished | JobPhase::Failed)) => {
            Err(format!("streamjob {name:?} is {p:?}: a savepoint is taken of a running job"))
        }
        _ => Ok(()),
    }
}

/// Why `savepoint --stop` cannot stop the job with a savepoint, if it cannot. It suspends the
/// job, and only in upgradeMode savepoint does the controller take a savepoint to suspend.
pub fn check_stop(j: &StreamJob, name: &str) -> Result<(), String> {
    check_savepoint(j, name)?;
    if j.spec.upgrade_mode != UpgradeMode::Savepoint {
        return Err(format!(
            "streamjob {name:?} has spec.upgradeMode {}: suspending it takes no savepoint, so --stop cannot stop it with one; either `kubectl weir savepoint {name}` and then `kubectl weir suspend {name}` (resume then starts from {}), or set spec.upgradeMode: savepoint",
            mode(j.spec.upgrade_mode),
            if j.spec.upgrade_mode == UpgradeMode::Stateless {
                "empty state"
            } else {
                "the last checkpoint"
            }
        ));
    }
    let phase = j.status.as_ref().and_then(|s| s.phase);
    if phase != Some(JobPhase::Running) {
        return Err(format!(
            "streamjob {name:?} is {}, not Running: a stopping savepoint is taken of a running job (suspending it now would take none); wait until it runs",
            phase.map_or("not deployed yet".into(), |p| format!("{p:?}"))
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(spec: Value, status: Value) -> StreamJob {
        let mut spec = spec;
        spec["pipeline"] = json!({"operators": [{"uid": "g", "type": "generator"}]});
        serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
            "metadata": {"name": "wc", "namespace": "prod"},
            "spec": spec, "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn flags_map_onto_merge_patches_of_spec_fields() {
        assert_eq!(parallelism_patch(3), json!({"spec": {"parallelism": 3}}));
        assert_eq!(state_patch(DesiredState::Suspended), json!({"spec": {"state": "suspended"}}));
        assert_eq!(state_patch(DesiredState::Running), json!({"spec": {"state": "running"}}));
        assert_eq!(
            nonce_patch(5, "812"),
            json!({"metadata": {"resourceVersion": "812"},
                   "spec": {"savepoints": {"triggerNonce": 5}}})
        );
    }

    #[test]
    fn the_next_nonce_is_above_the_spec_and_what_the_controller_saw() {
        assert_eq!(next_nonce(&job(json!({}), json!({}))), 1);
        let j = job(json!({"savepoints": {"triggerNonce": 4}}), json!({}));
        assert_eq!(next_nonce(&j), 5);
        let j =
            job(json!({"savepoints": {"triggerNonce": 4}}), json!({"observedSavepointNonce": 9}));
        assert_eq!(next_nonce(&j), 10);
    }

    #[test]
    fn a_parallelism_is_a_whole_number_from_1_to_32768() {
        assert_eq!(parse_parallelism("4"), Ok(4));
        assert!(parse_parallelism("0").unwrap_err().contains("parallelism 0 is too small"));
        assert!(parse_parallelism("-2").unwrap_err().contains("parallelism -2"));
        assert!(parse_parallelism("two").unwrap_err().contains("\"two\" is not a whole number"));
        assert!(parse_parallelism("40000").unwrap_err().contains("the most is 32768"));
    }

    #[test]
    fn a_rescale_above_max_parallelism_is_refused_naming_both_numbers() {
        let j = job(json!({"parallelism": 2, "maxParallelism": 128}), json!({}));
        assert_eq!(check_rescale(&j, 128), Ok(()));
        let e = check_rescale(&j, 129).unwrap_err();
        assert!(e.contains("parallelism 129 is above the job's maxParallelism 128"), "{e}");
        // Once the job has state, the status's maxParallelism is the one in force.
        let j = job(json!({"parallelism": 2}), json!({"maxParallelism": 16}));
        let e = check_rescale(&j, 17).unwrap_err();
        assert!(e.contains("maxParallelism 16 (status.maxParallelism"), "{e}");
    }

    #[test]
    fn stop_needs_savepoint_mode_and_a_running_job() {
        let running = json!({"phase": "Running"});
        assert_eq!(check_stop(&job(json!({}), running.clone()), "wc"), Ok(()));
        let e = check_stop(&job(json!({"upgradeMode": "last-state"}), running.clone()), "wc");
        assert!(e.unwrap_err().contains("spec.upgradeMode last-state"));
        let e = check_stop(&job(json!({}), json!({"phase": "Deploying"})), "wc").unwrap_err();
        assert!(e.contains("is Deploying, not Running"), "{e}");
        let e = check_stop(&job(json!({"state": "suspended"}), running), "wc").unwrap_err();
        assert!(e.contains("is suspended"), "{e}");
    }

    #[test]
    fn a_savepoint_is_refused_for_a_job_that_cannot_take_one() {
        assert_eq!(check_savepoint(&job(json!({}), json!({"phase": "Deploying"})), "wc"), Ok(()));
        let e = check_savepoint(&job(json!({}), json!({"phase": "Suspended"})), "wc");
        assert!(e.unwrap_err().contains("kubectl weir resume wc"));
        let e = check_savepoint(&job(json!({}), json!({"phase": "Finished"})), "wc");
        assert!(e.unwrap_err().contains("is Finished"));
    }

    #[test]
    fn suspend_says_what_happens_in_each_upgrade_mode() {
        assert!(suspend_says(&job(json!({}), json!({})), "wc").contains("with a savepoint"));
        let s = suspend_says(&job(json!({"upgradeMode": "last-state"}), json!({})), "wc");
        assert!(s.contains("from its last checkpoint"), "{s}");
        let j = job(
            json!({}),
            json!({"deployed": {"generation": 1, "specHash": "h",
            "jobId": "wc-2", "restorePath": "s3://b/sp-1", "maxParallelism": 128}}),
        );
        assert!(resume_says(&j).contains("from its savepoint s3://b/sp-1"));
    }
}
