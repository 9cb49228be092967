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

/* Activations the kernels apply to outputs before storing them (= kernels.NATIVE_ACTIVATIONS). */
enum { ACT_NONE = 0, ACT_GELU_TANH = 1, ACT_SILU = 2, ACT_RELU = 3 };

static inline v16 select16(v16 mask_from, v16 a, v16 b) { /* lanes where mask_from's lane is all ones: a, else b */
    u32x16 m = (u32x16)mask_from;
    return (v16)(((u32x16)a & m) | ((u32x16)b & ~m));
}

/* e^a, within ~1 ulp for a in [-87.3, 88.3]; a is clamped to that range (the results stay finite and
 * normal), NaN stays NaN. Cephes' expf: a = n ln2 + r, |r| <= ln2 / 2, e^r by a degree-7 polynomial,
 * times 2^n built in the exponent bits. */
static inline v16 exp16(v16 a) {
    const v16 lo = (v16){0} - 87.3f, hi = (v16){0} + 88.3f, magic = (v16){0} + 12582912.0f; /* 1.5 * 2^23 */
    a = select16((v16)(a < lo), lo, a);
    a = select16((v16)(a > hi), hi, a);
    v16 t = a * 1.44269504088896341f + magic; /* round(a / ln2) in the low mantissa bits */
    v16 n = t - magic;
    v16 r = a - n * 0.693359375f - n * -2.12194440e-4f;
    v16 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    u32x16 scale = ((u32x16)t - 0x4B400000u + 127u) << 23; /* 2^n */
    return p * (v16)scale;
}

/* act(v) for one of the ACT_* codes. tanh GELU as x sigmoid(2u) (= 0.5 x (1 + tanh u), u = sqrt(2/pi)
 * (x + 0.044715 x^3)) and SiLU as x sigmoid(x), both within a few ulp of the exact value; torch's own
 * ops are no closer (its 1 + tanh u cancels on GELU's negative tail; tests/test_native.py). */
static inline v16 activate16(v16 v, int64_t act) {
    switch (act) {
    case ACT_GELU_TANH:
        return v / (1.0f + exp16(v * (-1.5957691216057308f + -0.0713548162726f * v * v)));
    case ACT_SILU:
        return v / (1.0f + exp16((v16){0} - v));
    case ACT_RELU:
        return select16((v16)(v < 0.0f), (v16){0}, v);
    default:
        return v;
    }
}
