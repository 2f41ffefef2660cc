"""Serialized engine plans on disk, keyed by everything that changes a plan, never trusted blindly.

Key: sha256 over the sorted key parts (model file hash, backend name and version, device and compute
capability, precision, capacity, input dims, ...) plus this file format's version. File: a header
(magic, format version, the key, payload length, sha256 of the payload) then the payload. A file that
is truncated, corrupt, of another format or for another key is deleted and reported, and `get` says
"miss", so the caller rebuilds and replaces it. Writes go to a temp file in the same directory, are
fsynced and renamed over the target: readers, also in another server sharing the directory, see the
old file or the new one, never half of one.

A builder that can use the cache offers `plan_key_parts(capacity) -> dict`,
`build_plan(capacity) -> bytes` and `load_plan(plan, capacity) -> Engine`; `load_or_build` uses them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
MAGIC = b"TRTSPLAN"
_HEAD = struct.Struct("<8sHH")  # magic, format version, key length; then the key
_TAIL = struct.Struct("<Q32s")  # payload length, sha256 of the payload; then the payload
_KEY_RE = re.compile(r"[A-Za-z0-9_.-]{1,128}")
STALE_TEMP_S = 3600.0

log = logging.getLogger(__name__)
OnEvent = Callable[..., None]


def hash_file(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 hex digest of a file's bytes (a model file, for the key)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class ModelDigest:
    """sha256 of a model file, or of it and the files beside it (external weights) by name: the plan
    key's model part. Recomputed only when a file's size or mtime changes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._cached: tuple[tuple, str] | None = None

    def __call__(self) -> str:
        beside = sorted(p for p in self.path.parent.iterdir()
                        if p.is_file() and p != self.path and not p.name.startswith("."))
        files = [self.path, *beside]
        stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
        if self._cached is None or self._cached[0] != stamp:
            if beside:
                lines = "".join(f"{p.name}\0{hash_file(p)}\n" for p in files)
                digest = hashlib.sha256(lines.encode()).hexdigest()
            else:
                digest = hash_file(self.path)
            self._cached = (stamp, digest)
        return self._cached[1]


def _jsonable(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.hex()
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=str)
    return str(value)  # Path, enums, numpy scalars


def emit(on_event: OnEvent | None, kind: str, **fields: Any) -> None:
    """Report an event; a failing metrics callback must never break serving."""
    if on_event is None:
        return
    try:
        on_event(kind, **fields)
    except Exception:
        log.exception("on_event(%r) failed", kind)


class PlanCache:
    """A directory of plan files. `on_event(kind, **fields)` hears "plan_cache_invalid" (key, path, why)."""

    def __init__(self, directory: Path | str, on_event: OnEvent | None = None) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.on_event = on_event
        self._remove_stale_temps()

    @staticmethod
    def key(**parts: Any) -> str:
        """sha256 hex over the sorted parts (values: JSON types, bytes, Paths, enums)."""
        blob = json.dumps({"plan_format": FORMAT_VERSION, "parts": parts}, sort_keys=True,
                          separators=(",", ":"), default=_jsonable)
        return hashlib.sha256(blob.encode()).hexdigest()

    def path(self, key: str) -> Path:
        if not _KEY_RE.fullmatch(key):
            raise ValueError(f"invalid plan cache key {key!r}")
        return self.dir / f"{key}.plan"

    def get(self, key: str) -> bytes | None:
        """The payload stored under `key`, or None (missing, or invalid: then deleted and reported)."""
        path = self.path(key)
        try:
            with open(path, "rb") as f:
                stat = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            return None
        payload, why = _decode(key, data)
        if payload is None:
            self._invalid(key, path, stat, why)
        return payload

    def put(self, key: str, payload: bytes) -> Path:
        """Store atomically (temp file in the same directory, fsync, rename); last writer wins."""
        path = self.path(key)
        raw = key.encode()
        header = _HEAD.pack(MAGIC, FORMAT_VERSION, len(raw)) + raw + _TAIL.pack(
            len(payload), hashlib.sha256(payload).digest()
        )
        fd, tmp = tempfile.mkstemp(prefix=f".{key}.", suffix=".tmp", dir=self.dir)
        try:
            with os.fdopen(fd, "wb") as f:
                os.fchmod(f.fileno(), 0o644)
                f.write(header)
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(self.dir)
        return path

    def discard(self, key: str) -> None:
        """Delete the plan under `key` (e.g. the backend refused to load it)."""
        self.path(key).unlink(missing_ok=True)

    def _invalid(self, key: str, path: Path, stat: os.stat_result, why: str) -> None:
        log.warning("plan cache: %s is invalid (%s); it will be rebuilt", path, why)
        try:
            now = os.stat(path)
            # Delete only the file we read: another server may have just renamed a good one over it.
            if (now.st_ino, now.st_dev, now.st_mtime_ns) == (stat.st_ino, stat.st_dev, stat.st_mtime_ns):
                path.unlink()
        except FileNotFoundError:
            pass
        emit(self.on_event, "plan_cache_invalid", key=key, path=str(path), why=why)

    def _remove_stale_temps(self) -> None:
        # Temp files left by a writer that died; a live writer's temp file is young.
        cutoff = time.time() - STALE_TEMP_S
        for tmp in self.dir.glob(".*.tmp"):
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                pass


def _decode(key: str, data: bytes) -> tuple[bytes | None, str]:
    if len(data) < _HEAD.size:
        return None, f"truncated header ({len(data)} bytes)"
    magic, version, key_len = _HEAD.unpack_from(data)
    if magic != MAGIC:
        return None, "bad magic (not a trtserve plan file)"
    if version != FORMAT_VERSION:
        return None, f"format version {version}, expected {FORMAT_VERSION}"
    start = _HEAD.size + key_len + _TAIL.size
    if len(data) < start:
        return None, f"truncated header ({len(data)} bytes)"
    stored_key = data[_HEAD.size:_HEAD.size + key_len].decode(errors="replace")
    if stored_key != key:
        return None, f"file holds the plan for key {stored_key}"
    length, digest = _TAIL.unpack_from(data, _HEAD.size + key_len)
    payload = data[start:]
    if len(payload) != length:
        return None, f"payload is {len(payload)} bytes, header says {length}"
    if hashlib.sha256(payload).digest() != digest:
        return None, "payload checksum mismatch"
    return payload, ""


def _fsync_dir(directory: Path) -> None:
    # Makes the rename durable; some filesystems refuse to open directories, which is fine.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def supports_plans(builder: Any) -> bool:
    """True when the builder can key, build and load serialized plans."""
    return all(callable(getattr(builder, m, None)) for m in ("plan_key_parts", "build_plan", "load_plan"))


def load_or_build(builder: Any, capacity: int, cache: PlanCache | None,
                  on_event: OnEvent | None = None) -> tuple[Any, bool]:
    """(engine, loaded_from_cache). Without a cache or plan support: `builder.build(capacity)`.

    A cached plan the backend refuses to load is discarded and rebuilt ("plan_load_failed" event),
    unless the error says rebuilding cannot help (an exception with `rebuild = False`, e.g. no GPU
    here): then the plan is kept and the error raised. A plan that cannot be written is still used
    ("plan_cache_write_failed" event)."""
    if cache is None or not supports_plans(builder):
        return builder.build(capacity), False
    key = cache.key(**builder.plan_key_parts(capacity))
    plan = cache.get(key)
    if plan is not None:
        try:
            return builder.load_plan(plan, capacity), True
        except Exception as exc:
            emit(on_event, "plan_load_failed", capacity=capacity, key=key, error=str(exc))
            if getattr(exc, "rebuild", True) is False:
                raise
            cache.discard(key)
    plan = builder.build_plan(capacity)
    _store(cache, key, plan, capacity, on_event)
    return builder.load_plan(plan, capacity), False


def prepare_plan(builder: Any, capacity: int, cache: PlanCache,
                 on_event: OnEvent | None = None) -> tuple[str, bool]:
    """Make sure the cache holds a valid plan for `capacity`, loading nothing (so `trtserve build` can
    fill a cache where plans cannot run): (key, True) when it was built now, (key, False) when a valid
    one was there."""
    key = cache.key(**builder.plan_key_parts(capacity))
    if cache.get(key) is not None:
        return key, False
    _store(cache, key, builder.build_plan(capacity), capacity, on_event)
    return key, True


def _store(cache: PlanCache, key: str, plan: bytes, capacity: int, on_event: OnEvent | None) -> None:
    try:
        cache.put(key, plan)
    except OSError as exc:
        emit(on_event, "plan_cache_write_failed", capacity=capacity, key=key, error=str(exc))
