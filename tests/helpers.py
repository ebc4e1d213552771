"""Shared test helpers: KVM availability, fixture paths, launching hv processes."""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import json
import re
import shutil
import socket
import signal
import subprocess
import sys
import tempfile
import threading
import time
import os
from pathlib import Path
from typing import Any, Callable, TypeVar

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
KVM_GET_API_VERSION = 0xAE00
_F = TypeVar("_F", bound=Callable[..., Any])


@functools.cache
def kvm_unusable_reason() -> str | None:
    """None when /dev/kvm can be opened and speaks API 12, else why not."""
    if os.uname().machine != "x86_64":
        return f"/dev/kvm is not usable: hv's KVM backend needs an x86_64 host (this is {os.uname().machine})"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm is not usable: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"/dev/kvm is not usable: KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return f"/dev/kvm is not usable: API version {version}, expected 12"
    return None


requires_kvm = pytest.mark.skipif(kvm_unusable_reason() is not None, reason=str(kvm_unusable_reason()))

# Backends usable for x86_64 guests on this host, for parametrising.
X86_BACKENDS = [
    pytest.param("kvm", marks=requires_kvm, id="kvm"),
    pytest.param("unicorn", id="unicorn"),
]
# (machine, arch, accelerator) for every guest architecture each backend can run here.
GUESTS = [
    pytest.param("q35", "x86_64", "kvm", marks=requires_kvm, id="x86_64-kvm"),
    pytest.param("q35", "x86_64", "unicorn", id="x86_64-unicorn"),
    pytest.param("virt", "aarch64", "unicorn", id="aarch64-unicorn"),
]


MASK = (1 << 64) - 1


def value(p: int, i: int) -> int:
    """The word the fixture guests (dirty, smp, blk) write at index ``i`` in pass ``p``:
    fixtures/common's splitmix-style mix, computed independently in Python."""
    x = (i * 0x9E3779B97F4A7C15 + p * 0xD1B54A32D192ED03) & MASK
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 29
    return x


@functools.cache
def dirty_reference(mib: int, iterations: int) -> tuple[str, ...]:
    """What fixtures/common/dirty.c prints, computed independently in Python."""
    words = mib * 1024 * 1024 // 8
    lines = [f"dirty: mib={mib} iterations={iterations}"]

    total = 0
    for p in range(1, iterations + 1):
        for i in range(words):
            total = ((((total << 7) | (total >> 57)) & MASK) + value(p, i)) & MASK
        lines.append(f"pass {p} sum {total:016x} bad 0")
    lines.append("done")
    return tuple(lines)


def hv_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "hv", *args]


class HvProcess:
    """An ``hv`` process started exactly as a user would, always reaped.

    Serial output goes to a file (``-serial file,path=...``) so tests can poll it while
    the process runs; stderr is captured to a file as well.
    """

    def __init__(self, tmp: Path, *args: str, name: str = "hv", typed: bool = False) -> None:
        """``typed``: ``-serial stdio`` with stdin a pipe, so the test can type on the
        guest's serial input (:meth:`type`); the output still goes to the serial file."""
        self.serial = tmp / f"{name}.serial"
        self.stderr_path = tmp / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        if typed:
            with open(self.serial, "wb") as out:
                self.proc = subprocess.Popen(hv_command(*args, "-serial", "stdio"), cwd=ROOT,
                                             stdin=subprocess.PIPE, stdout=out, stderr=self._stderr)
        else:
            self.proc = subprocess.Popen(hv_command(*args, "-serial", f"file,path={self.serial}"),
                                         cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self._stderr)

    def type(self, data: bytes) -> None:
        """Write ``data`` to the guest's serial input (only for a ``typed`` process)."""
        assert self.proc.stdin is not None, "started without typed=True"
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def output(self) -> str:
        try:
            return self.serial.read_text()
        except FileNotFoundError:
            return ""

    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def wait_output(self, needle: str, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.output()
            if needle in text:
                return text
            if self.proc.poll() is not None:
                text = self.output()
                if needle in text:
                    return text
                raise AssertionError(f"hv exited {self.proc.returncode} before printing {needle!r}: "
                                     f"output {text[-500:]!r}, stderr {self.stderr()[-1000:]!r}")
            time.sleep(0.02)
        raise AssertionError(f"timed out waiting for {needle!r}: output {self.output()[-500:]!r}")

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        self._stderr.close()


class RawQmp:
    """Exactly what `ncat -U` sends: JSON lines, no negotiation."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.sock = socket.socket(socket.AF_UNIX)
                self.sock.settimeout(timeout)
                self.sock.connect(path)
                break
            except OSError:
                self.sock.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.buffer = b""
        self.events: list[dict] = []
        self.greeting = self._read()

    def _read(self) -> dict:
        while b"\r\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("monitor closed")
            self.buffer += chunk
        line, self.buffer = self.buffer.split(b"\r\n", 1)
        return json.loads(line)

    def execute(self, command: str, **arguments) -> dict:
        message = {"execute": command, **({"arguments": arguments} if arguments else {})}
        self.sock.sendall(json.dumps(message).encode() + b"\r\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
            else:
                return reply

    def wait_event(self, name: str, timeout: float = 30.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event["event"] == name:
                    self.events.remove(event)
                    return event
            assert time.monotonic() < deadline, f"no {name} event"
            self.events.append(self._read())

    def close(self) -> None:
        self.sock.close()


class Vm:
    """An hv process with its QMP socket (raw, ncat-style) for migration tests."""

    def __init__(self, start, sock_dir: str, name: str, *args: str) -> None:
        self.name = name
        self.qmp_path = os.path.join(sock_dir, f"{name}.qmp")
        self.process: HvProcess = start(*args, "-qmp", f"unix:{self.qmp_path},server,nowait", name=name)
        self._qmp: RawQmp | None = None

    @property
    def qmp(self) -> RawQmp:
        if self._qmp is None:
            self._qmp = RawQmp(self.qmp_path)
        return self._qmp

    def execute(self, command: str, **arguments) -> dict:
        return self.qmp.execute(command, **arguments)

    def output(self) -> str:
        return self.process.output()

    def stderr(self) -> str:
        return self.process.stderr()

    def incoming_address(self, timeout: float = 30.0) -> str:
        """The URI the destination listens on (real port for tcp:HOST:0), from its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"waiting for an incoming migration on (\S+)", self.stderr())
            if match:
                return match.group(1)
            if self.process.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited: {self.stderr()[-1000:]}")
            time.sleep(0.02)
        raise AssertionError(f"{self.name} never listened: {self.stderr()[-1000:]}")

    def wait_migration(self, states=("completed", "failed", "canceled"), timeout: float = 120.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.execute("query-migrate")["return"]
            if reply.get("status") in states:
                return reply
            assert time.monotonic() < deadline, f"{self.name}: migration stuck in {reply}"
            time.sleep(0.02)

    def wait_lines(self, count: int, timeout: float = 120.0) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.output()
            if text.count("\n") >= count:
                return text
            assert self.process.proc.poll() is None or text.count("\n") >= count, \
                f"{self.name} exited: {self.stderr()[-1000:]}"
            assert time.monotonic() < deadline, f"{self.name}: only {text.count(chr(10))} lines"
            time.sleep(0.02)

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        self.process.close()


def complete_lines(text: str) -> list[str]:
    return text[:text.rindex("\n")].splitlines() if "\n" in text else []


BLK_PASS = re.compile(r"blk pass (\d+) sum [0-9a-f]{16} bad (\d+)")


def blk_passes(text: str) -> list[re.Match[str]]:
    """The complete ``blk pass`` lines of ``text``."""
    return [m for line in complete_lines(text) if (m := BLK_PASS.fullmatch(line))]


def wait_blk_passes(vm: Vm, earlier: str, count: int, timeout: float = 120.0) -> None:
    """Wait (bounded) until ``earlier`` + ``vm``'s output holds ``count`` pass lines."""
    deadline = time.monotonic() + timeout
    while len(blk_passes(earlier + vm.output())) < count:
        assert vm.process.proc.poll() is None, f"{vm.name} exited: {vm.stderr()[-1000:]}"
        assert time.monotonic() < deadline, f"{vm.name}: {len(blk_passes(earlier + vm.output()))} passes"
        time.sleep(0.02)


def machine_in_process(machine_type: str, accel: str, kernel: Path, append: str,
                       *options: str, memory: str = "64") -> tuple[Any, Any]:
    """A Machine (not started) of ``machine_type`` on ``accel`` in this process with ``kernel``
    loaded, and the BufferSink its serial console writes to; ``options``: more command-line
    options (``-smp 2``)."""
    from hv_backends import backend_class
    from hv.config import parse_args
    from hv.console import BufferSink
    from hv.machine import Machine

    config = parse_args(["-machine", machine_type, "-m", memory, *options, "-kernel", str(kernel),
                         "-append", append]).config
    console = BufferSink()
    machine = Machine(config, backend_class(accel)(), console)
    machine.load_kernel(config.kernel.read_bytes())
    return machine, console


def receive_in_thread(target: Any, sock: socket.socket, status: Any, *, close: bool = False,
                      **options: Any) -> tuple[threading.Thread, list[BaseException]]:
    """Receive a migration into the in-process machine ``target`` from ``sock`` on a
    started thread; whatever the receive raised is appended to the returned list, for
    the test thread to check after joining. ``options`` go to ``receive_migration``
    (``stall_timeout``, ``listener``, ``channels``); ``close``: close ``sock`` when the
    receive ends, as ``hv -incoming`` does."""
    from hv.migration.incoming import receive_migration

    errors: list[BaseException] = []

    def receive() -> None:
        try:
            receive_migration(target, sock, status, **options)
        except BaseException as exc:  # noqa: BLE001 - reported by the test thread
            errors.append(exc)
        finally:
            if close:
                sock.close()

    thread = threading.Thread(target=receive, name="test-incoming")
    thread.start()
    return thread, errors


def migration_status_for(machine: Any) -> Any:
    """A fresh MigrationStatus in setup for ``machine``'s RAM, as the engine starts one."""
    from hv.migration.status import MigrationStatus

    status = MigrationStatus()
    status.start(machine.memory.size)
    return status


def migrate_in_process(source: Any, target: Any) -> tuple[Any, list[BaseException]]:
    """Live-migrate ``source`` into ``target`` over a real socket pair, both ends in this
    process (the engine's own threads); the source's status and what the destination
    raised."""
    from hv.migration.engine import MigrationParameters, OutgoingMigration

    out_sock, in_sock = socket.socketpair()
    status = migration_status_for(source)
    receiver, errors = receive_in_thread(target, in_sock, migration_status_for(target))
    try:
        outgoing = OutgoingMigration(source, status, MigrationParameters(), out_sock, lambda *_args: None)
        outgoing.start()
        outgoing.thread.join(timeout=180)
        receiver.join(timeout=180)
        assert not outgoing.thread.is_alive() and not receiver.is_alive()
    finally:
        out_sock.close()
        in_sock.close()
    return status, errors


def copy_dirty_pages(bitmap: bytes, source: memoryview, target: bytearray) -> int:
    """A pre-copy round by hand: copy every page whose bit is set in ``bitmap`` from
    ``source`` (guest RAM) to ``target``; the number of pages copied."""
    from hv.memory import PAGE_SIZE

    copied = 0
    for byte_index, byte in enumerate(bitmap):
        if not byte:
            continue
        for bit in range(8):
            if byte >> bit & 1:
                offset = (byte_index * 8 + bit) * PAGE_SIZE
                target[offset:offset + PAGE_SIZE] = source[offset:offset + PAGE_SIZE]
                copied += 1
    return copied


def stale_pages(copy: bytearray, ram: memoryview) -> list[int]:
    """Indexes of the pages where a pre-copied ``copy`` differs from guest ``ram``."""
    from hv.memory import PAGE_SIZE

    return [i for i in range(len(copy) // PAGE_SIZE)
            if copy[i * PAGE_SIZE:(i + 1) * PAGE_SIZE] != ram[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]]


def wait_console_lines(console: Any, count: int, timeout: float = 120.0) -> None:
    """Wait, bounded by ``timeout``, until an in-process console has ``count`` lines."""
    deadline = time.monotonic() + timeout
    while console.getvalue().count(b"\n") < count:
        assert time.monotonic() < deadline, console.getvalue()[-300:]
        time.sleep(0.002)


@functools.cache
def reference_output(machine: str, mib: int, passes: int) -> tuple[str, ...]:
    """What an unmigrated dirty guest prints for ``passes`` passes (lines, without 'done'),
    run in-process on the fastest backend here."""
    from hv_backends import backend_class
    from hv.config import parse_args
    from hv.console import BufferSink
    from hv.machine import Machine

    arch = "x86_64" if machine == "q35" else "aarch64"
    accel = "kvm" if arch == "x86_64" and kvm_unusable_reason() is None else "unicorn"
    config = parse_args(["-machine", machine, "-m", "128", "-kernel", str(FIXTURES / arch / "dirty.elf"),
                         "-append", f"mib={mib} iterations={passes}"]).config
    console = BufferSink()
    vm = Machine(config, backend_class(accel)(), console)
    try:
        vm.load_kernel(config.kernel.read_bytes())
        vm.start()
        assert vm.wait_shutdown(600) == "guest-shutdown"
    finally:
        vm.close()
    lines = console.getvalue().decode().splitlines()
    assert lines[-1] == "done"
    return tuple(lines[1:-1])


def check_dirty_output(machine: str, mib: int, text: str) -> int:
    """Assert ``text`` (possibly several VMs' serial output joined) is exactly what an
    unmigrated run prints; returns the number of passes checked."""
    lines = complete_lines(text)
    assert lines and lines[0] == f"dirty: mib={mib} iterations=0", lines[:1]
    passes = lines[1:]
    assert passes, "no pass completed"
    assert tuple(passes) == reference_output(machine, mib, len(passes))
    return len(passes)


# -- external tools ---------------------------------------------------------------------------
# Every program a test runs besides Python, with the Debian command that installs it. A tool
# is "optional" when the README's install command does not bring it: such tests carry the
# `optional_tool` marker, and CI (ci/test.sh) runs the suite once with them hidden from PATH.

@dataclasses.dataclass(frozen=True)
class Tool:
    install: str        # always "apt-get install <Debian package>"
    optional: bool


_BINUTILS = Tool("apt-get install binutils", False)            # gcc depends on it
_A64_BINUTILS = Tool("apt-get install binutils-aarch64-linux-gnu", True)
_ACPICA = Tool("apt-get install acpica-tools", True)
TOOLS: dict[str, Tool] = {
    "qemu-system-x86_64": Tool("apt-get install qemu-system-x86", True),
    "qemu-system-aarch64": Tool("apt-get install qemu-system-arm", True),
    "dtc": Tool("apt-get install device-tree-compiler", True),
    "ncat": Tool("apt-get install ncat", True),
    "aarch64-linux-gnu-as": _A64_BINUTILS,
    "aarch64-linux-gnu-ld": _A64_BINUTILS,
    "aarch64-linux-gnu-objcopy": _A64_BINUTILS,
    "aarch64-linux-gnu-gcc": Tool("apt-get install gcc-aarch64-linux-gnu", True),
    "iasl": _ACPICA,
    "acpidump": _ACPICA,
    "gcc": Tool("apt-get install gcc", False),
    "as": _BINUTILS,
    "ld": _BINUTILS,
    "objcopy": _BINUTILS,
    "objdump": _BINUTILS,
    "dd": Tool("apt-get install coreutils", False),
    "ip": Tool("apt-get install iproute2", False),                 # tap tests, as root only
    "setpriv": Tool("apt-get install util-linux", False),
}


def missing_tool_reason(*tools: str) -> str | None:
    """None when every tool is on PATH, else the skip reason naming the missing ones and the
    command that installs them. A tool missing from TOOLS is a KeyError on purpose: every
    skip must say how to stop skipping."""
    unknown = [tool for tool in tools if tool not in TOOLS]
    if unknown:
        raise KeyError(f"add {', '.join(unknown)} and its install command to tests.helpers.TOOLS")
    missing = [tool for tool in tools if shutil.which(tool) is None]
    if not missing:
        return None
    packages = dict.fromkeys(TOOLS[tool].install.removeprefix("apt-get install ") for tool in missing)
    return f"{', '.join(missing)} not installed (apt-get install {' '.join(packages)})"


def tool_marks(*tools: str) -> list[pytest.MarkDecorator]:
    """The marks of a test that runs ``tools``: skip (with the install command) when one is
    missing, and ``optional_tool`` when one of them is not brought by the README's install."""
    reason = missing_tool_reason(*tools)
    marks = [pytest.mark.skipif(reason is not None, reason=reason or "")]
    if any(TOOLS[tool].optional for tool in tools):
        marks.append(pytest.mark.optional_tool)
    return marks


def require_tool(*tools: str) -> Callable[[_F], _F]:
    """Decorator form of ``tool_marks``: ``@require_tool("dtc")``."""
    def apply(test: _F) -> _F:
        for mark in tool_marks(*tools):
            test = mark(test)
        return test
    return apply


def may_use_tool(*tools: str) -> pytest.MarkDecorator:
    """The mark of a test that runs without ``tools`` but checks more where they exist
    (e.g. adds QEMU's rows): ``optional_tool`` only, no skip."""
    missing_tool_reason(*tools)                                     # validates the names
    assert any(TOOLS[tool].optional for tool in tools), tools
    return pytest.mark.optional_tool


def skip_unless_tool(*tools: str) -> None:
    """The same skip at run time, for helpers called by tests that carry ``tool_marks``."""
    reason = missing_tool_reason(*tools)
    if reason is not None:
        pytest.skip(reason)


# -- aarch64 test snippets: assembled once with GNU as, committed ------------------------------
# The default suite must not need a cross toolchain, so the bytes of every aarch64 snippet the
# tests run are committed beside their source text in A64_SNIPPETS;
# tests/backends/test_unicorn_arm64.py::test_committed_a64_snippets_match_gnu_as reassembles them
# where aarch64-linux-gnu-as exists. A new or edited snippet is recorded by running its tests
# once with HV_A64_RECORD=1 and binutils-aarch64-linux-gnu installed.

A64_SNIPPETS = ROOT / "tests" / "data" / "a64_snippets.json"
A64_RECORD_COMMAND = ("HV_A64_RECORD=1 python -m pytest -p no:xdist tests/backends/test_unicorn_arm64.py "
                      "tests/machine/test_virt_pci_irq.py (with binutils-aarch64-linux-gnu installed)")


def gnu_assemble_a64(source: str, base: int) -> bytes:
    """``source`` assembled by GNU as and linked at ``base``, as a flat binary."""
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "g.s").write_text(".text\n" + source + "\n")
        for command in (["aarch64-linux-gnu-as", "-o", f"{tmp}/g.o", f"{tmp}/g.s"],
                        ["aarch64-linux-gnu-ld", "-Ttext", hex(base), "-o", f"{tmp}/g.elf", f"{tmp}/g.o"],
                        ["aarch64-linux-gnu-objcopy", "-O", "binary", f"{tmp}/g.elf", f"{tmp}/g.bin"]):
            subprocess.run(command, check=True, capture_output=True, timeout=60)
        return Path(tmp, "g.bin").read_bytes()


@dataclasses.dataclass(frozen=True)
class A64Snippet:
    base: int
    source: str
    code: bytes


def load_a64_snippets() -> list[A64Snippet]:
    """The committed snippets, in file order."""
    raw = json.loads(A64_SNIPPETS.read_text())
    return [A64Snippet(int(e["base"], 16), e["source"], bytes.fromhex(e["code"])) for e in raw["snippets"]]


@functools.cache
def _a64_index() -> dict[tuple[int, str], bytes]:
    return {(s.base, s.source): s.code for s in load_a64_snippets()}


def _record_a64(snippet: A64Snippet) -> None:
    """Add ``snippet`` to the committed file (locked: xdist workers may record at once)."""
    with open(A64_SNIPPETS, "r+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        entries = json.loads(f.read())["snippets"]
        if not any(int(e["base"], 16) == snippet.base and e["source"] == snippet.source for e in entries):
            entries.append({"base": hex(snippet.base), "source": snippet.source, "code": snippet.code.hex()})
        entries.sort(key=lambda e: (int(e["base"], 16), e["source"]))
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"assembler": "GNU as (binutils-aarch64-linux-gnu), ld -Ttext base, objcopy -O binary",
                            "snippets": entries}, indent=1) + "\n")


def assemble_a64(source: str, base: int) -> bytes:
    """The committed bytes of ``source`` linked at ``base`` (see A64_SNIPPETS)."""
    code = _a64_index().get((base, source))
    if code is not None:
        return code
    if os.environ.get("HV_A64_RECORD") == "1":
        code = gnu_assemble_a64(source, base)
        _record_a64(A64Snippet(base, source, code))
        return code
    raise AssertionError(f"this aarch64 snippet (at {base:#x}) is not in {A64_SNIPPETS.relative_to(ROOT)}: "
                         f"record it with {A64_RECORD_COMMAND}")
