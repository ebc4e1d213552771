"""After a live migration the guest itself tells the network where it is (issue 14 item 4).

A Linux guest with eth0 up (``hv_ip=``) on a socket cable is live-migrated to a fresh hv;
the destination's virtio-net sets VIRTIO_NET_S_ANNOUNCE and raises its config interrupt
after the switch-over, and Linux's virtio_net answers with ``netdev_notify_peers``: a
gratuitous ARP (request, sender IP = target IP = the guest's) from the guest's MAC, then
ANNOUNCE_ACK on the control queue. The peer on the cable (tests/e2e/netpeer.py, which
also records every frame here) must see that ARP on the destination's connection, beside
hv's own RARP, and the guest keeps talking to it.
"""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest

from tests.e2e.conftest import LinuxLab
from tests.e2e.netpeer import ETH_ARP, ETH_IPV4, NetPeer
from tests.e2e.conftest import NET_ARGS, assert_healthy, boot, incoming, migrate

GUEST_MAC = bytes.fromhex("525400123456")
GUEST_IP = "10.0.2.15"
ETH_RARP = 0x8035
ANNOUNCE_WAIT = 120.0   # seconds for the guest's workqueue to send its ARP (Unicorn is slow)


class RecordingPeer(NetPeer):
    """A NetPeer that also records each frame with the number of the connection it came
    on (1 = the source hv, 2 = the destination's)."""

    def __post_init__(self) -> None:
        self.frames: list[tuple[int, bytes]] = []
        self._frames_lock = threading.Lock()
        super().__post_init__()

    def answer(self, frame: bytes) -> bytes | None:
        with self._frames_lock:
            self.frames.append((self.connections, bytes(frame)))
        return super().answer(frame)

    def seen(self, connection: int, kind: str) -> list[bytes]:
        with self._frames_lock:
            frames = [f for n, f in self.frames if n == connection]
        return [f for f in frames if classify(f) == kind]


def classify(frame: bytes) -> str:
    """'garp' (a gratuitous ARP from the guest's MAC and IP), 'rarp' (a RARP for the
    guest's MAC) or 'other'; every length checked before a field is read."""
    if len(frame) < 42:
        return "other"
    (ethertype,) = struct.unpack_from("!H", frame, 12)
    htype, ptype, hlen, plen, oper = struct.unpack_from("!HHBBH", frame, 14)
    if (htype, ptype, hlen, plen) != (1, ETH_IPV4, 6, 4):
        return "other"
    sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
    guest_ip = socket.inet_aton(GUEST_IP)
    if (ethertype == ETH_ARP and oper in (1, 2) and frame[6:12] == GUEST_MAC and sha == GUEST_MAC
            and spa == tpa == guest_ip):
        return "garp"
    if ethertype == ETH_RARP and oper == 3 and sha == GUEST_MAC:
        return "rarp"
    return "other"


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"no {what} within {timeout:.0f} s"
        time.sleep(0.1)


@pytest.mark.parametrize("machine", ["q35", "virt"])
def test_guest_sends_a_gratuitous_arp_after_a_live_migration(lab: LinuxLab, machine: str) -> None:
    cable = lab.tmp_path / "cable.sock"
    peer = RecordingPeer(cable)
    try:
        netdev = ("-netdev", f"socket,id=n0,connect={cable}", *NET_ARGS)
        append = f"hv_ip={GUEST_IP}/24"
        src = boot(lab, machine, "src", append=append, extra=netdev)
        src.shell("ping -c 1 -W 10 10.0.2.2", r"1 packets transmitted, 1 packets received", 60)
        features = src.shell("cat /sys/class/net/eth0/device/features", r"\n([01]{64})", 30).group(1)
        assert features[17] == "1" and features[21] == "1", features   # CTRL_VQ, GUEST_ANNOUNCE
        assert peer.seen(1, "garp") == []          # nothing announced before the move
        dst = lab.start("dst", lab.command(machine, "dst", append=append,
                                           extra=(*netdev, "-incoming", incoming(lab, "unix", "dst"))))
        migrate(src, dst.incoming_address())
        wait_until(lambda: peer.seen(2, "garp"), ANNOUNCE_WAIT, "gratuitous ARP from the guest after the move")
        wait_until(lambda: peer.seen(2, "rarp"), 30, "RARP from hv after the move")
        assert peer.seen(1, "garp") == []          # the source never announced
        before = peer.echo_replies
        dst.shell("ping -c 2 -W 10 10.0.2.2", r"2 packets transmitted, 2 packets received", 60)
        assert peer.echo_replies >= before + 2
        dst.execute("stop")
        assert_healthy(src.final_output() + dst.output())
    finally:
        peer.close()
