"""In-process move: the precursor of live migration.

Pause a running machine, capture RAM + CPU + device state, build a fresh machine on a
backend of either kind, restore, resume. Everything crosses through the canonical,
backend-neutral forms (``MachineSnapshot`` and a fresh copy of RAM), exactly what the
migration stream carries, so a move exercises the same contract between backends.
"""
from __future__ import annotations

import logging

from hv.errors import MachineError
from hv.machine.machine import Machine, MachineSnapshot
from hv.machine.runstate import RunState
from hv.memory import GuestMemory
from hv_backends.base import Backend

log = logging.getLogger(__name__)

SHUTDOWN_ANNOUNCED = 10.0   # seconds a shut-down source may take to announce it


def copy_ram(source: GuestMemory, target: GuestMemory) -> None:
    """Copy every RAM region page-for-page (layouts must match)."""
    if [(r.gpa, r.size) for r in source.regions] != [(r.gpa, r.size) for r in target.regions]:
        raise ValueError("RAM layouts differ")
    for src, dst in zip(source.regions, target.regions, strict=True):
        dst.view[:] = src.view


def move_machine(machine: Machine, backend: Backend) -> Machine:
    """Move ``machine`` onto ``backend``; returns the new machine, the old one is closed.

    The new machine runs if the old one was running, and stays paused otherwise; a
    machine that has shut down (a guest power-off) stays shut down, with the same reason,
    as QEMU's migration destination takes its source's run state: started paused, it
    would never report the power-off that already happened (a caller's ``wait_shutdown``
    waited for ever).
    """
    was_running = machine.pause()
    reason = None
    if machine.state is RunState.SHUTDOWN:
        # Announced right after the state changed (once the listeners have the event);
        # the vCPU that powered off may still be leaving its run: wait until it parks.
        reason = machine.wait_shutdown(SHUTDOWN_ANNOUNCED)
        if reason is None:   # a copy started paused would hide the power-off: refuse
            raise MachineError(f"the guest powered off but the shutdown was not announced within "
                               f"{SHUTDOWN_ANNOUNCED:.0f} s; not moved")
        machine.runner.wait_parked()
    snapshot = MachineSnapshot.from_dict(machine.save().to_dict())  # through plain values
    fresh = Machine(machine.config, backend, machine.console)
    try:
        copy_ram(machine.memory, fresh.memory)
        fresh.restore(snapshot)
    except Exception:
        fresh.close()
        if was_running:
            machine.resume()
        raise
    fresh.kernel_image = machine.kernel_image
    if reason is not None:
        fresh.request_shutdown(reason)   # before the listeners: they had this SHUTDOWN already
    for listener in machine.listeners:
        fresh.add_listener(listener)
    machine.close()
    log.info("moved machine to %s", backend.name)
    fresh.start(paused=not was_running)
    return fresh
