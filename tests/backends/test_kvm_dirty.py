"""KVM dirty log with manual protection: no guest write is lost between the read of the
log (KVM_GET_DIRTY_LOG) and its clear (KVM_CLEAR_DIRTY_LOG), with the guest writing the
whole time, and the run splitting that decides what is cleared."""
from __future__ import annotations

import time

import pytest

from hv.config import parse_args
from hv.console import BufferSink
from hv.machine import Machine
from hv.migration.engine import merge_bitmaps
from hv_backends import backend_class
from hv_backends.kvm_dirty import dirty_word_runs
from tests.helpers import FIXTURES, copy_dirty_pages, requires_kvm, stale_pages

ROUNDS = 40


def test_dirty_word_runs_split_on_zero_words_and_limit() -> None:
    assert dirty_word_runs([0, 0], 4) == []
    assert dirty_word_runs([1, 2, 0, 0, 3], 4) == [(0, 2), (4, 1)]
    assert dirty_word_runs([1] * 9, 4) == [(0, 4), (4, 4), (8, 1)]
    assert dirty_word_runs([0, 1, 1, 1, 1, 0], 4) == [(1, 4)]
    raw = (5).to_bytes(8, "little") + bytes(8) + (1 << 63).to_bytes(8, "little")
    assert dirty_word_runs(raw, 64) == [(0, 1), (2, 1)]


def _copy_armed(vm: object, bitmap: bytes, source: memoryview, target: bytearray, chunk: int) -> int:
    """The engine's deferred order: for each run of ``chunk`` pages holding reported
    pages, arm (write-protect) the run, then copy its reported pages."""
    copied = 0
    pages = len(bitmap) * 8
    for first in range(0, pages, chunk):
        part = bytearray(len(bitmap))
        for page in range(first, min(first + chunk, pages)):
            if bitmap[page // 8] >> (page % 8) & 1:
                part[page // 8] |= 1 << (page % 8)
        if any(part):
            vm.arm_dirty(first, chunk)  # type: ignore[attr-defined]
            copied += copy_dirty_pages(bytes(part), source, target)
    return copied


@requires_kvm
@pytest.mark.parametrize("deferred", [False, True], ids=["eager", "deferred"])
def test_pages_written_during_takes_reach_the_copy(deferred: bool) -> None:
    """Pre-copy by hand, as the engine does: full copy, then rounds of take + copy of what
    was reported, while the dirty guest rewrites its 8 MiB buffer nonstop; after the pause
    and a last round the copy must equal guest RAM byte for byte. A write that landed
    between a round's GET and its CLEAR and was not reported again would leave a stale
    page in the copy. Deferred: nothing is protected when logging starts (initially all
    set), the full copy and every round arm each 100-page run (not 64-aligned, so the
    CLEAR windows overlap pages of other runs) right before copying it."""
    config = parse_args(["-machine", "q35", "-m", "64", "-kernel", str(FIXTURES / "x86_64" / "dirty.elf"),
                         "-append", "mib=8"]).config
    console = BufferSink()
    machine = Machine(config, backend_class("kvm")(), console)
    try:
        machine.load_kernel(config.kernel.read_bytes())
        machine.start()
        assert console.wait_for(b"pass 1 ", 60), console.getvalue()[-300:]
        vm, memory = machine.vm, machine.memory
        assert len(memory.regions) == 1
        ram = memory.regions[0].view
        take = vm.take_dirty_deferred if deferred else vm.take_dirty  # type: ignore[attr-defined]
        copy = bytearray(len(ram))
        if deferred:
            vm.start_dirty_log_deferred()  # type: ignore[attr-defined]
            memory.take_vmm_dirty()
            _copy_armed(vm, b"\xff" * (memory.page_count // 8), ram, copy, 100)
        else:
            vm.start_dirty_log()
            memory.take_vmm_dirty()
            copy[:] = ram
        lines_before = console.getvalue().count(b"\n")
        copied = 0
        for _ in range(ROUNDS):
            time.sleep(0.01)
            bitmap = merge_bitmaps(take(), memory.take_vmm_dirty())
            copied += _copy_armed(vm, bitmap, ram, copy, 100) if deferred else copy_dirty_pages(bitmap, ram, copy)
        assert machine.pause()
        copy_dirty_pages(merge_bitmaps(take(), memory.take_vmm_dirty()), ram, copy)
        vm.stop_dirty_log()
        assert copied > 0, "the guest wrote nothing while the log was taken"
        stale = stale_pages(copy, ram)
        assert stale == [], f"{len(stale)} pages lost, first {stale[:5]}"
        assert console.getvalue().count(b"\n") >= lines_before
    finally:
        machine.close()


@requires_kvm
def test_manual_protection_is_used_where_the_kernel_has_it() -> None:
    """On kernels with KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 (this host has it, see
    BACKEND-NOTES) the VM uses it; the test above then exercises GET + CLEAR."""
    from hv.memory import GuestMemory, RegionSpec
    from hv_backends import kvm_abi as abi
    from hv_backends.base import Arch
    from hv_backends.kvm import KvmBackend, _check_extension
    memory = GuestMemory([RegionSpec(0, 1 << 20)])
    vm = KvmBackend().open_vm(Arch.X86_64, memory, [])
    try:
        flags = _check_extension(vm._kvm_fd, abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2)
        if not flags & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
            pytest.skip("this kernel has no KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2")
        assert vm._dirty_log.manual
    finally:
        vm.close()
        memory.close()


def test_another_round_only_while_it_pays() -> None:
    """The engine's switch-over rule once the expected pause is within the limit: one more
    live round after the full pass or after a round that halved the dirty set, unless the
    pause would already be at most an eighth of the limit (the deferred KVM log lets the
    guest dirty more during the full pass, and this round keeps the pause short)."""
    from hv.migration.engine import MigrationParameters, worth_another_round
    params = MigrationParameters(downtime_limit=300)
    assert worth_another_round(200, 10_000, None, params)          # right after the full pass
    assert worth_another_round(200, 10_000, 20_000, params)        # halved: keep going
    assert not worth_another_round(200, 10_001, 20_000, params)    # not shrinking fast enough
    assert not worth_another_round(37, 10_000, None, params)       # pause already short
    assert worth_another_round(38, 10_000, None, params)
