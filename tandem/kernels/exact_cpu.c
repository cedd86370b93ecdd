/* Batch-invariant bf16 kernels for x86 CPUs with AVX2 and FMA (see tandem/kernels/cpu.py).
 *
 * Every output element is computed by one fixed sequence of float32 operations that depends
 * only on that element's own inputs: never on how many rows, tree nodes or sequences share the
 * call, nor on the thread count. Plain decoding (one token a pass) and verification (a tree of
 * tokens a pass) therefore give bit-identical logits, and greedy speculative output equals plain
 * decoding in bf16, not only in float32.
 *
 *  - linear: weights packed as [N/16][K][16] bf16; a tile of up to 6 rows x 16 columns keeps
 *    float32 accumulators in registers and walks k in order (one FMA per k per element);
 *    threads split the columns. Reading bf16 weights once serves every row of the pass, so
 *    a pass over a few tokens costs about what one token costs.
 *  - attention: each (sequence, head, query) visits the keys its mask shows in slot order; the
 *    softmax sum and the weighted sum of values run in that order.
 *  - rms_norm, act_mul: one row / one element at a time, in a fixed order.
 *
 * Built without -ffast-math on purpose: the compiler must not reassociate these sums.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion. */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Lanes summed in one fixed order. */
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* e^x for 8 lanes (Cephes polynomial, max relative error ~2e-7): one code path for every
 * element, so a value's result never depends on where it sits in a tensor. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* exp of n floats in place, 8 at a time (the tail goes through the same vector code). */
static void exp_inplace(float *v, int64_t n) {
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(v + i, exp8(_mm256_loadu_ps(v + i)));
    if (i < n) {
        float tail[8] = {0};
        memcpy(tail, v + i, sizeof(float) * (size_t)(n - i));
        _mm256_storeu_ps(tail, exp8(_mm256_loadu_ps(tail)));
        memcpy(v + i, tail, sizeof(float) * (size_t)(n - i));
    }
}

/* ---------------------------------------------------------------------------------------- */
/* linear: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])                                  */

#define TILE_ROWS 6

static inline __attribute__((always_inline)) void tile(
    int rows, const float *x, int64_t K, const uint16_t *w, float *acc /* [rows][16] */) {
    __m256 a[TILE_ROWS][2];
    for (int r = 0; r < rows; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        __m256 w0 = load8_bf16(w + k * 16), w1 = load8_bf16(w + k * 16 + 8);
        for (int r = 0; r < rows; r++) {
            __m256 xb = _mm256_broadcast_ss(x + r * K + k);
            a[r][0] = _mm256_fmadd_ps(w0, xb, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(w1, xb, a[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(acc + r * 16, a[r][0]);
        _mm256_storeu_ps(acc + r * 16 + 8, a[r][1]);
    }
}

static void tile_any(int rows, const float *x, int64_t K, const uint16_t *w, float *acc) {
    switch (rows) { /* constant row counts let the compiler keep every accumulator in a register */
        case 6: tile(6, x, K, w, acc); break;
        case 5: tile(5, x, K, w, acc); break;
        case 4: tile(4, x, K, w, acc); break;
        case 3: tile(3, x, K, w, acc); break;
        case 2: tile(2, x, K, w, acc); break;
        default: tile(1, x, K, w, acc); break;
    }
}

/* x: [M, K] bf16 rows (row stride ldx); packed: [ceil(N/16)][K][16] bf16; bias: [N] bf16 or NULL;
 * out: [M, N] (row stride ldo), float32 when out_f32 else bf16. */
void tandem_linear(const uint16_t *x, int64_t ldx, int64_t M, int64_t K, const uint16_t *packed, int64_t N,
                   const uint16_t *bias, void *out, int64_t ldo, int out_f32, int threads) {
    float *xf = (float *)malloc(sizeof(float) * (size_t)(M * K));
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++) xf[m * K + k] = bf16_to_f32(x[m * ldx + k]);
    int64_t blocks = (N + 15) / 16;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < blocks; nb++) {
        float acc[TILE_ROWS * 16];
        const uint16_t *w = packed + nb * K * 16;
        int64_t n0 = nb * 16, width = N - n0 < 16 ? N - n0 : 16;
        for (int64_t m0 = 0; m0 < M; m0 += TILE_ROWS) {
            int rows = M - m0 < TILE_ROWS ? (int)(M - m0) : TILE_ROWS;
            tile_any(rows, xf + m0 * K, K, w, acc);
            for (int r = 0; r < rows; r++) {
                for (int64_t j = 0; j < width; j++) {
                    float v = acc[r * 16 + j];
                    if (bias) v += bf16_to_f32(bias[n0 + j]);
                    int64_t at = (m0 + r) * ldo + n0 + j;
                    if (out_f32) ((float *)out)[at] = v;
                    else ((uint16_t *)out)[at] = f32_to_bf16(v);
                }
            }
        }
    }
    free(xf);
}

/* ---------------------------------------------------------------------------------------- */
/* attention over a KV cache with a visibility mask                                          */

/* q: [B, H, T, D] bf16 with strides (qb, qh, qt) and unit stride over D; kc/vc: one layer of
 * the cache, [rows, Hkv, cap, D] contiguous; row_ids: [B] cache rows; mask: [B, T, length]
 * uint8; out: [B, T, H, D] bf16 contiguous. D is a multiple of 8. */
void tandem_attention(const uint16_t *q, int64_t qb, int64_t qh, int64_t qt, const uint16_t *kc,
                      const uint16_t *vc, const int64_t *row_ids, int64_t B, int64_t H, int64_t Hkv, int64_t T,
                      int64_t D, int64_t cap, int64_t length, const uint8_t *mask, float scale, uint16_t *out,
                      int threads) {
    int64_t group = H / Hkv, chunks = D / 8;
#pragma omp parallel num_threads(threads)
    {
        size_t slots = (size_t)(length > 0 ? length : 1);
        float *score = (float *)malloc(sizeof(float) * slots);
        int64_t *seen = (int64_t *)malloc(sizeof(int64_t) * slots);
        __m256 *qf = (__m256 *)aligned_alloc(32, sizeof(__m256) * (size_t)chunks);
        __m256 *acc = (__m256 *)aligned_alloc(32, sizeof(__m256) * (size_t)chunks);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < B * H * T; task++) {
            int64_t b = task / (H * T), h = (task / T) % H, t = task % T;
            const uint16_t *qrow = q + b * qb + h * qh + t * qt;
            const uint8_t *visible = mask + (b * T + t) * length;
            int64_t head = row_ids[b] * Hkv + h / group;
            const uint16_t *keys = kc + head * cap * D, *values = vc + head * cap * D;
            int64_t n = 0;
            for (int64_t s = 0; s < length; s++)
                if (visible[s]) seen[n++] = s;
            for (int64_t c = 0; c < chunks; c++) qf[c] = load8_bf16(qrow + c * 8);
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) { /* four independent dot products hide the FMA latency */
                const uint16_t *k0 = keys + seen[i] * D, *k1 = keys + seen[i + 1] * D;
                const uint16_t *k2 = keys + seen[i + 2] * D, *k3 = keys + seen[i + 3] * D;
                __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
                for (int64_t c = 0; c < chunks; c++) {
                    d0 = _mm256_fmadd_ps(qf[c], load8_bf16(k0 + c * 8), d0);
                    d1 = _mm256_fmadd_ps(qf[c], load8_bf16(k1 + c * 8), d1);
                    d2 = _mm256_fmadd_ps(qf[c], load8_bf16(k2 + c * 8), d2);
                    d3 = _mm256_fmadd_ps(qf[c], load8_bf16(k3 + c * 8), d3);
                }
                score[i] = hsum8(d0) * scale, score[i + 1] = hsum8(d1) * scale;
                score[i + 2] = hsum8(d2) * scale, score[i + 3] = hsum8(d3) * scale;
            }
            for (; i < n; i++) { /* the same per-key sequence as above */
                const uint16_t *key = keys + seen[i] * D;
                __m256 dot = _mm256_setzero_ps();
                for (int64_t c = 0; c < chunks; c++) dot = _mm256_fmadd_ps(qf[c], load8_bf16(key + c * 8), dot);
                score[i] = hsum8(dot) * scale;
            }
            float best = -INFINITY;
            for (i = 0; i < n; i++)
                if (score[i] > best) best = score[i];
            for (int64_t i = 0; i < n; i++) score[i] -= best;
            exp_inplace(score, n);
            float total = 0.0f;
            for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_setzero_ps();
            for (int64_t i = 0; i < n; i++) {
                total += score[i];
                __m256 p = _mm256_set1_ps(score[i]);
                const uint16_t *value = values + seen[i] * D;
                for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_fmadd_ps(p, load8_bf16(value + c * 8), acc[c]);
            }
            uint16_t *orow = out + ((b * T + t) * H + h) * D;
            float inv = n > 0 ? 1.0f / total : 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                float lane[8];
                _mm256_storeu_ps(lane, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
                for (int j = 0; j < 8; j++) orow[c * 8 + j] = f32_to_bf16(lane[j]);
            }
        }
        free(score);
        free(seen);
        free(qf);
        free(acc);
    }
}

/* ---------------------------------------------------------------------------------------- */
/* rms_norm and the gated activation                                                         */

/* out = bf16(w * bf16(x * r)) (Llama/Qwen), or bf16(x * r * (offset + w)) (Gemma, offset != 0),
 * with r = 1 / sqrt(mean(x^2) + eps); x, out: [R, D] bf16 contiguous. */
void tandem_rms_norm(const uint16_t *x, int64_t R, int64_t D, const uint16_t *w, float eps, float offset,
                     uint16_t *out) {
    for (int64_t i = 0; i < R; i++) {
        const uint16_t *row = x + i * D;
        float sum = 0.0f;
        for (int64_t d = 0; d < D; d++) {
            float v = bf16_to_f32(row[d]);
            sum = fmaf(v, v, sum);
        }
        float r = 1.0f / sqrtf(sum / (float)D + eps);
        for (int64_t d = 0; d < D; d++) {
            float normed = bf16_to_f32(row[d]) * r;
            float scaled = offset != 0.0f ? normed * (offset + bf16_to_f32(w[d]))
                                          : bf16_to_f32(w[d]) * bf16_to_f32(f32_to_bf16(normed));
            out[i * D + d] = f32_to_bf16(scaled);
        }
    }
}

/* gu: [R, 2I] bf16 (gate | up); out: [R, I] = bf16(bf16(act(gate)) * up); act: 0 SiLU
 * g / (1 + e^-g), 1 tanh GELU with tanh(y) = 1 - 2 / (e^2y + 1). */
void tandem_act_mul(const uint16_t *gu, int64_t R, int64_t I, int gelu, uint16_t *out) {
    float *act = (float *)malloc(sizeof(float) * (size_t)(I > 0 ? I : 1));
    for (int64_t i = 0; i < R; i++) {
        const uint16_t *gate = gu + i * 2 * I, *up = gate + I;
        for (int64_t j = 0; j < I; j++) {
            float g = bf16_to_f32(gate[j]);
            act[j] = gelu ? 2.0f * 0.7978845608028654f * (g + 0.044715f * g * g * g) : -g;
        }
        exp_inplace(act, I);
        for (int64_t j = 0; j < I; j++) {
            float g = bf16_to_f32(gate[j]);
            float a = gelu ? 0.5f * g * (2.0f - 2.0f / (act[j] + 1.0f)) : g / (1.0f + act[j]);
            out[i * I + j] = f32_to_bf16(bf16_to_f32(f32_to_bf16(a)) * bf16_to_f32(up[j]));
        }
    }
    free(act);
}
