"""The PL011 console: RX FIFO / holding register, RX, receive-timeout and TX interrupts
(RIS, IMSC, MIS, ICR), the bounded host input queue, versioned save/restore, and its
level-triggered SPI 33 on a real virt machine's GIC (what Linux's amba-pl011 driver and
``console=ttyAMA0`` rely on to read typed input)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from hv.config import parse_args
from hv.console import BufferSink
from hv.boards.virt.layout import GICD_BASE, GICR_BASE
from hv.devices.gicv3 import REG_IROUTER, REG_ISENABLER, REG_ISPENDR
from hv.devices.interfaces import DeviceStateError, UnconnectedLine
from hv.devices.pl011 import (CR, DR, FR, FR_RXFE, FR_RXFF, FR_TXFE, ICR, IFLS, IMSC, INT_RT, INT_RX, INT_TX,
                              LCR_H, LCR_H_FEN, MIS, RIS, RX_PENDING_MAX, Pl011, Pl011State)
from hv.machine.gic_interrupts import PL011_INTID
from hv.boards.virt.layout import PL011_BASE as VIRT_PL011_BASE
from hv.machine.machine import Machine
from hv_backends import backend_class
from tests.helpers import FIXTURES


def uart(fifo: bool = False) -> tuple[Pl011, UnconnectedLine, BufferSink]:
    line, out = UnconnectedLine(), BufferSink()
    device = Pl011(out, line)
    if fifo:
        device.write(LCR_H, 4, LCR_H_FEN | 0x60)       # 8 bits, FIFOs on
    return device, line, out


def drain(device: Pl011, limit: int = 10_000) -> bytes:
    """Read DR until FR.RXFE, as Linux's pl011_fifo_to_tty does."""
    got = bytearray()
    for _ in range(limit):
        if device.read(FR, 4) & FR_RXFE:
            return bytes(got)
        got.append(device.read(DR, 4) & 0xFF)
    raise AssertionError("RX never empties")


def test_character_mode_holds_one_byte_and_queues_the_rest() -> None:
    device, line, _ = uart()
    assert device.enqueue_input(b"abc") == 3
    assert device.read(FR, 4) & FR_RXFF and not device.read(FR, 4) & FR_RXFE
    assert device.read(RIS, 4) & (INT_RX | INT_RT) == INT_RX | INT_RT
    assert not line.level                               # nothing unmasked yet
    device.write(IMSC, 4, INT_RX | INT_RT)
    assert line.level and device.read(MIS, 4) == INT_RX | INT_RT
    assert drain(device) == b"abc"
    assert device.read(RIS, 4) & (INT_RX | INT_RT) == 0 and not line.level


@pytest.mark.parametrize("rxiflsel, trigger", [(0, 2), (1, 4), (2, 8), (3, 12), (4, 14)])
def test_fifo_trigger_levels_and_receive_timeout(rxiflsel: int, trigger: int) -> None:
    device, line, _ = uart(fifo=True)
    device.write(IFLS, 4, rxiflsel << 3)
    device.write(IMSC, 4, INT_RX)
    device.enqueue_input(b"x" * (trigger - 1))
    assert device.read(RIS, 4) & (INT_RX | INT_RT) == INT_RT    # below the trigger: timeout only
    assert not line.level                                       # RX masked, RT not enabled
    device.enqueue_input(b"y")
    assert device.read(RIS, 4) & INT_RX and line.level          # reached the trigger
    device.read(DR, 4)
    assert not device.read(RIS, 4) & INT_RX and not line.level  # below it again
    assert device.read(RIS, 4) & INT_RT                         # data left: timeout stays
    drain(device)
    assert not device.read(RIS, 4) & INT_RT


def test_fifo_is_sixteen_deep_and_refills_from_the_host_queue() -> None:
    device, _, _ = uart(fifo=True)
    data = bytes(range(40))
    assert device.enqueue_input(data) == 40
    assert device.read(FR, 4) & FR_RXFF and device.pending_input() == 40
    assert drain(device) == data and device.pending_input() == 0


def test_host_queue_is_bounded() -> None:
    device, _, _ = uart()
    assert device.enqueue_input(bytes(RX_PENDING_MAX + 100)) == RX_PENDING_MAX + 1   # 1 in the register
    assert device.enqueue_input(b"more") == 0
    device.read(DR, 4)
    assert device.enqueue_input(b"more") == 1


def test_icr_clears_and_mis_is_ris_and_imsc() -> None:
    device, line, out = uart()
    device.write(DR, 4, ord("h"))
    assert out.getvalue() == b"h" and device.read(RIS, 4) == INT_TX
    assert device.read(FR, 4) & FR_TXFE
    device.write(IMSC, 4, INT_TX)
    assert device.read(MIS, 4) == INT_TX and line.level
    device.write(ICR, 4, INT_TX)
    assert device.read(RIS, 4) == 0 and not line.level
    device.enqueue_input(b"z")
    device.write(IMSC, 4, INT_RX | INT_RT)
    device.write(ICR, 4, INT_RT)
    assert device.read(MIS, 4) == INT_RX and line.level
    device.write(ICR, 4, 0x7FF)
    assert device.read(MIS, 4) == 0 and not line.level
    assert device.read(DR, 4) == ord("z")                  # clearing did not drop the byte


def test_fen_change_flushes_the_fifo_but_not_the_host_queue() -> None:
    device, _, _ = uart(fifo=True)
    device.enqueue_input(bytes(range(20)))               # 16 in the FIFO, 4 waiting
    device.write(LCR_H, 4, 0x60)                          # FIFOs off: flushed, refilled by one
    assert drain(device) == bytes(range(16, 20))
    device.write(CR, 4, 0x301)
    assert device.read(CR, 4) == 0x301


def test_save_restore_round_trip_and_older_states() -> None:
    device, _, _ = uart(fifo=True)
    device.write(IMSC, 4, INT_RX | INT_RT)
    device.enqueue_input(bytes(range(30)))
    saved = device.save()
    raw = saved.to_dict()
    assert raw["rx_fifo"] == list(range(16)) and raw["rx_pending"] == list(range(16, 30))
    clone, line, _ = uart()
    clone.restore(Pl011State.from_dict(raw))
    assert line.level and clone.read(IMSC, 4) == INT_RX | INT_RT
    assert drain(clone) == bytes(range(30))
    # An empty host queue is left out, so an older hv (which has no such field) loads it,
    # and a state from an older hv (no rx_pending, up to 32 FIFO bytes) loads here.
    empty = Pl011(BufferSink()).save().to_dict()
    assert "rx_pending" not in empty
    old = {**empty, "rx_fifo": list(b"0123456789abcdefghijklmnopqrstuv")}
    restored, _, _ = uart()
    restored.restore(Pl011State.from_dict(old))
    assert drain(restored) == b"0123456789abcdefghijklmnopqrstuv"


@pytest.mark.parametrize("raw", [
    {**Pl011State().to_dict(), "extra": 1},
    {k: v for k, v in Pl011State().to_dict().items() if k != "ris"},
    {**Pl011State().to_dict(), "rx_pending": [256]},
    {**Pl011State().to_dict(), "rx_pending": [0] * (RX_PENDING_MAX + 1)},
    {**Pl011State().to_dict(), "rx_fifo": [0] * 33},
    {**Pl011State().to_dict(), "imsc": True},
    [],
])
def test_malformed_states_are_refused(raw: object) -> None:
    with pytest.raises(DeviceStateError):
        Pl011State.from_dict(raw)


# -- through a real virt machine's GIC ------------------------------------------------------


@pytest.fixture
def machine() -> Iterator[Machine]:
    config = parse_args(["-machine", "virt", "-m", "64", "-accel", "unicorn",
                         "-kernel", str(FIXTURES / "aarch64" / "hello.elf")]).config
    vm = Machine(config, backend_class("unicorn")(), BufferSink())
    try:
        yield vm
    finally:
        vm.close()


def test_rx_interrupt_is_level_spi_33_on_the_gic(machine: Machine) -> None:
    gic = machine.interrupts.gic                         # type: ignore[union-attr]
    mmio = machine.mmio
    mmio.write(GICD_BASE + 0x0, 4, 0x12)                 # ARE + EnableGrp1
    mmio.write(GICD_BASE + 0x80 + 4, 4, 1 << (PL011_INTID - 32))        # IGROUPR1: group 1
    mmio.write(GICD_BASE + REG_IROUTER + 8 * PL011_INTID, 8, 0)        # to vCPU 0
    mmio.write(GICD_BASE + REG_ISENABLER + 4, 4, 1 << (PL011_INTID - 32))
    mmio.write(GICR_BASE + 0x14, 4, 0)                   # wake redistributor 0
    gic.icc_write(0, "ICC_PMR_EL1", 0xFF)
    gic.icc_write(0, "ICC_IGRPEN1_EL1", 1)
    device = machine.devices["pl011"].device
    mmio.write(VIRT_PL011_BASE + LCR_H, 4, LCR_H_FEN | 0x60)
    mmio.write(VIRT_PL011_BASE + IMSC, 4, INT_RX | INT_RT)
    assert gic.signalled(0) is None
    with machine._lock:                                  # the console input path holds the big lock
        assert device.enqueue_input(b"ls\r") == 3
    assert gic.signalled(0) == PL011_INTID
    assert gic.icc_read(0, "ICC_IAR1_EL1") == PL011_INTID
    got = bytes(mmio.read(VIRT_PL011_BASE + DR, 4) for _ in range(3))
    assert got == b"ls\r" and mmio.read(VIRT_PL011_BASE + FR, 4) & FR_RXFE
    gic.icc_write(0, "ICC_EOIR1_EL1", PL011_INTID)
    assert gic.signalled(0) is None                      # line low: not pending again
    assert not mmio.read(GICD_BASE + REG_ISPENDR + 4, 4) & 1 << (PL011_INTID - 32)
    # TX interrupt on the same line, cleared by ICR
    mmio.write(VIRT_PL011_BASE + IMSC, 4, INT_TX)
    mmio.write(VIRT_PL011_BASE + DR, 4, ord("!"))
    assert gic.signalled(0) == PL011_INTID and machine.console.getvalue() == b"!"   # type: ignore[attr-defined]
    mmio.write(VIRT_PL011_BASE + ICR, 4, INT_TX)
    assert gic.signalled(0) is None
