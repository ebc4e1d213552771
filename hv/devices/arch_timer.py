"""The aarch64 generic timer of each vCPU: EL1 virtual timer (PPI 27) and EL1 physical
timer (PPI 30), counting the guest clock at 62.5 MHz (16 guest ns per tick, the
frequency Unicorn's CNTFRQ_EL0 reports).

The counter is ``guest_clock_ns // 16`` for both CNTVCT_EL0 and CNTPCT_EL0 (CNTVOFF = 0),
so it runs exactly while the machine runs and continues from its saved value after a
migration (the guest clock is saved). Per timer: CTL (ENABLE bit 0, IMASK bit 1, ISTATUS
bit 2 read-only), CVAL (64-bit compare value) and TVAL (signed 32-bit ``CVAL - counter``;
a write sets ``CVAL = counter + sign_extend(TVAL)``). The output is high while ENABLE,
not IMASK and ``counter >= CVAL`` — a level-sensitive PPI.

A timer's wake-up deadline is an absolute guest-clock time (``CVAL * 16`` ns), so expiries
are exact across pauses and migration.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hv.devices.clock import MAX_NS, GuestClock
from hv.devices.interfaces import DeviceStateError
from hv.devices.persist import plain_dict

NS_PER_TICK = 16
COUNTER_HZ = 62_500_000
PPI_VIRTUAL = 27
PPI_PHYSICAL = 30
CTL_ENABLE = 1
CTL_IMASK = 2
CTL_ISTATUS = 4
U64 = (1 << 64) - 1

# register name -> (timer, field)
TIMER_REGISTERS = {
    "CNTV_CTL_EL0": ("virt", "ctl"), "CNTV_CVAL_EL0": ("virt", "cval"), "CNTV_TVAL_EL0": ("virt", "tval"),
    "CNTP_CTL_EL0": ("phys", "ctl"), "CNTP_CVAL_EL0": ("phys", "cval"), "CNTP_TVAL_EL0": ("phys", "tval"),
}
COUNTER_REGISTERS = ("CNTVCT_EL0", "CNTPCT_EL0")


@dataclass
class TimerRegs:
    ctl: int = 0
    cval: int = 0


@dataclass
class ArchTimerState:
    """Every vCPU's virtual and physical timer registers (CTL without ISTATUS)."""

    virt: list[TimerRegs] = field(default_factory=list)
    phys: list[TimerRegs] = field(default_factory=list)

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> ArchTimerState:
        if not isinstance(raw, dict) or set(raw) != {"virt", "phys"}:
            raise DeviceStateError("arch timer state: wrong fields")
        out = cls()
        for name in ("virt", "phys"):
            items = raw[name]
            if not isinstance(items, list) or not 1 <= len(items) <= 512:
                raise DeviceStateError(f"arch timer state: {name} list malformed")
            regs = []
            for item in items:
                if not isinstance(item, dict) or set(item) != {"ctl", "cval"}:
                    raise DeviceStateError("arch timer state: timer fields wrong")
                ctl, cval = item["ctl"], item["cval"]
                for v, bits in ((ctl, 2), (cval, 64)):
                    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 1 << bits:
                        raise DeviceStateError("arch timer state: value out of range")
                regs.append(TimerRegs(ctl, cval))
            setattr(out, name, regs)
        if len(out.virt) != len(out.phys):
            raise DeviceStateError("arch timer state: virt and phys lists differ in length")
        return out


class ArchTimers:
    """The generic timers of all vCPUs. ``set_line(cpu, ppi, level)`` drives the GIC.
    Not thread-safe: the machine serialises calls with its big lock."""

    def __init__(self, vcpus: int, clock: GuestClock, set_line: Callable[[int, int, bool], None]) -> None:
        self.vcpus = vcpus
        self.clock = clock
        self._set_line = set_line
        self.s = ArchTimerState([TimerRegs() for _ in range(vcpus)], [TimerRegs() for _ in range(vcpus)])

    def counter(self) -> int:
        return (self.clock.now() // NS_PER_TICK) & U64

    def _timer(self, kind: str, cpu: int) -> TimerRegs:
        return self.s.virt[cpu] if kind == "virt" else self.s.phys[cpu]

    @staticmethod
    def _output(regs: TimerRegs, count: int) -> bool:
        return regs.ctl & (CTL_ENABLE | CTL_IMASK) == CTL_ENABLE and count >= regs.cval

    def read(self, cpu: int, name: str) -> int | None:
        """A counter or timer register of vCPU ``cpu`` (None: not one of them)."""
        if name in COUNTER_REGISTERS:
            return self.counter()
        if name == "CNTFRQ_EL0":
            return COUNTER_HZ
        spec = TIMER_REGISTERS.get(name)
        if spec is None:
            return None
        regs = self._timer(spec[0], cpu)
        count = self.counter()
        if spec[1] == "ctl":
            fired = regs.ctl & CTL_ENABLE and count >= regs.cval
            return regs.ctl | (CTL_ISTATUS if fired else 0)
        if spec[1] == "cval":
            return regs.cval
        return (regs.cval - count) & 0xFFFF_FFFF

    def write(self, cpu: int, name: str, value: int) -> bool:
        spec = TIMER_REGISTERS.get(name)
        if spec is None:
            return False
        regs = self._timer(spec[0], cpu)
        if spec[1] == "ctl":
            regs.ctl = value & (CTL_ENABLE | CTL_IMASK)
        elif spec[1] == "cval":
            regs.cval = value & U64
        else:
            tval = value & 0xFFFF_FFFF
            if tval >> 31:
                tval -= 1 << 32
            regs.cval = (self.counter() + tval) & U64
        self.update(cpu)
        return True

    def update(self, cpu: int) -> None:
        """Drive both PPIs of vCPU ``cpu`` from the current counter."""
        self._drive(cpu, self.counter())

    def _drive(self, cpu: int, count: int) -> None:
        self._set_line(cpu, PPI_VIRTUAL, self._output(self.s.virt[cpu], count))
        self._set_line(cpu, PPI_PHYSICAL, self._output(self.s.phys[cpu], count))

    def deadline(self, cpu: int) -> int | None:
        """Guest ns at which a timer of vCPU ``cpu`` next raises its output (None: none
        armed, or already raised).

        The PPIs are driven from the same counter value first: a timer that expires
        between a caller's ``update`` and this call is raised here rather than reported
        as "no deadline" with its line still low (the timer thread would then sleep
        without a timeout, and a vCPU that never exits would get no tick again)."""
        count = self.counter()
        self._drive(cpu, count)
        best: int | None = None
        for regs in (self.s.virt[cpu], self.s.phys[cpu]):
            if regs.ctl & (CTL_ENABLE | CTL_IMASK) == CTL_ENABLE and count < regs.cval:
                ns = min(regs.cval * NS_PER_TICK, MAX_NS)
                best = ns if best is None else min(best, ns)
        return best

    # -- persistence ------------------------------------------------------------------
    def save(self) -> ArchTimerState:
        return ArchTimerState.from_dict(self.s.to_dict())

    def restore(self, state: ArchTimerState) -> None:
        if len(state.virt) != self.vcpus:
            raise DeviceStateError(f"arch timer state has {len(state.virt)} vCPUs, machine has {self.vcpus}")
        self.s = ArchTimerState.from_dict(state.to_dict())
        for cpu in range(self.vcpus):
            self.update(cpu)
