/* 4-bit grouped linears (int4_linear.c), shared with the fused decoder layer (decoder_layer.c). */
#ifndef TINYMORPH_INT4_LINEAR_H
#define TINYMORPH_INT4_LINEAR_H
#include <stdint.h>

#define INT4_GROUP 32
#define INT4_BLOCK_ROWS 8 /* output rows stored together (see int4_linear.c) */
#define INT4_PAIR_BYTES (INT4_BLOCK_ROWS * (32 + 2 * 2 + 2 * 2)) /* a block's codes, scales, offsets of a pair */

/* A packed 4-bit weight [N][K] (layout: int4_linear.c). */
typedef struct {
    const uint8_t *packed;
    int N, K;
} int4_weight;

/* Float scratch a projection of M rows of K inputs needs. */
int int4_pair_scratch(int M, int K);
/* x: bf16 [M][K] → out: float [M][N] on the calling thread's OpenMP team. */
void int4_project(const uint16_t *x, const int4_weight *w, float *out, int M, float *scratch);

#endif
