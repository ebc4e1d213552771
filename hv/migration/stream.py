"""The hv migration stream: a versioned, self-describing, checksummed binary format.

Layout (all integers little-endian; the full description is ``docs/migration-stream.md``)::

    preamble   magic "HVMIGSTR" | u16 major | u16 minor | u32 flags (0)
    section    u8 type | u8 flags | u16 reserved (0) | u32 length | payload | u32 crc32

The crc32 covers the 8-byte section header and the payload. Sections, in the only order
a reader accepts: HEADER, CONFIG, then RAM runs and ROUND_END markers, then CPU and
DEVICE states, then END. ERROR may appear anywhere after the preamble: the sender gave up;
so may CANCEL (1.2): the source's operator canceled. Text a peer sends is escaped
(``hv.textsafe.printable``) before it can reach a message.

The destination applies RAM pages directly into guest RAM as they arrive (scatter reads
into the guest's own pages, no staging copy). That is safe because every page number is
checked against the destination's RAM *before* a byte is read into it, and the guest
never runs until END has been validated: a later checksum failure or truncation aborts
the whole incoming migration and the half-written RAM is discarded with the process.
Nothing outside RAM is ever written, and no allocation is proportional to an untrusted
length beyond the caps below.

On the source, ``write_ram`` copies a run's normal pages once into a private buffer while
the guest may run (``stable=False``), so the checksum and the bytes sent always agree;
with the guest paused (``stable=True``) it sends slices of guest RAM with no copy.
"""
from __future__ import annotations

import enum
import io
import json
import logging
import os
import select
import struct
import uuid
try:  # ISA-L computes zlib's very CRC-32 (same values) about 13x faster, with PCLMULQDQ
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - a platform without isal wheels
    from zlib import crc32
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from hv import __version__ as HV_VERSION
from hv.devconfig import ID_RE
from hv.errors import StreamError
from hv.migration.pages import page_kinds, populate, zero_pages
from hv.state import CpuState, StateError, state_from_dict, state_to_dict
from hv.textsafe import printable, printable_bytes

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
MAGIC = b"HVMIGSTR"
FORMAT_MAJOR = 1
# 1.1: CPU sections may carry "power" (canonical state form 2: secondary vCPUs off /
# waiting for SIPI), the GIC has 288 INTIDs, and pcie-root-port devices exist. A 1.0
# reader refuses such a stream with the unknown field's name (its state validation is
# strict), which is what must happen: it could not run those guests.
# 1.2: a CANCEL section (type 10, flagged SKIPPABLE so a 1.0/1.1 reader skips it and then
# sees the connection end, as before): the source canceled, the destination stops cleanly.
# 1.3: q35 CONFIG/DEVICE sections carry the legacy devices pit, rtc and i8042. A 1.2
# destination refuses such a stream at CONFIG (a device it does not have); a 1.3
# destination loads older q35 streams without them (those devices keep their reset state).
FORMAT_MINOR = 3

PREAMBLE = struct.Struct("<8sHHI")
SECTION_HEADER = struct.Struct("<BBHI")
CRC = struct.Struct("<I")
RAM_RUN = struct.Struct("<QII")  # start page, page count, reserved (0)
ROUND = struct.Struct("<I")
CPU_INDEX = struct.Struct("<I")
DEVICE_HEAD = struct.Struct("<HHIB")  # name length, id length, version, encoding

FLAG_SKIPPABLE = 0x01  # a reader that does not know this section type may skip it
KNOWN_FLAGS = FLAG_SKIPPABLE

# Caps on untrusted sizes.
MAX_SECTION_BYTES = 64 << 20
MAX_JSON_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 4096
MAX_RUN_PAGES = 8192  # 32 MiB of page data per RAM section
DEFAULT_RUN_PAGES = 2048  # what the writer emits: 8 MiB sections
MAX_NAME_BYTES = 256
MAX_VCPUS = 1024
MAX_DEVICES = 1024

PAGE_ZERO = 0
PAGE_NORMAL = 1
ZERO_PAGE = bytes(PAGE_SIZE)
_NORMAL_BYTE = bytes([PAGE_NORMAL])
_ZERO_BYTE = bytes([PAGE_ZERO])
_IOV_BATCH = 512  # buffers per sendmsg/writev call (IOV_MAX is 1024 on Linux)
# Normal runs at least this long are pre-faulted in one madvise(MADV_POPULATE_WRITE)
# before the socket copies into them: measured ~25% faster than faulting page by page.
POPULATE_MIN_PAGES = 16


class SectionType(enum.IntEnum):
    HEADER = 1
    CONFIG = 2
    RAM = 3
    ROUND_END = 4
    DEVICE = 5
    CPU = 6
    ERROR = 7
    END = 8
    OK = 9  # back channel only
    CANCEL = 10  # source -> destination, always flagged SKIPPABLE (format 1.2)


class StreamKind(enum.Enum):
    """What a stream must contain to be complete."""

    MIGRATION = "migration"  # config, RAM covering every page, every vCPU, END
    STATE = "state"  # file snapshot DIR/state: config, CPUs, devices, no RAM
    MEMORY = "memory"  # file snapshot DIR/memory: config, RAM covering every page


class DeviceEncoding(enum.IntEnum):
    JSON = 0
    BINARY = 1


class StreamWriteError(StreamError):
    """Writing the migration stream failed (the OS reason is in the message)."""


class PeerError(StreamError):
    """The other end sent an ERROR section: it gave up, and says why."""


class PeerCanceled(PeerError):
    """The source sent a CANCEL section: its operator canceled the migration."""


class ConfigMismatchError(StreamError):
    """Source and destination configurations differ (``mismatches`` lists each difference)."""

    def __init__(self, mismatches: list[str]) -> None:
        super().__init__("; ".join(mismatches))
        self.mismatches = mismatches


# --------------------------------------------------------------------------------------
# Configuration fingerprint
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeviceFingerprint:
    """One device as the compatibility check sees it."""

    type: str
    id: str
    bus: str = ""
    addr: str = ""
    # Attributes that must be equal on both ends (virtio-net "mac", drive "serial", ...).
    attrs: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type, "id": self.id, "bus": self.bus, "addr": self.addr,
                "attrs": dict(self.attrs)}


@dataclass(frozen=True)
class Fingerprint:
    """The configuration a destination must match before any guest state is touched."""

    arch: str
    machine: str
    vcpus: int
    memory: int  # bytes
    devices: tuple[DeviceFingerprint, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"arch": self.arch, "machine": self.machine, "vcpus": self.vcpus,
                "memory": self.memory, "devices": [d.to_dict() for d in self.devices]}

    @classmethod
    def from_dict(cls, raw: Any) -> "Fingerprint":
        """Validate an untrusted fingerprint object (from a stream) field by field."""
        if not isinstance(raw, dict):
            raise StreamError("config: expected a JSON object")
        expected = {"arch", "machine", "vcpus", "memory", "devices"}
        if set(raw) != expected:
            raise StreamError(f"config: fields {sorted(raw)} differ from {sorted(expected)}")
        arch = _check_str("config.arch", raw["arch"])
        machine = _check_str("config.machine", raw["machine"])
        vcpus = _check_uint("config.vcpus", raw["vcpus"], 1, MAX_VCPUS)
        memory = _check_uint("config.memory", raw["memory"], PAGE_SIZE, 1 << 48)
        if memory % PAGE_SIZE:
            raise StreamError(f"config.memory: {memory} is not a whole number of pages")
        devices_raw = raw["devices"]
        if not isinstance(devices_raw, list) or len(devices_raw) > MAX_DEVICES:
            raise StreamError(f"config.devices: expected a list of at most {MAX_DEVICES} devices")
        devices: list[DeviceFingerprint] = []
        seen: set[str] = set()
        for i, dev in enumerate(devices_raw):
            where = f"config.devices[{i}]"
            if not isinstance(dev, dict) or set(dev) != {"type", "id", "bus", "addr", "attrs"}:
                raise StreamError(f"{where}: expected an object with type, id, bus, addr, attrs")
            attrs = dev["attrs"]
            if not isinstance(attrs, dict) or len(attrs) > 64:
                raise StreamError(f"{where}.attrs: expected an object of at most 64 strings")
            dev_id = _check_id(f"{where}.id", dev["id"])
            if dev_id in seen:
                raise StreamError(f"{where}: duplicate device id {dev_id!r}")
            seen.add(dev_id)
            devices.append(DeviceFingerprint(
                type=_check_id(f"{where}.type", dev["type"]),
                id=dev_id,
                bus=_check_str(f"{where}.bus", dev["bus"], allow_empty=True),
                addr=_check_str(f"{where}.addr", dev["addr"], allow_empty=True),
                attrs={_check_str(f"{where}.attrs key", k): _check_str(f"{where}.attrs.{printable(k)}", v,
                                                                       allow_empty=True)
                       for k, v in attrs.items()},
            ))
        return cls(arch, machine, vcpus, memory, tuple(devices))


def _check_str(name: str, value: Any, *, allow_empty: bool = False, limit: int = 4096) -> str:
    if not isinstance(value, str) or len(value) > limit or (not value and not allow_empty):
        raise StreamError(f"{name}: expected a {'' if allow_empty else 'non-empty '}string of at most {limit} characters")
    return value


def _check_id(name: str, value: Any) -> str:
    """Device ids and types follow the -device/-drive id rule (hv.devconfig.ID_RE): a
    stream that names a device any other way is invalid input, refused before comparison
    (and before its text could reach an error line)."""
    if not isinstance(value, str) or not ID_RE.match(value):
        shown = f"'{printable(value)}'" if isinstance(value, str) else type(value).__name__
        raise StreamError(f"{name}: {shown[:80]} is not a valid device id (a letter, then letters, "
                          "digits, '_', '.', '-'; at most 64)")
    return value


def _check_uint(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise StreamError(f"{name}: expected an integer in [{low}, {high}], got {value!r}")
    return value


def _size_text(size: int) -> str:
    if size % (1 << 20) == 0:
        return f"{size >> 20} MiB"
    return f"{size} bytes"


def compare_fingerprints(source: Fingerprint | dict[str, Any],
                         dest: Fingerprint | dict[str, Any]) -> list[str]:
    """Every difference between two configurations, one human-readable line each.

    Every field is shown through :func:`hv.textsafe.printable`: one side came from a peer.
    """
    src = source if isinstance(source, Fingerprint) else Fingerprint.from_dict(source)
    dst = dest if isinstance(dest, Fingerprint) else Fingerprint.from_dict(dest)
    p = printable
    out: list[str] = []
    if src.arch != dst.arch:
        out.append(f"architecture mismatch: source {p(src.arch)}, destination {p(dst.arch)}")
    if src.machine != dst.machine:
        out.append(f"machine type mismatch: source {p(src.machine)}, destination {p(dst.machine)}")
    if src.vcpus != dst.vcpus:
        out.append(f"vCPU count mismatch: source {src.vcpus}, destination {dst.vcpus}")
    if src.memory != dst.memory:
        out.append(f"memory size mismatch: source {_size_text(src.memory)}, "
                   f"destination {_size_text(dst.memory)}")
    dst_devices = {d.id: d for d in dst.devices}
    src_ids = set()
    for s in src.devices:
        src_ids.add(s.id)
        d = dst_devices.get(s.id)
        name = f"{p(s.id)} ({p(s.type)})"
        if d is None:
            out.append(f"device {name} present on the source but not on the destination")
            continue
        if s.type != d.type:
            out.append(f"device {p(s.id)} type mismatch: source {p(s.type)}, destination {p(d.type)}")
            continue
        if (s.bus, s.addr) != (d.bus, d.addr):
            out.append(f"device {name} bus/addr mismatch: source {p(s.bus) or '-'}/{p(s.addr) or '-'}, "
                       f"destination {p(d.bus) or '-'}/{p(d.addr) or '-'}")
        for key in sorted(set(s.attrs) | set(d.attrs)):
            sv, dv = s.attrs.get(key), d.attrs.get(key)
            if sv != dv:
                out.append(f"device {name} {p(key)} mismatch: source "
                           f"{'(unset)' if sv is None else repr(sv)}, destination "
                           f"{'(unset)' if dv is None else repr(dv)}")
    for d in dst.devices:
        if d.id not in src_ids:
            out.append(f"device {p(d.id)} ({p(d.type)}) present on the destination but not on the source")
    return out


# --------------------------------------------------------------------------------------
# Sinks and sources
# --------------------------------------------------------------------------------------
class Sink(Protocol):
    def write(self, data: bytes | memoryview) -> Any: ...


class Source(Protocol):
    def readinto(self, buf: memoryview) -> int: ...


class SocketChannel:
    """Both ends of a connected socket: ``write``/``writev`` out, ``readinto`` in."""

    def __init__(self, sock: Any) -> None:
        self.sock = sock

    def write(self, data: bytes | memoryview) -> None:
        self.sock.sendall(data)

    def writev(self, buffers: list[bytes | memoryview]) -> None:
        """Send every buffer, in order, with as few ``sendmsg`` calls as the kernel allows."""
        _gather_all(buffers, self.sock.sendmsg)

    def readinto(self, buf: memoryview) -> int:
        return self.sock.recv_into(buf)

    def readv(self, buffers: list[memoryview]) -> int:
        """Scatter-read into ``buffers`` in one ``recvmsg_into`` call (at most IOV_MAX)."""
        return self.sock.recvmsg_into(buffers)[0]


def _gather_all(buffers: list[bytes | memoryview], send: Callable[[list[memoryview]], int]) -> None:
    """Write every buffer, in order, through ``send`` (sendmsg / writev: takes at most
    ``_IOV_BATCH`` buffers, returns the bytes it took), resuming after short writes."""
    pending = [memoryview(b).cast("B") for b in buffers if len(b)]
    while pending:
        batch = pending[:_IOV_BATCH]
        done = send(batch)
        # Drop fully written buffers, trim a partially written one.
        i = 0
        while i < len(batch) and done >= len(batch[i]):
            done -= len(batch[i])
            i += 1
        del pending[:i]
        if done:
            pending[0] = pending[0][done:]


class FileChannel:
    """A binary file object as a sink (``write``) or a source (``readinto``)."""

    def __init__(self, fileobj: Any) -> None:
        self.file = fileobj

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while len(view):
            n = self.file.write(view)
            if n is None:  # non-blocking raw file with nothing written: not supported
                raise StreamWriteError("file sink would block")
            view = view[n:]

    def writev(self, buffers: list[bytes | memoryview]) -> None:
        """Gather-write (``os.writev`` on an unbuffered file, else one buffer at a time)."""
        if not isinstance(self.file, io.FileIO):
            for buf in buffers:
                self.write(buf)
            return
        fd = self.file.fileno()
        _gather_all(buffers, lambda batch: os.writev(fd, batch))

    def readinto(self, buf: memoryview) -> int:
        n = self.file.readinto(buf)
        return n or 0

    def readv(self, buffers: list[memoryview]) -> int:
        """Scatter-read (``os.readv`` on an unbuffered file, else one buffer at a time)."""
        if isinstance(self.file, io.FileIO):
            return os.readv(self.file.fileno(), buffers)
        return self.readinto(buffers[0])


def _write_all(sink: Any, buffers: list[bytes | memoryview]) -> None:
    writev = getattr(sink, "writev", None)
    if writev is not None:
        writev(buffers)
    else:
        for buf in buffers:
            if len(buf):
                sink.write(buf)


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------
@dataclass
class RamStats:
    """What a RAM write put on the wire."""

    zero: int = 0
    normal: int = 0
    bytes: int = 0

    def add(self, other: "RamStats") -> None:
        self.zero += other.zero
        self.normal += other.normal
        self.bytes += other.bytes


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


class StreamWriter:
    """Writes one stream to a sink (a socket channel or a file)."""

    def __init__(self, sink: Sink, *, run_pages: int = DEFAULT_RUN_PAGES) -> None:
        if not 1 <= run_pages <= MAX_RUN_PAGES:
            raise ValueError(f"run_pages must be in [1, {MAX_RUN_PAGES}]")
        self.sink = sink
        self.run_pages = run_pages
        self.bytes_written = 0
        self.at_boundary = True  # False while (or after an error) writing a record
        self._preamble_sent = False
        self._copy: memoryview | None = None  # reused staging buffer for live pages

    def _send(self, buffers: list[bytes | memoryview]) -> None:
        """One whole record (the preamble or a section). ``at_boundary`` stays False if it
        fails, so nothing more (not even CANCEL) is appended to a cut record."""
        self.at_boundary = False
        try:
            _write_all(self.sink, buffers)
        except OSError as exc:
            raise StreamWriteError(f"migration stream write failed: {exc.strerror or exc}") from exc
        self.bytes_written += sum(len(b) for b in buffers)
        self.at_boundary = True

    def write_preamble(self, major: int = FORMAT_MAJOR, minor: int = FORMAT_MINOR) -> None:
        self._send([PREAMBLE.pack(MAGIC, major, minor, 0)])
        self._preamble_sent = True

    def write_section(self, kind: int, payload: bytes | memoryview = b"", flags: int = 0) -> None:
        """Low level: one framed section (used for every kind, and for tests)."""
        if len(payload) > MAX_SECTION_BYTES:
            raise StreamError(f"section of {len(payload)} bytes exceeds the {MAX_SECTION_BYTES} byte cap")
        head = SECTION_HEADER.pack(kind, flags, 0, len(payload))
        crc = crc32(payload, crc32(head))
        self._send([head, payload, CRC.pack(crc)])

    def write_header(self, arch: str, machine: str, *, stream_id: str | None = None,
                     hv_version: str = HV_VERSION) -> str:
        """Preamble + HEADER. Returns the stream id (ties DIR/state to DIR/memory)."""
        if not self._preamble_sent:
            self.write_preamble()
        sid = stream_id or uuid.uuid4().hex
        self.write_section(SectionType.HEADER, _json_bytes(
            {"arch": arch, "machine": machine, "hv_version": hv_version, "page_size": PAGE_SIZE,
             "stream_id": sid}))
        return sid

    def write_config(self, fingerprint: Fingerprint) -> None:
        self.write_section(SectionType.CONFIG, _json_bytes(fingerprint.to_dict()))

    def write_ram(self, start_page: int, view: memoryview | bytes | bytearray, *,
                  stable: bool = False) -> RamStats:
        """Send pages ``start_page ..`` from ``view`` (whole pages), zero pages as markers.

        ``stable=False`` (the guest may be running): each run's normal pages are copied
        once into a private buffer, and the checksum and the socket both read that copy,
        so a page the guest rewrites mid-send cannot break the section's checksum (the
        dirty log re-sends it next round). ``stable=True`` (guest paused, or a snapshot):
        normal pages go out as slices of ``view`` itself, no copy, via ``writev``.
        """
        mv = memoryview(view).cast("B")
        if len(mv) % PAGE_SIZE:
            raise ValueError("RAM view is not a whole number of pages")
        total = len(mv) // PAGE_SIZE
        stats = RamStats()
        done = 0
        while done < total:
            count = min(self.run_pages, total - done)
            stats.add(self._write_run(start_page + done, mv[done * PAGE_SIZE:(done + count) * PAGE_SIZE],
                                      count, stable))
            done += count
        return stats

    def _write_run(self, start: int, mv: memoryview, count: int, stable: bool) -> RamStats:
        kinds, normal = page_kinds(mv, count)
        segments: list[memoryview] = []  # coalesced runs of normal pages
        i = 0
        while i < count:
            if kinds[i] == PAGE_NORMAL:
                j = kinds.find(_ZERO_BYTE, i)
                j = count if j < 0 else j
                segments.append(mv[i * PAGE_SIZE:j * PAGE_SIZE])
            else:
                j = kinds.find(_NORMAL_BYTE, i)
                j = count if j < 0 else j
            i = j
        meta = RAM_RUN.pack(start, count, 0) + kinds
        length = len(meta) + normal * PAGE_SIZE
        head = SECTION_HEADER.pack(SectionType.RAM, 0, 0, length)
        crc = crc32(meta, crc32(head))
        if not stable and segments:
            if self._copy is None:
                self._copy = memoryview(bytearray(self.run_pages * PAGE_SIZE))
            pos = 0
            for seg in segments:  # copy, then checksum the copy while it is cached
                end = pos + len(seg)
                self._copy[pos:end] = seg
                crc = crc32(self._copy[pos:end], crc)
                pos = end
            segments = [self._copy[:pos]]
        else:
            for seg in segments:
                crc = crc32(seg, crc)
        self._send([head + meta, *segments, CRC.pack(crc)])
        return RamStats(zero=count - normal, normal=normal, bytes=length + SECTION_HEADER.size + CRC.size)

    def write_zero_pages(self, start_page: int, count: int) -> RamStats:
        """Mark pages as zero without reading them (pages the guest never touched)."""
        stats = RamStats()
        done = 0
        while done < count:
            n = min(MAX_RUN_PAGES, count - done)
            payload = RAM_RUN.pack(start_page + done, n, 0) + bytes(n)
            self.write_section(SectionType.RAM, payload)
            stats.add(RamStats(zero=n, bytes=len(payload) + SECTION_HEADER.size + CRC.size))
            done += n
        return stats

    def write_round_end(self, pass_number: int) -> None:
        self.write_section(SectionType.ROUND_END, ROUND.pack(pass_number))

    def write_cpu(self, index: int, state: CpuState) -> None:
        self.write_section(SectionType.CPU, CPU_INDEX.pack(index) + _json_bytes(state_to_dict(state)))

    def write_device(self, name: str, instance_id: str, version: int,
                     state: dict[str, Any] | bytes) -> None:
        name_b, id_b = name.encode(), instance_id.encode()
        if isinstance(state, (bytes, bytearray, memoryview)):
            encoding, blob = DeviceEncoding.BINARY, bytes(state)
        else:
            encoding, blob = DeviceEncoding.JSON, _json_bytes(state)
        self.write_section(SectionType.DEVICE,
                           DEVICE_HEAD.pack(len(name_b), len(id_b), version, encoding) + name_b + id_b + blob)

    def write_error(self, message: str) -> None:
        self.write_section(SectionType.ERROR, message.encode()[:MAX_MESSAGE_BYTES])

    def write_end(self) -> None:
        self.write_section(SectionType.END)

    def write_cancel(self) -> None:
        """The source gives up on its operator's request (format 1.2). Flagged SKIPPABLE so
        an older reader skips it and then sees the stream end, as it did before 1.2."""
        if not self._preamble_sent:
            self.write_preamble()
        self.write_section(SectionType.CANCEL, b"", flags=FLAG_SKIPPABLE)


# --------------------------------------------------------------------------------------
# Reader
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class HeaderSection:
    arch: str
    machine: str
    hv_version: str
    page_size: int
    stream_id: str
    format_major: int
    format_minor: int


@dataclass(frozen=True)
class ConfigSection:
    fingerprint: Fingerprint


@dataclass(frozen=True)
class RamSection:
    start: int
    count: int
    zero: int
    normal: int
    bytes: int  # on the wire, framing included


@dataclass(frozen=True)
class RoundEndSection:
    pass_number: int


@dataclass(frozen=True)
class DeviceSection:
    name: str
    instance_id: str
    version: int
    state: dict[str, Any] | bytes


@dataclass(frozen=True)
class CpuSection:
    index: int
    state: CpuState


@dataclass(frozen=True)
class EndSection:
    pass


Section = (HeaderSection | ConfigSection | RamSection | RoundEndSection | DeviceSection
           | CpuSection | EndSection)


class RamTarget(Protocol):
    """Where RAM pages land; :class:`hv.memory.GuestMemory` is one."""

    def page_view(self, page: int, count: int = 1) -> memoryview: ...


class _Phase(enum.IntEnum):
    PREAMBLE = 0
    HEADER = 1
    CONFIG = 2
    RAM = 3
    STATE = 4
    ENDED = 5


class StreamReader:
    """Reads and validates one stream, applying RAM pages to ``ram`` as they arrive.

    ``page_count`` is the destination's own RAM size in pages; a page number at or beyond
    it is rejected before anything is read into RAM. ``local`` (the destination's own
    fingerprint), when given, is compared with the CONFIG section and a mismatch raises
    :class:`ConfigMismatchError` before any RAM is touched.
    """

    def __init__(self, source: Source, *, page_count: int, ram: RamTarget | None = None,
                 kind: StreamKind = StreamKind.MIGRATION, local: Fingerprint | None = None,
                 arch: str | None = None) -> None:
        self.source = source
        self.page_count = page_count
        self.ram = ram
        self.kind = kind
        self.local = local
        self.arch = arch or (local.arch if local else None)
        self.bytes_read = 0
        self.header: HeaderSection | None = None
        self.config: Fingerprint | None = None
        self.rounds = 0
        self.cpus: set[int] = set()
        self.devices: set[tuple[str, str]] = set()
        self._phase = _Phase.PREAMBLE
        self._round_open = False  # RAM arrived since the last ROUND_END
        self._covered = bytearray(page_count) if kind is not StreamKind.STATE else bytearray()
        self._crc = 0
        self._remaining = 0
        self._scratch = bytearray(PAGE_SIZE)

    # -- raw reads -------------------------------------------------------------------
    def _read_into(self, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.source.readinto(view[got:])
            except OSError as exc:
                raise StreamError(f"stream read failed while reading {what}: {exc.strerror or exc}") from exc
            if not n:
                raise StreamError(f"stream truncated: end of input after {self.bytes_read + got} bytes "
                                  f"while reading {what}")
            got += n
        self.bytes_read += got

    def _read(self, n: int, what: str) -> bytes:
        buf = bytearray(n)
        self._read_into(memoryview(buf), what)
        return bytes(buf)

    def _payload(self, n: int, what: str) -> bytes:
        """Read ``n`` payload bytes of the current section, accumulating the crc."""
        if n > self._remaining:
            raise StreamError(f"{what}: needs {n} bytes but only {self._remaining} remain in the section")
        data = self._read(n, what)
        self._remaining -= n
        self._crc = crc32(data, self._crc)
        return data

    def _payload_into(self, view: memoryview, what: str) -> None:
        self._read_into(view, what)
        self._remaining -= len(view)
        self._crc = crc32(view, self._crc)

    def _scatter(self, targets: list[memoryview], what: str) -> None:
        """Fill every target exactly, in order, with as few reads as the source allows."""
        readv = getattr(self.source, "readv", None)
        if readv is None:
            for view in targets:
                self._payload_into(view, what)
            return
        pending = list(targets)
        total = sum(len(v) for v in targets)
        if total > self._remaining:
            raise StreamError(f"{what}: needs {total} bytes but only {self._remaining} remain in the section")
        got_total = 0
        crc = self._crc
        while pending:
            try:
                n = readv(pending[:_IOV_BATCH])
            except OSError as exc:
                raise StreamError(f"stream read failed while reading {what}: {exc.strerror or exc}") from exc
            if not n:
                raise StreamError(f"stream truncated: end of input after {self.bytes_read + got_total} bytes "
                                  f"while reading {what}")
            got_total += n
            # Checksum what just arrived while it is still in the cache.
            i = 0
            while n:
                buf = pending[i]
                if n >= len(buf):
                    crc = crc32(buf, crc)
                    n -= len(buf)
                    i += 1
                else:
                    crc = crc32(buf[:n], crc)
                    pending[i] = buf[n:]
                    n = 0
            del pending[:i]
        self.bytes_read += got_total
        self._remaining -= total
        self._crc = crc

    def _finish_section(self, name: str) -> None:
        if self._remaining:
            raise StreamError(f"{name} section: {self._remaining} trailing bytes")
        (crc,) = CRC.unpack(self._read(CRC.size, f"{name} checksum"))
        if crc != self._crc:
            raise StreamError(f"{name} section: checksum mismatch (stored {crc:#010x}, "
                              f"computed {self._crc:#010x}); the stream is corrupted")

    # -- preamble and sections --------------------------------------------------------
    def read_preamble(self) -> tuple[int, int]:
        magic, major, minor, flags = PREAMBLE.unpack(self._read(PREAMBLE.size, "preamble"))
        if magic != MAGIC:
            raise StreamError(f"not an hv migration stream (magic {magic!r}, expected {MAGIC!r})")
        if major != FORMAT_MAJOR:
            raise StreamError(f"unsupported stream format version {major}.{minor} "
                              f"(this hv reads {FORMAT_MAJOR}.x)")
        if flags:
            raise StreamError(f"unknown preamble flags {flags:#x}")
        self._version = (major, minor)
        self._phase = _Phase.HEADER
        return major, minor

    def read_section(self) -> Section:
        """Read, validate and return the next section (RAM is applied, not returned)."""
        if self._phase is _Phase.PREAMBLE:
            self.read_preamble()
        if self._phase is _Phase.ENDED:
            raise StreamError("read past END")
        while True:
            head = self._read(SECTION_HEADER.size, "section header")
            kind, flags, reserved, length = SECTION_HEADER.unpack(head)
            if flags & ~KNOWN_FLAGS or reserved:
                raise StreamError(f"section type {kind}: unknown flags {flags:#x} or reserved field {reserved:#x}")
            if length > MAX_SECTION_BYTES:
                raise StreamError(f"section type {kind}: length {length} exceeds the {MAX_SECTION_BYTES} byte cap")
            self._crc = crc32(head)
            self._remaining = length
            try:
                stype = SectionType(kind)
            except ValueError:
                stype = None
            if stype is None or stype is SectionType.OK:
                if not flags & FLAG_SKIPPABLE:
                    raise StreamError(f"unknown section type {kind} (not marked skippable)")
                self._skip(length, kind)
                continue
            return self._dispatch(stype, length)

    def _skip(self, length: int, kind: int) -> None:
        view = memoryview(self._scratch)
        while self._remaining:
            self._payload_into(view[:min(len(view), self._remaining)], f"unknown type {kind} section")
        self._finish_section(f"unknown type {kind}")
        log.debug("skipped unknown skippable section type %d (%d bytes)", kind, length)

    def _order(self, stype: SectionType) -> None:
        phase = self._phase
        name = stype.name
        if stype in (SectionType.ERROR, SectionType.CANCEL):  # the sender may give up at any point
            return
        if stype is SectionType.HEADER:
            if phase is not _Phase.HEADER:
                raise StreamError("HEADER section out of order: it must come first, once")
            return
        if phase is _Phase.HEADER:
            raise StreamError(f"{name} section before HEADER: the header must come first")
        if stype is SectionType.CONFIG:
            if phase is not _Phase.CONFIG:
                raise StreamError("CONFIG section out of order: it must follow HEADER, once")
            return
        if phase is _Phase.CONFIG:
            raise StreamError(f"{name} section before CONFIG")
        if stype in (SectionType.RAM, SectionType.ROUND_END):
            if self.kind is StreamKind.STATE:
                raise StreamError(f"{name} section in a state-only stream")
            if phase is _Phase.STATE:
                raise StreamError(f"{name} section after CPU/DEVICE state: RAM must be complete first")
        if stype in (SectionType.CPU, SectionType.DEVICE, SectionType.END):
            if stype is not SectionType.END and self.kind is StreamKind.MEMORY:
                raise StreamError(f"{name} section in a memory-only stream")
            if self._round_open:
                raise StreamError(f"{name} section while RAM pass {self.rounds + 1} is still open (missing ROUND_END)")

    def _dispatch(self, stype: SectionType, length: int) -> Section:
        self._order(stype)
        if stype is SectionType.ERROR:
            if length > MAX_MESSAGE_BYTES:
                raise StreamError(f"ERROR section: length {length} exceeds {MAX_MESSAGE_BYTES}")
            msg = printable_bytes(self._payload(length, "ERROR message"))
            self._finish_section("ERROR")
            raise PeerError(f"the other end reported an error: {msg}")
        if stype is SectionType.CANCEL:
            if length:
                raise StreamError(f"CANCEL section: length {length}, expected 0")
            self._finish_section("CANCEL")
            raise PeerCanceled("the source canceled the migration")
        if stype is SectionType.RAM:
            return self._read_ram(length)
        if stype is SectionType.HEADER:
            return self._read_header(length)
        if stype is SectionType.CONFIG:
            return self._read_config(length)
        if stype is SectionType.ROUND_END:
            if length != ROUND.size:
                raise StreamError(f"ROUND_END section: length {length}, expected {ROUND.size}")
            (number,) = ROUND.unpack(self._payload(ROUND.size, "ROUND_END"))
            self._finish_section("ROUND_END")
            if number != self.rounds + 1:
                raise StreamError(f"ROUND_END pass {number} out of sequence (expected {self.rounds + 1})")
            self.rounds = number
            self._round_open = False
            self._phase = _Phase.RAM
            return RoundEndSection(number)
        if stype is SectionType.CPU:
            return self._read_cpu(length)
        if stype is SectionType.DEVICE:
            return self._read_device(length)
        assert stype is SectionType.END
        if length:
            raise StreamError(f"END section: length {length}, expected 0")
        self._finish_section("END")
        self._check_complete()
        self._phase = _Phase.ENDED
        return EndSection()

    def _json(self, length: int, what: str) -> Any:
        if length > MAX_JSON_BYTES:
            raise StreamError(f"{what}: length {length} exceeds the {MAX_JSON_BYTES} byte cap")
        data = self._payload(length, what)
        self._finish_section(what)  # checksum before parsing
        try:
            return json.loads(data)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            raise StreamError(f"{what}: malformed JSON ({exc})") from None

    def _read_header(self, length: int) -> HeaderSection:
        raw = self._json(length, "HEADER")
        if not isinstance(raw, dict):
            raise StreamError("HEADER: expected a JSON object")
        required = {"arch", "machine", "hv_version", "page_size", "stream_id"}
        if missing := required - set(raw):
            raise StreamError(f"HEADER: missing fields {sorted(missing)}")
        header = HeaderSection(
            arch=_check_str("HEADER.arch", raw["arch"]),
            machine=_check_str("HEADER.machine", raw["machine"]),
            hv_version=_check_str("HEADER.hv_version", raw["hv_version"]),
            page_size=_check_uint("HEADER.page_size", raw["page_size"], 0, 1 << 30),
            stream_id=_check_str("HEADER.stream_id", raw["stream_id"], limit=128),
            format_major=self._version[0], format_minor=self._version[1],
        )
        if header.page_size != PAGE_SIZE:
            raise StreamError(f"HEADER: page size {header.page_size}, this hv uses {PAGE_SIZE}")
        if self.arch is not None and header.arch != self.arch:
            raise ConfigMismatchError([f"architecture mismatch: source {printable(header.arch)}, "
                                       f"destination {self.arch}"])
        self.header = header
        self._phase = _Phase.CONFIG
        return header

    def _read_config(self, length: int) -> ConfigSection:
        fp = Fingerprint.from_dict(self._json(length, "CONFIG"))
        assert self.header is not None
        if fp.arch != self.header.arch or fp.machine != self.header.machine:
            raise StreamError("CONFIG: architecture/machine differ from HEADER")
        if self.local is not None:
            mismatches = compare_fingerprints(fp, self.local)
            if mismatches:
                raise ConfigMismatchError(mismatches)
        if fp.memory // PAGE_SIZE != self.page_count:
            raise ConfigMismatchError([f"memory size mismatch: source {_size_text(fp.memory)}, "
                                       f"destination {_size_text(self.page_count * PAGE_SIZE)}"])
        self.config = fp
        self._phase = _Phase.RAM
        return ConfigSection(fp)

    def _read_ram(self, length: int) -> RamSection:
        if length < RAM_RUN.size:
            raise StreamError(f"RAM section: length {length} is shorter than its {RAM_RUN.size} byte run header")
        start, count, reserved = RAM_RUN.unpack(self._payload(RAM_RUN.size, "RAM run header"))
        if reserved:
            raise StreamError(f"RAM section: reserved field {reserved:#x} is not zero")
        if not 1 <= count <= MAX_RUN_PAGES:
            raise StreamError(f"RAM section: page count {count} outside [1, {MAX_RUN_PAGES}]")
        if start >= self.page_count or count > self.page_count - start:
            raise StreamError(f"RAM section: pages {start}..{start + count - 1} lie outside guest RAM "
                              f"({self.page_count} pages)")
        if count > self._remaining:
            raise StreamError(f"RAM section: page count {count} does not fit in length {length}")
        kinds = self._payload(count, "RAM page kind map")
        normal = kinds.count(_NORMAL_BYTE)
        if normal + kinds.count(_ZERO_BYTE) != count:
            raise StreamError("RAM section: page kind map holds values other than ZERO (0) and NORMAL (1)")
        if self._remaining != normal * PAGE_SIZE:
            raise StreamError(f"RAM section: length {length} does not match {normal} normal pages")
        ram = self.ram
        # Walk alternating runs of zero and normal pages; normal runs are read straight
        # into guest RAM with scatter reads, zero runs only written where not zero already.
        targets: list[memoryview] = []
        i = 0
        while i < count:
            if kinds[i] == PAGE_NORMAL:
                j = kinds.find(_ZERO_BYTE, i)
                j = count if j < 0 else j
                if ram is not None:
                    view = self._target(start + i, j - i)
                    if j - i >= POPULATE_MIN_PAGES:
                        populate(view)
                    targets.append(view)
                else:
                    self._scatter(targets, "RAM page data")
                    targets = []
                    for _ in range(i, j):  # nowhere to put them: read and check only
                        self._payload_into(memoryview(self._scratch), "RAM page data")
            else:
                j = kinds.find(_NORMAL_BYTE, i)
                j = count if j < 0 else j
                if ram is not None:
                    zero_pages(self._target(start + i, j - i))
            i = j
        self._scatter(targets, "RAM page data")
        self._finish_section("RAM")
        self._covered[start:start + count] = b"\x01" * count
        self._round_open = True
        return RamSection(start, count, count - normal, normal, length + SECTION_HEADER.size + CRC.size)

    def _target(self, page: int, count: int) -> memoryview:
        assert self.ram is not None
        try:
            view = self.ram.page_view(page, count)
        except ValueError as exc:  # GuestMemoryError: spans regions
            raise StreamError(f"RAM section: pages {page}..{page + count - 1}: {exc}") from None
        if len(view) != count * PAGE_SIZE:
            raise StreamError(f"RAM section: target for pages {page}+{count} has the wrong size")
        return view

    def _read_cpu(self, length: int) -> CpuSection:
        if length < CPU_INDEX.size:
            raise StreamError(f"CPU section: length {length} too short")
        if length > MAX_JSON_BYTES:
            raise StreamError(f"CPU section: length {length} exceeds the {MAX_JSON_BYTES} byte cap")
        (index,) = CPU_INDEX.unpack(self._payload(CPU_INDEX.size, "CPU index"))
        raw = self._json(self._remaining, "CPU")
        assert self.config is not None
        if index >= self.config.vcpus:
            raise StreamError(f"CPU section: vCPU index {index} out of range ({self.config.vcpus} vCPUs)")
        if index in self.cpus:
            raise StreamError(f"CPU section: duplicate state for vCPU {index}")
        try:
            state = state_from_dict(raw)
        except StateError as exc:
            raise StreamError(f"CPU section for vCPU {index}: {printable(str(exc))}") from None
        if state.ARCH != self.config.arch:
            raise StreamError(f"CPU section for vCPU {index}: {state.ARCH} state in a {self.config.arch} stream")
        self.cpus.add(index)
        self._phase = _Phase.STATE
        return CpuSection(index, state)

    def _read_device(self, length: int) -> DeviceSection:
        if length < DEVICE_HEAD.size:
            raise StreamError(f"DEVICE section: length {length} too short")
        name_len, id_len, version, encoding = DEVICE_HEAD.unpack(self._payload(DEVICE_HEAD.size, "DEVICE header"))
        if name_len == 0 or name_len > MAX_NAME_BYTES or id_len > MAX_NAME_BYTES:
            raise StreamError(f"DEVICE section: name/id lengths {name_len}/{id_len} outside [1, {MAX_NAME_BYTES}]")
        try:
            name = self._payload(name_len, "DEVICE name").decode()
            instance_id = self._payload(id_len, "DEVICE id").decode()
        except UnicodeDecodeError:
            raise StreamError("DEVICE section: name or id is not UTF-8") from None
        if not (name.isprintable() and instance_id.isprintable()):
            raise StreamError(f"DEVICE section: name or id '{printable(name)}'/'{printable(instance_id)}' "
                              "holds non-printable characters")
        if encoding == DeviceEncoding.JSON:
            state: dict[str, Any] | bytes = self._json(self._remaining, f"DEVICE {name}")
            if not isinstance(state, dict):
                raise StreamError(f"DEVICE {name}: JSON state must be an object")
        elif encoding == DeviceEncoding.BINARY:
            state = self._payload(self._remaining, f"DEVICE {name} state")
            self._finish_section(f"DEVICE {name}")
        else:
            raise StreamError(f"DEVICE section: unknown encoding {encoding}")
        key = (name, instance_id)
        if key in self.devices:
            raise StreamError(f"DEVICE section: duplicate state for {name} {instance_id!r}")
        self.devices.add(key)
        self._phase = _Phase.STATE
        return DeviceSection(name, instance_id, version, state)

    def _check_complete(self) -> None:
        if self._phase < _Phase.RAM:
            raise StreamError("END before CONFIG")
        assert self.config is not None
        if self.kind is not StreamKind.STATE:
            missing = self._covered.count(0)
            if missing:
                first = self._covered.find(0)
                raise StreamError(f"END before all RAM arrived: {missing} pages never sent (first: page {first})")
        if self.kind is not StreamKind.MEMORY:
            if len(self.cpus) != self.config.vcpus:
                missing_cpus = sorted(set(range(self.config.vcpus)) - self.cpus)
                raise StreamError(f"END before the state of vCPUs {missing_cpus}")

    def read_all(self) -> list[Section]:
        """Read through END; returns every non-RAM section (RAM is applied)."""
        out: list[Section] = []
        while True:
            section = self.read_section()
            if not isinstance(section, RamSection):
                out.append(section)
            if isinstance(section, EndSection):
                return out

    @property
    def ended(self) -> bool:
        return self._phase is _Phase.ENDED


# --------------------------------------------------------------------------------------
# Back channel: destination -> source replies
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Reply:
    """A reply on the back channel: ``ok`` with a phase word, or an error message (shown
    escaped: it came from the peer). ``canceled``: the source sent CANCEL instead of its
    commit (the destination reads that in the same place)."""

    ok: bool
    text: str
    canceled: bool = False


def send_reply(sink: Sink, ok: bool, text: str) -> None:
    """Send one reply: OK with a short word (the engine uses "ready", "commit", "running")
    or ERROR with a reason."""
    writer = StreamWriter(sink)
    writer.write_section(SectionType.OK if ok else SectionType.ERROR, text.encode()[:MAX_MESSAGE_BYTES])


def read_reply(source: Source) -> Reply:
    """Source side: read one OK/ERROR reply, validated like any section."""
    reader = StreamReader(source, page_count=0, kind=StreamKind.STATE)
    head = reader._read(SECTION_HEADER.size, "reply header")
    kind, flags, reserved, length = SECTION_HEADER.unpack(head)
    cancel = kind == SectionType.CANCEL and flags in (0, FLAG_SKIPPABLE)
    if not (cancel or (kind in (SectionType.OK, SectionType.ERROR) and not flags)) or reserved:
        raise StreamError(f"unexpected reply section type {kind} flags {flags:#x}")
    if length > MAX_MESSAGE_BYTES:
        raise StreamError(f"reply length {length} exceeds {MAX_MESSAGE_BYTES}")
    reader._crc = crc32(head)
    reader._remaining = length
    text = printable_bytes(reader._payload(length, "reply"))
    reader._finish_section("reply")
    if cancel:
        return Reply(False, text or "canceled", canceled=True)
    return Reply(kind == SectionType.OK, text)


def poll_reply(chan: SocketChannel, timeout: float = 0.0) -> Reply | None:
    """Source side, while streaming: a reply (an ERROR, normally) if one is waiting.

    Returns None when nothing arrived within ``timeout`` seconds. A closed connection
    raises :class:`StreamError` ("stream truncated ...").
    """
    ready, _, _ = select.select([chan.sock], [], [], timeout)
    if not ready:
        return None
    return read_reply(chan)
