"""hv.boot.arm64_image through hv.boot: arm64 ``Image`` kernels (raw, gzip'd, inside an
ELF vmlinux) are placed as booting.rst says, with an initrd in /chosen, and every bad
header field is one LoaderError that leaves guest RAM untouched.

The bootable images here wrap the aarch64 hello fixture (linked at 0x40200000) in a real
Image header whose code0 branches to it: text_offset 0x1FF000 puts the header page at
0x401FF000 and the fixture's bytes at 0x40200000. The guest prints the bootargs it
finds in the device tree at x0, so its output proves the whole boot protocol.
"""
from __future__ import annotations

import gzip
import struct
from collections.abc import Iterator

import pytest

from hv import fdt as fdtlib
from hv.boot import arm64_image
from hv.boards.virt.layout import RAM_BASE as VIRT_RAM_BASE
from hv.boot import LoaderError, load_kernel, parse_elf
from hv.memory import GuestMemory, RegionSpec
from hv.state import PSTATE_EL1H_DAIF
from tests.helpers import FIXTURES
from tests.linux_images import linux_images
from tests.boot.conftest import arm_memory, assert_untouched, run_arm_under_unicorn
from tests.boot.kernels import make_elf

MIB = 1024 * 1024
ARM_HELLO = (FIXTURES / "aarch64" / "hello.elf").read_bytes()
TEXT_OFFSET = 0x1FF000
FLAGS_LE_4K_ANYWHERE = 0b1010


def image_header(*, code0: int = 0x14000000, text_offset: int = TEXT_OFFSET, image_size: int = 0x20000,
                 flags: int = FLAGS_LE_4K_ANYWHERE, magic: int = arm64_image.MAGIC) -> bytes:
    return struct.pack("<IIQQQQQQII", code0, 0, text_offset, image_size, flags, 0, 0, 0, magic, 0)


def hello_image(*, flags: int = FLAGS_LE_4K_ANYWHERE) -> bytes:
    """The hello fixture as an arm64 Image: a 4 KiB header page whose first instruction
    is ``b +0x1000`` (into the fixture's entry at 0x40200000), then its segment."""
    (seg,) = parse_elf(ARM_HELLO).segments
    assert seg.paddr == seg.vaddr == 0x40200000 == parse_elf(ARM_HELLO).entry
    branch = 0x14000000 | (0x1000 // 4)
    page = image_header(code0=branch, image_size=0x1000 + seg.memsz, flags=flags).ljust(0x1000, b"\0")
    return page + ARM_HELLO[seg.offset:seg.offset + seg.filesz]


def vmlinux_of(image: bytes, *, etype: int = 3) -> bytes:
    """``image`` as a Linux-style ELF vmlinux: linked far above RAM, _text = the header."""
    return make_elf(is64=True, machine=183, entry=0xFFFF800008000000, etype=etype,
                    segments=[(0xFFFF800008000000, image[:0x1000], 0x1000),
                              (0xFFFF800008001000, image[0x1000:], len(image) - 0x1000)])


@pytest.fixture
def mem() -> Iterator[GuestMemory]:
    memory = arm_memory(64 * MIB)
    yield memory
    memory.close()


def chosen_of(memory: GuestMemory, boot_data: tuple[int, int]) -> fdtlib.FdtNode:
    return fdtlib.find_node(fdtlib.parse_fdt(memory.read(*boot_data)), "/chosen")


def test_image_placed_as_booting_rst_says(mem: GuestMemory) -> None:
    image = hello_image()
    boot = load_kernel("aarch64", mem, image, "console=ttyAMA0")
    kernel = VIRT_RAM_BASE + TEXT_OFFSET              # 2 MiB aligned RAM base + text_offset
    assert boot.entry == boot.cpu_state.pc == kernel
    assert mem.read(kernel, len(image)) == image
    dtb, dtb_size = boot.boot_data
    span = struct.unpack_from("<Q", image, 16)[0]
    assert dtb % (2 * MIB) == 0 and dtb >= kernel + span   # clear of image_size, 8-byte aligned
    assert 0 < dtb_size <= 2 * MIB
    s = boot.cpu_state
    assert s.x[0] == dtb and s.x[1:4] == [0, 0, 0]
    assert s.pstate == PSTATE_EL1H_DAIF and s.current_el == 1 and not s.sysregs["SCTLR_EL1"] & 1
    assert chosen_of(mem, boot.boot_data).props["bootargs"] == b"console=ttyAMA0\0"
    assert "linux,initrd-start" not in chosen_of(mem, boot.boot_data).props


@pytest.mark.parametrize("wrap", ["raw", "gzip", "vmlinux-dyn", "vmlinux-exec"])
def test_wrapped_images_boot_under_unicorn(wrap: str) -> None:
    image = hello_image()
    kernel = {"raw": image, "gzip": gzip.compress(image), "vmlinux-dyn": vmlinux_of(image),
              "vmlinux-exec": vmlinux_of(image, etype=2)}[wrap]
    assert run_arm_under_unicorn(kernel, f"booted as {wrap}") == (
        f"hello from hv guest (aarch64)\ncmdline: booted as {wrap}\n")


def test_initrd_after_kernel_and_dtb_in_chosen(mem: GuestMemory) -> None:
    initrd = bytes(range(256)) * 4000 + b"tail"
    boot = load_kernel("aarch64", mem, hello_image(), "rdinit=/init", initrd=initrd)
    chosen = chosen_of(mem, boot.boot_data)
    start = struct.unpack(">Q", chosen.props["linux,initrd-start"])[0]
    end = struct.unpack(">Q", chosen.props["linux,initrd-end"])[0]
    assert end - start == len(initrd) and mem.read(start, len(initrd)) == initrd
    dtb, dtb_size = boot.boot_data
    assert start % 4096 == 0 and start >= dtb + dtb_size      # after kernel and device tree
    assert (start, len(initrd)) in boot.segments


def test_initrd_that_does_not_fit_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match=r"initrd of \d+ bytes does not fit in guest RAM"):
        load_kernel("aarch64", mem, hello_image(), "", initrd=bytes(60 * MIB))
    assert_untouched(mem)


def test_initrd_needs_a_linux_kernel(mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="-initrd needs a Linux kernel"):
        load_kernel("aarch64", mem, ARM_HELLO, "", initrd=b"x")
    assert_untouched(mem)


def big_gzip(size: int) -> bytes:
    """A gzip member of ``size`` zero bytes (compressed in pieces, so cheap to make)."""
    return gzip.compress(bytes(size), compresslevel=1)


BAD = [
    (image_header(flags=FLAGS_LE_4K_ANYWHERE | 1) + bytes(64), "big-endian arm64 Image"),
    (image_header(image_size=0x1_0000_0000), "image_size 0x100000000, more than the 256 MiB"),
    (image_header(text_offset=0x1234), "bad text_offset 0x1234"),
    (image_header(text_offset=0x8000000), "kernel needs 0x8020000 bytes of RAM"),
    (image_header(image_size=0x3C02000), "no room for the device tree"),
    (image_header(magic=0x644D5242), "neither an ELF nor an arm64 Linux Image"),
    (image_header()[:40], "neither an ELF nor an arm64 Linux Image"),
    (b"\x1f\x8b" + bytes(30), "gzip'd kernel is corrupt"),
    (gzip.compress(hello_image())[:-2000], "gzip'd kernel is truncated"),
    (vmlinux_of(hello_image())[:100], "program headers lie beyond the end"),
    (make_elf(is64=True, machine=183, entry=0x40200000, etype=3,
              segments=[(0x40200000, b"\0" * 16, 16)]), "kernel ELF type is 3"),
]


@pytest.mark.parametrize("image, message", BAD, ids=[m for _, m in BAD])
def test_bad_images_are_one_loader_error(mem: GuestMemory, image: bytes, message: str) -> None:
    with pytest.raises(LoaderError, match=message.replace("(", r"\(")):
        load_kernel("aarch64", mem, image, "")
    assert_untouched(mem)


def test_gzip_output_is_bounded() -> None:
    with pytest.raises(arm64_image.Arm64ImageError, match="unpacks to more than 1 MiB"):
        arm64_image.gunzip_bounded(big_gzip(3 * MIB), limit=MIB)
    assert arm64_image.gunzip_bounded(big_gzip(MIB), limit=MIB) == bytes(MIB)


def test_gzip_bomb_through_the_loader_is_refused(mem: GuestMemory) -> None:
    with pytest.raises(LoaderError, match="unpacks to more than 256 MiB"):
        load_kernel("aarch64", mem, big_gzip(257 * MIB), "")
    assert_untouched(mem)


def test_legacy_image_without_image_size_loads_at_0x80000(mem: GuestMemory) -> None:
    image = image_header(text_offset=0xDEAD, image_size=0) + bytes(4096)
    boot = load_kernel("aarch64", mem, image, "")
    assert boot.entry == VIRT_RAM_BASE + 0x80000 and mem.read(boot.entry, len(image)) == image


def test_ram_must_cover_the_kernel_base() -> None:
    memory = GuestMemory([RegionSpec(0x80000000, 16 * MIB)])
    try:
        with pytest.raises(LoaderError, match="does not cover the kernel's base"):
            load_kernel("aarch64", memory, hello_image(), "")
    finally:
        memory.close()


# -- a real Linux kernel (fixtures/linux/build_images.py, built on first use) ---------------

def test_linux_boots_to_root_mount_on_unicorn() -> None:
    """The kernel finds everything in hv's device tree: GICv3, timer, PSCI, the PL011 on
    its interrupt; with no root device it must get as far as mounting root."""
    from hv.config import parse_args
    from hv.console import BufferSink
    from hv.machine.machine import Machine
    from hv_backends import backend_class

    kernel = linux_images("aarch64").vmlinuz   # built here if the cache lacks it
    config = parse_args(["-machine", "virt", "-accel", "unicorn", "-m", "512", "-kernel", str(kernel),
                         "-append", "console=ttyAMA0 earlycon=pl011,0x9000000"]).config
    out = BufferSink()
    machine = Machine(config, backend_class("unicorn")(), out)
    try:
        machine.load_kernel(kernel.read_bytes())
        machine.start()
        reached = out.wait_for(b"Unable to mount root fs", 600)
    finally:
        machine.close()
    log = out.getvalue().decode(errors="replace")
    assert reached, log[-3000:]
    for line in ("Machine model: hv virt", "psci: PSCIv1.0 detected", "GICv3: CPU0: found redistributor 0",
                 "arch_timer: cp15 timer(s) running", "ttyAMA0 at MMIO 0x9000000", "printk: console [ttyAMA0] enabled"):
        assert line in log, line
