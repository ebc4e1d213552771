"""The cffi declaration of the KVM ABI against the kernel's own numbers and headers.

Two independent checks: every ioctl number computed from the cdef's struct sizes equals
the kernel's well-known numeric value (which encodes the struct size), and — where gcc and
the kernel headers are installed — every struct size and every field offset the backend
uses equals what the real headers give.
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from hv_backends import kvm_abi as abi

# The kernel's numeric ioctl values on x86_64 (from linux/kvm.h as compiled for x86_64).
KERNEL_IOCTLS: dict[str, int] = {
    "KVM_GET_API_VERSION": 0xAE00,
    "KVM_CREATE_VM": 0xAE01,
    "KVM_CHECK_EXTENSION": 0xAE03,
    "KVM_GET_VCPU_MMAP_SIZE": 0xAE04,
    "KVM_GET_SUPPORTED_CPUID": 0xC008AE05,
    "KVM_CREATE_VCPU": 0xAE41,
    "KVM_GET_DIRTY_LOG": 0x4010AE42,
    "KVM_SET_USER_MEMORY_REGION": 0x4020AE46,
    "KVM_SET_TSS_ADDR": 0xAE47,
    "KVM_SET_IDENTITY_MAP_ADDR": 0x4008AE48,
    "KVM_RUN": 0xAE80,
    "KVM_GET_REGS": 0x8090AE81,
    "KVM_SET_REGS": 0x4090AE82,
    "KVM_GET_SREGS": 0x8138AE83,
    "KVM_SET_SREGS": 0x4138AE84,
    "KVM_INTERRUPT": 0x4004AE86,
    "KVM_GET_MSRS": 0xC008AE88,
    "KVM_SET_MSRS": 0x4008AE89,
    "KVM_GET_FPU": 0x81A0AE8C,
    "KVM_SET_FPU": 0x41A0AE8D,
    "KVM_SET_CPUID2": 0x4008AE90,
    "KVM_GET_CPUID2": 0xC008AE91,
    "KVM_GET_MP_STATE": 0x8004AE98,
    "KVM_SET_MP_STATE": 0x4004AE99,
    "KVM_GET_VCPU_EVENTS": 0x8040AE9F,
    "KVM_SET_VCPU_EVENTS": 0x4040AEA0,
    "KVM_ENABLE_CAP": 0x4068AEA3,
    "KVM_GET_XSAVE": 0x9000AEA4,
    "KVM_SET_XSAVE": 0x5000AEA5,
    "KVM_CLEAR_DIRTY_LOG": 0xC018AEC0,
}
# sizeof as the kernel documents it (kvm_run: 256-byte exit union, 2048-byte sync regs).
KERNEL_SIZES: dict[str, int] = {
    "kvm_userspace_memory_region": 32, "kvm_regs": 144, "kvm_segment": 24, "kvm_dtable": 16,
    "kvm_sregs": 312, "kvm_fpu": 416, "kvm_msr_entry": 16, "kvm_msrs": 8, "kvm_cpuid_entry2": 40,
    "kvm_cpuid2": 8, "kvm_vcpu_events": 64, "kvm_xsave": 4096, "kvm_mp_state": 4,
    "kvm_dirty_log": 16, "kvm_clear_dirty_log": 24, "kvm_enable_cap": 104, "kvm_interrupt": 4,
    "kvm_run": 2352,
}


@pytest.mark.parametrize("name", sorted(KERNEL_IOCTLS))
def test_ioctl_number_matches_kernel(name: str) -> None:
    assert getattr(abi, name) == KERNEL_IOCTLS[name], f"{name}: {getattr(abi, name):#x} != {KERNEL_IOCTLS[name]:#x}"


@pytest.mark.parametrize("struct", sorted(KERNEL_SIZES))
def test_struct_size(struct: str) -> None:
    assert abi.ffi.sizeof(f"struct {struct}") == KERNEL_SIZES[struct]


def test_ioctl_size_field_is_struct_size() -> None:
    """The size bits of each _IOR/_IOW number are the cdef's struct size."""
    pairs = {"KVM_GET_REGS": "kvm_regs", "KVM_GET_SREGS": "kvm_sregs", "KVM_GET_FPU": "kvm_fpu",
             "KVM_GET_VCPU_EVENTS": "kvm_vcpu_events", "KVM_GET_XSAVE": "kvm_xsave",
             "KVM_SET_USER_MEMORY_REGION": "kvm_userspace_memory_region",
             "KVM_GET_DIRTY_LOG": "kvm_dirty_log", "KVM_CLEAR_DIRTY_LOG": "kvm_clear_dirty_log",
             "KVM_ENABLE_CAP": "kvm_enable_cap", "KVM_INTERRUPT": "kvm_interrupt",
             "KVM_GET_MP_STATE": "kvm_mp_state", "KVM_GET_MSRS": "kvm_msrs", "KVM_SET_CPUID2": "kvm_cpuid2"}
    for ioctl_name, struct in pairs.items():
        size = (KERNEL_IOCTLS[ioctl_name] >> 16) & 0x3FFF
        assert size == abi.ffi.sizeof(f"struct {struct}"), ioctl_name


def test_kvm_run_exit_union_offsets() -> None:
    """Offsets fixed by the kernel ABI (independent of any compiler)."""
    assert abi.offsetof("kvm_run", "exit_reason") == 8
    assert abi.offsetof("kvm_run", "io.direction") == 32
    assert abi.offsetof("kvm_run", "io.data_offset") == 40
    assert abi.offsetof("kvm_run", "mmio.len") == 48
    assert abi.offsetof("kvm_run", "kvm_valid_regs") == 288
    assert abi.offsetof("kvm_run", "s") == 304


def test_offsetof_rejects_unknown_field() -> None:
    with pytest.raises(KeyError):
        abi.offsetof("kvm_regs", "nonexistent")


def test_ioc_rejects_oversized_argument() -> None:
    with pytest.raises(ValueError):
        abi._ioc(abi._IOC_READ, 1, 1 << 14)


HEADER = Path("/usr/include/linux/kvm.h")
needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None or not HEADER.exists(),
                               reason="gcc or /usr/include/linux/kvm.h not installed (apt-get install gcc linux-libc-dev)")


@needs_gcc
def test_layout_matches_real_headers(tmp_path: Path) -> None:
    """Compile sizeof/offsetof of the real headers and compare every used field."""
    checks: list[tuple[str, str]] = []  # (label, C expression)
    for struct, fields in abi.USED_FIELDS.items():
        checks.append((f"sizeof {struct}", f"sizeof(struct {struct})"))
        for field in fields:
            checks.append((f"{struct}.{field}", f"offsetof(struct {struct}, {field})"))
    for path in abi.KVM_RUN_UNION_FIELDS:
        checks.append((f"kvm_run.{path}", f"offsetof(struct kvm_run, {path})"))
    for name in KERNEL_IOCTLS:
        checks.append((name, f"(unsigned long){name}"))
    body = "\n".join(f'    printf("%s %lu\\n", "{label}", (unsigned long)({expr}));' for label, expr in checks)
    source = tmp_path / "layout.c"
    source.write_text(f"#include <stdio.h>\n#include <stddef.h>\n#include <linux/kvm.h>\nint main(void) {{\n{body}\n    return 0;\n}}\n")
    binary = tmp_path / "layout"
    subprocess.run(["gcc", "-o", str(binary), str(source)], check=True, capture_output=True, timeout=60)
    output = subprocess.run([str(binary)], check=True, capture_output=True, text=True, timeout=10).stdout
    real = {label: int(value) for label, value in (line.rsplit(" ", 1) for line in output.splitlines())}
    assert len(real) == len(checks)
    mismatches = []
    for label, _expr in checks:
        if label.startswith("sizeof "):
            ours = abi.ffi.sizeof(f"struct {label.split()[1]}")
        elif label in KERNEL_IOCTLS:
            ours = getattr(abi, label)
        else:
            struct, _, path = label.partition(".")
            ours = abi.offsetof(struct, path)
        if ours != real[label]:
            mismatches.append(f"{label}: ours {ours}, kernel {real[label]}")
    assert not mismatches, "\n".join(mismatches)
