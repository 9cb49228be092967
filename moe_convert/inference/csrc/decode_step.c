/* A decode step's small ops outside the matmuls (moe_convert/inference/native.py, runtime.py): the residual add with
 * the norm after it, and one new token's attention per sequence with its rotary embedding and KV-cache write.
 *
 * A decoder layer of a narrow model (d = 576) is a dozen torch ops of a few microseconds each around its
 * matmuls: with 30 layers they cost as much as streaming the weights. Each is one call here: the norm
 * reads a few rows once, and attention reads each sequence's cached keys and values once per query
 * head, its own share of the cache positions per sequence ([start, slot], `window` the newest of them),
 * grouped-query heads reading their key/value head in place.
 *
 * Rows are fp32, or bf16 (`bf16` 1; the cache is fp32 either way): bf16 values are widened as read and
 * each result is rounded once, except where torch rounds between two ops (the norm: x * rsqrt, then the
 * weight), which is done the same way here.
 */
#include <math.h>
#include <omp.h>
#include <stdlib.h>

#include "packed_matmul.h"
#include "vectors.h"

/* x (T, d) += delta (T, d) (when given); h (T, d) = norm(x) * w (+ b): RMS (`rms` 1, b NULL) as Llama's
 * RMSNorm, x * rsqrt(mean(x^2) + eps), or LayerNorm, (x - mean) * rsqrt(var + eps). x, delta, w, b, h all fp32
 * or all bf16. One thread: a few rows of a few hundred values. */
int mc_residual_norm(int64_t T, int64_t d, void *x, const void *delta, const void *w, const void *b, void *h, int rms,
                     float eps, int bf16) {
    if (T < 1 || d < 1 || !x || !w || !h)
        return MC_REFUSED;
    float *row = malloc(d * sizeof *row);
    if (!row)
        return MC_REFUSED;
    for (int64_t t = 0; t < T; t++) {
        double sum = 0, sq = 0;
        for (int64_t i = 0; i < d; i++) {
            float v = load1(x, t * d + i, bf16);
            if (delta) {
                v += load1(delta, t * d + i, bf16);
                store1(x, t * d + i, v, bf16);
                v = load1(x, t * d + i, bf16); /* the rounded sum, as torch's add leaves it */
            }
            row[i] = v;
            sum += v;
            sq += (double)v * v;
        }
        float mean = rms ? 0.0f : (float)(sum / d);
        float var = rms ? (float)(sq / d) : (float)(sq / d - (sum / d) * (sum / d));
        float r = 1.0f / sqrtf(var + eps);
        for (int64_t i = 0; i < d; i++) {
            float v = (row[i] - mean) * r;
            if (rms) /* torch: h.to(dtype), then weight * h in the dtype */
                v = load1(w, i, bf16) * (bf16 ? bf16_to_f32(f32_to_bf16(v)) : v);
            else
                v = v * load1(w, i, bf16) + (b ? load1(b, i, bf16) : 0.0f);
            store1(h, t * d + i, v, bf16);
        }
    }
    free(row);
    return MC_OK;
}

/* out = t * cos + rotate_half(t) * sin for one head of hd values (rotate_half(t) = (-t[hd/2:], t[:hd/2])), fp32. */
static void rotate(const float *t, const float *cos, const float *sin, int64_t hd, float *out) {
    int64_t half = hd / 2;
    for (int64_t j = 0; j < hd; j++)
        out[j] = t[j] * cos[j] + (j < half ? -t[j + half] : t[j - half]) * sin[j];
}

/* One new token's attention for each of B sequences.
 * qkv (B, (H + 2 Hkv) hd): the token's q, k, v heads side by side (fp32, or bf16: `bf16`);
 * cos, sin (positions, hd) fp32 rotary tables, or NULL (no rotary); pos[b] < positions the token's position in
 * sequence b;
 * k_cache, v_cache (B, Hkv, capacity, hd) fp32: the token's k (rotated) and v are written at `slot`, then
 * query head h attends over the cache positions [max(start[b], slot + 1 - window), slot] of its key/value
 * head h / (H / Hkv) (window 0: no limit), scores q.k * scale;
 * out (B, H hd) in qkv's type. */
int mc_attend_one(int64_t B, int64_t H, int64_t Hkv, int64_t hd, const void *qkv, int bf16, const float *cos,
                  const float *sin, int64_t positions, const int64_t *pos, float *k_cache, float *v_cache, int64_t capacity, int64_t slot,
                  const int64_t *start, int64_t window, float scale, void *out, int threads) {
    if (B < 1 || Hkv < 1 || H % Hkv || hd < 2 || hd % 2 || !qkv || !pos || !k_cache || !v_cache || !start || !out
        || slot < 0 || slot >= capacity || (!cos != !sin))
        return MC_REFUSED;
    for (int64_t b = 0; b < B; b++)
        if (start[b] < 0 || start[b] > slot || pos[b] < 0 || (cos && pos[b] >= positions))
            return MC_REFUSED;
    int64_t width = (H + 2 * Hkv) * hd, group = H / Hkv;
    /* the work is a few microseconds at short contexts: more threads only where it outweighs waking them */
    int64_t macs = B * H * (slot + 1) * hd * 2;
    int n = macs < (1 << 18) ? 1 : threads;
    int64_t each = 2 * hd + slot + 1; /* a thread's scratch: a head's values, rotated; its scores */
    float *scratch = malloc(n * each * sizeof *scratch);
    if (!scratch)
        return MC_REFUSED;
#pragma omp parallel num_threads(n)
    {
        float *head = scratch + omp_get_thread_num() * each, *rot = head + hd, *score = head + 2 * hd;
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * Hkv; bh++) { /* the new key and value into the cache */
            int64_t b = bh / Hkv, g = bh % Hkv, at = (bh * capacity + slot) * hd;
            for (int64_t j = 0; j < hd; j++) {
                head[j] = load1(qkv, b * width + (H + g) * hd + j, bf16);
                v_cache[at + j] = load1(qkv, b * width + (H + Hkv + g) * hd + j, bf16);
            }
            if (cos)
                rotate(head, cos + pos[b] * hd, sin + pos[b] * hd, hd, k_cache + at);
            else
                for (int64_t j = 0; j < hd; j++) k_cache[at + j] = head[j];
        } /* the implicit barrier: every key is in the cache before any head reads it */
#pragma omp for schedule(static)
        for (int64_t bh = 0; bh < B * H; bh++) {
            int64_t b = bh / H, h = bh % H, kv = (b * Hkv + h / group) * capacity * hd;
            int64_t lo = start[b], n_keys;
            if (window > 0 && slot + 1 - window > lo)
                lo = slot + 1 - window;
            n_keys = slot + 1 - lo;
            for (int64_t j = 0; j < hd; j++) head[j] = load1(qkv, b * width + h * hd + j, bf16);
            const float *q = head;
            if (cos) {
                rotate(head, cos + pos[b] * hd, sin + pos[b] * hd, hd, rot);
                q = rot;
            }
            float best = -INFINITY;
            for (int64_t p = 0; p < n_keys; p++) {
                const float *k = k_cache + kv + (lo + p) * hd;
                float s = 0;
                for (int64_t j = 0; j < hd; j++) s += q[j] * k[j];
                score[p] = s * scale;
                best = score[p] > best ? score[p] : best;
            }
            float total = 0;
            for (int64_t p = 0; p < n_keys; p++) total += score[p] = expf(score[p] - best);
            float acc[hd];
            for (int64_t j = 0; j < hd; j++) acc[j] = 0;
            for (int64_t p = 0; p < n_keys; p++) {
                const float *v = v_cache + kv + (lo + p) * hd;
                for (int64_t j = 0; j < hd; j++) acc[j] += score[p] * v[j];
            }
            for (int64_t j = 0; j < hd; j++) store1(out, bh * hd + j, acc[j] / total, bf16);
        }
    }
    free(scratch);
    return MC_OK;
}
