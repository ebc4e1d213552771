"""The KVM backend against real /dev/kvm with tiny guest programs.

Guests are assembled at test time with GNU ``as``/``ld``/``objcopy`` (binutils), linked at
the address they run from. They stay plain integer code at CPL0 (kvm_pvm emulates CPL0
and lacks SSE, cmpxchg16b, popcnt, int3, ... there; see BACKEND-NOTES.md).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv_backends.base import Arch, BackendError, BackendUnavailable, ExitReason
from hv_backends.kvm import KvmBackend, KvmVcpu, KvmVm
from hv.memory import GuestMemory, RegionSpec
from hv.state import (
    CANONICAL_MSRS, EFER_LMA, FXSAVE_SIZE, MSR_IA32_CR_PAT, MSR_IA32_SYSENTER_CS,
    MSR_IA32_SYSENTER_EIP, MSR_IA32_SYSENTER_ESP, MSR_KERNEL_GS_BASE, MSR_LSTAR, MSR_CSTAR, MSR_STAR,
    MSR_SYSCALL_MASK, DescriptorTable, Segment, X86CpuState,
)
from tests.helpers import requires_kvm
from tests.backends.kvm_x86_guest import (
    CODE, DATA, MMIO, MMIO32, RAM_SIZE, RecordingIo, assemble,
    assert_same_state, load, long_mode_state, protected_mode_state, real_mode_state,
    write_page_tables,
)

pytestmark = [requires_kvm, pytest.mark.kvm]
log = logging.getLogger(__name__)

@pytest.fixture
def memory() -> GuestMemory:
    mem = GuestMemory([RegionSpec(0, RAM_SIZE)])
    yield mem
    mem.close()


@pytest.fixture
def vm(memory: GuestMemory) -> KvmVm:
    machine = KvmBackend().open_vm(Arch.X86_64, memory, [])
    yield machine
    machine.close()


def test_probe(memory: GuestMemory) -> None:
    assert KvmBackend.probe(Arch.X86_64) is None
    assert KvmBackend.probe(Arch.AARCH64) == "KVM for aarch64 needs an aarch64 host"
    with pytest.raises(BackendUnavailable, match="^KVM for aarch64 needs an aarch64 host$"):
        KvmBackend().open_vm(Arch.AARCH64, memory, [])
    assert KvmBackend.name == "kvm"


def test_duplicate_vcpu_rejected(vm: KvmVm) -> None:
    vm.create_vcpu(0)
    with pytest.raises(BackendError):
        vm.create_vcpu(0)


# -- exits -------------------------------------------------------------------------------
def test_real_mode_out_in_hlt(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, """
        mov al, 0x41
        out 0x10, al
        mov ax, 0x1234
        out 0x11, ax
        mov dx, 0x20
        in ax, dx
        hlt
    """, 16)
    io = RecordingIo(pio_values={0x20: 0xBEEF})
    exit_ = vcpu.run(io)
    assert exit_.reason is ExitReason.HALT
    assert io.log == [("out", 0x10, 1, 0x41), ("out", 0x11, 2, 0x1234), ("in", 0x20, 2, 0xBEEF)]
    state = vcpu.get_state()
    assert state.rax & 0xFFFF == 0xBEEF
    assert state.halted
    assert state.rip == CODE + len(assemble("""
        mov al, 0x41
        out 0x10, al
        mov ax, 0x1234
        out 0x11, ax
        mov dx, 0x20
        in ax, dx
        hlt
    """, 16))


def test_protected_mode_mmio(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, f"""
        mov eax, dword ptr [{MMIO32:#x}]
        mov ebx, eax
        mov dword ptr [{MMIO32 + 0x10:#x}], 0xcafef00d
        mov byte ptr [{MMIO32 + 0x20:#x}], 0x5a
        movzx ecx, word ptr [{MMIO32 + 0x30:#x}]
        hlt
    """, 32)
    io = RecordingIo(mmio_values={MMIO32: 0x11223344, MMIO32 + 0x30: 0xA55A})
    assert vcpu.run(io).reason is ExitReason.HALT
    assert io.log == [("mmio-r", MMIO32, 4, 0x11223344), ("mmio-w", MMIO32 + 0x10, 4, 0xCAFEF00D),
                      ("mmio-w", MMIO32 + 0x20, 1, 0x5A), ("mmio-r", MMIO32 + 0x30, 2, 0xA55A)]
    state = vcpu.get_state()
    assert state.rbx == 0x11223344
    assert state.rcx == 0xA55A


def test_long_mode_pio_strings_and_mmio(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    vm.memory.write(DATA, b"wxyz")
    load(vm, vcpu, f"""
        mov dx, 0x20
        in eax, dx
        mov r12, rax
        out 0x21, eax
        mov rsi, {DATA:#x}
        mov ecx, 4
        mov dx, 0x30
        rep outsb
        mov rdi, {DATA + 0x100:#x}
        mov ecx, 3
        mov dx, 0x40
        rep insb
        mov rax, qword ptr [{MMIO:#x}]
        mov qword ptr [{MMIO + 8:#x}], rax
        hlt
    """, 64)
    io = RecordingIo(pio_values={0x20: 0x89ABCDEF, 0x40: 0x7E}, mmio_values={MMIO: 0x0123456789ABCDEF})
    assert vcpu.run(io).reason is ExitReason.HALT
    assert io.log == [
        ("in", 0x20, 4, 0x89ABCDEF), ("out", 0x21, 4, 0x89ABCDEF),
        *[("out", 0x30, 1, c) for c in b"wxyz"],
        *[("in", 0x40, 1, 0x7E)] * 3,
        ("mmio-r", MMIO, 8, 0x0123456789ABCDEF), ("mmio-w", MMIO + 8, 8, 0x0123456789ABCDEF),
    ]
    assert vm.memory.read(DATA + 0x100, 4) == b"\x7e\x7e\x7e\x00"
    state = vcpu.get_state()
    assert state.r12 == 0x89ABCDEF
    assert state.long_mode_active and state.cs.l == 1


def test_in_value_is_truncated_to_access_size(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, """
        mov rax, -1
        mov dx, 0x20
        in al, dx
        hlt
    """, 64)
    assert vcpu.run(RecordingIo(pio_values={0x20: 0x1234})).reason is ExitReason.HALT
    assert vcpu.get_state().rax == 0xFFFFFFFFFFFFFF34


def test_cpuid_table_is_filtered(vm: KvmVm) -> None:
    """The table hv hands to KVM_SET_CPUID2 is filtered. (kvm_pvm then overrides the
    feature words with the host's — visible through KVM_GET_CPUID2 — so only fields it
    keeps, like the APIC ID, can be checked from inside the guest here.)"""
    vcpu = vm.create_vcpu(3)
    table = {(f, i): (eax, ebx, ecx, edx) for f, i, _flags, eax, ebx, ecx, edx in vm.guest_cpuid(3)}
    _eax, ebx, ecx, edx = table[(1, 0)]
    assert ebx >> 24 == 3                                  # initial APIC ID = vCPU index
    assert ecx & ((1 << 26) | (1 << 27) | (1 << 28) | (1 << 21) | (1 << 24)) == 0  # XSAVE OSXSAVE AVX x2APIC TSC-deadline
    assert edx & (1 << 26) and edx & (1 << 25)             # SSE2, SSE
    assert table[(7, 0)][1:] == (0, 0, 0)                  # no leaf-7 extensions (AVX2, ...)
    assert table[(0x80000001, 0)][3] & (1 << 29)           # long mode
    assert not any(0x40000000 <= f <= 0x400000FF for f, _i in table)  # no KVM paravirt leaves
    assert (1, 0) in {(f, i) for f, i, *_rest in vcpu.cpuid_table()}
    load(vm, vcpu, """
        mov eax, 1
        xor ecx, ecx
        cpuid
        mov eax, ebx
        out 0x11, eax
        mov eax, 0x40000000
        cpuid
        mov eax, ebx
        out 0x14, eax
        hlt
    """, 64)
    io = RecordingIo()
    assert vcpu.run(io).reason is ExitReason.HALT
    values = {port: value for _kind, port, _size, value in io.log}
    assert values[0x11] >> 24 == 3
    assert values[0x14] != 0x4B4D564B                      # no "KVMKVMKVM" signature


def test_triple_fault_is_system_reset(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, "ud2", 64)  # IDT limit 0: #UD -> #DF -> triple fault
    exit_ = vcpu.run(RecordingIo())
    assert exit_.reason is ExitReason.SYSTEM_RESET
    assert exit_.detail == "triple fault"


def test_fetch_outside_ram_is_error_with_rip(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, f"mov rax, {MMIO:#x}\n jmp rax", 64)
    exit_ = vcpu.run(RecordingIo())
    assert exit_.reason is ExitReason.ERROR
    assert "rip" in exit_.detail


# -- kick -----------------------------------------------------------------------------------
def run_in_thread(vcpu: KvmVcpu, io: RecordingIo) -> tuple[threading.Thread, list]:
    result: list = []
    thread = threading.Thread(target=lambda: result.append(vcpu.run(io)), daemon=True)
    thread.start()
    return thread, result


def test_kick_interrupts_busy_loop(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    code = load(vm, vcpu, """
        xor eax, eax
    1:  inc rax
        jmp 1b
    """, 64)
    for _ in range(3):
        thread, result = run_in_thread(vcpu, RecordingIo())
        time.sleep(0.1)
        assert thread.is_alive(), "the guest loop must still be running"
        vcpu.kick()
        thread.join(5)
        assert not thread.is_alive(), "kick did not stop KVM_RUN"  # (within join's bound)
        assert result[0].reason is ExitReason.KICKED
        state = vcpu.get_state()
        assert CODE + 2 <= state.rip < CODE + len(code)
        assert state.rax > 0


def test_kick_before_run_returns_without_executing(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, "out 0x10, al\n hlt", 64)
    before = vcpu.get_state()
    vcpu.kick()
    vcpu.kick()  # kicks do not accumulate
    io = RecordingIo()
    assert vcpu.run(io).reason is ExitReason.KICKED
    assert io.log == []
    assert vcpu.get_state().rip == before.rip
    assert vcpu.run(io).reason is ExitReason.HALT
    assert io.log == [("out", 0x10, 1, 0)]


class CountingIo(RecordingIo):
    """Answers each IN with the next number; can kick its vCPU from inside the handler."""

    def __init__(self, vcpu: KvmVcpu, kick_at: int | None = None) -> None:
        super().__init__()
        self.vcpu = vcpu
        self.count = 0
        self.kick_at = kick_at

    def pio_read(self, port: int, size: int) -> int:
        self.count += 1
        if self.count == self.kick_at:
            self.vcpu.kick()
        return self.count


IN_LOOP = """
    mov dx, 0x20
    xor eax, eax
1:  in eax, dx
    jmp 1b
"""


def test_kick_right_after_in_exit_completes_the_in(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    code = load(vm, vcpu, IN_LOOP, 64)
    in_addr = CODE + code.index(b"\xed")
    io = CountingIo(vcpu, kick_at=37)
    assert vcpu.run(io).reason is ExitReason.KICKED
    state = vcpu.get_state()
    assert io.count == 37
    assert state.rax == 37, "the pending IN must be completed before run() returns"
    assert state.rip == in_addr + 1, "RIP must be past the IN"
    # The state is a valid snapshot: load it into a fresh vCPU of another VM and continue.
    other = KvmBackend().open_vm(Arch.X86_64, vm.memory, [])
    try:
        clone = other.create_vcpu(0)
        clone.set_state(state)
        io2 = CountingIo(clone, kick_at=42)
        io2.count = 37
        assert clone.run(io2).reason is ExitReason.KICKED
        assert clone.get_state().rax == 42
    finally:
        other.close()


def test_state_after_threaded_kicks_mid_in_loop_is_consistent(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    code = load(vm, vcpu, IN_LOOP, 64)
    in_addr = CODE + code.index(b"\xed")
    io = CountingIo(vcpu)
    for i in range(20):
        thread, result = run_in_thread(vcpu, io)
        time.sleep(0.002 * (i % 5))
        vcpu.kick()
        thread.join(5)
        assert not thread.is_alive()
        assert result[0].reason is ExitReason.KICKED
        state = vcpu.get_state()
        # Anywhere from the start (a kick before the first instruction) to the loop's
        # "jmp", but never with an IN half done.
        assert CODE <= state.rip <= in_addr + 1
        assert state.rax == io.count, f"kick {i}: rax {state.rax} but the last IN returned {io.count}"
        vcpu.set_state(state)
    assert io.count > 0


# -- state -------------------------------------------------------------------------------
def test_state_round_trip_after_running(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, """
        mov rax, 0x1111111111111111
        mov rbx, 0x2222222222222222
        mov r15, -3
        mov rcx, 0xC0000081
        mov edx, 0x00230010
        xor eax, eax
        wrmsr
        hlt
    """, 64)
    assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
    first = vcpu.get_state()
    assert first.msrs[MSR_STAR] == 0x0023001000000000
    assert set(first.msrs) == set(CANONICAL_MSRS)
    assert first.efer & EFER_LMA and first.cs.l == 1
    assert len(first.fxsave) == FXSAVE_SIZE
    vcpu.set_state(first)
    assert_same_state(first, vcpu.get_state(), vm)


def test_state_moves_to_another_vm(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, "mov r9, 77\n out 0x10, al\n mov r9, 78\n hlt", 64)
    assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
    state = vcpu.get_state()
    state.rip -= 1 + 7 + 2  # back to "out" (hlt 1, mov r9 imm32 7, out 2)
    other = KvmBackend().open_vm(Arch.X86_64, vm.memory, [])
    try:
        clone = other.create_vcpu(0)
        clone.set_state(state)
        assert_same_state(state, clone.get_state(), other)
        io = RecordingIo()
        assert clone.run(io).reason is ExitReason.HALT
        assert io.log == [("out", 0x10, 1, 0)]
        assert clone.get_state().r9 == 78
    finally:
        other.close()


U64 = st.integers(0, 2**64 - 1)
CANONICAL = st.one_of(st.integers(0, 2**47 - 1), st.integers(2**64 - 2**47, 2**64 - 1))
PAT_TYPES = st.sampled_from([0, 1, 4, 5, 6, 7])


@st.composite
def fxsave_images(draw: st.DrawFn) -> bytes:
    image = bytearray(draw(st.binary(min_size=416, max_size=416)))
    image[24:28] = draw(st.integers(0, 0xFFFF)).to_bytes(4, "little")   # MXCSR, reserved bits clear
    image[28:32] = (0xFFFF).to_bytes(4, "little")                       # MXCSR_MASK
    return bytes(image) + bytes(FXSAVE_SIZE - 416)


@st.composite
def data_segments(draw: st.DrawFn, selector_index: int) -> Segment:
    return Segment(selector=selector_index << 3, base=draw(st.integers(0, 2**32 - 1)),
                   limit=draw(st.sampled_from([0xFFFF, 0xFFFFF, 0xFFFFFFFF])), type=draw(st.sampled_from([1, 3])),
                   present=1, dpl=0, db=draw(st.integers(0, 1)), s=1, l=0, g=draw(st.integers(0, 1)), avl=draw(st.integers(0, 1)))


@st.composite
def long_mode_states(draw: st.DrawFn) -> X86CpuState:
    state = long_mode_state(CODE)
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15", "cr2"):
        setattr(state, name, draw(U64))
    state.rip = draw(st.integers(CODE, CODE + 0xFFF))
    state.rflags = 0x2 | draw(st.integers(0, 0xFFF)) & 0xCD5  # CF PF AF ZF SF DF OF
    state.ds = draw(data_segments(2))
    state.es = draw(data_segments(2))
    state.fs = replace(draw(data_segments(2)), base=draw(CANONICAL))
    state.gs = replace(draw(data_segments(2)), base=draw(CANONICAL))
    state.gdt = DescriptorTable(draw(CANONICAL), draw(st.integers(0, 0xFFFF)))
    state.idt = DescriptorTable(draw(CANONICAL), draw(st.integers(0, 0xFFFF)))
    state.cr8 = draw(st.integers(0, 15))
    state.msrs = {
        MSR_IA32_SYSENTER_CS: draw(st.integers(0, 0xFFFF)),
        MSR_IA32_SYSENTER_ESP: draw(CANONICAL),
        MSR_IA32_SYSENTER_EIP: draw(CANONICAL),
        MSR_IA32_CR_PAT: int.from_bytes(bytes(draw(st.lists(PAT_TYPES, min_size=8, max_size=8))), "little"),
        MSR_STAR: draw(U64),
        MSR_LSTAR: draw(CANONICAL),
        MSR_CSTAR: draw(CANONICAL),
        MSR_SYSCALL_MASK: draw(st.integers(0, 2**32 - 1)),
        MSR_KERNEL_GS_BASE: draw(CANONICAL),
    }
    state.fxsave = draw(fxsave_images())
    state.tsc = draw(st.integers(0, 2**62))
    state.nmi_masked = draw(st.booleans())
    state.halted = draw(st.booleans())
    return state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=long_mode_states())
def test_state_round_trip_random(vm: KvmVm, state: X86CpuState) -> None:
    vcpu = vm.vcpus[0] if vm.vcpus else vm.create_vcpu(0)
    vcpu.set_state(state)
    got = vcpu.get_state()
    assert_same_state(state, got, vm)
    vcpu.set_state(got)
    assert_same_state(got, vcpu.get_state(), vm)


@st.composite
def protected_mode_states(draw: st.DrawFn) -> X86CpuState:
    state = protected_mode_state(CODE)
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r15"):
        setattr(state, name, draw(st.integers(0, 2**32 - 1)))
    state.rsp = draw(st.integers(0x1000, 0x7000))
    state.rip = draw(st.integers(CODE, CODE + 0xFFF))
    state.cs = replace(state.cs, base=draw(st.integers(0, 0xFFFFF)) << 12, type=draw(st.sampled_from([0xB, 0xF])))
    state.ds = draw(data_segments(2))
    state.es = draw(data_segments(2))
    state.fs = draw(data_segments(2))
    state.gs = draw(data_segments(2))
    state.cr0 = 0x11 | draw(st.sampled_from([0, 0x2, 0x20, 0x22, 0x10000, 0x40022]))  # MP NE WP AM
    state.cr4 = draw(st.sampled_from([0, 0x10, 0x80, 0x600, 0x690, 0x8]))        # PSE PGE OSFXSR/XMMEXCPT DE
    state.efer = draw(st.sampled_from([0, 0x1, 0x800, 0x801]))                  # SCE NXE
    state.gdt = DescriptorTable(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 0xFFFF)))
    state.idt = DescriptorTable(draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 0xFFFF)))
    state.fxsave = draw(fxsave_images())
    state.tsc = draw(st.integers(1, 2**62))
    state.interrupt_shadow = draw(st.sampled_from([0, 1, 2]))
    state.nmi_masked = draw(st.booleans())
    return state


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=protected_mode_states())
def test_state_round_trip_random_protected_mode(vm: KvmVm, state: X86CpuState) -> None:
    vcpu = vm.vcpus[0] if vm.vcpus else vm.create_vcpu(0)
    vcpu.set_state(state)
    got = vcpu.get_state()
    assert_same_state(state, got, vm)


@pytest.mark.parametrize("make", [real_mode_state, protected_mode_state, long_mode_state], ids=["real", "prot", "long"])
def test_state_round_trip_each_mode(vm: KvmVm, make) -> None:
    vcpu = vm.create_vcpu(0)
    write_page_tables(vm.memory)
    state = make(CODE)
    vcpu.set_state(state)
    got = vcpu.get_state()
    assert_same_state(replace(state, tsc=got.tsc), got, vm)


def test_interrupt_shadow_round_trip(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, "hlt", 64)
    state = vcpu.get_state()
    for shadow in (0, state.interrupt_shadow):
        state.interrupt_shadow = shadow
        vcpu.set_state(state)
        assert vcpu.get_state().interrupt_shadow == shadow
    # An STI shadow taken from a running guest (sti; hlt stops right after sti's shadow
    # has been consumed, so set one explicitly and read what KVM reports back).
    state.interrupt_shadow = 1
    vcpu.set_state(state)
    reported = vcpu.get_state().interrupt_shadow
    assert reported != 0
    state.interrupt_shadow = reported
    vcpu.set_state(state)
    assert vcpu.get_state().interrupt_shadow == reported


def test_set_state_rejects_bad_mxcsr(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    state = vcpu.get_state()
    image = bytearray(state.fxsave)
    image[24:28] = (0xFFFFFFFF).to_bytes(4, "little")
    with pytest.raises(BackendError, match="XSAVE"):
        vcpu.set_state(replace(state, fxsave=bytes(image)))


# -- dirty log ---------------------------------------------------------------------------
def bits_set(bitmap: bytearray) -> set[int]:
    return {i * 8 + b for i, byte in enumerate(bitmap) if byte for b in range(8) if byte >> b & 1}


def test_dirty_log_reports_exactly_guest_writes() -> None:
    high = 0x40000000
    memory = GuestMemory([RegionSpec(0, RAM_SIZE), RegionSpec(high, 64 << 10)])
    vm = KvmBackend().open_vm(Arch.X86_64, memory, [])
    try:
        vcpu = vm.create_vcpu(0)
        first = "mov byte ptr [0x10000], 1\n hlt"
        load(vm, vcpu, first, 32)
        assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
        with pytest.raises(BackendError):
            vm.take_dirty()
        vm.start_dirty_log()
        assert bits_set(vm.take_dirty()) == set(), "writes before start must not be reported"
        second = f"""
            mov dword ptr [0x5000], 1
            mov byte ptr [0x7ffff], 2
            mov dword ptr [{high + 0x3004:#x}], 3
            mov dword ptr [{high + 0xfffc:#x}], 4
            hlt
        """
        load(vm, vcpu, second, 32)
        memory.write(0x9000, b"vmm")  # VMM-made writes are not in KVM's log
        assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
        region0_pages = RAM_SIZE >> 12
        assert bits_set(vm.take_dirty()) == {0x5, 0x7F, region0_pages + 3, region0_pages + 15}
        assert bits_set(vm.take_dirty()) == set()
        load(vm, vcpu, "mov byte ptr [0x6000], 1\n hlt", 32)
        assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
        bitmap = vm.take_dirty()
        assert len(bitmap) == (memory.page_count + 7) // 8
        assert bits_set(bitmap) == {0x6}
        vm.start_dirty_log()  # restarting clears the record
        vm.stop_dirty_log()
        with pytest.raises(BackendError):
            vm.take_dirty()
    finally:
        vm.close()
        memory.close()


# -- cost ----------------------------------------------------------------------------------
def test_exit_round_trip_cost(vm: KvmVm) -> None:
    """Measure a KVM exit round trip through Python (OUT loop); sanity bound only."""
    vcpu = vm.create_vcpu(0)
    count = 5000
    load(vm, vcpu, f"mov ecx, {count}\n 1: out 0x80, al\n dec ecx\n jnz 1b\n hlt", 64)

    class Null:
        def pio_write(self, port: int, size: int, value: int) -> None:
            pass

    start = time.perf_counter()
    assert vcpu.run(Null()).reason is ExitReason.HALT  # type: ignore[arg-type]
    per_exit_us = (time.perf_counter() - start) / count * 1e6
    log.info("KVM exit round trip from Python: %.1f us per OUT exit", per_exit_us)
    print(f"KVM exit round trip from Python: {per_exit_us:.1f} us per OUT exit")
    # No bound on per_exit_us: a wall-time figure fails under load without hv being wrong.


def test_tsc_restore_where_kvm_supports_it(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    state = vcpu.get_state()
    target = state.tsc + (1 << 45)
    vcpu.set_state(replace(state, tsc=target))
    got = vcpu.get_state().tsc
    if vm.tsc_restorable:
        assert target <= got < target + 10**11
    else:  # kvm_pvm: the guest sees the host's TSC, which keeps counting
        assert state.tsc < got < target


def test_interrupt_injection_with_window(vm: KvmVm) -> None:
    """External interrupts without an in-kernel irqchip: KVM_INTERRUPT + window exits."""
    vcpu = vm.create_vcpu(0)
    handler = assemble("mov al, 0x77\n out 0x99, al\n iretq", 64, 0xA000)
    vm.memory.write(0xA000, handler)
    idt = 0xB000
    gate = (0xA000 & 0xFFFF) | (0x8 << 16) | (0x8E00 << 32) | (((0xA000 >> 16) & 0xFFFF) << 48)
    vm.memory.write(idt + 0x30 * 16, gate.to_bytes(8, "little") + (0).to_bytes(8, "little"))
    write_page_tables(vm.memory)
    code = assemble("""
        cli
        out 0x10, al
        sti
        nop
    1:  hlt
        jmp 1b
    """, 64)
    vm.memory.write(CODE, code)
    vcpu.set_state(replace(long_mode_state(CODE), idt=DescriptorTable(idt, 0xFFF)))
    io = RecordingIo()
    assert vcpu.run(io).reason is ExitReason.HALT          # the first OUT, then... hlt
    assert io.log == [("out", 0x10, 1, 0)]
    assert vcpu.ready_for_interrupt
    assert vcpu.inject_interrupt(0x30)
    assert not vcpu.inject_interrupt(0x31), "one interrupt is already queued"
    assert not vcpu.get_state().halted
    assert vcpu.run(io).reason is ExitReason.HALT          # handler ran, back to hlt
    assert io.log[-1] == ("out", 0x99, 1, 0x77)
    # With IF=0 the interrupt must wait for a window.
    load(vm, vcpu, "cli\n out 0x10, al\n mov ecx, 3\n 1: dec ecx\n jnz 1b\n sti\n nop\n 2: hlt\n jmp 2b", 64,
         replace(long_mode_state(CODE), idt=DescriptorTable(idt, 0xFFF)))
    io = RecordingIo()
    assert not vcpu.inject_interrupt(0x30), "IF is clear at the start"
    vcpu.request_interrupt_window()
    exit_ = vcpu.run(io)
    # Hardware KVM stops at the window (after sti; nop); kvm_pvm, which emulates CPL0 code,
    # only notices it at the next exit, the HLT. Either way the vCPU can take it now.
    assert exit_.reason in (ExitReason.IRQ_WINDOW, ExitReason.HALT)
    assert vcpu.ready_for_interrupt and vcpu.get_state().rflags & 0x200
    assert io.log == [("out", 0x10, 1, 0)]
    vcpu.interrupt(0x30)
    assert vcpu.run(io).reason is ExitReason.HALT
    assert io.log[-1] == ("out", 0x99, 1, 0x77)


class FailingIo(RecordingIo):
    """A bus whose device fails on IN from port 0x66."""

    def pio_read(self, port: int, size: int) -> int:
        if port == 0x66:
            raise RuntimeError("device failed")
        return super().pio_read(port, size)


def test_failing_handler_leaves_vcpu_at_architectural_point(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    code = load(vm, vcpu, "mov eax, 0x12345678\n mov dx, 0x66\n in eax, dx\n out 0x10, al\n hlt", 64)
    with pytest.raises(RuntimeError, match="device failed"):
        vcpu.run(FailingIo())
    state = vcpu.get_state()
    in_addr = CODE + code.index(b"\xed")
    assert state.rip == in_addr + 1, "the IN must be completed, not left pending"
    io = RecordingIo()
    assert vcpu.run(io).reason is ExitReason.HALT
    assert io.log == [("out", 0x10, 1, state.rax & 0xFF)]


def test_state_access_while_running_is_refused(vm: KvmVm) -> None:
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, "1: jmp 1b", 64)
    thread, result = run_in_thread(vcpu, RecordingIo())
    try:
        time.sleep(0.05)
        with pytest.raises(BackendError, match="running"):
            vcpu.get_state()
        with pytest.raises(BackendError, match="running"):
            vcpu.close()
    finally:
        vcpu.kick()
        thread.join(5)
    assert result[0].reason is ExitReason.KICKED


def test_two_vcpus_kicked_independently(vm: KvmVm) -> None:
    write_page_tables(vm.memory)
    code = assemble("1: inc rax\n out 0x10, al\n jmp 1b", 64)
    vm.memory.write(CODE, code)
    vcpus = [vm.create_vcpu(i) for i in range(2)]
    for vcpu in vcpus:
        vcpu.set_state(long_mode_state(CODE))
    ios = [RecordingIo(), RecordingIo()]
    runs = [run_in_thread(vcpu, io) for vcpu, io in zip(vcpus, ios)]
    time.sleep(0.1)
    vcpus[0].kick()
    runs[0][0].join(5)
    assert runs[0][1][0].reason is ExitReason.KICKED
    assert runs[1][0].is_alive(), "kicking vCPU 0 must not stop vCPU 1"
    vcpus[1].kick()
    runs[1][0].join(5)
    assert runs[1][1][0].reason is ExitReason.KICKED
    for vcpu, io in zip(vcpus, ios):
        assert len(io.log) > 0
        # Stopped either just after an OUT or between "inc" and the next OUT.
        assert vcpu.get_state().rax & 0xFF in (io.log[-1][3], (io.log[-1][3] + 1) & 0xFF)


def test_kick_without_signal_handler_waits_for_next_exit(vm: KvmVm) -> None:
    import signal as signal_module
    from hv_backends.kvm import KICK_SIGNAL, install_kick_handler
    vcpu = vm.create_vcpu(0)
    load(vm, vcpu, "1: jmp 1b", 64)
    thread, result = run_in_thread(vcpu, RecordingIo())
    previous = signal_module.signal(KICK_SIGNAL, signal_module.SIG_IGN)
    try:
        time.sleep(0.05)
        vcpu.kick()   # only immediate_exit: the busy guest has no exit to notice it at
        thread.join(0.3)
        assert thread.is_alive()
    finally:
        signal_module.signal(KICK_SIGNAL, previous)
    assert install_kick_handler()
    vcpu.kick()
    thread.join(5)
    assert result[0].reason is ExitReason.KICKED


def test_ram_over_kvm_reserved_pages_is_refused() -> None:
    memory = GuestMemory([RegionSpec(0xFFF00000, 1 << 20)])
    try:
        with pytest.raises(BackendError, match="overlaps"):
            KvmBackend().open_vm(Arch.X86_64, memory, [])
    finally:
        memory.close()
