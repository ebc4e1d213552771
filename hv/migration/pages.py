"""Fast zero-page handling for the migration stream (measured in bench/profile_migrate.py).

Source: a page the kernel never populated (neither present nor swapped, per
``/proc/self/pagemap``) is zero without reading it — reading it would fault in a page
per 4 KiB. The rest is tested one 64-page block at a time (a single memcmp), page by page
only inside mixed blocks. On 1 GiB of mostly untouched RAM this took the full-pass scan
from ~525 ms to ~65 ms.

Destination: guest RAM is pre-faulted up front by :class:`Prefaulter`, a background
thread started when the destination is created (it waits for its source anyway), with
``MADV_POPULATE_WRITE`` in chunks, so receiving does not take a page fault per 4 KiB (on
this host 1 GiB of fresh RAM cost 0.25 s to 6 s to fault in, depending on how much the
hypervisor below had reclaimed). A zero run is compared block-wise and only pages that
are not zero already are overwritten: ``MADV_DONTNEED`` would split the transparent huge
pages the RAM is mapped with (:mod:`hv.memory`) back into 4 KiB pages, which makes a KVM
guest run slower after the switch-over (one EPT fault per 4 KiB).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

PAGE_SIZE = 4096
BLOCK_PAGES = 64
ZERO_PAGE = bytes(PAGE_SIZE)
ZERO_BLOCK = bytes(PAGE_SIZE * BLOCK_PAGES)
PAGE_NORMAL = 1
MADV_DONTNEED = 4
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23
# The top byte of each little-endian pagemap entry holds bits 56..63: 0xC0 = present | swapped.
_UNPOPULATED = bytes(0 if b & 0xC0 else 1 for b in range(256))


@functools.cache
def _madvise() -> Any:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    fn.restype = ctypes.c_int
    return fn


def _address(view: memoryview) -> int | None:
    """Host address of a writable buffer view, or None (read-only, not a plain buffer)."""
    try:
        anchor = (ctypes.c_char * len(view)).from_buffer(view)
    except (TypeError, ValueError):
        return None
    address = ctypes.addressof(anchor)
    del anchor
    return address


_pagemap_lock = threading.Lock()
_pagemap: dict[str, int] = {}  # "pid", "fd": one descriptor per process, shared by threads (pread)


def _pagemap_fd() -> int:
    """This process's /proc/self/pagemap, opened once per process (a forked child must not
    read its parent's through an inherited descriptor)."""
    pid = os.getpid()
    with _pagemap_lock:
        if _pagemap.get("pid") != pid:
            _pagemap["fd"] = os.open("/proc/self/pagemap", os.O_RDONLY | os.O_CLOEXEC)
            _pagemap["pid"] = pid
        return _pagemap["fd"]


def never_populated(view: memoryview) -> bytes | None:
    """One byte per page of ``view``: 1 where the page was never populated (so it reads
    as zero), or None when the kernel cannot tell (no pagemap, not a plain buffer)."""
    address = _address(view)
    if address is None or address % PAGE_SIZE:
        return None
    pages = len(view) // PAGE_SIZE
    try:
        raw = os.pread(_pagemap_fd(), pages * 8, address // PAGE_SIZE * 8)
    except OSError:
        return None
    if len(raw) != pages * 8:
        return None
    return raw[7::8].translate(_UNPOPULATED)


def page_kinds(view: memoryview, count: int) -> tuple[bytearray, int]:
    """(kind per page — 0 zero, 1 normal — and the number of normal pages) of ``view``."""
    known_zero = never_populated(view) if count >= BLOCK_PAGES else None
    kinds = bytearray(count)
    normal = 0
    block_is_zero = ZERO_BLOCK.startswith
    page_is_zero = ZERO_PAGE.startswith
    for first in range(0, count, BLOCK_PAGES):
        last = min(first + BLOCK_PAGES, count)
        if known_zero is not None and known_zero.count(1, first, last) == last - first:
            continue
        if block_is_zero(view[first * PAGE_SIZE:last * PAGE_SIZE]):
            continue
        for i in range(first, last):
            if known_zero is not None and known_zero[i]:
                continue
            if not page_is_zero(view[i * PAGE_SIZE:(i + 1) * PAGE_SIZE]):
                kinds[i] = PAGE_NORMAL
                normal += 1
    return kinds, normal


def zero_pages(view: memoryview) -> None:
    """Make whole pages read as zero, writing only the pages that are not zero already.

    Fresh (or pre-faulted) RAM is zero, so the usual cost is one block-wise compare; the
    pages are never released (no ``MADV_DONTNEED``), which keeps huge pages whole."""
    block = PAGE_SIZE * BLOCK_PAGES
    for first in range(0, len(view), block):
        chunk = view[first:first + block]
        if ZERO_BLOCK.startswith(chunk):
            continue
        for offset in range(0, len(chunk), PAGE_SIZE):
            page = chunk[offset:offset + PAGE_SIZE]
            if not ZERO_PAGE.startswith(page):
                page[:] = ZERO_PAGE


def populate(view: memoryview) -> bool:
    """Pre-fault a page-aligned writable view in one call (Linux >= 5.14; else no-op), so
    receiving into fresh RAM does not take one page fault per 4 KiB. True when it did."""
    address = _address(view)
    if address is None:
        return False
    return bool(_madvise()(address, len(view), MADV_POPULATE_WRITE) == 0)


def mem_available() -> int | None:
    """MemAvailable from /proc/meminfo in bytes, or None when it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


# Bytes per madvise: how long a stop or a hold may take to act at most. MADV_POPULATE_WRITE
# holds the process's mmap lock for its whole range, so anything in hv that maps memory
# meanwhile (a buffer of 128 KiB or more, a Python arena, a thread's stack) waits for the
# chunk to end: an mmap of 256 KiB waited up to 92-97 ms with 8 MiB chunks on this host
# while it was slow to back RAM (28-40 ms with 2 MiB), median 0.43-1.0 ms while it was
# fast (0.16-0.22 with 2 MiB); touching memory mapped before took 0.03 ms at most. 2 MiB is
# one transparent huge page and pre-faults 512 MiB as fast (50-130 ms either way).
PREFAULT_CHUNK = 2 << 20
HOLD_LIMIT = 1.0           # seconds: a hold (hold_prefault) never pauses the pre-fault longer
PREFAULT_HEADROOM = 0.8    # pre-fault only when RAM fits in this share of MemAvailable


@dataclass
class Prefaulter:
    """Pre-faults guest RAM in a background daemon thread, low addresses first (the order a
    first pass arrives in), ``PREFAULT_CHUNK`` bytes per ``MADV_POPULATE_WRITE``, while the
    destination waits for its source and through the source's full pass;
    :func:`stop_prefault` ends it when that pass is complete (``hv.migration.incoming``).

    Pre-faulting writes nothing (a present page is left as it is), so it may race with the
    stream reader and with the guest. It stops between chunks once ``stop()`` is called or
    a view's mapping is closed, so it never delays exit by more than one chunk; it is
    skipped when the kernel lacks ``MADV_POPULATE_WRITE`` (Linux < 5.14) or when guest RAM
    would not fit comfortably in the host's available memory (RAM is ``MAP_NORESERVE``).
    """

    views: Sequence[tuple[Any, memoryview]]  # (mmap object, its whole view) per region
    done_bytes: int = 0
    elapsed: float = 0.0          # seconds from start to done or stopped
    outcome: str = "not started"
    _began: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _go: threading.Event = field(default_factory=lambda: _set(threading.Event()))  # clear: held
    _thread: threading.Thread | None = None
    # One byte per page of all regions, in RAM offset order: 1 where the page was never
    # populated when the pre-fault started (so it is zero, faulted in or not), or None.
    pristine: bytearray | None = None

    @property
    def total(self) -> int:
        return sum(len(view) for _, view in self.views)

    def _capture_pristine(self) -> None:
        """Which pages nothing ever wrote, read from the page map before the pre-fault
        populates them (afterwards they are present, still zero, but indistinguishable)."""
        if os.environ.get("HV_STREAM_PRISTINE", "1") == "0":
            return
        maps = []
        for mapping, view in self.views:
            known = None if mapping.closed else never_populated(view)
            if known is None:
                return
            maps.append(known)
        self.pristine = bytearray(b"".join(maps))

    def start(self) -> Prefaulter:
        self._capture_pristine()
        available = mem_available()
        if available is not None and self.total > available * PREFAULT_HEADROOM:
            self.outcome = f"skipped: {self.total >> 20} MiB RAM, {available >> 20} MiB available"
            log.info("guest RAM not pre-faulted (%s)", self.outcome)
            return self
        self._thread = threading.Thread(target=self._run, name="prefault", daemon=True)
        self.outcome = "running"
        self._thread.start()
        return self

    def _run(self) -> None:
        self._began = begin = time.monotonic()
        madvise = _madvise()
        # Addresses and sizes up front: a view is released when its region closes.
        spans = [(mapping, _address(view), len(view)) for mapping, view in self.views if not mapping.closed]
        for mapping, address, length in spans:
            if address is None:
                continue
            for offset in range(0, length, PREFAULT_CHUNK):
                self._go.wait(HOLD_LIMIT)
                if self._stop.is_set() or mapping.closed:
                    self.elapsed = time.monotonic() - begin
                    self.outcome = "stopped"
                    return
                size = min(PREFAULT_CHUNK, length - offset)
                if madvise(address + offset, size, MADV_POPULATE_WRITE) != 0:
                    self.outcome = f"unsupported: {os.strerror(ctypes.get_errno())}"
                    log.debug("pre-fault stopped: %s", self.outcome)
                    return
                self.done_bytes += size
        self.elapsed = time.monotonic() - begin
        self.outcome = "done"
        log.debug("pre-faulted %d MiB of guest RAM in %.2f s", self.done_bytes >> 20, self.elapsed)

    def request_stop(self) -> None:
        """Ask the thread to stop after its current chunk, without waiting for it."""
        self._stop.set()
        self._go.set()   # a held pre-fault sees the stop at once

    def stop(self, timeout: float | None = None) -> None:
        """Ask the thread to stop after its current chunk and wait up to ``timeout``."""
        self.request_stop()
        if self._thread is not None:
            self._thread.join(timeout)

    def hold(self) -> Callable[[], None]:
        """Pause after the current chunk (at most ``HOLD_LIMIT`` seconds per chunk) until
        the returned function is called."""
        self._go.clear()
        return self._go.set

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the pre-fault to finish; True when it is no longer running."""
        if self._thread is not None:
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True


_prefaulted: weakref.WeakKeyDictionary[Any, Prefaulter] = weakref.WeakKeyDictionary()


def prefault_memory(memory: Any) -> Prefaulter:
    """Start pre-faulting every region of a :class:`hv.memory.GuestMemory` in the background."""
    prefaulter = Prefaulter([(region.mmap, region.view) for region in memory.regions]).start()
    if prefaulter._thread is not None:
        _prefaulted[memory] = prefaulter
    return prefaulter


def stop_prefault(memory: Any) -> None:
    """The source's full pass is in: stop pre-faulting ``memory`` (after the current chunk,
    without waiting). Until then the thread faults RAM in ahead of the stream, which the
    reader would otherwise fault itself, one host-backed huge page at a time (on this
    nested host, 5 s for the last 400 MiB when the host had reclaimed them); after it, what
    is left is RAM the source never used, and going on would run into the switch-over.
    An earlier release stopped at connect: it measured 262 ms of destination CPU per GiB
    with RAM faulted on demand against 544 with a pre-fault started alongside, but the
    wall time of a 2 GiB migration is lower with the pre-fault running (see incoming)."""
    prefaulter = _prefaulted.get(memory) if memory is not None else None
    if prefaulter is not None:
        prefaulter.request_stop()


def hold_prefault(memory: Any) -> Callable[[], None]:
    """Pause the pre-fault of ``memory`` after its current chunk (at most ``HOLD_LIMIT``
    seconds per chunk) until the returned function is called. The destination holds it
    from the source's connection until its answer to CONFIG is sent: the stream reader's
    setup maps buffers, and each mapping would wait for a pre-fault chunk (the mmap lock,
    see ``PREFAULT_CHUNK``) while the source copies every page it sends until that answer."""
    prefaulter = _prefaulted.get(memory) if memory is not None else None
    if prefaulter is None:
        return lambda: None
    return prefaulter.hold()


def _set(event: threading.Event) -> threading.Event:
    event.set()
    return event


def take_pristine(memory: Any, page_count: int) -> bytearray | None:
    """Hand the map of pages known to be zero (:attr:`Prefaulter.pristine`) to the one
    stream reader that fills ``memory`` first, or None. Taken at most once: it is valid only
    while nothing but that reader wrote the RAM (a destination that has not run), and the
    reader keeps it true by clearing each page it writes before writing it; a later reader
    (another migration or restore, a reset machine) never sees it."""
    prefaulter = _prefaulted.get(memory) if memory is not None else None
    if prefaulter is None:
        return None
    pristine, prefaulter.pristine = prefaulter.pristine, None
    return pristine if pristine is not None and len(pristine) == page_count else None


def is_prefaulted(memory: Any) -> bool:
    """True when a :class:`Prefaulter` runs (or ran to the end) over ``memory``: per-run
    pre-faulting by the stream reader would only repeat its work."""
    prefaulter = _prefaulted.get(memory) if memory is not None else None
    return prefaulter is not None and prefaulter.outcome in ("running", "done")


def prefault_report(memory: Any) -> str:
    """What the background pre-fault of ``memory`` did so far and how long it took, e.g.
    ``done: 2048 MiB in 190 ms``, ``stopped: 1536 of 2048 MiB in 900 ms`` (the source's
    full pass came first), ``running: 512 of 2048 MiB for 300 ms``. On a host that hands
    free memory back to its own host (free page reporting) the same 2 GiB took 0.19-13 s."""
    prefaulter = _prefaulted.get(memory) if memory is not None else None
    if prefaulter is None:
        return "not started"
    if prefaulter.outcome == "done":
        return f"done: {prefaulter.done_bytes >> 20} MiB in {prefaulter.elapsed * 1000:.0f} ms"
    progress = f"{prefaulter.outcome}: {prefaulter.done_bytes >> 20} of {prefaulter.total >> 20} MiB"
    if prefaulter.outcome == "stopped":
        return f"{progress} in {prefaulter.elapsed * 1000:.0f} ms"
    if prefaulter.outcome == "running" and prefaulter._began:
        return f"{progress} for {(time.monotonic() - prefaulter._began) * 1000:.0f} ms"
    return progress
