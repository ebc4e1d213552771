"""What the machine tests share: the virtio-pci register layout; Python virtio-blk and
virtio-net drivers on the real buses and RAM (the ``net`` fixture: a NIC cabled to a recording
peer); test images; an echo peer for the net fixture guest; and the output the blk and net
fixture guests must give."""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hv.devconfig import parse_device, parse_netdev
from hv.devices.bus import Bus
from hv.devices.virtio_net import F_MAC, VirtioNetPciDevice, parse_mac
from hv.devices.virtio_pci import STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK
from hv.machine.pci_wiring import PciSetup, build_pci
from hv.memory import GuestMemory, RegionSpec
from tests.helpers import value


MASK = (1 << 64) - 1
ECAM = {"q35": 0xB000_0000, "virt": 0x3F00_0000}
WINDOW = {"q35": 0xC000_0000, "virt": 0x1000_0000}
RAM_BASE = {"q35": 0, "virt": 0x4000_0000}
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
F_VERSION_1 = 1 << 32
F_INDIRECT = 1 << 28
F_EVENT_IDX = 1 << 29


def make_image(path: Path, size: int = 1 << 20, fill: bytes | None = None) -> Path:
    with open(path, "wb") as f:
        if fill is None:
            f.truncate(size)
        else:
            f.write(fill)
    return path


class Driver:
    """A virtio-blk driver in Python, speaking to the device through the machine's buses."""

    QSIZE = 16

    def __init__(self, setup: PciSetup, memory: GuestMemory, pio: Bus, mmio: Bus, machine: str = "q35",
                 slot: int = 3) -> None:
        self.setup, self.memory, self.pio, self.mmio = setup, memory, pio, mmio
        self.ecam = ECAM[machine] + (slot << 15)
        self.bar = WINDOW[machine]
        base = RAM_BASE[machine]
        self.desc, self.avail, self.used = base + 0x10000, base + 0x11000, base + 0x12000
        self.scratch = base + 0x20000
        self.data = base + 0x100000
        self.avail_idx = 0
        self.used_seen = 0

    # config space / BAR
    def cfg(self, off: int, size: int = 4) -> int:
        return self.mmio.read(self.ecam + off, size)

    def cfg_write(self, off: int, size: int, value: int) -> None:
        self.mmio.write(self.ecam + off, size, value)

    def program_bar(self) -> None:
        self.cfg_write(0x20, 4, 0xFFFFFFFF)
        self.cfg_write(0x24, 4, 0xFFFFFFFF)
        self.cfg_write(0x20, 4, self.bar)
        self.cfg_write(0x24, 4, 0)
        self.cfg_write(0x04, 2, 0x6)

    def r(self, off: int, size: int) -> int:
        return self.mmio.read(self.bar + off, size)

    def w(self, off: int, size: int, value: int) -> None:
        self.mmio.write(self.bar + off, size, value)

    @property
    def status(self) -> int:
        return self.r(0x14, 1)

    def offered(self) -> int:
        self.w(0x00, 4, 0)
        low = self.r(0x04, 4)
        self.w(0x00, 4, 1)
        return low | self.r(0x04, 4) << 32

    def init(self, features: int = F_VERSION_1, qsize: int = QSIZE, queue_vector: int | None = None) -> None:
        self.program_bar()
        self.w(0x14, 1, 0)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.w(0x08, 4, sel)
            self.w(0x0C, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.status & STATUS_FEATURES_OK
        self.QSIZE = qsize
        self.memory.write(self.desc, bytes(0x3000))
        self.w(0x16, 2, 0)
        self.w(0x18, 2, qsize)
        for off, addr in ((0x20, self.desc), (0x28, self.avail), (0x30, self.used)):
            self.w(off, 4, addr & 0xFFFFFFFF)
            self.w(off + 4, 4, addr >> 32)
        if queue_vector is not None:
            self.w(0x1A, 2, queue_vector)
        self.w(0x1C, 2, 1)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    # descriptors
    def put_desc(self, index: int, addr: int, length: int, flags: int, nxt: int, table: int | None = None) -> None:
        table = self.desc if table is None else table
        self.memory.write(table + 16 * index, addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                          + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))

    def publish(self, head: int) -> None:
        self.memory.write_int(self.avail + 4 + 2 * (self.avail_idx % self.QSIZE), 2, head)
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.memory.write_int(self.avail + 2, 2, self.avail_idx)

    def kick(self) -> None:
        self.w(0x3000, 2, 0)

    def used_entries(self) -> list[tuple[int, int]]:
        idx = self.memory.read_int(self.used + 2, 2)
        out = []
        while self.used_seen != idx:
            slot = self.used + 4 + 8 * (self.used_seen % self.QSIZE)
            out.append((self.memory.read_int(slot, 4), self.memory.read_int(slot + 4, 4)))
            self.used_seen = (self.used_seen + 1) & 0xFFFF
        return out

    def request(self, kind: int, sector: int = 0, out: bytes = b"", in_len: int = 0,
                head: int = 0) -> tuple[int, bytes, int]:
        """One request (header, data, status in 3 descriptors); (status, data in, used len)."""
        hdr = self.scratch
        status = self.scratch + 0x100
        self.memory.write(hdr, kind.to_bytes(4, "little") + bytes(4) + sector.to_bytes(8, "little"))
        self.memory.write(status, b"\xee")
        descs = [(hdr, 16, 0)]
        if out:
            self.memory.write(self.data, out)
            descs.append((self.data, len(out), 0))
        if in_len:
            self.memory.write(self.data, b"\xcc" * in_len)
            descs.append((self.data, in_len, 2))
        descs.append((status, 1, 2))
        for i, (addr, length, flags) in enumerate(descs):
            last = i == len(descs) - 1
            self.put_desc(head + i, addr, length, flags | (0 if last else 1), 0 if last else head + i + 1)
        self.publish(head)
        self.kick()
        used = self.used_entries()
        assert len(used) == 1 and used[0][0] == head, used
        return (self.memory.read(status, 1)[0], self.memory.read(self.data, in_len) if in_len else b"",
                used[0][1])


def blk_reference(sectors: int, iterations: int, chunk: int, depth: int, ident: str, slot: int = 3,
                  capacity: int = 8192, mode: str = "msix", bus: int = 0) -> list[str]:
    """What fixtures/common/blk.c prints; ``mode`` is its interrupt mode line ("msix" only
    once it has taken an MSI, else "polling"); ``bus`` > 0: behind a root port."""
    lines = [f"blk: sectors={sectors} iterations={iterations} chunk={chunk} depth={depth}",
             f"blk: {mode}",
             f"blk: device {bus:02x}:{slot:02x}.0 capacity {capacity} id {ident}"]
    total = 0
    for p in range(1, iterations + 1):
        for i in range(sectors * 64):
            total = ((((total << 7) | (total >> 57)) & MASK) + value(p, i)) & MASK
        lines.append(f"blk pass {p} sum {total:016x} bad 0")
    lines.append("done")
    return lines


# -- virtio-net: an echo peer on the other end of the cable, a Python driver, the net guest's output --

PEER_MAC = bytes.fromhex("020000000001")
ETH_REQ, ETH_REP = b"\x88\xb5", b"\x88\xb6"


# -- a peer on the other end of the cable ---------------------------------------------------------

class EchoPeer:
    """A SEQPACKET listener that answers the fixture's requests (and records everything).

    Accepts any number of connections (a migrated VM reconnects); ``echo=False`` only records.
    """

    def __init__(self, path: Path, echo: bool = True) -> None:
        self.path = path
        self.echo = echo
        self.received: list[bytes] = []
        self.conns: list[socket.socket] = []
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.listener.bind(str(path))
        self.listener.listen(8)
        self._stop = False
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conns.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        while True:
            try:
                frame = conn.recv(1 << 17)
            except OSError:
                return
            if not frame:
                return
            self.received.append(frame)
            if self.echo and frame[12:14] == ETH_REQ:
                try:
                    conn.send(frame[6:12] + PEER_MAC + ETH_REP + frame[14:])
                except OSError:
                    return

    def wait_conn(self, count: int = 1, timeout: float = 10) -> socket.socket:
        deadline = time.monotonic() + timeout
        while len(self.conns) < count:
            assert time.monotonic() < deadline, "nobody connected"
            time.sleep(0.005)
        return self.conns[count - 1]

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        for conn in self.conns:
            conn.close()


def wait_for(predicate: Any, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


# -- a Python virtio-net driver -------------------------------------------------------------------

class NetDriver:
    """Speaks to the device through the machine's buses, rings and buffers in real RAM."""

    QSIZE = 16

    def __init__(self, setup: PciSetup, memory: GuestMemory, mmio: Bus, slot: int = 2) -> None:
        self.setup, self.memory, self.mmio = setup, memory, mmio
        self.ecam = ECAM["q35"] + (slot << 15)
        self.bar = WINDOW["q35"]
        self.rings = {0: (0x10000, 0x11000, 0x12000), 1: (0x14000, 0x15000, 0x16000)}
        self.avail_idx = [0, 0]
        self.used_seen = [0, 0]
        self.rx_buf = 0x100000     # 16 buffers of 2 KiB
        self.tx_buf = 0x200000

    @property
    def device(self) -> VirtioNetPciDevice:
        return self.setup.slots[1].device

    def cfg(self, off: int, size: int = 4) -> int:
        return self.mmio.read(self.ecam + off, size)

    def cfg_write(self, off: int, size: int, value: int) -> None:
        self.mmio.write(self.ecam + off, size, value)

    def r(self, off: int, size: int) -> int:
        return self.mmio.read(self.bar + off, size)

    def w(self, off: int, size: int, value: int) -> None:
        self.mmio.write(self.bar + off, size, value)

    @property
    def status(self) -> int:
        return self.r(0x14, 1)

    def offered(self) -> int:
        self.w(0x00, 4, 0)
        low = self.r(0x04, 4)
        self.w(0x00, 4, 1)
        return low | self.r(0x04, 4) << 32

    def init(self, features: int = F_VERSION_1 | 1 << F_MAC) -> None:
        self.cfg_write(0x20, 4, self.bar)
        self.cfg_write(0x24, 4, 0)
        self.cfg_write(0x04, 2, 0x6)
        self.w(0x14, 1, 0)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
        for sel in (0, 1):
            self.w(0x08, 4, sel)
            self.w(0x0C, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
        assert self.status & STATUS_FEATURES_OK
        self.memory.write(0x10000, bytes(0x8000))
        for q, (desc, avail, used) in self.rings.items():
            self.w(0x16, 2, q)
            self.w(0x18, 2, self.QSIZE)
            for off, addr in ((0x20, desc), (0x28, avail), (0x30, used)):
                self.w(off, 4, addr)
                self.w(off + 4, 4, 0)
            self.w(0x1C, 2, 1)
        self.avail_idx = [0, 0]
        self.used_seen = [0, 0]
        self.w(0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)

    def put_desc(self, q: int, index: int, addr: int, length: int, flags: int, nxt: int = 0) -> None:
        self.memory.write(self.rings[q][0] + 16 * index, addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                          + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))

    def publish(self, q: int, head: int) -> None:
        avail = self.rings[q][1]
        self.memory.write_int(avail + 4 + 2 * (self.avail_idx[q] % self.QSIZE), 2, head)
        self.avail_idx[q] = (self.avail_idx[q] + 1) & 0xFFFF
        self.memory.write_int(avail + 2, 2, self.avail_idx[q])

    def kick(self, q: int) -> None:
        self.w(0x3000 + 4 * q, 2, q)

    def used(self, q: int) -> list[tuple[int, int]]:
        used = self.rings[q][2]
        idx = self.memory.read_int(used + 2, 2)
        out = []
        while self.used_seen[q] != idx:
            slot = used + 4 + 8 * (self.used_seen[q] % self.QSIZE)
            out.append((self.memory.read_int(slot, 4), self.memory.read_int(slot + 4, 4)))
            self.used_seen[q] = (self.used_seen[q] + 1) & 0xFFFF
        return out

    # frames
    def send(self, frame: bytes, split: bool = False, head: int = 0) -> list[tuple[int, int]]:
        data = bytes(12) + frame
        self.memory.write(self.tx_buf, data)
        if split:   # header and frame in separate descriptors
            self.put_desc(1, head, self.tx_buf, 12, 1, head + 1)
            self.put_desc(1, head + 1, self.tx_buf + 12, len(frame), 0)
        else:
            self.put_desc(1, head, self.tx_buf, len(data), 0)
        self.publish(1, head)
        self.kick(1)
        return self.used(1)

    def post_rx(self, index: int, length: int = 2048) -> None:
        self.put_desc(0, index, self.rx_buf + 2048 * index, length, 2)
        self.publish(0, index)

    def rx_data(self, index: int, length: int) -> bytes:
        return self.memory.read(self.rx_buf + 2048 * index, length)


def frame_of(size: int, tag: int = 0) -> bytes:
    body = bytes((i * 7 + tag) & 0xFF for i in range(size - 14))
    return b"\x52\x54\x00\x12\x34\x56" + PEER_MAC + b"\x08\x00" + body


@pytest.fixture
def net(tmp_path):
    peer = EchoPeer(tmp_path / "peer.sock", echo=False)
    memory = GuestMemory([RegionSpec(0, 16 << 20)])
    pio, mmio = Bus("port"), Bus("mmio")
    netdev = parse_netdev(f"socket,id=n0,connect={tmp_path / 'peer.sock'}")
    device = parse_device("virtio-net-pci,netdev=n0,id=nic0,addr=2,mac=52:54:00:12:34:56")
    setup = build_pci("q35", memory, pio, mmio, [], [device], netdevs=[netdev])
    driver = NetDriver(setup, memory, mmio)
    driver.peer = peer   # type: ignore[attr-defined]
    driver.conn = peer.wait_conn()  # type: ignore[attr-defined]
    yield driver
    setup.close()
    memory.close()
    peer.close()


def payload(round_: int, seq: int, mac: bytes) -> bytes:
    plen = 8 * (1 + (7 * seq + round_) % 64)
    body = bytes(((value(round_ << 32 | seq, j // 8) >> (8 * (j % 8))) & 0xFF) ^ mac[j % 6] for j in range(plen))
    return round_.to_bytes(4, "little") + seq.to_bytes(4, "little") + body


def net_reference(frames: int, iterations: int, mac: str, slot: int = 2, forever: bool = False,
                  mode: str = "msix") -> list[str]:
    """What fixtures/common/net.c prints when every reply arrives, computed independently
    (``forever``: the first ``iterations`` rounds of an ``iterations=0`` run, no "done";
    ``mode``: its interrupt mode line, "msix" only once it has taken an MSI)."""
    raw = parse_mac(mac)
    lines = [f"net: frames={frames} iterations={0 if forever else iterations}",
             f"net: {mode}",
             f"net: device 00:{slot:02x}.0 mac {mac}"]
    total = 0
    for r in range(1, iterations + 1):
        for seq in range(frames):
            h = 0xCBF29CE484222325
            for b in payload(r, seq, raw):
                h = ((h ^ b) * 0x100000001B3) & MASK
            total = ((((total << 7) | (total >> 57)) & MASK) + h) & MASK
        lines.append(f"net round {r} sent {frames} ok {frames} sum {total:016x}")
    if not forever:
        lines.append("done")
    return lines
