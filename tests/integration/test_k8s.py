"""The collector's image (deploy/Dockerfile) and Kubernetes manifests (deploy/k8s): kustomize renders
them, every resource validates against the Kubernetes API schema, and what the container runs agrees
with the collector itself — its command line and config parse with the collector's own parser, the
ports, the state directory and the user line up, and the Prometheus Operator gets the one rules file.

No Docker engine runs here, so the image is not built: its command and ports are checked instead."""

from __future__ import annotations

import argparse
import base64
import functools
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

import pytest
import yaml
from to_prometheusrule import RULES, render  # deploy/prometheus (pytest's pythonpath)

from grokwatch.cli import build_parser, config_from_args
from grokwatch.collector.service import worst_case_memory_mb

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy/k8s"
DOCKERFILE = ROOT / "deploy/Dockerfile"
KUBERNETES = "1.30.0"  # the oldest Kubernetes the manifests are checked against (internalTrafficPolicy: 1.26)



@functools.lru_cache(maxsize=1)
def keyed_tree() -> Path:
    """A copy of deploy/k8s with the DaemonSet's CURVE keys made, as ``make k8s-keys`` does (the keys are
    never committed: the tree as committed does not render its base)."""
    from grokwatch.keys import generate

    tree = Path(tempfile.mkdtemp(prefix="gw-k8s-")) / "k8s"
    shutil.copytree(K8S, tree, ignore=shutil.ignore_patterns("curve"))
    for name in ("collector", "agent"):
        generate(str(tree / "base" / "curve"), name)
    return tree


def kustomize(overlay: str, tree: Optional[Path] = None) -> list[dict]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with its kustomize) is not installed")
    out = subprocess.run([kubectl, "kustomize", str((tree or keyed_tree()) / overlay)], capture_output=True,
                         text=True)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def by_kind(docs: list[dict]) -> dict[str, dict]:
    """One resource of each kind (the Grafana dashboard's ConfigMap aside: ``dashboard()``)."""
    kinds = {}
    for doc in docs:
        if doc["kind"] == "ConfigMap" and doc["metadata"]["name"] == "grokwatch-dashboard":
            continue
        assert doc["kind"] not in kinds, f"two {doc['kind']}s"
        kinds[doc["kind"]] = doc
    return kinds


def collector_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["collector", *argv])


def validate(doc: dict) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if doc["kind"] == "JobSet":  # a custom resource: its pod templates against the Pod schema
        for job in doc["spec"]["replicatedJobs"]:
            template = job["template"]["spec"]["template"]
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Pod", "metadata": template.get("metadata", {}),
                                          "spec": template["spec"]}, KUBERNETES, strict=True)
        return
    kubernetes_validate.validate(doc, KUBERNETES, strict=True)


@pytest.mark.parametrize("overlay", ["base", "overlays/prometheus-operator"])
def test_the_manifests_render_and_validate_against_the_kubernetes_schema(overlay):
    pytest.importorskip("kubernetes_validate")
    docs = kustomize(overlay)
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            continue  # the operator's CRDs: checked below
        validate(doc)  # strict: an unknown or misspelt field is an error, not silently dropped by the API server
    kinds = {doc["kind"] for doc in docs}
    assert {"Namespace", "ConfigMap", "Service", "DaemonSet", "NetworkPolicy"} <= kinds
    assert ({"PodMonitor", "PrometheusRule"} <= kinds) == (overlay != "base")


CURVE_MOUNT = "/etc/grokwatch-curve"


def materialize_secret(pod: dict, secret: dict, where: Path) -> Path:
    """Write the Secret's data as the pod's secret volume lays it out (its items' paths); returns the folder
    standing for the volume's mount."""
    [container] = pod["spec"]["containers"]
    [mount] = [m for m in container["volumeMounts"] if m["mountPath"] == CURVE_MOUNT]
    [volume] = [v for v in pod["spec"]["volumes"] if v["name"] == mount["name"]]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    root = where / "curve-volume"
    for item in volume["secret"]["items"]:
        path = root / item["path"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(secret["data"][item["key"]]))
    return root


def test_the_daemonset_is_closed_by_default_curve_keys_from_a_generated_secret(tmp_path):
    """Issue 34: the shipped DaemonSet admitted anyone its NetworkPolicy admitted (4 of 7 spoofing attacks
    worked). Its collector now requires CURVE, from a Secret made of `make k8s-keys`' files; without them
    the base does not render."""
    kinds = by_kind(kustomize("base"))
    pod = kinds["DaemonSet"]["spec"]["template"]
    [(filename, toml)] = kinds["ConfigMap"]["data"].items()
    assert f'curve_secret_key = "{CURVE_MOUNT}/' in toml and f'curve_allowed_clients = "{CURVE_MOUNT}/' in toml
    curve_dir = materialize_secret(pod, kinds["Secret"], tmp_path)
    (tmp_path / filename).write_text(toml.replace(CURVE_MOUNT, str(curve_dir)))
    config = config_from_args(collector_args(["--config", str(tmp_path / filename)]), environ={})
    assert config.curve_secret_key and config.curve_allowed_clients  # the collector refuses plain clients
    assert [p.name for p in Path(config.curve_allowed_clients).iterdir()] == ["agent.key"]
    # The keys are never committed, and the tree as committed does not render the base.
    assert subprocess.run(["git", "check-ignore", "-q", "deploy/k8s/base/curve/collector.key_secret"],
                          cwd=ROOT).returncode == 0
    bare = Path(tempfile.mkdtemp(prefix="gw-k8s-bare-")) / "k8s"
    shutil.copytree(K8S, bare, ignore=shutil.ignore_patterns("curve"))
    kubectl = shutil.which("kubectl") or "kubectl"
    out = subprocess.run([kubectl, "kustomize", str(bare / "base")], capture_output=True, text=True)
    assert out.returncode != 0 and "curve" in out.stderr
    # The agent's side: the example Job mounts its Secret where its variables point, under the names the
    # documented `kubectl create secret --from-file` gives the keys.
    [job] = [d for d in kustomize("examples/agent-curve") if d["kind"] == "Job"]
    validate(job)
    spec = job["spec"]["template"]["spec"]
    [trainer] = spec["containers"]
    env = {e["name"]: e["value"] for e in trainer["env"]}
    [mount] = trainer["volumeMounts"]
    [volume] = spec["volumes"]
    assert mount["name"] == volume["name"] and volume["secret"]["secretName"] == "grokwatch-agent-curve"
    assert env["GROKWATCH_CURVE_SERVER_KEY"] == f"{mount['mountPath']}/collector.key"
    assert env["GROKWATCH_CURVE_SECRET_KEY"] == f"{mount['mountPath']}/agent.key_secret"
    assert env["GROKWATCH_ENDPOINT"].startswith("tcp://grokwatch-collector.grokwatch.svc:")


def mebibytes(quantity: str) -> int:
    units = {"Ki": 2**-10, "Mi": 1, "Gi": 2**10}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return int(float(quantity[: -len(suffix)]) * factor)
    return int(quantity) // 2**20


def test_the_daemonset_runs_the_collector_as_its_config_says(tmp_path):
    kinds = by_kind(kustomize("base"))
    daemonset, service, configmap = kinds["DaemonSet"], kinds["Service"], kinds["ConfigMap"]
    pod = daemonset["spec"]["template"]
    [container] = pod["spec"]["containers"]
    # The config file the ConfigMap mounts is valid for the collector (its own --check-config), with the
    # CURVE Secret's files where the volume puts them (here under tmp_path).
    [(filename, toml)] = configmap["data"].items()
    curve_dir = materialize_secret(pod, kinds["Secret"], tmp_path)
    toml = toml.replace(CURVE_MOUNT, str(curve_dir))
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
    # The worst case of its config fits the container's memory limit (else it refuses to start).
    assert worst_case_memory_mb(config_from_args(args, environ={})) <= mebibytes(
        container["resources"]["limits"]["memory"])
    env = {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}  # not the downward API's
    config = config_from_args(args, environ=env)
    # the OTLP resource names the pod (downward API): a DaemonSet's collectors never merge in a backend
    downward = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"] if "valueFrom" in e}
    assert downward["POD_NAME"] == "metadata.name"
    assert "service.instance.id=$(POD_NAME)" in env["OTEL_RESOURCE_ATTRIBUTES"]
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
    # The kernels are compiled when the image is built, into the cache the collector seeds Numba's from.
    env = dict(re.findall(r"(\w+)=(\S+)", last["ENV"]))
    assert f"NUMBA_CACHE_DIR={env['GROKWATCH_KERNEL_CACHE']}" in runs and "warmup.warm_up()" in runs
    # The user the image runs as is the one the DaemonSet asks for.
    daemonset = by_kind(kustomize("base"))["DaemonSet"]
    assert int(last["USER"]) == daemonset["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    # Only the package enters the build context (no .venv): every folder pyproject installs is let in.
    ignore = (ROOT / "deploy/Dockerfile.dockerignore").read_text().split()
    package_dirs = re.search(r"package-dir = \{([^}]*)\}", (ROOT / "pyproject.toml").read_text()).group(1)
    for folder in set(re.findall(r'= "(\w+)"', package_dirs)):
        assert f"!{folder}" in ignore
        assert f"COPY {folder} {folder}" in DOCKERFILE.read_text()


# ------------------------------------------------------------------ the native sidecar (docs/deploy.md)


def pod_templates(doc: dict) -> list[dict]:
    if doc["kind"] == "JobSet":
        return [job["template"]["spec"]["template"] for job in doc["spec"]["replicatedJobs"]]
    return [doc["spec"]["template"]]


@pytest.mark.parametrize("example, workload", [("examples/job", "Job"), ("examples/jobset", "JobSet")])
def test_the_sidecar_goes_beside_the_training_containers_on_loopback(example, workload, tmp_path):
    docs = kustomize(example)
    for doc in docs:
        if not doc["apiVersion"].startswith("monitoring.coreos.com/"):
            validate(doc)
    kinds = by_kind(docs)
    [pod] = pod_templates(kinds[workload])
    [sidecar] = pod["spec"]["initContainers"]
    assert sidecar["restartPolicy"] == "Always"  # a native sidecar: it does not hold the Job open
    assert [c["name"] for c in pod["spec"]["containers"]] == ["trainer"]  # the user's containers, untouched
    assert sidecar["image"] == "grokwatch-collector:0.1.0"
    # Its config: ingest on loopback only (what the agent's default endpoint reaches), /metrics for Prometheus.
    configmap = kinds["ConfigMap"]
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    [config_mount] = [m for m in sidecar["volumeMounts"] if "configMap" in volumes[m["name"]]]
    assert volumes[config_mount["name"]]["configMap"]["name"] == configmap["metadata"]["name"]  # the hashed name
    [(filename, toml)] = configmap["data"].items()
    (tmp_path / filename).write_text(toml)
    args = collector_args(sidecar["args"])
    assert Path(args.config) == Path(config_mount["mountPath"]) / filename
    args.config = str(tmp_path / filename)
    config = config_from_args(args, environ={})
    from grokwatch.agent.config import DEFAULT_ENDPOINT

    assert list(config.listen) == [DEFAULT_ENDPOINT] and urlparse(DEFAULT_ENDPOINT).hostname == "127.0.0.1"
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    assert list(ports.values()) == [config.metrics_port]
    assert sidecar["startupProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert sidecar["resources"]["limits"]["cpu"] and sidecar["resources"]["limits"]["memory"]
    # Its worst case fits its limit (else the collector refuses to start: check_memory).
    assert worst_case_memory_mb(config) <= mebibytes(sidecar["resources"]["limits"]["memory"])
    writable = [Path(m["mountPath"]) for m in sidecar["volumeMounts"] if not m.get("readOnly")]
    for path in (config.state_dir, {e["name"]: e["value"] for e in sidecar["env"]}["NUMBA_CACHE_DIR"]):
        assert any(Path(path).is_relative_to(w) for w in writable), path
    # The PodMonitor scrapes exactly the patched pods, on the sidecar's port.
    monitor = kinds["PodMonitor"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


def test_the_jobset_patch_is_the_components_job_patch():
    from make_patch import render as render_patch  # deploy/k8s/examples/jobset (pytest's pythonpath)

    assert (K8S / "examples/jobset/sidecar-patch.yaml").read_text() == render_patch(), "stale: run make k8s-rules"


def test_the_daemonset_pods_get_no_token_and_a_network_policy_admits_only_agents_and_prometheus():
    kinds = by_kind(kustomize("base"))
    pod = kinds["DaemonSet"]["spec"]["template"]
    assert pod["spec"]["automountServiceAccountToken"] is False
    [container] = pod["spec"]["containers"]
    assert container["resources"]["limits"]["cpu"]
    assert container["startupProbe"]["httpGet"]["path"] == "/readyz"
    policy = kinds["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    port_names = {p["name"] for p in container["ports"]}
    rules = {rule["ports"][0]["port"]: rule["from"] for rule in policy["ingress"]}
    assert set(rules) == port_names == {"ingest", "metrics"}
    # Exactly the training namespaces (no podSelector: kustomize's labels would rewrite it to the collector's own).
    assert rules["ingest"] == [{"namespaceSelector": {"matchLabels": {"grokwatch.io/agents": "true"}}}]
    assert rules["metrics"][0]["namespaceSelector"]["matchLabels"]


def test_the_operator_objects_carry_the_release_label_and_the_dashboard_ships_for_grafanas_sidecar():
    docs = kustomize("overlays/prometheus-operator")
    kinds = by_kind(docs)
    for kind in ("PodMonitor", "PrometheusRule"):
        assert kinds[kind]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    [dashboard] = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "grokwatch-dashboard"]
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    import json

    source = (ROOT / "grafana/dashboards/grokwatch.json").read_text()
    assert json.loads(dashboard["data"]["grokwatch-dashboard.json"]) == json.loads(source)
    assert (K8S / "overlays/prometheus-operator/grokwatch-dashboard.json").read_text() == source, \
        "stale: run make k8s-rules"
