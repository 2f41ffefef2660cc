"""deploy/prometheus: rules pass `promtool check rules`, and their unit tests pass and can fail."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES, RULES_TEST = RULES_DIR / "rules.yaml", RULES_DIR / "rules_test.yaml"
ALERTS = {"TrtserveEngineRebuildStorm", "TrtserveBufferPoolNearCap", "TrtserveWorkerRestarting",
          "TrtserveP99LatencyHigh"}
INSTALL = "apt-get install -y --no-install-recommends prometheus  (Debian/Ubuntu package providing promtool)"


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"promtool is missing in CI; install it with: {INSTALL}")
        pytest.skip(f"promtool not found; install it with: {INSTALL}")
    return path


def run(promtool: str, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def alerts_of(rules: dict) -> dict[str, dict]:
    return {r["alert"]: r for g in rules["groups"] for r in g["rules"] if "alert" in r}


def test_check_rules(promtool: str) -> None:
    out = run(promtool, "check", "rules", RULES.name, cwd=RULES_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_rule_unit_tests_pass(promtool: str) -> None:
    out = run(promtool, "test", "rules", RULES_TEST.name, cwd=RULES_DIR)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "SUCCESS" in out.stdout + out.stderr


def test_every_alert_exists_and_is_tested_firing_and_quiet() -> None:
    rules = yaml.safe_load(RULES.read_text())
    assert ALERTS <= set(alerts_of(rules))
    cases = [c for t in yaml.safe_load(RULES_TEST.read_text())["tests"] for c in t.get("alert_rule_test", [])]
    for alert in ALERTS:
        mine = [c for c in cases if c["alertname"] == alert]
        assert any(c.get("exp_alerts") for c in mine), f"{alert}: no case where it fires"
        assert any(not c.get("exp_alerts") for c in mine), f"{alert}: no case where it stays quiet"
    records = {r["record"] for g in rules["groups"] for r in g["rules"] if "record" in r}
    assert {"trtserve:request_duration_seconds:p99_5m", "trtserve:inference_count:rate5m"} <= records


@pytest.mark.parametrize("alert", sorted(ALERTS))
@pytest.mark.parametrize("broken_expr", ["vector(1)", "vector(1) < 0"], ids=["always", "never"])
def test_unit_tests_catch_a_broken_alert(promtool: str, tmp_path: Path, alert: str, broken_expr: str) -> None:
    """An alert that always fires (or never does) must fail the unit tests: they have teeth."""
    rules = yaml.safe_load(RULES.read_text())
    alerts_of(rules)[alert]["expr"] = broken_expr
    (tmp_path / RULES.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    out = run(promtool, "test", "rules", RULES_TEST.name, cwd=tmp_path)
    assert out.returncode != 0
    assert alert in out.stdout + out.stderr
