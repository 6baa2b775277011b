//! What the tests of a job's life under the controller share: starting (and killing) a
//! controller for one namespace, the word-count manifest they run, applying it, waiting for
//! a status, the job's events, and the check that the committed output holds every count of
//! every word exactly once.

use std::collections::BTreeMap;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::events::v1::Event;
use kube::Api;
use kube::api::ListParams;
use serde_json::{Value, json};
use weir_crds::StreamJob;
use weir_crds::streamjob::StreamJobStatus;

use crate::testenv::{TestEnv, setting, wait_for};

/// How long a step of a job's life may take in these tests.
pub const T: Duration = Duration::from_secs(180);

/// A controller process watching one namespace; killed when dropped.
#[derive(Debug)]
pub struct Controller {
    child: Child,
    /// Where it serves `/metrics`.
    pub metrics_addr: String,
}

impl Controller {
    /// Starts `weir-controller` for `ns`, its log in `/tmp/weir-controller-<ns>.log`, with
    /// `env` added to its environment (e.g. `WEIR_CONTROLLER_CRASH_AT`). It runs as the Helm
    /// chart's ServiceAccount, with the chart's RBAC ([`controller_kubeconfig`]).
    pub fn start(env: &TestEnv, ns: &str, vars: &[(&str, &str)]) -> Self {
        Self::start_with(env, ns, &controller_kubeconfig(), &[], vars)
    }

    /// [`Controller::start`] with the kubeconfig `kubeconfig` (e.g. [`norules_kubeconfig`])
    /// and the extra arguments `args`.
    pub fn start_with(
        env: &TestEnv,
        ns: &str,
        kubeconfig: &str,
        args: &[&str],
        vars: &[(&str, &str)],
    ) -> Self {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(format!("/tmp/weir-controller-{ns}.log"))
            .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        let metrics_addr = format!("127.0.0.1:{port}");
        let child = Command::new(env.binary("weir-controller"))
            .args(["--namespace", ns, "--metrics-addr", &metrics_addr, "--poll-interval", "1s"])
            .args(args)
            .env("WEIR_LOG", "info,kube=warn")
            .env("KUBECONFIG", kubeconfig)
            .envs(vars.iter().copied())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        Self { child, metrics_addr }
    }

    /// The value of a sample of `/metrics` (`name{labels}` as exposed), or 0 when absent.
    pub fn metric(&self, sample: &str) -> f64 {
        use std::io::{Read, Write};
        let Ok(mut s) = std::net::TcpStream::connect(&self.metrics_addr) else { return 0.0 };
        let _ = write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        text.lines()
            .find_map(|l| l.strip_prefix(sample).and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0.0)
    }

    /// Waits for the controller to exit on its own; its exit code.
    pub async fn exited(&mut self, what: &str) -> Option<i32> {
        wait_for(what, T, || {
            let r = self.child.try_wait().unwrap();
            async move { r }
        })
        .await
        .code()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kubeconfig of the chart's ServiceAccount, bound to the chart's ClusterRole (and the
/// leader-election Role in `weir-system`): `tests/env/up.sh` applies them from the chart as
/// the Helm SDK renders it. Controllers under test run with it, so the end-to-end tests fail
/// when the chart's RBAC lacks something the controller does.
pub fn controller_kubeconfig() -> String {
    setting("WEIR_CONTROLLER_KUBECONFIG")
}

/// The admin kubeconfig of the test environment's second apiserver, whose CRDs have none of
/// their CEL rules (`x-kubernetes-validations`): it takes the StreamJobs that the rules refuse,
/// as an apiserver before the rules did, so that the tests can show that the controller
/// refuses them too. It runs no controllers and no node.
pub fn norules_kubeconfig() -> String {
    setting("WEIR_NORULES_KUBECONFIG")
}

/// The CRDs as `crds/weir-crds.yaml` has them, without their CEL rules.
pub fn crds_without_rules() -> Vec<Value> {
    fn strip(v: &mut Value) {
        match v {
            Value::Object(map) => {
                map.remove("x-kubernetes-validations");
                map.values_mut().for_each(strip);
            }
            Value::Array(items) => items.iter_mut().for_each(strip),
            _ => {}
        }
    }
    let mut crds = weir_crds::crd_values();
    crds.iter_mut().for_each(strip);
    crds
}

/// The test environment as seen through the apiserver without CEL rules
/// ([`norules_kubeconfig`]), with the CRDs of this checkout installed there without their
/// rules.
pub async fn norules_env(env: &TestEnv) -> TestEnv {
    let kubeconfig = std::path::PathBuf::from(norules_kubeconfig());
    let config = kube::Config::from_custom_kubeconfig(
        kube::config::Kubeconfig::read_from(&kubeconfig).expect("reading WEIR_NORULES_KUBECONFIG"),
        &kube::config::KubeConfigOptions::default(),
    )
    .await
    .expect("a client configuration for the apiserver without rules");
    let client = kube::Client::try_from(config).expect("a client for the apiserver without rules");
    let norules = TestEnv { client, kubeconfig, ..env.clone() };
    let yaml: String = crds_without_rules()
        .iter()
        .map(|c| format!("---\n{}", serde_saphyr::to_string(c).unwrap()))
        .collect();
    let (ok, _, err) = norules
        .kubectl_stdin(&["apply", "--server-side", "--force-conflicts", "-f", "-"], Some(&yaml));
    assert!(ok, "applying the CRDs without rules: {err}");
    let (ok, _, err) = norules.kubectl(&[
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/streamjobs.weir.dev",
        "crd/streamsnapshots.weir.dev",
    ]);
    assert!(ok, "CRDs without rules not established: {err}");
    norules
}

/// A namespace `<prefix>-<random>` on an apiserver without a controller-manager (no default
/// ServiceAccount comes, and none is waited for).
pub async fn plain_namespace(env: &TestEnv, prefix: &str) -> String {
    use k8s_openapi::api::core::v1::Namespace;
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().subsec_nanos();
    let name = format!("{prefix}-{:08x}", nanos ^ std::process::id().rotate_left(16));
    let api: Api<Namespace> = Api::all(env.client.clone());
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    api.create(&kube::api::PostParams::default(), &ns).await.expect("creating a namespace");
    name
}

/// A bounded-but-long word count named `name` in `ns`: a generator of `lines` lines of 8
/// words at 200 lines/s, a keyed count, and the files sink writing `word,count` lines to
/// `s3://<test bucket>/<ns>/<name>/out`, checkpointing every second to the test bucket.
pub fn wordcount(ns: &str, name: &str, parallelism: i32, lines: u64) -> Value {
    let bucket = setting("WEIR_TEST_BUCKET");
    json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parallelism": parallelism,
            "maxParallelism": 128,
            "checkpointing": {"interval": "1s", "storage": format!("s3://{bucket}/{ns}/checkpoints")},
            "s3": {
                "endpoint": setting("AWS_ENDPOINT_URL"),
                "region": setting("AWS_REGION"),
                "credentialsSecret": {"name": "s3-credentials"},
            },
            "pipeline": {"operators": [
                {"uid": "lines", "type": "generator", "seed": 7, "count": lines,
                 "ratePerSecond": 200, "format": "text", "wordsPerLine": WORDS_PER_LINE,
                 "keys": 300, "distribution": "zipf"},
                {"uid": "words", "type": "split", "inputs": ["lines"]},
                {"uid": "counts", "type": "count", "inputs": ["words"], "key": "word"},
                {"uid": "out", "type": "file_sink", "inputs": ["counts"],
                 "path": format!("s3://{bucket}/{ns}/{name}/out")},
            ]},
        },
    })
}

/// An image whose tag was never pushed: the node agent finds no binary for it, so its pods
/// stay in ErrImagePull, as they would on a cluster. A version the controller accepts (its
/// spec is valid) that does not run.
pub const MISSING_IMAGE: &str = "registry.invalid/weir/weir-runtime-unpushed:0.0.0";

/// Words per generated line in [`wordcount`].
pub const WORDS_PER_LINE: u64 = 8;

/// `kubectl apply` of a manifest.
pub fn apply(env: &TestEnv, m: &Value) {
    let yaml = serde_saphyr::to_string(m).unwrap();
    let (ok, out, err) = env.kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
    assert!(ok, "kubectl apply: {out}{err}");
}

/// Waits until StreamJob `ns/name` satisfies `f`.
pub async fn wait_job(
    env: &TestEnv,
    ns: &str,
    name: &str,
    what: &str,
    f: impl Fn(&StreamJob) -> bool,
) -> StreamJob {
    wait_job_within(env, ns, name, what, T, f).await
}

/// [`wait_job`] with a time limit of its own.
pub async fn wait_job_within(
    env: &TestEnv,
    ns: &str,
    name: &str,
    what: &str,
    limit: Duration,
    f: impl Fn(&StreamJob) -> bool,
) -> StreamJob {
    let api: Api<StreamJob> = Api::namespaced(env.client.clone(), ns);
    let mut last = None;
    let waited = tokio::time::timeout(limit, async {
        loop {
            if let Some(j) = api.get_opt(name).await.ok().flatten() {
                if f(&j) {
                    return j;
                }
                last = Some(j);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
    .await;
    waited.unwrap_or_else(|_| {
        // What the job was doing instead, so that a failure says why.
        let mut seen = last.as_ref().map(|j| serde_json::to_value(status(j)).unwrap());
        if let Some(s) = seen.as_mut().and_then(Value::as_object_mut) {
            s.remove("lastStableSpec");
        }
        panic!(
            "timed out after {}s waiting for StreamJob {ns}/{name}: {what}; its last status: {}; the controller's log: /tmp/weir-controller-{ns}.log",
            limit.as_secs(),
            seen.map_or_else(|| "none".into(), |v| v.to_string())
        )
    })
}

/// The status, or an empty one.
pub fn status(j: &StreamJob) -> StreamJobStatus {
    j.status.clone().unwrap_or_default()
}

/// The id of the run the status reports.
pub fn job_id(j: &StreamJob) -> String {
    status(j).job.map(|r| r.id).unwrap_or_default()
}

/// A condition's status and reason.
pub fn condition(j: &StreamJob, type_: &str) -> Option<(String, String)> {
    status(j).conditions.into_iter().find(|c| c.type_ == type_).map(|c| (c.status, c.reason))
}

/// One line of how the job stands, for the test's log.
pub fn show(step: &str, j: &StreamJob) {
    let s = status(j);
    eprintln!(
        "{step}: phase {:?}, job {:?}, checkpoint {:?}, deployed {:?}",
        s.phase,
        s.job,
        s.last_checkpoint.map(|c| c.id),
        s.deployed.map(|d| (d.job_id, d.restore_path))
    );
}

/// The events about object `name`, as (reason, note), in order of creation; an event
/// published n times counts n times (with the note it was first published with).
pub async fn events(env: &TestEnv, ns: &str, name: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(env.client.clone(), ns);
    let mut all: Vec<Event> = api
        .list(&ListParams::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name))
        .collect();
    all.sort_by_key(|e| e.metadata.creation_timestamp.clone().map(|t| t.0));
    // An event published again with the same reason is a series on one object (the
    // recorder keys events by reason, not note): one entry per time it was published.
    all.into_iter()
        .flat_map(|e| {
            let n = e.series.as_ref().map_or(1, |s| s.count.max(1)) as usize;
            let entry = (e.reason.unwrap_or_default(), e.note.unwrap_or_default());
            std::iter::repeat_n(entry, n)
        })
        .collect()
}

/// The keys under `prefix` in the test bucket.
pub fn s3_keys(prefix: &str) -> Vec<String> {
    let bucket = setting("WEIR_TEST_BUCKET");
    let py = format!(
        "import boto3,os\nc=boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])\np=c.get_paginator('list_objects_v2')\nfor page in p.paginate(Bucket='{bucket}', Prefix='{prefix}'):\n  for o in page.get('Contents', []): print(o['Key'])"
    );
    let out = Command::new(setting("WEIR_PYTHON")).args(["-c", &py]).output().unwrap();
    assert!(out.status.success(), "listing {prefix}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(String::from).collect()
}

/// Every line of the committed files under an S3 prefix of the test bucket.
pub fn committed_lines(prefix: &str) -> Vec<String> {
    let bucket = setting("WEIR_TEST_BUCKET");
    let py = format!(
        "import boto3,os\nc=boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])\np=c.get_paginator('list_objects_v2')\nfor page in p.paginate(Bucket='{bucket}', Prefix='{prefix}/'):\n  for o in page.get('Contents', []):\n    k=o['Key']\n    if k.rsplit('/',1)[-1].startswith('.'): continue\n    print(c.get_object(Bucket='{bucket}', Key=k)['Body'].read().decode(), end='')"
    );
    let out = Command::new(setting("WEIR_PYTHON")).args(["-c", &py]).output().unwrap();
    assert!(out.status.success(), "reading the output: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.is_empty())
        .map(String::from)
        .collect()
}

/// Every committed `word,count` line under an S3 prefix of the test bucket.
pub fn committed(prefix: &str) -> Vec<(String, u64)> {
    committed_lines(prefix)
        .iter()
        .map(|l| {
            let (w, c) = l.rsplit_once(',').unwrap_or_else(|| panic!("a bad line {l:?}"));
            (w.to_string(), c.parse().unwrap())
        })
        .collect()
}

/// Asserts that the output under `prefix` holds each count of each word exactly once, from 1
/// up, and `words` counts in all.
pub fn assert_exactly_once(prefix: &str, words: u64) {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (w, c) in committed(prefix) {
        seen.entry(w).or_default().push(c);
    }
    let mut total = 0;
    for (w, mut counts) in seen {
        counts.sort_unstable();
        let n = counts.len() as u64;
        assert_eq!(counts, (1..=n).collect::<Vec<_>>(), "the counts of {w:?}");
        total += n;
    }
    assert_eq!(total, words, "every word of every line counted once");
}
