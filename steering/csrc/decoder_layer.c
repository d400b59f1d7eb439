/* A whole Llama decoder layer for the 1-4 new tokens of a decode step or a keystroke, in one call:
 * norm, q|k|v projection, rope + cache writes + attention (decode_attention.c), output projection,
 * residual, norm, gate|up projection, silu * up, down projection, residual.
 *
 * Why: in PyTorch this is ~15 ops and as many module and view calls per layer; at decode sizes their
 * dispatch (~6 ms of a ~11 ms token for the default model's 30 layers) cost more than the work. The
 * values are those of the PyTorch path (`llama.DecoderLayer` with the same 4-bit kernel): every op's
 * output is rounded to bf16 where PyTorch rounds it (bit-equal on the development machine; silu's exp
 * here and PyTorch's may differ in a last float bit).
 *
 * x, out: bf16 [T][D]. cos, signed_sin: bf16 [T][Dh]. k, v: the layer's bf16 cache (see
 * rope_store_attend). scratch: float, at least decoder_layer_scratch(...); scores: float, at least
 * H * T * (start + T). Returns -1 for shapes the kernels do not hold (the caller falls back).
 */
#include <math.h>
#include <stdint.h>

#include "bf16.h"
#include "exp.h"
#include "int4_linear.h"

typedef struct {
    const uint16_t *input_norm, *post_norm; /* bf16 [D] */
    int4_weight qkv, o, gate_up, down;
    int D, H, KV, Dh, I;
    float eps;
} decoder_weights;

void rms_norm_bf16(const uint16_t *x, const uint16_t *weight, uint16_t *out, int rows, int dim, float eps);
int rope_store_attend(const uint16_t *qkv, const uint16_t *cos, const uint16_t *signed_sin, uint16_t *k,
                      uint16_t *v, float *qbuf, float *attn, uint16_t *out, float *scores, int H, int KV, int T,
                      int start, int Dh, int64_t head_stride);

static inline int max_int(int a, int b) { return a > b ? a : b; }

/* Floats for n bf16 values, kept even so that the buffers after it stay aligned for floats. */
static inline int bf16_floats(int n) { return (n + 3) / 4 * 2; }

int decoder_layer_scratch(int T, int D, int H, int KV, int Dh, int I) {
    const int width = (H + 2 * KV) * Dh, widest = max_int(max_int(width, 2 * I), D);
    return T * widest + bf16_floats(T * widest) + bf16_floats(T * H * Dh) + bf16_floats(T * D) + 2 * H * T * Dh
           + int4_pair_scratch(T, max_int(max_int(D, H * Dh), I));
}

/* bf16 rounding of float values into a bf16 buffer */
static inline void round_rows(const float *src, uint16_t *dst, int n) {
    for (int i = 0; i < n; i++) dst[i] = float_to_bf16(src[i]);
}

/* silu(g) * u with bf16 rounding after silu and after the product, as PyTorch's bf16 ops do. */
static inline float silu_mul(float g, float u) {
    const float e = exp_nonpositive(-fabsf(g));
    const float sig = g >= 0.f ? 1.f / (1.f + e) : e / (1.f + e);
    return bf16_to_float(float_to_bf16(g * sig)) * u;
}

static int decoder_layer(const decoder_weights *w, const uint16_t *x, uint16_t *out, int T, const uint16_t *cos,
                  const uint16_t *signed_sin, uint16_t *k, uint16_t *v, int64_t head_stride, int start,
                  float *scratch, float *scores) {
    const int D = w->D, H = w->H, KV = w->KV, Dh = w->Dh, I = w->I;
    const int width = (H + 2 * KV) * Dh, widest = max_int(max_int(width, 2 * I), D);
    if (T < 1 || T > 4 || w->qkv.N != width || w->o.K != H * Dh || w->gate_up.N != 2 * I || w->down.K != I)
        return -1;
    float *proj = scratch;                                                 /* [T][widest] */
    uint16_t *h = (uint16_t *)(proj + T * widest);                         /* bf16 [T][widest] */
    uint16_t *attn_bf16 = (uint16_t *)((float *)h + bf16_floats(T * widest)); /* bf16 [T][H Dh] */
    uint16_t *x1 = (uint16_t *)((float *)attn_bf16 + bf16_floats(T * H * Dh)); /* bf16 [T][D] */
    float *qbuf = (float *)x1 + bf16_floats(T * D);                        /* [H][T][Dh] */
    float *attn = qbuf + H * T * Dh;                                       /* [H][T][Dh] */
    float *work = attn + H * T * Dh;                                       /* the projections' */

    rms_norm_bf16(x, w->input_norm, h, T, D, w->eps);
    int4_project(h, &w->qkv, proj, T, work);
    round_rows(proj, h, T * width); /* h: the bf16 q|k|v, as PyTorch's projection returns it */
    if (rope_store_attend(h, cos, signed_sin, k, v, qbuf, attn, attn_bf16, scores, H, KV, T, start, Dh, head_stride))
        return -1;
    int4_project(attn_bf16, &w->o, proj, T, work);
    for (int i = 0; i < T * D; i++) /* x + o(attn): both bf16, the sum rounded */
        x1[i] = float_to_bf16(bf16_to_float(x[i]) + bf16_to_float(float_to_bf16(proj[i])));
    rms_norm_bf16(x1, w->post_norm, h, T, D, w->eps);
    int4_project(h, &w->gate_up, proj, T, work);
    for (int t = 0; t < T; t++) {
        const float *g = proj + (int64_t)t * 2 * I, *u = g + I;
        uint16_t *a = h + (int64_t)t * I;
        for (int i = 0; i < I; i++)
            a[i] = float_to_bf16(silu_mul(bf16_to_float(float_to_bf16(g[i])), bf16_to_float(float_to_bf16(u[i]))));
    }
    int4_project(h, &w->down, proj, T, work);
    for (int i = 0; i < T * D; i++)
        out[i] = float_to_bf16(bf16_to_float(x1[i]) + bf16_to_float(float_to_bf16(proj[i])));
    return 0;
}

/* Layers w[0..n) in a row (consecutive layers that no Python hook needs to see): layer l reads the
 * cache at k + l * layer_stride. One call per forward instead of one per layer (~25 µs of Python
 * each). tmp: bf16 [T][D] scratch for the residual between layers. */
int decoder_layers(const decoder_weights *w, int n, const uint16_t *x, uint16_t *out, uint16_t *tmp, int T,
                   const uint16_t *cos, const uint16_t *signed_sin, uint16_t *k, uint16_t *v, int64_t layer_stride,
                   int64_t head_stride, int start, float *scratch, float *scores) {
    const uint16_t *in = x;
    for (int l = 0; l < n; l++) {
        uint16_t *dst = (n - 1 - l) % 2 == 0 ? out : tmp; /* the last layer writes `out` */
        if (decoder_layer(w + l, in, dst, T, cos, signed_sin, k + l * layer_stride, v + l * layer_stride, head_stride,
                          start, scratch, scores))
            return -1;
        in = dst;
    }
    return 0;
}
