//! Upgrades through the controller, against the real control plane, node agent and S3
//! server: the GitOps story of a bounded-but-long word count writing its counts to S3 through
//! the files sink. Applied at parallelism 2, re-applied at 3, `kubectl scale`d to 1, given a
//! new image tag, deleted and applied again: after each step the job goes on from its state,
//! and at the end the committed output holds each count of each word exactly once, up to the
//! exact final counts.

use kube::api::ListParams;
use kube::{Api, ResourceExt};
use serde_json::{Value, json};
use weir_crds::StreamJob;
use weir_crds::snapshot::StreamSnapshot;
use weir_crds::streamjob::JobPhase;
use weir_e2e::jobs::{
    Controller, WORDS_PER_LINE, apply, assert_exactly_once, job_id, show, status, wordcount,
};
use weir_e2e::testenv::TestEnv;

const LINES: u64 = 24_000;

fn manifest(ns: &str, parallelism: i32, image: Option<&str>) -> Value {
    let mut m = wordcount(ns, "wc", parallelism, LINES);
    if let Some(i) = image {
        m["spec"]["image"] = json!(i);
    }
    m
}

async fn wait_job(
    env: &TestEnv,
    ns: &str,
    what: &str,
    f: impl Fn(&StreamJob) -> bool,
) -> StreamJob {
    weir_e2e::jobs::wait_job(env, ns, "wc", what, f).await
}

/// Running the generation it has, at `parallelism`, under another job id than `not`, with a
/// checkpoint of its own.
async fn runs_anew(env: &TestEnv, ns: &str, parallelism: i32, not: &str) -> StreamJob {
    wait_job(env, ns, &format!("running at parallelism {parallelism} after the upgrade"), |j| {
        let s = status(j);
        s.phase == Some(JobPhase::Running)
            && s.upgrade.is_none()
            && s.observed_generation == j.metadata.generation
            && s.job.as_ref().is_some_and(|r| r.parallelism == parallelism && r.id != not)
            && s.replicas == parallelism
    })
    .await
}

#[tokio::test]
async fn gitops_upgrades_keep_the_state_and_count_every_word_exactly_once() {
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-upgrade").await;
    env.create_s3_credentials(&ns).await;
    let ctl = Controller::start(&env, &ns, &[]);

    // 1. Applied at parallelism 2.
    apply(&env, &manifest(&ns, 2, None));
    let j = wait_job(&env, &ns, "running with a checkpoint", |j| {
        let s = status(j);
        s.phase == Some(JobPhase::Running) && s.last_checkpoint.is_some() && s.replicas == 2
    })
    .await;
    show("applied", &j);
    let first = job_id(&j);
    assert!(j.finalizers().iter().any(|f| f == "weir.dev/final-savepoint"));

    // 2. Re-applied at parallelism 3: a savepoint upgrade, restored with the key groups
    // redistributed, under a new job id.
    apply(&env, &manifest(&ns, 3, None));
    let j = runs_anew(&env, &ns, 3, &first).await;
    let s = status(&j);
    let sp = s.last_savepoint.clone().expect("the upgrade's savepoint");
    assert_eq!(s.deployed.as_ref().unwrap().restore_path.as_deref(), Some(sp.path.as_str()));
    let snaps: Api<StreamSnapshot> = Api::namespaced(env.client.clone(), &ns);
    let snap = snaps.get(sp.snapshot.as_deref().unwrap()).await.unwrap();
    assert_eq!(snap.spec.job, "wc");
    assert_eq!(snap.spec.path.to_string(), sp.path);
    assert!(snap.metadata.owner_references.is_none(), "a snapshot outlives its job");
    show("at 3", &j);
    let second = job_id(&j);

    // 3. `kubectl scale` to 1.
    let (ok, out, err) = env.kubectl(&["scale", "sj/wc", "-n", &ns, "--replicas", "1"]);
    assert!(ok, "kubectl scale: {out}{err}");
    let j = runs_anew(&env, &ns, 1, &second).await;
    show("scaled to 1", &j);
    let third = job_id(&j);

    // 4. A new image tag (the node agent maps any tag of `weir` to the runtime built here).
    apply(&env, &manifest(&ns, 1, Some("weir:v2")));
    let j = runs_anew(&env, &ns, 1, &third).await;
    show("new image", &j);
    let fourth = job_id(&j);
    let before = status(&j).last_checkpoint.map(|c| c.id).unwrap_or(0);
    wait_job(&env, &ns, "a checkpoint of the new version", |j| {
        status(j).last_checkpoint.is_some_and(|c| c.id > before) && job_id(j) == fourth
    })
    .await;

    // 5. Deleted (a final savepoint first), then the same manifest applied again: the new
    // StreamJob starts from the deleted one's final savepoint.
    let (ok, out, err) =
        env.kubectl(&["delete", "sj/wc", "-n", &ns, "--wait=true", "--timeout=120s"]);
    assert!(ok, "kubectl delete: {out}{err}");
    let finals: Vec<StreamSnapshot> = snaps
        .list(&ListParams::default().labels("weir.dev/job=wc"))
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|s| s.spec.reason == Some(weir_crds::streamjob::SavepointReason::Deletion))
        .collect();
    assert_eq!(finals.len(), 1, "one final savepoint: {finals:?}");
    apply(&env, &manifest(&ns, 1, Some("weir:v2")));
    let j = wait_job(&env, &ns, "the new StreamJob running from the final savepoint", |j| {
        let s = status(j);
        s.phase == Some(JobPhase::Running) || s.phase == Some(JobPhase::Finished)
    })
    .await;
    show("created again", &j);
    assert_eq!(
        status(&j).deployed.and_then(|d| d.restore_path),
        Some(finals[0].spec.path.to_string())
    );

    // The controller counted three savepoint upgrades and the savepoints it took.
    let completed = r#"weir_controller_upgrades_total{mode="savepoint",result="completed"}"#;
    assert_eq!(ctl.metric(completed), 3.0);
    let sp = r#"weir_controller_savepoints_total{reason="upgrade",result="completed"}"#;
    assert_eq!(ctl.metric(sp), 3.0);
    let fin = r#"weir_controller_savepoints_total{reason="deletion",result="completed"}"#;
    assert_eq!(ctl.metric(fin), 1.0);
    assert!(ctl.metric("weir_controller_upgrade_duration_seconds_count") >= 3.0);

    // The end: every count of every word exactly once, up to the exact totals.
    wait_job(&env, &ns, "finished", |j| status(j).phase == Some(JobPhase::Finished)).await;
    assert_exactly_once(&format!("{ns}/wc/out"), LINES * WORDS_PER_LINE);
}
