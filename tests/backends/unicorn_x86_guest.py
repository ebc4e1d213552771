"""A long-mode x86_64 guest on the Unicorn backend, for the backend tests (and the boot tests
that run a real kernel entry on it): identity-mapped low RAM with a scrambled 4K window, a GDT
with kernel/user segments and a TSS, an IDT, code assembled with GNU as at test time, and a
RecordingIo standing in for the machine's buses."""
from __future__ import annotations

import struct
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


from hv_backends.base import Arch
from hv_backends.unicorn import UnicornBackend
from hv.memory import GuestMemory, RegionSpec
from hv.state import Segment, X86CpuState, DescriptorTable


MMIO_BASE = 0x10000000
PML4, PDPT, PD, PT = 0x1000, 0x2000, 0x3000, 0x4000
GDT, IDT, TSS = 0x5000, 0x6000, 0x7000
KSTACK_TOP = 0x9000
KCODE = 0x10000
UCODE = 0x20000
USTACK_TOP = 0x30000
RAM_SIZE = 4 << 20
# Virtual 0x200000 + i*4K maps to physical SCRAMBLED_PHYS[i] (virtual != physical).
SCRAMBLED_VIRT = 0x200000
SCRAMBLED_PHYS = [0x300000 + ((5 * i + 3) % 16) * 0x1000 for i in range(16)]


def assemble_x86(source: str, base: int) -> bytes:
    """Assemble Intel-syntax ``source`` linked at ``base`` into a flat binary."""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp, "g.s")
        src.write_text(".intel_syntax noprefix\n.code64\n.text\n" + source + "\n")
        subprocess.run(["as", "--64", "-o", f"{tmp}/g.o", str(src)], check=True, capture_output=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", hex(base), "--oformat", "binary", "-o",
                        f"{tmp}/g.bin", f"{tmp}/g.o"], check=True, capture_output=True)
        return Path(tmp, "g.bin").read_bytes()


@dataclass
class RecordingIo:
    """The machine's buses for a test: records accesses, answers reads from a script."""

    events: list[tuple[str, int, int, int]] = field(default_factory=list)
    pio_value: int = 0x5A
    mmio_value: int = 0xC0FFEE

    def pio_read(self, port: int, size: int) -> int:
        self.events.append(("pio_read", port, size, self.pio_value))
        return self.pio_value

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.events.append(("pio_write", port, size, value))

    def mmio_read(self, addr: int, size: int) -> int:
        self.events.append(("mmio_read", addr, size, self.mmio_value))
        return self.mmio_value

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.events.append(("mmio_write", addr, size, value))


def gate(offset: int, selector: int = 0x08, dpl: int = 0, gate_type: int = 0xE, ist: int = 0) -> bytes:
    attr = 0x80 | (dpl << 5) | gate_type
    return struct.pack("<HHBBHII", offset & 0xFFFF, selector, ist, attr, (offset >> 16) & 0xFFFF, offset >> 32, 0)


class X86Guest:
    """A long-mode guest: identity-mapped first 2 MiB (user accessible), a 4K-mapped
    scrambled window, flat GDT with kernel/user segments and a TSS, an IDT."""

    def __init__(self, mmio: bool = True) -> None:
        self.memory = GuestMemory([RegionSpec(0, RAM_SIZE)])
        self.vm = UnicornBackend().open_vm(Arch.X86_64, self.memory, [(MMIO_BASE, 0x1000)] if mmio else [])
        self.vcpu = self.vm.create_vcpu(0)
        m = self.memory
        m.write_int(PML4, 8, PDPT | 0x7)
        m.write_int(PDPT, 8, PD | 0x7)
        m.write_int(PD, 8, 0x0 | 0x87)                      # 0..2M identity, 2M page, user
        m.write_int(PD + 8, 8, PT | 0x7)                    # 2M..4M via a page table
        for i, phys in enumerate(SCRAMBLED_PHYS):
            m.write_int(PT + 8 * i, 8, phys | 0x7)
        m.write_int(PD + 8 * (MMIO_BASE >> 21), 8, MMIO_BASE | 0x83)
        gdt = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00CFF2000000FFFF, 0x00AFFA000000FFFF]
        tss_lo = 0x67 | ((TSS & 0xFFFFFF) << 16) | (0x89 << 40) | ((TSS >> 24) << 56)
        gdt += [tss_lo, TSS >> 32]
        m.write(GDT, b"".join(struct.pack("<Q", d) for d in gdt))
        m.write_int(TSS + 4, 8, KSTACK_TOP)
        self.io = RecordingIo()

    def load(self, addr: int, source: str) -> None:
        self.memory.write(addr, assemble_x86(source, addr))
        self.vm.invalidate_code(addr, 0x1000)

    def set_gate(self, vector: int, offset: int, dpl: int = 0, gate_type: int = 0xE) -> None:
        self.memory.write(IDT + 16 * vector, gate(offset, dpl=dpl, gate_type=gate_type))

    def kernel_state(self, rip: int = KCODE) -> X86CpuState:
        st = X86CpuState()
        st.rip = rip
        st.rsp = KSTACK_TOP
        st.rflags = 0x2
        st.cr0 = 0x80010033
        st.cr3 = PML4
        st.cr4 = 0x620
        st.efer = 0x501 | 0x400
        st.cs = Segment(0x08, 0, 0xFFFFFFFF, 0xB, 1, 0, 0, 1, 1, 1)
        for name in ("ds", "es", "ss"):
            setattr(st, name, Segment(0x10, 0, 0xFFFFFFFF, 0x3, 1, 0, 1, 1, 0, 1))
        st.fs = Segment(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)
        st.gs = Segment(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1)
        st.tr = Segment(0x28, TSS, 0x67, 0xB, 1, 0, 0, 0, 0, 0)
        st.gdt = DescriptorTable(GDT, 7 * 8 - 1)
        st.idt = DescriptorTable(IDT, 256 * 16 - 1)
        return st

    def user_state(self, rip: int = UCODE) -> X86CpuState:
        st = self.kernel_state(rip)
        st.rsp = USTACK_TOP
        st.cs = Segment(0x23, 0, 0xFFFFFFFF, 0xB, 1, 3, 0, 1, 1, 1)
        for name in ("ds", "es", "ss"):
            setattr(st, name, Segment(0x1B, 0, 0xFFFFFFFF, 0x3, 1, 3, 1, 1, 0, 1))
        return st

    def run(self, io=None):
        return self.vcpu.run(self.io if io is None else io)

    def close(self) -> None:
        self.vm.close()
        self.memory.close()
