/* Matmuls of a few rows on weights that oneDNN packed for fp32 inference (moe_convert/native.py).
 *
 * oneDNN's packed fp32 [out, in] matrix (`kernels.pack_matrix`) is stored in blocks of 64 outputs:
 * block b holds w[64 b + o, i] at offset (b * in + i) * 64 + o, the last block padded to 64
 * (`native.register` checks this on the running machine before any call). The product is a pass
 * over each block's [in][64] panel per group of up to 6 rows, front to back, with the group's 64
 * outputs in registers. A single group (decode: one row per expert) streams each panel once. With
 * more groups (an expert's 32 rows in prefill) the panel is read again from cache, and while the
 * groups run, the panel of the next block this thread takes is fetched ahead in equal shares: oneDNN
 * reads each new panel cold, which left E=128's 32-row experts 1.3x slower than with hot weights.
 *
 * One call runs many jobs with the same (out, in) shape, e.g. the first matmul of every expert that
 * got tokens, on torch's own OpenMP threads (the library links the libgomp torch loaded), as many
 * as torch uses.
 */
#include <string.h>

#include "packed_matmul.h"

typedef float v16 __attribute__((vector_size(64), aligned(4)));  /* 16 floats, unaligned loads allowed */
#define BLOCK 64
#define LINE 64      /* bytes per cache line: the unit of the prefetch */
#define MAX_GROUP 6  /* rows computed per pass over a panel: 24 accumulators of the 32 vector registers */

/* y[r, 0:64] = bias[0:64] + sum_i x[r, i] * panel[i, 0:64] for R rows; `valid` outputs are written.
 * Meanwhile the first `ahead` cache lines at `next` are prefetched, one per step. */
#define PANEL_KERNEL(R)                                                                                  \
    static void panel_##R(const float *x, int64_t in, const float *panel, const float *bias, float *y,  \
                          int64_t ldy, int64_t valid, const char *next, int64_t ahead) {                 \
        v16 acc[R][4];                                                                                   \
        for (int r = 0; r < R; r++)                                                                      \
            for (int c = 0; c < 4; c++) acc[r][c] = bias ? *(const v16 *)(bias + 16 * c) : (v16){0};     \
        for (int64_t i = 0; i < in; i++) {                                                               \
            if (i < ahead) __builtin_prefetch(next + LINE * i, 0, 3);                                    \
            const v16 *w = (const v16 *)(panel + i * BLOCK);                                             \
            v16 w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];                                              \
            for (int r = 0; r < R; r++) {                                                                \
                float xv = x[r * in + i];                                                                \
                acc[r][0] += xv * w0, acc[r][1] += xv * w1, acc[r][2] += xv * w2, acc[r][3] += xv * w3;  \
            }                                                                                            \
        }                                                                                                \
        for (int r = 0; r < R; r++) {                                                                    \
            if (valid == BLOCK) {                                                                        \
                for (int c = 0; c < 4; c++) *(v16 *)(y + r * ldy + 16 * c) = acc[r][c];                  \
            } else {                                                                                     \
                memcpy(y + r * ldy, acc[r], (size_t)valid * sizeof(float));                              \
            }                                                                                            \
        }                                                                                                \
    }
PANEL_KERNEL(1)
PANEL_KERNEL(2)
PANEL_KERNEL(3)
PANEL_KERNEL(4)
PANEL_KERNEL(5)
PANEL_KERNEL(6)

void run_jobs(int64_t njobs, const job_t *jobs, int64_t out, int64_t in) {
    int64_t blocks = (out + BLOCK - 1) / BLOCK, units = njobs * blocks;
    int64_t panel_lines = in * BLOCK * (int64_t)sizeof(float) / LINE; /* cache lines of one [in][64] panel */
#pragma omp for schedule(static)
    for (int64_t u = 0; u < units; u++) {
        const job_t *j = jobs + u / blocks;
        int64_t b = u % blocks, valid = out - b * BLOCK < BLOCK ? out - b * BLOCK : BLOCK;
        const float *panel = j->w + b * in * BLOCK, *bias = j->bias ? j->bias + b * BLOCK : NULL;
        float tail[BLOCK]; /* the last block's bias, zero-padded: the kernels load 64 values */
        if (bias && valid < BLOCK) {
            memset(tail, 0, sizeof tail);
            memcpy(tail, bias, (size_t)valid * sizeof(float));
            bias = tail;
        }
        /* the panel of the unit after this one (static schedule: most likely this thread's next),
         * fetched in equal shares over this unit's passes when there are two or more */
        int64_t passes = (j->rows + MAX_GROUP - 1) / MAX_GROUP;
        int64_t share = passes > 1 && u + 1 < units ? (panel_lines + passes - 1) / passes : 0;
        const job_t *nj = jobs + (u + 1) / blocks;
        const char *next = share ? (const char *)(nj->w + (u + 1) % blocks * in * BLOCK) : NULL;
        for (int64_t r = 0, pass = 0; r < j->rows; r += MAX_GROUP, pass++) {
            const float *x = j->x + r * in;
            float *y = j->y + r * out + b * BLOCK;
            const char *ahead_at = next ? next + LINE * pass * share : NULL;
            int64_t ahead = next ? (panel_lines - pass * share < share ? panel_lines - pass * share : share) : 0;
            switch (j->rows - r < MAX_GROUP ? j->rows - r : MAX_GROUP) {
            case 1: panel_1(x, in, panel, bias, y, out, valid, ahead_at, ahead); break;
            case 2: panel_2(x, in, panel, bias, y, out, valid, ahead_at, ahead); break;
            case 3: panel_3(x, in, panel, bias, y, out, valid, ahead_at, ahead); break;
            case 4: panel_4(x, in, panel, bias, y, out, valid, ahead_at, ahead); break;
            case 5: panel_5(x, in, panel, bias, y, out, valid, ahead_at, ahead); break;
            default: panel_6(x, in, panel, bias, y, out, valid, ahead_at, ahead); break;
            }
        }
    }
}

void mc_packed_matmul(int64_t njobs, const job_t *jobs, int64_t out, int64_t in, int threads) {
#pragma omp parallel num_threads(threads)
    run_jobs(njobs, jobs, out, in);
}
