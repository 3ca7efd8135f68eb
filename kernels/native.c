/* Fused CPU kernels for a bf16 decode step (see kernels/native.py, which builds this file with
 * the machine's C compiler for the machine's own CPU, loads it with ctypes and checks every
 * kernel against its torch version before using it).
 *
 * Why: at batch 1 a SmolLM2 layer is ~55 torch ops of a few microseconds each around four
 * matrix products; these kernels do the same work in four calls (a residual add fused with
 * the RMSNorm, RoPE fused with the KV write, paged decode attention reading each page once in
 * place, SiLU times up). Rounding follows the torch ops they replace: every op that torch
 * computes in bf16 rounds here too (round to nearest even), float32 where torch uses float32.
 *
 * bf16 values are uint16_t bit patterns; strides are in elements; `threads` is the caller's
 * torch thread count (OpenMP: torch's own libgomp where native.py finds it).
 */
#include <float.h>
#include "native.h"
/* the bf16 GEMV's two builds (see gemv_rows): AVX-512 BF16, or AVX2 + FMA emulating it */
#if defined(__AVX512BF16__) || (defined(__AVX2__) && defined(__FMA__))
#define HAVE_GEMV_BF16 1
#define HAVE_PREFILL_ATTENTION 1  /* the same two builds (see prefill_item) */
#endif
/* the int8 products: AVX-512 BW (the int16 multiply-adds) and DQ (int64 -> float), else
 * AVX2 (the same integer sums on 8 lanes, GEMV_INT8_AVX2) */
#if defined(__AVX512BW__) && defined(__AVX512DQ__)
#define HAVE_GEMV_INT8 1
#elif defined(__AVX2__) && defined(__FMA__)
#define HAVE_GEMV_INT8 1
#define GEMV_INT8_AVX2 1
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>  /* the GEMVs, attention and LoRA use intrinsics; the rest is portable C */
#endif
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
/* the two OpenMP calls used, declared here: no omp.h needed (Clang ships none without
 * libomp-dev; the library links torch's libgomp) */
int omp_get_thread_num(void);
int omp_get_num_threads(void);
#endif

static inline float bf2f(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

#ifdef HAVE_GEMV_BF16
#define MXCSR_DAZ_FTZ 0x8040u

/* the 16 lanes' sum in one fixed order: s_i = v_{i+8} + v_i, t_j = s_{j+4} + s_j,
 * (t_0 + t_2) + (t_1 + t_3); the empty asm keeps -ffast-math from reassociating it (or the
 * caller's bias into it) */
static inline __attribute__((unused)) float gemv_hsum(__m256 lo, __m256 hi) {
    __m256 s = _mm256_add_ps(hi, lo);
    __asm__("" : "+x"(s));
    __m128 t = _mm_add_ps(_mm256_extractf128_ps(s, 1), _mm256_castps256_ps128(s));
    __asm__("" : "+x"(t));
    __m128 u = _mm_add_ps(t, _mm_shuffle_ps(t, t, _MM_SHUFFLE(1, 0, 3, 2)));
    __asm__("" : "+x"(u));
    float u0 = _mm_cvtss_f32(u), u1 = _mm_cvtss_f32(_mm_shuffle_ps(u, u, 1));
    float r = u0 + u1;
    __asm__("" : "+x"(r));
    return r;
}

#ifndef __AVX512BF16__
/* vdpbf16ps on 8 lanes (the caller sets MXCSR's DAZ and FTZ, as the instruction implies):
 * lane = fma(x_odd, w_odd, lane), then fma(x_even, w_even, lane); odd elements are the high
 * halves of the 32-bit lanes */
static inline __m256 dp8_bf16(__m256 a, __m256i x, __m256i w) {
    const __m256i hi16 = _mm256_set1_epi32((int)0xffff0000u);
    a = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(x, hi16)),
                        _mm256_castsi256_ps(_mm256_and_si256(w, hi16)), a);
    return _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(x, 16)),
                           _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)), a);
}
#endif
#endif

#ifdef __AVX512F__
/* helpers of the AVX-512 kernels; a build that has some of those kernels and not others
 * leaves some unused */
#define SIMD_HELPER static inline __attribute__((unused))

/* e^x, float32, for x <= 0 (a score minus its row's max): 2^n e^r, n = round(x / ln 2),
 * r = x - n ln 2 in two parts, e^r by its Taylor polynomial of degree 6 (|r| <= ln 2 / 2:
 * relative error < 2e-7); below -87, 2^n underflows to 0 through scalef */
SIMD_HELPER __m512 exp512(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* out[e] = the sum of v[e]'s 16 lanes, for 16 vectors at once, in gemv_hsum's tree
 * (s_i = v_{i+8} + v_i, t_j = s_{j+4} + s_j, (t_0 + t_2) + (t_1 + t_3)): each level adds the
 * same lanes, gathered from several vectors by shuffles (45 instructions for 16 sums instead
 * of ~160), each level behind an empty asm so -ffast-math cannot reassociate it. */
static inline __attribute__((always_inline, unused)) __m512 sum16_tree(const __m512 *v) {
#define TREE_ADD(x, y) _mm512_add_ps(x, y)
    __m512 a[8], b[4], c[2];
    for (int p = 0; p < 8; p++) {  /* s: lanes i and i + 8 of v[2p] (low half), v[2p+1] */
        a[p] = TREE_ADD(_mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0xee),
                        _mm512_shuffle_f32x4(v[2 * p], v[2 * p + 1], 0x44));
        __asm__("" : "+v"(a[p]));
    }
    for (int q = 0; q < 4; q++) {  /* t: lanes j and j + 4 of each s; quarter r: v[4q + r] */
        b[q] = TREE_ADD(_mm512_shuffle_f32x4(a[2 * q], a[2 * q + 1], 0xdd),
                        _mm512_shuffle_f32x4(a[2 * q], a[2 * q + 1], 0x88));
        __asm__("" : "+v"(b[q]));
    }
    for (int r = 0; r < 2; r++) {  /* t0 + t2, t1 + t3 */
        c[r] = TREE_ADD(_mm512_shuffle_ps(b[2 * r], b[2 * r + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                        _mm512_shuffle_ps(b[2 * r], b[2 * r + 1], _MM_SHUFFLE(3, 2, 3, 2)));
        __asm__("" : "+v"(c[r]));
    }
    __m512 r = TREE_ADD(_mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(2, 0, 2, 0)),
                        _mm512_shuffle_ps(c[0], c[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __asm__("" : "+v"(r));  /* lane 4 i + k: v[i + 4 k] */
#undef TREE_ADD
    const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11,
                                            15);
    return _mm512_permutexvar_ps(order, r);
}

/* r[k] = 16 u32 of row k -> r[c] = column c of the 16 rows (element k: row k's) */
SIMD_HELPER void transpose16_u32(__m512i *r) {
    __m512i t[16], u[16];
    for (int i = 0; i < 16; i += 2) {  /* in each 128-bit lane: rows i, i+1 interleaved */
        t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
        t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
    }
    for (int i = 0; i < 16; i += 4) {  /* u[i + c], lane L: rows i..i+3 of column 4 L + c */
        u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
        u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
        u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
        u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
    }
    for (int c = 0; c < 4; c++) {  /* column 4 L + c gathers lane L of u[c], u[4+c], ... */
        __m512i p0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
        __m512i p1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
        __m512i q0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        __m512i q1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
        r[c] = _mm512_shuffle_i32x4(p0, q0, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(p0, q0, 0xdd);
        r[8 + c] = _mm512_shuffle_i32x4(p1, q1, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(p1, q1, 0xdd);
    }
}

/* 16 bf16 values at p widened to float32 (exact) */
SIMD_HELPER __m512 bf16x16_loadu(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)p)), 16));
}

SIMD_HELPER __m512 bf16_round_ps(__m512 v) {  /* round to bf16 (nearest even), kept float */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    return _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32((int)0xffff0000u)));
}

#endif

#define MAX_DIM 16384     /* hidden and intermediate sizes (native.py checks) */
#define MAX_HEAD_DIM 256
#define MAX_GROUP 16      /* query heads per KV head */
#define MAX_LORA_COLS 768 /* a group's A rows, projections x rank: rank <= 256 (native.py) */

/* which kernels with intrinsics this build has: bit 0 the bf16 GEMV (AVX-512 BF16, or AVX2 +
 * FMA: bit 3), bit 1 the int8 one (AVX-512 BW or AVX2), bit 2 prefill attention and bit 4 the 4-bit
 * product (the GEMV's builds);
 * the others are built everywhere */
int gp_gemv_features(void) {
    int f = 0;
#ifdef HAVE_GEMV_BF16
    f |= 1;
#endif
#ifdef HAVE_PREFILL_ATTENTION
    f |= 4;
#endif
#if defined(HAVE_GEMV_BF16) && !defined(__AVX512BF16__)
    f |= 8;
#endif
#ifdef HAVE_GEMV_INT8
    f |= 2;
#endif
#ifdef HAVE_GEMV_BF16
    f |= 16;  /* the 4-bit product (HAVE_GEMV_INT4: the bf16 GEMV's builds) */
#endif
    return f;
}

/* the calling OpenMP thread's contiguous share [n0, n1) of N rows (all of them outside a
 * parallel region) */
static inline void thread_share(int64_t N, int64_t *n0, int64_t *n1) {
    int64_t t = 0, nt = 1;
#ifdef _OPENMP
    t = omp_get_thread_num();
    nt = omp_get_num_threads();
#endif
    int64_t per = (N + nt - 1) / nt;
    *n0 = t * per;
    *n1 = *n0 + per < N ? *n0 + per : N;
}

/* x[r] += delta[r] (in bf16, when delta is not NULL), then
 * out[r] = bf16(w * bf16(x * rsqrt(mean(x^2) + eps))), as transformers' LlamaRMSNorm. */
/* Each kernel's work is a *_body function: its loop shared by the calling OpenMP team (an
 * orphaned worksharing loop: alone, the gp_* wrapper opens a team; gp_decode_layers runs every
 * body of a step inside one team, with barriers instead of a thread fork and join per op). */
static inline void rmsnorm_row(uint16_t *xr, const uint16_t *dr, const void *w, int w32,
                               uint16_t *orow, int64_t dim, float eps) {
    float xf[MAX_DIM];
    float ss = 0.0f;
    if (dr) {
        for (int64_t i = 0; i < dim; i++) {
            float v = round_bf(bf2f(xr[i]) + bf2f(dr[i]));
            xr[i] = f2bf(v);
            xf[i] = v;
            ss += v * v;
        }
    } else {
        for (int64_t i = 0; i < dim; i++) {
            float v = bf2f(xr[i]);
            xf[i] = v;
            ss += v * v;
        }
    }
    float inv = 1.0f / sqrtf(ss / (float)dim + eps);
    if (w32) {  /* Gemma's 1 + weight in float32: scaled in float32, rounded once */
        const float *wf = (const float *)w;
        for (int64_t i = 0; i < dim; i++) orow[i] = f2bf(xf[i] * inv * wf[i]);
    } else {
        const uint16_t *wb = (const uint16_t *)w;
        for (int64_t i = 0; i < dim; i++) orow[i] = f2bf(bf2f(wb[i]) * round_bf(xf[i] * inv));
    }
}

/* w32: the weight is float32 (Gemma's norms, kept as 1 + weight): out[r] = bf16(x * rsqrt(
 * mean(x^2) + eps) * w) in float32, as transformers' GemmaRMSNorm; else bf16, as above */
static void add_rmsnorm_body(uint16_t *x, int64_t ldx, const uint16_t *delta, int64_t ldd,
                             const void *w, int w32, uint16_t *out, int64_t ldo, int64_t rows,
                             int64_t dim, float eps) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++)
        rmsnorm_row(x + r * ldx, delta ? delta + r * ldd : NULL, w, w32, out + r * ldo, dim,
                    eps);
}

void gp_add_rmsnorm(uint16_t *x, int64_t ldx, const uint16_t *delta, int64_t ldd,
                    const void *w, int w32, uint16_t *out, int64_t ldo, int64_t rows,
                    int64_t dim, float eps, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    #pragma omp parallel num_threads(threads) if (rows * dim >= 65536)
    add_rmsnorm_body(x, ldx, delta, ldd, w, w32, out, ldo, rows, dim, eps);
}

/* heads h0 .. h0 + nh - 1 (of D values each) of every row of qkv [T][ld], each normed in
 * place as one row of add_rmsnorm (the q_norm and k_norm of Qwen3 and Gemma 3, before
 * RoPE) */
static void head_norms_body(uint16_t *qkv, int64_t ld, int64_t T, int64_t h0, int64_t nh,
                            int64_t D, const void *w, int w32, float eps) {
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < T * nh; i++) {
        uint16_t *x = qkv + (i / nh) * ld + (h0 + i % nh) * D;
        rmsnorm_row(x, NULL, w, w32, x, D, eps);
    }
}

void gp_head_norms(uint16_t *qkv, int64_t ld, int64_t T, int64_t h0, int64_t nh, int64_t D,
                   const void *w, int w32, float eps, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    #pragma omp parallel num_threads(threads) if (T * nh * D >= 65536)
    head_norms_body(qkv, ld, T, h0, nh, D, w, w32, eps);
}

/* out[r] = bf16(bf16(silu(g)) * u) for g = gu[r, :inter], u = gu[r, inter:2*inter]. */
/* e^x for |x| <= 88 in float32 operations every build does alike (the compiler vectorises
 * them to the same instructions on 8 or 16 lanes; a vectorised libm expf differs between the
 * AVX2 and AVX-512 builds): 2^n e^r as exp512, n >= -126 (below, e^x < 2^-126: 1 + e^x = 1,
 * all SiLU needs) */
static inline float exp_fixed(float x) {
    float n = rintf(x * 1.44269504088896341f);
    n = n < -126.0f ? -126.0f : n;
    float r = fmaf(-n, 0.693145751953125f, x);
    r = fmaf(-n, 1.428606765330187045e-06f, r);
    float p = 1.0f / 720.0f;
    p = fmaf(p, r, 1.0f / 120.0f);
    p = fmaf(p, r, 1.0f / 24.0f);
    p = fmaf(p, r, 1.0f / 6.0f);
    p = fmaf(p, r, 0.5f);
    p = fmaf(p, r, 1.0f);
    p = fmaf(p, r, 1.0f);
    union { uint32_t u; float f; } two_n = {.u = (uint32_t)((int32_t)n + 127) << 23};
    return p * two_n.f;
}

/* e^-x, x clamped to exp_fixed's range (SiLU's and the sigmoid's: beyond it 1 + e^-x is
 * 1 or past float32's range either way) */
static inline float exp_neg(float x) { return exp_fixed(-fminf(fmaxf(x, -88.0f), 88.0f)); }

/* Gemma's GeGLU: out[r] = bf16(bf16(gelu(g)) * u), gelu with the tanh approximation in
 * float32, 0.5 g (1 + tanh(y)) for y = sqrt(2 / pi) (g + 0.044715 g^3), written as
 * g / (1 + e^-2y) (the same function; torch's 1 + tanh(y) cancels to a few bits for g below
 * -2, this keeps them; 0 where e^-2y passes float32's range), e^-2y by exp_fixed (the same
 * bits in every build) */
static inline void gelu_tanh_row(const uint16_t *g, const uint16_t *u, uint16_t *o,
                                 int64_t inter) {
    for (int64_t i = 0; i < inter; i++) {
        float v = bf2f(g[i]);
        float y = 0.7978845608028654f * (v + 0.044715f * v * v * v);
        float a = 2.0f * y < -88.0f ? 0.0f * v  /* below float32's range: +-0 */
                                    : v / (1.0f + exp_neg(2.0f * y));
        o[i] = f2bf(round_bf(a) * bf2f(u[i]));
    }
}

/* SiLU x up (above), or with gelu Gemma's GeGLU */
static void act_mul_body(const uint16_t *gu, int64_t ldg, uint16_t *out, int64_t ldo,
                         int64_t rows, int64_t inter, int gelu) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gu + r * ldg, *u = g + inter;
        uint16_t *o = out + r * ldo;
        if (gelu) {
            gelu_tanh_row(g, u, o, inter);
            continue;
        }
        float s[MAX_DIM];
        for (int64_t i = 0; i < inter; i++) {
            float v = bf2f(g[i]);
            s[i] = v / (1.0f + exp_neg(v));
        }
        for (int64_t i = 0; i < inter; i++) o[i] = f2bf(round_bf(s[i]) * bf2f(u[i]));
    }
}

static void silu_mul_body(const uint16_t *gu, int64_t ldg, uint16_t *out, int64_t ldo,
                          int64_t rows, int64_t inter) {
    act_mul_body(gu, ldg, out, ldo, rows, inter, 0);
}

void gp_silu_mul(const uint16_t *gu, int64_t ldg, uint16_t *out, int64_t ldo, int64_t rows,
                 int64_t inter, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    #pragma omp parallel num_threads(threads) if (rows * inter >= 65536)
    silu_mul_body(gu, ldg, out, ldo, rows, inter);
}

void gp_gelu_tanh_mul(const uint16_t *gu, int64_t ldg, uint16_t *out, int64_t ldo,
                      int64_t rows, int64_t inter, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    #pragma omp parallel num_threads(threads) if (rows * inter >= 65536)
    act_mul_body(gu, ldg, out, ldo, rows, inter, 1);
}

/* gpt-oss's clamped SwiGLU, each operation rounded to bf16 as torch's bf16 ops round
 * (kernels/reference.py swiglu_oai): g = min(gate, limit), u = clamp(up, -limit, limit),
 * out[r] = bf16(bf16(u + 1) * bf16(g * bf16(sigmoid(bf16(g * alpha))))), the sigmoid
 * 1 / (1 + e^-x) in float32 with exp_fixed (the same bits in every build) */
static void swiglu_oai_body(const uint16_t *gu, int64_t ldg, uint16_t *out, int64_t ldo,
                            int64_t rows, int64_t inter, float limit, float alpha) {
    #pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *g = gu + r * ldg, *u = g + inter;
        uint16_t *o = out + r * ldo;
        for (int64_t i = 0; i < inter; i++) {
            float v = fminf(bf2f(g[i]), limit);
            float a = round_bf(v * alpha);
            float sg = round_bf(1.0f / (1.0f + exp_neg(a)));
            float w = fminf(fmaxf(bf2f(u[i]), -limit), limit);
            o[i] = f2bf(round_bf(w + 1.0f) * round_bf(v * sg));
        }
    }
}

void gp_swiglu_oai(const uint16_t *gu, int64_t ldg, uint16_t *out, int64_t ldo, int64_t rows,
                   int64_t inter, float limit, float alpha, int threads) {
    (void)threads;
    #pragma omp parallel num_threads(threads) if (rows * inter >= 65536)
    swiglu_oai_body(gu, ldg, out, ldo, rows, inter, limit, alpha);
}

/* ok[r] = 1 when every value of float32 row r of x [R][V] (row stride ldx) is finite, else 0:
 * a test of the exponent bits (exact under -ffast-math, which may drop float tests of NaN) */
void gp_finite_rows(const float *x, int64_t R, int64_t V, int64_t ldx, int8_t *ok) {
    for (int64_t r = 0; r < R; r++) {
        const uint32_t *row = (const uint32_t *)(x + r * ldx);
        uint32_t bad = 0;
        for (int64_t v = 0; v < V; v++) bad |= (row[v] & 0x7f800000u) == 0x7f800000u;
        ok[r] = !bad;
    }
}

/* float32 of a float16 value, exactly (subnormals, infinities and NaNs included), without
 * branches (the loops over a run vectorise): the exponent rebased, or for a subnormal the
 * value rebuilt as a float32 and 2^-14 taken off (exact: the result is a float32 normal) */
static inline float f16_to_f32(uint16_t h) {
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13, exp = o & 0x0f800000u;
    uint32_t normal = o + ((uint32_t)(127 - 15) << 23);
    uint32_t special = normal + ((uint32_t)(128 - 16) << 23);  /* inf, NaN: exponent 255 */
    float sub, magic;
    uint32_t s_bits = o + (113u << 23), m_bits = 113u << 23;
    memcpy(&sub, &s_bits, 4);
    memcpy(&magic, &m_bits, 4);
    sub -= magic;
    uint32_t sub_u;
    memcpy(&sub_u, &sub, 4);
    uint32_t u = exp == 0x0f800000u ? special : exp == 0 ? sub_u : normal;
    u |= (uint32_t)(h & 0x8000u) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* n values of the file from src on, stride apart, as float32 into t */
static void pack_load(const void *values, int64_t kind, int64_t src, int64_t n, int64_t stride,
                      float *t) {
    if (kind == 0) {
        const float *v = (const float *)values + src;
        if (stride == 1) memcpy(t, v, (size_t)n * 4);
        else for (int64_t j = 0; j < n; j++) t[j] = v[j * stride];
    } else if (kind == 1) {
        const uint16_t *v = (const uint16_t *)values + src;
        if (stride == 1) for (int64_t j = 0; j < n; j++) t[j] = f16_to_f32(v[j]);
        else for (int64_t j = 0; j < n; j++) t[j] = f16_to_f32(v[j * stride]);
    } else {
        const uint16_t *v = (const uint16_t *)values + src;
        if (stride == 1) for (int64_t j = 0; j < n; j++) t[j] = bf2f(v[j]);
        else for (int64_t j = 0; j < n; j++) t[j] = bf2f(v[j * stride]);
    }
}

/* An adapter's pieces from its file's values (adapters/paged.py PackPlan.runs): run i =
 * runs[5 i ..] (dst, src, n, stride, scaled) writes float32 elements dst .. dst + n - 1 of
 * the pieces counted as one buffer of pieces of piece_bytes bytes (a run lies in one piece:
 * piece dst / (piece_bytes / 4)), from values src, src + stride, ... of the file (kind 0
 * float32, 1 float16, 2 bfloat16), times scaling where scaled (one float32 product, as
 * torch's), and the same values rounded to bf16 (nearest even) at mirror_offset bytes into
 * the piece unless mirror_offset < 0. Piece p lies at pieces[p] (num_pieces of them: a host
 * buffer's rows, or places in KV pages); the bytes no run writes are zeroed: a piece's
 * padding (past its elems float32 values, past the mirror's elems bf16 values) and, unless
 * covers, its values first. pieces NULL: nothing written, the values only counted. Returns
 * the number of values that are not finite (the caller then packs by the reference path,
 * which names them). */
#define PACK_CHUNK 512
static int64_t pack_run(const void *values, int64_t kind, const int64_t *r, float scaling,
                        uint8_t *const *pieces, int64_t per_piece, int64_t mirror_offset) {
    int64_t dst = r[0], src = r[1], n = r[2], stride = r[3], bad = 0;
    float t[PACK_CHUNK];
    for (int64_t j0 = 0; j0 < n; j0 += PACK_CHUNK) {
        int64_t m = n - j0 < PACK_CHUNK ? n - j0 : PACK_CHUNK;
        pack_load(values, kind, src + j0 * stride, m, stride, t);
        if (r[4]) for (int64_t j = 0; j < m; j++) t[j] *= scaling;
        uint32_t nonfinite = 0;
        for (int64_t j = 0; j < m; j++) {
            uint32_t u;
            memcpy(&u, t + j, 4);
            nonfinite += (u & 0x7f800000u) == 0x7f800000u;
        }
        bad += nonfinite;
        if (!pieces) continue;
        int64_t d = dst + j0;
        uint8_t *piece = pieces[d / per_piece];
        memcpy((float *)piece + d % per_piece, t, (size_t)m * 4);
        if (mirror_offset >= 0) {
            uint16_t *mir = (uint16_t *)(piece + mirror_offset) + d % per_piece;
            for (int64_t j = 0; j < m; j++) mir[j] = f2bf(t[j]);
        }
    }
    return bad;
}

/* threads: the runs shared out (they write apart); 1 where only counted (a reader thread's) */
int64_t gp_pack_pieces(const void *values, int64_t kind, const int64_t *runs, int64_t num_runs,
                       float scaling, uint8_t *const *pieces, int64_t num_pieces,
                       int64_t piece_bytes, int64_t elems, int64_t mirror_offset,
                       int64_t covers, int64_t threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    int64_t per_piece = piece_bytes / 4, bad = 0, main_end = mirror_offset < 0 ? piece_bytes
                                                                              : mirror_offset;
    int64_t zero_from = covers ? 4 * elems : 0;
    #pragma omp parallel num_threads(threads) if (threads > 1 && pieces && num_runs > 1)
    {
        #pragma omp for schedule(static)
        for (int64_t p = 0; p < (pieces ? num_pieces : 0); p++) {
            uint8_t *piece = pieces[p];
            memset(piece + zero_from, 0, (size_t)(main_end - zero_from));
            if (mirror_offset >= 0) {
                int64_t from = mirror_offset + (covers ? 2 * elems : 0);
                memset(piece + from, 0, (size_t)(piece_bytes - from));
            }
        }
        #pragma omp for schedule(dynamic, 8) reduction(+:bad)
        for (int64_t i = 0; i < num_runs; i++)
            bad += pack_run(values, kind, runs + 5 * i, scaling, pieces, per_piece,
                            mirror_offset);
    }
    return bad;
}

/* out[r] = the first index of row r's largest value, as torch.argmax, for float32 rows
 * x [R][V] (row stride ldx) holding no NaN (the caller's check). Three passes that the
 * compiler vectorises: each block of 64 values' largest, the first block holding the row's
 * largest, the first index in it equal to it (torch's argmax is a scalar loop: 43 us for
 * SmolLM2's 49152 logits on the project's EPYC, this ~3). */
#define ARGMAX_BLOCK 64
void gp_argmax_rows(const float *x, int64_t R, int64_t V, int64_t ldx, int64_t *out) {
    int64_t nb = (V + ARGMAX_BLOCK - 1) / ARGMAX_BLOCK;
    float *bm = malloc(sizeof(float) * (size_t)(nb > 0 ? nb : 1));
    for (int64_t r = 0; r < R; r++) {
        const float *row = x + r * ldx;
        if (!bm || V <= 0) { out[r] = 0; continue; }
        for (int64_t b = 0; b < nb; b++) {
            int64_t v0 = b * ARGMAX_BLOCK, v1 = v0 + ARGMAX_BLOCK < V ? v0 + ARGMAX_BLOCK : V;
            float m = row[v0];
            for (int64_t v = v0 + 1; v < v1; v++) m = row[v] > m ? row[v] : m;
            bm[b] = m;
        }
        float best = bm[0];
        for (int64_t b = 1; b < nb; b++) best = bm[b] > best ? bm[b] : best;
        int64_t b = 0;
        while (b < nb - 1 && bm[b] != best) b++;
        int64_t v = b * ARGMAX_BLOCK, v1 = v + ARGMAX_BLOCK < V ? v + ARGMAX_BLOCK : V;
        while (v < v1 - 1 && row[v] != best) v++;
        out[r] = v;
    }
    free(bm);
}

/* RoPE on the q and k heads of each row of qkv (in place; rows [T, (nq + 2 nkv) * D], q heads,
 * then k, then v), then the row's k and v written to its KV slot: page slot_pages[t], slot
 * slot_offsets[t] of caches laid out [pages][bt][nkv][D] with page stride page_stride. cos_sin:
 * [positions][2][D] bf16. Rounding as x * cos + rotate_half(x) * sin in bf16. */
static void rope_kv_body(uint16_t *qkv, int64_t ld, int64_t T, int64_t nq, int64_t nkv,
                         int64_t D, const uint16_t *cos_sin, const int64_t *positions,
                         uint16_t *k_cache, uint16_t *v_cache, int64_t page_stride,
                         const int64_t *slot_pages, const int64_t *slot_offsets) {
    int64_t half = D / 2;
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        uint16_t *row = qkv + t * ld;
        const uint16_t *c = cos_sin + positions[t] * 2 * D, *s = c + D;
        for (int64_t h = 0; h < nq + nkv; h++) {
            uint16_t *x = row + h * D;
            float xf[MAX_HEAD_DIM];
            for (int64_t i = 0; i < D; i++) xf[i] = bf2f(x[i]);
            for (int64_t i = 0; i < D; i++) {
                float rot = i < half ? -xf[i + half] : xf[i - half];
                x[i] = f2bf(round_bf(xf[i] * bf2f(c[i])) + round_bf(rot * bf2f(s[i])));
            }
        }
        int64_t slot = slot_pages[t] * page_stride + slot_offsets[t] * nkv * D;
        memcpy(k_cache + slot, row + nq * D, (size_t)(nkv * D) * 2);
        memcpy(v_cache + slot, row + (nq + nkv) * D, (size_t)(nkv * D) * 2);
    }
}

void gp_rope_kv(uint16_t *qkv, int64_t ld, int64_t T, int64_t nq, int64_t nkv, int64_t D,
                const uint16_t *cos_sin, const int64_t *positions, uint16_t *k_cache,
                uint16_t *v_cache, int64_t page_stride, const int64_t *slot_pages,
                const int64_t *slot_offsets, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    #pragma omp parallel num_threads(threads) if (T >= 64)
    rope_kv_body(qkv, ld, T, nq, nkv, D, cos_sin, positions, k_cache, v_cache, page_stride,
                 slot_pages, slot_offsets);
}

/* KV head g's row of token t in a paged cache ([pages][bt][nkv][D], page stride ps) */
static inline const uint16_t *token_row(const uint16_t *cache, const int32_t *table, int64_t t,
                                        int64_t bt, int64_t ps, int64_t nkv, int64_t D,
                                        int64_t g) {
    return cache + (int64_t)table[t / bt] * ps + (t % bt) * nkv * D + g * D;
}

/* Paged decode attention, one query row per sequence: for sequence b and query head h (KV head
 * h / (nq / nkv)), out = softmax(q . K^T * scale) V over its context_lens[b] cached tokens.
 * Where the prefill kernel is built (AVX-512 BF16 or AVX2, D % 16 == 0) a row is a one-row
 * query of it (prefill_item: keys in blocks of PA_KB from token 0, an online softmax), so a token's
 * attention does not depend on whether a prefill chunk or a decode step computes it, nor on
 * where a chunk starts. Elsewhere the portable loops below: scores and softmax in float32,
 * probabilities rounded to bf16, the weighted sum of V in float32, rounded once (as
 * kernels/decode.py). q: rows of ldq elements ([nq][D] at the start); out: [B][nq][D]
 * contiguous. */

#ifdef HAVE_PREFILL_ATTENTION
#define PA_QT 32
#define PA_KB 64
#ifdef __AVX512BF16__
#define PA_BLOCK_FLOATS(D) ((D) * PA_KB)  /* a key block's K and V as bf16 pairs */
#else
#define PA_BLOCK_FLOATS(D) (2 * (D) * PA_KB)  /* ... widened to float32 (AVX2) */
#endif
static void prefill_item(const uint16_t *q, int64_t ldq, int64_t row0, int64_t r0, int64_t nr,
                         int64_t past, int64_t g, int64_t group, int64_t nkv, int64_t D,
                         const uint16_t *k_cache, const uint16_t *v_cache, int64_t ps,
                         int64_t bt, const int32_t *table, float scale, uint16_t *out,
                         int64_t ldo, int64_t window, const float *sinks, float softcap,
                         float *buf);
#endif

static void decode_attention_body(const uint16_t *q, int64_t ldq, int64_t B, int64_t nq,
                                  int64_t nkv, int64_t D, const uint16_t *k_cache,
                                  const uint16_t *v_cache, int64_t page_stride, int64_t bt,
                                  const int32_t *block_tables, int64_t ldt,
                                  const int32_t *context_lens, float scale, uint16_t *out,
                                  int64_t window, const float *sinks, float softcap) {
    int64_t group = nq / nkv;
    #pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t g = 0; g < nkv; g++) {
            int64_t len = context_lens[b];
            const int32_t *table = block_tables + b * ldt;
#ifdef HAVE_PREFILL_ATTENTION
            if (D % 16 == 0) {
                /* the prefill kernel's arithmetic, a query of one row: a token's attention is
                 * the same whether it is computed in a prefill chunk or as a decode row (batch
                 * invariance) */
                float *buf = malloc(sizeof(float)
                                    * (size_t)(group * (D + 2) + PA_BLOCK_FLOATS(D)));
                if (!buf) continue;  /* native.py never asks for more than memory holds */
                prefill_item(q, ldq, b, 0, 1, len - 1, g, group, nkv, D, k_cache, v_cache,
                             page_stride, bt, table, scale, out, nq * D, window, sinks,
                             softcap, buf);
                free(buf);
                continue;
            }
#endif
            float qf[MAX_GROUP][MAX_HEAD_DIM], acc[MAX_GROUP][MAX_HEAD_DIM];
            float mx[MAX_GROUP], den[MAX_GROUP];
            for (int64_t j = 0; j < group; j++) {
                const uint16_t *qr = q + b * ldq + (g * group + j) * D;
                for (int64_t i = 0; i < D; i++) { qf[j][i] = bf2f(qr[i]); acc[j][i] = 0.0f; }
                mx[j] = sinks ? sinks[g * group + j] : -FLT_MAX;  /* a sink: in the maximum */
                den[j] = 0.0f;
            }
            float *scores = malloc(sizeof(float) * (size_t)(group * len));
            if (!scores) continue;  /* native.py never asks for more than memory holds */
            int64_t lo = window > 0 && len > window ? len - window : 0;  /* sliding window */
            /* pass 1: scores */
            for (int64_t t = lo; t < len; t++) {
                const uint16_t *kr = token_row(k_cache, table, t, bt, page_stride, nkv, D, g);
                float kf[MAX_HEAD_DIM];
                for (int64_t i = 0; i < D; i++) kf[i] = bf2f(kr[i]);
                for (int64_t j = 0; j < group; j++) {
                    float dot = 0.0f;
                    for (int64_t i = 0; i < D; i++) dot += qf[j][i] * kf[i];
                    float v = dot * scale;
                    if (softcap > 0.0f) v = softcap * tanhf(v / softcap);  /* Gemma 2 */
                    scores[j * len + t] = v;
                    if (v > mx[j]) mx[j] = v;
                }
            }
            /* softmax (float32), probabilities rounded to bf16 (as kernels/decode.py, the
             * torch path of batched decode rows; transformers' eager attention does the same) */
            for (int64_t j = 0; j < group; j++) {
                float *sj = scores + j * len, m = mx[j], d = 0.0f;
                for (int64_t t = lo; t < len; t++) { sj[t] = expf(sj[t] - m); d += sj[t]; }
                if (sinks) d += expf(sinks[g * group + j] - m);  /* ... and the denominator */
                den[j] = 1.0f / d;
                for (int64_t t = lo; t < len; t++) sj[t] = round_bf(sj[t] * den[j]);
            }
            /* pass 2: probabilities times V */
            for (int64_t t = lo; t < len; t++) {
                const uint16_t *vr = token_row(v_cache, table, t, bt, page_stride, nkv, D, g);
                float vf[MAX_HEAD_DIM];
                for (int64_t i = 0; i < D; i++) vf[i] = bf2f(vr[i]);
                for (int64_t j = 0; j < group; j++) {
                    float pr = scores[j * len + t];
                    for (int64_t i = 0; i < D; i++) acc[j][i] += pr * vf[i];
                }
            }
            for (int64_t j = 0; j < group; j++) {
                uint16_t *o = out + (b * nq + g * group + j) * D;
                for (int64_t i = 0; i < D; i++) o[i] = f2bf(acc[j][i]);
            }
            free(scores);
        }
    }
}

void gp_decode_attention(const uint16_t *q, int64_t ldq, int64_t B, int64_t nq, int64_t nkv,
                         int64_t D, const uint16_t *k_cache, const uint16_t *v_cache,
                         int64_t page_stride, int64_t bt, const int32_t *block_tables,
                         int64_t ldt, const int32_t *context_lens, float scale, uint16_t *out,
                         int64_t window, const float *sinks, float softcap, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    int64_t work = 0;
    for (int64_t b = 0; b < B; b++) work += context_lens[b];
    (void)work;
    #pragma omp parallel num_threads(threads) if (work * nkv >= 256)
    decode_attention_body(q, ldq, B, nq, nkv, D, k_cache, v_cache, page_stride, bt,
                          block_tables, ldt, context_lens, scale, out, window, sinks, softcap);
}

/* ---- prefill attention ---------------------------------------------------------------------
 * Causal attention of a chunk of new tokens over its cached prefix and itself (the semantics of
 * kernels.reference.paged_attention_prefill): sequence s owns query rows cu[s] .. cu[s+1] (n
 * rows), its tokens ctx[s] - n .. ctx[s] - 1; query row i attends to cached tokens
 * 0 .. ctx[s] - n + i, read from the pages in place. Flash-style: a work item is up to PA_QT
 * rows of one sequence with the query heads of one KV head; keys come in blocks of PA_KB, each
 * block's K transposed and its V interleaved once (as bf16 pairs) for all the item's queries;
 * scores and the weighted sum of V are bf16 dot products with vdpbf16ps's arithmetic (exact
 * products, float32 sums: per lane the odd element's product, then the even one's, denormals
 * as zero); an online softmax in float32 (running max and sum); the probabilities rounded to
 * bf16 for the product with V (as torch's flash attention does; one that is a float32
 * denormal counts as zero there), their sum taken of the rounded values in gemv_hsum's tree;
 * the output divided once and rounded to bf16.
 *
 * Two builds compute exactly that: AVX-512 BF16 (the instruction) and AVX2 + FMA (emulating
 * it as the GEMV does, MXCSR's DAZ and FTZ set around the dot products only, e^x's scaling
 * by 2^n in two exact-then-once-rounded multiplies): bit-identical, tested on a CPU that has
 * both, so a decode row or a resumed request gives the same bits on either. */
#ifdef HAVE_PREFILL_ATTENTION
#ifdef __AVX512BF16__
/* the block's K as kt[d'][k] (key k's d-pair d'), 16 keys by 16 d-pairs at a time, and its V
 * as v2[k'][d] (keys 2k', 2k'+1 of dim d as a bf16 pair); keys past nb, and those whose rel is
 * -1, read as zeros */
static void pa_kv_block(const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *rel,
                        int64_t nb, int64_t D, float *blk) {
    uint32_t *kt = (uint32_t *)blk, *v2 = kt + (D / 2) * PA_KB;
    for (int64_t c0 = 0; c0 < PA_KB; c0 += 16) {
        for (int64_t d0 = 0; d0 < D / 2; d0 += 16) {
            int64_t nd = D / 2 - d0 < 16 ? D / 2 - d0 : 16;
            __mmask16 md = (__mmask16)((1u << nd) - 1);
            __m512i r[16];
            for (int64_t i = 0; i < 16; i++)
                r[i] = c0 + i < nb && rel[c0 + i] >= 0
                           ? _mm512_maskz_loadu_epi32(
                                 md, (const uint32_t *)(k_cache + rel[c0 + i]) + d0)
                           : _mm512_setzero_si512();
            transpose16_u32(r);
            for (int64_t j = 0; j < nd; j++)
                _mm512_storeu_si512(kt + (d0 + j) * PA_KB + c0, r[j]);
        }
    }
    for (int64_t kk = 0; kk < PA_KB; kk += 2) {
        const uint16_t *va = kk < nb && rel[kk] >= 0 ? v_cache + rel[kk] : NULL;
        const uint16_t *vb = kk + 1 < nb && rel[kk + 1] >= 0 ? v_cache + rel[kk + 1] : NULL;
        uint32_t *o = v2 + (kk / 2) * D;
        if (va && vb) {
            for (int64_t d = 0; d < D; d++) o[d] = (uint32_t)va[d] | (uint32_t)vb[d] << 16;
        } else {
            for (int64_t d = 0; d < D; d++)
                o[d] = (va ? (uint32_t)va[d] : 0u) | (vb ? (uint32_t)vb[d] << 16 : 0u);
        }
    }
}

/* Gemma 2's soft cap of scores s: cap tanh(s / cap), tanh(x) = sign(x) (1 - u) / (1 + u) with
 * u = e^(-2 |x|) by exp512 (x <= 0 its domain); every step an IEEE operation behind an empty
 * asm, as the AVX2 build's softcap256 does: the same bits in both builds */
static inline __m512 softcap512(__m512 sv, float inv_cap, float cap) {
    __m512 x = _mm512_mul_ps(sv, _mm512_set1_ps(inv_cap));
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32((int)0x80000000u));
    __m512 ax = _mm512_castsi512_ps(_mm512_andnot_si512(_mm512_set1_epi32((int)0x80000000u),
                                                        _mm512_castps_si512(x)));
    __m512 u = exp512(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
    __asm__("" : "+v"(u));
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 num = _mm512_sub_ps(one, u), dn = _mm512_add_ps(one, u);
    __asm__("" : "+v"(num), "+v"(dn));
    __m512 th = _mm512_div_ps(num, dn);
    __asm__("" : "+v"(th));
    th = _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(th), sign));
    return _mm512_mul_ps(th, _mm512_set1_ps(cap));
}

/* one query vector (bf16 pairs qp) over the block's keys nlo .. nvalid - 1 (nlo > 0: a sliding
 * window starts inside the block; the keys before it count as masked: probability 0): its
 * scores (softcap > 0: soft-capped, Gemma 2), the online softmax's step (running max *mx,
 * sum *den) and its accumulator a[D] */
static void pa_query(const uint32_t *qp, const float *blk, int64_t D, int64_t nlo,
                     int64_t nvalid, float scale, float softcap, float *mx, float *den,
                     float *a) {
    const uint32_t *kt = (const uint32_t *)blk, *v2 = kt + (D / 2) * PA_KB;
    __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
    __m512 t0 = s0, t1 = s0, t2 = s0, t3 = s0;
    for (int64_t d = 0; d < D / 2; d += 2) {  /* D % 16 == 0: d-pairs in twos */
        __m512bh qa = (__m512bh)_mm512_set1_epi32((int)qp[d]);
        __m512bh qb = (__m512bh)_mm512_set1_epi32((int)qp[d + 1]);
        const uint32_t *ka = kt + d * PA_KB, *kb = ka + PA_KB;
        s0 = _mm512_dpbf16_ps(s0, qa, (__m512bh)_mm512_loadu_si512(ka));
        s1 = _mm512_dpbf16_ps(s1, qa, (__m512bh)_mm512_loadu_si512(ka + 16));
        s2 = _mm512_dpbf16_ps(s2, qa, (__m512bh)_mm512_loadu_si512(ka + 32));
        s3 = _mm512_dpbf16_ps(s3, qa, (__m512bh)_mm512_loadu_si512(ka + 48));
        t0 = _mm512_dpbf16_ps(t0, qb, (__m512bh)_mm512_loadu_si512(kb));
        t1 = _mm512_dpbf16_ps(t1, qb, (__m512bh)_mm512_loadu_si512(kb + 16));
        t2 = _mm512_dpbf16_ps(t2, qb, (__m512bh)_mm512_loadu_si512(kb + 32));
        t3 = _mm512_dpbf16_ps(t3, qb, (__m512bh)_mm512_loadu_si512(kb + 48));
    }
    __m512 sv[4] = {_mm512_add_ps(s0, t0), _mm512_add_ps(s1, t1), _mm512_add_ps(s2, t2),
                    _mm512_add_ps(s3, t3)};
    __m512 bmax = _mm512_set1_ps(-INFINITY);
    __mmask16 mk[4];
    for (int c = 0; c < 4; c++) {
        int64_t left = nvalid - 16 * c, below = nlo - 16 * c;
        mk[c] = left >= 16 ? (__mmask16)0xffff
                           : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
        if (below > 0)  /* keys before the window's first */
            mk[c] &= below >= 16 ? (__mmask16)0 : (__mmask16)~((1u << below) - 1);
        sv[c] = _mm512_mul_ps(sv[c], _mm512_set1_ps(scale));
        __asm__("" : "+v"(sv[c]));  /* no contraction into the exponent's argument */
        if (softcap > 0.0f) {
            sv[c] = softcap512(sv[c], 1.0f / softcap, softcap);
            __asm__("" : "+v"(sv[c]));
        }
        bmax = _mm512_mask_max_ps(bmax, mk[c], bmax, sv[c]);
    }
    float m_new = _mm512_reduce_max_ps(bmax);
    if (m_new < *mx) m_new = *mx;
    float alpha = *mx == -INFINITY ? 0.0f : expf(*mx - m_new);
    *mx = m_new;
    __m512 psum = _mm512_setzero_ps(), pc[4];
    for (int c = 0; c < 4; c++) {
        pc[c] = _mm512_maskz_mov_ps(mk[c], bf16_round_ps(
            exp512(_mm512_sub_ps(sv[c], _mm512_set1_ps(m_new)))));
        psum = _mm512_add_ps(psum, pc[c]);
        __asm__("" : "+v"(psum));  /* in order: -ffast-math may not reassociate it */
    }
    /* as bf16 pairs: word k = (p[2k], p[2k + 1]) (exact: already rounded; a denormal to 0) */
    uint32_t pp[PA_KB / 2];
    _mm512_storeu_si512(pp, (__m512i)_mm512_cvtne2ps_pbh(pc[1], pc[0]));
    _mm512_storeu_si512(pp + 16, (__m512i)_mm512_cvtne2ps_pbh(pc[3], pc[2]));
    *den = *den * alpha + gemv_hsum(_mm512_castps512_ps256(psum),
                                    _mm256_castpd_ps(_mm512_extractf64x4_pd(
                                        _mm512_castps_pd(psum), 1)));
    __m512 al = _mm512_set1_ps(alpha);
    for (int64_t d = 0; d < D; d += 16) {
        __m512 ae = _mm512_mul_ps(_mm512_loadu_ps(a + d), al);
        __m512 ao = _mm512_setzero_ps();
        const uint32_t *vr = v2 + d;
        /* probabilities past nvalid are 0: keys in fours, two to a 32-bit lane */
        for (int64_t kp = 0; kp < (nvalid + 1) / 2; kp += 2) {
            ae = _mm512_dpbf16_ps(ae, (__m512bh)_mm512_set1_epi32((int)pp[kp]),
                                  (__m512bh)_mm512_loadu_si512(vr + kp * D));
            ao = _mm512_dpbf16_ps(ao, (__m512bh)_mm512_set1_epi32((int)pp[kp + 1]),
                                  (__m512bh)_mm512_loadu_si512(vr + (kp + 1) * D));
        }
        _mm512_storeu_ps(a + d, _mm512_add_ps(ae, ao));
    }
}
#else  /* AVX2 + FMA: the same arithmetic on 8 lanes */
/* exp512's e^x: the same operations; its scalef(p, n) as p 2^a (exact, a = max(n, -64)) times
 * 2^(n - a) (rounded once, a denormal as scalef gives it) */
static inline __m256 exp256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-104.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187045e-06f), r);
    __m256 p = _mm256_set1_ps(1.0f / 720.0f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    __m256 a = _mm256_max_ps(n, _mm256_set1_ps(-64.0f));
    const __m256i bias = _mm256_set1_epi32(127);
    __m256 pa = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(a), bias), 23)));
    __asm__("" : "+x"(pa));  /* exact; the next product rounds once */
    __m256 pb = _mm256_castsi256_ps(_mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_sub_ps(n, a)), bias), 23));
    return _mm256_mul_ps(pa, pb);
}

static inline __m256 bf16_round256(__m256 v) {  /* bf16_round_ps on 8 lanes */
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb));
    return _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32((int)0xffff0000u)));
}

/* the block's K as kf[2 d' + e][k] (key k's d-pair d': e = 0 its odd element, 1 its even one,
 * as float32) and its V as vf[k][d]; keys past nb, and those whose rel is -1, are zeros.
 * Widened once a block, so the dot products below are two FMAs a pair with no bit operations. */
static void pa_kv_block(const uint16_t *k_cache, const uint16_t *v_cache, const int64_t *rel,
                        int64_t nb, int64_t D, float *blk) {
    float *kf = blk, *vf = blk + D * PA_KB;
    for (int64_t kk = 0; kk < PA_KB; kk++) {
        const uint16_t *kr = kk < nb && rel[kk] >= 0 ? k_cache + rel[kk] : NULL;
        const uint16_t *vr = kk < nb && rel[kk] >= 0 ? v_cache + rel[kk] : NULL;
        for (int64_t d = 0; d < D / 2; d++) {
            kf[(2 * d) * PA_KB + kk] = kr ? bf2f(kr[2 * d + 1]) : 0.0f;
            kf[(2 * d + 1) * PA_KB + kk] = kr ? bf2f(kr[2 * d]) : 0.0f;
        }
        for (int64_t d = 0; d < D; d++) vf[kk * D + d] = vr ? bf2f(vr[d]) : 0.0f;
    }
}

/* the weighted sum of V for NV vectors of 8 dims at once (2 NV independent chains: an FMA's
 * latency hidden); per lane the order of vdpbf16ps: key pairs in order, alternately into e
 * and o, the odd key before the even one */
static inline __attribute__((always_inline)) void pa_v_sum(
        const float *vr, const float *pf, int64_t D, int64_t pairs, float *ae, float *ao,
        const int NV) {
    __m256 e[4], o[4];
    for (int v = 0; v < NV; v++) {
        e[v] = _mm256_loadu_ps(ae + 8 * v);
        o[v] = _mm256_loadu_ps(ao + 8 * v);
    }
    for (int64_t kp = 0; kp < pairs; kp += 2) {
        const int64_t k = 2 * kp;
        const __m256 p1 = _mm256_set1_ps(pf[k + 1]), p0 = _mm256_set1_ps(pf[k]);
        const __m256 p3 = _mm256_set1_ps(pf[k + 3]), p2 = _mm256_set1_ps(pf[k + 2]);
        const float *r0 = vr + k * D;
        for (int v = 0; v < NV; v++) {
            e[v] = _mm256_fmadd_ps(p1, _mm256_loadu_ps(r0 + D + 8 * v), e[v]);
            e[v] = _mm256_fmadd_ps(p0, _mm256_loadu_ps(r0 + 8 * v), e[v]);
            o[v] = _mm256_fmadd_ps(p3, _mm256_loadu_ps(r0 + 3 * D + 8 * v), o[v]);
            o[v] = _mm256_fmadd_ps(p2, _mm256_loadu_ps(r0 + 2 * D + 8 * v), o[v]);
        }
    }
    for (int v = 0; v < NV; v++) {
        _mm256_storeu_ps(ae + 8 * v, e[v]);
        _mm256_storeu_ps(ao + 8 * v, o[v]);
    }
}

/* softcap512's soft cap on 8 lanes: the same operations */
static inline __m256 softcap256(__m256 sv, float inv_cap, float cap) {
    __m256 x = _mm256_mul_ps(sv, _mm256_set1_ps(inv_cap));
    __m256 sign = _mm256_and_ps(x, _mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)));
    __m256 ax = _mm256_andnot_ps(_mm256_castsi256_ps(_mm256_set1_epi32((int)0x80000000u)), x);
    __m256 u = exp256(_mm256_mul_ps(ax, _mm256_set1_ps(-2.0f)));
    __asm__("" : "+x"(u));
    __m256 one = _mm256_set1_ps(1.0f);
    __m256 num = _mm256_sub_ps(one, u), dn = _mm256_add_ps(one, u);
    __asm__("" : "+x"(num), "+x"(dn));
    __m256 th = _mm256_div_ps(num, dn);
    __asm__("" : "+x"(th));
    th = _mm256_or_ps(th, sign);
    return _mm256_mul_ps(th, _mm256_set1_ps(cap));
}

static void pa_query(const uint32_t *qp, const float *blk, int64_t D, int64_t nlo,
                     int64_t nvalid, float scale, float softcap, float *mx, float *den,
                     float *a) {
    const float *kf = blk, *vf = blk + D * PA_KB;
    unsigned int csr = _mm_getcsr();
    __m256 sv[8], tv[8];  /* keys 8 c .. 8 c + 7: even d-pairs' sums, odd ones' */
    _mm_setcsr(csr | MXCSR_DAZ_FTZ);
    for (int h = 0; h < 2; h++) {  /* keys 32 h .. 32 h + 31 */
        __m256 s[4], t[4];
        for (int c = 0; c < 4; c++) s[c] = t[c] = _mm256_setzero_ps();
        for (int64_t d = 0; d < D / 2; d += 2) {  /* vdpbf16ps: odd element, then even */
            __m256 qa_o = _mm256_set1_ps(bf2f((uint16_t)(qp[d] >> 16)));
            __m256 qa_e = _mm256_set1_ps(bf2f((uint16_t)qp[d]));
            __m256 qb_o = _mm256_set1_ps(bf2f((uint16_t)(qp[d + 1] >> 16)));
            __m256 qb_e = _mm256_set1_ps(bf2f((uint16_t)qp[d + 1]));
            const float *ka = kf + 2 * d * PA_KB + 32 * h, *kb = ka + 2 * PA_KB;
            for (int c = 0; c < 4; c++) {
                s[c] = _mm256_fmadd_ps(qa_o, _mm256_loadu_ps(ka + 8 * c), s[c]);
                s[c] = _mm256_fmadd_ps(qa_e, _mm256_loadu_ps(ka + PA_KB + 8 * c), s[c]);
                t[c] = _mm256_fmadd_ps(qb_o, _mm256_loadu_ps(kb + 8 * c), t[c]);
                t[c] = _mm256_fmadd_ps(qb_e, _mm256_loadu_ps(kb + PA_KB + 8 * c), t[c]);
            }
        }
        for (int c = 0; c < 4; c++) sv[4 * h + c] = s[c], tv[4 * h + c] = t[c];
    }
    _mm_setcsr(csr);
    __m256 bmax = _mm256_set1_ps(-INFINITY), mk[8];
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    for (int c = 0; c < 8; c++) {
        mk[c] = _mm256_castsi256_ps(_mm256_and_si256(  /* nlo <= key < nvalid */
            _mm256_cmpgt_epi32(_mm256_set1_epi32((int)(nvalid - 8 * c)), lane),
            _mm256_cmpgt_epi32(lane, _mm256_set1_epi32((int)(nlo - 8 * c - 1)))));
        sv[c] = _mm256_mul_ps(_mm256_add_ps(sv[c], tv[c]), _mm256_set1_ps(scale));
        __asm__("" : "+x"(sv[c]));  /* no contraction into the exponent's argument */
        if (softcap > 0.0f) {
            sv[c] = softcap256(sv[c], 1.0f / softcap, softcap);
            __asm__("" : "+x"(sv[c]));
        }
        bmax = _mm256_blendv_ps(bmax, _mm256_max_ps(bmax, sv[c]), mk[c]);
    }
    float lanes[8], m_new = -INFINITY;
    _mm256_storeu_ps(lanes, bmax);
    for (int i = 0; i < 8; i++) m_new = lanes[i] > m_new ? lanes[i] : m_new;
    if (m_new < *mx) m_new = *mx;
    float alpha = *mx == -INFINITY ? 0.0f : expf(*mx - m_new);
    *mx = m_new;
    __m256 plo = _mm256_setzero_ps(), phi = plo;
    float pf[PA_KB];
    for (int c = 0; c < 8; c++) {
        __m256 pc = _mm256_and_ps(mk[c], bf16_round256(
            exp256(_mm256_sub_ps(sv[c], _mm256_set1_ps(m_new)))));
        if (c % 2) phi = _mm256_add_ps(phi, pc);  /* 16-key groups: lanes 0-7, then 8-15 */
        else plo = _mm256_add_ps(plo, pc);
        __asm__("" : "+x"(plo), "+x"(phi));
        _mm256_storeu_ps(pf + 8 * c, pc);
    }
    *den = *den * alpha + gemv_hsum(plo, phi);
    float ae[MAX_HEAD_DIM], ao[MAX_HEAD_DIM];
    __m256 al = _mm256_set1_ps(alpha);
    for (int64_t d = 0; d < D; d += 8) {
        _mm256_storeu_ps(ae + d, _mm256_mul_ps(_mm256_loadu_ps(a + d), al));
        _mm256_storeu_ps(ao + d, _mm256_setzero_ps());
    }
    /* the probabilities as vcvtne2ps2bf16 makes them: exact (already rounded); one that is
     * a float32 denormal is zero there, and DAZ zeroes it in the products below */
    int64_t pairs = (nvalid + 1) / 2;
    _mm_setcsr(csr | MXCSR_DAZ_FTZ);
    for (int64_t d = 0; d < D; d += 32) {  /* D % 16 == 0: 32 dims, or a last 16 */
        if (D - d >= 32)
            pa_v_sum(vf + d, pf, D, pairs, ae + d, ao + d, 4);
        else
            pa_v_sum(vf + d, pf, D, pairs, ae + d, ao + d, 2);
    }
    _mm_setcsr(csr);
    for (int64_t d = 0; d < D; d += 8)
        _mm256_storeu_ps(a + d, _mm256_add_ps(_mm256_loadu_ps(ae + d), _mm256_loadu_ps(ao + d)));
}
#endif

/* one work item: rows [r0, r0 + nr) of sequence s (relative row i: token past + i), KV head g.
 * window > 0: token t sees keys t - window + 1 .. t only (transformers' sliding window); the
 * key blocks stay those from token 0 on (a block wholly before a row's window is skipped for
 * that row, a block it starts in masks the keys before it), so a token's attention is the
 * same in any item. Keys before the item's first row's window are never read (zeros: their
 * probability is an exact 0, and +0 stays +0): their pages may have been released (the
 * scheduler frees pages out of every layer's window, their table entries then name page 0).
 * buf: nr * group * (D + 2) floats of state, then the K and V blocks */
static void prefill_item(const uint16_t *q, int64_t ldq, int64_t row0, int64_t r0, int64_t nr,
                         int64_t past, int64_t g, int64_t group, int64_t nkv, int64_t D,
                         const uint16_t *k_cache, const uint16_t *v_cache, int64_t ps,
                         int64_t bt, const int32_t *table, float scale, uint16_t *out,
                         int64_t ldo, int64_t window, const float *sinks, float softcap,
                         float *buf) {
    int64_t nv = nr * group;
    float *acc = buf, *mx = acc + nv * D, *den = mx + nv;
    float *blk = den + nv;  /* the key block, as the build's pa_kv_block lays it out */
    for (int64_t v = 0; v < nv; v++) {  /* a sink starts the online softmax: max it, sum 1 */
        mx[v] = sinks ? sinks[g * group + v % group] : -INFINITY;
        den[v] = sinks ? 1.0f : 0.0f;
        for (int64_t d = 0; d < D; d++) acc[v * D + d] = 0.0f;
    }
    int64_t kmax = past + r0 + nr;  /* the last row's keys */
    int64_t first = window > 0 && past + r0 + 1 > window ? past + r0 + 1 - window : 0;
    for (int64_t k0 = first / PA_KB * PA_KB; k0 < kmax; k0 += PA_KB) {
        int64_t nb = kmax - k0 < PA_KB ? kmax - k0 : PA_KB;
        /* the block's token rows: the page walked, one division a block */
        int64_t rel[PA_KB], page = k0 / bt, off = k0 % bt, row = nkv * D;
        for (int64_t kk = 0; kk < nb; kk++) {  /* -1: before every row's window */
            rel[kk] = k0 + kk < first ? -1 : (int64_t)table[page] * ps + off * row + g * D;
            if (++off == bt) { off = 0; page++; }
        }
        pa_kv_block(k_cache, v_cache, rel, nb, D, blk);
        for (int64_t i = 0; i < nr; i++) {
            int64_t lim = past + r0 + i + 1;  /* keys [lo, lim) */
            int64_t lo = window > 0 && lim > window ? lim - window : 0;
            if (lim <= k0 || lo >= k0 + nb) continue;
            int64_t nvalid = (lim < k0 + nb ? lim : k0 + nb) - k0;
            int64_t nlo = lo > k0 ? lo - k0 : 0;
            for (int64_t j = 0; j < group; j++) {
                int64_t v = i * group + j;
                const uint32_t *qp = (const uint32_t *)(q + (row0 + r0 + i) * ldq
                                                        + (g * group + j) * D);
                pa_query(qp, blk, D, nlo, nvalid, scale, softcap, mx + v, den + v, acc + v * D);
            }
        }
    }
    for (int64_t i = 0; i < nr; i++)
        for (int64_t j = 0; j < group; j++) {
            int64_t v = i * group + j;
            float inv = 1.0f / den[v];
            uint16_t *o = out + (row0 + r0 + i) * ldo + (g * group + j) * D;
            for (int64_t d = 0; d < D; d++) o[d] = f2bf(acc[v * D + d] * inv);
        }
}
#endif

/* q: rows of ldq elements (the query heads [nq][D] first); out: [T][nq D] (row stride ldo);
 * cu [S + 1] and ctx [S] int32; block tables [S][ldt] int32; caches [pages][bt][nkv][D]. Returns
 * 0, or -1 where this build has no such kernel or memory ran out (the caller falls back). */
int gp_prefill_attention(const uint16_t *q, int64_t ldq, int64_t S, const int32_t *cu,
                         const int32_t *ctx, int64_t nq, int64_t nkv, int64_t D,
                         const uint16_t *k_cache, const uint16_t *v_cache, int64_t ps,
                         int64_t bt, const int32_t *block_tables, int64_t ldt, float scale,
                         uint16_t *out, int64_t ldo, int64_t window, const float *sinks,
                         float softcap, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
#ifdef HAVE_PREFILL_ATTENTION
    int64_t group = nq / nkv, items = 0;
    for (int64_t s = 0; s < S; s++) items += nkv * ((cu[s + 1] - cu[s] + PA_QT - 1) / PA_QT);
    int64_t *it_s = malloc(sizeof(int64_t) * (size_t)(3 * items + 1));
    if (!it_s) return -1;
    int64_t *it_r = it_s + items, *it_g = it_r + items;
    /* the longest items (the last rows: the most keys) first, so the threads end together */
    int64_t k = 0;
    for (int64_t s = 0; s < S; s++) {
        int64_t n = cu[s + 1] - cu[s];
        for (int64_t r0 = (n - 1) / PA_QT * PA_QT; r0 >= 0; r0 -= PA_QT)
            for (int64_t g = 0; g < nkv; g++) {
                it_s[k] = s;
                it_r[k] = r0;
                it_g[k++] = g;
            }
    }
    int failed = 0;
    size_t floats = (size_t)(PA_QT * group * (D + 2) + PA_BLOCK_FLOATS(D));
    #pragma omp parallel num_threads(threads) if (items > 1)
    {
        float *buf = malloc(sizeof(float) * floats);
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < items; it++) {
            if (!buf) continue;
            int64_t s = it_s[it], r0 = it_r[it], n = cu[s + 1] - cu[s];
            int64_t nr = n - r0 < PA_QT ? n - r0 : PA_QT;
            prefill_item(q, ldq, cu[s], r0, nr, ctx[s] - n, it_g[it], group, nkv, D, k_cache,
                         v_cache, ps, bt, block_tables + s * ldt, scale, out, ldo, window, sinks,
                         softcap, buf);
        }
        free(buf);
    }
    free(it_s);
    return failed ? -1 : 0;
#else
    (void)q; (void)ldq; (void)S; (void)cu; (void)ctx; (void)nq; (void)nkv; (void)D;
    (void)k_cache; (void)v_cache; (void)ps; (void)bt; (void)block_tables; (void)ldt;
    (void)scale; (void)out; (void)ldo; (void)window; (void)sinks; (void)softcap;
    return -1;
#endif
}

/* y[m] = bf16(x[m] . W[n] (+ bias[n])) for any number of rows m of x: the bf16 product of the
 * linear layers, the same sums for a row whether the step has 1 row or 1000 (batch
 * invariance: a request's tokens do not depend on what shares its step).
 *
 * Semantics (one summation order, whichever build and whichever tile computes it): a row's
 * dot product is one accumulator of 16 float32 lanes; element k = 32 c + 2 j + e (chunk c,
 * lane j, e = 0 even, 1 odd) goes to lane j, chunk after chunk, the last chunk zero-padded. A
 * lane takes a chunk's pair as AVX-512 BF16's vdpbf16ps does: inputs that are denormal count
 * as zero, lane = ftz(fma(x_odd, w_odd, lane)), then lane = ftz(fma(x_even, w_even, lane))
 * (bf16 x bf16 products are exact in float32). Then the 16 lanes are reduced by one fixed
 * tree (gemv_hsum's), the bias added (all under DAZ/FTZ), rounded to bf16 once.
 *
 * Two builds compute exactly that: AVX-512 BF16 (the dot-product instruction itself) and
 * AVX2 + FMA (bf16 pairs split into their even and odd float32 halves by a shift and a mask,
 * two FMAs, MXCSR's DAZ and FTZ bits set around the loop: bit-identical, tested on a CPU that
 * has both), so a worker without AVX-512 continues a request exactly. gp_gemv_features' bit 0
 * says a build has one; elsewhere the caller keeps torch's product.
 *
 * How: tiles of GT_M rows of x by GT_N rows of W (each vector loaded serves several
 * elements; one accumulator an element, all in registers), W's rows in blocks of GT_BLOCK
 * read from L2 by every row tile; with a few rows (decode) each thread reads its share of W
 * as GT_N sequential streams side by side. Which rows share a tile
 * changes the loads, never an element's sums. */
#ifdef HAVE_GEMV_BF16

#ifdef __AVX512BF16__
#define GT_M 4
#define GT_N 4
typedef __m512 gacc_t;
typedef __m512i gop_t;
static inline gacc_t gacc_zero(void) { return _mm512_setzero_ps(); }
static inline gop_t gop_load(const uint16_t *p) { return _mm512_loadu_si512(p); }
static inline gop_t gop_tail(const uint16_t *p, int64_t n) {
    return _mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
}
static inline gacc_t gacc_dp(gacc_t a, gop_t x, gop_t w) {
    return _mm512_dpbf16_ps(a, (__m512bh)x, (__m512bh)w);
}
static inline float gacc_sum(gacc_t a) {
    return gemv_hsum(_mm512_castps512_ps256(a),
                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

/* gemv_hsum of each of 16 accumulators, at once */
static inline __m512 gacc_sum16(const __m512 *v) { return sum16_tree(v); }
#else
#define GT_M 2
#define GT_N 4
typedef struct { __m256 lo, hi; } gacc_t;     /* lanes 0-7, 8-15 */
typedef struct { __m256i lo, hi; } gop_t;     /* elements 0-15, 16-31 */
static inline gacc_t gacc_zero(void) {
    gacc_t a = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    return a;
}
static inline gop_t gop_load(const uint16_t *p) {
    gop_t o = {_mm256_loadu_si256((const void *)p), _mm256_loadu_si256((const void *)(p + 16))};
    return o;
}
static inline gop_t gop_tail(const uint16_t *p, int64_t n) {  /* zero-padded, as a masked load */
    uint16_t t[32] = {0};
    memcpy(t, p, 2 * (size_t)n);
    return gop_load(t);
}
static inline gacc_t gacc_dp(gacc_t a, gop_t x, gop_t w) {
    a.lo = dp8_bf16(a.lo, x.lo, w.lo);
    a.hi = dp8_bf16(a.hi, x.hi, w.hi);
    return a;
}
static inline float gacc_sum(gacc_t a) { return gemv_hsum(a.lo, a.hi); }
#endif

/* y[m0 + m][n0 + n * cs] for m < MR, n < NR: each element's chunks in order into its one
 * accumulator (local, the loops unrolled: kept in registers). cs = 1: a tile of adjacent
 * rows of W (from L2); cs > 1 (a few rows of x, W streamed from memory): NR rows cs apart,
 * each a sequential stream left to the hardware prefetcher (software prefetches 8 rows
 * ahead cost batch 1 6-20% of its tokens/s here). */
static inline __attribute__((always_inline)) void gemm_tile(
        const uint16_t *x, int64_t ldx, const uint16_t *W, int64_t ldw, int64_t K,
        const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t m0, int64_t n0, const int MR,
        const int NR, int64_t cs) {
    gacc_t acc[GT_M * GT_N];
    const uint16_t *xm = x + m0 * ldx, *wn = W + n0 * ldw;
    int64_t wstep = cs * ldw;
    for (int e = 0; e < MR * NR; e++) acc[e] = gacc_zero();
    int64_t k = 0;
#define GEMM_STEP(LOAD)                                                                   \
    do {                                                                                  \
        gop_t xo[GT_M], wo[GT_N];                                                         \
        for (int m = 0; m < MR; m++) xo[m] = LOAD(xm + m * ldx);                          \
        for (int n = 0; n < NR; n++) wo[n] = LOAD(wn + n * wstep);                        \
        for (int m = 0; m < MR; m++)                                                      \
            for (int n = 0; n < NR; n++)                                                  \
                acc[m * NR + n] = gacc_dp(acc[m * NR + n], xo[m], wo[n]);                 \
    } while (0)
#define GEMM_AT(p) gop_load((p) + k)
#define GEMM_TAIL(p) gop_tail((p) + k, K - k)
    for (; k + 32 <= K; k += 32) GEMM_STEP(GEMM_AT);
    if (k < K) GEMM_STEP(GEMM_TAIL);
#undef GEMM_TAIL
#undef GEMM_AT
#undef GEMM_STEP
    float sums[GT_M * GT_N];
#ifdef __AVX512BF16__
    if (MR * NR == 16 && cs == 1) {  /* a whole tile: sums, bias and rounding 16 at a time */
        __m512 v = gacc_sum16(acc);
        if (bias) {  /* lane 4 m + n: bias[n0 + n] */
            __m128i b4 = _mm_cvtepu16_epi32(_mm_loadl_epi64((const void *)(bias + n0)));
            v = _mm512_add_ps(v, _mm512_broadcast_f32x4(_mm_castsi128_ps(_mm_slli_epi32(b4, 16))));
        }
        /* round to nearest even as f2bf (NaN kept quiet; no denormal: FTZ) */
        __m256i r = (__m256i)_mm512_cvtneps_pbh(v);
        for (int m = 0; m < 4; m++)
            _mm_storel_epi64((void *)(y + (m0 + m) * ldy + n0),
                             m < 2 ? _mm256_castsi256_si128(m ? _mm256_srli_si256(r, 8) : r)
                                   : _mm256_extracti128_si256(m == 3 ? _mm256_srli_si256(r, 8)
                                                                     : r, 1));
        return;
    }
#endif
    for (int e = 0; e < MR * NR; e++) sums[e] = gacc_sum(acc[e]);
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++) {
            float v = sums[m * NR + n];
            if (bias) v += bf2f(bias[n0 + n * cs]);  /* fused, rounded once, as oneDNN */
            y[(m0 + m) * ldy + n0 + n * cs] = f2bf(v);
        }
}

#define GT_BLOCK 64  /* W rows a block: a few hundred KB at most, read from L2 by each row tile */

#define GT_CASE(A, B, CS) \
    case (A) * 8 + (B): gemm_tile(x, ldx, W, ldw, K, bias, y, ldy, m0, c0, A, B, CS); break
#define GT_CASES(MR_, NR_, CS)                                                            \
    switch ((MR_) * 8 + (NR_)) {                                                          \
    GT_CASE(1, 1, CS); GT_CASE(1, 2, CS); GT_CASE(1, 3, CS); GT_CASE(1, 4, CS);          \
    GT_CASE(2, 1, CS); GT_CASE(2, 2, CS); GT_CASE(2, 3, CS); GT_CASE(2, 4, CS);          \
    GT_CASES_WIDE(CS)                                                                     \
    default: break; /* mr <= GT_M, nr <= GT_N: listed */                                  \
    }
#if GT_M == 4
#define GT_CASES_WIDE(CS)                                                                 \
    GT_CASE(3, 1, CS); GT_CASE(3, 2, CS); GT_CASE(3, 3, CS); GT_CASE(3, 4, CS);          \
    GT_CASE(4, 1, CS); GT_CASE(4, 2, CS); GT_CASE(4, 3, CS); GT_CASE(4, 4, CS);
#else
#define GT_CASES_WIDE(CS)
#endif

/* the rows [n0, n1) of W for all M rows of x (one thread's share). A few rows of x: the share
 * in GT_N quarters read side by side, each a sequential stream of W (a row's one chain of
 * dot products is latency-bound; four in flight keep up with memory, where four adjacent
 * rows read together did not). More: tiles of GT_M x GT_N over blocks of W in L2. */
static void gemv_rows(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *W,
                      int64_t n0, int64_t n1, int64_t ldw, const uint16_t *bias, uint16_t *y,
                      int64_t ldy) {
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | MXCSR_DAZ_FTZ);
    if (M <= GT_M) {
        int64_t q = (n1 - n0 + GT_N - 1) / GT_N, m0 = 0;
        for (int64_t i = 0; i < q; i++) {
            int64_t c0 = n0 + i;
            int nr = 0;
            while (nr < GT_N && c0 + nr * q < n1) nr++;
            GT_CASES((int)M, nr, q)
        }
    } else {
        for (int64_t b0 = n0; b0 < n1; b0 += GT_BLOCK) {
            int64_t b1 = b0 + GT_BLOCK < n1 ? b0 + GT_BLOCK : n1;
            for (int64_t m0 = 0; m0 < M; m0 += GT_M) {
                int mr = M - m0 < GT_M ? (int)(M - m0) : GT_M;
                for (int64_t c0 = b0; c0 < b1; c0 += GT_N) {
                    int nr = b1 - c0 < GT_N ? (int)(b1 - c0) : GT_N;
                    GT_CASES(mr, nr, 1)
                }
            }
        }
    }
    _mm_setcsr(csr);
}
#undef GT_CASES
#undef GT_CASES_WIDE
#undef GT_CASE

/* the calling thread's share of the rows (no barrier after) */
static void gemv_bf16_body(const uint16_t *x, int64_t M, int64_t K, int64_t ldx,
                           const uint16_t *W, int64_t N, int64_t ldw, const uint16_t *bias,
                           uint16_t *y, int64_t ldy) {
    int64_t n0, n1;
    thread_share(N, &n0, &n1);
    if (n0 < n1) gemv_rows(x, M, K, ldx, W, n0, n1, ldw, bias, y, ldy);
}
#endif

void gp_gemv_bf16(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint16_t *W,
                  int64_t N, int64_t ldw, const uint16_t *bias, uint16_t *y, int64_t ldy,
                  int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
#ifdef HAVE_GEMV_BF16
    #pragma omp parallel num_threads(threads) if (N * K >= 65536)
    gemv_bf16_body(x, M, K, ldx, W, N, ldw, bias, y, ldy);
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)W; (void)N; (void)ldw; (void)bias; (void)y;
    (void)ldy;
#endif
}

/* y[m] = bf16(bf16((x[m] . q[n]) * scale[n]) (+ bias[n])) for int8 weights q [N][K] (row stride
 * ldq) with one bf16 scale per row: the int8 weight-only product, reading q once, row after row
 * (as gp_gemv_bf16). Each row x[m] is first quantized to int16 with one float32 scale
 * (amax / 32767: an element within 2^-7 of the row's largest keeps all 8 bits of its bf16
 * significand; a smaller one, weighing less in the sum, rounds at amax / 65534), so the dot
 * products run in exact integer arithmetic: 32 int8 weights widened to int16 and
 * multiplied-accumulated into int32 pairs by one instruction (AVX-512 VNNI's vpdpwssd; AVX-512
 * BW's vpmaddwd + vpaddd elsewhere), a third of the instructions of widening to float32, so the
 * product keeps up with memory at one row; past four rows, W is widened once into panels of
 * column pairs (i8_panel) and tiles of rows broadcast each pair of x against 16 columns at a
 * time (i8_tile): no horizontal sums, as fast as the bf16 product (SmolLM2, 1000 rows).
 * The integer sum times the row's scale is the float32 dot product; then the weight scale
 * (as torch's _weight_int8pack_mm) and a bias added after the rounding (as gpupool's int8
 * linear). Integer sums are exact in any order, so every row count and tiling gives a row the
 * same bits. No int32 overflows: an instruction adds two products of at most 128 * 32767 to a
 * lane; in the few-row path, over a block of I8_BLOCK columns an accumulator (4 a row, 32
 * columns an instruction) takes I8_BLOCK / 128 instructions, 3 more from the tail: 38
 * products, the 4 accumulators' sum 6.4e8 < 2^31 a lane, the lanes and the blocks summed in
 * int64 (16 lanes of a long row can pass 2^31: a constant row of 1536 would give 6.4e9); in
 * the tiles, a lane is added into int64 every I8_FLUSH pairs; converted to float32 once. */
static inline int64_t i8_kp(int64_t K) { return (K + 31) / 32 * 32; }  /* x's int16 row */

#ifdef HAVE_GEMV_INT8
#define I8_BLOCK 2048
/* the output of an int8 product: the exact integer dot times x's row scale, then the weight's
 * row scale, rounded to bf16 (as torch's _weight_int8pack_mm), the bias added after (the asm
 * keeps -ffast-math from regrouping the products, so every caller rounds alike) */
static inline uint16_t i8_out(int64_t dot, float xs, const uint16_t *scale, const uint16_t *bias,
                              int64_t n) {
    float v = (float)dot * xs;
    __asm__("" : "+x"(v));
    v = round_bf(v * bf2f(scale[n]));
    if (bias) v += bf2f(bias[n]);
    return f2bf(v);
}

#ifndef GEMV_INT8_AVX2
/* many rows of x (the tiled path, i8_tile): W's rows I8_NB at a time widened and laid
 * out as column pairs (a panel, read from L2 by every tile), I8_MR rows of x a tile; an int32
 * lane takes I8_FLUSH pairs' products (two of at most 128 x 32767 each a pair: 2.147e9 <
 * 2^31) before it is added into the tile's int64 totals */
#define I8_NB 64
#define I8_MR 6
#define I8_FLUSH 256

static inline __m512i dp16(__m512i acc, __m512i w, __m512i x) {
#ifdef __AVX512VNNI__
    /* in place: GCC copies the accumulator around the intrinsic (two moves an instruction,
     * which halved the tiles' speed here) */
    __asm__("vpdpwssd %2, %1, %0" : "+v"(acc) : "v"(w), "v"(x));
    return acc;
#else
    return _mm512_add_epi32(acc, _mm512_madd_epi16(w, x));
#endif
}

/* f2bf on 16 lanes (the bf16 bits in each lane's low half) */
static inline __m512i f2bf16(__m512 f) {
    __m512i u = _mm512_castps_si512(f);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            _mm512_set1_epi32(0x7f800000));
    __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(
        _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
    return _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
}

/* a block [b0, b1) of weight row q against M (1..4, a constant after inlining) rows of int16
 * x (row stride Kp, zero past K): each row's exact sum added into dot[m] */
static inline __attribute__((always_inline)) void i8_block(
        const int8_t *q, const int16_t *xq, const int M, int64_t Kp, int64_t b0, int64_t b1,
        int64_t *dot) {
    __m512i acc[4][4];
    for (int m = 0; m < M; m++)
        for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_si512();
    int64_t k = b0;
    for (; k + 128 <= b1; k += 128) {
        __m512i w[4];
        for (int j = 0; j < 4; j++)
            w[j] = _mm512_cvtepi8_epi16(_mm256_loadu_si256((const void *)(q + k + 32 * j)));
        for (int m = 0; m < M; m++)
            for (int j = 0; j < 4; j++)
                acc[m][j] = dp16(acc[m][j], w[j], _mm512_loadu_si512(xq + m * Kp + k + 32 * j));
    }
    for (; k < b1; k += 32) {  /* x is zero past K: only the weights are masked */
        int64_t left = b1 - k < 32 ? b1 - k : 32;
        __mmask32 mk = left == 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1);
        __m512i w = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, q + k));
        for (int m = 0; m < M; m++)
            acc[m][0] = dp16(acc[m][0], w, _mm512_loadu_si512(xq + m * Kp + k));
    }
    for (int m = 0; m < M; m++) {  /* lanes summed in int64: 16 lanes can overflow */
        __m512i s = _mm512_add_epi32(_mm512_add_epi32(acc[m][0], acc[m][1]),
                                     _mm512_add_epi32(acc[m][2], acc[m][3]));
        dot[m] += _mm512_reduce_add_epi64(_mm512_add_epi64(
            _mm512_cvtepi32_epi64(_mm512_castsi512_si256(s)),
            _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(s, 1))));
    }
}

#else  /* GEMV_INT8_AVX2 */
/* AVX2: the same exact integer sums on 8 lanes (vpmaddwd + vpaddd: 16 columns an instruction,
 * two accumulators a row, 32 columns a step), so a row's bits match the AVX-512 build's. No
 * int32 overflows: over a block of I8_BLOCK columns an accumulator takes I8_BLOCK / 32 + 1
 * instructions of two products of at most 128 * 32767 a lane: 5.5e8, the two 1.1e9 < 2^31,
 * the lanes and the blocks summed in int64. Any number of rows goes four at a time over a
 * band of I8_BAND weight rows (kept in L1 while every group of x's rows reads them). */
#define I8_BAND 16

/* 16 int8 weights widened to int16 */
static inline __m256i i8_w16(const int8_t *q) {
    return _mm256_cvtepi8_epi16(_mm_loadu_si128((const void *)q));
}

/* the 8 int32 lanes summed in int64 */
static inline int64_t i8_hsum(__m256i s) {
    __m256i t = _mm256_add_epi64(_mm256_cvtepi32_epi64(_mm256_castsi256_si128(s)),
                                 _mm256_cvtepi32_epi64(_mm256_extracti128_si256(s, 1)));
    __m128i u = _mm_add_epi64(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    return _mm_cvtsi128_si64(u) + _mm_extract_epi64(u, 1);
}

/* i8_block of the AVX-512 build on 8 lanes: the same exact sums */
static inline __attribute__((always_inline)) void i8_block(
        const int8_t *q, const int16_t *xq, const int M, int64_t Kp, int64_t b0, int64_t b1,
        int64_t *dot) {
    __m256i acc[4][2];
    for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t k = b0; k < b1; k += 32) {
        __m256i w0, w1;
        if (b1 - k >= 32) {
            w0 = i8_w16(q + k);
            w1 = i8_w16(q + k + 16);
        } else {  /* the row's tail, zero-padded (x is zero past K too) */
            int8_t t[32] = {0};
            memcpy(t, q + k, (size_t)(b1 - k));
            w0 = i8_w16(t);
            w1 = i8_w16(t + 16);
        }
        for (int m = 0; m < M; m++) {
            const int16_t *xm = xq + m * Kp + k;
            acc[m][0] = _mm256_add_epi32(
                acc[m][0], _mm256_madd_epi16(w0, _mm256_loadu_si256((const void *)xm)));
            acc[m][1] = _mm256_add_epi32(
                acc[m][1], _mm256_madd_epi16(w1, _mm256_loadu_si256((const void *)(xm + 16))));
        }
    }
    for (int m = 0; m < M; m++) dot[m] += i8_hsum(_mm256_add_epi32(acc[m][0], acc[m][1]));
}

#endif  /* GEMV_INT8_AVX2 */

/* the rows [n0, n1) for M (1..4, a constant after inlining) rows of int16 x (row stride Kp,
 * zero past K): each row's exact sum block by block (i8_block), then i8_out */
static inline __attribute__((always_inline)) void gemv_i8_rows_m(
        const int16_t *xq, const float *xs, const int M, int64_t K, int64_t Kp, const int8_t *Q,
        int64_t n0, int64_t n1, int64_t ldq, const uint16_t *scale, const uint16_t *bias,
        uint16_t *y, int64_t ldy) {
    for (int64_t n = n0; n < n1; n++) {
        const int8_t *q = Q + n * ldq;
        int64_t dot[4] = {0, 0, 0, 0};
        for (int64_t b0 = 0; b0 < K; b0 += I8_BLOCK)
            i8_block(q, xq, M, Kp, b0, b0 + I8_BLOCK < K ? b0 + I8_BLOCK : K, dot);
        for (int m = 0; m < M; m++) y[m * ldy + n] = i8_out(dot[m], xs[m], scale, bias, n);
    }
}

#ifndef GEMV_INT8_AVX2
/* W's rows [c0, c0 + nc) (nc <= I8_NB) widened to int16 as column pairs: panel[p][c] holds
 * (q[c0 + c][2p], q[c0 + c][2p + 1]) as one int32, p < Kp / 2, c < I8_NB (zeros past K and
 * past nc): 16 columns by 16 pairs a transpose */
static void i8_panel(const int8_t *Q, int64_t ldq, int64_t c0, int64_t nc, int64_t K,
                     int64_t Kp, int32_t *panel) {
    for (int64_t g = 0; g < I8_NB; g += 16)
        for (int64_t k = 0; k < Kp; k += 32) {
            __m512i r[16];
            int64_t left = K - k;
            __mmask32 mk = left >= 32 ? (__mmask32)0xffffffffu
                                      : left > 0 ? (__mmask32)((1u << left) - 1) : 0;
            for (int c = 0; c < 16; c++)
                r[c] = g + c < nc ? _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(
                                        mk, Q + (c0 + g + c) * ldq + k))
                                  : _mm512_setzero_si512();
            transpose16_u32(r);  /* r[p]: pair p of the 16 columns */
            for (int p = 0; p < 16; p++)
                _mm512_storeu_si512(panel + (k / 2 + p) * I8_NB + g, r[p]);
        }
}

/* rows m0 .. m0 + MR (MR <= I8_MR, a constant after inlining) of the product with a panel's
 * columns c0 .. c0 + nc: one int32 accumulator of 16 columns per row and 16 columns (W's
 * pair vectors loaded once for the tile's rows, x's pair broadcast once for the 4 vectors),
 * added into int64 every I8_FLUSH pairs; the integer sums are exact, so any tiling gives
 * gemv_i8_rows_m's result, then i8_out's rounding on 16 columns at once */
static inline __attribute__((always_inline)) void i8_tile(
        const int16_t *xq, const float *xs, int64_t Kp, const int32_t *panel,
        const uint16_t *scale, const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t m0,
        int64_t c0, int64_t nc, const int MR) {
    __m512i acc[I8_MR][4], tot[I8_MR][4][2];
    for (int m = 0; m < MR; m++)
        for (int j = 0; j < 4; j++) tot[m][j][0] = tot[m][j][1] = _mm512_setzero_si512();
    const int64_t P = Kp / 2;
    for (int64_t p0 = 0; p0 < P; p0 += I8_FLUSH) {
        int64_t p1 = p0 + I8_FLUSH < P ? p0 + I8_FLUSH : P;
        for (int m = 0; m < MR; m++)
            for (int j = 0; j < 4; j++) acc[m][j] = _mm512_setzero_si512();
        for (int64_t p = p0; p < p1; p++) {
            const int32_t *wp = panel + p * I8_NB;
            __m512i w0 = _mm512_loadu_si512(wp), w1 = _mm512_loadu_si512(wp + 16),
                    w2 = _mm512_loadu_si512(wp + 32), w3 = _mm512_loadu_si512(wp + 48);
            for (int m = 0; m < MR; m++) {
                int32_t pair;
                memcpy(&pair, xq + (m0 + m) * Kp + 2 * p, 4);
                __m512i xb = _mm512_set1_epi32(pair);
#ifdef __AVX512VNNI__
                /* one asm a row: GCC reloads an operand for each separate one */
                __asm__("vpdpwssd %5, %4, %0\n\tvpdpwssd %6, %4, %1\n\t"
                        "vpdpwssd %7, %4, %2\n\tvpdpwssd %8, %4, %3"
                        : "+v"(acc[m][0]), "+v"(acc[m][1]), "+v"(acc[m][2]), "+v"(acc[m][3])
                        : "v"(xb), "v"(w0), "v"(w1), "v"(w2), "v"(w3));
#else
                acc[m][0] = dp16(acc[m][0], w0, xb);
                acc[m][1] = dp16(acc[m][1], w1, xb);
                acc[m][2] = dp16(acc[m][2], w2, xb);
                acc[m][3] = dp16(acc[m][3], w3, xb);
#endif
            }
        }
        for (int m = 0; m < MR; m++)
            for (int j = 0; j < 4; j++) {
                tot[m][j][0] = _mm512_add_epi64(
                    tot[m][j][0], _mm512_cvtepi32_epi64(_mm512_castsi512_si256(acc[m][j])));
                tot[m][j][1] = _mm512_add_epi64(
                    tot[m][j][1], _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(acc[m][j], 1)));
            }
    }
    for (int j = 0; j < 4 && 16 * j < nc; j++) {
        int64_t n = c0 + 16 * j, left = nc - 16 * j;
        __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
        __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, scale + n)), 16));
        __m512 bs = bias ? _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, bias + n)), 16))
                         : _mm512_setzero_ps();
        for (int m = 0; m < MR; m++) {
            __m512 d = _mm512_insertf32x8(
                _mm512_castps256_ps512(_mm512_cvtepi64_ps(tot[m][j][0])),
                _mm512_cvtepi64_ps(tot[m][j][1]), 1);
            __m512 v = _mm512_mul_ps(d, _mm512_set1_ps(xs[m0 + m]));
            __asm__("" : "+v"(v));  /* as i8_out: no regrouping of the two products */
            __m512i r = f2bf16(_mm512_mul_ps(v, sc));
            if (bias)
                r = f2bf16(_mm512_add_ps(_mm512_castsi512_ps(_mm512_slli_epi32(r, 16)), bs));
            _mm256_mask_storeu_epi16(y + (m0 + m) * ldy + n, mk, _mm512_cvtepi32_epi16(r));
        }
    }
}

static void gemv_i8_rows(const int16_t *xq, const float *xs, int64_t M, int64_t K, int64_t Kp,
                         const int8_t *Q, int64_t n0, int64_t n1, int64_t ldq,
                         const uint16_t *scale, const uint16_t *bias, uint16_t *y,
                         int64_t ldy) {
    if (M <= 0) return;
    if (M <= 4) {  /* one stream of W: a few rows are bound by memory */
        switch (M) {
        case 1: gemv_i8_rows_m(xq, xs, 1, K, Kp, Q, n0, n1, ldq, scale, bias, y, ldy); break;
        case 2: gemv_i8_rows_m(xq, xs, 2, K, Kp, Q, n0, n1, ldq, scale, bias, y, ldy); break;
        case 3: gemv_i8_rows_m(xq, xs, 3, K, Kp, Q, n0, n1, ldq, scale, bias, y, ldy); break;
        default: gemv_i8_rows_m(xq, xs, 4, K, Kp, Q, n0, n1, ldq, scale, bias, y, ldy); break;
        }
        return;
    }
    /* more: W's rows in panels (i8_panel) read from L2 by every tile of I8_MR rows */
    int32_t *panel = malloc(sizeof(int32_t) * (size_t)(I8_NB * (Kp / 2)) + 64);
    if (!panel) return;
    for (int64_t c0 = n0; c0 < n1; c0 += I8_NB) {
        int64_t nc = n1 - c0 < I8_NB ? n1 - c0 : I8_NB;
        i8_panel(Q, ldq, c0, nc, K, Kp, panel);
        for (int64_t m0 = 0; m0 < M; m0 += I8_MR) {
#define I8_TILE(MR) i8_tile(xq, xs, Kp, panel, scale, bias, y, ldy, m0, c0, nc, MR); break
            switch (M - m0 < I8_MR ? (int)(M - m0) : I8_MR) {
            case 1: I8_TILE(1);
            case 2: I8_TILE(2);
            case 3: I8_TILE(3);
            case 4: I8_TILE(4);
            case 5: I8_TILE(5);
            default: I8_TILE(6);
            }
#undef I8_TILE
        }
    }
    free(panel);
}

/* one row x [K] quantized to int16 into xq [Kp] (zero past K) with its scale *xs: amax / 32767,
 * each element rounded to nearest even (as lrintf); a row holding inf or NaN has no integer
 * form: its scale is NaN, so are its outputs (checked on the exponent bits: -ffast-math may
 * fold comparisons with NaN) */
static void i8_quantize_row(const uint16_t *xm, int64_t K, int64_t Kp, int16_t *xq, float *xs) {
    const __m512i abs_mask = _mm512_set1_epi32(0x7fffffff);
    const __m512i exp_mask = _mm512_set1_epi32(0x7f800000);
    __m512 amax16 = _mm512_setzero_ps();
    __mmask16 bad = 0;
    int64_t k = 0;
    for (; k < K; k += 16) {
        __mmask16 mk = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512i v = _mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(mk, xm + k)), 16);
        bad |= _mm512_mask_cmpeq_epi32_mask(mk, _mm512_and_si512(v, exp_mask), exp_mask);
        amax16 = _mm512_max_ps(amax16, _mm512_castsi512_ps(_mm512_and_si512(v, abs_mask)));
    }
    float amax = _mm512_reduce_max_ps(amax16);
    int finite = bad == 0;
    float inv = finite && amax > 0.f ? 32767.f / amax : 0.f;
    *xs = !finite ? NAN : amax / 32767.f;
    const __m512 vinv = _mm512_set1_ps(inv);
    for (k = 0; k < Kp; k += 16) {  /* past K: zeros (masked load) times inv */
        __mmask16 mk = K - k >= 16 ? (__mmask16)0xffff
                                   : K > k ? (__mmask16)((1u << (K - k)) - 1) : 0;
        __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_maskz_loadu_epi16(mk, xm + k)), 16));
        __m512i r = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v, vinv),
                                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m256i h = _mm512_cvtepi32_epi16(r);  /* |r| <= 32767 (NaN rows: any value) */
        if (Kp - k >= 16) _mm256_storeu_si256((void *)(xq + k), h);
        else _mm256_mask_storeu_epi16(xq + k, (__mmask16)((1u << (Kp - k)) - 1), h);
    }
}

#else  /* GEMV_INT8_AVX2 */

static void gemv_i8_rows(const int16_t *xq, const float *xs, int64_t M, int64_t K, int64_t Kp,
                         const int8_t *Q, int64_t n0, int64_t n1, int64_t ldq,
                         const uint16_t *scale, const uint16_t *bias, uint16_t *y,
                         int64_t ldy) {
    for (int64_t b = n0; b < n1; b += I8_BAND) {
        int64_t b1 = b + I8_BAND < n1 ? b + I8_BAND : n1;
        for (int64_t m0 = 0; m0 < M; m0 += 4) {
            const int16_t *x = xq + m0 * Kp;
            const float *s = xs + m0;
            uint16_t *ym = y + m0 * ldy;
            switch (M - m0 < 4 ? (int)(M - m0) : 4) {
            case 1: gemv_i8_rows_m(x, s, 1, K, Kp, Q, b, b1, ldq, scale, bias, ym, ldy); break;
            case 2: gemv_i8_rows_m(x, s, 2, K, Kp, Q, b, b1, ldq, scale, bias, ym, ldy); break;
            case 3: gemv_i8_rows_m(x, s, 3, K, Kp, Q, b, b1, ldq, scale, bias, ym, ldy); break;
            default: gemv_i8_rows_m(x, s, 4, K, Kp, Q, b, b1, ldq, scale, bias, ym, ldy); break;
            }
        }
    }
}

/* 8 bf16 values from p (n < 8: zero-padded) as float32 bits */
static inline __m256i i8_bf8(const uint16_t *p, int64_t n) {
    __m128i h;
    if (n >= 8) {
        h = _mm_loadu_si128((const void *)p);
    } else {
        uint16_t t[8] = {0};
        if (n > 0) memcpy(t, p, sizeof(uint16_t) * (size_t)n);
        h = _mm_loadu_si128((const void *)t);
    }
    return _mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16);
}

/* i8_quantize_row of the AVX-512 build on 8 lanes: the same amax, scale and rounding (to
 * nearest even, MXCSR's mode) */
static void i8_quantize_row(const uint16_t *xm, int64_t K, int64_t Kp, int16_t *xq, float *xs) {
    const __m256i abs_mask = _mm256_set1_epi32(0x7fffffff);
    const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
    __m256 amax8 = _mm256_setzero_ps();
    __m256i bad = _mm256_setzero_si256();
    for (int64_t k = 0; k < K; k += 8) {  /* zero padding: neither inf nor larger */
        __m256i v = i8_bf8(xm + k, K - k);
        bad = _mm256_or_si256(bad, _mm256_cmpeq_epi32(_mm256_and_si256(v, exp_mask), exp_mask));
        amax8 = _mm256_max_ps(amax8, _mm256_castsi256_ps(_mm256_and_si256(v, abs_mask)));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, amax8);
    float amax = lanes[0];
    for (int j = 1; j < 8; j++) amax = lanes[j] > amax ? lanes[j] : amax;
    int finite = _mm256_testz_si256(bad, bad);
    float inv = finite && amax > 0.f ? 32767.f / amax : 0.f;
    *xs = !finite ? NAN : amax / 32767.f;
    const __m256 vinv = _mm256_set1_ps(inv);
    const __m256i lo16 = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1, -1,
                                          -1, 0, 1, 4, 5, 8, 9, 12, 13, -1, -1, -1, -1, -1, -1,
                                          -1, -1);
    for (int64_t k = 0; k < Kp; k += 8) {  /* past K: zeros times inv */
        __m256 v = _mm256_castsi256_ps(i8_bf8(xm + k, K - k));
        __m256i r = _mm256_cvtps_epi32(_mm256_mul_ps(v, vinv));
        /* each lane's low 16 bits, as AVX-512's vpmovdw truncates (|r| <= 32767 keeps its
         * value; a lane made of inf or NaN, 0x80000000, gives 0 in both builds: a row so
         * small that 32767 / amax overflows) */
        r = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(r, lo16), 0x08);
        _mm_storeu_si128((void *)(xq + k), _mm256_castsi256_si128(r));
    }
}
#endif  /* GEMV_INT8_AVX2 */

/* x's rows quantized to int16 into xq [M][Kp] (Kp = i8_kp(K): K rounded up to 32, zero past
 * K) with their scales xs[M], rows shared by the threads (a barrier after) */
static void i8_prepare(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, int16_t *xq,
                       float *xs) {
    int64_t Kp = i8_kp(K);
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) i8_quantize_row(x + m * ldx, K, Kp, xq + m * Kp, xs + m);
}

/* i8_prepare, then the calling thread's share of the columns (no barrier after) */
static void gemv_int8_body(const uint16_t *x, int64_t M, int64_t K, int64_t ldx,
                           const int8_t *Q, int64_t N, int64_t ldq, const uint16_t *scale,
                           const uint16_t *bias, uint16_t *y, int64_t ldy, int16_t *xq,
                           float *xs) {
    int64_t Kp = i8_kp(K);
    i8_prepare(x, M, K, ldx, xq, xs);
    int64_t n0, n1;
    thread_share(N, &n0, &n1);
    if (n0 < n1) gemv_i8_rows(xq, xs, M, K, Kp, Q, n0, n1, ldq, scale, bias, y, ldy);
}
#endif

void gp_gemv_int8(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const int8_t *Q,
                  int64_t N, int64_t ldq, const uint16_t *scale, const uint16_t *bias,
                  uint16_t *y, int64_t ldy, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
#ifdef HAVE_GEMV_INT8
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(M * i8_kp(K)) + 64);
    float *xs = malloc(sizeof(float) * (size_t)(M > 0 ? M : 1));
    if (!xq || !xs) { free(xq); free(xs); return; }
    #pragma omp parallel num_threads(threads) if (N * K >= 65536)
    gemv_int8_body(x, M, K, ldx, Q, N, ldq, scale, bias, y, ldy, xq, xs);
    free(xq);
    free(xs);
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)Q; (void)N; (void)ldq; (void)scale;
    (void)bias; (void)y; (void)ldy;
#endif
}

/* ---- 4-bit weights (kernels/quant4.py's format) --------------------------------------------
 * y[m][n] = bf16(bf16(sum_k x[m][k] w[n][k]) + bias[n]) for w[n][k] = q * scale[n][g] +
 * offset[n][g], q the 4-bit values packed in blocks of 32 columns (byte j: column j low,
 * column 16 + j high), groups of G columns (a multiple of 32), computed as
 *   sum over groups g of  scale[n][g] * (sum_{k in g} x[k] q[k])  +  offset[n][g] * xsum[g]
 * with the products x[k] q[k] exact (a bf16 times an integer of 4 bits) and summed as
 * vdpbf16ps sums pairs: the columns in pairs of blocks (64 columns: the first block's 16 low
 * columns, the second's 16 low, the first's 16 high, the second's 16 high; a last lone block
 * paired with zeros), the two 32-column halves of a pair, low then high, each into 16 lanes
 * (lanes 0-7: the first block's columns 2j, 2j + 1; lanes 8-15: the second's), every
 * product pair as vdpbf16ps adds it (denormal inputs as zero, lane = fma(odd) then fma(even),
 * flushed). Each half's lanes (from zero) are multiplied by their block's group scale into
 * the total by one FMA per lane after the pair where the half's next block (the pair after's,
 * or none) is in another group (groups of 32: after every pair, a group a half; groups of 64
 * or more: after a group's last pair; groups of 96 or G = K: where either half's group
 * changes). xsum[g]: the
 * group's x in float32, 16 lanes added in column order, then gemv_hsum's tree; the offsets'
 * term: per 16 groups a lane each, FMAs in group order, added to the total's lanes, then
 * gemv_hsum's tree, rounded to bf16, the bias added, rounded again. All under DAZ/FTZ. A row's
 * sums do not depend on how many rows share the call or how they are tiled (batch
 * invariance). Two builds do exactly that: AVX-512 BF16 (the 4-bit values turned into bf16
 * by a word permute from a table, the dot-product instruction itself) and AVX2 + FMA (the
 * same words by byte shuffles, vdpbf16ps emulated as the bf16 product does): bit-identical,
 * tested. Rows of x in tiles of up to Q4_MR share each pair's weights; W is read as up to
 * Q4_NR streams (one output row each). x is permuted into the pairs' column order once per
 * call (bf16, exact). */
#ifdef HAVE_GEMV_BF16
#define HAVE_GEMV_INT4 1
#define Q4_MR 4
#define Q4_NR 4  /* MR x NR <= 8 (accumulator and total each) */
#define Q4_MBLOCK 32  /* rows of x a pass over a thread's share of W (their x in L2) */

#ifdef __AVX512F__
typedef __m512 q4v_t;
static inline q4v_t q4v_zero(void) { return _mm512_setzero_ps(); }
static inline q4v_t q4v_load(const float *p) { return _mm512_loadu_ps(p); }
static inline q4v_t q4v_load_n(const float *p, int64_t n) {  /* lanes n.. zero */
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
}
static inline q4v_t q4v_fma(q4v_t a, q4v_t b, q4v_t c) { return _mm512_fmadd_ps(a, b, c); }
static inline q4v_t q4v_add(q4v_t a, q4v_t b) {  /* one add, never merged with others */
    __m512 r = _mm512_add_ps(a, b);
    __asm__("" : "+v"(r));
    return r;
}
static inline float q4v_sum(q4v_t a) {
    return gemv_hsum(_mm512_castps512_ps256(a),
                     _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}
#else
typedef struct { __m256 lo, hi; } q4v_t;
static inline q4v_t q4v_zero(void) {
    q4v_t a = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    return a;
}
static inline q4v_t q4v_load(const float *p) {
    q4v_t a = {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)};
    return a;
}
static inline q4v_t q4v_load_n(const float *p, int64_t n) {  /* lanes n.. zero */
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    __m256i lo = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), lane);
    __m256i hi = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n - 8), lane);
    q4v_t a = {_mm256_maskload_ps(p, lo), _mm256_maskload_ps(p + 8, hi)};
    return a;
}
static inline q4v_t q4v_fma(q4v_t a, q4v_t b, q4v_t c) {
    q4v_t r = {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
    return r;
}
static inline q4v_t q4v_add(q4v_t a, q4v_t b) {
    q4v_t r = {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)};
    __asm__("" : "+x"(r.lo), "+x"(r.hi));
    return r;
}
static inline float q4v_sum(q4v_t a) { return gemv_hsum(a.lo, a.hi); }
#endif

/* the bf16 words of a 4-bit weight's 16 values: 0..15 (code NULL), or its codebook
 * code[0..15] rounded to bf16 (kernels/quant4.py: MXFP4's e2m1 values are exact) */
#ifdef __AVX512BF16__
typedef __m512i q4tab_t;  /* the 16 words in lanes 0-15 (a word permute's table) */
#else
typedef struct { __m128i hi, lo; } q4tab_t;  /* their high and low bytes (byte shuffles) */
#endif
static inline q4tab_t q4_table(const float *code) {
    uint16_t w[32] = {0};
    for (int i = 0; i < 16; i++) w[i] = f2bf(code ? code[i] : (float)i);
#ifdef __AVX512BF16__
    return _mm512_loadu_si512((const void *)w);
#else
    uint8_t hi[16], lo[16];
    for (int i = 0; i < 16; i++) { hi[i] = (uint8_t)(w[i] >> 8); lo[i] = (uint8_t)w[i]; }
    q4tab_t t = {_mm_loadu_si128((const void *)hi), _mm_loadu_si128((const void *)lo)};
    return t;
#endif
}

/* a pair of blocks' 64 4-bit values (32 bytes; one block: 16, the rest zeros) as the bf16
 * words of the dot products (table: q4_table's): *lo = the blocks' low columns, *hi = their
 * high columns */
#ifdef __AVX512BF16__
static inline void q4_pair(const uint8_t *b, int full, q4tab_t table, gop_t *lo, gop_t *hi) {
    __m256i v = full ? _mm256_loadu_si256((const void *)b)
                     : _mm256_zextsi128_si256(_mm_loadu_si128((const void *)b));
    __m512i w = _mm512_cvtepu8_epi16(v);
    *lo = _mm512_permutexvar_epi16(_mm512_and_si512(w, _mm512_set1_epi16(15)), table);
    *hi = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), table);
}
/* per-lane scales: lanes 0-7 a, 8-15 b */
static inline gacc_t q4_scales(float a, float b) {
    return _mm512_shuffle_f32x4(_mm512_set1_ps(a), _mm512_set1_ps(b), 0x00);
}
static inline gacc_t gacc_fma(gacc_t a, gacc_t s, gacc_t t) { return _mm512_fmadd_ps(a, s, t); }
static inline q4v_t gacc_q4v(gacc_t a) { return a; }
#else
static inline __m256i q4_words(__m128i nib, q4tab_t t) {  /* 16 values (bytes) -> words */
    __m128i h = _mm_shuffle_epi8(t.hi, nib), l = _mm_shuffle_epi8(t.lo, nib);
    return _mm256_set_m128i(_mm_unpackhi_epi8(l, h), _mm_unpacklo_epi8(l, h));
}
static inline void q4_pair(const uint8_t *b, int full, q4tab_t t, gop_t *lo, gop_t *hi) {
    const __m128i m15 = _mm_set1_epi8(15);
    __m128i b0 = _mm_loadu_si128((const void *)b);
    __m128i b1 = full ? _mm_loadu_si128((const void *)(b + 16)) : _mm_setzero_si128();
    lo->lo = q4_words(_mm_and_si128(b0, m15), t);
    lo->hi = q4_words(_mm_and_si128(b1, m15), t);
    hi->lo = q4_words(_mm_and_si128(_mm_srli_epi16(b0, 4), m15), t);
    hi->hi = q4_words(_mm_and_si128(_mm_srli_epi16(b1, 4), m15), t);
}
static inline gacc_t q4_scales(float a, float b) {
    gacc_t s = {_mm256_set1_ps(a), _mm256_set1_ps(b)};
    return s;
}
static inline gacc_t gacc_fma(gacc_t a, gacc_t s, gacc_t t) {
    gacc_t r = {_mm256_fmadd_ps(a.lo, s.lo, t.lo), _mm256_fmadd_ps(a.hi, s.hi, t.hi)};
    return r;
}
static inline q4v_t gacc_q4v(gacc_t a) {
#ifdef __AVX512F__
    return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(a.lo)),
                                               _mm256_castps_pd(a.hi), 1));
#else
    q4v_t r = {a.lo, a.hi};
    return r;
#endif
}
#endif

/* group scale i of S: float32, or (e8) MXFP4's one-byte exponent e, 2^(e - 127) (e 0: the
 * subnormal 2^-127; 255: infinity, which the loader refuses) */
static inline float q4_scale(const void *S, int64_t i, int e8) {
    if (!e8) return ((const float *)S)[i];
    uint32_t e = ((const uint8_t *)S)[i];
    union { uint32_t u; float f; } v = {.u = e ? e << 23 : 0x00400000u};
    return v.f;
}

/* rows [m0, m0 + MR) of xp (x in the pairs' order, bf16, row stride Kp; xsum: their groups'
 * sums, [M][ng]) times output rows n0, n0 + cs, ... (NR of them) of W */
static inline __attribute__((always_inline)) void q4_tile(
        const uint16_t *xp, int64_t Kp, const float *xsum, int64_t K, const uint8_t *Q,
        int64_t ldq, const void *S, int e8, const float *O, int64_t G, q4tab_t tab,
        const uint16_t *bias, uint16_t *y, int64_t ldy, int64_t m0, int64_t n0, int64_t cs,
        const int MR, const int NR) {
    gacc_t tot[Q4_MR * Q4_NR], acc[Q4_MR * Q4_NR];
    int64_t ng = K / G, nb = K / 32;
#define Q4_GROUP(b) ((b) < nb ? (b) * 32 / G : -1)  /* block b's group (-1: none) */
    for (int e = 0; e < MR * NR; e++) tot[e] = acc[e] = gacc_zero();
    for (int64_t p = 0; 2 * p < nb; p++) {
        int full = 2 * p + 1 < nb;
        int64_t g0 = Q4_GROUP(2 * p), g1 = Q4_GROUP(2 * p + 1);
        gop_t wl[Q4_NR], wh[Q4_NR];
        for (int n = 0; n < NR; n++)
            q4_pair(Q + (n0 + n * cs) * ldq + 32 * p, full, tab, &wl[n], &wh[n]);
        for (int m = 0; m < MR; m++) {
            const uint16_t *xm = xp + (m0 + m) * Kp + 64 * p;
            gop_t xl = gop_load(xm), xh = gop_load(xm + 32);
            for (int n = 0; n < NR; n++) {
                acc[m * NR + n] = gacc_dp(acc[m * NR + n], xl, wl[n]);
                acc[m * NR + n] = gacc_dp(acc[m * NR + n], xh, wh[n]);
            }
        }
        /* each half's lanes into the total when its next block is in another group (or
         * none): every lane's accumulator holds one group's sums */
        if (Q4_GROUP(2 * p + 2) != g0 || Q4_GROUP(2 * p + 3) != g1) {
            for (int n = 0; n < NR; n++) {
                int64_t sn = (n0 + n * cs) * ng;
                gacc_t sv = q4_scales(q4_scale(S, sn + g0, e8),
                                      g1 >= 0 ? q4_scale(S, sn + g1, e8) : 0.0f);
                for (int m = 0; m < MR; m++) {
                    tot[m * NR + n] = gacc_fma(acc[m * NR + n], sv, tot[m * NR + n]);
                    acc[m * NR + n] = gacc_zero();
                }
            }
        }
    }
    for (int m = 0; m < MR; m++)
        for (int n = 0; n < NR; n++) {
            const float *xg = xsum + (m0 + m) * ng;
            q4v_t off = gacc_q4v(tot[m * NR + n]);
            int64_t g = 0;
            if (O) {  /* (none: offsets all zero, a codebook weight's) */
                const float *on = O + (n0 + n * cs) * ng;
                for (; g + 16 <= ng; g += 16)
                    off = q4v_fma(q4v_load(xg + g), q4v_load(on + g), off);
                if (g < ng)  /* the last groups, zero-padded */
                    off = q4v_fma(q4v_load_n(xg + g, ng - g), q4v_load_n(on + g, ng - g), off);
            }
#undef Q4_GROUP
            float v = round_bf(q4v_sum(off));
            if (bias) v += bf2f(bias[n0 + n * cs]);
            y[(m0 + m) * ldy + n0 + n * cs] = f2bf(v);
        }
}

#define Q4_CASE(A, B) \
    case (A) * 8 + (B): q4_tile(xp, Kp, xsum, K, Q, ldq, S, e8, O, G, tab, bias, y, ldy, m0, \
                                c0, cs, A, B); break

/* this thread's share [n0, n1) of W's rows for all M rows of xp: the share in Q4_NR parts
 * read side by side (each a sequential stream), rows of x in tiles of Q4_MR, Q4_MBLOCK rows
 * of x a pass over the share */
static void gemv_int4_rows(const uint16_t *xp, int64_t Kp, const float *xsum, int64_t M,
                           int64_t K, const uint8_t *Q, int64_t ldq, const void *S, int e8,
                           const float *O, int64_t G, const float *code, int64_t n0,
                           int64_t n1, const uint16_t *bias, uint16_t *y, int64_t ldy) {
#ifdef __AVX512BF16__  /* 32 registers: up to 8 (m, n) pairs a tile */
    const int64_t NRmax = M <= 2 ? 4 : 2, MRmax = Q4_MR;
#else  /* 16: up to 2 */
    const int64_t NRmax = M <= 1 ? 2 : 1, MRmax = 2;
#endif
    const q4tab_t tab = q4_table(code);
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | MXCSR_DAZ_FTZ);
    int64_t cs = (n1 - n0 + NRmax - 1) / NRmax;
    for (int64_t b0 = 0; b0 < M; b0 += Q4_MBLOCK) {
        int64_t b1 = b0 + Q4_MBLOCK < M ? b0 + Q4_MBLOCK : M;
        for (int64_t i = 0; i < cs; i++) {
            int64_t c0 = n0 + i;
            int nr = 0;
            while (nr < NRmax && c0 + nr * cs < n1) nr++;
            for (int64_t m0 = b0; m0 < b1; m0 += MRmax) {
                int mr = b1 - m0 < MRmax ? (int)(b1 - m0) : (int)MRmax;
                switch (mr * 8 + nr) {
                Q4_CASE(1, 1); Q4_CASE(1, 2); Q4_CASE(1, 3); Q4_CASE(1, 4);
                Q4_CASE(2, 1); Q4_CASE(2, 2); Q4_CASE(2, 3); Q4_CASE(2, 4);
                Q4_CASE(3, 1); Q4_CASE(3, 2); Q4_CASE(4, 1); Q4_CASE(4, 2);
                default: break;
                }
            }
        }
    }
    _mm_setcsr(csr);
}
#undef Q4_CASE

static inline int64_t q4_kp(int64_t K) { return (K + 63) / 64 * 64; }

/* x's rows in the pairs' order (xp [M][Kp], bf16) and their groups' sums (xsum [M][K / G]),
 * shared among the team (a barrier after) */
static void q4_prepare(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, int64_t G,
                       uint16_t *xp, float *xsum) {
    int64_t ng = K / G, nb = K / 32, Kp = q4_kp(K);
    #pragma omp for schedule(static)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * ldx;
        uint16_t *pm = xp + m * Kp;
        for (int64_t p = 0; 2 * p < nb; p++) {
            const uint16_t *b0 = xm + 64 * p, *b1 = b0 + 32;
            int full = 2 * p + 1 < nb;
            for (int j = 0; j < 16; j++) {
                pm[64 * p + j] = b0[j];
                pm[64 * p + 16 + j] = full ? b1[j] : 0;
                pm[64 * p + 32 + j] = b0[16 + j];
                pm[64 * p + 48 + j] = full ? b1[16 + j] : 0;
            }
        }
        unsigned int csr = _mm_getcsr();
        _mm_setcsr(csr | MXCSR_DAZ_FTZ);
        for (int64_t g = 0; g < ng; g++) {  /* the group's x: 16 lanes in column order */
            float f[16];
            q4v_t v = q4v_zero();
            for (int64_t k = g * G; k < (g + 1) * G; k += 16) {
                for (int j = 0; j < 16; j++) f[j] = bf2f(xm[k + j]);
                v = q4v_add(v, q4v_load(f));
            }
            xsum[m * ng + g] = q4v_sum(v);
        }
        _mm_setcsr(csr);
    }
}

/* q4_prepare, then this thread's share of W's rows */
static void gemv_int4_body(const uint16_t *x, int64_t M, int64_t K, int64_t ldx,
                           const uint8_t *Q, int64_t N, int64_t ldq, const void *S, int e8,
                           const float *O, int64_t G, const float *code,
                           const uint16_t *bias, uint16_t *y, int64_t ldy, uint16_t *xp,
                           float *xsum) {
    q4_prepare(x, M, K, ldx, G, xp, xsum);
    int64_t n0, n1;
    thread_share(N, &n0, &n1);
    if (n0 < n1)
        gemv_int4_rows(xp, q4_kp(K), xsum, M, K, Q, ldq, S, e8, O, G, code, n0, n1, bias,
                       y, ldy);
}
#endif

void gp_gemv_int4(const uint16_t *x, int64_t M, int64_t K, int64_t ldx, const uint8_t *Q,
                  int64_t N, int64_t ldq, const void *S, int e8, const float *O, int64_t G,
                  const float *code, const uint16_t *bias, uint16_t *y, int64_t ldy,
                  int threads) {
    (void)threads;
#ifdef HAVE_GEMV_INT4
    uint16_t *xp = malloc(sizeof(uint16_t) * (size_t)(M * q4_kp(K)) + 64);
    float *xsum = malloc(sizeof(float) * (size_t)(M * (K / G)) + 64);
    if (!xp || !xsum) { free(xp); free(xsum); return; }
    #pragma omp parallel num_threads(threads) if (N * K >= 65536)
    gemv_int4_body(x, M, K, ldx, Q, N, ldq, S, e8, O, G, code, bias, y, ldy, xp, xsum);
    free(xp);
    free(xsum);
#else
    (void)x; (void)M; (void)K; (void)ldx; (void)Q; (void)N; (void)ldq; (void)S; (void)e8;
    (void)O; (void)G; (void)code; (void)bias; (void)y; (void)ldy;
#endif
}

/* A mixture-of-experts MLP in one call: out[t] (bf16 [T][H], row stride ldo) = the sum over
 * row t's k choices, in ascending expert order, of bf16(down_e(act(gate_up_e)) * top),
 * added in float32 from zero and rounded once, for idx [T][k] (experts) and top [T][k]
 * (bf16 routing weights). Expert e's weights: gate_up[e] bf16 [2 inter][H], down[e] bf16
 * [H][inter] (addresses); or, with group > 0, 4-bit: packed [2 inter][H / 2] and
 * [H][inter / 2] with group scales gs and offsets go (addresses, gate_up's E then down's E;
 * the scales float32, or with e8 MXFP4's exponent bytes, q4_scale; go NULL: none, all zero)
 * and the experts' one codebook code (NULL: values 0..15) through the 4-bit product's rows;
 * or, with group < 0, int8 with bf16 row scales gs through the int8 product's rows (q4: float32 scratch for their prepared x, sized by the
 * Python wrapper). bias: NULL, or each product's bf16 bias (addresses, gate_up's E then
 * down's E; 0: none), added as the products add theirs. act 0: SiLU x up (gp_silu_mul), 1:
 * gpt-oss's clamped SwiGLU (gp_swiglu_oai, with limit and alpha).
 * The same bits as LlamaModel._experts' loop of products (each row
 * through gemv_rows, whose sums do not depend on which rows share a call; the activation as
 * the native op; the weighting as torch's bf16 mul; NaN bit patterns aside), so a row's
 * output does not depend on its step: pairs (row, choice) sorted by expert, stable; every
 * touched expert's gate_up rows, then every down row, shared among the threads as one list
 * (three barriers a call, not three an expert). scratch: bf16, T k (2 H + 3 inter).
 * LoRA on the experts (lora: NULL, or the step's terms, native.h's gp_lora_t, at layer; xl:
 * the two expert groups, gate_up's then down's, each num_proj = E projections of one width
 * widths[0], their ranks [E][S], proj_rank NULL where no adapter targets the group): each
 * pair's row's adapter's terms of its expert, added into its gate_up (before the activation)
 * and its down output (before the weighting) as gp_lora adds a projection's (the shrink's
 * float32 sums, the expand's float32 sums in rank order, added and rounded once): row by
 * row, so a row's bits do not depend on its step either. order: int64 [T k + 2 (E + 1) + T]. */
#ifdef HAVE_GEMV_BF16
/* every touched expert's rows of W (bf16 [N][K]; 4-bit [N][K / 2] with group scales and
 * offsets GS, GO [N][K / G] and the experts' codebook code (or NULL) when G > 0, x then as
 * q4_prepare leaves it in xp, xsum; int8 [N][K] with bf16 row scales GS when G < 0, x then
 * quantized as the int8 product does, into xp and xsum), plus expert e's bias B[e] (B NULL
 * or B[e] 0: none), for its rows of x, this thread's share of them all */
static void moe_products(const uint16_t *x, int64_t K, const int64_t *W, const int64_t *GS,
                         const int64_t *GO, int64_t G, int e8, const float *code,
                         const int64_t *B, const void *xp, const float *xsum,
                         const int64_t *start, int64_t E, int64_t N, uint16_t *y) {
    /* the threads share the work, not the rows: an output row of expert e costs its n rows
     * of x plus about 4 rows' worth for reading its weights (a prefill's experts differ in
     * n by 10x; the rows' split never changes a row's sums) */
    int64_t total = 0, a, b;
    for (int64_t e = 0; e < E; e++)
        total += start[e + 1] > start[e] ? (start[e + 1] - start[e] + 4) * N : 0;
    thread_share(total, &a, &b);
    for (int64_t e = 0, base = 0; e < E && base < b; e++) {
        int64_t n = start[e + 1] - start[e], unit = n + 4;
        if (!n) continue;
        /* rows whose first unit lies in [a, b) */
        int64_t lo = a > base ? (a - base + unit - 1) / unit : 0;
        int64_t hi = (b - base + unit - 1) / unit;
        lo = lo < N ? lo : N;
        hi = hi < N ? hi : N;
        base += unit * N;
        const uint16_t *bias = B ? (const uint16_t *)(intptr_t)B[e] : NULL;
        if (lo < hi && G > 0)
            gemv_int4_rows((const uint16_t *)xp + start[e] * q4_kp(K), q4_kp(K),
                           xsum + start[e] * (K / G), n, K, (const uint8_t *)(intptr_t)W[e],
                           K / 2, (const void *)(intptr_t)GS[e], e8,
                           GO ? (const float *)(intptr_t)GO[e] : NULL, G, code, lo, hi, bias,
                           y + start[e] * N, N);
#ifdef HAVE_GEMV_INT8
        else if (lo < hi && G < 0)
            gemv_i8_rows((const int16_t *)xp + start[e] * i8_kp(K), xsum + start[e], n, K,
                         i8_kp(K), (const int8_t *)(intptr_t)W[e], lo, hi, K,
                         (const uint16_t *)(intptr_t)GS[e], bias, y + start[e] * N, N);
#endif
        else if (lo < hi)
            gemv_rows(x + start[e] * K, n, K, K, (const uint16_t *)(intptr_t)W[e], lo, hi, K,
                      bias, y + start[e] * N, N);
    }
}
#endif

#ifdef HAVE_GEMV_BF16
/* x's rows [M][K] made ready for the experts' products of kind G (see moe_products; the team
 * shares the rows, a barrier after) */
static void moe_prepare(const uint16_t *x, int64_t M, int64_t K, int64_t G, void *xp,
                        float *xsum) {
    if (G > 0) {
        q4_prepare(x, M, K, K, G, (uint16_t *)xp, xsum);
        return;
    }
#ifdef HAVE_GEMV_INT8
    i8_prepare(x, M, K, K, (int16_t *)xp, xsum);
#endif
}
#endif

#ifdef HAVE_GEMV_BF16
static void moe_lora(const uint16_t *x, int64_t K, uint16_t *y, int64_t W, const gp_lora_t *lora,
                     int64_t layer, const gp_lora_group_t *grp, const int64_t *idx,
                     const int64_t *order, int64_t k, int64_t P, const int64_t *row_seg);
#endif

int gp_moe_experts(const uint16_t *h, int64_t ldh, int64_t T, int64_t H, const int64_t *idx,
                   const uint16_t *top, int64_t k, int64_t E, const int64_t *gate_up,
                   const int64_t *down, const int64_t *gs, const int64_t *go, int64_t group,
                   int e8, const float *code, const int64_t *bias, int act, float limit,
                   float alpha, int64_t inter, uint16_t *out, int64_t ldo, uint16_t *scratch, float *q4,
                   int64_t *order, const gp_lora_t *lora, int64_t layer,
                   const gp_lora_group_t *xl, int threads) {
    (void)threads;
#ifdef HAVE_GEMV_BF16
#ifndef HAVE_GEMV_INT8
    if (group < 0) return 1;  /* int8 experts: this build has no int8 product */
#endif
    int64_t P = T * k, *start = order + P;  /* start [E + 1] after order [P] */
    int64_t *row_seg = start + 2 * (E + 1);  /* [T]: each row's LoRA segment (-1: none) */
    if (lora) {
        for (int64_t t = 0; t < T; t++) row_seg[t] = -1;
        for (int64_t s = 0; s < lora->num_segments; s++)
            for (int64_t t = lora->starts[s]; t < lora->starts[s + 1] && t < T; t++)
                if (t >= 0 && lora->seg_rank[s] > 0) row_seg[t] = s;
    }
    for (int64_t e = 0; e <= E; e++) start[e] = 0;
    for (int64_t j = 0; j < P; j++) {
        if (idx[j] < 0 || idx[j] >= E || !gate_up[idx[j]] || !down[idx[j]]) return 1;
        start[idx[j] + 1]++;
    }
    for (int64_t e = 0; e < E; e++) start[e + 1] += start[e];
    {   /* counting sort, stable: pairs of one expert in row order */
        int64_t *fill = start + E + 1;
        for (int64_t e = 0; e < E; e++) fill[e] = start[e];
        for (int64_t j = 0; j < P; j++) order[fill[idx[j]]++] = j;
    }
    uint16_t *xs = scratch, *gu = xs + P * H, *mid = gu + P * 2 * inter, *ys = mid + P * inter;
    /* 4-bit experts: each product's x as q4_prepare leaves it; int8: quantized rows (int16,
     * i8_kp) and their scales */
    void *xp1 = q4, *xp2 = NULL;
    float *xsum1 = NULL, *xsum2 = NULL;
    if (group > 0) {
        xsum1 = q4 + P * q4_kp(H) / 2;
        xp2 = xsum1 + P * (H / group);
        xsum2 = (float *)((uint16_t *)xp2 + P * q4_kp(inter));
    } else if (group < 0) {
        xsum1 = q4 + P * i8_kp(H) / 2;
        xp2 = xsum1 + P;
        xsum2 = (float *)((int16_t *)xp2 + P * i8_kp(inter));
    }
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t s = 0; s < P; s++)
            memcpy(xs + s * H, h + (order[s] / k) * ldh, 2 * (size_t)H);
        if (group) moe_prepare(xs, P, H, group, xp1, xsum1);  /* ends in a barrier */
        moe_products(xs, H, gate_up, gs, go, group, e8, code, bias, xp1, xsum1, start, E,
                     2 * inter, gu);
        #pragma omp barrier
        if (lora && xl && xl[0].proj_rank)  /* the pairs' adapters' terms (a barrier after) */
            moe_lora(xs, H, gu, 2 * inter, lora, layer, &xl[0], idx, order, k, P, row_seg);
        if (act)  /* gpt-oss's clamped SwiGLU; else SiLU x up (each loop ends in a barrier) */
            swiglu_oai_body(gu, 2 * inter, mid, inter, P, inter, limit, alpha);
        else
            silu_mul_body(gu, 2 * inter, mid, inter, P, inter);
        if (group) moe_prepare(mid, P, inter, group, xp2, xsum2);
        moe_products(mid, inter, down, gs + E, go ? go + E : NULL, group, e8, code,
                     bias ? bias + E : NULL, xp2, xsum2, start, E, H, ys);
        #pragma omp barrier
        if (lora && xl && xl[1].proj_rank)
            moe_lora(mid, inter, ys, H, lora, layer, &xl[1], idx, order, k, P, row_seg);
        #pragma omp for schedule(static)
        for (int64_t t = 0; t < T; t++) {
            float acc[MAX_DIM];
            for (int64_t c = 0; c < H; c++) acc[c] = 0.0f;
            for (int64_t s = 0; s < P; s++) {  /* this row's pairs, in expert order */
                if (order[s] / k != t) continue;
                float w = bf2f(top[order[s]]);
                const uint16_t *y = ys + s * H;
                for (int64_t c = 0; c < H; c++) acc[c] += round_bf(bf2f(y[c]) * w);
            }
            uint16_t *o = out + t * ldo;
            for (int64_t c = 0; c < H; c++) o[c] = f2bf(acc[c]);
        }
    }
    return 0;
#else
    (void)h; (void)ldh; (void)T; (void)H; (void)idx; (void)top; (void)k; (void)E;
    (void)gate_up; (void)down; (void)gs; (void)go; (void)group; (void)e8; (void)code;
    (void)bias; (void)act; (void)limit; (void)alpha; (void)inter; (void)out;
    (void)ldo; (void)scratch; (void)q4; (void)order; (void)lora; (void)layer; (void)xl;
    return 1;
#endif
}

/* ---- LoRA ---------------------------------------------------------------------------------
 * The LoRA terms of one projection group for a few rows, from bf16 copies of the adapter slots
 * (adapters/slots.py's mirror: each group's A [P R][K] as the slots hold it, its projections'
 * B stacked and transposed, BT [R][widths]): for row t of segment s (rows starts[s] ..
 * starts[s+1]) with an adapter (seg_rank[s] = r > 0) in slot slots[s]:
 *   h = A[slot][0 : P r] . x[t]                       products exact, summed in float32
 *   out[t, col_j + c] += sum_i<r h[j r + i] BT[slot][i][col_j + c]
 * for each projection j the adapter targets (proj_rank[j][s] > 0; its columns from col_j,
 * the sum of the widths before it), added in float32 and rounded once (as torch adds a float32
 * delta into a bf16 tensor). The transposed B makes the expand a sum of r broadcast
 * multiply-adds over 16 consecutive columns, no reductions. */
#ifndef HAVE_GEMV_BF16
static inline float bf16_dot(const uint16_t *a, const uint16_t *b, int64_t K) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; k++) acc += bf2f(a[k]) * bf2f(b[k]);
    return acc;
}
#endif

/* h[u * ldh + i] = A_i . x[u] for the R rows A_i = rows[i] and n rows of x (row stride ldx),
 * bf16 inputs, float32 sums. Where the bf16 product is built (AVX-512 BF16, or AVX2 + FMA
 * emulating it) each sum is the product's stated one (16 lanes, a pair of a chunk of 32 a
 * lane, odd then even, gemv_hsum's tree; under DAZ and FTZ), so the two builds give the same
 * bits; AVX-512 BF16 takes four rows of A at a time (four sums in flight, each x vector
 * loaded once for four rows). The rows are read through their addresses (an adapter's rank
 * rows lie in pages, adapters/paged.py); each sum runs over K in one order whatever page a
 * row is in. */
#ifdef HAVE_GEMV_BF16
static inline float stated_dot(const uint16_t *a, const uint16_t *x, int64_t K) {
    gacc_t acc = gacc_zero();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) acc = gacc_dp(acc, gop_load(x + k), gop_load(a + k));
    if (k < K) acc = gacc_dp(acc, gop_tail(x + k, K - k), gop_tail(a + k, K - k));
    return gacc_sum(acc);
}
#endif

static void lora_shrink(const uint16_t *const *rows, int64_t R, const uint16_t *x, int64_t ldx,
                        int64_t n, int64_t K, float *h, int64_t ldh) {
    int64_t i = 0;
#ifdef HAVE_GEMV_BF16
    unsigned int csr = _mm_getcsr();
    _mm_setcsr(csr | MXCSR_DAZ_FTZ);
#endif
#ifdef __AVX512BF16__
    __mmask32 tail = (__mmask32)((1ull << (K % 32)) - 1);
    for (; i + 4 <= R; i += 4) {
        const uint16_t *a0 = rows[i], *a1 = rows[i + 1], *a2 = rows[i + 2], *a3 = rows[i + 3];
        for (int64_t u = 0; u < n; u++) {
            const uint16_t *xu = x + u * ldx;
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                __m512bh xv = (__m512bh)_mm512_loadu_si512(xu + k);
                s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_loadu_si512(a0 + k), xv);
                s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_loadu_si512(a1 + k), xv);
                s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_loadu_si512(a2 + k), xv);
                s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_loadu_si512(a3 + k), xv);
            }
            if (k < K) {
                __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, xu + k);
                s0 = _mm512_dpbf16_ps(s0, (__m512bh)_mm512_maskz_loadu_epi16(tail, a0 + k), xv);
                s1 = _mm512_dpbf16_ps(s1, (__m512bh)_mm512_maskz_loadu_epi16(tail, a1 + k), xv);
                s2 = _mm512_dpbf16_ps(s2, (__m512bh)_mm512_maskz_loadu_epi16(tail, a2 + k), xv);
                s3 = _mm512_dpbf16_ps(s3, (__m512bh)_mm512_maskz_loadu_epi16(tail, a3 + k), xv);
            }
            float *hu = h + u * ldh + i;
            hu[0] = gacc_sum(s0);
            hu[1] = gacc_sum(s1);
            hu[2] = gacc_sum(s2);
            hu[3] = gacc_sum(s3);
        }
    }
#endif
#ifdef HAVE_GEMV_BF16
    for (; i < R; i++)
        for (int64_t u = 0; u < n; u++) h[u * ldh + i] = stated_dot(rows[i], x + u * ldx, K);
    _mm_setcsr(csr);
#else
    for (; i < R; i++)
        for (int64_t u = 0; u < n; u++) h[u * ldh + i] = bf16_dot(rows[i], x + u * ldx, K);
#endif
}

#if defined(__AVX512BW__) && defined(__AVX512VL__)
/* bf16x16_loadu for the lanes in mk (0 elsewhere, nothing read there) */
static inline __m512 bf16x16_load(const uint16_t *p, __mmask16 mk) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, p)), 16));
}

/* o[0:16 where mk] = bf16(o + add): f2bf on 16 lanes (round to nearest even, NaN kept quiet) */
static void add_into_bf16x16(uint16_t *o, __m512 add, __mmask16 mk) {
    __m512i u = _mm512_castps_si512(_mm512_add_ps(bf16x16_load(o, mk), add));
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), lsb));
    __mmask16 nan = _mm512_cmpgt_epi32_mask(
        _mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
    rounded = _mm512_mask_mov_epi32(rounded, nan,
                                    _mm512_or_si512(u, _mm512_set1_epi32(0x400000)));
    _mm256_mask_storeu_epi16((void *)o, mk,
                             _mm512_cvtepi32_epi16(_mm512_srli_epi32(rounded, 16)));
}
#endif

/* out[u][c] += sum_i<r h[u][i] BT_i[c0 + c] for c < W, n rows u (out row stride ldo, h row
 * stride ldh; BT_i = rows[i], the transposed B's rank rows, each in its page): 64 columns at a
 * time (four sums in flight), then 16, then a masked tail */
static void lora_expand(const uint16_t *const *rows, int64_t c0, int64_t W, int64_t r,
                        const float *h, int64_t ldh, int64_t n, uint16_t *out, int64_t ldo) {
    int64_t c = 0;
#if defined(__AVX512BW__) && defined(__AVX512VL__)
    for (; c + 64 <= W; c += 64)
        for (int64_t u = 0; u < n; u++) {
            const float *hu = h + u * ldh;
            __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
            for (int64_t i = 0; i < r; i++) {
                __m512 hv = _mm512_set1_ps(hu[i]);
                const uint16_t *b = rows[i] + c0 + c;
                s0 = _mm512_fmadd_ps(hv, bf16x16_loadu(b), s0);
                s1 = _mm512_fmadd_ps(hv, bf16x16_loadu(b + 16), s1);
                s2 = _mm512_fmadd_ps(hv, bf16x16_loadu(b + 32), s2);
                s3 = _mm512_fmadd_ps(hv, bf16x16_loadu(b + 48), s3);
            }
            uint16_t *o = out + u * ldo + c;
            add_into_bf16x16(o, s0, 0xffff);
            add_into_bf16x16(o + 16, s1, 0xffff);
            add_into_bf16x16(o + 32, s2, 0xffff);
            add_into_bf16x16(o + 48, s3, 0xffff);
        }
    for (; c < W; c += 16) {
        __mmask16 mk = W - c >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (W - c)) - 1);
        for (int64_t u = 0; u < n; u++) {
            const float *hu = h + u * ldh;
            __m512 s0 = _mm512_setzero_ps();
            for (int64_t i = 0; i < r; i++)
                s0 = _mm512_fmadd_ps(_mm512_set1_ps(hu[i]),
                                     bf16x16_load(rows[i] + c0 + c, mk), s0);
            add_into_bf16x16(out + u * ldo + c, s0, mk);
        }
    }
#elif defined(__AVX2__) && defined(__FMA__)
    for (; c + 8 <= W; c += 8)  /* the same operations an element, on 8 lanes */
        for (int64_t u = 0; u < n; u++) {
            const float *hu = h + u * ldh;
            __m256 s0 = _mm256_setzero_ps();
            for (int64_t i = 0; i < r; i++) {
                __m256i b = _mm256_cvtepu16_epi32(
                    _mm_loadu_si128((const __m128i *)(rows[i] + c0 + c)));
                s0 = _mm256_fmadd_ps(_mm256_set1_ps(hu[i]),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)), s0);
            }
            float sum[8];
            _mm256_storeu_ps(sum, s0);
            uint16_t *o = out + u * ldo + c;
            for (int j = 0; j < 8; j++) o[j] = f2bf(bf2f(o[j]) + sum[j]);
        }
#endif
    for (; c < W; c++)  /* each element: fma in rank order from 0, added and rounded once */
        for (int64_t u = 0; u < n; u++) {
            float acc = 0.0f;
            for (int64_t i = 0; i < r; i++) {
                acc = fmaf(h[u * ldh + i], bf2f(rows[i][c0 + c]), acc);
#if defined(__x86_64__)
                __asm__("" : "+x"(acc));  /* in rank order: -ffast-math may not reassociate */
#endif
            }
            uint16_t *o = out + u * ldo + c;
            *o = f2bf(bf2f(*o) + acc);
        }
}

#define LORA_CHUNK 16  /* rows of a segment per work item */

/* work items: up to LORA_CHUNK rows of one segment with an adapter (a decode step's segments
 * are an item each; a long prompt's rows are shared by the threads). An item's rows share the
 * adapter, so each A and BT row is read once from memory and reused from L1 for all of them.
 * Returns the count; *item_seg (malloc'd, NULL when out of memory) holds the segments, then
 * the first rows. */
static int64_t lora_items(int64_t S, const int32_t *starts, const int32_t *seg_rank,
                          int64_t **item_seg) {
    int64_t items = 0;
    for (int64_t s = 0; s < S; s++)
        if (seg_rank[s] > 0) items += (starts[s + 1] - starts[s] + LORA_CHUNK - 1) / LORA_CHUNK;
    int64_t *seg = malloc(sizeof(int64_t) * (size_t)(2 * items + 1));
    *item_seg = seg;
    if (!seg) return 0;
    for (int64_t s = 0, k = 0; s < S; s++)
        if (seg_rank[s] > 0)
            for (int64_t t = starts[s]; t < starts[s + 1]; t += LORA_CHUNK) {
                seg[k] = s;
                seg[items + k++] = t;
            }
    return items;
}

/* the bf16 piece of segment s's adapter holding rank row k of layer l (native.h's gp_lora_t:
 * piece l r + k of the adapter, in its pages' order) */
static inline const uint8_t *lora_piece(const gp_lora_t *lora, int64_t s, int64_t r, int64_t l,
                                        int64_t k) {
    int64_t i = l * r + k, ppp = lora->pieces_per_page;
    int64_t page = lora->page_ids[lora->seg_pages[s] + i / ppp];
    return lora->base + page * lora->page_bytes + (i % ppp) * lora->piece_bytes
           + lora->mirror_offset;
}

/* group g of layer l for the items (shared by the calling team; a barrier after): the
 * shrink and the expand of each item (mode LORA_BOTH, h kept per item); or, for a sum between
 * them (tensor parallelism: a row-parallel group's partial shrinks added over the ranks), the
 * shrink alone into h[t][j r + i] (LORA_SHRINK: float32, row stride ldh, every row of a
 * segment whose adapter targets the group) or the expand alone from it (LORA_EXPAND). The
 * same per-row sums in every mode. */
enum { LORA_BOTH, LORA_SHRINK, LORA_EXPAND };

static void lora_terms(const uint16_t *x, int64_t ldx, int64_t K, float *h, int64_t ldh,
                       uint16_t *out, int64_t ldo, const gp_lora_t *lora, int64_t l, int g,
                       int mode, int64_t items, const int64_t *item_seg) {
    const int64_t *item_row = item_seg + items;
    const gp_lora_group_t *grp = &lora->groups[g];
    int64_t S = lora->num_segments, P = grp->num_proj;
    const int32_t *proj_rank = grp->proj_rank, *starts = lora->starts;
    #pragma omp for schedule(dynamic, 1)
    for (int64_t it = 0; it < items; it++) {
        int64_t s = item_seg[it], t0 = item_row[it], r = lora->seg_rank[s];
        int any = 0;  /* an adapter that targets none of the group's projections skips it */
        for (int64_t j = 0; j < P; j++) any |= proj_rank[j * S + s] > 0;
        if (!any) continue;
        int64_t n = starts[s + 1] - t0 < LORA_CHUNK ? starts[s + 1] - t0 : LORA_CHUNK;
        float mine[LORA_CHUNK * MAX_LORA_COLS];  /* [n][P r]: LORA_BOTH's h */
        float *hp = mode == LORA_BOTH ? mine : h + t0 * ldh;
        int64_t ld = mode == LORA_BOTH ? P * r : ldh;
        const uint16_t *arow[MAX_LORA_COLS], *brow[MAX_LORA_COLS / 3];
        for (int64_t k = 0; k < r; k++) {  /* row j r + k of A: projection j's rank row k */
            const uint8_t *piece = lora_piece(lora, s, r, l, k);
            for (int64_t j = 0; j < P; j++)
                arow[j * r + k] = (const uint16_t *)(piece + grp->a_offset) + j * K;
            brow[k] = (const uint16_t *)(piece + grp->bt_offset);
        }
        if (mode != LORA_EXPAND) lora_shrink(arow, P * r, x + t0 * ldx, ldx, n, K, hp, ld);
        if (mode == LORA_SHRINK) continue;
        int64_t col = 0;
        for (int64_t j = 0; j < P; j++) {
            int64_t rj = proj_rank[j * S + s];
            if (rj > 0)
                lora_expand(brow, col, grp->widths[j], rj, hp + j * r, ld, n,
                            out + t0 * ldo + col, ldo);
            col += grp->widths[j];
        }
    }
}

static void lora_body(const uint16_t *x, int64_t ldx, int64_t K, uint16_t *out, int64_t ldo,
                      const gp_lora_t *lora, int64_t l, int g, int64_t items,
                      const int64_t *item_seg) {
    lora_terms(x, ldx, K, NULL, 0, out, ldo, lora, l, g, LORA_BOTH, items, item_seg);
}

void gp_lora_half(const uint16_t *x, int64_t ldx, int64_t K, float *h, int64_t ldh,
                  uint16_t *out, int64_t ldo, const gp_lora_t *lora, int64_t layer,
                  int64_t group, int64_t expand, int threads) {
    (void)threads;
    int64_t *item_seg;
    int64_t items = lora_items(lora->num_segments, lora->starts, lora->seg_rank, &item_seg);
    if (!item_seg) return;
    #pragma omp parallel num_threads(threads) if (items > 1)
    lora_terms(x, ldx, K, h, ldh, out, ldo, lora, layer, (int)group,
               expand ? LORA_EXPAND : LORA_SHRINK, items, item_seg);
    free(item_seg);
}

void gp_lora(const uint16_t *x, int64_t ldx, int64_t K, uint16_t *out, int64_t ldo,
             const gp_lora_t *lora, int64_t layer, int64_t group, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    int64_t *item_seg;
    int64_t items = lora_items(lora->num_segments, lora->starts, lora->seg_rank, &item_seg);
    if (!item_seg) return;
    #pragma omp parallel num_threads(threads) if (items > 1)
    lora_body(x, ldx, K, out, ldo, lora, layer, (int)group, items, item_seg);
    free(item_seg);
}

#ifdef HAVE_GEMV_BF16
/* the LoRA terms of one expert group for gp_moe_experts' pairs (sorted: pair s is x's row s,
 * y's row s; its step row order[s] / k, its expert idx[order[s]]): the team shares the pairs,
 * a barrier after */
static void moe_lora(const uint16_t *x, int64_t K, uint16_t *y, int64_t W, const gp_lora_t *lora,
                     int64_t layer, const gp_lora_group_t *grp, const int64_t *idx,
                     const int64_t *order, int64_t k, int64_t P, const int64_t *row_seg) {
    int64_t S = lora->num_segments;
    #pragma omp for schedule(dynamic, 4)
    for (int64_t s = 0; s < P; s++) {
        int64_t seg = row_seg[order[s] / k], e = idx[order[s]];
        if (seg < 0) continue;
        int64_t r = lora->seg_rank[seg], rj = grp->proj_rank[e * S + seg];
        if (rj <= 0) continue;
        const uint16_t *arow[MAX_LORA_COLS / 3], *brow[MAX_LORA_COLS / 3];
        float hs[MAX_LORA_COLS / 3];
        for (int64_t i = 0; i < rj; i++) {  /* expert e's rank row i of A, of B transposed */
            const uint8_t *piece = lora_piece(lora, seg, r, layer, i);
            arow[i] = (const uint16_t *)(piece + grp->a_offset) + e * K;
            brow[i] = (const uint16_t *)(piece + grp->bt_offset);
        }
        lora_shrink(arow, rj, x + s * K, K, 1, K, hs, rj);
        lora_expand(brow, e * W, W, rj, hs, rj, 1, y + s * W, W);
    }
}
#endif

/* ---- a whole decode step's layers in one call ----------------------------------------------
 * For steps of a few decode rows: every layer of the model, in the order and with the kernels
 * the per-op path calls from Python (so the same results, bit for bit), minus ~10 Python calls
 * a layer (~14 with adapters). The step (native.h's gp_step_t): x, the residual stream
 * [rows][hidden] (updated; filled first with the embedding rows of ids when ids is not NULL);
 * out, the final norm's output [rows][hidden]; logits: NULL, or [rows][vocab] float32 filled
 * with the head's product of out (the model's first and last ops in the same team: no torch
 * op and no second team around the step); layers: gp_layer_t per layer; lora: NULL, or the
 * step's LoRA terms. */
int gp_abi_version(void) { return GP_ABI_VERSION; }

/* a 4-bit weight's groups (gs NULL: the weight is not 4-bit) */
typedef struct {
    const float *gs, *go;
    int64_t group;
} gp_int4_t;

/* y [M][N] = x [M][K] times the weights W [N][K] (bf16, or int8 with bf16 row scales s) plus
 * the bias b (or NULL), with the GEMVs' rounding: this thread's share of the rows, no barrier */
static void gemv_body(const uint16_t *x, int64_t M, int64_t K, const void *W,
                      const uint16_t *s, const uint16_t *b, int64_t N, uint16_t *y, int16_t *xq,
                      float *xs, const gp_int4_t *q4, float *x4) {
#ifdef HAVE_GEMV_INT4
    if (q4 && q4->gs) {  /* 4-bit: x in the pairs' order into x4, its groups' sums after */
        gemv_int4_body(x, M, K, K, (const uint8_t *)W, N, K / 2, q4->gs, 0, q4->go,
                       q4->group, NULL, b, y, N, (uint16_t *)x4, x4 + M * q4_kp(K) / 2);
        return;
    }
#else
    (void)q4; (void)x4;
#endif
#ifdef HAVE_GEMV_INT8
    if (s)
        gemv_int8_body(x, M, K, K, (const int8_t *)W, N, K, s, b, y, N, xq, xs);
#else
    (void)xq; (void)xs;
#endif
#ifdef HAVE_GEMV_BF16
    if (!s)
        gemv_bf16_body(x, M, K, K, (const uint16_t *)W, N, K, b, y, N);
#endif
#if !defined(HAVE_GEMV_BF16) && !defined(HAVE_GEMV_INT8)
    (void)x; (void)M; (void)K; (void)W; (void)s; (void)b; (void)N; (void)y;
#endif
}

/* one layer's product, inside the team: this thread's share of the rows, then a barrier */
static void matmul_body(const uint16_t *x, int64_t M, int64_t K, const void *w,
                        const void *scale, const gp_int4_t *q4, const void *bias, int64_t N,
                        uint16_t *y, int16_t *xq, float *xs, float *x4) {
    gemv_body(x, M, K, w, (const uint16_t *)scale, (const uint16_t *)bias, N, y, xq, xs, q4,
              x4);
    #pragma omp barrier
}

static void tp_all_reduce(const gp_tp_t *tp, void *xv, int64_t n, int f32,
                          int *failed);

/* group g's LoRA terms for layer l (inside the team; a barrier after); under tensor
 * parallelism a row-parallel group (o, down: one projection, the rank's input columns of A)
 * as its shrink into lh ([T][top], zeroed first), the sum over the ranks in float32 (as
 * TPGroup.all_reduce adds, rank order), then its expand: gp_lora_half's halves, the same bits
 * as the per-op path. A failed exchange leaves out alone (the step fails). */
static void lora_group(const gp_step_t *st, int64_t l, int g, const uint16_t *x, int64_t K,
                       uint16_t *out, int64_t ldo, int64_t items, const int64_t *item_seg,
                       float *lh, int *failed) {
    const gp_lora_t *lora = st->lora;
    if (!st->tp || (g != 1 && g != 3)) {
        lora_body(x, K, K, out, ldo, lora, l, g, items, item_seg);
        return;
    }
    int64_t T = st->rows, top = 0;
    for (int64_t s = 0; s < lora->num_segments; s++)
        top = lora->seg_rank[s] > top ? lora->seg_rank[s] : top;
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < T * top; i++) lh[i] = 0.0f;
    lora_terms(x, K, K, lh, top, NULL, 0, lora, l, g, LORA_SHRINK, items, item_seg);
    tp_all_reduce(st->tp, lh, T * top, 1, failed);
    if (*failed) return;
    lora_terms(NULL, 0, 0, lh, top, out, ldo, lora, l, g, LORA_EXPAND, items, item_seg);
}

/* x [T][hidden] = the embedding rows ids[t] of emb [vocab][hidden]: bf16 rows as they are;
 * int8 rows (emb_scale not NULL) as bf16(q * scale[id]), as torch's x.to(bf16) * scale */
static void embed_body(const int64_t *ids, int64_t T, int64_t hidden, const void *emb,
                       const uint16_t *emb_scale, uint16_t *x) {
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        int64_t id = ids[t];
        if (emb_scale) {
            const int8_t *q = (const int8_t *)emb + id * hidden;
            float sc = bf2f(emb_scale[id]);
            for (int64_t k = 0; k < hidden; k++) x[t * hidden + k] = f2bf((float)q[k] * sc);
        } else {
            memcpy(x + t * hidden, (const uint16_t *)emb + id * hidden, 2 * (size_t)hidden);
        }
    }
}

/* logits [T][vocab] float32 = the head's product of the final norm's output out [T][hidden]
 * (bf16 head, or int8 with bf16 scales: the GEMVs' rounding), via the bf16 buffer hb; each
 * thread widens the columns it computed (no barrier between) */
static void head_body(const uint16_t *out, int64_t T, int64_t hidden, const void *head,
                      const uint16_t *head_scale, int64_t vocab, uint16_t *hb, float *logits,
                      int16_t *xq, float *xs) {
    gemv_body(out, T, hidden, head, head_scale, NULL, vocab, hb, xq, xs, NULL, NULL);
    int64_t n0, n1;
    thread_share(vocab, &n0, &n1);
    for (int64_t t = 0; t < T; t++)
        for (int64_t n = n0; n < n1; n++) logits[t * vocab + n] = bf2f(hb[t * vocab + n]);
}

/* ---- tensor parallelism: the row-parallel products' all-reduce inside the step ------------
 * x [n] (bf16) = the float32 sum of every rank's x in rank order, rounded once: what
 * TPGroup.all_reduce gives through ShmExchange (this rank's x widened into its slot, its
 * sequence number published, the others' awaited, the slots added in rank order; the same
 * bits on every rank). Called by the whole team: the slot written and the sums made by all
 * threads, the wait by thread 0 (the caller's: alive() is a Python callback). A wait spins,
 * then naps 0.5 ms, asking alive() every 200 naps; a dead peer or the timeout (monotonic
 * clock) sets *failed (shared): the step's remaining layers are skipped and the call
 * returns 2. */
#include <time.h>
static int64_t now_ms(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000 + t.tv_nsec / 1000000;
}

static int tp_wait(const gp_tp_t *tp, int64_t seq) {
    int64_t spins = 0, naps = 0, start = 0;
    for (;;) {
        int ready = 1;
        for (int64_t r = 0; r < tp->world; r++)
            ready &= __atomic_load_n(tp->flags + 8 * r, __ATOMIC_ACQUIRE) >= seq;
        if (ready) return 0;
        if (++spins < 20000) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            continue;
        }
        if (!start) start = now_ms();
        struct timespec nap = {0, 500000};
        nanosleep(&nap, NULL);
        if (++naps % 200 == 0 && tp->alive && !((int (*)(void))tp->alive)()) return 1;
        if (now_ms() - start > tp->timeout_ms) return 1;
    }
}

static void tp_all_reduce(const gp_tp_t *tp, void *xv, int64_t n, int f32, int *failed) {
    uint16_t *x = (uint16_t *)xv;  /* bf16 values, or (f32) float32 ones at xf */
    float *xf = (float *)xv;
    if (*failed) return;  /* read after the barrier that ended the last op: every thread agrees */
    int64_t seq = *tp->seq + 1;
    char *slots = (char *)tp->slots + (seq % 2) * tp->world * tp->slot_bytes;  /* this seq's */
    float *mine = (float *)(slots + tp->rank * tp->slot_bytes);
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) mine[i] = f32 ? xf[i] : bf2f(x[i]);
#ifdef _OPENMP
    if (omp_get_thread_num() == 0)  /* the caller's thread: alive() is a Python callback */
#endif
    {
        __atomic_store_n(tp->flags + 8 * tp->rank, seq, __ATOMIC_RELEASE);
        if (tp_wait(tp, seq)) *failed = 1;
        *tp->seq = seq;
    }
    #pragma omp barrier
    /* every thread sees *failed and the peers' slots */
    if (*failed) return;
    #pragma omp for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        float s = ((const float *)slots)[i];
        for (int64_t r = 1; r < tp->world; r++) {
            s += ((const float *)(slots + r * tp->slot_bytes))[i];
#if defined(__x86_64__)
            __asm__("" : "+x"(s));  /* in rank order: -ffast-math may not reassociate */
#endif
        }
        if (f32)
            xf[i] = s;
        else
            x[i] = f2bf(s);
    }
}

static void layer_body(const gp_step_t *st, int64_t l, uint16_t *x, uint16_t *h, uint16_t *qkv,
                       uint16_t *o, uint16_t *gu, uint16_t *act, uint16_t *delta,
                       int16_t *xq, float *xs, float *x4, int64_t items,
                       const int64_t *item_seg, float *lh, int *failed) {
    const gp_layer_t *p = st->layers + l;
    const gp_int4_t q4[4] = {
        {p->qkv_weight_gscale, p->qkv_weight_goffset, p->qkv_weight_group},
        {p->o_weight_gscale, p->o_weight_goffset, p->o_weight_group},
        {p->gate_up_weight_gscale, p->gate_up_weight_goffset, p->gate_up_weight_group},
        {p->down_weight_gscale, p->down_weight_goffset, p->down_weight_group}};
    int64_t T = st->rows, hidden = st->hidden, inter = st->inter, nq = st->num_heads;
    int64_t nkv = st->num_kv_heads, D = st->head_dim, nqkv = (nq + 2 * nkv) * D;
    uint16_t *kc = (uint16_t *)st->kv->k[l], *vc = (uint16_t *)st->kv->v[l];
    int win = st->kv->groups && st->kv->groups[l];  /* the windowed layers' own pages */
    const gp_lora_t *lora = st->lora;
    int w32 = (int)st->norm_f32;
    add_rmsnorm_body(x, hidden, l ? delta : NULL, hidden, p->input_norm, w32, h, hidden, T,
                     hidden, st->eps);
    matmul_body(h, T, hidden, p->qkv_weight, p->qkv_weight_scale, &q4[0], p->qkv_bias, nqkv,
                qkv, xq, xs, x4);
    if (lora) lora_group(st, l, 0, h, hidden, qkv, nqkv, items, item_seg, lh, failed);
    if (p->q_norm) head_norms_body(qkv, nqkv, T, 0, nq, D, p->q_norm, w32, st->eps);
    if (p->k_norm) head_norms_body(qkv, nqkv, T, nq, nkv, D, p->k_norm, w32, st->eps);
    int local = st->local_layers && st->local_layers[l];  /* Gemma 3's own rope base */
    rope_kv_body(qkv, nqkv, T, nq, nkv, D, local ? st->cos_sin_local : st->cos_sin,
                 st->positions, kc, vc, st->kv->page_stride,
                 win ? st->window_slot_pages : st->slot_pages,
                 win ? st->window_slot_offsets : st->slot_offsets);
    decode_attention_body(qkv, nqkv, T, nq, nkv, D, kc, vc, st->kv->page_stride,
                          win ? st->kv->window_block_tokens : st->kv->block_tokens,
                          win ? st->window_block_tables : st->block_tables,
                          win ? st->window_block_table_stride : st->block_table_stride,
                          st->context_lens, st->scale, o, st->windows ? st->windows[l] : 0,
                          NULL, st->softcap);
    matmul_body(o, T, nq * D, p->o_weight, p->o_weight_scale, &q4[1], NULL, hidden, delta, xq,
                xs, x4);
    if (st->tp) tp_all_reduce(st->tp, delta, T * hidden, 0, failed);
    if (lora) lora_group(st, l, 1, o, nq * D, delta, hidden, items, item_seg, lh, failed);
    if (p->pre_ff_norm) {  /* Gemma's sandwich: the attention's output normed, then added */
        add_rmsnorm_body(delta, hidden, NULL, 0, p->post_norm, w32, delta, hidden, T, hidden,
                         st->eps);
        add_rmsnorm_body(x, hidden, delta, hidden, p->pre_ff_norm, w32, h, hidden, T, hidden,
                         st->eps);
    } else {
        add_rmsnorm_body(x, hidden, delta, hidden, p->post_norm, w32, h, hidden, T, hidden,
                         st->eps);
    }
    matmul_body(h, T, hidden, p->gate_up_weight, p->gate_up_weight_scale, &q4[2], NULL,
                2 * inter, gu, xq, xs, x4);
    if (lora) lora_group(st, l, 2, h, hidden, gu, 2 * inter, items, item_seg, lh, failed);
    act_mul_body(gu, 2 * inter, act, inter, T, inter, (int)st->act);
    matmul_body(act, T, inter, p->down_weight, p->down_weight_scale, &q4[3], NULL, hidden,
                delta, xq, xs, x4);
    if (st->tp) tp_all_reduce(st->tp, delta, T * hidden, 0, failed);
    if (lora) lora_group(st, l, 3, act, inter, delta, hidden, items, item_seg, lh, failed);
    if (p->post_ff_norm)  /* (the next norm adds it to x) */
        add_rmsnorm_body(delta, hidden, NULL, 0, p->post_ff_norm, w32, delta, hidden, T,
                         hidden, st->eps);
}

int gp_decode_layers(const gp_step_t *st, int threads) {
    (void)threads;  /* a build without OpenMP has one thread */
    int64_t T = st->rows, hidden = st->hidden, inter = st->inter, L = st->num_layers;
    int64_t nq = st->num_heads, D = st->head_dim, nqkv = (nq + 2 * st->num_kv_heads) * D;
    size_t elems = (size_t)(T * (hidden + nqkv + nq * D + 2 * inter + inter + hidden
                                 + (st->logits ? st->vocab : 0)));
    int64_t kmax = hidden > inter ? hidden : inter;
    kmax = kmax > nq * D ? kmax : nq * D;
    uint16_t *buf = malloc(elems * 2);
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)(T * i8_kp(kmax)) + 64);
    float *xs = malloc(sizeof(float) * (size_t)(T > 0 ? T : 1));
    /* the 4-bit products' x in the pairs' order (bf16 [T][K + 63]) and its groups' sums */
    float *x4 = malloc(sizeof(float) * (size_t)(T * (kmax + 64)) + 64);
    int64_t *item_seg = NULL, items = 0;
    float *lh = NULL;  /* under TP: a row-parallel group's shrinks [T][max rank], summed */
    if (st->lora) {
        items = lora_items(st->lora->num_segments, st->lora->starts, st->lora->seg_rank,
                           &item_seg);
        if (!item_seg) { free(buf); free(xq); free(xs); free(x4); return -1; }
        if (st->tp) {
            int64_t top = 0;
            for (int64_t s = 0; s < st->lora->num_segments; s++)
                top = st->lora->seg_rank[s] > top ? st->lora->seg_rank[s] : top;
            lh = malloc(sizeof(float) * (size_t)(T * (top > 0 ? top : 1)));
            if (!lh) { free(buf); free(xq); free(xs); free(x4); free(item_seg); return -1; }
        }
    }
    if (!buf || !xq || !xs || !x4) {
        free(buf); free(xq); free(xs); free(x4); free(item_seg);
        return -1;
    }
    uint16_t *h = buf, *qkv = h + T * hidden, *o = qkv + T * nqkv, *gu = o + T * nq * D;
    uint16_t *act = gu + T * 2 * inter, *delta = act + T * inter, *hb = delta + T * hidden;
    uint16_t *x = st->x;
    int failed = 0;  /* a tensor-parallel exchange failed (see tp_all_reduce) */
    /* one thread team for the whole step: every op's loop is shared, a barrier between ops
     * (the worksharing loops end in one; matmul_body adds its own) */
    #pragma omp parallel num_threads(threads)
    {
        if (st->ids) embed_body(st->ids, T, hidden, st->embed, st->embed_scale, x);
        /* failed changes only before a barrier every thread has passed here: one path */
        for (int64_t l = 0; l < L && !failed; l++)
            layer_body(st, l, x, h, qkv, o, gu, act, delta, xq, xs, x4, items, item_seg, lh,
                       &failed);
        if (!failed)
            add_rmsnorm_body(x, hidden, L ? delta : NULL, hidden, st->final_norm,
                             (int)st->norm_f32, st->out, hidden, T, hidden, st->eps);
        if (st->logits && !failed)
            head_body(st->out, T, hidden, st->head, st->head_scale, st->vocab, hb, st->logits,
                      xq, xs);
    }
    free(xq);
    free(xs);
    free(x4);
    free(item_seg);
    free(lh);
    free(buf);
    return failed ? 2 : 0;
}
