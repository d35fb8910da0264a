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

int int8_linear(const float *x, int64_t m, int64_t k, const int8_t *w, const float *ws, const float *bias,
                int64_t n, int64_t kp, float *out, int threads);

typedef struct {
    const int8_t *packed; /* kernel.pack layout */
    const float *scales;  /* [n] */
    const float *bias;    /* [n] or NULL */
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

/* Softmax attention of the `groups` query heads of one key/value head over positions [0, length).
 * q: [groups][d] (already scaled), out: [groups][d]; scores: [groups][length] scratch; block: scratch. */
static void attend_head(const float *q, const void *keys, const void *values, int bf16, int64_t base, int64_t length,
                        int64_t groups, int64_t d, float *scores, float *block, float *out) {
    for (int64_t t0 = 0; t0 < length; t0 += KEY_BLOCK) {
        const int64_t count = length - t0 < KEY_BLOCK ? length - t0 : KEY_BLOCK;
        const float *k = slab_block(keys, bf16, base + t0 * d, count, d, block);
        for (int64_t g = 0; g < groups; g++) {
            const float *qg = q + g * d;
            for (int64_t t = 0; t < count; t++) {
                __m256 acc = _mm256_mul_ps(_mm256_loadu_ps(qg), _mm256_loadu_ps(k + t * d));
                for (int64_t i = 8; i < d; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(qg + i), _mm256_loadu_ps(k + t * d + i), acc);
                scores[g * length + t0 + t] = hsum_ps(acc);
            }
        }
    }
    for (int64_t g = 0; g < groups; g++) {
        float *s = scores + g * length, top = -INFINITY, total = 0.0f;
        for (int64_t t = 0; t < length; t++) top = fmaxf(top, s[t]);
        int64_t t = 0;
        __m256 sum = _mm256_setzero_ps();
        for (; t + 8 <= length; t += 8) {
            const __m256 e = exp_ps(_mm256_sub_ps(_mm256_loadu_ps(s + t), _mm256_set1_ps(top)));
            _mm256_storeu_ps(s + t, e);
            sum = _mm256_add_ps(sum, e);
        }
        total = hsum_ps(sum);
        for (; t < length; t++) total += (s[t] = exp_one(s[t] - top));
        const float inv = 1.0f / total;
        for (t = 0; t < length; t++) s[t] *= inv;
        memset(out + g * d, 0, sizeof(float) * (size_t)d);
    }
    for (int64_t t0 = 0; t0 < length; t0 += KEY_BLOCK) {
        const int64_t count = length - t0 < KEY_BLOCK ? length - t0 : KEY_BLOCK;
        const float *v = slab_block(values, bf16, base + t0 * d, count, d, block);
        for (int64_t g = 0; g < groups; g++) {
            const float *p = scores + g * length + t0;
            float *og = out + g * d;
            for (int64_t i = 0; i < d; i += 8) {
                __m256 acc = _mm256_loadu_ps(og + i);
                for (int64_t t = 0; t < count; t++) acc = _mm256_fmadd_ps(_mm256_set1_ps(p[t]), _mm256_loadu_ps(v + t * d + i), acc);
                _mm256_storeu_ps(og + i, acc);
            }
        }
    }
}

static int linear(const Int8Matrix *w, const float *x, int64_t m, float *out, int threads) {
    return int8_linear(x, m, w->k, w->packed, w->scales, w->bias, w->n, w->kp, out, threads);
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
    const int64_t inter = s->intermediate, tasks = m * s->kv_heads;
    const int threads = s->threads < 1 ? 1 : s->threads;
    int64_t longest = 1;
    for (int64_t r = 0; r < m; r++) longest = positions[r] + 1 > longest ? positions[r] + 1 : longest;
    float *x = malloc(sizeof(float) * (size_t)(m * h));
    float *qkv = malloc(sizeof(float) * (size_t)(m * qkv_size));
    float *attn = malloc(sizeof(float) * (size_t)(m * q_size));
    float *gate_up = malloc(sizeof(float) * (size_t)(m * 2 * inter));
    float *act = malloc(sizeof(float) * (size_t)(m * inter));
    /* per thread: scores [groups][longest] and a block of keys or values converted from bf16 */
    const int64_t per_thread = groups * longest + KEY_BLOCK * d;
    float *work = malloc(sizeof(float) * (size_t)(threads * per_thread));
    int failed = !x || !qkv || !attn || !gate_up || !act || !work;
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
            const int64_t r = task / s->kv_heads, head = task % s->kv_heads;
            float *mine = work + (int64_t)omp_get_thread_num() * per_thread;
            const int64_t base = (rows[r] * s->kv_heads + head) * s->max_length * d;
            attend_head(qkv + r * qkv_size + head * groups * d, layer->keys, layer->values, s->bf16_cache, base,
                        positions[r] + 1, groups, d, mine, mine + groups * longest, attn + r * q_size + head * groups * d);
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
    free(x), free(qkv), free(attn), free(gate_up), free(act), free(work);
    return failed ? -1 : 0;
}
