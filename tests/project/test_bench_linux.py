"""``hv bench linux``: the Debian guest booted and migrated by real hv processes, end to end
(not timed), plus the parts of the report that decide what a broken guest is.

The end-to-end test runs the aarch64 guest once on hv only (``--no-qemu``), so it needs no
QEMU; it skips when the Linux images cannot be built here (tests/linux_images.py).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hv.bench.linux import (
    BROKEN_RE,
    MigrationRow,
    MigrationSample,
    find_qemu,
    format_migration,
)
from tests.helpers import ROOT
from tests.linux_images import linux_images


def test_bench_linux_boots_and_migrates_on_hv(tmp_path: Path) -> None:
    images = linux_images("aarch64")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "linux", "--repeat", "1", "--arches", "aarch64",
                           "--no-qemu", "--passes", "1", "--images", str(images.directory.parent),
                           "--timeout", "240", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    rows = [line.split() for line in lines if line.startswith("aarch64  hv ")]
    boot = next(cells for cells in rows if len(cells) == 8)             # the boot table's row
    assert boot[:3] == ["aarch64", "hv", "unicorn"], boot
    init_s, pass_s = float(boot[3]), float(boot[4])
    assert 0 < init_s < pass_s and boot[-1] == "1/1", boot    # /init comes before the workload's first pass
    migration = next(cells for cells in rows if len(cells) == 11)       # the migration table's row
    assert migration[3] == "unix", migration
    total_ms, down_ms = float(migration[4]), float(migration[5])
    assert 0 < down_ms <= total_ms, migration
    assert migration[-2:] == ["1/1", "1/1"], migration                  # survived, runs
    assert "broken guests, hv: 0 of 1 migrations" in proc.stdout
    assert not any(line.startswith("aarch64  qemu") for line in lines)
    saved = json.loads(out.read_text())
    assert saved["boot"][0]["samples"][0]["Run /init"] == pytest.approx(init_s, abs=0.01)
    assert saved["migration"][0]["samples"][0]["survived"] is True


def test_missing_images_name_the_build_command(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", "linux", "--arches", "aarch64",
                           "--images", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 2
    assert "build_images.py --arch aarch64" in proc.stderr and "Traceback" not in proc.stderr


def test_absent_qemu_is_a_line_not_a_crash(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))             # an empty directory: no QEMU on this PATH
    found, missing = find_qemu(["x86_64", "aarch64"], disabled=False)
    assert found == {}
    assert missing == ["qemu-system-x86_64 not installed (apt-get install qemu-system-x86): hv rows only",
                       "qemu-system-aarch64 not installed (apt-get install qemu-system-arm): hv rows only"]
    assert find_qemu(["x86_64"], disabled=True) == ({}, [])


# The start of a real QEMU (TCG) x86_64 destination's console after a migration broke its guest.
QEMU_BROKEN = """[   11.296125] list_del corruption, ffffea00001bb908->next is NULL
[   11.298904] kernel BUG at lib/list_debug.c:49!
[   11.299706] invalid opcode: 0000 [#1] PREEMPT SMP NOPTI
"""


@pytest.mark.parametrize("text", [QEMU_BROKEN, "wl: pass 4 BAD mem word 12", "[ 1.0] Kernel panic - not syncing",
                                  "wl[112]: segfault at 0 ip 0", "[ 2.0] Internal error: Oops: 96000004 [#1] SMP",
                                  "hv-init: workload exited with status 1"])
def test_broken_guest_text(text: str) -> None:
    assert BROKEN_RE.search(text)


def test_healthy_console_is_not_broken() -> None:
    healthy = ("[    0.000000] Booting Linux on physical CPU 0x0000000000 [0x411fd070]\n"
               "[    1.0] Run /init as init process\nhv-init: ready: 6.1.0-50-arm64 aarch64\n"
               "wl: start mem 16 MiB file 1 MiB passes 0 path /data/wl.bin\nwl: pass 1 ok mem 16 MiB file 1 MiB\n")
    assert BROKEN_RE.search(healthy) is None


def test_migration_table_counts_broken_guests() -> None:
    hv = MigrationRow("x86_64", "hv", "unix", [MigrationSample(1000, 10, 12, True, "passes 2 -> 3"),
                                               MigrationSample(3000, 30, 31, True, "passes 2 -> 3")])
    qemu = MigrationRow("x86_64", "qemu", "unix", [MigrationSample(4000, 20, 20, False, "broken: 'kernel BUG'")],
                        errors=["migration failed: 'x'"])
    lines = format_migration([hv, qemu])
    row = next(line for line in lines if line.startswith("x86_64  hv")).split()
    # medians 2000 / 20 ms; against QEMU's 4000 / 20: 0.50 and 1.00
    assert row[4:] == ["2000", "20", "22", "0.50", "1.00", "2/2", "2/2"], row
    assert next(line for line in lines if line.startswith("x86_64  qemu")).split()[-2:] == ["0/1", "1/2"]
    assert "broken guests, hv: 0 of 2 migrations" in lines
    assert "broken guests, qemu: 1 of 1 migrations" in lines
    assert "  x86_64 unix: broken: 'kernel BUG'" in lines
