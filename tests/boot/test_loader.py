"""hv.boot, hv.boards.virt.fdt and hv.fdt: loading the fixture guests, rejecting malformed images with a
LoaderError (and nothing else, and without touching guest RAM), and device trees that
round-trip through hv's reader, dtc, and a real aarch64 guest run under Unicorn."""
from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv import fdt as fdtlib
from hv.boards.q35.layout import MB_CMDLINE_GPA, MB_INFO_GPA, MB_MMAP_GPA
from hv.boards.virt.fdt import build_virt_fdt
from hv.boards.virt.layout import RAM_BASE as VIRT_RAM_BASE
from hv.boot import BootInfo, LoaderError, load_kernel, parse_elf
from hv.boot.multiboot import MULTIBOOT_BOOT_MAGIC
from hv.memory import GuestMemory, RegionSpec
from hv.state import PSTATE_EL1H_DAIF
from tests.helpers import FIXTURES, require_tool
from tests.boot.kernels import make_elf, multiboot_header
from tests.boot.conftest import MIB, arm_memory, assert_untouched, run_arm_under_unicorn, x86_memory

X86_HELLO = (FIXTURES / "x86_64" / "hello.elf").read_bytes()
X86_DIRTY = (FIXTURES / "x86_64" / "dirty.elf").read_bytes()
ARM_HELLO = (FIXTURES / "aarch64" / "hello.elf").read_bytes()
ARM_DIRTY = (FIXTURES / "aarch64" / "dirty.elf").read_bytes()


@pytest.fixture
def x86_mem() -> Iterator[GuestMemory]:
    mem = x86_memory()
    yield mem
    mem.close()


@pytest.fixture
def arm_mem() -> Iterator[GuestMemory]:
    mem = arm_memory()
    yield mem
    mem.close()


def x86_elf(segments: list[tuple[int, bytes, int]] | None = None, entry: int = 0x100000,
            is64: bool = False, mb_flags: int = 0x3, with_header: bool = True) -> bytes:
    code = (multiboot_header(mb_flags) if with_header else b"") + b"\xf4" * 16
    segments = segments if segments is not None else [(0x100000, code, 0x2000)]
    return make_elf(is64=is64, machine=62 if is64 else 3, entry=entry, segments=segments)


def arm_elf(segments: list[tuple[int, bytes, int]] | None = None, entry: int = 0x40200000) -> bytes:
    segments = segments if segments is not None else [(0x40200000, b"\x1f\x20\x03\xd5" * 4, 0x1000)]
    return make_elf(is64=True, machine=183, entry=entry, segments=segments)


# -- x86_64 / multiboot --------------------------------------------------------------------


def test_x86_fixture_loads_as_multiboot(x86_mem: GuestMemory) -> None:
    elf = parse_elf(X86_DIRTY)
    (seg,) = elf.segments
    # Garbage where the bss goes, to see the loader clear it.
    x86_mem.write(seg.paddr, b"\xaa" * seg.memsz)
    boot = load_kernel("x86_64", x86_mem, X86_DIRTY, "mib=4 iterations=2")
    assert isinstance(boot, BootInfo) and boot.arch == "x86_64"
    assert boot.entry == elf.entry == 0x100010
    assert boot.segments == ((0x100000, seg.memsz),)
    assert x86_mem.read(seg.paddr, seg.filesz) == X86_DIRTY[seg.offset:seg.offset + seg.filesz]
    assert x86_mem.read(seg.paddr + seg.filesz, seg.memsz - seg.filesz) == bytes(seg.memsz - seg.filesz)

    flags, mem_lower, mem_upper, _boot_dev, cmdline_ptr = struct.unpack("<5I", x86_mem.read(MB_INFO_GPA, 20))
    assert flags & 0b101 == 0b101  # mem_lower/mem_upper and cmdline valid
    assert (mem_lower, mem_upper) == (640, (64 * MIB - MIB) // 1024)
    assert cmdline_ptr == MB_CMDLINE_GPA
    assert x86_mem.read(cmdline_ptr, 32).split(b"\0")[0] == b"kernel mib=4 iterations=2"
    mmap_len, mmap_addr = struct.unpack("<II", x86_mem.read(MB_INFO_GPA + 44, 8))
    assert (mmap_len, mmap_addr) == (24, MB_MMAP_GPA)
    assert struct.unpack("<IQQI", x86_mem.read(mmap_addr, 24)) == (20, 0, 64 * MIB, 1)

    s = boot.cpu_state
    assert (s.rax, s.rbx, s.rip) == (MULTIBOOT_BOOT_MAGIC, MB_INFO_GPA, 0x100010)
    assert s.cr0 & 1 and not s.cr0 & (1 << 31) and s.efer == 0
    assert not s.rflags & (1 << 9)  # IF=0
    assert (s.cs.base, s.cs.limit, s.cs.db, s.cs.l, s.cs.type & 0x8, s.cs.dpl) == (0, 0xFFFFFFFF, 1, 0, 8, 0)
    for seg_name in ("ds", "es", "fs", "gs", "ss"):
        data = getattr(s, seg_name)
        assert (data.base, data.limit, data.db, data.type & 0x8, data.present) == (0, 0xFFFFFFFF, 1, 0, 1)


def test_x86_image_name_and_empty_cmdline(x86_mem: GuestMemory) -> None:
    load_kernel("x86_64", x86_mem, X86_HELLO, "", image_name="hello.elf")
    assert x86_mem.read(MB_CMDLINE_GPA, 11) == b"hello.elf\0\0"
    with pytest.raises(LoaderError, match="image name"):
        load_kernel("x86_64", x86_mem, X86_HELLO, "", image_name="two words")


def test_x86_accepts_elf64(x86_mem: GuestMemory) -> None:
    boot = load_kernel("x86_64", x86_mem, x86_elf(is64=True), "x")
    assert boot.entry == 0x100000 and x86_mem.read(0x100000, 4) == multiboot_header()[:4]


X86_BAD = [
    (ARM_HELLO, "kernel is an aarch64 ELF, but machine q35 needs x86_64"),
    (b"", "not an ELF file"),
    (b"MZ" + bytes(100), "not an ELF file"),
    (X86_HELLO[:40], "ELF header is truncated"),
    (X86_HELLO[:70], "program headers lie beyond the end of the file"),
    (X86_HELLO[:0x1100], "lie beyond the end of the"),
    (x86_elf(with_header=False), "no multiboot header"),
    (x86_elf(mb_flags=0x10003), "a.out kludge"),
    (x86_elf(mb_flags=0x13), "requires features hv does not know"),
    (x86_elf(entry=0x300000), "entry point 0x300000 is not inside any loadable segment"),
    (x86_elf([(0x100000, multiboot_header(), 0x8000000)]), "lies outside guest RAM"),
    (x86_elf([(0x8000, multiboot_header(), 0x2000)], entry=0x8000), "overlaps the boot data"),
    (x86_elf([(0x100000, multiboot_header(), 0x2000), (0x101000, b"", 0x100)]),
     "overlaps another segment"),
    (x86_elf([(0xFFFFF000, multiboot_header(), 0x2000)], entry=0xFFFFF000), "beyond the 0x100000000 limit"),
    (x86_elf([(0x100000, multiboot_header(), 0x8)]), "file size 0xc exceeds memory size 0x8"),
]


@pytest.mark.parametrize("image, message", X86_BAD, ids=[m for _, m in X86_BAD])
def test_x86_rejects(x86_mem: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_kernel("x86_64", x86_mem, image, "")
    assert_untouched(x86_mem)


def test_x86_rejects_bad_checksum_and_big_endian(x86_mem: GuestMemory) -> None:
    image = bytearray(X86_HELLO)
    off = image.find(multiboot_header())
    image[off + 8] ^= 1
    with pytest.raises(LoaderError, match="no multiboot header"):
        load_kernel("x86_64", x86_mem, bytes(image), "")
    image = bytearray(X86_HELLO)
    image[5] = 2
    with pytest.raises(LoaderError, match="big-endian"):
        load_kernel("x86_64", x86_mem, bytes(image), "")
    image = bytearray(X86_HELLO)
    image[16] = 3  # ET_DYN
    with pytest.raises(LoaderError, match="ET_EXEC"):
        load_kernel("x86_64", x86_mem, bytes(image), "")
    assert_untouched(x86_mem)


def test_x86_cmdline_limits(x86_mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="command line is 4007 bytes"):
        load_kernel("x86_64", x86_mem, X86_HELLO, "x" * 4000)
    with pytest.raises(LoaderError, match="NUL"):
        load_kernel("x86_64", x86_mem, X86_HELLO, "a\0b")
    assert_untouched(x86_mem)
    load_kernel("x86_64", x86_mem, X86_HELLO, "é" * 1000)


def test_x86_needs_ram_for_boot_info() -> None:
    mem = GuestMemory([RegionSpec(0x100000, 8 * MIB)])
    try:
        with pytest.raises(LoaderError, match="does not cover the multiboot info area"):
            load_kernel("x86_64", mem, X86_HELLO, "")
    finally:
        mem.close()


def test_unknown_arch(x86_mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="unknown architecture 'riscv64'"):
        load_kernel("riscv64", x86_mem, X86_HELLO, "")


# -- aarch64 / FDT --------------------------------------------------------------------------


def test_arm_fixture_loads_with_fdt(arm_mem: GuestMemory) -> None:
    boot = load_kernel("aarch64", arm_mem, ARM_DIRTY, "mib=2 iterations=1", smp=2)
    (seg,) = parse_elf(ARM_DIRTY).segments
    assert boot.entry == 0x40200000 and boot.segments == ((0x40200000, seg.memsz),)
    assert arm_mem.read(seg.paddr, seg.filesz) == ARM_DIRTY[seg.offset:seg.offset + seg.filesz]
    s = boot.cpu_state
    assert (s.pc, s.x[0], s.pstate, s.current_el) == (0x40200000, VIRT_RAM_BASE, PSTATE_EL1H_DAIF, 1)
    assert s.pstate & 0x3C0 == 0x3C0 and s.pstate & 1  # DAIF masked, SP_EL1
    assert not s.sysregs["SCTLR_EL1"] & 1  # MMU off
    fdt_gpa, fdt_size = boot.boot_data
    root = fdtlib.parse_fdt(arm_mem.read(fdt_gpa, fdt_size))
    assert fdtlib.find_node(root, "/chosen").props["bootargs"] == b"mib=2 iterations=1\0"
    memory = fdtlib.find_node(root, "/memory@40000000")
    assert memory.props["reg"] == struct.pack(">QQ", VIRT_RAM_BASE, 64 * MIB)
    assert memory.props["device_type"] == b"memory\0"
    assert fdtlib.find_node(root, "/psci").props["method"] == b"hvc\0"
    assert [c.name for c in fdtlib.find_node(root, "/cpus").children] == ["cpu@0", "cpu@1"]
    assert fdtlib.find_node(root, "/pl011@9000000").props["compatible"].startswith(b"arm,pl011\0")


ARM_BAD = [
    (X86_HELLO, "kernel is an i386 ELF, but machine virt needs aarch64"),
    (x86_elf(is64=True), "kernel is an x86_64 ELF, but machine virt needs aarch64"),
    (make_elf(is64=False, machine=183, entry=0x40200000, segments=[(0x40200000, b"\0" * 4, 4)]),
     "32-bit ELF for aarch64"),
    (arm_elf([(0x40000000, b"\0" * 16, 0x1000)], entry=0x40000000), "overlaps the boot data"),
    (arm_elf([(0x3FFFF000, b"\0" * 16, 0x1000)], entry=0x3FFFF000), "lies outside guest RAM"),
    (arm_elf([(0x40200000, b"\0" * 16, 0x10000000)]), "lies outside guest RAM"),
    (arm_elf(entry=0x40200002), "not 4-byte aligned"),
    (make_elf(is64=True, machine=183, entry=0x40200000, segments=[(0x40200000, b"", 0)]), "no loadable"),
]


@pytest.mark.parametrize("image, message", ARM_BAD, ids=[m for _, m in ARM_BAD])
def test_arm_rejects(arm_mem: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message.replace("(", r"\(")):
        load_kernel("aarch64", arm_mem, image, "console=x")
    assert_untouched(arm_mem)


def test_arm_needs_ram_at_fdt_address() -> None:
    mem = GuestMemory([RegionSpec(0x40200000, 8 * MIB)])
    try:
        with pytest.raises(LoaderError, match="does not cover the device tree"):
            load_kernel("aarch64", mem, ARM_HELLO, "")
    finally:
        mem.close()


# -- fuzzing: corrupted headers raise LoaderError only and never write outside RAM ----------

FUZZ_CASES = [("x86_64", X86_HELLO, x86_memory), ("aarch64", ARM_HELLO, arm_memory),
              ("x86_64", ARM_HELLO, x86_memory), ("aarch64", X86_DIRTY, arm_memory)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.sampled_from(range(len(FUZZ_CASES))),
       edits=st.lists(st.tuples(st.integers(0, 0x1010), st.integers(0, 255)), min_size=1, max_size=8),
       wide=st.lists(st.tuples(st.integers(0, 0x200), st.sampled_from([0, 0xFFFFFFFF, 0x7FFFFFFF,
                                                                        0x40000000, 0x100000, 0x9000])),
                     max_size=3),
       cut=st.one_of(st.none(), st.integers(0, 0x1200)))
def test_fuzz_corrupted_headers(case: int, edits: list[tuple[int, int]], wide: list[tuple[int, int]],
                                cut: int | None) -> None:
    arch, original, make_memory = FUZZ_CASES[case]
    image = bytearray(original)
    for pos, byte in edits:
        image[pos] = byte
    for pos, word in wide:
        image[pos:pos + 4] = struct.pack("<I", word)
    if cut is not None:
        del image[cut:]
    mem = make_memory(16 * MIB)
    try:
        try:
            boot = load_kernel(arch, mem, bytes(image), "fuzz")
        except LoaderError as exc:
            assert "\n" not in str(exc) and str(exc)
            assert_untouched(mem)
        else:
            for gpa, size in (*boot.segments, boot.boot_data):
                assert mem.contains(gpa, size)
    finally:
        mem.close()


# -- FDT -------------------------------------------------------------------------------------


def sample_tree() -> fdtlib.FdtNode:
    mem = arm_memory(32 * MIB)
    try:
        return fdtlib.parse_fdt(build_virt_fdt(mem, 'console=ttyAMA0 quote" end', smp=3))
    finally:
        mem.close()


def test_fdt_roundtrip_through_own_reader() -> None:
    root = fdtlib.FdtNode("", {"#address-cells": fdtlib.prop_u32(2), "empty": b""})
    child = root.add("node@1", value=fdtlib.prop_u64(1 << 40), names=fdtlib.prop_str("a", "bc"))
    child.add("leaf", x=b"\x01\x02\x03")
    blob = fdtlib.build_fdt(root)
    assert len(blob) % 8 == 0 and struct.unpack(">I", blob[:4])[0] == fdtlib.FDT_MAGIC
    assert fdtlib.parse_fdt(blob) == root
    tree = sample_tree()
    assert fdtlib.find_node(tree, "/chosen").props["bootargs"] == b'console=ttyAMA0 quote" end\0'
    assert len(fdtlib.find_node(tree, "/cpus").children) == 3


def test_fdt_writer_rejects_bad_input() -> None:
    with pytest.raises(fdtlib.FdtError):
        fdtlib.prop_str("a\0b")
    with pytest.raises(fdtlib.FdtError):
        fdtlib.prop_u32(1 << 32)
    with pytest.raises(fdtlib.FdtError):
        fdtlib.build_fdt(fdtlib.FdtNode("notroot"))
    with pytest.raises(fdtlib.FdtError):
        fdtlib.build_fdt(fdtlib.FdtNode("", children=[fdtlib.FdtNode("")]))


@require_tool("dtc")
def test_fdt_roundtrip_through_dtc(tmp_path: Path) -> None:
    mem = arm_memory(32 * MIB)
    try:
        blob = build_virt_fdt(mem, "root=/dev/vda rw", smp=2)
    finally:
        mem.close()
    (tmp_path / "hv.dtb").write_bytes(blob)
    dts = subprocess.run(["dtc", "-q", "-I", "dtb", "-O", "dts", str(tmp_path / "hv.dtb")],
                         check=True, capture_output=True, text=True).stdout
    assert 'bootargs = "root=/dev/vda rw";' in dts
    assert "reg = <0x00 0x40000000 0x00 0x2000000>;" in dts
    assert 'method = "hvc";' in dts
    back = subprocess.run(["dtc", "-q", "-I", "dts", "-O", "dtb", "-"], input=dts.encode(),
                          check=True, capture_output=True).stdout
    assert fdtlib.parse_fdt(back) == fdtlib.parse_fdt(blob)


@require_tool("qemu-system-aarch64")
def test_fdt_reader_parses_qemu_virt_dtb(tmp_path: Path) -> None:
    # -nodefaults: no default NIC, whose option ROM (package ipxe-qemu) is only recommended
    subprocess.run(["qemu-system-aarch64", "-M", f"virt,dumpdtb={tmp_path / 'virt.dtb'}", "-cpu", "cortex-a57",
                    "-nodefaults", "-display", "none", "-kernel", str(FIXTURES / "aarch64" / "hello.elf"),
                    "-append", "from qemu"], check=True, capture_output=True, timeout=30)
    root = fdtlib.parse_fdt((tmp_path / "virt.dtb").read_bytes())
    assert fdtlib.find_node(root, "/chosen").props["bootargs"] == b"from qemu\0"
    assert fdtlib.find_node(root, "/psci").props["method"] == b"hvc\0"


@settings(max_examples=300, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, 700), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.one_of(st.none(), st.integers(0, 720)))
def test_fuzz_fdt_reader(edits: list[tuple[int, int]], cut: int | None) -> None:
    mem = arm_memory(16 * MIB)
    try:
        blob = bytearray(build_virt_fdt(mem, "fuzz"))
    finally:
        mem.close()
    for pos, byte in edits:
        if pos < len(blob):
            blob[pos] = byte
    if cut is not None:
        del blob[cut:]
    try:
        fdtlib.parse_fdt(bytes(blob))
    except fdtlib.FdtError:
        pass


# -- loader + FDT + guest together: the aarch64 fixtures under Unicorn ----------------------


def test_arm_hello_runs_with_loader_fdt() -> None:
    assert run_arm_under_unicorn(ARM_HELLO, "from the loader") == (
        "hello from hv guest (aarch64)\ncmdline: from the loader\n")


def test_arm_dirty_runs_with_loader_fdt() -> None:
    from tests.helpers import dirty_reference

    out = run_arm_under_unicorn(ARM_DIRTY, "iterations=2 mib=1")
    assert tuple(out.splitlines()) == dirty_reference(1, 2)
    # /memory from hv's FDT (32 MiB of RAM -> 16 MiB for the buffer) is what the guest used:
    assert run_arm_under_unicorn(ARM_DIRTY, "mib=17 iterations=1").splitlines()[1] == (
        "dirty: error: mib=17 does not fit, 16 MiB of RAM available for the buffer")


def test_x86_hello_runs_from_loader_state_under_unicorn() -> None:
    """The multiboot entry state + info built by the loader boot the x86 fixture through
    its long-mode switch. (Unicorn's 32-bit mode starts flat with CR0 = PE|ET, the state
    the loader describes; only the registers the loader sets are written.)"""
    unicorn = pytest.importorskip("unicorn")
    from unicorn import x86_const as x86

    mem = x86_memory(32 * MIB)
    out = bytearray()
    powered_off: list[int] = []
    try:
        boot = load_kernel("x86_64", mem, X86_HELLO, "via unicorn", image_name="hello.elf")
        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
        region = mem.regions[0]
        uc.mem_map_ptr(region.gpa, region.size, unicorn.UC_PROT_ALL, region.host_addr)
        assert uc.reg_read(x86.UC_X86_REG_CR0) == boot.cpu_state.cr0

        def port_in(_uc: object, port: int, _size: int, _data: object) -> int:
            return 0x20 if port == 0x3FD else 0  # LSR.THRE: always ready

        def port_out(uc_: "unicorn.Uc", port: int, _size: int, value: int, _data: object) -> None:
            if port == 0x3F8:
                out.append(value & 0xFF)
            elif port == 0x604 and value == 0x2000:
                powered_off.append(value)
                uc_.emu_stop()

        uc.hook_add(unicorn.UC_HOOK_INSN, port_in, None, 1, 0, x86.UC_X86_INS_IN)
        uc.hook_add(unicorn.UC_HOOK_INSN, port_out, None, 1, 0, x86.UC_X86_INS_OUT)
        state = boot.cpu_state
        uc.reg_write(x86.UC_X86_REG_EAX, state.rax)
        uc.reg_write(x86.UC_X86_REG_EBX, state.rbx)
        uc.emu_start(state.rip, 0, count=10_000_000)
        del uc
    finally:
        mem.close()
    assert powered_off, f"guest did not power off; output so far: {bytes(out)!r}"
    assert out.decode() == "hello from hv guest (x86_64)\ncmdline: via unicorn\n"
