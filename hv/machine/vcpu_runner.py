"""The vCPU threads: run loop, exit handling, pause/kick/park, and throttling.

One thread per vCPU enters the guest (``vcpu.run``) and handles what made it return.
Between runs it takes the big lock and waits, parked, until it has something to do: the
machine is running and the vCPU is on and not halted, or (halted) an interrupt became
deliverable, or (paused) an injected vector must still reach the guest. :meth:`pause`
of the machine kicks every vCPU out of the guest and waits until all are parked.

Throttling (migration auto-converge) keeps the vCPUs off the CPU a share of the time,
as QEMU's ``cpu_throttle``.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from hv.machine.gic_interrupts import GicController
from hv.machine.interrupts import InterruptController
from hv.machine.power import GuestPowerRequests, VcpuPower
from hv.machine.runstate import MachineError, RunState, RunStateTracker
from hv_backends.base import Exit, ExitReason, IoHandler, Vcpu

log = logging.getLogger(__name__)

PAUSE_TIMEOUT = 10.0
THROTTLE_SLICE = 0.01  # seconds of guest time between throttle sleeps


class VcpuRunner:
    """The vCPU threads of one machine.

    ``io`` serves the vCPUs' port and MMIO exits (the machine); ``guest`` turns a guest
    power-off or reset exit into the machine's action; ``shutdown(reason)`` ends the
    machine and ``internal_error(message)`` records why a vCPU stopped the guest.
    """

    def __init__(self, run: RunStateTracker, vcpus: Sequence[Vcpu], power: VcpuPower,
                 interrupts: InterruptController | GicController | None, io: IoHandler,
                 guest: GuestPowerRequests, shutdown: Callable[[str], None],
                 internal_error: Callable[[str], None]) -> None:
        self.run = run
        self.vcpus = vcpus
        self.power = power
        self.interrupts = interrupts
        self.io = io
        self.guest = guest
        self._shutdown = shutdown
        self._internal_error = internal_error
        self.parked: set[int] = set()
        self.threads: list[threading.Thread] = []
        self._started = False
        self._throttle_percent = 0
        self._throttle_wake = threading.Event()
        self._throttle_thread: threading.Thread | None = None
        self._throttle_ran_since = [0.0] * len(vcpus)  # when each vCPU's run slice began

    # -- threads ------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """:meth:`start` ran: the guest clocks are bound and the guest may run (threads
        made by :meth:`prepare` alone do not count: the machine has not started)."""
        return self._started

    def prepare(self) -> None:
        """Big lock held: create one thread per vCPU now, parked (they run only once the
        machine runs), so that :meth:`start` creates none; idempotent.

        An incoming migration's destination does this long before its switch-over: a
        new thread's ``start()`` waits for the thread's first run, which on a loaded host
        took up to ~100 ms of the guest's downtime when it happened at the commit. Clocks
        are not bound here: the state that arrives later decides them (see :meth:`start`)."""
        if self.threads:
            return
        for index, vcpu in enumerate(self.vcpus):
            thread = threading.Thread(target=self._vcpu_loop, args=(index, vcpu), name=f"vcpu{index}", daemon=True)
            self.threads.append(thread)
            thread.start()

    def start(self) -> None:
        """Big lock held: let the machine's vCPU threads run its guest (they still park
        unless the machine runs); the threads are created now unless :meth:`prepare` did.

        A vCPU that keeps its own counter (Unicorn x86's TSC) is first bound to the
        machine's guest clock, one reading for all, so every vCPU's counter runs alike;
        this happens here, after any restore, whether or not the threads existed (they
        are parked on the big lock the caller holds, so none runs before the binding)."""
        if self.interrupts is not None:
            at_ns = self.interrupts.clock.now()
            for vcpu in self.vcpus:
                vcpu.use_guest_clock(self.interrupts.clock, at_ns)
        self._started = True
        self.prepare()

    def stop(self) -> None:
        """After the machine is marked closing: wake every vCPU and join its thread."""
        self.kick_all()
        for thread in self.threads:
            thread.join(PAUSE_TIMEOUT)
            if thread.is_alive():
                log.error("%s did not stop", thread.name)
        self.threads = []

    def thread_ids(self) -> list[int]:
        """Host thread ids of the vCPU threads (0 before they exist)."""
        return [t.native_id or 0 for t in self.threads] or [0] * len(self.vcpus)

    def kick(self, index: int) -> None:
        self.vcpus[index].kick()

    def kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.kick()

    def wait_parked(self) -> None:
        """Block until every vCPU thread is parked (after a pause)."""
        deadline = time.monotonic() + PAUSE_TIMEOUT
        with self.run.lock:
            while len(self.parked) < len(self.threads):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MachineError(f"vCPUs did not stop within {PAUSE_TIMEOUT:.0f} s")
                self.run.changed.wait(remaining)

    # -- throttling (migration auto-converge) ---------------------------------------------
    def set_throttle(self, percent: int) -> None:
        """Keep the vCPUs off the CPU ``percent``% of the time (0 turns it off).

        Every ``THROTTLE_SLICE`` of guest run time a throttle thread kicks the vCPUs,
        which then sleep ``percent / (100 - percent)`` slices, as QEMU's auto-converge.
        """
        percent = max(0, min(99, percent))
        with self.run.lock:
            if percent and not self._throttle_percent:
                self._throttle_ran_since = [time.monotonic()] * len(self.vcpus)
            self._throttle_percent = percent
            if percent and self._throttle_thread is None:
                self._throttle_thread = threading.Thread(target=self._throttle_loop, name="throttle", daemon=True)
                self._throttle_thread.start()
        self._throttle_wake.set()

    @property
    def throttle_percent(self) -> int:
        return self._throttle_percent

    def _throttle_loop(self) -> None:
        while True:
            with self.run.lock:
                if self.run.closing or not self._throttle_percent:
                    self._throttle_thread = None
                    return
            self._throttle_wake.wait(THROTTLE_SLICE / 2)
            self._throttle_wake.clear()
            if self._throttle_percent and self.run.running:
                now = time.monotonic()
                for index, vcpu in enumerate(self.vcpus):
                    if now - self._throttle_ran_since[index] >= THROTTLE_SLICE:
                        vcpu.kick()

    def _throttle_pause(self, index: int) -> None:
        """Sleep off a throttle kick, once the vCPU has had its slice of run time.

        Slices are counted from the end of the vCPU's last throttle sleep, so a kick that
        arrived while it slept (and is delivered as soon as it runs again) is ignored:
        otherwise at 50% and more the guest would hardly run at all.
        """
        percent = self._throttle_percent
        if not percent or not self.run.running:
            return
        if time.monotonic() - self._throttle_ran_since[index] < THROTTLE_SLICE * 0.9:
            return
        time.sleep(THROTTLE_SLICE * percent / (100 - percent))
        self._throttle_ran_since[index] = time.monotonic()

    # -- the run loop ---------------------------------------------------------------------
    def _may_run(self, index: int) -> bool:
        return (self.run.running and not self.power.halted[index] and not self.run.closing
                and self.power.is_on(index))

    def _vcpu_loop(self, index: int, vcpu: Vcpu) -> None:
        irq = self.interrupts
        if irq is None:
            self._vcpu_loop_no_irq(index, vcpu)
            return
        irq.bind_thread(index)
        while True:
            with self.run.lock:
                irq.start_timer_thread()
                action = self._wait_runnable(index, irq)
                if action is None:
                    return
                if action == "settle":
                    # A vector handed to KVM has not provably reached the guest: run once
                    # more (the guest is entered, takes it, exits) before parking.
                    irq.settle(index, vcpu)
                else:
                    if action == "wake":
                        if not irq.wake(index, vcpu):   # IF=0: the halt goes on
                            continue
                        self.power.halted[index] = False
                    irq.before_run(index, vcpu)
            result = vcpu.run(self.io)
            irq.after_run(index, vcpu, result)
            self._handle_exit(index, result)

    def _wait_runnable(self, index: int, irq: InterruptController | GicController) -> str | None:
        """Big lock held: wait (parked) until vCPU ``index`` has something to do.

        Returns "run", "wake" (halted, an interrupt is deliverable), "settle" (paused, but
        an injection must reach the guest first) or None when the machine closes.
        """
        parked = False
        while True:
            irq.sync_clock()   # guest time runs exactly while the machine runs
            if self.run.closing:
                self.parked.add(index)
                self.run.changed.notify_all()
                return None
            if self.power.pending_start[index] is not None:
                self.power.apply_start(index)
            action = None
            timeout = None
            if not self.power.is_on(index):
                pass    # powered off / waiting for SIPI: parked until CPU_ON / SIPI
            elif self.run.running:
                if not self.power.halted[index]:
                    action = "run"
                else:
                    timeout = irq.halt_timeout(index)   # fires this vCPU's due timer
                    if irq.wants_wake(index):
                        action = "wake"
            elif irq.must_settle(index):
                action = "settle"
            if action is not None:
                if parked:
                    self.parked.discard(index)
                return action
            if not parked:
                parked = True
                self.parked.add(index)
                self.run.changed.notify_all()
            self.run.changed.wait(timeout)

    def _vcpu_loop_no_irq(self, index: int, vcpu: Vcpu) -> None:
        while True:
            with self.run.lock:
                if not self._may_run(index):
                    self.parked.add(index)
                    self.run.changed.notify_all()
                    while not self._may_run(index) and not self.run.closing:
                        self.run.changed.wait()
                    self.parked.discard(index)
                if self.run.closing:
                    self.parked.add(index)
                    self.run.changed.notify_all()
                    return
            result = vcpu.run(self.io)
            self._handle_exit(index, result)

    def _handle_exit(self, index: int, result: Exit) -> None:
        reason = result.reason
        if reason is ExitReason.KICKED or reason is ExitReason.IRQ_WINDOW:
            self._throttle_pause(index)
            return
        if reason is ExitReason.HALT:
            # The vCPU waits in _vcpu_loop until an interrupt is deliverable (q35); without
            # an interrupt controller (virt) it stays halted until reset.
            self.power.halt(index)
            log.debug("vcpu%d halted", index)
        elif reason is ExitReason.CPU_OFF:
            self.power.cpu_off(index)
        elif reason is ExitReason.SYSTEM_OFF:
            self.guest.system_off()
        elif reason is ExitReason.SYSTEM_RESET:
            self.guest.system_reset(index, result.detail)
            with self.run.lock:  # park until the reset thread has reloaded the machine
                while self.run.state is RunState.RUNNING and not self.run.closing:
                    self.run.changed.wait(0.05)
        else:
            message = f"vcpu{index}: {result.detail or reason.value}"
            log.error("guest stopped on an internal error: %s", message)
            self._internal_error(message)
            self._shutdown("internal-error")
