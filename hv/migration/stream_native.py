"""The migration stream's hot loops in native code (``backends/native/hv_native_stream.c``).

:class:`Packer` frames one RAM section on the source: zero-page scan, the copy of the
data pages out of a running guest and zlib's CRC-32 of that copy in one pass (PCLMULQDQ).
:class:`LiveSender` sends RAM_LIVE sections (page checksums in place, pages straight from
guest RAM) to a plain socket, framing and sending every section of a chunk in one call, or
format 1.7's RAM_HASHED sections (an XXH3-64 per page, computed right after each group of
pages was sent, and sent after them).
:class:`Receiver` applies RAM sections on the destination: framing is read ahead into a
staging buffer, page data goes straight into guest RAM (``recvmsg``/``readv`` with one
iovec per run of data pages, plus the staging buffer for what follows), and is
checksummed while it is still in the cache. One call per 1 MiB section, no Python per page.

Both keep the stream format as it is (a stream is the same bytes either way) and the
reader's rules: the receiver applies a RAM section only once its header, run header and
page-kind map are buffered and valid; anything else is handed back, unconsumed, to
:class:`hv.migration.stream_reader.StreamReader`, which reads it from the staging buffer
first (:class:`Drained`) and raises its own error if it is malformed.

The native paths are used on x86_64 hosts with PCLMULQDQ, for plain sockets and
unbuffered files (not TLS: its bytes are decrypted in Python). ``HV_NATIVE_STREAM=0`` in
the environment turns them off (for measuring, and for tests that compare both paths).
"""
from __future__ import annotations

import ctypes
import errno
import io
import os
import socket
import ssl
import zlib
from dataclasses import dataclass, field
from typing import Any

from hv.migration.stream_format import MAX_RUN_PAGES, PAGE_SIZE, SECTION_HEADER

RX_RAM, RX_OTHER, RX_WAIT, RX_EOF, RX_OSERROR, RX_BADCRC = 1, 2, 3, 4, 5, 6
ST_DATA, ST_CRC = 1, 2
STAGING_BYTES = 256 << 10  # read-ahead buffer: framing, and page data that comes with it
MAX_REGIONS = 16
_FRAMING = SECTION_HEADER.size + 16  # section header + RAM run header


def _isal_crc(ffi: Any, lib: Any) -> None:
    """Hand ISA-L's ``crc32_gzip_refl`` (exported by the isal package's extension module,
    a dependency already) to the native code, if it is there and agrees with zlib."""
    try:
        import isal.isal_zlib as isal_zlib  # noqa: PLC0415

        address = ctypes.cast(ctypes.CDLL(isal_zlib.__file__).crc32_gzip_refl, ctypes.c_void_p).value
    except (ImportError, OSError, AttributeError):
        return
    if not address:
        return
    lib.hvs_set_crc(ffi.cast("void *", address))
    wide = lib.hvs_use_wide_crc(-1)
    lib.hvs_use_wide_crc(0)  # probe ISA-L's loop itself
    if not _crc_agrees(lib):
        lib.hvs_set_crc(ffi.NULL)
    lib.hvs_use_wide_crc(wide)


def _crc_agrees(lib: Any) -> bool:
    probe = bytes(range(256)) * 40 + b"hv"
    return bool(lib.hvs_crc32(12345, probe, len(probe)) == zlib.crc32(probe, 12345))


def _load() -> tuple[Any, Any] | None:
    if os.environ.get("HV_NATIVE_STREAM", "1") == "0":
        return None
    try:
        from hv_backends._hv_native import ffi, lib  # noqa: PLC0415 - built at install time
    except ImportError:
        return None
    if not hasattr(lib, "hvs_available") or not lib.hvs_available():
        return None
    # Which CRC-32 loop (for A/B measuring): "fold" hv's 128-bit PCLMULQDQ fold, "isal"
    # ISA-L's; by default hv's 256-bit fold where the CPU has AVX2 and VPCLMULQDQ but not
    # AVX-512, else ISA-L's (see hv_native_stream.c).
    choice = os.environ.get("HV_NATIVE_STREAM_CRC", "")
    if choice in ("fold", "isal"):
        lib.hvs_use_wide_crc(0)
    if choice != "fold":
        _isal_crc(ffi, lib)
    if lib.hvs_use_wide_crc(-1) and not _crc_agrees(lib):
        lib.hvs_use_wide_crc(0)
    return ffi, lib


_NATIVE = _load()


def available() -> bool:
    """True when the native stream paths can be used on this host."""
    return _NATIVE is not None


def xxh3_page(page: bytes | bytearray | memoryview) -> int:
    """XXH3-64 (seed 0) of one 4096-byte page, computed by the native code: the page hash of
    RAM_HASHED sections (format 1.7)."""
    if _NATIVE is None:
        raise RuntimeError("native stream code unavailable")
    if len(page) != PAGE_SIZE:
        raise ValueError(f"a page hash covers {PAGE_SIZE} bytes, not {len(page)}")
    ffi, lib = _NATIVE
    return int(lib.hvs_xxh3_page(ffi.from_buffer("uint8_t[]", page)))


def use_wide_hash(on: bool | None = None) -> bool:
    """Whether the page hash runs its AVX2 loop (``on``: choose; only where the CPU has AVX2;
    tests compare both loops with the reference values)."""
    if _NATIVE is None:
        return False
    return bool(_NATIVE[1].hvs_use_wide_hash(-1 if on is None else int(on)))


def crc32(data: bytes | bytearray | memoryview, crc: int = 0) -> int:
    """zlib's CRC-32 computed by the native code (tests compare the two)."""
    if _NATIVE is None:
        raise RuntimeError("native stream code unavailable")
    ffi, lib = _NATIVE
    return int(lib.hvs_crc32(crc, ffi.from_buffer("uint8_t[]", data), len(data)))


@dataclass
class Packer:
    """Frames RAM sections for :class:`hv.migration.stream_writer.StreamWriter`."""

    run_pages: int
    copy_pages: int = 0  # the most pages one copying section holds (0: run_pages)
    _meta: bytearray = field(init=False)
    _copy: bytearray = field(init=False)

    def __post_init__(self) -> None:
        assert _NATIVE is not None
        ffi, _ = _NATIVE
        self.copy_pages = min(self.copy_pages or self.run_pages, self.run_pages)
        self._meta = bytearray(_FRAMING + self.run_pages * 5)  # room for RAM_LIVE page checksums
        # bytearray() writes its zeros: the copy buffer is resident at its full size
        self._copy = bytearray(self.copy_pages * PAGE_SIZE)
        self._meta_c = ffi.from_buffer("uint8_t[]", self._meta)
        self._copy_c = ffi.from_buffer("uint8_t[]", self._copy)
        self._crc = ffi.new("uint32_t *")

    def pack(self, view: memoryview, start: int, count: int, known_zero: bytes | None,
             copy: bool) -> tuple[int, memoryview, int]:
        """(normal pages, framing bytes — header, run header, kind map —, section CRC).

        With ``copy`` the normal pages are in :attr:`copied` afterwards (what must be sent
        while the guest runs); without, the caller sends them from ``view``."""
        assert _NATIVE is not None and 1 <= count <= self.run_pages <= MAX_RUN_PAGES
        assert not copy or count <= self.copy_pages
        ffi, lib = _NATIVE
        zero_map = ffi.NULL if known_zero is None else ffi.from_buffer("uint8_t[]", known_zero)
        normal = lib.hvs_pack(ffi.from_buffer("uint8_t[]", view), start, count, zero_map,
                              self._meta_c, self._copy_c if copy else ffi.NULL, self._crc)
        if normal < 0:
            raise ValueError(f"cannot frame {count} pages")
        return int(normal), memoryview(self._meta)[:_FRAMING + count], int(self._crc[0])

    def pack_live(self, view: memoryview, start: int, count: int,
                  known_zero: bytes | None) -> tuple[int, memoryview, int]:
        """A RAM_LIVE section (format 1.5): (normal pages, framing bytes — header, run
        header, kind map, one CRC-32 per normal page —, section CRC over those bytes). The
        caller sends the normal pages from ``view`` itself, with no copy."""
        assert _NATIVE is not None and 1 <= count <= self.run_pages <= MAX_RUN_PAGES
        ffi, lib = _NATIVE
        zero_map = ffi.NULL if known_zero is None else ffi.from_buffer("uint8_t[]", known_zero)
        normal = lib.hvs_pack_live(ffi.from_buffer("uint8_t[]", view), start, count, zero_map,
                                   self._meta_c, self._crc)
        if normal < 0:
            raise ValueError(f"cannot frame {count} pages")
        framing = _FRAMING + count + 4 * int(normal)
        return int(normal), memoryview(self._meta)[:framing], int(self._crc[0])

    def copied(self, normal: int) -> memoryview:
        return memoryview(self._copy)[:normal * PAGE_SIZE]


def _fd_of(source: Any) -> tuple[int, bool] | None:
    """(descriptor, is a socket) of a channel the receiver may read directly, else None."""
    sock = getattr(source, "sock", None)
    if isinstance(sock, socket.socket):
        if isinstance(sock, ssl.SSLSocket) or sock.fileno() < 0:
            return None
        return sock.fileno(), True
    fileobj = getattr(source, "file", None)
    if isinstance(fileobj, io.FileIO) and not fileobj.closed:
        return fileobj.fileno(), False
    return None


class Receiver:
    """Native RAM-section receiver over one source (see the module docstring).

    ``poll_ms``: how long one :meth:`step` may wait for bytes before it returns
    ``RX_WAIT`` (the reader then checks whether it must give up); -1 waits for good.
    """

    def __init__(self, fd: int, is_socket: bool, regions: list[tuple[int, int]],
                 page_count: int, covered: bytearray, poll_ms: int) -> None:
        assert _NATIVE is not None
        ffi, lib = _NATIVE
        self._lib = lib
        self._ffi = ffi
        rx = ffi.new("struct hvs_rx *")
        rx.fd, rx.is_socket, rx.poll_ms = fd, int(is_socket), poll_ms
        rx.page_count = page_count
        rx.nregions = len(regions)
        for i, (first_page, pages) in enumerate(regions):
            rx.regions[i].first_page = first_page
            rx.regions[i].pages = pages
        self._covered = ffi.from_buffer("uint8_t[]", covered)
        rx.covered = self._covered
        self._staging = ffi.new("uint8_t[]", STAGING_BYTES)
        rx.buf = self._staging
        rx.cap = STAGING_BYTES
        self.rx = rx
        self.applied = 0  # RAM sections applied here

    def set_pristine(self, pristine: bytearray) -> None:
        """Pages marked 1 in ``pristine`` (one byte per page of guest RAM) are known zero:
        a zero page there is not read. The receiver clears a page's byte before it writes
        the page (:func:`hv.migration.pages.take_pristine`)."""
        assert len(pristine) >= int(self.rx.page_count)
        self._pristine = self._ffi.from_buffer("uint8_t[]", pristine)
        self.rx.pristine = self._pristine

    def allow_live(self) -> None:
        """The stream declared format 1.5 or later: RAM_LIVE sections may be applied."""
        self.rx.live_ok = 1

    def allow_hashed(self) -> None:
        """The stream declared format 1.7 or later: RAM_HASHED sections may be applied."""
        self.rx.hashed_ok = 1

    @property
    def torn(self) -> int:
        """Pages of RAM_LIVE / RAM_HASHED sections whose own checksum failed (torn by the guest)."""
        return int(self.rx.torn_total)

    def step(self, regions: list[Any]) -> int:
        """Apply the next RAM section (see ``hvs_rx_step``). ``regions`` (GuestMemory's)
        are pinned for the call: their mappings cannot be closed under the native code
        (closing raises BufferError, as it does while a Python read holds a view)."""
        ffi = self._ffi
        pins = [ffi.from_buffer("uint8_t[]", region.view, require_writable=True) for region in regions]
        try:
            for i, pin in enumerate(pins):
                self.rx.regions[i].host = pin
            rc = int(self._lib.hvs_rx_step(self.rx))
            self.applied += rc == RX_RAM
            return rc
        finally:
            for pin in pins:
                ffi.release(pin)

    @property
    def buffered(self) -> int:
        return int(self.rx.len - self.rx.pos)

    @property
    def received(self) -> int:
        """Bytes read from the source so far (a stall watch sees progress in it)."""
        return int(self.rx.received)

    def take(self, view: memoryview) -> int:
        """Move up to ``len(view)`` read-ahead bytes into ``view``."""
        return int(self._lib.hvs_rx_take(self.rx, self._ffi.from_buffer("uint8_t[]", view), len(view)))

    def what(self) -> str:
        return self._ffi.string(self.rx.what).decode() if self.rx.what else "section header"

    def partial_bytes(self) -> int:
        """Bytes of the section in progress read before end of input (the truncation message)."""
        rx = self.rx
        if rx.state == ST_DATA:
            return int(rx.section_bytes + rx.data_done)
        return int(rx.section_bytes + rx.len - rx.pos)


LIVE_SEND_MAX_RUN_PAGES = 1024  # hvs_send_live's iovec array: a section's data runs in one sendmsg


# The smallest send buffer (as getsockopt reports it: twice what was asked) with which
# LiveSender splices by default; STREAM_SOCKET_BUFFER asks for 4 MiB.
SPLICE_MIN_SNDBUF = 2 << 20


class LiveSender:
    """Sends RAM_LIVE sections straight from guest RAM to a plain socket
    (``hvs_send_live``): one call per chunk of pages, in which each section of
    ``run_pages`` pages is framed, checksummed and sent while its pages are still in the
    cache, with no Python between sections. The bytes are those
    :meth:`hv.migration.stream_writer.StreamWriter.write_ram` sends for such sections."""

    def __init__(self, sock: socket.socket, run_pages: int, splice: bool | None = None) -> None:
        """``splice``: move the pages into the socket by reference (``vmsplice`` + ``splice``)
        instead of copying them. By default on a UNIX socket whose send buffer holds at least
        ``SPLICE_MIN_SNDBUF``: there the sender's copy cost about as much as the receiver's,
        and references halve the source's CPU, but with the ~416 KiB buffer an older kernel's
        default cap allows, the sender is woken so often that splicing was slower than
        copying (512 MiB, 3/4 written: 198 vs 173 ms). Over TCP loopback the sender also runs
        the receive path, and splicing measured no faster."""
        assert _NATIVE is not None and 1 <= run_pages <= LIVE_SEND_MAX_RUN_PAGES
        ffi, lib = _NATIVE
        self._ffi, self._lib = ffi, lib
        self.sock = sock
        self.run_pages = run_pages
        # framing, then page CRCs (RAM_LIVE) or page hashes (RAM_HASHED), section CRC
        self._meta = ffi.new("uint8_t[]", _FRAMING + run_pages * 9 + 4)
        self._tx = ffi.new("struct hvs_tx *")
        self._tx.fd = sock.fileno()
        if splice is None:
            splice = sock.family == socket.AF_UNIX and \
                sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= SPLICE_MIN_SNDBUF
        self._tx.splice = int(splice)

    @property
    def splicing(self) -> bool:
        """Whether pages go by reference (False once the kernel refused it)."""
        return bool(self._tx.splice)

    def send(self, view: memoryview, start: int, count: int, known_zero: bytes | None, *,
             hashed: bool = False) -> tuple[int, int, int]:
        """(zero pages, normal pages, bytes) of ``count`` pages from ``view`` sent as stream
        pages ``start ..``, as RAM_LIVE sections, or with ``hashed`` as RAM_HASHED ones
        (format 1.7: each group of pages hashed right after it was sent). Raises OSError
        (TimeoutError when the socket took nothing for its timeout); the stream is then cut
        inside a section."""
        ffi, tx = self._ffi, self._tx
        tx.hashed = int(hashed)
        timeout = self.sock.gettimeout()
        tx.timeout_ms = -1 if timeout is None else max(int(timeout * 1000), 1)
        assert len(view) >= count * PAGE_SIZE and (known_zero is None or len(known_zero) >= count)
        zero_map = ffi.NULL if known_zero is None else ffi.from_buffer("uint8_t[]", known_zero)
        pin = ffi.from_buffer("uint8_t[]", view)
        try:
            rc = self._lib.hvs_send_live(tx, pin, start, count, zero_map, self.run_pages, self._meta)
        finally:
            ffi.release(pin)
        if rc < 0:
            code = int(tx.err_errno)
            if code == errno.ETIMEDOUT:
                raise TimeoutError("timed out")
            raise OSError(code, os.strerror(code))
        return int(tx.zero), int(tx.normal), int(tx.bytes)


def live_sender_for(sink: Any, run_pages: int) -> LiveSender | None:
    """A :class:`LiveSender` when ``sink`` is a channel over a plain connected socket (not
    TLS: its bytes are encrypted in Python) and sections of ``run_pages`` fit one call's
    iovecs, else None."""
    if _NATIVE is None:
        return None
    sock = getattr(sink, "sock", None)
    if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket) or sock.fileno() < 0:
        return None
    if run_pages > LIVE_SEND_MAX_RUN_PAGES:  # larger sections (HV_STREAM_RUN_PAGES): Python sends them
        return None
    return LiveSender(sock, run_pages)


def _poll_ms(source: Any) -> int:
    """How long one native read may wait: the channel's ``poll_seconds`` (it then decides in
    ``check_idle`` whether to go on), else its socket's timeout, else for good (-1)."""
    seconds = getattr(source, "poll_seconds", None)
    if seconds is None:
        sock = getattr(source, "sock", None)
        seconds = sock.gettimeout() if isinstance(sock, socket.socket) else None
    return -1 if seconds is None else max(int(seconds * 1000), 1)


def receiver_for(source: Any, ram: Any, page_count: int, covered: bytearray) -> Receiver | None:
    """A :class:`Receiver` when ``source`` and ``ram`` (a GuestMemory) allow one, else None."""
    if _NATIVE is None:
        return None
    fd = _fd_of(source)
    regions = getattr(ram, "regions", None)
    if fd is None or not regions or len(regions) > MAX_REGIONS:
        return None
    try:
        spans = [(r.offset // PAGE_SIZE, r.size // PAGE_SIZE) for r in regions if r.view is not None]
    except AttributeError:
        return None
    return Receiver(fd[0], fd[1], spans, page_count, covered, _poll_ms(source))


class Drained:
    """A source whose reads take the receiver's read-ahead bytes first, so the Python
    reader sees the stream exactly where the native receiver left it."""

    def __init__(self, source: Any, receiver: Receiver) -> None:
        self.source = source
        self.receiver = receiver

    def readinto(self, buf: memoryview) -> int:
        if self.receiver.buffered:
            return self.receiver.take(buf)
        return int(self.source.readinto(buf))

    def readv(self, buffers: list[memoryview]) -> int:
        if self.receiver.buffered:
            return self.receiver.take(buffers[0])
        readv = getattr(self.source, "readv", None)
        if readv is None:
            return int(self.source.readinto(buffers[0]))
        return int(readv(buffers))

    def __getattr__(self, name: str) -> Any:
        return getattr(self.source, name)
