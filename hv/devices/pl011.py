"""ARM PrimeCell PL011 UART register file (the virt console at 0x09000000).

Transmission is instantaneous (TX FIFO never full, UART never busy); received bytes wait
in a bounded FIFO. Interrupt status (RIS/MIS) is computed exactly and driven onto an
injected line. Peripheral/PrimeCell ID registers read as a real PL011 r1p5 (Linux's
amba bus probes them).
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hv.devices.interfaces import InterruptLine, OutputSink, UnconnectedLine, checked_fields, checked_uint, checked_uint_list

RX_FIFO_SIZE = 32
DR, RSR, FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, ICR, DMACR = (
    0x00, 0x04, 0x18, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x3C, 0x40, 0x44, 0x48)
FR_RXFE = 1 << 4
FR_TXFE = 1 << 7
INT_RX = 1 << 4
INT_TX = 1 << 5
ID_REGISTERS = {0xFE0: 0x11, 0xFE4: 0x10, 0xFE8: 0x14, 0xFEC: 0x00,
                0xFF0: 0x0D, 0xFF4: 0xF0, 0xFF8: 0x05, 0xFFC: 0xB1}


@dataclass
class Pl011State:
    """Register values; defaults are the reset state."""

    ibrd: int = 0
    fbrd: int = 0
    lcr_h: int = 0
    cr: int = 0x300  # TXE | RXE
    ifls: int = 0x12
    imsc: int = 0
    ris: int = 0
    ilpr: int = 0
    dmacr: int = 0
    rx_fifo: list[int] = field(default_factory=list)

    VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> "Pl011State":
        raw = checked_fields(raw, cls, "pl011")
        fifo = checked_uint_list(raw["rx_fifo"], 0x100, "pl011 state: bad rx_fifo", max_length=RX_FIFO_SIZE)
        values = {name: checked_uint(value, 0x1_0000, f"pl011 state: bad {name}")
                  for name, value in raw.items() if name != "rx_fifo"}
        return cls(**values, rx_fifo=fifo)


class Pl011:
    """A PL011 as a 4 KiB register file."""

    SIZE = 0x1000

    def __init__(self, out: OutputSink, irq: InterruptLine | None = None) -> None:
        self.out = out
        self.irq = irq if irq is not None else UnconnectedLine()
        self.state = Pl011State()
        self._rx: deque[int] = deque(maxlen=RX_FIFO_SIZE)

    def read(self, offset: int, size: int) -> int:
        s = self.state
        if offset == DR:
            value = self._rx.popleft() if self._rx else 0
            if not self._rx:
                s.ris &= ~INT_RX
            self._update_irq()
            return value
        if offset == FR:
            return FR_TXFE | (FR_RXFE if not self._rx else 0)
        if offset in ID_REGISTERS:
            return ID_REGISTERS[offset]
        simple = {RSR: 0, ILPR: s.ilpr, IBRD: s.ibrd, FBRD: s.fbrd, LCR_H: s.lcr_h, CR: s.cr,
                  IFLS: s.ifls, IMSC: s.imsc, RIS: s.ris, MIS: s.ris & s.imsc, DMACR: s.dmacr}
        return simple.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        s = self.state
        if offset == DR:
            self.out.write(bytes([value & 0xFF]))
            s.ris |= INT_TX  # TX FIFO drained at once
        elif offset == ICR:
            s.ris &= ~value
        elif offset == IMSC:
            s.imsc = value & 0x7FF
        elif offset == IBRD:
            s.ibrd = value & 0xFFFF
        elif offset == FBRD:
            s.fbrd = value & 0x3F
        elif offset == LCR_H:
            s.lcr_h = value & 0xFF
        elif offset == CR:
            s.cr = value & 0xFFFF
        elif offset == IFLS:
            s.ifls = value & 0x3F
        elif offset == ILPR:
            s.ilpr = value & 0xFF
        elif offset == DMACR:
            s.dmacr = value & 0x7
        self._update_irq()

    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes for the guest to read; returns how many fit in the FIFO."""
        accepted = data[:RX_FIFO_SIZE - len(self._rx)]
        self._rx.extend(accepted)
        if accepted:
            self.state.ris |= INT_RX
            self._update_irq()
        return len(accepted)

    def _update_irq(self) -> None:
        self.irq.set_level(bool(self.state.ris & self.state.imsc))

    def save(self) -> Pl011State:
        return dataclasses.replace(self.state, rx_fifo=list(self._rx))

    def restore(self, state: Pl011State) -> None:
        self.state = dataclasses.replace(state, rx_fifo=[])
        self._rx = deque(state.rx_fifo, maxlen=RX_FIFO_SIZE)
        self._update_irq()
