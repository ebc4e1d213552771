"""The 16550A's receive side as Linux's 8250 driver uses it: the 16-byte FIFO and its
trigger levels, the character-timeout indication, the bounded host queue behind the
FIFO, flushes, loopback, and saved states (including ones from an hv before the queue)."""
from __future__ import annotations

import pytest

from hv.console import BufferSink
from hv.devices.interfaces import DeviceStateError, UnconnectedLine
from hv.devices.serial import FIFO_DEPTH, RX_PENDING_MAX, Serial16550, SerialState

RBR, IER, IIR, FCR, LCR, MCR, LSR = 0, 1, 2, 2, 3, 4, 5


def uart_with_fifo(trigger_bits: int = 0) -> tuple[Serial16550, UnconnectedLine]:
    line = UnconnectedLine()
    uart = Serial16550(BufferSink(), line)
    uart.write(FCR, 1, 0x01 | 0x02 | (trigger_bits << 6))   # enable + clear RX
    uart.write(IER, 1, 0x01)
    return uart, line


def drain(uart: Serial16550) -> bytes:
    """Read as Linux does: RBR while LSR.DR, bounded."""
    out = bytearray()
    for _ in range(RX_PENDING_MAX + 64):
        if not uart.read(LSR, 1) & 1:
            break
        out.append(uart.read(RBR, 1))
    return bytes(out)


def test_fifo_mode_identifies_as_16550a() -> None:
    uart, _ = uart_with_fifo()
    assert uart.read(IIR, 1) & 0xC0 == 0xC0
    uart.write(FCR, 1, 0)
    assert uart.read(IIR, 1) & 0xC0 == 0


@pytest.mark.parametrize("bits, trigger", [(0, 1), (1, 4), (2, 8), (3, 14)])
def test_trigger_level_gives_rda_below_it_timeout(bits: int, trigger: int) -> None:
    uart, line = uart_with_fifo(bits)
    uart.enqueue_input(bytes(trigger - 1))
    if trigger > 1:
        assert line.level and uart.read(IIR, 1) & 0x0F == 0x0C   # character timeout
    uart.enqueue_input(b"x")
    assert line.level and uart.read(IIR, 1) & 0x0F == 0x04
    assert drain(uart) == bytes(trigger - 1) + b"x"
    assert not line.level and uart.read(IIR, 1) & 0x0F == 0x01


def test_host_queue_refills_the_fifo_in_order() -> None:
    uart, line = uart_with_fifo()
    data = bytes(range(256)) * 4
    assert uart.enqueue_input(data) == len(data)
    assert uart.pending_input() == len(data)
    assert uart.save().rx_fifo == list(data[:FIFO_DEPTH])
    assert drain(uart) == data and uart.pending_input() == 0 and not line.level


def test_host_queue_is_bounded_and_takes_more_after_reads() -> None:
    uart, _ = uart_with_fifo()
    assert uart.enqueue_input(bytes(RX_PENDING_MAX + 100)) == RX_PENDING_MAX + FIFO_DEPTH
    assert uart.enqueue_input(b"y") == 0
    uart.read(RBR, 1)
    assert uart.enqueue_input(b"yz") == 1


def test_flush_drops_the_fifo_but_not_the_host_queue() -> None:
    uart, _ = uart_with_fifo()
    uart.enqueue_input(bytes(range(40)))
    uart.write(FCR, 1, 0x03)                 # clear RX: the 16 bytes in the FIFO go
    assert drain(uart) == bytes(range(16, 40))
    uart.enqueue_input(b"abc")
    uart.write(FCR, 1, 0x00)                 # FIFO off: flushed, 16450 mode
    assert uart.pending_input() == 0 and not uart.read(LSR, 1) & 1


def test_16450_mode_holds_one_byte_at_a_time() -> None:
    line = UnconnectedLine()
    uart = Serial16550(BufferSink(), line)
    uart.write(IER, 1, 0x01)
    uart.enqueue_input(b"hello")
    assert uart.save().rx_fifo == [ord("h")] and uart.read(IIR, 1) & 0x0F == 0x04
    assert drain(uart) == b"hello"


def test_loopback_receives_what_is_sent_and_overruns_drop() -> None:
    out = BufferSink()
    uart = Serial16550(out)
    uart.write(FCR, 1, 0x01)
    uart.write(MCR, 1, 0x10)
    for byte in range(20):
        uart.write(RBR, 1, byte)
    assert out.getvalue() == b"" and drain(uart) == bytes(range(16))


def test_state_round_trip_keeps_fifo_and_queue() -> None:
    uart, _ = uart_with_fifo(2)
    uart.enqueue_input(bytes(range(100)))
    raw = uart.save().to_dict()
    assert len(raw["rx_fifo"]) == 16 and len(raw["rx_pending"]) == 84
    clone = Serial16550(BufferSink(), UnconnectedLine())
    clone.restore(SerialState.from_dict(raw))
    assert clone.save() == uart.save()
    assert drain(clone) == bytes(range(100))


def test_empty_queue_is_left_out_for_older_readers() -> None:
    uart, _ = uart_with_fifo()
    uart.enqueue_input(b"ab")
    assert "rx_pending" not in uart.save().to_dict()


def test_older_state_with_a_64_byte_fifo_loads_in_order() -> None:
    """An hv before the host queue saved up to 64 bytes in rx_fifo and no rx_pending."""
    old = {"dll": 1, "dlm": 0, "ier": 1, "lcr": 3, "mcr": 0x0B, "lsr": 0x61, "msr": 0xB0, "scr": 0,
           "fcr": 0xC1, "thr_interrupt_pending": False, "rx_fifo": list(range(64))}
    line = UnconnectedLine()
    uart = Serial16550(BufferSink(), line)
    uart.restore(SerialState.from_dict(old))
    assert line.level and drain(uart) == bytes(range(64))


@pytest.mark.parametrize("change", [{"rx_pending": [256]}, {"rx_pending": [0] * (RX_PENDING_MAX + 1)},
                                    {"rx_pending": "abc"}, {"extra": 1}, {"rx_fifo": None}])
def test_bad_receive_state_is_refused(change: dict) -> None:
    with pytest.raises(DeviceStateError):
        SerialState.from_dict({**SerialState().to_dict(), **change})
