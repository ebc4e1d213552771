"""x86_64 vCPUs on Unicorn 2.1.4.

The register API cannot express segment descriptor caches, CPL or EFER.LMA, so state is
moved through the engine's saved context, whose bytes are unicorn 2.1.4's ``CPUX86State``
(QEMU 5.0) behind a 40-byte ``uc_context`` header. :func:`verify_layout` checks every
offset used here against values written through the API before the backend is used.

Unicorn does not deliver exceptions or ``int n`` through the guest IDT: native hooks do
the common cases inside the engine, and :class:`~hv_backends.unicorn_x86_delivery.X86Delivery`
the rest once the engine has stopped (see :mod:`hv_backends.unicorn_x86_delivery`).
"""
from __future__ import annotations

import ctypes
import functools
import logging
import struct
from typing import Any

from hv import cpuid as cpuid_policy
from hv.devices.clock import GuestClock
from hv.state import (
    EFER_LMA,
    EFER_SCE,
    FXSAVE_SIZE,
    CpuState,
    DescriptorTable,
    Segment,
    X86CpuState,
)
from hv_backends.base import BackendError, Exit, ExitReason
from hv_backends.unicorn_common import (
    UnicornLayoutError,
    UnicornVcpuBase,
    _import_unicorn,
    library_is_patched,
)
from hv_backends.unicorn_x86_delivery import (
    ERROR_CODE_VECTORS,
    EXC_DF,
    EXC_SYSCALL,
    EXC_UD,
    RFLAGS_IF,
    RFLAGS_RF,
    RFLAGS_VM,
    DeliveryFault,
    NativeX86,
    X86Delivery,
    X86Event,
    check_native_constants,
    flags_to_seg,
)

log = logging.getLogger(__name__)

# -- the saved context: uc_context header, then CPUX86State -------------------------
CTX_HEADER = 40
ENV_REGS = 0
ENV_EIP = 128
ENV_HFLAGS = 176
ENV_HFLAGS2 = 180
ENV_SEGS = 184          # SegmentCache[6]: u32 selector, u64 base, u32 limit, u32 flags
SEG_STRIDE = 24
ENV_LDT = 328
ENV_TR = 352
ENV_GDT = 376
ENV_IDT = 400
ENV_CR = 424            # target_ulong cr[5]
ENV_EFER = 592
ENV_LSTAR = 4840
ENV_PAT = 5280
ENV_ERROR_CODE = 5384
ENV_EXCEPTION_IS_INT = 5388
ENV_EXCEPTION_NEXT_EIP = 5392
ENV_DR = 5400
# int old_exception, the "exception in flight" QEMU uses to promote a second fault to #DF.
# QEMU resets it to -1 once it delivered an exception; Unicorn hands the exception to the
# interrupt hook instead, so hv resets it whenever it loads a state (see _set_state).
ENV_OLD_EXCEPTION = 5496
NO_EXCEPTION = -1
ENV_MIN_SIZE = ENV_OLD_EXCEPTION + 4

QEMU_SEG_ORDER = ("es", "cs", "ss", "ds", "fs", "gs")

# hflags bits (QEMU 5.0 target/i386/cpu.h)
HF_CPL_MASK = 3
HF_INHIBIT_IRQ = 1 << 3
HF_CS32 = 1 << 4
HF_SS32 = 1 << 5
HF_ADDSEG = 1 << 6
HF_PE = 1 << 7
HF_MP_SHIFT = 9           # MP, EM, TS follow at 9, 10, 11 (CR0 bits 1..3)
HF_LMA = 1 << 14
HF_CS64 = 1 << 15
HF_OSFXSR = 1 << 22
HF_SMAP = 1 << 23
HF_MODELLED = (HF_CPL_MASK | HF_INHIBIT_IRQ | HF_CS32 | HF_SS32 | HF_ADDSEG | HF_PE | (7 << HF_MP_SHIFT)
               | HF_LMA | HF_CS64 | HF_OSFXSR | HF_SMAP)
HF2_NMI_MASK = 1 << 2

CR0_PE = 1
CR4_OSFXSR = 1 << 9
CR4_SMAP = 1 << 21

TSC_HZ_PER_NS = 1  # at hv's 1 GHz the virtual TSC ticks once per guest ns (any rate: UnicornVm.set_tsc_hz)


def seg_to_flags(seg: Segment) -> int:
    return ((seg.type & 0xF) << 8 | (seg.s & 1) << 12 | (seg.dpl & 3) << 13 | (seg.present & 1) << 15
            | (seg.avl & 1) << 20 | (seg.l & 1) << 21 | (seg.db & 1) << 22 | (seg.g & 1) << 23)


def compute_hflags(old: int, st: X86CpuState) -> int:
    """hflags consistent with the segments/CR0/CR4/EFER of ``st`` (as QEMU keeps them)."""
    h = old & ~HF_MODELLED
    h |= st.ss.dpl & 3
    if st.cr0 & CR0_PE:
        h |= HF_PE
    h |= ((st.cr0 >> 1) & 7) << HF_MP_SHIFT
    if st.cr4 & CR4_OSFXSR:
        h |= HF_OSFXSR
    if st.cr4 & CR4_SMAP:
        h |= HF_SMAP
    if st.interrupt_shadow:
        h |= HF_INHIBIT_IRQ
    lma = bool(st.efer & EFER_LMA)
    if lma:
        h |= HF_LMA
    if lma and st.cs.l:
        h |= HF_CS32 | HF_SS32 | HF_CS64
    else:
        if st.cs.db:
            h |= HF_CS32
        if st.ss.db:
            h |= HF_SS32
    if h & HF_CS64:
        pass
    elif not (st.cr0 & CR0_PE) or (st.rflags & RFLAGS_VM) or not (h & HF_CS32) or st.ds.base | st.es.base | st.ss.base:
        h |= HF_ADDSEG
    return h


@functools.cache
def verify_layout() -> None:
    """Write known values through the register API and find them where this module
    reads them in the saved context; raise UnicornLayoutError when anything differs."""
    unicorn = _import_unicorn()
    from unicorn import x86_const as x  # noqa: PLC0415

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    probes: list[tuple[str, int, int, int]] = []  # name, env offset, size, value

    def put(name: str, reg: int, value: Any, offset: int, size: int, expect: int) -> None:
        uc.reg_write(reg, value)
        probes.append((name, offset, size, expect))

    put("rax", x.UC_X86_REG_RAX, 0x1122334455667788, ENV_REGS, 8, 0x1122334455667788)
    put("r15", x.UC_X86_REG_R15, 0x1122334455660F0F, ENV_REGS + 15 * 8, 8, 0x1122334455660F0F)
    put("rip", x.UC_X86_REG_RIP, 0x11223344556601AA, ENV_EIP, 8, 0x11223344556601AA)
    put("fs.base", x.UC_X86_REG_FS_BASE, 0x1122334455660FB0, ENV_SEGS + 4 * SEG_STRIDE + 8, 8, 0x1122334455660FB0)
    put("gs.base", x.UC_X86_REG_GS_BASE, 0x11223344556605B0, ENV_SEGS + 5 * SEG_STRIDE + 8, 8, 0x11223344556605B0)
    put("gdtr.base", x.UC_X86_REG_GDTR, (0, 0x1122334455660D00, 0x1357, 0), ENV_GDT + 8, 8, 0x1122334455660D00)
    probes.append(("gdtr.limit", ENV_GDT + 16, 4, 0x1357))
    put("idtr.base", x.UC_X86_REG_IDTR, (0, 0x1122334455661D00, 0x0FFF, 0), ENV_IDT + 8, 8, 0x1122334455661D00)
    put("tr.base", x.UC_X86_REG_TR, (0x28, 0x1122334455662800, 0x67, 0x8B00), ENV_TR + 8, 8, 0x1122334455662800)
    probes.append(("tr.selector", ENV_TR, 4, 0x28))
    probes.append(("tr.limit", ENV_TR + 16, 4, 0x67))
    put("ldtr.base", x.UC_X86_REG_LDTR, (0x30, 0x1122334455663000, 0x77, 0x8200), ENV_LDT + 8, 8, 0x1122334455663000)
    put("cr2", x.UC_X86_REG_CR2, 0x1122334455660CC2, ENV_CR + 16, 8, 0x1122334455660CC2)
    put("cr3", x.UC_X86_REG_CR3, 0x12345000, ENV_CR + 24, 8, 0x12345000)
    put("efer", x.UC_X86_REG_MSR, (0xC0000080, 0xD01), ENV_EFER, 8, 0xD01)
    put("lstar", x.UC_X86_REG_MSR, (0xC0000082, 0x1122334455661575), ENV_LSTAR, 8, 0x1122334455661575)
    put("pat", x.UC_X86_REG_MSR, (0x277, 0x0006060606060606), ENV_PAT, 8, 0x0006060606060606)
    put("dr0", x.UC_X86_REG_DR0, 0x1122334455660D80, ENV_DR, 8, 0x1122334455660D80)
    put("dr7", x.UC_X86_REG_DR7, 0x400, ENV_DR + 56, 8, 0x400)
    ctx = uc.context_save()
    raw = ctypes.string_at(ctx.context, ctx.size)
    if len(raw) < CTX_HEADER + ENV_MIN_SIZE:
        raise UnicornLayoutError(f"unicorn saved context is {len(raw)} bytes; expected at least "
                                 f"{CTX_HEADER + ENV_MIN_SIZE} (unicorn 2.1.4 layout)")
    for name, offset, size, expect in probes:
        got = int.from_bytes(raw[CTX_HEADER + offset:CTX_HEADER + offset + size], "little")
        if got != expect:
            raise UnicornLayoutError(f"unicorn saved-context layout differs from 2.1.4: {name} at env+{offset} "
                                     f"holds {got:#x}, expected {expect:#x}")
    old_exception = struct.unpack_from("<i", raw, CTX_HEADER + ENV_OLD_EXCEPTION)[0]
    if old_exception != NO_EXCEPTION:
        raise UnicornLayoutError(f"unicorn saved-context layout differs from 2.1.4: old_exception at "
                                 f"env+{ENV_OLD_EXCEPTION} of a fresh engine is {old_exception}, expected -1")
    hflags = int.from_bytes(raw[CTX_HEADER + ENV_HFLAGS:CTX_HEADER + ENV_HFLAGS + 4], "little")
    if not hflags & HF_LMA or not hflags & HF_CS64:
        raise UnicornLayoutError(f"unicorn saved-context layout differs from 2.1.4: hflags {hflags:#x} of a "
                                 "64-bit engine lacks LMA/CS64")
    check_native_constants((CTX_HEADER, ENV_REGS, ENV_EIP, ENV_HFLAGS, ENV_SEGS, SEG_STRIDE, ENV_TR, ENV_GDT,
                            ENV_IDT, ENV_CR, ENV_EFER, ENV_ERROR_CODE, ENV_EXCEPTION_IS_INT, ENV_OLD_EXCEPTION))


@functools.cache
def _engine_leaf(leaf: int, subleaf: int) -> tuple[int, int, int, int]:
    """What the Unicorn engine's CPU model answers for (leaf, subleaf): asked once per
    process from a scratch engine (the answer is a constant of the installed library)."""
    unicorn = _import_unicorn()
    x = unicorn.x86_const
    scratch = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    scratch.mem_map(0x1000, 0x1000)
    scratch.mem_write(0x1000, b"\x0f\xa2")   # cpuid
    scratch.reg_write(x.UC_X86_REG_EAX, leaf)
    scratch.reg_write(x.UC_X86_REG_ECX, subleaf)
    scratch.emu_start(0x1000, 0x1002)
    eax, ebx, ecx, edx = (scratch.reg_read(r) & 0xFFFFFFFF for r in (
        x.UC_X86_REG_EAX, x.UC_X86_REG_EBX, x.UC_X86_REG_ECX, x.UC_X86_REG_EDX))
    return eax, ebx, ecx, edx


X2APIC_FEATURE = 1 << 21   # CPUID.1:ECX; hv's local APIC is an xAPIC (KVM's table drops it too)


def _per_vcpu_leaf(leaf: int, subleaf: int, index: int) -> tuple[int, int, int, int]:
    """Leaf 1 and 0xB with this vCPU's APIC ID in them (the engine says 0 everywhere)."""
    eax, ebx, ecx, edx = _engine_leaf(leaf, subleaf if leaf == 0xB else 0)
    if leaf == 0x1:
        return eax, (ebx & 0x00FFFFFF) | (index & 0xFF) << 24, ecx & ~X2APIC_FEATURE, edx
    return eax, ebx, ecx, index   # 0xB: EDX = x2APIC ID


class UnicornX86Vcpu(UnicornVcpuBase):
    """An x86_64 vCPU; the engine always runs in UC_MODE_64."""

    # sti, popf, iret, sysret and the block under an interrupt shadow end unchained, so the
    # poll callback sees every unmasking (no block hook: see NativeVcpu.install).
    POLL = True

    def __init__(self, vm: Any, index: int) -> None:
        verify_layout()
        from unicorn import x86_const  # noqa: PLC0415

        self._x = x86_const
        self._halted = False
        self._event: X86Event | None = None
        self._unusable_memo: dict[str, tuple[tuple[int, int, int, int], int]] = {}
        self._shadow_memo = 0
        self._apic_base = 0xFEE00900
        self._fx_extra = bytes(FXSAVE_SIZE)
        self._extra_msrs: dict[int, int] = {}
        self._msr_keys: tuple[int, ...] = ()
        super().__init__(vm, index)
        if index == 1 and not library_is_patched():
            log.warning("x86 guest with several vCPUs on the unicorn wheel's libunicorn: its LOCK-prefixed "
                        "instructions are not atomic between vCPUs (spinlocks can be lost and the guest "
                        "hang); hv's patched library makes them atomic (backends/native/unicorn/README.md)")
        x = self._x
        # interrupts/exceptions, SYSCALL and RDTSC: native hooks (Python only for what they leave)
        self._native_x86 = NativeX86(self)
        self._native_x86.set_rate(vm.tsc_hz)   # the VM's guest TSC rate
        self.uc.hook_add(_import_unicorn().UC_HOOK_INSN, self._on_in, None, 1, 0, x.UC_X86_INS_IN)
        self.uc.hook_add(_import_unicorn().UC_HOOK_INSN, self._on_out, None, 1, 0, x.UC_X86_INS_OUT)
        self.uc.hook_add(_import_unicorn().UC_HOOK_INSN, self._on_cpuid, None, 1, 0, x.UC_X86_INS_CPUID)
        self.set_state(X86CpuState())

    def _create_engine(self) -> Any:
        unicorn = _import_unicorn()
        return unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)

    @property
    def native_delivery(self) -> bool:
        """Whether the native hooks deliver the events they can (default; the environment
        variable HV_UNICORN_X86_NATIVE=0 turns it off); False sends every exception,
        interrupt and SYSCALL through the Python reference path."""
        return self._native_x86.enabled

    @native_delivery.setter
    def native_delivery(self, value: bool) -> None:
        with self._engine_lock:
            self._native_x86.enabled = value

    @property
    def delivery_stats(self) -> dict[str, int]:
        """Counts of events the native hooks delivered and of those left to Python."""
        return self._native_x86.stats

    # -- hooks ---------------------------------------------------------------------
    def _on_in(self, uc: Any, port: int, size: int, user_data: Any) -> int:
        return int(self._current_io().pio_read(port, size)) & ((1 << (8 * size)) - 1)

    def _on_out(self, uc: Any, port: int, size: int, value: int, user_data: Any) -> None:
        self._current_io().pio_write(port, size, value & ((1 << (8 * size)) - 1))

    def _on_cpuid(self, uc: Any, user_data: Any) -> int:
        """CPUID: hv's policy leaves (:mod:`hv.cpuid`) are answered here, the same values
        KVM gets; so are the leaves that name the CPU (leaf 1's initial APIC ID and leaf
        0xB's x2APIC ID = the vCPU index, as KVM's table has them: every Unicorn engine
        would say 0, and an SMP Linux then finds two CPUs with APIC ID 0); 0 lets the
        engine answer the others (its qemu64 model)."""
        x = self._x
        leaf = uc.reg_read(x.UC_X86_REG_EAX) & 0xFFFFFFFF
        tsc_hz = self.vm.tsc_hz
        assert tsc_hz is not None   # an x86 VM's rate, which 0x15/0x16 declare
        regs = cpuid_policy.lookup(leaf, tsc_hz)
        if regs is None and leaf in (0x1, 0xB):
            regs = _per_vcpu_leaf(leaf, uc.reg_read(x.UC_X86_REG_ECX) & 0xFFFFFFFF, self.index)
        if regs is None:
            return 0
        gprs = (x.UC_X86_REG_RAX, x.UC_X86_REG_RBX, x.UC_X86_REG_RCX, x.UC_X86_REG_RDX)
        for reg, value in zip(gprs, regs, strict=True):
            uc.reg_write(reg, value)   # CPUID zero-extends into the 64-bit registers
        return 1

    def set_tsc_rate(self, tsc_hz: int) -> None:
        """Run the TSC at ``tsc_hz`` from its current value on (UnicornVm.set_tsc_hz)."""
        with self._engine_lock:
            self._native_x86.set_rate(tsc_hz)

    def _tsc_now(self) -> int:
        """The virtual TSC (read by the native RDTSC hook too), at the VM's rate: the
        machine's guest clock, scaled, plus this vCPU's offset once :meth:`use_guest_clock` bound
        it (every vCPU counts alike, halted or not, and stands still while the machine is
        paused, so a saved state carries the exact value); before that it advances only
        while run() executes the guest."""
        return self._native_x86.tsc()

    def use_guest_clock(self, clock: GuestClock, at_ns: int) -> None:
        """Let the TSC follow the machine's guest clock from now on, continuing from its
        current value, taken to be clock time ``at_ns`` (the machine reads its clock once
        for all its vCPUs: vCPUs with equal TSCs stay exactly equal)."""
        with self._engine_lock:
            self._native_x86.use_guest_clock(clock, at_ns)

    def _on_syscall(self, uc: Any, user_data: Any) -> None:
        # Called by the native hook for a SYSCALL it leaves to hv: performed once the
        # engine has stopped (the instruction ends its translation block, RIP is then after it).
        self._event = X86Event(EXC_SYSCALL, None, True, 0)
        uc.emu_stop()

    def _hook_failed(self, exc: BaseException) -> None:
        """A Python hook called from native code raised: stop; run() raises it again."""
        self._event = X86Event(EXC_UD, None, False, 0, error=exc)
        self.uc.emu_stop()

    def _on_interrupt(self, uc: Any, intno: int, user_data: Any) -> None:
        # Called by the native hook for an event it leaves to hv (see unicorn_x86_delivery).
        raw = self._raw_context()[1]
        error = int.from_bytes(raw[ENV_ERROR_CODE:ENV_ERROR_CODE + 4], "little")
        is_int = int.from_bytes(raw[ENV_EXCEPTION_IS_INT:ENV_EXCEPTION_IS_INT + 4], "little") != 0
        rip = uc.reg_read(self._x.UC_X86_REG_RIP)
        vector = intno & 0xFF
        has_error = vector in ERROR_CODE_VECTORS and not is_int
        self._event = X86Event(vector, error if has_error else None, is_int, rip)
        uc.emu_stop()

    # -- raw context -----------------------------------------------------------------
    def _raw_context(self) -> tuple[Any, bytearray]:
        ctx = self.uc.context_save()
        base = ctypes.cast(ctx.context, ctypes.c_void_p).value
        assert base is not None   # context_save's buffer (it raises when it cannot allocate one)
        buf = (ctypes.c_char * ctx.size).from_address(base)
        return ctx, bytearray(bytes(buf)[CTX_HEADER:])

    def _restore_raw(self, ctx: Any, env: bytearray) -> None:
        base = ctypes.cast(ctx.context, ctypes.c_void_p).value
        assert base is not None   # context_save's buffer (it raises when it cannot allocate one)
        ctypes.memmove(base + CTX_HEADER, bytes(env), len(env))
        self.uc.context_restore(ctx)

    # -- run -----------------------------------------------------------------------
    PC_NAME = "rip"

    def _read_pc(self) -> int:
        return int(self.uc.reg_read(self._x.UC_X86_REG_RIP))

    def _undefined_instruction(self, pc: int) -> X86Event:
        return X86Event(EXC_UD, None, False, pc)

    def _handle_event(self, event: X86Event) -> Exit | None:
        if event.error is not None:
            raise event.error
        return None if self._deliver_event(event) else Exit(ExitReason.SYSTEM_RESET, "triple fault")

    def _start_clock(self) -> None:
        self._native_x86.start_clock()

    def _stop_clock(self) -> None:
        self._native_x86.stop_clock()

    # -- event delivery ------------------------------------------------------------
    def _syscall(self) -> bool:
        """SYSCALL (64-bit): RCX/R11 saved, CS/SS from STAR, RIP from LSTAR, RFLAGS masked."""
        state = self.get_state()
        if not state.efer & EFER_SCE or not state.efer & EFER_LMA or not state.cs.l:
            return self._deliver_event(X86Event(EXC_UD, None, False, (state.rip - 2) & ((1 << 64) - 1)))
        x = self._x
        star = self.uc.reg_read(x.UC_X86_REG_MSR, 0xC0000081)
        lstar = self.uc.reg_read(x.UC_X86_REG_MSR, 0xC0000082)
        fmask = self.uc.reg_read(x.UC_X86_REG_MSR, 0xC0000084)
        selector = (star >> 32) & 0xFFFC
        state.rcx = state.rip
        state.r11 = state.rflags & ~RFLAGS_RF
        state.rflags = (state.rflags & ~fmask & ~RFLAGS_RF) | 0x2
        state.cs = Segment(selector, 0, 0xFFFFFFFF, 0xB, 1, 0, 0, 1, 1, 1)
        state.ss = Segment(selector + 8, 0, 0xFFFFFFFF, 0x3, 1, 0, 1, 1, 0, 1)
        state.rip = lstar
        self.set_state(state, flush_code=False)
        return True

    def _deliver_event(self, event: X86Event) -> bool:
        """Deliver through the IDT with double/triple fault escalation; False on triple fault."""
        if event.vector == EXC_SYSCALL:
            return self._syscall()
        state = self.get_state()
        vector, error, software = event.vector, event.error_code, event.software
        ret = event.return_rip
        for _ in range(3):
            try:
                X86Delivery(self, state).deliver(vector, error, software, ret)
            except DeliveryFault as fault:
                log.debug("vCPU %d: delivering vector %d raised %d", self.index, vector, fault.vector)
                if vector == EXC_DF:
                    return False
                vector, error, software, ret = EXC_DF, 0, False, state.rip
                continue
            self.set_state(state, flush_code=False)
            return True
        return False

    def inject_interrupt(self, vector: int) -> bool:
        """Deliver external interrupt ``vector`` now if RFLAGS.IF allows; False otherwise.

        Only between runs (the vCPU thread, with the vCPU stopped)."""
        if not 32 <= vector <= 255:
            raise BackendError(f"interrupt vector {vector} is out of range 32..255")
        with self._engine_lock:
            return self._inject_locked(vector)

    def interrupts_enabled(self) -> bool:
        """RFLAGS.IF: one register read, where :meth:`inject_interrupt` first captures the
        whole CPU state (about 0.6 ms) before it can say no."""
        with self._engine_lock:
            return bool(self.uc.reg_read(self._x.UC_X86_REG_RFLAGS) & RFLAGS_IF)

    @property
    def ready_for_interrupt(self) -> bool:
        """RFLAGS.IF set and no interrupt shadow (reads the CPU state)."""
        state = self.get_state()
        return bool(state.rflags & RFLAGS_IF) and not state.interrupt_shadow

    def _inject_locked(self, vector: int) -> bool:
        done = self._native_x86.inject(vector)
        if done >= 0:
            if done:
                self._halted = False
            return bool(done)
        state = self.get_state()
        if not state.rflags & RFLAGS_IF or state.interrupt_shadow:
            return False
        try:
            X86Delivery(self, state).deliver(vector, None, False, state.rip)
        except DeliveryFault:
            if not self._deliver_event(X86Event(vector, None, False, state.rip)):
                raise BackendError("triple fault while injecting an interrupt") from None
            return True
        state.halted = False
        self.set_state(state, flush_code=False)
        return True

    # -- state ---------------------------------------------------------------------
    def get_state(self) -> X86CpuState:
        with self._engine_lock:
            return self._get_state()

    def _get_state(self) -> X86CpuState:
        x = self._x
        uc = self.uc
        _, env = self._raw_context()
        st = X86CpuState()
        regs = struct.unpack_from("<16Q", env, ENV_REGS)
        for name, value in zip(("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                                "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15"), regs, strict=True):
            setattr(st, name, value)
        st.rip = struct.unpack_from("<Q", env, ENV_EIP)[0]
        st.rflags = uc.reg_read(x.UC_X86_REG_RFLAGS)
        for i, name in enumerate(QEMU_SEG_ORDER):
            setattr(st, name, self._read_seg(env, ENV_SEGS + i * SEG_STRIDE, name))
        st.ldt = self._read_seg(env, ENV_LDT, "ldt")
        st.tr = self._read_seg(env, ENV_TR, "tr")
        for name, off in (("gdt", ENV_GDT), ("idt", ENV_IDT)):
            _, base, limit, _ = struct.unpack_from("<IxxxxQII", env, off)
            setattr(st, name, DescriptorTable(base, limit & 0xFFFF))
        cr = struct.unpack_from("<5Q", env, ENV_CR)
        st.cr0, st.cr2, st.cr3, st.cr4 = cr[0], cr[2], cr[3], cr[4]
        st.cr8 = uc.reg_read(x.UC_X86_REG_CR8)
        st.efer = struct.unpack_from("<Q", env, ENV_EFER)[0]
        st.apic_base = self._apic_base
        msrs = dict(self._extra_msrs)
        for number in self._msr_keys:
            msrs[number] = uc.reg_read(x.UC_X86_REG_MSR, number)
        st.msrs = msrs
        st.fxsave = self._read_fxsave()
        st.tsc = self._tsc_now()
        hflags, hflags2 = struct.unpack_from("<II", env, ENV_HFLAGS)
        st.interrupt_shadow = (self._shadow_memo or 1) if hflags & HF_INHIBIT_IRQ else 0
        st.nmi_masked = bool(hflags2 & HF2_NMI_MASK)
        st.halted = self._halted
        return st

    def _read_seg(self, env: bytearray, off: int, name: str) -> Segment:
        selector, base, limit, flags = struct.unpack_from("<IxxxxQII", env, off)
        seg = flags_to_seg(selector, base, limit, flags)
        memo = self._unusable_memo.get(name)
        if memo is not None and memo[0] == (selector, base, limit, flags & 0xF0FF00):
            seg.unusable = memo[1]
        return seg

    def _write_seg(self, env: bytearray, off: int, name: str, seg: Segment) -> None:
        flags = seg_to_flags(seg)
        struct.pack_into("<IIQII", env, off, seg.selector, 0, seg.base, seg.limit, flags)
        self._unusable_memo[name] = ((seg.selector, seg.base, seg.limit, flags & 0xF0FF00), seg.unusable)

    def _msr_numbers(self) -> tuple[int, ...]:
        return (0x174, 0x175, 0x176, 0x277, 0xC0000081, 0xC0000082, 0xC0000083, 0xC0000084, 0xC0000102,
                0xC0000103)

    def set_state(self, state: CpuState, flush_code: bool = True) -> None:
        with self._engine_lock:
            self._set_state(state, flush_code)

    def _set_state(self, state: CpuState, flush_code: bool) -> None:
        if not isinstance(state, X86CpuState):
            raise BackendError(f"an x86_64 vCPU cannot load a {type(state).__name__}")
        x = self._x
        uc = self.uc
        uc.reg_write(x.UC_X86_REG_RFLAGS, state.rflags)
        uc.reg_write(x.UC_X86_REG_CR8, state.cr8)
        self._extra_msrs = {}
        supported = set(self._msr_numbers())
        for number, value in state.msrs.items():
            if number in supported:
                uc.reg_write(x.UC_X86_REG_MSR, (number, value))
            else:
                self._extra_msrs[number] = value
        self._msr_keys = tuple(n for n in state.msrs if n in supported)
        self._write_fxsave(state.fxsave)
        ctx, env = self._raw_context()
        regs = [getattr(state, n) for n in ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
                                             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")]
        struct.pack_into("<16Q", env, ENV_REGS, *regs)
        struct.pack_into("<Q", env, ENV_EIP, state.rip)
        for i, name in enumerate(QEMU_SEG_ORDER):
            self._write_seg(env, ENV_SEGS + i * SEG_STRIDE, name, getattr(state, name))
        self._write_seg(env, ENV_LDT, "ldt", state.ldt)
        self._write_seg(env, ENV_TR, "tr", state.tr)
        for off, table in ((ENV_GDT, state.gdt), (ENV_IDT, state.idt)):
            struct.pack_into("<IIQII", env, off, 0, 0, table.base, table.limit, 0)
        struct.pack_into("<5Q", env, ENV_CR, state.cr0, 0, state.cr2, state.cr3, state.cr4)
        struct.pack_into("<Q", env, ENV_EFER, state.efer)
        hflags, hflags2 = struct.unpack_from("<II", env, ENV_HFLAGS)
        hflags = compute_hflags(hflags, state)
        hflags2 = (hflags2 | HF2_NMI_MASK) if state.nmi_masked else (hflags2 & ~HF2_NMI_MASK)
        struct.pack_into("<II", env, ENV_HFLAGS, hflags, hflags2)
        # A canonical state never has an exception in flight: after hv delivered one (or
        # loaded a migrated state) the next fault must not be promoted to a double fault.
        struct.pack_into("<i", env, ENV_OLD_EXCEPTION, NO_EXCEPTION)
        self._restore_raw(ctx, env)
        unicorn = _import_unicorn()
        uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)
        if flush_code:
            uc.ctl_flush_tb()
        self._shadow_memo = state.interrupt_shadow
        self._apic_base = state.apic_base
        self._native_x86.set_tsc(state.tsc)   # inside run() (event delivery) the interval restarts
        self._halted = state.halted

    # -- FPU / SSE ---------------------------------------------------------------------
    # What Unicorn cannot hold (reserved bytes, ST padding, FOP bits 11-15, MXCSR_MASK)
    # is carried beside the engine in self._fx_extra so the image round-trips exactly.
    def _read_fxsave(self) -> bytes:
        x = self._x
        uc = self.uc
        image = bytearray(self._fx_extra)
        fsw = uc.reg_read(x.UC_X86_REG_FPSW)
        tag = uc.reg_read(x.UC_X86_REG_FPTAG)
        ftw = sum(1 << i for i in range(8) if (tag >> (2 * i)) & 3 != 3)
        fop = struct.unpack_from("<H", image, 6)[0] | (uc.reg_read(x.UC_X86_REG_FOP) & 0x7FF)
        struct.pack_into("<HHB", image, 0, uc.reg_read(x.UC_X86_REG_FPCW), fsw, ftw)
        struct.pack_into("<HQQI", image, 6, fop, uc.reg_read(x.UC_X86_REG_FIP), uc.reg_read(x.UC_X86_REG_FDP),
                         uc.reg_read(x.UC_X86_REG_MXCSR))
        top = (fsw >> 11) & 7
        for i in range(8):
            mantissa, exponent = uc.reg_read(x.UC_X86_REG_FP0 + ((top + i) & 7))
            struct.pack_into("<QH", image, 32 + 16 * i, mantissa, exponent)
        for i in range(16):
            image[160 + 16 * i:176 + 16 * i] = uc.reg_read(x.UC_X86_REG_XMM0 + i).to_bytes(16, "little")
        return bytes(image)

    def _write_fxsave(self, image: bytes) -> None:
        if len(image) != FXSAVE_SIZE:
            raise BackendError(f"fxsave image is {len(image)} bytes, expected {FXSAVE_SIZE}")
        x = self._x
        uc = self.uc
        fcw, fsw, ftw, fop, fip, fdp, mxcsr = struct.unpack_from("<HHBxHQQI", image, 0)
        uc.reg_write(x.UC_X86_REG_FPCW, fcw)
        uc.reg_write(x.UC_X86_REG_FPSW, fsw)
        top = (fsw >> 11) & 7
        for i in range(8):
            mantissa, exponent = struct.unpack_from("<QH", image, 32 + 16 * i)
            uc.reg_write(x.UC_X86_REG_FP0 + ((top + i) & 7), (mantissa, exponent))
        uc.reg_write(x.UC_X86_REG_FPTAG, sum(3 << (2 * i) for i in range(8) if not (ftw >> i) & 1))
        uc.reg_write(x.UC_X86_REG_FOP, fop & 0x7FF)
        uc.reg_write(x.UC_X86_REG_FIP, fip)
        uc.reg_write(x.UC_X86_REG_FDP, fdp)
        uc.reg_write(x.UC_X86_REG_MXCSR, mxcsr)
        for i in range(16):
            uc.reg_write(x.UC_X86_REG_XMM0 + i, int.from_bytes(image[160 + 16 * i:176 + 16 * i], "little"))
        extra = bytearray(image)
        extra[0:5] = bytes(5)
        struct.pack_into("<HQQI", extra, 6, fop & ~0x7FF, 0, 0, 0)
        for i in range(8):
            extra[32 + 16 * i:42 + 16 * i] = bytes(10)
        extra[160:416] = bytes(256)
        self._fx_extra = bytes(extra)

