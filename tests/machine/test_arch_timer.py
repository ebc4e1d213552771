"""aarch64 generic timer against the guest clock, and the timer guest on virt end to end:
GICv3 + CNTV through Unicorn's system-register hook, via the launcher and moved mid-run."""
from __future__ import annotations

import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from hv.devices.arch_timer import NS_PER_TICK, PPI_PHYSICAL, PPI_VIRTUAL, ArchTimers, ArchTimerState
from hv.devices.clock import GuestClock
from hv.devices.interfaces import DeviceStateError
from hv.machine import Machine
from tests.helpers import FIXTURES, HvProcess, Vm, machine_in_process, require_tool, wait_console_lines
from tests.moved_run import run_moved_mid_run

TIMER = FIXTURES / "aarch64" / "timer.elf"


class FakeHost:
    def __init__(self) -> None:
        self.ns = 0

    def __call__(self) -> int:
        return self.ns


def make() -> tuple[ArchTimers, FakeHost, dict[tuple[int, int], bool]]:
    host = FakeHost()
    clock = GuestClock(host)
    clock.set_running(True)
    lines: dict[tuple[int, int], bool] = {}
    timers = ArchTimers(2, clock, lambda cpu, ppi, level: lines.__setitem__((cpu, ppi), level))
    return timers, host, lines


def test_counter_runs_with_the_guest_clock_only() -> None:
    timers, host, _ = make()
    host.ns += 160
    assert timers.read(0, "CNTVCT_EL0") == 10 == timers.read(1, "CNTPCT_EL0")
    timers.clock.set_running(False)
    host.ns += 10_000
    assert timers.read(0, "CNTVCT_EL0") == 10
    assert timers.read(0, "CNTFRQ_EL0") == 62_500_000


def test_cval_fires_at_its_deadline_and_imask_masks() -> None:
    timers, host, lines = make()
    timers.write(0, "CNTV_CVAL_EL0", 100)
    timers.write(0, "CNTV_CTL_EL0", 1)
    assert lines[(0, PPI_VIRTUAL)] is False and timers.read(0, "CNTV_CTL_EL0") == 1
    assert timers.deadline(0) == 100 * NS_PER_TICK and timers.deadline(1) is None
    host.ns = 100 * NS_PER_TICK - 1
    timers.update(0)
    assert lines[(0, PPI_VIRTUAL)] is False
    host.ns = 100 * NS_PER_TICK
    timers.update(0)
    assert lines[(0, PPI_VIRTUAL)] is True and timers.read(0, "CNTV_CTL_EL0") == 5   # ISTATUS
    assert timers.deadline(0) is None
    timers.write(0, "CNTV_CTL_EL0", 3)                 # IMASK: output low, ISTATUS still set
    assert lines[(0, PPI_VIRTUAL)] is False and timers.read(0, "CNTV_CTL_EL0") == 7
    assert lines[(1, PPI_VIRTUAL)] is False if (1, PPI_VIRTUAL) in lines else True


def test_tval_is_signed_relative_to_the_counter() -> None:
    timers, host, lines = make()
    host.ns = 1000 * NS_PER_TICK
    timers.write(1, "CNTP_TVAL_EL0", 50)
    assert timers.read(1, "CNTP_CVAL_EL0") == 1050 and timers.read(1, "CNTP_TVAL_EL0") == 50
    timers.write(1, "CNTP_TVAL_EL0", (-30) & 0xFFFF_FFFF)
    assert timers.read(1, "CNTP_CVAL_EL0") == 970
    timers.write(1, "CNTP_CTL_EL0", 1)
    assert lines[(1, PPI_PHYSICAL)] is True
    assert timers.read(1, "CNTP_TVAL_EL0") == (-30) & 0xFFFF_FFFF
    assert timers.read(1, "ICC_PMR_EL1") is None and not timers.write(1, "CNTVCT_EL0", 5)


class SteppingHost:
    """A host clock that advances ``step`` ns at every read: time passes between any two
    counter reads, as it does on a real host."""

    def __init__(self, start: int, step: int) -> None:
        self.ns = start
        self.step = step

    def __call__(self) -> int:
        value = self.ns
        self.ns += self.step
        return value


def test_timer_expiring_during_a_poll_is_raised_or_still_planned() -> None:
    """The timer thread's poll must never leave an armed timer with its output low and no
    deadline: the thread would then sleep without a timeout and a vCPU that never exits
    (a busy guest: nothing else re-evaluates the timer) would get no tick again -- the
    stall seen under Linux once its workload ran. Here the counter crosses CVAL between
    the first and second clock read inside poll()."""
    import threading
    from hv.machine.gic_interrupts import GicController

    cval = 1000
    host = SteppingHost(0, 0)
    clock = GuestClock(host)
    clock.set_running(True)                                  # guest time 0 = host time 0
    lock = threading.RLock()
    kicks: list[int] = []
    controller = GicController(1, lock, threading.Condition(lock), kicks.append, lambda: True, lambda: False,
                               clock=clock)
    with lock:
        controller.gic.s.ctlr = 3                       # distributor: both groups enabled
        cpu = controller.gic.s.cpus[0]
        cpu.igrpen1, cpu.pmr = 1, 0xF0
        cpu.enable |= 1 << PPI_VIRTUAL
        cpu.group |= 1 << PPI_VIRTUAL
        cpu.priority[PPI_VIRTUAL] = 0xA0
        controller.timers.s.virt[0].cval = cval
        controller.timers.s.virt[0].ctl = 1
        host.ns, host.step = cval * NS_PER_TICK - 1, NS_PER_TICK   # first read: 1 ns before CVAL
        delay = controller.poll()
        signalled = controller.gic.signalled(0)
    assert delay is not None or signalled == PPI_VIRTUAL, \
        "poll left an expired timer's PPI low with nothing planned: the timer thread would sleep forever"


def test_state_round_trip_and_validation() -> None:
    timers, _, _ = make()
    timers.write(1, "CNTV_CVAL_EL0", 1 << 63)
    timers.write(1, "CNTV_CTL_EL0", 1)
    raw = timers.save().to_dict()
    other, _, _ = make()
    other.restore(ArchTimerState.from_dict(raw))
    assert other.read(1, "CNTV_CVAL_EL0") == 1 << 63
    for bad in ({**raw, "virt": raw["virt"][:1]}, {**raw, "virt": [{"ctl": 4, "cval": 0}] * 2},
                {"virt": raw["virt"]}, {**raw, "phys": [{"ctl": 0, "cval": 1 << 64}] * 2}):
        with pytest.raises(DeviceStateError):
            ArchTimerState.from_dict(bad)


def reference(hz: int, ticks: int) -> list[str]:
    """What fixtures/common/timer.c prints on a correct machine (the x86 guest's lines)."""
    return ([f"timer: hz={hz} ticks={ticks}"] + [f"tick {n} bad 0" for n in range(100, ticks + 1, 100)]
            + [f"total {ticks} bad 0", "done"])


def test_timer_guest_on_virt_via_launcher(tmp_path: Path) -> None:
    vm = HvProcess(tmp_path, "-machine", "virt", "-m", "64", "-accel", "unicorn", "-kernel", str(TIMER),
                   "-append", "hz=1000 ticks=400")
    started = time.monotonic()
    try:
        assert vm.wait(60) == 0, vm.stderr()
    finally:
        vm.close()
    assert vm.output().splitlines() == reference(1000, 400)
    assert time.monotonic() - started >= 0.4            # 400 ticks at 1 kHz of guest time


def test_timer_guest_on_virt_moved_mid_run_keeps_every_tick() -> None:
    """Moved Unicorn to Unicorn twice, each hop once the backend it runs on has printed a
    tick line of its own (tick 100 first), at different phases of the timer period: every
    tick arrives, through the GIC. A hop that found the guest finished moved nothing
    mid-run: that attempt is run again with a fresh machine (:func:`run_moved_mid_run`),
    and the test fails if every attempt did."""
    route = ["unicorn", "unicorn", "unicorn"]
    ticks = 100 * (len(route) + 3)

    def injected(machine: Machine) -> None:
        assert machine.interrupts is not None and sum(machine.interrupts.injected) > 0  # type: ignore[union-attr]

    run = run_moved_mid_run(lambda: machine_in_process("virt", route[0], TIMER, f"hz=1000 ticks={ticks}"),
                            route[1:], reference(1000, ticks),
                            before_hop=lambda hop: time.sleep(0.013 * hop), after_shutdown=injected)
    assert run.moved == len(route) - 1


def test_paused_virt_machine_freezes_the_counter_and_keeps_ticking_after() -> None:
    machine, console = machine_in_process("virt", "unicorn", TIMER, "hz=1000 ticks=300")
    machine.start()
    try:
        wait_console_lines(console, 2)
        assert machine.pause()
        irq = machine.interrupts
        assert irq is not None
        snapshot = machine.save()
        frozen = irq.timers.counter()  # type: ignore[union-attr]
        time.sleep(0.2)
        assert irq.timers.counter() == frozen  # type: ignore[union-attr]
        assert snapshot.cpus[0].cntvct == frozen             # the CPU state carries the same counter
        assert snapshot.devices["arch-timer"]["state"]["virt"][0]["ctl"] == 1
        assert machine.resume()
        assert machine.wait_shutdown(60) == "guest-shutdown"
    finally:
        machine.close()
    assert console.getvalue().decode().splitlines() == reference(1000, 300)


@require_tool("qemu-system-aarch64")
def test_aarch64_timer_guest_prints_the_same_on_qemu_gicv3() -> None:
    # -nodefaults: no default NIC, whose option ROM (package ipxe-qemu) is only recommended
    result = subprocess.run(["qemu-system-aarch64", "-M", "virt,gic-version=3", "-cpu", "cortex-a57", "-m", "64",
                             "-nodefaults", "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", str(TIMER),
                             "-append", "hz=1000 ticks=300"],
                            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.stdout.decode().splitlines() == reference(1000, 300)


def test_timer_guest_on_virt_live_migration_between_processes(hv) -> None:
    """GIC, timer and clock records travel in the migration stream: the destination
    process continues the tick sequence where the source stopped."""
    ticks = 500
    with tempfile.TemporaryDirectory(prefix="hvg") as sock_dir:
        args = ("-machine", "virt", "-m", "64", "-accel", "unicorn", "-kernel", str(TIMER),
                "-append", f"hz=1000 ticks={ticks}")
        src = Vm(hv, sock_dir, "src", *args)
        dst = Vm(hv, sock_dir, "dst", *args, "-incoming", f"unix:{sock_dir}/mig.sock")
        try:
            src.wait_lines(3)                                # tick 200 printed
            assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
            assert src.wait_migration()["status"] == "completed"
            assert dst.process.wait(60) == 0, dst.stderr()
            joined = src.output() + dst.output()
        finally:
            src.close()
            dst.close()
    assert joined.splitlines() == reference(1000, ticks)
