"""Measure a guest's progress while hv's Unicorn backend logs dirty pages.

Not a test (its numbers depend on the machine and its load): ``python
backends/native/unicorn/measure_dirty.py x86_64|aarch64 [seconds]``; with
``LIBUNICORN_PATH=DIR`` (a library without ``hv_uc_dirty_log``) or ``HV_UNICORN_STOCK=1``
it measures the write-hook path instead. The ``dirty`` fixture (64 MiB buffer, 256 MiB RAM)
runs for ``seconds`` with the log off, then as long with the log on and the bitmap taken
every 0.2 s (as pre-copy rounds take it); the line printed gives both rates in passes/s.
"""
from __future__ import annotations

import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def passes_per_second(arch: str, seconds: float) -> tuple[float, float, bool]:
    """(rate with the log off, rate with it on, whether the TLB log was used)."""
    from hv.config import parse_args  # noqa: PLC0415 - after the library choice (env)
    from hv.console import BufferSink  # noqa: PLC0415
    from hv.machine import Machine  # noqa: PLC0415
    from hv_backends import backend_class  # noqa: PLC0415
    from hv_backends.unicorn_common import tlb_dirty_log_supported  # noqa: PLC0415

    machine_type = "q35" if arch == "x86_64" else "virt"
    kernel = ROOT / "fixtures" / arch / "dirty.elf"
    config = parse_args(["-machine", machine_type, "-m", "256", "-kernel", str(kernel),
                         "-append", "mib=64"]).config
    if config is None or config.kernel is None:
        raise RuntimeError("the command line gave no machine configuration")
    kernel_bytes = config.kernel.read_bytes()
    console = BufferSink()
    machine = Machine(config, backend_class("unicorn")(), console)

    def count() -> int:
        return len(re.findall(rb"pass \d+ ", console.getvalue()))

    try:
        machine.load_kernel(kernel_bytes)
        machine.start()
        if not console.wait_for(b"pass 1 ", 120):
            raise RuntimeError("the dirty guest printed no pass within 120 s")
        first, start = count(), time.monotonic()
        time.sleep(seconds)
        off = (count() - first) / (time.monotonic() - start)
        machine.vm.start_dirty_log()
        first, start = count(), time.monotonic()
        while time.monotonic() - start < seconds:
            time.sleep(0.2)
            machine.vm.take_dirty()
        on = (count() - first) / (time.monotonic() - start)
        machine.vm.stop_dirty_log()
        return off, on, tlb_dirty_log_supported()
    finally:
        machine.close()


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("x86_64", "aarch64"):
        print("usage: measure_dirty.py x86_64|aarch64 [seconds]", file=sys.stderr)
        return 2
    sys.path.insert(0, str(ROOT))
    seconds = float(sys.argv[2]) if len(sys.argv) > 2 else 8.0
    off, on, tlb = passes_per_second(sys.argv[1], seconds)
    print(f"{sys.argv[1]}: {'TLB dirty log' if tlb else 'write hook'}: log off {off:.2f} passes/s, "
          f"log on {on:.2f} passes/s (ratio {on / max(off, 1e-9):.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
