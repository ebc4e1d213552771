"""virtio-net's control queue and guest announce (VIRTIO_NET_F_CTRL_VQ, F_GUEST_ANNOUNCE).

The device is driven through the machine's real buses and rings in real guest RAM (the
``net`` fixture of tests/machine/conftest.py): commands are descriptor chains on queue 2,
acks are read back from RAM, interrupts from the ISR register and the MSI-X PBA.
"""
from __future__ import annotations

import pytest

from hv.devices.interfaces import DeviceStateError
from hv.devices.persist import restore_state, state_record
from hv.devices.virtio_net import (
    CTRL_ERR,
    CTRL_OK,
    CTRL_QUEUE,
    F_CTRL_VQ,
    F_GUEST_ANNOUNCE,
    F_MAC,
    F_STATUS,
    QUEUE_SIZE,
    STATUS_ANNOUNCE,
    STATUS_LINK_UP,
    VirtioNetState,
    announce_guests,
)
from hv.devices.virtio_pci import STATUS_NEEDS_RESET
from hv.devices.virtqueue import VirtqueueState
from tests.machine.conftest import F_VERSION_1, NetDriver

ANNOUNCE_FEATURES = F_VERSION_1 | 1 << F_MAC | 1 << F_STATUS | 1 << F_CTRL_VQ | 1 << F_GUEST_ANNOUNCE
CTRL_RINGS = (0x18000, 0x19000, 0x1A000)
CMD_BUF = 0x300000
ACK_BUF = 0x301000


def start(driver: NetDriver, features: int = ANNOUNCE_FEATURES) -> None:
    """Set the driver up with the control queue's rings too (queue 2)."""
    driver.rings[CTRL_QUEUE] = CTRL_RINGS
    driver.init(features)
    driver.avail_idx.append(0)
    driver.used_seen.append(0)


def command(driver: NetDriver, cls: int, cmd: int, data: bytes = b"", head: int = 0) -> list[tuple[int, int]]:
    """Post one control command (header, optional data, ack byte) and kick queue 2;
    returns the used entries. The ack byte is pre-set to 0xEE to see it written."""
    driver.memory.write(CMD_BUF, bytes([cls, cmd]) + data)
    driver.memory.write(ACK_BUF, b"\xee")
    if data:
        driver.put_desc(CTRL_QUEUE, head, CMD_BUF, 2, 1, head + 1)
        driver.put_desc(CTRL_QUEUE, head + 1, CMD_BUF + 2, len(data), 1, head + 2)
        driver.put_desc(CTRL_QUEUE, head + 2, ACK_BUF, 1, 2)
    else:
        driver.put_desc(CTRL_QUEUE, head, CMD_BUF, 2, 1, head + 1)
        driver.put_desc(CTRL_QUEUE, head + 1, ACK_BUF, 1, 2)
    driver.publish(CTRL_QUEUE, head)
    driver.kick(CTRL_QUEUE)
    return driver.used(CTRL_QUEUE)


def ack_byte(driver: NetDriver) -> int:
    return driver.memory.read(ACK_BUF, 1)[0]


def net_status(driver: NetDriver) -> int:
    return driver.r(0x2006, 2)


def test_offers_ctrl_vq_and_guest_announce_with_three_queues(net):  # noqa: F811
    net.init()
    offered = net.offered()
    assert offered >> F_CTRL_VQ & 1 and offered >> F_GUEST_ANNOUNCE & 1
    assert net.r(0x12, 2) == 3                          # rx, tx, control
    msix_cap = net.device.msix.cap
    assert (net.cfg(msix_cap) >> 16 & 0x7FF) + 1 == 4   # one vector per queue + config, as QEMU


def test_announce_sets_status_raises_isr_and_ack_clears(net):  # noqa: F811
    start(net)
    generation = net.r(0x15, 1)
    assert net_status(net) == STATUS_LINK_UP
    assert net.device.announce_guest() is True
    assert net_status(net) == STATUS_LINK_UP | STATUS_ANNOUNCE
    assert net.r(0x15, 1) == (generation + 1) & 0xFF     # config_generation moved
    assert net.r(0x1000, 1) == 2                        # ISR: configuration change
    assert command(net, 3, 0) == [(0, 1)] and ack_byte(net) == CTRL_OK
    assert net_status(net) == STATUS_LINK_UP and net.device.net.announcements == 1
    # a second ack with nothing pending is an error answer, as QEMU's
    assert command(net, 3, 0, head=2) == [(2, 1)] and ack_byte(net) == CTRL_ERR
    assert not net.status & STATUS_NEEDS_RESET


@pytest.mark.parametrize("cls, cmd, data", [(0, 0, b"\x01"),             # RX PROMISC (CTRL_RX not offered)
                                            (1, 1, bytes(6)),            # MAC_ADDR_SET
                                            (4, 0, (1).to_bytes(2, "little")),  # MQ VQ_PAIRS_SET
                                            (3, 1, b""), (3, 0, b"\x00"), (255, 255, b"")])
def test_other_commands_are_answered_err(net, cls, cmd, data):  # noqa: F811
    start(net)
    net.device.announce_guest()
    used = command(net, cls, cmd, data)
    assert used == [(0, 1)] and ack_byte(net) == CTRL_ERR
    assert net_status(net) & STATUS_ANNOUNCE            # nothing acknowledged by a wrong command
    assert not net.status & STATUS_NEEDS_RESET


@pytest.mark.parametrize("layout", ["no-ack-byte", "short-header", "writable-only"])
def test_malformed_control_chain_needs_reset(net, layout):  # noqa: F811
    start(net)
    net.memory.write(CMD_BUF, b"\x03\x00")
    if layout == "no-ack-byte":
        net.put_desc(CTRL_QUEUE, 0, CMD_BUF, 2, 0)
    elif layout == "short-header":
        net.put_desc(CTRL_QUEUE, 0, CMD_BUF, 1, 1, 1)
        net.put_desc(CTRL_QUEUE, 1, ACK_BUF, 1, 2)
    else:
        net.put_desc(CTRL_QUEUE, 0, ACK_BUF, 3, 2)
    net.publish(CTRL_QUEUE, 0)
    net.kick(CTRL_QUEUE)
    assert net.status & STATUS_NEEDS_RESET and "control chain" in net.device.error


def test_no_announce_without_the_feature(net):  # noqa: F811
    start(net, F_VERSION_1 | 1 << F_MAC | 1 << F_CTRL_VQ)   # CTRL_VQ alone (the fixture guest: MAC alone)
    assert net.device.announce_guest() is False
    assert net_status(net) == STATUS_LINK_UP and net.r(0x1000, 1) == 0
    assert announce_guests([object(), net.device]) == 0


def test_announce_before_driver_ok_does_nothing(net):  # noqa: F811
    net.cfg_write(0x20, 4, net.bar)
    net.cfg_write(0x24, 4, 0)
    net.cfg_write(0x04, 2, 0x6)
    assert net.device.announce_guest() is False
    assert net_status(net) == STATUS_LINK_UP


def test_announce_uses_the_msix_config_vector(net):  # noqa: F811
    start(net)
    cap = net.device.msix.cap
    net.cfg_write(cap + 2, 2, 0x8000)                    # MSI-X on; every vector still masked
    net.w(0x10, 2, 3)                                    # config_msix_vector = 3
    assert net.r(0x10, 2) == 3
    assert announce_guests([net.device]) == 1
    assert net.device.msix.pba == 1 << 3                 # masked vector 3: pending, not lost
    assert net.r(0x1000, 1) == 0                         # no ISR bit with MSI-X


def test_pending_announce_and_ctrl_queue_migrate(net):  # noqa: F811
    start(net)
    net.device.announce_guest()
    command(net, 0, 0, b"\x01")                           # moves the control queue's indexes
    record = state_record(net.device.save())
    assert record["version"] == 2 and record["state"]["announce"] is True
    net.device.restore(VirtioNetState())                  # power-on, then the saved state again
    assert net.device.net.status == STATUS_LINK_UP
    net.device.restore(restore_state(VirtioNetState, record, "nic0"))
    assert net_status(net) == STATUS_LINK_UP | STATUS_ANNOUNCE
    assert net.device.queues[CTRL_QUEUE].state.last_avail_idx == 1
    assert command(net, 3, 0, head=2) == [(2, 1)] and ack_byte(net) == CTRL_OK


def test_version_1_state_without_ctrl_queue_loads(net):  # noqa: F811
    net.init()                                            # the fixture guest's way: MAC only
    raw = net.device.save().to_dict()
    transport = dict(raw["transport"], queues=raw["transport"]["queues"][:2],
                     msix_table=raw["transport"]["msix_table"][:2 * 16 * 3])
    old = {"version": 1, "state": {"transport": transport, "mac": raw["mac"]}}
    state = restore_state(VirtioNetState, old, "nic0")
    assert state.announce is False and len(state.transport.queues) == 3
    assert state.transport.queues[2] == VirtqueueState(size=QUEUE_SIZE).to_dict()
    net.device.restore(state)
    assert net.device.queues[0].state.ready and not net.device.queues[CTRL_QUEUE].state.ready
    assert net.device.announce_guest() is False           # that guest negotiated no GUEST_ANNOUNCE
    with pytest.raises(DeviceStateError, match="announce"):
        VirtioNetState.from_dict(dict(raw, announce="yes"))
    with pytest.raises(DeviceStateError, match="wrong fields"):
        VirtioNetState.from_dict(old["state"])            # a version-1 layout read as version 2
