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

/// The job's savepoint directory: `spec.savepoints.directory`, else `savepoints` beside its
/// checkpoint storage (the job's, else `default_storage`), as the runtime chooses it
/// (`weir_runtime::checkpoint::default_savepoint_dir`, which the controller does not link).
pub fn savepoint_dir(job: &StreamJob, default_storage: Option<&StorageUri>) -> Option<StorageUri> {
    if let Some(d) = &job.spec.savepoints.directory {
        return Some(d.clone());
    }
    Some(match job.spec.checkpointing.storage.as_ref().or(default_storage)? {
        StorageUri::Local(p) => match p.parent() {
            Some(parent) if p.file_name().is_some() => StorageUri::Local(parent.join("savepoints")),
            _ => StorageUri::Local(p.join("savepoints")),
        },
        StorageUri::S3 { bucket, prefix } => {
            let prefix = prefix.trim_end_matches('/');
            let parent = prefix
                .rsplit_once('/')
                .map_or("savepoints".to_string(), |(parent, _)| format!("{parent}/savepoints"));
            StorageUri::S3 { bucket: bucket.clone(), prefix: parent }
        }
    })
}

/// Whether retention may delete the data at `path`: only a savepoint of job `ns`/`name`,
/// `<savepoint directory>/<ns>/<name>/sp-<id>/` (where its coordinator writes them), on S3.
/// A path anywhere else (a snapshot imported or edited to point at other data, a directory of
/// another job, a checkpoint) is never deleted: `Err` says why. The caller also requires a
/// `_metadata` there before it starts.
pub fn deletable(
    path: &StorageUri,
    dir: Option<&StorageUri>,
    ns: &str,
    name: &str,
) -> Result<(), String> {
    let Some(dir) = dir else {
        return Err("the job has no savepoint directory (no spec.savepoints.directory and no checkpoint storage) to hold it".into());
    };
    let parent = dir.join(&format!("{ns}/{name}"));
    let (StorageUri::S3 { bucket, prefix }, StorageUri::S3 { bucket: pb, prefix: pp }) =
        (path, &parent)
    else {
        return Err(format!("it is not on S3 below the job's savepoint directory {parent}"));
    };
    let (prefix, pp) = (prefix.trim_end_matches('/'), pp.trim_end_matches('/'));
    let leaf = match prefix.strip_prefix(pp).and_then(|r| r.strip_prefix('/')) {
        Some(leaf) if bucket == pb => leaf,
        _ => return Err(format!("it is not below the job's savepoint directory {parent}")),
    };
    let id = leaf.strip_prefix("sp-").unwrap_or_default();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
        return Err(format!(
            "it is not a savepoint directory {parent}/sp-<id>/ (it ends in {leaf:?})"
        ));
    }
    Ok(())
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
            // Only a savepoint of this job, where its coordinator writes them, with its
            // `_metadata` (checked before the disposal starts: a disposal under way may have
            // deleted it already). Anything else stays, object and data, and says why once.
            let spdir = savepoint_dir(job, self.config.defaults.checkpoint_storage.as_ref());
            let checked = match s.path_changed() {
                Some(changed) => Err(changed),
                None => deletable(&s.spec.path, spdir.as_ref(), &ns, &name),
            };
            let allowed = match checked {
                Err(e) => Err(e),
                Ok(()) if why == Why::Disposing => Ok(()),
                Ok(()) => self.has_metadata(job, &s.spec.path, secret).await,
            };
            if let Err(kept) = allowed {
                let message = format!("retention does not delete {}: {kept}", s.spec.path);
                tracing::warn!(namespace = %ns, job = %name, snapshot = %snap, "{message}");
                if s.status.as_ref().and_then(|x| x.message.as_ref()) != Some(&message) {
                    api.patch_status(
                        &snap,
                        &PatchParams::default(),
                        &Patch::Merge(json!({"status": {"message": message}})),
                    )
                    .await
                    .map_err(kube_err(format!(
                        "writing the status of StreamSnapshot {ns}/{snap}"
                    )))?;
                    self.publish(
                        job,
                        true,
                        "SnapshotKept",
                        format!("StreamSnapshot {snap} is kept ({reason}): {message}"),
                    )
                    .await;
                }
                continue;
            }
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

impl Context {
    /// Whether the savepoint at `path` (on S3) holds its `_metadata`; `Err` says why not.
    async fn has_metadata(
        &self,
        job: &StreamJob,
        path: &StorageUri,
        secret: Option<&BTreeMap<String, ByteString>>,
    ) -> Result<(), String> {
        let StorageUri::S3 { bucket, prefix } = path.clone() else {
            return Err("it is not on S3".into());
        };
        let spec = job.spec.s3.clone();
        let creds = credentials(spec.as_ref(), secret);
        let key = format!("{}/_metadata", prefix.trim_end_matches('/'));
        let k = key.clone();
        let found = tokio::task::spawn_blocking(move || {
            S3Client::with_credentials(spec.as_ref(), creds)?.list(&bucket, &k)
        })
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| {
            format!("looking for its _metadata failed ({}); tried again later", e.message)
        })?;
        if found.iter().any(|o| o.key == key) {
            Ok(())
        } else {
            Err("it holds no _metadata, so it is not a savepoint".into())
        }
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
            path: None,
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
    fn retention_deletes_only_a_savepoint_directory_of_the_job() {
        let job: StreamJob = serde_json::from_value(serde_json::json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
            "metadata": {"name": "wc", "namespace": "ns"},
            "spec": {"checkpointing": {"storage": "s3://bkt/p/checkpoints"},
                     "pipeline": {"operators": []}},
        }))
        .unwrap();
        // Beside the checkpoints, as the runtime puts them.
        let dir = savepoint_dir(&job, None).unwrap();
        assert_eq!(dir.to_string(), "s3://bkt/p/savepoints");
        let ok = |p: &str| deletable(&p.parse().unwrap(), Some(&dir), "ns", "wc");
        assert_eq!(ok("s3://bkt/p/savepoints/ns/wc/sp-0193a1b2c3d4e001"), Ok(()));
        assert_eq!(ok("s3://bkt/p/savepoints/ns/wc/sp-7/"), Ok(()));
        for elsewhere in [
            "s3://other/p/savepoints/ns/wc/sp-7",     // another bucket
            "s3://bkt/p/savepoints/ns/other/sp-7",    // another job
            "s3://bkt/p/savepoints/ns/wc",            // the job's whole directory
            "s3://bkt/p/savepoints/ns/wc/sp-",        // no id
            "s3://bkt/p/savepoints/ns/wc/sp-7/keyed", // inside a savepoint
            "s3://bkt/p/savepoints/ns/wc/chk-7",      // not a savepoint
            "s3://bkt/p/checkpoints/ns/wc/u/chk-7",   // checkpoints
            "s3://bkt/p/savepoints/ns/wcx/sp-7",      // a job whose name starts the same
            "/var/tmp/sp/ns/wc/sp-7",                 // local
        ] {
            assert!(ok(elsewhere).is_err(), "{elsewhere}");
        }
        assert!(deletable(&"s3://bkt/x/ns/wc/sp-1".parse().unwrap(), None, "ns", "wc").is_err());
        // spec.savepoints.directory when it is set; else the operator's default storage.
        let mut j = job.clone();
        j.spec.savepoints.directory = Some("s3://sp-bkt/savepoints".parse().unwrap());
        assert_eq!(savepoint_dir(&j, None).unwrap().to_string(), "s3://sp-bkt/savepoints");
        let mut j = job.clone();
        j.spec.checkpointing.storage = None;
        let default: StorageUri = "s3://dflt/weir/checkpoints".parse().unwrap();
        assert_eq!(
            savepoint_dir(&j, Some(&default)).unwrap().to_string(),
            "s3://dflt/weir/savepoints"
        );
        assert!(savepoint_dir(&j, None).is_none());
    }

    #[test]
    fn a_snapshot_whose_path_changed_is_refused_with_the_rules_words() {
        let mut s = snap("s1", NOW, P, SnapshotPhase::Completed);
        assert_eq!(s.path_changed(), None, "nothing recorded (imported by hand)");
        s.status.as_mut().unwrap().path = Some("s3://bkt/sp/s1".parse().unwrap());
        assert_eq!(s.path_changed(), None);
        s.spec.path = "s3://bkt/elsewhere".parse().unwrap();
        let m = s.path_changed().unwrap();
        assert!(m.contains(weir_crds::rules::SNAPSHOT_PATH_IMMUTABLE.0), "{m}");
        assert!(m.contains("recorded s3://bkt/sp/s1, now s3://bkt/elsewhere"), "{m}");
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
