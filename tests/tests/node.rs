//! The node agent against the real control plane: the node is Ready; workloads made by the
//! real controllers (StatefulSet, Deployment) get pods that run as processes with their
//! command, env (fieldRef, Secret, ConfigMap), volumes and an address of their own; probes,
//! restart policies, exit codes, graceful deletion, users and read-only roots behave as with a
//! kubelet; Service and pod names resolve.

use std::net::ToSocketAddrs;
use std::time::{Duration, Instant};

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::core::v1::{ConfigMap, Node, Pod, Secret, Service};
use kube::api::{Api, DeleteParams, PostParams};
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use weir_e2e::testenv::{TestEnv, wait_for};

const T: Duration = Duration::from_secs(60);

async fn create<K>(env: &TestEnv, ns: &str, v: Value) -> K
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + serde::Serialize
        + std::fmt::Debug,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(env.client.clone(), ns);
    let obj: K = serde_json::from_value(v).unwrap();
    api.create(&PostParams::default(), &obj).await.unwrap()
}

fn pod(name: &str, restart: &str, script: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
        "spec": {"restartPolicy": restart, "terminationGracePeriodSeconds": 5, "containers": [{
            "name": "main", "image": "busybox", "command": ["sh", "-c", script],
        }]},
    })
}

async fn pod_where(
    env: &TestEnv,
    ns: &str,
    name: &str,
    what: &str,
    f: impl Fn(&Pod) -> bool,
) -> Pod {
    let api: Api<Pod> = Api::namespaced(env.client.clone(), ns);
    wait_for(&format!("pod {name}: {what}"), T, || async {
        api.get_opt(name).await.ok().flatten().filter(|p| f(p))
    })
    .await
}

fn phase(p: &Pod) -> &str {
    p.status.as_ref().and_then(|s| s.phase.as_deref()).unwrap_or("")
}

fn ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

fn main_status(p: &Pod) -> k8s_openapi::api::core::v1::ContainerStatus {
    p.status.as_ref().unwrap().container_statuses.as_ref().unwrap()[0].clone()
}

fn resolve(name: &str) -> Vec<String> {
    (name, 0).to_socket_addrs().map(|a| a.map(|a| a.ip().to_string()).collect()).unwrap_or_default()
}

#[tokio::test]
async fn node_is_ready_and_schedulable() {
    let env = TestEnv::get().await;
    let nodes: Api<Node> = Api::all(env.client.clone());
    let node = nodes.get(&weir_e2e::testenv::setting("WEIR_NODE_NAME")).await.unwrap();
    let conds = node.status.unwrap().conditions.unwrap();
    assert!(conds.iter().any(|c| c.type_ == "Ready" && c.status == "True"), "{conds:?}");
    let taints = node.spec.unwrap().taints.unwrap_or_default();
    assert!(
        taints.iter().all(|t| t.effect != "NoSchedule" && t.effect != "NoExecute"),
        "{taints:?}"
    );
    let (ok, out, _) = env.kubectl(&["get", "nodes"]);
    assert!(ok && out.contains(" Ready "), "{out}");
}

#[tokio::test]
async fn statefulset_pods_run_with_env_volumes_addresses_and_dns() {
    let env = TestEnv::get().await;
    let ns = env.namespace("sts").await;
    create::<Secret>(&env, &ns, json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cr3t", "user": "weir"}})).await;
    create::<ConfigMap>(
        &env,
        &ns,
        json!({"metadata": {"name": "conf"}, "data": {"mode": "fast", "job.yaml": "a: 1\n"}}),
    )
    .await;
    create::<Service>(
        &env,
        &ns,
        json!({"metadata": {"name": "web"}, "spec": {
        "clusterIP": "None", "selector": {"app": "web"}, "ports": [{"port": 8080}]}}),
    )
    .await;
    let script = "echo \"name=$POD_NAME ns=$POD_NS ip=$POD_IP node=$NODE pw=$PASSWORD mode=$MODE app=$APP \
                  greeting=$GREETING\"; echo \"file=$(cat /etc/weir-conf/job.yaml) user=$(cat /etc/weir-creds/user)\"; \
                  echo \"host=$(hostname)\"; exec python3 -m http.server --bind \"$POD_IP\" 8080";
    create::<StatefulSet>(&env, &ns, json!({"metadata": {"name": "web"}, "spec": {
        "serviceName": "web", "replicas": 2, "podManagementPolicy": "Parallel",
        "selector": {"matchLabels": {"app": "web"}},
        "template": {"metadata": {"labels": {"app": "web"}}, "spec": {
            "terminationGracePeriodSeconds": 5,
            "containers": [{
                "name": "main", "image": "busybox", "command": ["sh", "-c", script],
                "ports": [{"name": "http", "containerPort": 8080}],
                "env": [
                    {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                    {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
                    {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
                    {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
                    {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                    {"name": "MODE", "valueFrom": {"configMapKeyRef": {"name": "conf", "key": "mode"}}},
                    {"name": "GREETING", "value": "hi-$(POD_NAME)"},
                ],
                "volumeMounts": [
                    {"name": "conf", "mountPath": "/etc/weir-conf", "readOnly": true},
                    {"name": "creds", "mountPath": "/etc/weir-creds", "readOnly": true},
                ],
                "readinessProbe": {"httpGet": {"path": "/", "port": "http"}, "periodSeconds": 1},
            }],
            "volumes": [
                {"name": "conf", "configMap": {"name": "conf"}},
                {"name": "creds", "secret": {"secretName": "creds"}},
            ],
        }},
    }})).await;

    let mut ips = Vec::new();
    for i in 0..2 {
        let name = format!("web-{i}");
        let p =
            pod_where(&env, &ns, &name, "Running and Ready", |p| phase(p) == "Running" && ready(p))
                .await;
        let ip = p.status.unwrap().pod_ip.unwrap();
        assert!(ip.starts_with("127.") && ip != "127.0.0.1", "{ip}");
        let log = env.container_log(&ns, &name, "main");
        let want = format!(
            "name={name} ns={ns} ip={ip} node=weir-node pw=s3cr3t mode=fast app=web greeting=hi-{name}"
        );
        assert!(log.contains(&want), "log of {name} lacks {want:?}:\n{log}");
        assert!(log.contains("file=a: 1 user=weir"), "{log}");
        assert!(log.contains(&format!("host={name}")), "{log}");
        ips.push(ip);
    }
    assert_ne!(ips[0], ips[1], "pods share an address");

    // Pod names under the headless Service, and the Service name, resolve to the pods.
    for (i, ip) in ips.iter().enumerate() {
        let host = format!("web-{i}.web.{ns}.svc.cluster.local");
        let got = wait_for(&format!("{host} to resolve"), T, || async {
            let r = resolve(&host);
            (!r.is_empty()).then_some(r)
        })
        .await;
        assert_eq!(&got, &vec![ip.clone()], "{host}");
        // The process behind the name answers.
        assert!(weir_e2e::node::probe::http_ok(&host, 8080, "/").await, "GET http://{host}:8080/");
    }
    let svc = resolve(&format!("web.{ns}.svc.cluster.local"));
    assert!(!svc.is_empty() && svc.iter().all(|a| ips.contains(a)), "{svc:?} vs {ips:?}");

    // Scaling down deletes web-1 gracefully; its name stops resolving.
    let (ok, _, err) = env.kubectl(&["-n", &ns, "scale", "statefulset/web", "--replicas", "1"]);
    assert!(ok, "{err}");
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    wait_for("web-1 to be gone", T, || async {
        pods.get_opt("web-1").await.ok().flatten().is_none().then_some(())
    })
    .await;
    wait_for("web-1's name to be withdrawn", T, || async {
        resolve(&format!("web-1.web.{ns}.svc.cluster.local")).is_empty().then_some(())
    })
    .await;
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn deployment_pods_run_and_the_service_name_resolves() {
    let env = TestEnv::get().await;
    let ns = env.namespace("deploy").await;
    create::<Service>(
        &env,
        &ns,
        json!({"metadata": {"name": "api"}, "spec": {
        "selector": {"app": "api"}, "ports": [{"port": 9090, "targetPort": 9090}]}}),
    )
    .await;
    create::<Deployment>(&env, &ns, json!({"metadata": {"name": "api"}, "spec": {
        "replicas": 1, "selector": {"matchLabels": {"app": "api"}},
        "template": {"metadata": {"labels": {"app": "api"}}, "spec": {"containers": [{
            "name": "main", "image": "busybox",
            "command": ["python3", "-m", "http.server", "--bind", "$(POD_IP)", "9090"],
            "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
            "readinessProbe": {"tcpSocket": {"port": 9090}, "periodSeconds": 1},
        }]}},
    }})).await;
    let host = format!("api.{ns}.svc");
    wait_for(&format!("{host} to resolve"), T, || async {
        (!resolve(&host).is_empty()).then_some(())
    })
    .await;
    assert!(weir_e2e::node::probe::http_ok(&host, 9090, "/").await);
    let deployments: Api<Deployment> = Api::namespaced(env.client.clone(), &ns);
    wait_for("the deployment to report 1 available replica", T, || async {
        let d = deployments.get("api").await.ok()?;
        (d.status?.available_replicas? == 1).then_some(())
    })
    .await;
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn restart_policies_and_exit_codes() {
    let env = TestEnv::get().await;
    let ns = env.namespace("restart").await;
    create::<Pod>(&env, &ns, pod("never-fails", "Never", "echo bye; exit 3")).await;
    create::<Pod>(&env, &ns, pod("never-ok", "Never", "exit 0")).await;
    create::<Pod>(&env, &ns, pod("on-failure", "OnFailure", "echo attempt; exit 1")).await;
    create::<Pod>(&env, &ns, pod("always", "Always", "echo run; sleep 0.2")).await;

    let p = pod_where(&env, &ns, "never-fails", "Failed", |p| phase(p) == "Failed").await;
    let term = main_status(&p).state.unwrap().terminated.unwrap();
    assert_eq!(term.exit_code, 3);
    assert_eq!(term.reason.as_deref(), Some("Error"));
    assert_eq!(main_status(&p).restart_count, 0);
    assert!(env.container_log(&ns, "never-fails", "main").contains("bye"));

    let p = pod_where(&env, &ns, "never-ok", "Succeeded", |p| phase(p) == "Succeeded").await;
    assert_eq!(main_status(&p).state.unwrap().terminated.unwrap().exit_code, 0);

    let p = pod_where(&env, &ns, "on-failure", "restarted twice", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| c[0].restart_count >= 2)
    })
    .await;
    assert_eq!(phase(&p), "Running", "a restarting pod is Running");
    let last = main_status(&p).last_state.unwrap().terminated.unwrap();
    assert_eq!(last.exit_code, 1);
    assert!(env.container_log(&ns, "on-failure", "main").matches("attempt").count() >= 2);

    // Always restarts even a container that exits 0.
    pod_where(&env, &ns, "always", "restarted", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| c[0].restart_count >= 1)
    })
    .await;
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn deletion_is_graceful_then_forceful() {
    let env = TestEnv::get().await;
    let ns = env.namespace("delete").await;
    let pods: Api<Pod> = Api::namespaced(env.client.clone(), &ns);
    create::<Pod>(
        &env,
        &ns,
        pod(
            "polite",
            "Always",
            "trap 'echo got TERM; exit 0' TERM; echo started; while true; do sleep 0.1; done",
        ),
    )
    .await;
    let mut stubborn =
        pod("stubborn", "Always", "trap '' TERM; echo started; while true; do sleep 0.1; done");
    stubborn["spec"]["terminationGracePeriodSeconds"] = json!(2);
    create::<Pod>(&env, &ns, stubborn).await;
    for name in ["polite", "stubborn"] {
        pod_where(&env, &ns, name, "Running", |p| phase(p) == "Running").await;
        wait_for(&format!("{name} to start"), T, || async {
            env.container_log(&ns, name, "main").contains("started").then_some(())
        })
        .await;
    }
    pods.delete("polite", &DeleteParams::default()).await.unwrap();
    let t0 = Instant::now();
    pods.delete("stubborn", &DeleteParams::default()).await.unwrap();
    wait_for("polite to be gone", T, || async {
        pods.get_opt("polite").await.ok().flatten().is_none().then_some(())
    })
    .await;
    assert!(
        env.container_log(&ns, "polite", "main").contains("got TERM"),
        "TERM was not delivered"
    );
    wait_for("stubborn to be gone", T, || async {
        pods.get_opt("stubborn").await.ok().flatten().is_none().then_some(())
    })
    .await;
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900),
        "stubborn was killed before its grace period: {took:?}"
    );
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn probes_users_and_read_only_roots() {
    let env = TestEnv::get().await;
    let ns = env.namespace("probes").await;
    // A liveness probe that always fails gets the container restarted.
    let mut live = pod("liveness", "Always", "echo up; sleep 1000");
    live["spec"]["containers"][0]["livenessProbe"] =
        json!({"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 1});
    create::<Pod>(&env, &ns, live).await;
    // A readiness probe that fails keeps the pod unready while it runs.
    let mut unready = pod("unready", "Always", "sleep 1000");
    unready["spec"]["containers"][0]["readinessProbe"] =
        json!({"exec": {"command": ["false"]}, "periodSeconds": 1});
    create::<Pod>(&env, &ns, unready).await;
    // A read-only root file system refuses even root, who can write without it (control);
    // a non-root user writes to an emptyDir.
    let probe_file = format!("/var/tmp/weir-ro-probe-{ns}");
    let write =
        format!("(touch {probe_file} 2>/dev/null && echo root=writable) || echo root=readonly");
    let mut ro = pod("ro-root", "Never", &write);
    ro["spec"]["containers"][0]["securityContext"] = json!({"readOnlyRootFilesystem": true});
    create::<Pod>(&env, &ns, ro).await;
    let mut rw = pod("rw-root", "Never", &format!("{write}; rm -f {probe_file}"));
    rw["spec"]["containers"][0]["securityContext"] = json!({"readOnlyRootFilesystem": false});
    create::<Pod>(&env, &ns, rw).await;
    let mut locked = pod(
        "locked",
        "Never",
        "echo uid=$(id -u) gid=$(id -g); touch /data/ok && echo data=writable",
    );
    locked["spec"]["securityContext"] =
        json!({"runAsUser": 65534, "runAsGroup": 65534, "runAsNonRoot": true});
    locked["spec"]["containers"][0]["securityContext"] =
        json!({"readOnlyRootFilesystem": true, "allowPrivilegeEscalation": false});
    locked["spec"]["containers"][0]["volumeMounts"] =
        json!([{"name": "data", "mountPath": "/data"}]);
    locked["spec"]["volumes"] = json!([{"name": "data", "emptyDir": {}}]);
    create::<Pod>(&env, &ns, locked).await;
    // runAsNonRoot without a user is refused, as the kubelet refuses it.
    let mut rootish = pod("rootish", "Never", "echo should not run");
    rootish["spec"]["securityContext"] = json!({"runAsNonRoot": true});
    create::<Pod>(&env, &ns, rootish).await;

    pod_where(&env, &ns, "liveness", "restarted by its liveness probe", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .is_some_and(|c| c[0].restart_count >= 1)
    })
    .await;
    let p = pod_where(&env, &ns, "unready", "Running", |p| phase(p) == "Running").await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let p = Api::<Pod>::namespaced(env.client.clone(), &ns).get("unready").await.unwrap_or(p);
    assert!(!ready(&p), "a pod whose readiness probe fails is Ready");

    for name in ["ro-root", "rw-root", "locked"] {
        pod_where(&env, &ns, name, "Succeeded", |p| phase(p) == "Succeeded").await;
    }
    assert!(env.container_log(&ns, "ro-root", "main").contains("root=readonly"));
    assert!(env.container_log(&ns, "rw-root", "main").contains("root=writable"));
    let log = env.container_log(&ns, "locked", "main");
    assert!(log.contains("uid=65534 gid=65534"), "{log}");
    assert!(log.contains("data=writable"), "{log}");

    let p = pod_where(&env, &ns, "rootish", "refused", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c[0].state.as_ref()?.waiting.as_ref()?.reason.clone())
            .is_some_and(|r| r == "CreateContainerConfigError")
    })
    .await;
    let msg = main_status(&p).state.unwrap().waiting.unwrap().message.unwrap_or_default();
    assert!(msg.contains("runAsNonRoot"), "{msg}");
    assert!(env.container_log(&ns, "rootish", "main").is_empty());
    env.delete_namespace(&ns).await;
}

#[tokio::test]
async fn pods_reach_the_apiserver_with_their_service_account() {
    let env = TestEnv::get().await;
    let ns = env.namespace("incluster").await;
    let script = "d=/var/run/secrets/kubernetes.io/serviceaccount; echo ns=$(cat $d/namespace); \
                  curl -sS --cacert $d/ca.crt -H \"Authorization: Bearer $(cat $d/token)\" \
                  https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/apis/authentication.k8s.io/v1 \
                  -o /dev/null -w 'code=%{http_code}\\n'; \
                  curl -sS --cacert $d/ca.crt -H \"Authorization: Bearer $(cat $d/token)\" \
                  https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT/api/v1/namespaces/kube-system/secrets \
                  -o /dev/null -w 'secrets=%{http_code}\\n'";
    create::<Pod>(&env, &ns, pod("sa", "Never", script)).await;
    pod_where(&env, &ns, "sa", "Succeeded", |p| phase(p) == "Succeeded").await;
    let log = env.container_log(&ns, "sa", "main");
    assert!(log.contains(&format!("ns={ns}")), "{log}");
    // Authenticated (discovery is open to every authenticated user) ...
    assert!(log.contains("code=200"), "{log}");
    // ... and authorized by RBAC only for what it was granted: nothing.
    assert!(log.contains("secrets=403"), "{log}");
    env.delete_namespace(&ns).await;
}
