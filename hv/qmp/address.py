"""Parsing of the command-line options that say where the QMP monitor listens.

Three spellings are understood, as StratoVirt and QEMU users write them:

* ``-qmp unix:PATH,server,nowait`` and ``-qmp tcp:HOST:PORT,server,nowait``
  (``HOST`` an IPv4 address, an IPv6 address in brackets, a host name, or empty for
  every interface; ``server=on`` / ``wait=off`` are accepted as the modern spellings);
* ``-chardev socket,id=ID,path=PATH,server,nowait`` (or ``host=H,port=P`` for TCP);
* ``-mon chardev=ID,mode=control``, which binds a monitor to such a chardev.

A comma inside a value is written twice (``,,``), as QEMU's option parser expects.
Every malformed value raises :class:`QmpAddressError` with one line naming the problem.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Literal

from hv.errors import MonitorError

__all__ = [
    "QmpAddressError",
    "SocketSpec",
    "UNIX_PATH_MAX",
    "parse_chardev_option",
    "parse_mon_option",
    "parse_qmp_option",
    "parse_socket_address",
]

#: Longest AF_UNIX path Linux accepts (sun_path is 108 bytes including the NUL).
UNIX_PATH_MAX = 107

_ON = frozenset({"on", "yes", "true", "y"})
_OFF = frozenset({"off", "no", "false", "n"})


class QmpAddressError(MonitorError, ValueError):
    """A -qmp, -chardev or -mon value is malformed or asks for something hv cannot do."""


@dataclass(frozen=True)
class SocketSpec:
    """Where a QMP server listens: a unix socket path, or a TCP host and port.

    ``host`` is stored without IPv6 brackets; an empty host means every interface.
    ``port`` 0 asks the kernel for an ephemeral port (the server reports the real one).
    """

    kind: Literal["unix", "tcp"]
    path: str = ""
    host: str = ""
    port: int = 0

    def __post_init__(self) -> None:
        if self.kind == "unix":
            _check_unix_path(self.path)
        elif self.kind == "tcp":
            if not 0 <= self.port <= 65535:
                raise QmpAddressError(f"TCP port {self.port} is out of range 0-65535")
        else:
            raise QmpAddressError(f"unknown socket kind {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "unix":
            return f"unix:{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp:{host}:{self.port}"


def _check_unix_path(path: str) -> None:
    if not path:
        raise QmpAddressError("unix socket path is empty")
    if "\0" in path:
        raise QmpAddressError("unix socket path contains a NUL character")
    length = len(os.fsencode(path))
    if length > UNIX_PATH_MAX:
        raise QmpAddressError(
            f"unix socket path is {length} bytes long, the limit is {UNIX_PATH_MAX}: {path}"
        )


def _split_options(value: str) -> list[str]:
    """Split a QEMU-style option string on single commas; ``,,`` is a literal comma."""
    parts: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(value):
        char = value[i]
        if char == ",":
            if value.startswith(",,", i):
                current.append(",")
                i += 2
                continue
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
        i += 1
    parts.append("".join(current))
    return parts


def _flag_value(option: str, key: str, raw: str | None) -> bool:
    """The boolean value of ``key`` / ``key=on`` / ``key=off`` (``raw`` None for bare)."""
    if raw is None:
        return True
    lowered = raw.lower()
    if lowered in _ON:
        return True
    if lowered in _OFF:
        return False
    raise QmpAddressError(f"{option}: '{key}' expects on or off, got {raw!r}")


def _apply_server_flags(option: str, flags: dict[str, str | None]) -> None:
    """Check the server/nowait flags; hv's monitor always listens and never waits."""
    server = False
    wait = False
    for key, raw in flags.items():
        if key == "server":
            server = _flag_value(option, key, raw)
        elif key == "nowait":
            if raw is not None:
                raise QmpAddressError(f"{option}: 'nowait' takes no value")
            wait = False
        elif key == "wait":
            wait = _flag_value(option, key, raw)
        else:
            raise QmpAddressError(f"{option}: unknown option '{key}'")
    if not server:
        raise QmpAddressError(f"{option}: 'server' is required (hv's monitor only listens)")
    if wait:
        raise QmpAddressError(f"{option}: waiting for a client is not supported, use 'nowait'")


def _parse_port(option: str, text: str) -> int:
    if not text or not text.isdigit() or not text.isascii():
        raise QmpAddressError(f"{option}: port {text!r} is not a number")
    port = int(text)
    if port > 65535:
        raise QmpAddressError(f"{option}: port {port} is out of range 0-65535")
    return port


def _parse_host(option: str, text: str) -> str:
    """Validate a host: empty, IPv4, a host name, or a bracketed IPv6 address."""
    if text.startswith("["):
        if not text.endswith("]"):
            raise QmpAddressError(f"{option}: IPv6 address {text!r} lacks its closing ']'")
        inner = text[1:-1]
        if not inner or ":" not in inner:
            raise QmpAddressError(f"{option}: {text!r} is not an IPv6 address")
        return inner
    if ":" in text:
        raise QmpAddressError(f"{option}: IPv6 address {text!r} must be written in brackets")
    if any(c.isspace() or c in "[]/\0" for c in text):
        raise QmpAddressError(f"{option}: host {text!r} is not a valid host name")
    if len(text) > 253:
        raise QmpAddressError(f"{option}: host name is longer than 253 characters")
    return text


def parse_socket_address(value: str, option: str = "-qmp") -> SocketSpec:
    """Parse ``unix:PATH`` or ``tcp:HOST:PORT`` (no options) into a :class:`SocketSpec`."""
    if value.startswith("unix:"):
        try:
            return SocketSpec("unix", path=value[len("unix:"):])
        except QmpAddressError as exc:
            raise QmpAddressError(f"{option}: {exc}") from None
    if value.startswith("tcp:"):
        rest = value[len("tcp:"):]
        host_text, sep, port_text = rest.rpartition(":")
        if not sep:
            raise QmpAddressError(f"{option}: {value!r} lacks a port (tcp:HOST:PORT)")
        return SocketSpec("tcp", host=_parse_host(option, host_text), port=_parse_port(option, port_text))
    kind = value.split(":", 1)[0] if ":" in value else value
    raise QmpAddressError(
        f"{option}: unsupported address {kind!r}: use unix:PATH,server,nowait or tcp:HOST:PORT,server,nowait"
    )


def parse_qmp_option(value: str) -> SocketSpec:
    """Parse the value of ``-qmp``: ``unix:PATH,server,nowait`` or ``tcp:HOST:PORT,server,nowait``."""
    option = "-qmp"
    parts = _split_options(value)
    spec = parse_socket_address(parts[0], option)
    flags: dict[str, str | None] = {}
    for part in parts[1:]:
        key, sep, raw = part.partition("=")
        if not key:
            raise QmpAddressError(f"{option}: empty option in {value!r}")
        if key in flags:
            raise QmpAddressError(f"{option}: option '{key}' given twice")
        flags[key] = raw if sep else None
    _apply_server_flags(option, flags)
    return spec


def parse_chardev_option(value: str) -> tuple[str, SocketSpec]:
    """Parse ``-chardev socket,id=ID,path=PATH,server,nowait`` (or ``host=H,port=P``).

    Returns the chardev id and where it listens. Only socket chardevs in server mode are
    monitors; any other backend is refused with a message naming it.
    """
    option = "-chardev"
    parts = _split_options(value)
    backend = parts[0]
    if backend != "socket":
        raise QmpAddressError(f"{option}: backend {backend!r} cannot carry a monitor, use 'socket'")
    keys: dict[str, str] = {}
    flags: dict[str, str | None] = {}
    for part in parts[1:]:
        key, sep, raw = part.partition("=")
        if not key:
            raise QmpAddressError(f"{option}: empty option in {value!r}")
        if key in keys or key in flags:
            raise QmpAddressError(f"{option}: option '{key}' given twice")
        if key in ("id", "path", "host", "port"):
            if not sep:
                raise QmpAddressError(f"{option}: '{key}' needs a value ({key}=...)")
            keys[key] = raw
        else:
            flags[key] = raw if sep else None
    chardev_id = keys.get("id", "")
    if not chardev_id:
        raise QmpAddressError(f"{option}: 'id' is required")
    _apply_server_flags(option, flags)
    if "path" in keys:
        if "host" in keys or "port" in keys:
            raise QmpAddressError(f"{option}: give either 'path' or 'host'/'port', not both")
        try:
            return chardev_id, SocketSpec("unix", path=keys["path"])
        except QmpAddressError as exc:
            raise QmpAddressError(f"{option}: {exc}") from None
    if "port" in keys:
        raw_host = keys.get("host", "")
        # host= stands apart from the port, so an IPv6 address may be written bare.
        if ":" in raw_host and not raw_host.startswith("["):
            raw_host = f"[{raw_host}]"
        host = _parse_host(option, raw_host)
        return chardev_id, SocketSpec("tcp", host=host, port=_parse_port(option, keys["port"]))
    raise QmpAddressError(f"{option}: a socket needs 'path' (unix) or 'port' (tcp)")


def parse_mon_option(value: str) -> str:
    """Parse ``-mon chardev=ID,mode=control`` and return the chardev id it names."""
    option = "-mon"
    chardev_id = ""
    mode = ""
    seen: set[str] = set()
    for part in _split_options(value):
        key, sep, raw = part.partition("=")
        if key in seen:
            raise QmpAddressError(f"{option}: option '{key}' given twice")
        seen.add(key)
        if key == "chardev" and sep:
            chardev_id = raw
        elif key == "mode" and sep:
            mode = raw
        elif key in ("chardev", "mode"):
            raise QmpAddressError(f"{option}: '{key}' needs a value ({key}=...)")
        else:
            raise QmpAddressError(f"{option}: unknown option '{part}'")
    if not chardev_id:
        raise QmpAddressError(f"{option}: 'chardev' is required")
    if mode != "control":
        shown = repr(mode) if mode else "missing"
        raise QmpAddressError(f"{option}: mode is {shown}, hv supports only mode=control (QMP)")
    return chardev_id
