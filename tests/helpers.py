"""Shared test helpers: KVM availability, fixture paths, launching hv processes."""
from __future__ import annotations

import fcntl
import functools
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
