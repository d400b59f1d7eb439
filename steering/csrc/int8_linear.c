/* y = x W^T * scale for int8 weight rows W [N][K] with a scale per row, for 1-2 rows of x.
 *
 * Why: PyTorch's `_weight_int8pack_mm` takes ~2 ms for the default model's tied lm_head (49,152 x 576)
 * per token and rounds the logits to bf16 (steps of 0.125 at a logit of 20: ties where there are
 * none). This loop converts each weight row once per row of x and accumulates in float32, on the
 * calling thread's OpenMP team (torch's own runtime, see decode_attention.c).
 */
#include <stdint.h>

void int8_linear(const float *x, const int8_t *w, const float *scale, float *out, int M, int N, int K) {
#pragma omp parallel for schedule(static)
    for (int n = 0; n < N; n++) {
        const int8_t *wr = w + (int64_t)n * K;
        for (int m = 0; m < M; m++) {
            const float *xr = x + (int64_t)m * K;
            float acc = 0.f;
            for (int k = 0; k < K; k++) acc += xr[k] * (float)wr[k];
            out[(int64_t)m * N + n] = acc * scale[n];
        }
    }
}
