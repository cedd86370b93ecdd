/* Batch-invariant kernels for x86 CPUs with AVX2 and FMA (see tandem/kernels/cpu.py), for bf16
 * or float32 tensors: every function takes `f32` (1: float32 storage, 0: bf16) and computes in
 * float32 either way; inputs, weights and outputs share the model's storage type.
 *
 * Every output element is computed by one fixed sequence of float32 operations that depends
 * only on that element's own inputs: never on how many rows, tree nodes or sequences share the
 * call, nor on the thread count. Plain decoding (one token a pass) and verification (a tree of
 * tokens a pass) therefore give bit-identical logits, and greedy speculative output equals plain
 * decoding by construction, in bf16 (where the stock kernels' near-ties break it) and float32.
 *
 *  - linear: weights packed in blocks of 16 columns; a tile of up to 6 rows (AVX2) or 16 rows
 *    (AVX-512) x 16 columns keeps float32 accumulators in registers and walks k in order (one
 *    FMA per k, or one bf16 dot product per pair of k, per element), prefetching the next
 *    block; threads split the columns. Reading the weights once serves every row of the pass,
 *    so a pass over a few tokens costs about what one token costs.
 *  - attention: each (sequence, head, query) visits the keys it sees in position order, wherever
 *    their blocks lie in the paged cache; the softmax sum and the weighted sum of values run in
 *    that order.
 *  - rms_norm, act_mul: one row / one element at a time, in a fixed order.
 *
 * Built without -ffast-math on purpose: the compiler must not reassociate these sums.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "storage.h"

static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

/* Elements i..i+7 of a bf16 or float32 array as float32 (load1 in storage.h: one; store1: one stored). */
INLINE __m256 load8(const void *p, int64_t i, int f32) {
    return f32 ? _mm256_loadu_ps((const float *)p + i) : load8_bf16((const uint16_t *)p + i);
}
INLINE void store1(void *p, int64_t i, float v, int f32) {
    if (f32) ((float *)p)[i] = v;
    else ((uint16_t *)p)[i] = f32_to_bf16(v);
}
/* v as the storage type holds it (an intermediate the model rounds, as torch does). */
INLINE float rounded(float v, int f32) { return f32 ? v : bf16_to_f32(f32_to_bf16(v)); }

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

/* The max of x[0..n) and log(sum exp(x - max)), in one fixed order (8 lanes, then the lanes in
 * order): a log-softmax is x - max - log_sum (tree_cpu.c's search). */
void tandem_log_sum_exp(const float *x, int64_t n, float *max_out, float *log_sum_out) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(x + i));
    float m8s[8], m = -INFINITY;
    _mm256_storeu_ps(m8s, m8);
    for (int j = 0; j < 8; j++) m = m8s[j] > m ? m8s[j] : m;
    for (int64_t j = i; j < n; j++) m = x[j] > m ? x[j] : m;
    __m256 shift = _mm256_set1_ps(m), s8 = _mm256_setzero_ps();
    for (i = 0; i + 8 <= n; i += 8) s8 = _mm256_add_ps(s8, exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), shift)));
    if (i < n) {
        float tail[8];
        for (int j = 0; j < 8; j++) tail[j] = i + j < n ? x[i + j] - m : -INFINITY;
        s8 = _mm256_add_ps(s8, _mm256_and_ps(exp8(_mm256_loadu_ps(tail)),
                                             _mm256_cmp_ps(_mm256_loadu_ps(tail), _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ)));
    }
    *max_out = m;
    *log_sum_out = logf(hsum8(s8));
}

/* ---------------------------------------------------------------------------------------- */
/* linear: out[m, n] = sum_k x[m, k] * w[n, k] (+ bias[n])                                  */

#define NARROW_ROWS 6 /* AVX2: 6 rows x 2 ymm accumulators + 2 weight vectors fit in 16 registers */
#define WIDE_ROWS 16  /* AVX-512: up to 16 zmm accumulators, so a pass of 16 tokens reads each weight once */
#define AVX512 __attribute__((target("avx512f,avx512bw,avx512bf16")))

/* The tiles read x k-major, [K][rows] (one base pointer, each row a constant offset), and
 * write acc [rows][16]. AVX2: x float32; w [K][16] bf16 or float32. */
INLINE void tile(int rows, const void *xv, int64_t K, const void *w, float *acc, int f32) {
    const float *x = (const float *)xv;
    __m256 a[NARROW_ROWS][2];
    for (int r = 0; r < rows; r++) a[r][0] = a[r][1] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k++) {
        _mm_prefetch((const char *)w + (k + K) * 16 * (f32 ? 4 : 2), _MM_HINT_T0); /* the next block */
        __m256 w0 = load8(w, k * 16, f32), w1 = load8(w, k * 16 + 8, f32);
        for (int r = 0; r < rows; r++) {
            __m256 xb = _mm256_broadcast_ss(x + k * rows + r);
            a[r][0] = _mm256_fmadd_ps(w0, xb, a[r][0]);
            a[r][1] = _mm256_fmadd_ps(w1, xb, a[r][1]);
        }
    }
    for (int r = 0; r < rows; r++) {
        _mm256_storeu_ps(acc + r * 16, a[r][0]);
        _mm256_storeu_ps(acc + r * 16 + 8, a[r][1]);
    }
}

/* AVX-512. float32: x float32, w [K][16], one FMA per k. bf16: x [K/2][rows] pairs of bf16 (K
 * even), w [K/2][16][2], one VDPBF16PS per pair of k (acc += x[k] w[k] + x[k+1] w[k+1], a fixed
 * per-lane sequence); the bf16 products are exact, so only the pairwise sums round. */
AVX512 INLINE void tile512(int rows, const void *x, int64_t K, const void *w, float *acc, int f32) {
    __m512 a[WIDE_ROWS];
    for (int r = 0; r < rows; r++) a[r] = _mm512_setzero_ps();
    if (f32) {
        const float *xf = (const float *)x, *wf = (const float *)w;
        for (int64_t k = 0; k < K; k++) {
            _mm_prefetch((const char *)(wf + k * 16 + K * 16), _MM_HINT_T0); /* the next block */
            __m512 wk = _mm512_loadu_ps(wf + k * 16);
            for (int r = 0; r < rows; r++) a[r] = _mm512_fmadd_ps(wk, _mm512_set1_ps(xf[k * rows + r]), a[r]);
        }
    } else {
        const int32_t *xp = (const int32_t *)x; /* a pair of bf16 as one 32-bit lane */
        const uint16_t *wb = (const uint16_t *)w;
        for (int64_t p = 0; p < K / 2; p++) {
            _mm_prefetch((const char *)(wb + p * 32 + K * 16), _MM_HINT_T0); /* the next block */
            __m512bh wk = (__m512bh)_mm512_loadu_si512(wb + p * 32);
            for (int r = 0; r < rows; r++)
                a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_set1_epi32(xp[p * rows + r]), wk);
        }
    }
    for (int r = 0; r < rows; r++) _mm512_storeu_ps(acc + r * 16, a[r]);
}

/* Constant row counts and storage type let the compiler keep every accumulator in a register. */
#define TILE(FN, R, F32) case R: FN(R, x, K, w, acc, F32); break;
#define TILES_TO_6(FN, F32) TILE(FN, 6, F32) TILE(FN, 5, F32) TILE(FN, 4, F32) TILE(FN, 3, F32) TILE(FN, 2, F32) \
    default: FN(1, x, K, w, acc, F32);
#define TILES_7_TO_16(FN, F32) TILE(FN, 16, F32) TILE(FN, 15, F32) TILE(FN, 14, F32) TILE(FN, 13, F32) \
    TILE(FN, 12, F32) TILE(FN, 11, F32) TILE(FN, 10, F32) TILE(FN, 9, F32) TILE(FN, 8, F32) TILE(FN, 7, F32)

static void tile_any(int rows, const void *x, int64_t K, const void *w, float *acc, int f32) {
    if (f32) switch (rows) { TILES_TO_6(tile, 1) }
    else switch (rows) { TILES_TO_6(tile, 0) }
}

AVX512 static void tile512_any(int rows, const void *x, int64_t K, const void *w, float *acc, int f32) {
    if (f32) switch (rows) { TILES_7_TO_16(tile512, 1) TILES_TO_6(tile512, 1) }
    else switch (rows) { TILES_7_TO_16(tile512, 0) TILES_TO_6(tile512, 0) }
}

/* x: [M, K] rows (row stride ldx); bias: [N] or NULL; both in the storage type `f32` says, as the
 * packed weights: [ceil(N/16)][K][16], except for bf16 with `wide` [ceil(N/16)][ceil(K/2)][16][2]
 * (K padded with a zero to even). out: [M, N] (row stride ldo), float32 when out_f32 else the
 * storage type. `wide`: the AVX-512 tiles (the caller checks the CPU has AVX-512 F, BW, BF16). */
void tandem_linear(const void *x, int64_t ldx, int64_t M, int64_t K, const void *packed, int64_t N,
                   const void *bias, void *out, int64_t ldo, int out_f32, int f32, int wide, int threads) {
    int pairs = wide && !f32;
    int64_t Kp = pairs ? (K + 1) / 2 * 2 : K, row_bytes = Kp * (pairs ? 2 : 4);
    /* Rows split evenly over the fewest tiles (17 rows: 9 + 8, not 16 + 1, whose one accumulator
     * would wait on each dot product's latency); a row's sums do not depend on its tile. */
    int64_t most = wide ? WIDE_ROWS : NARROW_ROWS, tiles = M > 0 ? (M + most - 1) / most : 1;
    int64_t step = (M + tiles - 1) / tiles;
    /* x as the tiles read it: per tile of `step` rows, k-major ([Kp][rows] float32, or [Kp/2][rows]
     * pairs of bf16, the odd K padded with a zero). */
    char *xs = (char *)calloc((size_t)(M * row_bytes), 1);
    for (int64_t m0 = 0; m0 < M; m0 += step) {
        int64_t rows = M - m0 < step ? M - m0 : step;
        for (int64_t r = 0; r < rows; r++)
            for (int64_t k = 0; k < K; k++) {
                int64_t from = (m0 + r) * ldx + k;
                if (pairs) ((uint16_t *)xs)[m0 * Kp + ((k / 2) * rows + r) * 2 + k % 2] = ((const uint16_t *)x)[from];
                else ((float *)xs)[m0 * K + k * rows + r] = load1(x, from, f32);
            }
    }
    int64_t blocks = (N + 15) / 16, block_bytes = Kp * 16 * (f32 ? 4 : 2);
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t nb = 0; nb < blocks; nb++) {
        float acc[WIDE_ROWS * 16];
        const void *w = (const char *)packed + nb * block_bytes;
        int64_t n0 = nb * 16, width = N - n0 < 16 ? N - n0 : 16;
        for (int64_t m0 = 0; m0 < M; m0 += step) {
            int rows = M - m0 < step ? (int)(M - m0) : (int)step;
            if (wide) tile512_any(rows, xs + m0 * row_bytes, Kp, w, acc, f32);
            else tile_any(rows, xs + m0 * row_bytes, Kp, w, acc, f32);
            for (int r = 0; r < rows; r++) {
                for (int64_t j = 0; j < width; j++) {
                    float v = acc[r * 16 + j];
                    if (bias) v += load1(bias, n0 + j, f32);
                    store1(out, (m0 + r) * ldo + n0 + j, v, out_f32 || f32);
                }
            }
        }
    }
    free(xs);
}

/* ---------------------------------------------------------------------------------------- */
/* attention over a paged KV cache                                                           */

/* Where a pass's rows keep their keys and values: one layer of the block pool, [blocks, Hkv, bs,
 * D] contiguous (kc, vc); tables: [B, nb] the block number of each row's positions; starts: [B]
 * each row's cached length, where its new tokens begin. Position p of row b lies at offset
 * p % bs of block tables[b][p / bs]. */
typedef struct {
    void *kc, *vc;
    const int64_t *tables, *starts;
    int64_t nb, bs, Hkv;
} paged_kv;

INLINE int64_t slot_at(const paged_kv *kv, int64_t b, int64_t hk, int64_t pos, int64_t D) {
    return ((kv->tables[b * kv->nb + pos / kv->bs] * kv->Hkv + hk) * kv->bs + pos % kv->bs) * D;
}

/* The cache offsets of the keys query (b, t) sees for kv head hk, in position order: the prefix
 * positions [first[b T + t], starts[b]) (first NULL: from 0; a sliding window starts later),
 * then the new tokens j where tree[(b T + t) T + j]. Returns how many. Only the tree's own T x T
 * visibility is stored: the prefix is a range. */
static int64_t visible_keys(const paged_kv *kv, int64_t b, int64_t t, int64_t T, int64_t hk, int64_t D,
                            const int64_t *first, const uint8_t *tree, int64_t *at) {
    int64_t n = 0, start = kv->starts[b], bs = kv->bs;
    for (int64_t s = first ? first[b * T + t] : 0; s < start;) { /* block by block */
        int64_t end = (s / bs + 1) * bs < start ? (s / bs + 1) * bs : start;
        for (int64_t at0 = slot_at(kv, b, hk, s, D); s < end; s++, at0 += D) at[n++] = at0;
    }
    const uint8_t *sees = tree + (b * T + t) * T;
    for (int64_t j = 0; j < T; j++)
        if (sees[j]) at[n++] = slot_at(kv, b, hk, start + j, D);
    return n;
}

/* q: [B, H, T, D] with strides (qb, qh, qt) and unit stride over D; kv: the layer's cache (new
 * keys already written); first, tree: what each query sees (visible_keys); out: [B, T, H, D]
 * contiguous; q, the cache and out in the storage type `f32` says. D is a multiple of 8. */
INLINE void attention(const void *q, int64_t qb, int64_t qh, int64_t qt, const paged_kv *kv, int64_t B, int64_t H,
                      int64_t T, int64_t D, const int64_t *first, const uint8_t *tree, float scale, void *out,
                      int threads, int f32) {
    int64_t group = H / kv->Hkv, chunks = D / 8, longest = 1;
    for (int64_t b = 0; b < B; b++)
        if (kv->starts[b] + T > longest) longest = kv->starts[b] + T;
    const void *kc = kv->kc, *vc = kv->vc;
#pragma omp parallel num_threads(threads)
    {
        float *score = (float *)malloc(sizeof(float) * (size_t)longest);
        int64_t *at = (int64_t *)malloc(sizeof(int64_t) * (size_t)longest);
        __m256 *qf = (__m256 *)aligned_alloc(32, sizeof(__m256) * (size_t)chunks);
        __m256 *acc = (__m256 *)aligned_alloc(32, sizeof(__m256) * (size_t)chunks);
#pragma omp for schedule(static)
        for (int64_t task = 0; task < B * H * T; task++) {
            int64_t b = task / (H * T), h = (task / T) % H, t = task % T;
            int64_t qrow = b * qb + h * qh + t * qt;
            int64_t n = visible_keys(kv, b, t, T, h / group, D, first, tree, at);
            for (int64_t c = 0; c < chunks; c++) qf[c] = load8(q, qrow + c * 8, f32);
            int64_t i = 0;
            for (; i + 4 <= n; i += 4) { /* four independent dot products hide the FMA latency */
                int64_t k0 = at[i], k1 = at[i + 1], k2 = at[i + 2], k3 = at[i + 3];
                __m256 d0 = _mm256_setzero_ps(), d1 = d0, d2 = d0, d3 = d0;
                for (int64_t c = 0; c < chunks; c++) {
                    d0 = _mm256_fmadd_ps(qf[c], load8(kc, k0 + c * 8, f32), d0);
                    d1 = _mm256_fmadd_ps(qf[c], load8(kc, k1 + c * 8, f32), d1);
                    d2 = _mm256_fmadd_ps(qf[c], load8(kc, k2 + c * 8, f32), d2);
                    d3 = _mm256_fmadd_ps(qf[c], load8(kc, k3 + c * 8, f32), d3);
                }
                score[i] = hsum8(d0) * scale, score[i + 1] = hsum8(d1) * scale;
                score[i + 2] = hsum8(d2) * scale, score[i + 3] = hsum8(d3) * scale;
            }
            for (; i < n; i++) { /* the same per-key sequence as above */
                __m256 dot = _mm256_setzero_ps();
                for (int64_t c = 0; c < chunks; c++) dot = _mm256_fmadd_ps(qf[c], load8(kc, at[i] + c * 8, f32), dot);
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
                for (int64_t c = 0; c < chunks; c++) acc[c] = _mm256_fmadd_ps(p, load8(vc, at[i] + c * 8, f32), acc[c]);
            }
            int64_t orow = ((b * T + t) * H + h) * D;
            float inv = n > 0 ? 1.0f / total : 0.0f;
            for (int64_t c = 0; c < chunks; c++) {
                float lane[8];
                _mm256_storeu_ps(lane, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
                for (int j = 0; j < 8; j++) store1(out, orow + c * 8 + j, lane[j], f32);
            }
        }
        free(score);
        free(at);
        free(qf);
        free(acc);
    }
}

/* RoPE (non-interleaved halves) of one head's D values, rounded to the storage type:
 * out[d] = x[d] cos[d] + (d < D/2 ? -x[d + D/2] : x[d - D/2]) sin[d]. */
INLINE void rotate(const void *x, int64_t at, const float *cos, const float *sin, int64_t D, void *out,
                   int64_t to, int f32) {
    int64_t half = D / 2;
    for (int64_t d = 0; d < D; d++) {
        float partner = d < half ? -load1(x, at + d + half, f32) : load1(x, at + d - half, f32);
        store1(out, to + d, load1(x, at + d, f32) * cos[d] + partner * sin[d], f32);
    }
}

/* One attention layer of a pass after its projections, in one call: RoPE on the new queries and
 * keys, the new keys and values written into the cache after each row's prefix (position
 * starts[b] + t), then attention(). q, k, v: [B, T, heads * D] rows with row strides ldq, ldk,
 * ldv (views into the fused projection); cos, sin: [B, T, D] float32; the rest as attention(). */
INLINE void rope_attention(const void *q, int64_t ldq, const void *k, int64_t ldk, const void *v, int64_t ldv,
                           const float *cos, const float *sin, const paged_kv *kv, int64_t B, int64_t H, int64_t T,
                           int64_t D, const int64_t *first, const uint8_t *tree, float scale, void *out, int threads,
                           int f32) {
    int64_t size = f32 ? 4 : 2;
    void *qr = malloc((size_t)(B * H * T * D * size)); /* rotated queries, [B, H, T, D] */
    for (int64_t b = 0; b < B; b++)
        for (int64_t t = 0; t < T; t++) {
            int64_t token = b * T + t;
            const float *c = cos + token * D, *s = sin + token * D;
            for (int64_t h = 0; h < H; h++) rotate(q, token * ldq + h * D, c, s, D, qr, ((b * H + h) * T + t) * D, f32);
            for (int64_t h = 0; h < kv->Hkv; h++) {
                int64_t slot = slot_at(kv, b, h, kv->starts[b] + t, D);
                rotate(k, token * ldk + h * D, c, s, D, kv->kc, slot, f32);
                memcpy((char *)kv->vc + slot * size, (const char *)v + (token * ldv + h * D) * size, (size_t)(D * size));
            }
        }
    attention(qr, H * T * D, T * D, D, kv, B, H, T, D, first, tree, scale, out, threads, f32);
    free(qr);
}

/* kc, vc: one layer of the pool, [blocks, Hkv, bs, D]; tables: [B, nb]; starts: [B]. */
void tandem_rope_attention(const void *q, int64_t ldq, const void *k, int64_t ldk, const void *v, int64_t ldv,
                           const float *cos, const float *sin, const int64_t *starts, void *kc, void *vc,
                           const int64_t *tables, int64_t nb, int64_t bs, int64_t B, int64_t H, int64_t Hkv, int64_t T,
                           int64_t D, const int64_t *first, const uint8_t *tree, float scale, void *out, int threads,
                           int f32) {
    paged_kv kv = {kc, vc, tables, starts, nb, bs, Hkv};
    if (f32) rope_attention(q, ldq, k, ldk, v, ldv, cos, sin, &kv, B, H, T, D, first, tree, scale, out, threads, 1);
    else rope_attention(q, ldq, k, ldk, v, ldv, cos, sin, &kv, B, H, T, D, first, tree, scale, out, threads, 0);
}

/* ---------------------------------------------------------------------------------------- */
/* rms_norm and the gated activation                                                         */

/* 8 floats rounded to bf16 as f32_to_bf16 does, in the low 16 bits of each 32-bit lane. */
static inline __m256i bf16_bits8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
    __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
    return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(nan));
}

INLINE __m256 rounded8(__m256 v, int f32) {
    return f32 ? v : _mm256_castsi256_ps(_mm256_slli_epi32(bf16_bits8(v), 16));
}

INLINE void store8(void *p, int64_t i, __m256 v, int f32) {
    if (f32) {
        _mm256_storeu_ps((float *)p + i, v);
        return;
    }
    __m256i b = bf16_bits8(v);
    __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
    _mm_storeu_si128((__m128i *)((uint16_t *)p + i), packed);
}

/* out = w * round(x * r) (Llama/Qwen), or x * r * (offset + w) (Gemma, offset != 0), with
 * r = 1 / sqrt(mean(x^2) + eps) and round() to the storage type, as the model's reference does;
 * x, out: [R, D] contiguous. 8 lanes at a time, then the tail element by element: a fixed order. */
INLINE void rms_norm(const void *x, int64_t R, int64_t D, const void *w, float eps, float offset, void *out,
                     int f32) {
    for (int64_t i = 0; i < R; i++) {
        const int64_t row = i * D;
        __m256 squares = _mm256_setzero_ps();
        int64_t d = 0;
        for (; d + 8 <= D; d += 8) {
            __m256 v = load8(x, row + d, f32);
            squares = _mm256_fmadd_ps(v, v, squares);
        }
        float sum = hsum8(squares);
        for (; d < D; d++) {
            float v = load1(x, row + d, f32);
            sum = fmaf(v, v, sum);
        }
        float r = 1.0f / sqrtf(sum / (float)D + eps);
        __m256 r8 = _mm256_set1_ps(r), off8 = _mm256_set1_ps(offset);
        for (d = 0; d + 8 <= D; d += 8) {
            __m256 normed = _mm256_mul_ps(load8(x, row + d, f32), r8), weight = load8(w, d, f32);
            __m256 scaled = offset != 0.0f ? _mm256_mul_ps(normed, _mm256_add_ps(off8, weight))
                                           : _mm256_mul_ps(weight, rounded8(normed, f32));
            store8(out, row + d, scaled, f32);
        }
        for (; d < D; d++) {
            float normed = load1(x, row + d, f32) * r, weight = load1(w, d, f32);
            float scaled = offset != 0.0f ? normed * (offset + weight) : weight * rounded(normed, f32);
            store1(out, row + d, scaled, f32);
        }
    }
}

void tandem_rms_norm(const void *x, int64_t R, int64_t D, const void *w, float eps, float offset, void *out,
                     int f32) {
    if (f32) rms_norm(x, R, D, w, eps, offset, out, 1);
    else rms_norm(x, R, D, w, eps, offset, out, 0);
}

/* act(g) for 8 lanes: SiLU g / (1 + e^-g), or tanh GELU with tanh(y) = 1 - 2 / (e^2y + 1). */
static inline __m256 act8(__m256 g, int gelu) {
    const __m256 one = _mm256_set1_ps(1.0f), two = _mm256_set1_ps(2.0f);
    if (!gelu) return _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
    __m256 cube = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
    __m256 y = _mm256_mul_ps(_mm256_set1_ps(2.0f * 0.7978845608028654f),
                             _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), cube, g));
    __m256 tanh = _mm256_sub_ps(two, _mm256_div_ps(two, _mm256_add_ps(exp8(y), one)));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), tanh);
}

/* gu: [R, 2I] (gate | up); out: [R, I] = round(act(gate)) * up. The tail goes through the same
 * vector code, zero-padded. */
INLINE void act_mul(const void *gu, int64_t R, int64_t I, int gelu, void *out, int f32) {
    for (int64_t i = 0; i < R; i++) {
        const int64_t gate = i * 2 * I, up = gate + I;
        int64_t j = 0;
        for (; j + 8 <= I; j += 8) {
            __m256 a = rounded8(act8(load8(gu, gate + j, f32), gelu), f32);
            store8(out, i * I + j, _mm256_mul_ps(a, load8(gu, up + j, f32)), f32);
        }
        if (j < I) {
            float lane[8] = {0};
            for (int64_t t = j; t < I; t++) lane[t - j] = load1(gu, gate + t, f32);
            _mm256_storeu_ps(lane, rounded8(act8(_mm256_loadu_ps(lane), gelu), f32));
            for (int64_t t = j; t < I; t++) store1(out, i * I + t, lane[t - j] * load1(gu, up + t, f32), f32);
        }
    }
}

void tandem_act_mul(const void *gu, int64_t R, int64_t I, int gelu, void *out, int f32) {
    if (f32) act_mul(gu, R, I, gelu, out, 1);
    else act_mul(gu, R, I, gelu, out, 0);
}

/* ---------------------------------------------------------------------------------------- */
/* every decoder layer of a pass in one call                                                 */

/* One layer's weights: packed linears (wqkv with its bias or NULL), norm weights (NULL where the
 * family has none), and whether it attends through the sliding window. */
typedef struct {
    const void *attn_norm, *mlp_norm, *post_attn_norm, *post_mlp_norm, *q_norm, *k_norm;
    const void *wqkv, *bqkv, *wo, *w13, *w2;
    int64_t sliding;
} tandem_layer;

typedef struct {
    int64_t layers, hidden, heads, kv_heads, head_dim, intermediate;
    float eps, offset, scale;
    int32_t gelu, f32, wide;
    const tandem_layer *layer;
} tandem_model;

/* x += h in the storage type (torch's rounding of a bf16 add). */
static void add_into(void *x, const void *h, int64_t n, int f32) {
    for (int64_t i = 0; i < n; i++) store1(x, i, load1(x, i, f32) + load1(h, i, f32), f32);
}

/* What Block.forward does for every layer, with the same kernels in the same order, so the result
 * is bit-identical to the per-op path; it only saves the Python between the kernels. x: [B*T,
 * hidden], updated in place; cos/sin, tree: as tandem_rope_attention takes them (the local_ ones,
 * and the window's first visible positions local_first, for sliding layers); kc/vc: the whole
 * pool [layers, blocks, Hkv, bs, D]; keep[i]: where to copy x after layer i, or NULL. */
void tandem_layers(const tandem_model *m, void *x, int64_t B, int64_t T, const float *cos, const float *sin,
                   const float *local_cos, const float *local_sin, const uint8_t *tree, const uint8_t *local_tree,
                   const int64_t *local_first, const int64_t *starts, const int64_t *tables, int64_t nb, void *kc,
                   void *vc, int64_t blocks, int64_t bs, void *const *keep, int threads) {
    int f32 = m->f32, size = f32 ? 4 : 2;
    int64_t n = B * T, d = m->hidden, H = m->heads, Hkv = m->kv_heads, D = m->head_dim, I = m->intermediate;
    int64_t nqkv = (H + 2 * Hkv) * D, layer_slots = blocks * Hkv * bs * D;
    char *h = malloc((size_t)(n * d * size)), *qkv = malloc((size_t)(n * nqkv * size));
    char *attn = malloc((size_t)(n * H * D * size)), *gu = malloc((size_t)(n * 2 * I * size));
    char *act = malloc((size_t)(n * I * size));
    for (int64_t i = 0; i < m->layers; i++) {
        const tandem_layer *l = &m->layer[i];
        tandem_rms_norm(x, n, d, l->attn_norm, m->eps, m->offset, h, f32);
        tandem_linear(h, d, n, d, l->wqkv, nqkv, l->bqkv, qkv, nqkv, 0, f32, m->wide, threads);
        if (l->q_norm)
            for (int64_t t = 0; t < n; t++) {
                char *row = qkv + t * nqkv * size;
                tandem_rms_norm(row, H, D, l->q_norm, m->eps, m->offset, row, f32);
                tandem_rms_norm(row + H * D * size, Hkv, D, l->k_norm, m->eps, m->offset, row + H * D * size, f32);
            }
        tandem_rope_attention(qkv, nqkv, qkv + H * D * size, nqkv, qkv + (H + Hkv) * D * size, nqkv,
                              l->sliding ? local_cos : cos, l->sliding ? local_sin : sin, starts,
                              (char *)kc + i * layer_slots * size, (char *)vc + i * layer_slots * size, tables, nb, bs,
                              B, H, Hkv, T, D, l->sliding ? local_first : NULL, l->sliding ? local_tree : tree,
                              m->scale, attn, threads, f32);
        tandem_linear(attn, H * D, n, H * D, l->wo, d, NULL, h, d, 0, f32, m->wide, threads);
        if (l->post_attn_norm) tandem_rms_norm(h, n, d, l->post_attn_norm, m->eps, m->offset, h, f32);
        add_into(x, h, n * d, f32);
        tandem_rms_norm(x, n, d, l->mlp_norm, m->eps, m->offset, h, f32);
        tandem_linear(h, d, n, d, l->w13, 2 * I, NULL, gu, 2 * I, 0, f32, m->wide, threads);
        tandem_act_mul(gu, n, I, m->gelu, act, f32);
        tandem_linear(act, I, n, I, l->w2, d, NULL, h, d, 0, f32, m->wide, threads);
        if (l->post_mlp_norm) tandem_rms_norm(h, n, d, l->post_mlp_norm, m->eps, m->offset, h, f32);
        add_into(x, h, n * d, f32);
        if (keep[i]) memcpy(keep[i], x, (size_t)(n * d * size));
    }
    free(h);
    free(qkv);
    free(attn);
    free(gu);
    free(act);
}
