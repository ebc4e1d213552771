"""virtio-blk reads and writes served in C (``hvq_blk_serve`` in
``backends/native/hv_native_virtio.c``), the rest in Python.

On a kick, :meth:`NativeBlkQueue.serve` hands the native code the queue's ring positions,
guest RAM's regions and dirty bitmap, and the disk's descriptor; it serves requests until
the ring is empty or the next request is one it leaves to Python (a flush, an identify, a
discard, a write to a read-only disk, a range past the end, an I/O error, anything
malformed). That request is still in the ring, and :class:`hv.devices.virtio_blk.VirtioBlk`
pops and serves it (or refuses it) as it always did. The native checks accept a subset of
what :mod:`hv.devices.virtqueue` accepts, so a hostile ring only ever meets the Python
path's errors.

Used only where it can do all that Python would: the native module is built, the disk is
not opened with O_DIRECT (its bounce buffer is Python's), and guest RAM's code-write
notifier is none or a C function (hv's libunicorn's ``hv_uc_invalidate_host``), which the
native code then calls itself. ``HV_NATIVE_VIRTIO=0`` in the environment turns it off (to
measure one path against the other). Measured with ``hv bench blk`` (README).
"""
from __future__ import annotations

import ctypes
import os
from typing import Any

from hv.block import BlockBackend
from hv.devices.virtqueue import Virtqueue, VirtqueueError
from hv.memory import GuestMemory

MAX_REGIONS = 16   # struct hvq_blk's regions: HV_MAX_REGIONS in hv_native.c


def _load() -> tuple[Any, Any] | None:
    if os.environ.get("HV_NATIVE_VIRTIO", "1") == "0":
        return None
    try:
        from hv_backends._hv_native import ffi, lib  # noqa: PLC0415 - built at install time
    except ImportError:
        return None
    return (ffi, lib) if hasattr(lib, "hvq_blk_serve") else None


_NATIVE = _load()


def notifier_address(notifier: Any) -> int | None:
    """The C address of a code-write notifier that is a ctypes function (0: there is none),
    or None when it is a Python callable the native code cannot call."""
    if notifier is None:
        return 0
    try:   # ctypes casts its own function pointers only
        return ctypes.cast(notifier, ctypes.c_void_p).value or None
    except (ctypes.ArgumentError, TypeError):
        return None


class NativeBlkQueue:
    """The native request path of one virtio-blk device's queue."""

    def __init__(self, ffi: Any, lib: Any, memory: GuestMemory, backend: BlockBackend, capacity: int,
                 invalidate: int) -> None:
        self._ffi, self._lib = ffi, lib
        self.memory = memory
        self.backend = backend
        q = self._q = ffi.new("struct hvq_blk *")
        q.nregions = len(memory.regions)
        for i, region in enumerate(memory.regions):
            q.regions[i].gpa = region.gpa
            q.regions[i].size = region.size
            q.regions[i].ram_offset = region.offset
            q.regions[i].host = ffi.cast("uint8_t *", region.host_addr)
        q.invalidate = ffi.cast("void *", invalidate)
        q.fd = backend.fd
        q.readonly = int(backend.readonly)
        q.capacity = capacity

    @classmethod
    def create(cls, memory: GuestMemory, backend: BlockBackend, capacity: int) -> NativeBlkQueue | None:
        """The native path for a device of ``capacity`` sectors, or None where it cannot do
        all Python would."""
        invalidate = notifier_address(memory.code_write_notifier)
        if _NATIVE is None or backend.direct or invalidate is None or len(memory.regions) > MAX_REGIONS:
            return None
        return cls(*_NATIVE, memory, backend, capacity, invalidate)

    def serve(self, queue: Virtqueue) -> int:
        """Serve what the native code can from ``queue`` and return how many requests it
        served; the queue's ring positions move on. What is still available (if anything)
        is the next request for Python. Raises VirtqueueError if the used ring cannot be
        written (the device then needs a reset)."""
        s, q, memory = queue.state, self._q, self.memory
        q.desc, q.avail, q.used, q.size = s.desc, s.avail, s.used, s.size
        q.event_idx, q.indirect = int(queue.event_idx), int(queue.indirect)
        q.last_avail, q.used_idx = s.last_avail_idx, s.used_idx
        with memory.dirty_lock:   # the bitmap object stays the same until the call returns
            bitmap = self._ffi.from_buffer("uint8_t[]", memory.dirty_bitmap)
            q.dirty = bitmap
            try:
                rc = self._lib.hvq_blk_serve(q)
            finally:
                q.dirty = self._ffi.NULL
                del bitmap
        s.last_avail_idx, s.used_idx = q.last_avail, q.used_idx
        if rc < 0:
            raise VirtqueueError("the used ring is outside guest RAM")
        return int(q.served)
