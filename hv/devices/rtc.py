"""MC146818 CMOS real-time clock and 128 bytes of CMOS RAM (ports 0x70/0x71).

Port 0x70 (write): bits 6-0 select a CMOS byte, bit 7 disables NMI (stored: hv raises no
NMI); reads of 0x70 return 0xFF as QEMU's. Port 0x71 reads/writes the selected byte.

| index | register |
|---|---|
| 0, 2, 4 | seconds, minutes, hours (12-hour mode: bit 7 = PM) |
| 1, 3, 5 | alarm seconds, minutes, hours (stored; alarm interrupts are not generated) |
| 6, 7, 8, 9 | day of week (1 = Sunday), day of month, month, year of century |
| 0x0A | A: bit 7 UIP (read-only), bits 6-4 divider (010 runs, 11x holds the chain), bits 3-0 periodic rate |
| 0x0B | B: SET, PIE, AIE, UIE, SQWE, DM (1 = binary, 0 = BCD), 24/12 (1 = 24 h), DSE |
| 0x0C | C: IRQF, PF, AF, UF; read-only, cleared by reading (which lowers IRQ 8) |
| 0x0D | D: 0x80 (valid RAM and time), read-only |
| 0x32 | century (the ACPI FADT CENTURY index) |

Time: the guest's wall clock is kept as "``wall_ns`` (ns since the Unix epoch, UTC) at
guest-clock time ``guest_ns``" and advances with hv's guest clock, so it stands still
while the machine is paused and continues across migration from where the source had
it: a destination whose host clock is behind never makes guest time jump back. A new
machine takes host UTC at the first access (or save). The time registers are computed
from it in the format register B asks for. Setting B.SET (or holding the divider)
freezes them so the guest can write a new time; clearing SET (releasing the divider)
starts the clock from what was written (Linux's ``hwclock -w``); with SET clear a
write to a time register sets the time at once. The day-of-week register is derived
from the date. Bad dates never fail: fields are clamped and a day past the month's end
rolls over, like ``mktime``.

UIP is set during the last 244 us of every second (when the update is about to happen),
so Linux's ``mc146818_get_time`` retry loop always ends. Interrupts on IRQ 8: periodic
(rate from A bits 3-0, on the guest clock) and update-ended (each wall-clock second);
flags are computed lazily and, while an enabled flag is clear, the next one is a
deadline on hv's timer thread (:attr:`Rtc.timer_deadline` / :meth:`Rtc.poll_timer`).

A system reset keeps the battery-backed part (time and CMOS bytes) and clears B's
interrupt enables and C, as the chip's RESET pin does: restoring the default state
(:class:`RtcState` with ``wall_ns`` None) means "reset", not "forget the time".
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hv.devices.clock import MAX_NS
from hv.devices.interfaces import (
    DeviceStateError,
    InterruptLine,
    UnconnectedLine,
    checked_fields,
    checked_uint,
    checked_uint_list,
)
from hv.devices.persist import plain_dict

log = logging.getLogger(__name__)

CMOS_SIZE = 128
NS_PER_S = 1_000_000_000
RTC_HZ = 32_768
UIP_NS = 244_000
WALL_LIMIT = 1 << 70               # |wall_ns| bound for a saved state
REG_SECONDS, REG_MINUTES, REG_HOURS = 0x00, 0x02, 0x04
REG_WDAY, REG_MDAY, REG_MONTH, REG_YEAR = 0x06, 0x07, 0x08, 0x09
REG_A, REG_B, REG_C, REG_D = 0x0A, 0x0B, 0x0C, 0x0D
REG_CENTURY = 0x32
TIME_REGS = (REG_SECONDS, REG_MINUTES, REG_HOURS, REG_WDAY, REG_MDAY, REG_MONTH, REG_YEAR, REG_CENTURY)
A_UIP = 0x80
B_SET, B_PIE, B_AIE, B_UIE, B_SQWE, B_DM_BINARY, B_24H = 0x80, 0x40, 0x20, 0x10, 0x08, 0x04, 0x02
C_IRQF, C_PF, C_AF, C_UF = 0x80, 0x40, 0x20, 0x10
D_VRT = 0x80


def _default_cmos() -> list[int]:
    cmos = [0] * CMOS_SIZE
    cmos[REG_A], cmos[REG_B], cmos[REG_D] = 0x26, B_24H, D_VRT   # 32.768 kHz, 1024 Hz rate, BCD, 24 h
    return cmos


def days_from_civil(year: int, month: int, day: int) -> int:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    year -= month <= 2
    era = year // 400
    yoe = year - era * 400
    doy = (153 * (month + (-3 if month > 2 else 9)) + 2) // 5 + day - 1
    return era * 146097 + (yoe * 365 + yoe // 4 - yoe // 100 + doy) - 719468


def civil_from_days(days: int) -> tuple[int, int, int]:
    """(year, month, day) of ``days`` since 1970-01-01."""
    days += 719468
    era = days // 146097
    doe = days - era * 146097
    yoe = (doe - doe // 1460 + doe // 36524 - doe // 146096) // 365
    doy = doe - (365 * yoe + yoe // 4 - yoe // 100)
    mp = (5 * doy + 2) // 153
    day = doy - (153 * mp + 2) // 5 + 1
    month = mp + (3 if mp < 10 else -9)
    return yoe + era * 400 + (month <= 2), month, day


class Clock(Protocol):
    def now(self) -> int: ...


@dataclass
class RtcState:
    """CMOS bytes (A-D included; the time registers hold values only while the clock is
    stopped), the wall-clock anchor and the guest time up to which C's flags are known."""

    index: int = 0
    nmi_disabled: bool = False
    cmos: list[int] = field(default_factory=_default_cmos)
    wall_ns: int | None = None
    guest_ns: int = 0
    flags_ns: int = 0

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> RtcState:
        raw = checked_fields(raw, cls, "rtc")
        wall = raw["wall_ns"]
        if wall is not None and (isinstance(wall, bool) or not isinstance(wall, int) or abs(wall) >= WALL_LIMIT):
            raise DeviceStateError("rtc state: bad wall_ns")
        if not isinstance(raw["nmi_disabled"], bool):
            raise DeviceStateError("rtc state: bad nmi_disabled")
        return cls(checked_uint(raw["index"], CMOS_SIZE, "rtc state: bad index"), raw["nmi_disabled"],
                   checked_uint_list(raw["cmos"], 256, "rtc state: bad cmos", length=CMOS_SIZE), wall,
                   checked_uint(raw["guest_ns"], MAX_NS + 1, "rtc state: bad guest_ns"),
                   checked_uint(raw["flags_ns"], MAX_NS + 1, "rtc state: bad flags_ns"))


class Rtc:
    """The RTC as a 2-port register file. ``irq`` is IRQ 8; ``timer_changed`` tells the
    timer thread that :attr:`timer_deadline` moved; ``host_wall_ns`` is host UTC (a test
    injects its own). Not thread-safe: the machine's lock serialises."""

    SIZE = 2

    def __init__(self, clock: Clock, irq: InterruptLine | None = None,
                 timer_changed: Callable[[], None] | None = None,
                 host_wall_ns: Callable[[], int] = time.time_ns) -> None:
        self.clock = clock
        self.irq = irq if irq is not None else UnconnectedLine()
        self.timer_changed = timer_changed if timer_changed is not None else (lambda: None)
        self.host_wall_ns = host_wall_ns
        self.s = RtcState()

    # -- the wall clock -------------------------------------------------------------------
    def _now(self) -> int:
        """Guest now, with the anchor made valid for it: a new clock takes host UTC, and a
        guest clock that went back (a system reset restarts it at 0) keeps the wall time."""
        now = self.clock.now()
        s = self.s
        if s.wall_ns is None:
            s.wall_ns, s.guest_ns, s.flags_ns = self.host_wall_ns(), now, now
        elif now < s.guest_ns:
            s.guest_ns = now
        s.flags_ns = min(s.flags_ns, now)
        return now

    def wall_at(self, now: int) -> int:
        """The guest's wall clock (ns since the epoch, UTC) at guest time ``now``."""
        assert self.s.wall_ns is not None
        return self.s.wall_ns + (now - self.s.guest_ns)

    def wall_ns(self) -> int:
        """The guest's wall clock now (what the registers show while it runs)."""
        return self.wall_at(self._now())

    @property
    def running(self) -> bool:
        """Updating: SET clear and the divider chain not held in reset."""
        return not self.s.cmos[REG_B] & B_SET and self._divider_running

    @property
    def _divider_running(self) -> bool:
        return (self.s.cmos[REG_A] & 0x70) <= 0x20

    # -- register formats -------------------------------------------------------------------
    def _encode(self, value: int) -> int:
        if self.s.cmos[REG_B] & B_DM_BINARY:
            return value & 0xFF
        return ((value // 10 % 10) << 4 | value % 10) & 0xFF

    def _decode(self, value: int) -> int:
        if self.s.cmos[REG_B] & B_DM_BINARY:
            return value
        return (value >> 4) * 10 + (value & 0xF)

    def _time_registers(self, wall_ns: int) -> dict[int, int]:
        seconds = wall_ns // NS_PER_S
        days, day_seconds = divmod(seconds, 86400)
        year, month, mday = civil_from_days(days)
        hour = day_seconds // 3600
        if self.s.cmos[REG_B] & B_24H:
            hours = self._encode(hour)
        else:
            hours = self._encode(hour % 12 or 12) | (0x80 if hour >= 12 else 0)
        return {REG_SECONDS: self._encode(day_seconds % 60), REG_MINUTES: self._encode(day_seconds // 60 % 60),
                REG_HOURS: hours, REG_WDAY: self._encode((days + 4) % 7 + 1), REG_MDAY: self._encode(mday),
                REG_MONTH: self._encode(month), REG_YEAR: self._encode(year % 100),
                REG_CENTURY: self._encode(year // 100 % 100)}

    def _registers_seconds(self) -> int:
        """Seconds since the epoch that the (held) time registers describe, clamped."""
        c = self.s.cmos
        raw_hours = c[REG_HOURS]
        if self.s.cmos[REG_B] & B_24H:
            hour = self._decode(raw_hours)
        else:
            hour = self._decode(raw_hours & 0x7F) % 12 + (12 if raw_hours & 0x80 else 0)
        year = min(max(self._decode(c[REG_CENTURY]) * 100 + self._decode(c[REG_YEAR]), 1), 9999)
        month = min(max(self._decode(c[REG_MONTH]), 1), 12)
        mday = min(max(self._decode(c[REG_MDAY]), 1), 31)
        days = days_from_civil(year, month, 1) + mday - 1
        return (days * 86400 + min(hour, 23) * 3600 + min(self._decode(c[REG_MINUTES]), 59) * 60
                + min(self._decode(c[REG_SECONDS]), 59))

    def _hold(self, now: int) -> None:
        """Copy the running time into the time registers (the clock stops)."""
        for reg, value in self._time_registers(self.wall_at(now)).items():
            self.s.cmos[reg] = value

    def _commit(self, now: int, fraction_ns: int) -> None:
        """Start the clock from the time registers, ``fraction_ns`` into the second."""
        self.s.wall_ns = self._registers_seconds() * NS_PER_S + fraction_ns
        self.s.guest_ns = self.s.flags_ns = now
        self.timer_changed()

    # -- interrupt flags ----------------------------------------------------------------------
    def _period_ticks(self) -> int | None:
        rate = self.s.cmos[REG_A] & 0x0F
        if not rate or not self._divider_running:
            return None
        return 1 << ((rate + 7 if rate < 3 else rate) - 1)

    def _account(self, now: int) -> None:
        """Set PF / UF for what happened since ``flags_ns``; drive IRQ 8."""
        s = self.s
        before = s.flags_ns
        period = self._period_ticks()
        if period is not None and (now * RTC_HZ // NS_PER_S) // period > (before * RTC_HZ // NS_PER_S) // period:
            s.cmos[REG_C] |= C_PF
        if self.running and self.wall_at(now) // NS_PER_S > self.wall_at(before) // NS_PER_S:
            s.cmos[REG_C] |= C_UF
        s.flags_ns = now
        self._update_irq()

    def _update_irq(self) -> None:
        c = self.s.cmos[REG_C] & (C_PF | C_AF | C_UF)
        if c & self.s.cmos[REG_B] & (B_PIE | B_AIE | B_UIE):
            c |= C_IRQF
        self.s.cmos[REG_C] = c
        self.irq.set_level(bool(c & C_IRQF))

    @property
    def timer_deadline(self) -> int | None:
        """Guest ns when an enabled, still clear flag (PF, UF) is next set."""
        s = self.s
        if s.wall_ns is None:
            return None
        enabled = s.cmos[REG_B] & ~s.cmos[REG_C]
        deadlines = []
        period = self._period_ticks()
        if enabled & B_PIE and period is not None:
            tick = (s.flags_ns * RTC_HZ // NS_PER_S // period + 1) * period
            deadlines.append(-(-tick * NS_PER_S // RTC_HZ))
        if enabled & B_UIE and self.running:
            wall = self.wall_at(s.flags_ns)
            deadlines.append(s.flags_ns + (wall // NS_PER_S + 1) * NS_PER_S - wall)
        return min(deadlines) if deadlines else None

    def poll_timer(self, now: int) -> bool:
        """Account flags up to ``now``; True if IRQ 8 is asserted."""
        if self.s.wall_ns is None:
            return False
        self._account(self._now())
        return bool(self.s.cmos[REG_C] & C_IRQF)

    # -- registers ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        if offset != 1:
            return 0xFF
        return self._read_register(self.s.index)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 0:
            self.s.index, self.s.nmi_disabled = value & 0x7F, bool(value & 0x80)
        elif offset == 1:
            self._write_register(self.s.index, value)

    def _read_register(self, reg: int) -> int:
        now = self._now()
        s = self.s
        if reg in TIME_REGS and self.running:
            return self._time_registers(self.wall_at(now))[reg]
        if reg == REG_A:
            uip = self.running and self.wall_at(now) % NS_PER_S >= NS_PER_S - UIP_NS
            return s.cmos[REG_A] | (A_UIP if uip else 0)
        if reg == REG_C:
            self._account(now)
            value = s.cmos[REG_C]
            s.cmos[REG_C] = 0
            self._update_irq()
            self.timer_changed()
            return value
        return s.cmos[reg]

    def _write_register(self, reg: int, value: int) -> None:
        now = self._now()
        s = self.s
        if reg in TIME_REGS:
            if self.running:
                self._account(now)
                fraction = self.wall_at(now) % NS_PER_S
                self._hold(now)
                s.cmos[reg] = value
                self._commit(now, fraction)
            else:
                s.cmos[reg] = value
            return
        if reg in (REG_C, REG_D):
            return                                   # read-only
        if reg not in (REG_A, REG_B):
            s.cmos[reg] = value
            return
        self._account(now)
        was_running, divider_was_held = self.running, not self._divider_running
        if reg == REG_A:
            s.cmos[REG_A] = value & 0x7F
        else:
            s.cmos[REG_B] = value & ~B_UIE if value & B_SET else value
        if was_running and not self.running:
            self._hold(now)
        elif self.running and not was_running:
            # Released from the divider reset: the first update comes 500 ms later.
            self._commit(now, NS_PER_S // 2 if divider_was_held and reg == REG_A else 0)
        s.flags_ns = now
        self._update_irq()
        self.timer_changed()

    # -- persistence ------------------------------------------------------------------
    def save(self) -> RtcState:
        """The state with the anchor moved to guest-clock now: ``wall_ns`` is the guest's
        wall clock at guest time ``guest_ns``, the moment of saving."""
        now = self._now()
        s = self.s
        s.wall_ns, s.guest_ns = self.wall_at(now), now
        return dataclasses.replace(s, cmos=list(s.cmos))

    def restore(self, state: RtcState) -> None:
        """Load a saved state; the default state (``wall_ns`` None) is a reset, which keeps
        the time and CMOS bytes and clears the interrupt enables and flags."""
        if state.wall_ns is not None:
            self.s = dataclasses.replace(state, cmos=list(state.cmos))
        else:
            if self.s.wall_ns is not None:
                now = self._now()
                self.s.wall_ns, self.s.guest_ns = self.wall_at(now), now
            self.s.index, self.s.nmi_disabled = 0, False
            self.s.cmos[REG_B] &= ~(B_PIE | B_AIE | B_UIE | B_SQWE)
            self.s.cmos[REG_C] = 0
        self._update_irq()
        self.timer_changed()
