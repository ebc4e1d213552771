"""cffi build script of ``hv_backends._hv_native`` (the Unicorn backend's hot hooks).

Built by setuptools through ``cffi_modules`` in setup.py during ``pip install -e .``;
needs a C compiler. The module does not link against libunicorn: the backend passes the
addresses of ``uc_emu_stop`` and ``uc_reg_read`` at runtime.
"""
from __future__ import annotations

import re
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
struct hv_region { uint64_t gpa; uint64_t size; uint64_t ram_offset; uint8_t *host; };
struct hv_vm {
    uint8_t *bitmap; uint64_t npages; int nregions; struct hv_region regions[16];
    volatile int32_t dirty_enabled; uint64_t conservative_marks;
};
struct hv_vcpu {
    struct hv_vm *vm; int32_t arch; volatile int32_t kick; volatile int32_t stopped; volatile int32_t service;
    void *emu_stop; void *reg_read; uint64_t blocks;
    uint64_t r0, r1, r2, r3;
    volatile int32_t irq_window; uint64_t window_exits;
    volatile uint32_t tlb_req; volatile uint32_t tlb_done; volatile int32_t in_engine; void *ctl;
    volatile uint64_t deadline_ns; uint64_t deadline_exits;
};
void hv_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data);
void hv_write_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data);
void hv_take_dirty(struct hv_vm *vm, uint8_t *out);
int hv_translate(void *uc, struct hv_vcpu *c, uint64_t va, uint64_t *ppage);
"""

# hv_native.c first (the per-architecture hv_native_*.c files use its definitions); each
# of those declares what Python sees of it between "CDEF-BEGIN" and "CDEF-END" lines.
SOURCE = "\n".join(path.read_text() for path in sorted(HERE.glob("hv_native*.c")))
CDEF += "".join(re.findall(r"CDEF-BEGIN\n(.*?)CDEF-END", SOURCE, re.S))

ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("hv_backends._hv_native", SOURCE, extra_compile_args=["-O2"])

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
