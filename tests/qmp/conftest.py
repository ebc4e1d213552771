"""What the QMP tests share: an in-process QMP server on real sockets with a command table
made for testing (``harness``), a short socket directory, and a raw client that speaks
exactly what ``ncat -U`` would."""
from __future__ import annotations

import json
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from hv.qmp import ArgSpec, CommandTable, QmpError, QmpServer, Reply, SocketSpec, version_info
from hv.qmp.protocol import greeting

TIMEOUT = 5.0


@pytest.fixture
def sockdir() -> Iterator[Path]:
    """A short directory for unix sockets (pytest's tmp_path can exceed 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="hvq-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Harness:
    server: QmpServer
    table: CommandTable
    unix_path: str
    after_calls: list[str] = field(default_factory=list)
    active: list[int] = field(default_factory=lambda: [0, 0])  # current, maximum concurrency

    @property
    def tcp(self) -> tuple[str, int]:
        spec = next(a for a in self.server.addresses if a.kind == "tcp")
        return spec.host, spec.port


def build_table(harness_ref: list[Harness]) -> CommandTable:
    table = CommandTable()

    def migrate(args: dict[str, Any]) -> dict[str, Any]:
        return {}

    def fail(_args: dict[str, Any]) -> Any:
        raise QmpError("DeviceNotFound", "Device 'nic9' not found")

    def boom(_args: dict[str, Any]) -> Any:
        raise RuntimeError("kaput")

    def emit(args: dict[str, Any]) -> Any:
        harness_ref[0].server.emit_event("TEST_EVENT", {"n": args.get("n", 0)})
        return {"emitted": True}

    def slow(_args: dict[str, Any]) -> Any:
        active = harness_ref[0].active
        active[0] += 1
        active[1] = max(active[1], active[0])
        time.sleep(0.02)
        active[0] -= 1
        return {}

    def quit_(_args: dict[str, Any]) -> Reply:
        harness = harness_ref[0]

        def after() -> None:
            harness.after_calls.append("quit")
            harness.server.emit_event("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
            harness.server.close()

        return Reply({}, after=after)

    table.register("migrate", migrate, {"uri": ArgSpec("string")}, "Start migrating.")
    table.register("echo", lambda args: args.get("value"), {"value": ArgSpec("any", required=False)})
    table.register("typed", lambda args: args, {"uri": ArgSpec("string"), "count": ArgSpec("int", required=False)})
    table.register("fail", fail)
    table.register("boom", boom)
    table.register("emit", emit, {"n": ArgSpec("int", required=False)})
    table.register("slow", slow)
    table.register("quit", quit_)
    table.register("unencodable", lambda _args: {"x": object()})
    return table


def start_harness(sockdir: Path, tcp_host: str | None = "127.0.0.1", **kwargs: Any) -> Harness:
    ref: list[Harness] = []
    table = build_table(ref)
    unix_path = str(sockdir / "qmp.sock")
    specs = [SocketSpec("unix", path=unix_path)]
    if tcp_host is not None:
        specs.append(SocketSpec("tcp", host=tcp_host, port=0))
    server = QmpServer(specs, table, **kwargs)
    harness = Harness(server, table, unix_path)
    ref.append(harness)
    server.start()
    return harness


@pytest.fixture
def harness(sockdir: Path) -> Iterator[Harness]:
    h = start_harness(sockdir)
    yield h
    h.server.close()


class RawClient:
    """Speaks exactly what ``ncat -U`` would: raw bytes, no negotiation."""

    def __init__(self, address: str | tuple[str, int]) -> None:
        if isinstance(address, str):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        else:
            self.sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(address)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict[str, Any]:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError(f"connection closed; unparsed {self.buf!r}")
            self.buf += chunk
        line, self.buf = self.buf.split(b"\r\n", 1)
        assert b"\n" not in line and b"\r" not in line
        return json.loads(line)

    def command(self, name: str, arguments: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
        message: dict[str, Any] = {"execute": name, **extra}
        if arguments is not None:
            message["arguments"] = arguments
        self.send(json.dumps(message).encode() + b"\r\n")
        return self.recv()

    def at_eof(self) -> bool:
        try:
            return self.sock.recv(1) == b""
        except OSError:
            return True

    def close(self) -> None:
        self.sock.close()


def connect(harness: Harness, via: str = "unix") -> RawClient:
    client = RawClient(harness.unix_path if via == "unix" else harness.tcp)
    assert client.recv() == greeting()
    return client


def wait_for(predicate: Any, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.01)


def expect_works(client: RawClient) -> None:
    assert client.command("query-version", id="next") == {"return": version_info(), "id": "next"}
