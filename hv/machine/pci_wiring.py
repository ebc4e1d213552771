"""Wiring of the PCI Express host and its devices into a machine's buses.

The machine calls :func:`build_pci` once while it builds its devices. Addresses are
QEMU's:

| | q35 (x86_64) | virt (aarch64) |
|---|---|---|
| config mechanism #1 | ports 0xCF8-0xCFF | - |
| ECAM | 0xB0000000, 256 MiB (buses 0-255) | 0x3F000000, 16 MiB (buses 0-15) |
| 32-bit MMIO window (BARs) | 0xC0000000-0xFEBFFFFF | 0x10000000-0x3EFEFFFF |
| I/O window | ports 0xC000-0xFFFF | 0x3EFF0000, 64 KiB (PCI I/O 0-0xFFFF) |
| host bridge 0:0.0 | 8086:29c0 | 1b36:0008 |

The host bridge function is left out when a ``-device`` asks for slot 0 of pcie.0
(StratoVirt's walkthrough uses ``addr=0`` for its disk); guests do not need it to
enumerate pcie.0.

``-device pcie-root-port,id=pcie.1,...`` functions are built first; each one's ``id``
names a secondary bus taking one device (``bus=pcie.1,addr=0[.F]``). Firmware-style bus
numbers are assigned at build time: root port k (1, 2, ... in slot order on pcie.0) gets
secondary = subordinate = k (the guest may renumber).

BARs start unassigned (address 0, decoding off): the guest sizes and programs them, as
firmware would. :func:`preassign_bars` places them the way a firmware would, for guests
that expect it. ``mmio_windows`` lists what a backend without exits for unmapped
addresses (Unicorn) must route to the machine's MMIO bus.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from hv.block import BlockBackend, BlockError
from hv.boards.q35 import layout as q35_layout
from hv.boards.virt import layout as virt_layout
from hv.devconfig import (
    HOTPLUG_DRIVERS,
    ROOT_BUS,
    DevConfigError,
    DeviceConfig,
    DriveConfig,
    NetdevConfig,
)
from hv.devices.bus import Bus
from hv.devices.pci import (
    BAR_IO,
    BAR_MEM64,
    COMMAND,
    COMMAND_IO,
    COMMAND_MASTER,
    COMMAND_MEMORY,
    HostBridge,
    PciBarWindow,
    PciBridge,
    PciConfigPorts,
    PciEcam,
    PciError,
    PciFunction,
    PciHost,
    PciHostState,
    format_devfn,
    parse_devfn,
)
from hv.devices.pcie_root_port import PcieRootPort, PcieRootPortState
from hv.devices.virtio_blk import VirtioBlk
from hv.devices.virtio_net import (
    VirtioNet,
    VirtioNetPciDevice,
    VirtioNetState,
    format_mac,
    parse_mac,
)
from hv.devices.virtio_pci import VirtioPciDevice, VirtioPciState
from hv.memory import GuestMemory
from hv.net import NetBackend, NetError, open_netdev

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PciLayout:
    ecam_base: int
    ecam_buses: int
    mmio_base: int
    mmio_size: int
    io_base: int          # CPU address of PCI I/O 0 (mmio) or first port (pio)
    io_size: int
    io_on_pio: bool
    config_port: int | None   # first of the 0xCF8-0xCFF configuration ports, None: ECAM only
    bridge_ids: tuple[int, int]


LAYOUTS = {
    "q35": PciLayout(q35_layout.ECAM_BASE, q35_layout.ECAM_BUSES, q35_layout.PCI_MMIO32_BASE,
                     q35_layout.PCI_MMIO32_SIZE, q35_layout.PCI_IO_BASE, q35_layout.PCI_IO_SIZE, True,
                     q35_layout.PCI_CONFIG_PORT, q35_layout.PCI_HOST_BRIDGE_IDS),
    "virt": PciLayout(virt_layout.ECAM_BASE, virt_layout.ECAM_BUSES, virt_layout.PCI_MMIO32_BASE,
                      virt_layout.PCI_MMIO32_SIZE, virt_layout.PCI_IO_WINDOW, virt_layout.PCI_IO_SIZE, False,
                      None, virt_layout.PCI_HOST_BRIDGE_IDS),
}


@dataclass
class PciSlot:
    """A device for the machine's save/restore list and the migration fingerprint."""

    name: str
    kind: str
    device: Any          # has save() / restore()
    state_type: type
    bus: str             # "pcie.0" or a root port's id for functions, "mmio"/"port" for the host's ranges
    addr: str            # "03.0" for functions
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass
class PciSetup:
    host: PciHost
    layout: PciLayout
    mmio_windows: list[tuple[int, int]]
    slots: list[PciSlot]
    blocks: dict[str, BlockBackend]     # drive id -> open image
    nets: dict[str, NetBackend] = field(default_factory=dict)   # netdev id -> open backend
    ports: dict[str, PcieRootPort] = field(default_factory=dict)   # root port id (its bus) -> port

    @property
    def buses(self) -> set[str]:
        """The PCI bus ids: pcie.0 and every root port's secondary bus."""
        return {ROOT_BUS, *self.ports}

    def fingerprint_devices(self) -> list[dict[str, Any]]:
        """Entries for ``Machine.fingerprint()['devices']`` (type, id, bus, addr, attrs)."""
        return [{"type": s.kind, "id": s.name, "bus": s.bus, "addr": s.addr, "attrs": dict(s.attrs)}
                for s in self.slots]

    def release_locks(self) -> None:
        """Migration source at switch-over: let the destination lock the images (and
        take the network sockets/taps over)."""
        for block in self.blocks.values():
            block.release()
        for net in self.nets.values():
            net.release()

    def acquire_locks(self) -> None:
        """Migration destination at switch-over (or on a failed migration, the source)."""
        for block in self.blocks.values():
            block.acquire()
        for net in self.nets.values():
            net.acquire()

    def close(self) -> None:
        for block in self.blocks.values():
            block.close()
        for net in self.nets.values():
            net.close()


def build_pci(machine_type: str, memory: GuestMemory, pio: Bus, mmio: Bus,
              drives: Iterable[DriveConfig] = (), devices: Iterable[DeviceConfig] = (),
              lock_images: bool = True, taken_names: Iterable[str] = (),
              netdevs: Iterable[NetdevConfig] = ()) -> PciSetup:
    """Create the host bridge and every ``-device``, and put them on the buses.

    ``lock_images=False`` is for an incoming migration: the destination opens the images
    without locking them (and leaves netdev sockets/taps closed) and calls
    :meth:`PciSetup.acquire_locks` at switch-over.
    ``taken_names`` are the machine's other device names (``serial0``, ...): a ``-device``
    id may not reuse one, since names key the saved state.
    Raises :class:`DevConfigError` (one line) for any configuration problem.
    """
    layout = LAYOUTS.get(machine_type)
    if layout is None:
        raise DevConfigError(f"-machine {machine_type}: no PCI host for this machine")
    windows = [(layout.ecam_base, layout.ecam_buses << 20), (layout.mmio_base, layout.mmio_size)]
    if not layout.io_on_pio:
        windows.append((layout.io_base, layout.io_size))
    for base, size in windows:
        for region in memory.regions:
            if region.gpa < base + size and base < region.end:
                raise DevConfigError(f"-m: guest RAM {region.gpa:#x}-{region.end - 1:#x} overlaps the PCI "
                                     f"window at {base:#x}; use less memory")
    drive_map: dict[str, DriveConfig] = {}
    for drive in drives:
        if drive.id in drive_map:
            raise DevConfigError(f"-drive id={drive.id}: duplicate drive id")
        drive_map[drive.id] = drive
    netdev_map: dict[str, NetdevConfig] = {}
    for netdev in netdevs:
        if netdev.id in netdev_map:
            raise DevConfigError(f"-netdev id={netdev.id}: duplicate netdev id")
        netdev_map[netdev.id] = netdev

    devices = list(devices)
    # The seed walkthrough puts its disk at addr=0: then that device, not the host
    # bridge, is 0:0.0 (guests enumerate the root bus without a bridge function).
    slot0_claimed = any(device.slot == 0 and device.bus == ROOT_BUS for device in devices)
    host = PciHost(None if slot0_claimed else HostBridge(*layout.bridge_ids))
    if slot0_claimed:
        log.info("pcie.0: a -device takes slot 0, so the machine has no host bridge function")
    ecam = PciEcam(host, layout.ecam_buses)
    mmio.add(layout.ecam_base, ecam.size, ecam, "pcie-ecam")
    mmio.add(layout.mmio_base, layout.mmio_size, PciBarWindow(host, "mem", layout.mmio_base, layout.mmio_size),
             "pcie-mmio")
    if layout.io_on_pio:
        pio.add(layout.io_base, layout.io_size, PciBarWindow(host, "io", layout.io_base, layout.io_size), "pcie-io")
    else:
        mmio.add(layout.io_base, layout.io_size, PciBarWindow(host, "io", 0, layout.io_size), "pcie-io")
    if layout.config_port is not None:
        pio.add(layout.config_port, PciConfigPorts.SIZE, PciConfigPorts(host), "pci-conf")
    slots = [PciSlot("pcie.0", "pcie-host", host, PciHostState, "mmio", f"{layout.ecam_base:#x}")]
    setup = PciSetup(host, layout, windows, slots, {})
    names = {"pcie.0", *taken_names}
    ports = [device for device in devices if device.driver == "pcie-root-port"]
    try:
        for device in ports + [device for device in devices if device.driver != "pcie-root-port"]:
            if device.id in names:
                raise DevConfigError(f"-device {device.driver}: id={device.id} is already used by another device")
            names.add(device.id)
            if device.driver == "pcie-root-port":
                plug_root_port(setup, device)
                if device is ports[-1]:
                    _assign_bus_numbers(setup)
                continue
            if device.driver == "virtio-net-pci":
                plug_net_device(setup, memory, netdev_map.get(device.netdev or ""), device, attach=lock_images)
                continue
            plug_device(setup, memory, drive_map.get(device.drive), device, lock_image=lock_images)
        for unused in sorted(set(netdev_map) - set(setup.nets)):
            # Like a -drive without a device: kept for device_add, not opened until then.
            log.warning("-netdev id=%s: no device uses it yet (device_add virtio-net-pci can)", unused)
    except BaseException:
        setup.close()
        raise
    for slot in slots:   # receive only once everything is built (nothing to leak on errors)
        if isinstance(slot.device, VirtioNetPciDevice):
            slot.device.start()
    return setup


def plug_device(setup: PciSetup, memory: GuestMemory, drive: DriveConfig | None, device: DeviceConfig,
                lock_image: bool = True, option: str = "-device") -> PciSlot:
    """Open ``drive``'s image and plug a virtio-blk-pci function for ``device`` on its bus
    (pcie.0, or a root port's secondary bus: then only addr 0[.F]).

    The one code path for ``-device`` (:func:`build_pci`) and QMP ``device_add``
    (``Machine.hotplug_device``, which holds the machine's big lock). The new slot is
    appended to ``setup.slots`` and returned; the open image is ``setup.blocks[drive.id]``.
    ``option`` prefixes error messages (``-device`` or ``device_add``).
    Raises :class:`DevConfigError` (one line); on error ``setup`` is unchanged.
    """
    if device.driver != "virtio-blk-pci":
        raise DevConfigError(f"{option} {device.driver}: only virtio-blk-pci is handled here")
    if drive is None:
        raise DevConfigError(f"{option} {device.driver}: drive={device.drive}: no -drive with that id")
    if drive.id in setup.blocks:
        raise DevConfigError(f"{option} {device.driver}: drive={drive.id} is already used by a device")
    if any(s.name == device.id for s in setup.slots):
        raise DevConfigError(f"{option} {device.driver}: id={device.id} is already used by another device")
    port, slot, fn = _place(setup, device, option)
    try:
        block = BlockBackend(drive.file, readonly=drive.readonly, direct=drive.direct, lock=lock_image)
    except BlockError as exc:
        raise DevConfigError(f"-drive id={drive.id}: {exc.strerror}") from None
    serial = device.serial if device.serial is not None else drive.serial
    try:
        function = VirtioPciDevice(memory, VirtioBlk(memory, block, serial))
        _attach(setup, port, function, slot, fn)
    except PciError as exc:
        block.close()
        raise DevConfigError(f"{option} {device.driver},id={device.id}: {exc}") from None
    except BaseException:
        block.close()
        raise
    setup.blocks[drive.id] = block
    pci_slot = PciSlot(device.id, device.driver, function, VirtioPciState, device.bus, format_devfn(slot, fn),
                       {"drive": drive.id, "file": str(drive.file), "serial": serial or "",
                        "readonly": drive.readonly})
    setup.slots.append(pci_slot)
    return pci_slot




def unplug_device(setup: PciSetup, device_id: str) -> tuple[PciSlot, Callable[[], None]]:
    """Take virtio-blk-pci or virtio-net-pci ``device_id`` off its bus (pcie.0 or a port's).

    The reverse of :func:`plug_device` / :func:`plug_net_device`; the caller holds the
    machine's big lock. The function disappears from configuration space (reads as all
    ones), its BAR stops decoding, and a NIC stops delivering frames into guest RAM.
    Returns the slot and a ``close`` to call *after* releasing the big lock: it closes
    (and unlocks) the image or closes the netdev, whose reader thread may be waiting
    for that lock. Raises :class:`DevConfigError` (nothing changed) for an unknown id or
    a device that cannot be unplugged.
    """
    pci_slot = next((s for s in setup.slots if s.name == device_id and s.bus in setup.buses), None)
    if pci_slot is None:
        raise DevConfigError(f"device_del: no PCI device with id {device_id}")
    if pci_slot.kind == "pcie-root-port":
        inside = [s.name for s in setup.slots if s.bus == device_id]
        held = f" (it holds {', '.join(inside)})" if inside else ""
        raise DevConfigError(f"device_del: {device_id} is a pcie-root-port: root ports cannot be unplugged{held}")
    if pci_slot.kind not in HOTPLUG_DRIVERS:
        raise DevConfigError(f"device_del: {device_id} is a {pci_slot.kind}: only "
                             f"{' and '.join(HOTPLUG_DRIVERS)} can be unplugged")
    slot, fn = parse_devfn(pci_slot.addr)
    if pci_slot.bus == ROOT_BUS:
        setup.host.unplug(slot, fn)
    else:
        setup.host.unplug_child(setup.ports[pci_slot.bus], fn)
    resource: BlockBackend | NetBackend | None
    if pci_slot.kind == "virtio-net-pci":
        pci_slot.device.detach()
        resource = setup.nets.pop(str(pci_slot.attrs["netdev"]), None)
    else:
        resource = setup.blocks.pop(str(pci_slot.attrs["drive"]), None)
    setup.slots.remove(pci_slot)
    return pci_slot, (resource.close if resource is not None else (lambda: None))


DEFAULT_MAC = "52:54:00:12:34:56"


def plug_net_device(setup: PciSetup, memory: GuestMemory, netdev: NetdevConfig | None, device: DeviceConfig,
                    attach: bool = True, option: str = "-device") -> PciSlot:
    """Open the netdev's backend and plug a virtio-net-pci function for it on its bus.

    The one code path for ``-device`` and QMP ``device_add`` (the caller then starts
    the device's receiving with :meth:`VirtioNetPciDevice.start`). ``attach=False``
    (live-migration destination): the socket/tap is opened by
    :meth:`PciSetup.acquire_locks` at the switch-over, after the source released it.
    Raises :class:`DevConfigError` (one line); on error ``setup`` is unchanged.
    """
    if netdev is None:
        raise DevConfigError(f"{option} {device.driver}: netdev={device.netdev}: no -netdev with that id")
    if netdev.id in setup.nets:
        raise DevConfigError(f"{option} {device.driver}: netdev={netdev.id} is already used by a device")
    if any(s.name == device.id for s in setup.slots):
        raise DevConfigError(f"{option} {device.driver}: id={device.id} is already used by another device")
    port, slot, fn = _place(setup, device, option)
    if device.mac is not None:
        mac = parse_mac(device.mac)
    else:   # QEMU's default, made unique per NIC: 52:54:00:12:34:56, :57, ...
        base = bytes.fromhex(DEFAULT_MAC.replace(":", ""))
        used = {s.attrs.get("mac") for s in setup.slots}
        mac = next(m for m in (base[:5] + bytes([(base[5] + i) & 0xFF]) for i in range(256))
                   if format_mac(m) not in used)
    try:
        backend = open_netdev(netdev.kind, netdev.id, path=netdev.path, role=netdev.role, ifname=netdev.ifname,
                              attach=attach)
    except NetError as exc:
        raise DevConfigError(f"-netdev {netdev.kind},id={netdev.id}: {exc.strerror}") from None
    function = VirtioNetPciDevice(memory, VirtioNet(memory, backend, mac))
    try:
        _attach(setup, port, function, slot, fn)
    except PciError as exc:
        backend.close()
        raise DevConfigError(f"{option} {device.driver},id={device.id}: {exc}") from None
    except BaseException:
        backend.close()
        raise
    setup.nets[netdev.id] = backend
    attrs = {"netdev": netdev.id, "mac": format_mac(mac)}
    pci_slot = PciSlot(device.id, device.driver, function, VirtioNetState, device.bus, format_devfn(slot, fn),
                       attrs)
    setup.slots.append(pci_slot)
    return pci_slot


def plug_root_port(setup: PciSetup, device: DeviceConfig, option: str = "-device") -> PciSlot:
    """Plug a ``pcie-root-port`` on pcie.0; its id becomes a bus. Bus numbers are
    assigned by :func:`_assign_bus_numbers` once every port is built."""
    if any(s.name == device.id for s in setup.slots):
        raise DevConfigError(f"{option} {device.driver}: id={device.id} is already used by another device")
    _, slot, fn = _place(setup, device, option)
    try:
        port = PcieRootPort(device.port, device.chassis, device.physical_slot, device.multifunction)
        setup.host.plug(port, slot, fn)
    except PciError as exc:
        raise DevConfigError(f"{option} {device.driver},id={device.id}: {exc}") from None
    port.devfn = slot << 3 | fn
    setup.ports[device.id] = port
    attrs = {"port": device.port, "chassis": device.chassis, "slot": port.physical_slot,
             "multifunction": device.multifunction}
    pci_slot = PciSlot(device.id, device.driver, port, PcieRootPortState, ROOT_BUS, format_devfn(slot, fn), attrs)
    setup.slots.append(pci_slot)
    return pci_slot


def _assign_bus_numbers(setup: PciSetup) -> None:
    """Root port k (1, 2, ... in slot order) gets secondary = subordinate = k, as firmware
    enumerating pcie.0 depth-first would."""
    for number, (_, port) in enumerate(setup.host.bridges(), start=1):
        if number >= setup.layout.ecam_buses:
            raise DevConfigError(f"-device pcie-root-port: too many root ports (the ECAM covers buses "
                                 f"0-{setup.layout.ecam_buses - 1})")
        if isinstance(port, PcieRootPort):
            port.firmware_buses = (0, number, number)
        port.set_bus_numbers(0, number, number)


def _occupant(setup: PciSetup, function: PciFunction) -> str:
    if function is setup.host.bridge:
        return "the host bridge"
    name = next((s.name for s in setup.slots if s.device is function), None)
    if isinstance(function, PcieRootPort) and name is not None:
        return f"root port {name}"
    return "another device"


def _place(setup: PciSetup, device: DeviceConfig, option: str) -> tuple[PcieRootPort | None, int, int]:
    """Where ``device`` goes: (root port or None for pcie.0, slot, function); a clear
    one-line DevConfigError when the bus does not exist or the address is taken."""
    host = setup.host
    where = f"{option} {device.driver},id={device.id}"
    if device.bus == ROOT_BUS:
        slot, fn = (device.slot, device.function) if device.slot is not None else (_free_slot(host), 0)
        if slot << 3 | fn in host.functions:
            raise DevConfigError(f"{where}: addr={slot:#x}.{fn} on pcie.0 is taken by "
                                 f"{_occupant(setup, host.functions[slot << 3 | fn])}")
        return None, slot, fn
    port = setup.ports.get(device.bus)
    if port is None:
        raise DevConfigError(f"{option} {device.driver}: bus={device.bus}: no such bus")
    slot, fn = (device.slot, device.function) if device.slot is not None else (0, 0)
    if slot != 0:
        raise DevConfigError(f"{where}: addr={slot:#x}.{fn} on {device.bus}: a root port's bus has one "
                             f"device, at addr=0 (functions 0.0-0.7)")
    if fn in port.children:
        raise DevConfigError(f"{where}: addr=0x0.{fn} on {device.bus} is taken by "
                             f"{_occupant(setup, port.children[fn])}")
    return port, slot, fn


def _attach(setup: PciSetup, port: PcieRootPort | None, function: PciFunction, slot: int, fn: int) -> None:
    if port is None:
        setup.host.plug(function, slot, fn)
    else:
        setup.host.plug_child(port, function, fn)


def _free_slot(host: PciHost) -> int:
    for slot in range(1, 32):
        if not any((slot << 3 | fn) in host.functions for fn in range(8)):
            return slot
    raise DevConfigError("-device: no free slot on pcie.0")


BRIDGE_MEM_RESERVE = 2 << 20     # memory window kept for a root port's hot-plugged device
BRIDGE_MEM_ALIGN = 1 << 20
BRIDGE_IO_ALIGN = 0x1000


def preassign_bars(setup: PciSetup) -> None:
    """Place every BAR in the windows and enable decoding, as firmware would.

    Root-bus BARs first (devfn order); then, per root port in slot order, a memory
    window (1 MiB aligned, at least :data:`BRIDGE_MEM_RESERVE` so a hot-plugged device
    fits) holding its children's BARs (prefetchable ones too: the prefetchable window
    is closed), an I/O window only if a child has an I/O BAR
    (else closed), and the port's memory/I/O/bus-master enables. Bus numbers were set
    at build time.
    """
    layout = setup.layout
    cursor = {"mem": layout.mmio_base, "io": 0x1000 if not layout.io_on_pio else layout.io_base}

    def place(function: PciFunction) -> None:
        command = function.command
        for spec in function.bars:
            if spec is None:
                continue
            offset = 0x10 + 4 * spec.index
            space = "io" if spec.kind == BAR_IO else "mem"
            address = cursor[space] = -(-cursor[space] // spec.size) * spec.size
            function.config_write(offset, 4, address & 0xFFFFFFFF)
            if spec.kind == BAR_MEM64:
                function.config_write(offset + 4, 4, address >> 32)
            cursor[space] += spec.size
            command |= COMMAND_IO if space == "io" else COMMAND_MEMORY
        function.config_write(COMMAND, 2, command)

    for devfn in sorted(setup.host.functions):
        function: PciFunction = setup.host.functions[devfn]
        if not isinstance(function, PciBridge):
            place(function)
    for _, bridge in setup.host.bridges():
        mem_base = cursor["mem"] = -(-cursor["mem"] // BRIDGE_MEM_ALIGN) * BRIDGE_MEM_ALIGN
        io_base = cursor["io"] = -(-cursor["io"] // BRIDGE_IO_ALIGN) * BRIDGE_IO_ALIGN
        for fn in sorted(bridge.children):
            place(bridge.children[fn])
        mem_end = max(-(-cursor["mem"] // BRIDGE_MEM_ALIGN) * BRIDGE_MEM_ALIGN, mem_base + BRIDGE_MEM_RESERVE)
        bridge.set_memory_window(mem_base, mem_end - 1)
        bridge.close_prefetchable_window()
        cursor["mem"] = mem_end
        command = bridge.command | COMMAND_MEMORY | COMMAND_MASTER
        if cursor["io"] > io_base:
            io_end = -(-cursor["io"] // BRIDGE_IO_ALIGN) * BRIDGE_IO_ALIGN
            bridge.set_io_window(io_base, io_end - 1)
            cursor["io"] = io_end
            command |= COMMAND_IO
        else:
            bridge.set_io_window(0xF000, 0)     # closed: base above limit
        bridge.config_write(COMMAND, 2, command)
