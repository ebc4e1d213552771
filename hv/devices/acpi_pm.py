"""ACPI PM1a event and control registers (q35's power-off port, at 0x600 like QEMU).

Offsets: 0 PM1_STS (16-bit, write-1-to-clear), 2 PM1_EN (16-bit), 4 PM1_CNT (16-bit).
Writing PM1_CNT with SLP_EN (bit 13) set asks the machine to enter the sleep state in
SLP_TYP (bits 10-12); hv treats every sleep request as power-off (S5), as QEMU's q35 does
for the value ``0x2000`` that guests (and the fixtures) write to port 0x604.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hv.devices.interfaces import checked_fields, checked_uint
from hv.devices.persist import plain_dict

SLP_EN = 1 << 13
SCI_EN = 1 << 0


@dataclass
class AcpiPmState:
    pm1_sts: int = 0
    pm1_en: int = 0
    pm1_cnt: int = SCI_EN  # ACPI mode, as firmware leaves it

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> AcpiPmState:
        raw = checked_fields(raw, cls, "acpi-pm")
        return cls(**{name: checked_uint(value, 0x1_0000, f"acpi-pm state: bad {name}")
                      for name, value in raw.items()})


class AcpiPm:
    """PM1a event/control block; ``on_sleep(slp_typ)`` is called on SLP_EN."""

    SIZE = 8

    def __init__(self, on_sleep: Callable[[int], None]) -> None:
        self.on_sleep = on_sleep
        self.state = AcpiPmState()

    def read(self, offset: int, size: int) -> int:
        raw = (self.state.pm1_sts | (self.state.pm1_en << 16)
               | (self.state.pm1_cnt << 32)).to_bytes(8, "little")
        return int.from_bytes(raw[offset:offset + size], "little")

    def write(self, offset: int, size: int, value: int) -> None:
        for i in range(size):
            self._write_byte(offset + i, (value >> (8 * i)) & 0xFF)
        if offset <= 5 and offset + size > 5 and self.state.pm1_cnt & SLP_EN:
            self.state.pm1_cnt &= ~SLP_EN
            self.on_sleep((self.state.pm1_cnt >> 10) & 7)

    def _write_byte(self, offset: int, byte: int) -> None:
        s = self.state
        shift = 8 * (offset & 1)
        if offset in (0, 1):
            s.pm1_sts &= ~(byte << shift) & 0xFFFF
        elif offset in (2, 3):
            s.pm1_en = (s.pm1_en & ~(0xFF << shift) | (byte << shift)) & 0xFFFF
        elif offset in (4, 5):
            s.pm1_cnt = (s.pm1_cnt & ~(0xFF << shift) | (byte << shift)) & 0xFFFF

    def save(self) -> AcpiPmState:
        return dataclasses.replace(self.state)

    def restore(self, state: AcpiPmState) -> None:
        self.state = dataclasses.replace(state)
