"""The one interface every CPU backend implements.

A backend executes guest instructions and reports why it stopped; it knows no device.
Port I/O and MMIO are forwarded synchronously to an :class:`IoHandler` that the machine
passes to :meth:`Vcpu.run` (the machine's buses), and completed by the backend before the
guest continues. All guest-observable state lives in hv: RAM in
:class:`hv.memory.GuestMemory` (mapped, not copied, by the backend) and vCPU registers in
the canonical :mod:`hv.state` form.
"""
from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Protocol

from hv.memory import GuestMemory
from hv.state import CpuState


class Arch(str, enum.Enum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class BackendError(RuntimeError):
    """The backend failed (ioctl error, engine error, unsupported operation)."""


class BackendUnavailable(BackendError):
    """The backend cannot run guests of this architecture on this host."""


class IoHandler(Protocol):
    """The machine's buses as seen by a vCPU. Values are unsigned, ``size`` in bytes."""

    def pio_read(self, port: int, size: int) -> int: ...

    def pio_write(self, port: int, size: int, value: int) -> None: ...

    def mmio_read(self, addr: int, size: int) -> int: ...

    def mmio_write(self, addr: int, size: int, value: int) -> None: ...


class ExitReason(enum.Enum):
    HALT = "halt"                  # HLT / WFI: wait for an interrupt (or a kick)
    KICKED = "kicked"              # Vcpu.kick() was honoured at an architectural point
    SYSTEM_OFF = "system-off"      # PSCI SYSTEM_OFF (aarch64)
    SYSTEM_RESET = "system-reset"  # PSCI SYSTEM_RESET, or triple fault on x86
    ERROR = "error"                # internal/emulation error; detail says what
    CPU_OFF = "cpu-off"            # PSCI CPU_OFF: this vCPU powered itself off (aarch64)


@dataclass(frozen=True)
class Exit:
    reason: ExitReason
    detail: str = ""


class Vcpu(ABC):
    """One virtual CPU. ``run`` is called from a single vCPU thread; ``kick`` from any."""

    index: int

    @abstractmethod
    def run(self, io: IoHandler) -> Exit:
        """Run the guest until it halts, powers off, errs or is kicked.

        I/O is dispatched to ``io`` and completed inside this call. When it returns the
        vCPU is at an architectural point: no instruction and no device access is half
        done, so :meth:`get_state` is exact.
        """

    @abstractmethod
    def kick(self) -> None:
        """Make the current (or the next) :meth:`run` return ``KICKED`` promptly.

        Thread-safe. A kick that arrives while no ``run`` is in progress is remembered
        and consumed by the next ``run``, which then returns without executing.
        """

    @abstractmethod
    def get_state(self) -> CpuState:
        """The canonical state. Only valid while the vCPU is not inside :meth:`run`."""

    @abstractmethod
    def set_state(self, state: CpuState) -> None:
        """Load a canonical state (from this or any other backend)."""


class Vm(ABC):
    """A virtual machine: guest RAM mapped into the backend, and its vCPUs."""

    arch: Arch
    memory: GuestMemory

    @abstractmethod
    def create_vcpu(self, index: int) -> Vcpu: ...

    @abstractmethod
    def start_dirty_log(self) -> None:
        """Start recording guest writes to RAM; clears any earlier record."""

    @abstractmethod
    def take_dirty(self) -> bytearray:
        """Return and clear the bitmap of pages the guest wrote since the last call.

        Bitmap in RAM offset space (see :mod:`hv.memory`). Does not include VMM-made
        writes: callers OR in ``memory.take_vmm_dirty()``.
        """

    @abstractmethod
    def stop_dirty_log(self) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Release the VM (vCPUs must not be running). RAM stays owned by hv."""


class Backend(ABC):
    """A factory of VMs for one accelerator."""

    name: str

    @classmethod
    @abstractmethod
    def probe(cls, arch: Arch) -> str | None:
        """None if this backend can run ``arch`` guests here, else why not (one line)."""

    @abstractmethod
    def open_vm(self, arch: Arch, memory: GuestMemory, mmio_windows: list[tuple[int, int]]) -> Vm:
        """Map ``memory`` as guest RAM. ``mmio_windows`` lists (gpa, size) ranges whose
        accesses go to ``IoHandler.mmio_*`` (KVM needs no list: any non-RAM access exits;
        Unicorn maps them with ``mmio_map``)."""
