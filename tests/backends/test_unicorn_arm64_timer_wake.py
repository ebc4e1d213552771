"""A vCPU firing its own due timer wakes nobody (virt, Unicorn aarch64).

``GicController.before_run`` (and the halt path's ``halt_timeout``) run on the vCPU's own
thread: they fire its due timers, and the same thread then injects the IRQ (or opens the
interrupt window, or sees ``wants_wake``). The timer PPI's level change used to notify the
machine's condition as well, which woke the timer thread (and every other waiter) at
every tick; the vCPU then waited for the GIL that thread took, about 8% of a Linux boot's
vCPU thread. A level change made by any other thread (the timer thread's ``poll``) must
still wake the waiters: a halted vCPU sleeps on that condition.

The vCPU is a real Unicorn aarch64 engine, so the injection (``hv_a64_inject_irq``) is
checked too: the IRQ enters VBAR_EL1 + 0x280 from EL1h with ELR_EL1 the interrupted PC.

The interrupt window of a Unicorn aarch64 vCPU is exact (the engine stops right after the
instruction that clears PSTATE.I), so a masked injection plans no retry kick, which used to
wake the timer thread at every failed injection.
"""
from __future__ import annotations

import threading

import pytest

from hv.devices.arch_timer import PPI_VIRTUAL
from hv.machine.gic_interrupts import GicController
from hv_backends.base import ExitReason
from hv_backends.unicorn_common import uclib
from tests.backends.unicorn_arm64_guest import CODE, VECTORS, Arm64Guest

EL1H = 0x5          # PSTATE: EL1 with SP_EL1, DAIF clear
B_SELF = 0x14000000   # b .


class CountingCondition(threading.Condition):
    """A real condition that counts its notifications."""

    def __init__(self, lock: threading.RLock) -> None:
        super().__init__(lock)
        self.notified = 0

    def notify(self, n: int = 1) -> None:
        self.notified += 1
        super().notify(n)


@pytest.fixture
def guest():
    g = Arm64Guest()
    yield g
    g.close()


def armed_controller() -> tuple[GicController, CountingCondition]:
    """One vCPU whose virtual timer (enabled, unmasked, priority above PMR) is due now."""
    lock = threading.RLock()
    changed = CountingCondition(lock)
    controller = GicController(1, lock, changed, lambda index: None, lambda: True, lambda: False)
    with lock:
        controller.sync_clock()
        controller.gic.s.ctlr = 3
        cpu = controller.gic.s.cpus[0]
        cpu.igrpen1, cpu.pmr = 1, 0xF0
        cpu.enable |= 1 << PPI_VIRTUAL
        cpu.group |= 1 << PPI_VIRTUAL
        cpu.priority[PPI_VIRTUAL] = 0xA0
        controller.timers.s.virt[0].cval = 0       # due since the clock started
        controller.timers.s.virt[0].ctl = 1
    return controller, changed


def test_before_run_fires_own_timer_without_waking_anyone(guest: Arm64Guest) -> None:
    guest.memory.write(CODE, B_SELF.to_bytes(4, "little"))   # nothing runs: the IRQ is only entered
    st = guest.state()
    st.pstate = EL1H
    guest.vcpu.set_state(st)
    controller, changed = armed_controller()
    with controller._lock:
        before = changed.notified
        controller.before_run(0, guest.vcpu)
        assert changed.notified == before, "the vCPU's own timer tick woke the condition's waiters"
        assert controller.gic.signalled(0) == PPI_VIRTUAL
        assert controller.injected[0] == 1
    after = guest.vcpu.get_state()
    assert after.pc == VECTORS + 0x280 and after.elr_el1 == CODE
    assert after.pstate & (1 << 7) and after.spsr_el1 == EL1H


def test_halt_timeout_fires_own_timer_without_waking_anyone() -> None:
    controller, changed = armed_controller()
    with controller._lock:
        before = changed.notified
        controller.halt_timeout(0)
        assert changed.notified == before
        assert controller.wants_wake(0)


def test_another_threads_timer_update_still_wakes_the_halted_vcpu() -> None:
    controller, changed = armed_controller()
    with controller._lock:
        before = changed.notified
        controller.poll()                          # the timer thread fires the due timer
        assert changed.notified > before
        assert controller.wants_wake(0)


def load_words(guest: Arm64Guest, addr: int, words: list[int]) -> None:
    guest.memory.write(addr, b"".join(w.to_bytes(4, "little") for w in words))
    guest.vm.invalidate_code(addr, 0x1000)


def test_interrupt_window_opens_right_after_msr_daifclr(guest: Arm64Guest) -> None:
    """The engine stops at the instruction after the unmasking one, having run nothing
    past it: the window is exact (``exact_interrupt_window``), even after a chained loop."""
    load_words(guest, CODE, [0x91000400,    # loop: add x0, x0, #1
                             0xF1000421,    #       subs x1, x1, #1
                             0x54FFFFC1,    #       b.ne loop
                             0xD50342FF,    #       msr daifclr, #2
                             0x91000442,    # spin: add x2, x2, #1
                             0x17FFFFFF])   #       b spin
    st = guest.state()
    st.pstate = EL1H | (1 << 7)              # IRQs masked
    st.x[1] = 1000
    guest.vcpu.set_state(st)
    assert guest.vcpu.exact_interrupt_window
    guest.vcpu.request_interrupt_window()
    assert guest.run().reason is ExitReason.IRQ_WINDOW
    after = guest.vcpu.get_state()
    assert (after.pc, after.x[0], after.x[1], after.x[2]) == (CODE + 16, 1000, 0, 0)
    assert not after.pstate & (1 << 7)


def test_masked_injection_plans_no_retry_and_wakes_nobody(guest: Arm64Guest) -> None:
    """PSTATE.I set: before_run opens the (exact) window and neither plans a retry kick
    nor wakes the timer thread for one."""
    guest.memory.write(CODE, B_SELF.to_bytes(4, "little"))
    st = guest.state()
    st.pstate = EL1H | (1 << 7)
    guest.vcpu.set_state(st)
    controller, changed = armed_controller()
    with controller._lock:
        before = changed.notified
        controller.before_run(0, guest.vcpu)
        assert controller.gic.signalled(0) == PPI_VIRTUAL and controller.injected[0] == 0
        assert controller.retries == 0 and changed.notified == before
    assert guest.vcpu.get_state().pc == CODE     # nothing entered


def test_polling_engine_checks_only_at_loop_entries(guest: Arm64Guest) -> None:
    """hv's libunicorn: the aarch64 engine has no block hook; its check (kicks, window,
    deadline) runs where the engine enters its execution loop, not at each of the 200000
    chained blocks of this loop (the block hook ran it 200000 times)."""
    if not hasattr(uclib(), "hv_uc_set_poll"):
        pytest.skip("the loaded libunicorn has no hv_uc_set_poll (wheel's library: block hook)")
    load_words(guest, CODE, [0xF1000421,    # loop: subs x1, x1, #1
                             0x54FFFFE1,    #       b.ne loop
                             0xD503207F])   #       wfi
    st = guest.state()
    st.x[1] = 200000
    guest.vcpu.set_state(st)
    before = guest.vcpu.native.struct.blocks
    assert guest.run().reason is ExitReason.HALT
    assert guest.vcpu.get_state().x[1] == 0
    assert guest.vcpu.native.struct.blocks - before < 100
