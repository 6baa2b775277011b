//! The Argo CD health checks (`manifests/argocd/*.lua`) and the Grafana dashboard
//! (`charts/weir/dashboards/weir.json`) against real parts: jobs driven through the
//! controller on the real control plane, node agent and S3 server, their objects read from
//! the apiserver at each stage (running, upgrading, refused, suspended, failed, finished,
//! rolled back, a savepoint's StreamSnapshot) and given to the health checks; and the
//! dashboard's queries held against the `/metrics` of real controllers and of a running
//! job's coordinator.
//!
//! With `WEIR_ARGOCD_WRITE_FIXTURES=1` the captured objects are written to
//! `tests/fixtures/argocd/` (the fixtures the library's tests run the checks over); without,
//! to `/tmp/weir-argocd-captures/`.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use weir_crds::StreamJob;
use weir_crds::snapshot::StreamSnapshot;
use weir_crds::streamjob::JobPhase;
use weir_e2e::argocd::{self, CAPTURES};
use weir_e2e::dashboard::{self, Scrape};
use weir_e2e::jobs::{Controller, apply, show, status, wait_job, wordcount};
use weir_e2e::testenv::{TestEnv, wait_for};

/// Generated lines of the long-running jobs: far more than the test lasts (200 lines/s).
const LONG: u64 = 1_000_000;

/// Reads the object back as JSON, runs its health check, asserts what [`CAPTURES`] says of
/// `name`, and writes it as the fixture `name`.
fn capture(name: &str, obj: Value) -> Value {
    let (_, captured_as, status, part) = CAPTURES
        .iter()
        .find(|c| c.0 == name)
        .unwrap_or_else(|| panic!("{name} is not in weir_e2e::argocd::CAPTURES"));
    let obj = argocd::fixture_of(&obj);
    let h = argocd::assert_health(&format!("{name} ({captured_as})"), &obj, status, part);
    eprintln!("{name}: {} {:?}", h.status, h.message);
    let dir = if std::env::var("WEIR_ARGOCD_WRITE_FIXTURES").is_ok_and(|v| v == "1") {
        argocd::fixtures_dir()
    } else {
        std::path::PathBuf::from("/tmp/weir-argocd-captures")
    };
    std::fs::create_dir_all(&dir).unwrap();
    let text = serde_json::to_string_pretty(&obj).unwrap() + "\n";
    std::fs::write(dir.join(format!("{name}.json")), text).unwrap();
    obj
}

/// The StreamJob as the apiserver returns it, as JSON.
async fn job_json(env: &TestEnv, ns: &str, name: &str) -> Value {
    let api: Api<StreamJob> = Api::namespaced(env.client.clone(), ns);
    serde_json::to_value(api.get(name).await.unwrap()).unwrap()
}

/// Polls the StreamJob until `f` holds of its JSON (every 100 ms); that JSON.
async fn wait_json(
    env: &TestEnv,
    ns: &str,
    name: &str,
    what: &str,
    f: impl Fn(&Value) -> bool,
) -> Value {
    let api: Api<StreamJob> = Api::namespaced(env.client.clone(), ns);
    wait_for(&format!("StreamJob {name}: {what}"), weir_e2e::jobs::T, || async {
        let j = api.get_opt(name).await.ok().flatten()?;
        let v = serde_json::to_value(j).ok()?;
        if f(&v) { Some(v) } else { None }
    })
    .await
}

fn cond<'a>(v: &'a Value, type_: &str) -> Option<&'a Value> {
    v["status"]["conditions"].as_array()?.iter().find(|c| c["type"] == type_)
}

fn cond_is(v: &Value, type_: &str, status: &str, reason: &str) -> bool {
    cond(v, type_).is_some_and(|c| c["status"] == status && c["reason"] == reason)
}

fn current(v: &Value) -> bool {
    v["status"]["observedGeneration"] == v["metadata"]["generation"]
}

async fn patch_spec(env: &TestEnv, ns: &str, name: &str, spec: Value) {
    let api: Api<StreamJob> = Api::namespaced(env.client.clone(), ns);
    api.patch(name, &PatchParams::default(), &Patch::Merge(json!({"spec": spec}))).await.unwrap();
}

/// The `/metrics` of a job with event time (the StreamJobs here have none), run by the real
/// `weir` binary on this machine, once its window reports a watermark.
fn event_time_metrics(env: &TestEnv) -> String {
    local_job_metrics(
        env,
        "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {name: event-time}
spec:
  pipeline:
    operators:
      - {uid: events, type: generator, format: kv, ratePerSecond: 200, eventTime: {field: ts, maxOutOfOrderness: 1s}}
      - {uid: hot, type: window, inputs: [events], key: key, kind: tumbling, size: 1s, aggregate: {count: '*'}}
      - {uid: out, type: blackhole, inputs: [hot]}
",
        &["weir_operator_watermark_milliseconds{"],
    )
}

/// The `/metrics` of a job from Kafka to Kafka (the StreamJobs here have neither), run by
/// the real `weir` binary on this machine against the environment's Kafka cluster, once the
/// source has told its lag and the sink has committed.
fn kafka_metrics(env: &TestEnv) -> String {
    let bootstrap =
        std::env::var("WEIR_TEST_KAFKA").expect("WEIR_TEST_KAFKA (the env.sh of tests/env/up.sh)");
    let stamp =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos();
    let (input, output) = (format!("argocd-in-{stamp}"), format!("argocd-out-{stamp}"));
    let sh = weir_e2e::argocd::repo().join("tests/env/kafka.sh");
    for t in [&input, &output] {
        let st = std::process::Command::new("bash")
            .arg(&sh)
            .args(["create-topic", t, "2"])
            .status()
            .unwrap();
        assert!(st.success(), "kafka.sh create-topic {t}");
    }
    let mut produce = std::process::Command::new("bash")
        .arg(&sh)
        .args(["produce", &input])
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut w = produce.stdin.take().unwrap();
        for i in 0..2_000 {
            writeln!(w, "{{\"key\": \"k{}\", \"n\": {i}}}", i % 10).unwrap();
        }
    }
    assert!(produce.wait().unwrap().success(), "kafka.sh produce {input}");
    local_job_metrics(
        env,
        &format!(
            "apiVersion: weir.dev/v1alpha1
kind: StreamJob
metadata: {{name: kafka-metrics}}
spec:
  checkpointing: {{interval: 500ms}}
  pipeline:
    operators:
      - {{uid: orders, type: kafka_source, topics: [{input}], bootstrapServers: \"{bootstrap}\", format: json, fields: {{key: string, n: int}}}}
      - {{uid: counts, type: count, inputs: [orders], key: key}}
      - {{uid: out, type: kafka_sink, inputs: [counts], topic: {output}, key: key, bootstrapServers: \"{bootstrap}\"}}
"
        ),
        &[
            "weir_source_lag_records{",
            "weir_source_partition_lag_records{",
            "weir_source_bytes_in_total{",
            "weir_sink_commits_total{",
            "weir_sink_commit_seconds_total{",
            "weir_sink_open_transactions{",
        ],
    )
}

/// The `/metrics` of `manifest` run by the real `weir` binary on this machine (checkpoints
/// in a directory of its own), once they hold every one of `ready`.
fn local_job_metrics(env: &TestEnv, manifest: &str, ready: &[&str]) -> String {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("job.yaml");
    std::fs::write(&file, manifest).unwrap();
    let state = dir.path().join("state");
    let mut child = std::process::Command::new(env.binary("weir"))
        .args(["run", file.to_str().unwrap(), "--api-addr", "127.0.0.1:0"])
        .arg("--state-dir")
        .arg(&state)
        .arg("--storage")
        .arg(dir.path().join("checkpoints"))
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("running weir (cargo build --workspace --bins builds it)");
    // Its log is read to the end (a closed pipe would fail its next line), the address of
    // its API taken from it.
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(a) = line.split("HTTP API on http://").nth(1) {
                let _ = tx.send(a.trim().to_string());
            }
        }
    });
    let addr = rx.recv_timeout(Duration::from_secs(30)).ok();
    let Some(addr) = addr else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("weir run did not print its HTTP API's address");
    };
    let t = std::time::Instant::now();
    let mut last = String::new();
    while t.elapsed() < Duration::from_secs(60) {
        if let Ok(m) = dashboard::http_get(&addr, "/metrics") {
            if ready.iter().all(|r| m.contains(r)) {
                let _ = child.kill();
                let _ = child.wait();
                return m;
            }
            last = m;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let _ = child.kill();
    let _ = child.wait();
    panic!("the job did not report {ready:?} in a minute:\n{last}");
}

/// The `/metrics` of job `name`'s coordinator, from its pod's address.
async fn coordinator_metrics(env: &TestEnv, ns: &str, name: &str) -> String {
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    let lp = ListParams::default().labels(&format!(
        "{}={name},{}=coordinator",
        weir_crds::LABEL_JOB,
        weir_crds::LABEL_COMPONENT
    ));
    let ip = wait_for("the coordinator pod's IP", Duration::from_secs(60), || async {
        pods.list(&lp).await.ok()?.items.into_iter().find_map(|p| p.status?.pod_ip)
    })
    .await;
    let addr = format!("{ip}:8081");
    dashboard::http_get(&addr, "/metrics").unwrap_or_else(|e| panic!("the coordinator: {e}"))
}

/// A long word count at parallelism 2: running, upgraded (savepoint mode) to parallelism 1,
/// its savepoint's StreamSnapshot, an upgrade refused, the coordinator's metrics, suspended.
/// Returns the coordinator's `/metrics`.
async fn upgrade_refuse_suspend(env: &TestEnv, ns: &str) -> String {
    apply(env, &wordcount(ns, "wc", 2, LONG));
    let v = wait_json(env, ns, "wc", "running and Ready at parallelism 2 with a checkpoint", |v| {
        v["status"]["phase"] == "Running"
            && current(v)
            && cond_is(v, "Ready", "True", "Running")
            && v["status"]["lastCheckpoint"].is_object()
            && v["status"]["job"]["parallelism"] == 2
            && v["status"]["lastStableGeneration"] == 1
    })
    .await;
    let first = v["status"]["job"]["id"].as_str().unwrap().to_string();
    capture("streamjob-running", v);

    // Parallelism 2 to 1 in savepoint mode (the default): caught while Upgrading.
    patch_spec(env, ns, "wc", json!({"parallelism": 1})).await;
    // A fast upgrade can pass through Upgrading between two polls: then it is caught done
    // (the committed fixture still checks the Upgrading health).
    let v = wait_json(env, ns, "wc", "phase Upgrading, or the upgrade done", |v| {
        current(v)
            && (v["status"]["phase"] == "Upgrading"
                || (v["status"]["phase"] == "Running" && v["status"]["job"]["parallelism"] == 1))
    })
    .await;
    if v["status"]["phase"] == "Upgrading" {
        capture("streamjob-upgrading", v);
    } else {
        eprintln!("the upgrade completed between two polls; not caught while Upgrading");
    }
    let j = wait_job(env, ns, "wc", "running at parallelism 1 under a new job id", |j| {
        let s = status(j);
        s.phase == Some(JobPhase::Running)
            && s.upgrade.is_none()
            && s.job.as_ref().is_some_and(|r| r.parallelism == 1 && r.id != first)
    })
    .await;
    show("upgraded", &j);

    // The upgrade's savepoint, as its StreamSnapshot.
    let snap = status(&j).last_savepoint.and_then(|s| s.snapshot).expect("the upgrade's savepoint");
    let snaps: Api<StreamSnapshot> = Api::namespaced(env.client.clone(), ns);
    let s = wait_for("the StreamSnapshot completed", Duration::from_secs(60), || async {
        snaps.get_opt(&snap).await.ok().flatten().filter(|s| s.status.is_some())
    })
    .await;
    capture("streamsnapshot-completed", serde_json::to_value(s).unwrap());

    // A spec naming a Secret that does not exist is refused as an invalid spec (what the
    // apiserver cannot check; a changed maxParallelism, the other case the controller
    // refuses, the CRD's CEL rules now refuse at apply), a stateful operator dropped without
    // allowNonRestoredState as an upgrade the state does not allow; the job goes on running:
    // Degraded all the same.
    let spec = |v: &Value| v["spec"].clone();
    let before = spec(&job_json(env, ns, "wc").await);
    patch_spec(env, ns, "wc", json!({"s3": {"credentialsSecret": {"name": "missing"}}})).await;
    let v = wait_json(env, ns, "wc", "the missing Secret refused", |v| {
        current(v) && cond_is(v, "Degraded", "True", "InvalidSpec")
    })
    .await;
    assert_eq!(v["status"]["phase"], "Running", "a refused spec leaves the job running");
    capture("streamjob-invalid-spec", v);
    let mut dropped = before.clone();
    let ops = dropped["pipeline"]["operators"].as_array_mut().unwrap();
    ops.remove(2);
    ops[2]["inputs"] = json!(["words"]);
    let api: Api<StreamJob> = Api::namespaced(env.client.clone(), ns);
    api.patch("wc", &PatchParams::default(), &Patch::Merge(json!({"spec": dropped})))
        .await
        .unwrap();
    let v = wait_json(env, ns, "wc", "the dropped stateful operator refused", |v| {
        current(v) && cond_is(v, "Degraded", "True", "UpgradeRefused")
    })
    .await;
    assert_eq!(v["status"]["phase"], "Running", "a refused upgrade leaves the job running");
    capture("streamjob-upgrade-refused", v);
    api.patch("wc", &PatchParams::default(), &Patch::Merge(json!({"spec": before}))).await.unwrap();
    let v = wait_json(env, ns, "wc", "Degraded cleared after the revert", |v| {
        current(v) && cond_is(v, "Degraded", "False", "AsExpected")
    })
    .await;
    let h = argocd::health(&argocd::streamjob_script(), &v).unwrap();
    assert_eq!(h.status, "Healthy", "reverted: {h:?}");

    // The coordinator's metrics, once its operators have counted records.
    let metrics = wait_for("records in the coordinator's metrics", weir_e2e::jobs::T, || async {
        let m = coordinator_metrics(env, ns, "wc").await;
        let s = Scrape::parse(&m);
        (s.samples.contains_key("weir_operator_records_in_total")
            && m.lines()
                .any(|l| l.starts_with("weir_operator_records_out_total") && !l.ends_with(" 0")))
        .then_some(m)
    })
    .await;

    // Suspended (a stopping savepoint, the pods deleted).
    patch_spec(env, ns, "wc", json!({"state": "suspended"})).await;
    let v = wait_json(env, ns, "wc", "Suspended", |v| {
        v["status"]["phase"] == "Suspended" && current(v)
    })
    .await;
    capture("streamjob-suspended", v);
    metrics
}

/// A job whose file_source names a directory no pod has: the runtime fails it (an error in
/// the job's spec is not restarted, and restartStrategy none says so too).
async fn failed(env: &TestEnv, ns: &str) {
    let mut m = wordcount(ns, "broken", 1, 10);
    m["spec"]["restartStrategy"] = json!({"type": "none"});
    m["spec"]["pipeline"] = json!({"operators": [
        {"uid": "lines", "type": "file_source", "path": "/nonexistent/weir-argocd-test/in"},
        {"uid": "words", "type": "split", "inputs": ["lines"]},
        {"uid": "out", "type": "blackhole", "inputs": ["words"]},
    ]});
    apply(env, &m);
    let v = wait_json(env, ns, "broken", "Failed", |v| {
        v["status"]["phase"] == "Failed"
            && current(v)
            && cond_is(v, "Degraded", "True", "JobFailed")
    })
    .await;
    capture("streamjob-failed", v);
}

/// A short bounded job that finishes.
async fn finished(env: &TestEnv, ns: &str) {
    apply(env, &wordcount(ns, "short", 1, 400));
    let v = wait_json(env, ns, "short", "Finished", |v| {
        v["status"]["phase"] == "Finished" && current(v)
    })
    .await;
    capture("streamjob-finished", v);
}

/// A new version whose image was never pushed (its pods do not start): rolled back
/// to generation 1 after readyTimeout. RollingBack is checked when it is seen.
async fn rolled_back(env: &TestEnv, ns: &str) {
    apply(env, &wordcount(ns, "rb", 1, LONG));
    wait_json(env, ns, "rb", "running with its spec recorded as stable", |v| {
        v["status"]["phase"] == "Running" && v["status"]["lastStableGeneration"] == 1
    })
    .await;
    let mut bad = wordcount(ns, "rb", 1, LONG);
    bad["spec"]["image"] = json!(weir_e2e::jobs::MISSING_IMAGE);
    bad["spec"]["upgrade"] = json!({"readyTimeout": "15s"});
    apply(env, &bad);
    let seen_rolling = std::sync::Mutex::new(None::<Value>);
    let v = wait_json(env, ns, "rb", "rolled back to generation 1", |v| {
        if v["status"]["phase"] == "RollingBack" && current(v) {
            seen_rolling.lock().unwrap().get_or_insert_with(|| v.clone());
        }
        v["status"]["phase"] == "Running"
            && current(v)
            && v["status"]["upgrade"].is_null()
            && v["status"]["rolledBack"]["generation"] == 2
            && cond_is(v, "Degraded", "True", "RolledBack")
    })
    .await;
    capture("streamjob-rolled-back", v);
    if let Some(v) = seen_rolling.into_inner().unwrap() {
        // The controller says Degraded (RollingBack) while it goes back: so does the check.
        let h = argocd::health(&argocd::streamjob_script(), &v).unwrap();
        assert_eq!(h.status, "Degraded", "rolling back: {h:?}");
        assert!(h.message.starts_with("RollingBack: "), "{h:?}");
        eprintln!("rolling back: {h:?}");
    } else {
        eprintln!("rolling back: not seen between two polls");
    }
}

/// A namespace whose quota allows no Deployment: the controller's applies are forbidden and
/// its reconciles fail (so that weir_controller_reconcile_failures_total has a sample).
/// Returns that controller's `/metrics`.
async fn reconcile_failures(env: &TestEnv) -> (String, String) {
    let ns = env.job_namespace("argocd-quota").await;
    env.create_s3_credentials(&ns).await;
    let quotas: Api<k8s_openapi::api::core::v1::ResourceQuota> =
        Api::namespaced(env.client.clone(), &ns);
    let q = serde_json::from_value(json!({
        "metadata": {"name": "no-deployments"},
        "spec": {"hard": {"count/deployments.apps": "0"}},
    }))
    .unwrap();
    quotas.create(&PostParams::default(), &q).await.unwrap();
    wait_for("the quota's status", Duration::from_secs(60), || async {
        let q = quotas.get("no-deployments").await.ok()?;
        q.status?.hard.filter(|h| !h.is_empty())
    })
    .await;
    let ctl = Controller::start(env, &ns, &[]);
    apply(env, &wordcount(&ns, "wc", 1, 10));
    let failures = "weir_controller_reconcile_failures_total{";
    let text = wait_for("a failed reconcile counted", weir_e2e::jobs::T, || async {
        let t = dashboard::http_get(&ctl.metrics_addr, "/metrics").ok()?;
        t.lines().any(|l| l.starts_with(failures)).then_some(t)
    })
    .await;
    (ns, text)
}

#[tokio::test]
async fn health_checks_and_dashboard_against_real_jobs() {
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("argocd").await;
    env.create_s3_credentials(&ns).await;
    let ctl = Controller::start(&env, &ns, &[]);

    // No status yet: a StreamJob the controller has not seen (none watches this namespace).
    let quiet = env.job_namespace("argocd-quiet").await;
    apply(&env, &wordcount(&quiet, "unseen", 1, 10));
    let v = job_json(&env, &quiet, "unseen").await;
    assert!(v["status"].is_null(), "{v}");
    let h = argocd::health(&argocd::streamjob_script(), &v).unwrap();
    assert_eq!(
        (h.status.as_str(), h.message.as_str()),
        ("Progressing", "waiting for the controller")
    );

    let (coordinator, _, _, _, (quota_ns, failing)) = tokio::join!(
        upgrade_refuse_suspend(&env, &ns),
        failed(&env, &ns),
        finished(&env, &ns),
        rolled_back(&env, &ns),
        reconcile_failures(&env),
    );

    // Every metric and label the dashboard queries is in the scrapes of the real parts.
    let main = dashboard::http_get(&ctl.metrics_addr, "/metrics").unwrap();
    let mut scrape = Scrape::parse(&main);
    scrape.merge(Scrape::parse(&failing));
    scrape.merge(Scrape::parse(&coordinator));
    scrape.merge(Scrape::parse(&event_time_metrics(&env)));
    scrape.merge(Scrape::parse(&kafka_metrics(&env)));
    for must in [
        r#"weir_controller_upgrades_total{mode="savepoint",result="completed"}"#,
        r#"weir_controller_upgrades_total{mode="savepoint",result="rolled-back"}"#,
        r#"weir_controller_savepoints_total{reason="upgrade",result="completed"}"#,
    ] {
        assert!(main.contains(must), "{must} in the controller's metrics:\n{main}");
    }
    let d = dashboard::load();
    let problems = dashboard::problems(&d, &scrape);
    assert!(
        problems.is_empty(),
        "the dashboard queries what the real parts do not export:\n{}\n\nscraped series: {:?}",
        problems.join("\n"),
        scrape.samples.keys().collect::<Vec<_>>()
    );
    let used: std::collections::BTreeSet<String> =
        dashboard::expressions(&d).iter().flat_map(|(_, e)| dashboard::metric_names(e)).collect();
    eprintln!("the dashboard's metrics, all scraped: {used:?}");
    // And the other way round: every family Weir exports is on the dashboard.
    let unused: Vec<&String> = scrape
        .types
        .keys()
        .filter(|n| n.starts_with("weir_"))
        .filter(|n| {
            !used.iter().any(|u| {
                u == *n
                    || u.strip_prefix(n.as_str())
                        .is_some_and(|s| ["_bucket", "_sum", "_count"].contains(&s))
            })
        })
        .collect();
    assert!(unused.is_empty(), "exported but on no panel: {unused:?}");

    for n in [&ns, &quiet, &quota_ns] {
        env.delete_namespace(n).await;
    }
}
