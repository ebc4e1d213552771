"""IOAPIC register file, edge/level semantics, Remote IRR and EOI."""
from __future__ import annotations

import pytest

from hv.devices.interfaces import DeviceStateError
from hv.devices.ioapic import (ENTRY_LEVEL, ENTRY_MASKED, ENTRY_REMOTE_IRR, IOEOI, IOREGSEL, IOWIN, IoApic,
                               IoApicState)


class Target:
    def __init__(self, accept: bool = True) -> None:
        self.messages: list[tuple[int, bool, int, int, bool]] = []
        self.accept = accept

    def deliver(self, dest: int, logical: bool, delivery_mode: int, vector: int, level: bool) -> bool:
        self.messages.append((dest, logical, delivery_mode, vector, level))
        return self.accept


def program(io: IoApic, pin: int, low: int, high: int = 0) -> None:
    io.write(IOREGSEL, 4, 0x11 + 2 * pin)
    io.write(IOWIN, 4, high)
    io.write(IOREGSEL, 4, 0x10 + 2 * pin)
    io.write(IOWIN, 4, low)


def entry(io: IoApic, pin: int) -> int:
    io.write(IOREGSEL, 4, 0x10 + 2 * pin)
    low = io.read(IOWIN, 4)
    io.write(IOREGSEL, 4, 0x11 + 2 * pin)
    return io.read(IOWIN, 4) << 32 | low


def test_identification_registers_and_reset() -> None:
    io = IoApic(Target())
    io.write(IOREGSEL, 4, 1)
    assert io.read(IOWIN, 4) == 0x00170020
    io.write(IOREGSEL, 4, 0)
    io.write(IOWIN, 4, 0x0A00_0000)
    assert io.read(IOWIN, 4) == 0x0A00_0000
    assert io.read(IOREGSEL, 4) == 0
    assert all(entry(io, pin) == ENTRY_MASKED for pin in range(24))
    # Read-only bits (delivery status, Remote IRR) and reserved bits cannot be written.
    program(io, 3, 0xFFFF_FFFF, 0xFFFF_FFFF)
    assert entry(io, 3) == 0xFF00_0000_0001_AFFF


def test_edge_triggered_pin() -> None:
    target = Target()
    io = IoApic(target)
    io.set_level(4, True)                    # masked: the edge is lost
    io.set_level(4, False)
    program(io, 4, 0x34, 0x0100_0000)
    assert target.messages == []
    io.set_level(4, True)
    io.set_level(4, True)                    # no new edge
    assert target.messages == [(1, False, 0, 0x34, False)]
    io.set_level(4, False)
    io.set_level(4, True)
    assert len(target.messages) == 2


def test_level_triggered_pin_remote_irr_and_eoi() -> None:
    target = Target()
    io = IoApic(target)
    io.set_level(16, True)
    program(io, 16, 0x61 | ENTRY_LEVEL | 1 << 11, 0x0300_0000)   # unmasking an asserted line sends
    assert target.messages == [(3, True, 0, 0x61, True)]
    assert entry(io, 16) & ENTRY_REMOTE_IRR
    io.set_level(16, True)                   # Remote IRR set: nothing more
    assert len(target.messages) == 1
    io.eoi(0x61)                             # still asserted: sent again
    assert len(target.messages) == 2
    io.set_level(16, False)
    io.eoi(0x61)
    assert len(target.messages) == 2 and not entry(io, 16) & ENTRY_REMOTE_IRR
    io.set_level(16, True)
    io.write(IOEOI, 4, 0x99)                 # another vector: no effect
    assert len(target.messages) == 3
    io.write(IOEOI, 4, 0x61)                 # the EOI register (version 0x20)
    assert len(target.messages) == 4


def test_rejected_level_message_leaves_remote_irr_clear() -> None:
    target = Target(accept=False)
    io = IoApic(target)
    program(io, 9, 0x70 | ENTRY_LEVEL)
    io.set_level(9, True)
    assert len(target.messages) == 1 and not entry(io, 9) & ENTRY_REMOTE_IRR


def test_pin_range_and_state_round_trip() -> None:
    io = IoApic(Target())
    with pytest.raises(ValueError):
        io.set_level(24, True)
    with pytest.raises(ValueError):
        io.line(-1)
    program(io, 2, 0x45 | ENTRY_LEVEL, 0x0500_0000)
    io.line(2).set_level(True)
    saved = IoApicState.from_dict(io.save().to_dict())
    other = IoApic(Target())
    other.restore(saved)
    assert other.save() == io.save() and entry(other, 2) & ENTRY_REMOTE_IRR
    raw = io.save().to_dict()
    for field, value in (("redirection", [0] * 23), ("levels", 1 << 24), ("ioregsel", "x"), ("apic_id", 16)):
        with pytest.raises(DeviceStateError):
            IoApicState.from_dict(dict(raw, **{field: value}))
