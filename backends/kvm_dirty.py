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

``KVM_DIRTY_LOG_INITIALLY_SET`` is deliberately not enabled: with it the log starts
all-dirty, and hv's engine sends its full pass from its own page scan rather than from
the log, so the first take would report (and the engine would resend) all of RAM. What it
saves — write-protecting RAM when logging starts — measured nothing here: the cost a
guest pays under logging is one write-protection fault per page it dirties per round,
whichever way the protection is re-armed (see the report in issue 13).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from hv_backends import kvm_abi as abi
from hv_backends.base import BackendError
from hv_backends.kvm_abi import ffi, libc

log = logging.getLogger(__name__)

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


def enable_manual_protect(vm_fd: int, kvm_fd: int) -> bool:
    """Switch the VM to manual dirty-log protection if the kernel offers it. Must run
    before any slot has logging on. False (and nothing changed) when unsupported."""
    if not _supported_flags(kvm_fd) & abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE:
        return False
    cap = ffi.new("struct kvm_enable_cap *")
    cap.cap = abi.KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2
    cap.args[0] = abi.KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
    abi.ioctl_checked(vm_fd, abi.KVM_ENABLE_CAP, cap, "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)")
    return True


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
        self.manual = enable_manual_protect(vm_fd, kvm_fd)
        self.active = False
        log.debug("KVM dirty log: %s protection", "manual" if self.manual else "plain")

    def start(self) -> None:
        """Start logging (write-protects RAM), or, if on, discard what was recorded."""
        if self.active:
            self.take()
            return
        self._set_logging(abi.KVM_MEM_LOG_DIRTY_PAGES)
        self.active = True

    def stop(self) -> None:
        if self.active:
            self._set_logging(0)
            self.active = False

    def take(self) -> bytearray:
        """Bitmap (RAM offset space) of pages written since the last take; each reported
        page is write-protected again before this returns."""
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
            if self.manual:
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
