/* exp(x) for x <= 0 in plain arithmetic the compiler vectorizes (softmax, silu). */
#ifndef TINYMORPH_EXP_H
#define TINYMORPH_EXP_H
#include <stdint.h>
#include <string.h>

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

#endif
