"""Assembles bench/results/REPORT.md from what the scenarios wrote: machine facts, commands, tables, plots.

    .venv/bin/python -m bench.report [--results bench/results]

Every scenario module writes its own `<name>.md` (and PNGs) into the results folder; `bench.run`
records how each was run (command, exit code, seconds, log) in `run.json`. This module only reads
those files, so a report can be rebuilt without rerunning anything, and a scenario that failed or
never ran shows up as such instead of stopping the report. GPU results, when present, live in
`results/gpu/` (written on the GPU machine by `bench.gpu`) and are included as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import time
from importlib import metadata
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
# Known scenarios first, in this order; any other <name>.md found is appended after them.
ORDER = ("overhead", "batching", "large_requests", "engine_sweep", "soak")
PROFILE = ("profile", "hotpath", "frontend_steps")
SKIP = {"REPORT"}
PACKAGES = ("grpcio", "protobuf", "onnxruntime", "onnxruntime-gpu", "numpy", "tritonclient", "prometheus-client",
            "tensorrt-rtx-cu13-bindings")
NOT_COVERED = """\
- TensorRT execution was not run on this hardware: there is no GPU here, so every CPU number is ONNX
  Runtime on the CPU execution provider. The TensorRT backend is exercised by its tests, not measured.
- GPU numbers (ONNX Runtime CUDA provider on an H200) come from a separate run on the GPU machine and are
  included above only when `bench/results/gpu/` holds them; they were not produced by this run.
- The load generator (`tritonclient.grpc`, Python) runs on the same machine and shares its cores with the
  server; on a small machine it takes a large share of them. Requests/s here are what a Python client on
  the same host sees, not the server's ceiling on dedicated cores.
- Other processes on the machine (the `other CPU` column where a scenario reports it, and the load average
  in the machine table) compete for the same cores; results on a shared machine are noisier than on a dedicated one.
- Only the example models (`tiny`, `mlp`, `mixed`, `convnet`) are measured; real models with more compute
  per request make the fixed per-request overhead matter less.
- No TLS, no network between client and server (127.0.0.1), no Kubernetes: the deployment's ingress,
  service mesh and pod limits are not part of these numbers.
"""


def machine_facts() -> list[tuple[str, str]]:
    """(what, value) rows describing the machine and software the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows = [("CPU", cpu), ("cores (usable)", f"{usable} of {os.cpu_count()}")]
    try:
        import psutil

        rows.append(("RAM", f"{psutil.virtual_memory().total / 2**30:.1f} GiB"))
    except ImportError:
        pass
    rows += [("OS", platform.platform()), ("Python", platform.python_version())]
    if hasattr(os, "getloadavg"):
        rows.append(("load average when the report was built (1/5/15 min)",
                     " / ".join(f"{x:.2f}" for x in os.getloadavg())))
    for name in PACKAGES:
        try:
            rows.append((name, metadata.version(name)))
        except metadata.PackageNotFoundError:
            continue
    return rows


def demote(text: str, levels: int = 2) -> str:
    """Headings one or more levels down, so a scenario's `# Title` nests under the report's sections."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            line = "#" * levels + line
        out.append(line)
    return "\n".join(out)


def rebase_links(text: str, prefix: str) -> str:
    """Relative link targets of a file in a subfolder, rewritten relative to the report's folder."""
    def fix(m: re.Match[str]) -> str:
        target = m.group(2)
        if re.match(r"^([a-z]+:|/|#)", target):
            return m.group(0)
        return f"{m.group(1)}({prefix}/{target})"

    return re.sub(r"(\]\s*)\(([^)\s]+)\)", fix, text)


def _scenario_names(results: Path, run: dict[str, Any] | None) -> list[str]:
    found = {p.stem for p in results.glob("*.md")} - SKIP - set(PROFILE)
    ran = [s["name"] for s in (run or {}).get("scenarios", [])]
    names = [n for n in ORDER if n in found or n in ran]
    names += sorted((found | set(ran)) - set(names) - set(PROFILE))
    return names


def _plots(results: Path, name: str, text: str) -> str:
    pngs = [p.name for p in sorted(results.glob(f"{name}*.png")) if p.name not in text]
    return "Plots: " + ", ".join(f"[{p}]({p})" for p in pngs) if pngs else ""


def _status(record: dict[str, Any] | None) -> str:
    if record is None:
        return ""
    verdict = "ok" if record.get("rc") == 0 else f"**FAILED** (exit code {record.get('rc')})"
    return f"Ran `{record['command']}`: {verdict} in {record.get('seconds', 0):.0f} s (log: `{record.get('log', '')}`)."


def _log_tail(results: Path, record: dict[str, Any], lines: int = 15) -> str:
    log = results / record.get("log", "")
    if not record.get("log") or not log.is_file():
        return ""
    tail = log.read_text(errors="replace").splitlines()[-lines:]
    return "Last lines of its log:\n\n```\n" + "\n".join(tail) + "\n```"


def build(results: Path = RESULTS) -> str:
    """The report's Markdown from the files in `results` (run.json is optional)."""
    run_file = results / "run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else None
    records = {s["name"]: s for s in (run or {}).get("scenarios", [])}
    parts = ["# trtserve benchmark report", ""]
    when = (run or {}).get("finished") or time.strftime("%Y-%m-%d %H:%M:%S %Z")
    mode = "full" if (run or {}).get("full") else "quick"
    parts += [f"Built {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; benchmarks "
              + (f"run in {mode} mode, finished {when}." if run else "as found in `bench/results/` (no run record)."),
              "", "Rerun: `make bench` (quick) or `BENCH_FULL=1 make bench` (longer runs), which call "
              "`.venv/bin/python -m bench.run [--full]`; `python -m bench.report` rebuilds this file alone.", ""]
    parts += ["## Machine", "", "| | |", "|---|---|"]
    parts += [f"| {k} | {v} |" for k, v in machine_facts()]
    parts += ["", "## Commands", ""]
    if records:
        parts += ["| scenario | command | result | seconds | log |", "|---|---|---|---|---|"]
        for r in records.values():
            result = "ok" if r.get("rc") == 0 else f"FAILED (exit {r.get('rc')})"
            parts.append(f"| {r['name']} | `{r['command']}` | {result} | {r.get('seconds', 0):.0f} "
                         f"| `{r.get('log', '')}` |")
    else:
        parts.append("No run record (`run.json`): each section below names the command that produced it.")
    parts.append("")
    for name in _scenario_names(results, run):
        parts += [f"## {name}", ""]
        record = records.get(name)
        if record:
            parts += [_status(record), ""]
        elif run:
            parts += ["Not run by the last `bench.run`; its results file is included as found.", ""]
        md = results / f"{name}.md"
        if md.is_file():
            text = md.read_text()
            parts += [demote(text), ""]
            if plots := _plots(results, name, text):
                parts += [plots, ""]
        else:
            parts += ["No results file was written.", ""]
        if record and record.get("rc") != 0 and (tail := _log_tail(results, record)):
            parts += [tail, ""]
    profile = [n for n in PROFILE if (results / f"{n}.md").is_file()]
    if profile:
        parts += ["## Where the time goes (profile)", ""]
        for n in profile:
            parts += [demote((results / f"{n}.md").read_text(), 2), ""]
    gpu = sorted((results / "gpu").glob("*.md")) if (results / "gpu").is_dir() else []
    parts += ["## GPU (H200)", ""]
    if gpu:
        parts.append("Produced on the GPU machine, not by this run; included as committed.")
        parts.append("")
        for f in gpu:
            parts += [rebase_links(demote(f.read_text(), 2), "gpu"), ""]
    else:
        parts += ["No GPU results in `bench/results/gpu/`.", ""]
    parts += ["## What this does not cover", "", NOT_COVERED]
    return "\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    out = args.results / "REPORT.md"
    out.write_text(build(args.results))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
