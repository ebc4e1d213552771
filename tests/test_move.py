"""In-process move between backends: the dirty guest's output continues exactly."""
from __future__ import annotations

import time

import pytest

from backends import backend_class
from hv.config import parse_args
from hv.console import BufferSink
from hv.machine import Machine, RunState
from hv.machine.move import move_machine
from tests.helpers import FIXTURES, dirty_reference, requires_kvm

PAIRS = [
    pytest.param("q35", "kvm", "kvm", marks=requires_kvm, id="x86_64-kvm-kvm"),
    pytest.param("q35", "unicorn", "unicorn", id="x86_64-unicorn-unicorn"),
    pytest.param("q35", "kvm", "unicorn", marks=requires_kvm, id="x86_64-kvm-unicorn"),
    pytest.param("q35", "unicorn", "kvm", marks=requires_kvm, id="x86_64-unicorn-kvm"),
    pytest.param("virt", "unicorn", "unicorn", id="aarch64-unicorn-unicorn"),
]
ARCH = {"q35": "x86_64", "virt": "aarch64"}


def build(machine_type: str, accel: str, append: str) -> tuple[Machine, BufferSink]:
    config = parse_args(["-machine", machine_type, "-m", "64", "-kernel",
                         str(FIXTURES / ARCH[machine_type] / "dirty.elf"), "-append", append]).config
    console = BufferSink()
    machine = Machine(config, backend_class(accel)(), console)
    machine.load_kernel(config.kernel.read_bytes())
    return machine, console


def wait_lines(console: BufferSink, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while console.getvalue().count(b"\n") < count:
        assert time.monotonic() < deadline, console.getvalue()[-300:]
        time.sleep(0.005)


@pytest.mark.parametrize("machine_type,first,second", PAIRS)
def test_move_mid_run_continues_exactly(machine_type, first, second):
    iterations = 12
    machine, console = build(machine_type, first, f"mib=1 iterations={iterations}")
    machine.start()
    try:
        for hop, accel in enumerate([second, first, second]):
            wait_lines(console, 2 + 2 * hop)
            machine = move_machine(machine, backend_class(accel)())
            assert machine.backend.name == accel
        assert machine.wait_shutdown(120) == "guest-shutdown"
    finally:
        machine.close()
    assert tuple(console.getvalue().decode().splitlines()) == dirty_reference(1, iterations)


def test_move_of_paused_machine_stays_paused():
    machine, console = build("virt", "unicorn", "mib=1 iterations=3")
    machine.start(paused=True)
    try:
        moved = move_machine(machine, backend_class("unicorn")())
        assert moved.state is RunState.PAUSED
        time.sleep(0.2)
        assert console.getvalue() == b""
        moved.resume()
        assert moved.wait_shutdown(60) == "guest-shutdown"
    finally:
        moved.close()
    assert tuple(console.getvalue().decode().splitlines()) == dirty_reference(1, 3)


@pytest.mark.parametrize("machine_type,accel", [pytest.param("q35", "kvm", marks=requires_kvm, id="x86_64-kvm"),
                                                pytest.param("q35", "unicorn", id="x86_64-unicorn"),
                                                pytest.param("virt", "unicorn", id="aarch64-unicorn")])
def test_pause_freezes_output_and_ram(machine_type, accel):
    machine, console = build(machine_type, accel, "mib=1")
    machine.start()
    try:
        wait_lines(console, 3)
        assert machine.pause()
        before_out = console.getvalue()
        before_ram = bytes(machine.memory.regions[0].view[16 << 20:17 << 20])
        time.sleep(0.3)
        assert console.getvalue() == before_out
        assert bytes(machine.memory.regions[0].view[16 << 20:17 << 20]) == before_ram
        assert machine.resume()
        wait_lines(console, before_out.count(b"\n") + 2)
    finally:
        machine.request_shutdown("test")
        machine.close()
    text = console.getvalue().decode()
    lines = text[:text.rindex("\n")].splitlines()  # complete lines only
    passes = len(lines) - 1
    assert lines[0] == "dirty: mib=1 iterations=0"
    assert tuple(lines[1:]) == dirty_reference(1, passes)[1:-1]
