"""The TSC of every Unicorn x86 vCPU of a machine follows one clock: the guest clock.

Linux compares the TSCs of its CPUs (the TSC sync check at CPU bring-up, the clocksource
watchdog) and calibrates the local APIC timer and its delay loop against the TSC. On
hardware every TSC counts from power-on, whether its CPU runs, halts or waits for SIPI.
Each Unicorn vCPU used to count only while it executed the guest, so a secondary started
at 0 long after the boot CPU, and any halt made it fall further behind; SMP Linux marked the
TSC unstable. Now the TSC is the machine's guest clock (1 tick per ns, it runs while the
machine runs and stands still while it is paused) plus a per-vCPU offset that a saved state
carries, so vCPUs never drift apart and no TSC goes backwards across a pause, a save or a
restore into another machine.

The guests are the smp fixture on a ``-smp 2`` q35 machine in this process: ``cpus=1``
leaves vCPU 1 waiting for SIPI (never run), ``cpus=2`` runs both vCPUs, which halt and wake.
"""
from __future__ import annotations

import pytest

from hv.console import BufferSink
from hv.devices.clock import GuestClock
from hv.machine import Machine
from hv.machine.move import copy_ram
from hv.state import X86CpuState
from hv_backends.base import ExitReason
from hv_backends.unicorn_x86_delivery import NativeX86
from tests.backends.unicorn_x86_guest import KCODE, X86Guest
from tests.helpers import FIXTURES, machine_in_process, wait_console_lines


def build(cpus: int) -> tuple[Machine, BufferSink]:
    return machine_in_process("q35", "unicorn", FIXTURES / "x86_64" / "smp.elf",
                              f"cpus={cpus} mib=1 iterations=0", "-smp", "2")


def paused_tscs(machine: Machine) -> tuple[list[int], int]:
    """Every vCPU's TSC and the guest clock, read while the machine is paused; the clock
    in TSC ticks of the machine's rate (``ticks``)."""
    snapshot = machine.save()
    tscs = []
    for cpu in snapshot.cpus:
        assert isinstance(cpu, X86CpuState)
        tscs.append(cpu.tsc)
    return tscs, ticks(machine, machine.interrupts.clock.now())


def ticks(machine: Machine, ns: int) -> int:
    """``ns`` of guest clock in TSC ticks at the machine's rate (1 GHz: ``ns`` itself;
    by default the rate a KVM guest gets on this host, hv_backends.unicorn.default_tsc_hz)."""
    hz = machine.vm.tsc_hz
    assert hz is not None
    return (ns * NativeX86.mult_for(hz)) >> 32


@pytest.mark.parametrize("cpus", [1, 2])
def test_every_vcpu_tsc_is_the_guest_clock_running_or_not(cpus: int) -> None:
    """Paused: each vCPU's TSC is exactly the guest clock, in ticks of the machine's TSC
    rate (the boot state's TSC is 0 at clock 0), whether the vCPU ran, halted or never
    ran; after a resume they have all moved on together."""
    machine, console = build(cpus)
    try:
        machine.start()
        wait_console_lines(console, 2)
        assert machine.pause()
        tscs, clock_ns = paused_tscs(machine)
        assert tscs == [clock_ns, clock_ns], (tscs, clock_ns)
        assert paused_tscs(machine) == (tscs, clock_ns)      # paused: nothing moves
        machine.resume()
        wait_console_lines(console, console.getvalue().count(b"\n") + 1)
        assert machine.pause()
        later, later_ns = paused_tscs(machine)
        assert later == [later_ns, later_ns] and later_ns > clock_ns
    finally:
        machine.close()


def test_a_restored_tsc_continues_from_the_saved_value_on_every_vcpu() -> None:
    """A snapshot loaded into a fresh machine (the destination of a migration): each
    vCPU's TSC continues from the value saved for it -- including a per-vCPU difference
    the snapshot carries -- and never goes backwards."""
    source, console = build(2)
    try:
        source.start()
        wait_console_lines(console, 2)
        assert source.pause()
        snapshot = source.save()
        destination, console = build(2)
        copy_ram(source.memory, destination.memory)
    finally:
        source.close()
    saved = [cpu.tsc for cpu in snapshot.cpus if isinstance(cpu, X86CpuState)]
    assert isinstance(snapshot.cpus[1], X86CpuState)
    snapshot.cpus[1].tsc += 12_345            # as a source whose TSCs differed would send
    try:
        destination.restore(snapshot)
        destination.start(paused=True)
        tscs, _ = paused_tscs(destination)
        assert tscs == [saved[0], saved[1] + 12_345]
        destination.resume()
        wait_console_lines(console, 1)          # the guest ran on (its next line)
        assert destination.pause()
        after, _ = paused_tscs(destination)
        assert after[0] > saved[0] and after[1] - after[0] == 12_345 + saved[1] - saved[0]
    finally:
        destination.close()


def test_rdtscp_reads_the_virtual_tsc_and_tsc_aux() -> None:
    """RDTSCP (Linux's rdtsc_ordered, hence its TSC clocksource, where CPUID offers it)
    reads the same virtual TSC as RDTSC, with ECX = IA32_TSC_AUX. Unicorn's own RDTSCP
    returns the host's TSC: another counter, at another rate, that no pause or migration
    stops."""
    guest = X86Guest()
    try:
        guest.load(KCODE, """
            mov ecx, 0xC0000103
            mov eax, 7
            xor edx, edx
            wrmsr
            rdtsc
            shl rdx, 32
            or rax, rdx
            mov rbx, rax
            rdtscp
            shl rdx, 32
            or rax, rdx
            mov rsi, rax
            mov rdi, rcx
            rdtsc
            shl rdx, 32
            or rax, rdx
            hlt
        """)
        state = guest.kernel_state()
        state.tsc = 1 << 50
        guest.vcpu.set_state(state)
        assert guest.run().reason is ExitReason.HALT
        out = guest.vcpu.get_state()
    finally:
        guest.close()
    assert (1 << 50) <= out.rbx <= out.rsi <= out.rax <= out.tsc < (1 << 50) + 10**10
    assert out.rdi == 7


def test_guest_clock_timeline_is_what_now_computes() -> None:
    """The (guest ns, host ns) pair the RDTSC hook computes from gives exactly what
    GuestClock.now() says, running or stopped."""
    host = [1_000]
    clock = GuestClock(host_ns=lambda: host[0])
    assert clock.timeline() == (0, None)
    clock.set_running(True)
    host[0] = 5_000
    guest_ns, host_ns = clock.timeline()
    assert host_ns is not None and guest_ns + (host[0] - host_ns) == clock.now() == 4_000
    clock.set_running(False)
    host[0] = 9_000
    assert clock.timeline() == (4_000, None) and clock.now() == 4_000
