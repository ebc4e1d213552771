"""The q35 board's legacy ISA devices: the 8254 PIT, the MC146818 RTC and the 8042.

What a stock Linux needs to calibrate time and to reboot. Wiring (ISA IRQ -> IOAPIC GSI,
as QEMU's q35 and its MADT interrupt source override IRQ 0 -> GSI 2):

| device | ports | interrupt | saved as |
|---|---|---|---|
| PIT (``isa-pit``) | 0x40-0x43, and 0x61 (counter 2 gate / output) | counter 0 -> IRQ 0 -> GSI 2 | ``pit`` |
| RTC (``mc146818rtc``) | 0x70-0x71 | IRQ 8 -> GSI 8 | ``rtc`` |
| 8042 (``i8042``) | 0x60, 0x64 | keyboard IRQ 1 -> GSI 1 (no AUX device, IRQ 12 unwired) | ``i8042`` |

PIT and RTC timers run on the interrupt controller's timer thread and guest clock. The
8042's reset line calls the board's ``on_reset``. Streams from an hv that had none of
these devices (format 1.2 and older) still load: :data:`LEGACY_DEVICE_IDS` may be absent
from an incoming fingerprint, and such a device keeps its reset state.
"""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hv.boards.q35.layout import (
    I8042_COMMAND_PORT,
    I8042_DATA_PORT,
    KBD_GSI,
    PIT_GSI,
    PIT_PORT,
    PORT61,
    RTC_GSI,
    RTC_PORT,
)
from hv.devices.i8042 import I8042, I8042State
from hv.devices.pit import Pit, PitState
from hv.devices.rtc import Rtc, RtcState
from hv.machine.interrupts import InterruptController

LEGACY_DEVICE_IDS = ("pit", "rtc", "i8042")

log = logging.getLogger(__name__)


@dataclass
class LegacyDevice:
    """A device for the machine's device table and its windows on the port bus."""

    name: str
    kind: str
    device: Any
    state_type: type
    ports: list[tuple[int, Any]]    # (base port, one register file of SIZE bytes)


def build_legacy_devices(irq: InterruptController, on_reset: Callable[[], None]) -> list[LegacyDevice]:
    """Create the three devices wired to ``irq`` (lines, timer thread, guest clock)."""
    pit = Pit(irq.clock, irq.line(PIT_GSI), irq.timer_changed)
    rtc = Rtc(irq.clock, irq.line(RTC_GSI), irq.timer_changed)
    kbc = I8042(on_reset, irq.line(KBD_GSI))
    irq.add_timer_source(pit)
    irq.add_timer_source(rtc)
    return [LegacyDevice("pit", "isa-pit", pit, PitState, [(PIT_PORT, pit), (PORT61, pit.port61())]),
            LegacyDevice("rtc", "mc146818rtc", rtc, RtcState, [(RTC_PORT, rtc)]),
            LegacyDevice("i8042", "i8042", kbc, I8042State,
                         [(I8042_DATA_PORT, kbc.port(0)), (I8042_COMMAND_PORT, kbc.port(4))])]


class GuestResetRequest:
    """The 8042's ``on_reset``: runs ``reset("guest-reset")`` (the machine's
    ``system_reset``) on its own thread, since the request comes from a vCPU thread inside
    a port write and a reset must pause every vCPU. Requests made while one is under way
    (Linux pulses the line up to ten times) are the same reset."""

    def __init__(self, reset: Callable[[str], None]) -> None:
        self._reset = reset
        self._pending = False

    def __call__(self) -> None:
        if self._pending:
            return
        self._pending = True
        threading.Thread(target=self._run, name="guest-reset", daemon=True).start()

    def _run(self) -> None:
        try:
            self._reset("guest-reset")
        except Exception as exc:          # e.g. the machine is closing: nothing to reset
            log.warning("guest reset not done: %s", exc)
        finally:
            self._pending = False
