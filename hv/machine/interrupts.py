"""Interrupt delivery for q35: local APICs + IOAPIC + MSI, the guest clock and its timers.

The same model on every backend: the controllers are hv devices (Python state, saved with
the machine); a backend only hands one vector to the CPU. :class:`InterruptController`
owns one :class:`~hv.devices.lapic.Lapic` per vCPU, the :class:`~hv.devices.ioapic.IoApic`
and the :class:`~hv.devices.clock.GuestClock`, and is called by the machine's vCPU loop:

``before_run(index, vcpu)`` (big lock held, right before ``vcpu.run``)
    If the APIC has a deliverable vector (highest IRR above PPR) it is handed to the
    backend — ``inject_interrupt(vector)``, which checks RFLAGS.IF and the interrupt
    shadow — and acknowledged (IRR -> ISR) only when the backend took it. Otherwise the
    backend is asked for an interrupt-window exit (``request_interrupt_window``; KVM's
    own, or on Unicorn hv's native block hook stopping at the first block with IF=1).
    Where the window is not exact (``Vcpu.exact_interrupt_window`` false) a retry kick
    ``UNICORN_RETRY_NS`` later backs it up (and covers the interrupt shadow). The backend
    call itself is made with the big lock released (Unicorn's takes ~0.6 ms); the vCPU is
    not parked meanwhile, so no snapshot can be taken half-way.
``after_run(index, vcpu, exit)``
    A backend with ``deferred_injection`` (KVM) delivers a queued vector at the next
    guest entry. A ``run`` that was kicked before entering (``immediate_exit``) leaves it
    queued inside KVM, where a saved CPU state would not see it. Such an injection stays
    *unconfirmed* until a run proves the guest was entered (any exit other than a kick,
    or the backend reporting it can take interrupts again, which it cannot while one is
    queued).
``must_settle(index)``
    True while an injection is unconfirmed: the vCPU loop then runs the vCPU once more
    (with an interrupt-window request, so it exits as soon as the handler re-enables
    interrupts) instead of parking. So a paused machine never has a vector inside KVM:
    every vector is either in an APIC's IRR/ISR (saved) or already in the guest.
``wake(index, vcpu)``
    For a halted vCPU: inject a deliverable vector if the CPU accepts it (IF=1); the
    vCPU then leaves the halt. A halted vCPU with IF=0 stays halted, as on hardware.

Timers: a thread (``irq-timer``) sleeps until the earliest local APIC timer deadline (guest
clock time), fires it under the big lock (IRR set) and kicks or wakes the vCPU. It also
runs the guest clock exactly while the machine state is ``running``.

MSI: :meth:`InterruptController.msi` (an ``MsiSink``) decodes address 0xFEExxxxx
(destination 19:12, logical bit 2) and data (vector 7:0, delivery mode 10:8, level trigger
bit 15). Device lines: :meth:`line(gsi)` drives an IOAPIC pin under the big lock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hv.devices.clock import ClockState, GuestClock
from hv.devices.ioapic import IoApic
from hv.devices.lapic import (
    ICR_DELIVERY_MODE_SHIFT,
    ICR_DEST_LOGICAL,
    ICR_SHORTHAND_SHIFT,
    ICR_TRIGGER_LEVEL,
    LAPIC_SIZE,
    LVT_TIMER_INDEX,
    Lapic,
)
from hv_backends.base import Exit, ExitReason, Vcpu

log = logging.getLogger(__name__)

UNICORN_RETRY_NS = 200_000       # host ns between injection attempts while IF=0 on Unicorn
DELIVERY_FIXED = 0
DELIVERY_LOWEST = 1
DELIVERY_INIT = 5
DELIVERY_STARTUP = 6
ICR_LEVEL_ASSERT = 1 << 14

class TimerSource(Protocol):
    """A device timer the timer thread runs (guest-clock ns deadlines, big lock held)."""

    @property
    def timer_deadline(self) -> int | None: ...

    def poll_timer(self, now: int) -> bool: ...


class PowerHost(Protocol):
    """What INIT and STARTUP IPIs act on: the machine's vCPU power states (called with
    the big lock held)."""

    def apic_init(self, target: int) -> None: ...

    def apic_startup(self, target: int, vector: int) -> None: ...


class ControllerCore:
    """What the q35 and virt interrupt controllers share: the machine's big lock and
    condition, the kick / run-state callbacks, the guest clock, the bookkeeping of
    injection retries (the safety net behind Unicorn's emulated interrupt window) and the
    timer thread that runs :meth:`poll`.

    ``lock`` is the machine's big lock and ``changed`` its condition (vCPU threads wait on
    it while halted); ``kick(index)`` makes a vCPU's ``run`` return; ``is_running()``
    and ``is_closing()`` report the machine's run state.
    """

    TIMER_THREAD_NAME = "irq-timer"

    def __init__(self, vcpus: int, lock: Any, changed: threading.Condition,
                 kick: Callable[[int], None], is_running: Callable[[], bool],
                 is_closing: Callable[[], bool], clock: GuestClock | None) -> None:
        self._lock = lock
        self._changed = changed
        self._kick = kick
        self._is_running = is_running
        self._is_closing = is_closing
        self.clock = clock if clock is not None else GuestClock()
        self._in_run = [False] * vcpus
        self._retry_at: list[int | None] = [None] * vcpus      # host ns of the next attempt
        self._timer_thread: threading.Thread | None = None

    def clock_device(self) -> ClockDevice:
        """The clock for ``Machine.devices`` (save/restore)."""
        return ClockDevice(self)

    def _notify(self) -> None:
        with self._lock:        # re-entrant: callers usually hold it already
            self._changed.notify_all()

    def sync_clock(self) -> None:
        """Run the guest clock exactly while the machine runs (big lock held)."""
        if self.clock.set_running(self._is_running()):
            self._clock_started_or_stopped()
            self._notify()

    def _clock_started_or_stopped(self) -> None:
        """Hook: the machine was paused or resumed (CPU states may have been replaced)."""

    def start_timer_thread(self) -> None:
        """Start the timer thread once (big lock held)."""
        if self._timer_thread is None:
            self._timer_thread = threading.Thread(target=self._timer_loop, name=self.TIMER_THREAD_NAME,
                                                  daemon=True)
            self._timer_thread.start()

    def poll(self) -> float | None:
        """Fire due timers and retry kicks; seconds until the next thing to do (None:
        nothing scheduled). Big lock held."""
        raise NotImplementedError

    def _retry_kicks(self, pending: Callable[[int], bool], delays: list[float]) -> None:
        """Kick each running vCPU whose injection retry is due while ``pending(index)``
        still holds; add the delays of the retries not yet due."""
        host_now = time.monotonic_ns()
        for index, retry in enumerate(self._retry_at):
            if retry is None:
                continue
            if not self._is_running() or not pending(index):
                self._retry_at[index] = None
            elif retry <= host_now:
                self._retry_at[index] = None
                if self._in_run[index]:
                    self._kick(index)
            else:
                delays.append((retry - host_now) / 1e9)

    def _timer_loop(self) -> None:
        with self._lock:
            while not self._is_closing():
                delay = self.poll()
                self._changed.wait(delay)
            self._timer_thread = None


class InterruptController(ControllerCore):
    """Local APICs, IOAPIC, MSI routing, the guest clock and timer thread of one q35 machine."""

    def __init__(self, vcpus: int, lock: Any, changed: threading.Condition,
                 kick: Callable[[int], None], is_running: Callable[[], bool],
                 is_closing: Callable[[], bool], clock: GuestClock | None = None) -> None:
        super().__init__(vcpus, lock, changed, kick, is_running, is_closing, clock)
        self.lapics = [Lapic(i, self.clock, self) for i in range(vcpus)]
        self.ioapic = IoApic(self)
        self._local = threading.local()
        self._unconfirmed: list[int | None] = [None] * vcpus   # KVM: queued, entry not proven
        self._wake_refused: list[int | None] = [None] * vcpus  # IRR when a halted CPU refused (IF=0)
        self._reported: set[str] = set()
        self.stats = InterruptStats(vcpus)
        self._timer_fired_at: list[int | None] = [None] * vcpus   # host ns, for latency
        self._power_host: PowerHost | None = None
        # Board timers besides the local APICs (q35: PIT counter 0, RTC), see add_timer_source.
        self.timer_sources: list[TimerSource] = []

    # -- wiring ------------------------------------------------------------------------
    def bind_thread(self, index: int) -> None:
        """Declare the calling thread to be vCPU ``index``'s (for local APIC accesses)."""
        self._local.index = index

    def add_timer_source(self, source: TimerSource) -> None:
        """Let the timer thread fire ``source`` at its :attr:`TimerSource.timer_deadline`
        (the device calls :meth:`timer_changed` when that moves)."""
        self.timer_sources.append(source)

    def set_power_host(self, host: PowerHost | None) -> None:
        """Where INIT / STARTUP IPIs go (the machine); None refuses them."""
        self._power_host = host

    def current_lapic(self) -> Lapic:
        """The calling vCPU thread's local APIC (vCPU 0's for other threads). An access
        from a vCPU proves that the guest was entered: a queued injection is confirmed."""
        index = getattr(self._local, "index", None)
        if index is None:
            return self.lapics[0]
        self._unconfirmed[index] = None
        return self.lapics[index]

    def lapic_window(self) -> LapicWindow:
        return LapicWindow(self)

    def line(self, gsi: int) -> GsiLine:
        """An interrupt line driving IOAPIC pin ``gsi`` (thread-safe)."""
        return GsiLine(self, gsi)

    def msi(self) -> MsiRouter:
        """The MSI sink for PCI functions (thread-safe)."""
        return MsiRouter(self)

    # -- LapicHost ---------------------------------------------------------------------
    def irq_changed(self, index: int) -> None:
        if self.lapics[index].deliverable() is None:
            return
        if self._in_run[index]:
            self._kick(index)
        else:
            self._notify()      # a halted vCPU waits on the condition

    def timer_changed(self) -> None:
        self._notify()

    def eoi_broadcast(self, vector: int) -> None:
        self.ioapic.eoi(vector)

    def send_ipi(self, source: int, icr_lo: int, icr_hi: int) -> None:
        vector = icr_lo & 0xFF
        mode = (icr_lo >> ICR_DELIVERY_MODE_SHIFT) & 7
        shorthand = (icr_lo >> ICR_SHORTHAND_SHIFT) & 3
        level = bool(icr_lo & ICR_TRIGGER_LEVEL)
        if mode in (DELIVERY_INIT, DELIVERY_STARTUP) and self._power_host is not None:
            if mode == DELIVERY_INIT and not icr_lo & ICR_LEVEL_ASSERT:
                return      # INIT level de-assert: no effect on modern CPUs
            for lapic in self._ipi_targets(source, shorthand, icr_lo, icr_hi):
                if mode == DELIVERY_INIT:
                    self._power_host.apic_init(lapic.index)
                else:
                    self._power_host.apic_startup(lapic.index, vector)
            return
        if mode not in (DELIVERY_FIXED, DELIVERY_LOWEST):
            self._report(f"ipi-mode-{mode}", "IPI delivery mode %d (INIT/SIPI/NMI/SMI) is not supported", mode)
            return
        if vector < 16:
            self.lapics[source].note_send_error()
            return
        targets = self._ipi_targets(source, shorthand, icr_lo, icr_hi)
        if mode == DELIVERY_LOWEST:
            targets = targets[:1]
        for lapic in targets:
            lapic.accept(vector, level)

    def _ipi_targets(self, source: int, shorthand: int, icr_lo: int, icr_hi: int) -> list[Lapic]:
        """The local APICs an IPI from ``source`` goes to (shorthand or destination)."""
        if shorthand == 1:
            targets = [self.lapics[source]]
        elif shorthand == 2:
            targets = list(self.lapics)
        elif shorthand == 3:
            targets = [lapic for lapic in self.lapics if lapic.index != source]
        else:
            targets = self._destinations(icr_hi >> 24, bool(icr_lo & ICR_DEST_LOGICAL))
        return targets

    # -- messages (IOAPIC, MSI) ------------------------------------------------------------
    def _destinations(self, dest: int, logical: bool) -> list[Lapic]:
        if logical:
            return [lapic for lapic in self.lapics if lapic.matches_logical(dest)]
        if dest == 0xFF:
            return list(self.lapics)
        return [lapic for lapic in self.lapics if lapic.apic_id == dest]

    def deliver(self, dest: int, logical: bool, delivery_mode: int, vector: int, level: bool) -> bool:
        """Deliver one interrupt message (fixed or lowest priority; lowest priority goes
        to the first APIC of the destination set)."""
        if delivery_mode not in (DELIVERY_FIXED, DELIVERY_LOWEST):
            self._report(f"msg-mode-{delivery_mode}", "interrupt message delivery mode %d is not supported",
                         delivery_mode)
            return False
        targets = self._destinations(dest, logical)
        if delivery_mode == DELIVERY_LOWEST:
            targets = targets[:1]
        accepted = False
        for lapic in targets:
            accepted = lapic.accept(vector, level) or accepted
        return accepted

    def send_msi(self, address: int, data: int) -> None:
        if address >> 20 != 0xFEE:
            self._report("msi-address", "MSI to address %#x (not 0xFEExxxxx) dropped", address)
            return
        self.deliver((address >> 12) & 0xFF, bool(address & 0x4), (data >> 8) & 7, data & 0xFF,
                     bool(data & 0x8000))

    def _report(self, key: str, message: str, *args: Any) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.warning(message, *args)

    # -- vCPU side (called by the vCPU's own thread) ------------------------------------------
    def before_run(self, index: int, vcpu: Vcpu) -> None:
        """Hand the highest deliverable vector to the backend, or arrange to retry.
        Big lock held; the machine is running."""
        if vcpu.deferred_injection:
            self._offer_queued(index, vcpu)
        else:
            self._offer_immediate(index, vcpu)
        self._in_run[index] = True

    def _offer_queued(self, index: int, vcpu: Vcpu) -> None:
        """A backend that queues the vector for the next entry (KVM): one vector per run,
        unconfirmed until the guest was entered; the window exit asks for the next."""
        lapic = self.lapics[index]
        vector = lapic.deliverable()
        if vector is not None and self._unconfirmed[index] is None and self._inject(vcpu, vector):
            self._taken(index, vector)
            self._unconfirmed[index] = vector
            vector = lapic.deliverable()
        if vector is not None:
            self.stats.window_requests += 1
            vcpu.request_interrupt_window()
        else:
            vcpu.cancel_interrupt_window()

    def _offer_immediate(self, index: int, vcpu: Vcpu) -> None:
        """A backend whose injection enters the handler at once (Unicorn): inject every
        deliverable vector the CPU takes; when it refuses, open the window."""
        lapic = self.lapics[index]
        vector = lapic.deliverable()
        while vector is not None:
            enabled = vcpu.interrupts_enabled()
            if not enabled or not self._inject(vcpu, vector):
                # IF=0: the engine stops as soon as the guest sets IF (the window).
                # IF=1 but refused: the shadow after sti / mov ss covers one more
                # instruction, so the window opens after it. An inexact window is
                # backed by a retry kick either way.
                vcpu.request_interrupt_window(after_shadow=enabled)
                if not vcpu.exact_interrupt_window:
                    self._retry_at[index] = time.monotonic_ns() + UNICORN_RETRY_NS
                    self.stats.retries += 1
                    self._notify()
                return
            self._taken(index, vector)
            vector = lapic.deliverable()
        self._retry_at[index] = None
        vcpu.cancel_interrupt_window()

    def after_run(self, index: int, vcpu: Vcpu, result: Exit) -> None:
        """Note the end of a run; confirms a deferred (KVM) injection once the guest was
        entered: any exit but a kick (an open window included) proves it, and so does
        the backend reporting it could take another interrupt."""
        with self._lock:
            self._in_run[index] = False
            if self._unconfirmed[index] is None:
                return
            if result.reason is not ExitReason.KICKED or vcpu.ready_for_interrupt:
                self._unconfirmed[index] = None

    def must_settle(self, index: int) -> bool:
        """True while a vector may still sit queued inside KVM (run once more first)."""
        return self._unconfirmed[index] is not None

    def settle(self, index: int, vcpu: Vcpu) -> None:
        """Prepare a run whose only purpose is to complete a queued entry (paused
        machine): the window exit ends it as soon as the handler re-enables interrupts."""
        vcpu.request_interrupt_window()
        self._in_run[index] = True

    def halt_timeout(self, index: int) -> float | None:
        """Seconds a halted vCPU may wait before its own APIC timer is due (None: no
        timer, or the clock stands still). Big lock held. Due timers are fired here, so
        a halted vCPU wakes at its deadline without a round trip through the timer
        thread."""
        lapic = self.lapics[index]
        if lapic.poll_timer(self.clock.now()) and lapic.deliverable() is not None:
            self._timer_fired_at[index] = time.monotonic_ns()
            self._notify()       # the timer thread re-plans
        deadline = lapic.timer_deadline
        return None if deadline is None else self.clock.host_delay(deadline)

    def wants_wake(self, index: int) -> bool:
        """Whether a halted vCPU should try :meth:`wake`: a vector is deliverable and it is
        not the same situation in which the CPU already refused (IF=0)."""
        lapic = self.lapics[index]
        return (lapic.deliverable() is not None and self._unconfirmed[index] is None
                and lapic.s.irr != self._wake_refused[index])

    def wake(self, index: int, vcpu: Vcpu) -> bool:
        """A halted vCPU (not parked): True if an interrupt was injected (it runs again)."""
        lapic = self.lapics[index]
        vector = lapic.deliverable()
        if vector is None or self._unconfirmed[index] is not None:
            return False
        if not vcpu.interrupts_enabled() or not self._inject(vcpu, vector):
            # IF=0: HLT stays halted until an NMI/INIT/reset (none here); retried only
            # when another vector arrives or the machine is stopped and started again.
            self._wake_refused[index] = lapic.s.irr
            return False
        self._wake_refused[index] = None
        self._taken(index, vector)
        if vcpu.deferred_injection:
            self._unconfirmed[index] = vector
        return True

    def _inject(self, vcpu: Vcpu, vector: int) -> bool:
        """``vcpu.inject_interrupt(vector)`` without the big lock (Unicorn's takes ~0.6 ms,
        which would hold up the timer thread and device threads). Safe: only this vCPU's
        thread acknowledges its APIC's vectors, and the APIC state cannot be replaced
        while this vCPU is not parked."""
        self._lock.release()
        try:
            return bool(vcpu.inject_interrupt(vector))
        finally:
            self._lock.acquire()

    def _taken(self, index: int, vector: int) -> None:
        """The backend took ``vector``: acknowledge it (IRR -> ISR), count it."""
        lapic = self.lapics[index]
        if not lapic.s.irr >> vector & 1:   # cannot happen (see _inject); never lose it
            log.error("lapic%d: vector %d vanished from the IRR while being injected", index, vector)
            lapic.s.irr |= 1 << vector
        lapic.acknowledge(vector)
        self.stats.injected[index] += 1
        fired = self._timer_fired_at[index]
        if fired is not None and vector == lapic.s.lvt[LVT_TIMER_INDEX] & 0xFF:
            self._timer_fired_at[index] = None
            self.stats.note_latency(time.monotonic_ns() - fired)

    # -- clock and timers ---------------------------------------------------------------------
    def _clock_started_or_stopped(self) -> None:
        self._wake_refused = [None] * len(self.lapics)   # CPU states may have been replaced

    def poll(self) -> float | None:
        self.sync_clock()
        now = self.clock.now()
        delays: list[float] = []
        for lapic in self.lapics:
            if lapic.poll_timer(now) and lapic.deliverable() is not None:
                self._timer_fired_at[lapic.index] = time.monotonic_ns()
            deadline = lapic.timer_deadline
            if deadline is not None:
                delay = self.clock.host_delay(deadline)
                if delay is not None:
                    delays.append(delay)
        for source in self.timer_sources:
            source.poll_timer(now)
            deadline = source.timer_deadline
            if deadline is not None:
                delay = self.clock.host_delay(deadline)
                if delay is not None:
                    delays.append(delay)
        self._retry_kicks(lambda index: self.lapics[index].deliverable() is not None, delays)
        return min(delays) if delays else None


@dataclass
class InterruptStats:
    """Counters for measurements: vectors injected per vCPU, KVM window requests, Unicorn
    retries, and the host-time latency from a timer expiry to its injection."""

    vcpus: int
    injected: list[int] = field(default_factory=list)
    window_requests: int = 0
    retries: int = 0
    latency_count: int = 0
    latency_total_ns: int = 0
    latency_max_ns: int = 0

    def __post_init__(self) -> None:
        self.injected = [0] * self.vcpus

    def note_latency(self, ns: int) -> None:
        self.latency_count += 1
        self.latency_total_ns += ns
        self.latency_max_ns = max(self.latency_max_ns, ns)

    @property
    def latency_mean_us(self) -> float:
        return self.latency_total_ns / self.latency_count / 1e3 if self.latency_count else 0.0


class ClockDevice:
    """The guest clock as a machine device: saving it first brings it in line with the
    run state, so a paused machine's saved time is the moment it stopped, whichever thread
    noticed the pause first."""

    def __init__(self, controller: ControllerCore) -> None:
        self.controller = controller

    def save(self) -> ClockState:
        with self.controller._lock:
            self.controller.sync_clock()
            return self.controller.clock.save()

    def restore(self, state: ClockState) -> None:
        with self.controller._lock:
            self.controller.clock.restore(state)
            self.controller.sync_clock()


class LapicWindow:
    """The 4 KiB local APIC page on the MMIO bus: each vCPU thread reaches its own APIC."""

    SIZE = LAPIC_SIZE

    def __init__(self, controller: InterruptController) -> None:
        self.controller = controller

    def read(self, offset: int, size: int) -> int:
        return self.controller.current_lapic().read(offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.controller.current_lapic().write(offset, size, value)


class GsiLine:
    """An IOAPIC input as an ``InterruptLine``; takes the big lock (devices may call it
    from their own threads)."""

    def __init__(self, controller: InterruptController, gsi: int) -> None:
        controller.ioapic.line(gsi)   # validates the pin number
        self.controller = controller
        self.gsi = gsi

    def set_level(self, level: bool) -> None:
        with self.controller._lock:
            self.controller.ioapic.set_level(self.gsi, level)


class MsiRouter:
    """``hv.devices.pci.MsiSink`` delivering to the local APICs; takes the big lock."""

    def __init__(self, controller: InterruptController) -> None:
        self.controller = controller
        self.sent = 0

    def send(self, address: int, data: int) -> None:
        with self.controller._lock:
            self.sent += 1
            self.controller.send_msi(address, data)
