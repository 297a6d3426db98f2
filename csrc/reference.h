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
    reference_model(const std::string & path, int32_t n_ctx, int32_t n_batch, int32_t n_threads, bool flash_attn,
                    int32_t grp_attn_n = 1);
    ~reference_model();
    reference_model(const reference_model &) = delete;
    reference_model & operator=(const reference_model &) = delete;

    // Same contract as engine::eval: appends to the cache, last-token or all logits.
    std::vector<float> eval(const std::vector<int32_t> & tokens, bool all_logits);
    void reset();
    void truncate(int32_t n);  // forget positions >= n
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
};

}  // namespace pse
