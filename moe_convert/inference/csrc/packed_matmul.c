/* Matmuls on weights that oneDNN packed for fp32 or bf16 inference (moe_convert/inference/native.py).
 *
 * oneDNN's packed fp32 [out, in] matrix (`kernels.pack_matrix`) is stored in blocks of 64 outputs:
 * block b holds w[64 b + o, i] at offset (b * in + i) * 64 + o, the last block padded to 64; a bf16
 * one holds pairs of inputs side by side per output, at ((b * in / 2 + i / 2) * 64 + o) * 2 + i % 2
 * (`native.register` checks the layout on the running machine before any call). bf16 pairs go through
 * the CPU's bf16 dot product where it has one (AVX512-BF16), as oneDNN's kernels do, else are widened
 * to fp32 exactly; either way the sums are fp32 and each output is rounded to bf16 once. The product
 * is a pass over each block's [in][64] panel per group of up to 6 rows, front to back, with the group's 64
 * outputs in registers. A single group (decode: one row per expert) streams each panel once, fetching
 * the lines `STREAM_AHEAD` bytes ahead of the ones it reads (the CPU's own prefetcher stops at 4 KiB
 * page boundaries: bf16 decode of SmolLM2's 30 layers ran 6% faster with it, fp32 the same). With
 * more groups (an expert's 32 rows in prefill) the panel is read again from cache, and while the
 * groups run, the panel of the next block this thread takes is fetched ahead in equal shares: oneDNN
 * reads each new panel cold, which left E=128's 32-row experts 1.3x slower than with hot weights.
 *
 * One call runs many jobs with the same (out, in) shape, e.g. the first matmul of every expert that
 * got tokens, on torch's own OpenMP threads (the library links the libgomp torch loaded), as many
 * as torch uses, each thread a contiguous share of the (job, block) units of about equal cost. A job
 * may apply an activation to its outputs as they are stored (vectors.h `activate16`): torch's tanh GELU
 * as a separate op cost ~5 ms of the ~45 ms E=128 experts of a T=4096 prefill.
 */
#ifdef __AVX512BF16__
#include <immintrin.h>
#endif
#include <omp.h>
#include <string.h>

#include "packed_matmul.h"
#include "vectors.h"

#define BLOCK 64
#define LINE 64      /* bytes per cache line: the unit of the prefetch */
#define MAX_GROUP 6  /* rows computed per pass over a panel: 24 accumulators of the 32 vector registers */
#define STEP_LINES 4 /* cache lines of a panel one step reads: 64 outputs of one fp32 input or two bf16 ones */
#define STREAM_AHEAD 4096 /* bytes between the lines a single pass reads and those it fetches */

/* The 64 outputs' accumulators of a group start at the bias (or 0), and are stored, `valid` of them, as
 * the type's values after the activation `act` (ACT_*). */
static inline void bias_acc(const void *bias, v16 *acc, int bf16) {
    for (int c = 0; c < 4; c++) acc[c] = bias ? load16(elem(bias, 16 * c, bf16), bf16) : (v16){0};
}
static inline void store_acc(const v16 *acc, void *y, int64_t valid, int bf16, int64_t act) {
    float tail[BLOCK]; /* room for 64 of either type */
    void *to = valid == BLOCK ? y : tail;
    for (int c = 0; c < 4; c++) store16(elem(to, 16 * c, bf16), activate16(acc[c], act), bf16);
    if (to == y) return;
    memcpy(y, tail, (size_t)valid * (bf16 ? 2 : 4));
}

/* One step of the pass over a panel, for R rows of x. fp32 panels [in][64]: input i, 64 outputs. bf16
 * panels [in / 2][64][2] (oneDNN's pairs of inputs per output): inputs i and i + 1, each 32-bit lane
 * holding one output's two weights: both products summed into fp32 by the CPU's bf16 dot product where
 * it has one, else widened exactly and multiply-added in fp32. */
#define STEP_f32(R)                                                                                      \
    const v16 *w = (const v16 *)((const float *)panel + i * BLOCK);                                      \
    v16 w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3];                                                      \
    for (int r = 0; r < R; r++) {                                                                        \
        float xv = ((const float *)x)[r * in + i];                                                       \
        acc[r][0] += xv * w0, acc[r][1] += xv * w1, acc[r][2] += xv * w2, acc[r][3] += xv * w3;          \
    }
#ifdef __AVX512BF16__ /* the CPU's bf16 pair dot product (two products per lane, summed into fp32), as oneDNN uses */
#define STEP_bf16(R)                                                                                     \
    const __m512i *w = (const __m512i *)((const uint16_t *)panel + i * BLOCK);                           \
    __m512bh wb[4];                                                                                      \
    for (int c = 0; c < 4; c++) wb[c] = (__m512bh)_mm512_loadu_si512(w + c);                            \
    for (int r = 0; r < R; r++) {                                                                        \
        int32_t pair; /* x[r, i] and x[r, i + 1] */                                                      \
        memcpy(&pair, (const uint16_t *)x + r * in + i, sizeof pair);                                    \
        __m512bh xb = (__m512bh)_mm512_set1_epi32(pair);                                                 \
        for (int c = 0; c < 4; c++) acc[r][c] = (v16)_mm512_dpbf16_ps((__m512)acc[r][c], xb, wb[c]);     \
    }
#else /* widened exactly, fp32 multiply-adds */
#define STEP_bf16(R)                                                                                     \
    const u32x16 *w = (const u32x16 *)((const uint16_t *)panel + i * BLOCK);                             \
    v16 even[4], odd[4];                                                                                 \
    for (int c = 0; c < 4; c++) even[c] = (v16)(w[c] << 16), odd[c] = (v16)(w[c] & 0xFFFF0000u);         \
    for (int r = 0; r < R; r++) {                                                                        \
        const uint16_t *xr = (const uint16_t *)x + r * in + i;                                           \
        float xe = bf16_to_f32(xr[0]), xo = bf16_to_f32(xr[1]);                                          \
        for (int c = 0; c < 4; c++) acc[r][c] += xe * even[c] + xo * odd[c];                             \
    }
#endif
#define INPUTS_PER_STEP_f32 1
#define INPUTS_PER_STEP_bf16 2

/* y[r, 0:64] = act(bias[0:64] + sum_i x[r, i] * panel[i, 0:64]) for R rows of x (the panel's type); `valid`
 * outputs are written. Meanwhile, in each of the first `ahead` steps, the next `lines` cache lines from
 * `next` on are prefetched. */
#define PANEL_KERNEL(TYPE, R)                                                                            \
    static void panel_##TYPE##_##R(const void *x, int64_t in, const void *panel, const void *bias,       \
                                   void *y, int64_t ldy, int64_t valid, const char *next, int64_t ahead,  \
                                   int64_t lines, int64_t act) {                                       \
        v16 acc[R][4];                                                                                   \
        for (int r = 0; r < R; r++) bias_acc(bias, acc[r], IS_BF16_##TYPE);                            \
        for (int64_t i = 0, step = 0; i < in; i += INPUTS_PER_STEP_##TYPE, step++) {                     \
            for (int64_t l = 0; step < ahead && l < lines; l++)                                         \
                __builtin_prefetch(next + LINE * (step * lines + l), 0, 3);                              \
            STEP_##TYPE(R)                                                                               \
        }                                                                                                \
        for (int r = 0; r < R; r++)                                                                      \
            store_acc(acc[r], elem(y, r * ldy, IS_BF16_##TYPE), valid, IS_BF16_##TYPE, act);             \
    }
#define PANEL_KERNELS(TYPE)                                                                              \
    PANEL_KERNEL(TYPE, 1) PANEL_KERNEL(TYPE, 2) PANEL_KERNEL(TYPE, 3)                                    \
    PANEL_KERNEL(TYPE, 4) PANEL_KERNEL(TYPE, 5) PANEL_KERNEL(TYPE, 6)
PANEL_KERNELS(f32)
PANEL_KERNELS(bf16)
/* bf16 by a table of kernels per group size; fp32 by direct calls (run_jobs), which the compiler
 * inlines: the table cost fp32 1.5-4% at 32-64 rows per job */
typedef void panel_fn(const void *x, int64_t in, const void *panel, const void *bias, void *y, int64_t ldy,
                      int64_t valid, const char *next, int64_t ahead, int64_t lines,
                      int64_t act);
static panel_fn *const panels_bf16[MAX_GROUP] = {panel_bf16_1, panel_bf16_2, panel_bf16_3,
                                                 panel_bf16_4, panel_bf16_5, panel_bf16_6};

/* A unit (one job's rows over one panel) costs about its rows' multiply-adds plus the panel's read from
 * memory, worth ~10 rows: 8 experts' FFNs of d=512 on cold weights took 1.6x as long with 8 rows each
 * as with 1 (docs/kernels.md). */
#define PANEL_READ_ROWS 10
static int64_t unit_cost(const job_t *j) { return j->rows + PANEL_READ_ROWS; }

/* The first unit of this thread's contiguous share, units in order of job then block, shares of equal
 * cost (jobs' row counts differ: prefill's experts); `thread` = threads gives the end of the last. */
static int64_t first_unit(int64_t njobs, const job_t *jobs, int64_t blocks, int64_t total, int thread, int threads) {
    int64_t target = total * thread / threads, seen = 0; /* cost before the share starts */
    for (int64_t k = 0; k < njobs; k++) {
        int64_t c = unit_cost(jobs + k);
        if (seen + c * blocks > target) return k * blocks + (target - seen + c - 1) / c;
        seen += c * blocks;
    }
    return njobs * blocks;
}

void run_jobs(int64_t njobs, const job_t *jobs, int64_t out, int64_t in, int bf16) {
    int64_t blocks = (out + BLOCK - 1) / BLOCK, size = bf16 ? 2 : 4;
    int64_t panel_lines = in * BLOCK * size / LINE; /* cache lines of one panel */
    int64_t total = 0;
    for (int64_t k = 0; k < njobs; k++) total += unit_cost(jobs + k) * blocks;
    int thread = omp_get_thread_num(), threads = omp_get_num_threads();
    int64_t end = first_unit(njobs, jobs, blocks, total, thread + 1, threads);
    /* no barrier: the caller's region end or barrier waits for all */
    for (int64_t u = first_unit(njobs, jobs, blocks, total, thread, threads); u < end; u++) {
        const job_t *j = jobs + u / blocks;
        int64_t b = u % blocks, valid = out - b * BLOCK < BLOCK ? out - b * BLOCK : BLOCK;
        const char *panel = (const char *)j->w + b * in * BLOCK * size;
        const char *bias = j->bias ? (const char *)j->bias + b * BLOCK * size : NULL;
        float tail[BLOCK]; /* the last block's bias, zero-padded: the kernels load 64 values */
        if (bias && valid < BLOCK) {
            memset(tail, 0, sizeof tail);
            memcpy(tail, bias, (size_t)(valid * size));
            bias = (const char *)tail;
        }
        /* the panel of this thread's next unit, fetched in equal shares over this unit's passes when
         * there are two or more */
        int64_t passes = (j->rows + MAX_GROUP - 1) / MAX_GROUP;
        int64_t share = passes > 1 && u + 1 < end ? (panel_lines + passes - 1) / passes : 0;
        const job_t *nj = jobs + (u + 1) / blocks;
        const char *next = share ? (const char *)nj->w + (u + 1) % blocks * in * BLOCK * size : NULL;
        for (int64_t r = 0, pass = 0; r < j->rows; r += MAX_GROUP, pass++) {
            const char *ahead_at = next ? next + LINE * pass * share : NULL;
            int64_t ahead = next ? (panel_lines - pass * share < share ? panel_lines - pass * share : share) : 0;
            int64_t lines = 1;
            if (passes == 1) /* this panel's own lines, ahead of the reads */
                ahead_at = panel + STREAM_AHEAD, ahead = panel_lines / STEP_LINES, lines = STEP_LINES;
            int64_t group = j->rows - r < MAX_GROUP ? j->rows - r : MAX_GROUP;
            const char *x = (const char *)j->x + r * in * size;
            char *y = (char *)j->y + (r * out + b * BLOCK) * size;
            if (bf16) {
                panels_bf16[group - 1](x, in, panel, bias, y, out, valid, ahead_at, ahead, lines, j->act);
                continue;
            }
            switch (group) {
            case 1: panel_f32_1(x, in, panel, bias, y, out, valid, ahead_at, ahead, lines, j->act); break;
            case 2: panel_f32_2(x, in, panel, bias, y, out, valid, ahead_at, ahead, lines, j->act); break;
            case 3: panel_f32_3(x, in, panel, bias, y, out, valid, ahead_at, ahead, lines, j->act); break;
            case 4: panel_f32_4(x, in, panel, bias, y, out, valid, ahead_at, ahead, lines, j->act); break;
            case 5: panel_f32_5(x, in, panel, bias, y, out, valid, ahead_at, ahead, lines, j->act); break;
            default: panel_f32_6(x, in, panel, bias, y, out, valid, ahead_at, ahead, lines, j->act); break;
            }
        }
    }
}

/* 1 where bf16 jobs use the CPU's bf16 dot product (as fast as oneDNN's bf16 kernels at every row count
 * measured), 0 where they widen to fp32 multiply-adds (half that rate: decode's few rows only). */
int mc_bf16_dot(void) {
#ifdef __AVX512BF16__
    return 1;
#else
    return 0;
#endif
}

int jobs_valid(int64_t njobs, const job_t *jobs, int64_t out, int64_t in) {
    if (njobs < 0 || (njobs && !jobs) || out < 1 || in < 1) return 0;
    for (int64_t k = 0; k < njobs; k++)
        if (jobs[k].rows < 1 || !jobs[k].x || !jobs[k].w || !jobs[k].y || jobs[k].act < ACT_NONE || jobs[k].act > ACT_RELU)
            return 0;
    return 1;
}

int mc_packed_matmul(int64_t njobs, const job_t *jobs, int64_t out, int64_t in, int bf16, int threads) {
    if (!jobs_valid(njobs, jobs, out, in)) return MC_REFUSED;
#pragma omp parallel num_threads(threads)
    run_jobs(njobs, jobs, out, in, bf16);
    return MC_OK;
}
