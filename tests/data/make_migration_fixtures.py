"""Regenerate the recorded migration streams of format 1.0 (run once; output committed).

    python tests/data/make_migration_fixtures.py

The files are the future-compatibility guard: tests/migration/test_migration_stream.py checks that
the current reader still accepts them and finds exactly the contents written here. Do
not regenerate them when the format changes; add a new fixture for the new version.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from hv.migration.stream import (  # noqa: E402
    PAGE_SIZE, DeviceFingerprint, Fingerprint, StreamWriter,
)
from hv.state import Arm64CpuState, Segment, X86CpuState  # noqa: E402

HERE = Path(__file__).resolve().parent
PAGES = 16


class Collect:
    def __init__(self) -> None:
        self.data = bytearray()

    def write(self, chunk: bytes | memoryview) -> None:
        self.data += chunk


def ram_image() -> bytearray:
    ram = bytearray(PAGES * PAGE_SIZE)
    ram[0:PAGE_SIZE] = bytes(range(256)) * (PAGE_SIZE // 256)
    ram[3 * PAGE_SIZE:4 * PAGE_SIZE] = b"\xaa" * PAGE_SIZE
    ram[7 * PAGE_SIZE:7 * PAGE_SIZE + 16] = b"hv stream fixtur"
    return ram


def cpu_state(arch: str) -> X86CpuState | Arm64CpuState:
    if arch == "x86_64":
        state = X86CpuState(rax=0x1122334455667788, rsp=0x7000, rip=0x100010, rflags=0x202,
                            cr0=0x80000011, cr3=0x1000, cr4=0x20, efer=0x500, tsc=123456789)
        state.cs = Segment.flat32_code(0x8)
        return state
    state = Arm64CpuState(pc=0x40080000, sp_el1=0x40100000, cntvct=987654321)
    state.x[0] = 0x44
    state.v[1] = (1 << 127) | 5
    return state


def build(arch: str) -> bytes:
    machine = "q35" if arch == "x86_64" else "virt"
    blk = "virtio-blk-pci" if arch == "x86_64" else "virtio-blk-device"
    fp = Fingerprint(arch, machine, 1, PAGES * PAGE_SIZE, (
        DeviceFingerprint(blk, "rootfs", "pcie.0" if arch == "x86_64" else "sysbus", "0x1",
                          {"serial": "fixture-serial"}),))
    out = Collect()
    writer = StreamWriter(out)
    writer.write_header(arch, machine, stream_id=f"fixture-{arch}-v1.0", hv_version="0.1.0")
    writer.write_config(fp)
    ram = ram_image()
    writer.write_ram(0, memoryview(ram))
    writer.write_round_end(1)
    ram[3 * PAGE_SIZE:4 * PAGE_SIZE] = b"\x55" * PAGE_SIZE  # dirtied during pass 1
    ram[0:PAGE_SIZE] = bytes(PAGE_SIZE)  # and page 0 became zero
    writer.write_ram(3, memoryview(ram)[3 * PAGE_SIZE:4 * PAGE_SIZE])
    writer.write_ram(0, memoryview(ram)[0:PAGE_SIZE])
    writer.write_round_end(2)
    writer.write_cpu(0, cpu_state(arch))
    writer.write_device("serial", "serial0", 1, {"ier": 1, "lcr": 3, "fifo": "68690a"})
    writer.write_device(blk, "rootfs", 2, b"\x01\x02\x03\x04")
    writer.write_end()
    return bytes(out.data)


def main() -> None:
    for arch in ("x86_64", "aarch64"):
        path = HERE / f"migration-stream-v1.0-{arch}.bin"
        path.write_bytes(build(arch))
        print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
