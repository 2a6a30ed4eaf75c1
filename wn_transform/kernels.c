/* Fused float32 CPU kernels for the output form of a weight-normalized Linear at few rows (and,
 * at the end of this file, the data-dependent init's per-layer statistics of a Linear or (transposed) conv).
 *
 * Compiled on first use by kernels.py (cc -O3 -march=native -fopenmp) and called through ctypes.
 * With R <= WN_MAX_ROWS rows, every pass over the weight is memory-bound, so what counts is how
 * often the weight v [out, in] crosses the memory bus.  With s = gain/||v|| per unit:
 *
 *   forward:  u[r, i] = v[i, :] . x[r, :],  ||v[i]||,  y[r, i] = u[r, i] s[i] + b[i]     one read of v
 *   backward: gv[i, :] = sum_r a[r, i] x[r, :] - c[i] v[i, :],  a = gy s,               one read of v,
 *             c[i] = s[i] dL/dgain[i] / ||v[i]||,  gx[r, :] = sum_i a[r, i] v[i, :]       one write of gv
 *
 * where eager ATen needs four passes beyond the plain layer's (the norms, and the projection as
 * a matmul followed by an in-place correction), and a dozen small ops per call that these
 * kernels do per unit.  Accumulation is float32, in 8-lane vectors, as a BLAS kernel does; gv is
 * written past the caches when it is large.
 *
 * The threads are OpenMP's: torch's CPU wheels load their own libgomp.so.1 first, and this
 * library, linked against the same soname, shares that runtime and its thread pool.
 */
#include <math.h>
#include <stdint.h>

#if !(defined(__AVX2__) && defined(__FMA__))
#error "wn_transform kernels need x86-64 with AVX2 and FMA"
#endif
#include <immintrin.h>

#define WN_MAX_ROWS 8 /* the most rows a call takes; kernels.py gives 1-8 on AMD CPUs, 1-4 elsewhere */
#define WN_INLINE static inline __attribute__((always_inline))
#define WN_MIN_BAND 256 /* columns per thread in the backward, at least: whole cache lines, long streams */
#define WN_PREFETCH 512 /* floats ahead: 2 KiB, measured best of 0-512 (1024x1024, 1 thread) */

int wn_kernels_version(void) { return 6; }
int wn_kernels_max_rows(void) { return WN_MAX_ROWS; }

WN_INLINE float sum_lanes(__m256 a) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_hadd_ps(s, s);
    s = _mm_hadd_ps(s, s);
    return _mm_cvtss_f32(s);
}

/* What the forward reads and writes (all contiguous float32). */
typedef struct {
    const float *x, *v, *g, *bias; /* [R, in], [out, in], [out] (log-gain with exp_scale), [out] or NULL */
    float *y, *u, *safe, *scale;   /* [R, out] output, [R, out] x @ v', [out] ||v|| (1 if 0), [out] gain/safe */
    int64_t in, out;
    int exp_scale;
} forward_args;

/* Units [i, i + U): their R dot products each and their squared norms, in one read of their rows of
 * v (U rows at once: independent memory streams and accumulator chains; x is loaded once for all),
 * then per unit: safe = ||v|| (1 for a zero direction: a zero row, not NaN), scale = gain / safe,
 * y = u * scale + bias. */
WN_INLINE void forward_units(const forward_args *f, int64_t i, const int U, const int R) {
    const float *x = f->x, *v = f->v;
    const int64_t in = f->in, out = f->out;
    __m256 s[4], a[4][WN_MAX_ROWS];
    for (int k = 0; k < U; ++k) {
        s[k] = _mm256_setzero_ps();
        for (int r = 0; r < R; ++r) a[k][r] = _mm256_setzero_ps();
    }
    int64_t j = 0;
    for (; j + 8 <= in; j += 8) {
        __m256 p[4];
        for (int k = 0; k < U; ++k) {
            const float *vk = v + (i + k) * in + j;
            _mm_prefetch((const char *)(vk + WN_PREFETCH), _MM_HINT_T0);
            p[k] = _mm256_loadu_ps(vk);
            s[k] = _mm256_fmadd_ps(p[k], p[k], s[k]);
        }
        for (int r = 0; r < R; ++r) {
            const __m256 xr = _mm256_loadu_ps(x + r * in + j);
            for (int k = 0; k < U; ++k) a[k][r] = _mm256_fmadd_ps(p[k], xr, a[k][r]);
        }
    }
    for (int k = 0; k < U; ++k) {
        const float *vk = v + (i + k) * in;
        float norm2 = sum_lanes(s[k]), acc[WN_MAX_ROWS];
        for (int r = 0; r < R; ++r) acc[r] = sum_lanes(a[k][r]);
        for (int64_t t = j; t < in; ++t) {
            norm2 += vk[t] * vk[t];
            for (int r = 0; r < R; ++r) acc[r] += vk[t] * x[r * in + t];
        }
        const int64_t unit = i + k;
        const float norm = sqrtf(norm2), safe = norm == 0.0f ? 1.0f : norm; /* as norm.py safe_norm */
        const float scale = (f->exp_scale ? expf(f->g[unit]) : f->g[unit]) / safe;
        const float bias = f->bias ? f->bias[unit] : 0.0f;
        f->safe[unit] = safe;
        f->scale[unit] = scale;
        for (int r = 0; r < R; ++r) {
            f->u[r * out + unit] = acc[r];
            f->y[r * out + unit] = acc[r] * scale + bias;
        }
    }
}

/* Columns [j0, j1) of gv (and of gx, which this block owns), scalar: heads and tails. */
WN_INLINE void backward_scalar(const float *a, float c, const float *x, const float *vi, float *gvi, float *gx,
                               int64_t j0, int64_t j1, int64_t in, const int R) {
    for (int64_t j = j0; j < j1; ++j) {
        const float p = vi[j];
        float g = -c * p;
        for (int r = 0; r < R; ++r) {
            g += a[r] * x[r * in + j];
            if (gx) gx[r * in + j] += a[r] * p;
        }
        gvi[j] = g;
    }
}

/* What the backward reads and writes (all contiguous float32). */
typedef struct {
    const float *gy, *x, *u, *safe, *scale, *v; /* [R, out], [R, in], [R, out], [out], [out], [out, in] */
    float *gv, *gx, *gg, *gb;                   /* [out, in], [R, in] or NULL, [out], [out] or NULL */
    int64_t in, out;
    int exp_scale, stream; /* stream: write gv past the caches (it is too large to stay there) */
} backward_args;

/* Columns [j0, j1) of every unit; the block with j0 = 0 also writes grad_g and grad_bias.  Per unit,
 * with a = gy * scale:  dL/dgain = sum_r gy u / safe,  c = dL/dgain * scale / safe,
 * gv = sum_r a x - c v  (the matmul gradient, projected),  gx += sum a v. */
WN_INLINE void backward_block(const backward_args *b, int64_t j0, int64_t j1, const int R) {
    const float *x = b->x, *v = b->v;
    float *gv = b->gv, *gx = b->gx;
    const int64_t in = b->in, out = b->out;
    const int stream = b->stream;
    if (gx)
        for (int r = 0; r < R; ++r)
            for (int64_t j = j0; j < j1; ++j) gx[r * in + j] = 0.0f;
    for (int64_t i = 0; i < out; ++i) {
        const float *vi = v + i * in;
        float *gvi = gv + i * in;
        const float safe = b->safe[i], scale = b->scale[i];
        float a[WN_MAX_ROWS], dot = 0.0f;
        __m256 va[WN_MAX_ROWS];
        for (int r = 0; r < R; ++r) {
            const float gy = b->gy[r * out + i];
            dot += gy * b->u[r * out + i];
            a[r] = gy * scale;
            va[r] = _mm256_set1_ps(a[r]);
        }
        const float grad_gain = dot / safe, c = grad_gain * scale / safe;
        if (j0 == 0) {
            b->gg[i] = b->exp_scale ? grad_gain * scale * safe : grad_gain; /* gain = e^g: times e^g */
            if (b->gb) {
                float sum = 0.0f;
                for (int r = 0; r < R; ++r) sum += b->gy[r * out + i];
                b->gb[i] = sum;
            }
        }
        const __m256 vc = _mm256_set1_ps(-c);
        int64_t j = j0;
        while (j < j1 && ((uintptr_t)(gvi + j) & 31)) ++j;  /* aligned stores from here */
        backward_scalar(a, c, x, vi, gvi, gx, j0, j, in, R);
        for (; j + 8 <= j1; j += 8) {
            _mm_prefetch((const char *)(vi + j + WN_PREFETCH), _MM_HINT_T0);
            const __m256 p = _mm256_loadu_ps(vi + j);
            __m256 g = _mm256_mul_ps(vc, p);
            for (int r = 0; r < R; ++r) {
                g = _mm256_fmadd_ps(va[r], _mm256_loadu_ps(x + r * in + j), g);
                if (gx) {
                    float *gxr = gx + r * in + j;
                    _mm256_storeu_ps(gxr, _mm256_fmadd_ps(va[r], p, _mm256_loadu_ps(gxr)));
                }
            }
            if (stream)
                _mm256_stream_ps(gvi + j, g);
            else
                _mm256_store_ps(gvi + j, g);
        }
        backward_scalar(a, c, x, vi, gvi, gx, j, j1, in, R);
    }
    if (stream) _mm_sfence();
}

/* One function per row count, each with its own parallel region: OpenMP outlines the loop body
 * into a function of its own, and only a literal R reaches it as a constant (every accumulator
 * then stays in a register).  In the backward, each thread owns a band of columns (at least
 * WN_MIN_BAND wide), so its slice of gx needs no synchronization. */
#define WN_DEFINE_ROWS(R)                                                                                  \
    static void forward_rows_##R(const forward_args *f, int threads) {                                     \
        enum { U = R == 1 ? 4 : R <= 3 ? 2 : 1 }; /* units per step: what fits 16 vector registers */      \
        const int64_t steps = f->out / U;                                                                  \
        _Pragma("omp parallel for num_threads(threads) if (threads > 1) schedule(static)")                \
        for (int64_t k = 0; k < steps; ++k) forward_units(f, k * U, U, R);                                 \
        for (int64_t i = steps * U; i < f->out; ++i) forward_units(f, i, 1, R);                            \
    }                                                                                                      \
    static void backward_rows_##R(const backward_args *b, int threads) {                                   \
        const int64_t most = b->in / WN_MIN_BAND > 1 ? b->in / WN_MIN_BAND : 1;                            \
        const int64_t blocks = threads < most ? (threads > 1 ? threads : 1) : most;                        \
        const int64_t width = ((b->in + blocks - 1) / blocks + 15) / 16 * 16;                              \
        _Pragma("omp parallel for num_threads(threads) if (threads > 1) schedule(static)")                \
        for (int64_t k = 0; k < blocks; ++k) {                                                             \
            const int64_t j0 = k * width, j1 = j0 + width < b->in ? j0 + width : b->in;                    \
            if (j0 < j1 || k == 0) backward_block(b, j0, j1, R);                                           \
        }                                                                                                  \
    }

WN_DEFINE_ROWS(1)
WN_DEFINE_ROWS(2)
WN_DEFINE_ROWS(3)
WN_DEFINE_ROWS(4)
WN_DEFINE_ROWS(5)
WN_DEFINE_ROWS(6)
WN_DEFINE_ROWS(7)
WN_DEFINE_ROWS(8)

/* One entry per row count, 1 .. WN_MAX_ROWS. */
static void (*const forward_rows[WN_MAX_ROWS])(const forward_args *, int) = {
    forward_rows_1, forward_rows_2, forward_rows_3, forward_rows_4,
    forward_rows_5, forward_rows_6, forward_rows_7, forward_rows_8};
static void (*const backward_rows[WN_MAX_ROWS])(const backward_args *, int) = {
    backward_rows_1, backward_rows_2, backward_rows_3, backward_rows_4,
    backward_rows_5, backward_rows_6, backward_rows_7, backward_rows_8};

/* y = (x @ v') * gain/||v|| + bias, keeping u = x @ v', safe and scale for the backward.
 * Returns 0, or -1 for a row count the kernels do not take. */
int wn_forward_f32(const float *x, const float *v, const float *g, const float *bias, float *y, float *u, float *safe,
                   float *scale, int64_t rows, int64_t in, int64_t out, int exp_scale, int threads) {
    if (rows < 1 || rows > WN_MAX_ROWS) return -1;
    const forward_args f = {x, v, g, bias, y, u, safe, scale, in, out, exp_scale};
    forward_rows[rows - 1](&f, threads);
    return 0;
}

/* The gradients of the forward above: gv [out, in], gx [rows, in] (NULL: not wanted), gg [out] of the
 * gain parameter, gb [out] of the bias (NULL: none).  Returns 0, or -1 for a bad row count. */
int wn_backward_f32(const float *gy, const float *x, const float *u, const float *safe, const float *scale,
                    const float *v, float *gv, float *gx, float *gg, float *gb, int64_t rows, int64_t in,
                    int64_t out, int exp_scale, int threads, int stream) {
    if (rows < 1 || rows > WN_MAX_ROWS) return -1;
    const backward_args b = {gy, x, u, safe, scale, v, gv, gx, gg, gb, in, out, exp_scale, stream};
    backward_rows[rows - 1](&b, threads);
    return 0;
}

/* ---- The data-dependent init's statistics of one layer (data_init.py) -----------------------------
 *
 * t = op(x, v) [outer, out, inner] (computed by the caller: a Linear's x @ v' has inner = 1, a
 * conv's output [N, C, *spatial] has outer = N and inner = the positions), v [out, in] (a conv's
 * [out, in/groups, *kernel] flattened; NULL when the caller wrote the norms, as for a transposed
 * conv, whose units are not rows of v):
 *   norm[j] = ||v[j]||,  mean[j], var[j] = mean and biased variance of t[:, j, :] (sums in double),
 *   gain = scale / sqrt(var) (inf for a constant unit: the pass checks for those after it),
 *   g[j] = gain * norm (its log with exp_scale),  bias[j] = -mean * gain (where bias is given),
 * and with `output`, t becomes the layer's new output in place: (t - mean) * gain with a bias
 * (which now centres it), t * gain without.  The eager route does this in a dozen small ops. */

#define WN_CAL_BLOCK 256 /* units per block of a Linear: its sums stay in L1, its rows in L2 */

WN_INLINE float row_norm(const float *v, int64_t in) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= in; j += 16) {
        const __m256 p = _mm256_loadu_ps(v + j), q = _mm256_loadu_ps(v + j + 8);
        s0 = _mm256_fmadd_ps(p, p, s0);
        s1 = _mm256_fmadd_ps(q, q, s1);
    }
    float s = sum_lanes(_mm256_add_ps(s0, s1));
    for (; j < in; ++j) s += v[j] * v[j];
    return sqrtf(s);
}

WN_INLINE double sum_lanes_pd(__m256d a) {
    __m128d s = _mm_add_pd(_mm256_castpd256_pd128(a), _mm256_extractf128_pd(a, 1));
    return _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)));
}

/* sum of (p[i] - c), or of its square, over a run of n floats, in double. */
WN_INLINE double run_sum(const float *p, int64_t n, double c, const int square) {
    const __m256d vc = _mm256_set1_pd(c);
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256d a = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(p + i)), vc);
        const __m256d b = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(p + i + 4)), vc);
        s0 = square ? _mm256_fmadd_pd(a, a, s0) : _mm256_add_pd(s0, a);
        s1 = square ? _mm256_fmadd_pd(b, b, s1) : _mm256_add_pd(s1, b);
    }
    double s = sum_lanes_pd(_mm256_add_pd(s0, s1));
    for (; i < n; ++i) {
        const double d = p[i] - c;
        s += square ? d * d : d;
    }
    return s;
}

typedef struct {
    float *t;
    const float *v;
    float *norm, *mean, *var, *g, *bias; /* [out] each; bias NULL where the layer has none */
    int64_t outer, out, inner, in;
    float scale;
    int exp_scale, output;
} calibrate_args;

/* From unit j's double mean and sum of centred squares: its statistics, g and bias; its gain and
 * the value its output is centred on. */
WN_INLINE void unit_fit(const calibrate_args *c, int64_t j, double mu, double squares, float *gain, float *centre) {
    const double variance = squares / (double)(c->outer * c->inner);
    if (c->v) c->norm[j] = row_norm(c->v + j * c->in, c->in); /* else the caller wrote the norms */
    c->mean[j] = (float)mu;
    c->var[j] = (float)variance;
    *gain = (float)(c->scale / sqrt(variance));
    const float gj = *gain * c->norm[j];
    c->g[j] = c->exp_scale ? logf(gj) : gj;
    if (c->bias) c->bias[j] = -(c->mean[j] * *gain);
    *centre = c->bias ? c->mean[j] : 0.0f;
}

/* Units [j0, j1) of a Linear (inner = 1): t's rows hold one value per unit, so the sums run
 * down the columns, a block of units at a time. */
static void calibrate_columns(const calibrate_args *c, int64_t j0, int64_t j1) {
    double sum[WN_CAL_BLOCK], mu[WN_CAL_BLOCK];
    float gain[WN_CAL_BLOCK], centre[WN_CAL_BLOCK];
    const int64_t w = j1 - j0, rows = c->outer, out = c->out;
    for (int64_t k = 0; k < w; ++k) sum[k] = 0.0;
    for (int64_t r = 0; r < rows; ++r) {
        const float *tr = c->t + r * out + j0;
        for (int64_t k = 0; k < w; ++k) sum[k] += tr[k];
    }
    for (int64_t k = 0; k < w; ++k) {
        mu[k] = sum[k] / (double)rows;
        sum[k] = 0.0;
    }
    for (int64_t r = 0; r < rows; ++r) { /* two passes: the centred squares, accurate */
        const float *tr = c->t + r * out + j0;
        for (int64_t k = 0; k < w; ++k) {
            const double d = tr[k] - mu[k];
            sum[k] += d * d;
        }
    }
    for (int64_t k = 0; k < w; ++k) unit_fit(c, j0 + k, mu[k], sum[k], gain + k, centre + k);
    if (!c->output) return;
    for (int64_t r = 0; r < rows; ++r) {
        float *tr = c->t + r * out + j0;
        for (int64_t k = 0; k < w; ++k) tr[k] = (tr[k] - centre[k]) * gain[k];
    }
}

/* Unit j of a layer with inner > 1 (a conv's channel): one contiguous run per outer index. */
static void calibrate_channel(const calibrate_args *c, int64_t j) {
    const int64_t stride = c->out * c->inner, n = c->inner;
    float *t = c->t + j * n;
    double sum = 0.0;
    for (int64_t o = 0; o < c->outer; ++o) sum += run_sum(t + o * stride, n, 0.0, 0);
    const double mu = sum / (double)(c->outer * n);
    double squares = 0.0;
    for (int64_t o = 0; o < c->outer; ++o) squares += run_sum(t + o * stride, n, mu, 1);
    float gain, centre;
    unit_fit(c, j, mu, squares, &gain, &centre);
    if (!c->output) return;
    for (int64_t o = 0; o < c->outer; ++o) {
        float *run = t + o * stride;
        for (int64_t i = 0; i < n; ++i) run[i] = (run[i] - centre) * gain;
    }
}

/* The statistics above for every unit, units split across threads; all contiguous float32. */
void wn_calibrate_f32(float *t, const float *v, float *norm, float *mean, float *var, float *g, float *bias,
                      int64_t outer, int64_t out, int64_t inner, int64_t in, float scale, int exp_scale, int output,
                      int threads) {
    const calibrate_args c = {t, v, norm, mean, var, g, bias, outer, out, inner, in, scale, exp_scale, output};
    if (inner > 1) {
        _Pragma("omp parallel for num_threads(threads) if (threads > 1 && out > 1) schedule(static)")
        for (int64_t j = 0; j < out; ++j) calibrate_channel(&c, j);
        return;
    }
    const int64_t blocks = (out + WN_CAL_BLOCK - 1) / WN_CAL_BLOCK, parts = blocks > threads ? blocks : threads;
    const int64_t width = ((out + parts - 1) / parts + 7) / 8 * 8; /* at most WN_CAL_BLOCK; a block per thread */
    const int64_t count = (out + width - 1) / width;
    _Pragma("omp parallel for num_threads(threads) if (threads > 1 && count > 1) schedule(static)")
    for (int64_t k = 0; k < count; ++k) calibrate_columns(&c, k * width, k * width + width < out ? k * width + width : out);
}
