// The llama-family forward graph for one batch: embeddings -> N x (RMSNorm, attention, RMSNorm,
// SwiGLU FFN) -> RMSNorm -> output projection.
#pragma once

#include "attention.h"

namespace pse {

// RoPE scaling applied on top of the file's own (the long-context baselines).
struct engine_rope_override {
    float freq_scale_mul = 1.0f;  // multiplies the file's freq_scale
    float ext_factor = 0.0f;      // 1 for YaRN
};

struct llama_graph_inputs {
    ggml_tensor * tokens = nullptr;  // I32 [n_tokens]
    attention_batch attn;
    ggml_tensor * logits = nullptr;  // F32 [n_vocab, n_outputs], or null when n_outputs == 0
};

// n_outputs: 0 (fill the cache only), 1 (logits of the last token) or n_tokens (all logits).
ggml_cgraph * build_llama_graph(ggml_context * ctx, const gguf_model & model, kv_cache & cache,
                                const attention_config & attn, const engine_rope_override & rope_override, int32_t n_past, int32_t n_tokens, int32_t n_outputs,
                                llama_graph_inputs & inputs);

size_t llama_graph_max_nodes(const gguf_model & model);
rope_params make_rope_params(const gguf_model & model, const engine_rope_override * override = nullptr);

}  // namespace pse
