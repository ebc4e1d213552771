"""StreamWriter.gathered(): the records written in the block go out in one gathered write,
the same bytes as written one by one; a block that raises sends nothing of itself."""
from __future__ import annotations

import socket

import pytest

from hv.migration.stream import SocketChannel, StreamWriter
from tests.migration.test_migration_stream import Collect, x86_state


class CountingChannel(SocketChannel):
    """A real socket channel that counts its gathered writes."""

    def __init__(self, sock: socket.socket) -> None:
        super().__init__(sock)
        self.writes = 0

    def writev(self, buffers: list) -> None:  # type: ignore[override]
        self.writes += 1
        super().writev(buffers)


def state_records(writer: StreamWriter) -> None:
    for i in range(3):
        writer.write_cpu(i, x86_state(i))
    writer.write_device("serial0", "serial0", 1, {"lcr": 3})
    writer.write_end()


def test_gathered_records_are_one_write_of_the_same_bytes() -> None:
    one_by_one = Collect()
    state_records(StreamWriter(one_by_one))
    a, b = socket.socketpair()
    with a, b:
        channel = CountingChannel(a)
        writer = StreamWriter(channel)
        with writer.gathered():
            state_records(writer)
            assert channel.writes == 0 and writer.bytes_written == 0   # held until the block ends
        assert channel.writes == 1 and writer.at_boundary
        a.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := b.recv(1 << 16):
            data += chunk
    assert data == bytes(one_by_one.data)
    assert writer.bytes_written == len(data)


def test_a_block_that_raises_sends_nothing() -> None:
    out = Collect()
    writer = StreamWriter(out)
    with pytest.raises(RuntimeError), writer.gathered():
        writer.write_cpu(0, x86_state(0))
        raise RuntimeError("save failed")
    assert out.data == b"" and writer.at_boundary
    writer.write_end()                      # the writer goes on as before
    assert len(out.data) > 0
