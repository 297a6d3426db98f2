#include "kv_cache.h"

#include <stdexcept>

namespace pse {

kv_cache::~kv_cache() {
    if (buffer) ggml_backend_buffer_free(buffer);
    if (ctx) ggml_free(ctx);
}

ggml_type kv_cache::type_from_name(const std::string & name) {
    if (name == "f16") return GGML_TYPE_F16;
    if (name == "f32") return GGML_TYPE_F32;
    // q4_0 is left out: without llama.cpp's Hadamard rotation of Q/K/V before quantizing, it
    // agreed with the f16 cache on only 76% of SmolLM2's argmax tokens (q8_0: 95%).
    if (name == "q8_0") return GGML_TYPE_Q8_0;
    throw std::invalid_argument("cache_type must be 'f16', 'f32' or 'q8_0', got '" + name + "'");
}

ggml_type kv_cache::ring_type() const { return ggml_is_quantized(type) ? GGML_TYPE_F16 : type; }

void kv_cache::init(const llama_hparams & hp, int32_t n_ctx_, ggml_type type_, int32_t ring_size_) {
    type_from_name(ggml_type_name(type_));  // the same rule for a type given as ggml's
    // A head is read as a row of its own (attention views, the fused kernel): whole blocks only.
    if (hp.head_dim % ggml_blck_size(type_) != 0) {
        throw std::invalid_argument(std::string("cache_type '") + ggml_type_name(type_) + "' stores blocks of " +
                                    std::to_string(ggml_blck_size(type_)) + " values; this model's head size " +
                                    std::to_string(hp.head_dim) + " is not a multiple of it (use 'f16')");
    }
    type = type_;
    n_ctx = n_ctx_;
    n_past = 0;
    n_embd_kv = (int64_t) hp.head_dim * hp.n_head_kv;

    ggml_init_params params = {/*mem_size =*/ ggml_tensor_overhead() * (size_t) (3 * hp.n_layer + 1),
                               /*mem_buffer =*/ nullptr, /*no_alloc =*/ true};
    ctx = ggml_init(params);
    for (int il = 0; il < hp.n_layer; ++il) {
        k.push_back(ggml_new_tensor_2d(ctx, type, n_embd_kv, n_ctx));
        v.push_back(ggml_new_tensor_2d(ctx, type, n_embd_kv, n_ctx));
        ggml_format_name(k.back(), "cache_k_l%d", il);
        ggml_format_name(v.back(), "cache_v_l%d", il);
        if (ring_size_ > 0) {
            k_ring.push_back(ggml_new_tensor_2d(ctx, ring_type(), n_embd_kv, ring_size_));
            ggml_format_name(k_ring.back(), "cache_k_ring_l%d", il);
        }
    }
    ring_size = ring_size_;
}

size_t kv_cache::bytes_needed(ggml_backend_t backend) const {
    return ggml_backend_alloc_ctx_tensors_from_buft_size(ctx, ggml_backend_get_default_buffer_type(backend));
}

void kv_cache::allocate(ggml_backend_t backend) {
    buffer = ggml_backend_alloc_ctx_tensors(ctx, backend);
    if (!buffer) throw std::runtime_error("cannot allocate the KV cache (" + std::to_string(n_ctx) + " tokens)");
}

void kv_cache::zero() {
    // Unwritten cells are never read unmasked, but zeros keep any masked-out product finite.
    ggml_backend_buffer_clear(buffer, 0);
}

size_t kv_cache::bytes() const { return buffer ? ggml_backend_buffer_get_size(buffer) : 0; }

}  // namespace pse
