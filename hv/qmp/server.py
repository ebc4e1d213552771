"""The QMP server: listening sockets, one thread, any number of clients, events to all.

Model
-----
* One daemon thread runs a ``selectors`` loop over every listening socket and client.
  Commands run on that thread, inside :attr:`CommandTable.lock`, one at a time; a slow
  command delays the others (long work such as migration belongs on its own thread).
* Up to :data:`MAX_CLIENTS` clients at once; each gets the greeting on connect and every
  event. A connection beyond the limit receives one GenericError line and is closed.
* Output is buffered per client; a client whose unread output exceeds
  :data:`MAX_OUTPUT_BYTES` (it stopped reading replies and events) is disconnected.
* :meth:`QmpServer.emit_event` may be called from any thread, including from a handler.
* A unix socket is created with mode 0600 before it accepts connections. A stale socket
  file at the path (nobody listening) is replaced; a live one, or any other kind of file,
  is refused. :meth:`QmpServer.close` removes the files this server created.
"""
from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
import selectors
import socket
import stat
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from hv.errors import MonitorError
from hv.qmp.address import SocketSpec
from hv.qmp.commands import CommandTable, QmpError, Reply
from hv.qmp.protocol import (
    MAX_MESSAGE_BYTES,
    FramingError,
    JsonStreamSplitter,
    ProtocolError,
    decode_request,
    encode_message,
    error_message,
    event_message,
    greeting,
)

__all__ = ["MAX_CLIENTS", "MAX_OUTPUT_BYTES", "QmpServer", "QmpServerError"]

log = logging.getLogger(__name__)

MAX_CLIENTS = 64
MAX_OUTPUT_BYTES = 4 * 1024 * 1024
_RECV_BYTES = 65536
_CLOSE_FLUSH_SECONDS = 0.5


class QmpServerError(MonitorError, OSError):
    """The QMP server could not listen where it was asked to.

    Raised as ``QmpServerError(errno, message)``; ``str()`` is the message alone (the
    message already names the address and the OS reason), never OSError's
    ``[Errno N] message``, so it can be shown to the user as it is.
    """

    def __str__(self) -> str:
        return self.strerror if self.strerror else super().__str__()


@dataclass
class _Client:
    sock: socket.socket
    name: str
    splitter: JsonStreamSplitter
    out: bytearray = field(default_factory=bytearray)
    queued_total: int = 0
    sent_total: int = 0
    afters: list[tuple[int, Callable[[], None]]] = field(default_factory=list)
    closed: bool = False   # no more output is queued; the loop drops it
    read_closed: bool = False  # the client half-closed: deliver what is queued, then drop
    dropped: bool = False  # socket closed and forgotten


@dataclass
class _Listener:
    sock: socket.socket
    spec: SocketSpec
    unix_identity: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket file we made


class QmpServer:
    """Serves QMP on every address in ``specs`` with the commands of ``commands``."""

    def __init__(self, specs: list[SocketSpec], commands: CommandTable, *,
                 max_message: int = MAX_MESSAGE_BYTES, max_clients: int = MAX_CLIENTS,
                 max_output: int = MAX_OUTPUT_BYTES) -> None:
        if not specs:
            raise ValueError("QmpServer needs at least one address")
        self._specs = list(specs)
        self._commands = commands
        self._max_message = max_message
        self._max_clients = max_clients
        self._max_output = max_output
        self._listeners: list[_Listener] = []
        self._clients: dict[int, _Client] = {}
        self._lock = threading.Lock()          # guards _clients and every client's output
        self._close_lock = threading.Lock()
        self._selector: selectors.BaseSelector | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._closing = False
        self._events_closed = False   # set once close() has flushed the last replies' events
        self._closed = False
        self._ids = itertools.count(1)

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Bind and listen on every address, then serve on a daemon thread."""
        if self._thread is not None or self._closed:
            raise RuntimeError("QmpServer.start() may be called once")
        try:
            for spec in self._specs:
                if spec.kind == "unix":
                    self._listeners.append(self._bind_unix(spec))
                else:
                    self._listeners.extend(self._bind_tcp(spec))
        except BaseException:
            self._close_listeners()
            raise
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        for listener in self._listeners:
            listener.sock.setblocking(False)
            self._selector.register(listener.sock, selectors.EVENT_READ, listener)
        self._thread = threading.Thread(target=self._run, name="qmp-server", daemon=True)
        self._thread.start()
        for listener in self._listeners:
            log.info("QMP listening on %s", listener.spec)

    @property
    def addresses(self) -> list[SocketSpec]:
        """Where the server listens, with the real port of every TCP listener."""
        return [listener.spec for listener in self._listeners]

    def client_count(self) -> int:
        with self._lock:
            return len(self._clients)

    def close(self) -> None:
        """Stop serving: flush what is queued (briefly), close clients, remove socket files.

        Idempotent. Safe from any thread, including from a command handler or a Reply's
        ``after`` callback, where the serving loop stops once the callback returns.
        """
        with self._close_lock:
            if self._closed:
                return
            self._closing = True
            on_server_thread = threading.current_thread() is self._thread
            if self._thread is not None and not on_server_thread:
                self._wake()
                self._thread.join(timeout=10)
                if self._thread.is_alive():
                    log.warning("QMP server thread did not stop within 10 s (a command is still running)")
            self._closed = True
            # Listeners (and socket files) go first: a client that sees EOF can rely on
            # the socket file being gone already.
            self._close_listeners()
            with self._lock:
                clients = list(self._clients.values())
            # A reply may carry an event to send after it (device_del's DEVICE_DELETED);
            # deliver those too before hanging up: flush replies, run their callbacks,
            # flush the events they emitted.
            for client in clients:
                self._flush_blocking(client)
            for client in clients:
                with self._lock:
                    ready = [callback for pos, callback in client.afters if pos <= client.sent_total]
                    client.afters = [(pos, cb) for pos, cb in client.afters if pos > client.sent_total]
                for callback in ready:
                    self._run_after(callback)
            with self._lock:
                self._events_closed = True
                clients = list(self._clients.values())
                self._clients.clear()
            for client in clients:
                self._flush_blocking(client)
                self._drop(client, unregister=False)
            if self._selector is not None:
                self._selector.close()
            for sock in (self._wake_r, self._wake_w):
                if sock is not None:
                    sock.close()

    def __enter__(self) -> QmpServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------------- events
    def emit_event(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Send event ``name`` with ``data`` (omitted when None) to every connected client."""
        if not isinstance(name, str) or not name:
            raise ValueError("an event needs a non-empty name")
        payload = encode_message(event_message(name, data))  # TypeError on unserialisable data
        with self._lock:
            if self._events_closed:
                log.debug("event %s dropped: QMP server closed", name)
                return
            for client in list(self._clients.values()):
                self._queue_locked(client, payload)
        if not self._closing:
            self._wake()

    # ------------------------------------------------------------------ binding
    def _bind_unix(self, spec: SocketSpec) -> _Listener:
        path = spec.path
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise QmpServerError(exc.errno, f"cannot use QMP socket path {path}: {exc.strerror}") from None
        if st is not None:
            if not stat.S_ISSOCK(st.st_mode):
                raise QmpServerError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
            if _unix_socket_is_live(path):
                raise QmpServerError(errno.EADDRINUSE, f"{path} is in use by another running server")
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise QmpServerError(exc.errno, f"cannot remove stale socket {path}: {exc.strerror}") from None
            log.info("replaced stale QMP socket %s", path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(path)
            # Permissions are fixed before listen(): until then connect() is refused.
            os.chmod(path, 0o600)
            created = os.stat(path)
            sock.listen(16)
        except OSError as exc:
            sock.close()
            raise QmpServerError(exc.errno, f"cannot listen on unix:{path}: {exc.strerror}") from None
        return _Listener(sock, spec, (created.st_dev, created.st_ino))

    def _bind_tcp(self, spec: SocketSpec) -> list[_Listener]:
        host = spec.host or None
        try:
            infos = socket.getaddrinfo(host, spec.port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0,
                                       socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise QmpServerError(errno.EINVAL, f"cannot resolve QMP host {spec.host!r}: {exc.strerror}") from None
        seen: set[tuple[int, str]] = set()
        unique = []
        for info in infos:
            key = (info[0], str(info[4][0]))   # an IP address text (typeshed also allows int for other families)
            if key not in seen:
                seen.add(key)
                unique.append(info)
        listeners: list[_Listener] = []
        port = spec.port
        last_error: OSError | None = None
        for family, socktype, proto, _canon, sockaddr in unique:
            sock = socket.socket(family, socktype, proto)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6 and len(unique) > 1:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                address = (sockaddr[0], port) + tuple(sockaddr[2:])
                sock.bind(address)
                sock.listen(16)
            except OSError as exc:
                sock.close()
                last_error = exc
                if listeners:  # another address of the same name is already served
                    log.warning("QMP: not also listening on %s: %s", sockaddr[0], exc.strerror)
                continue
            port = sock.getsockname()[1]
            listeners.append(_Listener(sock, SocketSpec("tcp", host=str(sockaddr[0]), port=port)))
        if not listeners:
            detail = last_error.strerror if last_error is not None else "no usable address"
            code = last_error.errno if last_error is not None else errno.EINVAL
            raise QmpServerError(code, f"cannot listen on {spec}: {detail}")
        return listeners

    def _close_listeners(self) -> None:
        for listener in self._listeners:
            listener.sock.close()
            if listener.unix_identity is not None:
                try:
                    st = os.lstat(listener.spec.path)
                except OSError:
                    continue
                if (st.st_dev, st.st_ino) == listener.unix_identity:
                    try:
                        os.unlink(listener.spec.path)
                    except OSError as exc:
                        log.warning("cannot remove QMP socket %s: %s", listener.spec.path, exc.strerror)
        self._listeners = []

    # --------------------------------------------------------------- event loop
    def _wake(self) -> None:
        sock = self._wake_w
        if sock is None:
            return
        with contextlib.suppress(OSError):  # BlockingIOError: already awake; other OSError: closed
            sock.send(b"\0")

    def _run(self) -> None:
        assert self._selector is not None
        try:
            while not self._closing:
                self._update_interest()
                for key, mask in self._selector.select():
                    if self._closing:
                        return
                    target = key.data
                    if target == "wake":
                        self._drain_wake()
                    elif isinstance(target, _Listener):
                        self._accept(target)
                    elif isinstance(target, _Client):
                        if target.closed:
                            self._drop(target)
                            continue
                        if mask & selectors.EVENT_WRITE and not target.closed:
                            self._flush(target)
                        if mask & selectors.EVENT_READ and not (target.closed or target.read_closed):
                            self._read(target)
        except Exception:
            if not self._closing:
                log.exception("QMP server loop failed")

    def _drain_wake(self) -> None:
        assert self._wake_r is not None
        try:
            while self._wake_r.recv(4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _update_interest(self) -> None:
        assert self._selector is not None
        with self._lock:
            clients = list(self._clients.values())
        for client in clients:
            if client.closed or (client.read_closed and not client.out):
                self._drop(client)
                continue
            if client.read_closed:
                wanted = selectors.EVENT_WRITE
            else:
                wanted = selectors.EVENT_READ | (selectors.EVENT_WRITE if client.out else 0)
            try:
                if self._selector.get_key(client.sock).events != wanted:
                    self._selector.modify(client.sock, wanted, client)
            except (KeyError, ValueError):
                pass

    def _accept(self, listener: _Listener) -> None:
        assert self._selector is not None
        while not self._closing:
            try:
                sock, peer = listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("QMP accept on %s failed: %s", listener.spec, exc.strerror)
                return
            name = f"{listener.spec}#{next(self._ids)}"
            with self._lock:
                full = len(self._clients) >= self._max_clients
            if full:
                log.warning("QMP: refusing %s, %d clients connected", name, self._max_clients)
                try:
                    sock.settimeout(0.2)
                    sock.sendall(encode_message(error_message(
                        "GenericError", f"too many QMP clients (limit {self._max_clients})")))
                except OSError:
                    pass
                sock.close()
                continue
            sock.setblocking(False)
            client = _Client(sock, name, JsonStreamSplitter(max_message=self._max_message))
            with self._lock:
                self._clients[id(client)] = client
                self._queue_locked(client, encode_message(greeting()))
            self._selector.register(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)
            log.debug("QMP client %s connected (peer %r)", name, peer)

    def _read(self, client: _Client) -> None:
        try:
            data = client.sock.recv(_RECV_BYTES)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.info("QMP client %s: receive failed: %s", client.name, exc.strerror)
            self._drop(client)
            return
        if not data:
            if client.splitter.pending():
                log.info("QMP client %s left mid-message (%d bytes discarded)", client.name,
                         client.splitter.pending())
            with self._lock:
                client.read_closed = True
                finished = not client.out
            if finished:
                self._drop(client)
            # otherwise the loop writes the queued replies (ncat half-closes at stdin EOF)
            return
        for item in client.splitter.feed(data):
            if self._closing or client.closed:
                return
            self._handle(client, item)

    def _handle(self, client: _Client, item: bytes | FramingError) -> None:
        after: Callable[[], None] | None = None
        if isinstance(item, FramingError):
            reply = error_message("GenericError", item.desc)
        else:
            try:
                request = decode_request(item)
            except ProtocolError as exc:
                reply = error_message("GenericError", exc.desc, exc.request_id, exc.has_id)
            else:
                reply, after = self._execute(request.command, request.arguments,
                                             request.request_id, request.has_id)
        try:
            payload = encode_message(reply)
        except (TypeError, ValueError) as exc:
            log.error("QMP reply is not JSON-serialisable: %s", exc)
            reply = error_message("GenericError", f"internal error: reply cannot be encoded: {exc}",
                                  reply.get("id"), "id" in reply)
            payload = encode_message(reply)
        with self._lock:
            if client.closed:
                pass
            else:
                self._queue_locked(client, payload)
                if after is not None:
                    client.afters.append((client.queued_total, after))
                    after = None
        if after is not None:  # client already gone: the command still completes
            self._run_after(after)
        if not client.closed:
            self._flush(client)

    def _execute(self, command: str, arguments: dict[str, Any], request_id: Any,
                 has_id: bool) -> tuple[dict[str, Any], Callable[[], None] | None]:
        try:
            result: Reply = self._commands.dispatch(command, arguments)
        except QmpError as exc:
            return error_message(exc.error_class, exc.desc, request_id, has_id), None
        message: dict[str, Any] = {"return": result.value}
        if has_id:
            message["id"] = request_id
        return message, result.after

    # ------------------------------------------------------------------ output
    def _queue_locked(self, client: _Client, payload: bytes) -> None:
        if client.closed:
            return
        if len(client.out) + len(payload) > self._max_output:
            log.warning("QMP client %s is not reading its output; disconnecting", client.name)
            client.closed = True  # _flush / the loop completes the drop
            return
        client.out += payload
        client.queued_total += len(payload)

    def _flush(self, client: _Client) -> None:
        ready: list[Callable[[], None]] = []
        drop = False
        with self._lock:
            if client.closed:
                drop = True
            else:
                while client.out:
                    try:
                        sent = client.sock.send(client.out)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        drop = True
                        break
                    del client.out[:sent]
                    client.sent_total += sent
                while client.afters and client.afters[0][0] <= client.sent_total:
                    ready.append(client.afters.pop(0)[1])
        for callback in ready:
            self._run_after(callback)
        if drop:
            self._drop(client)

    def _flush_blocking(self, client: _Client) -> None:
        if client.closed or not client.out:
            return
        try:
            client.sock.settimeout(_CLOSE_FLUSH_SECONDS)
            client.sock.sendall(client.out)
            client.sent_total += len(client.out)
            client.out.clear()
        except OSError:
            pass

    def _drop(self, client: _Client, unregister: bool = True) -> None:
        with self._lock:
            if client.dropped:
                return
            client.dropped = True
            client.closed = True
            self._clients.pop(id(client), None)
            pending = [callback for _pos, callback in client.afters]
            client.afters.clear()
        if unregister and self._selector is not None and not self._closed:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(client.sock)
        with contextlib.suppress(OSError):
            client.sock.close()
        log.debug("QMP client %s disconnected", client.name)
        for callback in pending:
            self._run_after(callback)

    def _run_after(self, callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:
            log.exception("QMP reply callback failed")


def _unix_socket_is_live(path: str) -> bool:
    """True when something accepts connections on the unix socket at ``path``."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(0.5)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True

