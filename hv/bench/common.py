"""What both benchmarks share: sizes, the KVM probe, a QMP client and a guest process."""
from __future__ import annotations

import argparse
import re
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from hv.errors import HvError
from hv.qmp.address import SocketSpec
from hv.qmp.client import QmpClientError, QmpConnection
from hv_backends.base import Arch
from hv_backends.kvm import KvmBackend


class BenchError(HvError, RuntimeError):
    """A benchmark run could not be carried out; the message says which and why."""


# -- small parts -----------------------------------------------------------------------------------
def parse_size(text: str) -> int:
    """'256M', '1G', '512' (MiB) -> MiB."""
    match = re.fullmatch(r"\s*(\d+)\s*([MmGg]?)(?:i?[Bb])?\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (examples: 256M, 1G)")
    value = int(match.group(1)) * (1024 if match.group(2).lower() == "g" else 1)
    if not 16 <= value <= 64 * 1024:
        raise argparse.ArgumentTypeError(f"size {text!r} out of range (16M .. 64G)")
    return value


def size_text(mib: int) -> str:
    return f"{mib // 1024}G" if mib % 1024 == 0 else f"{mib}M"


def kvm_usable() -> bool:
    """The launcher's own probe: /dev/kvm opens, speaks API 12 and has what hv needs."""
    return KvmBackend.probe(Arch.X86_64) is None


class Qmp:
    """A QMP client over a UNIX socket for hv and QEMU alike: hv's own client
    (:class:`hv.qmp.client.QmpConnection`) plus what a benchmark needs — waiting until the
    process has created its socket, the capabilities negotiation QEMU requires, keyword
    arguments, and an error reply raised as :class:`BenchError`."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._connection = QmpConnection(SocketSpec(kind="unix", path=path), timeout=timeout)
                break
            except QmpClientError as exc:
                if time.monotonic() > deadline:
                    raise BenchError(f"QMP socket {path} never accepted a connection: {exc}") from None
                time.sleep(0.05)
        self.execute("qmp_capabilities")

    def execute(self, command: str, **arguments: Any) -> Any:
        try:
            reply = self._connection.execute(command, arguments or None)
        except QmpClientError as exc:
            raise BenchError(f"{command}: {exc}") from None
        if "error" in reply:
            raise BenchError(f"{command}: {reply['error'].get('desc', reply['error'])}")
        return reply.get("return")

    def close(self) -> None:
        self._connection.close()


class VmProcess:
    """One hv or QEMU process: serial output and stderr in files, always reaped by close()."""

    def __init__(self, name: str, argv: list[str], workdir: Path, serial: Path) -> None:
        self.name = name
        self.serial = serial
        self.stderr_path = workdir / f"{name}.stderr"
        self.qmp: Qmp | None = None
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=stderr)

    def stderr(self) -> str:
        try:
            return self.stderr_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def output(self) -> str:
        try:
            return self.serial.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise BenchError(f"{self.name} exited with {self.proc.returncode}: {self.stderr()[-600:].strip()}")

    def wait_output(self, needle: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output():
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {needle!r} on the serial port after {timeout:.0f} s")
            time.sleep(0.02)

    def wait_stderr(self, pattern: str, timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.stderr())
            if match:
                return match
            self.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{self.name}: no {pattern!r} in its log after {timeout:.0f} s")
            time.sleep(0.02)

    def connect_qmp(self, path: str) -> Qmp:
        self.qmp = Qmp(path)
        return self.qmp

    def close(self) -> None:
        if self.qmp is not None:
            self.qmp.close()
            self.qmp = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
