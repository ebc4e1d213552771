"""The destination's pre-fault pauses from the source's connection until CONFIG is
answered (hv.migration.pages.hold_prefault): MADV_POPULATE_WRITE holds the mmap lock for
a whole chunk, and the stream reader's setup maps buffers, each of which waited for a
chunk while the source copied every page it sent until the answer. The hold is released
on every path, so a failed stream never leaves the pre-fault paused."""
from __future__ import annotations

import socket
import threading
import time

import pytest

from hv.memory import GuestMemory, RegionSpec
from hv.migration import pages
from hv.migration.incoming import start_prefault
from hv.migration.pages import PREFAULT_CHUNK, Prefaulter, hold_prefault
from hv.migration.stream import Fingerprint, SocketChannel, StreamWriter
from hv.migration.stream_writer import take_live_notice
from hv_fixtures import guest
from tests.helpers import machine_in_process, migration_status_for, receive_in_thread


def _wait(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_a_held_prefault_faults_nothing_until_released(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pages, "HOLD_LIMIT", 60.0)  # the test's hold outlasts any scheduling delay
    mem = GuestMemory([RegionSpec(0, 8 * PREFAULT_CHUNK)])
    try:
        prefaulter = Prefaulter([(r.mmap, r.view) for r in mem.regions])
        pages._prefaulted[mem] = prefaulter
        release = hold_prefault(mem)   # held before its first chunk
        thread = threading.Thread(target=prefaulter._run, daemon=True)
        thread.start()
        time.sleep(0.2)
        assert prefaulter.done_bytes == 0 and thread.is_alive()
        release()
        thread.join(30)
        assert not thread.is_alive()
        assert prefaulter.outcome == "done" and prefaulter.done_bytes == prefaulter.total
    finally:
        mem.close()


def test_hold_prefault_without_a_prefault_does_nothing() -> None:
    mem = GuestMemory([RegionSpec(0, PREFAULT_CHUNK)])
    try:
        hold_prefault(mem)()   # no pre-fault registered for mem: a no-op release
    finally:
        mem.close()


def _receiving_target() -> tuple:  # type: ignore[type-arg]
    target, _ = machine_in_process("q35", "unicorn", guest("x86_64", "hello"), "x", memory="64")
    start_prefault(target)
    return target, pages._prefaulted[target.memory]


def test_prefault_held_from_connect_until_config_is_answered() -> None:
    target, prefaulter = _receiving_target()
    out_sock, in_sock = socket.socketpair()
    try:
        receiver, errors = receive_in_thread(target, in_sock, migration_status_for(target))
        _wait(lambda: not prefaulter._go.is_set(), "pre-fault not held after the source connected")
        writer = StreamWriter(SocketChannel(out_sock))
        writer.write_header(target.arch.value, target.config.machine)
        writer.write_config(Fingerprint.from_dict(target.fingerprint()))
        _wait(lambda: take_live_notice(out_sock) is True, "no ram-live notice after CONFIG")
        assert prefaulter._go.is_set(), "pre-fault still held after CONFIG was answered"
        writer.write_cancel()
        receiver.join(30)
        assert not receiver.is_alive() and len(errors) == 1
    finally:
        out_sock.close()
        in_sock.close()
        target.close()


def test_prefault_released_when_the_stream_fails_before_config() -> None:
    target, prefaulter = _receiving_target()
    out_sock, in_sock = socket.socketpair()
    try:
        receiver, errors = receive_in_thread(target, in_sock, migration_status_for(target))
        _wait(lambda: not prefaulter._go.is_set(), "pre-fault not held after the source connected")
        out_sock.sendall(b"not a migration stream at all")
        out_sock.shutdown(socket.SHUT_WR)
        receiver.join(30)
        assert not receiver.is_alive() and len(errors) == 1, errors
        assert prefaulter._go.is_set(), "a failed stream left the pre-fault held"
    finally:
        out_sock.close()
        in_sock.close()
        target.close()
