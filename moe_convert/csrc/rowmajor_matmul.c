/* Matmuls of a few rows on a plain row-major fp32 [out, in] matrix (moe_convert/native.py): a large
 * matrix that is not packed, such as a tied LM head in decode (50257 x 1024: 206 MB per token).
 *
 * Each output is a dot product along one weight row, so each thread streams its share of the rows
 * front to back once, with every token's partial sums in registers: S accumulators per token, split
 * along the row, so a single token's sums do not wait on each other. oneDNN's linear on the same
 * plain matrix streams it at ~40 GB/s here, three quarters of what `sum` reads.
 */
#include <omp.h>
#include <stdint.h>

typedef float v16 __attribute__((vector_size(64), aligned(4)));  /* 16 floats, unaligned loads allowed */
#define AHEAD 1024 /* floats fetched ahead of the ones being read (4 KiB) */

/* y[t, r] = bias[r] + x[t, :] . w[r, :] for T tokens and rows r0 <= r < r1; `in` a multiple of 16. */
#define ROWS_KERNEL(T, S)                                                                                \
    static void rows_##T(const float *x, const float *w, const float *bias, float *y, int64_t r0,        \
                         int64_t r1, int64_t out, int64_t in) {                                          \
        for (int64_t r = r0; r < r1; r++) {                                                              \
            const float *wr = w + r * in;                                                                \
            v16 acc[S][T];                                                                               \
            for (int s = 0; s < S; s++)                                                                  \
                for (int t = 0; t < T; t++) acc[s][t] = (v16){0};                                        \
            int64_t i = 0;                                                                               \
            for (; i + 16 * S <= in; i += 16 * S) {                                                      \
                for (int s = 0; s < S; s++) {                                                            \
                    __builtin_prefetch(wr + i + AHEAD + 16 * s, 0, 0);                                   \
                    v16 wv = *(const v16 *)(wr + i + 16 * s);                                            \
                    for (int t = 0; t < T; t++) acc[s][t] += *(const v16 *)(x + t * in + i + 16 * s) * wv; \
                }                                                                                        \
            }                                                                                            \
            for (; i < in; i += 16) {                                                                    \
                v16 wv = *(const v16 *)(wr + i);                                                         \
                for (int t = 0; t < T; t++) acc[0][t] += *(const v16 *)(x + t * in + i) * wv;            \
            }                                                                                            \
            for (int t = 0; t < T; t++) {                                                                \
                v16 a = acc[0][t];                                                                       \
                for (int s = 1; s < S; s++) a += acc[s][t];                                              \
                float sum = bias ? bias[r] : 0.0f;                                                       \
                for (int c = 0; c < 16; c++) sum += a[c];                                                \
                y[t * out + r] = sum;                                                                    \
            }                                                                                            \
        }                                                                                                \
    }
/* S * T <= 16 accumulators */
ROWS_KERNEL(1, 4)
ROWS_KERNEL(2, 4)
ROWS_KERNEL(3, 4)
ROWS_KERNEL(4, 4)
ROWS_KERNEL(5, 2)
ROWS_KERNEL(6, 2)
ROWS_KERNEL(7, 2)
ROWS_KERNEL(8, 2)

/* y (T, out) = x (T, in) @ w^T + bias for 1 <= T <= 8, w (out, in) row-major, bias NULL or (out,); x, y
 * contiguous; `in` a multiple of 16. Thread k of n takes rows [out k / n, out (k + 1) / n). */
void mc_rowmajor_matmul(int64_t T, const float *x, const float *w, const float *bias, float *y, int64_t out,
                        int64_t in, int threads) {
    static void (*const by_tokens[])(const float *, const float *, const float *, float *, int64_t, int64_t,
                                     int64_t, int64_t) = {rows_1, rows_2, rows_3, rows_4, rows_5, rows_6, rows_7,
                                                          rows_8};
#pragma omp parallel num_threads(threads)
    {
        int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
        by_tokens[T - 1](x, w, bias, y, out * k / n, out * (k + 1) / n, out, in);
    }
}
