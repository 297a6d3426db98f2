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

inline float to_f32(float x) { return x; }
inline float to_f32(ggml_fp16_t x) { return ggml_fp16_to_fp32(x); }

#if PSE_AVX2
inline __m256 load8(const float * p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const ggml_fp16_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) p)); }
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#elif PSE_NEON
inline float32x4_t load4(const float * p) { return vld1q_f32(p); }
inline float32x4_t load4(const ggml_fp16_t * p) { return vcvt_f32_f16(vld1_f16((const __fp16 *) p)); }
#endif

template <typename T>
inline float dot(const float * q, const T * k, int n) {
    int i = 0;
    float sum = 0.0f;
#if PSE_AVX2
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= n; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), load8(k + i + 8), a1);
    }
    for (; i + 8 <= n; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), load8(k + i), a0);
    sum = hsum(_mm256_add_ps(a0, a1));
#elif PSE_NEON
    float32x4_t a0 = vdupq_n_f32(0.0f), a1 = vdupq_n_f32(0.0f);
    for (; i + 8 <= n; i += 8) {
        a0 = vfmaq_f32(a0, vld1q_f32(q + i), load4(k + i));
        a1 = vfmaq_f32(a1, vld1q_f32(q + i + 4), load4(k + i + 4));
    }
    sum = vaddvq_f32(vaddq_f32(a0, a1));
#endif
    for (; i < n; ++i) sum += q[i] * to_f32(k[i]);
    return sum;
}

// y += a * x
template <typename T>
inline void axpy(float * y, float a, const T * x, int n) {
    int i = 0;
#if PSE_AVX2
    const __m256 va = _mm256_set1_ps(a);
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_fmadd_ps(va, load8(x + i), _mm256_loadu_ps(y + i)));
#elif PSE_NEON
    const float32x4_t va = vdupq_n_f32(a);
    for (; i + 4 <= n; i += 4) vst1q_f32(y + i, vfmaq_f32(vld1q_f32(y + i), va, load4(x + i)));
#endif
    for (; i < n; ++i) y[i] += a * to_f32(x[i]);
}

inline void scale_vec(float * y, float a, int n) {
    for (int i = 0; i < n; ++i) y[i] *= a;
}

// ---- the online-softmax pass ---------------------------------------------------------------

constexpr int kBlock = 32;  // keys scored before one softmax rescale

// Running softmax state of n_rep query heads that share one K/V head.
struct head_state {
    int n_rep, D;
    float * m;    // [n_rep] running max
    float * l;    // [n_rep] running sum of exp
    float * acc;  // [n_rep * D] running weighted sum of V
    float * s;    // [n_rep * kBlock] scores of the current block
};

// Scores keys [lo, hi) (row j of `k` at k_base + (j - k_off) * k_stride) against the n_rep
// queries q[r], and folds them into the state.
template <typename TK, typename TV>
void attend_range(head_state & st, const float * const * q, float scale,
                  const char * k_base, size_t k_stride, int32_t k_off,
                  const char * v_base, size_t v_stride, int32_t lo, int32_t hi) {
    const int D = st.D, R = st.n_rep;
    for (int32_t j0 = lo; j0 < hi; j0 += kBlock) {
        const int nb = std::min<int32_t>(kBlock, hi - j0);
        for (int b = 0; b < nb; ++b) {
            const TK * kr = (const TK *) (k_base + (size_t) (j0 + b - k_off) * k_stride);
            for (int r = 0; r < R; ++r) st.s[r * kBlock + b] = dot(q[r], kr, D) * scale;
        }
        for (int r = 0; r < R; ++r) {
            float * s = st.s + r * kBlock;
            float mb = s[0];
            for (int b = 1; b < nb; ++b) mb = std::max(mb, s[b]);
            if (mb > st.m[r]) {
                const float f = std::exp(st.m[r] - mb);  // 0 when m was -inf
                scale_vec(st.acc + (size_t) r * D, f, D);
                st.l[r] *= f;
                st.m[r] = mb;
            }
            float sum = 0.0f;
            for (int b = 0; b < nb; ++b) sum += (s[b] = std::exp(s[b] - st.m[r]));
            st.l[r] += sum;
        }
        for (int b = 0; b < nb; ++b) {
            const TV * vr = (const TV *) (v_base + (size_t) (j0 + b) * v_stride);
            for (int r = 0; r < R; ++r) axpy(st.acc + (size_t) r * D, st.s[r * kBlock + b], vr, D);
        }
    }
}

template <typename TK, typename TV>
void selfextend_forward(ggml_tensor * dst, int ith, int nth, const selfextend_op_params & p) {
    const ggml_tensor * q_n = dst->src[0], * q_g = dst->src[1];
    const ggml_tensor * k = dst->src[2], * v = dst->src[3], * k_nb = dst->src[4];
    const int D = (int) q_n->ne[0], n_head = (int) q_n->ne[1], n_head_kv = (int) k->ne[1];
    const int R = n_head / n_head_kv;
    const int32_t n_kv = (int32_t) k->ne[2], T = p.n_tokens, C = p.n_chunks, W = p.window;
    const bool partial = C > 1;

    std::vector<float> buf((size_t) R * (2 + D + kBlock));
    std::vector<const float *> qn(R), qg(R);
    head_state st{R, D, buf.data(), buf.data() + R, buf.data() + 2 * R, buf.data() + 2 * R + (size_t) R * D};

    const int64_t n_items = (int64_t) T * n_head_kv * C;
    for (int64_t item = ith; item < n_items; item += nth) {
        const int32_t c = (int32_t) (item % C);
        const int g = (int) (item / C % n_head_kv);
        const int32_t t = (int32_t) (item / C / n_head_kv);
        const int32_t i = p.n_past + t;  // absolute position of the query

        for (int r = 0; r < R; ++r) {
            const int h = g * R + r;
            qn[r] = (const float *) ((const char *) q_n->data + t * q_n->nb[2] + h * q_n->nb[1]);
            qg[r] = (const float *) ((const char *) q_g->data + t * q_g->nb[2] + h * q_g->nb[1]);
            st.m[r] = -std::numeric_limits<float>::infinity();
            st.l[r] = 0.0f;
        }
        std::fill(st.acc, st.acc + (size_t) R * D, 0.0f);

        // This chunk's keys, cut at the causal limit i and split at the neighbor boundary i - W.
        const int32_t c0 = (int32_t) ((int64_t) n_kv * c / C), c1 = std::min<int32_t>((int32_t) ((int64_t) n_kv * (c + 1) / C), i + 1);
        const int32_t split = std::max(c0, std::min(c1, i - W + 1));
        const char * k_head = (const char *) k->data + g * k->nb[1];
        const char * v_head = (const char *) v->data + g * v->nb[1];
        if (c0 < split) {
            attend_range<TK, TV>(st, qg.data(), p.scale, k_head, k->nb[2], 0, v_head, v->nb[2], c0, split);
        }
        if (split < c1) {
            const char * knb_head = (const char *) k_nb->data + g * k_nb->nb[1];
            attend_range<TK, TV>(st, qn.data(), p.scale, knb_head, k_nb->nb[2], p.nb_lo, v_head, v->nb[2],
                                 std::max(split, c0), c1);
        }

        for (int r = 0; r < R; ++r) {
            const int h = g * R + r;
            const float * acc = st.acc + (size_t) r * D;
            if (partial) {
                float * out = (float *) ((char *) dst->data + c * dst->nb[3] + t * dst->nb[2] + h * dst->nb[1]);
                std::memcpy(out, acc, sizeof(float) * D);
                out[D] = st.m[r];
                out[D + 1] = st.l[r];
            } else {
                float * out = (float *) ((char *) dst->data + t * dst->nb[2] + h * dst->nb[1]);
                const float inv = st.l[r] > 0.0f ? 1.0f / st.l[r] : 0.0f;
                for (int d = 0; d < D; ++d) out[d] = acc[d] * inv;
            }
        }
    }
}

void selfextend_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const selfextend_op_params & p = *(const selfextend_op_params *) userdata;
    const ggml_type tk = dst->src[2]->type, tv = dst->src[3]->type;
    if (tk == GGML_TYPE_F16 && tv == GGML_TYPE_F16) selfextend_forward<ggml_fp16_t, ggml_fp16_t>(dst, ith, nth, p);
    else if (tk == GGML_TYPE_F32 && tv == GGML_TYPE_F32) selfextend_forward<float, float>(dst, ith, nth, p);
    else GGML_ABORT("selfextend: K/V cache types must both be f16 or both f32");  // checked when building
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
    const int64_t items = (int64_t) n_tokens * n_head_kv;
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
