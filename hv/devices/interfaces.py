"""Small interfaces injected into devices (after rust-vmm vm-superio)."""
from __future__ import annotations

import dataclasses
from typing import Any, Protocol

from hv.errors import DeviceStateError

__all__ = ["DeviceStateError", "InterruptLine", "OutputSink", "UnconnectedLine", "checked_fields", "checked_uint",
           "checked_uint_list"]


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


def checked_fields(raw: Any, state_type: type, what: str) -> dict[str, Any]:
    """``raw`` as a dict holding exactly ``state_type``'s dataclass fields, else
    :class:`DeviceStateError` naming ``what`` (the device kind)."""
    names = {f.name for f in dataclasses.fields(state_type)}
    if not isinstance(raw, dict) or set(raw) != names:
        raise DeviceStateError(f"{what} state: wrong fields")
    return raw


def checked_uint(value: Any, limit: int, what: str) -> int:
    """``value`` if it is an int (not a bool) in ``[0, limit)``, else
    DeviceStateError(``what``), which names the device and field."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < limit:
        raise DeviceStateError(what)
    return value


def checked_uint_list(value: Any, limit: int, what: str, *, length: int | None = None,
                      max_length: int | None = None) -> list[int]:
    """A list of ints in ``[0, limit)``, of exactly ``length`` or at most ``max_length``
    items, else DeviceStateError(``what``)."""
    if (not isinstance(value, list) or (length is not None and len(value) != length)
            or (max_length is not None and len(value) > max_length)
            or any(isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < limit for v in value)):
        raise DeviceStateError(what)
    return list(value)
