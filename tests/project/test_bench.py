"""Smoke tests of ``hv bench migrate`` and ``hv bench blk``: one small configuration end to
end (not timed), hv side only (QEMU is looked for in an empty directory, so the skip line
is checked too); the tests check the table's rows and columns, never the numbers.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hv.bench.migrate import Case, Row, Sample, format_table, parse_size, pass_continuity
from tests.helpers import ROOT, kvm_unusable_reason, require_tool


def test_bench_migrate_prints_table(tmp_path: Path) -> None:
    """hv rows only (QEMU looked for in an empty directory): the table, its columns, the
    continuity check of the destination, and one line naming QEMU's Debian package."""
    accel = "kvm" if kvm_unusable_reason() is None else "unicorn"
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "migrate", "--sizes", "64M", "--modes", "dirty",
                           "--transports", "unix", "--accels", accel, "--repeat", "1", "--loopback-mib", "16",
                           "--timeout", "60", "--qemu-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == ("qemu-system-x86_64 not installed (apt-get install qemu-system-x86): "
                        "QEMU rows skipped, hv rows only")
    assert lines[1].split() == ["engine", "accel", "size", "mode", "link", "total", "ms", "down", "ms", "own", "down",
                                "sent", "MiB", "syncs", "MiB/s", "%", "raw", "guest", "p/s", "span", "p/s", "total/Q",
                                "down/Q", "guest/Q", "src+", "MiB", "dst+", "MiB", "mem/Q", "broken",
                                "goals"], proc.stdout
    cells = next(line for line in lines if line.startswith("hv ")).split()
    assert cells[:5] == ["hv", accel, "64M", "dirty", "unix"], cells
    total_ms, downtime_ms, sent_mib, syncs = float(cells[5]), float(cells[6]), float(cells[8]), int(cells[9])
    assert 0 < downtime_ms <= total_ms
    assert sent_mib >= 16 and syncs >= 1            # the 16 MiB buffer holds data
    assert float(cells[12]) >= 0                     # guest passes/s while migrating
    # no QEMU: no same-seconds rate and no ratios; the destination carried on
    assert cells[13:17] == ["-", "-", "-", "-"] and cells[19:21] == ["-", "0/1"]
    assert float(cells[17]) > 0 and float(cells[18]) > 0   # hv's peak RSS beyond guest RAM, src and dst
    assert re.search(rf"destination's first second after RESUME, hv {accel} 64M dirty unix: hv \d+\.\d\d of the "
                     r"guest's full speed\n", proc.stdout), proc.stdout
    assert not any(line.startswith("qemu ") for line in lines)
    assert "broken guests, hv: 0 of 1 migrations" in proc.stdout
    assert re.search(r"raw loopback .*unix \d+ MiB/s", proc.stdout)
    # the raw rate is sampled within the run, both VMs up, tight around its migration
    assert re.search(r"raw unix loopback right before the migration: \d+ MiB/s\n.*"
                     r"raw unix loopback right after the migration: \d+ MiB/s", proc.stderr, re.S), proc.stderr


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
    hv = Row(Case("hv", "kvm", 256, "dirty", "tcp"),
             [Sample(400, 100, 64 << 20, 2, 90, guest_passes=1, window_s=0.5, guest_curve=((0, 0), (0.5, 1))),
              Sample(600, 500, 64 << 20, 2, 480, guest_passes=2, window_s=0.5),
              Sample(500, 200, 64 << 20, 2, 190, guest_passes=0, window_s=0.5, broken="pass 3 found 1 bad words")])
    qemu = Row(Case("qemu", "kvm", 256, "dirty", "tcp"), [Sample(250, 100, 65 << 20, 3, 50, guest_passes=5,
                                                                 window_s=0.25, guest_curve=((0, 0), (0.25, 5)))])
    tcg = Row(Case("qemu", "tcg", 256, "dirty", "tcp"), [Sample(100, 10, 65 << 20, 3, 5, guest_passes=1,
                                                                window_s=0.1)])
    table = format_table([hv, tcg, qemu], {"tcp": 1000 << 20})
    row = next(line for line in table.splitlines() if line.startswith("hv")).split()
    # medians 500 / 200 / 190 ms; 64 MiB in 0.5 s = 128 MiB/s = 13% of 1000; guest 3 passes
    # in 1.5 s = 2.0/s over its own windows; over the same 0.25 s as QEMU KVM's (not TCG's)
    # run, 0.5 passes (2.0/s) against 5 (20/s): guest/Q 0.10; one broken guest of three
    assert row[5:21] == ["500", "200", "190", "64.0", "2", "128", "13%", "2.0", "2.0", "2.00", "2.00", "0.10",
                         "-", "-", "-", "1/3"], row   # no memory figures in these samples
    assert row[-2:] == ["down,total,guest,BROKEN", "missed"], row
    assert "broken guests, hv: 1 of 3 migrations" in table and "pass 3 found 1 bad words" in table
    # 13% of loopback is no verdict of its own: equal times with QEMU are "ok"
    fast = Row(Case("hv", "kvm", 256, "dirty", "tcp"), [Sample(250, 100, 64 << 20, 2, 90, guest_passes=5,
                                                              window_s=0.25)])
    table = format_table([fast, qemu], {"tcp": 1000 << 20})
    assert next(line for line in table.splitlines() if line.startswith("hv")).split()[-1] == "ok"


def test_tls_rows_pair_with_their_plain_twin_for_both_engines() -> None:
    rows = [Row(Case(engine, accel, 64, "idle", "unix", tls), [Sample(100, 5, rate << 20, 1)])
            for engine, accel in (("hv", "unicorn"), ("qemu", "tcg")) for tls, rate in ((False, 20), (True, 10))]
    lines = [line for line in format_table(rows, {}).splitlines() if line.startswith("tls/plain")]
    assert lines == ["tls/plain hv unicorn 64M idle unix: 100 vs 200 MiB/s (0.50)",
                     "tls/plain qemu tcg 64M idle unix: 100 vs 200 MiB/s (0.50)"]


@require_tool("dd")
def test_bench_blk_prints_guest_and_dd_side_by_side(tmp_path: Path) -> None:
    """``hv bench blk`` runs the blk guest through the launcher and dd in one run; the
    table has both rows and a ratio (the numbers themselves are not judged here); QEMU,
    looked for in an empty directory, is named with its package and skipped."""
    accel = "kvm" if kvm_unusable_reason() is None else "unicorn"
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "blk", "--sizes", "4K", "--arches", "x86_64",
                           "--accels", accel, "--repeat", "1", "--qemu-dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0] == ("qemu-system-x86_64 not installed (apt-get install qemu-system-x86): "
                        "QEMU rows skipped, hv rows only")
    assert lines[1].split() == ["run", "bsize", "write", "MB/s", "read", "MB/s", "write/dd", "read/dd", "write/Q",
                                "read/Q", "output"]
    host = next(line for line in lines if line.startswith("host dd")).split()
    guest = next(line for line in lines if line.startswith(f"x86_64 hv {accel}")).split()
    assert host[2] == "4K" and float(host[3]) > 0 and float(host[4]) > 0
    assert guest[3] == "4K" and float(guest[4]) > 0 and float(guest[5]) > 0
    write_ratio, read_ratio = float(guest[6]), float(guest[7])
    assert abs(write_ratio - float(guest[4]) / float(host[3])) < 0.05 * write_ratio + 0.01
    assert read_ratio > 0
    assert guest[8:] == ["-", "-", "msix"], guest      # no QEMU ratios; the guest took MSI-X
    assert not any(" qemu " in line for line in lines[1:])


def test_bench_blk_rejects_bad_options() -> None:
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "blk", "--sizes", "3K"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "block size 3K: choose from 4K, 1M" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "blk", "--arches", "riscv"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown arch 'riscv'" in proc.stderr


def test_continuity_joins_a_line_split_by_the_switch_over() -> None:
    """QEMU's source stopped in the middle of printing pass 2 (seen once in a real run): the
    line ends on the destination, which is continuity, not a broken guest."""
    line = "pass {} sum 00000000000000{:02x} bad {}\n"
    source = line.format(1, 1, 0) + "pass 2 sum 0000"
    assert pass_continuity(source, "") is None                       # the destination has no pass yet
    assert pass_continuity(source, "000000000002 bad 0\n") is None      # only the rest of the split line
    assert pass_continuity(source, "000000000002 bad 0\n" + line.format(3, 3, 0)) == ""
    assert pass_continuity(line.format(1, 1, 0), line.format(2, 2, 0)) == ""
    assert "not consecutive" in str(pass_continuity(line.format(1, 1, 0), line.format(3, 3, 0)))
    assert "not consecutive" in str(pass_continuity(line.format(1, 1, 0) + line.format(2, 2, 0),
                                                    line.format(2, 2, 0)))
    assert pass_continuity(line.format(1, 1, 0), line.format(2, 2, 7)) == "pass 2 found 7 bad words: RAM was corrupted"
