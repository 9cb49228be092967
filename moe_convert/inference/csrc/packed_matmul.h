/* The packed-weight matmul kernel's jobs (packed_matmul.c), shared with the decode layer (moe_decode.c). */
#include <stdint.h>

/* A job: y (rows, out) = act(x (rows, in) @ w^T + bias), x and y contiguous, bias NULL or (out,); all fp32,
 * or all bf16 (uint16 values); act one of vectors.h's ACT_* (ACT_NONE: none). */
typedef struct {
    int64_t rows;
    const void *x;
    const void *w; /* oneDNN-packed [out, in] */
    const void *bias;
    void *y;
    int64_t act;
} job_t;

/* Every job (same out, in, and type: bf16 = 1 for bf16, 0 for fp32), shared among the threads of the
 * enclosing OpenMP parallel region: call it from every thread of the region. A thread returns when its
 * share is done, without waiting for the others: the region's end, or an `omp barrier`, waits for all. */
void run_jobs(int64_t njobs, const job_t *jobs, int64_t out, int64_t in, int bf16);

/* 1 where every job can be run: shapes of at least one, x, w and y given (never NULL), an ACT_* code.
 * The entry points check it and return MC_REFUSED instead of reading through a bad address (Python
 * checks first: `native.packed_matmul`). */
int jobs_valid(int64_t njobs, const job_t *jobs, int64_t out, int64_t in);

#define MC_OK 0
#define MC_REFUSED 1
