"""Destination RAM pre-faulting (hv.migration.pages.Prefaulter), zero runs that keep huge
pages whole, and the transparent-huge-page advice on guest RAM (hv.memory)."""
from __future__ import annotations

import os
import time

import pytest

from hv.memory import GuestMemory, RegionSpec
from hv.migration.pages import (
    PAGE_SIZE,
    PREFAULT_CHUNK,
    Prefaulter,
    mem_available,
    never_populated,
    prefault_memory,
    zero_pages,
)

MIB = 1 << 20


def _vm_flags(address: int) -> list[str]:
    """VmFlags of the mapping holding ``address`` in /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps", encoding="ascii") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


def _thp_enabled() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled", encoding="ascii") as f:
            return "[never]" not in f.read()
    except OSError:
        return False


def test_prefault_populates_every_page_and_keeps_contents() -> None:
    mem = GuestMemory([RegionSpec(0, 8 * MIB), RegionSpec(16 * MIB, 4 * MIB)])
    try:
        mem.write(0x1000, b"kernel")  # what a loader put there must survive
        mem.write(16 * MIB + 5 * PAGE_SIZE, b"\xff" * PAGE_SIZE)
        before = [never_populated(r.view) for r in mem.regions]
        assert before[0] is not None and before[0].count(1) > 0  # pagemap works, RAM is fresh
        prefaulter = prefault_memory(mem)
        assert prefaulter.wait(60)
        if prefaulter.outcome.startswith("unsupported"):  # Linux < 5.14: nothing to check
            return
        assert prefaulter.outcome == "done", prefaulter.outcome
        assert prefaulter.done_bytes == 12 * MIB
        for region in mem.regions:
            assert never_populated(region.view).count(1) == 0
        assert mem.read(0x1000, 6) == b"kernel"
        assert mem.read(16 * MIB + 5 * PAGE_SIZE, PAGE_SIZE) == b"\xff" * PAGE_SIZE
        assert mem.read(0x2000, PAGE_SIZE) == bytes(PAGE_SIZE)
    finally:
        mem.close()


def test_prefault_stops_between_chunks_and_after_close() -> None:
    size = 64 * PREFAULT_CHUNK  # 2 GiB of address space: far more than it can fault before stop()
    mem = GuestMemory([RegionSpec(0, size)])
    prefaulter = Prefaulter([(r.mmap, r.view) for r in mem.regions])
    prefaulter._stop.set()  # asked to stop before the first chunk
    prefaulter._run()
    assert prefaulter.outcome == "stopped" and prefaulter.done_bytes == 0
    mem.close()  # a closed region is never touched (its view is released)
    late = Prefaulter([(mem.regions[0].mmap, mem.regions[0].view)] if mem.regions else [])
    late._run()
    assert late.done_bytes == 0


def test_prefault_stop_returns_promptly() -> None:
    mem = GuestMemory([RegionSpec(0, 256 * MIB)])
    try:
        prefaulter = prefault_memory(mem)
        begin = time.monotonic()
        prefaulter.stop(30)
        assert not prefaulter._thread or not prefaulter._thread.is_alive()
        assert prefaulter.outcome in ("stopped", "done") or prefaulter.outcome.startswith(("unsupported", "skipped"))
        assert time.monotonic() - begin < 30
    finally:
        mem.close()


def test_prefault_skipped_when_ram_exceeds_available_memory() -> None:
    # As much MAP_NORESERVE RAM as the host has available: faulting it all in would risk
    # the OOM killer, so the pre-fault must decline (and touch nothing).
    available = mem_available()
    assert available is not None
    size = available // PAGE_SIZE * PAGE_SIZE
    mem = GuestMemory([RegionSpec(0, size)])
    try:
        prefaulter = prefault_memory(mem)
        assert prefaulter.outcome.startswith("skipped"), prefaulter.outcome
        assert prefaulter._thread is None
    finally:
        mem.close()


def test_zero_pages_zeroes_only_what_is_not_zero() -> None:
    mem = GuestMemory([RegionSpec(0, 4 * MIB)])
    try:
        view = mem.regions[0].view
        view[:] = os.urandom(MIB) * 4
        zero_pages(view[PAGE_SIZE * 3:PAGE_SIZE * 300])
        assert view[PAGE_SIZE * 3:PAGE_SIZE * 300] == bytes(PAGE_SIZE * 297)
        assert view[:PAGE_SIZE * 3] != bytes(PAGE_SIZE * 3)  # neighbours untouched
        assert view[PAGE_SIZE * 300:PAGE_SIZE * 301] != bytes(PAGE_SIZE)
        zero_pages(view[:PAGE_SIZE * 1024])  # a second time over a mixed range
        assert view[:PAGE_SIZE * 1024] == bytes(PAGE_SIZE * 1024)
    finally:
        mem.close()


def test_guest_ram_is_advised_for_huge_pages() -> None:
    if not _thp_enabled():
        pytest.skip("transparent huge pages are off on this host")
    mem = GuestMemory([RegionSpec(0, 16 * MIB)])
    try:
        assert "hg" in _vm_flags(mem.regions[0].host_addr)
    finally:
        mem.close()


def test_stream_into_prefaulted_ram_matches_the_source() -> None:
    """A whole stream over a real UNIX socket into RAM that is pre-faulted in the background
    and holds stale bytes (as a loader leaves them): every page ends equal to the source's,
    zero pages included, with the reader relying on the pre-fault instead of its own."""
    import socket
    import threading

    from hv.migration.pages import is_prefaulted
    from hv.migration.stream import Fingerprint, SocketChannel, StreamKind, StreamReader, StreamWriter
    from hv.migration.stream_channels import STREAM_SOCKET_BUFFER
    from hv.state import X86CpuState

    size = 24 * MIB
    src = GuestMemory([RegionSpec(0, size)])
    dst = GuestMemory([RegionSpec(0, size)])
    try:
        view = src.regions[0].view
        view[:] = os.urandom(MIB) * 24
        for page in range(0, src.page_count, 7):  # zero runs of every length 1..6 and more
            view[page * PAGE_SIZE:(page + page % 5 + 1) * PAGE_SIZE] = bytes((page % 5 + 1) * PAGE_SIZE)
        dst.regions[0].view[:] = b"\xa5" * size  # stale: every zero page must be rewritten
        prefaulter = prefault_memory(dst)
        fp = Fingerprint("x86_64", "q35", 1, size)
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        with a, b:
            sender = SocketChannel(a)
            assert a.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= min(STREAM_SOCKET_BUFFER, 212992)
            reader = StreamReader(SocketChannel(b), page_count=dst.page_count, ram=dst,
                                  kind=StreamKind.MIGRATION, local=fp)
            assert reader._populate_runs is not is_prefaulted(dst)
            failure: list[BaseException] = []

            def receive() -> None:
                try:
                    reader.read_all()
                except BaseException as exc:  # reported below
                    failure.append(exc)

            thread = threading.Thread(target=receive)
            thread.start()
            writer = StreamWriter(sender)
            writer.write_header("x86_64", "q35")
            writer.write_config(fp)
            writer.write_ram(0, view)
            writer.write_round_end(1)
            writer.write_cpu(0, X86CpuState())
            writer.write_end()
            thread.join(60)
        assert not failure, failure
        assert reader.ended
        prefaulter.stop(30)
        assert dst.regions[0].view == view
    finally:
        src.close()
        dst.close()
