"""Local APIC (xAPIC, MMIO at 0xFEE00000), one per x86 vCPU, with its timer.

The register file follows the Intel SDM vol. 3, chapter 11 (offsets in the 4 KiB page):

| Offset | Register | Notes |
|---|---|---|
| 0x020 | ID | bits 31:24, writable; reset = vCPU index |
| 0x030 | Version | 0x00060014: version 0x14, 7 LVT entries |
| 0x080 | TPR | bits 7:0 |
| 0x0A0 | PPR | read-only, computed from TPR and the highest in-service vector |
| 0x0B0 | EOI | write: the highest ISR bit is cleared (level: EOI broadcast to the IOAPIC) |
| 0x0D0/0x0E0 | LDR / DFR | logical destination (flat or cluster model) |
| 0x0F0 | SVR | bit 8 software enable, bit 12 suppress EOI broadcast; reset 0xFF |
| 0x100-0x170 | ISR | 8 x 32 bits, read-only |
| 0x180-0x1F0 | TMR | trigger mode of accepted vectors, read-only |
| 0x200-0x270 | IRR | read-only |
| 0x280 | ESR | write latches the pending errors, read returns them |
| 0x2F0, 0x320-0x370 | LVT CMCI, timer, thermal, perf, LINT0, LINT1, error | reset masked |
| 0x300/0x310 | ICR | fixed / lowest-priority IPIs (self, all, physical, logical) |
| 0x380 | timer initial count | a write (re)starts the timer; 0 stops it |
| 0x390 | timer current count | computed from the guest clock |
| 0x3E0 | timer divide configuration | bits 0, 1, 3 |

Registers are 32 bits wide at 16-byte-aligned offsets. Reads of 1, 2 or 4 bytes inside a
register's first 4 bytes return those bytes; writes other than aligned 4-byte ones are
ignored, as on hardware (where they are undefined).

Timer: the APIC bus runs at 1 GHz (as KVM's ``APIC_BUS_CYCLE_NS = 1``), so one count lasts
``divide`` guest nanoseconds and a period is ``initial * divide`` ns. One-shot and periodic
modes are implemented (TSC-deadline is not offered in CPUID: mode 2 leaves the timer
stopped). Expiries are absolute guest-clock deadlines (``start + k * period``), so a
periodic timer that could not be serviced for a while (host load, a pause) produces one
interrupt, not a burst, and its phase survives migration exactly. A masked timer keeps
counting and drops its expiries.

Acceptance and delivery (what :class:`hv.machine.interrupts.InterruptController` uses):
:meth:`Lapic.accept` sets a vector's IRR bit (and TMR for level-triggered ones);
:meth:`Lapic.deliverable` is the highest IRR vector whose priority class is above the
PPR's; :meth:`Lapic.acknowledge` moves it from IRR to ISR, as the CPU's interrupt
acknowledge cycle does, at the moment the vector is handed to the CPU.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from hv.devices.clock import MAX_NS, GuestClock
from hv.devices.interfaces import DeviceStateError, checked_fields, checked_uint, checked_uint_list
from hv.devices.persist import plain_dict

log = logging.getLogger(__name__)

LAPIC_SIZE = 0x1000          # one page of registers; where it is mapped is the board's (hv.boards.q35.layout)
APIC_BUS_NS = 1              # one APIC bus cycle, in guest ns (1 GHz)

REG_ID = 0x020
REG_VERSION = 0x030
REG_TPR = 0x080
REG_APR = 0x090
REG_PPR = 0x0A0
REG_EOI = 0x0B0
REG_RRD = 0x0C0
REG_LDR = 0x0D0
REG_DFR = 0x0E0
REG_SVR = 0x0F0
REG_ISR = 0x100
REG_TMR = 0x180
REG_IRR = 0x200
REG_ESR = 0x280
REG_LVT_CMCI = 0x2F0
REG_ICR_LO = 0x300
REG_ICR_HI = 0x310
REG_LVT_TIMER = 0x320
REG_LVT_THERMAL = 0x330
REG_LVT_PERF = 0x340
REG_LVT_LINT0 = 0x350
REG_LVT_LINT1 = 0x360
REG_LVT_ERROR = 0x370
REG_TIMER_INITIAL = 0x380
REG_TIMER_CURRENT = 0x390
REG_TIMER_DIVIDE = 0x3E0

VERSION_VALUE = 0x14 | (6 << 16)     # version 0x14, max LVT entry 6 (7 LVTs)
SVR_ENABLE = 1 << 8
SVR_SUPPRESS_EOI_BROADCAST = 1 << 12
SVR_WRITABLE = 0xFF | SVR_ENABLE | SVR_SUPPRESS_EOI_BROADCAST
LVT_MASKED = 1 << 16
LVT_DELIVERY_STATUS = 1 << 12
TIMER_ONE_SHOT = 0
TIMER_PERIODIC = 1
ESR_SEND_ILLEGAL_VECTOR = 1 << 5
ESR_RECEIVE_ILLEGAL_VECTOR = 1 << 6
ESR_ILLEGAL_REGISTER = 1 << 7

# LVT registers in the order they are saved, with the bits a guest may write.
LVT_OFFSETS = (REG_LVT_CMCI, REG_LVT_TIMER, REG_LVT_THERMAL, REG_LVT_PERF, REG_LVT_LINT0, REG_LVT_LINT1,
               REG_LVT_ERROR)
LVT_WRITABLE = {
    REG_LVT_CMCI: 0x107FF,
    REG_LVT_TIMER: 0x300FF,       # vector, mask, timer mode
    REG_LVT_THERMAL: 0x107FF,
    REG_LVT_PERF: 0x107FF,
    REG_LVT_LINT0: 0x1A7FF,       # vector, delivery mode, polarity, trigger, mask
    REG_LVT_LINT1: 0x1A7FF,
    REG_LVT_ERROR: 0x100FF,
}
LVT_TIMER_INDEX = LVT_OFFSETS.index(REG_LVT_TIMER)

ICR_DELIVERY_MODE_SHIFT = 8
ICR_DEST_LOGICAL = 1 << 11
ICR_LEVEL_ASSERT = 1 << 14
ICR_TRIGGER_LEVEL = 1 << 15
ICR_SHORTHAND_SHIFT = 18
ICR_LO_WRITABLE = 0xCCFFF            # vector, mode, dest mode, level, trigger, shorthand

ALL_VECTORS = (1 << 256) - 1


class LapicHost(Protocol):
    """What a local APIC needs from the interrupt controller that owns it."""

    def irq_changed(self, index: int) -> None:
        """The APIC's deliverable vector may have changed (wake or kick its vCPU)."""

    def timer_changed(self) -> None:
        """A timer deadline changed (the timer thread must re-plan)."""

    def eoi_broadcast(self, vector: int) -> None:
        """EOI of a level-triggered vector (the IOAPIC clears its remote IRR)."""

    def send_ipi(self, source: int, icr_lo: int, icr_hi: int) -> None:
        """The guest wrote ICR low: send the inter-processor interrupt it describes."""


def _check_int(raw: dict[str, Any], name: str, limit: int) -> int:
    return checked_uint(raw[name], limit, f"lapic state: bad {name}")


def _check_bits(raw: dict[str, Any], name: str) -> int:
    value = raw[name]
    if not isinstance(value, str) or len(value) != 64:
        raise DeviceStateError(f"lapic state: {name} must be 64 hex digits")
    try:
        return int(value, 16)
    except ValueError:
        raise DeviceStateError(f"lapic state: {name} is not hex") from None


@dataclass
class LapicState:
    """Register values of one local APIC; the defaults are the reset state.

    ``irr``/``isr``/``tmr`` are 256-bit vector sets. ``apic_id`` None means the reset
    value (the vCPU index). Timer times are guest-clock nanoseconds; ``timer_deadline``
    is the next expiry, None when the timer is stopped or a one-shot has fired.
    """

    apic_id: int | None = None
    tpr: int = 0
    svr: int = 0xFF
    ldr: int = 0
    dfr: int = 0xFFFF_FFFF
    icr_lo: int = 0
    icr_hi: int = 0
    esr: int = 0
    esr_pending: int = 0
    lvt: list[int] = field(default_factory=lambda: [LVT_MASKED] * len(LVT_OFFSETS))
    irr: int = 0
    isr: int = 0
    tmr: int = 0
    timer_initial: int = 0
    timer_divide: int = 0
    timer_start: int = 0
    timer_deadline: int | None = None

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        raw = plain_dict(self)
        for name in ("irr", "isr", "tmr"):
            raw[name] = f"{getattr(self, name):064x}"
        return raw

    @classmethod
    def from_dict(cls, raw: Any) -> LapicState:
        raw = checked_fields(raw, cls, "lapic")
        values: dict[str, Any] = {}
        if raw["apic_id"] is not None:
            values["apic_id"] = _check_int(raw, "apic_id", 256)
        for name in ("tpr", "esr", "esr_pending"):
            values[name] = _check_int(raw, name, 256)
        for name in ("svr", "ldr", "dfr", "icr_lo", "icr_hi", "timer_initial"):
            values[name] = _check_int(raw, name, 1 << 32)
        values["timer_divide"] = _check_int(raw, "timer_divide", 16)
        values["timer_start"] = _check_int(raw, "timer_start", MAX_NS + 1)
        if raw["timer_deadline"] is not None:
            values["timer_deadline"] = _check_int(raw, "timer_deadline", MAX_NS + 1)
        values["lvt"] = checked_uint_list(raw["lvt"], 1 << 32, "lapic state: bad lvt", length=len(LVT_OFFSETS))
        for name in ("irr", "isr", "tmr"):
            values[name] = _check_bits(raw, name)
        return cls(**values)


def _highest(bits: int) -> int:
    """Highest set bit number, or -1."""
    return bits.bit_length() - 1


class Lapic:
    """The local APIC of vCPU ``index``. Not thread-safe: the machine's lock serialises."""

    def __init__(self, index: int, clock: GuestClock, host: LapicHost) -> None:
        self.index = index
        self.clock = clock
        self.host = host
        self.s = LapicState()
        self._unsupported_reported: set[int] = set()

    # -- identity --------------------------------------------------------------------
    @property
    def apic_id(self) -> int:
        return self.index if self.s.apic_id is None else self.s.apic_id

    @property
    def software_enabled(self) -> bool:
        return bool(self.s.svr & SVR_ENABLE)

    def matches_logical(self, dest: int) -> bool:
        """Whether logical destination ``dest`` (8 bits) selects this APIC."""
        ldr = self.s.ldr >> 24
        if (self.s.dfr >> 28) == 0xF:            # flat model
            return bool(ldr & dest)
        return (ldr >> 4) == (dest >> 4) and bool(ldr & dest & 0xF)   # cluster model

    # -- priorities ------------------------------------------------------------------
    @property
    def ppr(self) -> int:
        isrv = max(_highest(self.s.isr), 0)
        if (self.s.tpr >> 4) >= (isrv >> 4):
            return self.s.tpr
        return isrv & 0xF0

    def deliverable(self) -> int | None:
        """The vector the CPU would take now (if its RFLAGS.IF allows), or None."""
        irrv = _highest(self.s.irr)
        if irrv < 0 or (irrv >> 4) <= (self.ppr >> 4):
            return None
        return irrv

    def acknowledge(self, vector: int) -> None:
        """The CPU took ``vector``: move it from IRR to ISR."""
        bit = 1 << vector
        if not self.s.irr & bit:
            raise ValueError(f"vector {vector} is not pending in the IRR of APIC {self.index}")
        self.s.irr &= ~bit
        self.s.isr |= bit

    def withdraw(self, vector: int) -> None:
        """Undo :meth:`acknowledge` for a vector the CPU never received."""
        bit = 1 << vector
        self.s.isr &= ~bit
        self.s.irr |= bit

    def accept(self, vector: int, level: bool = False) -> bool:
        """A fixed interrupt arrived (LVT, IOAPIC, MSI or IPI); False if dropped."""
        if vector < 16:
            self.s.esr_pending |= ESR_RECEIVE_ILLEGAL_VECTOR
            self._error_interrupt()
            return False
        if not self.software_enabled:
            return False
        bit = 1 << vector
        self.s.irr |= bit
        if level:
            self.s.tmr |= bit
        else:
            self.s.tmr &= ~bit
        self.host.irq_changed(self.index)
        return True

    def _error_interrupt(self) -> None:
        lvt = self.s.lvt[LVT_OFFSETS.index(REG_LVT_ERROR)]
        if not lvt & LVT_MASKED and (lvt & 0xFF) >= 16:
            self.accept(lvt & 0xFF)

    def _eoi(self) -> None:
        isrv = _highest(self.s.isr)
        if isrv < 0:
            return
        bit = 1 << isrv
        self.s.isr &= ~bit
        if self.s.tmr & bit and not self.s.svr & SVR_SUPPRESS_EOI_BROADCAST:
            self.host.eoi_broadcast(isrv)
        self.host.irq_changed(self.index)

    # -- timer -----------------------------------------------------------------------
    @property
    def timer_mode(self) -> int:
        return (self.s.lvt[LVT_TIMER_INDEX] >> 17) & 3

    @property
    def divide(self) -> int:
        code = ((self.s.timer_divide >> 1) & 4) | (self.s.timer_divide & 3)
        return 1 << ((code + 1) & 7)

    @property
    def timer_period(self) -> int:
        """Guest ns from the initial count down to zero."""
        return self.s.timer_initial * self.divide * APIC_BUS_NS

    @property
    def timer_deadline(self) -> int | None:
        return self.s.timer_deadline

    def _rearm(self, now: int) -> None:
        """Next expiry after ``now`` of a timer started at ``timer_start``."""
        period = self.timer_period
        mode = self.timer_mode
        if not period or mode not in (TIMER_ONE_SHOT, TIMER_PERIODIC):
            deadline = None
        else:
            elapsed = max(0, now - self.s.timer_start)
            if mode == TIMER_PERIODIC:
                deadline = self.s.timer_start + (elapsed // period + 1) * period
            else:
                deadline = self.s.timer_start + period if elapsed < period else None
        if deadline != self.s.timer_deadline:
            self.s.timer_deadline = deadline
            self.host.timer_changed()

    def poll_timer(self, now: int) -> bool:
        """Fire the timer if its deadline has passed; True if it expired. The caller (the
        timer thread) re-plans from :attr:`timer_deadline` itself: no ``timer_changed``."""
        deadline = self.s.timer_deadline
        if deadline is None or now < deadline:
            return False
        lvt = self.s.lvt[LVT_TIMER_INDEX]
        if self.timer_mode == TIMER_PERIODIC and self.timer_period:
            period = self.timer_period
            self.s.timer_deadline = deadline + ((now - deadline) // period + 1) * period
        else:
            self.s.timer_deadline = None
        if not lvt & LVT_MASKED:
            self.accept(lvt & 0xFF)
        return True

    def current_count(self, now: int) -> int:
        period = self.timer_period
        if not period or self.timer_mode not in (TIMER_ONE_SHOT, TIMER_PERIODIC):
            return 0
        elapsed = max(0, now - self.s.timer_start)
        remaining = period - elapsed % period if self.timer_mode == TIMER_PERIODIC else max(0, period - elapsed)
        return min(self.s.timer_initial, remaining // (self.divide * APIC_BUS_NS))

    # -- registers ---------------------------------------------------------------------
    def _register(self, reg: int) -> int:
        s = self.s
        if reg == REG_ID:
            return self.apic_id << 24
        if reg == REG_VERSION:
            return VERSION_VALUE
        if reg == REG_TPR:
            return s.tpr
        if reg == REG_PPR:
            return self.ppr
        if reg == REG_LDR:
            return s.ldr
        if reg == REG_DFR:
            return s.dfr
        if reg == REG_SVR:
            return s.svr
        if REG_ISR <= reg < REG_ISR + 0x80:
            return (s.isr >> (32 * ((reg - REG_ISR) >> 4))) & 0xFFFF_FFFF
        if REG_TMR <= reg < REG_TMR + 0x80:
            return (s.tmr >> (32 * ((reg - REG_TMR) >> 4))) & 0xFFFF_FFFF
        if REG_IRR <= reg < REG_IRR + 0x80:
            return (s.irr >> (32 * ((reg - REG_IRR) >> 4))) & 0xFFFF_FFFF
        if reg == REG_ESR:
            return s.esr
        if reg == REG_ICR_LO:
            return s.icr_lo
        if reg == REG_ICR_HI:
            return s.icr_hi
        if reg in LVT_WRITABLE:
            return s.lvt[LVT_OFFSETS.index(reg)]
        if reg == REG_TIMER_INITIAL:
            return s.timer_initial
        if reg == REG_TIMER_CURRENT:
            return self.current_count(self.clock.now())
        if reg == REG_TIMER_DIVIDE:
            return s.timer_divide
        return 0   # APR, RRD, EOI (write-only) and reserved registers read as 0

    def read(self, offset: int, size: int) -> int:
        if not 0 <= offset < LAPIC_SIZE or size not in (1, 2, 4, 8):
            return 0
        within = offset & 0xF
        if within >= 4:
            return 0
        value = self._register(offset & ~0xF) >> (8 * within)
        return value & ((1 << (8 * min(size, 4 - within))) - 1)

    def write(self, offset: int, size: int, value: int) -> None:
        if not 0 <= offset < LAPIC_SIZE or offset & 0xF or size not in (4, 8):
            log.debug("lapic%d: ignored %d-byte write at %#x", self.index, size, offset)
            return
        value &= 0xFFFF_FFFF
        s = self.s
        reg = offset
        if reg == REG_ID:
            s.apic_id = value >> 24
        elif reg == REG_TPR:
            s.tpr = value & 0xFF
            self.host.irq_changed(self.index)
        elif reg == REG_EOI:
            self._eoi()
        elif reg == REG_LDR:
            s.ldr = value & 0xFF00_0000
        elif reg == REG_DFR:
            s.dfr = value | 0x0FFF_FFFF
        elif reg == REG_SVR:
            s.svr = value & SVR_WRITABLE
            if not s.svr & SVR_ENABLE:
                s.lvt = [v | LVT_MASKED for v in s.lvt]
            self.host.irq_changed(self.index)
        elif reg == REG_ESR:
            s.esr = s.esr_pending
            s.esr_pending = 0
        elif reg == REG_ICR_HI:
            s.icr_hi = value & 0xFF00_0000
        elif reg == REG_ICR_LO:
            s.icr_lo = value & ICR_LO_WRITABLE
            self.host.send_ipi(self.index, s.icr_lo, s.icr_hi)
        elif reg in LVT_WRITABLE:
            value &= LVT_WRITABLE[reg]
            if not self.software_enabled:
                value |= LVT_MASKED
            s.lvt[LVT_OFFSETS.index(reg)] = value
            if reg == REG_LVT_TIMER:
                self._rearm(self.clock.now())
        elif reg == REG_TIMER_INITIAL:
            now = self.clock.now()
            s.timer_initial = value
            s.timer_start = now
            s.timer_deadline = None
            self._rearm(now)
            self.host.timer_changed()
        elif reg == REG_TIMER_DIVIDE:
            s.timer_divide = value & 0xB
            self._rearm(self.clock.now())
        elif reg in (REG_VERSION, REG_PPR, REG_APR, REG_RRD, REG_TIMER_CURRENT) or \
                REG_ISR <= reg < REG_IRR + 0x80:
            pass   # read-only
        else:
            s.esr_pending |= ESR_ILLEGAL_REGISTER
            if reg not in self._unsupported_reported and len(self._unsupported_reported) < 64:
                self._unsupported_reported.add(reg)
                log.debug("lapic%d: write to reserved register %#x", self.index, reg)

    def note_send_error(self) -> None:
        """An IPI with an illegal vector was sent from this APIC."""
        self.s.esr_pending |= ESR_SEND_ILLEGAL_VECTOR
        self._error_interrupt()

    # -- persistence -------------------------------------------------------------------
    def save(self) -> LapicState:
        return dataclasses.replace(self.s, lvt=list(self.s.lvt))

    def restore(self, state: LapicState) -> None:
        self.s = dataclasses.replace(state, lvt=list(state.lvt))
        self.host.timer_changed()
        self.host.irq_changed(self.index)
