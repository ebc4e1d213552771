"""Migration URIs and the connections and snapshot directories behind them.

Accepted forms: ``tcp:IPv4:PORT``, ``tcp:[IPv6]:PORT``, ``tcp:HOSTNAME:PORT``,
``unix:PATH`` and ``file:DIR``. One connection carries both directions: the source
writes the stream, the destination answers on the same socket (see
:func:`hv.migration.stream.send_reply` and ``docs/migration-stream.md``).

``file:DIR`` snapshots are written to temporary names inside DIR, fsynced, then renamed
to ``DIR/memory`` and ``DIR/state`` (memory first, so ``state`` appears last), so a
failed snapshot never leaves a half-written ``state`` or ``memory`` behind. Both files are
created mode 0600 whatever the umask (they hold the guest's whole memory). A restore
opens only regular files (not a FIFO, device or symlink), without blocking on the open.
"""
from __future__ import annotations

import contextlib
import errno
import ipaddress
import logging
import os
import re
import select
import socket
import stat
from dataclasses import dataclass
from typing import Any, BinaryIO, Literal

from hv.errors import MigrationError
from hv.migration.stream_format import MAX_CHANNELS

log = logging.getLogger(__name__)

STATE_FILE = "state"
MEMORY_FILE = "memory"
SNAPSHOT_MODE = 0o600
_HOSTNAME_RE = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                          r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$")
_UNIX_PATH_MAX = 107  # sun_path is 108 bytes including the NUL


class MigrationUriError(MigrationError, ValueError):
    """A migration URI is malformed or uses an unsupported scheme."""


class _OsReasonError(MigrationError):
    def __init__(self, errno_: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno_


class MigrationConnectError(_OsReasonError):
    """Connecting to or listening on a migration URI failed (the OS reason is in the message)."""


class SnapshotError(_OsReasonError):
    """Writing or reading a file: snapshot failed (the OS reason is in the message)."""


@dataclass(frozen=True)
class MigrationUri:
    """A parsed migration URI. ``host``/``port`` for tcp, ``path`` for unix and file."""

    scheme: Literal["tcp", "unix", "file"]
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "tcp":
            host = f"[{self.host}]" if ":" in self.host else self.host
            return f"tcp:{host}:{self.port}"
        return f"{self.scheme}:{self.path}"


def _parse_port(text: str, uri: str) -> int:
    if not text.isdigit() or not text.isascii():
        raise MigrationUriError(f"bad port {text!r} in migration URI {uri!r} (expected 0-65535)")
    port = int(text)
    if port > 65535:
        raise MigrationUriError(f"bad port {port} in migration URI {uri!r} (expected 0-65535)")
    return port


def parse_migration_uri(uri: str) -> MigrationUri:
    """Parse ``uri``; anything unsupported raises :class:`MigrationUriError` naming the problem."""
    if not isinstance(uri, str) or not uri:
        raise MigrationUriError("empty migration URI (use tcp:HOST:PORT, unix:PATH or file:DIR)")
    if "\x00" in uri:
        raise MigrationUriError("migration URI contains a NUL byte")
    scheme, sep, rest = uri.partition(":")
    if not sep:
        raise MigrationUriError(f"migration URI {uri!r} has no scheme (use tcp:, unix: or file:)")
    if scheme == "tcp":
        return _parse_tcp(uri, rest)
    if scheme in ("unix", "file"):
        if not rest:
            raise MigrationUriError(f"migration URI {uri!r}: empty path")
        if scheme == "unix" and len(os.fsencode(rest)) > _UNIX_PATH_MAX:
            raise MigrationUriError(f"migration URI {uri!r}: unix socket path longer than {_UNIX_PATH_MAX} bytes")
        return MigrationUri(scheme, path=rest)  # type: ignore[arg-type]
    raise MigrationUriError(f"unsupported migration URI scheme {scheme!r} (use tcp:, unix: or file:)")


def _parse_tcp(uri: str, rest: str) -> MigrationUri:
    if rest.startswith("["):
        close = rest.find("]")
        if close < 0:
            raise MigrationUriError(f"migration URI {uri!r}: unterminated '[' in IPv6 address")
        host, tail = rest[1:close], rest[close + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise MigrationUriError(f"migration URI {uri!r}: bad IPv6 address {host!r}") from None
        if not tail.startswith(":"):
            raise MigrationUriError(f"migration URI {uri!r}: missing ':PORT' after the IPv6 address")
        return MigrationUri("tcp", host=host, port=_parse_port(tail[1:], uri))
    host, sep, port_text = rest.rpartition(":")
    if not sep:
        raise MigrationUriError(f"migration URI {uri!r}: expected tcp:HOST:PORT")
    if not host:
        raise MigrationUriError(f"migration URI {uri!r}: empty host")
    if ":" in host:
        raise MigrationUriError(f"migration URI {uri!r}: IPv6 addresses must be written in brackets, "
                                "e.g. tcp:[::1]:4446")
    port = _parse_port(port_text, uri)
    if not _HOSTNAME_RE.match(host):
        raise MigrationUriError(f"migration URI {uri!r}: bad host name {host!r}")
    if re.fullmatch(r"[0-9.]+", host):
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise MigrationUriError(f"migration URI {uri!r}: bad IPv4 address {host!r}") from None
    return MigrationUri("tcp", host=host, port=port)


def _as_uri(uri: MigrationUri | str) -> MigrationUri:
    return uri if isinstance(uri, MigrationUri) else parse_migration_uri(uri)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.gaierror):
        return exc.strerror or str(exc)
    if isinstance(exc, (TimeoutError, socket.timeout)):
        return "Connection timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc)


def _tune(sock: socket.socket, tcp: bool) -> None:
    """TCP_NODELAY, so the small handshake replies are not held back by Nagle.

    Buffer sizes are left to the kernel: fixing SO_SNDBUF/SO_RCVBUF (4 MiB) disables
    TCP autotuning and measured no faster on loopback here (1 MiB sendall, median of 7:
    ~2.7 GB/s autotuned vs ~1.9 GB/s fixed, on a loaded 2-core host). UNIX sockets are
    left as created.
    """
    if tcp:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _tcp_addresses(host: str, port: int) -> list[tuple[socket.AddressFamily, tuple[Any, ...]]]:
    """Where to connect for ``host``: an IP address literal as it is, a name through
    getaddrinfo. A process's first getaddrinfo costs about 1 ms (NSS and address-sorting
    setup), and a migration's clock runs from the ``migrate`` command."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        address = None
    if isinstance(address, ipaddress.IPv4Address):
        return [(socket.AF_INET, (host, port))]
    if isinstance(address, ipaddress.IPv6Address) and address.scope_id is None:
        return [(socket.AF_INET6, (host, port, 0, 0))]
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise MigrationConnectError(errno.EHOSTUNREACH, f"cannot resolve {host}: {_reason(exc)}") from exc
    return [(family, addr) for family, _type, _proto, _canon, addr in infos]


def connect(uri: MigrationUri | str, timeout: float) -> socket.socket:
    """Connect to a tcp: or unix: destination; the returned socket is blocking."""
    parsed = _as_uri(uri)
    if parsed.scheme == "file":
        raise MigrationUriError(f"{parsed} is a snapshot directory, not a connection")
    if parsed.scheme == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(parsed.path)
        except OSError as exc:
            sock.close()
            raise MigrationConnectError(exc.errno or 0, f"cannot connect to {parsed}: {_reason(exc)}") from exc
        sock.settimeout(None)
        _tune(sock, tcp=False)
        return sock
    last: OSError | None = None
    for family, addr in _tcp_addresses(parsed.host, parsed.port):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(timeout)
            sock.connect(addr)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        sock.settimeout(None)
        _tune(sock, tcp=True)
        return sock
    assert last is not None
    raise MigrationConnectError(last.errno or 0, f"cannot connect to {parsed}: {_reason(last)}") from last


class Listener:
    """A listening migration socket (``listen(uri)``); ``accept`` one source."""

    def __init__(self, sock: socket.socket, uri: MigrationUri, unix_path: str | None) -> None:
        self.sock = sock
        self.uri = uri
        self._unix_path = unix_path
        self._unix_ino: tuple[int, int] | None = None
        if unix_path is not None:
            st = os.stat(unix_path)
            self._unix_ino = (st.st_dev, st.st_ino)

    @property
    def address(self) -> MigrationUri:
        """The bound address (the real port when tcp port 0 was asked for)."""
        if self.uri.scheme == "tcp":
            return MigrationUri("tcp", host=self.uri.host, port=self.sock.getsockname()[1])
        return self.uri

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self, timeout: float | None = None) -> socket.socket:
        """Wait up to ``timeout`` seconds (None: forever) for the source to connect."""
        if timeout is not None:
            ready, _, _ = select.select([self.sock], [], [], timeout)
            if not ready:
                raise TimeoutError(f"no migration connection on {self.uri} within {timeout:g} s")
        conn, _addr = self.sock.accept()
        conn.settimeout(None)
        _tune(conn, tcp=self.uri.scheme == "tcp")
        return conn

    def close(self) -> None:
        """Close the socket and remove the unix socket file (only if it is still ours)."""
        if self.sock.fileno() >= 0:
            self.sock.close()
        if self._unix_path is not None and self._unix_ino is not None:
            try:
                st = os.stat(self._unix_path)
                if (st.st_dev, st.st_ino) == self._unix_ino:
                    os.unlink(self._unix_path)
            except FileNotFoundError:
                pass
            self._unix_path = None

    def __enter__(self) -> Listener:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def listen(uri: MigrationUri | str, backlog: int = MAX_CHANNELS) -> Listener:
    """Listen on a tcp: or unix: URI. A stale unix socket file (nobody listening) is replaced."""
    parsed = _as_uri(uri)
    if parsed.scheme == "file":
        raise MigrationUriError(f"{parsed} is a snapshot directory, not a listening address")
    if parsed.scheme == "unix":
        path = parsed.path
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            raise MigrationConnectError(exc.errno or 0, f"cannot listen on {parsed}: {_reason(exc)}") from exc
        return Listener(sock, parsed, path)
    try:
        infos = socket.getaddrinfo(parsed.host, parsed.port, type=socket.SOCK_STREAM,
                                   flags=socket.AI_PASSIVE)
    except OSError as exc:
        raise MigrationConnectError(errno.EADDRNOTAVAIL, f"cannot resolve {parsed.host}: {_reason(exc)}") from exc
    last: OSError | None = None
    for family, stype, proto, _canon, addr in infos:
        sock = socket.socket(family, stype, proto)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(addr)
            sock.listen(backlog)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        return Listener(sock, parsed, None)
    assert last is not None
    raise MigrationConnectError(last.errno or 0, f"cannot listen on {parsed}: {_reason(last)}") from last


def _remove_stale_socket(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise MigrationConnectError(errno.EEXIST, f"cannot listen on unix:{path}: a non-socket file exists there")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)  # nobody listens: stale
        log.info("removed stale migration socket %s", path)
        return
    except OSError:
        return  # let bind report it
    finally:
        probe.close()
    raise MigrationConnectError(errno.EADDRINUSE, f"cannot listen on unix:{path}: another process is listening there")


# --------------------------------------------------------------------------------------
# file: snapshots
# --------------------------------------------------------------------------------------
class SnapshotWriter:
    """Writes DIR/state and DIR/memory atomically: temp names, fsync, rename on commit.

    Use as a context manager; leaving the block with an exception removes the temp files
    and leaves any previous snapshot in DIR as it was.
    """

    def __init__(self, directory: str) -> None:
        self.directory = directory
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise SnapshotError(exc.errno or 0,
                                f"cannot create snapshot directory {directory}: {_reason(exc)}") from exc
        tag = f".tmp-{os.getpid()}-{id(self):x}"
        self._tmp = {name: os.path.join(directory, name + tag) for name in (STATE_FILE, MEMORY_FILE)}
        self.files: dict[str, BinaryIO] = {}
        try:
            for name, path in self._tmp.items():
                self.files[name] = _create_private(path)
        except OSError as exc:
            self.abort()
            raise SnapshotError(exc.errno or 0, f"cannot write snapshot in {directory}: {_reason(exc)}") from exc

    @property
    def state(self) -> BinaryIO:
        return self.files[STATE_FILE]

    @property
    def memory(self) -> BinaryIO:
        return self.files[MEMORY_FILE]

    def commit(self) -> None:
        """fsync both files, rename memory then state into place, fsync the directory."""
        try:
            for f in self.files.values():
                os.fsync(f.fileno())
                f.close()
            os.replace(self._tmp[MEMORY_FILE], os.path.join(self.directory, MEMORY_FILE))
            os.replace(self._tmp[STATE_FILE], os.path.join(self.directory, STATE_FILE))
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as exc:
            self.abort()
            raise SnapshotError(exc.errno or 0, f"cannot write snapshot in {self.directory}: {_reason(exc)}") from exc

    def abort(self) -> None:
        for f in self.files.values():
            with contextlib.suppress(OSError):
                f.close()
        for path in self._tmp.values():
            with contextlib.suppress(OSError):
                os.unlink(path)

    def __enter__(self) -> SnapshotWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None:
            self.abort()


def _create_private(path: str) -> BinaryIO:
    """A new file, mode 0600 regardless of the umask (fchmod after the create: a umask
    can only take bits away, and one like 0277 would leave it unwritable by its owner)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, SNAPSHOT_MODE)
    try:
        os.fchmod(fd, SNAPSHOT_MODE)
        return os.fdopen(fd, "wb", buffering=0)
    except BaseException:
        os.close(fd)
        raise


def _open_regular(path: str) -> BinaryIO:
    """Open a snapshot file for reading only if it is a regular file.

    O_NONBLOCK makes the open itself return at once even for a FIFO with no writer (a
    plain open would block hv for good, deaf to quit and SIGTERM); O_NOFOLLOW refuses a
    symlink; the type is then checked on the opened descriptor (fstat), so nothing can be
    swapped in between. Reads of a regular file never block, O_NONBLOCK is then cleared.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = ("a FIFO" if stat.S_ISFIFO(mode) else "a directory" if stat.S_ISDIR(mode)
                    else "a socket" if stat.S_ISSOCK(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
                    else "an unusual file")
            raise SnapshotError(errno.EINVAL, f"cannot read snapshot {path}: {kind}, not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb", buffering=0)  # unbuffered: the os.readv path
    except BaseException:
        os.close(fd)
        raise


def open_snapshot(directory: str) -> tuple[BinaryIO, BinaryIO]:
    """Open DIR/state and DIR/memory for reading (caller closes both); each must be a
    regular file (see :func:`_open_regular`)."""
    opened: list[BinaryIO] = []
    try:
        for name in (STATE_FILE, MEMORY_FILE):
            opened.append(_open_regular(os.path.join(directory, name)))
    except OSError as exc:
        for f in opened:
            f.close()
        reason = "a symbolic link, not a regular file" if exc.errno == errno.ELOOP else _reason(exc)
        raise SnapshotError(exc.errno or 0, f"cannot read snapshot {os.path.join(directory, name)}: {reason}") from exc
    except SnapshotError:
        for f in opened:
            f.close()
        raise
    return opened[0], opened[1]
