/* Native hot hooks for hv's Unicorn backend.
 *
 * Python hooks are far too slow for per-block and per-store callbacks, so the block
 * hook (kick -> uc_emu_stop at a translation-block boundary) and the write hook (dirty
 * page bitmap in guest-physical RAM offset space) live here, with guest page-table
 * walkers (x86_64 4-level incl. 2M/1G pages, 32-bit and PAE; aarch64 4K granule). libunicorn is not linked:
 * the addresses of uc_emu_stop and uc_reg_read are handed in at runtime.
 */
#include <stdint.h>
#include <string.h>
#include <time.h>

#define HV_PAGE_SHIFT 12
#define HV_MAX_REGIONS 16
#define HV_ARCH_X86_64 0
#define HV_ARCH_ARM64 1

/* Register ids of unicorn 2.1.4 (x86.h / arm64.h); checked against the Python
 * constants by the backend at start-up. */
#define UCX_EFLAGS 25
#define UCA_PSTATE 265
#define UCX_CR0 50
#define UCX_CR3 53
#define UCX_CR4 54
#define UCX_MSR 248
#define UCA_TTBR0 274
#define UCA_TTBR1 275
#define UCA_CP_REG 290

typedef int (*hv_emu_stop_fn)(void *uc);
typedef int (*hv_reg_read_fn)(void *uc, int regid, void *value);

struct hv_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t ram_offset;
    uint8_t *host;
};

struct hv_vm {
    uint8_t *bitmap;          /* one bit per page of RAM offset space */
    uint64_t npages;
    int nregions;
    struct hv_region regions[HV_MAX_REGIONS];
    volatile int32_t dirty_enabled;
    uint64_t conservative_marks; /* times the whole bitmap was set */
};

struct hv_vcpu {
    struct hv_vm *vm;
    int32_t arch;
    volatile int32_t kick;       /* set by Vcpu.kick(), consumed by run() */
    volatile int32_t stopped;    /* the block hook called uc_emu_stop */
    volatile int32_t service;    /* stop for backend housekeeping (not a kick) */
    void *emu_stop;              /* uc_emu_stop */
    void *reg_read;              /* uc_reg_read */
    uint64_t blocks;             /* translation blocks entered */
    /* paging registers, read by refresh_mode() before a walk */
    uint64_t r0, r1, r2, r3;     /* x86: cr0 cr3 cr4 efer; arm64: sctlr tcr ttbr0 ttbr1 */
    volatile int32_t irq_window; /* 1: stop (as a kick) once the guest unmasks interrupts;
                                    2: the same after one block (an x86 interrupt shadow) */
    uint64_t window_exits;       /* times the interrupt window stopped the engine */
    /* aarch64 SMP: TLB flushes other vCPUs' broadcast TLBIs asked of this one (a count),
       the count done, whether this vCPU is inside emu_start, and uc_ctl (hv_native_arm64.c) */
    volatile uint32_t tlb_req;
    volatile uint32_t tlb_done;
    volatile int32_t in_engine;
    void *ctl;
    /* host CLOCK_MONOTONIC ns at which the block hook kicks this vCPU itself (the
       machine's next timer expiry; 0: none), looked at every HV_DEADLINE_BLOCKS blocks */
    volatile uint64_t deadline_ns;
    uint64_t deadline_exits;
};

struct uc_x86_msr_s { uint32_t rid; uint64_t value; };
struct uc_arm64_cp_reg_s { uint32_t crn, crm, op0, op1, op2; uint64_t val; };

static void mark_all(struct hv_vm *vm)
{
    uint64_t nbytes = (vm->npages + 7) / 8;
    for (uint64_t i = 0; i < nbytes; i++)
        __atomic_store_n(&vm->bitmap[i], 0xFF, __ATOMIC_RELAXED);
    vm->conservative_marks++;
}

/* Host pointer of 8 readable bytes at guest-physical gpa, or NULL outside RAM. */
static uint8_t *gpa_host(struct hv_vm *vm, uint64_t gpa)
{
    for (int i = 0; i < vm->nregions; i++) {
        struct hv_region *r = &vm->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa + 8 <= r->size)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

static int read_phys64(struct hv_vm *vm, uint64_t gpa, uint64_t *out)
{
    uint8_t *p = gpa_host(vm, gpa);
    if (!p)
        return -1;
    memcpy(out, p, 8);
    return 0;
}

static int read_phys32(struct hv_vm *vm, uint64_t gpa, uint32_t *out)
{
    uint8_t *p = gpa_host(vm, gpa);
    if (!p)
        return -1;
    memcpy(out, p, 4);
    return 0;
}

static void mark_gpa_page(struct hv_vm *vm, uint64_t gpa)
{
    for (int i = 0; i < vm->nregions; i++) {
        struct hv_region *r = &vm->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa < r->size) {
            uint64_t page = (r->ram_offset + (gpa - r->gpa)) >> HV_PAGE_SHIFT;
            if (page < vm->npages) {
                uint8_t bit = (uint8_t)(1u << (page & 7));
                /* plain read first: most stores hit a page that is already marked */
                if (!(__atomic_load_n(&vm->bitmap[page >> 3], __ATOMIC_RELAXED) & bit))
                    __atomic_fetch_or(&vm->bitmap[page >> 3], bit, __ATOMIC_RELAXED);
            }
            return;
        }
    }
    /* not RAM (MMIO): nothing to mark */
}

static void refresh_mode(void *uc, struct hv_vcpu *c)
{
    if (c->arch == HV_ARCH_X86_64) {
        struct uc_x86_msr_s msr = { 0xC0000080u, 0 };
        c->r0 = c->r1 = c->r2 = 0;
        ((hv_reg_read_fn)c->reg_read)(uc, UCX_CR0, &c->r0);
        ((hv_reg_read_fn)c->reg_read)(uc, UCX_CR3, &c->r1);
        ((hv_reg_read_fn)c->reg_read)(uc, UCX_CR4, &c->r2);
        ((hv_reg_read_fn)c->reg_read)(uc, UCX_MSR, &msr);
        c->r3 = msr.value;
    } else {
        struct uc_arm64_cp_reg_s sctlr = { 1, 0, 3, 0, 0, 0 };
        struct uc_arm64_cp_reg_s tcr = { 2, 0, 3, 0, 2, 0 };
        ((hv_reg_read_fn)c->reg_read)(uc, UCA_CP_REG, &sctlr);
        ((hv_reg_read_fn)c->reg_read)(uc, UCA_CP_REG, &tcr);
        c->r0 = sctlr.val;
        c->r1 = tcr.val;
        c->r2 = c->r3 = 0;
        ((hv_reg_read_fn)c->reg_read)(uc, UCA_TTBR0, &c->r2);
        ((hv_reg_read_fn)c->reg_read)(uc, UCA_TTBR1, &c->r3);
    }
}

/* Translate a virtual page. Returns 0 and *ppage (page address) on success, 1 when the
 * page is not mapped (the store will fault and write nothing), -1 when it cannot tell. */
static int x86_translate(struct hv_vcpu *c, uint64_t va, uint64_t *ppage)
{
    struct hv_vm *vm = c->vm;
    uint64_t cr0 = c->r0, cr3 = c->r1, cr4 = c->r2, efer = c->r3;
    const uint64_t addr_mask = 0x000FFFFFFFFFF000ull;
    if (!(cr0 & (1ull << 31))) {
        *ppage = va & 0xFFFFFFFFFFFFF000ull;
        if (!(efer & (1ull << 10)))
            *ppage &= 0xFFFFF000ull;
        return 0;
    }
    if (!(cr4 & (1ull << 5))) {
        /* 32-bit paging */
        uint32_t pde, pte;
        uint64_t v = va & 0xFFFFFFFFull;
        if (read_phys32(vm, (cr3 & 0xFFFFF000ull) + ((v >> 22) << 2), &pde))
            return -1;
        if (!(pde & 1))
            return 1;
        if ((pde & 0x80) && (cr4 & (1ull << 4))) {
            *ppage = ((uint64_t)(pde & 0xFFC00000u) | (((uint64_t)(pde >> 13) & 0xFF) << 32)) + (v & 0x3FF000);
            return 0;
        }
        if (read_phys32(vm, (pde & 0xFFFFF000u) + (((v >> 12) & 0x3FF) << 2), &pte))
            return -1;
        if (!(pte & 1))
            return 1;
        *ppage = pte & 0xFFFFF000u;
        return 0;
    }
    uint64_t entry, table;
    int level;
    if (efer & (1ull << 10)) {
        if (cr4 & (1ull << 12))
            return -1; /* LA57: not supported, be conservative */
        table = cr3 & addr_mask;
        level = 4;
    } else {
        uint64_t v = va & 0xFFFFFFFFull;
        if (read_phys64(vm, (cr3 & 0xFFFFFFE0ull) + ((v >> 30) << 3), &entry))
            return -1;
        if (!(entry & 1))
            return 1;
        table = entry & addr_mask;
        level = 2;
        va = v;
    }
    for (; level >= 1; level--) {
        unsigned shift = 12 + 9 * (level - 1);
        if (read_phys64(vm, table + (((va >> shift) & 0x1FF) << 3), &entry))
            return -1;
        if (!(entry & 1))
            return 1;
        if (level == 1) {
            *ppage = entry & addr_mask;
            return 0;
        }
        if ((level == 2 || level == 3) && (entry & 0x80)) {
            uint64_t span = 1ull << shift;
            *ppage = ((entry & addr_mask) & ~(span - 1)) + (va & (span - 1) & ~0xFFFull);
            return 0;
        }
        table = entry & addr_mask;
    }
    return -1;
}

static int arm64_translate(struct hv_vcpu *c, uint64_t va, uint64_t *ppage)
{
    struct hv_vm *vm = c->vm;
    uint64_t sctlr = c->r0, tcr = c->r1;
    const uint64_t oa_mask = 0x0000FFFFFFFFF000ull;
    if (!(sctlr & 1)) {
        *ppage = va & oa_mask;
        return 0;
    }
    int upper = (va >> 55) & 1;
    unsigned txsz = upper ? (unsigned)((tcr >> 16) & 0x3F) : (unsigned)(tcr & 0x3F);
    unsigned tg = upper ? (unsigned)((tcr >> 30) & 3) : (unsigned)((tcr >> 14) & 3);
    int granule4k = upper ? (tg == 2) : (tg == 0);
    if (!granule4k || txsz < 16 || txsz > 39)
        return -1;
    unsigned inputsize = 64 - txsz;
    uint64_t table = (upper ? c->r3 : c->r2) & oa_mask;
    int level = 4 - (int)((inputsize - 12 + 8) / 9);
    for (; level <= 3; level++) {
        unsigned shift = 12 + 9 * (3 - level);
        unsigned bits = (level == 4 - (int)((inputsize - 12 + 8) / 9)) ? (inputsize - shift) : 9;
        uint64_t index = (va >> shift) & ((1ull << bits) - 1);
        uint64_t desc;
        if (read_phys64(vm, table + index * 8, &desc))
            return -1;
        if (!(desc & 1))
            return 1;
        if (level == 3) {
            if (!(desc & 2))
                return 1;
            *ppage = desc & oa_mask;
            return 0;
        }
        if (!(desc & 2)) {
            if (level == 0)
                return 1;
            uint64_t span = 1ull << shift;
            *ppage = ((desc & oa_mask) & ~(span - 1)) + (va & (span - 1) & ~0xFFFull);
            return 0;
        }
        table = desc & oa_mask;
    }
    return -1;
}

/* -- page-crossing stores ---------------------------------------------------------
 * Unicorn 2.1.4 reports a store at its guest-PHYSICAL address (the TLB entry's paddr),
 * once, for the first page; a store that crosses into the next virtual page is then
 * completed byte by byte with hooks disabled, so its second page is never reported. We
 * find it exactly: every virtual page that maps the first physical page is enumerated
 * from the live page tables, and the physical page behind each one's successor is
 * marked. When that cannot be done, every page is marked. */

#define HV_SCAN_BUDGET (1u << 22)

struct scan {
    struct hv_vcpu *c;
    uint64_t target;      /* physical page address of the first page */
    uint64_t visited;
    int failed;
};

static void mark_successor(struct scan *s, uint64_t va)
{
    uint64_t next = 0;
    int rc = (s->c->arch == HV_ARCH_X86_64) ? x86_translate(s->c, va + 4096, &next)
                                             : arm64_translate(s->c, va + 4096, &next);
    if (rc < 0)
        s->failed = 1;
    else if (rc == 0)
        mark_gpa_page(s->c->vm, next);
    /* rc == 1: the second page is unmapped, so the store faulted before writing */
}

static void x86_scan(struct scan *s, uint64_t table, int level, uint64_t vbase)
{
    const uint64_t addr_mask = 0x000FFFFFFFFFF000ull;
    unsigned shift = 12 + 9 * (level - 1);
    for (uint64_t i = 0; i < 512 && !s->failed; i++) {
        uint64_t e;
        if (++s->visited > HV_SCAN_BUDGET || read_phys64(s->c->vm, table + i * 8, &e)) {
            s->failed = 1;
            return;
        }
        if (!(e & 1))
            continue;
        uint64_t va = vbase + (i << shift);
        if (level == 4 && i >= 256)
            va |= 0xFFFF000000000000ull;
        if (level == 1 || ((level == 2 || level == 3) && (e & 0x80))) {
            uint64_t span = 1ull << shift;
            uint64_t base = (e & addr_mask) & ~(span - 1);
            if (s->target >= base && s->target - base < span)
                mark_successor(s, va + (s->target - base));
        } else if (level > 1) {
            x86_scan(s, e & addr_mask, level - 1, va);
        }
    }
}

static void arm64_scan(struct scan *s, uint64_t table, int level, unsigned bits, uint64_t vbase)
{
    const uint64_t oa_mask = 0x0000FFFFFFFFF000ull;
    unsigned shift = 12 + 9 * (3 - level);
    uint64_t entries = 1ull << bits;
    for (uint64_t i = 0; i < entries && !s->failed; i++) {
        uint64_t d;
        if (++s->visited > HV_SCAN_BUDGET || read_phys64(s->c->vm, table + i * 8, &d)) {
            s->failed = 1;
            return;
        }
        if (!(d & 1))
            continue;
        uint64_t va = vbase + (i << shift);
        int leaf = (level == 3) ? 1 : !(d & 2);
        if (level == 3 && !(d & 2))
            continue;
        if (level == 0 && leaf)
            continue;
        if (leaf) {
            uint64_t span = 1ull << shift;
            uint64_t base = (d & oa_mask) & ~(span - 1);
            if (s->target >= base && s->target - base < span)
                mark_successor(s, va + (s->target - base));
        } else {
            arm64_scan(s, d & oa_mask, level + 1, 9, va);
        }
    }
}

static void cross_page(void *uc, struct hv_vcpu *c, uint64_t first_page)
{
    struct scan s = { c, first_page, 0, 0 };
    refresh_mode(uc, c);
    if (c->arch == HV_ARCH_X86_64) {
        uint64_t cr0 = c->r0, cr4 = c->r2, efer = c->r3;
        if (!(cr0 & (1ull << 31))) {
            mark_gpa_page(c->vm, first_page + 4096);
            return;
        }
        if (!(efer & (1ull << 10)) || !(cr4 & (1ull << 5)) || (cr4 & (1ull << 12))) {
            mark_all(c->vm); /* legacy / PAE / LA57 paging: not enumerated */
            return;
        }
        x86_scan(&s, c->r1 & 0x000FFFFFFFFFF000ull, 4, 0);
    } else {
        uint64_t sctlr = c->r0, tcr = c->r1;
        if (!(sctlr & 1)) {
            mark_gpa_page(c->vm, first_page + 4096);
            return;
        }
        for (int upper = 0; upper < 2 && !s.failed; upper++) {
            unsigned txsz = upper ? (unsigned)((tcr >> 16) & 0x3F) : (unsigned)(tcr & 0x3F);
            unsigned tg = upper ? (unsigned)((tcr >> 30) & 3) : (unsigned)((tcr >> 14) & 3);
            int epd = upper ? (int)((tcr >> 23) & 1) : (int)((tcr >> 7) & 1);
            if (epd)
                continue;
            if (!(upper ? (tg == 2) : (tg == 0)) || txsz < 16 || txsz > 39) {
                s.failed = 1;
                break;
            }
            unsigned inputsize = 64 - txsz;
            int level = 4 - (int)((inputsize - 12 + 8) / 9);
            unsigned shift = 12 + 9 * (3 - level);
            uint64_t vbase = upper ? (~0ull << inputsize) : 0;
            arm64_scan(&s, (upper ? c->r3 : c->r2) & 0x0000FFFFFFFFF000ull, level, inputsize - shift, vbase);
        }
    }
    if (s.failed)
        mark_all(c->vm);
}

/* Whether the guest accepts interrupts now: x86 RFLAGS.IF set, aarch64 PSTATE.I clear.
 * Instructions that unmask (sti, popf, iret; msr daifclr / daif, eret) end their
 * translation block, so the next block hook sees the new state. */
static int irqs_unmasked(void *uc, struct hv_vcpu *c)
{
    uint64_t flags = 0;
    if (c->arch == 0) {
        ((hv_reg_read_fn)c->reg_read)(uc, UCX_EFLAGS, &flags);
        return (flags & (1u << 9)) != 0;
    }
    ((hv_reg_read_fn)c->reg_read)(uc, UCA_PSTATE, &flags);
    return (flags & (1u << 7)) == 0;
}

/* uc_ctl(uc, UC_CTL_WRITE(UC_CTL_TLB_FLUSH, 0)) of unicorn 2.1.4 */
#define HV_UC_CTL_TLB_FLUSH_WRITE ((11u) | (1u << 30))
typedef int (*hv_ctl_fn)(void *uc, uint32_t control, ...);

/* Do the TLB flushes other vCPUs asked for (aarch64 TLBI ...IS is broadcast: see
 * hv_native_arm64.c) on this vCPU's own engine, and say so. */
static void hv_tlb_catch_up(void *uc, struct hv_vcpu *c)
{
    uint32_t req = __atomic_load_n(&c->tlb_req, __ATOMIC_ACQUIRE);
    if (c->ctl)
        ((hv_ctl_fn)c->ctl)(uc, HV_UC_CTL_TLB_FLUSH_WRITE);
    __atomic_store_n(&c->tlb_done, req, __ATOMIC_RELEASE);
}

/* Host CLOCK_MONOTONIC in ns: the clock of kicks' deadlines, the TSC and the counter. */
static uint64_t hv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

#define HV_DEADLINE_BLOCKS 512   /* about 30 us of guest code between two clock reads */

/* The vCPU's own timer deadline passed: a kick, as the timer thread would have sent. */
static void hv_check_deadline(struct hv_vcpu *c)
{
    uint64_t now = hv_now_ns();
    if (now >= c->deadline_ns) {
        c->deadline_ns = 0;
        c->deadline_exits++;
        __atomic_store_n(&c->kick, 1, __ATOMIC_RELEASE);
    }
}

/* CDEF-BEGIN
void hv_poll_hook(void *uc, void *user_data);
CDEF-END */

/* The only place a kick (or a housekeeping request) stops the engine. An armed interrupt
 * window (an interrupt is pending but the guest masks it) turns into a kick at the first
 * block boundary where the guest has unmasked: Unicorn's interrupt-window exit. */
static void hv_block_check(void *uc, struct hv_vcpu *c)
{
    c->blocks++;
    if (__atomic_load_n(&c->tlb_req, __ATOMIC_ACQUIRE) != c->tlb_done)
        hv_tlb_catch_up(uc, c);
    if (c->deadline_ns && (c->blocks % HV_DEADLINE_BLOCKS) == 0)
        hv_check_deadline(c);
    int32_t window = __atomic_load_n(&c->irq_window, __ATOMIC_ACQUIRE);
    if (window == 2) {
        /* This block is the one instruction under the shadow (QEMU translates it alone). */
        __atomic_store_n(&c->irq_window, 1, __ATOMIC_RELEASE);
    } else if (window == 1 && irqs_unmasked(uc, c)) {
        __atomic_store_n(&c->irq_window, 0, __ATOMIC_RELEASE);
        __atomic_store_n(&c->kick, 1, __ATOMIC_RELEASE);
        c->window_exits++;
    }
    if (__atomic_load_n(&c->kick, __ATOMIC_ACQUIRE) || __atomic_load_n(&c->service, __ATOMIC_ACQUIRE)) {
        c->stopped = 1;
        ((hv_emu_stop_fn)c->emu_stop)(uc);
    }
}

/* UC_HOOK_BLOCK: the check at every translation-block start. */
void hv_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    (void)address;
    (void)size;
    hv_block_check(uc, (struct hv_vcpu *)user_data);
}

/* hv's libunicorn (hv_uc_set_poll): the same check, made only where the engine enters
 * its execution loop (emulation start, blocks that do not chain on, and after a poke
 * from the thread that sets kick/service), instead of at every block start. Enough for
 * the interrupt window on x86: the instructions that set IF (sti, popf, iret, sysret)
 * and the one-instruction block under an interrupt shadow all end without chaining, as
 * QEMU's own interrupt check needs (target/i386/translate.c gen_eob). */
void hv_poll_hook(void *uc, void *user_data)
{
    hv_block_check(uc, (struct hv_vcpu *)user_data);
}

/* UC_HOOK_MEM_WRITE: Unicorn 2.1.4 passes the guest-physical address of the store. */
void hv_write_hook(void *uc, int type, uint64_t paddr, int size, int64_t value, void *user_data)
{
    struct hv_vcpu *c = (struct hv_vcpu *)user_data;
    struct hv_vm *vm = c->vm;
    (void)type;
    (void)value;
    if (!__atomic_load_n(&vm->dirty_enabled, __ATOMIC_RELAXED))
        return;
    mark_gpa_page(vm, paddr);
    if (size > 1 && (paddr & 0xFFF) + (uint64_t)size > 4096)
        cross_page(uc, c, paddr & ~0xFFFull);
}

/* Copy the bitmap into out and clear it, word by word, atomically against the hook. */
void hv_take_dirty(struct hv_vm *vm, uint8_t *out)
{
    uint64_t nbytes = (vm->npages + 7) / 8;
    for (uint64_t i = 0; i < nbytes; i++)
        out[i] = __atomic_exchange_n(&vm->bitmap[i], 0, __ATOMIC_ACQ_REL);
}

/* Test helper: translate va with the registers of the current mode (refreshed). */
int hv_translate(void *uc, struct hv_vcpu *c, uint64_t va, uint64_t *ppage)
{
    refresh_mode(uc, c);
    return (c->arch == HV_ARCH_X86_64) ? x86_translate(c, va, ppage) : arm64_translate(c, va, ppage);
}
