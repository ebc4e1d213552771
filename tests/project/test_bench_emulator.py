"""Smoke test of ``hv bench emulator``: the dirty guest's smallest run on hv end to end
(not timed), QEMU looked for in an empty directory so the skip line is checked too; the
table's rows and columns are checked, never the numbers."""
from __future__ import annotations

import json
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
    assert lines[2].split() == ["arch", "engine", "accel", "passes", "boot", "s", "run", "s", "pass1", "s",
                                "passes/s", "boot/Q", "run/Q", "output"]
    for arch in ("x86_64", "aarch64"):
        cells = next(line for line in lines if line.startswith(f"{arch} ")).split()
        assert cells[1:4] == ["hv", "unicorn", "2"], cells
        boot_s, run_s, first_s, rate = float(cells[4]), float(cells[5]), float(cells[6]), float(cells[7])
        assert boot_s > 0 and 0 < first_s <= run_s and rate > 0
        assert cells[8:] == ["-", "-", "-"], cells      # no QEMU: no ratios, no comparison
    assert not any(" qemu " in line for line in lines) and not any(line.startswith("goal") for line in lines)
    assert any(line.startswith("hv's unicorn rows ran on ") and "libunicorn" in line for line in lines)
    # the host memory the runs touch (RAM 128 MiB + 64) was backed before each of them
    assert any(line.startswith("before every run (hv and QEMU alike) 192 MiB were touched and freed")
               for line in lines), proc.stdout


def test_ratios_goal_and_output_comparison() -> None:
    settings = EmuSettings(mib=1, passes=2, timeout=10, qemu={})
    same = ("pass 1 sum 0000000000000001 bad 0", "pass 2 sum 0000000000000002 bad 0")
    rows = [EmuRow(EmuCase("x86_64", "hv", "unicorn"), [EmuSample(1.0, 3.0, same, 0.5, 0.25),
                                                         EmuSample(1.0, 4.0, same, 0.75, 1.25)]),
            EmuRow(EmuCase("x86_64", "qemu", "tcg"), [EmuSample(0.5, 2.0, same, 0.25, 2.0)]),
            EmuRow(EmuCase("x86_64", "hv", "kvm"), [EmuSample(1.0, 1.0, same[:1] + ("pass 2 sum 0 bad 3",))]),
            EmuRow(EmuCase("x86_64", "qemu", "kvm"), [EmuSample(2.0, 0.5, same)])]
    table = format_table(rows, settings)
    hv_unicorn = next(line for line in table.splitlines() if line.startswith("x86_64  hv      unicorn")).split()
    assert hv_unicorn[4:] == ["1.00", "3.500", "0.625", "0.6", "2.00", "1.75", "same"]   # medians of 2 runs
    hv_kvm = next(line for line in table.splitlines() if line.startswith("x86_64  hv      kvm")).split()
    assert hv_kvm[8:] == ["0.50", "2.00", "bad"]      # against QEMU KVM, not TCG
    assert "goal x86_64 hv unicorn / QEMU tcg run time <= 1.5: 1.75 missed" in table
    # the warm-up's times are pooled over every run that had one (0.25, 1.25, 2.0; kvm rows: none)
    assert table.splitlines()[-1] == ("before every run (hv and QEMU alike) 192 MiB were touched and freed so the "
                                      "run starts on memory the host has backed (median 1.25 s, max 2.00 s)")
    assert "--no-warm" in format_table(rows, EmuSettings(mib=1, passes=2, timeout=10, qemu={}, warm=False))


def test_back_host_memory_touches_and_frees() -> None:
    """The warm-up maps, populates and unmaps, in a fresh process (so no earlier peak hides
    it): the peak RSS rises by at least the size (the pages were really touched) and the RSS
    afterwards is back near where it was (freed)."""
    child = ("import json; from hv.bench.common import back_host_memory\n"
             "def kib(f):\n"
             "    return int(next(l for l in open('/proc/self/status') if l.startswith(f)).split()[1])\n"
             "before = kib('VmRSS:'); seconds = back_host_memory(64)\n"
             "print(json.dumps([before, kib('VmHWM:'), kib('VmRSS:'), seconds]))")
    proc = subprocess.run([sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    before, peak, after, seconds = json.loads(proc.stdout)
    assert peak >= before + 60 * 1024 and after < before + 16 * 1024 and seconds >= 0


def test_bare_loop_encodes_the_sizes() -> None:
    code = bare_store_loop(64, 10)
    assert code[3:7] == (10).to_bytes(4, "little") and code[-12:-8] == (64 * 1024 * 1024 // 8).to_bytes(4, "little")
    assert code[-1:] == b"\xf4"


def test_bare_unicorn_runs_the_loop_with_hvs_library() -> None:
    """The second figure's loop really runs (a real Unicorn in its own process, 1 MiB once)
    and says which libunicorn it used: the one hv picks."""
    stores, library = bare_unicorn(EmuSettings(mib=1, passes=1, timeout=60, qemu={}), 1)
    assert stores > 0 and library == UNICORN_LIBRARY.describe()


def test_bytecode_note_only_when_every_start_compiles(tmp_path: Path) -> None:
    """The note under the boot figures appears only when hv's children compile its
    sources at every start: the variable set and no cached bytecode of the module."""
    import importlib.util

    from hv.bench.common import bytecode_note
    source = tmp_path / "pkg" / "cli.py"
    source.parent.mkdir()
    source.write_text("VALUE = 1\n")
    off = {"PYTHONDONTWRITEBYTECODE": "1"}
    note = bytecode_note(off, source)
    assert note is not None and "PYTHONDONTWRITEBYTECODE" in note and f"compileall -q {source.parent}` once" in note
    assert bytecode_note({}, source) is None                   # children write and reuse the cache
    assert bytecode_note({"PYTHONDONTWRITEBYTECODE": ""}, source) is None
    cached = Path(importlib.util.cache_from_source(str(source)))
    cached.parent.mkdir()
    cached.write_bytes(b"")                                    # compileall's file exists: no note
    assert bytecode_note(off, source) is None
