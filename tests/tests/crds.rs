//! The CRDs against the real kube-apiserver: they install; the example manifests are
//! accepted; bad manifests are refused with a message naming the field; defaults, the scale
//! subresource, printer columns and `kubectl explain` work.

use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};
use weir_crds::{StreamJob, StreamSnapshot};
use weir_e2e::testenv::{TestEnv, wait_for};

async fn env() -> TestEnv {
    let env = TestEnv::get().await;
    env.install_crds();
    env
}

fn job_resource() -> ApiResource {
    ApiResource::erase::<StreamJob>(&())
}

fn minimal_job(name: &str) -> Value {
    json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name},
        "spec": {
            "pipeline": {"operators": [
                {"uid": "src", "type": "generator", "count": 10},
                {"uid": "out", "type": "stdout", "inputs": ["src"]},
            ]},
        },
    })
}

async fn create_raw(env: &TestEnv, ns: &str, obj: Value) -> Result<DynamicObject, String> {
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), ns, &job_resource());
    let obj: DynamicObject = serde_json::from_value(obj).unwrap();
    api.create(&PostParams::default(), &obj).await.map_err(|e| match e {
        kube::Error::Api(s) => s.message,
        other => other.to_string(),
    })
}

#[tokio::test]
async fn crds_install_with_short_names_and_categories() {
    let env = env().await;
    let (ok, out, err) = env.kubectl(&["api-resources", "--api-group", "weir.dev", "-o", "wide"]);
    assert!(ok, "{err}");
    for want in ["streamjobs", "sj", "StreamJob", "streamsnapshots", "ssnap", "StreamSnapshot"] {
        assert!(out.contains(want), "api-resources lacks {want}:\n{out}");
    }
    let (ok, _, err) = env.kubectl(&["get", "sj,ssnap", "-A"]);
    assert!(ok, "kubectl get sj,ssnap: {err}");
    let (ok, _, err) = env.kubectl(&["get", "weir", "-A"]);
    assert!(ok, "kubectl get weir (category): {err}");
}

#[tokio::test]
async fn example_manifests_are_accepted() {
    let env = env().await;
    let ns = env.namespace("examples").await;
    let dir = env.repo.join("manifests/examples");
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    assert!(files.len() >= 3);
    for f in &files {
        let (ok, out, err) =
            env.kubectl(&["apply", "--server-side", "-n", &ns, "-f", f.to_str().unwrap()]);
        assert!(ok, "{} refused: {err}", f.display());
        assert!(out.contains("serverside-applied"), "{out}");
    }
    let jobs: Api<StreamJob> = Api::namespaced(env.client.clone(), &ns);
    let list = jobs.list(&Default::default()).await.unwrap();
    assert_eq!(list.items.len(), files.len());
    for j in &list.items {
        j.spec.validate().unwrap();
    }
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn bad_manifests_are_refused_naming_the_field() {
    let env = env().await;
    let ns = env.namespace("bad").await;
    // (what to change, the field the apiserver must name)
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation, &str)> = vec![
        ("parallelism 0", Box::new(|j| j["spec"]["parallelism"] = json!(0)), "spec.parallelism"),
        ("parallelism -3", Box::new(|j| j["spec"]["parallelism"] = json!(-3)), "spec.parallelism"),
        (
            "parallelism of the wrong type",
            Box::new(|j| j["spec"]["parallelism"] = json!("two")),
            "spec.parallelism",
        ),
        (
            "unknown upgradeMode",
            Box::new(|j| j["spec"]["upgradeMode"] = json!("yolo")),
            "spec.upgradeMode",
        ),
        ("unknown state", Box::new(|j| j["spec"]["state"] = json!("paused")), "spec.state"),
        (
            "malformed duration",
            Box::new(|j| j["spec"]["checkpointing"] = json!({"interval": "10 seconds"})),
            "spec.checkpointing.interval",
        ),
        (
            "malformed duration (no unit)",
            Box::new(|j| j["spec"]["restartStrategy"] = json!({"delay": "5"})),
            "spec.restartStrategy.delay",
        ),
        (
            "maxParallelism 0",
            Box::new(|j| j["spec"]["maxParallelism"] = json!(0)),
            "spec.maxParallelism",
        ),
        (
            "maxParallelism 32769",
            Box::new(|j| j["spec"]["maxParallelism"] = json!(32769)),
            "spec.maxParallelism",
        ),
        (
            "missing pipeline",
            Box::new(|j| {
                j["spec"].as_object_mut().unwrap().remove("pipeline");
            }),
            "spec.pipeline",
        ),
        (
            "empty pipeline",
            Box::new(|j| j["spec"]["pipeline"]["operators"] = json!([])),
            "spec.pipeline.operators",
        ),
        (
            "uid with capitals and spaces",
            Box::new(|j| j["spec"]["pipeline"]["operators"][0]["uid"] = json!("My Source")),
            "spec.pipeline.operators.uid",
        ),
        (
            "operator without a type",
            Box::new(|j| {
                j["spec"]["pipeline"]["operators"][1].as_object_mut().unwrap().remove("type");
            }),
            "spec.pipeline.operators.type",
        ),
        (
            "storage with an unknown scheme",
            Box::new(|j| j["spec"]["checkpointing"] = json!({"storage": "gs://bucket/x"})),
            "spec.checkpointing.storage",
        ),
        (
            "checkpointing of the wrong type",
            Box::new(|j| j["spec"]["checkpointing"] = json!("often")),
            "spec.checkpointing",
        ),
        (
            "restart strategy type",
            Box::new(|j| j["spec"]["restartStrategy"] = json!({"type": "sometimes"})),
            "spec.restartStrategy.type",
        ),
        (
            "retained 0",
            Box::new(|j| j["spec"]["checkpointing"] = json!({"retained": 0})),
            "spec.checkpointing.retained",
        ),
    ];
    for (i, (what, mutate, field)) in cases.iter().enumerate() {
        let mut job = minimal_job(&format!("bad-{i}"));
        mutate(&mut job);
        match create_raw(&env, &ns, job).await {
            Ok(_) => panic!("{what}: the apiserver accepted it"),
            Err(msg) => {
                assert!(msg.contains(field), "{what}: the message does not name {field}: {msg}")
            }
        }
    }
    // And the good one is accepted, so the refusals above are about the mutations.
    create_raw(&env, &ns, minimal_job("good")).await.unwrap();
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn the_apiserver_applies_defaults() {
    let env = env().await;
    let ns = env.namespace("defaults").await;
    let mut job = minimal_job("d");
    job["spec"]["checkpointing"] = json!({"storage": "s3://bucket/prefix"});
    create_raw(&env, &ns, job).await.unwrap();
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), &ns, &job_resource());
    let stored = api.get("d").await.unwrap().data;
    let spec = &stored["spec"];
    assert_eq!(spec["parallelism"], 1);
    assert_eq!(spec["state"], "running");
    assert_eq!(spec["upgradeMode"], "savepoint");
    assert_eq!(spec["checkpointing"]["interval"], "10s");
    assert_eq!(spec["checkpointing"]["mode"], "exactly-once");
    assert_eq!(spec["checkpointing"]["timeout"], "10m");
    assert_eq!(spec["checkpointing"]["incremental"], true);
    assert_eq!(spec["checkpointing"]["retained"], 1);
    // Operator parameters are kept as written.
    assert_eq!(spec["pipeline"]["operators"][0]["count"], 10);
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn scale_subresource_and_printer_columns() {
    let env = env().await;
    let ns = env.namespace("scale").await;
    create_raw(&env, &ns, minimal_job("s")).await.unwrap();
    let jobs: Api<StreamJob> = Api::namespaced(env.client.clone(), &ns);
    // What the controller will write: replicas and the worker selector, plus a checkpoint.
    let status = json!({"status": {
        "phase": "Running", "replicas": 1, "selector": "weir.dev/job=s,weir.dev/component=worker",
        "lastCheckpoint": {"id": 7, "completedAt": "2026-01-01T00:00:00Z", "sizeBytes": 1024},
    }});
    jobs.patch_status("s", &PatchParams::default(), &Patch::Merge(&status)).await.unwrap();

    let (ok, out, err) = env.kubectl(&["-n", &ns, "scale", "sj/s", "--replicas", "3"]);
    assert!(ok, "kubectl scale: {err}");
    assert!(out.contains("scaled"), "{out}");
    let j = jobs.get("s").await.unwrap();
    assert_eq!(j.spec.parallelism, 3);

    let scale = jobs.get_scale("s").await.unwrap();
    assert_eq!(scale.spec.unwrap().replicas, Some(3));
    let st = scale.status.unwrap();
    assert_eq!(st.replicas, 1);
    assert_eq!(st.selector.as_deref(), Some("weir.dev/job=s,weir.dev/component=worker"));

    let (ok, out, err) = env.kubectl(&["-n", &ns, "get", "sj"]);
    assert!(ok, "{err}");
    let header = out.lines().next().unwrap_or_default();
    for col in ["NAME", "PHASE", "PARALLELISM", "LAST CHECKPOINT", "AGE"] {
        assert!(header.contains(col), "no {col} column: {out}");
    }
    let row = out.lines().nth(1).unwrap_or_default();
    assert!(row.starts_with("s ") && row.contains("Running") && row.contains(" 3 "), "{out}");
    let (ok, out, _) = env.kubectl(&["-n", &ns, "get", "sj", "-o", "wide"]);
    assert!(
        ok && out.contains("CHECKPOINT") && out.lines().nth(1).unwrap().contains(" 7 "),
        "{out}"
    );
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn kubectl_explain_shows_the_field_docs() {
    let env = env().await;
    // The apiserver publishes CRD schemas to its OpenAPI document a moment after they are
    // established.
    let out = wait_for("kubectl explain to know StreamJob", Duration::from_secs(60), || async {
        let (ok, out, _) = env.kubectl(&["explain", "streamjob.spec.parallelism"]);
        ok.then_some(out)
    })
    .await;
    assert!(out.contains("Number of parallel subtasks"), "{out}");
    let (ok, out, err) = env.kubectl(&["explain", "streamjob.spec.checkpointing.mode"]);
    assert!(ok, "{err}");
    assert!(out.contains("exactly-once"), "{out}");
}

#[tokio::test]
async fn stream_snapshots_are_stored() {
    let env = env().await;
    let ns = env.namespace("ssnap").await;
    let snaps: Api<StreamSnapshot> = Api::namespaced(env.client.clone(), &ns);
    let snap: StreamSnapshot = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamSnapshot",
        "metadata": {"name": "wc-1", "labels": {"weir.dev/job": "wc"}},
        "spec": {"job": "wc", "path": "s3://bucket/savepoints/ns/wc/sp-1", "parallelism": 2,
                 "maxParallelism": 128, "operatorUids": ["counts", "lines"], "reason": "Upgrade"},
    }))
    .unwrap();
    snaps.create(&PostParams::default(), &snap).await.unwrap();
    let (ok, out, err) = env.kubectl(&["-n", &ns, "get", "ssnap", "-l", "weir.dev/job=wc"]);
    assert!(ok, "{err}");
    assert!(out.contains("wc-1") && out.contains("JOB"), "{out}");
    let bad = json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamSnapshot", "metadata": {"name": "bad"},
        "spec": {"job": "wc", "path": "relative/path"},
    });
    let api: Api<DynamicObject> =
        Api::namespaced_with(env.client.clone(), &ns, &ApiResource::erase::<StreamSnapshot>(&()));
    let err = api
        .create(&PostParams::default(), &serde_json::from_value(bad).unwrap())
        .await
        .unwrap_err();
    assert!(err.to_string().contains("spec.path"), "{err}");
    env.delete_namespace(&ns).await;
}
