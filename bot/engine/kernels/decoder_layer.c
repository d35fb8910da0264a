/* Every decoder layer of a Llama/Qwen model for M rows in one call: RMSNorm, the int8 q/k/v projection,
 * per-head norms (Qwen3), rotary embedding, the key/value slab write, attention, the output projection and
 * the gated MLP, with the residual adds. Built into the same library as int8_linear.c and called through
 * ctypes by bot/engine/native.py.
 *
 * Why: a decoding step of one conversation in PyTorch is about 1,500 small operator calls (about 60 a
 * layer), which cost as much as reading the weights. Here a step is one call per token batch.
 *
 * Rows: each row is one token, with the slab row it belongs to and its position. A decoding step has one
 * row per conversation; a prompt read in has one row per token, all in one slab row at consecutive
 * positions, and both kinds can share a call. Within a layer every row's key and value are written
 * before any row attends, so a token attends over its own prompt's earlier tokens of the same call.
 *
 * Invariance: every step of a row reads that row's data alone (its hidden state, its slab row up to its
 * position) in an order fixed by its position, and the int8 products are exact. So a row's result does
 * not depend on which other rows share the call: batched decoding equals decoding alone, and a prompt
 * read in chunks of any size gives bitwise the keys and values of the prompt read at once.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int int8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const int32_t *sums128, const float *ws,
                const float *bias, int64_t n, int64_t kp, float *out, int threads);

typedef struct {
    const int8_t *packed;   /* kernel.pack layout */
    const int32_t *sums128; /* [n rounded up to 32]: 128 * each row's sum (kernel.sums128) */
    const float *scales;    /* [n] */
    const float *bias;      /* [n] or NULL */
    int64_t n, k, kp;
} Int8Matrix;

typedef struct {
    const float *input_norm, *post_norm; /* RMSNorm weights [hidden] */
    const float *q_norm, *k_norm;        /* per-head RMSNorm weights [head_dim] (Qwen3), or NULL */
    Int8Matrix qkv, o, gate_up, down;    /* q/k/v fused, gate/up fused */
    void *keys, *values;                 /* slabs [blocks][kv_heads][max_length][head_dim], fp32 or bf16 */
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, max_length;
    float eps, scaling;
    int32_t bf16_cache, threads;
} Shape;

#define KEY_BLOCK 64 /* positions attended per pass: a block of keys or values stays in L1 for every query head */
#define RUN_ROWS 16  /* prompt tokens attended together: their key blocks are read (and converted) once */

static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* e^x for 8 floats (Cephes' polynomial, relative error about 2e-7); e^-inf = 0. */
static inline __m256 exp_ps(__m256 x) {
    const __m256 hi = _mm256_set1_ps(88.3762626647949f), lo = _mm256_set1_ps(-87.3365447504019f);
    x = _mm256_max_ps(_mm256_min_ps(x, hi), lo);
    __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(0.693359375f)));
    x = _mm256_sub_ps(x, _mm256_mul_ps(fx, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

static inline float exp_one(float x) {
    float in[8] = {x}, out[8];
    _mm256_storeu_ps(out, exp_ps(_mm256_loadu_ps(in)));
    return out[0];
}

static inline uint16_t to_bf16(float f) { /* round to nearest even, as torch's .to(torch.bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* a NaN stays a NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m256 load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* out = x / sqrt(mean(x^2) + eps) * w, over n values (n a multiple of 8). */
static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        acc = _mm256_fmadd_ps(v, v, acc);
    }
    const __m256 r = _mm256_set1_ps(1.0f / sqrtf(hsum_ps(acc) / (float)n + eps));
    for (int64_t i = 0; i < n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), r)));
}

/* Rotary embedding of one head in place: x * cos + rotate_half(x) * sin. */
static void rotate(float *x, const float *cos, const float *sin, int64_t d) {
    const int64_t half = d / 2;
    float t[512];
    memcpy(t, x, sizeof(float) * (size_t)d);
    for (int64_t i = 0; i < half; i++) x[i] = t[i] * cos[i] + -t[i + half] * sin[i];
    for (int64_t i = half; i < d; i++) x[i] = t[i] * cos[i] + t[i - half] * sin[i];
}

/* A block of `count` slab positions as fp32: the slab itself, or converted into `scratch` from bf16. */
static const float *slab_block(const void *slab, int bf16, int64_t offset, int64_t count, int64_t d, float *scratch) {
    if (!bf16) return (const float *)slab + offset;
    const uint16_t *src = (const uint16_t *)slab + offset;
    for (int64_t i = 0; i < count * d; i += 8) _mm256_storeu_ps(scratch + i, load_bf16(src + i));
    return scratch;
}

/* scores[t] = q . k[t] for n keys of d values: four keys at a time, so four sums run side by side
 * instead of one chain of dependent multiply-adds. A key's sum is taken the same way wherever it falls. */
static inline void dot_keys(const float *q, const float *k, int64_t n, int64_t d, float *scores) {
    int64_t t = 0;
    for (; t + 4 <= n; t += 4) {
        const float *k0 = k + t * d, *k1 = k0 + d, *k2 = k1 + d, *k3 = k2 + d;
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int64_t j = 0; j < d; j += 8) {
            const __m256 qv = _mm256_loadu_ps(q + j);
            a0 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k0 + j), a0);
            a1 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k1 + j), a1);
            a2 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k2 + j), a2);
            a3 = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k3 + j), a3);
        }
        scores[t] = hsum_ps(a0), scores[t + 1] = hsum_ps(a1), scores[t + 2] = hsum_ps(a2), scores[t + 3] = hsum_ps(a3);
    }
    for (; t < n; t++) {
        __m256 a0 = _mm256_setzero_ps();
        for (int64_t j = 0; j < d; j += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(k + t * d + j), a0);
        scores[t] = hsum_ps(a0);
    }
}

/* out[:d] += sum over t < n of p[t] * v[t]: up to 64 values of out held in registers across the keys
 * (eight independent sums), a wider head in slices of 64. */
static inline void add_weighted(const float *p, const float *v, int64_t n, int64_t d, float *out) {
    for (int64_t j0 = 0; j0 < d; j0 += 64) {
        const int64_t lanes = (d - j0 < 64 ? d - j0 : 64) / 8;
        __m256 acc[8];
        for (int64_t c = 0; c < 8; c++) acc[c] = c < lanes ? _mm256_loadu_ps(out + j0 + 8 * c) : _mm256_setzero_ps();
        if (lanes == 8) {
            for (int64_t t = 0; t < n; t++) {
                const __m256 w = _mm256_set1_ps(p[t]);
                const float *vt = v + t * d + j0;
                for (int64_t c = 0; c < 8; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * c), acc[c]);
            }
        } else {
            for (int64_t t = 0; t < n; t++) {
                const __m256 w = _mm256_set1_ps(p[t]);
                const float *vt = v + t * d + j0;
                for (int64_t c = 0; c < lanes; c++) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(vt + 8 * c), acc[c]);
            }
        }
        for (int64_t c = 0; c < lanes; c++) _mm256_storeu_ps(out + j0 + 8 * c, acc[c]);
    }
}

/* Softmax attention of `count` rows of one slab row (a prompt's tokens; a decoding row is a run of
 * one), each over its own first `lengths[i]` positions, for the `groups` query heads of one key/value
 * head. Row i's queries are q + i * q_stride ([groups][d], already scaled), its output out + i * out_stride.
 * A block of keys or values is converted from bf16 once for all the rows; each row's arithmetic is
 * the same whatever rows share the run. scores: scratch of sum(lengths) * groups; block: KEY_BLOCK * d. */
static void attend_run(const float *q, int64_t q_stride, const int64_t *lengths, int64_t count, const void *keys,
                       const void *values, int bf16, int64_t base, int64_t groups, int64_t d, float *scores,
                       float *block, float *out, int64_t out_stride) {
    int64_t longest = 0;
    for (int64_t i = 0; i < count; i++) longest = lengths[i] > longest ? lengths[i] : longest;
    for (int64_t t0 = 0; t0 < longest; t0 += KEY_BLOCK) {
        const int64_t size = longest - t0 < KEY_BLOCK ? longest - t0 : KEY_BLOCK;
        const float *k = slab_block(keys, bf16, base + t0 * d, size, d, block);
        float *row_scores = scores;
        for (int64_t i = 0; i < count; row_scores += groups * lengths[i], i++) {
            const int64_t n = lengths[i] - t0 < size ? lengths[i] - t0 : size;
            for (int64_t g = 0; g < groups; g++) dot_keys(q + i * q_stride + g * d, k, n, d, row_scores + g * lengths[i] + t0);
        }
    }
    float *row_scores = scores;
    for (int64_t i = 0; i < count; row_scores += groups * lengths[i], i++) {
        const int64_t length = lengths[i];
        for (int64_t g = 0; g < groups; g++) {
            float *sc = row_scores + g * length, top = -INFINITY, total;
            for (int64_t t = 0; t < length; t++) top = fmaxf(top, sc[t]);
            int64_t t = 0;
            __m256 sum = _mm256_setzero_ps();
            for (; t + 8 <= length; t += 8) {
                const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(sc + t), _mm256_set1_ps(top)));
                _mm256_storeu_ps(sc + t, e);
                sum = _mm256_add_ps(sum, e);
            }
            total = hsum_ps(sum);
            for (; t < length; t++) total += (sc[t] = exp_one(sc[t] - top));
            const float inv = 1.0f / total;
            for (t = 0; t < length; t++) sc[t] *= inv;
            memset(out + i * out_stride + g * d, 0, sizeof(float) * (size_t)d);
        }
    }
    for (int64_t t0 = 0; t0 < longest; t0 += KEY_BLOCK) {
        const int64_t size = longest - t0 < KEY_BLOCK ? longest - t0 : KEY_BLOCK;
        const float *v = slab_block(values, bf16, base + t0 * d, size, d, block);
        float *row_scores = scores;
        for (int64_t i = 0; i < count; row_scores += groups * lengths[i], i++) {
            const int64_t n = lengths[i] - t0 < size ? lengths[i] - t0 : size;
            for (int64_t g = 0; g < groups; g++)
                add_weighted(row_scores + g * lengths[i] + t0, v, n, d, out + i * out_stride + g * d);
        }
    }
}

static int linear(const Int8Matrix *w, const float *x, int64_t m, float *out, int threads) {
    return int8_linear(x, m, w->k, w->packed, w->sums128, w->scales, w->bias, w->n, w->kp, out, threads);
}

static void add_into(float *x, const float *y, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

/* hidden [m][hidden] goes through every layer in place. rows[r] is row r's slab row, positions[r] its
 * position; cos/sin [m][head_dim] its rotary factors. Returns 0, or -1 if scratch memory ran out. */
int decoder_layers(const Shape *s, const Layer *layers, int64_t layer_count, float *hidden, int64_t m,
                   const int64_t *rows, const int64_t *positions, const float *cos, const float *sin) {
    const int64_t h = s->hidden, d = s->head_dim, groups = s->heads / s->kv_heads;
    const int64_t q_size = s->heads * d, kv_size = s->kv_heads * d, qkv_size = q_size + 2 * kv_size;
    const int64_t inter = s->intermediate;
    const int threads = s->threads < 1 ? 1 : s->threads;
    /* runs of rows in one slab row at consecutive positions (a prompt's chunk), at most RUN_ROWS long */
    int64_t *run_start = malloc(sizeof(int64_t) * (size_t)(m + 1)), *lengths = malloc(sizeof(int64_t) * (size_t)m);
    int64_t runs = 0, run_scores = 1;
    for (int64_t r = 0; run_start && lengths && r < m; r++) {
        lengths[r] = positions[r] + 1;
        if (r == 0 || rows[r] != rows[r - 1] || positions[r] != positions[r - 1] + 1 || r - run_start[runs - 1] >= RUN_ROWS)
            run_start[runs++] = r;
    }
    if (run_start) run_start[runs] = m;
    for (int64_t i = 0; run_start && lengths && i < runs; i++) {
        int64_t total = 0;
        for (int64_t r = run_start[i]; r < run_start[i + 1]; r++) total += lengths[r];
        run_scores = total > run_scores ? total : run_scores;
    }
    const int64_t tasks = runs * s->kv_heads;
    float *x = malloc(sizeof(float) * (size_t)(m * h));
    float *qkv = malloc(sizeof(float) * (size_t)(m * qkv_size));
    float *attn = malloc(sizeof(float) * (size_t)(m * q_size));
    float *gate_up = malloc(sizeof(float) * (size_t)(m * 2 * inter));
    float *act = malloc(sizeof(float) * (size_t)(m * inter));
    /* per thread: a run's scores and a block of keys or values converted from bf16 */
    const int64_t per_thread = groups * run_scores + KEY_BLOCK * d;
    float *work = malloc(sizeof(float) * (size_t)(threads * per_thread));
    int failed = !x || !qkv || !attn || !gate_up || !act || !work || !run_start || !lengths;
    for (int64_t l = 0; l < layer_count && !failed; l++) {
        const Layer *layer = layers + l;
        for (int64_t r = 0; r < m; r++) rms_norm(hidden + r * h, layer->input_norm, h, s->eps, x + r * h);
        if (linear(&layer->qkv, x, m, qkv, threads)) { failed = 1; break; }
        for (int64_t r = 0; r < m; r++) {
            float *q = qkv + r * qkv_size, *k = q + q_size, *v = k + kv_size;
            for (int64_t head = 0; head < s->heads; head++) {
                if (layer->q_norm) rms_norm(q + head * d, layer->q_norm, d, s->eps, q + head * d);
                rotate(q + head * d, cos + r * d, sin + r * d, d);
                for (int64_t i = 0; i < d; i++) q[head * d + i] *= s->scaling;
            }
            for (int64_t head = 0; head < s->kv_heads; head++) {
                if (layer->k_norm) rms_norm(k + head * d, layer->k_norm, d, s->eps, k + head * d);
                rotate(k + head * d, cos + r * d, sin + r * d, d);
                const int64_t at = ((rows[r] * s->kv_heads + head) * s->max_length + positions[r]) * d;
                if (s->bf16_cache) {
                    uint16_t *kd = (uint16_t *)layer->keys + at, *vd = (uint16_t *)layer->values + at;
                    for (int64_t i = 0; i < d; i++) kd[i] = to_bf16(k[head * d + i]), vd[i] = to_bf16(v[head * d + i]);
                } else {
                    memcpy((float *)layer->keys + at, k + head * d, sizeof(float) * (size_t)d);
                    memcpy((float *)layer->values + at, v + head * d, sizeof(float) * (size_t)d);
                }
            }
        }
        #pragma omp parallel for num_threads(threads) schedule(static, 1)
        for (int64_t task = 0; task < tasks; task++) {
            const int64_t run = task / s->kv_heads, head = task % s->kv_heads, r = run_start[run];
            float *mine = work + (int64_t)omp_get_thread_num() * per_thread;
            const int64_t base = (rows[r] * s->kv_heads + head) * s->max_length * d;
            attend_run(qkv + r * qkv_size + head * groups * d, qkv_size, lengths + r, run_start[run + 1] - r, layer->keys,
                       layer->values, s->bf16_cache, base, groups, d, mine, mine + groups * run_scores,
                       attn + r * q_size + head * groups * d, q_size);
        }
        if (linear(&layer->o, attn, m, x, threads)) { failed = 1; break; }
        add_into(hidden, x, m * h);
        for (int64_t r = 0; r < m; r++) rms_norm(hidden + r * h, layer->post_norm, h, s->eps, x + r * h);
        if (linear(&layer->gate_up, x, m, gate_up, threads)) { failed = 1; break; }
        for (int64_t r = 0; r < m; r++) { /* silu(gate) * up */
            const float *g = gate_up + r * 2 * inter, *u = g + inter;
            float *a = act + r * inter;
            int64_t i = 0;
            for (; i + 8 <= inter; i += 8) {
                const __m256 gv = _mm256_loadu_ps(g + i);
                const __m256 sig = _mm256_div_ps(gv, _mm256_add_ps(_mm256_set1_ps(1.0f), exp_ps(_mm256_sub_ps(_mm256_setzero_ps(), gv))));
                _mm256_storeu_ps(a + i, _mm256_mul_ps(sig, _mm256_loadu_ps(u + i)));
            }
            for (; i < inter; i++) a[i] = g[i] / (1.0f + exp_one(-g[i])) * u[i];
        }
        if (linear(&layer->down, act, m, x, threads)) { failed = 1; break; }
        add_into(hidden, x, m * h);
    }
    free(x), free(qkv), free(attn), free(gate_up), free(act), free(work), free(run_start), free(lengths);
    return failed ? -1 : 0;
}
