"""Raw disk images: positional I/O, O_DIRECT with aligned bounce buffers, image locking.

``direct=True`` opens the file with ``O_DIRECT``. Such I/O needs the buffer, the file
offset and the length aligned to the device's logical block size; the backend therefore
moves data through a page-aligned anonymous ``mmap`` buffer and widens every request to
:data:`DIRECT_ALIGN` (4 KiB, enough for every common device), reading the edges first
when a write does not cover whole aligned blocks.

Locking uses open-file-description locks (``F_OFD_SETLK``) on the whole file: a
read-write open takes a write lock, a read-only open a read lock, so two VMs cannot both
write an image (and no writer coexists with a reader), even inside one process. Migration
hands the lock over at switch-over: the source calls :meth:`BlockBackend.release`, the
destination (opened with ``lock=False``) calls :meth:`BlockBackend.acquire`.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import logging
import mmap
import os
import stat
import struct
from collections.abc import Callable
from pathlib import Path

from hv.errors import DeviceError

log = logging.getLogger(__name__)

DIRECT_ALIGN = 4096
BOUNCE_SIZE = 1 << 20
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
F_OFD_SETLK = getattr(fcntl, "F_OFD_SETLK", 37)
F_OFD_GETLK = getattr(fcntl, "F_OFD_GETLK", 36)


class BlockError(DeviceError, OSError):
    """A disk image cannot be opened, locked, read or written."""


class BlockLockedError(BlockError):
    """Another process (or open) holds a conflicting lock on the disk image."""


def _flock(kind: int) -> bytes:
    # struct flock: short l_type, short l_whence, off_t l_start, off_t l_len, pid_t l_pid
    return struct.pack("hhqqi4x", kind, os.SEEK_SET, 0, 0, 0)


def _libc_fallocate() -> Callable[[int, int, int, int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    function = libc.fallocate
    function.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    function.restype = ctypes.c_int
    return function


class BlockBackend:
    """One open raw image."""

    def __init__(self, path: str | os.PathLike[str], readonly: bool = False, direct: bool = False,
                 lock: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self.direct = direct
        self.locked = False
        flags = os.O_RDONLY if readonly else os.O_RDWR
        flags |= os.O_CLOEXEC
        if direct:
            flags |= os.O_DIRECT
        try:
            self.fd = os.open(self.path, flags)
        except OSError as exc:
            if direct and exc.errno == errno.EINVAL:
                raise BlockError(exc.errno, f"{self.path}: direct=on is not supported by this file system "
                                 "(O_DIRECT refused)") from None
            raise BlockError(exc.errno, f"{self.path}: cannot open disk image: {exc.strerror}") from None
        try:
            info = os.fstat(self.fd)
            if stat.S_ISDIR(info.st_mode):
                raise BlockError(errno.EISDIR, f"{self.path}: is a directory, not a disk image")
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            if direct and self.size % DIRECT_ALIGN:
                raise BlockError(errno.EINVAL, f"{self.path}: direct=on needs an image size that is a "
                                 f"multiple of {DIRECT_ALIGN} bytes (it is {self.size})")
            if lock:
                self.acquire()
        except BaseException:
            os.close(self.fd)
            raise
        # Page-aligned (anonymous mmap) bounce buffer for O_DIRECT transfers.
        self._bounce: mmap.mmap | None = mmap.mmap(-1, BOUNCE_SIZE) if direct else None
        self._fallocate = _libc_fallocate()

    # -- locking ------------------------------------------------------------------------
    def acquire(self) -> None:
        """Take the image lock (write lock if read-write, read lock if read-only)."""
        if self.locked:
            return
        kind = fcntl.F_RDLCK if self.readonly else fcntl.F_WRLCK
        try:
            fcntl.fcntl(self.fd, F_OFD_SETLK, _flock(kind))
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise BlockLockedError(exc.errno, f"{self.path}: disk image is in use by another VM "
                                       f"(failed to get a {'shared' if self.readonly else 'write'} lock)") from None
            raise BlockError(exc.errno, f"{self.path}: cannot lock disk image: {exc.strerror}") from None
        self.locked = True

    def release(self) -> None:
        """Drop the image lock (migration switch-over on the source)."""
        if not self.locked:
            return
        fcntl.fcntl(self.fd, F_OFD_SETLK, _flock(fcntl.F_UNLCK))
        self.locked = False

    # -- I/O ------------------------------------------------------------------------------
    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise BlockError(errno.EINVAL, f"{self.path}: access {offset:#x}+{length:#x} beyond the image")

    def read(self, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (must lie inside the image)."""
        self._check(offset, length)
        if not self.direct:
            data = os.pread(self.fd, length, offset)
            if len(data) != length:
                raise BlockError(errno.EIO, f"{self.path}: short read at {offset:#x}")
            return data
        out = bytearray()
        while len(out) < length:
            out += self._direct_chunk_read(offset + len(out), length - len(out))
        return bytes(out)

    def _direct_chunk_read(self, offset: int, length: int) -> bytes:
        assert self._bounce is not None
        start = offset - offset % DIRECT_ALIGN
        end = min(-(-(offset + length) // DIRECT_ALIGN) * DIRECT_ALIGN, start + BOUNCE_SIZE)
        got = self._preadv_bounce(start, end - start)
        take = min(length, start + got - offset)
        if take <= 0:
            raise BlockError(errno.EIO, f"{self.path}: short read at {offset:#x}")
        return bytes(self._bounce[offset - start:offset - start + take])

    def _preadv_bounce(self, offset: int, length: int) -> int:
        assert self._bounce is not None
        try:
            return os.preadv(self.fd, [memoryview(self._bounce)[:length]], offset)
        except OSError as exc:
            raise BlockError(exc.errno, f"{self.path}: read failed: {exc.strerror}") from None

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Write ``data`` at ``offset`` (inside the image; not on a read-only image)."""
        if self.readonly:
            raise BlockError(errno.EROFS, f"{self.path}: disk image is read-only")
        length = len(data)
        self._check(offset, length)
        view = memoryview(data).cast("B")
        if not self.direct:
            done = 0
            while done < length:
                try:
                    done += os.pwrite(self.fd, view[done:], offset + done)
                except OSError as exc:
                    raise BlockError(exc.errno, f"{self.path}: write failed: {exc.strerror}") from None
            return
        done = 0
        while done < length:
            done += self._direct_chunk_write(offset + done, view[done:])

    def _direct_chunk_write(self, offset: int, data: memoryview) -> int:
        assert self._bounce is not None
        start = offset - offset % DIRECT_ALIGN
        end = min(-(-(offset + len(data)) // DIRECT_ALIGN) * DIRECT_ALIGN, start + BOUNCE_SIZE)
        take = min(len(data), end - offset)
        span = end - start
        if offset != start or offset + take != end:  # partial blocks: read them first
            got = self._preadv_bounce(start, span)
            if got < span:
                self._bounce[got:span] = bytes(span - got)
        self._bounce[offset - start:offset - start + take] = data[:take]
        try:
            written = os.pwritev(self.fd, [memoryview(self._bounce)[:span]], start)
        except OSError as exc:
            raise BlockError(exc.errno, f"{self.path}: write failed: {exc.strerror}") from None
        if written != span:
            raise BlockError(errno.EIO, f"{self.path}: short write at {start:#x}")
        return take

    def read_into(self, offset: int, out: memoryview) -> None:
        """Fill ``out`` from ``offset`` (no-copy when not direct)."""
        length = len(out)
        self._check(offset, length)
        if self.direct:
            out[:] = self.read(offset, length)
            return
        done = 0
        while done < length:
            try:
                got = os.preadv(self.fd, [out[done:]], offset + done)
            except OSError as exc:
                raise BlockError(exc.errno, f"{self.path}: read failed: {exc.strerror}") from None
            if got <= 0:
                raise BlockError(errno.EIO, f"{self.path}: short read at {offset + done:#x}")
            done += got

    def flush(self) -> None:
        if self.readonly:
            return
        try:
            os.fdatasync(self.fd)
        except OSError as exc:
            raise BlockError(exc.errno, f"{self.path}: flush failed: {exc.strerror}") from None

    def discard(self, offset: int, length: int) -> None:
        """Deallocate a range (reads back as zeros)."""
        self.write_zeroes(offset, length, unmap=True)

    def write_zeroes(self, offset: int, length: int, unmap: bool = False) -> None:
        if self.readonly:
            raise BlockError(errno.EROFS, f"{self.path}: disk image is read-only")
        self._check(offset, length)
        if unmap and self._fallocate is not None and length:
            if self._fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length) == 0:
                return
            log.debug("%s: hole punching failed (errno %d); writing zeros", self.path, ctypes.get_errno())
        zeros = bytes(min(length, BOUNCE_SIZE))
        done = 0
        while done < length:
            step = min(len(zeros), length - done)
            self.write(offset + done, zeros[:step])
            done += step

    def close(self) -> None:
        if self.fd >= 0:
            self.release()
            os.close(self.fd)
            self.fd = -1
        if self._bounce is not None:
            self._bounce.close()
            self._bounce = None
