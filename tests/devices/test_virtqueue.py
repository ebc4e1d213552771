"""Split virtqueue over real GuestMemory: well-formed chains, indirect tables, event index,
and hostile rings (loops, out-of-RAM addresses, overlong chains, zero lengths) that must
end in VirtqueueError -- or, through the device, in DEVICE_NEEDS_RESET -- never in another
exception or an access outside RAM."""
from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hv.block import BlockBackend
from hv.devices.virtio_blk import VirtioBlk
from hv.devices.virtio_pci import (STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
                                   STATUS_NEEDS_RESET, VirtioPciDevice)
from hv.devices.virtqueue import (MAX_INDIRECT, VIRTQ_DESC_F_INDIRECT, VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE,
                                  Virtqueue, VirtqueueError, VirtqueueState, need_event)
from hv.memory import GuestMemory, RegionSpec

RAM = 0x10_0000        # 1 MiB of RAM at 1 MiB: below and above are outside RAM
RAM_SIZE = 0x10_0000
DESC, AVAIL, USED = RAM, RAM + 0x1000, RAM + 0x2000
QSIZE = 8
NEXT, WRITE, INDIRECT = VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT


@pytest.fixture
def memory():
    mem = GuestMemory([RegionSpec(RAM, RAM_SIZE)])
    yield mem
    mem.close()


def make_queue(memory: GuestMemory, indirect: bool = False, event_idx: bool = False) -> Virtqueue:
    q = Virtqueue(memory, 256, indirect=indirect, event_idx=event_idx)
    q.state = VirtqueueState(size=QSIZE, ready=True, desc=DESC, avail=AVAIL, used=USED)
    q.check_rings()
    return q


def desc(memory: GuestMemory, index: int, addr: int, length: int, flags: int = 0, nxt: int = 0,
         table: int = DESC) -> None:
    memory.write(table + 16 * index, addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                 + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little"))


def offer(memory: GuestMemory, heads: list[int], start: int = 0) -> None:
    for n, head in enumerate(heads):
        memory.write_int(AVAIL + 4 + 2 * ((start + n) % QSIZE), 2, head)
    memory.write_int(AVAIL + 2, 2, (start + len(heads)) & 0xFFFF)


def test_pop_chain_and_push(memory):
    q = make_queue(memory)
    desc(memory, 2, RAM + 0x8000, 16, NEXT, 5)
    desc(memory, 5, RAM + 0x9000, 512, NEXT | WRITE, 7)
    desc(memory, 7, RAM + 0xA000, 1, WRITE)
    offer(memory, [2])
    chain = q.pop()
    assert chain is not None and chain.head == 2
    assert [(s.addr, s.length) for s in chain.readable] == [(RAM + 0x8000, 16)]
    assert [(s.addr, s.length) for s in chain.writable] == [(RAM + 0x9000, 512), (RAM + 0xA000, 1)]
    assert q.pop() is None
    memory.take_vmm_dirty()
    q.push(chain.head, 513)
    assert memory.read_int(USED + 2, 2) == 1
    assert memory.read(USED + 4, 8) == (2).to_bytes(4, "little") + (513).to_bytes(4, "little")
    assert memory.take_vmm_dirty()[(USED - RAM) // 4096 >> 3]  # the used ring write is tracked


def test_indirect_table(memory):
    q = make_queue(memory, indirect=True)
    table = RAM + 0x5000
    desc(memory, 0, RAM + 0x8000, 16, NEXT, 1, table=table)
    desc(memory, 1, RAM + 0x9000, 1, WRITE, table=table)
    desc(memory, 0, table, 32, INDIRECT)
    offer(memory, [0])
    chain = q.pop()
    assert chain is not None and chain.readable_length == 16 and chain.writable_length == 1


def test_indirect_not_negotiated_is_an_error(memory):
    q = make_queue(memory, indirect=False)
    desc(memory, 0, RAM + 0x5000, 32, INDIRECT)
    offer(memory, [0])
    with pytest.raises(VirtqueueError, match="not negotiated"):
        q.pop()


@pytest.mark.parametrize("case,message", [
    ("loop", "too long"),
    ("self_loop", "too long"),
    ("outside_ram", "outside guest RAM"),
    ("below_ram", "outside guest RAM"),
    ("wraps_64bit", "not a valid address range|outside"),
    ("next_out_of_range", "out of range"),
    ("head_out_of_range", "out of range"),
    ("avail_too_far", "ahead"),
    ("read_after_write", "readable buffer after"),
    ("nested_indirect", "nested"),
    ("indirect_with_next", "NEXT"),
    ("indirect_zero_length", "length"),
    ("indirect_odd_length", "length"),
    ("indirect_too_big", "length"),
    ("indirect_outside_ram", "outside"),
    ("indirect_loop", "too long"),
    ("straddles_ram_end", "outside"),
])
def test_hostile_chains(memory, case, message):
    q = make_queue(memory, indirect=True)
    table = RAM + 0x5000
    heads = [0]
    if case == "loop":
        desc(memory, 0, RAM, 4, NEXT, 1)
        desc(memory, 1, RAM, 4, NEXT, 0)
    elif case == "self_loop":
        desc(memory, 0, RAM, 4, NEXT, 0)
    elif case == "outside_ram":
        desc(memory, 0, RAM + RAM_SIZE, 16)
    elif case == "below_ram":
        desc(memory, 0, 0x1000, 16)
    elif case == "wraps_64bit":
        desc(memory, 0, (1 << 64) - 8, 16)
    elif case == "next_out_of_range":
        desc(memory, 0, RAM, 4, NEXT, QSIZE)
    elif case == "head_out_of_range":
        heads = [QSIZE + 3]
    elif case == "avail_too_far":
        memory.write_int(AVAIL + 2, 2, QSIZE + 1)
        with pytest.raises(VirtqueueError, match=message):
            q.pop()
        return
    elif case == "read_after_write":
        desc(memory, 0, RAM, 4, NEXT | WRITE, 1)
        desc(memory, 1, RAM, 4)
    elif case == "nested_indirect":
        desc(memory, 0, table, 16, INDIRECT, table=table)
        desc(memory, 0, table, 16, INDIRECT)
    elif case == "indirect_with_next":
        desc(memory, 0, table, 16, INDIRECT | NEXT, 1)
    elif case == "indirect_zero_length":
        desc(memory, 0, table, 0, INDIRECT)
    elif case == "indirect_odd_length":
        desc(memory, 0, table, 24, INDIRECT)
    elif case == "indirect_too_big":
        desc(memory, 0, table, 16 * (MAX_INDIRECT + 1), INDIRECT)
    elif case == "indirect_outside_ram":
        desc(memory, 0, RAM + RAM_SIZE - 16, 32, INDIRECT)
    elif case == "indirect_loop":
        desc(memory, 0, RAM, 4, NEXT, 1, table=table)
        desc(memory, 1, RAM, 4, NEXT, 0, table=table)
        desc(memory, 0, table, 32, INDIRECT)
    elif case == "straddles_ram_end":
        desc(memory, 0, RAM + RAM_SIZE - 8, 16)
    offer(memory, heads)
    with pytest.raises(VirtqueueError, match=message):
        q.pop()


def test_zero_length_buffers_are_harmless(memory):
    q = make_queue(memory)
    desc(memory, 0, 0xDEAD_0000_0000, 0, NEXT, 1)  # never touched: zero bytes
    desc(memory, 1, RAM, 0, WRITE)
    offer(memory, [0])
    chain = q.pop()
    assert chain is not None and chain.readable_length == 0 and chain.writable_length == 0


def test_overlong_chain_of_distinct_descriptors(memory):
    q = make_queue(memory)
    for i in range(QSIZE):
        desc(memory, i, RAM, 1, NEXT, (i + 1) % QSIZE)
    offer(memory, [0])
    with pytest.raises(VirtqueueError, match="too long"):
        q.pop()


def test_ring_layout_checks(memory):
    q = Virtqueue(memory, 256)
    for state in (VirtqueueState(size=3, desc=DESC, avail=AVAIL, used=USED),
                  VirtqueueState(size=512, desc=DESC, avail=AVAIL, used=USED),
                  VirtqueueState(size=8, desc=DESC + 8, avail=AVAIL, used=USED),
                  VirtqueueState(size=8, desc=0, avail=AVAIL, used=USED),
                  VirtqueueState(size=256, desc=RAM + RAM_SIZE - 16, avail=AVAIL, used=USED)):
        q.state = state
        with pytest.raises(VirtqueueError):
            q.check_rings()


def test_event_idx(memory):
    q = make_queue(memory, event_idx=True)
    desc(memory, 0, RAM, 1, WRITE)
    memory.write_int(AVAIL + 4 + 2 * QSIZE, 2, 0)        # used_event: interrupt after entry 0
    offer(memory, [0, 0])
    for _ in range(2):
        q.push(q.pop().head, 1)                          # type: ignore[union-attr]
    assert memory.read_int(USED + 4 + 8 * QSIZE, 2) == 2  # avail_event published
    assert q.should_notify()                              # first time: always
    memory.write_int(AVAIL + 4 + 2 * QSIZE, 2, 5)        # driver wants one after entry 5
    offer(memory, [0], start=2)
    q.push(q.pop().head, 1)                              # type: ignore[union-attr]
    assert not q.should_notify()
    assert need_event(5, 6, 5) and not need_event(5, 5, 4) and need_event(0xFFFF, 0, 0xFFFF)


def test_no_interrupt_flag_without_event_idx(memory):
    q = make_queue(memory)
    memory.write_int(AVAIL, 2, 1)
    assert not q.should_notify()
    memory.write_int(AVAIL, 2, 0)
    assert q.should_notify()


descriptor = st.tuples(
    st.one_of(st.integers(0, (1 << 64) - 1), st.integers(RAM - 64, RAM + RAM_SIZE + 64)),
    st.one_of(st.integers(0, (1 << 32) - 1), st.integers(0, 4096)),
    st.integers(0, 7),
    st.integers(0, 40),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(descriptor, min_size=QSIZE, max_size=QSIZE),
       indirect_table=st.lists(descriptor, min_size=0, max_size=8),
       heads=st.lists(st.integers(0, 12), min_size=1, max_size=4),
       avail_idx=st.integers(0, 0xFFFF), indirect=st.booleans())
def test_fuzzed_rings_never_escape(memory, table, indirect_table, heads, avail_idx, indirect):
    q = make_queue(memory, indirect=indirect)
    itable = RAM + 0x6000
    for i, (addr, length, flags, nxt) in enumerate(table):
        if i == 1 and indirect_table:
            addr, length = itable, 16 * len(indirect_table)
        desc(memory, i, addr, length, flags, nxt)
    for i, (addr, length, flags, nxt) in enumerate(indirect_table):
        desc(memory, i, addr, length, flags, nxt, table=itable)
    offer(memory, heads)
    if avail_idx % 3 == 0:
        memory.write_int(AVAIL + 2, 2, avail_idx)
    for _ in range(len(heads) + 1):
        try:
            chain = q.pop()
        except VirtqueueError:
            return
        if chain is None:
            return
        for seg in chain.readable + chain.writable:
            assert seg.length == 0 or memory.contains(seg.addr, seg.length)
        assert len(chain.readable) + len(chain.writable) <= QSIZE + MAX_INDIRECT


# -- through the transport: hostile rings put the device in NEEDS_RESET ----------------------

@pytest.fixture
def device(memory, tmp_path: Path):
    image = tmp_path / "img"
    image.write_bytes(bytes(1 << 16))
    block = BlockBackend(image)
    dev = VirtioPciDevice(memory, VirtioBlk(memory, block, "x"))
    yield dev
    block.close()


def start(dev: VirtioPciDevice, features: int = 1 << 32) -> None:
    w = dev.bar_write
    w(4, 0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    for sel in (0, 1):
        w(4, 0x08, 4, sel)
        w(4, 0x0C, 4, (features >> (32 * sel)) & 0xFFFFFFFF)
    w(4, 0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    w(4, 0x18, 2, QSIZE)
    for off, addr in ((0x20, DESC), (0x28, AVAIL), (0x30, USED)):
        w(4, off, 8, addr)
    w(4, 0x1C, 2, 1)
    w(4, 0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK)


def test_enabling_a_queue_outside_ram_needs_reset(device):
    w = device.bar_write
    w(4, 0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER)
    w(4, 0x08, 4, 1)
    w(4, 0x0C, 4, 1)
    w(4, 0x14, 1, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
    w(4, 0x20, 8, 0x7000_0000)
    w(4, 0x1C, 2, 1)
    assert device.bar_read(4, 0x14, 1) & STATUS_NEEDS_RESET
    assert device.bar_read(4, 0x1C, 2) == 0


@pytest.mark.parametrize("case", ["loop", "outside", "no_status", "short_header"])
def test_hostile_request_sets_needs_reset_then_reset_recovers(device, memory, case):
    start(device)
    if case == "loop":
        desc(memory, 0, RAM + 0x8000, 16, NEXT, 1)
        desc(memory, 1, RAM + 0x9000, 16, NEXT, 0)
    elif case == "outside":
        desc(memory, 0, RAM + 0x8000, 16, NEXT, 1)
        desc(memory, 1, 0xFFFF_FFFF_0000, 512, NEXT | WRITE, 2)
        desc(memory, 2, RAM + 0xA000, 1, WRITE)
    elif case == "no_status":
        desc(memory, 0, RAM + 0x8000, 16)
    elif case == "short_header":
        desc(memory, 0, RAM + 0x8000, 8, NEXT, 1)
        desc(memory, 1, RAM + 0xA000, 1, WRITE)
    offer(memory, [0])
    before = bytes(memory.regions[0].view)
    device.bar_write(4, 0x3000, 2, 0)
    assert device.bar_read(4, 0x14, 1) & STATUS_NEEDS_RESET
    assert device.error
    assert bytes(memory.regions[0].view) == before        # nothing was written anywhere
    device.bar_write(4, 0x3000, 2, 0)                     # further kicks are ignored
    device.bar_write(4, 0x14, 1, 0)                       # reset recovers
    assert device.bar_read(4, 0x14, 1) == 0 and device.error is None
    start(device)
    memory.write(RAM + 0x8000, (8).to_bytes(4, "little") + bytes(12))  # GET_ID
    desc(memory, 0, RAM + 0x8000, 16, NEXT, 1)
    desc(memory, 1, RAM + 0x9000, 20, NEXT | WRITE, 2)
    desc(memory, 2, RAM + 0xA000, 1, WRITE)
    offer(memory, [0])
    device.bar_write(4, 0x3000, 2, 0)
    assert memory.read(RAM + 0xA000, 1) == b"\0" and memory.read(RAM + 0x9000, 1) == b"x"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(table=st.lists(descriptor, min_size=QSIZE, max_size=QSIZE),
       header=st.binary(min_size=16, max_size=16), heads=st.lists(st.integers(0, 9), min_size=1, max_size=3))
def test_fuzzed_requests_never_escape_the_device(device, memory, table, header, heads):
    device.bar_write(4, 0x14, 1, 0)
    start(device, features=1 << 32 | 1 << 28)
    for i, (addr, length, flags, nxt) in enumerate(table):
        desc(memory, i, addr, length, flags, nxt)
    memory.write(RAM + 0x8000, header)
    offer(memory, heads)
    device.bar_write(4, 0x3000, 2, 0)      # must not raise, whatever the ring holds
    status = device.bar_read(4, 0x14, 1)
    assert bool(status & STATUS_NEEDS_RESET) == (device.error is not None)
