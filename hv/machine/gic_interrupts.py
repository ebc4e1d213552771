"""Interrupt delivery for virt (aarch64): the GICv3, the generic timers and the guest clock.

The aarch64 sibling of :class:`hv.machine.interrupts.InterruptController`, with the same
methods the machine's vCPU loop calls (``before_run``, ``after_run``, ``wake``,
``wants_wake``, ``halt_timeout``, ``must_settle``, ``settle``, ``sync_clock``,
``start_timer_thread``, ``bind_thread``):

``before_run(index, vcpu)`` (big lock held)
    If the GIC signals IRQ to this vCPU, ``vcpu.inject_irq()`` enters the guest's IRQ
    vector (False while PSTATE.I is set: the vCPU's interrupt window is then armed, so
    the engine stops right after the guest unmasks, and a retry kick ``RETRY_NS`` later
    backs it up). Unlike x86 nothing is acknowledged at injection: the guest
    acknowledges by reading ICC_IAR1_EL1.
``wake(index, vcpu)``
    A vCPU halted in WFI leaves the halt when an interrupt is signalled, even with
    PSTATE.I set (as the architecture's WFI wake-up); the IRQ is injected if I is clear.
System registers
    :meth:`sysreg_read` / :meth:`sysreg_write` (the backend's sysreg handler, called on the
    vCPU thread inside ``run``) serve ICC_* from the GIC and CNT*_EL0 from the timers.
PCI interrupts
    :meth:`GicController.msi` is the MSI sink of virt's PCI functions: a message to the
    GICv2m frame's MSI_SETSPI_NS (0x08020040) with data = INTID 80..143 makes that SPI
    pending (an edge); any other message is dropped and counted.
    :meth:`GicController.spi_line` drives an SPI's input (PCI INTx: level, INTIDs 35-38).
Console
    :meth:`GicController.pl011_line` is the PL011's UARTINTR (level, SPI INTID 33).
Timers
    The ``irq-timer`` thread sleeps until the earliest timer deadline (guest clock),
    raises the PPI and kicks or wakes the vCPU; it also runs the guest clock exactly while
    the machine runs.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from hv.boards.virt import layout as virt_layout
from hv.devices.arch_timer import ArchTimers, ArchTimerState, TimerRegs
from hv.devices.clock import GuestClock
from hv.devices.gicv2m import GicV2m
from hv.devices.gicv3 import (
    NUM_IRQS,
    PRIVATE,
    GicDistributorWindow,
    GicRedistributorWindow,
    GicState,
    GicV3,
)
from hv.machine.interrupts import ControllerCore
from hv_backends.base import Exit, Vcpu

log = logging.getLogger(__name__)

RETRY_NS = 200_000       # host ns between injection attempts while PSTATE.I is set
RETRY_SLACK_NS = 5_000_000   # a retry may wait this much longer for the timer thread's next poll
PCI_INTX_INTID_BASE = 35  # PCI INTx -> SPIs 3..6 (INTIDs 35..38), as QEMU virt's PCIE IRQs
PCI_INTX_LINES = 4
PL011_INTID = 33          # the PL011's UARTINTR: SPI 1, as QEMU virt (the device tree says <0 1 4>)


def pci_intx_intid(slot: int, pin: int) -> int:
    """The INTID that INTx pin ``pin`` (1 = INTA .. 4 = INTD) of a function in ``slot``
    drives: the standard swizzle, SPI 3 + (slot + pin - 1) % 4."""
    if not 0 <= slot < 32 or not 1 <= pin <= 4:
        raise ValueError(f"no INTx pin {pin} in slot {slot}")
    return PCI_INTX_INTID_BASE + (slot + pin - 1) % PCI_INTX_LINES


class GicController(ControllerCore):
    """GICv3 + generic timers + guest clock + timer thread of one virt machine."""

    TIMER_THREAD_NAME = "gic-timer"

    def __init__(self, vcpus: int, lock: Any, changed: threading.Condition,
                 kick: Callable[[int], None], is_running: Callable[[], bool],
                 is_closing: Callable[[], bool], clock: GuestClock | None = None) -> None:
        super().__init__(vcpus, lock, changed, kick, is_running, is_closing, clock)
        self.gic = GicV3(vcpus, self._irq_changed)
        self.v2m = GicV2m(self.gic.pulse_spi, virt_layout.V2M_BASE)
        self.timers = ArchTimers(vcpus, self.clock, self.gic.set_level)
        self.injected = [0] * vcpus
        self.retries = 0
        self._poll_due_ns: int | None = None   # host ns of the timer thread's next poll (None: none planned)
        # vCPUs whose backend stops them at their own timer deadline (Vcpu.arm_timer_deadline):
        # the timer thread leaves their ticks to them while they run
        self._vcpus: list[Vcpu | None] = [None] * vcpus
        self._own_deadline = [False] * vcpus
        self._own_update: int | None = None   # the vCPU whose thread updates its own timers

    # -- wiring ------------------------------------------------------------------------
    def bind_thread(self, index: int) -> None:
        """Nothing to bind: system-register handlers carry their vCPU index."""

    def distributor_window(self) -> GicDistributorWindow:
        return GicDistributorWindow(self.gic)

    def redistributor_window(self) -> GicRedistributorWindow:
        return GicRedistributorWindow(self.gic)

    def v2m_window(self) -> GicV2m:
        """The GICv2m MSI frame for the MMIO bus (accesses arrive under the big lock)."""
        return self.v2m

    def msi(self) -> GicMsiSink:
        """An MSI sink for a PCI function (thread-safe)."""
        return GicMsiSink(self)

    def spi_line(self, intid: int) -> SpiLine:
        """An interrupt line driving SPI ``intid``'s input (thread-safe)."""
        return SpiLine(self, intid)

    def pl011_line(self) -> SpiLine:
        """The PL011's interrupt output: level-triggered SPI INTID 33."""
        return SpiLine(self, PL011_INTID)

    def gic_device(self) -> GicDevice:
        return GicDevice(self)

    def timer_device(self) -> TimerDevice:
        return TimerDevice(self)

    def sysreg_handler(self, index: int) -> SysregHandler:
        return SysregHandler(self, index)

    # -- GIC host ----------------------------------------------------------------------
    def _irq_changed(self, index: int) -> None:
        if self._in_run[index]:
            self._kick(index)
        elif index != self._own_update:
            self._notify()

    def _update_own_timers(self, index: int) -> None:
        """vCPU ``index``'s thread fires its own due timers (big lock held). The level
        change is looked at by that thread right after (``before_run`` injects or opens
        the window, the halt path asks ``wants_wake``), so it wakes nobody: a notify here
        woke the timer thread at every tick, and the vCPU then waited for the GIL it took
        (about 8% of a Linux boot's vCPU thread samples)."""
        self._own_update = index
        try:
            self.timers.update(index)
        finally:
            self._own_update = None

    def sync_clock(self) -> None:
        """Run the guest clock exactly while the machine runs, except that it stops only
        once no vCPU is inside ``run``: a backend's native counter (SysregHandler.
        counter_timeline) then never reads past the moment the clock stopped. The last
        vCPU out stops it (its thread syncs the clock before it parks)."""
        if not self._is_running() and self.clock.running and any(self._in_run):
            return
        super().sync_clock()

    # -- system registers (vCPU thread, inside run) -----------------------------------------
    def sysreg_read(self, index: int, name: str) -> int | None:
        with self._lock:
            if name.startswith("ICC_"):
                return self.gic.icc_read(index, name)
            self.sync_clock()    # a paused machine's counter (e.g. in a saved CPU state) stands still
            return self.timers.read(index, name)

    def sysreg_write(self, index: int, name: str, value: int) -> bool:
        with self._lock:
            if name.startswith("ICC_"):
                return self.gic.icc_write(index, name, value)
            done = self.timers.write(index, name, value)
            vcpu = self._vcpus[index]
            if done and self._own_deadline[index] and vcpu is not None:
                vcpu.arm_timer_deadline(self._host_deadline(index))   # the vCPU re-plans itself
            elif done:
                self._changed.notify_all()   # the timer thread re-plans
            return done

    def _host_deadline(self, index: int) -> int | None:
        """Host monotonic ns of vCPU ``index``'s next timer expiry, read off the guest
        clock's timeline (None: none armed, or the clock stands still)."""
        deadline = self.timers.deadline(index)
        guest_ns, host_ns = self.clock.timeline()
        if deadline is None or host_ns is None:
            return None
        return host_ns + max(0, deadline - guest_ns)

    # -- vCPU side ----------------------------------------------------------------------------
    def before_run(self, index: int, vcpu: Vcpu) -> None:
        """Assert the IRQ line into the CPU while the GIC signals (big lock held)."""
        self._update_own_timers(index)
        if self.gic.signalled(index) is None:
            self._retry_at[index] = None
            vcpu.cancel_interrupt_window()
        elif self._inject(vcpu):
            self.injected[index] += 1
            self._retry_at[index] = None
            vcpu.cancel_interrupt_window()
        else:
            # PSTATE.I set: the window stops the guest right after it unmasks (Unicorn:
            # msr daifclr / daif and eret end their block); an inexact window is backed
            # by a retry kick.
            vcpu.request_interrupt_window()
            if not vcpu.exact_interrupt_window:
                retry = self._retry_at[index] = time.monotonic_ns() + RETRY_NS
                self.retries += 1
                # The window nearly always ends this first (the guest unmasks at a block
                # boundary); wake the timer thread only if its next poll is far off.
                due = self._poll_due_ns
                if due is None or due > retry + RETRY_SLACK_NS:
                    self._notify()
        self._vcpus[index] = vcpu
        self._own_deadline[index] = vcpu.arm_timer_deadline(self._host_deadline(index))
        self._in_run[index] = True

    def after_run(self, index: int, vcpu: Vcpu, result: Exit) -> None:
        with self._lock:
            self._in_run[index] = False

    def must_settle(self, index: int) -> bool:
        """Never: aarch64 injection enters the vector at once (nothing stays queued)."""
        return False

    def settle(self, index: int, vcpu: Vcpu) -> None:
        self._in_run[index] = True

    def halt_timeout(self, index: int) -> float | None:
        self._update_own_timers(index)
        deadline = self.timers.deadline(index)
        return None if deadline is None else self.clock.host_delay(deadline)

    def wants_wake(self, index: int) -> bool:
        return self.gic.signalled(index) is not None

    def wake(self, index: int, vcpu: Vcpu) -> bool:
        """WFI ends when an interrupt is signalled, whether or not PSTATE.I masks it."""
        if self.gic.signalled(index) is None:
            return False
        if self._inject(vcpu):
            self.injected[index] += 1
        return True

    def _inject(self, vcpu: Vcpu) -> bool:
        self._lock.release()
        try:
            return bool(vcpu.inject_irq())
        finally:
            self._lock.acquire()

    # -- timers ------------------------------------------------------------------------------
    def poll(self) -> float | None:
        """Raise due timer PPIs and retry kicks; seconds until the next thing to do."""
        self.sync_clock()
        delays: list[float] = []
        for index in range(self.gic.vcpus):
            self.timers.update(index)
            deadline = self.timers.deadline(index)
            if self._in_run[index] and self._own_deadline[index]:
                continue        # the running vCPU stops itself at its deadline
            if deadline is not None:
                delay = self.clock.host_delay(deadline)
                if delay is not None:
                    delays.append(delay)
        self._retry_kicks(lambda index: self.gic.signalled(index) is not None, delays)
        delay = min(delays) if delays else None
        self._poll_due_ns = None if delay is None else time.monotonic_ns() + int(delay * 1e9)
        return delay


class GicMsiSink:
    """``hv.devices.pci.MsiSink`` for virt: a message written to the GICv2m frame's
    MSI_SETSPI_NS raises that SPI; anything else is a guest bug, dropped and counted
    (warned once per sink, then at debug level). Takes the big lock."""

    def __init__(self, controller: GicController) -> None:
        self.controller = controller
        self.sent = 0
        self.dropped = 0

    def send(self, address: int, data: int) -> None:
        with self.controller._lock:
            if address == self.controller.v2m.doorbell and self.controller.v2m.set_spi(data):
                self.sent += 1
                return
            self.dropped += 1
            level = logging.WARNING if self.dropped == 1 else logging.DEBUG
            log.log(level, "MSI (address %#x, data %#x) is not a GICv2m SETSPI_NS write of INTID %d-%d: dropped",
                    address, data, self.controller.v2m.spi_base,
                    self.controller.v2m.spi_base + self.controller.v2m.count - 1)


class SpiLine:
    """An SPI input as an ``InterruptLine`` (level; edge if the guest set ICFGR so);
    takes the big lock, since devices may call it from their own threads."""

    def __init__(self, controller: GicController, intid: int) -> None:
        if not PRIVATE <= intid < NUM_IRQS:
            raise ValueError(f"gicv3: INTID {intid} is not an SPI")
        self.controller = controller
        self.intid = intid

    def set_level(self, level: bool) -> None:
        with self.controller._lock:
            self.controller.gic.set_level(0, self.intid, bool(level))


class GicDevice:
    """The GIC as a machine device (save/restore under the big lock)."""

    def __init__(self, controller: GicController) -> None:
        self.controller = controller

    def save(self) -> GicState:
        with self.controller._lock:
            return self.controller.gic.save()

    def restore(self, state: GicState) -> None:
        """A default-constructed state (no vCPUs: what a machine reset loads) resets."""
        with self.controller._lock:
            gic = self.controller.gic
            if not state.cpus:
                state = GicV3(gic.vcpus).save()
            gic.restore(state)


class TimerDevice:
    """The generic timers as a machine device."""

    def __init__(self, controller: GicController) -> None:
        self.controller = controller

    def save(self) -> ArchTimerState:
        with self.controller._lock:
            return self.controller.timers.save()

    def restore(self, state: ArchTimerState) -> None:
        """A default-constructed state (no vCPUs: a machine reset) disables every timer."""
        with self.controller._lock:
            timers = self.controller.timers
            if not state.virt:
                state = ArchTimerState([TimerRegs() for _ in range(timers.vcpus)],
                                       [TimerRegs() for _ in range(timers.vcpus)])
            timers.restore(state)
            self.controller._changed.notify_all()


class SysregHandler:
    """What a backend calls for a routed system-register access of vCPU ``index``."""

    def __init__(self, controller: GicController, index: int) -> None:
        self.controller = controller
        self.index = index

    def read(self, name: str) -> int | None:
        return self.controller.sysreg_read(self.index, name)

    def counter_timeline(self) -> tuple[int, int | None]:
        """The guest clock's (guest ns, host ns) (GuestClock.timeline), for a backend that
        computes CNTVCT_EL0 = CNTPCT_EL0 = guest ns // 16 itself (CNTVOFF = 0): exactly
        the value :meth:`GicController.sysreg_read` gives, without a call per read. It
        cannot change while the vCPU runs (see :meth:`GicController.sync_clock`)."""
        return self.controller.clock.timeline()

    def write(self, name: str, value: int) -> bool:
        return self.controller.sysreg_write(self.index, name, value)
