"""The collector's image (deploy/Dockerfile) and Kubernetes manifests (deploy/k8s): kustomize renders
them, every resource validates against the Kubernetes API schema, and what the container runs agrees
with the collector itself — its command line and config parse with the collector's own parser, the
ports, the state directory and the user line up, and the Prometheus Operator gets the one rules file.

No Docker engine runs here, so the image is not built: its command and ports are checked instead."""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from grokwatch.cli import build_parser
from grokwatch.collector.service import config_from_args

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
DOCKERFILE = ROOT / "deploy/Dockerfile"
KUBERNETES = "1.30.0"  # the oldest Kubernetes the manifests are checked against (internalTrafficPolicy: 1.26)

sys.path.insert(0, str(ROOT / "deploy/prometheus"))
from to_prometheusrule import RULES, render  # noqa: E402


def kustomize(overlay: str) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str(K8S / overlay)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    kinds = {}
    for doc in docs:
        assert doc["kind"] not in kinds, f"two {doc['kind']}s"
        kinds[doc["kind"]] = doc
    return kinds


def collector_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["collector", *argv])


@pytest.mark.parametrize("overlay", ["base", "overlays/prometheus-operator"])
def test_the_manifests_render_and_validate_against_the_kubernetes_schema(overlay):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = kustomize(overlay)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the operator's CRDs: checked below
        # strict: an unknown or misspelt field is an error, not silently dropped by the API server
        kubernetes_validate.validate(doc, KUBERNETES, strict=True)
    kinds = {doc["kind"] for doc in docs}
    assert {"Namespace", "ConfigMap", "Service", "DaemonSet"} <= kinds
    assert ({"PodMonitor", "PrometheusRule"} <= kinds) == (overlay != "base")


def test_the_daemonset_runs_the_collector_as_its_config_says(tmp_path):
    kinds = by_kind(kustomize("base"))
    daemonset, service, configmap = kinds["DaemonSet"], kinds["Service"], kinds["ConfigMap"]
    pod = daemonset["spec"]["template"]
    [container] = pod["spec"]["containers"]
    # The config file the ConfigMap mounts is valid for the collector (its own --check-config).
    [(filename, toml)] = configmap["data"].items()
    (tmp_path / filename).write_text(toml)
    check = subprocess.run([sys.executable, "-m", "grokwatch.cli", "collector", "--check-config",
                            str(tmp_path / filename)], capture_output=True, text=True)
    assert check.returncode == 0 and check.stdout.strip().endswith(": ok"), check.stdout + check.stderr
    # What the container runs: its args, with the config file where the volume puts it.
    mounts = {m["name"]: m for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    [config_mount] = [m for m in mounts.values() if "configMap" in volumes[m["name"]]]
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]
    args = collector_args(container["args"])
    assert Path(args.config).parent == Path(config_mount["mountPath"]) and Path(args.config).name == filename
    args.config = str(tmp_path / filename)
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    config = config_from_args(args, environ=env)
    # Ports: the agents' Service reaches the port the collector binds; Prometheus finds /metrics.
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    [listen] = config.listen
    endpoint = urlparse(listen)
    assert endpoint.scheme == "tcp" and endpoint.hostname == "0.0.0.0"  # reachable from other pods
    assert ports["ingest"] == endpoint.port
    assert ports["metrics"] == config.metrics_port and config.metrics_addr == "0.0.0.0"
    annotations = pod["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(config.metrics_port)
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["port"] == "metrics"
    [svc_port] = service["spec"]["ports"]
    assert svc_port["targetPort"] == "ingest" and svc_port["protocol"] == "TCP"
    # One collector per node: each training pod reaches its own node's collector.
    assert service["spec"]["internalTrafficPolicy"] == "Local"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # A read-only root: the state directory and Numba's cache are on writable volumes.
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    writable = [Path(m["mountPath"]) for m in mounts.values() if not m.get("readOnly")]
    for path in (config.state_dir, env["NUMBA_CACHE_DIR"]):
        assert any(Path(path).is_relative_to(w) for w in writable), path


def test_the_operator_overlay_scrapes_under_the_rules_job_name_and_carries_the_one_rules_file():
    kinds = by_kind(kustomize("overlays/prometheus-operator"))
    pod = kinds["DaemonSet"]["spec"]["template"]
    monitor, rule = kinds["PodMonitor"], kinds["PrometheusRule"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [endpoint] = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] in {p["name"] for c in pod["spec"]["containers"] for p in c["ports"]}
    # GrokwatchCollectorDown looks for up{job="grokwatch"}.
    assert {"action": "replace", "targetLabel": "job", "replacement": "grokwatch"} in endpoint["relabelings"]
    assert 'up{job="grokwatch"}' in RULES.read_text()
    assert rule["spec"] == yaml.safe_load(RULES.read_text())
    committed = K8S / "overlays/prometheus-operator/prometheusrule.yaml"
    assert committed.read_text() == render(RULES.read_text()), "stale: run make k8s-rules"


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [tuple(line.split(None, 1)) for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_image_runs_the_collector_as_the_manifests_expect():
    instructions = dockerfile_instructions()
    final = instructions[max(i for i, (op, _) in enumerate(instructions) if op == "FROM"):]
    last = {op: arg for op, arg in final}
    entrypoint, cmd = yaml.safe_load(last["ENTRYPOINT"]), yaml.safe_load(last["CMD"])  # JSON arrays
    assert entrypoint == ["grokwatch", "collector"]
    config = config_from_args(collector_args(cmd), environ={})
    assert {int(p) for p in last["EXPOSE"].split()} == {urlparse(config.listen[0]).port, config.metrics_port}
    assert config.state_dir == last["VOLUME"]
    # The sidecar image carries the collector extra only: no torch.
    installs = [shlex.split(arg) for op, arg in final if op == "RUN" and "pip install" in arg]
    assert any('grokwatch[collector]' in words for words in installs), installs
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "torch" not in runs and not re.search(r"\[[^]]*(agent|hf)", runs), runs
    # The user the image runs as is the one the DaemonSet asks for.
    daemonset = by_kind(kustomize("base"))["DaemonSet"]
    assert int(last["USER"]) == daemonset["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    # Only the package enters the build context (no .venv): every folder pyproject installs is let in.
    ignore = (ROOT / "deploy/Dockerfile.dockerignore").read_text().split()
    package_dirs = re.search(r"package-dir = \{([^}]*)\}", (ROOT / "pyproject.toml").read_text()).group(1)
    for folder in set(re.findall(r'= "(\w+)"', package_dirs)):
        assert f"!{folder}" in ignore
        assert f"COPY {folder} {folder}" in DOCKERFILE.read_text()
