"""Intel 8254 programmable interval timer (ports 0x40-0x43) and port 0x61.

Three 16-bit down counters clocked at 1.193182 MHz. The input clock is derived from hv's
guest clock (guest nanoseconds, see :mod:`hv.devices.clock`), never from host time, so
the counters stand still while the machine is paused and continue exactly across a
migration: every time in the state is an absolute guest-clock nanosecond.

Ports: 0x40-0x42 counters 0-2 (data), 0x43 control word (write only, reads 0 as QEMU's).
Control word ``SC1 SC0 RW1 RW0 M2 M1 M0 BCD``: SC = 3 is the read-back command
(bit 5 clear: latch counts, bit 4 clear: latch status, bits 3-1: counters 2-0);
RW = 0 is the counter latch command; RW 1/2/3 = low byte / high byte / low then high.
Modes 0-5 are implemented (6 and 7 are aliases of 2 and 3). BCD counting is not: the bit
is stored and shown in the status byte, the counter counts in binary, and the first use
logs a warning. The status byte is ``OUT NULL RW1 RW0 M2 M1 M0 BCD``.

Wiring (q35): counter 0's OUT drives ISA IRQ 0 (the board routes it to IOAPIC GSI 2);
each rising edge is one pulse on the line, scheduled on hv's timer thread through
:attr:`Pit.timer_deadline` / :meth:`Pit.poll_timer` like the local APIC timer (a host
stall yields one interrupt, not a burst). Counter 1 (DRAM refresh) drives nothing.
Counter 2's GATE is port 0x61 bit 0 and its OUT reads back as port 0x61 bit 5, with
bit 4 the refresh-request toggle (every 15.085 us of guest time) and bits 1-3 stored
(speaker data, parity/IOCHK check enables): what Linux's ``pit_calibrate_tsc`` and
``quick_pit_calibrate`` poll.

Gate: modes 0 and 4 suspend counting while GATE is low; modes 1 and 5 (re)start on a
rising edge; modes 2 and 3 stop with OUT high while it is low and reload on a rising
edge. Counters 0 and 1 have GATE tied high.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from hv.devices.clock import MAX_NS
from hv.devices.interfaces import DeviceStateError, InterruptLine, UnconnectedLine, checked_fields, checked_uint
from hv.devices.persist import plain_dict

log = logging.getLogger(__name__)

PIT_HZ = 1_193_182
NS_PER_S = 1_000_000_000
REFRESH_NS = 15_085              # port 0x61 bit 4 toggles at this period
ACCESS_LATCH, ACCESS_LOW, ACCESS_HIGH, ACCESS_WORD = 0, 1, 2, 3
PORT61_WRITABLE = 0x0F
PORT61_REFRESH = 0x10
PORT61_OUT2 = 0x20


class Clock(Protocol):
    """Guest nanoseconds (a :class:`hv.devices.clock.GuestClock`, or a test's clock)."""

    def now(self) -> int: ...


def _ticks(ns: int) -> int:
    return max(0, ns) * PIT_HZ // NS_PER_S


def _tick_ns(ticks: int) -> int:
    """Guest ns from the start of counting until ``ticks`` input clocks have passed."""
    return -(-ticks * NS_PER_S // PIT_HZ)


@dataclass
class PitChannelState:
    """One counter. ``loaded``: a count was written since the control word; ``running``:
    the counting element counts (modes 1/5 also need a gate trigger); ``paused_ns``: the
    guest time GATE went low while counting; ``next_edge``: input-clock index (since
    ``load_ns``) of the next rising OUT edge to signal (counter 0 only)."""

    mode: int = 0
    access: int = ACCESS_WORD
    bcd: bool = False
    reload: int = 0
    load_ns: int = 0
    loaded: bool = False
    running: bool = False
    paused_ns: int | None = None
    next_edge: int | None = None
    read_high: bool = False          # RW=3: the next live read returns the high byte
    write_high: bool = False         # RW=3: the next write is the high byte
    write_low: int = 0
    latch: list[int] = field(default_factory=list)   # latched count bytes still to read
    status_latch: int | None = None

    @classmethod
    def from_dict(cls, raw: Any, where: str) -> PitChannelState:
        raw = checked_fields(raw, cls, where)
        bools = ("bcd", "loaded", "running", "read_high", "write_high")
        if any(not isinstance(raw[name], bool) for name in bools):
            raise DeviceStateError(f"{where} state: bad flag")
        latch = raw["latch"]
        if (not isinstance(latch, list) or len(latch) > 2
                or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < 256 for b in latch)):
            raise DeviceStateError(f"{where} state: bad latch")
        optional = {name: None if raw[name] is None else checked_uint(raw[name], limit, f"{where} state: bad {name}")
                    for name, limit in (("paused_ns", MAX_NS + 1), ("next_edge", 1 << 64), ("status_latch", 256))}
        return cls(mode=checked_uint(raw["mode"], 6, f"{where} state: bad mode"),
                   access=checked_uint(raw["access"], 4, f"{where} state: bad access"),
                   reload=checked_uint(raw["reload"], 0x1_0000, f"{where} state: bad reload"),
                   load_ns=checked_uint(raw["load_ns"], MAX_NS + 1, f"{where} state: bad load_ns"),
                   write_low=checked_uint(raw["write_low"], 256, f"{where} state: bad write_low"),
                   latch=list(latch), **{name: raw[name] for name in bools}, paused_ns=optional["paused_ns"],
                   next_edge=optional["next_edge"], status_latch=optional["status_latch"])


@dataclass
class PitState:
    """The three counters and the writable bits of port 0x61 (bit 0 = counter 2's GATE)."""

    channels: list[PitChannelState] = field(default_factory=lambda: [PitChannelState() for _ in range(3)])
    port61: int = 0

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> PitState:
        raw = checked_fields(raw, cls, "pit")
        channels = raw["channels"]
        if not isinstance(channels, list) or len(channels) != 3:
            raise DeviceStateError("pit state: expected 3 channels")
        return cls([PitChannelState.from_dict(c, f"pit channel {i}") for i, c in enumerate(channels)],
                   checked_uint(raw["port61"], PORT61_WRITABLE + 1, "pit state: bad port61"))


class Pit:
    """The 8254 as a register file of 4 ports, plus :meth:`port61` for port 0x61.

    ``irq0`` is counter 0's output line; ``timer_changed`` tells the timer thread that
    :attr:`timer_deadline` moved. Not thread-safe: the machine's lock serialises.
    """

    SIZE = 4

    def __init__(self, clock: Clock, irq0: InterruptLine | None = None,
                 timer_changed: Callable[[], None] | None = None) -> None:
        self.clock = clock
        self.irq0 = irq0 if irq0 is not None else UnconnectedLine()
        self.timer_changed = timer_changed if timer_changed is not None else (lambda: None)
        self.s = PitState()
        self.pulses = 0
        self._bcd_reported = False

    # -- counting ----------------------------------------------------------------------
    def _gate(self, index: int) -> bool:
        return index != 2 or bool(self.s.port61 & 1)

    @staticmethod
    def _period(ch: PitChannelState) -> int:
        period = ch.reload or 0x1_0000
        return max(period, 2) if ch.mode in (2, 3) else period

    @staticmethod
    def _elapsed(ch: PitChannelState, now: int) -> int:
        end = ch.paused_ns if ch.paused_ns is not None else now
        return _ticks(end - ch.load_ns)

    def count(self, index: int, now: int) -> int:
        """Counter ``index``'s current value (what a latch would capture)."""
        ch = self.s.channels[index]
        if not ch.running:
            return ch.reload
        d, n = self._elapsed(ch, now), self._period(ch)
        if ch.mode == 2:
            return (n - d % n) & 0xFFFF
        if ch.mode == 3:
            return (n - (2 * d) % n) & 0xFFFF
        return (n - d) & 0xFFFF

    def out(self, index: int, now: int) -> bool:
        """Counter ``index``'s OUT pin."""
        ch = self.s.channels[index]
        if not ch.loaded:
            return ch.mode != 0
        if not ch.running or (ch.paused_ns is not None and ch.mode in (2, 3)):
            return True
        d, n = self._elapsed(ch, now), self._period(ch)
        if ch.mode in (0, 1):
            return d >= n
        if ch.mode == 2:
            return d % n != n - 1
        if ch.mode == 3:
            return d % n < (n + 1) // 2
        return d != n

    def _first_edge(self, ch: PitChannelState) -> int:
        n = self._period(ch)
        return n + 1 if ch.mode in (4, 5) else n

    def _start(self, index: int, now: int) -> None:
        """Begin counting from the reload value at ``now``."""
        ch = self.s.channels[index]
        ch.running, ch.load_ns, ch.paused_ns = True, now, None
        if index == 0:
            ch.next_edge = self._first_edge(ch)
            self.timer_changed()

    def _stop(self, index: int) -> None:
        ch = self.s.channels[index]
        ch.running, ch.paused_ns = False, None
        if index == 0 and ch.next_edge is not None:
            ch.next_edge = None
            self.timer_changed()

    def set_gate(self, index: int, level: bool, now: int) -> None:
        """GATE of counter ``index`` (only counter 2's is not tied high)."""
        ch = self.s.channels[index]
        if not ch.loaded:
            return
        if level:
            if ch.mode in (1, 5) or (ch.mode in (2, 3) and ch.paused_ns is not None):
                self._start(index, now)
            elif ch.paused_ns is not None:          # modes 0 and 4 resume where they stopped
                ch.load_ns += now - ch.paused_ns
                ch.paused_ns = None
        elif ch.running and ch.paused_ns is None and ch.mode in (0, 2, 3, 4):
            ch.paused_ns = now

    @property
    def timer_deadline(self) -> int | None:
        """Guest ns of counter 0's next rising OUT edge (None: none scheduled)."""
        ch = self.s.channels[0]
        if ch.next_edge is None or not ch.running:
            return None
        return ch.load_ns + _tick_ns(ch.next_edge)

    def poll_timer(self, now: int) -> bool:
        """Pulse IRQ 0 if counter 0's edge is due; True if it fired. Periodic modes
        re-arm for the first edge after ``now`` (missed periods are not replayed)."""
        deadline = self.timer_deadline
        if deadline is None or now < deadline:
            return False
        ch = self.s.channels[0]
        if ch.mode in (2, 3):
            n = self._period(ch)
            ch.next_edge = (_ticks(now - ch.load_ns) // n + 1) * n
        else:
            ch.next_edge = None
        self.pulses += 1
        self.irq0.set_level(True)
        self.irq0.set_level(False)
        return True

    # -- registers ----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        value = 0
        for i in range(size):
            value |= self._read_byte(offset + i) << (8 * i)
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)

    def _read_byte(self, offset: int) -> int:
        if not 0 <= offset < 3:
            return 0                                # the control port is write-only
        ch = self.s.channels[offset]
        if ch.status_latch is not None:
            value, ch.status_latch = ch.status_latch, None
            return value
        if ch.latch:
            return ch.latch.pop(0)
        count = self.count(offset, self.clock.now())
        if ch.access == ACCESS_WORD:
            high, ch.read_high = ch.read_high, not ch.read_high
            return count >> 8 if high else count & 0xFF
        return count >> 8 if ch.access == ACCESS_HIGH else count & 0xFF

    def _write_byte(self, offset: int, value: int) -> None:
        if offset == 3:
            self._control(value)
        elif 0 <= offset < 3:
            self._write_count(offset, value)

    def _control(self, value: int) -> None:
        now = self.clock.now()
        select = value >> 6
        if select == 3:                             # read-back
            for index in range(3):
                if value & (2 << index):
                    ch = self.s.channels[index]
                    if not value & 0x20:
                        self._latch(index, now)
                    if not value & 0x10 and ch.status_latch is None:
                        ch.status_latch = self.status(index, now)
            return
        access = (value >> 4) & 3
        if access == ACCESS_LATCH:
            self._latch(select, now)
            return
        ch = self.s.channels[select]
        mode = (value >> 1) & 7
        self._stop(select)
        ch.mode, ch.access, ch.bcd = mode - 4 if mode >= 6 else mode, access, bool(value & 1)
        ch.loaded, ch.read_high, ch.write_high = False, False, False
        ch.latch, ch.status_latch = [], None
        if ch.bcd and not self._bcd_reported:
            self._bcd_reported = True
            log.warning("pit: BCD counting is not supported; counter %d counts in binary", select)

    def _latch(self, index: int, now: int) -> None:
        ch = self.s.channels[index]
        if ch.latch:
            return                                  # the first latch holds until read
        count = self.count(index, now)
        ch.latch = {ACCESS_LOW: [count & 0xFF], ACCESS_HIGH: [count >> 8]}.get(
            ch.access, [count & 0xFF, count >> 8])

    def status(self, index: int, now: int) -> int:
        """The read-back status byte of counter ``index``."""
        ch = self.s.channels[index]
        return (self.out(index, now) << 7 | (not ch.loaded) << 6 | ch.access << 4 | ch.mode << 1
                | int(ch.bcd))

    def _write_count(self, index: int, value: int) -> None:
        ch = self.s.channels[index]
        if ch.access == ACCESS_WORD and not ch.write_high:
            ch.write_low, ch.write_high = value, True
            if ch.mode == 0:                        # mode 0: the first byte stops counting
                self._stop(index)
                ch.loaded = False
            return
        if ch.access == ACCESS_WORD:
            ch.reload, ch.write_high = ch.write_low | value << 8, False
        else:
            ch.reload = value << 8 if ch.access == ACCESS_HIGH else value
        now = self.clock.now()
        ch.loaded = True
        if ch.mode in (1, 5):
            self._stop(index)                       # waits for a GATE rising edge
            return
        self._start(index, now)
        if not self._gate(index):
            ch.paused_ns = now

    def port61(self) -> Port61:
        """Port 0x61 (NMI status and control) as a one-byte register file."""
        return Port61(self)

    # -- persistence ------------------------------------------------------------------
    def save(self) -> PitState:
        return PitState([dataclasses.replace(c, latch=list(c.latch)) for c in self.s.channels], self.s.port61)

    def restore(self, state: PitState) -> None:
        self.s = PitState([dataclasses.replace(c, latch=list(c.latch)) for c in state.channels], state.port61)
        self.timer_changed()


class Port61:
    """Port 0x61: bit 0 counter 2 GATE, bit 1 speaker data, bits 2-3 check enables
    (stored), bit 4 refresh toggle, bit 5 counter 2 OUT (read-only)."""

    SIZE = 1

    def __init__(self, pit: Pit) -> None:
        self.pit = pit

    def read(self, offset: int, size: int) -> int:
        now = self.pit.clock.now()
        refresh = PORT61_REFRESH if (now // REFRESH_NS) & 1 else 0
        out2 = PORT61_OUT2 if self.pit.out(2, now) else 0
        return self.pit.s.port61 | refresh | out2

    def write(self, offset: int, size: int, value: int) -> None:
        previous = self.pit.s.port61
        self.pit.s.port61 = value & PORT61_WRITABLE
        if (previous ^ value) & 1:
            self.pit.set_gate(2, bool(value & 1), self.pit.clock.now())
