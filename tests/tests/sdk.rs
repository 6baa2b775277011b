//! A user's own operators under the controller: the SDK example's binary (`weir-detector`,
//! the built-in types and its `fraud_detector`) runs in the job's pods because the StreamJob
//! names its image in `spec.image`; the node agent maps the image to the binary, as a
//! cluster pulls it. Without `spec.image` the apiserver refuses the type, with the message
//! `weir run` of the stock binary gives.

use std::time::Duration;

use serde_json::{Value, json};
use weir_crds::streamjob::JobPhase;
use weir_e2e::jobs::{Controller, apply, status, wait_job_within};
use weir_e2e::testenv::{TestEnv, setting};

/// The image of the SDK example (its last path segment names the binary).
const IMAGE: &str = "ghcr.io/weir-dev/weir-detector:0.1.0";

/// A bounded stream of key/value records from one split (so that each key's records come in
/// one order, however the job runs) into the detector, its alerts to `sink`.
fn pipeline(sink: Value) -> Value {
    json!({"operators": [
        {"uid": "events", "type": "generator", "format": "kv", "seed": 3, "count": 20000,
         "keys": 50, "splits": 1, "ratePerSecond": 2000},
        {"uid": "fraud", "type": "fraud_detector", "inputs": ["events"], "key": "key",
         "field": "value", "timeField": "ts", "factor": 1.5, "silence": "2s"},
        sink,
    ]})
}

fn sorted_lines(text: &str) -> Vec<String> {
    let mut v: Vec<String> = text.lines().filter(|l| !l.is_empty()).map(String::from).collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_job_with_its_own_image_runs_its_operators_in_pods_and_a_stock_job_cannot_name_them() {
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("sdk").await;
    env.create_s3_credentials(&ns).await;
    let _ctl = Controller::start(&env, &ns, &[]);
    let bucket = setting("WEIR_TEST_BUCKET");
    let out = format!("s3://{bucket}/{ns}/fraud/out");
    let sink = json!({"uid": "alerts", "type": "file_sink", "inputs": ["fraud"], "path": out});
    let mut job = json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
        "metadata": {"name": "fraud", "namespace": ns},
        "spec": {
            "parallelism": 2,
            "maxParallelism": 128,
            "checkpointing": {"interval": "1s", "storage": format!("s3://{bucket}/{ns}/checkpoints")},
            "s3": {
                "endpoint": setting("AWS_ENDPOINT_URL"),
                "region": setting("AWS_REGION"),
                "credentialsSecret": {"name": "s3-credentials"},
            },
            "pipeline": pipeline(sink.clone()),
        },
    });

    // The stock image has no such type: refused before anything is stored.
    let yaml = serde_saphyr::to_string(&job).unwrap();
    let (ok, _, err) = env.kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
    assert!(!ok, "a job of the stock image with a type it does not have was admitted");
    assert!(
        err.contains("pipeline.operators[1] (\"fraud\"): type \"fraud_detector\" is unknown"),
        "{err}"
    );

    job["spec"]["image"] = json!(IMAGE);
    apply(&env, &job);
    let j = wait_job_within(&env, &ns, "fraud", "finished", Duration::from_secs(240), |j| {
        status(j).phase == Some(JobPhase::Finished)
    })
    .await;
    assert_eq!(status(&j).job.map(|r| r.parallelism), Some(2));

    // The same pipeline run here by the same binary gives the same alerts.
    let tmp = tempfile::tempdir().unwrap();
    let local = json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
        "metadata": {"name": "fraud-here"},
        "spec": {"parallelism": 1, "pipeline": pipeline(json!(
            {"uid": "alerts", "type": "file_sink", "inputs": ["fraud"],
             "path": tmp.path().join("out").display().to_string()}))},
    });
    let file = tmp.path().join("job.yaml");
    std::fs::write(&file, serde_saphyr::to_string(&local).unwrap()).unwrap();
    let run = std::process::Command::new(env.binary("weir-detector"))
        .args(["run", file.to_str().unwrap(), "--state-dir"])
        .arg(tmp.path().join("state"))
        .env("WEIR_JOB_SECRET", "weir-tests-job-secret-0123456789abcdef")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let mut here = String::new();
    for e in std::fs::read_dir(tmp.path().join("out")).unwrap().flatten() {
        here.push_str(&std::fs::read_to_string(e.path()).unwrap());
    }
    let expected = sorted_lines(&here);
    assert!(expected.len() > 100, "too few alerts to tell: {}", expected.len());
    let in_pods: Vec<String> = weir_e2e::jobs::committed_lines(&format!("{ns}/fraud/out"));
    let mut in_pods = in_pods;
    in_pods.sort();
    assert_eq!(in_pods, expected);
}
