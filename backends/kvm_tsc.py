"""The TSC rate a KVM guest gets on this host, for backends that want to match it.

It lives apart from :mod:`hv_backends.kvm_state` because it needs the backend's probe
(:class:`hv_backends.kvm.KvmBackend`), which imports that module. The Unicorn backend asks it
for its default rate, so a guest started on Unicorn can move to KVM on the same host.
"""
from __future__ import annotations

import functools
import logging
import os

from hv import cpuid as cpuid_policy
from hv_backends import kvm_abi as abi
from hv_backends.base import Arch, BackendError
from hv_backends.kvm import KVM_DEVICE, KvmBackend
from hv_backends.kvm_state import tsc_khz_of

log = logging.getLogger("hv_backends.kvm")
ffi = abi.ffi


@functools.cache
def kvm_guest_tsc_hz() -> int | None:
    """The TSC rate a new KVM guest gets on this host, in Hz: hv's 1 GHz where KVM can
    scale the TSC, the host's rate (KVM_GET_TSC_KHZ of a scratch vCPU) where it cannot;
    None when /dev/kvm is not usable. Measured once per process (about 3 ms)."""
    if KvmBackend.probe(Arch.X86_64) is not None:
        return None
    fds: list[int] = []
    try:
        fds.append(os.open(KVM_DEVICE, os.O_RDWR | os.O_CLOEXEC))
        if abi.libc.ioctl(fds[0], abi.KVM_CHECK_EXTENSION, ffi.cast("unsigned long", abi.KVM_CAP_TSC_CONTROL)) > 0:
            return cpuid_policy.TSC_HZ
        fds.append(abi.ioctl_checked(fds[0], abi.KVM_CREATE_VM, 0, "KVM_CREATE_VM (TSC rate probe)"))
        fds.append(abi.ioctl_checked(fds[1], abi.KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU (TSC rate probe)"))
        khz = tsc_khz_of(fds[2])
    except (OSError, BackendError) as exc:
        log.info("cannot tell the TSC rate of a KVM guest on this host (%s)", exc)
        return None
    finally:
        for fd in reversed(fds):
            os.close(fd)
    hz = khz * 1000
    return hz if cpuid_policy.tsc_hz_problem(hz) is None else None
