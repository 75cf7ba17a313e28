/* Fused de-quantize + multiply for the low-bit factors of a compressed delta (float32, CPU).
 *
 * A factor F (k, L) is held as codes and per-group grids, groups of g entries along each row:
 *     F[i, j] = offset[i, j / g] + scale[i, j / g] * q[i, j]          scale, offset: (k, G) float32
 * Rows 0..k8-1 hold 8-bit codes, one byte each: q8 (k8, L).
 * Rows k8..k-1 hold codes < 16, two per byte: q4 (k - k8, G * h), h = ceil(g / 2); byte t of group
 * c holds entry c g + t in its low nibble and entry c g + h + t in its high nibble (0 past the row).
 *
 *   lowbit_rowdot:  t[b, i]  = sum_j F[i, j] x[b, j]         (t = x F^T,  x (M, L), t (M, k))
 *   lowbit_axpy:    y[b, j] += sum_i t[b, i] F[i, j]          (y += t F,   t (M, k), y (M, L))
 *
 * With D^ = U^ V^ stored as V^ (k, n) and U^T (k, m), y += x D^T is rowdot on V^ then axpy on U^T:
 * the codes are read once per call, never expanded to float32 in memory. Both run their outer loop
 * on `threads` OpenMP threads when built with OpenMP.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline void decode_group(const uint8_t *q8, const uint8_t *q4, int64_t i, int64_t k8, int64_t L,
                                int64_t g, int64_t h, int64_t G, int64_t c, int64_t len, float *buf) {
    if (i < k8) {
        const uint8_t *q = q8 + i * L + c * g;
        for (int64_t t = 0; t < len; t++) buf[t] = (float)q[t];
    } else {
        const uint8_t *q = q4 + (i - k8) * (G * h) + c * h;
        for (int64_t t = 0; t < h; t++) {
            buf[t] = (float)(q[t] & 15);
            buf[h + t] = (float)(q[t] >> 4);
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define LOWBIT_AVX2 1

/* The AVX2 paths take a group whose 16-entry chunks are either all inside the row or all past it
 * (h and the group's length multiples of 16); other groups take the plain loops above. */
static inline int fast_group(int64_t h, int64_t len) { return h % 16 == 0 && len % 16 == 0; }

static inline __m256 lo8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b)); }
static inline __m256 hi8(__m128i b) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8))); }

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* out[b] = sum_{j < len} q[i, c g + j] x[b, c g + j] for MB rows of x (MB a constant: 1 or 4). Two
 * accumulators per row, four for MB = 1, so that the FMAs do not wait on one another. */
static inline __attribute__((always_inline)) void dot_group_avx2(
        const int MB, const uint8_t *q, int is4, int64_t h, int64_t len, const float *x, int64_t ldx, float *out) {
    const __m128i mask = _mm_set1_epi8(15);
    const int NA = MB == 1 ? 4 : 2;
    __m256 acc[4][4];
    for (int b = 0; b < MB; b++)
        for (int a = 0; a < NA; a++) acc[b][a] = _mm256_setzero_ps();
    if (is4) {
        for (int64_t t = 0; t < h; t += 16) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q + t));
            const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
            if (t + 16 <= len) {
                const __m256 v0 = lo8(lo), v1 = hi8(lo);
                for (int b = 0; b < MB; b++) {
                    acc[b][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + b * ldx + t), acc[b][0]);
                    acc[b][1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + b * ldx + t + 8), acc[b][1]);
                }
            }
            if (h + t + 16 <= len) {
                const __m256 v2 = lo8(hi), v3 = hi8(hi);
                for (int b = 0; b < MB; b++) {
                    acc[b][NA - 2] = _mm256_fmadd_ps(v2, _mm256_loadu_ps(x + b * ldx + h + t), acc[b][NA - 2]);
                    acc[b][NA - 1] = _mm256_fmadd_ps(v3, _mm256_loadu_ps(x + b * ldx + h + t + 8), acc[b][NA - 1]);
                }
            }
        }
    } else {
        for (int64_t t = 0; t < len; t += 16) {
            const __m128i raw = _mm_loadu_si128((const __m128i *)(q + t));
            const __m256 v0 = lo8(raw), v1 = hi8(raw);
            for (int b = 0; b < MB; b++) {
                acc[b][0] = _mm256_fmadd_ps(v0, _mm256_loadu_ps(x + b * ldx + t), acc[b][0]);
                acc[b][1] = _mm256_fmadd_ps(v1, _mm256_loadu_ps(x + b * ldx + t + 8), acc[b][1]);
            }
        }
    }
    for (int b = 0; b < MB; b++) {
        __m256 s = _mm256_add_ps(acc[b][0], acc[b][1]);
        if (NA == 4) s = _mm256_add_ps(s, _mm256_add_ps(acc[b][2], acc[b][3]));
        out[b] = hsum(s);
    }
}

/* y[b, c g + j] += sum_i a[i MB + b] q[i, c g + j] + d[b] for the columns of group c, MB rows of y. */
static inline __attribute__((always_inline)) void axpy_group_avx2(
        const int MB, int64_t k, int64_t k8, const uint8_t *q8, const uint8_t *q4, int64_t L, int64_t g, int64_t h,
        int64_t G, int64_t c, int64_t len, const float *a, const float *d, float *y, int64_t ldy) {
    const __m128i mask = _mm_set1_epi8(15);
    for (int64_t t = 0; t < h; t += 16) {
        const int lo_in = t + 16 <= len, hi_in = h + t + 16 <= len;
        if (!lo_in) break;  /* chunks past the row: none after this one either */
        __m256 acc[2][4];
        for (int b = 0; b < MB; b++) {
            float *yb = y + b * ldy + c * g;
            const __m256 db = _mm256_set1_ps(d[b]);
            acc[b][0] = _mm256_add_ps(_mm256_loadu_ps(yb + t), db);
            acc[b][1] = _mm256_add_ps(_mm256_loadu_ps(yb + t + 8), db);
            acc[b][2] = hi_in ? _mm256_add_ps(_mm256_loadu_ps(yb + h + t), db) : db;
            acc[b][3] = hi_in ? _mm256_add_ps(_mm256_loadu_ps(yb + h + t + 8), db) : db;
        }
        for (int64_t i = 0; i < k; i++) {
            __m256 v0, v1, v2, v3;
            if (i < k8) {
                const uint8_t *q = q8 + i * L + c * g;
                const __m128i r0 = _mm_loadu_si128((const __m128i *)(q + t));
                const __m128i r1 = hi_in ? _mm_loadu_si128((const __m128i *)(q + h + t)) : _mm_setzero_si128();
                v0 = lo8(r0); v1 = hi8(r0); v2 = lo8(r1); v3 = hi8(r1);
            } else {
                const __m128i raw = _mm_loadu_si128((const __m128i *)(q4 + (i - k8) * (G * h) + c * h + t));
                const __m128i lo = _mm_and_si128(raw, mask), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), mask);
                v0 = lo8(lo); v1 = hi8(lo); v2 = lo8(hi); v3 = hi8(hi);
            }
            for (int b = 0; b < MB; b++) {
                const __m256 ab = _mm256_set1_ps(a[i * MB + b]);
                acc[b][0] = _mm256_fmadd_ps(ab, v0, acc[b][0]);
                acc[b][1] = _mm256_fmadd_ps(ab, v1, acc[b][1]);
                acc[b][2] = _mm256_fmadd_ps(ab, v2, acc[b][2]);
                acc[b][3] = _mm256_fmadd_ps(ab, v3, acc[b][3]);
            }
        }
        for (int b = 0; b < MB; b++) {
            float *yb = y + b * ldy + c * g;
            _mm256_storeu_ps(yb + t, acc[b][0]);
            _mm256_storeu_ps(yb + t + 8, acc[b][1]);
            if (hi_in) {
                _mm256_storeu_ps(yb + h + t, acc[b][2]);
                _mm256_storeu_ps(yb + h + t + 8, acc[b][3]);
            }
        }
    }
}
/* axpy_group_avx2 for one row of y on groups whose 32-entry chunks are all inside the row or all past
 * it (h and len multiples of 32): 64 columns per pass, eight independent accumulators. */
static inline void axpy_group1_wide(int64_t k, int64_t k8, const uint8_t *q8, const uint8_t *q4, int64_t L, int64_t g,
                                    int64_t h, int64_t G, int64_t c, int64_t len, const float *a, float d, float *y) {
    const __m256i mask = _mm256_set1_epi8(15);
    float *yc = y + c * g;
    for (int64_t t = 0; t < h && t + 32 <= len; t += 32) {
        const int hi_in = h + t + 32 <= len;
        const __m256 db = _mm256_set1_ps(d);
        __m256 acc[8];
        for (int u = 0; u < 4; u++) {
            acc[u] = _mm256_add_ps(_mm256_loadu_ps(yc + t + 8 * u), db);
            acc[4 + u] = hi_in ? _mm256_add_ps(_mm256_loadu_ps(yc + h + t + 8 * u), db) : db;
        }
        for (int64_t i = 0; i < k; i++) {
            __m256i lo, hi;
            if (i < k8) {
                const uint8_t *q = q8 + i * L + c * g;
                lo = _mm256_loadu_si256((const __m256i *)(q + t));
                hi = hi_in ? _mm256_loadu_si256((const __m256i *)(q + h + t)) : _mm256_setzero_si256();
            } else {
                const uint8_t *q = q4 + (i - k8) * (G * h) + c * h + t;
                if (t == 0) _mm_prefetch((const char *)(q + h), _MM_HINT_T0);  /* this row's next group */
                const __m256i raw = _mm256_loadu_si256((const __m256i *)q);
                lo = _mm256_and_si256(raw, mask);
                hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
            }
            const __m256 ab = _mm256_set1_ps(a[i]);
            const __m128i l0 = _mm256_castsi256_si128(lo), l1 = _mm256_extracti128_si256(lo, 1);
            const __m128i h0 = _mm256_castsi256_si128(hi), h1 = _mm256_extracti128_si256(hi, 1);
            acc[0] = _mm256_fmadd_ps(ab, lo8(l0), acc[0]);
            acc[1] = _mm256_fmadd_ps(ab, hi8(l0), acc[1]);
            acc[2] = _mm256_fmadd_ps(ab, lo8(l1), acc[2]);
            acc[3] = _mm256_fmadd_ps(ab, hi8(l1), acc[3]);
            acc[4] = _mm256_fmadd_ps(ab, lo8(h0), acc[4]);
            acc[5] = _mm256_fmadd_ps(ab, hi8(h0), acc[5]);
            acc[6] = _mm256_fmadd_ps(ab, lo8(h1), acc[6]);
            acc[7] = _mm256_fmadd_ps(ab, hi8(h1), acc[7]);
        }
        for (int u = 0; u < 4; u++) {
            _mm256_storeu_ps(yc + t + 8 * u, acc[u]);
            if (hi_in) _mm256_storeu_ps(yc + h + t + 8 * u, acc[4 + u]);
        }
    }
}
#endif

static inline const uint8_t *group_codes(const uint8_t *q8, const uint8_t *q4, int64_t i, int64_t k8, int64_t L,
                                         int64_t g, int64_t h, int64_t G, int64_t c) {
    return i < k8 ? q8 + i * L + c * g : q4 + (i - k8) * (G * h) + c * h;
}

void lowbit_rowdot(int64_t M, int64_t k, int64_t L, int64_t g, const float *x, int64_t ldx,
                   int64_t k8, const uint8_t *q8, const uint8_t *q4, const float *scale, const float *offset,
                   float *t, int64_t threads) {
    const int64_t G = (L + g - 1) / g, h = (g + 1) / 2;
    float *xsum = (float *)malloc(sizeof(float) * (size_t)(M * G + 1));
    for (int64_t b = 0; b < M; b++)
        for (int64_t c = 0; c < G; c++) {
            const int64_t len = (c + 1) * g <= L ? g : L - c * g;
            const float *xb = x + b * ldx + c * g;
            float s = 0.f;
            for (int64_t j = 0; j < len; j++) s += xb[j];
            xsum[b * G + c] = s;
        }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(2 * h + 1));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < k; i++) {
            for (int64_t b = 0; b < M; b++) t[b * k + i] = 0.f;
            for (int64_t c = 0; c < G; c++) {
                const int64_t len = (c + 1) * g <= L ? g : L - c * g;
                const float sc = scale[i * G + c], of = offset[i * G + c];
#ifdef LOWBIT_AVX2
                if (fast_group(h, len)) {
                    const uint8_t *q = group_codes(q8, q4, i, k8, L, g, h, G, c);
                    float dots[4];
                    int64_t b = 0;
                    for (; b + 4 <= M; b += 4) {
                        dot_group_avx2(4, q, i >= k8, h, len, x + b * ldx + c * g, ldx, dots);
                        for (int bb = 0; bb < 4; bb++) t[(b + bb) * k + i] += sc * dots[bb] + of * xsum[(b + bb) * G + c];
                    }
                    for (; b < M; b++) {
                        dot_group_avx2(1, q, i >= k8, h, len, x + b * ldx + c * g, ldx, dots);
                        t[b * k + i] += sc * dots[0] + of * xsum[b * G + c];
                    }
                    continue;
                }
#endif
                decode_group(q8, q4, i, k8, L, g, h, G, c, len, buf);
                for (int64_t b = 0; b < M; b++) {
                    const float *xb = x + b * ldx + c * g;
                    float acc = 0.f;
                    for (int64_t j = 0; j < len; j++) acc += buf[j] * xb[j];
                    t[b * k + i] += sc * acc + of * xsum[b * G + c];
                }
            }
        }
        free(buf);
    }
    free(xsum);
}

void lowbit_axpy(int64_t M, int64_t k, int64_t L, int64_t g, const float *t, int64_t k8, const uint8_t *q8,
                 const uint8_t *q4, const float *scale, const float *offset, float *y, int64_t ldy,
                 int64_t threads) {
    const int64_t G = (L + g - 1) / g, h = (g + 1) / 2;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(2 * h + 1));
        float *a = (float *)malloc(sizeof(float) * (size_t)(2 * k + 1));
#pragma omp for schedule(static)
        for (int64_t c = 0; c < G; c++) {
            const int64_t len = (c + 1) * g <= L ? g : L - c * g;
#ifdef LOWBIT_AVX2
            if (fast_group(h, len)) {
                if (M == 1 && h % 32 == 0 && len % 32 == 0) {
                    float d = 0.f;
                    for (int64_t i = 0; i < k; i++) {
                        a[i] = t[i] * scale[i * G + c];
                        d += t[i] * offset[i * G + c];
                    }
                    axpy_group1_wide(k, k8, q8, q4, L, g, h, G, c, len, a, d, y);
                    continue;
                }
                for (int64_t b = 0; b < M;) {
                    const int MB = b + 2 <= M ? 2 : 1;
                    float d[2] = {0.f, 0.f};
                    for (int64_t i = 0; i < k; i++)
                        for (int bb = 0; bb < MB; bb++) {
                            a[i * MB + bb] = t[(b + bb) * k + i] * scale[i * G + c];
                            d[bb] += t[(b + bb) * k + i] * offset[i * G + c];
                        }
                    if (MB == 2)
                        axpy_group_avx2(2, k, k8, q8, q4, L, g, h, G, c, len, a, d, y + b * ldy, ldy);
                    else
                        axpy_group_avx2(1, k, k8, q8, q4, L, g, h, G, c, len, a, d, y + b * ldy, ldy);
                    b += MB;
                }
                continue;
            }
#endif
            for (int64_t i = 0; i < k; i++) {
                decode_group(q8, q4, i, k8, L, g, h, G, c, len, buf);
                const float sc = scale[i * G + c];
                for (int64_t b = 0; b < M; b++) {
                    const float w = t[b * k + i] * sc;
                    float *yb = y + b * ldy + c * g;
                    for (int64_t j = 0; j < len; j++) yb[j] += w * buf[j];
                }
            }
            for (int64_t b = 0; b < M; b++) {
                float d = 0.f;
                for (int64_t i = 0; i < k; i++) d += t[b * k + i] * offset[i * G + c];
                float *yb = y + b * ldy + c * g;
                for (int64_t j = 0; j < len; j++) yb[j] += d;
            }
        }
        free(buf);
        free(a);
    }
}

/* out (k, L) = F, equation above: the factor de-quantized (for products with many rows). */
void lowbit_dequantize(int64_t k, int64_t L, int64_t g, int64_t k8, const uint8_t *q8, const uint8_t *q4,
                       const float *scale, const float *offset, float *out, int64_t threads) {
    const int64_t G = (L + g - 1) / g, h = (g + 1) / 2;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *buf = (float *)malloc(sizeof(float) * (size_t)(2 * h + 1));
#pragma omp for schedule(static)
        for (int64_t i = 0; i < k; i++)
            for (int64_t c = 0; c < G; c++) {
                const int64_t len = (c + 1) * g <= L ? g : L - c * g;
                const float sc = scale[i * G + c], of = offset[i * G + c];
                float *o = out + i * L + c * g;
                decode_group(q8, q4, i, k8, L, g, h, G, c, len, buf);
                for (int64_t j = 0; j < len; j++) o[j] = of + sc * buf[j];
            }
        free(buf);
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
