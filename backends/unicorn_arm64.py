"""aarch64 vCPUs on Unicorn 2.1.4 (the guest runs at EL1/EL0).

Unicorn takes no exception itself: hv's native interrupt hook (``hv_a64_intr_hook`` in
``native/hv_native_arm64.c``) enters the guest's vector table (ELR_EL1, SPSR_EL1,
ESR_EL1, FAR_EL1, PSTATE, VBAR_EL1 + offset) for svc, brk, undefined instructions and
aborts without leaving the engine; hvc/smc and anything unknown come to Python, which
stops the engine and handles them after ``emu_start``. EL3/EL2 are kept out of the way:
SCR_EL3 = NS|HCE|RW (so ``hvc`` is reported and EL2/EL1 are AArch64) and HCR_EL2.RW,
which lets the engine execute ``eret``. PSCI calls over ``hvc``/``smc`` are answered
here. CNTVCT_EL0 is a virtual counter carried in the state.

System registers: the native MRS/MSR hooks let the engine handle every register hv does
not own; MPIDR_EL1 and the bare vCPU's counter are answered natively, and only the
registers a machine's :class:`SysregHandler` serves (ROUTED_SYSREGS) reach Python.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import struct
import time
import weakref
from dataclasses import dataclass
from typing import Any

from hv.memory import GuestMemoryError
from hv.state import ARM64_SYSREG_NAMES, Arm64CpuState, CpuState
from hv_backends.arm64_psci import psci_call
from hv_backends.base import BackendError, Exit, ExitReason, PowerHandler, SysregHandler
from hv_backends.unicorn_common import (
    UnicornLayoutError,
    UnicornVcpuBase,
    _fn_addr,
    _import_unicorn,
    _native,
    add_native_hook,
    add_native_insn_hooks,
    library_is_patched,
)

log = logging.getLogger(__name__)

# (crn, crm, op0, op1, op2) of each system register in the canonical state.
SYSREG_ENCODINGS: dict[str, tuple[int, int, int, int, int]] = {
    "SCTLR_EL1": (1, 0, 3, 0, 0), "TTBR0_EL1": (2, 0, 3, 0, 0), "TTBR1_EL1": (2, 0, 3, 0, 1),
    "TCR_EL1": (2, 0, 3, 0, 2), "MAIR_EL1": (10, 2, 3, 0, 0), "AMAIR_EL1": (10, 3, 3, 0, 0),
    "VBAR_EL1": (12, 0, 3, 0, 0), "CPACR_EL1": (1, 0, 3, 0, 2), "TPIDR_EL0": (13, 0, 3, 3, 2),
    "TPIDRRO_EL0": (13, 0, 3, 3, 3), "TPIDR_EL1": (13, 0, 3, 0, 4), "CONTEXTIDR_EL1": (13, 0, 3, 0, 1),
    "ESR_EL1": (5, 2, 3, 0, 0), "FAR_EL1": (6, 0, 3, 0, 0), "PAR_EL1": (7, 4, 3, 0, 0),
    "AFSR0_EL1": (5, 1, 3, 0, 0), "AFSR1_EL1": (5, 1, 3, 0, 1), "CNTKCTL_EL1": (14, 1, 3, 0, 0),
    "CNTV_CTL_EL0": (14, 3, 3, 3, 1), "CNTV_CVAL_EL0": (14, 3, 3, 3, 2), "MDSCR_EL1": (0, 2, 2, 0, 2),
}
# IMPLEMENTATION DEFINED registers the engine reads as zero and ignores writes to: hv
# carries their values beside the engine so a state from KVM round-trips.
CARRIED_SYSREGS = frozenset({"AMAIR_EL1", "AFSR0_EL1", "AFSR1_EL1"})
SPSR_EL1 = (4, 0, 3, 0, 0)
SCR_EL3 = (1, 1, 3, 6, 0)
HCR_EL2 = (1, 1, 3, 4, 0)
CNTVCT_EL0 = (14, 0, 3, 3, 2)
CNTPCT_EL0 = (14, 0, 3, 3, 1)
SCR_EL3_VALUE = (1 << 0) | (1 << 8) | (1 << 10)    # NS, HCE (hvc enabled), RW (lower ELs AArch64)
HCR_EL2_VALUE = 1 << 31                           # RW: EL1 is AArch64
COUNTER_NS_PER_TICK = 16                          # CNTFRQ_EL0 = 62.5 MHz, as Unicorn reports
# System registers a machine's sysreg handler may serve (GICv3 CPU interface, generic
# timer), by (crn, crm, op0, op1, op2). Unicorn has no GIC: an ICC_* access it does not
# know only reaches hv through the MRS/MSR hook.
ROUTED_SYSREGS: dict[tuple[int, int, int, int, int], str] = {
    (4, 6, 3, 0, 0): "ICC_PMR_EL1", (12, 12, 3, 0, 0): "ICC_IAR1_EL1", (12, 12, 3, 0, 1): "ICC_EOIR1_EL1",
    (12, 12, 3, 0, 2): "ICC_HPPIR1_EL1", (12, 12, 3, 0, 3): "ICC_BPR1_EL1", (12, 12, 3, 0, 4): "ICC_CTLR_EL1",
    (12, 12, 3, 0, 5): "ICC_SRE_EL1", (12, 12, 3, 0, 6): "ICC_IGRPEN0_EL1", (12, 12, 3, 0, 7): "ICC_IGRPEN1_EL1",
    (12, 11, 3, 0, 1): "ICC_DIR_EL1", (12, 11, 3, 0, 3): "ICC_RPR_EL1", (12, 11, 3, 0, 5): "ICC_SGI1R_EL1",
    (12, 9, 3, 0, 0): "ICC_AP1R0_EL1", (12, 8, 3, 0, 4): "ICC_AP0R0_EL1", (12, 8, 3, 0, 0): "ICC_IAR0_EL1",
    (12, 8, 3, 0, 1): "ICC_EOIR0_EL1", (12, 8, 3, 0, 2): "ICC_HPPIR0_EL1", (12, 8, 3, 0, 3): "ICC_BPR0_EL1",
    (14, 3, 3, 3, 0): "CNTV_TVAL_EL0", (14, 3, 3, 3, 1): "CNTV_CTL_EL0", (14, 3, 3, 3, 2): "CNTV_CVAL_EL0",
    (14, 2, 3, 3, 0): "CNTP_TVAL_EL0", (14, 2, 3, 3, 1): "CNTP_CTL_EL0", (14, 2, 3, 3, 2): "CNTP_CVAL_EL0",
    CNTVCT_EL0: "CNTVCT_EL0", CNTPCT_EL0: "CNTPCT_EL0",
}
# Routed writes the engine also performs (so the canonical state's copy stays current).
ENGINE_ALSO_WRITES = frozenset({"CNTV_CTL_EL0", "CNTV_CVAL_EL0"})

# Saved context (uc_context header + CPUARMState of unicorn 2.1.4): the pending
# exception record {u32 syndrome; u32 fsr; u64 vaddress; u32 target_el}, verified at
# start-up by taking a real prefetch abort.
CTX_EXCEPTION = 3064

# UC_HOOK_INTR numbers (QEMU EXCP_*)
EXCP_UDEF = 1
EXCP_SWI = 2
EXCP_PREFETCH_ABORT = 3
EXCP_DATA_ABORT = 4
EXCP_BKPT = 7
EXCP_HVC = 11
EXCP_SMC = 13

EC_UNKNOWN = 0x00
EC_SVC64 = 0x15
EC_BRK = 0x3C
IL = 1 << 25

MPIDR_EL1 = (0, 0, 3, 0, 5)
MPIDR_RES1 = 1 << 31

PSTATE_EL1H_MASKED = 0x3C5
PSTATE_I = 1 << 7
EXCP_HOOK_ERROR = -1     # Arm64Event.intno of an exception raised inside a Python hook

# sysreg_class bits of the native hooks (hv_native_arm64.c)
CLASS_ROUTE_READ = 1
CLASS_ROUTE_WRITE = 2
CLASS_MPIDR = 4
CLASS_COUNTER = 8
# The register ids hv_native_arm64.c was compiled with, in hv_a64_regids' order.
NATIVE_REGIDS = ("SP", "XZR", "PC", "ELR_EL1", "SP_EL0", "SP_EL1", "PSTATE", "CP_REG", "TTBR0_EL1", "TTBR1_EL1")


# Each VM's table of its vCPUs' native records (struct hv_a64_peers), which a broadcast
# TLBI (hv_a64_sys_hook) walks; kept alive by the vCPUs that joined it.
_PEERS: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()
MAX_PEERS = 64


def sysreg_key(enc: tuple[int, int, int, int, int]) -> int:
    """Index of (crn, crm, op0, op1, op2) in the native class table: op0:op1:crn:crm:op2,
    the MRS/MSR encoding's bits 20..5."""
    crn, crm, op0, op1, op2 = enc
    return (op0 & 3) << 14 | (op1 & 7) << 11 | (crn & 15) << 7 | (crm & 15) << 3 | (op2 & 7)


@functools.cache
def verify_layout() -> None:
    """Check that every system register hv carries round-trips through the CP_REG API."""
    unicorn = _import_unicorn()
    from unicorn import arm64_const as a  # noqa: PLC0415

    uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
    for name, enc in SYSREG_ENCODINGS.items():
        if name in CARRIED_SYSREGS:
            continue
        probe = 0x1000 if name != "CNTV_CTL_EL0" else 1
        uc.reg_write(a.UC_ARM64_REG_CP_REG, (*enc, probe))
        got = uc.reg_read(a.UC_ARM64_REG_CP_REG, enc)
        if got != probe:
            raise UnicornLayoutError(f"unicorn 2.1.4 aarch64 system register {name} did not round-trip "
                                     f"({probe:#x} -> {got:#x})")
    if set(SYSREG_ENCODINGS) != set(ARM64_SYSREG_NAMES):
        raise UnicornLayoutError("aarch64 system register table differs from hv.state")
    # A prefetch abort at a known address (MMU on, empty translation table) must leave
    # its syndrome and address where hv reads them.
    uc.mem_map(0, 0x10000)
    uc.reg_write(a.UC_ARM64_REG_CP_REG, (*SYSREG_ENCODINGS["TTBR0_EL1"], 0x8000))
    uc.reg_write(a.UC_ARM64_REG_CP_REG, (*SYSREG_ENCODINGS["TCR_EL1"], 25 | (1 << 23)))
    uc.reg_write(a.UC_ARM64_REG_CP_REG, (*SYSREG_ENCODINGS["SCTLR_EL1"], 0x30D00801))
    seen: list[tuple[int, int, int]] = []

    def on_intr(engine: Any, intno: int, user_data: Any) -> None:
        ctx = engine.context_save()
        raw = ctypes.string_at(ctx.context, ctx.size)
        syndrome, _, vaddress = struct.unpack_from("<IIQ", raw, CTX_EXCEPTION)
        seen.append((intno, syndrome, vaddress))
        engine.emu_stop()

    uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
    with contextlib.suppress(unicorn.UcError):
        uc.emu_start(0x1230, 0, count=1)
    if not seen or seen[0][0] != EXCP_PREFETCH_ABORT or seen[0][1] >> 26 != 0x21 or seen[0][2] != 0x1230:
        raise UnicornLayoutError(f"unicorn saved-context layout differs from 2.1.4: abort record {seen!r}")
    native = _native()
    ids = native.ffi.new("int32_t[]", len(NATIVE_REGIDS))
    native.lib.hv_a64_regids(ids, len(NATIVE_REGIDS))
    for i, name in enumerate(NATIVE_REGIDS):
        if ids[i] != getattr(a, f"UC_ARM64_REG_{name}"):
            raise UnicornLayoutError(f"hv_native_arm64.c was built with UC_ARM64_REG_{name} = {ids[i]}, "
                                     f"unicorn says {getattr(a, f'UC_ARM64_REG_{name}')}")
    _define_python_callbacks()


@functools.cache
def _define_python_callbacks() -> None:
    """The extern "Python" functions the native hooks call for what hv decides itself."""
    ffi = _native().ffi

    @ffi.def_extern(name="hv_a64_py_sysreg")
    def py_sysreg(handle: Any, isread: int, reg: int, cp: Any) -> int:
        vcpu: UnicornArm64Vcpu = ffi.from_handle(handle)
        try:
            return vcpu._on_mrs(vcpu.uc, reg, cp) if isread else vcpu._on_msr(vcpu.uc, reg, cp)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() after emu_start
            vcpu._hook_failed(exc)
            return 0

    @ffi.def_extern(name="hv_a64_py_intr")
    def py_intr(handle: Any, intno: int) -> None:
        vcpu: UnicornArm64Vcpu = ffi.from_handle(handle)
        try:
            vcpu._on_interrupt(vcpu.uc, intno)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() after emu_start
            vcpu._hook_failed(exc)


@dataclass
class Arm64Event:
    intno: int
    pc: int
    syndrome: int = 0
    vaddress: int = 0
    error: BaseException | None = None    # EXCP_HOOK_ERROR: what a Python hook raised


class UnicornArm64Vcpu(UnicornVcpuBase):
    """An aarch64 vCPU (Cortex-A72 model of Unicorn 2.1.4) running EL1/EL0 code."""

    # The window is exact here: every instruction that can clear PSTATE.I (msr daifclr,
    # msr daif, eret) ends its translation block, and the native block hook looks at the
    # window at every block start, so the engine stops right after the unmasking
    # instruction; aarch64 has no interrupt shadow. No retry kick is needed (each one woke
    # the timer thread, whose GIL the vCPU then waited for).
    exact_interrupt_window = True

    def __init__(self, vm: Any, index: int) -> None:
        verify_layout()
        from unicorn import arm64_const  # noqa: PLC0415

        self._a = arm64_const
        self._halted = False
        self._event: Arm64Event | None = None
        self._carried: dict[str, int] = {name: 0 for name in CARRIED_SYSREGS}
        self._sysreg_keys: frozenset[str] = frozenset(SYSREG_ENCODINGS)
        self._sysreg_handler: SysregHandler | None = None
        self._power_handler: PowerHandler | None = None
        super().__init__(vm, index)
        if index == 1 and not library_is_patched():
            log.warning("aarch64 guest with several vCPUs on the unicorn wheel's libunicorn: its exclusive "
                        "stores (stxr) are not atomic between vCPUs (lost updates corrupt the guest); hv's "
                        "patched library makes them atomic (backends/native/unicorn/README.md)")
        self._x_ids = [getattr(arm64_const, f"UC_ARM64_REG_X{i}") for i in range(31)]
        self.set_state(Arm64CpuState())

    def _install_kick_check(self) -> None:
        """Called once by the base constructor: the C record of this vCPU (struct hv_a64),
        its MRS/MSR/interrupt hooks, and the kick check last (:meth:`_install_poll`), whose
        aarch64 poll callback needs that record (no shared poll callback is installed and
        then replaced)."""
        unicorn = _import_unicorn()
        ffi = self.native.ffi
        self._py_handle = ffi.new_handle(self)
        self._sysreg_class = ffi.new("uint8_t[]", 1 << 16)
        self._exc_context = self.uc.context_save()   # the buffer exception records are saved to
        a64 = ffi.new("struct hv_a64 *")
        a64.vcpu = self.native.struct
        a64.reg_write = ffi.cast("void *", _fn_addr("uc_reg_write"))
        a64.context_save = ffi.cast("void *", _fn_addr("uc_context_save"))
        a64.context = ffi.cast("void *", self._exc_context.context.value)
        a64.ctx_exception = CTX_EXCEPTION
        a64.py = self._py_handle
        a64.sysreg_class = self._sysreg_class
        a64.mpidr = self.mpidr
        self.a64 = a64
        self._a64_addr = int(ffi.cast("uintptr_t", a64))
        self._join_peers()
        self._fill_sysreg_classes()
        add_native_hook(self.uc, unicorn.UC_HOOK_INTR, "hv_a64_intr_hook", self._a64_addr)
        add_native_insn_hooks(self.uc, self._a64_addr, ((self._a.UC_ARM64_INS_MRS, "hv_a64_mrs_hook"),
                                                        (self._a.UC_ARM64_INS_MSR, "hv_a64_msr_hook"),
                                                        (self._a.UC_ARM64_INS_SYS, "hv_a64_sys_hook")))
        self._install_poll()

    # No block hook with hv's libunicorn (hv_uc_set_poll): the engine runs the check where
    # it enters its execution loop, which every PSTATE.I-clearing instruction reaches (they
    # end their block unchained), and after a poke (kicks, TLB/IC broadcasts, the deadline
    # thread). The block hook's helper calls were a fifth of a store loop's time.
    POLL = True

    def _install_poll(self) -> None:
        """The kick check: a polling engine gets the aarch64 poll callback, which also
        turns the deadline thread's signal into a kick; the wheel's library the shared
        block hook (NativeVcpu.install)."""
        if not self.native.install(self.uc, poll=self.POLL, poll_hook="hv_a64_poll_hook", opaque=self._a64_addr):
            return                      # the wheel's library: the block hook
        ffi = self.native.ffi
        uch = self.uc._uch
        self.a64.poke = ffi.cast("void *", _fn_addr("hv_uc_poke"))
        self.a64.uc = ffi.cast("void *", uch.value)

    def _join_peers(self) -> None:
        """Enter this vCPU in its VM's table for broadcast TLB maintenance: Unicorn has one
        CPU per engine, so a TLBI ...IS of one vCPU must reach the others' engines through
        hv (hv_a64_sys_hook asks them to flush at their next block, and waits)."""
        ffi = self.native.ffi
        self.native.struct.ctl = ffi.cast("void *", _fn_addr("uc_ctl"))
        peers = _PEERS.get(self.vm)
        if peers is None:
            peers = _PEERS[self.vm] = ffi.new("struct hv_a64_peers *")
        if peers.n >= MAX_PEERS:
            raise BackendError(f"at most {MAX_PEERS} aarch64 vCPUs per VM on Unicorn")
        peers.cpu[peers.n] = self.a64
        peers.n += 1
        self._peers = peers
        self.a64.peers = peers

    @property
    def tlb_stats(self) -> dict[str, int]:
        """Broadcast TLB maintenance of this VM: TLBIs broadcast, how many had to wait for
        another vCPU's flush, and waits given up after 5 s (none in a healthy guest)."""
        p = self._peers
        return {"broadcasts": int(p.broadcasts), "waits": int(p.waits), "wait_timeouts": int(p.wait_timeouts),
                "ic_broadcasts": int(p.ic_broadcasts)}

    def _sync_write_hook(self) -> None:
        """Housekeeping between two emu_starts, plus what other vCPUs asked: drop every
        translation block when one of them changed kernel code (ic ... broadcast). Taken
        after the base clears the service flag: a request made meanwhile sets it again."""
        super()._sync_write_hook()
        if self.native.lib.hv_a64_take_tb_flush(self.a64):
            self.uc.ctl_flush_tb()

    def _fill_sysreg_classes(self) -> None:
        """Which system-register accesses the native hooks answer or send to Python: with a
        machine handler every ROUTED_SYSREGS access goes to Python, without one the
        counter is the vCPU's own; MPIDR_EL1 is always answered natively."""
        table = self._sysreg_class
        self.native.ffi.memmove(table, bytes(1 << 16), 1 << 16)
        if self._sysreg_handler is not None:
            for enc in ROUTED_SYSREGS:
                table[sysreg_key(enc)] = CLASS_ROUTE_READ | CLASS_ROUTE_WRITE
            if hasattr(self._sysreg_handler, "counter_timeline"):
                # CNTVCT/CNTPCT = machine clock / 16, computed natively (_start_clock)
                for enc in (CNTVCT_EL0, CNTPCT_EL0):
                    table[sysreg_key(enc)] = CLASS_COUNTER
        else:
            for enc in (CNTVCT_EL0, CNTPCT_EL0):
                table[sysreg_key(enc)] = CLASS_COUNTER
        table[sysreg_key(MPIDR_EL1)] |= CLASS_MPIDR

    @property
    def sysreg_stats(self) -> dict[str, int]:
        """Counts of system-register accesses and exceptions the native hooks handled
        themselves and the ones that went to Python."""
        a = self.a64
        return {"sysreg_native": int(a.sysreg_native), "sysreg_python": int(a.sysreg_python),
                "exceptions_native": int(a.exc_native), "exceptions_python": int(a.exc_python)}

    def _create_engine(self) -> Any:
        unicorn = _import_unicorn()
        return unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)

    def _cp(self, enc: tuple[int, int, int, int, int]) -> int:
        return int(self.uc.reg_read(self._a.UC_ARM64_REG_CP_REG, enc))

    def _set_cp(self, enc: tuple[int, int, int, int, int], value: int) -> None:
        self.uc.reg_write(self._a.UC_ARM64_REG_CP_REG, (*enc, value))

    # -- hooks ---------------------------------------------------------------------
    def _counter_now(self) -> int:
        return int(self.native.lib.hv_a64_counter(self.a64)) & ((1 << 64) - 1)

    def set_sysreg_handler(self, handler: SysregHandler | None) -> None:
        """Route ICC_* and CNT{V,P}{CTL,CVAL,TVAL,CT}_EL0 accesses to ``handler`` (the
        machine's GIC and timers); None restores the engine's own handling."""
        with self._engine_lock:
            self._sysreg_handler = handler
            self._fill_sysreg_classes()

    def arm_timer_deadline(self, host_ns: int | None) -> bool:
        """This vCPU stops itself (KICKED) once the host clock passes ``host_ns``, so a
        timer tick needs no Python thread: a polling engine through its native deadline
        thread (hv_a64_arm_deadline), the block hook by reading the clock every 512 blocks.
        False (the machine's timer thread kicks) if the deadline thread cannot start."""
        deadline = max(1, host_ns) if host_ns is not None else 0
        if self.a64.poke:
            return self.native.lib.hv_a64_arm_deadline(self.a64, deadline) == 0
        self.native.struct.deadline_ns = deadline
        return True

    @property
    def deadline_exits(self) -> int:
        """How many times the vCPU's own timer deadline stopped the engine."""
        return int(self.native.struct.deadline_exits)

    def set_power_handler(self, handler: PowerHandler | None) -> None:
        """Serve PSCI CPU_ON / CPU_OFF / AFFINITY_INFO through ``handler`` (the
        machine's power controller); None answers them NOT_SUPPORTED."""
        with self._engine_lock:
            self._power_handler = handler

    @property
    def mpidr(self) -> int:
        """MPIDR_EL1 as the guest reads it: Aff0 = vCPU index (the FDT's cpu reg)."""
        return MPIDR_RES1 | (self.index & 0xFF) | ((self.index >> 8) & 0xFF) << 8

    def _skip_insn(self, uc: Any, name: str) -> int:
        # Returning 1 skips an access to a register the engine knows (CNT*). One it does
        # not know (ICC_*: no GIC in Unicorn) re-executes forever unless PC is moved past
        # it; moving PC after a known register's access loses register values instead.
        if name.startswith("ICC_"):
            uc.reg_write(self._a.UC_ARM64_REG_PC, uc.reg_read(self._a.UC_ARM64_REG_PC) + 4)
        return 1

    def _on_msr(self, uc: Any, reg: int, cp: Any) -> int:
        """A write to a routed register (the native hook sent it): the handler's."""
        handler = self._sysreg_handler
        if handler is None:
            return 0
        name = ROUTED_SYSREGS.get((cp.crn, cp.crm, cp.op0, cp.op1, cp.op2))
        if name is None:
            return 0
        value = 0 if reg == self._a.UC_ARM64_REG_XZR else int(cp.val)
        if not handler.write(name, value):
            return 0
        if name in ENGINE_ALSO_WRITES:
            return 0
        if name == "CNTV_TVAL_EL0":
            cval = handler.read("CNTV_CVAL_EL0")
            if cval is not None:
                self._set_cp(SYSREG_ENCODINGS["CNTV_CVAL_EL0"], cval)
        return self._skip_insn(uc, name)

    def _on_mrs(self, uc: Any, reg: int, cp: Any) -> int:
        """A read of a routed register (the native hook sent it): the handler's, else the
        vCPU's own counter / MPIDR, else the engine's."""
        handler = self._sysreg_handler
        if handler is not None:
            name = ROUTED_SYSREGS.get((cp.crn, cp.crm, cp.op0, cp.op1, cp.op2))
            value = None if name is None else handler.read(name)
            if name is not None and value is not None:
                if reg != self._a.UC_ARM64_REG_XZR:
                    uc.reg_write(reg, value)
                return self._skip_insn(uc, name)
        key = (cp.crn, cp.crm, cp.op0, cp.op1, cp.op2)
        if key in (CNTVCT_EL0, CNTPCT_EL0):
            if reg != self._a.UC_ARM64_REG_XZR:
                uc.reg_write(reg, self._counter_now())
            return 1
        if key == MPIDR_EL1:   # the engine reports 0x80000000 on every vCPU
            if reg != self._a.UC_ARM64_REG_XZR:
                uc.reg_write(reg, self.mpidr)
            return 1
        return 0

    def _on_interrupt(self, uc: Any, intno: int) -> None:
        """An exception the native hook leaves to hv (hvc/smc, unknown ones): recorded, and
        handled by ``_handle_event`` once the engine has stopped."""
        event = Arm64Event(intno, uc.reg_read(self._a.UC_ARM64_REG_PC))
        if intno in (EXCP_HVC, EXCP_SMC):
            # Back to the hvc/smc itself until the call is handled: if a stop request
            # ends this run before the event is (a kick, housekeeping), the call is made
            # again on the next run instead of being lost.
            event.pc -= 4
            uc.reg_write(self._a.UC_ARM64_REG_PC, event.pc)
        elif intno in (EXCP_PREFETCH_ABORT, EXCP_DATA_ABORT):
            ctx = uc.context_save()
            raw = ctypes.string_at(ctx.context, ctx.size)
            event.syndrome, _, event.vaddress = struct.unpack_from("<IIQ", raw, CTX_EXCEPTION)
        self._event = event
        uc.emu_stop()

    def _hook_failed(self, exc: BaseException) -> None:
        """A Python hook raised: stop the engine; ``run`` raises it again (as Unicorn's
        own Python hooks do)."""
        if self._event is None or self._event.intno != EXCP_HOOK_ERROR:
            self._event = Arm64Event(EXCP_HOOK_ERROR, 0, error=exc)
        self.uc.emu_stop()

    # -- run -----------------------------------------------------------------------
    def _read_pc(self) -> int:
        # native (hv_a64_pc): the binding's reg_read costs microseconds per emu_start
        return int(self.native.lib.hv_a64_pc(self._uc_ptr(), self.a64))

    def _uc_ptr(self) -> Any:
        """The engine handle as the native helpers take it."""
        uch = self.uc._uch
        assert uch is not None   # None only after a failed uc_open, which raised
        return self.native.ffi.cast("void *", uch.value)

    def _undefined_instruction(self, pc: int) -> Arm64Event:
        return Arm64Event(EXCP_UDEF, pc)

    def _start_clock(self) -> None:
        """The counter the native MRS hook answers for this run: the machine's guest clock
        (its timeline cannot change while a vCPU runs) or, bare, the vCPU's own."""
        a = self.a64
        timeline = self._machine_timeline()
        if timeline is None:
            a.clk_timeline = 0
            a.cnt_ns0 = time.monotonic_ns()
            a.cnt_running = 1
        elif timeline[1] is None:          # the machine's clock stands still
            a.clk_timeline = 0
            a.cnt_base = (timeline[0] // COUNTER_NS_PER_TICK) & ((1 << 64) - 1)
            a.cnt_running = 0
        else:
            a.clk_guest_ns, a.clk_host_ns = timeline
            a.clk_timeline = 1
            a.cnt_running = 1
        self.native.lib.hv_a64_set_in_engine(self.native.struct, 1)

    def _machine_timeline(self) -> tuple[int, int | None] | None:
        """The machine clock's (guest ns, host ns) when its handler serves the counter."""
        timeline = getattr(self._sysreg_handler, "counter_timeline", None)
        return None if timeline is None else timeline()

    def _stop_clock(self) -> None:
        self.native.lib.hv_a64_set_in_engine(self.native.struct, 0)
        self.a64.cnt_base = self._counter_now()
        self.a64.cnt_running = 0

    def _insn_at(self, va: int) -> int | None:
        try:
            phys = self.native.translate(self.uc, va)
            return None if phys is None else self.memory.read_int(phys, 4)
        except (BackendError, GuestMemoryError):
            return None

    def _handle_event(self, event: Arm64Event) -> Exit | None:
        a = self._a
        if event.intno == EXCP_HOOK_ERROR and event.error is not None:
            raise event.error
        if event.intno in (EXCP_HVC, EXCP_SMC):
            self.uc.reg_write(a.UC_ARM64_REG_PC, event.pc + 4)
            return self._psci()
        if event.intno == EXCP_SWI:
            insn = self._insn_at(event.pc - 4) or 0
            self.enter_exception(EC_SVC64 << 26 | IL | (insn >> 5) & 0xFFFF, event.pc)
            return None
        if event.intno == EXCP_BKPT:
            insn = self._insn_at(event.pc) or 0
            self.enter_exception(EC_BRK << 26 | IL | (insn >> 5) & 0xFFFF, event.pc)
            return None
        if event.intno in (EXCP_PREFETCH_ABORT, EXCP_DATA_ABORT):
            self.enter_exception(event.syndrome, event.pc, far=event.vaddress)
            return None
        if event.intno == EXCP_UDEF:
            self.enter_exception(EC_UNKNOWN << 26 | IL, event.pc)
            return None
        pc = self.uc.reg_read(a.UC_ARM64_REG_PC)
        return Exit(ExitReason.ERROR, f"unhandled aarch64 exception {event.intno} at pc {pc:#x}")

    def _psci(self) -> Exit | None:
        a = self._a
        uc = self.uc
        function = uc.reg_read(a.UC_ARM64_REG_X0) & 0xFFFFFFFF
        args = [uc.reg_read(r) for r in (a.UC_ARM64_REG_X1, a.UC_ARM64_REG_X2, a.UC_ARM64_REG_X3)]
        if not function & 0x40000000:        # SMC32/HVC32 calling convention: w1..w3
            args = [arg & 0xFFFFFFFF for arg in args]
        outcome = psci_call(function, args, self._power_handler, self.index)
        if isinstance(outcome, Exit):
            return outcome
        uc.reg_write(a.UC_ARM64_REG_X0, outcome & ((1 << 64) - 1))
        return None

    # -- exception entry -------------------------------------------------------------
    def enter_exception(self, esr: int, return_pc: int, far: int | None = None, kind: int = 0) -> None:
        """Take an exception to EL1: ``kind`` 0 synchronous, 1 IRQ, 2 FIQ, 3 SError.

        The entry itself is ``hv_a64_enter`` (the native hook's): the current SP is banked,
        ELR_EL1 = ``return_pc``, SPSR_EL1 = PSTATE, ESR_EL1 (and FAR_EL1) for synchronous
        exceptions, PSTATE = EL1h with DAIF masked, PC = VBAR_EL1 + offset + 0x80 * kind
        (offset 0x000 from EL1t, 0x200 from EL1h, 0x400 from EL0)."""
        rc = self.native.lib.hv_a64_enter(self._uc_ptr(), self.a64,
                                          esr & ((1 << 64) - 1), return_pc & ((1 << 64) - 1),
                                          far is not None, (far or 0) & ((1 << 64) - 1), kind)
        if rc != 0:
            raise self._above_el1()

    def _above_el1(self) -> BackendError:
        """The error for an exception hv cannot enter: the vCPU is at EL2/EL3."""
        el = (int(self.uc.reg_read(self._a.UC_ARM64_REG_PSTATE)) >> 2) & 3
        return BackendError(f"exception taken from EL{el}: hv runs guests at EL1/EL0 only")

    def inject_irq(self) -> bool:
        """Take an IRQ exception now if PSTATE.I allows; False otherwise (vCPU stopped)."""
        with self._engine_lock:
            return self._inject_irq_locked()

    def interrupts_enabled(self) -> bool:
        """PSTATE.I clear (one register read)."""
        with self._engine_lock:
            return not self.native.lib.hv_a64_irqs_masked(self._uc_ptr(), self.a64)

    @property
    def ready_for_interrupt(self) -> bool:
        """aarch64 has no interrupt shadow: the same as :meth:`interrupts_enabled`."""
        return self.interrupts_enabled()

    def _inject_irq_locked(self) -> bool:
        # PSTATE.I check and IRQ entry in one native call (hv_a64_inject_irq)
        rc = self.native.lib.hv_a64_inject_irq(self._uc_ptr(), self.a64)
        if rc == 0:
            return False
        if rc < 0:
            raise self._above_el1()
        self._halted = False
        return True

    def close(self) -> None:
        """No broadcast reaches this VM's vCPUs any more (they are closed together)."""
        with self._engine_lock:
            if self._peers.n and self._peers.wait_timeouts:
                log.warning("aarch64 TLB broadcasts: %s", self.tlb_stats)
            self._peers.n = 0
            self.native.lib.hv_a64_timer_stop(self.a64)   # no poke after the engine closes
        super().close()

    # -- state ---------------------------------------------------------------------
    def get_state(self) -> Arm64CpuState:
        with self._engine_lock:
            return self._get_state()

    def _get_state(self) -> Arm64CpuState:
        a = self._a
        uc = self.uc
        st = Arm64CpuState()
        st.x = [uc.reg_read(r) for r in self._x_ids]
        st.pc = uc.reg_read(a.UC_ARM64_REG_PC)
        st.pstate = uc.reg_read(a.UC_ARM64_REG_PSTATE)
        el = (st.pstate >> 2) & 3
        current = 0 if el == 0 or not st.pstate & 1 else el
        sp = uc.reg_read(a.UC_ARM64_REG_SP)
        st.sp_el0 = sp if current == 0 else uc.reg_read(a.UC_ARM64_REG_SP_EL0)
        st.sp_el1 = sp if current == 1 else uc.reg_read(a.UC_ARM64_REG_SP_EL1)
        st.elr_el1 = uc.reg_read(a.UC_ARM64_REG_ELR_EL1)
        st.spsr_el1 = self._cp(SPSR_EL1)
        st.sysregs = {name: self._carried[name] if name in CARRIED_SYSREGS else self._cp(enc)
                      for name, enc in SYSREG_ENCODINGS.items() if name in self._sysreg_keys}
        st.v = [uc.reg_read(a.UC_ARM64_REG_Q0 + i) for i in range(32)]
        st.fpcr = uc.reg_read(a.UC_ARM64_REG_FPCR)
        st.fpsr = uc.reg_read(a.UC_ARM64_REG_FPSR)
        handler = self._sysreg_handler
        routed = None if handler is None else handler.read("CNTVCT_EL0")
        st.cntvct = self._counter_now() if routed is None else routed
        st.halted = self._halted
        return st

    def set_state(self, state: CpuState) -> None:
        with self._engine_lock:
            self._set_state(state)

    def _set_state(self, state: CpuState) -> None:
        if not isinstance(state, Arm64CpuState):
            raise BackendError(f"an aarch64 vCPU cannot load a {type(state).__name__}")
        el = (state.pstate >> 2) & 3
        if el > 1:
            raise BackendError(f"PSTATE {state.pstate:#x} selects EL{el}; hv runs guests at EL1/EL0")
        a = self._a
        uc = self.uc
        self._set_cp(SCR_EL3, SCR_EL3_VALUE)
        self._set_cp(HCR_EL2, HCR_EL2_VALUE)
        for reg, value in zip(self._x_ids, state.x, strict=True):
            uc.reg_write(reg, value)
        for name, value in state.sysregs.items():
            if name in CARRIED_SYSREGS:
                self._carried[name] = value
            else:
                self._set_cp(SYSREG_ENCODINGS[name], value)
        self._sysreg_keys = frozenset(state.sysregs)
        uc.reg_write(a.UC_ARM64_REG_ELR_EL1, state.elr_el1)
        self._set_cp(SPSR_EL1, state.spsr_el1)
        for i, value in enumerate(state.v):
            uc.reg_write(a.UC_ARM64_REG_Q0 + i, value)
        uc.reg_write(a.UC_ARM64_REG_FPCR, state.fpcr)
        uc.reg_write(a.UC_ARM64_REG_FPSR, state.fpsr)
        uc.reg_write(a.UC_ARM64_REG_SP_EL0, state.sp_el0)
        uc.reg_write(a.UC_ARM64_REG_SP_EL1, state.sp_el1)
        uc.reg_write(a.UC_ARM64_REG_PSTATE, state.pstate)
        current = 0 if el == 0 or not state.pstate & 1 else el
        uc.reg_write(a.UC_ARM64_REG_SP, state.sp_el0 if current == 0 else state.sp_el1)
        uc.reg_write(a.UC_ARM64_REG_PC, state.pc)
        self._set_cp(SCR_EL3, SCR_EL3_VALUE)  # rebuilds hflags after the PSTATE write
        unicorn = _import_unicorn()
        uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)
        uc.ctl_flush_tb()
        self.a64.cnt_base = state.cntvct & ((1 << 64) - 1)
        if self.a64.cnt_running:
            self.a64.cnt_ns0 = time.monotonic_ns()
        self._halted = state.halted
