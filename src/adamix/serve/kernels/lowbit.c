/* Fused de-quantize + multiply for the low-bit factors of a compressed delta (float32, CPU).
 *
 * A factor F (k, L) is held as codes and per-group grids, groups of g entries along each row:
 *     F[i, j] = offset[j / g, i] + scale[j / g, i] * q[i, j]          scale, offset: (G, k) float32
 * (the grids group-major, so that one group's grids for all rows are contiguous).
 * Rows 0..k8-1 hold 8-bit codes, rows k8..k-1 codes < 16, in blocks of 32 bytes laid out so that
 * shifting and masking the eight 32-bit words of a block yields eight consecutive entries:
 *   8-bit rows, q8 (k8, 32 ceil(L / 32)): block b holds entries 32 b .. 32 b + 31; byte u of word w
 *     (u < 4, w < 8) is entry 32 b + 8 u + w;
 *   4-bit rows, q4 (k - k8, 32 ceil(L / 64)): block b holds entries 64 b .. 64 b + 63; nibble u of
 *     word w (bits 4 u .. 4 u + 3, u < 8) is entry 64 b + 8 u + w.
 * Entries past L are 0. So (word >> 4 u) & 15 over the 8 words of a block is one AVX2 vector of
 * entries 8 u .. 8 u + 7, with no shuffle.
 *
 *   lowbit_rowdot:  t[b, i]  = sum_j F[i, j] x[b, j]         (t = x F^T,  x (M, L), t (M, k))
 *   lowbit_axpy:    y[b, j] += sum_i t[b, i] F[i, j]          (y += t F,   t (M, k), y (M, L))
 *   lowbit_dequantize: F as a float32 (k, L) matrix
 * With D^ = U^ V^ stored as V^ (k, n) and U^T (k, m), y += x D^T is rowdot on V^ then axpy on U^T
 * (lowbit_lowrank): the codes are read once per call, never expanded to float32 in memory. The AVX2
 * paths take the groups that are whole blocks (g a multiple of 64, the group's length a multiple of
 * 64, or of 32 on 8-bit rows); the plain loops take the rest, and everything without AVX2 and FMA.
 * The outer loops run on `threads` OpenMP threads when built with OpenMP.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline int64_t row_bytes8(int64_t L) { return 32 * ((L + 31) / 32); }
static inline int64_t row_bytes4(int64_t L) { return 32 * ((L + 63) / 64); }

/* Code of entry j of an 8-bit / a 4-bit row. */
static inline int code8(const uint8_t *row, int64_t j) {
    const int64_t r = j & 31;
    return row[(j >> 5) * 32 + (r & 7) * 4 + (r >> 3)];
}
static inline int code4(const uint8_t *row, int64_t j) {
    const int64_t r = j & 63, u = r >> 3;
    return (row[(j >> 6) * 32 + (r & 7) * 4 + (u >> 1)] >> (4 * (u & 1))) & 15;
}

static inline const uint8_t *row_of(const uint8_t *q8, const uint8_t *q4, int64_t i, int64_t k8, int64_t L) {
    return i < k8 ? q8 + i * row_bytes8(L) : q4 + (i - k8) * row_bytes4(L);
}

/* buf[0 .. len) = codes of entries j0 .. j0 + len - 1 of row i, as floats (the plain path). */
static inline void decode_range(const uint8_t *row, int is8, int64_t j0, int64_t len, float *buf) {
    if (is8)
        for (int64_t t = 0; t < len; t++) buf[t] = (float)code8(row, j0 + t);
    else
        for (int64_t t = 0; t < len; t++) buf[t] = (float)code4(row, j0 + t);
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_AVX2 1

/* Whether group c (entries j0 .. j0 + len - 1, j0 = c g) is whole blocks for rows of this kind. */
static inline int fast_group(int is8, int64_t j0, int64_t len) {
    const int64_t blk = is8 ? 32 : 64;
    return j0 % blk == 0 && len % blk == 0;
}

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* Entries 8 u .. 8 u + 7 of a 32-byte block, as floats. */
static inline __m256 unit4(__m256i raw, int u) {
    const __m256i m = _mm256_set1_epi32(15);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(raw, 4 * u), m));
}
static inline __m256 unit8(__m256i raw, int u) {
    const __m256i m = _mm256_set1_epi32(255);
    return _mm256_cvtepi32_ps(_mm256_and_si256(_mm256_srli_epi32(raw, 8 * u), m));
}

/* sum_{j < len} q[i, j0 + j] x[j0 + j] for an 8-bit row, as 8 partial sums (one row of x). */
static inline __m256 dot8_group1_avx2(const uint8_t *row, int64_t j0, int64_t len, const float *x) {
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t j = j0; j < j0 + len; j += 32) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + j));
        a0 = _mm256_fmadd_ps(unit8(raw, 0), _mm256_loadu_ps(x + j), a0);
        a1 = _mm256_fmadd_ps(unit8(raw, 1), _mm256_loadu_ps(x + j + 8), a1);
        a2 = _mm256_fmadd_ps(unit8(raw, 2), _mm256_loadu_ps(x + j + 16), a2);
        a3 = _mm256_fmadd_ps(unit8(raw, 3), _mm256_loadu_ps(x + j + 24), a3);
    }
    return _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
}

/* axpy_group_avx2 for one row of y, a whole 64-column block per pass (written apart: the compiler keeps
 * its eight accumulators in registers, which it does not do for the general form with MB = 1). */
static void axpy_group1_avx2(int64_t k, int64_t k8, const uint8_t *q8, const uint8_t *q4, int64_t L, int64_t j0,
                             int64_t len, const float *a, float d, float *y) {
    const int64_t r8 = row_bytes8(L), r4 = row_bytes4(L);
    for (int64_t j = j0; j < j0 + len; j += 64) {
        __m256 acc[8];
        for (int u = 0; u < 8; u++) acc[u] = _mm256_add_ps(_mm256_loadu_ps(y + j + 8 * u), _mm256_set1_ps(d));
        for (int64_t i = 0; i < k8; i++) {
            const __m256 ab = _mm256_set1_ps(a[i]);
            const __m256i r0 = _mm256_loadu_si256((const __m256i *)(q8 + i * r8 + j));
            const __m256i r1 = _mm256_loadu_si256((const __m256i *)(q8 + i * r8 + j + 32));
            for (int u = 0; u < 4; u++) {
                acc[u] = _mm256_fmadd_ps(ab, unit8(r0, u), acc[u]);
                acc[4 + u] = _mm256_fmadd_ps(ab, unit8(r1, u), acc[4 + u]);
            }
        }
        for (int64_t i = k8; i < k; i++) {
            const __m256 ab = _mm256_set1_ps(a[i]);
            const uint8_t *q = q4 + (i - k8) * r4 + j / 2;
            _mm_prefetch((const char *)(q + 64), _MM_HINT_T0);  /* rows are strided: help the next pass */
            const __m256i raw = _mm256_loadu_si256((const __m256i *)q);
            for (int u = 0; u < 8; u++) acc[u] = _mm256_fmadd_ps(ab, unit4(raw, u), acc[u]);
        }
        for (int u = 0; u < 8; u++) _mm256_storeu_ps(y + j + 8 * u, acc[u]);
    }
}

/* y[b, j0 + j] += sum_i a[i MB + b] q[i, j0 + j] + d[b] for j < len (a group of whole 64-entry blocks)
 * and MB rows of y (MB a constant: 2 or 4). Each 64-column block is done in 8 / MB passes of 8 MB
 * columns, so that the MB rows' accumulators (8 in all) stay in registers and share each decoded unit. */
static inline __attribute__((always_inline)) void axpy_group_avx2(
        const int MB, int64_t k, int64_t k8, const uint8_t *q8, const uint8_t *q4, int64_t L, int64_t j0, int64_t len,
        const float *a, const float *d, float *y, int64_t ldy) {
    const int NU = 8 / MB;  /* units of 8 columns per pass */
    const int64_t r8 = row_bytes8(L), r4 = row_bytes4(L);
    for (int64_t j = j0; j < j0 + len; j += 64)
        for (int u0 = 0; u0 < 8; u0 += NU) {
            __m256 acc[4][8];
            for (int b = 0; b < MB; b++)
                for (int u = 0; u < NU; u++)
                    acc[b][u] = _mm256_add_ps(_mm256_loadu_ps(y + b * ldy + j + 8 * (u0 + u)), _mm256_set1_ps(d[b]));
            for (int64_t i = 0; i < k8; i++) {
                const __m256i r0 = _mm256_loadu_si256((const __m256i *)(q8 + i * r8 + j));
                const __m256i r1 = _mm256_loadu_si256((const __m256i *)(q8 + i * r8 + j + 32));
                for (int u = 0; u < NU; u++) {
                    const int uu = u0 + u;
                    const __m256 v = unit8(uu < 4 ? r0 : r1, uu & 3);
                    for (int b = 0; b < MB; b++) acc[b][u] = _mm256_fmadd_ps(_mm256_set1_ps(a[i * MB + b]), v, acc[b][u]);
                }
            }
            for (int64_t i = k8; i < k; i++) {
                const __m256i raw = _mm256_loadu_si256((const __m256i *)(q4 + (i - k8) * r4 + j / 2));
                for (int u = 0; u < NU; u++) {
                    const __m256 v = unit4(raw, u0 + u);
                    for (int b = 0; b < MB; b++) acc[b][u] = _mm256_fmadd_ps(_mm256_set1_ps(a[i * MB + b]), v, acc[b][u]);
                }
            }
            for (int b = 0; b < MB; b++)
                for (int u = 0; u < NU; u++) _mm256_storeu_ps(y + b * ldy + j + 8 * (u0 + u), acc[b][u]);
        }
}
#endif

/* t[b, i] = sum_j F[i, j] x[b, j] for F held by columns (LowBitCols): rows i < k8 as 8-bit rows,
 * q8 (k8, row_bytes8(L)); the k4 = k - k8 narrower rows transposed, q4t (L, row_bytes4(k4)): row j of q4t
 * holds F[k8 + i', j] for i' < k4, in the 4-bit block layout. So x F^T for those rows is an axpy over
 * the L rows of q4t (y += x_j q4t[j]), the kernel's fast form, done group by group:
 *     t[b, k8 + i'] = sum_c scale[c, k8 + i'] (sum_{j in group c} x[b, j] q4t[j, i']) + offset[c, k8 + i'] xsum[b, c]
 * Grids scale, offset (G, k). */
void lowbit_rowdot(int64_t M, int64_t k, int64_t L, int64_t g, const float *x, int64_t ldx,
                   int64_t k8, const uint8_t *q8, const uint8_t *q4t, const float *scale, const float *offset,
                   float *t, int64_t threads) {
    const int64_t G = (L + g - 1) / g, k4 = k - k8, r8 = row_bytes8(L), r4 = row_bytes4(k4);
    const int64_t W = r4 * 2;  /* q4t row length in entries, padded to whole 64-entry blocks */
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(M * G + 1));
    for (int64_t b = 0; b < M; b++)
        for (int64_t c = 0; c < G; c++) {
            const int64_t len = (c + 1) * g <= L ? g : L - c * g;
            const float *xb = x + b * ldx + c * g;
            float s = 0.f;
            for (int64_t j = 0; j < len; j++) s += xb[j];
            xsum[b * G + c] = s;
        }
    for (int64_t b = 0; b < M; b++)
        for (int64_t i = 0; i < k; i++) {
            float s = 0.f;
            for (int64_t c = 0; c < G; c++) s += offset[c * k + i] * xsum[b * G + c];
            t[b * k + i] = s;
        }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(g + 1));
        float *tmp = (float *)malloc(sizeof(float) * (size_t)(4 * W + 1));
        float *a = (float *)malloc(sizeof(float) * (size_t)(4 * g + 1));
        /* the 8-bit rows, in row layout */
#pragma omp for schedule(static)
        for (int64_t i = 0; i < k8; i++) {
            const uint8_t *row = q8 + i * r8;
            for (int64_t c = 0; c < G; c++) {
                const int64_t j0 = c * g, len = j0 + g <= L ? g : L - j0;
                const float sc = scale[c * k + i];
#ifdef LOWBIT_AVX2
                if (fast_group(1, j0, len)) {
                    for (int64_t b = 0; b < M; b++) t[b * k + i] += sc * hsum(dot8_group1_avx2(row, j0, len, x + b * ldx));
                    continue;
                }
#endif
                decode_range(row, 1, j0, len, buf);
                for (int64_t b = 0; b < M; b++) {
                    const float *xb = x + b * ldx + j0;
                    float acc = 0.f;
                    for (int64_t j = 0; j < len; j++) acc += buf[j] * xb[j];
                    t[b * k + i] += sc * acc;
                }
            }
        }
        /* the narrower rows, transposed: one 64-column block of q4t per thread at a time */
#pragma omp for schedule(static)
        for (int64_t blk = 0; blk < W / 64; blk++) {
            const int64_t i0 = blk * 64, n_i = i0 + 64 <= k4 ? 64 : k4 - i0;
            for (int64_t c = 0; c < G; c++) {
                const int64_t j0 = c * g, len = j0 + g <= L ? g : L - j0;
                const uint8_t *rows = q4t + j0 * r4;  /* rows j0 .. j0 + len - 1 of q4t */
                for (int64_t b = 0; b < M;) {
                    const int MB = M - b >= 4 ? 4 : M - b >= 2 ? 2 : 1;
                    for (int bb = 0; bb < MB; bb++) {
                        memset(tmp + bb * W + i0, 0, sizeof(float) * 64);
                        for (int64_t r = 0; r < len; r++) a[r * MB + bb] = x[(b + bb) * ldx + j0 + r];
                    }
#ifdef LOWBIT_AVX2
                    const float zero[4] = {0.f, 0.f, 0.f, 0.f};
                    if (MB == 4)
                        axpy_group_avx2(4, len, 0, NULL, rows, k4, i0, 64, a, zero, tmp, W);
                    else if (MB == 2)
                        axpy_group_avx2(2, len, 0, NULL, rows, k4, i0, 64, a, zero, tmp, W);
                    else
                        axpy_group1_avx2(len, 0, NULL, rows, k4, i0, 64, a, 0.f, tmp);
#else
                    for (int64_t r = 0; r < len; r++)
                        for (int64_t ii = 0; ii < n_i; ii++) {
                            const float q = (float)code4(rows + r * r4, i0 + ii);
                            for (int bb = 0; bb < MB; bb++) tmp[bb * W + i0 + ii] += a[r * MB + bb] * q;
                        }
#endif
                    for (int bb = 0; bb < MB; bb++)
                        for (int64_t ii = 0; ii < n_i; ii++)
                            t[(b + bb) * k + k8 + i0 + ii] += scale[c * k + k8 + i0 + ii] * tmp[bb * W + i0 + ii];
                    b += MB;
                }
            }
        }
        free(buf);
        free(tmp);
        free(a);
    }
    free(xsum);
}

void lowbit_axpy(int64_t M, int64_t k, int64_t L, int64_t g, const float *t, int64_t k8, const uint8_t *q8,
                 const uint8_t *q4, const float *scale, const float *offset, float *y, int64_t ldy,
                 int64_t threads) {
    const int64_t G = (L + g - 1) / g;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(g + 1));
        float *a = (float *)malloc(sizeof(float) * (size_t)(4 * k + 1));
#pragma omp for schedule(static)
        for (int64_t c = 0; c < G; c++) {
            const int64_t j0 = c * g, len = j0 + g <= L ? g : L - j0;
#ifdef LOWBIT_AVX2
            if (fast_group(0, j0, len)) {  /* whole 64-entry blocks: whole 32-entry blocks too */
                for (int64_t b = 0; b < M;) {
                    const int MB = M - b >= 4 ? 4 : M - b >= 2 ? 2 : 1;
                    float d[4] = {0.f, 0.f, 0.f, 0.f};
                    const float *sc = scale + c * k, *of = offset + c * k;
                    for (int bb = 0; bb < MB; bb++) {
                        const float *tb = t + (b + bb) * k;
                        float s = 0.f;
                        for (int64_t i = 0; i < k; i++) {
                            a[i * MB + bb] = tb[i] * sc[i];
                            s += tb[i] * of[i];
                        }
                        d[bb] = s;
                    }
                    if (MB == 4)
                        axpy_group_avx2(4, k, k8, q8, q4, L, j0, len, a, d, y + b * ldy, ldy);
                    else if (MB == 2)
                        axpy_group_avx2(2, k, k8, q8, q4, L, j0, len, a, d, y + b * ldy, ldy);
                    else
                        axpy_group1_avx2(k, k8, q8, q4, L, j0, len, a, d[0], y + b * ldy);
                    b += MB;
                }
                continue;
            }
#endif
            for (int64_t i = 0; i < k; i++) {
                decode_range(row_of(q8, q4, i, k8, L), i < k8, j0, len, buf);
                const float sc = scale[c * k + i];
                for (int64_t b = 0; b < M; b++) {
                    const float w = t[b * k + i] * sc;
                    float *yb = y + b * ldy + j0;
                    for (int64_t j = 0; j < len; j++) yb[j] += w * buf[j];
                }
            }
            for (int64_t b = 0; b < M; b++) {
                float d = 0.f;
                for (int64_t i = 0; i < k; i++) d += t[b * k + i] * offset[c * k + i];
                float *yb = y + b * ldy + j0;
                for (int64_t j = 0; j < len; j++) yb[j] += d;
            }
        }
        free(buf);
        free(a);
    }
}

/* out (k, L) = F for rows 0..k-1 of F held by rows; grids (G, ldg), ldg >= k. */
static void dequantize_rows(int64_t k, int64_t L, int64_t g, int64_t k8, const uint8_t *q8, const uint8_t *q4,
                            const float *scale, const float *offset, int64_t ldg, float *out, int64_t threads) {
    const int64_t G = (L + g - 1) / g;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(g + 1));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < k; i++)
            for (int64_t c = 0; c < G; c++) {
                const int64_t j0 = c * g, len = j0 + g <= L ? g : L - j0;
                const float sc = scale[c * ldg + i], of = offset[c * ldg + i];
                float *o = out + i * L + j0;
                const uint8_t *row = row_of(q8, q4, i, k8, L);
#ifdef LOWBIT_AVX2
                if (fast_group(i < k8, j0, len)) {
                    const __m256 vs = _mm256_set1_ps(sc), vo = _mm256_set1_ps(of);
                    if (i < k8)
                        for (int64_t j = 0; j < len; j += 32) {
                            const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + j0 + j));
                            for (int u = 0; u < 4; u++) _mm256_storeu_ps(o + j + 8 * u, _mm256_fmadd_ps(unit8(raw, u), vs, vo));
                        }
                    else
                        for (int64_t j = 0; j < len; j += 64) {
                            const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + (j0 + j) / 2));
                            for (int u = 0; u < 8; u++) _mm256_storeu_ps(o + j + 8 * u, _mm256_fmadd_ps(unit4(raw, u), vs, vo));
                        }
                    continue;
                }
#endif
                decode_range(row, i < k8, j0, len, buf);
                for (int64_t j = 0; j < len; j++) o[j] = of + sc * buf[j];
            }
        free(buf);
    }
}

/* out (k, L) = F for F held by rows, as lowbit_axpy takes it. */
void lowbit_dequantize(int64_t k, int64_t L, int64_t g, int64_t k8, const uint8_t *q8, const uint8_t *q4,
                       const float *scale, const float *offset, float *out, int64_t threads) {
    dequantize_rows(k, L, g, k8, q8, q4, scale, offset, k, out, threads);
}

/* out (L, k) = F^T for F held by columns, as lowbit_rowdot takes it: x F^T = x @ out. */
void lowbit_dequantize_cols_t(int64_t k, int64_t L, int64_t g, int64_t k8, const uint8_t *q8, const uint8_t *q4t,
                              const float *scale, const float *offset, float *out, int64_t threads) {
    const int64_t k4 = k - k8, r8 = row_bytes8(L), r4 = row_bytes4(k4);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (int64_t j = 0; j < L; j++) {
        const float *sc = scale + (j / g) * k, *of = offset + (j / g) * k;
        float *o = out + j * k;
        for (int64_t i = 0; i < k8; i++) o[i] = of[i] + sc[i] * (float)code8(q8 + i * r8, j);
        const uint8_t *row = q4t + j * r4;
        int64_t i0 = 0;
#ifdef LOWBIT_AVX2
        for (; i0 + 64 <= k4; i0 += 64) {  /* whole blocks; the tail below */
            const __m256i raw = _mm256_loadu_si256((const __m256i *)(row + i0 / 2));
            for (int u = 0; u < 8; u++) {
                const int64_t i = k8 + i0 + 8 * u;
                _mm256_storeu_ps(o + i, _mm256_fmadd_ps(unit4(raw, u), _mm256_loadu_ps(sc + i), _mm256_loadu_ps(of + i)));
            }
        }
#endif
        for (int64_t ii = i0; ii < k4; ii++) o[k8 + ii] = of[k8 + ii] + sc[k8 + ii] * (float)code4(row, ii);
    }
}

/* D^ = U^ V^ with V^ (k, n) and U^T (k, m) held as above: what lowbit_lowrank needs, set once. */
typedef struct {
    int64_t k, n, m;
    int64_t gv, k8v;
    const uint8_t *q8v, *q4v;
    const float *sv, *ov;
    int64_t gu, k8u;
    const uint8_t *q8u, *q4u;
    const float *su, *ou;
} lowbit_pair;

/* y (M, m) += (x (M, n) V^T) U: rowdot on V^, then axpy on U^T. */
void lowbit_lowrank(int64_t M, const float *x, int64_t ldx, float *y, int64_t ldy, const lowbit_pair *p,
                    int64_t threads) {
    float *t = (float *)malloc(sizeof(float) * (size_t)(M * p->k + 1));
    lowbit_rowdot(M, p->k, p->n, p->gv, x, ldx, p->k8v, p->q8v, p->q4v, p->sv, p->ov, t, threads);
    lowbit_axpy(M, p->k, p->m, p->gu, t, p->k8u, p->q8u, p->q4u, p->su, p->ou, y, ldy, threads);
    free(t);
}

/* One job of lowbit_lowrank_many: rows row0 .. row0 + rows - 1 of x and y, multiplied by pair p. */
typedef struct {
    const lowbit_pair *p;
    int64_t row0, rows;
} lowbit_job;

/* lowbit_lowrank for several (pair, rows) jobs on the same x and y: the tenants of one module in one call. */
void lowbit_lowrank_many(int64_t njobs, const lowbit_job *jobs, const float *x, int64_t ldx, float *y, int64_t ldy,
                         int64_t threads) {
    for (int64_t j = 0; j < njobs; j++)
        lowbit_lowrank(jobs[j].rows, x + jobs[j].row0 * ldx, ldx, y + jobs[j].row0 * ldy, ldy, jobs[j].p, threads);
}
