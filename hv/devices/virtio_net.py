"""virtio-net (virtio spec 1.2, section 5.1) over a :class:`hv.net.NetBackend`.

Queues: 0 = receiveq, 1 = transmitq, 2 = controlq (one queue pair), 256 entries each.
Features offered: MAC, STATUS (link always up), MRG_RXBUF, CTRL_VQ and GUEST_ANNOUNCE,
plus the transport's VERSION_1, INDIRECT_DESC and EVENT_IDX. A driver that accepts only
some of them (the fixture net guest takes MAC alone) never sees the control queue. Every buffer carries the 12-byte
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
:meth:`VirtioNetPciDevice.poll_rx` is the same for any caller holding the lock. A frame
waits in the backlog while the ring has too little buffer space; without MRG_RXBUF a frame
that does not fit the next chain at all is dropped (counted) and the chain stays available.

Control queue (section 5.1.6.5): each command is ``{u8 class, u8 command}``, its data,
then one device-writable ``u8 ack``. Only ``VIRTIO_NET_CTRL_ANNOUNCE`` /
``ANNOUNCE_ACK`` is understood (it clears ``VIRTIO_NET_S_ANNOUNCE``); every other class
is answered ``VIRTIO_NET_ERR`` — none of CTRL_RX, CTRL_MAC_ADDR, CTRL_VLAN, MQ or
CTRL_GUEST_OFFLOADS is offered, and Linux (6.1 ``virtnet_set_rx_mode`` etc.) sends those
commands only when the feature was negotiated. A chain without the 2-byte header or
the ack byte is a protocol error (DEVICE_NEEDS_RESET).

Guest announce: :meth:`VirtioNetPciDevice.announce_guest`, called on the destination
after a live migration's switch-over, sets ``VIRTIO_NET_S_ANNOUNCE`` in the status and
raises the configuration-change interrupt; Linux then sends gratuitous ARPs (and IPv6
neighbour advertisements) from the guest's own addresses and acks with ANNOUNCE_ACK.

Migration: the saved state is the transport's (queue indexes, features, MSI-X) plus the
MAC and whether an announcement is still unacknowledged. State version 1 (an hv without
the control queue: two queues, three MSI-X vectors) is upgraded on load: the control
queue and its MSI-X entry are added at power-on values (that guest negotiated no CTRL_VQ).
Frames still in the host backlog when the machine pauses for the last time are not
saved — they are lost, as a real NIC may lose frames on a link flap. Nothing is ever
delivered twice: a frame is either in the guest's RAM (and in the used ring) before the
pause, or it never reaches the guest.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hv import values
from hv.devices.interfaces import DeviceStateError, InterruptLine
from hv.devices.pci import MsiSink
from hv.devices.pci_function import MSIX_ENTRY_SIZE, MSIX_VECTOR_MASKED
from hv.devices.virtio_pci import (
    ISR_CONFIG,
    STATUS_DRIVER_OK,
    STATUS_NEEDS_RESET,
    VirtioPciDevice,
    VirtioPciState,
)
from hv.devices.virtqueue import (
    Chain,
    Segment,
    Virtqueue,
    VirtqueueError,
    VirtqueueState,
)
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

CTRL_QUEUE = 2
F_MAC = 5
F_MRG_RXBUF = 15
F_STATUS = 16
F_CTRL_VQ = 17
F_GUEST_ANNOUNCE = 21
STATUS_LINK_UP = 1
STATUS_ANNOUNCE = 2   # VIRTIO_NET_S_ANNOUNCE

CTRL_OK = 0           # VIRTIO_NET_OK
CTRL_ERR = 1          # VIRTIO_NET_ERR
CTRL_CLASS_ANNOUNCE = 3
CTRL_ANNOUNCE_ACK = 0
CTRL_HEADER = 2       # struct virtio_net_ctrl_hdr: class, cmd

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
    num_queues = 3
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
        self.status = STATUS_LINK_UP
        self.announcements = 0    # announcements acknowledged by the driver (not migrated)

    @property
    def config(self) -> bytes:
        """struct virtio_net_config: mac, status, max_virtqueue_pairs (1)."""
        return self.mac + self.status.to_bytes(2, "little") + (1).to_bytes(2, "little")

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
        return (1 << F_MAC | 1 << F_STATUS | 1 << F_MRG_RXBUF | 1 << F_CTRL_VQ
                | 1 << F_GUEST_ANNOUNCE)

    def config_read(self, offset: int, size: int) -> int:
        if offset < 0 or offset + size > len(self.config):
            return 0
        return int.from_bytes(self.config[offset:offset + size], "little")

    def config_write(self, offset: int, size: int, value: int) -> None:
        return None  # the MAC is read-only in virtio 1.x (no CTRL_MAC_ADDR)

    def reset(self) -> None:
        self.status = STATUS_LINK_UP
        dropped = self.drop_backlog()
        if dropped:
            log.debug("virtio-net reset dropped %d queued frames", dropped)

    def process(self, queue_index: int, queue: Virtqueue, features: int) -> int:
        if queue_index == TX_QUEUE:
            return self.transmit(queue)
        if queue_index == CTRL_QUEUE:
            return self.control(queue, features)
        return self.fill_rx(queue, features)

    # -- control queue -----------------------------------------------------------------------
    def control(self, queue: Virtqueue, features: int) -> int:
        """Answer every available control command (ack byte written, chain used)."""
        done = 0
        while True:
            chain = queue.pop()
            if chain is None:
                return done
            if chain.readable_length < CTRL_HEADER or chain.writable_length < 1:
                raise VirtqueueError("virtio-net control chain lacks its 2-byte header or ack byte")
            cls, cmd = self._gather(chain.readable, 0, CTRL_HEADER)
            ack = self.command(cls, cmd, chain.readable_length - CTRL_HEADER, features)
            self.memory.write(chain.writable[0].addr, bytes([ack]))
            queue.push(chain.head, 1)
            done += 1

    def command(self, cls: int, cmd: int, data_length: int, features: int) -> int:
        """One control command -> CTRL_OK / CTRL_ERR. ANNOUNCE_ACK (no data, feature
        negotiated, an announcement pending) clears the status bit, as QEMU; anything
        else is an error answer, never a device failure."""
        if (cls == CTRL_CLASS_ANNOUNCE and cmd == CTRL_ANNOUNCE_ACK and data_length == 0
                and features >> F_GUEST_ANNOUNCE & 1 and self.status & STATUS_ANNOUNCE):
            self.status &= ~STATUS_ANNOUNCE
            self.announcements += 1
            return CTRL_OK
        log.debug("virtio-net: control command class %d cmd %d answered VIRTIO_NET_ERR", cls, cmd)
        return CTRL_ERR

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
    """The virtio-pci transport state, the MAC the device was created with, and whether
    an announcement (VIRTIO_NET_S_ANNOUNCE) still waits for the driver's ack."""

    transport: VirtioPciState = field(default_factory=VirtioPciState)
    mac: str = ""
    announce: bool = False

    VERSION = 2        # hv.devices.persist: the layout written (2: control queue, announce)
    MIN_VERSION = 1    # the oldest layout restore reads

    def to_dict(self) -> dict[str, Any]:
        return {"transport": self.transport.to_dict(), "mac": self.mac, "announce": self.announce}

    @classmethod
    def upgrade(cls, raw: Any, version: int) -> Any:
        """Version 1 (no control queue: two queues, three MSI-X vectors) -> version 2: the
        control queue at its power-on values, one more MSI-X entry (masked, as at reset),
        no announcement pending. Anything malformed is left for from_dict to refuse."""
        if not isinstance(raw, dict) or not isinstance(raw.get("transport"), dict):
            return raw
        transport = dict(raw["transport"])
        queues = transport.get("queues")
        if isinstance(queues, list) and len(queues) == VirtioNet.num_queues - 1:
            transport["queues"] = [*queues, VirtqueueState(size=QUEUE_SIZE).to_dict()]
        table = transport.get("msix_table")
        old_vectors = VirtioNet.num_queues   # version 1: two queues + the config vector
        if isinstance(table, str) and len(table) == 2 * MSIX_ENTRY_SIZE * old_vectors:
            masked_entry = bytes(12) + MSIX_VECTOR_MASKED.to_bytes(4, "little")
            transport["msix_table"] = table + masked_entry.hex()
        return {**raw, "transport": transport, "announce": False}

    @classmethod
    def from_dict(cls, raw: Any) -> VirtioNetState:
        if not isinstance(raw, dict) or set(raw) != {"transport", "mac", "announce"}:
            raise DeviceStateError("virtio-net state: wrong fields")
        mac = raw["mac"]
        if not isinstance(mac, str) or (mac and not MAC_RE.match(mac)):
            raise DeviceStateError("virtio-net state: bad mac")
        if not isinstance(raw["announce"], bool):
            raise DeviceStateError("virtio-net state: bad announce")
        return cls(VirtioPciState.from_dict(raw["transport"]), mac.lower(), raw["announce"])


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

    def enable_async_rx(self, lock: contextlib.AbstractContextManager[Any], running: Callable[[], bool]) -> None:
        """Deliver each arriving frame at once from the backend thread: take ``lock`` (the
        machine's big lock) and, if ``running()``, :meth:`poll_rx` (which raises the rx
        interrupt). For guests that wait for an interrupt instead of kicking. A paused
        machine gets nothing (its RAM must not change); its frames wait in the backlog."""
        def deliver() -> None:
            with lock:
                if running():
                    self.poll_rx()
        self.net.on_frame = deliver

    def announce_guest(self) -> bool:
        """Ask the guest to announce itself (big lock held, after a migration's switch-over):
        set VIRTIO_NET_S_ANNOUNCE and raise the configuration-change interrupt (MSI-X config
        vector, or ISR bit 1 and INTx). Only when the driver is running and negotiated
        GUEST_ANNOUNCE (which needs CTRL_VQ, for the ack); False otherwise."""
        s = self.s
        wanted = 1 << F_GUEST_ANNOUNCE | 1 << F_CTRL_VQ
        if (self.detached or s.driver_features & wanted != wanted or not s.status & STATUS_DRIVER_OK
                or s.status & STATUS_NEEDS_RESET):
            return False
        self.net.status |= STATUS_ANNOUNCE
        s.config_generation = (s.config_generation + 1) & 0xFF
        self._interrupt(ISR_CONFIG, s.config_msix_vector)
        return True

    def save(self) -> VirtioNetState:  # type: ignore[override]
        return VirtioNetState(super().save(), format_mac(self.net.mac),
                              bool(self.net.status & STATUS_ANNOUNCE))

    def restore(self, state: VirtioNetState) -> None:  # type: ignore[override]
        if state.mac and state.mac != format_mac(self.net.mac):
            raise DeviceStateError(f"virtio-net state: mac {state.mac} differs from the device's "
                                   f"{format_mac(self.net.mac)}")
        if not state.transport.config:
            self.net.drop_backlog()
        super().restore(state.transport)
        self.net.status = STATUS_LINK_UP | (STATUS_ANNOUNCE if state.announce else 0)


def announce_guests(devices: Iterable[object]) -> int:
    """:meth:`VirtioNetPciDevice.announce_guest` on every virtio-net in ``devices`` (big
    lock held); returns how many were asked to announce."""
    return sum(1 for d in devices if isinstance(d, VirtioNetPciDevice) and d.announce_guest())
