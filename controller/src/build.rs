//! Build: the Kubernetes objects that run a validated StreamJob. Pure: plain objects out,
//! applied by the reconciler with server-side apply under one field manager.
//!
//! ```text
//!   <job>-job            ConfigMap   job.yaml: the StreamJob as the runtime reads it
//!   <job>-coordinator    Service     control :6123 (workers), api :8081 (controller, CLI)
//!   <job>-coordinator    Deployment  1 replica, Recreate: `weir coordinator --resume`
//!   <job>-worker         Service     headless, the workers' data port :6124
//!   <job>-worker         StatefulSet parallelism replicas, Parallel: `weir worker`
//!   <job>-ingress        NetworkPolicy  ingress to the job's pods: 6123 and 6124 from the
//!                                    job's pods, 8081 from the controller's namespace
//!                                    (unless `spec.networkPolicy.enabled: false`)
//!   <job>-api-token      Secret      `token`, of the coordinator's mutating endpoints
//!                                    (created once, never rewritten; see `api_token`)
//!   <job>-job-secret     Secret      `jobSecret`, of the job's control and data connections
//!                                    and checkpoint metadata (`WEIR_JOB_SECRET`); created
//!                                    when missing, never rewritten; see `job_secret`
//! ```
//!
//! Every object carries the job's labels, an owner reference to the StreamJob (so deleting the
//! job deletes them), and `weir.dev/applied-hash`, a hash of what was built: the reconciler
//! applies an object only when the one in the cluster is missing or carries another hash.
//! The NetworkPolicy is not part of the run (not in [`Objects`] nor in [`spec_hash`]):
//! turning it on or off applies or deletes it and restarts nothing.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::OwnerReference;
use kube::Resource;
use serde_json::{Value, json};
use weir_crds::{LABEL_COMPONENT, LABEL_JOB, StreamJob};

use crate::validate::Valid;

// Every port names its protocol: server-side apply keys port lists by port and protocol, and
// an apiserver before 1.26 refuses an element without it.

/// Port the workers reach the coordinator on.
pub const CONTROL_PORT: u16 = 6123;
/// Port of the coordinator's HTTP API.
pub const API_PORT: u16 = 8081;
/// Port of a worker's data exchange.
pub const DATA_PORT: u16 = 6124;
/// Annotation holding the hash of the object as built.
pub const APPLIED_HASH: &str = "weir.dev/applied-hash";
/// Pod annotation: the hash of the ConfigMap, so that a new job file rolls the pods.
pub const CONFIG_HASH: &str = "weir.dev/config-hash";
/// Where the ConfigMap is mounted in the pods.
const CONFIG_DIR: &str = "/etc/weir";
/// The user the runtime's containers run as when the pod template says nothing else.
const RUNTIME_UID: i64 = 65532;

/// Operator-wide settings of what is built.
#[derive(Debug, Clone)]
pub struct BuildConfig {
    /// Runtime image of jobs that name none.
    pub runtime_image: String,
    /// DNS suffix of Services after `<name>.<namespace>.` (`svc`, or `svc.cluster.local`).
    pub service_domain: String,
    /// The namespace the controller runs in: the jobs' NetworkPolicies let it (and only it,
    /// of the other namespaces) reach the coordinators' API.
    pub controller_namespace: String,
}

/// What a job runs as, when running.
#[derive(Debug, Clone, PartialEq)]
pub struct Objects {
    pub config_map: ConfigMap,
    pub coordinator_service: Service,
    pub coordinator: Deployment,
    pub worker_service: Service,
    pub workers: StatefulSet,
}

/// Which run of the job the objects start: the job id its checkpoints go under, and the
/// state it starts from when it has no checkpoint of its own yet.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Run {
    pub job_id: String,
    pub restore_path: Option<weir_crds::StorageUri>,
}

/// Pod annotation of the coordinator: the spec's `restartNonce`, so that a new nonce restarts
/// the job from its last checkpoint.
pub const RESTART_NONCE: &str = "weir.dev/restart-nonce";

/// Names of a job's objects.
pub fn config_map_name(job: &str) -> String {
    format!("{job}-job")
}
pub fn coordinator_name(job: &str) -> String {
    format!("{job}-coordinator")
}
pub fn workers_name(job: &str) -> String {
    format!("{job}-worker")
}
pub fn token_secret_name(job: &str) -> String {
    format!("{job}-api-token")
}
pub fn job_secret_name(job: &str) -> String {
    format!("{job}-job-secret")
}
pub fn network_policy_name(job: &str) -> String {
    format!("{job}-ingress")
}

/// Key of the API token in the Secret `<job>-api-token` (`WEIR_API_TOKEN` of the coordinator).
pub const TOKEN_KEY: &str = "token";
/// Key of the job's secret in the Secret `<job>-job-secret` (`WEIR_JOB_SECRET` of the
/// coordinator and of every worker: the key of their connections' challenge-response and of
/// the MAC of the job's checkpoint metadata).
pub const JOB_SECRET_KEY: &str = "jobSecret";
/// The environment variable the runtime takes the job's secret from.
pub const JOB_SECRET_ENV: &str = "WEIR_JOB_SECRET";

/// The job id of a StreamJob's first run: stable for one StreamJob object (its uid),
/// different for a StreamJob deleted and created again under the same name.
pub fn job_id(job: &StreamJob) -> String {
    let uid = job.metadata.uid.as_deref().unwrap_or("");
    let short: String = uid.chars().filter(|c| *c != '-').take(12).collect();
    if short.is_empty() { "job".into() } else { short }
}

/// The job id of the run after `id` (`abc` → `abc-2` → `abc-3`).
pub fn next_job_id(id: &str) -> String {
    match id.rsplit_once('-').and_then(|(base, n)| Some((base, n.parse::<u64>().ok()?))) {
        Some((base, n)) => format!("{base}-{}", n + 1),
        None => format!("{id}-2"),
    }
}

/// A hash of everything the spec builds, apart from the run: two specs with the same hash run
/// the same way, so a change of spec that keeps it (a savepoint nonce, retention, the upgrade
/// mode) needs no upgrade.
pub fn spec_hash(job: &StreamJob, valid: &Valid, cfg: &BuildConfig) -> String {
    let mut job = job.clone();
    job.spec.restart_nonce = None;
    let o = objects(&job, valid, cfg, job.spec.parallelism, &Run::default());
    let v =
        json!([o.config_map, o.coordinator_service, o.coordinator, o.worker_service, o.workers]);
    hash(v.to_string().as_bytes())
}

/// The coordinator Service's DNS name.
fn coordinator_host(job: &StreamJob, cfg: &BuildConfig) -> String {
    format!("{}.{}.{}", coordinator_name(&name(job)), namespace(job), cfg.service_domain)
}

/// The coordinator's API address as the controller reaches it.
pub fn api_address(job: &StreamJob, cfg: &BuildConfig) -> String {
    format!("{}:{API_PORT}", coordinator_host(job, cfg))
}

/// The label selector of the worker pods (the scale subresource's `status.selector`).
pub fn worker_selector(job: &str) -> String {
    format!("{LABEL_JOB}={job},{LABEL_COMPONENT}=worker")
}

fn name(job: &StreamJob) -> String {
    job.metadata.name.clone().unwrap_or_default()
}

fn namespace(job: &StreamJob) -> String {
    job.metadata.namespace.clone().unwrap_or_else(|| "default".into())
}

fn owner(job: &StreamJob) -> OwnerReference {
    job.controller_owner_ref(&()).unwrap_or_default()
}

fn labels(job: &str, component: Option<&str>) -> BTreeMap<String, String> {
    let mut l = BTreeMap::from([
        (LABEL_JOB.to_string(), job.to_string()),
        ("app.kubernetes.io/name".into(), "weir".into()),
        ("app.kubernetes.io/instance".into(), job.to_string()),
        ("app.kubernetes.io/managed-by".into(), weir_crds::FIELD_MANAGER.into()),
    ]);
    if let Some(c) = component {
        l.insert(LABEL_COMPONENT.into(), c.into());
        l.insert("app.kubernetes.io/component".into(), c.into());
    }
    l
}

/// FNV-1a, 64 bits: stable across builds and platforms (the hash is stored in the cluster).
pub fn hash(bytes: &[u8]) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in bytes {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{h:016x}")
}

/// Stamps the hash of `obj` (as built, before the stamp) on its annotations.
fn stamped<K: serde::Serialize + serde::de::DeserializeOwned>(mut v: Value) -> K {
    let h = hash(v.to_string().as_bytes());
    v["metadata"]["annotations"][APPLIED_HASH] = Value::String(h);
    serde_json::from_value(v).expect("built objects match their types")
}

/// The job file the runtime reads: the StreamJob's spec, with the operator's defaults filled
/// in, the restore point of the run, and without what only the controller acts on (the
/// desired state, the upgrade mode and settings, nonces, periodic savepoints and retention,
/// the NetworkPolicy, what happens to checkpoints on cancel).
pub fn job_file(job: &StreamJob, valid: &Valid, run: &Run) -> String {
    let mut spec = job.spec.clone();
    spec.checkpointing.storage = valid.checkpoint_storage.clone().or(spec.checkpointing.storage);
    spec.max_parallelism = Some(valid.max_parallelism);
    let allow = spec.restore.as_ref().is_some_and(|r| r.allow_non_restored_state);
    let older = spec.restore.as_ref().is_some_and(|r| r.resume_from_older);
    spec.restore = run.restore_path.as_ref().map(|p| weir_crds::streamjob::RestoreSpec {
        snapshot: None,
        path: Some(p.clone()),
        allow_non_restored_state: allow,
        resume_from_older: older,
    });
    // The controller's (on deletion), not the coordinator's: changing it restarts nothing.
    spec.checkpointing.on_cancel = Default::default();
    spec.savepoints.trigger_nonce = None;
    spec.savepoints.interval = None;
    spec.savepoints.retention = Default::default();
    spec.restart_nonce = None;
    let mut v = serde_json::to_value(&spec).unwrap_or_default();
    if let Some(m) = v.as_object_mut() {
        for k in [
            "state",
            "upgradeMode",
            "upgrade",
            "image",
            "imagePullPolicy",
            "resources",
            "podTemplate",
            "networkPolicy",
        ] {
            m.remove(k);
        }
        // Only the directory and the timeout of savepoints are the runtime's.
        if let Some(sp) = m.get_mut("savepoints").and_then(Value::as_object_mut) {
            sp.retain(|k, _| k == "directory" || k == "timeout");
        }
    }
    let v = json!({
        "apiVersion": "weir.dev/v1alpha1",
        "kind": "StreamJob",
        "metadata": {"name": name(job), "namespace": namespace(job)},
        "spec": v,
    });
    serde_saphyr::to_string(&v).expect("a StreamJob always serializes")
}

/// Every object of a running job. `workers` is the number of worker pods (the parallelism,
/// or 0 once a bounded job has finished).
pub fn objects(
    job: &StreamJob,
    valid: &Valid,
    cfg: &BuildConfig,
    workers: i32,
    run: &Run,
) -> Objects {
    let n = name(job);
    let ns = namespace(job);
    let owner = serde_json::to_value(owner(job)).unwrap_or_default();
    let meta = |name: String, component: Option<&str>| json!({"name": name, "namespace": ns, "labels": labels(&n, component), "ownerReferences": [owner]});
    let file = job_file(job, valid, run);
    let config_hash = hash(file.as_bytes());
    let config_map = stamped(json!({
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": meta(config_map_name(&n), None),
        "data": {"job.yaml": file},
    }));
    let coordinator_service = stamped(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(coordinator_name(&n), Some("coordinator")),
        "spec": {
            "selector": {LABEL_JOB: n, LABEL_COMPONENT: "coordinator"},
            // Workers connect before the coordinator is ready (it is ready once they have).
            "publishNotReadyAddresses": true,
            "ports": [
                {"name": "control", "port": CONTROL_PORT, "targetPort": CONTROL_PORT, "protocol": "TCP"},
                {"name": "api", "port": API_PORT, "targetPort": API_PORT, "protocol": "TCP"},
            ],
        },
    }));
    let worker_service = stamped(json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": meta(workers_name(&n), Some("worker")),
        "spec": {
            "clusterIP": "None",
            "selector": {LABEL_JOB: n, LABEL_COMPONENT: "worker"},
            "publishNotReadyAddresses": true,
            "ports": [{"name": "data", "port": DATA_PORT, "targetPort": DATA_PORT, "protocol": "TCP"}],
        },
    }));

    let image = job.spec.image.clone().unwrap_or_else(|| cfg.runtime_image.clone());
    let pull = job.spec.image_pull_policy.map(|p| serde_json::to_value(p).unwrap_or_default());
    let mut env = vec![
        json!({"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}),
        json!({"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}),
    ];
    // The job's secret, by reference only: the coordinator and every worker prove to each
    // other that they hold it on each control and data connection.
    env.push(json!({"name": JOB_SECRET_ENV, "valueFrom": {"secretKeyRef": {"name": job_secret_name(&n), "key": JOB_SECRET_KEY}}}));
    if let Some(secret) = job.spec.s3.as_ref().and_then(|s| s.credentials_secret.as_ref()) {
        let from = |var: &str, key: &str| json!({"name": var, "valueFrom": {"secretKeyRef": {"name": secret.name, "key": key}}});
        env.push(from("AWS_ACCESS_KEY_ID", &secret.access_key_id_key));
        env.push(from("AWS_SECRET_ACCESS_KEY", &secret.secret_access_key_key));
        if let Some(k) = &secret.session_token_key {
            env.push(from("AWS_SESSION_TOKEN", k));
        }
    }
    let resources = |r: Option<&weir_crds::streamjob::ContainerResources>| {
        r.map(|r| json!({"requests": r.requests, "limits": r.limits})).unwrap_or(json!({}))
    };
    let security = json!({
        "runAsNonRoot": true,
        "readOnlyRootFilesystem": true,
        "allowPrivilegeEscalation": false,
        "capabilities": {"drop": ["ALL"]},
    });
    let volumes = json!([
        {"name": "job", "configMap": {"name": config_map_name(&n)}},
        {"name": "work", "emptyDir": {}},
        {"name": "tmp", "emptyDir": {}},
    ]);
    let mounts = json!([
        {"name": "job", "mountPath": CONFIG_DIR, "readOnly": true},
        {"name": "work", "mountPath": "/var/tmp/weir"},
        {"name": "tmp", "mountPath": "/tmp"},
    ]);
    let pod_security = json!({"runAsNonRoot": true, "runAsUser": RUNTIME_UID, "runAsGroup": RUNTIME_UID, "fsGroup": RUNTIME_UID, "seccompProfile": {"type": "RuntimeDefault"}});

    // What both pods share; `container` holds what differs (name, args, env, ports, probes).
    let pod = |component: &str, mut container: Value, resources: Value, annotations: Value| {
        let c = container.as_object_mut().expect("a container object");
        c.insert("image".into(), json!(image));
        c.insert("imagePullPolicy".into(), json!(pull));
        c.insert("resources".into(), resources);
        c.insert("securityContext".into(), security.clone());
        c.insert("volumeMounts".into(), mounts.clone());
        let template = json!({
            "metadata": {"labels": labels(&n, Some(component)), "annotations": annotations},
            "spec": {
                "securityContext": pod_security,
                "automountServiceAccountToken": false,
                "terminationGracePeriodSeconds": 30,
                "volumes": volumes,
                "containers": [container],
            },
        });
        overlay(template, job.spec.pod_template.as_ref())
    };
    let wanted = job.spec.resources.as_ref();

    let mut coord_env = env.clone();
    coord_env.push(json!({"name": "WEIR_API_TOKEN", "valueFrom": {"secretKeyRef": {"name": token_secret_name(&n), "key": TOKEN_KEY}}}));
    let mut coord_args = vec![
        json!("coordinator"),
        json!(format!("{CONFIG_DIR}/job.yaml")),
        json!("--control-addr"),
        json!(format!("$(POD_IP):{CONTROL_PORT}")),
        json!("--api-addr"),
        json!(format!("$(POD_IP):{API_PORT}")),
        json!("--job-id"),
        json!(run.job_id),
        json!("--resume"),
    ];
    // Checkpoints whose metadata cannot be used are passed over only when the spec says so.
    if job.spec.restore.as_ref().is_some_and(|r| r.resume_from_older) {
        coord_args.push(json!("--resume-from-older"));
    }
    coord_args.push(json!("--stay-after-end"));
    let coord_pod = pod(
        "coordinator",
        json!({
            "name": "coordinator",
            "args": coord_args,
            "env": coord_env,
            "ports": [
                {"name": "control", "containerPort": CONTROL_PORT, "protocol": "TCP"},
                {"name": "api", "containerPort": API_PORT, "protocol": "TCP"},
            ],
            "readinessProbe": {"httpGet": {"path": "/healthz", "port": API_PORT}, "periodSeconds": 2},
            "livenessProbe": {"httpGet": {"path": "/healthz", "port": API_PORT}, "periodSeconds": 10, "failureThreshold": 6},
        }),
        resources(wanted.and_then(|r| r.coordinator.as_ref())),
        // The coordinator reads the job file: a new one (or a new restart nonce) restarts it.
        json!({CONFIG_HASH: config_hash, RESTART_NONCE: job.spec.restart_nonce.unwrap_or(0).to_string()}),
    );
    let coordinator = stamped(json!({
        "apiVersion": "apps/v1", "kind": "Deployment",
        "metadata": meta(coordinator_name(&n), Some("coordinator")),
        "spec": {
            "replicas": 1,
            // Never two coordinators of one job.
            "strategy": {"type": "Recreate"},
            "selector": {"matchLabels": {LABEL_JOB: n, LABEL_COMPONENT: "coordinator"}},
            "template": coord_pod,
        },
    }));

    let worker_pod = pod(
        "worker",
        json!({
            "name": "worker",
            "args": [
                "worker",
                "--coordinator", format!("{}:{CONTROL_PORT}", coordinator_host(job, cfg)),
                "--pod-name", "$(POD_NAME)",
                "--data-addr", format!("$(POD_IP):{DATA_PORT}"),
                "--advertise-host", "$(POD_IP)",
                "--state-dir", "/var/tmp/weir/state",
            ],
            "env": env,
            "ports": [{"name": "data", "containerPort": DATA_PORT, "protocol": "TCP"}],
        }),
        resources(wanted.and_then(|r| r.worker.as_ref())),
        // Workers take the job from the coordinator and outlive its runs: a new job file
        // leaves them be, so a rescale keeps the pods whose index survives.
        json!({}),
    );
    let workers = stamped(json!({
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": meta(workers_name(&n), Some("worker")),
        "spec": {
            "replicas": workers,
            "serviceName": workers_name(&n),
            "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": {LABEL_JOB: n, LABEL_COMPONENT: "worker"}},
            "template": worker_pod,
        },
    }));
    Objects { config_map, coordinator_service, coordinator, worker_service, workers }
}

/// The Secret with the coordinator's API token (created once: a new token on every apply
/// would lock the controller out of a running coordinator).
pub fn api_token(job: &StreamJob, token: &str) -> Secret {
    secret(job, token_secret_name(&name(job)), TOKEN_KEY, token)
}

/// The Secret with the job's secret, apart from the token so that who may read the token (to
/// ask for a savepoint) need not see it. Created when missing, never rewritten: a new one
/// under a running job would lock its workers out, and its checkpoints are signed with it.
pub fn job_secret(job: &StreamJob, job_secret: &str) -> Secret {
    secret(job, job_secret_name(&name(job)), JOB_SECRET_KEY, job_secret)
}

/// An Opaque Secret of the job with one key.
fn secret(job: &StreamJob, secret_name: String, key: &str, value: &str) -> Secret {
    let n = name(job);
    let owner = serde_json::to_value(owner(job)).unwrap_or_default();
    serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": secret_name, "namespace": namespace(job), "labels": labels(&n, None), "ownerReferences": [owner]},
        "type": "Opaque",
        "stringData": {key: value},
    }))
    .expect("a Secret")
}

/// The job's NetworkPolicy: ingress to its pods (the coordinator and the workers, by the
/// job's label) only on the control and data ports from the job's own pods, and on the API
/// port from the controller's namespace (the controller polls the coordinator and asks it for
/// savepoints there). Everything else into the pods is refused (the probes come from the node,
/// which NetworkPolicies do not hold back); egress is left open (S3, Kafka, DNS).
pub fn network_policy(job: &StreamJob, cfg: &BuildConfig) -> NetworkPolicy {
    let n = name(job);
    let owner = serde_json::to_value(owner(job)).unwrap_or_default();
    let pods = json!({"matchLabels": {LABEL_JOB: n}});
    stamped(json!({
        "apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
        "metadata": {"name": network_policy_name(&n), "namespace": namespace(job), "labels": labels(&n, None), "ownerReferences": [owner]},
        "spec": {
            "podSelector": pods,
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": pods}],
                    "ports": [
                        {"port": CONTROL_PORT, "protocol": "TCP"},
                        {"port": DATA_PORT, "protocol": "TCP"},
                    ],
                },
                {
                    "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": cfg.controller_namespace}}}],
                    "ports": [{"port": API_PORT, "protocol": "TCP"}],
                },
            ],
        },
    }))
}

/// `spec.podTemplate` over a built pod template: a JSON merge patch (RFC 7386), except that
/// containers are merged by name, so that an overlay can add a sidecar or set one field of
/// the runtime's container.
pub fn overlay(mut base: Value, over: Option<&Value>) -> Value {
    let Some(over) = over else { return base };
    merge(&mut base, over);
    base
}

fn merge(base: &mut Value, over: &Value) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                if v.is_null() {
                    b.remove(k);
                } else if (k == "containers" || k == "initContainers")
                    && let (Some(Value::Array(bs)), Value::Array(os)) = (b.get_mut(k), v)
                {
                    for oc in os {
                        let name = oc.get("name");
                        match bs.iter_mut().find(|bc| bc.get("name") == name && name.is_some()) {
                            Some(bc) => merge(bc, oc),
                            None => bs.push(oc.clone()),
                        }
                    }
                } else {
                    merge(b.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (b, o) => *b = o.clone(),
    }
}
