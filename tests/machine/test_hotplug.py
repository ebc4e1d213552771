"""Hot-plug: QMP device_add / device_del for virtio-blk-pci, DEVICE_DELETED, and the rule
that a device hot-plugged on a migration source must be on the destination's command line.

Unit tests drive the real wiring (hv.machine.pci_wiring.plug_device / unplug_device) and a
real Machine on Unicorn; the end-to-end tests start real hv processes and speak raw QMP.
"""
from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import pytest

from hv_backends import backend_class
from hv.block import BlockBackend, BlockLockedError
from hv.config import parse_args
from hv.console import BufferSink
from hv.devconfig import DevConfigError, parse_device, parse_drive
from hv.devices.bus import Bus
from hv.devices.pci import UnconnectedMsi
from hv.machine import Machine, MachineError
from hv.machine.pci_wiring import build_pci, plug_device, unplug_device
from hv.memory import GuestMemory, RegionSpec
from hv.migration.stream import compare_fingerprints
from tests.helpers import FIXTURES, Vm, blk_passes, requires_kvm, value, wait_blk_passes
from tests.machine.conftest import blk_reference, make_image

VIRTIO_BLK_ID = 0x1042_1AF4
ALL_ONES = 0xFFFF_FFFF


def locked_elsewhere(path: Path) -> bool:
    """True when another open of ``path`` cannot take the write lock (a VM holds it)."""
    try:
        BlockBackend(path, lock=True).close()
    except BlockLockedError:
        return True
    return False


# -- the wiring: plug_device / unplug_device -------------------------------------------------

@pytest.fixture
def wiring(tmp_path):
    """A q35 PCI host with drives d0 (used by -device at 3) and d1 (declared, unused)."""
    images = [make_image(tmp_path / "d0.img"), make_image(tmp_path / "d1.img")]
    memory = GuestMemory([RegionSpec(0, 16 << 20)])
    drives = [parse_drive(f"file={images[0]},id=d0"), parse_drive(f"file={images[1]},id=d1,serial=S1")]
    setup = build_pci("q35", memory, Bus("port"), Bus("mmio"), drives,
                      [parse_device("virtio-blk-pci,drive=d0,id=blk0,addr=3")])
    yield setup, memory, {d.id: d for d in drives}, images
    setup.close()
    memory.close()


def test_unused_drive_is_not_opened_until_plugged(wiring):
    setup, memory, drives, images = wiring
    assert set(setup.blocks) == {"d0"} and not locked_elsewhere(images[1]) and locked_elsewhere(images[0])
    slot = plug_device(setup, memory, drives["d1"], parse_device("virtio-blk-pci,drive=d1,id=hp,addr=5"),
                       option="device_add")
    assert (slot.name, slot.kind, slot.bus, slot.addr) == ("hp", "virtio-blk-pci", "pcie.0", "05.0")
    assert slot.attrs == {"drive": "d1", "file": str(images[1]), "serial": "S1", "readonly": False}
    assert setup.slots[-1] is slot and "d1" in setup.blocks
    assert setup.host.config_read(0, 5 << 3, 0, 4) == VIRTIO_BLK_ID
    assert locked_elsewhere(images[1])
    unplugged, release = unplug_device(setup, "hp")
    assert unplugged is slot
    assert setup.host.config_read(0, 5 << 3, 0, 4) == ALL_ONES
    assert "d1" not in setup.blocks and slot not in setup.slots
    assert locked_elsewhere(images[1])     # the image is closed by release(), outside the big lock
    release()
    assert not locked_elsewhere(images[1])


def test_command_line_device_can_be_unplugged_and_its_drive_reused(wiring):
    setup, memory, drives, images = wiring
    unplug_device(setup, "blk0")[1]()
    assert setup.host.config_read(0, 3 << 3, 0, 4) == ALL_ONES and not locked_elsewhere(images[0])
    plug_device(setup, memory, drives["d0"], parse_device("virtio-blk-pci,drive=d0,id=blk1,addr=4"))
    assert setup.host.config_read(0, 4 << 3, 0, 4) == VIRTIO_BLK_ID


@pytest.mark.parametrize("device,drive,message", [
    ("virtio-blk-pci,drive=d1,id=x,addr=3", "d1", "addr=0x3.0 on pcie.0 is taken by another device"),
    ("virtio-blk-pci,drive=d1,id=x,addr=0", "d1", "is taken by the host bridge"),
    ("virtio-blk-pci,drive=d0,id=x,addr=5", "d0", "drive=d0 is already used by a device"),
    ("virtio-blk-pci,drive=zz,id=x,addr=5", None, "drive=zz: no -drive with that id"),
    ("virtio-blk-pci,drive=d1,id=blk0,addr=5", "d1", "id=blk0 is already used by another device"),
    ("virtio-net-pci,netdev=n0,id=x", None, "only virtio-blk-pci"),
])
def test_plug_errors_change_nothing(wiring, device, drive, message):
    setup, memory, drives, images = wiring
    before = (dict(setup.host.functions), list(setup.slots), dict(setup.blocks))
    with pytest.raises(DevConfigError, match=message):
        plug_device(setup, memory, drives.get(drive) if drive else None, parse_device(device),
                    option="device_add")
    assert (dict(setup.host.functions), list(setup.slots), dict(setup.blocks)) == before
    assert not locked_elsewhere(images[1])


def test_plug_of_a_locked_image_fails_and_leaves_no_function(wiring):
    setup, memory, drives, images = wiring
    holder = BlockBackend(images[1], lock=True)   # "another VM"
    try:
        with pytest.raises(DevConfigError, match="in use by another VM"):
            plug_device(setup, memory, drives["d1"], parse_device("virtio-blk-pci,drive=d1,id=hp,addr=5"))
        assert (5 << 3) not in setup.host.functions and "d1" not in setup.blocks
    finally:
        holder.close()


def test_unplug_errors(wiring):
    setup, _memory, _drives, _images = wiring
    with pytest.raises(DevConfigError, match="no PCI device with id nope"):
        unplug_device(setup, "nope")
    with pytest.raises(DevConfigError, match="no PCI device with id pcie.0"):
        unplug_device(setup, "pcie.0")   # the host itself is not on pcie.0


# -- the machine: hotplug_device / hotunplug_device -------------------------------------------

@pytest.fixture
def machine(tmp_path):
    image = make_image(tmp_path / "hp.img")
    config = parse_args(["-machine", "q35", "-m", "16", "-kernel", str(FIXTURES / "x86_64" / "blk.elf"),
                         "-drive", f"file={image},id=d1,serial=HP"]).config
    vm = Machine(config, backend_class("unicorn")(), BufferSink())
    yield vm, image
    vm.close()


def test_machine_hotplug_is_saved_fingerprinted_and_wired(machine):
    vm, image = machine
    before = vm.fingerprint()
    slot = vm.hotplug_device(parse_device("virtio-blk-pci,drive=d1,id=hp0,bus=pcie.0,addr=5"))
    assert vm.devices["hp0"] is slot and locked_elsewhere(image)
    assert not isinstance(slot.device.msix.sink, UnconnectedMsi)          # MSI-X -> local APICs
    assert type(slot.device.intx.line.target).__name__ == "GsiLine"        # INTx -> IOAPIC (wire-OR)
    after = vm.fingerprint()
    entry = {"type": "virtio-blk-pci", "id": "hp0", "bus": "pcie.0", "addr": "05.0",
             "attrs": {"drive": "d1", "file": str(image), "serial": "HP", "readonly": "False"}}
    assert after["devices"] == before["devices"] + [entry]
    # Migrating to a machine without it names the device; with a different address too.
    assert compare_fingerprints(after, before) == [
        "device hp0 (virtio-blk-pci) present on the source but not on the destination"]
    moved = dict(after, devices=before["devices"] + [dict(entry, addr="06.0")])
    assert compare_fingerprints(after, moved) == [
        "device hp0 (virtio-blk-pci) bus/addr mismatch: source pcie.0/05.0, destination pcie.0/06.0"]
    snapshot = vm.save()
    assert "hp0" in snapshot.devices
    vm.restore(snapshot)

    vm.hotunplug_device("hp0")
    assert "hp0" not in vm.devices and vm.fingerprint() == before and not locked_elsewhere(image)
    assert isinstance(slot.device.msix.sink, UnconnectedMsi)
    with pytest.raises(Exception, match="snapshot devices"):
        vm.restore(snapshot)                      # the snapshot still has the device: refused


def test_machine_hotplug_errors_change_nothing(machine):
    vm, image = machine
    before = vm.fingerprint()
    for device, message in [("virtio-blk-pci,drive=d1,id=serial0", "Duplicate device ID 'serial0'"),
                            ("virtio-blk-pci,drive=d9,id=x", "drive=d9: no -drive with that id"),
                            ("virtio-blk-pci,drive=d1,id=x,addr=0", "taken by the host bridge")]:
        with pytest.raises(MachineError, match=message):
            vm.hotplug_device(parse_device(device))
        assert vm.fingerprint() == before and not locked_elsewhere(image)
    assert not locked_elsewhere(image)
    with pytest.raises(MachineError, match="Device 'nope' not found"):
        vm.hotunplug_device("nope")
    with pytest.raises(MachineError, match="not a hot-pluggable device"):
        vm.hotunplug_device("serial0")
    assert vm.fingerprint() == before


# -- end to end: real hv processes, raw QMP -----------------------------------------------------

@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="hvh") as path:  # short: AF_UNIX paths are bounded
        yield path


def blk_args(image: Path, append: str, machine: str = "q35") -> list[str]:
    arch = {"q35": "x86_64", "virt": "aarch64"}[machine]
    return ["-machine", machine, "-m", "64", "-kernel", str(FIXTURES / arch / "blk.elf"), "-append", append,
            "-drive", f"file={image},id=d1,serial=HP1"]


HP0 = {"driver": "virtio-blk-pci", "id": "hp0", "drive": "d1", "bus": "pcie.0", "addr": "5"}


@pytest.mark.parametrize("machine,accel", [pytest.param("q35", "kvm", marks=requires_kvm, id="x86_64-kvm"),
                                           pytest.param("q35", "unicorn", id="x86_64-unicorn"),
                                           pytest.param("virt", "unicorn", id="aarch64-unicorn")])
def test_guest_drives_a_hot_plugged_disk(hv, sock_dir, tmp_path, machine, accel):
    """-S, device_add, cont: the blk guest enumerates PCI, finds the disk at 00:05.0 and
    writes and verifies it; the image holds the last pass's pattern."""
    image = make_image(tmp_path / "hp.img", 1 << 20)
    vm = Vm(hv, sock_dir, "hp", *blk_args(image, "sectors=32 iterations=2 chunk=8 depth=4", machine),
            "-accel", accel, "-S")
    try:
        assert vm.execute("device_add", **HP0) == {"return": {}}
        assert vm.execute("cont") == {"return": {}}
        assert vm.process.wait(60) == 0
        assert vm.output().splitlines() == blk_reference(32, 2, 8, 4, "HP1", slot=5, capacity=2048)
        expected = b"".join(value(2, i).to_bytes(8, "little") for i in range(32 * 64))
        assert image.read_bytes()[:len(expected)] == expected
    finally:
        vm.close()


def test_guest_without_the_disk_finds_none(hv, sock_dir, tmp_path):
    """The control: a -drive alone is no device (and device_del removes one before boot)."""
    image = make_image(tmp_path / "hp.img", 1 << 20)
    vm = Vm(hv, sock_dir, "hp", *blk_args(image, "sectors=32 iterations=1"), "-accel", "unicorn", "-S")
    try:
        assert vm.execute("device_add", **HP0) == {"return": {}}
        assert vm.execute("device_del", id="hp0") == {"return": {}}
        vm.execute("cont")
        vm.process.wait(60)
        assert "no virtio-blk-pci device on bus 0" in vm.output()
        assert image.read_bytes() == bytes(1 << 20)
    finally:
        vm.close()


def test_device_del_emits_device_deleted_and_frees_the_drive(hv, sock_dir, tmp_path):
    image = make_image(tmp_path / "hp.img", 1 << 20)
    vm = Vm(hv, sock_dir, "hp", *blk_args(image, "sectors=32 iterations=1"), "-accel", "unicorn", "-S")
    try:
        names = {c["name"] for c in vm.execute("query-commands")["return"]}
        assert {"device_add", "device_del"} <= names
        assert vm.execute("device_add", **HP0) == {"return": {}}
        assert locked_elsewhere(image)
        assert vm.execute("device_del", id="hp0") == {"return": {}}
        event = vm.qmp.wait_event("DEVICE_DELETED")
        assert event["data"] == {"device": "hp0", "path": "/machine/peripheral/hp0"}
        assert not locked_elsewhere(image)
        # The drive is free again: plug it at another address.
        assert vm.execute("device_add", **dict(HP0, id="hp1", addr="0x7")) == {"return": {}}
        assert vm.execute("device_del", id="hp1") == {"return": {}}
        assert vm.qmp.wait_event("DEVICE_DELETED")["data"]["device"] == "hp1"
    finally:
        vm.close()


def test_qmp_errors_are_generic_and_change_nothing(hv, sock_dir, tmp_path):
    image = make_image(tmp_path / "hp.img", 1 << 20)
    other = make_image(tmp_path / "cmd.img", 1 << 20)
    vm = Vm(hv, sock_dir, "hp", *blk_args(image, "sectors=32 iterations=1"), "-accel", "unicorn", "-S",
            "-drive", f"file={other},id=d0", "-device", "virtio-blk-pci,drive=d0,id=cmd0,addr=3")
    try:
        cases = [
            (dict(HP0, driver="e1000"), "driver 'e1000' is unknown"),
            (dict(HP0, driver="virtio-net-pci"), "virtio-net-pci: unknown parameter 'drive'"),
            (dict(HP0, drive="nope"), "drive=nope: no -drive with that id"),
            (dict(HP0, drive="d0"), "drive=d0 is already used by a device"),
            (dict(HP0, addr="3"), "addr=0x3.0 on pcie.0 is taken by another device"),
            (dict(HP0, addr="0x20"), "out of range"),
            (dict(HP0, bus="pcie.1"), "bus=pcie.1: no such bus"),
            (dict(HP0, id="cmd0"), "Duplicate device ID 'cmd0'"),
            (dict(HP0, id="9bad"), "ids start with a letter"),
            (dict(HP0, drive="d1,serial=x"), "without ',' or '='"),
            (dict(HP0, unknown="1"), "Invalid parameter 'unknown'"),
        ]
        for arguments, fragment in cases:
            reply = vm.execute("device_add", **arguments)
            assert reply["error"]["class"] == "GenericError", (arguments, reply)
            assert fragment in reply["error"]["desc"], (arguments, reply)
        assert not locked_elsewhere(image)
        reply = vm.execute("device_del", id="nope")
        assert reply["error"] == {"class": "GenericError", "desc": "Device 'nope' not found"}
        reply = vm.execute("device_del", id="serial0")
        assert "not a hot-pluggable device" in reply["error"]["desc"]
        # A device from the command line may be unplugged, as in QEMU.
        assert vm.execute("device_del", id="cmd0") == {"return": {}}
        assert vm.qmp.wait_event("DEVICE_DELETED")["data"]["device"] == "cmd0"
        assert not locked_elsewhere(other)
        assert vm.execute("query-status")["return"]["status"] == "prelaunch"
    finally:
        vm.close()


# The migrating blk guest runs with hold=1 iterations=0: it does write-then-verify passes
# until a byte arrives on its serial input, so it cannot finish before (or during) the
# migration however fast the backend or loaded the host; the test types that byte only on the
# VM that is to finish. Sectors per pass: kvm_pvm runs this CPL0 driver ~20x slower than Unicorn.
MIG_SECTORS = 1024


def held_append(sectors: int) -> str:
    return f"sectors={sectors} iterations=0 chunk=8 depth=4 hold=1"


HELD = held_append(MIG_SECTORS)


def start_hot_plugged_source(hv, sock_dir: str, image: Path, accel: str = "unicorn",
                             sectors: int = MIG_SECTORS, machine: str = "q35") -> Vm:
    """A held blk guest on ``accel`` whose disk was hot-plugged before it ran (``-S``,
    device_add, cont), once it has printed its first pass."""
    src = Vm(functools.partial(hv, typed=True), sock_dir, "src", *blk_args(image, held_append(sectors), machine),
             "-accel", accel, "-S")
    assert src.execute("device_add", **HP0) == {"return": {}}
    assert src.execute("cont") == {"return": {}}
    wait_blk_passes(src, "", 1)
    return src


def finish_held(vm: Vm, earlier: str = "") -> str:
    """Let the held guest on ``vm`` run one whole pass more than ``earlier`` + its output
    holds now, type the byte that ends it and wait for it to power off; its output."""
    wait_blk_passes(vm, earlier, len(blk_passes(earlier + vm.output())) + 1)
    vm.process.type(b"x")
    assert vm.process.wait(120) == 0
    return vm.output()


def check_held_run(output: str, image: Path, sectors: int = MIG_SECTORS) -> None:
    """``output`` (one run, or a migrated run's two consoles joined) is an unmigrated run's
    of as many passes: passes 1..P in order with the same checksums, then done; the image
    holds pass P's words."""
    passes = len(blk_passes(output))
    assert passes >= 1, output[-500:]
    lines = output.splitlines()
    reference = blk_reference(sectors, passes, 8, 4, "HP1", slot=5, capacity=2048)
    assert lines[0] == f"blk: sectors={sectors} iterations=0 chunk=8 depth=4", lines[0]
    assert lines[1:] == reference[1:]
    expected = b"".join(value(passes, i).to_bytes(8, "little") for i in range(sectors * 64))
    assert image.read_bytes()[:len(expected)] == expected


@pytest.mark.parametrize("machine,first,second,sectors", [
    pytest.param("q35", "unicorn", "unicorn", MIG_SECTORS, id="x86_64-unicorn-unicorn"),
    pytest.param("q35", "kvm", "unicorn", 64, marks=requires_kvm, id="x86_64-kvm-unicorn"),
    pytest.param("q35", "unicorn", "kvm", 256, marks=requires_kvm, id="x86_64-unicorn-kvm"),
    pytest.param("virt", "unicorn", "unicorn", MIG_SECTORS, id="aarch64-unicorn-unicorn"),
])
def test_hot_plugged_disk_migrates_to_a_destination_that_has_it(hv, sock_dir, tmp_path, machine, first, second,
                                                                 sectors):
    """The destination declares the device on its command line (same id, bus, addr):
    the migration completes mid-I/O (the held guest cannot finish on the source) and the
    joined output and the image equal an unmigrated run's."""
    image = make_image(tmp_path / "hp.img", 1 << 20)
    dst = Vm(functools.partial(hv, typed=True), sock_dir, "dst", *blk_args(image, held_append(sectors), machine),
             "-accel", second, "-device", "virtio-blk-pci,drive=d1,id=hp0,bus=pcie.0,addr=5",
             "-incoming", f"unix:{os.path.join(sock_dir, 'dst.mig')}")
    src = start_hot_plugged_source(hv, sock_dir, image, first, sectors, machine)
    try:
        assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
        result = src.wait_migration()
        assert result["status"] == "completed", result
        moved = src.output()
        assert "done" not in moved.splitlines(), moved[-500:]
        assert src.execute("quit") == {"return": {}}
        assert src.process.wait(30) == 0
        moved = src.output()   # hv has exited: every line the source printed is in
        check_held_run(moved + finish_held(dst, moved), image, sectors)
    finally:
        src.close()
        dst.close()


@pytest.mark.parametrize("dest_extra,fragment", [
    ([], "device hp0 (virtio-blk-pci) present on the source but not on the destination"),
    (["-device", "virtio-blk-pci,drive=d1,id=hp0,bus=pcie.0,addr=6"],
     "device hp0 (virtio-blk-pci) bus/addr mismatch: source pcie.0/05.0, destination pcie.0/06.0"),
], ids=["missing", "other-addr"])
def test_migration_to_a_destination_without_the_device_fails_and_source_runs_on(
        hv, sock_dir, tmp_path, dest_extra, fragment):
    image = make_image(tmp_path / "hp.img", 1 << 20)
    dst = Vm(hv, sock_dir, "dst", *blk_args(image, HELD), "-accel", "unicorn", *dest_extra,
             "-incoming", f"unix:{os.path.join(sock_dir, 'dst.mig')}")
    src = start_hot_plugged_source(hv, sock_dir, image)
    try:
        assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
        result = src.wait_migration()
        assert result["status"] == "failed" and fragment in result["error-desc"], result
        assert dst.process.wait(30) != 0
        assert src.execute("query-status")["return"]["status"] == "running"
        # The guest goes on and finishes on the source, disk intact.
        check_held_run(finish_held(src), image)
    finally:
        src.close()
        dst.close()


def test_no_hot_plug_while_migrating_nor_on_either_end_after(hv, sock_dir, tmp_path):
    """device_add/device_del during a migration (and on an incoming or migrated-away VM)
    are refused: the device set is part of the stream's configuration."""
    image = make_image(tmp_path / "hp.img", 1 << 20)
    common = ["-machine", "q35", "-accel", "unicorn", "-m", "256", "-kernel", str(FIXTURES / "x86_64" / "dirty.elf"),
              "-append", "mib=64", "-drive", f"file={image},id=d1"]
    src = Vm(hv, sock_dir, "src", *common)
    dst = Vm(hv, sock_dir, "dst", *common, "-incoming", f"unix:{os.path.join(sock_dir, 'dst.mig')}")
    try:
        reply = dst.execute("device_add", **HP0)   # the incoming side counts as migrating
        assert reply["error"] == {"class": "GenericError", "desc": "device_add: not allowed while migrating"}
        src.wait_lines(2)   # the guest has touched its 64 MiB: the first pass takes seconds
        src.execute("migrate-set-parameters", **{"max-bandwidth": 16 << 20})
        assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
        src.wait_migration(states=("active",))
        for command, arguments in [("device_add", HP0), ("device_del", {"id": "hp0"})]:
            reply = src.execute(command, **arguments)
            assert reply["error"] == {"class": "GenericError", "desc": f"{command}: not allowed while migrating"}
        src.execute("migrate-set-parameters", **{"max-bandwidth": 0})
        assert src.wait_migration()["status"] == "completed"
        reply = src.execute("device_add", **HP0)
        assert "not possible while the VM is in state 'postmigrate'" in reply["error"]["desc"], reply
        assert not locked_elsewhere(image)
        # The destination runs the guest and may hot-plug now.
        dst.wait_lines(len(dst.output().splitlines()) + 1)
        assert dst.execute("device_add", **HP0) == {"return": {}}
        assert locked_elsewhere(image)
    finally:
        src.close()
        dst.close()


def test_unplug_under_a_running_guest_keeps_the_vm_alive(hv, sock_dir, tmp_path):
    """Surprise removal mid-I/O (the blk guest has no hot-plug support): the function and
    its BAR vanish, so the guest reads all ones (NEEDS_RESET set), reports it and powers
    off; the VMM does not crash and nothing writes the image after the unplug."""
    image = make_image(tmp_path / "hp.img", 1 << 20)
    vm = Vm(hv, sock_dir, "hp", *blk_args(image, HELD), "-accel", "unicorn",
            "-device", "virtio-blk-pci,drive=d1,id=hp0,addr=5")
    try:
        vm.wait_lines(4)
        assert vm.execute("device_del", id="hp0") == {"return": {}}
        assert vm.qmp.wait_event("DEVICE_DELETED")["data"]["device"] == "hp0"
        frozen = image.read_bytes()
        assert not locked_elsewhere(image)
        assert vm.process.wait(30) == 0
        assert vm.output().endswith("blk: error: device needs reset\n"), vm.output()[-300:]
        assert image.read_bytes() == frozen
        assert "Traceback" not in vm.stderr()
    finally:
        vm.close()
