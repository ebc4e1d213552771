"""Shared test helpers: KVM availability, fixture paths, launching hv processes."""
from __future__ import annotations

import fcntl
import functools
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
KVM_GET_API_VERSION = 0xAE00


@functools.cache
def kvm_unusable_reason() -> str | None:
    """None when /dev/kvm can be opened and speaks API 12, else why not."""
    if os.uname().machine != "x86_64":
        return f"/dev/kvm is not usable: hv's KVM backend needs an x86_64 host (this is {os.uname().machine})"
    try:
        fd = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        return f"/dev/kvm is not usable: {exc.strerror}"
    try:
        version = fcntl.ioctl(fd, KVM_GET_API_VERSION)
    except OSError as exc:
        return f"/dev/kvm is not usable: KVM_GET_API_VERSION failed: {exc.strerror}"
    finally:
        os.close(fd)
    if version != 12:
        return f"/dev/kvm is not usable: API version {version}, expected 12"
    return None


requires_kvm = pytest.mark.skipif(kvm_unusable_reason() is not None, reason=str(kvm_unusable_reason()))

# Backends usable for x86_64 guests on this host, for parametrising.
X86_BACKENDS = [
    pytest.param("kvm", marks=requires_kvm, id="kvm"),
    pytest.param("unicorn", id="unicorn"),
]
