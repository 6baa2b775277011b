//! Status: what the StreamJob's status says, computed from what was observed (pure), and the
//! events that a change of status is worth.
//!
//! The status changes only when an observation changes: condition transition times are kept
//! while a condition's status stays, and nothing derived from the clock is written otherwise,
//! so that writing the status does not wake the controller again.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use weir_crds::StreamJob;
use weir_crds::api::{JobInfo, JobState};
use weir_crds::streamjob::{CheckpointInfo, DesiredState, JobPhase, RunningJob, StreamJobStatus};

use crate::validate::Invalid;

/// Everything the status is computed from.
#[derive(Debug, Clone)]
pub struct Observation<'a> {
    /// The validation's refusal, if any.
    pub invalid: Option<&'a Invalid>,
    /// Whether the job's objects exist (after this reconcile's step).
    pub deployed: bool,
    /// The coordinator's answer, when the job is deployed.
    pub coordinator: Option<Result<JobInfo, String>>,
    /// The job id of the deployment.
    pub job_id: String,
    /// The worker pods' label selector.
    pub selector: String,
    /// Something that needs attention besides an invalid spec (an upgrade refused, a
    /// savepoint that failed): the Degraded reason and message.
    pub problem: Option<(&'static str, String)>,
}

pub const READY: &str = "Ready";
pub const PROGRESSING: &str = "Progressing";
pub const DEGRADED: &str = "Degraded";

/// The status after `obs`, from `base` (the status as this reconcile's steps left it).
pub fn next(
    job: &StreamJob,
    base: &StreamJobStatus,
    obs: &Observation<'_>,
    now: &Time,
) -> StreamJobStatus {
    let old = base.clone();
    let mut s = old.clone();
    let generation = job.metadata.generation;
    s.observed_generation = generation;
    s.selector = Some(obs.selector.clone());
    let info = match &obs.coordinator {
        Some(Ok(info)) => Some(info),
        _ => None,
    };
    if let Some(info) = info {
        s.job = Some(RunningJob {
            id: obs.job_id.clone(),
            parallelism: info.parallelism as i32,
            start_time: Some(time_of(info.started_at)),
            restarts: i64::from(info.restarts),
        });
        if let Some(c) = info.last_checkpoint.as_ref() {
            s.last_checkpoint = Some(CheckpointInfo {
                id: c.id as i64,
                completed_at: time_of(c.trigger_time + c.duration_ms),
                size_bytes: c.size_bytes as i64,
                path: c.path.clone(),
            });
            // From the first checkpoint on, the job has state split into this many key groups.
            s.max_parallelism = Some(info.max_parallelism as i32);
        }
        s.replicas = info.workers_connected as i32;
    } else if !obs.deployed {
        s.replicas = 0;
        s.job = None;
    }

    let desired = job.spec.state;
    let phase = match (&obs.coordinator, obs.deployed) {
        (_, false) if desired == DesiredState::Suspended => JobPhase::Suspended,
        (_, false) if obs.invalid.is_some() => old.phase.unwrap_or(JobPhase::Created),
        (_, false) => JobPhase::Deploying,
        (Some(Ok(info)), true) => match info.state {
            JobState::Starting => JobPhase::Deploying,
            JobState::Running | JobState::Stopping | JobState::Restarting => JobPhase::Running,
            JobState::Finished => JobPhase::Finished,
            JobState::Failed => JobPhase::Failed,
        },
        (_, true) => match old.phase {
            Some(p @ (JobPhase::Running | JobPhase::Finished | JobPhase::Failed)) => p,
            _ => JobPhase::Deploying,
        },
    };
    // While an upgrade runs, the old job stopping (or finished into its savepoint) is a step
    // of it, not the job's end; so is a job stopping into a savepoint to be suspended.
    let phase = match (&s.upgrade, &s.savepoint_in_progress) {
        (Some(u), _) if u.rollback => JobPhase::RollingBack,
        (Some(_), _) => JobPhase::Upgrading,
        (None, Some(sp)) if sp.stop && obs.deployed => JobPhase::Running,
        _ => phase,
    };
    s.phase = Some(phase);

    // Ready: the job runs and checkpoints.
    let (ready, ready_reason, ready_msg) = match (phase, info.map(|i| i.state)) {
        (JobPhase::Running, Some(JobState::Running)) => (
            true,
            "Running",
            format!("the job runs at parallelism {}", info.map_or(0, |i| i.parallelism)),
        ),
        (JobPhase::Running, Some(JobState::Restarting)) => (
            false,
            "Restarting",
            "the job is restarting from its last checkpoint after a failure".into(),
        ),
        (JobPhase::Running, Some(JobState::Stopping)) => {
            (false, "Stopping", "the job is stopping".into())
        }
        (JobPhase::Running, _) => {
            (false, "CoordinatorUnreachable", unreachable_message(&obs.coordinator))
        }
        (JobPhase::Finished, _) => {
            (false, "Finished", "the job finished: its sources are exhausted".into())
        }
        (JobPhase::Failed, _) => (false, "Failed", "the job failed".into()),
        (JobPhase::Suspended, _) => (false, "Suspended", "the job is suspended".into()),
        (JobPhase::Created, _) => (false, "NotDeployed", "nothing is deployed".into()),
        (JobPhase::Upgrading, _) => (false, "Upgrading", upgrade_message(&s)),
        (JobPhase::RollingBack, _) => (false, "RollingBack", upgrade_message(&s)),
        (_, _) => (false, "Deploying", "the job's pods are starting".into()),
    };
    set(&mut s.conditions, READY, ready, ready_reason, &ready_msg, generation, now);

    let (progressing, p_reason, p_msg) = match phase {
        JobPhase::Deploying => (true, "Deploying", "the job's pods are starting".to_string()),
        JobPhase::Upgrading => (true, "Upgrading", upgrade_message(&s)),
        JobPhase::RollingBack => (true, "RollingBack", upgrade_message(&s)),
        _ if s.savepoint_in_progress.as_ref().is_some_and(|p| p.stop) => {
            (true, "Suspending", "the job is stopping with a savepoint".to_string())
        }
        _ if obs.invalid.is_some() => {
            (false, "InvalidSpec", "the spec is refused; see Degraded".to_string())
        }
        _ => (false, "Stable", "nothing is being rolled out".to_string()),
    };
    set(&mut s.conditions, PROGRESSING, progressing, p_reason, &p_msg, generation, now);

    let (degraded, d_reason, d_msg) = if let Some(e) = obs.invalid {
        (true, "InvalidSpec", e.message.clone())
    } else if let Some((reason, message)) = &obs.problem {
        (true, *reason, message.clone())
    } else if let Some(info) = info.filter(|i| i.state == JobState::Failed) {
        // The coordinator's text, cut like an event's note.
        let why = info.error.as_deref().map(crate::coordinator::bounded);
        (true, "JobFailed", why.unwrap_or_else(|| "the job failed".into()))
    } else if let Some(info) = info.filter(|i| i.state == JobState::Restarting) {
        (
            true,
            "Restarting",
            format!(
                "the job restarts from its last checkpoint after a failure (restarts: {})",
                info.restarts
            ),
        )
    } else if phase == JobPhase::Running && info.is_none() {
        (true, "CoordinatorUnreachable", unreachable_message(&obs.coordinator))
    } else {
        (false, "AsExpected", "nothing needs attention".to_string())
    };
    set(&mut s.conditions, DEGRADED, degraded, d_reason, &d_msg, generation, now);
    s
}

fn upgrade_message(s: &StreamJobStatus) -> String {
    match &s.upgrade {
        Some(u) if u.rollback => format!(
            "rolling back to generation {} ({:?} mode): {:?}",
            u.to_generation, u.mode, u.step
        ),
        Some(u) => {
            format!("upgrading to generation {} ({:?} mode): {:?}", u.to_generation, u.mode, u.step)
        }
        None => "upgrading".into(),
    }
}

/// A time in milliseconds since the epoch as the API stores it: whole seconds (a finer time
/// would differ from what is read back, and every reconcile would write the status again).
fn time_of(ms: u64) -> Time {
    Time(Timestamp::from_second((ms / 1000) as i64).unwrap_or(Timestamp::UNIX_EPOCH))
}

fn unreachable_message(c: &Option<Result<JobInfo, String>>) -> String {
    match c {
        Some(Err(e)) => {
            format!("the coordinator does not answer: {}", crate::coordinator::bounded(e))
        }
        _ => "the coordinator does not answer".into(),
    }
}

/// Sets condition `type_`, keeping its transition time while its status stays.
pub fn set(
    conditions: &mut Vec<Condition>,
    type_: &str,
    status: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let new = |t: Time| Condition {
        type_: type_.to_string(),
        status: status.clone(),
        reason: reason.to_string(),
        message: message.to_string(),
        observed_generation: generation,
        last_transition_time: t,
    };
    match conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => *c = new(c.last_transition_time.clone()),
        Some(c) => *c = new(now.clone()),
        None => conditions.push(new(now.clone())),
    }
}

/// The condition `type_` of a status.
pub fn condition<'a>(s: &'a StreamJobStatus, type_: &str) -> Option<&'a Condition> {
    s.conditions.iter().find(|c| c.type_ == type_)
}

/// An event to publish about the StreamJob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

/// The events a change from `old` to `new` is worth (none when nothing a person would want
/// to see changed).
pub fn notes(old: &StreamJobStatus, new: &StreamJobStatus) -> Vec<Note> {
    let mut out = Vec::new();
    let degraded = |s: &StreamJobStatus| {
        condition(s, DEGRADED)
            .filter(|c| c.status == "True")
            .map(|c| (c.reason.clone(), c.message.clone()))
    };
    if let Some((reason, message)) = degraded(new)
        && degraded(old) != Some((reason.clone(), message.clone()))
    {
        for r in ["InvalidSpec", "UpgradeRefused", "SavepointFailed", "UpgradeFailed"] {
            if reason == r {
                out.push(Note { warning: true, reason: r, message: message.clone() });
            }
        }
    }
    if new.phase != old.phase {
        match new.phase {
            Some(JobPhase::Running) => out.push(Note {
                warning: false,
                reason: "JobRunning",
                message: match &new.job {
                    Some(j) => {
                        format!("the job runs at parallelism {} (job id {})", j.parallelism, j.id)
                    }
                    None => "the job runs".into(),
                },
            }),
            Some(JobPhase::Failed) => out.push(Note {
                warning: true,
                reason: "JobFailed",
                message: degraded(new).map_or_else(|| "the job failed".into(), |(_, m)| m),
            }),
            Some(JobPhase::Finished) => out.push(Note {
                warning: false,
                reason: "JobFinished",
                message: "the job finished: its sources are exhausted and its output committed"
                    .into(),
            }),
            Some(JobPhase::Suspended) => out.push(Note {
                warning: false,
                reason: "Suspended",
                message: "the job is suspended: no pods run".into(),
            }),
            _ => {}
        }
    }
    if let (Some(o), Some(n)) = (&old.job, &new.job)
        && o.start_time == n.start_time
        && n.restarts > o.restarts
    {
        let from = new.last_checkpoint.as_ref().map_or_else(
            || "from the beginning (no checkpoint yet)".to_string(),
            |c| format!("from checkpoint {}", c.id),
        );
        out.push(Note {
            warning: true,
            reason: "Restarted",
            message: format!("the job restarted {from} after a failure (restarts: {})", n.restarts),
        });
    }
    if degraded(new).is_some_and(|(r, _)| r == "CoordinatorUnreachable")
        && degraded(old).is_none_or(|(r, _)| r != "CoordinatorUnreachable")
    {
        out.push(Note {
            warning: true,
            reason: "CoordinatorUnreachable",
            message: degraded(new).map(|(_, m)| m).unwrap_or_default(),
        });
    }
    out
}
