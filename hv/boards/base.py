"""What a board is to the machine: the :class:`Board` protocol and what it wires into.

A board (``hv/boards/q35/board.py``, ``hv/boards/virt/board.py``) knows which devices its
machine type has and how they are wired: RAM regions, the interrupt controller, the
board's own devices and their bus addresses, the PCI host's interrupt routing, what each
vCPU needs from the machine, and how firmware prepares RAM for boot. The machine
(:class:`hv.machine.machine.Machine`) owns the parts (buses, device list, run state,
vCPUs) and hands them to the board in a :class:`BoardContext`; it never asks which board
it has.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from hv.boot import BootInfo
from hv.config import VmConfig
from hv.devices.bus import Bus
from hv.devices.interfaces import OutputSink
from hv.machine.device_manager import DeviceManager
from hv.machine.gic_interrupts import GicController
from hv.machine.interrupts import InterruptController
from hv.machine.power import GuestPowerRequests, VcpuPower
from hv.machine.runstate import RunStateTracker
from hv.memory import GuestMemory, RegionSpec
from hv_backends.base import Arch, Vcpu

Interrupts = InterruptController | GicController


@dataclass
class BoardContext:
    """The machine's parts a board builds on.

    ``kick(index)`` makes vCPU ``index`` leave the guest; ``guest`` carries a guest's
    power-off and reset requests to the machine; ``reset(reason)`` resets the machine
    (the 8042's reset line).
    """

    config: VmConfig
    memory: GuestMemory
    console: OutputSink
    pio: Bus
    mmio: Bus
    devices: DeviceManager
    run: RunStateTracker
    kick: Callable[[int], None]
    guest: GuestPowerRequests
    reset: Callable[[str], None]


@dataclass
class BoardWiring:
    """What building a board produced: its interrupt controller, and the guest-physical
    windows a backend without exits for unmapped addresses (Unicorn) must route to the
    machine's MMIO bus."""

    interrupts: Interrupts
    mmio_windows: list[tuple[int, int]] = field(default_factory=list)


class Board(Protocol):
    """One machine type."""

    name: str      # the -machine name: "q35", "virt"
    arch: Arch

    def ram_regions(self, config: VmConfig) -> list[RegionSpec]:
        """Where guest RAM of ``config.memory_bytes`` goes."""

    def build(self, ctx: BoardContext) -> BoardWiring:
        """Create the interrupt controller and every device, on ``ctx``'s buses and in its
        device list (board devices first, then the PCI host), and route PCI interrupts."""

    def attach_vcpus(self, vcpus: Sequence[Vcpu], power: VcpuPower) -> None:
        """Connect the created vCPUs to what serves them (system registers, PSCI, INIT/SIPI).
        Raises ``BackendError`` if the backend cannot serve this board."""

    def setup_boot(self, memory: GuestMemory, config: VmConfig, image: bytes,
                   initrd: bytes | None = None) -> BootInfo:
        """Load the kernel and the firmware data (ACPI tables / device tree); the boot
        vCPU's state is ``BootInfo.cpu_state``."""
