"""A guest moved between backends mid-run, made certain to have been moved mid-run.

The moved-mid-run tests (smp, dirty, x86 and aarch64 timer guests) hop when the test
thread sees a console line; nothing the host controls holds the guest back, so a test
thread held long enough (a loaded CI host; Unicorn runs a pass in milliseconds) finds the
guest finished. ``move_machine`` then keeps the shut-down machine shut down, and the
output is as expected: such a run passes having moved nothing mid-run, i.e. tests
nothing. :func:`run_moved_mid_run` knows whether each hop moved a guest that was still
running and still had work to do, and runs such an attempt again with a fresh machine,
``MOVE_ATTEMPTS`` times, then fails saying why (CI once: test_smp; its helper, moved
here for the other tests).

How it knows: a listener on the machine (the move hands it on to the new one) keeps the
console as it was at each ``STOP`` event, which ``Machine.pause`` emits once every vCPU
is parked, only if the machine was running. A hop whose move emitted no ``STOP`` moved a
machine that was not running (it had powered off); one whose console at the ``STOP``
already held every line before the last (``done``) moved a guest with nothing left to
do but print that line and power off.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from hv.console import BufferSink
from hv.machine import Machine, RunState
from hv.machine.move import move_machine
from hv.textsafe import printable
from hv_backends import backend_class
from tests.machine.machine_report import describe_machine

log = logging.getLogger(__name__)

# Attempts of a moved run before the test fails: each attempt that found the guest
# finished at a hop is logged (visible in the captured log of a passing test).
MOVE_ATTEMPTS = 3


@dataclass
class StopWatch:
    """A machine listener keeping the console's bytes at every ``STOP`` event (the
    machine was running and every vCPU is parked: the guest's output is frozen)."""

    console: BufferSink
    stops: list[bytes] = field(default_factory=list)

    def __call__(self, event: str, data: dict[str, Any] | None) -> None:
        if event == "STOP":
            self.stops.append(self.console.getvalue())


@dataclass
class MovedRun:
    """One attempt: its whole console output, how many hops moved a running guest that
    had work left, and why it tested nothing (None if every hop moved it mid-run)."""

    output: str
    moved: int
    finished_early: str | None


def run_moved_mid_run(build: Callable[[], tuple[Machine, BufferSink]], hops: Sequence[str],
                      reference: Sequence[str], *, first_lines: int = 2, lines_per_hop: int = 1,
                      before_hop: Callable[[int], None] | None = None,
                      after_shutdown: Callable[[Machine], None] | None = None,
                      timeout: float = 120.0, attempts: int = MOVE_ATTEMPTS) -> MovedRun:
    """Start the machine ``build`` gives, move it onto each backend of ``hops`` and let
    the guest power off; its output must be ``reference`` exactly. The first hop comes
    once the console has ``first_lines`` lines, each later one once the backend it runs
    on has printed ``lines_per_hop`` whole lines of its own; ``before_hop(hop)`` runs
    just before each move (hop counts from 1), ``after_shutdown(machine)`` on the last
    machine once it powered off. An attempt in which a hop found the guest finished is
    checked the same way, logged, and run again with a fresh machine, ``attempts`` times;
    then the test fails saying why. Returns the attempt that moved the guest mid-run at
    every hop."""
    reasons: list[str] = []
    for attempt in range(1, attempts + 1):
        run = _attempt(build, hops, reference, first_lines, lines_per_hop, before_hop, after_shutdown, timeout)
        if run.finished_early is None:
            return run
        log.warning("attempt %d of %d tested nothing: %s", attempt, attempts, run.finished_early)
        reasons.append(f"attempt {attempt}: {run.finished_early}")
    pytest.fail(f"the guest had finished before a hop in all {attempts} attempts, nothing was moved "
                f"mid-run: " + "; ".join(reasons))


def _attempt(build: Callable[[], tuple[Machine, BufferSink]], hops: Sequence[str], reference: Sequence[str],
             first_lines: int, lines_per_hop: int, before_hop: Callable[[int], None] | None,
             after_shutdown: Callable[[Machine], None] | None, timeout: float) -> MovedRun:
    """One run of :func:`run_moved_mid_run`; a wait that times out fails with
    :func:`describe_machine`'s report."""
    machine, console = build()
    watch = StopWatch(console)
    machine.add_listener(watch)
    moved, finished_early = 0, None
    try:
        machine.start()
        lines = first_lines
        for hop, accel in enumerate(hops, start=1):
            wait_machine_lines(machine, console, lines, timeout)
            if before_hop is not None:
                before_hop(hop)
            stops, old = len(watch.stops), machine
            machine = move_machine(machine, backend_class(accel)())
            assert machine is not old and machine.backend.name == accel
            finished_early = finished_before_hop(hop, accel, machine.state, watch.stops[stops:], len(reference))
            if finished_early is not None:
                break
            assert machine.state in (RunState.RUNNING, RunState.SHUTDOWN), describe_machine(machine, console)
            moved += 1
            lines = _lines_after(watch.stops[stops], lines_per_hop)
        reason = machine.wait_shutdown(timeout)
        if reason is None:
            pytest.fail(f"the moved guest did not power off within {timeout:g} s\n"
                        + describe_machine(machine, console))
        assert reason == "guest-shutdown", describe_machine(machine, console)
        if after_shutdown is not None:
            after_shutdown(machine)
    finally:
        machine.close()
    output = console.getvalue().decode()
    _check_output(output.splitlines(), list(reference))
    return MovedRun(output, moved, finished_early)


def finished_before_hop(hop: int, accel: str, state: RunState, stops: list[bytes], total: int) -> str | None:
    """Why hop ``hop`` (onto ``accel``) did not move the guest mid-run, or None if it did:
    ``state`` is the moved machine's, ``stops`` the consoles at the STOP events of that
    move (none: it was not running), ``total`` the lines of the guest's whole output."""
    if not stops:
        assert state is RunState.SHUTDOWN, f"hop {hop}: neither running nor shut down at the move: {state.value}"
        return f"hop {hop} (onto {accel}): the guest had powered off"
    printed = stops[0].count(b"\n")
    if printed >= total - 1:
        return f"hop {hop} (onto {accel}): the guest had printed {printed} of its {total} lines, all its work"
    return None


def _lines_after(stopped: bytes, count: int) -> int:
    """The console line count at which a backend that took over at a console of
    ``stopped`` has printed ``count`` whole lines of its own (a line the previous backend
    had begun is not one)."""
    return stopped.count(b"\n") + count + (1 if stopped and not stopped.endswith(b"\n") else 0)


def wait_machine_lines(machine: Machine, console: BufferSink, count: int, timeout: float = 120.0) -> None:
    """Wait, bounded, until the console has ``count`` lines or the machine shut down;
    on timeout fail with :func:`describe_machine`'s report."""
    deadline = time.monotonic() + timeout
    while console.getvalue().count(b"\n") < count and machine.state is not RunState.SHUTDOWN:
        if time.monotonic() >= deadline:
            pytest.fail(f"no console line {count} within {timeout:g} s\n" + describe_machine(machine, console))
        time.sleep(0.002)


def _check_output(lines: list[str], reference: list[str]) -> None:
    """Fail on the first line (escaped: guest output) where ``lines`` leave ``reference``."""
    if lines == reference:
        return
    index = next((i for i, (a, b) in enumerate(zip(lines, reference, strict=False)) if a != b),
                 min(len(lines), len(reference)))
    got = printable(lines[index]) if index < len(lines) else "(no more lines)"
    want = reference[index] if index < len(reference) else "(no more lines)"
    pytest.fail(f"output differs from the reference at line {index + 1} of {len(lines)} "
                f"(expected {len(reference)}): got {got!r}, expected {want!r}")
