#include "attention.h"

#include <algorithm>
#include <climits>
#include <cmath>
#include <stdexcept>
#include <string>
#include <vector>

namespace pse {

int64_t selfextend_usable_length(int32_t n_ctx_train, int32_t group_size, int32_t window) {
    return (int64_t) (n_ctx_train - window) * group_size + window;
}

void check_selfextend(int32_t n_ctx, int32_t L, int32_t G, int32_t W) {
    if (G < 1) throw std::invalid_argument("group_size must be >= 1, got " + std::to_string(G));
    if ((W != 0 || (G > 1 && n_ctx > 0)) && (W < 1 || W >= L)) {
        throw std::invalid_argument("window must be in [1, " + std::to_string(L - 1) + "] (below the trained context " +
                                    std::to_string(L) + "), got " + std::to_string(W));
    }
    if (G > 1 && n_ctx > 0) {
        const int64_t reach = selfextend_usable_length(L, G, W);
        if (reach < n_ctx) {
            throw std::invalid_argument("SelfExtend with group_size=" + std::to_string(G) + ", window=" +
                                        std::to_string(W) + " reaches (L - W) * G + W = " + std::to_string(reach) +
                                        " tokens (L=" + std::to_string(L) + "), less than n_ctx=" +
                                        std::to_string(n_ctx) + "; raise group_size or lower window");
        }
    }
}

int32_t selfextend_ring_size(int32_t group_size, int32_t window, attention_path path, int32_t n_batch) {
    if (group_size <= 1 || path != attention_path::fused) return 0;
    const int64_t ring = (int64_t) window + n_batch;
    if (ring > INT32_MAX) throw std::invalid_argument("window + n_batch is out of range");
    return (int32_t) ring;
}

int32_t selfextend_first_neighbor(int32_t n_past, int32_t window) { return std::max(0, n_past - window + 1); }

int32_t attention_graph_n_kv(const attention_config & cfg, int32_t n_past, int32_t n_tokens) {
    return std::min<int32_t>(cfg.n_ctx, GGML_PAD(n_past + n_tokens, 256));
}

bool attention_batch_fits(const attention_batch & b, int32_t n_past, int32_t n_tokens) {
    return n_tokens == b.n_tokens && attention_graph_n_kv(b.cfg, n_past, n_tokens) == b.n_kv;
}

namespace {

// The ring rows of positions lo .. lo + n - 1.
std::vector<int64_t> ring_rows(int32_t lo, int32_t n, int32_t ring_size) {
    std::vector<int64_t> rows(n);
    for (int32_t i = 0; i < n; ++i) rows[i] = (lo + i) % ring_size;
    return rows;
}

// What depends on the batch's position (a reused graph gets a new one).
void place_batch(attention_batch & b, int32_t n_past) {
    b.n_past = b.se.n_past = n_past;
    b.se.nb_lo = selfextend_first_neighbor(n_past, b.cfg.window);
}

ggml_tensor * new_input(ggml_context * ctx, ggml_type type, int64_t ne0, int64_t ne1, const char * name) {
    ggml_tensor * t = ne1 > 0 ? ggml_new_tensor_2d(ctx, type, ne0, ne1) : ggml_new_tensor_1d(ctx, type, ne0);
    ggml_set_name(t, name);
    ggml_set_input(t);
    return t;
}

template <typename T>
void set_input(ggml_tensor * t, const std::vector<T> & v) {
    ggml_backend_tensor_set(t, v.data(), 0, v.size() * sizeof(T));
}

ggml_tensor * rope(ggml_context * ctx, ggml_tensor * x, ggml_tensor * pos, const rope_params & r) {
    return ggml_rope_ext(ctx, x, pos, r.freq_factors, r.n_rot, r.mode, r.n_ctx_orig, r.freq_base, r.freq_scale,
                         r.ext_factor, r.attn_factor, r.beta_fast, r.beta_slow);
}

// Rotating or transposing a quantized cache needs its values in f32 first.
ggml_tensor * as_f32_if_quantized(ggml_context * ctx, ggml_tensor * t) {
    return ggml_is_quantized(t->type) ? ggml_cast(ctx, t, GGML_TYPE_F32) : t;
}

}  // namespace

void build_ring_refill(ggml_context * ctx, ggml_cgraph * gf, kv_cache & cache, int il, int32_t lo, int32_t hi,
                       ggml_tensor * pos_delta, ggml_tensor * rows_in, const rope_params & rope_p, int32_t head_dim) {
    ggml_tensor * ck = cache.k[il];
    const int64_t n_head_kv = cache.n_embd_kv / head_dim;
    ggml_tensor * rows = ggml_view_3d(ctx, ck, head_dim, n_head_kv, hi - lo, ggml_row_size(ck->type, head_dim),
                                      ck->nb[1], (size_t) lo * ck->nb[1]);
    ggml_tensor * own = rope(ctx, as_f32_if_quantized(ctx, rows), pos_delta, rope_p);
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, cache.k_ring[il], ggml_reshape_2d(ctx, own, cache.n_embd_kv, hi - lo),
                                                rows_in));
}

void set_ring_refill_inputs(ggml_tensor * pos_delta, ggml_tensor * rows, int32_t lo, int32_t hi, int32_t group_size,
                            int32_t ring_size) {
    std::vector<int32_t> delta(hi - lo);
    for (int32_t j = lo; j < hi; ++j) delta[j - lo] = j - j / group_size;
    set_input(pos_delta, delta);
    set_input(rows, ring_rows(lo, hi - lo, ring_size));
}

void make_attention_batch(attention_batch & b, ggml_context * ctx, const attention_config & cfg,
                          int32_t n_head_kv, int32_t n_past, int32_t n_tokens) {
    b = attention_batch();  // nothing left over from the graph this one replaces
    b.cfg = cfg;
    place_batch(b, n_past);
    b.n_tokens = n_tokens;
    b.n_kv = attention_graph_n_kv(cfg, n_past, n_tokens);
    b.n_head_kv = n_head_kv;
    b.pos = new_input(ctx, GGML_TYPE_I32, n_tokens, 0, "inp_pos");
    b.rows = new_input(ctx, GGML_TYPE_I64, n_tokens, 0, "inp_cache_rows");
    // The fused kernel bounds each query's keys itself; ggml's ops need the causal mask.
    const bool fused = cfg.path == attention_path::fused;
    b.mask = fused ? nullptr : new_input(ctx, GGML_TYPE_F16, b.n_kv, n_tokens, "inp_kq_mask");
    // Ordinary attention on the fused path is the kernel with W = 0: every key scored against the
    // query at its own position (see selfextend_kernel.h).
    b.se.n_tokens = n_tokens;
    b.se.window = b.selfextend() ? cfg.window : 0;
    b.se.scale = cfg.kq_scale;
    b.se.ring_size = fused ? cfg.ring_size : 0;
    b.se.n_chunks = fused ? selfextend_choose_chunks(n_tokens, b.n_kv, cfg.n_threads) : 1;
    if (!b.selfextend()) return;

    b.pos_key = new_input(ctx, GGML_TYPE_I32, n_tokens, 0, "inp_pos_key");
    b.pos_query_grp = new_input(ctx, GGML_TYPE_I32, n_tokens, 0, "inp_pos_query_grp");
    if (b.se.ring_size > 0) b.ring_rows = new_input(ctx, GGML_TYPE_I64, n_tokens, 0, "inp_ring_rows");
    else b.pos_neighbor = new_input(ctx, GGML_TYPE_I32, b.n_kv, 0, "inp_pos_neighbor");
    if (cfg.path == attention_path::portable) b.select = new_input(ctx, GGML_TYPE_F32, b.n_kv, n_tokens, "inp_select");
}

void set_attention_batch_inputs(attention_batch & b, int32_t n_past) {
    place_batch(b, n_past);  // the graph may have been built for an earlier position
    const int32_t T = b.n_tokens, n_kv = b.n_kv, G = b.cfg.group_size, W = b.cfg.window;
    std::vector<int32_t> pos(T);
    std::vector<int64_t> rows(T);
    for (int32_t t = 0; t < T; ++t) pos[t] = rows[t] = b.n_past + t;
    set_input(b.pos, pos);
    set_input(b.rows, rows);

    if (b.mask) {
        // Causal: query n_past+t sees keys 0 .. n_past+t.
        const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
        std::vector<ggml_fp16_t> mask((size_t) n_kv * T);
        for (int32_t t = 0; t < T; ++t) {
            ggml_fp16_t * row = mask.data() + (size_t) t * n_kv;
            for (int32_t j = 0; j < n_kv; ++j) row[j] = j <= b.n_past + t ? zero : neg_inf;
        }
        ggml_backend_tensor_set(b.mask, mask.data(), 0, mask.size() * sizeof(ggml_fp16_t));
    }
    if (!b.selfextend()) return;

    std::vector<int32_t> key(T), query_grp(T);
    for (int32_t t = 0; t < T; ++t) {
        const int32_t i = b.n_past + t;
        key[t] = i / G;
        query_grp[t] = i / G + W - W / G;
    }
    set_input(b.pos_key, key);
    set_input(b.pos_query_grp, query_grp);
    if (b.ring_rows) set_input(b.ring_rows, ring_rows(b.n_past, T, b.se.ring_size));
    if (b.pos_neighbor) {
        std::vector<int32_t> neighbor(n_kv);
        for (int32_t j = 0; j < n_kv; ++j) neighbor[j] = j - j / G;
        set_input(b.pos_neighbor, neighbor);
    }

    if (b.select) {
        std::vector<float> sel((size_t) n_kv * T, 0.0f);
        for (int32_t t = 0; t < T; ++t) {
            const int32_t i = b.n_past + t;
            for (int32_t j = std::max(b.se.nb_lo, i - W + 1); j <= i; ++j) sel[(size_t) t * n_kv + j] = 1.0f;
        }
        ggml_backend_tensor_set(b.select, sel.data(), 0, sel.size() * sizeof(float));
    }
}

// Ordinary causal attention. On the CPU the fused kernel with W = 0, which scores the R query
// heads that share a KV head against each key as one tile: ggml's flash attention reads the keys
// once per query head, and with Qwen2.5's 7 heads per KV head it took twice the kernel's time at
// 12k cached tokens. Elsewhere ggml's flash attention.
static ggml_tensor * ordinary_attention(ggml_context * ctx, const attention_batch & b, ggml_tensor * q,
                                        ggml_tensor * kk, ggml_tensor * vv, float kq_scale) {
    if (b.cfg.path == attention_path::fused) return selfextend_attention_fused(ctx, q, q, kk, vv, nullptr, &b.se);
    kk = ggml_permute(ctx, kk, 0, 2, 1, 3);  // [D, n_kv, n_head_kv]
    vv = ggml_permute(ctx, vv, 0, 2, 1, 3);
    q = ggml_permute(ctx, q, 0, 2, 1, 3);    // [D, n_tokens, n_head]
    ggml_tensor * out = ggml_flash_attn_ext(ctx, q, kk, vv, b.mask, kq_scale, 0.0f, 0.0f);
    ggml_prec_set_acc(out, GGML_PREC_F32);
    return out;  // [D, n_head, n_tokens]
}

// SelfExtend from standard ggml ops, for backends that cannot run the fused CPU kernel. It forms
// the grouped and neighbor score matrices, picks per (query, key) which one applies, and then
// does one softmax: the same result as the fused kernel, with O(n_kv * n_tokens) memory.
static ggml_tensor * selfextend_portable(ggml_context * ctx, const attention_batch & b, ggml_tensor * q_n,
                                         ggml_tensor * q_g, ggml_tensor * kk, ggml_tensor * k_nb, ggml_tensor * vv,
                                         float kq_scale) {
    q_n = ggml_permute(ctx, q_n, 0, 2, 1, 3);                                  // [D, T, n_head]
    q_g = ggml_permute(ctx, q_g, 0, 2, 1, 3);
    ggml_tensor * s_grp = ggml_mul_mat(ctx, ggml_permute(ctx, kk, 0, 2, 1, 3), q_g);    // [n_kv, T, n_head]
    ggml_tensor * s_nb = ggml_mul_mat(ctx, ggml_permute(ctx, k_nb, 0, 2, 1, 3), q_n);  // [n_kv, T, n_head]
    ggml_prec_set_acc(s_grp, GGML_PREC_F32);
    ggml_prec_set_acc(s_nb, GGML_PREC_F32);
    ggml_tensor * scores = ggml_add(ctx, s_grp, ggml_mul(ctx, ggml_sub(ctx, s_nb, s_grp), b.select));
    ggml_tensor * probs = ggml_soft_max_ext(ctx, scores, b.mask, kq_scale, 0.0f);    // [n_kv, T, n_head]
    ggml_tensor * vt = ggml_cont(ctx, ggml_permute(ctx, vv, 1, 2, 0, 3));            // [n_kv, D, n_head_kv]
    ggml_tensor * out = ggml_mul_mat(ctx, vt, probs);                                // [D, T, n_head]
    return ggml_cont(ctx, ggml_permute(ctx, out, 0, 2, 1, 3));                       // [D, n_head, T]
}

ggml_tensor * build_attention(ggml_context * ctx, ggml_cgraph * gf, kv_cache & cache, int il,
                              const attention_batch & b, const rope_params & rope_p,
                              ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, float kq_scale) {
    const int64_t head_dim = q->ne[0], n_head = q->ne[1], n_head_kv = k->ne[1];
    const int32_t n_tokens = b.n_tokens, n_kv = b.n_kv;
    const bool se = b.selfextend();

    // New keys are cached at their own position (ordinary) or at their grouped one (SelfExtend).
    ggml_tensor * k_own = k;  // not yet rotated
    k = rope(ctx, k, se ? b.pos_key : b.pos, rope_p);

    // Append this batch's rows to the cache (at rows given as an input, so that the graph does not
    // depend on the position); expanded first, so that they run before the attention below reads
    // the cache.
    ggml_tensor * ck = cache.k[il], * cv = cache.v[il];
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, ck, ggml_reshape_2d(ctx, k, cache.n_embd_kv, n_tokens), b.rows));
    ggml_build_forward_expand(gf, ggml_set_rows(ctx, cv, v, b.rows));

    const size_t row_head = ggml_row_size(ck->type, head_dim);
    ggml_tensor * kk = ggml_view_3d(ctx, ck, head_dim, n_head_kv, n_kv, row_head, ck->nb[1], 0);  // [D, n_head_kv, n_kv]
    ggml_tensor * vv = ggml_view_3d(ctx, cv, head_dim, n_head_kv, n_kv, row_head, cv->nb[1], 0);

    ggml_tensor * out;
    if (!se) {
        out = ordinary_attention(ctx, b, rope(ctx, q, b.pos, rope_p), kk, vv, kq_scale);
    } else {
        ggml_tensor * q_n = rope(ctx, q, b.pos, rope_p);
        ggml_tensor * q_g = rope(ctx, q, b.pos_query_grp, rope_p);
        ggml_tensor * k_nb;
        if (b.se.ring_size > 0) {
            // Neighbor keys from the ring, where each key is written once, rotated to its own position.
            ggml_tensor * ring = cache.k_ring[il];
            ggml_tensor * own = ggml_reshape_2d(ctx, rope(ctx, k_own, b.pos, rope_p), cache.n_embd_kv, n_tokens);
            ggml_build_forward_expand(gf, ggml_set_rows(ctx, ring, own, b.ring_rows));
            k_nb = ggml_view_3d(ctx, ring, head_dim, n_head_kv, ring->ne[1], ggml_row_size(ring->type, head_dim),
                                ring->nb[1], 0);
        } else {
            // Neighbor keys: every cached row rotated on from floor(j/G) to j (RoPE composes); the
            // select input uses only those within the window. All rows rather than the window's:
            // a view that starts mid-cache and the concatenation it needs crashed Mesa's lavapipe.
            k_nb = rope(ctx, as_f32_if_quantized(ctx, kk), b.pos_neighbor, rope_p);
        }
        out = b.cfg.path == attention_path::fused
                  ? selfextend_attention_fused(ctx, q_n, q_g, kk, vv, k_nb, &b.se)
                  : selfextend_portable(ctx, b, q_n, q_g, as_f32_if_quantized(ctx, kk), k_nb,
                                        as_f32_if_quantized(ctx, vv), kq_scale);
    }
    return ggml_reshape_2d(ctx, out, head_dim * n_head, n_tokens);
}

}  // namespace pse
