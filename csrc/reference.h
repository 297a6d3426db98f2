// llama.cpp's own forward pass over the same GGUF file (libllama from the pinned source). Used by
// the parity tests and by the benchmark as the yardstick; not part of the inference path.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

struct llama_model;
struct llama_context;

namespace pse {

class reference_model {
public:
    // grp_attn_n > 1 turns on llama.cpp's group attention (its passkey example's --grp-attn-n): before
    // each new full batch, the cached positions of the previous batch are divided by grp_attn_n, so
    // only the current batch keeps exact positions. A long-context baseline, not SelfExtend.
    // repack: llama.cpp's default, weights of some types (Q4_0, Q4_K, IQ4_NL, ...) rearranged for
    // its faster CPU kernels, which sum in another order; false keeps them as in the file.
    // cache_type: as the engine's (kv_cache::type_from_name); see reference_needs_flash_attn.
    reference_model(const std::string & path, int32_t n_ctx, int32_t n_batch, int32_t n_threads, bool flash_attn,
                    int32_t grp_attn_n = 1, bool repack = true, const std::string & cache_type = "f16");
    ~reference_model();
    reference_model(const reference_model &) = delete;
    reference_model & operator=(const reference_model &) = delete;

    // Same contract as engine::eval: appends to the cache, last-token or all logits.
    std::vector<float> eval(const std::vector<int32_t> & tokens, bool all_logits);
    void reset();
    // Forgets tokens >= n. Under group attention it goes back only to where positions were last
    // divided, or later, and not into the last full batch while it waits to be divided. Going back
    // to the end of a text read in whole batches after a question leaves the text's last batch
    // divided early, which is what the next batch would have done to it: the text reads on as if
    // never asked.
    void truncate(int32_t n);
    int32_t n_past() const { return n_past_; }
    int32_t n_vocab() const { return n_vocab_; }

private:
    llama_model * model_ = nullptr;
    llama_context * ctx_ = nullptr;
    int32_t n_ctx_ = 0, n_batch_ = 0, n_past_ = 0, n_vocab_ = 0;
    int32_t grp_n_ = 1;
    int32_t pos_ = 0;            // next position to assign (positions shrink under group attention)
    int32_t full_batches_ = 0;   // full batches evaluated so far
    bool last_full_ = false;     // was the previous batch a full one (then it gets divided)
    int32_t compressed_at_ = 0;  // n_past_ when positions were last divided
    int32_t last_full_end_ = 0;  // n_past_ after the last full batch
};

// Writes `src` requantized to `type` ("q4_k_m", "iq4_xs", "bf16", ...: the names of
// quantize_types()) into `dst` with libllama's llama_model_quantize, as llama.cpp's
// llama-quantize does: its mix of types per tensor, or with `pure` the one type wherever a tensor's
// rows fit its blocks (others get a fallback type either way). For tests and benchmarks of every
// weight type from one real model.
// Whether llama.cpp runs a KV cache of this type only with flash attention (a quantized V cache).
bool reference_needs_flash_attn(const std::string & cache_type);

void quantize_model(const std::string & src, const std::string & dst, const std::string & type, int32_t n_threads,
                    bool pure = false);
std::vector<std::string> quantize_types();

}  // namespace pse
