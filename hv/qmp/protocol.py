"""The QMP wire format: framing a byte stream into messages, decoding requests, encoding replies.

Framing follows QEMU's JSON streamer rather than requiring one message per line: a
message is a complete top-level JSON object, whether objects arrive split across reads,
several in one read, separated by newlines or by nothing at all. Structural characters
are all ASCII and never occur inside a multi-byte UTF-8 sequence, so the splitter scans
bytes and leaves UTF-8 validation to the decoder.

Limits (each violation is answered with a ``GenericError`` and the connection carries on):

* a message may be at most :data:`MAX_MESSAGE_BYTES` bytes; a longer one is answered
  once and the rest of it is discarded up to the next newline (``\\n``) — so a client
  that never sends a newline after an oversized message loses its input until it does;
* objects and arrays may nest at most :data:`MAX_NESTING` deep (same recovery);
* a raw control character inside a string ends the message as a parse error (JSON
  forbids it; this is what lets a typo'd ``"`` on an ``ncat`` line recover at the newline).
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from typing import Any

import hv
from hv.errors import MonitorError

__all__ = [
    "MAX_MESSAGE_BYTES",
    "MAX_NESTING",
    "FramingError",
    "JsonStreamSplitter",
    "ProtocolError",
    "Request",
    "decode_request",
    "encode_message",
    "error_message",
    "event_message",
    "greeting",
    "version_info",
]

MAX_MESSAGE_BYTES = 64 * 1024
MAX_NESTING = 64

_WHITESPACE = frozenset(b" \t\r\n")
_OPENERS = {ord("{"): ord("}"), ord("["): ord("]")}
_CLOSERS = frozenset(b"}]")
_QUOTE = ord('"')
_BACKSLASH = ord("\\")
_NEWLINE = ord("\n")
_REQUEST_KEYS = frozenset({"execute", "arguments", "id"})
_INT_MIN = -(2**63)
_UINT_MAX = 2**64 - 1
# Bytes that matter inside a string, outside strings within a value, and in top-level junk.
_STRING_SPECIAL = re.compile(rb'["\\\x00-\x1f]')
_VALUE_SPECIAL = re.compile(rb'["{}\[\]]')
_JUNK_SPECIAL = re.compile(rb"[\n{\[]")


@dataclass(frozen=True)
class FramingError:
    """The splitter rejected part of the stream; ``desc`` is the error reply's text."""

    desc: str


class ProtocolError(MonitorError):
    """A received message is not a valid QMP request; answered with a GenericError."""

    def __init__(self, desc: str, request_id: Any = None, has_id: bool = False) -> None:
        super().__init__(desc)
        self.desc = desc
        self.request_id = request_id
        self.has_id = has_id


@dataclass
class JsonStreamSplitter:
    """Cuts a QMP byte stream into candidate messages (bytes) and framing errors.

    ``feed`` may be given any slice of the stream; state carries over between calls.
    """

    max_message: int = MAX_MESSAGE_BYTES
    max_nesting: int = MAX_NESTING
    _buf: bytearray = field(default_factory=bytearray)
    _closers: list[int] = field(default_factory=list)
    _junk: bool = False
    _in_string: bool = False
    _escape: bool = False
    _discarding: bool = False

    def pending(self) -> int:
        """Bytes of an unfinished message held (0 between messages)."""
        return len(self._buf)

    def _reset(self) -> None:
        self._buf = bytearray()
        self._closers.clear()
        self._junk = False
        self._in_string = False
        self._escape = False

    def _take(self) -> bytes:
        message = bytes(self._buf)
        self._reset()
        return message

    def _oversized(self) -> FramingError:
        self._reset()
        return FramingError(f"QMP message exceeds the limit of {self.max_message} bytes")

    def _bulk(self, data: bytes, start: int, stop: int, out: list[bytes | FramingError]) -> int:
        """Append ``data[start:stop]`` (bytes with no framing meaning) within the size limit.

        Returns where scanning continues.
        """
        room = self.max_message - len(self._buf)
        if stop - start <= room:
            self._buf += data[start:stop]
            return stop
        overflow = start + room  # the byte that makes the message one too long
        self._discarding = data[overflow] != _NEWLINE
        out.append(self._oversized())
        return overflow + 1

    def feed(self, data: bytes) -> list[bytes | FramingError]:
        """Split ``data`` (continuing the stream so far) into messages and framing errors."""
        out: list[bytes | FramingError] = []
        i, end = 0, len(data)
        while i < end:
            if self._discarding:
                newline = data.find(b"\n", i)
                if newline < 0:
                    break
                self._discarding = False
                i = newline + 1
                continue
            if self._buf:
                # Fast paths: runs of bytes that cannot end or restructure the message.
                if self._junk:
                    pattern: re.Pattern[bytes] | None = _JUNK_SPECIAL
                elif self._in_string:
                    pattern = None if self._escape else _STRING_SPECIAL
                else:
                    pattern = _VALUE_SPECIAL
                if pattern is not None:
                    found = pattern.search(data, i)
                    stop = found.start() if found else end
                    if stop > i:
                        i = self._bulk(data, i, stop, out)
                        continue
            byte = data[i]
            i += 1
            if not self._buf:
                if byte in _WHITESPACE:
                    continue
                self._buf.append(byte)
                closer = _OPENERS.get(byte)
                if closer is not None:
                    self._closers.append(closer)
                else:
                    self._junk = True
                continue
            if self._junk:
                # Text at the top level that is not an object: a scalar or garbage. It
                # ends at a newline or where an object or array starts.
                if byte == _NEWLINE or byte in _OPENERS:
                    out.append(self._take())
                    if byte in _OPENERS:
                        self._buf.append(byte)
                        self._closers.append(_OPENERS[byte])
                    continue
                self._buf.append(byte)
            else:
                self._buf.append(byte)
                if self._in_string:
                    if self._escape:
                        self._escape = False
                    elif byte == _BACKSLASH:
                        self._escape = True
                    elif byte == _QUOTE:
                        self._in_string = False
                    elif byte < 0x20:
                        self._reset()
                        out.append(FramingError("JSON parse error, control character in a string"))
                        if byte != _NEWLINE:
                            self._discarding = True
                        continue
                elif byte == _QUOTE:
                    self._in_string = True
                elif byte in _OPENERS:
                    self._closers.append(_OPENERS[byte])
                    if len(self._closers) > self.max_nesting:
                        self._reset()
                        self._discarding = True
                        out.append(FramingError(f"JSON parse error, nesting deeper than {self.max_nesting}"))
                        continue
                elif byte in _CLOSERS:
                    if byte == self._closers[-1]:
                        self._closers.pop()
                        if not self._closers:
                            out.append(self._take())
                            continue
                    else:
                        out.append(self._take())  # mismatched bracket: decoding reports it
                        continue
            if len(self._buf) > self.max_message:
                self._discarding = byte != _NEWLINE
                out.append(self._oversized())
        return out


@dataclass(frozen=True)
class Request:
    """A decoded ``{"execute": NAME, "arguments": {...}, "id": ANY}`` request."""

    command: str
    arguments: dict[str, Any]
    request_id: Any = None
    has_id: bool = False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _bounded_int(text: str) -> int:
    value = int(text)
    if not _INT_MIN <= value <= _UINT_MAX:
        raise ValueError("integer out of range (QMP integers are 64-bit)")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} out of range")
    return value


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise ValueError(f"duplicate key '{key}'")
        obj[key] = value
    return obj


def decode_request(raw: bytes) -> Request:
    """Decode one framed message into a :class:`Request` or raise :class:`ProtocolError`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"JSON parse error, invalid UTF-8 sequence at byte {exc.start}") from None
    try:
        obj = json.loads(text, object_pairs_hook=_unique_object, parse_constant=_reject_constant,
                         parse_int=_bounded_int, parse_float=_finite_float)
    except RecursionError:
        raise ProtocolError("JSON parse error, nesting too deep") from None
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        detail = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise ProtocolError(f"JSON parse error, {detail}") from None
    if not isinstance(obj, dict):
        raise ProtocolError("QMP input must be a JSON object")
    has_id = "id" in obj
    request_id = obj.get("id")
    for key in obj:
        if key not in _REQUEST_KEYS:
            raise ProtocolError(f"QMP input member '{key}' is unexpected", request_id, has_id)
    if "execute" not in obj:
        raise ProtocolError("QMP input lacks member 'execute'", request_id, has_id)
    command = obj["execute"]
    if not isinstance(command, str):
        raise ProtocolError("QMP input member 'execute' must be a string", request_id, has_id)
    arguments = obj.get("arguments", {})
    if not isinstance(arguments, dict):
        raise ProtocolError("QMP input member 'arguments' must be an object", request_id, has_id)
    return Request(command, arguments, request_id, has_id)


def encode_message(message: dict[str, Any]) -> bytes:
    """Serialise one outgoing message, terminated by ``\\r\\n`` as StratoVirt does."""
    return json.dumps(message, ensure_ascii=True, allow_nan=False).encode("ascii") + b"\r\n"


def error_message(error_class: str, desc: str, request_id: Any = None, has_id: bool = False) -> dict[str, Any]:
    message: dict[str, Any] = {"error": {"class": error_class, "desc": desc}}
    if has_id:
        message["id"] = request_id
    return message


def version_info() -> dict[str, Any]:
    """The version object of the greeting and of ``query-version``, from ``hv.__version__``."""
    numbers = []
    for part in hv.__version__.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit()) if part else ""
        numbers.append(int(digits) if digits else 0)
    while len(numbers) < 3:
        numbers.append(0)
    major, minor, micro = numbers
    return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": f"hv-{hv.__version__}"}


def greeting() -> dict[str, Any]:
    return {"QMP": {"version": version_info(), "capabilities": []}}


def event_message(name: str, data: dict[str, Any] | None, now: float | None = None) -> dict[str, Any]:
    """An event as QEMU sends it; ``data`` is omitted when None, as QEMU does for e.g. STOP."""
    stamp = time.time() if now is None else now
    seconds = int(stamp)
    micro = int(round((stamp - seconds) * 1_000_000))
    if micro >= 1_000_000:
        seconds, micro = seconds + 1, micro - 1_000_000
    message: dict[str, Any] = {"event": name}
    if data is not None:
        message["data"] = data
    message["timestamp"] = {"seconds": seconds, "microseconds": micro}
    return message
