"""16550A UART register file (the q35 console at port 0x3F8).

Eight byte-wide registers; DLAB (LCR bit 7) switches offsets 0 and 1 to the divisor
latch. Transmission is instantaneous: a byte written to THR goes straight to the output
sink and THR/TSR are empty again, so LSR always shows THRE|TEMT. Received bytes wait in a
bounded FIFO. The interrupt state (IIR) is computed exactly and driven onto an injected
line.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hv.devices.interfaces import DeviceStateError, InterruptLine, OutputSink, UnconnectedLine, checked_fields, checked_uint, checked_uint_list

RX_FIFO_SIZE = 64

IER_RDA = 0x01
IER_THRE = 0x02
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_FIFO_ENABLED = 0xC0
LCR_DLAB = 0x80
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MCR_LOOP = 0x10
MSR_RESET_LOOPBACK_BITS = 0xF0


@dataclass
class SerialState:
    """Register values; defaults are the reset state."""

    dll: int = 0x0C  # 9600 baud
    dlm: int = 0
    ier: int = 0
    lcr: int = 0x03
    mcr: int = 0x08
    lsr: int = LSR_THRE | LSR_TEMT
    msr: int = 0xB0  # DCD | DSR | CTS
    scr: int = 0
    fcr: int = 0
    thr_interrupt_pending: bool = True
    rx_fifo: list[int] = field(default_factory=list)

    VERSION = 1

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> "SerialState":
        raw = checked_fields(raw, cls, "serial")
        fifo = checked_uint_list(raw["rx_fifo"], 0x100, "serial state: bad rx_fifo", max_length=RX_FIFO_SIZE)
        values = {name: checked_uint(value, 0x100, f"serial state: bad {name}")
                  for name, value in raw.items() if name not in ("rx_fifo", "thr_interrupt_pending")}
        if not isinstance(raw["thr_interrupt_pending"], bool):
            raise DeviceStateError("serial state: bad thr_interrupt_pending")
        return cls(**values, thr_interrupt_pending=raw["thr_interrupt_pending"], rx_fifo=fifo)


class Serial16550:
    """A 16550A UART as a register file of 8 byte registers."""

    SIZE = 8

    def __init__(self, out: OutputSink, irq: InterruptLine | None = None) -> None:
        self.out = out
        self.irq = irq if irq is not None else UnconnectedLine()
        self.state = SerialState()
        self._rx: deque[int] = deque(maxlen=RX_FIFO_SIZE)

    # -- guest side -------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        s = self.state
        if offset == 0:
            if s.lcr & LCR_DLAB:
                return s.dll
            value = self._rx.popleft() if self._rx else 0
            self._update_lsr_and_irq()
            return value
        if offset == 1:
            return s.dlm if s.lcr & LCR_DLAB else s.ier
        if offset == 2:
            iir = self._iir()
            if iir == IIR_THRE:  # reading IIR clears a pending THRE interrupt
                s.thr_interrupt_pending = False
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if s.fcr & 1 else 0)
        if offset == 3:
            return s.lcr
        if offset == 4:
            return s.mcr
        if offset == 5:
            return s.lsr
        if offset == 6:
            if s.mcr & MCR_LOOP:
                # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                m = s.mcr
                return ((m & 0x02) << 3) | ((m & 0x01) << 5) | ((m & 0x04) << 4) | ((m & 0x08) << 4)
            return s.msr
        if offset == 7:
            return s.scr
        return 0xFF

    def write(self, offset: int, size: int, value: int) -> None:
        s = self.state
        value &= 0xFF
        if offset == 0:
            if s.lcr & LCR_DLAB:
                s.dll = value
                return
            if s.mcr & MCR_LOOP:
                self._receive(bytes([value]))
            else:
                self.out.write(bytes([value]))
            s.thr_interrupt_pending = True
            self._update_irq()
        elif offset == 1:
            if s.lcr & LCR_DLAB:
                s.dlm = value
            else:
                previous = s.ier
                s.ier = value & 0x0F
                if s.ier & IER_THRE and not previous & IER_THRE:
                    s.thr_interrupt_pending = True
                self._update_irq()
        elif offset == 2:
            s.fcr = value & 0xC9
            if value & 0x02:
                self._rx.clear()
                self._update_lsr_and_irq()
        elif offset == 3:
            s.lcr = value
        elif offset == 4:
            s.mcr = value & 0x1F
        elif offset == 7:
            s.scr = value
        # LSR and MSR are read-only.

    # -- host side ----------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Queue bytes for the guest to read; returns how many fit in the FIFO."""
        return self._receive(data)

    def _receive(self, data: bytes) -> int:
        room = RX_FIFO_SIZE - len(self._rx)
        accepted = data[:room]
        self._rx.extend(accepted)
        self._update_lsr_and_irq()
        return len(accepted)

    def _iir(self) -> int:
        s = self.state
        if s.ier & IER_RDA and self._rx:
            return IIR_RDA
        if s.ier & IER_THRE and s.thr_interrupt_pending:
            return IIR_THRE
        return IIR_NONE

    def _update_lsr_and_irq(self) -> None:
        if self._rx:
            self.state.lsr |= LSR_DR
        else:
            self.state.lsr &= ~LSR_DR & 0xFF
        self._update_irq()

    def _update_irq(self) -> None:
        self.irq.set_level(self._iir() != IIR_NONE)

    # -- persistence ----------------------------------------------------------------
    def save(self) -> SerialState:
        saved = dataclasses.replace(self.state, rx_fifo=list(self._rx))
        return saved

    def restore(self, state: SerialState) -> None:
        self.state = dataclasses.replace(state, rx_fifo=[])
        self._rx = deque(state.rx_fifo, maxlen=RX_FIFO_SIZE)
        self._update_lsr_and_irq()
