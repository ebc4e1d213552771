"""Small interfaces injected into devices (after rust-vmm vm-superio)."""
from __future__ import annotations

from typing import Protocol


class InterruptLine(Protocol):
    """A level-triggered interrupt line a device raises and lowers."""

    def set_level(self, level: bool) -> None: ...


class UnconnectedLine:
    """An interrupt line wired to nothing: the machine has no controller for it yet.

    The device model still computes its interrupt state exactly (it is part of the
    saved state); the level simply reaches no CPU. Guests of this machine poll.
    """

    def __init__(self) -> None:
        self.level = False

    def set_level(self, level: bool) -> None:
        self.level = level


class OutputSink(Protocol):
    """Where a console device sends the bytes the guest writes."""

    def write(self, data: bytes) -> None: ...


class DeviceStateError(ValueError):
    """A saved device state is malformed or from an incompatible version."""
