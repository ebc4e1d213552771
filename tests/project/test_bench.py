"""Smoke test of ``hv bench migrate``: one small configuration end to end (not timed).

Real hv processes (and QEMU where installed) migrate a 64 MiB idle guest once over a
UNIX socket; the test checks the table comes out with a measured row, not the numbers.
"""
from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

import pytest

from hv.bench.migrate import Case, Row, Sample, format_table, parse_size
from tests.helpers import ROOT, kvm_unusable_reason, may_use_tool, require_tool


@may_use_tool("qemu-system-x86_64")     # adds QEMU's rows where it is installed
def test_bench_migrate_prints_table() -> None:
    accel = "kvm" if kvm_unusable_reason() is None else "unicorn"
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "migrate", "--sizes", "64M", "--modes", "idle",
                           "--transports", "unix", "--accels", accel, "--repeat", "1", "--loopback-mib", "64",
                           "--timeout", "60"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split()[:5] == ["engine", "accel", "size", "mode", "link"], proc.stdout
    row = next(line for line in lines if line.startswith("hv "))
    cells = row.split()
    assert cells[:5] == ["hv", accel, "64M", "idle", "unix"], row
    total_ms, downtime_ms, sent_mib, passes = int(cells[5]), int(cells[6]), float(cells[7]), int(cells[8])
    assert 0 < downtime_ms <= total_ms
    assert 16 <= sent_mib < 64 and passes >= 1  # the 16 MiB buffer holds data, the rest is zero markers
    assert re.search(r"raw loopback .*unix \d+ MiB/s", proc.stdout)
    if shutil.which("qemu-system-x86_64"):
        assert any(line.startswith("qemu ") for line in lines), proc.stdout
        assert not re.search(r"\s-\s+-\s", row), "hv/QEMU ratios missing: " + row


def test_bench_rejects_unknown_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "migrate", "--modes", "busy"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "choose from idle, dirty" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "nosuch"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "usage: hv bench migrate" in proc.stderr


def test_sizes_and_ratios() -> None:
    assert parse_size("256M") == 256 and parse_size("1G") == 1024 and parse_size("512") == 512
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("1T")
    hv = Row(Case("hv", "kvm", 256, "idle", "tcp"), [Sample(400, 100, 64 << 20, 2), Sample(600, 500, 64 << 20, 2),
                                                    Sample(500, 200, 64 << 20, 2)])
    qemu = Row(Case("qemu", "kvm", 256, "idle", "tcp"), [Sample(250, 100, 65 << 20, 3)])
    table = format_table([hv, qemu], {"tcp": 1000 << 20})
    row = next(line for line in table.splitlines() if line.startswith("hv")).split()
    # medians 500 ms / 200 ms; 64 MiB in 0.5 s = 128 MiB/s = 13% of 1000; ratios 2.00 and 2.00
    assert row[5:13] == ["500", "200", "64.0", "2", "128", "13%", "2.00", "2.00"], row
    assert "missed" in row[-1]
    # 13% of loopback is no verdict of its own: equal times with QEMU are "ok"
    fast = Row(Case("hv", "kvm", 256, "idle", "tcp"), [Sample(250, 100, 64 << 20, 2)])
    table = format_table([fast, qemu], {"tcp": 1000 << 20})
    assert next(line for line in table.splitlines() if line.startswith("hv")).split()[-1] == "ok"


@require_tool("dd")
def test_bench_blk_prints_guest_and_dd_side_by_side() -> None:
    """``hv bench blk`` runs the blk guest through the launcher and dd in one run; the
    table has both rows and a ratio (the numbers themselves are not judged here)."""
    accel = "kvm" if kvm_unusable_reason() is None else "unicorn"
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "blk", "--sizes", "4K", "--arches", "x86_64",
                           "--accels", accel, "--repeat", "1"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["run", "bsize", "write", "MB/s", "read", "MB/s", "write/dd", "read/dd"]
    host = next(line for line in lines if line.startswith("host dd")).split()
    guest = next(line for line in lines if line.startswith(f"x86_64 {accel}")).split()
    assert host[2] == "4K" and float(host[3]) > 0 and float(host[4]) > 0
    assert guest[2] == "4K" and float(guest[3]) > 0 and float(guest[4]) > 0
    write_ratio, read_ratio = float(guest[5]), float(guest[6])
    assert abs(write_ratio - float(guest[3]) / float(host[3])) < 0.05 * write_ratio + 0.01
    assert read_ratio > 0


def test_bench_blk_rejects_bad_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "blk", "--sizes", "3K"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "block size 3K: choose from 4K, 1M" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "blk", "--arches", "riscv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown arch 'riscv'" in proc.stderr
