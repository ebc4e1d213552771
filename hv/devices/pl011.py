"""ARM PrimeCell PL011 UART register file (the virt console at 0x09000000, SPI INTID 33).

Transmission is instantaneous: a byte written to DR goes to the output sink at once, so
the TX FIFO is always empty (FR.TXFE, never TXFF) and the transmit interrupt (TXRIS) is
raised by every DR write, as the FIFO drains through its trigger level; only ICR clears
it (the guest masks it in IMSC when it has nothing more to send, as Linux does).

Reception follows the PL011 TRM (DDI 0183) with a host that delivers bursts:

* LCR_H.FEN = 0 (character mode): a one-byte holding register; RXRIS is set when a
  byte arrives and cleared when it is read.
* LCR_H.FEN = 1: a 16-entry RX FIFO; RXRIS is set while the fill level is at or above
  the IFLS RXIFLSEL trigger (2, 4, 8, 12 or 14 entries) and clears when reading takes
  it below. Changing FEN flushes the RX FIFO (as QEMU's PL011).
* The receive timeout (RTRIS) fires when the FIFO holds data and no more arrives for 32
  bit periods; a host burst has ended by the time the guest can look, so RTRIS is set
  with every burst that leaves data in the FIFO and cleared when the FIFO empties or by
  ICR. Linux's driver enables RXIM | RTIM and reads until FR.RXFE.

Bytes the host offers while the FIFO is full wait in a bounded host-side queue
(``rx_pending``, 4 KiB) and move into the FIFO as the guest reads, so typed-ahead input
is neither lost nor able to grow without bound. UARTMIS = RIS & IMSC drives the
interrupt line (level). Peripheral/PrimeCell ID registers read as a real PL011 r1p5
(Linux's amba bus probes them).

Saved state: the registers, the FIFO and ``rx_pending``. ``rx_pending`` was added after
the first release: a state without it (older hv) loads with an empty queue, and it is
left out of the saved dict when empty, so an older hv can still load such a state.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from hv.devices.interfaces import (
    InterruptLine,
    OutputSink,
    UnconnectedLine,
    checked_uint,
)
from hv.devices.persist import check_fields, checked_uart_rx, omit_default_later_fields, plain_dict

FIFO_DEPTH = 16                 # the PL011's RX FIFO
LEGACY_RX_FIFO_SIZE = 32        # a state saved by an older hv may hold this many
RX_PENDING_MAX = 4096           # host bytes waiting for room in the FIFO
DR, RSR, FR, ILPR, IBRD, FBRD, LCR_H, CR, IFLS, IMSC, RIS, MIS, ICR, DMACR = (
    0x00, 0x04, 0x18, 0x20, 0x24, 0x28, 0x2C, 0x30, 0x34, 0x38, 0x3C, 0x40, 0x44, 0x48)
FR_RXFE = 1 << 4
FR_TXFF = 1 << 5
FR_RXFF = 1 << 6
FR_TXFE = 1 << 7
LCR_H_FEN = 1 << 4
INT_RX = 1 << 4                 # RXRIS / RXIM
INT_TX = 1 << 5                 # TXRIS / TXIM
INT_RT = 1 << 6                 # RTRIS / RTIM (receive timeout)
INT_ALL = 0x7FF
RX_TRIGGER = {0: 2, 1: 4, 2: 8, 3: 12, 4: 14}   # IFLS RXIFLSEL -> FIFO entries (1/8 .. 7/8 of 16)
ID_REGISTERS = {0xFE0: 0x11, 0xFE4: 0x10, 0xFE8: 0x14, 0xFEC: 0x00,
                0xFF0: 0x0D, 0xFF4: 0xF0, 0xFF8: 0x05, 0xFFC: 0xB1}
# Fields every saved state has; later additions with their defaults (older states lack them).
_BASE_FIELDS = ("ibrd", "fbrd", "lcr_h", "cr", "ifls", "imsc", "ris", "ilpr", "dmacr", "rx_fifo")
_LATER_FIELDS: dict[str, Any] = {"rx_pending": []}


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
    rx_pending: list[int] = field(default_factory=list)

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return omit_default_later_fields(plain_dict(self), _LATER_FIELDS)

    @classmethod
    def from_dict(cls, raw: Any) -> Pl011State:
        raw = check_fields(raw, _BASE_FIELDS, _LATER_FIELDS, "pl011 state")
        fifo, pending = checked_uart_rx(raw, "pl011 state", LEGACY_RX_FIFO_SIZE, RX_PENDING_MAX)
        values = {name: checked_uint(raw[name], 0x1_0000, f"pl011 state: bad {name}")
                  for name in _BASE_FIELDS if name != "rx_fifo"}
        return cls(**values, rx_fifo=fifo, rx_pending=pending)


class Pl011:
    """A PL011 as a 4 KiB register file; ``irq`` is its interrupt output (UARTINTR)."""

    SIZE = 0x1000

    def __init__(self, out: OutputSink, irq: InterruptLine | None = None) -> None:
        self.out = out
        self.irq = irq if irq is not None else UnconnectedLine()
        self.state = Pl011State()
        self._rx: deque[int] = deque()
        self._pending: deque[int] = deque()

    # -- guest side ---------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        s = self.state
        if offset == DR:
            value = self._rx.popleft() if self._rx else 0
            self._rx_levels(arrived=self._refill() > 0)
            self._update_irq()
            return value
        if offset == FR:
            return (FR_TXFE | (FR_RXFE if not self._rx else 0)
                    | (FR_RXFF if len(self._rx) >= self._capacity() else 0))
        if offset in ID_REGISTERS:
            return ID_REGISTERS[offset]
        simple = {RSR: 0, ILPR: s.ilpr, IBRD: s.ibrd, FBRD: s.fbrd, LCR_H: s.lcr_h, CR: s.cr,
                  IFLS: s.ifls, IMSC: s.imsc, RIS: s.ris, MIS: s.ris & s.imsc, DMACR: s.dmacr}
        return simple.get(offset, 0)

    def write(self, offset: int, size: int, value: int) -> None:
        s = self.state
        if offset == DR:
            self.out.write(bytes([value & 0xFF]))
            s.ris |= INT_TX  # the TX FIFO drains at once, through its trigger level
        elif offset == ICR:
            s.ris &= ~value & INT_ALL
        elif offset == IMSC:
            s.imsc = value & INT_ALL
        elif offset == LCR_H:
            flush = (s.lcr_h ^ value) & LCR_H_FEN
            s.lcr_h = value & 0xFF
            if flush:
                self._rx.clear()            # FIFO mode changed: the RX FIFO is flushed
                self._rx_levels(arrived=self._refill() > 0)
        elif offset == IFLS:
            s.ifls = value & 0x3F
            self._rx_levels(arrived=False)
        else:
            masks = {IBRD: 0xFFFF, FBRD: 0x3F, CR: 0xFFFF, ILPR: 0xFF, DMACR: 0x7}
            if offset in masks:
                setattr(s, {IBRD: "ibrd", FBRD: "fbrd", CR: "cr", ILPR: "ilpr", DMACR: "dmacr"}[offset],
                        value & masks[offset])
        self._update_irq()

    # -- host side ----------------------------------------------------------------------
    def enqueue_input(self, data: bytes) -> int:
        """Offer console input; returns how many bytes were taken (the rest did not fit
        in the FIFO and the bounded pending queue: offer them again later)."""
        room = RX_PENDING_MAX - len(self._pending) + max(0, self._capacity() - len(self._rx))
        accepted = data[:max(0, room)]
        if not accepted:
            return 0
        self._pending.extend(accepted)
        self._rx_levels(arrived=self._refill() > 0)
        self._update_irq()
        return len(accepted)

    def pending_input(self) -> int:
        """Bytes received from the host that the guest has not read yet."""
        return len(self._rx) + len(self._pending)

    # -- internals ----------------------------------------------------------------------
    def _capacity(self) -> int:
        return FIFO_DEPTH if self.state.lcr_h & LCR_H_FEN else 1

    def _trigger(self) -> int:
        if not self.state.lcr_h & LCR_H_FEN:
            return 1
        return RX_TRIGGER.get((self.state.ifls >> 3) & 7, FIFO_DEPTH // 2)

    def _refill(self) -> int:
        """Move waiting host bytes into the FIFO while it has room; how many moved."""
        moved = 0
        while self._pending and len(self._rx) < self._capacity():
            self._rx.append(self._pending.popleft())
            moved += 1
        return moved

    def _rx_levels(self, *, arrived: bool) -> None:
        """RXRIS follows the fill level against the trigger; RTRIS is raised by a burst
        that leaves data in the FIFO (the 32-bit-period timeout) and dropped when empty."""
        s = self.state
        if len(self._rx) >= self._trigger() and self._rx:
            if arrived or s.ris & INT_RX:
                s.ris |= INT_RX
        else:
            s.ris &= ~INT_RX
        if not self._rx:
            s.ris &= ~INT_RT
        elif arrived:
            s.ris |= INT_RT

    def _update_irq(self) -> None:
        self.irq.set_level(bool(self.state.ris & self.state.imsc))

    # -- persistence --------------------------------------------------------------------
    def save(self) -> Pl011State:
        return dataclasses.replace(self.state, rx_fifo=list(self._rx), rx_pending=list(self._pending))

    def restore(self, state: Pl011State) -> None:
        self.state = dataclasses.replace(state, rx_fifo=[], rx_pending=[])
        self._rx = deque(state.rx_fifo)
        self._pending = deque(state.rx_pending)
        self._update_irq()
