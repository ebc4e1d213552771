/* virtio-blk requests served in C (hv/devices/virtio_blk_native.py decides when).
 *
 * Python owns the device: its state, the feature negotiation, interrupts, migration. When
 * the driver kicks the queue, hvq_blk_serve walks the available ring and serves what it
 * can here -- reads and writes of whole sectors inside the disk, in chains whose every
 * buffer lies in one RAM region -- and returns as soon as the next request is anything
 * else: an empty ring, a flush, an identify, a discard, a write to a read-only disk, a
 * range past the end, an I/O error, or a chain that breaks any rule of
 * hv/devices/virtqueue.py. That request is left where it is (nothing of it consumed), and
 * Python pops it and serves it, or refuses it with its own error, as before. So the checks
 * here accept a subset of what Python accepts, never more; a hostile ring only ever
 * reaches the Python path.
 *
 * Every byte this code writes into guest RAM (data, status bytes, the used ring and its
 * index, avail_event) is marked in the VMM's dirty bitmap (GuestMemory's, whose lock the
 * caller holds) and, with Unicorn, handed to hv_uc_invalidate_host so no engine runs code
 * it replaced. Completed requests are returned together: their used entries, then the
 * used index once (as QEMU's virtqueue_flush), at most one ring's worth at a time. */

#include <stdint.h>
#include <string.h>
#include <errno.h>
#include <sys/types.h>
#include <sys/uio.h>

/* CDEF-BEGIN
struct hvq_blk {
    int32_t nregions; struct hv_region regions[16]; uint8_t *dirty; void *invalidate;
    uint64_t desc, avail, used; uint32_t size; int32_t event_idx, indirect;
    uint32_t last_avail, used_idx;
    int32_t fd; int32_t readonly; uint64_t capacity;
    uint32_t served; int32_t left; int32_t err_errno;
};
int hvq_blk_serve(struct hvq_blk *q);
CDEF-END */

/* guest RAM as hv_native.c's struct hv_region describes it (this file follows hv_native.c
 * in the one translation unit build_native.py compiles) */
struct hvq_blk {
    int32_t nregions; struct hv_region regions[HV_MAX_REGIONS]; uint8_t *dirty; void *invalidate;
    uint64_t desc, avail, used; uint32_t size; int32_t event_idx, indirect;
    uint32_t last_avail, used_idx;
    int32_t fd; int32_t readonly; uint64_t capacity;
    uint32_t served; int32_t left; int32_t err_errno;
};

#define HVQ_F_NEXT 1u
#define HVQ_F_WRITE 2u
#define HVQ_F_INDIRECT 4u
#define HVQ_MAX_INDIRECT 1024u
#define HVQ_MAX_SEGS 256u        /* seg_max (254) + header + status */
#define HVQ_SECTOR 512u
#define HVQ_T_IN 0u
#define HVQ_T_OUT 1u
#define HVQ_PAGE_SHIFT 12

/* Why hvq_blk_serve returned (q->left): the ring is empty, or the next request is left to Python. */
enum { HVQ_EMPTY = 0, HVQ_LEFT = 1 };

typedef void (*hvq_invalidate_fn)(void *host, size_t len);

struct hvq_seg { uint8_t *host; uint64_t ram_offset; uint32_t len; int writable; };

/* The host address of gpa..gpa+len (len >= 1) if it lies inside one region, else NULL. */
static struct hv_region *hvq_region(struct hvq_blk *q, uint64_t gpa, uint64_t len)
{
    for (int i = 0; i < q->nregions; i++) {
        struct hv_region *r = &q->regions[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len)
            return r;
    }
    return NULL;
}

static uint8_t *hvq_host(struct hvq_blk *q, uint64_t gpa, uint64_t len, uint64_t *ram_offset)
{
    struct hv_region *r = hvq_region(q, gpa, len);
    if (r == NULL)
        return NULL;
    if (ram_offset)
        *ram_offset = r->ram_offset + (gpa - r->gpa);
    return r->host + (gpa - r->gpa);
}

/* The VMM wrote len (>= 1) bytes at RAM offset off / host address host. */
static void hvq_written(struct hvq_blk *q, uint64_t off, uint8_t *host, uint64_t len)
{
    for (uint64_t page = off >> HVQ_PAGE_SHIFT, last = (off + len - 1) >> HVQ_PAGE_SHIFT; page <= last; page++)
        q->dirty[page >> 3] |= (uint8_t)(1u << (page & 7));
    if (q->invalidate)
        ((hvq_invalidate_fn)q->invalidate)(host, (size_t)len);
}

static int hvq_read16(struct hvq_blk *q, uint64_t gpa, uint16_t *out)
{
    uint8_t *p = hvq_host(q, gpa, 2, NULL);
    if (p == NULL)
        return -1;
    *out = __atomic_load_n((uint16_t *)p, __ATOMIC_ACQUIRE);
    return 0;
}

static int hvq_write16(struct hvq_blk *q, uint64_t gpa, uint16_t value)
{
    uint64_t off;
    uint8_t *p = hvq_host(q, gpa, 2, &off);
    if (p == NULL)
        return -1;
    __atomic_store_n((uint16_t *)p, value, __ATOMIC_RELEASE);
    hvq_written(q, off, p, 2);
    return 0;
}

/* Walk the chain at head under virtqueue.py's rules; 0 with segs/nsegs set, -1 if anything
 * is off (or more than HVQ_MAX_SEGS buffers): Python then walks it and says what. */
static int hvq_walk(struct hvq_blk *q, uint32_t head, struct hvq_seg *segs, uint32_t *nsegs)
{
    uint64_t table = q->desc, total = 0;
    uint32_t table_size = q->size, index = head, visited = 0, n = 0;
    int in_indirect = 0, seen_writable = 0;
    if (head >= q->size)
        return -1;
    for (;;) {
        if (++visited > (in_indirect ? HVQ_MAX_INDIRECT : q->size))
            return -1;
        uint8_t *d = hvq_host(q, table + 16ull * index, 16, NULL);
        if (d == NULL)
            return -1;
        uint64_t addr;
        uint32_t len;
        uint16_t flags, next;
        memcpy(&addr, d, 8);
        memcpy(&len, d + 8, 4);
        memcpy(&flags, d + 12, 2);
        memcpy(&next, d + 14, 2);
        if (flags & HVQ_F_INDIRECT) {
            if (!q->indirect || in_indirect || (flags & HVQ_F_NEXT) || len == 0 || len % 16
                || len / 16 > HVQ_MAX_INDIRECT || hvq_region(q, addr, len) == NULL)
                return -1;
            table = addr;
            table_size = len / 16;
            index = 0;
            in_indirect = 1;
            visited = 0;
            continue;
        }
        if (len == 0 || n == HVQ_MAX_SEGS)
            return -1;                  /* zero-length buffers and long chains: Python's */
        uint64_t off;
        uint8_t *host = hvq_host(q, addr, len, &off);
        if (host == NULL)
            return -1;
        total += len;
        if (total > (1ull << 32))
            return -1;
        int writable = (flags & HVQ_F_WRITE) != 0;
        if (!writable && seen_writable)
            return -1;
        seen_writable |= writable;
        segs[n].host = host;
        segs[n].ram_offset = off;
        segs[n].len = len;
        segs[n].writable = writable;
        n++;
        if (!(flags & HVQ_F_NEXT))
            break;
        if (next >= table_size)
            return -1;
        index = next;
    }
    *nsegs = n;
    return 0;
}

/* Serve one walked request: 1 served (*written set), 0 left to Python. */
static int hvq_serve_one(struct hvq_blk *q, struct hvq_seg *segs, uint32_t n, uint32_t *written)
{
    uint32_t nread = 0;
    uint64_t readable = 0, writable = 0;
    while (nread < n && !segs[nread].writable)
        readable += segs[nread++].len;
    for (uint32_t i = nread; i < n; i++)
        writable += segs[i].len;
    if (readable < 16 || writable < 1)
        return 0;
    uint8_t header[16];
    for (uint32_t i = 0, got = 0; got < 16; i++) {
        uint32_t take = segs[i].len < 16 - got ? segs[i].len : 16 - got;
        memcpy(header + got, segs[i].host, take);
        got += take;
    }
    uint32_t type;
    uint64_t sector;
    memcpy(&type, header, 4);
    memcpy(&sector, header + 8, 8);
    struct iovec iov[HVQ_MAX_SEGS];
    int niov = 0;
    uint64_t length;
    if (type == HVQ_T_IN) {
        length = writable - 1;
        uint64_t left = length;
        for (uint32_t i = nread; i < n && left; i++) {
            uint64_t take = segs[i].len < left ? segs[i].len : left;
            iov[niov].iov_base = segs[i].host;
            iov[niov++].iov_len = take;
            left -= take;
        }
    } else if (type == HVQ_T_OUT && !q->readonly) {
        length = readable - 16;
        uint64_t skip = 16;
        for (uint32_t i = 0; i < nread; i++) {
            if (skip >= segs[i].len) {
                skip -= segs[i].len;
                continue;
            }
            iov[niov].iov_base = segs[i].host + skip;
            iov[niov++].iov_len = segs[i].len - skip;
            skip = 0;
        }
    } else {
        return 0;                       /* flush, identify, discard, read-only write, unknown */
    }
    if (length % HVQ_SECTOR || sector > q->capacity || length / HVQ_SECTOR > q->capacity - sector)
        return 0;                       /* IOERR: Python's */
    if (type == HVQ_T_IN && length >= 0xFFFFFFFFull)
        return 0;                       /* its used length would not fit in 32 bits: Python's */
    /* the status byte: the last byte of the last buffer (its length is >= 1) */
    struct hvq_seg *last = &segs[n - 1];
    uint64_t offset = sector * HVQ_SECTOR, done = 0;
    int i = 0;
    while (done < length) {
        ssize_t got = type == HVQ_T_IN ? preadv(q->fd, iov + i, niov - i, (off_t)(offset + done))
                                       : pwritev(q->fd, iov + i, niov - i, (off_t)(offset + done));
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0) {
            q->err_errno = got < 0 ? errno : EIO;
            if (type == HVQ_T_IN && done)
                goto mark_read;        /* what landed is guest RAM the VMM wrote */
            return 0;                   /* Python retries it and answers IOERR */
        }
        done += (uint64_t)got;
        hvs_advance(iov, niov, &i, (size_t)got);   /* hv_native_stream.c's, for short transfers */
    }
mark_read:
    if (type == HVQ_T_IN) {
        uint64_t left = done;
        for (uint32_t s = nread; s < n && left; s++) {
            uint64_t take = segs[s].len < left ? segs[s].len : left;
            hvq_written(q, segs[s].ram_offset, segs[s].host, take);
            left -= take;
        }
        if (done < length)
            return 0;
    }
    last->host[last->len - 1] = 0;      /* S_OK */
    hvq_written(q, last->ram_offset + last->len - 1, last->host + last->len - 1, 1);
    *written = type == HVQ_T_IN ? (uint32_t)length + 1 : 1;
    return 1;
}

/* Used entries pending[0..count) at the ring's used index, then the index. */
static int hvq_flush(struct hvq_blk *q, const uint32_t *pending, uint32_t count)
{
    if (count == 0)
        return 0;                       /* nothing written, nothing marked */
    for (uint32_t pos = 0; pos < count;) {
        uint32_t slot = (q->used_idx + pos) % q->size;
        uint32_t run = count - pos < q->size - slot ? count - pos : q->size - slot;
        uint64_t off;
        uint8_t *p = hvq_host(q, q->used + 4 + 8ull * slot, 8ull * run, &off);
        if (p == NULL)
            return -1;
        memcpy(p, pending + 2 * pos, 8ull * run);
        hvq_written(q, off, p, 8ull * run);
        pos += run;
    }
    __atomic_thread_fence(__ATOMIC_RELEASE);
    q->used_idx = (q->used_idx + count) & 0xFFFF;
    return hvq_write16(q, q->used + 2, (uint16_t)q->used_idx);
}

/* Serve requests from the available ring until it is empty or the next one is left to
 * Python (q->left); q->served counts them, last_avail and used_idx move on. The used
 * ring must lie in RAM (Python checked it when the queue was enabled; if not, -1 and
 * nothing is left pending). Returns 0, or -1. */
int hvq_blk_serve(struct hvq_blk *q)
{
    uint32_t pending[2 * 1024];         /* (head, written) of what is not yet in the used ring */
    struct hvq_seg segs[HVQ_MAX_SEGS];
    uint32_t count = 0;
    q->served = 0;
    q->left = HVQ_EMPTY;
    q->err_errno = 0;
    if (q->size == 0 || q->size > 1024 || (q->size & (q->size - 1)))
        return -1;
    for (;;) {
        uint16_t avail_idx, head;
        if (hvq_read16(q, q->avail + 2, &avail_idx) < 0) {
            q->left = HVQ_LEFT;
            break;
        }
        uint32_t pending_avail = (avail_idx - q->last_avail) & 0xFFFF;
        if (pending_avail == 0)
            break;
        if (pending_avail > q->size
            || hvq_read16(q, q->avail + 4 + 2ull * (q->last_avail % q->size), &head) < 0) {
            q->left = HVQ_LEFT;
            break;
        }
        uint32_t nsegs, written = 0;
        if (hvq_walk(q, head, segs, &nsegs) < 0 || !hvq_serve_one(q, segs, nsegs, &written)) {
            q->left = HVQ_LEFT;
            break;
        }
        q->last_avail = (q->last_avail + 1) & 0xFFFF;
        if (q->event_idx) {             /* avail_event, then a full fence before the next read of
                                           * the avail index (the driver fences the other way) */
            if (hvq_write16(q, q->used + 4 + 8ull * q->size, (uint16_t)q->last_avail) < 0)
                return -1;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
        }
        pending[2 * count] = head;
        pending[2 * count + 1] = written;
        count++;
        q->served++;
        if (count == q->size) {
            if (hvq_flush(q, pending, count) < 0)
                return -1;
            count = 0;
        }
    }
    return hvq_flush(q, pending, count);
}
