"""deploy/: the dashboard queries only exported metrics; the scrape config parses."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from slipstream.engine.outputs import StepStats
from slipstream.server.metrics import ServerMetrics

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def _exported_names() -> set[str]:
    metrics = ServerMetrics(1024)
    metrics.bind("m", "d")
    metrics.record_step(
        StepStats(spec_accepted_per_pos=[1], decoder={"x": 1.0}, num_forward_tokens=1)
    )
    metrics.observe_http("GET", "/x", 200, 0.1)
    text = metrics.exposition().decode()
    names = set(re.findall(r"^(slipstream:[a-z0-9_]+)", text, flags=re.M))
    # Histogram children exist once observed; their family names are in the HELP lines.
    names |= {
        f"{n}_{s}"
        for n in re.findall(r"^# TYPE (\S+) histogram", text, flags=re.M)
        for s in ("bucket", "sum", "count")
    }
    return names


def test_dashboard_queries_only_exported_metrics() -> None:
    dashboard = json.loads((DEPLOY / "grafana" / "slipstream.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) > 20
    used = {name for e in exprs for name in re.findall(r"slipstream:[a-z0-9_]+", e)}
    missing = used - _exported_names()
    assert not missing, missing
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_config_scrapes_metrics() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    job = config["scrape_configs"][0]
    assert job["metrics_path"] == "/metrics" and job["static_configs"][0]["targets"]
