/* Selective scan (Mamba S6 recurrence) for CPU tensors: forward and backward, OpenMP over
 * (batch, channel block) tasks, the time loop sequential, W channels ("lanes") of a block held
 * in one GCC/clang vector (W = 16 floats where the compiler targets AVX-512, else 8; 1 for channel
 * counts neither divides), so every step is a handful of SIMD instructions.
 *
 * Built on first use by common/ops/scan_cpu.py (cc -O3 -fopenmp -shared) and called through
 * ctypes; see that module for the layouts. Everything here is this project's own code.
 *
 *   dt[t]  = softplus(delta[t] + bias)                 (bias and softplus optional)
 *   h[t]   = exp(dt[t] * A) * h[t-1] + dt[t] * u[t] * B[t]
 *   out[t] = (sum_n C[t, n] * h[t, n] + D * u[t]) * silu(z[t])      (D and z optional)
 *
 * Time runs in segments of K steps: a segment's inputs are copied into small (K, W) tiles (the
 * transposition from the callers' channels-first layout happens there, in cache), the forward
 * keeps the state at every segment start (checkpoints), and the backward recomputes one
 * segment's states from its checkpoint and runs the adjoint recurrence through it backwards.
 *
 * Layouts (all contiguous, row-major):
 *   u, delta, z, out, dout, du, ddelta, dz   (batch, dim, L)
 *   At                      (N, dim)              A transposed
 *   B, C  fixed (g == 0):   (N, dim)              the (dim, N) parameter transposed
 *         grouped (g >= 1): (batch, g, L, N)      channel d uses group d / (dim / g)
 *   D, bias                 (dim)                 or NULL
 *   last, dlast, dA part    (batch, dim, N)
 *   dD part, dbias part     (batch, dim)
 *   ckpt                    (batch, dim / W, nseg, N, W): the state before step seg * K
 *   dB/dC parts: fixed (batch, dim, N), summed over time; grouped (batch, dim / W, L, N), summed
 *   over the W lanes of a block (all lanes of a block are in the same group).
 */
#ifndef SCAN_BODY
#define SCAN_BODY

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define VLANES 8
typedef float vf8 __attribute__((vector_size(8 * sizeof(float))));
typedef int32_t vi8 __attribute__((vector_size(8 * sizeof(int32_t))));
typedef float vf16 __attribute__((vector_size(16 * sizeof(float))));
typedef int32_t vi16 __attribute__((vector_size(16 * sizeof(int32_t))));

/* the widest vector the compiler targets natively: 16 floats with AVX-512 (one zmm register);
 * elsewhere the 16-lane code would be two 8-lane halves with more register pressure, so 8 */
#if defined(__AVX512F__)
#define WIDE_LANES 16
#else
#define WIDE_LANES 8
#endif

/* exp for float without library calls: Cody-Waite range reduction around the nearest integer k
 * (rounded with the 1.5 * 2^23 trick, exact for |k| < 2^22) and Cephes' degree-6 polynomial
 * (relative error ~2e-7). Inputs are clamped to [-87, 88]: below -87 the result is exp(-87)
 * ~ 1.6e-38 instead of underflowing to 0, which no sum here can tell apart. */
#define EXP_C1 0.693359375f
#define EXP_C2 2.12194440e-4f
#define EXP_MAGIC 12582912.0f
#define EXP_POLY(p, r)                          \
    p = r * 1.9875691500e-4f + 1.3981999507e-3f; \
    p = p * r + 8.3334519073e-3f;               \
    p = p * r + 4.1665795894e-2f;               \
    p = p * r + 1.6666665459e-1f;               \
    p = p * r + 5.0000001201e-1f;               \
    p = p * r * r + r + 1.0f;

static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : x;
    x = x > 88.0f ? 88.0f : x;
    float k = (x * 1.44269504088896341f + EXP_MAGIC) - EXP_MAGIC;
    float r = x - k * EXP_C1 + k * EXP_C2, p;
    EXP_POLY(p, r)
    int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* Clamps and the scaling by 2^k: one instruction each with AVX-512 (16 lanes) or AVX (8), else
 * generic code (compare and select; k into the exponent bits). The results are the same: x is
 * clamped first, so p * 2^k is a normal number and exact either way. */
#if defined(__AVX512F__)
#define MAX_vf16(a, b) ((vf16)_mm512_max_ps((__m512)(a), (__m512)(b)))
#define MIN_vf16(a, b) ((vf16)_mm512_min_ps((__m512)(a), (__m512)(b)))
#define SCALE2_vf16(p, k) ((vf16)_mm512_scalef_ps((__m512)(p), (__m512)(k)))
#endif
#if defined(__AVX__)
#define MAX_vf8(a, b) ((vf8)_mm256_max_ps((__m256)(a), (__m256)(b)))
#define MIN_vf8(a, b) ((vf8)_mm256_min_ps((__m256)(a), (__m256)(b)))
#endif
/* select(m, a, b): a where the lane mask m is set (-1), else b */
#define VEC_SEL(VF, VI) \
    static inline VF sel_##VF(VI m, VF a, VF b) { return (VF)(((VI)a & m) | ((VI)b & ~m)); }
VEC_SEL(vf8, vi8)
VEC_SEL(vf16, vi16)
#ifndef MAX_vf16
#define MAX_vf16(a, b) sel_vf16((a) < (b), b, a)
#define MIN_vf16(a, b) sel_vf16((a) > (b), b, a)
#endif
#ifndef MAX_vf8
#define MAX_vf8(a, b) sel_vf8((a) < (b), b, a)
#define MIN_vf8(a, b) sel_vf8((a) > (b), b, a)
#endif
#ifndef SCALE2_vf16
#define SCALE2_vf16(p, k) ((p) * (vf16)((__builtin_convertvector(k, vi16) + 127) << 23))
#endif
#define SCALE2_vf8(p, k) ((p) * (vf8)((__builtin_convertvector(k, vi8) + 127) << 23))

/* Per vector width (VF floats, VI int32 of the same lane count): exp and softplus. softplus(x) =
 * max(x, 0) + log1p(exp(-|x|)); log1p(e) for e in (0, 1] as 2 atanh(e / (2 + e)), an odd series in
 * s = e / (2 + e) <= 1/3 (7 terms: relative error < 1e-7, exact for tiny e). */
#define VEC_MATH(VF, VI)                                                          \
    static inline VF exp_##VF(VF x) {                                             \
        x = MIN_##VF(MAX_##VF(x, -87.0f - (VF){0}), 88.0f - (VF){0});             \
        VF k = (x * 1.44269504088896341f + EXP_MAGIC) - EXP_MAGIC;                \
        VF r = x - k * EXP_C1 + k * EXP_C2, p;                                    \
        EXP_POLY(p, r)                                                            \
        return SCALE2_##VF(p, k);                                                 \
    }                                                                             \
    static inline VF softplus_##VF(VF x) {                                        \
        const VF zero = (VF){0};                                                  \
        VF ax = sel_##VF(x < zero, zero - x, x);                                  \
        VF e = exp_##VF(zero - ax);                                               \
        VF s = e / (e + 2.0f), s2 = s * s;                                        \
        VF q = s2 * (1.0f / 13) + 1.0f / 11;                                      \
        q = q * s2 + 1.0f / 9;                                                    \
        q = q * s2 + 1.0f / 7;                                                    \
        q = q * s2 + 1.0f / 5;                                                    \
        q = q * s2 + 1.0f / 3;                                                    \
        q = q * s2 + 1.0f;                                                        \
        return sel_##VF(x > zero, x, zero) + 2.0f * s * q;                        \
    }
VEC_MATH(vf8, vi8)
VEC_MATH(vf16, vi16)

/* Level-h block swaps of two vectors (h = 1, 2, 4, 8): lo takes a's lanes j with bit h clear and
 * b's lanes j - h for the lanes with it set; hi takes a's lanes j + h (bit h clear) and b's lanes j
 * (set). Applied to rows i and i + h of a W x W tile for every h, they transpose it (each level swaps
 * bit h of the row index with bit h of the column index); applied to pairs of sums, they give the
 * lane sums of W vectors as one vector (sum16x16_vf16). */
#if defined(__clang__)
#define SHUF8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#define SHUF16(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUF8(a, b, ...) __builtin_shuffle(a, b, (vi8){__VA_ARGS__})
#define SHUF16(a, b, ...) __builtin_shuffle(a, b, (vi16){__VA_ARGS__})
#endif
#define LO8_1(a, b) SHUF8(a, b, 0, 8, 2, 10, 4, 12, 6, 14)
#define HI8_1(a, b) SHUF8(a, b, 1, 9, 3, 11, 5, 13, 7, 15)
#define LO8_2(a, b) SHUF8(a, b, 0, 1, 8, 9, 4, 5, 12, 13)
#define HI8_2(a, b) SHUF8(a, b, 2, 3, 10, 11, 6, 7, 14, 15)
#define LO8_4(a, b) SHUF8(a, b, 0, 1, 2, 3, 8, 9, 10, 11)
#define HI8_4(a, b) SHUF8(a, b, 4, 5, 6, 7, 12, 13, 14, 15)
#define LO16_1(a, b) SHUF16(a, b, 0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30)
#define HI16_1(a, b) SHUF16(a, b, 1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31)
#define LO16_2(a, b) SHUF16(a, b, 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29)
#define HI16_2(a, b) SHUF16(a, b, 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31)
#define LO16_4(a, b) SHUF16(a, b, 0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27)
#define HI16_4(a, b) SHUF16(a, b, 4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31)
#define LO16_8(a, b) SHUF16(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
#define HI16_8(a, b) SHUF16(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31)
#define SWAP_LEVEL(W, h, r)                                   \
    for (int i = 0; i < W; ++i)                               \
        if (!(i & h)) {                                       \
            const __typeof__(r[0]) a = r[i], b = r[i + h];    \
            r[i] = LO##W##_##h(a, b);                         \
            r[i + h] = HI##W##_##h(a, b);                     \
        }
/* r[i][j] <- r[j][i] */
static inline void transpose_vf8(vf8 *r) {
    SWAP_LEVEL(8, 1, r)
    SWAP_LEVEL(8, 2, r)
    SWAP_LEVEL(8, 4, r)
}
static inline void transpose_vf16(vf16 *r) {
    SWAP_LEVEL(16, 1, r)
    SWAP_LEVEL(16, 2, r)
    SWAP_LEVEL(16, 4, r)
    SWAP_LEVEL(16, 8, r)
}
/* the lane sums of 8 vectors at once, as one vector: three rounds of pairwise shuffles and adds
 * (21 operations instead of 8 horizontal sums). out[k] = sum_j v[k][j]. */
static inline vf8 sum8x8_vf8(const vf8 *v) {
    vf8 p[4], q[2];
    for (int i = 0; i < 4; ++i) p[i] = LO8_1(v[2 * i], v[2 * i + 1]) + HI8_1(v[2 * i], v[2 * i + 1]);
    for (int i = 0; i < 2; ++i) q[i] = LO8_2(p[2 * i], p[2 * i + 1]) + HI8_2(p[2 * i], p[2 * i + 1]);
    return LO8_4(q[0], q[1]) + HI8_4(q[0], q[1]);
}
/* the lane sums of 16 vectors of 16 lanes as one vector (45 operations): out[k] = sum_j v[k][j] */
static inline vf16 sum16x16_vf16(const vf16 *v) {
    vf16 p[8], q[4], r[2];
    for (int i = 0; i < 8; ++i) p[i] = LO16_1(v[2 * i], v[2 * i + 1]) + HI16_1(v[2 * i], v[2 * i + 1]);
    for (int i = 0; i < 4; ++i) q[i] = LO16_2(p[2 * i], p[2 * i + 1]) + HI16_2(p[2 * i], p[2 * i + 1]);
    for (int i = 0; i < 2; ++i) r[i] = LO16_4(q[2 * i], q[2 * i + 1]) + HI16_4(q[2 * i], q[2 * i + 1]);
    return LO16_8(r[0], r[1]) + HI16_8(r[0], r[1]);
}

/* the same for 8 vectors of 16 lanes: each folded to 8 lanes (its halves added) first */
static inline vf8 sum8x16_vf16(const vf16 *v) {
    vf8 f[8];
    for (int i = 0; i < 8; ++i) {
        vf8 lo, hi;
        memcpy(&lo, &v[i], sizeof lo);
        memcpy(&hi, (const char *)&v[i] + sizeof lo, sizeof hi);
        f[i] = lo + hi;
    }
    return sum8x8_vf8(f);
}

static inline float softplus_f32(float x) { return x > 20.0f ? x : log1pf(expf(x)); }
static inline double exp_f64(double x) { return exp(x); }
static inline double softplus_f64(double x) { return x > 30.0 ? x : log1p(exp(x)); }

#define CAT2(a, b) a##_##b
#define CAT(a, b) CAT2(a, b)

/* float, 16 channels per task (one AVX-512 vector) */
#define VSUM8 sum8x16_vf16
#define VSUM16 sum16x16_vf16
#define VTRANSPOSE transpose_vf16
#define T float
#define LT vf16
#define EXPL exp_vf16
#define SOFTPLUSL softplus_vf16
#define SUF f32w
#include __FILE__
#undef VSUM8
#undef VSUM16
#undef VTRANSPOSE
#undef T
#undef LT
#undef EXPL
#undef SOFTPLUSL
#undef SUF

/* float, 8 channels per task */
#define VSUM8 sum8x8_vf8
#define VTRANSPOSE transpose_vf8
#define T float
#define LT vf8
#define EXPL exp_vf8
#define SOFTPLUSL softplus_vf8
#define SUF f32v
#include __FILE__
#undef VSUM8
#undef VTRANSPOSE
#undef T
#undef LT
#undef EXPL
#undef SOFTPLUSL
#undef SUF

/* float, one channel per task (channel counts that 8 does not divide) */
#define T float
#define LT float
#define EXPL exp_f32
#define SOFTPLUSL softplus_f32
#define SUF f32s
#include __FILE__
#undef T
#undef LT
#undef EXPL
#undef SOFTPLUSL
#undef SUF

/* double, one channel per task (gradcheck) */
#define T double
#define LT double
#define EXPL exp_f64
#define SOFTPLUSL softplus_f64
#define SUF f64s
#include __FILE__
#undef T
#undef LT
#undef EXPL
#undef SOFTPLUSL
#undef SUF

static int check_args(int64_t dim, int64_t gb, int64_t gc, int64_t K, int W) {
    if (W < 1 || dim % W || K < 1) return -1;
    if (gb && (dim % gb || (dim / gb) % W)) return -1;
    if (gc && (dim % gc || (dim / gc) % W)) return -1;
    return 0;
}

#define FWD_ARGS(T)                                                                                        \
    const T *u, const T *delta, const T *bias, const T *At, const T *B, const T *C, const T *D, const T *z, \
        T *out, T *last, T *ckpt, int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t gb, int64_t gc, \
        int64_t K, int softplus, int W, int nthreads
#define BWD_ARGS(T)                                                                                        \
    const T *u, const T *delta, const T *bias, const T *At, const T *B, const T *C, const T *D, const T *z, \
        const T *dout, const T *dlast, const T *ckpt, T *du, T *ddelta, T *dz, T *dA, T *dB, T *dC, T *dD,  \
        T *dbias, int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t gb, int64_t gc, int64_t K,      \
        int softplus, int W, int nthreads
#define FWD_PASS u, delta, bias, At, B, C, D, z, out, last, ckpt, batch, dim, L, N, gb, gc, K, softplus, nthreads
#define BWD_PASS                                                                                         \
    u, delta, bias, At, B, C, D, z, dout, dlast, ckpt, du, ddelta, dz, dA, dB, dC, dD, dbias, batch, dim, L, \
        N, gb, gc, K, softplus, nthreads

/* The channels per task the kernel prefers for float: 16 with AVX-512, else 8 (callers fall back
 * to 8, then 1, where the channel counts need it). */
int ss_wide_lanes(void) { return WIDE_LANES; }

/* Entry points. W: channels per task, 16, 8 or 1 for float, 1 for double. Return 0; -1 for
 * arguments the kernel does not take; -2 when its work buffers cannot be allocated. */
int ss_fwd_f32(FWD_ARGS(float)) {
    if (check_args(dim, gb, gc, K, W) || (W != 2 * VLANES && W != VLANES && W != 1)) return -1;
    return W == 2 * VLANES ? ss_fwd_f32w(FWD_PASS) : W == VLANES ? ss_fwd_f32v(FWD_PASS) : ss_fwd_f32s(FWD_PASS);
}

int ss_bwd_f32(BWD_ARGS(float)) {
    if (check_args(dim, gb, gc, K, W) || (W != 2 * VLANES && W != VLANES && W != 1)) return -1;
    return W == 2 * VLANES ? ss_bwd_f32w(BWD_PASS) : W == VLANES ? ss_bwd_f32v(BWD_PASS) : ss_bwd_f32s(BWD_PASS);
}

int ss_fwd_f64(FWD_ARGS(double)) {
    if (check_args(dim, gb, gc, K, W) || W != 1) return -1;
    return ss_fwd_f64s(FWD_PASS);
}

int ss_bwd_f64(BWD_ARGS(double)) {
    if (check_args(dim, gb, gc, K, W) || W != 1) return -1;
    return ss_bwd_f64s(BWD_PASS);
}

#else /* ---------------------------------------- body, per (T, LT): lanes W = sizeof(LT) / sizeof(T) */

#define FN(name) CAT(name, SUF)
#define W ((int64_t)(sizeof(LT) / sizeof(T)))

static inline LT FN(load)(const T *p) { LT v; memcpy(&v, p, sizeof v); return v; }
static inline void FN(store)(T *p, LT v) { memcpy(p, &v, sizeof v); }
static inline LT FN(bcast)(T s) { return s - (LT){0}; }  /* s - 0 folds to s; s + 0 does not (-0) */
static inline LT FN(sigmoid)(LT x) { return 1.0f / (EXPL(0.0f - x) + 1.0f); }
static inline T FN(lane_sum)(LT v) {
    T a[sizeof(LT) / sizeof(T)], s = 0;
    memcpy(a, &v, sizeof v);
    for (int64_t j = 0; j < W; ++j) s += a[j];
    return s;
}
/* row[n] = lane sum of v[n], n < N (the grouped dB / dC of one step) */
static inline void FN(lane_sums)(T *row, const LT *v, int64_t N) {
    int64_t n = 0;
#ifdef VSUM16
    for (; n + 16 <= N; n += 16) FN(store)(row + n, VSUM16(v + n));
#endif
#ifdef VSUM8
    for (; n + 8 <= N; n += 8) {
        const vf8 sums = VSUM8(v + n);
        memcpy(row + n, &sums, sizeof sums);
    }
#endif
    for (; n < N; ++n) row[n] = FN(lane_sum)(v[n]);
}
/* B or C of the block's lanes at step t, state n: fixed (N, dim) at columns d0..d0+W; grouped:
 * the (b, group) slab (L, N), the same value for every lane. */
static inline LT FN(bc)(const T *P, int fixed, int64_t dim, int64_t d0, int64_t N, int64_t t, int64_t n) {
    return fixed ? FN(load)(P + n * dim + d0) : FN(bcast)(P[t * N + n]);
}
/* per-channel vector (D, bias) of the block, or 0 */
static inline LT FN(chan)(const T *v, int64_t d0) { return v ? FN(load)(v + d0) : FN(bcast)(0); }

#ifdef VTRANSPOSE
/* one W x W block: dst[k * dst_stride + i] = src[i * src_stride + k], through W vector loads, an
 * in-register transpose and W vector stores */
static inline void FN(transpose_block)(T *dst, int64_t dst_stride, const T *src, int64_t src_stride) {
    LT r[sizeof(LT) / sizeof(T)];
    for (int64_t i = 0; i < W; ++i) r[i] = FN(load)(src + i * src_stride);
    VTRANSPOSE(r);
    for (int64_t k = 0; k < W; ++k) FN(store)(dst + k * dst_stride, r[k]);
}
#endif
/* tile[i * W + j] = src[(row0 + j) * L + t0 + i]: W channel rows into a (nt, W) tile; whole W x W
 * blocks transposed in registers, the rest element by element */
static inline void FN(gather)(T *tile, const T *src, int64_t row0, int64_t L, int64_t t0, int64_t nt) {
    int64_t i0 = 0;
#ifdef VTRANSPOSE
    for (; i0 + W <= nt; i0 += W) FN(transpose_block)(tile + i0 * W, W, src + row0 * L + t0 + i0, L);
#endif
    for (int64_t j = 0; j < W; ++j) {
        const T *s = src + (row0 + j) * L + t0;
        for (int64_t i = i0; i < nt; ++i) tile[i * W + j] = s[i];
    }
}
static inline void FN(scatter)(T *dst, const T *tile, int64_t row0, int64_t L, int64_t t0, int64_t nt) {
    int64_t i0 = 0;
#ifdef VTRANSPOSE
    for (; i0 + W <= nt; i0 += W) FN(transpose_block)(dst + row0 * L + t0 + i0, L, tile + i0 * W, W);
#endif
    for (int64_t j = 0; j < W; ++j) {
        T *d = dst + (row0 + j) * L + t0;
        for (int64_t i = i0; i < nt; ++i) d[i] = tile[i * W + j];
    }
}
/* dt tile from the delta tile: + bias, softplus; with sig, also sigmoid(delta + bias) (softplus') */
static inline void FN(make_dt)(T *tdt, T *sig, const T *bias, int64_t d0, int64_t nt, int softplus) {
    const LT bv = FN(chan)(bias, d0);
    for (int64_t i = 0; i < nt; ++i) {
        LT r = FN(load)(tdt + i * W) + bv;
        if (softplus) {
            if (sig) FN(store)(sig + i * W, FN(sigmoid)(r));
            r = SOFTPLUSL(r);
        }
        FN(store)(tdt + i * W, r);
    }
}

static LT *FN(alloc)(int64_t count) {
    size_t bytes = sizeof(LT) * (size_t)count;
    bytes = (bytes + 63) / 64 * 64;
    return (LT *)aligned_alloc(64, bytes);
}

static inline __attribute__((always_inline)) void FN(fwd_task)(
    const T *u, const T *delta, const T *bias, const T *At, const T *B, const T *C, const T *D, const T *z, T *out,
    T *last, T *ckpt, int64_t dim, int64_t L, int64_t N, int64_t gb, int64_t gc, int64_t K, int softplus,
    int64_t b, int64_t blk, LT *work, const int bfix, const int cfix) {
    const int64_t d0 = blk * W, nblk = dim / W, nseg = (L + K - 1) / K, row0 = b * dim + d0;
    const T *Bp = bfix ? B : B + ((b * gb + d0 / (dim / gb)) * L) * N;
    const T *Cp = cfix ? C : C + ((b * gc + d0 / (dim / gc)) * L) * N;
    T *ckT = ckpt + (b * nblk + blk) * nseg * N * W;
    /* work: h (N) | tiles u, dt, z, y (K each) */
    LT *h = work, *tu = h + N, *tdt = tu + K, *tz = tdt + K, *ty = tz + K;
    const LT Dv = FN(chan)(D, d0);
    for (int64_t n = 0; n < N; ++n) h[n] = FN(bcast)(0);
    for (int64_t seg = 0; seg < nseg; ++seg) {
        const int64_t t0 = seg * K, nt = (t0 + K < L ? t0 + K : L) - t0;
        memcpy(ckT + seg * N * W, h, sizeof(LT) * N);
        FN(gather)((T *)tu, u, row0, L, t0, nt);
        FN(gather)((T *)tdt, delta, row0, L, t0, nt);
        FN(make_dt)((T *)tdt, (T *)0, bias, d0, nt, softplus);
        if (z) FN(gather)((T *)tz, z, row0, L, t0, nt);
        for (int64_t i = 0; i < nt; ++i) {
            const int64_t t = t0 + i;
            const LT dv = tdt[i], uv = tu[i], x = dv * uv;
            LT yv = Dv * uv;
            for (int64_t n = 0; n < N; ++n) {
                const LT a = EXPL(dv * FN(load)(At + n * dim + d0));
                const LT hv = a * h[n] + x * FN(bc)(Bp, bfix, dim, d0, N, t, n);
                h[n] = hv;
                yv += FN(bc)(Cp, cfix, dim, d0, N, t, n) * hv;
            }
            if (z) yv *= tz[i] * FN(sigmoid)(tz[i]);
            ty[i] = yv;
        }
        FN(scatter)(out, (const T *)ty, row0, L, t0, nt);
    }
    for (int64_t n = 0; n < N; ++n) {
        T hn[sizeof(LT) / sizeof(T)];
        memcpy(hn, &h[n], sizeof(LT));
        for (int64_t j = 0; j < W; ++j) last[(row0 + j) * N + n] = hn[j];
    }
}

static inline __attribute__((always_inline)) void FN(bwd_task)(
    const T *u, const T *delta, const T *bias, const T *At, const T *B, const T *C, const T *D, const T *z,
    const T *dout, const T *dlast, const T *ckpt, T *du, T *ddelta, T *dz, T *dA, T *dB, T *dC, T *dD, T *dbias,
    int64_t dim, int64_t L, int64_t N, int64_t gb, int64_t gc, int64_t K, int softplus, int64_t b, int64_t blk,
    LT *work, const int bfix, const int cfix) {
    const int64_t d0 = blk * W, nblk = dim / W, nseg = (L + K - 1) / K, row0 = b * dim + d0;
    const T *Bp = bfix ? B : B + ((b * gb + d0 / (dim / gb)) * L) * N;
    const T *Cp = cfix ? C : C + ((b * gc + d0 / (dim / gc)) * L) * N;
    const T *ckT = ckpt + (b * nblk + blk) * nseg * N * W;
    /* work: g | anext | dA | dB (fixed) | dC (fixed) | dB, dC of one step (grouped), N each |
     * hs (K + 1) N | as K N | tiles u, dt, sig, z, dout, du, ddt, dz (K each) */
    LT *g = work, *anext = g + N, *dAa = anext + N, *dBa = dAa + N, *dCa = dBa + N;
    LT *dBt = dCa + N, *dCt = dBt + N;
    LT *hs = dCt + N, *as = hs + (K + 1) * N;
    LT *tu = as + K * N, *tdt = tu + K, *tsig = tdt + K, *tz = tsig + K, *tdo = tz + K;
    LT *tdu = tdo + K, *tddt = tdu + K, *tdz = tddt + K;
    const LT Dv = FN(chan)(D, d0);
    LT dDa = FN(bcast)(0), dbiasa = FN(bcast)(0);
    for (int64_t n = 0; n < N; ++n) {
        T gl[sizeof(LT) / sizeof(T)];
        for (int64_t j = 0; j < W; ++j) gl[j] = dlast ? dlast[(row0 + j) * N + n] : 0;
        memcpy(&g[n], gl, sizeof(LT));
        anext[n] = FN(bcast)(1);
        dAa[n] = dBa[n] = dCa[n] = FN(bcast)(0);
    }
    T *dBrow = bfix ? (T *)0 : dB + (b * nblk + blk) * L * N;
    T *dCrow = cfix ? (T *)0 : dC + (b * nblk + blk) * L * N;
    for (int64_t seg = nseg - 1; seg >= 0; --seg) {
        const int64_t t0 = seg * K, nt = (t0 + K < L ? t0 + K : L) - t0;
        FN(gather)((T *)tu, u, row0, L, t0, nt);
        FN(gather)((T *)tdt, delta, row0, L, t0, nt);
        FN(make_dt)((T *)tdt, (T *)tsig, bias, d0, nt, softplus);
        FN(gather)((T *)tdo, dout, row0, L, t0, nt);
        if (z) FN(gather)((T *)tz, z, row0, L, t0, nt);
        /* the segment's states again, from its checkpoint; keep the decays */
        memcpy(hs, ckT + seg * N * W, sizeof(LT) * N);
        for (int64_t i = 0; i < nt; ++i) {
            const int64_t t = t0 + i;
            const LT dv = tdt[i], x = dv * tu[i];
            const LT *hp = hs + i * N;
            LT *hc = hs + (i + 1) * N, *ac = as + i * N;
            for (int64_t n = 0; n < N; ++n) {
                const LT a = EXPL(dv * FN(load)(At + n * dim + d0));
                ac[n] = a;
                hc[n] = a * hp[n] + x * FN(bc)(Bp, bfix, dim, d0, N, t, n);
            }
        }
        /* adjoint, backwards: g[t] = C[t] dy[t] + a[t+1] g[t+1] */
        for (int64_t i = nt - 1; i >= 0; --i) {
            const int64_t t = t0 + i;
            const LT dv = tdt[i], uv = tu[i], x = dv * uv;
            LT dyv = tdo[i], sgz = FN(bcast)(0);
            if (z) { sgz = FN(sigmoid)(tz[i]); dyv = dyv * tz[i] * sgz; }  /* d out / d y = silu(z) */
            LT sB = FN(bcast)(0), dda = FN(bcast)(0), yv = Dv * uv;
            const LT *hp = hs + i * N, *hc = hs + (i + 1) * N, *ac = as + i * N;
            for (int64_t n = 0; n < N; ++n) {
                const LT bv = FN(bc)(Bp, bfix, dim, d0, N, t, n), cv = FN(bc)(Cp, cfix, dim, d0, N, t, n);
                const LT gv = g[n] * anext[n] + cv * dyv;
                g[n] = gv;
                yv += cv * hc[n];
                const LT dCv = dyv * hc[n], dBv = gv * x, w = gv * hp[n] * ac[n];
                if (cfix) dCa[n] += dCv; else dCt[n] = dCv;
                if (bfix) dBa[n] += dBv; else dBt[n] = dBv;
                sB += gv * bv;
                dda += w * FN(load)(At + n * dim + d0);
                dAa[n] += w * dv;
                anext[n] = ac[n];
            }
            if (!cfix) FN(lane_sums)(dCrow + t * N, dCt, N);
            if (!bfix) FN(lane_sums)(dBrow + t * N, dBt, N);
            if (z) tdz[i] = tdo[i] * yv * sgz * (tz[i] * (1.0f - sgz) + 1.0f);
            tdu[i] = dv * sB + dyv * Dv;
            dDa += dyv * uv;
            LT ddt = uv * sB + dda;
            if (softplus) ddt *= tsig[i];
            tddt[i] = ddt;
            dbiasa += ddt;
        }
        FN(scatter)(du, (const T *)tdu, row0, L, t0, nt);
        FN(scatter)(ddelta, (const T *)tddt, row0, L, t0, nt);
        if (z) FN(scatter)(dz, (const T *)tdz, row0, L, t0, nt);
    }
    FN(store)(dD + row0, dDa);
    FN(store)(dbias + row0, dbiasa);
    for (int64_t n = 0; n < N; ++n) {
        T a[sizeof(LT) / sizeof(T)], bb[sizeof(LT) / sizeof(T)], c[sizeof(LT) / sizeof(T)];
        memcpy(a, &dAa[n], sizeof(LT));
        memcpy(bb, &dBa[n], sizeof(LT));
        memcpy(c, &dCa[n], sizeof(LT));
        for (int64_t j = 0; j < W; ++j) {
            const int64_t o = (row0 + j) * N + n;
            dA[o] = a[j];
            if (bfix) dB[o] = bb[j];
            if (cfix) dC[o] = c[j];
        }
    }
}

#define DISPATCH(call)                          \
    do {                                        \
        if (bfix && cfix) call(1, 1);           \
        else if (bfix) call(1, 0);              \
        else if (cfix) call(0, 1);              \
        else call(0, 0);                        \
    } while (0)

/* one parallel loop over (batch, block) tasks with a per-thread work buffer of `count` vectors */
#define TASK_LOOP(count, body)                                           \
    const int bfix = gb == 0, cfix = gc == 0;                            \
    const int64_t nblk = dim / W, ntask = batch * nblk;                  \
    int failed = 0;                                                      \
    _Pragma("omp parallel num_threads(nthreads)") {                      \
        LT *work = FN(alloc)(count);                                     \
        if (!work) {                                                     \
            _Pragma("omp atomic write") failed = 1;                      \
        }                                                                \
        _Pragma("omp for schedule(dynamic, 1)")                          \
        for (int64_t task = 0; task < ntask; ++task) {                   \
            if (!work) continue;                                         \
            const int64_t b = task / nblk, blk = task % nblk;            \
            body;                                                        \
        }                                                                \
        free(work);                                                      \
    }                                                                    \
    return failed ? -2 : 0;

static int FN(ss_fwd)(const T *u, const T *delta, const T *bias, const T *At, const T *B, const T *C, const T *D,
                      const T *z, T *out, T *last, T *ckpt, int64_t batch, int64_t dim, int64_t L, int64_t N,
                      int64_t gb, int64_t gc, int64_t K, int softplus, int nthreads) {
#define FWD(BF, CF) \
    FN(fwd_task)(u, delta, bias, At, B, C, D, z, out, last, ckpt, dim, L, N, gb, gc, K, softplus, b, blk, work, BF, CF)
    TASK_LOOP(N + 4 * K, DISPATCH(FWD))
#undef FWD
}

static int FN(ss_bwd)(const T *u, const T *delta, const T *bias, const T *At, const T *B, const T *C, const T *D,
                      const T *z, const T *dout, const T *dlast, const T *ckpt, T *du, T *ddelta, T *dz, T *dA,
                      T *dB, T *dC, T *dD, T *dbias, int64_t batch, int64_t dim, int64_t L, int64_t N, int64_t gb,
                      int64_t gc, int64_t K, int softplus, int nthreads) {
#define BWD(BF, CF)                                                                                            \
    FN(bwd_task)(u, delta, bias, At, B, C, D, z, dout, dlast, ckpt, du, ddelta, dz, dA, dB, dC, dD, dbias, dim, \
                 L, N, gb, gc, K, softplus, b, blk, work, BF, CF)
    TASK_LOOP(N * (7 + 2 * K + 1) + 8 * K, DISPATCH(BWD))
#undef BWD
}

#undef TASK_LOOP
#undef DISPATCH
#undef W
#undef FN

#endif /* SCAN_BODY */
