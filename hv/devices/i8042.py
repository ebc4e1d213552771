"""A minimal 8042 PS/2 controller (ports 0x60 data, 0x64 status/command) with a keyboard.

Enough for Linux's i8042 and atkbd drivers to probe without errors, and for the reset
line Linux's ``reboot=k`` (its default fallback) pulses.

Status (read 0x64): bit 0 output buffer full, 1 input buffer full (always 0: every
write is handled at once), 2 system flag (command byte bit 2), 3 last write was a
command, 4 keyboard not inhibited (1), 5 the output byte is from the AUX port,
6 timeout (AUX write with no device).

Controller commands (write 0x64): 0x20 read / 0x60 write the command byte, 0xA7 / 0xA8
disable / enable the AUX port (command byte bit 5), 0xA9 AUX interface test (0x00),
0xAA self test (0x55, sets the system flag), 0xAB keyboard interface test (0x00),
0xAD / 0xAE disable / enable the keyboard port (bit 4), 0xD0 read / 0xD1 write the output
port, 0xD2 / 0xD3 write the keyboard / AUX output buffer, 0xD4 write to the AUX device,
0xDD / 0xDF A20 off / on, 0xE0 read test inputs (0x00), 0xF0-0xFF pulse output port
bits 0-3 (a clear bit pulses). Output port bit 0 low, by 0xD1 or a pulse (0xFE), is the
CPU reset line: the injected ``on_reset`` is called, the board decides what a reset
means. The A20 bit is stored; hv does not mask address line 20. Unknown commands are
ignored (logged once).

No AUX device (mouse) is attached: a byte sent with 0xD4 comes back as 0xFE with the
timeout bit, as a controller with an empty AUX connector answers. An ACPI DSDT that
lists only the keyboard (PNP0303) makes Linux skip the AUX port altogether.

Keyboard (bytes written to 0x60 with no controller command pending): 0xFF reset
(0xFA 0xAA), 0xF2 identify (0xFA 0xAB 0x83, 0x41 when the command byte's translate bit
is set), 0xED LEDs / 0xF0 scan code set / 0xF3 typematic take a parameter byte, 0xEE echo,
0xF4 / 0xF5 / 0xF6 / 0xF7-0xFD acknowledged (0xFA), anything else 0xFE (resend).
Keyboard bytes wait while the keyboard port is disabled; controller answers do not.
IRQ 1 is asserted while the output buffer holds a keyboard byte and command byte
bit 0 is set (IRQ 12 likewise for AUX bytes and bit 1); each new byte is a new edge.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hv.devices.interfaces import DeviceStateError, InterruptLine, UnconnectedLine, checked_fields, checked_uint
from hv.devices.persist import plain_dict

log = logging.getLogger(__name__)

QUEUE_LIMIT = 16
AUX_FLAG = 0x100                 # marks a queued byte as coming from the AUX port
STATUS_OBF, STATUS_SYS, STATUS_CMD, STATUS_UNLOCKED = 0x01, 0x04, 0x08, 0x10
STATUS_AUX, STATUS_TIMEOUT = 0x20, 0x40
CTR_KBDINT, CTR_AUXINT, CTR_SYS, CTR_KBDDIS, CTR_AUXDIS, CTR_XLATE = 0x01, 0x02, 0x04, 0x10, 0x20, 0x40
OUTPORT_RESET, OUTPORT_A20 = 0x01, 0x02
KBD_ACK, KBD_RESEND, KBD_BAT_OK = 0xFA, 0xFE, 0xAA
DATA_COMMANDS = (0x60, 0xD1, 0xD2, 0xD3, 0xD4)      # controller commands that take a data byte
KBD_PARAM_COMMANDS = (0xED, 0xF0, 0xF3)            # keyboard commands that take a parameter


def _byte_list(value: Any, what: str, limit: int = 0x100) -> list[int]:
    if (not isinstance(value, list) or len(value) > QUEUE_LIMIT
            or any(isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < limit for b in value)):
        raise DeviceStateError(f"i8042 state: bad {what}")
    return list(value)


@dataclass
class I8042State:
    """Controller and keyboard state; the defaults are what firmware leaves (command
    byte 0x45: keyboard interrupt, system flag, translation)."""

    ctr: int = CTR_KBDINT | CTR_SYS | CTR_XLATE
    output_port: int = OUTPORT_RESET | OUTPORT_A20
    pending: int = 0                 # controller command waiting for its data byte
    last_was_command: bool = False
    timeout: bool = False
    obuf: int | None = None          # the output buffer (AUX_FLAG set: from the AUX port)
    ctl_queue: list[int] = field(default_factory=list)   # controller answers, then ...
    kbd_queue: list[int] = field(default_factory=list)   # ... keyboard bytes
    kbd_pending: int = 0             # keyboard command waiting for its parameter
    kbd_scanning: bool = True
    kbd_set: int = 2
    kbd_leds: int = 0

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> I8042State:
        raw = checked_fields(raw, cls, "i8042")
        for name in ("last_was_command", "timeout", "kbd_scanning"):
            if not isinstance(raw[name], bool):
                raise DeviceStateError(f"i8042 state: bad {name}")
        obuf = raw["obuf"]
        return cls(ctr=checked_uint(raw["ctr"], 256, "i8042 state: bad ctr"),
                   output_port=checked_uint(raw["output_port"], 256, "i8042 state: bad output_port"),
                   pending=checked_uint(raw["pending"], 256, "i8042 state: bad pending"),
                   last_was_command=raw["last_was_command"], timeout=raw["timeout"],
                   obuf=None if obuf is None else checked_uint(obuf, 0x200, "i8042 state: bad obuf"),
                   ctl_queue=_byte_list(raw["ctl_queue"], "ctl_queue", 0x200),
                   kbd_queue=_byte_list(raw["kbd_queue"], "kbd_queue"),
                   kbd_pending=checked_uint(raw["kbd_pending"], 256, "i8042 state: bad kbd_pending"),
                   kbd_scanning=raw["kbd_scanning"],
                   kbd_set=checked_uint(raw["kbd_set"], 4, "i8042 state: bad kbd_set"),
                   kbd_leds=checked_uint(raw["kbd_leds"], 8, "i8042 state: bad kbd_leds"))


class I8042:
    """The controller as a register file at 0x60 (offset 0) and 0x64 (offset 4); port
    0x61 in between belongs to another device, so the bus maps :meth:`port` windows.

    ``on_reset()`` is called when the guest pulls the reset line (the board schedules
    the reset; this stays a register file). ``kbd_irq`` is IRQ 1, ``aux_irq`` IRQ 12.
    """

    SIZE = 5

    def __init__(self, on_reset: Callable[[], None], kbd_irq: InterruptLine | None = None,
                 aux_irq: InterruptLine | None = None) -> None:
        self.on_reset = on_reset
        self.kbd_irq = kbd_irq if kbd_irq is not None else UnconnectedLine()
        self.aux_irq = aux_irq if aux_irq is not None else UnconnectedLine()
        self.s = I8042State()
        self._reported: set[int] = set()

    # -- output buffer ---------------------------------------------------------------
    def _refill(self) -> None:
        s = self.s
        if s.obuf is None:
            if s.ctl_queue:
                s.obuf = s.ctl_queue.pop(0)
            elif s.kbd_queue and not s.ctr & CTR_KBDDIS:
                s.obuf = s.kbd_queue.pop(0)
        self._update_irq()

    def _update_irq(self) -> None:
        obuf = self.s.obuf
        self.kbd_irq.set_level(obuf is not None and not obuf & AUX_FLAG and bool(self.s.ctr & CTR_KBDINT))
        self.aux_irq.set_level(obuf is not None and bool(obuf & AUX_FLAG) and bool(self.s.ctr & CTR_AUXINT))

    def _answer(self, *data: int) -> None:
        """Controller answers (AUX_FLAG for the AUX port's buffer)."""
        self.s.ctl_queue = (self.s.ctl_queue + list(data))[:QUEUE_LIMIT]
        self._refill()

    def _kbd_send(self, *data: int) -> None:
        self.s.kbd_queue = (self.s.kbd_queue + list(data))[:QUEUE_LIMIT]
        self._refill()

    # -- registers -----------------------------------------------------------------------
    def read(self, offset: int, size: int) -> int:
        s = self.s
        if offset == 4:
            status = STATUS_UNLOCKED | (s.ctr & CTR_SYS)
            if s.obuf is not None:
                status |= STATUS_OBF | (STATUS_AUX if s.obuf & AUX_FLAG else 0)
            return status | (STATUS_CMD if s.last_was_command else 0) | (STATUS_TIMEOUT if s.timeout else 0)
        if offset != 0:
            return 0xFF
        if s.obuf is None:
            return 0x00
        value, s.obuf, s.timeout = s.obuf & 0xFF, None, False
        self.kbd_irq.set_level(False)                # the next byte is a new edge
        self.aux_irq.set_level(False)
        self._refill()
        return value

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        if offset == 4:
            self.s.last_was_command = True
            self._command(value)
        elif offset == 0:
            self.s.last_was_command = False
            self._data(value)

    def _command(self, cmd: int) -> None:
        s = self.s
        s.pending = 0
        if cmd in DATA_COMMANDS:
            s.pending = cmd
        elif cmd == 0x20:
            self._answer(s.ctr)
        elif cmd in (0xA7, 0xA8):
            s.ctr = s.ctr | CTR_AUXDIS if cmd == 0xA7 else s.ctr & ~CTR_AUXDIS
        elif cmd in (0xA9, 0xAB, 0xE0):
            self._answer(0x00)
        elif cmd == 0xAA:
            s.ctr |= CTR_SYS
            self._answer(0x55)
        elif cmd in (0xAD, 0xAE):
            s.ctr = s.ctr | CTR_KBDDIS if cmd == 0xAD else s.ctr & ~CTR_KBDDIS
            self._refill()
        elif cmd == 0xD0:
            self._answer(s.output_port)
        elif cmd in (0xDD, 0xDF):
            s.output_port = s.output_port | OUTPORT_A20 if cmd == 0xDF else s.output_port & ~OUTPORT_A20
        elif cmd >= 0xF0:
            if not cmd & OUTPORT_RESET:
                self._reset_line()
        elif cmd not in self._reported and len(self._reported) < 64:
            self._reported.add(cmd)
            log.debug("i8042: controller command %#x ignored", cmd)

    def _data(self, value: int) -> None:
        s = self.s
        pending, s.pending = s.pending, 0
        if pending == 0x60:
            s.ctr = value
            self._refill()
        elif pending == 0xD1:
            s.output_port = value
            if not value & OUTPORT_RESET:
                self._reset_line()
        elif pending == 0xD2:
            self._kbd_send(value)
        elif pending == 0xD3:
            self._answer(value | AUX_FLAG)
        elif pending == 0xD4:
            s.timeout = True                         # no AUX device answers
            self._answer(KBD_RESEND | AUX_FLAG)
        else:
            s.ctr &= ~CTR_KBDDIS                     # talking to the keyboard enables its port
            self._keyboard(value)

    def _reset_line(self) -> None:
        log.info("i8042: the guest pulsed the CPU reset line")
        self.on_reset()

    # -- keyboard ------------------------------------------------------------------------
    def _keyboard(self, byte: int) -> None:
        s = self.s
        if s.kbd_pending:
            pending, s.kbd_pending = s.kbd_pending, 0
            if pending == 0xED:
                s.kbd_leds = byte & 7
            elif pending == 0xF0 and byte == 0:
                self._kbd_send(KBD_ACK, s.kbd_set)
                return
            elif pending == 0xF0 and byte in (1, 2, 3):
                s.kbd_set = byte
            self._kbd_send(KBD_ACK)
            return
        if byte == 0xFF:
            s.kbd_queue, s.kbd_scanning, s.kbd_set, s.kbd_leds = [], True, 2, 0
            self._kbd_send(KBD_ACK, KBD_BAT_OK)
        elif byte == 0xF2:
            self._kbd_send(KBD_ACK, 0xAB, 0x41 if s.ctr & CTR_XLATE else 0x83)
        elif byte in KBD_PARAM_COMMANDS:
            s.kbd_pending = byte
            self._kbd_send(KBD_ACK)
        elif byte == 0xEE:
            self._kbd_send(0xEE)
        elif byte in (0xF4, 0xF5, 0xF6):
            s.kbd_scanning = byte != 0xF5
            self._kbd_send(KBD_ACK)
        elif 0xF7 <= byte <= 0xFD:
            self._kbd_send(KBD_ACK)
        else:
            self._kbd_send(KBD_RESEND)

    def port(self, offset: int) -> I8042Port:
        """A one-byte window on the bus at 0x60 + ``offset`` (0: data, 4: status/command)."""
        return I8042Port(self, offset)

    # -- persistence ------------------------------------------------------------------
    def save(self) -> I8042State:
        s = self.s
        return dataclasses.replace(s, ctl_queue=list(s.ctl_queue), kbd_queue=list(s.kbd_queue))

    def restore(self, state: I8042State) -> None:
        self.s = dataclasses.replace(state, ctl_queue=list(state.ctl_queue), kbd_queue=list(state.kbd_queue))
        self._update_irq()


class I8042Port:
    """One port of the controller as a one-byte register file."""

    SIZE = 1

    def __init__(self, controller: I8042, offset: int) -> None:
        self.controller = controller
        self.offset = offset

    def read(self, offset: int, size: int) -> int:
        return self.controller.read(self.offset + offset, size)

    def write(self, offset: int, size: int, value: int) -> None:
        self.controller.write(self.offset + offset, size, value)
