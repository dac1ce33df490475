/* The algorithm of na2d_cpu.c for one arithmetic type: REAL, VEC, LANES, CHUNK, EXP, MAX,
 * ALL_SUM, ALL_MAX, NEG_BIG, REDUCE, LITERALS and FN(name) are defined by the includer. Tensors
 * are read and written a row at a time through `FN(row_io)`, the only code that knows their
 * storage type.
 *
 * head_dim is a multiple of CHUNK (the caller pads it otherwise) and at most MAX_DIM; the window
 * has at most MAX_WINDOW slots. Per-query work is written once as always-inline functions taking
 * `window` and `chunks`; the row loops call them with literals for NAT / DiNAT's 7x7 windows and
 * head_dim 32 (float32 arithmetic only), so the compiler unrolls them and keeps the accumulators
 * in registers, and otherwise with the runtime values.
 *
 * Rows are buffered. Each thread copies the rows that its current query row needs (the window
 * rows of k and v, the row's q, and in the backward its dO) into rings of rows, converted to REAL,
 * one head only, columns in sub-lattice order: a window row is then a run of consecutive vectors;
 * results go to row buffers, converted and stored a row at a time.
 * In place, one head's keys sit a whole pixel apart (all heads' channels: a power of two bytes,
 * or 3 * C * 4 in a qkv projection), crowd into a few L1 cache sets and no longer fit. Query rows
 * are visited in sub-lattice order, so consecutive rows share all but one buffered key row.
 *
 * Forward, per query: the window's dot products q . k, LANES at a time (one shuffle tree sums
 * LANES of them: REDUCE), the softmax, and the weighted sum of the values. Nothing is kept for the
 * backward but q, k and v.
 *
 * Backward, per (batch, head, sub-lattice of rows), rows in order:
 *   1. per query row: the forward's probabilities again (the same code, so the same bits), d
 *      logits = P * (dO . V - sum_n P dO . V), the gradient of q and the row's RPB gradient; the
 *      row's q, dO, P and d logits stay in the ring of query rows;
 *   2. as soon as the last query row that sees a key row is done: for each key of that row, the
 *      gradients of k and v, summed in registers over the queries whose window holds it (the
 *      inverse tables of the geometry). Each (query, key) pair is read once, where scattering
 *      from the queries would read and write the key's gradient Kh * Kw times.
 * Recomputing the probabilities costs about what reading them back would (memory runs at ~10 GB/s
 * per core) and keeps Kh * Kw numbers per query and head out of memory between forward and
 * backward. A sequence of rows can be split into chunks, each also recomputing the few query rows
 * around it that its key rows need (their d logits only): the same bits whichever chunk computes
 * them, so the result never depends on the chunking or the number of threads. */

#define MAX_GROUPS (MAX_WINDOW / LANES)
#define QUERIES 2 /* queries computed together: one's dependency chains fill the other's gaps */

/* Copying a row (b, ., row, ., h) of a tensor to a buffer, REAL, columns in sub-lattice order,
 * and a buffered row to a contiguous tensor (out_stride). */
typedef struct {
    void (*read)(const na2d_geometry *g, const void *tensor, const int64_t *stride, int64_t b,
                 int64_t h, int64_t row, REAL *to);
    void (*write)(const na2d_geometry *g, void *tensor, int64_t b, int64_t h, int64_t row,
                  const REAL *from);
} FN(row_io);

typedef struct {
    const FN(row_io) * io;
    const void *q, *k, *v;
    const REAL *rpb; /* [heads, 2Kh-1, 2Kw-1], or NULL */
    REAL scale;
    void *out;
    const void *grad_out;
    void *grad_q, *grad_k, *grad_v;
    REAL *rpb_partial; /* [B * heads * H, (2Kh-1) * (2Kw-1)]: RPB gradient of each row, or NULL */
} FN(tensors);

/* Buffered rows; the row of sub-lattice index i lives in slot i % slots. A slot holds `count`
 * arrays (k and v; or q, dO, P and d logits), each starting on its own cache line. */
typedef struct {
    int64_t slots, stride; /* stride: REALs from one slot to the next */
    int64_t offset[4];     /* REALs from a slot's start to each array */
    int64_t *tag; /* [slots] (key ring): which (batch, head, row) a slot holds; -1: none */
    REAL *data;   /* [slots][stride], 64-byte aligned */
} FN(ring);

INLINE REAL *FN(ring_array)(const FN(ring) * r, int64_t slot, int which) {
    return r->data + slot * r->stride + r->offset[which];
}

/* What one thread reuses across its rows. */
typedef struct {
    int64_t window, padded; /* Kh * Kw, rounded up to whole vectors */
    int64_t *key_offset;    /* [window]: offset of each key in the key ring from its window's
                               first column (both key arrays: same layout) */
    REAL *bias;             /* [Kw][padded]: logit bias per column class (col_bias), NEG_BIG in
                               the padding, so padded slots get probability 0 */
    REAL *bias_grad;        /* [Kw][padded]: d logits summed per column class */
    int64_t *pair_row;      /* [W * Kw]: pair f of the column inverse (col_query[f]): the
                               query's offset in a buffered row of q or dO, */
    int64_t *pair_score;    /* and of its slot in a buffered row of P or d logits */
    const REAL **inverse;   /* [4][slots]: pass 2's buffered q, dO, P and d-logit rows of the
                               query rows that see the current key row (P, d logits: at the
                               window row that the key row is for them) */
    FN(ring) keys;          /* k and v rows */
    FN(ring) queries;       /* q rows (forward: one); backward: q, dO, P and d-logit rows */
    REAL *results[2];       /* [W * dim] each: out, or grad_q, or grad_k and grad_v */
    void *memory;
} FN(scratch);

static void FN(free_scratch)(FN(scratch) * s) {
    if (s != NULL) free(s->memory);
    free(s);
}

/* `count` arrays of widths[i] REALs per slot: whole cache lines (so rows start 64-byte aligned),
 * plus one, so that the arrays do not all start in the same cache sets. */
static void FN(plan_ring)(FN(ring) * r, int64_t slots, int64_t count, const int64_t *widths) {
    const int64_t line = 64 / sizeof(REAL);
    r->slots = slots;
    r->stride = 0;
    for (int64_t i = 0; i < count; ++i) {
        r->offset[i] = r->stride;
        r->stride += (widths[i] + line - 1) / line * line + line;
    }
}

INLINE size_t FN(ring_bytes)(const FN(ring) * r) {
    return sizeof(REAL) * r->slots * r->stride + sizeof(int64_t) * r->slots;
}

static FN(scratch) * FN(new_scratch)(const na2d_geometry *g, int backward) {
    FN(scratch) *s = calloc(1, sizeof(FN(scratch)));
    if (s == NULL) return NULL;
    s->window = (int64_t)g->kernel_h * g->kernel_w;
    s->padded = (s->window + LANES - 1) / LANES * LANES;
    const int64_t row = g->width * g->dim, scores = g->width * s->window;
    const int64_t key_widths[2] = {row, row}, query_widths[4] = {row, row, scores, scores};
    FN(plan_ring)(&s->keys, g->kernel_h, 2, key_widths);
    int64_t slots = g->kernel_h; /* the most query rows that one key row has */
    for (int64_t y = 0; y < g->height; ++y)
        slots = g->row_count[y] > slots ? g->row_count[y] : slots;
    FN(plan_ring)(&s->queries, backward ? slots : 1, backward ? 4 : 1, query_widths);
    const size_t results = sizeof(REAL) * 2 * row;
    const size_t tables = sizeof(REAL) * 2 * g->kernel_w * s->padded;
    const size_t keys = FN(ring_bytes)(&s->keys), queries = FN(ring_bytes)(&s->queries);
    const int64_t pairs = backward ? g->width * g->kernel_w : 0;
    const size_t size = keys + queries + results + tables +
                        sizeof(int64_t) * (s->window + 2 * pairs) + sizeof(REAL *) * 4 * slots;
    char *memory = aligned_alloc(64, (size + 63) / 64 * 64);
    if (memory == NULL) {
        free(s);
        return NULL;
    }
    s->memory = memory;
    s->keys.data = (REAL *)memory;
    s->queries.data = s->keys.data + s->keys.slots * s->keys.stride;
    s->results[0] = s->queries.data + s->queries.slots * s->queries.stride;
    s->results[1] = s->results[0] + row;
    s->bias = s->results[1] + row;
    s->bias_grad = s->bias + g->kernel_w * s->padded;
    s->keys.tag = (int64_t *)(s->bias_grad + g->kernel_w * s->padded);
    s->queries.tag = s->keys.tag + s->keys.slots;
    s->key_offset = s->queries.tag + s->queries.slots;
    s->pair_row = s->key_offset + s->window;
    s->pair_score = s->pair_row + pairs;
    s->inverse = (const REAL **)(s->pair_score + pairs);
    for (int64_t f = 0; f < pairs; ++f) {
        const int64_t column = g->col_position[g->col_query[f]];
        s->pair_row[f] = column * g->dim;
        s->pair_score[f] = column * s->window + g->col_slot[f];
    }
    for (int64_t i = 0; i < s->keys.slots; ++i) s->keys.tag[i] = -1;
    return s;
}

INLINE int64_t FN(row_tag)(const na2d_geometry *g, int64_t b, int64_t h, int64_t row) {
    return (b * g->heads + h) * g->height + row;
}

INLINE int64_t FN(slot_of)(const na2d_geometry *g, const FN(ring) * r, int64_t row) {
    return row / g->dilation_h % r->slots;
}

/* Buffers the window rows of query row y of k and v (unless already there) and sets key_offset:
 * key (a, c) of a query lies key_offset[a * Kw + c] past its window's first column. */
static void FN(prepare_keys)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                             int64_t b, int64_t y, int64_t h) {
    const int64_t kw = g->kernel_w;
    for (int64_t a = 0; a < g->kernel_h; ++a) {
        const int64_t row = g->row_start[y] + a * g->dilation_h;
        const int64_t slot = FN(slot_of)(g, &s->keys, row), tag = FN(row_tag)(g, b, h, row);
        REAL *keys = FN(ring_array)(&s->keys, slot, 0);
        if (s->keys.tag[slot] != tag) {
            s->keys.tag[slot] = tag;
            t->io->read(g, t->k, g->in_stride, b, h, row, keys);
            t->io->read(g, t->v, g->in_stride, b, h, row, FN(ring_array)(&s->keys, slot, 1));
        }
        for (int64_t c = 0; c < kw; ++c)
            s->key_offset[a * kw + c] = (keys - s->keys.data) + c * g->dim;
    }
}

/* The bias of every slot of query row y of head h, per column class; NEG_BIG in the padding. */
static void FN(prepare_bias)(const na2d_geometry *g, const REAL *rpb, FN(scratch) * s, int64_t h,
                             int64_t y) {
    const int64_t kw = g->kernel_w, rpb_w = 2 * kw - 1;
    for (int64_t column_class = 0; column_class < kw; ++column_class) {
        REAL *bias = s->bias + column_class * s->padded;
        for (int64_t a = 0; a < g->kernel_h; ++a) {
            const int64_t table_row = h * (2 * g->kernel_h - 1) + g->row_bias[y] + a;
            const REAL *table = rpb + table_row * rpb_w + column_class;
            for (int64_t c = 0; c < kw; ++c) bias[a * kw + c] = rpb != NULL ? table[c] : 0;
        }
        for (int64_t n = s->window; n < s->padded; ++n) bias[n] = NEG_BIG;
    }
}

INLINE VEC FN(load)(const REAL *from) {
    VEC value;
    memcpy(&value, from, sizeof(value));
    return value;
}

INLINE void FN(store)(REAL *to, VEC value) { memcpy(to, &value, sizeof(value)); }

/* A row in registers, for dot products with buffered rows. */
typedef struct {
    VEC lo[MAX_CHUNKS(CHUNK)], hi[MAX_CHUNKS(CHUNK)];
} FN(row);

INLINE void FN(load_row)(FN(row) * row, const REAL *from, const int64_t chunks) {
    for (int64_t j = 0; j < chunks; ++j) {
        row->lo[j] = FN(load)(from + j * CHUNK);
        row->hi[j] = FN(load)(from + j * CHUNK + LANES);
    }
}

/* The LANES partial sums of row . other. */
INLINE VEC FN(dot)(const FN(row) * row, const REAL *other, const int64_t chunks) {
    VEC sum = row->lo[0] * FN(load)(other) + row->hi[0] * FN(load)(other + LANES);
    for (int64_t j = 1; j < chunks; ++j)
        sum += row->lo[j] * FN(load)(other + j * CHUNK) +
               row->hi[j] * FN(load)(other + j * CHUNK + LANES);
    return sum;
}

/* to[g] lane i = row . (base + offset[g * LANES + i]) for the `count` buffered rows; lanes past
 * count are 0. */
INLINE void FN(window_dots)(const FN(row) * row, const REAL *base, const int64_t *offset,
                            const int64_t count, const int64_t chunks, VEC *to) {
    int64_t n = 0;
    for (; n + LANES <= count; n += LANES) {
        VEC parts[LANES];
        for (int i = 0; i < LANES; ++i) parts[i] = FN(dot)(row, base + offset[n + i], chunks);
        to[n / LANES] = REDUCE(parts, LANES);
    }
    if (n < count) {
        VEC parts[LANES];
        const int rest = (int)(count - n);
        for (int i = 0; i < rest; ++i) parts[i] = FN(dot)(row, base + offset[n + i], chunks);
        to[n / LANES] = REDUCE(parts, rest);
    }
}

/* Softmax over the lanes of logits[q][0, groups) for each of `nq` queries, in place (padding
 * lanes hold NEG_BIG: weight 0). */
INLINE void FN(softmax)(VEC (*logits)[MAX_GROUPS], const int nq, const int64_t groups) {
    VEC top[QUERIES], total[QUERIES];
    for (int qi = 0; qi < nq; ++qi) top[qi] = logits[qi][0];
    for (int64_t i = 1; i < groups; ++i)
        for (int qi = 0; qi < nq; ++qi) top[qi] = MAX(top[qi], logits[qi][i]);
    for (int qi = 0; qi < nq; ++qi) {
        top[qi] = ALL_MAX(top[qi]);
        total[qi] = (VEC){0};
    }
    for (int64_t i = 0; i < groups; ++i)
        for (int qi = 0; qi < nq; ++qi) {
            logits[qi][i] = EXP(logits[qi][i] - top[qi]);
            total[qi] += logits[qi][i];
        }
    for (int qi = 0; qi < nq; ++qi) total[qi] = 1 / ALL_SUM(total[qi]);
    for (int64_t i = 0; i < groups; ++i)
        for (int qi = 0; qi < nq; ++qi) logits[qi][i] *= total[qi];
}

/* Where the window of column x starts in a buffered row. */
INLINE int64_t FN(window_column)(const na2d_geometry *g, int64_t x) {
    return (int64_t)g->col_position[g->col_start[x]] * g->dim;
}

/* probs[q] = the attention weights of the queries of columns xs[0, nq) of query row y (prepared:
 * prepare_keys, prepare_bias), given their rows in registers. The forward and the backward both
 * call this, so the backward recomputes the forward's bits. */
INLINE void FN(window_probs)(const na2d_geometry *g, const FN(tensors) * t, const FN(scratch) * s,
                             const int32_t *xs, const FN(row) * rows, const int nq,
                             const int64_t window, const int64_t chunks,
                             VEC (*probs)[MAX_GROUPS]) {
    const int64_t groups = (window + LANES - 1) / LANES;
    for (int qi = 0; qi < nq; ++qi) {
        const REAL *bias = s->bias + g->col_bias[xs[qi]] * groups * LANES;
        FN(window_dots)(&rows[qi], s->keys.data + FN(window_column)(g, xs[qi]), s->key_offset,
                        window, chunks, probs[qi]);
        for (int64_t i = 0; i < groups; ++i)
            probs[qi][i] = probs[qi][i] * t->scale + FN(load)(bias + i * LANES);
    }
    FN(softmax)(probs, nq, groups);
}

/* Accumulates weight * (buffered row at `from`) into set `set` of the sums (a macro: the set is a
 * literal, so the sums stay in registers). */
#define ACCUMULATE(lo, hi, set, weight, from, chunks)                                              \
    do {                                                                                           \
        for (int64_t j = 0; j < (chunks); ++j) {                                                   \
            lo[set][j] += (weight) * FN(load)((from) + j * CHUNK);                                 \
            hi[set][j] += (weight) * FN(load)((from) + j * CHUNK + LANES);                         \
        }                                                                                          \
    } while (0)

#define ACCUMULATE_QUERIES(set, n)                                                                 \
    for (int qi = 0; qi < nq; ++qi)                                                                \
    ACCUMULATE(lo[qi], hi[qi], set, weights[qi][n], base[qi] + offset[n], chunks)

/* to[q] = factor * sum_n weights[q][n] * (base[q] + offset[n]) for each of `nq` queries. Four
 * independent sums per query hide the latency of the multiply-adds; they are added in a fixed
 * order. */
INLINE void FN(weighted_sums)(const REAL *const *base, const int64_t *offset,
                              REAL (*weights)[MAX_WINDOW], const int nq, const int64_t count,
                              const int64_t chunks, REAL factor, REAL *const *to) {
    VEC lo[QUERIES][4][MAX_CHUNKS(CHUNK)], hi[QUERIES][4][MAX_CHUNKS(CHUNK)];
    for (int qi = 0; qi < nq; ++qi)
        for (int set = 0; set < 4; ++set)
            for (int64_t j = 0; j < chunks; ++j) lo[qi][set][j] = hi[qi][set][j] = (VEC){0};
    int64_t n = 0;
    for (; n + 4 <= count; n += 4) {
        ACCUMULATE_QUERIES(0, n);
        ACCUMULATE_QUERIES(1, n + 1);
        ACCUMULATE_QUERIES(2, n + 2);
        ACCUMULATE_QUERIES(3, n + 3);
    }
    for (; n < count; ++n) ACCUMULATE_QUERIES(0, n);
    for (int qi = 0; qi < nq; ++qi)
        for (int64_t j = 0; j < chunks; ++j) {
            const VEC sum_lo = (lo[qi][0][j] + lo[qi][1][j]) + (lo[qi][2][j] + lo[qi][3][j]);
            const VEC sum_hi = (hi[qi][0][j] + hi[qi][1][j]) + (hi[qi][2][j] + hi[qi][3][j]);
            FN(store)(to[qi] + j * CHUNK, factor * sum_lo);
            FN(store)(to[qi] + j * CHUNK + LANES, factor * sum_hi);
        }
}
#undef ACCUMULATE_QUERIES

/* Forward of the queries of columns xs[0, nq) of row y; their q rows are buffered in the query
 * ring's slot 0, their outputs go to s->results[0]. */
INLINE void FN(forward_queries)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                                const int32_t *xs, const int nq, const int64_t window,
                                const int64_t chunks) {
    const int64_t groups = (window + LANES - 1) / LANES;
    FN(row) rows[QUERIES];
    const REAL *values[QUERIES];
    REAL *outs[QUERIES];
    VEC probs[QUERIES][MAX_GROUPS];
    REAL weights[QUERIES][MAX_WINDOW] __attribute__((aligned(64)));
    for (int qi = 0; qi < nq; ++qi) {
        const int64_t position = g->col_position[xs[qi]] * g->dim;
        FN(load_row)(&rows[qi], FN(ring_array)(&s->queries, 0, 0) + position, chunks);
        values[qi] = FN(ring_array)(&s->keys, 0, 1) + FN(window_column)(g, xs[qi]);
        outs[qi] = s->results[0] + position;
    }
    FN(window_probs)(g, t, s, xs, rows, nq, window, chunks, probs);
    for (int qi = 0; qi < nq; ++qi)
        for (int64_t i = 0; i < groups; ++i) FN(store)(weights[qi] + i * LANES, probs[qi][i]);
    FN(weighted_sums)(values, s->key_offset, weights, nq, window, chunks, 1, outs);
}

/* Pass 1 for the queries of columns xs[0, nq) of the query row whose q and dO are buffered in the
 * query ring's slot `slot`: their probabilities and d logits go to that slot; if `owner`, also
 * the gradients of q (to s->results[0]) and the column-class sums of d logits (s->bias_grad). */
INLINE void FN(query_grads)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                            const int32_t *xs, const int nq, const int64_t window,
                            const int64_t chunks, int64_t slot, int owner) {
    const int64_t groups = (window + LANES - 1) / LANES;
    const FN(ring) *r = &s->queries;
    FN(row) rows[QUERIES];
    const REAL *keys[QUERIES];
    REAL *grads[QUERIES];
    VEC probs[QUERIES][MAX_GROUPS], dots[QUERIES][MAX_GROUPS];
    REAL scores[QUERIES][MAX_WINDOW] __attribute__((aligned(64)));
    for (int qi = 0; qi < nq; ++qi) {
        const int64_t position = g->col_position[xs[qi]] * g->dim;
        FN(load_row)(&rows[qi], FN(ring_array)(r, slot, 0) + position, chunks);
        keys[qi] = s->keys.data + FN(window_column)(g, xs[qi]);
        grads[qi] = s->results[0] + position;
    }
    FN(window_probs)(g, t, s, xs, rows, nq, window, chunks, probs);
    for (int qi = 0; qi < nq; ++qi) {
        const int64_t position = g->col_position[xs[qi]] * g->dim;
        FN(load_row)(&rows[qi], FN(ring_array)(r, slot, 1) + position, chunks);
        FN(window_dots)(&rows[qi], FN(ring_array)(&s->keys, 0, 1) + FN(window_column)(g, xs[qi]),
                        s->key_offset, window, chunks, dots[qi]);
    }
    for (int qi = 0; qi < nq; ++qi) {
        /* sum_n P dO . V equals dO . O, without keeping O. */
        VEC delta = {0};
        for (int64_t i = 0; i < groups; ++i) delta += probs[qi][i] * dots[qi][i];
        delta = ALL_SUM(delta);
        REAL *sums = NULL;
        if (owner && t->rpb_partial != NULL)
            sums = s->bias_grad + g->col_bias[xs[qi]] * groups * LANES;
        REAL all_probs[MAX_WINDOW] __attribute__((aligned(64)));
        for (int64_t i = 0; i < groups; ++i) {
            const VEC grad_logits = probs[qi][i] * (dots[qi][i] - delta);
            FN(store)(scores[qi] + i * LANES, grad_logits);
            FN(store)(all_probs + i * LANES, probs[qi][i]);
            if (sums != NULL)
                FN(store)(sums + i * LANES, FN(load)(sums + i * LANES) + grad_logits);
        }
        const int64_t position = g->col_position[xs[qi]] * window;
        memcpy(FN(ring_array)(r, slot, 2) + position, all_probs, window * sizeof(REAL));
        memcpy(FN(ring_array)(r, slot, 3) + position, scores[qi], window * sizeof(REAL));
    }
    if (owner) FN(weighted_sums)(keys, s->key_offset, scores, nq, window, chunks, t->scale, grads);
}

/* The column-class sums of d logits of row y -> that row's RPB gradient table. */
static void FN(finish_row_bias_grad)(const na2d_geometry *g, const FN(scratch) * s, int64_t y,
                                     REAL *table) {
    const int64_t kw = g->kernel_w, rpb_w = 2 * kw - 1;
    memset(table, 0, sizeof(REAL) * (2 * g->kernel_h - 1) * rpb_w);
    for (int64_t column_class = 0; column_class < kw; ++column_class) {
        const REAL *sums = s->bias_grad + column_class * s->padded;
        for (int64_t a = 0; a < g->kernel_h; ++a) {
            REAL *to = table + (g->row_bias[y] + a) * rpb_w + column_class;
            for (int64_t c = 0; c < kw; ++c) to[c] += sums[a * kw + c];
        }
    }
}

/* Pass 2 for key column x of key row y: sums over the queries whose window holds it, from the
 * query ring, to s->results[0] (grad k) and [1] (grad v). Two alternating sets of sums hide the
 * latency of the multiply-adds. */
#define KEY_PAIR(set, f)                                                                           \
    do {                                                                                           \
        const int64_t row = s->pair_row[f], score = s->pair_score[f];                              \
        ACCUMULATE(k_lo, k_hi, set, scores[score], q_row + row, chunks);                           \
        ACCUMULATE(v_lo, v_hi, set, probs[score], grad_row + row, chunks);                         \
    } while (0)

INLINE void FN(key_grads)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                          const int32_t *xs, const int nq, const int64_t window,
                          const int64_t chunks, int64_t y, int unused) {
    (void)nq, (void)window, (void)unused;
    VEC k_lo[2][MAX_CHUNKS(CHUNK)], k_hi[2][MAX_CHUNKS(CHUNK)];
    VEC v_lo[2][MAX_CHUNKS(CHUNK)], v_hi[2][MAX_CHUNKS(CHUNK)];
    for (int set = 0; set < 2; ++set)
        for (int64_t j = 0; j < chunks; ++j)
            k_lo[set][j] = k_hi[set][j] = v_lo[set][j] = v_hi[set][j] = (VEC){0};
    const int64_t x = xs[0], slots = s->queries.slots;
    const int64_t col_first = g->col_first[x], col_end = col_first + g->col_count[x];
    for (int64_t e = 0; e < g->row_count[y]; ++e) {
        const REAL *q_row = s->inverse[e], *grad_row = s->inverse[slots + e];
        const REAL *probs = s->inverse[2 * slots + e], *scores = s->inverse[3 * slots + e];
        int64_t f = col_first;
        for (; f + 2 <= col_end; f += 2) {
            KEY_PAIR(0, f);
            KEY_PAIR(1, f + 1);
        }
        if (f < col_end) KEY_PAIR(0, f);
    }
    const int64_t at = g->col_position[x] * g->dim;
    for (int64_t j = 0; j < chunks; ++j) {
        FN(store)(s->results[0] + at + j * CHUNK, t->scale * (k_lo[0][j] + k_lo[1][j]));
        FN(store)(s->results[0] + at + j * CHUNK + LANES, t->scale * (k_hi[0][j] + k_hi[1][j]));
        FN(store)(s->results[1] + at + j * CHUNK, v_lo[0][j] + v_lo[1][j]);
        FN(store)(s->results[1] + at + j * CHUNK + LANES, v_hi[0][j] + v_hi[1][j]);
    }
}
#undef KEY_PAIR

/* Calls `function(g, t, s, columns, count, window, chunks, ...)` for the columns of a row in
 * sub-lattice order: `per_call` (1 or QUERIES) at a time with literals for 7x7 windows and
 * head_dim 32 (where LITERALS: float32), else one at a time with the runtime values (two
 * variants per function keep the build short). */
#define EACH_COLUMN(per_call, function, ...)                                                       \
    do {                                                                                           \
        const int64_t window = (int64_t)g->kernel_h * g->kernel_w, chunks = g->dim / CHUNK;       \
        const int32_t *order = g->col_order;                                                       \
        int64_t i = 0;                                                                             \
        if (LITERALS && window == 49 && g->dim == 32) {                                            \
            for (; i + (per_call) <= g->width; i += (per_call))                                    \
                function(g, t, s, order + i, (per_call), 49, 32 / CHUNK, __VA_ARGS__);             \
        }                                                                                          \
        for (; i < g->width; ++i) function(g, t, s, order + i, 1, window, chunks, __VA_ARGS__);   \
    } while (0)

INLINE void FN(forward_columns)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                                const int32_t *xs, const int nq, const int64_t window,
                                const int64_t chunks, int unused) {
    (void)unused;
    FN(forward_queries)(g, t, s, xs, nq, window, chunks);
}

static void FN(forward_row)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                            int64_t b, int64_t y, int64_t h) {
    t->io->read(g, t->q, g->in_stride, b, h, y, FN(ring_array)(&s->queries, 0, 0));
    FN(prepare_keys)(g, t, s, b, y, h);
    FN(prepare_bias)(g, t->rpb, s, h, y);
    EACH_COLUMN(QUERIES, FN(forward_columns), 0);
    t->io->write(g, t->out, b, h, y, s->results[0]);
}

/* Pass 1 for query row y: buffers its q and dO, then the probabilities and d logits of its
 * queries; if `owner`, also their q gradients and the row's RPB gradient. */
static void FN(query_grads_row)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                                int64_t b, int64_t y, int64_t h, int owner) {
    const int64_t slot = FN(slot_of)(g, &s->queries, y); /* rows come in order: no tags */
    t->io->read(g, t->q, g->in_stride, b, h, y, FN(ring_array)(&s->queries, slot, 0));
    t->io->read(g, t->grad_out, g->out_stride, b, h, y, FN(ring_array)(&s->queries, slot, 1));
    FN(prepare_keys)(g, t, s, b, y, h);
    FN(prepare_bias)(g, t->rpb, s, h, y);
    memset(s->bias_grad, 0, sizeof(REAL) * g->kernel_w * s->padded);
    EACH_COLUMN(QUERIES, FN(query_grads), slot, owner);
    if (!owner) return;
    t->io->write(g, t->grad_q, b, h, y, s->results[0]);
    if (t->rpb_partial != NULL) {
        const int64_t table = (2 * g->kernel_h - 1) * (2 * g->kernel_w - 1);
        FN(finish_row_bias_grad)(g, s, y, t->rpb_partial + FN(row_tag)(g, b, h, y) * table);
    }
}

/* Pass 2 for key row y, whose query rows are all in the query ring. */
static void FN(key_grads_row)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                              int64_t b, int64_t y, int64_t h) {
    const FN(ring) *r = &s->queries;
    for (int64_t e = 0; e < g->row_count[y]; ++e) {
        const int64_t slot = FN(slot_of)(g, r, g->row_query[g->row_first[y] + e]);
        const int64_t a = g->row_slot[g->row_first[y] + e] * g->kernel_w;
        for (int i = 0; i < 4; ++i)
            s->inverse[i * r->slots + e] = FN(ring_array)(r, slot, i) + (i >= 2 ? a : 0);
    }
    EACH_COLUMN(1, FN(key_grads), y, 0);
    t->io->write(g, t->grad_k, b, h, y, s->results[0]);
    t->io->write(g, t->grad_v, b, h, y, s->results[1]);
}

/* Backward of key rows [first, end) of the sub-lattice of rows `residue` of (b, h) (sub-lattice
 * indices). Query rows are visited in order, from the first that a key row of the chunk needs to
 * the last; each key row follows the last query row that sees it. */
static void FN(backward_chunk)(const na2d_geometry *g, const FN(tensors) * t, FN(scratch) * s,
                               int64_t b, int64_t h, int64_t residue, int64_t first,
                               int64_t end) {
    const int64_t d = g->dilation_h;
    const int64_t first_row = residue + first * d, last_row = residue + (end - 1) * d;
    const int64_t query_first = g->row_query[g->row_first[first_row]];
    const int64_t query_last = g->row_query[g->row_first[last_row] + g->row_count[last_row] - 1];
    int64_t key_row = first_row;
    for (int64_t y = query_first; y <= query_last; y += d) {
        FN(query_grads_row)(g, t, s, b, y, h, y >= first_row && y <= last_row);
        for (; key_row <= last_row; key_row += d) {
            const int64_t e = g->row_first[key_row] + g->row_count[key_row] - 1;
            if (g->row_query[e] > y) break; /* a query row that sees it is still to come */
            FN(key_grads_row)(g, t, s, b, key_row, h);
        }
    }
}

/* q, k, v: [B, H, W, heads, dim] (in_stride); rpb: [heads, 2Kh-1, 2Kw-1] or NULL; out: like q,
 * contiguous (out_stride). Returns 0, or -1 if scratch memory could not be allocated. */
static int32_t FN(forward)(const na2d_geometry *g, const FN(row_io) * io, const void *q,
                           const void *k, const void *v, const REAL *rpb, double scale, void *out,
                           int32_t threads) {
    const FN(tensors) t = {.io = io, .q = q, .k = k, .v = v, .rpb = rpb, .scale = (REAL)scale,
                           .out = out};
    const int64_t items = g->batch * g->heads * g->height;
    int32_t failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        FN(scratch) *s = FN(new_scratch)(g, 0);
        failed = s == NULL;
#pragma omp for schedule(static)
        for (int64_t item = 0; item < items; ++item)
            if (s != NULL) {
                const int64_t y = g->row_order[item % g->height];
                const int64_t h = item / g->height % g->heads, b = item / g->height / g->heads;
                FN(forward_row)(g, &t, s, b, y, h);
            }
        FN(free_scratch)(s);
    }
    return failed ? -1 : 0;
}

/* grad_out, grad_q, grad_k, grad_v: like out. rpb_partial: scratch [B * heads * H,
 * (2Kh-1) * (2Kw-1)] and grad_rpb [heads, 2Kh-1, 2Kw-1], both NULL when the RPB gradient is not
 * needed: each row's RPB gradient is summed on its own and the rows are added in a fixed order.
 * Work items: (batch, head, row sub-lattice, chunk), `chunks` chunks per sub-lattice (any number
 * gives the same bits). Returns 0, or -1 (no scratch memory). */
static int32_t FN(backward)(const na2d_geometry *g, const FN(row_io) * io, const void *q,
                            const void *k, const void *v, const REAL *rpb, double scale,
                            const void *grad_out, void *grad_q, void *grad_k, void *grad_v,
                            REAL *rpb_partial, REAL *grad_rpb, int32_t chunks, int32_t threads) {
    const FN(tensors) t = {.io = io, .q = q, .k = k, .v = v, .rpb = rpb, .scale = (REAL)scale,
                           .grad_out = grad_out, .grad_q = grad_q, .grad_k = grad_k,
                           .grad_v = grad_v, .rpb_partial = rpb_partial};
    const int64_t d = g->dilation_h, items = g->batch * g->heads * d * chunks;
    const int64_t table = (2 * g->kernel_h - 1) * (2 * g->kernel_w - 1);
    int32_t failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        FN(scratch) *s = FN(new_scratch)(g, 1);
        failed = s == NULL;
#pragma omp for schedule(dynamic)
        for (int64_t item = 0; item < items; ++item)
            if (s != NULL) {
                const int64_t chunk = item % chunks, residue = item / chunks % d;
                const int64_t h = item / chunks / d % g->heads, b = item / chunks / d / g->heads;
                const int64_t length = (g->height - residue + d - 1) / d; /* sub-lattice rows */
                const int64_t first = length * chunk / chunks, end = length * (chunk + 1) / chunks;
                if (first < end) FN(backward_chunk)(g, &t, s, b, h, residue, first, end);
            }
        FN(free_scratch)(s);
    }
    if (failed) return -1;
    if (grad_rpb != NULL) {
        memset(grad_rpb, 0, sizeof(REAL) * g->heads * table);
        for (int64_t row = 0; row < g->batch * g->heads * g->height; ++row) {
            REAL *sum = grad_rpb + row / g->height % g->heads * table;
            for (int64_t i = 0; i < table; ++i) sum[i] += rpb_partial[row * table + i];
        }
    }
    return 0;
}

#undef MAX_GROUPS
#undef QUERIES
#undef ACCUMULATE
#undef EACH_COLUMN
