"""pcie-root-port: the type 1 header and PCIe/MSI capabilities a guest reads, bus-number
routing and bridge windows, the native hot-plug slot (surprise model: presence, link,
PDC/DLLSC, the hot-plug MSI or INTx), errors, save/restore and the migration fingerprint.

Unit tests use the real wiring and a real Machine on Unicorn and reach configuration space
the way a guest does (ECAM, and CF8/CFC on q35); the end-to-end tests start real hv
processes and speak raw QMP.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

from hv_backends import backend_class
from hv.config import parse_args
from hv.console import BufferSink
from hv.devconfig import DevConfigError, parse_device, parse_drive
from hv.devices.bus import Bus
from hv.boards.q35.layout import LAPIC_BASE
from hv.boards.virt.layout import V2M_BASE
from hv.devices.gicv2m import V2M_MSI_SETSPI_NS
from hv.devices.interfaces import DeviceStateError
from hv.devices.pcie_root_port import PcieRootPort, PcieRootPortState
from hv.machine import Machine, MachineError
from hv.machine.pci_wiring import LAYOUTS, build_pci, preassign_bars, unplug_device
from hv.memory import GuestMemory, RegionSpec
from hv.migration.stream import compare_fingerprints
from tests.helpers import FIXTURES, Vm, requires_kvm
from tests.machine.conftest import blk_reference, make_image

VIRTIO_BLK_ID = 0x1042_1AF4
ROOT_PORT_ID = 0x000C_1B36
ALL_ONES = 0xFFFF_FFFF
PORT_DEV = 1                 # the root port sits at 00:01.0 in these tests
EXP = 0x40                   # PCI Express capability offset
MSI = 0x7C                   # MSI capability offset
SLTCTL, SLTSTA, LNKSTA = EXP + 0x18, EXP + 0x1A, EXP + 0x12
HPIE_PDCE_DLLSCE = 0x20 | 0x08 | 0x1000
PDS, PDC, DLLSC, DLLLA = 0x40, 0x08, 0x100, 0x2000
VECTOR = 0x41
MSI_INTID = 81
PORT_ARG = "pcie-root-port,port=0x1,addr=0x1,bus=pcie.0,id=pcie.1"
RAM_BASE = {"q35": 0, "virt": 0x4000_0000}


class Config:
    """Configuration space as a guest reaches it: ECAM (both machines) or CF8/CFC (q35)."""

    def __init__(self, read, write, base: int, ports: bool) -> None:
        self._read, self._write, self.base, self.ports = read, write, base, ports

    @classmethod
    def of_machine(cls, machine: Machine) -> "Config":
        base = LAYOUTS[machine.config.machine].ecam_base
        return cls(machine.mmio_read, machine.mmio_write, base, machine.config.machine == "q35")

    def read(self, bus: int, dev: int, offset: int, size: int = 4, fn: int = 0) -> int:
        return self._read(self.base + (bus << 20 | dev << 15 | fn << 12 | offset), size)

    def write(self, bus: int, dev: int, offset: int, size: int, value: int, fn: int = 0) -> None:
        self._write(self.base + (bus << 20 | dev << 15 | fn << 12 | offset), size, value)


def cf8(pio_read, pio_write, bus: int, dev: int, offset: int, size: int = 4) -> int:
    pio_write(0xCF8, 4, 0x8000_0000 | bus << 16 | dev << 11 | (offset & 0xFC))
    return pio_read(0xCFC + (offset & 3), size)


def machine_args(machine: str, *extra: str, image: Path | None = None) -> list[str]:
    arch = {"q35": "x86_64", "virt": "aarch64"}[machine]
    args = ["-machine", machine, "-m", "16", "-kernel", str(FIXTURES / arch / "blk.elf"), "-device", PORT_ARG]
    if image is not None:
        args += ["-drive", f"file={image},id=d1,serial=HP"]
    return args + list(extra)


def new_machine(machine: str, *extra: str, image: Path | None = None) -> Machine:
    config = parse_args(machine_args(machine, *extra, image=image)).config
    return Machine(config, backend_class("unicorn")(), BufferSink())


@pytest.fixture(params=["q35", "virt"])
def vm(request, tmp_path):
    image = make_image(tmp_path / "hp.img")
    machine = new_machine(request.param, image=image)
    yield machine
    machine.close()


def enable_msi(cfg: Config, machine: Machine) -> None:
    """Program the port's MSI as a guest driver would, and make the target accept it."""
    if machine.config.machine == "q35":
        machine.mmio_write(LAPIC_BASE + 0xF0, 4, 0x1FF)          # SVR: software-enable LAPIC 0
        address, data = 0xFEE0_0000, VECTOR
    else:
        address, data = V2M_BASE + V2M_MSI_SETSPI_NS, MSI_INTID   # the GICv2m doorbell
    cfg.write(0, PORT_DEV, MSI + 4, 4, address)
    cfg.write(0, PORT_DEV, MSI + 8, 4, 0)
    cfg.write(0, PORT_DEV, MSI + 12, 2, data)
    cfg.write(0, PORT_DEV, MSI + 2, 2, 1)


def msi_pending(machine: Machine) -> bool:
    if machine.config.machine == "q35":
        return bool(machine.interrupts.lapics[0].s.irr >> VECTOR & 1)   # type: ignore[union-attr]
    return bool(machine.interrupts.gic.s.pending >> MSI_INTID & 1)     # type: ignore[union-attr]


def clear_msi(machine: Machine) -> None:
    if machine.config.machine == "q35":
        machine.interrupts.lapics[0].s.irr &= ~(1 << VECTOR)            # type: ignore[union-attr]
    else:
        machine.interrupts.gic.s.pending &= ~(1 << MSI_INTID)          # type: ignore[union-attr]


HP = "virtio-blk-pci,drive=d1,id=hp0,bus=pcie.1,addr=0x0"


# -- configuration space layout ------------------------------------------------------------------

def test_type1_header_and_capabilities_as_the_guest_reads_them(vm):
    cfg = Config.of_machine(vm)
    assert cfg.read(0, PORT_DEV, 0x00) == ROOT_PORT_ID
    assert cfg.read(0, PORT_DEV, 0x08) >> 8 == 0x060400                 # PCI-to-PCI bridge
    assert cfg.read(0, PORT_DEV, 0x0E, 1) == 0x01                       # header type 1, single function
    assert cfg.read(0, PORT_DEV, 0x06, 2) & 0x10                        # capability list
    assert cfg.read(0, PORT_DEV, 0x18) & 0xFFFFFF == 0x010100           # primary 0, secondary 1, subordinate 1
    assert cfg.read(0, PORT_DEV, 0x3D, 1) == 1                          # INTA
    assert cfg.read(0, PORT_DEV, 0x34, 1) == EXP
    assert cfg.read(0, PORT_DEV, EXP, 2) == MSI << 8 | 0x10             # PCIe cap -> MSI cap
    assert cfg.read(0, PORT_DEV, MSI, 2) == 0x05                        # MSI cap, end of list
    assert cfg.read(0, PORT_DEV, EXP + 2, 2) == 0x0142                  # v2, Root Port, Slot Implemented
    lnkcap = cfg.read(0, PORT_DEV, EXP + 0x0C)
    assert lnkcap >> 24 == 1 and lnkcap & 1 << 20 and lnkcap & 0x3FF == 0x11   # port 1, DLLLARC, 2.5GT x1
    sltcap = cfg.read(0, PORT_DEV, EXP + 0x14)
    assert sltcap & 0x60 == 0x60 and sltcap >> 19 == 1                  # HPS + HPC, physical slot 1
    assert cfg.read(0, PORT_DEV, SLTSTA, 2) & PDS == 0                  # empty slot
    assert cfg.read(0, PORT_DEV, LNKSTA, 2) & DLLLA == 0
    assert cfg.read(0, PORT_DEV, MSI + 2, 2) == 0x0080                  # 64-bit, one vector, disabled
    if cfg.ports:
        assert cf8(vm.pio_read, vm.pio_write, 0, PORT_DEV, 0) == ROOT_PORT_ID
        assert cf8(vm.pio_read, vm.pio_write, 0, PORT_DEV, 0x34, 1) == EXP
        assert cf8(vm.pio_read, vm.pio_write, 0, PORT_DEV, 0x18) & 0xFFFFFF == 0x010100


def test_bridge_registers_are_writable_and_read_only_parts_stay(vm):
    cfg = Config.of_machine(vm)
    cfg.write(0, PORT_DEV, 0x20, 4, 0xC01F_C00F)          # memory limit/base: low nibbles read-only
    assert cfg.read(0, PORT_DEV, 0x20) == 0xC010_C000
    cfg.write(0, PORT_DEV, 0x1C, 2, 0xFFFF)               # I/O base/limit: 16-bit decode
    assert cfg.read(0, PORT_DEV, 0x1C, 2) == 0xF0F0
    assert cfg.read(0, PORT_DEV, 0x24) & 0x000F_000F == 0x0001_0001   # 64-bit prefetchable window
    cfg.write(0, PORT_DEV, 0x3E, 2, 0xFFFF)
    assert cfg.read(0, PORT_DEV, 0x3E, 2) == 0x006F
    cfg.write(0, PORT_DEV, 0x00, 4, 0)                     # ids are read-only
    cfg.write(0, PORT_DEV, EXP + 0x14, 4, 0)               # so are the slot capabilities
    cfg.write(0, PORT_DEV, SLTSTA, 2, PDS)                 # and presence
    assert cfg.read(0, PORT_DEV, 0x00) == ROOT_PORT_ID and cfg.read(0, PORT_DEV, EXP + 0x14) >> 19 == 1


def test_multifunction_and_slot_number(tmp_path):
    machine = new_machine("q35", "-device", "pcie-root-port,port=0x3,addr=0x2,id=pcie.2,chassis=1,slot=9,"
                                            "multifunction=on")
    try:
        cfg = Config.of_machine(machine)
        assert cfg.read(0, 2, 0x0E, 1) == 0x81
        assert cfg.read(0, 2, EXP + 0x14) >> 19 == 9 and cfg.read(0, 2, EXP + 0x0C) >> 24 == 3
        # Two ports in slot order: buses 1 and 2.
        assert cfg.read(0, 1, 0x18) & 0xFFFFFF == 0x010100 and cfg.read(0, 2, 0x18) & 0xFFFFFF == 0x020200
        entry = next(d for d in machine.fingerprint()["devices"] if d["id"] == "pcie.2")
        assert entry == {"type": "pcie-root-port", "id": "pcie.2", "bus": "pcie.0", "addr": "02.0",
                         "attrs": {"port": "3", "chassis": "1", "slot": "9", "multifunction": "True"}}
    finally:
        machine.close()


# -- routing and windows (the wiring, no machine) --------------------------------------------------

@pytest.fixture
def wired(tmp_path):
    image = make_image(tmp_path / "d0.img")
    memory = GuestMemory([RegionSpec(0, 16 << 20)])
    pio, mmio = Bus("port"), Bus("mmio")
    setup = build_pci("q35", memory, pio, mmio, [parse_drive(f"file={image},id=d0")],
                      [parse_device("virtio-blk-pci,drive=d0,id=blk0,bus=pcie.1,addr=0"), parse_device(PORT_ARG)])
    cfg = Config(mmio.read, mmio.write, LAYOUTS["q35"].ecam_base, True)
    yield setup, cfg, pio, mmio
    setup.close()
    memory.close()


def test_secondary_bus_number_routes_to_the_child(wired):
    setup, cfg, pio, _ = wired
    assert cfg.read(1, 0, 0) == VIRTIO_BLK_ID
    assert cf8(pio.read, pio.write, 1, 0, 0) == VIRTIO_BLK_ID
    assert cfg.read(1, 1, 0) == ALL_ONES and cfg.read(1, 0, 0, fn=1) == ALL_ONES   # one device on a link
    assert cfg.read(2, 0, 0) == ALL_ONES and cfg.read(0, 0x1F, 0) == ALL_ONES
    assert cfg.read(0, PORT_DEV, 0x18) & 0xFFFFFF == 0x010100           # cold-plugged: built before the disk
    assert cfg.read(0, PORT_DEV, SLTSTA, 2) & PDS and cfg.read(0, PORT_DEV, LNKSTA, 2) & DLLLA
    assert cfg.read(0, PORT_DEV, SLTSTA, 2) & (PDC | DLLSC) == 0        # no event for a cold plug
    cfg.write(0, PORT_DEV, 0x18, 4, 0x050500)                          # the guest renumbers: bus 5
    assert cfg.read(5, 0, 0) == VIRTIO_BLK_ID and cfg.read(1, 0, 0) == ALL_ONES
    cfg.write(0, PORT_DEV, 0x18, 4, 0x070300)                          # buses 3-7: only 3 is the port's
    assert cfg.read(3, 0, 0) == VIRTIO_BLK_ID
    assert all(cfg.read(bus, 0, 0) == ALL_ONES for bus in (4, 5, 6, 7))
    child = setup.ports["pcie.1"].children[0]
    cfg.write(1, 0, 0x04, 2, 0x6)                                      # bus 1 is nobody's now
    assert child.command == 0
    cfg.write(3, 0, 0x04, 2, 0x6)                                      # config writes reach the child
    assert child.command == 0x6


def test_child_bar_decodes_only_through_the_port_window(wired):
    setup, cfg, _, mmio = wired
    preassign_bars(setup)
    port = setup.ports["pcie.1"]
    child = port.children[0]
    bar = child.bar_address(4)
    base, limit = port.windows("mem")[0]
    assert bar is not None and base <= bar and bar + 0x4000 - 1 <= limit and limit - base + 1 >= 2 << 20
    assert port.windows("io") == [] and len(port.windows("mem")) == 1   # no I/O BAR: closed; no prefetchable
    assert mmio.read(bar, 4) != ALL_ONES                               # the common config: features
    cfg.write(0, PORT_DEV, 0x04, 2, 0)                                 # port: memory decode off
    assert mmio.read(bar, 4) == ALL_ONES
    cfg.write(0, PORT_DEV, 0x04, 2, 0x6)
    assert mmio.read(bar, 4) != ALL_ONES
    cfg.write(0, PORT_DEV, 0x20, 4, (base >> 16) | (base >> 16) << 16)   # a 1 MiB window: still covers it
    assert mmio.read(bar, 4) != ALL_ONES
    cfg.write(0, PORT_DEV, 0x20, 4, ((base >> 16) + 0x10) | ((base >> 16) + 0x10) << 16)  # moved away
    assert mmio.read(bar, 4) == ALL_ONES
    # The prefetchable window may carry it too (a 64-bit window above 4 GiB does not).
    cfg.write(0, PORT_DEV, 0x24, 4, (base >> 16) | (base >> 16) << 16)
    assert mmio.read(bar, 4) != ALL_ONES
    cfg.write(0, PORT_DEV, 0x28, 4, 1)
    cfg.write(0, PORT_DEV, 0x2C, 4, 1)
    assert mmio.read(bar, 4) == ALL_ONES


def test_wiring_errors_are_one_line_and_change_nothing(wired, tmp_path):
    setup, cfg, _, _ = wired
    drive = parse_drive(f"file={make_image(tmp_path / 'x.img')},id=dx")
    memory = GuestMemory([RegionSpec(0, 1 << 20)])
    from hv.machine.pci_wiring import plug_device

    before = (dict(setup.host.functions), list(setup.slots), dict(setup.ports["pcie.1"].children))
    for device, message in [
        ("virtio-blk-pci,drive=dx,id=x,bus=pcie.7", "device_add virtio-blk-pci: bus=pcie.7: no such bus"),
        ("virtio-blk-pci,drive=dx,id=x,bus=pcie.1,addr=1", "addr=0x1.0 on pcie.1: a root port's bus has one device"),
        ("virtio-blk-pci,drive=dx,id=x,bus=pcie.1,addr=0", "addr=0x0.0 on pcie.1 is taken by another device"),
        ("virtio-blk-pci,drive=dx,id=x,addr=1", "addr=0x1.0 on pcie.0 is taken by root port pcie.1"),
    ]:
        with pytest.raises(DevConfigError, match=message) as info:
            plug_device(setup, memory, drive, parse_device(device), option="device_add")
        assert "\n" not in str(info.value)
        assert (dict(setup.host.functions), list(setup.slots), dict(setup.ports["pcie.1"].children)) == before
    with pytest.raises(DevConfigError, match="pcie.1 is a pcie-root-port: root ports cannot be unplugged "
                                             r"\(it holds blk0\)"):
        unplug_device(setup, "pcie.1")
    assert (dict(setup.host.functions), list(setup.slots)) == before[:2]
    memory.close()


def test_build_errors(tmp_path):
    memory = GuestMemory([RegionSpec(0x4000_0000, 1 << 20)])
    image = make_image(tmp_path / "d.img")
    drives = [parse_drive(f"file={image},id=d0")]
    cases = [
        ([PORT_ARG, "virtio-blk-pci,drive=d0,bus=pcie.7"], "-device virtio-blk-pci: bus=pcie.7: no such bus"),
        ([PORT_ARG, PORT_ARG.replace("id=pcie.1", "id=pcie.2")], "addr=0x1.0 on pcie.0 is taken by root port pcie.1"),
        ([PORT_ARG, PORT_ARG], "id=pcie.1 is already used"),
        ([f"pcie-root-port,id=p{i},port={i}" for i in range(16)], "too many root ports"),   # virt: buses 0-15
    ]
    for devices, message in cases:
        with pytest.raises(DevConfigError, match=message):
            build_pci("virt", memory, Bus("port"), Bus("mmio"), drives, [parse_device(d) for d in devices])
    memory.close()


# -- the hot-plug slot on a real machine ----------------------------------------------------------

def test_hotplug_sets_presence_and_sends_the_msi(vm):
    cfg = Config.of_machine(vm)
    enable_msi(cfg, vm)
    cfg.write(0, PORT_DEV, SLTCTL, 2, HPIE_PDCE_DLLSCE)
    assert not msi_pending(vm)
    slot = vm.hotplug_device(parse_device(HP))
    assert (slot.bus, slot.addr) == ("pcie.1", "00.0")
    assert cfg.read(0, PORT_DEV, SLTSTA, 2) == PDS | PDC | DLLSC
    assert cfg.read(0, PORT_DEV, LNKSTA, 2) & DLLLA
    assert msi_pending(vm)
    assert cfg.read(1, 0, 0) == VIRTIO_BLK_ID
    # RW1C: writing PDC clears only PDC; the interrupt condition still holds (DLLSC): no new MSI.
    clear_msi(vm)
    cfg.write(0, PORT_DEV, SLTSTA, 2, PDC | PDS)
    assert cfg.read(0, PORT_DEV, SLTSTA, 2) == PDS | DLLSC and not msi_pending(vm)
    cfg.write(0, PORT_DEV, SLTSTA, 2, DLLSC)
    assert cfg.read(0, PORT_DEV, SLTSTA, 2) == PDS

    vm.hotunplug_device("hp0")
    assert cfg.read(0, PORT_DEV, SLTSTA, 2) == PDC | DLLSC                # presence gone, events set
    assert not cfg.read(0, PORT_DEV, LNKSTA, 2) & DLLLA
    assert msi_pending(vm)
    assert cfg.read(1, 0, 0) == ALL_ONES and "hp0" not in vm.devices


def test_no_interrupt_unless_enabled_and_intx_fallback(vm):
    cfg = Config.of_machine(vm)
    port: PcieRootPort = vm.pci.ports["pcie.1"]
    vm.hotplug_device(parse_device(HP))                                # HPIE off: events, no interrupt
    assert cfg.read(0, PORT_DEV, SLTSTA, 2) == PDS | PDC | DLLSC
    assert not msi_pending(vm) and not port.intx.level
    cfg.write(0, PORT_DEV, SLTCTL, 2, HPIE_PDCE_DLLSCE)                # MSI off: INTx follows the condition
    assert port.intx.level and cfg.read(0, PORT_DEV, 0x06, 2) & 0x08
    cfg.write(0, PORT_DEV, 0x04, 2, 0x400)                             # INTx disabled
    assert not port.intx.level
    cfg.write(0, PORT_DEV, 0x04, 2, 0)
    assert port.intx.level
    cfg.write(0, PORT_DEV, SLTSTA, 2, PDC | DLLSC)
    assert not port.intx.level and not cfg.read(0, PORT_DEV, 0x06, 2) & 0x08
    # The port's INTA and its child's INTA (swizzled through slot 0) share the port slot's line.
    child = vm.devices["hp0"].device
    assert child.intx.line is port.intx.line and child.intx.key == ("pcie.1", 0)
    expected = "gsi17" if vm.config.machine == "q35" else "spi-intid36"   # slot 1, INTA
    assert port.intx.line.name == expected


def test_hotplug_errors_change_nothing(tmp_path):
    vm = new_machine("q35", "-drive", f"file={make_image(tmp_path / 'd2.img')},id=d2",
                     image=make_image(tmp_path / "d1.img"))
    try:
        check_hotplug_errors(vm)
    finally:
        vm.close()


def check_hotplug_errors(vm: Machine) -> None:
    before = vm.fingerprint()
    vm.hotplug_device(parse_device(HP))
    plugged = vm.fingerprint()
    for device, message in [
        ("virtio-blk-pci,drive=d2,id=x,bus=pcie.7", "bus=pcie.7: no such bus"),
        ("virtio-blk-pci,drive=d2,id=x,bus=pcie.1,addr=2", "a root port's bus has one device"),
        ("virtio-blk-pci,drive=d2,id=x,bus=pcie.1,addr=0", "addr=0x0.0 on pcie.1 is taken by another device"),
        ("virtio-blk-pci,drive=d2,id=x,bus=pcie.0,addr=1", "addr=0x1.0 on pcie.0 is taken by root port pcie.1"),
        ("virtio-blk-pci,drive=d1,id=x,bus=pcie.1,addr=0", "drive=d1 is already used"),
    ]:
        with pytest.raises(MachineError, match=message):
            vm.hotplug_device(parse_device(device))
        assert vm.fingerprint() == plugged
    with pytest.raises(MachineError, match="root ports cannot be unplugged"):
        vm.hotunplug_device("pcie.1")
    assert vm.fingerprint() == plugged
    vm.hotunplug_device("hp0")
    assert vm.fingerprint() == before
    with pytest.raises(MachineError, match=r"root ports cannot be unplugged$"):
        vm.hotunplug_device("pcie.1")


def test_second_device_on_the_port_is_refused(tmp_path):
    images = [make_image(tmp_path / "a.img"), make_image(tmp_path / "b.img")]
    machine = new_machine("q35", "-drive", f"file={images[0]},id=d1", "-drive", f"file={images[1]},id=d2")
    try:
        machine.hotplug_device(parse_device(HP))
        with pytest.raises(MachineError, match="addr=0x0.0 on pcie.1 is taken by another device"):
            machine.hotplug_device(parse_device("virtio-blk-pci,drive=d2,id=hp1,bus=pcie.1,addr=0"))
        with pytest.raises(MachineError, match="addr=0x1.0 on pcie.0 is taken by root port pcie.1"):
            machine.hotplug_device(parse_device("virtio-blk-pci,drive=d2,id=hp1,addr=1"))
        machine.hotplug_device(parse_device("virtio-blk-pci,drive=d2,id=hp1,bus=pcie.1,addr=0.1"))  # function 1
        assert Config.of_machine(machine).read(1, 0, 0, fn=1) == VIRTIO_BLK_ID
    finally:
        machine.close()


# -- save/restore and migration -----------------------------------------------------------------

@pytest.mark.parametrize("kind", ["q35", "virt"])
def test_port_with_hot_plugged_child_round_trips_into_a_new_machine(tmp_path, kind):
    image = make_image(tmp_path / "hp.img")
    source = new_machine(kind, image=image)
    try:
        cfg = Config.of_machine(source)
        enable_msi(cfg, source)
        cfg.write(0, PORT_DEV, SLTCTL, 2, HPIE_PDCE_DLLSCE)
        cfg.write(0, PORT_DEV, 0x20, 4, 0x1010_1000)
        source.hotplug_device(parse_device(HP))
        cfg.write(1, 0, 0x04, 2, 0x6)
        assert msi_pending(source)
        clear_msi(source)                           # the guest took it
        snapshot = source.save()
        port_config = source.pci.ports["pcie.1"].config_bytes()
        fingerprint = source.fingerprint()
    finally:
        source.close()
    target = new_machine(kind, "-device", HP.replace("0x0", "0"), image=image)
    try:
        assert compare_fingerprints(fingerprint, target.fingerprint()) == []
        target.restore(snapshot)
        port = target.pci.ports["pcie.1"]
        assert port.config_bytes() == port_config
        cfg = Config.of_machine(target)
        assert cfg.read(0, PORT_DEV, SLTSTA, 2) == PDS | PDC | DLLSC and cfg.read(1, 0, 0) == VIRTIO_BLK_ID
        assert cfg.read(1, 0, 0x04, 2) == 0x6
        assert not msi_pending(target)              # a restore sends no message for an old edge
        cfg.write(0, PORT_DEV, SLTSTA, 2, PDC | DLLSC)
        target.hotunplug_device("hp0")              # and the slot works on: a new event, a message
        assert msi_pending(target)
        target.system_reset()                       # power-on: windows closed, firmware bus numbers
        assert cfg.read(0, PORT_DEV, 0x18) & 0xFFFFFF == 0x010100 and cfg.read(0, PORT_DEV, 0x20) == 0
        assert cfg.read(0, PORT_DEV, SLTCTL, 2) == 0
    finally:
        target.close()


def test_fingerprint_names_the_missing_or_moved_device(tmp_path):
    image = make_image(tmp_path / "hp.img")
    source = new_machine("q35", image=image)
    try:
        source.hotplug_device(parse_device(HP))
        fingerprint = source.fingerprint()
        entry = next(d for d in fingerprint["devices"] if d["id"] == "hp0")
        assert (entry["bus"], entry["addr"]) == ("pcie.1", "00.0")
        assert any(d["id"] == "pcie.1" and d["type"] == "pcie-root-port" for d in fingerprint["devices"])
        source.hotunplug_device("hp0")   # release the image lock for the destinations
    finally:
        source.close()
    for extra, problem in [
        ([], "device hp0 (virtio-blk-pci) present on the source but not on the destination"),
        (["-device", "virtio-blk-pci,drive=d1,id=hp0,addr=5"],
         "device hp0 (virtio-blk-pci) bus/addr mismatch: source pcie.1/00.0, destination pcie.0/05.0"),
    ]:
        destination = new_machine("q35", *extra, image=image)
        try:
            assert problem in compare_fingerprints(fingerprint, destination.fingerprint())
        finally:
            destination.close()
    config = parse_args(["-machine", "q35", "-m", "16", "-kernel", str(FIXTURES / "x86_64" / "blk.elf")]).config
    bare = Machine(config, backend_class("unicorn")(), BufferSink())
    try:
        assert "device pcie.1 (pcie-root-port) present on the source but not on the destination" in \
            compare_fingerprints(fingerprint, bare.fingerprint())
    finally:
        bare.close()


@pytest.mark.parametrize("state,message", [
    (None, "wrong fields"),
    ({}, "wrong fields"),
    ({"config": "", "extra": 1}, "wrong fields"),
    ({"config": 5}, "bad config"),
    ({"config": "zz" * 256}, "not hex"),
    ({"config": "00" * 255}, "expected 256 bytes"),
    ({"config": "00" * 4096}, "expected 256 bytes"),
])
def test_hostile_restore_states_are_refused(vm, state, message):
    port = vm.pci.ports["pcie.1"]
    Config.of_machine(vm).write(0, PORT_DEV, SLTCTL, 2, HPIE_PDCE_DLLSCE)
    before = port.config_bytes()
    snapshot = vm.save()
    snapshot.devices["pcie.1"]["state"] = state
    with pytest.raises(DeviceStateError, match=message):
        vm.restore(snapshot)
    with pytest.raises(DeviceStateError, match=message):
        PcieRootPortState.from_dict(state)
    assert port.config_bytes() == before


def test_restore_of_a_bad_version_is_refused(vm):
    snapshot = vm.save()
    snapshot.devices["pcie.1"]["version"] = 99
    with pytest.raises(DeviceStateError, match="pcie.1: unsupported state version"):
        vm.restore(snapshot)


# -- end to end: real hv processes, raw QMP --------------------------------------------------------

@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="hvr") as path:
        yield path


def test_launcher_starts_with_a_device_behind_a_port_and_rejects_a_bad_bus(hv, sock_dir, tmp_path):
    d0, d1 = make_image(tmp_path / "d0.img", 1 << 20), make_image(tmp_path / "d1.img", 1 << 20)
    base = ["-machine", "q35", "-accel", "unicorn", "-m", "64", "-kernel", str(FIXTURES / "x86_64" / "blk.elf"),
            "-S", "-device", PORT_ARG, "-drive", f"file={d0},id=d0"]
    vm = Vm(hv, sock_dir, "rp", *base, "-device", "virtio-blk-pci,drive=d0,id=d0,bus=pcie.1,addr=0x0",
            "-device", "pcie-root-port,port=0x2,addr=0x2,bus=pcie.0,id=pcie.2", "-drive", f"file={d1},id=d1")
    try:
        assert vm.execute("query-status")["return"]["status"] == "prelaunch"
        # Hot-plug on the second port, then unplug: DEVICE_DELETED follows at once.
        hp = {"driver": "virtio-blk-pci", "id": "hp0", "drive": "d1", "bus": "pcie.2", "addr": "0x0"}
        for arguments, fragment in [
            (dict(hp, id="x", bus="pcie.9"), "bus=pcie.9: no such bus"),
            (dict(hp, id="x", addr="0x1"), "a root port's bus has one device"),
            (dict(hp, id="x", drive="d0", bus="pcie.1"), "drive=d0 is already used"),
            ({"driver": "pcie-root-port", "id": "pcie.3"}, "known but not hot-pluggable"),
        ]:
            reply = vm.execute("device_add", **arguments)
            assert reply["error"]["class"] == "GenericError" and fragment in reply["error"]["desc"], reply
        assert vm.execute("device_add", **hp) == {"return": {}}
        reply = vm.execute("device_add", **dict(hp, id="hp9"))
        assert "drive=d1 is already used" in reply["error"]["desc"]
        reply = vm.execute("device_del", id="pcie.1")
        assert reply["error"]["class"] == "GenericError"
        assert "root ports cannot be unplugged (it holds d0)" in reply["error"]["desc"]
        assert vm.execute("device_del", id="hp0") == {"return": {}}
        assert vm.qmp.wait_event("DEVICE_DELETED")["data"] == {"device": "hp0", "path": "/machine/peripheral/hp0"}
        assert vm.execute("query-status")["return"]["status"] == "prelaunch"
    finally:
        vm.close()
    bad = hv(*base, "-device", "virtio-blk-pci,drive=d0,id=d0,bus=pcie.7,addr=0x0", name="bad")
    assert bad.wait(30) == 1
    lines = bad.stderr().strip().splitlines()
    assert lines == ["hv: error: -device virtio-blk-pci: bus=pcie.7: no such bus"], lines
    bad2 = hv(*base, "-device", "virtio-blk-pci,drive=d0,id=d0,bus=pcie.1,addr=0x3", name="bad2")
    assert bad2.wait(30) == 1
    lines = bad2.stderr().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("hv: error: -device virtio-blk-pci,id=d0: addr=0x3.0 on pcie.1")


def test_nic_hot_plugs_behind_a_port_too(sock_dir):
    machine = new_machine("virt", "-netdev", f"socket,id=n1,listen={sock_dir}/n1.sock")
    try:
        cfg = Config.of_machine(machine)
        enable_msi(cfg, machine)
        cfg.write(0, PORT_DEV, SLTCTL, 2, HPIE_PDCE_DLLSCE)
        slot = machine.hotplug_device(parse_device("virtio-net-pci,netdev=n1,id=nic1,bus=pcie.1,addr=0"))
        assert (slot.bus, slot.addr) == ("pcie.1", "00.0") and msi_pending(machine)
        assert cfg.read(1, 0, 0) == 0x1041_1AF4 and cfg.read(0, PORT_DEV, SLTSTA, 2) == PDS | PDC | DLLSC
        assert slot.device.intx.line.name == "spi-intid36"
        machine.hotunplug_device("nic1")
        assert cfg.read(1, 0, 0) == ALL_ONES and cfg.read(0, PORT_DEV, SLTSTA, 2) == PDC | DLLSC
    finally:
        machine.close()


# -- a real guest drives a disk behind a port --------------------------------------------------

GUEST_RUNS = [pytest.param("q35", "x86_64", "kvm", marks=requires_kvm, id="x86_64-kvm"),
              pytest.param("q35", "x86_64", "unicorn", id="x86_64-unicorn"),
              pytest.param("virt", "aarch64", "unicorn", id="aarch64-unicorn")]


@pytest.mark.parametrize("machine,arch,accel", GUEST_RUNS)
def test_blk_guest_finds_and_drives_a_disk_behind_a_root_port(hv, tmp_path, machine, arch, accel):
    """The blk fixture finds nothing on bus 0, follows the port to its secondary bus (the
    firmware's number, 1), opens the port's memory window and drives the disk at 01:00.0
    with MSI-X: the port's BAR forwarding, config routing and the child's interrupts."""
    image = make_image(tmp_path / "d0.img", 1 << 20)
    vm = hv("-machine", machine, "-accel", accel, "-m", "64", "-kernel", str(FIXTURES / arch / "blk.elf"),
            "-append", "sectors=32 iterations=2 chunk=8 depth=4", "-device", PORT_ARG,
            "-drive", f"file={image},id=d0,serial=RP0", "-device", "virtio-blk-pci,drive=d0,id=d0,bus=pcie.1,addr=0x0")
    assert vm.wait(120) == 0, vm.stderr()[-2000:]
    assert vm.output().splitlines() == blk_reference(32, 2, 8, 4, "RP0", slot=0, capacity=2048, bus=1)


def test_blk_guest_drives_a_disk_hot_plugged_behind_a_root_port(hv, sock_dir, tmp_path):
    """-S, device_add on pcie.1, cont: the guest finds the hot-plugged disk behind the port."""
    image = make_image(tmp_path / "d1.img", 1 << 20)
    vm = Vm(hv, sock_dir, "rph", "-machine", "q35", "-accel", "unicorn", "-m", "64", "-S",
            "-kernel", str(FIXTURES / "x86_64" / "blk.elf"), "-append", "sectors=32 iterations=1 chunk=8 depth=4",
            "-device", PORT_ARG, "-drive", f"file={image},id=d1,serial=HP1")
    try:
        assert vm.execute("device_add", driver="virtio-blk-pci", id="hp0", drive="d1", bus="pcie.1",
                          addr="0x0") == {"return": {}}
        assert vm.execute("cont") == {"return": {}}
        assert vm.process.wait(60) == 0
        assert vm.output().splitlines() == blk_reference(32, 1, 8, 4, "HP1", slot=0, capacity=2048, bus=1)
    finally:
        vm.close()
