/* The packed-weight matmul kernel's jobs (packed_matmul.c), shared with the decode layer (moe_decode.c). */
#include <stdint.h>

/* A job: y (rows, out) = x (rows, in) @ w^T + bias, x and y contiguous, bias NULL or (out,). */
typedef struct {
    int64_t rows;
    const float *x;
    const float *w; /* oneDNN-packed [out, in] */
    const float *bias;
    float *y;
} job_t;

/* Every job (same out, in), shared among the threads of the enclosing OpenMP parallel region: call it
 * from every thread of the region; it returns when all jobs are done. */
void run_jobs(int64_t njobs, const job_t *jobs, int64_t out, int64_t in);
