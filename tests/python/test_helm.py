"""The chart with the real Helm v4 SDK against the test apiserver."""
import helm_python

from conftest import REPO, kubectl

CHART = REPO / "charts" / "weir"


def test_chart_lints_without_errors():
    result = helm_python.lint(str(CHART), strict=True)
    assert result["errors"] == [], result
    # Only informational messages (severity 1) are allowed.
    assert all(m["severity"] <= 1 for m in result["messages"]), result["messages"]


def test_chart_installs_the_crds_and_uninstalls(kubeconfig, namespace):
    cfg = helm_python.Config(kubeconfig_path=kubeconfig, namespace=namespace)
    try:
        release = cfg.install(str(CHART), "weir", namespace=namespace, wait="watcher", timeout=120)
        assert release["status"] == "deployed", release
        assert release["chart_name"] == "weir", release
        status = cfg.status("weir")
        assert status["status"] == "deployed" and status["revision"] == 1, status
        for crd in ("streamjobs.weir.dev", "streamsnapshots.weir.dev"):
            out = kubectl(kubeconfig, "wait", "--for=condition=Established", "--timeout=60s", f"crd/{crd}")
            assert out.returncode == 0, out.stderr
        # The release is recorded where Helm records it.
        out = kubectl(kubeconfig, "-n", namespace, "get", "secrets", "-l", "owner=helm,name=weir", "-o", "name")
        assert "sh.helm.release.v1.weir.v1" in out.stdout, out
        # The rendered notes tell the user what to do next.
        assert "kubectl get sj" in status["notes"], status
    finally:
        cfg.uninstall("weir", ignore_not_found=True)
    out = kubectl(kubeconfig, "-n", namespace, "get", "secrets", "-l", "owner=helm,name=weir", "-o", "name")
    assert out.stdout.strip() == "", out.stdout
    cfg.close()
