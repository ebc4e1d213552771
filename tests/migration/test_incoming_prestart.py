"""An incoming machine's vCPU threads exist, parked, before the switch-over.

Creating a thread waits for its first run, which on a loaded 2-core host took up to
~100 ms of a migration's downtime when the destination did it at the commit. Now a
machine marked ``inmigrate`` makes its vCPU threads at once (and an in-process receiver
at CONFIG): the commit creates no thread, the very threads made before the final state
was applied run the guest after RESUME, and a failed incoming migration still leaves no
vCPU thread behind. Real Unicorn / KVM, real sockets, the engine's own threads.
"""
from __future__ import annotations

import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import pytest

from hv.config import parse_args
from hv.console import BufferSink
from hv.machine import Machine, MachineError, MachineSnapshot, RunState
from hv.machine.gic_interrupts import GicController
from hv.machine.interrupts import InterruptController
from hv.migration.stream import StreamError
from hv_backends import backend_class
from tests.helpers import (
    FIXTURES,
    complete_lines,
    migrate_in_process,
    migration_status_for,
    receive_in_thread,
    requires_kvm,
)

ARCH = {"q35": "x86_64", "virt": "aarch64"}
CASES = [
    pytest.param("q35", "unicorn", id="x86_64-unicorn"),
    pytest.param("virt", "unicorn", id="aarch64-unicorn"),
    pytest.param("q35", "kvm", marks=requires_kvm, id="x86_64-kvm"),
]
# threads a machine's start used to create: its vCPUs and its interrupt controller's timer
HELPER_NAMES = ("vcpu", InterruptController.TIMER_THREAD_NAME, GicController.TIMER_THREAD_NAME)


class ThreadSink(BufferSink):
    """A console that also notes which host threads wrote to it (the vCPU threads: the
    UART passes each byte on inside the guest's port / MMIO write)."""

    def __init__(self) -> None:
        super().__init__()
        self.writers: set[int] = set()

    def write(self, data: bytes) -> None:
        self.writers.add(threading.get_native_id())
        super().write(data)


@dataclass
class Observed:
    """What the destination looked like when its final state was applied and at RESUME."""

    at_restore: list[tuple[list[int], set[int], RunState, bool, set[threading.Thread]]] = field(default_factory=list)
    at_resume: list[tuple[list[int], set[threading.Thread]]] = field(default_factory=list)


def build(machine_type: str, accel: str, load: bool) -> tuple[Machine, ThreadSink]:
    """A 2-vCPU machine running the smp guest (``load``: kernel loaded, as a source; else
    bare, as ``hv -incoming`` builds it)."""
    kernel = FIXTURES / ARCH[machine_type] / "smp.elf"
    config = parse_args(["-machine", machine_type, "-m", "64", "-smp", "2", "-kernel", str(kernel),
                         "-append", "cpus=2 mib=1"]).config
    sink = ThreadSink()
    machine = Machine(config, backend_class(accel)(), sink)
    if load:
        machine.load_kernel(kernel.read_bytes())
    return machine, sink


def observe(target: Machine) -> Observed:
    """Note the destination's vCPU threads when the final state is restored (the real
    restore then runs) and when RESUME is emitted."""
    seen = Observed()
    restore = target.restore

    def restore_observed(snapshot: MachineSnapshot) -> None:
        # threads made at CONFIG may still be on their way to their first park: wait (a
        # no-op without threads) so that what follows does not depend on the scheduler
        target.runner.wait_parked()
        with target.runner.run.lock:
            seen.at_restore.append((target.vcpu_thread_ids(), set(target.runner.parked), target.state,
                                    target.runner.started, set(threading.enumerate())))
        restore(snapshot)

    def on_event(event: str, _data: Any) -> None:
        if event == "RESUME":
            seen.at_resume.append((target.vcpu_thread_ids(), set(threading.enumerate())))

    target.restore = restore_observed  # type: ignore[method-assign]
    target.add_listener(on_event)
    return seen


def wait_lines(sink: ThreadSink, count: int, timeout: float = 120.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while len(lines := complete_lines(sink.getvalue().decode(errors="replace"))) < count:
        assert time.monotonic() < deadline, sink.getvalue()[-300:]
        time.sleep(0.01)
    return lines


def helper_threads(threads: set[threading.Thread]) -> set[threading.Thread]:
    return {t for t in threads if t.name.startswith(HELPER_NAMES)}


@pytest.mark.parametrize("machine_type,accel", CASES)
def test_commit_creates_no_thread_and_the_parked_threads_run_the_guest(machine_type: str, accel: str) -> None:
    source, src_sink = build(machine_type, accel, load=True)
    target, tgt_sink = build(machine_type, accel, load=False)
    try:
        target.set_state(RunState.INMIGRATE)        # what hv -incoming does right after building it
        target.runner.wait_parked()
        parked_ids = target.vcpu_thread_ids()
        threads = list(target.runner.threads)
        assert len(threads) == 2 and all(parked_ids), parked_ids
        assert target.state is RunState.INMIGRATE and not target.runner.started
        with pytest.raises(MachineError, match="not been started"):
            target.resume()                          # QMP cont cannot run a guest not yet arrived
        seen = observe(target)
        source.start()
        wait_lines(src_sink, 3)
        status, errors = migrate_in_process(source, target)
        assert not errors, errors
        assert status.to_qmp()["status"] == "completed", status.to_qmp()
        before = len(complete_lines(tgt_sink.getvalue().decode()))
        lines = wait_lines(tgt_sink, before + 2)
        target.pause()
        # the final state was applied to a machine whose threads were all there, parked
        [(ids, parked, state, started, threads_then)] = seen.at_restore
        assert (ids, parked, state, started) == (parked_ids, {0, 1}, RunState.INMIGRATE, False)
        # the commit (restore -> RESUME) created no vCPU or timer thread, and the same
        # threads, by host id, then ran the guest: the console's bytes came from them
        [(ids_at_resume, threads_at_resume)] = seen.at_resume
        assert ids_at_resume == parked_ids
        assert not helper_threads(threads_at_resume - threads_then)
        assert target.runner.threads == threads
        assert tgt_sink.writers and tgt_sink.writers <= set(parked_ids), (tgt_sink.writers, parked_ids)
        assert target.vcpu_thread_ids() == parked_ids
        # the first line may end one the source began (the guest moved mid-line): "bad 0"
        # alone when the move fell right after its last space
        assert len(lines) >= 2 and lines[0].endswith("bad 0"), lines
        assert all(line.endswith(" bad 0") for line in lines[1:]), lines
    finally:
        source.close()
        target.close()
    assert not any(t.is_alive() for t in threads)


@pytest.mark.parametrize("machine_type,accel", CASES)
def test_failed_incoming_migration_leaves_no_thread_and_never_ran(machine_type: str, accel: str) -> None:
    target, sink = build(machine_type, accel, load=False)
    try:
        target.set_state(RunState.INMIGRATE)
        target.runner.wait_parked()
        threads = list(target.runner.threads)
        assert len(threads) == 2
        out_sock, in_sock = socket.socketpair()
        receiver, errors = receive_in_thread(target, in_sock, migration_status_for(target))
        try:
            out_sock.sendall(b"this is not a migration stream\n" * 4)
            out_sock.shutdown(socket.SHUT_WR)
            receiver.join(timeout=60)
            assert not receiver.is_alive()
        finally:
            out_sock.close()
            in_sock.close()
        assert len(errors) == 1 and isinstance(errors[0], StreamError), errors
        assert target.state is RunState.INMIGRATE and not target.runner.started
        assert target.runner.threads == threads and sink.getvalue() == b""
    finally:
        target.close()
    assert not any(t.is_alive() for t in threads)
    assert target.runner.threads == []


def test_receiver_without_inmigrate_label_gets_its_threads_at_config() -> None:
    """An in-process destination that was never marked inmigrate gets its threads, parked,
    once CONFIG is accepted (before the final state), not at the commit."""
    source, src_sink = build("q35", "unicorn", load=True)
    target, tgt_sink = build("q35", "unicorn", load=False)
    try:
        assert target.runner.threads == []
        seen = observe(target)
        source.start()
        wait_lines(src_sink, 3)
        status, errors = migrate_in_process(source, target)
        assert not errors, errors
        [(ids, parked, state, started, threads_then)] = seen.at_restore
        assert all(ids) and parked == {0, 1} and state is RunState.PRELAUNCH and not started
        [(ids_at_resume, threads_at_resume)] = seen.at_resume
        assert ids_at_resume == ids and not helper_threads(threads_at_resume - threads_then)
        wait_lines(tgt_sink, len(complete_lines(tgt_sink.getvalue().decode())) + 1)
        assert tgt_sink.writers and tgt_sink.writers <= set(ids)
    finally:
        source.close()
        target.close()
