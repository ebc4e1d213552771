"""The aarch64 Unicorn backend's native hooks (backends/native/hv_native_arm64.c) on real
guest code: exception entry into the guest's vector table (svc, brk, undefined, data and
instruction aborts, IRQs) with the ESR/ELR/SPSR/FAR/SP values the guest's own handler
reads, and system-register filtering (only the registers a machine serves reach Python).

Every guest here logs what its handler sees into RAM, so a wrong syndrome, return
address, saved PSTATE, stack bank or vector offset fails an exact comparison."""
from __future__ import annotations

import threading
from dataclasses import dataclass

import pytest

from hv_backends.base import ExitReason
from tests.backends.unicorn_arm64_guest import (CODE, RAM, STACK_TOP, USER, USER_ALIAS, USER_STACK_TOP, VECTORS,
                                      Arm64Guest)

LOG = RAM + 0x60000          # u64 count, then 64-byte records from LOG + 64
EC_SVC64, EC_BRK, EC_UNKNOWN = 0x15, 0x3C, 0x00
EC_DABT_LOWER, EC_IABT_LOWER = 0x24, 0x20
IL = 1 << 25
UNMAPPED_DATA = 0x7654321000
UNMAPPED_CODE = 0x7654320000

# Each vector branches to a handler that logs {ESR, ELR, SPSR, FAR, SP, SP_EL0, vector,
# x0} and returns: after svc as it is, after an instruction abort to x30, after anything
# else past the faulting instruction. ``svc #0xffff`` ends the test in a wfi.
LOGGING_VECTORS = f"""
    .org 0x000
        mov x10, #0x000
        b sync
    .org 0x080
        mov x10, #0x080
        b irq
    .org 0x200
        mov x10, #0x200
        b sync
    .org 0x280
        mov x10, #0x280
        b irq
    .org 0x400
        mov x10, #0x400
        b sync
    .org 0x480
        mov x10, #0x480
        b irq
    .org 0x800
    record:
        ldr x11, ={LOG:#x}
        ldr x12, [x11]
        add x13, x11, #64
        add x13, x13, x12, lsl #6
        mrs x14, esr_el1
        str x14, [x13]
        mrs x14, elr_el1
        str x14, [x13, #8]
        mrs x14, spsr_el1
        str x14, [x13, #16]
        mrs x14, far_el1
        str x14, [x13, #24]
        mov x14, sp
        str x14, [x13, #32]
        mrs x14, sp_el0
        str x14, [x13, #40]
        str x10, [x13, #48]
        str x0, [x13, #56]
        add x12, x12, #1
        str x12, [x11]
        ret
    irq:
        mov x17, x30
        bl record
        mov x30, x17
        eret
    sync:
        mov x17, x30
        bl record
        mov x30, x17
        mrs x14, esr_el1
        lsr x15, x14, #26
        cmp x15, #0x15
        b.eq svc
        cmp x15, #0x20
        b.eq to_lr
        cmp x15, #0x21
        b.eq to_lr
        mrs x14, elr_el1
        add x14, x14, #4
        msr elr_el1, x14
        eret
    to_lr:
        msr elr_el1, x30
        eret
    svc:
        and x15, x14, #0xffff
        mov x16, #0xffff
        cmp x15, x16
        b.ne 1f
        wfi
    1:  eret
"""


@dataclass
class Record:
    esr: int
    elr: int
    spsr: int
    far: int
    sp: int
    sp_el0: int
    vector: int
    x0: int


def records(guest: Arm64Guest) -> list[Record]:
    count = guest.memory.read_int(LOG, 8)
    assert count < 1000
    return [Record(*(guest.memory.read_int(LOG + 64 + 64 * i + 8 * f, 8) for f in range(8)))
            for i in range(count)]


@pytest.fixture
def guest():
    g = Arm64Guest()
    g.load(VECTORS, LOGGING_VECTORS)
    yield g
    g.close()


USER_PROGRAM = f"""
        mov x0, #0
        mov x1, #50
    loop:
        sub sp, sp, #16
        svc #0x10
        svc #0x1234
        add x0, x0, #1
        cmp x0, x1
        b.ne loop
        ldr x2, ={UNMAPPED_DATA:#x}
        str x0, [x2]
        .inst 0x00000000
        brk #0x7
        ldr x3, ={UNMAPPED_CODE:#x}
        blr x3
        svc #0xffff
"""


def test_exceptions_from_el0_enter_the_lower_el_vector_with_exact_syndromes(guest: Arm64Guest) -> None:
    """100 svcs, then a data abort, an undefined instruction, a brk and an instruction
    abort from EL0, all delivered inside one run (no exit to Python), each with the
    values the architecture defines."""
    guest.load(USER, USER_PROGRAM)
    va = USER_ALIAS + (USER - RAM)
    st = guest.state(pc=va, mmu=True)
    st.pstate = 0                                   # EL0t, flags clear, interrupts unmasked
    guest.vcpu.set_state(st)
    assert guest.run().reason is ExitReason.HALT   # the wfi after svc #0xffff
    log = records(guest)
    assert len(log) == 2 * 50 + 5
    for i in range(50):
        flags = 0 if i == 0 else 0x80000000          # N from `cmp x0, #50` with x0 < 50
        for k, (imm, after) in enumerate(((0x10, va + 16), (0x1234, va + 20))):
            r = log[2 * i + k]
            assert (r.esr, r.elr, r.spsr, r.vector, r.x0) == ((EC_SVC64 << 26) | IL | imm, after, flags, 0x400, i)
            assert (r.sp, r.sp_el0) == (STACK_TOP, USER_STACK_TOP - 16 * (i + 1))
    dabt, udf, brk, iabt, end = log[100:]
    zc = 0x60000000                                  # Z and C from the last cmp
    assert dabt.esr >> 26 == EC_DABT_LOWER and dabt.esr & IL and dabt.esr & (1 << 6)   # WnR
    assert dabt.esr & 0x3C == 0x04 and (dabt.far, dabt.elr, dabt.spsr) == (UNMAPPED_DATA, va + 36, zc)
    assert (udf.esr, udf.elr, udf.spsr) == ((EC_UNKNOWN << 26) | IL, va + 40, zc)
    assert (brk.esr, brk.elr) == ((EC_BRK << 26) | IL | 7, va + 44)
    assert iabt.esr >> 26 == EC_IABT_LOWER and (iabt.far, iabt.elr) == (UNMAPPED_CODE, UNMAPPED_CODE)
    assert (end.esr, end.elr, end.x0) == ((EC_SVC64 << 26) | IL | 0xFFFF, va + 60, 50)
    assert all(r.vector == 0x400 and r.sp == STACK_TOP for r in log)
    stats = guest.vcpu.sysreg_stats
    assert stats["exceptions_native"] == 105 and stats["exceptions_python"] == 0
    final = guest.vcpu.get_state()
    assert final.pstate & 0x3FF == 0x3C5 and final.elr_el1 == va + 60 and final.spsr_el1 == zc


def test_svc_at_el1_uses_the_current_el_vectors_and_stack_banks(guest: Arm64Guest) -> None:
    """From EL1h: vector 0x200 on SP_EL1; from EL1t: vector 0x000, the handler still on
    SP_EL1 and the EL1t stack kept in SP_EL0; SPSR records DAIF and SPSel."""
    guest.load(CODE, """
        mov x0, #1
        svc #0x21
        msr spsel, #0
        mov x0, #2
        svc #0x22
        msr spsel, #1
        msr daifclr, #0xf
        mov x0, #3
        svc #0x23
        svc #0xffff
    """)
    guest.vcpu.set_state(guest.state())
    assert guest.run().reason is ExitReason.HALT
    log = records(guest)
    assert [(r.esr & 0xFFFF, r.vector, r.spsr, r.elr, r.x0) for r in log] == [
        (0x21, 0x200, 0x3C5, CODE + 8, 1), (0x22, 0x000, 0x3C4, CODE + 20, 2),
        (0x23, 0x200, 0x005, CODE + 36, 3), (0xFFFF, 0x200, 0x005, CODE + 40, 3)]
    assert all(r.esr >> 26 == EC_SVC64 and r.sp == STACK_TOP and r.sp_el0 == USER_STACK_TOP for r in log)


def test_irqs_injected_into_a_busy_el0_loop(guest: Arm64Guest) -> None:
    """inject_irq on a vCPU kicked out of an EL0 loop: the next instruction is the IRQ
    vector for a lower EL (0x480), ELR is the interrupted PC, SPSR the EL0 PSTATE; the
    guest's handler returns and the loop goes on with its registers intact."""
    guest.load(USER, "loop:\n    add x0, x0, #1\n    b loop")
    va = USER_ALIAS + (USER - RAM)
    st = guest.state(pc=va, mmu=True)
    st.pstate = 0
    guest.vcpu.set_state(st)
    taken = 0
    for _ in range(500):
        if taken == 20:
            break
        timer = threading.Timer(0.002, guest.vcpu.kick)
        timer.start()
        assert guest.run().reason is ExitReason.KICKED
        timer.join()
        before = guest.vcpu.get_state()
        if not guest.vcpu.inject_irq():
            continue
        taken += 1
        now = guest.vcpu.get_state()
        assert (now.pc, now.pstate, now.elr_el1, now.spsr_el1) == (VECTORS + 0x480, 0x3C5, before.pc, before.pstate)
        assert now.sp_el0 == USER_STACK_TOP and now.x[0] == before.x[0]
    assert taken == 20
    log = records(guest)
    for _ in range(500):   # the last handler runs and returns (a busy host may kick first)
        if len(log) >= 20:
            break
        timer = threading.Timer(0.002, guest.vcpu.kick)
        timer.start()
        assert guest.run().reason is ExitReason.KICKED
        timer.join()
        log = records(guest)
    assert len(log) == 20
    assert all(r.vector == 0x480 and r.spsr == 0 and r.elr in (va, va + 4) and r.sp == STACK_TOP for r in log)
    assert [r.x0 for r in log] == sorted(r.x0 for r in log)


class RecordingSysregs:
    """A machine's sysreg handler that logs what reaches it."""

    def __init__(self, fail_on: str | None = None) -> None:
        self.seen: list[tuple[str, str, int]] = []
        self.fail_on = fail_on

    def read(self, name: str) -> int | None:
        if name == self.fail_on:
            raise RuntimeError(f"handler failed on {name}")
        self.seen.append(("r", name, 0))
        return {"CNTVCT_EL0": 0x1234, "ICC_PMR_EL1": 0xF0, "ICC_IAR1_EL1": 27}.get(name)

    def write(self, name: str, value: int) -> bool:
        self.seen.append(("w", name, value))
        return name in ("ICC_EOIR1_EL1", "CNTV_CTL_EL0")


SYSREG_LOOP = """
        ldr x1, =0x1122334455667788
        mov x20, #100
    loop:
        msr tpidr_el1, x1
        mrs x2, tpidr_el1
        msr sp_el0, x1
        mrs x3, sp_el0
        mrs x4, ctr_el0
        mrs x5, dczid_el0
        mrs x6, daif
        mrs x7, mpidr_el1
        mrs xzr, mpidr_el1
        mrs x8, cntvct_el0
        sub x20, x20, #1
        cbnz x20, loop
        mrs x9, icc_pmr_el1
        mrs x10, icc_iar1_el1
        msr icc_eoir1_el1, x10
        mov x11, #1
        msr cntv_ctl_el0, x11
        add x12, x11, #1
        wfi
"""


def test_engine_system_registers_stay_native_and_routed_ones_reach_the_handler(guest: Arm64Guest) -> None:
    guest.load(CODE, SYSREG_LOOP)
    handler = RecordingSysregs()
    guest.vcpu.set_sysreg_handler(handler)
    guest.vcpu.set_state(guest.state())
    assert guest.run().reason is ExitReason.HALT
    seen = list(handler.seen)
    st = guest.vcpu.get_state()
    value = 0x1122334455667788
    assert st.x[2] == st.x[3] == value and st.x[7] == 0x80000000 and st.x[8] == 0x1234
    assert st.x[4] != 0 and st.x[6] == 0x3C0 and st.x[9] == 0xF0 and st.x[10] == 27 and st.x[12] == 2
    assert st.pc == CODE + 4 * 21                   # past the wfi: every ICC access ran once
    assert seen == [("r", "CNTVCT_EL0", 0)] * 100 + [
        ("r", "ICC_PMR_EL1", 0), ("r", "ICC_IAR1_EL1", 0), ("w", "ICC_EOIR1_EL1", 27), ("w", "CNTV_CTL_EL0", 1)]
    stats = guest.vcpu.sysreg_stats
    assert stats["sysreg_python"] == 104 and stats["sysreg_native"] == 200   # the MPIDR reads


def test_without_a_handler_the_counter_and_mpidr_are_native(guest: Arm64Guest) -> None:
    guest.load(CODE, SYSREG_LOOP.split("        mrs x9, icc_pmr_el1")[0] + "        wfi\n")
    st = guest.state()
    st.cntvct = 1 << 40
    guest.vcpu.set_state(st)
    assert guest.run().reason is ExitReason.HALT
    out = guest.vcpu.get_state()
    assert (1 << 40) <= out.x[8] <= out.cntvct and out.x[7] == 0x80000000
    assert guest.vcpu.sysreg_stats["sysreg_python"] == 0


def test_an_error_in_the_python_handler_propagates_out_of_run(guest: Arm64Guest) -> None:
    guest.load(CODE, SYSREG_LOOP)
    guest.vcpu.set_sysreg_handler(RecordingSysregs(fail_on="ICC_IAR1_EL1"))
    guest.vcpu.set_state(guest.state())
    with pytest.raises(RuntimeError, match="handler failed on ICC_IAR1_EL1"):
        guest.run()
