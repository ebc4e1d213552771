"""hv.boot.x86_linux and hv.boot.e820: Linux on q35 as a bzImage (64-bit boot protocol)
or a PVH vmlinux, with an initrd.

Synthetic images built here check every field the loader writes and every error path
(a rejected image writes no guest RAM). Tiny hand-assembled "kernels" in those images
run on Unicorn and KVM and report, through port I/O, what they read through the boot
state (paging, GDT, RSI/EBX), so the entry state is checked by a real CPU. The real
Debian 12 kernel (tests/linux_images.py) loads, and on Unicorn prints its first lines.
"""
from __future__ import annotations

import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from hv_backends import backend_class
from hv_backends.base import Arch, ExitReason

from hv.boot import e820 as e820lib
from hv.boot import x86_linux as xl
from hv.config import ConfigError, parse_args
from hv.boot import BootInfo, LoaderError, load_kernel
from hv.memory import GuestMemory, RegionSpec
from hv.state import EFER_LMA, EFER_LME
from tests.helpers import FIXTURES, ROOT, X86_BACKENDS, HvProcess, hv_command
from tests.boot.conftest import assert_untouched
from tests.boot.kernels import (
    KERNEL_PREF, MIB, PVH_ENTRY, PVH_NOTES, REPORT_PORT, _note, make_bzimage, make_pvh,
)

@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = GuestMemory([RegionSpec(0, 64 * MIB)])
    yield memory
    memory.close()


def zero_page_field(memory: GuestMemory, name: str) -> int:
    offset, fmt = xl.HDR_FIELDS[name]
    return struct.unpack(fmt, memory.read(xl.ZERO_PAGE_GPA + offset, struct.calcsize(fmt)))[0]


def read_e820(memory: GuestMemory, gpa: int, count: int, size: int) -> list[tuple[int, int, int]]:
    return [struct.unpack_from("<QQI", memory.read(gpa + i * size, 20)) for i in range(count)]


def translate(memory: GuestMemory, cr3: int, linear: int) -> int:
    """Walk 4-level page tables (2 MiB leaves) as the CPU would."""
    pml4e = memory.read_int(cr3 + 8 * (linear >> 39 & 511), 8)
    assert pml4e & 1
    pdpte = memory.read_int((pml4e & ~0xFFF) + 8 * (linear >> 30 & 511), 8)
    assert pdpte & 1 and not pdpte & 0x80
    pde = memory.read_int((pdpte & ~0xFFF & (1 << 52) - 1) + 8 * (linear >> 21 & 511), 8)
    assert pde & 0x81 == 0x81
    return (pde & ~(2 * MIB - 1) & (1 << 52) - 1) | (linear & (2 * MIB - 1))


# -- E820 -----------------------------------------------------------------------------------


def test_e820_for_q35_ram() -> None:
    entries = e820lib.build_e820([(0, 256 * MIB)])
    assert [(e.addr, e.size, e.type) for e in entries] == [
        (0, 0x9FC00, 1), (0x9FC00, 0x400, 2), (0xA0000, 0x60000, 2), (0x100000, 255 * MIB, 1),
        (0xB0000000, 0x10000000, 2)]


def test_e820_cuts_reserved_ranges_out_of_ram_and_bounds_entries() -> None:
    entries = e820lib.build_e820([(0, 0xC0001000)])  # RAM reaching over the ECAM
    ram = [(e.addr, e.end) for e in e820lib.ram_entries(entries)]
    assert ram == [(0, 0x9FC00), (0x100000, 0xB0000000), (0xC0000000, 0xC0001000)]
    with pytest.raises(e820lib.E820Error, match="at most 128 fit"):
        e820lib.build_e820([(0x200000 + i * 0x2000, 0x1000) for i in range(130)])


def test_e820_reserves_the_ecam_and_the_acpi_tables() -> None:
    """Linux uses MMCONFIG only if E820 reserves it, and must not reuse the ACPI tables'
    RAM: the default map reserves both, as the q35 layout places them."""
    from hv.boards.q35 import layout
    entries = e820lib.build_e820([(0, 512 * MIB)])
    assert e820lib.E820Entry(layout.ECAM_BASE, layout.ECAM_SIZE, e820lib.E820_RESERVED) in entries
    assert not e820lib.ram_covers(entries, layout.ACPI_TABLES_BASE, 1)
    assert e820lib.ram_covers(entries, layout.KERNEL_MIN_GPA, 1) and e820lib.ram_covers(entries, 0, layout.EBDA_START)


# -- bzImage --------------------------------------------------------------------------------


def test_bzimage_zero_page_and_placement(mem: GuestMemory) -> None:
    image = make_bzimage()
    initrd = bytes(range(256)) * 40
    boot = load_kernel("x86_64", mem, image, "console=ttyS0 root=/dev/vda", initrd=initrd, rsdp_addr=0xF0000)
    assert boot.entry == KERNEL_PREF + 0x200
    assert mem.read(KERNEL_PREF, 0x1000) == image[5 * 512:]
    assert mem.read(xl.CMDLINE_GPA, 29) == b"console=ttyS0 root=/dev/vda\0\0"
    page = mem.read(xl.ZERO_PAGE_GPA, 4096)
    changed = {0x210, 0x211, 0x214, 0x215, 0x216, 0x217, 0x218, 0x219, 0x21A, 0x21B, 0x21C, 0x21D, 0x21E,
               0x21F, 0x224, 0x225, 0x228, 0x229, 0x22A, 0x22B}
    assert all(page[i] == image[i] for i in range(0x1F1, 0x26C) if i not in changed)  # header copied
    assert not any(page[0x26C:0x290]) and page[0x1EF] == 0  # nothing past the header, sentinel clear
    assert zero_page_field(mem, "type_of_loader") == 0xFF
    assert zero_page_field(mem, "loadflags") == 0x81  # LOADED_HIGH | CAN_USE_HEAP
    assert zero_page_field(mem, "code32_start") == KERNEL_PREF
    assert zero_page_field(mem, "cmd_line_ptr") == xl.CMDLINE_GPA
    initrd_gpa, initrd_size = zero_page_field(mem, "ramdisk_image"), zero_page_field(mem, "ramdisk_size")
    assert initrd_size == len(initrd) and mem.read(initrd_gpa, len(initrd)) == initrd
    assert initrd_gpa % 4096 == 0 and initrd_gpa + len(initrd) <= 64 * MIB
    assert initrd_gpa + len(initrd) > 64 * MIB - 4096  # as high as RAM allows
    assert initrd_gpa >= KERNEL_PREF + 0x400000       # clear of the kernel's init_size
    assert struct.unpack_from("<III", page, 0xC0) == (0, 0, 0)
    assert struct.unpack_from("<Q", page, 0x70)[0] == 0xF0000
    assert page[0x1E8] == 5
    assert read_e820(mem, xl.ZERO_PAGE_GPA + 0x2D0, 5, 20)[3] == (0x100000, 63 * MIB, 1)
    assert boot.segments == ((KERNEL_PREF, 0x1000), (initrd_gpa, len(initrd)))


def test_bzimage_long_mode_entry_state(mem: GuestMemory) -> None:
    state = load_kernel("x86_64", mem, make_bzimage(), "").cpu_state
    assert state.rip == KERNEL_PREF + 0x200 and state.rsi == xl.ZERO_PAGE_GPA
    assert state.rflags == 0x2  # interrupts off
    assert (state.cs.selector, state.cs.l, state.cs.db, state.cs.type) == (0x10, 1, 0, 0xB)
    for seg in (state.ds, state.es, state.ss):
        assert (seg.selector, seg.base, seg.limit, seg.type, seg.db) == (0x18, 0, 0xFFFFFFFF, 3, 1)
    assert state.cr0 & 0x80000001 == 0x80000001 and state.cr4 & 0x20 and state.cr3 == xl.PML4_GPA
    assert state.efer & (EFER_LME | EFER_LMA) == EFER_LME | EFER_LMA
    gdt = mem.read(state.gdt.base, state.gdt.limit + 1)
    code64 = struct.unpack_from("<Q", gdt, 0x10)[0]
    assert code64 >> 53 & 1 and not code64 >> 54 & 1 and code64 >> 47 & 1  # L, not D, present
    for linear in (0, xl.ZERO_PAGE_GPA, KERNEL_PREF + 0x200, 0xB0000000, 0xFFFFF000):
        assert translate(mem, state.cr3, linear) == linear


def test_bzimage_placement_falls_back_to_1mib_and_aligns_the_run_address(mem: GuestMemory) -> None:
    boot = load_kernel("x86_64", mem, make_bzimage(pref=0x80000), "")
    assert boot.entry == 0x100200
    # relocatable: it runs at the 2 MiB aligned address above 1 MiB, so the initrd goes above that
    hdr = xl.parse_setup_header(make_bzimage(pref=0))
    place = xl.place_bzimage(hdr, e820lib.build_e820([(0, 64 * MIB)]), 4096)
    assert (place.kernel, place.kernel_end) == (0x100000, 0x200000 + 0x400000)


def test_bzimage_protocol_2_12_gets_no_rsdp(mem: GuestMemory) -> None:
    load_kernel("x86_64", mem, make_bzimage(version=0x020C, jump=0x62), "", rsdp_addr=0xF0000)
    assert mem.read_int(xl.ZERO_PAGE_GPA + 0x70, 8) == 0


def _kernel_without_payload_room() -> bytes:
    return make_bzimage(kernel=bytes(0x200), payload=(0, 0x100))


def _setup_sects_beyond_file() -> bytes:
    image = bytearray(make_bzimage())
    image[0x1F1] = 200
    return bytes(image)


BZ_BAD = [
    (make_bzimage()[:0x240], "bzImage is truncated"),
    (make_bzimage(boot_flag=0x1234), "no boot flag 0xAA55"),
    (make_bzimage(version=0x020B), "boot protocol 2.11 is too old"),
    (make_bzimage(jump=0x90), "beyond 0x290"),
    (make_bzimage(xloadflags=0x2), "no 64-bit entry point"),
    (make_bzimage(loadflags=0), "zImage"),
    (_setup_sects_beyond_file(), "setup_sects=200 reaches byte 102912"),
    (make_bzimage(syssize=0x1000), "syssize says 65536 bytes"),
    (make_bzimage(syssize=0), "syssize says 0 bytes"),
    (_kernel_without_payload_room(), "no room for the 64-bit entry"),
    (make_bzimage(payload=(0xF00, 0x200)), "payload 0xf00+0x200 lies beyond"),
    (make_bzimage(init_size=0x800), "init_size 0x800 is smaller"),
    (make_bzimage(alignment=0x300000), "kernel_alignment 0x300000 is not a power of two"),
    (make_bzimage(init_size=0x8000000), "kernel does not fit in guest RAM"),
]


@pytest.mark.parametrize("image, message", BZ_BAD, ids=[m for _, m in BZ_BAD])
def test_bzimage_rejects(mem: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message.replace("(", r"\(").replace("+", r"\+")):
        load_kernel("x86_64", mem, image, "")
    assert_untouched(mem)


@pytest.mark.parametrize("kwargs, message", [
    ({"cmdline": "x" * 0x800}, "command line is 2048 bytes, this kernel (cmdline_size 2047) takes at most 2047"),
    ({"cmdline": "a\0b"}, "NUL"),
    ({"initrd": b""}, "initrd is empty"),
    ({"initrd": bytes(60 * MIB)}, ("initrd (60.0 MiB) does not fit between the kernel's end at 0x1400000 and "
                                   "0x4000000 (the end of RAM, 64.0 MiB, or the kernel's initrd_addr_max 0x7fffffff)")),
    ({"image": make_bzimage(initrd_max=0x1200000), "initrd": bytes(4096)},
     "initrd (4096 bytes) does not fit between the kernel's end at 0x1400000 and 0x1200001"),
    ({"rsdp_addr": 1 << 32}, "RSDP address 0x100000000 is not below 4 GiB"),
], ids=["cmdline-size", "nul", "empty-initrd", "initrd-too-big", "initrd-addr-max", "rsdp"])
def test_bzimage_rejects_arguments(mem: GuestMemory, kwargs: dict, message: str) -> None:
    image = kwargs.pop("image", make_bzimage())
    cmdline = kwargs.pop("cmdline", "")
    with pytest.raises(LoaderError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_kernel("x86_64", mem, image, cmdline, **kwargs)
    assert_untouched(mem)


def test_boot_data_area_must_be_ram() -> None:
    memory = GuestMemory([RegionSpec(0x100000, 64 * MIB)])
    try:
        with pytest.raises(LoaderError, match="does not cover the Linux boot data area"):
            load_kernel("x86_64", memory, make_bzimage(), "")
        assert_untouched(memory)
    finally:
        memory.close()


# -- PVH ------------------------------------------------------------------------------------


def test_pvh_start_info_memmap_and_state(mem: GuestMemory) -> None:
    initrd = b"initrd" * 1000
    boot = load_kernel("x86_64", mem, make_pvh(), "console=ttyS0", initrd=initrd, rsdp_addr=0xF0000)
    assert boot.entry == 0x1000000 and mem.read(0x1000000, len(PVH_ENTRY)) == PVH_ENTRY
    assert not any(mem.read(0x1000000 + len(PVH_ENTRY), 0x1000))  # bss zeroed
    info = xl.START_INFO.unpack(mem.read(xl.START_INFO_GPA, xl.START_INFO.size))
    magic, version, flags, nr_modules, modlist, cmdline, rsdp, memmap, entries, reserved = info
    assert (magic, version, flags, nr_modules) == (0x336EC578, 1, 0, 1)
    assert (cmdline, rsdp, memmap, entries, reserved) == (xl.CMDLINE_GPA, 0xF0000, xl.MEMMAP_GPA, 5, 0)
    assert mem.read(cmdline, 14) == b"console=ttyS0\0"
    paddr, size, mod_cmdline, _ = xl.MODLIST_ENTRY.unpack(mem.read(modlist, 32))
    assert (size, mod_cmdline) == (len(initrd), 0) and mem.read(paddr, size) == initrd
    assert paddr % 4096 == 0 and paddr >= 0x1200000
    table = [struct.unpack_from("<QQII", mem.read(memmap + 24 * i, 24)) for i in range(entries)]
    assert table[0] == (0, 0x9FC00, 1, 0) and table[3] == (0x100000, 63 * MIB, 1, 0)
    state = boot.cpu_state
    assert (state.rip, state.rbx, state.rflags) == (0x1000000, xl.START_INFO_GPA, 0x2)
    assert (state.cs.selector, state.cs.db, state.cs.l, state.cs.limit) == (0x08, 1, 0, 0xFFFFFFFF)
    assert state.cr0 & 0x80000001 == 1 and state.efer == 0 and state.cr4 == 0
    assert (state.tr.type, state.tr.limit, state.tr.base) == (0xB, 0x67, 0)


def test_pvh_without_initrd_and_with_a_4_byte_note(mem: GuestMemory) -> None:
    image = make_pvh(notes=_note(b"Xen\0", 18, struct.pack("<I", 0x1000000)))
    load_kernel("x86_64", mem, image, "")
    assert xl.START_INFO.unpack(mem.read(xl.START_INFO_GPA, 56))[3:5] == (0, 0)


PVH_BAD = [
    (make_pvh(notes=_note(b"Xen\0", 18, b"\0\0\0")), "3-byte value"),
    (make_pvh(notes=PVH_NOTES[:-4]), "runs past the end of its segment"),
    (make_pvh(note_filesz=1 << 20), "note segment 1 lies beyond the end of the file"),
    (make_pvh(notes=_note(b"Xen\0", 18, struct.pack("<Q", 0x3000000))), "entry point 0x3000000 is not inside"),
    (make_pvh(segments=[(0x10000, PVH_ENTRY, 0x1000)],
              notes=_note(b"Xen\0", 18, struct.pack("<I", 0x10000))), "overlaps the boot data"),
    (make_pvh(segments=[(0xA0000, PVH_ENTRY, 0x1000)],
              notes=_note(b"Xen\0", 18, struct.pack("<I", 0xA0000))), "overlaps a reserved area"),
    (make_pvh(segments=[(0x1000000, PVH_ENTRY, 0x8000000)]), "lies outside guest RAM"),
    (make_pvh(segments=[(0x1000000, PVH_ENTRY, 0x2000), (0x1001000, b"", 0x10)]), "overlaps another segment"),
    (make_pvh(machine=183), "aarch64 ELF, but machine q35 needs x86_64"),
]


@pytest.mark.parametrize("image, message", PVH_BAD, ids=[m for _, m in PVH_BAD])
def test_pvh_rejects(mem: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message):
        load_kernel("x86_64", mem, image, "")
    assert_untouched(mem)


def test_pvh_rejects_long_cmdline_and_big_initrd(mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="2048 bytes, a PVH kernel takes at most 2047"):
        load_kernel("x86_64", mem, make_pvh(), "x" * 2048)
    with pytest.raises(LoaderError, match=r"initrd \(63.0 MiB\) does not fit .* or 4 GiB\)"):
        load_kernel("x86_64", mem, make_pvh(), "", initrd=bytes(63 * MIB))
    assert_untouched(mem)


# -- format dispatch ------------------------------------------------------------------------


def test_dispatch_names_what_it_looked_for(mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="not an ELF file .* nor a bzImage .*'HdrS'.*bzImages, PVH vmlinux"):
        load_kernel("x86_64", mem, b"MZ" + bytes(1000), "")
    with pytest.raises(LoaderError, match="no multiboot header .* and no PVH entry note"):
        load_kernel("x86_64", mem, make_pvh(notes=_note(b"Xen\0", 6, b"linux\0")), "")
    assert_untouched(mem)


def test_multiboot_fixture_still_loads_and_takes_no_initrd(mem: GuestMemory) -> None:
    image = (FIXTURES / "x86_64" / "hello.elf").read_bytes()
    with pytest.raises(LoaderError, match="-initrd needs a Linux kernel"):
        load_kernel("x86_64", mem, image, "", initrd=b"x")
    assert_untouched(mem)
    boot = load_kernel("x86_64", mem, image, "hi")
    assert boot.cpu_state.rax == 0x2BADB002


# -- -initrd on the command line ------------------------------------------------------------


def test_initrd_option_spellings_and_checks(tmp_path: Path) -> None:
    initrd = tmp_path / "initrd.img"
    initrd.write_bytes(b"x")
    for option in ("-initrd", "--initrd"):
        config = parse_args(["-machine", "q35", "-kernel", str(initrd), option, str(initrd)]).config
        assert config is not None and config.initrd == initrd
    assert parse_args(["-machine", "q35", "-kernel", str(initrd)]).config.initrd is None
    with pytest.raises(ConfigError, match=r"^-initrd: .*nope: no such file$"):
        parse_args(["-machine", "q35", "-kernel", str(initrd), "-initrd", str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="-initrd: .*: not a regular file"):
        parse_args(["-machine", "q35", "-kernel", str(initrd), "-initrd", str(tmp_path)])


def run_hv(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(hv_command("-machine", "q35", "-accel", "unicorn", *args), cwd=ROOT, text=True,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL, check=False)


def test_cli_refuses_what_does_not_fit_with_one_line(tmp_path: Path) -> None:
    kernel = tmp_path / "bzImage"
    kernel.write_bytes(make_bzimage(init_size=0x8000000))
    result = run_hv("-m", "64", "-kernel", str(kernel))
    assert result.returncode == 1
    assert result.stderr.splitlines() == [(f"hv: error: -kernel: {kernel}: kernel does not fit in guest RAM: it "
                                           "needs memory up to 0x9000000 (144.0 MiB; init_size 0x8000000): "
                                           "give the guest more memory (-m)")]
    kernel.write_bytes(make_bzimage())
    big = tmp_path / "initrd"
    with open(big, "wb") as f:
        f.truncate(33 * MIB)
    result = run_hv("-m", "32", "-kernel", str(kernel), "-initrd", str(big))
    assert result.returncode == 1
    expected = f"hv: error: -initrd: {big}: 34603008 bytes do not fit in 32 MiB of guest RAM"
    assert result.stderr.splitlines() == [expected]
    with open(big, "wb") as f:
        f.truncate(13 * MIB)
    result = run_hv("-m", "32", "-kernel", str(kernel), "-initrd", str(big))
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert "initrd (13.0 MiB) does not fit between the kernel's end at 0x1400000 and 0x2000000" in result.stderr


# -- the entry state on real CPUs -----------------------------------------------------------


class Reports:
    """The machine's buses for the tiny kernels: collects what they write to port 0x510."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def pio_read(self, port: int, size: int) -> int:
        return 0xFF

    def pio_write(self, port: int, size: int, value: int) -> None:
        assert port == REPORT_PORT and size == 4
        self.values.append(value)

    def mmio_read(self, addr: int, size: int) -> int:
        raise AssertionError(f"unexpected MMIO read at {addr:#x}")

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        raise AssertionError(f"unexpected MMIO write at {addr:#x}")


def run_entry(accel: str, memory: GuestMemory, boot: BootInfo) -> list[int]:
    """Set the boot state through ``accel``, check it reads back as built, run to HLT."""
    vm = backend_class(accel)().open_vm(Arch.X86_64, memory, [])
    try:
        vcpu = vm.create_vcpu(0)
        vcpu.set_state(boot.cpu_state)
        back = vcpu.get_state()
        built = boot.cpu_state
        for name in ("rip", "rsi", "rbx", "cr3", "cr4", "efer", "gdt", "cs", "ds", "ss", "tr"):
            assert getattr(back, name) == getattr(built, name), name
        assert back.cr0 & 0x80000011 == built.cr0 and not back.rflags & 0x200
        reports = Reports()
        exit_ = vcpu.run(reports)
        assert exit_.reason is ExitReason.HALT, exit_
        return reports.values
    finally:
        vm.close()


@pytest.mark.parametrize("accel", X86_BACKENDS)
def test_bzimage_entry_runs_on(accel: str, mem: GuestMemory) -> None:
    boot = load_kernel("x86_64", mem, make_bzimage(), "ABCD")
    e820_word = mem.read_int(xl.ZERO_PAGE_GPA + 0x1E8, 4)
    assert run_entry(accel, mem, boot) == [e820_word, int.from_bytes(b"ABCD", "little"), xl.ZERO_PAGE_GPA]


@pytest.mark.parametrize("accel", X86_BACKENDS)
def test_pvh_entry_runs_on(accel: str, mem: GuestMemory) -> None:
    boot = load_kernel("x86_64", mem, make_pvh(), "")
    assert run_entry(accel, mem, boot) == [0x336EC578, 5]


# -- the real Debian kernel -----------------------------------------------------------------


@pytest.fixture(scope="module")
def debian_x86() -> object:
    from tests.linux_images import linux_images
    return linux_images("x86_64")


def test_debian_kernels_load(debian_x86, mem: GuestMemory) -> None:
    bz = debian_x86.vmlinuz.read_bytes()
    hdr = xl.parse_setup_header(bz)
    assert hdr.version >= 0x020C and hdr.xloadflags & xl.XLF_KERNEL_64 and hdr.relocatable
    memory = GuestMemory([RegionSpec(0, 256 * MIB)])
    try:
        initrd = debian_x86.initramfs.read_bytes()
        boot = load_kernel("x86_64", memory, bz, "console=ttyS0", initrd=initrd)
        assert boot.entry == hdr.pref_address + 0x200
        boot = load_kernel("x86_64", memory, debian_x86.vmlinux.read_bytes(), "console=ttyS0", initrd=initrd)
        assert xl.START_INFO.unpack(memory.read(xl.START_INFO_GPA, 56))[0] == xl.XEN_HVM_START_MAGIC
        assert 0x1000000 <= boot.entry < 0x4000000
    finally:
        memory.close()
    with pytest.raises(LoaderError, match="kernel does not fit in guest RAM"):  # init_size is ~64 MiB
        load_kernel("x86_64", mem, bz, "")
    assert_untouched(mem)


@pytest.mark.parametrize("image", ["vmlinux", "vmlinuz"])
def test_debian_kernel_prints_its_banner_on_unicorn(debian_x86, image: str, tmp_path: Path) -> None:
    """Early boot only: without a timer Linux stops at its delay-loop calibration."""
    kernel = getattr(debian_x86, image)
    hv = HvProcess(tmp_path, "-machine", "q35", "-accel", "unicorn", "-m", "256", "-kernel", str(kernel),
                   "-initrd", str(debian_x86.initramfs),
                   "-append", "console=ttyS0 earlyprintk=serial,ttyS0,115200")
    try:
        text = hv.wait_output("Kernel command line:", timeout=300)
        assert "Linux version 6.1" in text
        assert "BIOS-e820: [mem 0x0000000000100000-0x000000000fffffff] usable" in text
        assert "RAMDISK: [mem 0x" in text
    finally:
        hv.close()


# -- Unicorn: a second fault after hv delivered one is not a double fault --------------------


def test_unicorn_second_page_fault_is_not_promoted_to_double_fault() -> None:
    """Unicorn keeps QEMU's 'exception in flight' after handing a #PF to hv; unless hv
    clears it, the next #PF becomes #DF (Linux died at its second page fault)."""
    from tests.backends.unicorn_x86_guest import KCODE, X86Guest

    guest = X86Guest(mmio=False)
    try:
        code = bytes.fromhex(
            "48c7c000000040"    # mov rax, 0x40000000 (not mapped)
            "48c70001000000"    # mov qword [rax], 1   -> #PF
            "48c70002000000"    # mov qword [rax], 2   -> #PF again
            "f4"                # hlt
            "4883c408"          # handler: add rsp, 8 (error code)
            "4883042407"        # add qword [rsp], 7 (skip the store)
            "48ffc3"            # inc rbx
            "48cf")             # iretq
        guest.memory.write(KCODE, code)
        guest.vm.invalidate_code(KCODE, 0x1000)
        guest.set_gate(14, KCODE + 22)
        guest.vcpu.set_state(guest.kernel_state())
        exit_ = guest.run()
        assert exit_.reason is ExitReason.HALT, exit_
        state = guest.vcpu.get_state()
        assert (state.rbx, state.rip) == (2, KCODE + 22)
    finally:
        guest.close()
