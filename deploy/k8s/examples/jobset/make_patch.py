"""Write sidecar-patch.yaml: the sidecar component's Job patch (components/sidecar/job-patch.yaml) as the
JSON patch a JobSet needs (kustomize cannot merge a custom resource's lists by name). Run after editing
the component; tests/integration/test_k8s.py checks the committed file is current.

    python deploy/k8s/examples/jobset/make_patch.py > deploy/k8s/examples/jobset/sidecar-patch.yaml
"""

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
COMPONENT = HERE.parent.parent / "components/sidecar/job-patch.yaml"
POD = "/spec/replicatedJobs/0/template/spec/template"  # the first replicated job's pod template


def render() -> str:
    pod = yaml.safe_load(COMPONENT.read_text())["spec"]["template"]
    ops = [{"op": "add", "path": f"{POD}/metadata", "value": pod["metadata"]},
           {"op": "add", "path": f"{POD}/spec/initContainers", "value": pod["spec"]["initContainers"]},
           {"op": "add", "path": f"{POD}/spec/volumes", "value": pod["spec"]["volumes"]}]
    return ("# Generated from deploy/k8s/components/sidecar/job-patch.yaml by make_patch.py: edit that file.\n"
            "# A JobSet whose pod template already has metadata, initContainers or volumes needs ops that append\n"
            "# to them instead (path .../initContainers/-).\n" + yaml.safe_dump(ops, sort_keys=False))


if __name__ == "__main__":
    sys.stdout.write(render())
