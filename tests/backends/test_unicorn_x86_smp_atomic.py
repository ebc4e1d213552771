"""LOCK-prefixed x86 instructions are atomic between hv's Unicorn vCPUs.

hv runs one Unicorn engine per vCPU, each in its own thread, all mapping the same host RAM
(``mem_map_ptr``). Unicorn 2.1.4 translates ``lock cmpxchg`` / ``lock xadd`` for a
single-CPU context: a plain load, compare and store. Two vCPUs can then both take a
spinlock, lose increments, or -- what hung SMP Linux on q35 at CPU 1 bring-up, in
``check_tsc_warp``'s lock ping-pong -- lose an unlock: vCPU B's failed cmpxchg loads the
held lock (1), vCPU A stores 0 to release it, B stores back the 1 it loaded, and the lock
is held by nobody for ever. hv's patched libunicorn (backends/native/unicorn) generates
x86 code for a parallel context, as QEMU's multi-threaded TCG does, so these are host
atomics.

Each test runs real engines on real shared memory; the spinning ones are bounded by
Unicorn's own emulation timeout, so a lost unlock fails the test instead of hanging it.
"""
from __future__ import annotations

import ctypes
import mmap
import struct
import threading

import pytest

import hv_backends  # noqa: F401 - selects the libunicorn before unicorn is imported
from hv_backends.unicorn_common import library_is_patched

pytestmark = pytest.mark.skipif(not library_is_patched(),
                                reason="needs hv's patched libunicorn (pip install -e . builds it; "
                                       "see backends/native/unicorn/README.md)")

RAM = 0x10000
CODE = 0x1000
COUNTER, LOCK, GUARDED = 0x8000, 0x8008, 0x8010
TIMEOUT_US = 20_000_000     # an engine spinning on a lost lock gives up after 20 s


def _rel8(source_end: int, target: int) -> int:
    return (target - source_end) & 0xFF


def worker_code() -> bytes:
    """rcx times: ``lock xadd [COUNTER], 1``; take the spinlock at LOCK with ``lock
    cmpxchg``; ``inc qword [GUARDED]`` (a plain read-modify-write the lock protects);
    release with a plain store, as Linux's queued_spin_unlock. Then hlt."""
    code = bytearray()
    loop = len(code)
    code += bytes.fromhex("b801000000")                     # mov eax, 1
    code += bytes.fromhex("f00fc10425") + struct.pack("<I", COUNTER)   # lock xadd [COUNTER], eax
    spin = len(code)
    code += bytes.fromhex("31c0")                           # xor eax, eax
    code += bytes.fromhex("ba01000000")                     # mov edx, 1
    code += bytes.fromhex("f00fb11425") + struct.pack("<I", LOCK)      # lock cmpxchg [LOCK], edx
    code += bytes([0x75, _rel8(len(code) + 2, spin)])       # jnz spin
    code += bytes.fromhex("48ff0425") + struct.pack("<I", GUARDED)     # inc qword [GUARDED]
    code += bytes.fromhex("c70425") + struct.pack("<II", LOCK, 0)      # mov dword [LOCK], 0
    code += bytes.fromhex("48ffc9")                         # dec rcx
    code += bytes([0x75, _rel8(len(code) + 2, loop)])       # jnz loop
    code += b"\xf4"                                         # hlt
    return bytes(code)


class SharedRam:
    """One host buffer every engine maps at guest-physical 0, as hv maps guest RAM."""

    def __init__(self) -> None:
        self.buf = mmap.mmap(-1, RAM)
        self.addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))

    def engine(self):  # type: ignore[no-untyped-def]
        import unicorn

        uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_64)
        uc.mem_map_ptr(0, RAM, unicorn.UC_PROT_ALL, self.addr)
        return uc

    def qwords(self, *offsets: int) -> tuple[int, ...]:
        return tuple(struct.unpack_from("<Q", self.buf, off)[0] for off in offsets)


def run_vcpus(ram: SharedRam, iterations: int, count: int = 2) -> list[int]:
    """``count`` engines run worker_code concurrently; each one's RCX when it stopped
    (0: it finished every iteration; more: it gave up spinning)."""
    from unicorn import x86_const as x86

    code = worker_code()
    ram.buf[CODE:CODE + len(code)] = code
    left = [-1] * count
    engines = [ram.engine() for _ in range(count)]
    start = threading.Barrier(count)

    def vcpu(i: int) -> None:
        uc = engines[i]
        uc.reg_write(x86.UC_X86_REG_RCX, iterations)
        start.wait()
        uc.emu_start(CODE, CODE + len(code) - 1, timeout=TIMEOUT_US)
        left[i] = uc.reg_read(x86.UC_X86_REG_RCX)

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return left


@pytest.mark.parametrize("round_", range(3))
def test_two_vcpus_lock_xadd_and_a_cmpxchg_spinlock_lose_nothing(round_: int) -> None:
    """Every ``lock xadd`` increment counts, the spinlock excludes (the counter it guards
    is exact), and no unlock is lost (both vCPUs finish; the lock ends free). On the
    single-CPU translation each of these failed within a few runs of a million
    iterations."""
    ram = SharedRam()
    iterations = 1_000_000
    left = run_vcpus(ram, iterations)
    counter, lock, guarded = ram.qwords(COUNTER, LOCK, GUARDED)
    assert left == [0, 0], f"a vCPU spun on a lock nobody held (iterations left {left}, lock word {lock})"
    assert (counter, guarded, lock) == (2 * iterations, 2 * iterations, 0)


def test_an_atomic_the_host_cannot_do_in_place_runs_once_and_correctly() -> None:
    """A misaligned ``lock xadd`` (QEMU's "stop the world" case) is run serially by the
    engine instead of raising the same exit for ever: the value is right and the engine
    reaches hlt."""
    from unicorn import x86_const as x86

    ram = SharedRam()
    struct.pack_into("<I", ram.buf, 0x8001, 41)
    code = bytes.fromhex("b801000000" "f00fc10425") + struct.pack("<I", 0x8001) + b"\xf4"
    ram.buf[CODE:CODE + len(code)] = code
    uc = ram.engine()
    uc.emu_start(CODE, CODE + len(code) - 1, timeout=TIMEOUT_US)
    assert uc.reg_read(x86.UC_X86_REG_RIP) == CODE + len(code) - 1
    assert uc.reg_read(x86.UC_X86_REG_EAX) == 41
    assert struct.unpack_from("<I", ram.buf, 0x8001)[0] == 42


def test_a_write_hook_sees_the_page_an_atomic_writes() -> None:
    """hv's dirty logging is a memory-write hook: a page written only by LOCK-prefixed
    instructions must be reported, or a live migration would not resend it."""
    import unicorn

    ram = SharedRam()
    code = (bytes.fromhex("b801000000" "f00fc10425") + struct.pack("<I", 0x9000)       # lock xadd [0x9000]
            + bytes.fromhex("31c0" "ba07000000" "f00fb11425") + struct.pack("<I", 0xA008)  # lock cmpxchg [0xA008]
            + b"\xf4")
    ram.buf[CODE:CODE + len(code)] = code
    uc = ram.engine()
    seen: list[tuple[int, int]] = []
    uc.hook_add(unicorn.UC_HOOK_MEM_WRITE, lambda _uc, _access, address, size, _value, _data:
                seen.append((address, size)))
    uc.emu_start(CODE, CODE + len(code) - 1, timeout=TIMEOUT_US)
    assert ram.qwords(0x9000, 0xA008) == (1, 7)
    assert {address >> 12 for address, _ in seen} == {0x9, 0xA}
