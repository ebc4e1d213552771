"""CPU backends behind one interface (see :mod:`hv_backends.base`).

``kvm``: /dev/kvm ioctls (x86_64 on x86_64 hosts). ``unicorn``: the Unicorn CPU emulator
(x86_64 and aarch64 anywhere). Modules are imported lazily so that a host without one
backend's prerequisites can still use the other.
"""
from __future__ import annotations

import ctypes
import dataclasses
import importlib
import json
import os
import sys
from pathlib import Path

from hv_backends.base import Arch, Backend, BackendUnavailable

PATCHED_UNICORN_DIR = Path(__file__).resolve().parent / "native" / "unicorn" / "lib"
PATCH_LEVEL = 1          # what the patched library's hv_unicorn_patch_level() must return
UNICORN_HEX_VERSION = 0x02010400   # uc_version() of Unicorn 2.1.4


@dataclasses.dataclass(frozen=True)
class UnicornLibrary:
    """Which libunicorn the Python binding loads in this process, and why."""

    patched: bool
    path: str | None      # the directory given to the binding; None: the wheel's own
    reason: str
    deliberate: bool = False   # the user asked for this library (no warning then)

    def describe(self) -> str:
        if self.patched:
            return f"hv's patched libunicorn 2.1.4 (store fast path) from {self.path}"
        return f"the unicorn wheel's libunicorn ({self.reason})"


def _check_patched(lib_dir: Path) -> str | None:
    """None if ``lib_dir`` holds hv's patched Unicorn 2.1.4 with both architectures hv
    needs, else why not. Loads it with ctypes (RTLD_LOCAL: a rejected library's symbols
    stay out of the way of the wheel's)."""
    try:
        lib = ctypes.CDLL(str(lib_dir / "libunicorn.so.2"))
    except OSError as exc:
        return f"cannot load the patched library: {exc}"
    if not hasattr(lib, "hv_unicorn_patch_level"):
        return "the library in hv_backends/native/unicorn/lib is not hv's patched build"
    lib.hv_unicorn_patch_level.restype = ctypes.c_uint
    level = lib.hv_unicorn_patch_level()
    if level != PATCH_LEVEL:
        return f"the patched library has patch level {level}, this hv needs {PATCH_LEVEL}"
    lib.uc_version.restype = ctypes.c_uint
    version = lib.uc_version(None, None)
    if version & 0xFFFFFF00 != UNICORN_HEX_VERSION:
        return f"the patched library reports version {version:#x}, hv needs 2.1.4"
    lib.uc_arch_supported.restype = ctypes.c_bool
    if not (lib.uc_arch_supported(4) and lib.uc_arch_supported(2)):   # UC_ARCH_X86, UC_ARCH_ARM64
        return "the patched library lacks the x86 or aarch64 target"
    return None


def _select_unicorn_library() -> UnicornLibrary:
    """Point the unicorn binding at hv's patched library when it was built and passes
    :func:`_check_patched` (it reads ``LIBUNICORN_PATH`` when ``unicorn`` is imported);
    otherwise leave the wheel's library and record why."""
    user = os.environ.get("LIBUNICORN_PATH")
    if os.environ.get("HV_UNICORN_STOCK") == "1":
        if user and Path(user).resolve() == PATCHED_UNICORN_DIR:   # inherited from a parent hv
            del os.environ["LIBUNICORN_PATH"]
        return UnicornLibrary(False, None, "HV_UNICORN_STOCK=1", deliberate=True)
    if user and Path(user).resolve() != PATCHED_UNICORN_DIR:
        return UnicornLibrary(False, user, f"LIBUNICORN_PATH={user} chosen by the user", deliberate=True)
    status_file = PATCHED_UNICORN_DIR / "build-status.json"
    if not (PATCHED_UNICORN_DIR / "libunicorn.so.2").is_file():
        try:
            reason = str(json.loads(status_file.read_text()).get("reason", "no reason recorded"))
        except (OSError, ValueError, AttributeError):
            reason = "hv's patched library was not built (reinstall hv: pip install -e .)"
        return UnicornLibrary(False, None, reason[:300], deliberate="HV_UNICORN_BUILD=0" in reason)
    problem = _check_patched(PATCHED_UNICORN_DIR)
    if problem is not None:
        return UnicornLibrary(False, None, problem)
    if "unicorn" in sys.modules and not user:
        return UnicornLibrary(False, None, "the unicorn module was imported before hv_backends")
    os.environ["LIBUNICORN_PATH"] = str(PATCHED_UNICORN_DIR)
    return UnicornLibrary(True, str(PATCHED_UNICORN_DIR), "built at install and checked")


UNICORN_LIBRARY = _select_unicorn_library()

BACKEND_CLASSES: dict[str, str] = {
    "kvm": "hv_backends.kvm:KvmBackend",
    "unicorn": "hv_backends.unicorn:UnicornBackend",
}


def backend_class(name: str) -> type[Backend]:
    try:
        target = BACKEND_CLASSES[name]
    except KeyError:
        raise BackendUnavailable(f"unknown accelerator {name!r} (choose from: {', '.join(BACKEND_CLASSES)})") from None
    module_name, _, class_name = target.partition(":")
    return getattr(importlib.import_module(module_name), class_name)


def choose_backend(arch: Arch, forced: str | None = None) -> tuple[Backend, str]:
    """Pick the accelerator for ``arch``: ``forced`` if given (error if unusable), else
    KVM when usable, else Unicorn. Returns the backend and a one-line reason."""
    if forced is not None:
        cls = backend_class(forced)
        problem = cls.probe(arch)
        if problem is not None:
            raise BackendUnavailable(f"-accel {forced}: {problem}")
        return cls(), f"accelerator {forced} (forced by -accel)"
    kvm_problem = backend_class("kvm").probe(arch)
    if kvm_problem is None:
        return backend_class("kvm")(), "accelerator kvm (/dev/kvm is usable)"
    cls = backend_class("unicorn")
    problem = cls.probe(arch)
    if problem is not None:
        raise BackendUnavailable(f"no accelerator can run {arch.value} guests: kvm: {kvm_problem}; unicorn: {problem}")
    return cls(), f"accelerator unicorn (kvm unusable: {kvm_problem})"
