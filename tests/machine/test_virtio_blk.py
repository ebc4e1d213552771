"""virtio-blk-pci end to end: a Python driver on the real buses and RAM, the blk fixture
guest on KVM and Unicorn, O_DIRECT, read-only enforcement, image locks, save/restore."""
from __future__ import annotations

import dataclasses

import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hv_backends import backend_class
from hv.block import BlockBackend, BlockError, BlockLockedError
from hv.config import parse_args
from hv.console import BufferSink
from hv.devconfig import DevConfigError, parse_device, parse_drive
from hv.devices.bus import Bus
from hv.devices.virtio_pci import (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_FEATURES_OK,
                                   STATUS_NEEDS_RESET, VirtioPciState)
from hv.machine.machine import Machine
from hv.machine.pci_wiring import PciSetup, build_pci
from hv.memory import GuestMemory, RegionSpec
from tests.helpers import FIXTURES, ROOT, blk_passes, requires_kvm, tool_marks, value
from tests.machine.conftest import (
    F_EVENT_IDX, F_INDIRECT, F_VERSION_1, RAM_BASE, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT,
    T_WRITE_ZEROES, Driver, blk_reference, make_image,
)


def build(tmp_path: Path, drive: str = "", device: str = "", machine: str = "q35", size: int = 1 << 20,
          image: Path | None = None, lock: bool = True) -> tuple[PciSetup, GuestMemory, Bus, Bus, Driver]:
    image = image if image is not None else make_image(tmp_path / "disk.img", size)
    memory = GuestMemory([RegionSpec(RAM_BASE[machine], 16 << 20)])
    pio, mmio = Bus("port"), Bus("mmio")
    drive_cfg = parse_drive(f"file={image},id=d0" + (f",{drive}" if drive else ""))
    device_cfg = parse_device("virtio-blk-pci,drive=d0,id=blk0,addr=3" + (f",{device}" if device else ""))
    setup = build_pci(machine, memory, pio, mmio, [drive_cfg], [device_cfg], lock_images=lock)
    return setup, memory, pio, mmio, Driver(setup, memory, pio, mmio, machine)


@pytest.fixture
def blk(tmp_path):
    setup, memory, pio, mmio, driver = build(tmp_path, drive="serial=SN-0042")
    driver.init()
    yield driver
    setup.close()
    memory.close()


def device_of(driver: Driver) -> Any:
    return driver.setup.slots[1].device


def test_identity_features_and_config(tmp_path):
    setup, memory, pio, mmio, d = build(tmp_path, size=3 << 20)
    try:
        assert d.cfg(0x00) == 0x1042_1AF4
        assert d.cfg(0x08) >> 8 == 0x010000 and d.cfg(0x08) & 0xFF == 1    # class, revision 1
        assert d.cfg(0x2C) == 0x1100_1AF4                                   # subsystem
        d.program_bar()
        offered = d.offered()
        for bit in (32, 2, 6, 9, 13, 14, 28, 29):
            assert offered >> bit & 1, bit
        assert not offered >> 5 & 1                                         # not read-only
        assert d.r(0x2000, 4) | d.r(0x2004, 4) << 32 == (3 << 20) // 512   # capacity
        assert d.r(0x2014, 4) == 512                                        # blk_size
        assert d.r(0x12, 2) == 1                                            # num_queues
    finally:
        setup.close()
        memory.close()


def test_features_without_version_1_are_refused(tmp_path):
    setup, memory, pio, mmio, d = build(tmp_path)
    try:
        d.program_bar()
        d.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        d.w(0x08, 4, 0)
        d.w(0x0C, 4, 1 << 9)
        d.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert not d.status & STATUS_FEATURES_OK
        d.w(0x08, 4, 1)
        d.w(0x0C, 4, 1 | 1 << 20)        # a feature never offered
        d.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert not d.status & STATUS_FEATURES_OK
    finally:
        setup.close()
        memory.close()


def test_write_read_flush_get_id(blk, tmp_path):
    data = bytes(range(256)) * 8
    status, _, used = blk.request(T_OUT, sector=5, out=data)
    assert (status, used) == (0, 1)
    status, got, used = blk.request(T_IN, sector=5, in_len=2048)
    assert (status, got, used) == (0, data, 2049)
    assert (tmp_path / "disk.img").read_bytes()[5 * 512:5 * 512 + 2048] == data
    assert blk.request(T_FLUSH)[0] == 0
    status, ident, used = blk.request(T_GET_ID, in_len=20)
    assert (status, ident, used) == (0, b"SN-0042".ljust(20, b"\0"), 21)


def test_dma_writes_are_dirty_tracked(blk):
    blk.request(T_OUT, sector=0, out=b"\x5a" * 4096)
    blk.memory.take_vmm_dirty()
    blk.request(T_IN, sector=0, in_len=4096)
    dirty = blk.memory.take_vmm_dirty()
    page = blk.data // 4096
    assert dirty[page >> 3] >> (page & 7) & 1                       # the data buffer
    used_page = blk.used // 4096
    assert dirty[used_page >> 3] >> (used_page & 7) & 1             # the used ring


def _flush_request(blk, head: int, status_at: int) -> None:
    """A two-descriptor FLUSH (header, status byte) at descriptors head, head + 1."""
    hdr = blk.scratch + 0x200 + 16 * head
    blk.memory.write(hdr, T_FLUSH.to_bytes(4, "little") + bytes(12))
    blk.memory.write(status_at, b"\xee")
    blk.put_desc(head, hdr, 16, 1, head + 1)
    blk.put_desc(head + 1, status_at, 1, 2, 0)
    blk.publish(head)


def test_a_kick_returns_all_its_requests_in_order_across_the_ring_end(blk):
    """Eight requests under one kick come back in order, each with its status, their used
    entries running over the end of the 16-entry used ring (push_all splits the write)."""
    for _ in range(11):                                    # used index to 11
        blk.request(T_FLUSH)
    statuses = [blk.scratch + 0x800 + i for i in range(8)]
    for i, status_at in enumerate(statuses):
        _flush_request(blk, 2 * i, status_at)
    blk.kick()
    assert blk.used_entries() == [(2 * i, 1) for i in range(8)]
    assert [blk.memory.read(at, 1)[0] for at in statuses] == [0] * 8
    assert blk.memory.read_int(blk.used + 2, 2) == 19
    assert device_of(blk).s.status & STATUS_NEEDS_RESET == 0


def test_requests_before_a_malformed_chain_are_still_returned(blk):
    """A chain pointing outside RAM stops the queue (needs reset), and the requests served
    before it under the same kick are still returned to the driver."""
    good = blk.scratch + 0x900
    _flush_request(blk, 0, good)
    blk.put_desc(2, 0xFFFF_0000_0000, 16, 0, 0)            # a buffer outside guest RAM
    blk.publish(2)
    blk.kick()
    assert blk.used_entries() == [(0, 1)]
    assert blk.memory.read(good, 1) == b"\0"
    assert device_of(blk).s.status & STATUS_NEEDS_RESET


def test_push_all_refuses_more_than_a_ring(blk):
    from hv.devices.virtqueue import VirtqueueError
    queue = device_of(blk).queues[0]
    used_before = blk.memory.read(blk.used, 4 + 8 * blk.QSIZE)
    with pytest.raises(VirtqueueError, match="17 used entries at once for a 16-entry ring"):
        queue.push_all([(0, 1)] * 17)
    assert blk.memory.read(blk.used, 4 + 8 * blk.QSIZE) == used_before


def test_bad_requests_get_ioerr_or_unsupp(blk):
    capacity = (1 << 20) // 512
    assert blk.request(T_IN, sector=capacity, in_len=512)[0] == 1       # past the end
    assert blk.request(T_IN, sector=capacity - 1, in_len=1024)[0] == 1  # crosses the end
    assert blk.request(T_OUT, sector=1 << 62, out=b"x" * 512)[0] == 1   # huge sector
    assert blk.request(T_OUT, sector=0, out=b"x" * 100)[0] == 1         # not whole sectors
    assert blk.request(99, in_len=512)[0] == 2                          # unsupported type
    assert device_of(blk).s.status & STATUS_NEEDS_RESET == 0


def test_discard_and_write_zeroes(blk, tmp_path):
    blk.request(T_OUT, sector=0, out=b"\xab" * 8192)
    seg = (2).to_bytes(8, "little") + (4).to_bytes(4, "little") + (0).to_bytes(4, "little")
    assert blk.request(T_DISCARD, out=seg)[0] == 0
    seg = (10).to_bytes(8, "little") + (2).to_bytes(4, "little") + (1).to_bytes(4, "little")
    assert blk.request(T_WRITE_ZEROES, out=seg)[0] == 0
    image = (tmp_path / "disk.img").read_bytes()
    assert image[:1024] == b"\xab" * 1024
    assert image[1024:3072] == bytes(2048)
    assert image[3072:5120] == b"\xab" * 2048
    assert image[5120:6144] == bytes(1024)
    bad = (2047).to_bytes(8, "little") + (4).to_bytes(4, "little") + bytes(4)
    assert blk.request(T_DISCARD, out=bad)[0] == 1


def test_readonly_drive_refuses_writes_with_ioerr(tmp_path):
    image = make_image(tmp_path / "ro.img", fill=b"\x11" * (1 << 20))
    setup, memory, pio, mmio, d = build(tmp_path, drive="readonly=on", image=image)
    try:
        d.init()
        assert d.offered() >> 5 & 1                       # VIRTIO_BLK_F_RO
        assert d.request(T_OUT, sector=0, out=b"\x22" * 512)[0] == 1
        seg = (0).to_bytes(8, "little") + (1).to_bytes(4, "little") + bytes(4)
        assert d.request(T_WRITE_ZEROES, out=seg)[0] == 1
        assert d.request(T_IN, sector=0, in_len=512) == (0, b"\x11" * 512, 513)
        assert image.read_bytes() == b"\x11" * (1 << 20)
    finally:
        setup.close()
        memory.close()


def direct_io_supported(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    except OSError:
        return False
    os.close(fd)
    return True


def test_direct_io_unaligned_requests(tmp_path):
    image = make_image(tmp_path / "direct.img", 1 << 20)
    if not direct_io_supported(image):
        pytest.fail(f"O_DIRECT is not supported on {tmp_path}")
    setup, memory, pio, mmio, d = build(tmp_path, drive="direct=on", image=image)
    try:
        assert setup.blocks["d0"].direct
        d.init()
        payload = os.urandom(3 * 512)
        assert d.request(T_OUT, sector=7, out=payload)[0] == 0      # not 4 KiB aligned: read-modify-write
        assert d.request(T_IN, sector=7, in_len=3 * 512)[1] == payload
        big = os.urandom(1 << 19)
        assert d.request(T_OUT, sector=1, out=big)[0] == 0
        assert d.request(T_IN, sector=1, in_len=1 << 19)[1] == big
        raw = image.read_bytes()
        assert raw[512:512 + (1 << 19)] == big and raw[:512] == bytes(512)
    finally:
        setup.close()
        memory.close()


def test_direct_io_needs_aligned_image_size(tmp_path):
    image = make_image(tmp_path / "odd.img", 4096 + 512)
    with pytest.raises(DevConfigError, match="multiple of 4096"):
        build(tmp_path, drive="direct=on", image=image)


def test_block_backend_direct_uses_o_direct(tmp_path):
    image = make_image(tmp_path / "d.img", 8 << 20)
    block = BlockBackend(image, direct=True)
    try:
        flags = int(Path(f"/proc/self/fdinfo/{block.fd}").read_text().split("flags:")[1].split()[0], 8)
        assert flags & os.O_DIRECT
        block.write(100, b"hello")
        assert block.read(98, 9) == b"\0\0hello\0\0"
        big = os.urandom(3 * (1 << 20) + 777)          # spans several bounce buffers, unaligned ends
        block.write(4096 * 3 + 1000, big)
        assert block.read(4096 * 3 + 1000, len(big)) == big
        buf = bytearray(len(big) + 24)
        block.read_into(4096 * 3 + 1000 - 24, memoryview(buf))
        assert bytes(buf) == bytes(24) + big
        block.write_zeroes(4096 * 3 + 1000, 1 << 20)
        assert block.read(4096 * 3 + 1000, 1 << 20) == bytes(1 << 20)
        with pytest.raises(BlockError, match="beyond the image"):
            block.read((8 << 20) - 10, 11)
    finally:
        block.close()


def test_image_lock_conflicts(tmp_path):
    image = make_image(tmp_path / "shared.img")
    first = BlockBackend(image)
    try:
        with pytest.raises(BlockLockedError, match="in use by another VM"):
            BlockBackend(image)
        with pytest.raises(BlockLockedError):
            BlockBackend(image, readonly=True)
        # The wiring reports it as a configuration error naming the drive.
        with pytest.raises(DevConfigError, match="-drive id=d0: .*in use by another VM"):
            build(tmp_path, image=image)
        # Migration hand-over: the destination opens unlocked, locks after the source releases.
        dest = BlockBackend(image, lock=False)
        with pytest.raises(BlockLockedError):
            dest.acquire()
        first.release()
        dest.acquire()
        with pytest.raises(BlockLockedError):
            first.acquire()
        dest.close()
        first.acquire()
    finally:
        first.close()


def test_readers_share_an_image(tmp_path):
    image = make_image(tmp_path / "ro.img")
    a = BlockBackend(image, readonly=True)
    b = BlockBackend(image, readonly=True)
    try:
        with pytest.raises(BlockLockedError):
            BlockBackend(image)
        with pytest.raises(BlockError, match="read-only"):
            a.write(0, b"x")
    finally:
        a.close()
        b.close()


def test_lock_conflict_across_processes(tmp_path):
    image = make_image(tmp_path / "p.img")
    holder = BlockBackend(image)
    try:
        code = ("import sys; from hv.block import BlockBackend, BlockLockedError\n"
                "try:\n    BlockBackend(sys.argv[1])\nexcept BlockLockedError:\n    sys.exit(3)\n")
        result = subprocess.run([os.sys.executable, "-c", code, str(image)], cwd=ROOT)
        assert result.returncode == 3
    finally:
        holder.close()


def test_save_restore_continues_the_queue(blk, tmp_path):
    blk.request(T_OUT, sector=0, out=b"A" * 512)
    dev = device_of(blk)
    saved = dev.save()
    raw = saved.to_dict()
    restored = VirtioPciState.from_dict(raw)
    assert restored == saved
    # A second machine with the same configuration and the same RAM picks up the queue.
    setup2, memory2, pio2, mmio2, d2 = build(tmp_path, image=tmp_path / "disk.img", lock=False)
    try:
        for region, region2 in zip(blk.memory.regions, memory2.regions):
            region2.view[:] = region.view
        setup2.slots[1].device.restore(restored)
        d2.avail_idx, d2.used_seen = blk.avail_idx, blk.used_seen
        assert d2.request(T_IN, sector=0, in_len=512)[:2] == (0, b"A" * 512)
        assert setup2.slots[1].device.save().queues[0]["used_idx"] == 2
    finally:
        setup2.close()
        memory2.close()
    # Power-on state resets everything (system_reset uses state_type()).
    dev.restore(VirtioPciState())
    assert blk.cfg(0x04, 2) == 0 and blk.cfg(0x20) == 0xC       # decoding off, BAR unassigned
    assert blk.status == 0xFF                                   # nothing answers at the old address
    blk.program_bar()
    assert blk.status == 0 and blk.r(0x1C, 2) == 0


def test_state_from_dict_rejects_garbage(blk):
    good = device_of(blk).save().to_dict()
    for key, bad in (("status", 256), ("status", "x"), ("queues", [{}]), ("config", "zz"), ("isr", True)):
        raw = dict(good, **{key: bad})
        with pytest.raises(Exception) as info:
            VirtioPciState.from_dict(raw)
        assert type(info.value).__name__ == "DeviceStateError"
    with pytest.raises(Exception):
        VirtioPciState.from_dict({"status": 0})


def test_reset_clears_queue(blk):
    blk.request(T_FLUSH)
    blk.w(0x14, 1, 0)
    assert blk.status == 0
    blk.w(0x16, 2, 0)
    assert blk.r(0x1C, 2) == 0 and blk.r(0x18, 2) == 256


# -- the fixture guest on real backends ------------------------------------------------------

def PciMachine(config: Any, backend: Any, console: Any, drives: list, devices: list,
               lock_images: bool = True) -> Machine:
    """A Machine with these drives and devices, wired as the launcher does.

    ``lock_images=False`` builds it as a live-migration destination would (images opened
    unlocked, locks taken over at the switch-over).
    """
    config = dataclasses.replace(config, drives=tuple(drives), devices=tuple(devices),
                                 incoming=None if lock_images else "unix:/nonexistent/switch-over")
    return Machine(config, backend, console)


def run_guest(tmp_path: Path, machine_type: str, accel: str, append: str, drive: str = "",
              addr: str = "3", timeout: float = 120, image_size: int = 4 << 20) -> tuple[str, Path, list]:
    arch = {"q35": "x86_64", "virt": "aarch64"}[machine_type]
    image = tmp_path / f"{machine_type}-{accel}.img"
    if not image.exists():
        make_image(image, image_size)
    config = parse_args(["-machine", machine_type, "-m", "64", "-kernel", str(FIXTURES / arch / "blk.elf"),
                         "-append", append]).config
    console = BufferSink()
    drives = [parse_drive(f"file={image},id=disk,serial=hv-{accel}" + (f",{drive}" if drive else ""))]
    devices = [parse_device(f"virtio-blk-pci,drive=disk,id=vblk,bus=pcie.0,addr={addr}")]
    machine = PciMachine(config, backend_class(accel)(), console, drives, devices)
    stamps: list = []
    original = console.write

    def stamped(data: bytes) -> None:
        original(data)
        if b"\n" in data:
            stamps.append((time.perf_counter(), console.getvalue().count(b"\n")))

    console.write = stamped  # type: ignore[method-assign]
    try:
        machine.load_kernel(config.kernel.read_bytes())
        machine.start()
        assert machine.wait_shutdown(timeout) == "guest-shutdown", console.getvalue()[-500:]
    finally:
        machine.close()
    return console.getvalue().decode(), image, stamps


GUESTS = [
    pytest.param("q35", "kvm", marks=requires_kvm, id="x86_64-kvm"),
    pytest.param("q35", "unicorn", id="x86_64-unicorn"),
    pytest.param("virt", "unicorn", id="aarch64-unicorn"),
]


@pytest.mark.parametrize("machine_type,accel", GUESTS)
def test_blk_guest_matches_reference(tmp_path, machine_type, accel):
    output, image, _ = run_guest(tmp_path, machine_type, accel, "sectors=64 iterations=3 chunk=8 depth=4")
    assert output.splitlines() == blk_reference(64, 3, 8, 4, f"hv-{accel}")
    raw = image.read_bytes()
    expected = b"".join(value(3, i).to_bytes(8, "little") for i in range(64 * 64))
    assert raw[:len(expected)] == expected and raw[len(expected):] == bytes(len(raw) - len(expected))


@pytest.mark.parametrize("machine_type,accel", GUESTS)
def test_blk_guest_on_readonly_drive_sees_ioerr(tmp_path, machine_type, accel):
    output, image, _ = run_guest(tmp_path, machine_type, accel, "sectors=16 iterations=1 chunk=8 depth=1",
                                 drive="readonly=on", addr="1f")
    lines = output.splitlines()
    assert lines[1] == "blk: msix"
    assert lines[2] == f"blk: device 00:1f.0 capacity 8192 id hv-{accel}"
    assert lines[3] == "blk: io error type 1 sector 0 status 1"
    assert lines[4].startswith("blk pass 1 sum ") and lines[4].endswith(f" bad {16 * 64}")
    assert image.read_bytes() == bytes(4 << 20)


MOVES = [
    pytest.param("q35", ["kvm", "unicorn", "kvm"], marks=requires_kvm, id="x86_64-kvm-unicorn-kvm"),
    pytest.param("q35", ["unicorn", "kvm", "unicorn"], marks=requires_kvm, id="x86_64-unicorn-kvm-unicorn"),
    pytest.param("virt", ["unicorn", "unicorn", "unicorn"], id="aarch64-unicorn"),
]


@pytest.mark.parametrize("machine_type,accels", MOVES)
def test_blk_guest_moves_between_backends_mid_io(tmp_path, machine_type, accels):
    """Pause anywhere, save through plain values, restore on another backend with the image
    lock handed over: the guest's output and the image equal an unmoved run's. The guest is
    held (``hold=1 iterations=0``: it does passes until a byte arrives on its serial input),
    so however loaded the host it is still doing I/O at every hop; the test types that byte
    on the last machine."""
    from hv.machine.machine import MachineSnapshot
    from hv.machine.move import copy_ram

    arch = {"q35": "x86_64", "virt": "aarch64"}[machine_type]
    image = make_image(tmp_path / "move.img", 4 << 20)
    config = parse_args(["-machine", machine_type, "-m", "64", "-kernel", str(FIXTURES / arch / "blk.elf"),
                         "-append", "sectors=128 iterations=0 chunk=8 depth=4 hold=1"]).config
    drives = [parse_drive(f"file={image},id=disk,serial=mover")]
    devices = [parse_device("virtio-blk-pci,drive=disk,id=vblk,addr=3")]
    console = BufferSink()

    def wait_passes(count: int) -> None:
        deadline = time.monotonic() + 60
        while len(blk_passes(console.getvalue().decode())) < count:
            assert time.monotonic() < deadline, console.getvalue()[-300:]
            time.sleep(0.001)

    machine = PciMachine(config, backend_class(accels[0])(), console, drives, devices)
    machine.load_kernel(config.kernel.read_bytes())
    machine.start()
    try:
        for hop, accel in enumerate(accels[1:]):
            wait_passes(8 * (hop + 1))
            assert machine.pause()
            snapshot = MachineSnapshot.from_dict(machine.save().to_dict())
            fresh = PciMachine(config, backend_class(accel)(), console, drives, devices, lock_images=False)
            copy_ram(machine.memory, fresh.memory)
            fresh.restore(snapshot)
            machine.close()                 # releases the image lock ...
            fresh.pci.acquire_locks()       # ... which the destination takes over
            fresh.kernel_image = machine.kernel_image
            machine = fresh
            machine.start()
        wait_passes(len(blk_passes(console.getvalue().decode())) + 1)  # a whole pass on the last machine
        assert machine.console_input(b"x") == 1
        assert machine.wait_shutdown(120) == "guest-shutdown"
    finally:
        machine.close()
    lines = console.getvalue().decode().splitlines()
    passes = len(blk_passes(console.getvalue().decode()))
    assert lines[0] == "blk: sectors=128 iterations=0 chunk=8 depth=4", lines[0]
    assert lines[1:] == blk_reference(128, passes, 8, 4, "mover")[1:]
    raw = image.read_bytes()
    pattern = b"".join(value(passes, i).to_bytes(8, "little") for i in range(128 * 64))
    assert raw[:len(pattern)] == pattern


@pytest.mark.parametrize("arch", [pytest.param(arch, marks=tool_marks(f"qemu-system-{arch}"), id=arch)
                                  for arch in ("x86_64", "aarch64")])
def test_blk_guest_on_qemu_matches_reference(tmp_path, arch):
    """The reference machine: the same binary against QEMU's virtio-blk-pci (modern only).
    QEMU's virt puts ECAM at 0x3F000000 only with highmem=off (else above 4 GiB)."""
    binary = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}[arch]
    image = make_image(tmp_path / "qemu.img", 4 << 20)
    machine = ["-M", "q35"] if arch == "x86_64" else ["-M", "virt,highmem=off", "-cpu", "cortex-a57"]
    result = subprocess.run([binary, *machine, "-m", "128M", "-display", "none", "-serial", "stdio", "-monitor",
                             "none", "-nodefaults", "-no-reboot", "-kernel", str(FIXTURES / arch / "blk.elf"),
                             "-append", "sectors=64 iterations=3 chunk=8 depth=4",
                             "-drive", f"file={image},if=none,id=d0,format=raw",
                             "-device", "virtio-blk-pci,drive=d0,addr=3,disable-legacy=on,serial=hv-qemu"],
                            capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    # QEMU's virt has a GICv2m only with a GICv2, whose CPU interface the guest does not
    # drive: it polls there. On q35 it takes MSI-X (table in QEMU's BAR1).
    mode = "msix" if arch == "x86_64" else "polling"
    assert result.stdout.decode().splitlines() == blk_reference(64, 3, 8, 4, "hv-qemu", mode=mode)


def test_intx_disable_lowers_and_enable_reraises_the_line_at_once(tmp_path):
    """PCI command bit 10 gates INTx immediately, not at the next interrupt."""
    setup, memory, pio, mmio, d = build(tmp_path)
    try:
        d.init()
        dev = device_of(d)
        assert d.request(T_FLUSH)[0] == 0
        assert dev.intx.level                          # ISR bit 0 set, INTx asserted
        command = d.cfg(0x04, 2)
        d.cfg_write(0x04, 2, command | 0x400)
        assert not dev.intx.level and dev.s.isr == 1   # masked, the interrupt stays pending
        d.cfg_write(0x04, 2, command)
        assert dev.intx.level                          # unmasked: asserted again
        assert d.r(0x1000, 1) == 1 and not dev.intx.level
    finally:
        setup.close()
        memory.close()


def test_indirect_event_idx_and_interrupt_state(tmp_path):
    setup, memory, pio, mmio, d = build(tmp_path)
    try:
        d.init(features=F_VERSION_1 | F_INDIRECT | F_EVENT_IDX)
        dev = device_of(d)
        sink = dev.msix.sink
        memory.write(d.data, b"\x77" * 1024)
        assert d.request(T_OUT, sector=2, out=b"\x77" * 1024)[0] == 0
        # No MSI-X: a used buffer raises ISR bit 0 (queue); reading ISR clears it.
        assert dev.intx.level
        assert d.r(0x1000, 1) == 1 and d.r(0x1000, 1) == 0 and not dev.intx.level
        # Event index: avail_event follows the device, used_event suppresses interrupts.
        assert memory.read_int(d.used + 4 + 8 * d.QSIZE, 2) == d.avail_idx
        memory.write_int(d.avail + 4 + 2 * d.QSIZE, 2, d.avail_idx + 5)
        assert d.request(T_FLUSH)[0] == 0
        assert d.r(0x1000, 1) == 0
        # An IN request through an indirect table.
        table = d.scratch + 0x400
        hdr, status = d.scratch, d.scratch + 0x100
        memory.write(hdr, T_IN.to_bytes(4, "little") + bytes(4) + (2).to_bytes(8, "little"))
        d.put_desc(0, hdr, 16, 1, 1, table=table)
        d.put_desc(1, d.data + 0x1000, 1024, 3, 2, table=table)
        d.put_desc(2, status, 1, 2, 0, table=table)
        d.put_desc(5, table, 48, 4, 0)
        d.publish(5)
        d.kick()
        assert d.used_entries() == [(5, 1025)]
        assert memory.read(d.data + 0x1000, 1024) == b"\x77" * 1024 and memory.read(status, 1) == b"\0"
        # MSI-X: enable, route queue 0 to vector 1; masked -> pending bit, unmasked -> message.
        cap = dev.msix.cap
        d.cfg_write(cap + 2, 2, 0x8000)
        d.w(0x16, 2, 0)
        d.w(0x1A, 2, 1)                       # queue vector (read-only once enabled)
        assert d.r(0x1A, 2) == 0xFFFF         # queue already enabled: vector stays NO_VECTOR
        d.w(0x14, 1, 0)                       # reset, then set up again with vector 1 for queue 0
        d.used_seen = d.avail_idx = 0
        d.init(features=F_VERSION_1, queue_vector=1)
        d.w(0x16, 2, 0)
        assert d.r(0x1A, 2) == 1
        d.w(0x10, 2, 0)                       # config vector 0
        assert d.r(0x10, 2) == 0
        d.w(0x10, 2, 7)                       # no such vector: NO_VECTOR
        assert d.r(0x10, 2) == 0xFFFF
        d.w(0x3800 + 16, 4, 0xFEE0_1000)
        d.w(0x3800 + 24, 4, 0x31)
        assert d.request(T_FLUSH)[0] == 0
        assert d.r(0x3C00, 8) == 0b10 and sink.sent == []
        d.w(0x3800 + 28, 4, 0)               # unmask vector 1
        assert sink.sent == [(0xFEE0_1000, 0x31)] and d.r(0x3C00, 8) == 0
        assert d.request(T_FLUSH)[0] == 0
        assert sink.sent[-1] == (0xFEE0_1000, 0x31) and len(sink.sent) == 2
        assert d.r(0x1000, 1) == 0           # with MSI-X the ISR stays clear
        saved = dev.save()
        assert saved.msix_pba == 0 and saved.queues[0]["msix_vector"] == 1
    finally:
        setup.close()
        memory.close()


@pytest.mark.parametrize("machine_type,accel", GUESTS)
def test_system_reset_mid_run_restarts_the_driver(tmp_path, machine_type, accel):
    """Machine.system_reset() restores every PCI device to its power-on state (BARs off,
    queues gone); the rebooted guest enumerates, programs and drives the device again."""
    arch = {"q35": "x86_64", "virt": "aarch64"}[machine_type]
    image = make_image(tmp_path / "reset.img", 4 << 20)
    config = parse_args(["-machine", machine_type, "-m", "64", "-kernel", str(FIXTURES / arch / "blk.elf"),
                         "-append", "sectors=32 iterations=0 chunk=8 depth=2"]).config
    console = BufferSink()
    machine = PciMachine(config, backend_class(accel)(), console,
                         [parse_drive(f"file={image},id=disk,serial=rst")],
                         [parse_device("virtio-blk-pci,drive=disk,id=vblk,addr=5")])
    machine.load_kernel(config.kernel.read_bytes())
    machine.start()
    try:
        deadline = time.monotonic() + 60
        while console.getvalue().count(b"\n") < 5:
            assert time.monotonic() < deadline
            time.sleep(0.001)
        machine.system_reset()
        header = "blk: sectors=32 iterations=0 chunk=8 depth=2"
        # The reset may cut a line short: the new header then follows it on the same line.
        while True:                           # seven complete lines after the second header
            text = console.getvalue().decode()
            if text.count(header) >= 2:
                lines = text[text.rindex(header):].splitlines()
                if len(lines) > 7:
                    break
            assert time.monotonic() < deadline, console.getvalue()[-300:]
            time.sleep(0.001)
        machine.pause()
    finally:
        machine.close()
    expected = blk_reference(32, 3, 8, 2, "rst", slot=5)[:-1]
    expected[0] = header
    assert lines[:6] == expected
