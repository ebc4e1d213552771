"""The Unicorn backend running real aarch64 guest code (assembled with GNU as once; the bytes
are committed in tests/data/a64_snippets.json and checked against GNU as where it exists)."""
from __future__ import annotations

import random
import threading
import time

import pytest

from hv_backends.base import Arch, ExitReason
from hv_backends.unicorn import UnicornBackend
from tests.helpers import gnu_assemble_a64, load_a64_snippets, require_tool
from tests.backends.unicorn_x86_guest import RecordingIo
from tests.backends.unicorn_arm64_guest import (
    CODE, COUNTER, PL011, RAM, SCRAMBLED_PHYS,
    SCRAMBLED_VIRT, STACK_TOP, USER, USER_ALIAS, USER_STACK_TOP, VECTORS, Arm64Guest,
)

@pytest.fixture
def guest():
    g = Arm64Guest()
    yield g
    g.close()


@require_tool("aarch64-linux-gnu-as")
def test_committed_a64_snippets_match_gnu_as() -> None:
    """Every committed snippet is what GNU as + ld + objcopy make of its source today."""
    snippets = load_a64_snippets()
    assert snippets, "tests/data/a64_snippets.json has no snippets"
    for snippet in snippets:
        assert gnu_assemble_a64(snippet.source, snippet.base) == snippet.code, \
            f"snippet at {snippet.base:#x} differs from GNU as:\n{snippet.source}"


def test_probe_accepts_aarch64() -> None:
    assert UnicornBackend.probe(Arch.AARCH64) is None


def test_pl011_mmio_and_wfi(guest: Arm64Guest) -> None:
    guest.load(CODE, f"""
        ldr x1, ={PL011:#x}
        mov w0, #0x41
        str w0, [x1]
        ldr w2, [x1, #0x18]
        wfi
        mov x3, #7
        wfi
    """)
    guest.vcpu.set_state(guest.state())
    assert guest.run().reason is ExitReason.HALT
    assert guest.io.events == [("mmio_write", PL011, 4, 0x41), ("mmio_read", PL011 + 0x18, 4, 0xC0FFEE)]
    st = guest.vcpu.get_state()
    assert st.x[2] == 0xC0FFEE and st.halted and st.pc == CODE + 20  # after the wfi
    assert guest.run().reason is ExitReason.HALT
    assert guest.vcpu.get_state().x[3] == 7


def test_psci_version_unknown_and_system_off(guest: Arm64Guest) -> None:
    guest.load(CODE, """
        ldr x0, =0x84000000
        hvc #0
        mov x5, x0
        ldr x0, =0x8400beef
        hvc #0
        mov x6, x0
        ldr x0, =0x84000008
        hvc #0
        mov x7, #1
    """)
    guest.vcpu.set_state(guest.state())
    exit_ = guest.run()
    assert exit_.reason is ExitReason.SYSTEM_OFF
    st = guest.vcpu.get_state()
    assert st.x[5] == 0x10000 and st.x[6] == (1 << 64) - 1 and st.x[7] == 0


def test_psci_system_reset(guest: Arm64Guest) -> None:
    guest.load(CODE, "ldr x0, =0x84000009\nhvc #0")
    guest.vcpu.set_state(guest.state())
    assert guest.run().reason is ExitReason.SYSTEM_RESET


VECTOR_SOURCE = """
    .org 0x200
    cur_sync:
        mrs x2, esr_el1
        mrs x3, elr_el1
        mrs x4, spsr_el1
        mrs x5, far_el1
        wfi
        add x3, x3, #4
        msr elr_el1, x3
        eret
    .org 0x400
    lower_sync:
        mrs x2, esr_el1
        mrs x3, elr_el1
        mrs x4, spsr_el1
        mov x9, sp
        wfi
        eret
"""


def test_svc_from_el0_via_vbar_and_eret_back(guest: Arm64Guest) -> None:
    guest.load(VECTORS, VECTOR_SOURCE)
    guest.load(USER, """
        mov x0, #1
        svc #0x15
        mov x0, #2
        svc #0x16
    """)
    user_va = USER_ALIAS + (USER - RAM)
    st = guest.state(pc=user_va, mmu=True)
    st.pstate = 0x0  # EL0t, interrupts unmasked
    guest.vcpu.set_state(st)
    assert guest.vcpu.get_state().current_el == 0
    assert guest.run().reason is ExitReason.HALT
    s1 = guest.vcpu.get_state()
    assert s1.current_el == 1 and s1.pstate & 1  # EL1h
    assert s1.x[2] == (0x15 << 26) | (1 << 25) | 0x15  # ESR as the guest read it
    assert s1.x[3] == user_va + 8 and s1.elr_el1 == user_va + 8
    assert s1.x[4] == 0 and s1.spsr_el1 == 0
    assert s1.x[9] == STACK_TOP and s1.sp_el0 == USER_STACK_TOP
    assert guest.run().reason is ExitReason.HALT   # eret to EL0, then the second svc
    s2 = guest.vcpu.get_state()
    assert s2.x[0] == 2 and s2.x[2] & 0xFFFF == 0x16 and s2.elr_el1 == user_va + 16


def test_brk_and_undefined_at_el1(guest: Arm64Guest) -> None:
    guest.load(VECTORS, VECTOR_SOURCE)
    guest.load(CODE, """
        brk #0x42
        .inst 0x00000000
        mov x8, #8
        wfi
    """)
    guest.vcpu.set_state(guest.state())
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.x[2] == (0x3C << 26) | (1 << 25) | 0x42 and st.x[3] == CODE
    assert st.x[4] == 0x3C5
    assert guest.run().reason is ExitReason.HALT   # handler skips the brk; udf traps next
    st = guest.vcpu.get_state()
    assert st.x[2] >> 26 == 0 and st.x[3] == CODE + 4
    assert guest.run().reason is ExitReason.HALT
    assert guest.vcpu.get_state().x[8] == 8


def test_data_abort_delivered_with_esr_and_far(guest: Arm64Guest) -> None:
    guest.load(VECTORS, VECTOR_SOURCE)
    guest.load(CODE, """
        ldr x1, =0x7654321008
        str x0, [x1]
        mov x8, #8
        wfi
    """)
    guest.vcpu.set_state(guest.state(mmu=True))
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.x[2] >> 26 == 0x25                 # data abort, same EL
    assert st.x[2] & (1 << 6)                    # WnR: a write
    assert st.x[2] & 0x3C == 0x04                # translation fault
    assert st.x[5] == 0x7654321008 and st.sysregs["FAR_EL1"] == 0x7654321008
    assert st.x[3] == CODE + 4                   # ELR: the faulting store
    assert guest.run().reason is ExitReason.HALT  # handler skips the store, eret
    assert guest.vcpu.get_state().x[8] == 8


def test_virtual_counter_is_monotonic_and_carried(guest: Arm64Guest) -> None:
    guest.load(CODE, """
        mrs x1, cntvct_el0
        mrs x2, cntvct_el0
        wfi
    """)
    st = guest.state()
    st.cntvct = 1 << 40
    guest.vcpu.set_state(st)
    assert guest.run().reason is ExitReason.HALT
    out = guest.vcpu.get_state()
    assert (1 << 40) <= out.x[1] <= out.x[2] <= out.cntvct < (1 << 40) + 10**9


def test_kick_cycles_exact_counts_arm64(guest: Arm64Guest) -> None:
    guest.load(CODE, f"""
        ldr x1, ={COUNTER:#x}
        ldr x2, ={PL011:#x}
    top:
        ldr x0, [x1]
        add x0, x0, #1
        str x0, [x1]
        str w0, [x2]
        b top
    """)
    guest.vcpu.set_state(guest.state())
    values: list[int] = []

    class Io(RecordingIo):
        def mmio_write(self, addr: int, size: int, value: int) -> None:
            values.append(value)

    rng = random.Random(7)
    for _ in range(300):
        timer = threading.Timer(rng.random() * 0.0005, guest.vcpu.kick)
        timer.start()
        assert guest.run(Io()).reason is ExitReason.KICKED
        timer.join()
        st = guest.vcpu.get_state()
        assert len(values) == guest.memory.read_int(COUNTER, 8)
        guest.vcpu.set_state(st)
    assert values == list(range(1, len(values) + 1))


def test_kick_stops_busy_loop_arm64(guest: Arm64Guest) -> None:
    guest.load(CODE, "spin: b spin")
    guest.vcpu.set_state(guest.state())
    timer = threading.Timer(0.05, guest.vcpu.kick)
    start = time.monotonic()
    timer.start()
    assert guest.run().reason is ExitReason.KICKED
    assert time.monotonic() - start < 1.0
    timer.join()


def test_dirty_log_physical_with_mmu_arm64(guest: Arm64Guest) -> None:
    chosen = [1, 2, 9]
    stores = "\n".join(f"ldr x1, ={SCRAMBLED_VIRT + i * 0x1000 + 16:#x}\nstr x0, [x1]" for i in chosen)
    guest.load(CODE, f"""
        ldr x0, =0x1122334455667788
        {stores}
        ldr x1, ={SCRAMBLED_VIRT + 0x4000 - 4:#x}
        str x0, [x1]
        ldr x1, ={PL011:#x}
        str w0, [x1]
        wfi
    """)
    guest.vcpu.set_state(guest.state(mmu=True))
    guest.vm.start_dirty_log()
    assert guest.run().reason is ExitReason.HALT
    bitmap = guest.vm.take_dirty()
    pages = {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}
    expected = {(SCRAMBLED_PHYS[i] - RAM) >> 12 for i in (*chosen, 3, 4)}
    assert pages == expected
    for i in chosen:
        assert guest.memory.read_int(SCRAMBLED_PHYS[i] + 16, 8) == 0x1122334455667788
    assert guest.vm.conservative_marks == 0


def test_inject_irq_through_vbar(guest: Arm64Guest) -> None:
    guest.load(VECTORS, """
        .org 0x280
    irq:
        mrs x3, elr_el1
        wfi
    """)
    guest.load(CODE, """
        msr daifclr, #2
    spin:
        b spin
    """)
    guest.vcpu.set_state(guest.state())
    assert guest.vcpu.inject_irq() is False   # PSTATE.I set at reset
    timer = threading.Timer(0.05, guest.vcpu.kick)
    timer.start()
    assert guest.run().reason is ExitReason.KICKED
    timer.join()
    assert guest.vcpu.inject_irq() is True
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.x[3] == CODE + 4 and st.pstate & (1 << 7) and st.spsr_el1 & (1 << 7) == 0
