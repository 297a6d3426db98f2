// phi3: Phi-3 and Phi-3.5 (dense). One fused Q/K/V projection (or separate ones), one fused
// gate/up projection (gate first), RoPE on the two halves of each head (NEOX). llama.cpp runs
// these files without their sliding window, and so does this engine. The 128k variants'
// LongRoPE factors are not supported.
#include "model_arch.h"

namespace pse {

static void load_layer(const tensor_finder & t, const llama_hparams & hp, const std::string & p, llama_layer & L) {
    const int64_t n_embd = hp.n_embd, n_q = (int64_t) hp.head_dim * hp.n_head;
    const int64_t n_kv = (int64_t) hp.head_dim * hp.n_head_kv;
    L.wqkv = t.maybe(p + "attn_qkv.weight", {n_embd, n_q + 2 * n_kv});
    if (L.wqkv) {
        L.bqkv = t.maybe(p + "attn_qkv.bias", {n_q + 2 * n_kv});
        L.wo = t.need(p + "attn_output.weight", {n_q, n_embd});
    } else {
        load_separate_attention(t, hp, p, L, /*biases_required =*/ false);
    }
    L.ffn_up   = t.need(p + "ffn_up.weight", {n_embd, 2 * (int64_t) hp.n_ff});
    L.ffn_down = t.need(p + "ffn_down.weight", {hp.n_ff, n_embd});
}

static qkv_tensors project_qkv(ggml_context * ctx, const llama_hparams & hp, const llama_layer & L, ggml_tensor * x) {
    if (!L.wqkv) return project_separate_qkv(ctx, hp, L, x);
    ggml_tensor * qkv = ggml_mul_mat(ctx, L.wqkv, x);  // [n_q + 2 n_kv, T]: Q rows, then K, then V
    if (L.bqkv) qkv = ggml_add(ctx, qkv, L.bqkv);
    const int64_t D = hp.head_dim, T = x->ne[1], es = (int64_t) ggml_element_size(qkv);
    const int64_t n_q = D * hp.n_head, n_kv = D * hp.n_head_kv;
    qkv_tensors r;
    r.q = ggml_view_3d(ctx, qkv, D, hp.n_head, T, D * es, qkv->nb[1], 0);
    r.k = ggml_view_3d(ctx, qkv, D, hp.n_head_kv, T, D * es, qkv->nb[1], n_q * es);
    r.v = ggml_cont(ctx, ggml_view_2d(ctx, qkv, n_kv, T, qkv->nb[1], (n_q + n_kv) * es));
    return r;
}

static ggml_tensor * feed_forward(ggml_context * ctx, const llama_layer & L, ggml_tensor * x) {
    // ggml_swiglu splits its input in halves: silu(first) * second.
    return ggml_mul_mat(ctx, L.ffn_down, ggml_swiglu(ctx, ggml_mul_mat(ctx, L.ffn_up, x)));
}

static std::string unsupported(const gguf_context * g, const llama_hparams &) {
    for (const char * name : {"rope_factors_long.weight", "rope_factors_short.weight"}) {
        if (gguf_find_tensor(g, name) >= 0) {
            return std::string("Phi-3 LongRoPE (tensor '") + name + "', the 128k-context variants) is not supported";
        }
    }
    return "";
}

extern const model_arch arch_phi3 = {"phi3", GGML_ROPE_TYPE_NEOX, load_layer, project_qkv, feed_forward, unsupported};

}  // namespace pse
