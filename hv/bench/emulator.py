"""``hv bench emulator``: how fast hv runs a guest, against QEMU on the same ELF (issue 13).

The ``dirty`` fixture guest with ``mib=M iterations=N`` rewrites an M MiB buffer N times
(every word loaded, checked, recomputed and stored: a store-heavy loop) and powers off. hv
and QEMU start the same ELF with the same command line and RAM, serial on stdio; this
process timestamps each line as it arrives on the pipe. The pairs compared are like with
like: hv ``-accel unicorn`` against QEMU ``-accel tcg`` (both emulate), and on x86_64 hv
``-accel kvm`` against QEMU ``-accel kvm`` where /dev/kvm is usable.

Columns: ``boot s`` is process start to the guest's banner line (``dirty: mib=...``, printed
just before pass 1 begins: process start-up, firmware and loading); ``run s`` is the banner
to the last pass line, i.e. all N passes; ``pass1 s`` the first of them alone (the guest's
first touch of its buffer: page faults, and the host's, land here); ``passes/s`` is N / run s; ``run/Q`` and
``boot/Q`` divide hv's figure by QEMU's of the same pair; ``output`` says whether hv's pass
lines (checksums, ``bad 0``) equal QEMU's (``same``), or ``bad`` when any pass found a
changed word. Each row runs ``--repeat`` times, interleaved (hv, QEMU, hv, QEMU, ...), and
the table prints medians. The goal printed is run/Q <= 1.5 for Unicorn against TCG.

Right before each run, hv's and QEMU's alike, the bench touches and frees RAM + 64 MiB of
memory (:func:`hv.bench.common.back_host_memory`): on a host that hands free memory back to
its own host (free page reporting), the first touch of memory idle for a few seconds costs
3-12 ms per MiB, and without this the engine that started right after another process
freed memory got fast memory and the other did not (first pass 0.04-0.86 s on either).
``--no-warm`` leaves it out (to see the host's cost); the time it took is printed below.

Below the table, for x86_64 Unicorn, a second figure: bare Unicorn (the same libunicorn
hv loads, in its own process, no hooks) running a flat store loop over the same M MiB N
times, in M stores/s, beside hv's guest rate in M words/s (each word is a load, a compare,
arithmetic and a store, so the two are not the same work: information, no goal).
Not a test: it measures and prints; nothing is asserted.
"""
from __future__ import annotations

import argparse
import json
import logging
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from hv.bench.common import (
    HV_COMMAND,
    BenchError,
    back_host_memory,
    bytecode_note,
    find_qemu,
    kvm_usable,
    qemu_missing_line,
    run_timed,
)
from hv_backends import UNICORN_LIBRARY
from hv_fixtures import guest as fixture_guest

log = logging.getLogger("hv.bench")

USAGE_EMULATOR = ("hv bench emulator [--arches x86_64,aarch64] [--accels unicorn,kvm] [--mib 64] [--passes 10] "
                  "[--repeat 3] [--no-qemu] [--qemu-dir DIR] [--no-bare] [--no-warm]")
GOAL_RATIO = 1.5                      # hv Unicorn run time / QEMU TCG run time
HV_MACHINE = {"x86_64": "q35", "aarch64": "virt"}
QEMU_MACHINE = {"x86_64": ("-M", "q35"), "aarch64": ("-M", "virt", "-cpu", "cortex-a57")}
QEMU_ACCEL = {"unicorn": "tcg", "kvm": "kvm"}   # hv's accelerator -> QEMU's like-for-like one
BANNER = "dirty: mib="


@dataclass(frozen=True)
class EmuCase:
    arch: str
    engine: str     # hv / qemu
    accel: str      # hv: unicorn / kvm; qemu: tcg / kvm

    def label(self) -> str:
        return f"{self.arch} {self.engine} {self.accel}"


@dataclass(frozen=True)
class EmuSample:
    boot_s: float
    run_s: float
    passes: tuple[str, ...]     # the guest's pass lines
    first_s: float = 0.0        # banner to the first pass line
    warm_s: float | None = None  # back_host_memory() right before the run (None: --no-warm)


@dataclass
class EmuRow:
    case: EmuCase
    samples: list[EmuSample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(s, attribute) for s in self.samples)


@dataclass(frozen=True)
class EmuSettings:
    mib: int
    passes: int
    timeout: float
    qemu: dict[str, str]                       # arch -> QEMU binary
    hv: tuple[str, ...] = HV_COMMAND
    warm: bool = True                          # back host memory before every run

    @property
    def ram_mib(self) -> int:
        return max(128, self.mib * 2 + 64)

    @property
    def warm_mib(self) -> int:
        """What a run may touch: guest RAM plus the VMM's own (code buffers, heaps)."""
        return self.ram_mib + 64

    @property
    def append(self) -> str:
        return f"mib={self.mib} iterations={self.passes}"


def case_argv(case: EmuCase, settings: EmuSettings) -> list[str]:
    """The same ELF, command line and RAM on either engine, serial on stdout."""
    kernel = str(fixture_guest(case.arch, "dirty"))
    if case.engine == "hv":
        return [*settings.hv, "-machine", HV_MACHINE[case.arch], "-accel", case.accel, "-m", str(settings.ram_mib),
                "-kernel", kernel, "-append", settings.append, "-serial", "stdio"]
    return [settings.qemu[case.arch], *QEMU_MACHINE[case.arch], "-accel", case.accel, "-m", f"{settings.ram_mib}M",
            "-nodefaults", "-no-user-config", "-display", "none", "-no-reboot", "-serial", "stdio",
            "-kernel", kernel, "-append", settings.append]


def run_once(case: EmuCase, settings: EmuSettings) -> EmuSample:
    """One process from start to power-off; the times come from its serial lines. The host
    memory it will touch is backed first (:func:`back_host_memory`), the same for every engine."""
    warm_s = back_host_memory(settings.warm_mib) if settings.warm else None
    run = run_timed(case_argv(case, settings), settings.timeout, case.label())
    banner = run.first(BANNER)
    passes = [(t, line) for t, line in run.lines if line.startswith("pass ")]
    if run.returncode != 0 or banner is None or len(passes) != settings.passes:
        tail = " | ".join([line for _, line in run.lines[-2:]] + run.stderr.strip().splitlines()[-2:])
        raise BenchError(f"{case.label()}: exit {run.returncode}, {len(passes)}/{settings.passes} passes: {tail[:300]}")
    return EmuSample(boot_s=banner[0] - run.started, run_s=passes[-1][0] - banner[0],
                     passes=tuple(line for _, line in passes), first_s=passes[0][0] - banner[0], warm_s=warm_s)


def build_rows(arches: list[str], accels: list[str], qemu: dict[str, str]) -> list[EmuRow]:
    rows = []
    for arch in arches:
        for accel in accels:
            rows.append(EmuRow(EmuCase(arch, "hv", accel)))
            if arch in qemu:
                rows.append(EmuRow(EmuCase(arch, "qemu", QEMU_ACCEL[accel])))
    return rows


def measure(rows: list[EmuRow], settings: EmuSettings, repeat: int) -> None:
    """Every row ``repeat`` times, interleaved, so a slow minute spreads over all rows."""
    for repetition in range(repeat):
        for row in rows:
            try:
                sample = run_once(row.case, settings)
            except BenchError as exc:
                log.warning("%s", exc)
                row.errors.append(str(exc))
                continue
            row.samples.append(sample)
            log.info("%s run %d: boot %.2f s, %d passes in %.2f s (first %.3f s)", row.case.label(),
                     repetition + 1, sample.boot_s, settings.passes, sample.run_s, sample.first_s)


def peer_of(row: EmuRow, rows: list[EmuRow]) -> EmuRow | None:
    """QEMU's row of the same arch with the like-for-like accelerator of an hv row."""
    if row.case.engine != "hv":
        return None
    wanted = EmuCase(row.case.arch, "qemu", QEMU_ACCEL[row.case.accel])
    return next((r for r in rows if r.case == wanted and r.samples), None)


def output_verdict(row: EmuRow, peer: EmuRow | None) -> str:
    """``bad`` if any pass found a changed word; ``same``/``differs`` against QEMU's lines."""
    if any(not line.endswith(" bad 0") for s in row.samples for line in s.passes):
        return "bad"
    if len({s.passes for s in row.samples}) > 1:
        return "unstable"
    if peer is None:
        return "-" if row.case.engine == "hv" else ""
    return "same" if row.samples[0].passes == peer.samples[0].passes else "differs"


def format_table(rows: list[EmuRow], settings: EmuSettings) -> str:
    header = ("arch", "engine", "accel", "passes", "boot s", "run s", "pass1 s", "passes/s", "boot/Q", "run/Q",
              "output")
    lines: list[tuple[str, ...]] = [header]
    for row in rows:
        c = row.case
        base = (c.arch, c.engine, c.accel, str(settings.passes))
        if not row.samples:
            lines.append(base + ("failed: " + (row.errors[-1] if row.errors else "?"),))
            continue
        peer = peer_of(row, rows)
        boot, run = row.median("boot_s"), row.median("run_s")
        partial = f" ({len(row.samples)}/{len(row.samples) + len(row.errors)} ok)" if row.errors else ""
        lines.append(base + (f"{boot:.2f}", f"{run:.3f}", f"{row.median('first_s'):.3f}",
                             f"{settings.passes / run:.1f}",
                             f"{boot / peer.median('boot_s'):.2f}" if peer else "-",
                             f"{run / peer.median('run_s'):.2f}" if peer else "-",
                             output_verdict(row, peer) + partial))
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(header))]
    out = ["  ".join(cell.rjust(widths[i]) if 3 <= i < len(header) - 1 else cell.ljust(widths[i])
                     for i, cell in enumerate(line)).rstrip() for line in lines]
    out.insert(1, "-" * len(out[0]))
    out.extend(goal_lines(rows))
    out.append(f"medians; dirty.elf {settings.append}, {settings.ram_mib} MiB RAM; run s = banner to last pass "
               "line, pass1 s = banner to first; run/Q, boot/Q = hv / QEMU (same arch, unicorn vs tcg, kvm vs kvm)")
    out.append(warm_line(rows, settings))
    return "\n".join(out)


def warm_line(rows: list[EmuRow], settings: EmuSettings) -> str:
    """What the bench did to host memory before each run, and how long it took (how cold it was)."""
    if not settings.warm:
        return ("host memory not backed before the runs (--no-warm): a first pass may include the host's own "
                "first-touch cost, whichever engine it falls on")
    times = [s.warm_s for row in rows for s in row.samples if s.warm_s is not None]
    spread = f"median {statistics.median(times):.2f} s, max {max(times):.2f} s" if times else "no run"
    return (f"before every run (hv and QEMU alike) {settings.warm_mib} MiB were touched and freed so the run starts "
            f"on memory the host has backed ({spread})")


def goal_lines(rows: list[EmuRow]) -> list[str]:
    lines = []
    for row in rows:
        peer = peer_of(row, rows)
        if row.case.accel == "unicorn" and row.samples and peer is not None:
            ratio = row.median("run_s") / peer.median("run_s")
            lines.append(f"goal {row.case.arch} hv unicorn / QEMU tcg run time <= {GOAL_RATIO}: {ratio:.2f} "
                         + ("met" if ratio <= GOAL_RATIO else "missed"))
    return lines


# -- the second figure: bare Unicorn, no hooks ---------------------------------------------------------
BARE_BASE = 0x100000
BARE_CHILD = r"""
import json, sys, time
import hv_backends                  # picks the libunicorn hv uses (LIBUNICORN_PATH) before the binding loads
import unicorn
from unicorn import x86_const as X
code, base, mib = bytes.fromhex(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
uc.mem_map(0x1000, 0x1000)
uc.mem_map(base, mib << 20)
uc.mem_write(0x1000, code)
uc.reg_write(X.UC_X86_REG_RDI, base)
started = time.perf_counter()
uc.emu_start(0x1000, 0x1000 + len(code) - 1)
print(json.dumps({"seconds": time.perf_counter() - started, "library": hv_backends.UNICORN_LIBRARY.describe()}))
"""


def bare_store_loop(mib: int, passes: int) -> bytes:
    """x86_64: rsi = passes; each pass stores rcx to [rdi + rcx*8] for rcx = 0 .. words-1; hlt."""
    words = mib * (1 << 20) // 8
    return (bytes.fromhex("48c7c6") + passes.to_bytes(4, "little")          # mov rsi, passes
            + bytes.fromhex("4831c9" "48890ccf" "48ffc1" "4881f9")          # xor rcx; mov [rdi+rcx*8], rcx; inc; cmp
            + words.to_bytes(4, "little") + bytes.fromhex("75f0" "48ffce" "75e8" "f4"))   # jne; dec rsi; jne; hlt


def bare_unicorn(settings: EmuSettings, repeat: int) -> tuple[float, str]:
    """Median stores/s of the bare loop in its own Python process, and which library ran it."""
    code = bare_store_loop(settings.mib, settings.passes)
    results = []
    for _ in range(repeat):
        # -P: the current directory stays off sys.path (a stray hv_backends/ there is not ours)
        proc = subprocess.run([settings.hv[0], "-P", "-c", BARE_CHILD, code.hex(), str(BARE_BASE), str(settings.mib)],
                              capture_output=True, text=True, timeout=settings.timeout)
        if proc.returncode != 0:
            raise BenchError(f"bare Unicorn loop failed: {proc.stderr.strip()[-300:]}")
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    seconds = statistics.median(r["seconds"] for r in results)
    return settings.mib * (1 << 20) // 8 * settings.passes / seconds, str(results[0]["library"])


def bare_lines(rows: list[EmuRow], settings: EmuSettings, repeat: int) -> list[str]:
    hv_row = next((r for r in rows if r.case == EmuCase("x86_64", "hv", "unicorn") and r.samples), None)
    if hv_row is None:
        return []
    if settings.hv != HV_COMMAND:
        return ["bare Unicorn: skipped (--hv runs another hv command; the bare loop uses this Python)"]
    try:
        stores, library = bare_unicorn(settings, repeat)
    except (BenchError, subprocess.TimeoutExpired, ValueError) as exc:
        return [f"bare Unicorn: not measured: {exc}"]
    words = settings.mib * (1 << 20) // 8 * settings.passes / hv_row.median("run_s")
    return [f"bare Unicorn x86_64 ({library}), flat store loop, no hooks: {stores / 1e6:.0f} M stores/s; "
            f"hv unicorn guest: {words / 1e6:.0f} M words/s (load+check+compute+store each; information, no goal)"]


# -- command line --------------------------------------------------------------------------------------
def _choices(kind: str, allowed: tuple[str, ...]):
    def parse(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items or any(t not in allowed for t in items):
            raise argparse.ArgumentTypeError(f"{kind}: choose from {', '.join(allowed)}")
        return items
    return parse


def emulator_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hv bench emulator", usage=USAGE_EMULATOR,
                                description="Guest speed: the dirty fixture ELF on hv and QEMU, side by side.")
    p.add_argument("--arches", type=_choices("arches", ("x86_64", "aarch64")), default=["x86_64", "aarch64"])
    p.add_argument("--accels", type=_choices("accels", ("unicorn", "kvm")), default=None,
                   help="hv accelerators (default unicorn,kvm; kvm only on x86_64 with a usable /dev/kvm)")
    p.add_argument("--mib", type=int, default=64, help="the guest's buffer in MiB (default 64)")
    p.add_argument("--passes", type=int, default=10, help="passes over the buffer (default 10)")
    p.add_argument("--repeat", type=int, default=3, help="runs per row (median; default 3)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds per run before it is killed")
    p.add_argument("--no-qemu", action="store_true", help="do not run QEMU even when installed")
    p.add_argument("--qemu-dir", type=Path, default=None, help="where qemu-system-* are (default: PATH)")
    p.add_argument("--no-bare", action="store_true", help="skip the bare-Unicorn figure")
    p.add_argument("--no-warm", action="store_true",
                   help="do not touch and free memory before each run (see the host's first-touch cost)")
    p.add_argument("--hv", default=None, help="command that runs hv (default: this Python -m hv)")
    return p


def run_emulator(argv: list[str]) -> int:
    args = emulator_parser().parse_args(argv)
    if not (1 <= args.mib <= 1024 and 1 <= args.passes <= 10000 and 1 <= args.repeat <= 50):
        print("hv bench emulator: --mib 1..1024, --passes 1..10000, --repeat 1..50", file=sys.stderr)
        return 2
    accels = args.accels or ["unicorn", "kvm"]
    if "kvm" in accels and not kvm_usable():
        if args.accels is not None:
            print("hv bench emulator: /dev/kvm is not usable here: the kvm rows are skipped")
        accels = [a for a in accels if a != "kvm"]
    qemu: dict[str, str] = {}
    for arch in args.arches:
        found = None if args.no_qemu else find_qemu(arch, args.qemu_dir)
        if found:
            qemu[arch] = found
        elif not args.no_qemu:
            print(qemu_missing_line(arch))
    hv = tuple(shlex.split(args.hv)) if args.hv else HV_COMMAND
    settings = EmuSettings(mib=args.mib, passes=args.passes, timeout=args.timeout, qemu=qemu, hv=hv,
                           warm=not args.no_warm)
    # hv's KVM backend is x86_64-only on this host; aarch64 runs on Unicorn.
    rows = [r for r in build_rows(args.arches, accels, qemu) if r.case.accel != "kvm" or r.case.arch == "x86_64"]
    if not rows:
        print("hv bench emulator: nothing to run", file=sys.stderr)
        return 2
    started = time.monotonic()
    measure(rows, settings, args.repeat)
    print(format_table(rows, settings))
    if args.hv is None and (note := bytecode_note()) is not None:   # boot s includes it
        print(note)
    if "unicorn" in accels and args.hv is None:   # the children pick their library as this process did
        print(f"hv's unicorn rows ran on {UNICORN_LIBRARY.describe()}")
    if not args.no_bare:
        for line in bare_lines(rows, settings, args.repeat):
            print(line)
    print(f"({len(rows)} rows x {args.repeat} runs in {time.monotonic() - started:.0f} s)")
    return 0 if all(row.samples for row in rows) else 1
