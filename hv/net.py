"""Network backends for virtio-net: where the guest's Ethernet frames go and come from.

* :class:`SocketNetBackend` (``-netdev socket,id=N,listen=PATH`` or ``connect=PATH``):
  an unprivileged unix ``SOCK_SEQPACKET`` socket, one Ethernet frame per message (no
  virtio header, no length prefix). ``listen`` binds PATH (which must not exist) and
  accepts one peer at a time; when that peer hangs up the next one is accepted. ``connect``
  connects to a listening PATH at start (the peer must be listening). Two hv processes
  (one ``listen``, one ``connect``) are two machines joined by a cable; a test process can
  be either end.
* :class:`TapNetBackend` (``-netdev tap,id=N,ifname=IF``): ``/dev/net/tun`` with
  ``IFF_TAP | IFF_NO_PI``; needs CAP_NET_ADMIN (or a persistent tap owned by the user).

Both run one reader thread that hands every received frame to a callback (the device
queues it); :meth:`NetBackend.send` writes one frame without blocking. A frame that cannot
be sent (no peer connected yet, peer gone, socket buffer full) is dropped and counted, as
a NIC drops frames on a link that is down or congested. Received frames longer than
:data:`MAX_FRAME` are dropped and counted.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import select
import socket
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hv.errors import DeviceError

log = logging.getLogger(__name__)

# Largest frame either direction carries: 64 KiB of payload plus an Ethernet header with
# a VLAN tag. Without GSO features a guest never sends more than its MTU + 14.
MAX_FRAME = 65536 + 18
MIN_FRAME = 14  # an Ethernet header

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFNAMSIZ = 16

FrameSink = Callable[[bytes], None]


class NetError(DeviceError, OSError):
    """A network backend could not be opened (bad path, peer missing, no permission)."""


@dataclass
class NetStats:
    """Counters of one backend (host side)."""

    tx_frames: int = 0
    tx_dropped: int = 0        # no peer / peer gone / would block
    rx_frames: int = 0
    rx_dropped: int = 0        # oversize or runt frames from the peer


@dataclass
class NetBackend:
    """Base class: a frame transport with a reader thread.

    Subclasses provide ``_fd()`` (what the reader polls), ``_recv()`` and ``_send()``.
    """

    name: str
    stats: NetStats = field(default_factory=NetStats)

    def __post_init__(self) -> None:
        self._sink: FrameSink | None = None
        self._thread: threading.Thread | None = None
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._closed = False
        self._lock = threading.Lock()   # guards the connection socket / fd swap

    # -- public ------------------------------------------------------------------------
    def start(self, sink: FrameSink) -> None:
        """Start the reader thread; ``sink(frame)`` is called from it for every frame."""
        if self._thread is not None:
            raise RuntimeError("backend already started")
        self._sink = sink
        self._thread = threading.Thread(target=self._reader, name=f"net-{self.name}", daemon=True)
        self._thread.start()

    def send(self, frame: bytes | bytearray | memoryview) -> bool:
        """Send one frame without blocking; False (and counted) when it was dropped."""
        if self._closed:
            self.stats.tx_dropped += 1
            return False
        try:
            sent = self._send(frame)
        except OSError as exc:
            log.debug("netdev %s: send failed: %s", self.name, exc.strerror)
            sent = False
        if sent:
            self.stats.tx_frames += 1
        else:
            self.stats.tx_dropped += 1
        return sent

    def acquire(self) -> None:
        """Open the socket/device if it is not open (a migration destination at switch-over)."""
        raise NotImplementedError

    def release(self) -> None:
        """Close the socket/device but keep the backend (a migration source at switch-over)."""
        raise NotImplementedError

    def _wake(self) -> None:
        """Make the reader thread look at the (new) file descriptor."""
        if self._closed:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def close(self) -> None:
        """Stop the reader thread and release the socket/device; idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._release()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # -- reader -----------------------------------------------------------------------------
    def _reader(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        current: int | None = None
        while not self._closed:
            fd = self._fd()
            if fd != current:
                if current is not None:
                    with contextlib.suppress(KeyError):
                        poller.unregister(current)
                if fd is not None:
                    poller.register(fd, select.POLLIN)
                current = fd
            try:
                events = poller.poll(500)
            except InterruptedError:
                continue
            for ready, mask in events:
                if ready == self._wake_r:
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 64)
                    continue
                if self._closed:
                    continue
                try:
                    self._readable(mask)
                except OSError as exc:
                    if not self._closed:
                        log.warning("netdev %s: receive failed: %s", self.name, exc.strerror)
                        self._peer_lost()
                except Exception:  # a bug here must not silently stop the NIC's receive side
                    log.exception("netdev %s: receive failed", self.name)
                    self._peer_lost()

    def _deliver(self, frame: bytes) -> None:
        if len(frame) < MIN_FRAME or len(frame) > MAX_FRAME:
            self.stats.rx_dropped += 1
            return
        self.stats.rx_frames += 1
        if self._sink is not None:
            self._sink(frame)

    # -- subclass hooks -------------------------------------------------------------------
    def _fd(self) -> int | None:
        raise NotImplementedError

    def _readable(self, mask: int) -> None:
        raise NotImplementedError

    def _send(self, frame: bytes | bytearray | memoryview) -> bool:
        raise NotImplementedError

    def _peer_lost(self) -> None:
        return None

    def _release(self) -> None:
        raise NotImplementedError


@dataclass
class SocketNetBackend(NetBackend):
    """A unix SOCK_SEQPACKET cable end: ``role`` is ``"listen"`` or ``"connect"``."""

    path: Path = Path()
    role: str = "connect"
    attach: bool = True     # False: open later with acquire() (migration destination)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._listener: socket.socket | None = None
        self._conn: socket.socket | None = None
        if self.role not in ("listen", "connect"):
            self._cleanup_pipe()
            raise NetError(errno.EINVAL, f"unknown socket role {self.role!r}")
        if self.attach:
            try:
                self.acquire()
            except NetError:
                self._cleanup_pipe()
                raise

    def acquire(self) -> None:
        """Bind and listen, or connect; no-op when already attached. Raises NetError."""
        with self._lock:
            if self._listener is not None or self._conn is not None:
                return
        if self.role == "listen":
            if os.path.lexists(self.path):
                raise NetError(errno.EEXIST, f"{self.path} already exists (remove it or choose another path)")
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                listener.bind(str(self.path))
                listener.listen(1)
                listener.setblocking(False)
            except OSError as exc:
                listener.close()
                raise NetError(exc.errno, f"cannot listen on {self.path}: {exc.strerror}") from None
            with self._lock:
                self._listener = listener
        else:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                conn.connect(str(self.path))
                conn.setblocking(False)
            except OSError as exc:
                conn.close()
                raise NetError(exc.errno, f"cannot connect to {self.path}: {exc.strerror}") from None
            with self._lock:
                self._conn = conn
        self._wake()

    def release(self) -> None:
        """Hang up and stop listening (the path is removed); :meth:`acquire` undoes it."""
        self._release()
        self._wake()

    def _cleanup_pipe(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    @property
    def connected(self) -> bool:
        return self._conn is not None

    def _fd(self) -> int | None:
        with self._lock:
            if self._conn is not None:
                return self._conn.fileno()
            return self._listener.fileno() if self._listener is not None else None

    def _readable(self, mask: int) -> None:
        with self._lock:
            conn, listener = self._conn, self._listener
        if conn is None:
            if listener is None:
                return
            try:
                new, _ = listener.accept()
            except BlockingIOError:
                return
            new.setblocking(False)
            with self._lock:
                self._conn = new
            log.info("netdev %s: peer connected on %s", self.name, self.path)
            return
        while True:
            try:
                data, _, flags, _ = conn.recvmsg(MAX_FRAME + 1)
            except BlockingIOError:
                return
            if not data and not flags & socket.MSG_TRUNC:
                self._peer_lost()
                return
            if flags & socket.MSG_TRUNC:
                self.stats.rx_dropped += 1
                continue
            self._deliver(data)

    def _send(self, frame: bytes | bytearray | memoryview) -> bool:
        with self._lock:
            conn = self._conn
        if conn is None:
            return False
        try:
            conn.send(frame)
        except (BlockingIOError, BrokenPipeError, ConnectionResetError):
            return False
        return True

    def _peer_lost(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
            log.info("netdev %s: peer on %s hung up", self.name, self.path)

    def _release(self) -> None:
        with self._lock:
            conn, self._conn = self._conn, None
            listener, self._listener = self._listener, None
        # Stop listening (and remove the path) before hanging up, so a peer that reconnects
        # at once finds nobody instead of a listener about to close.
        if listener is not None:
            listener.close()
            try:
                if stat.S_ISSOCK(os.lstat(self.path).st_mode):
                    os.unlink(self.path)
            except OSError:
                pass
        if conn is not None:
            conn.close()


@dataclass
class TapNetBackend(NetBackend):
    """A tap interface through /dev/net/tun (IFF_TAP | IFF_NO_PI)."""

    ifname: str = ""
    attach: bool = True     # False: open later with acquire() (migration destination)

    def __post_init__(self) -> None:
        super().__post_init__()
        self._tap: int | None = None
        if self.attach:
            try:
                self.acquire()
            except NetError:
                self._cleanup()
                raise

    def acquire(self) -> None:
        """Attach to the tap interface; no-op when attached. Raises NetError."""
        if self._tap is not None:
            return
        try:
            fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise NetError(exc.errno, f"cannot open /dev/net/tun: {exc.strerror}") from None
        try:
            fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", self.ifname.encode(), IFF_TAP | IFF_NO_PI))
        except OSError as exc:
            os.close(fd)
            hint = " (needs CAP_NET_ADMIN, or a persistent tap owned by this user)" \
                if exc.errno in (errno.EPERM, errno.EACCES) else ""
            raise NetError(exc.errno, f"cannot attach tap {self.ifname}: {exc.strerror}{hint}") from None
        self._tap = fd
        self._wake()

    def release(self) -> None:
        """Detach from the tap (a non-persistent tap disappears); :meth:`acquire` undoes it."""
        self._release()
        self._wake()

    def _cleanup(self) -> None:
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _fd(self) -> int | None:
        return self._tap

    def _readable(self, mask: int) -> None:
        if self._tap is None:
            return
        while True:
            try:
                data = os.read(self._tap, MAX_FRAME + 1)
            except BlockingIOError:
                return
            if not data:
                return
            self._deliver(data)

    def _send(self, frame: bytes | bytearray | memoryview) -> bool:
        if self._tap is None:
            return False
        try:
            os.write(self._tap, frame)
        except BlockingIOError:
            return False
        return True

    def _release(self) -> None:
        if self._tap is not None:
            os.close(self._tap)
            self._tap = None


def open_netdev(kind: str, name: str, *, path: Path | None = None, role: str = "connect",
                ifname: str = "", attach: bool = True) -> NetBackend:
    """Open a backend (``kind`` ``"socket"`` or ``"tap"``); raises :class:`NetError`.

    ``attach=False`` creates it detached: :meth:`NetBackend.acquire` opens it later.
    """
    if kind == "socket":
        if path is None:
            raise NetError(errno.EINVAL, "socket netdev needs a path")
        return SocketNetBackend(name, path=path, role=role, attach=attach)
    if kind == "tap":
        return TapNetBackend(name, ifname=ifname, attach=attach)
    raise NetError(errno.EINVAL, f"unknown netdev type {kind!r}")


# -- self-announce after a migration (QEMU's qemu_announce_self) ----------------------------------
ETH_P_RARP = 0x8035
ANNOUNCE_INITIAL = 0.050   # QEMU's announce-initial (ms -> s)
ANNOUNCE_MAX = 0.550       # announce-max
ANNOUNCE_ROUNDS = 5        # announce-rounds
ANNOUNCE_STEP = 0.100      # announce-step


def rarp_frame(mac: bytes) -> bytes:
    """QEMU's self-announce frame: Ethernet broadcast from ``mac``, ethertype RARP, a
    'request reverse' (opcode 3) for ``mac``, IPs zero, padded to the 60-byte minimum.
    Switches learn where the MAC now lives; nothing answers it."""
    if len(mac) != 6:
        raise ValueError("a MAC address is 6 bytes")
    arp = (b"\x00\x01"            # hardware type: Ethernet
           + b"\x08\x00"          # protocol type: IPv4
           + b"\x06\x04"          # hardware / protocol address lengths
           + b"\x00\x03"          # opcode: reverse request
           + mac + bytes(4) + mac + bytes(4))
    frame = b"\xff" * 6 + mac + ETH_P_RARP.to_bytes(2, "big") + arp
    return frame.ljust(60, b"\x00")


def announce_self(nics: list[tuple[NetBackend, bytes]], rounds: int = ANNOUNCE_ROUNDS,
                  initial: float = ANNOUNCE_INITIAL, step: float = ANNOUNCE_STEP,
                  maximum: float = ANNOUNCE_MAX) -> threading.Thread | None:
    """After a migration's switch-over, tell the network where the guest's MACs are now:
    ``rounds`` RARP frames per NIC from a background thread, the first at once, then
    after ``initial``, ``initial + step``, ... (capped at ``maximum``), as QEMU does with
    its announce-* parameters. Returns the thread (None without NICs)."""
    if not nics or rounds <= 0:
        return None
    frames = [(backend, rarp_frame(mac)) for backend, mac in nics]

    def run() -> None:
        for round_index in range(rounds):
            for backend, frame in frames:
                backend.send(frame)
            if round_index + 1 < rounds:
                time.sleep(min(initial + step * round_index, maximum))
        log.info("announced %d NIC(s) with %d RARP rounds", len(frames), rounds)

    thread = threading.Thread(target=run, name="announce-self", daemon=True)
    thread.start()
    return thread
