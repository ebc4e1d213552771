"""PCI Express host: config mechanism #1 and ECAM on both machines, BAR sizing and
decoding, capability lists, MSI-X table semantics, placement errors, save/restore."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hv.devconfig import DevConfigError, parse_device, parse_drive
from hv.devices.bus import Bus
from hv.devices.interfaces import DeviceStateError
from hv.devices.pci import (BAR_IO, BAR_MEM32, BAR_MEM64, BarSpec, HostBridge, MsixTable, PciBarWindow,
                            PciConfigPorts, PciEcam, PciError, PciFunction, PciHost, PciHostState,
                            UnconnectedMsi, parse_devfn)
from hv.machine.pci_wiring import LAYOUTS, build_pci, preassign_bars
from hv.memory import GuestMemory, RegionSpec

RAM_BASE = {"q35": 0, "virt": 0x4000_0000}


def image(tmp_path: Path, name: str = "disk.img") -> Path:
    path = tmp_path / name
    path.write_bytes(bytes(1 << 16))
    return path


def build(tmp_path: Path, machine: str = "q35", devices: tuple[str, ...] = (), drives: int = 0,
          memory_size: int = 16 << 20):
    memory = GuestMemory([RegionSpec(RAM_BASE[machine], memory_size)])
    pio, mmio = Bus("port"), Bus("mmio")
    drive_cfgs = [parse_drive(f"file={image(tmp_path, f'd{i}.img')},id=d{i},serial=s{i}") for i in range(drives)]
    setup = build_pci(machine, memory, pio, mmio, drive_cfgs, [parse_device(d) for d in devices])
    return setup, memory, pio, mmio


def cf8(pio: Bus, dev: int, off: int, size: int = 4, fn: int = 0, bus: int = 0) -> int:
    pio.write(0xCF8, 4, 0x8000_0000 | bus << 16 | dev << 11 | fn << 8 | (off & 0xFC))
    return pio.read(0xCFC + (off & 3), size)


@pytest.mark.parametrize("machine,ids", [("q35", 0x29C0_8086), ("virt", 0x0008_1B36)])
def test_host_bridge_and_windows(tmp_path, machine, ids):
    setup, memory, pio, mmio = build(tmp_path, machine)
    layout = LAYOUTS[machine]
    assert mmio.read(layout.ecam_base, 4) == ids
    assert mmio.read(layout.ecam_base + 0x08, 4) >> 8 == 0x060000            # host bridge class
    assert mmio.read(layout.ecam_base + (1 << 15), 4) == 0xFFFF_FFFF       # empty slot
    assert mmio.read(layout.ecam_base + (1 << 20), 4) == 0xFFFF_FFFF       # bus 1: nothing
    if machine == "q35":
        assert setup.mmio_windows == [(0xB000_0000, 256 << 20), (0xC000_0000, 0xFEC0_0000 - 0xC000_0000)]
        assert cf8(pio, 0, 0) == ids
        assert cf8(pio, 0, 2, 2) == 0x29C0
        assert cf8(pio, 5, 0) == 0xFFFF_FFFF
    else:
        assert setup.mmio_windows == [(0x3F00_0000, 16 << 20), (0x1000_0000, 0x3EFF_0000 - 0x1000_0000),
                                      (0x3EFF_0000, 0x1_0000)]
        assert pio.find(0xCF8) is None
    memory.close()


def test_config_mechanism_1_details(tmp_path):
    setup, memory, pio, mmio = build(tmp_path)
    pio.write(0xCF8, 4, 0x8000_0000)
    assert pio.read(0xCF8, 4) == 0x8000_0000
    pio.write(0xCF8, 4, 0x0000_0000)                 # enable bit clear: data port reads all ones
    assert pio.read(0xCFC, 4) == 0xFFFF_FFFF
    pio.write(0xCF8, 4, 0x8000_0003)                 # low two bits are not latched
    assert pio.read(0xCF8, 4) == 0x8000_0000
    assert cf8(pio, 0, 0x0C, 1) == 0 and cf8(pio, 0, 0x0E, 1) == 0
    # Byte/word writes through CFC land on the right bytes: INTERRUPT_LINE at 0x3C.
    pio.write(0xCF8, 4, 0x8000_003C)
    pio.write(0xCFC, 1, 0x0B)
    assert cf8(pio, 0, 0x3C, 1) == 0x0B
    memory.close()


def test_bar_sizing_and_programming(tmp_path):
    setup, memory, pio, mmio = build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=b,addr=4",), drives=1)
    ecam = 0xB000_0000 + (4 << 15)
    assert mmio.read(ecam + 0x20, 4) == 0xC                  # 64-bit prefetchable memory, unassigned
    mmio.write(ecam + 0x20, 4, 0xFFFF_FFFF)
    mmio.write(ecam + 0x24, 4, 0xFFFF_FFFF)
    assert mmio.read(ecam + 0x20, 4) == 0xFFFF_C00C           # 16 KiB
    assert mmio.read(ecam + 0x24, 4) == 0xFFFF_FFFF
    for bar in (0x10, 0x14, 0x18, 0x1C):                      # unimplemented BARs stay 0
        mmio.write(ecam + bar, 4, 0xFFFF_FFFF)
        assert mmio.read(ecam + bar, 4) == 0
    mmio.write(ecam + 0x30, 4, 0xFFFF_FFFF)                   # no expansion ROM
    assert mmio.read(ecam + 0x30, 4) == 0
    mmio.write(ecam + 0x20, 4, 0xD000_4000)
    mmio.write(ecam + 0x24, 4, 0)
    assert mmio.read(0xD000_4000 + 0x12, 2) == 0xFFFF          # decoding still off
    mmio.write(ecam + 0x04, 2, 0x2)
    assert mmio.read(0xD000_4000 + 0x12, 2) == 1               # num_queues through the BAR
    assert mmio.read(0xD000_4000 - 4, 4) == 0xFFFF_FFFF
    mmio.write(ecam + 0x20, 4, 0xD100_0000)                     # moving the BAR moves the decode
    assert mmio.read(0xD000_4000 + 0x12, 2) == 0xFFFF and mmio.read(0xD100_0000 + 0x12, 2) == 1
    mmio.write(ecam + 0x04, 2, 0)
    assert mmio.read(0xD100_0000 + 0x12, 2) == 0xFFFF
    memory.close()


def test_capability_list(tmp_path):
    setup, memory, pio, mmio = build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=b,addr=2",), drives=1)
    ecam = 0xB000_0000 + (2 << 15)
    assert mmio.read(ecam + 0x06, 2) & 0x10
    pos = mmio.read(ecam + 0x34, 1)
    caps = []
    while pos:
        assert 0x40 <= pos < 0x100 and pos % 4 == 0
        cap_id = mmio.read(ecam + pos, 1)
        cfg_type = mmio.read(ecam + pos + 3, 1) if cap_id == 0x09 else None
        caps.append((cap_id, cfg_type))
        if cap_id == 0x09 and cfg_type in (1, 2, 3, 4):
            assert mmio.read(ecam + pos + 4, 1) == 4                     # all in BAR4
        if cap_id == 0x09 and cfg_type == 2:
            assert mmio.read(ecam + pos + 2, 1) == 20 and mmio.read(ecam + pos + 16, 4) == 4
        if cap_id == 0x11:
            assert mmio.read(ecam + pos + 2, 2) == 1                     # 2 vectors
            assert mmio.read(ecam + pos + 4, 4) == 0x3800 | 4
            assert mmio.read(ecam + pos + 8, 4) == 0x3C00 | 4
        pos = mmio.read(ecam + pos + 1, 1)
        assert len(caps) < 16
    assert caps == [(0x10, None), (0x09, 1), (0x09, 3), (0x09, 4), (0x09, 2), (0x09, 5), (0x11, None)]
    memory.close()


def test_virtio_pci_cfg_window(tmp_path):
    setup, memory, pio, mmio = build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=b,addr=2",), drives=1)
    function = setup.host.functions[2 << 3]
    cap = function.pci_cfg_cap
    function.config_write(cap + 4, 1, 4)            # bar
    function.config_write(cap + 8, 4, 0x12)         # offset: num_queues
    function.config_write(cap + 12, 4, 2)           # length
    assert function.config_read(cap + 16, 4) == 1
    function.config_write(cap + 8, 4, 0x2000)       # device config: capacity (low dword)
    function.config_write(cap + 12, 4, 4)
    assert function.config_read(cap + 16, 4) == (1 << 16) // 512
    memory.close()


def test_msix_masking_pending_and_delivery():
    sink = UnconnectedMsi()
    function = PciFunction(0x1234, 0x5678, 0xFF0000)
    function.add_bar(BarSpec(0, 0x1000, BAR_MEM32))
    msix = MsixTable(function, 3, 0, 0x800, 0xC00, sink)
    control = msix.cap + 2
    assert not msix.notify(0)                                    # MSI-X disabled
    function.config_write(control, 2, 0x8000)
    for v in range(3):
        assert msix.read(0x800 + 16 * v + 12, 4) == 1            # masked at reset
    msix.write(0x800 + 16, 4, 0xFEE0_0000)
    msix.write(0x800 + 16 + 4, 4, 0)
    msix.write(0x800 + 16 + 8, 4, 0x41)
    assert msix.notify(1) and sink.sent == []                    # masked: pending
    assert msix.read(0xC00, 8) == 0b10
    msix.write(0x800 + 16 + 12, 4, 0)                            # unmask: delivered
    assert sink.sent == [(0xFEE0_0000, 0x41)] and msix.read(0xC00, 8) == 0
    function.config_write(control, 2, 0xC000)                    # function mask
    msix.notify(1)
    assert sink.sent == [(0xFEE0_0000, 0x41)] and msix.pba == 0b10
    function.config_write(control, 2, 0x8000)
    msix.control_written()
    assert sink.sent[-1] == (0xFEE0_0000, 0x41) and msix.pba == 0
    msix.write(0xC00, 8, 0xFF)                                   # PBA is read-only
    assert msix.pba == 0
    assert not msix.notify(7)
    table, pba = msix.save()
    other = MsixTable(PciFunction(1, 2, 3), 3, 0, 0x800, 0xC00)
    other.load(table, pba)
    assert other.table == msix.table
    with pytest.raises(DeviceStateError):
        other.load(table, 1 << 3)
    with pytest.raises(DeviceStateError):
        other.load(table[:-2], 0)


def test_io_bar_decoding_through_windows():
    class Probe(PciFunction):
        def bar_read(self, index: int, offset: int, size: int) -> int:
            return 0xA0 + offset

    host = PciHost(HostBridge(0x8086, 0x29C0))
    probe = Probe(0x1234, 0x1, 0xFF0000)
    probe.add_bar(BarSpec(1, 32, BAR_IO))
    host.plug(probe, 6, 2)
    window = PciBarWindow(host, "io", 0x3EFF_0000 - 0x3EFF_0000, 0x1_0000)
    ports = PciConfigPorts(host)
    ports.write(0, 4, 0x8000_0000 | 6 << 11 | 2 << 8 | 0x14)
    ports.write(4, 4, 0xFFFF_FFFF)
    assert ports.read(4, 4) == 0xFFFF_FFE1
    ports.write(4, 4, 0x1040)
    ports.write(0, 4, 0x8000_0000 | 6 << 11 | 2 << 8 | 0x04)
    ports.write(4, 2, 0x1)
    assert window.read(0x1043, 1) == 0xA3
    assert window.read(0x1060, 1) == 0xFF


def test_bar_spec_validation():
    f = PciFunction(1, 2, 3)
    with pytest.raises(PciError):
        f.add_bar(BarSpec(0, 1000, BAR_MEM32))
    with pytest.raises(PciError):
        f.add_bar(BarSpec(5, 4096, BAR_MEM64))
    f.add_bar(BarSpec(0, 4096, BAR_MEM64))
    with pytest.raises(PciError):
        f.add_bar(BarSpec(0, 4096, BAR_MEM32))
    with pytest.raises(PciError):
        f.add_bar(BarSpec(2, 512, BAR_IO))


@pytest.mark.parametrize("addr,expected", [("0", (0, 0)), ("3", (3, 0)), ("0x1f", (31, 0)), ("1f.7", (31, 7)),
                                           ("0x3.0x1", (3, 1))])
def test_parse_devfn(addr, expected):
    assert parse_devfn(addr) == expected


@pytest.mark.parametrize("addr", ["", "20", "0x20", "3.8", "1.2.3", "x", "-1", "3.", ".1"])
def test_parse_devfn_rejects(addr):
    with pytest.raises(PciError, match="addr="):
        parse_devfn(addr)


@pytest.mark.parametrize("machine", ["q35", "virt"])
def test_seed_addr_0_takes_the_host_bridge_slot(tmp_path, machine):
    """StratoVirt's walkthrough puts its disk at addr=0: the disk becomes 0:0.0 and the
    machine has no host bridge function (a second device still fills its own slot)."""
    setup, _, _, mmio = build(tmp_path, machine, ("virtio-blk-pci,drive=d0,id=rootfs,bus=pcie.0,addr=0",
                                                  "virtio-blk-pci,drive=d1,id=b"), drives=2)
    ecam = LAYOUTS[machine].ecam_base
    assert setup.host.bridge is None
    assert mmio.read(ecam, 4) == 0x1042_1AF4                       # virtio-blk at 0:0.0
    assert mmio.read(ecam + (1 << 15), 4) == 0x1042_1AF4           # the next one at 0:1.0
    assert [(s.name, s.addr) for s in setup.slots[1:]] == [("rootfs", "00.0"), ("b", "01.0")]
    state = setup.host.save()
    assert state.bridge_config == ""
    setup.host.restore(state)
    with pytest.raises(DeviceStateError, match="a host bridge was saved"):
        setup.host.restore(PciHostState(0x8000_0000, bytes(256).hex()))
    assert setup.host.config_address == state.config_address       # refused: nothing changed
    setup.close()


def test_placement_errors(tmp_path):
    with pytest.raises(DevConfigError, match=r"addr=0x3.0 on pcie.0 is taken by another device"):
        build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=a,addr=3", "virtio-blk-pci,drive=d1,id=b,addr=3"),
              drives=2)
    with pytest.raises(DevConfigError, match="id=a is already used"):
        build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=a", "virtio-blk-pci,drive=d1,id=a"), drives=2)
    ram = GuestMemory([RegionSpec(0, 1 << 20)])
    with pytest.raises(DevConfigError, match="id=serial0 is already used"):
        build_pci("q35", ram, Bus("port"), Bus("mmio"), [parse_drive(f"file={image(tmp_path)},id=d0")],
                  [parse_device("virtio-blk-pci,drive=d0,id=serial0")], taken_names=["serial0", "acpi-pm"])
    ram.close()
    with pytest.raises(DevConfigError, match="drive=d0 is already used"):
        build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=a", "virtio-blk-pci,drive=d0,id=b"), drives=1)
    with pytest.raises(DevConfigError, match="drive=nope: no -drive"):
        build(tmp_path, devices=("virtio-blk-pci,drive=nope,id=a",), drives=1)
    with pytest.raises(DevConfigError, match="overlaps the PCI window"):
        build(tmp_path, memory_size=3 << 30)
    low_ram = GuestMemory([RegionSpec(0x3000_0000, 1 << 20)])   # inside virt's MMIO window
    with pytest.raises(DevConfigError, match="overlaps the PCI window"):
        build_pci("virt", low_ram, Bus("port"), Bus("mmio"))
    low_ram.close()
    # Functions of one slot and automatic slots.
    setup, memory, pio, mmio = build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=a,addr=3.1",
                                                        "virtio-blk-pci,drive=d1,id=b"), drives=2)
    assert [(s.name, s.addr) for s in setup.slots] == [("pcie.0", "0xb0000000"), ("a", "03.1"), ("b", "01.0")]
    assert setup.slots[1].attrs == {"drive": "d0", "file": str(tmp_path / "d0.img"), "serial": "s0",
                                    "readonly": False}
    assert setup.fingerprint_devices()[2] == {"type": "virtio-blk-pci", "id": "b", "bus": "pcie.0", "addr": "01.0",
                                              "attrs": {"drive": "d1", "file": str(tmp_path / "d1.img"),
                                                        "serial": "s1", "readonly": False}}
    setup.close()
    memory.close()


def test_failed_build_releases_image_locks(tmp_path):
    with pytest.raises(DevConfigError):
        build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=a,addr=3", "virtio-blk-pci,drive=d1,id=b,addr=3"),
              drives=2)
    setup, memory, pio, mmio = build(tmp_path, devices=("virtio-blk-pci,drive=d0,id=a,addr=3",), drives=1)
    setup.close()
    memory.close()


def test_preassign_bars(tmp_path):
    setup, memory, pio, mmio = build(tmp_path, "virt", devices=("virtio-blk-pci,drive=d0,id=a,addr=1",
                                                                 "virtio-blk-pci,drive=d1,id=b,addr=2"), drives=2)
    preassign_bars(setup)
    assert mmio.read(0x1000_0000 + 0x12, 2) == 1
    assert mmio.read(0x1000_4000 + 0x12, 2) == 1
    assert mmio.read(0x3F00_0000 + (2 << 15) + 0x20, 4) == 0x1000_400C
    setup.close()
    memory.close()


def test_host_save_restore(tmp_path):
    setup, memory, pio, mmio = build(tmp_path)
    host = setup.host
    pio.write(0xCF8, 4, 0x8000_0810)
    host.bridge.config_write(0x04, 2, 0x6)
    host.bridge.config_write(0x3C, 1, 9)
    saved = host.save()
    again = PciHostState.from_dict(saved.to_dict())
    assert again == saved
    host.restore(PciHostState())                         # power-on
    assert host.config_address == 0 and host.bridge.config_read(0x04, 2) == 0
    assert host.bridge.config_read(0, 4) == 0x29C0_8086  # read-only identity survives
    host.restore(again)
    assert pio.read(0xCF8, 4) == 0x8000_0810 and host.bridge.config_read(0x3C, 1) == 9
    for bad in ({}, {"config_address": -1, "bridge_config": ""}, {"config_address": 0, "bridge_config": "zz"},
                {"config_address": True, "bridge_config": ""}, {"config_address": 0, "bridge_config": "00"}):
        with pytest.raises(DeviceStateError):
            PciHostState.from_dict(bad)
    memory.close()


@settings(max_examples=200, deadline=None)
@given(accesses=st.lists(st.tuples(st.integers(0, (16 << 20) - 1), st.sampled_from([1, 2, 4, 8, 3]),
                                   st.integers(0, (1 << 64) - 1), st.booleans()), max_size=40))
def test_fuzzed_ecam_accesses_never_raise(accesses):
    host = PciHost(HostBridge(0x1B36, 0x0008))
    probe = PciFunction(0x1AF4, 0x1042, 0x010000)
    probe.add_bar(BarSpec(4, 0x4000, BAR_MEM64))
    host.plug(probe, 1, 0)
    ecam = PciEcam(host, 16)
    window = PciBarWindow(host, "mem", 0x1000_0000, 0x2EFF_0000)
    for offset, size, value, is_write in accesses:
        if is_write:
            ecam.write(offset, size, value & ((1 << (8 * size)) - 1))
        else:
            assert 0 <= ecam.read(offset, size) < 1 << (8 * size)
        window.read(offset, 4)
    assert host.bridge.config_read(0, 4) == 0x0008_1B36
    assert probe.config_read(0, 4) == 0x1042_1AF4
