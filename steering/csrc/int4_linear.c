/* y = x W^T for 4-bit weights in groups of 32 inputs (a scale and an offset per group, llama.cpp's
 * Q4_1), for the few bf16 rows of a decode step or a keystroke.
 *
 * Why: PyTorch's `_weight_int4pack_mm_for_cpu` reads the default model's projections at ~13 GB/s
 * (3.6-3.9 ms per token for 53 MB): it is bound by the instructions that turn codes into floats, not
 * by memory. Here a code becomes a bf16 number with a shift and one bitwise op (0x4300 | code is the
 * bf16 of 128 + code), and AVX512-BF16's dot product multiplies them by bf16 inputs, exactly (8-bit
 * by 8-bit mantissas), summing in float32:
 *   y = sum_g scale_g * sum_i (128 + code_i) x_i + sum_g (offset_g - 128 scale_g) * sum_i x_i.
 * Machines without AVX512-BF16 run the same sums in plain C.
 *
 * Layout (`quant.py` packs it), one stream in the order the loop reads it: blocks of 8 output rows;
 * per block, per pair of groups (64 inputs), INT4_PAIR_BYTES: the 8 rows' 16 16-bit words each, then
 * their two scales each, then their two offsets each, in float16 (the GGUF's own Q4_1 values). The
 * prefetch may name addresses past the weight's end: prefetches never fault. Nibble k (bits
 * 4k..4k+3) of word w holds input pair_input(w, k). The dot product sums words 2L and 2L+1 into lane
 * L; lane L belongs to the pair's group L % 2, so that the two scales broadcast as s0 s1 s0 s1 ...
 * The inputs are permuted the same way once per call (`pair_inputs`). (Rows stored apart, with their
 * scales in arrays of their own, made ~24 streams per thread: 30 % slower from memory.)
 */
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "int4_linear.h"
#include "team.h"

/* Pairs of a block read ahead (into the next block at its end): the weights stream from memory, and
 * asking for them ~2.5 KB early took the layers of a one-token forward 3.0-3.3 -> 2.9 ms. */
#define PREFETCH_PAIRS 8

/* Which of a pair's 64 inputs nibble k of word w holds. */
static inline int pair_input(int w, int k) {
    const int lane = w / 2;
    return (lane % 2) * INT4_GROUP + (lane / 2) * 8 + 2 * k + w % 2;
}

/* x: bf16 [M][K] → xp: bf16 [M][K/64][4][16] (for each nibble k, the inputs its 16 words
 * hold), xsum: float [M][K/64][8], lane L of a pair holding a quarter of the sum of the inputs of its
 * group L % 2 (so that the shift term is one more multiply-add per pair in the lanes). */
static void pair_inputs(const uint16_t *x, int M, int K, uint16_t *xp, float *xsum) {
    for (int m = 0; m < M; m++) {
        const uint16_t *xm = x + (int64_t)m * K;
        for (int p = 0; p < K / 64; p++) {
            uint16_t *dst = xp + ((int64_t)m * K + p * 64);
            float sums[2] = {0.f, 0.f};
            for (int k = 0; k < 4; k++)
                for (int w = 0; w < 16; w++) {
                    dst[k * 16 + w] = xm[p * 64 + pair_input(w, k)];
                    sums[(w / 2) % 2] += bf16_to_float(dst[k * 16 + w]);
                }
            for (int lane = 0; lane < 8; lane++) xsum[((int64_t)m * (K / 64) + p) * 8 + lane] = sums[lane % 2] / 4;
        }
    }
}

/* Row r of a block of INT4_BLOCK_ROWS rows, pair p: its codes; the block's 16 scales and 16 offsets. */
static inline const uint8_t *pair_codes(const uint8_t *block, int p, int r) { return block + (int64_t)p * INT4_PAIR_BYTES + r * 32; }
static inline const uint16_t *pair_halves(const uint8_t *block, int p, int which) {
    return (const uint16_t *)(block + (int64_t)p * INT4_PAIR_BYTES + INT4_BLOCK_ROWS * 32) + which * 2 * INT4_BLOCK_ROWS;
}

static inline float half_to_float(uint16_t h) { /* IEEE half → float, without _Float16 */
    const uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exponent = (h >> 10) & 31u, mantissa = h & 1023u;
    if (exponent == 0) { /* zero or subnormal: mantissa * 2^-24 */
        const float f = (float)mantissa * 5.9604644775390625e-08f;
        return sign ? -f : f;
    }
    const uint32_t u = sign | (exponent == 31 ? 0x7f800000u : (exponent + 112) << 23) | (mantissa << 13);
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#if defined(__AVX512BF16__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#include <immintrin.h>

/* R rows (from r0) of a block against M rows of x (R * M <= 8 independent accumulators). 256-bit
 * vectors: on machines that split 512-bit ops in two halves they are as fast, and a pair of groups
 * fills one. */
static inline void int4_block(const uint16_t *xp, const float *xsum, int K, const uint8_t *block, int r0,
                              const int R, const int M, float *out, int64_t ldo) {
    const int pairs = K / 64;
    __m256 acc[8];
    for (int a = 0; a < R * M; a++) acc[a] = _mm256_setzero_ps();
    const __m256i low4 = _mm256_set1_epi16(15), bf16_128 = _mm256_set1_epi16(0x4300);
    for (int p = 0; p < pairs; p++) {
        const uint8_t *ahead = block + (int64_t)(p + PREFETCH_PAIRS) * INT4_PAIR_BYTES;
        for (int line = 0; line < INT4_PAIR_BYTES; line += 64) __builtin_prefetch(ahead + line);
        float scales[2 * INT4_BLOCK_ROWS], shifts[2 * INT4_BLOCK_ROWS]; /* shift = offset - 128 scale */
        const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)pair_halves(block, p, 0)));
        const __m512 off = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)pair_halves(block, p, 1)));
        _mm512_storeu_ps(scales, sc);
        _mm512_storeu_ps(shifts, _mm512_fmadd_ps(sc, _mm512_set1_ps(-128.f), off));
        for (int r = 0; r < R; r++) {
            const __m256i words = _mm256_loadu_si256((const __m256i *)pair_codes(block, p, r0 + r));
            __m256i nib[4]; /* (words >> 4k) & 15 | 0x4300: the bf16 of 128 + code */
            nib[0] = _mm256_ternarylogic_epi32(words, low4, bf16_128, 0xEA);
            nib[1] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(words, 4), low4, bf16_128, 0xEA);
            nib[2] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(words, 8), low4, bf16_128, 0xEA);
            nib[3] = _mm256_ternarylogic_epi32(_mm256_srli_epi16(words, 12), low4, bf16_128, 0xEA);
            const __m256 s = _mm256_broadcast_f32x2(_mm_castpd_ps(_mm_load_sd((const double *)(scales + 2 * (r0 + r)))));
            const __m256 b = _mm256_broadcast_f32x2(_mm_castpd_ps(_mm_load_sd((const double *)(shifts + 2 * (r0 + r)))));
            for (int m = 0; m < M; m++) {
                const uint16_t *xm = xp + (int64_t)m * K + p * 64;
                __m256 dot = _mm256_setzero_ps();
                for (int k = 0; k < 4; k++)
                    dot = _mm256_dpbf16_ps(dot, (__m256bh)nib[k], (__m256bh)_mm256_loadu_si256((const __m256i *)(xm + 16 * k)));
                acc[r * M + m] = _mm256_fmadd_ps(dot, s, acc[r * M + m]);
                acc[r * M + m] = _mm256_fmadd_ps(_mm256_loadu_ps(xsum + ((int64_t)m * pairs + p) * 8), b, acc[r * M + m]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int m = 0; m < M; m++) {
            const __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc[r * M + m]), _mm256_extractf128_ps(acc[r * M + m], 1));
            const __m128 q = _mm_add_ps(h, _mm_movehl_ps(h, h));
            out[m * ldo + r0 + r] = _mm_cvtss_f32(_mm_add_ss(q, _mm_shuffle_ps(q, q, 1)));
        }
}
#else
static inline void int4_block(const uint16_t *xp, const float *xsum, int K, const uint8_t *block, int r0,
                              const int R, const int M, float *out, int64_t ldo) {
    for (int r = r0; r < r0 + R; r++)
        for (int m = 0; m < M; m++) {
            float sum = 0.f;
            for (int p = 0; p < K / 64; p++) {
                const uint8_t *c = pair_codes(block, p, r);
                const uint16_t *xm = xp + (int64_t)m * K + p * 64;
                float dot[2] = {0.f, 0.f};
                for (int k = 0; k < 4; k++)
                    for (int w = 0; w < 16; w++) {
                        const int word = c[2 * w] | (c[2 * w + 1] << 8);
                        dot[(w / 2) % 2] += (128.f + ((word >> (4 * k)) & 15)) * bf16_to_float(xm[16 * k + w]);
                    }
                const uint16_t *s = pair_halves(block, p, 0) + 2 * r, *o = pair_halves(block, p, 1) + 2 * r;
                const float *xs = xsum + ((int64_t)m * (K / 64) + p) * 8;
                for (int g = 0; g < 2; g++) {
                    const float scale = half_to_float(s[g]);
                    sum += dot[g] * scale + 4 * xs[g] * (half_to_float(o[g]) - 128 * scale);
                }
            }
            out[m * ldo + r] = sum;
        }
}
#endif

/* Output rows [lo, hi) (whole blocks) for all M rows of x, up to 4 rows of x at a time. The constant
 * block shapes let the compiler keep the accumulators in registers. */
static void int4_linear_rows(const uint16_t *xp, const float *xsum, const uint8_t *packed, float *out, int M,
                             int N, int K, int lo, int hi) {
    const int64_t block_bytes = (int64_t)(K / 64) * INT4_PAIR_BYTES;
    for (int m0 = 0; m0 < M; m0 += 4) {
        const int rows = M - m0 < 4 ? M - m0 : 4;
        const uint16_t *xm = xp + (int64_t)m0 * K;
        const float *xs = xsum + (int64_t)m0 * K / 8;
        float *om = out + (int64_t)m0 * N;
        for (int n = lo; n < hi; n += INT4_BLOCK_ROWS) {
            const uint8_t *block = packed + (int64_t)(n / INT4_BLOCK_ROWS) * block_bytes;
            switch (rows) {
            case 1: int4_block(xm, xs, K, block, 0, 8, 1, om + n, N); break;
            case 2:
                for (int r0 = 0; r0 < 8; r0 += 4) int4_block(xm, xs, K, block, r0, 4, 2, om + n, N);
                break;
            case 3:
                for (int r0 = 0; r0 < 8; r0 += 2) int4_block(xm, xs, K, block, r0, 2, 3, om + n, N);
                break;
            default:
                for (int r0 = 0; r0 < 8; r0 += 2) int4_block(xm, xs, K, block, r0, 2, 4, om + n, N);
                break;
            }
        }
    }
}

static void int4_linear_prepared(const uint16_t *xp, const float *xsum, const uint8_t *packed, float *out, int M,
                                 int N, int K) {
#pragma omp parallel
    {
        const int id = team_id(), nt = team_size(), blocks = N / INT4_BLOCK_ROWS;
        int4_linear_rows(xp, xsum, packed, out, M, N, K, blocks * id / nt * INT4_BLOCK_ROWS,
                         blocks * (id + 1) / nt * INT4_BLOCK_ROWS);
    }
}

int int4_pair_scratch(int M, int K) { return M * K / 2 + M * K / 8; }

/* One projection inside a fused op: inputs prepared on the calling thread, rows split over the team. */
void int4_project(const uint16_t *x, const int4_weight *w, float *out, int M, float *scratch) {
    uint16_t *xp = (uint16_t *)scratch;
    float *xsum = scratch + M * w->K / 2;
    pair_inputs(x, M, w->K, xp, xsum);
    int4_linear_prepared(xp, xsum, w->packed, out, M, w->N, w->K);
}

/* x: bf16 [M][K] → out: float [M][N], on the calling thread's OpenMP team (torch's, see
 * decode_attention.c). scratch: float, at least int4_pair_scratch(M, K). Returns -1 for shapes the
 * layout does not hold (K not a multiple of 64, N not of 8). */
int int4_linear(const uint16_t *x, const uint8_t *packed, float *out, int M, int N, int K, float *scratch) {
    if (K % 64 || N % 8 || M <= 0) return -1;
    uint16_t *xp = (uint16_t *)scratch;
    float *xsum = scratch + M * K / 2;
    pair_inputs(x, M, K, xp, xsum);
    int4_linear_prepared(xp, xsum, packed, out, M, N, K);
    return 0;
}

/* The weight back as bf16 [N][K] (code * scale + offset, rounded once), for the bf16 GEMM of a
 * prefill: unpacking the layout with PyTorch's ops took ~15 ms per layer. Row by row, a pair's 64
 * codes are first put in input order, so that the multiply-add and the rounding run as vector loops:
 * the default model's 120 matrices 89 -> 37 ms (rounding and writing in the packing's scattered
 * order before), which a cold prefill of 33-256 tokens pays once (64 tokens: 182 -> 97 ms). */
void int4_dequantize(const uint8_t *packed, int N, int K, uint16_t *out) {
    const int pairs = K / 64;
#pragma omp parallel for schedule(static)
    for (int b = 0; b < N / INT4_BLOCK_ROWS; b++) {
        const uint8_t *block = packed + (int64_t)b * pairs * INT4_PAIR_BYTES;
        for (int r = 0; r < INT4_BLOCK_ROWS; r++) {
            uint16_t *row = out + ((int64_t)b * INT4_BLOCK_ROWS + r) * K;
            for (int p = 0; p < pairs; p++) {
                const uint8_t *c = pair_codes(block, p, r);
                const uint16_t *s = pair_halves(block, p, 0) + 2 * r, *o = pair_halves(block, p, 1) + 2 * r;
                float code[64];
                for (int w = 0; w < 16; w++) {
                    const int word = c[2 * w] | (c[2 * w + 1] << 8);
                    for (int k = 0; k < 4; k++) code[pair_input(w, k)] = (float)((word >> (4 * k)) & 15);
                }
                for (int g = 0; g < 2; g++) {
                    const float scale = half_to_float(s[g]), offset = half_to_float(o[g]);
                    uint16_t *dst = row + p * 64 + g * INT4_GROUP;
                    for (int i = 0; i < INT4_GROUP; i++)
                        dst[i] = float_to_bf16_select(code[g * INT4_GROUP + i] * scale + offset);
                }
            }
        }
    }
}
