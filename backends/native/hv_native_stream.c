/* The migration stream's per-byte work in native code (hv/migration/stream_native.py).
 *
 * Both ends of a live migration spend their time on a handful of loops over guest RAM:
 * the source tells zero pages from data pages, copies the data pages out of a running
 * guest and checksums the copy; the destination reads page data into guest RAM and
 * checksums it. Done in Python those loops cost one call, one slice and a few syscalls per
 * section; here they are one call per section (source), one call per chunk of sections
 * sent straight from a running guest's RAM to a socket (source, RAM_LIVE: hvs_send_live),
 * or one call per section with no extra syscall (destination: framing is read ahead into a
 * staging buffer, page data straight into guest RAM with readv/recvmsg).
 *
 * The checksum is zlib's CRC-32 (the stream format's), computed with PCLMULQDQ folding
 * (Intel, "Fast CRC Computation for Generic Polynomials Using PCLMULQDQ Instruction";
 * constants as in Linux's crc32-pclmul). Without PCLMULQDQ (or on another architecture)
 * hvs_available() returns 0 and Python keeps its own paths. Format 1.7's RAM_HASHED
 * sections carry an XXH3-64 per page instead, after the pages: the source hashes each
 * group of pages right after sending it (hvs_send_hashed), the destination each page as it
 * lands (hvs_hash_pages), and compares when the trailer arrives.
 *
 * The receiver trusts nothing: it applies a RAM section only after the section header, its
 * run header and its whole page-kind map are buffered and valid (page numbers inside guest
 * RAM, each run inside one region, the length matching the map). Anything else (another
 * section type, a malformed RAM section, end of input before the map) is left unconsumed
 * in the staging buffer for the Python reader, which reads it from there and raises its
 * own error. Only a checksum mismatch, a read error and end of input inside page data or
 * the checksum are reported from here.
 */
/* vmsplice, splice, pipe2 and F_SETPIPE_SZ need _GNU_SOURCE, which Python.h (included
 * first by cffi) defines. */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

/* CDEF-BEGIN
struct hvs_region { uint64_t first_page; uint64_t pages; uint8_t *host; };
struct hvs_rx {
    int32_t fd; int32_t is_socket; int32_t poll_ms; int32_t nregions;
    uint64_t page_count; struct hvs_region regions[16]; uint8_t *covered;
    uint8_t *buf; uint32_t cap, pos, len;
    int32_t state; uint32_t length, count, normal, zero; uint64_t start;
    uint64_t data_done; uint32_t crc; uint64_t section_bytes;
    uint64_t received; int32_t err_errno; uint32_t stored_crc, computed_crc; const char *what;
    uint8_t kinds[8192];
    int32_t live_ok; int32_t live; uint32_t page_crc; uint32_t torn; uint64_t torn_total;
    uint32_t crcs[8192]; uint8_t torn_map[8192];
    uint8_t *pristine;
    int32_t hashed_ok; int32_t hashed; uint64_t hashes[8192];
};
int hvs_available(void);
uint64_t hvs_xxh3_page(const uint8_t *page);
int hvs_use_wide_hash(int on);
uint32_t hvs_crc32(uint32_t crc, const uint8_t *p, size_t n);
void hvs_set_crc(void *fn);
int hvs_use_wide_crc(int on);
int64_t hvs_pack(const uint8_t *src, uint64_t start, uint32_t npages, const uint8_t *known_zero,
                 uint8_t *out, uint8_t *copy, uint32_t *crc_out);
int64_t hvs_pack_live(const uint8_t *src, uint64_t start, uint32_t npages, const uint8_t *known_zero,
                      uint8_t *out, uint32_t *crc_out);
int hvs_rx_step(struct hvs_rx *rx);
size_t hvs_rx_take(struct hvs_rx *rx, uint8_t *dst, size_t n);
struct hvs_tx {
    int32_t fd; int32_t timeout_ms;
    uint64_t bytes; uint32_t zero, normal; int32_t err_errno; int32_t splice; int32_t hashed;
};
int hvs_send_live(struct hvs_tx *tx, const uint8_t *src, uint64_t start, uint32_t npages,
                  const uint8_t *known_zero, uint32_t run_pages, uint8_t *meta);
CDEF-END */

#define HVS_PAGE 4096u
#define HVS_MAX_RUN_PAGES 8192u
#define HVS_MAX_SECTION (64u << 20)
#define HVS_TYPE_RAM 3
#define HVS_TYPE_RAM_LIVE 11
#define HVS_TYPE_RAM_HASHED 14
#define HVS_HEAD 8u
#define HVS_RUN 16u
#define HVS_MAX_REGIONS 16
#define HVS_IOV 1024
#define HVS_READ_CHUNK (256u << 10)

enum { RX_RAM = 1, RX_OTHER = 2, RX_WAIT = 3, RX_EOF = 4, RX_OSERROR = 5, RX_BADCRC = 6 };
enum { ST_PEEK = 0, ST_DATA = 1, ST_CRC = 2 };

struct hvs_region { uint64_t first_page; uint64_t pages; uint8_t *host; };
struct hvs_rx {
    int32_t fd; int32_t is_socket; int32_t poll_ms; int32_t nregions;
    uint64_t page_count; struct hvs_region regions[HVS_MAX_REGIONS]; uint8_t *covered;
    uint8_t *buf; uint32_t cap, pos, len;       /* staging: bytes [pos, len) are unconsumed */
    int32_t state; uint32_t length, count, normal, zero; uint64_t start;
    uint64_t data_done; uint32_t crc; uint64_t section_bytes;
    uint64_t received; int32_t err_errno; uint32_t stored_crc, computed_crc; const char *what;
    uint8_t kinds[HVS_MAX_RUN_PAGES];
    /* format 1.5 RAM_LIVE sections (live_ok: the stream declared >= 1.5) */
    int32_t live_ok; int32_t live; uint32_t page_crc; uint32_t torn; uint64_t torn_total;
    uint32_t crcs[HVS_MAX_RUN_PAGES]; uint8_t torn_map[HVS_MAX_RUN_PAGES];
    /* NULL, or one byte per page of guest RAM: 1 = known zero (never populated when the
     * destination was created, and written by nothing since); cleared here for every page a
     * section brings data for, before the data lands */
    uint8_t *pristine;
    /* format 1.7 RAM_HASHED sections (hashed_ok: the stream declared >= 1.7): the XXH3-64
     * of each normal page, computed as its last byte lands, compared with the trailer */
    int32_t hashed_ok; int32_t hashed; uint64_t hashes[HVS_MAX_RUN_PAGES];
};

/* -- CRC-32 (zlib's: reflected 0xEDB88320, pre- and post-inverted) ------------------- */
static uint32_t hvs_table[256];
static volatile int hvs_table_ready;

static void hvs_make_table(void)
{
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
        hvs_table[i] = c;
    }
    __atomic_store_n(&hvs_table_ready, 1, __ATOMIC_RELEASE);
}

/* The raw (not inverted) CRC of n bytes, a byte at a time: tails and short buffers. */
static uint32_t hvs_crc_bytes(uint32_t crc, const uint8_t *p, size_t n)
{
    while (n--)
        crc = hvs_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__)
#define HVS_TARGET __attribute__((target("pclmul,sse4.1")))

HVS_TARGET static inline __m128i hvs_fold(__m128i x, __m128i k, __m128i next)
{
    __m128i lo = _mm_clmulepi64_si128(x, k, 0x00);
    __m128i hi = _mm_clmulepi64_si128(x, k, 0x11);
    return _mm_xor_si128(_mm_xor_si128(lo, hi), next);
}

/* The 16 bytes at src; when *dst is not NULL they are also stored there and *dst advances
 * (the copy reads guest RAM once, into the register the checksum then folds). */
HVS_TARGET static inline __m128i hvs_take16(const uint8_t *src, uint8_t **dst)
{
    __m128i v = _mm_loadu_si128((const __m128i *)src);
    if (*dst) {
        _mm_storeu_si128((__m128i *)*dst, v);
        *dst += 16;
    }
    return v;
}

/* The raw CRC of the 16 bytes left after folding: 128 -> 64 bits (also appends 32 zero
 * bits), 64 -> 32, Barrett reduction. */
HVS_TARGET static inline uint32_t hvs_reduce(__m128i a)
{
    const __m128i k34 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    const __m128i mask32 = _mm_set_epi32(0, 0, 0, -1);
    const __m128i k5 = _mm_set_epi64x(0, 0x163cd6124LL);
    const __m128i poly = _mm_set_epi64x(0x1F7011641LL, 0x1DB710641LL);
    __m128i t = _mm_clmulepi64_si128(k34, a, 0x01);
    a = _mm_xor_si128(_mm_srli_si128(a, 8), t);
    t = _mm_srli_si128(a, 4);
    a = _mm_clmulepi64_si128(_mm_and_si128(a, mask32), k5, 0x00);
    a = _mm_xor_si128(a, t);
    t = a;
    a = _mm_clmulepi64_si128(_mm_and_si128(a, mask32), poly, 0x10);
    a = _mm_clmulepi64_si128(_mm_and_si128(a, mask32), poly, 0x00);
    a = _mm_xor_si128(a, t);
    return (uint32_t)_mm_extract_epi32(a, 1);
}

/* The raw CRC of n >= 64 bytes from src; when dst is not NULL the bytes are also stored
 * there (the copy and the checksum read guest RAM once, from the same registers). */
HVS_TARGET static uint32_t hvs_crc_fold(uint32_t crc, const uint8_t *src, uint8_t *dst, size_t n)
{
    const __m128i k12 = _mm_set_epi64x(0x1c6e41596LL, 0x154442bd4LL);
    const __m128i k34 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    __m128i a = hvs_take16(src, &dst);
    __m128i b = hvs_take16(src + 16, &dst);
    __m128i c = hvs_take16(src + 32, &dst);
    __m128i d = hvs_take16(src + 48, &dst);
    a = _mm_xor_si128(a, _mm_cvtsi32_si128((int)crc));
    src += 64;
    n -= 64;
    while (n >= 64) {
        a = hvs_fold(a, k12, hvs_take16(src, &dst));
        b = hvs_fold(b, k12, hvs_take16(src + 16, &dst));
        c = hvs_fold(c, k12, hvs_take16(src + 32, &dst));
        d = hvs_fold(d, k12, hvs_take16(src + 48, &dst));
        src += 64;
        n -= 64;
    }
    a = hvs_fold(a, k34, b);
    a = hvs_fold(a, k34, c);
    a = hvs_fold(a, k34, d);
    while (n >= 16) {
        a = hvs_fold(a, k34, hvs_take16(src, &dst));
        src += 16;
        n -= 16;
    }
    crc = hvs_reduce(a);
    if (n) {
        if (dst)
            memcpy(dst, src, n);
        crc = hvs_crc_bytes(crc, src, n);
    }
    return crc;
}

/* The same CRC with 256-bit VPCLMULQDQ (AVX2): eight 16-byte lanes folded 128 bytes at a
 * time, two carry-less products per instruction. Where the CPU has it but not AVX-512
 * (ISA-L's fastest path), PCLMULQDQ's throughput bounds every 128-bit fold, ISA-L's
 * included: 6.4 GiB/s for ISA-L and 5.9 for hvs_crc_fold on 4 KiB pages here, against
 * about twice that for this loop (test_stream_native compares it with zlib). */
#define HVS_TARGET256 __attribute__((target("pclmul,sse4.1,avx2,vpclmulqdq")))
static int hvs_wide_crc;  /* set by hvs_available() when the CPU and OS allow it */

static int hvs_wide_crc_runs(void)  /* the CPU (and the OS, for ymm state) can run it */
{
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("vpclmulqdq");
}

HVS_TARGET256 static inline __m256i hvs_fold256(__m256i x, __m256i k, __m256i next)
{
    __m256i lo = _mm256_clmulepi64_epi128(x, k, 0x00);
    __m256i hi = _mm256_clmulepi64_epi128(x, k, 0x11);
    return _mm256_xor_si256(_mm256_xor_si256(lo, hi), next);
}

/* The raw CRC of n >= 256 bytes. */
HVS_TARGET256 static uint32_t hvs_crc_fold256(uint32_t crc, const uint8_t *src, size_t n)
{
    /* x^(1024+32) and x^(1024-32) mod P, bit-reflected and shifted as k12/k34 above:
     * the fold by 128 bytes */
    const __m256i k1024 = _mm256_set_epi64x(0x14a7fe880LL, 0x1e88ef372LL, 0x14a7fe880LL, 0x1e88ef372LL);
    const __m128i k34 = _mm_set_epi64x(0x0ccaa009eLL, 0x1751997d0LL);
    __m256i a = _mm256_loadu_si256((const __m256i *)src);
    __m256i b = _mm256_loadu_si256((const __m256i *)(src + 32));
    __m256i c = _mm256_loadu_si256((const __m256i *)(src + 64));
    __m256i d = _mm256_loadu_si256((const __m256i *)(src + 96));
    a = _mm256_xor_si256(a, _mm256_set_epi32(0, 0, 0, 0, 0, 0, 0, (int)crc));
    src += 128;
    n -= 128;
    while (n >= 128) {
        a = hvs_fold256(a, k1024, _mm256_loadu_si256((const __m256i *)src));
        b = hvs_fold256(b, k1024, _mm256_loadu_si256((const __m256i *)(src + 32)));
        c = hvs_fold256(c, k1024, _mm256_loadu_si256((const __m256i *)(src + 64)));
        d = hvs_fold256(d, k1024, _mm256_loadu_si256((const __m256i *)(src + 96)));
        src += 128;
        n -= 128;
    }
    /* the eight lanes, in stream order, folded into one 16 bytes at a time */
    __m128i x = _mm256_castsi256_si128(a);
    x = hvs_fold(x, k34, _mm256_extracti128_si256(a, 1));
    x = hvs_fold(x, k34, _mm256_castsi256_si128(b));
    x = hvs_fold(x, k34, _mm256_extracti128_si256(b, 1));
    x = hvs_fold(x, k34, _mm256_castsi256_si128(c));
    x = hvs_fold(x, k34, _mm256_extracti128_si256(c, 1));
    x = hvs_fold(x, k34, _mm256_castsi256_si128(d));
    x = hvs_fold(x, k34, _mm256_extracti128_si256(d, 1));
    while (n >= 16) {
        x = hvs_fold(x, k34, _mm_loadu_si128((const __m128i *)src));
        src += 16;
        n -= 16;
    }
    crc = hvs_reduce(x);
    return n ? hvs_crc_bytes(crc, src, n) : crc;
}
#endif

static int hvs_wide_hash;  /* XXH3's AVX2 loop: set by hvs_available() where the CPU has it */

int hvs_available(void)
{
#if defined(__x86_64__)
    __builtin_cpu_init();
    if (!__builtin_cpu_supports("pclmul") || !__builtin_cpu_supports("sse4.1"))
        return 0;
    hvs_wide_crc = hvs_wide_crc_runs() && !__builtin_cpu_supports("avx512f");
    hvs_wide_hash = __builtin_cpu_supports("avx2");
    if (!__atomic_load_n(&hvs_table_ready, __ATOMIC_ACQUIRE))
        hvs_make_table();
    return 1;
#else
    return 0;
#endif
}

/* Raw CRC update, copying to dst too when it is not NULL. Callers checked hvs_available(). */
static uint32_t hvs_crc_raw(uint32_t crc, const uint8_t *src, uint8_t *dst, size_t n)
{
#if defined(__x86_64__)
    if (n >= 64)
        return hvs_crc_fold(crc, src, dst, n);
#endif
    if (dst && n)
        memcpy(dst, src, n);
    return hvs_crc_bytes(crc, src, n);
}

/* ISA-L's crc32_gzip_refl (zlib's CRC-32, AVX-512/VPCLMULQDQ where the CPU has it; about
 * 20 GiB/s here against ~3-9 for the 128-bit folding above), found by Python in the isal
 * package's extension module and checked against zlib before it is handed in. */
typedef uint32_t (*hvs_crc_fn)(uint32_t crc, const uint8_t *p, uint64_t n);
static hvs_crc_fn hvs_fast_crc;

void hvs_set_crc(void *fn)
{
    hvs_fast_crc = (hvs_crc_fn)fn;
}

/* Which CRC loop runs: 1 the 256-bit fold, 0 the others (ISA-L if handed in, else the
 * 128-bit fold). Tests set it to compare both with zlib; a CPU without AVX2 and
 * VPCLMULQDQ never runs the first. Returns the choice in force. */
int hvs_use_wide_crc(int on)
{
#if defined(__x86_64__)
    if (on >= 0)
        hvs_wide_crc = on && hvs_wide_crc_runs();
    return hvs_wide_crc;
#else
    (void)on;
    return 0;
#endif
}

/* zlib.crc32(data, crc): the stream's checksum (tests compare it with zlib's). */
uint32_t hvs_crc32(uint32_t crc, const uint8_t *p, size_t n)
{
    if (!__atomic_load_n(&hvs_table_ready, __ATOMIC_ACQUIRE))
        hvs_make_table();
#if defined(__x86_64__)
    if (hvs_wide_crc && n >= 256)
        return ~hvs_crc_fold256(~crc, p, n);
#endif
    if (hvs_fast_crc)
        return hvs_fast_crc(crc, p, n);
    return ~hvs_crc_raw(~crc, p, NULL, n);
}

/* Checksum (zlib form) of n bytes at src, copied to dst too when dst is not NULL. */
static uint32_t hvs_crc_copy(uint32_t crc, const uint8_t *src, uint8_t *dst, size_t n)
{
#if defined(__x86_64__)
    if (hvs_wide_crc && !dst && n >= 256)
        return ~hvs_crc_fold256(~crc, src, n);
#endif
    if (!hvs_fast_crc)
        return ~hvs_crc_raw(~crc, src, dst, n);
    if (!dst)
        return hvs_fast_crc(crc, src, n);
    /* copy in L2-sized pieces and checksum each while it is cached */
    for (size_t done = 0; done < n;) {
        size_t part = n - done < (64u << 10) ? n - done : (64u << 10);
        memcpy(dst + done, src + done, part);
        crc = hvs_fast_crc(crc, dst + done, part);
        done += part;
    }
    return crc;
}

/* -- XXH3-64 of one 4 KiB page (format 1.7 page hashes) ------------------------------ */
/* XXH3_64bits(page, 4096) with seed 0 and the default secret (xxHash's specification,
 * "XXH3 long input": 1024-byte blocks of 16 stripes, the accumulator scrambled after
 * each, 15 stripes and the last 64 bytes, then the merge). Written for exactly 4096
 * bytes; tests check it against values the reference implementation gives. An AVX2 loop
 * where the CPU has it, else the scalar one (the same arithmetic, lane by lane). */
#define HVS_P32_1 0x9E3779B1u
#define HVS_P32_2 0x85EBCA77u
#define HVS_P32_3 0xC2B2AE3Du
#define HVS_P64_1 0x9E3779B185EBCA87ull
#define HVS_P64_2 0xC2B2AE3D27D4EB4Full
#define HVS_P64_3 0x165667B19E3779F9ull
#define HVS_P64_4 0x85EBCA77C2B2AE63ull
#define HVS_P64_5 0x27D4EB2F165667C5ull

static const uint8_t hvs_xxh_secret[192] = {
    0xb8, 0xfe, 0x6c, 0x39, 0x23, 0xa4, 0x4b, 0xbe, 0x7c, 0x01, 0x81, 0x2c, 0xf7, 0x21, 0xad, 0x1c,
    0xde, 0xd4, 0x6d, 0xe9, 0x83, 0x90, 0x97, 0xdb, 0x72, 0x40, 0xa4, 0xa4, 0xb7, 0xb3, 0x67, 0x1f,
    0xcb, 0x79, 0xe6, 0x4e, 0xcc, 0xc0, 0xe5, 0x78, 0x82, 0x5a, 0xd0, 0x7d, 0xcc, 0xff, 0x72, 0x21,
    0xb8, 0x08, 0x46, 0x74, 0xf7, 0x43, 0x24, 0x8e, 0xe0, 0x35, 0x90, 0xe6, 0x81, 0x3a, 0x26, 0x4c,
    0x3c, 0x28, 0x52, 0xbb, 0x91, 0xc3, 0x00, 0xcb, 0x88, 0xd0, 0x65, 0x8b, 0x1b, 0x53, 0x2e, 0xa3,
    0x71, 0x64, 0x48, 0x97, 0xa2, 0x0d, 0xf9, 0x4e, 0x38, 0x19, 0xef, 0x46, 0xa9, 0xde, 0xac, 0xd8,
    0xa8, 0xfa, 0x76, 0x3f, 0xe3, 0x9c, 0x34, 0x3f, 0xf9, 0xdc, 0xbb, 0xc7, 0xc7, 0x0b, 0x4f, 0x1d,
    0x8a, 0x51, 0xe0, 0x4b, 0xcd, 0xb4, 0x59, 0x31, 0xc8, 0x9f, 0x7e, 0xc9, 0xd9, 0x78, 0x73, 0x64,
    0xea, 0xc5, 0xac, 0x83, 0x34, 0xd3, 0xeb, 0xc3, 0xc5, 0x81, 0xa0, 0xff, 0xfa, 0x13, 0x63, 0xeb,
    0x17, 0x0d, 0xdd, 0x51, 0xb7, 0xf0, 0xda, 0x49, 0xd3, 0x16, 0x55, 0x26, 0x29, 0xd4, 0x68, 0x9e,
    0x2b, 0x16, 0xbe, 0x58, 0x7d, 0x47, 0xa1, 0xfc, 0x8f, 0xf8, 0xb8, 0xd1, 0x7a, 0xd0, 0x31, 0xce,
    0x45, 0xcb, 0x3a, 0x8f, 0x95, 0x16, 0x04, 0x28, 0xaf, 0xd7, 0xfb, 0xca, 0xbb, 0x4b, 0x40, 0x7e,
};
static const uint64_t hvs_xxh_init[8] = {
    HVS_P32_3, HVS_P64_1, HVS_P64_2, HVS_P64_3, HVS_P64_4, HVS_P32_2, HVS_P64_5, HVS_P32_1,
};

static uint64_t hvs_rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

static void hvs_xxh_stripe(uint64_t *acc, const uint8_t *in, const uint8_t *secret)
{
    for (int i = 0; i < 8; i++) {
        uint64_t data = hvs_rd64(in + 8 * i), key = data ^ hvs_rd64(secret + 8 * i);
        acc[i ^ 1] += data;
        acc[i] += (uint64_t)(uint32_t)key * (key >> 32);
    }
}

static void hvs_xxh_scramble(uint64_t *acc, const uint8_t *secret)
{
    for (int i = 0; i < 8; i++) {
        uint64_t a = acc[i];
        a ^= a >> 47;
        a ^= hvs_rd64(secret + 8 * i);
        acc[i] = a * HVS_P32_1;
    }
}

static uint64_t hvs_xxh_mix(uint64_t a, uint64_t b)
{
    __uint128_t product = (__uint128_t)a * b;
    return (uint64_t)product ^ (uint64_t)(product >> 64);
}

/* The merge of the 8 accumulators into the 64-bit hash of a 4096-byte input. */
static uint64_t hvs_xxh_merge(const uint64_t *acc)
{
    uint64_t result = 4096ull * HVS_P64_1;
    for (int i = 0; i < 4; i++)
        result += hvs_xxh_mix(acc[2 * i] ^ hvs_rd64(hvs_xxh_secret + 11 + 16 * i),
                              acc[2 * i + 1] ^ hvs_rd64(hvs_xxh_secret + 11 + 16 * i + 8));
    result ^= result >> 37;
    result *= 0x165667919E3779F9ull;
    return result ^ (result >> 32);
}

/* The walk over a 4096-byte page, with a loop's own stripe and scramble steps: three
 * 1024-byte blocks of 16 stripes, each followed by a scramble, then 15 stripes and the
 * last 64 bytes with the secret's tail. */
#define HVS_XXH_WALK(acc, page, stripe, scramble)                                              \
    do {                                                                                      \
        for (int block = 0; block < 3; block++) {                                             \
            for (int s = 0; s < 16; s++)                                                      \
                stripe(acc, (page) + block * 1024 + s * 64, hvs_xxh_secret + s * 8);          \
            scramble(acc, hvs_xxh_secret + 192 - 64);                                         \
        }                                                                                     \
        for (int s = 0; s < 15; s++)                                                          \
            stripe(acc, (page) + 3072 + s * 64, hvs_xxh_secret + s * 8);                      \
        stripe(acc, (page) + 4096 - 64, hvs_xxh_secret + 192 - 64 - 7);                       \
    } while (0)

static uint64_t hvs_xxh3_page_scalar(const uint8_t *page)
{
    uint64_t acc[8];
    memcpy(acc, hvs_xxh_init, sizeof acc);
    HVS_XXH_WALK(acc, page, hvs_xxh_stripe, hvs_xxh_scramble);
    return hvs_xxh_merge(acc);
}

#if defined(__x86_64__)
#define HVS_TARGET_AVX2 __attribute__((target("avx2")))
HVS_TARGET_AVX2 static inline void hvs_xxh_stripe256(__m256i *acc, const uint8_t *in, const uint8_t *secret)
{
    for (int i = 0; i < 2; i++) {
        __m256i data = _mm256_loadu_si256((const __m256i *)(in + 32 * i));
        __m256i key = _mm256_xor_si256(data, _mm256_loadu_si256((const __m256i *)(secret + 32 * i)));
        __m256i product = _mm256_mul_epu32(key, _mm256_srli_epi64(key, 32));
        __m256i swapped = _mm256_shuffle_epi32(data, _MM_SHUFFLE(1, 0, 3, 2));
        acc[i] = _mm256_add_epi64(acc[i], _mm256_add_epi64(product, swapped));
    }
}

HVS_TARGET_AVX2 static inline void hvs_xxh_scramble256(__m256i *acc, const uint8_t *secret)
{
    const __m256i prime = _mm256_set1_epi32((int)HVS_P32_1);
    for (int i = 0; i < 2; i++) {
        __m256i a = _mm256_xor_si256(acc[i], _mm256_srli_epi64(acc[i], 47));
        a = _mm256_xor_si256(a, _mm256_loadu_si256((const __m256i *)(secret + 32 * i)));
        __m256i low = _mm256_mul_epu32(a, prime);
        __m256i high = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), prime);
        acc[i] = _mm256_add_epi64(low, _mm256_slli_epi64(high, 32));
    }
}

HVS_TARGET_AVX2 static uint64_t hvs_xxh3_page_avx2(const uint8_t *page)
{
    __m256i acc[2] = { _mm256_loadu_si256((const __m256i *)hvs_xxh_init),
                       _mm256_loadu_si256((const __m256i *)(hvs_xxh_init + 4)) };
    HVS_XXH_WALK(acc, page, hvs_xxh_stripe256, hvs_xxh_scramble256);
    uint64_t out[8];
    _mm256_storeu_si256((__m256i *)out, acc[0]);
    _mm256_storeu_si256((__m256i *)(out + 4), acc[1]);
    return hvs_xxh_merge(out);
}
#endif

/* Which loop hvs_xxh3_page runs: 1 AVX2 (only where the CPU has it), 0 scalar; -1 asks.
 * Tests run both against the reference values. */
int hvs_use_wide_hash(int on)
{
#if defined(__x86_64__)
    if (on >= 0)
        hvs_wide_hash = on && __builtin_cpu_supports("avx2");
    return hvs_wide_hash;
#else
    (void)on;
    return 0;
#endif
}

/* XXH3-64 of the 4096 bytes at page. */
uint64_t hvs_xxh3_page(const uint8_t *page)
{
#if defined(__x86_64__)
    if (hvs_wide_hash)
        return hvs_xxh3_page_avx2(page);
#endif
    return hvs_xxh3_page_scalar(page);
}

/* -- source: one RAM section --------------------------------------------------------- */
static int hvs_page_is_zero(const uint8_t *p)
{
    const uint64_t *w = (const uint64_t *)p;
    if (w[0] | w[1] | w[510] | w[511]) /* a data page usually says so at once */
        return 0;
    for (unsigned i = 0; i < HVS_PAGE / 8; i += 8)
        if (w[i] | w[i + 1] | w[i + 2] | w[i + 3] | w[i + 4] | w[i + 5] | w[i + 6] | w[i + 7])
            return 0;
    return 1;
}

static void hvs_put32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
static void hvs_put64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }

/* The section header (type, flags, length) and the run header (first page, page count)
 * that RAM and RAM_LIVE sections share. */
static void hvs_put_ram_head(uint8_t *out, uint8_t type, uint32_t length, uint64_t start, uint32_t npages)
{
    out[0] = type;
    out[1] = 0;
    out[2] = out[3] = 0;
    hvs_put32(out + 4, length);
    hvs_put64(out + 8, start);
    hvs_put32(out + 16, npages);
    hvs_put32(out + 20, 0);
}

/* The next run of normal pages (kind 1) in kinds[*at..n): its first page in *first and its
 * length returned (0: none left); *at moves past it. The source's packers and the
 * destination's iovecs walk a section's pages run by run with it. */
static inline uint32_t hvs_next_run(const uint8_t *kinds, uint32_t n, uint32_t *at, uint32_t *first)
{
    uint32_t i = *at;
    while (i < n && !kinds[i])
        i++;
    *first = i;
    while (i < n && kinds[i])
        i++;
    *at = i;
    return i - *first;
}

/* Frame npages pages at src (stream page numbers start..) as one RAM section.
 *
 * out receives the section header, the run header and the kind map (24 + npages bytes);
 * known_zero (NULL or one byte per page, 1 = never populated) skips reading such pages.
 * The normal pages are checksummed, and copied to copy (contiguous) when it is not NULL:
 * the guest may be running, and the copy is what must be sent so that the checksum and
 * the bytes on the wire agree. *crc_out is the section's checksum (zlib form). Returns
 * the number of normal pages (little-endian host assumed, as the stream format is). */
/* The kind map of npages pages at src into kinds (0 zero, 1 normal); known_zero as in
 * hvs_pack. Returns the number of normal pages. */
static uint32_t hvs_scan_kinds(const uint8_t *src, uint32_t npages, const uint8_t *known_zero, uint8_t *kinds)
{
    uint32_t normal = 0;
    for (uint32_t i = 0; i < npages; i++) {
        int zero = (known_zero && known_zero[i]) || hvs_page_is_zero(src + (uint64_t)i * HVS_PAGE);
        kinds[i] = zero ? 0 : 1;
        normal += !zero;
    }
    return normal;
}

int64_t hvs_pack(const uint8_t *src, uint64_t start, uint32_t npages, const uint8_t *known_zero,
                 uint8_t *out, uint8_t *copy, uint32_t *crc_out)
{
    if (npages == 0 || npages > HVS_MAX_RUN_PAGES)
        return -1;
    uint8_t *kinds = out + HVS_HEAD + HVS_RUN;
    uint32_t normal = hvs_scan_kinds(src, npages, known_zero, kinds);
    uint32_t length = HVS_RUN + npages + normal * HVS_PAGE;
    hvs_put_ram_head(out, HVS_TYPE_RAM, length, start, npages);
    uint32_t crc = hvs_crc_copy(0, out, NULL, HVS_HEAD + HVS_RUN + npages);
    for (uint32_t at = 0, first, run; (run = hvs_next_run(kinds, npages, &at, &first));) {
        size_t bytes = (size_t)run * HVS_PAGE;
        crc = hvs_crc_copy(crc, src + (uint64_t)first * HVS_PAGE, copy, bytes);
        if (copy)
            copy += bytes;
    }
    *crc_out = crc;
    return normal;
}

/* Frame npages pages at src as one RAM_LIVE section (format 1.5) without copying them:
 * out receives the section header, the run header, the kind map and the CRC-32 of each
 * normal page (24 + npages + 4 * normal bytes); the caller sends the normal pages from src
 * itself right after. *crc_out is the section's checksum, which covers those framing bytes
 * only (not the page data). A page the guest rewrites between its checksum here and its
 * copy into the socket arrives torn: the destination sees its page checksum fail, does not
 * count it as arrived, and the dirty log sends it again. Returns the number of normal pages. */
int64_t hvs_pack_live(const uint8_t *src, uint64_t start, uint32_t npages, const uint8_t *known_zero,
                      uint8_t *out, uint32_t *crc_out)
{
    if (npages == 0 || npages > HVS_MAX_RUN_PAGES)
        return -1;
    uint8_t *kinds = out + HVS_HEAD + HVS_RUN;
    uint8_t *crcs = kinds + npages;
    uint32_t normal = 0;
    for (uint32_t i = 0; i < npages; i++) {
        const uint8_t *page = src + (uint64_t)i * HVS_PAGE;
        int zero = (known_zero && known_zero[i]) || hvs_page_is_zero(page);
        kinds[i] = zero ? 0 : 1;
        if (!zero)
            hvs_put32(crcs + 4u * normal++, hvs_crc_copy(0, page, NULL, HVS_PAGE));
    }
    uint32_t length = HVS_RUN + npages + normal * (4u + HVS_PAGE);
    hvs_put_ram_head(out, HVS_TYPE_RAM_LIVE, length, start, npages);
    *crc_out = hvs_crc_copy(0, out, NULL, HVS_HEAD + HVS_RUN + npages + 4u * normal);
    return normal;
}

/* -- source: RAM_LIVE sections straight from guest RAM to the socket ------------------ */
struct hvs_tx {
    int32_t fd; int32_t timeout_ms;   /* a stream socket; how long a send may wait (-1: for good) */
    uint64_t bytes; uint32_t zero, normal; int32_t err_errno;   /* what the last call did */
    /* in: move page data into the socket by reference (hvs_splice_pages) instead of copying
     * it; cleared when this kernel cannot, the data then being copied by sendmsg */
    int32_t splice;
    /* in: send RAM_HASHED sections (format 1.7, the destination said "ram-hashed") */
    int32_t hashed;
};

/* Wait up to tx->timeout_ms for room in the socket. Returns 0, or -1 with tx->err_errno
 * (ETIMEDOUT when none came, as a Python socket timeout). */
static int hvs_wait_room(struct hvs_tx *tx)
{
    struct pollfd pfd = { tx->fd, POLLOUT, 0 };
    int ready = poll(&pfd, 1, tx->timeout_ms);
    if (ready == 0) {
        tx->err_errno = ETIMEDOUT;
        return -1;
    }
    if (ready < 0 && errno != EINTR) {
        tx->err_errno = errno;
        return -1;
    }
    return 0;
}

/* Skip done bytes of iov[*i..n): whole entries, then the front of a partly done one. */
static void hvs_advance(struct iovec *iov, int n, int *i, size_t done)
{
    while (*i < n && done >= iov[*i].iov_len) {
        done -= iov[*i].iov_len;
        (*i)++;
    }
    if (*i < n) {
        iov[*i].iov_base = (uint8_t *)iov[*i].iov_base + done;
        iov[*i].iov_len -= done;
    }
}

/* Send iov[0..n) whole: sendmsg, resumed after short writes; when the socket is full, wait
 * up to timeout_ms for room (ETIMEDOUT when none came, as a Python socket timeout). */
static int hvs_send_all(struct hvs_tx *tx, struct iovec *iov, int n)
{
    int i = 0;
    while (i < n) {
        struct msghdr msg;
        memset(&msg, 0, sizeof msg);
        msg.msg_iov = iov + i;
        msg.msg_iovlen = (size_t)(n - i);
        ssize_t sent = sendmsg(tx->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        if (sent < 0) {
            if (errno == EINTR)
                continue;
            if (errno != EAGAIN && errno != EWOULDBLOCK) {
                tx->err_errno = errno;
                return -1;
            }
            if (hvs_wait_room(tx) < 0)
                return -1;
            continue;
        }
        hvs_advance(iov, n, &i, (size_t)sent);
    }
    return 0;
}

/* The pipe hvs_splice_pages moves page references through: 1 MiB (256 pages) where the
 * system allows it, else the default 64 KiB. Returns 0, or -1 with tx->err_errno. */
static int hvs_open_pipe(struct hvs_tx *tx, int fds[2])
{
    if (pipe2(fds, O_CLOEXEC) < 0) {
        tx->err_errno = errno;
        return -1;
    }
    (void)fcntl(fds[1], F_SETPIPE_SZ, 1 << 20);
    return 0;
}

/* Send the page runs iov[0..n) without copying them: vmsplice puts references to the pages
 * into the pipe, splice moves them into the socket, and the destination's receive is the
 * only copy (on AF_UNIX the sender's copy into the socket was about as costly as the
 * receiver's). A page the guest rewrites before the destination has read it arrives torn,
 * as with a copy that races the guest: its page checksum fails and the dirty log sends it
 * again. Returns 0; 1 when vmsplice refused the first pages (nothing was sent: copy them);
 * -1 with tx->err_errno. The pipe is empty again on 0 and 1. */
static int hvs_splice_pages(struct hvs_tx *tx, const int fds[2], struct iovec *iov, int n)
{
    int i = 0, first = 1;
    while (i < n) {
        ssize_t queued = vmsplice(fds[1], iov + i, (unsigned long)(n - i), SPLICE_F_NONBLOCK);
        if (queued < 0) {
            if (errno == EINTR)
                continue;
            if (first && errno != EAGAIN)
                return 1;
            tx->err_errno = errno;
            return -1;
        }
        first = 0;
        hvs_advance(iov, n, &i, (size_t)queued);
        while (queued > 0) {
            ssize_t moved = splice(fds[0], NULL, tx->fd, NULL, (size_t)queued, SPLICE_F_MOVE | SPLICE_F_NONBLOCK);
            if (moved < 0) {
                if (errno == EINTR)
                    continue;
                if (errno != EAGAIN) {
                    tx->err_errno = errno;
                    return -1;
                }
                if (hvs_wait_room(tx) < 0)
                    return -1;
                continue;
            }
            if (moved == 0) {
                tx->err_errno = EPIPE;
                return -1;
            }
            queued -= moved;
        }
    }
    return 0;
}

/* Send n pages at pages (stream page numbers start..) as one RAM_LIVE section, framed by
 * hvs_pack_live (meta: 24 + 5 * n + 4 bytes), the pages copied into the socket by one
 * sendmsg or moved by reference (tx->splice). Returns 0 (*normal_out set), or -1 with
 * tx->err_errno. */
static int hvs_send_live_section(struct hvs_tx *tx, const int fds[2], const uint8_t *pages, uint64_t start,
                                 uint32_t n, const uint8_t *known_zero, uint8_t *meta, uint32_t *normal_out)
{
    struct iovec iov[HVS_IOV / 2 + 3];   /* framing, at most n / 2 + 1 data runs, checksum */
    uint32_t crc;
    uint32_t normal = (uint32_t)hvs_pack_live(pages, start, n, known_zero, meta, &crc);
    uint32_t framing = HVS_HEAD + HVS_RUN + n + 4u * normal;
    const uint8_t *kinds = meta + HVS_HEAD + HVS_RUN;
    hvs_put32(meta + framing, crc);
    int k = 0, rc;
    iov[k].iov_base = meta;
    iov[k++].iov_len = framing;
    for (uint32_t at = 0, first, run; (run = hvs_next_run(kinds, n, &at, &first));) {
        iov[k].iov_base = (void *)(pages + (uint64_t)first * HVS_PAGE);
        iov[k++].iov_len = (size_t)run * HVS_PAGE;
    }
    iov[k].iov_base = meta + framing;
    iov[k++].iov_len = 4;
    if (tx->splice && normal) {
        /* framing copied (meta is reused), pages by reference, then the checksum */
        rc = hvs_send_all(tx, iov, 1);
        if (rc < 0 || (rc = hvs_splice_pages(tx, fds, iov + 1, k - 2)) < 0)
            return -1;
        if (rc == 1) {
            tx->splice = 0;   /* refused: copy these pages and all that follow */
            rc = hvs_send_all(tx, iov + 1, k - 1);
        } else {
            rc = hvs_send_all(tx, iov + k - 1, 1);
        }
    } else {
        rc = hvs_send_all(tx, iov, k);
    }
    if (rc < 0)
        return -1;
    *normal_out = normal;
    return 0;
}

/* Frame npages pages at src as the head of one RAM_HASHED section (format 1.7): out
 * receives the section header, the run header and the kind map (24 + npages bytes); the
 * normal pages and then the trailer (their hashes, the section checksum) follow it.
 * Returns the number of normal pages. */
static uint32_t hvs_pack_kinds(const uint8_t *src, uint64_t start, uint32_t npages, const uint8_t *known_zero,
                               uint8_t *out)
{
    uint32_t normal = hvs_scan_kinds(src, npages, known_zero, out + HVS_HEAD + HVS_RUN);
    hvs_put_ram_head(out, HVS_TYPE_RAM_HASHED, HVS_RUN + npages + normal * (HVS_PAGE + 8u), start, npages);
    return normal;
}

/* Pages sent in one piece and then hashed, while the copy into the socket has just left
 * them in the cache (256 KiB: half of this host's L2). */
#define HVS_HASH_GROUP 64u

/* Send n pages at pages (stream page numbers start..) as one RAM_HASHED section (format
 * 1.7): the framing, the normal pages in groups of HVS_HASH_GROUP, each hashed (XXH3-64)
 * right after it was sent, then the trailer: the hashes and the section checksum, which
 * covers the framing and the hashes (not the page data). A page the guest rewrites between
 * the copy of its bytes (into the socket, or, spliced, out of it by the destination) and
 * its hash arrives torn: the destination's hash of what landed differs, and the dirty log
 * sends the page again. meta holds the framing and the trailer (24 + 9 * n + 4 bytes).
 * Returns 0 (*normal_out set), or -1 with tx->err_errno. */
static int hvs_send_hashed(struct hvs_tx *tx, const int fds[2], const uint8_t *pages, uint64_t start, uint32_t n,
                           const uint8_t *known_zero, uint8_t *meta, uint32_t *normal_out)
{
    uint32_t normal = hvs_pack_kinds(pages, start, n, known_zero, meta);
    uint32_t framing = HVS_HEAD + HVS_RUN + n;
    const uint8_t *kinds = meta + HVS_HEAD + HVS_RUN;
    uint8_t *trailer = meta + framing;
    struct iovec iov = { meta, framing };
    if (hvs_send_all(tx, &iov, 1) < 0)
        return -1;
    uint32_t k = 0;
    for (uint32_t at = 0, first, run; (run = hvs_next_run(kinds, n, &at, &first));) {
        for (uint32_t done = 0; done < run;) {
            uint32_t count = run - done < HVS_HASH_GROUP ? run - done : HVS_HASH_GROUP;
            const uint8_t *data = pages + (uint64_t)(first + done) * HVS_PAGE;
            struct iovec part = { (void *)data, (size_t)count * HVS_PAGE };
            int rc = 1;
            if (tx->splice) {
                rc = hvs_splice_pages(tx, fds, &part, 1);
                if (rc < 0)
                    return -1;
                if (rc == 1)
                    tx->splice = 0;   /* refused: copy these pages and all that follow */
            }
            if (rc == 1 && hvs_send_all(tx, &part, 1) < 0)
                return -1;
            for (uint32_t i = 0; i < count; i++)
                hvs_put64(trailer + 8u * k++, hvs_xxh3_page(data + (uint64_t)i * HVS_PAGE));
            done += count;
        }
    }
    uint32_t crc = hvs_crc_copy(hvs_crc_copy(0, meta, NULL, framing), trailer, NULL, 8u * normal);
    hvs_put32(trailer + 8u * normal, crc);
    iov.iov_base = trailer;
    iov.iov_len = 8u * normal + 4u;
    if (hvs_send_all(tx, &iov, 1) < 0)
        return -1;
    *normal_out = normal;
    return 0;
}

/* Send npages pages at src (stream page numbers start..) as RAM_LIVE sections of at most
 * run_pages pages, each framed (hvs_pack_live) and sent at once, so its pages are still in
 * the cache when the socket copies them: the same bytes the Python writer sends for
 * sections of that size, with no Python between sections. With tx->splice the pages are
 * not copied at all but moved by reference (hvs_splice_pages). meta is scratch for one
 * section's framing and checksum (24 + 5 * run_pages + 4 bytes); known_zero as in
 * hvs_pack. Returns 0, or -1 with tx->err_errno (the stream is then cut inside a section);
 * tx->bytes, zero and normal count the sections sent whole. */
int hvs_send_live(struct hvs_tx *tx, const uint8_t *src, uint64_t start, uint32_t npages,
                  const uint8_t *known_zero, uint32_t run_pages, uint8_t *meta)
{
    tx->bytes = 0;
    tx->zero = tx->normal = 0;
    tx->err_errno = 0;
    if (run_pages == 0 || run_pages > HVS_IOV) {
        tx->err_errno = EINVAL;
        return -1;
    }
    int fds[2] = { -1, -1 }, rc = 0;
    if (tx->splice && hvs_open_pipe(tx, fds) < 0)
        return -1;
    for (uint32_t done = 0; done < npages;) {
        uint32_t n = npages - done < run_pages ? npages - done : run_pages;
        const uint8_t *pages = src + (uint64_t)done * HVS_PAGE;
        const uint8_t *zero_map = known_zero ? known_zero + done : NULL;
        uint32_t normal;
        rc = tx->hashed ? hvs_send_hashed(tx, fds, pages, start + done, n, zero_map, meta, &normal)
                        : hvs_send_live_section(tx, fds, pages, start + done, n, zero_map, meta, &normal);
        if (rc < 0)
            goto out;
        /* framing, pages, their checksums (4 bytes) or hashes (8), the section checksum */
        tx->bytes += HVS_HEAD + HVS_RUN + n + (uint64_t)normal * (HVS_PAGE + (tx->hashed ? 8u : 4u)) + 4u;
        tx->normal += normal;
        tx->zero += n - normal;
        done += n;
    }
out:
    if (fds[0] >= 0) {
        close(fds[0]);
        close(fds[1]);
    }
    return rc < 0 ? -1 : 0;
}

/* -- destination: RAM sections straight into guest RAM ------------------------------- */
static uint32_t hvs_get32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static uint64_t hvs_get64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }

/* Host address of pages [page, page + n) if they lie in one region, else NULL. */
static uint8_t *hvs_target(const struct hvs_rx *rx, uint64_t page, uint64_t n)
{
    for (int i = 0; i < rx->nregions; i++) {
        const struct hvs_region *r = &rx->regions[i];
        if (page >= r->first_page && n <= r->pages && page - r->first_page <= r->pages - n)
            return r->host + (page - r->first_page) * HVS_PAGE;
    }
    return NULL;
}

/* One read from the source into iov; >0 bytes, 0 end of input, -1 would block past
 * poll_ms (RX_WAIT), -2 error (err_errno). */
static ssize_t hvs_read(struct hvs_rx *rx, struct iovec *iov, int n)
{
    for (;;) {
        ssize_t got;
        if (rx->is_socket) {
            struct msghdr msg;
            memset(&msg, 0, sizeof msg);
            msg.msg_iov = iov;
            msg.msg_iovlen = (size_t)n;
            got = recvmsg(rx->fd, &msg, MSG_DONTWAIT);
        } else {
            got = readv(rx->fd, iov, n);
        }
        if (got >= 0) {
            rx->received += (uint64_t)got;
            return got;
        }
        if (errno == EINTR)
            continue;
        if (errno == EAGAIN || errno == EWOULDBLOCK) {
            struct pollfd pfd = { rx->fd, POLLIN, 0 };
            int ready = poll(&pfd, 1, rx->poll_ms);
            if (ready == 0)
                return -1;
            if (ready < 0 && errno != EINTR) {
                rx->err_errno = errno;
                return -2;
            }
            continue;
        }
        rx->err_errno = errno;
        return -2;
    }
}

/* Make at least need bytes available in the staging buffer (need <= cap), reading no more
 * than want (>= need) in all: read-ahead beyond the framing would be page data, which then
 * costs a second copy. Returns 0, or RX_EOF / RX_WAIT / RX_OSERROR. */
static int hvs_fill(struct hvs_rx *rx, uint32_t need, uint32_t want)
{
    while (rx->len - rx->pos < need) {
        if (rx->cap - rx->pos < need) {
            memmove(rx->buf, rx->buf + rx->pos, rx->len - rx->pos);
            rx->len -= rx->pos;
            rx->pos = 0;
        }
        uint32_t room = rx->cap - rx->len, wanted = want - (rx->len - rx->pos);
        struct iovec iov = { rx->buf + rx->len, wanted < room ? wanted : room };
        ssize_t got = hvs_read(rx, &iov, 1);
        if (got == 0)
            return RX_EOF;
        if (got == -1)
            return RX_WAIT;
        if (got < 0)
            return RX_OSERROR;
        rx->len += (uint32_t)got;
    }
    return 0;
}

/* Validate the buffered section that starts at rx->pos; 0 when it is a well-formed RAM
 * section this receiver applies (its fields are then in rx), else RX_OTHER. */
static int hvs_peek(struct hvs_rx *rx)
{
    const uint8_t *h = rx->buf + rx->pos;
    uint32_t length = hvs_get32(h + 4);
    int live = h[0] == HVS_TYPE_RAM_LIVE;  /* only in a stream that declared format >= 1.5 */
    int hashed = h[0] == HVS_TYPE_RAM_HASHED;  /* only in a stream that declared format >= 1.7 */
    if (!(h[0] == HVS_TYPE_RAM || (live && rx->live_ok) || (hashed && rx->hashed_ok)) || h[1] || h[2] || h[3]
        || length > HVS_MAX_SECTION || length < HVS_RUN)
        return RX_OTHER;
    int rc = hvs_fill(rx, HVS_HEAD + HVS_RUN, HVS_HEAD + HVS_RUN + rx->count);
    if (rc)
        return rc == RX_WAIT || rc == RX_OSERROR ? rc : RX_OTHER;
    h = rx->buf + rx->pos;
    uint64_t start = hvs_get64(h + 8);
    uint32_t count = hvs_get32(h + 16);
    if (hvs_get32(h + 20) || count < 1 || count > HVS_MAX_RUN_PAGES || start >= rx->page_count
        || count > rx->page_count - start || count > length - HVS_RUN)
        return RX_OTHER;
    rc = hvs_fill(rx, HVS_HEAD + HVS_RUN + count, HVS_HEAD + HVS_RUN + count);
    if (rc)
        return rc == RX_WAIT || rc == RX_OSERROR ? rc : RX_OTHER;
    const uint8_t *kinds = rx->buf + rx->pos + HVS_HEAD + HVS_RUN;
    uint32_t normal = 0;
    for (uint32_t i = 0; i < count; i++) {
        if (kinds[i] > 1)
            return RX_OTHER;
        normal += kinds[i];
    }
    if ((uint64_t)length - HVS_RUN - count != (uint64_t)normal * (HVS_PAGE + (live ? 4u : hashed ? 8u : 0u)))
        return RX_OTHER;
    if (live) {  /* the page checksums follow the kind map: buffer them too */
        uint32_t framing = HVS_HEAD + HVS_RUN + count + 4u * normal;
        rc = hvs_fill(rx, framing, framing);
        if (rc)
            return rc == RX_WAIT || rc == RX_OSERROR ? rc : RX_OTHER;
        kinds = rx->buf + rx->pos + HVS_HEAD + HVS_RUN;
    }
    for (uint32_t i = 0; i < count;) {  /* every run inside one region */
        uint32_t j = i;
        while (j < count && kinds[j] == kinds[i])
            j++;
        if (!hvs_target(rx, start + i, j - i))
            return RX_OTHER;
        i = j;
    }
    rx->length = length;
    rx->start = start;
    rx->count = count;
    rx->normal = normal;
    rx->zero = count - normal;
    rx->live = live;
    rx->hashed = hashed;
    memcpy(rx->kinds, kinds, count);
    if (live || hashed) {
        if (live)
            memcpy(rx->crcs, kinds + count, 4u * normal);  /* little-endian host, as the format */
        memset(rx->torn_map, 0, normal);
        rx->torn = 0;
    }
    return 0;
}

/* Zero runs: write only the pages that are not zero already (fresh or pre-faulted RAM is).
 * A page known to be untouched (pristine) is zero without reading it: reading RAM the
 * source never used cost the destination 14% of its time on an idle 2 GiB guest. */
static void hvs_zero_runs(struct hvs_rx *rx)
{
    for (uint32_t i = 0; i < rx->count; i++) {
        if (rx->kinds[i] || (rx->pristine && rx->pristine[rx->start + i]))
            continue;
        uint8_t *page = hvs_target(rx, rx->start + i, 1);
        if (!hvs_page_is_zero(page))
            memset(page, 0, HVS_PAGE);
    }
}

/* Fill the iovecs for page data from byte data_done of the section on, at most limit
 * bytes (what is checksummed right after the read, while it is in the L2 cache); returns
 * the count. */
static int hvs_data_iov(struct hvs_rx *rx, struct iovec *iov, int max, uint64_t limit)
{
    uint64_t skip = rx->data_done;
    int n = 0;
    for (uint32_t at = 0, first, run; n < max && limit && (run = hvs_next_run(rx->kinds, rx->count, &at, &first));) {
        uint64_t bytes = (uint64_t)run * HVS_PAGE;
        if (skip >= bytes) {
            skip -= bytes;
        } else {
            iov[n].iov_base = hvs_target(rx, rx->start + first, run) + skip;
            iov[n].iov_len = bytes - skip < limit ? bytes - skip : limit;
            limit -= iov[n].iov_len;
            skip = 0;
            n++;
        }
    }
    return n;
}

/* RAM_LIVE: check each page against its own checksum as its last byte arrives (iov's
 * first got bytes, which start at byte data_done of the section's page data). A page that
 * does not match was torn by the guest writing it during the send: it is marked, and
 * not counted as arrived. RAM_HASHED: hash each page as its last byte arrives, for the
 * comparison with the trailer (a page lies in one run, which lies in one region: its bytes
 * are contiguous). */
static void hvs_check_pages(struct hvs_rx *rx, const struct iovec *iov, size_t got)
{
    uint64_t done = rx->data_done;
    for (int i = 0; got; i++) {
        size_t part = iov[i].iov_len < got ? iov[i].iov_len : got;
        const uint8_t *p = iov[i].iov_base;
        got -= part;
        while (part) {
            uint32_t off = (uint32_t)(done % HVS_PAGE);
            size_t take = HVS_PAGE - off < part ? HVS_PAGE - off : part;
            if (!rx->hashed)
                rx->page_crc = hvs_crc_copy(off ? rx->page_crc : 0, p, NULL, take);
            p += take;
            part -= take;
            done += take;
            if (done % HVS_PAGE == 0) {
                uint64_t k = done / HVS_PAGE - 1;
                if (rx->hashed)   /* RAM_HASHED: compared once the trailer is read */
                    rx->hashes[k] = hvs_xxh3_page(p - HVS_PAGE);
                else if (rx->page_crc != rx->crcs[k]) {
                    rx->torn_map[k] = 1;
                    rx->torn++;
                }
            }
        }
    }
}

/* Checksum iov's first got bytes (just read: still in the cache). */
static void hvs_crc_iov(struct hvs_rx *rx, const struct iovec *iov, size_t got)
{
    if (rx->live || rx->hashed) {
        hvs_check_pages(rx, iov, got);
        return;
    }
    for (int i = 0; got; i++) {
        size_t part = iov[i].iov_len < got ? iov[i].iov_len : got;
        rx->crc = hvs_crc_copy(rx->crc, iov[i].iov_base, NULL, part);
        got -= part;
    }
}

/* Bytes after the page data: the section checksum, after the page hashes of RAM_HASHED. */
static uint32_t hvs_trailer(const struct hvs_rx *rx)
{
    return (rx->hashed ? 8u * rx->normal : 0u) + 4u;
}

static int hvs_data(struct hvs_rx *rx)
{
    uint64_t total = (uint64_t)rx->normal * HVS_PAGE;
    struct iovec iov[HVS_IOV + 1];
    while (rx->data_done < total) {
        int n = hvs_data_iov(rx, iov, HVS_IOV, HVS_READ_CHUNK);
        uint32_t avail = rx->len - rx->pos;
        if (avail) {  /* read ahead with the framing: copy it out first */
            size_t left = avail;
            for (int i = 0; i < n && left; i++) {
                size_t part = iov[i].iov_len < left ? iov[i].iov_len : left;
                memcpy(iov[i].iov_base, rx->buf + rx->pos + (avail - left), part);
                left -= part;
            }
            size_t used = avail - left;
            hvs_crc_iov(rx, iov, used);
            rx->pos += (uint32_t)used;
            rx->data_done += used;
            continue;
        }
        /* When the iovecs reach the section's end, the staging buffer takes what follows
         * it (the next section's framing, in the same call). */
        uint64_t covered = 0;
        for (int i = 0; i < n; i++)
            covered += iov[i].iov_len;
        rx->pos = rx->len = 0;
        int count = n;
        if (covered == total - rx->data_done) {
            iov[n].iov_base = rx->buf;
            iov[n].iov_len = hvs_trailer(rx) + HVS_HEAD + HVS_RUN + rx->count;  /* trailer, next framing */
            count++;
        }
        ssize_t got = hvs_read(rx, iov, count);
        if (got == 0)
            return RX_EOF;
        if (got == -1)
            return RX_WAIT;
        if (got < 0)
            return RX_OSERROR;
        uint64_t into_ram = (uint64_t)got < total - rx->data_done ? (uint64_t)got : total - rx->data_done;
        hvs_crc_iov(rx, iov, (size_t)into_ram);
        rx->data_done += into_ram;
        rx->len = (uint32_t)((uint64_t)got - into_ram);
    }
    return 0;
}

/* Apply the next section if it is a RAM section: RX_RAM (applied; its fields are in rx),
 * RX_OTHER (something else, or a RAM section the Python reader must refuse: nothing of it
 * consumed), RX_WAIT (nothing arrived within poll_ms; call again), RX_EOF (end of input
 * inside page data or checksum: rx->what), RX_OSERROR (err_errno), RX_BADCRC. */
int hvs_rx_step(struct hvs_rx *rx)
{
    int rc;
    if (rx->state == ST_PEEK) {
        rx->what = "section header";
        rc = hvs_fill(rx, HVS_HEAD, HVS_HEAD + HVS_RUN + rx->count);
        if (rc)
            return rc == RX_EOF ? RX_OTHER : rc;
        rc = hvs_peek(rx);
        if (rc)
            return rc;
        uint32_t framing = HVS_HEAD + HVS_RUN + rx->count + (rx->live ? 4u * rx->normal : 0u);
        rx->crc = hvs_crc_copy(0, rx->buf + rx->pos, NULL, framing);
        rx->pos += framing;
        rx->section_bytes = framing;
        rx->data_done = 0;
        if (rx->pristine)  /* data is about to land in these pages: no longer known zero */
            for (uint32_t i = 0; i < rx->count; i++)
                rx->pristine[rx->start + i] &= (uint8_t)!rx->kinds[i];
        hvs_zero_runs(rx);
        rx->state = ST_DATA;
    }
    if (rx->state == ST_DATA) {
        rx->what = "RAM page data";
        rc = hvs_data(rx);
        if (rc)
            return rc;
        rx->section_bytes += rx->data_done;
        rx->state = ST_CRC;
    }
    rx->what = rx->hashed ? "RAM_HASHED page hashes" : "RAM checksum";
    uint32_t trailer = hvs_trailer(rx);
    rc = hvs_fill(rx, trailer, trailer + HVS_HEAD + HVS_RUN + rx->count);
    if (rc)
        return rc;
    if (rx->hashed) {  /* the hashes are framing: the section checksum covers them */
        const uint8_t *stored = rx->buf + rx->pos;
        rx->crc = hvs_crc_copy(rx->crc, stored, NULL, trailer - 4u);
        for (uint32_t k = 0; k < rx->normal; k++)
            if (hvs_get64(stored + 8u * k) != rx->hashes[k]) {
                rx->torn_map[k] = 1;
                rx->torn++;
            }
    }
    rx->stored_crc = hvs_get32(rx->buf + rx->pos + trailer - 4u);
    rx->computed_crc = rx->crc;
    rx->pos += trailer;
    rx->section_bytes += trailer;
    rx->state = ST_PEEK;
    if (rx->stored_crc != rx->computed_crc)
        return RX_BADCRC;
    if (rx->live || rx->hashed) {  /* a torn page has not arrived (even if an earlier pass brought it) */
        for (uint32_t i = 0, k = 0; i < rx->count; i++)
            rx->covered[rx->start + i] = rx->kinds[i] ? !rx->torn_map[k++] : 1;
        rx->torn_total += rx->torn;
    } else {
        memset(rx->covered + rx->start, 1, rx->count);
    }
    return RX_RAM;
}

/* Hand up to n read-ahead bytes to the Python reader (it reads what is not RAM). */
size_t hvs_rx_take(struct hvs_rx *rx, uint8_t *dst, size_t n)
{
    size_t avail = rx->len - rx->pos;
    if (n > avail)
        n = avail;
    memcpy(dst, rx->buf + rx->pos, n);
    rx->pos += (uint32_t)n;
    return n;
}
