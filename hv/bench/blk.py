"""``hv bench blk``: virtio-blk throughput of the fixture guest against QEMU and ``dd``
(issues 5, 13).

For every accelerator/machine pair (x86_64 on KVM when /dev/kvm is usable, x86_64 and
aarch64 on Unicorn) and every block size, hv is started as a user would start it
(``hv -machine ... -kernel fixtures/<arch>/blk.elf -append "bench=M bsize=B depth=D"
-drive ... -device virtio-blk-pci,... -serial stdio``), and where installed QEMU runs the
same ELF with the same command line on the same image file through its own
virtio-blk-pci (modern only, at the same PCI address, raw format, page cache as hv's
``direct=off``), like with like: QEMU TCG beside hv Unicorn, QEMU KVM beside hv KVM. The
guest prints a line before its sequential write pass, one before its read pass and one at
the end; this process timestamps the lines as they arrive on the pipe, so a pass's time
excludes boot and exit. In the same run ``dd`` writes and reads the same image file with
the same block size (``conv=notrunc``; one dd run after every guest run, so all see the
same cache state). The table prints MB/s with the ratios guest/dd and hv/QEMU, and
``output``: whether hv's guest printed the same lines as QEMU's (``same``; the interrupt
mode, ``msix`` or ``polling``, is shown as it can differ: QEMU's virt offers the guest no
MSI it can take, so it polls there). Each cell is the median of ``--repeat`` runs (default 3),
interleaved (hv, dd, QEMU, dd, ...).

Not a test: it measures and prints; nothing is asserted.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from hv.bench.common import HV_COMMAND, BenchError, find_qemu, kvm_usable, qemu_missing_line, run_timed
from hv_fixtures import guest as fixture_guest

log = logging.getLogger("hv.bench")

USAGE_BLK = ("hv bench blk [--sizes 4K,1M] [--accels kvm,unicorn] [--arches x86_64,aarch64] [--repeat 3] "
             "[--no-qemu] [--qemu-dir DIR]")
MACHINE_FOR_ARCH = {"x86_64": "q35", "aarch64": "virt"}
# QEMU's virt puts the PCIe ECAM where the guest looks for it only with highmem=off.
QEMU_MACHINE = {"x86_64": ("-M", "q35"), "aarch64": ("-M", "virt,highmem=off", "-cpu", "cortex-a57")}
QEMU_ACCEL = {"unicorn": "tcg", "kvm": "kvm"}    # hv's accelerator -> QEMU's like-for-like one
# (bytes per request, requests per notify, MiB per pass): small requests are bound by
# per-request work, so they move less data to keep a run short.
SIZE_PLANS = {4096: (16, 16), 1 << 20: (4, 64)}


@dataclass(frozen=True)
class BlkResult:
    """MB/s of one sequential write pass and one read pass."""

    write: float
    read: float


def parse_block_size(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20}
    text = text.strip().upper()
    try:
        value = int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except (ValueError, KeyError):
        raise BenchError(f"bad block size {text!r} (use 4K or 1M)") from None
    if value not in SIZE_PLANS:
        raise BenchError(f"block size {text}: choose from 4K, 1M")
    return value


@dataclass(frozen=True)
class GuestRun:
    """One guest's benchmark: its rates and what it printed (for the comparison)."""

    result: BlkResult
    mode: str                  # msix / polling: how the guest waited for completions
    lines: tuple[str, ...]     # its output, the interrupt-mode line left out


def guest_argv(engine: str, arch: str, accel: str, image: Path, bsize: int, qemu: str | None) -> list[str]:
    """The same ELF, command line, RAM and disk image on hv or QEMU, serial on stdout."""
    depth, mib = SIZE_PLANS[bsize]
    kernel, append = str(fixture_guest(arch, "blk")), f"bench={mib} bsize={bsize} depth={depth}"
    if engine == "hv":
        return [*HV_COMMAND, "-machine", MACHINE_FOR_ARCH[arch], "-accel", accel, "-m", "256",
                "-kernel", kernel, "-append", append, "-drive", f"file={image},id=d0,readonly=off,direct=off",
                "-device", "virtio-blk-pci,drive=d0,id=d0,bus=pcie.0,addr=2", "-serial", "stdio"]
    assert qemu is not None
    return [qemu, *QEMU_MACHINE[arch], "-accel", QEMU_ACCEL[accel], "-m", "256M", "-nodefaults", "-no-user-config",
            "-display", "none", "-no-reboot", "-serial", "stdio", "-kernel", kernel, "-append", append,
            "-drive", f"file={image},if=none,id=d0,format=raw,cache=writeback",
            "-device", "virtio-blk-pci,drive=d0,addr=2,disable-legacy=on"]


def run_guest(argv: list[str], what: str, bsize: int, timeout: float = 600) -> GuestRun:
    """One process running the blk guest's benchmark mode to its power-off."""
    _, mib = SIZE_PLANS[bsize]
    run = run_timed(argv, timeout, what)
    stamps = {key: found[0] for key in ("bench write", "bench read", "bench done")
              if (found := run.first(key)) is not None}
    errors = [line for _, line in run.lines if line.startswith("blk: io error") or "error" in line]
    if run.returncode != 0 or len(stamps) != 3 or errors:
        tail = "\n".join([line for _, line in run.lines[-3:]] + run.stderr.splitlines()[-3:])
        raise BenchError(f"{what} bsize={bsize}: guest did not finish its benchmark (exit {run.returncode}):\n{tail}")
    total = mib << 20
    modes = [line for _, line in run.lines if line in ("blk: msix", "blk: polling")]
    return GuestRun(BlkResult(total / (stamps["bench read"] - stamps["bench write"]) / 1e6,
                              total / (stamps["bench done"] - stamps["bench read"]) / 1e6),
                    modes[0][len("blk: "):] if modes else "?",
                    tuple(line for _, line in run.lines if line not in ("blk: msix", "blk: polling")))


def dd_seconds(*args: str) -> float:
    result = subprocess.run(["dd", *args], capture_output=True, text=True, check=True)
    # "... bytes (...) copied, 0.0123 s, 1.2 GB/s"
    return float(result.stderr.strip().splitlines()[-1].split(",")[-2].split()[0])


def run_dd(image: Path, bsize: int) -> BlkResult:
    """``dd`` overwriting then reading what the guest does, on the same file."""
    _, mib = SIZE_PLANS[bsize]
    count = str((mib << 20) // bsize)
    write = dd_seconds("if=/dev/zero", f"of={image}", f"bs={bsize}", f"count={count}", "conv=notrunc")
    read = dd_seconds(f"if={image}", "of=/dev/null", f"bs={bsize}", f"count={count}")
    return BlkResult((mib << 20) / write / 1e6, (mib << 20) / read / 1e6)


def make_image(path: Path, mib: int) -> None:
    """An allocated image (the guest and dd both overwrite blocks that exist)."""
    with open(path, "wb") as f:
        chunk = bytes(1 << 20)
        for _ in range(mib + 1):
            f.write(chunk)


@dataclass
class BlkRow:
    """One engine on one arch/accelerator at one block size, with its dd reference."""

    name: str                      # "x86_64 hv unicorn", "x86_64 qemu tcg", "host dd"
    bsize: int
    runs: list[GuestRun] = field(default_factory=list)
    host: list[BlkResult] = field(default_factory=list)   # dd runs (host row: all of them)

    def median(self, attribute: str) -> float:
        return statistics.median(getattr(r.result, attribute) for r in self.runs)


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[int], list[tuple[str, str]]] | int:
    """The options, the block sizes and the (arch, accel) pairs to run, or an exit code."""
    parser = argparse.ArgumentParser(prog="hv bench blk", usage=USAGE_BLK)
    parser.add_argument("--sizes", default="4K,1M")
    parser.add_argument("--accels", default="kvm,unicorn")
    parser.add_argument("--arches", default="x86_64,aarch64")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--no-qemu", action="store_true", help="do not run QEMU even when installed")
    parser.add_argument("--qemu-dir", type=Path, default=None, help="where qemu-system-* are (default: PATH)")
    args = parser.parse_args(argv)
    try:
        sizes = [parse_block_size(s) for s in args.sizes.split(",") if s]
    except BenchError as exc:
        print(f"hv bench blk: {exc}", file=sys.stderr)
        return 2
    if shutil.which("dd") is None:
        print("hv bench blk: dd(1) is needed for the host reference", file=sys.stderr)
        return 2
    if not 1 <= args.repeat <= 20:
        print("hv bench blk: --repeat must be 1..20", file=sys.stderr)
        return 2
    runs = []
    for arch in [a for a in args.arches.split(",") if a]:
        if arch not in MACHINE_FOR_ARCH:
            print(f"hv bench blk: unknown arch {arch[:40]!r}", file=sys.stderr)
            return 2
        for accel in [a for a in args.accels.split(",") if a]:
            if accel not in QEMU_ACCEL:
                print(f"hv bench blk: unknown accelerator {accel[:40]!r} (kvm, unicorn)", file=sys.stderr)
                return 2
            if accel == "kvm" and (arch != "x86_64" or not kvm_usable()):
                log.info("skipping %s/kvm: %s", arch, "no KVM for aarch64 on this host" if arch != "x86_64"
                         else "/dev/kvm is not usable")
                continue
            runs.append((arch, accel))
    return args, sizes, runs


def measure_size(bsize: int, image: Path, pairs: list[tuple[str, str]], qemu: dict[str, str],
                 repeat: int) -> list[BlkRow]:
    """The host row and, per pair, hv's row and QEMU's, interleaved with dd runs."""
    host = BlkRow("host dd", bsize, host=[run_dd(image, bsize) for _ in range(repeat)])
    rows = [host]
    for arch, accel in pairs:
        engines = [("hv", accel)] + ([("qemu", QEMU_ACCEL[accel])] if arch in qemu else [])
        pair_rows = [BlkRow(f"{arch} {engine} {engine_accel}", bsize) for engine, engine_accel in engines]
        for _ in range(repeat):
            for (engine, _accel), row in zip(engines, pair_rows, strict=True):
                argv = guest_argv(engine, arch, accel, image, bsize, qemu.get(arch))
                row.runs.append(run_guest(argv, row.name, bsize))
                host.host.append(run_dd(image, bsize))   # interleaved: same page-cache state
                row.host = list(host.host)
                log.info("%s bsize=%d: write %.0f MB/s read %.0f MB/s", row.name, bsize,
                         row.runs[-1].result.write, row.runs[-1].result.read)
        rows.extend(pair_rows)
    return rows


def _ratio(mine: float, other: float | None) -> str:
    return "-" if other is None or other <= 0 else f"{mine / other:.2f}"


def format_rows(rows: list[BlkRow]) -> list[str]:
    """The table: MB/s, ratios to dd (median of the dd runs up to then) and to QEMU."""
    out = [f"{'run':<20} {'bsize':>6} {'write MB/s':>11} {'read MB/s':>10} {'write/dd':>9} {'read/dd':>8} "
           f"{'write/Q':>8} {'read/Q':>7}  output"]
    for row in rows:
        size = f"{row.bsize >> 10}K" if row.bsize < 1 << 20 else f"{row.bsize >> 20}M"
        if not row.runs:   # the host row
            w, r = (statistics.median(getattr(x, k) for x in row.host) for k in ("write", "read"))
            out.append(f"{row.name:<20} {size:>6} {w:>11.0f} {r:>10.0f} {'-':>9} {'-':>8} {'-':>8} {'-':>7}")
            continue
        w, r = row.median("write"), row.median("read")
        host_w, host_r = (statistics.median(getattr(x, k) for x in row.host) for k in ("write", "read"))
        peer = _peer(row, rows)
        output = row.runs[0].mode if row.name.split()[1] == "hv" else ""
        if peer is not None:
            same = all(run.lines == peer.runs[0].lines for run in row.runs + peer.runs)
            output = ("same" if same else "DIFFERS") + f" ({row.runs[0].mode}; QEMU {peer.runs[0].mode})"
        out.append(f"{row.name:<20} {size:>6} {w:>11.0f} {r:>10.0f} {_ratio(w, host_w):>9} {_ratio(r, host_r):>8} "
                   f"{_ratio(w, peer.median('write')) if peer else '-':>8} "
                   f"{_ratio(r, peer.median('read')) if peer else '-':>7}  {output}"
                   .rstrip())
    return out


def _peer(row: BlkRow, rows: list[BlkRow]) -> BlkRow | None:
    arch, engine, accel = row.name.split()
    if engine != "hv":
        return None
    wanted = f"{arch} qemu {QEMU_ACCEL[accel]}"
    return next((r for r in rows if r.name == wanted and r.bsize == row.bsize and r.runs), None)


def run_blk(argv: list[str]) -> int:
    parsed = _parse(argv)
    if isinstance(parsed, int):
        return parsed
    args, sizes, pairs = parsed
    qemu: dict[str, str] = {}
    for arch in sorted({arch for arch, _ in pairs}, key=list(MACHINE_FOR_ARCH).index):
        found = None if args.no_qemu else find_qemu(arch, args.qemu_dir)
        if found:
            qemu[arch] = found
        elif not args.no_qemu:
            print(qemu_missing_line(arch))
    rows: list[BlkRow] = []
    with tempfile.TemporaryDirectory(prefix="hv-bench-blk-") as tmp:
        for bsize in sizes:
            image = Path(tmp) / f"disk-{bsize}.img"
            make_image(image, SIZE_PLANS[bsize][1])
            try:
                rows.extend(measure_size(bsize, image, pairs, qemu, args.repeat))
            except BenchError as exc:
                print(f"hv bench blk: {exc}", file=sys.stderr)
                return 1
    print("\n".join(format_rows(rows)))
    print("medians; x/dd = guest / dd on the same file, x/Q = hv / QEMU (unicorn vs tcg, kvm vs kvm); output: "
          "hv's guest lines against QEMU's, (interrupt modes)")
    return 0
