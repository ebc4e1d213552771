"""Kicks stop the Unicorn backend only at block boundaries; dirty tracking is physical."""
from __future__ import annotations

import random
import threading
import time

from hv_backends.base import ExitReason
from tests.backends.unicorn_x86_guest import KCODE, MMIO_BASE, SCRAMBLED_PHYS, SCRAMBLED_VIRT, X86Guest

COUNTER = 0x8000


class CountingIo:
    """Records MMIO writes; anything else is a test failure."""

    def __init__(self) -> None:
        self.values: list[int] = []

    def mmio_write(self, addr: int, size: int, value: int) -> None:
        assert (addr, size) == (MMIO_BASE, 4)
        self.values.append(value)

    def mmio_read(self, addr: int, size: int) -> int:
        raise AssertionError(f"unexpected MMIO read {addr:#x}")

    def pio_read(self, port: int, size: int) -> int:
        raise AssertionError("unexpected port read")

    def pio_write(self, port: int, size: int, value: int) -> None:
        raise AssertionError("unexpected port write")


LOST_KICK_S = 30.0   # a kick not acted on within this long counts as lost


def test_kick_before_run_returns_without_executing() -> None:
    g = X86Guest()
    try:
        g.load(KCODE, "mov rax, 1\nhlt")
        g.vcpu.set_state(g.kernel_state())
        g.vcpu.kick()
        assert g.run().reason is ExitReason.KICKED
        assert g.vcpu.get_state().rax == 0
        assert g.run().reason is ExitReason.HALT
    finally:
        g.close()


def test_kick_from_another_thread_stops_busy_loop() -> None:
    """A kick 50 ms into a run stops a guest that never exits by itself. Not a speed check:
    a second kick at 30 s only turns a lost first kick into a failure instead of a hang."""
    g = X86Guest()
    try:
        g.load(KCODE, "spin: jmp spin")
        g.vcpu.set_state(g.kernel_state())
        timers = [threading.Timer(0.05, g.vcpu.kick), threading.Timer(LOST_KICK_S, g.vcpu.kick)]
        start = time.monotonic()
        for timer in timers:
            timer.start()
        exit_ = g.run()
        elapsed = time.monotonic() - start
        for timer in timers:
            timer.cancel()
            timer.join()
        assert exit_.reason is ExitReason.KICKED
        assert elapsed >= 0.04                          # it ran until the kick, not less
        assert elapsed < LOST_KICK_S, "the first kick was lost: only the second one stopped the guest"
        assert g.vcpu.get_state().rip == KCODE
    finally:
        g.close()


def test_1000_kick_cycles_never_replay_or_split() -> None:
    g = X86Guest()
    try:
        g.load(KCODE, f"""
        top:
            inc qword ptr [{COUNTER:#x}]
            mov rax, qword ptr [{COUNTER:#x}]
            mov dword ptr [{MMIO_BASE:#x}], eax
            jmp top
        """)
        g.vcpu.set_state(g.kernel_state())
        io = CountingIo()
        rng = random.Random(1234)
        running = threading.Event()
        done = threading.Event()

        def kicker() -> None:
            while not done.is_set():
                if running.wait(0.1):
                    time.sleep(rng.random() * 0.0005)
                    g.vcpu.kick()
                    running.clear()

        thread = threading.Thread(target=kicker, daemon=True)
        thread.start()
        for _ in range(1000):
            running.set()
            assert g.run(io).reason is ExitReason.KICKED
            state = g.vcpu.get_state()
            counter = g.memory.read_int(COUNTER, 8)
            # stops land at the loop head: every inc has had exactly its one MMIO write
            assert state.rip == KCODE
            assert len(io.values) == counter
            g.vcpu.set_state(state)
        done.set()
        thread.join()
        assert io.values == list(range(1, len(io.values) + 1))
        assert len(io.values) > 1000
    finally:
        g.close()


def test_dirty_log_is_physical_and_exact() -> None:
    g = X86Guest()
    try:
        chosen = [0, 3, 7, 15]
        stores = "\n".join(f"mov qword ptr [{SCRAMBLED_VIRT + i * 0x1000 + 8 * i:#x}], rax" for i in chosen)
        g.load(KCODE, f"""
            mov rax, 0x1122334455667788
            {stores}
            mov qword ptr [{SCRAMBLED_VIRT + 0x5000 - 4:#x}], rax
            mov qword ptr [0x8000], rax
            mov dword ptr [{MMIO_BASE:#x}], eax
            hlt
            mov qword ptr [{SCRAMBLED_VIRT + 0x9000:#x}], rax
            hlt
        """)
        g.vcpu.set_state(g.kernel_state())
        g.vm.start_dirty_log()
        g.memory.take_vmm_dirty()

        class Sink(CountingIo):
            def mmio_write(self, addr: int, size: int, value: int) -> None:
                pass

        assert g.run(Sink()).reason is ExitReason.HALT
        bitmap = g.vm.take_dirty()
        pages = {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1}
        expected = {SCRAMBLED_PHYS[i] >> 12 for i in chosen}
        expected |= {SCRAMBLED_PHYS[4] >> 12, SCRAMBLED_PHYS[5] >> 12}  # the store across a page boundary
        expected.add(0x8000 >> 12)
        assert pages == expected
        for i in chosen:
            assert g.memory.read_int(SCRAMBLED_PHYS[i] + 8 * i, 8) == 0x1122334455667788
        assert not any(g.vm.take_dirty())
        assert g.run(Sink()).reason is ExitReason.HALT
        bitmap = g.vm.take_dirty()
        assert {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1} == {SCRAMBLED_PHYS[9] >> 12}
        g.vm.stop_dirty_log()
        assert g.vm.conservative_marks == 0
    finally:
        g.close()


def test_start_dirty_log_while_running_records_later_writes() -> None:
    g = X86Guest()
    try:
        target = SCRAMBLED_VIRT + 6 * 0x1000
        g.load(KCODE, f"""
        top:
            inc qword ptr [{target:#x}]
            jmp top
        """)
        g.vcpu.set_state(g.kernel_state())
        exits = []
        runner = threading.Thread(target=lambda: exits.append(g.run()))
        runner.start()
        time.sleep(0.05)
        g.vm.start_dirty_log()           # turns the log on in the running vCPU (TLB or write hook)
        assert (g.vcpu._write_hook is not None or g.vcpu._tlb_logging) and runner.is_alive()
        before = g.memory.read_int(SCRAMBLED_PHYS[6], 8)
        deadline = time.monotonic() + 30  # until the guest ran (a loaded host may delay it)
        while g.memory.read_int(SCRAMBLED_PHYS[6], 8) == before and time.monotonic() < deadline:
            time.sleep(0.01)
        bitmap = g.vm.take_dirty()
        assert g.memory.read_int(SCRAMBLED_PHYS[6], 8) > before
        assert {i for i in range(len(bitmap) * 8) if bitmap[i >> 3] >> (i & 7) & 1} == {SCRAMBLED_PHYS[6] >> 12}
        g.vm.stop_dirty_log()
        time.sleep(0.02)
        assert g.vcpu._write_hook is None and not g.vcpu._tlb_logging and runner.is_alive()
        g.vcpu.kick()
        runner.join(5)
        assert exits and exits[0].reason is ExitReason.KICKED
    finally:
        g.close()


def test_invalidate_code_while_running_takes_effect() -> None:
    g = X86Guest()
    try:
        # the loop's immediate is patched by the VMM while the guest runs
        g.load(KCODE, """
        top:
            mov eax, 1
            cmp eax, 2
            jne top
            hlt
        """)
        g.vcpu.set_state(g.kernel_state())
        exits = []
        runner = threading.Thread(target=lambda: exits.append(g.run()))
        runner.start()
        time.sleep(0.05)
        g.memory.write_int(KCODE + 1, 4, 2)  # mov eax, 2
        g.vm.invalidate_code(KCODE, 16)
        runner.join(5)
        if runner.is_alive():
            g.vcpu.kick()
            runner.join()
        assert exits and exits[0].reason is ExitReason.HALT
    finally:
        g.close()
