"""What the migration tests share: short socket directories, hv processes running the dirty
guest, ``-incoming`` arguments, the checks of a destination that gave up, and test-written
migration peers (a fake source sending a valid or spoiled stream to a real ``hv -incoming``,
a fake destination validating a real source's stream), with the points a source can stall at."""
from __future__ import annotations

import functools
import os
import socket
import tempfile
from typing import Callable, Iterator

import pytest

from hv_backends import backend_class
from hv.config import parse_args
from hv.console import BufferSink
from hv.machine import Machine
from hv.migration.engine import write_machine_state
from hv.migration.stream import (
    RAM_RUN,
    SECTION_HEADER,
    EndSection,
    Fingerprint,
    Reply,
    SectionType,
    SocketChannel,
    StreamKind,
    StreamReader,
    StreamWriter,
    read_reply,
)
from tests.helpers import FIXTURES, Vm

KERNEL = str(FIXTURES / "x86_64" / "dirty.elf")
ERROR_PREFIX = "hv: error: incoming migration failed: "
CANCELED_LINE = "hv: error: incoming migration canceled by the source"


@pytest.fixture
def sock_dir() -> Iterator[str]:
    """A short directory for the QMP and migration sockets (pytest's tmp_path can exceed the
    107 bytes of an AF_UNIX path)."""
    with tempfile.TemporaryDirectory(prefix="hvm") as path:  # short: AF_UNIX paths are bounded
        yield path


@pytest.fixture
def vms(hv, sock_dir) -> Iterator[Callable[..., Vm]]:
    """Starts q35 hv processes running the dirty guest (``mib`` MiB dirtied per pass),
    QMP sockets in ``sock_dir``; every one is closed and reaped at teardown."""
    started: list[Vm] = []

    def make(name: str, *extra: str, accel: str = "unicorn", memory: str = "64", mib: int = 1) -> Vm:
        vm = Vm(hv, sock_dir, name, "-machine", "q35", "-accel", accel, "-m", memory,
                "-kernel", KERNEL, "-append", f"mib={mib}", *extra)
        started.append(vm)
        return vm

    yield make
    for vm in started:
        vm.close()


def incoming(sock_dir: str, name: str, transport: str = "unix") -> tuple[str, str]:
    """('-incoming', URI) arguments for a destination named ``name``."""
    if transport == "tcp":
        return "-incoming", "tcp:127.0.0.1:0"
    return "-incoming", f"unix:{os.path.join(sock_dir, name + '.mig')}"


def assert_destination_gave_up(dst: Vm, fragment: str = "", *, canceled: bool = False) -> str:
    """Exited non-zero with one error line, never ran the guest, left no socket file.
    ``canceled``: the line says the source canceled (it sent CANCEL)."""
    code = dst.process.wait(30)
    assert code not in (0, None), code
    stderr = dst.stderr()
    assert "Traceback" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    if canceled:
        assert last == CANCELED_LINE, stderr
    else:
        assert last.startswith(ERROR_PREFIX) and len(last) > len(ERROR_PREFIX), stderr
    assert fragment in last, (fragment, last)
    assert dst.output() == "", "the destination ran the guest"
    assert not os.path.exists(dst.qmp_path), "QMP socket file left behind"
    for arg in dst.process.proc.args:
        if isinstance(arg, str) and arg.startswith("unix:") and arg.endswith(".mig"):
            assert not os.path.exists(arg[5:]), "migration socket file left behind"
    return last


SMALL = ("-m", "64")


@functools.cache
def _small_config():
    return parse_args(["-machine", "q35", "-m", "64", "-kernel", KERNEL, "-append", "mib=4"]).config


class FakeSource:
    """A test-written source: a real socket to a real ``hv -incoming``, StreamWriter framing,
    and the state of an in-process (never started) machine with the dirty guest loaded."""

    def __init__(self, dst: Vm) -> None:
        uri = dst.incoming_address()
        assert uri.startswith("unix:")
        self.sock = socket.socket(socket.AF_UNIX)
        self.sock.settimeout(30)
        self.sock.connect(uri[5:])
        self.channel = SocketChannel(self.sock)
        self.writer = StreamWriter(self.channel)
        config = _small_config()
        self.machine = Machine(config, backend_class("unicorn")(), BufferSink())
        self.machine.load_kernel(config.kernel.read_bytes())

    @property
    def page_count(self) -> int:
        return self.machine.memory.page_count

    def prefix(self, pages: int = 64) -> None:
        """HEADER, CONFIG and the first ``pages`` pages of RAM: all valid."""
        self.writer.write_header("x86_64", "q35")
        self.writer.write_config(Fingerprint.from_dict(self.machine.fingerprint()))
        self.writer.write_ram(0, self.machine.memory.page_view(0, pages))

    def complete(self) -> None:
        """Everything a destination needs, up to END."""
        self.prefix()
        rest = self.page_count - 64
        self.writer.write_ram(64, self.machine.memory.page_view(64, rest), stable=True)
        self.writer.write_round_end(1)
        write_machine_state(self.writer, self.machine.save())
        self.writer.write_end()

    def raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> Reply:
        return read_reply(self.channel)

    def finish_sending(self) -> None:
        self.sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        self.machine.close()


@pytest.fixture
def fake_source() -> Iterator[Callable[[Vm], FakeSource]]:
    made: list[FakeSource] = []

    def make(dst: Vm) -> FakeSource:
        made.append(FakeSource(dst))
        return made[-1]

    yield make
    for fake in made:
        fake.close()


class FakeDestination:
    """A test-written destination: a real listening socket, StreamReader validation of the
    whole stream (RAM read and checked, not applied), then a scripted switch-over."""

    def __init__(self, sock_dir: str, page_count: int) -> None:
        self.path = os.path.join(sock_dir, "fake.mig")
        self.page_count = page_count
        self.listener = socket.socket(socket.AF_UNIX)
        self.listener.bind(self.path)
        self.listener.listen(1)
        self.listener.settimeout(30)
        self.conn: socket.socket | None = None

    @property
    def uri(self) -> str:
        return f"unix:{self.path}"

    def receive(self) -> SocketChannel:
        """Accept the source and read its stream up to END; the back channel."""
        self.conn, _ = self.listener.accept()
        self.conn.settimeout(30)
        channel = SocketChannel(self.conn)
        reader = StreamReader(channel, page_count=self.page_count, kind=StreamKind.MIGRATION)
        while not isinstance(reader.read_section(), EndSection):
            pass
        return channel

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
        self.listener.close()
        os.unlink(self.path)


STALLS = ["connected", "mid-section", "waiting-for-commit"]


def stall_source(fake: FakeSource, where: str) -> None:
    """Make the fake source stop sending ``where``: right after connecting, inside a RAM
    section, or complete and waiting for the destination's commit."""
    if where == "mid-section":
        fake.prefix()
        fake.raw(fake_source_partial_ram())
    elif where == "waiting-for-commit":
        fake.complete()
        assert fake.reply() == Reply(True, "ready")


def fake_source_partial_ram() -> bytes:
    """The first half of a valid RAM section header + run: the stream stops inside it."""
    payload = RAM_RUN.pack(64, 4, 0) + b"\x01" * 4 + b"\x5a" * 4096
    return SECTION_HEADER.pack(SectionType.RAM, 0, 0, len(payload) + 3 * 4096) + payload
