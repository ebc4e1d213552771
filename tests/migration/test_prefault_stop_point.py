"""Where the destination's background pre-fault stops: not when the source connects, but
once the source's full pass is in (the first ROUND_END), so it faults RAM in ahead of the
stream while the pass arrives and never runs into the switch-over."""
from __future__ import annotations

import socket
import time

from hv.migration.incoming import IncomingCanceled, start_prefault
from hv.migration.pages import _prefaulted
from hv.migration.stream import Fingerprint, SocketChannel, StreamWriter
from hv.migration.stream_writer import take_live_notice
from hv_fixtures import guest
from tests.helpers import machine_in_process, migration_status_for, receive_in_thread


def _wait(condition, what: str, timeout: float = 30.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_prefault_runs_through_the_full_pass_and_stops_when_it_is_in() -> None:
    target, _ = machine_in_process("q35", "unicorn", guest("x86_64", "hello"), "x", memory="64")
    out_sock, in_sock = socket.socketpair()
    try:
        start_prefault(target)
        prefaulter = _prefaulted[target.memory]
        receiver, errors = receive_in_thread(target, in_sock, migration_status_for(target))
        writer = StreamWriter(SocketChannel(out_sock))
        writer.write_header(target.arch.value, target.config.machine)
        writer.write_config(Fingerprint.from_dict(target.fingerprint()))
        # The destination accepted CONFIG once it sends its ram-live notice (format 1.5).
        _wait(lambda: take_live_notice(out_sock) is True, "no ram-live notice after CONFIG")
        assert not prefaulter._stop.is_set(), "pre-fault stopped when the source connected"
        writer.write_zero_pages(0, target.memory.page_count)
        assert not prefaulter._stop.is_set()
        writer.write_round_end(1)
        _wait(prefaulter._stop.is_set, "pre-fault still running after the full pass")
        writer.write_cancel()
        receiver.join(30)
        assert not receiver.is_alive()
        assert len(errors) == 1 and isinstance(errors[0], IncomingCanceled), errors
    finally:
        out_sock.close()
        in_sock.close()
        target.close()
