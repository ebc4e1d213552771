"""Where a migration stream goes and comes from: a connected socket or a snapshot file,
with gathered writes (``sendmsg``/``writev``) and scattered reads (``recvmsg_into``/``readv``)."""
from __future__ import annotations

import io
import os
import socket
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from hv.migration.stream_format import _IOV_BATCH, StreamWriteError


# --------------------------------------------------------------------------------------
# Sinks and sources
# --------------------------------------------------------------------------------------
class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> Any: ...


class Source(Protocol):
    def readinto(self, buf: memoryview) -> int: ...


class SocketChannel:
    """Both ends of a connected socket: ``write``/``writev`` out, ``readinto`` in.

    A TLS socket (``ssl.SSLSocket``) has no ``sendmsg``/``recvmsg_into``: gathered
    writes are coalesced into ``_TLS_CHUNK``-byte blocks, each one ``sendall`` (one copy,
    which encryption makes anyway; one SSL_write per block instead of one per page), and
    scattered reads fill one buffer at a time.
    """

    def __init__(self, sock: Any) -> None:
        self.sock = sock
        self._tls = isinstance(sock, ssl.SSLSocket)
        _size_buffers(sock)

    def write(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def writev(self, buffers: list[bytes | memoryview]) -> None:
        """Send every buffer, in order, with as few ``sendmsg`` calls as the kernel allows."""
        if self._tls:
            _coalesced_sendall(buffers, self.sock.sendall)
            return
        _gather_all(buffers, self.sock.sendmsg)

    def readinto(self, buf: memoryview) -> int:
        return self.sock.recv_into(buf)

    def readv(self, buffers: list[memoryview]) -> int:
        """Scatter-read into ``buffers`` in one ``recvmsg_into`` call (at most IOV_MAX);
        on TLS, into the first buffer only (the reader resumes after a short read)."""
        if self._tls:
            return self.sock.recv_into(buffers[0])
        return self.sock.recvmsg_into(buffers)[0]


_TLS_CHUNK = 256 << 10
# Socket buffers for a UNIX-socket stream (the kernel caps them at net.core.wmem_max /
# rmem_max: 4 MiB on this project's hosts, 208 KiB on older kernels). A UNIX stream socket has
# no receive queue limit of its own: the sender's SO_SNDBUF bounds what is in flight.
# With the default ~208 KiB the source is woken ~5 times per MiB to refill it. The native
# sender moves RAM_LIVE pages into the socket by reference (stream_native.LiveSender),
# and then the in-flight window is what paces the stream: 512 MiB guest, 3/4 written,
# interleaved, medians of 6: 4 MiB 99-111 ms, 1 MiB 131-133 ms, 208 KiB 198-220 ms
# (copying the pages: 125 ms at 4 MiB, 136 ms at 1 MiB). TCP keeps the kernel's
# autotuning (a fixed SO_RCVBUF would switch it off, and it grows further by itself).
STREAM_SOCKET_BUFFER = 4 << 20


def _size_buffers(sock: Any) -> None:
    if getattr(sock, "family", None) != socket.AF_UNIX:
        return
    for option in (socket.SO_SNDBUF, socket.SO_RCVBUF):
        try:
            if sock.getsockopt(socket.SOL_SOCKET, option) < STREAM_SOCKET_BUFFER:
                sock.setsockopt(socket.SOL_SOCKET, option, STREAM_SOCKET_BUFFER)
        except OSError:  # not a real socket, or the kernel refuses: keep its default
            pass


def _coalesced_sendall(buffers: list[bytes | memoryview], sendall: Callable[[bytes | memoryview], Any]) -> None:
    """Send ``buffers`` in order as blocks of about ``_TLS_CHUNK`` bytes (a buffer that is
    itself that large goes out as it is, without a copy)."""
    pending: list[bytes | memoryview] = []
    size = 0
    for buf in buffers:
        if not len(buf):
            continue
        if len(buf) >= _TLS_CHUNK:
            if pending:
                sendall(b"".join(pending))
                pending, size = [], 0
            sendall(buf)
            continue
        pending.append(buf)
        size += len(buf)
        if size >= _TLS_CHUNK:
            sendall(b"".join(pending))
            pending, size = [], 0
    if pending:
        sendall(b"".join(pending))


def _gather_all(buffers: list[bytes | memoryview], send: Callable[[list[memoryview]], int]) -> None:
    """Write every buffer, in order, through ``send`` (sendmsg / writev: takes at most
    ``_IOV_BATCH`` buffers, returns the bytes it took), resuming after short writes."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        batch = pending[:_IOV_BATCH]
        done = send(batch)
        # Drop fully written buffers, trim a partially written one.
        i = 0
        while i < len(batch) and done >= len(batch[i]):
            done -= len(batch[i])
            i += 1
        del pending[:i]
        if done:
            pending[0] = pending[0][done:]


class FileChannel:
    """A binary file object as a sink (``write``) or a source (``readinto``)."""

    def __init__(self, fileobj: Any) -> None:
        self.file = fileobj

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            n = self.file.write(view)
            if n is None:  # non-blocking raw file with nothing written: not supported
                raise StreamWriteError("file sink would block")
            view = view[n:]

    def writev(self, buffers: list[bytes | memoryview]) -> None:
        """Gather-write (``os.writev`` on an unbuffered file, else one buffer at a time)."""
        if not isinstance(self.file, io.FileIO):
            for buf in buffers:
                self.write(buf)
            return
        fd = self.file.fileno()
        _gather_all(buffers, lambda batch: os.writev(fd, batch))

    def readinto(self, buf: memoryview) -> int:
        n = self.file.readinto(buf)
        return n or 0

    def readv(self, buffers: list[memoryview]) -> int:
        """Scatter-read (``os.readv`` on an unbuffered file, else one buffer at a time)."""
        if isinstance(self.file, io.FileIO):
            return os.readv(self.file.fileno(), buffers)
        return self.readinto(buffers[0])


def _write_all(sink: Any, buffers: list[bytes | memoryview]) -> None:
    writev = getattr(sink, "writev", None)
    if writev is not None:
        writev(buffers)
    else:
        for buf in buffers:
            if len(buf):
                sink.write(buf)
