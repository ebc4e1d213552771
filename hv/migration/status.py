"""The migration status machine and the statistics ``query-migrate`` reports.

States and names are QEMU's, lower-case on the wire::

    none --start--> setup --activate--> active --complete--> completed
                      |                   |
                      +--fail/cancel------+--fail/cancel--> failed / canceled
    completed, failed, canceled --start--> setup    (a new migration)

Any other transition raises :class:`IllegalTransition` and changes nothing. Every change
calls the listeners with the new status (the machine emits the QMP ``MIGRATION`` event
from there). One instance is updated by the migration thread and read by the QMP thread:
every method takes the same lock. Listeners run under that (re-entrant) lock so events
are delivered in transition order; they may call :meth:`MigrationStatus.to_qmp` but must
not block on another thread that uses this object.
"""
from __future__ import annotations

import enum
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

PAGE_SIZE = 4096


class State(str, enum.Enum):
    NONE = "none"
    SETUP = "setup"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELED = "canceled"


TERMINAL = frozenset({State.COMPLETED, State.FAILED, State.CANCELED})
LEGAL_TRANSITIONS: dict[State, frozenset[State]] = {
    State.NONE: frozenset({State.SETUP}),
    State.SETUP: frozenset({State.ACTIVE, State.FAILED, State.CANCELED}),
    State.ACTIVE: frozenset({State.COMPLETED, State.FAILED, State.CANCELED}),
    State.COMPLETED: frozenset({State.SETUP}),
    State.FAILED: frozenset({State.SETUP}),
    State.CANCELED: frozenset({State.SETUP}),
}


class IllegalTransition(RuntimeError):
    """A migration status change that the state machine does not allow."""


Listener = Callable[[str], None]


@dataclass
class RamCounters:
    """Cumulative RAM statistics of the current migration."""

    transferred: int = 0  # bytes on the wire, framing included
    total: int = 0  # guest RAM bytes
    remaining: int = 0  # bytes still dirty / not yet sent
    duplicate: int = 0  # zero pages sent as markers
    normal: int = 0  # pages sent with their contents
    dirty_pages_rate: int = 0  # pages dirtied per second in the last round
    dirty_sync_count: int = 0  # dirty bitmap syncs (rounds) so far


class MigrationStatus:
    """Thread-safe status + statistics for one VM's migrations (source or destination)."""

    def __init__(self, *, page_size: int = PAGE_SIZE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.RLock()
        self._clock = clock
        self._page_size = page_size
        self._listeners: list[Listener] = []
        self._state = State.NONE
        self._reset()

    def _reset(self) -> None:
        self.ram = RamCounters()
        self._start: float | None = None
        self._active_at: float | None = None
        self._paused_at: float | None = None
        self._end: float | None = None
        self._setup_ms: int | None = None
        self._downtime_ms: int | None = None
        self._expected_downtime_ms: int | None = None
        self._throttle: int | None = None
        self._error: str | None = None
        self._mbps_last: float = 0.0
        self._converging: bool | None = None  # unknown until two dirty rounds compare

    # -- state --------------------------------------------------------------------------
    @property
    def state(self) -> State:
        with self._lock:
            return self._state

    @property
    def status(self) -> str:
        return self.state.value

    @property
    def error_desc(self) -> str | None:
        with self._lock:
            return self._error

    def is_active(self) -> bool:
        """True in setup or active: a migration is in progress."""
        with self._lock:
            return self._state in (State.SETUP, State.ACTIVE)

    def add_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.append(listener)

    def remove_listener(self, listener: Listener) -> None:
        with self._lock:
            self._listeners.remove(listener)

    def _transition(self, new: State) -> None:
        # Caller holds the lock.
        if new not in LEGAL_TRANSITIONS[self._state]:
            raise IllegalTransition(f"migration status cannot change from {self._state.value} to {new.value}")
        self._state = new
        for listener in list(self._listeners):
            listener(new.value)

    def start(self, total_bytes: int) -> None:
        """none/completed/failed/canceled -> setup; resets every statistic."""
        with self._lock:
            if State.SETUP not in LEGAL_TRANSITIONS[self._state]:
                raise IllegalTransition(f"migration status cannot change from {self._state.value} to setup")
            self._reset()
            self._start = self._clock()
            self.ram.total = total_bytes
            self.ram.remaining = total_bytes
            self._transition(State.SETUP)

    def connected(self) -> None:
        """Destination, in setup: the source connected. The clocks restart here, so
        ``setup-time`` and ``total-time`` measure the migration, not the wait for it."""
        with self._lock:
            if self._state is not State.SETUP:
                raise IllegalTransition(f"connection recorded while {self._state.value}")
            self._start = self._clock()

    def activate(self) -> None:
        """setup -> active (connection made, configuration accepted)."""
        with self._lock:
            self._transition(State.ACTIVE)
            self._active_at = self._clock()
            assert self._start is not None
            self._setup_ms = _ms(self._active_at - self._start)

    def guest_paused(self) -> None:
        """The source paused the guest for the final round: downtime starts now."""
        with self._lock:
            if self._state is not State.ACTIVE:
                raise IllegalTransition(f"guest pause recorded while {self._state.value}")
            self._paused_at = self._clock()

    def now(self) -> float:
        """This status's clock (what :meth:`complete`'s ``ended_at`` is read on)."""
        return self._clock()

    def complete(self, downtime_ms: int | None = None, *, ended_at: float | None = None) -> None:
        """active -> completed. Downtime is measured from :meth:`guest_paused` unless given;
        ``ended_at`` (from :meth:`now`): when the migration ended, if cleanup came between
        that and this call (``total-time`` ends there)."""
        with self._lock:
            if State.COMPLETED not in LEGAL_TRANSITIONS[self._state]:
                raise IllegalTransition(f"migration status cannot change from {self._state.value} to completed")
            self._end = self._clock() if ended_at is None else ended_at
            if downtime_ms is not None:
                self._downtime_ms = downtime_ms
            elif self._paused_at is not None:
                self._downtime_ms = _ms(self._end - self._paused_at)
            else:
                self._downtime_ms = 0
            self.ram.remaining = 0
            self._mbps_last = self._mbps_now()
            self._transition(State.COMPLETED)

    def fail(self, error_desc: str) -> None:
        """setup/active -> failed, with the reason ``query-migrate`` shows as error-desc."""
        with self._lock:
            if State.FAILED not in LEGAL_TRANSITIONS[self._state]:
                raise IllegalTransition(f"migration status cannot change from {self._state.value} to failed")
            self._end = self._clock()
            self._error = error_desc
            self._mbps_last = self._mbps_now()
            self._transition(State.FAILED)

    def cancel(self) -> None:
        """setup/active -> canceled."""
        with self._lock:
            if State.CANCELED not in LEGAL_TRANSITIONS[self._state]:
                raise IllegalTransition(f"migration status cannot change from {self._state.value} to canceled")
            self._end = self._clock()
            self._mbps_last = self._mbps_now()
            self._transition(State.CANCELED)

    # -- statistics ----------------------------------------------------------------------
    def record_ram(self, *, zero: int = 0, normal: int = 0, wire_bytes: int = 0) -> None:
        """Pages sent (source) or received (destination) and their bytes on the wire."""
        with self._lock:
            self.ram.duplicate += zero
            self.ram.normal += normal
            self.ram.transferred += wire_bytes
            self.ram.remaining = max(0, self.ram.remaining - (zero + normal) * self._page_size)

    def record_bytes(self, wire_bytes: int) -> None:
        """Non-RAM bytes (config, CPU and device state) sent or received."""
        with self._lock:
            self.ram.transferred += wire_bytes

    def set_remaining(self, remaining_bytes: int) -> None:
        with self._lock:
            self.ram.remaining = max(0, remaining_bytes)

    def end_round(self, dirty_pages: int, seconds: float) -> None:
        """A dirty bitmap sync: ``dirty_pages`` found dirty after a round of ``seconds``."""
        with self._lock:
            self.ram.dirty_sync_count += 1
            self.ram.dirty_pages_rate = int(dirty_pages / seconds) if seconds > 0 else 0
            self.ram.remaining = dirty_pages * self._page_size

    def set_expected_downtime(self, ms: int) -> None:
        with self._lock:
            self._expected_downtime_ms = max(0, int(ms))

    def set_throttle(self, percent: int | None) -> None:
        """Auto-converge vCPU throttle (0-99), or None when not throttling."""
        with self._lock:
            if percent is not None and not 0 <= percent <= 99:
                raise ValueError(f"cpu throttle {percent}% outside 0-99")
            self._throttle = percent or None

    def set_converging(self, converging: bool) -> bool:
        """Record whether the dirty rounds shrink the dirty set; True if this changed it
        (the caller then announces the change, once)."""
        with self._lock:
            changed = self._converging is not converging
            self._converging = converging
            return changed

    def bandwidth(self) -> float:
        """Bytes per second since the transfer became active (0 before)."""
        with self._lock:
            if self._active_at is None:
                return 0.0
            end = self._end if self._end is not None else self._clock()
            elapsed = end - self._active_at
            return self.ram.transferred / elapsed if elapsed > 0 else 0.0

    def _mbps_now(self) -> float:
        if self._active_at is None:
            return 0.0
        end = self._end if self._end is not None else self._clock()
        elapsed = end - self._active_at
        return self.ram.transferred * 8 / 1e6 / elapsed if elapsed > 0 else 0.0

    def to_qmp(self) -> dict[str, Any]:
        """The ``query-migrate`` return value, QEMU's field names."""
        with self._lock:
            state = self._state
            out: dict[str, Any] = {"status": state.value}
            if state is State.NONE or self._start is None:
                return out
            end = self._end if self._end is not None else self._clock()
            out["total-time"] = _ms(end - self._start)
            if self._setup_ms is not None:
                out["setup-time"] = self._setup_ms
            if state is State.COMPLETED:
                out["downtime"] = self._downtime_ms or 0
            if state in (State.SETUP, State.ACTIVE):
                out["expected-downtime"] = self._expected_downtime_ms or 0
            mbps = self._mbps_now() if state not in TERMINAL else self._mbps_last
            ram = self.ram
            out["ram"] = {
                "transferred": ram.transferred,
                "remaining": ram.remaining,
                "total": ram.total,
                "duplicate": ram.duplicate,
                "normal": ram.normal,
                "normal-bytes": ram.normal * self._page_size,
                "dirty-pages-rate": ram.dirty_pages_rate,
                "mbps": round(mbps, 3),
                "dirty-sync-count": ram.dirty_sync_count,
                "page-size": self._page_size,
            }
            if state is State.FAILED and self._error is not None:
                out["error-desc"] = self._error
            if self._throttle is not None and state is State.ACTIVE:
                out["cpu-throttle-percentage"] = self._throttle
            if self._converging is not None and state is State.ACTIVE:
                out["converging"] = self._converging  # hv's own field (QEMU has none)
            return out


def _ms(seconds: float) -> int:
    return max(0, int(round(seconds * 1000)))
