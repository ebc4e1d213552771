/* Native aarch64 hooks for hv's Unicorn backend (compiled after hv_native.c, in the same
 * translation unit: it uses struct hv_vcpu, refresh_mode and arm64_translate from there).
 *
 * System registers: Unicorn calls the MRS/MSR hook for every op0 2/3 access once one is
 * installed (about 2.7 million per Linux boot, nearly all registers the engine implements
 * itself). hv_a64_mrs_hook / hv_a64_msr_hook look the encoding up in a per-vCPU class
 * table and return 0 ("let the engine do it") for everything hv does not own, without
 * touching Python. MPIDR_EL1 and (without a machine sysreg handler) the virtual counter
 * are answered here; the registers the machine serves (GIC CPU interface, timers) go to
 * the Python backend through the extern "Python" callback hv_a64_py_sysreg.
 *
 * Exceptions: Unicorn takes no exception itself; hv_a64_intr_hook enters the guest's
 * vector table (VBAR_EL1 + offset) for svc, brk, undefined instructions and
 * instruction/data aborts exactly as the Python delivery did, and hands everything hv
 * must decide (hvc/smc: PSCI; unknown exceptions; an exception taken from EL2/EL3) to
 * Python through hv_a64_py_intr. hv_a64_enter is also what Python calls to inject IRQs.
 *
 * libunicorn is not linked: uc_reg_write and uc_context_save come in as pointers.
 */

/* CDEF-BEGIN
struct uc_arm64_cp_reg_s { uint32_t crn, crm, op0, op1, op2; uint64_t val; };
struct hv_a64_peers { int32_t n; struct hv_a64 *cpu[64]; uint64_t broadcasts, waits, wait_timeouts, ic_broadcasts; };
struct hv_a64 {
    struct hv_vcpu *vcpu; void *reg_write; void *context_save; void *context;
    uint32_t ctx_exception; void *py; uint8_t *sysreg_class; uint64_t mpidr;
    int32_t cnt_running; uint64_t cnt_base; uint64_t cnt_ns0;
    uint64_t sysreg_native, sysreg_python, exc_native, exc_python;
    struct hv_a64_peers *peers; volatile int32_t tb_flush_req;
    int32_t clk_timeline; uint64_t clk_guest_ns; uint64_t clk_host_ns;
    void *uc; void *poke; volatile int32_t deadline_due; void *timer;
};
uint32_t hv_a64_mrs_hook(void *uc, int reg, const struct uc_arm64_cp_reg_s *cp, void *user_data);
uint32_t hv_a64_msr_hook(void *uc, int reg, const struct uc_arm64_cp_reg_s *cp, void *user_data);
void hv_a64_intr_hook(void *uc, uint32_t intno, void *user_data);
int hv_a64_enter(void *uc, struct hv_a64 *a, uint64_t esr, uint64_t return_pc, int has_far, uint64_t far, int kind);
uint64_t hv_a64_counter(struct hv_a64 *a);
int hv_a64_regids(int32_t *out, int n);
uint32_t hv_a64_sys_hook(void *uc, int reg, const struct uc_arm64_cp_reg_s *cp, void *user_data);
void hv_a64_set_in_engine(struct hv_vcpu *c, int32_t on);
int32_t hv_a64_take_tb_flush(struct hv_a64 *a);
uint64_t hv_a64_pc(void *uc, struct hv_a64 *a);
int hv_a64_irqs_masked(void *uc, struct hv_a64 *a);
int hv_a64_inject_irq(void *uc, struct hv_a64 *a);
void hv_a64_poll_hook(void *uc, void *user_data);
int hv_a64_arm_deadline(struct hv_a64 *a, uint64_t host_ns);
void hv_a64_timer_stop(struct hv_a64 *a);
extern "Python" uint32_t hv_a64_py_sysreg(void *, int, int, const struct uc_arm64_cp_reg_s *);
extern "Python" void hv_a64_py_intr(void *, uint32_t);
CDEF-END */

#include <pthread.h>
#include <sched.h>
#include <stdlib.h>
#include <time.h>

/* Register ids of unicorn 2.1.4 (arm64.h), compared with the Python constants at start-up
 * through hv_a64_regids (UCA_PSTATE, UCA_CP_REG come from hv_native.c). */
#define UCA_SP 4
#define UCA_XZR 7
#define UCA_PC 260
#define UCA_ELR_EL1 267
#define UCA_SP_EL0 270
#define UCA_SP_EL1 271

/* Exception numbers of UC_HOOK_INTR (QEMU's EXCP_*). */
#define A64_EXCP_UDEF 1
#define A64_EXCP_SWI 2
#define A64_EXCP_PREFETCH_ABORT 3
#define A64_EXCP_DATA_ABORT 4
#define A64_EXCP_BKPT 7

#define A64_EC_UNKNOWN 0x00u
#define A64_EC_SVC64 0x15u
#define A64_EC_BRK 0x3Cu
#define A64_IL (1u << 25)
#define A64_PSTATE_EL1H_MASKED 0x3C5u
#define A64_SCR_EL3_VALUE ((1u << 0) | (1u << 8) | (1u << 10))   /* NS, HCE, RW */

/* sysreg_class bits, indexed by op0:op1:crn:crm:op2 (the MRS/MSR encoding bits 20..5) */
#define A64_ROUTE_READ 1    /* MRS goes to Python (the machine serves it) */
#define A64_ROUTE_WRITE 2   /* MSR goes to Python */
#define A64_MPIDR 4         /* MRS answered with a->mpidr */
#define A64_COUNTER 8       /* MRS answered with the vCPU's own counter */

#define A64_NS_PER_TICK 16

typedef int (*hv_reg_write_fn)(void *uc, int regid, const void *value);
typedef int (*hv_context_save_fn)(void *uc, void *context);

struct hv_a64 {
    struct hv_vcpu *vcpu;        /* the shared record: RAM layout, uc_reg_read, uc_emu_stop */
    void *reg_write;             /* uc_reg_write */
    void *context_save;          /* uc_context_save */
    void *context;               /* a uc_context of this engine (exception records) */
    uint32_t ctx_exception;      /* offset of {u32 syndrome; u32 fsr; u64 vaddress} in it */
    void *py;                    /* cffi handle of the Python vCPU */
    uint8_t *sysreg_class;       /* 65536 entries of A64_* bits */
    uint64_t mpidr;
    /* the counter without a machine handler: cnt_base + (now - cnt_ns0) / 16 while running */
    int32_t cnt_running;
    uint64_t cnt_base;
    uint64_t cnt_ns0;
    uint64_t sysreg_native, sysreg_python, exc_native, exc_python;   /* statistics */
    struct hv_a64_peers *peers;  /* every vCPU of this VM (TLBI broadcast); NULL: alone */
    volatile int32_t tb_flush_req;   /* another vCPU changed kernel code: drop translations */
    /* the machine's guest clock while it runs (GuestClock.timeline): the counter is
       (clk_guest_ns + now - clk_host_ns) / 16, exactly what the machine's timers compute */
    int32_t clk_timeline;
    uint64_t clk_guest_ns;
    uint64_t clk_host_ns;
    /* a polling engine (hv's libunicorn, no block hook): the engine and hv_uc_poke, so
       broadcasts and the deadline thread can make it look at its flags; NULL otherwise */
    void *uc;
    void *poke;
    volatile int32_t deadline_due;   /* the deadline thread saw the timer deadline pass */
    void *timer;                     /* struct a64_timer of the deadline thread, or NULL */
};

#define A64_MAX_PEERS 64
#define A64_TLB_WAIT_NS 5000000000ull  /* give up waiting for a peer's flush after 5 s (a
                                          peer stuck outside the guest; counted, logged) */

/* The vCPUs of one VM, for broadcast TLB maintenance. */
struct hv_a64_peers {
    int32_t n;
    struct hv_a64 *cpu[A64_MAX_PEERS];
    uint64_t broadcasts, waits, wait_timeouts, ic_broadcasts;   /* statistics */
};

/* Defined by cffi after this code (extern "Python" in the cdef above). */
static uint32_t hv_a64_py_sysreg(void *py, int isread, int reg, const struct uc_arm64_cp_reg_s *cp);
static void hv_a64_py_intr(void *py, uint32_t intno);

static inline unsigned a64_key(const struct uc_arm64_cp_reg_s *cp)
{
    return ((cp->op0 & 3u) << 14) | ((cp->op1 & 7u) << 11) | ((cp->crn & 15u) << 7) |
           ((cp->crm & 15u) << 3) | (cp->op2 & 7u);
}

static inline uint64_t a64_rd(void *uc, struct hv_a64 *a, int regid)
{
    uint64_t v = 0;
    ((hv_reg_read_fn)a->vcpu->reg_read)(uc, regid, &v);
    return v;
}

static inline void a64_wr(void *uc, struct hv_a64 *a, int regid, uint64_t v)
{
    ((hv_reg_write_fn)a->reg_write)(uc, regid, &v);
}

static uint64_t a64_cp_rd(void *uc, struct hv_a64 *a, uint32_t crn, uint32_t crm, uint32_t op0,
                          uint32_t op1, uint32_t op2)
{
    struct uc_arm64_cp_reg_s cp = { crn, crm, op0, op1, op2, 0 };
    ((hv_reg_read_fn)a->vcpu->reg_read)(uc, UCA_CP_REG, &cp);
    return cp.val;
}

/* Any CP_REG write also rebuilds the engine's hflags (after a PSTATE change). */
static void a64_cp_wr(void *uc, struct hv_a64 *a, uint32_t crn, uint32_t crm, uint32_t op0,
                      uint32_t op1, uint32_t op2, uint64_t v)
{
    struct uc_arm64_cp_reg_s cp = { crn, crm, op0, op1, op2, v };
    ((hv_reg_write_fn)a->reg_write)(uc, UCA_CP_REG, &cp);
}

uint64_t hv_a64_counter(struct hv_a64 *a)
{
    if (!a->cnt_running)
        return a->cnt_base;
    uint64_t now = hv_now_ns();
    if (a->clk_timeline) {
        uint64_t since = now > a->clk_host_ns ? now - a->clk_host_ns : 0;
        return (a->clk_guest_ns + since) / A64_NS_PER_TICK;
    }
    uint64_t delta = now > a->cnt_ns0 ? now - a->cnt_ns0 : 0;
    return a->cnt_base + delta / A64_NS_PER_TICK;
}

/* UC_HOOK_INSN (UC_ARM64_INS_MRS): 1 = handled (the engine skips the access). */
uint32_t hv_a64_mrs_hook(void *uc, int reg, const struct uc_arm64_cp_reg_s *cp, void *user_data)
{
    struct hv_a64 *a = (struct hv_a64 *)user_data;
    uint8_t cls = a->sysreg_class[a64_key(cp)];
    if (!cls)
        return 0;
    if (cls & A64_ROUTE_READ) {
        a->sysreg_python++;
        return hv_a64_py_sysreg(a->py, 1, reg, cp);
    }
    a->sysreg_native++;
    uint64_t value;
    if (cls & A64_MPIDR)
        value = a->mpidr;
    else if (cls & A64_COUNTER)
        value = hv_a64_counter(a);
    else
        return 0;
    if (reg != UCA_XZR)
        a64_wr(uc, a, reg, value);
    return 1;
}

/* UC_HOOK_INSN (UC_ARM64_INS_MSR): only registers the machine serves leave the engine. */
uint32_t hv_a64_msr_hook(void *uc, int reg, const struct uc_arm64_cp_reg_s *cp, void *user_data)
{
    struct hv_a64 *a = (struct hv_a64 *)user_data;
    (void)uc;
    if (!(a->sysreg_class[a64_key(cp)] & A64_ROUTE_WRITE))
        return 0;
    a->sysreg_python++;
    return hv_a64_py_sysreg(a->py, 0, reg, cp);
}

/* Take an exception to EL1 (kind 0 synchronous, 1 IRQ, 2 FIQ, 3 SError): SP banked, ELR,
 * SPSR, ESR/FAR for synchronous ones, PSTATE = EL1h with DAIF masked, PC = VBAR_EL1 +
 * offset. -1 (nothing changed) when the vCPU is at EL2/EL3, which hv does not run. */
int hv_a64_enter(void *uc, struct hv_a64 *a, uint64_t esr, uint64_t return_pc, int has_far, uint64_t far, int kind)
{
    uint64_t pstate = a64_rd(uc, a, UCA_PSTATE);
    unsigned el = (unsigned)(pstate >> 2) & 3;
    uint64_t offset;
    if (el > 1)
        return -1;
    uint64_t sp = a64_rd(uc, a, UCA_SP);
    if (el == 0 || !(pstate & 1)) {
        a64_wr(uc, a, UCA_SP_EL0, sp);
        offset = (el == 0) ? 0x400 : 0x000;
    } else {
        a64_wr(uc, a, UCA_SP_EL1, sp);
        offset = 0x200;
    }
    a64_wr(uc, a, UCA_ELR_EL1, return_pc);
    a64_cp_wr(uc, a, 4, 0, 3, 0, 0, pstate);                 /* SPSR_EL1 */
    if (kind == 0) {
        a64_cp_wr(uc, a, 5, 2, 3, 0, 0, esr);                /* ESR_EL1 */
        if (has_far)
            a64_cp_wr(uc, a, 6, 0, 3, 0, 0, far);            /* FAR_EL1 */
    }
    a64_wr(uc, a, UCA_PSTATE, A64_PSTATE_EL1H_MASKED);
    a64_wr(uc, a, UCA_SP, a64_rd(uc, a, UCA_SP_EL1));
    uint64_t vbar = a64_cp_rd(uc, a, 12, 0, 3, 0, 0);         /* VBAR_EL1 */
    a64_wr(uc, a, UCA_PC, vbar + offset + 0x80u * (uint64_t)kind);
    a64_cp_wr(uc, a, 1, 1, 3, 6, 0, A64_SCR_EL3_VALUE);      /* SCR_EL3: rebuilds hflags */
    return 0;
}

/* The 32-bit instruction at virtual address va, or 0 when it cannot be read (as the
 * Python delivery, which used 0 for an unreadable instruction). */
static uint32_t a64_insn_at(void *uc, struct hv_a64 *a, uint64_t va)
{
    struct hv_vcpu *c = a->vcpu;
    uint64_t page = 0;
    refresh_mode(uc, c);
    if (arm64_translate(c, va, &page) != 0)
        return 0;
    uint64_t gpa = page | (va & 0xFFFu);
    for (int i = 0; i < c->vm->nregions; i++) {
        struct hv_region *r = &c->vm->regions[i];
        if (gpa >= r->gpa && gpa - r->gpa + 4 <= r->size) {
            uint32_t insn;
            memcpy(&insn, r->host + (gpa - r->gpa), 4);
            return insn;
        }
    }
    return 0;
}

/* The vCPU's PC, for the backend's run loop (one C call instead of the binding's
 * reg_read, which costs several microseconds of Python per emu_start). */
uint64_t hv_a64_pc(void *uc, struct hv_a64 *a)
{
    return a64_rd(uc, a, UCA_PC);
}

#define A64_PSTATE_I (1u << 7)

/* PSTATE.I: 1 when the guest masks IRQs. */
int hv_a64_irqs_masked(void *uc, struct hv_a64 *a)
{
    return (a64_rd(uc, a, UCA_PSTATE) & A64_PSTATE_I) != 0;
}

/* Take an IRQ exception at the current PC if PSTATE.I allows: 1 taken, 0 masked (nothing
 * changed), -1 the vCPU is at EL2/EL3 (nothing changed). Python's inject_irq in one call. */
int hv_a64_inject_irq(void *uc, struct hv_a64 *a)
{
    if (hv_a64_irqs_masked(uc, a))
        return 0;
    return hv_a64_enter(uc, a, 0, a64_rd(uc, a, UCA_PC), 0, 0, 1) == 0 ? 1 : -1;
}

/* UC_HOOK_INTR: deliver what the architecture defines without hv's help; the rest goes to
 * Python (which records the event and stops the engine). */
void hv_a64_intr_hook(void *uc, uint32_t intno, void *user_data)
{
    struct hv_a64 *a = (struct hv_a64 *)user_data;
    uint64_t pc = a64_rd(uc, a, UCA_PC);
    uint64_t esr;
    uint64_t far = 0;
    int has_far = 0;
    switch (intno) {
    case A64_EXCP_SWI:          /* PC is past the svc */
        esr = (A64_EC_SVC64 << 26) | A64_IL | ((a64_insn_at(uc, a, pc - 4) >> 5) & 0xFFFFu);
        break;
    case A64_EXCP_BKPT:         /* PC is the brk */
        esr = (A64_EC_BRK << 26) | A64_IL | ((a64_insn_at(uc, a, pc) >> 5) & 0xFFFFu);
        break;
    case A64_EXCP_UDEF:
        esr = (A64_EC_UNKNOWN << 26) | A64_IL;
        break;
    case A64_EXCP_PREFETCH_ABORT:
    case A64_EXCP_DATA_ABORT: {
        uint32_t syndrome;
        if (((hv_context_save_fn)a->context_save)(uc, a->context) != 0)
            goto python;
        const uint8_t *rec = (const uint8_t *)a->context + a->ctx_exception;
        memcpy(&syndrome, rec, 4);
        memcpy(&far, rec + 8, 8);
        esr = syndrome;
        has_far = 1;
        break;
    }
    default:
        goto python;
    }
    if (hv_a64_enter(uc, a, esr, pc, has_far, far, 0) == 0) {
        a->exc_native++;
        return;
    }
python:
    a->exc_python++;
    hv_a64_py_intr(a->py, intno);
}

/* Inside / outside emu_start, as a broadcast TLBI sees it (sequentially consistent: a
 * vCPU that enters after a broadcast looked finds the request at its first block). */
void hv_a64_set_in_engine(struct hv_vcpu *c, int32_t on)
{
    __atomic_store_n(&c->in_engine, on, __ATOMIC_SEQ_CST);
}

typedef void (*hv_poke_fn)(void *uc);

/* Make a polling engine (hv_uc_set_poll) look at its flags at its next block start; a
 * block-hook engine looks at every block anyway (a->uc is NULL then). */
static void a64_poke(struct hv_a64 *a)
{
    void *uc = __atomic_load_n(&a->uc, __ATOMIC_ACQUIRE);
    if (uc && a->poke)
        ((hv_poke_fn)a->poke)(uc);
}

/* TLBI ...IS (inner shareable) invalidates the TLBs of every PE, and the DSB after it
 * waits for that. Unicorn has one CPU per engine and flushes only its own: ask every
 * other vCPU of the VM to flush at its next block, and wait until each one has, or is not
 * inside emu_start (it flushes at its first block when it enters). While waiting, do
 * what others asked of this vCPU, so two broadcasting vCPUs never wait for each other. */
static void a64_tlb_broadcast(void *uc, struct hv_a64 *a)
{
    struct hv_a64_peers *p = a->peers;
    uint32_t want[A64_MAX_PEERS];
    int n = p->n < A64_MAX_PEERS ? p->n : A64_MAX_PEERS;
    uint64_t start = 0;
    __atomic_add_fetch(&p->broadcasts, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < n; i++) {
        want[i] = p->cpu[i] == a ? 0 : __atomic_add_fetch(&p->cpu[i]->vcpu->tlb_req, 1, __ATOMIC_SEQ_CST);
        if (p->cpu[i] != a)
            a64_poke(p->cpu[i]);
    }
    for (;;) {
        int pending = 0;
        for (int i = 0; i < n && !pending; i++) {
            struct hv_vcpu *v = p->cpu[i]->vcpu;
            if (p->cpu[i] == a || !__atomic_load_n(&v->in_engine, __ATOMIC_SEQ_CST))
                continue;
            pending = (int32_t)(__atomic_load_n(&v->tlb_done, __ATOMIC_ACQUIRE) - want[i]) < 0;
        }
        if (!pending)
            return;
        if (__atomic_load_n(&a->vcpu->tlb_req, __ATOMIC_ACQUIRE) != a->vcpu->tlb_done)
            hv_tlb_catch_up(uc, a->vcpu);
        uint64_t now = hv_now_ns();
        if (!start) {
            start = now;
            __atomic_add_fetch(&p->waits, 1, __ATOMIC_RELAXED);
        } else if (now - start > A64_TLB_WAIT_NS) {
            __atomic_add_fetch(&p->wait_timeouts, 1, __ATOMIC_RELAXED);
            return;
        }
        sched_yield();
    }
}

/* Instruction cache maintenance reaches the other engines as a request to drop their
 * translated code at their next block (the backend does it between two emu_starts, where
 * no translation block runs): ``ic iallu(is)``, and ``ic ivau`` of a kernel address above
 * the linear map (kernel text and modules: static keys, alternatives, module loading).
 * The engine that wrote the code has already dropped its own (the store fast path keeps
 * pages with code on the slow path). ``ic ivau`` of the linear map (user pages Linux makes
 * executable) is left alone: a full flush per cache line would cost too much. */
static void a64_ic_broadcast(struct hv_a64 *a)
{
    struct hv_a64_peers *p = a->peers;
    int n = p->n < A64_MAX_PEERS ? p->n : A64_MAX_PEERS;
    __atomic_add_fetch(&p->ic_broadcasts, 1, __ATOMIC_RELAXED);
    for (int i = 0; i < n; i++) {
        if (p->cpu[i] == a)
            continue;
        __atomic_store_n(&p->cpu[i]->tb_flush_req, 1, __ATOMIC_SEQ_CST);
        __atomic_store_n(&p->cpu[i]->vcpu->service, 1, __ATOMIC_SEQ_CST);
        a64_poke(p->cpu[i]);
    }
}

/* The request of a64_ic_broadcast, taken (by the backend, outside emu_start). */
int32_t hv_a64_take_tb_flush(struct hv_a64 *a)
{
    return __atomic_exchange_n(&a->tb_flush_req, 0, __ATOMIC_SEQ_CST);
}

#define A64_KERNEL_CODE_VA 0xFFFF800000000000ull   /* above the 48-bit linear map */

/* UC_HOOK_INSN (UC_ARM64_INS_SYS): every op0 = 1 instruction (DC, IC, AT, TLBI). A TLBI
 * other than the non-shareable ones (CRm 7) is broadcast to the other vCPUs, and so is
 * instruction cache maintenance of kernel code; the engine then performs the instruction
 * itself (return 0). */
uint32_t hv_a64_sys_hook(void *uc, int reg, const struct uc_arm64_cp_reg_s *cp, void *user_data)
{
    struct hv_a64 *a = (struct hv_a64 *)user_data;
    (void)reg;
    if (!a->peers || a->peers->n < 2)
        return 0;
    if (cp->crn == 8 && cp->crm != 7) {
        a64_tlb_broadcast(uc, a);
    } else if (cp->crn == 7 && cp->op2 == 0 && cp->op1 == 0 && (cp->crm == 1 || cp->crm == 5)) {
        a64_ic_broadcast(a);                                     /* ic ialluis, ic iallu */
    } else if (cp->crn == 7 && cp->op1 == 3 && cp->crm == 5 && cp->op2 == 1 && cp->val >= A64_KERNEL_CODE_VA) {
        a64_ic_broadcast(a);                                     /* ic ivau of kernel code */
    }
    return 0;
}

/* hv_uc_set_poll callback of a polling aarch64 engine (no block hook): the block hook's
 * check (kicks, interrupt window, housekeeping, TLB catch-up), plus the timer deadline the
 * deadline thread saw pass, turned into a kick here, on the vCPU's own thread, as the
 * block hook's clock check did (other threads set kick only under the backend's kick
 * lock, which the vCPU thread needs to clear it). */
void hv_a64_poll_hook(void *uc, void *user_data)
{
    struct hv_a64 *a = (struct hv_a64 *)user_data;
    struct hv_vcpu *c = a->vcpu;
    if (__atomic_load_n(&a->deadline_due, __ATOMIC_ACQUIRE) &&
            __atomic_exchange_n(&a->deadline_due, 0, __ATOMIC_ACQ_REL)) {
        c->deadline_exits++;
        __atomic_store_n(&c->kick, 1, __ATOMIC_RELEASE);
    }
    hv_block_check(uc, c);
}

/* The deadline thread of a polling vCPU: sleeps until the machine's next timer expiry for
 * this vCPU (host CLOCK_MONOTONIC ns), then sets deadline_due and pokes the engine. It
 * needs no GIL, so a tick does not wait for a Python thread to be scheduled. */
struct a64_timer {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    pthread_t th;
    int stop;
    uint64_t deadline_ns;     /* 0: none */
    struct hv_a64 *a;
};

static void *a64_timer_main(void *arg)
{
    struct a64_timer *t = (struct a64_timer *)arg;
    pthread_mutex_lock(&t->mu);
    while (!t->stop) {
        if (!t->deadline_ns) {
            pthread_cond_wait(&t->cv, &t->mu);
            continue;
        }
        if (hv_now_ns() < t->deadline_ns) {
            struct timespec ts = { (time_t)(t->deadline_ns / 1000000000ull), (long)(t->deadline_ns % 1000000000ull) };
            pthread_cond_timedwait(&t->cv, &t->mu, &ts);
            continue;
        }
        t->deadline_ns = 0;
        __atomic_store_n(&t->a->deadline_due, 1, __ATOMIC_RELEASE);
        a64_poke(t->a);
    }
    pthread_mutex_unlock(&t->mu);
    return NULL;
}

static struct a64_timer *a64_timer_start(struct hv_a64 *a)
{
    struct a64_timer *t = calloc(1, sizeof *t);
    pthread_condattr_t ca;
    if (!t)
        return NULL;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&t->mu, NULL);
    pthread_cond_init(&t->cv, &ca);
    pthread_condattr_destroy(&ca);
    t->a = a;
    if (pthread_create(&t->th, NULL, a64_timer_main, t) != 0) {
        pthread_cond_destroy(&t->cv);
        pthread_mutex_destroy(&t->mu);
        free(t);
        return NULL;
    }
    return t;
}

/* (Re-)plan the vCPU's deadline (0: none); a due flag of the previous one is dropped (the
 * caller has just fired the due timers or reprogrammed them). The thread starts at the
 * first call; -1 if it cannot (the caller then leaves the ticks to the machine's timer
 * thread). */
int hv_a64_arm_deadline(struct hv_a64 *a, uint64_t host_ns)
{
    struct a64_timer *t = (struct a64_timer *)a->timer;
    if (!t) {
        if (!host_ns)
            return 0;
        t = a64_timer_start(a);
        if (!t)
            return -1;
        a->timer = t;
    }
    pthread_mutex_lock(&t->mu);
    uint64_t old = t->deadline_ns;
    t->deadline_ns = host_ns;
    __atomic_store_n(&a->deadline_due, 0, __ATOMIC_RELEASE);
    if (host_ns && (!old || host_ns < old))
        pthread_cond_signal(&t->cv);      /* later than the planned wake-up: no need */
    pthread_mutex_unlock(&t->mu);
    return 0;
}

/* Before the engine closes: no more pokes into it, and the deadline thread ends. */
void hv_a64_timer_stop(struct hv_a64 *a)
{
    struct a64_timer *t = (struct a64_timer *)a->timer;
    __atomic_store_n(&a->uc, NULL, __ATOMIC_RELEASE);
    if (!t)
        return;
    pthread_mutex_lock(&t->mu);
    t->stop = 1;
    pthread_cond_signal(&t->cv);
    pthread_mutex_unlock(&t->mu);
    pthread_join(t->th, NULL);
    pthread_cond_destroy(&t->cv);
    pthread_mutex_destroy(&t->mu);
    free(t);
    a->timer = NULL;
}

/* The register ids this file was compiled with, for the backend's start-up check. */
int hv_a64_regids(int32_t *out, int n)
{
    const int32_t ids[] = { UCA_SP, UCA_XZR, UCA_PC, UCA_ELR_EL1, UCA_SP_EL0, UCA_SP_EL1, UCA_PSTATE,
                            UCA_CP_REG, UCA_TTBR0, UCA_TTBR1 };
    int count = (int)(sizeof ids / sizeof ids[0]);
    for (int i = 0; i < n && i < count; i++)
        out[i] = ids[i];
    return count;
}
