"""The chart with the real Helm v4 SDK: lint, render, and against the test apiserver, with
the controller it deploys run by the node agent: install, a job to Running, upgrade with new
values, uninstall; and that its RBAC cannot read Secrets where it has no business."""
import json
import os
import secrets
import sys
import time

import helm_python
import pytest
import yaml

from conftest import REPO, kubectl, kubectl_stdin

CHART = REPO / "charts" / "weir"
sys.path.insert(0, str(REPO / "charts"))
import render  # noqa: E402  (charts/render.py: the chart rendered as `make generate` does)

T = 240  # seconds a step may take


def objects(values=None, namespace="weir-system"):
    """The chart's objects as the SDK renders them, by (kind, namespace, name)."""
    return {(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
            for o in render.render(values, namespace=namespace)}


def kinds(objs):
    return sorted({k for k, _, _ in objs})


def container(objs, namespace="weir-system", name="weir-controller"):
    return objs[("Deployment", namespace, name)]["spec"]["template"]["spec"]["containers"][0]


def env_of(c):
    return {e["name"]: e.get("value") for e in c["env"]}


def test_chart_lints_without_errors():
    for values in ({}, {"watchNamespaces": ["a", "b"], "replicas": 2,
                        "metrics": {"serviceMonitor": {"enabled": True}},
                        "grafanaDashboard": {"enabled": True},
                        "networkPolicy": {"metricsFrom": [{"namespaceSelector": {}}]}},
                   {"networkPolicy": {"enabled": False}}):
        result = helm_python.lint(str(CHART), values, strict=True)
        assert result["errors"] == [], (values, result)
        # Only informational messages (severity 1) are allowed.
        assert all(m["severity"] <= 1 for m in result["messages"]), (values, result["messages"])


def test_default_values_render_a_cluster_wide_controller_with_secure_pods():
    objs = objects()
    assert kinds(objs) == ["ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                           "Deployment", "NetworkPolicy", "Service", "ServiceAccount"], kinds(objs)
    dep = objs[("Deployment", "weir-system", "weir-controller")]
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "weir-controller"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(objs)
    assert c["image"] == "ghcr.io/weir-dev/weir-controller:0.1.0"
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    # One replica: no leader election, every namespace.
    assert not any(a.startswith(("--leader-elect", "--namespace")) for a in c["args"]), c["args"]
    assert env_of(c)["WEIR_RUNTIME_IMAGE"] == "ghcr.io/weir-dev/weir:0.1.0"
    assert env_of(c)["WEIR_LOG_FORMAT"] == "json"
    svc = objs[("Service", "weir-system", "weir-controller-metrics")]
    assert svc["spec"]["ports"][0]["port"] == 8080
    binding = objs[("ClusterRoleBinding", None, "weir-controller")]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "weir-controller",
                                    "namespace": "weir-system"}]
    # Secrets are read by name only and created, never listed, watched or changed, anywhere
    # (the job's secret has a Secret of its own, created when missing, never patched).
    rules = objs[("ClusterRole", None, "weir-controller")]["rules"]
    secret_verbs = {v for r in rules if "secrets" in r["resources"] for v in r["verbs"]}
    assert secret_verbs == {"get", "create"}, rules
    assert not any("*" in r["verbs"] or "*" in r["resources"] for r in rules), rules
    # The jobs' NetworkPolicies: what the controller does with them, nothing more.
    netpol = [r for r in rules if "networkpolicies" in r["resources"]]
    assert netpol == [{"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"],
                       "verbs": ["list", "watch", "create", "patch", "delete"]}], rules
    # The controller's own pod: ingress to the metrics port only, from anywhere; egress open.
    np = objs[("NetworkPolicy", "weir-system", "weir-controller")]["spec"]
    assert np["podSelector"] == {"matchLabels": dep["spec"]["selector"]["matchLabels"]}, np
    assert np["policyTypes"] == ["Ingress"], np
    assert np["ingress"] == [{"ports": [{"port": 8080, "protocol": "TCP"}]}], np
    assert {"name": "metrics", "containerPort": 8080, "protocol": "TCP"} in c["ports"]
    # The controller knows its namespace (the namespace its jobs' policies let in).
    pod_namespace = [e for e in c["env"] if e["name"] == "POD_NAMESPACE"]
    assert pod_namespace == [{"name": "POD_NAMESPACE", "valueFrom": {
        "fieldRef": {"fieldPath": "metadata.namespace"}}}], c["env"]


def test_watch_namespaces_and_two_replicas_render_roles_and_leader_election():
    values = {"watchNamespaces": ["team-a", "team-b"], "replicas": 2, "logFormat": "text",
              "nodeSelector": {"disk": "ssd"},
              "tolerations": [{"key": "dedicated", "operator": "Exists"}],
              "metrics": {"serviceMonitor": {"enabled": True, "interval": "15s"}},
              "grafanaDashboard": {"enabled": True}}
    objs = objects(values, namespace="ops")
    # Nothing cluster-wide but the CRDs.
    assert not [k for k in objs if k[0] in ("ClusterRole", "ClusterRoleBinding")], kinds(objs)
    roles = sorted((ns, name) for kind, ns, name in objs if kind == "Role")
    assert roles == [("ops", "weir-controller-leader-election"), ("team-a", "weir-controller"),
                     ("team-b", "weir-controller")], roles
    for ns in ("team-a", "team-b"):
        subjects = objs[("RoleBinding", ns, "weir-controller")]["subjects"]
        assert subjects == [{"kind": "ServiceAccount", "name": "weir-controller",
                             "namespace": "ops"}]
    lease_rules = objs[("Role", "ops", "weir-controller-leader-election")]["rules"]
    assert lease_rules == [{"apiGroups": ["coordination.k8s.io"], "resources": ["leases"],
                            "verbs": ["get", "create", "patch"]}]
    dep = objs[("Deployment", "ops", "weir-controller")]
    assert dep["spec"]["replicas"] == 2
    pod = dep["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"disk": "ssd"}
    assert pod["tolerations"] == [{"key": "dedicated", "operator": "Exists"}]
    c = container(objs, namespace="ops")
    assert "--namespace=team-a" in c["args"] and "--namespace=team-b" in c["args"], c["args"]
    assert "--leader-elect" in c["args"] and "--lease-name=weir-controller" in c["args"]
    assert env_of(c)["WEIR_LOG_FORMAT"] == "text"
    sm = objs[("ServiceMonitor", "ops", "weir-controller")]
    assert sm["spec"]["endpoints"][0]["interval"] == "15s"
    assert sm["spec"]["endpoints"][0]["honorLabels"] is True, "the per-job labels win"
    dash = objs[("ConfigMap", "ops", "weir-dashboard")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    if (CHART / "dashboards" / "weir.json").exists():
        assert json.loads(dash["data"]["weir.json"])["title"], "the dashboard is valid JSON"


def test_the_controllers_network_policy_follows_its_values():
    values = {"metrics": {"port": 9090}, "networkPolicy": {"metricsFrom": [
        {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}]}}
    objs = objects(values, namespace="ops")
    np = objs[("NetworkPolicy", "ops", "weir-controller")]["spec"]
    assert np["ingress"] == [{
        "ports": [{"port": 9090, "protocol": "TCP"}],
        "from": [{"namespaceSelector": {
            "matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
    }], np
    assert "--metrics-addr=$(POD_IP):9090" in container(objs, namespace="ops")["args"]
    objs = objects({"networkPolicy": {"enabled": False}})
    assert "NetworkPolicy" not in kinds(objs), kinds(objs)


def test_bad_values_are_refused_by_the_chart_schema():
    for bad, field in (({"replicas": -1}, "replicas"), ({"logFormat": "xml"}, "logFormat"),
                       ({"watchNamespaces": "team-a"}, "watchNamespaces"),
                       ({"networkPolicy": {"enabled": "yes"}}, "networkPolicy")):
        with pytest.raises(helm_python.HelmError) as e:
            render.render(bad)
        assert field in str(e.value), (bad, str(e.value))


def test_install_yaml_is_the_chart_rendered_with_default_values():
    committed = (REPO / "manifests" / "install.yaml").read_text()
    docs = [d for d in yaml.safe_load_all(committed) if d]
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "weir-system"}}
    assert docs == [namespace] + render.render(), \
        "manifests/install.yaml is stale: run `make generate` and commit it"


# --- against the test environment ------------------------------------------------------------

def wait(what, f, timeout=T):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = f()
        if last:
            return last
        time.sleep(1)
    pytest.fail(f"timed out after {timeout} s waiting for {what} (last: {last!r})")


def get_json(kubeconfig, *args):
    out = kubectl(kubeconfig, *args, "-o", "json")
    return json.loads(out.stdout) if out.returncode == 0 else None


def example_job(namespace):
    """manifests/examples/wordcount.yaml as it is, with the test S3 server's endpoint and
    credentials (its checkpoints go to the chart's defaultCheckpointStorage), made unbounded
    (200 lines/s) so that it stays Running."""
    job = yaml.safe_load((REPO / "manifests" / "examples" / "wordcount.yaml").read_text())
    job["metadata"]["namespace"] = namespace
    job["spec"]["s3"] = {"endpoint": os.environ["AWS_ENDPOINT_URL"],
                         "region": os.environ["AWS_REGION"],
                         "credentialsSecret": {"name": "s3-credentials"}}
    source = job["spec"]["pipeline"]["operators"][0]
    source.pop("count")
    source["ratePerSecond"] = 200
    return job


@pytest.fixture
def jobs_namespace(kubeconfig):
    name = f"py-jobs-{secrets.token_hex(4)}"
    assert kubectl(kubeconfig, "create", "namespace", name).returncode == 0
    yield name
    kubectl(kubeconfig, "delete", "namespace", name, "--wait=false")


def controller_objects(kubeconfig, release, namespaces):
    """Every object of the release that is left, by kind/name."""
    selector = f"app.kubernetes.io/instance={release}"
    left = []
    for ns in namespaces:
        out = kubectl(kubeconfig, "-n", ns, "get",
                      "deployments,services,serviceaccounts,roles,rolebindings,configmaps,leases,"
                      "networkpolicies",
                      "-l", selector, "-o", "name")
        left += out.stdout.split()
    out = kubectl(kubeconfig, "get", "clusterroles,clusterrolebindings", "-l", selector,
                  "-o", "name")
    return left + out.stdout.split()


def test_installed_controller_runs_the_example_job_upgrades_and_uninstalls_cleanly(
        kubeconfig, namespace, jobs_namespace):
    release = "weir-it"
    ctl = f"{release}-controller"
    cfg = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    bucket = os.environ["WEIR_TEST_BUCKET"]
    values = {"watchNamespaces": [jobs_namespace], "pollInterval": "1s",
              "defaultCheckpointStorage": f"s3://{bucket}/{jobs_namespace}/default"}
    try:
        release_info = cfg.install(str(CHART), release, values, namespace=namespace,
                                   wait="watcher", timeout=T)
        assert release_info["status"] == "deployed", release_info
        status = cfg.status(release)
        assert status["revision"] == 1, status
        assert f"rollout status deployment/{ctl}" in status["notes"], status["notes"]
        assert jobs_namespace in status["notes"], status["notes"]
        for crd in ("streamjobs.weir.dev", "streamsnapshots.weir.dev"):
            out = kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s",
                          f"crd/{crd}")
            assert out.returncode == 0, out.stderr
        # The controller runs as the chart's ServiceAccount, in a pod of the node agent.
        pods = get_json(kubeconfig, "-n", namespace, "get", "pods", "-l",
                        f"app.kubernetes.io/instance={release}")
        assert [p["spec"]["serviceAccountName"] for p in pods["items"]] == [ctl], pods

        # The example job reaches Running, with a checkpoint, reconciled by that controller.
        kubectl(kubeconfig, "-n", jobs_namespace, "create", "secret", "generic", "s3-credentials",
                f"--from-literal=AWS_ACCESS_KEY_ID={os.environ['AWS_ACCESS_KEY_ID']}",
                f"--from-literal=AWS_SECRET_ACCESS_KEY={os.environ['AWS_SECRET_ACCESS_KEY']}")
        out = kubectl_stdin(kubeconfig, yaml.safe_dump(example_job(jobs_namespace)),
                            "apply", "-f", "-")
        assert out.returncode == 0, out.stderr

        def running_with_checkpoint():
            j = get_json(kubeconfig, "-n", jobs_namespace, "get", "streamjob", "wordcount")
            s = (j or {}).get("status", {})
            if s.get("phase") == "Running" and s.get("lastCheckpoint"):
                return s
            return None
        s = wait("the example job Running with a checkpoint", running_with_checkpoint)
        assert s["job"]["parallelism"] == 2, s
        assert s["lastCheckpoint"]["path"].startswith(values["defaultCheckpointStorage"]), s
        first_checkpoint = s["lastCheckpoint"]["id"]

        # helm upgrade with new values: two replicas elect a leader; the job runs on.
        values2 = {**values, "replicas": 2, "logLevel": "debug,kube=info", "logFormat": "text"}
        release_info = cfg.upgrade(str(CHART), release, values2, namespace=namespace,
                                   wait="watcher", timeout=T)
        assert release_info["status"] == "deployed", release_info
        assert cfg.status(release)["revision"] == 2
        dep = get_json(kubeconfig, "-n", namespace, "get", "deployment", ctl)
        assert dep["spec"]["replicas"] == 2
        args = dep["spec"]["template"]["spec"]["containers"][0]["args"]
        assert "--leader-elect" in args, args

        def leader():
            lease = get_json(kubeconfig, "-n", namespace, "get", "lease", ctl)
            return ((lease or {}).get("spec") or {}).get("holderIdentity")
        holder = wait("a leader among the upgraded replicas", leader)
        pod_names = {p["metadata"]["name"] for p in get_json(
            kubeconfig, "-n", namespace, "get", "pods", "-l",
            f"app.kubernetes.io/instance={release}")["items"]}
        assert holder in pod_names, (holder, pod_names)

        def checkpoints_go_on():
            s = running_with_checkpoint()
            return s if s and s["lastCheckpoint"]["id"] > first_checkpoint + 2 else None
        wait("the job checkpointing on under the upgraded controller", checkpoints_go_on)
    finally:
        cfg.uninstall(release, ignore_not_found=True, wait="watcher", timeout=T)

    # Uninstalled: nothing of the controller is left (the CRDs stay, as Helm keeps them, and
    # so do the StreamJobs and what they own).
    wait("the release's objects to go",
         lambda: controller_objects(kubeconfig, release, [namespace, jobs_namespace]) == [],
         timeout=60)
    out = kubectl(kubeconfig, "-n", namespace, "get", "secrets", "-l",
                  f"owner=helm,name={release}", "-o", "name")
    assert out.stdout.strip() == "", out.stdout
    assert kubectl(kubeconfig, "get", "crd", "streamjobs.weir.dev").returncode == 0
    cfg.close()


def can(kubeconfig, sa, *args):
    out = kubectl(kubeconfig, "auth", "can-i", *args, f"--as={sa}")
    return out.stdout.strip() == "yes"


def test_the_controller_cannot_read_secrets_outside_the_namespaces_it_runs(
        kubeconfig, namespace, jobs_namespace):
    release = "weir-rbac"
    other = f"py-other-{secrets.token_hex(4)}"
    assert kubectl(kubeconfig, "create", "namespace", other).returncode == 0
    cfg = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    sa = f"system:serviceaccount:{namespace}:{release}-controller"
    try:
        cfg.install(str(CHART), release, {"watchNamespaces": [jobs_namespace], "replicas": 0},
                    namespace=namespace, timeout=T)
        for ns in (jobs_namespace, other):
            out = kubectl(kubeconfig, "-n", ns, "create", "secret", "generic", "canary",
                          "--from-literal=key=not-for-the-controller")
            assert out.returncode == 0, out.stderr
        # In its namespace: a named Secret, nothing more.
        assert can(kubeconfig, sa, "get", "secret/canary", "-n", jobs_namespace)
        assert not can(kubeconfig, sa, "list", "secrets", "-n", jobs_namespace)
        assert not can(kubeconfig, sa, "watch", "secrets", "-n", jobs_namespace)
        for verb in ("patch", "update", "delete"):
            assert not can(kubeconfig, sa, verb, "secret/canary", "-n", jobs_namespace), verb
        # Anywhere else, not even that: the other namespace, its own, kube-system.
        for ns in (other, namespace, "kube-system", "default"):
            assert not can(kubeconfig, sa, "get", "secret/canary", "-n", ns), ns
        # And the real request, as the ServiceAccount, is refused by the apiserver.
        out = kubectl(kubeconfig, "-n", other, "get", "secret", "canary", f"--as={sa}")
        assert out.returncode != 0 and "forbidden" in out.stderr.lower(), out
        out = kubectl(kubeconfig, "-n", jobs_namespace, "get", "secret", "canary", f"--as={sa}",
                      "-o", "jsonpath={.metadata.name}")
        assert out.returncode == 0 and out.stdout == "canary", out
        # Nothing cluster-wide: no StreamJobs elsewhere, no nodes, no pods.
        assert not can(kubeconfig, sa, "list", "streamjobs.weir.dev", "--all-namespaces")
        assert not can(kubeconfig, sa, "list", "pods", "-n", jobs_namespace)
        assert not can(kubeconfig, sa, "get", "nodes")
    finally:
        cfg.uninstall(release, ignore_not_found=True)
        cfg.close()
        kubectl(kubeconfig, "delete", "namespace", other, "--wait=false")


def test_cluster_wide_the_controller_reads_secrets_by_name_only(kubeconfig, namespace):
    release = "weir-cluster"
    cfg = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    sa = f"system:serviceaccount:{namespace}:{release}-controller"
    try:
        # replicas 0: only the RBAC matters here (a running cluster-wide controller would
        # take on the jobs of other tests).
        cfg.install(str(CHART), release, {"replicas": 0}, namespace=namespace, timeout=T)
        assert can(kubeconfig, sa, "get", "secret/anything", "-n", "default")
        assert not can(kubeconfig, sa, "list", "secrets", "--all-namespaces")
        assert not can(kubeconfig, sa, "watch", "secrets", "-n", "default")
        assert not can(kubeconfig, sa, "update", "secrets", "-n", "default")
        assert not can(kubeconfig, sa, "patch", "secrets", "-n", "default")
        assert not can(kubeconfig, sa, "delete", "secrets", "-n", "default")
        assert can(kubeconfig, sa, "list", "streamjobs.weir.dev", "--all-namespaces")
        # No leader election with one replica or none: no Lease rights.
        assert not can(kubeconfig, sa, "create", "leases.coordination.k8s.io", "-n", namespace)
    finally:
        cfg.uninstall(release, ignore_not_found=True)
        cfg.close()
