"""virt's guest clock stops for a pause only once no vCPU is inside ``run``.

Unicorn vCPUs compute CNTVCT_EL0 natively from the clock's timeline (see
tests/backends/test_unicorn_arm64_counter.py). If the clock stopped while a vCPU was still
executing guest code, that vCPU could read a counter past the value the clock froze at, and
after a resume (or on a migration's destination) the guest would see its counter go back.
So :meth:`GicController.sync_clock` leaves the clock running while a vCPU is in ``run``;
the last vCPU out stops it. The sysreg handler hands the same timeline to the backend.
"""
from __future__ import annotations

import threading

from hv.machine.gic_interrupts import GicController


def controller(running: list[bool]) -> GicController:
    lock = threading.RLock()
    return GicController(2, lock, threading.Condition(lock), lambda index: None,
                         lambda: running[0], lambda: False)


def test_the_clock_stops_only_when_the_last_vcpu_leaves_run() -> None:
    running = [True]
    gic = controller(running)
    with gic._lock:
        gic.sync_clock()
        assert gic.clock.running
        gic._in_run[1] = True               # vCPU 1 is executing guest code
        running[0] = False                  # the machine pauses
        gic.sync_clock()
        assert gic.clock.running            # vCPU 1 may still read the counter
        gic._in_run[1] = False              # vCPU 1 leaves run (after_run)
        gic.sync_clock()
        assert not gic.clock.running
        frozen = gic.clock.now()
        running[0] = True
        gic.sync_clock()
        assert gic.clock.running and gic.clock.now() >= frozen


def test_the_handler_offers_the_clocks_timeline() -> None:
    running = [True]
    gic = controller(running)
    with gic._lock:
        gic.sync_clock()
    handler = gic.sysreg_handler(0)
    guest_ns, host_ns = handler.counter_timeline()
    assert host_ns is not None and guest_ns >= 0
    running[0] = False
    with gic._lock:
        gic.sync_clock()
    frozen = gic.clock.now()
    assert handler.counter_timeline() == (frozen, None)
    assert handler.read("CNTVCT_EL0") == frozen // 16
