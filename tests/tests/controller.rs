//! The controller against the real control plane, node agent and S3 server: the example job
//! runs, checkpoints to S3 and shows it in its status and in `kubectl get sj`; a killed worker
//! is recovered and counted; objects deleted by hand come back; invalid specs are Degraded
//! with an Event and change nothing; with two replicas one leads and the other takes over.
//!
//! Each test starts its own `weir-controller` process(es), limited to the test's namespace.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use kube::Api;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};
use weir_crds::StreamJob;
use weir_crds::streamjob::JobPhase;
use weir_e2e::jobs::events;
use weir_e2e::testenv::{TestEnv, setting, wait_for};

const T: Duration = Duration::from_secs(120);

/// A `weir-controller` process, killed when dropped.
struct Controller {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Controller {
    fn start(env: &TestEnv, ns: &str, extra: &[&str]) -> Controller {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("controller.log");
        let bin = env.binary("weir-controller");
        let child = Command::new(&bin)
            .args(["--namespace", ns, "--metrics-addr", "127.0.0.1:0", "--poll-interval", "1s"])
            .args(extra)
            .env("WEIR_LOG", "info,kube=warn")
            .env("KUBECONFIG", weir_e2e::jobs::controller_kubeconfig())
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&log).unwrap())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("starting {}: {e} (cargo build --workspace --bins)", bin.display())
            });
        Controller { child, log, _dir: dir }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The address of its metrics server, from its log.
    async fn metrics_addr(&self) -> String {
        wait_for("the controller's metrics address", T, || async {
            self.log().lines().find_map(|l| {
                let v: Value = serde_json::from_str(l).ok()?;
                v["fields"]["addr"]
                    .as_str()
                    .filter(|_| {
                        v["fields"]["message"]
                            .as_str()
                            .is_some_and(|m| m.starts_with("serving /metrics"))
                    })
                    .map(str::to_string)
            })
        })
        .await
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
    }
}

fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect(addr) else { return String::new() };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

/// The value of an unlabelled metric.
fn metric(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

/// manifests/examples/wordcount.yaml pointed at the test S3 server (storage, endpoint,
/// credentials Secret) and made unbounded (a generator at 200 lines/s instead of 1,000
/// lines), so that it runs long enough to checkpoint.
fn wordcount_on_test_s3(env: &TestEnv, ns: &str) -> Value {
    let text = std::fs::read_to_string(env.repo.join("manifests/examples/wordcount.yaml")).unwrap();
    let mut v: Value = serde_saphyr::from_str(&text).unwrap();
    v["metadata"]["namespace"] = json!(ns);
    let spec = &mut v["spec"];
    spec["checkpointing"]["storage"] =
        json!(format!("s3://{}/{ns}/checkpoints", setting("WEIR_TEST_BUCKET")));
    spec["s3"] = json!({
        "endpoint": setting("AWS_ENDPOINT_URL"),
        "region": setting("AWS_REGION"),
        "credentialsSecret": {"name": "s3-credentials"},
    });
    let source = &mut spec["pipeline"]["operators"][0];
    source.as_object_mut().unwrap().remove("count");
    source["ratePerSecond"] = json!(200);
    v
}

fn apply(env: &TestEnv, manifest: &Value) -> (bool, String) {
    let yaml = serde_saphyr::to_string(manifest).unwrap();
    let (ok, out, err) = env.kubectl_stdin(&["apply", "-f", "-"], Some(&yaml));
    (ok, format!("{out}{err}"))
}

async fn job(env: &TestEnv, ns: &str, name: &str) -> StreamJob {
    Api::<StreamJob>::namespaced(env.client.clone(), ns).get(name).await.unwrap()
}

async fn wait_job(
    env: &TestEnv,
    ns: &str,
    name: &str,
    what: &str,
    f: impl Fn(&StreamJob) -> bool,
) -> StreamJob {
    weir_e2e::jobs::wait_job_within(env, ns, name, what, T, f).await
}

fn phase(j: &StreamJob) -> Option<JobPhase> {
    j.status.as_ref().and_then(|s| s.phase)
}

fn condition(j: &StreamJob, t: &str) -> Option<(String, String, String)> {
    let c = j.status.as_ref()?.conditions.iter().find(|c| c.type_ == t)?;
    Some((c.status.clone(), c.reason.clone(), c.message.clone()))
}

fn ready(j: &StreamJob) -> bool {
    condition(j, "Ready").is_some_and(|c| c.0 == "True")
}

async fn wait_event(env: &TestEnv, ns: &str, name: &str, reason: &str) -> String {
    wait_for(&format!("a {reason} event on {name}"), T, || async {
        events(env, ns, name).await.into_iter().find(|(r, _)| r == reason).map(|(_, n)| n)
    })
    .await
}

/// The pid of the process running the worker of pod `pod` (the node agent runs pods as
/// processes; the worker's command line carries its pod name).
fn worker_pid(pod: &str, ns: &str) -> Option<i32> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else { continue };
        let Ok(cmd) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let args: Vec<String> =
            cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        if args.iter().any(|a| a == "worker")
            && args.iter().any(|a| a == pod)
            && args.iter().any(|a| a.contains(&format!(".{ns}.svc")))
        {
            return Some(pid);
        }
    }
    None
}

/// How many objects of kind `K` in `ns` carry a job label.
async fn labelled<K>(env: &TestEnv, ns: &str) -> usize
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(env.client.clone(), ns);
    api.list(&ListParams::default().labels("weir.dev/job")).await.unwrap().items.len()
}

async fn resource_version<K>(env: &TestEnv, ns: &str, name: &str) -> Option<String>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope, DynamicType = ()>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::namespaced(env.client.clone(), ns);
    api.get_opt(name).await.ok().flatten().and_then(|o| o.meta().resource_version.clone())
}

#[tokio::test]
async fn the_example_job_runs_checkpoints_recovers_and_refuses_a_bad_change() {
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-run").await;
    env.create_s3_credentials(&ns).await;
    let ctl = Controller::start(&env, &ns, &[]);
    let (ok, out) = apply(&env, &wordcount_on_test_s3(&env, &ns));
    assert!(ok, "kubectl apply: {out}");

    // Running, with a checkpoint in the status and in the bucket.
    let j = wait_job(&env, &ns, "wordcount", "Running with a checkpoint", |j| {
        phase(j) == Some(JobPhase::Running)
            && ready(j)
            && j.status.as_ref().is_some_and(|s| s.last_checkpoint.is_some())
    })
    .await;
    let s = j.status.clone().unwrap();
    assert_eq!(s.observed_generation, j.metadata.generation);
    assert_eq!(s.replicas, 2);
    assert_eq!(s.max_parallelism, Some(128));
    let running = s.job.clone().unwrap();
    assert_eq!(running.parallelism, 2);
    assert_eq!(running.restarts, 0);
    assert!(running.start_time.is_some());
    let chk = s.last_checkpoint.clone().unwrap();
    let path = chk.path.clone().expect("the checkpoint's path");
    let bucket = setting("WEIR_TEST_BUCKET");
    assert!(path.starts_with(&format!("s3://{bucket}/{ns}/checkpoints/{ns}/wordcount/")), "{path}");
    // Checkpoints are retained a few at a time: list what the bucket holds of the job.
    let prefix = format!("{ns}/checkpoints/{ns}/wordcount/");
    let py = format!(
        "import boto3,os\nc=boto3.client('s3', endpoint_url=os.environ['AWS_ENDPOINT_URL'])\nfor o in c.list_objects_v2(Bucket='{bucket}', Prefix='{prefix}').get('Contents', []): print(o['Key'])"
    );
    let list = Command::new(setting("WEIR_PYTHON")).args(["-c", &py]).output().unwrap();
    let keys = String::from_utf8_lossy(&list.stdout).to_string();
    assert!(list.status.success(), "listing the bucket: {}", String::from_utf8_lossy(&list.stderr));
    assert!(
        keys.lines().any(|k| k.contains("/chk-") && k.ends_with("/_metadata")),
        "checkpoints in the bucket under {prefix}: {keys}"
    );
    // The printer columns.
    let (ok, table, err) = env.kubectl(&["get", "sj", "-n", &ns, "-o", "wide"]);
    assert!(ok, "{err}");
    let header = table.lines().next().unwrap_or("");
    for col in ["NAME", "PHASE", "PARALLELISM", "LAST CHECKPOINT", "AGE", "CHECKPOINT"] {
        assert!(header.contains(col), "{table}");
    }
    let row = table.lines().nth(1).unwrap_or("");
    assert!(row.starts_with("wordcount") && row.contains("Running"), "{table}");
    assert!(
        wait_event(&env, &ns, "wordcount", "Deployed")
            .await
            .contains("StatefulSet wordcount-worker")
    );
    wait_event(&env, &ns, "wordcount", "JobRunning").await;
    // The controller's metrics: jobs by phase, the age of each job's last checkpoint.
    let addr = ctl.metrics_addr().await;
    let text = http_get(&addr, "/metrics");
    assert!(text.contains("weir_controller_jobs{phase=\"Running\"} 1"), "{text}");
    let age_line =
        format!("weir_controller_checkpoint_age_seconds{{job=\"wordcount\",namespace=\"{ns}\"}} ");
    let age: f64 = text
        .lines()
        .find_map(|l| l.strip_prefix(&age_line))
        .unwrap_or_else(|| panic!("no checkpoint age for the job: {text}"))
        .parse()
        .unwrap();
    assert!((0.0..120.0).contains(&age), "{age}");
    assert!(metric(&text, "weir_controller_reconciles_total") >= 1.0);
    assert!(text.contains("weir_controller_reconcile_duration_seconds_count"), "{text}");
    assert!(http_get(&addr, "/healthz").contains("200 OK"));

    // Kill a worker pod's process: the job restarts from its last checkpoint, and the status
    // counts the restart.
    let pid = wait_for("the process of pod wordcount-worker-1", T, || async {
        worker_pid("wordcount-worker-1", &ns)
    })
    .await;
    let before = job(&env, &ns, "wordcount").await.status.unwrap().last_checkpoint.unwrap().id;
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let j = wait_job(
        &env,
        &ns,
        "wordcount",
        "running again after the restart, with a newer checkpoint",
        |j| {
            let s = j.status.as_ref().unwrap();
            s.job.as_ref().is_some_and(|r| r.restarts >= 1)
                && ready(j)
                && s.last_checkpoint.as_ref().is_some_and(|c| c.id > before)
        },
    )
    .await;
    assert_eq!(
        j.status.unwrap().job.unwrap().start_time,
        running.start_time,
        "the same run of the coordinator"
    );
    let note = wait_event(&env, &ns, "wordcount", "Restarted").await;
    assert!(note.contains("from checkpoint"), "{note}");

    // What is deleted by hand comes back.
    let svc: Api<Service> = Api::namespaced(env.client.clone(), &ns);
    let cm: Api<ConfigMap> = Api::namespaced(env.client.clone(), &ns);
    let old_uid = svc.get("wordcount-coordinator").await.unwrap().metadata.uid;
    svc.delete("wordcount-coordinator", &DeleteParams::default()).await.unwrap();
    cm.delete("wordcount-job", &DeleteParams::default()).await.unwrap();
    wait_for("the coordinator Service and the ConfigMap recreated", T, || async {
        let s = svc.get_opt("wordcount-coordinator").await.ok().flatten()?;
        let c = cm.get_opt("wordcount-job").await.ok().flatten()?;
        (s.metadata.uid != old_uid && c.data.is_some()).then_some(())
    })
    .await;

    // A change that would break the state: maxParallelism after the job has state. The
    // apiserver refuses it (a CEL rule against status.maxParallelism) with the controller's
    // message; nothing changes, and the job keeps running. (That the controller refuses it
    // too, where no rule stops it, is in the invalid-specs test.)
    let versions = (
        resource_version::<ConfigMap>(&env, &ns, "wordcount-job").await,
        resource_version::<Deployment>(&env, &ns, "wordcount-coordinator").await,
        resource_version::<StatefulSet>(&env, &ns, "wordcount-worker").await,
    );
    let api: Api<StreamJob> = Api::namespaced(env.client.clone(), &ns);
    let refused = api
        .patch(
            "wordcount",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"maxParallelism": 256}})),
        )
        .await
        .expect_err("the apiserver refuses a changed maxParallelism once the job has state");
    let message = match refused {
        kube::Error::Api(s) => s.message,
        other => other.to_string(),
    };
    assert!(message.contains("spec.maxParallelism"), "{message}");
    assert!(
        message.contains(&weir_crds::rules::max_parallelism_fixed(Some(256), 256, 128)),
        "{message}"
    );
    let j = job(&env, &ns, "wordcount").await;
    assert_eq!(j.spec.max_parallelism, Some(128));
    assert_eq!(phase(&j), Some(JobPhase::Running));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let after = (
        resource_version::<ConfigMap>(&env, &ns, "wordcount-job").await,
        resource_version::<Deployment>(&env, &ns, "wordcount-coordinator").await,
        resource_version::<StatefulSet>(&env, &ns, "wordcount-worker").await,
    );
    assert_eq!(versions, after, "a refused change touches nothing");
    let j = job(&env, &ns, "wordcount").await;
    assert!(ready(&j), "the job still runs: {:?}", j.status);
    let invalid_events = events(&env, &ns, "wordcount")
        .await
        .into_iter()
        .filter(|(r, _)| r == "InvalidSpec")
        .count();
    assert_eq!(invalid_events, 0, "the change never reached the controller");
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn invalid_specs_are_degraded_with_an_event_and_nothing_is_created() {
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.namespace("ctl-bad").await;
    let defaults = ["--default-checkpoint-storage", "s3://weir-default/chk"];
    let _ctl = Controller::start(&env, &ns, &defaults);
    // The apiserver without the CRDs' CEL rules, as one before them: a controller of its own.
    let norules = weir_e2e::jobs::norules_env(&env).await;
    let nns = weir_e2e::jobs::plain_namespace(&norules, "ctl-bad-norules").await;
    let _norules_ctl = weir_e2e::jobs::Controller::start_with(
        &norules,
        &nns,
        &weir_e2e::jobs::norules_kubeconfig(),
        &defaults,
        &[],
    );
    let base = |name: &str, ns: &str| {
        json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"parallelism": 2, "pipeline": {"operators": [
                {"uid": "src", "type": "generator"},
                {"uid": "out", "type": "blackhole", "inputs": ["src"]},
            ]}},
        })
    };
    let with = |name: &str, f: &dyn Fn(&mut Value)| {
        let mut v = base(name, &ns);
        f(&mut v);
        v
    };
    // (name, manifest, what the message says, whether a CEL rule of the CRD refuses it)
    let cases: Vec<(&str, Value, &str, bool)> = vec![
        (
            "p-above-max",
            with("p-above-max", &|v| {
                v["spec"]["parallelism"] = json!(8);
                v["spec"]["maxParallelism"] = json!(4);
            }),
            "spec.parallelism 8 is above spec.maxParallelism 4",
            true,
        ),
        (
            "dup-uid",
            with("dup-uid", &|v| v["spec"]["pipeline"]["operators"][1]["uid"] = json!("src")),
            "uid \"src\" is used by more than one operator",
            true,
        ),
        (
            "late-taken",
            with("late-taken", &|v| {
                v["spec"]["pipeline"]["operators"] = json!([
                    {"uid": "src", "type": "generator", "format": "kv"},
                    {"uid": "w", "type": "window", "inputs": ["src"], "key": "key", "kind": "tumbling", "size": "1s", "aggregate": {"count": "*"}, "lateOutput": "src"},
                    {"uid": "out", "type": "blackhole", "inputs": ["w"]},
                ]);
            }),
            "operator \"w\": lateOutput \"src\" is already the name of an operator",
            true,
        ),
        (
            "unknown-type",
            with("unknown-type", &|v| {
                v["spec"]["pipeline"]["operators"][1]["type"] = json!("blackhol")
            }),
            "type \"blackhol\" is unknown",
            true,
        ),
        (
            "bad-sink-uri",
            with("bad-sink-uri", &|v| {
                v["spec"]["pipeline"]["operators"][1] = json!({"uid": "out", "type": "file_sink", "inputs": ["src"], "path": "s3://No_Such/out"});
            }),
            "spec.pipeline.operators[1].path",
            false,
        ),
        // An operator's parameters, checked by the runtime's own planner: the message is the
        // one `weir run` gives for the same file (runtime/tests/manifest.rs).
        (
            "negative-rate",
            with("negative-rate", &|v| {
                v["spec"]["pipeline"]["operators"][0]["ratePerSecond"] = json!(-5)
            }),
            "spec.pipeline.operators[0]: operator \"src\" (generator): ratePerSecond -5 is not above 0: give a rate, or leave it out for no limit",
            false,
        ),
        (
            "unknown-param",
            with("unknown-param", &|v| v["spec"]["pipeline"]["operators"][0]["seeed"] = json!(3)),
            "spec.pipeline.operators[0]: operator \"src\" (generator): unknown field `seeed`",
            false,
        ),
        (
            "wrong-type-param",
            with("wrong-type-param", &|v| {
                v["spec"]["pipeline"]["operators"][0]["keys"] = json!("many")
            }),
            "spec.pipeline.operators[0]: operator \"src\" (generator): invalid type: string \"many\", expected u64",
            false,
        ),
        (
            "no-secret",
            with("no-secret", &|v| {
                v["spec"]["s3"] = json!({"credentialsSecret": {"name": "missing"}})
            }),
            "spec.s3.credentialsSecret.name: Secret \"missing\" does not exist",
            false,
        ),
        (
            "no-checkpoints",
            with("no-checkpoints", &|v| v["spec"]["checkpointing"] = json!({"interval": "0s"})),
            "spec.checkpointing.interval 0s turns checkpoints off, and spec.upgradeMode savepoint needs them",
            true,
        ),
    ];
    // What a rule refuses, the apiserver refuses at apply with the controller's message; the
    // apiserver without the rules takes it, and the controller there refuses it (below).
    for (name, manifest, text, rule) in &cases {
        if *rule {
            let (ok, out) = apply(&env, manifest);
            assert!(!ok, "{name}: the apiserver took it: {out}");
            assert!(out.contains(text), "{name}: {out}");
            let mut there = manifest.clone();
            there["metadata"]["namespace"] = json!(nns);
            let (ok, out) = apply(&norules, &there);
            assert!(ok, "{name}: kubectl apply (no rules): {out}");
        } else {
            let (ok, out) = apply(&env, manifest);
            assert!(ok, "{name}: kubectl apply: {out}");
        }
    }
    for (name, _, text, rule) in &cases {
        let (env, ns) = if *rule { (&norules, &nns) } else { (&env, &ns) };
        let j = wait_job(env, ns, name, "Degraded", |j| {
            condition(j, "Degraded").is_some_and(|c| c.0 == "True")
        })
        .await;
        let (_, reason, message) = condition(&j, "Degraded").unwrap();
        assert_eq!(reason, "InvalidSpec", "{name}");
        assert!(message.contains(text), "{name}: {message}");
        assert_eq!(phase(&j), Some(JobPhase::Created), "{name}");
        let note = wait_event(env, ns, name, "InvalidSpec").await;
        assert_eq!(&note, &message, "{name}");
    }
    // Nothing was created for any of them, on either apiserver.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for (env, ns) in [(&env, &ns), (&norules, &nns)] {
        assert_eq!(labelled::<ConfigMap>(env, ns).await, 0);
        assert_eq!(labelled::<Deployment>(env, ns).await, 0);
        assert_eq!(labelled::<StatefulSet>(env, ns).await, 0);
        assert_eq!(labelled::<Service>(env, ns).await, 0);
    }

    // maxParallelism changed once the job has state: refused by the apiserver's transition
    // rule (see the running job's test); where no rule stops it, the controller refuses it
    // with the same message, Degraded with one Event.
    let mut kept = base("mp-changed", &nns);
    kept["spec"]["state"] = json!("suspended");
    kept["spec"]["maxParallelism"] = json!(128);
    let (ok, out) = apply(&norules, &kept);
    assert!(ok, "{out}");
    wait_job(&norules, &nns, "mp-changed", "Suspended", |j| phase(j) == Some(JobPhase::Suspended))
        .await;
    // What the controller writes at the job's first checkpoint.
    let api: Api<StreamJob> = Api::namespaced(norules.client.clone(), &nns);
    api.patch_status(
        "mp-changed",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"maxParallelism": 128}})),
    )
    .await
    .unwrap();
    api.patch(
        "mp-changed",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"maxParallelism": 256}})),
    )
    .await
    .unwrap();
    let j = wait_job(&norules, &nns, "mp-changed", "Degraded by the maxParallelism change", |j| {
        condition(j, "Degraded").is_some_and(|c| c.1 == "InvalidSpec")
    })
    .await;
    let (_, _, message) = condition(&j, "Degraded").unwrap();
    assert_eq!(message, weir_crds::rules::max_parallelism_fixed(Some(256), 256, 128));
    assert!(message.starts_with("spec.maxParallelism 256 differs from 128"), "{message}");
    let note = wait_event(&norules, &nns, "mp-changed", "InvalidSpec").await;
    assert_eq!(note, message);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let invalid_events = events(&norules, &nns, "mp-changed")
        .await
        .into_iter()
        .filter(|(r, _)| r == "InvalidSpec")
        .count();
    assert_eq!(invalid_events, 1, "one event for one refusal, not one per reconcile");
    assert_eq!(labelled::<StatefulSet>(&norules, &nns).await, 0);

    // What the schema can express, the apiserver refuses at apply, naming the field: a
    // malformed S3 URI in the storage, a missing uid.
    let (ok, out) = apply(
        &env,
        &with("bad-storage", &|v| {
            v["spec"]["checkpointing"] = json!({"storage": "s3://Bad_Bucket/x"})
        }),
    );
    assert!(!ok && out.contains("spec.checkpointing.storage"), "{out}");
    let (ok, out) = apply(
        &env,
        &with("bad-storage", &|v| {
            v["spec"]["checkpointing"] = json!({"storage": "s3://bucket/../x"})
        }),
    );
    assert!(!ok && out.contains("spec.checkpointing.storage"), "{out}");
    let (ok, out) = apply(
        &env,
        &with("no-uid", &|v| {
            v["spec"]["pipeline"]["operators"][1].as_object_mut().unwrap().remove("uid");
        }),
    );
    assert!(!ok && out.contains("uid"), "{out}");

    // A window's lateOutput is read by name like an operator: the apiserver takes it.
    let mut late = with("late-read", &|v| {
        v["spec"]["pipeline"]["operators"] = json!([
            {"uid": "src", "type": "generator", "format": "kv"},
            {"uid": "w", "type": "window", "inputs": ["src"], "key": "key", "kind": "tumbling", "size": "1s", "aggregate": {"count": "*"}, "lateOutput": "late"},
            {"uid": "out", "type": "blackhole", "inputs": ["w"]},
            {"uid": "late-out", "type": "blackhole", "inputs": ["late"]},
        ]);
    });
    late["spec"]["state"] = json!("suspended");
    let (ok, out) = apply(&env, &late);
    assert!(ok, "a pipeline that reads a lateOutput: {out}");

    // The missing Secret, once created, is picked up without a change of the job.
    let api: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    let s: Secret = serde_json::from_value(json!({"metadata": {"name": "missing"}, "stringData": {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}})).unwrap();
    api.create(&PostParams::default(), &s).await.unwrap();
    let api: Api<StreamJob> = Api::namespaced(env.client.clone(), &ns);
    api.patch(
        "no-secret",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"state": "suspended"}})),
    )
    .await
    .unwrap();
    wait_job(&env, &ns, "no-secret", "valid once suspended", |j| {
        phase(j) == Some(JobPhase::Suspended)
            && condition(j, "Degraded").is_some_and(|c| c.0 == "False")
    })
    .await;
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn with_two_controllers_one_leads_and_the_other_takes_over_when_it_dies() {
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-lead").await;
    let args = |id: &'static str| -> Vec<&'static str> {
        vec!["--leader-elect", "--lease-duration", "4s", "--identity", id]
    };
    // The Lease lives where the chart's leader-election Role allows it: the release's
    // namespace, under a name of this test's own.
    let lease: &'static str = Box::leak(format!("weir-controller-{ns}").into_boxed_str());
    let mut a_args = args("ctl-a");
    let mut b_args = args("ctl-b");
    a_args.extend(["--lease-namespace", "weir-system", "--lease-name", lease]);
    b_args.extend(["--lease-namespace", "weir-system", "--lease-name", lease]);
    let mut a = Controller::start(&env, &ns, &a_args);
    let mut b = Controller::start(&env, &ns, &b_args);
    let leases: Api<Lease> = Api::namespaced(env.client.clone(), "weir-system");
    let leader = wait_for("a leader", T, || async {
        leases.get_opt(lease).await.ok().flatten()?.spec?.holder_identity
    })
    .await;
    let suspended = |name: &str| {
        json!({
            "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
            "metadata": {"name": name, "namespace": ns},
            "spec": {"state": "suspended", "pipeline": {"operators": [
                {"uid": "src", "type": "generator"},
                {"uid": "out", "type": "blackhole", "inputs": ["src"]},
            ]}},
        })
    };
    let (ok, out) = apply(&env, &suspended("first"));
    assert!(ok, "{out}");
    wait_job(&env, &ns, "first", "Suspended", |j| phase(j) == Some(JobPhase::Suspended)).await;
    let (ma, mb) = (a.metrics_addr().await, b.metrics_addr().await);
    let (ra, rb) = (
        metric(&http_get(&ma, "/metrics"), "weir_controller_reconciles_total"),
        metric(&http_get(&mb, "/metrics"), "weir_controller_reconciles_total"),
    );
    let (leading, standby) = if leader == "ctl-a" { (ra, rb) } else { (rb, ra) };
    assert!(
        leading >= 1.0 && standby == 0.0,
        "only the leader reconciles: leader {leading}, standby {standby}"
    );
    assert!(http_get(if leader == "ctl-a" { &mb } else { &ma }, "/readyz").contains("standby"));

    // The leader dies; the other takes over within the lease time and reconciles.
    if leader == "ctl-a" {
        a.kill()
    } else {
        b.kill()
    }
    let (ok, out) = apply(&env, &suspended("second"));
    assert!(ok, "{out}");
    wait_job(&env, &ns, "second", "Suspended (reconciled by the new leader)", |j| {
        phase(j) == Some(JobPhase::Suspended)
    })
    .await;
    let holder = leases.get(lease).await.unwrap().spec.unwrap().holder_identity.unwrap();
    assert_ne!(holder, leader);
    env.delete_namespace(&ns).await;
}

/// A stateless job that needs no S3 (no checkpoints): what the controller builds for it is
/// all these tests look at, not whether its pods run.
fn stateless(ns: &str, name: &str) -> Value {
    json!({
        "apiVersion": "weir.dev/v1alpha1", "kind": "StreamJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "parallelism": 1,
            "upgradeMode": "stateless",
            "checkpointing": {"interval": "0s"},
            "pipeline": {"operators": [
                {"uid": "src", "type": "generator", "ratePerSecond": 10},
                {"uid": "out", "type": "blackhole", "inputs": ["src"]},
            ]},
        },
    })
}

/// The `metadata.generation` of the job's Deployment and StatefulSet (their specs' version:
/// what their controllers' status writes leave alone) and their applied hashes.
async fn pod_specs(env: &TestEnv, ns: &str, name: &str) -> Vec<(Option<i64>, Option<String>)> {
    let hash = |m: &kube::core::ObjectMeta| {
        (m.generation, m.annotations.as_ref().and_then(|a| a.get("weir.dev/applied-hash").cloned()))
    };
    let d = Api::<Deployment>::namespaced(env.client.clone(), ns)
        .get(&format!("{name}-coordinator"))
        .await
        .unwrap();
    let s = Api::<StatefulSet>::namespaced(env.client.clone(), ns)
        .get(&format!("{name}-worker"))
        .await
        .unwrap();
    vec![hash(&d.metadata), hash(&s.metadata)]
}

#[tokio::test]
async fn a_jobs_network_policy_lets_in_its_pods_and_the_controllers_namespace_and_goes_when_off() {
    use k8s_openapi::api::core::v1::Pod;
    use k8s_openapi::api::networking::v1::NetworkPolicy;
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-netpol").await;
    let _ctl = Controller::start(&env, &ns, &["--controller-namespace", "weir-system"]);
    let (ok, out) = apply(&env, &stateless(&ns, "np"));
    assert!(ok, "kubectl apply: {out}");
    let policies: Api<NetworkPolicy> = Api::namespaced(env.client.clone(), &ns);
    let np = wait_for("NetworkPolicy np-ingress", T, || async {
        policies.get_opt("np-ingress").await.ok().flatten()
    })
    .await;
    let j = job(&env, &ns, "np").await;

    // Owned by the job like its other objects, with the same labels.
    let owners = np.metadata.owner_references.clone().unwrap_or_default();
    assert_eq!(owners.len(), 1, "{owners:?}");
    let o = &owners[0];
    assert_eq!(
        (o.api_version.as_str(), o.kind.as_str(), o.name.as_str()),
        ("weir.dev/v1alpha1", "StreamJob", "np")
    );
    assert_eq!(Some(&o.uid), j.metadata.uid.as_ref());
    assert_eq!(o.controller, Some(true));
    let labels = np.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("weir.dev/job").map(String::as_str), Some("np"), "{labels:?}");
    assert_eq!(
        labels.get("app.kubernetes.io/managed-by").map(String::as_str),
        Some("weir-controller")
    );

    // Ingress only: 6123 and 6124 from the job's pods, 8081 from the controller's namespace.
    let spec = serde_json::to_value(np.spec.clone().unwrap()).unwrap();
    let pods = json!({"matchLabels": {"weir.dev/job": "np"}});
    assert_eq!(spec["podSelector"], pods, "{spec}");
    assert_eq!(spec["policyTypes"], json!(["Ingress"]), "{spec}");
    assert!(spec.get("egress").is_none(), "egress is left open: {spec}");
    assert_eq!(
        spec["ingress"],
        json!([
            {
                "from": [{"podSelector": pods}],
                "ports": [{"port": 6123, "protocol": "TCP"}, {"port": 6124, "protocol": "TCP"}],
            },
            {
                "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "weir-system"}}}],
                "ports": [{"port": 8081, "protocol": "TCP"}],
            },
        ]),
        "{spec}"
    );
    // The namespace it names is labelled so (the apiserver labels every namespace).
    let (ok, labelled_ns, err) = env.kubectl(&[
        "get",
        "namespaces",
        "-l",
        "kubernetes.io/metadata.name=weir-system",
        "-o",
        "name",
    ]);
    assert!(ok && labelled_ns.trim() == "namespace/weir-system", "{labelled_ns}{err}");

    // Its selector picks the coordinator's and the workers' pods, and its ports are the
    // ports those pods listen on.
    let pod_api: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    let selected = wait_for("the job's coordinator and worker pods", T, || async {
        let l = pod_api.list(&ListParams::default().labels("weir.dev/job=np")).await.ok()?;
        let mut components: Vec<String> = l
            .items
            .iter()
            .filter_map(|p| p.metadata.labels.as_ref()?.get("weir.dev/component").cloned())
            .collect();
        components.sort();
        (components == ["coordinator", "worker"]).then_some(l.items)
    })
    .await;
    let mut listening: Vec<i32> = selected
        .iter()
        .flat_map(|p| p.spec.as_ref().unwrap().containers.iter())
        .flat_map(|c| c.ports.clone().unwrap_or_default())
        .map(|p| p.container_port)
        .collect();
    listening.sort();
    assert_eq!(listening, [6123, 6124, 8081]);
    let note = wait_event(&env, &ns, "np", "Deployed").await;
    assert!(note.contains("NetworkPolicy np-ingress"), "{note}");

    // Deleted by hand, it comes back.
    let uid = np.metadata.uid.clone();
    policies.delete("np-ingress", &DeleteParams::default()).await.unwrap();
    wait_for("NetworkPolicy np-ingress recreated", T, || async {
        let np = policies.get_opt("np-ingress").await.ok().flatten()?;
        (np.metadata.uid != uid).then_some(())
    })
    .await;

    // Turned off: deleted, and nothing else changes (no upgrade, the pods stay).
    let before = pod_specs(&env, &ns, "np").await;
    let run = j.status.as_ref().and_then(|s| s.deployed.as_ref()).map(|d| d.job_id.clone());
    let jobs: Api<StreamJob> = Api::namespaced(env.client.clone(), &ns);
    let off = json!({"spec": {"networkPolicy": {"enabled": false}}});
    jobs.patch("np", &PatchParams::default(), &Patch::Merge(&off)).await.unwrap();
    wait_for("NetworkPolicy np-ingress deleted", T, || async {
        policies.get_opt("np-ingress").await.ok().and_then(|np| np.is_none().then_some(()))
    })
    .await;
    let j = wait_job(&env, &ns, "np", "the change observed", |j| {
        j.status.as_ref().and_then(|s| s.observed_generation) == j.metadata.generation
    })
    .await;
    let s = j.status.clone().unwrap();
    assert!(s.upgrade.is_none(), "no upgrade: {s:?}");
    assert_eq!(s.deployed.map(|d| d.job_id), run, "the same run");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(pod_specs(&env, &ns, "np").await, before, "the pods' specs are as they were");
    assert!(policies.get_opt("np-ingress").await.unwrap().is_none(), "it stays deleted");

    // On again: back, and the pods still as they were.
    let on = json!({"spec": {"networkPolicy": {"enabled": true}}});
    jobs.patch("np", &PatchParams::default(), &Patch::Merge(&on)).await.unwrap();
    wait_for("NetworkPolicy np-ingress back", T, || async {
        policies.get_opt("np-ingress").await.ok().flatten()
    })
    .await;
    assert_eq!(pod_specs(&env, &ns, "np").await, before);

    // Suspended: no pods, no policy (it comes back before them on resume).
    let suspend = json!({"spec": {"state": "suspended"}});
    jobs.patch("np", &PatchParams::default(), &Patch::Merge(&suspend)).await.unwrap();
    wait_job(&env, &ns, "np", "Suspended", |j| phase(j) == Some(JobPhase::Suspended)).await;
    wait_for("NetworkPolicy np-ingress deleted with the pods", T, || async {
        policies.get_opt("np-ingress").await.ok().and_then(|np| np.is_none().then_some(()))
    })
    .await;
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn the_jobs_secret_is_a_secret_of_its_own_that_reaches_its_pods_by_reference() {
    let env = TestEnv::get().await;
    env.install_crds();
    let ns = env.job_namespace("ctl-secret").await;
    let secrets: Api<Secret> = Api::namespaced(env.client.clone(), &ns);
    // The token Secret of a job an older controller created: the token only, and no
    // job-secret Secret.
    let legacy: Secret = serde_json::from_value(json!({
        "metadata": {"name": "legacy-api-token"},
        "stringData": {"token": "an-older-controllers-token"},
    }))
    .unwrap();
    let legacy_version =
        secrets.create(&PostParams::default(), &legacy).await.unwrap().metadata.resource_version;
    let mut ctl = Controller::start(&env, &ns, &[]);
    for name in ["fresh", "legacy"] {
        let (ok, out) = apply(&env, &stateless(&ns, name));
        assert!(ok, "kubectl apply {name}: {out}");
    }
    // A Secret's data, as text.
    let data = |name: String| {
        let secrets = secrets.clone();
        async move {
            let s = secrets.get_opt(&name).await.ok().flatten()?;
            let d: BTreeMap<String, String> = s
                .data
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|(k, v)| (k, String::from_utf8(v.0).unwrap()))
                .collect();
            Some((s, d))
        }
    };
    let job_secret = |name: &'static str| async move {
        let (_, d) = data(format!("{name}-job-secret")).await?;
        d.get("jobSecret").cloned()
    };
    let hex64 = |s: &str| s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    // A new job: the token Secret with the token only, the job-secret Secret with jobSecret
    // only, 32 random bytes in hex; both owned by the job and labelled alike.
    let (token_secret, token) =
        wait_for("Secret fresh-api-token", T, || data("fresh-api-token".into())).await;
    let (secret_secret, secret) =
        wait_for("Secret fresh-job-secret", T, || data("fresh-job-secret".into())).await;
    assert_eq!(
        token.keys().collect::<Vec<_>>(),
        ["token"],
        "the token Secret holds the token only"
    );
    assert_eq!(secret.keys().collect::<Vec<_>>(), ["jobSecret"]);
    let fresh = secret["jobSecret"].clone();
    assert!(hex64(&fresh), "jobSecret: {} characters", fresh.len());
    assert!(token["token"].len() >= 32, "the token: {} characters", token["token"].len());
    assert_ne!(token["token"], fresh);
    let uid = job(&env, &ns, "fresh").await.metadata.uid;
    for s in [&token_secret, &secret_secret] {
        let owners = s.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(owners.len(), 1, "{owners:?}");
        assert_eq!((owners[0].kind.as_str(), Some(&owners[0].uid)), ("StreamJob", uid.as_ref()));
        assert_eq!(owners[0].controller, Some(true));
        assert_eq!(s.type_.as_deref(), Some("Opaque"));
    }
    assert_eq!(token_secret.metadata.labels, secret_secret.metadata.labels);
    let labels = secret_secret.metadata.labels.clone().unwrap_or_default();
    assert_eq!(labels.get("weir.dev/job").map(String::as_str), Some("fresh"), "{labels:?}");
    // The older job gains a job-secret Secret; its token Secret is left as it was.
    let legacy = wait_for("Secret legacy-job-secret", T, || job_secret("legacy")).await;
    assert!(hex64(&legacy), "jobSecret: {} characters", legacy.len());
    assert_ne!(legacy, fresh);
    let (old, old_data) = data("legacy-api-token".into()).await.unwrap();
    assert_eq!(old.metadata.resource_version, legacy_version, "never written");
    assert_eq!(old_data, BTreeMap::from([("token".into(), "an-older-controllers-token".into())]));

    // Both pods take it from its Secret, by reference only.
    for (kind, pod) in [
        (
            "coordinator",
            wait_for("Deployment legacy-coordinator", T, || async {
                Api::<Deployment>::namespaced(env.client.clone(), &ns)
                    .get_opt("legacy-coordinator")
                    .await
                    .ok()
                    .flatten()
                    .map(|d| serde_json::to_value(d.spec.template).unwrap())
            })
            .await,
        ),
        (
            "worker",
            wait_for("StatefulSet legacy-worker", T, || async {
                Api::<StatefulSet>::namespaced(env.client.clone(), &ns)
                    .get_opt("legacy-worker")
                    .await
                    .ok()
                    .flatten()
                    .map(|s| serde_json::to_value(s.spec.template).unwrap())
            })
            .await,
        ),
    ] {
        let env_vars = &pod["spec"]["containers"][0]["env"];
        let var = env_vars
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["name"] == "WEIR_JOB_SECRET")
            .unwrap_or_else(|| panic!("{kind}: no WEIR_JOB_SECRET in {env_vars}"));
        assert_eq!(
            var["valueFrom"],
            json!({"secretKeyRef": {"name": "legacy-job-secret", "key": "jobSecret"}}),
            "{kind}"
        );
        assert!(!pod.to_string().contains(&legacy), "{kind}: the value itself in the pod");
    }

    // A controller that starts again never changes it.
    ctl.kill();
    let again = Controller::start(&env, &ns, &[]);
    let (ok, out) = apply(&env, &stateless(&ns, "third"));
    assert!(ok, "{out}");
    wait_for("Secret third-job-secret", T, || job_secret("third")).await;
    assert_eq!(job_secret("legacy").await, Some(legacy.clone()));
    assert_eq!(job_secret("fresh").await, Some(fresh.clone()));
    // Nor does it show it: not in the status, the events or its log.
    for name in ["fresh", "legacy"] {
        let status = serde_json::to_string(&job(&env, &ns, name).await.status).unwrap();
        assert!(!status.contains(&fresh) && !status.contains(&legacy), "{name}: {status}");
        for (_, note) in events(&env, &ns, name).await {
            assert!(!note.contains(&fresh) && !note.contains(&legacy), "{name}: {note}");
        }
    }
    for log in [ctl.log(), again.log()] {
        assert!(!log.contains(&fresh) && !log.contains(&legacy), "a job secret in the log");
    }

    // Replaced as docs/operations.md says: suspend, delete the Secret, resume.
    let jobs: Api<StreamJob> = Api::namespaced(env.client.clone(), &ns);
    let state = |s: &str| json!({"spec": {"state": s}});
    jobs.patch("fresh", &PatchParams::default(), &Patch::Merge(&state("suspended"))).await.unwrap();
    wait_job(&env, &ns, "fresh", "Suspended", |j| phase(j) == Some(JobPhase::Suspended)).await;
    assert_eq!(job_secret("fresh").await, Some(fresh.clone()), "a suspend keeps it");
    secrets.delete("fresh-job-secret", &DeleteParams::default()).await.unwrap();
    jobs.patch("fresh", &PatchParams::default(), &Patch::Merge(&state("running"))).await.unwrap();
    let renewed = wait_for("a new fresh-job-secret", T, || async {
        job_secret("fresh").await.filter(|s| *s != fresh)
    })
    .await;
    assert!(hex64(&renewed));
    // And the job runs again with it.
    wait_job(&env, &ns, "fresh", "running again", |j| {
        phase(j) == Some(JobPhase::Running) && ready(j)
    })
    .await;
    env.delete_namespace(&ns).await;
}
