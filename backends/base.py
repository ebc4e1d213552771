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
from typing import TYPE_CHECKING, ClassVar, Protocol

from hv.errors import HvError
from hv.memory import GuestMemory
from hv.state import CpuState

if TYPE_CHECKING:
    from hv.devices.clock import GuestClock


class Arch(str, enum.Enum):
    X86_64 = "x86_64"
    AARCH64 = "aarch64"


class BackendError(HvError, RuntimeError):
    """The backend failed (ioctl error, engine error, unsupported operation)."""


class BackendUnavailable(BackendError):
    """The backend cannot run guests of this architecture on this host."""


class IoHandler(Protocol):
    """The machine's buses as seen by a vCPU. Values are unsigned, ``size`` in bytes."""

    def pio_read(self, port: int, size: int) -> int: ...

    def pio_write(self, port: int, size: int, value: int) -> None: ...

    def mmio_read(self, addr: int, size: int) -> int: ...

    def mmio_write(self, addr: int, size: int, value: int) -> None: ...


class SysregHandler(Protocol):
    """Serves the system registers a machine owns for one aarch64 vCPU (the GIC's ICC_*,
    the generic timers' CNT*_EL0); called on that vCPU's thread inside :meth:`Vcpu.run`."""

    def read(self, name: str) -> int | None:
        """The register's value, or None when the machine does not serve ``name``."""

    def write(self, name: str, value: int) -> bool:
        """True when the machine took the write."""


class PowerHandler(Protocol):
    """The machine's PSCI power controller as an aarch64 vCPU sees it (called on the
    calling vCPU's thread inside :meth:`Vcpu.run`). Results are PSCI return codes
    (negative: errors)."""

    def cpu_on(self, target_mpidr: int, entry: int, context_id: int) -> int: ...

    def affinity_info(self, target_mpidr: int, lowest_level: int) -> int: ...


class ExitReason(enum.Enum):
    """Why :meth:`Vcpu.run` returned: the complete list of what a backend may report."""

    HALT = "halt"                  # HLT / WFI: wait for an interrupt (or a kick)
    KICKED = "kicked"              # Vcpu.kick() was honoured at an architectural point
    IRQ_WINDOW = "irq-window"      # a requested interrupt window opened (request consumed)
    SYSTEM_OFF = "system-off"      # PSCI SYSTEM_OFF (aarch64)
    SYSTEM_RESET = "system-reset"  # PSCI SYSTEM_RESET, or triple fault on x86
    ERROR = "error"                # internal/emulation error; detail says what
    CPU_OFF = "cpu-off"            # PSCI CPU_OFF: this vCPU powered itself off (aarch64)


@dataclass(frozen=True)
class Exit:
    reason: ExitReason
    detail: str = ""


class Vcpu(ABC):
    """One virtual CPU. ``run`` is called from a single vCPU thread; ``kick`` from any.

    This class is the whole of what the VMM may ask of a vCPU: hv never reaches past it
    (no private attributes, no ``hasattr`` probing; ``tests/project/test_backend_seam.py``). A
    capability only some backends have is a method here whose default raises
    :class:`BackendError` naming the backend; what every backend must provide is abstract.

    Interrupts: the interrupt controllers are hv devices. A backend only hands one
    interrupt to the CPU (:meth:`inject_interrupt` on x86, :meth:`inject_irq` on
    aarch64), says whether the CPU would accept one (:meth:`interrupts_enabled`,
    :attr:`ready_for_interrupt`), and stops the guest when a masked CPU unmasks
    (:meth:`request_interrupt_window` -> ``ExitReason.IRQ_WINDOW``).
    """

    index: int
    #: Short name of the backend in messages ("kvm", "unicorn").
    backend_name: ClassVar[str] = ""
    #: True when an injected interrupt is only *queued* inside the backend and reaches the
    #: CPU at the next guest entry (KVM_INTERRUPT): until a ``run`` proves the guest was
    #: entered the vector is in no saved state, so the VMM must run the vCPU once more
    #: before a snapshot. False: the interrupt is in the CPU state when injection returns.
    deferred_injection: ClassVar[bool] = False
    #: True when the interrupt window opens exactly when the CPU can take an interrupt
    #: (KVM). False: it is emulated at coarser points (Unicorn: translation-block
    #: boundaries) and the VMM backs it up with a retry kick.
    exact_interrupt_window: ClassVar[bool] = False

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

    # -- interrupts (between runs, on the vCPU's own thread) ---------------------------
    def inject_interrupt(self, vector: int) -> bool:
        """x86: hand external interrupt ``vector`` (32..255) to the CPU if it can take it
        now (RFLAGS.IF set, no interrupt shadow, nothing else pending); False otherwise,
        and nothing changed. See :attr:`deferred_injection` for when it reaches the CPU."""
        raise self.unsupported("x86 external interrupt injection")

    def inject_irq(self) -> bool:
        """aarch64: the CPU's IRQ line is asserted (level; the GIC signals an interrupt).
        Enter the IRQ exception now if PSTATE.I allows; False otherwise. Nothing is
        acknowledged: the guest does that through the GIC, and while the line stays
        asserted the VMM calls this again before each run."""
        raise self.unsupported("aarch64 IRQ injection")

    @abstractmethod
    def interrupts_enabled(self) -> bool:
        """Whether the CPU has maskable interrupts unmasked now (x86 RFLAGS.IF, aarch64
        PSTATE.I clear). A cheap pre-check: injection checks everything again."""

    @property
    @abstractmethod
    def ready_for_interrupt(self) -> bool:
        """Whether the CPU can take an interrupt now: unmasked, no interrupt shadow and
        no injection still pending in the backend (KVM: as it reported at the end of the
        last ``run``)."""

    @abstractmethod
    def request_interrupt_window(self, after_shadow: bool = False) -> None:
        """Stop the guest as soon as it can take an interrupt: ``run`` returns
        ``ExitReason.IRQ_WINDOW`` and the request is consumed. ``after_shadow``: the CPU
        is unmasked but in an interrupt shadow (after ``sti`` / ``mov ss``); let that one
        instruction run first (a backend whose window already waits for the shadow
        ignores it)."""

    @abstractmethod
    def cancel_interrupt_window(self) -> None:
        """Withdraw a :meth:`request_interrupt_window` that has not fired yet."""

    def arm_timer_deadline(self, host_ns: int | None) -> bool:
        """Stop ``run`` (as a kick) once the host's monotonic clock reaches ``host_ns``
        (None: no deadline), without another thread's kick: the machine's next timer
        expiry while this vCPU runs. False: the backend cannot, the machine's timer thread
        keeps kicking for it."""
        return False

    def use_guest_clock(self, clock: GuestClock, at_ns: int) -> None:
        """Bind a counter the backend keeps per vCPU (Unicorn x86's TSC) to the machine's
        guest clock, continuing from its current value taken as clock time ``at_ns`` (one
        reading for all vCPUs, so equal counters stay equal; the counter then stands still
        only while the machine is paused). Backends whose counters the hardware keeps, or
        that read the machine's clock directly, need nothing: the default does nothing."""
        return None

    # -- aarch64 machine services (routed from inside run) ------------------------------
    def set_sysreg_handler(self, handler: SysregHandler | None) -> None:
        """Route the system registers a machine owns (ICC_*, CNT*_EL0) to ``handler``;
        None gives them back to the backend's own handling."""
        raise self.unsupported("routing system registers to the machine")

    def set_power_handler(self, handler: PowerHandler | None) -> None:
        """Serve PSCI CPU_ON / AFFINITY_INFO through ``handler`` (the machine's power
        controller); None answers them NOT_SUPPORTED."""
        raise self.unsupported("PSCI power control")

    def unsupported(self, what: str) -> BackendError:
        """The error for a capability this backend (or this architecture) lacks."""
        return BackendError(f"{what} is not supported by {self.backend_name or type(self).__name__}")


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

    # -- the guest TSC (x86) ------------------------------------------------------------
    @property
    def tsc_hz(self) -> int | None:
        """x86: the rate of the guest's TSC in Hz, the one CPUID 0x15/0x16 declare and a
        migration carries (None: no TSC, aarch64, or not known before the first vCPU)."""
        return None

    def set_tsc_hz(self, tsc_hz: int) -> None:
        """Run the guest TSC at ``tsc_hz`` (a migrating guest's rate), before any vCPU has
        run. :class:`BackendError` (nothing changed) when the backend cannot give it."""
        raise BackendError(f"this backend cannot set the guest TSC rate to {tsc_hz} Hz")

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
