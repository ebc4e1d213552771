"""Hot-plug of virtio-net-pci: a ``-netdev`` no device uses is opened by ``device_add``,
the guest drives the new NIC, and ``device_del`` stops delivery and closes the netdev
(without waiting on a reader thread that wants the machine's lock).

Real parts: a Machine on Unicorn with real UNIX SEQPACKET sockets, and real hv processes
spoken to over raw QMP.
"""
from __future__ import annotations

import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from hv_backends import backend_class
from hv.config import parse_args
from hv.console import BufferSink
from hv.devconfig import parse_device
from hv.devices.pci import UnconnectedMsi
from hv.machine import Machine, MachineError
from hv.migration.stream import compare_fingerprints
from tests.helpers import FIXTURES, Vm, requires_kvm
from tests.machine.conftest import EchoPeer, net_reference

MAC = "52:54:00:00:00:09"


def can_connect(path: Path) -> bool:
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        probe.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        probe.close()


@pytest.fixture
def machine(tmp_path):
    listen = tmp_path / "nic.sock"
    config = parse_args(["-machine", "q35", "-m", "16", "-kernel", str(FIXTURES / "x86_64" / "net.elf"),
                         "-netdev", f"socket,id=n1,listen={listen}"]).config
    vm = Machine(config, backend_class("unicorn")(), BufferSink())
    yield vm, listen
    vm.close()


def test_unused_netdev_is_opened_by_device_add_and_closed_by_device_del(machine):
    vm, listen = machine
    before = vm.fingerprint()
    assert not listen.exists()                       # declared, not opened until a device uses it
    slot = vm.hotplug_device(parse_device(f"virtio-net-pci,netdev=n1,id=nic1,mac={MAC},bus=pcie.0,addr=6"))
    assert vm.devices["nic1"] is slot and can_connect(listen)
    assert not isinstance(slot.device.msix.sink, UnconnectedMsi)
    entry = {"type": "virtio-net-pci", "id": "nic1", "bus": "pcie.0", "addr": "06.0",
             "attrs": {"netdev": "n1", "mac": MAC}}
    assert vm.fingerprint()["devices"] == before["devices"] + [entry]
    assert compare_fingerprints(vm.fingerprint(), before) == [
        "device nic1 (virtio-net-pci) present on the source but not on the destination"]
    assert "nic1" in vm.save().devices
    with pytest.raises(MachineError, match="netdev=n1 is already used by a device"):
        vm.hotplug_device(parse_device("virtio-net-pci,netdev=n1,id=nic2"))
    vm.hotunplug_device("nic1")
    assert "nic1" not in vm.devices and vm.fingerprint() == before
    assert not can_connect(listen)
    # The netdev is free again.
    vm.hotplug_device(parse_device("virtio-net-pci,netdev=n1,id=nic3,addr=7"))
    assert can_connect(listen)


def test_device_del_while_frames_arrive_does_not_wait_for_the_reader(machine):
    """The NIC's reader thread delivers under the machine lock; device_del holds that lock.
    It must finish promptly, and no frame may land in RAM after the unplug."""
    vm, listen = machine
    slot = vm.hotplug_device(parse_device(f"virtio-net-pci,netdev=n1,id=nic1,mac={MAC},addr=6"))
    peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    peer.connect(str(listen))
    stop = threading.Event()

    def flood() -> None:
        frame = b"\xff" * 6 + b"\x02" * 6 + b"\x08\x00" + bytes(100)
        while not stop.is_set():
            try:
                peer.send(frame)
            except OSError:
                return
            time.sleep(0.0005)

    sender = threading.Thread(target=flood, daemon=True)
    sender.start()
    try:
        time.sleep(0.1)
        done = threading.Event()
        unplugger = threading.Thread(target=lambda: (vm.hotunplug_device("nic1"), done.set()), daemon=True)
        unplugger.start()
        unplugger.join(30)
        assert done.is_set(), "device_del hung"
        assert slot.device.detached
        backlog = slot.device.net.backlog
        slot.device.poll_rx()                        # a late delivery is a no-op
        assert slot.device.net.backlog == backlog
    finally:
        stop.set()
        sender.join(5)
        peer.close()


@pytest.fixture
def sock_dir():
    with tempfile.TemporaryDirectory(prefix="hvn") as path:  # short: AF_UNIX paths are bounded
        yield path


@pytest.mark.parametrize("machine_type,arch,accel", [
    pytest.param("q35", "x86_64", "kvm", marks=requires_kvm, id="x86_64-kvm"),
    pytest.param("q35", "x86_64", "unicorn", id="x86_64-unicorn"),
    pytest.param("virt", "aarch64", "unicorn", id="aarch64-unicorn")])
def test_guest_drives_a_hot_plugged_nic(hv, sock_dir, tmp_path, machine_type, arch, accel):
    """-S, device_add virtio-net-pci, cont: the net guest finds the NIC at 00:05.0 and
    exchanges every frame with the echo peer; device_del (guest still sending) then
    closes the connection."""
    peer = EchoPeer(Path(sock_dir) / "peer.sock")
    vm = Vm(hv, sock_dir, "nic", "-machine", machine_type, "-m", "64", "-accel", accel, "-S",
            "-kernel", str(FIXTURES / arch / "net.elf"), "-append", "frames=16 iterations=0",
            "-netdev", f"socket,id=n1,connect={peer.path}")
    try:
        assert vm.execute("device_add", driver="virtio-net-pci", id="nic1", netdev="n1", mac=MAC,
                          bus="pcie.0", addr="5") == {"return": {}}
        reply = vm.execute("device_add", driver="virtio-net-pci", id="nic2", netdev="n1")
        assert "netdev=n1 is already used by a device" in reply["error"]["desc"]
        reply = vm.execute("device_add", driver="virtio-net-pci", id="nic2", netdev="zz")
        assert "netdev=zz: no -netdev with that id" in reply["error"]["desc"]
        assert vm.execute("cont") == {"return": {}}
        expected = net_reference(16, 2, MAC, slot=5, forever=True)
        vm.wait_lines(len(expected))
        assert vm.output().splitlines()[:len(expected)] == expected
        assert len(peer.conns) == 1
        assert vm.execute("device_del", id="nic1") == {"return": {}}
        assert vm.qmp.wait_event("DEVICE_DELETED")["data"]["device"] == "nic1"
        peer.conns[0].settimeout(10)
        for _ in range(1024):   # frames the guest sent before the unplug may still be queued
            try:
                if peer.conns[0].recv(4096) == b"":
                    break       # hv closed its end
            except ConnectionResetError:
                break           # closed with the peer's echoes still unread on hv's side: a reset
        else:
            raise AssertionError("hv kept its end of the cable open after device_del")
    finally:
        vm.close()
        peer.close()
