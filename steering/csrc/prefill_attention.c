/* Causal attention of many new queries (a prefill) over a bfloat16 KV cache, with AVX512-BF16.
 *
 * Why: a cold prefill of 2,048 tokens spent ~40 ms per layer (1.2 s of 2.5 s) in PyTorch's causal
 * SDPA, ~120 GFLOP/s where the bf16 GEMMs beside it reach ~400. This is flash attention written for
 * one head size (64) and the machine's bf16 dot product: per head and block of 64 queries, keys and
 * values stream by in blocks of 64; scores q.k and the weighted values are AVX512-BF16 dot products of
 * bf16 pairs summed in float32 (q.k as SDPA's bf16 kernel computes it: bf16 inputs, float32 sums),
 * the softmax runs online in float32, and its probabilities are rounded to bf16 for the values'
 * product, as SDPA's bf16 kernel rounds them. Keys and values are first packed so that one 512-bit
 * load holds 16 keys' values of a pair of dimensions (scores) or 16 dimensions of a pair of keys
 * (values); the packing is ~1 % of the work. 2,048 tokens, 9 query heads over 3 key/value heads,
 * one layer, 2 threads: 18.5 ms (SDPA 40 ms); a model's cold prefill of 2,048 tokens 2.8 -> 1.9 s.
 *
 * q: bf16, head h's row j at q + h*q_head + j*q_row; k, v: bf16 [KV][capacity][64] (kv_head elements
 * between heads); out: bf16 [T][H*64]; packed: bf16 scratch, at least 2*KV*round_up(L, 64)*64.
 * Row j (0-based, of T) is position L - T + j and sees keys 0 .. L - T + j; head h reads key/value
 * head h / (H/KV). Returns 1 (nothing written) where the machine lacks AVX512-BF16 or dim != 64.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "exp.h"
#include "team.h"

#define DIM 64
#define QB 64 /* query rows per task */
#define KB 64 /* keys per block */
#define RB 4  /* query rows per micro-kernel call */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>

/* keys [L][64] → per block of 16 keys, per pair of dimensions: the 16 keys' pairs (32 bf16);
 * values [L][64] → per pair of keys, per dimension: the two keys' values (2 bf16). Rows past L are 0. */
static void pack_head(const uint16_t *k, const uint16_t *v, int64_t length, uint32_t *kp, uint32_t *vp,
                      int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; i++) {
        const uint32_t *krow = (const uint32_t *)(k + i * DIM);
        uint32_t *kblock = kp + (i / 16) * (DIM / 2) * 16 + i % 16;
        for (int p = 0; p < DIM / 2; p++) kblock[p * 16] = i < length ? krow[p] : 0;
        uint16_t *vpair = (uint16_t *)(vp + (i / 2) * DIM) + i % 2;
        for (int d = 0; d < DIM; d++) vpair[2 * d] = i < length ? v[i * DIM + d] : 0;
    }
}

/* Scores of RB query rows (their bf16 pairs) against the 64 keys of a packed block → s[RB][KB]. */
static inline void block_scores(const uint32_t *const qp[RB], const uint32_t *kblock, float s[RB][KB]) {
    __m512 acc[RB][4];
    for (int r = 0; r < RB; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    for (int p = 0; p < DIM / 2; p++) {
        __m512bh key[4];
        for (int c = 0; c < 4; c++) key[c] = (__m512bh)_mm512_loadu_si512(kblock + (c * (DIM / 2) + p) * 16);
        for (int r = 0; r < RB; r++) {
            const __m512bh q = (__m512bh)_mm512_set1_epi32((int)qp[r][p]);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], key[c], q);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(s[r] + 16 * c, acc[r][c]);
}

/* exp(x) of 16 floats x <= 0 (or -inf): as `exp_nonpositive`, 2^n by scalef. */
static inline __m512 exp16_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* One row's scores over a block of 64 keys (keys 0..sees visible) into the online softmax: the new
 * running max m and sum l, the factor alpha for what was summed so far, and the block's
 * probabilities as bf16 pairs (rounded to nearest even, as torch rounds). */
static inline void softmax_row(const float *s, int64_t sees, float scale, float *m, float *l, float *alpha,
                               uint32_t *p) {
    __m512 x[4];
    __mmask16 visible[4];
    for (int c = 0; c < 4; c++) {
        const int64_t n = sees + 1 - 16 * c; /* visible keys in this group of 16 */
        visible[c] = n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
        x[c] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), visible[c], _mm512_loadu_ps(s + 16 * c),
                                  _mm512_set1_ps(scale));
    }
    const float mx = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_max_ps(x[0], x[1]), _mm512_max_ps(x[2], x[3])));
    const float m_new = mx > *m ? mx : *m;
    *alpha = *m == -INFINITY ? 0.f : exp_nonpositive(*m - m_new);
    *m = m_new;
    __m512 e[4], sum = _mm512_setzero_ps();
    for (int c = 0; c < 4; c++) {
        e[c] = _mm512_maskz_mov_ps(visible[c], exp16_nonpositive(_mm512_sub_ps(x[c], _mm512_set1_ps(m_new))));
        sum = _mm512_add_ps(sum, e[c]);
    }
    *l = *l * *alpha + _mm512_reduce_add_ps(sum);
    _mm512_storeu_si512(p, (__m512i)_mm512_cvtne2ps_pbh(e[1], e[0]));
    _mm512_storeu_si512(p + 16, (__m512i)_mm512_cvtne2ps_pbh(e[3], e[2]));
}

/* o[r] = o[r] * alpha[r] + sum over the block's keys of p[r][key] * value[key] (p as bf16 pairs). */
static inline void block_values(const uint32_t p[RB][KB / 2], const uint32_t *vblock, const float alpha[RB],
                                float o[RB][DIM]) {
    __m512 acc[RB][4];
    for (int r = 0; r < RB; r++) {
        const __m512 a = _mm512_set1_ps(alpha[r]);
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o[r] + 16 * c), a);
    }
    for (int kp = 0; kp < KB / 2; kp++) {
        __m512bh value[4];
        for (int c = 0; c < 4; c++) value[c] = (__m512bh)_mm512_loadu_si512(vblock + kp * DIM + 16 * c);
        for (int r = 0; r < RB; r++) {
            const __m512bh w = (__m512bh)_mm512_set1_epi32((int)p[r][kp]);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], value[c], w);
        }
    }
    for (int r = 0; r < RB; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(o[r] + 16 * c, acc[r][c]);
}

/* One task: query rows q0 .. q0+n-1 of head h against their visible keys. */
static void attend_rows(const uint16_t *q, int64_t q_head, int64_t q_row, const uint32_t *kp, const uint32_t *vp,
                        uint16_t *out, int heads, int h, int64_t q0, int n, int64_t first_pos, float scale) {
    float o[QB][DIM], m[QB], l[QB];
    const uint32_t *qrows[QB];
    for (int r = 0; r < QB; r++) {
        const int64_t row = q0 + (r < n ? r : n - 1);  /* rows past n repeat the last (never written) */
        qrows[r] = (const uint32_t *)(q + h * q_head + row * q_row);
        m[r] = -INFINITY;
        l[r] = 0.f;
        memset(o[r], 0, sizeof o[r]);
    }
    const int64_t last_key = first_pos + q0 + n - 1;
    for (int64_t k0 = 0; k0 <= last_key; k0 += KB) {
        const uint32_t *kblock = kp + (k0 / 16) * (DIM / 2) * 16;
        const uint32_t *vblock = vp + (k0 / 2) * DIM;
        for (int r0 = 0; r0 < n; r0 += RB) {
            float s[RB][KB], alpha[RB];
            uint32_t p[RB][KB / 2];
            block_scores(&qrows[r0], kblock, s);
            for (int r = 0; r < RB; r++) {
                const int64_t sees = first_pos + q0 + (r0 + r < n ? r0 + r : n - 1) - k0; /* keys 0..sees of the block */
                softmax_row(s[r], sees, scale, &m[r0 + r], &l[r0 + r], &alpha[r], p[r]);
            }
            block_values(p, vblock, alpha, &o[r0]);
        }
    }
    for (int r = 0; r < n; r++) {
        uint16_t *dst = out + (q0 + r) * (int64_t)heads * DIM + h * DIM;
        const float inv = 1.f / l[r];
        for (int d = 0; d < DIM; d++) dst[d] = float_to_bf16_select(o[r][d] * inv);
    }
}

int prefill_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, uint16_t *packed,
                      int heads, int kv_heads, int t, int64_t length, int dim, int64_t q_head, int64_t q_row,
                      int64_t kv_head, float scale) {
    if (dim != DIM || t < 1 || t > length || heads % kv_heads) return 1;
    const int64_t padded = (length + KB - 1) / KB * KB;
    uint32_t *kpacked = (uint32_t *)packed, *vpacked = kpacked + (int64_t)kv_heads * padded * DIM / 2;
    const int64_t first_pos = length - t, blocks = (t + QB - 1) / QB, chunk = 256;
    const int64_t chunks = padded / chunk + (padded % chunk != 0);
#pragma omp parallel
    {
#pragma omp for schedule(static)
        for (int64_t w = 0; w < kv_heads * chunks; w++) {
            const int g = (int)(w / chunks);
            const int64_t lo = (w % chunks) * chunk, hi = lo + chunk < padded ? lo + chunk : padded;
            pack_head(k + g * kv_head, v + g * kv_head, length, kpacked + g * padded * DIM / 2,
                      vpacked + g * padded * DIM / 2, lo, hi);
        }
        /* the last blocks of queries see the most keys: they go first */
#pragma omp for schedule(dynamic, 1)
        for (int64_t w = 0; w < heads * blocks; w++) {
            const int64_t b = blocks - 1 - w / heads;
            const int h = (int)(w % heads), g = h / (heads / kv_heads);
            const int n = (int)(t - b * QB < QB ? t - b * QB : QB);
            attend_rows(q, q_head, q_row, kpacked + g * padded * DIM / 2, vpacked + g * padded * DIM / 2, out,
                        heads, h, b * QB, n, first_pos, scale);
        }
    }
    return 0;
}

#else

int prefill_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *out, uint16_t *packed,
                      int heads, int kv_heads, int t, int64_t length, int dim, int64_t q_head, int64_t q_row,
                      int64_t kv_head, float scale) {
    (void)q, (void)k, (void)v, (void)out, (void)packed, (void)heads, (void)kv_heads, (void)t, (void)length;
    (void)dim, (void)q_head, (void)q_row, (void)kv_head, (void)scale;
    return 1;
}

#endif
