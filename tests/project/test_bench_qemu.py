"""``hv bench`` beside QEMU, where QEMU is installed (skipped otherwise, naming the Debian
package): the smallest run of each subcommand must produce QEMU's like-for-like rows, the
hv/QEMU ratios, and -- the point of running the same ELF on both -- the same guest output.
Nothing here judges a number."""
from __future__ import annotations

import subprocess
import sys

from tests.helpers import ROOT, require_tool


def bench(*args: str) -> list[str]:
    proc = subprocess.run([sys.executable, "-m", "hv", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout.splitlines()


@require_tool("qemu-system-x86_64", "qemu-system-aarch64")
def test_emulator_pairs_unicorn_with_tcg_and_outputs_match() -> None:
    lines = bench("emulator", "--accels", "unicorn", "--mib", "1", "--passes", "2", "--repeat", "1", "--no-bare")
    for arch in ("x86_64", "aarch64"):
        hv = next(line for line in lines if line.startswith(f"{arch} ") and " hv " in line).split()
        qemu = next(line for line in lines if line.startswith(f"{arch} ") and " qemu " in line).split()
        assert qemu[1:4] == ["qemu", "tcg", "2"], qemu
        assert float(hv[8]) > 0 and float(hv[9]) > 0 and hv[10] == "same", hv   # boot/Q, run/Q, output
        assert any(line.startswith(f"goal {arch} hv unicorn / QEMU tcg run time <= 1.5: ") for line in lines)


@require_tool("qemu-system-x86_64", "dd")
def test_blk_runs_the_same_elf_on_qemus_virtio_blk() -> None:
    lines = bench("blk", "--sizes", "4K", "--arches", "x86_64", "--accels", "unicorn", "--repeat", "1")
    hv = next(line for line in lines if line.startswith("x86_64 hv unicorn")).split()
    qemu = next(line for line in lines if line.startswith("x86_64 qemu tcg")).split()
    assert float(qemu[4]) > 0 and float(qemu[5]) > 0, qemu
    assert float(hv[8]) > 0 and float(hv[9]) > 0, hv
    assert hv[10:] == ["same", "(msix;", "QEMU", "msix)"], hv


@require_tool("qemu-system-x86_64")
def test_migrate_pairs_unicorn_with_tcg_and_checks_both_destinations() -> None:
    lines = bench("migrate", "--sizes", "64M", "--modes", "dirty", "--transports", "unix", "--accels", "unicorn",
                  "--repeat", "1", "--loopback-mib", "16", "--timeout", "60")
    hv = next(line for line in lines if line.startswith("hv ")).split()
    qemu = next(line for line in lines if line.startswith("qemu ")).split()
    assert qemu[:5] == ["qemu", "tcg", "64M", "dirty", "unix"], qemu
    assert float(qemu[6]) > 0 and qemu[20] == "0/1", qemu      # STOP -> RESUME measured; guest carried on
    assert all(float(cell) >= 0 for cell in hv[14:16]), hv     # total/Q, down/Q
    assert float(qemu[17]) > 0 and float(hv[19]) > 0, hv       # QEMU's src+ MiB; hv's mem/Q
    assert "broken guests, qemu: 0 of 1 migrations" in lines
