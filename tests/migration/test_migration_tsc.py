"""A guest's TSC rate survives a migration between backends (stream format 1.4).

A guest calibrates its TSC once, at boot (Linux from CPUID 0x15), so the rate must travel
with it: the x86 CONFIG section carries ``tsc_hz``; a Unicorn destination runs its virtual
TSC at that rate, a KVM destination sets it with TSC control or, without (kvm_pvm), runs
the guest only when the host's rate is that rate and otherwise refuses before the guest
runs, at both ends (the source keeps running, ``query-migrate`` says why).

The guest (assembled here with binutils, a multiboot ELF in 32-bit protected mode, integer
code only so that kvm_pvm can emulate it) measures its own TSC against the guest clock: the
local APIC timer counts 1 GHz guest time (divide 1; CPUID 0x15's crystal). Every WINDOW_NS
of guest time it prints the TSC ticks and the APIC ticks of that window and what CPUID 0x15
declares. Rates are asserted to 10%, on the median of several windows: both counters are
guest time, so host load only adds the skew of one MMIO read per window end (a preempted
read can shift one window; the median ignores it), while the wrong rates the tests tell
apart differ by 25% or more (1.2346 GHz against 1 GHz or this host's rate).
"""
from __future__ import annotations

import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from hv import cpuid
from hv.machine import Machine, RunState
from hv.migration.stream import Fingerprint, SectionType, StreamError
from tests.helpers import machine_in_process, migrate_in_process, migration_status_for, requires_kvm
from tests.migration.conftest import assert_destination_gave_up, incoming

WINDOW_NS = 300_000_000          # guest ns per measurement
ODD_HZ = 1_234_567_000           # a rate neither backend picks by default
MIB = 1 << 20

GUEST = f"""
    .intel_syntax noprefix
    .code32
    .text
    .globl _start
    .balign 4
    .long 0x1BADB002, 0x00000003, -(0x1BADB002 + 0x00000003)
_start:
    cli
    mov esp, offset stack_top
    mov dword ptr [0xFEE000F0], 0x1FF        /* SVR: APIC software-enabled */
    mov dword ptr [0xFEE003E0], 0xB          /* timer divide 1: 1 tick per guest ns */
    mov dword ptr [0xFEE00320], 0x10000      /* timer LVT masked, one-shot */
measure:
    mov dword ptr [0xFEE00380], 0xFFFFFFFF   /* (re)start the count-down */
    rdtsc
    mov esi, eax
    mov edi, edx
    mov ebx, dword ptr [0xFEE00390]
spin:
    mov eax, ebx
    sub eax, dword ptr [0xFEE00390]
    cmp eax, {WINDOW_NS}
    jb spin
    rdtsc
    mov ecx, dword ptr [0xFEE00390]
    sub eax, esi
    sbb edx, edi
    sub ebx, ecx
    push ebx
    push eax
    push edx
    mov esi, offset s_tsc
    call puts
    pop eax
    call hex32
    pop eax
    call hex32
    mov esi, offset s_clk
    call puts
    pop eax
    call hex32
    mov eax, 0x15
    xor ecx, ecx
    cpuid
    push eax
    push ebx
    mov esi, offset s_num
    call puts
    pop eax
    call hex32
    mov esi, offset s_den
    call puts
    pop eax
    call hex32
    mov al, 10
    call putc
    jmp measure
putc:
    push edx
    mov dx, 0x3F8
    out dx, al
    pop edx
    ret
puts:
    lodsb
    test al, al
    jz 1f
    call putc
    jmp puts
1:  ret
hex32:
    push ecx
    push ebx
    mov ecx, 8
2:  rol eax, 4
    mov ebx, eax
    and ebx, 0xF
    push eax
    mov al, byte ptr [hexdigits + ebx]
    call putc
    pop eax
    dec ecx
    jnz 2b
    pop ebx
    pop ecx
    ret
    .data
hexdigits: .ascii "0123456789abcdef"
s_tsc: .asciz "tsc "
s_clk: .asciz " clk "
s_num: .asciz " num "
s_den: .asciz " den "
    .balign 16
stack: .fill 4096, 1, 0
stack_top:
"""

LINK = """OUTPUT_FORMAT("elf64-x86-64")
ENTRY(_start)
PHDRS { image PT_LOAD FLAGS(7); }
SECTIONS { . = 0x100000; .text : { *(.text) } :image .data : { *(.data) } :image }
"""


@pytest.fixture(scope="module")
def rate_guest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The measuring guest as a multiboot ELF (binutils' as and ld, as the backend tests use)."""
    d = tmp_path_factory.mktemp("tscguest")
    (d / "g.s").write_text(GUEST)
    (d / "link.ld").write_text(LINK)
    subprocess.run(["as", "--64", "-o", str(d / "g.o"), str(d / "g.s")], check=True, capture_output=True)
    subprocess.run(["ld", "-T", str(d / "link.ld"), "-o", str(d / "g.elf"), str(d / "g.o")], check=True,
                   capture_output=True)
    return d / "g.elf"


def build(accel: str, kernel: Path) -> tuple[Machine, Any]:
    return machine_in_process("q35", accel, kernel, "")


def windows(console: Any) -> list[tuple[float, int]]:
    """Each complete line's (measured TSC Hz, CPUID 0x15's Hz as Linux computes it)."""
    out = []
    for line in console.getvalue().decode(errors="replace").splitlines(keepends=True):
        if not line.endswith("\n"):
            break
        words = line.split()
        assert words[0::2] == ["tsc", "clk", "num", "den"], line
        ticks, clk, num, den = (int(w, 16) for w in words[1::2])
        out.append((ticks * 1e9 / clk, cpuid.leaf_tsc_khz(den, num, cpuid.CRYSTAL_HZ) * 1000))
    return out


def wait_windows(console: Any, count: int, timeout: float = 120.0) -> list[tuple[float, int]]:
    deadline = time.monotonic() + timeout
    while len(got := windows(console)) < count:
        assert time.monotonic() < deadline, console.getvalue()[-300:]
        time.sleep(0.01)
    return got


def assert_rate(measured: list[tuple[float, int]], hz: int) -> None:
    """Every window declares ``hz`` (to the kHz, as Linux reads it) and the median
    measured rate is within 10% of it."""
    as_linux_reads = cpuid.leaf_tsc_khz(*cpuid.tsc_leaf(hz)[:3]) * 1000   # hz itself for most rates
    assert {declared for _, declared in measured} == {as_linux_reads}, measured
    median = statistics.median(rate for rate, _ in measured)
    assert 0.9 * hz <= median <= 1.1 * hz, (median, hz, measured)


def run_and_move(source: Machine, src_console: Any, target: Machine, tgt_console: Any) -> None:
    """Start the source, let it measure two windows, migrate; the destination must run."""
    try:
        source.start()
        wait_windows(src_console, 2)
        status, errors = migrate_in_process(source, target)
        assert not errors, errors
        assert status.to_qmp()["status"] == "completed", status.to_qmp()
    finally:
        source.close()


def test_unicorn_to_unicorn_keeps_a_non_default_rate(rate_guest: Path) -> None:
    """A Unicorn guest running at ODD_HZ measures ODD_HZ, and still does on a destination
    whose own rate was another (1 GHz or this host's KVM rate)."""
    source, src_console = build("unicorn", rate_guest)
    source.vm.set_tsc_hz(ODD_HZ)
    target, tgt_console = build("unicorn", rate_guest)
    try:
        assert target.vm.tsc_hz != ODD_HZ
        run_and_move(source, src_console, target, tgt_console)
        assert target.vm.tsc_hz == ODD_HZ
        assert_rate(windows(src_console), ODD_HZ)
        # the first window on the destination began on the source: skip it
        assert_rate(wait_windows(tgt_console, 4)[1:], ODD_HZ)
    finally:
        target.close()


@requires_kvm
def test_kvm_to_unicorn_keeps_the_kvm_rate(rate_guest: Path) -> None:
    """The guest measured KVM's rate on the source (the host's on kvm_pvm, 1 GHz with TSC
    scaling) and measures it on a Unicorn destination that had been set to another rate."""
    source, src_console = build("kvm", rate_guest)
    target, tgt_console = build("unicorn", rate_guest)
    try:
        kvm_hz = source.vm.tsc_hz
        assert kvm_hz is not None
        target.vm.set_tsc_hz(ODD_HZ)
        run_and_move(source, src_console, target, tgt_console)
        assert_rate(windows(src_console), kvm_hz)
        assert target.vm.tsc_hz == kvm_hz
        assert_rate(wait_windows(tgt_console, 4)[1:], kvm_hz)
    finally:
        target.close()


@requires_kvm
def test_kvm_destination_refuses_a_rate_it_cannot_run(rate_guest: Path) -> None:
    """Unicorn at ODD_HZ to KVM: without TSC control (kvm_pvm here) KVM runs guests at the
    host's rate only, so the destination refuses at CONFIG: its error names both rates,
    the source's query-migrate is failed with that reason and its guest keeps running
    (and measuring ODD_HZ); the destination never ran. With TSC control KVM scales the
    guest's TSC to ODD_HZ instead, and the guest measures it there."""
    source, src_console = build("unicorn", rate_guest)
    source.vm.set_tsc_hz(ODD_HZ)
    target, tgt_console = build("kvm", rate_guest)
    host_hz = target.vm.tsc_hz
    assert host_hz is not None
    try:
        source.start()
        wait_windows(src_console, 2)
        status, errors = migrate_in_process(source, target)
        if not target.vm._tsc.scalable:   # type: ignore[attr-defined]  # kvm_state.GuestTsc
            qmp = status.to_qmp()
            assert qmp["status"] == "failed", qmp
            assert len(errors) == 1, errors
            reason = str(errors[0])
            assert "cannot run the guest's TSC at its rate" in reason, reason
            assert cpuid.mhz_text(ODD_HZ) in reason and cpuid.mhz_text(host_hz) in reason, reason
            assert "no KVM_CAP_TSC_CONTROL" in reason, reason
            assert "\n" not in reason and reason in qmp["error-desc"], qmp
            assert target.state is not RunState.RUNNING and tgt_console.getvalue() == b""
            assert target.vm.tsc_hz == host_hz                      # nothing changed
            assert source.state is RunState.RUNNING
            seen = len(windows(src_console))
            assert_rate(wait_windows(src_console, seen + 2), ODD_HZ)   # it runs on
        else:
            assert not errors, errors
            assert target.vm.tsc_hz == ODD_HZ
            assert_rate(wait_windows(tgt_console, 4)[1:], ODD_HZ)
    finally:
        source.close()
        target.close()


@requires_kvm
def test_unicorn_default_is_the_kvm_rate_so_unicorn_to_kvm_works(rate_guest: Path) -> None:
    """A Unicorn VM's default rate is what a KVM VM gets on this host, so a Unicorn guest
    moves to KVM here (kvm_pvm: no TSC scaling) and keeps measuring that rate."""
    source, src_console = build("unicorn", rate_guest)
    target, tgt_console = build("kvm", rate_guest)
    try:
        assert source.vm.tsc_hz == target.vm.tsc_hz
        run_and_move(source, src_console, target, tgt_console)
        hz = target.vm.tsc_hz
        assert hz is not None
        assert_rate(wait_windows(tgt_console, 4)[1:], hz)
    finally:
        target.close()


def test_snapshot_and_move_carry_the_rate(rate_guest: Path, tmp_path: Path) -> None:
    """The other two ways a guest changes VM: a file snapshot restored into a VM of
    another rate, and an in-process move (hv.machine.move) onto a fresh Unicorn VM; the
    guest measures ODD_HZ after both."""
    from hv.machine.move import move_machine
    from hv.migration.engine import save_snapshot
    from hv.migration.incoming import load_snapshot
    from hv_backends import backend_class

    source, src_console = build("unicorn", rate_guest)
    source.vm.set_tsc_hz(ODD_HZ)
    try:
        source.start()
        wait_windows(src_console, 1)
        save_snapshot(source, str(tmp_path), migration_status_for(source))
    finally:
        source.close()
    restored, console = build("unicorn", rate_guest)
    try:
        assert restored.vm.tsc_hz != ODD_HZ
        load_snapshot(restored, str(tmp_path), migration_status_for(restored))
        assert restored.vm.tsc_hz == ODD_HZ
        restored.start()
        wait_windows(console, 2)
        moved = move_machine(restored, backend_class("unicorn")())
    except BaseException:
        restored.close()
        raise
    try:
        assert moved.vm.tsc_hz == ODD_HZ
        seen = len(windows(console))
        assert_rate(wait_windows(console, seen + 3)[seen + 1:], ODD_HZ)
    finally:
        moved.close()


@requires_kvm
def test_a_move_to_kvm_that_cannot_run_the_rate_keeps_the_guest_where_it_was(rate_guest: Path) -> None:
    """hv.machine.move onto KVM without TSC control, of a guest at ODD_HZ: refused with
    the reason, the guest runs on in its old VM."""
    from hv.machine import MachineError
    from hv.machine.move import move_machine
    from hv_backends import backend_class
    from hv_backends.kvm_tsc import kvm_guest_tsc_hz

    if kvm_guest_tsc_hz() == cpuid.TSC_HZ:
        pytest.skip("this host's KVM can scale the guest TSC (KVM_CAP_TSC_CONTROL): it runs any rate")
    machine, console = build("unicorn", rate_guest)
    machine.vm.set_tsc_hz(ODD_HZ)
    try:
        machine.start()
        wait_windows(console, 1)
        with pytest.raises(MachineError, match="no KVM_CAP_TSC_CONTROL"):
            move_machine(machine, backend_class("kvm")())
        assert machine.state is RunState.RUNNING
        seen = len(windows(console))
        assert_rate(wait_windows(console, seen + 2), ODD_HZ)
    finally:
        machine.close()


# -- the CONFIG field, untrusted --------------------------------------------------------------
def _config(**extra: Any) -> dict[str, Any]:
    return {"arch": "x86_64", "machine": "q35", "vcpus": 1, "memory": 64 * MIB, "devices": [], **extra}


@pytest.mark.parametrize(("value", "fragment"), [
    ("2600000000", "expected an integer number of Hz, got str"),
    (None, "got NoneType"),
    (True, "got bool"),
    (2.6e9, "got float"),
    (0, "0 Hz is outside"),
    (-1_000_000, "-1000000 Hz is outside"),
    (999_000, "999000 Hz is outside"),
    (cpuid.TSC_HZ_MAX + 1000, "Hz is outside"),
    (10 ** 400, "a 1329-bit number of Hz is outside"),
    (2_600_000_001, "is not a whole number of kHz"),
])
def test_malformed_tsc_hz_is_refused_with_one_line(value: Any, fragment: str) -> None:
    with pytest.raises(StreamError) as caught:
        Fingerprint.from_dict(_config(tsc_hz=value))
    text = str(caught.value)
    assert text.startswith("config.tsc_hz: ") and fragment in text and "\n" not in text and len(text) < 200, text


def test_tsc_hz_is_optional_and_x86_only() -> None:
    """Absent (a stream older than 1.4): None, the destination keeps its rate; an aarch64
    CONFIG that names one is invalid."""
    assert Fingerprint.from_dict(_config()).tsc_hz is None
    assert "tsc_hz" not in Fingerprint.from_dict(_config()).to_dict()
    fp = Fingerprint.from_dict(_config(tsc_hz=2_596_140_000))
    assert fp.tsc_hz == 2_596_140_000 and Fingerprint.from_dict(fp.to_dict()) == fp
    with pytest.raises(StreamError, match="config.tsc_hz: a aarch64 guest has no TSC"):
        Fingerprint.from_dict(_config(arch="aarch64", machine="virt", tsc_hz=1_000_000_000))
    with pytest.raises(StreamError, match="fields"):
        Fingerprint.from_dict(_config(tsc_khz=1))


def test_stream_without_tsc_hz_is_taken_as_hv_s_former_1_ghz(rate_guest: Path) -> None:
    """An older source's CONFIG (no tsc_hz) is accepted; its guest ran at 1 GHz (every
    older hv's Unicorn rate), which a Unicorn destination then runs, whatever its own
    default. A 1.4 CONFIG's rate is adopted as it says."""
    from hv.migration.incoming import config_checker

    target, _console = build("unicorn", rate_guest)
    try:
        target.vm.set_tsc_hz(ODD_HZ)
        old = dict(target.fingerprint())
        del old["tsc_hz"]
        config_checker(target)(Fingerprint.from_dict(old))
        assert target.vm.tsc_hz == cpuid.TSC_HZ
        config_checker(target)(Fingerprint.from_dict({**old, "tsc_hz": 1_500_000_000}))
        assert target.vm.tsc_hz == 1_500_000_000
    finally:
        target.close()


@requires_kvm
def test_stream_without_tsc_hz_keeps_a_kvm_destination_that_cannot_scale(rate_guest: Path) -> None:
    """KVM without TSC control cannot run 1 GHz: an older stream is not refused (its
    source, an older hv on such a KVM, ran the host's rate) and the rate stays the host's."""
    from hv.migration.incoming import config_checker

    target, _console = build("kvm", rate_guest)
    try:
        own = target.vm.tsc_hz
        old = dict(target.fingerprint())
        del old["tsc_hz"]
        config_checker(target)(Fingerprint.from_dict(old))
        if target.vm._tsc.scalable:  # type: ignore[attr-defined]  # kvm_state.GuestTsc
            assert target.vm.tsc_hz == cpuid.TSC_HZ
        else:
            assert target.vm.tsc_hz == own
    finally:
        target.close()


def test_destination_refuses_malformed_tsc_hz_and_runs_nothing(vms, sock_dir, fake_source) -> None:
    """A real ``hv -incoming`` given a CONFIG whose tsc_hz is not a rate: one error line,
    the source told why, the guest never ran."""
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="unicorn", memory="64", mib=4)
    fake = fake_source(dst)
    config = fake.machine.fingerprint()
    config["tsc_hz"] = 2_600_000_001
    fake.writer.write_header("x86_64", "q35")
    fake.writer.write_section(SectionType.CONFIG, json.dumps(config).encode())
    reply = fake.reply()
    assert not reply.ok and "config.tsc_hz: 2600000001 Hz is not a whole number of kHz" in reply.text, reply
    assert_destination_gave_up(dst, "config.tsc_hz: 2600000001 Hz is not a whole number of kHz")


@requires_kvm
def test_kvm_destination_process_refuses_an_unrunnable_rate(vms, sock_dir, fake_source) -> None:
    """A real ``hv -incoming -accel kvm`` given a guest at ODD_HZ: without TSC control it
    refuses at CONFIG with the reason on its error line and to the source."""
    from hv_backends.kvm_tsc import kvm_guest_tsc_hz

    if kvm_guest_tsc_hz() == cpuid.TSC_HZ:
        pytest.skip("this host's KVM can scale the guest TSC (KVM_CAP_TSC_CONTROL): it runs any rate")
    dst = vms("dst", *incoming(sock_dir, "dst"), accel="kvm", memory="64", mib=4)
    fake = fake_source(dst)
    fake.machine.vm.set_tsc_hz(ODD_HZ)
    fake.prefix()
    reply = fake.reply()
    assert not reply.ok and "cannot run the guest's TSC at its rate" in reply.text, reply
    assert_destination_gave_up(dst, f"the guest's TSC runs at {cpuid.mhz_text(ODD_HZ)}")
