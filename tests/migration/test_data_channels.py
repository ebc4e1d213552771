"""Data channels (format 1.6): the full pass over several connections.

The engine and the destination are real (OutgoingMigration, receive_migration with its
listener), over real TCP and UNIX sockets on loopback; the untrusted-input cases play the
source by hand with StreamWriter, as a broken or hostile peer would."""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from hv.errors import StreamError
from hv.migration.engine import MigrationParameters, OutgoingMigration
from hv.migration.stream import (
    CHANNELS_MINOR,
    PAGE_SIZE,
    ChannelSection,
    ChannelsEndSection,
    EndSection,
    FileChannel,
    Fingerprint,
    RamSection,
    SectionType,
    SocketChannel,
    StreamKind,
    StreamReader,
    StreamWriter,
    announce_channels,
    read_reply,
    send_reply,
)
from hv.migration.stream_format import LIVE_NOTICE
from hv.migration.stream_writer import NOTICES, take_notice
from hv.migration.transport import Listener, MigrationUri, connect, listen
from hv_fixtures import guest
from tests.helpers import machine_in_process, migration_status_for, receive_in_thread
from tests.migration.test_migration_stream import Collect


# -- the stream: sections and notices ----------------------------------------------------------
class _Ram:
    def __init__(self, pages: int) -> None:
        self.buf = bytearray(pages * PAGE_SIZE)

    def page_view(self, page: int, count: int = 1) -> memoryview:
        return memoryview(self.buf)[page * PAGE_SIZE:(page + count) * PAGE_SIZE]


def _pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.settimeout(10)
    b.settimeout(10)
    return a, b


def _read_all(reader: StreamReader) -> list[Any]:
    return [reader.read_section() for _ in iter(lambda: reader.ended, True)]


def test_a_channel_applies_its_pages_where_the_main_stream_counts_them() -> None:
    pages = 64
    ram = _Ram(pages)
    main_out, main_in = _pair()
    data_out, data_in = _pair()
    with main_out, main_in, data_out, data_in:
        main = StreamWriter(SocketChannel(main_out))
        sid = main.write_header("x86_64", "q35", channels=2)
        main.write_config(Fingerprint(arch="x86_64", machine="q35", memory=pages * PAGE_SIZE, vcpus=1))
        payload = os.urandom(32 * PAGE_SIZE)
        main.write_ram(0, bytes(32 * PAGE_SIZE), stable=True)
        data = StreamWriter(SocketChannel(data_out))
        data.write_channel(sid, 1)
        data.write_ram(32, payload, stable=True)
        data.write_end()
        main.write_channels_end(1)
        main.write_round_end(1)
        main.write_cpu(0, _cpu_state())
        main.write_end()

        reader = StreamReader(SocketChannel(main_in), page_count=pages, ram=ram, kind=StreamKind.MIGRATION)
        assert reader.read_section().channels == 2  # HEADER: the offer
        reader.read_section()  # CONFIG
        assert isinstance(reader.read_section(), RamSection)
        channel = StreamReader(SocketChannel(data_in), page_count=pages, ram=ram, kind=StreamKind.CHANNEL,
                               shared=reader.page_maps())
        assert channel.read_section() == ChannelSection(sid, 1)
        assert isinstance(channel.read_section(), RamSection)
        assert isinstance(channel.read_section(), EndSection)
        assert reader.read_section() == ChannelsEndSection(1)
        rest = _read_all(reader)
        assert isinstance(rest[-1], EndSection)  # END: every page arrived, half of them on the channel
        assert bytes(ram.buf[32 * PAGE_SIZE:]) == payload


def _cpu_state() -> Any:
    from hv.state import X86CpuState

    return X86CpuState()


def _channel_stream(*sections: tuple[int, bytes], minor: int = CHANNELS_MINOR) -> bytes:
    out = Collect()
    writer = StreamWriter(out)
    writer.write_preamble(minor=minor)
    for kind, payload in sections:
        writer.write_section(kind, payload)
    return bytes(out.data)


def _channel_json(**fields: Any) -> bytes:
    return json.dumps(fields).encode()


def _ram_payload(start: int, count: int) -> bytes:
    import struct
    return struct.pack("<QII", start, count, 0) + bytes(count)  # zero pages only


@pytest.mark.parametrize(("stream", "message"), [
    (_channel_stream((SectionType.RAM, _ram_payload(0, 1))), "RAM section before CHANNEL"),
    (_channel_stream((SectionType.CHANNEL, _channel_json(stream_id="s", channel=1)),
                     (SectionType.ROUND_END, b"\x01\x00\x00\x00")), "ROUND_END section in a data channel"),
    (_channel_stream((SectionType.CHANNEL, _channel_json(stream_id="s", channel=1)),
                     (SectionType.CHANNEL, _channel_json(stream_id="s", channel=2))), "CHANNEL section out of order"),
    (_channel_stream((SectionType.CHANNEL, _channel_json(stream_id="s", channel=0))), "CHANNEL.channel"),
    (_channel_stream((SectionType.CHANNEL, _channel_json(stream_id="s", channel=8))), "CHANNEL.channel"),
    (_channel_stream((SectionType.CHANNEL, _channel_json(stream_id="s", channel=True))), "CHANNEL.channel"),
    (_channel_stream((SectionType.CHANNEL, _channel_json(stream_id="s", channel=1, extra=1))), "exactly"),
    (_channel_stream((SectionType.CHANNEL, _channel_json(stream_id="s", channel=1)), minor=5),
     "a data channel in a format 1.5 stream"),
    (_channel_stream((SectionType.CHANNEL, _channel_json(stream_id="s", channel=1)),
                     (SectionType.RAM, _ram_payload(60, 8))), "outside guest RAM"),
])
def test_a_channel_refuses_what_it_may_not_carry(stream: bytes, message: str) -> None:
    a, b = _pair()
    with a, b:
        b.sendall(stream)
        b.shutdown(socket.SHUT_WR)
        ram = _Ram(64)
        reader = StreamReader(SocketChannel(a), page_count=64, ram=ram, kind=StreamKind.CHANNEL,
                              shared=(bytearray(64), None))
        with pytest.raises(StreamError, match=message):
            _read_all(reader)
        assert ram.buf == bytearray(64 * PAGE_SIZE)  # nothing was written


def _main_stream(after_config: list[tuple[int, bytes]], minor: int = CHANNELS_MINOR) -> bytes:
    out = Collect()
    writer = StreamWriter(out)
    writer.write_preamble(minor=minor)
    writer.write_header("x86_64", "q35", channels=2)
    writer.write_config(Fingerprint(arch="x86_64", machine="q35", memory=64 * PAGE_SIZE, vcpus=1))
    for kind, payload in after_config:
        writer.write_section(kind, payload)
    return bytes(out.data)


_CHANNELS_END = (SectionType.CHANNELS_END, _channel_json(channels=1))
_ROUND_1 = (SectionType.ROUND_END, b"\x01\x00\x00\x00")
_ROUND_2 = (SectionType.ROUND_END, b"\x02\x00\x00\x00")


@pytest.mark.parametrize(("sections", "minor", "message"), [
    ([(SectionType.CHANNEL, _channel_json(stream_id="s", channel=1))], CHANNELS_MINOR, "CHANNEL section in a main"),
    ([_CHANNELS_END], 5, "CHANNELS_END section in a stream without data channels"),
    ([_CHANNELS_END, (SectionType.RAM, _ram_payload(0, 1))], CHANNELS_MINOR, "after CHANNELS_END"),
    ([_CHANNELS_END, _CHANNELS_END], CHANNELS_MINOR, "CHANNELS_END section out of order"),
    ([_ROUND_1, _CHANNELS_END], CHANNELS_MINOR, "CHANNELS_END section out of order"),
    ([(SectionType.CHANNELS_END, _channel_json(channels=8))], CHANNELS_MINOR, "CHANNELS_END.channels"),
])
def test_the_main_stream_refuses_channel_sections_out_of_place(sections: list[tuple[int, bytes]], minor: int,
                                                                message: str) -> None:
    a, b = _pair()
    with a, b:
        b.sendall(_main_stream(sections, minor))
        b.shutdown(socket.SHUT_WR)
        reader = StreamReader(SocketChannel(a), page_count=64, ram=_Ram(64), kind=StreamKind.MIGRATION)
        with pytest.raises(StreamError, match=message):
            _read_all(reader)


def test_a_main_stream_may_go_on_after_channels_end_and_round_end() -> None:
    a, b = _pair()
    with a, b:
        b.sendall(_main_stream([(SectionType.RAM, _ram_payload(0, 64)), _CHANNELS_END, _ROUND_1,
                                (SectionType.RAM, _ram_payload(0, 1)), _ROUND_2]))
        b.shutdown(socket.SHUT_WR)
        reader = StreamReader(SocketChannel(a), page_count=64, ram=_Ram(64), kind=StreamKind.MIGRATION)
        sections = [reader.read_section() for _ in range(7)]
        assert sections[3] == ChannelsEndSection(1)
        assert reader.rounds == 2


@pytest.mark.parametrize("channels", [0, 9])
def test_an_offer_outside_one_to_eight_is_refused(channels: int) -> None:
    out = Collect()
    writer = StreamWriter(out)
    writer.write_preamble()
    writer.write_section(SectionType.HEADER, json.dumps(
        {"arch": "x86_64", "machine": "q35", "hv_version": "0", "page_size": PAGE_SIZE, "stream_id": "s",
         "channels": channels}).encode())
    a, b = _pair()
    with a, b:
        b.sendall(bytes(out.data))
        reader = StreamReader(SocketChannel(a), page_count=64, kind=StreamKind.MIGRATION)
        with pytest.raises(StreamError, match="HEADER.channels"):
            reader.read_section()


def test_the_source_takes_both_notices_and_a_reply_skips_them() -> None:
    a, b = _pair()
    with a, b:
        send_reply(SocketChannel(b), True, LIVE_NOTICE)
        announce_channels(SocketChannel(b), 3)
        framed = next(f for f, text in NOTICES.items() if text == "channels 4")
        b.sendall(framed[:5])
        time.sleep(0.05)
        assert take_notice(a) == LIVE_NOTICE
        assert take_notice(a) == "channels 3"
        assert take_notice(a) is False  # a notice's first bytes only: left alone
        b.sendall(framed[5:])
        assert _eventually(lambda: take_notice(a) == "channels 4")
        send_reply(SocketChannel(b), True, "ready")
        time.sleep(0.05)
        assert take_notice(a) is None  # a reply: left for the caller
        announce_channels(SocketChannel(b), 2)
        assert read_reply(SocketChannel(a)).text == "ready"
        send_reply(SocketChannel(b), True, "running")
        assert read_reply(SocketChannel(a)).text == "running"  # the late notice was skipped


def _eventually(condition: Any, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


# -- real migrations, in process --------------------------------------------------------------
@pytest.fixture(params=["tcp", "unix"])
def listener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Listener]:
    uri = MigrationUri("tcp", host="127.0.0.1", port=0) if request.param == "tcp" \
        else MigrationUri("unix", path=str(tmp_path / "m.sock"))
    with listen(uri) as lst:
        yield lst


def _machines(memory: str = "64") -> tuple[Any, Any]:
    kernel = guest("x86_64", "hello")
    source, _ = machine_in_process("q35", "unicorn", kernel, "x", memory=memory)
    target, _ = machine_in_process("q35", "unicorn", kernel, "x", memory=memory)
    rng = random.Random(7)
    ram = source.memory.page_view(0, source.memory.page_count)
    for page in rng.sample(range(source.memory.page_count), source.memory.page_count // 2):
        ram[page * PAGE_SIZE:(page + 1) * PAGE_SIZE] = rng.randbytes(PAGE_SIZE)
    return source, target


def _migrate(source: Any, target: Any, listener: Listener, *, offer: bool = True, take: int = 2,
             pre_grant: int | None = None, stray: bytes | None = None, channels: int = 4,
             ) -> tuple[OutgoingMigration, Any, list[BaseException]]:
    """Migrate ``source`` into ``target``: the engine connects to ``listener``; the
    destination takes up to ``take`` connections. ``pre_grant``: the destination's notices
    are already waiting when the engine starts (so its first chunk is followed by the data
    channels, whatever the threads' timing). ``stray``: bytes a stranger sends on a
    connection made before the data channels."""
    uri = listener.address
    out_sock = connect(uri, 10)
    in_sock = listener.accept(timeout=10)
    stranger = None
    if stray is not None:
        stranger = connect(uri, 10)
        stranger.sendall(stray)
    if pre_grant is not None:
        send_reply(SocketChannel(in_sock), True, LIVE_NOTICE)
        announce_channels(SocketChannel(in_sock), pre_grant)
    receiver, errors = receive_in_thread(target, in_sock, migration_status_for(target), stall_timeout=10,
                                         listener=listener, channels=take)
    status = migration_status_for(source)
    open_channel = functools.partial(connect, uri, 10) if offer else None
    outgoing = OutgoingMigration(source, status, MigrationParameters(multifd_channels=channels), out_sock,
                                 lambda *_args: None, open_channel)
    try:
        outgoing.start()
        outgoing.thread.join(timeout=120)
        receiver.join(timeout=120)
        assert not outgoing.thread.is_alive() and not receiver.is_alive()
    finally:
        in_sock.close()
        if stranger is not None:
            stranger.close()
    return outgoing, status, errors


def _same_ram(source: Any, target: Any) -> bool:
    count = source.memory.page_count
    return bytes(source.memory.page_view(0, count)) == bytes(target.memory.page_view(0, count))


@pytest.mark.parametrize(("options", "expected"), [
    # offered 4, taken 3: two more connections, opened after the first chunk
    ({"take": 3, "pre_grant": 3}, 2),
    # "channels 3" waits first, a destination answering more than the offer of 2: one more
    ({"take": 2, "pre_grant": 3, "channels": 2}, 1),
    ({"take": 1}, 0),       # a destination that takes one connection gets one
    ({"offer": False}, 0),  # a source that offers none uses one
], ids=["taken", "capped-by-the-offer", "not-taken", "not-offered"])
def test_the_full_pass_goes_over_the_connections_both_ends_agree_on(listener: Listener, options: dict[str, Any],
                                                                     expected: int) -> None:
    source, target = _machines()
    try:
        outgoing, status, errors = _migrate(source, target, listener, **options)
        assert not errors, errors
        assert status.to_qmp()["status"] == "completed", status.to_qmp()
        assert outgoing.data_channels == expected
        assert _same_ram(source, target)
        assert listener.sock.fileno() < 0  # closed once no more connections are taken
    finally:
        source.close()
        target.close()


@pytest.mark.parametrize("stray", [b"GET / HTTP/1.0\r\n\r\n", "another migration"])
def test_a_stranger_on_the_listener_is_dropped_and_changes_nothing(listener: Listener, stray: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    if stray == "another migration":
        writer_out = Collect()
        writer = StreamWriter(writer_out)
        writer.write_channel("0" * 32, 1)
        writer.write_ram(0, b"\xff" * PAGE_SIZE, stable=True)  # must never land
        stray = bytes(writer_out.data)
    source, target = _machines()
    try:
        with caplog.at_level(logging.WARNING, logger="hv.migration.incoming_channels"):
            outgoing, status, errors = _migrate(source, target, listener, take=2, pre_grant=2, stray=stray)
        assert not errors, errors
        assert status.to_qmp()["status"] == "completed"
        assert outgoing.data_channels == 1
        assert _same_ram(source, target)
        assert "dropped a connection that is not a data channel of this migration" in caplog.text
    finally:
        source.close()
        target.close()


def test_a_refused_data_channel_is_reported_with_the_destinations_reason(listener: Listener) -> None:
    """A destination that refuses a data channel cuts that connection and says why on the
    main connection. The source reports that reason, not the broken data channel, even when
    the break reaches it first: here the main connection is not read while the data channel
    is cut, and the ERROR is sent only once the source's data channel has failed, so the
    source's next step is to notice the failed channel."""
    source, target = _machines("128")
    target.close()
    out_sock = connect(listener.address, 10)
    in_sock = listener.accept(timeout=10)
    main = SocketChannel(in_sock)
    send_reply(main, True, LIVE_NOTICE)
    announce_channels(main, 2)
    status = migration_status_for(source)
    outgoing = OutgoingMigration(source, status, MigrationParameters(multifd_channels=2), out_sock,
                                 lambda *_args: None, functools.partial(connect, listener.address, 10))
    reading = threading.Event()
    reading.set()

    def read_main() -> None:
        """The destination's reading of the main connection: while ``reading`` is set, at
        most 64 KiB a millisecond, so the source's full pass still has chunks left (for
        the data channel to fail on) when the data channel connects."""
        in_sock.settimeout(0.05)
        with contextlib.suppress(OSError):
            while True:
                time.sleep(0.001)
                if not reading.is_set():
                    continue
                try:
                    if not in_sock.recv(1 << 16):
                        return
                except TimeoutError:
                    pass

    def channel_failed() -> bool:
        full_pass = outgoing._full_pass  # noqa: SLF001 - the moment this test is about
        return full_pass is not None and any(c.error is not None for c in full_pass.channels)

    reader = threading.Thread(target=read_main, daemon=True)
    try:
        reader.start()
        outgoing.start()
        data = listener.accept(timeout=30)
        reading.clear()  # the source's main connection fills up and waits
        data.settimeout(30)
        assert data.recv(1)  # the data channel is connected and sending
        data.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        data.close()  # a reset: the source's next write on it fails
        assert _eventually(channel_failed, 30)
        send_reply(main, False, "data channel 1: RAM section: checksum mismatch (test)")
        reading.set()
        outgoing.thread.join(timeout=60)
        assert not outgoing.thread.is_alive()
        info = status.to_qmp()
        assert info["status"] == "failed", info
        assert info["error-desc"] == "destination refused: data channel 1: RAM section: checksum mismatch (test)"
    finally:
        reading.set()  # a failed assertion above must not leave the reader waiting for good
        in_sock.close()
        if outgoing.thread.ident is not None:  # started
            outgoing.thread.join(timeout=60)
        reader.join(timeout=10)
        source.close()


# -- a source that breaks the rules, played by hand -------------------------------------------
def _hand_source(target: Any, listener: Listener, take: int = 2) -> tuple[socket.socket, StreamWriter, str,
                                                                           threading.Thread, list[BaseException]]:
    uri = listener.address
    out_sock = connect(uri, 10)
    out_sock.settimeout(30)
    in_sock = listener.accept(timeout=10)
    receiver, errors = receive_in_thread(target, in_sock, migration_status_for(target), close=True,
                                         stall_timeout=2, listener=listener, channels=take)
    writer = StreamWriter(SocketChannel(out_sock))
    sid = writer.write_header(target.arch.value, target.config.machine, channels=2)
    writer.write_config(Fingerprint.from_dict(target.fingerprint()))
    assert _eventually(lambda: writer.peer_waiting() is False and writer.granted_channels == take)
    return out_sock, writer, sid, receiver, errors


def _finish(receiver: threading.Thread, errors: list[BaseException], message: str) -> None:
    receiver.join(timeout=60)
    assert not receiver.is_alive()
    assert len(errors) == 1 and message in str(errors[0]), errors


def test_a_corrupt_data_channel_fails_the_migration(listener: Listener) -> None:
    _, target = _machines()
    out_sock, writer, sid, receiver, errors = _hand_source(target, listener)
    data = connect(listener.address, 10)
    try:
        out = Collect()
        StreamWriter(out).write_channel(sid, 1)
        body = Collect()
        StreamWriter(body).write_ram(0, os.urandom(PAGE_SIZE), stable=True)
        ram = bytearray(body.data)  # one RAM section (no preamble: write_ram writes none)
        ram[-1] ^= 0xFF  # its checksum no longer matches
        data.sendall(bytes(out.data) + bytes(ram))
        _finish(receiver, errors, "data channel 1: RAM section: checksum mismatch")
        reply = read_reply(SocketChannel(out_sock))  # the source is told why
        assert not reply.ok and "data channel 1" in reply.text
    finally:
        data.close()
        out_sock.close()
        target.close()


def test_channels_end_announcing_a_channel_that_never_came_fails_after_the_stall_timeout(
        listener: Listener) -> None:
    _, target = _machines()
    out_sock, writer, _sid, receiver, errors = _hand_source(target, listener)
    try:
        writer.write_zero_pages(0, target.memory.page_count)
        writer.write_channels_end(1)
        _finish(receiver, errors, "1 data channels did not end within 2 s (x-stall-timeout)")
    finally:
        out_sock.close()
        target.close()


def test_channels_end_announcing_more_than_were_taken_is_refused(listener: Listener) -> None:
    _, target = _machines()
    out_sock, writer, _sid, receiver, errors = _hand_source(target, listener)
    try:
        writer.write_channels_end(2)
        _finish(receiver, errors, "CHANNELS_END: 2 data channels, this destination took 1")
    finally:
        out_sock.close()
        target.close()


def test_pass_one_ending_while_a_data_channel_is_open_is_refused(listener: Listener) -> None:
    _, target = _machines()
    out_sock, writer, sid, receiver, errors = _hand_source(target, listener)
    data = connect(listener.address, 10)
    try:
        out = Collect()
        channel = StreamWriter(out)
        channel.write_channel(sid, 1)
        channel.write_ram(0, b"\x5a" * PAGE_SIZE, stable=True)
        data.sendall(bytes(out.data))  # opened, one page sent, never ended
        # once its page has landed, the destination has taken the channel
        assert _eventually(lambda: bytes(target.memory.page_view(0, 1)) == b"\x5a" * PAGE_SIZE)
        writer.write_zero_pages(1, target.memory.page_count - 1)
        writer.write_round_end(1)
        _finish(receiver, errors, "pass 1 ended with 1 data channels connected, 0 of them ended, 0 announced")
    finally:
        data.close()
        out_sock.close()
        target.close()


# -- the recorded 1.6 streams: the future-compatibility guard ----------------------------------
RECORDED_V1_6 = Path(__file__).parent.parent / "data" / "migration-stream-v1.6-channels-x86_64"


def _recorded_page(number: int, generation: int = 0) -> bytes:
    """What tests/data/make_migration_fixtures_v1_6.py wrote as page ``number``."""
    if number % 5 == 4:
        return bytes(PAGE_SIZE)
    return bytes([(number * 7 + generation) % 251 + 1]) * PAGE_SIZE


@pytest.mark.parametrize("ram_kind", ["guest-memory", "plain-buffer"])
def test_recorded_v1_6_streams_with_a_data_channel_are_still_accepted(ram_kind: str) -> None:
    """Recorded once from this first release with data channels: never regenerate them;
    every later 1.x reader must accept the pair (the channel read when the main stream
    announces it, as a destination does) and find the same RAM. Guest memory takes the
    native receiver; a plain buffer, the Python reader."""
    from hv.memory import GuestMemory, RegionSpec

    pages = 32
    ram: Any = GuestMemory([RegionSpec(0, pages * PAGE_SIZE)]) if ram_kind == "guest-memory" else _Ram(pages)
    main_path = RECORDED_V1_6.with_name(RECORDED_V1_6.name + ".main.bin")
    channel_path = RECORDED_V1_6.with_name(RECORDED_V1_6.name + ".channel1.bin")
    with open(main_path, "rb", buffering=0) as main_file, open(channel_path, "rb", buffering=0) as channel_file:
        main = StreamReader(FileChannel(main_file), page_count=pages, ram=ram, kind=StreamKind.MIGRATION)
        sections = []
        while not isinstance(section := main.read_section(), ChannelsEndSection):
            sections.append(section)
        assert sections[0].channels == 2 and sections[0].stream_id == "recorded-v1.6-channels"
        channel = StreamReader(FileChannel(channel_file), page_count=pages, ram=ram, kind=StreamKind.CHANNEL,
                               shared=main.page_maps())
        assert channel.read_section() == ChannelSection("recorded-v1.6-channels", 1)
        assert isinstance(_read_all(channel)[-1], EndSection)
        assert section == ChannelsEndSection(1)
        rest = _read_all(main)
        assert isinstance(rest[-1], EndSection) and main.rounds == 2
    # page 21 as pass 2 sent it again, after the channel had brought its pass-1 copy
    expected = b"".join(_recorded_page(n, generation=int(n == 21)) for n in range(pages))
    assert bytes(ram.page_view(0, pages)) == expected
    if ram_kind == "guest-memory":
        ram.close()
