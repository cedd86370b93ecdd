/* Scalar storage helpers shared by exact_cpu.c and tree_cpu.c: bf16 <-> float32 as torch does it,
 * and element i of a bf16 or float32 array as float32. */
#ifndef TANDEM_STORAGE_H
#define TANDEM_STORAGE_H
#include <stdint.h>
#include <string.h>

/* Always inlined: callers pass a constant `f32`, so each compiles to one straight code path per
 * storage type. */
#define INLINE static inline __attribute__((always_inline))

INLINE float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch's float -> bfloat16 conversion. */
INLINE uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

INLINE float load1(const void *p, int64_t i, int f32) {
    return f32 ? ((const float *)p)[i] : bf16_to_f32(((const uint16_t *)p)[i]);
}

#endif
