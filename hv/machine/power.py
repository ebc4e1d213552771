"""vCPU power: which vCPUs are on, halted or waiting to start, and how they start.

virt (aarch64) powers secondaries through PSCI (CPU_ON, AFFINITY_INFO; CPU_OFF is a vCPU
exit), q35 (x86_64) through INIT / STARTUP IPIs from a local APIC. A guest power-off
(ACPI PM sleep, PSCI SYSTEM_OFF) and a reset are the machine's: they end or restart every
vCPU at once (see :class:`hv.machine.machine.Machine`).

Everything here runs under the machine's big lock (``run.lock``): the interrupt
controller calls :meth:`VcpuPower.apic_init` / :meth:`VcpuPower.apic_startup` from a
local APIC access, the backend calls :class:`PsciPower` from inside a vCPU's ``run``.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence

from hv.boards.q35.layout import AP_APIC_BASE_MSR, BSP_APIC_BASE_MSR
from hv.devices.interfaces import DeviceStateError
from hv.machine.runstate import RunStateTracker
from hv.memory import GuestMemory
from hv.state import (
    POWER_OFF,
    POWER_ON,
    POWER_STATES,
    POWER_WAIT_SIPI,
    PSTATE_EL1H_DAIF,
    Arm64CpuState,
    CpuState,
    Segment,
    X86CpuState,
)
from hv_backends.base import Arch, Vcpu

log = logging.getLogger(__name__)

# PSCI return codes the machine's power controller gives (PSCI 1.0, 5.2.2).
PSCI_SUCCESS = 0
PSCI_E_INVALID_PARAMETERS = -2
PSCI_E_ALREADY_ON = -4
PSCI_E_INVALID_ADDRESS = -9
PSCI_AFFINITY_ON = 0
PSCI_AFFINITY_OFF = 1
MPIDR_AFFINITY_MASK = 0xFF_00FF_FFFF     # Aff3..Aff0


class VcpuPower:
    """Power state of each vCPU: "on", or (secondaries at reset) "off" on virt /
    "wait-for-sipi" on q35. A vCPU that is not on parks until CPU_ON / SIPI.

    ``pending_start[i]`` is the state vCPU ``i`` starts from (CPU_ON / SIPI), loaded under
    the big lock by its own thread before it next runs (:meth:`apply_start`), or by a
    snapshot (all vCPUs parked). ``halted[i]``: it executed HLT/WFI and waits for an
    interrupt.
    """

    def __init__(self, arch: Arch, run: RunStateTracker, memory: GuestMemory, vcpus: Sequence[Vcpu]) -> None:
        self.arch = arch
        self.run = run
        self.memory = memory
        self.vcpus = vcpus
        self.off_state = POWER_WAIT_SIPI if arch is Arch.X86_64 else POWER_OFF
        count = len(vcpus)
        self.power: list[str] = [POWER_ON] + [self.off_state] * (count - 1)
        self.halted: list[bool] = [False] * count
        self.pending_start: list[CpuState | None] = [None] * count

    def reset(self) -> None:
        """Big lock held: vCPU 0 on, the others off / waiting for SIPI (a fresh boot)."""
        count = len(self.vcpus)
        self.halted = [False] * count
        self.power = [POWER_ON] + [self.off_state] * (count - 1)
        self.pending_start = [None] * count

    def state(self, index: int) -> str:
        """vCPU ``index``'s power state: "on", "off" (virt) or "wait-for-sipi" (q35)."""
        with self.run.lock:
            return self.power[index]

    def is_on(self, index: int) -> bool:
        return self.power[index] == POWER_ON

    # -- exits of a vCPU --------------------------------------------------------------
    def halt(self, index: int) -> None:
        """vCPU ``index`` executed HLT/WFI: it waits for a deliverable interrupt."""
        with self.run.lock:
            self.halted[index] = True
            self.run.changed.notify_all()

    def cpu_off(self, index: int) -> None:
        """PSCI CPU_OFF from vCPU ``index``: it parks until a CPU_ON."""
        with self.run.lock:
            self.power[index] = POWER_OFF
            self.halted[index] = False
            self.run.changed.notify_all()
        log.info("vcpu%d: PSCI CPU_OFF", index)

    # -- PSCI (virt) ------------------------------------------------------------------
    def mpidr_index(self, mpidr: int) -> int | None:
        """The vCPU whose MPIDR affinity is ``mpidr`` (Aff0 = index, Aff1 = index >> 8)."""
        if mpidr & ~MPIDR_AFFINITY_MASK or mpidr >> 16 & 0xFF_00FF:
            return None
        index = (mpidr & 0xFF) | (mpidr >> 8 & 0xFF) << 8
        return index if index < len(self.vcpus) else None

    def psci_cpu_on(self, target_mpidr: int, entry: int, context_id: int) -> int:
        """PSCI CPU_ON: start the powered-off vCPU ``target_mpidr`` at ``entry`` (EL1h,
        MMU off, DAIF masked, x0 = ``context_id``). A PSCI return code."""
        target = self.mpidr_index(target_mpidr)
        if target is None:
            return PSCI_E_INVALID_PARAMETERS
        with self.run.lock:
            if self.power[target] == POWER_ON:
                return PSCI_E_ALREADY_ON
            if entry & 3 or not self.memory.contains(entry, 4):
                return PSCI_E_INVALID_ADDRESS
            state = Arm64CpuState(pc=entry, pstate=PSTATE_EL1H_DAIF)
            state.x[0] = context_id
            self.start_vcpu(target, state)
        log.info("vcpu%d: PSCI CPU_ON at %#x", target, entry)
        return PSCI_SUCCESS

    def psci_affinity_info(self, target_mpidr: int, lowest_level: int) -> int:
        """PSCI AFFINITY_INFO at level 0: 0 (ON) or 1 (OFF), or INVALID_PARAMETERS."""
        target = self.mpidr_index(target_mpidr)
        if target is None or lowest_level != 0:
            return PSCI_E_INVALID_PARAMETERS
        with self.run.lock:
            return PSCI_AFFINITY_ON if self.power[target] == POWER_ON else PSCI_AFFINITY_OFF

    # -- INIT / SIPI (q35; the interrupt controller's power host) ---------------------
    def apic_init(self, target: int) -> None:
        """An INIT IPI (assert) reached vCPU ``target``: it stops and waits for a SIPI.
        Called with the big lock held (from the sender's local APIC access)."""
        if self.power[target] != POWER_WAIT_SIPI:
            log.info("vcpu%d: INIT, waiting for SIPI", target)
        self.power[target] = POWER_WAIT_SIPI
        self.pending_start[target] = None
        self.halted[target] = False
        self.run.changed.notify_all()
        self.vcpus[target].kick()

    def apic_startup(self, target: int, vector: int) -> None:
        """A STARTUP IPI with ``vector`` reached vCPU ``target``: if it waits for one, it
        starts in real mode at CS = vector << 8, IP = 0; otherwise the SIPI is ignored,
        as hardware does. Big lock held."""
        if self.power[target] != POWER_WAIT_SIPI or self.pending_start[target] is not None:
            return
        state = X86CpuState(rip=0)
        state.cs = Segment(vector << 8, vector << 12, 0xFFFF, 0xB)
        state.apic_base = BSP_APIC_BASE_MSR if target == 0 else AP_APIC_BASE_MSR
        self.start_vcpu(target, state)
        log.info("vcpu%d: SIPI, starting at %#x", target, vector << 12)

    # -- starting a vCPU ----------------------------------------------------------------
    def start_vcpu(self, index: int, state: CpuState) -> None:
        """Big lock held: power vCPU ``index`` on with ``state`` (loaded before it runs)."""
        self.pending_start[index] = state
        self.power[index] = POWER_ON
        self.halted[index] = False
        self.run.changed.notify_all()

    def apply_start(self, index: int) -> None:
        """Big lock held, vCPU ``index`` not running: load its pending start state,
        keeping its clock (TSC / virtual counter) where it is."""
        state = self.pending_start[index]
        if state is None:
            return
        self.pending_start[index] = None
        self.halted[index] = False   # a HLT/WFI exit of its previous life may have set it
        vcpu = self.vcpus[index]
        current = vcpu.get_state()
        if isinstance(state, X86CpuState) and isinstance(current, X86CpuState):
            state.tsc = current.tsc
        elif isinstance(state, Arm64CpuState) and isinstance(current, Arm64CpuState):
            state.cntvct = current.cntvct
        vcpu.set_state(state)

    # -- snapshots ----------------------------------------------------------------------
    def capture(self) -> list[CpuState]:
        """Big lock held, every vCPU parked: each vCPU's state with its halt/power state."""
        cpus = []
        for index, vcpu in enumerate(self.vcpus):
            self.apply_start(index)   # every vCPU is parked: safe from this thread
            state = vcpu.get_state()
            state.halted = self.halted[index]
            state.power = self.power[index]
            cpus.append(state)
        return cpus

    def check(self, cpus: Sequence[CpuState]) -> None:
        """Raise :class:`DeviceStateError` unless ``cpus`` fit these vCPUs (nothing changes)."""
        if len(cpus) != len(self.vcpus):
            raise DeviceStateError(f"snapshot has {len(cpus)} vCPUs, machine has {len(self.vcpus)}")
        for state in cpus:
            if self.arch.value != state.ARCH:
                raise DeviceStateError(f"snapshot CPU state is {state.ARCH}, machine is {self.arch.value}")
            if state.power is not None and state.power not in POWER_STATES[self.arch.value]:
                raise DeviceStateError(f"snapshot CPU power state {state.power!r} is not valid on {self.arch.value}")

    def load(self, cpus: Sequence[CpuState]) -> None:
        """Big lock held, vCPUs parked: load states :meth:`check` accepted."""
        for index, (vcpu, cpu) in enumerate(zip(self.vcpus, cpus, strict=True)):
            vcpu.set_state(dataclasses.replace(cpu))
            self.halted[index] = cpu.halted
            self.pending_start[index] = None
            # A version-1 state has no power state: its vCPU 0 ran, the others
            # never did (they stay off / waiting for SIPI).
            self.power[index] = cpu.power if cpu.power is not None else \
                POWER_ON if index == 0 else self.off_state


class GuestPowerRequests:
    """What a guest's own power-off and reset requests do to the machine.

    q35 powers off through the ACPI PM block (SLP_TYP|SLP_EN), virt through PSCI
    SYSTEM_OFF; both are the "guest-shutdown" of QMP's SHUTDOWN event. PSCI SYSTEM_RESET
    (and the Unicorn x86 triple fault) resets the machine on a thread of its own, since a
    reset pauses every vCPU, including the one asking.
    """

    def __init__(self, shutdown: Callable[[str], None], reset: Callable[[], None]) -> None:
        self._shutdown = shutdown
        self._reset = reset

    def acpi_sleep(self, slp_typ: int) -> None:
        """The ACPI PM device's sleep request (from a vCPU thread in a port write, big lock held)."""
        log.info("guest requested power-off (ACPI SLP_TYP %d)", slp_typ)
        self._shutdown("guest-shutdown")

    def system_off(self) -> None:
        log.info("guest requested power-off (PSCI SYSTEM_OFF)")  # as q35's ACPI line
        self._shutdown("guest-shutdown")

    def system_reset(self, index: int, detail: str | None) -> None:
        log.info("vcpu%d: guest reset (%s)", index, detail or "reset request")
        threading.Thread(target=self._reset, name="reset", daemon=True).start()


class PsciPower:
    """A vCPU's view of the machine's PSCI power controller (the backend's power
    handler): CPU_ON and AFFINITY_INFO go to :class:`VcpuPower`; CPU_OFF is an exit."""

    def __init__(self, power: VcpuPower, index: int) -> None:
        self.power = power
        self.index = index

    def cpu_on(self, target_mpidr: int, entry: int, context_id: int) -> int:
        return self.power.psci_cpu_on(target_mpidr, entry, context_id)

    def affinity_info(self, target_mpidr: int, lowest_level: int) -> int:
        return self.power.psci_affinity_info(target_mpidr, lowest_level)
