"""hv's CPUID policy: the leaves hv owns, identical on every backend.

A guest kernel learns the TSC frequency and the local APIC timer's input clock from CPUID
instead of measuring them against the 8254 PIT, HPET or ACPI PM timer (Linux's
``native_calibrate_tsc()``, Intel only, reads leaf 0x15 when the maximum basic leaf is at
least 0x15; it then trusts the frequency, sets ``lapic_timer_period = crystal_khz * 1000
/ HZ`` and derives ``lpj_fine`` from it, so neither the TSC, the APIC timer nor the delay
loop needs a working timer tick to calibrate). hv's clocks are fixed, so this is exact:

* the TSC advances once per guest nanosecond on Unicorn (``hv_native_x86.c``), 1 GHz;
* the local APIC timer counts APIC bus cycles of 1 ns (``hv.devices.lapic.APIC_BUS_NS``), 1 GHz.

Leaf 0x15 therefore declares a 1 GHz "core crystal" (the APIC timer's clock, as on
hardware where the crystal drives the APIC timer) and a TSC/crystal ratio of 1/1.

On KVM the guest's TSC is the hardware's: it runs at the host's rate unless KVM scales it
(``KVM_SET_TSC_KHZ``, only with ``KVM_CAP_TSC_CONTROL``). The KVM backend asks for hv's
1 GHz where KVM can scale and otherwise declares the rate the TSC really has (the host's,
``KVM_GET_TSC_KHZ``): it builds its leaves with ``policy_leaves(tsc_hz)``. The crystal
(APIC timer) stays 1 GHz on every backend; only the TSC/crystal ratio changes.

The policy is a pure table: :func:`policy_leaves` maps (leaf, subleaf) to the four
registers and every backend applies it on top of what its engine would answer (Unicorn
in a CPUID hook, KVM in the table given to KVM_SET_CPUID2), so a guest sees the same
values before and after moving between backends. Leaves not listed here keep each
backend's own filtered answer.
"""
from __future__ import annotations

import math
import struct

from hv.devices.lapic import APIC_BUS_NS

VENDOR = b"GenuineIntel"
TSC_HZ = 1_000_000_000                      # one virtual TSC tick per guest ns
CRYSTAL_HZ = 1_000_000_000 // APIC_BUS_NS   # the local APIC timer's input clock
MAX_BASIC_LEAF = 0x16
# Leaves between the engines' own maximum (Unicorn's qemu64 model stops at 0xD) and the
# TSC leaves: hv describes nothing there (cache/RDT/SGX/trace enumerations), so they
# report zeros everywhere instead of whatever an engine repeats for out-of-range leaves.
ZEROED_LEAVES: tuple[int, ...] = tuple(range(0xE, 0x15))

Regs = tuple[int, int, int, int]


def _vendor_regs() -> tuple[int, int, int]:
    """The vendor string as CPUID leaf 0 returns it: EBX, EDX, ECX (in that byte order)."""
    ebx, edx, ecx = struct.unpack("<3I", VENDOR)
    return ebx, ecx, edx


def tsc_leaf(tsc_hz: int = TSC_HZ) -> Regs:
    """Leaf 0x15: EAX = denominator, EBX = numerator (TSC = crystal * EBX / EAX), ECX = crystal Hz."""
    if not 0 < tsc_hz < 1 << 40:
        raise ValueError(f"TSC frequency {tsc_hz} Hz out of range")
    g = math.gcd(tsc_hz, CRYSTAL_HZ)
    return CRYSTAL_HZ // g, tsc_hz // g, CRYSTAL_HZ, 0


def frequency_leaf(tsc_hz: int = TSC_HZ) -> Regs:
    """Leaf 0x16: base and maximum core frequency and the bus (reference) frequency, in MHz."""
    mhz = tsc_hz // 1_000_000
    return mhz, mhz, CRYSTAL_HZ // 1_000_000, 0


def policy_leaves(tsc_hz: int = TSC_HZ) -> dict[tuple[int, int], Regs]:
    """Every (leaf, subleaf) hv answers itself, with its EAX, EBX, ECX, EDX, for a guest
    whose TSC runs at ``tsc_hz`` (hv's virtual 1 GHz unless the backend cannot give it).

    The leaves listed are not indexed by ECX (subleaf 0 stands for all subleaves)."""
    ebx, ecx, edx = _vendor_regs()
    table: dict[tuple[int, int], Regs] = {(0x0, 0): (MAX_BASIC_LEAF, ebx, ecx, edx)}
    for leaf in ZEROED_LEAVES:
        table[(leaf, 0)] = (0, 0, 0, 0)
    table[(0x15, 0)] = tsc_leaf(tsc_hz)
    table[(0x16, 0)] = frequency_leaf(tsc_hz)
    return table


POLICY: dict[int, Regs] = {leaf: regs for (leaf, _sub), regs in policy_leaves().items()}


def lookup(leaf: int) -> Regs | None:
    """The policy's registers for a CPUID leaf (any subleaf), or None when the backend answers."""
    return POLICY.get(leaf & 0xFFFFFFFF)
