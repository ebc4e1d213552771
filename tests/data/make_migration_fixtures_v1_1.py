"""Record the migration streams of format 1.1 (run once; output committed).

    python tests/data/make_migration_fixtures_v1_1.py

What 1.1 added over 1.0 (see docs/migration-stream.md): per-vCPU power states. Two
vCPUs, vCPU 1 not started (aarch64: off; x86_64: waiting for SIPI). Do not regenerate
these files when the format changes; add a fixture for the new version.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from hv.migration.stream import PAGE_SIZE, DeviceFingerprint, Fingerprint, StreamWriter  # noqa: E402
from hv.state import POWER_OFF, POWER_WAIT_SIPI, Arm64CpuState, Segment, X86CpuState  # noqa: E402

from tests.data.make_migration_fixtures import HERE, PAGES, Collect  # noqa: E402


def cpu_states(arch: str) -> list[X86CpuState | Arm64CpuState]:
    if arch == "x86_64":
        bsp = X86CpuState(rax=0x1111, rip=0x100010, rflags=0x202, cr0=0x80000011, cr3=0x1000, cr4=0x20,
                          efer=0x500, tsc=5555)
        bsp.cs = Segment.flat32_code(0x8)
        return [bsp, X86CpuState(power=POWER_WAIT_SIPI)]
    bsp = Arm64CpuState(pc=0x40080000, cntvct=777)
    bsp.x[0] = 0x4411
    return [bsp, Arm64CpuState(power=POWER_OFF)]


def build(arch: str) -> bytes:
    machine = "q35" if arch == "x86_64" else "virt"
    fp = Fingerprint(arch, machine, 2, PAGES * PAGE_SIZE, (
        DeviceFingerprint("pcie-root-port", "pcie.1", "pcie.0", "01.0", {"port": "1"}),))
    out = Collect()
    writer = StreamWriter(out)
    writer.write_header(arch, machine, stream_id=f"fixture-{arch}-v1.1", hv_version="0.2.0")
    writer.write_config(fp)
    ram = bytearray(PAGES * PAGE_SIZE)
    ram[5 * PAGE_SIZE:5 * PAGE_SIZE + 16] = b"hv stream v1.1!!"
    writer.write_ram(0, memoryview(ram))
    writer.write_round_end(1)
    for index, state in enumerate(cpu_states(arch)):
        writer.write_cpu(index, state)
    writer.write_end()
    return bytes(out.data)


def main() -> None:
    for arch in ("x86_64", "aarch64"):
        path = HERE / f"migration-stream-v1.1-{arch}.bin"
        path.write_bytes(build(arch))
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
