"""Parsers for the small values that options, QMP arguments and devices share.

Sizes (``256M``), PCI addresses (``1f.7``), MAC addresses (``52:54:00:12:34:56``) and
on/off switches are spelled the same on the command line, in QMP and in saved states, so
they are parsed in one place. This is a leaf module: it imports nothing from hv, so any
layer (config, devices, boards, back-ends) can use it without an import cycle.

Each parser raises :class:`ValueFormatError` (a ``ValueError``) whose message starts with
the value as given (``addr=...``, ``mac=...``); the caller turns it into its own layer's
error (``ConfigError``, ``PciError``...) and may prefix the option it came from.
"""
from __future__ import annotations

import re

__all__ = ["FUNCTIONS", "SLOTS", "ValueFormatError", "format_devfn", "format_mac", "parse_devfn", "parse_mac",
           "parse_on_off", "parse_size"]

SLOTS = 32        # devices on one PCI bus
FUNCTIONS = 8     # functions of one PCI device
MAC_RE = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}\Z")
_SIZE_RE = re.compile(r"(\d{1,12})\s*([kKmMgGtT]?)(?:i?[bB])?")
_SIZE_SHIFT = {"K": 10, "M": 20, "G": 30, "T": 40}


class ValueFormatError(ValueError):
    """A value is not spelled as its parser expects; callers re-raise it as their layer's
    :class:`hv.errors.HvError` (this module imports nothing from hv, so it cannot)."""


def parse_size(text: str, default_unit: str = "M") -> int:
    """``256`` (``default_unit``, MiB), ``256M``, ``256MiB``, ``1G``, ``524288K`` -> bytes."""
    match = _SIZE_RE.fullmatch(text.strip())
    if not match:
        raise ValueFormatError(f"invalid size {text!r} (examples: 256, 256M, 1G)")
    unit = match.group(2).upper() or default_unit
    return int(match.group(1)) << _SIZE_SHIFT[unit]


def parse_devfn(addr: str) -> tuple[int, int]:
    """``"N"`` or ``"N.F"`` (hex, optional 0x) -> (slot, function)."""
    parts = addr.split(".")
    if len(parts) > 2 or not all(parts):
        raise ValueFormatError(f"addr={addr}: expected SLOT or SLOT.FUNCTION")
    try:
        numbers = [int(p, 16) for p in parts]
    except ValueError:
        raise ValueFormatError(f"addr={addr}: not a hexadecimal slot[.function]") from None
    slot = numbers[0]
    function = numbers[1] if len(numbers) == 2 else 0
    if not 0 <= slot < SLOTS:
        raise ValueFormatError(f"addr={addr}: slot {slot:#x} out of range 0-0x1f")
    if not 0 <= function < FUNCTIONS:
        raise ValueFormatError(f"addr={addr}: function {function} out of range 0-7")
    return slot, function


def format_devfn(slot: int, function: int) -> str:
    """(slot, function) -> ``"1f.7"``, as QEMU's ``info pci`` shows it."""
    return f"{slot:02x}.{function}"


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes; multicast (group bit set) addresses are refused."""
    if not MAC_RE.match(text):
        raise ValueFormatError(f"mac={text}: expected six hex bytes like 52:54:00:12:34:56")
    mac = bytes(int(part, 16) for part in text.split(":"))
    if mac[0] & 1:
        raise ValueFormatError(f"mac={text}: a multicast address cannot be a NIC's address")
    return mac


def format_mac(mac: bytes) -> str:
    """6 bytes -> ``"52:54:00:12:34:56"`` (lower case, the form saved states compare)."""
    return ":".join(f"{b:02x}" for b in mac)


def parse_on_off(key: str, value: str) -> bool:
    """``on``/``true``/``yes`` -> True, ``off``/``false``/``no`` -> False (QEMU's spellings)."""
    if value in ("on", "true", "yes"):
        return True
    if value in ("off", "false", "no"):
        return False
    raise ValueFormatError(f"{key}={value}: expected on or off")
