"""``hv-qmp SOCKET COMMAND [key=value ...]``: run one QMP command from a terminal.

SOCKET is a unix socket path (``unix:PATH`` also works) or ``tcp:HOST:PORT``. Each
``key=value`` becomes an argument; the value is taken as JSON when it parses as JSON
(``count=3``, ``on=true``, ``list=[1,2]``) and as a string otherwise (``uri=tcp:h:4446``);
quote it as a JSON string to force a string (``name='"42"'``).

The reply (``{"return": ...}`` or ``{"error": ...}``) is printed on stdout as JSON. Exit
status: 0 on success, 2 on an error reply, 1 when the monitor cannot be reached or the
command line is wrong (one line on stderr says why).

``hv-qmp SOCKET --events`` (after COMMAND, if one is given) follows the monitor's events
and prints each as one JSON line as it arrives, until Ctrl-C or the monitor hangs up
(both exit 0).
"""
from __future__ import annotations

import argparse
import json
import logging
import select
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

from hv.errors import ConfigError, MonitorError
from hv.qmp.address import QmpAddressError, SocketSpec, parse_socket_address
from hv.qmp.protocol import JsonStreamSplitter, encode_message

__all__ = ["QmpClientError", "QmpConnection", "main", "parse_arguments", "parse_target"]

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_ERROR_REPLY = 2
_REQUEST_ID = "hv-qmp"


class QmpClientError(MonitorError):
    """The monitor could not be reached, or it broke the protocol."""


class _UsageError(ConfigError):
    """The hv-qmp command line is wrong."""


def parse_target(text: str) -> SocketSpec:
    """A unix path, ``unix:PATH`` or ``tcp:HOST:PORT``."""
    if text.startswith(("unix:", "tcp:")):
        return parse_socket_address(text, "hv-qmp")
    return parse_socket_address(f"unix:{text}", "hv-qmp")


def parse_arguments(pairs: Sequence[str]) -> dict[str, Any]:
    """``key=value`` words to a QMP arguments object (values JSON when they parse)."""
    arguments: dict[str, Any] = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise _UsageError(f"argument {pair!r} is not key=value")
        if key in arguments:
            raise _UsageError(f"argument '{key}' given twice")
        try:
            arguments[key] = json.loads(raw, parse_constant=_no_constant)
        except ValueError:
            arguments[key] = raw
    return arguments


def _no_constant(name: str) -> Any:
    raise ValueError(name)


class QmpConnection:
    """A minimal blocking QMP client: connect, read the greeting, execute commands."""

    def __init__(self, target: SocketSpec, timeout: float = 10.0) -> None:
        self._splitter = JsonStreamSplitter(max_message=64 * 1024 * 1024)
        self._pending: list[dict[str, Any]] = []
        try:
            if target.kind == "unix":
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                self._sock.settimeout(timeout)
                self._sock.connect(target.path)
            else:
                self._sock = socket.create_connection((target.host, target.port), timeout=timeout)
        except OSError as exc:
            detail = exc.strerror or str(exc)
            raise QmpClientError(f"cannot connect to {target}: {detail}") from None
        self.events: list[dict[str, Any]] = []
        self.greeting = self._receive()
        if "QMP" not in self.greeting:
            raise QmpClientError(f"{target} did not greet with QMP: {self.greeting!r}")

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> QmpConnection:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _receive(self) -> dict[str, Any]:
        while not self._pending:
            self._fill()
        return self._pending.pop(0)

    def _fill(self) -> None:
        """Read once from the socket and queue every whole message that arrived."""
        try:
            data = self._sock.recv(65536)
        except OSError as exc:
            raise QmpClientError(f"monitor connection failed: {exc.strerror or exc}") from None
        if not data:
            raise QmpClientError("the monitor closed the connection")
        for item in self._splitter.feed(data):
            if not isinstance(item, bytes):
                raise QmpClientError(f"unreadable reply from the monitor: {item.desc}")
            try:
                message = json.loads(item)
            except ValueError as exc:
                raise QmpClientError(f"unreadable reply from the monitor: {exc}") from None
            if not isinstance(message, dict):
                raise QmpClientError(f"unexpected message from the monitor: {message!r}")
            self._pending.append(message)

    def next_event(self, timeout: float | None) -> dict[str, Any] | None:
        """The next event (one seen during :meth:`execute` first), waiting up to
        ``timeout`` seconds (None: for ever); None if none arrived in time. A closed
        monitor raises :class:`QmpClientError`."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self.events:
                return self.events.pop(0)
            while self._pending:
                message = self._pending.pop(0)
                if "event" in message:
                    return message  # a reply with no command waiting for it is dropped
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                return None
            try:
                ready, _, _ = select.select([self._sock], [], [], wait)
            except OSError as exc:
                raise QmpClientError(f"monitor connection failed: {exc.strerror or exc}") from None
            if ready:
                self._fill()

    def execute(self, command: str, arguments: dict[str, Any] | None = None) -> dict[str, Any]:
        """Send one command and return its reply message (events seen meanwhile are kept)."""
        request: dict[str, Any] = {"execute": command, "id": _REQUEST_ID}
        if arguments:
            request["arguments"] = arguments
        try:
            self._sock.sendall(encode_message(request))
        except OSError as exc:
            raise QmpClientError(f"cannot send to the monitor: {exc.strerror or exc}") from None
        while True:
            message = self._receive()
            if "event" in message:
                self.events.append(message)
                continue
            if message.get("id") == _REQUEST_ID or "id" not in message:
                message.pop("id", None)
                return message


def main(argv: Sequence[str] | None = None, prog: str = "hv-qmp") -> int:
    """The ``hv-qmp`` script, and ``hv qmp`` (``prog`` names the spelling the user typed,
    in the usage text and on every error line)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run one QMP command against an hv (or QEMU/StratoVirt) monitor and print the reply.",
    )
    parser.add_argument("socket", help="unix socket path, unix:PATH, or tcp:HOST:PORT")
    parser.add_argument("command", nargs="?", help="QMP command name, e.g. query-status")
    parser.add_argument("arguments", nargs="*", metavar="key=value",
                        help="command argument; value parsed as JSON when it parses, else a string")
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds to wait (default 10)")
    parser.add_argument("--pretty", action="store_true", help="indent the printed reply")
    parser.add_argument("--events", "--watch", action="store_true",
                        help="then follow events, one JSON line each, until Ctrl-C or the monitor hangs up")
    try:
        options = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help exits 0, usage errors exit 2
        return EXIT_OK if exc.code in (0, None) else EXIT_FAILURE
    try:
        if options.command is None and not options.events:
            raise _UsageError("a COMMAND (or --events) is required")
        target = parse_target(options.socket)
        arguments = parse_arguments(options.arguments)
    except (QmpAddressError, _UsageError) as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    if options.timeout <= 0:
        print(f"{prog}: --timeout must be positive", file=sys.stderr)
        return EXIT_FAILURE
    try:
        with QmpConnection(target, timeout=options.timeout) as connection:
            connection.execute("qmp_capabilities")
            if options.command is None:
                return _follow_events(connection, options.socket, prog, options.pretty)
            reply = connection.execute(options.command, arguments)
            status = _print_reply(reply, options.command, prog, options.pretty)
            if options.events and status == EXIT_OK:
                return _follow_events(connection, options.socket, prog, options.pretty)
            return status
    except QmpClientError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return EXIT_FAILURE


def _print_reply(reply: dict[str, Any], command: str, prog: str, pretty: bool) -> int:
    print(json.dumps(reply, indent=2 if pretty else None), flush=True)
    if "error" in reply:
        error = reply["error"]
        print(f"{prog}: {command} failed: {error.get('class')}: {error.get('desc')}", file=sys.stderr)
        return EXIT_ERROR_REPLY
    return EXIT_OK


def _follow_events(connection: QmpConnection, where: str, prog: str, pretty: bool) -> int:
    """Print every event as it arrives (JSON, one line each unless ``pretty``) until the
    monitor hangs up or Ctrl-C; both are the normal end and exit 0. The line on stderr
    says the subscription is live (events before it were not seen)."""
    print(f"{prog}: following events on {where} (Ctrl-C to stop)", file=sys.stderr, flush=True)
    try:
        while True:
            event = connection.next_event(None)
            if event is not None:
                print(json.dumps(event, indent=2 if pretty else None), flush=True)
    except KeyboardInterrupt:
        return EXIT_OK
    except QmpClientError as exc:
        if str(exc) == "the monitor closed the connection":
            print(f"{prog}: the monitor closed the connection", file=sys.stderr)
            return EXIT_OK
        raise


if __name__ == "__main__":
    sys.exit(main())
