"""The run-state table: every change hv makes is listed, anything else is a bug in hv
(IllegalTransition, never a MachineError a QMP client would see as bad input)."""
from __future__ import annotations

import threading

import pytest

from hv.machine.runstate import TRANSITIONS, IllegalTransition, MachineError, RunState, RunStateTracker


def test_table_covers_every_state() -> None:
    assert set(TRANSITIONS) == set(RunState)
    for targets in TRANSITIONS.values():
        assert targets <= set(RunState)
    # Every state but prelaunch (the start) and internal-error (never entered) can be reached.
    reachable = set().union(*TRANSITIONS.values())
    assert reachable == set(RunState) - {RunState.INTERNAL_ERROR}


def test_lifecycle_follows_the_table_and_refuses_the_rest() -> None:
    run = RunStateTracker()
    assert run.state is RunState.PRELAUNCH
    for state in (RunState.RUNNING, RunState.PAUSED, RunState.RUNNING):
        run.set(state)
        assert run.state is state
    with pytest.raises(IllegalTransition, match="from running to postmigrate") as info:
        run.set(RunState.POSTMIGRATE)
    assert not isinstance(info.value, (MachineError, ValueError))
    assert run.state is RunState.RUNNING            # refused: nothing changed
    assert run.shut_down("guest-shutdown") and not run.shut_down("host-qmp-quit")
    assert run.state is RunState.SHUTDOWN and run.wait_shutdown(0) is None   # not announced yet
    run.announce_shutdown()
    assert run.wait_shutdown(0) == "guest-shutdown"
    with pytest.raises(IllegalTransition):
        run.set(RunState.RUNNING)                   # shutdown is terminal ...
    run.set(RunState.POSTMIGRATE)                   # ... but a migration under way still ends


def test_require_names_command_and_state() -> None:
    run = RunStateTracker()
    assert run.require("cont", RunState.PRELAUNCH) is RunState.PRELAUNCH
    with pytest.raises(MachineError, match=r"^device_add: not possible while the VM is in state 'prelaunch'$"):
        run.require("device_add", RunState.RUNNING, RunState.PAUSED)
    with pytest.raises(MachineError, match=r"^'-incoming' was not specified on the command line$"):
        run.require("migrate-incoming", RunState.INMIGRATE, message="'-incoming' was not specified on the command line")
    assert run.wait_shutdown(0) is None


def test_wait_shutdown_returns_only_once_the_shutdown_event_is_with_the_listeners() -> None:
    """hv's main thread ends hv (closing the QMP server) when wait_shutdown returns; if it
    returned as soon as the state changed, a guest power-off racing it lost its SHUTDOWN
    event ("monitor closed" in test_monitor under load). A listener that has not finished
    receiving the event holds wait_shutdown back."""
    from tests.helpers import FIXTURES, machine_in_process

    machine, _ = machine_in_process("q35", "unicorn", FIXTURES / "x86_64" / "blk.elf", "", memory="16")
    entered, release = threading.Event(), threading.Event()
    got: list[str] = []

    def slow_listener(event: str, data: dict | None) -> None:
        if event == "SHUTDOWN":
            entered.set()
            assert release.wait(30)
            got.append(event)

    machine.add_listener(slow_listener)
    worker = threading.Thread(target=machine.request_shutdown, args=("guest-shutdown",))
    try:
        worker.start()
        assert entered.wait(30)
        assert machine.state is RunState.SHUTDOWN
        assert machine.wait_shutdown(0.05) is None      # the event is still on its way
        release.set()
        assert machine.wait_shutdown(30) == "guest-shutdown"
        assert got == ["SHUTDOWN"]
    finally:
        release.set()
        worker.join(30)
        machine.close()
