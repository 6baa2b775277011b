//! The CRDs against the real kube-apiserver: they install (without warnings); the example
//! manifests are accepted; bad manifests are refused with a message naming the field, those
//! that break a CEL rule with the controller's own message; the valid shapes at the rules'
//! edges and at the lists' bounds are accepted; defaults, the scale subresource, printer
//! columns and `kubectl explain` work.

use std::time::Duration;

use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use serde_json::{Value, json};
use weir_crds::rules::{self, MAX_INPUTS, MAX_NAME_LENGTH, MAX_OPERATORS};
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

async fn patch_raw(env: &TestEnv, ns: &str, name: &str, patch: Value) -> Result<(), String> {
    let api: Api<DynamicObject> = Api::namespaced_with(env.client.clone(), ns, &job_resource());
    api.patch(name, &PatchParams::default(), &Patch::Merge(&patch)).await.map(drop).map_err(|e| {
        match e {
            kube::Error::Api(s) => s.message,
            other => other.to_string(),
        }
    })
}

/// What `StreamJobSpec::validate` (the controller's check) says of `job`.
fn spec_error(job: &Value) -> String {
    let j: StreamJob = serde_json::from_value(job.clone()).unwrap();
    j.spec.validate().expect_err("the controller refuses it too").to_string()
}

#[tokio::test]
async fn crds_install_with_short_names_and_categories() {
    let env = env().await;
    // The apiserver takes the CRDs (their rules within the cost budget) without a warning.
    let crds = env.repo.join("crds/weir-crds.yaml");
    let (ok, _, err) = env.kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "--dry-run=server",
        "-f",
        crds.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(!err.to_lowercase().contains("warning"), "warnings applying the CRDs: {err}");
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
            "spec.pipeline.operators[0].uid",
        ),
        (
            "operator without a type",
            Box::new(|j| {
                j["spec"]["pipeline"]["operators"][1].as_object_mut().unwrap().remove("type");
            }),
            "spec.pipeline.operators[1].type",
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

/// Each CEL rule of the CRD refuses its case at create, naming the field, with the message
/// the controller writes for the same spec.
#[tokio::test]
async fn rules_refuse_with_the_controllers_words() {
    let env = env().await;
    let ns = env.namespace("rules").await;
    // (what, what to change, the field the apiserver names, the message: the controller's)
    type Mutation = Box<dyn Fn(&mut Value)>;
    let ops = |j: &mut Value| j["spec"]["pipeline"]["operators"].as_array_mut().unwrap().clone();
    let with_ops = |f: fn(&mut Vec<Value>)| -> Mutation {
        Box::new(move |j: &mut Value| {
            let mut o = ops(j);
            f(&mut o);
            j["spec"]["pipeline"]["operators"] = json!(o);
        })
    };
    let cases: Vec<(&str, Mutation, &str, Option<String>)> = vec![
        (
            "parallelism above maxParallelism",
            Box::new(|j| {
                j["spec"]["parallelism"] = json!(8);
                j["spec"]["maxParallelism"] = json!(4);
            }),
            "spec.parallelism",
            None,
        ),
        (
            "unaligned checkpoints at least once",
            Box::new(|j| {
                j["spec"]["checkpointing"] = json!({"unaligned": true, "mode": "at-least-once"})
            }),
            "spec.checkpointing.unaligned",
            None,
        ),
        (
            "checkpoints off in savepoint mode (the default)",
            Box::new(|j| j["spec"]["checkpointing"] = json!({"interval": "0s"})),
            "spec.checkpointing.interval",
            Some(rules::checkpoints_off("savepoint")),
        ),
        (
            "checkpoints off in last-state mode",
            Box::new(|j| {
                j["spec"]["checkpointing"] = json!({"interval": "0m0ms"});
                j["spec"]["upgradeMode"] = json!("last-state");
            }),
            "spec.checkpointing.interval",
            Some(rules::checkpoints_off("last-state")),
        ),
        (
            "restore from a snapshot and a path",
            Box::new(|j| {
                j["spec"]["restore"] = json!({"snapshot": "wc-1", "path": "s3://bucket/sp/1"})
            }),
            "spec.restore",
            None,
        ),
        (
            "a duplicate uid",
            with_ops(|o| o.push(json!({"uid": "src", "type": "blackhole", "inputs": ["out"]}))),
            "spec.pipeline.operators",
            None,
        ),
        (
            "an input that names no operator",
            with_ops(|o| o[1]["inputs"] = json!(["src", "nope"])),
            "spec.pipeline.operators",
            None,
        ),
        (
            "an operator that reads itself",
            with_ops(|o| {
                o.insert(1, json!({"uid": "loop", "type": "map", "inputs": ["src", "loop"]}))
            }),
            "spec.pipeline.operators[1].inputs",
            None,
        ),
        (
            "an unknown operator type",
            with_ops(|o| o[1]["type"] = json!("stdot")),
            "spec.pipeline.operators",
            None,
        ),
        (
            "a source with inputs",
            with_ops(|o| o.push(json!({"uid": "more", "type": "generator", "inputs": ["src"]}))),
            "spec.pipeline.operators[2].inputs",
            None,
        ),
        (
            "a sink without inputs",
            with_ops(|o| o[1].as_object_mut().unwrap().remove("inputs").map(drop).unwrap()),
            "spec.pipeline.operators[1].inputs",
            None,
        ),
        (
            "too many operators",
            with_ops(|o| {
                o.extend((0..MAX_OPERATORS - 1).map(
                    |i| json!({"uid": format!("out-{i}"), "type": "blackhole", "inputs": ["src"]}),
                ))
            }),
            "spec.pipeline.operators",
            None,
        ),
        (
            "too many inputs",
            with_ops(|o| o[1]["inputs"] = json!(vec!["src"; MAX_INPUTS + 1])),
            "spec.pipeline.operators[1].inputs",
            None,
        ),
    ];
    for (i, (what, mutate, field, message)) in cases.iter().enumerate() {
        let mut job = minimal_job(&format!("rule-{i}"));
        mutate(&mut job);
        let message = message.clone().unwrap_or_else(|| spec_error(&job));
        match create_raw(&env, &ns, job).await {
            Ok(_) => panic!("{what}: the apiserver accepted it"),
            Err(msg) => {
                assert!(msg.contains(field), "{what}: the message does not name {field}: {msg}");
                assert!(
                    msg.contains(&message),
                    "{what}: the message does not say what the controller says ({message}): {msg}"
                );
            }
        }
    }
    env.delete_namespace(&ns).await;
}

/// The transition rule: once the job has state (status.maxParallelism, which the controller
/// writes at the first checkpoint), a change of the number of key groups is refused, whether
/// maxParallelism is set or left to the default for the parallelism; before, and for other
/// changes, the spec changes freely.
#[tokio::test]
async fn max_parallelism_is_fixed_once_the_job_has_state() {
    let env = env().await;
    let ns = env.namespace("rules-mp").await;
    let mut job = minimal_job("mp");
    job["spec"]["maxParallelism"] = json!(128);
    create_raw(&env, &ns, job).await.unwrap();
    // No state yet: maxParallelism may change (the controller takes it too).
    patch_raw(&env, &ns, "mp", json!({"spec": {"maxParallelism": 256}})).await.unwrap();
    patch_raw(&env, &ns, "mp", json!({"spec": {"maxParallelism": 128}})).await.unwrap();
    let jobs: Api<StreamJob> = Api::namespaced(env.client.clone(), &ns);
    jobs.patch_status(
        "mp",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"maxParallelism": 128}})),
    )
    .await
    .unwrap();

    let refused = patch_raw(&env, &ns, "mp", json!({"spec": {"maxParallelism": 256}}))
        .await
        .expect_err("maxParallelism changed once the job has state");
    assert!(refused.contains("spec.maxParallelism"), "{refused}");
    assert!(refused.contains(&rules::max_parallelism_fixed(Some(256), 256, 128)), "{refused}");
    // Left to the default: 1.5 x 100 gives 256 key groups, not the 128 of the state.
    let refused =
        patch_raw(&env, &ns, "mp", json!({"spec": {"maxParallelism": null, "parallelism": 100}}))
            .await
            .expect_err("a parallelism whose default maxParallelism differs");
    assert!(refused.contains(&rules::max_parallelism_fixed(None, 256, 128)), "{refused}");
    // The same number of key groups, written or by default, and other changes are taken.
    patch_raw(&env, &ns, "mp", json!({"spec": {"maxParallelism": null, "parallelism": 85}}))
        .await
        .unwrap();
    patch_raw(&env, &ns, "mp", json!({"spec": {"maxParallelism": 128, "parallelism": 3}}))
        .await
        .unwrap();
    let (ok, _, err) = env.kubectl(&["-n", &ns, "scale", "sj/mp", "--replicas", "5"]);
    assert!(ok, "kubectl scale within the key groups: {err}");
    let j = jobs.get("mp").await.unwrap();
    assert_eq!((j.spec.parallelism, j.spec.max_parallelism), (5, Some(128)));
    // A scale beyond them is refused as well.
    let (ok, _, err) = env.kubectl(&["-n", &ns, "scale", "sj/mp", "--replicas", "200"]);
    assert!(!ok && err.contains("spec.parallelism 200 is above spec.maxParallelism 128"), "{err}");
    env.delete_namespace(&ns).await;
}

/// The shapes at the edges of the rules, and a pipeline at the bounds of every list, are
/// accepted (within the apiserver's cost budget at run time too).
#[tokio::test]
async fn valid_shapes_at_the_rules_edges_are_accepted() {
    let env = env().await;
    let ns = env.namespace("rules-ok").await;
    type Mutation = Box<dyn Fn(&mut Value)>;
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "parallelism equal to maxParallelism",
            Box::new(|j| {
                j["spec"]["parallelism"] = json!(4);
                j["spec"]["maxParallelism"] = json!(4);
            }),
        ),
        (
            "parallelism 86, maxParallelism by default",
            Box::new(|j| j["spec"]["parallelism"] = json!(86)),
        ),
        (
            "unaligned exactly once",
            Box::new(|j| j["spec"]["checkpointing"] = json!({"unaligned": true})),
        ),
        (
            "at least once, aligned",
            Box::new(|j| j["spec"]["checkpointing"] = json!({"mode": "at-least-once"})),
        ),
        (
            "checkpoints off, stateless",
            Box::new(|j| {
                j["spec"]["checkpointing"] = json!({"interval": "0s"});
                j["spec"]["upgradeMode"] = json!("stateless");
            }),
        ),
        (
            "checkpoints every 10ms in last-state mode",
            Box::new(|j| {
                j["spec"]["checkpointing"] = json!({"interval": "0s10ms"});
                j["spec"]["upgradeMode"] = json!("last-state");
            }),
        ),
        (
            "restore from a snapshot",
            Box::new(|j| j["spec"]["restore"] = json!({"snapshot": "wc-1"})),
        ),
        (
            "restore from a path",
            Box::new(|j| j["spec"]["restore"] = json!({"path": "s3://bucket/sp/1"})),
        ),
        (
            "a fan-in and a fan-out",
            Box::new(|j| {
                j["spec"]["pipeline"]["operators"] = json!([
                    {"uid": "a", "type": "generator"},
                    {"uid": "b", "type": "socket", "port": 9000},
                    {"uid": "words", "type": "split", "inputs": ["a", "b"]},
                    {"uid": "counts", "type": "count", "inputs": ["words"], "key": "word"},
                    {"uid": "out", "type": "stdout", "inputs": ["counts"]},
                    {"uid": "raw", "type": "blackhole", "inputs": ["words", "a"]},
                ])
            }),
        ),
        (
            "every list at its bound, uids at their longest",
            Box::new(|j| {
                let uid = |i: usize| format!("{i:0>width$}", width = MAX_NAME_LENGTH);
                let mut ops = vec![json!({"uid": uid(0), "type": "generator"})];
                for i in 1..MAX_OPERATORS {
                    // Each reads up to MAX_INPUTS of the operators before it.
                    let inputs: Vec<String> = (i.saturating_sub(MAX_INPUTS)..i).map(uid).collect();
                    ops.push(json!({"uid": uid(i), "type": "map", "inputs": inputs}));
                }
                j["spec"]["pipeline"]["operators"] = json!(ops);
            }),
        ),
    ];
    for (i, (what, mutate)) in cases.iter().enumerate() {
        let mut job = minimal_job(&format!("ok-{i}"));
        mutate(&mut job);
        let j: StreamJob = serde_json::from_value(job.clone()).unwrap();
        j.spec.validate().unwrap_or_else(|e| panic!("{what}: the controller refuses it: {e}"));
        if let Err(e) = create_raw(&env, &ns, job).await {
            panic!("{what}: refused: {e}");
        }
    }
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

/// The transition rule on a StreamSnapshot's `spec.path`: it cannot change (the controller
/// refuses a changed one with the same words), while the rest of the spec and the status may.
#[tokio::test]
async fn a_stream_snapshots_path_is_immutable() {
    let env = env().await;
    let ns = env.namespace("ssnap-path").await;
    let snaps: Api<StreamSnapshot> = Api::namespaced(env.client.clone(), &ns);
    let snap: StreamSnapshot = serde_json::from_value(json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamSnapshot",
        "metadata": {"name": "wc-1"},
        "spec": {"job": "wc", "path": "s3://bucket/savepoints/ns/wc/sp-1", "reason": "Upgrade"},
    }))
    .unwrap();
    snaps.create(&PostParams::default(), &snap).await.unwrap();
    let patch = |spec: Value| {
        let snaps = snaps.clone();
        async move {
            snaps
                .patch("wc-1", &PatchParams::default(), &Patch::Merge(json!({"spec": spec})))
                .await
                .map(drop)
                .map_err(|e| match e {
                    kube::Error::Api(s) => s.message,
                    other => other.to_string(),
                })
        }
    };
    let refused =
        patch(json!({"path": "s3://bucket/elsewhere"})).await.expect_err("a changed spec.path");
    assert!(refused.contains("spec.path"), "{refused}");
    assert!(refused.contains(rules::SNAPSHOT_PATH_IMMUTABLE.0), "{refused}");
    // The same path again, and other fields, are taken.
    patch(json!({"path": "s3://bucket/savepoints/ns/wc/sp-1", "keep": true})).await.unwrap();
    snaps
        .patch_status(
            "wc-1",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"phase": "Completed", "message": "m"}})),
        )
        .await
        .unwrap();
    let s = snaps.get("wc-1").await.unwrap();
    assert_eq!(s.spec.path.to_string(), "s3://bucket/savepoints/ns/wc/sp-1");
    assert!(s.spec.keep);
    env.delete_namespace(&ns).await;
}
