// The attention seam: everything between a layer's Q/K/V projections and its output projection.
//
// build_attention() takes the layer's un-rotated Q and K, V, the token positions and the cache;
// it applies RoPE, stores the new K/V rows, and returns the attention output. What positions the
// cache stores and how scores are formed is private to this file.
//
// Two kinds of attention:
// - ordinary (group_size == 1): keys cached at their own positions; the fused CPU kernel with
//   W = 0, or on other backends ggml's flash attention;
// - SelfExtend (group_size > 1, ../shared/SELFEXTEND.md): keys cached once, rotated to their
//   grouped position floor(j/G). The last W + batch keys get a neighbor copy, rotated on by
//   j - floor(j/G) (RoPE composes), so the cache stays the size of an ordinary one. Scores come
//   from the fused CPU kernel (selfextend_kernel.cpp) or, on other backends, from standard ggml
//   ops (the portable path).
#pragma once

#include "kv_cache.h"
#include "selfextend_kernel.h"

#include <vector>

namespace pse {

struct rope_params {
    int32_t n_rot = 0;
    int32_t mode = 0;
    int32_t n_ctx_orig = 0;
    float freq_base = 10000.0f;
    float freq_scale = 1.0f;
    float ext_factor = 0.0f;   // YaRN ramp mix (0: none)
    float attn_factor = 1.0f;
    float beta_fast = 32.0f, beta_slow = 1.0f;
    ggml_tensor * freq_factors = nullptr;  // optional rope_freqs tensor
};

enum class attention_path { fused, portable };

struct attention_config {
    int32_t group_size = 1;  // G; 1 is ordinary attention
    int32_t window = 0;      // W (used when G > 1)
    attention_path path = attention_path::fused;
    int32_t n_threads = 1;   // to size the fused kernel's work split
    float kq_scale = 1.0f;   // 1/sqrt(D)
    int32_t ring_size = 0;   // the cache's neighbor-key ring (fused path), 0 if none
    int32_t n_ctx = 0;       // the cache's capacity in tokens
};

// Inputs shared by every layer of one batch; create with make_attention_batch() while building
// the graph, and fill with set_attention_batch_inputs() once the graph is allocated. A graph whose
// batch fits (attention_batch_fits) serves again for a later position: only its inputs change.
struct attention_batch {
    attention_config cfg;
    int32_t n_past = 0;      // tokens already in the cache
    int32_t n_tokens = 0;    // tokens in this batch
    int32_t n_kv = 0;        // cache rows the graph's attention spans (attention_graph_n_kv)
    int32_t n_head_kv = 0;
    ggml_tensor * pos = nullptr;     // I32 [n_tokens]: absolute positions n_past ..
    ggml_tensor * rows = nullptr;    // I64 [n_tokens]: the cache rows this batch's K and V go to
    ggml_tensor * mask = nullptr;    // F16 [n_kv, n_tokens], portable path: 0 where key j is visible, -inf elsewhere
    selfextend_op_params se;         // fused path: the kernel's parameters (live as long as the batch)
    // SelfExtend only:
    ggml_tensor * pos_key = nullptr;        // I32 [n_tokens]: floor(i/G), where new keys are cached
    ggml_tensor * pos_query_grp = nullptr;  // I32 [n_tokens]: floor(i/G) + W - floor(W/G)
    ggml_tensor * pos_neighbor = nullptr;   // I32 [n_kv], portable path: j - floor(j/G), rotation to neighbor keys
    ggml_tensor * ring_rows = nullptr;      // I64 [n_tokens], fused path: the ring rows of the new neighbor keys
    ggml_tensor * select = nullptr;         // F32 [n_kv, n_tokens], portable path: 1 = neighbor score

    bool selfextend() const { return cfg.group_size > 1; }
};

// The cache rows a batch's attention spans: n_past + n_tokens rounded up to a multiple of 256 (at
// most n_ctx), so that one graph serves 256 decoding steps; the mask, or the fused kernel's own
// causal bound, leaves the rows past n_past + t out.
int32_t attention_graph_n_kv(const attention_config & cfg, int32_t n_past, int32_t n_tokens);
// Whether a graph built for `batch` can compute n_tokens tokens after n_past.
bool attention_batch_fits(const attention_batch & batch, int32_t n_past, int32_t n_tokens);

// SelfExtend's rules, owned here and asked by the engine, the bindings and (through them) Python.
// (L - W) * G + W: the longest sequence SelfExtend with (G, W) keeps within the trained context L.
int64_t selfextend_usable_length(int32_t n_ctx_train, int32_t group_size, int32_t window);
// Throws std::invalid_argument naming the problem: G < 1; W outside [1, L); a usable length below
// n_ctx when G > 1. n_ctx = 0 checks only what is given (G, and W unless it is 0), before the
// missing values are chosen.
void check_selfextend(int32_t n_ctx, int32_t n_ctx_train, int32_t group_size, int32_t window);
// Rows of the fused path's neighbor-key ring: the window plus one batch (0 when there is none).
int32_t selfextend_ring_size(int32_t group_size, int32_t window, attention_path path, int32_t n_batch);
// The first key that may be a neighbor of the query at position n_past: max(0, n_past - W + 1).
int32_t selfextend_first_neighbor(int32_t n_past, int32_t window);

void make_attention_batch(attention_batch & batch, ggml_context * ctx, const attention_config & cfg,
                          int32_t n_head_kv, int32_t n_past, int32_t n_tokens);
// Fills the inputs for a batch after n_past tokens (which attention_batch_fits).
void set_attention_batch_inputs(attention_batch & batch, int32_t n_past);

// Recomputes neighbor-ring rows [lo, hi) from the grouped keys in the cache (after a truncation
// the ring may hold keys of positions that are gone). pos_delta: I32 [hi - lo], rows: I64 [hi - lo],
// shared by every layer and filled by set_ring_refill_inputs once the graph is allocated.
void build_ring_refill(ggml_context * ctx, ggml_cgraph * gf, kv_cache & cache, int il, int32_t lo, int32_t hi,
                       ggml_tensor * pos_delta, ggml_tensor * rows, const rope_params & rope_p, int32_t head_dim);
// pos_delta: the rotation taking grouped key j to its own position, j - floor(j/G); rows: j's ring row.
void set_ring_refill_inputs(ggml_tensor * pos_delta, ggml_tensor * rows, int32_t lo, int32_t hi, int32_t group_size,
                            int32_t ring_size);

// q: [D, n_head, n_tokens], k: [D, n_head_kv, n_tokens], v: [D * n_head_kv, n_tokens], all F32 and
// not yet rotated. Returns [D * n_head, n_tokens].
ggml_tensor * build_attention(ggml_context * ctx, ggml_cgraph * gf, kv_cache & cache, int il,
                              const attention_batch & batch, const rope_params & rope,
                              ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, float kq_scale);

}  // namespace pse
