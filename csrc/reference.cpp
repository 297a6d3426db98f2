#include "reference.h"

#include "gguf_model.h"
#include "host.h"
#include "kv_cache.h"

#include "llama.h"

#include <algorithm>
#include <cstring>
#include <stdexcept>

namespace pse {

bool reference_needs_flash_attn(const std::string & cache_type) {
    return ggml_is_quantized(kv_cache::type_from_name(cache_type));
}

reference_model::reference_model(const std::string & path, int32_t n_ctx, int32_t n_batch, int32_t n_threads,
                                 bool flash_attn, int32_t grp_attn_n, bool repack, const std::string & cache_type)
    : n_ctx_(n_ctx), n_batch_(n_batch), grp_n_(grp_attn_n) {
    if (n_ctx < 1 || n_batch < 1) throw std::invalid_argument("n_ctx and n_batch must be >= 1");
    check_thread_count(n_threads);
    const ggml_type type = kv_cache::type_from_name(cache_type);  // the same names as the engine's
    if (reference_needs_flash_attn(cache_type) && !flash_attn) {
        throw std::invalid_argument("llama.cpp runs a quantized V cache ('" + cache_type + "') only with flash attention");
    }
    if (grp_attn_n < 1 || n_batch % grp_attn_n != 0) {
        throw std::invalid_argument("grp_attn_n must be >= 1 and divide n_batch (" + std::to_string(n_batch) + ")");
    }
    check_vocab_file(path);  // libllama asserts on some corrupt files: check what it reads first
    llama_backend_init();
    llama_model_params mp = llama_model_default_params();
    // llama.cpp on the CPU alone, also in a build with a GPU backend: an empty device list, no layers
    // and no operations offloaded.
    static ggml_backend_dev_t no_devices[] = {nullptr};
    mp.devices = no_devices;
    mp.n_gpu_layers = 0;
    mp.use_extra_bufts = repack;
    model_ = llama_model_load_from_file(path.c_str(), mp);
    if (!model_) throw std::invalid_argument(path + ": llama.cpp could not load the model");
    {
        // libllama would allocate and clear its cache whatever its size: check it first.
        const size_t head_dim = (size_t) llama_model_n_embd(model_) / (size_t) llama_model_n_head(model_);
        const size_t cache_bytes = 2 * ggml_row_size(type, (int64_t) (head_dim * llama_model_n_head_kv(model_))) *
                                   (size_t) llama_model_n_layer(model_) * (size_t) n_ctx;
        try {
            require_memory(cache_bytes, "llama.cpp with n_ctx=" + std::to_string(n_ctx));
        } catch (...) {
            llama_model_free(model_);
            throw;
        }
    }
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;
    cp.n_seq_max = 1;
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.flash_attn_type = flash_attn ? LLAMA_FLASH_ATTN_TYPE_ENABLED : LLAMA_FLASH_ATTN_TYPE_DISABLED;
    cp.type_k = type;
    cp.type_v = type;
    cp.no_perf = true;
    cp.op_offload = false;
    ctx_ = llama_init_from_model(model_, cp);
    if (!ctx_) {
        llama_model_free(model_);
        throw std::runtime_error("llama.cpp could not create a context");
    }
    n_vocab_ = llama_vocab_n_tokens(llama_model_get_vocab(model_));
}

reference_model::~reference_model() {
    if (ctx_) llama_free(ctx_);
    if (model_) llama_model_free(model_);
}

void reference_model::reset() {
    llama_memory_clear(llama_get_memory(ctx_), true);
    n_past_ = 0;
    pos_ = 0;
    full_batches_ = 0;
    last_full_ = false;
    compressed_at_ = 0;
    last_full_end_ = 0;
}

void reference_model::truncate(int32_t n) {
    if (n < 0 || n > n_past_) throw std::invalid_argument("truncate: position out of range");
    if (n == n_past_) return;
    // Under group attention, a full batch still to be divided is counted and due: going back into
    // it would leave the count and its division wrong.
    const bool undivided = grp_n_ > 1 && last_full_end_ > compressed_at_;
    const int32_t lowest = grp_n_ == 1 ? 0 : undivided ? last_full_end_ : compressed_at_;
    if (n < lowest) {
        throw std::invalid_argument("truncate under group attention goes back only to where positions were last "
                                    "divided (" + std::to_string(lowest) + ") or later: earlier tokens have moved");
    }
    // From there on positions are consecutive: token n sits at pos_ - (n_past_ - n).
    const int32_t first = pos_ - (n_past_ - n);
    llama_memory_seq_rm(llama_get_memory(ctx_), 0, first, -1);
    pos_ = first;
    n_past_ = n;
    if (grp_n_ > 1) last_full_ = undivided && n == last_full_end_;
}

std::vector<float> reference_model::eval(const std::vector<int32_t> & tokens, bool all_logits) {
    const int32_t n = (int32_t) tokens.size();
    if (n == 0) throw std::invalid_argument("eval() needs at least one token");
    if (n_past_ + n > n_ctx_) throw std::length_error("tokens exceed the reference context");
    for (int32_t t : tokens) {
        if (t < 0 || t >= n_vocab_) throw std::invalid_argument("token id outside the vocabulary");
    }
    std::vector<float> out(all_logits ? (size_t) n * n_vocab_ : (size_t) n_vocab_);
    struct batch_holder {  // freed on every way out, throws included
        llama_batch b;
        ~batch_holder() { llama_batch_free(b); }
    } held{llama_batch_init(n_batch_, 0, 1)};
    llama_batch & batch = held.b;
    for (int32_t done = 0; done < n;) {
        const int32_t nb = std::min(n_batch_, n - done);
        if (grp_n_ > 1 && last_full_ && n > 1) {  // prompt batches only, as llama.cpp's example
            // Compress the previous (full) batch as llama.cpp's example does: shift it past the
            // blocks compressed before it, then divide its positions by grp_n_, so that it occupies
            // n_batch / grp_n_ positions. The example calls seq_add then seq_div; this libllama's
            // seq_div records the key rotation with the wrong sign (old - new instead of new - old),
            // which turns the cached keys away from their new positions. So each position is moved
            // to the same place by seq_add alone, whose rotation is right. In increasing order, a
            // moved key lands on a position already done and is never moved twice.
            llama_memory_t mem = llama_get_memory(ctx_);
            const int32_t ib = full_batches_ - 1;
            const int32_t shift = ib * (n_batch_ / grp_n_) * (grp_n_ - 1);
            for (int32_t p = pos_ - n_batch_; p < pos_; ++p) {
                const int32_t to = (p + shift) / grp_n_;
                if (to != p) llama_memory_seq_add(mem, 0, p, p + 1, to - p);
            }
            pos_ = llama_memory_seq_pos_max(mem, 0) + 1;
            compressed_at_ = n_past_;
        }
        batch.n_tokens = nb;
        for (int32_t i = 0; i < nb; ++i) {
            batch.token[i] = tokens[done + i];
            batch.pos[i] = pos_ + i;
            batch.n_seq_id[i] = 1;
            batch.seq_id[i][0] = 0;
            batch.logits[i] = all_logits || (done + i == n - 1);
        }
        if (llama_decode(ctx_, batch) != 0) throw std::runtime_error("llama_decode failed");
        for (int32_t i = 0; i < nb; ++i) {
            if (!batch.logits[i]) continue;
            const float * l = llama_get_logits_ith(ctx_, i);
            float * dst = all_logits ? out.data() + (size_t) (done + i) * n_vocab_ : out.data();
            std::memcpy(dst, l, sizeof(float) * n_vocab_);
        }
        n_past_ += nb;
        pos_ += nb;
        last_full_ = nb == n_batch_;
        if (last_full_) {
            ++full_batches_;
            last_full_end_ = n_past_;
        }
        done += nb;
    }
    return out;
}

namespace {

struct quantize_type {
    const char * name;
    llama_ftype ftype;
};

// llama-quantize's names, lower case.
const quantize_type k_quantize_types[] = {
    {"f32", LLAMA_FTYPE_ALL_F32},       {"f16", LLAMA_FTYPE_MOSTLY_F16},       {"bf16", LLAMA_FTYPE_MOSTLY_BF16},
    {"q4_0", LLAMA_FTYPE_MOSTLY_Q4_0},  {"q4_1", LLAMA_FTYPE_MOSTLY_Q4_1},     {"q5_0", LLAMA_FTYPE_MOSTLY_Q5_0},
    {"q5_1", LLAMA_FTYPE_MOSTLY_Q5_1},  {"q8_0", LLAMA_FTYPE_MOSTLY_Q8_0},     {"q2_k", LLAMA_FTYPE_MOSTLY_Q2_K},
    {"q3_k_s", LLAMA_FTYPE_MOSTLY_Q3_K_S}, {"q3_k_m", LLAMA_FTYPE_MOSTLY_Q3_K_M}, {"q4_k_s", LLAMA_FTYPE_MOSTLY_Q4_K_S},
    {"q4_k_m", LLAMA_FTYPE_MOSTLY_Q4_K_M}, {"q5_k_s", LLAMA_FTYPE_MOSTLY_Q5_K_S}, {"q5_k_m", LLAMA_FTYPE_MOSTLY_Q5_K_M},
    {"q6_k", LLAMA_FTYPE_MOSTLY_Q6_K},  {"iq4_nl", LLAMA_FTYPE_MOSTLY_IQ4_NL}, {"iq4_xs", LLAMA_FTYPE_MOSTLY_IQ4_XS},
};

}  // namespace

std::vector<std::string> quantize_types() {
    std::vector<std::string> out;
    for (const quantize_type & t : k_quantize_types) out.emplace_back(t.name);
    return out;
}

void quantize_model(const std::string & src, const std::string & dst, const std::string & type, int32_t n_threads,
                    bool pure) {
    const quantize_type * found = nullptr;
    for (const quantize_type & t : k_quantize_types) {
        if (type == t.name) found = &t;
    }
    if (!found) {
        std::string names;
        for (const std::string & n : quantize_types()) names += (names.empty() ? "" : ", ") + n;
        throw std::invalid_argument("unknown weight type '" + type + "' (known: " + names + ")");
    }
    check_thread_count(n_threads);
    load_gguf_model(src);  // libllama asserts on some corrupt files: validate the source first
    llama_backend_init();
    llama_model_quantize_params params = llama_model_quantize_default_params();
    params.nthread = n_threads;
    params.ftype = found->ftype;
    params.allow_requantize = true;  // the source may itself be quantized
    params.pure = pure;
    if (llama_model_quantize(src.c_str(), dst.c_str(), &params) != 0) {
        throw std::runtime_error("llama.cpp could not quantize " + src + " to " + type);
    }
}

}  // namespace pse
