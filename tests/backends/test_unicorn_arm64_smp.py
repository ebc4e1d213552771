"""Exclusive loads/stores (LDXR/STXR, LDAXR/STLR) are atomic between hv's aarch64 vCPUs.

hv runs one Unicorn engine per vCPU, each in its own host thread, all mapping the same
guest RAM. Unicorn 2.1.4 translates for a single-CPU context: STXR is a plain
compare-and-store, so two vCPUs can both "succeed" on the same exclusive pair and lose an
update. That is what broke SMP Linux on ``-machine virt``: page refcounts lost decrements
("BUG: Bad page state ... refcount:-1") and, when the lost update hit the virtio-net
driver's NAPI or a wait queue, the guest stopped taking the NIC's interrupts. hv's patched
libunicorn (backends/native/unicorn) translates for a parallel context, as QEMU's
multi-threaded TCG does, so STXR is a host compare-and-swap.

The same engine-per-vCPU design loses broadcast TLB maintenance: ``tlbi vmalle1is`` (or
any TLBI ...IS) flushes only the issuing engine's TLB, so the other vCPU kept translating
through a page-table entry Linux had changed and freed (and wrote into the page's next
owner). hv's native SYS hook broadcasts it: the other vCPUs flush at their next block, and
the issuing vCPU waits for that, as the DSB after a TLBI requires.

The guests here are hand-encoded A64 (no cross assembler is needed) and run on hv's own
:class:`UnicornArm64Vcpu` (native hooks, guest RAM from :class:`GuestMemory`), two vCPU
threads at once. A vCPU that spins on a lock nobody holds is kicked by a watchdog, so a
lost unlock fails the test instead of hanging it.
"""
from __future__ import annotations

import struct
import threading

import pytest

import hv_backends  # noqa: F401 - selects the libunicorn before unicorn is imported
from hv.memory import GuestMemory, RegionSpec
from hv.state import Arm64CpuState
from hv_backends.base import Arch, ExitReason
from hv_backends.unicorn import UnicornBackend
from hv_backends.unicorn_common import library_is_patched
from tests.backends.unicorn_x86_guest import RecordingIo

needs_patched = pytest.mark.skipif(not library_is_patched(),
                                   reason="needs hv's patched libunicorn (pip install -e . builds it; "
                                          "see backends/native/unicorn/README.md)")

RAM = 0x4000_0000
RAM_SIZE = 1 << 20
CODE = RAM + 0x1000
COUNTER, LOCK, GUARDED = RAM + 0x8000, RAM + 0x8040, RAM + 0x8080   # separate cache lines
WATCHDOG_S = 60.0       # a vCPU still running then has spun on a lost lock


# -- A64 encodings (ARM DDI 0487, C6.2), registers by number --------------------------------
def ldxr_x(rt: int, rn: int) -> int:
    return 0xC85F7C00 | rn << 5 | rt


def stxr_x(rs: int, rt: int, rn: int) -> int:
    return 0xC8007C00 | rs << 16 | rn << 5 | rt


def ldaxr_w(rt: int, rn: int) -> int:
    return 0x885FFC00 | rn << 5 | rt


def stxr_w(rs: int, rt: int, rn: int) -> int:
    return 0x88007C00 | rs << 16 | rn << 5 | rt


def stlr_w(rt: int, rn: int) -> int:
    return 0x889FFC00 | rn << 5 | rt


def add_x_imm(rd: int, rn: int, imm: int) -> int:
    return 0x91000000 | imm << 10 | rn << 5 | rd


def subs_x_imm(rd: int, rn: int, imm: int) -> int:
    return 0xF1000000 | imm << 10 | rn << 5 | rd


def movz_w(rd: int, imm: int) -> int:
    return 0x52800000 | imm << 5 | rd


def ldr_x(rt: int, rn: int) -> int:
    return 0xF9400000 | rn << 5 | rt


def str_x(rt: int, rn: int) -> int:
    return 0xF9000000 | rn << 5 | rt


def cbnz_w(rt: int, offset: int) -> int:
    return 0x35000000 | ((offset >> 2) & 0x7FFFF) << 5 | rt


def b_ne(offset: int) -> int:
    return 0x54000000 | ((offset >> 2) & 0x7FFFF) << 5 | 0x1


def ldar_w(rt: int, rn: int) -> int:
    return 0x88DFFC00 | rn << 5 | rt


def cbz_w(rt: int, offset: int) -> int:
    return 0x34000000 | ((offset >> 2) & 0x7FFFF) << 5 | rt


def str_x_off(rt: int, rn: int, offset: int) -> int:
    return 0xF9000000 | (offset // 8) << 10 | rn << 5 | rt


WFI = 0xD503207F
B_SELF = 0x14000000
WZR = 31
DSB_ISHST, DSB_ISH, ISB = 0xD5033A9F, 0xD5033B9F, 0xD5033FDF
TLBI_VMALLE1IS = 0xD508831F      # SYS #0, C8, C3, #0, xzr


def worker_code() -> bytes:
    """x0 times: an LDXR/ADD/STXR increment of [x1]; take the spinlock at [x2] with
    LDAXR/STXR; a plain LDR/ADD/STR increment of [x3] (what the lock protects); release
    with STLR wzr, as Linux's spin_unlock. Then wfi (``run`` returns HALT)."""
    words: list[int] = []
    loop = len(words)
    words += [ldxr_x(4, 1), add_x_imm(4, 4, 1), stxr_x(5, 4, 1)]
    words.append(cbnz_w(5, 4 * (loop - len(words))))
    spin = len(words)
    words.append(ldaxr_w(4, 2))
    words.append(cbnz_w(4, 4 * (spin - len(words))))
    words += [movz_w(4, 1), stxr_w(5, 4, 2)]
    words.append(cbnz_w(5, 4 * (spin - len(words))))
    words += [ldr_x(6, 3), add_x_imm(6, 6, 1), str_x(6, 3), stlr_w(WZR, 2), subs_x_imm(0, 0, 1)]
    words.append(b_ne(4 * (loop - len(words))))
    words += [WFI, B_SELF]
    return struct.pack(f"<{len(words)}I", *words)


class TwoVcpus:
    """Two aarch64 vCPUs of one Unicorn VM on one guest RAM, MMU off, at EL1."""

    def __init__(self) -> None:
        self.memory = GuestMemory([RegionSpec(RAM, RAM_SIZE)])
        self.vm = UnicornBackend().open_vm(Arch.AARCH64, self.memory, [])
        self.vcpus = [self.vm.create_vcpu(i) for i in range(2)]

    def load(self, code: bytes) -> None:
        self.memory.write(CODE, code)
        self.vm.invalidate_code(CODE, len(code))

    def start_state(self, iterations: int) -> Arm64CpuState:
        st = Arm64CpuState()
        st.pc = CODE
        st.sp_el1 = RAM + RAM_SIZE - 0x1000
        st.x[0:4] = [iterations, COUNTER, LOCK, GUARDED]
        return st

    def run_all(self, iterations: int) -> list[tuple[ExitReason, int]]:
        """Both vCPUs from CODE at once; each one's exit and its x0 (iterations left)."""
        results: list[tuple[ExitReason, int]] = [(ExitReason.ERROR, -1)] * len(self.vcpus)
        start = threading.Barrier(len(self.vcpus))

        def one(index: int) -> None:
            vcpu = self.vcpus[index]
            vcpu.set_state(self.start_state(iterations))
            start.wait()
            reason = vcpu.run(RecordingIo()).reason
            results[index] = (reason, vcpu.get_state().x[0])

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(self.vcpus))]
        for t in threads:
            t.start()
        watchdog = threading.Timer(WATCHDOG_S, lambda: [v.kick() for v in self.vcpus])
        watchdog.start()
        try:
            for t in threads:
                t.join()
        finally:
            watchdog.cancel()
        return results

    def run_states(self, states: list[Arm64CpuState]) -> list[ExitReason]:
        """Each vCPU from its own state, at once (a watchdog kicks them after WATCHDOG_S)."""
        results = [ExitReason.ERROR] * len(self.vcpus)
        for vcpu, st in zip(self.vcpus, states, strict=True):
            vcpu.set_state(st)

        def one(index: int) -> None:
            results[index] = self.vcpus[index].run(RecordingIo()).reason

        threads = [threading.Thread(target=one, args=(i,)) for i in range(len(self.vcpus))]
        watchdog = threading.Timer(WATCHDOG_S, lambda: [v.kick() for v in self.vcpus])
        watchdog.start()
        try:
            for t in threads:
                t.start()
            for t in threads:
                t.join()
        finally:
            watchdog.cancel()
        return results

    def close(self) -> None:
        self.vm.close()
        self.memory.close()


@pytest.fixture
def pair():
    machine = TwoVcpus()
    yield machine
    machine.close()


@needs_patched
@pytest.mark.parametrize("round_", range(3))
def test_two_vcpus_exclusive_increments_and_spinlock_lose_nothing(pair: TwoVcpus, round_: int) -> None:
    """Every LDXR/STXR increment counts, the LDAXR/STXR spinlock excludes (the plain
    counter it guards is exact) and no unlock is lost (both vCPUs reach wfi, the lock
    ends free). On the single-CPU translation increments were lost in every run of this
    size."""
    iterations = 300_000
    pair.load(worker_code())
    results = pair.run_all(iterations)
    counter, lock, guarded = (pair.memory.read_int(a, 8) for a in (COUNTER, LOCK, GUARDED))
    assert results == [(ExitReason.HALT, 0)] * 2, f"vCPUs did not finish (lock word {lock}): {results}"
    assert (counter, guarded, lock) == (2 * iterations, 2 * iterations, 0)


@needs_patched
def test_a_store_exclusive_marks_its_page_dirty(pair: TwoVcpus) -> None:
    """hv's dirty logging is a memory-write hook: a page written only by STXR (a host
    compare-and-swap in the parallel translation) must be reported, or a live migration
    would not resend it."""
    pair.load(worker_code())
    vcpu = pair.vcpus[0]
    vcpu.set_state(pair.start_state(1))
    pair.vm.start_dirty_log()
    pair.vm.take_dirty()
    assert vcpu.run(RecordingIo()).reason is ExitReason.HALT
    bitmap = pair.vm.take_dirty()
    pages = {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}
    assert (COUNTER - RAM) >> 12 in pages
    assert pair.memory.read_int(COUNTER, 8) == 1


# -- broadcast TLB maintenance ------------------------------------------------------------------
L1, L2, L3 = RAM + 0x2000, RAM + 0x3000, RAM + 0x4000
CODE_A, CODE_B = RAM + 0x5000, RAM + 0x6000
GO, READY, SEEN = RAM + 0x8000, RAM + 0x8040, RAM + 0x9000
PAGE_OLD, PAGE_NEW = RAM + 0x10000, RAM + 0x11000
VA = RAM + 0x20_0000          # mapped by L3[0]: PAGE_OLD, then PAGE_NEW
TCR = 25 | (1 << 23)          # T0SZ 25 (39-bit VA, walk from level 1), 4K granule, EPD1
SCTLR_MMU = 0x30D00800 | 1
PAGE_ATTRS = (1 << 10) | (3 << 8) | 0x3   # AF, inner shareable, attr 0 (normal), page


def wait_flag(words: list[int], rn: int) -> None:
    """Append ``spin: ldar w4, [xRN]; cbz w4, spin``."""
    spin = len(words)
    words.append(ldar_w(4, rn))
    words.append(cbz_w(4, 4 * (spin - len(words))))


def remapper_code() -> bytes:
    """vCPU A (x0 = &L3[0], x1 = the new entry, x2 = &GO, x6 = &READY): once B is ready,
    point VA at PAGE_NEW, ``dsb ishst; tlbi vmalle1is; dsb ish; isb``, then set GO."""
    words: list[int] = []
    wait_flag(words, 6)
    words += [str_x(1, 0), DSB_ISHST, TLBI_VMALLE1IS, DSB_ISH, ISB, movz_w(3, 1), stlr_w(3, 2), WFI, B_SELF]
    return struct.pack(f"<{len(words)}I", *words)


def reader_code() -> bytes:
    """vCPU B (x0 = VA, x2 = &GO, x5 = &SEEN, x6 = &READY): read VA (its TLB now holds the
    old translation), set READY, wait for GO, read VA again; both values to SEEN."""
    words = [ldr_x(1, 0), str_x(1, 5), movz_w(3, 1), stlr_w(3, 6)]
    wait_flag(words, 2)
    words += [ldr_x(1, 0), str_x_off(1, 5, 8), WFI, B_SELF]
    return struct.pack(f"<{len(words)}I", *words)


def map_pages(memory: GuestMemory) -> None:
    memory.write_int(L1 + 8 * 1, 8, L2 | 0x3)
    memory.write_int(L2 + 8 * 0, 8, RAM | (1 << 10) | (3 << 8) | 0x1)   # RAM's first 2 MiB, identity
    memory.write_int(L2 + 8 * 1, 8, L3 | 0x3)
    memory.write_int(L3, 8, PAGE_OLD | PAGE_ATTRS)
    memory.write_int(PAGE_OLD, 8, 0x01D0_01D0)
    memory.write_int(PAGE_NEW, 8, 0x0E_E0E0)


def mmu_state(pc: int, regs: dict[int, int]) -> Arm64CpuState:
    st = Arm64CpuState()
    st.pc = pc
    st.sp_el1 = RAM + RAM_SIZE - 0x1000
    for reg, value in regs.items():
        st.x[reg] = value
    st.sysregs.update(TTBR0_EL1=L1, TCR_EL1=TCR, MAIR_EL1=0xFF, SCTLR_EL1=SCTLR_MMU)
    return st


@pytest.mark.parametrize("round_", range(3))
def test_tlbi_is_on_one_vcpu_flushes_the_others(pair: TwoVcpus, round_: int) -> None:
    """vCPU B has the old translation of VA in its TLB; vCPU A changes the page-table
    entry and runs ``tlbi vmalle1is; dsb ish`` before telling B to read again: B must see
    the new page (before the broadcast, B read the old page through its stale TLB)."""
    map_pages(pair.memory)
    for addr, code in ((CODE_A, remapper_code()), (CODE_B, reader_code())):
        pair.memory.write(addr, code)
        pair.vm.invalidate_code(addr, len(code))
    states = [mmu_state(CODE_A, {0: L3, 1: PAGE_NEW | PAGE_ATTRS, 2: GO, 6: READY}),
              mmu_state(CODE_B, {0: VA, 2: GO, 5: SEEN, 6: READY})]
    results = pair.run_states(states)
    assert results == [ExitReason.HALT] * 2, f"vCPUs did not finish: {results}"
    seen = (pair.memory.read_int(SEEN, 8), pair.memory.read_int(SEEN + 8, 8))
    assert seen == (0x01D0_01D0, 0x0E_E0E0), f"B read {seen[1]:#x} through VA after the TLBI"
    assert pair.vcpus[0].tlb_stats["broadcasts"] >= 1


# -- broadcast instruction cache maintenance -------------------------------------------------------
FUNC = RAM + 0x7000
MOVZ_X0 = 0xD2800000            # movz x0, #imm (imm << 5)
RET, BLR_X7 = 0xD65F03C0, 0xD63F00E0
IC_IALLUIS = 0xD508711F         # SYS #0, C7, C1, #0, xzr


def str_w(rt: int, rn: int) -> int:
    return 0xB9000000 | rn << 5 | rt


def patcher_code() -> bytes:
    """vCPU A (x7 = FUNC, x8 = the new first instruction, x2 = &GO, x6 = &READY): once B
    has run FUNC, rewrite its first instruction, ``dsb ish; ic ialluis; dsb ish; isb``,
    set GO (Linux's text patching: the other CPUs then execute the new code)."""
    words: list[int] = []
    wait_flag(words, 6)
    words += [str_w(8, 7), DSB_ISH, IC_IALLUIS, DSB_ISH, ISB, movz_w(3, 1), stlr_w(3, 2), WFI, B_SELF]
    return struct.pack(f"<{len(words)}I", *words)


def caller_code() -> bytes:
    """vCPU B (x7 = FUNC, x2 = &GO, x5 = &SEEN, x6 = &READY): call FUNC (its code is now
    translated in B's engine), set READY, wait for GO, call FUNC again; both results to SEEN."""
    words = [BLR_X7, str_x(0, 5), movz_w(3, 1), stlr_w(3, 6)]
    wait_flag(words, 2)
    words += [BLR_X7, str_x_off(0, 5, 8), WFI, B_SELF]
    return struct.pack(f"<{len(words)}I", *words)


@pytest.mark.parametrize("round_", range(3))
def test_ic_ialluis_on_one_vcpu_drops_the_others_translations(pair: TwoVcpus, round_: int) -> None:
    """vCPU A rewrites code vCPU B has already run, then ``ic ialluis``: B's next call runs
    the new code (Unicorn's engines each keep their own translations, and a store by one
    never reaches the other's self-modifying-code check)."""
    map_pages(pair.memory)
    for addr, code in ((CODE_A, patcher_code()), (CODE_B, caller_code()),
                       (FUNC, struct.pack("<2I", MOVZ_X0 | 1 << 5, RET))):
        pair.memory.write(addr, code)
        pair.vm.invalidate_code(addr, len(code))
    states = [mmu_state(CODE_A, {7: FUNC, 8: MOVZ_X0 | 2 << 5, 2: GO, 6: READY}),
              mmu_state(CODE_B, {7: FUNC, 2: GO, 5: SEEN, 6: READY})]
    results = pair.run_states(states)
    assert results == [ExitReason.HALT] * 2, f"vCPUs did not finish: {results}"
    seen = (pair.memory.read_int(SEEN, 8), pair.memory.read_int(SEEN + 8, 8))
    assert seen == (1, 2), f"B's second call returned {seen[1]} after A's ic ialluis"
    assert pair.vcpus[0].tlb_stats["ic_broadcasts"] >= 1
