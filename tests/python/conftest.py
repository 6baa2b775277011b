"""Shared fixtures: the test environment that `make env-up` started (settings from env.sh)."""
import os
import pathlib
import secrets
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]


def setting(name: str) -> str:
    value = os.environ.get(name)
    if not value:
        pytest.fail(
            f"{name} is not set: these tests run against the test environment. "
            "Run `make e2e`, or `make env-up` and `source target/testenv/env.sh` first."
        )
    return value


@pytest.fixture
def kubeconfig() -> str:
    return setting("KUBECONFIG")


@pytest.fixture
def namespace(kubeconfig):
    name = f"py-{secrets.token_hex(4)}"
    subprocess.run(["kubectl", "create", "namespace", name], check=True, capture_output=True,
                   env={**os.environ, "KUBECONFIG": kubeconfig})
    yield name
    subprocess.run(["kubectl", "delete", "namespace", name, "--wait=false"], capture_output=True,
                   env={**os.environ, "KUBECONFIG": kubeconfig})


def kubectl(kubeconfig: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True,
                          env={**os.environ, "KUBECONFIG": kubeconfig})


def kubectl_stdin(kubeconfig: str, stdin: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["kubectl", *args], capture_output=True, text=True, input=stdin,
                          env={**os.environ, "KUBECONFIG": kubeconfig})
