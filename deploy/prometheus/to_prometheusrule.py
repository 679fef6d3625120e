"""Print deploy/prometheus/rules/grokwatch.rules.yml as a PrometheusRule, the Prometheus Operator's
resource (deploy/k8s/overlays/prometheus-operator/prometheusrule.yaml): `make k8s-rules`.
The rules file stays the one source; tests/integration/test_deploy.py checks the output is current."""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

RULES = Path(__file__).resolve().parent / "rules" / "grokwatch.rules.yml"
HEADER = ("# Generated from deploy/prometheus/rules/grokwatch.rules.yml by `make k8s-rules`: edit that file,\n"
          "# not this one.\n")


class _Dumper(yaml.SafeDumper):
    pass


def _str(dumper: yaml.SafeDumper, value: str):
    # Multi-line PromQL and descriptions stay readable blocks.
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_Dumper.add_representer(str, _str)


def render(rules_text: str) -> str:
    resource = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {"name": "grokwatch", "namespace": "grokwatch",
                     "labels": {"app.kubernetes.io/part-of": "grokwatch"}},
        "spec": yaml.safe_load(rules_text),
    }
    return HEADER + yaml.dump(resource, Dumper=_Dumper, sort_keys=False, width=120, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render(RULES.read_text()))
