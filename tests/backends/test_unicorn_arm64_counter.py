"""CNTVCT_EL0 / CNTPCT_EL0 of a machine's aarch64 vCPU on Unicorn come from native code.

A Linux boot reads the virtual counter tens of thousands of times; each read used to be a
call into Python (the machine's sysreg handler, under the big lock). When the handler
offers the guest clock's timeline (``counter_timeline``, as virt's GIC/timer handler
does), the native MRS hook answers ``(guest_ns + host_now - host_ns) // 16`` itself: the
same value the machine's timers compute from the same clock (CNTVOFF = 0), and the handler
never sees the read. A stopped clock gives its frozen value exactly.

Hand-encoded A64 on hv's own :class:`UnicornArm64Vcpu`, with a real :class:`GuestClock`.
"""
from __future__ import annotations

import struct

import pytest

from hv.devices.clock import ClockState, GuestClock
from hv.memory import GuestMemory, RegionSpec
from hv.state import Arm64CpuState
from hv_backends.base import Arch, ExitReason
from hv_backends.unicorn import UnicornBackend
from tests.backends.unicorn_x86_guest import RecordingIo

RAM = 0x4000_0000
CODE = RAM + 0x1000
MRS_X1_CNTVCT = 0xD53BE041     # mrs x1, cntvct_el0
MRS_X2_CNTPCT = 0xD53BE022     # mrs x2, cntpct_el0
MRS_X3_CNTVCT = 0xD53BE043     # mrs x3, cntvct_el0
WFI = 0xD503207F
U64 = (1 << 64) - 1


class ClockHandler:
    """A machine's sysreg handler serving the counter from ``clock`` (what reaches it is
    logged): reads through Python give ``clock.now() // 16``, as virt's timers do."""

    def __init__(self, clock: GuestClock) -> None:
        self.clock = clock
        self.seen: list[str] = []

    def read(self, name: str) -> int | None:
        self.seen.append(name)
        if name in ("CNTVCT_EL0", "CNTPCT_EL0"):
            return (self.clock.now() // 16) & U64
        return None

    def write(self, name: str, value: int) -> bool:
        self.seen.append(name)
        return False

    def counter_timeline(self) -> tuple[int, int | None]:
        return self.clock.timeline()


@pytest.fixture
def vcpu():
    memory = GuestMemory([RegionSpec(RAM, 1 << 20)])
    vm = UnicornBackend().open_vm(Arch.AARCH64, memory, [])
    cpu = vm.create_vcpu(0)
    code = struct.pack("<4I", MRS_X1_CNTVCT, MRS_X2_CNTPCT, MRS_X3_CNTVCT, WFI)
    memory.write(CODE, code)
    vm.invalidate_code(CODE, len(code))
    st = Arm64CpuState()
    st.pc = CODE
    cpu.set_state(st)
    yield cpu
    vm.close()
    memory.close()


def test_counter_reads_follow_the_machine_clock_natively(vcpu) -> None:
    """A running clock restored far ahead: every read lies between the clock's value just
    before and just after the run, in order, and none reaches the handler."""
    clock = GuestClock()
    clock.set_running(True)
    clock.restore(ClockState(ns=(1 << 50) + 12_345))
    handler = ClockHandler(clock)
    vcpu.set_sysreg_handler(handler)
    before = clock.now() // 16
    assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
    after = clock.now() // 16
    st = vcpu.get_state()
    assert before <= st.x[1] <= st.x[2] <= st.x[3] <= after
    assert handler.seen.count("CNTVCT_EL0") == 1        # get_state's own reading only
    assert vcpu.sysreg_stats["sysreg_python"] == 0


def test_a_stopped_clock_gives_its_frozen_value_exactly(vcpu) -> None:
    """The clock stands still (a paused machine's vCPU settling): the counter is exactly
    the frozen guest ns // 16, on every read."""
    clock = GuestClock()
    clock.restore(ClockState(ns=1_000_000_015))
    handler = ClockHandler(clock)
    vcpu.set_sysreg_handler(handler)
    assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
    st = vcpu.get_state()
    assert st.x[1] == st.x[2] == st.x[3] == 1_000_000_015 // 16 == st.cntvct
    assert vcpu.sysreg_stats["sysreg_python"] == 0


def test_a_handler_without_a_timeline_still_serves_the_counter(vcpu) -> None:
    """A sysreg handler that does not offer a timeline gets every counter read (Python)."""
    clock = GuestClock()
    clock.restore(ClockState(ns=7 << 40))

    class PlainHandler:
        def __init__(self) -> None:
            self.inner = ClockHandler(clock)
            self.seen = self.inner.seen
            self.read, self.write = self.inner.read, self.inner.write

    handler = PlainHandler()
    vcpu.set_sysreg_handler(handler)
    assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
    st = vcpu.get_state()
    assert st.x[1] == st.x[2] == st.x[3] == (7 << 40) // 16
    assert handler.seen[:3] == ["CNTVCT_EL0", "CNTPCT_EL0", "CNTVCT_EL0"]


B_SELF = 0x14000000            # b .


def test_the_vcpu_stops_itself_at_its_timer_deadline(vcpu) -> None:
    """arm_timer_deadline: a vCPU spinning in the guest returns KICKED once the host clock
    passes the deadline, with no kick from another thread (the machine's timer thread then
    leaves this vCPU's ticks to it); a watchdog kick bounds the test."""
    import threading
    import time

    vcpu.uc.mem_write(CODE, struct.pack("<I", B_SELF))
    vcpu.vm.invalidate_code(CODE, 4)
    st = Arm64CpuState()
    st.pc = CODE
    vcpu.set_state(st)
    deadline = time.monotonic_ns() + 50_000_000
    assert vcpu.arm_timer_deadline(deadline) is True
    watchdog = threading.Timer(30.0, vcpu.kick)
    watchdog.start()
    try:
        assert vcpu.run(RecordingIo()).reason is ExitReason.KICKED
    finally:
        watchdog.cancel()
    assert time.monotonic_ns() >= deadline
    assert vcpu.deadline_exits == 1
    vcpu.arm_timer_deadline(None)
