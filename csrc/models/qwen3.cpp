// qwen3: Qwen3 (dense). As llama without biases, plus an RMS norm over each head of Q and of K
// before RoPE, which rotates the two halves of each head (NEOX).
#include "model_arch.h"

namespace pse {

static void load_layer(const tensor_finder & t, const llama_hparams & hp, const std::string & p, llama_layer & L) {
    load_separate_attention(t, hp, p, L, /*biases_required =*/ false);
    L.attn_q_norm = t.need(p + "attn_q_norm.weight", {hp.head_dim});
    L.attn_k_norm = t.need(p + "attn_k_norm.weight", {hp.head_dim});
    load_swiglu(t, hp, p, L);
}

static qkv_tensors project_qkv(ggml_context * ctx, const llama_hparams & hp, const llama_layer & L, ggml_tensor * x) {
    qkv_tensors r = project_separate_qkv(ctx, hp, L, x);
    r.q = rms_norm(ctx, r.q, L.attn_q_norm, hp.rms_eps);  // over each head's D values
    r.k = rms_norm(ctx, r.k, L.attn_k_norm, hp.rms_eps);
    return r;
}

extern const model_arch arch_qwen3 = {"qwen3", GGML_ROPE_TYPE_NEOX, load_layer, project_qkv, swiglu_feed_forward};

}  // namespace pse
