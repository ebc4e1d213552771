"""The Unicorn backend running real x86_64 guest code (assembled with GNU as at test time)."""
from __future__ import annotations

import struct

import pytest

from hv_backends.base import Arch, ExitReason
from hv_backends.unicorn import UnicornBackend
from hv.state import DescriptorTable
from tests.backends.unicorn_x86_guest import IDT, KCODE, KSTACK_TOP, MMIO_BASE, UCODE, USTACK_TOP, X86Guest


@pytest.fixture
def guest():
    g = X86Guest()
    yield g
    g.close()


def test_probe_accepts_pinned_unicorn() -> None:
    assert UnicornBackend.probe(Arch.X86_64) is None
    assert UnicornBackend.name == "unicorn"


def test_port_io_mmio_and_hlt(guest: X86Guest) -> None:
    guest.load(KCODE, f"""
        mov dx, 0x3f8
        mov al, 0x41
        out dx, al
        in al, dx
        movzx ebx, al
        mov eax, 0x12345678
        mov dword ptr [{MMIO_BASE:#x}], eax
        mov ecx, dword ptr [{MMIO_BASE + 4:#x}]
        out 0x80, ax
        hlt
        mov edx, 7
        hlt
    """)
    guest.vcpu.set_state(guest.kernel_state())
    exit_ = guest.run()
    assert exit_.reason is ExitReason.HALT
    assert guest.io.events == [
        ("pio_write", 0x3F8, 1, 0x41),
        ("pio_read", 0x3F8, 1, 0x5A),
        ("mmio_write", MMIO_BASE, 4, 0x12345678),
        ("mmio_read", MMIO_BASE + 4, 4, 0xC0FFEE),
        ("pio_write", 0x80, 2, 0x5678),
    ]
    st = guest.vcpu.get_state()
    assert st.rbx == 0x5A and st.rcx == 0xC0FFEE
    assert st.halted
    hlt_at = guest.memory.read(KCODE, 64).index(b"\xf4")
    assert st.rip == KCODE + hlt_at + 1   # rip after the hlt
    assert guest.run().reason is ExitReason.HALT
    assert guest.vcpu.get_state().rdx == 7


def test_int3_from_cpl3_through_idt_and_iretq_back(guest: X86Guest) -> None:
    guest.load(KCODE, """
    handler:
        hlt
        iretq
    """)
    guest.set_gate(3, KCODE, dpl=3)
    guest.load(UCODE, """
        mov rax, 0x1111
        int3
        mov rax, 0x2222
        int3
    """)
    user = guest.user_state()
    guest.vcpu.set_state(user)
    before = guest.vcpu.get_state()
    assert before.cpl == 3 and before.cs.dpl == 3 and before.cs.l == 1
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rax == 0x1111
    assert st.cpl == 0 and st.cs.selector == 0x08 and st.cs.dpl == 0 and st.cs.l == 1
    assert st.ss.selector == 0 and st.ss.dpl == 0
    assert st.rsp == KSTACK_TOP - 40
    assert not st.rflags & (1 << 9)
    rip, cs, rflags, rsp, ss = struct.unpack("<5Q", guest.memory.read(st.rsp, 40))
    first_int3 = UCODE + guest.memory.read(UCODE, 32).index(b"\xcc")
    assert (rip, cs, rsp, ss) == (first_int3 + 1, 0x23, USTACK_TOP, 0x1B)
    # iretq back to CPL3, which runs into the second int3
    assert guest.run().reason is ExitReason.HALT
    st2 = guest.vcpu.get_state()
    assert st2.rax == 0x2222 and st2.cpl == 0
    rip2, cs2, _, _, ss2 = struct.unpack("<5Q", guest.memory.read(st2.rsp, 40))
    assert cs2 == 0x23 and ss2 == 0x1B and rip2 > rip
    # the user segment caches were reloaded by iretq from the GDT
    assert guest.vcpu.get_state().cs.selector == 0x08


def test_page_fault_delivers_cr2_and_error_code(guest: X86Guest) -> None:
    guest.load(KCODE, """
        mov rax, 0x40000000
        mov qword ptr [rax], 1
        hlt
    handler:
        hlt
    """)
    code = guest.memory.read(KCODE, 64)
    handler = KCODE + code.index(b"\xf4") + 1
    guest.set_gate(14, handler)
    guest.vcpu.set_state(guest.kernel_state())
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == handler + 1
    assert st.cr2 == 0x40000000
    error, rip, cs = struct.unpack("<3Q", guest.memory.read(st.rsp, 24))
    assert error == 0x2          # write to a not-present page at CPL0
    assert rip == KCODE + 7      # the faulting store (after the 7-byte mov rax, imm32)


def test_general_protection_error_code(guest: X86Guest) -> None:
    guest.load(KCODE, """
        mov ax, 0x63
        mov ds, ax
        hlt
    handler:
        hlt
    """)
    handler = KCODE + guest.memory.read(KCODE, 64).index(b"\xf4") + 1
    guest.set_gate(13, handler)
    guest.vcpu.set_state(guest.kernel_state())
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == handler + 1
    error, rip = struct.unpack("<2Q", guest.memory.read(st.rsp, 16))
    assert error == 0x60 and rip == KCODE + 4


def test_triple_fault_resets(guest: X86Guest) -> None:
    guest.load(KCODE, "ud2")
    st = guest.kernel_state()
    st.idt = DescriptorTable(IDT, 0)
    guest.vcpu.set_state(st)
    exit_ = guest.run()
    assert exit_.reason is ExitReason.SYSTEM_RESET and exit_.detail == "triple fault"


def test_double_fault_handler_runs(guest: X86Guest) -> None:
    guest.load(KCODE, """
        ud2
    df:
        hlt
    """)
    guest.set_gate(8, KCODE + 2)
    # #UD's gate (6) is not present -> #NP -> double fault
    guest.vcpu.set_state(guest.kernel_state())
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == KCODE + 3
    assert struct.unpack("<Q", guest.memory.read(st.rsp, 8))[0] == 0


def test_rdtsc_is_monotonic_and_carried(guest: X86Guest) -> None:
    guest.load(KCODE, """
        rdtsc
        shl rdx, 32
        or rax, rdx
        mov rbx, rax
        rdtsc
        shl rdx, 32
        or rax, rdx
        hlt
    """)
    st = guest.kernel_state()
    st.tsc = 1 << 50
    guest.vcpu.set_state(st)
    assert guest.run().reason is ExitReason.HALT
    out = guest.vcpu.get_state()
    assert (1 << 50) <= out.rbx <= out.rax <= out.tsc < (1 << 50) + 10**10


def test_syscall_and_sysretq(guest: X86Guest) -> None:
    guest.load(KCODE, """
        hlt
        sysretq
    """)
    guest.load(UCODE, """
        mov rax, 5
        syscall
        mov rbx, 7
        syscall
    """)
    st = guest.user_state()
    st.rflags = 0x202
    st.msrs[0xC0000081] = (0x10 << 48) | (0x08 << 32)   # STAR
    st.msrs[0xC0000082] = KCODE                          # LSTAR
    st.msrs[0xC0000084] = 0x200                          # FMASK: clear IF
    guest.vcpu.set_state(st)
    assert guest.run().reason is ExitReason.HALT
    k = guest.vcpu.get_state()
    assert k.cpl == 0 and k.cs.selector == 0x08 and k.ss.selector == 0x10 and k.cs.l == 1
    assert k.rcx == UCODE + 9 and k.r11 == 0x202 and not k.rflags & 0x200
    assert guest.run().reason is ExitReason.HALT   # sysretq to CPL3, second syscall
    k2 = guest.vcpu.get_state()
    assert k2.rbx == 7 and k2.rcx == UCODE + 18 and k2.cpl == 0


def test_syscall_without_efer_sce_is_ud(guest: X86Guest) -> None:
    guest.load(KCODE, """
        syscall
    ud:
        hlt
    """)
    guest.set_gate(6, KCODE + 2)
    st = guest.kernel_state()
    st.efer &= ~1
    guest.vcpu.set_state(st)
    assert guest.run().reason is ExitReason.HALT
    s = guest.vcpu.get_state()
    assert s.rip == KCODE + 3 and struct.unpack("<Q", guest.memory.read(s.rsp, 8))[0] == KCODE


def test_inject_external_interrupt(guest: X86Guest) -> None:
    import threading

    guest.load(KCODE, """
        sti
    spin:
        jmp spin
    irq:
        hlt
    """)
    guest.set_gate(0x20, KCODE + 3)
    guest.vcpu.set_state(guest.kernel_state())
    cli_state = guest.vcpu.get_state()
    assert guest.vcpu.inject_interrupt(0x20) is False   # IF clear: not deliverable
    assert guest.vcpu.get_state() == cli_state
    timer = threading.Timer(0.05, guest.vcpu.kick)
    timer.start()
    assert guest.run().reason is ExitReason.KICKED
    timer.join()
    assert guest.vcpu.inject_interrupt(0x20) is True
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rip == KCODE + 4 and not st.rflags & (1 << 9)
    rip, cs, rflags = struct.unpack("<3Q", guest.memory.read(st.rsp, 24))
    assert rip == KCODE + 1 and cs == 0x08 and rflags & (1 << 9)


def test_interrupt_window_stops_after_sti_and_its_shadow(guest: X86Guest) -> None:
    """hv's interrupt window for Unicorn: armed while IF=0, ``run`` returns IRQ_WINDOW at the
    block after ``sti`` (still under the interrupt shadow, so injection is refused there);
    re-armed past one block it stops after the shadowed instruction, where the interrupt
    goes in before the guest's loop counted once."""
    handler = KCODE + 0x800
    guest.load(KCODE, """
        cli
        mov ecx, 1000
    1:  dec ecx
        jnz 1b
        xor ebx, ebx
        sti
        nop
    2:  inc rbx
        jmp 2b
    """)
    guest.load(handler, "mov rdx, rbx\n hlt")
    guest.set_gate(0x40, handler)
    guest.vcpu.set_state(guest.kernel_state())
    code = guest.memory.read(KCODE, 64)
    nop_at = KCODE + code.index(b"\xfb\x90") + 1          # the instruction after sti
    guest.vcpu.request_interrupt_window()
    assert guest.run().reason is ExitReason.IRQ_WINDOW
    st = guest.vcpu.get_state()
    assert st.rip == nop_at and st.interrupt_shadow and st.rbx == 0
    assert not guest.vcpu.inject_interrupt(0x40)          # the shadow refuses it
    guest.vcpu.request_interrupt_window(after_shadow=True)
    assert guest.run().reason is ExitReason.IRQ_WINDOW
    st = guest.vcpu.get_state()
    assert st.rip == nop_at + 1 and not st.interrupt_shadow and st.rbx == 0
    assert guest.vcpu.inject_interrupt(0x40)
    assert guest.run().reason is ExitReason.HALT
    assert guest.vcpu.get_state().rdx == 0                 # taken before the loop's first count
    assert guest.vcpu.window_exits == 2


def test_disarmed_window_does_not_stop_the_guest(guest: X86Guest) -> None:
    import threading
    guest.load(KCODE, "sti\n 2: inc rbx\n jmp 2b")
    guest.vcpu.set_state(guest.kernel_state())
    guest.vcpu.request_interrupt_window()
    guest.vcpu.cancel_interrupt_window()
    timer = threading.Timer(0.05, guest.vcpu.kick)
    timer.start()
    try:
        assert guest.run().reason is ExitReason.KICKED
    finally:
        timer.cancel()
    assert guest.vcpu.get_state().rbx > 0 and guest.vcpu.window_exits == 0


def test_trap_recorded_in_a_run_that_a_kick_ends_is_still_delivered(guest: X86Guest) -> None:
    """A kick that arrives while the engine reports an int3 is seen by the block hook that
    Unicorn still runs before it stops: the int3 is recorded in the same emu_start that
    the kick ends. The trap must be delivered, not dropped (its return address is
    already past it)."""
    import unicorn
    handler = KCODE + 0x800
    guest.load(KCODE, "mov rbx, 1\n int3\n mov rbx, 2\n hlt")
    guest.load(handler, "mov rcx, 0x33\n iretq")
    guest.set_gate(3, handler)
    guest.vcpu.set_state(guest.kernel_state())
    native = guest.vcpu.native.struct

    def kick_arrives_with_the_trap(uc, intno, user_data):
        native.kick = 1                            # another thread's Vcpu.kick(), right now

    hook = guest.vcpu.uc.hook_add(unicorn.UC_HOOK_INTR, kick_arrives_with_the_trap)
    assert guest.run().reason is ExitReason.KICKED
    guest.vcpu.uc.hook_del(hook)
    assert guest.run().reason is ExitReason.HALT
    st = guest.vcpu.get_state()
    assert st.rcx == 0x33 and st.rbx == 2          # the handler ran, then the code after int3
