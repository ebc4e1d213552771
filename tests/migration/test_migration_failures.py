"""Live-migration failure and cancel semantics (issue 4, point 5), end to end.

Real hv processes, real sockets, raw QMP. Every test asserts both ends' final states:

* the source keeps (or resumes) running with its guest intact: its dirty guest keeps
  printing passes and its whole serial output equals an unmigrated run's;
  ``query-migrate`` shows ``failed`` with a non-empty ``error-desc`` (``canceled`` for a
  cancel, without one); ``query-status`` is ``running``;
* the destination exits non-zero with one ``hv: error: ...`` line on stderr, never ran the
  guest (its serial output is empty) and removed its QMP and migration socket files;
* every process is reaped.

Phases are made long enough to hit by capping ``max-bandwidth`` on a source whose guest
dirties a 32 MiB buffer continuously (about 1 s per pass over the link): the full pass
is ``dirty-sync-count == 0``, a dirty round is ``dirty-sync-count >= 1`` before any STOP,
and the final transfer is the time between the source's STOP event and the switch-over
(``max-iterations`` 1 forces it after one dirty round). The switch-over handshake itself
(``ready`` / ``commit`` / ``running``) is exercised precisely with a fake source written
here (a complete, valid stream from an in-process machine), so no test hook is needed.
"""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
import threading
import time
import zlib
from typing import Callable

import pytest

from hv_backends import backend_class
from hv.config import parse_args
from hv.console import BufferSink
from hv.machine import Machine
from hv.memory import GuestMemory, RegionSpec
from hv.migration.engine import CHUNK_PAGES, MigrationParameters, _Sender, write_machine_state
from hv.migration.status import MigrationStatus
from hv.migration.stream import (
    CRC,
    RAM_RUN,
    SECTION_HEADER,
    Reply,
    SectionType,
    SocketChannel,
    StreamWriter,
    read_reply,
    send_reply,
)
from tests.helpers import Vm, complete_lines, kvm_unusable_reason, requires_kvm
from tests.migration.conftest import (KERNEL, FakeDestination, FakeSource,
                                      assert_destination_gave_up, incoming)

MIB = 32                    # dirty buffer of the slow-phase source
MEMORY = "512"
SLOW_BANDWIDTH = 32 << 20   # bytes/s: about one second per pass over the link
PHASES = ["full-pass", "dirty-round", "final-transfer"]
TERMINAL = ("completed", "failed", "canceled")

# The slow-phase sources run on KVM (fast guest, cheap reference); tests that need it are
# marked, the fake-source and in-process ones run everywhere.


@pytest.fixture
def vms(vms: Callable[..., Vm]) -> Callable[..., Vm]:
    """The group's ``vms`` with this file's defaults: a KVM source dirtying 32 MiB of 512."""
    return functools.partial(vms, accel="kvm", memory=MEMORY, mib=MIB)


# (phase, transport, source accelerator): every phase over unix on KVM, plus tcp and a
# Unicorn source (its write-tracking dirty log) at one point each.
KILL_POINTS = [pytest.param(phase, "unix", "kvm", id=phase, marks=requires_kvm) for phase in PHASES] + [
    pytest.param("dirty-round", "tcp", "kvm", id="dirty-round-tcp", marks=requires_kvm),
    pytest.param("final-transfer", "unix", "unicorn", id="final-transfer-unicorn")]
CANCEL_POINTS = [pytest.param(phase, "kvm", id=phase, marks=requires_kvm) for phase in PHASES] + [
    pytest.param("dirty-round", "unicorn", id="dirty-round-unicorn")]


# -- checks --------------------------------------------------------------------------------
class ReferenceRun:
    """An unmigrated dirty guest run in this process (KVM when usable), paused between
    requests: its output only grows, so every test of a worker shares one run and pays
    only for passes no earlier test needed."""

    def __init__(self, mib: int) -> None:
        config = parse_args(["-machine", "q35", "-m", "128", "-kernel", KERNEL,
                             "-append", f"mib={mib}"]).config
        accel = "kvm" if kvm_unusable_reason() is None else "unicorn"
        self.console = BufferSink()
        self.machine = Machine(config, backend_class(accel)(), self.console)
        self.machine.load_kernel(config.kernel.read_bytes())
        self.machine.start(paused=True)

    def lines(self, count: int, timeout: float = 300.0) -> list[str]:
        """The header and the first ``count`` pass lines."""
        lines = complete_lines(self.console.getvalue().decode())
        if len(lines) < count + 1:
            self.machine.resume()
            deadline = time.monotonic() + timeout
            try:
                while len(lines := complete_lines(self.console.getvalue().decode())) < count + 1:
                    assert time.monotonic() < deadline, f"reference run: {len(lines)} lines"
                    time.sleep(0.005)
            finally:
                self.machine.pause()
        return lines[:count + 1]


@functools.cache
def _reference(mib: int) -> ReferenceRun:
    return ReferenceRun(mib)


def check_output(text: str, mib: int = MIB) -> int:
    """The whole serial output (possibly several VMs' joined) equals an unmigrated run's:
    what tests.helpers.check_dirty_output checks, against a shared incremental reference."""
    lines = complete_lines(text)
    assert lines and lines[0] == f"dirty: mib={mib} iterations=0", lines[:1]
    assert len(lines) > 1, "no pass completed"
    reference = _reference(mib).lines(len(lines) - 1)
    assert reference[0] == lines[0]
    for index, line in enumerate(lines[1:], start=1):
        assert line == reference[index], f"pass {index}: {line!r} != {reference[index]!r}"
    return len(lines) - 1


def wait_status(vm: Vm, wanted: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while (status := vm.execute("query-status")["return"])["status"] != wanted:
        assert time.monotonic() < deadline, f"{vm.name}: status {status}, expected {wanted}"
        time.sleep(0.02)
    return status


def assert_source_intact(src: Vm, expected: str, mib: int = MIB) -> tuple[dict, list[str]]:
    """The migration ended ``expected`` (failed/canceled); the guest runs on, uncorrupted.
    Returns the final query-migrate and the QMP events seen until then."""
    result = src.wait_migration(timeout=60)
    assert result["status"] == expected, result
    if expected == "failed":
        assert isinstance(result.get("error-desc"), str) and result["error-desc"].strip(), result
    else:
        assert "error-desc" not in result, result
    assert "cpu-throttle-percentage" not in result, result
    wait_status(src, "running")
    before = len(complete_lines(src.output()))
    src.wait_lines(before + 3, timeout=30)
    events = [e["event"] for e in src.qmp.events]
    assert src.execute("stop") == {"return": {}}
    assert src.execute("query-migrate")["return"] == result  # nothing changed since
    check_output(src.output(), mib)
    return result, events


def socket_fds(vm: Vm) -> set[str]:
    """The process's open sockets (``socket:[inode]``), from /proc; our QMP connection is
    made first so that it is part of every baseline."""
    vm.qmp
    fd_dir = f"/proc/{vm.process.proc.pid}/fd"
    found = set()
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(os.path.join(fd_dir, fd))
        except FileNotFoundError:
            continue
        if target.startswith("socket:"):
            found.add(target)
    return found


def assert_sockets_back_to(vm: Vm, baseline: set[str]) -> None:
    """The migration connection is closed: already when the terminal status shows (the
    engine releases everything first, so a new migrate cannot race the old cleanup)."""
    assert vm.execute("query-migrate")["return"]["status"] in TERMINAL
    assert socket_fds(vm) == baseline


def events_until_exit(vm: Vm) -> list[dict]:
    """Every QMP event ``vm`` sends until it exits (its monitor closes)."""
    events = list(vm.qmp.events)
    vm.qmp.events.clear()
    try:
        while True:
            message = vm.qmp._read()
            if "event" in message:
                events.append(message)
    except (EOFError, ConnectionError):
        pass
    return events


def assert_destination_canceled(dst: Vm) -> None:
    """The source's CANCEL reached the destination: its status went to 'canceled' (the
    MIGRATION event its monitor sent before exiting), and it exits with the cancel line,
    never having run the guest."""
    statuses = [e["data"]["status"] for e in events_until_exit(dst) if e["event"] == "MIGRATION"]
    assert statuses and statuses[-1] == "canceled", statuses
    assert_destination_gave_up(dst, canceled=True)


def kill(vm: Vm) -> None:
    """SIGKILL and reap."""
    vm.process.proc.send_signal(signal.SIGKILL)
    assert vm.process.proc.wait(10) == -signal.SIGKILL


def migrate_state(vm: Vm) -> dict:
    return vm.execute("query-migrate")["return"]


def slow_down(src: Vm, *, auto_converge: bool = False, max_iterations: int = 30) -> None:
    """Cap the bandwidth, and set downtime-limit 0 so the migration never converges by
    itself: its phases then last as long as the test needs whatever the guest's dirtying
    speed (a slow, loaded guest could otherwise converge after one dirty round). Only
    max-iterations ends the dirty rounds."""
    assert src.execute("migrate-set-parameters", **{"max-bandwidth": SLOW_BANDWIDTH, "downtime-limit": 0,
                                                    "max-iterations": max_iterations}) == {"return": {}}
    assert src.execute("migrate-set-capabilities", capabilities=[
        {"capability": "auto-converge", "state": auto_converge}]) == {"return": {}}


def start_slow_migration(src: Vm, dst: Vm, phase: str) -> set[str]:
    """Start a bandwidth-capped migration and return once it is in ``phase``; returns the
    source's sockets from before the migration."""
    slow_down(src, max_iterations=1 if phase == "final-transfer" else 30)
    src.wait_lines(3)
    uri = dst.incoming_address()
    baseline = socket_fds(src)
    assert src.execute("migrate", uri=uri) == {"return": {}}
    deadline = time.monotonic() + 30
    while True:
        assert time.monotonic() < deadline, f"never reached {phase}: {migrate_state(src)}"
        if phase == "final-transfer":
            src.qmp.wait_event("STOP", timeout=30)
            assert migrate_state(src)["status"] == "active"
            return baseline
        state = migrate_state(src)
        assert state["status"] == "active" or state["status"] == "setup", state
        syncs, sent = state.get("ram", {}).get("dirty-sync-count", 0), state.get("ram", {}).get("transferred", 0)
        if phase == "full-pass" and syncs == 0 and sent > 0:  # ~1 s of it left
            return baseline
        if phase == "dirty-round" and syncs >= 1:
            assert not any(e["event"] == "STOP" for e in src.qmp.events)
            return baseline
        time.sleep(0.02)


def check_phase(result: dict, events: list[str], phase: str) -> None:
    """The failure or cancel happened in ``phase`` (and the guest was resumed if paused)."""
    if phase == "full-pass":
        assert result["ram"]["dirty-sync-count"] == 0, result
        assert "STOP" not in events
    elif phase == "dirty-round":
        assert result["ram"]["dirty-sync-count"] >= 1, result
        assert "STOP" not in events
    else:  # STOP was consumed by start_slow_migration; the source must resume
        assert "RESUME" in events, events


def migrate_to_fresh_destination(vms, sock_dir: str, src: Vm, name: str) -> Vm:
    """After a failure or cancel, a new migration (unlimited bandwidth) completes (to KVM
    when usable: after a Unicorn source that is also a cross-backend move)."""
    dst = vms(name, *incoming(sock_dir, name), accel="kvm" if kvm_unusable_reason() is None else "unicorn")
    assert src.execute("cont") == {"return": {}}
    assert src.execute("migrate-set-parameters", **{"max-bandwidth": 0, "max-iterations": 30,
                                                    "downtime-limit": 300}) == {"return": {}}
    assert src.execute("migrate-set-capabilities", capabilities=[
        {"capability": "auto-converge", "state": True}]) == {"return": {}}
    assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
    result = src.wait_migration(timeout=60)
    assert result["status"] == "completed", result
    assert dst.wait_migration()["status"] == "completed"
    wait_status(dst, "running")
    assert src.execute("query-status")["return"]["status"] == "postmigrate"
    dst.wait_lines(len(complete_lines(dst.output())) + 3)
    dst.execute("stop")
    check_output(src.output() + dst.output())
    return dst


def _pipelined(vm: Vm, *messages: dict) -> list[dict]:
    """Send several commands in one write (nothing in between); their replies in order."""
    qmp = vm.qmp
    qmp.sock.sendall(b"".join(json.dumps(m).encode() + b"\r\n" for m in messages))
    replies: list[dict] = []
    while len(replies) < len(messages):
        message = qmp._read()
        (qmp.events if "event" in message else replies).append(message)
    return replies


# -- 1. destination killed ---------------------------------------------------------------------
@pytest.mark.parametrize("phase,transport,accel", KILL_POINTS)
def test_destination_killed(vms, sock_dir, phase, transport, accel):
    src = vms("src", accel=accel)
    dst = vms("dst", *incoming(sock_dir, "dst", transport))
    baseline = start_slow_migration(src, dst, phase)
    kill(dst)
    if transport == "unix":  # removed at accept: even a SIGKILLed destination leaves none
        assert not os.path.exists(os.path.join(sock_dir, "dst.mig"))
    result, events = assert_source_intact(src, "failed")
    check_phase(result, events, phase)
    assert_sockets_back_to(src, baseline)
    assert any(word in result["error-desc"] for word in ("destination", "connection", "stream write")), result
    assert dst.output() == ""
    if phase == "final-transfer":  # paused, resumed: a new migration still works
        migrate_to_fresh_destination(vms, sock_dir, src, "dst2")


# -- 2. source killed ----------------------------------------------------------------------------
@pytest.mark.parametrize("phase,transport,accel", KILL_POINTS[:4])
def test_source_killed(vms, sock_dir, phase, transport, accel):
    src = vms("src", accel=accel)
    dst = vms("dst", *incoming(sock_dir, "dst", transport), accel=accel)
    start_slow_migration(src, dst, phase)
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"
    kill(src)
    assert_destination_gave_up(dst, "truncated")


# -- 3. cancel in every phase, then migrate again -----------------------------------------------
@requires_kvm
def test_cancel_in_setup(vms, sock_dir):
    """migrate and migrate_cancel back to back: canceled at once, wherever it landed."""
    src = vms("src")
    dst = vms("dst", *incoming(sock_dir, "dst"))
    slow_down(src)
    src.wait_lines(3)
    uri = dst.incoming_address()
    dst.qmp
    replies = _pipelined(src, {"execute": "migrate", "arguments": {"uri": uri}}, {"execute": "migrate_cancel"})
    assert replies == [{"return": {}}, {"return": {}}]
    result, _ = assert_source_intact(src, "canceled")
    assert result["ram"]["dirty-sync-count"] == 0
    assert result["ram"]["transferred"] < 16 << 20, result  # long before the full pass ended
    assert_destination_canceled(dst)
    migrate_to_fresh_destination(vms, sock_dir, src, "dst2")


@pytest.mark.parametrize("phase,accel", CANCEL_POINTS)
def test_cancel(vms, sock_dir, phase, accel):
    src = vms("src", accel=accel)
    dst = vms("dst", *incoming(sock_dir, "dst"))
    baseline = start_slow_migration(src, dst, phase)
    dst.qmp  # connected before the cancel: it must see the destination's 'canceled'
    assert src.execute("migrate_cancel") == {"return": {}}
    result, events = assert_source_intact(src, "canceled")
    check_phase(result, events, phase)
    assert_sockets_back_to(src, baseline)
    events = [e["data"]["status"] for e in src.qmp.events if e["event"] == "MIGRATION"]
    assert events[-1] == "canceled", events
    assert_destination_canceled(dst)
    migrate_to_fresh_destination(vms, sock_dir, src, "dst2")


@requires_kvm
def test_cancel_unblocks_a_hung_destination(vms, sock_dir):
    """A destination that stops reading (SIGSTOP) blocks the source's send; migrate_cancel
    still ends the migration at once and the guest runs on."""
    src = vms("src")
    dst = vms("dst", *incoming(sock_dir, "dst"))
    baseline = start_slow_migration(src, dst, "dirty-round")
    dst.process.proc.send_signal(signal.SIGSTOP)
    try:
        time.sleep(1.0)  # socket buffers fill: the sender blocks in a write
        assert migrate_state(src)["status"] == "active"
        # The sender cannot reach a record boundary to append CANCEL: after CANCEL_GRACE
        # the connection is shut down. Only "it ends" is asserted (the bounded wait), not
        # how fast: wall time on a loaded machine says nothing about hv.
        assert src.execute("migrate_cancel") == {"return": {}}
        assert src.wait_migration(timeout=60)["status"] == "canceled"
    finally:
        dst.process.proc.send_signal(signal.SIGCONT)
    assert_source_intact(src, "canceled")
    assert_sockets_back_to(src, baseline)
    assert_destination_gave_up(dst)


# -- 4. fake sources: corrupted, truncated, hostile and unfinished streams ----------------------
def _bad_checksum(fake: FakeSource) -> None:
    payload = RAM_RUN.pack(64, 1, 0) + b"\x01" + b"\xa5" * 4096
    head = SECTION_HEADER.pack(SectionType.RAM, 0, 0, len(payload))
    fake.raw(head + payload + CRC.pack(zlib.crc32(payload, zlib.crc32(head)) ^ 1))


def _garbage(fake: FakeSource) -> None:
    fake.raw(bytes(range(7, 256)) * 16)


def _truncated(fake: FakeSource) -> None:
    payload = RAM_RUN.pack(64, 4, 0) + b"\x01" * 4 + b"\x5a" * 4096 * 4
    head = SECTION_HEADER.pack(SectionType.RAM, 0, 0, len(payload))
    fake.raw(head + payload[:len(payload) // 2])  # then the source disappears mid-section
    fake.finish_sending()


def _page_outside_ram(fake: FakeSource) -> None:
    fake.writer.write_ram(fake.page_count, b"\xff" * 4096)


def _huge_page_number(fake: FakeSource) -> None:
    fake.writer.write_ram((1 << 64) - 1, b"\xff" * 4096)


def _end_before_all_ram(fake: FakeSource) -> None:
    fake.writer.write_round_end(1)
    write_machine_state(fake.writer, fake.machine.save())
    fake.writer.write_end()


def _huge_section_length(fake: FakeSource) -> None:
    fake.raw(SECTION_HEADER.pack(SectionType.RAM, 0, 0, 0xFFFFFFFF) + RAM_RUN.pack(64, 1, 0))


HOSTILE = [
    pytest.param(_bad_checksum, "checksum mismatch", id="bad-checksum"),
    pytest.param(_garbage, "unknown", id="garbage"),
    pytest.param(_truncated, "truncated", id="truncated-mid-section"),
    pytest.param(_page_outside_ram, "outside guest RAM", id="page-outside-ram"),
    pytest.param(_huge_page_number, "outside guest RAM", id="page-2**64-1"),
    pytest.param(_huge_section_length, "exceeds", id="section-length-4GiB"),
    pytest.param(_end_before_all_ram, "", id="end-before-all-ram"),
]


@pytest.mark.parametrize("spoil,fragment", HOSTILE)
def test_hostile_stream(vms, sock_dir, fake_source, spoil, fragment):
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    fake = fake_source(dst)
    fake.prefix()
    spoil(fake)
    reply = fake.reply()  # the destination says why, on the back channel
    assert not reply.ok and reply.text and fragment in reply.text, reply
    last = assert_destination_gave_up(dst, fragment)
    assert reply.text in last


def test_fake_source_control_runs(vms, sock_dir, fake_source):
    """The fake source's complete stream is valid: with a commit the destination runs the
    guest (so the hostile and no-commit cases above and below fail for the right reason)."""
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    fake = fake_source(dst)
    fake.complete()
    assert fake.reply() == Reply(True, "ready")
    assert dst.execute("query-status")["return"]["status"] == "inmigrate"
    send_reply(fake.channel, True, "commit")
    assert fake.reply() == Reply(True, "running")
    dst.wait_lines(3)
    assert dst.execute("query-migrate")["return"]["status"] == "completed"
    dst.execute("stop")
    check_output(dst.output(), mib=4)


@pytest.mark.parametrize("ending", ["close", "error", "cancel"])
def test_source_gone_after_ready(vms, sock_dir, fake_source, ending):
    """The source dies (or gives up, or cancels) after the destination said ready, before
    the commit: the fully received, restored guest must still never run."""
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    fake = fake_source(dst)
    fake.complete()
    assert fake.reply() == Reply(True, "ready")
    time.sleep(0.3)  # it waits for the commit, guest not started
    assert dst.output() == "" and dst.execute("query-status")["return"]["status"] == "inmigrate"
    if ending == "error":
        send_reply(fake.channel, False, "canceled")
    if ending == "cancel":
        fake.writer.write_cancel()
        assert_destination_canceled(dst)
        return
    fake.close()
    assert_destination_gave_up(dst, "commit")


@requires_kvm
@pytest.mark.parametrize("ending", ["refuse", "close-before-ready", "go-away-after-ready"])
def test_destination_fails_before_commit(vms, sock_dir, ending):
    """The destination gives up at the switch-over, before the commit: the source resumes
    the guest and reports failed with the destination's reason."""
    src = vms("src", memory="64", mib=4)
    src.wait_lines(3)
    fake = FakeDestination(sock_dir, (64 << 20) // 4096)
    try:
        baseline = socket_fds(src)
        assert src.execute("migrate", uri=fake.uri) == {"return": {}}
        channel = fake.receive()
        src.qmp.wait_event("STOP")  # the source is paused, waiting for 'ready'
        assert fake.conn is not None
        if ending == "refuse":
            send_reply(channel, False, "restore failed: test says no")
        elif ending == "go-away-after-ready":
            # It stops reading first, so the commit cannot be delivered (EPIPE), yet the
            # connection stays open until the source decided: deterministic.
            fake.conn.shutdown(socket.SHUT_RD)
            send_reply(channel, True, "ready")
            assert src.wait_migration(timeout=30)["status"] == "failed"
        fake.conn.close()
        fake.conn = None
        result, events = assert_source_intact(src, "failed", mib=4)
    finally:
        fake.close()
    assert "RESUME" in events
    desc = result["error-desc"]
    if ending == "refuse":
        assert desc == "destination refused: restore failed: test says no", desc
    elif ending == "close-before-ready":
        assert desc.startswith("the destination did not confirm it is ready"), desc
    else:
        assert desc.startswith("the destination went away before the commit"), desc
    assert_sockets_back_to(src, baseline)


@requires_kvm
def test_cancel_while_waiting_for_ready(vms, sock_dir):
    """The last phase before the destination confirms: everything is sent, the source is
    paused waiting for 'ready'. migrate_cancel ends it at once and the guest resumes."""
    src = vms("src", memory="64", mib=4)
    src.wait_lines(3)
    fake = FakeDestination(sock_dir, (64 << 20) // 4096)
    try:
        baseline = socket_fds(src)
        assert src.execute("migrate", uri=fake.uri) == {"return": {}}
        channel = fake.receive()
        src.qmp.wait_event("STOP")
        time.sleep(0.2)
        assert migrate_state(src)["status"] == "active"
        assert src.execute("migrate_cancel") == {"return": {}}
        result, events = assert_source_intact(src, "canceled", mib=4)
        assert "RESUME" in events
        assert read_reply(channel) == Reply(False, "canceled", canceled=True)  # CANCEL, no commit
        assert fake.conn is not None and fake.conn.recv(1) == b""  # then it hung up
    finally:
        fake.close()
    assert_sockets_back_to(src, baseline)


@requires_kvm
def test_destination_gone_after_commit_keeps_source_paused(vms, sock_dir):
    """Once the commit is sent the destination may be running the guest: if it then goes
    silent, the source must not resume (never two running copies). It stays paused,
    reports failed saying so, and runs on intact only when the operator says cont."""
    src = vms("src", memory="64", mib=4)
    src.wait_lines(3)
    fake = FakeDestination(sock_dir, (64 << 20) // 4096)
    try:
        assert src.execute("migrate", uri=fake.uri) == {"return": {}}
        channel = fake.receive()
        send_reply(channel, True, "ready")
        assert read_reply(channel) == Reply(True, "commit")
        assert fake.conn is not None
        fake.conn.close()
        fake.conn = None
        result = src.wait_migration(timeout=30)
    finally:
        fake.close()
    assert result["status"] == "failed" and "the source stays paused" in result["error-desc"], result
    assert src.execute("query-status")["return"]["status"] == "paused"
    frozen = src.output()
    time.sleep(0.3)
    assert src.output() == frozen and "RESUME" not in [e["event"] for e in src.qmp.events]
    assert src.execute("cont") == {"return": {}}
    assert_source_intact(src, "failed", mib=4)


# -- 5. illegal requests change nothing ----------------------------------------------------------
@requires_kvm
def test_migrate_while_active_and_cancel_with_nothing(vms, sock_dir):
    src = vms("src")
    idle = [src.execute("migrate_cancel"), src.execute("query-migrate")]
    assert idle[0]["error"]["class"] == "GenericError" and idle[1] == {"return": {"status": "none"}}
    dst = vms("dst", *incoming(sock_dir, "dst"))
    other = vms("other", *incoming(sock_dir, "other"))
    start_slow_migration(src, dst, "full-pass")
    reply = src.execute("migrate", uri=other.incoming_address())
    assert reply["error"]["class"] == "GenericError" and "already in progress" in reply["error"]["desc"]
    state = migrate_state(src)
    assert state["status"] == "active" and "error-desc" not in state
    assert other.execute("query-status")["return"]["status"] == "inmigrate"  # nobody connected
    assert other.execute("query-migrate")["return"]["status"] == "setup"
    # The first migration is unaffected: uncap it and it completes.
    assert src.execute("migrate-set-parameters", **{"max-bandwidth": 0, "downtime-limit": 300}) == {"return": {}}
    assert src.execute("migrate-set-capabilities", capabilities=[
        {"capability": "auto-converge", "state": True}])["error"]["class"] == "GenericError"
    result = src.wait_migration(timeout=60)
    assert result["status"] == "completed", result
    wait_status(dst, "running")
    dst.wait_lines(len(complete_lines(dst.output())) + 3)
    dst.execute("stop")
    check_output(src.output() + dst.output())
    # Nothing to cancel after completion either; the status stays.
    reply = src.execute("migrate_cancel")
    assert reply["error"]["class"] == "GenericError" and src.execute("query-migrate")["return"] == result
    assert other.execute("quit") == {"return": {}}
    assert other.process.wait(30) == 0 and other.output() == ""


@requires_kvm
def test_cancel_during_snapshot_is_refused(vms, sock_dir, tmp_path):
    """After a canceled live migration, a snapshot: migrate_cancel must not report success
    by 'canceling' the earlier, finished migration while the snapshot goes on."""
    src = vms("src")
    dst = vms("dst", *incoming(sock_dir, "dst"))
    start_slow_migration(src, dst, "full-pass")
    assert src.execute("migrate_cancel") == {"return": {}}
    assert src.wait_migration()["status"] == "canceled"
    snap = tmp_path / "snap"
    replies = _pipelined(src, {"execute": "migrate", "arguments": {"uri": f"file:{snap}"}},
                         {"execute": "migrate_cancel"})
    assert replies[0] == {"return": {}}
    assert replies[1]["error"]["class"] == "GenericError", replies
    assert "snapshot" in replies[1]["error"]["desc"]
    assert src.wait_migration()["status"] == "completed"
    assert sorted(os.listdir(snap)) == ["memory", "state"]


@requires_kvm
def test_cancel_after_failure_changes_nothing(vms, sock_dir):
    src = vms("src")
    dst = vms("dst", *incoming(sock_dir, "dst"))
    start_slow_migration(src, dst, "full-pass")
    kill(dst)
    result = src.wait_migration(timeout=60)
    assert result["status"] == "failed"
    reply = src.execute("migrate_cancel")
    assert reply["error"]["class"] == "GenericError"
    assert migrate_state(src) == result
    assert_source_intact(src, "failed")


# -- 6. convergence under heavy dirtying --------------------------------------------------------
CONVERGE_MIB = 2                 # the guest rewrites this buffer again and again
CONVERGE_CAP = 2 << 20           # bytes/s: one pass over the buffer takes ~1 s on the link
CONVERGE_DOWNTIME_MS = 20        # 40 KiB at the cap: 10 pages
CONVERGE_ROUNDS = 3              # max-iterations


@requires_kvm
def test_converges_under_heavy_dirtying(vms, sock_dir):
    """Default auto-converge parameters (throttle 20%, +10% per round that did not halve).

    The outcome must not depend on how fast this machine lets the guest dirty memory, so
    the test sets the rates itself: a round takes ~1 s at the 2 MiB/s cap, and the guest
    needs to rewrite only half of its 2 MiB buffer (1 MiB/s, far below what any guest does
    even on a loaded host) in that time for the round not to halve the dirty set. Then hv
    must throttle; and since 10 pages never fit the 20 ms limit, the switch-over is
    forced after max-iterations rounds: both are hv's decisions, checked exactly.
    """
    src = vms("src", memory="64", mib=CONVERGE_MIB)
    dst = vms("dst", *incoming(sock_dir, "dst"), memory="64", mib=CONVERGE_MIB)
    src.wait_lines(3)
    assert src.execute("migrate-set-parameters", **{"max-bandwidth": CONVERGE_CAP,
                                                    "downtime-limit": CONVERGE_DOWNTIME_MS,
                                                    "max-iterations": CONVERGE_ROUNDS}) == {"return": {}}
    caps = src.execute("query-migrate-capabilities")["return"]
    assert {"capability": "auto-converge", "state": True} in caps  # the default
    assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
    throttles = []
    samples: list[tuple[float, float, int]] = []  # (asked, answered, bytes transferred)
    while True:
        asked = time.monotonic()
        state = migrate_state(src)
        if state["status"] in TERMINAL:
            break
        samples.append((asked, time.monotonic(), state.get("ram", {}).get("transferred", 0)))
        if "cpu-throttle-percentage" in state:
            throttles.append(state["cpu-throttle-percentage"])
        time.sleep(0.05)
    # max-bandwidth holds over any window (an upper bound on bytes per elapsed time: a
    # loaded machine only sends less); 'transferred' grows per chunk written, a chunk
    # holds at most the buffer plus the kernel's pages, hence that much slack twice.
    slack = 2 * ((CONVERGE_MIB + 1) << 20)
    for i, (asked, _, b1) in enumerate(samples):
        for _, answered, b2 in samples[i + 1:]:  # the longest the counts can be apart
            assert b2 - b1 <= CONVERGE_CAP * (answered - asked) + slack, (answered - asked, b2 - b1)
    assert state["status"] == "completed", state
    assert state["ram"]["dirty-sync-count"] == CONVERGE_ROUNDS + 1, state  # forced switch-over
    assert throttles, "never throttled"
    assert set(throttles) <= {20, 30} and throttles == sorted(throttles), throttles
    assert "cpu-throttle-percentage" not in state
    wait_status(dst, "running")
    dst.wait_lines(len(complete_lines(dst.output())) + 3)
    dst.execute("stop")
    check_output(src.output() + dst.output(), CONVERGE_MIB)


def test_bandwidth_cap_banks_no_credit():
    """Time the sender spent not sending (zero-page scans, between rounds) must not let it
    burst above max-bandwidth later: a burst inflates the round's measured bandwidth, and
    the switch-over is then chosen on an expected downtime the link cannot meet (measured
    before the fix: 505 ms of downtime with the 300 ms limit). In process, real sockets."""
    cap = 64 << 20
    chunk = CHUNK_PAGES * 4096
    memory = GuestMemory([RegionSpec(0, 4 * chunk)])
    ours, theirs = socket.socketpair()
    drain = threading.Thread(target=lambda: [None for _ in iter(lambda: theirs.recv(1 << 20), b"")], daemon=True)
    drain.start()
    try:
        memory.page_view(0, memory.page_count)[:] = b"\x5a" * memory.size
        status = MigrationStatus()
        status.start(memory.size)
        status.activate()
        channel = SocketChannel(ours)
        sender = _Sender(StreamWriter(channel), memory, status, MigrationParameters(max_bandwidth=cap),
                         threading.Event(), ours, channel)
        sender.send(0, CHUNK_PAGES, stable=True)
        time.sleep(0.6)  # idle
        started = time.monotonic()
        sender.send(0, 4 * CHUNK_PAGES, stable=True)
        elapsed = time.monotonic() - started
        # 4 chunks at the cap, no burst. Only this lower bound is asserted: a loaded
        # machine makes the send slower, never faster, so it holds under any load.
        assert elapsed >= 0.95 * 4 * chunk / cap, elapsed
    finally:
        ours.close()
        drain.join(10)
        theirs.close()
        memory.close()
