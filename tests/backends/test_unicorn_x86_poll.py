"""x86_64 vCPUs on hv's libunicorn look at kicks and the interrupt window where the engine
enters its execution loop (``hv_uc_set_poll``), not at every block start (a block hook:
a helper call and a hook-list walk per block, a fifth of a store loop's time).

What that needs, checked here on real guest code: the check is not made per block (the
counter of checks stays small over a loop of many chained blocks); a kick from another
thread still stops a guest that never leaves its chain of blocks (``hv_uc_poke``); every
instruction that can set IF (sti, popf, iretq) ends its block without chaining, so an
armed window still opens right after it; a kick that comes between two runs is kept.
"""
from __future__ import annotations

import threading
import time

import pytest

from hv_backends.base import ExitReason
from hv_backends.unicorn_common import library_is_patched, uclib
from tests.backends.unicorn_x86_guest import KCODE, KSTACK_TOP, X86Guest

LOOPS = 200_000
COUNTER = 0x8000      # the lowest word of the kernel stack page (this guest uses no stack)


@pytest.fixture
def guest():
    g = X86Guest()
    yield g
    g.close()


def polls(guest: X86Guest) -> bool:
    return library_is_patched() and hasattr(uclib(), "hv_uc_set_poll")


def test_the_check_is_not_made_at_every_block(guest: X86Guest) -> None:
    """200000 iterations of a two-block loop, then hlt: the native check ran a handful of
    times (emulation start, the port write), not once per block as a block hook does."""
    if not polls(guest):
        pytest.skip("the loaded libunicorn has no hv_uc_set_poll (wheel's library: block hook)")
    guest.load(KCODE, f"""
        mov ecx, {LOOPS}
    1:  dec ecx
        jz 2f
        jmp 1b
    2:  out 0x80, al
        hlt
    """)
    guest.vcpu.set_state(guest.kernel_state())
    assert guest.run().reason is ExitReason.HALT
    assert guest.io.events == [("pio_write", 0x80, 1, 0)]
    assert guest.vcpu.get_state().rcx == 0
    assert guest.vcpu.blocks_executed < 100, guest.vcpu.blocks_executed


def kick_once_counting(guest: X86Guest, past: int) -> threading.Thread:
    """A thread that kicks the vCPU once the guest's counter (at COUNTER) passed ``past``."""
    def watch() -> None:
        for _ in range(20_000):                      # bounded: 20 s at most
            if int.from_bytes(guest.memory.read(COUNTER, 8), "little") > past:
                break
            time.sleep(0.001)
        guest.vcpu.kick()
    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_kick_stops_a_chained_loop_and_the_guest_continues(guest: X86Guest) -> None:
    """An endless chained loop (never back in the execution loop on its own) is stopped
    by kicks from another thread, twice, and goes on where it was each time."""
    guest.load(KCODE, f"1: inc qword ptr [{COUNTER:#x}]\n jmp 1b")
    guest.vcpu.set_state(guest.kernel_state())
    counts = [0]
    for _ in range(2):
        watcher = kick_once_counting(guest, counts[-1])
        assert guest.run().reason is ExitReason.KICKED
        watcher.join(30)
        counts.append(int.from_bytes(guest.memory.read(COUNTER, 8), "little"))
    assert counts[0] < counts[1] < counts[2]


def test_kick_between_runs_ends_the_next_run_at_once(guest: X86Guest) -> None:
    guest.load(KCODE, "1: inc rbx\n jmp 1b")
    guest.vcpu.set_state(guest.kernel_state())
    guest.vcpu.kick()
    assert guest.run().reason is ExitReason.KICKED
    assert guest.vcpu.get_state().rbx == 0


@pytest.mark.parametrize("unmask", ["popfq", "iretq"])
def test_window_opens_right_after_popf_and_iretq(guest: X86Guest, unmask: str) -> None:
    """IF=0 in a chained loop with the window armed: no stop while masked; popfq (IF from
    the stack) and iretq (RFLAGS from its frame) set IF and the run ends right after
    them, before the next instruction (which would count in rdx)."""
    frame = {
        "popfq": "push 0x202\n popfq",
        "iretq": "mov rax, rsp\n push 0x10\n push rax\n push 0x202\n push 0x08\n lea rax, [rip + 3f]\n"
                 " push rax\n iretq\n 3:",
    }[unmask]
    guest.load(KCODE, f"""
        cli
        mov ecx, 5000
    1:  dec ecx
        jnz 1b
        {frame}
        inc rdx
    2:  jmp 2b
    """)
    state = guest.kernel_state()
    state.rsp = KSTACK_TOP - 0x100
    guest.vcpu.set_state(state)
    guest.vcpu.request_interrupt_window()
    assert guest.run().reason is ExitReason.IRQ_WINDOW
    st = guest.vcpu.get_state()
    assert st.rflags & (1 << 9) and st.rcx == 0 and st.rdx == 0
    code = guest.memory.read(KCODE, 128)
    assert st.rip == KCODE + code.index(b"\x48\xff\xc2")   # inc rdx, not yet executed
    assert guest.vcpu.window_exits == 1
