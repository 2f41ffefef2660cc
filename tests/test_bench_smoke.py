"""Fast checks of the benchmark tooling: the floor server answers like trtserve, and the report assembles
whatever the scenarios left behind (no real benchmark runs here)."""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from bench import report
from bench.floor_server import constant_response
from bench.overhead import FloorProcess
from bench.run import Scenario, run_one
from tests.server import ROOT


@pytest.mark.parametrize("flags", [(), ("--parse", "--interceptor", "--hop")], ids=["raw", "parse+interceptor+hop"])
def test_floor_server_answers_the_constant_response(flags):
    expected = constant_response()
    x = np.ones((1, 16), dtype=np.float32)
    with FloorProcess(*flags) as floor:
        client = grpcclient.InferenceServerClient(floor.url)
        try:
            inp = grpcclient.InferInput("x", [1, 16], "FP32")
            inp.set_data_from_numpy(x)
            result = client.infer("tiny", [inp])
            response = result.get_response()
            assert response.model_name == "tiny" and response.model_version == "1"
            assert response.ByteSize() == expected.ByteSize() == 90  # trtserve's answer for tiny, batch 1
            y = result.as_numpy("y")
            assert y.shape == (1, 16) and y.dtype == np.float32 and not y.any()

            answers: queue.Queue = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for _ in range(3):
                client.async_stream_infer("tiny", [inp])
            for _ in range(3):
                res, err = answers.get(timeout=10)
                assert err is None
                assert res.as_numpy("y").shape == (1, 16)
            client.stop_stream()
        finally:
            client.close()


def test_report_assembles_fixture_results(tmp_path):
    (tmp_path / "overhead.md").write_text(
        "# Serving overhead\n\n| mode | clients | ratio |\n|---|---|---|\n| unary | 8 | 71% |\n\n"
        "![plot](overhead.png)\n")
    (tmp_path / "overhead.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "batching.md").write_text("# Batching\n\n| clients | inferences/s |\n|---|---|\n| 32 | 1234 |\n")
    (tmp_path / "batching-extra.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "profile.md").write_text("# Profile\n\nmetrics are 9% of the frontend\n")
    (tmp_path / "logs").mkdir()
    (tmp_path / "logs" / "soak.log").write_text("starting\nTraceback: boom at minute 1\n")
    (tmp_path / "gpu").mkdir()
    (tmp_path / "gpu" / "REPORT-gpu.md").write_text("# GPU end to end\n\n![sweep](sweep.png) [log](gpu-tests.log)\n")
    (tmp_path / "run.json").write_text(json.dumps({"full": False, "finished": "today", "scenarios": [
        {"name": "overhead", "command": ".venv/bin/python -m bench.overhead --quick", "rc": 0, "seconds": 61.2,
         "log": "logs/overhead.log"},
        {"name": "soak", "command": ".venv/bin/python -m bench.soak --quick --minutes 2", "rc": 1, "seconds": 70,
         "log": "logs/soak.log"},
    ]}))

    text = report.build(tmp_path)

    assert "## Machine" in text and "| grpcio |" in text and "| Python |" in text
    assert "`.venv/bin/python -m bench.overhead --quick`" in text
    assert "| unary | 8 | 71% |" in text and "### Serving overhead" in text  # included, heading nested
    assert "| 32 | 1234 |" in text and "[batching-extra.png](batching-extra.png)" in text
    assert text.index("## overhead") < text.index("## batching") < text.index("## soak")
    assert "FAILED (exit 1)" in text and "boom at minute 1" in text  # the failure is recorded, not fatal
    assert "metrics are 9% of the frontend" in text
    assert "(gpu/sweep.png)" in text and "(gpu/gpu-tests.log)" in text
    assert "## What this does not cover" in text and "TensorRT execution was not run" in text


def test_report_without_gpu_results_or_run_record(tmp_path):
    (tmp_path / "overhead.md").write_text("# Serving overhead\n\nnothing measured\n")
    text = report.build(tmp_path)
    assert "No run record" in text and "No GPU results" in text and "nothing measured" in text


def test_a_failing_scenario_is_recorded_not_raised(tmp_path):
    record = run_one(Scenario("no_such_scenario", (), (), 60), False, tmp_path)
    assert record["rc"] != 0
    assert "No module named" in (tmp_path / record["log"]).read_text()


def test_hotpath_step_timings_run_against_the_current_code(tmp_path):
    """bench.hotpath times the hot path's functions directly (private ones included), so a refactor can
    break it without any other test noticing: its per-step part (a few seconds) runs here."""
    done = subprocess.run([sys.executable, "-m", "bench.hotpath", "--no-spy", "--no-ladder", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    text = (tmp_path / "hotpath.md").read_text()
    for step in ("codec.decode_request", "FrameCodec.decode_infer + to_array", "ModelRuntime.run([1 item])",
                 "reply: to_raw + copy to shm"):
        assert step in text


def test_frontend_steps_run_against_the_current_code(tmp_path):
    """bench.frontend_steps drives the frontend's pieces directly; two short rounds of each row run here."""
    done = subprocess.run([sys.executable, "-m", "bench.frontend_steps", "--requests", "160", "--rounds", "2",
                           "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line for line in (tmp_path / "frontend_steps.md").read_text().splitlines() if line.startswith("| ")]
    assert len(rows) == 7  # header and six steps, each with a time
    assert all(float(row.split("|")[2]) > 0 for row in rows[1:])


def test_a_batching_point_reads_its_engine_numbers_from_the_real_server(tmp_path):
    from bench.batching import make_repo, serve_point
    from tests.server import start

    repo = make_repo(tmp_path, delay_us=2000)
    with start(repo, ["--intra-op-threads", "1"]) as server:
        point = serve_point(server, "on", clients=4, seconds=1.0, client_processes=2)
    assert point.errors == 0 and point.rps > 0
    assert 1.0 <= point.mean_batch <= 4.0  # 4 clients of batch-1 requests
    # busy is an estimate (the clients' requests/s over their window x the server's mean run time over the
    # point): near 1 with 4 clients on a 2 ms engine, and it has read 1.06 on this machine
    assert 0.0 < point.busy <= 1.5 and point.run_ms > 0
    # the engine thread's CPU over the engine's run time: a share of the runs, never many times them
    assert 0.05 < point.on_cpu < 1.5


def test_cpu_lists_read_and_write_as_taskset_does():
    from bench.batching import cpu_list, parse_cpus

    assert parse_cpus("0-3,8,10-11") == {0, 1, 2, 3, 8, 10, 11}
    assert cpu_list({11, 0, 1, 2, 3, 8, 10}) == "0-3,8,10-11"
    assert parse_cpus("5") == {5} and cpu_list({5}) == "5"


def test_pinning_a_server_moves_every_thread_of_every_process_it_started(tmp_path):
    """bench.batching --server-cpus: the frontend's threads (gRPC's included) and the model worker's, not
    only each process's main thread; threads started later inherit it."""
    import os

    import psutil

    from bench.batching import make_repo, pin, serve_point
    from tests.server import start

    cpu = min(os.sched_getaffinity(0))
    with start(make_repo(tmp_path), ["--intra-op-threads", "1"]) as server:
        pin(server.proc.pid, {cpu})
        serve_point(server, "on", clients=2, seconds=0.5, client_processes=1)  # starts the engine thread
        processes = [psutil.Process(server.proc.pid), *psutil.Process(server.proc.pid).children(recursive=True)]
        threads = [t.id for p in processes for t in p.threads()]
        assert len(processes) >= 2 and len(threads) > 2 * len(processes)
        affinity = {}
        for tid in threads:
            with contextlib.suppress(ProcessLookupError):  # a short-lived thread (a scrape's) that ended
                affinity[tid] = os.sched_getaffinity(tid)
        assert len(affinity) > 2 * len(processes) and affinity == {tid: {cpu} for tid in affinity}


def test_the_gpu_benchmarks_floor_serves_the_convnet_load_from_processes_sharing_one_port():
    from bench.gpu import floor

    result = floor(2, seconds=0.5, client_processes=1)
    assert result["convnet"].errors == 0 and result["convnet"].requests > 0
    assert len(result["cpu"].frontends) == 2 and result["cpu"].frontend_cores > 0


def test_the_batching_verdict_takes_the_median_of_the_rounds():
    from bench.batching import Point, goal_verdict, table

    def point(round_: int, served: float, alone: float, mode: str = "on", clients: int = 32) -> Point:
        return Point(mode, clients, served, 5.0, 9.0, 0, 8.0, 0.95, 3.0, 1.0, engine_rps=alone,
                     engine_run_ms=2.5, engine_spread_ms=(2.4, 2.6), round=round_)

    one = [point(1, 700, 1000)]
    assert goal_verdict(one).startswith("FAIL: at 32 clients with batching on, served 700 inferences/s = 70%")
    assert table(one).startswith("| batching |")
    rounds = [point(1, 900, 1000), point(1, 300, 1000, mode="off"), point(2, 400, 1000), point(3, 850, 1000)]
    assert goal_verdict(rounds) == ("PASS: at 32 clients with batching on, served / engine alone 85% in the "
                                    "median of 3 rounds (40%, 85%, 90%); goal >= 80%")
    lines = table(rounds).splitlines()
    assert lines[0].startswith("| round | batching |") and lines[1].count("|---") == 13
    assert [line.split(" | ")[0] for line in lines[2:]] == ["| 1", "| 1", "| 2", "| 3"]
    assert goal_verdict([point(1, 900, 1000, clients=8)]) == "goal not measured (no 32-client point)"


def test_the_gpu_benchmarks_references_time_the_engine_and_the_batch_path_on_the_cpu_too(tmp_path):
    """bench.gpu_alone's host references, with a CPU model of convnet's input and output (the on-device one
    needs CUDA: it runs in bench.gpu on the GPU machine)."""
    from bench.gpu_alone import engine_alone, runtime_alone
    from bench.large_requests import MODEL, write_repository

    repo = write_repository(tmp_path)
    assert engine_alone(repo, MODEL, 16, seconds=0.2) > 0
    assert runtime_alone(repo, MODEL, requests=2, rows=8, seconds=0.2) > 0


def test_the_gpu_verdict_takes_each_settings_median_over_its_rounds_against_its_own_engine_alone():
    from bench.gpu import verdicts
    from bench.load import LoadResult

    def run(frontends: str, requests_per_s: float, alone: float, device: float = 100000) -> dict:
        return {"frontends": frontends, "alone": alone, "device": device,
                "convnet": LoadResult(64, int(requests_per_s * 10), 0, 10.0, np.zeros(1))}

    runs = [run("4", 5000, 50000, 80000), run("8", 4000, 40000), run("4", 4000, 40000, 50000),
            run("8", 4000, 50000), run("4", 4600, 50000)]  # served inferences = 8 x requests
    assert verdicts(runs) == [
        "- 4 frontend processes: PASS, served / engine alone 80% in the median of 3 round(s) (80%, 80%, 74%); "
        "goal >= 80%. Served / engine on device 50%",
        "- 8 frontend processes: FAIL, served / engine alone 72% in the median of 2 round(s) (80%, 64%); "
        "goal >= 80%. Served / engine on device 32%"]


def test_the_overhead_verdict_takes_the_median_of_each_rounds_ratio():
    from bench.overhead import Measurement, combine, markdown, verdict

    def rounds(server: str, mode: str, clients: int, rps: list[float]) -> Measurement:
        return combine([Measurement(server, mode, clients, 4, r, 1.0, 2.0, 0, 500.0, 100.0, 0.0) for r in rps])

    # each round's trtserve against the same round's floor; the median of those (60%), not the ratio of the
    # means (1900 / 3100 = 61%)
    results = [rounds("floor", "stream", 8, [4000, 2000, 3300]), rounds("trtserve", "stream", 8, [2600, 1200, 1900]),
               rounds("floor", "unary", 8, [2500, 2500]), rounds("trtserve", "unary", 8, [1400, 1500]),
               rounds("floor", "unary", 1, [900]), rounds("trtserve", "unary", 1, [100])]  # not the goal's clients
    assert [(mode, round(median, 4), [round(r, 4) for r in ratios], ok)
            for mode, median, ratios, ok in verdict(results)] == [
        ("stream", 0.6, [0.65, 0.6, 0.5758], True), ("unary", 0.58, [0.56, 0.6], False)]
    text = markdown(results, "cmd", 3.0, 3)
    assert "- Goal: PASS: stream at 8 clients trtserve / floor 60% in the median of 3 round(s) (65%, 60%, 58%)" in text
    assert "- Goal: FAIL: unary at 8 clients trtserve / floor 58% in the median of 2 round(s) (56%, 60%)" in text


def test_the_overhead_benchmark_serves_n_frontend_processes_against_n_floor_processes():
    import psutil

    from bench.overhead import measure, servers

    with servers(frontends=2) as both:
        (_, _, floor_pids), (_, _, trt_pids) = both
        assert len(floor_pids) == 2 and all(psutil.pid_exists(pid) for pid in floor_pids)
        spawned = [c for c in psutil.Process(trt_pids[0]).children() if "spawn_main" in " ".join(c.cmdline())]
        assert len(spawned) == 2  # tiny's worker and the extra frontend
        for name, url, pids in both:
            m = measure(name, url, pids, clients=2, seconds=0.5, stream=True, client_procs=2)
            assert m.errors == 0 and m.rps > 0 and m.server_cpu_us > 0
            if name == "floor":  # no children: all of it is the processes started
                assert m.main_cpu_us == pytest.approx(m.server_cpu_us)
            else:  # the parent frontend only, not the worker and extra frontend beside it. The kernel may hand
                # both connections to the extra frontend (SO_REUSEPORT), so the parent's share can be zero
                assert m.main_cpu_us == pytest.approx(m.cpu_by_pid[trt_pids[0]])
                assert 0 <= m.main_cpu_us < m.server_cpu_us
                assert sum(m.cpu_by_pid.values()) == pytest.approx(m.server_cpu_us)


def test_the_large_request_benchmark_serves_all_five_cases_and_counts_their_page_faults(tmp_path):
    """bench.large_requests, one short round: every server answers the 512 KiB requests (trtserve also to
    clients with glibc's heap defaults), and the page faults tell the heap settings apart (glibc's defaults
    fault most of a request's 128 pages in again)."""
    done = subprocess.run([sys.executable, "-m", "bench.large_requests", "--clients", "8", "--seconds", "1",
                           "--rounds", "1", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True,
                          timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {row.split("|")[1].strip(): row.split("|")[2:] for row in
            (tmp_path / "large_requests.md").read_text().splitlines() if row.startswith("| ") and "server" not in row}
    assert set(rows) == {"trtserve", "trtserve, heap 0", "floor", "floor, heap 0", "trtserve, clients heap 0"}
    assert all(float(cells[0]) > 0 and cells[6].strip() == "0" for cells in rows.values())  # requests/s, errors
    assert all(float(cells[4]) > 10 for cells in rows.values())  # resident MiB of a Python process
    assert all(float(cells[5]) > 0 for cells in rows.values())  # the load generator's CPU per request
    faults = {name: float(cells[3]) for name, cells in rows.items()}
    for server in ("trtserve", "floor"):  # ~100 against ~1 on an idle machine; fewer in flight on a busy one
        assert faults[f"{server}, heap 0"] > max(3.0, 5 * faults[server]), faults


def test_the_gpu_variants_benchmark_serves_each_window_and_reads_the_worker_back(tmp_path):
    """bench.gpu_variants' parts on the CPU, with a model of convnet's shape that computes almost nothing
    in place of convnet: every batching window gets its own model, and one short load reports a served
    rate, executed batches, the engine's busy share and the request's time split."""
    from bench.gpu_variants import _add_windows, served
    from bench.large_requests import MODEL, write_repository

    repo = write_repository(tmp_path)  # with dynamic batching, as bench.gpu configures convnet
    (repo / MODEL).rename(repo / "convnet")
    _add_windows(repo, [0, 500])
    assert "max_queue_delay_microseconds: 500" in (repo / "convnet_d500" / "config.pbtxt").read_text()
    r = served(repo, "convnet_d500", frontends=2, seconds=1.0, client_processes=2)
    assert r["rate"] > 0 and r["batch"] >= 8  # batch-8 requests
    assert 0 < r["busy"] <= 1.2 and r["client_ms"] >= r["server_ms"] >= r["queue_ms"] >= 0, r
