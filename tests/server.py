"""Runs the real `trtserve serve` in its own process for tests, on 127.0.0.1 with ports picked by the OS."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import tritonclient.grpc as grpcclient

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "models"
_LISTENING = re.compile(r"trtserve listening: grpc(?:\+tls)? [^ ]+:(\d+), metrics (?:[^ ]+:(\d+)|off)")


class ServerProcess:
    """A started server; `url` for tritonclient, `lines` its log so far, `stop()` sends SIGTERM."""

    def __init__(self, repository: Path, *args: str, env: dict[str, str] | None = None,
                 wait_ready: bool = True, timeout_s: float = 90.0, cwd: Path = ROOT) -> None:
        """`cwd`: the checkout whose `service` package runs (another one for side-by-side comparisons)."""
        cmd = [sys.executable, "-m", "service", "serve", "--model-repository", str(repository),
               "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, env={**os.environ, **(env or {})})
        self.lines: list[str] = []
        self._eof = False
        self._changed = threading.Condition()
        threading.Thread(target=self._pump, daemon=True).start()
        match = self.wait_for(_LISTENING, timeout_s)
        self.grpc_port = int(match.group(1))
        self.metrics_port = int(match.group(2)) if match.group(2) else None
        self.url = f"127.0.0.1:{self.grpc_port}"
        if wait_ready:
            self.wait_for(re.compile(r"models ready: "), timeout_s)

    def _pump(self) -> None:
        for line in self.proc.stdout:
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def wait_for(self, pattern: re.Pattern[str], timeout_s: float, start: int = 0) -> re.Match[str]:
        """Block until a log line matches; fail with the log when it does not come."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    if m := pattern.search(line):
                        return m
                left = deadline - time.monotonic()
                if left <= 0 or self._eof:
                    raise AssertionError(f"server log never matched {pattern.pattern!r}:\n{''.join(self.lines)}")
                self._changed.wait(min(left, 0.5))

    def workers(self) -> list[psutil.Process]:
        """The model worker processes (children of the server but its extra frontend processes)."""
        frontends = set(self.frontend_pids().values())
        try:
            return [p for p in psutil.Process(self.proc.pid).children(recursive=True)
                    if "resource_tracker" not in " ".join(p.cmdline()) and p.pid not in frontends]
        except psutil.NoSuchProcess:
            return []

    def frontend_pids(self) -> dict[int, int]:
        """Extra frontend process index -> its latest pid, from the log (empty with one frontend)."""
        found = re.findall(r"frontend process (\d+) serving \(pid (\d+)\)", "".join(self.lines))
        return {int(i): int(pid) for i, pid in found}

    def worker_pid(self, model: str) -> int:
        """The pid of a model's current worker, from the server's log."""
        pids = re.findall(rf"model {re.escape(model)} version \d+ ready in worker pid (\d+)", "".join(self.lines))
        assert pids, f"no worker for {model} in log"
        return int(pids[-1])

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()


def alive(pid: int) -> bool:
    """Whether process `pid` runs: it exists and is not a zombie. One that is reaped while we look is not."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def shm_segments(pid: int) -> list[str]:
    """trtserve shared-memory segments created by the server process `pid`."""
    return sorted(p.name for p in Path("/dev/shm").glob(f"trtserve-{pid}-*"))


def start(repository: Path = EXAMPLES, args: Sequence[str] = (), **kwargs: object) -> ServerProcess:
    return ServerProcess(repository, *args, **kwargs)


def metric_value(server: ServerProcess, name: str, **labels: str) -> float:
    """The value of one sample on the server's /metrics (0 when the series does not exist yet)."""
    from urllib.request import urlopen

    from prometheus_client.parser import text_string_to_metric_families

    text = urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return sample.value
    return 0.0


def wait_until(check: Callable[[], bool], timeout_s: float = 10.0, what: str = "the condition") -> None:
    """Poll until `check` holds; fail naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def wait_for_metric(server: ServerProcess, name: str, value: float, timeout_s: float = 10.0, **labels: str) -> None:
    """Scrape until one sample reads `value`: frontend processes and workers report to the parent every
    0.1 s, so a count can lag the requests that made it."""
    wait_until(lambda: metric_value(server, name, **labels) == value, timeout_s, f"{name}{labels} to read {value}")


def separate_client(url: str) -> grpcclient.InferenceServerClient:
    """A tritonclient with a TCP connection of its own, like a separate client machine: gRPC otherwise
    shares one connection between the channels of a process that go to the same address."""
    return grpcclient.InferenceServerClient(url, channel_args=[
        ("grpc.max_send_message_length", 2**31 - 1), ("grpc.max_receive_message_length", 2**31 - 1),
        ("grpc.use_local_subchannel_pool", 1)])


def copy_model(source_repo: Path, name: str, repo: Path, new_name: str) -> Path:
    """Copy example model `name` into `repo` as `new_name` (config renamed, model file copied); the model dir."""
    target = repo / new_name
    (target / "1").mkdir(parents=True)
    shutil.copy(source_repo / name / "1" / "model.onnx", target / "1" / "model.onnx")
    config = (source_repo / name / "config.pbtxt").read_text().replace(f'name: "{name}"', f'name: "{new_name}"')
    (target / "config.pbtxt").write_text(config)
    return target
