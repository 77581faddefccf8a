/* The compiled kernels of orca_diff.entropy (codec "ans", docs/format.md section 3b).
 *
 * Three functions, each the hot loop of one step; everything else (choosing the context model,
 * quantising tables, the frame header) is Python shared with the pure-numpy path, so that both
 * produce identical bytes:
 *
 *   histogram(target, pred, w, shift, ebits, lo, lanes) -> bytes: uint64 counts[32][256]
 *   encode(target, pred, w, shift, ebits, lo, mshift, prev, lanes, freqs) -> (words, lane_words, raw)
 *   decode(out, pred, w, shift, ebits, lo, mshift, prev, lanes, freqs, lane_words, words, raw) -> None
 *
 * Lanes are interleaved: element i belongs to lane i % L and is its (i / L)-th symbol, so one
 * decoding step of lanes k..k+7 reads 8 consecutive base elements and writes 8 consecutive
 * tokens: with AVX2 (chosen at run time, GCC/Clang on x86-64) a step is one vector operation with
 * two gathers; elsewhere a scalar loop whose iterations (lanes) are independent.
 *
 * Everything decode reads is untrusted: every table, count and size is checked, stream reads stay
 * inside buffers padded by more than any lane can over-read, and a stream that does not end
 * exactly where it should raises ValueError (never a crash, a hang or an access outside the
 * buffers). The GIL is released around the loops. Plain C99 with the CPython API; builds with
 * GCC, Clang and MSVC. Data are little-endian (as the format); the host is assumed little-endian,
 * like numpy's views.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
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

static int bit_length64(uint64_t v) {
    if (!v) return 0;
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
    if (s < 16) { *nb = 0; return (unsigned)s; }
    int m = bit_length64(s) - 1;
    *nb = (unsigned)(m - 2);
    return 16u + 4u * (unsigned)(m - 4) + (unsigned)((s >> (m - 2)) & 3u);
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
/* tokens (and, when raw != NULL, the raw bits packed LSB-first; returns their byte count) */     \
static size_t tokens##B(const T *t, const T *p, size_t n, uint8_t *tok, uint8_t *raw) {           \
    uint64_t acc = 0;                                                                             \
    unsigned accbits = 0, nb;                                                                     \
    size_t out = 0;                                                                               \
    for (size_t i = 0; i < n; i++) {                                                              \
        uint64_t s = delta##B(t[i], p[i]);                                                        \
        tok[i] = (uint8_t)token_of(s, &nb);                                                       \
        if (raw && nb) {                                                                          \
            uint64_t v = s & ((1ull << nb) - 1);                                                  \
            acc |= v << accbits;                                                                  \
            if (accbits + nb >= 64) {                                                             \
                memcpy(raw + out, &acc, 8);                                                       \
                out += 8;                                                                         \
                acc = v >> (64 - accbits);                                                        \
                accbits = accbits + nb - 64;                                                      \
            } else {                                                                              \
                accbits += nb;                                                                    \
            }                                                                                     \
        }                                                                                         \
    }                                                                                             \
    if (raw) memcpy(raw + out, &acc, 8);                                                          \
    return out + (accbits + 7) / 8;                                                               \
}                                                                                                 \
static void contexts##B(const T *p, const uint8_t *tok, size_t n, size_t L, const ctxparams *cp, \
                        int prev, uint8_t *ctx) {                                                 \
    for (size_t i = 0; i < n; i++) {                                                              \
        unsigned b = bucket_of(p[i], cp);                                                         \
        ctx[i] = (uint8_t)(prev ? 2u * b + (i < L ? 1u : tok[i - L] == 0) : b);                   \
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
    if (B <= 32) { /* at most 29 raw bits: a 64-bit buffer refilled 32 bits at a time */          \
        const uint8_t *rp = raw;                                                                  \
        uint64_t buf = 0;                                                                         \
        unsigned avail = 0;                                                                       \
        for (size_t i = 0; i < n; i++) {                                                          \
            unsigned k = tok[i], nb = nbits[k];                                                   \
            if (avail < 32) {                                                                     \
                uint32_t w32;                                                                     \
                if ((size_t)(rp - raw) > rawlen + 4) return -1; /* reads stay in the padding */   \
                memcpy(&w32, rp, 4);                                                              \
                buf |= (uint64_t)w32 << avail;                                                    \
                rp += 4;                                                                          \
                avail += 32;                                                                      \
            }                                                                                     \
            uint64_t v = buf & ((1ull << nb) - 1);                                                \
            buf >>= nb;                                                                           \
            avail -= nb;                                                                          \
            pos += nb;                                                                            \
            out[i] = (T)(base[k] | v);                                                            \
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
/* scalar decode of lanes [k0, k1) at the steps that start at first, first + L, ... < n */       \
static void decode_scalar##B(const uint32_t *tab, const T *p, size_t first, size_t n, size_t L,   \
                             size_t k0, size_t k1, const ctxparams *cp, uint32_t *x, uint32_t *off, \
                             const uint16_t *words, uint8_t *tok, uint32_t *used) {               \
    uint32_t u = 0;                                                                               \
    for (size_t i0 = first; i0 < n; i0 += L) {                                                    \
        size_t hi = i0 + k1 <= n ? k1 : (n > i0 + k0 ? n - i0 : k0);                              \
        for (size_t k = k0; k < hi; k++) {                                                        \
            size_t i = i0 + k;                                                                    \
            unsigned c = bucket_of(p[i], cp);                                                     \
            if (cp->prev) c = 2u * c + (i < L ? 1u : tok[i - L] == 0);                            \
            u |= 1u << c;                                                                         \
            uint32_t xs = x[k];                                                                   \
            uint32_t e = tab[(size_t)c * PROB_SCALE + (xs & (PROB_SCALE - 1))];                   \
            xs = (((e >> 8) & (PROB_SCALE - 1)) + 1) * (xs >> PROB_BITS) + (e >> 20);             \
            uint32_t need = xs < STATE_LOW;                                                       \
            uint32_t nw = words[off[k]];                                                          \
            x[k] = need ? ((xs << 16) | nw) : xs;                                                 \
            off[k] += need;                                                                       \
            tok[i] = (uint8_t)(e & 0xFF);                                                         \
        }                                                                                         \
    }                                                                                             \
    *used |= u;                                                                                   \
}

DEFINE_KERNELS(uint16_t, 16)
DEFINE_KERNELS(uint32_t, 32)
DEFINE_KERNELS(uint64_t, 64)

#ifdef HAVE_AVX2_KERNEL
/* AVX2 decode of lanes [0, k1) (k1 a multiple of 8) at every step, for 2- or 4-byte elements. */
__attribute__((target("avx2"))) static void decode_avx2(const uint32_t *tab, const void *pred, int w, size_t n,
                                                        size_t L, size_t k1, const ctxparams *cp, uint32_t *x,
                                                        uint32_t *off, const uint16_t *words, uint8_t *tok,
                                                        uint32_t *used) {
    const __m256i zero = _mm256_setzero_si256(), one = _mm256_set1_epi32(1);
    const __m256i m12 = _mm256_set1_epi32(PROB_SCALE - 1), m8 = _mm256_set1_epi32(0xFF);
    const __m256i m16 = _mm256_set1_epi32(0xFFFF), emask = _mm256_set1_epi32((int)cp->emask);
    const __m256i lo = _mm256_set1_epi32((int)cp->lo), top = _mm256_set1_epi32(NBUCKETS - 1);
    const __m128i sh = _mm_cvtsi32_si128((int)cp->shift), msh = _mm_cvtsi32_si128((int)cp->mshift);
    const int prev = (int)cp->prev;
    __m256i u = zero;
    for (size_t i0 = 0; i0 + k1 <= n; i0 += L) {
        for (size_t k = 0; k < k1; k += 8) {
            size_t i = i0 + k;
            __m256i pv = w == 2 ? _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)pred + i)))
                                : _mm256_loadu_si256((const __m256i *)((const uint32_t *)pred + i));
            __m256i e = _mm256_and_si256(_mm256_srl_epi32(pv, sh), emask);
            e = _mm256_min_epi32(_mm256_max_epi32(_mm256_sub_epi32(e, lo), zero), top);
            __m256i c = _mm256_srl_epi32(e, msh);
            if (prev) {
                __m256i pz = one;
                if (i >= L) {
                    __m256i pt = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(tok + i - L)));
                    pz = _mm256_and_si256(_mm256_cmpeq_epi32(pt, zero), one);
                }
                c = _mm256_add_epi32(_mm256_add_epi32(c, c), pz);
            }
            u = _mm256_or_si256(u, _mm256_sllv_epi32(one, c));
            __m256i xs = _mm256_loadu_si256((const __m256i *)(x + k));
            __m256i idx = _mm256_or_si256(_mm256_slli_epi32(c, PROB_BITS), _mm256_and_si256(xs, m12));
            __m256i ent = _mm256_i32gather_epi32((const int *)tab, idx, 4);
            __m256i f = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(ent, 8), m12), one);
            xs = _mm256_add_epi32(_mm256_mullo_epi32(f, _mm256_srli_epi32(xs, PROB_BITS)), _mm256_srli_epi32(ent, 20));
            __m256i need = _mm256_cmpeq_epi32(_mm256_srli_epi32(xs, 16), zero);
            __m256i o = _mm256_loadu_si256((const __m256i *)(off + k));
            __m256i nw = _mm256_and_si256(_mm256_i32gather_epi32((const int *)words, o, 2), m16);
            xs = _mm256_blendv_epi8(xs, _mm256_or_si256(_mm256_slli_epi32(xs, 16), nw), need);
            _mm256_storeu_si256((__m256i *)(x + k), xs);
            _mm256_storeu_si256((__m256i *)(off + k), _mm256_sub_epi32(o, need));
            __m256i s = _mm256_and_si256(ent, m8);
            __m256i s16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(s, s), 0x08);
            __m128i s8 = _mm_packus_epi16(_mm256_castsi256_si128(s16), _mm256_castsi256_si128(s16));
            _mm_storel_epi64((__m128i *)(tok + i), s8);
        }
    }
    uint32_t ul[8];
    _mm256_storeu_si256((__m256i *)ul, u);
    for (int k = 0; k < 8; k++) *used |= ul[k];
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

/* ------------------------------------------------------------------ rANS encode */

/* encode every lane in reverse (last step first); lane k's words are written backwards ending at
 * wend[k] (state last, so they read forwards); returns -1 on a zero frequency */
static int encode_lanes(const uint8_t *tok, const uint8_t *ctx, size_t n, size_t L, const uint16_t *freq,
                        const uint16_t *cum, uint16_t **wp) {
    uint32_t *x = (uint32_t *)malloc(L * sizeof(uint32_t));
    if (!x) return -2;
    for (size_t k = 0; k < L; k++) x[k] = STATE_LOW;
    size_t steps = (n + L - 1) / L;
    for (size_t j = steps; j-- > 0;) {
        size_t i0 = j * L, hi = n - i0 < L ? n - i0 : L;
        for (size_t k = 0; k < hi; k++) {
            size_t i = i0 + k;
            unsigned idx = (unsigned)ctx[i] * 256u + tok[i];
            uint32_t f = freq[idx], c = cum[idx];
            if (!f) { free(x); return -1; }
            uint32_t xs = x[k];
            if ((uint64_t)xs >= ((uint64_t)f << (32 - PROB_BITS))) {
                *--wp[k] = (uint16_t)(xs & 0xFFFF);
                xs >>= 16;
            }
            x[k] = ((xs / f) << PROB_BITS) + (xs % f) + c;
        }
    }
    for (size_t k = 0; k < L; k++) {
        *--wp[k] = (uint16_t)(x[k] & 0xFFFF);
        *--wp[k] = (uint16_t)(x[k] >> 16);
    }
    free(x);
    return 0;
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

static PyObject *py_histogram(PyObject *self, PyObject *args) {
    Py_buffer t, p;
    int w, shift, ebits, lo;
    Py_ssize_t lanes;
    if (!PyArg_ParseTuple(args, "y*y*iiiin", &t, &p, &w, &shift, &ebits, &lo, &lanes)) return NULL;
    PyObject *res = NULL;
    size_t n;
    ctxparams cp;
    uint8_t *tok = NULL, *ctx = NULL;
    if (check_common(&t, &p, w, shift, ebits, lo, 0, lanes, &n, &cp) == 0) {
        tok = (uint8_t *)malloc(n);
        ctx = (uint8_t *)malloc(n);
        res = PyBytes_FromStringAndSize(NULL, NCTX * 256 * 8);
        if (!tok || !ctx) { Py_CLEAR(res); PyErr_NoMemory(); }
        if (res) {
            uint64_t *counts = (uint64_t *)PyBytes_AS_STRING(res);
            memset(counts, 0, NCTX * 256 * 8);
            size_t L = (size_t)lanes;
            Py_BEGIN_ALLOW_THREADS
            if (w == 2) { tokens16(t.buf, p.buf, n, tok, NULL); contexts16(p.buf, tok, n, L, &cp, 1, ctx); }
            else if (w == 4) { tokens32(t.buf, p.buf, n, tok, NULL); contexts32(p.buf, tok, n, L, &cp, 1, ctx); }
            else { tokens64(t.buf, p.buf, n, tok, NULL); contexts64(p.buf, tok, n, L, &cp, 1, ctx); }
            for (size_t i = 0; i < n; i++) counts[(unsigned)ctx[i] * 256u + tok[i]]++;
            Py_END_ALLOW_THREADS
        }
    }
    free(tok); free(ctx);
    PyBuffer_Release(&t); PyBuffer_Release(&p);
    return res;
}

static PyObject *py_encode(PyObject *self, PyObject *args) {
    Py_buffer t, p, fb;
    int w, shift, ebits, lo, mshift, prev;
    Py_ssize_t lanes;
    if (!PyArg_ParseTuple(args, "y*y*iiiiiiny*", &t, &p, &w, &shift, &ebits, &lo, &mshift, &prev, &lanes, &fb)) return NULL;
    PyObject *res = NULL;
    size_t n;
    ctxparams cp;
    uint32_t validmask;
    uint8_t *tok = NULL, *ctx = NULL, *raw = NULL;
    uint16_t *wbuf = NULL, *cum = NULL, **wp = NULL;
    uint32_t *counts = NULL;
    if (check_common(&t, &p, w, shift, ebits, lo, mshift, lanes, &n, &cp) != 0) goto done;
    cp.prev = prev ? 1 : 0;
    if (check_freqs(&fb, (NBUCKETS >> cp.mshift) * (cp.prev ? 2 : 1), ALPHABET(w), &validmask) != 0) goto done;
    size_t L = (size_t)lanes, steps = (n + L - 1) / L;
    tok = (uint8_t *)malloc(n);
    ctx = (uint8_t *)malloc(n);
    raw = (uint8_t *)malloc(n * (size_t)w + 16);
    wbuf = (uint16_t *)malloc(L * (steps + 2) * sizeof(uint16_t));
    cum = (uint16_t *)malloc(NCTX * 256 * sizeof(uint16_t));
    wp = (uint16_t **)malloc(L * sizeof(uint16_t *));
    counts = (uint32_t *)malloc(L * sizeof(uint32_t));
    if (!tok || !ctx || !raw || !wbuf || !cum || !wp || !counts) { PyErr_NoMemory(); goto done; }
    const uint16_t *freq = (const uint16_t *)fb.buf;
    for (unsigned c = 0; c < NCTX; c++) {
        uint32_t s = 0;
        for (unsigned k = 0; k < 256; k++) { cum[c * 256 + k] = (uint16_t)s; s += freq[c * 256 + k]; }
    }
    int bad = 0;
    size_t rawlen = 0, total = 0;
    Py_BEGIN_ALLOW_THREADS
    if (w == 2) { rawlen = tokens16(t.buf, p.buf, n, tok, raw); contexts16(p.buf, tok, n, L, &cp, cp.prev, ctx); }
    else if (w == 4) { rawlen = tokens32(t.buf, p.buf, n, tok, raw); contexts32(p.buf, tok, n, L, &cp, cp.prev, ctx); }
    else { rawlen = tokens64(t.buf, p.buf, n, tok, raw); contexts64(p.buf, tok, n, L, &cp, cp.prev, ctx); }
    /* lane k's region: [k (steps + 2), (k + 1) (steps + 2)), filled backwards from its end */
    for (size_t k = 0; k < L; k++) wp[k] = wbuf + (k + 1) * (steps + 2);
    bad = encode_lanes(tok, ctx, n, L, freq, cum, wp);
    if (!bad) {  /* compact the lanes' words to the front, in lane order */
        for (size_t k = 0; k < L; k++) {
            size_t c = (size_t)(wbuf + (k + 1) * (steps + 2) - wp[k]);
            memmove(wbuf + total, wp[k], c * sizeof(uint16_t));
            counts[k] = (uint32_t)c;
            total += c;
        }
    }
    Py_END_ALLOW_THREADS
    if (bad == -2) { PyErr_NoMemory(); goto done; }
    if (bad) { PyErr_SetString(PyExc_ValueError, "a token has frequency 0 in its context's table"); goto done; }
    res = Py_BuildValue("(y#y#y#)", (const char *)wbuf, (Py_ssize_t)(total * 2), (const char *)counts,
                        (Py_ssize_t)(L * 4), (const char *)raw, (Py_ssize_t)rawlen);
done:
    free(tok); free(ctx); free(raw); free(wbuf); free(cum); free(wp); free(counts);
    PyBuffer_Release(&t); PyBuffer_Release(&p); PyBuffer_Release(&fb);
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
    uint32_t *tab = NULL, *x = NULL, *off = NULL, *end = NULL;
    uint16_t *wpad = NULL;
    uint8_t *tok = NULL, *raw = NULL;
    const char *err = NULL;
    if (check_common(&o, &p, w, shift, ebits, lo, mshift, lanes, &n, &cp) != 0) goto done;
    cp.prev = prev ? 1 : 0;
    unsigned contexts = (NBUCKETS >> cp.mshift) * (cp.prev ? 2 : 1);
    if (check_freqs(&fb, contexts, ALPHABET(w), &validmask) != 0) goto done;
    size_t L = (size_t)lanes, steps = (n + L - 1) / L, nwords = (size_t)(wb.len / 2);
    if ((size_t)lc.len != 4 * L || wb.len % 2 || nwords >= ((size_t)1 << 30)) {
        PyErr_SetString(PyExc_ValueError, "lane table has the wrong size");
        goto done;
    }
    x = (uint32_t *)malloc(L * sizeof(uint32_t));
    off = (uint32_t *)malloc(L * sizeof(uint32_t));
    end = (uint32_t *)malloc(L * sizeof(uint32_t));
    /* any lane reads at most one word per step past its start: `steps` words of zero padding (+16
     * for the 4-byte gathers) keep every read inside this buffer */
    wpad = (uint16_t *)calloc(nwords + steps + 16, sizeof(uint16_t));
    tab = (uint32_t *)calloc((size_t)NCTX * PROB_SCALE, sizeof(uint32_t));
    tok = (uint8_t *)malloc(n + 16);
    raw = (uint8_t *)calloc((size_t)rb.len + 16, 1);
    if (!x || !off || !end || !wpad || !tab || !tok || !raw) { PyErr_NoMemory(); goto done; }
    {
        const uint32_t *cnt = (const uint32_t *)lc.buf;
        uint64_t total = 0;
        for (size_t k = 0; k < L; k++) {
            if (cnt[k] < 2 || total + cnt[k] > nwords) { PyErr_SetString(PyExc_ValueError, "lane sizes do not match the words"); goto done; }
            off[k] = (uint32_t)total;
            total += cnt[k];
            end[k] = (uint32_t)total;
        }
        if (total != nwords) { PyErr_SetString(PyExc_ValueError, "lane sizes do not match the words"); goto done; }
    }
    memcpy(wpad, wb.buf, (size_t)wb.len);
    memcpy(raw, rb.buf, (size_t)rb.len);
    {
        const uint16_t *f = (const uint16_t *)fb.buf;
        for (unsigned c = 0; c < NCTX; c++) {
            if (!(validmask >> c & 1)) continue;
            uint32_t slot = 0;
            for (unsigned k = 0; k < 256; k++)
                for (uint32_t j = 0; j < f[c * 256 + k]; j++, slot++)
                    tab[(size_t)c * PROB_SCALE + slot] = k | ((uint32_t)(f[c * 256 + k] - 1) << 8) | (j << 20);
        }
    }
    for (size_t k = 0; k < L; k++) {
        x[k] = ((uint32_t)wpad[off[k]] << 16) | wpad[off[k] + 1];
        off[k] += 2;
    }
    Py_BEGIN_ALLOW_THREADS
    size_t k1 = 0;
#ifdef HAVE_AVX2_KERNEL
    if (w <= 4 && L >= 8 && have_avx2() && !getenv("ORCA_DIFF_NO_SIMD")) {
        k1 = L & ~(size_t)7;
        size_t full = n / L * L;  /* steps with every lane: AVX2 for lanes [0, k1) */
        decode_avx2(tab, p.buf, w, full, L, k1, &cp, x, off, wpad, tok, &used);
        /* the rest: lanes [k1, L) of the full steps, then the last partial step */
        if (w == 2) {
            decode_scalar16(tab, p.buf, 0, full, L, k1, L, &cp, x, off, wpad, tok, &used);
            decode_scalar16(tab, p.buf, full, n, L, 0, L, &cp, x, off, wpad, tok, &used);
        } else {
            decode_scalar32(tab, p.buf, 0, full, L, k1, L, &cp, x, off, wpad, tok, &used);
            decode_scalar32(tab, p.buf, full, n, L, 0, L, &cp, x, off, wpad, tok, &used);
        }
    }
#endif
    if (!k1) {
        if (w == 2) decode_scalar16(tab, p.buf, 0, n, L, 0, L, &cp, x, off, wpad, tok, &used);
        else if (w == 4) decode_scalar32(tab, p.buf, 0, n, L, 0, L, &cp, x, off, wpad, tok, &used);
        else decode_scalar64(tab, p.buf, 0, n, L, 0, L, &cp, x, off, wpad, tok, &used);
    }
    if (used & ~validmask) err = "the token stream uses a context that has no table";
    for (size_t k = 0; k < L && !err; k++)
        if (x[k] != STATE_LOW || off[k] != end[k]) err = "an ANS lane does not end with its words";
    if (!err) {
        int r;
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
    free(x); free(off); free(end); free(wpad); free(tab); free(tok); free(raw);
    PyBuffer_Release(&o); PyBuffer_Release(&p); PyBuffer_Release(&fb);
    PyBuffer_Release(&lc); PyBuffer_Release(&wb); PyBuffer_Release(&rb);
    return res;
}

static PyMethodDef methods[] = {
    {"histogram", py_histogram, METH_VARARGS, "token counts per (bucket, previous-token-in-lane-was-0) context"},
    {"encode", py_encode, METH_VARARGS, "rANS-encode the lanes of one chunk -> (words, lane_words, raw)"},
    {"decode", py_decode, METH_VARARGS, "decode one chunk's lanes and raw bits into out (ulp inverse included)"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_entropy", "compiled kernels of orca_diff.entropy", -1,
                                    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__entropy(void) { return PyModule_Create(&module); }
