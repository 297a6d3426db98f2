#include "selfextend_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define PSE_AVX2 1
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define PSE_NEON 1
#endif

namespace pse {

namespace {

// ---- vector primitives: AVX2+F16C, NEON, or scalar, chosen at compile time ----------------

// Row readers: copy n values of a cache row to f32 (the K/V rows of a block are converted once and
// reused by every query). f16 and f32 are inlined; a quantized cache (q8_0) goes through
// ggml's own dequantization.
struct f32_rows {
    void operator()(float * dst, const char * src, int n) const { std::memcpy(dst, src, sizeof(float) * n); }
};
struct f16_rows {
    void operator()(float * dst, const char * src_bytes, int n) const {
        const ggml_fp16_t * src = (const ggml_fp16_t *) src_bytes;
        int i = 0;
#if PSE_AVX2
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) (src + i))));
#elif PSE_NEON
        for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vld1_f16((const __fp16 *) (src + i))));
#endif
        for (; i < n; ++i) dst[i] = ggml_fp16_to_fp32(src[i]);
    }
};
struct quantized_rows {
    ggml_to_float_t dequantize;
    void operator()(float * dst, const char * src, int n) const { dequantize(src, dst, n); }
};

// out[k] = <q, krows[k]> for 8 consecutive rows of length D (stride D).
inline void dot8(const float * q, const float * krows, int D, float * out) {
#if PSE_AVX2
    if (D % 8 == 0) {
        __m256 a[8];
        for (int k = 0; k < 8; ++k) a[k] = _mm256_setzero_ps();
        for (int d = 0; d < D; d += 8) {
            const __m256 qv = _mm256_loadu_ps(q + d);
            for (int k = 0; k < 8; ++k) a[k] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(krows + k * D + d), a[k]);
        }
        // Transpose-and-add: lane k of the result is the sum of a[k].
        const __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
        const __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
        const __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
        _mm256_storeu_ps(out, _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31)));
        return;
    }
#endif
    for (int k = 0; k < 8; ++k) {
        const float * kr = krows + k * D;
        int d = 0;
        float sum = 0.0f;
#if PSE_NEON
        float32x4_t a0 = vdupq_n_f32(0.0f);
        for (; d + 4 <= D; d += 4) a0 = vfmaq_f32(a0, vld1q_f32(q + d), vld1q_f32(kr + d));
        sum = vaddvq_f32(a0);
#endif
        for (; d < D; ++d) sum += q[d] * kr[d];
        out[k] = sum;
    }
}

// s[b] = exp(s[b] - m) for n values; -inf (an invisible key) gives exactly 0.
inline void exp_shifted(float * s, int n, float m) {
    int b = 0;
#if PSE_AVX2
    // exp(x) = 2^k * e^r with k = round(x / ln 2), |r| <= ln2 / 2, e^r by its Taylor series to r^7.
    const __m256 vm = _mm256_set1_ps(m), lo = _mm256_set1_ps(-87.0f), log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
    for (; b + 8 <= n; b += 8) {
        const __m256 x = _mm256_sub_ps(_mm256_loadu_ps(s + b), vm);
        const __m256 dead = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
        const __m256 xc = _mm256_max_ps(x, lo);
        const __m256 k = _mm256_round_ps(_mm256_mul_ps(xc, log2e), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m256 r = _mm256_fnmadd_ps(k, ln2_lo, _mm256_fnmadd_ps(k, ln2_hi, xc));
        __m256 p = _mm256_set1_ps(1.0f / 5040.0f);
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
        const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(k), _mm256_set1_epi32(127)), 23);
        _mm256_storeu_ps(s + b, _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(e))));
    }
#endif
    for (; b < n; ++b) s[b] = std::exp(s[b] - m);
}

// acc[0:D] += sum_b p[b] * v[b][0:D] over nb rows of v (stride D); acc stays in registers.
inline void accumulate_pv(float * acc, const float * p, const float * v, int nb, int D) {
    int d = 0;
#if PSE_AVX2
    for (; d + 64 <= D; d += 64) {
        __m256 a[8];
        for (int x = 0; x < 8; ++x) a[x] = _mm256_loadu_ps(acc + d + 8 * x);
        for (int b = 0; b < nb; ++b) {
            if (p[b] == 0.0f) continue;
            const __m256 pb = _mm256_set1_ps(p[b]);
            const float * vr = v + (size_t) b * D + d;
            for (int x = 0; x < 8; ++x) a[x] = _mm256_fmadd_ps(pb, _mm256_loadu_ps(vr + 8 * x), a[x]);
        }
        for (int x = 0; x < 8; ++x) _mm256_storeu_ps(acc + d + 8 * x, a[x]);
    }
    for (; d + 8 <= D; d += 8) {
        __m256 a = _mm256_loadu_ps(acc + d);
        for (int b = 0; b < nb; ++b) a = _mm256_fmadd_ps(_mm256_set1_ps(p[b]), _mm256_loadu_ps(v + (size_t) b * D + d), a);
        _mm256_storeu_ps(acc + d, a);
    }
#elif PSE_NEON
    for (; d + 4 <= D; d += 4) {
        float32x4_t a = vld1q_f32(acc + d);
        for (int b = 0; b < nb; ++b) a = vfmaq_n_f32(a, vld1q_f32(v + (size_t) b * D + d), p[b]);
        vst1q_f32(acc + d, a);
    }
#endif
    for (; d < D; ++d) {
        float a = acc[d];
        for (int b = 0; b < nb; ++b) a += p[b] * v[(size_t) b * D + d];
        acc[d] = a;
    }
}

// ---- the online-softmax pass ---------------------------------------------------------------

constexpr int kBlock = 32;  // keys scored, then folded into the softmax, at a time (a multiple of 8)
constexpr int kTile = 8;    // queries that share one pass over the keys (prefill)

// One query row: a (token, head) pair and its running softmax state.
struct query_row {
    const float * q_nb;   // query rotated to its own position (for neighbor keys)
    const float * q_grp;  // query rotated to its grouped position (for grouped keys)
    int32_t pos;          // absolute position i
    float m, l;           // running max and sum of exp
    float * acc;          // [D] running weighted sum of V
};

// Scratch of one thread: one block of keys, neighbor keys and values in f32, and scores.
struct block_scratch {
    std::vector<float> k_grp, k_nb, v, s_grp, s_nb;
    void init(int D) {
        for (auto * b : {&k_grp, &k_nb, &v}) b->assign((size_t) kBlock * D, 0.0f);
        s_grp.assign(kBlock, 0.0f);
        s_nb.assign(kBlock, 0.0f);
    }
};

// Folds keys [lo, hi) into every row. For a row at position i, key j is grouped when i - j >= W,
// a neighbor when 0 <= i - j < W, and invisible when j > i. Each block of K/V rows is converted
// once and then serves every row of the tile.
template <typename KRows, typename NbRows, typename VRows>
void attend_rows(query_row * rows, int n_rows, int D, float scale, int32_t W, int32_t lo, int32_t hi,
                 const char * k_base, size_t k_stride, const char * knb_base, size_t knb_stride, int32_t nb_lo,
                 int32_t ring, const char * v_base, size_t v_stride, block_scratch & sc,
                 const KRows & k_row, const NbRows & nb_row, const VRows & v_row) {
    constexpr float neg_inf = -std::numeric_limits<float>::infinity();
    int32_t i_min = rows[0].pos, i_max = rows[0].pos;
    for (int r = 1; r < n_rows; ++r) i_min = std::min(i_min, rows[r].pos), i_max = std::max(i_max, rows[r].pos);

    for (int32_t j0 = lo; j0 < hi; j0 += kBlock) {
        const int nb = std::min<int32_t>(kBlock, hi - j0);
        const int nb8 = (nb + 7) & ~7;  // scores are computed 8 at a time; the tail rows are zero
        const int32_t j_last = j0 + nb - 1;
        const bool any_grp = j0 <= i_max - W;                   // some row sees a grouped key here
        const bool any_nb = j_last > i_min - W && j0 <= i_max;  // some row sees a neighbor key here
        if (any_grp) {
            for (int b = 0; b < nb; ++b) k_row(sc.k_grp.data() + (size_t) b * D, k_base + (size_t) (j0 + b) * k_stride, D);
            std::fill(sc.k_grp.begin() + (size_t) nb * D, sc.k_grp.begin() + (size_t) nb8 * D, 0.0f);
        }
        if (any_nb) {
            for (int b = 0; b < nb; ++b) {
                const int32_t j = j0 + b;
                float * dst = sc.k_nb.data() + (size_t) b * D;
                const size_t row = ring > 0 ? (size_t) (j % ring) : (size_t) (j - nb_lo);
                if (j >= nb_lo) nb_row(dst, knb_base + row * knb_stride, D);
                else std::fill(dst, dst + D, 0.0f);  // never a neighbor of any row (j < i - W + 1)
            }
            std::fill(sc.k_nb.begin() + (size_t) nb * D, sc.k_nb.begin() + (size_t) nb8 * D, 0.0f);
        }
        for (int b = 0; b < nb; ++b) v_row(sc.v.data() + (size_t) b * D, v_base + (size_t) (j0 + b) * v_stride, D);

        for (int r = 0; r < n_rows; ++r) {
            query_row & q = rows[r];
            const int32_t i = q.pos;
            if (j0 > i) continue;  // the whole block is in this row's future
            // Keys j <= i - W are grouped, i - W < j <= i neighbors: a prefix and a suffix of the block.
            const int n_grp = std::clamp<int32_t>(i - W + 1 - j0, 0, nb);
            const int n_vis = std::min<int32_t>(i - j0 + 1, nb);
            float * s = sc.s_grp.data();
            if (n_grp > 0) {
                for (int b = 0; b < n_grp; b += 8) dot8(q.q_grp, sc.k_grp.data() + (size_t) b * D, D, s + b);
            }
            if (n_vis > n_grp) {
                const int b0 = n_grp & ~7;
                for (int b = b0; b < n_vis; b += 8) dot8(q.q_nb, sc.k_nb.data() + (size_t) b * D, D, sc.s_nb.data() + b);
                for (int b = n_grp; b < n_vis; ++b) s[b] = sc.s_nb[b];
            }
            float mb = neg_inf;
            for (int b = 0; b < n_vis; ++b) mb = std::max(mb, s[b] *= scale);
            for (int b = n_vis; b < nb; ++b) s[b] = neg_inf;
            if (mb > q.m) {
                const float f = std::exp(q.m - mb);  // 0 when m was -inf
                for (int d = 0; d < D; ++d) q.acc[d] *= f;
                q.l *= f;
                q.m = mb;
            }
            exp_shifted(s, nb, q.m);
            float sum = 0.0f;
            for (int b = 0; b < nb; ++b) sum += s[b];
            q.l += sum;
            accumulate_pv(q.acc, s, sc.v.data(), n_vis, D);
        }
    }
}

template <typename KRows, typename NbRows, typename VRows>
void selfextend_forward(ggml_tensor * dst, int ith, int nth, const selfextend_op_params & p, const KRows & k_row,
                        const NbRows & nb_row, const VRows & v_row) {
    const ggml_tensor * q_n = dst->src[0], * q_g = dst->src[1];
    const ggml_tensor * k = dst->src[2], * v = dst->src[3], * k_nb = dst->src[4];
    const int D = (int) q_n->ne[0], n_head = (int) q_n->ne[1], n_head_kv = (int) k->ne[1];
    const int R = n_head / n_head_kv;
    // Keys that exist for this batch; the cache view k may span more rows (a graph serves several
    // positions), which the chunks leave out.
    const int32_t T = p.n_tokens, n_kv = p.n_past + T, C = p.n_chunks, W = p.window;
    const bool partial = C > 1;
    const int32_t n_tiles = (T + kTile - 1) / kTile;

    const int max_rows = kTile * R;
    std::vector<float> acc((size_t) max_rows * D);
    std::vector<query_row> rows(max_rows);
    block_scratch scratch;
    scratch.init(D);

    const int64_t n_items = (int64_t) n_tiles * n_head_kv * C;
    for (int64_t item = ith; item < n_items; item += nth) {
        const int32_t c = (int32_t) (item % C);
        const int g = (int) (item / C % n_head_kv);
        const int32_t t0 = (int32_t) (item / C / n_head_kv) * kTile, t1 = std::min(T, t0 + kTile);

        int n_rows = 0;
        for (int32_t t = t0; t < t1; ++t) {
            for (int r = 0; r < R; ++r, ++n_rows) {
                const int h = g * R + r;
                query_row & q = rows[n_rows];
                q.q_nb = (const float *) ((const char *) q_n->data + t * q_n->nb[2] + h * q_n->nb[1]);
                q.q_grp = (const float *) ((const char *) q_g->data + t * q_g->nb[2] + h * q_g->nb[1]);
                q.pos = p.n_past + t;
                q.m = -std::numeric_limits<float>::infinity();
                q.l = 0.0f;
                q.acc = acc.data() + (size_t) n_rows * D;
                std::fill(q.acc, q.acc + D, 0.0f);
            }
        }

        // This chunk's keys, up to the last query's causal limit.
        const int32_t lo = (int32_t) ((int64_t) n_kv * c / C);
        const int32_t hi = std::min<int32_t>((int32_t) ((int64_t) n_kv * (c + 1) / C), p.n_past + t1);
        if (lo < hi) {
            attend_rows(rows.data(), n_rows, D, p.scale, W, lo, hi, (const char *) k->data + g * k->nb[1], k->nb[2],
                        (const char *) k_nb->data + g * k_nb->nb[1], k_nb->nb[2], p.nb_lo, p.ring_size,
                        (const char *) v->data + g * v->nb[1], v->nb[2], scratch, k_row, nb_row, v_row);
        }

        n_rows = 0;
        for (int32_t t = t0; t < t1; ++t) {
            for (int r = 0; r < R; ++r, ++n_rows) {
                const int h = g * R + r;
                const query_row & q = rows[n_rows];
                if (partial) {
                    float * out = (float *) ((char *) dst->data + c * dst->nb[3] + t * dst->nb[2] + h * dst->nb[1]);
                    std::memcpy(out, q.acc, sizeof(float) * D);
                    out[D] = q.m;
                    out[D + 1] = q.l;
                } else {
                    float * out = (float *) ((char *) dst->data + t * dst->nb[2] + h * dst->nb[1]);
                    const float inv = q.l > 0.0f ? 1.0f / q.l : 0.0f;
                    for (int d = 0; d < D; ++d) out[d] = q.acc[d] * inv;
                }
            }
        }
    }
}

void selfextend_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const selfextend_op_params & p = *(const selfextend_op_params *) userdata;
    // The cache types the engine allows (kv_cache::type_from_name): f16 or f32 throughout, or a
    // quantized K/V with an f16 neighbor ring.
    const ggml_type tk = dst->src[2]->type, tv = dst->src[3]->type, tnb = dst->src[4]->type;
    if (tk == GGML_TYPE_F16 && tv == GGML_TYPE_F16 && tnb == GGML_TYPE_F16) {
        selfextend_forward(dst, ith, nth, p, f16_rows{}, f16_rows{}, f16_rows{});
    } else if (tk == GGML_TYPE_F32 && tv == GGML_TYPE_F32 && tnb == GGML_TYPE_F32) {
        selfextend_forward(dst, ith, nth, p, f32_rows{}, f32_rows{}, f32_rows{});
    } else if (ggml_is_quantized(tk) && ggml_is_quantized(tv) && tnb == GGML_TYPE_F16) {
        selfextend_forward(dst, ith, nth, p, quantized_rows{ggml_get_type_traits(tk)->to_float}, f16_rows{},
                           quantized_rows{ggml_get_type_traits(tv)->to_float});
    } else {
        GGML_ABORT("selfextend: unexpected K/V cache types");  // kv_cache allows none other
    }
}

// Merges the per-chunk (acc, m, l) partials of each (query, head) into the normalized output.
void selfextend_merge_op(ggml_tensor * dst, int ith, int nth, void *) {
    const ggml_tensor * part = dst->src[0];
    const int D = (int) dst->ne[0], n_head = (int) dst->ne[1];
    const int64_t T = dst->ne[2], C = part->ne[3];
    for (int64_t item = ith; item < T * n_head; item += nth) {
        const int64_t t = item / n_head, h = item % n_head;
        auto at = [&](int64_t c) {
            return (const float *) ((const char *) part->data + c * part->nb[3] + t * part->nb[2] + h * part->nb[1]);
        };
        float M = -std::numeric_limits<float>::infinity();
        for (int64_t c = 0; c < C; ++c) M = std::max(M, at(c)[D]);
        float * out = (float *) ((char *) dst->data + t * dst->nb[2] + h * dst->nb[1]);
        std::fill(out, out + D, 0.0f);
        float L = 0.0f;
        for (int64_t c = 0; c < C; ++c) {
            const float * pc = at(c);
            if (pc[D + 1] == 0.0f) continue;  // a chunk with no visible keys
            const float f = std::exp(pc[D] - M);
            L += f * pc[D + 1];
            for (int d = 0; d < D; ++d) out[d] += f * pc[d];
        }
        const float inv = L > 0.0f ? 1.0f / L : 0.0f;
        for (int d = 0; d < D; ++d) out[d] *= inv;
    }
}

}  // namespace

int32_t selfextend_choose_chunks(int32_t n_tokens, int32_t n_head_kv, int32_t n_kv, int n_threads) {
    const int64_t items = (int64_t) ((n_tokens + kTile - 1) / kTile) * n_head_kv;
    const int64_t want = 8 * (int64_t) std::max(1, n_threads);  // enough items to balance threads
    if (items >= want) return 1;
    int64_t c = (want + items - 1) / items;
    c = std::min<int64_t>(c, std::max<int64_t>(1, n_kv / 256));  // chunks of at least 256 keys
    return (int32_t) std::max<int64_t>(1, c);
}

ggml_tensor * selfextend_attention_fused(ggml_context * ctx, ggml_tensor * q_n, ggml_tensor * q_g,
                                         ggml_tensor * k, ggml_tensor * v, ggml_tensor * k_nb,
                                         const selfextend_op_params * p) {
    ggml_tensor * args[] = {q_n, q_g, k, v, k_nb};
    const int64_t D = q_n->ne[0], n_head = q_n->ne[1], T = q_n->ne[2];
    if (p->n_chunks <= 1) {
        return ggml_custom_4d(ctx, GGML_TYPE_F32, D, n_head, T, 1, args, 5, selfextend_op, GGML_N_TASKS_MAX,
                              (void *) p);
    }
    ggml_tensor * part = ggml_custom_4d(ctx, GGML_TYPE_F32, D + 2, n_head, T, p->n_chunks, args, 5, selfextend_op,
                                        GGML_N_TASKS_MAX, (void *) p);
    return ggml_custom_4d(ctx, GGML_TYPE_F32, D, n_head, T, 1, &part, 1, selfextend_merge_op, GGML_N_TASKS_MAX,
                          nullptr);
}

}  // namespace pse
