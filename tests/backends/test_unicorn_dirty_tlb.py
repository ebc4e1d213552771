"""Unicorn dirty log: no guest write is lost between a take of the bitmap and the copy.

hv's libunicorn logs dirty pages in the TLB, as QEMU TCG does (TLB_NOTDIRTY on pages
whose bit is clear; the first store sets the bit and makes the entry writable; each take
clears the bitmap and flushes every engine's TLB before the caller copies). The wheel's
library logs with a memory-write hook. Either way, a pre-copy by hand -- full copy, then
rounds of take + copy of the reported pages while the guest rewrites its buffer nonstop,
then pause and a last round -- must leave a copy equal to guest RAM byte for byte. The
guests are the ``dirty`` fixture (one vCPU) and the ``smp`` fixture (the same workload on
two vCPU threads, each engine with its own TLB), on x86_64 and aarch64.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hv.config import parse_args
from hv.console import BufferSink
from hv.machine import Machine
from hv.migration.engine import merge_bitmaps
from hv_backends import backend_class
from tests.helpers import FIXTURES, copy_dirty_pages, stale_pages

ROOT = Path(__file__).resolve().parents[2]
ROUNDS = 30
GUESTS = {
    "x86_64-dirty": ("q35", "x86_64", "dirty.elf", 1),
    "aarch64-dirty": ("virt", "aarch64", "dirty.elf", 1),
    "x86_64-smp2": ("q35", "x86_64", "smp.elf", 2),
    "aarch64-smp2": ("virt", "aarch64", "smp.elf", 2),
}


def precopy(name: str) -> dict[str, object]:
    """Run the pre-copy rounds on guest ``name``; what the test checks."""
    machine_type, arch, kernel, cpus = GUESTS[name]
    args = ["-machine", machine_type, "-m", "64", "-smp", str(cpus),
            "-kernel", str(FIXTURES / arch / kernel), "-append", f"mib=4 cpus={cpus}"]
    config = parse_args(args).config
    console = BufferSink()
    machine = Machine(config, backend_class("unicorn")(), console)
    try:
        machine.load_kernel(config.kernel.read_bytes())
        machine.start()
        assert console.wait_for(b"pass 1 ", 120), console.getvalue()[-300:]
        vm, memory = machine.vm, machine.memory
        assert len(memory.regions) == 1
        ram = memory.regions[0].view
        vm.start_dirty_log()
        memory.take_vmm_dirty()
        copy = bytearray(ram)
        lines_before = console.getvalue().count(b"\n")
        copied = 0
        for _ in range(ROUNDS):
            time.sleep(0.02)
            copied += copy_dirty_pages(merge_bitmaps(vm.take_dirty(), memory.take_vmm_dirty()), ram, copy)
        tlb = [bool(v._tlb_logging) for v in vm.vcpus]  # type: ignore[attr-defined]
        assert machine.pause()
        copy_dirty_pages(merge_bitmaps(vm.take_dirty(), memory.take_vmm_dirty()), ram, copy)
        vm.stop_dirty_log()
        stale = stale_pages(copy, ram)
        return {"copied": copied, "stale": stale[:5], "nstale": len(stale), "tlb": tlb,
                "lines": console.getvalue().count(b"\n") - lines_before, "vcpus": len(vm.vcpus)}
    finally:
        machine.close()


def _check(result: dict[str, object], cpus: int) -> None:
    assert result["vcpus"] == cpus
    assert result["copied"], "the guest wrote nothing while the log was taken"
    assert result["nstale"] == 0, f"{result['nstale']} pages lost, first {result['stale']}"


@pytest.mark.parametrize("name", sorted(GUESTS))
def test_pages_written_during_takes_reach_the_copy(name: str) -> None:
    from hv_backends.unicorn_common import tlb_dirty_log_supported

    result = precopy(name)
    _check(result, GUESTS[name][3])
    # hv's libunicorn logs in the TLB on every vCPU; the wheel's with the write hook
    assert result["tlb"] == [tlb_dirty_log_supported()] * GUESTS[name][3]


@pytest.mark.parametrize("name", ["x86_64-dirty", "aarch64-smp2"])
def test_write_hook_fallback_loses_nothing(name: str) -> None:
    """The wheel's library (HV_UNICORN_STOCK=1: no TLB dirty log), in a child process
    because the binding picks its library once per process."""
    env = dict(os.environ, HV_UNICORN_STOCK="1", PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), name], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["tlb"] == [False] * GUESTS[name][3]
    _check(result, GUESTS[name][3])


if __name__ == "__main__":
    print(json.dumps(precopy(sys.argv[1])))
