"""`keep_freed_heap`: with it, requests' large buffers reuse freed heap pages instead of faulting in fresh ones."""

from __future__ import annotations

import platform
import re
import subprocess
import sys

import pytest

from tests.server import EXAMPLES, ROOT, start

# Eight 512 KiB buffers at once (eight batch-8 `convnet` requests in flight), every page written, freed,
# twenty times; prints whether the setting applied and the minor page faults of the twenty rounds.
_ROUNDS = """
import resource, sys
from service.memory.heap import keep_freed_heap
applied = keep_freed_heap(int(sys.argv[1]))
def one_round():
    held = [b"x" * (512 << 10) for _ in range(8)]
    del held
one_round()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):
    one_round()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(keep_bytes: int) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", _ROUNDS, str(keep_bytes)], cwd=ROOT, capture_output=True,
                         text=True, check=True, timeout=60).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_kept_heap_serves_the_next_large_buffers_without_page_faults():
    applied, default_faults = _faults(0)  # glibc's defaults: freed buffers go back to the kernel
    assert applied == "False"
    assert default_faults > 8 * 128 * 20 // 2  # most rounds faulted their 8 x 128 pages in again
    applied, kept_faults = _faults(64 << 20)  # the server's default
    assert applied == "True"
    assert kept_faults < default_faults // 20
    applied, small_faults = _faults(1 << 20)  # less than one round's 4 MiB: trimmed every round again
    assert applied == "True" and small_faults > default_faults // 2


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_every_frontend_process_keeps_freed_heap():
    with start(EXAMPLES, ["--model-control-mode", "explicit", "--frontend-processes", "2", "--log-level", "debug",
                          "--heap-keep-bytes", str(8 << 20)],
               timeout_s=120) as server:
        server.wait_for(re.compile(r"frontend\[1\] .*keeping up to"), timeout_s=30)
        kept = [line for line in server.lines if "keeping up to 8388608 bytes of freed heap, allocations up to "
                "4194304 bytes from the heap" in line]
        assert len(kept) == 2 and sum("frontend[1]" in line for line in kept) == 1  # the parent and the extra one
