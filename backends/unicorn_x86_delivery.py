"""Exception, interrupt and SYSCALL delivery of x86_64 vCPUs on Unicorn 2.1.4.

Unicorn does not deliver exceptions or ``int n`` through the guest IDT, and SYSCALL only
calls a hook. hv does it in two ways that must agree exactly:

* natively, inside the engine's hooks (``native/hv_native_x86.c``): the common 64-bit
  cases -- interrupt/trap gates, TSS.RSP0..2 and IST stack switches, SYSCALL through
  STAR/LSTAR/SFMASK, external interrupts injected by the VMM, RDTSC -- without stopping
  the engine or capturing the CPU state (a few microseconds instead of ~0.6 ms);
* in Python (:class:`X86Delivery`, the reference): everything the native code leaves
  alone (a delivery that itself faults, so double/triple-fault escalation; #DF; #UD;
  legacy modes). The native hook then records the event and stops the engine.

``HV_UNICORN_X86_NATIVE=0`` in the environment (or ``vcpu.native_delivery = False``)
sends every event down the Python path, so tests can check both against each other.
"""
from __future__ import annotations

import ctypes
import functools
import os
import struct
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from hv.memory import PAGE_SIZE, GuestMemoryError
from hv.state import EFER_LMA, Segment, X86CpuState
from hv_backends.base import BackendError
from hv_backends.unicorn_common import (
    UnicornLayoutError,
    _fn_addr,
    _import_unicorn,
    _native,
    add_native_hook,
    add_native_insn_hooks,
)

if TYPE_CHECKING:
    from hv.devices.clock import GuestClock
    from hv_backends.unicorn_x86 import UnicornX86Vcpu

NATIVE_ENV = "HV_UNICORN_X86_NATIVE"

RFLAGS_TF = 1 << 8
RFLAGS_IF = 1 << 9
RFLAGS_NT = 1 << 14
RFLAGS_RF = 1 << 16
RFLAGS_VM = 1 << 17
RFLAGS_AC = 1 << 18

EXC_DF = 8
EXC_TS = 10
EXC_NP = 11
EXC_SS = 12
EXC_GP = 13
EXC_PF = 14
EXC_UD = 6
EXC_SYSCALL = -1  # pseudo vector: the SYSCALL instruction
ERROR_CODE_VECTORS = frozenset({8, 10, 11, 12, 13, 14, 17, 21})


def flags_to_seg(selector: int, base: int, limit: int, flags: int) -> Segment:
    """A Segment from QEMU's descriptor-cache fields (flags: descriptor bits 8..23 of the high word)."""
    present = (flags >> 15) & 1
    return Segment(selector=selector & 0xFFFF, base=base, limit=limit & 0xFFFFFFFF, type=(flags >> 8) & 0xF,
                   present=present, dpl=(flags >> 13) & 3, db=(flags >> 22) & 1, s=(flags >> 12) & 1,
                   l=(flags >> 21) & 1, g=(flags >> 23) & 1, avl=(flags >> 20) & 1, unusable=0 if present else 1)


@dataclass
class X86Event:
    """An exception or software interrupt reported by the interrupt hook."""

    vector: int
    error_code: int | None
    software: bool
    return_rip: int
    error: BaseException | None = None    # what a Python hook called from native code raised


class DeliveryFault(Exception):
    """Delivering an exception or interrupt through the guest IDT raised another exception."""

    def __init__(self, vector: int, error_code: int | None) -> None:
        super().__init__(vector, error_code)
        self.vector = vector
        self.error_code = error_code


class X86Delivery:
    """Delivers one exception/interrupt through a 64-bit IDT onto ``state`` (in place)."""

    def __init__(self, vcpu: UnicornX86Vcpu, state: X86CpuState) -> None:
        self.vcpu = vcpu
        self.state = state
        self.memory = vcpu.memory

    def _phys(self, linear: int) -> int:
        try:
            phys = self.vcpu.native.translate(self.vcpu.uc, linear)
        except BackendError:
            phys = None
        if phys is None:
            raise DeliveryFault(EXC_PF, 0)
        return phys

    def read(self, linear: int, size: int) -> bytes:
        out = bytearray()
        while size > 0:
            chunk = min(size, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
            try:
                out += self.memory.read(self._phys(linear), chunk)
            except GuestMemoryError:
                raise DeliveryFault(EXC_GP, 0) from None
            linear += chunk
            size -= chunk
        return bytes(out)

    def write(self, linear: int, data: bytes) -> None:
        pos = 0
        while pos < len(data):
            chunk = min(len(data) - pos, PAGE_SIZE - (linear & (PAGE_SIZE - 1)))
            try:
                self.memory.write(self._phys(linear), data[pos:pos + chunk])
            except GuestMemoryError:
                raise DeliveryFault(EXC_GP, 0) from None
            linear += chunk
            pos += chunk

    def descriptor(self, selector: int, vector: int) -> Segment:
        index = selector & ~7
        if selector & 4:
            raise DeliveryFault(EXC_GP, selector & ~3)
        if index == 0 or index + 7 > self.state.gdt.limit:
            raise DeliveryFault(EXC_GP, selector & ~3)
        lo, hi = struct.unpack("<II", self.read(self.state.gdt.base + index, 8))
        limit = (lo & 0xFFFF) | (hi & 0xF0000)
        if hi & (1 << 23):
            limit = (limit << 12) | 0xFFF
        base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
        seg = flags_to_seg(selector, base, limit, hi & 0xF0FF00)
        if not seg.present:
            raise DeliveryFault(EXC_NP, selector & ~3)
        return seg

    def deliver(self, vector: int, error: int | None, software: bool, return_rip: int) -> None:
        st = self.state
        if not st.efer & EFER_LMA:
            raise DeliveryFault(EXC_DF if vector == EXC_DF else EXC_GP, 0)
        ext = 0 if software else 1
        idt_error = vector * 8 + 2 + ext
        if vector * 16 + 15 > st.idt.limit:
            raise DeliveryFault(EXC_GP, idt_error)
        gate = self.read(st.idt.base + vector * 16, 16)
        off_lo, selector, ist_byte, attr, off_mid, off_hi = struct.unpack_from("<HHBBHI", gate, 0)
        gate_type = attr & 0xF
        gate_dpl = (attr >> 5) & 3
        cpl = st.ss.dpl
        if gate_type not in (0xE, 0xF):
            raise DeliveryFault(EXC_GP, idt_error)
        if software and gate_dpl < cpl:
            raise DeliveryFault(EXC_GP, idt_error)
        if not attr & 0x80:
            raise DeliveryFault(EXC_NP, idt_error)
        target = off_lo | (off_mid << 16) | (off_hi << 32)
        cs = self.descriptor(selector, vector)
        if not cs.s or not cs.type & 0x8 or not cs.l:
            raise DeliveryFault(EXC_GP, selector & ~3)
        new_cpl = cpl if cs.type & 0x4 else cs.dpl
        if new_cpl > cpl:
            raise DeliveryFault(EXC_GP, selector & ~3)
        ist = ist_byte & 7
        rsp = st.rsp
        switch = new_cpl < cpl
        if switch or ist:
            if st.tr.limit < 0x67:
                raise DeliveryFault(EXC_TS, st.tr.selector & ~3)
            field = 0x24 + 8 * (ist - 1) if ist else 4 + 8 * new_cpl
            rsp = struct.unpack("<Q", self.read(st.tr.base + field, 8))[0]
        rsp &= ~0xF
        frame = [st.ss.selector, st.rsp, st.rflags, st.cs.selector, return_rip]
        if error is not None:
            frame.append(error & 0xFFFFFFFF)
        data = b"".join(v.to_bytes(8, "little") for v in reversed(frame))
        rsp = (rsp - len(data)) & ((1 << 64) - 1)
        self.write(rsp, data)
        cs.selector = (selector & ~3) | new_cpl
        cs.dpl = cs.dpl if cs.type & 0x4 else new_cpl
        st.cs = cs
        if switch:
            st.ss = Segment(selector=new_cpl, base=0, limit=0, type=0, present=0, dpl=new_cpl, db=0, s=0,
                            l=0, g=0, avl=0, unusable=1)
        st.rsp = rsp
        st.rip = target
        st.rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM)
        if gate_type == 0xE:
            st.rflags &= ~RFLAGS_IF
        st.interrupt_shadow = 0
        st.halted = False



# What hv_native_x86.c was compiled with, in hv_x86_constants' order: register ids, then
# the saved-context offsets unicorn_x86.verify_layout checks against the engine.
NATIVE_REGISTERS = ("RAX", "RDX", "RCX", "RFLAGS", "MSR", "CR0", "CR3", "CR4")


def check_native_constants(offsets: tuple[int, ...]) -> None:
    """Raise UnicornLayoutError unless hv_native_x86.c uses the register ids of the
    installed unicorn and the context ``offsets`` (CTX_HEADER, ENV_REGS, ENV_EIP,
    ENV_HFLAGS, ENV_SEGS, SEG_STRIDE, ENV_TR, ENV_GDT, ENV_IDT, ENV_CR, ENV_EFER,
    ENV_ERROR_CODE, ENV_EXCEPTION_IS_INT, ENV_OLD_EXCEPTION) that verify_layout proved."""
    from unicorn import x86_const  # noqa: PLC0415

    native = _native()
    expected = tuple(getattr(x86_const, f"UC_X86_REG_{n}") for n in NATIVE_REGISTERS) + offsets
    out = native.ffi.new("int64_t[]", len(expected))
    count = native.lib.hv_x86_constants(out, len(expected))
    got = tuple(out[i] for i in range(min(count, len(expected))))
    if count != len(expected) or got != expected:
        raise UnicornLayoutError(f"hv_native_x86.c was built with constants {got}, unicorn 2.1.4 needs {expected}")
    _define_python_callbacks()


@functools.cache
def _define_python_callbacks() -> None:
    """The extern "Python" functions the native hooks call for the events they leave to hv."""
    ffi = _native().ffi

    @ffi.def_extern(name="hv_x86_py_intr")
    def py_intr(handle: Any, intno: int) -> None:
        vcpu: UnicornX86Vcpu = ffi.from_handle(handle)
        try:
            vcpu._on_interrupt(vcpu.uc, intno, None)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() after emu_start
            vcpu._hook_failed(exc)

    @ffi.def_extern(name="hv_x86_py_syscall")
    def py_syscall(handle: Any) -> None:
        vcpu: UnicornX86Vcpu = ffi.from_handle(handle)
        try:
            vcpu._on_syscall(vcpu.uc, None)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() after emu_start
            vcpu._hook_failed(exc)


class NativeX86:
    """One vCPU's ``struct hv_x86``: the interrupt, SYSCALL and RDTSC hooks, the virtual
    TSC they read, and the counts of events delivered natively or left to Python."""

    def __init__(self, vcpu: UnicornX86Vcpu) -> None:
        from unicorn import x86_const  # noqa: PLC0415

        unicorn = _import_unicorn()
        ffi = vcpu.native.ffi
        self.ffi = ffi
        self.lib = vcpu.native.lib
        self._handle = ffi.new_handle(vcpu)
        self._context = vcpu.uc.context_save()      # the buffer the hooks save the CPU to
        rec = ffi.new("struct hv_x86 *")
        rec.vcpu = vcpu.native.struct
        rec.reg_write = ffi.cast("void *", _fn_addr("uc_reg_write"))
        rec.context_save = ffi.cast("void *", _fn_addr("uc_context_save"))
        rec.context_restore = ffi.cast("void *", _fn_addr("uc_context_restore"))
        rec.context = ffi.cast("void *", ctypes.cast(self._context.context, ctypes.c_void_p).value)
        rec.py = self._handle
        rec.native = 0 if os.environ.get(NATIVE_ENV, "1") == "0" else 1
        self.rec = rec
        self._clock: GuestClock | None = None
        self._offset = 0
        self._mult = rec.tsc_mult = self.ONE_TICK_PER_NS
        self._last_read: tuple[int, int] | None = None   # (TSC, guest clock ns) of the last tsc()
        self._in_run = False
        uch = vcpu.uc._uch
        assert uch is not None   # None only after a failed uc_open, which raised
        self._uch = ffi.cast("void *", uch.value)
        addr = int(ffi.cast("uintptr_t", rec))
        add_native_hook(vcpu.uc, unicorn.UC_HOOK_INTR, "hv_x86_intr_hook", addr)
        add_native_insn_hooks(vcpu.uc, addr, ((x86_const.UC_X86_INS_SYSCALL, "hv_x86_syscall_hook"),
                                              (x86_const.UC_X86_INS_RDTSC, "hv_x86_rdtsc_hook"),
                                              (x86_const.UC_X86_INS_RDTSCP, "hv_x86_rdtscp_hook")))

    @property
    def enabled(self) -> bool:
        return bool(self.rec.native)

    @enabled.setter
    def enabled(self, value: bool) -> None:
        self.rec.native = 1 if value else 0

    def inject(self, vector: int) -> int:
        """1 delivered, 0 refused (IF clear or interrupt shadow), -1 left to Python."""
        return int(self.lib.hv_x86_inject(self._uch, self.rec, vector))

    # -- the virtual TSC ------------------------------------------------------------------
    # Bound to the machine's guest clock (use_guest_clock), the TSC is that clock's
    # nanoseconds plus this vCPU's offset: one clock for every vCPU, running while the
    # machine runs -- halted, waiting for SIPI or not -- and standing still while it is
    # paused, so the vCPUs' TSCs never drift apart and agree with the local APIC timer.
    # Unbound (a vCPU without a machine), it counts only while run() executes the guest.
    # Inside run() the native RDTSC hook reads rec: tsc_base + scale(now - tsc_ns0).
    # The TSC runs at the VM's rate (set_rate): scale(ns) = ns * mult >> 32, the same
    # fixed-point product in C and here; at 1 GHz mult is 2^32 and scale(ns) = ns.
    # floor(scale(a)) + floor(scale(b)) <= floor(scale(a + b)): a run's readings never
    # exceed what the clock gives afterwards, so the TSC stays monotonic across runs.
    MASK = (1 << 64) - 1
    ONE_TICK_PER_NS = 1 << 32

    @staticmethod
    def mult_for(tsc_hz: int) -> int:
        """The 32.32 fixed-point ticks per ns of a ``tsc_hz`` TSC (rounded)."""
        return ((tsc_hz << 32) + 500_000_000) // 1_000_000_000

    def scale(self, ns: int) -> int:
        return (ns * self._mult) >> 32

    def set_rate(self, tsc_hz: int) -> None:
        """Run the TSC at ``tsc_hz`` from now on, continuing from its current value (the
        vCPU is not inside run, or holds its engine lock)."""
        value = self.tsc()
        self._mult = self.rec.tsc_mult = self.mult_for(tsc_hz)
        self.set_tsc(value)   # the same reading: the offset is rebased, nothing jumps

    def tsc(self) -> int:
        if self._clock is None:
            return int(self.lib.hv_x86_tsc(self.rec)) & self.MASK
        now = self._clock.now()
        value = (self.scale(now) + self._offset) & self.MASK
        self._last_read = (value, now)
        return value

    def set_tsc(self, value: int) -> None:
        value &= self.MASK
        if self._clock is not None:
            if self._last_read is not None and self._last_read[0] == value:
                # the value this vCPU last reported (a state read from it and loaded back,
                # a SIPI keeping the TSC): the TSC has moved on since and keeps running
                self._offset = value - self.scale(self._last_read[1])
            else:
                self._offset = value - self.scale(self._clock.now())
            self._last_read = None
            if self._in_run:
                self.start_clock()
            return
        self.rec.tsc_base = value
        if self.rec.tsc_running:
            self.rec.tsc_ns0 = time.monotonic_ns()

    def use_guest_clock(self, clock: GuestClock, at_ns: int) -> None:
        """Follow ``clock`` from now on, continuing from the current value, which is
        clock time ``at_ns`` (one reading for every vCPU of a machine, so vCPUs with the
        same TSC get the same offset)."""
        value = self.tsc()
        self._clock = clock
        self._offset = value - self.scale(at_ns)
        self._last_read = None

    def start_clock(self) -> None:
        self._in_run = True
        if self._clock is None:
            self.rec.tsc_ns0 = time.monotonic_ns()
            self.rec.tsc_running = 1
            return
        # the clock's own timeline, not a fresh reading: every vCPU's hook then computes
        # from the same (guest ns, host ns) pair and no two vCPUs differ by a few hundred
        # ns (which Linux's TSC sync check reports as a warp)
        guest_ns, host_ns = self._clock.timeline()
        self.rec.tsc_base = (self.scale(guest_ns) + self._offset) & self.MASK
        self.rec.tsc_ns0 = host_ns or 0
        self.rec.tsc_running = 0 if host_ns is None else 1

    def stop_clock(self) -> None:
        self._in_run = False
        if self._clock is None:
            self.rec.tsc_base = self.tsc()
        elif self.rec.rdtsc:
            # The machine's clock stops when it pauses, and a vCPU leaves the guest only
            # at its next block: an RDTSC in between returned more than the stopped clock
            # says. Never let this vCPU's TSC go back below what its guest has seen.
            seen = int(self.rec.tsc_last)
            exact = (self.scale(self._clock.now()) + self._offset) & self.MASK
            if 0 < seen - exact < 1 << 62:
                self._offset += seen - exact
        self.rec.tsc_running = 0

    @property
    def stats(self) -> dict[str, int]:
        r = self.rec
        return {"exceptions_native": int(r.exc_native), "exceptions_python": int(r.exc_python),
                "syscalls_native": int(r.syscall_native), "syscalls_python": int(r.syscall_python),
                "interrupts_native": int(r.irq_native), "interrupts_python": int(r.irq_python),
                "rdtsc": int(r.rdtsc)}
