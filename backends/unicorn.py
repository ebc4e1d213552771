"""The Unicorn backend (unicorn==2.1.4): x86_64 and aarch64 guests on any host.

Guest RAM is mapped with ``mem_map_ptr`` over :class:`hv.memory.GuestMemory`'s own host
buffers (one copy of RAM), MMIO windows with ``mmio_map``; kicks, the interrupt window and
dirty logging are native hooks (see :mod:`hv_backends.unicorn_common`, which also holds
the vCPU base class).

Exceptions and interrupts are delivered by hv itself (Unicorn does not use the guest's
IDT / VBAR): see :mod:`hv_backends.unicorn_x86` and :mod:`hv_backends.unicorn_arm64`.
"""
from __future__ import annotations

import logging

from hv import cpuid
from hv.memory import PAGE_SIZE, GuestMemory
from hv_backends.base import Arch, Backend, BackendError, Vcpu, Vm
from hv_backends.unicorn_common import (
    UNICORN_VERSION,
    NativeVm,
    UnicornLayoutError,
    UnicornVcpuBase,
    _import_unicorn,
    _native,
)

log = logging.getLogger(__name__)

__all__ = ["UnicornBackend", "UnicornVm", "UnicornVcpuBase", "UnicornLayoutError"]


class UnicornVm(Vm):
    """Guest RAM mapped into one Unicorn engine per vCPU (all over the same buffers)."""

    def __init__(self, arch: Arch, memory: GuestMemory, mmio_windows: list[tuple[int, int]]) -> None:
        self.arch = arch
        self.memory = memory
        windows: list[tuple[int, int]] = []
        for gpa, size in mmio_windows:
            if size <= 0 or gpa % PAGE_SIZE or size % PAGE_SIZE or gpa < 0 or gpa + size > 1 << 52:
                raise BackendError(f"MMIO window {gpa:#x}+{size:#x} is not page aligned or out of range")
            if any(r.gpa < gpa + size and gpa < r.end for r in memory.regions):
                raise BackendError(f"MMIO window {gpa:#x}+{size:#x} overlaps RAM")
            windows.append((gpa, size))
        self.mmio_windows = windows
        self.native = NativeVm(memory)
        self.vcpus: list[UnicornVcpuBase] = []
        # x86: the rate of every vCPU's virtual TSC (any rate: hv_native_x86.c scales the
        # guest clock), by default the one a KVM guest gets on this host (default_tsc_hz);
        # aarch64: None, no TSC. Read through the interface's tsc_hz.
        self._tsc_hz: int | None = default_tsc_hz() if arch is Arch.X86_64 else None

    def create_vcpu(self, index: int) -> Vcpu:
        if any(v.index == index for v in self.vcpus):
            raise BackendError(f"vCPU {index} already exists")
        if self.arch is Arch.X86_64:
            from hv_backends.unicorn_x86 import UnicornX86Vcpu  # noqa: PLC0415

            vcpu: UnicornVcpuBase = UnicornX86Vcpu(self, index)
        else:
            from hv_backends.unicorn_arm64 import UnicornArm64Vcpu  # noqa: PLC0415

            vcpu = UnicornArm64Vcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    @property
    def tsc_hz(self) -> int | None:
        """x86: the rate of every vCPU's virtual TSC, the one CPUID 0x15/0x16 declare;
        None on aarch64."""
        return self._tsc_hz

    def set_tsc_hz(self, tsc_hz: int) -> None:
        """Any rate hv can declare: each vCPU's TSC continues from its current value at
        ``tsc_hz`` (the per-vCPU offsets are rebased at one clock reading), and CPUID
        0x15/0x16 declare it."""
        if self.arch is not Arch.X86_64:
            raise BackendError("an aarch64 VM has no TSC")
        problem = cpuid.tsc_hz_problem(tsc_hz)
        if problem is not None:
            raise BackendError(f"guest TSC rate: {problem}")
        from hv_backends.unicorn_x86 import UnicornX86Vcpu  # noqa: PLC0415

        for vcpu in self.vcpus:
            assert isinstance(vcpu, UnicornX86Vcpu)   # an x86 VM's
            vcpu.set_tsc_rate(tsc_hz)
        self._tsc_hz = tsc_hz

    def start_dirty_log(self) -> None:
        self.native.take()
        self.native.struct.dirty_enabled = 1
        for vcpu in self.vcpus:
            vcpu.request_hook_sync(wait=True)

    def take_dirty(self) -> bytearray:
        return self.native.take()

    def stop_dirty_log(self) -> None:
        self.native.struct.dirty_enabled = 0
        for vcpu in self.vcpus:
            vcpu.request_hook_sync(wait=False)

    @property
    def conservative_marks(self) -> int:
        """How often a write could not be translated and every page was marked dirty."""
        return int(self.native.struct.conservative_marks)

    def invalidate_code(self, gpa: int, size: int) -> None:
        """Drop translated code of ``gpa..gpa+size`` in every vCPU (after the VMM wrote it)."""
        for vcpu in self.vcpus:
            vcpu.invalidate_code(gpa, size)

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []


def default_tsc_hz() -> int:
    """The guest TSC rate of a new x86 Unicorn VM: what a KVM guest gets on this host
    (:func:`hv_backends.kvm_tsc.kvm_guest_tsc_hz`: the host's rate on KVM without TSC
    scaling, hv's 1 GHz with it), or hv's 1 GHz where KVM is not usable. A guest can then
    move between the two backends of one host in both directions: a KVM destination
    without TSC scaling can only run the host's rate (see docs/migration-stream.md)."""
    from hv_backends.kvm_tsc import kvm_guest_tsc_hz  # noqa: PLC0415 - KVM's ioctls only here

    return kvm_guest_tsc_hz() or cpuid.TSC_HZ


class UnicornBackend(Backend):
    """Unicorn 2.1.4 CPU emulation of x86_64 and aarch64 guests."""

    name = "unicorn"

    @classmethod
    def probe(cls, arch: Arch) -> str | None:
        try:
            unicorn = _import_unicorn()
        except ImportError as exc:
            return f"the unicorn Python package is not installed ({exc})"
        if unicorn.__version__ != UNICORN_VERSION:
            return f"unicorn {unicorn.__version__} is installed; hv needs exactly {UNICORN_VERSION}"
        try:
            _native()
        except ImportError as exc:
            return f"the native hook module hv_backends._hv_native is not built (run `pip install -e .`): {exc}"
        try:
            if arch is Arch.X86_64:
                from hv_backends.unicorn_x86 import verify_layout  # noqa: PLC0415
            else:
                from hv_backends.unicorn_arm64 import verify_layout  # noqa: PLC0415
            verify_layout()
        except UnicornLayoutError as exc:
            return str(exc)
        return None

    def open_vm(self, arch: Arch, memory: GuestMemory, mmio_windows: list[tuple[int, int]]) -> Vm:
        problem = self.probe(arch)
        if problem is not None:
            raise BackendError(problem)
        return UnicornVm(arch, memory, mmio_windows)
