"""q35 RAM above 4 GiB: the split layout, the guest's memory maps and RAM that survives
snapshots and live migration.

Beyond 2816 MiB (the most that fits below the ECAM at 0xB0000000) q35 RAM is 2 GiB from
0 plus the rest from 4 GiB (hv/boards/q35/layout.py). The tests check the memory maps a
guest is given (E820 for bzImage, the PVH memmap, the multiboot map), then run the dirty
fixture with ``-m 6G`` on real backends and move it -- file snapshot and live migration
over a real socket pair -- with a pattern the test wrote above 4 GiB through
:class:`~hv.memory.GuestMemory` read back on the destination.
"""
from __future__ import annotations

import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from hv_backends import backend_class
from hv.boards.q35 import layout as q35
from hv.boot import e820 as e820lib
from hv.boot import load_kernel
from hv.boot import x86_linux as xl
from hv.config import parse_args
from hv.console import BufferSink
from hv.machine import Machine, ram_layout
from hv.memory import PAGE_SIZE, GuestMemory
from hv.migration.engine import CHUNK_PAGES, MigrationParameters, OutgoingMigration, save_snapshot
from hv.migration.incoming import load_snapshot
from hv.migration.stream_format import ConfigMismatchError
from tests.helpers import FIXTURES, X86_BACKENDS, dirty_reference, migration_status_for, receive_in_thread, requires_kvm
from tests.boot.kernels import make_bzimage, make_pvh

MIB = 1 << 20
GIB = 1 << 30
HIGH_GPA = 0x1_4000_0000            # 5 GiB: inside the high region of a 6 GiB guest
DIRTY = FIXTURES / "x86_64" / "dirty.elf"
HOLE_MAP_6G = [                     # (addr, size, type) of the 6 GiB guest's map
    (0, 0x9FC00, e820lib.E820_RAM),
    (0x9FC00, 0x400, e820lib.E820_RESERVED),
    (0xA0000, 0x60000, e820lib.E820_RESERVED),
    (0x100000, 2 * GIB - MIB, e820lib.E820_RAM),
    (0xB000_0000, 256 * MIB, e820lib.E820_RESERVED),
    (4 * GIB, 4 * GIB, e820lib.E820_RAM),
]


@pytest.fixture
def mem6g() -> Iterator[GuestMemory]:
    config = parse_args(["-machine", "q35", "-m", "6G", "-kernel", str(DIRTY)]).config
    memory = GuestMemory(ram_layout(config))
    yield memory
    memory.close()


def test_machine_layout_splits_only_beyond_2816_mib() -> None:
    def layout(size: str) -> list[tuple[int, int]]:
        config = parse_args(["-machine", "q35", "-m", size, "-kernel", str(DIRTY)]).config
        return [(r.gpa, r.size) for r in ram_layout(config)]

    assert layout("2816") == [(0, 0xB000_0000)]          # as before: one region up to the ECAM
    assert layout("6G") == [(0, 2 * GIB), (4 * GIB, 4 * GIB)]
    assert q35.ram_end(6 * GIB) == 8 * GIB and q35.ram_end(256 * MIB) == 256 * MIB
    for size in ("3G", "6G", "64G"):                      # never inside the hole's windows
        for gpa, length in layout(size):
            assert gpa + length <= q35.ECAM_BASE or gpa >= q35.HIGH_RAM_BASE
    # The RAM passes of migrations and snapshots send CHUNK_PAGES runs from page 0, which
    # must not straddle the region boundary: the split is a multiple of a run.
    assert q35.LOW_RAM_SPLIT % (CHUNK_PAGES * PAGE_SIZE) == 0


def test_e820_shows_the_pci_hole(mem6g: GuestMemory) -> None:
    entries = e820lib.build_e820((r.gpa, r.size) for r in mem6g.regions)
    assert [(e.addr, e.size, e.type) for e in entries] == HOLE_MAP_6G
    assert not e820lib.ram_covers(entries, 2 * GIB, 1) and not e820lib.ram_covers(entries, 4 * GIB - 1, 1)
    assert e820lib.ram_covers(entries, HIGH_GPA, 4096)


def test_bzimage_zero_page_has_the_high_ram_and_the_initrd_stays_low(mem6g: GuestMemory) -> None:
    initrd = b"hv-initrd" * 500
    load_kernel("x86_64", mem6g, make_bzimage(), "console=ttyS0", initrd=initrd, rsdp_addr=0xF0000)
    count = mem6g.read(xl.ZERO_PAGE_GPA + 0x1E8, 1)[0]
    table = [struct.unpack_from("<QQI", mem6g.read(xl.ZERO_PAGE_GPA + 0x2D0 + 20 * i, 20)) for i in range(count)]
    assert table == HOLE_MAP_6G
    image = struct.unpack("<I", mem6g.read(xl.ZERO_PAGE_GPA + 0x218, 4))[0]
    assert image + len(initrd) <= 2 * GIB and image + len(initrd) > 2 * GIB - 4096   # top of low RAM
    assert mem6g.read(image, len(initrd)) == initrd


def test_pvh_memmap_has_the_high_ram(mem6g: GuestMemory) -> None:
    load_kernel("x86_64", mem6g, make_pvh(), "console=ttyS0", initrd=b"x" * 4096, rsdp_addr=0xF0000)
    info = xl.START_INFO.unpack(mem6g.read(xl.START_INFO_GPA, xl.START_INFO.size))
    memmap, entries = info[7], info[8]
    table = [struct.unpack_from("<QQII", mem6g.read(memmap + 24 * i, 24)) for i in range(entries)]
    assert table == [(addr, size, kind, 0) for addr, size, kind in HOLE_MAP_6G]


def test_multiboot_map_lists_both_regions(mem6g: GuestMemory) -> None:
    load_kernel("x86_64", mem6g, DIRTY.read_bytes(), "mib=4", image_name="dirty.elf")
    flags, mem_lower, mem_upper = struct.unpack("<III", mem6g.read(q35.MB_INFO_GPA, 12))
    assert flags & 0x41 == 0x41 and (mem_lower, mem_upper) == (640, (2 * GIB - MIB) // 1024)
    length, addr = struct.unpack("<II", mem6g.read(q35.MB_INFO_GPA + 44, 8))
    entries = [struct.unpack_from("<IQQI", mem6g.read(addr + off, 24)) for off in range(0, length, 24)]
    assert entries == [(20, 0, 2 * GIB, 1), (20, 4 * GIB, 4 * GIB, 1)]


# -- the dirty fixture with 6 GiB, moved with a pattern above 4 GiB -----------------------------

def build(accel: str, append: str, memory: str = "6G") -> tuple[Machine, BufferSink]:
    config = parse_args(["-machine", "q35", "-m", memory, "-kernel", str(DIRTY), "-append", append]).config
    console = BufferSink()
    machine = Machine(config, backend_class(accel)(), console)
    return machine, console


def wait_text(console: BufferSink, needle: bytes, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while needle not in console.getvalue():
        assert time.monotonic() < deadline, console.getvalue()[-400:]
        time.sleep(0.01)


def pattern(seed: int) -> bytes:
    return bytes((seed + 7 * i) & 0xFF for i in range(3 * 4096))


def start_source(accel: str) -> tuple[Machine, BufferSink]:
    """The dirty fixture running on ``accel`` with 6 GiB, after its first pass, with a
    pattern at 5 GiB (and one at the last page of RAM) the guest never touches."""
    source, console = build(accel, "mib=8 iterations=0")
    source.load_kernel(DIRTY.read_bytes())
    source.memory.write(HIGH_GPA, pattern(1))
    source.memory.write(8 * GIB - 4096, b"end of high RAM".ljust(4096, b"."))
    source.start()
    wait_text(console, b"pass 1 ")
    return source, console


def pass_lines(text: bytes) -> list[str]:
    """The complete ``pass N ...`` lines of the dirty fixture's output."""
    complete = text[:text.rfind(b"\n") + 1].decode()
    return [line for line in complete.splitlines() if line.startswith("pass ")]


def finish_on(target: Machine, target_console: BufferSink, source_console: BufferSink) -> None:
    """The patterns arrived; the guest goes on on the target for two more passes, and
    the pass lines of both halves run on without a gap, repeat or bad word."""
    assert target.memory.read(HIGH_GPA, len(pattern(1))) == pattern(1)
    assert target.memory.read(8 * GIB - 4096, 15) == b"end of high RAM"
    target.resume()
    source_text = source_console.getvalue()
    wanted = len(pass_lines(source_text)) + 2
    deadline = time.monotonic() + 120
    while len(pass_lines(source_text + target_console.getvalue())) < wanted:
        assert time.monotonic() < deadline, target_console.getvalue()[-400:]
        time.sleep(0.01)
    lines = pass_lines(source_text + target_console.getvalue())
    # The guest checks every word against the previous pass ("bad 0": its buffer moved
    # intact); numbers must run on without a gap or repeat. The reference sums cost a
    # Python pass each, so only the first three are recomputed (a KVM guest makes many).
    assert source_text.startswith(b"dirty: mib=8 iterations=0\n")
    assert [line.split()[1] for line in lines] == [str(n) for n in range(1, len(lines) + 1)], lines
    assert all(line.endswith(" bad 0") for line in lines), lines
    assert tuple(lines[:3]) == dirty_reference(8, 3)[1:1 + min(3, len(lines))]


@pytest.mark.parametrize("first,second", [
    pytest.param("unicorn", "unicorn", id="unicorn"),
    pytest.param("kvm", "kvm", marks=requires_kvm, id="kvm"),
    pytest.param("kvm", "unicorn", marks=requires_kvm, id="kvm-to-unicorn"),
])
def test_file_snapshot_round_trips_ram_above_4_gib(tmp_path: Path, first: str, second: str) -> None:
    source, console = start_source(first)
    try:
        save_snapshot(source, str(tmp_path), migration_status_for(source))
    finally:
        source.close()
    smaller, _ = build(second, "mib=8 iterations=0", memory="2816")   # the largest one-region q35
    try:
        with pytest.raises(ConfigMismatchError, match="memory size mismatch: source 6144 MiB, destination 2816 MiB"):
            load_snapshot(smaller, str(tmp_path), migration_status_for(smaller))
        assert not any(smaller.memory.take_vmm_dirty())                 # refused: RAM untouched
    finally:
        smaller.close()
    target, target_console = build(second, "mib=8 iterations=0")
    try:
        load_snapshot(target, str(tmp_path), migration_status_for(target))
        target.start(paused=True)
        finish_on(target, target_console, console)
    finally:
        target.close()


@pytest.mark.parametrize("accel", X86_BACKENDS)
def test_live_migration_carries_ram_above_4_gib(accel: str) -> None:
    """Over a real socket pair; a second pattern written above 4 GiB while the RAM passes
    run must arrive too (VMM writes are dirty-tracked in the high region's pages)."""
    source, console = start_source(accel)
    target, target_console = build(accel, "mib=8 iterations=0")
    out_sock, in_sock = socket.socketpair()
    receiver, errors = receive_in_thread(target, in_sock, migration_status_for(target))
    try:
        # Three dirty rounds at most: a guest rewriting its buffer at KVM speed would
        # otherwise be throttled for many rounds before it converges.
        params = MigrationParameters(max_iterations=3)
        outgoing = OutgoingMigration(source, migration_status_for(source), params, out_sock,
                                     lambda *_args: None)
        outgoing.start()
        source.memory.write(HIGH_GPA + 3 * 4096, pattern(2))
        outgoing.thread.join(timeout=180)
        receiver.join(timeout=180)
        assert not outgoing.thread.is_alive() and not receiver.is_alive()
        assert not errors, errors
        assert target.memory.read(HIGH_GPA + 3 * 4096, len(pattern(2))) == pattern(2)
        finish_on(target, target_console, console)
    finally:
        source.close()
        target.close()
        out_sock.close()
        in_sock.close()
