"""The save/restore contract of device states (QEMU's vmstate ``version_id`` /
``minimum_version_id``).

Every device's state type is a dataclass with

* ``VERSION``: the layout this hv writes (and the number saved beside it);
* ``MIN_VERSION``: the oldest layout it still reads;
* ``to_dict()`` / ``from_dict(raw)``: plain values for the current layout, ``from_dict``
  refusing anything malformed with :class:`~hv.errors.DeviceStateError`;
* when ``MIN_VERSION < VERSION``, ``upgrade(raw, version)``: an older layout's plain values
  turned into the current layout's (checked again by ``from_dict``).

:func:`restore_state` is the one place a saved ``{"version", "state"}`` record is read: a
version outside ``[MIN_VERSION, VERSION]`` is refused with one line naming the device, the
version and the range this hv reads, before any state is parsed. Raising a version is
therefore a choice: a destination whose ``VERSION`` is older refuses the new layout, so
a field that an older hv can do without is better left out while empty (see SerialState).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, ClassVar, Protocol

from hv.devices.interfaces import checked_uint_list
from hv.errors import DeviceStateError

__all__ = ["DeviceState", "check_fields", "check_version", "checked_uart_rx", "omit_default_later_fields",
           "plain_dict", "restore_state", "state_record"]


class DeviceState(Protocol):
    """What a device's state type provides (see the module docstring)."""

    VERSION: ClassVar[int]
    MIN_VERSION: ClassVar[int]

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, raw: Any) -> Any: ...


def check_version(state_type: type, version: Any, what: str) -> int:
    """``version`` if ``state_type`` reads it (an int in ``[MIN_VERSION, VERSION]``), else
    :class:`DeviceStateError`: ``"<what>: unsupported state version V (this hv reads A-B)"``."""
    low, high = state_type.MIN_VERSION, state_type.VERSION   # type: ignore[attr-defined]
    if isinstance(version, bool) or not isinstance(version, int) or not low <= version <= high:
        shown = version if isinstance(version, int) and not isinstance(version, bool) else type(version).__name__
        supported = f"{low}" if low == high else f"{low}-{high}"
        raise DeviceStateError(f"{what}: unsupported state version {shown} (this hv reads version {supported})")
    return version


def restore_state(state_type: type, record: Any, what: str) -> Any:
    """A saved ``{"version": V, "state": {...}}`` record -> a ``state_type`` instance.

    Refuses an unsupported version or a malformed state with :class:`DeviceStateError`
    naming ``what``; an older supported layout goes through ``state_type.upgrade`` first.
    """
    if not isinstance(record, dict):
        raise DeviceStateError(f"{what}: a saved state is {{version, state}}, not {type(record).__name__}")
    version = check_version(state_type, record.get("version"), what)
    raw = record.get("state")
    if version < state_type.VERSION:   # type: ignore[attr-defined]
        raw = state_type.upgrade(raw, version)   # type: ignore[attr-defined]
    return state_type.from_dict(raw)   # type: ignore[attr-defined]


def state_record(state: Any) -> dict[str, Any]:
    """``state`` as the record :func:`restore_state` reads: its type's VERSION and values."""
    return {"version": type(state).VERSION, "state": state.to_dict()}


_SHARED = (int, bool, str, float, type(None))   # immutable: the copy may share them


_FIELD_NAMES: dict[type, tuple[str, ...]] = {}   # per state type, as dataclasses.fields gives them


def _field_names(cls: type) -> tuple[str, ...]:
    names = _FIELD_NAMES.get(cls)
    if names is None:
        names = _FIELD_NAMES[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return names


def plain_dict(state: Any) -> dict[str, Any]:
    """``dataclasses.asdict(state)``, equal value for value, without its per-value
    ``deepcopy`` and ``fields()`` walk: a state is saved while the guest is paused for a
    migration's switch-over, and asdict took 134 us for a vCPU state and 230 us for the
    q35 devices (91 us the RTC alone), this a quarter of that. Nested dataclasses, lists,
    tuples and dicts are copied; other values are deep-copied as asdict does."""
    return {name: _plain(getattr(state, name)) for name in _field_names(type(state))}


def _plain(value: Any) -> Any:
    kind = type(value)
    if kind in _SHARED:
        return value
    if kind is list:
        return [_plain(item) for item in value]
    if kind is dict:
        return {_plain(key): _plain(item) for key, item in value.items()}
    if kind is tuple:
        return tuple(_plain(item) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return plain_dict(value)
    return copy.deepcopy(value)


def check_fields(raw: Any, base: tuple[str, ...], later: dict[str, Any], what: str) -> dict[str, Any]:
    """``raw`` if it is a dict holding every field of ``base`` and nothing beyond ``base``
    and ``later`` (fields added after the first layout, absent in older states), else
    :class:`DeviceStateError` ``"<what>: wrong fields"``."""
    if not isinstance(raw, dict) or not set(base) <= set(raw) <= set(base) | set(later):
        raise DeviceStateError(f"{what}: wrong fields")
    return raw


def omit_default_later_fields(raw: dict[str, Any], later: dict[str, Any]) -> dict[str, Any]:
    """``raw`` without the later-added fields that hold their default: a state that needs
    none of them is one an older hv (which has no such fields) still loads."""
    for name, default in later.items():
        if name in raw and raw[name] == default:
            del raw[name]
    return raw


def checked_uart_rx(raw: dict[str, Any], what: str, fifo_max: int, pending_max: int) -> tuple[list[int], list[int]]:
    """A UART state's received bytes: ``rx_fifo`` (at most ``fifo_max``) and the optional
    ``rx_pending`` (at most ``pending_max``), each a list of bytes, checked."""
    fifo = checked_uint_list(raw["rx_fifo"], 0x100, f"{what}: bad rx_fifo", max_length=fifo_max)
    pending = checked_uint_list(raw.get("rx_pending", []), 0x100, f"{what}: bad rx_pending", max_length=pending_max)
    return fifo, pending
