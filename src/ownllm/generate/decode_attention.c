/* One decode step's attention for every decoding row of a layer (one or several), in one call
   (ownllm.generate.attention_kernel).

   Each row's new key and value are stored at its position in its sequence's KV buffer, then its query heads attend
   over the positions up to it: scores, softmax and weighted sum in fp32 on the cache's values (bf16 or fp32), as
   `compiled_decode.graph_attention` computes them, its sums in another order (the same up to fp32 rounding). The
   output is rounded to the cache's dtype (round to nearest even), as the graph's is.

   Why: the compiled graph reads the cache at 4-11 GB/s, with a horizontal sum per key and query head and a call per
   row; this streams each key and value once, converts bf16 in registers, and exponentiates 16 (or 8) scores at a
   time. Built with the machine's own vector width (AVX-512 or AVX2 with FMA); `vector_width()` says which, 0 where
   neither (the compiled set then holds the graphs that attend themselves).

   Also a prefill chunk's attention (`chunk_attention`), where the CPU has AVX-512 BF16: torch's CPU flash kernel (sdpa)
   ran 206 queries over 1,336 keys at ~100 GFLOP/s here, half a RAG request's prefill after a cached system prompt.
   This one takes bf16 dot products (vdpbf16ps) into fp32 for the scores, scales them, and keeps an online softmax in
   fp32, then rounds the weights to bf16 for the weighted sum of the values (fp32 sums again), as torch's kernel
   rounds them for its bf16 product: the same steps, its sums in another order. `chunk_width()` says whether it was
   built (0: sdpa attends). */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX512F__)
#include <immintrin.h>
#define WIDTH 16
typedef __m512 vec;
#define vzero() _mm512_setzero_ps()
#define vset(x) _mm512_set1_ps(x)
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, x) _mm512_storeu_ps(p, x)
#define vadd(a, b) _mm512_add_ps(a, b)
#define vsub(a, b) _mm512_sub_ps(a, b)
#define vmul(a, b) _mm512_mul_ps(a, b)
#define vmax(a, b) _mm512_max_ps(a, b)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vfnma(a, b, c) _mm512_fnmadd_ps(a, b, c)
#define vround(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
#define vsum(x) _mm512_reduce_add_ps(x)
static inline vec vscale2(vec y, vec n) { return _mm512_scalef_ps(y, n); }
static inline vec load_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define WIDTH 8
typedef __m256 vec;
#define vzero() _mm256_setzero_ps()
#define vset(x) _mm256_set1_ps(x)
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, x) _mm256_storeu_ps(p, x)
#define vadd(a, b) _mm256_add_ps(a, b)
#define vsub(a, b) _mm256_sub_ps(a, b)
#define vmul(a, b) _mm256_mul_ps(a, b)
#define vmax(a, b) _mm256_max_ps(a, b)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vfnma(a, b, c) _mm256_fnmadd_ps(a, b, c)
#define vround(x) _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC)
static inline float vsum(vec x) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
static inline vec vscale2(vec y, vec n) {  /* y * 2^n, n integral in [-127, 127] */
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}
static inline vec load_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#else
#define WIDTH 0
#endif

int vector_width(void) { return WIDTH; }

#if WIDTH

/* e^x for shifted scores (x <= 0), Cephes' expf polynomial: about 1 ulp, as the graph's Sleef exp */
static inline vec exp_shifted(vec x) {
    x = vmax(x, vset(-87.33654f));
    vec n = vround(vmul(x, vset(1.44269504088896341f)));
    vec r = vfnma(n, vset(0.693359375f), x);
    r = vfnma(n, vset(-2.12194440e-4f), r);
    vec y = vset(1.9875691500E-4f);
    y = vfma(y, r, vset(1.3981999507E-3f));
    y = vfma(y, r, vset(8.3334519073E-3f));
    y = vfma(y, r, vset(4.1665795894E-2f));
    y = vfma(y, r, vset(1.6666665459E-1f));
    y = vfma(y, r, vset(5.0000001201E-1f));
    y = vfma(y, vmul(r, r), vadd(r, vset(1.0f)));
    return vscale2(y, n);
}

static inline vec load_row(const void *p, long at, int bf16) {
    return bf16 ? load_bf16((const uint16_t *)p + at) : vload((const float *)p + at);
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t bits;
    memcpy(&bits, &f, 4);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40u);  /* NaN stays NaN */
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    uint32_t bits = (uint32_t)h << 16;
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

/* one kv head: `groups` query heads q [groups, dim] (fp32) over keys k and values v [n, dim]; out [groups, dim] */
static void attend(const float *q, const void *k, const void *v, long n, long groups, long dim, float scale,
                   int bf16, float *scores, float *out) {
    long chunks = dim / WIDTH;
    for (long t = 0; t < n; t++) {
        for (long g = 0; g < groups; g++) {
            const float *query = q + g * dim;
            vec a = vzero(), b = vzero();
            long c = 0;
            for (; c + 1 < chunks; c += 2) {
                a = vfma(vload(query + c * WIDTH), load_row(k, t * dim + c * WIDTH, bf16), a);
                b = vfma(vload(query + (c + 1) * WIDTH), load_row(k, t * dim + (c + 1) * WIDTH, bf16), b);
            }
            if (c < chunks) a = vfma(vload(query + c * WIDTH), load_row(k, t * dim + c * WIDTH, bf16), a);
            scores[g * n + t] = vsum(vadd(a, b)) * scale;
        }
    }
    for (long g = 0; g < groups; g++) {
        float *s = scores + g * n, top = -INFINITY, total = 0.0f;
        int undefined = 0;  /* a NaN score, or an infinite top one: the softmax is NaN, as torch's is */
        for (long t = 0; t < n; t++) {
            undefined |= s[t] != s[t];
            top = s[t] > top ? s[t] : top;
        }
        if (undefined || isinf(top)) {  /* NaN weights: the weighted sum below gives NaN */
            for (long t = 0; t < n; t++) s[t] = NAN;
            continue;
        }
        vec sum = vzero(), shift = vset(top);
        long t = 0;
        for (; t + WIDTH <= n; t += WIDTH) {
            vec e = exp_shifted(vsub(vload(s + t), shift));
            vstore(s + t, e);
            sum = vadd(sum, e);
        }
        if (t < n) {  /* the last few scores through a padded copy */
            float tail[WIDTH];
            for (long i = 0; i < WIDTH; i++) tail[i] = t + i < n ? s[t + i] : -INFINITY;
            vec e = exp_shifted(vsub(vload(tail), shift));
            vstore(tail, e);
            for (long i = 0; t + i < n; i++) s[t + i] = tail[i], total += tail[i];
        }
        total += vsum(sum);
        float inverse = 1.0f / total;
        for (t = 0; t < n; t++) s[t] *= inverse;
    }
    for (long g = 0; g < groups; g++)
        for (long d = 0; d < dim; d++) out[g * dim + d] = 0.0f;
    for (long t = 0; t < n; t++)
        for (long c = 0; c < chunks; c++) {
            vec value = load_row(v, t * dim + c * WIDTH, bf16);
            for (long g = 0; g < groups; g++) {
                float *o = out + g * dim + c * WIDTH;
                vstore(o, vfma(vset(scores[g * n + t]), value, vload(o)));
            }
        }
}

#endif

#if WIDTH

#define HELPED_FROM 2048  /* keys times kv heads of a call from which threads share it (measured: session 66) */

/* The work of one call: a unit is one row's kv head (its query heads over its keys), taken in turn by the threads. */
struct step {
    long rows, kv_heads, groups, dim, units;
    const long *capacity, *position, *order;
    char *const *keys, *const *values;
    const float *query;  /* [rows, kv_heads * groups, dim] fp32 */
    float scale;
    int bf16;
    void *out;
    long next;  /* the next unit to take (atomic) */
    int failed;
};

static int by_first(const void *a, const void *b) {
    long x = ((const long *)a)[0], y = ((const long *)b)[0];
    return (x > y) - (x < y);
}

static void work(struct step *s) {
    long size = s->bf16 ? 2 : 4, longest = 0;
    for (long r = 0; r < s->rows; r++) longest = s->position[r] + 1 > longest ? s->position[r] + 1 : longest;
    float *scratch = malloc(sizeof(float) * (size_t)(s->groups * longest + s->groups * s->dim));
    if (!scratch) {
        __atomic_store_n(&s->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *result = scratch + s->groups * longest;
    for (;;) {
        long unit = __atomic_fetch_add(&s->next, 1, __ATOMIC_RELAXED);
        if (unit >= s->units) break;
        long r = s->order[unit] / s->kv_heads, h = s->order[unit] % s->kv_heads, width = s->groups * s->dim;
        size_t at = (size_t)(h * s->capacity[r] * s->dim) * size;
        attend(s->query + (r * s->kv_heads + h) * width, s->keys[r] + at, s->values[r] + at, s->position[r] + 1,
               s->groups, s->dim, s->scale, s->bf16, scratch, result);
        long first = (r * s->kv_heads + h) * width;
        for (long i = 0; i < width; i++) {
            if (s->bf16)
                ((uint16_t *)s->out)[first + i] = to_bf16(result[i]);
            else
                ((float *)s->out)[first + i] = result[i];
        }
    }
    free(scratch);
}

#endif

/* rows: the decoding rows; buffers[r]: row r's KV buffer [layers, 2, kv_heads, capacity[r], dim] (contiguous, the
   cache's dtype); position[r]: where its new key and value go (it attends over positions 0..position[r]).
   q [rows, kv_heads * groups, dim], k_new and v_new [rows, kv_heads, dim], out [rows, kv_heads * groups, dim]: in
   the cache's dtype, rows `q_stride`, `k_stride`, `v_stride` elements apart, heads `dim` apart. `threads`: how many
   of OpenMP's share the work. Returns 0, or -1 where memory could not be had or the kernel was built without
   vectors (the output is then incomplete; the caches hold the new keys and values). */
int decode_attention(long rows, long layer, void *const *buffers, const long *capacity, const long *position,
                     const void *q, long q_stride, const void *k_new, long k_stride, const void *v_new, long v_stride,
                     long kv_heads, long groups, long dim, float scale, int bf16, void *out, int threads) {
#if WIDTH
    long heads = kv_heads * groups, size = bf16 ? 2 : 4, units = rows * kv_heads;
    if (dim % WIDTH) return -1;
    float *query = malloc(sizeof(float) * (size_t)(rows * heads * dim));
    long *order = malloc(2 * sizeof(long) * (size_t)units);
    char **keys = malloc(sizeof(char *) * (size_t)rows), **values = malloc(sizeof(char *) * (size_t)rows);
    int failed = !query || !order || !keys || !values;
    for (long r = 0; r < rows && !failed; r++) {
        long cap = capacity[r], plane = kv_heads * cap * dim;
        keys[r] = (char *)buffers[r] + (size_t)(layer * 2 * plane) * size;
        values[r] = keys[r] + (size_t)plane * size;
        for (long h = 0; h < kv_heads; h++) {
            memcpy(keys[r] + (size_t)((h * cap + position[r]) * dim) * size,
                   (const char *)k_new + (size_t)(r * k_stride + h * dim) * size, (size_t)dim * size);
            memcpy(values[r] + (size_t)((h * cap + position[r]) * dim) * size,
                   (const char *)v_new + (size_t)(r * v_stride + h * dim) * size, (size_t)dim * size);
        }
        for (long i = 0; i < heads * dim; i++)
            query[r * heads * dim + i] = bf16 ? from_bf16(((const uint16_t *)q)[r * q_stride + i])
                                              : ((const float *)q)[r * q_stride + i];
    }
    if (!failed) {
        /* the longest rows first, so that the threads finish together: units as (-keys, unit) pairs, sorted */
        for (long u = 0; u < units; u++) order[2 * u] = -position[u / kv_heads], order[2 * u + 1] = u;
        qsort(order, (size_t)units, 2 * sizeof(long), by_first);
        for (long u = 0; u < units; u++) order[u] = order[2 * u + 1];
        struct step s = {rows, kv_heads, groups, dim, units, capacity, position, order, keys, values, query, scale,
                         bf16, out, 0, 0};
        /* the threads are torch's own (OpenMP, the same runtime): waiting for work between its products, they
           take a unit at once; a step's one short row is not worth waking them for */
        long keys_to_read = 0;
        for (long r = 0; r < rows; r++) keys_to_read += (position[r] + 1) * kv_heads;
        int shared = threads > 1 && units > 1 && keys_to_read >= HELPED_FROM;
#pragma omp parallel num_threads(threads) if (shared)
        work(&s);
        failed = s.failed;
    }
    free(query), free(order), free(keys), free(values);
    return failed ? -1 : 0;
#else
    (void)rows, (void)layer, (void)buffers, (void)capacity, (void)position, (void)q, (void)q_stride, (void)k_new;
    (void)k_stride, (void)v_new, (void)v_stride, (void)kv_heads, (void)groups, (void)dim, (void)scale, (void)bf16;
    (void)out, (void)threads;
    return -1;
#endif
}


#if WIDTH == 16 && defined(__AVX512BF16__)
#define CHUNK_QUERIES 16  /* queries of one head a unit takes: a vector lane each */
#define CHUNK_KEYS 32     /* keys a unit scores at a time (one online-softmax update) */
#define CHUNK_MAX_DIM 256

/* the values of key pairs interleaved, as the bf16 dot product takes them: vp[m * dim + d] = v[2m][d] | v[2m+1][d]
   << 16 (a missing last key's half 0) */
static void pack_value_pairs(const uint16_t *v, long first_pair, long last_pair, long keys, long dim, uint32_t *vp) {
    for (long m = first_pair; m < last_pair; m++) {
        const uint16_t *a = v + 2 * m * dim, *b = v + (2 * m + 1) * dim;
        uint32_t *to = vp + m * dim;
        if (2 * m + 1 < keys)
            for (long d = 0; d < dim; d++) to[d] = a[d] | (uint32_t)b[d] << 16;
        else
            for (long d = 0; d < dim; d++) to[d] = a[d];
    }
}

/* queries q0..q0+rows-1 of one head (q: that head's [length, dim]) over keys 0..start+q0+rows-1 of its kv head (k:
   [capacity, dim]; vp: its packed values); o: scratch [dim, CHUNK_QUERIES]; out: the head's [length, dim] */
static void chunk_unit(const uint16_t *q, long q0, long rows, const uint16_t *k, const uint32_t *vp, long start,
                       long dim, float scale, float *o, uint16_t *out) {
    long half = dim / 2, keys = start + q0 + rows;
    __m512i query_pairs[CHUNK_MAX_DIM / 2], weights[CHUNK_KEYS / 2];
    __m512 s[CHUNK_KEYS];
    /* lane i holds query q0+i (past the last row: the last row again, its result unused) */
    __m512i lane = _mm512_min_epi32(_mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                                    _mm512_set1_epi32((int)rows - 1));
    __m512i at = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)half));
    for (long p = 0; p < half; p++)
        query_pairs[p] = _mm512_i32gather_epi32(_mm512_add_epi32(at, _mm512_set1_epi32((int)p)),
                                                (const int *)(q + q0 * dim), 4);
    __m512i position = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(start + q0)));
    __m512 top = _mm512_set1_ps(-INFINITY), total = _mm512_setzero_ps(), minus_inf = _mm512_set1_ps(-INFINITY);
    __mmask16 undefined = 0;  /* a NaN score, or an infinite top one: the softmax is NaN, as torch's is */
    for (long i = 0; i < dim * CHUNK_QUERIES; i++) o[i] = 0.0f;
    for (long j0 = 0; j0 < keys; j0 += CHUNK_KEYS) {
        long block = keys - j0 < CHUNK_KEYS ? keys - j0 : CHUNK_KEYS;
        for (long t0 = 0; t0 < CHUNK_KEYS; t0 += 8) {
            __m512 dot[8];
            const int *key[8];
            for (int t = 0; t < 8; t++) {
                long j = j0 + t0 + t;
                dot[t] = _mm512_setzero_ps();
                key[t] = (const int *)(k + (j < keys ? j : keys - 1) * dim);
            }
            if (t0 < block)
                for (long p = 0; p < half; p++) {
                    __m512bh pair = (__m512bh)query_pairs[p];
                    for (int t = 0; t < 8; t++)
                        dot[t] = _mm512_dpbf16_ps(dot[t], pair, (__m512bh)_mm512_set1_epi32(key[t][p]));
                }
            for (int t = 0; t < 8; t++) {  /* causal: key j for the queries at j or after it */
                long j = j0 + t0 + t;
                __mmask16 seen = j < keys ? _mm512_cmp_epi32_mask(_mm512_set1_epi32((int)j), position, _MM_CMPINT_LE)
                                          : 0;
                s[t0 + t] = _mm512_mask_mul_ps(minus_inf, seen, dot[t], _mm512_set1_ps(scale));
                undefined |= _mm512_cmp_ps_mask(s[t0 + t], s[t0 + t], _CMP_UNORD_Q);
            }
        }
        __m512 block_top = s[0];
        for (int t = 1; t < CHUNK_KEYS; t++) block_top = _mm512_max_ps(block_top, s[t]);
        __m512 new_top = _mm512_max_ps(top, block_top);
        /* what the sums so far are worth against the new top (nothing before the first key: 0, not exp(NaN)) */
        __m512 kept = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(top, minus_inf, _CMP_NEQ_OQ),
                                          exp_shifted(_mm512_sub_ps(top, new_top)));
        total = _mm512_mul_ps(total, kept);
        for (int t = 0; t < CHUNK_KEYS; t++) {
            __mmask16 live = _mm512_cmp_ps_mask(s[t], minus_inf, _CMP_NEQ_OQ);
            s[t] = _mm512_maskz_mov_ps(live, exp_shifted(_mm512_sub_ps(s[t], new_top)));
            total = _mm512_add_ps(total, s[t]);
        }
        top = new_top;
        for (int u = 0; u < CHUNK_KEYS / 2; u++) {  /* weights rounded to bf16, two keys' to a lane */
            __m512i low = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s[2 * u]));
            __m512i high = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(s[2 * u + 1]));
            weights[u] = _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
        }
        long pairs = (block + 1) / 2;
        const uint32_t *values = vp + (j0 / 2) * dim;
        for (long d0 = 0; d0 < dim; d0 += 16) {
            __m512 acc[16];
            for (int e = 0; e < 16; e++) acc[e] = _mm512_mul_ps(_mm512_loadu_ps(o + (d0 + e) * CHUNK_QUERIES), kept);
            for (long u = 0; u < pairs; u++) {
                __m512bh w = (__m512bh)weights[u];
                const int *pair = (const int *)(values + u * dim + d0);
                for (int e = 0; e < 16; e++) acc[e] = _mm512_dpbf16_ps(acc[e], w, (__m512bh)_mm512_set1_epi32(pair[e]));
            }
            for (int e = 0; e < 16; e++) _mm512_storeu_ps(o + (d0 + e) * CHUNK_QUERIES, acc[e]);
        }
    }
    undefined |= _mm512_cmp_ps_mask(_mm512_abs_ps(top), _mm512_set1_ps(INFINITY), _CMP_EQ_OQ);
    float inverse[CHUNK_QUERIES];
    _mm512_storeu_ps(inverse, _mm512_mask_mov_ps(_mm512_div_ps(_mm512_set1_ps(1.0f), total), undefined,
                                                 _mm512_set1_ps(NAN)));
    for (long i = 0; i < rows; i++)
        for (long d = 0; d < dim; d++) out[(q0 + i) * dim + d] = to_bf16(o[d * CHUNK_QUERIES + i] * inverse[i]);
}
#endif

int chunk_width(void) {
#if WIDTH == 16 && defined(__AVX512BF16__)
    return CHUNK_QUERIES;
#else
    return 0;
#endif
}

/* A prefill chunk of one sequence: q [heads, length, dim] (bf16, contiguous), query i at position start+i; k and v
   one layer's keys and values [kv_heads, capacity, dim] (bf16, contiguous), the chunk's own already stored; each
   query attends over positions 0..start+i (causal, no window). out [heads, length, dim], bf16. Query head h takes kv
   head h / (heads / kv_heads). Returns 0, or -1 (the output then incomplete) where memory could not be had, the
   kernel was not built, the head size is not a multiple of 32 up to 256, the heads are not a multiple of the kv
   heads, the length is under 1, or the chunk does not lie within 0..capacity. */
int chunk_attention(const uint16_t *q, const uint16_t *k, const uint16_t *v, long heads, long kv_heads, long length,
                    long start, long capacity, long dim, float scale, uint16_t *out, int threads) {
#if WIDTH == 16 && defined(__AVX512BF16__)
    if (dim % 32 || dim > CHUNK_MAX_DIM || kv_heads < 1 || heads % kv_heads || length < 1 || start < 0
        || start + length > capacity)
        return -1;
    long keys = start + length, pairs = (keys + 1) / 2, groups = heads / kv_heads;
    long blocks = (length + CHUNK_QUERIES - 1) / CHUNK_QUERIES, units = heads * blocks, next = 0, parts = 8;
    uint32_t *vp = malloc(sizeof(uint32_t) * (size_t)(kv_heads * pairs * dim));
    float *scratch = malloc(sizeof(float) * (size_t)(threads > 1 ? threads : 1) * (size_t)(dim * CHUNK_QUERIES));
    if (!vp || !scratch) {
        free(vp), free(scratch);
        return -1;
    }
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
#pragma omp for schedule(static)
        for (long w = 0; w < kv_heads * parts; w++) {
            long h = w / parts, per = (pairs + parts - 1) / parts, a = (w % parts) * per;
            long b = a + per < pairs ? a + per : pairs;
            if (a < b) pack_value_pairs(v + h * capacity * dim, a, b, keys, dim, vp + h * pairs * dim);
        }
        int me = 0;
#ifdef _OPENMP
        me = omp_get_thread_num();
#endif
        float *o = scratch + (size_t)me * (size_t)(dim * CHUNK_QUERIES);
        for (;;) {
            long u = __atomic_fetch_add(&next, 1, __ATOMIC_RELAXED);
            if (u >= units) break;
            long b = blocks - 1 - u / heads, h = u % heads;  /* the last queries (the most keys) first */
            long q0 = b * CHUNK_QUERIES, rows = length - q0 < CHUNK_QUERIES ? length - q0 : CHUNK_QUERIES;
            chunk_unit(q + h * length * dim, q0, rows, k + (h / groups) * capacity * dim,
                       vp + (h / groups) * pairs * dim, start, dim, scale, o, out + h * length * dim);
        }
    }
    free(vp), free(scratch);
    return 0;
#else
    (void)q, (void)k, (void)v, (void)heads, (void)kv_heads, (void)length, (void)start, (void)capacity, (void)dim;
    (void)scale, (void)out, (void)threads;
    return -1;
#endif
}
