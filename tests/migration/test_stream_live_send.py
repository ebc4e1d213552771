"""The native RAM_LIVE sender (``hvs_send_live``, :class:`hv.migration.stream_native.LiveSender`):
a running guest's pages framed, checksummed and sent to a plain socket by native code, one
call per chunk of pages.

It must be invisible on the wire: the same bytes the Python writer sends for the same
pages and section size (through 4 KiB kernel buffers into guest RAM:
test_stream_native.py's round trip, ``live``), whether it copies the pages into the socket
or, on a UNIX socket, moves them by reference (``vmsplice`` + ``splice``); and a peer that
hangs up or stops reading must end the write with the same errors as a Python send (a cut
record, a socket timeout the engine recognises as x-stall-timeout).
"""
from __future__ import annotations

import socket
import struct
import threading
import time
import zlib

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


def live_writer(sink: object, run_pages: int, splice: bool | None = None) -> StreamWriter:
    """A writer that sends RAM_LIVE sections; ``splice`` (a socket sink): its native sender
    moves pages by reference (True) or copies them (False) instead of choosing itself."""
    writer = StreamWriter(sink, run_pages=run_pages)  # type: ignore[arg-type]
    writer.live_ram = True   # as once the destination's ram-live notice arrived
    if splice is not None:
        writer._live_sender = stream_native.LiveSender(sink.sock, run_pages, splice=splice)  # type: ignore[attr-defined]
    return writer


SPLICE = pytest.mark.parametrize("splice", [True, False], ids=["spliced", "copied"])


@SPLICE
@pytest.mark.parametrize("run_pages", [1, 5, 64, 256, 1024])
def test_native_live_sections_are_the_python_writers_bytes(run_pages: int, splice: bool) -> None:
    pages = 2100
    mem = mixed_memory(pages, seed=3)
    python = Collect()
    live_writer(python, run_pages).write_ram(7, mem.page_view(0, pages))
    a, b = socket.socketpair()
    received = bytearray()
    with a, b:
        writer = live_writer(SocketChannel(a), run_pages, splice)
        native_sends = native_live_sends(writer)
        a.settimeout(30)
        thread = drain(b, received)
        writer.write_ram(7, mem.page_view(0, pages))
        assert native_sends == [pages]                    # the native path sent them
        assert writer._live_sender is not None and writer._live_sender.splicing is splice  # not refused
        a.shutdown(socket.SHUT_WR)
        thread.join(30)
    assert bytes(received) == bytes(python.data)
    assert writer.bytes_written == len(received)
    assert set(section_kinds(bytes(received))) == {SectionType.RAM_LIVE}
    mem.close()


@SPLICE
def test_a_peer_that_hung_up_fails_the_write_and_cuts_the_record(splice: bool) -> None:
    mem = mixed_memory(512, seed=2)
    a, b = socket.socketpair()
    with a:
        writer = live_writer(SocketChannel(a), 64, splice)
        b.close()
        with pytest.raises(StreamWriteError, match="migration stream write failed"):
            writer.write_ram(0, mem.page_view(0, 512))
        assert not writer.at_boundary      # nothing (not even CANCEL) may follow a cut record
    mem.close()


@SPLICE
def test_a_peer_that_stops_reading_times_out_as_a_socket_would(splice: bool) -> None:
    """The socket's timeout (x-stall-timeout) bounds each wait for room, as a Python
    ``sendmsg`` would: the error says "timed out" and the engine sees a timeout."""
    pages = 8192                         # 32 MiB: far beyond what the kernel buffers hold
    mem = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    mem.write_pages(0, b"\x77" * (pages * PAGE_SIZE))
    a, b = socket.socketpair()
    with a, b:
        writer = live_writer(SocketChannel(a), 1024, splice)
        assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) < pages * PAGE_SIZE // 2
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


@SPLICE
def test_a_spliced_page_is_read_where_it_lies_and_a_rewrite_before_then_tears_it(splice: bool) -> None:
    """Spliced, the socket holds references to the guest's pages, not copies: a page the
    guest rewrites after the send but before the destination reads it arrives as rewritten,
    and its page checksum (taken at the send) no longer matches, so the destination does
    not count it as arrived (test_stream_live.py) and the dirty log sends it again.
    Copied, the socket holds the page as it was at the send."""
    pages = 16
    mem = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)])
    old = bytes(range(256)) * 16
    mem.write_pages(0, old * pages)
    a, b = socket.socketpair()
    with a, b:
        sender = stream_native.LiveSender(a, pages, splice=splice)
        a.settimeout(30)
        _, normal, sent = sender.send(mem.page_view(0, pages), 0, pages, None)
        assert normal == pages and sender.splicing is splice
        new = b"\xee" * PAGE_SIZE
        mem.write_pages(3, new)                    # after the send, before the read
        a.shutdown(socket.SHUT_WR)
        received = bytearray()
        drain(b, received).join(30)
    assert len(received) == sent
    framing = SECTION_HEADER.size + 16 + pages       # section header, run header, kind map
    crcs = struct.unpack_from(f"<{pages}I", received, framing)
    data = framing + 4 * pages
    page3 = bytes(received[data + 3 * PAGE_SIZE:data + 4 * PAGE_SIZE])
    assert page3 == (new if splice else old)
    assert crcs[3] == zlib.crc32(old)               # the checksum of the page as sent
    assert all(bytes(received[data + i * PAGE_SIZE:data + (i + 1) * PAGE_SIZE]) == old for i in range(pages) if i != 3)


def test_pages_are_spliced_by_default_only_on_a_unix_socket_with_a_large_send_buffer() -> None:
    """Over TCP loopback splicing measured no faster, and with the small send buffer of an
    older kernel's default cap it was slower than copying (stream_native.LiveSender)."""
    a, b = socket.socketpair()
    with a, b:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 64 << 10)
        assert not stream_native.LiveSender(a, 64).splicing
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        large = a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= stream_native.SPLICE_MIN_SNDBUF
        assert stream_native.LiveSender(a, 64).splicing is large
    listener = socket.create_server(("127.0.0.1", 0))
    with listener, socket.create_connection(listener.getsockname()) as client:
        client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        assert not stream_native.LiveSender(client, 64).splicing
