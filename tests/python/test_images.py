"""The container images agree with what runs them: the chart's default images are the ones
`make images` tags, each image's entrypoint is the binary its name says (what the test node
runs for it too), and both run as the user the pods' securityContext names."""
import re
import subprocess

import yaml

from conftest import REPO




def final_stage(dockerfile):
    text = (REPO / dockerfile).read_text()
    return text[text.rindex("\nFROM "):]


def make_images_commands():
    out = subprocess.run(["make", "-n", "images", "ENGINE=docker"], cwd=REPO, text=True,
                         capture_output=True, check=True).stdout
    return dict(re.findall(r"build -f (\S+) -t (\S+) \.", out))


def test_make_images_tags_what_the_chart_deploys():
    chart = yaml.safe_load((REPO / "charts/weir/Chart.yaml").read_text())
    values = yaml.safe_load((REPO / "charts/weir/values.yaml").read_text())
    tags = make_images_commands()
    app = chart["appVersion"]
    assert tags["Dockerfile.controller"] == f"{values['image']['repository']}:{app}", tags
    # The runtime image the chart gives the controller by default (templates/_helpers.tpl).
    helpers = (REPO / "charts/weir/templates/_helpers.tpl").read_text()
    default_runtime = re.search(r'printf "([^"]+):%s" \.Chart\.AppVersion\) \.Values\.runtimeImage',
                                helpers).group(1)
    assert tags["Dockerfile.runtime"] == f"{default_runtime}:{app}", tags


def test_images_run_their_binary_as_the_non_root_user_of_the_pods():
    build_rs = (REPO / "controller/src/build.rs").read_text()
    runtime_uid = re.search(r"const RUNTIME_UID: i64 = (\d+);", build_rs).group(1)
    chart = (REPO / "charts/weir/templates/deployment.yaml").read_text()
    chart_uid = re.search(r"runAsUser: (\d+)", chart).group(1)
    for dockerfile, binary, uid in (("Dockerfile.controller", "weir-controller", chart_uid),
                                    ("Dockerfile.runtime", "weir", runtime_uid)):
        stage = final_stage(dockerfile)
        assert f"USER {uid}:{uid}" in stage, (dockerfile, stage)
        assert f'ENTRYPOINT ["/usr/local/bin/{binary}"]' in stage, (dockerfile, stage)
        assert "nonroot" in stage.splitlines()[1], stage
        # The binary is built from this workspace, by its package's bin name.
        text = (REPO / dockerfile).read_text()
        assert f"--bin {binary} " in text, dockerfile
