"""get_state -> set_state -> get_state is exact on the Unicorn backend (hypothesis)."""
from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv_backends.base import Arch
from hv_backends.unicorn import UnicornBackend
from hv.memory import GuestMemory, RegionSpec
from hv.state import (
    ARM64_SYSREG_NAMES,
    CANONICAL_MSRS,
    MSR_IA32_SYSENTER_CS,
    Arm64CpuState,
    DescriptorTable,
    Segment,
    X86CpuState,
    state_from_dict,
    state_to_dict,
)

u64 = st.integers(0, (1 << 64) - 1)
u32 = st.integers(0, (1 << 32) - 1)
bit = st.integers(0, 1)
RFLAGS_BITS = 0x3F7FD5 & ~(1 << 17)  # every architectural flag except VM


@st.composite
def segments(draw) -> Segment:
    return Segment(selector=draw(st.integers(0, 0xFFFF)), base=draw(u64), limit=draw(u32),
                   type=draw(st.integers(0, 15)), present=draw(bit), dpl=draw(st.integers(0, 3)), db=draw(bit),
                   s=draw(bit), l=draw(bit), g=draw(bit), avl=draw(bit), unusable=draw(bit))


@st.composite
def fxsave_images(draw) -> bytes:
    image = bytearray(512)
    struct.pack_into("<HHBxHQQII", image, 0, draw(st.integers(0, 0xFFFF)), draw(st.integers(0, 0xFFFF)),
                     draw(st.integers(0, 0xFF)), draw(st.integers(0, 0x7FF)), draw(u64), draw(u64),
                     draw(st.integers(0, 0xFFFF)), 0xFFFF)
    for i in range(8):
        struct.pack_into("<QH", image, 32 + 16 * i, draw(u64), draw(st.integers(0, 0xFFFF)))
    for i in range(16):
        image[160 + 16 * i:176 + 16 * i] = draw(st.binary(min_size=16, max_size=16))
    return bytes(image)


@st.composite
def x86_states(draw) -> X86CpuState:
    s = X86CpuState()
    for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
                 "r13", "r14", "r15", "rip", "cr2"):
        setattr(s, name, draw(u64))
    s.rflags = 0x2 | (draw(u32) & RFLAGS_BITS)
    for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt"):
        setattr(s, name, draw(segments()))
    s.gdt = DescriptorTable(draw(u64), draw(st.integers(0, 0xFFFF)))
    s.idt = DescriptorTable(draw(u64), draw(st.integers(0, 0xFFFF)))
    s.cr0 = draw(st.sampled_from([0x60000010, 0x11, 0x80000011, 0x80050033, 0x8005003B, 0x80010031]))
    s.cr3 = draw(st.integers(0, (1 << 40) - 1)) & ~0xFFF
    s.cr4 = draw(st.sampled_from([0, 0x20, 0x620, 0x6A0, 0x1006A0, 0x50620]))
    s.cr8 = draw(st.integers(0, 15))
    s.efer = draw(st.sampled_from([0, 0x1, 0x100, 0x500, 0x501, 0xD01, 0x901]))
    s.apic_base = draw(st.sampled_from([0xFEE00900, 0xFEE00800, 0xFEE00D00]))
    s.msrs = {m: draw(st.integers(0, 0xFFFF) if m == MSR_IA32_SYSENTER_CS else u64) for m in CANONICAL_MSRS}
    if draw(st.booleans()):
        s.msrs[0x10] = draw(u64)  # an MSR Unicorn does not hold: carried beside the engine
    s.fxsave = draw(fxsave_images())
    s.tsc = draw(u64)
    s.interrupt_shadow = draw(st.integers(0, 3))
    s.nmi_masked = draw(st.booleans())
    s.halted = draw(st.booleans())
    return s


@pytest.fixture(scope="module")
def x86_vcpu():
    memory = GuestMemory([RegionSpec(0, 1 << 20)])
    vm = UnicornBackend().open_vm(Arch.X86_64, memory, [])
    yield vm.create_vcpu(0)
    vm.close()
    memory.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=x86_states())
def test_x86_state_round_trip(x86_vcpu, state: X86CpuState) -> None:
    x86_vcpu.set_state(state)
    first = x86_vcpu.get_state()
    assert first == state
    x86_vcpu.set_state(first)
    assert x86_vcpu.get_state() == state
    assert state_from_dict(state_to_dict(first)) == state


def test_x86_lma_and_segment_caches_survive_set_state(x86_vcpu) -> None:
    s = X86CpuState()
    s.cr0, s.cr4, s.efer = 0x80050033, 0x620, 0x501 | 0x400
    s.cs = Segment(0x33, 0, 0xFFFFFFFF, 0xB, 1, 3, 0, 1, 1, 1)
    s.ss = Segment(0x2B, 0x1000, 0xFFFFF, 0x3, 1, 3, 1, 1, 0, 1)
    x86_vcpu.set_state(s)
    out = x86_vcpu.get_state()
    assert out.efer & 0x400 and out.cpl == 3 and out.cs == s.cs and out.ss == s.ss


FPCR_BITS = 0x07F70000
FPSR_BITS = 0xF800009F


@st.composite
def arm64_states(draw) -> Arm64CpuState:
    s = Arm64CpuState()
    s.x = [draw(u64) for _ in range(31)]
    s.sp_el0, s.sp_el1, s.pc, s.elr_el1 = draw(u64), draw(u64), draw(u64), draw(u64)
    el = draw(st.sampled_from([0, 1]))
    spsel = draw(bit) if el else 0
    s.pstate = (draw(st.integers(0, 15)) << 28) | (draw(st.integers(0, 15)) << 6) | (el << 2) | spsel
    s.spsr_el1 = draw(u32)
    s.sysregs = {name: draw(u64) for name in ARM64_SYSREG_NAMES}
    s.sysregs["VBAR_EL1"] &= ~0x7FF
    s.v = [draw(st.integers(0, (1 << 128) - 1)) for _ in range(32)]
    s.fpcr = draw(u32) & FPCR_BITS
    s.fpsr = draw(u32) & FPSR_BITS
    s.cntvct = draw(u64)
    s.halted = draw(st.booleans())
    return s


@pytest.fixture(scope="module")
def arm64_vcpu():
    memory = GuestMemory([RegionSpec(0x40000000, 1 << 20)])
    vm = UnicornBackend().open_vm(Arch.AARCH64, memory, [])
    yield vm.create_vcpu(0)
    vm.close()
    memory.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(state=arm64_states())
def test_arm64_state_round_trip(arm64_vcpu, state: Arm64CpuState) -> None:
    arm64_vcpu.set_state(state)
    first = arm64_vcpu.get_state()
    assert first == state
    arm64_vcpu.set_state(first)
    assert arm64_vcpu.get_state() == state
    assert state_from_dict(state_to_dict(first)) == state
