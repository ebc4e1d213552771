"""Interrupt delivery: routing (MSI, IOAPIC, IPIs), the timer thread, and the timer guest
end to end on KVM and Unicorn, moved between backends mid-run."""
from __future__ import annotations

import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hv_backends import backend_class
from hv.config import parse_args
from hv.console import BufferSink
from hv.devices.ioapic import ENTRY_LEVEL, IOREGSEL, IOWIN
from hv.devices.lapic import REG_EOI, REG_ID, REG_ICR_HI, REG_ICR_LO, REG_LDR, REG_LVT_TIMER, REG_SVR, \
    REG_TIMER_CURRENT, REG_TIMER_DIVIDE, REG_TIMER_INITIAL
from hv.machine import Machine, RunState
from hv.machine.interrupts import InterruptController
from tests.helpers import (
    FIXTURES, HvProcess, Vm, machine_in_process, require_tool, requires_kvm, wait_console_lines,
)
from tests.moved_run import run_moved_mid_run

TIMER = FIXTURES / "x86_64" / "timer.elf"


def timer_reference(hz: int, ticks: int) -> list[str]:
    """What the timer guest prints on a correct machine (see fixtures/common/timer.c)."""
    return ([f"timer: hz={hz} ticks={ticks}"] + [f"tick {n} bad 0" for n in range(100, ticks + 1, 100)]
            + [f"total {ticks} bad 0", "done"])


class Harness:
    """A controller outside a machine: the real lock/condition, a recorded kick."""

    def __init__(self, vcpus: int = 2) -> None:
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.kicks: list[int] = []
        self.running = True
        self.closing = False
        self.irq = InterruptController(vcpus, self.lock, self.changed, self.kicks.append,
                                       lambda: self.running, lambda: self.closing)
        for lapic in self.irq.lapics:
            lapic.write(REG_SVR, 4, 0x1FF)


def test_msi_routing_physical_logical_and_bad_address() -> None:
    h = Harness(3)
    lapics = h.irq.lapics
    msi = h.irq.msi()
    msi.send(0xFEE0_1000, 0x31)                       # physical destination 1
    assert lapics[1].s.irr == 1 << 0x31 and lapics[0].s.irr == 0 and lapics[2].s.irr == 0
    msi.send(0xFEEF_F000, 0x42)                       # broadcast
    assert all(lapic.s.irr >> 0x42 & 1 for lapic in lapics)
    lapics[0].write(REG_LDR, 4, 0x0100_0000)
    lapics[2].write(REG_LDR, 4, 0x0400_0000)
    msi.send(0xFEE0_5004, 0x55)                       # logical, flat: bits 0 and 2
    assert [lapic.s.irr >> 0x55 & 1 for lapic in lapics] == [1, 0, 1]
    msi.send(0xFEE0_0004 | 0x4 << 12, 0x8166)        # lowest priority to {2}, level trigger
    assert lapics[2].s.irr >> 0x66 & 1 and lapics[2].s.tmr >> 0x66 & 1
    msi.send(0xC000_0000, 0x77)                       # not an interrupt address: dropped
    msi.send(0xFEE0_0000, 0x0477)                     # NMI delivery mode: not supported, dropped
    assert not any(lapic.s.irr >> 0x77 & 1 for lapic in lapics)
    assert msi.sent == 6


def test_ioapic_level_line_through_lapic_eoi() -> None:
    h = Harness(2)
    io = h.irq.ioapic
    line = h.irq.line(20)
    io.write(IOREGSEL, 4, 0x11 + 2 * 20)
    io.write(IOWIN, 4, 0x0100_0000)                  # destination APIC 1
    io.write(IOREGSEL, 4, 0x10 + 2 * 20)
    io.write(IOWIN, 4, 0x5A | ENTRY_LEVEL)
    line.set_level(True)
    lapic = h.irq.lapics[1]
    assert lapic.deliverable() == 0x5A
    lapic.acknowledge(0x5A)
    lapic.write(REG_EOI, 4, 0)                       # still asserted: delivered again
    assert lapic.deliverable() == 0x5A
    line.set_level(False)
    lapic.acknowledge(0x5A)
    lapic.write(REG_EOI, 4, 0)
    assert lapic.deliverable() is None and not io.s.redirection[20] >> 14 & 1
    with pytest.raises(ValueError):
        h.irq.line(24)


def test_ipis_by_shorthand_and_destination() -> None:
    h = Harness(3)
    a, b, c = h.irq.lapics
    a.write(REG_ICR_LO, 4, 0x40000 | 0x61)           # self
    assert a.s.irr == 1 << 0x61 and b.s.irr == 0
    a.write(REG_ICR_LO, 4, 0xC0000 | 0x62)           # all excluding self
    assert b.s.irr >> 0x62 & 1 and c.s.irr >> 0x62 & 1 and not a.s.irr >> 0x62 & 1
    a.write(REG_ICR_HI, 4, 0x0200_0000)
    a.write(REG_ICR_LO, 4, 0x63)                      # physical destination 2
    assert c.s.irr >> 0x63 & 1 and not b.s.irr >> 0x63 & 1
    a.write(REG_ICR_LO, 4, 0x80000 | 0x05)           # illegal vector: send error, nothing sent
    assert a.s.esr_pending & 0x20 and not any(x.s.irr & 0xFFFF for x in (a, b, c))
    a.write(REG_ICR_LO, 4, 0x500)                     # INIT: not supported, ignored
    assert not any(x.s.irr & 1 for x in (a, b, c))


def test_each_vcpu_thread_sees_its_own_lapic() -> None:
    h = Harness(2)
    window = h.irq.lapic_window()
    seen: dict[int, int] = {}

    def probe(index: int) -> None:
        h.irq.bind_thread(index)
        seen[index] = window.read(REG_ID, 4)

    threads = [threading.Thread(target=probe, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert seen == {0: 0, 1: 1 << 24}
    assert window.read(REG_ID, 4) == 0               # other threads: vCPU 0's APIC


def test_timer_thread_fires_on_time_and_stops_with_the_clock() -> None:
    h = Harness(1)
    lapic = h.irq.lapics[0]
    with h.lock:
        h.irq.sync_clock()
        lapic.write(REG_TIMER_DIVIDE, 4, 0xB)
        lapic.write(REG_LVT_TIMER, 4, 0x40 | 1 << 17)
        lapic.write(REG_TIMER_INITIAL, 4, 2_000_000)   # 2 ms period
        h.irq.start_timer_thread()
    try:
        deadline = time.monotonic() + 5
        with h.lock:
            while lapic.deliverable() is None:
                assert time.monotonic() < deadline, "timer did not fire"
                h.changed.wait(0.05)
        with h.lock:
            h.running = False
            h.changed.notify_all()
        time.sleep(0.05)
        with h.lock:
            frozen = h.irq.clock.now()
            count = lapic.read(REG_TIMER_CURRENT, 4)
        time.sleep(0.1)
        with h.lock:
            assert h.irq.clock.now() == frozen and lapic.read(REG_TIMER_CURRENT, 4) == count
    finally:
        with h.lock:
            h.closing = True
            h.changed.notify_all()


@pytest.mark.parametrize("accel", [pytest.param("kvm", marks=requires_kvm), "unicorn"])
def test_timer_guest_via_launcher(tmp_path: Path, accel: str) -> None:
    vm = HvProcess(tmp_path, "-machine", "q35", "-m", "64", "-accel", accel, "-kernel", str(TIMER),
                   "-append", "hz=1000 ticks=400")
    try:
        assert vm.wait(60) == 0, vm.stderr()
    finally:
        vm.close()
    assert vm.output().splitlines() == timer_reference(1000, 400)


def build(accel: str, append: str) -> tuple[Machine, BufferSink]:
    return machine_in_process("q35", accel, TIMER, append)


ROUTES = [
    pytest.param(["kvm", "unicorn", "kvm", "unicorn"], marks=requires_kvm, id="kvm-unicorn-kvm-unicorn"),
    pytest.param(["unicorn", "kvm", "unicorn", "kvm"], marks=requires_kvm, id="unicorn-kvm-unicorn-kvm"),
    pytest.param(["unicorn", "unicorn", "unicorn"], id="unicorn-unicorn-unicorn"),
]


@pytest.mark.parametrize("route", ROUTES)
def test_timer_guest_moved_mid_run_keeps_every_tick(route: list[str]) -> None:
    """Moved along ``route``, each hop once the backend it runs on has printed a tick line
    of its own (tick 100 first), at different phases of the timer period: every tick
    arrives. A hop that found the guest finished moved nothing mid-run: that attempt is
    run again with a fresh machine (:func:`run_moved_mid_run`), and the test fails if
    every attempt did."""
    ticks = 100 * (len(route) + 3)
    run_moved_mid_run(lambda: build(route[0], f"hz=1000 ticks={ticks}"), route[1:], timer_reference(1000, ticks),
                      before_hop=lambda hop: time.sleep(0.013 * hop))


@pytest.mark.parametrize("accel", [pytest.param("kvm", marks=requires_kvm), "unicorn"])
def test_paused_machine_freezes_guest_time_and_ticks(accel: str) -> None:
    machine, console = build(accel, "hz=1000 ticks=300")
    machine.start()
    try:
        wait_console_lines(console, 2)
        assert machine.pause()
        snap = machine.save()
        clock_ns = snap.devices["clock"]["state"]["ns"]
        output = console.getvalue()
        time.sleep(0.3)
        assert machine.save().devices["clock"]["state"]["ns"] == clock_ns
        assert console.getvalue() == output
        lapic = snap.devices["lapic0"]["state"]
        # Periodic timer armed; a deadline that passed just before the pause (not yet
        # fired by the timer thread) is carried as it is and fires on resume.
        assert lapic["timer_initial"] == 62500 and lapic["timer_deadline"] is not None
        assert machine.state is RunState.PAUSED
        machine.resume()
        assert machine.wait_shutdown(60) == "guest-shutdown"
        stats = machine.interrupts.stats
        assert stats.injected[0] >= 300 and stats.latency_count > 0
    finally:
        machine.close()
    assert console.getvalue().decode().splitlines() == timer_reference(1000, 300)


@pytest.mark.parametrize("accel", [pytest.param("kvm", marks=requires_kvm), "unicorn"])
def test_many_pauses_never_leave_a_vector_inside_the_backend(accel: str, caplog) -> None:
    """Pause (and save) at arbitrary moments: every vector is either in an APIC's IRR/ISR or
    already delivered, never queued in KVM where a saved CPU state would not carry it."""
    caplog.set_level("WARNING", logger="hv_backends.kvm")
    machine, console = build(accel, "hz=2000 ticks=600")
    machine.start()
    try:
        for cycle in range(25):
            time.sleep(0.002 + 0.0007 * cycle)
            if not machine.pause():
                break
            assert not any(machine.interrupts.must_settle(i) for i in range(len(machine.vcpus)))
            machine.save()
            machine.resume()
        assert machine.wait_shutdown(60) == "guest-shutdown"
    finally:
        machine.close()
    assert console.getvalue().decode().splitlines() == timer_reference(2000, 600)
    assert not [r for r in caplog.records if "undelivered" in r.getMessage()]


@pytest.mark.parametrize("first,second", [pytest.param("kvm", "unicorn", marks=requires_kvm, id="kvm-unicorn"),
                                          pytest.param("unicorn", "kvm", marks=requires_kvm, id="unicorn-kvm"),
                                          pytest.param("unicorn", "unicorn", id="unicorn-unicorn")])
def test_timer_guest_live_migration_between_processes(hv, first: str, second: str) -> None:
    """The LAPIC/IOAPIC/clock records travel in the migration stream: the destination
    process continues the tick sequence where the source stopped."""
    ticks = 600
    with tempfile.TemporaryDirectory(prefix="hvi") as sock_dir:
        args = ("-machine", "q35", "-m", "64", "-kernel", str(TIMER), "-append", f"hz=1000 ticks={ticks}")
        src = Vm(hv, sock_dir, "src", *args, "-accel", first)
        dst = Vm(hv, sock_dir, "dst", *args, "-accel", second, "-incoming",
                 f"unix:{sock_dir}/mig.sock")
        try:
            src.wait_lines(3)                                # tick 200 printed
            assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
            assert src.wait_migration()["status"] == "completed"
            assert dst.process.wait(60) == 0, dst.stderr()
            joined = src.output() + dst.output()
        finally:
            src.close()
            dst.close()
    assert joined.splitlines() == timer_reference(1000, ticks)


@require_tool("qemu-system-x86_64")                              # the reference machine
def test_timer_guest_prints_the_same_on_qemu() -> None:
    # -nodefaults: no default NIC, whose option ROM (package ipxe-qemu) is only recommended
    result = subprocess.run(["qemu-system-x86_64", "-M", "q35", "-m", "64", "-nodefaults", "-display", "none",
                             "-no-reboot", "-serial", "stdio", "-kernel", str(TIMER), "-append", "hz=1000 ticks=200"],
                            capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
    assert result.stdout.decode().replace("\r", "").splitlines() == timer_reference(1000, 200)


def test_machine_wires_serial_line_and_pci_msix_to_the_apics(tmp_path: Path) -> None:
    """q35 wiring: COM1 drives IOAPIC pin 4, a virtio-blk-pci function's MSI-X reaches the
    local APIC, and the LAPIC/IOAPIC/clock are saved devices of the machine."""
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    config = parse_args(["-machine", "q35", "-m", "64", "-kernel", str(TIMER),
                         "-drive", f"file={image},id=d0,readonly=off,direct=off",
                         "-device", "virtio-blk-pci,drive=d0,id=blk0,bus=pcie.0,addr=3"]).config
    machine = Machine(config, backend_class("unicorn")(), BufferSink())
    try:
        assert {"lapic0", "ioapic", "clock"} <= set(machine.devices)
        machine.mmio_write(0xFEE0_00F0, 4, 0x1FF)              # software-enable APIC 0
        machine.mmio_write(0xFEC0_0000, 4, 0x10 + 2 * 4)        # IOAPIC pin 4: vector 0x24, edge
        machine.mmio_write(0xFEC0_0010, 4, 0x24)
        machine.pio_write(0x3F8 + 1, 1, 0x02)                   # UART IER: THR empty interrupt
        lapic = machine.interrupts.lapics[0]
        assert lapic.deliverable() == 0x24
        function = machine.pci.host.functions[3 << 3]
        function.msix.sink.send(0xFEE0_0000, 0x51)
        assert lapic.s.irr >> 0x51 & 1
        assert function.intx.line.target.gsi == 16 + (3 + 1 - 1) % 8    # a wire-OR onto that IOAPIC pin
        saved = machine.save()                                  # prelaunch: not running
        assert saved.devices["lapic0"]["state"]["irr"] == f"{(1 << 0x24) | (1 << 0x51):064x}"
        assert saved.devices["ioapic"]["state"]["redirection"][4] == 0x24
    finally:
        machine.close()


def test_q35_pci_functions_sharing_an_ioapic_pin_are_wire_ored(tmp_path: Path) -> None:
    """Slots 3 and 11 both put INTA on GSI 19: one function lowering its INTx must not
    drop the other's level (PCI INTx is open-drain), and unplugging one leaves the other's."""
    images = [tmp_path / "a.img", tmp_path / "b.img"]
    for image in images:
        image.write_bytes(bytes(1 << 20))
    config = parse_args(["-machine", "q35", "-m", "64", "-kernel", str(TIMER),
                         "-drive", f"file={images[0]},id=d0", "-drive", f"file={images[1]},id=d1",
                         "-device", "virtio-blk-pci,drive=d0,id=a,addr=3",
                         "-device", "virtio-blk-pci,drive=d1,id=b,addr=0xb"]).config
    machine = Machine(config, backend_class("unicorn")(), BufferSink())
    try:
        a, b = machine.pci.host.functions[3 << 3], machine.pci.host.functions[11 << 3]
        assert a.intx.line is b.intx.line and a.intx.line.target.gsi == 19
        pin_level = lambda: bool(machine.interrupts.ioapic.s.levels >> 19 & 1)  # noqa: E731
        a.intx.set_level(True)
        b.intx.set_level(True)
        a.intx.set_level(False)
        assert pin_level()                      # b still asserts
        b.intx.set_level(False)
        assert not pin_level()
        b.intx.set_level(True)
        machine.hotunplug_device("a")
        assert pin_level()                      # a's leaving does not drop b's level
        machine.hotunplug_device("b")
        assert not pin_level()
    finally:
        machine.close()
