"""The raw loopback figure hv bench compares a migration stream with is a plain copy from
RAM-sized memory into pre-faulted RAM-sized memory (not a reused, cache-hot 1 MiB buffer)."""
from __future__ import annotations

import pytest

from hv.bench import migrate, stream
from hv.migration.pages import never_populated

MIB = 1 << 20


@pytest.mark.parametrize("transport", ["unix", "tcp"])
def test_raw_loop_copies_every_byte_into_prefaulted_ram_sized_memory(transport: str) -> None:
    rate = stream.raw_loopback_rate(transport, 4)
    assert rate > 0
    buffers = stream._raw_buffers[4 * MIB]
    source, target = buffers.source.regions[0].view, buffers.target.regions[0].view
    assert len(target) == 4 * MIB
    # every slice of the receiver's memory holds what the sender sent from the same offset
    assert bytes(target) == bytes(source)
    assert source[:MIB] != bytes(MIB)
    populated = never_populated(target)
    if populated is not None:  # /proc/self/pagemap readable: the memory was faulted in
        assert populated.count(1) == 0


def test_hv_bench_migrate_uses_the_fair_raw_loop() -> None:
    stream._raw_buffers.pop(3 * MIB, None)
    assert migrate.loopback_rate("unix", 3) > 0
    buffers = stream._raw_buffers[3 * MIB]
    assert bytes(buffers.target.regions[0].view) == bytes(buffers.source.regions[0].view)
