"""The native virtio-blk request path (``hv_native_virtio.c``) against the Python one.

Each test drives the same program of requests -- reads and writes of many shapes, the
requests the native code leaves to Python (flush, identify, discard, past the end, a
read-only disk, unknown types), batches across the ring's end, indirect tables, event
index, and malformed chains -- through a real virtio-blk-pci device on the machine's
buses, once with the native path and once with it switched off, and requires the same
result everywhere a guest or a migration could look: every byte of guest RAM, the disk
image, the dirty bitmap, the device's state. A native run that served nothing natively
would test nothing, so the counts are checked too. The last test runs a native read over
code a Unicorn vCPU had translated: the vCPU must run the new bytes.
"""
from __future__ import annotations

import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hv.devices.virtio_blk_native as blk_native
from hv.devices.virtio_pci import STATUS_NEEDS_RESET
from tests.machine.conftest import F_EVENT_IDX, F_INDIRECT, F_VERSION_1, T_DISCARD, T_FLUSH, T_GET_ID, T_IN, T_OUT
from tests.machine.test_virtio_blk import build, device_of

pytestmark = pytest.mark.skipif(blk_native._NATIVE is None, reason="the native module is not built "
                                "(pip install -e . builds it; needs gcc)")


def put_request(d: Any, head: int, kind: int, sector: int, readable: list[tuple[int, bytes]],
                writable: list[tuple[int, int]], status_at: int, table: int | None = None) -> None:
    """Descriptors head.. for a request: the header, ``readable`` (addr, bytes written there
    first), ``writable`` (addr, length) buffers, then the status byte; published."""
    hdr = d.scratch + 0x40 * (head % 32)
    d.memory.write(hdr, struct.pack("<IIQ", kind, 0, sector))
    d.memory.write(status_at, b"\xee")
    descs = [(hdr, 16, 0)]
    for addr, data in readable:
        d.memory.write(addr, data)
        descs.append((addr, len(data), 0))
    for addr, length in writable:
        d.memory.write(addr, b"\xcc" * length)
        descs.append((addr, length, 2))
    descs.append((status_at, 1, 2))
    base = 0 if table is not None else head
    for i, (addr, length, flags) in enumerate(descs):
        last = i == len(descs) - 1
        d.put_desc(base + i, addr, length, flags | (0 if last else 1), 0 if last else base + i + 1, table=table)
    if table is not None:
        d.put_desc(head, table, 16 * len(descs), 4, 0)
    d.publish(head)


def program(d: Any) -> list[Any]:
    """The requests, kick by kick; what the driver saw after each kick."""
    seen: list[Any] = []
    data, st = d.data, d.scratch + 0xF00
    pattern = bytes(range(256)) * 64                                 # 16 KiB

    def kick(*statuses: int) -> None:
        d.memory.take_vmm_dirty()        # the driver's own writes; then the device's alone
        d.kick()
        seen.append((d.used_entries(), [d.memory.read(st + i, 1) for i in statuses],
                     bytes(d.memory.take_vmm_dirty())))

    # single requests: writes and reads of 1-3 segments, odd splits, zero data
    put_request(d, 0, T_OUT, 3, [(data, pattern[:4096])], [], st)
    kick(0)
    put_request(d, 0, T_OUT, 11, [(data, pattern[:1000]), (data + 0x2000, pattern[1000:1536])], [], st)
    kick(0)
    put_request(d, 0, T_IN, 3, [], [(data + 0x4000, 4096 + 1)], st)      # 4097 bytes: IOERR (Python's)
    kick(0)
    put_request(d, 0, T_IN, 10, [], [(data + 0x6000, 700), (data + 0x7000, 836)], st)
    kick(0)
    put_request(d, 0, T_IN, 0, [], [], st)                                # no data at all
    kick(0)
    # what the native code leaves to Python, mixed into one kick with reads and writes
    # (each request on descriptors of its own: head .. head + buffers + 1)
    heads = [0, 2, 5, 8, 11, 14]
    put_request(d, 0, T_FLUSH, 0, [], [], st)
    put_request(d, 2, T_OUT, 20, [(data + 0x8000, pattern[:2048])], [], st + 1)
    put_request(d, 5, T_GET_ID, 0, [], [(data + 0x9000, 20)], st + 2)
    put_request(d, 8, T_IN, 8190, [], [(data + 0xA000, 2048)], st + 3)  # past the end: IOERR
    put_request(d, 11, T_IN, 0, [], [(data + 0xB000, 100)], st + 4)     # not whole sectors: IOERR
    put_request(d, 14, 99, 0, [], [], st + 5)                           # unknown type: UNSUPP
    kick(*range(6))
    assert [h for h, _ in seen[-1][0]] == heads
    put_request(d, 0, T_IN, 20, [], [(data + 0xD000, 2048)], st)
    kick(0)
    # five requests under one kick, their used entries running over the ring's end
    for i in range(5):
        put_request(d, 3 * i, T_OUT if i % 2 else T_IN, 40 + i,
                    [(data + 0x10000 + 0x1000 * i, pattern[:512])] if i % 2 else [],
                    [] if i % 2 else [(data + 0x10000 + 0x1000 * i, 1024)], st + i)
    kick(*range(5))
    put_request(d, 4, T_IN, 3, [], [(data + 0x20000, 2048), (data + 0x21000, 2048)], st, table=d.scratch + 0xC00)
    kick(0)
    put_request(d, 6, T_DISCARD, 0, [(data + 0x22000, struct.pack("<QII", 3, 8, 0))], [], st)
    kick(0)
    put_request(d, 0, T_IN, 3, [], [(data + 0x23000, 4096)], st)        # reads back the discard
    kick(0)
    # a good read, then a chain whose buffer lies outside RAM: the device needs a reset
    put_request(d, 0, T_IN, 20, [], [(data + 0x24000, 512)], st)
    d.put_desc(2, 0xFFFF_0000_0000, 16, 0, 0)
    d.publish(2)
    kick(0)
    return seen


def run(tmp_path: Path, native: bool, monkeypatch: pytest.MonkeyPatch, drive: str = "",
        drive_program: Callable[[Any], list[Any]] = program) -> dict[str, Any]:
    if not native:
        monkeypatch.setattr(blk_native, "_NATIVE", None)
    image = tmp_path / ("native.img" if native else "python.img")
    image.write_bytes(bytes(range(251)) * (4 * 1024 * 1024 // 251) + bytes(4 * 1024 * 1024 % 251))
    setup, memory, pio, mmio, d = build(tmp_path, drive=drive, size=1 << 20, image=image)
    try:
        d.init(features=F_VERSION_1 | F_INDIRECT | F_EVENT_IDX)
        memory.take_vmm_dirty()
        seen = drive_program(d)
        dev = device_of(d)
        queue = dev.queues[0].state
        return {"seen": seen, "ram": bytes(memory.regions[0].view), "dirty": bytes(memory.take_vmm_dirty()),
                "disk": image.read_bytes(), "needs_reset": bool(dev.s.status & STATUS_NEEDS_RESET),
                "queue": (queue.last_avail_idx, queue.used_idx), "requests": dev.backend.requests,
                "native": dev.backend.native_requests}
    finally:
        setup.close()
        memory.close()
        monkeypatch.undo()


def test_native_and_python_paths_leave_the_same_guest_disk_and_bitmap(tmp_path, monkeypatch):
    native = run(tmp_path, True, monkeypatch)
    python = run(tmp_path, False, monkeypatch)
    # natively: every read and write of whole sectors inside the disk before the bad chain
    assert (native["native"], native["requests"]) == (13, 20) and python["native"] == 0
    assert python["requests"] == 20
    for key in ("seen", "disk", "queue", "needs_reset", "dirty", "ram"):
        assert native[key] == python[key], key
    assert native["needs_reset"]
    assert native["seen"][5][1] == [b"\0", b"\0", b"\0", b"\1", b"\1", b"\2"]
    assert native["queue"][1] > 16                                   # the used ring went round


def test_read_only_disk_writes_are_refused_the_same_way(tmp_path, monkeypatch):
    def writes(d: Any) -> list[Any]:
        st = d.scratch + 0xF00
        put_request(d, 0, T_IN, 1, [], [(d.data, 512)], st)
        put_request(d, 3, T_OUT, 1, [(d.data + 0x1000, b"\x99" * 512)], [], st + 1)
        put_request(d, 6, T_IN, 1, [], [(d.data + 0x2000, 512)], st + 2)
        d.kick()
        return [d.used_entries(), [d.memory.read(st + i, 1) for i in range(3)]]

    native = run(tmp_path, True, monkeypatch, drive="readonly=on", drive_program=writes)
    python = run(tmp_path, False, monkeypatch, drive="readonly=on", drive_program=writes)
    assert native["seen"] == python["seen"] and native["seen"][1] == [b"\0", b"\1", b"\0"]
    assert native["disk"] == python["disk"] and native["ram"] == python["ram"]
    assert native["native"] == 2 and python["native"] == 0


@pytest.mark.parametrize("bad", ["loop", "next out of range", "readable after writable", "nested indirect",
                                 "indirect not a multiple of 16", "head out of range", "avail index too far"])
def test_malformed_rings_meet_the_python_checks(tmp_path, monkeypatch, bad):
    """The native walk refuses what virtqueue.py refuses, and leaves it: the reason the
    device records is Python's, and the request before it is served either way."""
    def malformed(d: Any) -> list[Any]:
        st = d.scratch + 0xF00
        put_request(d, 0, T_IN, 1, [], [(d.data, 512)], st)
        if bad == "loop":
            d.put_desc(4, d.data, 16, 1, 5)
            d.put_desc(5, d.data, 16, 1, 4)
            d.publish(4)
        elif bad == "next out of range":
            d.put_desc(4, d.data, 16, 1, 200)
            d.publish(4)
        elif bad == "readable after writable":
            d.put_desc(4, d.data, 16, 3, 5)
            d.put_desc(5, d.data + 0x100, 16, 0, 0)
            d.publish(4)
        elif bad == "nested indirect":
            table = d.scratch + 0xC00
            d.put_desc(0, table, 16, 4, 0, table=table)
            d.put_desc(4, table, 16, 4, 0)
            d.publish(4)
        elif bad == "indirect not a multiple of 16":
            d.put_desc(4, d.scratch + 0xC00, 24, 4, 0)
            d.publish(4)
        elif bad == "head out of range":
            d.memory.write_int(d.avail + 4 + 2 * (d.avail_idx % d.QSIZE), 2, 999)
            d.avail_idx += 1
            d.memory.write_int(d.avail + 2, 2, d.avail_idx)
        else:
            d.avail_idx += 40
            d.memory.write_int(d.avail + 2, 2, d.avail_idx)
        d.kick()
        return [d.used_entries(), device_of(d).error]

    native = run(tmp_path, True, monkeypatch, drive_program=malformed)
    python = run(tmp_path, False, monkeypatch, drive_program=malformed)
    assert native["seen"] == python["seen"] and native["needs_reset"] and python["needs_reset"]
    # the request before it is served, unless the ring as a whole is refused first
    assert native["seen"][0] == ([] if bad == "avail index too far" else [(0, 513)])
    assert native["ram"] == python["ram"] and native["dirty"] == python["dirty"]
    assert native["native"] == (0 if bad == "avail index too far" else 1)


def test_native_read_over_translated_code_runs_the_new_code(tmp_path):
    """A Unicorn vCPU ran FUNC (mov eax, 1; ret); a virtio-blk read served natively puts
    mov eax, 2; ret there from the disk: resumed, the vCPU must return 2 (the native code
    calls hv_uc_invalidate_host for every byte it writes, as GuestMemory.write does)."""
    from hv.block import BlockBackend
    from hv.devices.virtio_blk import VirtioBlk
    from hv.devices.virtqueue import Virtqueue
    from hv_backends.unicorn_common import library_is_patched
    from tests.backends.test_unicorn_dma_smc import FUNC, _run_until_halt
    from tests.backends.unicorn_x86_guest import KCODE, X86Guest
    if not library_is_patched():
        pytest.skip("needs hv's patched libunicorn (hv_uc_invalidate_host; pip install -e . builds it)")
    image = tmp_path / "code.img"
    image.write_bytes(bytes.fromhex("b802000000c3").ljust(512, b"\x90"))
    g = X86Guest(mmio=False)
    backend = BlockBackend(image)
    try:
        caller = b"\xe8" + struct.pack("<i", FUNC - (KCODE + 5)) + b"\xf4" + b"\xeb\xf8"
        g.memory.write(KCODE, caller)
        g.memory.write(FUNC, bytes.fromhex("b801000000c3").ljust(512, b"\x90"))
        g.vm.invalidate_code(KCODE, 0x3000)
        g.vcpu.set_state(g.kernel_state(KCODE))
        assert _run_until_halt(g) == 1
        ring = KCODE + 0x10000
        queue = Virtqueue(g.memory, 16)
        queue.reset()
        queue.state.desc, queue.state.avail, queue.state.used = ring, ring + 0x1000, ring + 0x2000
        queue.state.ready = True
        queue.check_rings()
        hdr, status = ring + 0x3000, ring + 0x3100
        g.memory.write(hdr, struct.pack("<IIQ", T_IN, 0, 0))
        for i, (addr, length, flags, nxt) in enumerate([(hdr, 16, 1, 1), (FUNC, 512, 3, 2), (status, 1, 2, 0)]):
            g.memory.write(ring + 16 * i, struct.pack("<QIHH", addr, length, flags, nxt))
        g.memory.write(ring + 0x1000, struct.pack("<HHH", 0, 1, 0))
        device = VirtioBlk(g.memory, backend)
        assert device.process(0, queue, 0) == 1 and device.native_requests == 1
        assert g.memory.read(status, 1) == b"\0"
        assert _run_until_halt(g) == 2
    finally:
        backend.close()
        g.close()


def test_the_native_path_only_where_it_can_do_all_python_does(tmp_path, monkeypatch):
    """A code-write notifier that is a Python callable (the native code could not call it)
    or an O_DIRECT disk keeps the Python path; no notifier or a C one takes the native path."""
    from hv.block import BlockBackend
    from hv.memory import GuestMemory, RegionSpec
    from hv_backends.unicorn_common import code_write_notifier
    assert blk_native.notifier_address(None) == 0
    assert blk_native.notifier_address(lambda host, length: None) is None
    c_notifier = code_write_notifier()
    if c_notifier is not None:
        assert blk_native.notifier_address(c_notifier)
    images = [tmp_path / "plain.img", tmp_path / "direct.img"]
    for image in images:
        image.write_bytes(bytes(1 << 20))
    memory = GuestMemory([RegionSpec(0x4000_0000, 1 << 20)])
    plain, direct = BlockBackend(images[0]), BlockBackend(images[1], direct=True)
    try:
        assert blk_native.NativeBlkQueue.create(memory, plain, 2048) is not None
        assert blk_native.NativeBlkQueue.create(memory, direct, 2048) is None
        memory.set_code_write_notifier(lambda host, length: None)
        assert blk_native.NativeBlkQueue.create(memory, plain, 2048) is None
    finally:
        plain.close()
        direct.close()
        memory.close()
