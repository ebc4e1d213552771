"""virtio-net-pci: a Python driver on the real buses and RAM against real sockets (an echo
peer, hostile chains, backlog overflow, oversize frames, save/restore), the tap backend, the
command line, and the net fixture guest in hv processes on KVM and Unicorn against an echo
peer written here, moved between backends mid-traffic, and two guests cabled together."""
from __future__ import annotations

import os
import select
import socket
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from hv_backends import backend_class
from hv.config import parse_args
from hv.console import BufferSink
from hv.devconfig import DevConfigError, parse_device, parse_netdev
from hv.devices.bus import Bus
from hv.devices.interfaces import DeviceStateError
from hv.devices.virtio_net import F_MAC, F_MRG_RXBUF, F_STATUS, RX_BACKLOG, VirtioNetState, parse_mac
from hv.devices.virtio_pci import STATUS_NEEDS_RESET
from hv.machine.machine import Machine, MachineSnapshot
from hv.machine.pci_wiring import build_pci
from hv.memory import GuestMemory, RegionSpec
from hv.net import MAX_FRAME, NetError, SocketNetBackend, TapNetBackend
from tests.helpers import FIXTURES, HvProcess, hv_command, requires_kvm, skip_unless_tool, tool_marks
from tests.machine.conftest import (
    ETH_REP, ETH_REQ, F_VERSION_1, PEER_MAC, EchoPeer, NetDriver, frame_of,
    net_reference, payload, wait_for,
)


def test_identity_features_config_and_fingerprint(net):
    assert net.cfg(0x00) == 0x1041_1AF4
    assert net.cfg(0x08) >> 8 == 0x020000
    net.init()
    offered = net.offered()
    assert offered & (1 << F_MAC | 1 << F_STATUS | 1 << F_MRG_RXBUF | F_VERSION_1) == \
        1 << F_MAC | 1 << F_STATUS | 1 << F_MRG_RXBUF | F_VERSION_1
    assert bytes(net.r(0x2000 + i, 1) for i in range(6)) == bytes.fromhex("525400123456")
    assert net.r(0x2006, 2) == 1      # VIRTIO_NET_S_LINK_UP
    assert net.r(0x12, 2) == 3        # rx + tx + control queue
    [entry] = [d for d in net.setup.fingerprint_devices() if d["type"] == "virtio-net-pci"]
    assert entry == {"type": "virtio-net-pci", "id": "nic0", "bus": "pcie.0", "addr": "02.0",
                     "attrs": {"netdev": "n0", "mac": "52:54:00:12:34:56"}}


def test_transmit_reaches_the_peer(net):
    net.init()
    frame = frame_of(100)
    assert net.send(frame) == [(0, 0)]
    assert net.send(frame_of(1514, 3), split=True, head=2) == [(2, 0)]
    wait_for(lambda: len(net.peer.received) == 2, what="frames at the peer")
    assert net.peer.received == [frame, frame_of(1514, 3)]
    assert net.device.net.counters.tx_frames == 2


def test_receive_waits_for_a_buffer_then_lands(net):
    net.init()
    net.conn.send(frame_of(60, 1))
    wait_for(lambda: net.device.net.backlog == 1, what="backlog")
    net.kick(0)                       # no buffers: the frame stays queued
    assert net.used(0) == [] and net.device.net.backlog == 1
    net.post_rx(0)
    net.kick(0)
    assert net.used(0) == [(0, 72)]
    data = net.rx_data(0, 72)
    assert data[:12] == bytes(10) + b"\x01\x00" and data[12:] == frame_of(60, 1)
    assert net.device.net.backlog == 0


def test_transmit_delivers_what_has_arrived(net):
    """A polling driver that only transmits still gets its frames (rx on every tx kick)."""
    net.init()
    net.post_rx(0)
    net.kick(0)
    net.conn.send(frame_of(80, 2))
    wait_for(lambda: net.device.net.backlog == 1, what="backlog")
    net.send(frame_of(64))
    assert net.used(0) == [(0, 92)]


def test_async_rx_delivers_without_a_kick_only_while_running(net):
    """enable_async_rx: the backend thread takes the (machine) lock and delivers at once,
    raising the queue interrupt (ISR bit 0 with MSI-X off); a paused machine gets nothing."""
    lock = threading.RLock()
    running = [True]
    net.device.enable_async_rx(lock, lambda: running[0])
    net.init()
    for i in range(4):
        net.post_rx(i)
    net.conn.send(frame_of(60, 1))
    wait_for(lambda: net.memory.read_int(net.rings[0][2] + 2, 2) == 1, what="async delivery")
    assert net.used(0) == [(0, 72)] and net.device.s.isr & 1
    running[0] = False
    net.conn.send(frame_of(60, 2))
    wait_for(lambda: net.device.net.backlog == 1, what="backlog while paused")
    time.sleep(0.05)
    assert net.used(0) == []                      # RAM untouched while paused
    running[0] = True
    net.conn.send(frame_of(60, 3))
    wait_for(lambda: net.memory.read_int(net.rings[0][2] + 2, 2) == 3, what="delivery after resume")
    assert [net.rx_data(head, 72)[12:] for head, _ in net.used(0)] == [frame_of(60, 2), frame_of(60, 3)]


def test_backlog_is_bounded_and_counts_drops(net):
    net.init()
    for i in range(RX_BACKLOG + 10):
        net.conn.send(frame_of(64, i))
    wait_for(lambda: net.setup.nets["n0"].stats.rx_frames == RX_BACKLOG + 10, what="all frames read")
    assert net.device.net.backlog == RX_BACKLOG
    assert net.device.net.counters.rx_dropped_backlog == 10
    for i in range(net.QSIZE):
        net.post_rx(i)
    net.kick(0)
    used = net.used(0)
    assert len(used) == net.QSIZE
    for index, (head, length) in enumerate(used):   # the oldest frames, in order
        assert length == 76 and net.rx_data(head, 76)[12:] == frame_of(64, index)


def test_oversize_and_runt_frames_are_dropped(net):
    net.init()
    # from the peer: one byte over the limit is dropped by the backend, the next one is fine
    net.conn.send(frame_of(MAX_FRAME + 1))
    net.conn.send(frame_of(8, 9)[:8])        # shorter than an Ethernet header
    net.conn.send(frame_of(60, 5))
    wait_for(lambda: net.device.net.backlog == 1, what="backlog")
    stats = net.setup.nets["n0"].stats
    assert stats.rx_dropped == 2 and stats.rx_frames == 1
    # from the guest: a runt and an oversize frame are dropped, their chains returned
    assert net.send(b"\x01" * 10) == [(0, 0)]
    big = 0x300000
    net.memory.write(big, bytes(12 + MAX_FRAME + 1))
    net.put_desc(1, 1, big, 12 + MAX_FRAME + 1, 0)
    net.publish(1, 1)
    net.kick(1)
    assert net.used(1) == [(1, 0)]
    assert net.device.net.counters.tx_dropped == 2 and not net.peer.received
    assert not net.status & STATUS_NEEDS_RESET


def test_frame_larger_than_buffer_without_mergeable(net):
    net.init()
    net.post_rx(0, length=100)
    net.conn.send(frame_of(200, 1))
    net.conn.send(frame_of(60, 2))
    wait_for(lambda: net.device.net.backlog == 2, what="backlog")
    net.kick(0)
    assert net.used(0) == [(0, 72)]             # the big one was dropped, the buffer kept
    assert net.rx_data(0, 72)[12:] == frame_of(60, 2)
    assert net.device.net.counters.rx_dropped_small == 1


def test_mergeable_buffers_span_chains_and_wait_for_room(net):
    net.init(F_VERSION_1 | 1 << F_MAC | 1 << F_MRG_RXBUF)
    for i in range(3):
        net.post_rx(i, length=256)
    net.conn.send(frame_of(1000, 4))            # 1012 bytes need 4 buffers of 256
    wait_for(lambda: net.device.net.backlog == 1, what="backlog")
    net.kick(0)
    assert net.used(0) == [] and net.device.net.backlog == 1   # waits, not dropped
    net.post_rx(3, length=256)
    net.kick(0)
    assert net.used(0) == [(0, 256), (1, 256), (2, 256), (3, 244)]
    data = b"".join(net.rx_data(i, 256) for i in range(4))[:1012]
    assert data[10:12] == (4).to_bytes(2, "little") and data[12:] == frame_of(1000, 4)


def test_waiting_frame_does_not_advance_avail_event(net):
    """With EVENT_IDX, chains taken back for a frame that does not fit yet must not make
    avail_event promise more than the device consumed (or the driver would stop kicking)."""
    net.init(F_VERSION_1 | 1 << F_MAC | 1 << F_MRG_RXBUF | 1 << 29)
    for i in range(3):
        net.post_rx(i, length=256)
    net.conn.send(frame_of(1000, 4))
    wait_for(lambda: net.device.net.backlog == 1, what="backlog")
    net.kick(0)
    avail_event = net.rings[0][2] + 4 + 8 * net.QSIZE
    assert net.used(0) == [] and net.memory.read_int(avail_event, 2) == 0
    net.post_rx(3, length=256)
    net.kick(0)
    assert [length for _, length in net.used(0)] == [256, 256, 256, 244]
    assert net.memory.read_int(avail_event, 2) == 4


HOSTILE = [
    ("writable buffer in a tx chain", lambda d: (d.put_desc(1, 0, 0x300000, 100, 2), d.publish(1, 0), d.kick(1))),
    ("tx chain shorter than the header", lambda d: (d.put_desc(1, 0, 0x300000, 11, 0), d.publish(1, 0),
                                                     d.kick(1))),
    ("tx buffer outside RAM", lambda d: (d.put_desc(1, 0, 0xFFFF_F000, 100, 0), d.publish(1, 0), d.kick(1))),
    ("tx buffer straddling the end of RAM", lambda d: (d.put_desc(1, 0, (16 << 20) - 8, 64, 0), d.publish(1, 0),
                                                        d.kick(1))),
    ("tx descriptor loop", lambda d: (d.put_desc(1, 0, 0x300000, 64, 1, 1), d.put_desc(1, 1, 0x300000, 64, 1, 0),
                                      d.publish(1, 0), d.kick(1))),
    ("tx head out of range", lambda d: (d.publish(1, 99), d.kick(1))),
    ("readable buffer in an rx chain", lambda d: (d.conn.send(frame_of(60)),
                                                  wait_for(lambda: d.device.net.backlog == 1),
                                                  d.put_desc(0, 0, 0x300000, 2048, 0), d.publish(0, 0), d.kick(0))),
    ("rx buffer outside RAM", lambda d: (d.conn.send(frame_of(60)), wait_for(lambda: d.device.net.backlog == 1),
                                         d.put_desc(0, 0, 1 << 40, 2048, 2), d.publish(0, 0), d.kick(0))),
]


@pytest.mark.parametrize("name,attack", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_chains_need_reset_and_reset_recovers(net, name, attack):
    net.init()
    attack(net)
    assert net.status & STATUS_NEEDS_RESET, name
    assert net.device.error
    net.init()                                  # status 0 resets; the device works again
    assert not net.status & STATUS_NEEDS_RESET
    assert net.send(frame_of(64, 7)) == [(0, 0)]
    wait_for(lambda: frame_of(64, 7) in net.peer.received, what="frame after reset")


def test_save_restore_continues_both_queues(net, tmp_path):
    net.init()
    for i in range(4):
        net.post_rx(i)
    net.kick(0)
    net.conn.send(frame_of(60, 1))
    wait_for(lambda: net.device.net.backlog == 1)
    net.send(frame_of(64, 1))
    assert net.used(0) == [(0, 72)]
    saved = net.device.save()
    assert saved.mac == "52:54:00:12:34:56" and VirtioNetState.VERSION == 2
    raw = saved.to_dict()
    # a second machine: same RAM contents, its own connection to the peer
    memory2 = GuestMemory([RegionSpec(0, 16 << 20)])
    memory2.write(0, net.memory.read(0, 16 << 20))
    pio, mmio = Bus("port"), Bus("mmio")
    setup2 = build_pci("q35", memory2, pio, mmio, [], [parse_device("virtio-net-pci,netdev=n0,id=nic0,addr=2,"
                                                                    "mac=52:54:00:12:34:56")],
                       netdevs=[parse_netdev(f"socket,id=n0,connect={tmp_path / 'peer.sock'}")])
    try:
        d2 = NetDriver(setup2, memory2, mmio)
        d2.avail_idx, d2.used_seen = list(net.avail_idx), list(net.used_seen)
        d2.device.restore(VirtioNetState.from_dict(raw))
        conn2 = net.peer.wait_conn(2)
        conn2.send(frame_of(70, 2))
        wait_for(lambda: d2.device.net.backlog == 1)
        assert d2.send(frame_of(64, 2), head=1) == [(1, 0)]
        assert d2.used(0) == [(1, 82)]               # the next buffer, after the restored index
        assert d2.rx_data(1, 82)[12:] == frame_of(70, 2)
        wait_for(lambda: frame_of(64, 2) in net.peer.received)
    finally:
        setup2.close()
        memory2.close()


def test_restore_rejects_other_mac_and_garbage(net):
    net.init()
    saved = net.device.save().to_dict()
    other = dict(saved, mac="52:54:00:00:00:01")
    with pytest.raises(DeviceStateError, match="mac"):
        net.device.restore(VirtioNetState.from_dict(other))
    for bad in (None, {}, dict(saved, mac=5), dict(saved, mac="zz:54:00:12:34:56"), dict(saved, extra=1),
                dict(saved, transport={"config": 1})):
        with pytest.raises(DeviceStateError):
            VirtioNetState.from_dict(bad)


def test_power_on_restore_resets_and_drops_backlog(net):
    net.init()
    net.conn.send(frame_of(60))
    wait_for(lambda: net.device.net.backlog == 1)
    net.device.restore(VirtioNetState())
    assert net.device.s.status == 0 and net.device.net.backlog == 0
    assert net.cfg(0x20) == 0x0000000C            # BAR4 back to unassigned (power-on)


def test_listen_role_accepts_a_peer_and_the_next_after_hangup(tmp_path):
    path = tmp_path / "nic.sock"
    received: list[bytes] = []
    backend = SocketNetBackend("n0", path=path, role="listen")
    try:
        backend.start(received.append)
        assert not backend.send(frame_of(60))          # no peer: dropped like a link that is down
        assert backend.stats.tx_dropped == 1
        for round_ in range(2):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            peer.connect(str(path))
            wait_for(lambda: backend.connected, what="accept")
            peer.send(frame_of(64, round_))
            wait_for(lambda: len(received) == round_ + 1, what="frame")
            assert backend.send(frame_of(90, round_))
            assert peer.recv(4096) == frame_of(90, round_)
            peer.close()
            wait_for(lambda: not backend.connected, what="hang-up noticed")
        assert received == [frame_of(64, 0), frame_of(64, 1)]
        with pytest.raises(NetError, match="already exists"):
            SocketNetBackend("n1", path=path, role="listen")
    finally:
        backend.close()
    assert not path.exists()                         # the listener removes its socket


def test_release_and_acquire_hand_the_cable_over(tmp_path):
    """What the migration switch-over does: the source releases (a listener removes its
    path), the destination, created detached, acquires; on a failed migration the source
    acquires again."""
    path = tmp_path / "nic.sock"
    source = SocketNetBackend("n0", path=path, role="listen")
    destination = SocketNetBackend("n0", path=path, role="listen", attach=False)
    got: list[bytes] = []
    try:
        source.start(got.append)
        destination.start(got.append)
        source.release()
        assert not path.exists()
        destination.acquire()
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer.connect(str(path))
        wait_for(lambda: destination.connected, what="destination accepts")
        peer.send(frame_of(64, 1))
        wait_for(lambda: got == [frame_of(64, 1)], what="frame at the destination")
        peer.close()
        destination.release()
        source.acquire()                      # a failed migration: the source takes it back
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        peer.connect(str(path))
        wait_for(lambda: source.connected, what="source accepts again")
        peer.close()
    finally:
        source.close()
        destination.close()
    peer_listener = EchoPeer(tmp_path / "peer.sock", echo=False)
    client = SocketNetBackend("c0", path=tmp_path / "peer.sock", role="connect")
    try:
        client.release()
        assert not client.send(frame_of(60))
        client.acquire()
        assert client.send(frame_of(60, 2))
        wait_for(lambda: peer_listener.received == [frame_of(60, 2)], what="frame after reconnect")
        assert len(peer_listener.conns) == 2
    finally:
        client.close()
        peer_listener.close()


def test_connect_role_needs_a_listener(tmp_path):
    with pytest.raises(NetError, match="cannot connect to .*nobody.sock"):
        SocketNetBackend("n0", path=tmp_path / "nobody.sock", role="connect")


def test_tap_backend_moves_frames_through_the_kernel():
    """A real tap interface, brought up, with an AF_PACKET socket on the host side."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a tap interface")
    skip_unless_tool("ip")
    name = f"hvt{os.getpid() % 100000}"
    received: list[bytes] = []
    backend = TapNetBackend("n0", ifname=name)
    raw = None
    try:
        backend.start(received.append)
        subprocess.run(["ip", "link", "set", name, "up"], check=True)
        raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        raw.bind((name, 0))
        raw.settimeout(5)
        frame = b"\xff" * 6 + PEER_MAC + ETH_REQ + bytes(range(50))
        assert backend.send(frame)
        assert raw.recv(4096) == frame
        reply = b"\x52\x54\x00\x12\x34\x56" + PEER_MAC + ETH_REP + bytes(range(60))
        raw.send(reply)
        wait_for(lambda: reply in received, what="frame from the tap")
    finally:
        if raw is not None:
            raw.close()
        backend.close()
    assert not Path(f"/sys/class/net/{name}").exists()   # not persistent: gone with the fd


def test_tap_without_privilege_is_one_clear_line(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop CAP_NET_ADMIN")
    skip_unless_tool("setpriv")
    result = subprocess.run(["setpriv", "--bounding-set=-net_admin", *hv_command(
        "-machine", "q35", "-accel", "unicorn", "-kernel", str(FIXTURES / "x86_64" / "net.elf"),
        "-netdev", "tap,id=n0,ifname=hvtap0", "-device", "virtio-net-pci,netdev=n0")],
        capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "hv: error: -netdev tap,id=n0: cannot attach tap hvtap0: Operation not permitted "
        "(needs CAP_NET_ADMIN, or a persistent tap owned by this user)"]


# -- command line ------------------------------------------------------------------------------

def test_netdev_and_device_parse():
    assert parse_netdev("socket,id=n0,listen=/tmp/x.sock").role == "listen"
    assert parse_netdev("socket,id=n0,connect=/tmp/x.sock").role == "connect"
    assert parse_netdev("socket,id=n0,path=/tmp/x.sock,server=on").role == "listen"
    tap = parse_netdev("tap,id=t0,ifname=tap0")
    assert (tap.kind, tap.ifname) == ("tap", "tap0")
    dev = parse_device("virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:AB:cd:01,bus=pcie.0,addr=4")
    assert (dev.driver, dev.netdev, dev.mac, dev.slot, dev.id) == ("virtio-net-pci", "n0", "52:54:00:ab:cd:01",
                                                                    4, "net0")
    assert parse_mac("52:54:00:12:34:56") == bytes.fromhex("525400123456")
    config = parse_args(["-machine", "q35", "-kernel", str(FIXTURES / "x86_64" / "net.elf"),
                         "-netdev", "socket,id=n0,connect=/tmp/x.sock", "-device", "virtio-net-pci,netdev=n0"]).config
    assert [n.id for n in config.netdevs] == ["n0"] and config.devices[0].netdev == "n0"


@pytest.mark.parametrize("netdev,message", [
    ("user,id=n0", r"backend type \(socket or tap\)"),
    ("socket,listen=/tmp/a", "id= is required"),
    ("socket,id=n0", "exactly one of listen=PATH"),
    ("socket,id=n0,listen=/tmp/a,connect=/tmp/b", "exactly one of"),
    ("socket,id=n0,connect=/tmp/a,server=on", "server= only goes with path="),
    ("socket,id=n0,path=/tmp/a,server=maybe", "expected on or off"),
    ("socket,id=n0,listen=/nonexistent/dir/a.sock", "directory of /nonexistent/dir/a.sock does not exist"),
    ("socket,id=n0,connect=/tmp/" + "a" * 120, "socket path must be 1-107 bytes"),
    ("socket,id=n0,fd=3", "unknown parameter 'fd'"),
    ("tap,id=t0", "ifname="),
    ("tap,id=t0,ifname=waytoolongforaniface", "ifname="),
    ("tap,id=t0,ifname=a/b", "ifname="),
    ("socket,id=0bad,listen=/tmp/a", "ids start with a letter"),
])
def test_netdev_errors(netdev, message):
    with pytest.raises(DevConfigError, match=message) as info:
        parse_netdev(netdev)
    assert "\n" not in str(info.value) and str(info.value).startswith("-netdev")


@pytest.mark.parametrize("device,message", [
    ("virtio-net-pci", "netdev= is required"),
    ("virtio-net-pci,netdev=n0,mac=52:54:00:12:34", "six hex bytes"),
    ("virtio-net-pci,netdev=n0,mac=52-54-00-12-34-56", "six hex bytes"),
    ("virtio-net-pci,netdev=n0,mac=01:00:5e:00:00:01", "multicast"),
    ("virtio-net-pci,netdev=n0,drive=d0", "unknown parameter 'drive'"),
    ("virtio-net-pci,netdev=n0,bus=9x", "bus='9x': ids start with a letter"),   # unknown bus: the wiring
    ("virtio-net-pci,netdev=n0,addr=20", "slot"),
])
def test_net_device_errors(device, message):
    with pytest.raises(DevConfigError, match=message) as info:
        parse_device(device)
    assert "\n" not in str(info.value) and str(info.value).startswith("-device virtio-net-pci")


def build_error(tmp_path: Path, netdevs: list[str], devices: list[str]) -> str:
    memory = GuestMemory([RegionSpec(0, 16 << 20)])
    try:
        with pytest.raises(DevConfigError) as info:
            build_pci("q35", memory, Bus("port"), Bus("mmio"), [], [parse_device(d) for d in devices],
                      netdevs=[parse_netdev(n) for n in netdevs])
    finally:
        memory.close()
    return str(info.value)


def test_wiring_errors(tmp_path):
    sock = tmp_path / "s.sock"
    assert build_error(tmp_path, [f"socket,id=n0,listen={sock}"], ["virtio-net-pci,netdev=n1"]) == \
        "-device virtio-net-pci: netdev=n1: no -netdev with that id"
    assert not sock.exists()
    assert build_error(tmp_path, [f"socket,id=n0,listen={sock}"], ["virtio-net-pci,netdev=n0,id=a",
                                                                   "virtio-net-pci,netdev=n0,id=b"]) == \
        "-device virtio-net-pci: netdev=n0 is already used by a device"
    assert build_error(tmp_path, [f"socket,id=n0,listen={sock}", f"socket,id=n0,listen={sock}x"],
                       ["virtio-net-pci,netdev=n0"]) == "-netdev id=n0: duplicate netdev id"
    assert build_error(tmp_path, [f"socket,id=n0,listen={sock}", f"socket,id=n1,listen={sock}x",
                                  f"socket,id=n2,connect={tmp_path}/none.sock"],
                       ["virtio-net-pci,netdev=n0,addr=3", "virtio-net-pci,netdev=n1,addr=3"]) == \
        "-device virtio-net-pci,id=n1: addr=0x3.0 on pcie.0 is taken by another device"
    assert build_error(tmp_path, [f"socket,id=n0,listen={sock}", f"socket,id=n1,listen={sock}1"],
                       ["virtio-net-pci,netdev=n0,addr=0", "virtio-net-pci,netdev=n1,addr=0"]) == \
        "-device virtio-net-pci,id=n1: addr=0x0.0 on pcie.0 is taken by another device"
    assert build_error(tmp_path, [f"socket,id=n0,listen={sock}"], ["virtio-net-pci,netdev=n0,bus=pcie.1"]) == \
        "-device virtio-net-pci: bus=pcie.1: no such bus"
    assert build_error(tmp_path, [f"socket,id=n0,connect={tmp_path}/none.sock"], ["virtio-net-pci,netdev=n0"]) \
        == f"-netdev socket,id=n0: cannot connect to {tmp_path}/none.sock: No such file or directory"
    assert not sock.exists() and not Path(f"{sock}x").exists()   # nothing left behind on errors


def test_default_macs_are_distinct(tmp_path):
    memory = GuestMemory([RegionSpec(0, 16 << 20)])
    setup = build_pci("q35", memory, Bus("port"), Bus("mmio"), [],
                      [parse_device("virtio-net-pci,netdev=a"), parse_device("virtio-net-pci,netdev=b")],
                      netdevs=[parse_netdev(f"socket,id=a,listen={tmp_path}/a"),
                               parse_netdev(f"socket,id=b,listen={tmp_path}/b")])
    try:
        macs = [d["attrs"]["mac"] for d in setup.fingerprint_devices()[1:]]
        assert macs == ["52:54:00:12:34:56", "52:54:00:12:34:57"]
    finally:
        setup.close()
        memory.close()


@pytest.mark.parametrize("args,line", [
    (["-netdev", "socket,id=n0"], "hv: error: -netdev socket,id=n0: give exactly one of listen=PATH, connect=PATH or "
                                  "path=PATH[,server=on|off]"),
    (["-netdev", "socket,id=n0,connect=/tmp/hv-no-such.sock",
      "-device", "virtio-net-pci,netdev=n0,mac=ff:ff:ff:ff:ff:ff"],
     "hv: error: -device virtio-net-pci: mac=ff:ff:ff:ff:ff:ff: a multicast address cannot be a NIC's address"),
    (["-netdev", "socket,id=n0,connect=/tmp/hv-no-such.sock", "-device", "virtio-net-pci,netdev=n0"],
     "hv: error: -netdev socket,id=n0: cannot connect to /tmp/hv-no-such.sock: No such file or directory"),
])
def test_launcher_reports_one_line_and_exits_1(args, line):
    result = subprocess.run(hv_command("-machine", "q35", "-accel", "unicorn", "-kernel",
                                       str(FIXTURES / "x86_64" / "net.elf"), *args),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [line]


# -- the fixture guest -----------------------------------------------------------------------------

def test_reference_matches_a_recorded_run():
    """The sums below were printed by net.elf on hv (KVM, Unicorn x86_64, Unicorn aarch64)."""
    assert net_reference(64, 3, "52:54:00:12:34:56")[3:6] == [
        "net round 1 sent 64 ok 64 sum 508f4ccee32d0f16",
        "net round 2 sent 64 ok 64 sum 1291703a9379da84",
        "net round 3 sent 64 ok 64 sum 6eb8fce9ecc9f251"]


GUESTS = [
    pytest.param("q35", "x86_64", "kvm", marks=requires_kvm, id="x86_64-kvm"),
    pytest.param("q35", "x86_64", "unicorn", id="x86_64-unicorn"),
    pytest.param("virt", "aarch64", "unicorn", id="aarch64-unicorn"),
]


def start_hv(tmp_path: Path, name: str, machine: str, arch: str, accel: str, append: str,
             netdev: str, mac: str, addr: str = "2") -> HvProcess:
    return HvProcess(tmp_path, "-machine", machine, "-m", "64", "-accel", accel, "-kernel",
                     str(FIXTURES / arch / "net.elf"), "-append", append, "-netdev", netdev,
                     "-device", f"virtio-net-pci,netdev=n0,id=net0,mac={mac},bus=pcie.0,addr={addr}", name=name)


@pytest.mark.parametrize("machine,arch,accel", GUESTS)
def test_net_guest_against_echo_peer(tmp_path, machine, arch, accel):
    peer = EchoPeer(tmp_path / "peer.sock")
    mac = "52:54:00:aa:00:01"
    vm = start_hv(tmp_path, "vm", machine, arch, accel, "frames=64 iterations=2",
                  f"socket,id=n0,connect={tmp_path / 'peer.sock'}", mac, addr="5")
    try:
        assert vm.wait(120) == 0, vm.stderr()
        assert vm.output().splitlines() == net_reference(64, 2, mac, slot=5)
        requests = [f for f in peer.received if f[12:14] == ETH_REQ]
        assert len(requests) == 2 * 64     # nothing lost on a healthy cable: no resends
        assert requests[0] == b"\xff" * 6 + parse_mac(mac) + ETH_REQ + payload(1, 0, parse_mac(mac))
    finally:
        vm.close()
        peer.close()


def test_net_guest_listening_retransmits_until_the_peer_connects(tmp_path):
    """hv listens; the frames the guest sends before anyone is connected are dropped (link
    down) and the guest's resends get through once the peer connects."""
    path = tmp_path / "nic.sock"
    mac = "52:54:00:bb:00:02"
    vm = start_hv(tmp_path, "vm", "q35", "x86_64", "unicorn", "frames=16 iterations=2 patience=200 retries=1000",
                  f"socket,id=n0,listen={path}", mac)
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        vm.wait_output("net: device", 60)
        time.sleep(0.3)                              # the first round's frames go nowhere
        conn.connect(str(path))
        conn.settimeout(1)
        deadline = time.monotonic() + 60
        while vm.proc.poll() is None and time.monotonic() < deadline:
            try:
                frame = conn.recv(4096)
            except socket.timeout:
                continue
            if frame[12:14] == ETH_REQ:
                conn.send(frame[6:12] + PEER_MAC + ETH_REP + frame[14:])
        assert vm.wait(30) == 0, vm.stderr()
        assert vm.output().splitlines() == net_reference(16, 2, mac)
        assert not path.exists()                     # hv removes its listening socket on exit
    finally:
        conn.close()
        vm.close()


@pytest.mark.slow
def test_two_guests_cabled_together(tmp_path):
    """x86_64 on KVM (or Unicorn) listens, aarch64 on Unicorn connects: each is the other's echo peer."""
    from tests.helpers import kvm_unusable_reason

    path = tmp_path / "cable.sock"
    accel = "kvm" if kvm_unusable_reason() is None else "unicorn"
    a = start_hv(tmp_path, "a", "q35", "x86_64", accel, "frames=32 iterations=2 linger=1 patience=1000 retries=1000",
                 f"socket,id=n0,listen={path}", "52:54:00:00:00:0a")
    b = None
    try:
        wait_for(path.exists, 60, "listening socket")
        b = start_hv(tmp_path, "b", "virt", "aarch64", "unicorn",
                     "frames=32 iterations=2 linger=1 patience=1000 retries=1000",
                     f"socket,id=n0,connect={path}", "52:54:00:00:00:0b", addr="3")
        a.wait_output("done", 120)
        b.wait_output("done", 120)
        assert a.output().splitlines() == net_reference(32, 2, "52:54:00:00:00:0a")
        assert b.output().splitlines() == net_reference(32, 2, "52:54:00:00:00:0b", slot=3)
    finally:
        a.close()
        if b is not None:
            b.close()


MOVES = [
    pytest.param("q35", "x86_64", ["kvm", "unicorn", "kvm"], marks=requires_kvm, id="x86_64-kvm-unicorn-kvm"),
    pytest.param("q35", "x86_64", ["unicorn", "kvm", "unicorn"], marks=requires_kvm, id="x86_64-unicorn-kvm-unicorn"),
    pytest.param("virt", "aarch64", ["unicorn", "unicorn", "unicorn"], id="aarch64-unicorn"),
]


@pytest.mark.slow
@pytest.mark.parametrize("machine_type,arch,accels", MOVES)
def test_net_guest_moves_between_backends_mid_traffic(tmp_path, machine_type, arch, accels):
    """Pause mid-round, save through plain values, restore on another backend whose netdev
    reconnects to the peer: frames lost in the switch are resent by the guest, none is
    delivered twice, and the output equals an unmoved run's."""
    from hv.machine.move import copy_ram

    peer = EchoPeer(tmp_path / "peer.sock")
    mac = "52:54:00:cc:00:03"
    iterations = 9
    config = parse_args(["-machine", machine_type, "-m", "64", "-kernel", str(FIXTURES / arch / "net.elf"),
                         "-append", f"frames=32 iterations={iterations} patience=300 retries=1000",
                         "-netdev", f"socket,id=n0,connect={tmp_path / 'peer.sock'}",
                         "-device", f"virtio-net-pci,netdev=n0,id=net0,mac={mac},addr=2"]).config
    console = BufferSink()
    machine = Machine(config, backend_class(accels[0])(), console)
    machine.load_kernel(config.kernel.read_bytes())
    machine.start()
    try:
        for hop, accel in enumerate(accels[1:]):
            deadline = time.monotonic() + 120
            while console.getvalue().count(b"\n") < 2 + 3 * (hop + 1):
                assert time.monotonic() < deadline, console.getvalue()[-300:]
                time.sleep(0.001)
            assert machine.pause()
            snapshot = MachineSnapshot.from_dict(machine.save().to_dict())
            fresh = Machine(config, backend_class(accel)(), console)
            copy_ram(machine.memory, fresh.memory)
            fresh.restore(snapshot)
            fresh.kernel_image = machine.kernel_image
            machine.close()
            machine = fresh
            machine.start()
        assert machine.wait_shutdown(180) == "guest-shutdown", console.getvalue()[-300:]
    finally:
        machine.close()
        peer.close()
    assert console.getvalue().decode().splitlines() == net_reference(32, iterations, mac)
    assert len(peer.conns) == len(accels)


# -- the fixture binaries ----------------------------------------------------------------------------

# -- live migration between hv processes -------------------------------------------------------------

class ReconnectingPeer:
    """Connects to a listening hv netdev, echoes, and reconnects when hv hangs up (as a
    migration source does at the switch-over, before the destination listens)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.connections = 0
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            conn = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            try:
                conn.connect(str(self.path))
            except OSError:
                conn.close()
                time.sleep(0.01)
                continue
            self.connections += 1
            conn.settimeout(0.2)
            with conn:
                while not self._stop:
                    try:
                        frame = conn.recv(1 << 17)
                    except socket.timeout:
                        continue
                    except OSError:
                        break
                    if not frame:
                        break
                    if frame[12:14] == ETH_REQ:
                        try:
                            conn.send(frame[6:12] + PEER_MAC + ETH_REP + frame[14:])
                        except OSError:
                            break

    def close(self) -> None:
        self._stop = True
        self._thread.join(5)


LIVE = [
    pytest.param("q35", "x86_64", "kvm", "kvm", "connect", marks=requires_kvm, id="x86_64-kvm-kvm"),
    pytest.param("q35", "x86_64", "kvm", "unicorn", "connect", marks=requires_kvm, id="x86_64-kvm-unicorn"),
    pytest.param("q35", "x86_64", "unicorn", "kvm", "connect", marks=requires_kvm, id="x86_64-unicorn-kvm"),
    pytest.param("q35", "x86_64", "unicorn", "unicorn", "listen", id="x86_64-unicorn-unicorn-listen"),
    pytest.param("virt", "aarch64", "unicorn", "unicorn", "connect", id="aarch64-unicorn-unicorn"),
]


@pytest.mark.parametrize("machine,arch,first,second,role", LIVE)
def test_live_migration_mid_traffic(hv, machine, arch, first, second, role):
    """QMP migrate while the guest exchanges frames: the netdev is handed over at the
    switch-over (source releases, destination opens), the guest resends what was lost, and
    the joined output of both VMs equals an unmigrated run's."""
    import tempfile

    from tests.helpers import Vm, complete_lines

    with tempfile.TemporaryDirectory(prefix="hvn") as sock_dir:
        nic = os.path.join(sock_dir, "nic.sock")
        peer: Any
        if role == "connect":
            peer = EchoPeer(Path(nic))
        mac = "52:54:00:dd:00:04"
        frames = 32
        args = ["-machine", machine, "-m", "64", "-kernel", str(FIXTURES / arch / "net.elf"),
                "-append", f"frames={frames} iterations=0 patience=500 retries=1000",
                "-netdev", f"socket,id=n0,{role}={nic}",
                "-device", f"virtio-net-pci,netdev=n0,id=net0,mac={mac},addr=2"]
        src = Vm(hv, sock_dir, "src", "-accel", first, *args)
        dst = None
        try:
            if role == "listen":
                wait_for(lambda: os.path.exists(nic), 60, "hv listening")
                peer = ReconnectingPeer(Path(nic))
            src.process.wait_output("net round 2 ", 120)
            dst = Vm(hv, sock_dir, "dst", "-accel", second, *args, "-incoming", f"unix:{sock_dir}/mig.sock")
            assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
            result = src.wait_migration()
            assert result["status"] == "completed", result
            dst.wait_lines(dst.output().count("\n") + 3)   # three more rounds on the destination
            dst.execute("stop")
            lines = complete_lines(src.output() + dst.output())
            assert lines == net_reference(frames, len(lines) - 3, mac, forever=True), lines[-3:]
            assert "net round" in dst.output()          # traffic really continued on the destination
            assert (len(peer.conns) if role == "connect" else peer.connections) == 2
        finally:
            src.close()
            if dst is not None:
                dst.close()
            peer.close()


@pytest.mark.parametrize("arch", [pytest.param(arch, marks=tool_marks(f"qemu-system-{arch}"), id=arch)
                                  for arch in ("x86_64", "aarch64")])
def test_net_guest_on_qemu_matches_reference(arch):
    """The reference machine: the same binary against QEMU's virtio-net-pci (modern only),
    cabled to a datagram echo peer with QEMU's ``-netdev dgram`` (unix sockets)."""
    import tempfile

    binary = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}[arch]
    with tempfile.TemporaryDirectory(prefix="hvq") as sock_dir:
        peer_path, local_path = os.path.join(sock_dir, "peer"), os.path.join(sock_dir, "qemu")
        peer = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        peer.bind(peer_path)
        done = threading.Event()

        def echo() -> None:
            # Blocking sends: a unix datagram queue holds only max_dgram_qlen (10) messages,
            # and an echo that gave up on a full queue would leave QEMU's transmit stalled.
            while not done.is_set():
                if not select.select([peer], [], [], 0.2)[0]:
                    continue
                frame, addr = peer.recvfrom(1 << 17)
                if frame[12:14] == ETH_REQ:
                    peer.sendto(frame[6:12] + PEER_MAC + ETH_REP + frame[14:], addr)

        thread = threading.Thread(target=echo, daemon=True)
        thread.start()
        machine = ["-M", "q35"] if arch == "x86_64" else ["-M", "virt,highmem=off", "-cpu", "cortex-a57"]
        try:
            result = subprocess.run(
                [binary, *machine, "-m", "128M", "-display", "none", "-serial", "stdio", "-monitor", "none",
                 "-nodefaults", "-no-reboot", "-kernel", str(FIXTURES / arch / "net.elf"),
                 "-append", "frames=64 iterations=3",
                 "-netdev", f"dgram,id=n0,local.type=unix,local.path={local_path},remote.type=unix,"
                            f"remote.path={peer_path}",
                 "-device", "virtio-net-pci,netdev=n0,addr=2,disable-legacy=on,mac=52:54:00:12:34:56,romfile="],
                capture_output=True, timeout=120)
        finally:
            done.set()
            thread.join(5)
            peer.close()
    assert result.returncode == 0, result.stderr
    mode = "msix" if arch == "x86_64" else "polling"     # as for blk: no GICv2m with QEMU's GICv3
    assert result.stdout.decode().splitlines() == net_reference(64, 3, "52:54:00:12:34:56", mode=mode)
