/* y = x W^T + b with int8 weights (one scale per output channel) and int8 activations (one scale per row).
 *
 * Built for AVX2 and loaded through ctypes by bot/engine/kernel.py. Every row is quantized from itself
 * alone and its int32 dot products are exact (the sum of int8 products does not depend on the order it
 * is taken in), so a row's output never depends on the other rows of the call: batched decoding gives
 * the same numbers as decoding alone, whatever the tiling picks for each row.
 *
 * Products: AVX2 has no signed x signed byte multiply, so each pair of bytes is taken as
 * |x| (unsigned) times w with x's sign moved onto w (vpsignb), which vpmaddubsw sums in pairs without
 * saturating (2 * 127 * 127 < 32767), and vpmaddwd widens to int32. Both operands are in [-127, 127].
 * Where the CPU has AVX512-VNNI (kernel.py then builds with it), vpdpbusd multiplies unsigned by signed
 * bytes and sums four products into int32 in one instruction. x is then taken as the unsigned byte
 * x + 128 (x xor 0x80), and 128 * sum(w) of each output channel (`sums128`, computed once) is
 * subtracted: the same exact int32 sums, so the results are bitwise those of the AVX2 build, with a
 * third of the instructions per product and tiles of 4 x 4 (AVX512VL has 32 vector registers).
 * Weights are packed by `pack` in bot/engine/kernel.py: rows padded with zeros to Kp (a multiple of
 * 32) and N to a multiple of 4, then each group of 4 rows stored as [Kp / 32][4][32] bytes, so that a tile
 * reads its weights as one sequential stream.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TILE_COLS 4
#define ROW_BLOCK 32
#ifndef PREFETCH
#if defined(__AVX512VNNI__)
/* none: on a 2-core Zen 4 VM one row through 358 MB of weights took 11.5 ms without and 13.8 ms with
 * 1 KB (2 KB and 256 bytes no better); the hardware prefetcher does it alone */
#define PREFETCH 0
#else
#define PREFETCH 1024 /* bytes ahead: measured best of 0, 512 and 1024 on a 2-core AVX2-only EPYC VM */
#endif
#endif
#if PREFETCH > 0
#define PREFETCH_WEIGHTS(w) _mm_prefetch((const char *)(w) + PREFETCH, _MM_HINT_T0), _mm_prefetch((const char *)(w) + PREFETCH + 64, _MM_HINT_T0)
#else
#define PREFETCH_WEIGHTS(w)
#endif

static inline __m256i dot_pair(__m256i x, __m256i ax, __m256i w, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)), ones);
}

static inline int32_t hsum(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* The one way an output element is made from its exact sum, wherever it was computed. */
static inline float finish(int32_t acc, float row_scale, float col_scale, const float *bias, int64_t n) {
    float y = ((float)acc * row_scale) * col_scale;
    return bias ? y + bias[n] : y;
}

/* The exact dot products of one or two rows of x with TILE_COLS (4) weight rows; acc[r * 4 + c]. */
static inline void tile_1x4(const int8_t *x, const int8_t *w, int64_t kp, int32_t *acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
    for (int64_t k = 0; k < kp; k += 32, w += 128) {
        PREFETCH_WEIGHTS(w);
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k)), ax = _mm256_abs_epi8(xv);
        s0 = _mm256_add_epi32(s0, dot_pair(xv, ax, _mm256_loadu_si256((const __m256i *)w), ones));
        s1 = _mm256_add_epi32(s1, dot_pair(xv, ax, _mm256_loadu_si256((const __m256i *)(w + 32)), ones));
        s2 = _mm256_add_epi32(s2, dot_pair(xv, ax, _mm256_loadu_si256((const __m256i *)(w + 64)), ones));
        s3 = _mm256_add_epi32(s3, dot_pair(xv, ax, _mm256_loadu_si256((const __m256i *)(w + 96)), ones));
    }
    acc[0] = hsum(s0), acc[1] = hsum(s1), acc[2] = hsum(s2), acc[3] = hsum(s3);
}

static inline void tile_2x4(const int8_t *x, const int8_t *w, int64_t kp, int32_t *acc) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    const int8_t *y = x + kp;
    for (int64_t k = 0; k < kp; k += 32, w += 128) {
        PREFETCH_WEIGHTS(w);
        const __m256i xv = _mm256_loadu_si256((const __m256i *)(x + k)), ax = _mm256_abs_epi8(xv);
        const __m256i yv = _mm256_loadu_si256((const __m256i *)(y + k)), ay = _mm256_abs_epi8(yv);
        __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 0));
        a0 = _mm256_add_epi32(a0, dot_pair(xv, ax, wv, ones)), b0 = _mm256_add_epi32(b0, dot_pair(yv, ay, wv, ones));
        wv = _mm256_loadu_si256((const __m256i *)(w + 32));
        a1 = _mm256_add_epi32(a1, dot_pair(xv, ax, wv, ones)), b1 = _mm256_add_epi32(b1, dot_pair(yv, ay, wv, ones));
        wv = _mm256_loadu_si256((const __m256i *)(w + 64));
        a2 = _mm256_add_epi32(a2, dot_pair(xv, ax, wv, ones)), b2 = _mm256_add_epi32(b2, dot_pair(yv, ay, wv, ones));
        wv = _mm256_loadu_si256((const __m256i *)(w + 96));
        a3 = _mm256_add_epi32(a3, dot_pair(xv, ax, wv, ones)), b3 = _mm256_add_epi32(b3, dot_pair(yv, ay, wv, ones));
    }
    acc[0] = hsum(a0), acc[1] = hsum(a1), acc[2] = hsum(a2), acc[3] = hsum(a3);
    acc[4] = hsum(b0), acc[5] = hsum(b1), acc[6] = hsum(b2), acc[7] = hsum(b3);
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KERNEL_ISA "AVX512-VNNI"
#define TILE_ROWS 4

/* The exact dot products of `rows` (1 to 4, a constant where inlined) rows of x with 4 weight rows. */
static inline __attribute__((always_inline)) void tile_vnni(const int8_t *x, const int rows, const int8_t *w,
                                                             int64_t kp, const int32_t *sums128, int32_t *acc) {
    const __m256i flip = _mm256_set1_epi8((char)0x80);
    __m256i s[TILE_ROWS][TILE_COLS];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < TILE_COLS; j++) s[i][j] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kp; k += 32, w += 128) {
        PREFETCH_WEIGHTS(w);
        __m256i xu[TILE_ROWS];
        for (int i = 0; i < rows; i++)
            xu[i] = _mm256_xor_si256(_mm256_loadu_si256((const __m256i *)(x + i * kp + k)), flip);
        for (int j = 0; j < TILE_COLS; j++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * j));
            for (int i = 0; i < rows; i++) s[i][j] = _mm256_dpbusd_epi32(s[i][j], xu[i], wv);
        }
    }
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < TILE_COLS; j++) acc[i * TILE_COLS + j] = hsum(s[i][j]) - sums128[j];
}

static inline void tile(const int8_t *x, int64_t rows, const int8_t *w, int64_t kp, const int32_t *sums128,
                        int32_t *acc) {
    switch (rows) {
    case 4: tile_vnni(x, 4, w, kp, sums128, acc); break;
    case 3: tile_vnni(x, 3, w, kp, sums128, acc); break;
    case 2: tile_vnni(x, 2, w, kp, sums128, acc); break;
    default: tile_vnni(x, 1, w, kp, sums128, acc);
    }
}
#else
#define KERNEL_ISA "AVX2"
#define TILE_ROWS 2

static inline void tile(const int8_t *x, int64_t rows, const int8_t *w, int64_t kp, const int32_t *sums128,
                        int32_t *acc) {
    (void)sums128;
    if (rows == 2) tile_2x4(x, w, kp, acc);
    else tile_1x4(x, w, kp, acc);
}
#endif

/* out[r] = 128 * the sum of row r of int8 rows [n][k] (the VNNI build's correction; `kernel.sums128`). */
void int8_row_sums128(const int8_t *rows, int64_t n, int64_t k, int32_t *out) {
    for (int64_t r = 0; r < n; r++) {
        int32_t sum = 0;
        for (int64_t i = 0; i < k; i++) sum += rows[r * k + i];
        out[r] = 128 * sum;
    }
}

/* Which instructions this build multiplies with (kernel.py reports it). */
const char *int8_kernel_isa(void) { return KERNEL_ISA; }

/* Row m of x [M, K] fp32 to int8 [Kp] (zero padded); returns its scale (0 for an all-zero row). */
static float quantize_row(const float *x, int64_t k, int64_t kp, int8_t *q) {
    float amax = 0.0f;
    for (int64_t i = 0; i < k; i++) amax = fmaxf(amax, fabsf(x[i]));
    if (k <= 0) return 0.0f;
    memset(q + k, 0, (size_t)(kp - k));
    if (!(amax > 0.0f) || !isfinite(amax)) {
        memset(q, 0, (size_t)k);
        return amax > 0.0f ? NAN : 0.0f; /* inf/nan in: nan out, as fp32 arithmetic would give */
    }
    const float inv = 127.0f / amax;
    for (int64_t i = 0; i < k; i++) q[i] = (int8_t)lrintf(x[i] * inv);
    return amax / 127.0f;
}

/* Rows [m0, m1) times the 4-column group `group` of the packed weights: out[r, 4 * group + j], j < n. */
static void column_group(const int8_t *xq, const float *xs, int64_t m0, int64_t m1, const int8_t *w,
                         const int32_t *sums128, const float *ws, const float *bias, int64_t group, int64_t kp,
                         int64_t n, float *out) {
    int32_t acc[TILE_ROWS * TILE_COLS];
    const int8_t *wg = w + group * TILE_COLS * kp;
    const int64_t c = group * TILE_COLS, cols = n - c < TILE_COLS ? n - c : TILE_COLS;
    for (int64_t r = m0; r < m1; r += TILE_ROWS) {
        const int64_t rows = m1 - r < TILE_ROWS ? m1 - r : TILE_ROWS;
        tile(xq + r * kp, rows, wg, kp, sums128 + c, acc);
        for (int64_t i = 0; i < rows; i++)
            for (int64_t j = 0; j < cols; j++)
                out[(r + i) * n + c + j] = finish(acc[i * TILE_COLS + j], xs[r + i], ws[c + j], bias, c + j);
    }
}

/* out [M, N] = x [M, K] W^T + bias, W packed int8 with scales ws [N]; bias may be NULL. sums128 [Np] is
 * 128 times each weight row's sum (`kernel.sums128`; read by the VNNI build only).
 * Returns 0, or -1 if the scratch memory could not be had. */
int int8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const int32_t *sums128, const float *ws,
                const float *bias, int64_t n, int64_t kp, float *out, int threads) {
    int8_t *xq = malloc((size_t)(m * kp) + 32);
    float *xs = malloc(sizeof(float) * (size_t)m);
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    const int64_t col_blocks = (n + TILE_COLS - 1) / TILE_COLS;
    if (threads < 1) threads = 1;
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++) xs[r] = quantize_row(x + r * k, k, kp, xq + r * kp);
        for (int64_t m0 = 0; m0 < m; m0 += ROW_BLOCK) {
            const int64_t m1 = m - m0 < ROW_BLOCK ? m : m0 + ROW_BLOCK;
            /* nowait: every row block splits the same column groups the same way (static), so a thread
             * only ever writes its own columns and needs no barrier between blocks */
            #pragma omp for schedule(static) nowait
            for (int64_t b = 0; b < col_blocks; b++) {
                column_group(xq, xs, m0, m1, w, sums128, ws, bias, b, kp, n, out);
            }
        }
    }
    free(xq);
    free(xs);
    return 0;
}
