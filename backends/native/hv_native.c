/* Native hot hooks for hv's Unicorn backend.
 *
 * Python hooks are far too slow for per-block and per-store callbacks, so the block
 * hook (kick -> uc_emu_stop at a translation-block boundary) and the write hook (dirty
 * page bitmap in guest-physical RAM offset space) live here. libunicorn is not linked:
 * the addresses of uc_emu_stop and uc_reg_read are handed in at runtime.
 */
#include <stdint.h>
#include <string.h>

#define HV_PAGE_SHIFT 12
#define HV_MAX_REGIONS 16
#define HV_ARCH_X86_64 0
#define HV_ARCH_ARM64 1

/* Register ids of unicorn 2.1.4 (x86.h / arm64.h); checked against the Python
 * constants by the backend at start-up. */
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
    void *emu_stop;              /* uc_emu_stop */
    void *reg_read;              /* uc_reg_read */
    uint64_t blocks;             /* translation blocks entered */
    /* paging registers, read lazily once per block (mode_valid cleared per block) */
    int32_t mode_valid;
    uint64_t r0, r1, r2, r3;     /* x86: cr0 cr3 cr4 efer; arm64: sctlr tcr ttbr0 ttbr1 */
    /* one-entry translation cache, valid within a block */
    int32_t cache_valid;
    uint64_t cache_vpage;
    int64_t cache_ppage;         /* guest-physical page address, -1: no RAM write */
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
            if (page < vm->npages)
                __atomic_fetch_or(&vm->bitmap[page >> 3], (uint8_t)(1u << (page & 7)), __ATOMIC_RELAXED);
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
    c->mode_valid = 1;
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

/* UC_HOOK_BLOCK: the only place a kick stops the engine. */
void hv_block_hook(void *uc, uint64_t address, uint32_t size, void *user_data)
{
    struct hv_vcpu *c = (struct hv_vcpu *)user_data;
    (void)address;
    (void)size;
    c->blocks++;
    c->mode_valid = 0;
    c->cache_valid = 0;
    if (__atomic_load_n(&c->kick, __ATOMIC_ACQUIRE)) {
        c->stopped = 1;
        ((hv_emu_stop_fn)c->emu_stop)(uc);
    }
}

/* UC_HOOK_MEM_WRITE: mark the guest-physical pages a store touches. */
void hv_write_hook(void *uc, int type, uint64_t address, int size, int64_t value, void *user_data)
{
    struct hv_vcpu *c = (struct hv_vcpu *)user_data;
    struct hv_vm *vm = c->vm;
    (void)type;
    (void)value;
    if (!__atomic_load_n(&vm->dirty_enabled, __ATOMIC_RELAXED))
        return;
    if (size <= 0)
        size = 1;
    uint64_t first = address >> HV_PAGE_SHIFT;
    uint64_t last = (address + (uint64_t)size - 1) >> HV_PAGE_SHIFT;
    for (uint64_t vp = first; vp <= last; vp++) {
        uint64_t vpage = vp << HV_PAGE_SHIFT;
        int64_t ppage;
        if (c->cache_valid && c->cache_vpage == vpage) {
            ppage = c->cache_ppage;
        } else {
            uint64_t out = 0;
            int rc;
            if (!c->mode_valid)
                refresh_mode(uc, c);
            rc = (c->arch == HV_ARCH_X86_64) ? x86_translate(c, vpage, &out) : arm64_translate(c, vpage, &out);
            if (rc < 0) {
                mark_all(vm);
                return;
            }
            ppage = rc == 0 ? (int64_t)out : -1;
            c->cache_valid = 1;
            c->cache_vpage = vpage;
            c->cache_ppage = ppage;
        }
        if (ppage >= 0)
            mark_gpa_page(vm, (uint64_t)ppage);
    }
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
    c->cache_valid = 0;
    return (c->arch == HV_ARCH_X86_64) ? x86_translate(c, va, ppage) : arm64_translate(c, va, ppage);
}
