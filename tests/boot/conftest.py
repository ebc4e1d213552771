"""What the boot tests share: guest RAM laid out as on each board, the check that a rejected
image wrote nothing, and the aarch64 fixture guests run under bare Unicorn after hv's loader."""
from __future__ import annotations


import pytest

from hv.boards.virt.layout import RAM_BASE as VIRT_RAM_BASE
from hv.boot import load_kernel
from hv.memory import GuestMemory, RegionSpec


MIB = 1024 * 1024


def x86_memory(size: int = 64 * MIB) -> GuestMemory:
    return GuestMemory([RegionSpec(0, size)])


def arm_memory(size: int = 64 * MIB) -> GuestMemory:
    return GuestMemory([RegionSpec(VIRT_RAM_BASE, size)])


def assert_untouched(memory: GuestMemory) -> None:
    """A rejected image must leave guest RAM as it was (the VMM wrote no page)."""
    assert not any(memory.take_vmm_dirty()), "a rejected image must not write guest RAM"


def run_arm_under_unicorn(image: bytes, cmdline: str, max_instructions: int = 50_000_000) -> str:
    """Load with hv's loader, run in Unicorn with a PL011 and PSCI SYSTEM_OFF, return output."""
    unicorn = pytest.importorskip("unicorn")
    from unicorn import arm64_const as a64

    mem = arm_memory(32 * MIB)
    out = bytearray()
    powered_off = []
    try:
        boot = load_kernel("aarch64", mem, image, cmdline)
        uc = unicorn.Uc(unicorn.UC_ARCH_ARM64, unicorn.UC_MODE_ARM)
        region = mem.regions[0]
        uc.mem_map_ptr(region.gpa, region.size, unicorn.UC_PROT_ALL, region.host_addr)

        def pl011_read(_uc: object, offset: int, _size: int, _data: object) -> int:
            return 0x90 if offset == 0x18 else 0  # FR: TX FIFO empty, never full

        def pl011_write(_uc: object, offset: int, _size: int, value: int, _data: object) -> None:
            if offset == 0:
                out.append(value & 0xFF)

        uc.mmio_map(0x09000000, 0x1000, pl011_read, None, pl011_write, None)

        def on_intr(uc_: "unicorn.Uc", intno: int, _data: object) -> None:
            if uc_.reg_read(a64.UC_ARM64_REG_X0) == 0x84000008:
                powered_off.append(intno)
            uc_.emu_stop()

        uc.hook_add(unicorn.UC_HOOK_INTR, on_intr)
        uc.reg_write(a64.UC_ARM64_REG_PSTATE, boot.cpu_state.pstate)
        uc.reg_write(a64.UC_ARM64_REG_X0, boot.cpu_state.x[0])
        uc.emu_start(boot.cpu_state.pc, 0, count=max_instructions)
        del uc
    finally:
        mem.close()
    assert powered_off, f"guest did not power off; output so far: {bytes(out)!r}"
    return out.decode()
