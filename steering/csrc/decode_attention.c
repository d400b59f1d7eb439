/* Attention of a few new queries over a bfloat16 KV cache, for decode steps and keystrokes.
 *
 * Why: PyTorch's CPU attention is slow for 1-4 queries over a long cache (its float32 kernel reads
 * the cache at ~10 GB/s, its bf16 kernel is slower still). This loop reads the bf16 keys once and
 * the values once, computing every query of a key/value head's group against each row as it
 * streams by, in float32. Plain C: gcc/clang vectorize it for the machine it is built on
 * (`tinymorph.steering.attention` builds it there, once, and checks it against SDPA).
 *
 * q: float [H][T][Dh]; k, v: bf16 [KV][capacity][Dh] (head stride given in elements);
 * out: float [H][T][Dh]; scores: float scratch, at least H*T*L. Query j (0-based, of T) sees keys
 * 0 .. L-T+j (the new queries are the last T positions). Head h reads key/value head h / (H/KV).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"
#include "exp.h"
#include "team.h"

#define MAX_ROWS 64 /* query rows per key/value head (group size x T) */
#define MAX_DIM 256

static inline void load_bf16(const uint16_t *src, float *dst, int n) {
    for (int d = 0; d < n; d++) dst[d] = bf16_to_float(src[d]);
}

#ifdef __AVX512F__
#include <immintrin.h>
#define ATTENTION_AVX512 1

static inline __m512 load_bf16x16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

static inline __m256 halves_added(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

/* Scores of R query rows against keys [lo, hi) of one head (Dh = 64), four keys at a time: their four
 * dot products are reduced together (three horizontal adds for four sums instead of ~8 ops each).
 * With the register-held value sums below: 2 new tokens over 2,048 keys, 30 layers 4.4 -> 3.0 ms. */
static inline void scores_64(const float qs[][MAX_DIM], int R, const uint16_t *kh, int lo, int hi, float *sc,
                             int64_t L) {
    int i = lo;
    for (; i + 4 <= hi; i += 4) {
        __m512 key[4][4];
        for (int j = 0; j < 4; j++)
            for (int c = 0; c < 4; c++) key[j][c] = load_bf16x16(kh + (int64_t)(i + j) * 64 + 16 * c);
        for (int r = 0; r < R; r++) {
            __m256 half[4];
            for (int j = 0; j < 4; j++) {
                __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qs[r]), key[j][0]);
                for (int c = 1; c < 4; c++) a = _mm512_fmadd_ps(_mm512_loadu_ps(qs[r] + 16 * c), key[j][c], a);
                half[j] = halves_added(a);
            }
            const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(half[0], half[1]), _mm256_hadd_ps(half[2], half[3]));
            _mm_storeu_ps(sc + r * L + i, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));
        }
    }
    for (; i < hi; i++)
        for (int r = 0; r < R; r++) {
            __m512 a = _mm512_setzero_ps();
            for (int c = 0; c < 4; c++)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qs[r] + 16 * c), load_bf16x16(kh + (int64_t)i * 64 + 16 * c), a);
            sc[r * L + i] = _mm512_reduce_add_ps(a);
        }
}

/* Values weighted by the probabilities of ROWS (1-4) query rows, keys [lo, hi) of one head (Dh = 64),
 * the accumulators in registers → acc[ROWS][64]. */
static inline void values_64(const float *sc, int64_t L, const uint16_t *vh, int lo, int hi, const int rows,
                             float acc[][MAX_DIM]) {
    __m512 sum[4][4];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) sum[r][c] = _mm512_setzero_ps();
    for (int i = lo; i < hi; i++) {
        __m512 value[4];
        for (int c = 0; c < 4; c++) value[c] = load_bf16x16(vh + (int64_t)i * 64 + 16 * c);
        for (int r = 0; r < rows; r++) {
            const __m512 p = _mm512_set1_ps(sc[r * L + i]);
            for (int c = 0; c < 4; c++) sum[r][c] = _mm512_fmadd_ps(p, value[c], sum[r][c]);
        }
    }
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < 4; c++) _mm512_storeu_ps(acc[r] + 16 * c, sum[r][c]);
}
#endif

/* One thread's share of a call: keys [lo, hi) of every head in the score and value passes, every
 * nt-th query row in the softmax. Barriers between the passes; each thread adds its partial values
 * into `out` (zeroed by the caller) at the end. */
static inline void attend_share(const float *q, const uint16_t *k, const uint16_t *v, float *out, float *scores,
                                int H, int KV, int T, int L, int Dh, int64_t head_stride, float scale,
                                int id, int nt) {
    const int G = H / KV, R = G * T;
    const int lo = (int)((int64_t)L * id / nt), hi = (int)((int64_t)L * (id + 1) / nt);
    float qs[MAX_ROWS][MAX_DIM], row[MAX_DIM];
    for (int g = 0; g < KV; g++) {
        const uint16_t *kh = k + g * head_stride;
        float *sc = scores + (int64_t)g * R * L;
        for (int r = 0; r < R; r++) {
            const float *qr = q + ((int64_t)(g * G + r / T) * T + r % T) * Dh;
            for (int d = 0; d < Dh; d++) qs[r][d] = qr[d] * scale;
        }
#ifdef ATTENTION_AVX512
        if (Dh == 64) {
            scores_64(qs, R, kh, lo, hi, sc, L);
            continue;
        }
#endif
        for (int i = lo; i < hi; i++) {
            load_bf16(kh + (int64_t)i * Dh, row, Dh);
            for (int r = 0; r < R; r++) {
                float s = 0.f;
                for (int d = 0; d < Dh; d++) s += qs[r][d] * row[d];
                sc[(int64_t)r * L + i] = s;
            }
        }
    }
#pragma omp barrier
    for (int gr = id; gr < KV * R; gr += nt) { /* softmax of each query row over its visible keys */
        float *sr = scores + (int64_t)gr * L;
        const int visible = L - T + (gr % R) % T + 1;
        float m = -INFINITY, sum = 0.f;
        for (int i = 0; i < visible; i++) m = sr[i] > m ? sr[i] : m;
        for (int i = 0; i < visible; i++) {
            sr[i] = exp_nonpositive(sr[i] - m);
            sum += sr[i];
        }
        const float inv = 1.f / sum;
        for (int i = 0; i < visible; i++) sr[i] *= inv;
        for (int i = visible; i < L; i++) sr[i] = 0.f;
    }
#pragma omp barrier
    for (int g = 0; g < KV; g++) {
        const uint16_t *vh = v + g * head_stride;
        const float *sc = scores + (int64_t)g * R * L;
        float acc[MAX_ROWS][MAX_DIM];
#ifdef ATTENTION_AVX512
        if (Dh == 64) {
            for (int r0 = 0; r0 < R; r0 += 4) {
                const float *part = sc + (int64_t)r0 * L;
                switch (R - r0 < 4 ? R - r0 : 4) {
                case 1: values_64(part, L, vh, lo, hi, 1, acc + r0); break;
                case 2: values_64(part, L, vh, lo, hi, 2, acc + r0); break;
                case 3: values_64(part, L, vh, lo, hi, 3, acc + r0); break;
                default: values_64(part, L, vh, lo, hi, 4, acc + r0); break;
                }
            }
        } else
#endif
        {
            for (int r = 0; r < R; r++)
                for (int d = 0; d < Dh; d++) acc[r][d] = 0.f;
            for (int i = lo; i < hi; i++) {
                load_bf16(vh + (int64_t)i * Dh, row, Dh);
                for (int r = 0; r < R; r++) {
                    const float p = sc[(int64_t)r * L + i];
                    for (int d = 0; d < Dh; d++) acc[r][d] += p * row[d];
                }
            }
        }
#pragma omp critical
        for (int r = 0; r < R; r++) {
            float *o = out + ((int64_t)(g * G + r / T) * T + r % T) * Dh;
            for (int d = 0; d < Dh; d++) o[d] += acc[r][d];
        }
    }
}

/* Returns 0, or -1 when the shapes are outside what the kernel holds (the caller falls back).
 * `out` must be zeros. Runs on the calling thread's OpenMP team (torch's own runtime: it is the
 * libgomp.so.1 already loaded), so the threads torch keeps warm between its ops do this too. */
int decode_attention(const float *q, const uint16_t *k, const uint16_t *v, float *out, float *scores,
                     int H, int KV, int T, int L, int Dh, int64_t head_stride, float scale) {
    if (KV <= 0 || H % KV || (H / KV) * T > MAX_ROWS || Dh > MAX_DIM || T > L) return -1;
#pragma omp parallel
    {
        const int id = team_id(), nt = team_size();
        if (Dh == 64) /* the common head size: a constant lets the compiler unroll the row loops */
            attend_share(q, k, v, out, scores, H, KV, T, L, 64, head_stride, scale, id, nt);
        else
            attend_share(q, k, v, out, scores, H, KV, T, L, Dh, head_stride, scale, id, nt);
    }
    return 0;
}

/* A decoder layer's attention for T new tokens from its fused q|k|v projection, in one call: rope on
 * the queries and keys (HF's rotate-half, with bf16 rounding after each product and the sum, as the
 * PyTorch path does), keys and values written into the bf16 cache at positions start..start+T, the
 * attention above, and its output rounded to bf16 in the layout the output projection reads.
 * Why: the same work in PyTorch is ~12 ops and ~12 views per layer (~30 µs at decode sizes).
 *
 * qkv: bf16 [T][(H + 2 KV) Dh]; cos, signed_sin: bf16 [T][Dh] (the model's tables at these positions;
 * the first half of signed_sin negated); k, v: the layer's cache, head g's row i at + g*head_stride +
 * i*Dh; qbuf: float scratch [H][T][Dh]; attn: float scratch [H][T][Dh]; out: bf16 [T][H Dh]. */
int rope_store_attend(const uint16_t *qkv, const uint16_t *cos, const uint16_t *signed_sin, uint16_t *k,
                      uint16_t *v, float *qbuf, float *attn, uint16_t *out, float *scores, int H, int KV, int T,
                      int start, int Dh, int64_t head_stride) {
    if (KV <= 0 || H % KV || (H / KV) * T > MAX_ROWS || Dh > MAX_DIM || Dh % 2) return -1;
    const int width = (H + 2 * KV) * Dh, half = Dh / 2;
    for (int j = 0; j < T; j++) {
        const uint16_t *row = qkv + (int64_t)j * width, *c = cos + (int64_t)j * Dh, *s = signed_sin + (int64_t)j * Dh;
        for (int h = 0; h < H + KV; h++) { /* queries, then keys: one rope */
            const uint16_t *x = row + h * Dh;
            for (int d = 0; d < Dh; d++) {
                const float a = bf16_to_float(float_to_bf16(bf16_to_float(x[d]) * bf16_to_float(c[d])));
                const float b = bf16_to_float(float_to_bf16(bf16_to_float(x[(d + half) % Dh]) * bf16_to_float(s[d])));
                const uint16_t r = float_to_bf16(a + b);
                if (h < H)
                    qbuf[((int64_t)h * T + j) * Dh + d] = bf16_to_float(r);
                else
                    k[(h - H) * head_stride + (int64_t)(start + j) * Dh + d] = r;
            }
        }
        for (int g = 0; g < KV; g++)
            memcpy(v + g * head_stride + (int64_t)(start + j) * Dh, row + (H + KV + g) * Dh, Dh * sizeof(uint16_t));
    }
    memset(attn, 0, (size_t)H * T * Dh * sizeof(float));
    if (decode_attention(qbuf, k, v, attn, scores, H, KV, T, start + T, Dh, head_stride, 1.f / sqrtf((float)Dh)))
        return -1;
    for (int j = 0; j < T; j++)
        for (int h = 0; h < H; h++)
            for (int d = 0; d < Dh; d++)
                out[((int64_t)j * H + h) * Dh + d] = float_to_bf16(attn[((int64_t)h * T + j) * Dh + d]);
    return 0;
}
