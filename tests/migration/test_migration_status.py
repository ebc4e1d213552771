"""The migration status machine and the shapes of query-migrate."""
from __future__ import annotations

import threading

import pytest

from hv.migration.status import LEGAL_TRANSITIONS, IllegalTransition, MigrationStatus, State

RAM_KEYS = {"transferred", "remaining", "total", "duplicate", "normal", "normal-bytes", "dirty-pages-rate",
            "mbps", "dirty-sync-count", "page-size"}


class Clock:
    """A clock the test advances by hand (seconds)."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def machine() -> tuple[MigrationStatus, Clock, list[str]]:
    clock = Clock()
    status = MigrationStatus(clock=clock)
    events: list[str] = []
    status.add_listener(events.append)
    return status, clock, events


def drive(status: MigrationStatus, target: State) -> None:
    """Bring a fresh machine to ``target`` through legal transitions."""
    if target is State.NONE:
        return
    status.start(1 << 20)
    if target is State.SETUP:
        return
    if target is State.CANCELED:
        status.cancel()
        return
    if target is State.FAILED:
        status.fail("boom")
        return
    status.activate()
    if target is State.COMPLETED:
        status.complete()


def test_initial_state_is_none() -> None:
    status, _clock, events = machine()
    assert status.status == "none"
    assert status.to_qmp() == {"status": "none"}
    assert not status.is_active()
    assert events == []


def test_full_successful_migration_shapes() -> None:
    status, clock, events = machine()
    status.start(256 << 20)
    assert status.is_active()
    clock.now += 0.010
    setup = status.to_qmp()
    assert setup["status"] == "setup" and setup["total-time"] == 10
    assert "setup-time" not in setup and "downtime" not in setup
    assert setup["expected-downtime"] == 0
    assert set(setup["ram"]) == RAM_KEYS
    assert setup["ram"]["total"] == setup["ram"]["remaining"] == 256 << 20

    status.activate()
    status.set_expected_downtime(42)
    status.record_ram(zero=100, normal=50, wire_bytes=50 * 4096 + 700)
    clock.now += 0.5
    status.end_round(dirty_pages=2000, seconds=0.5)
    status.record_bytes(300)
    active = status.to_qmp()
    assert active["status"] == "active"
    assert active["setup-time"] == 10 and active["total-time"] == 510
    assert active["expected-downtime"] == 42
    ram = active["ram"]
    assert ram["duplicate"] == 100 and ram["normal"] == 50 and ram["normal-bytes"] == 50 * 4096
    assert ram["transferred"] == 50 * 4096 + 1000
    assert ram["dirty-sync-count"] == 1 and ram["dirty-pages-rate"] == 4000
    assert ram["remaining"] == 2000 * 4096 and ram["page-size"] == 4096
    assert ram["mbps"] == round((50 * 4096 + 1000) * 8 / 1e6 / 0.5, 3)
    assert "cpu-throttle-percentage" not in active

    status.set_throttle(20)
    assert status.to_qmp()["cpu-throttle-percentage"] == 20
    status.set_throttle(None)
    assert "cpu-throttle-percentage" not in status.to_qmp()

    status.guest_paused()
    clock.now += 0.025
    status.complete()
    done = status.to_qmp()
    assert done["status"] == "completed"
    assert done["downtime"] == 25 and done["total-time"] == 535 and done["setup-time"] == 10
    assert "expected-downtime" not in done and "error-desc" not in done
    assert done["ram"]["remaining"] == 0
    clock.now += 10  # frozen once finished
    assert status.to_qmp() == done
    assert events == ["setup", "active", "completed"]


def test_failed_carries_error_desc() -> None:
    status, clock, events = machine()
    status.start(4096)
    status.activate()
    status.fail("memory size mismatch: source 256 MiB, destination 512 MiB")
    out = status.to_qmp()
    assert out["status"] == "failed"
    assert out["error-desc"] == "memory size mismatch: source 256 MiB, destination 512 MiB"
    assert status.error_desc == out["error-desc"]
    assert "downtime" not in out and "expected-downtime" not in out
    assert events == ["setup", "active", "failed"]


def test_fail_during_setup_connect_refused() -> None:
    status, _clock, events = machine()
    status.start(4096)
    status.fail("cannot connect to tcp:127.0.0.1:1: Connection refused")
    assert status.to_qmp()["error-desc"].endswith("Connection refused")
    assert "setup-time" not in status.to_qmp()
    assert events == ["setup", "failed"]


def test_cancel_in_setup_and_active() -> None:
    for phase in (State.SETUP, State.ACTIVE):
        status, _clock, events = machine()
        drive(status, phase)
        status.cancel()
        out = status.to_qmp()
        assert out["status"] == "canceled" and "error-desc" not in out
        assert events[-1] == "canceled"


@pytest.mark.parametrize("terminal", [State.COMPLETED, State.FAILED, State.CANCELED])
def test_new_migration_after_a_finished_one_resets_statistics(terminal: State) -> None:
    status, _clock, events = machine()
    drive(status, terminal)
    status.record_ram(normal=5, wire_bytes=5000)
    status.start(8192)
    out = status.to_qmp()
    assert out["status"] == "setup"
    assert out["ram"]["transferred"] == 0 and out["ram"]["total"] == 8192
    assert "error-desc" not in out
    assert events[-1] == "setup"


ALL = list(State)
ACTIONS = {
    State.SETUP: lambda s: s.start(4096),
    State.ACTIVE: lambda s: s.activate(),
    State.COMPLETED: lambda s: s.complete(),
    State.FAILED: lambda s: s.fail("x"),
    State.CANCELED: lambda s: s.cancel(),
}


@pytest.mark.parametrize("source", ALL, ids=[s.value for s in ALL])
@pytest.mark.parametrize("target", list(ACTIONS), ids=[s.value for s in ACTIONS])
def test_every_transition_is_legal_or_refused_without_change(source: State, target: State) -> None:
    status, _clock, events = machine()
    drive(status, source)
    before_events = list(events)
    before = status.to_qmp()
    if target in LEGAL_TRANSITIONS[source]:
        ACTIONS[target](status)
        assert status.state is target
        assert events == before_events + [target.value]
    else:
        with pytest.raises(IllegalTransition, match=f"cannot change from {source.value} to {target.value}"):
            ACTIONS[target](status)
        assert status.state is source
        assert events == before_events
        assert status.to_qmp() == before


def test_legal_transition_table_is_exactly_the_documented_one() -> None:
    assert {s.value: sorted(t.value for t in targets) for s, targets in LEGAL_TRANSITIONS.items()} == {
        "none": ["setup"],
        "setup": ["active", "canceled", "failed"],
        "active": ["canceled", "completed", "failed"],
        "completed": ["setup"],
        "failed": ["setup"],
        "canceled": ["setup"],
    }


def test_guest_pause_only_while_active_and_explicit_downtime() -> None:
    status, _clock, _events = machine()
    with pytest.raises(IllegalTransition, match="guest pause recorded while none"):
        status.guest_paused()
    drive(status, State.ACTIVE)
    status.complete(downtime_ms=7)
    assert status.to_qmp()["downtime"] == 7


def test_throttle_bounds() -> None:
    status, _clock, _events = machine()
    with pytest.raises(ValueError, match="outside 0-99"):
        status.set_throttle(100)


def test_listener_may_read_status_and_removal() -> None:
    status, _clock, _events = machine()
    seen: list[dict] = []
    listener = lambda s: seen.append(status.to_qmp())  # noqa: E731 - re-entrant read from the callback
    status.add_listener(listener)
    status.start(4096)
    status.remove_listener(listener)
    status.activate()
    assert [s["status"] for s in seen] == ["setup"]


def test_concurrent_updates_and_reads_are_consistent() -> None:
    status = MigrationStatus()
    status.start(1 << 30)
    status.activate()
    stop = threading.Event()
    snapshots: list[dict] = []
    torn: list[dict] = []

    def reader() -> None:
        while not stop.is_set():
            out = status.to_qmp()
            ram = out["ram"]
            # Each record_ram adds zero=1, normal=2, 3 bytes atomically: never a torn view.
            if not (ram["normal"] == 2 * ram["duplicate"] and ram["transferred"] == 3 * ram["duplicate"]
                    and ram["normal-bytes"] == ram["normal"] * 4096):
                torn.append(out)
            snapshots.append(out)

    threads = [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    writers = [threading.Thread(target=lambda: [status.record_ram(zero=1, normal=2, wire_bytes=3)
                                                for _ in range(5000)]) for _ in range(3)]
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    for t in threads:
        t.join()
    ram = status.to_qmp()["ram"]
    assert (ram["duplicate"], ram["normal"], ram["transferred"]) == (15000, 30000, 45000)
    assert snapshots and not torn


def test_auto_converge_trigger_is_qemus_rule() -> None:
    """A round counts against the guest when it dirtied more than half of what the round
    sent (QEMU's throttle-trigger-threshold 50); the engine throttles at the second."""
    from hv.memory import PAGE_SIZE
    from hv.migration.engine import HIGH_DIRTY_STRIKES, dirtied_too_fast
    sent = 1000 * PAGE_SIZE
    assert not dirtied_too_fast(500, sent)      # exactly half: the link keeps up
    assert dirtied_too_fast(501, sent)
    assert not dirtied_too_fast(0, 0)
    assert dirtied_too_fast(1, 0)               # dirtied while nothing could be sent
    assert HIGH_DIRTY_STRIKES == 2


def test_total_time_ends_when_the_migration_ended_not_after_its_cleanup() -> None:
    """The source completes the status after its cleanup (dirty log off, socket closed);
    total-time ends when the destination confirmed it runs the guest (``ended_at``)."""
    status, clock, _events = machine()
    status.start(1 << 20)
    status.activate()
    clock.now += 0.120
    ended = status.now()
    clock.now += 0.005                      # cleanup
    status.complete(7, ended_at=ended)
    reply = status.to_qmp()
    assert reply["total-time"] == 120 and reply["downtime"] == 7
    clock.now += 1.0
    assert status.to_qmp()["total-time"] == 120
