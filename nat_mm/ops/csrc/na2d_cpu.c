/* Exact 2-D (dilated) neighborhood attention with relative positional bias on CPU.
 *
 * Plain C (no PyTorch headers, so it compiles in about a second), called through ctypes by
 * nat_mm/ops/backends/cpu_na.py, which builds it on first use. Each query visits exactly its
 * Kh x Kw window: no masked logits, no gathered copies of k and v. Tensors are contiguous and
 * heads-last, [B, H, W, heads, D], as na2d's API. The window of every row and column (first key,
 * first RPB index; NATTEN 0.14 semantics) comes precomputed from Python, so this file holds no
 * border or dilation rules of its own.
 *
 * The body is written once in na2d_cpu_impl.h and included for float and for double.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <omp.h>

/* Largest head_dim (the caller pads head_dim to a multiple of 32 bytes and checks this). */
#define MAX_DIM 256

typedef struct {
    int64_t batch, height, width, heads, dim;
    int32_t kernel_h, kernel_w, dilation_h, dilation_w;
    const int32_t *row_start; /* [H]: first key row of each query row's window */
    const int32_t *row_bias;  /* [H]: RPB row index of that first key */
    const int32_t *col_start; /* [W] */
    const int32_t *col_bias;  /* [W] */
    const int32_t *row_order; /* [H]: rows by sub-lattice (residue, then index): cache reuse */
    const int32_t *col_order; /* [W] */
} na2d_geometry;

/* Index of query (b, y, x, h) in [B, H, W, heads]. */
static inline int64_t query_index(const na2d_geometry *g, int64_t b, int64_t y, int64_t x,
                                  int64_t h) {
    return ((b * g->height + y) * g->width + x) * g->heads + h;
}

static inline int64_t pixel_offset(const na2d_geometry *g, int64_t b, int64_t y, int64_t x,
                                   int64_t h) {
    return query_index(g, b, y, x, h) * g->dim;
}

/* Offset in k / v of the first key of window row a of query (b, y, x, h); the row's keys follow
 * `key_step(g)` elements apart. */
static inline int64_t window_row(const na2d_geometry *g, int64_t b, int64_t y, int64_t x, int64_t h,
                                 int32_t a) {
    const int64_t key_y = g->row_start[y] + (int64_t)a * g->dilation_h;
    return pixel_offset(g, b, key_y, g->col_start[x], h);
}

/* Elements between consecutive keys of a window row. */
static inline int64_t key_step(const na2d_geometry *g) {
    return g->dilation_w * g->heads * g->dim;
}

#define REAL float
#define EXP expf
#define FN(name) name##_f32
#include "na2d_cpu_impl.h"
#undef REAL
#undef EXP
#undef FN

#define REAL double
#define EXP exp
#define FN(name) name##_f64
#include "na2d_cpu_impl.h"
#undef REAL
#undef EXP
#undef FN
