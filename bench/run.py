"""Runs every benchmark scenario in bench/ (quick by default), then builds bench/results/REPORT.md.

    .venv/bin/python -m bench.run [--full] [--only overhead,soak]

Each scenario is its own subprocess (`python -m bench.<name> <flags>`), with its quick flags unless
`--full` or BENCH_FULL=1; its output goes to bench/results/logs/<name>.log. A scenario that fails
or times out is recorded (exit code, log tail in the report) and the next one runs: one broken
scenario never stops the report. Scenarios whose module does not exist are skipped. The record of
the run is bench/results/run.json, which `bench.report` reads.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import report

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


@dataclass(frozen=True)
class Scenario:
    name: str
    quick: tuple[str, ...]
    full: tuple[str, ...]
    timeout_s: float  # for the full run; quick runs get a third of it


SCENARIOS = (
    Scenario("overhead", ("--quick",), (), 1800),
    Scenario("batching", ("--quick",), (), 1800),
    Scenario("large_requests", ("--quick",), (), 900),
    Scenario("engine_sweep", ("--quick",), (), 1800),
    Scenario("soak", ("--quick", "--minutes", "2"), ("--minutes", "10"), 2400),
    Scenario("hotpath", ("--seconds", "5"), ("--seconds", "10"), 1200),
    Scenario("frontend_steps", ("--rounds", "15"), ("--rounds", "41"), 900),
)


def run_one(s: Scenario, full: bool, results: Path) -> dict[str, object]:
    """Run one scenario as a subprocess; its record for run.json (never raises for the scenario's failure)."""
    flags = s.full if full else s.quick
    command = [sys.executable, "-m", f"bench.{s.name}", *flags]
    shown = " ".join([".venv/bin/python", "-m", f"bench.{s.name}", *flags])
    logs = results / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{s.name}.log"
    timeout = s.timeout_s if full else s.timeout_s / 3
    started = time.monotonic()
    print(f"== {shown}", flush=True)
    with log.open("w") as out:
        try:
            rc = subprocess.run(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            out.write(f"\nbench.run: timed out after {timeout:.0f} s\n")
            rc = 124
        except OSError as exc:
            out.write(f"\nbench.run: could not start: {exc}\n")
            rc = 127
    seconds = time.monotonic() - started
    print(f"   {'ok' if rc == 0 else f'FAILED (exit {rc})'} in {seconds:.0f} s, log {log}", flush=True)
    return {"name": s.name, "command": shown, "rc": rc, "seconds": round(seconds, 1),
            "log": str(log.relative_to(results))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="longer runs (also BENCH_FULL=1)")
    parser.add_argument("--only", default="", help="comma-separated scenario names (default: all)")
    args = parser.parse_args()
    full = args.full or os.environ.get("BENCH_FULL", "") not in ("", "0")
    only = {n for n in args.only.split(",") if n}
    scenarios = [s for s in SCENARIOS if (ROOT / "bench" / f"{s.name}.py").is_file() and (not only or s.name in only)]
    RESULTS.mkdir(parents=True, exist_ok=True)
    record: dict[str, object] = {"full": full, "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "scenarios": []}
    for s in scenarios:
        record["scenarios"].append(run_one(s, full, RESULTS))
        (RESULTS / "run.json").write_text(json.dumps(record, indent=1))  # a crash later keeps what ran
    record["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    (RESULTS / "run.json").write_text(json.dumps(record, indent=1))
    (RESULTS / "REPORT.md").write_text(report.build(RESULTS))
    failed = [s["name"] for s in record["scenarios"] if s["rc"] != 0]
    print(f"wrote {RESULTS / 'REPORT.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
