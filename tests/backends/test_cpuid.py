"""hv's CPUID policy (hv/cpuid.py): the leaves that let Linux take the TSC frequency and
the local APIC timer's clock from CPUID are the same on every backend, and a guest reads
them. Real Unicorn and, where /dev/kvm is usable, real KVM."""
from __future__ import annotations

import struct

import pytest
from hv_backends.base import Arch, ExitReason, Vm
from hv_backends.kvm_state import apply_cpuid_policy
from hv_backends.unicorn import UnicornBackend
from hv_backends.unicorn_x86 import TSC_HZ_PER_NS

from hv import cpuid
from hv.devices.lapic import APIC_BUS_NS
from hv.memory import GuestMemory, RegionSpec
from tests.helpers import X86_BACKENDS, requires_kvm
from tests.backends.kvm_x86_guest import CODE, RAM_SIZE, RecordingIo, long_mode_state, write_page_tables

PORTS = (0x10, 0x11, 0x12, 0x13)


def snippet(leaf: int) -> bytes:
    """CPUID ``leaf`` (subleaf 0), then EAX, EBX, ECX, EDX out to ports 0x10..0x13; hlt."""
    return (b"\xB8" + struct.pack("<I", leaf) + b"\x31\xC9" + b"\x0F\xA2"       # mov eax, leaf; xor ecx, ecx; cpuid
            + b"\xE7\x10"                                                       # out 0x10, eax
            + b"\x89\xD8\xE7\x11" + b"\x89\xC8\xE7\x12" + b"\x89\xD0\xE7\x13"   # ebx, ecx, edx
            + b"\xF4")


def open_vm(backend: str, memory: GuestMemory) -> Vm:
    if backend == "kvm":
        from hv_backends.kvm import KvmBackend
        return KvmBackend().open_vm(Arch.X86_64, memory, [])
    return UnicornBackend().open_vm(Arch.X86_64, memory, [])


def guest_cpuid(backend: str, leaf: int, index: int = 0) -> tuple[int, int, int, int]:
    """What a long-mode guest on ``backend``'s vCPU ``index`` reads from CPUID ``leaf``."""
    memory = GuestMemory([RegionSpec(0, RAM_SIZE)])
    vm = open_vm(backend, memory)
    try:
        vcpu = vm.create_vcpu(index)
        write_page_tables(memory)
        memory.write(CODE, snippet(leaf))
        vcpu.set_state(long_mode_state(CODE))
        io = RecordingIo()
        assert vcpu.run(io).reason is ExitReason.HALT
        out = {port: value for kind, port, _size, value in io.log if kind == "out"}
        return tuple(out[p] for p in PORTS)  # type: ignore[return-value]
    finally:
        vm.close()
        memory.close()


def test_policy_describes_hv_clocks() -> None:
    """Leaf 0x15's crystal is the APIC timer's clock and crystal * EBX / EAX the TSC rate
    the Unicorn RDTSC hook runs at; leaf 0 names Intel (Linux reads 0x15 on Intel only)
    with a maximum basic leaf that includes 0x15 and 0x16."""
    eax, ebx, ecx, edx = cpuid.lookup(0x15)
    assert ecx == 1_000_000_000 // APIC_BUS_NS
    assert ecx * ebx // eax == TSC_HZ_PER_NS * 1_000_000_000 == cpuid.TSC_HZ
    assert edx == 0
    assert cpuid.lookup(0x16)[0] == cpuid.TSC_HZ // 1_000_000
    max_leaf, vb, vc, vd = cpuid.lookup(0)
    assert max_leaf >= 0x16
    assert struct.pack("<3I", vb, vd, vc) == b"GenuineIntel"
    assert cpuid.lookup(0x1) is None and cpuid.lookup(0x80000001) is None  # backends' own answers


def test_kvm_table_carries_policy() -> None:
    """The table handed to KVM_SET_CPUID2 gets the policy leaves, replacing or adding them
    (one unindexed entry each), and keeps the other entries."""
    host = [(0, 0, 0, 0xD, 0x68747541, 0x444D4163, 0x69746E65), (1, 0, 0, 0xA20F10, 0, 0, 0),
            (0x12, 0, 1, 5, 6, 7, 8), (0x12, 1, 1, 9, 9, 9, 9)]
    table = apply_cpuid_policy(host)
    got = {(f, i): regs for f, i, _flags, *regs in table}
    assert (1, 0) in got and got[(1, 0)] == [0xA20F10, 0, 0, 0]
    assert (0x12, 1) not in got
    for leaf, regs in cpuid.POLICY.items():
        assert got[(leaf, 0)] == list(regs)


@requires_kvm
def test_kvm_vm_table_carries_policy() -> None:
    """A real KVM VM's filtered table (built from KVM_GET_SUPPORTED_CPUID) has the policy."""
    from hv_backends.kvm import KvmBackend
    memory = GuestMemory([RegionSpec(0, RAM_SIZE)])
    vm = KvmBackend().open_vm(Arch.X86_64, memory, [])
    try:
        vm.create_vcpu(0)
        got = {(f, i): tuple(regs) for f, i, _flags, *regs in vm.guest_cpuid(0)}
        for key, regs in cpuid.policy_leaves(vm.tsc_khz * 1000).items():   # KVM's TSC rate
            assert got[key] == regs
    finally:
        vm.close()
        memory.close()


@pytest.mark.parametrize("backend", X86_BACKENDS)
@pytest.mark.parametrize("leaf", [0x0, 0x15, 0x16])
def test_guest_reads_policy(backend: str, leaf: int) -> None:
    """A guest executing CPUID gets the policy's registers on every backend, for the rate
    the backend's TSC runs at (KVM without TSC scaling: the host's, tests/backends/test_kvm_tsc.py)."""
    assert guest_cpuid(backend, leaf) == cpuid.policy_leaves(backend_tsc_hz(backend))[(leaf, 0)]


def backend_tsc_hz(backend: str) -> int:
    """The TSC rate a backend's vCPUs get (KVM: what it can give; Unicorn: by default the
    same as KVM on this host, hv's 1 GHz without KVM; tests/migration/test_migration_tsc.py)."""
    memory = GuestMemory([RegionSpec(0, RAM_SIZE)])
    vm = open_vm(backend, memory)
    try:
        vm.create_vcpu(0)
        assert vm.tsc_hz is not None
        return vm.tsc_hz
    finally:
        vm.close()
        memory.close()


def test_other_leaves_still_answered_by_engine() -> None:
    """Leaves outside the policy are the engine's own (leaf 1 reports SSE2 and the FPU)."""
    _eax, _ebx, _ecx, edx = guest_cpuid("unicorn", 1)
    assert edx & 1 and edx & (1 << 26)


@pytest.mark.parametrize("backend", X86_BACKENDS)
@pytest.mark.parametrize("index", [0, 1, 3])
def test_each_vcpu_reads_its_own_apic_id(backend: str, index: int) -> None:
    """CPUID.1:EBX[31:24] (initial APIC ID) is the vCPU index on every backend, as the MADT
    says: a Unicorn engine alone answers 0 on every vCPU, and an SMP Linux guest then
    reports "APIC id mismatch" and could hang bringing up its second CPU. x2APIC is not
    offered (hv's local APIC is an xAPIC)."""
    _eax, ebx, ecx, _edx = guest_cpuid(backend, 1, index)
    assert ebx >> 24 == index
    assert not ecx & (1 << 21)
    if backend == "unicorn":
        assert guest_cpuid(backend, 0xB, index)[3] == index
