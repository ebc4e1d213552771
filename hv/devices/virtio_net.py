"""virtio-net (virtio spec 1.2, section 5.1) over a :class:`hv.net.NetBackend`.

Queues: 0 = receiveq, 1 = transmitq (no control queue, one queue pair), 256 entries
each. Features offered: MAC, STATUS (link always up), MRG_RXBUF, plus the transport's
VERSION_1, INDIRECT_DESC and EVENT_IDX. Every buffer carries the 12-byte
``virtio_net_hdr`` (virtio 1.x always has ``num_buffers``); no checksum or segmentation
offload is offered, so ``flags``/``gso_type`` are ignored on transmit and written as 0 on
receive.

Transmit: on a notify of queue 1 every available chain is sent, synchronously, under the
machine's big lock (the vCPU's MMIO write). A chain must be device-readable only and at
least 12 bytes long; otherwise it is a protocol error (DEVICE_NEEDS_RESET). A frame
longer than :data:`hv.net.MAX_FRAME` or shorter than an Ethernet header is dropped
(counted) and its chain returned.

Receive: the backend's reader thread appends frames to a bounded host-side backlog
(:data:`RX_BACKLOG` frames; when it is full further frames are dropped and counted, as a
NIC drops when its FIFO overflows). The backlog is moved into the guest's receive buffers
under the big lock: whenever the driver notifies either queue (it posted receive buffers,
or it transmitted), so a polling driver kicks the receive queue while it waits.
:meth:`VirtioNetPciDevice.enable_async_rx` (machine lock, is-running test) makes the backend
thread deliver each frame at once and raise the rx interrupt, for interrupt-driven guests;
:meth:`VirtioNetPciDevice.poll_rx` is the same for any caller holding the lock. A frame waits in the backlog while the ring has too little
buffer space; without MRG_RXBUF a frame that does not fit the next chain at all is
dropped (counted) and the chain stays available.

Migration: the saved state is the transport's (queue indexes, features, MSI-X) plus the
MAC. Frames still in the host backlog when the machine pauses for the last time are not
saved — they are lost, as a real NIC may lose frames on a link flap. Nothing is ever
delivered twice: a frame is either in the guest's RAM (and in the used ring) before the
pause, or it never reaches the guest.
"""
from __future__ import annotations

import collections
import logging
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager

from hv import values
from hv.devices.interfaces import DeviceStateError, InterruptLine
from hv.devices.pci import MsiSink
from hv.devices.virtio_pci import VirtioPciDevice, VirtioPciState
from hv.devices.virtqueue import Chain, Segment, Virtqueue, VirtqueueError
from hv.errors import DeviceError
from hv.memory import GuestMemory
from hv.net import MAX_FRAME, MIN_FRAME, NetBackend
from hv.values import format_mac

log = logging.getLogger(__name__)

VIRTIO_ID_NET = 1
QUEUE_SIZE = 256
RX_QUEUE = 0
TX_QUEUE = 1
HDR_SIZE = 12
RX_BACKLOG = 256

F_MAC = 5
F_MRG_RXBUF = 15
F_STATUS = 16
STATUS_LINK_UP = 1

MAC_RE = values.MAC_RE


class MacError(DeviceError, ValueError):
    """A MAC address is not six colon-separated hex bytes, or is a multicast address."""


def parse_mac(text: str) -> bytes:
    """``"52:54:00:12:34:56"`` -> 6 bytes; multicast addresses are refused (:func:`hv.values.parse_mac`)."""
    try:
        return values.parse_mac(text)
    except values.ValueFormatError as exc:
        raise MacError(str(exc)) from None


@dataclass
class NetCounters:
    """Guest-side counters (not migrated: host statistics)."""

    tx_frames: int = 0
    tx_dropped: int = 0         # oversize/runt frames from the guest
    rx_frames: int = 0
    rx_dropped_backlog: int = 0  # host backlog full
    rx_dropped_small: int = 0   # (no MRG_RXBUF) frame larger than the guest's buffer


class VirtioNet:
    """The virtio-net device type (plugged into :class:`VirtioNetPciDevice`)."""

    device_type = VIRTIO_ID_NET
    pci_class = 0x020000   # network, Ethernet
    num_queues = 2
    queue_max_size = QUEUE_SIZE

    def __init__(self, memory: GuestMemory, backend: NetBackend, mac: bytes) -> None:
        if len(mac) != 6:
            raise MacError("a MAC address has 6 bytes")
        self.memory = memory
        self.backend = backend
        self.mac = bytes(mac)
        self.counters = NetCounters()
        self._backlog: collections.deque[bytes] = collections.deque()
        self._backlog_lock = threading.Lock()
        self.on_frame: Callable[[], None] | None = None   # called (no lock held) after a frame is queued
        self.config = self.mac + STATUS_LINK_UP.to_bytes(2, "little") + (1).to_bytes(2, "little")

    # -- host side (backend reader thread) ---------------------------------------------------
    def receive(self, frame: bytes) -> None:
        """Queue one frame from the backend (any thread); dropped when the backlog is full."""
        with self._backlog_lock:
            if len(self._backlog) >= RX_BACKLOG:
                self.counters.rx_dropped_backlog += 1
                return
            self._backlog.append(frame)
        if self.on_frame is not None:
            self.on_frame()

    @property
    def backlog(self) -> int:
        with self._backlog_lock:
            return len(self._backlog)

    def drop_backlog(self) -> int:
        """Forget every queued frame (device reset); returns how many were dropped."""
        with self._backlog_lock:
            count = len(self._backlog)
            self._backlog.clear()
        return count

    # -- VirtioBackend -------------------------------------------------------------------------
    def device_features(self) -> int:
        return 1 << F_MAC | 1 << F_STATUS | 1 << F_MRG_RXBUF

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        return None  # the MAC is read-only in virtio 1.x (no CTRL_MAC_ADDR)

    def reset(self) -> None:
        dropped = self.drop_backlog()
        if dropped:
            log.debug("virtio-net reset dropped %d queued frames", dropped)

    def process(self, queue_index: int, queue: Virtqueue, features: int) -> int:
        if queue_index == TX_QUEUE:
            return self.transmit(queue)
        return self.fill_rx(queue, features)

    # -- transmit ----------------------------------------------------------------------------
    def transmit(self, queue: Virtqueue) -> int:
        done = 0
        while True:
            chain = queue.pop()
            if chain is None:
                return done
            if chain.writable:
                raise VirtqueueError("virtio-net transmit chain has device-writable buffers")
            length = chain.readable_length
            if length < HDR_SIZE:
                raise VirtqueueError(f"virtio-net transmit chain of {length} bytes has no 12-byte header")
            frame_length = length - HDR_SIZE
            if not MIN_FRAME <= frame_length <= MAX_FRAME:
                self.counters.tx_dropped += 1
                log.debug("virtio-net: dropped a %d-byte transmit frame", frame_length)
            else:
                self.backend.send(self._gather(chain.readable, HDR_SIZE, frame_length))
                self.counters.tx_frames += 1
            queue.push(chain.head, 0)
            done += 1

    def _gather(self, segments: list[Segment], skip: int, length: int) -> bytes:
        parts = []
        for seg in segments:
            if length <= 0:
                break
            if skip >= seg.length:
                skip -= seg.length
                continue
            n = min(seg.length - skip, length)
            parts.append(self.memory.read(seg.addr + skip, n))
            skip = 0
            length -= n
        return b"".join(parts)

    # -- receive -----------------------------------------------------------------------------
    def fill_rx(self, queue: Virtqueue, features: int) -> int:
        """Move queued frames into the receive ring; returns how many chains were used."""
        mergeable = bool(features >> F_MRG_RXBUF & 1)
        used = 0
        while True:
            with self._backlog_lock:
                if not self._backlog:
                    return used
                frame = self._backlog[0]
            outcome = self._deliver(queue, frame, mergeable)
            if outcome < 0:       # no room yet: keep the frame queued
                return used
            with self._backlog_lock:
                if self._backlog and self._backlog[0] is frame:
                    self._backlog.popleft()
            used += outcome

    def _pop_rx(self, queue: Virtqueue) -> Chain | None:
        chain = queue.pop()
        if chain is not None and chain.readable:
            raise VirtqueueError("virtio-net receive chain has device-readable buffers")
        return chain

    def _rewind(self, queue: Virtqueue, mark: int) -> None:
        """Un-pop the chains taken since ``last_avail_idx`` was ``mark`` (they stay available)."""
        s = queue.state
        s.last_avail_idx = mark
        if queue.event_idx:   # avail_event must not promise more than the device consumed
            self.memory.write_int(s.used + 4 + 8 * s.size, 2, mark)

    def _deliver(self, queue: Virtqueue, frame: bytes, mergeable: bool) -> int:
        """Put one frame in the ring: chains used, 0 if it was dropped, -1 if no room."""
        total = HDR_SIZE + len(frame)
        mark = queue.state.last_avail_idx
        chains: list[Chain] = []
        room = 0
        while room < total:
            chain = self._pop_rx(queue)
            if chain is None:
                self._rewind(queue, mark)   # give the chains back: wait for more
                return -1
            chains.append(chain)
            room += chain.writable_length
            if not mergeable:
                break
        if room < total:   # without MRG_RXBUF the frame must fit one chain
            self._rewind(queue, mark)
            self.counters.rx_dropped_small += 1
            log.debug("virtio-net: %d-byte frame dropped: receive buffer of %d bytes", len(frame), room)
            return 0
        header = bytes(10) + len(chains).to_bytes(2, "little")   # flags, gso..., num_buffers
        data = memoryview(header + frame)
        pos = 0
        for chain in chains:
            start = pos
            for seg in chain.writable:
                if pos >= total:
                    break
                n = min(seg.length, total - pos)
                if n:
                    self.memory.write(seg.addr, data[pos:pos + n])
                pos += n
            queue.push(chain.head, pos - start)
        self.counters.rx_frames += 1
        return len(chains)


@dataclass
class VirtioNetState:
    """The virtio-pci transport state plus the MAC the device was created with."""

    transport: VirtioPciState = field(default_factory=VirtioPciState)
    mac: str = ""

    VERSION = 1        # hv.devices.persist: the layout written
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return {"transport": self.transport.to_dict(), "mac": self.mac}

    @classmethod
    def from_dict(cls, raw: Any) -> "VirtioNetState":
        if not isinstance(raw, dict) or set(raw) != {"transport", "mac"}:
            raise DeviceStateError("virtio-net state: wrong fields")
        mac = raw["mac"]
        if not isinstance(mac, str) or (mac and not MAC_RE.match(mac)):
            raise DeviceStateError("virtio-net state: bad mac")
        return cls(VirtioPciState.from_dict(raw["transport"]), mac.lower())


class VirtioNetPciDevice(VirtioPciDevice):
    """virtio-net-pci: the modern transport around :class:`VirtioNet`, rx delivery on kicks."""

    def __init__(self, memory: GuestMemory, net: VirtioNet, msi: MsiSink | None = None,
                 intx: InterruptLine | None = None) -> None:
        super().__init__(memory, net, msi, intx)
        self.net = net
        self.detached = False

    def detach(self) -> None:
        """Hot-unplug (under the machine lock): no frame reaches guest RAM from now on,
        even one whose delivery is already waiting for the lock."""
        self.detached = True
        self.net.on_frame = None

    def start(self) -> None:
        """Start receiving from the backend (frames queue until the guest takes them)."""
        self.net.backend.start(self.net.receive)

    def notify(self, index: int) -> None:
        super().notify(index)
        if index == TX_QUEUE:
            super().notify(RX_QUEUE)   # a transmitting driver also gets what has arrived

    def poll_rx(self) -> None:
        """Deliver queued frames now; the caller holds the machine lock, machine running."""
        if self.net.backlog and not self.detached:
            super().notify(RX_QUEUE)

    def enable_async_rx(self, lock: ContextManager[Any], running: Callable[[], bool]) -> None:
        """Deliver each arriving frame at once from the backend thread: take ``lock`` (the
        machine's big lock) and, if ``running()``, :meth:`poll_rx` (which raises the rx
        interrupt). For guests that wait for an interrupt instead of kicking. A paused
        machine gets nothing (its RAM must not change); its frames wait in the backlog."""
        def deliver() -> None:
            with lock:
                if running():
                    self.poll_rx()
        self.net.on_frame = deliver

    def save(self) -> VirtioNetState:  # type: ignore[override]
        return VirtioNetState(super().save(), format_mac(self.net.mac))

    def restore(self, state: VirtioNetState) -> None:  # type: ignore[override]
        if state.mac and state.mac != format_mac(self.net.mac):
            raise DeviceStateError(f"virtio-net state: mac {state.mac} differs from the device's "
                                   f"{format_mac(self.net.mac)}")
        if not state.transport.config:
            self.net.drop_backlog()
        super().restore(state.transport)
