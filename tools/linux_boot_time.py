#!/usr/bin/env python3
"""How long x86_64 Linux takes to boot on hv's Unicorn backend (a measurement, not a test).

Boots the cached PVH vmlinux + initramfs (``python fixtures/linux/build_images.py --arch
x86_64`` builds them) with ``-accel unicorn`` and reports the seconds from starting hv to
the kernel banner, to ``Run /init`` and to the workload's ``wl: start`` and ``wl: pass 1 ok``
lines, once with the native event delivery and once with it forced off
(HV_UNICORN_X86_NATIVE=0), ``--runs`` times each, alternating so both see the same load.

    python tools/linux_boot_time.py --runs 3
    python tools/linux_boot_time.py --mode native --append "lpj=4000000 tsc_early_khz=2000000"
"""
from __future__ import annotations

import argparse
import logging
import os
import selectors
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("linux_boot_time")

MILESTONES = ("Linux version", "Run /init", "wl: start", "wl: pass 1 ok")
BASE_APPEND = "console=ttyS0 hv_shell=0 wl_passes=3 hv_end=poweroff"


@dataclass
class Boot:
    """Seconds from hv's start to each milestone line (None: not seen before the limit)."""

    mode: str
    times: dict[str, float | None] = field(default_factory=lambda: dict.fromkeys(MILESTONES))


def image_dir() -> Path:
    cache = os.environ.get("HV_IMAGE_CACHE") or str(Path.home() / ".cache" / "hv" / "images")
    return Path(cache) / "x86_64"


def boot_once(mode: str, append: str, limit: float, log_path: Path | None) -> Boot:
    """One boot; stops hv once the last milestone is seen or ``limit`` seconds passed."""
    images = image_dir()
    cmd = [sys.executable, "-m", "hv", "-machine", "q35", "-accel", "unicorn", "-m", "512",
           "-kernel", str(images / "vmlinux"), "-initrd", str(images / "initramfs.cpio.gz"),
           "-append", append, "-serial", "stdio"]
    env = dict(os.environ, HV_UNICORN_X86_NATIVE="1" if mode == "native" else "0")
    boot = Boot(mode)
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env=env)
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    pending = b""
    out = log_path.open("w") if log_path else None
    try:
        while time.monotonic() - start < limit and boot.times[MILESTONES[-1]] is None:
            if not sel.select(timeout=0.5):
                continue
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                break
            *lines, pending = (pending + chunk).split(b"\n")
            now = time.monotonic() - start
            for raw in lines:
                text = raw.decode(errors="replace")
                if out:
                    out.write(f"{now:8.3f} {text}\n")
                for mark in MILESTONES:
                    if boot.times[mark] is None and mark in text:
                        boot.times[mark] = now
    finally:
        proc.kill()
        proc.wait()
        sel.close()
        if out:
            out.close()
    return boot


def summary(boots: list[Boot], mode: str) -> str:
    parts = []
    for mark in MILESTONES:
        seen = [b.times[mark] for b in boots if b.mode == mode and b.times[mark] is not None]
        runs = sum(1 for b in boots if b.mode == mode)
        value = f"{statistics.median(seen):.2f}s" if seen else "-"
        parts.append(f"{mark!r} {value} ({len(seen)}/{runs})")
    return f"{mode:7s} median: " + ", ".join(parts)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--mode", choices=("both", "native", "python"), default="both")
    parser.add_argument("--append", default="", help="kernel parameters added to the defaults")
    parser.add_argument("--limit", type=float, default=180.0, help="seconds before a boot is given up")
    parser.add_argument("--log-dir", type=Path, help="write each boot's timestamped console here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not (image_dir() / "vmlinux").is_file():
        print(f"linux_boot_time: no {image_dir() / 'vmlinux'}; run "
              "`python fixtures/linux/build_images.py --arch x86_64`", file=sys.stderr)
        return 1
    if args.runs < 1 or args.limit <= 0:
        print("linux_boot_time: --runs and --limit must be positive", file=sys.stderr)
        return 1
    if args.log_dir:
        args.log_dir.mkdir(parents=True, exist_ok=True)
    modes = ("native", "python") if args.mode == "both" else (args.mode,)
    append = f"{BASE_APPEND} {args.append}".strip()
    boots = []
    for run in range(args.runs):
        for mode in modes:
            path = args.log_dir / f"{mode}-{run}.log" if args.log_dir else None
            boot = boot_once(mode, append, args.limit, path)
            boots.append(boot)
            log.info("%s run %d: %s", mode, run, ", ".join(
                f"{k!r} {'-' if v is None else f'{v:.2f}s'}" for k, v in boot.times.items()))
    for mode in modes:
        print(summary(boots, mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
