// One architecture of the llama family, described by what differs from the others: the tensors
// of a layer, how a layer projects Q/K/V, and its feed-forward block. The loader
// (../gguf_model.cpp), the layer skeleton (../llama_graph.cpp: norms, attention, residuals) and the
// attention seam are shared. Adding an architecture is one file here and one line in
// model_arch.cpp's registry.
#pragma once

#include "../gguf_model.h"

#include <functional>
#include <string>
#include <vector>

namespace pse {

// Finds a tensor by name, checks its shape and marks it used (the loader refuses files with
// tensors no architecture uses).
struct tensor_finder {
    std::function<ggml_tensor *(const std::string & name, const std::vector<int64_t> & ne, bool required)> find;

    ggml_tensor * need(const std::string & name, const std::vector<int64_t> & ne) const { return find(name, ne, true); }
    ggml_tensor * maybe(const std::string & name, const std::vector<int64_t> & ne) const { return find(name, ne, false); }
};

// A layer's projections, ready for the attention seam: q [D, n_head, T], k [D, n_head_kv, T],
// v [D * n_head_kv, T], not yet rotated.
struct qkv_tensors {
    ggml_tensor * q = nullptr, * k = nullptr, * v = nullptr;
};

struct model_arch {
    const char * name;   // general.architecture
    int32_t rope_mode;   // 0: RoPE rotates adjacent pairs; GGML_ROPE_TYPE_NEOX: the two halves of a head
    // Finds the layer's tensors (prefix "blk.N."); throws std::invalid_argument via `fail` for a
    // tensor that is missing or shaped wrong.
    void (*load_layer)(const tensor_finder & t, const llama_hparams & hp, const std::string & prefix, llama_layer & L);
    // x: the normed input [n_embd, T].
    qkv_tensors (*project_qkv)(ggml_context * ctx, const llama_hparams & hp, const llama_layer & L, ggml_tensor * x);
    // x: the normed input [n_embd, T]; returns [n_embd, T].
    ggml_tensor * (*feed_forward)(ggml_context * ctx, const llama_layer & L, ggml_tensor * x);
    // A file this architecture cannot run although its tensors load (e.g. RoPE variants): the
    // reason, or an empty string.
    std::string (*unsupported)(const gguf_context * g, const llama_hparams & hp) = nullptr;
};

// The architecture named `name`, or nullptr.
const model_arch * find_model_arch(const std::string & name);
// "llama, qwen2, qwen3, phi3": for error messages.
std::string supported_model_archs();

// Pieces the architectures share.
// Separate Q, K, V and output projections; biases of Q/K/V required or optional.
void load_separate_attention(const tensor_finder & t, const llama_hparams & hp, const std::string & p, llama_layer & L,
                             bool biases_required);
// Q, K, V from the separate projections (plus biases when present), reshaped to heads.
qkv_tensors project_separate_qkv(ggml_context * ctx, const llama_hparams & hp, const llama_layer & L, ggml_tensor * x);
// Gate, up and down projections of a SwiGLU block.
void load_swiglu(const tensor_finder & t, const llama_hparams & hp, const std::string & p, llama_layer & L);
ggml_tensor * swiglu_feed_forward(ggml_context * ctx, const llama_layer & L, ggml_tensor * x);
// RMS norm times weight.
ggml_tensor * rms_norm(ggml_context * ctx, ggml_tensor * x, ggml_tensor * weight, float eps);

}  // namespace pse
