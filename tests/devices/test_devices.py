"""Unit tests of the console and power devices as pure register files."""
from __future__ import annotations

import pytest

from hv.console import BufferSink
from hv.devices.acpi_pm import AcpiPm, AcpiPmState
from hv.devices.bus import Bus, BusError
from hv.devices.interfaces import DeviceStateError, UnconnectedLine
from hv.devices.pl011 import Pl011, Pl011State
from hv.devices.serial import Serial16550, SerialState


def test_serial_transmits_and_reports_empty_thr():
    out = BufferSink()
    uart = Serial16550(out)
    for byte in b"hi\n":
        assert uart.read(5, 1) & 0x20  # THRE before every byte
        uart.write(0, 1, byte)
    assert out.getvalue() == b"hi\n"


def test_serial_divisor_latch_does_not_transmit():
    out = BufferSink()
    uart = Serial16550(out)
    uart.write(3, 1, 0x83)  # DLAB
    uart.write(0, 1, 0x01)
    uart.write(1, 1, 0x00)
    assert (uart.read(0, 1), uart.read(1, 1)) == (1, 0)
    uart.write(3, 1, 0x03)
    assert out.getvalue() == b""


def test_serial_receive_fifo_and_interrupt_line():
    line = UnconnectedLine()
    uart = Serial16550(BufferSink(), line)
    uart.write(1, 1, 0x01)  # IER: received data available
    assert not line.level
    assert uart.enqueue_input(b"ab") == 2
    assert line.level and uart.read(5, 1) & 1
    assert uart.read(2, 1) & 0x0F == 0x04
    assert uart.read(0, 1) == ord("a") and uart.read(0, 1) == ord("b")
    assert not line.level and not uart.read(5, 1) & 1


def test_serial_fifo_is_bounded():
    uart = Serial16550(BufferSink())   # 16450 mode: a 1-byte RBR + the 4 KiB host queue
    assert uart.enqueue_input(bytes(5000)) == 1 + 4096
    assert uart.enqueue_input(b"x") == 0


def test_serial_thre_interrupt_cleared_by_iir_read():
    line = UnconnectedLine()
    uart = Serial16550(BufferSink(), line)
    uart.write(1, 1, 0x02)
    assert line.level and uart.read(2, 1) & 0x0F == 0x02
    assert not line.level and uart.read(2, 1) & 0x0F == 0x01
    uart.write(0, 1, ord("x"))
    assert line.level


def test_serial_save_restore_round_trip():
    uart = Serial16550(BufferSink())
    uart.write(1, 1, 0x03)
    uart.write(7, 1, 0x5A)
    uart.enqueue_input(b"xyz")
    saved = uart.save()
    clone = Serial16550(BufferSink())
    clone.restore(SerialState.from_dict(saved.to_dict()))
    assert clone.save() == saved
    assert clone.read(0, 1) == ord("x")


@pytest.mark.parametrize("raw", [None, {}, {**SerialState().to_dict(), "ier": 256},
                                 {**SerialState().to_dict(), "rx_fifo": [1] * 65},
                                 {**SerialState().to_dict(), "lcr": True}])
def test_serial_state_rejects_malformed(raw):
    with pytest.raises(DeviceStateError):
        SerialState.from_dict(raw)


def test_pl011_transmit_flags_and_ids():
    out = BufferSink()
    uart = Pl011(out)
    assert uart.read(0x18, 4) & (1 << 7)      # TXFE
    assert not uart.read(0x18, 4) & (1 << 5)  # never TXFF
    uart.write(0, 4, ord("A"))
    assert out.getvalue() == b"A"
    assert [uart.read(o, 4) for o in (0xFE0, 0xFE4, 0xFE8, 0xFEC)] == [0x11, 0x10, 0x14, 0x00]


def test_pl011_rx_interrupt_masking_and_state():
    line = UnconnectedLine()
    uart = Pl011(BufferSink(), line)
    uart.enqueue_input(b"q")
    assert not line.level
    uart.write(0x38, 4, 1 << 4)  # IMSC RX
    assert line.level
    saved = uart.save()
    clone = Pl011(BufferSink(), UnconnectedLine())
    clone.restore(Pl011State.from_dict(saved.to_dict()))
    assert clone.read(0, 4) == ord("q")
    assert uart.read(0, 4) == ord("q") and not line.level


def test_acpi_pm_power_off_on_slp_en():
    requests = []
    pm = AcpiPm(requests.append)
    pm.write(4, 2, 0x0001)
    assert requests == []
    pm.write(4, 2, 0x2000 | (5 << 10))
    assert requests == [5]
    assert not pm.read(4, 2) & 0x2000
    assert AcpiPmState.from_dict(pm.save().to_dict()) == pm.save()


def test_bus_routes_and_rejects_overlap():
    out = BufferSink()
    bus = Bus("port")
    bus.add(0x3F8, 8, Serial16550(out), "serial")
    with pytest.raises(BusError):
        bus.add(0x3FF, 2, Serial16550(out), "other")
    bus.write(0x3F8, 1, ord("z"))
    assert out.getvalue() == b"z"
    assert bus.read(0x500, 2) == 0xFFFF
    bus.write(0x500, 1, 1)  # dropped
