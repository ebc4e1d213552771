"""What an in-process machine was doing when a test gave up waiting for it.

A test that waits for a guest (a power-off, a console line) and times out should say
why, so that a failure seen once in CI diagnoses itself: :func:`describe_machine` reports
the run state, each vCPU (power, halted, parked, its thread's stack, the backend's kick
flags; then its PC and interrupt flag from a snapshot, after pausing the machine when
it still runs), the pending interrupts of the interrupt controller, and the end of the
guest's console, escaped (it is guest output).

It reads some private fields (the vCPU runner's and backends' bookkeeping) without
their locks: a best-effort picture for a failure message, never used for a decision.
"""
from __future__ import annotations

import sys
import traceback
from typing import Any

from hv.errors import MachineError
from hv.machine.runstate import RunState
from hv.textsafe import printable, printable_bytes

CONSOLE_LINES = 30
STACK_FRAMES = 4


def describe_machine(machine: Any, console: Any, pause: bool = True) -> str:
    """A multi-line report on ``machine`` and its ``console`` (a BufferSink); with
    ``pause``, a running machine is paused first so every vCPU's registers can be read
    (a vCPU that does not stop within the pause timeout is itself the finding)."""
    lines = [f"machine: state {machine.state.value}, backend {machine.backend.name}, "
             f"exit_error {machine.exit_error!r}"]
    lines += _vcpu_lines(machine)
    lines += _interrupt_lines(machine)
    if pause and machine.state is RunState.RUNNING:
        try:
            machine.pause()
            lines.append("paused for this report")
        except MachineError as exc:
            lines.append(f"pause failed: {exc}")
    lines += _register_lines(machine)
    lines += console_tail(console)
    return "\n".join(lines)


def _vcpu_lines(machine: Any) -> list[str]:
    """Each vCPU as the machine and the backend see it, and where its thread is."""
    runner, power = machine.runner, machine.power
    frames = sys._current_frames()
    lines = []
    for index, vcpu in enumerate(machine.vcpus):
        thread = runner.threads[index] if index < len(runner.threads) else None
        alive = thread is not None and thread.is_alive()
        lines.append(f"vcpu{index}: power {power.power[index]}, halted {power.halted[index]}, "
                     f"parked {index in runner.parked}, pending start {power.pending_start[index] is not None}, "
                     f"thread {'alive' if alive else 'not running'}, {_backend_flags(vcpu)}")
        frame = frames.get(thread.ident) if alive and thread is not None and thread.ident else None
        if frame is not None:
            stack = traceback.extract_stack(frame)[-STACK_FRAMES:]
            lines += [f"    at {s.filename.rsplit('/', 1)[-1]}:{s.lineno} {s.name}" for s in stack]
    return lines


def _backend_flags(vcpu: Any) -> str:
    """The backend's own view: Unicorn's native kick/service/stop flags and counters,
    KVM's pending kick and whether a thread is inside KVM_RUN."""
    native = getattr(vcpu, "native", None)
    if native is not None:
        s = native.struct
        return (f"unicorn kick {s.kick} service {s.service} stopped {s.stopped} irq_window {s.irq_window} "
                f"window_exits {s.window_exits} checks {s.blocks} engine busy {_engine_busy(vcpu)}")
    if hasattr(vcpu, "_kick_pending"):
        return f"kvm kick pending {vcpu._kick_pending}, in KVM_RUN {vcpu._thread is not None}"
    return f"backend {type(vcpu).__name__}"


def _engine_busy(vcpu: Any) -> bool:
    """True if some thread holds the Unicorn vCPU's engine lock (run() is in progress)."""
    lock = vcpu._engine_lock
    if not lock.acquire(blocking=False):
        return True
    lock.release()
    return False


def _interrupt_lines(machine: Any) -> list[str]:
    """Pending and in-service vectors per local APIC (q35), or the interrupt each vCPU's
    GIC signals (virt), with the controller's own bookkeeping."""
    irq = machine.interrupts
    lines = []
    for lapic in getattr(irq, "lapics", []):
        s = lapic.s
        lines.append(f"lapic{lapic.index}: irr {_vectors(s.irr)} isr {_vectors(s.isr)} tpr {s.tpr:#x} "
                     f"svr {s.svr:#x} timer deadline {s.timer_deadline} deliverable {lapic.deliverable()}")
    gic = getattr(irq, "gic", None)
    if gic is not None:
        lines += [f"gic cpu{i}: signalled {gic.signalled(i)}" for i in range(len(machine.vcpus))]
    for name in ("_in_run", "_retry_at", "_unconfirmed", "_wake_refused"):
        if hasattr(irq, name):
            lines.append(f"interrupts.{name.lstrip('_')}: {getattr(irq, name)}")
    return lines


def _vectors(bits: int) -> list[int]:
    return [v for v in range(256) if bits >> v & 1]


def _register_lines(machine: Any) -> list[str]:
    """PC and interrupt mask of every vCPU from a snapshot; only when every vCPU thread is
    parked (reading a running Unicorn vCPU would wait for its engine for ever)."""
    runner = machine.runner
    if machine.state is RunState.RUNNING or len(runner.parked) < len(runner.threads):
        return [f"registers: not read (state {machine.state.value}, parked {sorted(runner.parked)})"]
    try:
        cpus = machine.save().cpus
    except Exception as exc:  # noqa: BLE001 - a report must not hide the failure it reports
        return [f"registers: save failed: {printable(str(exc))}"]
    lines = []
    for index, cpu in enumerate(cpus):
        if hasattr(cpu, "rip"):
            lines.append(f"vcpu{index} state: rip {cpu.rip:#x} cs {cpu.cs.selector:#x} rflags {cpu.rflags:#x} "
                         f"(IF {cpu.rflags >> 9 & 1}) shadow {cpu.interrupt_shadow} halted {cpu.halted} "
                         f"power {cpu.power}")
        else:
            lines.append(f"vcpu{index} state: pc {cpu.pc:#x} pstate {cpu.pstate:#x} halted {cpu.halted} "
                         f"power {cpu.power}")
    return lines


def console_tail(console: Any, count: int = CONSOLE_LINES) -> list[str]:
    """The last ``count`` console lines, each escaped; an unfinished last line is marked."""
    data = console.getvalue()
    parts = data.split(b"\n")
    partial = parts.pop()
    lines = [f"console: {len(parts)} lines, last {min(count, len(parts))}:"]
    lines += [f"  | {printable_bytes(part)}" for part in parts[-count:]]
    if partial:
        lines.append(f"  | {printable_bytes(partial)}  (no newline yet)")
    return lines
