"""KVM backend (x86_64 guests on x86_64 hosts) through /dev/kvm ioctls.

One VM file descriptor per :class:`KvmVm`, one vCPU file descriptor plus its mmap'd
``kvm_run`` per :class:`KvmVcpu`. Guest RAM is ``hv.memory.GuestMemory``'s own host
mappings, registered as KVM user memory slots (one copy of RAM). No in-kernel irqchip:
interrupt controllers and timers are hv devices (see DESIGN.md), so every access outside
RAM — the local APIC page included — is an MMIO exit handed to the machine's buses.

Kicking
    :meth:`KvmVcpu.kick` sets ``kvm_run.immediate_exit`` and sends :data:`KICK_SIGNAL`
    (SIGUSR1) to the thread inside :meth:`KvmVcpu.run`. The signal must have a handler, or
    its default action would kill the process: importing this module from the main thread
    installs a no-op handler when SIGUSR1 has none; otherwise call
    :func:`install_kick_handler` from the main thread before starting vCPU threads. Without
    a handler a kick only takes effect at the vCPU's next exit.

Architectural points
    At an IN (or MMIO read) exit the destination register is completed by the *next*
    KVM_RUN. :meth:`KvmVcpu.run` therefore never returns with an access pending: a kick
    that arrives after such an exit is honoured by a KVM_RUN with ``immediate_exit=1``,
    which completes the access and returns EINTR without running guest code. If a device
    handler raises, the access is completed the same way before the exception propagates.

Limitations (measured on kvm_pvm; hardware KVM does not have the first two)
    * TSC: KVM_SET_MSRS(IA32_TSC) is accepted but the guest keeps reading the host TSC,
      so ``state.tsc`` is not applied (:attr:`KvmVm.tsc_restorable` says which case).
      Without KVM_CAP_TSC_CONTROL it also ticks at the host's rate, which CPUID 0x15/0x16
      then declare instead of hv's 1 GHz (:attr:`KvmVm.tsc_khz`).
    * CPUID: the feature words of leaves 1, 7 and 0xD are replaced with the host's, so
      the CPUID filter (:mod:`hv_backends.kvm_state`) is advisory there.
    * An interrupt queued with :meth:`KvmVcpu.inject_interrupt` is delivered at the next
      guest entry; a state taken before that entry does not contain it (logged).
    * A software interrupt from CPL3 (int3, int n, into, int1): kvm_pvm may exit to
      userspace (a kick) with RIP already past the instruction and the exception still
      pending. KVM does not report pending software exceptions (KVM_GET_VCPU_EVENTS
      assumes RIP was not advanced, so re-execution would raise it again) and
      KVM_SET_REGS drops them, so a state taken there loses the interrupt (the dirty
      guest lost whole serial writes in moves). A kicked :meth:`KvmVcpu.run` that stops
      at CPL3 right after such an instruction therefore runs the guest a little longer
      (a delayed re-kick, at most ``SOFT_INT_SETTLE_ATTEMPTS`` times) so the exception is
      delivered before the state can be taken.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import platform
import signal
import threading
from dataclasses import dataclass
from typing import Any

from hv.memory import PAGE_SHIFT, GuestMemory, MemoryRegion
from hv.state import FXSAVE_SIZE, CpuState, X86CpuState
from hv_backends import kvm_abi as abi
from hv_backends.base import Arch, Backend, BackendError, BackendUnavailable, Exit, ExitReason, IoHandler, Vcpu, Vm
from hv_backends.kvm_dirty import KvmDirtyLog, LogSlot
from hv_backends.kvm_state import (
    CPUID_DROPPED_RANGE,
    CPUID_MASKS,
    CPUID_ZEROED,
    GuestTsc,
    apply_cpuid_policy,
    read_state,
    write_state,
)

log = logging.getLogger(__name__)

ffi = abi.ffi
libc = abi.libc

KICK_SIGNAL = signal.SIGUSR1
KVM_DEVICE = "/dev/kvm"
TSS_ADDR = 0xFFFBD000           # three pages KVM needs for real-mode emulation on VMX
IDENTITY_MAP_ADDR = 0xFFFBC000  # one page, just below the TSS

RFLAGS_IF = 1 << 9
SOFT_INT_SETTLE_ATTEMPTS = 8
SOFT_INT_SETTLE_DELAY = 0.0002   # seconds of guest run per settle attempt (times the attempt)
EFER_LMA = 1 << 10
CR0_PG = 1 << 31

_EINTR = 4
_PROT_READ = 1
_PROT_WRITE = 2
_MAP_SHARED = 1
_MAP_FAILED = ffi.cast("void *", -1)

# Capabilities without which the backend cannot work, with the name used in messages.
REQUIRED_CAPS: tuple[tuple[int, str], ...] = (
    (abi.KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"),
    (abi.KVM_CAP_SET_TSS_ADDR, "KVM_CAP_SET_TSS_ADDR"),
    (abi.KVM_CAP_EXT_CPUID, "KVM_CAP_EXT_CPUID"),
    (abi.KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT"),
    (abi.KVM_CAP_VCPU_EVENTS, "KVM_CAP_VCPU_EVENTS"),
    (abi.KVM_CAP_XSAVE, "KVM_CAP_XSAVE"),
)


INITIAL_CPUID_ENTRIES = 256  # KVM_GET_SUPPORTED_CPUID is retried with more on E2BIG


def install_kick_handler() -> bool:
    """Install a no-op handler for :data:`KICK_SIGNAL` unless one exists (main thread only).

    Returns True when a handler is in place afterwards.
    """
    current = signal.getsignal(KICK_SIGNAL)
    if current not in (signal.SIG_DFL, signal.SIG_IGN, None):
        return True
    if threading.current_thread() is not threading.main_thread():
        return False
    signal.signal(KICK_SIGNAL, _kick_signal_handler)
    return True


def _kick_signal_handler(signum: int, frame: Any) -> None:
    """Does nothing: the signal only exists to interrupt KVM_RUN with EINTR."""


def _kick_handler_installed() -> bool:
    return signal.getsignal(KICK_SIGNAL) not in (signal.SIG_DFL, signal.SIG_IGN, None)


install_kick_handler()


_errno_text = abi.errno_text
_ioctl = abi.ioctl_checked


def _check_extension(fd: int, cap: int) -> int:
    result = libc.ioctl(fd, abi.KVM_CHECK_EXTENSION, ffi.cast("unsigned long", cap))
    return max(result, 0)


def _host_arch() -> str:
    machine = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(machine, machine)


class KvmBackend(Backend):
    """Virtual machines on /dev/kvm."""

    name = "kvm"

    @classmethod
    def probe(cls, arch: Arch) -> str | None:
        arch = Arch(arch)
        host = _host_arch()
        if arch is Arch.AARCH64:
            if host != "aarch64":
                return "KVM for aarch64 needs an aarch64 host"
            return "hv's KVM backend implements x86_64 guests only"
        if host != "x86_64":
            return f"KVM for x86_64 needs an x86_64 host (this is {host})"
        try:
            fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            return f"{KVM_DEVICE}: {exc.strerror}"
        try:
            return cls._probe_fd(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _probe_fd(fd: int) -> str | None:
        version = libc.ioctl(fd, abi.KVM_GET_API_VERSION, ffi.cast("unsigned long", 0))
        if version != abi.KVM_API_VERSION:
            return f"{KVM_DEVICE}: KVM API version {version}, expected {abi.KVM_API_VERSION}"
        for cap, cap_name in REQUIRED_CAPS:
            if not _check_extension(fd, cap):
                return f"{KVM_DEVICE}: missing capability {cap_name}"
        return None

    def open_vm(self, arch: Arch, memory: GuestMemory, mmio_windows: list[tuple[int, int]]) -> KvmVm:
        problem = self.probe(arch)
        if problem is not None:
            raise BackendUnavailable(problem)
        return KvmVm(Arch(arch), memory)


@dataclass(frozen=True)
class _Slot:
    region: MemoryRegion
    first_page: int   # in RAM offset space
    pages: int


class KvmVm(Vm):
    """A KVM virtual machine over ``memory``. Not thread-safe except where noted."""

    def __init__(self, arch: Arch, memory: GuestMemory) -> None:
        self.arch = arch
        self.memory = memory
        self.vcpus: list[KvmVcpu] = []
        for region in memory.regions:
            if region.gpa < TSS_ADDR + 3 * 4096 and region.end > IDENTITY_MAP_ADDR:
                raise BackendError(f"RAM region {region.gpa:#x}+{region.size:#x} overlaps the pages KVM "
                                   f"reserves at {IDENTITY_MAP_ADDR:#x}..{TSS_ADDR + 3 * 4096:#x}")
        try:
            self._kvm_fd = os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC)
        except OSError as exc:
            raise BackendUnavailable(f"{KVM_DEVICE}: {exc.strerror}") from exc
        self._vm_fd = -1
        try:
            self._vm_fd = _ioctl(self._kvm_fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM")
            self.vcpu_mmap_size = _ioctl(self._kvm_fd, abi.KVM_GET_VCPU_MMAP_SIZE, 0, "KVM_GET_VCPU_MMAP_SIZE")
            max_slots = _check_extension(self._kvm_fd, abi.KVM_CAP_NR_MEMSLOTS) or 32
            if len(memory.regions) > max_slots:
                raise BackendError(f"{len(memory.regions)} RAM regions, KVM allows {max_slots} slots")
            self._slots = [_Slot(r, r.offset >> PAGE_SHIFT, r.size >> PAGE_SHIFT) for r in memory.regions]
            self._dirty_log = KvmDirtyLog(self._vm_fd, self._kvm_fd,
                                          [LogSlot(s.region.slot, s.first_page, s.pages) for s in self._slots],
                                          memory.page_count, self._set_regions)
            self._set_regions(0)
            _ioctl(self._vm_fd, abi.KVM_SET_TSS_ADDR, TSS_ADDR, "KVM_SET_TSS_ADDR")
            addr = ffi.new("uint64_t *", IDENTITY_MAP_ADDR)
            _ioctl(self._vm_fd, abi.KVM_SET_IDENTITY_MAP_ADDR, addr, "KVM_SET_IDENTITY_MAP_ADDR")
            self.supported_cpuid = self._supported_cpuid()
            self._tsc = GuestTsc(scalable=bool(_check_extension(self._kvm_fd, abi.KVM_CAP_TSC_CONTROL)))
            self._has_mp_state = bool(_check_extension(self._kvm_fd, abi.KVM_CAP_MP_STATE))
        except BaseException:
            self._close_fds()
            raise

    # -- setup -------------------------------------------------------------------------
    def _set_regions(self, flags: int) -> None:
        region_arg = ffi.new("struct kvm_userspace_memory_region *")
        for slot in self._slots:
            region = slot.region
            region_arg.slot = region.slot
            region_arg.flags = flags
            region_arg.guest_phys_addr = region.gpa
            region_arg.memory_size = region.size
            region_arg.userspace_addr = region.host_addr
            _ioctl(self._vm_fd, abi.KVM_SET_USER_MEMORY_REGION, region_arg,
                   f"KVM_SET_USER_MEMORY_REGION slot {region.slot} at {region.gpa:#x}+{region.size:#x}")

    def _supported_cpuid(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """KVM_GET_SUPPORTED_CPUID as (function, index, flags, eax, ebx, ecx, edx) tuples."""
        count = INITIAL_CPUID_ENTRIES
        while True:
            buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + count * ffi.sizeof("struct kvm_cpuid_entry2"))
            cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
            cpuid.nent = count
            if libc.ioctl(self._kvm_fd, abi.KVM_GET_SUPPORTED_CPUID, cpuid) == 0:
                break
            err = ffi.errno
            if err != 7 or count >= 4096:  # E2BIG: more entries than we offered
                raise BackendError(f"KVM_GET_SUPPORTED_CPUID: {_errno_text(err)}")
            count *= 2
        return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(cpuid.nent))]

    def guest_cpuid(self, vcpu_index: int) -> list[tuple[int, int, int, int, int, int, int]]:
        """The CPUID table a vCPU gets: the supported one, filtered (see CPUID_MASKS)."""
        out = []
        for function, index, flags, eax, ebx, ecx, edx in self.supported_cpuid:
            if CPUID_DROPPED_RANGE[0] <= function <= CPUID_DROPPED_RANGE[1]:
                continue
            if function in CPUID_ZEROED:
                eax = ebx = ecx = edx = 0
            elif function in CPUID_MASKS:
                ma, mb, mc, md = CPUID_MASKS[function]
                eax, ebx, ecx, edx = eax & ma, ebx & mb, ecx & mc, edx & md
            if function == 0x1:
                ebx = (ebx & 0x00FFFFFF) | ((vcpu_index & 0xFF) << 24)
            out.append((function, index, flags, eax, ebx, ecx, edx))
        if self._tsc.hz is None:
            raise BackendError("the guest CPUID table needs the TSC rate, which the first vCPU fixes")
        return apply_cpuid_policy(out, self._tsc.hz)   # hv's own leaves (hv.cpuid)

    @property
    def tsc_khz(self) -> int | None:
        """Guest TSC kHz, as the vCPUs run it (kvm_state.GuestTsc); None before vCPU 0."""
        return self._tsc.khz

    @property
    def tsc_hz(self) -> int | None:
        """Guest TSC Hz, as CPUID 0x15/0x16 declare it and a migration carries."""
        return self._tsc.hz

    def set_tsc_hz(self, tsc_hz: int) -> None:
        """A migrated guest's rate, before its vCPUs run (kvm_state.GuestTsc.adopt: refused
        without TSC control unless the host's rate is within tolerance); the vCPUs' CPUID
        tables then declare it."""
        self._tsc.adopt(tsc_hz, [vcpu._fd for vcpu in self.vcpus])
        for vcpu in self.vcpus:
            vcpu._set_cpuid(self.guest_cpuid(vcpu.index))

    @functools.cached_property
    def tsc_restorable(self) -> bool:
        """Whether KVM honours writes of the guest TSC (measured once, on a scratch VM).

        kvm_pvm accepts KVM_SET_MSRS(IA32_TSC) but the guest keeps seeing the host's TSC
        (no TSC offsetting): there a restored state's ``tsc`` is not applied.
        """
        scratch_vm = _ioctl(self._kvm_fd, abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM (TSC probe)")
        try:
            scratch = _ioctl(scratch_vm, abi.KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU (TSC probe)")
            try:
                buf = ffi.new("char[]", ffi.sizeof("struct kvm_msrs") + ffi.sizeof("struct kvm_msr_entry"))
                arg = ffi.cast("struct kvm_msrs *", buf)
                arg.nmsrs = 1
                arg.entries[0].index = abi.MSR_IA32_TSC
                _ioctl(scratch, abi.KVM_GET_MSRS, arg, "KVM_GET_MSRS (TSC probe)")
                target = arg.entries[0].data + (1 << 50)
                arg.entries[0].data = target
                _ioctl(scratch, abi.KVM_SET_MSRS, arg, "KVM_SET_MSRS (TSC probe)")
                _ioctl(scratch, abi.KVM_GET_MSRS, arg, "KVM_GET_MSRS (TSC probe)")
                return target <= arg.entries[0].data < target + (1 << 40)
            finally:
                os.close(scratch)
        finally:
            os.close(scratch_vm)

    # -- Vm interface ------------------------------------------------------------------
    def create_vcpu(self, index: int) -> KvmVcpu:
        if not 0 <= index < 256:
            raise BackendError(f"vCPU index {index} out of range 0..255")
        if any(v.index == index for v in self.vcpus):
            raise BackendError(f"vCPU {index} already exists")
        vcpu = KvmVcpu(self, index)
        self.vcpus.append(vcpu)
        return vcpu

    def start_dirty_log(self) -> None:
        self._dirty_log.start()

    def take_dirty(self) -> bytearray:
        """See :class:`hv_backends.kvm_dirty.KvmDirtyLog` (manual protection when the
        kernel has it: read, then clear and re-protect only the dirty words)."""
        return self._dirty_log.take()

    # Deferred protection for a migration sender (KvmDirtyLog.start(deferred=True)).
    def start_dirty_log_deferred(self) -> None:
        self._dirty_log.start(deferred=True)

    def take_dirty_deferred(self) -> bytearray:
        return self._dirty_log.take_deferred()

    def arm_dirty(self, first_page: int, count: int) -> None:
        self._dirty_log.arm(first_page, count)

    def stop_dirty_log(self) -> None:
        self._dirty_log.stop()

    def close(self) -> None:
        for vcpu in self.vcpus:
            vcpu.close()
        self.vcpus = []
        self._close_fds()

    def _close_fds(self) -> None:
        for fd in (self._vm_fd, self._kvm_fd):
            if fd >= 0:
                os.close(fd)
        self._vm_fd = self._kvm_fd = -1


class KvmVcpu(Vcpu):
    """One KVM vCPU: an fd and its shared ``kvm_run`` page."""

    backend_name = "kvm"
    deferred_injection = True       # KVM_INTERRUPT queues the vector for the next entry
    exact_interrupt_window = True   # KVM_EXIT_IRQ_WINDOW_OPEN: IF=1 and no shadow

    def __init__(self, vm: KvmVm, index: int) -> None:
        self.index = index
        self._vm = vm
        self._lock = threading.Lock()   # guards _kick_pending, _thread and immediate_exit
        self._kick_pending = False
        self._thread: int | None = None
        self._halted = False
        self._settle_attempts = 0
        self._settle_timer: threading.Timer | None = None
        self._fd = _ioctl(vm._vm_fd, abi.KVM_CREATE_VCPU, index, f"KVM_CREATE_VCPU {index}")
        self._mmap_size = vm.vcpu_mmap_size
        if self._mmap_size < ffi.sizeof("struct kvm_run"):
            os.close(self._fd)
            raise BackendError(f"KVM_GET_VCPU_MMAP_SIZE {self._mmap_size} is smaller than struct kvm_run")
        mapping = libc.mmap(ffi.NULL, self._mmap_size, _PROT_READ | _PROT_WRITE, _MAP_SHARED, self._fd, 0)
        if mapping == _MAP_FAILED:
            err = ffi.errno
            os.close(self._fd)
            raise BackendError(f"mmap of kvm_run: {_errno_text(err)}")
        self._mapping = mapping
        self._run = ffi.cast("struct kvm_run *", mapping)
        self._run_bytes = ffi.buffer(ffi.cast("char *", mapping), self._mmap_size)
        try:
            khz = vm._tsc.configure(self._fd)
        except BackendError:
            libc.munmap(mapping, self._mmap_size)
            os.close(self._fd)
            raise
        log.debug("vCPU %d: guest TSC %d kHz", index, khz)
        self._set_cpuid(vm.guest_cpuid(index))

    def _set_cpuid(self, entries: list[tuple[int, int, int, int, int, int, int]]) -> None:
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + len(entries) * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = len(entries)
        for i, (function, index, flags, eax, ebx, ecx, edx) in enumerate(entries):
            e = cpuid.entries[i]
            e.function, e.index, e.flags = function, index, flags
            e.eax, e.ebx, e.ecx, e.edx = eax, ebx, ecx, edx
        _ioctl(self._fd, abi.KVM_SET_CPUID2, cpuid, "KVM_SET_CPUID2")

    def cpuid_table(self) -> list[tuple[int, int, int, int, int, int, int]]:
        """The CPUID table KVM holds for this vCPU (KVM_GET_CPUID2), as set at creation."""
        count = 256
        buf = ffi.new("char[]", ffi.sizeof("struct kvm_cpuid2") + count * ffi.sizeof("struct kvm_cpuid_entry2"))
        cpuid = ffi.cast("struct kvm_cpuid2 *", buf)
        cpuid.nent = count
        _ioctl(self._fd, abi.KVM_GET_CPUID2, cpuid, "KVM_GET_CPUID2")
        return [(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in (cpuid.entries[i] for i in range(min(cpuid.nent, count)))]

    # -- running -----------------------------------------------------------------------
    def run(self, io: IoHandler) -> Exit:
        if self._fd < 0:
            raise BackendError(f"vCPU {self.index} is closed")
        run = self._run
        fd = self._fd
        ioctl = libc.ioctl
        request = abi.KVM_RUN
        zero = ffi.cast("unsigned long", 0)
        with self._lock:
            if self._thread is not None:
                raise BackendError(f"vCPU {self.index} is already running in another thread")
            self._thread = threading.get_ident()
        try:
            while True:
                if ioctl(fd, request, zero) < 0:
                    err = ffi.errno
                    if err == _EINTR:
                        with self._lock:
                            kicked = self._kick_pending
                            if kicked:
                                self._kick_pending = False
                                run.immediate_exit = 0
                        if kicked:
                            if self._settle_attempts < SOFT_INT_SETTLE_ATTEMPTS and self._after_soft_interrupt():
                                # kvm_pvm: the interrupt may still be pending (see the module
                                # docstring); run on briefly, then honour the kick.
                                self._settle_attempts += 1
                                self._settle_timer = threading.Timer(
                                    SOFT_INT_SETTLE_DELAY * self._settle_attempts, self.kick)
                                self._settle_timer.start()
                                continue
                            self._settle_attempts = 0
                            return Exit(ExitReason.KICKED)
                        continue  # a signal that was not a kick
                    raise BackendError(f"KVM_RUN: {_errno_text(err)} (errno {err})")
                self._halted = False
                reason = run.exit_reason
                if reason == abi.KVM_EXIT_IO or reason == abi.KVM_EXIT_MMIO:
                    try:
                        if reason == abi.KVM_EXIT_IO:
                            self._handle_pio(io)
                        else:
                            self._handle_mmio(io)
                    except BaseException:
                        self._complete_pending_access()
                        raise
                elif reason == abi.KVM_EXIT_HLT:
                    self._halted = True
                    return Exit(ExitReason.HALT)
                elif reason == abi.KVM_EXIT_IRQ_WINDOW_OPEN:
                    run.request_interrupt_window = 0
                    return Exit(ExitReason.IRQ_WINDOW)
                elif reason == abi.KVM_EXIT_INTR:
                    continue
                else:
                    return self._other_exit(reason)
        finally:
            if self._settle_timer is not None:
                self._settle_timer.cancel()
                self._settle_timer = None
            self._settle_attempts = 0
            with self._lock:
                self._thread = None

    def _after_soft_interrupt(self) -> bool:
        """Whether the vCPU stopped at CPL3 right after int3 / int n / into / int1 (the
        point where kvm_pvm can hold an undelivered software exception). Long mode and
        unpaged code only; unreadable memory answers False."""
        regs = ffi.new("struct kvm_regs *")
        sregs = ffi.new("struct kvm_sregs *")
        if libc.ioctl(self._fd, abi.KVM_GET_REGS, regs) < 0 or libc.ioctl(self._fd, abi.KVM_GET_SREGS, sregs) < 0:
            return False
        if sregs.cs.dpl != 3 or regs.rip < 2:
            return False
        linear = (sregs.cs.base + regs.rip - 2) & ((1 << 64) - 1)
        try:
            first = self._read_linear(sregs, linear)
            second = self._read_linear(sregs, linear + 1)
        except (BackendError, ValueError):
            return False
        if first is None or second is None:
            return False
        return second in (0xCC, 0xCE, 0xF1) or first == 0xCD

    def _read_linear(self, sregs: Any, linear: int) -> int | None:
        """One byte at a linear address through the guest's page tables (4-level long
        mode, or paging off); None when unmapped or not a mode handled here."""
        memory = self._vm.memory
        if not sregs.cr0 & CR0_PG:
            gpa = linear & 0xFFFF_FFFF
        elif sregs.efer & EFER_LMA:
            table = sregs.cr3 & 0x000F_FFFF_FFFF_F000
            gpa = None
            for level, shift in enumerate((39, 30, 21, 12)):
                entry = memory.read_int(table + ((linear >> shift) & 0x1FF) * 8, 8)
                if not entry & 1:
                    return None
                frame = entry & 0x000F_FFFF_FFFF_F000
                if shift == 12 or (level in (1, 2) and entry & 0x80):
                    gpa = (frame & ~((1 << shift) - 1)) | (linear & ((1 << shift) - 1))
                    break
                table = frame
        else:
            return None
        if gpa is None:
            return None
        try:
            return memory.read(gpa, 1)[0]
        except Exception:
            return None

    def _complete_pending_access(self) -> None:
        """Finish an I/O or MMIO access whose handler failed, so that the vCPU is at an
        architectural point when the exception leaves :meth:`run`. An unfinished read
        completes with whatever the data area holds (zeros unless the handler wrote)."""
        with self._lock:
            self._run.immediate_exit = 1
        result = libc.ioctl(self._fd, abi.KVM_RUN, ffi.cast("unsigned long", 0))
        err = ffi.errno
        with self._lock:
            self._run.immediate_exit = 1 if self._kick_pending else 0
        if result == 0 or err != _EINTR:
            log.warning("vCPU %d: completing an access after a failed handler: KVM_RUN gave %s",
                        self.index, "an exit" if result == 0 else _errno_text(err))

    def _handle_pio(self, io: IoHandler) -> None:
        pio = self._run.io
        size = pio.size
        count = pio.count
        offset = pio.data_offset
        port = pio.port
        if size not in (1, 2, 4) or count < 1 or offset + size * count > self._mmap_size or offset < 0:
            raise BackendError(f"malformed KVM_EXIT_IO: port {port:#x} size {size} count {count} offset {offset}")
        data = self._run_bytes
        if pio.direction == abi.KVM_EXIT_IO_OUT:
            for i in range(count):
                start = offset + i * size
                io.pio_write(port, size, int.from_bytes(data[start:start + size], "little"))
        else:
            mask = (1 << (8 * size)) - 1
            for i in range(count):
                start = offset + i * size
                data[start:start + size] = (io.pio_read(port, size) & mask).to_bytes(size, "little")

    def _handle_mmio(self, io: IoHandler) -> None:
        mmio = self._run.mmio
        length = mmio.len
        addr = mmio.phys_addr
        if length not in (1, 2, 4, 8):
            raise BackendError(f"malformed KVM_EXIT_MMIO at {addr:#x}: length {length}")
        buf = ffi.buffer(mmio.data, 8)
        if mmio.is_write:
            io.mmio_write(addr, length, int.from_bytes(buf[0:length], "little"))
        else:
            value = io.mmio_read(addr, length) & ((1 << (8 * length)) - 1)
            buf[0:length] = value.to_bytes(length, "little")

    def _rip(self) -> int:
        regs = ffi.new("struct kvm_regs *")
        return -1 if libc.ioctl(self._fd, abi.KVM_GET_REGS, regs) < 0 else regs.rip

    def _other_exit(self, reason: int) -> Exit:
        run = self._run
        if reason == abi.KVM_EXIT_SHUTDOWN:
            return Exit(ExitReason.SYSTEM_RESET, "triple fault")
        if reason == abi.KVM_EXIT_SYSTEM_EVENT:
            kind = run.system_event.type
            if kind == abi.KVM_SYSTEM_EVENT_SHUTDOWN:
                return Exit(ExitReason.SYSTEM_OFF, "system event: shutdown")
            if kind == abi.KVM_SYSTEM_EVENT_RESET:
                return Exit(ExitReason.SYSTEM_RESET, "system event: reset")
            return Exit(ExitReason.ERROR, f"KVM_EXIT_SYSTEM_EVENT type {kind} at rip {self._rip():#x}")
        if reason == abi.KVM_EXIT_INTERNAL_ERROR:
            internal = run.internal
            sub = internal.suberror
            ndata = min(internal.ndata, 16)
            data = " ".join(f"{internal.data[i]:#x}" for i in range(ndata))
            name = abi.KVM_INTERNAL_ERROR_NAMES.get(sub, "?")
            return Exit(ExitReason.ERROR, f"KVM_EXIT_INTERNAL_ERROR suberror {sub} ({name}) at rip "
                                          f"{self._rip():#x}" + (f" data [{data}]" if data else ""))
        if reason == abi.KVM_EXIT_FAIL_ENTRY:
            fail = run.fail_entry
            return Exit(ExitReason.ERROR, f"KVM_EXIT_FAIL_ENTRY hardware reason "
                                          f"{fail.hardware_entry_failure_reason:#x} on cpu {fail.cpu} "
                                          f"at rip {self._rip():#x}")
        name = abi.EXIT_REASON_NAMES.get(reason, "?")
        return Exit(ExitReason.ERROR, f"unhandled KVM exit {reason} ({name}) at rip {self._rip():#x}")

    def kick(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            self._kick_pending = True
            self._run.immediate_exit = 1
            thread = self._thread
            if thread is None or thread == threading.get_ident():
                return
            if not _kick_handler_installed():
                log.warning("vCPU %d: no handler for %s (call hv_backends.kvm.install_kick_handler() from the "
                            "main thread): the kick waits for the guest's next exit",
                            self.index, signal.Signals(KICK_SIGNAL).name)
                return
            with contextlib.suppress(ProcessLookupError):
                signal.pthread_kill(thread, KICK_SIGNAL)

    def interrupt(self, vector: int) -> None:
        """Queue external interrupt ``vector`` for delivery at the next guest entry.

        Call it right before :meth:`run`, only when :attr:`ready_for_interrupt` is true
        (else use :meth:`request_interrupt_window`). The queued vector is KVM's until the
        guest is entered: it is not part of :meth:`get_state`, so do not take a snapshot
        between ``interrupt()`` and ``run()``.
        """
        if not 0 <= vector < 256:
            raise BackendError(f"interrupt vector {vector} out of range")
        arg = ffi.new("struct kvm_interrupt *", {"irq": vector})
        _ioctl(self._fd, abi.KVM_INTERRUPT, arg, f"KVM_INTERRUPT {vector}")

    def inject_interrupt(self, vector: int) -> bool:
        """Queue external interrupt ``vector`` if the guest can take it now (RFLAGS.IF set,
        no interrupt shadow, nothing else queued); False otherwise (then ask for
        :meth:`request_interrupt_window`). Same contract as the Unicorn backend's, except
        that delivery happens at the next guest entry: call it right before :meth:`run`.
        Between runs only, from the vCPU thread.
        """
        if not 32 <= vector <= 255:
            raise BackendError(f"interrupt vector {vector} is out of range 32..255")
        self._check_stopped("inject_interrupt")
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self._fd, abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        events = ffi.new("struct kvm_vcpu_events *")
        _ioctl(self._fd, abi.KVM_GET_VCPU_EVENTS, events, "KVM_GET_VCPU_EVENTS")
        if not regs.rflags & RFLAGS_IF or events.interrupt.shadow or events.interrupt.injected \
                or events.exception.injected or events.nmi.injected:
            return False
        self.interrupt(vector)
        self._halted = False
        return True

    @property
    def ready_for_interrupt(self) -> bool:
        """Whether the guest can take an external interrupt now (IF=1, no shadow, nothing
        queued), as KVM reported at the end of the last ``run``."""
        return bool(self._run.ready_for_interrupt_injection)

    def interrupts_enabled(self) -> bool:
        """RFLAGS.IF (KVM_GET_REGS). Between runs only."""
        self._check_stopped("interrupts_enabled")
        regs = ffi.new("struct kvm_regs *")
        _ioctl(self._fd, abi.KVM_GET_REGS, regs, "KVM_GET_REGS")
        return bool(regs.rflags & RFLAGS_IF)

    def request_interrupt_window(self, after_shadow: bool = False) -> None:
        """Ask KVM to stop the guest as soon as it can take an interrupt: ``run`` then
        returns ``Exit(IRQ_WINDOW)`` and the request is cleared. KVM's window already
        waits for an interrupt shadow to end, so ``after_shadow`` changes nothing."""
        self._run.request_interrupt_window = 1

    def cancel_interrupt_window(self) -> None:
        self._run.request_interrupt_window = 0

    # -- state ---------------------------------------------------------------------------
    def _check_stopped(self, what: str) -> None:
        if self._fd < 0:
            raise BackendError(f"vCPU {self.index} is closed")
        if self._thread is not None and self._thread != threading.get_ident():
            raise BackendError(f"{what}: vCPU {self.index} is running; kick it first")

    def get_state(self) -> X86CpuState:
        self._check_stopped("get_state")
        return read_state(self._fd, self.index, self._halted, self._vm._has_mp_state)

    def set_state(self, state: CpuState) -> None:
        if not isinstance(state, X86CpuState):
            raise BackendError(f"KVM x86_64 vCPU cannot load a {type(state).__name__}")
        if len(state.fxsave) != FXSAVE_SIZE:
            raise BackendError(f"fxsave image is {len(state.fxsave)} bytes, expected {FXSAVE_SIZE}")
        self._check_stopped("set_state")
        write_state(self._fd, state)
        self._halted = state.halted

    def close(self) -> None:
        with self._lock:
            if self._fd < 0:
                return
            if self._thread is not None:
                raise BackendError(f"vCPU {self.index} is running; kick it and wait before closing")
            libc.munmap(self._mapping, self._mmap_size)
            os.close(self._fd)
            self._fd = -1
