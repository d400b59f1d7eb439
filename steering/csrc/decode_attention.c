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
#ifdef _OPENMP
#include <omp.h>
#endif

#define MAX_ROWS 64 /* query rows per key/value head (group size x T) */
#define MAX_DIM 256

/* exp(x) for x <= 0 (softmax after subtracting the max) in plain arithmetic the compiler vectorizes:
 * glibc's vector expf is only offered under -ffast-math, which must not be used (see kernels.py).
 * x = n ln2 + r with |r| <= ln2/2; exp(r) by its Taylor polynomial to r^7 (relative error ~2e-7);
 * 2^n from the exponent bits. Below -87 the result is 0 (a float's smallest normal is e^-87.3). */
static inline float exp_nonpositive(float x) {
    x = x < -87.f ? -87.f : x;
    const float n = __builtin_roundf(x * 1.44269504f);
    const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
    float p = 1.f / 5040;
    p = p * r + 1.f / 720;
    p = p * r + 1.f / 120;
    p = p * r + 1.f / 24;
    p = p * r + 1.f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.f;
    p = p * r + 1.f;
    int32_t bits = (int32_t)(n + 127.f) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline void load_bf16(const uint16_t *src, float *dst, int n) {
    for (int d = 0; d < n; d++) {
        uint32_t u = (uint32_t)src[d] << 16;
        memcpy(dst + d, &u, sizeof u);
    }
}

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
        for (int r = 0; r < R; r++)
            for (int d = 0; d < Dh; d++) acc[r][d] = 0.f;
        for (int i = lo; i < hi; i++) {
            load_bf16(vh + (int64_t)i * Dh, row, Dh);
            for (int r = 0; r < R; r++) {
                const float p = sc[(int64_t)r * L + i];
                for (int d = 0; d < Dh; d++) acc[r][d] += p * row[d];
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
        int id = 0, nt = 1;
#ifdef _OPENMP
        id = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        if (Dh == 64) /* the common head size: a constant lets the compiler unroll the row loops */
            attend_share(q, k, v, out, scores, H, KV, T, L, 64, head_stride, scale, id, nt);
        else
            attend_share(q, k, v, out, scores, H, KV, T, L, Dh, head_stride, scale, id, nt);
    }
    return 0;
}
