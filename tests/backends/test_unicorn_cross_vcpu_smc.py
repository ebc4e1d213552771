"""Code one vCPU writes is what the other vCPUs execute next (cross-engine self-modifying code).

hv runs one Unicorn engine per vCPU on one shared guest RAM. Each engine keeps its own
translation-block cache and its own record of which pages hold translated code: a store
takes the self-modifying-code check (``notdirty_write``) only in the engine that stores,
and only if THAT engine has code on the page. When vCPU A has run code on a page and
vCPU B then writes new code there (a kernel loading a program into a reused page, a JIT,
module loading), A's translations are never dropped and A keeps executing the old code:
translations are looked up by physical address, pc and flags, not by content.

x86 requires no maintenance instruction for cross-CPU code modification, so A must see
the new code once it serializes (here: a new ``emu_start``). aarch64 requires the writer's
``dc cvau; dsb ish; ic ivau; dsb ish`` and the reader's ``isb``; hv broadcasts ``ic ivau``
only for kernel addresses above the linear map, so the case here is the writer using a
second (linear-map-style) virtual address of the page.

hv's patched libunicorn passes such writes between engines (a VM-wide count of the
engines holding code on each page keeps every engine's stores to it on the slow path, and
the storing engine posts "invalidate these bytes" to the others, which act at their next
block: backends/native/unicorn/README.md). Both tests run real engines on shared memory and
failed (the old value) on the library before that change and on the wheel's library.
"""
from __future__ import annotations

import ctypes
import mmap
import struct
import threading
import time

import pytest

import hv_backends  # noqa: F401 - selects the libunicorn before unicorn is imported
from hv_backends.base import ExitReason
from hv_backends.unicorn_common import library_is_patched
from tests.backends.test_unicorn_arm64_smp import (CODE_A, CODE_B, DSB_ISH, FUNC, GO, ISB, L3,
                                                   MOVZ_X0, PAGE_ATTRS, READY, RET, SEEN, BLR_X7,
                                                   B_SELF, WFI, TwoVcpus, map_pages, mmu_state,
                                                   movz_w, stlr_w, str_w, str_x, str_x_off,
                                                   wait_flag)

pytestmark = pytest.mark.skipif(not library_is_patched(),
                                reason="needs hv's patched libunicorn (the wheel's engines never see each "
                                       "other's code writes; pip install -e . builds it)")

X86_RAM = 0x10000
X86_FUNC, X86_CALLER, X86_PATCHER, X86_STACK = 0x3000, 0x4000, 0x5000, 0x9000
X86_FLAG = 0xA000
TIMEOUT_US = 10_000_000


def _x86_engine(addr: int):  # type: ignore[no-untyped-def]
    import unicorn

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map_ptr(0, X86_RAM, unicorn.UC_PROT_ALL, addr)
    return uc


def _x86_call(uc, start: int, length: int) -> int:  # type: ignore[no-untyped-def]
    """Run [start, start + length) to its last byte (a ``hlt`` not executed); RAX after."""
    from unicorn import x86_const as x86

    uc.reg_write(x86.UC_X86_REG_RSP, X86_STACK)
    uc.emu_start(start, start + length - 1, timeout=TIMEOUT_US)
    return int(uc.reg_read(x86.UC_X86_REG_RAX))


def test_x86_code_written_by_one_engine_is_run_by_the_other() -> None:
    """Engine A calls a function (``mov eax, 1; ret``) at X86_FUNC; engine B (a guest
    store, as a kernel loading a program) rewrites its immediate to 2; A's next call must
    return 2. (A enters through a caller on another page: Unicorn drops the translation at
    emu_start's own start address, which would hide the stale one.)"""
    buf = mmap.mmap(-1, X86_RAM)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    func = bytes.fromhex("b801000000") + b"\xc3"                                 # mov eax, 1; ret
    caller = b"\xe8" + struct.pack("<i", X86_FUNC - (X86_CALLER + 5)) + b"\xf4"  # call FUNC; hlt
    patcher = bytes.fromhex("c70425") + struct.pack("<II", X86_FUNC + 1, 2) + b"\xf4"  # mov dword [F+1], 2
    for where, code in ((X86_FUNC, func), (X86_CALLER, caller), (X86_PATCHER, patcher)):
        buf[where:where + len(code)] = code
    a, b = _x86_engine(addr), _x86_engine(addr)
    assert _x86_call(a, X86_CALLER, len(caller)) == 1
    _x86_call(b, X86_PATCHER, len(patcher))
    assert buf[X86_FUNC + 1] == 2, "B's store did not reach the shared RAM"
    assert _x86_call(a, X86_CALLER, len(caller)) == 2, "A ran its stale translation of the old code"


def test_x86_a_running_engine_sees_code_another_engine_writes() -> None:
    """Engine A calls the function in a loop until it returns 2 (its first call sets a
    flag); engine B, in another thread, rewrites the immediate while A runs. A must leave
    the loop (it did not: its stale block returned 1 until emu_start's timeout)."""
    from unicorn import x86_const as x86

    buf = mmap.mmap(-1, X86_RAM)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    func = bytes.fromhex("b801000000") + b"\xc3"                                 # mov eax, 1; ret
    loop = (b"\xe8" + struct.pack("<i", X86_FUNC - (X86_CALLER + 5))               # call FUNC
            + bytes.fromhex("c70425") + struct.pack("<II", X86_FLAG, 1)            # mov dword [FLAG], 1
            + bytes.fromhex("83f802"))                                             # cmp eax, 2
    caller = loop + bytes([0x75, (-(len(loop) + 2)) & 0xFF]) + b"\xf4"             # jne loop; hlt
    patcher = bytes.fromhex("c70425") + struct.pack("<II", X86_FUNC + 1, 2) + b"\xf4"
    for where, code in ((X86_FUNC, func), (X86_CALLER, caller), (X86_PATCHER, patcher)):
        buf[where:where + len(code)] = code
    a, b = _x86_engine(addr), _x86_engine(addr)
    result: list[int] = []
    runner = threading.Thread(target=lambda: result.append(_x86_call(a, X86_CALLER, len(caller))))
    runner.start()
    try:
        deadline = time.monotonic() + 10
        while struct.unpack_from("<I", buf, X86_FLAG)[0] != 1 and time.monotonic() < deadline:
            time.sleep(0.001)
        assert struct.unpack_from("<I", buf, X86_FLAG)[0] == 1, "engine A never called the function"
        _x86_call(b, X86_PATCHER, len(patcher))
    finally:
        runner.join(timeout=30)
    assert not runner.is_alive()
    assert result == [2], f"engine A returned {result} (1: it ran the old code until its timeout)"
    assert a.reg_read(x86.UC_X86_REG_RIP) == X86_CALLER + len(caller) - 1


DC_CVAU_X9, IC_IVAU_X9 = 0xD50B7B29, 0xD50B7529   # dc cvau x9; ic ivau x9 (SYS #3, C7, C11/C5, #1)
ALIAS_PAGE_VA = 0x4000_0000 + 0x20_1000           # L3[1]: a second mapping of FUNC's page


def patcher_code() -> bytes:
    """vCPU A (x9 = FUNC's alias VA, x8 = the new first instruction, x2 = &GO, x6 = &READY):
    once B has run FUNC, write the instruction through the alias and do the architected
    sequence ``dc cvau; dsb ish; ic ivau; dsb ish; isb`` on the alias, then set GO."""
    words: list[int] = []
    wait_flag(words, 6)
    words += [str_w(8, 9), DC_CVAU_X9, DSB_ISH, IC_IVAU_X9, DSB_ISH, ISB,
              movz_w(3, 1), stlr_w(3, 2), WFI, B_SELF]
    return struct.pack(f"<{len(words)}I", *words)


def caller_code() -> bytes:
    """vCPU B (x7 = FUNC, x2 = &GO, x5 = &SEEN, x6 = &READY): call FUNC, set READY, wait for
    GO, ``isb``, call FUNC again; both results to SEEN."""
    words = [BLR_X7, str_x(0, 5), movz_w(3, 1), stlr_w(3, 6)]
    wait_flag(words, 2)
    words += [ISB, BLR_X7, str_x_off(0, 5, 8), WFI, B_SELF]
    return struct.pack(f"<{len(words)}I", *words)


def test_arm64_ic_ivau_of_a_linear_map_alias_reaches_the_other_vcpu() -> None:
    """vCPU A rewrites FUNC (which vCPU B has run) through a second virtual address of its
    page with the full maintenance sequence; B's next call must return the new value."""
    pair = TwoVcpus()
    try:
        map_pages(pair.memory)
        pair.memory.write_int(L3 + 8, 8, (FUNC & ~0xFFF) | PAGE_ATTRS)
        for where, code in ((CODE_A, patcher_code()), (CODE_B, caller_code()),
                            (FUNC, struct.pack("<2I", MOVZ_X0 | 1 << 5, RET))):
            pair.memory.write(where, code)
            pair.vm.invalidate_code(where, len(code))
        states = [mmu_state(CODE_A, {9: ALIAS_PAGE_VA + (FUNC & 0xFFF), 8: MOVZ_X0 | 2 << 5, 2: GO, 6: READY}),
                  mmu_state(CODE_B, {7: FUNC, 2: GO, 5: SEEN, 6: READY})]
        results = pair.run_states(states)
        assert results == [ExitReason.HALT] * 2, f"vCPUs did not finish: {results}"
        assert pair.memory.read_int(FUNC, 4) == MOVZ_X0 | 2 << 5, "A's store did not reach RAM"
        seen = (pair.memory.read_int(SEEN, 8), pair.memory.read_int(SEEN + 8, 8))
        assert seen == (1, 2), f"B's second call returned {seen[1]} after A's ic ivau"
    finally:
        pair.close()
