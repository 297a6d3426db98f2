// The KV cache: per layer, one row of K and one row of V per token, all heads side by side.
#pragma once

#include "gguf_model.h"

#include <string>

namespace pse {

struct kv_cache {
    ggml_type type   = GGML_TYPE_F16;
    int32_t n_ctx    = 0;      // capacity in tokens
    int32_t n_past   = 0;      // tokens stored so far
    int64_t n_embd_kv = 0;     // head_dim * n_head_kv
    // One tensor context and one buffer per buffer type (device) that holds layers.
    std::vector<ggml_backend_buffer_type_t> bufts;
    std::vector<ggml_context_ptr> ctxs;
    std::vector<ggml_backend_buffer_ptr> buffers;
    std::vector<ggml_tensor *> k;  // [n_embd_kv, n_ctx] per layer
    std::vector<ggml_tensor *> v;  // [n_embd_kv, n_ctx] per layer
    // SelfExtend only: the last keys again, rotated to their own positions (neighbor keys), in a
    // ring of ring_size rows (row j at j % ring_size): O(W) extra memory, in ring_type().
    int32_t ring_size = 0;
    std::vector<ggml_tensor *> k_ring;  // [n_embd_kv, ring_size] per layer

    kv_cache() = default;
    kv_cache(const kv_cache &) = delete;
    kv_cache & operator=(const kv_cache &) = delete;

    // Describes the cache for n_ctx tokens, layer il in layer_buft[il] (the memory of the device
    // that runs it); nothing is allocated yet, so that its size can be checked first.
    void init(const llama_hparams & hp, int32_t n_ctx, ggml_type type, int32_t ring_size,
              const std::vector<ggml_backend_buffer_type_t> & layer_buft);
    // The cache types this package runs, by name ("f16", "f32", "q8_0"); throws
    // std::invalid_argument.
    static ggml_type type_from_name(const std::string & name);
    // The neighbor ring's type: the cache's, or f16 for a quantized cache (the ring is small, and
    // its keys are rotated again on a refill).
    ggml_type ring_type() const;
    size_t bytes_needed(ggml_backend_buffer_type_t buft) const;  // of the layers in buft
    size_t bytes_needed() const;                                 // of all layers
    // Allocates the storage; zero() clears it (touching every page).
    void allocate();
    void zero();
    void clear() { n_past = 0; }
    size_t bytes() const;
};

}  // namespace pse
