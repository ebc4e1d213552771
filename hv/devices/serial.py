"""16550A UART register file (the q35 console at port 0x3F8).

Eight byte-wide registers; DLAB (LCR bit 7) switches offsets 0 and 1 to the divisor
latch. Transmission is instantaneous: a byte written to THR goes straight to the output
sink and THR/TSR are empty again, so LSR always shows THRE|TEMT.

Reception (what Linux's 8250 driver relies on, as a 16550A):

* FCR bit 0 = 0 (16450 mode): a one-byte receive buffer register (RBR).
* FCR bit 0 = 1: a 16-byte RX FIFO. IIR reports "received data available" (0x04) while
  the fill level is at or above the FCR trigger (1, 4, 8 or 14 bytes) and the character
  timeout (0x0C) while data sits below it: the host delivers bursts, so by the time the
  guest looks, the four-character idle time of a real line has passed. Changing FCR bit 0
  or writing FCR bit 1 flushes the RX FIFO.
* LSR.DR is set while the RBR/FIFO holds data; with IER bit 0 set, either indication
  drives the interrupt line (COM1: IRQ 4).

Bytes the host offers while the FIFO is full wait in a bounded host-side queue
(``rx_pending``, 4 KiB) and move into the FIFO as the guest reads, so typed-ahead input
is neither lost nor able to grow without bound. Loopback (MCR bit 4) puts transmitted
bytes straight into the FIFO (dropped when it is full, as an overrun).

Saved state: the registers, the FIFO (``rx_fifo``) and ``rx_pending``. ``rx_pending``
was added after the first release: a state without it (older hv) loads with an empty
queue, and it is left out of the saved dict when empty, so an older hv can still load
such a state. An older hv's FIFO held up to 64 bytes: whatever does not fit in this
FIFO's current capacity is kept, in order, at the head of ``rx_pending``.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hv.devices.interfaces import (
    DeviceStateError,
    InterruptLine,
    OutputSink,
    UnconnectedLine,
    checked_uint,
)
from hv.devices.persist import check_fields, checked_uart_rx, omit_default_later_fields, plain_dict

FIFO_DEPTH = 16                 # the 16550A's RX FIFO
LEGACY_RX_FIFO_SIZE = 64        # a state saved by an older hv may hold this many
RX_PENDING_MAX = 4096           # host bytes waiting for room in the FIFO

IER_RDA = 0x01
IER_THRE = 0x02
IIR_NONE = 0x01
IIR_THRE = 0x02
IIR_RDA = 0x04
IIR_TIMEOUT = 0x0C
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE = 0x01
FCR_CLEAR_RX = 0x02
FCR_TRIGGER = {0: 1, 1: 4, 2: 8, 3: 14}   # FCR bits 7:6 -> RX trigger level
LCR_DLAB = 0x80
LSR_DR = 0x01
LSR_THRE = 0x20
LSR_TEMT = 0x40
MCR_LOOP = 0x10
MSR_RESET_LOOPBACK_BITS = 0xF0
_BASE_FIELDS = ("dll", "dlm", "ier", "lcr", "mcr", "lsr", "msr", "scr", "fcr", "thr_interrupt_pending", "rx_fifo")
_LATER_FIELDS: dict[str, Any] = {"rx_pending": []}


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
    rx_pending: list[int] = field(default_factory=list)

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return omit_default_later_fields(plain_dict(self), _LATER_FIELDS)

    @classmethod
    def from_dict(cls, raw: Any) -> SerialState:
        raw = check_fields(raw, _BASE_FIELDS, _LATER_FIELDS, "serial state")
        fifo, pending = checked_uart_rx(raw, "serial state", LEGACY_RX_FIFO_SIZE, RX_PENDING_MAX)
        values = {name: checked_uint(raw[name], 0x100, f"serial state: bad {name}")
                  for name in _BASE_FIELDS if name not in ("rx_fifo", "thr_interrupt_pending")}
        if not isinstance(raw["thr_interrupt_pending"], bool):
            raise DeviceStateError("serial state: bad thr_interrupt_pending")
        return cls(**values, thr_interrupt_pending=raw["thr_interrupt_pending"], rx_fifo=fifo, rx_pending=pending)


class Serial16550:
    """A 16550A UART as a register file of 8 byte registers."""

    SIZE = 8

    def __init__(self, out: OutputSink, irq: InterruptLine | None = None) -> None:
        self.out = out
        self.irq = irq if irq is not None else UnconnectedLine()
        self.state = SerialState()
        self._rx: deque[int] = deque()
        self._pending: deque[int] = deque()

    # -- guest side -------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        s = self.state
        if offset == 0:
            if s.lcr & LCR_DLAB:
                return s.dll
            value = self._rx.popleft() if self._rx else 0
            self._refill()
            self._update_lsr_and_irq()
            return value
        if offset == 1:
            return s.dlm if s.lcr & LCR_DLAB else s.ier
        if offset == 2:
            iir = self._iir()
            if iir == IIR_THRE:  # reading IIR clears a pending THRE interrupt
                s.thr_interrupt_pending = False
                self._update_irq()
            return iir | (IIR_FIFO_ENABLED if s.fcr & FCR_ENABLE else 0)
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
                if len(self._rx) < self._capacity():
                    self._rx.append(value)      # else an overrun: the byte is lost
                self._update_lsr_and_irq()
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
            self._write_fcr(value)
        elif offset == 3:
            s.lcr = value
        elif offset == 4:
            s.mcr = value & 0x1F
        elif offset == 7:
            s.scr = value
        # LSR and MSR are read-only.

    def _write_fcr(self, value: int) -> None:
        """FIFO control: a change of the enable bit or the clear-RX bit flushes the RX
        FIFO; host bytes still waiting then refill it (they were never received)."""
        s = self.state
        flush = bool((s.fcr ^ value) & FCR_ENABLE or value & FCR_CLEAR_RX)
        s.fcr = value & 0xC9
        if flush:
            self._rx.clear()
        self._refill()
        self._update_lsr_and_irq()

    # -- host side ----------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Offer console input; returns how many bytes were taken (the rest did not fit
        in the FIFO and the bounded pending queue: offer them again later)."""
        room = RX_PENDING_MAX - len(self._pending) + max(0, self._capacity() - len(self._rx))
        accepted = data[:max(0, room)]
        if not accepted:
            return 0
        self._pending.extend(accepted)
        self._refill()
        self._update_lsr_and_irq()
        return len(accepted)

    def pending_input(self) -> int:
        """Bytes received from the host that the guest has not read yet."""
        return len(self._rx) + len(self._pending)

    # -- internals ----------------------------------------------------------------
    def _capacity(self) -> int:
        return FIFO_DEPTH if self.state.fcr & FCR_ENABLE else 1

    def _refill(self) -> None:
        while self._pending and len(self._rx) < self._capacity():
            self._rx.append(self._pending.popleft())

    def _iir(self) -> int:
        s = self.state
        if s.ier & IER_RDA and self._rx:
            if not s.fcr & FCR_ENABLE or len(self._rx) >= FCR_TRIGGER[s.fcr >> 6]:
                return IIR_RDA
            return IIR_TIMEOUT
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
        return dataclasses.replace(self.state, rx_fifo=list(self._rx), rx_pending=list(self._pending))

    def restore(self, state: SerialState) -> None:
        self.state = dataclasses.replace(state, rx_fifo=[], rx_pending=[])
        received = list(state.rx_fifo) + list(state.rx_pending)
        capacity = self._capacity()
        self._rx = deque(received[:capacity])
        self._pending = deque(received[capacity:])
        self._update_lsr_and_irq()
