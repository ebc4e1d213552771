"""Address decoding: maps port or MMIO ranges to devices' register files."""
from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from typing import Protocol

from hv.errors import DeviceError

log = logging.getLogger(__name__)


class RegisterFile(Protocol):
    def read(self, offset: int, size: int) -> int: ...

    def write(self, offset: int, size: int, value: int) -> None: ...


class BusError(DeviceError, ValueError):
    """A device range overlaps another one or is empty."""


@dataclass(frozen=True)
class BusRange:
    base: int
    size: int
    device: RegisterFile
    name: str


class Bus:
    """Ranges sorted by base; an access hits the range containing its first byte.

    Reads of nothing return all ones (an open bus) and writes to nothing are dropped,
    as on real hardware; both are logged once per address at debug level.
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._ranges: list[BusRange] = []
        self._bases: list[int] = []
        self._reported: set[int] = set()

    def add(self, base: int, size: int, device: RegisterFile, name: str) -> None:
        if size <= 0:
            raise BusError(f"{self.kind} range for {name} is empty")
        for other in self._ranges:
            if base < other.base + other.size and other.base < base + size:
                raise BusError(f"{self.kind} range {base:#x}+{size:#x} of {name} overlaps {other.name}")
        index = bisect.bisect(self._bases, base)
        self._ranges.insert(index, BusRange(base, size, device, name))
        self._bases.insert(index, base)

    def find(self, addr: int) -> BusRange | None:
        index = bisect.bisect(self._bases, addr) - 1
        if index >= 0:
            candidate = self._ranges[index]
            if addr < candidate.base + candidate.size:
                return candidate
        return None

    def read(self, addr: int, size: int) -> int:
        hit = self.find(addr)
        if hit is None:
            self._unhandled("read", addr, size)
            return (1 << (8 * size)) - 1
        return hit.device.read(addr - hit.base, size) & ((1 << (8 * size)) - 1)

    def write(self, addr: int, size: int, value: int) -> None:
        hit = self.find(addr)
        if hit is None:
            self._unhandled("write", addr, size)
            return
        hit.device.write(addr - hit.base, size, value)

    def _unhandled(self, what: str, addr: int, size: int) -> None:
        if addr not in self._reported and len(self._reported) < 256:
            self._reported.add(addr)
            log.debug("unhandled %s %s of %d bytes at %#x", self.kind, what, size, addr)
