/* Exact 2-D (dilated) neighborhood attention with relative positional bias on CPU.
 *
 * Plain C (no PyTorch headers; it compiles in about two seconds), called through ctypes by
 * nat_mm/ops/backends/cpu_na.py, which builds it on first use with -march=native. Each query
 * visits exactly its Kh x Kw window: no masked logits, no gathered copies of k and v. q, k and v
 * are [B, H, W, heads, D] with any strides whose head_dim is contiguous (views of the qkv
 * projection's output are read in place); outputs and gradients are contiguous. The windows of
 * every row and column (first key, first RPB index, and the inverse: the queries whose window
 * holds a key) come precomputed from Python, so this file holds no border or dilation rules.
 *
 * Storage types float32, float64, bfloat16 and float16 (where the CPU or compiler has a float16
 * conversion). Products, sums and the softmax are computed in float32 (float64 for float64);
 * outputs and gradients are rounded to the storage type once, at the end.
 *
 * This file holds what depends on the instruction set and the storage types: vector width,
 * conversions, the reduction of many dot products at once, the softmax's exp, copying rows in and
 * out. The algorithm is written once, in na2d_cpu_impl.h, included for float and for double.
 * Guards are the compiler's predefined macros (__AVX512F__, __AVX512BF16__, __F16C__, ...), so
 * the same file builds for AVX-512, AVX2 or plain generic vectors.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

/* Vectors of 64 bytes where AVX-512 exists, else 32 bytes (AVX2, or GCC's generic vectors). */
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#else
#define VECTOR_BYTES 32
#endif

/* Limits (the caller checks them and falls back to the torch backend beyond them). */
#define MAX_DIM 256
#define MAX_WINDOW 256
#define MAX_CHUNKS(chunk) ((MAX_DIM + (chunk) - 1) / (chunk))

#define INLINE static inline __attribute__((always_inline))

typedef struct {
    int64_t batch, height, width, heads, dim;
    int32_t kernel_h, kernel_w, dilation_h, dilation_w;
    int64_t in_stride[4];  /* q, k, v: elements between batches, rows, columns, heads */
    int64_t out_stride[4]; /* out, grad_out and the gradients of q, k, v (contiguous) */
    /* Per axis, from cpu_na.axis_windows: */
    const int32_t *row_start; /* [H]: first key row of each query row's window */
    const int32_t *row_bias;  /* [H]: RPB row index of that first key */
    const int32_t *row_order; /* [H]: rows by sub-lattice (residue, then index): cache reuse */
    const int32_t *row_first; /* [H]: where key row j's queries start in row_query / row_slot */
    const int32_t *row_count; /* [H]: how many query rows have key row j in their window */
    const int32_t *row_query; /* [H * Kh]: those query rows, ascending */
    const int32_t *row_slot;  /* [H * Kh]: the window row that key row j is for each of them */
    const int32_t *row_position; /* [H]: where row y comes in row_order (unused) */
    const int32_t *col_start, *col_bias, *col_order, *col_first, *col_count, *col_query,
        *col_slot;                /* the same for columns, */
    const int32_t *col_position;  /* [W]: where column x sits in a buffered row */
} na2d_geometry;

INLINE int64_t out_offset(const na2d_geometry *g, int64_t b, int64_t y, int64_t x, int64_t h) {
    const int64_t *s = g->out_stride;
    return b * s[0] + y * s[1] + x * s[2] + h * s[3];
}

/* ------------------------------------------------------------------ compute vectors */

typedef float vf32 __attribute__((vector_size(VECTOR_BYTES)));
typedef double vf64 __attribute__((vector_size(VECTOR_BYTES)));
typedef uint32_t vu32 __attribute__((vector_size(VECTOR_BYTES)));
#define F32_LANES (VECTOR_BYTES / 4)
#define F64_LANES (VECTOR_BYTES / 8)

INLINE vf32 load_vf32(const float *from) {
    vf32 value;
    memcpy(&value, from, sizeof(value)); /* unaligned load */
    return value;
}

INLINE void store_vf32(float *to, vf32 value) { memcpy(to, &value, sizeof(value)); }

INLINE vf64 load_vf64(const double *from) {
    vf64 value;
    memcpy(&value, from, sizeof(value));
    return value;
}

INLINE void store_vf64(double *to, vf64 value) { memcpy(to, &value, sizeof(value)); }

typedef int32_t vi32 __attribute__((vector_size(VECTOR_BYTES)));
typedef int64_t vi64 __attribute__((vector_size(VECTOR_BYTES)));
typedef uint64_t vu64 __attribute__((vector_size(VECTOR_BYTES)));

/* Lane-wise maximum (a comparison and a select). */
INLINE vf32 max_vf32(vf32 a, vf32 b) {
    const vi32 greater = a > b;
    return (vf32)((greater & (vi32)a) | (~greater & (vi32)b));
}

INLINE vf64 max_vf64(vf64 a, vf64 b) {
    const vi64 greater = a > b;
    return (vf64)((greater & (vi64)a) | (~greater & (vi64)b));
}

/* e^x for the softmax's arguments x = logit - max <= 0, inline: no libm call, so no -ffast-math
 * for glibc's vector exp. x = i ln2 + g with |g| <= ln2 / 2, e^g by its Taylor series, times 2^i by
 * adding i to the exponent: within 0.93 ulp in float, 2.3 ulp in double (measured over x <= 0).
 * x below EXP_FLOOR (probabilities under 1e-37 of the largest: nothing a float32 sum of them can
 * hold) and -inf give 0; NaN gives NaN (the tests on the bits are integer ones, so no NaN is lost
 * to a comparison). */
#define EXP_FLOOR_F32 0xC2AC0000u /* -86.0f: keeps 2^i normal */
INLINE vf32 exp_vf32(vf32 x) {
    const vi32 i = __builtin_convertvector(x * 1.44269504f - 0.5f, vi32); /* truncates */
    const vf32 fi = __builtin_convertvector(i, vf32);
    const vf32 g = (x - fi * 0.693145752f) - fi * 1.42860677e-6f; /* ln2 in two parts */
    vf32 p = g * (1.0f / 5040) + (1.0f / 720);
    p = p * g + (1.0f / 120);
    p = p * g + (1.0f / 24);
    p = p * g + (1.0f / 6);
    p = p * g + 0.5f;
    p = p * g + 1.0f;
    p = p * g + 1.0f;
    const vu32 bits = (vu32)x, magnitude = bits & 0x7FFFFFFFu;
    const vu32 zero = (vu32)(bits > EXP_FLOOR_F32) & (vu32)(magnitude <= 0x7F800000u);
    return (vf32)(((vu32)p + ((vu32)i << 23)) & ~zero);
}

#define EXP_FLOOR_F64 0xC086000000000000u /* -704.0: keeps 2^i normal */
INLINE vf64 exp_vf64(vf64 x) {
    const vi64 i = __builtin_convertvector(x * 1.4426950408889634 - 0.5, vi64);
    const vf64 fi = __builtin_convertvector(i, vf64);
    const vf64 g = (x - fi * 0.693147180369123816) - fi * 1.90821492927058770e-10;
    vf64 p = g * (1.0 / 479001600) + (1.0 / 39916800);
    p = p * g + (1.0 / 3628800);
    p = p * g + (1.0 / 362880);
    p = p * g + (1.0 / 40320);
    p = p * g + (1.0 / 5040);
    p = p * g + (1.0 / 720);
    p = p * g + (1.0 / 120);
    p = p * g + (1.0 / 24);
    p = p * g + (1.0 / 6);
    p = p * g + 0.5;
    p = p * g + 1.0;
    p = p * g + 1.0;
    const vu64 bits = (vu64)x, magnitude = bits & 0x7FFFFFFFFFFFFFFFu;
    const vu64 zero = (vu64)(bits > EXP_FLOOR_F64) & (vu64)(magnitude <= 0x7FF0000000000000u);
    return (vf64)(((vu64)p + ((vu64)i << 52)) & ~zero);
}

/* Lane-wise sums of up to LANES vectors at once: lane j of the result is the sum of the lanes of
 * parts[j] (parts past `count` count as zero). Summing each dot product's lanes on its own costs
 * log2(LANES) shuffles per dot product; folding pairs of vectors (even blocks of both + odd blocks
 * of both, blocks halving at each level) shares every shuffle between two dot products. */
#if defined(__has_builtin)
#if __has_builtin(__builtin_shufflevector)
#define HAVE_SHUFFLEVECTOR 1
#endif
#endif

#if defined(HAVE_SHUFFLEVECTOR)
#define FOLD(a, b, ...)                                                                            \
    (__builtin_shufflevector(a, b, EVEN_##__VA_ARGS__) +                                           \
     __builtin_shufflevector(a, b, ODD_##__VA_ARGS__))
/* Lane indices into the pair (a, b) of 16 / 8 / 4 lanes, blocks of `N` lanes. */
#define EVEN_16_8 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23
#define ODD_16_8 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31
#define EVEN_16_4 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27
#define ODD_16_4 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31
#define EVEN_16_2 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29
#define ODD_16_2 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31
#define EVEN_16_1 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30
#define ODD_16_1 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31
#define EVEN_8_4 0, 1, 2, 3, 8, 9, 10, 11
#define ODD_8_4 4, 5, 6, 7, 12, 13, 14, 15
#define EVEN_8_2 0, 1, 4, 5, 8, 9, 12, 13
#define ODD_8_2 2, 3, 6, 7, 10, 11, 14, 15
#define EVEN_8_1 0, 2, 4, 6, 8, 10, 12, 14
#define ODD_8_1 1, 3, 5, 7, 9, 11, 13, 15
#define EVEN_4_2 0, 1, 4, 5
#define ODD_4_2 2, 3, 6, 7
#define EVEN_4_1 0, 2, 4, 6
#define ODD_4_1 1, 3, 5, 7

/* One level: pairs (parts[2i], parts[2i + 1]) -> parts[i]; returns the new count. */
#define FOLD_LEVEL(parts, count, zero, ...)                                                        \
    do {                                                                                           \
        for (int i = 0; 2 * i < (count); ++i)                                                      \
            (parts)[i] = FOLD((parts)[2 * i], 2 * i + 1 < (count) ? (parts)[2 * i + 1] : (zero),   \
                              __VA_ARGS__);                                                        \
        (count) = ((count) + 1) / 2;                                                               \
    } while (0)

INLINE vf32 reduce_vf32(vf32 *parts, int count) {
    const vf32 zero = {0};
#if F32_LANES == 16
    FOLD_LEVEL(parts, count, zero, 16_8);
    FOLD_LEVEL(parts, count, zero, 16_4);
    FOLD_LEVEL(parts, count, zero, 16_2);
    FOLD_LEVEL(parts, count, zero, 16_1);
#else
    FOLD_LEVEL(parts, count, zero, 8_4);
    FOLD_LEVEL(parts, count, zero, 8_2);
    FOLD_LEVEL(parts, count, zero, 8_1);
#endif
    return parts[0];
}

INLINE vf64 reduce_vf64(vf64 *parts, int count) {
    const vf64 zero = {0};
#if F64_LANES == 8
    FOLD_LEVEL(parts, count, zero, 8_4);
    FOLD_LEVEL(parts, count, zero, 8_2);
    FOLD_LEVEL(parts, count, zero, 8_1);
#else
    FOLD_LEVEL(parts, count, zero, 4_2);
    FOLD_LEVEL(parts, count, zero, 4_1);
#endif
    return parts[0];
}

/* Butterflies: every lane ends with the sum / maximum of all lanes, in log2(LANES) steps. */
#define SWAP(x, ...) __builtin_shufflevector(x, x, SWAP_##__VA_ARGS__)
#define SWAP_16_8 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7
#define SWAP_16_4 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11
#define SWAP_16_2 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13
#define SWAP_16_1 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14
#define SWAP_8_4 4, 5, 6, 7, 0, 1, 2, 3
#define SWAP_8_2 2, 3, 0, 1, 6, 7, 4, 5
#define SWAP_8_1 1, 0, 3, 2, 5, 4, 7, 6
#define SWAP_4_2 2, 3, 0, 1
#define SWAP_4_1 1, 0, 3, 2

INLINE vf32 all_sum_vf32(vf32 x) {
#if F32_LANES == 16
    x += SWAP(x, 16_8);
    x += SWAP(x, 16_4);
    x += SWAP(x, 16_2);
    return x + SWAP(x, 16_1);
#else
    x += SWAP(x, 8_4);
    x += SWAP(x, 8_2);
    return x + SWAP(x, 8_1);
#endif
}

INLINE vf32 all_max_vf32(vf32 x) {
#if F32_LANES == 16
    x = max_vf32(x, SWAP(x, 16_8));
    x = max_vf32(x, SWAP(x, 16_4));
    x = max_vf32(x, SWAP(x, 16_2));
    return max_vf32(x, SWAP(x, 16_1));
#else
    x = max_vf32(x, SWAP(x, 8_4));
    x = max_vf32(x, SWAP(x, 8_2));
    return max_vf32(x, SWAP(x, 8_1));
#endif
}

INLINE vf64 all_sum_vf64(vf64 x) {
#if F64_LANES == 8
    x += SWAP(x, 8_4);
    x += SWAP(x, 8_2);
    return x + SWAP(x, 8_1);
#else
    x += SWAP(x, 4_2);
    return x + SWAP(x, 4_1);
#endif
}

INLINE vf64 all_max_vf64(vf64 x) {
#if F64_LANES == 8
    x = max_vf64(x, SWAP(x, 8_4));
    x = max_vf64(x, SWAP(x, 8_2));
    return max_vf64(x, SWAP(x, 8_1));
#else
    x = max_vf64(x, SWAP(x, 4_2));
    return max_vf64(x, SWAP(x, 4_1));
#endif
}
#else /* no shuffles: lane by lane */
#define REDUCE_EACH(type, lanes)                                                                   \
    type result = {0};                                                                             \
    for (int i = 0; i < count; ++i)                                                                \
        for (int lane = 0; lane < (lanes); ++lane) result[i] += parts[i][lane];                    \
    return result
INLINE vf32 reduce_vf32(vf32 *parts, int count) { REDUCE_EACH(vf32, F32_LANES); }
INLINE vf64 reduce_vf64(vf64 *parts, int count) { REDUCE_EACH(vf64, F64_LANES); }
#define ALL_LANES(type, lanes, op)                                                                 \
    type result = x;                                                                               \
    for (int lane = 1; lane < (lanes); ++lane) result[0] = op(result[0], x[lane]);                 \
    for (int lane = 1; lane < (lanes); ++lane) result[lane] = result[0];                           \
    return result
#define ADD(a, b) ((a) + (b))
#define SCALAR_MAX(a, b) ((a) > (b) ? (a) : (b))
INLINE vf32 all_sum_vf32(vf32 x) { ALL_LANES(vf32, F32_LANES, ADD); }
INLINE vf32 all_max_vf32(vf32 x) { ALL_LANES(vf32, F32_LANES, SCALAR_MAX); }
INLINE vf64 all_sum_vf64(vf64 x) { ALL_LANES(vf64, F64_LANES, ADD); }
INLINE vf64 all_max_vf64(vf64 x) { ALL_LANES(vf64, F64_LANES, SCALAR_MAX); }
#endif

/* ------------------------------------------------------------------ storage types
 *
 * Chunks of 2 * LANES elements of a row, to and from two compute vectors (lo then hi): rows are
 * converted when they are copied into the threads' buffers and when results are stored, so the
 * inner loops only see float32 (float64). */

/* float32 */
typedef float f32;
#define F32_CHUNK (2 * F32_LANES)

INLINE void load_chunk_f32(const f32 *from, vf32 *lo, vf32 *hi) {
    *lo = load_vf32(from);
    *hi = load_vf32(from + F32_LANES);
}

INLINE void store_chunk_f32(f32 *to, vf32 lo, vf32 hi) {
    store_vf32(to, lo);
    store_vf32(to + F32_LANES, hi);
}

/* float64 */
typedef double f64;
#define F64_CHUNK (2 * F64_LANES)

INLINE void load_chunk_f64(const f64 *from, vf64 *lo, vf64 *hi) {
    *lo = load_vf64(from);
    *hi = load_vf64(from + F64_LANES);
}

INLINE void store_chunk_f64(f64 *to, vf64 lo, vf64 hi) {
    store_vf64(to, lo);
    store_vf64(to + F64_LANES, hi);
}

/* bfloat16: the high half of a float32; widening is a shift (vpmovzxwd + vpslld). */
typedef uint16_t bf16;
typedef uint16_t vu16 __attribute__((vector_size(VECTOR_BYTES / 2))); /* LANES halves */
#define BF16_CHUNK (2 * F32_LANES)

INLINE vf32 widen_bf16(const bf16 *from) {
    vu16 halves;
    memcpy(&halves, from, sizeof(halves));
    return (vf32)(__builtin_convertvector(halves, vu32) << 16);
}

INLINE void load_chunk_bf16(const bf16 *from, vf32 *lo, vf32 *hi) {
    *lo = widen_bf16(from);
    *hi = widen_bf16(from + F32_LANES);
}

/* Round to nearest even; NaN stays NaN (rounding could carry its payload into the sign). */
INLINE vu16 narrow_to_bf16(vf32 x) {
    const vu32 bits = (vu32)x;
    const vu32 rounded = bits + 0x7FFFu + ((bits >> 16) & 1u);
    const vu32 nan = (vu32)((bits & 0x7FFFFFFFu) > 0x7F800000u);
    return __builtin_convertvector(((rounded & ~nan) | ((bits | 0x00400000u) & nan)) >> 16, vu16);
}

INLINE void store_chunk_bf16(bf16 *to, vf32 lo, vf32 hi) {
#if defined(__AVX512BF16__) && VECTOR_BYTES == 64
    /* vcvtne2ps2bf16: both halves in one instruction, round to nearest even (float32 denormals,
     * below 1.2e-38, become 0 here). */
    _mm512_storeu_si512(to, (__m512i)_mm512_cvtne2ps_pbh((__m512)hi, (__m512)lo));
#else
    const vu16 a = narrow_to_bf16(lo), b = narrow_to_bf16(hi);
    memcpy(to, &a, sizeof(a));
    memcpy(to + F32_LANES, &b, sizeof(b));
#endif
}

/* float16: F16C / AVX-512 convert 8 / 16 of them per instruction (vcvtph2ps, vcvtps2ph, round
 * to nearest even). Without those, a compiler with _Float16 converts (GCC >= 12, clang); without
 * either, the float16 entry points are not built and cpu_na.py reports it. */
#if defined(__AVX512F__) || defined(__F16C__) || defined(__FLT16_MAX__)
#define HAVE_F16 1
typedef uint16_t f16;
#define F16_CHUNK (2 * F32_LANES)
#define F16_ROUND (_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)

#if defined(__AVX512F__)
INLINE vf32 widen_f16(const f16 *from) {
    return (vf32)_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)from));
}
INLINE void narrow_to_f16(f16 *to, vf32 x) {
    _mm256_storeu_si256((__m256i *)to, _mm512_cvtps_ph((__m512)x, F16_ROUND));
}
#elif defined(__F16C__)
INLINE vf32 widen_f16(const f16 *from) {
    return (vf32)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)from));
}
INLINE void narrow_to_f16(f16 *to, vf32 x) {
    _mm_storeu_si128((__m128i *)to, _mm256_cvtps_ph((__m256)x, F16_ROUND));
}
#else
typedef _Float16 vhalf __attribute__((vector_size(VECTOR_BYTES / 2)));
INLINE vf32 widen_f16(const f16 *from) {
    vhalf x;
    memcpy(&x, from, sizeof(x));
    return __builtin_convertvector(x, vf32);
}
INLINE void narrow_to_f16(f16 *to, vf32 x) {
    const vhalf half = __builtin_convertvector(x, vhalf);
    memcpy(to, &half, sizeof(half));
}
#endif

INLINE void load_chunk_f16(const f16 *from, vf32 *lo, vf32 *hi) {
    *lo = widen_f16(from);
    *hi = widen_f16(from + F32_LANES);
}

INLINE void store_chunk_f16(f16 *to, vf32 lo, vf32 hi) {
    narrow_to_f16(to, lo);
    narrow_to_f16(to + F32_LANES, hi);
}

#endif

/* ------------------------------------------------------------------ rows in and out
 *
 * The algorithm (na2d_cpu_impl.h) works on rows buffered as REAL, one head, columns in
 * sub-lattice order (col_order); these copy a row of a tensor in, or a buffered result row out.
 * They run once per row, so the algorithm calls them through pointers and is compiled once per
 * REAL, not once per storage type. */
#define ROW_IO(T, R, SIZE, LOAD_R, STORE_R)                                                        \
    static void read_row_##T(const na2d_geometry *g, const void *tensor, const int64_t *stride,    \
                             int64_t b, int64_t h, int64_t row, R *to) {                           \
        const T *source = (const T *)tensor + b * stride[0] + row * stride[1] + h * stride[3];     \
        for (int64_t i = 0; i < g->width; ++i) {                                                   \
            const T *pixel = source + g->col_order[i] * stride[2];                                 \
            for (int64_t j = 0; j < g->dim; j += (SIZE)) {                                         \
                __typeof__(LOAD_R(to)) lo, hi;                                                     \
                load_chunk_##T(pixel + j, &lo, &hi);                                               \
                STORE_R(to + i * g->dim + j, lo);                                                  \
                STORE_R(to + i * g->dim + j + (SIZE) / 2, hi);                                     \
            }                                                                                      \
        }                                                                                          \
    }                                                                                              \
    static void write_row_##T(const na2d_geometry *g, void *tensor, int64_t b, int64_t h,          \
                              int64_t row, const R *from) {                                        \
        T *target = (T *)tensor + out_offset(g, b, row, 0, h);                                     \
        for (int64_t i = 0; i < g->width; ++i) {                                                   \
            T *pixel = target + g->col_order[i] * g->out_stride[2];                                \
            for (int64_t j = 0; j < g->dim; j += (SIZE)) {                                         \
                const R *buffered = from + i * g->dim + j;                                         \
                store_chunk_##T(pixel + j, LOAD_R(buffered), LOAD_R(buffered + (SIZE) / 2));       \
            }                                                                                      \
        }                                                                                          \
    }

ROW_IO(f32, float, F32_CHUNK, load_vf32, store_vf32)
ROW_IO(bf16, float, BF16_CHUNK, load_vf32, store_vf32)
#if defined(HAVE_F16)
ROW_IO(f16, float, F16_CHUNK, load_vf32, store_vf32)
#endif
ROW_IO(f64, double, F64_CHUNK, load_vf64, store_vf64)

/* ------------------------------------------------------------------ the algorithm, per REAL */

#define REAL float
#define VEC vf32
#define LANES F32_LANES
#define CHUNK F32_CHUNK
#define EXP exp_vf32
#define MAX max_vf32
#define ALL_SUM all_sum_vf32
#define ALL_MAX all_max_vf32
#define NEG_BIG (-1e30f) /* logit of padding slots: weight 0 */
#define REDUCE reduce_vf32
#define FN(name) name##_f32
#define LITERALS 1
#include "na2d_cpu_impl.h"
#undef REAL
#undef VEC
#undef LANES
#undef CHUNK
#undef EXP
#undef MAX
#undef ALL_SUM
#undef ALL_MAX
#undef NEG_BIG
#undef REDUCE
#undef FN
#undef LITERALS

#define REAL double
#define VEC vf64
#define LANES F64_LANES
#define CHUNK F64_CHUNK
#define EXP exp_vf64
#define MAX max_vf64
#define ALL_SUM all_sum_vf64
#define ALL_MAX all_max_vf64
#define NEG_BIG (-1e300)
#define REDUCE reduce_vf64
#define FN(name) name##_f64
#define LITERALS 0
#include "na2d_cpu_impl.h"

/* ------------------------------------------------------------------ entry points
 *
 * na2d_forward_<type>, na2d_backward_<type> and na2d_chunk_<type> for each storage type, on the
 * algorithm of its REAL (see na2d_cpu_impl.h for the arguments). */
#define ENTRY_POINTS(T, R, SIZE, CORE)                                                             \
    int32_t na2d_forward_##T(const na2d_geometry *g, const void *q, const void *k,                 \
                             const void *v, const R *rpb, double scale, void *out,                 \
                             int32_t threads) {                                                    \
        const row_io_##CORE io = {read_row_##T, write_row_##T};                                    \
        return forward_##CORE(g, &io, q, k, v, rpb, scale, out, threads);                          \
    }                                                                                              \
    int32_t na2d_backward_##T(const na2d_geometry *g, const void *q, const void *k,                \
                              const void *v, const R *rpb, double scale, const void *grad_out,     \
                              void *grad_q, void *grad_k, void *grad_v, R *rpb_partial,            \
                              R *grad_rpb, int32_t chunks, int32_t threads) {                      \
        const row_io_##CORE io = {read_row_##T, write_row_##T};                                    \
        return backward_##CORE(g, &io, q, k, v, rpb, scale, grad_out, grad_q, grad_k, grad_v,      \
                               rpb_partial, grad_rpb, chunks, threads);                            \
    }                                                                                              \
    int32_t na2d_chunk_##T(void) { return SIZE; }

ENTRY_POINTS(f32, float, F32_CHUNK, f32)
ENTRY_POINTS(bf16, float, BF16_CHUNK, f32)
#if defined(HAVE_F16)
ENTRY_POINTS(f16, float, F16_CHUNK, f32)
#endif
ENTRY_POINTS(f64, double, F64_CHUNK, f64)
