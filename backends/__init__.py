"""CPU backends behind one interface (see :mod:`hv_backends.base`).

``kvm``: /dev/kvm ioctls (x86_64 on x86_64 hosts). ``unicorn``: the Unicorn CPU emulator
(x86_64 and aarch64 anywhere). Modules are imported lazily so that a host without one
backend's prerequisites can still use the other.
"""
from __future__ import annotations

import importlib

from hv_backends.base import Arch, Backend, BackendUnavailable

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
