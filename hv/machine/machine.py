"""A machine: guest RAM, device buses, vCPU threads and the run-state lifecycle.

The machine is the same whatever the backend: it owns the RAM (one mapping, shared with
the backend), the devices (pure register files wired to port/MMIO buses) and the vCPU
threads. It implements :class:`hv_backends.base.IoHandler`, so a backend forwards every port
and MMIO access here. All device accesses are serialised by one lock (the machine's
"big lock"), so devices never see concurrent accesses.

Lifecycle (QMP ``query-status`` names)::

    prelaunch --start--> running <--pause/resume--> paused
        |                   |                          |
        +-- inmigrate       +---- power-off/quit ----> shutdown
                            +---- migration done ----> postmigrate
"""
from __future__ import annotations

import dataclasses
import enum
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from hv_backends.base import Arch, Backend, Exit, ExitReason, Vcpu
from hv.config import MachineType, VmConfig
from hv.devices.acpi_pm import AcpiPm, AcpiPmState
from hv.devices.bus import Bus
from hv.devices.clock import ClockState
from hv.devices.ioapic import IOAPIC_BASE, IOAPIC_SIZE, IoApicState
from hv.devices.lapic import LAPIC_BASE, LAPIC_SIZE, LapicState
from hv.devices.interfaces import DeviceStateError, OutputSink
from hv.devices.pl011 import Pl011, Pl011State
from hv.devices.serial import Serial16550, SerialState
from hv.machine.interrupts import InterruptController
from hv.machine.runstate import NOT_POSSIBLE, MachineError, RunState, RunStateTracker
from hv.machine.legacy import LEGACY_DEVICE_IDS, GuestResetRequest, build_legacy_devices
from hv.machine.gic_interrupts import GicController, pci_intx_intid
from hv.devices.gicv3 import GICD_BASE, GICD_SIZE, GICR_BASE, GicState
from hv.devices.gicv2m import V2M_BASE, V2M_SIZE
from hv.devices.irqline import SharedLine, SharedLineInput
from hv.devices.arch_timer import ArchTimerState
from hv.devices.virtio_net import VirtioNetPciDevice
from hv.devconfig import DevConfigError, DeviceConfig
from hv.devices.interfaces import UnconnectedLine
from hv.devices.persist import restore_state
from hv.devices.pci import UnconnectedMsi, parse_devfn
from hv.devices.pcie_root_port import PcieRootPort
from hv.machine.pci_wiring import build_pci, plug_device, plug_net_device, unplug_device
from hv.memory import GuestMemory, RegionSpec
from hv.state import (POWER_OFF, POWER_ON, POWER_STATES, POWER_WAIT_SIPI, PSTATE_EL1H_DAIF, Arm64CpuState, CpuState, Segment,
                      X86CpuState, state_from_dict, state_to_dict)

log = logging.getLogger(__name__)

Q35_RAM_BASE = 0
VIRT_RAM_BASE = 0x4000_0000
Q35_SERIAL_PORT = 0x3F8
Q35_ACPI_PM_PORT = 0x600
Q35_SERIAL_GSI = 4            # COM1 is ISA IRQ 4
Q35_PCI_GSI_BASE = 16         # INTx of slot s, pin p (1 = INTA) -> GSI 16 + (s + p - 1) % 8
VIRT_PL011_BASE = 0x0900_0000
PAUSE_TIMEOUT = 10.0
THROTTLE_SLICE = 0.01  # seconds of guest time between throttle sleeps
# PSCI return codes the machine's power controller gives (PSCI 1.0, 5.2.2).
PSCI_SUCCESS = 0
PSCI_E_INVALID_PARAMETERS = -2
PSCI_E_ALREADY_ON = -4
PSCI_E_INVALID_ADDRESS = -9
PSCI_AFFINITY_ON = 0
PSCI_AFFINITY_OFF = 1
MPIDR_AFFINITY_MASK = 0xFF_00FF_FFFF     # Aff3..Aff0
X86_AP_APIC_BASE = 0xFEE00800           # enabled, not the BSP


class PersistentDevice(Protocol):
    def save(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


@dataclass
class DeviceSlot:
    """A device known to the machine: how to save it and how to describe it."""

    name: str
    kind: str
    device: PersistentDevice
    state_type: type
    bus: str   # "port" | "mmio" | "pcie.0"
    addr: str  # "0x3f8", "03.0"
    attrs: dict[str, str] = dataclasses.field(default_factory=dict)  # must match across a migration


@dataclass
class MachineSnapshot:
    """Everything of a paused machine except RAM, in plain values."""

    fingerprint: dict[str, Any]
    cpus: list[CpuState]
    devices: dict[str, dict[str, Any]]  # name -> {"version": int, "state": dict}

    def to_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "cpus": [state_to_dict(c) for c in self.cpus],
                "devices": self.devices}

    @classmethod
    def from_dict(cls, raw: Any) -> "MachineSnapshot":
        if not isinstance(raw, dict) or set(raw) != {"fingerprint", "cpus", "devices"}:
            raise DeviceStateError("machine snapshot: wrong fields")
        if not isinstance(raw["cpus"], list) or not isinstance(raw["devices"], dict):
            raise DeviceStateError("machine snapshot: malformed cpus or devices")
        return cls(dict(raw["fingerprint"]), [state_from_dict(c) for c in raw["cpus"]], dict(raw["devices"]))


class Machine:
    """A q35 (x86_64) or virt (aarch64) machine on one backend."""

    def __init__(self, config: VmConfig, backend: Backend, console: OutputSink,
                 memory: GuestMemory | None = None) -> None:
        self.config = config
        self.arch: Arch = config.arch
        self.backend = backend
        self.console = console
        self.memory = memory if memory is not None else GuestMemory(ram_layout(config))
        self.pio = Bus("port")
        self.mmio = Bus("mmio")
        self.devices: dict[str, DeviceSlot] = {}
        self._run = RunStateTracker()            # run state + the big lock (devices and run state)
        self._lock = self._run.lock
        self._state_changed = self._run.changed
        self._parked: set[int] = set()
        self._halted: list[bool] = [False] * config.smp
        # Power state of each vCPU: "on", or (secondaries at reset) "off" on virt /
        # "wait-for-sipi" on q35. A vCPU that is not on parks until CPU_ON / SIPI.
        self._off_state = POWER_WAIT_SIPI if self.arch is Arch.X86_64 else POWER_OFF
        self._power: list[str] = [POWER_ON] + [self._off_state] * (config.smp - 1)
        # The state a vCPU starts from (CPU_ON / SIPI), loaded under the big lock by its
        # own thread before it next runs, or by save() (all vCPUs parked).
        self._pending_start: list[CpuState | None] = [None] * config.smp
        self._threads: list[threading.Thread] = []
        self.listeners: list[Callable[[str, dict[str, Any] | None], None]] = []
        self.kernel_image: bytes | None = None
        self.initrd_image: bytes | None = None
        self.exit_error: str | None = None
        self._throttle_percent = 0
        self._throttle_wake = threading.Event()
        self._throttle_thread: threading.Thread | None = None
        self._throttle_ran_since = [0.0] * config.smp  # when each vCPU's run slice began
        self.interrupts: InterruptController | GicController | None = None  # q35: LAPICs, IOAPIC, clock; virt: GICv3, timers, clock
        self.intx_lines: dict[int, SharedLine] = {}   # GSI (q35) or INTID (virt) -> wire-OR of the PCI functions' INTx
        mmio_windows = self._build_devices()
        try:
            self.vm = backend.open_vm(self.arch, self.memory, mmio_windows)
            self.vcpus: list[Vcpu] = [self.vm.create_vcpu(i) for i in range(config.smp)]
            if isinstance(self.interrupts, GicController):
                # virt: ICC_*/CNT* and PSCI are served by the machine (BackendError where
                # the backend cannot route them)
                for index, vcpu in enumerate(self.vcpus):
                    vcpu.set_sysreg_handler(self.interrupts.sysreg_handler(index))
                    vcpu.set_power_handler(PsciPower(self, index))
            if isinstance(self.interrupts, InterruptController):
                self.interrupts.set_power_host(self)
        except BaseException:
            self.pci.close()
            raise

    # -- wiring -------------------------------------------------------------------
    def _add_device(self, name: str, kind: str, device: PersistentDevice, state_type: type,
                    bus: Bus, base: int, size: int) -> None:
        bus.add(base, size, device, name)  # type: ignore[arg-type]
        self.devices[name] = DeviceSlot(name, kind, device, state_type, bus.kind, f"{base:#x}")

    def _build_devices(self) -> list[tuple[int, int]]:
        if self.config.machine is MachineType.Q35:
            irq = self.interrupts = InterruptController(
                self.config.smp, self._lock, self._state_changed, self._kick_vcpu,
                lambda: self._run.running, lambda: self._run.closing)
            self._add_device("serial0", "isa-serial", Serial16550(self.console, irq.line(Q35_SERIAL_GSI)),
                             SerialState, self.pio, Q35_SERIAL_PORT, Serial16550.SIZE)
            self._add_device("acpi-pm", "ich9-pm", AcpiPm(self._on_sleep), AcpiPmState,
                             self.pio, Q35_ACPI_PM_PORT, AcpiPm.SIZE)
            self.mmio.add(LAPIC_BASE, LAPIC_SIZE, irq.lapic_window(), "lapic")
            for lapic in irq.lapics:
                self.devices[f"lapic{lapic.index}"] = DeviceSlot(f"lapic{lapic.index}", "lapic", lapic, LapicState,
                                                                 "mmio", f"{LAPIC_BASE:#x}")
            self._add_device("ioapic", "ioapic", irq.ioapic, IoApicState, self.mmio, IOAPIC_BASE, IOAPIC_SIZE)
            # Legacy ISA devices (PIT, RTC, i8042; hv/machine/legacy.py). Before "clock":
            # a reset restores devices in this order, and the RTC keeps its time across
            # one by reading the guest clock before the clock restarts at 0.
            for legacy in build_legacy_devices(irq, GuestResetRequest(self.system_reset)):
                for base, window in legacy.ports:
                    self.pio.add(base, window.SIZE, window, f"{legacy.name}@{base:#x}")
                self.devices[legacy.name] = DeviceSlot(legacy.name, legacy.kind, legacy.device, legacy.state_type,
                                                       "port", f"{legacy.ports[0][0]:#x}")
            self.devices["clock"] = DeviceSlot("clock", "guest-clock", irq.clock_device(), ClockState, "none", "-")
            windows = [(IOAPIC_BASE, IOAPIC_SIZE), (LAPIC_BASE, LAPIC_SIZE)]
        else:
            # GICv3 + generic timers (ICC_*/CNT* served through the backend's sysreg handler)
            gic = self.interrupts = GicController(
                self.config.smp, self._lock, self._state_changed, self._kick_vcpu,
                lambda: self._run.running, lambda: self._run.closing)
            self._add_device("pl011", "pl011", Pl011(self.console, gic.pl011_line()), Pl011State,
                             self.mmio, VIRT_PL011_BASE, Pl011.SIZE)
            windows = [(VIRT_PL011_BASE, Pl011.SIZE)]
            redist = gic.redistributor_window()
            self.mmio.add(GICD_BASE, GICD_SIZE, gic.distributor_window(), "gicd")
            self.mmio.add(GICR_BASE, redist.SIZE, redist, "gicr")
            # GICv2m MSI frame: stateless (the pending bits it sets live in the saved GIC),
            # so it is on the bus but not a saved device.
            self.mmio.add(V2M_BASE, V2M_SIZE, gic.v2m_window(), "gicv2m")
            self.devices["gic"] = DeviceSlot("gic", "gicv3", gic.gic_device(), GicState, "mmio", f"{GICD_BASE:#x}")
            self.devices["arch-timer"] = DeviceSlot("arch-timer", "arch-timer", gic.timer_device(),
                                                    ArchTimerState, "none", "-")
            self.devices["clock"] = DeviceSlot("clock", "guest-clock", gic.clock_device(), ClockState, "none", "-")
            windows += [(GICD_BASE, GICD_SIZE), (GICR_BASE, redist.SIZE), (V2M_BASE, V2M_SIZE)]
        # A live-migration destination opens its images unlocked and takes the locks over
        # from the source at the switch-over.
        incoming_live = self.config.incoming_live
        self.pci = build_pci(self.config.machine, self.memory, self.pio, self.mmio,
                             self.config.drives, self.config.devices,
                             lock_images=not incoming_live, taken_names=list(self.devices),
                             netdevs=self.config.netdevs)
        for slot in self.pci.slots:
            self.devices[slot.name] = DeviceSlot(slot.name, slot.kind, slot.device, slot.state_type,
                                                 slot.bus, slot.addr, {k: str(v) for k, v in slot.attrs.items()})
            if isinstance(slot.device, VirtioNetPciDevice):
                # Received frames go into guest RAM at once (under the big lock, only
                # while running) and raise the rx interrupt, instead of waiting for a kick.
                slot.device.enable_async_rx(self._lock, self._accepts_device_dma)
        if self.interrupts is not None:
            self._wire_pci_interrupts(self.interrupts)
        return windows + self.pci.mmio_windows

    def _wire_pci_interrupts(self, irq: InterruptController | GicController) -> None:
        """q35: MSI-X/MSI messages go to the local APICs, INTx pins to IOAPIC inputs 16-23.
        virt: MSI-X/MSI messages go to the GICv2m frame, INTx pins to SPIs 3-6 (INTIDs 35-38).
        On both, an INTx input is a wire-OR of the functions sharing it; a function
        behind a root port has its pin swizzled to the port's slot (PCI bridge rule)."""
        for devfn, function in sorted(self.pci.host.functions.items()):
            self._wire_pci_function(irq, devfn, function)
        for bus, port in self.pci.ports.items():
            for fn, child in sorted(port.children.items()):
                self._wire_pci_function(irq, fn, child, bus)

    def _wire_pci_function(self, irq: InterruptController | GicController, devfn: int, function: Any,
                           bus: str = "pcie.0") -> None:
        """One function's MSI-X (MSI) sink and INTx pin (see :meth:`_wire_pci_interrupts`).
        ``devfn`` is on ``bus``: pcie.0 or a root port's id."""
        table = getattr(function, "msix", None)
        if table is not None:
            table.sink = irq.msi()
        if isinstance(function, PcieRootPort):
            function.msi_sink = irq.msi()
        pin = function.config_read(0x3D, 1)
        if not pin or not hasattr(function, "intx"):
            return
        key: Any = devfn
        routed_slot = devfn >> 3
        if bus != "pcie.0":
            # PCI-to-PCI bridge swizzle: pin' = ((pin - 1 + slot) % 4) + 1, at the port's slot.
            port = self.pci.ports[bus]
            pin = ((pin - 1 + (devfn >> 3)) % 4) + 1
            routed_slot = (port.devfn or 0) >> 3
            key = (bus, devfn)
        if isinstance(irq, InterruptController):
            number = Q35_PCI_GSI_BASE + (routed_slot + pin - 1) % 8       # an IOAPIC pin, 16-23
            name, target = f"gsi{number}", irq.line
        else:
            number = pci_intx_intid(routed_slot, pin)   # SPI 3 + (slot + pin - 1) % 4, INTIDs 35-38
            name, target = f"spi-intid{number}", irq.spi_line
        line = self.intx_lines.get(number)
        if line is None:
            line = self.intx_lines[number] = SharedLine(target(number), self._lock, name)
        function.intx = line.attach(key)
        if isinstance(function, PcieRootPort):
            function.drive_intx()
            return
        # The function may already assert INTx (a restored ISR): drive the shared line now.
        isr = getattr(getattr(function, "s", None), "isr", 0)
        if isr and not function.command & 0x400:
            function.intx.set_level(True)

    # -- hot-plug (QMP device_add / device_del) ----------------------------------------
    def hotplug_device(self, device: DeviceConfig) -> DeviceSlot:
        """Plug a virtio-blk-pci or virtio-net-pci function for ``device`` while the
        machine exists.

        Its drive (netdev) must be a ``-drive`` (``-netdev``) of the command line that no
        device uses; the image is opened and locked (the socket/tap opened) here. Under the
        big lock the function is put on its bus: on pcie.0 the guest sees it on its next
        configuration-space scan; behind a ``pcie-root-port`` the port's :meth:`plug`
        raises its slot events (Presence Detect / DLL State Changed) and hot-plug
        interrupt, so a pciehp guest notices at once. The function is wired to the interrupt
        controller (q35: LAPICs/IOAPIC; virt: GICv2m/SPIs), and added to :attr:`devices`, so it is saved, reset and in the
        migration fingerprint. Raises :class:`MachineError` naming the problem; on error
        nothing has changed.
        """
        drives = {d.id: d for d in self.config.drives}
        netdevs = {n.id: n for n in self.config.netdevs}
        with self._lock:
            self._check_hotplug_state("device_add")
            if device.id in self.devices:
                raise MachineError(f"Duplicate device ID '{device.id}'")
            try:
                if device.driver == "virtio-net-pci":
                    pci_slot = plug_net_device(self.pci, self.memory, netdevs.get(device.netdev or ""), device,
                                               option="device_add")
                else:
                    pci_slot = plug_device(self.pci, self.memory, drives.get(device.drive), device,
                                           option="device_add")
            except DevConfigError as exc:
                raise MachineError(str(exc)) from None
            slot = DeviceSlot(pci_slot.name, pci_slot.kind, pci_slot.device, pci_slot.state_type,
                              pci_slot.bus, pci_slot.addr, {k: str(v) for k, v in pci_slot.attrs.items()})
            if self.interrupts is not None:
                devfn_slot, devfn_fn = parse_devfn(pci_slot.addr)
                self._wire_pci_function(self.interrupts, devfn_slot << 3 | devfn_fn, pci_slot.device,
                                        pci_slot.bus)
            if isinstance(pci_slot.device, VirtioNetPciDevice):
                pci_slot.device.enable_async_rx(self._lock, self._accepts_device_dma)
                pci_slot.device.start()
            self.devices[slot.name] = slot
            port = self.pci.ports.get(pci_slot.bus)
            if port is not None:
                port.plug()   # presence + link up, PDC + DLLSC, the hot-plug interrupt
        log.info("hot-plugged %s %s at %s %s", slot.kind, slot.name, slot.bus, slot.addr)
        return slot

    def hotunplug_device(self, device_id: str) -> DeviceSlot:
        """Remove PCI device ``device_id`` (hot-plugged or from the command line).

        Under the big lock: its interrupt is lowered, the function leaves its bus (its
        configuration space reads as all ones), a NIC stops delivering, and it leaves
        :attr:`devices`; behind a root port, the port's :meth:`unplug` raises the slot
        events and interrupt (surprise removal: nothing waits for the guest). Root ports
        themselves cannot be unplugged. Then, outside the lock (a NIC's reader thread may be waiting for
        it), its image is closed and unlocked or its netdev closed. Raises
        :class:`MachineError`; on error nothing changed.
        """
        with self._lock:
            self._check_hotplug_state("device_del")
            slot = self.devices.get(device_id)
            if slot is None or slot.bus not in self.pci.buses:
                raise MachineError(f"Device '{device_id}' not found" if slot is None else
                                   f"device_del: {device_id} ({slot.kind}) is not a hot-pluggable device")
            function = slot.device
            try:
                _, release = unplug_device(self.pci, device_id)
            except DevConfigError as exc:
                raise MachineError(str(exc)) from None
            if isinstance(getattr(function, "intx", None), SharedLineInput):
                # INTx lines are wire-OR'd; leaving the line drops only this input.
                function.intx.line.detach(function.intx.key)
                function.intx = UnconnectedLine()
            if getattr(function, "msix", None) is not None:
                function.msix.sink = UnconnectedMsi()
            del self.devices[device_id]
            port = self.pci.ports.get(slot.bus)
            if port is not None:
                port.unplug()   # presence + link down, PDC + DLLSC, the hot-plug interrupt
        release()
        log.info("hot-unplugged %s %s from %s %s", slot.kind, slot.name, slot.bus, slot.addr)
        return slot

    def _check_hotplug_state(self, command: str) -> None:
        state = self._run.require(command, RunState.PRELAUNCH, RunState.RUNNING, RunState.PAUSED,
                                  RunState.INTERNAL_ERROR)
        if self._run.closing:
            raise MachineError(NOT_POSSIBLE.format(command=command, state=state.value))

    def _kick_vcpu(self, index: int) -> None:
        self.vcpus[index].kick()

    # -- vCPU power: PSCI (virt), INIT/SIPI (q35) ------------------------------------------
    def power_state(self, index: int) -> str:
        """vCPU ``index``'s power state: "on", "off" (virt) or "wait-for-sipi" (q35)."""
        with self._lock:
            return self._power[index]

    def _mpidr_index(self, mpidr: int) -> int | None:
        """The vCPU whose MPIDR affinity is ``mpidr`` (Aff0 = index, Aff1 = index >> 8)."""
        if mpidr & ~MPIDR_AFFINITY_MASK or mpidr >> 16 & 0xFF_00FF:
            return None
        index = (mpidr & 0xFF) | (mpidr >> 8 & 0xFF) << 8
        return index if index < len(self.vcpus) else None

    def psci_cpu_on(self, target_mpidr: int, entry: int, context_id: int) -> int:
        """PSCI CPU_ON: start the powered-off vCPU ``target_mpidr`` at ``entry`` (EL1h,
        MMU off, DAIF masked, x0 = ``context_id``). A PSCI return code."""
        target = self._mpidr_index(target_mpidr)
        if target is None:
            return PSCI_E_INVALID_PARAMETERS
        with self._lock:
            if self._power[target] == POWER_ON:
                return PSCI_E_ALREADY_ON
            if entry & 3 or not self.memory.contains(entry, 4):
                return PSCI_E_INVALID_ADDRESS
            state = Arm64CpuState(pc=entry, pstate=PSTATE_EL1H_DAIF)
            state.x[0] = context_id
            self._start_vcpu(target, state)
        log.info("vcpu%d: PSCI CPU_ON at %#x", target, entry)
        return PSCI_SUCCESS

    def psci_affinity_info(self, target_mpidr: int, lowest_level: int) -> int:
        """PSCI AFFINITY_INFO at level 0: 0 (ON) or 1 (OFF), or INVALID_PARAMETERS."""
        target = self._mpidr_index(target_mpidr)
        if target is None or lowest_level != 0:
            return PSCI_E_INVALID_PARAMETERS
        with self._lock:
            return PSCI_AFFINITY_ON if self._power[target] == POWER_ON else PSCI_AFFINITY_OFF

    def apic_init(self, target: int) -> None:
        """An INIT IPI (assert) reached vCPU ``target``: it stops and waits for a SIPI.
        Called with the big lock held (from the sender's local APIC access)."""
        if self._power[target] != POWER_WAIT_SIPI:
            log.info("vcpu%d: INIT, waiting for SIPI", target)
        self._power[target] = POWER_WAIT_SIPI
        self._pending_start[target] = None
        self._halted[target] = False
        self._state_changed.notify_all()
        self.vcpus[target].kick()

    def apic_startup(self, target: int, vector: int) -> None:
        """A STARTUP IPI with ``vector`` reached vCPU ``target``: if it waits for one, it
        starts in real mode at CS = vector << 8, IP = 0; otherwise the SIPI is ignored,
        as hardware does. Big lock held."""
        if self._power[target] != POWER_WAIT_SIPI or self._pending_start[target] is not None:
            return
        state = X86CpuState(rip=0)
        state.cs = Segment(vector << 8, vector << 12, 0xFFFF, 0xB)
        state.apic_base = X86CpuState().apic_base if target == 0 else X86_AP_APIC_BASE
        self._start_vcpu(target, state)
        log.info("vcpu%d: SIPI, starting at %#x", target, vector << 12)

    def _start_vcpu(self, index: int, state: CpuState) -> None:
        """Big lock held: power vCPU ``index`` on with ``state`` (loaded before it runs)."""
        self._pending_start[index] = state
        self._power[index] = POWER_ON
        self._halted[index] = False
        self._state_changed.notify_all()

    def _apply_start(self, index: int) -> None:
        """Big lock held, vCPU ``index`` not running: load its pending start state,
        keeping its clock (TSC / virtual counter) where it is."""
        state = self._pending_start[index]
        if state is None:
            return
        self._pending_start[index] = None
        self._halted[index] = False   # a HLT/WFI exit of its previous life may have set it
        vcpu = self.vcpus[index]
        current = vcpu.get_state()
        if isinstance(state, X86CpuState) and isinstance(current, X86CpuState):
            state.tsc = current.tsc
        elif isinstance(state, Arm64CpuState) and isinstance(current, Arm64CpuState):
            state.cntvct = current.cntvct
        vcpu.set_state(state)

    def fingerprint(self, source: dict[str, Any] | None = None) -> dict[str, Any]:
        """What must be equal on both ends of a migration (the stream's CONFIG shape).
        With ``source`` (an incoming stream's fingerprint), legacy devices that the source
        lacks (an older hv) are left out: they keep their reset state (see restore)."""
        present = None if source is None else {d.get("id") for d in source.get("devices", []) if isinstance(d, dict)}
        return {
            "arch": self.arch.value,
            "machine": self.config.machine,
            "vcpus": self.config.smp,
            "memory": self.memory.size,
            "devices": [{"type": s.kind, "id": s.name, "bus": s.bus, "addr": s.addr, "attrs": dict(s.attrs)}
                        for s in self.devices.values()
                        if present is None or s.name in present or s.name not in LEGACY_DEVICE_IDS],
        }

    # -- IoHandler (called from vCPU threads) ----------------------------------------
    def pio_read(self, port: int, size: int) -> int:
        with self._lock:
            return self.pio.read(port, size)

    def pio_write(self, port: int, size: int, value: int) -> None:
        with self._lock:
            self.pio.write(port, size, value)

    def mmio_read(self, addr: int, size: int) -> int:
        with self._lock:
            return self.mmio.read(addr, size)

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        with self._lock:
            self.mmio.write(addr, size, value)

    # -- events ---------------------------------------------------------------------
    def add_listener(self, listener: Callable[[str, dict[str, Any] | None], None]) -> None:
        self.listeners.append(listener)

    def _emit(self, event: str, data: dict[str, Any] | None = None) -> None:
        for listener in list(self.listeners):
            try:
                listener(event, data)
            except Exception:  # a broken listener must not take the VM down
                log.exception("event listener failed for %s", event)

    # -- boot -------------------------------------------------------------------------
    def load_kernel(self, image: bytes, initrd: bytes | None = None) -> None:
        if self.config.machine is MachineType.Q35:
            from hv.boards.q35.firmware import setup_boot
        else:
            from hv.boards.virt.firmware import setup_boot
        boot = setup_boot(self.memory, self.config, image, initrd)
        self.kernel_image = image
        self.initrd_image = initrd
        self.vcpus[0].set_state(boot.cpu_state)
        self._halted = [False] * self.config.smp
        self._power = [POWER_ON] + [self._off_state] * (self.config.smp - 1)
        self._pending_start = [None] * self.config.smp

    # -- lifecycle ----------------------------------------------------------------------
    @property
    def state(self) -> RunState:
        return self._run.state

    @property
    def _state(self) -> RunState:
        return self._run.state

    def require_state(self, command: str, *allowed: RunState, message: str = NOT_POSSIBLE) -> RunState:
        """Raise :class:`MachineError` (QMP: GenericError) unless the run state is one of
        ``allowed``; ``message`` may use ``{command}`` and ``{state}``."""
        return self._run.require(command, *allowed, message=message)

    @property
    def running(self) -> bool:
        return self._state is RunState.RUNNING

    def set_state(self, state: RunState) -> None:
        """Set a non-running state label (inmigrate, postmigrate) on a stopped machine."""
        with self._lock:
            if self._state is RunState.RUNNING:
                raise MachineError(f"cannot mark a running machine {state.value}")
            if self._state is RunState.SHUTDOWN and state is not RunState.POSTMIGRATE:
                return   # shut down (e.g. a signal) before the label was set: stays down
            self._run.set(state)

    def start(self, paused: bool = False, paused_state: RunState = RunState.PAUSED) -> None:
        """Start the vCPU threads; they run at once unless ``paused``, in which case the
        machine waits in ``paused_state`` (``prelaunch`` for ``-S``) for :meth:`resume`."""
        with self._lock:
            if self._threads:
                raise MachineError("machine already started")
            if self._state is RunState.SHUTDOWN:
                paused = True   # shut down (e.g. a signal) before it started: stays down
            else:
                self._run.set(paused_state if paused else RunState.RUNNING)
            for index, vcpu in enumerate(self.vcpus):
                thread = threading.Thread(target=self._vcpu_loop, args=(index, vcpu),
                                          name=f"vcpu{index}", daemon=True)
                self._threads.append(thread)
                thread.start()
        if not paused:
            self._emit("RESUME")

    def pause(self) -> bool:
        """Stop every vCPU at an architectural point; True if it was running."""
        with self._lock:
            if self._state is not RunState.RUNNING:
                return False
            self._run.set(RunState.PAUSED)
        self._kick_all()
        self._wait_parked()
        self._emit("STOP")
        return True

    def resume(self) -> bool:
        """Let the vCPUs run again; True if the machine was stopped."""
        with self._lock:
            if self._state is RunState.RUNNING:
                return False
            if self._state is RunState.SHUTDOWN:
                raise MachineError("the guest has shut down")
            if not self._threads:
                raise MachineError("machine has not been started")
            self._run.set(RunState.RUNNING)
        self._emit("RESUME")
        return True

    def console_input(self, data: bytes) -> int:
        """Host console bytes into the UART (hv/console_input.py); how many it took: 0
        while an incoming migration has not arrived (restoring it would drop them)."""
        with self._lock:
            uart = self.devices.get("serial0") or self.devices.get("pl011")
            if uart is None or self.state in (RunState.INMIGRATE, RunState.SHUTDOWN):
                return 0
            return uart.device.enqueue_input(data)  # type: ignore[attr-defined]

    def request_shutdown(self, reason: str) -> None:
        """End the machine (guest power-off, quit, signal); idempotent."""
        if not self._run.shut_down(reason):
            return
        self._kick_all()
        self._emit("SHUTDOWN", {"guest": reason == "guest-shutdown", "reason": reason})

    def wait_shutdown(self, timeout: float | None = None) -> str | None:
        """Block until the machine shuts down; the reason, or None on timeout."""
        return self._run.wait_shutdown(timeout)

    def system_reset(self, reason: str = "host-qmp-system-reset") -> None:
        """Reset devices and vCPUs and reload the kernel, as a reset button would;
        ``reason`` goes into the RESET event ("guest-reset": the guest asked)."""
        was_running = self.pause()
        with self._lock:
            for slot in self.devices.values():
                slot.device.restore(slot.state_type())
            if self.kernel_image is not None:
                self.load_kernel(self.kernel_image, self.initrd_image)
        self._emit("RESET", {"guest": reason.startswith("guest"), "reason": reason})
        if was_running:
            self.resume()

    def close(self) -> None:
        """Stop the vCPU threads and release the backend VM and RAM."""
        with self._lock:
            self._run.closing = True
            self._throttle_percent = 0
            if self._state is RunState.RUNNING:
                self._run.set(RunState.PAUSED)
            self._state_changed.notify_all()
        self._kick_all()
        for thread in self._threads:
            thread.join(PAUSE_TIMEOUT)
            if thread.is_alive():
                log.error("%s did not stop", thread.name)
        self._threads = []
        self.vm.close()
        self.memory.close()
        self.pci.close()

    # -- throttling (migration auto-converge) ---------------------------------------------
    def set_throttle(self, percent: int) -> None:
        """Keep the vCPUs off the CPU ``percent``% of the time (0 turns it off).

        Every ``THROTTLE_SLICE`` of guest run time a throttle thread kicks the vCPUs,
        which then sleep ``percent / (100 - percent)`` slices, as QEMU's auto-converge.
        """
        percent = max(0, min(99, percent))
        with self._lock:
            if percent and not self._throttle_percent:
                self._throttle_ran_since = [time.monotonic()] * len(self.vcpus)
            self._throttle_percent = percent
            if percent and self._throttle_thread is None:
                self._throttle_thread = threading.Thread(target=self._throttle_loop, name="throttle", daemon=True)
                self._throttle_thread.start()
        self._throttle_wake.set()

    @property
    def throttle_percent(self) -> int:
        return self._throttle_percent

    def _throttle_loop(self) -> None:
        while True:
            with self._lock:
                if self._run.closing or not self._throttle_percent:
                    self._throttle_thread = None
                    return
            self._throttle_wake.wait(THROTTLE_SLICE / 2)
            self._throttle_wake.clear()
            if self._throttle_percent and self._state is RunState.RUNNING:
                now = time.monotonic()
                for index, vcpu in enumerate(self.vcpus):
                    if now - self._throttle_ran_since[index] >= THROTTLE_SLICE:
                        vcpu.kick()

    def _throttle_pause(self, index: int) -> None:
        """Sleep off a throttle kick, once the vCPU has had its slice of run time.

        Slices are counted from the end of the vCPU's last throttle sleep, so a kick that
        arrived while it slept (and is delivered as soon as it runs again) is ignored:
        otherwise at 50% and more the guest would hardly run at all.
        """
        percent = self._throttle_percent
        if not percent or self._state is not RunState.RUNNING:
            return
        if time.monotonic() - self._throttle_ran_since[index] < THROTTLE_SLICE * 0.9:
            return
        time.sleep(THROTTLE_SLICE * percent / (100 - percent))
        self._throttle_ran_since[index] = time.monotonic()

    def _accepts_device_dma(self) -> bool:
        return self._state is RunState.RUNNING and not self._run.closing

    def vcpu_thread_ids(self) -> list[int]:
        """Host thread ids of the vCPU threads (0 before start)."""
        return [t.native_id or 0 for t in self._threads] or [0] * len(self.vcpus)

    def _kick_all(self) -> None:
        for vcpu in self.vcpus:
            vcpu.kick()

    def _wait_parked(self) -> None:
        deadline = time.monotonic() + PAUSE_TIMEOUT
        with self._lock:
            while len(self._parked) < len(self._threads):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise MachineError("vCPUs did not stop within %.0f s" % PAUSE_TIMEOUT)
                self._state_changed.wait(remaining)

    # -- vCPU threads -------------------------------------------------------------------
    def _may_run(self, index: int) -> bool:
        return (self._state is RunState.RUNNING and not self._halted[index] and not self._run.closing
                and self._power[index] == POWER_ON)

    def _vcpu_loop(self, index: int, vcpu: Vcpu) -> None:
        irq = self.interrupts
        if irq is None:
            self._vcpu_loop_no_irq(index, vcpu)
            return
        irq.bind_thread(index)
        while True:
            with self._lock:
                irq.start_timer_thread()
                action = self._wait_runnable(index, irq)
                if action is None:
                    return
                if action == "settle":
                    # A vector handed to KVM has not provably reached the guest: run once
                    # more (the guest is entered, takes it, exits) before parking.
                    irq.settle(index, vcpu)
                else:
                    if action == "wake":
                        if not irq.wake(index, vcpu):   # IF=0: the halt goes on
                            continue
                        self._halted[index] = False
                    irq.before_run(index, vcpu)
            result = vcpu.run(self)
            irq.after_run(index, vcpu, result)
            self._handle_exit(index, result)

    def _wait_runnable(self, index: int, irq: InterruptController | GicController) -> str | None:
        """Big lock held: wait (parked) until vCPU ``index`` has something to do.

        Returns "run", "wake" (halted, an interrupt is deliverable), "settle" (paused, but
        an injection must reach the guest first) or None when the machine closes.
        """
        parked = False
        while True:
            irq.sync_clock()   # guest time runs exactly while the machine runs
            if self._run.closing:
                self._parked.add(index)
                self._state_changed.notify_all()
                return None
            if self._pending_start[index] is not None:
                self._apply_start(index)
            action = None
            timeout = None
            if self._power[index] != POWER_ON:
                pass    # powered off / waiting for SIPI: parked until CPU_ON / SIPI
            elif self._state is RunState.RUNNING:
                if not self._halted[index]:
                    action = "run"
                else:
                    timeout = irq.halt_timeout(index)   # fires this vCPU's due timer
                    if irq.wants_wake(index):
                        action = "wake"
            elif irq.must_settle(index):
                action = "settle"
            if action is not None:
                if parked:
                    self._parked.discard(index)
                return action
            if not parked:
                parked = True
                self._parked.add(index)
                self._state_changed.notify_all()
            self._state_changed.wait(timeout)

    def _vcpu_loop_no_irq(self, index: int, vcpu: Vcpu) -> None:
        while True:
            with self._lock:
                if not self._may_run(index):
                    self._parked.add(index)
                    self._state_changed.notify_all()
                    while not self._may_run(index) and not self._run.closing:
                        self._state_changed.wait()
                    self._parked.discard(index)
                if self._run.closing:
                    self._parked.add(index)
                    self._state_changed.notify_all()
                    return
            result = vcpu.run(self)
            self._handle_exit(index, result)

    def _handle_exit(self, index: int, result: Exit) -> None:
        reason = result.reason
        if reason is ExitReason.KICKED or reason is ExitReason.IRQ_WINDOW:
            self._throttle_pause(index)
            return
        if reason is ExitReason.HALT:
            # The vCPU waits in _vcpu_loop until an interrupt is deliverable (q35); without
            # an interrupt controller (virt) it stays halted until reset.
            with self._lock:
                self._halted[index] = True
                self._state_changed.notify_all()
            log.debug("vcpu%d halted", index)
        elif reason is ExitReason.CPU_OFF:
            with self._lock:
                self._power[index] = POWER_OFF
                self._halted[index] = False
                self._state_changed.notify_all()
            log.info("vcpu%d: PSCI CPU_OFF", index)
        elif reason is ExitReason.SYSTEM_OFF:
            log.info("guest requested power-off (PSCI SYSTEM_OFF)")  # as q35's ACPI line
            self.request_shutdown("guest-shutdown")
        elif reason is ExitReason.SYSTEM_RESET:
            log.info("vcpu%d: guest reset (%s)", index, result.detail or "reset request")
            threading.Thread(target=self.system_reset, name="reset", daemon=True).start()
            with self._lock:  # park until the reset thread has reloaded the machine
                while self._state is RunState.RUNNING and not self._run.closing:
                    self._state_changed.wait(0.05)
        else:
            message = f"vcpu{index}: {result.detail or reason.value}"
            log.error("guest stopped on an internal error: %s", message)
            with self._lock:
                self.exit_error = message
            self.request_shutdown("internal-error")

    def _on_sleep(self, slp_typ: int) -> None:
        # Called from a vCPU thread inside pio_write (big lock held).
        log.info("guest requested power-off (ACPI SLP_TYP %d)", slp_typ)
        self.request_shutdown("guest-shutdown")

    # -- snapshots ------------------------------------------------------------------------
    def save(self) -> MachineSnapshot:
        """Capture CPU and device state; the machine must not be running."""
        with self._lock:
            if self._state is RunState.RUNNING:
                raise MachineError("pause the machine before saving it")
            cpus = []
            for index, vcpu in enumerate(self.vcpus):
                self._apply_start(index)   # every vCPU is parked: safe from this thread
                state = vcpu.get_state()
                state.halted = self._halted[index]
                state.power = self._power[index]
                cpus.append(state)
            devices = {name: {"version": slot.state_type.VERSION, "state": slot.device.save().to_dict()}
                       for name, slot in self.devices.items()}
        return MachineSnapshot(self.fingerprint(), cpus, devices)

    def restore(self, snapshot: MachineSnapshot) -> None:
        """Load CPU and device state captured by :meth:`save` (on any backend).

        Everything is validated first; on error nothing has been changed.
        """
        if len(snapshot.cpus) != len(self.vcpus):
            raise DeviceStateError(f"snapshot has {len(snapshot.cpus)} vCPUs, machine has {len(self.vcpus)}")
        for state in snapshot.cpus:
            if state.ARCH != self.arch.value:
                raise DeviceStateError(f"snapshot CPU state is {state.ARCH}, machine is {self.arch.value}")
            if state.power is not None and state.power not in POWER_STATES[self.arch.value]:
                raise DeviceStateError(f"snapshot CPU power state {state.power!r} is not valid on {self.arch.value}")
        absent = set(self.devices) - set(snapshot.devices)
        if set(snapshot.devices) - set(self.devices) or absent - set(LEGACY_DEVICE_IDS):
            raise DeviceStateError(
                f"snapshot devices {sorted(snapshot.devices)} differ from machine devices {sorted(self.devices)}")
        device_states = {}
        for name, record in snapshot.devices.items():
            slot = self.devices[name]
            device_states[name] = restore_state(slot.state_type, record, f"device {name}")
        with self._lock:
            if self._state is RunState.RUNNING:
                raise MachineError("cannot restore into a running machine")
            for name, state in device_states.items():
                self.devices[name].device.restore(state)
            for name in absent:     # a stream from an hv without legacy devices: reset state
                self.devices[name].device.restore(self.devices[name].state_type())
            for index, (vcpu, cpu) in enumerate(zip(self.vcpus, snapshot.cpus)):
                vcpu.set_state(dataclasses.replace(cpu))
                self._halted[index] = cpu.halted
                self._pending_start[index] = None
                # A version-1 state has no power state: its vCPU 0 ran, the others
                # never did (they stay off / waiting for SIPI).
                self._power[index] = cpu.power if cpu.power is not None else \
                    POWER_ON if index == 0 else self._off_state


class PsciPower:
    """A vCPU's view of the machine's PSCI power controller (the backend's power
    handler): CPU_ON and AFFINITY_INFO go to the machine; CPU_OFF is an exit."""

    def __init__(self, machine: Machine, index: int) -> None:
        self.machine = machine
        self.index = index

    def cpu_on(self, target_mpidr: int, entry: int, context_id: int) -> int:
        return self.machine.psci_cpu_on(target_mpidr, entry, context_id)

    def affinity_info(self, target_mpidr: int, lowest_level: int) -> int:
        return self.machine.psci_affinity_info(target_mpidr, lowest_level)


def ram_layout(config: VmConfig) -> list[RegionSpec]:
    base = Q35_RAM_BASE if config.machine is MachineType.Q35 else VIRT_RAM_BASE
    return [RegionSpec(base, config.memory_bytes)]
