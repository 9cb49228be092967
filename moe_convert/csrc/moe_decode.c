/* A PR-MoE layer's decode step (a few tokens, top-1) around the packed-weight kernel (moe_convert/decode.py).
 *
 * In decode the layer's cost is streaming the hit experts' and the residual FFN's weights. Done with
 * torch ops, the rest (router, softmax, top-1, the residual coefficient, sort, gather, combine) is a
 * dozen tiny ops that find code and data cold after the other layers' weights went through the
 * caches: ~0.4 ms of a ~2 ms step. Here it is plain C in two calls:
 *   phase 1: route every token, group the tokens by expert, run every first matmul (each hit expert's
 *            and the residual FFN's) in one pass over the weights;
 *   the caller applies the activation (torch's own, so its values are torch's);
 *   phase 2: run every second matmul, then the combine.
 * The expert and residual matmuls are the same jobs as `_native_ffns` runs (bit for bit); the router,
 * softmax and coefficient are computed here, in another order of summation than torch's (~1e-7).
 */
#include <math.h>
#include <string.h>

#include "packed_matmul.h"

#define MAX_TOKENS 8 /* = decode.MAX_TOKENS */

typedef float v16 __attribute__((vector_size(64), aligned(4)));

/* One FFN's packed matrices: act(x w1 + b1) w2 + b2 (GPT-2 kind) or (act(x w1) * x w_up) w2 (gated
 * kind, w_up not NULL); biases may be NULL. */
typedef struct {
    const float *w1, *b1, *w_up, *w2, *b2;
} ffn_t;

typedef struct {
    /* the layer, set once */
    int64_t d, f, experts;          /* d a multiple of 16 */
    const float *router;          /* (E, d) */
    const float *coef_w, *coef_b; /* (2, d), (2,): the residual mix; coef_w NULL: no residual FFN */
    const ffn_t *ffns;            /* E experts, then the residual FFN */
    float *xs;                    /* (T, d) the tokens' rows grouped by expert */
    float *h, *up;                /* (2T, f) first matmuls' outputs: the experts' rows, then the residual's */
    float *y;                     /* (2T, d) second matmuls' outputs, rows as h */
    /* the call */
    int64_t tokens;               /* T <= MAX_TOKENS */
    const float *x;               /* (T, d) */
    const float *act_h;           /* (2T, f) act(h) (gated: act(h) * up), set by the caller between the phases */
    float *out;                   /* (T, d) */
    /* phase 1's routing, for phase 2 and the caller */
    int64_t expert[MAX_TOKENS];   /* each token's expert */
    int64_t slot[MAX_TOKENS];     /* each token's row in the expert-grouped order */
    float scale[MAX_TOKENS];      /* its expert output's factor: gate probability (times coefficient 0) */
    float keep[MAX_TOKENS];       /* its residual output's factor: coefficient 1 */
} decode_t;

/* dot[t * rows + r] = bias[r] + x[t, :] . w[r, :] for T rows of x, w (rows, d) row-major, d a multiple of 16. */
static void dots(const float *x, int64_t T, const float *w, const float *bias, int64_t rows, int64_t d, float *dot) {
    for (int64_t r = 0; r < rows; r++) {
        const float *wr = w + r * d;
        v16 acc[MAX_TOKENS];
        for (int64_t t = 0; t < T; t++) acc[t] = (v16){0};
        for (int64_t i = 0; i < d; i += 16) {
            v16 wv = *(const v16 *)(wr + i);
            for (int64_t t = 0; t < T; t++) acc[t] += *(const v16 *)(x + t * d + i) * wv;
        }
        for (int64_t t = 0; t < T; t++) {
            float s = bias ? bias[r] : 0.0f;
            for (int c = 0; c < 16; c++) s += acc[t][c];
            dot[t * rows + r] = s;
        }
    }
}

/* 1 / sum_i exp(v[i] - v[best]), best the first index of the largest of n values (in *best): softmax's
 * probability i is exp(v[i] - v[best]) times it, as torch computes it. */
static float softmax_scale(const float *v, int64_t n, int64_t *best) {
    *best = 0;
    for (int64_t i = 1; i < n; i++)
        if (v[i] > v[*best]) *best = i;
    float sum = 0.0f;
    for (int64_t i = 0; i < n; i++) sum += expf(v[i] - v[*best]);
    return 1.0f / sum;
}

/* Route each token (top-1, as `kernels.route`: the first most probable expert) and group the tokens by
 * expert, stable: slot[t] counts the tokens of smaller experts, and the earlier tokens of its own. */
static void route(decode_t *s, float *logits) {
    int64_t T = s->tokens, E = s->experts;
    float coef[2 * MAX_TOKENS];
    dots(s->x, T, s->router, NULL, E, s->d, logits);
    if (s->coef_w) dots(s->x, T, s->coef_w, s->coef_b, 2, s->d, coef);
    for (int64_t t = 0; t < T; t++) {
        float p = softmax_scale(logits + t * E, E, &s->expert[t]); /* the top probability: exp(0) times the scale */
        s->scale[t] = p, s->keep[t] = 0.0f;
        if (s->coef_w) { /* softmax over the two coefficients */
            int64_t top;
            float *z = coef + 2 * t, c = softmax_scale(z, 2, &top);
            s->scale[t] = p * (expf(z[0] - z[top]) * c), s->keep[t] = expf(z[1] - z[top]) * c;
        }
    }
    for (int64_t t = 0; t < T; t++) {
        s->slot[t] = 0;
        for (int64_t u = 0; u < T; u++)
            s->slot[t] += s->expert[u] < s->expert[t] || (s->expert[u] == s->expert[t] && u < t);
        memcpy(s->xs + s->slot[t] * s->d, s->x + t * s->d, (size_t)s->d * sizeof(float));
    }
}

/* The jobs of one FFN over `rows` rows starting at row `row` of h/up/y: phase 1 x @ w1 (and x @ w_up)
 * into h (and up), phase 2 act_h @ w2 into y. Returns how many. */
static int64_t ffn_jobs(const decode_t *s, int phase, const ffn_t *w, int64_t rows, const float *x, int64_t row,
                        job_t *jobs) {
    if (phase == 2) {
        jobs[0] = (job_t){rows, s->act_h + row * s->f, w->w2, w->b2, s->y + row * s->d};
        return 1;
    }
    jobs[0] = (job_t){rows, x, w->w1, w->b1, s->h + row * s->f};
    if (!w->w_up) return 1;
    jobs[1] = (job_t){rows, x, w->w_up, NULL, s->up + row * s->f};
    return 2;
}

/* A phase's jobs: each hit expert's on its run of grouped tokens, then the residual FFN's on all T. */
static int64_t phase_jobs(const decode_t *s, int phase, job_t *jobs) {
    int64_t T = s->tokens, n = 0, by_slot[MAX_TOKENS], rows;
    for (int64_t t = 0; t < T; t++) by_slot[s->slot[t]] = s->expert[t];
    for (int64_t r = 0; r < T; r += rows) {
        for (rows = 1; r + rows < T && by_slot[r + rows] == by_slot[r]; rows++) continue;
        n += ffn_jobs(s, phase, s->ffns + by_slot[r], rows, s->xs + r * s->d, r, jobs + n);
    }
    if (s->coef_w) n += ffn_jobs(s, phase, s->ffns + s->experts, T, s->x, T, jobs + n);
    return n;
}

/* out[t] = keep[t] * residual's y + scale[t] * expert's y, each product rounded as torch's two
 * multiplications in `kernels.combine` are (no fused multiply-add). */
__attribute__((optimize("fp-contract=off"))) static void combine_row(const decode_t *s, int64_t t) {
    const float *expert = s->y + s->slot[t] * s->d, *dense = s->y + (s->tokens + t) * s->d;
    float *out = s->out + t * s->d, keep = s->keep[t], scale = s->scale[t];
    if (!s->coef_w) {
        for (int64_t i = 0; i < s->d; i++) out[i] = scale * expert[i];
    } else {
        for (int64_t i = 0; i < s->d; i++) out[i] = keep * dense[i] + scale * expert[i];
    }
}

void mc_moe_decode_first(decode_t *s, int threads) {
    job_t jobs[2 * (MAX_TOKENS + 1)]; /* two matrices per FFN at most */
    int64_t njobs = 0;
    float logits[MAX_TOKENS * s->experts];
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        {
            route(s, logits);
            njobs = phase_jobs(s, 1, jobs);
        }
        run_jobs(njobs, jobs, s->f, s->d);
    }
}

void mc_moe_decode_second(decode_t *s, int threads) {
    job_t jobs[MAX_TOKENS + 1];
    int64_t njobs = phase_jobs(s, 2, jobs);
#pragma omp parallel num_threads(threads)
    {
        run_jobs(njobs, jobs, s->d, s->f);
#pragma omp for schedule(static)
        for (int64_t t = 0; t < s->tokens; t++) combine_row(s, t);
    }
}
