"""KVM dirty-page logging for :class:`hv_backends.kvm.KvmVm` (the Vm dirty-log API).

Two kernel modes, chosen once per VM:

* **Manual protection** (``KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2``, QEMU's default when the
  kernel has it): ``KVM_GET_DIRTY_LOG`` only *reads* the slot's bitmap, and
  ``KVM_CLEAR_DIRTY_LOG`` clears and write-protects exactly the pages it is given. hv
  clears only the 64-page words that hold dirty bits, in runs, so the kernel never walks
  (or takes its MMU lock for) the clean part of a large slot, and a clean slot costs one
  read-only ioctl.
* **Plain** (older kernels): ``KVM_GET_DIRTY_LOG`` reads, clears and write-protects the
  whole slot in one call.

Ordering, which is what makes a write between the two ioctls safe: a page reported by
GET stays writable (and dirty in KVM's bitmap) until its CLEAR; a guest write before the
CLEAR lands in memory that the caller has not read yet (``take`` returns only after every
CLEAR), and a write after the CLEAR faults and is logged again. So a caller that reads a
page after ``take`` reported it, and calls ``take`` again later, never loses a write.
(``tests/backends/test_kvm_dirty.py`` checks this with a guest writing during the takes.)

Deferred protection (QEMU's scheme, for a migration's sender): with
``KVM_DIRTY_LOG_INITIALLY_SET`` turning logging on write-protects nothing (the log starts
all-dirty), :meth:`KvmDirtyLog.take_deferred` only reads the log, and
:meth:`KvmDirtyLog.arm` clears (write-protects) the pages a sender is about to read, just
before it reads them. A guest then takes its write fault on a page only once the sender
has passed it, not from the start of the round — on kvm_pvm one fault costs ~60 µs, so a
guest rewriting 64 MiB spent whole rounds faulting. Only bits that were reported (by the
last deferred take, or the initial all-set state) and lie in the range being sent are
cleared, so a write that landed after the read is never cleared unseen. Pages reported
but never armed stay dirty in KVM and are reported again by the next take.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from hv_backends import kvm_abi as abi
from hv_backends.base import BackendError
from hv_backends.kvm_abi import ffi, libc

log = logging.getLogger(__name__)
# The type strings of a migration's dirty-log calls, parsed now rather than in its first
# take (0.7 ms of the source's ~1 ms take after round 1; see abi.preparse).
abi.preparse("struct kvm_enable_cap *", "struct kvm_clear_dirty_log *", "struct kvm_dirty_log *",
             "char[]", "uint64_t[]", "uint64_t *", "unsigned long")

#: Most pages one KVM_CLEAR_DIRTY_LOG covers (QEMU clears 1 GiB at a time by default);
#: bounds how long one ioctl holds KVM's MMU lock while the guest runs.
CLEAR_CHUNK_PAGES = 1 << 18


@dataclass(frozen=True)
class LogSlot:
    """One KVM memory slot as the dirty log sees it."""

    slot: int
    first_page: int   # in RAM offset space
    pages: int


def _supported_flags(kvm_fd: int) -> int:
    result = libc.ioctl(kvm_fd, abi.KVM_CHECK_EXTENSION,
                        ffi.cast("unsigned long", abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
    return max(result, 0)


def enable_manual_protect(vm_fd: int, kvm_fd: int) -> int:
    """Switch the VM to manual dirty-log protection, with ``KVM_DIRTY_LOG_INITIALLY_SET``
    when offered, if the kernel has it. Must run before any slot has logging on. Returns
    the flags enabled (0: unsupported, nothing changed)."""
    supported = _supported_flags(kvm_fd)
    if not supported & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        return 0
    flags = supported & (abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE | abi.KVM_DIRTY_LOG_INITIALLY_SET)
    cap = ffi.new("struct kvm_enable_cap *")
    cap.cap = abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    cap.args[0] = flags
    abi.ioctl_checked(vm_fd, abi.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)")
    return flags


def dirty_word_runs(words: list[int] | bytes, limit: int) -> list[tuple[int, int]]:
    """(first word, word count) of runs of non-zero 64-bit words, each at most ``limit``
    words long. ``words`` is a sequence of ints or a little-endian byte string."""
    if isinstance(words, (bytes, bytearray)):
        words = [int.from_bytes(words[i:i + 8], "little") for i in range(0, len(words), 8)]
    runs: list[tuple[int, int]] = []
    start = -1
    for index, word in enumerate(words):
        if word:
            if start < 0:
                start = index
            elif index - start == limit:
                runs.append((start, limit))
                start = index
        elif start >= 0:
            runs.append((start, index - start))
            start = -1
    if start >= 0:
        runs.append((start, len(words) - start))
    return runs


class KvmDirtyLog:
    """The dirty log of one VM's slots; ``set_logging(flags)`` re-registers the slots
    with the given KVM_MEM_* flags (the VM owns the memory-region calls)."""

    def __init__(self, vm_fd: int, kvm_fd: int, slots: list[LogSlot], page_count: int,
                 set_logging: Callable[[int], None]) -> None:
        self._vm_fd = vm_fd
        self._slots = slots
        self._page_count = page_count
        self._set_logging = set_logging
        flags = enable_manual_protect(vm_fd, kvm_fd)
        self.manual = bool(flags)
        self.initially_set = bool(flags & abi.KVM_DIRTY_LOG_INITIALLY_SET)
        self.active = False
        # Pages reported (or initially all-set) whose protection a sender has yet to arm.
        self._pending = bytearray((page_count + 7) // 8)
        self._pending_any = False
        log.debug("KVM dirty log: %s protection%s", "manual" if self.manual else "plain",
                  ", initially set" if self.initially_set else "")

    def start(self, deferred: bool = False) -> None:
        """Start logging. Eager (default): RAM is write-protected now and ``take`` reports
        writes from here on. ``deferred``: nothing is protected; every page counts as
        reported and the sender arms each range (:meth:`arm`) right before reading it.
        If logging is on already, what was recorded is discarded (eager) or reported
        as pending (deferred)."""
        if self.active:
            if deferred:
                self.take_deferred()
            else:
                self.take()
            return
        self._set_logging(abi.KVM_MEM_LOG_DIRTY_PAGES)
        self.active = True
        self._set_pending(None)
        if not self.initially_set:
            return   # KVM protected the whole slot when logging went on
        if deferred:
            self._set_pending(self._all_pages())
            return
        for slot in self._slots:   # make "initially set" look like a protected start
            words = (slot.pages + 63) // 64
            raw = b"\xff" * (words * 8)
            self._clear(slot, ffi.new("char[]", raw), raw)

    def stop(self) -> None:
        if self.active:
            self._set_logging(0)
            self.active = False
            self._set_pending(None)

    def take(self) -> bytearray:
        """Bitmap (RAM offset space) of pages written since the last take; each reported
        page is write-protected again before this returns."""
        bitmap = self._get(clear=True)
        self._set_pending(None)
        return bitmap

    def take_deferred(self) -> bytearray:
        """Like :meth:`take`, but nothing is write-protected: the reported pages stay
        pending until :meth:`arm` is called for them (plain logging cannot defer: there
        the GET itself re-protects, as in :meth:`take`)."""
        if not self.manual:
            return self.take()
        bitmap = self._get(clear=False)
        self._set_pending(bitmap)
        return bitmap

    def arm(self, first_page: int, count: int) -> None:
        """Write-protect the pending pages in [first_page, first_page + count) (RAM offset
        space) and forget them: call it right before reading those pages."""
        if not self._pending_any or count <= 0:
            return
        end = min(first_page + count, self._page_count)
        for slot in self._slots:
            lo, hi = max(first_page, slot.first_page), min(end, slot.first_page + slot.pages)
            if lo < hi:
                self._arm_in_slot(slot, lo - slot.first_page, hi - slot.first_page)

    def _arm_in_slot(self, slot: LogSlot, lo: int, hi: int) -> None:
        """CLEAR the pending bits of slot pages [lo, hi) (slot-relative), in the 64-page
        aligned window KVM requires, leaving the window's other bits alone."""
        w0, w1 = lo & ~63, min((hi + 63) & ~63, slot.pages)
        if (slot.first_page + w0) % 8:
            raise BackendError(f"KVM slot {slot.slot} does not start on a byte of the dirty bitmap")
        first_byte = (slot.first_page + w0) // 8
        nbytes = (w1 - w0 + 7) // 8
        window = int.from_bytes(self._pending[first_byte:first_byte + nbytes], "little")
        bits = window & (((1 << (hi - lo)) - 1) << (lo - w0))
        if not bits:
            return
        self._pending[first_byte:first_byte + nbytes] = (window & ~bits).to_bytes(nbytes, "little")
        raw = bits.to_bytes(((w1 - w0 + 63) // 64) * 8, "little")
        clear_arg = ffi.new("struct kvm_clear_dirty_log *")
        clear_arg.slot = slot.slot
        clear_arg.first_page = w0
        clear_arg.num_pages = w1 - w0
        buf = ffi.new("char[]", raw)
        clear_arg.dirty_bitmap = buf
        abi.ioctl_checked(self._vm_fd, abi.KVM_CLEAR_DIRTY_LOG, clear_arg,
                          f"KVM_CLEAR_DIRTY_LOG slot {slot.slot} pages {w0}+{w1 - w0}")

    def _all_pages(self) -> bytearray:
        bits = 0
        for slot in self._slots:
            bits |= ((1 << slot.pages) - 1) << slot.first_page
        return bytearray(bits.to_bytes(len(self._pending), "little"))

    def _set_pending(self, bitmap: bytearray | None) -> None:
        if bitmap is None:
            if self._pending_any:
                self._pending[:] = bytes(len(self._pending))
            self._pending_any = False
        else:
            self._pending[:] = bitmap
            self._pending_any = any(bitmap)

    def _get(self, clear: bool) -> bytearray:
        """KVM_GET_DIRTY_LOG of every slot as one bitmap; with ``clear`` (manual mode) the
        reported words are cleared and re-protected before this returns."""
        if not self.active:
            raise BackendError("take_dirty: dirty logging is not started")
        total = 0
        log_arg = ffi.new("struct kvm_dirty_log *")
        for slot in self._slots:
            words = (slot.pages + 63) // 64
            bitmap = ffi.new("uint64_t[]", words)
            log_arg.slot = slot.slot
            log_arg.dirty_bitmap = bitmap
            abi.ioctl_checked(self._vm_fd, abi.KVM_GET_DIRTY_LOG, log_arg, f"KVM_GET_DIRTY_LOG slot {slot.slot}")
            raw = bytes(ffi.buffer(bitmap))
            bits = int.from_bytes(raw, "little") & ((1 << slot.pages) - 1)
            if not bits:
                continue
            if self.manual and clear:
                self._clear(slot, bitmap, raw)
            total |= bits << slot.first_page
        return bytearray(total.to_bytes((self._page_count + 7) // 8, "little"))

    def _clear(self, slot: LogSlot, bitmap: object, raw: bytes) -> None:
        """KVM_CLEAR_DIRTY_LOG for the runs of dirty words in ``bitmap`` (first_page is a
        multiple of 64, as KVM requires; a run ending at the slot's end is cut to it)."""
        clear_arg = ffi.new("struct kvm_clear_dirty_log *")
        clear_arg.slot = slot.slot
        base = ffi.cast("uint64_t *", bitmap)
        for first_word, count in dirty_word_runs(raw, CLEAR_CHUNK_PAGES // 64):
            first_page = first_word * 64
            clear_arg.first_page = first_page
            clear_arg.num_pages = min(count * 64, slot.pages - first_page)
            clear_arg.dirty_bitmap = base + first_word
            abi.ioctl_checked(self._vm_fd, abi.KVM_CLEAR_DIRTY_LOG, clear_arg,
                              f"KVM_CLEAR_DIRTY_LOG slot {slot.slot} pages {first_page}+{clear_arg.num_pages}")
