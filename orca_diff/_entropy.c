/* The compiled kernels of orca_diff.entropy (codec "ans", docs/format.md section 3b).
 *
 * Three functions, each the hot loop of one step; everything else (choosing the context model,
 * quantising tables, the frame header) is Python shared with the pure-numpy path, so that both
 * produce identical bytes:
 *
 *   analyze(target, pred, w, shift, ebits, lanes, tok) -> (counts, lo, raw): one pass writing the
 *       tokens into tok and returning the exponent window lo, uint32 counts[16][2][A] (per
 *       bucket and "previous element of the lane has token 0"; A = the alphabet) and the raw bits
 *   encode(tok, pred, w, shift, ebits, lo, mshift, prev, lanes, freqs) -> (words, group_words)
 *   decode(out, pred, w, shift, ebits, lo, mshift, prev, lanes, freqs, group_words, words, raw) -> None
 *
 * Lanes are contiguous runs of elements (the context needs the previous element's token); each
 * group of 8 lanes shares one word stream. With AVX2 (chosen at run time, GCC/Clang on x86-64)
 * a vector holds a group's 8 lanes: 8 steps of table indices (encode) or of the contexts' row
 * offsets (decode: computed from the base elements 128 steps at a time into padded staging rows,
 * see DEC_S) are loaded per lane and transposed, the table entries are gathered (decode: by
 * scalar loads), and the words a step needs (decode: one 16-byte load spread by a permutation)
 * or emits (encode: compressed by a byte shuffle) move through the group's stream; 4 (decode) or
 * 2 (encode) groups are interleaved to hide the latencies. The encoder's analysis pass (tokens,
 * raw bits, counts) has an AVX2 version for 2-byte elements, and so has the decoder's raw-bit
 * pass with the ulp inverse (BMI2 pdep where it is fast, else AVX2 shuffles). Elsewhere (other
 * compilers, no AVX2, 8-byte elements, the last steps) scalar loops give the same bytes.
 *
 * Everything decode reads is untrusted: every table, count and size is checked, stream reads stay
 * inside buffers padded by more than any group can over-read, and a stream that does not end
 * exactly where it should raises ValueError (never a crash, a hang or an access outside the
 * buffers). The GIL is released around the loops. Plain C99 with the CPython API; builds with
 * GCC, Clang and MSVC. Data are little-endian (as the format); the host is assumed little-endian,
 * like numpy's views.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(_MSC_VER)
#include <intrin.h>
#endif
#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define HAVE_AVX2_KERNEL 1
#include <immintrin.h>
#endif

#define PROB_BITS 12
#define PROB_SCALE (1u << PROB_BITS)
#define STATE_LOW (1u << 16)
#define NCTX 32
#define NBUCKETS 16
#define DTAB_BAD 0x80000000u /* flags the decode-table rows of a context without table (see "The decode table") */
#define RAW_PAD 256 /* zero bytes after the raw bits: > 64 elements x 29 bits / 8 + 8 */

/* bit length of v > 0 */
static inline int bit_length64(uint64_t v) {
#if defined(__GNUC__) || defined(__clang__)
    return 64 - __builtin_clzll(v);
#elif defined(_MSC_VER) && defined(_M_X64)
    unsigned long i;
    _BitScanReverse64(&i, v);
    return (int)i + 1;
#else
    int n = 0;
    while (v) { v >>= 1; n++; }
    return n;
#endif
}

/* token of symbol s and its raw-bit count (format: s < 16 -> s; else m = bitlen - 1,
 * 16 + 4 (m - 4) + the two bits below the leading one, and m - 2 raw bits). */
static inline unsigned token_of(uint64_t s, unsigned *nb) {
    /* branch-free: fine-tune deltas mix small and large symbols unpredictably */
    unsigned big = 0u - (unsigned)(s >= 16);  /* all ones or 0: masks, not branches */
    unsigned m = (unsigned)bit_length64(s | 16) - 1;
    *nb = (m - 2) & big;
    unsigned t = 16u + 4u * (m - 4) + (unsigned)((s >> (m - 2)) & 3u);
    return (t & big) | ((unsigned)s & ~big & 15u);
}

/* token and raw-bit count of every 16-bit symbol, and the raw-bit count of every token */
static uint8_t tok16_lut[1 << 16], tok_nbits[256];
static void init_tokens(void) {
    unsigned nb;
    for (uint32_t s = 0; s < (1u << 16); s++) {
        tok16_lut[s] = (uint8_t)token_of(s, &nb);
        tok_nbits[tok16_lut[s]] = (uint8_t)nb;
    }
}

typedef struct {
    unsigned shift, emask, lo, mshift, prev;
} ctxparams;

/* bucket of a base element: min(max(exponent - lo, 0), 15) >> mshift */
static inline unsigned bucket_of(uint64_t p, const ctxparams *cp) {
    int e = (int)((p >> cp->shift) & cp->emask) - (int)cp->lo;
    e = e < 0 ? 0 : e > NBUCKETS - 1 ? NBUCKETS - 1 : e;
    return (unsigned)e >> cp->mshift;
}

/* lane k holds elements [start(k), start(k + 1)): the first n % L lanes hold one more */
static inline size_t lane_start(size_t n, size_t L, size_t k) {
    size_t q = n / L, r = n % L;
    return k * q + (k < r ? k : r);
}

/* per-lane decoder state */
typedef struct {
    uint32_t *x, *off, *pz;  /* per lane: state, previous token was 0; per group of 8 lanes: next word */
    void *stage;             /* the vector decoder's staging buffers (DEC_STAGE_BYTES) */
} lanestate;

/* The vector decoder works on DEC_S steps of its lanes at a time: their contexts' row offsets
 * are first computed into a staging buffer (16 bits each) and their tokens written to another,
 * then copied to the lanes' places. Lanes are runs of n / L elements, usually a multiple of 4 KiB
 * apart: read and written in place, the 32 lanes' streams all fall into the same L1 sets. The
 * staging rows are padded so that they do not. */
#ifndef DEC_S
#define DEC_S 128
#endif
#define DEC_CSTR (DEC_S + 32)  /* 16-bit entries per lane row (320 bytes: 5 cache lines) */
#define DEC_TSTR (DEC_S + 64)  /* token bytes per lane row (3 cache lines) */
#define DEC_LANES 64
#define DEC_STAGE_BYTES ((size_t)DEC_LANES * (DEC_CSTR * 2 + DEC_TSTR) + 64)

/* ------------------------------------------------------------------ per-width kernels */

#define DEFINE_KERNELS(T, B)                                                                      \
static inline T ord##B(T x) {                                                                     \
    T neg = (T)((T)0 - (T)(x >> (B - 1)));                                                        \
    return (T)(x ^ (neg & (T)(((T)~(T)0) >> 1)));                                                 \
}                                                                                                 \
static inline T delta##B(T t, T b) {                                                              \
    T d = (T)(ord##B(t) - ord##B(b));                                                             \
    return (T)((T)(d << 1) ^ (T)((T)0 - (T)(d >> (B - 1))));                                      \
}                                                                                                 \
static inline T undelta##B(T z, T b) {                                                            \
    T d = (T)((T)(z >> 1) ^ (T)((T)0 - (T)(z & 1)));                                              \
    return ord##B((T)(ord##B(b) + d));                                                            \
}                                                                                                 \
/* One pass over the chunk for the encoder: the tokens (tok[i]), the raw bits packed LSB-first in   \
 * element order (returns their byte count; raw needs n * B / 8 + 16 bytes), and the token counts   \
 * per (exponent value, "previous token of the lane was 0") in two interleaved copies h (element i  \
 * counts in copy i & 1, so that runs of one cell do not wait on their own increments), cell       \
 * ((e << 1 | z) << tb) | token, copy 1 at h + hcopy. */                                             \
static size_t analyze##B(const T *t, const T *p, size_t n, size_t L, unsigned sh, unsigned em,      \
                         unsigned tb, uint8_t *tok, uint8_t *raw, uint32_t *h, size_t hcopy) {     \
    uint64_t acc = 0;                                                                             \
    unsigned accbits = 0, nb;                                                                     \
    size_t out = 0;                                                                               \
    for (size_t k = 0; k < L; k++) {                                                              \
        size_t a = lane_start(n, L, k), e = lane_start(n, L, k + 1);                              \
        unsigned z = 1;                                                                           \
        for (size_t i = a; i < e; i++) {                                                          \
            uint64_t s = delta##B(t[i], p[i]);                                                    \
            unsigned tk;                                                                          \
            if (B == 16) { tk = tok16_lut[s]; nb = tok_nbits[tk]; }                               \
            else tk = token_of(s, &nb);                                                           \
            tok[i] = (uint8_t)tk;                                                                 \
            h[(i & 1) * hcopy + (((((unsigned)(p[i] >> sh) & em) << 1 | z) << tb) | tk)]++;        \
            z = tk == 0;                                                                          \
            /* no branches: 0 raw bits OR in nothing, and the word is stored every time and   \
             * kept when full (the flush would mispredict every ~16 elements) */                \
            uint64_t v = s & ((1ull << nb) - 1);                                                  \
            acc |= v << accbits;                                                                  \
            memcpy(raw + out, &acc, 8);                                                           \
            unsigned full = (accbits + nb) >> 6; /* nb < 64, so full implies accbits > 0 */       \
            uint64_t rest = (v >> 1) >> (63 - accbits);  /* v >> (64 - accbits), 0 if accbits 0 */ \
            out += 8 * (size_t)full;                                                              \
            acc = full ? rest : acc;                                                              \
            accbits = (accbits + nb) & 63;                                                        \
        }                                                                                         \
    }                                                                                             \
    memcpy(raw + out, &acc, 8);                                                                   \
    return out + (accbits + 7) / 8;                                                               \
}                                                                                                 \
/* the index ctx * 256 + token into the [32][256] tables of every element of lanes [kb, ke)      \
 * (element i at idx[i - start of lane kb]; scalar) */                                            \
static void ctxindex##B(const T *p, const uint8_t *tok, size_t n, size_t L, size_t kb, size_t ke, \
                        const ctxparams *cp, uint16_t *idx) {                                     \
    uint16_t cb[256];                                                                             \
    for (unsigned e = 0; e <= cp->emask; e++) {                                                   \
        int d = (int)e - (int)cp->lo;                                                             \
        unsigned b = (unsigned)(d < 0 ? 0 : d > NBUCKETS - 1 ? NBUCKETS - 1 : d) >> cp->mshift;   \
        cb[e] = (uint16_t)((cp->prev ? 2u * b : b) << 8);                                         \
    }                                                                                             \
    const unsigned zadd = cp->prev ? 0x100u : 0u;                                                 \
    const size_t ib = lane_start(n, L, kb);                                                       \
    for (size_t k = kb; k < ke; k++) {                                                            \
        size_t a = lane_start(n, L, k), e = lane_start(n, L, k + 1);                              \
        unsigned z = 1;                                                                           \
        for (size_t i = a; i < e; i++) {                                                          \
            unsigned tk = tok[i];                                                                 \
            idx[i - ib] = (uint16_t)(cb[(unsigned)(p[i] >> cp->shift) & cp->emask] +              \
                                ((0u - z) & zadd) + tk);                                          \
            z = tk == 0;                                                                          \
        }                                                                                         \
    }                                                                                             \
}                                                                                                 \
/* symbols from tokens + raw bits, then the inverse ulp transform; -1 if the bits do not match */ \
static int finish##B(const uint8_t *tok, const T *p, size_t n, const uint8_t *raw, size_t rawlen, \
                     T *out) {                                                                    \
    uint64_t base[256];                                                                           \
    unsigned nbits[256];                                                                          \
    for (unsigned k = 0; k < 256; k++) {                                                          \
        if (k < 16) { base[k] = k; nbits[k] = 0; continue; }                                      \
        unsigned m = (k - 16) / 4 + 4;                                                            \
        base[k] = (1ull << m) | ((uint64_t)((k - 16) & 3) << (m - 2));                            \
        nbits[k] = m - 2;                                                                         \
    }                                                                                             \
    const uint64_t limit = (uint64_t)rawlen * 8;                                                  \
    uint64_t pos = 0;                                                                             \
    if (B == 16) { /* at most 13 raw bits: one 8-byte load (>= 57 bits) serves 4 elements */      \
        for (size_t i0 = 0; i0 < n; i0 += 64) {                                                   \
            /* checked every 64 elements: pos <= limit + 64 * 13 bits keeps every load inside the \
             * RAW_PAD bytes of padding */                                                        \
            if (pos > limit) return -1;                                                           \
            size_t i1 = n - i0 < 64 ? n : i0 + 64, i = i0;                                        \
            for (; i + 4 <= i1; i += 4) {                                                         \
                uint64_t peek;                                                                    \
                memcpy(&peek, raw + (pos >> 3), 8);                                               \
                peek >>= (pos & 7);                                                               \
                for (int kk = 0; kk < 4; kk++) {                                                  \
                    unsigned k = tok[i + kk], nb = nbits[k];                                      \
                    out[i + kk] = (T)(base[k] | (peek & ((1ull << nb) - 1)));                     \
                    peek >>= nb;                                                                  \
                    pos += nb;                                                                    \
                }                                                                                 \
            }                                                                                     \
            for (; i < i1; i++) {                                                                 \
                unsigned k = tok[i], nb = nbits[k];                                               \
                uint64_t peek;                                                                    \
                memcpy(&peek, raw + (pos >> 3), 8);                                               \
                out[i] = (T)(base[k] | ((peek >> (pos & 7)) & ((1ull << nb) - 1)));              \
                pos += nb;                                                                        \
            }                                                                                     \
        }                                                                                         \
    } else if (B == 32) { /* at most 29 raw bits: one unaligned 8-byte load per element */        \
        for (size_t i0 = 0; i0 < n; i0 += 64) {                                                   \
            /* checked every 64 elements: pos <= limit + 64 * 29 bits keeps every load inside the \
             * RAW_PAD bytes of padding */                                                        \
            if (pos > limit) return -1;                                                           \
            size_t i1 = n - i0 < 64 ? n : i0 + 64;                                                \
            for (size_t i = i0; i < i1; i++) {                                                    \
                unsigned k = tok[i], nb = nbits[k];                                               \
                uint64_t peek;                                                                    \
                memcpy(&peek, raw + (pos >> 3), 8);                                               \
                uint64_t v = (peek >> (pos & 7)) & ((1ull << nb) - 1);                            \
                pos += nb;                                                                        \
                out[i] = (T)(base[k] | v);                                                        \
            }                                                                                     \
        }                                                                                         \
    } else {                                                                                      \
        for (size_t i = 0; i < n; i++) {                                                          \
            unsigned k = tok[i], nb = nbits[k];                                                   \
            if (pos > limit) return -1;                                                           \
            uint64_t peek, v;                                                                     \
            memcpy(&peek, raw + (pos >> 3), 8);                                                   \
            peek >>= (pos & 7);                                                                   \
            if (nb <= 56) {                                                                       \
                v = peek & ((1ull << nb) - 1);                                                    \
            } else {                                                                              \
                uint64_t hi;                                                                      \
                memcpy(&hi, raw + ((pos + 56) >> 3), 8);                                          \
                hi >>= ((pos + 56) & 7);                                                          \
                v = (peek & ((1ull << 56) - 1)) | ((hi & ((1ull << (nb - 56)) - 1)) << 56);       \
            }                                                                                     \
            pos += nb;                                                                            \
            out[i] = (T)(base[k] | v);                                                            \
        }                                                                                         \
    }                                                                                             \
    if (pos > limit || (pos + 7) / 8 != rawlen) return -1;                                        \
    for (size_t i = 0; i < n; i++) out[i] = undelta##B(out[i], p[i]); /* vectorises */            \
    return 0;                                                                                     \
}                                                                                                 \
/* scalar decode of lanes [k0, k1), steps [j0, j1) of each (clipped to the lane's length) */     \
static void decode_scalar##B(const uint32_t *tab, const T *p, size_t n, size_t L, size_t k0,      \
                             size_t k1, size_t j0, size_t j1, const ctxparams *cp, lanestate st,  \
                             const uint16_t *words, uint8_t *tok, uint32_t *used) {               \
    uint32_t u = 0;                                                                               \
    const size_t q = n / L, r = n % L;                                                            \
    for (size_t j = j0; j < j1; j++) {                                                            \
        for (size_t k = k0; k < k1; k++) {                                                        \
            if (j >= q + (k < r)) continue;                                                       \
            size_t i = k * q + (k < r ? k : r) + j;                                               \
            unsigned b = bucket_of(p[i], cp), c = b, row = b;                                     \
            if (cp->prev) { c = 2u * b + st.pz[k]; row = b + st.pz[k] * (NBUCKETS >> cp->mshift); } \
            u |= 1u << c;                                                                         \
            uint32_t xs = st.x[k];                                                                \
            uint32_t e = tab[(size_t)row * PROB_SCALE + (xs & (PROB_SCALE - 1))];                 \
            xs = ((e & (PROB_SCALE - 1)) + 1) * (xs >> PROB_BITS) + ((e >> 12) & (PROB_SCALE - 1)); \
            uint32_t need = xs < STATE_LOW;                                                       \
            uint32_t nw = words[st.off[k >> 3]];  /* the next word of the lane's group */        \
            st.x[k] = need ? ((xs << 16) | nw) : xs;                                              \
            st.off[k >> 3] += need;                                                               \
            tok[i] = (uint8_t)(e >> 24);                                                          \
            st.pz[k] = (e >> 24) == 0;                                                            \
        }                                                                                         \
    }                                                                                             \
    *used |= u;                                                                                   \
}

DEFINE_KERNELS(uint16_t, 16)
DEFINE_KERNELS(uint32_t, 32)
DEFINE_KERNELS(uint64_t, 64)

#ifdef HAVE_AVX2_KERNEL
#define AVX2 __attribute__((target("avx2")))

/* expand_lut[m][i]: the number of set bits of m below bit i */
static int32_t expand_lut[256][8] __attribute__((aligned(32)));
static void init_expand(void) {
    for (unsigned m = 0; m < 256; m++)
        for (unsigned i = 0, c = 0; i < 8; i++) {
            expand_lut[m][i] = (int32_t)c;
            c += (m >> i) & 1;
        }
}

/* 8 base elements of each lane of a group (lanes a[0..7], steps j..j+7) transposed into 8 step
 * vectors of 8 lanes (as 32-bit values) */
static inline AVX2 void load_steps(const void *pred, int w, const size_t *a, size_t j, __m256i *pv) {
    if (w == 2) {
        const uint16_t *p16 = (const uint16_t *)pred;
        __m128i r0 = _mm_loadu_si128((const __m128i *)(p16 + a[0] + j)), r1 = _mm_loadu_si128((const __m128i *)(p16 + a[1] + j));
        __m128i r2 = _mm_loadu_si128((const __m128i *)(p16 + a[2] + j)), r3 = _mm_loadu_si128((const __m128i *)(p16 + a[3] + j));
        __m128i r4 = _mm_loadu_si128((const __m128i *)(p16 + a[4] + j)), r5 = _mm_loadu_si128((const __m128i *)(p16 + a[5] + j));
        __m128i r6 = _mm_loadu_si128((const __m128i *)(p16 + a[6] + j)), r7 = _mm_loadu_si128((const __m128i *)(p16 + a[7] + j));
        __m128i t0 = _mm_unpacklo_epi16(r0, r1), t1 = _mm_unpackhi_epi16(r0, r1);
        __m128i t2 = _mm_unpacklo_epi16(r2, r3), t3 = _mm_unpackhi_epi16(r2, r3);
        __m128i t4 = _mm_unpacklo_epi16(r4, r5), t5 = _mm_unpackhi_epi16(r4, r5);
        __m128i t6 = _mm_unpacklo_epi16(r6, r7), t7 = _mm_unpackhi_epi16(r6, r7);
        __m128i u0 = _mm_unpacklo_epi32(t0, t2), u1 = _mm_unpackhi_epi32(t0, t2);
        __m128i u2 = _mm_unpacklo_epi32(t1, t3), u3 = _mm_unpackhi_epi32(t1, t3);
        __m128i u4 = _mm_unpacklo_epi32(t4, t6), u5 = _mm_unpackhi_epi32(t4, t6);
        __m128i u6 = _mm_unpacklo_epi32(t5, t7), u7 = _mm_unpackhi_epi32(t5, t7);
        pv[0] = _mm256_cvtepu16_epi32(_mm_unpacklo_epi64(u0, u4));
        pv[1] = _mm256_cvtepu16_epi32(_mm_unpackhi_epi64(u0, u4));
        pv[2] = _mm256_cvtepu16_epi32(_mm_unpacklo_epi64(u1, u5));
        pv[3] = _mm256_cvtepu16_epi32(_mm_unpackhi_epi64(u1, u5));
        pv[4] = _mm256_cvtepu16_epi32(_mm_unpacklo_epi64(u2, u6));
        pv[5] = _mm256_cvtepu16_epi32(_mm_unpackhi_epi64(u2, u6));
        pv[6] = _mm256_cvtepu16_epi32(_mm_unpacklo_epi64(u3, u7));
        pv[7] = _mm256_cvtepu16_epi32(_mm_unpackhi_epi64(u3, u7));
    } else {
        const uint32_t *p32 = (const uint32_t *)pred;
        __m256i r0 = _mm256_loadu_si256((const __m256i *)(p32 + a[0] + j)), r1 = _mm256_loadu_si256((const __m256i *)(p32 + a[1] + j));
        __m256i r2 = _mm256_loadu_si256((const __m256i *)(p32 + a[2] + j)), r3 = _mm256_loadu_si256((const __m256i *)(p32 + a[3] + j));
        __m256i r4 = _mm256_loadu_si256((const __m256i *)(p32 + a[4] + j)), r5 = _mm256_loadu_si256((const __m256i *)(p32 + a[5] + j));
        __m256i r6 = _mm256_loadu_si256((const __m256i *)(p32 + a[6] + j)), r7 = _mm256_loadu_si256((const __m256i *)(p32 + a[7] + j));
        __m256i t0 = _mm256_unpacklo_epi32(r0, r1), t1 = _mm256_unpackhi_epi32(r0, r1);
        __m256i t2 = _mm256_unpacklo_epi32(r2, r3), t3 = _mm256_unpackhi_epi32(r2, r3);
        __m256i t4 = _mm256_unpacklo_epi32(r4, r5), t5 = _mm256_unpackhi_epi32(r4, r5);
        __m256i t6 = _mm256_unpacklo_epi32(r6, r7), t7 = _mm256_unpackhi_epi32(r6, r7);
        __m256i u0 = _mm256_unpacklo_epi64(t0, t2), u1 = _mm256_unpackhi_epi64(t0, t2);
        __m256i u2 = _mm256_unpacklo_epi64(t1, t3), u3 = _mm256_unpackhi_epi64(t1, t3);
        __m256i u4 = _mm256_unpacklo_epi64(t4, t6), u5 = _mm256_unpackhi_epi64(t4, t6);
        __m256i u6 = _mm256_unpacklo_epi64(t5, t7), u7 = _mm256_unpackhi_epi64(t5, t7);
        pv[0] = _mm256_permute2x128_si256(u0, u4, 0x20);
        pv[4] = _mm256_permute2x128_si256(u0, u4, 0x31);
        pv[1] = _mm256_permute2x128_si256(u1, u5, 0x20);
        pv[5] = _mm256_permute2x128_si256(u1, u5, 0x31);
        pv[2] = _mm256_permute2x128_si256(u2, u6, 0x20);
        pv[6] = _mm256_permute2x128_si256(u2, u6, 0x31);
        pv[3] = _mm256_permute2x128_si256(u3, u7, 0x20);
        pv[7] = _mm256_permute2x128_si256(u3, u7, 0x31);
    }
}

/* The decode table (all paths): per row (context) and slot, entry = (f - 1) | (slot - start) << 12
 * | token << 24, f and start the token's frequency and first slot. With the previous-token
 * context, context c = 2 b + z lives in row z H + b (H = 16 >> mshift rows of buckets), so that
 * the bucket part of a row index fits 16 bits and z adds a constant. The vector path refuses a
 * frame that uses a context without table by bit 31 of its rows' entries (tokens < 128 there). */

/* the row offsets (bucket << 12) of cnt (a multiple of 8) elements of pred from element i into dst */
static inline __attribute__((target("avx2"), always_inline)) void stage_ctx(const void *pred, int w, size_t i, size_t cnt,
                                                                              const ctxparams *cp, uint16_t *dst) {
    const __m128i sh = _mm_cvtsi32_si128((int)cp->shift), msh = _mm_cvtsi32_si128((int)cp->mshift);
    size_t t = 0;
    if (w == 2) {
        const uint16_t *p16 = (const uint16_t *)pred + i;
        const __m256i em = _mm256_set1_epi16((short)cp->emask), lo = _mm256_set1_epi16((short)cp->lo);
        const __m256i top = _mm256_set1_epi16(NBUCKETS - 1);
        for (; t + 16 <= cnt; t += 16) {
            __m256i e = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(p16 + t)), sh), em);
            e = _mm256_min_epu16(_mm256_subs_epu16(e, lo), top);
            _mm256_storeu_si256((__m256i *)(dst + t), _mm256_slli_epi16(_mm256_srl_epi16(e, msh), PROB_BITS));
        }
        if (t < cnt) {
            __m128i e = _mm_and_si128(_mm_srl_epi16(_mm_loadu_si128((const __m128i *)(p16 + t)), sh), _mm256_castsi256_si128(em));
            e = _mm_min_epu16(_mm_subs_epu16(e, _mm256_castsi256_si128(lo)), _mm256_castsi256_si128(top));
            _mm_storeu_si128((__m128i *)(dst + t), _mm_slli_epi16(_mm_srl_epi16(e, msh), PROB_BITS));
        }
    } else {
        const uint32_t *p32 = (const uint32_t *)pred + i;
        const __m256i em = _mm256_set1_epi32((int)cp->emask), lo = _mm256_set1_epi32((int)cp->lo);
        const __m256i top = _mm256_set1_epi32(NBUCKETS - 1), zero = _mm256_setzero_si256();
        for (; t < cnt; t += 8) {
            __m256i e = _mm256_and_si256(_mm256_srl_epi32(_mm256_loadu_si256((const __m256i *)(p32 + t)), sh), em);
            e = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(e, lo), zero), top);
            e = _mm256_slli_epi32(_mm256_srl_epi32(e, msh), PROB_BITS);
            __m256i v = _mm256_permute4x64_epi64(_mm256_packus_epi32(e, e), 0x08);
            _mm_storeu_si128((__m128i *)(dst + t), _mm256_castsi256_si128(v));
        }
    }
}

/* the staged row offsets of 8 steps (from jj) of 8 lane rows (c + k DEC_CSTR) as 8 vectors of 8
 * lanes (32-bit) */
static inline __attribute__((target("avx2"), always_inline)) void load_staged(const uint16_t *c, size_t jj, __m256i *cv) {
    __m256i R[4];
    for (int i = 0; i < 4; i++)  /* R[i] = [row i | row i + 4] */
        R[i] = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(c + i * DEC_CSTR + jj))),
                                       _mm_loadu_si128((const __m128i *)(c + (i + 4) * DEC_CSTR + jj)), 1);
    const __m256i z = _mm256_setzero_si256();
    __m256i t0 = _mm256_unpacklo_epi16(R[0], R[1]), t1 = _mm256_unpackhi_epi16(R[0], R[1]);
    __m256i t2 = _mm256_unpacklo_epi16(R[2], R[3]), t3 = _mm256_unpackhi_epi16(R[2], R[3]);
    __m256i u0 = _mm256_unpacklo_epi32(t0, t2), u1 = _mm256_unpackhi_epi32(t0, t2);
    __m256i u2 = _mm256_unpacklo_epi32(t1, t3), u3 = _mm256_unpackhi_epi32(t1, t3);
    cv[0] = _mm256_unpacklo_epi16(u0, z); cv[1] = _mm256_unpackhi_epi16(u0, z);
    cv[2] = _mm256_unpacklo_epi16(u1, z); cv[3] = _mm256_unpackhi_epi16(u1, z);
    cv[4] = _mm256_unpacklo_epi16(u2, z); cv[5] = _mm256_unpackhi_epi16(u2, z);
    cv[6] = _mm256_unpacklo_epi16(u3, z); cv[7] = _mm256_unpackhi_epi16(u3, z);
}

/* the tokens (bits 24-31) of 8 steps' entries E[step] (8 lanes each) stored as 8 bytes per lane */
static inline __attribute__((target("avx2"), always_inline)) void store_tokens(uint8_t *tok, const size_t *a, size_t j,
                                                                                 const __m256i *E) {
    __m256i p01 = _mm256_packus_epi32(_mm256_srli_epi32(E[0], 24), _mm256_srli_epi32(E[1], 24));
    __m256i p23 = _mm256_packus_epi32(_mm256_srli_epi32(E[2], 24), _mm256_srli_epi32(E[3], 24));
    __m256i p45 = _mm256_packus_epi32(_mm256_srli_epi32(E[4], 24), _mm256_srli_epi32(E[5], 24));
    __m256i p67 = _mm256_packus_epi32(_mm256_srli_epi32(E[6], 24), _mm256_srli_epi32(E[7], 24));
    /* per 128-bit half (lanes 0-3, 4-7): byte 4 s + k = step s, lane k; transposed to 4 k + s */
    const __m256i tr = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,
                                        0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    __m256i q0 = _mm256_shuffle_epi8(_mm256_packus_epi16(p01, p23), tr);  /* steps 0-3 */
    __m256i q1 = _mm256_shuffle_epi8(_mm256_packus_epi16(p45, p67), tr);  /* steps 4-7 */
    __m256i r0 = _mm256_unpacklo_epi32(q0, q1), r1 = _mm256_unpackhi_epi32(q0, q1);  /* lanes 0, 1, 4, 5 / 2, 3, 6, 7 */
    __m128i r0l = _mm256_castsi256_si128(r0), r0h = _mm256_extracti128_si256(r0, 1);
    __m128i r1l = _mm256_castsi256_si128(r1), r1h = _mm256_extracti128_si256(r1, 1);
    _mm_storel_epi64((__m128i *)(tok + a[0] + j), r0l);
    _mm_storeh_pd((double *)(tok + a[1] + j), _mm_castsi128_pd(r0l));
    _mm_storel_epi64((__m128i *)(tok + a[2] + j), r1l);
    _mm_storeh_pd((double *)(tok + a[3] + j), _mm_castsi128_pd(r1l));
    _mm_storel_epi64((__m128i *)(tok + a[4] + j), r0h);
    _mm_storeh_pd((double *)(tok + a[5] + j), _mm_castsi128_pd(r0h));
    _mm_storel_epi64((__m128i *)(tok + a[6] + j), r1h);
    _mm_storeh_pd((double *)(tok + a[7] + j), _mm_castsi128_pd(r1h));
}

/* AVX2 decode of NG lane groups [k, k + 8 NG), steps [0, j1) (j1 a multiple of 8 that every
 * lane has), for 2- or 4-byte elements; PREV: the previous-token context. A vector holds a
 * group's 8 lanes; the NG groups' steps are interleaved so that one group's gather latency
 * overlaps the others' work. Per step: the entries gathered at row << 12 | (x & 4095); x = f (x >>
 * 12) + (slot - start); the lanes whose state fell below 2^16 take the group's next words in lane
 * order (8 words loaded and spread by a permutation: lane i gets word "lanes before i that need
 * one"). Tokens are stored in element order; *bad gets bit 31 of every entry. */
#define NG_MAX 8
/* the 8 entries tab[ti]: 8 scalar loads inserted into a vector (on AMD Zen 3, 0-8 % faster in the
 * decoder than vpgatherdd, whose throughput is low there) or, built with -DDEC_VGATHER, the gather */
static inline __attribute__((target("avx2"), always_inline)) __m256i gather8(const uint32_t *tab, __m256i ti) {
#ifdef DEC_VGATHER
    return _mm256_i32gather_epi32((const int *)tab, ti, 4);
#else
    __m128i lo = _mm256_castsi256_si128(ti), hi = _mm256_extracti128_si256(ti, 1);
    uint64_t q0 = (uint64_t)_mm_cvtsi128_si64(lo), q1 = (uint64_t)_mm_extract_epi64(lo, 1);
    uint64_t q2 = (uint64_t)_mm_cvtsi128_si64(hi), q3 = (uint64_t)_mm_extract_epi64(hi, 1);
    __m128i a = _mm_cvtsi32_si128((int)tab[(uint32_t)q0]);
    a = _mm_insert_epi32(a, (int)tab[q0 >> 32], 1);
    a = _mm_insert_epi32(a, (int)tab[(uint32_t)q1], 2);
    a = _mm_insert_epi32(a, (int)tab[q1 >> 32], 3);
    __m128i b = _mm_cvtsi32_si128((int)tab[(uint32_t)q2]);
    b = _mm_insert_epi32(b, (int)tab[q2 >> 32], 1);
    b = _mm_insert_epi32(b, (int)tab[(uint32_t)q3], 2);
    b = _mm_insert_epi32(b, (int)tab[q3 >> 32], 3);
    return _mm256_inserti128_si256(_mm256_castsi128_si256(a), b, 1);
#endif
}
static inline __attribute__((target("avx2"), always_inline)) void decode_avx2_ng(
        const uint32_t *tab, const void *pred, int w, size_t n, size_t L, size_t k, size_t j1, const ctxparams *cp,
        lanestate st, const uint16_t *words, uint8_t *tok, uint32_t *bad, const int NG, const int PREV) {
    const __m256i zero = _mm256_setzero_si256(), m12 = _mm256_set1_epi32(PROB_SCALE - 1);
    const __m256i t24 = _mm256_set1_epi32(1 << 24);  /* entry < 2^24: token 0 */
    const __m256i zrow = _mm256_set1_epi32((int)((NBUCKETS >> cp->mshift) << PROB_BITS));
    size_t a[NG_MAX][8];
    __m256i x[NG_MAX], zo[NG_MAX], u = zero;
    uint32_t off[NG_MAX];
    for (int g = 0; g < NG; g++) {
        for (int kk = 0; kk < 8; kk++) a[g][kk] = lane_start(n, L, k + 8 * (size_t)g + (size_t)kk);
        x[g] = _mm256_loadu_si256((const __m256i *)(st.x + k + 8 * g));
        off[g] = st.off[k / 8 + (size_t)g];
        zo[g] = _mm256_and_si256(_mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(st.pz + k + 8 * g)), zero), zrow);
    }
    __m256i cv[NG_MAX][8], E[NG_MAX][8];
    uint16_t *cst = (uint16_t *)(((uintptr_t)st.stage + 63) & ~(uintptr_t)63);
    uint8_t *tst = (uint8_t *)(cst + (size_t)DEC_LANES * DEC_CSTR);
    size_t at[8];
    for (int kk = 0; kk < 8; kk++) at[kk] = (size_t)kk * DEC_TSTR;
    for (size_t j0 = 0; j0 < j1; j0 += DEC_S) {
    const size_t sb = j1 - j0 < DEC_S ? j1 - j0 : DEC_S;
    for (int g = 0; g < NG; g++)
        for (int kk = 0; kk < 8; kk++) {
            stage_ctx(pred, w, a[g][kk] + j0, sb, cp, cst + (size_t)(8 * g + kk) * DEC_CSTR);
#ifndef DEC_NO_PREFETCH
            /* the next block of the lane's base elements (streamed from memory: 32 streams are more
             * than the hardware prefetchers follow); a hint, never a fault */
            if (j0 + DEC_S < j1) {
                const char *nx = (const char *)pred + (a[g][kk] + j0 + DEC_S) * (size_t)w;
                const size_t nb = (j1 - j0 - DEC_S < DEC_S ? j1 - j0 - DEC_S : DEC_S) * (size_t)w;
                for (size_t c = 0; c < nb; c += 64) _mm_prefetch(nx + c, _MM_HINT_T0);
            }
#endif
        }
    for (size_t j = j0; j < j0 + sb; j += 8) {
        for (int g = 0; g < NG; g++) load_staged(cst + (size_t)8 * g * DEC_CSTR, j - j0, cv[g]);
        for (int s = 0; s < 8; s++)
#pragma GCC unroll 8
            for (int g = 0; g < NG; g++) {
                __m256i xs = x[g];
                __m256i ti = _mm256_or_si256(_mm256_and_si256(xs, m12), cv[g][s]);
                if (PREV) ti = _mm256_add_epi32(ti, zo[g]);
                __m256i ent = gather8(tab, ti);
                u = _mm256_or_si256(u, ent);
                if (PREV) zo[g] = _mm256_and_si256(_mm256_cmpgt_epi32(t24, ent), zrow);
                __m256i xh = _mm256_srli_epi32(xs, PROB_BITS);
                __m256i bias = _mm256_and_si256(_mm256_srli_epi32(ent, 12), m12);
                xs = _mm256_add_epi32(_mm256_mullo_epi32(_mm256_and_si256(ent, m12), xh), _mm256_add_epi32(xh, bias));
                __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(xs, 16), zero);
                unsigned m = (unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(need));
                __m256i wv = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(words + off[g])));
                __m256i nw = _mm256_permutevar8x32_epi32(wv, _mm256_load_si256((const __m256i *)expand_lut[m]));
                off[g] += (uint32_t)__builtin_popcount(m);
                x[g] = _mm256_blendv_epi8(xs, _mm256_or_si256(_mm256_slli_epi32(xs, 16), nw), need);
                E[g][s] = ent;
            }
        for (int g = 0; g < NG; g++) store_tokens(tst + (size_t)8 * g * DEC_TSTR, at, j - j0, E[g]);
    }
    for (int g = 0; g < NG; g++)  /* (memcpy: rep movs, slow at this size) */
        for (int kk = 0; kk < 8; kk++) {
            uint8_t *d = tok + a[g][kk] + j0;
            const uint8_t *s = tst + (size_t)(8 * g + kk) * DEC_TSTR;
            size_t t = 0;
            for (; t + 32 <= sb; t += 32) _mm256_storeu_si256((__m256i *)(d + t), _mm256_load_si256((const __m256i *)(s + t)));
            for (; t < sb; t += 8) _mm_storel_epi64((__m128i *)(d + t), _mm_loadl_epi64((const __m128i *)(s + t)));
        }
    }
    const __m256i one = _mm256_set1_epi32(1);
    for (int g = 0; g < NG; g++) {
        _mm256_storeu_si256((__m256i *)(st.x + k + 8 * g), x[g]);
        st.off[k / 8 + (size_t)g] = off[g];
        _mm256_storeu_si256((__m256i *)(st.pz + k + 8 * g), _mm256_min_epu32(zo[g], one));
    }
    *bad |= (uint32_t)_mm256_movemask_ps(_mm256_castsi256_ps(u));
}

#ifndef AVX2_GROUPS
#define AVX2_GROUPS 4 /* then 2, then 1 */
#endif
static inline __attribute__((target("avx2"), always_inline)) void decode_avx2_p(
        const uint32_t *tab, const void *pred, int w, size_t n, size_t L, size_t k1, size_t j1, const ctxparams *cp,
        lanestate st, const uint16_t *words, uint8_t *tok, uint32_t *bad, const int PREV) {
    size_t k = 0;
    for (; k + 8 * AVX2_GROUPS <= k1; k += 8 * AVX2_GROUPS)
        decode_avx2_ng(tab, pred, w, n, L, k, j1, cp, st, words, tok, bad, AVX2_GROUPS, PREV);
#if AVX2_GROUPS > 4
    for (; k + 32 <= k1; k += 32) decode_avx2_ng(tab, pred, w, n, L, k, j1, cp, st, words, tok, bad, 4, PREV);
#endif
    for (; k + 16 <= k1; k += 16) decode_avx2_ng(tab, pred, w, n, L, k, j1, cp, st, words, tok, bad, 2, PREV);
    for (; k < k1; k += 8) decode_avx2_ng(tab, pred, w, n, L, k, j1, cp, st, words, tok, bad, 1, PREV);
}
/* lanes [0, k1) (k1 a multiple of 8), steps [0, j1); *bad != 0: a context without table was used */
static AVX2 void decode_avx2(const uint32_t *tab, const void *pred, int w, size_t n, size_t L, size_t k1, size_t j1,
                             const ctxparams *cp, lanestate st, const uint16_t *words, uint8_t *tok, uint32_t *bad) {
    if (cp->prev) decode_avx2_p(tab, pred, w, n, L, k1, j1, cp, st, words, tok, bad, 1);
    else decode_avx2_p(tab, pred, w, n, L, k1, j1, cp, st, words, tok, bad, 0);
}

static int have_avx2(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    }
    return cached;
}
#endif

#ifdef HAVE_AVX2_KERNEL
/* finish16 in AVX2 (same results): 8 elements at a time, their raw-bit offsets by a prefix sum of
 * the raw-bit counts; each element's at most 13 bits (+ 7 bits of offset) are picked out of one
 * 16-byte window of the stream by a byte shuffle; then the ulp inverse. Every window starts at or
 * before the stream's end (pos is checked first) and RAW_PAD zero bytes follow it. */
static AVX2 int finish16_avx2(const uint8_t *tok, const uint16_t *p, size_t n, const uint8_t *raw, size_t rawlen,
                              uint16_t *out) {
    const uint64_t limit = (uint64_t)rawlen * 8;
    uint64_t pos = 0;
    const __m256i c15 = _mm256_set1_epi32(15), c3 = _mm256_set1_epi32(3), c4 = _mm256_set1_epi32(4);
    const __m256i c2 = _mm256_set1_epi32(2), one = _mm256_set1_epi32(1), c7 = _mm256_set1_epi32(7);
    const __m256i rep = _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                         0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12);
    const __m256i inc = _mm256_set1_epi32(0x03020100);
    const __m128i m7f = _mm_set1_epi16(0x7FFF), one16 = _mm_set1_epi16(1);
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        if (pos > limit) return -1;
        __m256i tk = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(tok + i)));
        __m256i big = _mm256_cmpgt_epi32(tk, c15);
        __m256i nb = _mm256_and_si256(big, _mm256_sub_epi32(_mm256_srli_epi32(tk, 2), c2));
        __m256i base = _mm256_blendv_epi8(tk, _mm256_sllv_epi32(_mm256_or_si256(c4, _mm256_and_si256(tk, c3)), nb), big);
        __m256i incl = _mm256_add_epi32(nb, _mm256_slli_si256(nb, 4));
        incl = _mm256_add_epi32(incl, _mm256_slli_si256(incl, 8));
        incl = _mm256_add_epi32(incl, _mm256_shuffle_epi32(_mm256_permute2x128_si256(incl, incl, 0x08), 0xFF));
        __m256i off = _mm256_add_epi32(_mm256_sub_epi32(incl, nb), _mm256_set1_epi32((int)(pos & 7)));
        __m256i ctrl = _mm256_add_epi32(_mm256_shuffle_epi8(_mm256_srli_epi32(off, 3), rep), inc);
        __m256i win = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(raw + (pos >> 3))));
        __m256i v = _mm256_srlv_epi32(_mm256_shuffle_epi8(win, ctrl), _mm256_and_si256(off, c7));
        v = _mm256_and_si256(v, _mm256_sub_epi32(_mm256_sllv_epi32(one, nb), one));
        __m256i sym = _mm256_or_si256(base, v);
        __m128i z = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(sym, sym), 0x08));
        __m128i d = _mm_xor_si128(_mm_srli_epi16(z, 1), _mm_sub_epi16(_mm_setzero_si128(), _mm_and_si128(z, one16)));
        __m128i b = _mm_loadu_si128((const __m128i *)(p + i));
        __m128i o = _mm_add_epi16(_mm_xor_si128(b, _mm_and_si128(_mm_srai_epi16(b, 15), m7f)), d);
        _mm_storeu_si128((__m128i *)(out + i), _mm_xor_si128(o, _mm_and_si128(_mm_srai_epi16(o, 15), m7f)));
        pos += (uint32_t)_mm256_extract_epi32(incl, 7);
    }
    for (; i < n; i++) {  /* the last < 8 elements */
        if (pos > limit) return -1;
        unsigned k = tok[i], nb = tok_nbits[k];
        uint64_t peek;
        memcpy(&peek, raw + (pos >> 3), 8);
        unsigned bs = k < 16 ? k : (4u | (k & 3u)) << nb;
        uint16_t s = (uint16_t)(bs | ((peek >> (pos & 7)) & ((1ull << nb) - 1)));
        pos += nb;
        out[i] = undelta16(s, p[i]);
    }
    if (pos > limit || (pos + 7) / 8 != rawlen) return -1;
    return 0;
}
#endif

#ifdef HAVE_AVX2_KERNEL
/* finish16 with BMI2 (same results), 16 elements at a time: per element P = 2^(raw-bit count) and
 * the lead bits of its symbol come from 16-entry tables indexed by token >> 2 (byte shuffles);
 * the raw bits of 4 elements (at most 52) are spread into 4 16-bit lanes by one pdep with the
 * masks P - 1 from one 8-byte load of the stream; the symbols are lead * P | bits, then the ulp
 * inverse in 16 bits. Only where pdep is fast (not AMD before Zen 3: microcoded there). Every
 * load starts at or before 26 bytes past the stream's end (pos is checked every 16 elements) and
 * RAW_PAD zero bytes follow it. */
static __attribute__((target("avx2,bmi2,popcnt"))) int finish16_pdep(const uint8_t *tok, const uint16_t *p, size_t n,
                                                                   const uint8_t *raw, size_t rawlen, uint16_t *out) {
    const uint64_t limit = (uint64_t)rawlen * 8;
    uint64_t pos = 0;
    /* by h = token >> 2 (tokens < 64): raw-bit count nb = h < 4 ? 0 : h - 2 */
    const __m128i plo = _mm_setr_epi8(1, 1, 1, 1, 4, 8, 16, 32, 64, (char)128, 0, 0, 0, 0, 0, 0);
    const __m128i phi = _mm_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 4, 8, 16, 32);
    const __m128i lmask = _mm_setr_epi8(15, 15, 15, 15, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 3);
    const __m128i lor = _mm_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4, 4);
    const __m128i c15 = _mm_set1_epi8(15);
    const __m256i one16 = _mm256_set1_epi16(1), m7f = _mm256_set1_epi16(0x7FFF), zero = _mm256_setzero_si256();
    size_t i = 0;
    for (; i + 16 <= n; i += 16) {
        if (pos > limit) return -1;
        __m128i T = _mm_loadu_si128((const __m128i *)(tok + i));
        __m128i h = _mm_and_si128(_mm_srli_epi16(T, 2), c15);
        __m128i pl = _mm_shuffle_epi8(plo, h), ph = _mm_shuffle_epi8(phi, h);
        __m256i P = _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_unpacklo_epi8(pl, ph)), _mm_unpackhi_epi8(pl, ph), 1);
        __m256i M = _mm256_sub_epi16(P, one16);
        __m128i lead = _mm_or_si128(_mm_and_si128(T, _mm_shuffle_epi8(lmask, h)), _mm_shuffle_epi8(lor, h));
        __m256i base = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(lead), P);
        __m128i Ml = _mm256_castsi256_si128(M), Mh = _mm256_extracti128_si256(M, 1);
        uint64_t m0 = (uint64_t)_mm_cvtsi128_si64(Ml), m1 = (uint64_t)_mm_extract_epi64(Ml, 1);
        uint64_t m2 = (uint64_t)_mm_cvtsi128_si64(Mh), m3 = (uint64_t)_mm_extract_epi64(Mh, 1);
        uint64_t r, d0, d1, d2, d3;
        memcpy(&r, raw + (pos >> 3), 8);
        d0 = _pdep_u64(r >> (pos & 7), m0);
        pos += (uint64_t)__builtin_popcountll(m0);
        memcpy(&r, raw + (pos >> 3), 8);
        d1 = _pdep_u64(r >> (pos & 7), m1);
        pos += (uint64_t)__builtin_popcountll(m1);
        memcpy(&r, raw + (pos >> 3), 8);
        d2 = _pdep_u64(r >> (pos & 7), m2);
        pos += (uint64_t)__builtin_popcountll(m2);
        memcpy(&r, raw + (pos >> 3), 8);
        d3 = _pdep_u64(r >> (pos & 7), m3);
        pos += (uint64_t)__builtin_popcountll(m3);
        __m256i z = _mm256_or_si256(_mm256_set_epi64x((long long)d3, (long long)d2, (long long)d1, (long long)d0), base);
        __m256i d = _mm256_xor_si256(_mm256_srli_epi16(z, 1), _mm256_sub_epi16(zero, _mm256_and_si256(z, one16)));
        __m256i b = _mm256_loadu_si256((const __m256i *)(p + i));
        __m256i o = _mm256_add_epi16(_mm256_xor_si256(b, _mm256_and_si256(_mm256_srai_epi16(b, 15), m7f)), d);
        _mm256_storeu_si256((__m256i *)(out + i), _mm256_xor_si256(o, _mm256_and_si256(_mm256_srai_epi16(o, 15), m7f)));
    }
    for (; i < n; i++) {  /* the last < 16 elements */
        if (pos > limit) return -1;
        unsigned k = tok[i], nb = tok_nbits[k];
        uint64_t peek;
        memcpy(&peek, raw + (pos >> 3), 8);
        unsigned bs = k < 16 ? k : (4u | (k & 3u)) << nb;
        uint16_t s = (uint16_t)(bs | ((peek >> (pos & 7)) & ((1ull << nb) - 1)));
        pos += nb;
        out[i] = undelta16(s, p[i]);
    }
    if (pos > limit || (pos + 7) / 8 != rawlen) return -1;
    return 0;
}

/* pdep is one fast instruction on Intel (Haswell on) and AMD Zen 3 on, microcode before */
static int have_fast_pdep(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("avx2");
        if (cached && __builtin_cpu_is("amd")) {
            unsigned a, b, c, d;
            __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(1), "c"(0));
            unsigned family = ((a >> 8) & 15) + (((a >> 8) & 15) == 15 ? (a >> 20) & 255 : 0);
            if (family < 0x19) cached = 0;
        }
    }
    return cached && !getenv("ORCA_DIFF_NO_PDEP");  /* (the variable: to test the other path) */
}
#endif

#ifdef HAVE_AVX2_KERNEL
/* analyze16 in AVX2 (same results): per block of ANB elements, 16 at a time, the symbols'
 * tokens (bit length from the float conversion, whose two mantissa bits below the leading one are
 * the token's), their raw bits merged by 4 (at most 4 x 13 bits) and their histogram cells; then
 * the cells are counted and the merged raw bits appended in scalar code */
#define ANB 2048
static AVX2 size_t analyze16_avx2(const uint16_t *t, const uint16_t *p, size_t n, size_t L, unsigned sh,
                                  unsigned em, uint8_t *tok, uint8_t *raw, uint32_t *h, size_t hcopy) {
    uint16_t key[ANB];
    uint64_t Q[ANB / 4];
    uint32_t QN[ANB / 4];
    uint64_t acc = 0;
    unsigned accbits = 0;
    size_t out = 0, kn = 0, next = 0;  /* the next lane's first element */
    const size_t n16 = n & ~(size_t)15;
    const __m256i m7f = _mm256_set1_epi16(0x7FFF), emv = _mm256_set1_epi16((short)em);
    const __m256i one32 = _mm256_set1_epi32(1), c15 = _mm256_set1_epi32(15), c127 = _mm256_set1_epi32(127 + 2);
    const __m256i c508 = _mm256_set1_epi32(508), lo32 = _mm256_set1_epi64x(0xFFFFFFFF);
    const __m128i shv = _mm_cvtsi32_si128((int)sh), z1 = _mm_set1_epi8(1);
    __m128i Tprev = _mm_set1_epi8(1);
    for (size_t i0 = 0; i0 < n16; i0 += ANB) {
        size_t i1 = n16 - i0 < ANB ? n16 : i0 + ANB;
        for (size_t i = i0; i < i1; i += 16) {
            __m256i tv = _mm256_loadu_si256((const __m256i *)(t + i)), pv = _mm256_loadu_si256((const __m256i *)(p + i));
            __m256i ot = _mm256_xor_si256(tv, _mm256_and_si256(_mm256_srai_epi16(tv, 15), m7f));
            __m256i ob = _mm256_xor_si256(pv, _mm256_and_si256(_mm256_srai_epi16(pv, 15), m7f));
            __m256i d = _mm256_sub_epi16(ot, ob);
            __m256i s = _mm256_xor_si256(_mm256_add_epi16(d, d), _mm256_srai_epi16(d, 15));
            __m256i tk[2], qv[2], qn[2];
            for (int hh = 0; hh < 2; hh++) {
                __m256i s32 = _mm256_cvtepu16_epi32(hh ? _mm256_extracti128_si256(s, 1) : _mm256_castsi256_si128(s));
                __m256i fb = _mm256_castps_si256(_mm256_cvtepi32_ps(s32));
                __m256i big = _mm256_cmpgt_epi32(s32, c15);
                tk[hh] = _mm256_blendv_epi8(s32, _mm256_sub_epi32(_mm256_srli_epi32(fb, 21), c508), big);
                __m256i nb = _mm256_and_si256(big, _mm256_sub_epi32(_mm256_srli_epi32(fb, 23), c127));
                __m256i v = _mm256_and_si256(s32, _mm256_sub_epi32(_mm256_sllv_epi32(one32, nb), one32));
                /* pairs (2j, 2j + 1) in 64-bit lanes, then pairs of pairs */
                __m256i nbe = _mm256_and_si256(nb, lo32), nbo = _mm256_srli_epi64(nb, 32);
                __m256i pr = _mm256_or_si256(_mm256_and_si256(v, lo32), _mm256_sllv_epi64(_mm256_srli_epi64(v, 32), nbe));
                __m256i pn = _mm256_add_epi64(nbe, nbo);
                pr = _mm256_permute4x64_epi64(pr, 0xD8);  /* [p0, p2, p1, p3] */
                pn = _mm256_permute4x64_epi64(pn, 0xD8);
                __m128i plo = _mm256_castsi256_si128(pr), phi = _mm256_extracti128_si256(pr, 1);
                __m128i nlo = _mm256_castsi256_si128(pn), nhi = _mm256_extracti128_si256(pn, 1);
                /* quads q0 = p0 | p1 << n(p0), q1 = p2 | p3 << n(p2) */
                qv[hh] = _mm256_castsi128_si256(_mm_or_si128(plo, _mm_sllv_epi64(phi, nlo)));
                qn[hh] = _mm256_castsi128_si256(_mm_add_epi64(nlo, nhi));
            }
            __m256i t16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(tk[0], tk[1]), 0xD8);
            __m128i T = _mm_packus_epi16(_mm256_castsi256_si128(t16), _mm256_extracti128_si256(t16, 1));
            _mm_storeu_si128((__m128i *)(tok + i), T);
            __m128i z = _mm_and_si128(_mm_cmpeq_epi8(_mm_alignr_epi8(T, Tprev, 15), _mm_setzero_si128()), z1);
            Tprev = T;
            __m256i e = _mm256_and_si256(_mm256_srl_epi16(pv, shv), emv);
            __m256i kv = _mm256_or_si256(_mm256_slli_epi16(_mm256_or_si256(_mm256_add_epi16(e, e), _mm256_cvtepu8_epi16(z)), 6),
                                         _mm256_cvtepu8_epi16(T));
            _mm256_storeu_si256((__m256i *)(key + (i - i0)), kv);
            size_t qi = (i - i0) / 4;
            _mm_storeu_si128((__m128i *)(Q + qi), _mm256_castsi256_si128(qv[0]));
            _mm_storeu_si128((__m128i *)(Q + qi + 2), _mm256_castsi256_si128(qv[1]));
            QN[qi] = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(qn[0]));
            QN[qi + 1] = (uint32_t)_mm_extract_epi32(_mm256_castsi256_si128(qn[0]), 2);
            QN[qi + 2] = (uint32_t)_mm_cvtsi128_si32(_mm256_castsi256_si128(qn[1]));
            QN[qi + 3] = (uint32_t)_mm_extract_epi32(_mm256_castsi256_si128(qn[1]), 2);
        }
        while (next < i1) {  /* a lane's first element: z = 1 */
            key[next - i0] |= 1u << 6;
            next = ++kn < L ? lane_start(n, L, kn) : n;
        }
        for (size_t i = 0; i < i1 - i0; i++) h[(i & 1) * hcopy + key[i]]++;
        for (size_t j = 0; j < (i1 - i0) / 4; j++) {  /* append (branch-free, as in analyze16) */
            uint64_t v = Q[j];
            unsigned nb = QN[j];
            acc |= v << accbits;
            memcpy(raw + out, &acc, 8);
            unsigned full = (accbits + nb) >> 6;
            uint64_t rest = (v >> 1) >> (63 - accbits);
            out += 8 * (size_t)full;
            acc = full ? rest : acc;
            accbits = (accbits + nb) & 63;
        }
    }
    unsigned prevz = n16 ? tok[n16 - 1] == 0 : 1;
    for (size_t i = n16; i < n; i++) {  /* the last < 16 elements */
        uint64_t s = delta16(t[i], p[i]);
        unsigned tk = tok16_lut[s], nb = tok_nbits[tk];
        unsigned z = prevz;
        if (i == next) { z = 1; next = ++kn < L ? lane_start(n, L, kn) : n; }
        tok[i] = (uint8_t)tk;
        h[(i & 1) * hcopy + (((((unsigned)(p[i] >> sh) & em) << 1 | z) << 6) | tk)]++;
        prevz = tk == 0;
        uint64_t v = s & ((1ull << nb) - 1);
        acc |= v << accbits;
        memcpy(raw + out, &acc, 8);
        unsigned full = (accbits + nb) >> 6;
        uint64_t rest = (v >> 1) >> (63 - accbits);
        out += 8 * (size_t)full;
        acc = full ? rest : acc;
        accbits = (accbits + nb) & 63;
    }
    memcpy(raw + out, &acc, 8);
    return out + (accbits + 7) / 8;
}
#endif

#ifdef HAVE_AVX2_KERNEL
/* ctxindex for 2- and 4-byte elements, 16 or 8 elements per vector in element order (the bucket
 * by arithmetic, z from the token one element back); the lanes' first elements (z = 1) are
 * redone afterwards */
static AVX2 void ctxindex_avx2(const void *pred, int w, const uint8_t *tok, size_t n, size_t L, size_t kb, size_t ke,
                               const ctxparams *cp, uint16_t *idx) {
    const size_t ib = lane_start(n, L, kb), ie = lane_start(n, L, ke);
    idx -= ib;  /* element i at idx[i]: only [ib, ie) is written */
    const __m128i sh = _mm_cvtsi32_si128((int)cp->shift), msh = _mm_cvtsi32_si128((int)cp->mshift);
    const __m128i zsh = _mm_cvtsi32_si128(cp->prev ? 8 : 16);  /* z << 16 leaves a 16-bit lane: 0 */
    const int bs = cp->prev ? 9 : 8;
    size_t i = ib + 1;
    if (w == 2) {
        const uint16_t *p = (const uint16_t *)pred;
        const __m256i em = _mm256_set1_epi16((short)cp->emask), lo = _mm256_set1_epi16((short)cp->lo);
        const __m256i top = _mm256_set1_epi16(NBUCKETS - 1), zero = _mm256_setzero_si256();
        for (; i + 16 <= ie; i += 16) {
            __m256i e = _mm256_and_si256(_mm256_srl_epi16(_mm256_loadu_si256((const __m256i *)(p + i)), sh), em);
            __m256i b = _mm256_srl_epi16(_mm256_min_epi16(_mm256_max_epi16(_mm256_sub_epi16(e, lo), zero), top), msh);
            __m256i t = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i *)(tok + i)));
            __m256i z = _mm256_cvtepu8_epi16(_mm_cmpeq_epi8(_mm_loadu_si128((const __m128i *)(tok + i - 1)),
                                                            _mm_setzero_si128()));
            z = _mm256_sll_epi16(_mm256_and_si256(z, _mm256_set1_epi16(1)), zsh);
            __m256i v = _mm256_add_epi16(_mm256_add_epi16(_mm256_slli_epi16(b, 8), t), z);
            if (bs == 9) v = _mm256_add_epi16(v, _mm256_slli_epi16(b, 8));
            _mm256_storeu_si256((__m256i *)(idx + i), v);
        }
    } else {
        const uint32_t *p = (const uint32_t *)pred;
        const __m256i em = _mm256_set1_epi32((int)cp->emask), lo = _mm256_set1_epi32((int)cp->lo);
        const __m256i top = _mm256_set1_epi32(NBUCKETS - 1), zero = _mm256_setzero_si256();
        for (; i + 8 <= ie; i += 8) {
            __m256i e = _mm256_and_si256(_mm256_srl_epi32(_mm256_loadu_si256((const __m256i *)(p + i)), sh), em);
            __m256i b = _mm256_srl_epi32(_mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(e, lo), zero), top), msh);
            __m128i t8 = _mm_loadl_epi64((const __m128i *)(tok + i));
            __m128i z8 = _mm_cmpeq_epi8(_mm_loadl_epi64((const __m128i *)(tok + i - 1)), _mm_setzero_si128());
            __m256i t = _mm256_cvtepu8_epi32(t8);
            __m256i z = _mm256_sll_epi32(_mm256_and_si256(_mm256_cvtepu8_epi32(z8), _mm256_set1_epi32(1)),
                                         cp->prev ? _mm_cvtsi32_si128(8) : _mm_cvtsi32_si128(32));
            __m256i v = _mm256_add_epi32(_mm256_add_epi32(_mm256_slli_epi32(b, bs), t), z);
            __m256i v16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(v, v), 0x08);
            _mm_storeu_si128((__m128i *)(idx + i), _mm256_castsi256_si128(v16));
        }
    }
    uint16_t cb[256];
    for (unsigned e = 0; e <= cp->emask; e++) {
        int d = (int)e - (int)cp->lo;
        unsigned b = (unsigned)(d < 0 ? 0 : d > NBUCKETS - 1 ? NBUCKETS - 1 : d) >> cp->mshift;
        cb[e] = (uint16_t)((cp->prev ? 2u * b : b) << 8);
    }
    const unsigned zadd = cp->prev ? 0x100u : 0u;
    for (; i < ie; i++) {
        uint64_t pv = w == 2 ? ((const uint16_t *)pred)[i] : ((const uint32_t *)pred)[i];
        idx[i] = (uint16_t)(cb[(unsigned)(pv >> cp->shift) & cp->emask] + ((0u - (unsigned)(tok[i - 1] == 0)) & zadd)
                            + tok[i]);
    }
    for (size_t k = kb; k < ke; k++) {
        size_t a = lane_start(n, L, k);
        uint64_t pv = w == 2 ? ((const uint16_t *)pred)[a] : ((const uint32_t *)pred)[a];
        idx[a] = (uint16_t)(cb[(unsigned)(pv >> cp->shift) & cp->emask] + zadd + tok[a]);
    }
}
#endif

/* ------------------------------------------------------------------ rANS encode */

/* Per table entry idx = ctx * 256 + token: A = f | l << 13 | cum << 17 (f = 0: the token may not
 * occur) and M = m' with l = ceil(log2 f) and m' = ceil(2^(32 + l) / f) - 2^32, so that for every
 * 32-bit x, x div f = (((x * m') >> 32) + x) >> l exactly: with m = m' + 2^32 = (2^(32+l) + d) / f,
 * 0 <= d < f <= 2^l, x m / 2^(32+l) exceeds x / f by less than x / 2^(32+l) < 2^-l <= 1/f, too
 * little to reach the next integer. Plain 64-bit arithmetic, the same in scalar and AVX2 code. */
static void encode_tables(const uint16_t *freq, uint32_t *symA, uint32_t *symM) {
    for (unsigned c = 0; c < NCTX; c++) {
        uint32_t cum = 0;
        for (unsigned k = 0; k < 256; k++) {
            uint32_t f = freq[c * 256 + k], l = f > 1 ? (uint32_t)bit_length64(f - 1) : 0;
            symA[c * 256 + k] = f | l << 13 | (cum & 0xFFF) << 17;
            symM[c * 256 + k] = f ? (uint32_t)((((uint64_t)1 << (32 + l)) + f - 1) / f - ((uint64_t)1 << 32)) : 0;
            cum += f;
        }
    }
}

/* lanes [k0, k1) (whole groups of 8, or the last lanes), each from its last step down to step j0
 * (inclusive), in blocks of 16 lanes (16 independent chains); the words of lane k's group are
 * written backwards ending at wp[k / 8], so within a step the lanes go in descending order (the
 * decoder reads them in ascending order); -1 on a zero frequency */
static int encode_scalar(const uint16_t *idx, size_t ib, size_t n, size_t L, size_t k0, size_t k1, size_t j0,
                         const uint32_t *symA, const uint32_t *symM, uint32_t *x, uint16_t **wp) {
    const size_t q = n / L, r = n % L;
    for (size_t kb = k0; kb < k1; kb += 16)
    for (size_t j = q + (r > kb); j-- > j0;) {
        size_t kend = k1 - kb < 16 ? k1 : kb + 16;
        for (size_t k = kend; k-- > kb;) {
            if (j >= q + (k < r)) continue;
            unsigned id = idx[k * q + (k < r ? k : r) + j - ib];
            uint32_t sa = symA[id], f = sa & 0x1FFF;
            if (!f) return -1;
            uint32_t xs = x[k];
            /* branch-free renormalisation: the word is always written below the lane's pointer
             * (inside its region: at least 2 slots stay free for the final state) and kept only
             * when emitted; x >= f 2^20 <=> x >> 20 >= f */
            uint32_t emit = (xs >> 20) >= f;
            wp[k >> 3][-1] = (uint16_t)(xs & 0xFFFF);
            wp[k >> 3] -= emit;
            xs = emit ? xs >> 16 : xs;
            uint32_t qt = (uint32_t)(((((uint64_t)xs * symM[id]) >> 32) + xs) >> ((sa >> 13) & 15));
            x[k] = xs + qt * (PROB_SCALE - f) + (sa >> 17);
        }
    }
    return 0;
}

#ifdef HAVE_AVX2_KERNEL
/* pshufb controls that move the 16-bit words selected by an 8-bit mask, in order, to the top of a
 * 16-byte vector (the other bytes zero) */
static uint8_t compress_lut[256][16];
static void init_compress(void) {
    for (unsigned m = 0; m < 256; m++) {
        unsigned cnt = 0, r = 0;
        for (unsigned s = 0; s < 8; s++) cnt += (m >> s) & 1;
        memset(compress_lut[m], 0x80, 16);
        for (unsigned s = 0; s < 8; s++)
            if ((m >> s) & 1) {
                compress_lut[m][2 * (8 - cnt + r)] = (uint8_t)(2 * s);
                compress_lut[m][2 * (8 - cnt + r) + 1] = (uint8_t)(2 * s + 1);
                r++;
            }
    }
}

/* one encoding step of 8 lanes (iv: their table indices): returns the 8 candidate words (low 16
 * bits of the states) and sets *M to the lanes that emit theirs */
static inline AVX2 __m128i enc_step8(__m256i iv, __m256i *x, const uint32_t *symA, const uint32_t *symM,
                                     unsigned *M, __m256i *zf) {
    const __m256i zero = _mm256_setzero_si256(), lo32 = _mm256_set1_epi64x(0xFFFFFFFF);
    __m256i sa = _mm256_i32gather_epi32((const int *)symA, iv, 4);
    __m256i mp = _mm256_i32gather_epi32((const int *)symM, iv, 4);
    __m256i f = _mm256_and_si256(sa, _mm256_set1_epi32(0x1FFF));
    *zf = _mm256_or_si256(*zf, _mm256_cmpeq_epi32(f, zero));
    __m256i keep = _mm256_cmpgt_epi32(f, _mm256_srli_epi32(*x, 20));  /* no word emitted */
    *M = ~(unsigned)_mm256_movemask_ps(_mm256_castsi256_ps(keep)) & 0xFFu;
    __m256i lw = _mm256_and_si256(*x, _mm256_set1_epi32(0xFFFF));
    __m256i w16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(lw, lw), 0x08);
    __m256i xv = _mm256_blendv_epi8(_mm256_srli_epi32(*x, 16), *x, keep);
    __m256i l = _mm256_and_si256(_mm256_srli_epi32(sa, 13), _mm256_set1_epi32(15));
    __m256i xe = _mm256_and_si256(xv, lo32), xo = _mm256_srli_epi64(xv, 32);
    __m256i te = _mm256_add_epi64(_mm256_srli_epi64(_mm256_mul_epu32(xe, mp), 32), xe);
    __m256i to = _mm256_add_epi64(_mm256_srli_epi64(_mm256_mul_epu32(xo, _mm256_srli_epi64(mp, 32)), 32), xo);
    __m256i qe = _mm256_srlv_epi64(te, _mm256_and_si256(l, lo32));
    __m256i qo = _mm256_srlv_epi64(to, _mm256_srli_epi64(l, 32));
    __m256i q = _mm256_blend_epi32(qe, _mm256_slli_epi64(qo, 32), 0xAA);
    __m256i cmpl = _mm256_sub_epi32(_mm256_set1_epi32(PROB_SCALE), f);
    *x = _mm256_add_epi32(_mm256_add_epi32(xv, _mm256_mullo_epi32(q, cmpl)), _mm256_srli_epi32(sa, 17));
    return _mm256_castsi256_si128(w16);
}

/* the words a group of 8 lanes emitted in 8 steps (R[s]: the candidate words of step s, M[s]: the
 * lanes that emitted) pushed onto the group's stream, last step first: per step the emitted words
 * (in lane order) compressed to the top of a vector stored just below the pointer. The 8 - count
 * other words land below the new pointer, in free space (every group region keeps 8 spare words) */
static inline AVX2 void enc_flush8(const __m128i *R, const unsigned *M, uint16_t **gp) {
    uint16_t *o = *gp;
    for (int s = 7; s >= 0; s--) {
        __m128i v = _mm_shuffle_epi8(R[s], _mm_loadu_si128((const __m128i *)compress_lut[M[s]]));
        _mm_storeu_si128((__m128i *)(o - 8), v);
        o -= __builtin_popcount(M[s]);
    }
    *gp = o;
}

/* AVX2 encode of NG groups of 8 lanes [k, k + 8 NG), steps j1 - 1 down to 0 (j1 a multiple of 8
 * that every lane has), the groups interleaved to overlap their latencies; the 8 x 8 table
 * indices of a block are loaded and transposed as the decoder does with 16-bit base elements */
static inline __attribute__((target("avx2"), always_inline)) void encode_avx2_ng(
        const uint16_t *idx, size_t ib, size_t n, size_t L, size_t k, size_t j1, const uint32_t *symA,
        const uint32_t *symM, uint32_t *xs, uint16_t **wp, __m256i *zf, const int NG) {
    size_t a[NG_MAX][8];
    __m256i x[NG_MAX], pv[NG_MAX][8];
    __m128i R[NG_MAX][8];
    unsigned M[NG_MAX][8];
    for (int g = 0; g < NG; g++) {
        for (int kk = 0; kk < 8; kk++) a[g][kk] = lane_start(n, L, k + 8 * (size_t)g + (size_t)kk) - ib;
        x[g] = _mm256_loadu_si256((const __m256i *)(xs + k + 8 * g));
    }
    for (size_t j = j1; j >= 8;) {
        j -= 8;
        for (int g = 0; g < NG; g++) load_steps(idx, 2, a[g], j, pv[g]);
        for (int s = 7; s >= 0; s--)
            for (int g = 0; g < NG; g++) R[g][s] = enc_step8(pv[g][s], &x[g], symA, symM, &M[g][s], zf);
        for (int g = 0; g < NG; g++) enc_flush8(R[g], M[g], wp + k / 8 + (size_t)g);
    }
    for (int g = 0; g < NG; g++) _mm256_storeu_si256((__m256i *)(xs + k + 8 * g), x[g]);
}

/* lanes [k, k + 8 NG) (NG = 1 or 2), steps j1 - 1 down to 0; -1 if a token has frequency 0 */
static AVX2 int encode_avx2(const uint16_t *idx, size_t ib, size_t n, size_t L, size_t k, int NG, size_t j1,
                            const uint32_t *symA, const uint32_t *symM, uint32_t *x, uint16_t **wp) {
    __m256i zf = _mm256_setzero_si256();
    if (NG == 2) encode_avx2_ng(idx, ib, n, L, k, j1, symA, symM, x, wp, &zf, 2);
    else encode_avx2_ng(idx, ib, n, L, k, j1, symA, symM, x, wp, &zf, 1);
    return _mm256_testz_si256(zf, zf) ? 0 : -1;
}
#endif

/* encode every lane in reverse (last symbol first); the words of lane k's group are written
 * backwards ending at wp[k / 8] (the states last, so they read forwards); -1 on a zero frequency.
 * Blocks of 16 lanes: their table indices (ctx * 256 + token; 2 (q + 1) 16 bytes, reused), then
 * the steps the vector code does not cover (the lanes' ends; lanes beyond a multiple of 8), then
 * the rest in AVX2, 2 groups of 8 lanes interleaved. */
#define ENC_LANES 16
static size_t encode_work_size(size_t n, size_t L) {
    return (L + 2 * NCTX * 256) * sizeof(uint32_t) + ENC_LANES * (n / L + 1) * sizeof(uint16_t);
}

static int encode_lanes(const void *p, const uint8_t *tok, int w, const ctxparams *cp, size_t n, size_t L,
                        const uint16_t *freq, uint16_t **wp, int simd, void *work) {
    const size_t q = n / L;
    (void)q; (void)simd;
    uint32_t *x = (uint32_t *)work;  /* work: encode_work_size(n, L) bytes */
    uint32_t *symA = x + L;
    uint32_t *symM = symA + NCTX * 256;
    uint16_t *idx = (uint16_t *)(symM + NCTX * 256);
    size_t j1 = 0;
#ifdef HAVE_AVX2_KERNEL
    if (simd && q >= 8) j1 = q & ~(size_t)7;  /* steps [0, j1) of lanes in groups of 8 in AVX2 */
#endif
    int bad = 0;
    encode_tables(freq, symA, symM);
    for (size_t k = 0; k < L; k++) x[k] = STATE_LOW;
    for (size_t kb = 0; kb < L && !bad; kb += ENC_LANES) {
        size_t ke = L - kb < ENC_LANES ? L : kb + ENC_LANES, ib = lane_start(n, L, kb);
        size_t kv = j1 ? kb + ((ke - kb) & ~(size_t)7) : kb;  /* lanes [kb, kv) in AVX2 */
#ifdef HAVE_AVX2_KERNEL
        if (simd && w <= 4) ctxindex_avx2(p, w, tok, n, L, kb, ke, cp, idx);
        else
#endif
        if (w == 2) ctxindex16(p, tok, n, L, kb, ke, cp, idx);
        else if (w == 4) ctxindex32(p, tok, n, L, kb, ke, cp, idx);
        else ctxindex64(p, tok, n, L, kb, ke, cp, idx);
        bad |= encode_scalar(idx, ib, n, L, kb, kv, j1, symA, symM, x, wp);
        bad |= encode_scalar(idx, ib, n, L, kv, ke, 0, symA, symM, x, wp);
#ifdef HAVE_AVX2_KERNEL
        if (kv > kb && !bad) bad = encode_avx2(idx, ib, n, L, kb, (int)((kv - kb) / 8), j1, symA, symM, x, wp);
#endif
    }
    if (!bad)  /* the final states: a group's lanes read in ascending order, so pushed descending */
        for (size_t k = L; k-- > 0;) {
            *--wp[k >> 3] = (uint16_t)(x[k] & 0xFFFF);
            *--wp[k >> 3] = (uint16_t)(x[k] >> 16);
        }
    return bad ? -1 : 0;
}

/* ------------------------------------------------------------------ scratch memory */

/* The kernels' working buffers (tokens, padded copies, tables, ...) come from a small cache of
 * freed blocks, taken and given back only while holding the GIL (no other lock needed): with
 * plain malloc/free, calls on chunks of a few hundred KB spent a third of their time in page
 * faults and brk/munmap, as glibc hands large blocks back to the system at every free. Bound: at
 * most SCRATCH_SLOTS blocks and SCRATCH_TOTAL bytes are kept between calls. */
#define SCRATCH_SLOTS 8
#ifndef SCRATCH_TOTAL /* (0 to test under a memory checker: every block is freed) */
#define SCRATCH_TOTAL ((size_t)32 << 20)
#endif
typedef struct { size_t cap, pad; } scratch_head;  /* 16 bytes: blocks stay 16-byte aligned */
static scratch_head *scratch_slot[SCRATCH_SLOTS];
static size_t scratch_kept;

static void *scratch_get(size_t size) {
    int best = -1;
    for (int i = 0; i < SCRATCH_SLOTS; i++)
        if (scratch_slot[i] && scratch_slot[i]->cap >= size && (best < 0 || scratch_slot[i]->cap < scratch_slot[best]->cap))
            best = i;
    if (best >= 0) {
        scratch_head *h = scratch_slot[best];
        scratch_slot[best] = NULL;
        scratch_kept -= h->cap;
        return h + 1;
    }
    scratch_head *h = (scratch_head *)malloc(sizeof(scratch_head) + size);
    if (!h) return NULL;
    h->cap = size;
    return h + 1;
}

static void scratch_put(void *p) {
    if (!p) return;
    scratch_head *h = (scratch_head *)p - 1;
    for (int i = 0; i < SCRATCH_SLOTS && scratch_kept + h->cap <= SCRATCH_TOTAL; i++)
        if (!scratch_slot[i]) {
            scratch_slot[i] = h;
            scratch_kept += h->cap;
            return;
        }
    free(h);
}

/* ------------------------------------------------------------------ argument checks */

static int check_common(Py_buffer *t, Py_buffer *p, int w, int shift, int ebits, int lo, int mshift,
                        Py_ssize_t lanes, size_t *n, ctxparams *cp) {
    if (w != 2 && w != 4 && w != 8) { PyErr_SetString(PyExc_ValueError, "element size must be 2, 4 or 8"); return -1; }
    if (t->len != p->len || t->len % w || t->len == 0 || t->len / w >= ((Py_ssize_t)1 << 31)) {
        PyErr_SetString(PyExc_ValueError, "target/output and prediction must be the same whole number (1 to 2^31 - 1) of elements");
        return -1;
    }
    *n = (size_t)(t->len / w);
    if (ebits < 1 || ebits > 8 || shift < 0 || shift + ebits > 8 * w || lo < 0 || lo >= (1 << ebits) ||
        mshift < 0 || mshift > 4) {
        PyErr_SetString(PyExc_ValueError, "invalid context parameters");
        return -1;
    }
    if (lanes < 1 || (size_t)lanes > *n) { PyErr_SetString(PyExc_ValueError, "invalid lane count"); return -1; }
    cp->shift = (unsigned)shift;
    cp->emask = (1u << ebits) - 1;
    cp->lo = (unsigned)lo;
    cp->mshift = (unsigned)mshift;
    cp->prev = 0;
    return 0;
}

/* frequency tables: uint16 [32][256]; used rows (< contexts) sum to PROB_SCALE or are all zero;
 * tokens >= alpha have frequency 0; rows >= contexts must be zero */
static int check_freqs(Py_buffer *fb, unsigned contexts, unsigned alpha, uint32_t *validmask) {
    if (fb->len != NCTX * 256 * 2) { PyErr_SetString(PyExc_ValueError, "frequency tables have the wrong size"); return -1; }
    const uint16_t *f = (const uint16_t *)fb->buf;
    *validmask = 0;
    for (unsigned c = 0; c < NCTX; c++) {
        uint32_t sum = 0;
        for (unsigned k = 0; k < 256; k++) {
            if (k >= alpha && f[c * 256 + k]) { PyErr_SetString(PyExc_ValueError, "frequency for a token out of range"); return -1; }
            sum += f[c * 256 + k];
        }
        if ((c < contexts && sum != 0 && sum != PROB_SCALE) || (c >= contexts && sum)) {
            PyErr_SetString(PyExc_ValueError, "table does not sum to 4096");
            return -1;
        }
        if (sum) *validmask |= 1u << c;
    }
    return 0;
}

#define ALPHABET(w) (16u + (8u * (unsigned)(w) - 4u) * 4u)

/* ------------------------------------------------------------------ Python functions */

/* analyze(target, pred, w, shift, ebits, lanes, tok) -> (counts, lo, raw): the encoder's one pass
 * over the chunk. Writes the tokens into tok (n bytes); returns the start lo of the window of 16
 * exponent values holding the most elements (the first such), counts[(bucket * 2 + z) * A + token]
 * (uint32, A the alphabet: 64, 128, 256 for w = 2, 4, 8; bucket = the exponent clamped into [lo,
 * lo + 15], z = "the previous symbol of the lane has token 0": the encoder picks its model from
 * them) and the raw-bit stream. Integer arithmetic, as entropy.exponent_window/_bucket_counts. */
static PyObject *py_analyze(PyObject *self, PyObject *args) {
    Py_buffer t, p, tb;
    int w, shift, ebits;
    Py_ssize_t lanes;
    if (!PyArg_ParseTuple(args, "y*y*iiinw*", &t, &p, &w, &shift, &ebits, &lanes, &tb)) return NULL;
    PyObject *res = NULL, *cnt = NULL;
    size_t n;
    ctxparams cp;
    int lo = 0;
    uint32_t *h = NULL;
    uint8_t *raw = NULL;
    if (check_common(&t, &p, w, shift, ebits, 0, 0, lanes, &n, &cp) != 0) goto done;
    if ((size_t)tb.len != n) { PyErr_SetString(PyExc_ValueError, "token buffer must hold one byte per element"); goto done; }
    {
        const unsigned tbits = w == 2 ? 6u : w == 4 ? 7u : 8u;  /* log2 of the alphabet (a row) */
        const size_t rows = (size_t)2 << ebits, hcopy = rows << tbits;
        h = (uint32_t *)scratch_get(2 * hcopy * sizeof(uint32_t));
        raw = (uint8_t *)scratch_get(n * (size_t)w + 16);
        if (h) memset(h, 0, 2 * hcopy * sizeof(uint32_t));
        cnt = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(2 * NBUCKETS * 4) << tbits);
        if (!h || !raw || !cnt) { if (!PyErr_Occurred()) PyErr_NoMemory(); goto done; }
        uint32_t *counts = (uint32_t *)PyBytes_AS_STRING(cnt);
        size_t rawlen = 0, L = (size_t)lanes;
        int simd = 0;
#ifdef HAVE_AVX2_KERNEL
        simd = have_avx2() && !getenv("ORCA_DIFF_NO_SIMD");
#endif
        (void)simd;
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_KERNEL
        if (w == 2 && simd) rawlen = analyze16_avx2(t.buf, p.buf, n, L, cp.shift, cp.emask, tb.buf, raw, h, hcopy);
        else
#endif
        if (w == 2) rawlen = analyze16(t.buf, p.buf, n, L, cp.shift, cp.emask, tbits, tb.buf, raw, h, hcopy);
        else if (w == 4) rawlen = analyze32(t.buf, p.buf, n, L, cp.shift, cp.emask, tbits, tb.buf, raw, h, hcopy);
        else rawlen = analyze64(t.buf, p.buf, n, L, cp.shift, cp.emask, tbits, tb.buf, raw, h, hcopy);
        const size_t A = (size_t)1 << tbits, erows = (size_t)1 << ebits;
        for (size_t c = 0; c < hcopy; c++) h[c] += h[hcopy + c];
        /* lo: the first window of 16 consecutive exponent values holding the most elements */
        uint64_t best = 0, win = 0;
        uint64_t *ecount = (uint64_t *)(h + hcopy);  /* the second copy, no longer needed (>= 2^ebits x 8 bytes) */
        for (size_t e = 0; e < erows; e++) {
            uint64_t c = 0;
            for (size_t k = 0; k < 2 * A; k++) c += h[e * 2 * A + k];
            ecount[e] = c;
        }
        if (erows > NBUCKETS) {
            for (size_t e = 0; e < erows; e++) {
                win += ecount[e];
                if (e >= NBUCKETS) win -= ecount[e - NBUCKETS];
                if (e >= NBUCKETS - 1 && (e == NBUCKETS - 1 || win > best)) { best = win; lo = (int)(e + 1 - NBUCKETS); }
            }
        }
        /* counts per finest context: bucket = min(max(e - lo, 0), 15), then z, then the token */
        memset(counts, 0, (2 * NBUCKETS * sizeof(uint32_t)) << tbits);
        for (size_t e = 0; e < erows; e++) {
            int d = (int)e - lo;
            size_t b = (size_t)(d < 0 ? 0 : d > NBUCKETS - 1 ? NBUCKETS - 1 : d);
            for (size_t k = 0; k < 2 * A; k++) counts[b * 2 * A + k] += h[e * 2 * A + k];
        }
        Py_END_ALLOW_THREADS
        res = Py_BuildValue("(Oiy#)", cnt, lo, (const char *)raw, (Py_ssize_t)rawlen);
    }
done:
    Py_XDECREF(cnt);
    scratch_put(h); scratch_put(raw);
    PyBuffer_Release(&t); PyBuffer_Release(&p); PyBuffer_Release(&tb);
    return res;
}

/* encode(tok, pred, w, shift, ebits, lo, mshift, prev, lanes, freqs) -> (words, lane_words): the
 * rANS words of every lane, given the tokens analyze wrote */
static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer tb, p, fb;
    int w, shift, ebits, lo, mshift, prev;
    Py_ssize_t lanes;
    if (!PyArg_ParseTuple(args, "y*y*iiiiiiny*", &tb, &p, &w, &shift, &ebits, &lo, &mshift, &prev, &lanes, &fb)) return NULL;
    PyObject *res = NULL;
    size_t n;
    ctxparams cp;
    uint32_t validmask;
    uint16_t *wbuf = NULL, **wp = NULL;
    uint32_t *counts = NULL;
    void *work = NULL;
    if (check_common(&p, &p, w, shift, ebits, lo, mshift, lanes, &n, &cp) != 0) goto done;
    if ((size_t)tb.len != n) { PyErr_SetString(PyExc_ValueError, "one token per element expected"); goto done; }
    cp.prev = prev ? 1 : 0;
    if (check_freqs(&fb, (NBUCKETS >> cp.mshift) * (cp.prev ? 2 : 1), ALPHABET(w), &validmask) != 0) goto done;
    size_t L = (size_t)lanes, steps = (n + L - 1) / L;
    /* the stream of group g (lanes 8g .. 8g + 7): [g R, (g + 1) R), R = 8 (steps + 2) + 8: at
     * most one word per lane and step and the 2 of each final state, and 8 spare words below them
     * for the vector code's stores */
    const size_t G = (L + 7) / 8, R = 8 * (steps + 2) + 8;
    wbuf = (uint16_t *)scratch_get(G * R * sizeof(uint16_t));
    wp = (uint16_t **)malloc(G * sizeof(uint16_t *));
    counts = (uint32_t *)malloc(G * sizeof(uint32_t));
    work = scratch_get(encode_work_size(n, L));
    if (!wbuf || !wp || !counts || !work) { PyErr_NoMemory(); goto done; }
    const uint16_t *freq = (const uint16_t *)fb.buf;
    const uint8_t *tok = (const uint8_t *)tb.buf;
    int bad = 0, simd = 0;
    size_t total = 0;
#ifdef HAVE_AVX2_KERNEL
    simd = have_avx2() && !getenv("ORCA_DIFF_NO_SIMD");
#endif
    Py_BEGIN_ALLOW_THREADS
    for (size_t g = 0; g < G; g++) wp[g] = wbuf + (g + 1) * R;  /* filled backwards from its end */
    bad = encode_lanes(p.buf, tok, w, &cp, n, L, freq, wp, simd, work);
    if (!bad) {  /* compact the groups' words to the front, in group order */
        for (size_t g = 0; g < G; g++) {
            size_t c = (size_t)(wbuf + (g + 1) * R - wp[g]);
            memmove(wbuf + total, wp[g], c * sizeof(uint16_t));
            counts[g] = (uint32_t)c;
            total += c;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad) { PyErr_SetString(PyExc_ValueError, "a token has frequency 0 in its context's table"); goto done; }
    res = Py_BuildValue("(y#y#)", (const char *)wbuf, (Py_ssize_t)(total * 2), (const char *)counts,
                        (Py_ssize_t)(G * 4));
done:
    scratch_put(wbuf); scratch_put(work); free(wp); free(counts);
    PyBuffer_Release(&tb); PyBuffer_Release(&p); PyBuffer_Release(&fb);
    return res;
}

static PyObject *py_decode(PyObject *self, PyObject *args) {
    Py_buffer o, p, fb, lc, wb, rb;
    int w, shift, ebits, lo, mshift, prev;
    Py_ssize_t lanes;
    if (!PyArg_ParseTuple(args, "w*y*iiiiiiny*y*y*y*", &o, &p, &w, &shift, &ebits, &lo, &mshift, &prev, &lanes, &fb,
                          &lc, &wb, &rb)) return NULL;
    PyObject *res = NULL;
    size_t n;
    ctxparams cp;
    uint32_t validmask, used = 0;
    uint32_t *tab = NULL, *x = NULL, *off = NULL, *end = NULL, *pzv = NULL;
    uint16_t *wpad = NULL;
    uint8_t *tok = NULL, *raw = NULL;
    void *stage = NULL;
    const char *err = NULL;
    if (check_common(&o, &p, w, shift, ebits, lo, mshift, lanes, &n, &cp) != 0) goto done;
    cp.prev = prev ? 1 : 0;
    unsigned contexts = (NBUCKETS >> cp.mshift) * (cp.prev ? 2 : 1);
    if (check_freqs(&fb, contexts, ALPHABET(w), &validmask) != 0) goto done;
    size_t L = (size_t)lanes, G = (L + 7) / 8, steps = (n + L - 1) / L, nwords = (size_t)(wb.len / 2);
    if ((size_t)lc.len != 4 * G || wb.len % 2 || nwords >= ((size_t)1 << 30) || steps >= ((size_t)1 << 26)) {
        PyErr_SetString(PyExc_ValueError, "group table has the wrong size");
        goto done;
    }
    x = (uint32_t *)malloc(L * sizeof(uint32_t));
    off = (uint32_t *)malloc(G * sizeof(uint32_t));
    end = (uint32_t *)malloc(G * sizeof(uint32_t));
    pzv = (uint32_t *)malloc(L * sizeof(uint32_t));
    /* a group reads at most 8 words per step past its start: 8 steps + 16 words of zero padding
     * (the vector code loads 8 words at a time) keep every read inside this buffer */
    wpad = (uint16_t *)scratch_get((nwords + 8 * steps + 16) * sizeof(uint16_t));
    tab = (uint32_t *)scratch_get((size_t)contexts * PROB_SCALE * sizeof(uint32_t));  /* valid rows filled below */
    tok = (uint8_t *)scratch_get(n + 16);
    stage = scratch_get(DEC_STAGE_BYTES);
    raw = (uint8_t *)scratch_get((size_t)rb.len + RAW_PAD);
    if (!x || !off || !end || !pzv || !wpad || !tab || !tok || !raw || !stage) { PyErr_NoMemory(); goto done; }
    {
        const uint32_t *cnt = (const uint32_t *)lc.buf;
        uint64_t total = 0;
        for (size_t g = 0; g < G; g++) {  /* each group holds at least the states of its lanes */
            size_t states = 2 * ((g + 1) * 8 < L ? 8 : L - g * 8);
            if (cnt[g] < states || total + cnt[g] > nwords) { PyErr_SetString(PyExc_ValueError, "group sizes do not match the words"); goto done; }
            off[g] = (uint32_t)total;
            total += cnt[g];
            end[g] = (uint32_t)total;
        }
        if (total != nwords) { PyErr_SetString(PyExc_ValueError, "group sizes do not match the words"); goto done; }
    }
    memcpy(wpad, wb.buf, (size_t)wb.len);
    memset(wpad + nwords, 0, (8 * steps + 16) * sizeof(uint16_t));
    memcpy(raw, rb.buf, (size_t)rb.len);
    memset(raw + rb.len, 0, RAW_PAD);
    {
        const uint16_t *f = (const uint16_t *)fb.buf;
        const unsigned H = NBUCKETS >> cp.mshift;
        for (unsigned c = 0; c < contexts; c++) {
            uint32_t *t = tab + (size_t)(cp.prev ? (c & 1) * H + (c >> 1) : c) * PROB_SCALE;  /* its row */
            if (!(validmask >> c & 1)) {  /* never used by a valid frame: refused after decoding */
                for (uint32_t j = 0; j < PROB_SCALE; j++) t[j] = DTAB_BAD | (PROB_SCALE - 1) | j << 12;
                continue;
            }
            for (unsigned k = 0; k < 256; k++) {  /* a run of f slots per token (vectorises) */
                const uint32_t fk = f[c * 256 + k], base = (fk - 1) | k << 24;
                for (uint32_t j = 0; j < fk; j++) t[j] = base + (j << 12);
                t += fk;
            }
        }
    }
    for (size_t k = 0; k < L; k++) {  /* the initial states, a group's lanes in order */
        x[k] = ((uint32_t)wpad[off[k >> 3]] << 16) | wpad[off[k >> 3] + 1];
        off[k >> 3] += 2;
        pzv[k] = 1;
    }
    lanestate st = {x, off, pzv, stage};
    const size_t q = n / L;
    int simd = 0, avx2 = 0;
#ifdef HAVE_AVX2_KERNEL
    avx2 = have_avx2() && !getenv("ORCA_DIFF_NO_SIMD");
    simd = w <= 4 && L >= 8 && q >= 8 && avx2;
#endif
    (void)avx2; (void)simd; (void)q;
    Py_BEGIN_ALLOW_THREADS
    size_t k1 = 0, j1 = 0;
#ifdef HAVE_AVX2_KERNEL
    if (simd) {
        /* 8 lanes at a time, 8 steps at a time, for the steps every lane has */
        k1 = L & ~(size_t)7;
        j1 = q & ~(size_t)7;
        uint32_t bad = 0;
        decode_avx2(tab, p.buf, w, n, L, k1, j1, &cp, st, wpad, tok, &bad);
        if (bad) used |= ~validmask;  /* some context without table */
    }
#endif
    /* the rest in scalar code: lanes [0, k1) from step j1, lanes [k1, L) from step 0 */
    if (w == 2) {
        decode_scalar16(tab, p.buf, n, L, 0, k1, j1, steps, &cp, st, wpad, tok, &used);
        decode_scalar16(tab, p.buf, n, L, k1, L, 0, steps, &cp, st, wpad, tok, &used);
    } else if (w == 4) {
        decode_scalar32(tab, p.buf, n, L, 0, k1, j1, steps, &cp, st, wpad, tok, &used);
        decode_scalar32(tab, p.buf, n, L, k1, L, 0, steps, &cp, st, wpad, tok, &used);
    } else {
        decode_scalar64(tab, p.buf, n, L, 0, L, 0, steps, &cp, st, wpad, tok, &used);
    }
    if (used & ~validmask) err = "the token stream uses a context that has no table";
    for (size_t k = 0; k < L && !err; k++)
        if (x[k] != STATE_LOW || off[k >> 3] != end[k >> 3]) err = "an ANS lane group does not end with its words";
    if (!err) {
        int r;
#ifdef HAVE_AVX2_KERNEL
        if (w == 2 && avx2 && have_fast_pdep()) r = finish16_pdep(tok, p.buf, n, raw, (size_t)rb.len, o.buf);
        else if (w == 2 && avx2) r = finish16_avx2(tok, p.buf, n, raw, (size_t)rb.len, o.buf);
        else
#endif
        if (w == 2) r = finish16(tok, p.buf, n, raw, (size_t)rb.len, o.buf);
        else if (w == 4) r = finish32(tok, p.buf, n, raw, (size_t)rb.len, o.buf);
        else r = finish64(tok, p.buf, n, raw, (size_t)rb.len, o.buf);
        if (r) err = "the raw-bit stream does not match the tokens";
    }
    Py_END_ALLOW_THREADS
    if (err) { PyErr_SetString(PyExc_ValueError, err); goto done; }
    Py_INCREF(Py_None);
    res = Py_None;
done:
    free(x); free(off); free(end); free(pzv);
    scratch_put(wpad); scratch_put(tab); scratch_put(tok); scratch_put(raw); scratch_put(stage);
    PyBuffer_Release(&o); PyBuffer_Release(&p); PyBuffer_Release(&fb);
    PyBuffer_Release(&lc); PyBuffer_Release(&wb); PyBuffer_Release(&rb);
    return res;
}

/* ------------------------------------------------------------------ low-rank prediction (format §3e) */
/* Only where float arithmetic is plain IEEE single precision (not x87's excess precision, which
 * could round twice): elsewhere the module lacks lowrank_predict and numpy computes it. */
#include <float.h>
#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD == 0
#define HAVE_LOWRANK_KERNEL 1

/* float32 bits -> BF16 bits, round to nearest even (finite or infinite inputs; lowrank._to_bits). */
static inline uint16_t lr_to_bf16(uint32_t u) { return (uint16_t)((u + (0x7FFFu + ((u >> 16) & 1u))) >> 16); }

/* float32 bits -> F16 bits, round to nearest even, overflow to infinity, subnormals rounded (what
 * numpy's float32 -> float16 cast gives; NaN never reaches here). */
static inline uint16_t lr_to_f16(uint32_t f) {
    uint32_t sgn = (f & 0x80000000u) >> 16, fexp = f & 0x7F800000u, sig;
    if (fexp >= 0x47800000u) return (uint16_t)(sgn + 0x7C00u);
    if (fexp <= 0x38000000u) {
        if (fexp < 0x33000000u) return (uint16_t)sgn;
        sig = (0x00800000u + (f & 0x007FFFFFu)) >> (113u - (fexp >> 23));
        if ((sig & 0x3FFFu) != 0x1000u || (f & 0x7FFu)) sig += 0x1000u;
        return (uint16_t)(sgn + (sig >> 13));
    }
    sig = f & 0x007FFFFFu;
    if ((sig & 0x3FFFu) != 0x1000u) sig += 0x1000u;
    return (uint16_t)(sgn + ((fexp - 0x38000000u) >> 13) + (sig >> 13));
}

/* F16 bits -> float32 bits (exact). */
static inline uint32_t lr_from_f16(uint16_t h) {
    uint32_t sgn = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1Fu) return sgn | 0x7F800000u | (m << 13);
    if (e) return sgn | ((e + 112u) << 23) | (m << 13);
    if (!m) return sgn;
    e = 113u;
    while (!(m & 0x400u)) { m <<= 1; e--; }
    return sgn | (e << 23) | ((m & 0x3FFu) << 13);
}

/* One predicted element: v = (float)(m 2^(ea + eb)) for the exact integer sum m, q = float(pred) + v
 * rounded to the dtype (code 0 BF16, 1 F16); a pred that is not finite is kept. */
static inline uint16_t lr_element(uint16_t pb, double m, double scale, int code) {
    float base, q;
    uint32_t ub, uq;
    if (code == 0) {
        if ((pb & 0x7F80u) == 0x7F80u) return pb;
        ub = (uint32_t)pb << 16;
    } else {
        if ((pb & 0x7C00u) == 0x7C00u) return pb;
        ub = lr_from_f16(pb);
    }
    memcpy(&base, &ub, 4);
    q = base + (float)(m * scale);
    memcpy(&uq, &q, 4);
    return code == 0 ? lr_to_bf16(uq) : lr_to_f16(uq);
}

/* The rows of one chunk: element i at row y = (col0 + i) / cols, column x: m = sum_k a[y][k] b[k][x]
 * (bd: b as floats, exact for int16, k-major), summed in double, exact: every product and partial
 * sum is an integer within +-2^35, so neither the order of the sum nor FMA can change it; then
 * lr_element. */
static void lowrank_rows_base(uint16_t *out, const uint16_t *pr, const int16_t *a, const float *bd, int r,
                              double scale, Py_ssize_t col0, Py_ssize_t cols, Py_ssize_t n, int code, double *acc) {
    const Py_ssize_t rows = (col0 + n + cols - 1) / cols;
    for (Py_ssize_t y = 0; y < rows; y++) {
        Py_ssize_t x0 = y ? 0 : col0, x1 = col0 + n - y * cols;
        if (x1 > cols) x1 = cols;
        const int16_t *ay = a + y * r;
        for (Py_ssize_t x = x0; x < x1; x++) acc[x] = 0.0;
        for (int k = 0; k < r; k++) {  /* row by row of b: contiguous, so that the compiler vectorises it */
            const double ak = (double)ay[k];
            const float *bk = bd + (Py_ssize_t)k * cols;
            for (Py_ssize_t x = x0; x < x1; x++) acc[x] += ak * (double)bk[x];
        }
        const Py_ssize_t i0 = y * cols - col0;
        for (Py_ssize_t x = x0; x < x1; x++) out[i0 + x] = lr_element(pr[i0 + x], acc[x], scale, code);
    }
}

#ifdef HAVE_AVX2_KERNEL
/* lowrank_rows_base with AVX2, FMA and F16C (the same bits): 32 columns of a row at a time, their
 * sums in 8 vector accumulators over k (independent chains: one accumulator per 4 columns would
 * wait on the add's latency), then per 8 elements the scale, the float cast, the base widened
 * (BF16: a shift; F16: vcvtph2ps, exact), the float add, the rounding (BF16: the bit formula of
 * lr_to_bf16; F16: vcvtps2ph round-to-nearest-even, IEEE like lr_to_f16) and the non-finite bases
 * kept by a blend. The rest of a row in lr_element. */
static __attribute__((target("avx2,fma,f16c"))) void lowrank_rows_avx2(
        uint16_t *out, const uint16_t *pr, const int16_t *a, const float *bd, int r, double scale, Py_ssize_t col0,
        Py_ssize_t cols, Py_ssize_t n, int code) {
    const Py_ssize_t rows = (col0 + n + cols - 1) / cols;
    const __m256d sc = _mm256_set1_pd(scale);
    const __m256i rb = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
    const __m128i emask = _mm_set1_epi16(code == 0 ? 0x7F80 : 0x7C00);
    for (Py_ssize_t y = 0; y < rows; y++) {
        Py_ssize_t x0 = y ? 0 : col0, x1 = col0 + n - y * cols, x = x0;
        if (x1 > cols) x1 = cols;
        const int16_t *ay = a + y * r;
        const Py_ssize_t i0 = y * cols - col0;
        for (; x + 32 <= x1; x += 32) {
            __m256d acc[8];
            for (int j = 0; j < 8; j++) acc[j] = _mm256_setzero_pd();
            for (int k = 0; k < r; k++) {
                const __m256d ak = _mm256_set1_pd((double)ay[k]);
                const float *bk = bd + (Py_ssize_t)k * cols + x;
                for (int j = 0; j < 8; j++) acc[j] = _mm256_fmadd_pd(ak, _mm256_cvtps_pd(_mm_loadu_ps(bk + 4 * j)), acc[j]);
            }
            for (int h = 0; h < 4; h++) {
                const __m128 lo = _mm256_cvtpd_ps(_mm256_mul_pd(acc[2 * h], sc));
                const __m128 hi = _mm256_cvtpd_ps(_mm256_mul_pd(acc[2 * h + 1], sc));
                const __m256 v = _mm256_insertf128_ps(_mm256_castps128_ps256(lo), hi, 1);
                const __m128i pb = _mm_loadu_si128((const __m128i *)(pr + i0 + x + 8 * h));
                __m128i res;
                if (code == 0) {
                    const __m256 base = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(pb), 16));
                    const __m256i uq = _mm256_castps_si256(_mm256_add_ps(base, v));
                    const __m256i rnd = _mm256_srli_epi32(
                        _mm256_add_epi32(uq, _mm256_add_epi32(rb, _mm256_and_si256(_mm256_srli_epi32(uq, 16), one))), 16);
                    res = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(rnd, rnd), 0x08));
                } else {
                    res = _mm256_cvtps_ph(_mm256_add_ps(_mm256_cvtph_ps(pb), v), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
                }
                const __m128i keep = _mm_cmpeq_epi16(_mm_and_si128(pb, emask), emask);
                _mm_storeu_si128((__m128i *)(out + i0 + x + 8 * h), _mm_blendv_epi8(res, pb, keep));
            }
        }
        for (; x < x1; x++) {
            double m = 0;
            for (int k = 0; k < r; k++) m += (double)ay[k] * (double)bd[(Py_ssize_t)k * cols + x];
            out[i0 + x] = lr_element(pr[i0 + x], m, scale, code);
        }
    }
}
static int have_avx2_fma_f16c(void) {
    static int cached = -1;
    if (cached < 0) {
        __builtin_cpu_init();
        cached = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    }
    return cached && !getenv("ORCA_DIFF_NO_SIMD");
}
#endif

/* lowrank_predict(out, pred, a, b, r, ea, eb, col0, cols, code): out = the predicted bits of a
 * chunk (uint16; code 0 BF16, 1 F16) from the base's bits pred and the int16 factors a (rows x r)
 * and b (r x cols): the bits of lowrank.predict (lowrank_rows above). */
static PyObject *py_lowrank_predict(PyObject *self, PyObject *args) {
    Py_buffer o, p, ab, bb;
    int r, ea, eb, code;
    Py_ssize_t col0, cols;
    if (!PyArg_ParseTuple(args, "w*y*y*y*iiinni", &o, &p, &ab, &bb, &r, &ea, &eb, &col0, &cols, &code)) return NULL;
    PyObject *res = NULL;
    float *bd = NULL;
    double *acc = NULL;
    Py_ssize_t n = p.len / 2, rows = 0;
    if (r < 1 || r > 32 || cols < 1 || col0 < 0 || col0 >= cols || (code != 0 && code != 1) || ea < -100 || ea > 100
        || eb < -100 || eb > 100 || o.len != p.len || p.len % 2) {
        PyErr_SetString(PyExc_ValueError, "lowrank_predict: invalid arguments");
        goto done;
    }
    rows = (col0 + n + cols - 1) / cols;
    if (ab.len != 2 * (Py_ssize_t)r * rows || bb.len != 2 * (Py_ssize_t)r * cols) {
        PyErr_SetString(PyExc_ValueError, "lowrank_predict: factor sizes do not match");
        goto done;
    }
    bd = (float *)malloc((size_t)r * (size_t)cols * sizeof(float));  /* twice the b the frame holds */
    acc = (double *)malloc((size_t)cols * sizeof(double));
    if (!bd || !acc) { PyErr_NoMemory(); goto done; }
    {
        const int16_t *b = (const int16_t *)bb.buf;
        for (Py_ssize_t i = 0; i < (Py_ssize_t)r * cols; i++) bd[i] = (float)b[i];  /* exact */
        const double scale = ldexp(1.0, ea + eb);
        int avx2 = 0;
#ifdef HAVE_AVX2_KERNEL
        avx2 = have_avx2_fma_f16c();
#endif
        Py_BEGIN_ALLOW_THREADS
#ifdef HAVE_AVX2_KERNEL
        if (avx2)
            lowrank_rows_avx2((uint16_t *)o.buf, (const uint16_t *)p.buf, (const int16_t *)ab.buf, bd, r, scale, col0,
                              cols, n, code);
        else
#endif
            lowrank_rows_base((uint16_t *)o.buf, (const uint16_t *)p.buf, (const int16_t *)ab.buf, bd, r, scale, col0,
                              cols, n, code, acc);
        Py_END_ALLOW_THREADS
        (void)avx2;
    }
    res = Py_None;
    Py_INCREF(res);
done:
    free(bd);
    free(acc);
    PyBuffer_Release(&o); PyBuffer_Release(&p); PyBuffer_Release(&ab); PyBuffer_Release(&bb);
    return res;
}
#endif /* HAVE_LOWRANK_KERNEL */

static PyMethodDef methods[] = {
    {"analyze", py_analyze, METH_VARARGS, "tokens, raw bits and token counts per (exponent, previous-token-was-0) of one chunk"},
    {"encode", py_encode, METH_VARARGS, "rANS-encode the lanes of one chunk's tokens -> (words, lane_words)"},
    {"decode", py_decode, METH_VARARGS, "decode one chunk's lanes and raw bits into out (ulp inverse included)"},
#ifdef HAVE_LOWRANK_KERNEL
    {"lowrank_predict", py_lowrank_predict, METH_VARARGS, "the predicted bits of a low-rank frame's chunk (format 3e)"},
#endif
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_entropy", "compiled kernels of orca_diff.entropy", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__entropy(void) {
    init_tokens();
#ifdef HAVE_AVX2_KERNEL
    init_compress();
    init_expand();
#endif
    return PyModule_Create(&module);
}
