"""Code hv itself writes into guest RAM (device DMA) is what the vCPUs execute next.

A virtio-blk read fills guest buffers from Python (``GuestMemory.write``); when such a
buffer is a page some engine already ran code from (Linux reusing a page-cache page for
a program it then executes), that engine must drop its translations of the bytes the
device wrote, or it runs the old code: Unicorn finds blocks by physical address, pc and
flags, not content, and only a guest store takes its self-modifying-code check.

hv's patched libunicorn exports ``hv_uc_invalidate_host``, which posts "invalidate these
bytes" to every engine holding code on the written pages (backends/native/unicorn/README.md,
cross-vCPU section); the Unicorn backend hands it to ``GuestMemory`` as its code-write
notifier when it opens a VM. The guest here is a real long-mode Unicorn vCPU of hv's
backend; the write goes through the same ``GuestMemory.write`` the virtio devices use.
"""
from __future__ import annotations

import struct

import pytest

import hv_backends  # noqa: F401 - selects the libunicorn before unicorn is imported
from hv_backends.base import ExitReason
from hv_backends.unicorn_common import library_is_patched
from tests.backends.unicorn_x86_guest import KCODE, X86Guest

pytestmark = pytest.mark.skipif(not library_is_patched(),
                                reason="needs hv's patched libunicorn (the wheel's has no "
                                       "hv_uc_invalidate_host; pip install -e . builds it)")

FUNC = KCODE + 0x2000          # a page of its own: the caller's page is where emu_start enters


def _run_until_halt(g: X86Guest) -> int:
    """Run the vCPU to its next ``hlt``; RAX then."""
    for _ in range(10):
        ex = g.run()
        if ex.reason is ExitReason.HALT:
            return g.vcpu.get_state().rax
        assert ex.reason is ExitReason.KICKED, ex
    raise AssertionError("the guest did not reach its hlt")


@pytest.mark.parametrize("span", ["immediate", "two-pages"])
def test_device_write_over_translated_code_runs_new_code(span: str) -> None:
    """The vCPU calls FUNC (``mov eax, 1; ret``) from a caller on another page and halts;
    a device write (GuestMemory.write, as virtio-blk's read completion) replaces FUNC's
    code with ``mov eax, 2; ret`` (only its immediate, or as part of an 8 KiB buffer that
    starts on the page before); resumed, the caller calls FUNC again: RAX must be 2."""
    g = X86Guest(mmio=False)
    try:
        caller = b"\xe8" + struct.pack("<i", FUNC - (KCODE + 5)) + b"\xf4" + b"\xeb\xf8"
        g.memory.write(KCODE, caller)                     # call FUNC; hlt; jmp back to call
        g.memory.write(FUNC, bytes.fromhex("b801000000c3"))  # mov eax, 1; ret
        g.vm.invalidate_code(KCODE, 0x3000)               # the loader's explicit call
        g.vcpu.set_state(g.kernel_state(KCODE))
        assert _run_until_halt(g) == 1
        if span == "immediate":
            g.memory.write(FUNC + 1, struct.pack("<I", 2))
        else:
            buf = bytearray(0x2000)                       # a page without code, then FUNC's
            buf[0x1000:0x1006] = bytes.fromhex("b802000000c3")
            g.memory.write(FUNC - 0x1000, bytes(buf))
        # resumed after the hlt: jmp -> call FUNC -> hlt (no state load, no code flush)
        assert _run_until_halt(g) == 2, "the vCPU ran its stale translation of FUNC"
    finally:
        g.close()
