"""Smoke test of ``hv bench emulator``: the dirty guest's smallest run on hv end to end
(not timed), QEMU looked for in an empty directory so the skip line is checked too; the
table's rows and columns are checked, never the numbers."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from hv.bench.emulator import (
    EmuCase,
    EmuRow,
    EmuSample,
    EmuSettings,
    bare_store_loop,
    bare_unicorn,
    format_table,
)
from hv_backends import UNICORN_LIBRARY
from tests.helpers import ROOT


def test_bench_emulator_prints_table_and_names_missing_qemu(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "emulator", "--arches", "x86_64,aarch64",
                           "--accels", "unicorn", "--mib", "8", "--passes", "2", "--repeat", "1",
                           "--qemu-dir", str(tmp_path), "--no-bare"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[:2] == [
        "qemu-system-x86_64 not installed (apt-get install qemu-system-x86): QEMU rows skipped, hv rows only",
        "qemu-system-aarch64 not installed (apt-get install qemu-system-arm): QEMU rows skipped, hv rows only"]
    assert lines[2].split() == ["arch", "engine", "accel", "passes", "boot", "s", "run", "s", "passes/s", "boot/Q",
                                "run/Q", "output"]
    for arch in ("x86_64", "aarch64"):
        cells = next(line for line in lines if line.startswith(f"{arch} ")).split()
        assert cells[1:4] == ["hv", "unicorn", "2"], cells
        boot_s, run_s, rate = float(cells[4]), float(cells[5]), float(cells[6])
        assert boot_s > 0 and run_s > 0 and rate > 0
        assert cells[7:] == ["-", "-", "-"], cells      # no QEMU: no ratios, no comparison
    assert not any(" qemu " in line for line in lines) and not any(line.startswith("goal") for line in lines)
    assert any(line.startswith("hv's unicorn rows ran on ") and "libunicorn" in line for line in lines)


def test_ratios_goal_and_output_comparison() -> None:
    settings = EmuSettings(mib=1, passes=2, timeout=10, qemu={})
    same = ("pass 1 sum 0000000000000001 bad 0", "pass 2 sum 0000000000000002 bad 0")
    rows = [EmuRow(EmuCase("x86_64", "hv", "unicorn"), [EmuSample(1.0, 3.0, same), EmuSample(1.0, 4.0, same)]),
            EmuRow(EmuCase("x86_64", "qemu", "tcg"), [EmuSample(0.5, 2.0, same)]),
            EmuRow(EmuCase("x86_64", "hv", "kvm"), [EmuSample(1.0, 1.0, same[:1] + ("pass 2 sum 0 bad 3",))]),
            EmuRow(EmuCase("x86_64", "qemu", "kvm"), [EmuSample(2.0, 0.5, same)])]
    table = format_table(rows, settings)
    hv_unicorn = next(line for line in table.splitlines() if line.startswith("x86_64  hv      unicorn")).split()
    assert hv_unicorn[4:] == ["1.00", "3.500", "0.6", "2.00", "1.75", "same"]   # median of 3 and 4 s
    hv_kvm = next(line for line in table.splitlines() if line.startswith("x86_64  hv      kvm")).split()
    assert hv_kvm[7:] == ["0.50", "2.00", "bad"]      # against QEMU KVM, not TCG
    assert "goal x86_64 hv unicorn / QEMU tcg run time <= 1.5: 1.75 missed" in table


def test_bare_loop_encodes_the_sizes() -> None:
    code = bare_store_loop(64, 10)
    assert code[3:7] == (10).to_bytes(4, "little") and code[-12:-8] == (64 * 1024 * 1024 // 8).to_bytes(4, "little")
    assert code[-1:] == b"\xf4"


def test_bare_unicorn_runs_the_loop_with_hvs_library() -> None:
    """The second figure's loop really runs (a real Unicorn in its own process, 1 MiB once)
    and says which libunicorn it used: the one hv picks."""
    stores, library = bare_unicorn(EmuSettings(mib=1, passes=1, timeout=60, qemu={}), 1)
    assert stores > 0 and library == UNICORN_LIBRARY.describe()
