/* Native x86_64 event delivery for hv's Unicorn backend (compiled after hv_native.c, in
 * the same translation unit: it uses struct hv_vcpu, gpa_host, mark_gpa_page and
 * x86_translate from there).
 *
 * Unicorn 2.1.4 does not deliver exceptions or `int n` through the guest IDT, and SYSCALL
 * only calls a hook. Doing that in Python costs ~0.6 ms an event (the whole CPU state is
 * captured and reloaded); Linux takes thousands per boot and one per system call. Here the
 * common cases are done inside the hooks, without stopping the engine:
 *
 *  - hv_x86_intr_hook (UC_HOOK_INTR): a 64-bit IDT delivery (interrupt/trap gate, 64-bit
 *    code segment, stack switch through TSS.RSP0..2 or an IST slot), the same checks and
 *    the same frame as the Python X86Delivery. The CS/SS descriptor caches, hflags and
 *    old_exception are written in the engine's saved context (uc_context_save, edit,
 *    uc_context_restore: two 5.6 KB copies), RFLAGS through uc_reg_write.
 *  - hv_x86_syscall_hook (UC_HOOK_INSN SYSCALL): RCX/R11, CS/SS from STAR, RIP = LSTAR,
 *    RFLAGS &= ~SFMASK. Unicorn adds the instruction's length to RIP after the hook, so
 *    the hook stores LSTAR minus that length (decoded from the instruction bytes).
 *  - hv_x86_rdtsc_hook (UC_HOOK_INSN RDTSC): the vCPU's virtual TSC, tsc_base + (host
 *    CLOCK_MONOTONIC - tsc_ns0) * tsc_mult / 2^32 while tsc_running: Python sets these
 *    from the machine's guest clock at every run (tsc_mult = the guest's TSC Hz * 2^32 /
 *    10^9: exactly 2^32, one tick per guest ns, at 1 GHz), and reads tsc_last afterwards.
 *  - hv_x86_rdtscp_hook (UC_HOOK_INSN RDTSCP): the same TSC, ECX = IA32_TSC_AUX.
 *  - hv_x86_inject: an external interrupt from the VMM (Python), same delivery.
 *
 * Whenever the delivery would itself fault (missing gate, bad selector, unmapped stack,
 * short TSS ...) or the case is not one handled here (legacy/compatibility mode, task
 * gates), nothing is changed and the event goes to Python (hv_x86_py_intr /
 * hv_x86_py_syscall), which records it, stops the engine and delivers it with the
 * double/triple-fault escalation as before. With `native` = 0 everything goes to Python.
 *
 * libunicorn is not linked: uc_reg_write, uc_context_save/restore come in as pointers.
 */

/* CDEF-BEGIN
struct hv_x86 {
    struct hv_vcpu *vcpu; void *reg_write; void *context_save; void *context_restore; void *context;
    void *py; int32_t native; int32_t tsc_running; uint64_t tsc_base; uint64_t tsc_ns0; uint64_t tsc_last;
    uint64_t exc_native, exc_python, syscall_native, syscall_python, irq_native, irq_python, rdtsc;
    uint64_t tsc_mult;
};
void hv_x86_intr_hook(void *uc, uint32_t intno, void *user_data);
void hv_x86_syscall_hook(void *uc, void *user_data);
uint32_t hv_x86_rdtsc_hook(void *uc, void *user_data);
uint32_t hv_x86_rdtscp_hook(void *uc, void *user_data);
int hv_x86_deliver(void *uc, struct hv_x86 *x, int vector, int has_error, uint32_t error, int software, uint64_t return_rip);
int hv_x86_inject(void *uc, struct hv_x86 *x, int vector);
uint64_t hv_x86_tsc(struct hv_x86 *x);
int hv_x86_constants(int64_t *out, int n);
extern "Python" void hv_x86_py_intr(void *, uint32_t);
extern "Python" void hv_x86_py_syscall(void *);
CDEF-END */

/* Register ids of unicorn 2.1.4 (x86.h); UCX_EFLAGS/CR0/MSR come from hv_native.c. All
 * are compared with the Python constants at start-up through hv_x86_constants. */
#define UCX_RAX 35
#define UCX_RDX 40
#define UCX_RCX 38
#define UCX_RFLAGS 253

/* CPUX86State offsets (unicorn 2.1.4) behind the 40-byte uc_context header. */
#define X86_CTX_HEADER 40
#define X86_ENV_REGS 0
#define X86_ENV_EIP 128
#define X86_ENV_HFLAGS 176
#define X86_ENV_SEGS 184
#define X86_SEG_STRIDE 24
#define X86_ENV_TR 352
#define X86_ENV_GDT 376
#define X86_ENV_IDT 400
#define X86_ENV_CR 424
#define X86_ENV_EFER 592
#define X86_ENV_ERROR_CODE 5384
#define X86_ENV_EXCEPTION_IS_INT 5388
#define X86_ENV_OLD_EXCEPTION 5496

#define X86_R_CS 1
#define X86_R_SS 2

/* hflags bits (QEMU 5.0 target/i386/cpu.h) */
#define X86_HF_CPL_MASK 3u
#define X86_HF_INHIBIT_IRQ (1u << 3)
#define X86_HF_CS32 (1u << 4)
#define X86_HF_SS32 (1u << 5)
#define X86_HF_ADDSEG (1u << 6)
#define X86_HF_PE (1u << 7)
#define X86_HF_MP_SHIFT 9
#define X86_HF_LMA (1u << 14)
#define X86_HF_CS64 (1u << 15)
#define X86_HF_OSFXSR (1u << 22)
#define X86_HF_SMAP (1u << 23)
#define X86_HF_MODELLED (X86_HF_CPL_MASK | X86_HF_INHIBIT_IRQ | X86_HF_CS32 | X86_HF_SS32 | X86_HF_ADDSEG | \
                         X86_HF_PE | (7u << X86_HF_MP_SHIFT) | X86_HF_LMA | X86_HF_CS64 | X86_HF_OSFXSR | X86_HF_SMAP)

#define X86_RFLAGS_TF (1ull << 8)
#define X86_RFLAGS_IF (1ull << 9)
#define X86_RFLAGS_NT (1ull << 14)
#define X86_RFLAGS_RF (1ull << 16)
#define X86_RFLAGS_VM (1ull << 17)
#define X86_EFER_SCE (1ull << 0)
#define X86_EFER_LMA (1ull << 10)

/* Descriptor-cache flags of what SYSCALL loads (flat 64-bit CS, flat data SS, DPL 0). */
#define X86_SYSCALL_CS_FLAGS 0x00A09B00u
#define X86_SYSCALL_SS_FLAGS 0x00C09300u

#define X86_MSR_STAR 0xC0000081u
#define X86_MSR_LSTAR 0xC0000082u
#define X86_MSR_FMASK 0xC0000084u
#define X86_MSR_TSC_AUX 0xC0000103u

/* Result of a delivery attempt: done, or nothing changed and Python must do it. */
#define X86_DONE 0
#define X86_PYTHON 1

typedef int (*hv_ctx_fn)(void *uc, void *context);
typedef int (*hv_x86_reg_write_fn)(void *uc, int regid, const void *value);

struct hv_x86 {
    struct hv_vcpu *vcpu;        /* the shared record: RAM layout, uc_reg_read, uc_emu_stop */
    void *reg_write;             /* uc_reg_write */
    void *context_save;          /* uc_context_save */
    void *context_restore;       /* uc_context_restore */
    void *context;               /* a uc_context of this engine (CPU only) */
    void *py;                    /* cffi handle of the Python vCPU */
    int32_t native;              /* 0: every event goes to Python (the reference path) */
    /* the virtual TSC: tsc_base + (now - tsc_ns0) while running, tsc_base when stopped */
    int32_t tsc_running;
    uint64_t tsc_base;
    uint64_t tsc_ns0;
    uint64_t tsc_last;           /* the last value RDTSC returned to the guest */
    uint64_t exc_native, exc_python, syscall_native, syscall_python, irq_native, irq_python, rdtsc;
    uint64_t tsc_mult;           /* TSC ticks per ns, 32.32 fixed point (the guest's rate) */
};

/* Defined by cffi after this code (extern "Python" in the cdef above). */
static void hv_x86_py_intr(void *py, uint32_t intno);
static void hv_x86_py_syscall(void *py);

static inline uint32_t x_ld32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t x_ld64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void x_st32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void x_st64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

static inline uint64_t x_rd(void *uc, struct hv_x86 *x, int regid)
{
    uint64_t v = 0;
    ((hv_reg_read_fn)x->vcpu->reg_read)(uc, regid, &v);
    return v;
}

static inline void x_wr(void *uc, struct hv_x86 *x, int regid, uint64_t v)
{
    ((hv_x86_reg_write_fn)x->reg_write)(uc, regid, &v);
}

static uint64_t x_msr(void *uc, struct hv_x86 *x, uint32_t number)
{
    struct uc_x86_msr_s msr = { number, 0 };
    ((hv_reg_read_fn)x->vcpu->reg_read)(uc, UCX_MSR, &msr);
    return msr.value;
}

/* The paging registers of env into the vCPU record, for x86_translate. */
static void x86_env_mode(struct hv_vcpu *c, const uint8_t *env)
{
    c->r0 = x_ld64(env + X86_ENV_CR);
    c->r1 = x_ld64(env + X86_ENV_CR + 24);
    c->r2 = x_ld64(env + X86_ENV_CR + 32);
    c->r3 = x_ld64(env + X86_ENV_EFER);
}

/* Host pointer of n bytes at guest-physical gpa, all in one RAM region; NULL otherwise. */
static uint8_t *x86_host_range(struct hv_vm *vm, uint64_t gpa, uint64_t n)
{
    for (int i = 0; i < vm->nregions; i++) {
        struct hv_region *r = &vm->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa <= r->size && r->size - (gpa - r->gpa) >= n)
            return r->host + (gpa - r->gpa);
    }
    return NULL;
}

/* Host pointer of n bytes (not crossing a page) at linear address va; NULL when the page
 * is not mapped, the tables cannot be walked or it is not RAM. */
static uint8_t *x86_linear(struct hv_vcpu *c, uint64_t va, uint64_t n)
{
    uint64_t page = 0;
    if (x86_translate(c, va, &page) != 0)
        return NULL;
    return x86_host_range(c->vm, page | (va & 0xFFFu), n);
}

/* Read n bytes at linear va (may cross pages); -1 on any failure. */
static int x86_read_linear(struct hv_vcpu *c, uint64_t va, uint8_t *out, uint64_t n)
{
    while (n > 0) {
        uint64_t chunk = 4096 - (va & 0xFFFu);
        if (chunk > n)
            chunk = n;
        uint8_t *p = x86_linear(c, va, chunk);
        if (!p)
            return -1;
        memcpy(out, p, chunk);
        out += chunk;
        va += chunk;
        n -= chunk;
    }
    return 0;
}

/* hflags as compute_hflags (unicorn_x86.py) gives them for a 64-bit code segment. */
static uint32_t x86_hflags64(const uint8_t *env, uint32_t old, unsigned cpl, int inhibit)
{
    uint64_t cr0 = x_ld64(env + X86_ENV_CR), cr4 = x_ld64(env + X86_ENV_CR + 32);
    uint32_t h = old & ~X86_HF_MODELLED;
    h |= cpl & 3u;
    if (cr0 & 1)
        h |= X86_HF_PE;
    h |= (uint32_t)((cr0 >> 1) & 7) << X86_HF_MP_SHIFT;
    if (cr4 & (1ull << 9))
        h |= X86_HF_OSFXSR;
    if (cr4 & (1ull << 21))
        h |= X86_HF_SMAP;
    if (inhibit)
        h |= X86_HF_INHIBIT_IRQ;
    return h | X86_HF_LMA | X86_HF_CS32 | X86_HF_SS32 | X86_HF_CS64;
}

static void x86_put_seg(uint8_t *env, int index, uint32_t selector, uint64_t base, uint32_t limit, uint32_t flags)
{
    uint8_t *s = env + X86_ENV_SEGS + index * X86_SEG_STRIDE;
    x_st32(s, selector);
    x_st64(s + 8, base);
    x_st32(s + 16, limit);
    x_st32(s + 20, flags);
}

/* Deliver through the 64-bit IDT onto env (the saved context's CPUX86State) and guest
 * memory. *rflags is the current RFLAGS on entry and the new one on success. Every check
 * comes before the first change: X86_PYTHON means nothing was written. */
static int x86_deliver_env(struct hv_vcpu *c, uint8_t *env, int vector, int has_error, uint32_t error,
                           int software, uint64_t ret, uint64_t *rflags)
{
    uint8_t gate[16], desc[8], *frame_host[2];
    uint64_t frame[6];
    if (!(x_ld64(env + X86_ENV_EFER) & X86_EFER_LMA) || vector < 0 || vector > 255)
        return X86_PYTHON;
    x86_env_mode(c, env);
    uint64_t idt_base = x_ld64(env + X86_ENV_IDT + 8);
    uint32_t idt_limit = x_ld32(env + X86_ENV_IDT + 16) & 0xFFFFu;
    if ((uint32_t)vector * 16u + 15u > idt_limit || x86_read_linear(c, idt_base + (uint64_t)vector * 16u, gate, 16))
        return X86_PYTHON;
    unsigned selector = gate[2] | (gate[3] << 8);
    unsigned ist = gate[4] & 7u, attr = gate[5];
    unsigned gate_type = attr & 0xFu, gate_dpl = (attr >> 5) & 3u;
    const uint8_t *ss_cache = env + X86_ENV_SEGS + X86_R_SS * X86_SEG_STRIDE;
    const uint8_t *cs_cache = env + X86_ENV_SEGS + X86_R_CS * X86_SEG_STRIDE;
    unsigned cpl = (x_ld32(ss_cache + 20) >> 13) & 3u;       /* as hv's state: CPL = SS.DPL */
    if ((gate_type != 0xE && gate_type != 0xF) || (software && gate_dpl < cpl) || !(attr & 0x80))
        return X86_PYTHON;
    uint64_t target = (uint64_t)(gate[0] | (gate[1] << 8)) | ((uint64_t)(gate[6] | (gate[7] << 8)) << 16) |
                      ((uint64_t)x_ld32(gate + 8) << 32);
    /* the code segment descriptor (GDT only) */
    uint64_t gdt_base = x_ld64(env + X86_ENV_GDT + 8);
    uint32_t gdt_limit = x_ld32(env + X86_ENV_GDT + 16) & 0xFFFFu;
    unsigned index = selector & ~7u;
    if ((selector & 4) || index == 0 || index + 7 > gdt_limit || x86_read_linear(c, gdt_base + index, desc, 8))
        return X86_PYTHON;
    uint32_t lo = x_ld32(desc), hi = x_ld32(desc + 4);
    uint32_t limit = (lo & 0xFFFFu) | (hi & 0xF0000u);
    if (hi & (1u << 23))
        limit = (limit << 12) | 0xFFFu;
    uint64_t base = (lo >> 16) | ((hi & 0xFFu) << 16) | (hi & 0xFF000000u);
    uint32_t flags = hi & 0xF0FF00u;
    unsigned cs_type = (flags >> 8) & 0xFu, cs_dpl = (flags >> 13) & 3u;
    if (!(flags & (1u << 15)) || !(flags & (1u << 12)) || !(cs_type & 8) || !(flags & (1u << 21)))
        return X86_PYTHON;
    unsigned new_cpl = (cs_type & 4) ? cpl : cs_dpl;
    if (new_cpl > cpl)
        return X86_PYTHON;
    uint64_t old_rsp = x_ld64(env + X86_ENV_REGS + 4 * 8);
    uint64_t rsp = old_rsp;
    int switch_stack = new_cpl < cpl;
    if (switch_stack || ist) {
        uint8_t slot[8];
        uint64_t tr_base = x_ld64(env + X86_ENV_TR + 8);
        uint32_t tr_limit = x_ld32(env + X86_ENV_TR + 16);
        uint64_t field = ist ? 0x24u + 8u * (ist - 1u) : 4u + 8u * new_cpl;
        if (tr_limit < 0x67 || x86_read_linear(c, tr_base + field, slot, 8))
            return X86_PYTHON;
        rsp = x_ld64(slot);
    }
    rsp &= ~0xFull;
    /* the frame, lowest address first: [error], RIP, CS, RFLAGS, RSP, SS */
    int n = 0;
    if (has_error)
        frame[n++] = error;
    frame[n++] = ret;
    frame[n++] = x_ld32(cs_cache) & 0xFFFFu;
    frame[n++] = *rflags;
    frame[n++] = old_rsp;
    frame[n++] = x_ld32(ss_cache) & 0xFFFFu;
    uint64_t bytes = (uint64_t)n * 8u;
    rsp -= bytes;
    uint64_t first = 4096 - (rsp & 0xFFFu);
    if (first > bytes)
        first = bytes;
    frame_host[0] = x86_linear(c, rsp, first);
    frame_host[1] = first < bytes ? x86_linear(c, rsp + first, bytes - first) : NULL;
    if (!frame_host[0] || (first < bytes && !frame_host[1]))
        return X86_PYTHON;
    /* -- commit -- */
    memcpy(frame_host[0], frame, first);
    if (first < bytes)
        memcpy(frame_host[1], (uint8_t *)frame + first, bytes - first);
    if (__atomic_load_n(&c->vm->dirty_enabled, __ATOMIC_RELAXED)) {
        uint64_t page = 0;
        if (x86_translate(c, rsp, &page) == 0)
            mark_gpa_page(c->vm, page);
        if (first < bytes && x86_translate(c, rsp + first, &page) == 0)
            mark_gpa_page(c->vm, page);
    }
    if (!(cs_type & 4))
        flags = (flags & ~(3u << 13)) | (new_cpl << 13);
    x86_put_seg(env, X86_R_CS, (selector & ~3u) | new_cpl, base, limit, flags);
    if (switch_stack)
        x86_put_seg(env, X86_R_SS, new_cpl, 0, 0, new_cpl << 13);
    x_st64(env + X86_ENV_REGS + 4 * 8, rsp);
    x_st64(env + X86_ENV_EIP, target);
    uint32_t hflags = x_ld32(env + X86_ENV_HFLAGS);
    unsigned ss_dpl = (x_ld32(ss_cache + 20) >> 13) & 3u;
    x_st32(env + X86_ENV_HFLAGS, x86_hflags64(env, hflags, ss_dpl, 0));
    x_st32(env + X86_ENV_OLD_EXCEPTION, 0xFFFFFFFFu);
    *rflags &= ~(X86_RFLAGS_TF | X86_RFLAGS_NT | X86_RFLAGS_RF | X86_RFLAGS_VM);
    if (gate_type == 0xE)
        *rflags &= ~X86_RFLAGS_IF;
    return X86_DONE;
}

/* Save the context, deliver, restore it and set RFLAGS; X86_PYTHON: nothing changed. */
int hv_x86_deliver(void *uc, struct hv_x86 *x, int vector, int has_error, uint32_t error, int software,
                   uint64_t return_rip)
{
    if (((hv_ctx_fn)x->context_save)(uc, x->context) != 0)
        return X86_PYTHON;
    uint8_t *env = (uint8_t *)x->context + X86_CTX_HEADER;
    uint64_t rflags = x_rd(uc, x, UCX_RFLAGS);
    if (x86_deliver_env(x->vcpu, env, vector, has_error, error, software, return_rip, &rflags) != X86_DONE)
        return X86_PYTHON;
    if (((hv_ctx_fn)x->context_restore)(uc, x->context) != 0)
        return X86_PYTHON;   /* not reached with a CPU-only context (a plain copy) */
    x_wr(uc, x, UCX_RFLAGS, rflags);
    return X86_DONE;
}

/* Vectors whose exceptions push an error code (#DF #TS #NP #SS #GP #PF #AC #CP). */
static int x86_has_error_code(unsigned vector)
{
    return vector == 8 || vector == 10 || vector == 11 || vector == 12 || vector == 13 || vector == 14 ||
           vector == 17 || vector == 21;
}

/* UC_HOOK_INTR: RIP is the faulting instruction, or the next one for int n / int3 / into
 * (Unicorn moved it there); env holds the error code and whether it was a software int. */
void hv_x86_intr_hook(void *uc, uint32_t intno, void *user_data)
{
    struct hv_x86 *x = (struct hv_x86 *)user_data;
    if (x->native && ((hv_ctx_fn)x->context_save)(uc, x->context) == 0) {
        const uint8_t *env = (const uint8_t *)x->context + X86_CTX_HEADER;
        unsigned vector = intno & 0xFFu;
        int software = x_ld32(env + X86_ENV_EXCEPTION_IS_INT) != 0;
        int has_error = x86_has_error_code(vector) && !software;
        uint32_t error = x_ld32(env + X86_ENV_ERROR_CODE);
        uint64_t rip = x_ld64(env + X86_ENV_EIP);
        /* #DF goes to Python: the escalation rules live there */
        if (vector != 8 && hv_x86_deliver(uc, x, (int)vector, has_error, error, software, rip) == X86_DONE) {
            x->exc_native++;
            return;
        }
    }
    x->exc_python++;
    hv_x86_py_intr(x->py, intno);
}

/* Length of the SYSCALL instruction at linear va (prefixes, REX, 0F 05); 0 if unknown. */
static unsigned x86_syscall_length(struct hv_vcpu *c, uint64_t va)
{
    for (unsigned i = 0; i < 14; i++) {
        uint8_t b[2];
        if (x86_read_linear(c, va + i, b, 2))
            return 0;
        if (b[0] == 0x0F)
            return b[1] == 0x05 ? i + 2 : 0;
        int prefix = (b[0] >= 0x40 && b[0] <= 0x4F) || b[0] == 0x66 || b[0] == 0x67 || b[0] == 0xF2 ||
                     b[0] == 0xF3 || b[0] == 0x2E || b[0] == 0x36 || b[0] == 0x3E || b[0] == 0x26 ||
                     b[0] == 0x64 || b[0] == 0x65;
        if (!prefix)
            return 0;
    }
    return 0;
}

/* UC_HOOK_INSN (SYSCALL): RIP is the instruction itself; Unicorn adds its length after. */
static int x86_syscall(void *uc, struct hv_x86 *x)
{
    if (((hv_ctx_fn)x->context_save)(uc, x->context) != 0)
        return X86_PYTHON;
    uint8_t *env = (uint8_t *)x->context + X86_CTX_HEADER;
    uint64_t efer = x_ld64(env + X86_ENV_EFER);
    uint32_t cs_flags = x_ld32(env + X86_ENV_SEGS + X86_R_CS * X86_SEG_STRIDE + 20);
    if (!(efer & X86_EFER_SCE) || !(efer & X86_EFER_LMA) || !(cs_flags & (1u << 21)))
        return X86_PYTHON;     /* #UD: Python */
    x86_env_mode(x->vcpu, env);
    uint64_t rip = x_ld64(env + X86_ENV_EIP);
    unsigned len = x86_syscall_length(x->vcpu, rip);
    if (!len)
        return X86_PYTHON;
    uint64_t star = x_msr(uc, x, X86_MSR_STAR), lstar = x_msr(uc, x, X86_MSR_LSTAR);
    uint64_t fmask = x_msr(uc, x, X86_MSR_FMASK);
    uint64_t rflags = x_rd(uc, x, UCX_RFLAGS);
    uint32_t selector = (uint32_t)(star >> 32) & 0xFFFCu;
    x_st64(env + X86_ENV_REGS + 1 * 8, rip + len);                         /* RCX */
    x_st64(env + X86_ENV_REGS + 11 * 8, rflags & ~X86_RFLAGS_RF);          /* R11 */
    x86_put_seg(env, X86_R_CS, selector, 0, 0xFFFFFFFFu, X86_SYSCALL_CS_FLAGS);
    x86_put_seg(env, X86_R_SS, selector + 8, 0, 0xFFFFFFFFu, X86_SYSCALL_SS_FLAGS);
    x_st64(env + X86_ENV_EIP, lstar - len);
    uint32_t hflags = x_ld32(env + X86_ENV_HFLAGS);
    x_st32(env + X86_ENV_HFLAGS, x86_hflags64(env, hflags, 0, (hflags & X86_HF_INHIBIT_IRQ) != 0));
    x_st32(env + X86_ENV_OLD_EXCEPTION, 0xFFFFFFFFu);
    if (((hv_ctx_fn)x->context_restore)(uc, x->context) != 0)
        return X86_PYTHON;
    x_wr(uc, x, UCX_RFLAGS, (rflags & ~fmask & ~X86_RFLAGS_RF) | 0x2);
    return X86_DONE;
}

void hv_x86_syscall_hook(void *uc, void *user_data)
{
    struct hv_x86 *x = (struct hv_x86 *)user_data;
    if (x->native && x86_syscall(uc, x) == X86_DONE) {
        x->syscall_native++;
        return;
    }
    x->syscall_python++;
    hv_x86_py_syscall(x->py);
}

/* An external interrupt from the VMM: 1 delivered, 0 refused (IF clear or interrupt
 * shadow), -1 Python must deliver it (nothing changed). */
int hv_x86_inject(void *uc, struct hv_x86 *x, int vector)
{
    uint64_t rflags = x_rd(uc, x, UCX_RFLAGS);
    if (!(rflags & X86_RFLAGS_IF))
        return 0;
    if (((hv_ctx_fn)x->context_save)(uc, x->context) != 0)
        return -1;
    uint8_t *env = (uint8_t *)x->context + X86_CTX_HEADER;
    if (x_ld32(env + X86_ENV_HFLAGS) & X86_HF_INHIBIT_IRQ)
        return 0;
    if (!x->native) {
        x->irq_python++;
        return -1;
    }
    uint64_t rip = x_ld64(env + X86_ENV_EIP);
    if (x86_deliver_env(x->vcpu, env, vector, 0, 0, 0, rip, &rflags) != X86_DONE ||
        ((hv_ctx_fn)x->context_restore)(uc, x->context) != 0) {
        x->irq_python++;
        return -1;
    }
    x_wr(uc, x, UCX_RFLAGS, rflags);
    x->irq_native++;
    return 1;
}

uint64_t hv_x86_tsc(struct hv_x86 *x)
{
    if (!x->tsc_running)
        return x->tsc_base;
    uint64_t now = hv_now_ns();
    uint64_t ns = now > x->tsc_ns0 ? now - x->tsc_ns0 : 0;
    /* one 64x64->128 multiply: exact for any interval, any rate up to 2^32 ticks per ns */
    return x->tsc_base + (uint64_t)(((unsigned __int128)ns * x->tsc_mult) >> 32);
}

/* UC_HOOK_INSN (RDTSC): EDX:EAX = the virtual TSC; 1 = the engine skips its own. */
uint32_t hv_x86_rdtsc_hook(void *uc, void *user_data)
{
    struct hv_x86 *x = (struct hv_x86 *)user_data;
    uint64_t tsc = hv_x86_tsc(x);
    x->tsc_last = tsc;
    x->rdtsc++;
    x_wr(uc, x, UCX_RAX, tsc & 0xFFFFFFFFu);
    x_wr(uc, x, UCX_RDX, tsc >> 32);
    return 1;
}

/* UC_HOOK_INSN (RDTSCP): the same TSC, ECX = IA32_TSC_AUX. Unicorn's own RDTSCP returns
 * the host's TSC: Linux reads its clocksource with RDTSCP (rdtsc_ordered) where CPUID has
 * it, so without this hook its clock ran on the host's counter, at the host's rate, past
 * pauses and migrations, while RDTSC gave hv's. */
uint32_t hv_x86_rdtscp_hook(void *uc, void *user_data)
{
    struct hv_x86 *x = (struct hv_x86 *)user_data;
    hv_x86_rdtsc_hook(uc, user_data);
    x_wr(uc, x, UCX_RCX, x_msr(uc, x, X86_MSR_TSC_AUX) & 0xFFFFFFFFu);
    return 1;
}

/* What this file was compiled with, for the backend's start-up check: register ids
 * (RAX, RDX, RCX, RFLAGS, MSR, CR0, CR3, CR4) then CPUX86State offsets. */
int hv_x86_constants(int64_t *out, int n)
{
    const int64_t v[] = { UCX_RAX, UCX_RDX, UCX_RCX, UCX_RFLAGS, UCX_MSR, UCX_CR0, UCX_CR3, UCX_CR4,
                          X86_CTX_HEADER, X86_ENV_REGS, X86_ENV_EIP, X86_ENV_HFLAGS, X86_ENV_SEGS, X86_SEG_STRIDE,
                          X86_ENV_TR, X86_ENV_GDT, X86_ENV_IDT, X86_ENV_CR, X86_ENV_EFER, X86_ENV_ERROR_CODE,
                          X86_ENV_EXCEPTION_IS_INT, X86_ENV_OLD_EXCEPTION };
    int count = (int)(sizeof v / sizeof v[0]);
    for (int i = 0; i < n && i < count; i++)
        out[i] = v[i];
    return count;
}
