"""What an x86_64 KVM vCPU is, as hv sees it: the canonical :class:`hv.state.X86CpuState`
from and to KVM_{GET,SET}_{REGS,SREGS,MSRS,XSAVE,VCPU_EVENTS}, and the CPUID filter every
vCPU gets (split from :mod:`hv_backends.kvm`, which keeps creating, running and kicking)."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from hv import cpuid as cpuid_policy
from hv.state import CANONICAL_MSRS, FXSAVE_SIZE, X86_SEGMENT_NAMES, DescriptorTable, Segment, X86CpuState
from hv_backends import kvm_abi as abi
from hv_backends.base import BackendError

log = logging.getLogger("hv_backends.kvm")

ffi = abi.ffi
_ioctl = abi.ioctl_checked
# Every type string read_state / write_state / get_msrs / set_msrs use (see abi.preparse).
abi.preparse("struct kvm_regs *", "struct kvm_sregs *", "struct kvm_xsave *", "struct kvm_vcpu_events *",
             "struct kvm_mp_state *", "struct kvm_msrs", "struct kvm_msr_entry", "struct kvm_msrs *",
             "char[]")

XSAVE_HEADER_OFFSET = 512
XSTATE_X87_SSE = 0x3
# Bytes 416..511 of the FXSAVE image are reserved / available to software: KVM ignores
# them on SET and fills them with its own bookkeeping on GET. The canonical state holds
# them as zeros so that images from different backends compare equal.
FXSAVE_ARCH_END = 416


def _bits(*positions: int) -> int:
    mask = 0
    for bit in positions:
        mask |= 1 << bit
    return mask


# CPUID filter. The guest sees what KVM supports here AND what Unicorn 2.1.4's TCG
# (QEMU 5 "qemu64" plus what it emulates) also runs, so a guest that probed CPUID on one
# backend keeps working after migrating to the other. Deliberately conservative: x87,
# MMX, SSE, SSE2, SSE3, CX8/CX16, CMOV, PAE/PSE/PGE/PAT, SYSENTER/SYSCALL, NX, long
# mode, LAHF. No AVX, no XSAVE/OSXSAVE (so no leaf 0xD state), no leaf 7 extensions, no
# KVM paravirtual leaves (they need kvmclock and friends which Unicorn cannot carry), no
# x2APIC / TSC-deadline (hv's interrupt controller is an xAPIC device model).
# Measured limitation: kvm_pvm replaces the feature words of leaves 1, 7 and 0xD in the
# table given to KVM_SET_CPUID2 with the host's (KVM_GET_CPUID2 shows them; the guest's
# CPUID sees them); fields such as the APIC ID and the dropped leaves do follow the table.
# There the filter is advisory; on hardware KVM the table below is what the guest sees.
# Leaves listed here are ANDed register by register; leaves in CPUID_ZEROED are kept
# (so the maximum-leaf values stay truthful) but report nothing.
CPUID_MASKS: dict[int, tuple[int, int, int, int]] = {  # leaf -> (eax, ebx, ecx, edx) masks
    0x1: (
        0xFFFFFFFF,
        0x00FFFFFF,  # bits 31:24 (initial APIC ID) are replaced by the vCPU index
        _bits(0, 13),  # SSE3, CX16
        _bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15, 16, 17, 19, 23, 24, 25, 26),
    ),
    0x80000001: (
        0xFFFFFFFF,
        0,
        _bits(0),  # LAHF/SAHF in long mode
        _bits(11, 20, 29) | _bits(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 13, 14, 15, 16, 17, 23, 24),
    ),
}
CPUID_ZEROED: frozenset[int] = frozenset({0x6, 0x7, 0xA, 0xD, 0x12, 0x14, 0x17, 0x18, 0x19, 0x1D, 0x1E,
                                          0x8000001F, 0x80000021})
CPUID_DROPPED_RANGE = (0x40000000, 0x400000FF)  # hypervisor (KVM paravirt) leaves

CpuidEntry = tuple[int, int, int, int, int, int, int]  # function, index, flags, eax, ebx, ecx, edx


def apply_cpuid_policy(entries: list[CpuidEntry], tsc_hz: int = cpuid_policy.TSC_HZ) -> list[CpuidEntry]:
    """The filtered table with hv's own leaves (:mod:`hv.cpuid`: vendor, maximum basic
    leaf, TSC/crystal frequency) put in place of the host's, added when the host lacks
    them, so a KVM guest reads the same values as a Unicorn guest — except the TSC
    frequency, which is ``tsc_hz``, the rate the vCPU's TSC really runs at (see
    :meth:`hv_backends.kvm.KvmVm.tsc_khz`). Policy leaves are not indexed: every subleaf
    the host listed for them is replaced by one entry."""
    out = [e for e in entries if cpuid_policy.lookup(e[0]) is None]
    for (leaf, _sub), regs in sorted(cpuid_policy.policy_leaves(tsc_hz).items()):
        out.append((leaf, 0, 0, *regs))
    return sorted(out, key=lambda e: (e[0], e[1]))


HV_TSC_KHZ = cpuid_policy.TSC_HZ // 1000   # the rate hv's policy prefers where KVM can scale


def tsc_khz_of(vcpu_fd: int) -> int:
    khz = abi.libc.ioctl(vcpu_fd, abi.KVM_GET_TSC_KHZ, ffi.cast("unsigned long", 0))
    if khz <= 0:
        raise BackendError(f"KVM_GET_TSC_KHZ: {abi.errno_text(ffi.errno)}")
    return int(khz)


@dataclass
class GuestTsc:
    """The rate of a VM's guest TSC, fixed by its first vCPU and declared in CPUID.

    With ``KVM_CAP_TSC_CONTROL`` each vCPU is scaled to hv's 1 GHz (``KVM_SET_TSC_KHZ``),
    or to a migrated guest's rate (:meth:`adopt`). Without it (kvm_pvm) the TSC is the
    host's and the VM declares that rate (``KVM_GET_TSC_KHZ``, read before any set: a
    refused KVM_SET_TSC_KHZ still changes what GET answers, and a VM-wide KVM_SET_TSC_KHZ
    is accepted without a ``KVM_CAP_VM_TSC_CONTROL`` and then reported by GET although the
    TSC is not scaled). A guest calibrates its TSC once, at boot, so a migration carries
    the rate (the stream's CONFIG ``tsc_hz``, format 1.4) and a destination that cannot
    run it refuses the guest before it runs (:meth:`adopt`).
    """

    scalable: bool
    khz: int | None = None          # the rate the vCPUs' TSCs run at
    scaled: bool = False
    target_khz: int = HV_TSC_KHZ    # what a scalable KVM sets on each new vCPU
    declared_hz: int | None = None  # the rate CPUID declares when not khz * 1000 (adopt)

    @property
    def hz(self) -> int | None:
        """The guest's TSC rate in Hz, as CPUID 0x15/0x16 declare it (None before vCPU 0)."""
        if self.declared_hz is not None:
            return self.declared_hz
        return None if self.khz is None else self.khz * 1000

    def configure(self, vcpu_fd: int) -> int:
        """Give a new vCPU the VM's TSC rate (kHz), fixing it with the first vCPU."""
        host = tsc_khz_of(vcpu_fd)
        if self.scalable and (self.khz is None or self.scaled):
            if abi.libc.ioctl(vcpu_fd, abi.KVM_SET_TSC_KHZ, ffi.cast("unsigned long", self.target_khz)) == 0:
                self.khz, self.scaled = self.target_khz, True
                return self.target_khz
            if self.scaled:
                raise BackendError(f"KVM_SET_TSC_KHZ {self.target_khz}: {abi.errno_text(ffi.errno)} "
                                   "on a later vCPU")
            log.info("KVM cannot scale the TSC to %d kHz: the guest's TSC runs at the host's %d kHz",
                     self.target_khz, host)
        if self.khz is None:
            self.khz = host
        elif self.khz != host:
            raise BackendError(f"vCPU TSC rates differ: {host} kHz, the first vCPU {self.khz} kHz")
        return host

    def adopt(self, tsc_hz: int, vcpu_fds: list[int]) -> None:
        """Run a migrated guest's TSC at ``tsc_hz`` on the (not yet run) vCPUs ``vcpu_fds``,
        or raise :class:`BackendError` saying why not, with nothing changed. A rate within
        :data:`hv.cpuid.TSC_TOLERANCE_PPM` of the vCPUs' own needs no scaling (KVM's own
        rule) and is declared as the source declared it; any other needs TSC control."""
        problem = cpuid_policy.tsc_hz_problem(tsc_hz)
        if problem is not None:
            raise BackendError(f"guest TSC rate: {problem}")
        if self.khz is None:
            raise BackendError("the guest TSC rate is fixed by the first vCPU: create it first")
        if cpuid_policy.same_tsc_rate(tsc_hz, self.khz * 1000):
            self.declared_hz = tsc_hz
            return
        mhz = cpuid_policy.mhz_text
        if not self.scalable:
            raise BackendError(f"the guest's TSC runs at {mhz(tsc_hz)}; KVM on this host runs guests at "
                               f"the host's {mhz(self.khz * 1000)} and cannot scale the TSC "
                               "(no KVM_CAP_TSC_CONTROL)")
        khz = tsc_hz // 1000
        for done, fd in enumerate(vcpu_fds):
            if abi.libc.ioctl(fd, abi.KVM_SET_TSC_KHZ, ffi.cast("unsigned long", khz)) != 0:
                error = abi.errno_text(ffi.errno)
                for undo in vcpu_fds[:done]:   # back to the rate the others still have
                    abi.libc.ioctl(undo, abi.KVM_SET_TSC_KHZ, ffi.cast("unsigned long", self.khz))
                raise BackendError(f"KVM cannot scale the guest's TSC to {mhz(tsc_hz)} "
                                   f"(KVM_SET_TSC_KHZ {khz}: {error})")
        self.khz = self.target_khz = khz
        self.scaled, self.declared_hz = True, tsc_hz


def _segment_from_kvm(seg: Any) -> Segment:
    return Segment(seg.selector, seg.base, seg.limit, seg.type, seg.present, seg.dpl, seg.db, seg.s,
                   seg.l, seg.g, seg.avl, seg.unusable)


def _segment_to_kvm(seg: Segment, out: Any) -> None:
    out.selector = seg.selector
    out.base = seg.base
    out.limit = seg.limit
    out.type = seg.type
    out.present = seg.present
    out.dpl = seg.dpl
    out.db = seg.db
    out.s = seg.s
    out.l = seg.l
    out.g = seg.g
    out.avl = seg.avl
    out.unusable = seg.unusable
    out.padding = 0


_REG_NAMES = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
              "r12", "r13", "r14", "r15", "rip", "rflags")
_STATE_MSRS: tuple[int, ...] = (*CANONICAL_MSRS, abi.MSR_IA32_TSC)


def read_state(fd: int, index: int, halted: bool, has_mp_state: bool) -> X86CpuState:
    """The canonical state of the stopped vCPU ``fd`` (``index`` for messages; ``halted``:
    its last run ended in HLT)."""
    regs = ffi.new("struct kvm_regs *")
    _ioctl(fd, abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
    sregs = ffi.new("struct kvm_sregs *")
    _ioctl(fd, abi.KVM_GET_SREGS, sregs, "KVM_GET_SREGS")
    msrs = get_msrs(fd, _STATE_MSRS)
    xsave = ffi.new("struct kvm_xsave *")
    _ioctl(fd, abi.KVM_GET_XSAVE, xsave, "KVM_GET_XSAVE")
    events = ffi.new("struct kvm_vcpu_events *")
    _ioctl(fd, abi.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
    if has_mp_state:
        mp = ffi.new("struct kvm_mp_state *")
        _ioctl(fd, abi.KVM_GET_MP_STATE, mp, "KVM_GET_MP_STATE")
        halted = halted or mp.mp_state == abi.KVM_MP_STATE_HALTED
    if events.interrupt.injected or events.exception.injected or events.nmi.injected:
        # The canonical state has no field for an event KVM has queued but not yet
        # delivered (an interrupt injected right before a kicked run): it would be lost
        # if this state were moved elsewhere.
        log.warning("vCPU %d: state taken with an undelivered event queued in KVM "
                    "(interrupt %s, exception %s, NMI %s)", index,
                    events.interrupt.nr if events.interrupt.injected else "-",
                    events.exception.nr if events.exception.injected else "-",
                    "yes" if events.nmi.injected else "-")
    kwargs: dict[str, Any] = {name: getattr(regs, name) for name in _REG_NAMES}
    for name in X86_SEGMENT_NAMES:
        kwargs[name] = _segment_from_kvm(getattr(sregs, name))
    kwargs["gdt"] = DescriptorTable(sregs.gdt.base, sregs.gdt.limit)
    kwargs["idt"] = DescriptorTable(sregs.idt.base, sregs.idt.limit)
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        kwargs[name] = getattr(sregs, name)
    tsc = msrs.pop(abi.MSR_IA32_TSC)
    return X86CpuState(
        **kwargs,
        msrs=msrs,
        fxsave=bytes(ffi.buffer(xsave, FXSAVE_ARCH_END)) + bytes(FXSAVE_SIZE - FXSAVE_ARCH_END),
        tsc=tsc,
        interrupt_shadow=events.interrupt.shadow,
        nmi_masked=bool(events.nmi.masked),
        halted=halted,
    )


def get_msrs(fd: int, numbers: tuple[int, ...]) -> dict[int, int]:
    """MSR values by number (KVM_GET_MSRS); BackendError names the first one KVM refused."""
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(numbers) * ffi.sizeof("struct kvm_msr_entry"))
    arg = ffi.cast("struct kvm_msrs *", buf)
    arg.nmsrs = len(numbers)
    for i, number in enumerate(numbers):
        arg.entries[i].index = number
    got = _ioctl(fd, abi.KVM_GET_MSRS, arg, "KVM_GET_MSRS")
    if got != len(numbers):
        raise BackendError(f"KVM_GET_MSRS: KVM cannot read MSR {numbers[got]:#x}")
    return {arg.entries[i].index: arg.entries[i].data for i in range(len(numbers))}


def set_msrs(fd: int, values: dict[int, int]) -> None:
    """Write MSRs (KVM_SET_MSRS); BackendError names the first one KVM rejected."""
    items = list(values.items())
    buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + len(items) * ffi.sizeof("struct kvm_msr_entry"))
    arg = ffi.cast("struct kvm_msrs *", buf)
    arg.nmsrs = len(items)
    for i, (number, value) in enumerate(items):
        arg.entries[i].index = number
        arg.entries[i].data = value
    done = _ioctl(fd, abi.KVM_SET_MSRS, arg, "KVM_SET_MSRS")
    if done != len(items):
        number, value = items[done]
        raise BackendError(f"KVM_SET_MSRS: KVM rejected MSR {number:#x} = {value:#x}")


def write_state(fd: int, state: X86CpuState) -> None:
    """Load canonical ``state`` into the stopped vCPU ``fd`` (HLT-ness is the caller's)."""
    sregs = ffi.new("struct kvm_sregs *")
    for name in X86_SEGMENT_NAMES:
        _segment_to_kvm(getattr(state, name), getattr(sregs, name))
    sregs.gdt.base, sregs.gdt.limit = state.gdt.base, state.gdt.limit
    sregs.idt.base, sregs.idt.limit = state.idt.base, state.idt.limit
    for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer", "apic_base"):
        setattr(sregs, name, getattr(state, name))
    _ioctl(fd, abi.KVM_SET_SREGS, sregs, "KVM_SET_SREGS")
    regs = ffi.new("struct kvm_regs *")
    for name in _REG_NAMES:
        setattr(regs, name, getattr(state, name))
    _ioctl(fd, abi.KVM_SET_REGS, regs, "KVM_SET_REGS")
    msrs = dict(state.msrs)
    # KVM treats a host write of TSC = 0 as "synchronise with the other vCPUs" and
    # keeps its own value; 1 is honoured (one cycle later than asked, unobservable).
    msrs[abi.MSR_IA32_TSC] = state.tsc or 1
    set_msrs(fd, msrs)
    xsave = ffi.new("struct kvm_xsave *")
    _ioctl(fd, abi.KVM_GET_XSAVE, xsave, "KVM_GET_XSAVE")
    area = ffi.buffer(xsave)
    area[0:FXSAVE_SIZE] = state.fxsave
    header = XSAVE_HEADER_OFFSET
    xstate_bv = int.from_bytes(area[header:header + 8], "little") | XSTATE_X87_SSE
    area[header:header + 8] = xstate_bv.to_bytes(8, "little")
    _ioctl(fd, abi.KVM_SET_XSAVE, xsave, "KVM_SET_XSAVE (x87/SSE image rejected: check MXCSR)")
    events = ffi.new("struct kvm_vcpu_events *")
    _ioctl(fd, abi.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
    events.interrupt.shadow = state.interrupt_shadow
    events.nmi.masked = 1 if state.nmi_masked else 0
    events.flags = abi.KVM_VCPUEVENT_VALID_SHADOW
    _ioctl(fd, abi.KVM_SET_VCPU_EVENTS, events, "KVM_SET_VCPU_EVENTS")
