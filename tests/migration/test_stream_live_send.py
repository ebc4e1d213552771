"""The native RAM_LIVE sender (``hvs_send_live``, :class:`hv.migration.stream_native.LiveSender`):
a running guest's pages framed, checksummed and sent to a plain socket by native code, one
call per chunk of pages.

It must be invisible on the wire: the same bytes the Python writer sends for the same
pages and section size (through 4 KiB kernel buffers into guest RAM:
test_stream_native.py's round trip, ``live``); and a peer that hangs up or stops reading
must end the write with the same errors as a Python send (a cut record, a socket timeout
the engine recognises as x-stall-timeout).
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from hv.memory import GuestMemory, RegionSpec
from hv.migration import stream_native
from hv.migration.engine import timed_out
from hv.migration.stream import (
    CRC,
    PAGE_SIZE,
    SECTION_HEADER,
    SectionType,
    SocketChannel,
    StreamWriter,
)
from hv.migration.stream_format import StreamWriteError
from tests.migration.test_migration_stream import Collect
from tests.migration.test_stream_native import mixed_memory, native, native_live_sends

pytestmark = native


def drain(sock: socket.socket, into: bytearray) -> threading.Thread:
    """Read ``sock`` to its end in a thread, into ``into``."""
    def run() -> None:
        while chunk := sock.recv(1 << 16):
            into.extend(chunk)
    thread = threading.Thread(target=run)
    thread.start()
    return thread


def section_kinds(data: bytes) -> list[int]:
    """The type of every section in ``data`` (sections only, no preamble)."""
    kinds, offset = [], 0
    while offset < len(data):
        kind, _, _, length = SECTION_HEADER.unpack_from(data, offset)
        kinds.append(kind)
        offset += SECTION_HEADER.size + length + CRC.size
    assert offset == len(data)
    return kinds


def live_writer(sink: object, run_pages: int) -> StreamWriter:
    writer = StreamWriter(sink, run_pages=run_pages)  # type: ignore[arg-type]
    writer.live_ram = True   # as once the destination's ram-live notice arrived
    return writer


@pytest.mark.parametrize("run_pages", [1, 5, 64, 256, 1024])
def test_native_live_sections_are_the_python_writers_bytes(run_pages: int) -> None:
    pages = 2100
    mem = mixed_memory(pages, seed=3)
    python = Collect()
    live_writer(python, run_pages).write_ram(7, mem.page_view(0, pages))
    a, b = socket.socketpair()
    received = bytearray()
    with a, b:
        writer = live_writer(SocketChannel(a), run_pages)
        native_sends = native_live_sends(writer)
        a.settimeout(30)
        thread = drain(b, received)
        writer.write_ram(7, mem.page_view(0, pages))
        assert native_sends == [pages]                    # the native path sent them
        a.shutdown(socket.SHUT_WR)
        thread.join(30)
    assert bytes(received) == bytes(python.data)
    assert writer.bytes_written == len(received)
    assert set(section_kinds(bytes(received))) == {SectionType.RAM_LIVE}
    mem.close()


def test_a_peer_that_hung_up_fails_the_write_and_cuts_the_record() -> None:
    mem = mixed_memory(512, seed=2)
    a, b = socket.socketpair()
    with a:
        writer = live_writer(SocketChannel(a), 64)
        b.close()
        with pytest.raises(StreamWriteError, match="migration stream write failed"):
            writer.write_ram(0, mem.page_view(0, 512))
        assert not writer.at_boundary      # nothing (not even CANCEL) may follow a cut record
    mem.close()


def test_a_peer_that_stops_reading_times_out_as_a_socket_would() -> None:
    """The socket's timeout (x-stall-timeout) bounds each wait for room, as a Python
    ``sendmsg`` would: the error says "timed out" and the engine sees a timeout."""
    pages = 4096                         # 16 MiB: far beyond what the kernel buffers hold
    mem = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    mem.write_pages(0, b"\x77" * (pages * PAGE_SIZE))
    a, b = socket.socketpair()
    with a, b:
        writer = live_writer(SocketChannel(a), 1024)
        a.settimeout(0.2)
        started = time.monotonic()
        with pytest.raises(StreamWriteError, match="timed out") as caught:
            writer.write_ram(0, mem.page_view(0, pages))
        assert time.monotonic() - started < 30    # bounded: it did not wait for good
        assert timed_out(caught.value)
        assert not writer.at_boundary
    # (mem is not closed: the traceback pytest keeps still holds views of it)


def test_larger_sections_than_one_call_holds_keep_the_python_path() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert stream_native.live_sender_for(SocketChannel(a), stream_native.LIVE_SEND_MAX_RUN_PAGES) is not None
        assert stream_native.live_sender_for(SocketChannel(a), stream_native.LIVE_SEND_MAX_RUN_PAGES + 1) is None
    assert stream_native.live_sender_for(Collect(), 64) is None
