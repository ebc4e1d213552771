"""The 8042 controller and keyboard as Linux's i8042/atkbd drivers and reboot use them."""
from __future__ import annotations

import json

import pytest

from hv.devices.i8042 import I8042, I8042State
from hv.devices.interfaces import DeviceStateError
from tests.devices.conftest import RecordingLine

DATA, CMD = 0, 4


class Board:
    """Counts reset requests (what the machine's GuestResetRequest would schedule)."""

    def __init__(self) -> None:
        self.resets = 0

    def reset(self) -> None:
        self.resets += 1


def make() -> tuple[I8042, Board, RecordingLine]:
    board, line = Board(), RecordingLine()
    return I8042(board.reset, line), board, line


def command(kbc: I8042, cmd: int, *data: int) -> list[int]:
    """i8042_command: write the command (and data), then read every answer byte."""
    kbc.write(CMD, 1, cmd)
    for byte in data:
        kbc.write(DATA, 1, byte)
    return drain(kbc)


def drain(kbc: I8042) -> list[int]:
    out = []
    for _ in range(32):
        if not kbc.read(CMD, 1) & 0x01:
            return out
        out.append(kbc.read(DATA, 1))
    raise AssertionError("the output buffer never emptied")


def test_linux_controller_probe_sequence() -> None:
    kbc, board, _ = make()
    assert drain(kbc) == []                                  # i8042_flush
    assert command(kbc, 0xAA) == [0x55]                      # self test
    assert kbc.read(CMD, 1) & 0x04                           # system flag
    ctr = command(kbc, 0x20)
    assert ctr == command(kbc, 0x20) == [0x45]
    assert command(kbc, 0x60, (ctr[0] | 0x10) & ~0x01) == []  # keyboard disabled, no interrupt
    assert command(kbc, 0x20) == [0x54]
    assert command(kbc, 0xA7) == [] and command(kbc, 0x20)[0] & 0x20
    assert command(kbc, 0xA8) == [] and not command(kbc, 0x20)[0] & 0x20
    assert command(kbc, 0xAD) == [] and command(kbc, 0x20)[0] & 0x10
    assert command(kbc, 0xAE) == [] and not command(kbc, 0x20)[0] & 0x10
    assert command(kbc, 0xAB) == [0x00] and command(kbc, 0xA9) == [0x00]
    assert kbc.read(CMD, 1) & 0x0A == 0x08                   # last write was a command, IBF never set
    assert board.resets == 0


def test_keyboard_reset_identify_and_parameters_with_irq1_edges() -> None:
    kbc, _, line = make()
    kbc.write(DATA, 1, 0xFF)
    assert kbc.read(CMD, 1) & 0x21 == 0x01 and line.levels[-1]
    assert kbc.read(DATA, 1) == 0xFA and line.levels[-1]     # the next byte is a new edge
    assert kbc.read(DATA, 1) == 0xAA and not line.levels[-1]
    assert line.rising_edges == 2
    kbc.write(DATA, 1, 0xF2)
    assert drain(kbc) == [0xFA, 0xAB, 0x41]                  # translated ID (command byte bit 6)
    command(kbc, 0x60, 0x05)
    kbc.write(DATA, 1, 0xF2)
    assert drain(kbc) == [0xFA, 0xAB, 0x83]
    for cmd, param in ((0xED, 0x07), (0xF3, 0x20), (0xF0, 0x01)):
        kbc.write(DATA, 1, cmd)
        kbc.write(DATA, 1, param)
        assert drain(kbc) == [0xFA, 0xFA]
    kbc.write(DATA, 1, 0xF0)
    kbc.write(DATA, 1, 0x00)
    assert drain(kbc) == [0xFA, 0xFA, 0x01]
    for cmd, answer in ((0xF4, 0xFA), (0xF5, 0xFA), (0xF6, 0xFA), (0xEE, 0xEE), (0x42, 0xFE)):
        kbc.write(DATA, 1, cmd)
        assert drain(kbc) == [answer]
    assert kbc.s.kbd_leds == 7 and kbc.s.kbd_set == 1


def test_disabled_keyboard_port_holds_keyboard_bytes_not_controller_answers() -> None:
    kbc, _, _ = make()
    kbc.write(DATA, 1, 0xFF)
    kbc.write(CMD, 1, 0xAD)
    assert drain(kbc) == [0xFA]                              # already in the buffer; 0xAA waits
    assert command(kbc, 0x20) == [0x55]                      # controller answers still come
    assert command(kbc, 0xAE) == [0xAA]
    kbc.write(CMD, 1, 0xAD)
    assert command(kbc, 0xD2, 0x11) == []                    # a keyboard byte while disabled: held
    assert command(kbc, 0xAE) == [0x11]


def test_aux_port_without_a_device() -> None:
    kbc, _, _ = make()
    kbc.write(CMD, 1, 0xD3)
    kbc.write(DATA, 1, 0x5A)                                 # AUX loop: the controller echoes
    assert kbc.read(CMD, 1) & 0x21 == 0x21 and kbc.read(DATA, 1) == 0x5A
    kbc.write(CMD, 1, 0xD4)
    kbc.write(DATA, 1, 0xF2)                                 # to the (absent) mouse
    assert kbc.read(CMD, 1) & 0x61 == 0x61                   # timeout, AUX, full
    assert kbc.read(DATA, 1) == 0xFE and not kbc.read(CMD, 1) & 0x41


@pytest.mark.parametrize("how", ["pulse-fe", "pulse-f0", "output-port"])
def test_reset_line(how: str) -> None:
    kbc, board, _ = make()
    assert command(kbc, 0xD0) == [0x03]
    command(kbc, 0xD1, 0x03)                                 # reset line stays high
    command(kbc, 0xFF)                                       # pulse nothing
    command(kbc, 0xDD)
    assert board.resets == 0 and command(kbc, 0xD0) == [0x01]
    if how == "pulse-fe":
        kbc.write(CMD, 1, 0xFE)
    elif how == "pulse-f0":
        kbc.write(CMD, 1, 0xF0)
    else:
        command(kbc, 0xD1, 0x02)
    assert board.resets == 1


def test_save_restore_keeps_queued_bytes_and_pending_command() -> None:
    kbc, _, _ = make()
    kbc.write(DATA, 1, 0xF2)
    kbc.read(DATA, 1)
    kbc.write(CMD, 1, 0x60)                                  # the data byte comes after the move
    state = I8042State.from_dict(json.loads(json.dumps(kbc.save().to_dict())))
    other, board, line = make()
    other.restore(state)
    assert line.levels[-1]                                   # 0xAB waits with IRQ 1 asserted
    other.write(DATA, 1, 0x44)
    assert drain(other) == [0xAB, 0x41] and other.s.ctr == 0x44
    other.restore(I8042State())
    assert drain(other) == [] and other.s.ctr == 0x45 and board.resets == 0


@pytest.mark.parametrize("mutate", [
    lambda raw: raw.pop("ctr"),
    lambda raw: raw.update(ctr=256),
    lambda raw: raw.update(obuf=0x200),
    lambda raw: raw.update(kbd_queue=[0] * 17),
    lambda raw: raw.update(kbd_queue=[0x100]),
    lambda raw: raw.update(ctl_queue="x"),
    lambda raw: raw.update(timeout=1),
    lambda raw: raw.update(kbd_set=4),
])
def test_bad_state_is_refused(mutate) -> None:
    raw = I8042State().to_dict()
    mutate(raw)
    with pytest.raises(DeviceStateError):
        I8042State.from_dict(raw)
