"""virtio-blk (virtio spec 1.2, section 5.2) over a raw :class:`hv.block.BlockBackend`.

One request queue of 256 entries. Requests: IN, OUT, FLUSH, GET_ID, DISCARD and
WRITE_ZEROES. Features offered: SEG_MAX, BLK_SIZE (512), FLUSH, DISCARD, WRITE_ZEROES,
and RO when the drive is read-only (writes then complete with VIRTIO_BLK_S_IOERR).
Requests are served synchronously in the notifying vCPU's MMIO write, in chunks of at
most 1 MiB, so a request of any size needs bounded host memory. Data read from the image
reaches guest RAM through ``GuestMemory.write`` (dirty-tracked); data written to the
image is taken from zero-copy views of guest RAM.

A chain without a 16-byte header or without a writable status byte cannot be answered
and is a protocol error (the device asks for a reset); everything else wrong with a
request (bad sector range, unaligned length, read-only image, host I/O error) is
answered with IOERR, an unknown type with UNSUPP.
"""
from __future__ import annotations

import functools
import logging
from collections.abc import Iterator

from hv.block import BlockBackend, BlockError
from hv.devices.virtio_blk_native import NativeBlkQueue
from hv.devices.virtqueue import Chain, Segment, Virtqueue, VirtqueueError
from hv.errors import DeviceError
from hv.memory import GuestMemory

log = logging.getLogger(__name__)

VIRTIO_ID_BLOCK = 2
SECTOR_SIZE = 512
QUEUE_SIZE = 256
CHUNK = 1 << 20
ID_BYTES = 20

F_SEG_MAX = 2
F_RO = 5
F_BLK_SIZE = 6
F_FLUSH = 9
F_DISCARD = 13
F_WRITE_ZEROES = 14

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8
T_DISCARD = 11
T_WRITE_ZEROES = 13
S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

MAX_DISCARD_SECTORS = 0x3FFFFF
MAX_DISCARD_SEG = 16
HEADER_SIZE = 16
_STATUS = {S_OK: b"\0", S_IOERR: b"\1", S_UNSUPP: b"\2"}
_UNCHECKED = object()


class _RequestError(DeviceError):
    """A request the device answers with IOERR."""


class VirtioBlk:
    """The virtio-blk device type (plugged into :class:`hv.devices.virtio_pci.VirtioPciDevice`)."""

    device_type = VIRTIO_ID_BLOCK
    pci_class = 0x010000   # mass storage, SCSI (as QEMU's virtio-blk-pci)
    num_queues = 1
    queue_max_size = QUEUE_SIZE

    def __init__(self, memory: GuestMemory, backend: BlockBackend, serial: str | None = None) -> None:
        self.memory = memory
        self.backend = backend
        self.serial = (serial or "").encode()[:ID_BYTES]
        self.capacity = backend.size // SECTOR_SIZE
        self.requests = 0
        self.native_requests = 0   # of those, served by the native path
        self.config = self._build_config()
        self._native: NativeBlkQueue | None = None
        self._native_for: object = _UNCHECKED   # the code-write notifier it was chosen for

    def _native_path(self) -> NativeBlkQueue | None:
        """The native request path, chosen again whenever guest RAM's code-write notifier
        changes (the Unicorn backend sets it when it opens the VM, maybe after this device
        was made: a path chosen before would not drop translated code it overwrote)."""
        notifier = self.memory.code_write_notifier
        if self._native_for is not notifier:
            self._native = NativeBlkQueue.create(self.memory, self.backend, self.capacity)
            self._native_for = notifier
        return self._native

    def _build_config(self) -> bytes:
        cfg = bytearray(60)
        cfg[0:8] = self.capacity.to_bytes(8, "little")
        cfg[12:16] = (QUEUE_SIZE - 2).to_bytes(4, "little")          # seg_max
        cfg[20:24] = SECTOR_SIZE.to_bytes(4, "little")                # blk_size
        cfg[34:36] = (1).to_bytes(2, "little")                        # num_queues
        cfg[36:40] = MAX_DISCARD_SECTORS.to_bytes(4, "little")
        cfg[40:44] = MAX_DISCARD_SEG.to_bytes(4, "little")
        cfg[44:48] = (1).to_bytes(4, "little")                        # discard_sector_alignment
        cfg[48:52] = MAX_DISCARD_SECTORS.to_bytes(4, "little")        # max_write_zeroes_sectors
        cfg[52:56] = MAX_DISCARD_SEG.to_bytes(4, "little")
        cfg[56] = 1                                                   # write_zeroes_may_unmap
        return bytes(cfg)

    # -- VirtioBackend ------------------------------------------------------------------
    def device_features(self) -> int:
        features = 1 << F_SEG_MAX | 1 << F_BLK_SIZE | 1 << F_FLUSH
        if self.backend.readonly:
            features |= 1 << F_RO
        else:
            features |= 1 << F_DISCARD | 1 << F_WRITE_ZEROES
        return features

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        return None  # nothing writable (no CONFIG_WCE)

    def reset(self) -> None:
        return None

    def process(self, queue_index: int, queue: Virtqueue, features: int) -> int:
        """Serve every available request; the completed ones are returned to the driver
        together (``push_all``, a ring's worth at most at a time), also when a malformed
        chain stops the queue."""
        done: list[tuple[int, int]] = []
        count = 0
        native = self._native_path()
        try:
            while True:
                if native is not None:   # reads and writes; it stops before anything else
                    queue.push_all(done)
                    done = []
                    served = native.serve(queue)
                    count += served
                    self.requests += served
                    self.native_requests += served
                chain = queue.pop()
                if chain is None:
                    break
                done.append((chain.head, self.handle(chain)))
                count += 1
                if len(done) == queue.state.size:
                    queue.push_all(done)
                    done = []
        finally:
            queue.push_all(done)
        return count

    # -- requests ------------------------------------------------------------------------
    def handle(self, chain: Chain) -> int:
        """Serve one request; returns the number of bytes written into the chain."""
        readable = chain.readable_length
        writable = chain.writable_length
        if readable < HEADER_SIZE:
            raise VirtqueueError("virtio-blk request without a 16-byte header")
        if writable < 1:
            raise VirtqueueError("virtio-blk request without a status byte")
        self.requests += 1
        header = self._gather(chain.readable, 0, HEADER_SIZE)
        kind = int.from_bytes(header[0:4], "little")
        sector = int.from_bytes(header[8:16], "little")
        data_in = writable - 1          # device-writable bytes before the status
        data_out = readable - HEADER_SIZE
        written = 0
        try:
            if kind == T_IN:
                self._check_range(sector, data_in)
                self._read_disk(chain.writable, sector * SECTOR_SIZE, data_in)
                written = data_in
                status = S_OK
            elif kind == T_OUT:
                if self.backend.readonly:
                    raise _RequestError("write to a read-only drive")
                self._check_range(sector, data_out)
                self._write_disk(chain.readable, HEADER_SIZE, sector * SECTOR_SIZE, data_out)
                status = S_OK
            elif kind == T_FLUSH:
                self.backend.flush()
                status = S_OK
            elif kind == T_GET_ID:
                ident = self.serial.ljust(ID_BYTES, b"\0")[:min(ID_BYTES, data_in)]
                self._scatter(chain.writable, 0, ident)
                written = len(ident)
                status = S_OK
            elif kind in (T_DISCARD, T_WRITE_ZEROES):
                if self.backend.readonly:
                    raise _RequestError("discard/write-zeroes on a read-only drive")
                self._discard(chain, kind)
                status = S_OK
            else:
                status = S_UNSUPP
        except _RequestError as exc:
            log.debug("virtio-blk request type %d sector %d: %s", kind, sector, exc)
            status = S_IOERR
        except BlockError as exc:
            log.warning("virtio-blk I/O error: %s", exc)
            status = S_IOERR
        last = chain.writable[-1]
        if last.length:
            self.memory.write(last.addr + last.length - 1, _STATUS[status])
        else:
            self._scatter(chain.writable, writable - 1, _STATUS[status])
        return written + 1

    def _check_range(self, sector: int, length: int) -> None:
        if length % SECTOR_SIZE:
            raise _RequestError(f"data length {length} is not a multiple of {SECTOR_SIZE}")
        if sector > self.capacity or length // SECTOR_SIZE > self.capacity - sector:
            raise _RequestError(f"sectors {sector}+{length // SECTOR_SIZE} beyond capacity {self.capacity}")

    def _discard(self, chain: Chain, kind: int) -> None:
        length = chain.readable_length - HEADER_SIZE
        if length == 0 or length % 16 or length // 16 > MAX_DISCARD_SEG:
            raise _RequestError(f"discard payload of {length} bytes")
        payload = self._gather(chain.readable, HEADER_SIZE, length)
        ranges = []
        for off in range(0, length, 16):
            sector = int.from_bytes(payload[off:off + 8], "little")
            count = int.from_bytes(payload[off + 8:off + 12], "little")
            flags = int.from_bytes(payload[off + 12:off + 16], "little")
            if count > MAX_DISCARD_SECTORS or flags & ~1 or (kind == T_DISCARD and flags):
                raise _RequestError("bad discard segment")
            self._check_range(sector, count * SECTOR_SIZE)
            ranges.append((sector, count, flags & 1))
        for sector, count, unmap in ranges:
            if kind == T_DISCARD:
                self.backend.discard(sector * SECTOR_SIZE, count * SECTOR_SIZE)
            else:
                self.backend.write_zeroes(sector * SECTOR_SIZE, count * SECTOR_SIZE, unmap=bool(unmap))

    # -- scatter/gather over checked segments ------------------------------------------------
    @staticmethod
    def _pieces(segments: list[Segment], skip: int, length: int) -> Iterator[tuple[int, int]]:
        """(gpa, n) pieces covering ``length`` bytes after ``skip``, each at most CHUNK."""
        for seg in segments:
            if length <= 0:
                return
            if skip >= seg.length:
                skip -= seg.length
                continue
            addr = seg.addr + skip
            avail = min(seg.length - skip, length)
            skip = 0
            length -= avail
            while avail:
                n = min(avail, CHUNK)
                yield addr, n
                addr += n
                avail -= n

    def _gather(self, segments: list[Segment], skip: int, length: int) -> bytes:
        return b"".join(self.memory.read(addr, n) for addr, n in self._pieces(segments, skip, length))

    def _scatter(self, segments: list[Segment], skip: int, data: bytes) -> None:
        pos = 0
        for addr, n in self._pieces(segments, skip, len(data)):
            self.memory.write(addr, data[pos:pos + n])
            pos += n

    def _read_disk(self, segments: list[Segment], offset: int, length: int) -> None:
        for addr, n in self._pieces(segments, 0, length):
            self.memory.fill(addr, n, functools.partial(self.backend.read_into, offset))
            offset += n

    def _write_disk(self, segments: list[Segment], skip: int, offset: int, length: int) -> None:
        for addr, n in self._pieces(segments, skip, length):
            region = self.memory.region_for(addr, n)
            start = addr - region.gpa
            self.backend.write(offset, region.view[start:start + n])
            offset += n
