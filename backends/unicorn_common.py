"""What the Unicorn backend's modules share: the engine and its native hooks, and the
vCPU base class both architectures build on.

:mod:`hv_backends.unicorn` (the backend and its VM) imports the architecture modules
:mod:`hv_backends.unicorn_x86` and :mod:`hv_backends.unicorn_arm64`; they, in turn,
import only this module, so the three never import each other in a circle.

The hot hooks are native (``hv_backends._hv_native``, built by cffi at install time):

* a block hook that honours :meth:`Vcpu.kick` by calling ``uc_emu_stop`` at the start of
  a translation block -- the only point where a stop never replays or splits an
  instruction or a device access -- and plays KVM's interrupt-window exit;
* a write hook that marks the guest-*physical* pages a store touches (it walks the guest
  page tables: Unicorn reports virtual addresses) in a bitmap in RAM offset space.
"""
from __future__ import annotations

import ctypes
import functools
import logging
import threading
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

from hv.memory import PAGE_SIZE, GuestMemory
from hv_backends.base import Arch, BackendError, Exit, ExitReason, IoHandler, Vcpu

if TYPE_CHECKING:
    # unicorn/unicorn.py star-imports unicorn_py2 or unicorn_py3 by sys.version_info.major, a
    # test mypy cannot evaluate, so unicorn.Uc would be typed as the Python 2 class.
    from unicorn.unicorn_py3 import Uc

    from hv_backends.unicorn import UnicornVm

log = logging.getLogger(__name__)

UNICORN_VERSION = "2.1.4"
MAX_REGIONS = 16


class UnicornLayoutError(BackendError):
    """Unicorn's saved-context layout is not the one this backend was written for."""


def _import_unicorn() -> Any:
    import unicorn  # noqa: PLC0415 - imported lazily so hosts without unicorn can use KVM

    return unicorn


def _native() -> Any:
    import hv_backends._hv_native as native  # noqa: PLC0415 - built at install time

    return native


_library_logged = False


def uclib() -> ctypes.CDLL:
    """The ctypes handle of the libunicorn the Python binding loaded (the first call logs
    which one: hv's patched build or the wheel's, see hv_backends.UNICORN_LIBRARY)."""
    from unicorn.unicorn_py3 import unicorn as binding  # noqa: PLC0415

    global _library_logged
    if not _library_logged:
        _library_logged = True
        import hv_backends  # noqa: PLC0415

        quiet = library_is_patched(binding.uclib) or hv_backends.UNICORN_LIBRARY.deliberate
        log.log(logging.DEBUG if quiet else logging.WARNING, "libunicorn: %s", library_description())
    return binding.uclib


def library_is_patched(lib: ctypes.CDLL | None = None) -> bool:
    """True if the loaded libunicorn is hv's patched build (it exports the marker)."""
    if lib is None:
        from unicorn.unicorn_py3 import unicorn as binding  # noqa: PLC0415

        lib = binding.uclib
    return hasattr(lib, "hv_unicorn_patch_level")


def library_description() -> str:
    """One line for logs and ``hv -version``: the library really loaded, and why."""
    import hv_backends  # noqa: PLC0415

    choice = hv_backends.UNICORN_LIBRARY
    if library_is_patched():
        return f"hv's patched libunicorn 2.1.4 (store fast path), {choice.path or 'LIBUNICORN_PATH'}"
    return f"the unicorn wheel's libunicorn, guest stores on the slow path ({choice.reason})"


def _fn_addr(name: str) -> int:
    addr = ctypes.cast(getattr(uclib(), name), ctypes.c_void_p).value
    if not addr:
        raise BackendError(f"libunicorn has no symbol {name}")
    return addr


def tlb_dirty_log_supported() -> bool:
    """True if the loaded libunicorn logs dirty pages in its TLB (``hv_uc_dirty_log``,
    backends/native/unicorn/README.md): only a guest's first store to a clean page then
    takes the slow path. Otherwise hv logs with a memory-write hook (every store slow)."""
    return hasattr(uclib(), "hv_uc_dirty_log")


def code_write_notifier() -> Callable[[int, int], None] | None:
    """``hv_uc_invalidate_host(host, len)`` of hv's patched libunicorn, for
    :meth:`GuestMemory.set_code_write_notifier`: after the VMM writes guest RAM (device
    DMA), every engine with translated code on those pages drops what was overwritten at
    its next block (backends/native/unicorn/README.md). None on the wheel's library."""
    fn = getattr(uclib(), "hv_uc_invalidate_host", None)
    if fn is None:
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    fn.restype = None
    return cast("Callable[[int, int], None]", fn)


@functools.cache
def _native_dll() -> ctypes.CDLL:
    """The native module's shared object through ctypes (dlopen of the already loaded file)."""
    return ctypes.CDLL(_native().__file__)


def native_function_address(name: str) -> int:
    """Address of the C function ``name`` of ``hv_backends._hv_native`` itself, for libunicorn
    to call. cffi's ``ffi.addressof(lib, name)`` is its ``_cffi_d_<name>`` wrapper, which
    calls the function through the PLT: two more calls on every block a hook sees."""
    try:
        address = ctypes.cast(getattr(_native_dll(), name), ctypes.c_void_p).value
    except (AttributeError, OSError):
        address = None
    if address:
        return address
    native = _native()   # not exported (a build with hidden symbols): the wrapper works too
    return int(native.ffi.cast("uintptr_t", native.ffi.addressof(native.lib, name)))


def add_native_hook(uc: Uc, htype: int, name: str, user_data: int, begin: int = 1, end: int = 0,
                    insn: int | None = None) -> int:
    """Register the C function ``name`` of ``hv_backends._hv_native`` as a Unicorn hook
    (``insn``: the instruction of a UC_HOOK_INSN hook, uc_hook_add's variadic argument)."""
    fptr = native_function_address(name)
    handle = ctypes.c_size_t()
    extra = () if insn is None else (ctypes.c_int(insn),)
    status = uclib().uc_hook_add(uc._uch, ctypes.byref(handle), htype, ctypes.c_void_p(fptr),
                                 ctypes.c_void_p(user_data), ctypes.c_uint64(begin), ctypes.c_uint64(end),
                                 *extra)
    if status != 0:
        raise BackendError(f"uc_hook_add({name}) failed with Unicorn error {status}")
    return handle.value


def add_native_insn_hooks(uc: Uc, user_data: int, hooks: Iterable[tuple[int, str]]) -> None:
    """Register each (instruction, C function name) of ``hooks`` as a UC_HOOK_INSN hook
    on every address, all with ``user_data`` (the architecture's vCPU record)."""
    htype = _import_unicorn().UC_HOOK_INSN
    for insn, name in hooks:
        add_native_hook(uc, htype, name, user_data, insn=insn)


def set_poll(uc: Uc, name: str, opaque: int) -> None:
    """Make the native function ``name`` (with ``opaque``) the engine's poll callback
    (hv's libunicorn: ``hv_uc_set_poll``; the caller checked the library has it)."""
    status = uclib().hv_uc_set_poll(uc._uch, ctypes.c_void_p(native_function_address(name)),
                                    ctypes.c_void_p(opaque))
    if status != 0:
        raise BackendError(f"hv_uc_set_poll({name}) failed with Unicorn error {status}")


class NativeVm:
    """The C-side record of a VM's RAM layout and its guest-write dirty bitmap."""

    def __init__(self, memory: GuestMemory) -> None:
        native = _native()
        self.ffi = native.ffi
        self.lib = native.lib
        if len(memory.regions) > MAX_REGIONS:
            raise BackendError(f"at most {MAX_REGIONS} RAM regions are supported")
        self.struct = self.ffi.new("struct hv_vm *")
        self.bitmap = self.ffi.new("uint8_t[]", max(1, (memory.page_count + 7) // 8))
        self.struct.bitmap = self.bitmap
        self.struct.npages = memory.page_count
        self.struct.nregions = len(memory.regions)
        for i, region in enumerate(memory.regions):
            entry = self.struct.regions[i]
            entry.gpa = region.gpa
            entry.size = region.size
            entry.ram_offset = region.offset
            entry.host = self.ffi.cast("uint8_t *", region.host_addr)
        self.nbytes = (memory.page_count + 7) // 8
        # For hv_uc_dirty_log: (host, size, first page's bit) of every RAM region.
        triples = [v for r in memory.regions for v in (r.host_addr, r.size, r.offset // PAGE_SIZE)]
        self.tlb_regions = (ctypes.c_uint64 * max(1, len(triples)))(*triples)
        # vCPUs whose engines log in their TLB, and how many takes they must have flushed for.
        self.tlb_loggers: weakref.WeakSet[UnicornVcpuBase] = weakref.WeakSet()
        self.tlb_generation = 0
        # Device DMA into RAM (GuestMemory.write) must reach the engines' translated code.
        memory.set_code_write_notifier(code_write_notifier())

    def take(self) -> bytearray:
        """Clear the bitmap, returning what it held. Engines that log in their TLB keep a
        page's entry writable once its bit is set, so each flushes its TLB before this
        returns (a running vCPU at its next block boundary, others now): a store between
        the clear and the flush lands before the caller copies the page, a later one
        sets the bit again. A write hook marks a page just before its store lands, so
        engines with one pass a block boundary the same way."""
        out = bytearray(self.nbytes)
        if self.nbytes:
            self.lib.hv_take_dirty(self.struct, self.ffi.from_buffer(out))
        self.tlb_generation += 1
        for vcpu in list(self.tlb_loggers):
            vcpu.wait_tlb_flush(self.tlb_generation)
        return out


class NativeVcpu:
    """The C-side record one vCPU's hooks use (kick flag, paging-register cache)."""

    def __init__(self, vm: NativeVm, arch: Arch) -> None:
        self.ffi = vm.ffi
        self.lib = vm.lib
        self.vm = vm
        self.struct = self.ffi.new("struct hv_vcpu *")
        self.struct.vm = vm.struct
        self.struct.arch = 0 if arch is Arch.X86_64 else 1
        self.struct.emu_stop = self.ffi.cast("void *", _fn_addr("uc_emu_stop"))
        self.struct.reg_read = self.ffi.cast("void *", _fn_addr("uc_reg_read"))
        self.addr = int(self.ffi.cast("uintptr_t", self.struct))

    def install(self, uc: Uc, poll: bool = False, poll_hook: str = "hv_poll_hook",
                opaque: int | None = None) -> bool:
        """The kick/window check is always present; the write hook only while dirty
        logging (a memory-write hook sends every store through Unicorn's slow path).
        With ``poll`` and hv's libunicorn (``hv_uc_set_poll``) the check is the engine's
        poll callback, made where it enters its execution loop and after a poke
        (:meth:`poke`), instead of a block hook at every block start (a helper call and
        a hook-list walk each: a fifth of a store loop's time). The callback is the
        native ``poll_hook`` with ``opaque`` (default: this record), so an architecture
        with a callback of its own installs it here, once. True if it polls."""
        lib = uclib()
        if poll and hasattr(lib, "hv_uc_set_poll"):
            set_poll(uc, poll_hook, self.addr if opaque is None else opaque)
            self._poke = lib.hv_uc_poke
            self._poke.argtypes = [ctypes.c_void_p]
            self._poke.restype = None
            self._uch = uc._uch
            return True
        add_native_hook(uc, _import_unicorn().UC_HOOK_BLOCK, "hv_block_hook", self.addr)
        return False

    _poke: Any = None   # hv_uc_poke of a polling engine
    _uch: Any = None

    def poke(self) -> None:
        """Make a polling engine look at kick/service at its next block start (any thread;
        the caller set the flag first). Nothing for a block-hook engine (it looks anyway)
        or once :meth:`forget_engine` ran."""
        if self._poke is not None and self._uch is not None:
            self._poke(self._uch)

    def forget_engine(self) -> None:
        """The engine is being closed: no more pokes into it."""
        self._uch = None

    def add_write_hook(self, uc: Uc) -> int:
        return add_native_hook(uc, _import_unicorn().UC_HOOK_MEM_WRITE, "hv_write_hook", self.addr)

    def translate(self, uc: Uc, vaddr: int) -> int | None:
        """Guest-physical address of ``vaddr`` under the current paging mode.

        None when the page is not mapped; raises BackendError when the tables cannot
        be walked (outside RAM, unsupported format)."""
        out = self.ffi.new("uint64_t *")
        uch = uc._uch
        assert uch is not None   # None only after a failed uc_open, which raised
        rc = self.lib.hv_translate(self.ffi.cast("void *", uch.value), self.struct, vaddr, out)
        if rc < 0:
            raise BackendError(f"cannot walk the guest page tables for {vaddr:#x}")
        if rc > 0:
            return None
        return out[0] | (vaddr & (PAGE_SIZE - 1))


class UnicornVcpuBase(Vcpu):
    """What x86_64 and aarch64 vCPUs share: engine, RAM/MMIO mapping, kicks, the
    interrupt window."""

    backend_name = "unicorn"
    deferred_injection = False      # injection writes the exception entry into the CPU state
    exact_interrupt_window = False  # the window is checked at translation-block boundaries

    _halted: bool   # run(): HLT / WFI ended the last emu_start
    _event: Any     # the architecture's pending event (X86Event, Arm64Event), None when there is none

    def __init__(self, vm: UnicornVm, index: int) -> None:
        self.index = index
        self.vm = vm
        self.memory = vm.memory
        self._io: IoHandler | None = None
        self._kick_lock = threading.Lock()
        # Held by the vCPU thread for the whole of run(): whoever holds it owns the engine.
        self._engine_lock = threading.RLock()
        self._write_hook: int | None = None
        self._hook_synced = threading.Event()
        self._pending_invalidations: list[tuple[int, int]] = []
        self.native = NativeVcpu(vm.native, vm.arch)
        self.uc = self._create_engine()
        unicorn = _import_unicorn()
        for region in self.memory.regions:
            self.uc.mem_map_ptr(region.gpa, region.size, unicorn.UC_PROT_ALL, region.host_addr)
        for gpa, size in vm.mmio_windows:
            self.uc.mmio_map(gpa, size, self._mmio_read, gpa, self._mmio_write, gpa)
        self._install_kick_check()
        # Stop only where the native check stops us: no `until` address.
        self.uc.ctl_exits_enabled(True)
        self.uc.ctl_set_exits([])

    # The kick/window check as the engine's poll callback rather than a block hook (hv's
    # libunicorn): only for architectures whose every IRQ-unmasking instruction ends its
    # block unchained, and which need no check at every block (aarch64: timer deadline).
    POLL = False

    def _create_engine(self) -> Uc:
        raise NotImplementedError

    def _install_kick_check(self) -> None:
        """The kick/window check (:meth:`NativeVcpu.install`), called once by the
        constructor; an architecture whose check needs a record of its own (aarch64)
        overrides it to build that record first and install its own poll callback."""
        self.native.install(self.uc, poll=self.POLL)

    # -- device access -------------------------------------------------------------
    def _current_io(self) -> IoHandler:
        if self._io is None:
            raise BackendError("device access outside Vcpu.run()")
        return self._io

    def _mmio_read(self, uc: Any, offset: int, size: int, base: int) -> int:
        value = self._current_io().mmio_read(base + offset, size)
        return int(value) & ((1 << (8 * size)) - 1)

    def _mmio_write(self, uc: Any, offset: int, size: int, value: int, base: int) -> None:
        self._current_io().mmio_write(base + offset, size, value & ((1 << (8 * size)) - 1))

    # -- kicks ---------------------------------------------------------------------
    def kick(self) -> None:
        with self._kick_lock:
            self.native.struct.kick = 1
            self.native.poke()

    def _request_service(self) -> None:
        """Ask the running engine to stop at its next block boundary for housekeeping."""
        with self._kick_lock:
            self.native.struct.service = 1
            self.native.poke()

    def _take_kick(self) -> bool:
        """Consume a pending kick (from this run or remembered from before)."""
        with self._kick_lock:
            pending = bool(self.native.struct.kick)
            self.native.struct.kick = 0
            self.native.struct.stopped = 0
        return pending

    # -- interrupt window ------------------------------------------------------------------
    def request_interrupt_window(self, after_shadow: bool = False) -> None:
        """Unicorn has no interrupt-window exit of its own; hv's native block hook plays
        it: ``run`` returns ``IRQ_WINDOW`` at the first block boundary where the guest has
        unmasked interrupts (x86 RFLAGS.IF set, aarch64 PSTATE.I clear), so a pending
        interrupt is injected right after the unmasking instruction instead of at the next
        periodic retry. ``after_shadow``: first let one block run (x86: the instruction
        under an interrupt shadow, which QEMU translates as a block of its own)."""
        self.native.struct.irq_window = 2 if after_shadow else 1

    def cancel_interrupt_window(self) -> None:
        self.native.struct.irq_window = 0

    @property
    def window_exits(self) -> int:
        """How many times an armed interrupt window stopped the engine."""
        return int(self.native.struct.window_exits)

    # -- dirty log: in the TLB (hv's libunicorn) or a write hook (only while logging) -----
    _tlb_logging = False    # this engine has hv's dirty bitmap (hv_uc_dirty_log)
    _tlb_flushed = 0        # the NativeVm.tlb_generation it last synced with (TLB flushed)

    def _sync_write_hook(self) -> None:
        """Housekeeping by the engine's owner (inside run(), or with the engine lock
        held): make the dirty log follow the VM's switch and drop translations the VMM
        asked to invalidate."""
        with self._kick_lock:
            ranges, self._pending_invalidations = self._pending_invalidations, []
        for gpa, size in ranges:
            self.uc.ctl_remove_cache(gpa, gpa + size)
        want = bool(self.vm.native.struct.dirty_enabled)
        if tlb_dirty_log_supported():
            self._sync_tlb_dirty_log(want)
        else:
            self._sync_hook_dirty_log(want)
        self.native.struct.service = 0
        self._hook_synced.set()

    def _sync_hook_dirty_log(self, want: bool) -> None:
        """The wheel's library: install or remove the write hook. The hook marks a page
        just before the store lands, so a take must also wait for this engine to pass a
        block boundary (or be stopped) before the caller copies: it is a logger too."""
        native = self.vm.native
        generation = native.tlb_generation
        if want and self._write_hook is None:
            self._write_hook = self.native.add_write_hook(self.uc)
            self.uc.ctl_flush_tb()
            native.tlb_loggers.add(self)
        elif not want and self._write_hook is not None:
            status = uclib().uc_hook_del(self.uc._uch, ctypes.c_size_t(self._write_hook))
            if status != 0:
                raise BackendError(f"uc_hook_del failed with Unicorn error {status}")
            self._write_hook = None
            self.uc.ctl_flush_tb()
            native.tlb_loggers.discard(self)
        self._tlb_flushed = generation

    def _sync_tlb_dirty_log(self, want: bool) -> None:
        """Give the engine the VM's bitmap or take it away, and flush its TLB when that
        changed or the bitmap was taken since the last flush (entries filled while a
        page's bit was set let stores through unlogged)."""
        native = self.vm.native
        generation = native.tlb_generation
        if want != self._tlb_logging:
            uch = self.uc._uch
            assert uch is not None   # None only after a failed uc_open, which raised
            bitmap = ctypes.c_void_p(int(native.ffi.cast("uintptr_t", native.bitmap)) if want else None)
            rc = uclib().hv_uc_dirty_log(uch, bitmap, ctypes.c_uint64(native.struct.npages),
                                         native.tlb_regions, ctypes.c_int(native.struct.nregions))
            if rc != 0:
                raise BackendError(f"hv_uc_dirty_log failed ({rc})")
            self._tlb_logging = want
            if want:
                native.tlb_loggers.add(self)
            else:
                native.tlb_loggers.discard(self)
            self._tlb_flushed = -1
        if self._tlb_flushed != generation:
            unicorn = _import_unicorn()
            self.uc.ctl(unicorn.UC_CTL_TLB_FLUSH, unicorn.UC_CTL_IO_WRITE)
            self._tlb_flushed = generation

    def wait_tlb_flush(self, generation: int) -> None:
        """Return once this engine synced with ``generation`` of the bitmap (TLB flushed,
        no store with a write hook still in flight), or stopped logging: done here if the
        vCPU is not running, else by the vCPU at its next block boundary."""
        while self in self.vm.native.tlb_loggers and self._tlb_flushed < generation:
            if self._sync_if_idle():
                continue
            self._hook_synced.clear()
            self._request_service()
            self._hook_synced.wait(0.01)

    def request_hook_sync(self, wait: bool) -> None:
        """Make the write hook follow the dirty-log switch; with ``wait``, return only
        once it does (a running vCPU is stopped at a block boundary and resumes)."""
        if self._sync_if_idle():
            return
        self._hook_synced.clear()
        self._request_service()
        while wait and not self._hook_synced.wait(0.01):
            if self._sync_if_idle():   # run() returned meanwhile
                return

    def _sync_if_idle(self) -> bool:
        """Do the housekeeping here if no run() holds the engine (True), else nothing (False)."""
        if not self._engine_lock.acquire(blocking=False):
            return False
        try:
            self._sync_write_hook()
        finally:
            self._engine_lock.release()
        return True

    def _service_stop(self) -> bool:
        """After emu_start: True if the engine stopped only for housekeeping (handled)."""
        if self.native.struct.stopped and not self.native.struct.kick:
            self.native.struct.stopped = 0
            self._sync_write_hook()
            return True
        return False

    @property
    def blocks_executed(self) -> int:
        return int(self.native.struct.blocks)

    def invalidate_code(self, gpa: int, size: int) -> None:
        """Drop translated code for guest-physical ``gpa..gpa+size`` (after the VMM wrote
        guest code). Immediate when the vCPU is stopped; a running vCPU does it at its
        next block boundary and continues."""
        if size <= 0 or gpa < 0:
            return
        with self._kick_lock:
            self._pending_invalidations.append((gpa, size))
        self.request_hook_sync(wait=False)

    # -- the run loop, shared by both architectures ------------------------------------
    PC_NAME = "pc"

    def run(self, io: IoHandler) -> Exit:
        with self._engine_lock:
            return self._run_locked(io)

    def _run_locked(self, io: IoHandler) -> Exit:
        unicorn = _import_unicorn()
        self._sync_write_hook()
        self._io = io
        self._start_clock()
        try:
            while True:
                if self._take_kick():
                    return Exit(ExitReason.KICKED)
                self._halted = False
                self._event = None
                windows = self.native.struct.window_exits
                try:
                    self.uc.emu_start(self._read_pc(), 0)
                except unicorn.UcError as exc:
                    if exc.errno != unicorn.UC_ERR_INSN_INVALID:
                        return Exit(ExitReason.ERROR, f"unicorn: {exc} at {self.PC_NAME} {self._read_pc():#x}")
                    self._event = self._undefined_instruction(self._read_pc())
                # An event a hook recorded (an exception to deliver, int3, hvc, ...) is
                # handled even when a stop request ended the same emu_start: the guest
                # has executed the instruction, so dropping the event would lose it
                # (a trap's PC is already past it).
                handled = self._event is not None
                if handled:
                    event, self._event = self._event, None
                    result = self._handle_event(event)
                    if result is not None:
                        return result
                if self.native.struct.stopped:
                    if self._service_stop():
                        continue
                    # The window's stop is a kick the block hook made (a kick from another
                    # thread that coincides with it is answered by the same return).
                    self._take_kick()
                    opened = self.native.struct.window_exits != windows
                    return Exit(ExitReason.IRQ_WINDOW if opened else ExitReason.KICKED)
                if handled:
                    continue
                self._halted = True  # HLT / WFI made emu_start return
                return Exit(ExitReason.HALT)
        finally:
            self._stop_clock()
            self._io = None

    def _read_pc(self) -> int:
        raise NotImplementedError

    def _undefined_instruction(self, pc: int) -> Any:
        """The architecture's event for an instruction the engine could not decode."""
        raise NotImplementedError

    def _handle_event(self, event: Any) -> Exit | None:
        """Deliver an exception/trap recorded by a hook; an Exit ends run()."""
        raise NotImplementedError

    def _start_clock(self) -> None:
        """The guest's counter (TSC / CNTVCT) advances from now on."""

    def _stop_clock(self) -> None:
        """The guest's counter stops advancing until the next run()."""

    def close(self) -> None:
        with self._engine_lock:
            with self._kick_lock:
                self.native.forget_engine()
            self.uc = None  # type: ignore[assignment]
