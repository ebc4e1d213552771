"""The machine's run state: the states, ONE table of legal transitions, and the checks.

Modelled on QEMU's ``system/runstate.c`` (``runstate_transitions_def``): every change of
state goes through :meth:`RunStateTracker.set`, which refuses a change the table does not
list. Such a refusal is a programming error in hv (some code path forgot a state), so it
raises :class:`IllegalTransition` - deliberately not a :class:`MachineError` or
``ValueError``, which callers turn into a user-facing error line. What a user may ask for
in a given state (QMP ``stop`` while shut down, ``device_add`` while migrating in) is
checked with :meth:`RunStateTracker.require`, which raises :class:`MachineError` with the
text the client sees.

Lifecycle (QMP ``query-status`` names)::

    prelaunch --start--> running <--pause/resume--> paused
        |                   |                          |
        +-- inmigrate       +---- power-off/quit ----> shutdown
                            +---- migration done ----> postmigrate
"""
from __future__ import annotations

import enum
import threading
import time
from collections.abc import Mapping

from hv.errors import MachineError

__all__ = ["TRANSITIONS", "IllegalTransition", "MachineError", "RunState", "RunStateTracker"]


class RunState(str, enum.Enum):
    PRELAUNCH = "prelaunch"
    RUNNING = "running"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"
    INMIGRATE = "inmigrate"
    POSTMIGRATE = "postmigrate"
    INTERNAL_ERROR = "internal-error"


class IllegalTransition(Exception):
    """hv tried a run-state change :data:`TRANSITIONS` does not allow: a bug in hv, never
    the answer to bad input (so it is not a :class:`MachineError`)."""


_S = RunState
#: state -> the states it may change to. A state missing on the right cannot be entered
#: from the state on the left. Self-transitions are listed where hv makes them.
TRANSITIONS: Mapping[RunState, frozenset[RunState]] = {
    # -S waits in prelaunch; -incoming marks inmigrate; a migration may start before 'cont'.
    _S.PRELAUNCH: frozenset({_S.PRELAUNCH, _S.RUNNING, _S.PAUSED, _S.INMIGRATE, _S.POSTMIGRATE, _S.SHUTDOWN}),
    # The incoming machine starts (running, or paused) once the stream is in. Its vCPU
    # threads exist from the moment it is marked inmigrate, parked (Machine.prepare_vcpus):
    # no state of its own, as the guest cannot run in inmigrate; 'start' lets them run.
    _S.INMIGRATE: frozenset({_S.RUNNING, _S.PAUSED, _S.PRELAUNCH, _S.SHUTDOWN}),
    _S.RUNNING: frozenset({_S.PAUSED, _S.SHUTDOWN}),
    _S.PAUSED: frozenset({_S.RUNNING, _S.POSTMIGRATE, _S.SHUTDOWN}),
    # A second migration may leave a migrated-out machine again (postmigrate -> postmigrate).
    _S.POSTMIGRATE: frozenset({_S.POSTMIGRATE, _S.RUNNING, _S.SHUTDOWN}),
    # Terminal, except that a migration running when the guest shut down still ends
    # (QEMU: shutdown -> finish-migrate -> postmigrate).
    _S.SHUTDOWN: frozenset({_S.POSTMIGRATE}),
    _S.INTERNAL_ERROR: frozenset({_S.PAUSED, _S.SHUTDOWN}),
}

#: The text :meth:`RunStateTracker.require` gives by default.
NOT_POSSIBLE = "{command}: not possible while the VM is in state '{state}'"


def check_transition(old: RunState, new: RunState) -> None:
    """Raise :class:`IllegalTransition` unless the table allows ``old`` -> ``new``."""
    if new not in TRANSITIONS[old]:
        raise IllegalTransition(f"run state cannot change from {old.value} to {new.value}")


class RunStateTracker:
    """The machine's run state and the big lock that guards it (and every device).

    ``changed`` is notified on every change; vCPU threads, the interrupt controller's
    timer thread and waiters of :meth:`wait_shutdown` sleep on it. ``closing`` is set once
    by the machine's ``close`` and never cleared.
    """

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._state = RunState.PRELAUNCH
        self.closing = False
        self.shutdown_reason: str | None = None
        # Set once the SHUTDOWN event has gone to the listeners: wait_shutdown returns only
        # then, so whoever ends hv (and closes the QMP server) cannot drop the event.
        self.shutdown_announced = False

    @property
    def state(self) -> RunState:
        return self._state

    @property
    def running(self) -> bool:
        return self._state is RunState.RUNNING

    def set(self, new: RunState) -> None:
        """Change to ``new`` (big lock held by the caller or taken here) as the table allows."""
        with self.lock:
            check_transition(self._state, new)
            self._state = new
            self.changed.notify_all()

    def require(self, command: str, *allowed: RunState, message: str = NOT_POSSIBLE) -> RunState:
        """Raise :class:`MachineError` unless the state is one of ``allowed``; the state.

        ``message`` may use ``{command}`` and ``{state}`` (the state's QMP name). QMP
        handlers turn the error into a GenericError carrying this text.
        """
        state = self._state
        if state not in allowed:
            raise MachineError(message.format(command=command, state=state.value))
        return state

    def shut_down(self, reason: str) -> bool:
        """Enter ``shutdown`` for ``reason``; False if the machine already shut down."""
        with self.lock:
            if self.shutdown_reason is not None:
                return False
            self.shutdown_reason = reason
            if self._state is not RunState.SHUTDOWN:
                self.set(RunState.SHUTDOWN)
            return True

    def announce_shutdown(self) -> None:
        """The SHUTDOWN event has been emitted: release :meth:`wait_shutdown`."""
        with self.lock:
            self.shutdown_announced = True
            self.changed.notify_all()

    def wait_shutdown(self, timeout: float | None = None) -> str | None:
        """Block until the machine has shut down and announced it (the SHUTDOWN event is
        with the listeners); the reason, or None on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.lock:
            while self.shutdown_reason is None or not self.shutdown_announced:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self.changed.wait(remaining)
            return self.shutdown_reason
