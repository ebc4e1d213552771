"""What the benchmarks share: sizes, the KVM probe, a QMP client (with event timestamps), a
guest process and where a migration destination listens."""
from __future__ import annotations

import argparse
import importlib.util
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hv.errors import HvError
from hv.memory import GuestMemory, RegionSpec
from hv.migration.pages import mem_available, populate
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


# arch -> (QEMU binary, the Debian package that installs it)
# How a bench starts hv: this Python, with -P so that the current directory is not put in
# front of sys.path (a stray hv/ or hv_backends/ there would be run instead of the install).
HV_COMMAND: tuple[str, ...] = (sys.executable, "-P", "-m", "hv")
QEMU_FOR_ARCH = {"x86_64": ("qemu-system-x86_64", "qemu-system-x86"),
                 "aarch64": ("qemu-system-aarch64", "qemu-system-arm")}


def bytecode_note(environ: Mapping[str, str] = os.environ, source: Path | None = None) -> str | None:
    """A line for tables whose figures include hv's start-up, when every hv process this
    bench starts compiles hv's Python sources anew: ``PYTHONDONTWRITEBYTECODE`` is set
    (children inherit it) and ``source`` (default: ``hv/cli.py``) has no cached bytecode,
    as in an editable install run only under that variable. pip compiles an installed hv
    at install time, so its users do not pay this; here it added 0.3-0.4 s to each start
    (``hello.elf`` on Unicorn: 0.75-0.89 s without cached bytecode, 0.36-0.43 s with)."""
    if not environ.get("PYTHONDONTWRITEBYTECODE"):
        return None
    if source is None:
        source = Path(__file__).resolve().parents[1] / "cli.py"
    if Path(importlib.util.cache_from_source(str(source))).exists():
        return None
    return ("note: PYTHONDONTWRITEBYTECODE is set and hv has no cached bytecode, so every hv start compiled its "
            "Python sources (0.3-0.4 s here; an installed hv does not): run `python -m compileall -q "
            f"{source.parent}` once, or unset the variable, to measure start-up as users meet it")


def find_qemu(arch: str, qemu_dir: Path | None = None) -> str | None:
    """The QEMU binary for ``arch``: in ``qemu_dir`` when given (``--qemu-dir``), else on PATH."""
    binary = QEMU_FOR_ARCH[arch][0]
    if qemu_dir is not None:
        candidate = qemu_dir / binary
        return str(candidate) if os.access(candidate, os.X_OK) and candidate.is_file() else None
    return shutil.which(binary)


def qemu_missing_line(arch: str) -> str:
    """The line a benchmark prints instead of QEMU's rows when QEMU is not installed."""
    binary, package = QEMU_FOR_ARCH[arch]
    return f"{binary} not installed (apt-get install {package}): QEMU rows skipped, hv rows only"


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

    def events(self, name: str) -> list[dict[str, Any]]:
        """The events called ``name`` received so far (a command's reply brings them in:
        call e.g. ``query-status`` to collect what arrived since)."""
        return [event for event in self._connection.events if event.get("event") == name]

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        """The first ``name`` event, polling with ``query-status`` for at most ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            found = self.events(name)
            if found:
                return found[0]
            if time.monotonic() > deadline:
                raise BenchError(f"no {name} event within {timeout:.0f} s")
            self.execute("query-status")
            time.sleep(0.02)

    def close(self) -> None:
        self._connection.close()


def event_time(event: dict[str, Any]) -> float:
    """A QMP event's ``timestamp`` (seconds + microseconds, wall clock) in seconds; both hv
    and QEMU stamp events from the host's wall clock, so stamps of two processes on one
    host can be subtracted."""
    stamp = event.get("timestamp")
    if not isinstance(stamp, dict) or not isinstance(stamp.get("seconds"), int) \
            or not isinstance(stamp.get("microseconds"), int):
        raise BenchError(f"event {str(event.get('event'))[:40]!r} has no usable timestamp")
    return stamp["seconds"] + stamp["microseconds"] / 1e6


def incoming_uri(transport: str, workdir: Path) -> str:
    """The ``-incoming`` URI of a destination: an ephemeral TCP port (each engine says which
    it bound) or a UNIX socket in ``workdir``."""
    if transport == "tcp":
        return "tcp:127.0.0.1:0"
    return f"unix:{workdir / 'mig.sock'}"


def destination_uri(engine: str, transport: str, dst: VmProcess, listen_uri: str,
                    timeout: float = 30.0) -> str:
    """Where the source must connect: the UNIX socket once it exists; for TCP the port hv
    logs on stderr, or QEMU reports in the destination's ``query-migrate``."""
    deadline = time.monotonic() + timeout
    if transport == "unix":
        path = listen_uri[len("unix:"):]
        while not os.path.exists(path):
            dst.check_alive()
            if time.monotonic() > deadline:
                raise BenchError(f"{dst.name} never listened on {path}")
            time.sleep(0.02)
        return listen_uri
    if engine == "hv":
        return dst.wait_stderr(r"waiting for an incoming migration on (\S+)", timeout).group(1)
    if dst.qmp is None:
        raise BenchError(f"{dst.name}: no QMP connection to ask for its port")
    while True:
        for address in dst.qmp.execute("query-migrate").get("socket-address", []):
            if address.get("type") in ("inet", "tcp") and address.get("port"):
                return f"tcp:{address['host']}:{address['port']}"
        dst.check_alive()
        if time.monotonic() > deadline:
            raise BenchError("QEMU destination never reported its listening port")
        time.sleep(0.02)


# -- host memory before a measured run ----------------------------------------------------------------
BACKING_SHARE = 0.5   # never touch more than this share of MemAvailable


def back_host_memory(mib: int) -> float:
    """Touch ``mib`` MiB of fresh memory (huge pages advised, ``MADV_POPULATE_WRITE``) and
    free it again; return the seconds it took. A bench calls it right before starting each
    measured process, hv's and QEMU's alike, so both start on memory the host has backed.

    Why: on a host that is itself a VM with free page reporting (this one: Firecracker,
    ``page_reporting_order=11``), free memory is handed back to the outer host a few
    seconds after it was freed (measured: still backed after 3 s, gone after 5 s), and
    the next first touch of it costs 3-12 ms per MiB instead of ~0.1 (2 GiB: 0.17 s hot,
    6.7-11 s cold). Without this, whichever engine happened to start right after another
    process freed memory got fast memory and the other paid the outer host's faults: a
    64 MiB first pass took 0.04-0.86 s on QEMU and hv alike. The memory freed here is
    reused first by the next allocations (reported pages go to the tail of the free
    lists), so the measured process pays its own page faults and zeroing, not the outer
    host's. The return value (how cold the host was) is information."""
    size = max(mib, 1) << 20
    available = mem_available()
    if available is not None:
        size = min(size, int(available * BACKING_SHARE) >> 21 << 21)
    if size <= 0:
        return 0.0
    started = time.perf_counter()
    memory = GuestMemory([RegionSpec(0, size)])
    try:
        view = memory.regions[0].view
        if not populate(view):          # no MADV_POPULATE_WRITE (Linux < 5.14): one byte a page
            for offset in range(0, size, 4096):
                view[offset] = 1
    finally:
        memory.close()
    return time.perf_counter() - started


PREFAULT_RE = re.compile(r"guest RAM pre-fault (\w+): (?:(\d+) of )?(\d+) MiB(?: (?:in|for) (\d+) ms)?")


@dataclass
class HostMemoryNotes:
    """What a bench did to host memory before its runs and what hv destinations said about
    faulting in their guest RAM (``hv: guest RAM pre-fault done: 2048 MiB in 190 ms``), for
    the lines printed below a table."""

    warm_mib: dict[str, int] = field(default_factory=dict)     # row label -> MiB backed before its runs
    warm_s: list[float] = field(default_factory=list)
    prefault: dict[str, list[str]] = field(default_factory=dict)  # row label -> "done 190 ms", ...
    paired_raw: dict[str, list[float]] = field(default_factory=dict)  # row label -> rate / raw just before
    raw_goal: dict[str, float] = field(default_factory=dict)  # row label -> goal for its paired median

    def pair_raw(self, label: str, fraction: float, goal: float | None = None) -> None:
        """A migration's rate over the raw loopback rate measured around it (the mean of
        the samples right before and right after it); ``goal``
        the fraction its median is judged against (a data-heavy guest), None: information."""
        self.paired_raw.setdefault(label, []).append(fraction)
        if goal is not None:
            self.raw_goal[label] = goal

    def warm(self, label: str, mib: int) -> None:
        """Back ``mib`` MiB of host memory (:func:`back_host_memory`) for the next run of ``label``."""
        self.warm_mib[label] = mib
        self.warm_s.append(back_host_memory(mib))

    def record_prefault(self, label: str, stderr: str, migrate_after: float | None = None) -> None:
        """Keep an hv destination's pre-fault line ('-' when it printed none) and when the
        migration began, in seconds after the destination process was started (its
        pre-fault starts a little later, once hv is up): a pre-fault longer than that ran
        on beside the stream."""
        match = PREFAULT_RE.search(stderr)
        text = "-"
        if match:
            outcome, done, total, ms = match.groups()
            text = f"{outcome} {ms or '?'} ms" + (f" ({done} of {total} MiB)" if done else "")
        if migrate_after is not None:
            text += f" [migrate at +{migrate_after * 1000:.0f} ms]"
        self.prefault.setdefault(label, []).append(text)

    def lines(self) -> list[str]:
        out = []
        if self.warm_s:
            sizes = ", ".join(f"{mib} MiB" for mib in sorted(set(self.warm_mib.values())))
            out.append(f"host memory: before every migration (hv and QEMU alike) source + destination RAM + 128 MiB "
                       f"({sizes}) was touched and freed, so both engines start on memory the host has backed "
                       f"(took median {statistics.median(self.warm_s):.2f} s, max {max(self.warm_s):.2f} s)")
        for label, fractions in self.paired_raw.items():
            median = statistics.median(fractions)
            goal = self.raw_goal.get(label)
            verdict = "" if goal is None else f"; goal >= {goal:.0%}: {'met' if median >= goal else 'missed'}"
            out.append(f"paired % raw, {label}: " + " ".join(f"{f:.0%}" for f in fractions)
                       + f" (median {median:.1%}{verdict}; each run's rate over the mean of the raw rates "
                       "measured right before and right after it)")
        for label, reports in self.prefault.items():
            out.append(f"hv destination pre-fault, {label}: {', '.join(reports)} "
                       "[migrate at +: after the destination process started]")
        return out


# -- memory ------------------------------------------------------------------------------------------
RAM_MAPPING_MIN = 32 << 20     # smaller anonymous mappings are the VMM's own (heaps, buffers)
RAM_MAPPING_SLACK = 16 << 20   # what a VMM may round its RAM mappings up by


@dataclass(frozen=True)
class MemoryFigures:
    """A VMM process's memory as the benchmarks compare it: ``peak`` is VmHWM (the
    process's peak resident set), ``guest`` the resident part of its guest-RAM mappings,
    ``extra`` = peak - guest, what the VMM itself needed beyond the guest RAM touched."""

    peak: int
    guest: int

    @property
    def extra(self) -> int:
        return max(self.peak - self.guest, 0)


_MAPPING_RE = re.compile(r"^[0-9a-f]+-[0-9a-f]+ ")


def parse_memory(status: str, smaps: str, ram_bytes: int) -> MemoryFigures | None:
    """Peak RSS and guest-RAM RSS from ``/proc/PID/status`` and ``/proc/PID/smaps`` text.

    Guest RAM is every anonymous (no path), writable, non-executable private mapping of at
    least RAM_MAPPING_MIN bytes: hv's regions and QEMU's RAM block alike. A VMM's own
    buffers are smaller, glibc's reserved arena space is ``---p`` and QEMU's TCG code buffer
    is executable, so neither is subtracted. None when those mappings do not add up to the
    guest's RAM (within RAM_MAPPING_SLACK) or VmHWM is missing: then the figure would
    not mean what its column says."""
    hwm = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if hwm is None:
        return None
    ram_size = ram_rss = 0
    current_is_ram = False
    for line in smaps.splitlines():
        if _MAPPING_RE.match(line):
            fields = line.split(maxsplit=5)
            start, end = (int(x, 16) for x in fields[0].split("-"))
            path = fields[5].strip() if len(fields) > 5 else ""
            current_is_ram = (end - start >= RAM_MAPPING_MIN and not path and fields[1].startswith("rw")
                              and fields[1][2] != "x" and fields[1][3] == "p")
            ram_size += (end - start) if current_is_ram else 0
        elif current_is_ram and line.startswith("Rss:"):
            ram_rss += int(line.split()[1]) * 1024
    if not ram_bytes <= ram_size <= ram_bytes + RAM_MAPPING_SLACK:
        return None
    return MemoryFigures(peak=int(hwm.group(1)) * 1024, guest=ram_rss)


def read_memory(pid: int, ram_bytes: int) -> MemoryFigures | None:
    """:func:`parse_memory` of a live process (None if it is gone or unreadable)."""
    try:
        with open(f"/proc/{pid}/status") as status, open(f"/proc/{pid}/smaps") as smaps:
            return parse_memory(status.read(), smaps.read(), ram_bytes)
    except OSError:
        return None


class VmProcess:
    """One hv or QEMU process: serial output and stderr in files, always reaped by close()."""

    def __init__(self, name: str, argv: list[str], workdir: Path, serial: Path) -> None:
        self.name = name
        self.serial = serial
        self.stderr_path = workdir / f"{name}.stderr"
        self.qmp: Qmp | None = None
        self.started = time.monotonic()   # when the process was started (boot times count from here)
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


@dataclass
class TimedRun:
    """What a process printed on stdout, each line with the ``time.perf_counter()`` at
    which it arrived on the pipe, plus its exit code and stderr."""

    started: float
    lines: list[tuple[float, str]]
    returncode: int
    stderr: str

    def first(self, prefix: str) -> tuple[float, str] | None:
        return next(((t, line) for t, line in self.lines if line.startswith(prefix)), None)


def run_timed(argv: list[str], timeout: float, what: str) -> TimedRun:
    """Run ``argv`` to its end, timestamping its stdout lines as they arrive (the guest's
    serial port on stdio). A process still running after ``timeout`` s is killed and the
    run raises :class:`BenchError`; the process is always reaped."""
    lines: list[tuple[float, str]] = []
    started = time.perf_counter()
    with subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE) as process:
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            process.kill()

        watchdog = threading.Timer(timeout, expire)
        watchdog.start()
        stderr_chunks: list[bytes] = []
        drain = threading.Thread(target=lambda: stderr_chunks.append(process.stderr.read() if process.stderr
                                                                     else b""), daemon=True)
        drain.start()
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                lines.append((time.perf_counter(), raw.decode(errors="replace").rstrip("\r\n")))
            code = process.wait(30)
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
            drain.join(10)
    if timed_out.is_set():
        raise BenchError(f"{what}: no end after {timeout:g} s (killed)")
    return TimedRun(started, lines, code, b"".join(stderr_chunks).decode(errors="replace"))
