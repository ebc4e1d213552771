"""The far end of a Linux guest's socket netdev: a SEQPACKET listener (one Ethernet frame
per message, hv's ``-netdev socket`` cable) that answers ARP requests for its address and
ICMP echo requests to it, like a host on the guest's subnet, and counts what it saw.

It accepts any number of connections in turn, so a live-migrated guest (whose new hv
connects once the old one hung up at the switch-over) keeps talking to it. Frames come
from the guest: every length is checked before a field is read, and anything else is
counted and ignored.
"""
from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field
from pathlib import Path

ETH_ARP = 0x0806
ETH_IPV4 = 0x0800
PEER_MAC = bytes.fromhex("020000000002")


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


@dataclass
class NetPeer:
    path: Path
    ip: str = "10.0.2.2"
    arp_replies: int = 0
    echo_replies: int = 0
    ignored: int = 0
    connections: int = 0
    _stop: bool = False
    _listener: socket.socket = field(init=False)

    def __post_init__(self) -> None:
        self._ip = socket.inet_aton(self.ip)
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self._listener.bind(str(self.path))
        self._listener.listen(4)
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            while not self._stop:
                try:
                    frame = conn.recv(65536)
                except OSError:
                    return
                if not frame:
                    return
                reply = self.answer(frame)
                if reply is None:
                    self.ignored += 1
                    continue
                try:
                    conn.send(reply)
                except OSError:
                    return

    def answer(self, frame: bytes) -> bytes | None:
        """The reply to one frame, or None."""
        if len(frame) < 14:
            return None
        (ethertype,) = struct.unpack_from("!H", frame, 12)
        if ethertype == ETH_ARP:
            return self._arp(frame)
        if ethertype == ETH_IPV4:
            return self._icmp(frame)
        return None

    def _arp(self, frame: bytes) -> bytes | None:
        if len(frame) < 42:
            return None
        htype, ptype, hlen, plen, oper = struct.unpack_from("!HHBBH", frame, 14)
        sha, spa, tpa = frame[22:28], frame[28:32], frame[38:42]
        if (htype, ptype, hlen, plen, oper) != (1, ETH_IPV4, 6, 4, 1) or tpa != self._ip:
            return None
        self.arp_replies += 1
        body = struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, 2) + PEER_MAC + self._ip + sha + spa
        return sha + PEER_MAC + struct.pack("!H", ETH_ARP) + body

    def _icmp(self, frame: bytes) -> bytes | None:
        ip = frame[14:]
        if len(ip) < 20 or ip[0] >> 4 != 4:
            return None
        ihl = (ip[0] & 0xF) * 4
        (total,) = struct.unpack_from("!H", ip, 2)
        if ihl < 20 or total < ihl + 8 or total > len(ip) or ip[9] != 1 or ip[16:20] != self._ip:
            return None
        icmp = bytearray(ip[ihl:total])
        if icmp[0] != 8:
            return None
        icmp[0] = 0
        icmp[2:4] = b"\0\0"
        icmp[2:4] = struct.pack("!H", checksum(bytes(icmp)))
        header = bytearray(ip[:ihl])
        header[12:16], header[16:20] = ip[16:20], ip[12:16]
        header[8] = 64
        header[10:12] = b"\0\0"
        header[10:12] = struct.pack("!H", checksum(bytes(header)))
        self.echo_replies += 1
        return frame[6:12] + PEER_MAC + struct.pack("!H", ETH_IPV4) + bytes(header) + bytes(icmp)

    def close(self) -> None:
        self._stop = True
        self._listener.close()
