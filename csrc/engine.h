// The engine: a loaded model, its KV cache (on the devices that run the model's layers) and a graph
// runner. eval() runs batches through the graph.
#pragma once

#include "graph_runner.h"
#include "llama_graph.h"

#include <atomic>
#include <chrono>
#include <functional>
#include <stdexcept>
#include <memory>
#include <vector>

namespace pse {

struct engine_params {
    int32_t n_ctx = 4096;
    int32_t n_batch = 512;
    int32_t n_threads = 4;
    ggml_type cache_type = GGML_TYPE_F16;
    int32_t group_size = 1;   // SelfExtend G; 1 = ordinary attention
    int32_t window = 0;       // SelfExtend W
    // SelfExtend scores: fused CPU kernel or portable ggml ops; auto picks by device.
    enum class path_choice { automatic, fused, portable } path = path_choice::automatic;
    // Baselines for long contexts, with ordinary attention: RoPE position interpolation ("linear",
    // positions divided by rope_factor) or YaRN, both through ggml_rope_ext.
    enum class rope_scaling { none, linear, yarn } scaling = rope_scaling::none;
    float rope_factor = 1.0f;
    // Run fewer compute threads while other processes keep cores busy (host.h); the attention
    // work split still follows n_threads, so results do not depend on the machine's load.
    bool adaptive_threads = true;
    // Run the last batch's graph again when the next batch fits it (as llama.cpp does); off only
    // to check that reuse changes nothing.
    bool reuse_graphs = true;
};

// Longest sequence SelfExtend with (G, W) keeps within the trained context L: (L - W) * G + W.

// Called after each batch with (tokens done, tokens total); returning false stops the eval.
using progress_fn = std::function<bool(int64_t, int64_t)>;

class engine {
public:
    engine(std::shared_ptr<gguf_model> model, const engine_params & params);
    ~engine();
    engine(const engine &) = delete;
    engine & operator=(const engine &) = delete;

    // Appends tokens to the cache in batches of n_batch. Returns the logits of the last token
    // ([n_vocab]) or, with all_logits, of every token ([n_tokens * n_vocab], row per token).
    std::vector<float> eval(const std::vector<int32_t> & tokens, bool all_logits,
                            const progress_fn & progress = nullptr);

    void reset() { cache_.clear(); ring_lo_ = 0; }
    // Forgets every token from position n on (rows past n are simply overwritten later).
    void truncate(int32_t n);
    // The cache's first n rows, every layer's K then V (what a saved state holds; the neighbor
    // ring is derived from them), and the inverse: the cache then holds those n tokens.
    size_t state_bytes(int32_t n) const;
    void read_state(int32_t n, uint8_t * dst) const;
    void write_state(int32_t n, const uint8_t * src, size_t size);
    void abort() { abort_ = true; }  // safe from any thread; stops the running eval
    // Test hook: appends tokens as one batch (at most n_batch) and returns a copy of each named
    // graph tensor: "q-L", "k-L", "v-L" (layer L's projections, before RoPE), "kqv_out-L" (its
    // attention output), as float32 in ggml's order.
    std::vector<std::vector<float>> capture(const std::vector<int32_t> & tokens, const std::vector<std::string> & names);
    int32_t n_past() const { return cache_.n_past; }
    const engine_params & params() const { return params_; }
    const gguf_model & model() const { return *model_; }
    size_t cache_bytes() const { return cache_bytes_; }
    size_t compute_bytes() const { return compute_bytes_; }  // of the largest batch's graph
    void set_n_threads(int32_t n_threads);

private:
    std::shared_ptr<gguf_model> model_;
    engine_params params_;
    std::atomic<bool> abort_{false};
    std::unique_ptr<graph_runner> runner_;
    kv_cache cache_;
    std::vector<uint8_t> graph_meta_;  // memory for tensor and graph descriptors
    // The last batch's graph, kept while nothing else has used graph_meta_ and the runner: a batch
    // it fits (decoding, mostly; see attention_graph_n_kv) only sets new inputs and runs it, as
    // llama.cpp reuses its graphs; building and allocating would cost ~10% of a small model's step.
    ggml_context_ptr graph_ctx_;
    ggml_cgraph * graph_ = nullptr;
    int32_t graph_n_outputs_ = 0;
    llama_graph_inputs graph_in_;  // the fused kernel's parameters live here, at a fixed address
    bool planned_capture_ = false;  // the runner's allocation plan is a capture graph's
    attention_path path_ = attention_path::fused;  // resolved from params_.path
    int32_t ring_size_ = 0;                         // neighbor-key ring rows (fused SelfExtend)
    // The ring holds the keys of positions [ring_lo_, n_past) as computed: a truncation rebuilds
    // only the rows below ring_lo_ the window needs, so that reusing a prefix gives the same
    // results as evaluating it afresh (a rebuilt row is exact only up to f16 rounding).
    int32_t ring_lo_ = 0;
    engine_rope_override rope_override_;
    size_t cache_bytes_ = 0, compute_bytes_ = 0;
    int32_t threads_now_ = 0;                               // compute threads in use
    std::chrono::steady_clock::time_point threads_checked_;

    void adapt_threads();

    void drop_graph() { graph_ = nullptr; graph_ctx_.reset(); }
    void refill_ring(int32_t lo, int32_t hi);
    attention_config attention_cfg() const;
    // Checks that the devices can run the largest batch's graph and that its compute buffers fit
    // beside the cache; returns their bytes.
    size_t check_compute_graph(const std::string & what, const std::string & cache_what);

    void eval_batch(const int32_t * tokens, int32_t n_tokens, int32_t n_outputs, float * logits_out,
                    const std::vector<std::string> * capture_names = nullptr,
                    std::vector<std::vector<float>> * captured = nullptr);
};

}  // namespace pse
