"""hv's CPUID policy: the leaves hv owns, identical on every backend.

A guest kernel learns the TSC frequency and the local APIC timer's input clock from CPUID
instead of measuring them against the 8254 PIT, HPET or ACPI PM timer (Linux's
``native_calibrate_tsc()``, Intel only, reads leaf 0x15 when the maximum basic leaf is at
least 0x15; it then trusts the frequency, sets ``lapic_timer_period = crystal_khz * 1000
/ HZ`` and derives ``lpj_fine`` from it, so neither the TSC, the APIC timer nor the delay
loop needs a working timer tick to calibrate). hv's clocks are fixed, so this is exact:

* the local APIC timer counts APIC bus cycles of 1 ns (``hv.devices.lapic.APIC_BUS_NS``), 1 GHz;
* the TSC runs at the VM's rate ``tsc_hz``: on Unicorn the guest clock scaled natively
  (``hv_native_x86.c``, any rate; one tick per guest ns at hv's 1 GHz).

Leaf 0x15 therefore declares a 1 GHz "core crystal" (the APIC timer's clock, as on
hardware where the crystal drives the APIC timer) and a TSC/crystal ratio of
``tsc_hz / 1 GHz`` (1/1 at 1 GHz), written so that Linux's 32-bit arithmetic reads the
rate to the kHz (:func:`tsc_ratio`).

On KVM the guest's TSC is the hardware's: it runs at the host's rate unless KVM scales it
(``KVM_SET_TSC_KHZ``, only with ``KVM_CAP_TSC_CONTROL``). The KVM backend asks for hv's
1 GHz where KVM can scale and otherwise declares the rate the TSC really has (the host's,
``KVM_GET_TSC_KHZ``): it builds its leaves with ``policy_leaves(tsc_hz)``. A new Unicorn
VM takes the rate a KVM VM would get on the same host (1 GHz without KVM), and a migrated
guest keeps its source's rate (the stream's CONFIG ``tsc_hz``; see
``docs/migration-stream.md``), so the limits of that rate are here: :func:`tsc_hz_problem`.
The crystal (APIC timer) stays 1 GHz on every backend; only the TSC/crystal ratio changes.

The policy is a pure table: :func:`policy_leaves` maps (leaf, subleaf) to the four
registers and every backend applies it on top of what its engine would answer (Unicorn
in a CPUID hook, KVM in the table given to KVM_SET_CPUID2), so a guest sees the same
values before and after moving between backends. Leaves not listed here keep each
backend's own filtered answer.
"""
from __future__ import annotations

import functools
import math
import struct
from fractions import Fraction

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


# The guest TSC rates hv can declare and migrate (hv.migration's CONFIG "tsc_hz"). A whole
# number of kHz: KVM sets and reports the rate in kHz, and with a crystal of 1 GHz leaf
# 0x15's numerator (rate / gcd(rate, crystal)) then stays below 10^8, inside its 32 bits.
# At least 1 MHz (leaf 0x16 reports MHz) and at most 65535 MHz (leaf 0x16's 16-bit field).
TSC_HZ_MIN = 1_000_000
TSC_HZ_MAX = 65_535_000_000
# Two rates this close are the same rate: KVM's own tolerance (its tsc_tolerance_ppm
# module parameter, 250 by default) before it scales a guest TSC at all.
TSC_TOLERANCE_PPM = 250


def tsc_hz_problem(tsc_hz: object) -> str | None:
    """None when ``tsc_hz`` is a rate hv can give a guest TSC, else why not (one line)."""
    if isinstance(tsc_hz, bool) or not isinstance(tsc_hz, int):
        return f"expected an integer number of Hz, got {type(tsc_hz).__name__}"
    if not TSC_HZ_MIN <= tsc_hz <= TSC_HZ_MAX:
        shown = str(tsc_hz) if abs(tsc_hz) < 1 << 64 else f"a {tsc_hz.bit_length()}-bit number of"
        return f"{shown} Hz is outside [{TSC_HZ_MIN}, {TSC_HZ_MAX}]"
    if tsc_hz % 1000:
        return f"{tsc_hz} Hz is not a whole number of kHz"
    return None


def same_tsc_rate(a_hz: int, b_hz: int) -> bool:
    """Whether a guest calibrated at ``a_hz`` may run on a TSC of ``b_hz`` (within
    :data:`TSC_TOLERANCE_PPM`, as KVM itself decides when it needs no scaling)."""
    return abs(a_hz - b_hz) * 1_000_000 <= TSC_TOLERANCE_PPM * a_hz


def mhz_text(tsc_hz: int) -> str:
    """A rate for messages: '2596.140 MHz'."""
    return f"{tsc_hz / 1e6:.3f} MHz"


# Linux (native_calibrate_tsc) computes the TSC kHz from leaf 0x15 in 32-bit unsigned
# arithmetic: crystal_khz * EBX / EAX. With the 1 GHz crystal (crystal_khz = 10^6) EBX
# must stay at or below this, or the product wraps: 2596.140 MHz written as the exact
# 129807/50000 made Linux detect a "19.159 MHz processor" and run its clock 135x fast.
_MAX_NUMERATOR = 0xFFFF_FFFF // (CRYSTAL_HZ // 1000)


def _simplest_between(low: Fraction, high: Fraction) -> Fraction:
    """The fraction with the smallest denominator (and numerator) in [low, high], 0 < low <= high
    (the Stern-Brocot descent: a few steps of a continued fraction)."""
    whole = math.floor(low)
    if whole == low:
        return Fraction(whole)
    if whole + 1 <= high:
        return Fraction(whole + 1)
    return whole + 1 / _simplest_between(1 / (high - whole), 1 / (low - whole))


@functools.cache
def tsc_ratio(tsc_hz: int) -> tuple[int, int]:
    """(EAX, EBX) of leaf 0x15 for a ``tsc_hz`` TSC over the 1 GHz crystal, such that
    Linux's 32-bit ``crystal_khz * EBX / EAX`` gives exactly ``tsc_hz`` in kHz: the
    simplest ratio in [kHz, kHz + 1) / crystal kHz. Where no such ratio has a small enough
    EBX (some rates above about 4 GHz), the closest one that has."""
    crystal_khz, khz = CRYSTAL_HZ // 1000, tsc_hz // 1000
    ratio = _simplest_between(Fraction(khz, crystal_khz), Fraction(khz + 1, crystal_khz) - Fraction(1, 10 ** 30))
    if ratio.numerator > _MAX_NUMERATOR:
        inverse = Fraction(crystal_khz, khz).limit_denominator(_MAX_NUMERATOR)
        ratio = 1 / inverse
    return ratio.denominator, ratio.numerator


def leaf_tsc_khz(eax: int, ebx: int, ecx: int) -> int:
    """The TSC kHz a guest reads from leaf 0x15, computed as Linux does (truncated to 32 bits)."""
    return ((ecx // 1000) * ebx & 0xFFFF_FFFF) // eax if eax and ebx else 0


def tsc_leaf(tsc_hz: int = TSC_HZ) -> Regs:
    """Leaf 0x15: EAX = denominator, EBX = numerator (TSC = crystal * EBX / EAX, see
    :func:`tsc_ratio`: within 1 kHz of ``tsc_hz``), ECX = crystal Hz."""
    problem = tsc_hz_problem(tsc_hz)
    if problem is not None:
        raise ValueError(f"TSC frequency: {problem}")
    eax, ebx = tsc_ratio(tsc_hz)
    return eax, ebx, CRYSTAL_HZ, 0


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


@functools.cache
def policy_by_leaf(tsc_hz: int = TSC_HZ) -> dict[int, Regs]:
    """:func:`policy_leaves` keyed by leaf alone (a CPUID hook's lookup table)."""
    return {leaf: regs for (leaf, _sub), regs in policy_leaves(tsc_hz).items()}


POLICY: dict[int, Regs] = policy_by_leaf()


def lookup(leaf: int, tsc_hz: int = TSC_HZ) -> Regs | None:
    """The policy's registers for a CPUID leaf (any subleaf), or None when the backend answers."""
    return policy_by_leaf(tsc_hz).get(leaf & 0xFFFFFFFF)
