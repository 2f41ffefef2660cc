"""The Grafana dashboard and the Prometheus rules only use metrics and labels that ServerMetrics exposes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.metrics import MEMORY_KINDS, PHASES, PREFIX, SPECS, ServerMetrics, WorkerStats

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
RULES = ROOT / "deploy" / "prometheus" / "rules.yaml"
# Added by the scrape (Kubernetes service discovery), not by the server.
TARGET_LABELS = {"job", "instance", "namespace", "pod"}
STATUSES = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
            "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION", "ABORTED",
            "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "UNAUTHENTICATED"}
LABEL_VALUES = {"status": STATUSES, "memory": set(MEMORY_KINDS), "phase": set(PHASES),
                "reason": {"first", "grow", "bucket", "warmup", "cache_hit"}}

NAME = re.compile(r"\btrtserve_\w+")
RECORDED = re.compile(r"\btrtserve:[\w:]+")
SELECTOR = re.compile(r"\b(trtserve_\w+)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"([^"]*)"')
GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SUFFIXES = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}


def family_of(series: str) -> tuple[str, str]:
    """(SPECS key, suffix) of a series name; ValueError when no metric exposes that name.

    A suffix only counts when the metric's kind produces it: a bare histogram name or a gauge with
    `_total` is an error, and `batch_size_count` is the histogram's count, not a metric `batch_size_co`.
    """
    base = series.removeprefix(PREFIX)
    for name, (kind, *_rest) in SPECS.items():
        for suffix in SUFFIXES[kind]:
            if base == name + suffix:
                return name, suffix
    raise ValueError(f"{series} is not exposed by ServerMetrics")


def dashboard_exprs() -> list[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"] for v in dash["templating"]["list"] if v["type"] == "query"]
    return exprs


def rules_exprs() -> list[str]:
    return [r["expr"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def recorded_names() -> set[str]:
    return {r["record"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "record" in r}


ALL = [pytest.param(e, id=f"dashboard-{i}") for i, e in enumerate(dashboard_exprs())] + \
      [pytest.param(e, id=f"rules-{i}") for i, e in enumerate(rules_exprs())]


@pytest.fixture(scope="module")
def scraped() -> dict[str, list[set[str]]]:
    """Series name -> label-name sets, from a real exposition after every kind of event."""
    m = ServerMetrics()
    m.register_model("mlp", 1)
    m.observe_request("mlp", 1, "OK", 0.01, rows=4)
    m.observe_request("mlp", 1, "RESOURCE_EXHAUSTED", 0.001, rows=64)
    w = WorkerStats()
    w.record_exec(4, [0.001], input_s=0.0001, infer_s=0.002, output_s=0.0001)
    w.record_build("first", 0.3)
    w.set_engines(live=1, max_batch_size=4, device_bytes=0)
    w.set_pool({"host": 512, "pinned": 0, "device": 0}, cap_bytes=4096)
    w.record_pool_grow()
    m.apply_worker_stats("mlp", 1, w.drain())
    m.set_ready("mlp", 1, True)
    m.worker_restarted("mlp")
    out: dict[str, list[set[str]]] = {}
    for fam in text_string_to_metric_families(generate_latest(m.registry).decode()):
        for s in fam.samples:
            out.setdefault(s.name, []).append(set(s.labels))
    return out


def test_family_of_strips_suffixes_by_kind() -> None:
    assert family_of("trtserve_request_duration_seconds_bucket") == ("request_duration_seconds", "_bucket")
    assert family_of("trtserve_batch_size_count") == ("batch_size", "_count")
    assert family_of("trtserve_inference_count_total") == ("inference_count", "_total")
    assert family_of("trtserve_inference_exec_count_total") == ("inference_exec_count", "_total")
    assert family_of("trtserve_engines_live") == ("engines_live", "")
    for wrong in ("trtserve_request_duration_seconds", "trtserve_engines_live_total",
                  "trtserve_worker_restarts", "trtserve_buffer_pool_bytes_sum", "trtserve_nope_total"):
        with pytest.raises(ValueError):
            family_of(wrong)


@pytest.mark.parametrize("expr", ALL)
def test_expression_uses_exposed_metrics_and_labels(expr: str, scraped: dict[str, list[set[str]]]) -> None:
    names = set(NAME.findall(expr))
    assert names, f"no trtserve metric in {expr!r}"
    known_labels = set(TARGET_LABELS)
    for series in names:
        name, suffix = family_of(series)
        known_labels |= set(SPECS[name][1]) | ({"le"} if suffix == "_bucket" else set())
        assert series in scraped, f"{series} missing from a real scrape"
    for series, body in SELECTOR.findall(expr):
        for label, op, val in MATCHER.findall(body):
            assert label in TARGET_LABELS or any(label in ls for ls in scraped[series]), (series, label)
            if label in LABEL_VALUES and op in ("=", "!="):
                assert val in LABEL_VALUES[label], f"{label}={val!r} is never exposed"
    for group in GROUPING.findall(expr):
        for label in filter(None, (x.strip() for x in group.split(","))):
            assert label in known_labels, f"label {label!r} in {expr!r} is on none of {sorted(names)}"
    for recorded in RECORDED.findall(expr):
        assert recorded in recorded_names(), f"{recorded} is not a recording rule"


def test_dashboard_is_importable_and_complete() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and dash["schemaVersion"] >= 36 and dash.get("id") is None
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for var in ("model", "pod"):
        assert variables[var]["type"] == "query" and "label_values(" in variables[var]["query"]
        assert variables[var]["datasource"]["uid"] == "${datasource}"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not cells & mine, f"{p['title']} overlaps another panel"
        cells |= mine
        assert p["datasource"]["uid"] == "${datasource}"
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs))
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}"
            for _series, body in SELECTOR.findall(t["expr"]):
                # every selector follows the model and pod variables
                assert 'model=~"$model"' in body and 'pod=~"$pod"' in body, t["expr"]
    exprs = "\n".join(dashboard_exprs())
    titles = " | ".join(p["title"].lower() for p in dash["panels"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}, sum by (model, le) (rate(trtserve_request_duration_seconds_bucket" in exprs
    for needle in ("throughput", "queue", "batch size distribution", "builds by reason", "live engines",
                   "max batch size", "buffer pool bytes by memory kind", "worker restarts", "errors by status"):
        assert needle in titles, needle
    heatmaps = [p for p in dash["panels"] if p["type"] == "heatmap"]
    assert heatmaps and heatmaps[0]["targets"][0]["format"] == "heatmap"
    assert "trtserve_batch_size_bucket" in heatmaps[0]["targets"][0]["expr"]
