"""Fixtures of the end-to-end Linux tests: real Debian kernels and busybox images
(tests/linux_images.py builds them on first use, or the test skips naming the command),
run by real ``hv`` processes on Unicorn exactly as a user types the seed's walkthrough,
with ``-serial stdio`` (stdin is how the tests type into the guest's shell).

Every process is reaped at teardown; paths are under tmp_path, QMP sockets under a short
temporary directory (unix socket paths are limited to 107 bytes), ports ephemeral.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import ROOT, RawQmp, hv_command
from tests.linux_images import LinuxImages, linux_images

SLOW = bool(os.environ.get("HV_SLOW"))
# The seed's kernel command line, per machine; tests only ever append to it.
SEED_APPEND = {"q35": "console=ttyS0 reboot=k panic=1 root=/dev/vda",
               "virt": "console=ttyAMA0 reboot=k panic=1 root=/dev/vda"}
ARCH = {"q35": "x86_64", "virt": "aarch64"}
PASS_RE = re.compile(r"wl: pass (\d+) (ok|BAD)")
BROKEN_RE = re.compile(r"wl: pass \d+ BAD|Kernel panic|Oops|BUG:|segfault|Unable to handle kernel|"
                       r"Internal error|rcu_sched self-detected stall|soft lockup|hv-init: workload exited")


@dataclass
class LinuxVm:
    """One hv process running a Linux guest: console output collected from its stdout by
    a thread, console input written to its stdin, QMP on a unix socket."""

    name: str
    args: list[str]
    qmp_path: str
    stderr_path: Path
    proc: subprocess.Popen = field(init=False)
    _out: bytearray = field(default_factory=bytearray)
    _grew: threading.Condition = field(default_factory=threading.Condition)
    _qmp: RawQmp | None = None
    _collector: threading.Thread | None = None

    def start(self) -> LinuxVm:
        with open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen(hv_command(*self.args), cwd=ROOT, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=err)
        self._collector = threading.Thread(target=self._collect, daemon=True)
        self._collector.start()
        return self

    def _collect(self) -> None:
        assert self.proc.stdout is not None
        while chunk := os.read(self.proc.stdout.fileno(), 65536):
            with self._grew:
                self._out += chunk
                self._grew.notify_all()
        with self._grew:
            self._grew.notify_all()

    def output(self) -> str:
        with self._grew:
            return self._out.decode(errors="replace")

    def final_output(self) -> str:
        """Everything the guest printed, after stopping hv: output() of a live process can
        lag the guest by what is still in the pipe (a source that printed pass N just
        before it paused, under load, once read as ending at N-1)."""
        self.close()
        assert self._collector is not None
        self._collector.join(30)
        assert not self._collector.is_alive(), f"{self.name}: console pipe still open after exit"
        return self.output()

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float, start: int = 0) -> re.Match[str]:
        """The first match of ``pattern`` in the console output from offset ``start``;
        fails with the output's tail on timeout or when hv exits first."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._grew:
            while True:
                text = self._out.decode(errors="replace")
                match = regex.search(text, start)
                if match:
                    return match
                if self.proc.poll() is not None and not self._grew.wait(0.2):
                    raise AssertionError(f"{self.name}: hv exited {self.proc.returncode} before "
                                         f"{pattern!r}; console tail {text[-1500:]!r}; "
                                         f"stderr {self.stderr()[-1500:]!r}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {pattern!r} within {timeout:.0f} s; "
                                         f"console tail {text[-1500:]!r}; stderr {self.stderr()[-800:]!r}")
                self._grew.wait(min(left, 0.5))

    def type(self, text: str) -> None:
        """Type ``text`` on the console (hv's stdin)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def shell(self, command: str, expect: str, timeout: float = 60.0) -> re.Match[str]:
        """Type a command into the guest's shell and wait for ``expect`` after it."""
        start = len(self.output())
        self.type(command + "\n")
        return self.wait_for(expect, timeout, start)

    @property
    def qmp(self) -> RawQmp:
        if self._qmp is None:
            self._qmp = RawQmp(self.qmp_path, timeout=60)
        return self._qmp

    def execute(self, command: str, **arguments: object) -> dict:
        return self.qmp.execute(command, **arguments)

    def incoming_address(self, timeout: float = 60.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = re.search(r"waiting for an incoming migration on (\S+)", self.stderr())
            if match:
                return match.group(1)
            assert self.proc.poll() is None, f"{self.name} exited: {self.stderr()[-1000:]}"
            time.sleep(0.05)
        raise AssertionError(f"{self.name} never listened: {self.stderr()[-1000:]}")

    def wait_migration(self, timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            reply = self.execute("query-migrate")["return"]
            if reply.get("status") in ("completed", "failed", "canceled"):
                return reply
            assert time.monotonic() < deadline, f"{self.name}: migration stuck in {reply}"
            time.sleep(0.05)

    def passes(self) -> list[tuple[int, str]]:
        return [(int(n), verdict) for n, verdict in PASS_RE.findall(self.output())]

    def close(self) -> None:
        if self._qmp is not None:
            self._qmp.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(15)
        if self.proc.stdin is not None:
            try:
                self.proc.stdin.close()
            except BrokenPipeError:
                pass


@dataclass
class LinuxLab:
    """Starts Linux guests for one test; owns their rootfs copies and reaps them."""

    tmp_path: Path
    sock_dir: str
    vms: list[LinuxVm] = field(default_factory=list)

    def images(self, machine: str) -> LinuxImages:
        return linux_images(ARCH[machine])

    def rootfs(self, machine: str, name: str = "rootfs.ext4") -> Path:
        """A private copy of the cached rootfs (the guest writes it; the cache stays clean)."""
        copy = self.tmp_path / f"{machine}-{name}"
        if not copy.exists():
            shutil.copyfile(self.images(machine).rootfs, copy)
        return copy

    def command(self, machine: str, name: str, *, append: str = "", rootfs: Path | None = None,
                extra: tuple[str, ...] = ()) -> list[str]:
        """The seed's walkthrough line for ``machine`` (q35 boots the PVH vmlinux, virt the
        arm64 Image), on Unicorn, plus ``append`` words and ``extra`` arguments."""
        images = self.images(machine)
        kernel = images.vmlinux if machine == "q35" else images.vmlinuz
        assert kernel is not None
        disk = rootfs if rootfs is not None else self.rootfs(machine)
        return ["-machine", machine, "-accel", "unicorn", "-kernel", str(kernel),
                "-append", f"{SEED_APPEND[machine]} {append}".strip(), "-initrd", str(images.initramfs),
                "-drive", f"file={disk},id=rootfs,readonly=off,direct=off",
                "-device", "virtio-blk-pci,drive=rootfs,id=rootfs,bus=pcie.0,addr=0",
                "-qmp", f"unix:{self.sock_dir}/{name}.qmp,server,nowait", "-serial", "stdio", *extra]

    def start(self, name: str, args: list[str]) -> LinuxVm:
        qmp = next(a for a in args if a.startswith("unix:") and a.endswith(".qmp,server,nowait"))
        vm = LinuxVm(name, args, qmp[len("unix:"):-len(",server,nowait")], self.tmp_path / f"{name}.stderr")
        self.vms.append(vm)
        return vm.start()

    def close(self) -> None:
        for vm in self.vms:
            vm.close()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[LinuxLab]:
    sock_dir = tempfile.mkdtemp(prefix="hv-e2e-")
    lab = LinuxLab(tmp_path, sock_dir)
    try:
        yield lab
    finally:
        lab.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


# -- what the e2e test modules share: boot to the workload, check its passes, migrate --------------
BOOT = 300.0          # seconds: kernel + initramfs + rootfs to the "ready" line
PASS = 180.0          # seconds for workload passes
# q35 (x86_64) Linux takes its TSC, APIC-timer and delay-loop calibration from hv's CPUID
# leaves 0x15/0x16 (hv/cpuid.py), so it needs no PIT/HPET/PM-timer reference to boot.
MACHINES = ["virt", "q35"]
READY_RE = r"hv-init: ready: \S+ \S+ root=/dev/vda "
NET_ARGS = ("-device", "virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:12:34:56,addr=2")


def pass_numbers(text: str) -> list[int]:
    """The workload's pass numbers in order; fails on any BAD pass."""
    passes = [(int(n), verdict) for n, verdict in PASS_RE.findall(text)]
    bad = [n for n, verdict in passes if verdict != "ok"]
    assert not bad, f"workload passes {bad} BAD: {text[-2000:]}"
    return [n for n, _ in passes]


def assert_healthy(text: str) -> list[int]:
    """No broken-guest text, and passes 1, 2, 3, ... with no gap or repeat."""
    broken = BROKEN_RE.search(text)
    assert broken is None, f"guest broke: {broken.group(0)!r} in {text[-3000:]!r}"
    numbers = pass_numbers(text)
    assert numbers == list(range(1, len(numbers) + 1)), f"pass numbers not consecutive: {numbers}"
    return numbers


def last_pass(vm: LinuxVm) -> int:
    numbers = pass_numbers(vm.output())
    return numbers[-1] if numbers else 0


def boot(lab: LinuxLab, machine: str, name: str = "vm", *, append: str = "",
         extra: tuple[str, ...] = (), passes: int = 1) -> LinuxVm:
    """Start the walkthrough's line and wait for the rootfs and ``passes`` workload passes."""
    vm = lab.start(name, lab.command(machine, name, append=append, extra=extra))
    vm.wait_for(READY_RE, BOOT)
    if passes:
        vm.wait_for(rf"wl: pass {passes} ok", PASS)
    return vm


def migrate(src: LinuxVm, uri: str) -> dict:
    reply = src.execute("migrate", uri=uri)
    assert "return" in reply, reply
    result = src.wait_migration()
    assert result["status"] == "completed", result
    return result


def incoming(lab: LinuxLab, transport: str, name: str) -> str:
    return "tcp:127.0.0.1:0" if transport == "tcp" else f"unix:{lab.sock_dir}/{name}.mig"
