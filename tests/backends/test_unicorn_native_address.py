"""libunicorn calls hv's native hooks at the C functions themselves, not through cffi's
``_cffi_d_<name>`` wrappers (``ffi.addressof(lib, name)``), which add a call and a PLT jump
to every hook call (on aarch64 a block hook runs at every block)."""
from __future__ import annotations

import ctypes

import pytest

from hv_backends.unicorn_common import _native, native_function_address

HOOKS = ["hv_block_hook", "hv_poll_hook", "hv_write_hook", "hv_x86_intr_hook", "hv_x86_syscall_hook",
         "hv_x86_rdtsc_hook", "hv_x86_rdtscp_hook"]


@pytest.mark.parametrize("name", HOOKS)
def test_hook_address_is_the_c_function(name: str) -> None:
    native = _native()
    exported = ctypes.cast(getattr(ctypes.CDLL(native.__file__), name), ctypes.c_void_p).value
    wrapper = int(native.ffi.cast("uintptr_t", native.ffi.addressof(native.lib, name)))
    assert native_function_address(name) == exported
    assert exported != wrapper
