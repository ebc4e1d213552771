"""The migration stream's wire format: constants, section types, errors and the parsed
sections a reader returns (the layout is described in :mod:`hv.migration.stream` and
``docs/migration-stream.md``)."""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

try:  # ISA-L computes zlib's very CRC-32 (same values) about 13x faster, with PCLMULQDQ
    from isal.isal_zlib import crc32  # noqa: F401 - used by the writer and the reader
except ImportError:  # pragma: no cover - a platform without isal wheels
    from zlib import crc32  # noqa: F401

from hv.errors import StreamError
from hv.state import CpuState

if TYPE_CHECKING:
    from hv.migration.stream_records import Fingerprint

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
# 1.4: x86_64 CONFIG carries "tsc_hz", the guest TSC's rate; the destination runs the guest
# at that rate or refuses it at CONFIG. A 1.3 reader refuses such a stream (strict CONFIG
# fields); a 1.4 reader loads an older stream without it as hv's former 1 GHz (a KVM that
# cannot scale keeps its own rate; hv.machine.Machine.adopt_tsc_hz).
# 1.5: RAM_LIVE sections (type 11): pages sent straight from a running guest's RAM with one
# checksum per page, a torn page re-sent by the next pass. A source sends them only after
# the destination announced it reads them (the OK "ram-live" notice on the back channel),
# so an older destination never sees one; a reader refuses them in a stream declaring < 1.5.
# 1.6: data channels. A source may offer to send the full pass's pages over several
# connections (HEADER "channels": N, ignored by older readers); a destination that accepts
# says so on the back channel (OK "channels M", M <= N, after "ram-live"). Each extra
# connection carries a stream of its own: preamble, CHANNEL (which migration, which
# channel), RAM/RAM_LIVE sections of pass 1 only, END. The main stream then says how many
# channels carried pages (CHANNELS_END) before its ROUND_END 1, and the destination
# applies nothing more until each of them has ended: a page sent again by pass 2 can never
# be overwritten by its pass-1 copy.
# 1.7: RAM_HASHED sections (type 14): RAM_LIVE's pages with an XXH3-64 per page sent after
# the pages, so the source hashes what it has just copied into the socket (from the cache)
# and both ends hash at about twice CRC-32's speed. A destination that reads them says so
# with a second notice, OK "ram-hashed", after "ram-live", only to a source that declared
# 1.7 (an older one would take it for a refusal); a source may still send RAM_LIVE. A
# reader refuses RAM_HASHED in a stream declaring < 1.7.
FORMAT_MINOR = 7
RAM_LIVE_MINOR = 5  # the first minor version in which a RAM_LIVE section may appear
CHANNELS_MINOR = 6  # the first minor version with data channels
HASHED_MINOR = 7  # the first minor version in which a RAM_HASHED section may appear
LIVE_NOTICE = "ram-live"  # OK reply text: "this destination reads RAM_LIVE sections"
HASHED_NOTICE = "ram-hashed"  # OK reply text: "... and RAM_HASHED sections" (format 1.7)
CHANNELS_NOTICE = "channels"  # OK reply text "channels M": "connect M - 1 data channels"
MAX_CHANNELS = 8  # connections per migration, the main one included

PREAMBLE = struct.Struct("<8sHHI")
SECTION_HEADER = struct.Struct("<BBHI")
CRC = struct.Struct("<I")
RAM_RUN = struct.Struct("<QII")  # start page, page count, reserved (0)
ROUND = struct.Struct("<I")
CPU_INDEX = struct.Struct("<I")
DEVICE_HEAD = struct.Struct("<HHIB")  # name length, id length, version, encoding
PAGE_CRC = struct.Struct("<I")  # RAM_LIVE: one CRC-32 per normal page
PAGE_HASH = struct.Struct("<Q")  # RAM_HASHED: one XXH3-64 per normal page

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
    RAM_LIVE = 11  # pages straight from a running guest, a checksum per page (format 1.5)
    CHANNEL = 12  # a data channel's first section: its migration's stream id, its index (1.6)
    CHANNELS_END = 13  # main stream, pass 1: how many data channels carried pages (1.6)
    RAM_HASHED = 14  # RAM_LIVE with an XXH3-64 per page after the pages (format 1.7)


class StreamKind(enum.Enum):
    """What a stream must contain to be complete."""

    MIGRATION = "migration"  # config, RAM covering every page, every vCPU, END
    STATE = "state"  # file snapshot DIR/state: config, CPUs, devices, no RAM
    MEMORY = "memory"  # file snapshot DIR/memory: config, RAM covering every page
    CHANNEL = "channel"  # a data channel: CHANNEL, RAM of pass 1, END (format 1.6)


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
    channels: int = 1  # connections the source offers to use (format 1.6; 1: none extra)


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
    torn: int = 0  # RAM_LIVE pages whose own checksum failed: not arrived, sent again later


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


@dataclass(frozen=True)
class ChannelSection:
    """A data channel's opening: the main stream's id and this channel's index (1..)."""

    stream_id: str
    index: int


@dataclass(frozen=True)
class ChannelsEndSection:
    """Main stream: ``count`` data channels carried pages of pass 1 and have ended."""

    count: int


Section = (HeaderSection | ConfigSection | RamSection | RoundEndSection | DeviceSection
           | CpuSection | EndSection | ChannelSection | ChannelsEndSection)
