"""``hv bench blk``: virtio-blk throughput of the fixture guest against ``dd`` (issue 5).

For every accelerator/machine pair (x86_64 on KVM when /dev/kvm is usable, x86_64 and
aarch64 on Unicorn) and every block size, hv is started as a user would start it
(``hv -machine ... -kernel fixtures/<arch>/blk.elf -append "bench=M bsize=B depth=D"
-drive ... -device virtio-blk-pci,... -serial stdio``). The guest prints a line before its
sequential write pass, one before its read pass and one at the end; this process
timestamps the lines as they arrive on the pipe, so a pass's time excludes boot and
exit. In the same run ``dd`` writes and reads the same image file with the same block
size (``conv=notrunc``, page cache as for the guest; one dd run after every guest run,
so both see the same cache state), and the table prints MB/s side by side with the
ratio guest/dd (against the median of all dd runs up to then). Each cell is the median
of ``--repeat`` runs.

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
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from hv.bench.common import BenchError, kvm_usable
from hv_fixtures import guest as fixture_guest

log = logging.getLogger("hv.bench")

USAGE_BLK = "hv bench blk [--sizes 4K,1M] [--accels kvm,unicorn] [--arches x86_64,aarch64] [--repeat 2]"
MACHINE_FOR_ARCH = {"x86_64": "q35", "aarch64": "virt"}
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


def run_guest(arch: str, accel: str, image: Path, bsize: int, timeout: float = 600) -> BlkResult:
    """One hv process running the blk guest's benchmark mode on ``image``."""
    depth, mib = SIZE_PLANS[bsize]
    argv = [sys.executable, "-m", "hv", "-machine", MACHINE_FOR_ARCH[arch], "-accel", accel, "-m", "256",
            "-kernel", str(fixture_guest(arch, "blk")),
            "-append", f"bench={mib} bsize={bsize} depth={depth}",
            "-drive", f"file={image},id=d0,readonly=off,direct=off",
            "-device", "virtio-blk-pci,drive=d0,id=d0,bus=pcie.0,addr=2", "-serial", "stdio"]
    stamps: dict[str, float] = {}
    lines: list[str] = []
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as process:
        # A guest that stops printing must not hang the benchmark: kill it at the deadline
        # (reading its output then ends).
        timed_out = threading.Event()

        def expire() -> None:
            timed_out.set()
            process.kill()

        watchdog = threading.Timer(timeout, expire)
        watchdog.start()
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                line = raw.decode(errors="replace").rstrip("\n")
                now = time.perf_counter()
                lines.append(line)
                for key in ("bench write", "bench read", "bench done"):
                    if line.startswith(key):
                        stamps[key] = now
            code = process.wait(30)
        finally:
            watchdog.cancel()
            if process.poll() is None:
                process.kill()
                process.wait()
        if timed_out.is_set():
            raise BenchError(f"{arch}/{accel}: no end after {timeout:g} s (killed)")
        stderr = process.stderr.read().decode(errors="replace") if process.stderr else ""
    if code != 0 or len(stamps) != 3:
        tail = "\n".join(lines[-3:] + stderr.splitlines()[-3:])
        raise BenchError(f"{arch}/{accel} bsize={bsize}: guest did not finish its benchmark (exit {code}):\n{tail}")
    total = mib << 20
    return BlkResult(total / (stamps["bench read"] - stamps["bench write"]) / 1e6,
                     total / (stamps["bench done"] - stamps["bench read"]) / 1e6)


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


def run_blk(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="hv bench blk", usage=USAGE_BLK)
    parser.add_argument("--sizes", default="4K,1M")
    parser.add_argument("--accels", default="kvm,unicorn")
    parser.add_argument("--arches", default="x86_64,aarch64")
    parser.add_argument("--repeat", type=int, default=2)
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
            print(f"hv bench blk: unknown arch {arch!r}", file=sys.stderr)
            return 2
        for accel in [a for a in args.accels.split(",") if a]:
            if accel == "kvm" and (arch != "x86_64" or not kvm_usable()):
                log.info("skipping %s/kvm: %s", arch, "no KVM for aarch64 on this host" if arch != "x86_64"
                         else "/dev/kvm is not usable")
                continue
            runs.append((arch, accel))
    rows: list[tuple[str, int, float, float, float | None, float | None]] = []
    with tempfile.TemporaryDirectory(prefix="hv-bench-blk-") as tmp:
        for bsize in sizes:
            image = Path(tmp) / f"disk-{bsize}.img"
            make_image(image, SIZE_PLANS[bsize][1])
            host = [run_dd(image, bsize) for _ in range(args.repeat)]
            host_row = len(rows)
            rows.append(("host dd", bsize, 0.0, 0.0, None, None))
            for arch, accel in runs:
                results = []
                for _ in range(args.repeat):
                    try:
                        results.append(run_guest(arch, accel, image, bsize))
                    except BenchError as exc:
                        print(f"hv bench blk: {exc}", file=sys.stderr)
                        return 1
                    host_now = run_dd(image, bsize)   # interleaved: same page-cache state
                    host.append(host_now)
                w = statistics.median(r.write for r in results)
                r = statistics.median(r.read for r in results)
                host_w = statistics.median(x.write for x in host)
                host_r = statistics.median(x.read for x in host)
                rows.append((f"{arch} {accel}", bsize, w, r, w / host_w, r / host_r))
                log.info("%s/%s bsize=%d: write %.0f MB/s read %.0f MB/s", arch, accel, bsize, w, r)
            rows[host_row] = ("host dd", bsize, statistics.median(x.write for x in host),
                              statistics.median(x.read for x in host), None, None)
    print(f"{'run':<18} {'bsize':>7} {'write MB/s':>11} {'read MB/s':>10} {'write/dd':>9} {'read/dd':>8}")
    for name, bsize, w, r, rw, rr in rows:
        size = f"{bsize >> 10}K" if bsize < 1 << 20 else f"{bsize >> 20}M"
        ratio_w = f"{rw:.2f}" if rw is not None else "-"
        ratio_r = f"{rr:.2f}" if rr is not None else "-"
        print(f"{name:<18} {size:>7} {w:>11.0f} {r:>10.0f} {ratio_w:>9} {ratio_r:>8}")
    return 0
