#include "kv_cache.h"

#include <algorithm>
#include <cstdint>
#include <stdexcept>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace pse {

ggml_type kv_cache::type_from_name(const std::string & name) {
    if (name == "f16") return GGML_TYPE_F16;
    if (name == "f32") return GGML_TYPE_F32;
    // q4_0 is left out: without llama.cpp's Hadamard rotation of Q/K/V before quantizing, it
    // agreed with the f16 cache on only 76% of SmolLM2's argmax tokens (q8_0: 95%).
    if (name == "q8_0") return GGML_TYPE_Q8_0;
    throw std::invalid_argument("cache_type must be 'f16', 'f32' or 'q8_0', got '" + name + "'");
}

ggml_type kv_cache::ring_type() const { return ggml_is_quantized(type) ? GGML_TYPE_F16 : type; }

void kv_cache::init(const llama_hparams & hp, int32_t n_ctx_, ggml_type type_, int32_t ring_size_,
                    const std::vector<ggml_backend_buffer_type_t> & layer_buft) {
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

    for (int il = 0; il < hp.n_layer; ++il) {
        if (std::find(bufts.begin(), bufts.end(), layer_buft[il]) != bufts.end()) continue;
        ggml_init_params params = {/*mem_size =*/ ggml_tensor_overhead() * (size_t) (3 * hp.n_layer + 1),
                                   /*mem_buffer =*/ nullptr, /*no_alloc =*/ true};
        bufts.push_back(layer_buft[il]);
        ctxs.emplace_back(ggml_init(params));
    }
    for (int il = 0; il < hp.n_layer; ++il) {
        ggml_context * ctx = ctxs[std::find(bufts.begin(), bufts.end(), layer_buft[il]) - bufts.begin()].get();
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

size_t kv_cache::bytes_needed(ggml_backend_buffer_type_t buft) const {
    for (size_t i = 0; i < bufts.size(); ++i) {
        if (bufts[i] == buft) return ggml_backend_alloc_ctx_tensors_from_buft_size(ctxs[i].get(), buft);
    }
    return 0;
}

size_t kv_cache::bytes_needed() const {
    size_t bytes = 0;
    for (ggml_backend_buffer_type_t buft : bufts) bytes += bytes_needed(buft);
    return bytes;
}

// Attention streams every cached row of a head, one short row per token: with 4 KiB pages that is
// a TLB miss every few rows. Huge pages (where the kernel gives them on request) remove them. Asked
// before the cache is first written, so that its pages are huge from the start.
static void advise_huge_pages(ggml_backend_buffer_t buf) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    if (!ggml_backend_buffer_is_host(buf)) return;
    const uintptr_t huge = (uintptr_t) 2 << 20;
    const uintptr_t lo = ((uintptr_t) ggml_backend_buffer_get_base(buf) + huge - 1) & ~(huge - 1);
    const uintptr_t hi = ((uintptr_t) ggml_backend_buffer_get_base(buf) + ggml_backend_buffer_get_size(buf)) & ~(huge - 1);
    if (hi > lo) madvise((void *) lo, hi - lo, MADV_HUGEPAGE);  // advice only: failure changes nothing
#else
    (void) buf;
#endif
}

void kv_cache::allocate() {
    for (size_t i = 0; i < bufts.size(); ++i) {
        buffers.emplace_back(ggml_backend_alloc_ctx_tensors_from_buft(ctxs[i].get(), bufts[i]));
        if (!buffers.back()) {
            throw std::runtime_error("cannot allocate the KV cache (" + std::to_string(n_ctx) + " tokens) in " +
                                     ggml_backend_buft_name(bufts[i]));
        }
        advise_huge_pages(buffers.back().get());
    }
}

void kv_cache::zero() {
    // Unwritten cells are never read unmasked, but zeros keep any masked-out product finite.
    for (const ggml_backend_buffer_ptr & b : buffers) ggml_backend_buffer_clear(b.get(), 0);
}

size_t kv_cache::bytes() const {
    size_t bytes = 0;
    for (const ggml_backend_buffer_ptr & b : buffers) bytes += ggml_backend_buffer_get_size(b.get());
    return bytes;
}

}  // namespace pse
