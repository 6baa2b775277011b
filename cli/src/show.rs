//! What the read-only commands print: the `jobs` and `snapshots` tables and the sections of
//! `status`. Pure functions of the objects and the time, so that tests can pin them down.

use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;
use weir_crds::snapshot::StreamSnapshot;
use weir_crds::streamjob::{DesiredState, StreamJobStatus, UpgradeMode};
use weir_crds::{StreamJob, StreamJobSpec};

use crate::format::{Table, age, age_of, bytes};

/// `kubectl weir jobs`: one row per job, a NAMESPACE column first with `-A`.
pub fn jobs_table(jobs: &[StreamJob], all_namespaces: bool, now: Timestamp) -> String {
    let mut header =
        vec!["NAME", "PHASE", "PARALLELISM", "LAST CHECKPOINT", "LAST SAVEPOINT", "AGE"];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut t = Table::new(&header);
    for j in jobs {
        let s = j.status.clone().unwrap_or_default();
        let mut row = vec![
            j.name_any(),
            phase(&s),
            format!("{}/{}", s.job.as_ref().map_or(0, |r| r.parallelism), j.spec.parallelism),
            s.last_checkpoint
                .as_ref()
                .map_or("-".into(), |c| format!("{} ({} ago)", c.id, age(&c.completed_at, now))),
            s.last_savepoint
                .as_ref()
                .map_or("-".into(), |p| format!("{} ago {}", age(&p.completed_at, now), p.path)),
            age_of(j.metadata.creation_timestamp.as_ref(), now),
        ];
        if all_namespaces {
            row.insert(0, j.namespace().unwrap_or_default());
        }
        t.row(row);
    }
    t.render()
}

/// `kubectl weir snapshots`: one row per StreamSnapshot, a NAMESPACE column first with `-A`.
pub fn snapshots_table(snaps: &[StreamSnapshot], all_namespaces: bool, now: Timestamp) -> String {
    let mut header = vec!["NAME", "JOB", "REASON", "PHASE", "PATH", "AGE", "KEEP"];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let mut t = Table::new(&header);
    for s in snaps {
        let st = s.status.clone().unwrap_or_default();
        let mut row = vec![
            s.name_any(),
            s.spec.job.clone(),
            s.spec.reason.map_or("-".into(), |r| format!("{r:?}")),
            st.phase.map_or("-".into(), |p| format!("{p:?}")),
            s.spec.path.to_string(),
            age_of(s.metadata.creation_timestamp.as_ref(), now),
            s.spec.keep.to_string(),
        ];
        if all_namespaces {
            row.insert(0, s.namespace().unwrap_or_default());
        }
        t.row(row);
    }
    t.render()
}

fn phase(s: &StreamJobStatus) -> String {
    s.phase.map_or("-".into(), |p| format!("{p:?}"))
}

fn state(s: DesiredState) -> &'static str {
    match s {
        DesiredState::Running => "running",
        DesiredState::Suspended => "suspended",
    }
}

pub fn mode(m: UpgradeMode) -> &'static str {
    match m {
        UpgradeMode::Savepoint => "savepoint",
        UpgradeMode::LastState => "last-state",
        UpgradeMode::Stateless => "stateless",
    }
}

/// The maxParallelism a rescale must stay within: the one in force once the job has state
/// (the controller records it in the status and refuses to change it), else the spec's,
/// else none but the schema's 32768 (the default follows the parallelism).
pub fn max_parallelism(spec: &StreamJobSpec, st: &StreamJobStatus) -> (i32, &'static str) {
    match (st.max_parallelism, spec.max_parallelism) {
        (Some(m), _) => (m, "status.maxParallelism, fixed since the job has state"),
        (None, Some(m)) => (m, "spec.maxParallelism"),
        (None, None) => (32768, "the most a job can have"),
    }
}

/// `kubectl weir status`: everything the status says, in sections.
pub fn status_text(j: &StreamJob, now: Timestamp) -> String {
    let s = j.status.clone().unwrap_or_default();
    let mut o = String::new();
    let mut line = |label: &str, value: String| o.push_str(&format!("{label:<22}{value}\n"));
    line("Name:", j.name_any());
    line("Namespace:", j.namespace().unwrap_or_default());
    line("Phase:", phase(&s));
    let generation = j.metadata.generation.unwrap_or(0);
    line(
        "Generation:",
        match s.observed_generation {
            Some(g) if g == generation => format!("{generation} (observed)"),
            Some(g) => format!(
                "{generation} (the controller has observed {g}: it has not acted on the latest spec yet)"
            ),
            None => format!("{generation} (not observed by the controller yet)"),
        },
    );
    line("Desired state:", state(j.spec.state).into());
    line("Upgrade mode:", mode(j.spec.upgrade_mode).into());
    let (max, _) = max_parallelism(&j.spec, &s);
    line(
        "Parallelism:",
        format!(
            "{} running / {} desired (maxParallelism {}{})",
            s.job.as_ref().map_or(0, |r| r.parallelism),
            j.spec.parallelism,
            max,
            if s.max_parallelism.is_some() { ", fixed by the job's state" } else { "" }
        ),
    );
    line("Workers connected:", s.replicas.to_string());
    line("Age:", age_of(j.metadata.creation_timestamp.as_ref(), now));

    o.push_str("\nConditions:\n");
    if s.conditions.is_empty() {
        o.push_str("  none yet\n");
    } else {
        let mut t = Table::new(&["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"]);
        for c in &s.conditions {
            t.row(vec![
                c.type_.clone(),
                c.status.clone(),
                c.reason.clone(),
                age(&c.last_transition_time, now),
                c.message.clone(),
            ]);
        }
        o.push_str(&indent(&t.render()));
    }

    let mut section = |title: &str, body: Option<Vec<(&str, String)>>| {
        o.push_str(&format!("\n{title}:"));
        match body {
            None => o.push_str(" none\n"),
            Some(fields) => {
                o.push('\n');
                for (k, v) in fields {
                    o.push_str(&format!("  {:<20}{v}\n", format!("{k}:")));
                }
            }
        }
    };
    section(
        "Job",
        s.job.as_ref().map(|r| {
            vec![
                ("Id", r.id.clone()),
                ("Parallelism", r.parallelism.to_string()),
                ("Restarts", r.restarts.to_string()),
                (
                    "Started",
                    r.start_time
                        .as_ref()
                        .map_or("-".into(), |t| format!("{} ({} ago)", t.0, age(t, now))),
                ),
            ]
        }),
    );
    section(
        "Last checkpoint",
        s.last_checkpoint.as_ref().map(|c| {
            vec![
                ("Id", c.id.to_string()),
                ("Completed", format!("{} ({} ago)", c.completed_at.0, age(&c.completed_at, now))),
                ("Size", bytes(c.size_bytes)),
                ("Path", c.path.clone().unwrap_or_else(|| "-".into())),
            ]
        }),
    );
    section(
        "Last savepoint",
        s.last_savepoint.as_ref().map(|p| {
            vec![
                ("Path", p.path.clone()),
                ("Reason", format!("{:?}", p.reason)),
                ("Completed", format!("{} ({} ago)", p.completed_at.0, age(&p.completed_at, now))),
                ("Snapshot", p.snapshot.clone().unwrap_or_else(|| "-".into())),
            ]
        }),
    );
    section(
        "Savepoint in progress",
        s.savepoint_in_progress.as_ref().map(|p| {
            let mut f = vec![
                ("Reason", format!("{:?}", p.reason)),
                ("Stops the job", p.stop.to_string()),
                ("Requested", format!("{} ago", age(&p.requested_at, now))),
                ("Trigger id", p.trigger_id.clone().unwrap_or_else(|| "-".into())),
                ("Failed attempts", p.failed_attempts.to_string()),
            ];
            if let Some(why) = &p.last_failure {
                f.push(("Last failure", why.clone()));
            }
            f
        }),
    );
    section(
        "Upgrade",
        s.upgrade.as_ref().map(|u| {
            vec![
                (
                    "Generations",
                    format!(
                        "{} -> {}{}",
                        u.from_generation.map_or("-".into(), |g| g.to_string()),
                        u.to_generation,
                        if u.rollback { " (rolling back)" } else { "" }
                    ),
                ),
                ("Mode", mode(u.mode).into()),
                ("Step", format!("{:?}", u.step)),
                ("Started", format!("{} ago", age(&u.started_at, now))),
                ("Restore path", u.restore_path.clone().unwrap_or_else(|| "-".into())),
            ]
        }),
    );
    section(
        "Rolled back",
        s.rolled_back.as_ref().map(|r| {
            vec![
                ("Generation", r.generation.to_string()),
                ("Back to", r.to_generation.map_or("-".into(), |g| g.to_string())),
                ("Reason", r.reason.clone()),
                ("When", format!("{} ago", age(&r.at, now))),
            ]
        }),
    );
    section(
        "Deployed run",
        s.deployed.as_ref().map(|d| {
            vec![
                ("Generation", d.generation.to_string()),
                ("Job id", d.job_id.clone()),
                ("Restored from", d.restore_path.clone().unwrap_or_else(|| "-".into())),
                ("maxParallelism", d.max_parallelism.to_string()),
                ("Stateful operators", d.stateful_uids.join(", ")),
                ("Spec hash", d.spec_hash.clone()),
            ]
        }),
    );
    let stable = s.last_stable_generation.map(|g| format!(" {g}")).unwrap_or_default();
    o.push_str(&format!(
        "\nLast stable generation:{}\n",
        if stable.is_empty() { " none".into() } else { stable }
    ));
    o
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> Timestamp {
        "2025-01-01T12:00:00Z".parse().unwrap()
    }

    fn job(status: serde_json::Value) -> StreamJob {
        serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
            "metadata": {"name": "wc", "namespace": "prod", "generation": 4,
                         "creationTimestamp": "2025-01-01T11:00:00Z"},
            "spec": {"parallelism": 2, "maxParallelism": 128,
                     "pipeline": {"operators": [{"uid": "g", "type": "generator"}]}},
            "status": status,
        }))
        .unwrap()
    }

    fn running() -> StreamJob {
        job(json!({
            "phase": "Running", "observedGeneration": 4, "replicas": 2, "maxParallelism": 128,
            "job": {"id": "wc-1", "parallelism": 2, "restarts": 1,
                    "startTime": "2025-01-01T11:50:00Z"},
            "lastCheckpoint": {"id": 42, "completedAt": "2025-01-01T11:59:55Z",
                               "sizeBytes": 2048, "path": "s3://b/ck/wc-1/chk-42"},
            "lastSavepoint": {"path": "s3://b/sp/sp-3", "completedAt": "2025-01-01T11:57:00Z",
                              "reason": "Requested", "snapshot": "wc-3"},
            "conditions": [{"type": "Ready", "status": "True", "reason": "Running",
                            "message": "the job runs at parallelism 2",
                            "lastTransitionTime": "2025-01-01T11:50:00Z"}],
        }))
    }

    #[test]
    fn the_jobs_table_shows_phase_parallelism_checkpoint_savepoint_and_age() {
        let fresh = {
            let mut j = job(json!({}));
            j.metadata.name = Some("new".into());
            j.status = None;
            j
        };
        let out = jobs_table(&[running(), fresh], false, now());
        assert_eq!(
            out,
            "NAME   PHASE     PARALLELISM   LAST CHECKPOINT   LAST SAVEPOINT          AGE\n\
             wc     Running   2/2           42 (5s ago)       3m ago s3://b/sp/sp-3   60m\n\
             new    -         0/2           -                 -                       60m\n"
        );
    }

    #[test]
    fn all_namespaces_puts_the_namespace_first() {
        let out = jobs_table(&[running()], true, now());
        let header = out.lines().next().unwrap();
        assert!(header.starts_with("NAMESPACE   NAME   PHASE"), "{header}");
        assert!(out.lines().nth(1).unwrap().starts_with("prod        wc     Running"), "{out}");
    }

    #[test]
    fn the_snapshots_table_has_one_row_per_snapshot() {
        let snap: StreamSnapshot = serde_json::from_value(json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "StreamSnapshot",
            "metadata": {"name": "wc-sp-3", "namespace": "prod",
                         "creationTimestamp": "2025-01-01T11:57:00Z"},
            "spec": {"job": "wc", "path": "s3://bkt/sp/sp-3", "reason": "Suspend"},
            "status": {"phase": "Completed"},
        }))
        .unwrap();
        assert_eq!(
            snapshots_table(&[snap], false, now()),
            "NAME      JOB   REASON    PHASE       PATH               AGE   KEEP\n\
             wc-sp-3   wc    Suspend   Completed   s3://bkt/sp/sp-3   3m    false\n"
        );
    }

    #[test]
    fn status_has_a_section_for_each_part_of_the_status() {
        let out = status_text(&running(), now());
        for want in [
            "Phase:                Running",
            "Generation:           4 (observed)",
            "Parallelism:          2 running / 2 desired (maxParallelism 128, fixed by the job's state)",
            "  TYPE    STATUS   REASON    AGE   MESSAGE",
            "  Ready   True     Running   10m   the job runs at parallelism 2",
            "Last checkpoint:\n  Id:                 42\n",
            "  Size:               2.0 KiB",
            "Last savepoint:\n  Path:               s3://b/sp/sp-3",
            "Savepoint in progress: none",
            "Upgrade: none",
            "Rolled back: none",
            "Job:\n  Id:                 wc-1",
            "  Restarts:           1",
        ] {
            assert!(out.contains(want), "missing {want:?} in:\n{out}");
        }
    }

    #[test]
    fn status_says_when_the_controller_has_not_caught_up_with_the_spec() {
        let j = job(json!({"observedGeneration": 3}));
        let out = status_text(&j, now());
        assert!(out.contains("4 (the controller has observed 3"), "{out}");
        assert!(out.contains("Conditions:\n  none yet"), "{out}");
    }

    #[test]
    fn a_rescale_stays_within_the_max_parallelism_in_force() {
        let j = running();
        let st = j.status.clone().unwrap();
        assert_eq!(max_parallelism(&j.spec, &st).0, 128);
        let mut spec = j.spec.clone();
        spec.max_parallelism = None;
        assert_eq!(max_parallelism(&spec, &StreamJobStatus::default()).0, 32768);
        spec.max_parallelism = Some(64);
        assert_eq!(max_parallelism(&spec, &StreamJobStatus::default()).0, 64);
    }
}
