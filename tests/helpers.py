"""Shared test helpers: KVM availability, fixture paths, launching hv processes."""
from __future__ import annotations

import fcntl
import functools
import json
import re
import socket
import signal
import subprocess
import sys
import time
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
KVM_GET_API_VERSION = 0xAE00


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


@functools.cache
def dirty_reference(mib: int, iterations: int) -> tuple[str, ...]:
    """What fixtures/common/dirty.c prints, computed independently in Python."""
    words = mib * 1024 * 1024 // 8
    lines = [f"dirty: mib={mib} iterations={iterations}"]

    def value(p: int, i: int) -> int:
        x = (i * 0x9E3779B97F4A7C15 + p * 0xD1B54A32D192ED03) & MASK
        x ^= x >> 31
        x = (x * 0xBF58476D1CE4E5B9) & MASK
        x ^= x >> 29
        return x

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

    def __init__(self, tmp: Path, *args: str, name: str = "hv") -> None:
        self.serial = tmp / f"{name}.serial"
        self.stderr_path = tmp / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        self.proc = subprocess.Popen(hv_command(*args, "-serial", f"file,path={self.serial}"),
                                     cwd=ROOT, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=self._stderr)

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
