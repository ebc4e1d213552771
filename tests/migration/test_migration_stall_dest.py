"""The destination side of "no silent stall" (issue 14 item 3).

A source that connects and then stops sending (the connection stays open) makes the
destination fail after x-stall-timeout seconds — taken from ``migrate-set-parameters``
when the source connects, 30 s by default — with one error line saying the source
stalled; hv exits non-zero and never runs the guest, and the source (if it still
listens) is told why. Real hv processes, a real socket, the stream's own writer
(tests.migration.conftest.FakeSource).
"""
from __future__ import annotations

import os
import time

import pytest

from hv.migration.engine import STALL_TIMEOUT
from hv.migration.stream import Fingerprint, Reply, StreamError
from tests.migration.conftest import STALLS, assert_destination_gave_up, incoming, stall_source

STALLED = "the source stalled: nothing received for 1 s (x-stall-timeout)"


def _stalled_where(fake, where: str) -> None:
    """As test_migration_untrusted's stalls, plus 'header': HEADER sent, then nothing."""
    if where == "header":
        fake.writer.write_header("x86_64", "q35")
    else:
        stall_source(fake, where)


@pytest.mark.parametrize("where", ["header", *STALLS])
def test_stalled_source_fails_the_destination(vms, sock_dir, fake_source, where):
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    address = dst.incoming_address()
    assert dst.execute("migrate-set-parameters", **{"x-stall-timeout": 1}) == {"return": {}}
    fake = fake_source(dst)
    assert address.startswith("unix:")
    started = time.monotonic()
    _stalled_where(fake, where)
    last = assert_destination_gave_up(dst, STALLED)
    if where == "waiting-for-commit":
        assert "did not commit the switch-over" in last, last
    assert time.monotonic() - started < 30          # bounded: it did not wait for the default
    if where != "waiting-for-commit":               # still reading: the source is told why
        try:
            reply = fake.reply()
        except (OSError, StreamError) as exc:
            pytest.fail(f"no ERROR answer from the destination: {exc}")
        assert reply == Reply(False, STALLED), reply


def test_deferred_destination_takes_the_timeout_before_migrate_incoming(vms, sock_dir, fake_source):
    """libvirt's way: -incoming defer, migrate-set-parameters, then migrate-incoming."""
    dst = vms("dst", "-incoming", "defer", accel="unicorn", memory="64", mib=4)
    assert dst.execute("query-migrate-parameters")["return"]["x-stall-timeout"] == STALL_TIMEOUT
    assert dst.execute("migrate-set-parameters", **{"x-stall-timeout": 1}) == {"return": {}}
    uri = f"unix:{os.path.join(sock_dir, 'dst.mig')}"
    assert dst.execute("migrate-incoming", uri=uri) == {"return": {}}
    fake = fake_source(dst)
    fake.prefix()                                    # HEADER, CONFIG, some RAM; then silence
    assert_destination_gave_up(dst, STALLED)


def test_a_slow_but_steady_source_is_not_a_stall(vms, sock_dir, fake_source):
    """The timeout is per wait, not for the whole stream: gaps of a third of it, adding up
    to more than it, leave the destination receiving (active), not failed."""
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    dst.incoming_address()
    assert dst.execute("migrate-set-parameters", **{"x-stall-timeout": 3}) == {"return": {}}
    fake = fake_source(dst)
    fake.writer.write_header("x86_64", "q35")
    time.sleep(1)
    fake.writer.write_config(Fingerprint.from_dict(fake.machine.fingerprint()))
    for start in range(0, 64, 16):                   # 4 more gaps of 1 s: 5 s in all
        time.sleep(1)
        fake.writer.write_ram(start, fake.machine.memory.page_view(start, 16))
    assert dst.process.proc.poll() is None, dst.stderr()
    assert dst.execute("query-migrate")["return"]["status"] == "active"
