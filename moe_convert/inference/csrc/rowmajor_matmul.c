/* Matmuls of a few rows on a plain row-major [out, in] matrix in fp32 or bf16 (moe_convert/inference/native.py): a
 * large matrix that is not packed, such as a tied LM head in decode (50257 x 1024: 206 MB per token
 * in fp32).
 *
 * Each output is a dot product along one weight row, so each thread streams its share of the rows
 * front to back once, with every token's partial sums in registers: S accumulators per token, split
 * along the row, so a single token's sums do not wait on each other. The lines `AHEAD` bytes on are
 * fetched into every cache level as it goes (`prefetcht0`): the non-temporal hint held an Intel Xeon to
 * 13 GB/s on SmolLM2's 49152 x 576 fp32 LM head (2 threads), against 30 GB/s with this one and 27 for
 * oneDNN's linear on the same plain matrix (bf16: 30 against 15).
 *
 * bf16 weights are widened to fp32 as they are read (exact), every product and sum is fp32, and each
 * output is rounded to bf16 once (nearest, ties to even), as oneDNN's bf16 linear computes it.
 */
#include <omp.h>
#include <stdint.h>

#include "packed_matmul.h"
#include "vectors.h"

#define AHEAD 4096 /* bytes fetched ahead of the ones being read */

/* y[t, r] = bias[r] + x[t, :] . w[r, :] for T tokens (x fp32) and rows r0 <= r < r1 of w (TYPE); `in` a
 * multiple of 16. */
#define ROWS_KERNEL(TYPE, T, S)                                                                          \
    static void rows_##TYPE##_##T(const float *x, const TYPE##_t *w, const TYPE##_t *bias, TYPE##_t *y,  \
                                  int64_t r0, int64_t r1, int64_t out, int64_t in) {                     \
        for (int64_t r = r0; r < r1; r++) {                                                              \
            const TYPE##_t *wr = w + r * in;                                                             \
            v16 acc[S][T];                                                                               \
            for (int s = 0; s < S; s++)                                                                  \
                for (int t = 0; t < T; t++) acc[s][t] = (v16){0};                                        \
            int64_t i = 0;                                                                               \
            for (; i + 16 * S <= in; i += 16 * S) {                                                      \
                for (int s = 0; s < S; s++) {                                                            \
                    __builtin_prefetch((const char *)(wr + i + 16 * s) + AHEAD, 0, 3);                   \
                    v16 wv = load16(wr + i + 16 * s, IS_BF16_##TYPE);                                               \
                    for (int t = 0; t < T; t++) acc[s][t] += *(const v16 *)(x + t * in + i + 16 * s) * wv; \
                }                                                                                        \
            }                                                                                            \
            for (; i < in; i += 16) {                                                                    \
                v16 wv = load16(wr + i, IS_BF16_##TYPE);                                                            \
                for (int t = 0; t < T; t++) acc[0][t] += *(const v16 *)(x + t * in + i) * wv;            \
            }                                                                                            \
            for (int t = 0; t < T; t++) {                                                                \
                v16 a = acc[0][t];                                                                       \
                for (int s = 1; s < S; s++) a += acc[s][t];                                              \
                float sum = bias ? load1(bias, r, IS_BF16_##TYPE) : 0.0f;                                       \
                for (int c = 0; c < 16; c++) sum += a[c];                                                \
                store1(y, t * out + r, sum, IS_BF16_##TYPE);                                                      \
            }                                                                                            \
        }                                                                                                \
    }
/* S * T <= 16 accumulators */
#define ROWS_KERNELS(TYPE)                                                                               \
    ROWS_KERNEL(TYPE, 1, 4) ROWS_KERNEL(TYPE, 2, 4) ROWS_KERNEL(TYPE, 3, 4) ROWS_KERNEL(TYPE, 4, 4)      \
    ROWS_KERNEL(TYPE, 5, 2) ROWS_KERNEL(TYPE, 6, 2) ROWS_KERNEL(TYPE, 7, 2) ROWS_KERNEL(TYPE, 8, 2)      \
    static void (*const rows_##TYPE[])(const float *, const TYPE##_t *, const TYPE##_t *, TYPE##_t *,     \
                                       int64_t, int64_t, int64_t, int64_t) = {                          \
        rows_##TYPE##_1, rows_##TYPE##_2, rows_##TYPE##_3, rows_##TYPE##_4,                              \
        rows_##TYPE##_5, rows_##TYPE##_6, rows_##TYPE##_7, rows_##TYPE##_8};
ROWS_KERNELS(f32)
ROWS_KERNELS(bf16)

/* y (T, out) = x (T, in) @ w^T + bias for 1 <= T <= 8: x fp32; w (out, in) row-major, bias (out,) or NULL
 * and y in fp32 (bf16 = 0) or bf16 (bf16 = 1); all contiguous; `in` a multiple of 16. Thread k of n
 * takes rows [out k / n, out (k + 1) / n). */
int mc_rowmajor_matmul(int64_t T, const float *x, const void *w, const void *bias, void *y, int64_t out, int64_t in,
                       int bf16, int threads) {
    if (T < 1 || T > (int64_t)(sizeof rows_f32 / sizeof rows_f32[0]) || !x || !w || !y || out < 1 || in < 16 || in % 16)
        return MC_REFUSED; /* native.rowmajor_matmul checks first */
#pragma omp parallel num_threads(threads)
    {
        int64_t k = omp_get_thread_num(), n = omp_get_num_threads(), r0 = out * k / n, r1 = out * (k + 1) / n;
        if (bf16)
            rows_bf16[T - 1](x, w, bias, y, r0, r1, out, in);
        else
            rows_f32[T - 1](x, w, bias, y, r0, r1, out, in);
    }
    return MC_OK;
}
