"""I/O APIC (82093AA-style, as QEMU's q35 ``ioapic`` version 0x20) at 0xFEC00000.

MMIO: IOREGSEL at +0x00 (register index), IOWIN at +0x10 (the selected 32-bit register),
EOI at +0x40 (write a vector: clears Remote IRR of level-triggered entries with that
vector, as version 0x20 does). Indirect registers: 0x00 ID (bits 27:24), 0x01 version
(0x00170020: 24 entries), 0x02 arbitration, 0x10 + 2n / 0x11 + 2n the low / high half of
redirection entry n (n = 0..23).

Redirection entry: vector 7:0, delivery mode 10:8, destination mode 11 (logical), delivery
status 12 (read-only, always 0: a message is accepted at once), polarity 13 (stored;
like QEMU, lines are logical "asserted" levels), Remote IRR 14 (read-only), trigger mode 15
(level), mask 16, destination 63:56. Reset: every entry masked.

Inputs are the pins' logical levels (:meth:`IoApic.set_level`): an edge-triggered entry
sends a message on each rising edge while unmasked (an edge that arrives masked is lost,
as on hardware); a level-triggered entry sends one while the pin is asserted, unmasked and
Remote IRR is clear, sets Remote IRR, and sends again after the EOI if still asserted.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Protocol

from hv.devices.interfaces import checked_fields, checked_uint, checked_uint_list
from hv.devices.persist import plain_dict

log = logging.getLogger(__name__)

IOAPIC_SIZE = 0x1000         # the window it decodes; where it is mapped is the board's (hv.boards.q35.layout)
IOAPIC_PINS = 24
IOREGSEL = 0x00
IOWIN = 0x10
IOEOI = 0x40
VERSION_VALUE = 0x20 | ((IOAPIC_PINS - 1) << 16)

ENTRY_MASKED = 1 << 16
ENTRY_LEVEL = 1 << 15
ENTRY_REMOTE_IRR = 1 << 14
ENTRY_DEST_LOGICAL = 1 << 11
ENTRY_LOW_WRITABLE = 0x1AFFF       # vector, mode, dest mode, polarity, trigger, mask
ENTRY_HIGH_WRITABLE = 0xFF00_0000  # destination


class MessageTarget(Protocol):
    """Where the IOAPIC sends its interrupt messages (the local APICs)."""

    def deliver(self, dest: int, logical: bool, delivery_mode: int, vector: int, level: bool) -> bool:
        """Send one message; True if at least one local APIC accepted it."""


@dataclass
class IoApicState:
    """Registers and pin levels; defaults are the reset state (all entries masked)."""

    ioregsel: int = 0
    apic_id: int = 0
    redirection: list[int] = field(default_factory=lambda: [ENTRY_MASKED] * IOAPIC_PINS)
    levels: int = 0                    # bit n: pin n is asserted

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> IoApicState:
        raw = checked_fields(raw, cls, "ioapic")
        for name, limit in (("ioregsel", 256), ("apic_id", 16), ("levels", 1 << IOAPIC_PINS)):
            checked_uint(raw[name], limit, f"ioapic state: bad {name}")
        entries = checked_uint_list(raw["redirection"], 1 << 64, "ioapic state: bad redirection table",
                                    length=IOAPIC_PINS)
        return cls(raw["ioregsel"], raw["apic_id"], entries, raw["levels"])


class IoApic:
    """The IOAPIC register file and its 24 input pins. The machine's lock serialises."""

    SIZE = IOAPIC_SIZE

    def __init__(self, target: MessageTarget) -> None:
        self.target = target
        self.s = IoApicState()
        self.messages = 0

    # -- pins ------------------------------------------------------------------------
    def set_level(self, pin: int, level: bool) -> None:
        if not 0 <= pin < IOAPIC_PINS:
            raise ValueError(f"IOAPIC pin {pin} out of range 0..{IOAPIC_PINS - 1}")
        bit = 1 << pin
        was = bool(self.s.levels & bit)
        if level:
            self.s.levels |= bit
        else:
            self.s.levels &= ~bit
        entry = self.s.redirection[pin]
        if entry & ENTRY_LEVEL:
            if level:
                self._service(pin)
        elif level and not was and not entry & ENTRY_MASKED:
            self._send(pin)

    def line(self, pin: int) -> IoApicLine:
        """An :class:`hv.devices.interfaces.InterruptLine` driving ``pin``."""
        if not 0 <= pin < IOAPIC_PINS:
            raise ValueError(f"IOAPIC pin {pin} out of range 0..{IOAPIC_PINS - 1}")
        return IoApicLine(self, pin)

    def _service(self, pin: int) -> None:
        """Send a level-triggered pin's message if it is due."""
        entry = self.s.redirection[pin]
        if (entry & (ENTRY_MASKED | ENTRY_REMOTE_IRR)) or not self.s.levels >> pin & 1:
            return
        if self._send(pin):
            self.s.redirection[pin] |= ENTRY_REMOTE_IRR

    def _send(self, pin: int) -> bool:
        entry = self.s.redirection[pin]
        self.messages += 1
        return self.target.deliver((entry >> 56) & 0xFF, bool(entry & ENTRY_DEST_LOGICAL), (entry >> 8) & 7,
                                   entry & 0xFF, bool(entry & ENTRY_LEVEL))

    def eoi(self, vector: int) -> None:
        """End of interrupt for ``vector`` (local APIC broadcast or the EOI register)."""
        for pin, entry in enumerate(self.s.redirection):
            if entry & ENTRY_LEVEL and entry & ENTRY_REMOTE_IRR and entry & 0xFF == vector:
                self.s.redirection[pin] = entry & ~ENTRY_REMOTE_IRR
                self._service(pin)

    # -- registers -----------------------------------------------------------------------
    def _indirect_read(self, index: int) -> int:
        s = self.s
        if index == 0x00:
            return s.apic_id << 24
        if index == 0x01:
            return VERSION_VALUE
        if index == 0x02:
            return s.apic_id << 24
        if 0x10 <= index < 0x10 + 2 * IOAPIC_PINS:
            entry = s.redirection[(index - 0x10) >> 1]
            return entry >> 32 if index & 1 else entry & 0xFFFF_FFFF
        return 0xFFFF_FFFF

    def _indirect_write(self, index: int, value: int) -> None:
        s = self.s
        if index == 0x00:
            s.apic_id = (value >> 24) & 0xF
        elif 0x10 <= index < 0x10 + 2 * IOAPIC_PINS:
            pin = (index - 0x10) >> 1
            entry = s.redirection[pin]
            if index & 1:
                entry = (entry & 0xFFFF_FFFF) | ((value & ENTRY_HIGH_WRITABLE) << 32)
            else:
                entry = (entry & ~0xFFFF_FFFF) | (entry & ENTRY_REMOTE_IRR) | (value & ENTRY_LOW_WRITABLE)
                if not entry & ENTRY_LEVEL:
                    entry &= ~ENTRY_REMOTE_IRR
            s.redirection[pin] = entry
            if entry & ENTRY_LEVEL:
                self._service(pin)

    def read(self, offset: int, size: int) -> int:
        if offset == IOREGSEL:
            return self.s.ioregsel
        if IOWIN <= offset < IOWIN + 4:
            value = self._indirect_read(self.s.ioregsel) >> (8 * (offset - IOWIN))
            return value & ((1 << (8 * min(size, 4))) - 1)
        return 0

    def write(self, offset: int, size: int, value: int) -> None:
        if offset == IOREGSEL:
            self.s.ioregsel = value & 0xFF
        elif offset == IOWIN and size >= 4:
            self._indirect_write(self.s.ioregsel, value & 0xFFFF_FFFF)
        elif offset == IOEOI:
            self.eoi(value & 0xFF)
        else:
            log.debug("ioapic: ignored %d-byte write at +%#x", size, offset)

    # -- persistence -------------------------------------------------------------------
    def save(self) -> IoApicState:
        return dataclasses.replace(self.s, redirection=list(self.s.redirection))

    def restore(self, state: IoApicState) -> None:
        self.s = dataclasses.replace(state, redirection=list(state.redirection))


class IoApicLine:
    """One IOAPIC input pin as an :class:`hv.devices.interfaces.InterruptLine`."""

    def __init__(self, ioapic: IoApic, pin: int) -> None:
        self.ioapic = ioapic
        self.pin = pin

    def set_level(self, level: bool) -> None:
        self.ioapic.set_level(self.pin, level)
