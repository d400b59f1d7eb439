/* bfloat16 <-> float32, as torch converts (round to nearest even; NaN stays NaN). */
#ifndef TINYMORPH_BF16_H
#define TINYMORPH_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline uint16_t float_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* The same rounding as a select instead of an early return, so that a loop of it vectorizes (the
 * 4-bit dequantize: 45 -> 37 ms for the default model). The layers keep `float_to_bf16`: decode with
 * the select there measured 163-185 tok/s against 183-192, within this machine's drift but not better. */
static inline uint16_t float_to_bf16_select(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16, nan = (u >> 16) | 0x40u;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

#endif
