"""Self-modifying code on the libunicorn hv uses, and on the unicorn wheel's.

hv's patched libunicorn (backends/native/unicorn) lets stores skip the slow path on pages
without translated code; a guest that rewrites an instruction it already executed must
still execute the new one. Each scenario runs a real Unicorn guest whose first pass runs
``mov 1`` at L, then rewrites that instruction to ``mov 2`` and jumps back to L: the result
register must be 2 (1 means a stale translation ran). Scenarios: the store in the same
translation block as L, a page first written as data (its write TLB entry exists before
the page holds code), the rewrite through a second virtual mapping of the page (x86 page
tables), each with and without a memory-write hook (hv's dirty logging adds one).

The in-process tests use the library hv selected (``import hv_backends`` first); the
``stock`` test re-runs every scenario in a child process with ``HV_UNICORN_STOCK=1``.
"""
from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import hv_backends  # noqa: F401 - selects the libunicorn before unicorn is imported

ROOT = Path(__file__).resolve().parents[2]  # the checkout (tests/backends/ is two levels down)
CODE_PA, PROLOGUE_PA, ALIAS_VA = 0x3000, 0x5000, 0x100000


def _x86_paging(uc, x86) -> None:
    """Long-mode 4 KiB page tables: identity 0..2 MiB, plus ALIAS_VA -> CODE_PA."""
    uc.mem_write(0x10000, struct.pack("<Q", 0x11003))
    uc.mem_write(0x11000, struct.pack("<Q", 0x12003))
    uc.mem_write(0x12000, struct.pack("<Q", 0x13003))
    uc.mem_write(0x13000, b"".join(struct.pack("<Q", i * 0x1000 | 3) for i in range(512)))
    uc.mem_write(0x13000 + (ALIAS_VA >> 12) * 8, struct.pack("<Q", CODE_PA | 3))
    uc.msr_write(0xC0000080, 0x500)                       # EFER.LME|LMA
    uc.reg_write(x86.UC_X86_REG_CR3, 0x10000)
    uc.reg_write(x86.UC_X86_REG_CR4, 0x20)                # PAE
    uc.reg_write(x86.UC_X86_REG_CR0, 0x80000011)          # PG|ET|PE


def run_x86(alias: bool, data_first: bool, hook: bool) -> int:
    """L: mov eax,1; test ebx,ebx; jnz done; mov dword [rdi+1],2; mov ebx,1; jmp L; done: hlt.
    rdi is L itself or its alias; ``data_first`` runs a prologue that stores into the
    code page (through rdi) before jumping to L."""
    import unicorn
    from unicorn import x86_const as x86

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 0x200000)
    if alias:
        _x86_paging(uc, x86)
    code = bytes.fromhex("b801000000" "85db" "750e" "c7470102000000" "bb01000000" "ebe9" "f4").ljust(32, b"\x90")
    prologue = bytes.fromhex("c7471c90909090") + b"\xff\xe6"    # mov dword [rdi+28], nops; jmp rsi
    uc.mem_write(CODE_PA, code)
    uc.mem_write(PROLOGUE_PA, prologue)
    uc.reg_write(x86.UC_X86_REG_RDI, ALIAS_VA if alias else CODE_PA)
    uc.reg_write(x86.UC_X86_REG_RSI, CODE_PA)
    if hook:
        uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, lambda *_: None)
    uc.emu_start(PROLOGUE_PA if data_first else CODE_PA, CODE_PA + code.index(b"\xf4"), count=100)
    return uc.reg_read(x86.UC_X86_REG_EAX)


def _a64(*words: int) -> bytes:
    return b"".join(struct.pack("<I", w) for w in words)


def run_arm64(data_first: bool, hook: bool) -> int:
    """L: movz x0,#1; cbnz x1,done; ldr w2,[x3]; str w2,[x4]; movz x1,#1; b L; done: nop.
    x3 points at the new instruction word (movz x0,#2), x4 at L; ``data_first`` runs a
    prologue that stores into the code page (past the code) before branching to L."""
    import unicorn
    from unicorn import arm64_const as a64

    uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
    uc.mem_map(0, 0x200000)
    new_insn = 0xD2800040                                     # movz x0, #2
    code = _a64(0xD2800020,                                   # L: movz x0, #1
                0xB50000A1,                                   # cbnz x1, done (+5 insns)
                0xB9400062,                                   # ldr w2, [x3]
                0xB9000082,                                   # str w2, [x4]
                0xD2800021,                                   # movz x1, #1
                0x17FFFFFB,                                   # b L (-5 insns)
                0xD503201F)                                   # done: nop
    prologue = _a64(0xB9004082,                               # str w2, [x4, #64]
                    0xD61F00A0)                               # br x5
    uc.mem_write(CODE_PA, code)
    uc.mem_write(CODE_PA + 0x800, struct.pack("<I", new_insn))
    uc.mem_write(PROLOGUE_PA, prologue)
    uc.reg_write(a64.UC_ARM64_REG_X3, CODE_PA + 0x800)
    uc.reg_write(a64.UC_ARM64_REG_X4, CODE_PA)
    uc.reg_write(a64.UC_ARM64_REG_X5, CODE_PA)
    if hook:
        uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, lambda *_: None)
    uc.emu_start(PROLOGUE_PA if data_first else CODE_PA, CODE_PA + len(code) - 4, count=100)
    return uc.reg_read(a64.UC_ARM64_REG_X0)


SCENARIOS = {
    **{f"x86-{'alias' if a else 'same'}-{'data-first' if d else 'code-first'}-{'hook' if h else 'nohook'}":
       (run_x86, (a, d, h)) for a in (False, True) for d in (False, True) for h in (False, True)},
    **{f"arm64-{'data-first' if d else 'code-first'}-{'hook' if h else 'nohook'}":
       (run_arm64, (d, h)) for d in (False, True) for h in (False, True)},
}


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_rewritten_instruction_runs_new_code(name: str) -> None:
    func, args = SCENARIOS[name]
    assert func(*args) == 2, f"{name}: the guest ran its old instruction after rewriting it"


def test_stock_library_same_results() -> None:
    """The same scenarios on the unicorn wheel's library (HV_UNICORN_STOCK=1), in a child
    process because the binding picks its library once per process."""
    env = dict(os.environ, HV_UNICORN_STOCK="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=True)
    result = json.loads(out.stdout)
    assert result["patched"] is False, "HV_UNICORN_STOCK=1 still loaded the patched library"
    assert result["results"] == {name: 2 for name in SCENARIOS}


def _main() -> None:
    from hv_backends.unicorn_common import uclib

    results = {name: func(*args) for name, (func, args) in SCENARIOS.items()}
    print(json.dumps({"patched": hasattr(uclib(), "hv_unicorn_patch_level"), "results": results}))


if __name__ == "__main__":
    _main()
