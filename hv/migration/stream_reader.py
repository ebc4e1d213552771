"""The reading half of the migration stream: :class:`StreamReader` validates every section
of untrusted input in the only order accepted, applying RAM pages straight into guest RAM
once their page numbers are checked (see :mod:`hv.migration.stream`)."""
from __future__ import annotations

import enum
import errno
import json
import logging
import os
import struct
import time
from typing import Any, Protocol

from hv.errors import StreamError
from hv.migration import stream_native
from hv.migration.pages import is_prefaulted, populate, take_pristine, zero_pages
from hv.migration.stream_channels import Source
from hv.migration.stream_format import (
    _IOV_BATCH,
    _NORMAL_BYTE,
    _ZERO_BYTE,
    CHANNELS_MINOR,
    CPU_INDEX,
    CRC,
    DEVICE_HEAD,
    FLAG_SKIPPABLE,
    FORMAT_MAJOR,
    HASHED_MINOR,
    KNOWN_FLAGS,
    MAGIC,
    MAX_CHANNELS,
    MAX_JSON_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_NAME_BYTES,
    MAX_RUN_PAGES,
    MAX_SECTION_BYTES,
    PAGE_CRC,
    PAGE_HASH,
    PAGE_NORMAL,
    PAGE_SIZE,
    POPULATE_MIN_PAGES,
    PREAMBLE,
    RAM_LIVE_MINOR,
    RAM_RUN,
    ROUND,
    SECTION_HEADER,
    ChannelSection,
    ChannelsEndSection,
    ConfigMismatchError,
    ConfigSection,
    CpuSection,
    DeviceEncoding,
    DeviceSection,
    EndSection,
    HeaderSection,
    PeerCanceled,
    PeerError,
    RamSection,
    RoundEndSection,
    Section,
    SectionType,
    StreamKind,
    crc32,
)
from hv.migration.stream_records import Fingerprint, _check_str, _check_uint, _size_text, compare_fingerprints
from hv.state import StateError, state_from_dict
from hv.textsafe import printable, printable_bytes

log = logging.getLogger("hv.migration.stream")


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

    A data channel's reader (``kind=StreamKind.CHANNEL``, format 1.6) shares the main
    reader's map of arrived pages and of pages known zero (``shared`` =
    ``main.page_maps()``): the pages it applies count for the main stream's END.
    """

    def __init__(self, source: Source, *, page_count: int, ram: RamTarget | None = None,
                 kind: StreamKind = StreamKind.MIGRATION, local: Fingerprint | None = None,
                 arch: str | None = None,
                 shared: tuple[bytearray, bytearray | None] | None = None) -> None:
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
        if shared is not None and len(shared[0]) != page_count:
            raise ValueError("shared page maps of another RAM size")
        self._covered = shared[0] if shared is not None else \
            bytearray(page_count) if kind is not StreamKind.STATE else bytearray()
        self._crc = 0
        self._remaining = 0
        self._scratch = bytearray(PAGE_SIZE)
        self.torn_pages = 0  # RAM_LIVE pages that arrived torn (sent again by a later pass)
        # RAM a background Prefaulter covers needs no madvise per run (it is the
        # destination's usual case; see hv.migration.pages).
        self._populate_runs = ram is not None and not is_prefaulted(ram)
        # RAM sections are applied by native code where the source and RAM allow it; every
        # other section (and any RAM section it would refuse) is read here, through
        # Drained, which hands over what the native receiver read ahead.
        self._native: stream_native.Receiver | None = None
        if ram is not None and kind is not StreamKind.STATE:
            self._native = stream_native.receiver_for(source, ram, page_count, self._covered)
            if self._native is not None:
                self.source = stream_native.Drained(source, self._native)
        # Pages known to be zero on a fresh destination (never populated): zero pages sent
        # for them need not be read. Every RAM section clears its pages here (Python path,
        # in _ram_head) or in the native receiver before it writes any.
        self._pristine: bytearray | None = None
        if shared is not None:
            self._pristine = shared[1]
        elif self._native is not None:
            self._pristine = take_pristine(ram, page_count)
        if self._native is not None and self._pristine is not None:
            self._native.set_pristine(self._pristine)

    def page_maps(self) -> tuple[bytearray, bytearray | None]:
        """The map of pages arrived and the map of pages known zero (or None), for a data
        channel's reader to share."""
        return self._covered, self._pristine

    # -- raw reads -------------------------------------------------------------------
    def _read_into(self, view: memoryview, what: str) -> None:
        got = 0
        while got < len(view):
            try:
                n = self.source.readinto(view[got:])
            except OSError as exc:
                raise self._read_error(exc, self.bytes_read + got, what) from exc
            if not n:
                raise StreamError(f"stream truncated: end of input after {self.bytes_read + got} bytes "
                                  f"while reading {what}")
            got += n
        self.bytes_read += got

    @staticmethod
    def _read_error(exc: OSError, offset: int, what: str) -> StreamError:
        """A failed read as one line. A reset connection is a truncated stream: a peer that
        ends (is killed) with bytes of ours unread resets instead of closing (since format
        1.5 the destination's ram-live notice can be such bytes)."""
        if exc.errno == errno.ECONNRESET:
            return StreamError(f"stream truncated: connection reset after {offset} bytes while reading {what}")
        return StreamError(f"stream read failed while reading {what}: {exc.strerror or exc}")

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

    def _raw_into(self, view: memoryview, what: str) -> None:
        """Payload bytes that the section checksum does not cover (RAM_LIVE page data)."""
        if len(view) > self._remaining:
            raise StreamError(f"{what}: needs {len(view)} bytes but only {self._remaining} remain in the section")
        self._read_into(view, what)
        self._remaining -= len(view)

    def _scatter(self, targets: list[memoryview], what: str, checksum: bool = True) -> None:
        """Fill every target exactly, in order, with as few reads as the source allows
        (``checksum``: the bytes count in the section checksum)."""
        readv = getattr(self.source, "readv", None)
        if readv is None:
            for view in targets:
                if checksum:
                    self._payload_into(view, what)
                else:
                    self._raw_into(view, what)
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
                raise self._read_error(exc, self.bytes_read + got_total, what) from exc
            if not n:
                raise StreamError(f"stream truncated: end of input after {self.bytes_read + got_total} bytes "
                                  f"while reading {what}")
            got_total += n
            # Checksum what just arrived while it is still in the cache.
            i = 0
            while n:
                buf = pending[i]
                if n >= len(buf):
                    crc = crc32(buf, crc) if checksum else crc
                    n -= len(buf)
                    i += 1
                else:
                    crc = crc32(buf[:n], crc) if checksum else crc
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
        if self.kind is StreamKind.CHANNEL and minor < CHANNELS_MINOR:
            raise StreamError(f"a data channel in a format {major}.{minor} stream "
                              f"(channels need {FORMAT_MAJOR}.{CHANNELS_MINOR} or later)")
        self._version = (major, minor)
        self._phase = _Phase.HEADER
        if self._native is not None and minor >= RAM_LIVE_MINOR:
            self._native.allow_live()
        if self._native is not None and minor >= HASHED_MINOR:
            self._native.allow_hashed()
        return major, minor

    def read_section(self) -> Section:
        """Read, validate and return the next section (RAM is applied, not returned)."""
        if self._phase is _Phase.PREAMBLE:
            self.read_preamble()
        if self._phase is _Phase.ENDED:
            raise StreamError("read past END")
        while True:
            if self._native is not None and self._phase is _Phase.RAM:
                ram_section = self._native_ram(self._native)
                if ram_section is not None:
                    return ram_section
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

    def _native_ram(self, rx: stream_native.Receiver) -> RamSection | None:
        """The next section if the native receiver applied it (a valid RAM section), or
        None: it is something else, left for the Python reader. While nothing arrives the
        source's ``check_idle`` (if any) decides whether to give up."""
        seen, idle_since = rx.received, time.monotonic()
        regions = getattr(self.ram, "regions", [])
        while True:
            rc = rx.step(regions)
            if rc == stream_native.RX_RAM:
                r = rx.rx
                self.bytes_read += r.section_bytes
                self._round_open = True
                torn = int(r.torn) if r.live or r.hashed else 0
                self.torn_pages += torn
                return RamSection(r.start, r.count, r.zero, r.normal, r.section_bytes, torn)
            if rc == stream_native.RX_OTHER:
                return None
            if rc == stream_native.RX_WAIT:
                if rx.received != seen:
                    seen, idle_since = rx.received, time.monotonic()
                check_idle = getattr(self.source, "check_idle", None)
                if check_idle is None:  # a socket timeout ran out, as a Python read would say
                    raise StreamError(f"stream read failed while reading {rx.what()}: timed out") \
                        from TimeoutError("timed out")
                check_idle(time.monotonic() - idle_since)
                continue
            if rc == stream_native.RX_EOF:
                raise StreamError(f"stream truncated: end of input after {self.bytes_read + rx.partial_bytes()} "
                                  f"bytes while reading {rx.what()}")
            if rc == stream_native.RX_OSERROR:
                code = int(rx.rx.err_errno)
                raise self._read_error(OSError(code, os.strerror(code)), self.bytes_read + rx.partial_bytes(),
                                       rx.what())
            assert rc == stream_native.RX_BADCRC, rc
            name = "RAM_HASHED" if rx.rx.hashed else "RAM_LIVE" if rx.rx.live else "RAM"
            raise StreamError(f"{name} section: checksum mismatch (stored {rx.rx.stored_crc:#010x}, "
                              f"computed {rx.rx.computed_crc:#010x}); the stream is corrupted")

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
        if self.kind is StreamKind.CHANNEL:
            self._order_channel(stype)
            return
        if stype is SectionType.CHANNEL:
            raise StreamError("CHANNEL section in a main stream: it opens a data channel")
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
        if stype is SectionType.CHANNELS_END:
            if self._version[1] < CHANNELS_MINOR or self.kind is not StreamKind.MIGRATION:
                raise StreamError("CHANNELS_END section in a stream without data channels")
            if self.rounds or self._channels_ended:
                raise StreamError("CHANNELS_END section out of order: once, in pass 1")
        if stype in (SectionType.RAM, SectionType.RAM_LIVE, SectionType.RAM_HASHED, SectionType.ROUND_END):
            if self._channels_ended and not self.rounds and stype is not SectionType.ROUND_END:
                raise StreamError(f"{name} section after CHANNELS_END: pass 1 must end next")
            if self.kind is StreamKind.STATE:
                raise StreamError(f"{name} section in a state-only stream")
            if phase is _Phase.STATE:
                raise StreamError(f"{name} section after CPU/DEVICE state: RAM must be complete first")
        if stype in (SectionType.CPU, SectionType.DEVICE, SectionType.END):
            if stype is not SectionType.END and self.kind is StreamKind.MEMORY:
                raise StreamError(f"{name} section in a memory-only stream")
            if self._round_open:
                raise StreamError(f"{name} section while RAM pass {self.rounds + 1} is still open (missing ROUND_END)")

    def _order_channel(self, stype: SectionType) -> None:
        """A data channel: CHANNEL first, then RAM, RAM_LIVE or RAM_HASHED sections, then END."""
        name = stype.name
        if stype is SectionType.CHANNEL:
            if self._phase is not _Phase.HEADER:
                raise StreamError("CHANNEL section out of order: it must come first, once")
            return
        if self._phase is _Phase.HEADER:
            raise StreamError(f"{name} section before CHANNEL: a data channel opens with it")
        if stype not in (SectionType.RAM, SectionType.RAM_LIVE, SectionType.RAM_HASHED, SectionType.END):
            raise StreamError(f"{name} section in a data channel (it carries pass-1 pages only)")

    _channels_ended = False  # the main stream's CHANNELS_END was read

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
        if stype is SectionType.RAM_LIVE:
            return self._read_ram_live(length)
        if stype is SectionType.RAM_HASHED:
            return self._read_ram_hashed(length)
        if stype is SectionType.HEADER:
            return self._read_header(length)
        if stype is SectionType.CHANNEL:
            return self._read_channel(length)
        if stype is SectionType.CHANNELS_END:
            raw = self._json(length, "CHANNELS_END")
            if not isinstance(raw, dict) or set(raw) != {"channels"}:
                raise StreamError("CHANNELS_END: expected an object with exactly 'channels'")
            self._channels_ended = True
            return ChannelsEndSection(_check_uint("CHANNELS_END.channels", raw["channels"], 1, MAX_CHANNELS - 1))
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
        if self.kind is not StreamKind.CHANNEL:
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
            channels=_check_uint("HEADER.channels", raw.get("channels", 1), 1, MAX_CHANNELS),
        )
        if header.page_size != PAGE_SIZE:
            raise StreamError(f"HEADER: page size {header.page_size}, this hv uses {PAGE_SIZE}")
        if self.arch is not None and header.arch != self.arch:
            raise ConfigMismatchError([f"architecture mismatch: source {printable(header.arch)}, "
                                       f"destination {self.arch}"])
        self.header = header
        self._phase = _Phase.CONFIG
        return header

    def _read_channel(self, length: int) -> ChannelSection:
        raw = self._json(length, "CHANNEL")
        if not isinstance(raw, dict) or set(raw) != {"stream_id", "channel"}:
            raise StreamError("CHANNEL: expected an object with exactly 'stream_id' and 'channel'")
        section = ChannelSection(_check_str("CHANNEL.stream_id", raw["stream_id"], limit=128),
                                 _check_uint("CHANNEL.channel", raw["channel"], 1, MAX_CHANNELS - 1))
        self._phase = _Phase.RAM
        return section

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

    def _ram_head(self, length: int, name: str, page_bytes: int) -> tuple[int, int, bytes, int]:
        """(start, count, kind map, normal pages) of a RAM or RAM_LIVE section, validated:
        pages inside guest RAM, a map of 0/1 only, and a length of exactly ``page_bytes`` per
        normal page after the map."""
        if length < RAM_RUN.size:
            raise StreamError(f"{name} section: length {length} is shorter than its {RAM_RUN.size} byte run header")
        start, count, reserved = RAM_RUN.unpack(self._payload(RAM_RUN.size, f"{name} run header"))
        if reserved:
            raise StreamError(f"{name} section: reserved field {reserved:#x} is not zero")
        if not 1 <= count <= MAX_RUN_PAGES:
            raise StreamError(f"{name} section: page count {count} outside [1, {MAX_RUN_PAGES}]")
        if start >= self.page_count or count > self.page_count - start:
            raise StreamError(f"{name} section: pages {start}..{start + count - 1} lie outside guest RAM "
                              f"({self.page_count} pages)")
        if count > self._remaining:
            raise StreamError(f"{name} section: page count {count} does not fit in length {length}")
        kinds = self._payload(count, f"{name} page kind map")
        normal = kinds.count(_NORMAL_BYTE)
        if normal + kinds.count(_ZERO_BYTE) != count:
            raise StreamError(f"{name} section: page kind map holds values other than ZERO (0) and NORMAL (1)")
        if self._remaining != normal * page_bytes:
            raise StreamError(f"{name} section: length {length} does not match {normal} normal pages")
        if self._pristine is not None:  # about to write these pages: no longer known zero
            self._pristine[start:start + count] = bytes(count)
        return start, count, kinds, normal

    def _read_ram(self, length: int) -> RamSection:
        start, count, kinds, normal = self._ram_head(length, "RAM", PAGE_SIZE)
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
                    if self._populate_runs and j - i >= POPULATE_MIN_PAGES:
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

    def _read_ram_live(self, length: int) -> RamSection:
        """A RAM_LIVE section (format 1.5): page data straight into guest RAM, each normal
        page checked against its own CRC-32. A page that fails was torn by the source's
        guest writing it during the send: it does not count as arrived (END needs it again,
        which the source's dirty log guarantees). The section checksum covers the framing
        (header, run header, kind map, page checksums); a mismatch there is corruption."""
        self._require_minor("RAM_LIVE", RAM_LIVE_MINOR)
        start, count, kinds, normal = self._ram_head(length, "RAM_LIVE", PAGE_SIZE + PAGE_CRC.size)
        sums = self._payload(PAGE_CRC.size * normal, "RAM_LIVE page checksums")
        expected = struct.unpack(f"<{normal}I", sums)
        pages = self._read_live_pages(start, count, kinds, "RAM_LIVE")
        self._finish_section("RAM_LIVE")
        return self._apply_live(start, count, normal, length, pages, [crc32(view) for _, view in pages], expected)

    def _read_ram_hashed(self, length: int) -> RamSection:
        """A RAM_HASHED section (format 1.7): RAM_LIVE with an XXH3-64 per normal page after
        the page data (the source hashes what it has just sent). Torn pages as in RAM_LIVE;
        the section checksum covers the framing and the page hashes. Hashing needs the
        native stream code, which a destination has whenever it asked for these sections."""
        self._require_minor("RAM_HASHED", HASHED_MINOR)
        if not stream_native.available():
            raise StreamError("RAM_HASHED section: this hv cannot check XXH3-64 page hashes "
                              "(no native stream code), and never asked for them")
        start, count, kinds, normal = self._ram_head(length, "RAM_HASHED", PAGE_SIZE + PAGE_HASH.size)
        pages = self._read_live_pages(start, count, kinds, "RAM_HASHED")
        sums = self._payload(PAGE_HASH.size * normal, "RAM_HASHED page hashes")
        expected = struct.unpack(f"<{normal}Q", sums)
        self._finish_section("RAM_HASHED")
        hashes = [stream_native.xxh3_page(view) for _, view in pages]
        return self._apply_live(start, count, normal, length, pages, hashes, expected)

    def _require_minor(self, name: str, minor_needed: int) -> None:
        major, minor = self._version
        if minor < minor_needed:
            raise StreamError(f"{name} section in a format {major}.{minor} stream "
                              f"(it needs {FORMAT_MAJOR}.{minor_needed} or later)")

    def _read_live_pages(self, start: int, count: int, kinds: bytes, name: str) -> list[tuple[int, memoryview]]:
        """A RAM_LIVE / RAM_HASHED section's page data, straight into guest RAM: (page
        number, where its bytes landed) of each normal page; zero runs written as zero."""
        pages: list[tuple[int, memoryview]] = []
        i = 0
        while i < count:
            normal_run = kinds[i] == PAGE_NORMAL
            j = kinds.find(_ZERO_BYTE if normal_run else _NORMAL_BYTE, i)
            j = count if j < 0 else j
            if normal_run:
                # A run is taken whole, as in a RAM section: one that spans two RAM
                # regions is refused before any of its bytes land.
                run = memoryview(bytearray((j - i) * PAGE_SIZE)) if self.ram is None \
                    else self._target(start + i, j - i)   # no RAM: read and check only
                self._scatter([run], f"{name} page data", checksum=False)
                pages += ((start + k, run[(k - i) * PAGE_SIZE:(k - i + 1) * PAGE_SIZE]) for k in range(i, j))
            elif self.ram is not None:
                zero_pages(self._target(start + i, j - i))
            i = j
        return pages

    def _apply_live(self, start: int, count: int, normal: int, length: int, pages: list[tuple[int, memoryview]],
                    computed: list[int], expected: tuple[int, ...]) -> RamSection:
        """Mark the section's pages arrived, except those whose own checksum failed (torn)."""
        self._covered[start:start + count] = b"\x01" * count
        torn = 0
        for (page, _), got, want in zip(pages, computed, expected, strict=True):
            if got != want:
                self._covered[page] = 0
                torn += 1
        self.torn_pages += torn
        self._round_open = True
        return RamSection(start, count, count - normal, normal, length + SECTION_HEADER.size + CRC.size, torn)

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
        if self.config.arch != state.ARCH:
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
        if self.kind is not StreamKind.MEMORY and len(self.cpus) != self.config.vcpus:
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
