//! Retention of a job's StreamSnapshots (`spec.savepoints.retention`): the snapshots the
//! controller took (upgrades, suspends, deletions, nonces, periods) beyond `maxCount`, or older
//! than `maxAge`, go, their data on S3 first. Never the newest, never one marked `keep`, one
//! imported by hand (no reason), or one a run may still need (the deployed run's restore
//! point, `spec.restore`).
//!
//! Deleting is recorded before it is done: the snapshot's phase becomes Disposing, then the
//! data under its path is deleted, then the object. A controller that dies in between finds
//! the Disposing snapshot and finishes the job, which is idempotent.

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::json;
use weir_crds::snapshot::{SnapshotPhase, StreamSnapshot};
use weir_crds::streamjob::{S3Spec, SnapshotRetention, StreamJobStatus};
use weir_crds::{LABEL_JOB, StorageUri, StreamJob};
use weir_storage::objstore::{Credentials, S3Client};

use crate::{Context, Error, kube_err};

/// Why a snapshot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Why {
    /// More than `maxCount` newer ones.
    Count,
    /// Older than `maxAge`.
    Age,
    /// Already being disposed of.
    Disposing,
}

/// The snapshots of `snaps` (one job's) that retention removes, with why. `protected` are
/// paths a run may still restore from.
pub fn expired<'a>(
    snaps: &'a [StreamSnapshot],
    retention: &SnapshotRetention,
    protected: &[String],
    now: Timestamp,
) -> Vec<(&'a StreamSnapshot, Why)> {
    let phase = |s: &StreamSnapshot| s.status.as_ref().and_then(|s| s.phase);
    let completed_at = |s: &StreamSnapshot| {
        s.status
            .as_ref()
            .and_then(|s| s.completed_at.as_ref())
            .or(s.metadata.creation_timestamp.as_ref())
            .map(|t| t.0)
            .unwrap_or(Timestamp::UNIX_EPOCH)
    };
    let mut completed: Vec<&StreamSnapshot> =
        snaps.iter().filter(|s| phase(s) == Some(SnapshotPhase::Completed)).collect();
    completed.sort_by_key(|s| std::cmp::Reverse((completed_at(s), s.name_any())));
    let newest = completed.first().map(|s| s.name_any());
    let max_age = retention.max_age.as_std().as_secs() as i64;
    let mut out: Vec<(&StreamSnapshot, Why)> = snaps
        .iter()
        .filter(|s| phase(s) == Some(SnapshotPhase::Disposing))
        .map(|s| (s, Why::Disposing))
        .collect();
    let mut kept = 0;
    for s in completed {
        let ours = s.spec.reason.is_some() && !s.spec.keep;
        if !ours || Some(s.name_any()) == newest || protected.contains(&s.spec.path.to_string()) {
            continue;
        }
        kept += 1;
        if kept > retention.max_count.max(1) - 1 {
            // The newest (not counted here) is one of the maxCount kept.
            out.push((s, Why::Count));
        } else if max_age > 0 && now.duration_since(completed_at(s)).as_secs() > max_age {
            out.push((s, Why::Age));
        }
    }
    out
}

/// The paths a run of `job` may still restore from.
pub fn protected(job: &StreamJob, st: &StreamJobStatus, snaps: &[StreamSnapshot]) -> Vec<String> {
    let mut p: Vec<String> = Vec::new();
    p.extend(st.deployed.as_ref().and_then(|d| d.restore_path.clone()));
    p.extend(st.upgrade.as_ref().and_then(|u| u.restore_path.clone()));
    if let Some(r) = &job.spec.restore {
        p.extend(r.path.as_ref().map(|x| x.to_string()));
        if let Some(name) = &r.snapshot {
            p.extend(
                snaps.iter().filter(|s| &s.name_any() == name).map(|s| s.spec.path.to_string()),
            );
        }
    }
    p
}

/// The S3 credentials of the job's `spec.s3.credentialsSecret`, from the Secret's data.
pub fn credentials(
    s3: Option<&S3Spec>,
    secret: Option<&BTreeMap<String, ByteString>>,
) -> Option<Credentials> {
    let r = s3?.credentials_secret.as_ref()?;
    let data = secret?;
    let text = |k: &str| data.get(k).map(|v| String::from_utf8_lossy(&v.0).trim().to_string());
    let mut c = Credentials::new(text(&r.access_key_id_key)?, text(&r.secret_access_key_key)?);
    c.session_token = r.session_token_key.as_deref().and_then(text);
    Some(c)
}

impl Context {
    /// One pass of retention over the snapshots of `job`. Problems are reported (a Warning
    /// event), not returned: retention never holds up a job.
    pub(crate) async fn retain(
        &self,
        job: &StreamJob,
        st: &StreamJobStatus,
        secret: Option<&BTreeMap<String, ByteString>>,
    ) -> Result<(), Error> {
        let ns = job.namespace().unwrap_or_else(|| "default".into());
        let name = job.name_any();
        let api: Api<StreamSnapshot> = Api::namespaced(self.client.clone(), &ns);
        let snaps: Vec<StreamSnapshot> = api
            .list(&ListParams::default().labels(&format!("{LABEL_JOB}={name}")))
            .await
            .map_err(kube_err(format!("listing the StreamSnapshots of {ns}/{name}")))?
            .items
            .into_iter()
            .filter(|s| s.spec.job == name)
            .collect();
        let protected = protected(job, st, &snaps);
        let retention = &job.spec.savepoints.retention;
        for (s, why) in expired(&snaps, retention, &protected, Timestamp::now()) {
            let snap = s.name_any();
            let reason = match why {
                Why::Count => format!(
                    "more than spec.savepoints.retention.maxCount ({}) newer snapshots",
                    retention.max_count
                ),
                Why::Age => format!(
                    "older than spec.savepoints.retention.maxAge ({} s)",
                    retention.max_age.as_std().as_secs()
                ),
                Why::Disposing => "its disposal was under way".into(),
            };
            if why != Why::Disposing {
                api.patch_status(
                    &snap,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"phase": "Disposing", "message": format!("deleted by retention: {reason}")}})),
                )
                .await
                .map_err(kube_err(format!("marking StreamSnapshot {ns}/{snap} Disposing")))?;
            }
            let deleted = match s.spec.path.clone() {
                StorageUri::S3 { bucket, prefix } => {
                    let spec = job.spec.s3.clone();
                    let creds = credentials(spec.as_ref(), secret);
                    let dir = format!("{}/", prefix.trim_end_matches('/'));
                    tokio::task::spawn_blocking(move || {
                        S3Client::with_credentials(spec.as_ref(), creds)?
                            .delete_prefix(&bucket, &dir)
                    })
                    .await
                    .map_err(|e| weir_storage::error::RuntimeError::internal(e.to_string()))
                    .and_then(|r| r)
                    .map(|n| format!("{n} objects"))
                }
                // Not reachable from a cluster's controller (the spec refuses local
                // savepoint directories there); the object goes, the files stay.
                StorageUri::Local(p) => Ok(format!("the local directory {} left", p.display())),
            };
            match deleted {
                Ok(what) => {
                    match api.delete(&snap, &DeleteParams::default()).await {
                        Ok(_) => {}
                        Err(kube::Error::Api(e)) if e.code == 404 => {}
                        Err(e) => {
                            return Err(kube_err(format!("deleting StreamSnapshot {ns}/{snap}"))(
                                e,
                            ));
                        }
                    }
                    self.publish(
                        job,
                        false,
                        "SnapshotDeleted",
                        format!(
                            "deleted StreamSnapshot {snap} and its data at {} ({what}): {reason}",
                            s.spec.path
                        ),
                    )
                    .await;
                }
                Err(e) => {
                    self.publish(
                        job,
                        true,
                        "SnapshotDeleteFailed",
                        format!(
                            "StreamSnapshot {snap}: deleting its data at {} failed: {}; tried again later",
                            s.spec.path, e.message
                        ),
                    )
                    .await;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use weir_crds::snapshot::{StreamSnapshotSpec, StreamSnapshotStatus};
    use weir_crds::streamjob::SavepointReason;

    fn snap(
        name: &str,
        at: i64,
        reason: Option<SavepointReason>,
        phase: SnapshotPhase,
    ) -> StreamSnapshot {
        let mut s = StreamSnapshot::new(
            name,
            StreamSnapshotSpec {
                job: "wc".into(),
                job_id: None,
                generation: None,
                path: format!("s3://bkt/sp/{name}").parse().unwrap(),
                parallelism: None,
                max_parallelism: None,
                operator_uids: vec![],
                reason,
                keep: false,
            },
        );
        s.status = Some(StreamSnapshotStatus {
            phase: Some(phase),
            completed_at: Some(Time(Timestamp::from_second(at).unwrap())),
            size_bytes: None,
            message: None,
        });
        s
    }

    fn names(v: &[(&StreamSnapshot, Why)]) -> Vec<(String, Why)> {
        v.iter().map(|(s, w)| (s.name_any(), *w)).collect()
    }

    const NOW: i64 = 1_000_000;
    const P: Option<SavepointReason> = Some(SavepointReason::Periodic);

    fn retention(count: i32, age: u64) -> SnapshotRetention {
        SnapshotRetention { max_count: count, max_age: weir_crds::Duration::from_secs(age) }
    }

    #[test]
    fn the_newest_max_count_stay_and_the_older_go() {
        let snaps: Vec<_> = (0..5)
            .map(|i| snap(&format!("s{i}"), NOW - 100 + i, P, SnapshotPhase::Completed))
            .collect();
        let now = Timestamp::from_second(NOW).unwrap();
        let out = expired(&snaps, &retention(2, 3600), &[], now);
        assert_eq!(
            names(&out),
            [("s2".into(), Why::Count), ("s1".into(), Why::Count), ("s0".into(), Why::Count)]
        );
        // maxCount 1 keeps the newest only.
        assert_eq!(expired(&snaps, &retention(1, 3600), &[], now).len(), 4);
    }

    #[test]
    fn age_takes_all_but_the_newest_and_what_is_kept_protected_or_imported_stays() {
        let mut snaps: Vec<_> = (0..5)
            .map(|i| snap(&format!("s{i}"), NOW - 1000 + i, P, SnapshotPhase::Completed))
            .collect();
        snaps[0].spec.keep = true;
        snaps[1].spec.reason = None; // imported by hand
        snaps.push(snap("gone", NOW - 5000, P, SnapshotPhase::Disposing));
        snaps.push(snap("failed", NOW - 5000, P, SnapshotPhase::Failed));
        let protected = vec!["s3://bkt/sp/s2".to_string()];
        let now = Timestamp::from_second(NOW).unwrap();
        let out = expired(&snaps, &retention(10, 60), &protected, now);
        assert_eq!(names(&out), [("gone".into(), Why::Disposing), ("s3".into(), Why::Age)]);
        // Nothing older than maxAge: only the disposal under way goes on.
        let out = expired(&snaps, &retention(10, 3600), &protected, now);
        assert_eq!(names(&out), [("gone".into(), Why::Disposing)]);
    }

    #[test]
    fn credentials_come_from_the_secret_keys_the_spec_names() {
        let s3: S3Spec = serde_json::from_value(serde_json::json!({
            "credentialsSecret": {"name": "s", "accessKeyIdKey": "id", "secretAccessKeyKey": "key", "sessionTokenKey": "tok"}
        }))
        .unwrap();
        let data: BTreeMap<String, ByteString> = [("id", "AK\n"), ("key", "SK"), ("tok", "T")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
            .collect();
        let c = credentials(Some(&s3), Some(&data)).unwrap();
        assert_eq!((c.access_key_id.as_str(), c.secret_access_key.as_str()), ("AK", "SK"));
        assert_eq!(c.session_token.as_deref(), Some("T"));
        assert!(credentials(Some(&s3), None).is_none());
        assert!(credentials(None, Some(&data)).is_none());
    }
}
