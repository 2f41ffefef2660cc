"""A worker's connections to its frontends, served from the worker's main thread.

The worker's loop waits here for frames from every frontend (the parent's pipe, and the extra frontend
processes that connect through the listening socket) and for the engine thread's "batch done" (`wake`),
reads what arrived on each connection without blocking, and queues its answers per connection, written
in one go (`flush`). One receiving thread instead of one per connection: receiver threads cost a GIL
hand-over per request, and under load the batch loop waited for them (bench/results/gpu/analysis.md).
"""

from __future__ import annotations

import logging
import selectors
import socket
from collections.abc import Iterator
from multiprocessing.shared_memory import SharedMemory
from typing import Any

from service.errors import ServeError
from service.workers import protocol
from service.workers.shm import attach

log = logging.getLogger("trtserve.worker")
READ_CHUNK = 1 << 16


class Channel:
    """One frontend: its socket, the shared-memory arena its requests live in, answers not yet sent."""

    def __init__(self, sock: socket.socket, shm: SharedMemory | None, primary: bool) -> None:
        self.sock = sock
        self.shm = shm  # referenced for as long as requests may hold views of its buffer
        self.buf = shm.buf if shm is not None else None
        self.primary = primary
        self.closed = False
        self._inbox = bytearray()
        self._outbox: list[bytes] = []

    def send(self, header: dict[str, Any], payload: bytes | None = None) -> None:
        """Queue a JSON frame; `Connections.flush` writes it."""
        self._outbox.append(protocol.framed(header, payload))

    def send_frame(self, frame: bytes) -> None:
        """Queue a frame already framed (a RESULT)."""
        self._outbox.append(frame)

    def error(self, request_id: int, exc: ServeError) -> None:
        self.send({"op": protocol.ERROR, "id": request_id, "error": exc.to_wire()})

    def _read(self) -> list[bytes] | None:
        """The complete frames that arrived; None at end of stream."""
        try:
            data = self.sock.recv(READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError:
            return None
        if not data:
            return None
        self._inbox += data
        return protocol.split_framed(self._inbox)

    def _flush(self) -> None:
        if not self._outbox or self.closed:
            self._outbox.clear()
            return
        data = b"".join(self._outbox)
        self._outbox.clear()
        try:
            try:
                sent = self.sock.send(data)
            except BlockingIOError:
                sent = 0
            if sent < len(data):  # rare: the socket buffer is full; a frontend always reads, it empties soon
                self.sock.setblocking(True)
                try:
                    self.sock.sendall(memoryview(data)[sent:])
                finally:
                    self.sock.setblocking(False)
        except OSError:
            if self.primary:
                raise
            self.closed = True  # an extra frontend went away; its requests have nobody left to answer

    def abandon(self) -> None:
        """Stop serving an extra frontend whose frames make no sense: its connection is closed at the next
        flush, which fails its requests on its side (it cannot be the parent's pipe: that ends the worker)."""
        if not self.primary:
            self.closed = True


class Connections:
    """Every frontend connection of one worker, and the listening socket new ones arrive on."""

    def __init__(self, primary: socket.socket, arena_name: str, listener: socket.socket | None) -> None:
        self._selector = selectors.DefaultSelector()
        self._channels: list[Channel] = []  # what `flush` writes to, without walking the selector's map
        self.primary = self._add(primary, attach(arena_name), primary=True)
        self._listener = listener
        if listener is not None:
            listener.setblocking(False)
            self._selector.register(listener, selectors.EVENT_READ, None)
        self._waker, self._wakeup = socket.socketpair()
        self._wakeup.setblocking(False)
        self._selector.register(self._wakeup, selectors.EVENT_READ, "wake")
        self.opened: list[Channel] = []  # extra frontends that arrived since the caller last looked
        self.closed: list[Channel] = []  # ... and those that left

    def _add(self, sock: socket.socket, shm: SharedMemory | None, primary: bool) -> Channel:
        sock.setblocking(False)
        channel = Channel(sock, shm, primary)
        self._selector.register(sock, selectors.EVENT_READ, channel)
        self._channels.append(channel)
        return channel

    def wake(self) -> None:
        """End a `receive` wait now (thread-safe: the engine thread calls it when a batch is done)."""
        self._waker.send(b"\0")

    def receive(self, timeout: float) -> Iterator[tuple[Channel, bytes]]:
        """Wait up to `timeout` seconds for frames or a `wake`; yields each frame that arrived, with its
        channel. EOFError when the parent's pipe closed (the parent is gone)."""
        for key, _ in self._selector.select(timeout):
            if key.data == "wake":
                try:
                    while len(self._wakeup.recv(64)) == 64:  # drain: several wakes need one read
                        pass
                except BlockingIOError:
                    pass
            elif key.fileobj is self._listener:
                self._accept()
            elif isinstance(key.data, Channel):
                channel: Channel = key.data
                frames = channel._read()
                if frames is None:
                    self._drop(channel)
                    continue
                for frame in frames:
                    yield channel, frame
            else:
                yield from self._greet(key.fileobj)

    def flush(self) -> None:
        """Write every queued answer, one write per connection."""
        gone = []
        for channel in self._channels:
            if channel._outbox:
                channel._flush()
            if channel.closed:
                gone.append(channel)
        for channel in gone:
            self._drop(channel)

    def _accept(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        sock.setblocking(False)
        self._selector.register(sock, selectors.EVENT_READ, "hello")  # first frame (naming the arena) not read

    def _greet(self, sock: socket.socket) -> Iterator[tuple[Channel, bytes]]:
        """The first frame of an extra frontend names its arena (short: it arrives in the first read);
        requests sent right behind it may have arrived with it."""
        self._selector.unregister(sock)
        pending = Channel(sock, None, primary=False)
        frames = pending._read()
        try:
            if not frames:
                raise EOFError("connection closed before its first frame")
            header, _ = protocol.decode(frames[0])
            shm = attach(str(header["arena"]))
        except (EOFError, OSError, KeyError, ValueError) as exc:
            log.warning("frontend connection refused: %s", exc)
            sock.close()
            return
        channel = self._add(sock, shm, primary=False)
        channel._inbox = pending._inbox  # a frame cut in half by the read
        self.opened.append(channel)
        for frame in frames[1:]:
            yield channel, frame

    def _drop(self, channel: Channel) -> None:
        if channel.primary:
            raise EOFError("the parent closed its pipe")
        channel.closed = True
        if channel in self._channels:
            self._channels.remove(channel)
        try:
            self._selector.unregister(channel.sock)
        except (KeyError, ValueError):
            return
        channel.sock.close()
        self.closed.append(channel)
