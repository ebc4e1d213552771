"""The machine's devices: the device list, PCI wiring, hot-plug, fingerprint, save/restore.

Every device the machine saves is a :class:`DeviceSlot` in :attr:`DeviceManager.devices`,
in a fixed order (a reset restores devices in this order). Boards add their own devices
(:meth:`DeviceManager.add`) and then the PCI host and its functions
(:meth:`DeviceManager.build_pci`, :mod:`hv.machine.pci_wiring`), whose interrupts they
route with a :class:`PciIrqRouting`. All of it runs under the machine's big lock.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from hv.config import VmConfig
from hv.devconfig import DevConfigError, DeviceConfig
from hv.devices.bus import Bus
from hv.devices.interfaces import DeviceStateError, UnconnectedLine
from hv.devices.irqline import SharedLine, SharedLineInput
from hv.devices.pci import UnconnectedMsi, parse_devfn
from hv.devices.pcie_root_port import PcieRootPort
from hv.devices.persist import restore_state
from hv.devices.virtio_net import VirtioNetPciDevice
from hv.machine.legacy import LEGACY_DEVICE_IDS
from hv.machine.pci_wiring import (
    PciSetup,
    build_pci,
    plug_device,
    plug_net_device,
    unplug_device,
)
from hv.machine.runstate import NOT_POSSIBLE, MachineError, RunState, RunStateTracker
from hv.memory import GuestMemory

log = logging.getLogger(__name__)

#: Run states in which a device may be plugged or unplugged.
HOTPLUG_STATES = (RunState.PRELAUNCH, RunState.RUNNING, RunState.PAUSED, RunState.INTERNAL_ERROR)


class PersistentDevice(Protocol):
    def save(self) -> Any: ...

    def restore(self, state: Any) -> None: ...


@dataclass
class DeviceSlot:
    """A device known to the machine: how to save it and how to describe it."""

    name: str
    kind: str
    device: PersistentDevice
    state_type: type[Any]   # a state dataclass with VERSION (hv.devices.persist.DeviceState)
    bus: str   # "port" | "mmio" | "pcie.0"
    addr: str  # "0x3f8", "03.0"
    attrs: dict[str, str] = dataclasses.field(default_factory=dict)  # must match across a migration


@dataclass(frozen=True)
class PciIrqRouting:
    """How a board delivers PCI interrupts: ``msi()`` is the sink of MSI-X/MSI messages;
    INTx pin ``pin`` of a function routed to ``slot`` of pcie.0 drives input
    ``intx_number(slot, pin)`` of the interrupt controller, ``line(number)`` (named
    ``line_name.format(number)``)."""

    msi: Callable[[], Any]
    intx_number: Callable[[int, int], int]
    line: Callable[[int], Any]
    line_name: str


class DeviceManager:
    """The devices of one machine and everything done to them as a set."""

    def __init__(self, run: RunStateTracker, config: VmConfig, memory: GuestMemory, pio: Bus, mmio: Bus) -> None:
        self.run = run
        self.config = config
        self.memory = memory
        self.pio = pio
        self.mmio = mmio
        self.devices: dict[str, DeviceSlot] = {}
        self.pci: PciSetup | None = None
        self.irq_routing: PciIrqRouting | None = None
        self.intx_lines: dict[int, SharedLine] = {}   # GSI (q35) or INTID (virt) -> wire-OR of the functions' INTx

    # -- building ------------------------------------------------------------------------
    def add(self, name: str, kind: str, device: PersistentDevice, state_type: type,
            bus: Bus, base: int, size: int) -> None:
        """Put ``device`` on ``bus`` at ``base`` and in the device list."""
        bus.add(base, size, device, name)  # type: ignore[arg-type]
        self.devices[name] = DeviceSlot(name, kind, device, state_type, bus.kind, f"{base:#x}")

    def add_slot(self, slot: DeviceSlot) -> None:
        """A device that is on no bus of its own (or on several windows) in the device list."""
        self.devices[slot.name] = slot

    def build_pci(self) -> list[tuple[int, int]]:
        """The PCI host and the ``-device`` functions (after the board's own devices);
        their MMIO windows."""
        # A live-migration destination opens its images unlocked and takes the locks over
        # from the source at the switch-over.
        incoming_live = self.config.incoming_live
        pci = self.pci = build_pci(self.config.machine, self.memory, self.pio, self.mmio,
                                   self.config.drives, self.config.devices,
                                   lock_images=not incoming_live, taken_names=list(self.devices),
                                   netdevs=self.config.netdevs)
        for slot in pci.slots:
            self.devices[slot.name] = DeviceSlot(slot.name, slot.kind, slot.device, slot.state_type,
                                                 slot.bus, slot.addr, {k: str(v) for k, v in slot.attrs.items()})
            if isinstance(slot.device, VirtioNetPciDevice):
                # Received frames go into guest RAM at once (under the big lock, only
                # while running) and raise the rx interrupt, instead of waiting for a kick.
                slot.device.enable_async_rx(self.run.lock, self.accepts_device_dma)
        return pci.mmio_windows

    def accepts_device_dma(self) -> bool:
        return self.run.running and not self.run.closing

    def close(self) -> None:
        if self.pci is not None:
            self.pci.close()

    # -- PCI interrupts ------------------------------------------------------------------
    def wire_pci_interrupts(self, routing: PciIrqRouting) -> None:
        """q35: MSI-X/MSI messages go to the local APICs, INTx pins to IOAPIC inputs 16-23.
        virt: MSI-X/MSI messages go to the GICv2m frame, INTx pins to SPIs 3-6 (INTIDs 35-38).
        On both, an INTx input is a wire-OR of the functions sharing it; a function
        behind a root port has its pin swizzled to the port's slot (PCI bridge rule)."""
        assert self.pci is not None
        self.irq_routing = routing
        for devfn, function in sorted(self.pci.host.functions.items()):
            self._wire_pci_function(routing, devfn, function)
        for bus, port in self.pci.ports.items():
            for fn, child in sorted(port.children.items()):
                self._wire_pci_function(routing, fn, child, bus)

    def _wire_pci_function(self, routing: PciIrqRouting, devfn: int, function: Any, bus: str = "pcie.0") -> None:
        """One function's MSI-X (MSI) sink and INTx pin (see :meth:`wire_pci_interrupts`).
        ``devfn`` is on ``bus``: pcie.0 or a root port's id."""
        assert self.pci is not None
        table = getattr(function, "msix", None)
        if table is not None:
            table.sink = routing.msi()
        if isinstance(function, PcieRootPort):
            function.msi_sink = routing.msi()
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
        number = routing.intx_number(routed_slot, pin)
        line = self.intx_lines.get(number)
        if line is None:
            line = self.intx_lines[number] = SharedLine(routing.line(number), self.run.lock,
                                                        routing.line_name.format(number))
        function.intx = line.attach(key)
        if isinstance(function, PcieRootPort):
            function.drive_intx()
            return
        # The function may already assert INTx (a restored ISR): drive the shared line now.
        isr = getattr(getattr(function, "s", None), "isr", 0)
        if isr and not function.command & 0x400:
            function.intx.set_level(True)

    # -- hot-plug (QMP device_add / device_del) ----------------------------------------
    def hotplug(self, device: DeviceConfig) -> DeviceSlot:
        """Plug a virtio-blk-pci or virtio-net-pci function for ``device`` (see
        :meth:`hv.machine.machine.Machine.hotplug_device`); on error nothing changed."""
        assert self.pci is not None
        drives = {d.id: d for d in self.config.drives}
        netdevs = {n.id: n for n in self.config.netdevs}
        with self.run.lock:
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
            if self.irq_routing is not None:
                devfn_slot, devfn_fn = parse_devfn(pci_slot.addr)
                self._wire_pci_function(self.irq_routing, devfn_slot << 3 | devfn_fn, pci_slot.device,
                                        pci_slot.bus)
            if isinstance(pci_slot.device, VirtioNetPciDevice):
                pci_slot.device.enable_async_rx(self.run.lock, self.accepts_device_dma)
                pci_slot.device.start()
            self.devices[slot.name] = slot
            port = self.pci.ports.get(pci_slot.bus)
            if port is not None:
                port.plug()   # presence + link up, PDC + DLLSC, the hot-plug interrupt
        log.info("hot-plugged %s %s at %s %s", slot.kind, slot.name, slot.bus, slot.addr)
        return slot

    def hotunplug(self, device_id: str) -> DeviceSlot:
        """Remove PCI device ``device_id`` (see
        :meth:`hv.machine.machine.Machine.hotunplug_device`); on error nothing changed."""
        assert self.pci is not None
        with self.run.lock:
            self._check_hotplug_state("device_del")
            slot = self.devices.get(device_id)
            if slot is None or slot.bus not in self.pci.buses:
                raise MachineError(f"Device '{device_id}' not found" if slot is None else
                                   f"device_del: {device_id} ({slot.kind}) is not a hot-pluggable device")
            function: Any = slot.device   # duck-typed: a PCI function may carry intx and msix (checked below)
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
        state = self.run.require(command, *HOTPLUG_STATES)
        if self.run.closing:
            raise MachineError(NOT_POSSIBLE.format(command=command, state=state.value))

    # -- migration: fingerprint, save, restore -------------------------------------------
    def describe(self, source: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        """The device part of the migration fingerprint. With ``source`` (an incoming
        stream's fingerprint), legacy devices that the source lacks (an older hv) are
        left out: they keep their reset state (see :meth:`check_states`)."""
        present = None if source is None else {d.get("id") for d in source.get("devices", []) if isinstance(d, dict)}
        return [{"type": s.kind, "id": s.name, "bus": s.bus, "addr": s.addr, "attrs": dict(s.attrs)}
                for s in self.devices.values()
                if present is None or s.name in present or s.name not in LEGACY_DEVICE_IDS]

    def save(self) -> dict[str, dict[str, Any]]:
        """Big lock held: every device's state, name -> {"version", "state"}."""
        return {name: {"version": slot.state_type.VERSION, "state": slot.device.save().to_dict()}
                for name, slot in self.devices.items()}

    def check_states(self, records: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
        """Parse saved device records; the states by name and the legacy devices absent
        from them. Raises :class:`DeviceStateError`; nothing changes."""
        absent = set(self.devices) - set(records)
        if set(records) - set(self.devices) or absent - set(LEGACY_DEVICE_IDS):
            raise DeviceStateError(
                f"snapshot devices {sorted(records)} differ from machine devices {sorted(self.devices)}")
        states = {}
        for name, record in records.items():
            slot = self.devices[name]
            states[name] = restore_state(slot.state_type, record, f"device {name}")
        return states, absent

    def load(self, states: dict[str, Any], absent: set[str]) -> None:
        """Big lock held, vCPUs parked: restore what :meth:`check_states` returned."""
        for name, state in states.items():
            self.devices[name].device.restore(state)
        for name in absent:     # a stream from an hv without legacy devices: reset state
            self.devices[name].device.restore(self.devices[name].state_type())

    def reset(self) -> None:
        """Big lock held: every device to its reset state, in list order."""
        for slot in self.devices.values():
            slot.device.restore(slot.state_type())
