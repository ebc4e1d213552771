"""Exception, interrupt and SYSCALL delivery of the Unicorn x86_64 backend, checked by what
real guest code on real Unicorn sees: the frame on the handler's stack, the stack it was
pushed to (RSP0, IST), CR2, the segments and flags the handler runs with.

Every test runs twice: with the native delivery of hv_native_x86.c and with it forced off
(the Python X86Delivery), against the same expected values, and each asserts which path
actually delivered, so the two paths are checked against each other.
"""
from __future__ import annotations

import dataclasses
import struct
from collections.abc import Iterator

import pytest

from hv_backends.base import ExitReason
from hv.state import X86CpuState
from tests.backends.unicorn_x86_guest import IDT, KCODE, KSTACK_TOP, TSS, UCODE, USTACK_TOP, X86Guest, gate

IST1_TOP = 0xB000
HANDLER = KCODE + 0x800          # a handler that only halts
HANDLER2 = KCODE + 0x900         # a second one
RFLAGS_IF = 1 << 9
RFLAGS_DF = 1 << 10
RFLAGS_AC = 1 << 18


@pytest.fixture(params=[True, False], ids=["native", "python"])
def guest(request: pytest.FixtureRequest) -> Iterator[X86Guest]:
    g = X86Guest()
    g.vcpu.native_delivery = request.param
    g.memory.write_int(TSS + 0x24, 8, IST1_TOP)          # IST1
    g.load(HANDLER, "hlt")
    g.load(HANDLER2, "hlt")
    yield g
    g.close()


def native(guest: X86Guest) -> bool:
    return guest.vcpu.native_delivery


def set_gate(guest: X86Guest, vector: int, offset: int, dpl: int = 0, gate_type: int = 0xE, ist: int = 0) -> None:
    guest.memory.write(IDT + 16 * vector, gate(offset, dpl=dpl, gate_type=gate_type, ist=ist))


def frame(guest: X86Guest, rsp: int, error: bool) -> tuple[int, ...]:
    """The interrupt frame at rsp: ([error], rip, cs, rflags, rsp, ss)."""
    n = 6 if error else 5
    return struct.unpack(f"<{n}Q", guest.memory.read(rsp, 8 * n))


def user_state(guest: X86Guest, rflags: int = 0x202) -> X86CpuState:
    st = guest.user_state()
    st.rflags = rflags
    return st


def expect_path(guest: X86Guest, key: str, count: int) -> None:
    """The native hooks delivered ``count`` events of kind ``key``, or none when off."""
    stats = guest.vcpu.delivery_stats
    assert stats[f"{key}_native"] == (count if native(guest) else 0), stats
    if not native(guest):
        assert stats[f"{key}_python"] >= count, stats


def test_page_fault_from_user_mode_pushes_error_code_and_sets_cr2(guest: X86Guest) -> None:
    guest.load(UCODE, """
        mov rax, 0x40000000
        mov rbx, qword ptr [rax]
    """)
    set_gate(guest, 14, HANDLER)
    guest.vcpu.set_state(user_state(guest))
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == HANDLER + 1 and st.cpl == 0 and st.cs.selector == 0x08 and st.cs.l == 1
    assert st.ss.selector == 0 and st.ss.unusable
    assert st.cr2 == 0x40000000
    assert st.rsp == KSTACK_TOP - 48                       # RSP0, six words
    assert not st.rflags & RFLAGS_IF
    # user read of a not-present page; RIP at the faulting load (after the 7-byte mov)
    assert frame(guest, st.rsp, error=True) == (0x4, UCODE + 7, 0x23, 0x202, USTACK_TOP, 0x1B)
    expect_path(guest, "exceptions", 1)


def test_general_protection_from_user_mode_with_selector_error_code(guest: X86Guest) -> None:
    guest.load(UCODE, """
        mov ax, 0x3b
        mov ds, ax
    """)
    set_gate(guest, 13, HANDLER)
    guest.vcpu.set_state(user_state(guest))
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == HANDLER + 1 and st.cpl == 0
    # selector 0x38 lies beyond the GDT limit: #GP(0x38), RIP at the mov to ds
    assert frame(guest, st.rsp, error=True) == (0x38, UCODE + 4, 0x23, 0x202, USTACK_TOP, 0x1B)
    expect_path(guest, "exceptions", 1)


def test_int_n_uses_rsp0_and_int3_uses_ist(guest: X86Guest) -> None:
    guest.load(KCODE, "hlt\n iretq")
    set_gate(guest, 0x80, KCODE, dpl=3, gate_type=0xF)           # trap gate: IF stays set
    set_gate(guest, 3, HANDLER, dpl=3, ist=1)                    # interrupt gate on IST1
    guest.load(UCODE, """
        mov rsp, 0x2fff8
        int 0x80
        int3
    """)
    guest.vcpu.set_state(user_state(guest))
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == KCODE + 1 and st.cpl == 0 and st.rflags & RFLAGS_IF
    assert st.rsp == KSTACK_TOP - 40
    int80 = UCODE + 7
    assert frame(guest, st.rsp, error=False) == (int80 + 2, 0x23, 0x202, 0x2FFF8, 0x1B)
    # iretq to CPL3, then int3 onto the IST1 stack (16-byte aligned, no error code)
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == HANDLER + 1 and st.rsp == IST1_TOP - 40 and not st.rflags & RFLAGS_IF
    assert frame(guest, st.rsp, error=False) == (int80 + 3, 0x23, 0x202, 0x2FFF8, 0x1B)
    expect_path(guest, "exceptions", 2)


def test_ist_is_used_even_without_a_privilege_change(guest: X86Guest) -> None:
    guest.load(KCODE, "mov rsp, 0x8ff8\n int3")
    set_gate(guest, 3, HANDLER, ist=1)
    guest.vcpu.set_state(guest.kernel_state())
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rsp == IST1_TOP - 40 and st.ss.selector == 0x10      # SS kept: no CPL change
    assert frame(guest, st.rsp, error=False) == (KCODE + 8, 0x08, 0x2, 0x8FF8, 0x10)
    expect_path(guest, "exceptions", 1)


def test_syscall_and_sysret_follow_star_lstar_and_sfmask(guest: X86Guest) -> None:
    guest.load(KCODE, """
        mov r8, rcx
        mov r9, r11
        mov r10, cs
        mov r12, ss
        pushfq
        pop r13
        hlt
        sysretq
    """)
    guest.load(UCODE, """
        std
        syscall
        mov rbx, 7
        .byte 0x48, 0x0f, 0x05
    """)
    st = user_state(guest, rflags=0x202 | RFLAGS_AC)
    st.msrs[0xC0000081] = (0x10 << 48) | (0x08 << 32)          # STAR
    st.msrs[0xC0000082] = KCODE                                # LSTAR
    st.msrs[0xC0000084] = RFLAGS_IF | RFLAGS_DF | RFLAGS_AC    # SFMASK
    guest.vcpu.set_state(st)
    assert guest.run().reason is ExitReason.HALT
    k = guest.vcpu.get_state()
    assert k.cpl == 0 and k.cs.selector == 0x08 and k.ss.selector == 0x10 and k.cs.l == 1 and k.ss.db == 1
    assert k.r8 == UCODE + 3 and k.r9 == 0x202 | RFLAGS_AC | RFLAGS_DF
    assert (k.r10, k.r12) == (0x08, 0x10)
    assert k.r13 & (RFLAGS_IF | RFLAGS_DF | RFLAGS_AC) == 0
    assert guest.run().reason is ExitReason.HALT       # sysretq, then the REX.W-prefixed syscall
    k = guest.vcpu.get_state()
    assert k.rbx == 7 and k.r8 == UCODE + 13 and k.cpl == 0
    expect_path(guest, "syscalls", 2)


def test_nested_page_fault_inside_an_int3_handler(guest: X86Guest) -> None:
    outer = KCODE + 0x100
    guest.load(outer, """
        mov rax, 0x50000000
        mov qword ptr [rax], 1
    """)
    set_gate(guest, 3, outer, dpl=3)
    set_gate(guest, 14, HANDLER)
    guest.load(UCODE, "int3")
    guest.vcpu.set_state(user_state(guest))
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == HANDLER + 1 and st.cr2 == 0x50000000
    outer_rsp = KSTACK_TOP - 40
    assert frame(guest, outer_rsp, error=False) == (UCODE + 1, 0x23, 0x202, USTACK_TOP, 0x1B)
    # the nested #PF: CPL0 -> CPL0, same stack (aligned down), SS the null selector of CPL0
    assert st.rsp == (outer_rsp & ~0xF) - 48
    assert frame(guest, st.rsp, error=True) == (0x2, outer + 7, 0x08, 0x2, outer_rsp, 0)
    expect_path(guest, "exceptions", 2)


def test_interrupt_injected_while_in_user_mode(guest: X86Guest) -> None:
    guest.load(UCODE, "2: jmp 2b")
    set_gate(guest, 0x30, HANDLER)
    st = user_state(guest, rflags=0x2)
    guest.vcpu.set_state(st)
    before = guest.vcpu.get_state()
    assert guest.vcpu.inject_interrupt(0x30) is False              # IF clear
    st.rflags = 0x202
    st.interrupt_shadow = 1
    guest.vcpu.set_state(st)
    assert guest.vcpu.inject_interrupt(0x30) is False              # interrupt shadow
    st.interrupt_shadow = 0
    guest.vcpu.set_state(st)
    before = guest.vcpu.get_state()
    assert guest.vcpu.inject_interrupt(0x30) is True
    assert guest.run().reason is ExitReason.HALT
    k = guest.vcpu.get_state()
    assert k.rip == HANDLER + 1 and k.cpl == 0 and not k.rflags & RFLAGS_IF and k.rsp == KSTACK_TOP - 40
    assert frame(guest, k.rsp, error=False) == (UCODE, 0x23, 0x202, USTACK_TOP, 0x1B)
    assert before.rip == UCODE
    expect_path(guest, "interrupts", 1)


def test_a_delivery_that_faults_escalates_to_double_fault(guest: X86Guest) -> None:
    """int 0x81 from CPL3 through a DPL0 gate faults while being delivered: the native
    hook leaves it to Python, which escalates to #DF exactly as before."""
    set_gate(guest, 0x81, HANDLER2)                 # DPL 0: not for CPL3 software ints
    set_gate(guest, 8, HANDLER)
    guest.load(UCODE, "int 0x81")
    guest.vcpu.set_state(user_state(guest))
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == HANDLER + 1 and st.cpl == 0
    assert frame(guest, st.rsp, error=True)[:3] == (0, UCODE + 2, 0x23)
    assert guest.vcpu.delivery_stats["exceptions_native"] == 0
    assert guest.vcpu.delivery_stats["exceptions_python"] == 1


def test_frame_pages_are_reported_dirty(guest: X86Guest) -> None:
    """The frame a delivery writes is guest memory that changed: migration must see it."""
    set_gate(guest, 0x30, HANDLER)
    guest.load(UCODE, "2: jmp 2b")
    guest.vcpu.set_state(user_state(guest))
    guest.vm.start_dirty_log()
    guest.memory.take_vmm_dirty()
    assert guest.vcpu.inject_interrupt(0x30) is True
    guest.vm.stop_dirty_log()
    page = (KSTACK_TOP - 40) >> 12
    dirty = [a | b for a, b in zip(guest.vm.take_dirty(), guest.memory.take_vmm_dirty())]
    assert dirty[page >> 3] & (1 << (page & 7))


def run_scenario(native_on: bool) -> tuple[list[X86CpuState], bytes]:
    """User int3 -> handler -> iretq -> #PF -> handler, states at each halt."""
    g = X86Guest()
    try:
        g.vcpu.native_delivery = native_on
        g.load(KCODE, "hlt\n iretq")
        set_gate(g, 3, KCODE, dpl=3)
        set_gate(g, 14, HANDLER)
        g.load(HANDLER, "hlt")
        g.load(UCODE, "mov rax, 0x1234\n int3\n mov qword ptr [0x40000000], rax")
        g.vcpu.set_state(user_state(g))
        states = []
        for _ in range(2):
            assert g.run().reason is ExitReason.HALT
            states.append(dataclasses.replace(g.vcpu.get_state(), tsc=0))
        return states, g.memory.read(KSTACK_TOP - 0x100, 0x100)
    finally:
        g.close()


def test_native_and_python_paths_leave_identical_states() -> None:
    native_states, native_stack = run_scenario(True)
    python_states, python_stack = run_scenario(False)
    assert native_states == python_states
    assert native_stack == python_stack
