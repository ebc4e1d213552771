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

The format is split along its seams: :mod:`~hv.migration.stream_format` (constants,
section types, errors, parsed sections), :mod:`~hv.migration.stream_records` (the CONFIG
fingerprint and its validation), :mod:`~hv.migration.stream_channels` (sockets and files),
:mod:`~hv.migration.stream_writer` and :mod:`~hv.migration.stream_reader`. This module
re-exports all of them (``from hv.migration.stream import StreamReader`` keeps working)
and holds the back channel (destination -> source replies), which uses both halves.
"""
from __future__ import annotations

import os
import select
import ssl
from dataclasses import dataclass

from hv.errors import StreamError
from hv.migration import stream_native
from hv.migration.stream_channels import FileChannel, Sink, SocketChannel, Source
from hv.migration.stream_format import (
    CHANNELS_MINOR,
    CHANNELS_NOTICE,
    CPU_INDEX,
    CRC,
    DEFAULT_RUN_PAGES,
    DEVICE_HEAD,
    FLAG_SKIPPABLE,
    FORMAT_MAJOR,
    FORMAT_MINOR,
    HASHED_MINOR,
    HASHED_NOTICE,
    KNOWN_FLAGS,
    LIVE_NOTICE,
    MAGIC,
    MAX_DEVICES,
    MAX_JSON_BYTES,
    MAX_MESSAGE_BYTES,
    MAX_NAME_BYTES,
    MAX_RUN_PAGES,
    MAX_SECTION_BYTES,
    MAX_VCPUS,
    PAGE_NORMAL,
    PAGE_SIZE,
    PAGE_ZERO,
    POPULATE_MIN_PAGES,
    PREAMBLE,
    RAM_LIVE_MINOR,
    RAM_RUN,
    ROUND,
    SECTION_HEADER,
    ZERO_PAGE,
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
    StreamWriteError,
    crc32,
)
from hv.migration.stream_reader import RamTarget, StreamReader
from hv.migration.stream_records import DeviceFingerprint, Fingerprint, compare_fingerprints
from hv.migration.stream_writer import NOTICES, RamStats, StreamWriter
from hv.textsafe import printable_bytes

__all__ = ["CHANNELS_MINOR", "CPU_INDEX", "CRC", "ChannelSection", "ChannelsEndSection",
           "ConfigMismatchError", "ConfigSection", "CpuSection", "DEFAULT_RUN_PAGES",
           "DEVICE_HEAD", "DeviceEncoding", "DeviceFingerprint", "DeviceSection", "EndSection",
           "FLAG_SKIPPABLE", "FORMAT_MAJOR", "FORMAT_MINOR", "FileChannel", "Fingerprint", "HeaderSection",
           "KNOWN_FLAGS", "MAGIC", "MAX_DEVICES", "MAX_JSON_BYTES", "MAX_MESSAGE_BYTES", "MAX_NAME_BYTES",
           "MAX_RUN_PAGES", "MAX_SECTION_BYTES", "MAX_VCPUS", "PAGE_NORMAL", "PAGE_SIZE", "PAGE_ZERO",
           "POPULATE_MIN_PAGES", "PREAMBLE", "PeerCanceled", "PeerError", "RAM_RUN", "ROUND", "RamSection",
           "RamStats", "RamTarget", "Reply", "RoundEndSection", "SECTION_HEADER", "Section", "SectionType",
           "Sink", "SocketChannel", "Source", "StreamError", "StreamKind", "StreamReader", "StreamWriteError",
           "StreamWriter", "ZERO_PAGE", "announce_channels", "announce_live_ram", "compare_fingerprints", "crc32",
           "poll_reply",
           "read_reply", "send_reply"]


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
    """Source side: read one OK/ERROR reply, validated like any section. The destination's
    notices (``ram-live``, format 1.5; ``channels M``, 1.6) are not replies: they are skipped."""
    notices = set(NOTICES.values())
    while True:
        reply = _read_one_reply(source)
        if not (reply.ok and reply.text in notices):
            return reply


def announce_live_ram(channel: SocketChannel, version: tuple[int, int]) -> bool:
    """Destination side, once CONFIG is accepted: tell a source whose stream declared
    format 1.5 or later (``version``) that RAM_LIVE sections may follow (one OK
    ``ram-live`` on the back channel), and one that declared 1.7 or later, when this hv
    has its native stream code, that RAM_HASHED sections may too (a second OK,
    ``ram-hashed``). Never to an older source, which would take it for a refusal; never
    over TLS (its source keeps copying, and reads no notice), nor with
    ``HV_STREAM_LIVE=0`` in the environment (to measure the copying path). True if sent."""
    if version < (FORMAT_MAJOR, RAM_LIVE_MINOR) or isinstance(channel.sock, ssl.SSLSocket):
        return False
    if os.environ.get("HV_STREAM_LIVE", "1") == "0":  # for measuring the copying path (A/B)
        return False
    send_reply(channel, True, LIVE_NOTICE)
    if version >= (FORMAT_MAJOR, HASHED_MINOR) and stream_native.available():
        send_reply(channel, True, HASHED_NOTICE)   # its native receiver hashes what lands
    return True


def announce_channels(channel: SocketChannel, count: int) -> None:
    """Destination side, after ``ram-live``: tell a source that offered data channels
    (format 1.6) how many connections this destination takes, the main one included."""
    send_reply(channel, True, f"{CHANNELS_NOTICE} {count}")


def _read_one_reply(source: Source) -> Reply:
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
