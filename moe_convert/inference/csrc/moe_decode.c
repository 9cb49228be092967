/* A PR-MoE layer's decode step (a few tokens, top-k) around the packed-weight kernel (moe_convert/inference/decode.py).
 *
 * In decode the layer's cost is streaming the hit experts' and the residual FFN's weights. Done with
 * torch ops, the rest (router, softmax, top-k, the residual coefficient, sort, gather, combine) is a
 * dozen tiny ops that find code and data cold after the other layers' weights went through the
 * caches: ~0.4 ms of a ~2 ms step. Here it is plain C in two calls:
 *   phase 1: route every token, group its assignments by expert, run every first matmul (each hit
 *            expert's and the residual FFN's) in one pass over the weights, with the activation where
 *            the kernel has it (`act`);
 *   the caller applies the activation otherwise (torch's), and the gated kind's product;
 *   phase 2: run every second matmul, then the combine.
 * The expert and residual matmuls are the same jobs as `_native_ffns` runs (bit for bit); the router,
 * softmax and coefficient are computed here, in another order of summation than torch's (~1e-7).
 * Tensors are fp32, or all bf16 (`bf16`): then the router, the coefficient and the combine still
 * compute in fp32, and each output is rounded to bf16 once (torch rounds after each of the
 * coefficient's and the combine's bf16 ops).
 */
#include <float.h>
#include <math.h>
#include <string.h>

#include "packed_matmul.h"
#include "vectors.h"

#define MAX_TOKENS 8                    /* = decode.MAX_TOKENS */
#define MAX_K 4                         /* = decode.MAX_TOP_K: experts per token */
#define MAX_ASSIGN (MAX_TOKENS * MAX_K) /* (token, choice) assignments */

/* One FFN's packed matrices: act(x w1 + b1) w2 + b2 (GPT-2 kind) or (act(x w1) * x w_up) w2 (gated
 * kind, w_up not NULL); biases may be NULL. */
typedef struct {
    const void *w1, *b1, *w_up, *w2, *b2;
} ffn_t;

typedef struct {
    /* the layer, set once */
    int64_t d, f, experts, top_k; /* d a multiple of 16; k <= MAX_K, k <= E */
    int64_t bf16;                 /* every tensor below is bf16 (1) or fp32 (0) */
    int64_t act;                  /* the activation phase 1 applies to x w1 (+ b1) (ACT_*; ACT_NONE: the caller's) */
    const void *router;           /* (E, d) */
    const void *coef_w, *coef_b;  /* (2, d), (2,): the residual mix; coef_w NULL: no residual FFN */
    const ffn_t *ffns;            /* E experts, then the residual FFN */
    void *xs;                     /* (kT, d) the assignments' rows grouped by expert */
    void *h, *up;                 /* (kT + T, f) first matmuls' outputs: the experts' rows, then the residual's */
    void *y;                      /* (kT + T, d) second matmuls' outputs, rows as h */
    /* the call */
    int64_t tokens;               /* T <= MAX_TOKENS */
    const void *x;                /* (T, d) */
    const void *act_h;            /* (kT + T, f) act(h) (gated: act(h) * up), set by the caller between the phases */
    void *out;                    /* (T, d) */
    /* phase 1's routing, for phase 2 and the caller; assignment a = c T + t is token t's c-th choice */
    int64_t expert[MAX_ASSIGN];   /* each assignment's expert */
    int64_t slot[MAX_ASSIGN];     /* its row in the expert-grouped order */
    float scale[MAX_ASSIGN];      /* its expert output's factor: gate weight (times coefficient 0) */
    float keep[MAX_TOKENS];       /* each token's residual output's factor: coefficient 1 */
} decode_t;

/* dot[t * rows + r] = bias[r] + x[t, :] . w[r, :] in fp32 for T rows of x, w (rows, d) row-major (all fp32,
 * or all bf16), d a multiple of 16. */
static void dots(const void *x, int64_t T, const void *w, const void *bias, int64_t rows, int64_t d, int bf16,
                 float *dot) {
    for (int64_t r = 0; r < rows; r++) {
        v16 acc[MAX_TOKENS];
        for (int64_t t = 0; t < T; t++) acc[t] = (v16){0};
        for (int64_t i = 0; i < d; i += 16) {
            v16 wv = load16(elem(w, r * d + i, bf16), bf16);
            for (int64_t t = 0; t < T; t++) acc[t] += load16(elem(x, t * d + i, bf16), bf16) * wv;
        }
        for (int64_t t = 0; t < T; t++) {
            float s = bias ? load1(bias, r, bf16) : 0.0f;
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

/* Route each token as `routing.route` does (dropless): its k most probable experts, the first of equal
 * ones first; top-1 combines with the probability, top-k > 1 with the probabilities renormalised over
 * the k. Then group the assignments by expert, stable in the choice-major order a = c T + t: slot[a]
 * counts the assignments of smaller experts, and the earlier ones of its own. */
static void route(decode_t *s, float *logits) {
    int64_t T = s->tokens, E = s->experts, k = s->top_k;
    float coef[2 * MAX_TOKENS];
    dots(s->x, T, s->router, NULL, E, s->d, s->bf16, logits);
    if (s->coef_w) dots(s->x, T, s->coef_w, s->coef_b, 2, s->d, s->bf16, coef);
    for (int64_t t = 0; t < T; t++) {
        const float *l = logits + t * E;
        int64_t *chosen = s->expert + t; /* chosen[c * T]: choice c */
        float p[MAX_K], sum = 0.0f, c0 = 1.0f, scale = softmax_scale(l, E, &chosen[0]);
        for (int64_t c = 1; c < k; c++) { /* the next largest logit not chosen yet, the first of equal ones */
            int64_t next = -1;
            for (int64_t e = 0; e < E; e++) {
                int taken = 0;
                for (int64_t b = 0; b < c; b++) taken |= chosen[b * T] == e;
                if (!taken && (next < 0 || l[e] > l[next])) next = e;
            }
            chosen[c * T] = next;
        }
        for (int64_t c = 0; c < k; c++) {
            p[c] = expf(l[chosen[c * T]] - l[chosen[0]]) * scale; /* softmax's probability */
            sum += p[c];
        }
        s->keep[t] = 0.0f;
        if (s->coef_w) { /* softmax over the two coefficients */
            int64_t top;
            float *z = coef + 2 * t, cs = softmax_scale(z, 2, &top);
            c0 = expf(z[0] - z[top]) * cs, s->keep[t] = expf(z[1] - z[top]) * cs;
        }
        sum = sum > FLT_EPSILON ? sum : FLT_EPSILON;
        for (int64_t c = 0; c < k; c++) s->scale[c * T + t] = (k > 1 ? p[c] / sum : p[c]) * c0;
    }
    for (int64_t a = 0; a < k * T; a++) {
        s->slot[a] = 0;
        for (int64_t b = 0; b < k * T; b++)
            s->slot[a] += s->expert[b] < s->expert[a] || (s->expert[b] == s->expert[a] && b < a);
        memcpy(elem(s->xs, s->slot[a] * s->d, s->bf16), elem(s->x, a % T * s->d, s->bf16),
               (size_t)(s->d * (s->bf16 ? 2 : 4)));
    }
}

/* The jobs of one FFN over `rows` rows starting at row `row` of h/up/y: phase 1 act(x @ w1 + b1) (and
 * x @ w_up) into h (and up), phase 2 act_h @ w2 into y. Returns how many. */
static int64_t ffn_jobs(const decode_t *s, int phase, const ffn_t *w, int64_t rows, const void *x, int64_t row,
                        job_t *jobs) {
    if (phase == 2) {
        jobs[0] = (job_t){rows, elem(s->act_h, row * s->f, s->bf16), w->w2, w->b2, elem(s->y, row * s->d, s->bf16),
                          ACT_NONE};
        return 1;
    }
    jobs[0] = (job_t){rows, x, w->w1, w->b1, elem(s->h, row * s->f, s->bf16), s->act};
    if (!w->w_up) return 1;
    jobs[1] = (job_t){rows, x, w->w_up, NULL, elem(s->up, row * s->f, s->bf16), ACT_NONE};
    return 2;
}

/* A phase's jobs: each hit expert's on its run of grouped assignments, then the residual FFN's on all T. */
static int64_t phase_jobs(const decode_t *s, int phase, job_t *jobs) {
    int64_t T = s->tokens, kT = s->top_k * T, n = 0, by_slot[MAX_ASSIGN], rows;
    for (int64_t a = 0; a < kT; a++) by_slot[s->slot[a]] = s->expert[a];
    for (int64_t r = 0; r < kT; r += rows) {
        for (rows = 1; r + rows < kT && by_slot[r + rows] == by_slot[r]; rows++) continue;
        n += ffn_jobs(s, phase, s->ffns + by_slot[r], rows, elem(s->xs, r * s->d, s->bf16), r, jobs + n);
    }
    if (s->coef_w) n += ffn_jobs(s, phase, s->ffns + s->experts, T, s->x, kT, jobs + n);
    return n;
}

/* out[t] = keep[t] * residual's y (0 without one), then + scale[a] * y of each of its assignments a in slot
 * order: in fp32, the order and rounding of `routing.combine` (its scale, then index_add_ over the
 * sorted assignments; no fused multiply-add); in bf16, the same sums in fp32, rounded once. */
__attribute__((optimize("fp-contract=off"))) static void combine_row(const decode_t *s, int64_t t) {
    int64_t T = s->tokens, k = s->top_k, d = s->d, mine[MAX_K];
    int bf16 = (int)s->bf16;
    for (int64_t c = 0; c < k; c++) { /* token t's assignments by slot (insertion sort of k) */
        int64_t a = c * T + t, i = c;
        for (; i > 0 && s->slot[mine[i - 1]] > s->slot[a]; i--) mine[i] = mine[i - 1];
        mine[i] = a;
    }
    for (int64_t i = 0; i < d; i += 16) {
        v16 out = s->coef_w ? s->keep[t] * load16(elem(s->y, (k * T + t) * d + i, bf16), bf16) : (v16){0};
        for (int64_t c = 0; c < k; c++)
            out += s->scale[mine[c]] * load16(elem(s->y, s->slot[mine[c]] * d + i, bf16), bf16);
        store16(elem(s->out, t * d + i, bf16), out, bf16);
    }
}

/* 1 where the state can be run (`decode.Decoder` builds it from registered weights only): every buffer and
 * matrix given, sizes in range; phase 2 also needs the caller's act_h. */
static int state_valid(const decode_t *s, int phase) {
    if (!s || s->tokens < 1 || s->tokens > MAX_TOKENS || s->top_k < 1 || s->top_k > MAX_K || s->top_k > s->experts
        || s->d < 16 || s->d % 16 || s->f < 1 || !s->router || !s->ffns || !s->xs || !s->h || !s->y || !s->x
        || !s->out || (phase == 2 && !s->act_h) || (s->coef_w && !s->coef_b))
        return 0;
    for (int64_t e = 0; e < s->experts + (s->coef_w != NULL); e++)
        if (!s->ffns[e].w1 || !s->ffns[e].w2) return 0;
    return 1;
}

int mc_moe_decode_first(decode_t *s, int threads) {
    if (!state_valid(s, 1)) return MC_REFUSED;
    job_t jobs[2 * (MAX_ASSIGN + 1)]; /* two matrices per FFN at most */
    int64_t njobs = 0;
    float logits[MAX_TOKENS * s->experts];
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        {
            route(s, logits);
            njobs = phase_jobs(s, 1, jobs);
        }
        run_jobs(njobs, jobs, s->f, s->d, (int)s->bf16);
    }
    return MC_OK;
}

int mc_moe_decode_second(decode_t *s, int threads) {
    if (!state_valid(s, 2)) return MC_REFUSED;
    job_t jobs[MAX_ASSIGN + 1];
    int64_t njobs = phase_jobs(s, 2, jobs);
#pragma omp parallel num_threads(threads)
    {
        run_jobs(njobs, jobs, s->d, s->f, (int)s->bf16);
#pragma omp barrier /* every y row written before the combine reads it */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < s->tokens; t++) combine_row(s, t);
    }
    return MC_OK;
}
