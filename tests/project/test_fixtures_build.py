"""The committed fixture guests: reproducible from source, free of instructions kvm_pvm
cannot emulate at CPL0, and printing what the machine contract (docs/machine.md) says
when run under QEMU (the reference machine; those tests skip when QEMU is missing)."""
from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.helpers import FIXTURES, dirty_reference, require_tool, requires_kvm, skip_unless_tool, tool_marks

MASK = (1 << 64) - 1
TOOLCHAINS = {
    "x86_64": ("gcc", "ld", "objcopy"),
    "aarch64": ("aarch64-linux-gnu-gcc", "aarch64-linux-gnu-ld", "aarch64-linux-gnu-objcopy"),
}
QEMU = {"x86_64": "qemu-system-x86_64", "aarch64": "qemu-system-aarch64"}


ALL_PROGRAMS = ("hello", "dirty", "blk", "net", "timer", "smp")   # everything build.sh makes


def with_qemu(*arches: str) -> list[pytest.ParameterSet]:
    """``arches`` as parameters, each skipped (with the install command) without its QEMU."""
    return [pytest.param(arch, marks=tool_marks(QEMU[arch]), id=arch) for arch in arches]


@pytest.mark.parametrize("arch", [pytest.param(arch, marks=tool_marks(*tools), id=arch)
                                  for arch, tools in TOOLCHAINS.items()])
def test_build_is_reproducible(arch: str, tmp_path: Path) -> None:
    env = dict(os.environ, ARCHES=arch)
    subprocess.run([str(FIXTURES / "build.sh"), str(tmp_path)], check=True, env=env,
                   capture_output=True, timeout=120)
    for prog in ALL_PROGRAMS:
        built = (tmp_path / arch / f"{prog}.elf").read_bytes()
        committed = (FIXTURES / arch / f"{prog}.elf").read_bytes()
        assert built == committed, f"{arch}/{prog}.elf differs from a fresh build: run fixtures/build.sh"


FORBIDDEN_MNEMONICS = {"popcnt", "cmpxchg16b", "xrstor", "xrstors", "xsave", "xsaveopt", "clac",
                       "stac", "fwait", "wait", "syscall", "sysretq", "sysenter", "int"}


@pytest.mark.parametrize("prog", ALL_PROGRAMS)
@require_tool("objdump")
def test_x86_guest_avoids_instructions_kvm_pvm_lacks(prog: str) -> None:
    listing = subprocess.run(["objdump", "-d", "-M", "x86-64", str(FIXTURES / "x86_64" / f"{prog}.elf")],
                             check=True, capture_output=True, text=True).stdout
    seen: set[str] = set()
    for line in listing.splitlines():
        parts = line.split("\t")
        if len(parts) < 3 or not parts[2].strip():
            continue
        insn = parts[2].strip()
        mnemonic = insn.split()[0]
        seen.add(mnemonic)
        assert mnemonic not in FORBIDDEN_MNEMONICS, f"{prog}: {insn}"
        assert not re.search(r"%(x|y|z)mm|%st\b|%st\(|%mm\d", insn), f"{prog}: SSE/x87/MMX: {insn}"
    assert {"iretq", "lidt", "ltr", "wrmsr"} <= seen  # the listing really is this guest


def run_qemu(arch: str, prog: str, append: str, *, kvm: bool = False, memory: str = "128M",
             timeout: float = 60) -> str:
    binary = QEMU[arch]
    skip_unless_tool(binary)                       # the callers carry tool_marks(binary) too
    machine = ["-M", "q35"] if arch == "x86_64" else ["-M", "virt", "-cpu", "cortex-a57"]
    cmd = [binary, *machine, "-m", memory, "-display", "none", "-serial", "stdio", "-monitor", "none",
           "-nodefaults", "-no-reboot", "-kernel", str(FIXTURES / arch / f"{prog}.elf"),
           "-append", append]
    if kvm:
        cmd += ["-accel", "kvm"]
    result = subprocess.run(cmd, capture_output=True, timeout=timeout)
    assert result.returncode == 0, result.stderr.decode(errors="replace")
    return result.stdout.decode()


@pytest.mark.parametrize("arch", with_qemu("x86_64", "aarch64"))
def test_hello_under_qemu(arch: str) -> None:
    out = run_qemu(arch, "hello", "a b  c=1")
    assert out == f"hello from hv guest ({arch})\ncmdline: a b  c=1\n"


@pytest.mark.parametrize("arch", with_qemu("x86_64", "aarch64"))
def test_hello_empty_cmdline_under_qemu(arch: str) -> None:
    assert run_qemu(arch, "hello", "") == f"hello from hv guest ({arch})\ncmdline: \n"


@pytest.mark.parametrize("arch", with_qemu("x86_64", "aarch64"))
def test_dirty_matches_python_reference_under_qemu(arch: str) -> None:
    out = run_qemu(arch, "dirty", "x iterations=3 mib=1")
    assert tuple(out.splitlines()) == dirty_reference(1, 3)
    assert out.endswith("done\n")


@pytest.mark.parametrize("arch", with_qemu("x86_64", "aarch64"))
def test_dirty_rejects_buffer_larger_than_ram(arch: str) -> None:
    # The buffer starts 16 MiB into RAM: 64 MiB of RAM leaves 48 MiB for it.
    # (QEMU's x86 firmware reserves the top 128 KiB, so there it reports 47 MiB.)
    out = run_qemu(arch, "dirty", "mib=49 iterations=1", memory="64M")
    first, error = out.splitlines()
    assert first == "dirty: mib=49 iterations=1"
    match = re.fullmatch(r"dirty: error: mib=49 does not fit, (\d+) MiB of RAM available for the buffer",
                         error)
    assert match and int(match.group(1)) in (47, 48), error


@require_tool(*QEMU.values())
def test_dirty_same_output_on_both_arches() -> None:
    outs = {arch: run_qemu(arch, "dirty", "mib=8 iterations=2") for arch in QEMU}
    assert outs["x86_64"] == outs["aarch64"]
    assert outs["x86_64"].count("bad 0") == 2


@requires_kvm
@require_tool("qemu-system-x86_64")
def test_dirty_under_qemu_kvm() -> None:
    """The real constraint: the CPL0 kernel must survive kvm_pvm's emulator."""
    out = run_qemu("x86_64", "dirty", "mib=1 iterations=3", kvm=True, timeout=120)
    assert tuple(out.splitlines()) == dirty_reference(1, 3)


@pytest.mark.parametrize("arch, pattern", [
    pytest.param("x86_64", r"exception 6 at 00000000001[0-9a-f]{5}",   # #UD from CPL3, reported by CPL0
                 marks=tool_marks(QEMU["x86_64"]), id="x86_64"),
    pytest.param("aarch64", r"exception 4 at 0000000040[2-3][0-9a-f]{5} esr 0000000002000000",  # EL1 sync, EC=0
                 marks=tool_marks(QEMU["aarch64"]), id="aarch64"),
])
def test_dirty_reports_unexpected_exception(arch: str, pattern: str) -> None:
    first, report = run_qemu(arch, "dirty", "fault=1 iterations=1").splitlines()
    assert first == "dirty: mib=4 iterations=1"
    assert re.fullmatch(pattern, report), report
