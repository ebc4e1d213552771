"""The network follows the guest: after a live migration the destination announces each
NIC's MAC with QEMU's self-announce RARP frames (5 rounds, 50 ms + 100 ms steps), sent on
the destination's netdev, so switches learn the guest's new port. Real hv processes, a
real SOCK_SEQPACKET peer on the socket netdev (tests/machine/conftest.py's EchoPeer)."""
from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from hv.net import ANNOUNCE_ROUNDS, ETH_P_RARP, rarp_frame
from tests.helpers import FIXTURES, Vm
from tests.machine.conftest import EchoPeer

MAC = bytes.fromhex("525400dd0007")


def test_rarp_frame_layout():
    frame = rarp_frame(MAC)
    assert len(frame) == 60 and frame[:6] == b"\xff" * 6 and frame[6:12] == MAC
    assert int.from_bytes(frame[12:14], "big") == ETH_P_RARP == 0x8035
    assert frame[14:22] == bytes.fromhex("0001080006040003")          # Ethernet/IPv4, reverse request
    assert frame[22:28] == MAC and frame[32:38] == MAC and frame[42:] == bytes(18)


def test_destination_announces_guest_mac_after_migration(hv):
    with tempfile.TemporaryDirectory(prefix="hva") as sock_dir:
        nic = os.path.join(sock_dir, "nic.sock")
        peer = EchoPeer(Path(nic))
        mac_text = ":".join(f"{b:02x}" for b in MAC)
        args = ["-machine", "q35", "-accel", "unicorn", "-m", "64", "-kernel", str(FIXTURES / "x86_64" / "net.elf"),
                "-append", "frames=8 iterations=0 patience=500 retries=1000",
                "-netdev", f"socket,id=n0,connect={nic}",
                "-device", f"virtio-net-pci,netdev=n0,id=net0,mac={mac_text},addr=2"]
        src = Vm(hv, sock_dir, "src", *args)
        dst = None
        try:
            src.process.wait_output("net round 2 ", 120)
            assert not [f for f in peer.received if f[12:14] == b"\x80\x35"]   # no announce before
            dst = Vm(hv, sock_dir, "dst", *args, "-incoming", f"unix:{sock_dir}/mig.sock")
            assert src.execute("migrate", uri=dst.incoming_address()) == {"return": {}}
            assert src.wait_migration()["status"] == "completed"
            deadline = time.monotonic() + 30
            while len([f for f in peer.received if f[12:14] == b"\x80\x35"]) < ANNOUNCE_ROUNDS:
                assert time.monotonic() < deadline, f"no RARP announce from the destination: {dst.stderr()[-1500:]}"
                time.sleep(0.02)
            rarps = [f for f in peer.received if f[12:14] == b"\x80\x35"]
            assert rarps == [rarp_frame(MAC)] * ANNOUNCE_ROUNDS
            assert len(peer.conns) == 2                       # they came on the destination's connection
            rounds = dst.output().count("net round")
            dst.wait_lines(dst.output().count("\n") + 2)      # the guest's own traffic goes on
            assert dst.output().count("net round") > rounds or rounds > 0
            assert "announced 1 NIC(s) with 5 RARP rounds" in dst.stderr()
        finally:
            src.close()
            if dst is not None:
                dst.close()
            peer.close()
