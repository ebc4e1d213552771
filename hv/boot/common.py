"""What every loader shares: the error type and what a load hands back to the board."""
from __future__ import annotations

from dataclasses import dataclass

from hv.errors import LoaderError
from hv.memory import GuestMemory
from hv.state import CpuState

__all__ = ["MACHINE_FOR_ARCH", "BootInfo", "LoaderError", "ram_ranges"]

MACHINE_FOR_ARCH = {"x86_64": "q35", "aarch64": "virt"}


@dataclass
class BootInfo:
    """What the machine needs after loading: the boot vCPU's initial state and where
    things were put (guest-physical ranges as ``(gpa, size)``)."""

    arch: str
    entry: int
    cpu_state: CpuState
    segments: tuple[tuple[int, int], ...]
    boot_data: tuple[int, int]  # multiboot info area / zero page / start_info (x86_64) or the FDT (aarch64)
    format: str = ""             # "multiboot", "bzimage", "pvh", "arm64-image" or "elf"


def ram_ranges(memory: GuestMemory) -> list[tuple[int, int]]:
    """Guest RAM as sorted ``(gpa, size)`` pairs."""
    return sorted((r.gpa, r.size) for r in memory.regions)
