#include "selfextend_kernel.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
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

// ---- row readers: cache rows as f32 -------------------------------------------------------
// Each cache type's reader gives a whole row (operator(): the K/V rows of a block are converted once
// and then serve every query row of the tile), one value (value) and, on AVX2, 8 values from
// value d on (load8: decoding reads K and V where they lie in the cache). All three give the same
// f32 for a value. f32, f16 and q8_0 are inlined.
struct f32_rows {
    void operator()(float * dst, const char * src, int n) const { std::memcpy(dst, src, sizeof(float) * n); }
    static float value(const char * row, int d) { return ((const float *) row)[d]; }
#if PSE_AVX2
    static __m256 load8(const char * row, int d) { return _mm256_loadu_ps((const float *) row + d); }
#endif
};
struct f16_rows {
    static float value(const char * row, int d) { return ggml_fp16_to_fp32(((const ggml_fp16_t *) row)[d]); }
#if PSE_AVX2
    static __m256 load8(const char * row, int d) {
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *) ((const ggml_fp16_t *) row + d)));
    }
#endif
    void operator()(float * dst, const char * src_bytes, int n) const {
        const ggml_fp16_t * src = (const ggml_fp16_t *) src_bytes;
        int i = 0;
#if PSE_AVX2
        for (; i + 8 <= n; i += 8) _mm256_storeu_ps(dst + i, load8(src_bytes, i));
#elif PSE_NEON
        for (; i + 4 <= n; i += 4) vst1q_f32(dst + i, vcvt_f32_f16(vld1_f16((const __fp16 *) (src + i))));
#endif
        for (; i < n; ++i) dst[i] = ggml_fp16_to_fp32(src[i]);
    }
};
// q8_0 (the quantized cache kv_cache allows): blocks of 32 values, an f16 scale and 32 int8 (ggml's
// layout, checked against ggml's block size where the op is chosen). Inlined like f16: ggml's own
// dequantization is a call per row and a scalar loop, and decoding reads every row of the cache.
// The same value as ggml's, q * d rounded once.
struct q8_0_rows {
    static constexpr int kValues = 32;
    static constexpr size_t kBytes = sizeof(ggml_fp16_t) + kValues;
    // The block that holds value d of a row, its scale and its values.
    static const char * block(const char * row, int d) { return row + (size_t) (d / kValues) * kBytes; }
    static ggml_fp16_t scale(const char * block) {
        ggml_fp16_t h;
        std::memcpy(&h, block, sizeof(h));
        return h;
    }
    static const int8_t * values(const char * block) { return (const int8_t *) (block + sizeof(ggml_fp16_t)); }

    static float value(const char * row, int d) {
        const char * b = block(row, d);
        return values(b)[d % kValues] * ggml_fp16_to_fp32(scale(b));
    }
#if PSE_AVX2
    // d is a multiple of 8: the 8 values lie in one block.
    static __m256 load8(const char * row, int d) {
        const char * b = block(row, d);
        return widen8(values(b) + d % kValues, _mm256_set1_ps(_cvtsh_ss(scale(b))));
    }
    static __m256 widen8(const int8_t * q, __m256 scales) {
        const __m128i q8 = _mm_loadl_epi64((const __m128i *) q);
        return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q8)), scales);
    }
    // The whole block from value d on (d a multiple of 32), its scale read once.
    static void load32(const char * row, int d, __m256 out[4]) {
        const char * b = block(row, d);
        const __m256 scales = _mm256_set1_ps(_cvtsh_ss(scale(b)));
        for (int x = 0; x < 4; ++x) out[x] = widen8(values(b) + 8 * x, scales);
    }
#endif
    void operator()(float * dst, const char * src, int n) const {
        for (int i = 0; i < n; i += kValues) {
#if PSE_AVX2
            __m256 v[4];
            load32(src, i, v);
            for (int x = 0; x < 4; ++x) _mm256_storeu_ps(dst + i + 8 * x, v[x]);
#else
            const char * b = block(src, i);
            const float d = ggml_fp16_to_fp32(scale(b));
            for (int j = 0; j < kValues; ++j) dst[i + j] = values(b)[j] * d;
#endif
        }
    }
};

// ---- layout ------------------------------------------------------------------------------------
// The queries of one KV head g in a tile of up to kTile tokens, the R query heads of g for each
// token, are the tile's n_rows "rows". Scores are kept key-major, s[b * NR + r] for key b of the
// block and row r, with NR = n_rows rounded up to a multiple of 8: the rows of one key lie in
// vector lanes, so the softmax of 8 rows is one vector operation, and the scores of many rows
// come from the queries packed transposed (qT[d * NR + r]) times one broadcast key value: the
// shape of a matrix-multiplication micro-kernel, with no horizontal sums. Decoding (R rows in 8
// lanes) uses it too: a score must not depend on the tile its query fell in, or a prefix reused
// with other batches (the server) would not give the fresh logits bit for bit; dot products
// would sum in another order. Padding lanes repeat row 0 and are never written out.
//
// A tile of fewer than 8 rows (decoding: the R query heads of one KV head) would leave most lanes
// empty, so it turns the layout around: keys in lanes, s[r * kBlock + b], against the block's keys
// transposed (kT[d * kBlock + b]) and queries row by row. Every score is the same chain of
// multiply-adds over d, every probability the same exp8 of the same difference, every row's sum
// added key by key in the same order, so both layouts give the same bits.
//
// Measured on 2 AVX2 cores (a 2-layer model with SmolLM2's attention, 16k cached tokens):
// converting K/V once per block for a tile of 16 tokens rather than 8 (and 32 rather than 16: a
// further 5% in prefill), and for every head at once (one stream through the cache), mattered
// most; the accumulators must stay in registers.

// Loops of a fixed, small trip count over vector registers: unrolled early, so that GCC keeps
// the accumulators in registers instead of storing them every iteration.
#define PSE_UNROLL _Pragma("GCC unroll 16")

constexpr int kBlock = 32;  // keys per block (a multiple of 8)
constexpr int kLanes = 8;

// s[b * NR + r0 ..] = qT[:, r0 .. r0 + 8 NV] . k[b, :] for keys b0 .. b0 + MB (key b at k + b * ld).
#if PSE_AVX2
template <int NV, int MB>
inline void scores_tile(const float * qT, int NR, int r0, const float * k, int ld, int D, int b0, float * s) {
    __m256 acc[MB][NV];
    PSE_UNROLL
    for (int b = 0; b < MB; ++b)
        PSE_UNROLL
        for (int v = 0; v < NV; ++v) acc[b][v] = _mm256_setzero_ps();
    const float * kb = k + (size_t) b0 * ld;
    for (int d = 0; d < D; ++d) {
        __m256 q[NV];
        PSE_UNROLL
        for (int v = 0; v < NV; ++v) q[v] = _mm256_loadu_ps(qT + (size_t) d * NR + r0 + 8 * v);
        PSE_UNROLL
        for (int b = 0; b < MB; ++b) {
            const __m256 kv = _mm256_broadcast_ss(kb + (size_t) b * ld + d);
            PSE_UNROLL
            for (int v = 0; v < NV; ++v) acc[b][v] = _mm256_fmadd_ps(kv, q[v], acc[b][v]);
        }
    }
    PSE_UNROLL
    for (int b = 0; b < MB; ++b)
        PSE_UNROLL
        for (int v = 0; v < NV; ++v) _mm256_storeu_ps(s + (size_t) (b0 + b) * NR + r0 + 8 * v, acc[b][v]);
}

// NX vectors of 8 values of a row from value d on. A q8_0 block (NX = 4, d a multiple of 32) has its
// scale read once, where 4 load8 calls would read it 4 times (the compiler cannot know that they
// fall in one block).
template <int NX, typename Rows>
inline void load_values(const char * row, int d, __m256 * out) {
    if constexpr (std::is_same_v<Rows, q8_0_rows> && NX * 8 == q8_0_rows::kValues) {
        q8_0_rows::load32(row, d, out);
    } else {
        PSE_UNROLL
        for (int x = 0; x < NX; ++x) out[x] = Rows::load8(row, d + 8 * x);
    }
}

// o[r0 + r][d0 .. d0 + 8 NX] += sum_b p_b,r0+r * v[b][d0 ..] for MR rows, over nb keys (value row b
// at v + b * ld bytes, read by VRows; p_b,r at p + b * pb_stride + r * pr_stride, for either layout).
template <int MR, int NX, typename VRows>
inline void accumulate_tile(float * o, int D, int r0, int d0, const float * p, size_t pb_stride, size_t pr_stride,
                            const char * v, size_t ld, int nb) {
    __m256 acc[MR][NX];
    PSE_UNROLL
    for (int r = 0; r < MR; ++r)
        PSE_UNROLL
        for (int x = 0; x < NX; ++x) acc[r][x] = _mm256_loadu_ps(o + (size_t) (r0 + r) * D + d0 + 8 * x);
    for (int b = 0; b < nb; ++b) {
        __m256 vv[NX];
        load_values<NX, VRows>(v + b * ld, d0, vv);
        PSE_UNROLL
        for (int r = 0; r < MR; ++r) {
            const __m256 pb = _mm256_broadcast_ss(p + b * pb_stride + (r0 + r) * pr_stride);
            PSE_UNROLL
            for (int x = 0; x < NX; ++x) acc[r][x] = _mm256_fmadd_ps(pb, vv[x], acc[r][x]);
        }
    }
    PSE_UNROLL
    for (int r = 0; r < MR; ++r)
        PSE_UNROLL
        for (int x = 0; x < NX; ++x) _mm256_storeu_ps(o + (size_t) (r0 + r) * D + d0 + 8 * x, acc[r][x]);
}

// s[(r0 + r) * kBlock + b] = <q[r0 + r], k_b> for MR rows (q row-major, q + r * D) and the keys of nv
// vectors of 8, the keys in lanes (kT[d * kBlock + b]). Per d: MR broadcasts and 4 loads feed 4 MR
// accumulators (MR = 3 fills the 16 registers).
template <int MR>
inline void scores_keys_tile(const float * q, int D, int r0, const float * kT, int nv, float * s) {
    __m256 acc[MR][4];
    PSE_UNROLL
    for (int r = 0; r < MR; ++r)
        PSE_UNROLL
        for (int x = 0; x < 4; ++x) acc[r][x] = _mm256_setzero_ps();
    for (int d = 0; d < D; ++d) {
        __m256 qb[MR];
        PSE_UNROLL
        for (int r = 0; r < MR; ++r) qb[r] = _mm256_broadcast_ss(q + (size_t) (r0 + r) * D + d);
        PSE_UNROLL
        for (int x = 0; x < 4; ++x) {
            const __m256 kv = _mm256_loadu_ps(kT + (size_t) d * kBlock + 8 * x);
            PSE_UNROLL
            for (int r = 0; r < MR; ++r) acc[r][x] = _mm256_fmadd_ps(kv, qb[r], acc[r][x]);
        }
    }
    for (int r = 0; r < MR; ++r)
        for (int x = 0; x < nv; ++x) _mm256_storeu_ps(s + (size_t) (r0 + r) * kBlock + 8 * x, acc[r][x]);
}

// The 8x8 block r (row i in r[i]) transposed, stored at dst (column c at dst + c * kBlock).
inline void store_transposed(__m256 r[8], float * dst) {
    __m256 t[8];
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
        t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        r[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
        r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
        r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    // r[i], i < 4: column i of rows 0-3 in its low half, column i + 4 in its high; r[i + 4]: rows 4-7.
    for (int i = 0; i < 4; ++i) {
        _mm256_storeu_ps(dst + (size_t) i * kBlock, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
        _mm256_storeu_ps(dst + (size_t) (i + 4) * kBlock, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
    }
}

// dst[d * kBlock + b] = row b's value d for keys b0 <= b < nbp and d < D (both multiples of 8), 8x8
// at a time, each row widened by Rows::load8; row b at src + b * ld bytes (rows nb .. nbp are zero).
template <typename Rows>
inline void transpose_rows(const char * src, size_t ld, int nb, float * dst, int D, int b0, int nbp) {
    for (; b0 < nbp; b0 += 8) {
        for (int d0 = 0; d0 < D; d0 += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) r[i] = b0 + i < nb ? Rows::load8(src + (b0 + i) * ld, d0) : _mm256_setzero_ps();
            store_transposed(r, dst + (size_t) d0 * kBlock + b0);
        }
    }
}

// The same for every key of a block: dst[d * kBlock + b] = row b's value d.
template <typename Rows>
inline void transpose_block(const char * src, size_t ld, int nb, float * dst, int D, int nbp) {
    transpose_rows<Rows>(src, ld, nb, dst, D, 0, nbp);
}

// q8_0: 8 keys' int8 values are transposed as bytes (three rounds of unpacking, on 8 bytes a row
// rather than 32) and widened after, a column at a time times the 8 keys' scales: a third fewer
// instructions than widening row by row, and the same values (q * d is exact in f32). D is a
// multiple of 32 (kv_cache allows q8_0 only then); a tail of fewer than 8 keys goes row by row.
template <>
inline void transpose_block<q8_0_rows>(const char * src, size_t ld, int nb, float * dst, int D, int nbp) {
    using Q = q8_0_rows;
    int b0 = 0;
    for (; b0 + 8 <= nb; b0 += 8) {
        for (int blk = 0; blk < D / Q::kValues; ++blk) {
            const int8_t * q[8];
            alignas(16) ggml_fp16_t scale[8];
            for (int i = 0; i < 8; ++i) {
                const char * b = Q::block(src + (size_t) (b0 + i) * ld, blk * Q::kValues);
                scale[i] = Q::scale(b);
                q[i] = Q::values(b);
            }
            const __m256 scales = _mm256_cvtph_ps(_mm_load_si128((const __m128i *) scale));
            for (int j = 0; j < Q::kValues; j += 8) {
                __m128i r[8];
                for (int i = 0; i < 8; ++i) r[i] = _mm_loadl_epi64((const __m128i *) (q[i] + j));
                // pairs of rows interleaved byte by byte, then 2 bytes at a time, then 4: each
                // register ends with two columns of 8 keys (columns 2c and 2c + 1 in cols[c])
                const __m128i a0 = _mm_unpacklo_epi8(r[0], r[1]), a1 = _mm_unpacklo_epi8(r[2], r[3]);
                const __m128i a2 = _mm_unpacklo_epi8(r[4], r[5]), a3 = _mm_unpacklo_epi8(r[6], r[7]);
                const __m128i c0 = _mm_unpacklo_epi16(a0, a1), c1 = _mm_unpackhi_epi16(a0, a1);
                const __m128i c2 = _mm_unpacklo_epi16(a2, a3), c3 = _mm_unpackhi_epi16(a2, a3);
                const __m128i cols[4] = {_mm_unpacklo_epi32(c0, c2), _mm_unpackhi_epi32(c0, c2),
                                         _mm_unpacklo_epi32(c1, c3), _mm_unpackhi_epi32(c1, c3)};
                float * out = dst + (size_t) (blk * Q::kValues + j) * kBlock + b0;
                for (int c = 0; c < 4; ++c) {
                    const __m256 lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(cols[c]));
                    const __m256 hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_unpackhi_epi64(cols[c], cols[c])));
                    _mm256_storeu_ps(out + (size_t) (2 * c) * kBlock, _mm256_mul_ps(lo, scales));
                    _mm256_storeu_ps(out + (size_t) (2 * c + 1) * kBlock, _mm256_mul_ps(hi, scales));
                }
            }
        }
    }
    transpose_rows<Q>(src, ld, nb, dst, D, b0, nbp);
}

// exp(x) for 8 lanes; x below -87 (an invisible key, -inf) gives exactly 0.
// exp(x) = 2^k * e^r with k = round(x / ln 2), |r| <= ln2 / 2, e^r by its Taylor series to r^7.
inline __m256 exp8(__m256 x) {
    const __m256 lo = _mm256_set1_ps(-87.0f), log2e = _mm256_set1_ps(1.44269504088896341f);
    const __m256 ln2_hi = _mm256_set1_ps(0.693359375f), ln2_lo = _mm256_set1_ps(-2.12194440e-4f);
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
    return _mm256_andnot_ps(dead, _mm256_mul_ps(p, _mm256_castsi256_ps(e)));
}
#endif

// ---- one block of keys -----------------------------------------------------------------------

// A tile's query rows, packed once per work item, and its running softmax state.
struct tile_state {
    int n_rows = 0, NR = 0, D = 0;
    bool keys_in_lanes = false;     // the layout for fewer than 8 rows (see above)
    std::vector<float> qg_t, qn_t;  // [D][NR]: queries (scaled) rotated to grouped / own positions;
                                    // with keys in lanes [n_rows][D]
    std::vector<int32_t> pos;       // [NR]: each row's absolute position (padding lanes: row 0's)
    std::vector<float> m, l, alpha; // [NR]: running max and sum of exp, this block's rescale factor
    std::vector<float> o;           // [n_rows][D]: running sum of p * V
    std::vector<float> sg, sn;      // one block's scores [kBlock][NR] against grouped / neighbor keys
                                    // (keys in lanes: [n_rows][kBlock])

    // Where the score of key b for row r is kept.
    size_t at(int b, int r) const { return keys_in_lanes ? (size_t) r * kBlock + b : (size_t) b * NR + r; }

    void init(int D_, int max_rows) {
        D = D_;
        const int max_nr = (max_rows + kLanes - 1) / kLanes * kLanes;
        for (auto * b : {&qg_t, &qn_t, &o}) b->assign((size_t) D * max_nr, 0.0f);
        for (auto * b : {&m, &l, &alpha}) b->assign(max_nr, 0.0f);
        pos.assign(max_nr, 0);
        for (auto * b : {&sg, &sn}) b->assign((size_t) kBlock * max_nr, 0.0f);
    }
};

// s[b * NR + r] = <q_r, k_b> for keys b < nbp (a multiple of 8; key b at k + b * ld) and every row.
void block_scores(const tile_state & ts, const float * q_t, const float * k, int ld, int nbp, float * s) {
    const int D = ts.D, NR = ts.NR;
#if PSE_AVX2
    if (ts.keys_in_lanes) {  // q row-major, k transposed (kT[d * kBlock + b])
        int r0 = 0;
        for (; r0 + 3 <= ts.n_rows; r0 += 3) scores_keys_tile<3>(q_t, D, r0, k, nbp / 8, s);
        if (ts.n_rows - r0 == 2) scores_keys_tile<2>(q_t, D, r0, k, nbp / 8, s);
        else if (ts.n_rows - r0 == 1) scores_keys_tile<1>(q_t, D, r0, k, nbp / 8, s);
        return;
    }
    int r0 = 0;
    for (; r0 + 24 <= NR; r0 += 24)
        for (int b = 0; b < nbp; b += 4) scores_tile<3, 4>(q_t, NR, r0, k, ld, D, b, s);
    if (NR - r0 == 16)
        for (int b = 0; b < nbp; b += 4) scores_tile<2, 4>(q_t, NR, r0, k, ld, D, b, s);
    else if (NR - r0 == 8)
        for (int b = 0; b < nbp; b += 8) scores_tile<1, 8>(q_t, NR, r0, k, ld, D, b, s);
#else
    // The same sums in the same order, one lane at a time; the inner loop runs over contiguous
    // lanes, which compilers vectorize.
    for (int b = 0; b < nbp; ++b) {
        float * sb = s + (size_t) b * NR;
        std::fill(sb, sb + NR, 0.0f);
        for (int d = 0; d < D; ++d) {
            const float kv = k[(size_t) b * ld + d];
            const float * qd = q_t + (size_t) d * NR;
            for (int r = 0; r < NR; ++r) sb[r] += kv * qd[r];
        }
    }
#endif
}

// o[r] += sum_b p[ts.at(b, r)] * v[b] for every row, over nb values (value row b at v + b * ld bytes,
// read by VRows).
template <typename VRows>
void block_accumulate(tile_state & ts, const float * p, const char * v, size_t ld, int nb) {
    const int D = ts.D, n = ts.n_rows;
    float * o = ts.o.data();
#if PSE_AVX2
    const size_t bs = ts.at(1, 0) - ts.at(0, 0), rs = ts.at(0, 1) - ts.at(0, 0);  // p's strides
    if (D % 32 == 0) {
        for (int d0 = 0; d0 < D; d0 += 32) {
            int r0 = 0;
            for (; r0 + 3 <= n; r0 += 3) accumulate_tile<3, 4, VRows>(o, D, r0, d0, p, bs, rs, v, ld, nb);
            for (; r0 < n; ++r0) accumulate_tile<1, 4, VRows>(o, D, r0, d0, p, bs, rs, v, ld, nb);
        }
        return;
    }
    if (D % 8 == 0) {
        for (int d0 = 0; d0 < D; d0 += 8) {
            int r0 = 0;
            for (; r0 + 3 <= n; r0 += 3) accumulate_tile<3, 1, VRows>(o, D, r0, d0, p, bs, rs, v, ld, nb);
            for (; r0 < n; ++r0) accumulate_tile<1, 1, VRows>(o, D, r0, d0, p, bs, rs, v, ld, nb);
        }
        return;
    }
#endif
    for (int r = 0; r < n; ++r) {
        float * orow = o + (size_t) r * D;
        for (int b = 0; b < nb; ++b) {
            const float pb = p[ts.at(b, r)];
            if (pb == 0.0f) continue;
            const char * vb = v + b * ld;
            for (int d = 0; d < D; ++d) orow[d] += pb * VRows::value(vb, d);
        }
    }
}

// Hides what a row may not see and picks each score's kind: key j is grouped for the row at
// position i when i - j >= W, a neighbor when 0 <= i - j < W, invisible when j > i or j is past
// the block's nb keys. sg (grouped scores, or null) and sn (neighbor scores, or null) merge into s.
void block_mask(tile_state & ts, float * s, const float * sg, const float * sn, int32_t j0, int nb, int nbp,
                int32_t W) {
    const int n = ts.keys_in_lanes ? ts.n_rows : ts.NR;
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int b = 0; b < nbp; ++b) {
        const int32_t j = j0 + b;
        for (int r = 0; r < n; ++r) {
            const int32_t i = ts.pos[r];
            const bool visible = b < nb && j <= i;
            const size_t at = ts.at(b, r);
            s[at] = visible ? ((sg && (!sn || i - j >= W)) ? sg[at] : sn[at]) : neg_inf;
        }
    }
}

// The online softmax over one block: p = exp(s - m') in place, m and l updated, alpha = exp(m - m')
// for rescaling o. A row that has seen no visible key yet keeps m = -inf and p = 0.
void block_softmax(tile_state & ts, float * s, int nbp) {
    const int NR = ts.NR;
    float * m = ts.m.data(), * l = ts.l.data(), * alpha = ts.alpha.data();
#if PSE_AVX2
    const __m256 neg_inf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    // Keys in lanes: the same operations on each row's values, and its sum key by key (the rows'
    // sums side by side: one row's alone would wait on each add).
    if (ts.keys_in_lanes) {
        const int n = ts.n_rows;
        float sum[kLanes] = {};
        for (int r = 0; r < n; ++r) {
            float * sr = s + (size_t) r * kBlock;
            __m256 mb = neg_inf;
            for (int b = 0; b < nbp; b += 8) mb = _mm256_max_ps(mb, _mm256_loadu_ps(sr + b));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mb), _mm256_extractf128_ps(mb, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float m_new = std::max(_mm_cvtss_f32(h), m[r]);
            const float shift = m_new == -std::numeric_limits<float>::infinity() ? 0.0f : m_new;
            alpha[r] = _mm256_cvtss_f32(exp8(_mm256_set1_ps(m[r] - shift)));
            m[r] = m_new;
            for (int b = 0; b < nbp; b += 8)
                _mm256_storeu_ps(sr + b, exp8(_mm256_sub_ps(_mm256_loadu_ps(sr + b), _mm256_set1_ps(shift))));
        }
        for (int b = 0; b < nbp; ++b)
            for (int r = 0; r < n; ++r) sum[r] += s[(size_t) r * kBlock + b];
        for (int r = 0; r < n; ++r) l[r] = std::fma(l[r], alpha[r], sum[r]);
    }
    for (int r = 0; !ts.keys_in_lanes && r < NR; r += 8) {
        __m256 mb = neg_inf;
        for (int b = 0; b < nbp; ++b) mb = _mm256_max_ps(mb, _mm256_loadu_ps(s + (size_t) b * NR + r));
        const __m256 m_old = _mm256_loadu_ps(m + r);
        const __m256 m_new = _mm256_max_ps(m_old, mb);
        const __m256 shift = _mm256_andnot_ps(_mm256_cmp_ps(m_new, neg_inf, _CMP_EQ_OQ), m_new);  // -inf -> 0
        const __m256 a = exp8(_mm256_sub_ps(m_old, shift));
        __m256 sum = _mm256_setzero_ps();
        for (int b = 0; b < nbp; ++b) {
            float * sb = s + (size_t) b * NR + r;
            const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(sb), shift));
            _mm256_storeu_ps(sb, p);
            sum = _mm256_add_ps(sum, p);
        }
        _mm256_storeu_ps(l + r, _mm256_fmadd_ps(_mm256_loadu_ps(l + r), a, sum));
        _mm256_storeu_ps(m + r, m_new);
        _mm256_storeu_ps(alpha + r, a);
    }
#else
    const float neg_inf = -std::numeric_limits<float>::infinity();
    for (int r = 0; r < NR; ++r) {
        float mb = neg_inf;
        for (int b = 0; b < nbp; ++b) mb = std::max(mb, s[(size_t) b * NR + r]);
        const float m_new = std::max(m[r], mb), shift = m_new == neg_inf ? 0.0f : m_new;
        const float a = std::exp(m[r] - shift);
        float sum = 0.0f;
        for (int b = 0; b < nbp; ++b) {
            float & x = s[(size_t) b * NR + r];
            x = std::exp(x - shift);
            sum += x;
        }
        l[r] = l[r] * a + sum;
        m[r] = m_new;
        alpha[r] = a;
    }
#endif
    for (int r = 0; r < ts.n_rows; ++r) {
        if (alpha[r] == 1.0f) continue;
        float * orow = ts.o.data() + (size_t) r * ts.D;
        for (int d = 0; d < ts.D; ++d) orow[d] *= alpha[r];
    }
}

// One block of keys for every KV head, in f32: K rotated to grouped positions, neighbor keys, and V,
// [kBlock][n_head_kv * D] (with keys in lanes, only the neighbor keys: K goes to kgT and V is read
// in place). A token's heads lie side by side in the cache, so converting a block for every head
// at once reads the cache as one stream, where one head at a time would read a stride.
struct block_rows {
    int ld = 0;                // n_head_kv * D: from one key's row to the next
    std::vector<float> kg, kn, v;
    std::vector<float> kgT, knT;  // for tiles with keys in lanes: K transposed, [n_head_kv][D][kBlock]
    // With keys in lanes, V is read where it is in the cache (row b of head g at
    // v_direct + b * v_ld + g * v_head bytes): each value serves one group of rows, so a converted
    // copy would only add a pass.
    const char * v_direct = nullptr;
    size_t v_ld = 0, v_head = 0;
    int32_t j0 = 0;            // the block's first key
    int nb = 0, nbp = 0;       // its keys, and that rounded up to a multiple of 8 (scores 8 at a time)
    bool any_grp = false, any_nb = false;  // whether some row of the tile sees a grouped / neighbor key
};

// Where the cache's rows are: K (rotated to grouped positions), the neighbor keys (a ring, or rows
// from nb_lo) and V, a row per token at its stride, head g at g times the head stride.
struct cache_rows {
    const char * k, * k_nb, * v;
    size_t k_stride, nb_stride, v_stride;     // bytes from one token's row to the next
    size_t k_head, nb_head, v_head;           // bytes from one head's row to the next
    int32_t nb_lo, ring;                      // see selfextend_op_params
};

// Whether a query at or before i_max sees some key from j0 on grouped (at distance >= W).
inline bool sees_grouped(int32_t j0, int32_t i_max, int32_t W) { return j0 <= i_max - W; }

// Converts keys [j0, j0 + nb) of every head, only the kinds some row of the tile needs (a query
// at i sees key j grouped when i - j >= W, as a neighbor when 0 <= i - j < W).
template <typename KRows, typename NbRows, typename VRows>
void load_block(block_rows & br, const cache_rows & c, int n_head_kv, int D, int32_t W, int32_t j0, int nb,
                int32_t i_min, int32_t i_max, bool transpose, const KRows & k_row, const NbRows & nb_row,
                const VRows & v_row) {
    const int nbp = (nb + 7) & ~7;  // the tail keys are zero
    const int32_t j_last = j0 + nb - 1;
    br.j0 = j0;
    br.nb = nb;
    br.nbp = nbp;
    br.any_grp = sees_grouped(j0, i_max, W);
    br.any_nb = W > 0 && j_last > i_min - W && j0 <= i_max;
    // Keys in lanes (an AVX2 layout): K goes from the cache straight to its transposed block, V
    // stays where it is (see block_rows); both are widened to f32 as they are read.
    const bool direct = transpose;
    br.v_direct = direct ? c.v + (size_t) j0 * c.v_stride : nullptr;
    br.v_ld = c.v_stride;
    br.v_head = c.v_head;
    for (int b = 0; b < nb; ++b) {
        const int32_t j = j0 + b;
        for (int g = 0; g < n_head_kv; ++g) {
            const size_t at = (size_t) b * br.ld + (size_t) g * D;
            if (br.any_grp && !direct) k_row(br.kg.data() + at, c.k + (size_t) j * c.k_stride + g * c.k_head, D);
            if (br.any_nb) {
                const size_t row = c.ring > 0 ? (size_t) (j % c.ring) : (size_t) (j - c.nb_lo);
                if (j >= c.nb_lo) nb_row(br.kn.data() + at, c.k_nb + row * c.nb_stride + g * c.nb_head, D);
                else std::fill(br.kn.data() + at, br.kn.data() + at + D, 0.0f);  // never a neighbor here
            }
            if (!direct) v_row(br.v.data() + at, c.v + (size_t) j * c.v_stride + g * c.v_head, D);
        }
    }
    auto zero_tail = [&](std::vector<float> & buf) {  // keys nb .. nbp
        std::fill(buf.begin() + (size_t) nb * br.ld, buf.begin() + (size_t) nbp * br.ld, 0.0f);
    };
    zero_tail(br.kn);
    if (!direct) zero_tail(br.kg);
#if PSE_AVX2
    for (int g = 0; direct && g < n_head_kv; ++g) {
        const size_t col = (size_t) g * D, head = (size_t) g * D * kBlock;
        if (br.any_grp)
            transpose_block<KRows>(c.k + (size_t) j0 * c.k_stride + g * c.k_head, c.k_stride, nb, br.kgT.data() + head, D, nbp);
        if (br.any_nb)
            transpose_block<f32_rows>((const char *) (br.kn.data() + col), br.ld * sizeof(float), nbp, br.knT.data() + head, D, nbp);
    }
#endif
}

// Asks for the `bytes` at base + j * stride, for rows j in [j0, j0 + n), to be brought into the
// cache. A block reads its rows head by head, and V in halves of a head, at the row stride: runs
// of 32 loads, too short for the hardware prefetcher to learn. Without this, decoding spent most
// of its time waiting for V (perf, 2-layer model with SmolLM2's attention at 32k keys).
inline void prefetch_rows(const char * base, size_t stride, size_t bytes, int32_t j0, int n) {
    for (int b = 0; b < n; ++b) {
        const char * row = base + (size_t) (j0 + b) * stride;
        for (size_t at = 0; at < bytes; at += 64) __builtin_prefetch(row + at, 0, 3);
    }
}

// Folds the block of KV head g into every row of its tile.
template <typename VRows>
void attend_block(tile_state & ts, const block_rows & br, int g, int32_t W, int32_t i_min) {
    const size_t col = (size_t) g * ts.D;
    if (ts.keys_in_lanes) {
        const size_t head = (size_t) g * ts.D * kBlock;
        if (br.any_grp) block_scores(ts, ts.qg_t.data(), br.kgT.data() + head, kBlock, br.nbp, ts.sg.data());
        if (br.any_nb) block_scores(ts, ts.qn_t.data(), br.knT.data() + head, kBlock, br.nbp, ts.sn.data());
    } else {
        if (br.any_grp) block_scores(ts, ts.qg_t.data(), br.kg.data() + col, br.ld, br.nbp, ts.sg.data());
        if (br.any_nb) block_scores(ts, ts.qn_t.data(), br.kn.data() + col, br.ld, br.nbp, ts.sn.data());
    }
    float * s = br.any_grp ? ts.sg.data() : ts.sn.data();
    // Only the blocks where the kinds meet, or the causal edge, or the range's end need a mask.
    if ((br.any_grp && br.any_nb) || br.j0 + br.nb - 1 > i_min || br.nb < br.nbp) {
        block_mask(ts, s, br.any_grp ? ts.sg.data() : nullptr, br.any_nb ? ts.sn.data() : nullptr, br.j0, br.nb,
                   br.nbp, W);
    }
    block_softmax(ts, s, br.nbp);
    if (br.v_direct) block_accumulate<VRows>(ts, s, br.v_direct + g * br.v_head, br.v_ld, br.nb);
    else block_accumulate<f32_rows>(ts, s, (const char *) (br.v.data() + col), br.ld * sizeof(float), br.nb);
}

// ---- the work split --------------------------------------------------------------------------

// One thread's tile states (one per KV head) and block of converted rows, sized for a shape.
struct kernel_scratch {
    int n_head_kv = 0, D = 0, max_rows = 0;
    std::vector<tile_state> heads;
    block_rows br;

    void fit(int n_head_kv_, int D_, int max_rows_) {
        if (n_head_kv_ == n_head_kv && D_ == D && max_rows_ == max_rows) return;
        n_head_kv = n_head_kv_, D = D_, max_rows = max_rows_;
        heads.assign(n_head_kv, tile_state());
        for (tile_state & ts : heads) ts.init(D, max_rows);
        br.ld = n_head_kv * D;
        for (auto * buf : {&br.kg, &br.kn, &br.v, &br.kgT, &br.knT}) buf->assign((size_t) kBlock * br.ld, 0.0f);
    }
};

// Each thread's buffers outlive the call: allocating and zeroing them anew for every layer of
// every decoding step is work the step need not do. Every value is written before it is read.
// Not inlined: in a shared library a thread_local is reached through __tls_get_addr, and GCC,
// counting its address cheap to recompute, called it again for every cache row converted (7% of
// decoding at 32k); through an opaque call the address is taken once.
[[gnu::noinline]] kernel_scratch & thread_scratch() {
    thread_local kernel_scratch scratch;
    return scratch;
}

constexpr int kTile = 32;  // tokens whose queries share one pass over the keys (prefill)

// A work item is a tile of up to kTile tokens and a chunk of the keys, for every KV head: the
// heads' rows of one token lie side by side in the cache, so taking every head's block in turn
// reads the cache as one stream instead of a strided third (or less) of it per pass.
template <typename KRows, typename NbRows, typename VRows>
void selfextend_forward(ggml_tensor * dst, int ith, int nth, const selfextend_op_params & p, const KRows & k_row,
                        const NbRows & nb_row, const VRows & v_row) {
    const ggml_tensor * q_n = dst->src[0], * q_g = dst->src[1];
    const ggml_tensor * k = dst->src[2], * v = dst->src[3], * k_nb = dst->src[4];  // k_nb null when W = 0
    const int D = (int) q_n->ne[0], n_head = (int) q_n->ne[1], n_head_kv = (int) k->ne[1];
    const int R = n_head / n_head_kv;
    // Keys that exist for this batch; the cache view k may span more rows (a graph serves several
    // positions), which the chunks leave out.
    const int32_t T = p.n_tokens, n_kv = p.n_past + T, C = p.n_chunks, W = p.window;
    const bool partial = C > 1;
    const int32_t n_tiles = (T + kTile - 1) / kTile;
    const cache_rows cache{(const char *) k->data, k_nb ? (const char *) k_nb->data : nullptr, (const char *) v->data,
                           (size_t) k->nb[2], k_nb ? (size_t) k_nb->nb[2] : 0, (size_t) v->nb[2],
                           (size_t) k->nb[1], k_nb ? (size_t) k_nb->nb[1] : 0, (size_t) v->nb[1], p.nb_lo, p.ring_size};
    // Sized for this batch's tiles: a decoding step's few rows in buffers sized for a prefill tile
    // lie farther apart, and decoding at 16k measured 3% slower so.
    kernel_scratch & scratch = thread_scratch();
    scratch.fit(n_head_kv, D, std::min<int32_t>(T, kTile) * R);
    block_rows & br = scratch.br;
    std::vector<tile_state> & heads = scratch.heads;

    const int64_t n_items = (int64_t) n_tiles * C;
    for (int64_t item = ith; item < n_items; item += nth) {
        const int32_t c = (int32_t) (item % C);
        const int32_t t0 = (int32_t) (item / C) * kTile, t1 = std::min(T, t0 + kTile);
        const bool few_rows = (t1 - t0) * R < kLanes;  // decoding: the R query heads of one token
#if PSE_AVX2
        const bool keys_in_lanes = few_rows && D % 8 == 0;
#else
        const bool keys_in_lanes = false;
#endif

        for (int g = 0; g < n_head_kv; ++g) {
            // Pack the tile's queries, scaled by 1/sqrt(D), row r = (t - t0) * R + head - g * R.
            tile_state & ts = heads[g];
            ts.n_rows = (t1 - t0) * R;
            ts.NR = (ts.n_rows + kLanes - 1) / kLanes * kLanes;
            ts.keys_in_lanes = keys_in_lanes;
            for (int r = 0; r < ts.NR; ++r) {
                const int rr = r < ts.n_rows ? r : 0;  // padding lanes repeat row 0
                const int32_t t = t0 + rr / R;
                const int h = g * R + rr % R;
                const float * qn = (const float *) ((const char *) q_n->data + t * q_n->nb[2] + h * q_n->nb[1]);
                const float * qg = (const float *) ((const char *) q_g->data + t * q_g->nb[2] + h * q_g->nb[1]);
                const size_t at = keys_in_lanes ? (size_t) r * D : r, step = keys_in_lanes ? 1 : ts.NR;
                for (int d = 0; d < D && (r < ts.n_rows || !keys_in_lanes); ++d) {
                    if (W > 0) ts.qn_t[at + d * step] = qn[d] * p.scale;  // W = 0: no neighbor scores
                    ts.qg_t[at + d * step] = qg[d] * p.scale;
                }
                ts.pos[r] = p.n_past + t;
            }
            std::fill(ts.m.begin(), ts.m.begin() + ts.NR, -std::numeric_limits<float>::infinity());
            std::fill(ts.l.begin(), ts.l.begin() + ts.NR, 0.0f);
            std::fill(ts.o.begin(), ts.o.begin() + (size_t) ts.n_rows * D, 0.0f);
        }

        // This chunk's keys, up to the last query's causal limit.
        const int32_t lo = (int32_t) ((int64_t) n_kv * c / C);
        const int32_t hi = std::min<int32_t>((int32_t) ((int64_t) n_kv * (c + 1) / C), p.n_past + t1);
        const int32_t i_min = p.n_past + t0, i_max = p.n_past + t1 - 1;
        for (int32_t j0 = lo; j0 < hi; j0 += kBlock) {
            const int nb = std::min<int32_t>(kBlock, hi - j0);
            load_block(br, cache, n_head_kv, D, W, j0, nb, i_min, i_max, keys_in_lanes, k_row, nb_row, v_row);
            // Decoding: the next block's K (if some row sees it grouped) and V, head by head while
            // this one is worked on: all at once, the requests queue up and the core waits on them.
            // A prefill tile works long enough on a block for the hardware to fetch the next, and
            // asking made it 4% slower (the 2-layer model at 16k).
            const int32_t next = j0 + kBlock;
            const int n_next = few_rows && next < hi ? std::min<int32_t>(kBlock, hi - next) : 0;
            for (int g = 0; g < n_head_kv; ++g) {
                if (n_next > 0 && sees_grouped(next, i_max, W))
                    prefetch_rows(cache.k + g * cache.k_head, cache.k_stride, cache.k_head, next, n_next);
                if (n_next > 0) prefetch_rows(cache.v + g * cache.v_head, cache.v_stride, cache.v_head, next, n_next);
                attend_block<VRows>(heads[g], br, g, W, i_min);
            }
        }

        for (int g = 0; g < n_head_kv; ++g) {
            const tile_state & ts = heads[g];
            for (int r = 0; r < ts.n_rows; ++r) {
                const int32_t t = t0 + r / R;
                const int h = g * R + r % R;
                const float * acc = ts.o.data() + (size_t) r * D;
                if (partial) {
                    float * out = (float *) ((char *) dst->data + c * dst->nb[3] + t * dst->nb[2] + h * dst->nb[1]);
                    std::memcpy(out, acc, sizeof(float) * D);
                    out[D] = ts.m[r];
                    out[D + 1] = ts.l[r];
                } else {
                    float * out = (float *) ((char *) dst->data + t * dst->nb[2] + h * dst->nb[1]);
                    const float inv = ts.l[r] > 0.0f ? 1.0f / ts.l[r] : 0.0f;
                    for (int d = 0; d < D; ++d) out[d] = acc[d] * inv;
                }
            }
        }
    }
}

void selfextend_op(ggml_tensor * dst, int ith, int nth, void * userdata) {
    const selfextend_op_params & p = *(const selfextend_op_params *) userdata;
    // The cache types the engine allows (kv_cache::type_from_name): f16 or f32 throughout, or a
    // q8_0 K/V with an f16 neighbor ring. Without neighbor keys (W = 0) only K and V choose.
    const ggml_type tk = dst->src[2]->type, tv = dst->src[3]->type;
    const ggml_tensor * k_nb = dst->src[4];
    auto nb_is = [k_nb](ggml_type t) { return k_nb == nullptr || k_nb->type == t; };
    if (tk == GGML_TYPE_F16 && tv == GGML_TYPE_F16 && nb_is(GGML_TYPE_F16)) {
        selfextend_forward(dst, ith, nth, p, f16_rows{}, f16_rows{}, f16_rows{});
    } else if (tk == GGML_TYPE_F32 && tv == GGML_TYPE_F32 && nb_is(GGML_TYPE_F32)) {
        selfextend_forward(dst, ith, nth, p, f32_rows{}, f32_rows{}, f32_rows{});
    } else if (tk == GGML_TYPE_Q8_0 && tv == GGML_TYPE_Q8_0 && nb_is(GGML_TYPE_F16) &&
               ggml_blck_size(GGML_TYPE_Q8_0) == q8_0_rows::kValues && ggml_type_size(GGML_TYPE_Q8_0) == q8_0_rows::kBytes) {
        selfextend_forward(dst, ith, nth, p, q8_0_rows{}, f16_rows{}, q8_0_rows{});
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

int32_t selfextend_choose_chunks(int32_t n_tokens, int32_t n_kv, int n_threads) {
    const int64_t items = (n_tokens + kTile - 1) / kTile;  // a tile takes every KV head
    const int64_t want = 2 * (int64_t) std::max(1, n_threads);  // enough items to balance threads
    if (items >= want) return 1;
    int64_t c = (want + items - 1) / items;
    c = std::min<int64_t>(c, std::max<int64_t>(1, n_kv / 256));  // chunks of at least 256 keys
    return (int32_t) std::max<int64_t>(1, c);
}

ggml_tensor * selfextend_attention_fused(ggml_context * ctx, ggml_tensor * q_n, ggml_tensor * q_g,
                                         ggml_tensor * k, ggml_tensor * v, ggml_tensor * k_nb,
                                         const selfextend_op_params * p) {
    GGML_ASSERT((k_nb == nullptr) == (p->window == 0));
    ggml_tensor * args[] = {q_n, q_g, k, v, k_nb};
    const int n_args = k_nb ? 5 : 4;
    const int64_t D = q_n->ne[0], n_head = q_n->ne[1], T = q_n->ne[2];
    if (p->n_chunks <= 1) {
        return ggml_custom_4d(ctx, GGML_TYPE_F32, D, n_head, T, 1, args, n_args, selfextend_op, GGML_N_TASKS_MAX,
                              (void *) p);
    }
    ggml_tensor * part = ggml_custom_4d(ctx, GGML_TYPE_F32, D + 2, n_head, T, p->n_chunks, args, n_args, selfextend_op,
                                        GGML_N_TASKS_MAX, (void *) p);
    return ggml_custom_4d(ctx, GGML_TYPE_F32, D, n_head, T, 1, &part, 1, selfextend_merge_op, GGML_N_TASKS_MAX,
                          nullptr);
}

}  // namespace pse
