"""Canonical, backend-neutral vCPU state.

Everything a guest can observe about a vCPU is held here as plain values. A backend
translates to and from this form exactly (``Vcpu.get_state()`` / ``Vcpu.set_state()``);
migration and snapshots serialise it with :func:`state_to_dict` / :func:`state_from_dict`.

The x86_64 form is shaped after KVM's structures (``kvm_regs``, ``kvm_sregs``,
``kvm_segment``) because they carry everything, including the segment descriptor caches
and EFER.LMA, which Unicorn's register API cannot express and its backend must recover
through the engine's saved context.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

from hv.boards.q35.layout import BSP_APIC_BASE_MSR
from hv.devices.persist import plain_dict
from hv.errors import HvError

X86_GPR_NAMES: tuple[str, ...] = (
    "rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp",
    "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15",
)
X86_SEGMENT_NAMES: tuple[str, ...] = ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")

# MSR numbers carried in X86CpuState.msrs.
MSR_IA32_SYSENTER_CS = 0x174
MSR_IA32_SYSENTER_ESP = 0x175
MSR_IA32_SYSENTER_EIP = 0x176
MSR_IA32_CR_PAT = 0x277
MSR_STAR = 0xC0000081
MSR_LSTAR = 0xC0000082
MSR_CSTAR = 0xC0000083
MSR_SYSCALL_MASK = 0xC0000084
MSR_KERNEL_GS_BASE = 0xC0000102
MSR_TSC_AUX = 0xC0000103
CANONICAL_MSRS: tuple[int, ...] = (
    MSR_IA32_SYSENTER_CS, MSR_IA32_SYSENTER_ESP, MSR_IA32_SYSENTER_EIP, MSR_IA32_CR_PAT,
    MSR_STAR, MSR_LSTAR, MSR_CSTAR, MSR_SYSCALL_MASK, MSR_KERNEL_GS_BASE,
)
PAT_RESET = 0x0007040600070406

EFER_SCE = 1 << 0
EFER_LME = 1 << 8
EFER_LMA = 1 << 10
EFER_NXE = 1 << 11

FXSAVE_SIZE = 512
MXCSR_RESET = 0x1F80
FCW_RESET = 0x037F


def fxsave_reset() -> bytes:
    """The FXSAVE legacy-region image of a CPU after reset (FCW=0x37F, MXCSR=0x1F80)."""
    image = bytearray(FXSAVE_SIZE)
    image[0:2] = FCW_RESET.to_bytes(2, "little")
    image[24:28] = MXCSR_RESET.to_bytes(4, "little")
    image[28:32] = (0xFFFF).to_bytes(4, "little")  # MXCSR_MASK as a real CPU reports it
    return bytes(image)


# vCPU power states (``power`` field). aarch64: PSCI on/off; x86: running, or waiting
# for a STARTUP IPI after INIT (also the state of an application processor at reset).
POWER_ON = "on"
POWER_OFF = "off"
POWER_WAIT_SIPI = "wait-for-sipi"
POWER_STATES: dict[str, frozenset[str]] = {
    "x86_64": frozenset({POWER_ON, POWER_WAIT_SIPI}),
    "aarch64": frozenset({POWER_ON, POWER_OFF}),
}
# Version of the canonical CPU state form. 2 added ``power``; a version-1 dict (no
# ``power`` key) still loads, with ``power`` None: the machine then decides (vCPU 0
# runs, the others stay powered off / waiting, as version-1 machines kept them).
STATE_VERSION = 2


class StateError(HvError, ValueError):
    """A CPU state value is malformed (wrong type, width or missing field)."""


@dataclass
class Segment:
    """A segment register with its hidden descriptor cache (KVM's ``kvm_segment``)."""

    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 3
    present: int = 1
    dpl: int = 0
    db: int = 0
    s: int = 1
    l: int = 0  # noqa: E741 - the architectural name of the long-mode bit
    g: int = 0
    avl: int = 0
    unusable: int = 0

    @classmethod
    def flat32_code(cls, selector: int) -> Segment:
        return cls(selector, 0, 0xFFFFFFFF, 0xB, 1, 0, 1, 1, 0, 1)

    @classmethod
    def flat32_data(cls, selector: int) -> Segment:
        return cls(selector, 0, 0xFFFFFFFF, 0x3, 1, 0, 1, 1, 0, 1)


@dataclass
class DescriptorTable:
    """GDTR or IDTR."""

    base: int = 0
    limit: int = 0xFFFF


@dataclass
class X86CpuState:
    """Architectural state of one x86_64 vCPU. Defaults are the reset state."""

    ARCH: ClassVar[str] = "x86_64"

    rax: int = 0
    rbx: int = 0
    rcx: int = 0
    rdx: int = 0
    rsi: int = 0
    rdi: int = 0
    rsp: int = 0
    rbp: int = 0
    r8: int = 0
    r9: int = 0
    r10: int = 0
    r11: int = 0
    r12: int = 0
    r13: int = 0
    r14: int = 0
    r15: int = 0
    rip: int = 0xFFF0
    rflags: int = 0x2

    cs: Segment = field(default_factory=lambda: Segment(0xF000, 0xFFFF0000, 0xFFFF, 0xB))
    ds: Segment = field(default_factory=Segment)
    es: Segment = field(default_factory=Segment)
    fs: Segment = field(default_factory=Segment)
    gs: Segment = field(default_factory=Segment)
    ss: Segment = field(default_factory=Segment)
    tr: Segment = field(default_factory=lambda: Segment(0, 0, 0xFFFF, 0xB, 1, 0, 0, 0))
    ldt: Segment = field(default_factory=lambda: Segment(0, 0, 0xFFFF, 0x2, 1, 0, 0, 0))
    gdt: DescriptorTable = field(default_factory=DescriptorTable)
    idt: DescriptorTable = field(default_factory=DescriptorTable)

    cr0: int = 0x60000010
    cr2: int = 0
    cr3: int = 0
    cr4: int = 0
    cr8: int = 0
    efer: int = 0
    apic_base: int = BSP_APIC_BASE_MSR     # reset value of a BSP: xAPIC at the q35 LAPIC_BASE, enabled

    # MSR number -> value; always holds every number in CANONICAL_MSRS.
    msrs: dict[int, int] = field(
        default_factory=lambda: {m: (PAT_RESET if m == MSR_IA32_CR_PAT else 0) for m in CANONICAL_MSRS}
    )
    # x87/SSE state as the 512-byte FXSAVE legacy region (ST registers stack-relative).
    fxsave: bytes = field(default_factory=fxsave_reset)
    # Guest-visible time stamp counter at the moment the state was taken.
    tsc: int = 0
    # STI / MOV SS interrupt shadow (KVM_VCPUEVENTS_SHADOW bits) and NMI masking.
    interrupt_shadow: int = 0
    nmi_masked: bool = False
    # True when the vCPU was stopped inside HLT waiting for an interrupt.
    halted: bool = False
    # "on" (running) or "wait-for-sipi" (after INIT / at reset for an AP); None only
    # for a version-1 state, which carried no power state (see STATE_VERSION).
    power: str | None = POWER_ON

    @property
    def cpl(self) -> int:
        return self.ss.dpl

    @property
    def long_mode_active(self) -> bool:
        return bool(self.efer & EFER_LMA)

    def gprs(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in X86_GPR_NAMES}


ARM64_SYSREG_NAMES: tuple[str, ...] = (
    "SCTLR_EL1", "TTBR0_EL1", "TTBR1_EL1", "TCR_EL1", "MAIR_EL1", "AMAIR_EL1", "VBAR_EL1",
    "CPACR_EL1", "TPIDR_EL0", "TPIDRRO_EL0", "TPIDR_EL1", "CONTEXTIDR_EL1", "ESR_EL1",
    "FAR_EL1", "PAR_EL1", "AFSR0_EL1", "AFSR1_EL1", "CNTKCTL_EL1", "CNTV_CTL_EL0",
    "CNTV_CVAL_EL0", "MDSCR_EL1",
)
SCTLR_EL1_RESET = 0x30D00800
PSTATE_EL1H_DAIF = 0x3C5  # EL1h with D, A, I, F masked: the state at kernel entry


@dataclass
class Arm64CpuState:
    """Architectural state of one aarch64 vCPU running at EL1/EL0. Defaults are reset."""

    ARCH: ClassVar[str] = "aarch64"

    x: list[int] = field(default_factory=lambda: [0] * 31)
    sp_el0: int = 0
    sp_el1: int = 0
    pc: int = 0
    pstate: int = PSTATE_EL1H_DAIF
    elr_el1: int = 0
    spsr_el1: int = 0
    sysregs: dict[str, int] = field(
        default_factory=lambda: {n: (SCTLR_EL1_RESET if n == "SCTLR_EL1" else 0) for n in ARM64_SYSREG_NAMES}
    )
    # V0..V31 as 128-bit unsigned integers.
    v: list[int] = field(default_factory=lambda: [0] * 32)
    fpcr: int = 0
    fpsr: int = 0
    # Guest-visible virtual counter (CNTVCT_EL0) at the moment the state was taken.
    cntvct: int = 0
    # True when the vCPU was stopped inside WFI.
    halted: bool = False
    # PSCI power state, "on" or "off"; None only for a version-1 state (no power state).
    power: str | None = POWER_ON

    @property
    def current_el(self) -> int:
        return (self.pstate >> 2) & 3


CpuState = X86CpuState | Arm64CpuState
_STATE_TYPES: dict[str, type] = {"x86_64": X86CpuState, "aarch64": Arm64CpuState}


def state_to_dict(state: CpuState) -> dict[str, Any]:
    """A JSON-compatible plain dict (bytes as hex, dict keys as strings)."""
    raw = plain_dict(state)   # asdict's value, 134 -> ~20 us: saved with the guest paused
    if isinstance(state, X86CpuState):
        raw["fxsave"] = state.fxsave.hex()
        raw["msrs"] = {str(k): v for k, v in state.msrs.items()}
    if state.power is None:      # a version-1 state stays one
        del raw["power"]
    raw["arch"] = state.ARCH
    return raw


def _check_int(name: str, value: Any, bits: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise StateError(f"{name}: expected an integer, got {type(value).__name__}")
    if not 0 <= value < (1 << bits):
        raise StateError(f"{name}: {value:#x} does not fit in {bits} bits")
    return value


def state_from_dict(raw: Any) -> CpuState:
    """Rebuild a state from :func:`state_to_dict` output, validating every field.

    Untrusted input (a migration stream) passes through here: unknown, missing or
    out-of-range fields raise :class:`StateError` naming the field.
    """
    if not isinstance(raw, dict):
        raise StateError("cpu state: expected an object")
    arch = raw.get("arch")
    cls = _STATE_TYPES.get(arch) if isinstance(arch, str) else None
    if cls is None or not isinstance(arch, str):   # (a known arch is a str; this tells the type checker)
        raise StateError(f"cpu state: unknown architecture {arch!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    extra = set(raw) - names - {"arch"}
    missing = names - set(raw) - {"power"}   # version 1 had no power state
    if extra or missing:
        raise StateError(f"cpu state: unexpected fields {sorted(extra)}, missing {sorted(missing)}")
    power = raw.get("power")
    if "power" in raw and power not in POWER_STATES[arch]:
        raise StateError(f"power: {power!r} is not one of {sorted(POWER_STATES[arch])}")
    state: CpuState = _x86_from_dict(raw) if cls is X86CpuState else _arm64_from_dict(raw)
    state.power = power
    return state


def _x86_from_dict(raw: dict[str, Any]) -> X86CpuState:
    kwargs: dict[str, Any] = {}
    for name in (*X86_GPR_NAMES, "rip", "rflags", "cr0", "cr2", "cr3", "cr4", "cr8", "efer",
                 "apic_base", "tsc"):
        kwargs[name] = _check_int(name, raw[name], 64)
    kwargs["interrupt_shadow"] = _check_int("interrupt_shadow", raw["interrupt_shadow"], 8)
    for name in ("nmi_masked", "halted"):
        if not isinstance(raw[name], bool):
            raise StateError(f"{name}: expected a boolean")
        kwargs[name] = raw[name]
    seg_fields = {f.name: f for f in dataclasses.fields(Segment)}
    for name in X86_SEGMENT_NAMES:
        seg = raw[name]
        if not isinstance(seg, dict) or set(seg) != set(seg_fields):
            raise StateError(f"{name}: malformed segment")
        widths = {"selector": 16, "base": 64, "limit": 32, "type": 4, "dpl": 2}
        kwargs[name] = Segment(**{k: _check_int(f"{name}.{k}", seg[k], widths.get(k, 1)) for k in seg_fields})
    for name in ("gdt", "idt"):
        table = raw[name]
        if not isinstance(table, dict) or set(table) != {"base", "limit"}:
            raise StateError(f"{name}: malformed descriptor table")
        kwargs[name] = DescriptorTable(_check_int(f"{name}.base", table["base"], 64),
                                       _check_int(f"{name}.limit", table["limit"], 16))
    msrs = raw["msrs"]
    if not isinstance(msrs, dict) or len(msrs) > 64:
        raise StateError("msrs: expected an object of at most 64 entries")
    parsed: dict[int, int] = {}
    for key, value in msrs.items():
        try:
            number = int(key)
        except (TypeError, ValueError):
            raise StateError(f"msrs: bad MSR number {key!r}") from None
        parsed[_check_int("msr number", number, 32)] = _check_int(f"msr {key}", value, 64)
    kwargs["msrs"] = parsed
    fx = raw["fxsave"]
    try:
        image = bytes.fromhex(fx) if isinstance(fx, str) else None
    except ValueError:
        image = None
    if image is None or len(image) != FXSAVE_SIZE:
        raise StateError("fxsave: expected 512 bytes as hex")
    kwargs["fxsave"] = image
    return X86CpuState(**kwargs)


def _arm64_from_dict(raw: dict[str, Any]) -> Arm64CpuState:
    x = raw["x"]
    v = raw["v"]
    if not isinstance(x, list) or len(x) != 31:
        raise StateError("x: expected 31 registers")
    if not isinstance(v, list) or len(v) != 32:
        raise StateError("v: expected 32 registers")
    sysregs = raw["sysregs"]
    if not isinstance(sysregs, dict) or set(sysregs) - set(ARM64_SYSREG_NAMES):
        raise StateError("sysregs: unknown register names")
    if not isinstance(raw["halted"], bool):
        raise StateError("halted: expected a boolean")
    return Arm64CpuState(
        x=[_check_int(f"x{i}", val, 64) for i, val in enumerate(x)],
        sp_el0=_check_int("sp_el0", raw["sp_el0"], 64),
        sp_el1=_check_int("sp_el1", raw["sp_el1"], 64),
        pc=_check_int("pc", raw["pc"], 64),
        pstate=_check_int("pstate", raw["pstate"], 64),
        elr_el1=_check_int("elr_el1", raw["elr_el1"], 64),
        spsr_el1=_check_int("spsr_el1", raw["spsr_el1"], 64),
        sysregs={k: _check_int(k, val, 64) for k, val in sysregs.items()},
        v=[_check_int(f"v{i}", val, 128) for i, val in enumerate(v)],
        fpcr=_check_int("fpcr", raw["fpcr"], 32),
        fpsr=_check_int("fpsr", raw["fpsr"], 32),
        cntvct=_check_int("cntvct", raw["cntvct"], 64),
        halted=raw["halted"],
    )
