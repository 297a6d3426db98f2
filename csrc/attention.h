// The attention seam: everything between a layer's Q/K/V projections and its output projection.
//
// build_attention() takes the layer's un-rotated Q and K, V, the token positions and the cache;
// it applies RoPE, stores the new K/V rows, and returns the attention output. What positions the
// cache stores and how scores are formed is private to this file, which is what lets SelfExtend
// replace ordinary attention without touching the rest of the graph.
#pragma once

#include "kv_cache.h"

namespace pse {

struct rope_params {
    int32_t n_rot = 0;
    int32_t mode = 0;
    int32_t n_ctx_orig = 0;
    float freq_base = 10000.0f;
    float freq_scale = 1.0f;
    ggml_tensor * freq_factors = nullptr;  // optional rope_freqs tensor
};

// Inputs shared by every layer of one batch; create with make_attention_batch() while building
// the graph, and fill with set_attention_batch_inputs() once the graph is allocated.
struct attention_batch {
    int32_t n_past = 0;      // tokens already in the cache
    int32_t n_tokens = 0;    // tokens in this batch
    ggml_tensor * pos = nullptr;   // I32 [n_tokens]: absolute positions n_past .. n_past+n_tokens-1
    ggml_tensor * mask = nullptr;  // F16 [n_kv, n_tokens]: 0 where key j is visible to query i, -inf elsewhere
};

attention_batch make_attention_batch(ggml_context * ctx, int32_t n_past, int32_t n_tokens);
void set_attention_batch_inputs(const attention_batch & batch);

// q: [D, n_head, n_tokens], k: [D, n_head_kv, n_tokens], v: [D * n_head_kv, n_tokens], all F32 and
// not yet rotated. Returns [D * n_head, n_tokens].
ggml_tensor * build_attention(ggml_context * ctx, ggml_cgraph * gf, kv_cache & cache, int il,
                              const attention_batch & batch, const rope_params & rope,
                              ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, float kq_scale);

}  // namespace pse
