/* The native kernels' vector types and bf16 conversions (bf16 values are stored as uint16: the top half
 * of an fp32). */
#include <stdint.h>
#include <string.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));     /* 16 floats, unaligned loads allowed */
typedef uint16_t h16 __attribute__((vector_size(32), aligned(2)));  /* 16 bf16 values */
typedef uint32_t u32x16 __attribute__((vector_size(64), aligned(4)));

static inline float bf16_to_f32(uint16_t h) { /* exact */
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline v16 bf16x16_to_f32(const uint16_t *p) { /* exact */
    return (v16)(__builtin_convertvector(*(const h16 *)p, u32x16) << 16);
}
static inline void f32_to_bf16x16(v16 v, uint16_t *p) { /* nearest, ties to even; NaN stays NaN */
    u32x16 u = (u32x16)v, nan = (u32x16)(v != v);
    u32x16 rounded = (u + 0x7FFF + ((u >> 16) & 1)) >> 16, quiet = (u >> 16) | 0x40;
    *(h16 *)p = __builtin_convertvector((rounded & ~nan) | (quiet & nan), h16);
}
static inline uint16_t f32_to_bf16(float v) {
    uint32_t u;
    memcpy(&u, &v, sizeof u);
    return v != v ? (uint16_t)((u >> 16) | 0x40) : (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

/* Values of either type, fp32 or bf16 (`bf16` 1), read and written as fp32. The kernels' macros name the
 * type (f32, bf16) and pass IS_BF16_<type>: a constant, so each kernel compiles for its one type. */
typedef float f32_t;
typedef uint16_t bf16_t;
#define IS_BF16_f32 0
#define IS_BF16_bf16 1
static inline void *elem(const void *p, int64_t i, int bf16) { return (char *)p + i * (bf16 ? 2 : 4); } /* p + i */
static inline v16 load16(const void *p, int bf16) { return bf16 ? bf16x16_to_f32(p) : *(const v16 *)p; }
static inline void store16(void *p, v16 v, int bf16) {
    if (bf16)
        f32_to_bf16x16(v, p);
    else
        *(v16 *)p = v;
}
static inline float load1(const void *p, int64_t i, int bf16) {
    return bf16 ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}
static inline void store1(void *p, int64_t i, float v, int bf16) {
    if (bf16)
        ((uint16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}
