"""How many CPUs this server may use: its CPU affinity and its cgroup's CPU limit.

ONNX Runtime sizes its default thread pool from the host's cores, blind to a container's CPU limit (a
Kubernetes `resources.limits.cpu`) and to CPU affinity: a pod limited to 2 CPUs on a 64-core node would
start 64 threads per model, which the CFS quota then throttles. `--intra-op-threads 0` therefore means
"the CPUs this process may use" wherever something restricts them, and ONNX Runtime's own default
elsewhere.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit of this process's cgroup in CPUs (quota / period); None when unlimited or unknown.

    cgroup v2: `<root>/cpu.max` holds "max 100000" or "<quota> <period>"; v1: `<root>/cpu/cpu.cfs_quota_us`
    (-1 = unlimited) and `<root>/cpu/cpu.cfs_period_us`. A container sees its own cgroup at `root`.
    """
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        try:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": unlimited
        return None
    return q / p if q > 0 and p > 0 else None


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may run on at once: its affinity mask, capped by the cgroup limit (rounded up)."""
    cpus = len(os.sched_getaffinity(0))
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))
    return cpus


def default_intra_op_threads(root: Path = CGROUP_ROOT) -> int:
    """ONNX Runtime threads per model for `--intra-op-threads 0`: the available CPUs where affinity or a
    cgroup limit restricts this process, else 0 (ONNX Runtime's own default, one thread per core)."""
    cpus = available_cpus(root)
    return cpus if cpus < (os.cpu_count() or cpus) else 0
