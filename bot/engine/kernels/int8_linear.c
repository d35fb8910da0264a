/* y = x W^T + b with int8 weights (one scale per output channel) and int8 activations (one scale per row).
 *
 * Built for AVX2 and loaded through ctypes by bot/engine/kernel.py. Every row is quantized from itself
 * alone and its int32 dot products are exact (the sum of int8 products does not depend on the order it
 * is taken in), so a row's output never depends on the other rows of the call: batched decoding gives
 * the same numbers as decoding alone, whatever the tiling picks for each row.
 *
 * Layout: weights are packed by `pack` in bot/engine/kernel.py in groups of 32 output channels, rows
 * padded with zeros to Kp (a multiple of 4) and N to a multiple of 32, each group stored as
 * [Kp / 4][32][4] bytes: four consecutive input bytes of each of the group's 32 channels, then the next
 * four. A tile broadcasts four bytes of a row of x against all 32 channels at once and accumulates one
 * int32 lane per channel, so nothing is summed across lanes at the end, and a group's weights are one
 * sequential stream, read once per tile of rows (up to 8 rows share each load of the weights).
 *
 * Products: AVX2 has no signed x signed byte multiply, so each pair of bytes is taken as
 * |x| (unsigned) times w with x's sign moved onto w (vpsignb), which vpmaddubsw sums in pairs without
 * saturating (2 * 127 * 127 < 32767), and vpmaddwd widens to int32. Both operands are in [-127, 127].
 * Where the CPU has AVX512-VNNI (kernel.py then builds with it), vpdpbusd multiplies unsigned by signed
 * bytes and sums four products into int32 in one instruction. x is then stored as the unsigned byte
 * x + 128 (x xor 0x80), and 128 * sum(w) of each output channel (`sums128`, computed once) is
 * subtracted: the same exact int32 sums, so the results are bitwise those of the AVX2 build. Where the
 * CPU also has AMX (kernel.py then builds with it too), calls of AMX_MIN_ROWS rows or more multiply in
 * tiles (below), from the same stored bytes and with the same correction and finish.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GROUP 32    /* output channels packed together (kernel.GROUP) */
#define K_STEP 4    /* input bytes of a channel stored together (kernel.K_STEP) */
#define ROW_BLOCK 64 /* rows of x that stay in the cache while a thread walks its column groups */
#ifndef PREFETCH
#if defined(__AVX512VNNI__)
#define PREFETCH 0 /* the hardware prefetcher keeps up alone (measured on a 2-core Zen 4 VM) */
#else
#define PREFETCH 1024 /* bytes ahead: measured best of 0, 512 and 1024 on a 2-core AVX2-only EPYC VM */
#endif
#endif
#if PREFETCH > 0
#define PREFETCH_WEIGHTS(w) _mm_prefetch((const char *)(w) + PREFETCH, _MM_HINT_T0), _mm_prefetch((const char *)(w) + PREFETCH + 64, _MM_HINT_T0)
#else
#define PREFETCH_WEIGHTS(w)
#endif

/* Four bytes of a quantized row, as one int32 to broadcast. */
static inline int32_t four_bytes(const uint8_t *x) {
    int32_t v;
    memcpy(&v, x, sizeof v);
    return v;
}

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KERNEL_ISA "AVX512-VNNI"
#define TILE_ROWS 8
#define X_OFFSET 0x80 /* x is stored as x + 128 */

/* out[i * n + c] for `rows` rows and the group's first `cols` channels from their exact sums, where
 * sums[2 * i + j] holds row i's sums of channels 16j to 16j + 15: the one way both the VNNI tiles and
 * the AMX blocks finish, so that their results are the same bits. */
static inline __attribute__((always_inline)) void finish(const __m512i *sums, int64_t rows, const int32_t *sums128,
                                                          const float *xs, const float *ws, const float *bias,
                                                          int64_t cols, int64_t n, float *out) {
    for (int j = 0; j < 2; j++) {
        const int64_t left = cols - 16 * j;
        if (left <= 0) break;
        const __mmask16 mask = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        const __m512i correction = _mm512_loadu_si512((const void *)(sums128 + 16 * j));
        const __m512 col = _mm512_maskz_loadu_ps(mask, ws + 16 * j);
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + 16 * j) : _mm512_setzero_ps();
        for (int64_t i = 0; i < rows; i++) {
            const __m512i sum = _mm512_loadu_si512((const void *)(sums + 2 * i + j));
            __m512 y = _mm512_cvtepi32_ps(_mm512_sub_epi32(sum, correction));
            y = _mm512_mul_ps(_mm512_mul_ps(y, _mm512_set1_ps(xs[i])), col);
            if (bias) y = _mm512_add_ps(y, b);
            _mm512_mask_storeu_ps(out + i * n + 16 * j, mask, y);
        }
    }
}

/* The exact sums of `rows` (1 to 8; a constant where inlined) rows of x with one group's 32 channels,
 * finished into out[r * n + c] for the group's first `cols` channels. */
static inline __attribute__((always_inline)) void tile(const uint8_t *x, const int rows, const int8_t *w,
                                                        int64_t kp, const int32_t *sums128, const float *xs,
                                                        const float *ws, const float *bias, int64_t cols,
                                                        int64_t n, float *out) {
    __m512i s[TILE_ROWS][2];
    for (int i = 0; i < rows; i++) s[i][0] = s[i][1] = _mm512_setzero_si512();
    for (int64_t k = 0; k < kp; k += K_STEP, w += GROUP * K_STEP) {
        const __m512i w0 = _mm512_loadu_si512((const void *)w), w1 = _mm512_loadu_si512((const void *)(w + 64));
        for (int i = 0; i < rows; i++) {
            const __m512i xb = _mm512_set1_epi32(four_bytes(x + i * kp + k));
            s[i][0] = _mm512_dpbusd_epi32(s[i][0], xb, w0);
            s[i][1] = _mm512_dpbusd_epi32(s[i][1], xb, w1);
        }
    }
    finish(&s[0][0], rows, sums128, xs, ws, bias, cols, n, out);
}
#else
#define KERNEL_ISA "AVX2"
#define TILE_ROWS 2
#define X_OFFSET 0

static inline __m256i dot_pair(__m256i x, __m256i ax, __m256i w, __m256i ones) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(w, x)), ones);
}

static inline __m256i tail_mask(int64_t left) {
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(left > 8 ? 8 : left)), lanes);
}

/* As the VNNI tile above, for 1 or 2 rows: four 8-channel vectors per step. */
static inline __attribute__((always_inline)) void tile(const uint8_t *x, const int rows, const int8_t *w,
                                                        int64_t kp, const int32_t *sums128, const float *xs,
                                                        const float *ws, const float *bias, int64_t cols,
                                                        int64_t n, float *out) {
    (void)sums128;
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s[TILE_ROWS][4];
    for (int i = 0; i < rows; i++)
        for (int j = 0; j < 4; j++) s[i][j] = _mm256_setzero_si256();
    for (int64_t k = 0; k < kp; k += K_STEP, w += GROUP * K_STEP) {
        PREFETCH_WEIGHTS(w);
        __m256i xb[TILE_ROWS], ax[TILE_ROWS];
        for (int i = 0; i < rows; i++) {
            xb[i] = _mm256_set1_epi32(four_bytes(x + i * kp + k));
            ax[i] = _mm256_abs_epi8(xb[i]);
        }
        for (int j = 0; j < 4; j++) {
            const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + 32 * j));
            for (int i = 0; i < rows; i++) s[i][j] = _mm256_add_epi32(s[i][j], dot_pair(xb[i], ax[i], wv, ones));
        }
    }
    for (int j = 0; j < 4; j++) {
        const int64_t left = cols - 8 * j;
        if (left <= 0) break;
        const __m256i mask = tail_mask(left);
        const __m256 col = _mm256_maskload_ps(ws + 8 * j, mask);
        const __m256 b = bias ? _mm256_maskload_ps(bias + 8 * j, mask) : _mm256_setzero_ps();
        for (int i = 0; i < rows; i++) {
            __m256 y = _mm256_cvtepi32_ps(s[i][j]);
            y = _mm256_mul_ps(_mm256_mul_ps(y, _mm256_set1_ps(xs[i])), col);
            if (bias) y = _mm256_add_ps(y, b);
            _mm256_maskstore_ps(out + i * n + 8 * j, mask, y);
        }
    }
}
#endif

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__)
/* AMX (Sapphire Rapids and later): tile multiplies of 16 rows x 64 bytes of x by 64 bytes x 16 channels.
 * The packed layout is already the one a tile of weights wants (four bytes of each of 16 channels, one
 * tile row per four input bytes, 128 bytes between tile rows), and tdpbusd takes unsigned x + 128 by
 * signed weights as vpdpbusd does, so the sums, the correction and the finish are the VNNI build's and
 * so are the results, bit for bit. Linux hands out the tile registers only on request (arch_prctl). */
#include <sys/syscall.h>
#include <unistd.h>
#define KERNEL_AMX 1
#define AMX_ROWS 32     /* rows of one block: two 16-row tiles of x */
#define AMX_K 64        /* bytes of K one tile multiply takes; Kp must be a multiple of it */
/* Measured on a 2-core Sapphire Rapids VM, the chat model's 24 decoder layers with weights streamed from
 * memory: AMX took 29.6-30.5 ms for 1 to 8 rows where the VNNI tiles took 24.8 ms for 1 row, 30.9 ms
 * for 4 and 35.5 ms for 8; for 16 rows 32.9 ms against 37.3 ms, and 2-3x less with weights in cache. */
#ifndef AMX_MIN_ROWS
#define AMX_MIN_ROWS 4 /* fewer rows go through the VNNI tiles */
#endif
#ifndef AMX_PREFETCH
#define AMX_PREFETCH 4096 /* bytes of weights ahead (two k steps); without it 1-16 rows took 1-3 ms more */
#endif
#ifndef AMX_ROW_BLOCK
#define AMX_ROW_BLOCK 256
#endif
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_granted = 0;

typedef struct {
    uint8_t palette;
    uint8_t start_row;
    uint8_t reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

/* Asks Linux for the tile registers (once per process); returns 1 if AMX is used from now on. */
int int8_amx_enable(void) {
    if (!amx_granted) amx_granted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_granted;
}

/* Every tile 16 rows of 64 bytes: 0-3 the sums of 2 x 2 (rows, channels) blocks, 4-5 x, 6-7 weights. */
static void amx_configure(void) {
    tile_config config;
    memset(&config, 0, sizeof config);
    config.palette = 1;
    for (int t = 0; t < 8; t++) config.rows[t] = 16, config.colsb[t] = 64;
    _tile_loadconfig(&config);
}

/* The exact sums of 32 rows of x (stride kp) with one group's 32 channels, into acc [32][32]. */
static inline void amx_block(const uint8_t *x, int64_t kp, const int8_t *w, int32_t *acc) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < kp; k += AMX_K) {
#if AMX_PREFETCH > 0
        for (int p = 0; p < AMX_K * GROUP; p += 64) _mm_prefetch((const char *)w + (k * GROUP + AMX_PREFETCH + p), _MM_HINT_T0);
#endif
        _tile_loadd(4, x + k, kp);
        _tile_loadd(5, x + 16 * kp + k, kp);
        _tile_loadd(6, w + k * GROUP, GROUP * K_STEP);
        _tile_loadd(7, w + k * GROUP + 64, GROUP * K_STEP);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, acc, GROUP * 4);
    _tile_stored(1, acc + 16, GROUP * 4);
    _tile_stored(2, acc + 16 * GROUP, GROUP * 4);
    _tile_stored(3, acc + 16 * GROUP + 16, GROUP * 4);
}

#else
#define KERNEL_AMX 0
static const int amx_granted = 0;
int int8_amx_enable(void) { return 0; }
#endif

/* `rows` rows from x (at most TILE_ROWS), with the row count a constant in each inlined copy. */
static void tile_rows(const uint8_t *x, int64_t rows, const int8_t *w, int64_t kp, const int32_t *sums128,
                      const float *xs, const float *ws, const float *bias, int64_t cols, int64_t n, float *out) {
#define TILE_CASE(r) case r: tile(x, r, w, kp, sums128, xs, ws, bias, cols, n, out); break;
    switch (rows) {
#if TILE_ROWS == 8
    TILE_CASE(8) TILE_CASE(7) TILE_CASE(6) TILE_CASE(5) TILE_CASE(4) TILE_CASE(3)
#endif
    TILE_CASE(2)
    default: tile(x, 1, w, kp, sums128, xs, ws, bias, cols, n, out);
    }
#undef TILE_CASE
}

/* out[r] = 128 * the sum of row r of int8 rows [n][k] (the VNNI build's correction; `kernel.sums128`). */
void int8_row_sums128(const int8_t *rows, int64_t n, int64_t k, int32_t *out) {
    for (int64_t r = 0; r < n; r++) {
        int32_t sum = 0;
        for (int64_t i = 0; i < k; i++) sum += rows[r * k + i];
        out[r] = 128 * sum;
    }
}

/* Which instructions this build multiplies with (kernel.py reports it). */
const char *int8_kernel_isa(void) { return KERNEL_AMX && amx_granted ? KERNEL_ISA " + AMX" : KERNEL_ISA; }

/* Row m of x [M, K] fp32 to int8 [Kp] (zero padded; stored plus X_OFFSET); returns its scale (0 for an
 * all-zero row, NaN for a row with an inf or NaN, whose outputs are then NaN as fp32 arithmetic gives).
 * Eight at a time: the largest magnitude is exact in any order, and vcvtps2dq rounds half to even as
 * lrintf does, so the bytes are those of the scalar loop. */
static float quantize_row(const float *x, int64_t k, int64_t kp, uint8_t *q) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 top = _mm256_setzero_ps(), odd = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= k; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        top = _mm256_max_ps(top, _mm256_andnot_ps(sign, v));
        odd = _mm256_or_ps(odd, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, top);
    float amax = 0.0f;
    int bad = _mm256_movemask_ps(odd) != 0;
    for (int j = 0; j < 8; j++) amax = fmaxf(amax, lanes[j]);
    for (int64_t t = i; t < k; t++) amax = fmaxf(amax, fabsf(x[t])), bad |= isnan(x[t]);
    if (k <= 0) return 0.0f;
    memset(q + k, X_OFFSET, (size_t)(kp - k));
    if (bad || !(amax > 0.0f) || !isfinite(amax)) {
        memset(q, X_OFFSET, (size_t)k);
        return bad || amax > 0.0f ? NAN : 0.0f;
    }
    const float inv = 127.0f / amax;
    const __m256 scale = _mm256_set1_ps(inv);
    const __m128i offset = _mm_set1_epi8((char)X_OFFSET);
    for (i = 0; i + 8 <= k; i += 8) {
        const __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + i), scale));
        const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
        _mm_storel_epi64((__m128i *)(q + i), _mm_xor_si128(_mm_packs_epi16(w, w), offset));
    }
    for (; i < k; i++) q[i] = (uint8_t)((int8_t)lrintf(x[i] * inv)) ^ X_OFFSET;
    return amax / 127.0f;
}

/* out [M, N] = x [M, K] W^T + bias, W packed int8 with scales ws [N]; bias may be NULL. sums128 [Np] is
 * 128 times each weight row's sum (`kernel.sums128`; read by the VNNI build only).
 * Returns 0, or -1 if the scratch memory could not be had. */
int int8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const int32_t *sums128, const float *ws,
                const float *bias, int64_t n, int64_t kp, float *out, int threads) {
#if KERNEL_AMX
    const int amx = amx_granted && m >= AMX_MIN_ROWS && kp % AMX_K == 0;
    /* AMX reads whole 32-row blocks: the rows past m are padding whose sums are never used */
    const int64_t rows_held = amx ? (m + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS : m;
#else
    const int64_t rows_held = m;
#endif
    uint8_t *xq = malloc((size_t)(rows_held * kp) + 64);
    float *xs = malloc(sizeof(float) * (size_t)m);
    if (!xq || !xs) {
        free(xq);
        free(xs);
        return -1;
    }
    const int64_t groups = (n + GROUP - 1) / GROUP;
    if (threads < 1) threads = 1;
#if KERNEL_AMX
    if (amx) memset(xq + m * kp, X_OFFSET, (size_t)((rows_held - m) * kp));
    const int64_t row_block = amx ? AMX_ROW_BLOCK : ROW_BLOCK, step = amx ? AMX_ROWS : TILE_ROWS;
#else
    const int64_t row_block = ROW_BLOCK, step = TILE_ROWS;
#endif
    #pragma omp parallel num_threads(threads)
    {
#if KERNEL_AMX
        int32_t acc[AMX_ROWS * GROUP] __attribute__((aligned(64)));
        if (amx) amx_configure();
#endif
        #pragma omp for schedule(static)
        for (int64_t r = 0; r < m; r++) xs[r] = quantize_row(x + r * k, k, kp, xq + r * kp);
        for (int64_t m0 = 0; m0 < m; m0 += row_block) {
            const int64_t m1 = m - m0 < row_block ? m : m0 + row_block;
            /* nowait: every row block splits the same column groups the same way (static), so a thread
             * only ever writes its own columns and needs no barrier between blocks */
            #pragma omp for schedule(static) nowait
            for (int64_t g = 0; g < groups; g++) {
                const int64_t c = g * GROUP, cols = n - c < GROUP ? n - c : GROUP;
                for (int64_t r = m0; r < m1; r += step) {
                    const int64_t rows = m1 - r < step ? m1 - r : step;
#if KERNEL_AMX
                    if (amx) {
                        amx_block(xq + r * kp, kp, w + g * GROUP * kp, acc);
                        finish((const __m512i *)acc, rows, sums128 + c, xs + r, ws + c, bias ? bias + c : NULL,
                               cols, n, out + r * n + c);
                        continue;
                    }
#endif
                    tile_rows(xq + r * kp, rows, w + g * GROUP * kp, kp, sums128 + c, xs + r, ws + c,
                              bias ? bias + c : NULL, cols, n, out + r * n + c);
                }
            }
        }
#if KERNEL_AMX
        if (amx) _tile_release();
#endif
    }
    free(xq);
    free(xs);
    return 0;
}
