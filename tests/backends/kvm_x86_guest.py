"""x86 guests on the real KVM backend, for the KVM backend and CPUID tests: code assembled with
GNU as/ld/objcopy at the address it runs from (plain integer code at CPL0, which kvm_pvm
emulates), real/protected/long mode entry states over identity page tables, and a
RecordingIo standing in for the machine's buses."""
from __future__ import annotations

import functools
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from hv_backends.kvm import KvmVcpu, KvmVm
from hv.memory import GuestMemory
from hv.state import EFER_LMA, EFER_LME, DescriptorTable, Segment, X86CpuState


RAM_SIZE = 2 << 20
CODE = 0x8000
DATA = 0x9000
STACK_TOP = 0x7000
PML4, PDPT, PD = 0x1000, 0x2000, 0x3000
GDT = 0x500
MMIO = 0x30000000          # below 1 GiB (mapped by the long-mode page tables), not RAM
MMIO32 = 0xD0000000        # for guests without paging


@functools.cache
def assemble(source: str, bits: int = 64, base: int = CODE) -> bytes:
    """Assemble Intel-syntax ``source`` for ``bits``-bit mode, linked to run at ``base``."""
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        (d / "g.s").write_text(f".intel_syntax noprefix\n.code{bits}\n.globl _start\n_start:\n{source}\n")
        subprocess.run(["as", "--64", "-o", str(d / "g.o"), str(d / "g.s")], check=True, capture_output=True)
        subprocess.run(["ld", "-m", "elf_x86_64", "-Ttext", hex(base), "-e", "_start", "-o", str(d / "g.elf"),
                        str(d / "g.o")], check=True, capture_output=True)
        subprocess.run(["objcopy", "-O", "binary", "-j", ".text", str(d / "g.elf"), str(d / "g.bin")],
                       check=True, capture_output=True)
        return (d / "g.bin").read_bytes()


@dataclass
class RecordingIo:
    """The machine's buses, recording every access; reads answer from ``reads`` or 0."""

    pio_values: dict[int, int] = field(default_factory=dict)
    mmio_values: dict[int, int] = field(default_factory=dict)
    log: list[tuple[str, int, int, int]] = field(default_factory=list)

    def pio_read(self, port: int, size: int) -> int:
        value = self.pio_values.get(port, 0)
        self.log.append(("in", port, size, value))
        return value

    def pio_write(self, port: int, size: int, value: int) -> None:
        self.log.append(("out", port, size, value))

    def mmio_read(self, addr: int, size: int) -> int:
        value = self.mmio_values.get(addr, 0)
        self.log.append(("mmio-r", addr, size, value))
        return value

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        self.log.append(("mmio-w", addr, size, value))


def real_mode_state(rip: int) -> X86CpuState:
    return X86CpuState(cs=Segment(0, 0, 0xFFFF, 0xB), rip=rip, rsp=STACK_TOP)


def protected_mode_state(rip: int) -> X86CpuState:
    flat = Segment.flat32_data(0x10)
    return X86CpuState(rip=rip, rsp=STACK_TOP, cr0=0x11, cs=Segment.flat32_code(0x8), ds=flat,
                       es=replace(flat), fs=replace(flat), gs=replace(flat), ss=replace(flat),
                       tr=Segment(0x18, 0, 0x67, 0xB, 1, 0, 0, 0), gdt=DescriptorTable(GDT, 0x1F),
                       idt=DescriptorTable(0, 0))


def write_page_tables(memory: GuestMemory) -> None:
    """Identity-map the first GiB with 2 MiB pages, Accessed/Dirty preset (no A/D writes)."""
    memory.write_int(PML4, 8, PDPT | 0x23)
    memory.write_int(PDPT, 8, PD | 0x23)
    memory.write(PD, b"".join(((i << 21) | 0xE3).to_bytes(8, "little") for i in range(512)))
    gdt = [0, 0x00AF9A000000FFFF, 0x00CF92000000FFFF, 0x00008B0000000067]
    memory.write(GDT, b"".join(d.to_bytes(8, "little") for d in gdt))


def long_mode_state(rip: int) -> X86CpuState:
    data = Segment(0x10, 0, 0xFFFFFFFF, 0x3, 1, 0, 1, 1, 0, 1)
    return X86CpuState(
        rip=rip, rsp=STACK_TOP, cr0=0x80010033, cr3=PML4, cr4=0x6A0, efer=EFER_LME | EFER_LMA,
        cs=Segment(0x8, 0, 0xFFFFFFFF, 0xB, 1, 0, 0, 1, 1, 1), ds=data, es=replace(data),
        fs=replace(data), gs=replace(data), ss=replace(data),
        tr=Segment(0x18, 0, 0x67, 0xB, 1, 0, 0, 0), gdt=DescriptorTable(GDT, 0x1F),
        idt=DescriptorTable(0, 0),
    )


def load(vm: KvmVm, vcpu: KvmVcpu, source: str, bits: int, state: X86CpuState | None = None) -> bytes:
    code = assemble(source, bits)
    vm.memory.write(CODE, code)
    if state is None:
        if bits == 64:
            write_page_tables(vm.memory)
            state = long_mode_state(CODE)
        elif bits == 32:
            state = protected_mode_state(CODE)
        else:
            state = real_mode_state(CODE)
    vcpu.set_state(state)
    return code


def assert_same_state(a: X86CpuState, b: X86CpuState, vm: KvmVm) -> None:
    """Equal in everything but the running TSC, which may only have advanced a little
    (where KVM can restore the TSC at all: see KvmVm.tsc_restorable)."""
    assert replace(a, tsc=0) == replace(b, tsc=0)
    if vm.tsc_restorable:
        assert 0 <= b.tsc - max(a.tsc, 1) < 10**11
    else:
        assert b.tsc > 0


# -- probing ----------------------------------------------------------------------------
