"""Setting a VM's guest TSC rate (``Vm.set_tsc_hz``, what a migration destination does
with the stream's ``tsc_hz``), on real backends.

Unicorn: the virtual TSC is the guest clock scaled by a 32.32 factor plus a per-vCPU
offset; a rate change rebases the offsets at one reading, so no TSC jumps or goes back,
the vCPUs' differences are kept, and from then on every TSC advances exactly
``scale(clock)``. KVM: a rate within 250 ppm of what the vCPUs run is declared as asked;
any other needs TSC control, and without it (kvm_pvm) is refused with nothing changed.
"""
from __future__ import annotations

from typing import Any

import pytest

from hv import cpuid
from hv.machine import Machine
from hv.memory import GuestMemory, RegionSpec
from hv.state import X86CpuState
from hv_backends.base import BackendError
from hv_backends.unicorn_x86_delivery import NativeX86
from tests.backends.kvm_x86_guest import RAM_SIZE
from tests.backends.test_cpuid import open_vm
from tests.helpers import FIXTURES, machine_in_process, requires_kvm, wait_console_lines

ODD_HZ = 1_234_567_000


def paused_tscs(machine: Machine) -> tuple[list[int], int]:
    snapshot = machine.save()
    cpus = [cpu for cpu in snapshot.cpus if isinstance(cpu, X86CpuState)]
    return [cpu.tsc for cpu in cpus], machine.interrupts.clock.now()


def leaf(vcpu: Any) -> tuple[int, int, int, int]:
    """CPUID 0x15 as KVM holds it for a KVM vCPU (KVM_GET_CPUID2)."""
    return next((a, b, c, d) for f, _i, _fl, a, b, c, d in vcpu.cpuid_table() if f == 0x15)


def scale(ns: int, hz: int) -> int:
    return (ns * NativeX86.mult_for(hz)) >> 32


def test_mult_is_exact_at_1_ghz_and_close_elsewhere() -> None:
    assert NativeX86.mult_for(cpuid.TSC_HZ) == 1 << 32 and scale(10**15, cpuid.TSC_HZ) == 10**15
    for hz in (cpuid.TSC_HZ_MIN, ODD_HZ, 2_596_140_000, cpuid.TSC_HZ_MAX):
        ten_s = scale(10 * 10**9, hz)
        assert abs(ten_s - 10 * hz) <= 10, (hz, ten_s)     # < 1 ppb after 10 s


@pytest.mark.parametrize("hz", [cpuid.TSC_HZ, 2_596_140_000, ODD_HZ, 2_095_077_000, 3_192_610_000,
                                cpuid.TSC_HZ_MIN, 4_294_000_000])
def test_leaf_0x15_survives_linux_32_bit_arithmetic(hz: int) -> None:
    """Linux computes crystal_khz * EBX / EAX in 32 bits: the exact ratio of 2596.140 MHz
    over the 1 GHz crystal (129807/50000) wrapped to a "19.159 MHz processor" and a Linux
    clock running 135x fast. hv declares a ratio with a small EBX that gives the rate to
    the kHz."""
    eax, ebx, ecx, _ = cpuid.tsc_leaf(hz)
    assert ecx == cpuid.CRYSTAL_HZ and (ecx // 1000) * ebx < 1 << 32
    assert cpuid.leaf_tsc_khz(eax, ebx, ecx) == hz // 1000
    assert cpuid.leaf_tsc_khz(50000, 129807, ecx) == 19159        # the wrapped exact ratio


def test_leaf_0x15_is_close_for_every_rate() -> None:
    """Some rates have no small-EBX ratio that is exact to the kHz (near simple fractions
    of the crystal, and above ~4 GHz): the closest one is within 120 ppm."""
    for khz in range(cpuid.TSC_HZ_MIN // 1000, cpuid.TSC_HZ_MAX // 1000, 9_973):
        eax, ebx, ecx, _ = cpuid.tsc_leaf(khz * 1000)
        assert (ecx // 1000) * ebx < 1 << 32
        assert abs(cpuid.leaf_tsc_khz(eax, ebx, ecx) - khz) <= max(1, khz * 120 // 1_000_000), khz


def test_unicorn_rate_change_keeps_every_tsc_and_their_difference() -> None:
    """-smp 2, both vCPUs running the smp fixture: paused, vCPU 1's TSC is set 12345 ticks
    ahead, the rate changes to ODD_HZ; the TSCs read back unchanged, and after running on
    each has advanced exactly scale(elapsed guest clock) at the new rate, 12345 apart."""
    machine, console = machine_in_process("q35", "unicorn", FIXTURES / "x86_64" / "smp.elf",
                                          "cpus=2 mib=1 iterations=0", "-smp", "2")
    try:
        machine.start()
        wait_console_lines(console, 2)
        assert machine.pause()
        snapshot = machine.save()
        assert isinstance(snapshot.cpus[1], X86CpuState)
        snapshot.cpus[1].tsc += 12_345
        machine.restore(snapshot)
        before, clock0 = paused_tscs(machine)
        assert before[1] - before[0] == 12_345
        machine.vm.set_tsc_hz(ODD_HZ)
        assert paused_tscs(machine) == (before, clock0)            # nothing jumped
        machine.resume()
        wait_console_lines(console, console.getvalue().count(b"\n") + 1)
        assert machine.pause()
        after, clock1 = paused_tscs(machine)
        assert clock1 > clock0
        advance = scale(clock1, ODD_HZ) - scale(clock0, ODD_HZ)
        assert [a - b for a, b in zip(after, before, strict=True)] == [advance, advance]
    finally:
        machine.close()


def test_unicorn_refuses_a_rate_it_cannot_declare() -> None:
    memory = GuestMemory([RegionSpec(0, RAM_SIZE)])
    vm = open_vm("unicorn", memory)
    try:
        vm.create_vcpu(0)
        rate = vm.tsc_hz
        for bad in (0, 999_000, ODD_HZ + 1, cpuid.TSC_HZ_MAX + 1000):
            with pytest.raises(BackendError, match="guest TSC rate: "):
                vm.set_tsc_hz(bad)
            assert vm.tsc_hz == rate
    finally:
        vm.close()
        memory.close()


@requires_kvm
def test_kvm_adopts_a_rate_within_tolerance_and_refuses_others() -> None:
    """Within 250 ppm of the vCPUs' rate: declared as asked (CPUID 0x15 re-set on every
    vCPU). Beyond it, without TSC control: BackendError naming both rates, and neither the
    rate nor any CPUID table changed. With TSC control: scaled (KVM_GET_TSC_KHZ agrees)."""
    from hv_backends import kvm_abi as abi

    memory = GuestMemory([RegionSpec(0, RAM_SIZE)])
    vm = open_vm("kvm", memory)
    try:
        vcpus = [vm.create_vcpu(i) for i in range(2)]
        khz = vm.tsc_khz  # type: ignore[attr-defined]
        near = (khz + khz // 5000) * 1000         # +200 ppm, whole kHz
        vm.set_tsc_hz(near)
        assert vm.tsc_hz == near
        assert all(leaf(v) == cpuid.tsc_leaf(near) for v in vcpus)
        far = (khz + khz // 2000) * 1000          # +500 ppm
        if not vm._tsc.scalable:  # type: ignore[attr-defined]
            with pytest.raises(BackendError, match="no KVM_CAP_TSC_CONTROL") as caught:
                vm.set_tsc_hz(far)
            assert cpuid.mhz_text(far) in str(caught.value)
            assert vm.tsc_hz == near
            assert all(leaf(v) == cpuid.tsc_leaf(near) for v in vcpus)
        else:
            vm.set_tsc_hz(ODD_HZ)
            for v in vcpus:
                got = abi.libc.ioctl(v._fd, abi.KVM_GET_TSC_KHZ, abi.ffi.cast("unsigned long", 0))  # type: ignore[attr-defined]
                assert got == ODD_HZ // 1000
                assert leaf(v) == cpuid.tsc_leaf(ODD_HZ)
    finally:
        vm.close()
        memory.close()
