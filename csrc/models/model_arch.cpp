#include "model_arch.h"

namespace pse {

extern const model_arch arch_llama;
extern const model_arch arch_qwen2;
extern const model_arch arch_qwen3;
extern const model_arch arch_phi3;

// The registry: one line per architecture.
static const model_arch * const k_archs[] = {&arch_llama, &arch_qwen2, &arch_qwen3, &arch_phi3};

const model_arch * find_model_arch(const std::string & name) {
    for (const model_arch * a : k_archs) {
        if (name == a->name) return a;
    }
    return nullptr;
}

std::string supported_model_archs() {
    std::string out;
    for (const model_arch * a : k_archs) out += (out.empty() ? "" : ", ") + std::string(a->name);
    return out;
}

void load_separate_attention(const tensor_finder & t, const llama_hparams & hp, const std::string & p, llama_layer & L,
                             bool biases_required) {
    const int64_t n_embd = hp.n_embd, n_q = (int64_t) hp.head_dim * hp.n_head;
    const int64_t n_kv = (int64_t) hp.head_dim * hp.n_head_kv;
    L.wq = t.need(p + "attn_q.weight", {n_embd, n_q});
    L.wk = t.need(p + "attn_k.weight", {n_embd, n_kv});
    L.wv = t.need(p + "attn_v.weight", {n_embd, n_kv});
    L.wo = t.need(p + "attn_output.weight", {n_q, n_embd});
    L.bq = t.find(p + "attn_q.bias", {n_q}, biases_required);
    L.bk = t.find(p + "attn_k.bias", {n_kv}, biases_required);
    L.bv = t.find(p + "attn_v.bias", {n_kv}, biases_required);
    L.bo = t.maybe(p + "attn_output.bias", {n_embd});
}

static ggml_tensor * add_bias(ggml_context * ctx, ggml_tensor * x, ggml_tensor * bias) {
    return bias ? ggml_add(ctx, x, bias) : x;
}

qkv_tensors project_separate_qkv(ggml_context * ctx, const llama_hparams & hp, const llama_layer & L, ggml_tensor * x) {
    const int64_t T = x->ne[1];
    qkv_tensors r;
    r.q = ggml_reshape_3d(ctx, add_bias(ctx, ggml_mul_mat(ctx, L.wq, x), L.bq), hp.head_dim, hp.n_head, T);
    r.k = ggml_reshape_3d(ctx, add_bias(ctx, ggml_mul_mat(ctx, L.wk, x), L.bk), hp.head_dim, hp.n_head_kv, T);
    r.v = add_bias(ctx, ggml_mul_mat(ctx, L.wv, x), L.bv);
    return r;
}

void load_swiglu(const tensor_finder & t, const llama_hparams & hp, const std::string & p, llama_layer & L) {
    L.ffn_gate = t.need(p + "ffn_gate.weight", {hp.n_embd, hp.n_ff});
    L.ffn_up   = t.need(p + "ffn_up.weight", {hp.n_embd, hp.n_ff});
    L.ffn_down = t.need(p + "ffn_down.weight", {hp.n_ff, hp.n_embd});
}

ggml_tensor * swiglu_feed_forward(ggml_context * ctx, const llama_layer & L, ggml_tensor * x) {
    ggml_tensor * gate = ggml_mul_mat(ctx, L.ffn_gate, x);
    ggml_tensor * up   = ggml_mul_mat(ctx, L.ffn_up, x);
    return ggml_mul_mat(ctx, L.ffn_down, ggml_swiglu_split(ctx, gate, up));
}

ggml_tensor * rms_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * weight, float eps) {
    return ggml_mul(ctx, ggml_rms_norm(ctx, x, eps), weight);
}

}  // namespace pse
