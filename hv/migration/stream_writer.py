"""The writing half of the migration stream: :class:`StreamWriter` frames, checksums and
sends each section (see :mod:`hv.migration.stream` for the format)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import socket
import ssl
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from hv import __version__ as HV_VERSION
from hv.errors import StreamError
from hv.migration import stream_native
from hv.migration.pages import BLOCK_PAGES, never_populated, page_kinds
from hv.migration.stream_channels import Sink, _write_all
from hv.migration.stream_format import (
    _NORMAL_BYTE,
    _ZERO_BYTE,
    CHANNELS_MINOR,
    CHANNELS_NOTICE,
    CPU_INDEX,
    CRC,
    DEVICE_HEAD,
    FLAG_SKIPPABLE,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HASHED_MINOR,
    HASHED_NOTICE,
    LIVE_NOTICE,
    MAGIC,
    MAX_CHANNELS,
    MAX_MESSAGE_BYTES,
    MAX_RUN_PAGES,
    MAX_SECTION_BYTES,
    PAGE_NORMAL,
    PAGE_SIZE,
    PREAMBLE,
    RAM_LIVE_MINOR,
    RAM_RUN,
    ROUND,
    SECTION_HEADER,
    DeviceEncoding,
    SectionType,
    StreamWriteError,
    crc32,
)
from hv.migration.stream_records import Fingerprint
from hv.state import CpuState, state_to_dict

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------
# Writer
# --------------------------------------------------------------------------------------
@dataclass
class RamStats:
    """What a RAM write put on the wire."""

    zero: int = 0
    normal: int = 0
    bytes: int = 0

    def add(self, other: RamStats) -> None:
        self.zero += other.zero
        self.normal += other.normal
        self.bytes += other.bytes


def _normal_slices(mv: memoryview, kinds: bytes, count: int) -> list[memoryview]:
    """Slices of ``mv``, one per run of normal pages in ``kinds``."""
    segments = []
    i = kinds.find(_NORMAL_BYTE)
    while 0 <= i < count:
        j = kinds.find(_ZERO_BYTE, i)
        j = count if j < 0 else j
        segments.append(mv[i * PAGE_SIZE:j * PAGE_SIZE])
        i = kinds.find(_NORMAL_BYTE, j)
    return segments


def _framed(kind: int, payload: bytes | memoryview, flags: int = 0) -> list[bytes | memoryview]:
    """One section's buffers: its header, ``payload``, the CRC-32 over both."""
    head = SECTION_HEADER.pack(kind, flags, 0, len(payload))
    return [head, payload, CRC.pack(crc32(payload, crc32(head)))]


LIVE_NOTICE_BYTES = b"".join(_framed(SectionType.OK, LIVE_NOTICE.encode()))
# The destination's notices, framed, by their text (format 1.5: ram-live; 1.6: channels M;
# 1.7: ram-hashed)
NOTICES: dict[bytes, str] = {
    b"".join(_framed(SectionType.OK, text.encode())): text
    for text in (LIVE_NOTICE, HASHED_NOTICE, *(f"{CHANNELS_NOTICE} {n}" for n in range(2, MAX_CHANNELS + 1)))}


def take_notice(sock: socket.socket, notices: Mapping[bytes, str] = NOTICES) -> str | bool | None:
    """Consume one of the destination's notices (framed, as in :data:`NOTICES`) if it is
    exactly what waits first on ``sock`` (peeked without blocking; any other bytes are left
    for the caller). Its text: taken. False: nothing waits, or a notice's first bytes only.
    None: something else waits (a reply or end of file)."""
    try:
        ready, _, _ = select.select([sock], [], [], 0)
        if not ready:  # (a socket with a timeout would wait for it in recv, MSG_DONTWAIT or not)
            return False
        data = sock.recv(max(map(len, notices)), socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return None
    for framed, text in notices.items():
        if data.startswith(framed):
            taken = sock.recv(len(framed), socket.MSG_DONTWAIT)
            return text if taken == framed else None
    if data and any(framed.startswith(data) for framed in notices):
        return False
    return None


def take_live_notice(sock: socket.socket) -> bool | None:
    """:func:`take_notice` for the OK ``ram-live`` notice alone: True when it was taken
    (any other notice is left, as something else)."""
    outcome = take_notice(sock, {LIVE_NOTICE_BYTES: LIVE_NOTICE})
    return None if outcome is None else outcome == LIVE_NOTICE


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


# Pages per RAM section the writer emits: 1 MiB, so a section's pages are still in the
# CPU's L2 cache when they are copied, checksummed and sent after the zero-page scan read
# them (8 MiB sections, the format's DEFAULT_RUN_PAGES, read RAM from memory twice:
# measured 0.41-0.48 s of source CPU per GiB on the wire against 0.31-0.32).
WRITER_RUN_PAGES = 256
# Pages per section where nothing is copied (RAM_LIVE, and a paused guest's pages): 4 MiB.
# The per-section work in Python (page map read, framing, slicing, one sendmsg) was a
# fifth of the source's time at 1 MiB; 4 MiB sections moved `hv bench stream`-style
# streams (1 GiB, 25% zero, interleaved, load ~3) from 66% to 75% of the raw rate over
# unix and from 66% to 70% over tcp; 8 and 16 MiB measured lower (63-70%).
LIVE_RUN_PAGES = 1024


def _live_run_pages() -> int:
    """LIVE_RUN_PAGES, or ``HV_STREAM_RUN_PAGES`` from the environment (for A/B measuring)."""
    try:
        value = int(os.environ.get("HV_STREAM_RUN_PAGES", LIVE_RUN_PAGES))
    except ValueError:
        return LIVE_RUN_PAGES
    return value if 1 <= value <= MAX_RUN_PAGES else LIVE_RUN_PAGES


class StreamWriter:
    """Writes one stream to a sink (a socket channel or a file)."""

    def __init__(self, sink: Sink, *, run_pages: int | None = None) -> None:
        """``run_pages``: pages per RAM section on every path; by default WRITER_RUN_PAGES
        where pages are copied and LIVE_RUN_PAGES where they are not."""
        if run_pages is not None and not 1 <= run_pages <= MAX_RUN_PAGES:
            raise ValueError(f"run_pages must be in [1, {MAX_RUN_PAGES}]")
        self.sink = sink
        self.run_pages = run_pages or WRITER_RUN_PAGES
        self.live_run_pages = run_pages or _live_run_pages()
        self.bytes_written = 0
        self.at_boundary = True  # False while (or after an error) writing a record
        self._preamble_sent = False
        self._copy: memoryview | None = None  # reused staging buffer for live pages
        self._packer: stream_native.Packer | None = None  # made on the first RAM section
        # RAM_LIVE sections sent by native code: None unless the sink is a plain socket
        self._live_sender = stream_native.live_sender_for(sink, self.live_run_pages)
        self._gathering: list[list[bytes | memoryview]] | None = None  # records held by gathered()
        # RAM_LIVE (format 1.5): used once the destination announced it reads them.
        self.live_ram = False
        # RAM_HASHED instead (format 1.7), where the native sender sends them: once the
        # destination announced it reads those too.
        self.hashed = False
        # Connections the destination takes for this stream, this one included (format 1.6:
        # its "channels M" notice; 1 until then).
        self.granted_channels = 1
        self._minor = FORMAT_MINOR

    @contextlib.contextmanager
    def _record(self) -> Iterator[None]:
        """Whole records go out inside the block. ``at_boundary`` is False meanwhile and
        stays False if a write fails, so nothing more (not even CANCEL) is appended to a
        cut record; an OS error becomes a StreamWriteError."""
        self.at_boundary = False
        try:
            yield
        except OSError as exc:
            raise StreamWriteError(f"migration stream write failed: {exc.strerror or exc}") from exc
        self.at_boundary = True

    def _send(self, buffers: list[bytes | memoryview]) -> None:
        """One whole record (the preamble or a section)."""
        if self._gathering is not None:
            self._gathering.append(buffers)
            return
        with self._record():
            _write_all(self.sink, buffers)
        self.bytes_written += sum(len(b) for b in buffers)

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The records written inside go out together, in one gathered write when the block
        ends (a paused guest's CPU and device sections and END: one ``sendmsg`` and one
        wake-up of the destination instead of one per section). If the block raises,
        nothing of it is sent."""
        assert self._gathering is None, "gathered() does not nest"
        self._gathering = []
        try:
            yield
            records = self._gathering
            self._gathering = None
            self._send([buf for record in records for buf in record])
        finally:
            self._gathering = None

    def write_preamble(self, major: int = FORMAT_MAJOR, minor: int = FORMAT_MINOR) -> None:
        self._send([PREAMBLE.pack(MAGIC, major, minor, 0)])
        self._preamble_sent = True
        self._minor = minor

    def peer_waiting(self) -> bool:
        """Source side, when the back channel is readable: take the destination's
        notices if that is what waits (see :func:`take_notice`). True when
        something else waits (an ERROR, a closed connection: the caller reads it), False
        when nothing does any more."""
        sock = getattr(self.sink, "sock", None)
        if not isinstance(sock, socket.socket) or isinstance(sock, ssl.SSLSocket):
            return True
        while True:
            outcome = take_notice(sock)
            if not isinstance(outcome, str):
                return outcome is None
            if outcome == LIVE_NOTICE:
                self.live_ram = self._minor >= RAM_LIVE_MINOR and stream_native.available()
                log.debug("the destination reads RAM_LIVE sections (%s)",
                          "used from now on" if self.live_ram else "not used: no native stream code")
            elif outcome == HASHED_NOTICE:
                self.hashed = self._minor >= HASHED_MINOR and stream_native.available()
                log.debug("the destination reads RAM_HASHED sections (%s)",
                          "used from now on" if self.hashed else "not used")
            elif self._minor >= CHANNELS_MINOR:
                self.granted_channels = int(outcome.split()[1])
                log.debug("the destination takes %d connections", self.granted_channels)

    def write_section(self, kind: int, payload: bytes | memoryview = b"", flags: int = 0) -> None:
        """Low level: one framed section (used for every kind, and for tests)."""
        if len(payload) > MAX_SECTION_BYTES:
            raise StreamError(f"section of {len(payload)} bytes exceeds the {MAX_SECTION_BYTES} byte cap")
        self._send(_framed(kind, payload, flags))

    def write_header(self, arch: str, machine: str, *, stream_id: str | None = None,
                     hv_version: str = HV_VERSION, channels: int = 1) -> str:
        """Preamble + HEADER. Returns the stream id (ties DIR/state to DIR/memory, and a
        data channel to its migration). ``channels`` > 1 offers that many connections
        (format 1.6); the destination answers with how many it takes."""
        if not self._preamble_sent:
            self.write_preamble()
        if not 1 <= channels <= MAX_CHANNELS:
            raise ValueError(f"channels must be in [1, {MAX_CHANNELS}]")
        sid = stream_id or uuid.uuid4().hex
        header: dict[str, Any] = {"arch": arch, "machine": machine, "hv_version": hv_version,
                                  "page_size": PAGE_SIZE, "stream_id": sid}
        if channels > 1:
            header["channels"] = channels
        self.write_section(SectionType.HEADER, _json_bytes(header))
        return sid

    def write_channel(self, stream_id: str, index: int) -> None:
        """Preamble + CHANNEL: this connection is data channel ``index`` of ``stream_id``."""
        if not self._preamble_sent:
            self.write_preamble()
        self.write_section(SectionType.CHANNEL, _json_bytes({"stream_id": stream_id, "channel": index}))

    def write_channels_end(self, count: int) -> None:
        """Main stream, before ROUND_END 1: ``count`` data channels carried pages and ended."""
        self.write_section(SectionType.CHANNELS_END, _json_bytes({"channels": count}))

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
        if not stable and not self.live_ram and self._minor >= RAM_LIVE_MINOR:
            self.peer_waiting()  # takes the ram-live notice if it has arrived (no waiting)
        total = len(mv) // PAGE_SIZE
        if not stable and self.live_ram and self._live_sender is not None:
            return self._write_live_native(self._live_sender, start_page, mv, total)
        stats = RamStats()
        done = 0
        copying = not stable and not (self.live_ram and stream_native.available())
        run_pages = self.run_pages if copying else self.live_run_pages
        while done < total:
            count = min(run_pages, total - done)
            stats.add(self._write_run(start_page + done, mv[done * PAGE_SIZE:(done + count) * PAGE_SIZE],
                                      count, stable))
            done += count
        return stats

    def _write_live_native(self, sender: stream_native.LiveSender, start: int, mv: memoryview,
                           total: int) -> RamStats:
        """RAM_LIVE sections (RAM_HASHED once the destination asked for them) framed and sent
        by native code, one call for all ``total`` pages
        (on a loopback link the Python between 4 MiB sections was 13% of the source's CPU, and
        the source is the slower end)."""
        known_zero = never_populated(mv) if total >= BLOCK_PAGES else None
        with self._record():
            zero, normal, sent = sender.send(mv, start, total, known_zero, hashed=self.hashed)
        self.bytes_written += sent
        return RamStats(zero=zero, normal=normal, bytes=sent)

    def _write_run_live(self, packer: stream_native.Packer, start: int, mv: memoryview, count: int) -> RamStats:
        """One RAM_LIVE section: page checksums computed in place, the pages sent straight
        from guest RAM (no copy); a page the guest rewrites meanwhile arrives torn and is
        sent again by the next pass, which the dirty log guarantees."""
        known_zero = never_populated(mv) if count >= BLOCK_PAGES else None
        normal, framing, crc = packer.pack_live(mv, start, count, known_zero)
        kinds = framing[SECTION_HEADER.size + RAM_RUN.size:SECTION_HEADER.size + RAM_RUN.size + count].tobytes()
        segments = _normal_slices(mv, kinds, count)
        self._send([framing, *segments, CRC.pack(crc)])
        return RamStats(zero=count - normal, normal=normal, bytes=len(framing) + normal * PAGE_SIZE + CRC.size)

    def _write_run_native(self, packer: stream_native.Packer, start: int, mv: memoryview, count: int,
                          stable: bool) -> RamStats:
        """One RAM section framed by native code: the same bytes as :meth:`_write_run`."""
        if not stable and self.live_ram:
            return self._write_run_live(packer, start, mv, count)
        known_zero = never_populated(mv) if count >= BLOCK_PAGES else None
        normal, framing, crc = packer.pack(mv, start, count, known_zero, copy=not stable)
        if not stable:
            segments = [packer.copied(normal)]
        else:  # slices of the paused guest's RAM, one per run of normal pages
            segments = _normal_slices(mv, framing[len(framing) - count:].tobytes(), count)
        self._send([framing, *segments, CRC.pack(crc)])
        return RamStats(zero=count - normal, normal=normal, bytes=len(framing) + normal * PAGE_SIZE + CRC.size)

    def _write_run(self, start: int, mv: memoryview, count: int, stable: bool) -> RamStats:
        if self._packer is None and stream_native.available():
            # the copy buffer only as large as a copying section (1 MiB): it is resident
            self._packer = stream_native.Packer(max(self.run_pages, self.live_run_pages), self.run_pages)
        if self._packer is not None:
            return self._write_run_native(self._packer, start, mv, count, stable)
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
