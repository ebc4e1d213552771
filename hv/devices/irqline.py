"""Shared (wire-OR'd) interrupt lines.

PCI INTx pins are open-drain: several functions may drive one interrupt-controller input,
which is high while *any* of them asserts it. :class:`SharedLine` combines the outputs of
its :class:`SharedLineInput` s (one per device) onto one target line: every change of an
input forwards the OR of all inputs, so one device lowering its output never drops a
neighbour's level, and the target converges whatever order devices are restored in.

The per-input levels are not saved state: each device re-drives its output when it is
restored (virtio-pci does), and the target's own level lives in the saved interrupt
controller.
"""
from __future__ import annotations

import logging
import threading
from typing import Any

from hv.devices.interfaces import InterruptLine
from hv.errors import DeviceError

log = logging.getLogger(__name__)


class SharedLineError(DeviceError, ValueError):
    """An input of a shared interrupt line was attached twice or used after it left."""


class SharedLine:
    """One controller input driven by several devices (wire-OR).

    ``lock`` serialises the inputs and the call into ``target``; pass the machine's big
    lock (re-entrant), since devices call :meth:`SharedLineInput.set_level` with or
    without it held. ``name`` is for logs (``"spi35"``, ``"gsi16"``).
    """

    def __init__(self, target: InterruptLine, lock: Any | None = None, name: str = "line") -> None:
        self.target = target
        self.name = name
        self._lock = lock if lock is not None else threading.RLock()
        self._levels: dict[Any, bool] = {}

    @property
    def level(self) -> bool:
        """The combined level (what the target was last driven to, once an input changed)."""
        with self._lock:
            return any(self._levels.values())

    @property
    def inputs(self) -> list[Any]:
        with self._lock:
            return list(self._levels)

    def attach(self, key: Any) -> SharedLineInput:
        """A new input called ``key`` (e.g. a devfn), low until its device raises it."""
        with self._lock:
            if key in self._levels:
                raise SharedLineError(f"{self.name}: input {key!r} is already attached")
            self._levels[key] = False
            return SharedLineInput(self, key)

    def detach(self, key: Any) -> None:
        """Remove input ``key`` (a device unplugged); its level no longer counts."""
        with self._lock:
            if self._levels.pop(key, None) is None:
                raise SharedLineError(f"{self.name}: no input {key!r}")
            self.target.set_level(any(self._levels.values()))

    def drive(self, key: Any, level: bool) -> None:
        with self._lock:
            if key not in self._levels:
                # A detached device still holding its old input: ignore, it is gone.
                log.debug("%s: input %r is detached; level %s ignored", self.name, key, level)
                return
            self._levels[key] = bool(level)
            self.target.set_level(any(self._levels.values()))


class SharedLineInput:
    """One device's output onto a :class:`SharedLine` (an ``InterruptLine``)."""

    def __init__(self, line: SharedLine, key: Any) -> None:
        self.line = line
        self.key = key

    @property
    def level(self) -> bool:
        """This input's own level (not the combined one)."""
        with self.line._lock:
            return self.line._levels.get(self.key, False)

    def set_level(self, level: bool) -> None:
        self.line.drive(self.key, level)
