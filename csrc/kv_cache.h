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
    ggml_context * ctx = nullptr;
    ggml_backend_buffer_t buffer = nullptr;
    std::vector<ggml_tensor *> k;  // [n_embd_kv, n_ctx] per layer
    std::vector<ggml_tensor *> v;  // [n_embd_kv, n_ctx] per layer
    // SelfExtend only: the last keys again, rotated to their own positions (neighbor keys), in a
    // ring of ring_size rows (row j at j % ring_size): O(W) extra memory, in ring_type().
    int32_t ring_size = 0;
    std::vector<ggml_tensor *> k_ring;  // [n_embd_kv, ring_size] per layer

    kv_cache() = default;
    kv_cache(const kv_cache &) = delete;
    kv_cache & operator=(const kv_cache &) = delete;
    ~kv_cache();

    // Describes the cache for n_ctx tokens; nothing is allocated yet, so that its size can be
    // checked against the machine's memory first.
    void init(const llama_hparams & hp, int32_t n_ctx, ggml_type type, int32_t ring_size = 0);
    // The cache types this package runs, by name ("f16", "f32", "q8_0"); throws
    // std::invalid_argument.
    static ggml_type type_from_name(const std::string & name);
    // The neighbor ring's type: the cache's, or f16 for a quantized cache (the ring is small, and
    // its keys are rotated again on a refill).
    ggml_type ring_type() const;
    size_t bytes_needed(ggml_backend_t backend) const;
    // Allocates the storage on the backend; zero() clears it (touching every page).
    void allocate(ggml_backend_t backend);
    void zero();
    void clear() { n_past = 0; }
    size_t bytes() const;
};

}  // namespace pse
