"""The parts of the Linux KVM ABI (``linux/kvm.h``, ``asm/kvm.h``, x86_64) hv uses.

Struct layouts are declared as a cffi ``cdef`` and used in ABI mode: no compiler is needed
at run time, cffi lays the structs out with the platform's C rules (natural alignment on
x86_64, which is what the kernel's uapi headers rely on). libc's ``ioctl`` and ``mmap`` are
called through cffi as well: such calls release the GIL, and a ``KVM_RUN`` interrupted by a
signal comes back as ``-1``/``EINTR`` instead of being retried the way Python's own
``fcntl.ioctl`` retries it (PEP 475) — which is how a kick gets a vCPU out of the kernel.

Ioctl numbers are computed from ``_IO``/``_IOR``/``_IOW``/``_IOWR`` with the struct sizes
below; ``tests/backends/test_kvm_abi.py`` checks them against the kernel's numeric values and, where
a compiler and the kernel headers exist, every field offset against the real headers.
"""
from __future__ import annotations

import os
from typing import Any

import cffi

from hv_backends.base import BackendError

CDEF = r"""
struct kvm_userspace_memory_region {
    uint32_t slot;
    uint32_t flags;
    uint64_t guest_phys_addr;
    uint64_t memory_size;
    uint64_t userspace_addr;
};

struct kvm_regs {
    uint64_t rax, rbx, rcx, rdx;
    uint64_t rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11;
    uint64_t r12, r13, r14, r15;
    uint64_t rip, rflags;
};

struct kvm_segment {
    uint64_t base;
    uint32_t limit;
    uint16_t selector;
    uint8_t type;
    uint8_t present, dpl, db, s, l, g, avl;
    uint8_t unusable;
    uint8_t padding;
};

struct kvm_dtable {
    uint64_t base;
    uint16_t limit;
    uint16_t padding[3];
};

struct kvm_sregs {
    struct kvm_segment cs, ds, es, fs, gs, ss;
    struct kvm_segment tr, ldt;
    struct kvm_dtable gdt, idt;
    uint64_t cr0, cr2, cr3, cr4, cr8;
    uint64_t efer;
    uint64_t apic_base;
    uint64_t interrupt_bitmap[4];
};

struct kvm_fpu {
    uint8_t fpr[8][16];
    uint16_t fcw;
    uint16_t fsw;
    uint8_t ftwx;
    uint8_t pad1;
    uint16_t last_opcode;
    uint64_t last_ip;
    uint64_t last_dp;
    uint8_t xmm[16][16];
    uint32_t mxcsr;
    uint32_t pad2;
};

struct kvm_msr_entry {
    uint32_t index;
    uint32_t reserved;
    uint64_t data;
};

struct kvm_msrs {
    uint32_t nmsrs;
    uint32_t pad;
    struct kvm_msr_entry entries[];
};

struct kvm_cpuid_entry2 {
    uint32_t function;
    uint32_t index;
    uint32_t flags;
    uint32_t eax;
    uint32_t ebx;
    uint32_t ecx;
    uint32_t edx;
    uint32_t padding[3];
};

struct kvm_cpuid2 {
    uint32_t nent;
    uint32_t padding;
    struct kvm_cpuid_entry2 entries[];
};

struct kvm_vcpu_events {
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t has_error_code;
        uint8_t pending;
        uint32_t error_code;
    } exception;
    struct {
        uint8_t injected;
        uint8_t nr;
        uint8_t soft;
        uint8_t shadow;
    } interrupt;
    struct {
        uint8_t injected;
        uint8_t pending;
        uint8_t masked;
        uint8_t pad;
    } nmi;
    uint32_t sipi_vector;
    uint32_t flags;
    struct {
        uint8_t smm;
        uint8_t pending;
        uint8_t smm_inside_nmi;
        uint8_t latched_init;
    } smi;
    struct {
        uint8_t pending;
    } triple_fault;
    uint8_t reserved[26];
    uint8_t exception_has_payload;
    uint64_t exception_payload;
};

struct kvm_xsave {
    uint32_t region[1024];
};

struct kvm_mp_state {
    uint32_t mp_state;
};

struct kvm_dirty_log {
    uint32_t slot;
    uint32_t padding1;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_clear_dirty_log {
    uint32_t slot;
    uint32_t num_pages;
    uint64_t first_page;
    union {
        void *dirty_bitmap;
        uint64_t padding2;
    };
};

struct kvm_enable_cap {
    uint32_t cap;
    uint32_t flags;
    uint64_t args[4];
    uint8_t pad[64];
};

struct kvm_interrupt {
    uint32_t irq;
};

struct kvm_run {
    uint8_t request_interrupt_window;
    uint8_t immediate_exit;
    uint8_t padding1[6];
    uint32_t exit_reason;
    uint8_t ready_for_interrupt_injection;
    uint8_t if_flag;
    uint16_t flags;
    uint64_t cr8;
    uint64_t apic_base;
    union {
        struct {
            uint64_t hardware_exit_reason;
        } hw;
        struct {
            uint64_t hardware_entry_failure_reason;
            uint32_t cpu;
        } fail_entry;
        struct {
            uint32_t exception;
            uint32_t error_code;
        } ex;
        struct {
            uint8_t direction;
            uint8_t size;
            uint16_t port;
            uint32_t count;
            uint64_t data_offset;
        } io;
        struct {
            uint64_t phys_addr;
            uint8_t data[8];
            uint32_t len;
            uint8_t is_write;
        } mmio;
        struct {
            uint32_t suberror;
            uint32_t ndata;
            uint64_t data[16];
        } internal;
        struct {
            uint32_t type;
            uint32_t ndata;
            union {
                uint64_t flags;
                uint64_t data[16];
            };
        } system_event;
        char padding[256];
    };
    uint64_t kvm_valid_regs;
    uint64_t kvm_dirty_regs;
    union {
        char padding[2048];
    } s;
};

int ioctl(int fd, unsigned long request, ...);
void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset);
int munmap(void *addr, size_t length);
"""

ffi = cffi.FFI()
ffi.cdef(CDEF)
CType = Any   # the type of ffi.typeof(...) objects (cffi ships no type information)
libc = ffi.dlopen(None)

# ---------------------------------------------------------------------------------------
# ioctl number encoding (asm-generic/ioctl.h)
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = 8
_IOC_SIZESHIFT = 16
_IOC_DIRSHIFT = 30
_IOC_NONE = 0
_IOC_WRITE = 1
_IOC_READ = 2
KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    if not 0 <= size < (1 << 14):
        raise ValueError(f"ioctl argument size {size} does not fit in 14 bits")
    return (direction << _IOC_DIRSHIFT) | (size << _IOC_SIZESHIFT) | (KVMIO << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT)


def _io(nr: int) -> int:
    return _ioc(_IOC_NONE, nr, 0)


def _ior(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ, nr, ffi.sizeof(ctype))


def _iow(nr: int, ctype: str) -> int:
    return _ioc(_IOC_WRITE, nr, ffi.sizeof(ctype))


def _iowr(nr: int, ctype: str) -> int:
    return _ioc(_IOC_READ | _IOC_WRITE, nr, ffi.sizeof(ctype))


# system ioctls (on /dev/kvm)
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_GET_SUPPORTED_CPUID = _iowr(0x05, "struct kvm_cpuid2")
# VM ioctls
KVM_CREATE_VCPU = _io(0x41)
KVM_GET_DIRTY_LOG = _iow(0x42, "struct kvm_dirty_log")
KVM_SET_USER_MEMORY_REGION = _iow(0x46, "struct kvm_userspace_memory_region")
KVM_SET_TSS_ADDR = _io(0x47)
KVM_SET_IDENTITY_MAP_ADDR = _iow(0x48, "uint64_t")
KVM_ENABLE_CAP = _iow(0xA3, "struct kvm_enable_cap")
KVM_CLEAR_DIRTY_LOG = _iowr(0xC0, "struct kvm_clear_dirty_log")
# vCPU ioctls
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, "struct kvm_regs")
KVM_SET_REGS = _iow(0x82, "struct kvm_regs")
KVM_GET_SREGS = _ior(0x83, "struct kvm_sregs")
KVM_SET_SREGS = _iow(0x84, "struct kvm_sregs")
KVM_INTERRUPT = _iow(0x86, "struct kvm_interrupt")
KVM_GET_MSRS = _iowr(0x88, "struct kvm_msrs")
KVM_SET_MSRS = _iow(0x89, "struct kvm_msrs")
KVM_GET_FPU = _ior(0x8C, "struct kvm_fpu")
KVM_SET_FPU = _iow(0x8D, "struct kvm_fpu")
KVM_SET_CPUID2 = _iow(0x90, "struct kvm_cpuid2")
KVM_GET_CPUID2 = _iowr(0x91, "struct kvm_cpuid2")
KVM_GET_MP_STATE = _ior(0x98, "struct kvm_mp_state")
KVM_SET_MP_STATE = _iow(0x99, "struct kvm_mp_state")
KVM_GET_VCPU_EVENTS = _ior(0x9F, "struct kvm_vcpu_events")
KVM_SET_VCPU_EVENTS = _iow(0xA0, "struct kvm_vcpu_events")
KVM_SET_TSC_KHZ = _io(0xA2)
KVM_GET_TSC_KHZ = _io(0xA3)
KVM_GET_XSAVE = _ior(0xA4, "struct kvm_xsave")
KVM_SET_XSAVE = _iow(0xA5, "struct kvm_xsave")

KVM_API_VERSION = 12

# capabilities (KVM_CHECK_EXTENSION)
KVM_CAP_USER_MEMORY = 3
KVM_CAP_SET_TSS_ADDR = 4
KVM_CAP_EXT_CPUID = 7
KVM_CAP_NR_MEMSLOTS = 10
KVM_CAP_MP_STATE = 14
KVM_CAP_SET_IDENTITY_MAP_ADDR = 37
KVM_CAP_VCPU_EVENTS = 41
KVM_CAP_TSC_CONTROL = 60
KVM_CAP_GET_TSC_KHZ = 61
KVM_CAP_XSAVE = 55
KVM_CAP_IMMEDIATE_EXIT = 136
KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 = 168

KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE = 1 << 0
KVM_DIRTY_LOG_INITIALLY_SET = 1 << 1

# kvm_run.exit_reason
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_SYSTEM_EVENT = 24
EXIT_REASON_NAMES: dict[int, str] = {
    0: "UNKNOWN", 1: "EXCEPTION", 2: "IO", 3: "HYPERCALL", 4: "DEBUG", 5: "HLT", 6: "MMIO",
    7: "IRQ_WINDOW_OPEN", 8: "SHUTDOWN", 9: "FAIL_ENTRY", 10: "INTR", 11: "SET_TPR",
    12: "TPR_ACCESS", 16: "NMI", 17: "INTERNAL_ERROR", 21: "WATCHDOG", 24: "SYSTEM_EVENT",
    26: "IOAPIC_EOI", 29: "X86_RDMSR", 30: "X86_WRMSR", 31: "DIRTY_RING_FULL",
    33: "X86_BUS_LOCK", 37: "NOTIFY",
}

KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

KVM_SYSTEM_EVENT_SHUTDOWN = 1
KVM_SYSTEM_EVENT_RESET = 2
KVM_SYSTEM_EVENT_CRASH = 3

KVM_INTERNAL_ERROR_NAMES: dict[int, str] = {
    1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON",
}

KVM_MP_STATE_RUNNABLE = 0
KVM_MP_STATE_HALTED = 3

KVM_VCPUEVENT_VALID_NMI_PENDING = 0x1
KVM_VCPUEVENT_VALID_SIPI_VECTOR = 0x2
KVM_VCPUEVENT_VALID_SHADOW = 0x4

MSR_IA32_TSC = 0x10

# The fields of each struct the backend reads or writes, for the layout test.
USED_FIELDS: dict[str, tuple[str, ...]] = {
    "kvm_userspace_memory_region": ("slot", "flags", "guest_phys_addr", "memory_size", "userspace_addr"),
    "kvm_regs": ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11",
                 "r12", "r13", "r14", "r15", "rip", "rflags"),
    "kvm_segment": ("base", "limit", "selector", "type", "present", "dpl", "db", "s", "l", "g", "avl",
                    "unusable"),
    "kvm_dtable": ("base", "limit"),
    "kvm_sregs": ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt", "gdt", "idt", "cr0", "cr2", "cr3",
                  "cr4", "cr8", "efer", "apic_base", "interrupt_bitmap"),
    "kvm_fpu": ("fpr", "fcw", "fsw", "ftwx", "last_opcode", "last_ip", "last_dp", "xmm", "mxcsr"),
    "kvm_msr_entry": ("index", "data"),
    "kvm_msrs": ("nmsrs", "entries"),
    "kvm_cpuid_entry2": ("function", "index", "flags", "eax", "ebx", "ecx", "edx"),
    "kvm_cpuid2": ("nent", "entries"),
    "kvm_vcpu_events": ("exception", "interrupt", "nmi", "sipi_vector", "flags", "smi", "triple_fault",
                        "exception_has_payload", "exception_payload"),
    "kvm_xsave": ("region",),
    "kvm_mp_state": ("mp_state",),
    "kvm_dirty_log": ("slot", "dirty_bitmap"),
    "kvm_clear_dirty_log": ("slot", "num_pages", "first_page", "dirty_bitmap"),
    "kvm_enable_cap": ("cap", "flags", "args"),
    "kvm_interrupt": ("irq",),
    "kvm_run": ("request_interrupt_window", "immediate_exit", "exit_reason",
                "ready_for_interrupt_injection", "if_flag", "flags", "cr8", "apic_base",
                "kvm_valid_regs", "kvm_dirty_regs", "s"),
}
# Union members of kvm_run, as "member.field": checked as offsetof(struct kvm_run, member.field).
KVM_RUN_UNION_FIELDS: tuple[str, ...] = (
    "hw.hardware_exit_reason", "fail_entry.hardware_entry_failure_reason", "fail_entry.cpu",
    "ex.exception", "ex.error_code",
    "io.direction", "io.size", "io.port", "io.count", "io.data_offset",
    "mmio.phys_addr", "mmio.data", "mmio.len", "mmio.is_write",
    "internal.suberror", "internal.ndata", "internal.data",
    "system_event.type", "system_event.ndata", "system_event.flags", "system_event.data",
)


def offsetof(struct: str, path: str) -> int:
    """Offset of a (possibly dotted) field path in ``struct <struct>``, per this cdef."""
    ctype = ffi.typeof(f"struct {struct}")
    total = 0
    for part in path.split("."):
        fields = dict(_flatten_fields(ctype))
        if part not in fields:
            raise KeyError(f"struct {struct}: no field {path!r}")
        offset, ctype = fields[part]
        total += offset
    return total


def _flatten_fields(ctype: CType) -> list[tuple[str, tuple[int, CType]]]:
    """Fields of a struct/union, with anonymous unions/structs flattened into it."""
    out: list[tuple[str, tuple[int, CType]]] = []
    for name, field in ctype.fields:
        if name is None or name == "":
            out.extend((n, (field.offset + o, t)) for n, (o, t) in _flatten_fields(field.type))
        else:
            out.append((name, (field.offset, field.type)))
    return out


def preparse(*cdecls: str) -> None:
    """Have cffi parse the C type strings ``cdecls`` now. In ABI mode cffi parses a type
    string with pycparser the first time it meets it (0.2-0.4 ms each here) and caches
    it; a module lists the strings of its migration-time calls so that the first save
    (source, guest paused), restore (destination, before the guest may run) and dirty
    log take do not pay that inside the switch-over (a fresh ``-incoming`` hv parsed
    four in its restore: 1.6 ms of its 2.3)."""
    for cdecl in cdecls:
        ffi.typeof(cdecl)


def errno_text(err: int) -> str:
    return os.strerror(err) if err else "unknown error"


def ioctl_checked(fd: int, request: int, arg: Any, what: str) -> int:
    """ioctl through libc; ``arg`` is a cdata pointer or an int. Raises BackendError
    naming ``what`` and the errno."""
    if isinstance(arg, int):
        arg = ffi.cast("unsigned long", arg)
    result = libc.ioctl(fd, request, arg)
    if result < 0:
        err = ffi.errno
        raise BackendError(f"{what}: {errno_text(err)} (errno {err})")
    return result
