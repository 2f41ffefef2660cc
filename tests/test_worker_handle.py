"""WorkerHandle in the parent's event loop, against a real worker process: races between its waits and the
exit handler."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor


from service.repository import ModelRepository
from service.workers.supervisor import SupervisorSettings, WorkerHandle
from service.workers.worker import WorkerOptions
from tests.server import EXAMPLES, alive


async def _exited(pid: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while alive(pid):
        assert time.monotonic() < deadline, f"worker pid {pid} did not exit"
        await asyncio.sleep(0.02)


def test_stop_survives_the_exit_handler_closing_the_process_before_its_join_runs():
    """stop() waits for the worker in a thread; when that thread starts late (a busy machine), the event loop
    has already seen the worker exit and closed its process handle. Unloading must still end cleanly (it
    raised ValueError, an INTERNAL unload, under the churn test on a loaded machine)."""

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))
        spec = ModelRepository(EXAMPLES).load_spec("tiny")
        handle = WorkerHandle(spec, WorkerOptions(intra_op_threads=1), SupervisorSettings(shm_bytes=1 << 20))
        await handle.start()
        pid = handle.pid
        gate = threading.Event()
        busy = loop.run_in_executor(None, gate.wait, 30)  # the only executor thread, held until released
        stopping = asyncio.create_task(handle.stop())
        await _exited(pid, 20)  # the worker obeyed STOP while stop()'s join waits for a thread
        await asyncio.sleep(0.3)  # the loop handles the exit: reaps and closes the process handle
        gate.set()
        await busy
        await asyncio.wait_for(stopping, 30)
        assert not handle.ready and handle.socket_path is None

    asyncio.run(scenario())
