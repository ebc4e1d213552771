"""An aarch64 guest on the Unicorn backend, for the backend tests: a 39-bit VA translation
table with kernel, read-only EL0 and scrambled 4K views of RAM, vectors, and code from the
committed GNU as snippets (tests/data/a64_snippets.json)."""
from __future__ import annotations

from hv_backends.base import Arch
from hv_backends.unicorn import UnicornBackend
from hv.memory import GuestMemory, RegionSpec
from hv.state import Arm64CpuState
from tests.helpers import assemble_a64
from tests.backends.unicorn_x86_guest import RecordingIo


RAM = 0x40000000
RAM_SIZE = 4 << 20
PL011 = 0x09000000
L1, L2_RAM, L2_DEV, L3 = RAM + 0x1000, RAM + 0x2000, RAM + 0x3000, RAM + 0x4000
VECTORS = RAM + 0x10000
CODE = RAM + 0x20000
USER = RAM + 0x30000
STACK_TOP = RAM + 0x80000
USER_STACK_TOP = RAM + 0x90000
COUNTER = RAM + 0x70000
USER_ALIAS = RAM + 0x400000  # VA of the EL0 view of RAM
# VA RAM+0x200000 + i*4K -> PA SCRAMBLED_PHYS[i]
SCRAMBLED_VIRT = RAM + 0x200000
SCRAMBLED_PHYS = [RAM + 0x300000 + ((7 * i + 5) % 16) * 0x1000 for i in range(16)]
TCR = 25 | (1 << 23)  # T0SZ=25 (39-bit VA, walk starts at level 1), 4K granule, EPD1
MAIR = 0xFF | (0x00 << 8)  # attr0 normal write-back, attr1 device-nGnRnE
SCTLR_MMU = 0x30D00800 | 1


class Arm64Guest:
    def __init__(self) -> None:
        self.memory = GuestMemory([RegionSpec(RAM, RAM_SIZE)])
        self.vm = UnicornBackend().open_vm(Arch.AARCH64, self.memory, [(PL011, 0x1000)])
        self.vcpu = self.vm.create_vcpu(0)
        self.io = RecordingIo()
        m = self.memory
        m.write_int(L1 + 8 * 0, 8, L2_DEV | 0x3)
        m.write_int(L1 + 8 * 1, 8, L2_RAM | 0x3)
        # AF, inner shareable, block; AP=00: EL1 read/write (EL0-writable memory is never
        # executable at EL1, so kernel and user views are separate mappings)
        m.write_int(L2_RAM + 8 * 0, 8, RAM | (1 << 10) | (3 << 8) | 0x1)
        # USER_ALIAS: the same RAM again, AP=11 (read-only, EL0 executable)
        m.write_int(L2_RAM + 8 * 2, 8, RAM | (1 << 10) | (3 << 8) | (3 << 6) | 0x1)
        m.write_int(L2_RAM + 8 * 1, 8, L3 | 0x3)
        for i, phys in enumerate(SCRAMBLED_PHYS):
            m.write_int(L3 + 8 * i, 8, phys | (1 << 10) | (3 << 8) | (1 << 6) | 0x3)
        m.write_int(L2_DEV + 8 * (PL011 >> 21), 8, (PL011 & ~0x1FFFFF) | (1 << 10) | (1 << 2) | 0x1)

    def load(self, addr: int, source: str) -> None:
        self.memory.write(addr, assemble_a64(source, addr))
        self.vm.invalidate_code(addr, 0x1000)

    def state(self, pc: int = CODE, mmu: bool = False) -> Arm64CpuState:
        st = Arm64CpuState()
        st.pc = pc
        st.sp_el1 = STACK_TOP
        st.sp_el0 = USER_STACK_TOP
        st.sysregs["VBAR_EL1"] = VECTORS
        if mmu:
            st.sysregs.update(TTBR0_EL1=L1, TCR_EL1=TCR, MAIR_EL1=MAIR, SCTLR_EL1=SCTLR_MMU)
        return st

    def run(self, io=None):
        return self.vcpu.run(self.io if io is None else io)

    def close(self) -> None:
        self.vm.close()
        self.memory.close()
