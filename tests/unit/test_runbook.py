"""Every alert links to its runbook entry, and the entry exists (docs/runbook.md)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
URL = "https://github.com/grokwatch/grokwatch/blob/main/docs/runbook.md#"


def test_every_alert_has_a_runbook_url_to_an_existing_entry():
    rules = yaml.safe_load((ROOT / "deploy/prometheus/rules/grokwatch.rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    anchors = {h.strip().lower() for h in re.findall(r"^## (\w+)\s*$", (ROOT / "docs/runbook.md").read_text(), re.M)}
    assert len(alerts) >= 16
    for rule in alerts:
        url = rule["annotations"].get("runbook_url", "")
        assert url == URL + rule["alert"].lower(), rule["alert"]
        assert rule["alert"].lower() in anchors, f"docs/runbook.md has no entry ## {rule['alert']}"
