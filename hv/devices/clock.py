"""The guest's virtual clock: nanoseconds of guest time, the time base of hv's timers.

Guest time advances with the host's monotonic clock while the machine runs and stands
still while it is paused (or not yet started), so a guest never sees time jump over a
pause, a snapshot or the downtime of a migration. Its value is part of the saved machine
state: a restored clock continues from the saved value, so time seen by the guest (the
local APIC timer's current count, timer deadlines) never goes backwards when a guest moves
to another backend or host.

All timer deadlines in hv's interrupt controllers are absolute guest nanoseconds of this
clock, which makes them exact across migration.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hv.devices.interfaces import checked_fields, checked_uint
from hv.devices.persist import plain_dict

MAX_NS = (1 << 63) - 1


@dataclass
class ClockState:
    """The clock's value in guest nanoseconds at the moment it was saved."""

    ns: int = 0

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return plain_dict(self)

    @classmethod
    def from_dict(cls, raw: Any) -> ClockState:
        raw = checked_fields(raw, cls, "clock")
        return cls(checked_uint(raw["ns"], MAX_NS + 1, "clock state: ns out of range"))


class GuestClock:
    """A monotonic nanosecond clock that runs only while the machine runs.

    ``host_ns`` is the host time source (``time.monotonic_ns`` unless a test injects a
    fake one). Thread-safe.
    """

    def __init__(self, host_ns: Callable[[], int] = time.monotonic_ns) -> None:
        self._host_ns = host_ns
        self._lock = threading.Lock()
        self._base = 0              # guest ns at _anchor (or the frozen value)
        self._anchor = 0            # host ns when the clock last started
        self._running = False

    @property
    def running(self) -> bool:
        return self._running

    def now(self) -> int:
        """Current guest time in nanoseconds (never smaller than an earlier result)."""
        with self._lock:
            if not self._running:
                return self._base
            return self._base + max(0, self._host_ns() - self._anchor)

    def set_running(self, running: bool) -> bool:
        """Start or stop the clock; True if that changed anything."""
        with self._lock:
            if running == self._running:
                return False
            now = self._host_ns()
            if running:
                self._anchor = now
            else:
                self._base += max(0, now - self._anchor)
            self._running = running
            return True

    def timeline(self) -> tuple[int, int | None]:
        """``(guest_ns, host_ns)``: the clock reads ``guest_ns + (host - host_ns)`` at host
        monotonic time ``host`` while it runs (host_ns None: it stands at guest_ns). For
        counters kept outside Python (Unicorn x86's RDTSC hook) that must read exactly
        this clock, on every vCPU alike."""
        with self._lock:
            return (self._base, self._anchor) if self._running else (self._base, None)

    def host_delay(self, guest_deadline: int) -> float | None:
        """Seconds of host time until guest time reaches ``guest_deadline`` (0 if it has),
        or None while the clock stands still."""
        with self._lock:
            if not self._running:
                return None
            now = self._base + max(0, self._host_ns() - self._anchor)
        return max(0, guest_deadline - now) / 1e9

    # -- persistence ------------------------------------------------------------------
    def save(self) -> ClockState:
        return ClockState(self.now())

    def restore(self, state: ClockState) -> None:
        with self._lock:
            self._base = state.ns
            self._anchor = self._host_ns()
