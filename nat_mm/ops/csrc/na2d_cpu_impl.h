/* Body of na2d_cpu.c for one floating type: REAL, EXP and FN(name) are defined by the includer.
 *
 * head_dim is a multiple of LANES (the caller pads) and at most MAX_DIM, so every row of q, k, v
 * is a whole number of 32-byte vectors; a query's accumulators are local vector arrays. Per-query
 * work is written once as always-inline functions taking `dim`; the row loops call them with the
 * literal 32 (every NAT / DiNAT layer has head_dim 32), so the compiler unrolls them and keeps the
 * accumulators in registers, and otherwise with the runtime head_dim. */

typedef REAL FN(vec) __attribute__((vector_size(32)));
#define LANES ((int64_t)(32 / sizeof(REAL)))
#define INLINE static inline __attribute__((always_inline))

INLINE FN(vec) FN(load)(const REAL *from) {
    FN(vec) value;
    memcpy(&value, from, sizeof(value)); /* unaligned load */
    return value;
}

INLINE void FN(store)(REAL *to, FN(vec) value) { memcpy(to, &value, sizeof(value)); }

INLINE REAL FN(dot)(const REAL *a, const REAL *b, const int64_t dim) {
    FN(vec) sum = FN(load)(a) * FN(load)(b);
    for (int64_t d = LANES; d < dim; d += LANES) sum += FN(load)(a + d) * FN(load)(b + d);
    REAL total = 0;
    for (int64_t lane = 0; lane < LANES; ++lane) total += sum[lane];
    return total;
}

/* Softmax weights of query (b, y, x, h) over its window: probs[a * Kw + c]. */
INLINE void FN(window_probs)(const na2d_geometry *g, const REAL *q, const REAL *k,
                             const REAL *rpb, REAL scale, int64_t b, int64_t y, int64_t x,
                             int64_t h, REAL *probs, const int64_t dim) {
    const REAL *query = q + pixel_offset(g, b, y, x, h);
    const int64_t rpb_w = 2 * g->kernel_w - 1;
    const int64_t step = key_step(g);
    for (int32_t a = 0; a < g->kernel_h; ++a) {
        const REAL *bias = NULL;
        if (rpb != NULL) {
            const int64_t bias_row = (int64_t)h * (2 * g->kernel_h - 1) + g->row_bias[y] + a;
            bias = rpb + bias_row * rpb_w + g->col_bias[x];
        }
        const REAL *key = k + window_row(g, b, y, x, h, a);
        REAL *logits = probs + a * g->kernel_w;
        for (int32_t c = 0; c < g->kernel_w; ++c, key += step) {
            logits[c] = FN(dot)(query, key, dim) * scale + (bias != NULL ? bias[c] : 0);
        }
    }
    const int32_t window = g->kernel_h * g->kernel_w;
    REAL max_logit = probs[0];
    for (int32_t n = 1; n < window; ++n) max_logit = probs[n] > max_logit ? probs[n] : max_logit;
    REAL total = 0;
#pragma omp simd reduction(+ : total)
    for (int32_t n = 0; n < window; ++n) {
        probs[n] = EXP(probs[n] - max_logit);
        total += probs[n];
    }
    const REAL inverse = 1 / total;
    for (int32_t n = 0; n < window; ++n) probs[n] *= inverse;
}

INLINE void FN(forward_query)(const na2d_geometry *g, const REAL *q, const REAL *k, const REAL *v,
                              const REAL *rpb, REAL scale, REAL *out, int64_t b, int64_t y,
                              int64_t x, int64_t h, REAL *probs, const int64_t dim) {
    FN(window_probs)(g, q, k, rpb, scale, b, y, x, h, probs, dim);
    FN(vec) result[MAX_DIM / LANES];
    const int64_t chunks = dim / LANES;
    for (int64_t j = 0; j < chunks; ++j) result[j] = (FN(vec)){0};
    const int64_t step = key_step(g);
    for (int32_t a = 0; a < g->kernel_h; ++a) {
        const REAL *value = v + window_row(g, b, y, x, h, a);
        const REAL *row_probs = probs + a * g->kernel_w;
        for (int32_t c = 0; c < g->kernel_w; ++c, value += step) {
            const REAL p = row_probs[c];
            for (int64_t j = 0; j < chunks; ++j) result[j] += p * FN(load)(value + j * LANES);
        }
    }
    REAL *destination = out + pixel_offset(g, b, y, x, h);
    for (int64_t j = 0; j < chunks; ++j) FN(store)(destination + j * LANES, result[j]);
}

/* One query row of one head, columns in sub-lattice order (neighbors share keys: cache reuse).
 * Probabilities go to `saved` (the query's slot of [B, H, W, heads, Kh * Kw]) when it is not NULL,
 * for the backward; else to `scratch`. */
static void FN(forward_row)(const na2d_geometry *g, const REAL *q, const REAL *k, const REAL *v,
                            const REAL *rpb, REAL scale, REAL *out, REAL *saved, int64_t b,
                            int64_t y, int64_t h, REAL *scratch) {
    const int64_t window = g->kernel_h * g->kernel_w;
    for (int64_t i = 0; i < g->width; ++i) {
        const int64_t x = g->col_order[i];
        REAL *probs = saved != NULL ? saved + query_index(g, b, y, x, h) * window : scratch;
        if (g->dim == 32)
            FN(forward_query)(g, q, k, v, rpb, scale, out, b, y, x, h, probs, 32);
        else
            FN(forward_query)(g, q, k, v, rpb, scale, out, b, y, x, h, probs, g->dim);
    }
}

/* saved_probs: NULL, or [B, H, W, heads, Kh * Kw] to keep the probabilities for the backward. */
void FN(na2d_forward)(const na2d_geometry *g, const REAL *q, const REAL *k, const REAL *v,
                      const REAL *rpb, double scale, REAL *out, REAL *saved_probs,
                      int32_t threads) {
    const int64_t items = g->batch * g->heads * g->height;
    const int32_t window = g->kernel_h * g->kernel_w;
#pragma omp parallel num_threads(threads)
    {
        REAL *probs = malloc(sizeof(REAL) * window);
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item) {
            const int64_t y = g->row_order[item % g->height];
            const int64_t h = (item / g->height) % g->heads;
            const int64_t b = item / (g->height * g->heads);
            FN(forward_row)(g, q, k, v, rpb, (REAL)scale, out, saved_probs, b, y, h, probs);
        }
        free(probs);
    }
}

/* Backward of one query: grad_q written, grad_k / grad_v accumulated, and the RPB gradient of
 * head h accumulated into grad_rpb_head ([2Kh-1, 2Kw-1]; NULL when not needed). */
INLINE void FN(backward_query)(const na2d_geometry *g, const REAL *q, const REAL *k, const REAL *v,
                               const REAL *saved_probs, REAL scale, const REAL *grad_out,
                               REAL *grad_q, REAL *grad_k, REAL *grad_v, REAL *grad_rpb_head,
                               int64_t b,
                               int64_t y, int64_t x, int64_t h, REAL *grad_probs,
                               const int64_t dim) {
    const int64_t chunks = dim / LANES;
    const int64_t offset = pixel_offset(g, b, y, x, h);
    const REAL *query = q + offset;
    const REAL *grad_result = grad_out + offset;
    const REAL *probs = saved_probs + query_index(g, b, y, x, h) * g->kernel_h * g->kernel_w;
    /* d logits = P * (dO . V - sum_n P dO . V); the sum equals dO . O. */
    const int64_t step = key_step(g);
    REAL delta = 0;
    for (int32_t a = 0; a < g->kernel_h; ++a) {
        const REAL *value = v + window_row(g, b, y, x, h, a);
        for (int32_t c = 0, n = a * g->kernel_w; c < g->kernel_w; ++c, ++n, value += step) {
            grad_probs[n] = FN(dot)(grad_result, value, dim);
            delta += probs[n] * grad_probs[n];
        }
    }
    FN(vec) grad_query[MAX_DIM / LANES];
    for (int64_t j = 0; j < chunks; ++j) grad_query[j] = (FN(vec)){0};
    const int64_t rpb_w = 2 * g->kernel_w - 1;
    for (int32_t a = 0; a < g->kernel_h; ++a) {
        int64_t slot = window_row(g, b, y, x, h, a);
        REAL *bias_grad = NULL;
        if (grad_rpb_head != NULL)
            bias_grad = grad_rpb_head + (int64_t)(g->row_bias[y] + a) * rpb_w + g->col_bias[x];
        for (int32_t c = 0, n = a * g->kernel_w; c < g->kernel_w; ++c, ++n, slot += step) {
            const REAL grad_logit = probs[n] * (grad_probs[n] - delta);
            const REAL grad_dot = grad_logit * scale;
            const REAL p = probs[n];
            for (int64_t j = 0; j < chunks; ++j) {
                REAL *grad_key = grad_k + slot + j * LANES;
                REAL *grad_value = grad_v + slot + j * LANES;
                grad_query[j] += grad_dot * FN(load)(k + slot + j * LANES);
                FN(store)(grad_key, FN(load)(grad_key) + grad_dot * FN(load)(query + j * LANES));
                FN(store)(grad_value, FN(load)(grad_value) + p * FN(load)(grad_result + j * LANES));
            }
            if (bias_grad != NULL) bias_grad[c] += grad_logit;
        }
    }
    for (int64_t j = 0; j < chunks; ++j) FN(store)(grad_q + offset + j * LANES, grad_query[j]);
}

static void FN(backward_row)(const na2d_geometry *g, const REAL *q, const REAL *k, const REAL *v,
                             const REAL *saved_probs, REAL scale, const REAL *grad_out,
                             REAL *grad_q, REAL *grad_k, REAL *grad_v, REAL *grad_rpb_head,
                             int64_t b,
                             int64_t y, int64_t h, REAL *grad_probs) {
    if (g->dim == 32) {
        for (int64_t i = 0; i < g->width; ++i)
            FN(backward_query)(g, q, k, v, saved_probs, scale, grad_out, grad_q, grad_k, grad_v,
                               grad_rpb_head, b, y, g->col_order[i], h, grad_probs, 32);
    } else {
        for (int64_t i = 0; i < g->width; ++i)
            FN(backward_query)(g, q, k, v, saved_probs, scale, grad_out, grad_q, grad_k, grad_v,
                               grad_rpb_head, b, y, g->col_order[i], h, grad_probs, g->dim);
    }
}

/* saved_probs: the forward's. grad_k, grad_v and grad_rpb must be zero on entry; grad_rpb may be
 * NULL (not needed).
 *
 * Queries scatter into the keys of their windows, so work is split into items that write disjoint
 * memory: one (batch, head, row residue modulo the dilation, stripe of 2 * Kh sub-lattice rows).
 * Windows of stripes two apart never overlap (windows reach Kh - 1 rows, shifted inward at most
 * Kh / 2 at borders), so even stripes run in parallel, then odd ones. Each item sums its RPB
 * gradient privately; the items' sums are added in item order, so the result does not depend on the
 * number of threads or on which thread ran which item. */
void FN(na2d_backward)(const na2d_geometry *g, const REAL *q, const REAL *k, const REAL *v,
                       const REAL *saved_probs, double scale, const REAL *grad_out, REAL *grad_q,
                       REAL *grad_k, REAL *grad_v, REAL *grad_rpb, int32_t threads) {
    const int32_t window = g->kernel_h * g->kernel_w;
    const int64_t head_rpb_size = (2 * g->kernel_h - 1) * (2 * g->kernel_w - 1);
    const int64_t stripe = 2 * (int64_t)g->kernel_h;
    const int64_t dilation = g->dilation_h;
    const int64_t longest = (g->height + dilation - 1) / dilation; /* sub-lattice rows, at most */
    const int64_t stripes = (longest + stripe - 1) / stripe;
    const int64_t pairs = (stripes + 1) / 2;
    const int64_t items = g->batch * g->heads * dilation * pairs;
    /* One RPB partial per (parity, item). */
    REAL *rpb_partial =
        grad_rpb != NULL ? calloc((size_t)(2 * items * head_rpb_size), sizeof(REAL)) : NULL;
#pragma omp parallel num_threads(threads)
    {
        REAL *grad_probs = malloc(sizeof(REAL) * window);
        for (int64_t parity = 0; parity < 2; ++parity) {
#pragma omp for schedule(dynamic)
            for (int64_t item = 0; item < items; ++item) {
                int64_t rest = item;
                const int64_t pair = rest % pairs;
                rest /= pairs;
                const int64_t residue = rest % dilation;
                rest /= dilation;
                const int64_t h = rest % g->heads;
                const int64_t b = rest / g->heads;
                const int64_t first = (2 * pair + parity) * stripe;
                REAL *item_rpb = rpb_partial != NULL
                                     ? rpb_partial + (parity * items + item) * head_rpb_size
                                     : NULL;
                for (int64_t p = first; p < first + stripe; ++p) {
                    const int64_t y = residue + p * dilation;
                    if (y >= g->height) break;
                    FN(backward_row)(g, q, k, v, saved_probs, (REAL)scale, grad_out, grad_q,
                                     grad_k, grad_v, item_rpb, b, y, h, grad_probs);
                }
            }
        }
        free(grad_probs);
    }
    if (rpb_partial != NULL) {
        for (int64_t slot = 0; slot < 2 * items; ++slot) {
            const int64_t h = (slot % items) / (pairs * dilation) % g->heads;
            const REAL *partial = rpb_partial + slot * head_rpb_size;
            for (int64_t i = 0; i < head_rpb_size; ++i)
                grad_rpb[h * head_rpb_size + i] += partial[i];
        }
        free(rpb_partial);
    }
}

#undef LANES
#undef INLINE
