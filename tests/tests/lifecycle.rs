//! A job's life under the controller beyond the happy path, against the real control plane,
//! node agent and S3 server: a new version whose pods do not start is rolled back from the
//! upgrade's savepoint; refused upgrades and a savepoint that S3 does not take leave the old
//! job running; suspend and resume; a named StreamSnapshot restored into a new job; and an
//! upgrade that survives the controller killed at each of its step boundaries. Every test
//! ends with the committed output holding each count of each word exactly once.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use weir_crds::StreamJob;
use weir_crds::snapshot::{SnapshotPhase, StreamSnapshot};
use weir_crds::streamjob::{JobPhase, SavepointReason};
use weir_e2e::jobs::{
    Controller, MISSING_IMAGE, WORDS_PER_LINE, apply, assert_exactly_once, committed, condition,
    events, job_id, s3_keys, show, status, wait_job, wait_job_within, wordcount,
};
use weir_e2e::testenv::{TestEnv, setting, wait_for};

/// Running the spec it has at `parallelism` under another job id than `not`, nothing under
/// way.
async fn runs_anew(env: &TestEnv, ns: &str, name: &str, parallelism: i32, not: &str) -> StreamJob {
    wait_job(
        env,
        ns,
        name,
        &format!("running at parallelism {parallelism} under a new job id"),
        |j| {
            let s = status(j);
            s.phase == Some(JobPhase::Running)
                && s.upgrade.is_none()
                && s.observed_generation == j.metadata.generation
                && s.job.as_ref().is_some_and(|r| r.parallelism == parallelism && r.id != not)
        },
    )
    .await
}

async fn running_with_checkpoint(env: &TestEnv, ns: &str, name: &str) -> StreamJob {
    wait_job(env, ns, name, "running with a checkpoint", |j| {
        let s = status(j);
        s.phase == Some(JobPhase::Running) && s.last_checkpoint.is_some()
    })
    .await
}

/// The old job goes on: the same run checkpoints again after `j`'s checkpoint.
async fn keeps_running(env: &TestEnv, ns: &str, name: &str, j: &StreamJob) {
    let (id, before) = (job_id(j), status(j).last_checkpoint.map_or(0, |c| c.id));
    wait_job(env, ns, name, "the old job checkpointing on", |j| {
        job_id(j) == id && status(j).last_checkpoint.is_some_and(|c| c.id > before + 2)
    })
    .await;
}

async fn snapshots(env: &TestEnv, ns: &str, job: &str) -> Vec<StreamSnapshot> {
    let api: Api<StreamSnapshot> = Api::namespaced(env.client.clone(), ns);
    api.list(&ListParams::default().labels(&format!("weir.dev/job={job}"))).await.unwrap().items
}

async fn patch_spec(env: &TestEnv, ns: &str, name: &str, spec: Value) {
    let api: Api<StreamJob> = Api::namespaced(env.client.clone(), ns);
    api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": spec}))).await.unwrap();
}

/// Waits for the bounded job to finish (its generator runs at 200 lines/s, minutes) and
/// checks its output.
async fn finished_exactly_once(env: &TestEnv, ns: &str, name: &str, lines: u64) {
    let limit = Duration::from_secs(lines / 200 + 180);
    wait_job_within(env, ns, name, "finished", limit, |j| {
        status(j).phase == Some(JobPhase::Finished)
    })
    .await;
    assert_exactly_once(&format!("{ns}/{name}/out"), lines * WORDS_PER_LINE);
}

#[tokio::test]
async fn a_new_version_whose_pods_do_not_start_is_rolled_back_and_a_fixed_one_goes_through() {
    const LINES: u64 = 30_000;
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-rollback").await;
    env.create_s3_credentials(&ns).await;
    let _ctl = Controller::start(&env, &ns, &[]);
    apply(&env, &wordcount(&ns, "wc", 2, LINES));
    let j = running_with_checkpoint(&env, &ns, "wc").await;
    show("applied", &j);
    let first = job_id(&j);
    wait_job(&env, &ns, "wc", "its spec recorded as stable", |j| {
        status(j).last_stable_generation == Some(1)
    })
    .await;

    // Generation 2: an image tag that was never pushed (the controller cannot know). Its
    // pods do not start (ErrImagePull); after readyTimeout the job goes back to generation 1
    // from the upgrade's savepoint.
    let mut bad = wordcount(&ns, "wc", 3, LINES);
    bad["spec"]["image"] = json!(MISSING_IMAGE);
    bad["spec"]["upgrade"] = json!({"readyTimeout": "20s"});
    apply(&env, &bad);
    let j = wait_job(&env, &ns, "wc", "rolled back to generation 1", |j| {
        let s = status(j);
        s.phase == Some(JobPhase::Running)
            && s.upgrade.is_none()
            && s.rolled_back.as_ref().is_some_and(|r| r.generation == 2)
            && s.deployed.as_ref().is_some_and(|d| d.generation == 1)
            && s.job.as_ref().is_some_and(|r| r.id != first && r.parallelism == 2)
    })
    .await;
    show("rolled back", &j);
    let s = status(&j);
    let r = s.rolled_back.clone().unwrap();
    assert!(r.reason.contains("spec.upgrade.readyTimeout (20 s)"), "{r:?}");
    let sp = s.last_savepoint.clone().expect("the upgrade's savepoint");
    assert_eq!(sp.reason, SavepointReason::Upgrade);
    assert_eq!(s.deployed.as_ref().unwrap().restore_path.as_deref(), Some(sp.path.as_str()));
    assert_eq!(condition(&j, "Degraded"), Some(("True".into(), "RolledBack".into())));
    let ev = events(&env, &ns, "wc").await;
    let reasons: Vec<&str> = ev.iter().map(|(r, _)| r.as_str()).collect();
    assert!(reasons.contains(&"RollingBack") && reasons.contains(&"RolledBack"), "{ev:?}");
    // The failed spec is not tried again while it stands.
    let rolled = job_id(&j);
    keeps_running(&env, &ns, "wc", &j).await;
    let started =
        |ev: &[(String, String)]| ev.iter().filter(|(r, _)| r == "UpgradeStarted").count();
    assert_eq!(started(&events(&env, &ns, "wc").await), 1);

    // Generation 3: the fix. It goes from the rolled-back job, with a savepoint of its own.
    apply(&env, &wordcount(&ns, "wc", 3, LINES));
    let j = runs_anew(&env, &ns, "wc", 3, &rolled).await;
    show("fixed", &j);
    let s = status(&j);
    assert!(s.rolled_back.is_none(), "{:?}", s.rolled_back);
    assert_eq!(condition(&j, "Degraded").map(|c| c.0), Some("False".into()));
    assert_eq!(s.deployed.as_ref().map(|d| d.generation), Some(3));
    finished_exactly_once(&env, &ns, "wc", LINES).await;
}

/// What the fault proxy does to requests for a key under its needle.
const PASS: u8 = 0;
const UNAVAILABLE: u8 = 1;
/// Holds the request until the mode changes (S3 that does not answer: a savepoint stays in
/// progress), then passes it on.
const HANG: u8 = 2;

/// A TCP proxy in front of the S3 server that, when told, answers every request whose
/// request line holds `needle` with 503 Service Unavailable: S3 gone for those keys only.
struct S3Proxy {
    port: u16,
    mode: std::sync::Arc<std::sync::atomic::AtomicU8>,
}

impl S3Proxy {
    fn start(upstream: String, needle: String) -> Self {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let mode = std::sync::Arc::new(std::sync::atomic::AtomicU8::new(PASS));
        let m = mode.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&upstream) else { continue };
                let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (m, needle) = (m.clone(), needle.clone());
                std::thread::spawn(move || {
                    let (mut from, mut to) = (client, server);
                    let mut buf = [0u8; 16 << 10];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        let line_end = buf[..n].iter().position(|b| *b == b'\n').unwrap_or(n);
                        let line = String::from_utf8_lossy(&buf[..line_end]);
                        while m.load(Ordering::Relaxed) == HANG
                            && line.ends_with("HTTP/1.1\r")
                            && line.contains(&needle)
                        {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        if m.load(Ordering::Relaxed) == UNAVAILABLE
                            && line.ends_with("HTTP/1.1\r")
                            && line.contains(&needle)
                        {
                            let body = "<Error><Code>ServiceUnavailable</Code><Message>the test made S3 unavailable</Message></Error>";
                            let _ = write!(
                                from,
                                "HTTP/1.1 503 Service Unavailable\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                                body.len()
                            );
                            break;
                        }
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                    let _ = from.shutdown(std::net::Shutdown::Both);
                    let _ = to.shutdown(std::net::Shutdown::Both);
                });
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut s2, &mut c2);
                    let _ = c2.shutdown(std::net::Shutdown::Both);
                });
            }
        });
        Self { port, mode }
    }
}

#[tokio::test]
async fn refused_upgrades_and_a_savepoint_s3_does_not_take_leave_the_old_job_running() {
    const LINES: u64 = 30_000;
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-refuse").await;
    env.create_s3_credentials(&ns).await;
    let upstream = setting("AWS_ENDPOINT_URL");
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
    let proxy = S3Proxy::start(upstream, format!("/{ns}/savepoints/"));
    let bucket = setting("WEIR_TEST_BUCKET");
    let manifest = |parallelism: i32| {
        let mut m = wordcount(&ns, "wc", parallelism, LINES);
        m["spec"]["s3"]["endpoint"] = json!(format!("http://127.0.0.1:{}", proxy.port));
        m["spec"]["savepoints"] = json!({"directory": format!("s3://{bucket}/{ns}/savepoints")});
        m
    };
    let _ctl = Controller::start(&env, &ns, &[]);
    apply(&env, &manifest(2));
    let j = running_with_checkpoint(&env, &ns, "wc").await;
    let first = job_id(&j);

    // A changed maxParallelism: refused, named, the old job left alone. The CRD's transition
    // rule refuses it at apply (the controller's own refusal, for an apiserver without the
    // rule, is shown in controller.rs).
    let mut m = manifest(2);
    m["spec"]["maxParallelism"] = json!(256);
    let yaml = serde_saphyr::to_string(&m).unwrap();
    let (ok, out, err) = env.kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
    assert!(!ok, "the maxParallelism change was accepted: {out}");
    assert!(err.contains("spec.maxParallelism"), "the refusal does not name the field: {err}");
    let j: StreamJob = Api::namespaced(env.client.clone(), &ns).get("wc").await.unwrap();
    assert_eq!(j.spec.max_parallelism, Some(128), "the refused change reached the object");
    keeps_running(&env, &ns, "wc", &j).await;

    // A stateful operator dropped without allowNonRestoredState: refused, named.
    let mut m = manifest(2);
    let ops = m["spec"]["pipeline"]["operators"].as_array_mut().unwrap();
    ops.remove(2);
    ops[2]["inputs"] = json!(["words"]);
    apply(&env, &m);
    let j = wait_job(&env, &ns, "wc", "the dropped uid refused", |j| {
        status(j).conditions.iter().any(|c| {
            c.type_ == "Degraded"
                && c.reason == "UpgradeRefused"
                && c.message.contains("\"counts\"")
                && c.message.contains("allowNonRestoredState")
        })
    })
    .await;
    assert_eq!(job_id(&j), first);
    keeps_running(&env, &ns, "wc", &j).await;

    // Another state backend from the last checkpoint: refused, named (a savepoint can do it).
    let mut m = manifest(2);
    m["spec"]["stateBackend"] = json!("heap");
    m["spec"]["upgradeMode"] = json!("last-state");
    apply(&env, &m);
    let j = wait_job(&env, &ns, "wc", "the last-state backend change refused", |j| {
        status(j).conditions.iter().any(|c| {
            c.type_ == "Degraded"
                && c.reason == "UpgradeRefused"
                && c.message.contains("spec.stateBackend: changing it from rocksdb to heap")
                && c.message.contains("spec.upgradeMode: savepoint")
        })
    })
    .await;
    assert_eq!(job_id(&j), first);
    keeps_running(&env, &ns, "wc", &j).await;

    // Back to the running spec; then a rescale, onto the heap backend, while S3 does not take
    // savepoints: the savepoint carries the state from RocksDB into the heap.
    apply(&env, &manifest(2));
    wait_job(&env, &ns, "wc", "Degraded cleared", |j| {
        condition(j, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    proxy.mode.store(UNAVAILABLE, std::sync::atomic::Ordering::Relaxed);
    let mut heap = manifest(3);
    heap["spec"]["stateBackend"] = json!("heap");
    apply(&env, &heap);
    let j = wait_job(&env, &ns, "wc", "the upgrade's savepoint failing", |j| {
        condition(j, "Degraded").is_some_and(|c| c.1 == "SavepointFailed")
    })
    .await;
    let msg = status(&j).conditions.into_iter().find(|c| c.type_ == "Degraded").unwrap().message;
    assert!(
        msg.contains("attempt 1") && msg.contains("goes on running") && msg.contains("503"),
        "{msg}"
    );
    assert_eq!(job_id(&j), first);
    keeps_running(&env, &ns, "wc", &j).await;
    let j = wait_job(&env, &ns, "wc", "still the old job", |j| job_id(j) == first).await;
    assert_eq!(status(&j).phase, Some(JobPhase::Upgrading));
    // S3 back: the next attempt goes through and the upgrade completes.
    proxy.mode.store(PASS, std::sync::atomic::Ordering::Relaxed);
    let j = runs_anew(&env, &ns, "wc", 3, &first).await;
    show("after S3 came back", &j);
    let deployed = status(&j).deployed.expect("the new version deployed");
    assert_eq!(deployed.state_backend.as_str(), "heap");
    let ev = events(&env, &ns, "wc").await;
    assert!(ev.iter().any(|(r, _)| r == "SavepointFailed"), "{ev:?}");
    finished_exactly_once(&env, &ns, "wc", LINES).await;
}

#[tokio::test]
async fn suspend_resume_and_a_named_snapshot_restored_into_a_new_job() {
    const LINES: u64 = 20_000;
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-suspend").await;
    env.create_s3_credentials(&ns).await;
    let _ctl = Controller::start(&env, &ns, &[]);
    apply(&env, &wordcount(&ns, "wc", 2, LINES));
    let j = running_with_checkpoint(&env, &ns, "wc").await;
    let first = job_id(&j);

    // Suspended: a savepoint, then no pods.
    patch_spec(&env, &ns, "wc", json!({"state": "suspended"})).await;
    let j =
        wait_job(&env, &ns, "wc", "suspended", |j| status(j).phase == Some(JobPhase::Suspended))
            .await;
    let sp = status(&j).last_savepoint.expect("the suspend's savepoint");
    assert_eq!(sp.reason, SavepointReason::Suspend);
    wait_for("the job's pods gone", Duration::from_secs(60), || async {
        let (_, pods, _) = env.kubectl(&["get", "pods", "-n", &ns, "-o", "name"]);
        pods.trim().is_empty().then_some(())
    })
    .await;
    let snap_name = sp.snapshot.clone().unwrap();

    // A new job from the named snapshot; a name that does not exist is refused first.
    let mut other = wordcount(&ns, "other", 2, LINES);
    other["spec"]["restore"] = json!({"snapshot": "no-such-snapshot"});
    apply(&env, &other);
    let o = wait_job(&env, &ns, "other", "refused", |j| {
        condition(j, "Degraded").is_some_and(|c| c.0 == "True")
    })
    .await;
    let msg = status(&o).conditions.into_iter().find(|c| c.type_ == "Degraded").unwrap().message;
    assert!(msg.contains("spec.restore.snapshot") && msg.contains("no-such-snapshot"), "{msg}");
    other["spec"]["restore"] = json!({"snapshot": snap_name});
    apply(&env, &other);
    let o = running_with_checkpoint(&env, &ns, "other").await;
    assert_eq!(
        status(&o).deployed.and_then(|d| d.restore_path),
        Some(sp.path.clone()),
        "the new job starts from the snapshot"
    );

    // Resumed: a new run from the suspend's savepoint.
    patch_spec(&env, &ns, "wc", json!({"state": "running"})).await;
    let j = runs_anew(&env, &ns, "wc", 2, &first).await;
    assert_eq!(status(&j).deployed.and_then(|d| d.restore_path), Some(sp.path.clone()));
    // restartNonce: the coordinator starts again and resumes the same run from its last
    // checkpoint.
    let (resumed, started) = (job_id(&j), status(&j).job.and_then(|r| r.start_time));
    running_with_checkpoint(&env, &ns, "wc").await;
    patch_spec(&env, &ns, "wc", json!({"restartNonce": 1})).await;
    let j = wait_job(&env, &ns, "wc", "restarted by the nonce", |j| {
        let s = status(j);
        s.phase == Some(JobPhase::Running)
            && s.observed_restart_nonce == Some(1)
            && s.job.as_ref().is_some_and(|r| r.start_time > started)
    })
    .await;
    assert_eq!(job_id(&j), resumed, "the same run goes on");

    finished_exactly_once(&env, &ns, "wc", LINES).await;
    // The job restored from the snapshot counted on from the counts in it: its counts of a
    // word are the ones above the snapshot's, each once, up to the same final count.
    wait_job(&env, &ns, "other", "finished", |j| status(j).phase == Some(JobPhase::Finished)).await;
    let finals = |prefix: &str| {
        let mut m = std::collections::BTreeMap::<String, Vec<u64>>::new();
        for (w, c) in committed(prefix) {
            m.entry(w).or_default().push(c);
        }
        m
    };
    let wc = finals(&format!("{ns}/wc/out"));
    let restored = finals(&format!("{ns}/other/out"));
    for (w, mut counts) in restored {
        counts.sort_unstable();
        let top = *counts.last().unwrap();
        let from = top - counts.len() as u64 + 1;
        assert_eq!(counts, (from..=top).collect::<Vec<_>>(), "the counts of {w:?}");
        assert_eq!(Some(&top), wc[&w].iter().max(), "the final count of {w:?}");
    }
}

#[tokio::test]
async fn an_upgrade_completes_once_with_the_controller_killed_at_each_step() {
    const LINES: u64 = 30_000;
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-kill").await;
    env.create_s3_credentials(&ns).await;
    let ctl = Controller::start(&env, &ns, &[]);
    apply(&env, &wordcount(&ns, "wc", 2, LINES));
    let j = running_with_checkpoint(&env, &ns, "wc").await;
    let mut id = job_id(&j);
    drop(ctl);
    let points = [
        "savepoint-requested",
        "savepoint-completed",
        "new-spec-recorded",
        "objects-applied",
        "restoring",
    ];
    for (k, point) in points.iter().enumerate() {
        let parallelism = if k % 2 == 0 { 3 } else { 2 };
        let mut ctl = Controller::start(&env, &ns, &[("WEIR_CONTROLLER_CRASH_AT", point)]);
        apply(&env, &wordcount(&ns, "wc", parallelism, LINES));
        let code = ctl.exited(&format!("the controller to die at {point}")).await;
        assert_eq!(code, Some(86), "the controller did not stop at {point}");
        let j = wait_job(&env, &ns, "wc", "the upgrade recorded", |j| status(j).upgrade.is_some())
            .await;
        eprintln!("killed at {point}: upgrade {:?}", status(&j).upgrade.map(|u| u.step));
        let _ctl = Controller::start(&env, &ns, &[]);
        let j = runs_anew(&env, &ns, "wc", parallelism, &id).await;
        show(point, &j);
        id = job_id(&j);
    }
    // One savepoint and one completion per upgrade: nothing repeated, nothing skipped.
    let ups: Vec<StreamSnapshot> = snapshots(&env, &ns, "wc")
        .await
        .into_iter()
        .filter(|s| s.spec.reason == Some(SavepointReason::Upgrade))
        .collect();
    assert_eq!(
        ups.len(),
        points.len(),
        "{:?}",
        ups.iter().map(|s| &s.metadata.name).collect::<Vec<_>>()
    );
    assert!(
        ups.iter()
            .all(|s| s.status.as_ref().and_then(|s| s.phase) == Some(SnapshotPhase::Completed))
    );
    let ev = events(&env, &ns, "wc").await;
    let count = |reason: &str| ev.iter().filter(|(r, _)| r == reason).count();
    assert_eq!(count("UpgradeStarted"), points.len(), "{ev:?}");
    assert_eq!(count("UpgradeCompleted"), points.len(), "{ev:?}");
    let _ctl = Controller::start(&env, &ns, &[]);
    finished_exactly_once(&env, &ns, "wc", LINES).await;
}

#[tokio::test]
async fn retention_keeps_the_newest_snapshots_and_deletes_the_others_with_their_data() {
    const LINES: u64 = 24_000; // long enough to be running still at the periodic savepoint, under load
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-retain").await;
    env.create_s3_credentials(&ns).await;
    let _ctl = Controller::start(&env, &ns, &[]);
    let mut m = wordcount(&ns, "wc", 2, LINES);
    m["spec"]["savepoints"] = json!({"retention": {"maxCount": 2}});
    apply(&env, &m);
    running_with_checkpoint(&env, &ns, "wc").await;
    let bucket = setting("WEIR_TEST_BUCKET");
    let key_of = |s: &StreamSnapshot| {
        let p = s.spec.path.to_string();
        format!("{}/", p.trim_start_matches(&format!("s3://{bucket}/")))
    };
    // Four savepoints asked for by nonce, each waited for.
    let mut taken: Vec<String> = Vec::new();
    for nonce in 1..=4 {
        patch_spec(&env, &ns, "wc", json!({"savepoints": {"triggerNonce": nonce}})).await;
        let j = wait_job(&env, &ns, "wc", &format!("savepoint {nonce}"), |j| {
            status(j)
                .last_savepoint
                .is_some_and(|s| !taken.contains(&s.path) && s.reason == SavepointReason::Requested)
        })
        .await;
        taken.push(status(&j).last_savepoint.unwrap().path);
    }
    // The two newest stay; the others go, their data first.
    let left = wait_for("retention down to 2 snapshots", Duration::from_secs(60), || async {
        let s = snapshots(&env, &ns, "wc").await;
        (s.len() == 2).then_some(s)
    })
    .await;
    let mut kept: Vec<String> = left.iter().map(|s| s.spec.path.to_string()).collect();
    kept.sort();
    let mut newest = taken[2..].to_vec();
    newest.sort();
    assert_eq!(kept, newest);
    for s in &left {
        assert!(s3_keys(&key_of(s)).iter().any(|k| k.ends_with("/_metadata")), "{:?}", s.spec.path);
    }
    for gone in &taken[..2] {
        let prefix = format!("{}/", gone.trim_start_matches(&format!("s3://{bucket}/")));
        assert_eq!(s3_keys(&prefix), Vec::<String>::new(), "the data of {gone} is deleted");
    }
    let ev = events(&env, &ns, "wc").await;
    assert_eq!(ev.iter().filter(|(r, _)| r == "SnapshotDeleted").count(), 2, "{ev:?}");

    // By age: everything but the newest is older than a second.
    patch_spec(
        &env,
        &ns,
        "wc",
        json!({"savepoints": {"triggerNonce": 5, "retention": {"maxCount": 10, "maxAge": "1s"}}}),
    )
    .await;
    let left = wait_for("retention by age down to the newest", Duration::from_secs(60), || async {
        let s = snapshots(&env, &ns, "wc").await;
        (s.len() == 1 && !taken.contains(&s[0].spec.path.to_string())).then_some(s)
    })
    .await;
    assert!(s3_keys(&key_of(&left[0])).iter().any(|k| k.ends_with("/_metadata")));
    for gone in &taken {
        let prefix = format!("{}/", gone.trim_start_matches(&format!("s3://{bucket}/")));
        assert!(s3_keys(&prefix).is_empty(), "the data of {gone} is deleted");
    }
    // Periodic savepoints, every 3 s.
    patch_spec(&env, &ns, "wc", json!({"savepoints": {"interval": "3s"}})).await;
    wait_job(&env, &ns, "wc", "a periodic savepoint", |j| {
        status(j).last_savepoint.is_some_and(|s| s.reason == SavepointReason::Periodic)
    })
    .await;
    finished_exactly_once(&env, &ns, "wc", LINES).await;
}

#[tokio::test]
async fn on_cancel_delete_takes_the_checkpoints_of_a_job_deleted_without_a_savepoint_only() {
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-oncancel").await;
    env.create_s3_credentials(&ns).await;
    let _ctl = Controller::start(&env, &ns, &[]);
    // Both with `onCancel: delete`. "gone" in last-state mode: deleted without a savepoint,
    // its checkpoints go. "kept" in savepoint mode: deleted with a final savepoint, so not
    // cancelled: its checkpoints stay.
    let mut gone = wordcount(&ns, "gone", 1, 1_000_000);
    gone["spec"]["upgradeMode"] = json!("last-state");
    gone["spec"]["checkpointing"]["onCancel"] = json!("delete");
    let mut kept = wordcount(&ns, "kept", 1, 1_000_000);
    kept["spec"]["checkpointing"]["onCancel"] = json!("delete");
    apply(&env, &gone);
    apply(&env, &kept);
    let g = running_with_checkpoint(&env, &ns, "gone").await;
    let k = running_with_checkpoint(&env, &ns, "kept").await;
    // The last-state job has the finalizer too, for its checkpoints.
    assert!(g.finalizers().iter().any(|f| f == "weir.dev/final-savepoint"), "{:?}", g.finalizers());
    // A savepoint of "gone", asked for by nonce: it is never deleted with the checkpoints.
    patch_spec(&env, &ns, "gone", json!({"savepoints": {"triggerNonce": 1}})).await;
    let g =
        wait_job(&env, &ns, "gone", "a savepoint", |j| status(j).last_savepoint.is_some()).await;
    let savepoint = status(&g).last_savepoint.unwrap().path;
    let bucket = setting("WEIR_TEST_BUCKET");
    let key = |path: &str| format!("{}/", path.trim_start_matches(&format!("s3://{bucket}/")));
    let dir = |j: &StreamJob| {
        let id = status(j).deployed.unwrap().job_id;
        format!("{ns}/checkpoints/{ns}/{}/{id}/", j.name_any())
    };
    let checkpointed = |dir: &str| {
        let keys = s3_keys(dir);
        keys.iter().any(|k| k.contains("/chk-") && k.ends_with("/_metadata")).then_some(keys)
    };
    let (gone_dir, kept_dir) = (dir(&g), dir(&k));
    assert!(checkpointed(&gone_dir).is_some(), "checkpoints under {gone_dir}");
    assert!(checkpointed(&kept_dir).is_some(), "checkpoints under {kept_dir}");
    assert!(s3_keys(&key(&savepoint)).iter().any(|k| k.ends_with("/_metadata")), "{savepoint}");

    for name in ["gone", "kept"] {
        let sj = format!("sj/{name}");
        let (ok, out, err) =
            env.kubectl(&["delete", &sj, "-n", &ns, "--wait=true", "--timeout=120s"]);
        assert!(ok, "kubectl delete {sj}: {out}{err}");
    }
    // "gone": its pods went first (the StreamJob waited for them), then its checkpoints;
    // the savepoint stays.
    let (ok, pods, err) =
        env.kubectl(&["get", "pods", "-n", &ns, "-l", "weir.dev/job=gone", "-o", "name"]);
    assert!(ok && pods.trim().is_empty(), "the pods of gone: {pods}{err}");
    assert_eq!(s3_keys(&gone_dir), Vec::<String>::new(), "the checkpoints under {gone_dir}");
    assert!(s3_keys(&key(&savepoint)).iter().any(|k| k.ends_with("/_metadata")), "{savepoint}");
    let ev = events(&env, &ns, "gone").await;
    let note = ev.iter().find(|(r, _)| r == "CheckpointsDeleted").map(|(_, n)| n.clone());
    let note = note.unwrap_or_else(|| panic!("no CheckpointsDeleted event: {ev:?}"));
    assert!(note.contains(gone_dir.trim_end_matches('/')), "{note}");
    // "kept": stopped with its final savepoint; its checkpoints are where they were.
    let ev = events(&env, &ns, "kept").await;
    assert!(ev.iter().any(|(r, _)| r == "FinalSavepoint"), "{ev:?}");
    assert!(!ev.iter().any(|(r, _)| r == "CheckpointsDeleted"), "{ev:?}");
    assert!(checkpointed(&kept_dir).is_some(), "checkpoints under {kept_dir}");
    env.delete_namespace(&ns).await;
}

/// Deletes job `name`'s coordinator pod at once (grace 0), as a crash would.
async fn kill_coordinator(env: &TestEnv, ns: &str, name: &str) {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!(
        "{}={name},{}=coordinator",
        weir_crds::LABEL_JOB,
        weir_crds::LABEL_COMPONENT
    ));
    for p in pods.list(&lp).await.unwrap().items {
        pods.delete(&p.name_any(), &DeleteParams::default().grace_period(0)).await.unwrap();
    }
}

/// The coordinator killed right after it took the savepoint (held in progress by an S3 that
/// does not answer for savepoints): the savepoint is failed at once (another run id, or a 404
/// from the new coordinator) instead of waited for without end, and the operation goes on
/// within `spec.savepoints.timeout` by the rules of savepoint mode: the upgrade retries its
/// stopping savepoint on the coordinator that came back and completes with it; the deletion
/// takes its final savepoint on the next attempt, and the finalizer lets the job go.
#[tokio::test]
async fn a_coordinator_killed_after_the_savepoint_trigger_fails_the_savepoint_and_the_job_goes_on()
{
    const TIMEOUT: u64 = 90;
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-sp-kill").await;
    env.create_s3_credentials(&ns).await;
    let upstream = setting("AWS_ENDPOINT_URL");
    let upstream = upstream.trim_start_matches("http://").trim_end_matches('/').to_string();
    let proxy = S3Proxy::start(upstream, format!("/{ns}/savepoints/"));
    let bucket = setting("WEIR_TEST_BUCKET");
    let manifest = |parallelism: i32| {
        let mut m = wordcount(&ns, "wc", parallelism, 1_000_000);
        m["spec"]["s3"]["endpoint"] = json!(format!("http://127.0.0.1:{}", proxy.port));
        m["spec"]["savepoints"] = json!({
            "directory": format!("s3://{bucket}/{ns}/savepoints"),
            "timeout": format!("{TIMEOUT}s"),
        });
        m
    };
    let set = |mode| proxy.mode.store(mode, std::sync::atomic::Ordering::Relaxed);
    let _ctl = Controller::start(&env, &ns, &[]);
    apply(&env, &manifest(2));
    let j = running_with_checkpoint(&env, &ns, "wc").await;
    let first = job_id(&j);

    // The upgrade: its savepoint triggered, held, and the coordinator killed.
    set(HANG);
    apply(&env, &manifest(3));
    let triggered = |reason: SavepointReason| {
        move |j: &StreamJob| {
            status(j)
                .savepoint_in_progress
                .is_some_and(|p| p.reason == reason && p.trigger_id.is_some() && p.run_id.is_some())
        }
    };
    let j = wait_job(
        &env,
        &ns,
        "wc",
        "the upgrade's savepoint triggered",
        triggered(SavepointReason::Upgrade),
    )
    .await;
    let run = status(&j).savepoint_in_progress.unwrap().run_id.unwrap();
    kill_coordinator(&env, &ns, "wc").await;
    set(PASS);
    let killed = std::time::Instant::now();
    // Failed (not waited for): attempt 1, the coordinator lost it.
    let j = wait_job_within(
        &env,
        &ns,
        "wc",
        "the lost savepoint failed",
        Duration::from_secs(TIMEOUT),
        |j| status(j).savepoint_in_progress.is_some_and(|p| p.failed_attempts >= 1),
    )
    .await;
    let why = status(&j).savepoint_in_progress.unwrap().last_failure.unwrap_or_default();
    assert!(why.contains("restarted") || why.contains("404"), "{why}");
    assert!(why.contains(&run) || why.contains("404"), "{why}");
    eprintln!("the upgrade's savepoint after the kill: {why}");
    // Savepoint mode: the stopping savepoint is taken again on the new coordinator, and the
    // upgrade completes with it, well within the timeout after the kill.
    let j = wait_job_within(
        &env,
        &ns,
        "wc",
        "the upgrade completed",
        Duration::from_secs(TIMEOUT),
        |j| {
            let s = status(j);
            s.phase == Some(JobPhase::Running)
                && s.upgrade.is_none()
                && s.job.as_ref().is_some_and(|r| r.parallelism == 3 && r.id != first)
        },
    )
    .await;
    show("upgraded after the coordinator was killed", &j);
    assert!(killed.elapsed() < Duration::from_secs(TIMEOUT), "{:?}", killed.elapsed());
    let restore = status(&j).deployed.unwrap().restore_path.unwrap_or_default();
    assert!(restore.contains(&format!("/{ns}/savepoints/")), "restored from {restore}");
    let ev = events(&env, &ns, "wc").await;
    assert!(ev.iter().any(|(r, _)| r == "UpgradeCompleted"), "{ev:?}");

    // The deletion: its final savepoint triggered, held, the coordinator killed.
    running_with_checkpoint(&env, &ns, "wc").await;
    set(HANG);
    let (ok, out, err) = env.kubectl(&["delete", "sj/wc", "-n", &ns, "--wait=false"]);
    assert!(ok, "kubectl delete: {out}{err}");
    let j = wait_job(
        &env,
        &ns,
        "wc",
        "the final savepoint triggered",
        triggered(SavepointReason::Deletion),
    )
    .await;
    assert!(j.metadata.deletion_timestamp.is_some());
    kill_coordinator(&env, &ns, "wc").await;
    set(PASS);
    let killed = std::time::Instant::now();
    let jobs: Api<StreamJob> = Api::namespaced(env.client.clone(), &ns);
    wait_for("the StreamJob deleted", Duration::from_secs(TIMEOUT), || async {
        jobs.get_opt("wc").await.ok().and_then(|j| j.is_none().then_some(()))
    })
    .await;
    assert!(killed.elapsed() < Duration::from_secs(TIMEOUT), "{:?}", killed.elapsed());
    let ev = events(&env, &ns, "wc").await;
    eprintln!("events: {ev:?}");
    let failed: Vec<_> = ev.iter().filter(|(r, _)| r == "SavepointFailed").collect();
    assert!(failed.iter().any(|(_, m)| m.contains("restarted") || m.contains("404")), "{ev:?}");
    // Savepoint mode: the next attempt took the final savepoint on the new coordinator.
    assert!(ev.iter().any(|(r, _)| r == "FinalSavepoint"), "{ev:?}");
    let deletion = snapshots(&env, &ns, "wc")
        .await
        .into_iter()
        .filter(|s| s.spec.reason == Some(SavepointReason::Deletion))
        .count();
    assert_eq!(deletion, 1);
    env.delete_namespace(&ns).await;
}
