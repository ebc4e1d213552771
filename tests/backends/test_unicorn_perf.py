"""Throughput of the Unicorn backend's native hooks on a store-heavy loop (slow: measures).

Run with ``HV_SLOW=1 python -m pytest -q -s tests/backends/test_unicorn_perf.py``; prints MIPS of
bare Unicorn (no hooks) and of the backend with dirty logging off and on.
"""
from __future__ import annotations

import logging
import os
import time

import pytest

from hv_backends.base import ExitReason
from tests.backends.unicorn_x86_guest import KCODE, X86Guest, assemble_x86

log = logging.getLogger(__name__)
ITERATIONS = 2_000_000
LOOP = f"""
    mov rcx, {ITERATIONS}
    mov rdi, 0x100000
top:
    mov qword ptr [rdi], rcx
    mov qword ptr [rdi+8], rcx
    add rdi, 16
    and rdi, 0x1fffff
    or rdi, 0x100000
    dec rcx
    jnz top
    hlt
"""
INSTRUCTIONS = 2 + 7 * ITERATIONS


def _bare_seconds(code: bytes) -> float:
    import unicorn

    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
    uc.mem_map(0, 4 << 20)
    uc.mem_write(KCODE, code)
    start = time.perf_counter()
    uc.emu_start(KCODE, KCODE + len(code))
    return time.perf_counter() - start


def _backend_seconds(dirty: bool) -> float:
    guest = X86Guest()
    try:
        guest.load(KCODE, LOOP)
        guest.vcpu.set_state(guest.kernel_state())
        if dirty:
            guest.vm.start_dirty_log()
        start = time.perf_counter()
        assert guest.run().reason is ExitReason.HALT
        return time.perf_counter() - start
    finally:
        guest.close()


@pytest.mark.slow
@pytest.mark.skipif(not os.environ.get("HV_SLOW"), reason="throughput measurement: set HV_SLOW=1 to run")
def test_native_hooks_keep_at_least_half_of_bare_unicorn() -> None:
    code = assemble_x86(LOOP, KCODE)
    bare = min(_bare_seconds(code) for _ in range(5))
    off = min(_backend_seconds(False) for _ in range(5))
    on = min(_backend_seconds(True) for _ in range(5))
    mips = {name: INSTRUCTIONS / secs / 1e6 for name, secs in (("bare", bare), ("off", off), ("on", on))}
    print(f"bare unicorn {mips['bare']:.1f} MIPS; hv dirty-log off {mips['off']:.1f} MIPS "
          f"({mips['off'] / mips['bare']:.2f}); dirty-log on {mips['on']:.1f} MIPS ({mips['on'] / mips['bare']:.2f})")
    assert mips["on"] >= 0.5 * mips["bare"]
