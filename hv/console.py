"""Where the guest console goes: stdout, a file, or nowhere."""
from __future__ import annotations

import os
import threading
from pathlib import Path

from hv.config import SerialConfig


class FdSink:
    """Writes console bytes straight to a file descriptor, unbuffered.

    A closed reader (EPIPE) silences the console rather than stopping the guest.
    """

    def __init__(self, fd: int, owned: bool) -> None:
        self.fd = fd
        self.owned = owned
        self._broken = False

    def write(self, data: bytes) -> None:
        if self._broken:
            return
        try:
            view = memoryview(data)
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except (BrokenPipeError, OSError):
            self._broken = True

    def close(self) -> None:
        if self.owned:
            os.close(self.fd)


class NullSink:
    def write(self, data: bytes) -> None:
        pass

    def close(self) -> None:
        pass


class BufferSink:
    """Collects console output in memory (in-process use and tests)."""

    def __init__(self) -> None:
        self._data = bytearray()
        self._lock = threading.Lock()
        self._grew = threading.Condition(self._lock)

    def write(self, data: bytes) -> None:
        with self._lock:
            self._data += data
            self._grew.notify_all()

    def getvalue(self) -> bytes:
        with self._lock:
            return bytes(self._data)

    def wait_for(self, needle: bytes, timeout: float) -> bool:
        with self._lock:
            return self._grew.wait_for(lambda: needle in self._data, timeout)

    def close(self) -> None:
        pass


def open_console(config: SerialConfig) -> FdSink | NullSink:
    if config.kind == "stdio":
        return FdSink(1, owned=False)
    if config.kind == "file":
        assert config.path is not None
        fd = os.open(Path(config.path), os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        return FdSink(fd, owned=True)
    return NullSink()
