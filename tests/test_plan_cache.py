"""Plan cache: keys, round trips, every kind of bad file rebuilt, atomic writes, concurrent writers."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from service.engines import plan_cache as plan_cache_module
from service.engines.plan_cache import MAGIC, PlanCache, hash_file, load_or_build, prepare_plan, supports_plans
from tests.fake_engines import FakeBuilder, FakePlanBuilder

PARTS = {
    "model_sha256": "a" * 64, "backend": "tensorrt", "backend_version": "10.13.0",
    "device": "NVIDIA H200", "compute_capability": "9.0", "precision": "FP16", "capacity": 8,
    "input_dims": {"x": [3, 224, 224]}, "workspace_bytes": 1 << 30, "opt_batch_size": 8,
}
PAYLOAD = bytes(range(256)) * 40


class Events:
    def __init__(self) -> None:
        self.log: list[tuple[str, dict]] = []

    def __call__(self, kind: str, **fields) -> None:
        self.log.append((kind, fields))


@pytest.fixture
def cache(tmp_path) -> PlanCache:
    return PlanCache(tmp_path / "plans", on_event=Events())


def test_round_trip_and_miss(cache):
    key = cache.key(**PARTS)
    assert cache.get(key) is None
    path = cache.put(key, PAYLOAD)
    assert path == cache.dir / f"{key}.plan" and path.read_bytes().startswith(MAGIC)
    assert cache.get(key) == PAYLOAD
    assert [p.name for p in cache.dir.iterdir()] == [path.name]  # no temp file left behind
    assert cache.on_event.log == []


def test_key_is_stable_and_order_independent():
    key = PlanCache.key(**PARTS)
    assert len(key) == 64 and int(key, 16) >= 0
    assert PlanCache.key(**dict(reversed(list(PARTS.items())))) == key
    assert PlanCache.key(**{**PARTS, "input_dims": {"x": (3, 224, 224)}}) == key  # tuple == list


@pytest.mark.parametrize("part,value", [
    ("model_sha256", "b" * 64), ("backend", "tensorrt_rtx"), ("backend_version", "10.14.0"),
    ("device", "NVIDIA H100"), ("compute_capability", "8.9"), ("precision", "FP32"), ("capacity", 16),
    ("input_dims", {"x": [3, 256, 256]}), ("workspace_bytes", 1 << 28), ("opt_batch_size", 4),
])
def test_key_changes_with_each_part(part, value):
    assert PlanCache.key(**{**PARTS, part: value}) != PlanCache.key(**PARTS)


def test_key_with_an_extra_part_differs_and_odd_values_are_accepted(tmp_path):
    assert PlanCache.key(**PARTS, timing_cache=True) != PlanCache.key(**PARTS)
    assert PlanCache.key(path=tmp_path, raw=b"\x01", flags={"b", "a"}) == PlanCache.key(
        path=str(tmp_path), raw="01", flags=["a", "b"])


def corrupt_truncate_header(data: bytes) -> bytes:
    return data[:10]


def corrupt_truncate_payload(data: bytes) -> bytes:
    return data[:-100]


def corrupt_flip_payload_byte(data: bytes) -> bytes:
    i = len(data) - 7
    return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:]


def corrupt_magic(data: bytes) -> bytes:
    return b"NOTAPLAN" + data[8:]


def corrupt_version(data: bytes) -> bytes:
    return data[:8] + b"\x09\x00" + data[10:]


def corrupt_empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize("corrupt,why", [
    (corrupt_truncate_header, "truncated header (10 bytes)"),
    (corrupt_truncate_payload, "payload is 10140 bytes, header says 10240"),
    (corrupt_flip_payload_byte, "payload checksum mismatch"),
    (corrupt_magic, "bad magic (not a trtserve plan file)"),
    (corrupt_version, "format version 9, expected 1"),
    (corrupt_empty, "truncated header (0 bytes)"),
])
def test_corrupt_file_is_reported_deleted_and_replaced(cache, corrupt, why):
    key = cache.key(**PARTS)
    path = cache.put(key, PAYLOAD)
    path.write_bytes(corrupt(path.read_bytes()))
    assert cache.get(key) is None
    assert not path.exists()
    assert cache.on_event.log == [("plan_cache_invalid", {"key": key, "path": str(path), "why": why})]
    cache.put(key, PAYLOAD)  # the rebuilt plan replaces it
    assert cache.get(key) == PAYLOAD


def test_file_for_another_key_is_not_trusted(cache):
    key_a, key_b = cache.key(**PARTS), cache.key(**{**PARTS, "capacity": 16})
    cache.put(key_a, PAYLOAD)
    os.replace(cache.path(key_a), cache.path(key_b))  # e.g. a file copied under the wrong name
    assert cache.get(key_b) is None
    assert cache.on_event.log[0][1]["why"] == f"file holds the plan for key {key_a}"


def test_failed_write_leaves_the_old_plan_and_no_temp_file(cache, monkeypatch):
    key = cache.key(**PARTS)
    cache.put(key, PAYLOAD)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(plan_cache_module.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        cache.put(key, b"new plan that never lands")
    monkeypatch.undo()
    assert cache.get(key) == PAYLOAD
    assert sorted(p.name for p in cache.dir.iterdir()) == [f"{key}.plan"]


def test_concurrent_writers_and_readers_never_see_half_a_plan(cache):
    key = cache.key(**PARTS)
    payloads = [bytes([i]) * (256 * 1024 + i) for i in range(2)]
    seen: set[int] = set()
    errors: list[BaseException] = []
    start = threading.Barrier(3)

    def writer(payload: bytes) -> None:
        try:
            start.wait()
            for _ in range(30):
                cache.put(key, payload)
        except BaseException as exc:  # reported below
            errors.append(exc)

    def reader() -> None:
        try:
            start.wait()
            for _ in range(200):
                data = cache.get(key)
                if data is not None:
                    assert data in payloads
                    seen.add(len(data))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(p,)) for p in payloads] + [threading.Thread(target=reader)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors and cache.on_event.log == []  # never an invalid file
    assert cache.get(key) in payloads
    assert [p.suffix for p in cache.dir.iterdir()] == [".plan"]


def test_stale_temp_files_are_removed_fresh_ones_kept(tmp_path):
    stale, fresh = tmp_path / ".abc.123.tmp", tmp_path / ".abc.456.tmp"
    stale.write_bytes(b"half")
    fresh.write_bytes(b"half")
    old = time.time() - 2 * plan_cache_module.STALE_TEMP_S
    os.utime(stale, (old, old))
    PlanCache(tmp_path)
    assert not stale.exists() and fresh.exists()


def test_invalid_key_is_refused(cache):
    for key in ["../escape", "", "a/b", "x" * 200]:
        with pytest.raises(ValueError):
            cache.path(key)


def test_hash_file(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"weights" * 1000)
    digest = hash_file(path, chunk=100)
    assert digest == hash_file(path) and len(digest) == 64
    path.write_bytes(b"weights" * 1000 + b"!")
    assert hash_file(path) != digest


def test_load_or_build(tmp_path: Path):
    assert not supports_plans(FakeBuilder()) and supports_plans(FakePlanBuilder())
    plain = FakeBuilder()
    engine, cached = load_or_build(plain, 4, PlanCache(tmp_path))
    assert (engine.capacity, cached, plain.builds) == (4, False, [4])
    builder = FakePlanBuilder()
    engine, cached = load_or_build(builder, 4, None)  # no cache: a plain build
    assert (cached, builder.plan_builds) == (False, [])
    cache = PlanCache(tmp_path)
    assert load_or_build(builder, 4, cache)[1] is False and builder.plan_builds == [4]
    assert load_or_build(builder, 4, cache)[1] is True and builder.plan_builds == [4]
    assert load_or_build(FakePlanBuilder(key_parts={"precision": "FP16"}), 4, cache)[1] is False


def test_prepare_plan_builds_once_and_loads_nothing(tmp_path):
    cache, builder = PlanCache(tmp_path), FakePlanBuilder()
    key, built = prepare_plan(builder, 8, cache)
    assert built and key == cache.key(**builder.plan_key_parts(8)) and cache.get(key) is not None
    assert prepare_plan(builder, 8, cache) == (key, False)
    assert builder.plan_builds == [8] and builder.loads == []


class NoGpuHere(RuntimeError):
    rebuild = False  # like the TensorRT backend's PlanLoadError when no GPU can run plans


def test_load_error_that_rebuilding_cannot_fix_keeps_the_plan(tmp_path):
    cache, builder = PlanCache(tmp_path), FakePlanBuilder()
    key, _ = prepare_plan(builder, 2, cache)

    def refuse(plan, capacity):
        raise NoGpuHere("no GPU")

    builder.load_plan = refuse
    events = Events()
    with pytest.raises(NoGpuHere):
        load_or_build(builder, 2, cache, events)
    assert cache.get(key) is not None and builder.plan_builds == [2]
    assert [k for k, _ in events.log] == ["plan_load_failed"]


def test_unwritable_cache_still_serves_the_built_plan(tmp_path, monkeypatch):
    cache, builder, events = PlanCache(tmp_path), FakePlanBuilder(), Events()

    def read_only(key, payload):
        raise PermissionError(13, "Read-only file system")

    monkeypatch.setattr(cache, "put", read_only)
    engine, cached = load_or_build(builder, 4, cache, events)
    assert (engine.capacity, cached) == (4, False)
    assert [(k, f["capacity"]) for k, f in events.log] == [("plan_cache_write_failed", 4)]
