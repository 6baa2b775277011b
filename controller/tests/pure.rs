//! The controller's pure steps over YAML fixtures, no API: validate (each refusal names its
//! field), build (the objects a job runs as), status (what is observed → what is written, and
//! which events that is worth).

use std::collections::BTreeMap;

use k8s_openapi::ByteString;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use serde_json::{Value, json};
use weir_controller::build::{self, BuildConfig};
use weir_controller::status::{self, Observation};
use weir_controller::validate::{self, Defaults, Observed};
use weir_crds::api::{CheckpointInfo, CheckpointStatus, JobInfo, JobState};
use weir_crds::streamjob::UpgradeMode;
use weir_crds::streamjob::{JobPhase, StreamJobStatus};
use weir_crds::{StorageUri, StreamJob};

fn fixture(name: &str) -> StreamJob {
    let path = format!("{}/tests/fixtures/{name}", manifest_dir());
    serde_saphyr::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

/// `job` with a JSON merge patch applied (as `kubectl patch --type merge` would).
fn patched(job: &StreamJob, patch: Value) -> StreamJob {
    let mut v = serde_json::to_value(job).unwrap();
    merge(&mut v, &patch);
    serde_json::from_value(v).unwrap()
}

fn merge(a: &mut Value, b: &Value) {
    match (a, b) {
        (Value::Object(a), Value::Object(b)) => {
            for (k, v) in b {
                if v.is_null() {
                    a.remove(k);
                } else {
                    merge(a.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (a, b) => *a = b.clone(),
    }
}

fn secret(keys: &[&str]) -> Observed {
    Observed {
        credentials_secret: Some(
            keys.iter()
                .map(|k| (k.to_string(), ByteString(b"x".to_vec())))
                .collect::<BTreeMap<_, _>>(),
        ),
    }
}

fn good_secret() -> Observed {
    secret(&["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
}

fn cfg() -> BuildConfig {
    BuildConfig {
        runtime_image: "ghcr.io/weir-dev/weir:test".into(),
        service_domain: "svc".into(),
        controller_namespace: "weir-system".into(),
    }
}

#[test]
fn a_good_spec_passes_and_keeps_its_storage() {
    let job = fixture("wordcount-s3.yaml");
    let v = validate::validate(&job, &good_secret(), &Defaults::default()).unwrap();
    assert_eq!(v.checkpoint_storage, Some("s3://weir-data/checkpoints".parse().unwrap()));
    assert_eq!(v.max_parallelism, 128);
    // A job without storage takes the operator's default, and is refused without one.
    let generator = fixture("generator-default-storage.yaml");
    let defaults = Defaults {
        checkpoint_storage: Some("s3://ops/checkpoints".parse::<StorageUri>().unwrap()),
    };
    let v = validate::validate(&generator, &Observed::default(), &defaults).unwrap();
    assert_eq!(v.checkpoint_storage.unwrap().to_string(), "s3://ops/checkpoints");
    let e = validate::validate(&generator, &Observed::default(), &Defaults::default()).unwrap_err();
    assert_eq!(e.field, "spec.checkpointing.storage");
    assert!(e.message.contains("s3://bucket/prefix"), "{}", e.message);
    // No checkpoints (which only a stateless job may do), no storage needed.
    let none = patched(
        &generator,
        json!({"spec": {"checkpointing": {"interval": "0s"}, "upgradeMode": "stateless"}}),
    );
    assert_eq!(
        validate::validate(&none, &Observed::default(), &Defaults::default())
            .unwrap()
            .checkpoint_storage,
        None
    );
}

#[test]
fn each_refusal_names_its_field_and_what_to_do() {
    let job = fixture("wordcount-s3.yaml");
    let ops = |f: &dyn Fn(&mut Vec<Value>)| {
        let mut v = serde_json::to_value(&job.spec.pipeline.operators).unwrap();
        f(v.as_array_mut().unwrap());
        json!({"spec": {"pipeline": {"operators": v}}})
    };
    let cases: Vec<(&str, Value, Observed, &str, &str)> = vec![
        (
            "parallelism above maxParallelism",
            json!({"spec": {"parallelism": 200}}),
            good_secret(),
            "spec.parallelism",
            "spec.parallelism 200 is above spec.maxParallelism 128",
        ),
        (
            "checkpoints off in savepoint mode",
            json!({"spec": {"checkpointing": {"interval": "0s"}}}),
            good_secret(),
            "spec.checkpointing.interval",
            "spec.checkpointing.interval 0s turns checkpoints off, and spec.upgradeMode savepoint needs them",
        ),
        (
            "checkpoints off in last-state mode",
            json!({"spec": {"checkpointing": {"interval": "0s"}, "upgradeMode": "last-state"}}),
            good_secret(),
            "spec.checkpointing.interval",
            "spec.upgradeMode last-state needs them",
        ),
        (
            "maxParallelism changed after the job has state",
            json!({"spec": {"maxParallelism": 256}, "status": {"maxParallelism": 128}}),
            good_secret(),
            "spec.maxParallelism",
            "spec.maxParallelism 256 differs from 128",
        ),
        (
            "a duplicate uid",
            ops(&|o| o[1]["uid"] = json!("lines")),
            good_secret(),
            "spec.pipeline",
            "uid \"lines\" is used by more than one operator",
        ),
        (
            "an unknown operator type",
            ops(&|o| o[3]["type"] = json!("file_snk")),
            good_secret(),
            "spec.pipeline",
            "type \"file_snk\" is unknown: use one of",
        ),
        (
            "a malformed S3 URI among an operator's parameters",
            ops(&|o| o[0]["path"] = json!("s3://Weir_Data/in")),
            good_secret(),
            "spec.pipeline.operators[0].path",
            "the bucket name must be",
        ),
        (
            "a negative rate",
            ops(&|o| o[0]["ratePerSecond"] = json!(-5)),
            good_secret(),
            "spec.pipeline.operators[0]",
            "spec.pipeline.operators[0]: operator \"lines\" (file_source): ratePerSecond -5 is not above 0: give a rate, or leave it out for no limit",
        ),
        (
            "an unknown parameter",
            ops(&|o| o[2]["keys"] = json!("word")),
            good_secret(),
            "spec.pipeline.operators[2]",
            "operator \"counts\" (count): unknown field `keys`, expected `key` or `field`",
        ),
        (
            "a parameter of the wrong type",
            ops(&|o| o[0]["ratePerSecond"] = json!("fast")),
            good_secret(),
            "spec.pipeline.operators[0]",
            "operator \"lines\" (file_source): invalid type: string \"fast\", expected f64",
        ),
        (
            "a key that is not a field of the input",
            ops(&|o| o[2]["key"] = json!("wrd")),
            good_secret(),
            "spec.pipeline.operators[2]",
            "operator \"counts\" (count): key \"wrd\" is not a field of its input (fields: word)",
        ),
        (
            "checkpoints on a local directory",
            json!({"spec": {"checkpointing": {"storage": "/var/tmp/weir/checkpoints"}}}),
            good_secret(),
            "spec.checkpointing.storage",
            "is a local directory",
        ),
        (
            "savepoints on a local directory",
            json!({"spec": {"savepoints": {"directory": "/sp"}}}),
            good_secret(),
            "spec.savepoints.directory",
            "is a local directory",
        ),
        (
            "an endpoint that is no URL",
            json!({"spec": {"s3": {"endpoint": "s3.storage:9000"}}}),
            good_secret(),
            "spec.s3.endpoint",
            "write http://host:port",
        ),
        (
            "a missing credentials Secret",
            json!({}),
            Observed::default(),
            "spec.s3.credentialsSecret",
            "Secret \"s3-credentials\" does not exist in namespace \"team-a\"",
        ),
        (
            "a credentials Secret without the key",
            json!({}),
            secret(&["AWS_ACCESS_KEY_ID"]),
            "spec.s3.credentialsSecret.secretAccessKeyKey",
            "has no key \"AWS_SECRET_ACCESS_KEY\"",
        ),
    ];
    for (what, patch, observed, field, text) in cases {
        let bad = patched(&job, patch);
        let e = validate::validate(&bad, &observed, &Defaults::default()).expect_err(what);
        assert_eq!(e.field, field, "{what}: {}", e.message);
        assert!(e.message.contains(text), "{what}: {}", e.message);
        assert!(
            e.message.starts_with(field),
            "{what}: the message names the field first: {}",
            e.message
        );
    }
}

#[test]
fn a_missing_secret_is_worth_checking_again_a_bad_spec_is_not() {
    let job = fixture("wordcount-s3.yaml");
    let e = validate::validate(&job, &Observed::default(), &Defaults::default()).unwrap_err();
    assert!(e.external);
    let bad = patched(&job, json!({"spec": {"parallelism": 200}}));
    assert!(!validate::validate(&bad, &good_secret(), &Defaults::default()).unwrap_err().external);
    // A suspended job needs no credentials.
    let suspended = patched(&job, json!({"spec": {"state": "suspended"}}));
    assert!(validate::validate(&suspended, &Observed::default(), &Defaults::default()).is_ok());
}

fn objects(job: &StreamJob, workers: i32) -> build::Objects {
    let v = validate::validate(job, &good_secret(), &Defaults::default()).unwrap();
    build::objects(job, &v, &cfg(), workers, &run(job))
}

fn run(job: &StreamJob) -> build::Run {
    build::Run { job_id: build::job_id(job), restore_path: None }
}

fn to_json<T: serde::Serialize>(t: &T) -> Value {
    serde_json::to_value(t).unwrap()
}

#[test]
fn a_job_runs_as_five_owned_objects_named_from_it() {
    let job = fixture("wordcount-s3.yaml");
    let o = objects(&job, 3);
    let all = [
        to_json(&o.config_map),
        to_json(&o.coordinator_service),
        to_json(&o.coordinator),
        to_json(&o.worker_service),
        to_json(&o.workers),
    ];
    let names: Vec<(&str, &str)> = all
        .iter()
        .map(|v| (v["kind"].as_str().unwrap(), v["metadata"]["name"].as_str().unwrap()))
        .collect();
    assert_eq!(
        names,
        [
            ("ConfigMap", "wordcount-job"),
            ("Service", "wordcount-coordinator"),
            ("Deployment", "wordcount-coordinator"),
            ("Service", "wordcount-worker"),
            ("StatefulSet", "wordcount-worker"),
        ]
    );
    for v in &all {
        let owner = &v["metadata"]["ownerReferences"][0];
        assert_eq!(owner["kind"], "StreamJob");
        assert_eq!(owner["name"], "wordcount");
        assert_eq!(owner["uid"], "6f1c2a9e-0b7d-4c3e-9a51-2d8e4f7a1b30");
        assert_eq!(owner["controller"], true);
        assert_eq!(v["metadata"]["namespace"], "team-a");
        assert_eq!(v["metadata"]["labels"]["weir.dev/job"], "wordcount");
        assert!(v["metadata"]["annotations"][build::APPLIED_HASH].is_string());
    }
    let sts = to_json(&o.workers);
    assert_eq!(sts["spec"]["replicas"], 3);
    assert_eq!(sts["spec"]["podManagementPolicy"], "Parallel");
    assert_eq!(sts["spec"]["serviceName"], "wordcount-worker");
    let worker = &sts["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> =
        worker["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert_eq!(args[..3], ["worker", "--coordinator", "wordcount-coordinator.team-a.svc:6123"]);
    assert!(args.windows(2).any(|w| w == ["--pod-name", "$(POD_NAME)"]), "{args:?}");
    assert_eq!(worker["image"], "ghcr.io/weir-dev/weir:test");
    assert_eq!(worker["resources"]["limits"]["memory"], "2Gi");
    // Credentials only through Secret references.
    let env = worker["env"].as_array().unwrap();
    let key_id = env.iter().find(|e| e["name"] == "AWS_ACCESS_KEY_ID").unwrap();
    assert_eq!(
        key_id["valueFrom"]["secretKeyRef"],
        json!({"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"})
    );
    assert!(env.iter().all(|e| e.get("value").is_none()), "no literal values: {env:?}");
    // Non-root, read-only root file system, nothing to escalate.
    for pod in [&sts["spec"]["template"], &to_json(&o.coordinator)["spec"]["template"]] {
        assert_eq!(pod["spec"]["securityContext"]["runAsNonRoot"], true);
        let c = &pod["spec"]["containers"][0];
        assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
        assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
        assert_eq!(c["securityContext"]["capabilities"]["drop"], json!(["ALL"]));
    }
    let deploy = to_json(&o.coordinator);
    assert_eq!(deploy["spec"]["replicas"], 1);
    assert_eq!(deploy["spec"]["strategy"]["type"], "Recreate");
    let c = &deploy["spec"]["template"]["spec"]["containers"][0];
    let args: Vec<&str> =
        c["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
    assert!(args.contains(&"--resume") && args.contains(&"--stay-after-end"), "{args:?}");
    assert!(args.windows(2).any(|w| w == ["--job-id", "6f1c2a9e0b7d"]), "{args:?}");
    let token =
        c["env"].as_array().unwrap().iter().find(|e| e["name"] == "WEIR_API_TOKEN").unwrap();
    assert_eq!(token["valueFrom"]["secretKeyRef"]["name"], "wordcount-api-token");
    assert_eq!(to_json(&o.worker_service)["spec"]["clusterIP"], "None");
}

#[test]
fn the_coordinator_and_every_worker_take_the_job_secret_from_the_secret_by_reference() {
    let job = fixture("wordcount-s3.yaml");
    // With and without a pod template overlay (a label, a sidecar with a value of its own).
    let overlaid = patched(
        &job,
        json!({"spec": {"podTemplate": {"metadata": {"labels": {"team": "a"}}, "spec": {"containers": [
            {"name": "sidecar", "image": "busybox", "env": [{"name": "EXTRA", "value": "1"}]},
        ]}}}}),
    );
    for job in [&job, &overlaid] {
        let o = objects(job, 3);
        for (what, pod) in [
            ("coordinator", to_json(&o.coordinator)["spec"]["template"].clone()),
            ("worker", to_json(&o.workers)["spec"]["template"].clone()),
        ] {
            let c = pod["spec"]["containers"]
                .as_array()
                .unwrap()
                .iter()
                .find(|c| c["name"] == what)
                .unwrap_or_else(|| panic!("no {what} container: {pod}"))
                .clone();
            let env = c["env"].as_array().unwrap();
            let secret: Vec<&Value> =
                env.iter().filter(|e| e["name"] == build::JOB_SECRET_ENV).collect();
            assert_eq!(secret.len(), 1, "{what}: {env:?}");
            assert_eq!(
                secret[0],
                &json!({"name": "WEIR_JOB_SECRET", "valueFrom": {"secretKeyRef": {
                    "name": "wordcount-job-secret", "key": "jobSecret",
                }}}),
                "{what}"
            );
            // Never a value in the runtime's containers.
            for e in env {
                assert!(e.get("value").is_none(), "{what}: a literal value in {e}");
            }
        }
    }
}

#[test]
fn the_token_and_the_job_secret_are_secrets_of_their_own() {
    let job = fixture("wordcount-s3.yaml");
    let token = to_json(&build::api_token(&job, "t0k3n"));
    let secret = to_json(&build::job_secret(&job, &"ab".repeat(32)));
    for (s, name) in [(&token, "wordcount-api-token"), (&secret, "wordcount-job-secret")] {
        assert_eq!(s["kind"], "Secret");
        assert_eq!(s["type"], "Opaque");
        assert_eq!(s["metadata"]["name"], name);
        assert_eq!(s["metadata"]["namespace"], "team-a");
        let owner = &s["metadata"]["ownerReferences"][0];
        assert_eq!(owner["uid"], "6f1c2a9e-0b7d-4c3e-9a51-2d8e4f7a1b30");
        assert_eq!(
            (owner["kind"].as_str(), owner["controller"].as_bool()),
            (Some("StreamJob"), Some(true))
        );
        assert_eq!(s["metadata"]["labels"]["weir.dev/job"], "wordcount");
        assert_eq!(s["metadata"]["labels"], token["metadata"]["labels"], "the same labels");
    }
    assert_eq!(build::token_secret_name("wordcount"), "wordcount-api-token");
    assert_eq!(build::job_secret_name("wordcount"), "wordcount-job-secret");
    // One key each: who reads the token (to ask for a savepoint) does not see the job's
    // secret.
    assert_eq!(token["stringData"], json!({"token": "t0k3n"}));
    assert_eq!(secret["stringData"], json!({"jobSecret": "ab".repeat(32)}));
    // The coordinator takes both by reference, the workers the job's secret only.
    let o = objects(&job, 2);
    let env = |v: Value| -> Vec<(String, Value)> {
        v["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["valueFrom"].get("secretKeyRef").is_some())
            .map(|e| {
                (e["name"].as_str().unwrap().to_string(), e["valueFrom"]["secretKeyRef"].clone())
            })
            .collect()
    };
    let coordinator = env(to_json(&o.coordinator));
    let worker = env(to_json(&o.workers));
    let reference = |name: &str, key: &str| json!({"name": name, "key": key});
    assert!(
        coordinator.contains(&("WEIR_API_TOKEN".into(), reference("wordcount-api-token", "token"))),
        "{coordinator:?}"
    );
    for e in [&coordinator, &worker] {
        assert!(
            e.contains(&("WEIR_JOB_SECRET".into(), reference("wordcount-job-secret", "jobSecret"))),
            "{e:?}"
        );
    }
    assert!(!worker.iter().any(|(n, _)| n == "WEIR_API_TOKEN"), "{worker:?}");
}

#[test]
fn the_network_policy_lets_in_the_jobs_pods_and_the_controllers_namespace_only() {
    let job = fixture("wordcount-s3.yaml");
    let np = to_json(&build::network_policy(&job, &cfg()));
    assert_eq!(np["apiVersion"], "networking.k8s.io/v1");
    assert_eq!(np["kind"], "NetworkPolicy");
    assert_eq!(np["metadata"]["name"], build::network_policy_name("wordcount"));
    assert_eq!(np["metadata"]["name"], "wordcount-ingress");
    assert_eq!(np["metadata"]["namespace"], "team-a");
    assert_eq!(np["metadata"]["labels"]["weir.dev/job"], "wordcount");
    let owner = &np["metadata"]["ownerReferences"][0];
    assert_eq!(owner["kind"], "StreamJob");
    assert_eq!(owner["uid"], "6f1c2a9e-0b7d-4c3e-9a51-2d8e4f7a1b30");
    assert_eq!(owner["controller"], true);
    assert!(np["metadata"]["annotations"][build::APPLIED_HASH].is_string());
    let pods = json!({"matchLabels": {"weir.dev/job": "wordcount"}});
    assert_eq!(
        np["spec"],
        json!({
            "podSelector": pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": pods}],
                    "ports": [{"port": 6123, "protocol": "TCP"}, {"port": 6124, "protocol": "TCP"}],
                },
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "weir-system"}}}],
                    "ports": [{"port": 8081, "protocol": "TCP"}],
                },
            ],
        })
    );
    // Its selector picks both pods, and its ports are the ones they listen on.
    let o = objects(&job, 2);
    for pod in [to_json(&o.coordinator), to_json(&o.workers)] {
        let labels = &pod["spec"]["template"]["metadata"]["labels"];
        assert_eq!(labels["weir.dev/job"], "wordcount");
    }
    let c = &to_json(&o.coordinator)["spec"]["template"]["spec"]["containers"][0];
    let w = &to_json(&o.workers)["spec"]["template"]["spec"]["containers"][0];
    let mut listening: Vec<u64> = [c, w]
        .iter()
        .flat_map(|c| c["ports"].as_array().unwrap().iter())
        .map(|p| p["containerPort"].as_u64().unwrap())
        .collect();
    listening.sort();
    assert_eq!(
        listening,
        [build::CONTROL_PORT, build::DATA_PORT, build::API_PORT].map(u64::from).to_vec()
    );
    // The controller's namespace comes from its configuration; the policy is the same for
    // the same job (its hash too), and turning it off or on is no upgrade.
    let mut other = cfg();
    other.controller_namespace = "ops".into();
    let np2 = to_json(&build::network_policy(&job, &other));
    assert_eq!(
        np2["spec"]["ingress"][1]["from"][0]["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"],
        "ops"
    );
    assert_ne!(
        np["metadata"]["annotations"][build::APPLIED_HASH],
        np2["metadata"]["annotations"][build::APPLIED_HASH]
    );
    assert_eq!(np, to_json(&build::network_policy(&job, &cfg())));
    let hash = |j: &StreamJob| {
        let v = validate::validate(j, &good_secret(), &Defaults::default()).unwrap();
        build::spec_hash(j, &v, &cfg())
    };
    let off = patched(&job, json!({"spec": {"networkPolicy": {"enabled": false}}}));
    assert!(!off.spec.network_policy.enabled);
    assert!(job.spec.network_policy.enabled, "on by default");
    assert_eq!(hash(&off), hash(&job));
    let v = validate::validate(&off, &good_secret(), &Defaults::default()).unwrap();
    let file = build::job_file(&off, &v, &run(&off));
    assert!(!file.contains("networkPolicy"), "{file}");
}

#[test]
fn the_job_file_is_the_spec_with_the_defaults_filled_in() {
    let job = fixture("generator-default-storage.yaml");
    let defaults = Defaults { checkpoint_storage: Some("s3://ops/chk".parse().unwrap()) };
    let v = validate::validate(&job, &Observed::default(), &defaults).unwrap();
    let o = build::objects(&job, &v, &cfg(), 2, &run(&job));
    let file = o.config_map.data.as_ref().unwrap()["job.yaml"].clone();
    let back: StreamJob = serde_saphyr::from_str(&file).unwrap();
    assert_eq!(back.metadata.name.as_deref(), Some("gen"));
    assert_eq!(back.spec.checkpointing.storage.unwrap().to_string(), "s3://ops/chk");
    assert_eq!(back.spec.max_parallelism, Some(128));
    assert_eq!(back.spec.pipeline, job.spec.pipeline);
}

#[test]
fn hashes_change_with_the_spec_and_only_then() {
    let job = fixture("wordcount-s3.yaml");
    let h = |o: &build::Objects| {
        [to_json(&o.config_map), to_json(&o.coordinator), to_json(&o.workers)].map(|v| {
            v["metadata"]["annotations"][build::APPLIED_HASH].as_str().unwrap().to_string()
        })
    };
    let a = h(&objects(&job, 3));
    assert_eq!(a, h(&objects(&job, 3)), "the same spec builds the same objects");
    let b = h(&objects(&patched(&job, json!({"spec": {"checkpointing": {"interval": "7s"}}})), 3));
    assert_ne!(a[0], b[0]);
    assert_ne!(a[1], b[1], "a new job file restarts the coordinator");
    assert_eq!(a[2], b[2], "workers take the job from the coordinator: they stay");
    let c = h(&objects(&job, 0));
    assert_eq!((a[0].as_str(), a[1].as_str()), (c[0].as_str(), c[1].as_str()));
    assert_ne!(a[2], c[2]);
    // A restart nonce restarts the coordinator only.
    let d = h(&objects(&patched(&job, json!({"spec": {"restartNonce": 2}})), 3));
    assert_eq!((a[0].as_str(), a[2].as_str()), (d[0].as_str(), d[2].as_str()));
    assert_ne!(a[1], d[1]);
}

#[test]
fn an_upgrade_is_a_change_of_what_the_spec_runs_and_not_of_what_only_the_controller_reads() {
    let job = fixture("wordcount-s3.yaml");
    let hash = |j: &StreamJob| {
        let v = validate::validate(j, &good_secret(), &Defaults::default()).unwrap();
        build::spec_hash(j, &v, &cfg())
    };
    let a = hash(&job);
    for same in [
        json!({"spec": {"restartNonce": 3}}),
        json!({"spec": {"upgradeMode": "stateless"}}),
        json!({"spec": {"savepoints": {"triggerNonce": 1, "interval": "1h", "retention": {"maxCount": 2}}}}),
        json!({"spec": {"upgrade": {"readyTimeout": "1m"}}}),
        json!({"spec": {"state": "suspended"}}),
    ] {
        assert_eq!(hash(&patched(&job, same.clone())), a, "{same}");
    }
    for other in [
        json!({"spec": {"parallelism": 5}}),
        json!({"spec": {"image": "weir:2"}}),
        json!({"spec": {"checkpointing": {"interval": "9s"}}}),
        json!({"spec": {"resources": {"worker": {"limits": {"memory": "1Gi"}}}}}),
    ] {
        assert_ne!(hash(&patched(&job, other.clone())), a, "{other}");
    }
    // Each run after the first gets a job id of its own.
    assert_eq!(build::next_job_id("0a1b2c3d4e5f"), "0a1b2c3d4e5f-2");
    assert_eq!(build::next_job_id("0a1b2c3d4e5f-2"), "0a1b2c3d4e5f-3");
    // The run's restore point goes to the job file; the controller's fields do not.
    let v = validate::validate(&job, &good_secret(), &Defaults::default()).unwrap();
    let run = build::Run {
        job_id: "x-2".into(),
        restore_path: Some("s3://bucket/sp/sp-1".parse().unwrap()),
    };
    let file = build::job_file(&patched(&job, json!({"spec": {"restartNonce": 3}})), &v, &run);
    let back: StreamJob = serde_saphyr::from_str(&file).unwrap();
    assert_eq!(back.spec.restore.unwrap().path.expect(&file).to_string(), "s3://bucket/sp/sp-1");
    assert!(!file.contains("restartNonce") && !file.contains("upgradeMode"), "{file}");
}

#[test]
fn an_upgrade_that_cannot_restore_the_running_state_is_refused_before_anything_stops() {
    let job = fixture("wordcount-s3.yaml");
    let v = validate::validate(&job, &good_secret(), &Defaults::default()).unwrap();
    let d = weir_controller::lifecycle::deployed(
        &job,
        "h".into(),
        v.max_parallelism,
        "id".into(),
        None,
    );
    assert!(!d.stateful_uids.is_empty());
    let with_state = StreamJobStatus {
        last_checkpoint: Some(
            serde_json::from_value(
                json!({"id": 3, "completedAt": "2026-11-21T00:00:00Z", "sizeBytes": 1}),
            )
            .unwrap(),
        ),
        ..Default::default()
    };
    assert!(validate::preflight(&job, &d, &with_state).is_ok());
    // A stateful operator dropped.
    let uid = d.stateful_uids.last().unwrap().clone();
    let mut dropped = job.clone();
    dropped.spec.pipeline.operators.retain(|o| o.uid != uid);
    for o in &mut dropped.spec.pipeline.operators {
        o.inputs.retain(|i| *i != uid);
    }
    let e = validate::preflight(&dropped, &d, &with_state).unwrap_err();
    assert_eq!(e.field, "spec.pipeline.operators");
    assert!(
        e.message.contains(&format!("{uid:?}")) && e.message.contains("allowNonRestoredState"),
        "{}",
        e.message
    );
    let allowed = patched(&dropped, json!({"spec": {"restore": {"allowNonRestoredState": true}}}));
    assert!(validate::preflight(&allowed, &d, &with_state).is_ok());
    // Another number of key groups, once there is state.
    let more = patched(&job, json!({"spec": {"maxParallelism": 256}}));
    let e = validate::preflight(&more, &d, &with_state).unwrap_err();
    assert_eq!(e.field, "spec.maxParallelism");
    assert!(validate::preflight(&more, &d, &StreamJobStatus::default()).is_ok(), "no state yet");
    // Another state backend: through a savepoint, not from the last checkpoint.
    assert_eq!(d.state_backend.as_str(), "rocksdb");
    let heap = patched(&job, json!({"spec": {"stateBackend": "heap"}}));
    assert!(validate::preflight(&heap, &d, &with_state).is_ok(), "savepoint mode");
    let last_state = patched(&heap, json!({"spec": {"upgradeMode": "last-state"}}));
    let e = validate::preflight(&last_state, &d, &with_state).unwrap_err();
    assert_eq!(e.field, "spec.stateBackend");
    assert!(
        e.message.contains("from rocksdb to heap needs a savepoint")
            && e.message.contains("spec.upgradeMode: savepoint"),
        "{}",
        e.message
    );
    // A savepoint upgrade that would fall back on the last checkpoint waits instead.
    let e = validate::backend_change(&heap, &d, &with_state, UpgradeMode::LastState).unwrap_err();
    assert_eq!(e.field, "spec.stateBackend");
    assert!(validate::backend_change(&heap, &d, &with_state, UpgradeMode::Stateless).is_ok());
    assert!(validate::preflight(&last_state, &d, &StreamJobStatus::default()).is_ok(), "no state");
}

#[test]
fn a_pod_template_overlay_merges_containers_by_name() {
    let job = patched(
        &fixture("wordcount-s3.yaml"),
        json!({"spec": {"podTemplate": {
            "metadata": {"annotations": {"team": "a"}},
            "spec": {
                "nodeSelector": {"disk": "ssd"},
                "containers": [
                    {"name": "worker", "env": [{"name": "RUST_LOG", "value": "debug"}]},
                    {"name": "sidecar", "image": "busybox"},
                ],
            },
        }}}),
    );
    let o = objects(&job, 3);
    let pod = &to_json(&o.workers)["spec"]["template"];
    assert_eq!(pod["metadata"]["annotations"]["team"], "a");
    assert!(
        to_json(&o.coordinator)["spec"]["template"]["metadata"]["annotations"][build::CONFIG_HASH]
            .is_string()
    );
    assert_eq!(pod["spec"]["nodeSelector"]["disk"], "ssd");
    let cs = pod["spec"]["containers"].as_array().unwrap();
    assert_eq!(cs.len(), 2);
    assert_eq!(cs[0]["name"], "worker");
    assert_eq!(
        cs[0]["args"][0], "worker",
        "the runtime's container keeps what the overlay does not set"
    );
    assert_eq!(cs[0]["env"], json!([{"name": "RUST_LOG", "value": "debug"}]));
    assert_eq!(cs[1]["name"], "sidecar");
}

fn info(state: JobState, restarts: u32, checkpoint: Option<u64>) -> JobInfo {
    serde_json::from_value(json!({
        "name": "wordcount", "runId": "r1", "state": state, "parallelism": 3, "maxParallelism": 128,
        "workersConnected": 3, "workersExpected": 3, "uptimeSeconds": 12.5, "startedAt": 1_763_000_000_000u64,
        "stateBytes": 1000, "operators": [], "restarts": restarts,
        "lastCheckpoint": checkpoint.map(|id| CheckpointInfo {
            id, status: CheckpointStatus::Completed, trigger_time: 1_763_000_010_000, duration_ms: 250,
            size_bytes: 4096, uploaded_bytes: 4096, alignment_ms: 0, unaligned: false, in_flight_bytes: 0,
            acknowledged: 3, subtasks: 3, final_: false, path: Some("s3://weir-data/checkpoints/x/chk-1".into()),
            failure: None,
        }),
    }))
    .unwrap()
}

fn observe(job: &StreamJob, deployed: bool, c: Option<Result<JobInfo, String>>) -> StreamJobStatus {
    let obs = Observation {
        invalid: None,
        deployed,
        coordinator: c,
        job_id: build::job_id(job),
        selector: build::worker_selector("wordcount"),
        problem: None,
    };
    status::next(
        job,
        &job.status.clone().unwrap_or_default(),
        &obs,
        &Time(Timestamp::from_second(1_763_000_100).unwrap()),
    )
}

fn with_status(job: &StreamJob, s: &StreamJobStatus) -> StreamJob {
    let mut j = job.clone();
    j.status = Some(s.clone());
    j
}

fn cond<'a>(s: &'a StreamJobStatus, t: &str) -> (&'a str, &'a str) {
    let c = status::condition(s, t).unwrap();
    (c.status.as_str(), c.reason.as_str())
}

#[test]
fn the_status_follows_the_job_through_its_life() {
    let job = fixture("wordcount-s3.yaml");
    // Just applied, the coordinator not up yet.
    let s1 = observe(&job, true, Some(Err("connection refused".into())));
    assert_eq!(s1.phase, Some(JobPhase::Deploying));
    assert_eq!(cond(&s1, "Progressing"), ("True", "Deploying"));
    assert_eq!(cond(&s1, "Ready"), ("False", "Deploying"));
    assert_eq!(s1.observed_generation, Some(3));
    assert_eq!(s1.selector.as_deref(), Some("weir.dev/job=wordcount,weir.dev/component=worker"));
    let notes = status::notes(&StreamJobStatus::default(), &s1);
    assert!(notes.is_empty(), "{notes:?}");

    // Running with a checkpoint.
    let j1 = with_status(&job, &s1);
    let s2 = observe(&j1, true, Some(Ok(info(JobState::Running, 0, Some(1)))));
    assert_eq!(s2.phase, Some(JobPhase::Running));
    assert_eq!(cond(&s2, "Ready"), ("True", "Running"));
    assert_eq!(cond(&s2, "Degraded"), ("False", "AsExpected"));
    let c = s2.last_checkpoint.as_ref().unwrap();
    assert_eq!((c.id, c.size_bytes), (1, 4096));
    assert_eq!(c.completed_at.0.as_second(), 1_763_000_010, "whole seconds, as the API keeps them");
    assert_eq!(s2.max_parallelism, Some(128));
    assert_eq!(s2.replicas, 3);
    let j = s2.job.as_ref().unwrap();
    assert_eq!((j.id.as_str(), j.parallelism, j.restarts), ("6f1c2a9e0b7d", 3, 0));
    let notes = status::notes(&s1, &s2);
    assert_eq!(notes.iter().map(|n| n.reason).collect::<Vec<_>>(), ["JobRunning"]);

    // The same observation again, on the status as read back from the API: the same status
    // (nothing to write, nothing to wake on).
    let j2: StreamJob = serde_json::from_value(to_json(&with_status(&job, &s2))).unwrap();
    assert_eq!(observe(&j2, true, Some(Ok(info(JobState::Running, 0, Some(1))))), s2);

    // A worker died: restarting, then running again with the restart counted.
    let s3 = observe(&j2, true, Some(Ok(info(JobState::Restarting, 1, Some(1)))));
    assert_eq!(s3.phase, Some(JobPhase::Running));
    assert_eq!(cond(&s3, "Ready"), ("False", "Restarting"));
    assert_eq!(cond(&s3, "Degraded"), ("True", "Restarting"));
    let notes = status::notes(&s2, &s3);
    assert_eq!(notes.iter().map(|n| n.reason).collect::<Vec<_>>(), ["Restarted"]);
    assert!(notes[0].warning && notes[0].message.contains("from checkpoint 1"), "{notes:?}");
    let j3 = with_status(&job, &s3);
    let s4 = observe(&j3, true, Some(Ok(info(JobState::Running, 1, Some(2)))));
    assert_eq!(s4.job.as_ref().unwrap().restarts, 1);
    assert_eq!(cond(&s4, "Ready"), ("True", "Running"));
    // Ready went False and back: its transition time is the new one; Progressing kept its own.
    let t = |s: &StreamJobStatus, c: &str| {
        status::condition(s, c).unwrap().last_transition_time.clone()
    };
    assert_eq!(t(&s4, "Progressing"), t(&s2, "Progressing"));

    // The job fails for good.
    let mut failed = info(JobState::Failed, 3, Some(2));
    failed.error = Some("operator \"out\": S3 refused the credentials".into());
    let j4 = with_status(&job, &s4);
    let s5 = observe(&j4, true, Some(Ok(failed)));
    assert_eq!(s5.phase, Some(JobPhase::Failed));
    assert_eq!(cond(&s5, "Degraded"), ("True", "JobFailed"));
    let notes = status::notes(&s4, &s5);
    let failed = notes.iter().find(|n| n.reason == "JobFailed").unwrap();
    assert!(failed.message.contains("S3 refused the credentials"), "{failed:?}");
}

#[test]
fn an_invalid_change_is_reported_once_and_leaves_the_running_job_in_the_status() {
    let job = fixture("wordcount-s3.yaml");
    let running = observe(&job, true, Some(Ok(info(JobState::Running, 0, Some(4)))));
    let bad = with_status(&patched(&job, json!({"spec": {"parallelism": 200}})), &running);
    let invalid = validate::validate(&bad, &good_secret(), &Defaults::default()).unwrap_err();
    let obs = Observation {
        invalid: Some(&invalid),
        deployed: true,
        coordinator: Some(Ok(info(JobState::Running, 0, Some(5)))),
        job_id: build::job_id(&bad),
        selector: build::worker_selector("wordcount"),
        problem: None,
    };
    let now = Time(Timestamp::from_second(1_763_000_200).unwrap());
    let s = status::next(&bad, bad.status.as_ref().unwrap(), &obs, &now);
    assert_eq!(s.phase, Some(JobPhase::Running));
    assert_eq!(cond(&s, "Degraded"), ("True", "InvalidSpec"));
    assert!(status::condition(&s, "Degraded").unwrap().message.starts_with("spec.parallelism 200"));
    assert_eq!(cond(&s, "Ready"), ("True", "Running"), "the old job still runs");
    assert_eq!(s.last_checkpoint.as_ref().unwrap().id, 5);
    let notes = status::notes(&running, &s);
    assert_eq!(notes.iter().map(|n| n.reason).collect::<Vec<_>>(), ["InvalidSpec"]);
    // Observed again: no new event.
    let again = status::next(&bad, &s, &obs, &now);
    assert_eq!(again, s);
    assert!(status::notes(&s, &again).is_empty());

    // Refused before anything was deployed: Created, Degraded, nothing running.
    let fresh = patched(&job, json!({"spec": {"parallelism": 200}}));
    let obs = Observation { deployed: false, coordinator: None, ..obs };
    let s = status::next(&fresh, &Default::default(), &obs, &now);
    assert_eq!(s.phase, Some(JobPhase::Created));
    assert_eq!(cond(&s, "Progressing"), ("False", "InvalidSpec"));
    assert!(s.job.is_none());
}

#[test]
fn a_suspended_job_has_no_pods_and_says_so() {
    let job = patched(&fixture("wordcount-s3.yaml"), json!({"spec": {"state": "suspended"}}));
    let s = observe(&job, false, None);
    assert_eq!(s.phase, Some(JobPhase::Suspended));
    assert_eq!(s.replicas, 0);
    assert_eq!(cond(&s, "Ready"), ("False", "Suspended"));
}

#[test]
fn resume_from_older_reaches_the_coordinator_as_a_flag_after_resume() {
    let job = fixture("wordcount-s3.yaml");
    let args = |j: &StreamJob| -> Vec<String> {
        to_json(&objects(j, 2).coordinator)["spec"]["template"]["spec"]["containers"][0]["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap().to_string())
            .collect()
    };
    let plain = args(&job);
    assert!(plain.contains(&"--resume".to_string()), "{plain:?}");
    assert!(!plain.contains(&"--resume-from-older".to_string()), "off by default: {plain:?}");
    let older = patched(&job, json!({"spec": {"restore": {"resumeFromOlder": true}}}));
    let with = args(&older);
    let at = |a: &[String], s: &str| a.iter().position(|x| x == s).unwrap();
    assert!(at(&with, "--resume-from-older") > at(&with, "--resume"), "{with:?}");
    // Nothing else changes: the same arguments without it.
    let without: Vec<String> =
        with.iter().filter(|a| *a != "--resume-from-older").cloned().collect();
    assert_eq!(without, plain);
    // The workers are not concerned.
    let w = |j: &StreamJob| to_json(&objects(j, 2).workers)["spec"]["template"].clone();
    assert_eq!(w(&older), w(&job));
    // Turning it on is an upgrade (the coordinator starts again with it); off by default, it
    // changes nothing for a job that had none (`false` is not written into the job file).
    let hash = |j: &StreamJob| {
        let v = validate::validate(j, &good_secret(), &Defaults::default()).unwrap();
        build::spec_hash(j, &v, &cfg())
    };
    assert_ne!(hash(&older), hash(&job));
    let off = patched(&job, json!({"spec": {"restore": {"resumeFromOlder": false}}}));
    assert_eq!(args(&off), plain);
    // The job file carries it with the run's restore point, for `weir run` and the runtime's
    // own check.
    let v = validate::validate(&older, &good_secret(), &Defaults::default()).unwrap();
    let run = build::Run {
        job_id: "x-2".into(),
        restore_path: Some("s3://bkt/sp/sp-1".parse().unwrap()),
    };
    let back: StreamJob = serde_saphyr::from_str(&build::job_file(&older, &v, &run)).unwrap();
    let r = back.spec.restore.unwrap();
    assert!(r.resume_from_older);
    assert_eq!(r.path.unwrap().to_string(), "s3://bkt/sp/sp-1");
    let v = validate::validate(&job, &good_secret(), &Defaults::default()).unwrap();
    let file = build::job_file(&job, &v, &run);
    assert!(!file.contains("resumeFromOlder"), "{file}");
}

#[test]
fn on_cancel_is_the_controllers_alone_and_no_upgrade() {
    use weir_controller::lifecycle::{self, FinalSavepoint};
    let job = fixture("wordcount-s3.yaml");
    let delete = patched(&job, json!({"spec": {"checkpointing": {"onCancel": "delete"}}}));
    let hash = |j: &StreamJob| {
        let v = validate::validate(j, &good_secret(), &Defaults::default()).unwrap();
        build::spec_hash(j, &v, &cfg())
    };
    assert_eq!(hash(&delete), hash(&job), "changing it restarts nothing");
    let v = validate::validate(&delete, &good_secret(), &Defaults::default()).unwrap();
    let file = build::job_file(&delete, &v, &run(&delete));
    assert!(!file.contains("onCancel"), "the coordinator in a pod never acts on it: {file}");

    // The finalizer: for the final savepoint, or for the checkpoints to go.
    let mode = |j: &StreamJob, m: &str| patched(j, json!({"spec": {"upgradeMode": m}}));
    assert!(lifecycle::needs_finalizer(&job), "savepoint mode");
    assert!(!lifecycle::needs_finalizer(&mode(&job, "last-state")));
    assert!(!lifecycle::needs_finalizer(&mode(&job, "stateless")));
    assert!(lifecycle::needs_finalizer(&mode(&delete, "last-state")));
    assert!(lifecycle::needs_finalizer(&mode(&delete, "stateless")));

    // Deleted only when stopped without a savepoint tried: a job stopped with one was not
    // cancelled, and one whose final savepoint failed keeps its last checkpoint.
    use FinalSavepoint::*;
    assert!(lifecycle::deletes_checkpoints(&delete, NotTried));
    assert!(!lifecycle::deletes_checkpoints(&delete, Taken));
    assert!(!lifecycle::deletes_checkpoints(&delete, Failed));
    for f in [NotTried, Taken, Failed] {
        assert!(!lifecycle::deletes_checkpoints(&job, f), "retain: {f:?}");
    }
    let stateless_off = patched(
        &delete,
        json!({"spec": {"upgradeMode": "stateless", "checkpointing": {"interval": "0s"}}}),
    );
    assert!(!lifecycle::deletes_checkpoints(&stateless_off, NotTried), "no checkpoints at all");

    // Which directory: the run's, below the job's storage or the operator's default.
    let dir = lifecycle::checkpoint_dir(&delete, None, "6f1c2a9e0b7d-3").unwrap();
    assert_eq!(dir.to_string(), "s3://weir-data/checkpoints/team-a/wordcount/6f1c2a9e0b7d-3");
    let default: StorageUri = "s3://ops/chk".parse().unwrap();
    let no_storage = patched(&delete, json!({"spec": {"checkpointing": {"storage": null}}}));
    assert_eq!(
        lifecycle::checkpoint_dir(&no_storage, Some(&default), "j").unwrap().to_string(),
        "s3://ops/chk/team-a/wordcount/j"
    );
    assert!(lifecycle::checkpoint_dir(&no_storage, None, "j").is_none());
    assert_eq!(
        lifecycle::checkpoint_dir(&delete, Some(&default), "j").unwrap().to_string(),
        "s3://weir-data/checkpoints/team-a/wordcount/j",
        "the job's own storage first"
    );
    // What keeps it: anything at or below it, nothing beside it.
    for below in [
        "s3://weir-data/checkpoints/team-a/wordcount/6f1c2a9e0b7d-3",
        "s3://weir-data/checkpoints/team-a/wordcount/6f1c2a9e0b7d-3/",
        "s3://weir-data/checkpoints/team-a/wordcount/6f1c2a9e0b7d-3/chk-4/_metadata",
    ] {
        assert!(lifecycle::is_below(below, &dir), "{below}");
    }
    for beside in [
        "s3://weir-data/checkpoints/team-a/wordcount/6f1c2a9e0b7d-30",
        "s3://weir-data/checkpoints/team-a/wordcount/6f1c2a9e0b7d",
        "s3://weir-data/checkpoints/team-a/wordcount/sp-1",
        "s3://weir-data/savepoints/team-a/wordcount/sp-1",
        "s3://other/checkpoints/team-a/wordcount/6f1c2a9e0b7d-3/chk-4",
    ] {
        assert!(!lifecycle::is_below(beside, &dir), "{beside}");
    }
}

#[test]
fn a_job_with_an_image_of_its_own_may_name_its_types_and_the_built_in_ones_are_still_checked() {
    let job = fixture("wordcount-s3.yaml");
    // A type of the image's binary between the words and the counts.
    let ops = |counts: Value| {
        json!({"spec": {"pipeline": {"operators": [
            {"uid": "lines", "type": "file_source", "path": "s3://weir-data/in"},
            {"uid": "words", "type": "split", "inputs": ["lines"]},
            {"uid": "scored", "type": "fraud_detector", "inputs": ["words"], "factor": 3},
            counts,
            {"uid": "out", "type": "file_sink", "inputs": ["counts"], "path": "s3://weir-data/out"},
        ]}}})
    };
    let counts = json!({"uid": "counts", "type": "count", "inputs": ["scored"], "key": "word"});
    let stock = patched(&job, ops(counts.clone()));
    let e = validate::validate(&stock, &good_secret(), &Defaults::default()).unwrap_err();
    assert_eq!(e.field, "spec.pipeline", "{}", e.message);
    assert!(e.message.contains("type \"fraud_detector\" is unknown: use one of"), "{}", e.message);

    let image = json!({"spec": {"image": "ghcr.io/me/weir-detector:1"}});
    let own = patched(&patched(&job, ops(counts)), image.clone());
    validate::validate(&own, &good_secret(), &Defaults::default()).unwrap();
    // After the image's type the fields are not known here (the job checks them when it
    // starts), but a built-in operator's own parameters are.
    let bad = json!({"uid": "counts", "type": "count", "inputs": ["scored"], "key": "word", "field": "x"});
    let own = patched(&patched(&job, ops(bad)), image);
    let e = validate::validate(&own, &good_secret(), &Defaults::default()).unwrap_err();
    assert_eq!(e.field, "spec.pipeline.operators[3]", "{}", e.message);
    assert!(e.message.contains("field is not a parameter of count"), "{}", e.message);
}

/// The package's directory, from cargo at run time: a test binary built in another checkout
/// sharing the target directory (CI's) must not read that checkout's files.
fn manifest_dir() -> String {
    std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())
}
