"""Alert rules and Grafana dashboards in ops/ (canonical files in helm/raytrain/rules and dashboards/).

Runs the real `promtool` (Debian package `prometheus`): `check rules` on the rule file, `test rules` on
the unit tests in ops/prometheus/tests/ (synthetic series that make each alert fire and stay silent),
and `check rules` on every dashboard query (wrapped as recording rules) so a PromQL typo fails here.
Every metric a rule or a panel names must be one raytrain or Ray exports (raytrain/metrics_names.py),
and each Ray name must still be defined in the installed Ray source.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from raytrain import metrics_names

REPO_ROOT = Path(__file__).resolve().parents[1]
RULES = REPO_ROOT / "helm" / "raytrain" / "rules" / "raytrain-alerts.yaml"
RULE_TESTS = sorted((REPO_ROOT / "ops" / "prometheus" / "tests").glob("*.yaml"))
DASHBOARDS = sorted((REPO_ROOT / "helm" / "raytrain" / "dashboards").glob("*.json"))
EXPECTED_ALERTS = {
    "RaytrainTrainingStalled",
    "RaytrainLossNaN",
    "RaytrainLossDiverging",
    "RaytrainWorkerRestarts",
    "RaytrainServingErrorRate",
    "RaytrainModelErrorRate",
    "RaytrainServingP99Latency",
    "RaytrainServingReplicasAtMax",
    "RaytrainServingNoHealthyReplicas",
    "RaytrainGPUMemoryPressure",
}

# Metric-looking identifiers in PromQL: ray_* names (function names and labels never start with ray_).
_SERIES = re.compile(r"\bray_[a-zA-Z0-9_]+\b")
# Label names that start with ray_ (Ray Train's tags), not metrics.
_RAY_LABELS = {"ray_train_run_name", "ray_train_run_id", "ray_train_controller_state"}


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.skip("promtool not found on PATH; install Debian's `prometheus` package (apt-get install prometheus)")
    return path


def rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(dashboard file, panel title, expr) for every query of every panel and template variable."""
    found = []
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            found += [(path.name, panel["title"], t["expr"]) for t in panel["targets"]]
        for var in board["templating"]["list"]:
            if var["type"] == "query":
                found.append((path.name, f"variable {var['name']}", var["query"]["query"]))
    return found


def referenced_series(expr: str) -> set[str]:
    return set(_SERIES.findall(expr)) - _RAY_LABELS


def run(*cmd: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=cwd, check=False)


# --- rules ----------------------------------------------------------------------------------------


def test_ops_copy_is_a_link_to_the_chart_copy():
    """One rule file: the one the chart embeds in its PrometheusRule."""
    link = REPO_ROOT / "ops" / "prometheus" / "raytrain-alerts.yaml"
    assert link.is_symlink() and link.resolve() == RULES.resolve()


def test_every_alert_is_there_and_documented():
    found = {r["alert"]: r for r in rules() if "alert" in r}
    assert set(found) == EXPECTED_ALERTS
    runbook = (REPO_ROOT / "ops" / "runbooks" / "alerts.md").read_text()
    for name, rule in found.items():
        assert rule["labels"]["severity"] in {"warning", "critical"}, name
        assert rule["annotations"]["summary"], name
        anchor = rule["annotations"]["runbook_url"].split("#")[1]
        assert anchor == name.lower()
        assert f"## {name}" in runbook, f"ops/runbooks/alerts.md has no section for {name}"


def test_promtool_check_rules(promtool):
    result = run(promtool, "check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests(promtool):
    assert {p.name for p in RULE_TESTS} == {"training.yaml", "serving.yaml", "nodes.yaml"}
    result = run(promtool, "test", "rules", *(p.name for p in RULE_TESTS), cwd=RULE_TESTS[0].parent)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(RULE_TESTS)


def test_unit_tests_cover_every_alert_firing():
    fired = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            fired |= {t["alertname"] for t in test.get("alert_rule_test", []) if t.get("exp_alerts")}
    assert fired == EXPECTED_ALERTS


@pytest.mark.parametrize(
    ("old", "new"),
    [
        ("      > 0.05\n", "      > 0.5\n"),  # error-rate threshold 5% -> 50%: the 9% test series no longer fires
        ('status_code=~"5.."', 'status_code=~"4.."'),  # counting client errors instead of server errors
        ('status=~"5.."', 'status=~"4.."'),  # the same in the app's counter (RaytrainModelErrorRate)
        ('model!=""', 'model=~".*"'),  # requests no model answered counted as a model's errors
        ("ray_raytrain_train_step offset 15m", "ray_raytrain_train_step offset 1m"),
    ],
    ids=["threshold", "status-class", "app-status-class", "unattributed-requests", "stall-window"],
)
def test_unit_tests_catch_a_broken_rule(promtool, tmp_path, old, new):
    """The unit tests are not vacuous: a rule file with one mistake fails them."""
    text = RULES.read_text()
    assert old in text
    (tmp_path / "raytrain-alerts.yaml").write_text(text.replace(old, new))
    tests = tmp_path / "tests"
    tests.mkdir()
    for path in RULE_TESTS:
        (tests / path.name).write_text(path.read_text())
    result = run(promtool, "test", "rules", *(p.name for p in RULE_TESTS), cwd=tests)
    assert result.returncode != 0
    assert "FAILED" in result.stdout + result.stderr


# --- dashboards -----------------------------------------------------------------------------------


def test_dashboards_are_valid_grafana_json():
    assert [p.name for p in DASHBOARDS] == ["raytrain-data.json", "raytrain-serving.json", "raytrain-training.json"]
    uids = set()
    for path in DASHBOARDS:
        board = json.loads(path.read_text())
        assert board["uid"] not in uids
        uids.add(board["uid"])
        assert board["title"].startswith("raytrain / ")
        assert board["templating"]["list"][0] == {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "hide": 0,
        }
        ids = [p["id"] for p in board["panels"]]
        assert len(ids) == len(set(ids)), path.name
        for panel in board["panels"]:
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            assert panel["targets"], panel["title"]
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
        link = REPO_ROOT / "ops" / "grafana" / path.name
        assert link.is_symlink() and link.resolve() == path.resolve()


def test_dashboard_queries_parse(promtool, tmp_path):
    """Each query is valid PromQL: promtool parses it as a recording rule (Grafana's `$var` sits in strings)."""
    queries = dashboard_queries()
    group = {
        "name": "dashboards",
        "rules": [
            {"record": f"dashboard:query_{i}", "expr": expr.replace("label_values(", "count by (x) (")}
            for i, (_, _, expr) in enumerate(queries)
        ],
    }
    # label_values(metric, label) is Grafana's, not PromQL: check the metric inside it instead.
    for rule in group["rules"]:
        rule["expr"] = re.sub(r"count by \(x\) \(([a-z_]+), [a-z_]+\)", r"count(\1)", rule["expr"])
    path = tmp_path / "dashboards.yaml"
    path.write_text(yaml.safe_dump({"groups": [group]}))
    result = run(promtool, "check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


# --- metric names ---------------------------------------------------------------------------------


def test_rules_and_dashboards_name_only_exported_metrics():
    exported = metrics_names.all_exported_series()
    used = {}
    for rule in rules():
        for name in referenced_series(rule["expr"]):
            used.setdefault(name, []).append(f"rule {rule.get('alert') or rule.get('record')}")
    for board, title, expr in dashboard_queries():
        for name in referenced_series(expr):
            used.setdefault(name, []).append(f"{board}: {title}")
    unknown = {name: where for name, where in used.items() if name not in exported}
    assert not unknown, f"metrics nobody exports: {unknown}"
    # Every metric raytrain exports is watched somewhere (a panel or an alert).
    for name, kind in metrics_names.PROJECT_METRICS.items():
        assert set(metrics_names.exported_series(name, kind)) & set(used), f"{name} is on no dashboard"


def test_exported_series_names_follow_rays_export():
    """How Ray 2.60 names `ray.util.metrics` series (checked by scraping a live Ray; see metrics_names)."""
    g, c, h = metrics_names.GAUGE, metrics_names.COUNTER, metrics_names.HISTOGRAM
    assert metrics_names.exported_series("raytrain_train_loss", g) == ["ray_raytrain_train_loss"]
    assert metrics_names.exported_series("raytrain_train_resumes", c) == ["ray_raytrain_train_resumes_total"]
    assert metrics_names.exported_series("raytrain_serve_requests_total", c) == ["ray_raytrain_serve_requests_total"]
    assert metrics_names.exported_series("raytrain_serve_ttft_seconds", h) == [
        "ray_raytrain_serve_ttft_seconds_bucket",
        "ray_raytrain_serve_ttft_seconds_count",
        "ray_raytrain_serve_ttft_seconds_sum",
    ]


def test_ray_metric_names_exist_in_installed_ray():
    """A Ray upgrade that renames a metric fails here, not as an alert that never fires."""
    spec = importlib.util.find_spec("ray")  # no import: finding the package is enough, and fast
    if spec is None or spec.origin is None:
        pytest.skip("ray is not installed")
    root = Path(spec.origin).parent
    missing = []
    for name, (_, module) in metrics_names.RAY_METRICS.items():
        source = (root / module).read_text()
        # Serve's ingress metrics are built per protocol: f"serve_num_{protocol_name}_requests".
        source = source.replace("{protocol_name}", "http")
        if f'"{name}"' not in source:
            missing.append(f"{name} (expected in ray/{module})")
    assert not missing, missing
