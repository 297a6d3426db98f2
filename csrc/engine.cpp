#include "engine.h"

#include "devices.h"
#include "host.h"

#include <algorithm>
#include <chrono>
#include <set>
#include <stdexcept>
#include <string>

namespace pse {

engine::engine(std::shared_ptr<gguf_model> model, const engine_params & params)
    : model_(std::move(model)), params_(params) {
    if (params_.n_ctx < 1) throw std::invalid_argument("n_ctx must be >= 1, got " + std::to_string(params_.n_ctx));
    if (params_.n_batch < 1) throw std::invalid_argument("n_batch must be >= 1, got " + std::to_string(params_.n_batch));
    params_.n_batch = std::min(params_.n_batch, params_.n_ctx);  // a batch never holds more than the context
    check_thread_count(params_.n_threads);
    const int32_t L = model_->hp.n_ctx_train, G = params_.group_size, W = params_.window;
    check_selfextend(params_.n_ctx, L, G, G > 1 ? W : 0);
    if (G > 1) {
        if (model_->hp.head_dim % 8 != 0) throw std::invalid_argument("SelfExtend needs a head size that is a multiple of 8");
    }
    if (params_.scaling != engine_params::rope_scaling::none) {
        if (G > 1) throw std::invalid_argument("RoPE scaling is an alternative to SelfExtend; use one or the other");
        if (!(params_.rope_factor >= 1.0f)) throw std::invalid_argument("rope scaling factor must be >= 1");
        rope_override_.freq_scale_mul = 1.0f / params_.rope_factor;
        rope_override_.ext_factor = params_.scaling == engine_params::rope_scaling::yarn ? 1.0f : 0.0f;
    }
    // The fused kernel is a CPU custom op; on any other device SelfExtend takes the portable path.
    if (params_.path == engine_params::path_choice::fused && !model_->on_cpu()) {
        throw std::invalid_argument("attention_path='fused' runs on the CPU only; this model runs on " +
                                    device_spec(model_->devices[0]) + " (use 'auto' or 'portable')");
    }
    path_ = params_.path == engine_params::path_choice::portable || !model_->on_cpu() ? attention_path::portable
                                                                                     : attention_path::fused;
    const size_t max_nodes = llama_graph_max_nodes(*model_);
    runner_ = std::make_unique<graph_runner>(model_->devices, params_.n_threads, 2 * max_nodes, &abort_);
    threads_now_ = params_.n_threads;
    ring_size_ = selfextend_ring_size(G, W, path_, params_.n_batch);
    std::vector<ggml_backend_buffer_type_t> layer_buft;
    for (int il = 0; il < model_->hp.n_layer; ++il) {
        layer_buft.push_back(ggml_backend_dev_buffer_type(model_->devices[model_->layer_device[il]]));
    }
    cache_.init(model_->hp, params_.n_ctx, params_.cache_type, ring_size_, layer_buft);
    // The weights (mapped), the cache and the compute buffers must fit together.
    cache_bytes_ = cache_.bytes_needed();
    const std::string what = "n_ctx=" + std::to_string(params_.n_ctx) + " with batches of " +
                             std::to_string(params_.n_batch) + " tokens";
    const std::string cache_what = "an " + std::string(ggml_type_name(params_.cache_type)) + " KV cache of " +
                                   format_bytes(cache_bytes_) + " (" + format_bytes(cache_bytes_ / params_.n_ctx * 1024) +
                                   " per 1k tokens)";
    for (ggml_backend_dev_t dev : runner_->devices()) {
        const size_t weights = is_cpu(dev) ? model_->mapped_bytes : 0;  // a device's copies were checked when loaded
        require_device_memory(dev, weights + cache_.bytes_needed(ggml_backend_dev_buffer_type(dev)),
                              what + ": weights " + format_bytes(weights) + " and " + cache_what);
    }
    cache_.allocate();  // not touched yet: the memory is still available to the check below
    graph_meta_.resize(ggml_tensor_overhead() * max_nodes + ggml_graph_overhead_custom(max_nodes, false));
    compute_bytes_ = check_compute_graph(what, cache_what);
    cache_.zero();
}

size_t engine::check_compute_graph(const std::string & what, const std::string & cache_what) {
    // The largest graph: a full batch at the end of the context, every row's logits (as eval
    // with all_logits asks).
    ggml_init_params ip = {graph_meta_.size(), graph_meta_.data(), /*no_alloc =*/ true};
    ggml_context_ptr ctx(ggml_init(ip));
    llama_graph_inputs in;
    const int32_t n_tokens = params_.n_batch;
    ggml_cgraph * gf = build_llama_graph(ctx.get(), *model_, cache_, attention_cfg(), rope_override_,
                                         params_.n_ctx - n_tokens, n_tokens, n_tokens, in);
    runner_->check_placement(gf, "cache_type='" + std::string(ggml_type_name(params_.cache_type)) + "' on " +
                                     device_spec(model_->devices[0]));
    size_t total = 0;
    for (const auto & dev_bytes : runner_->measure(gf)) {
        ggml_backend_dev_t dev = dev_bytes.first;
        // The cache is allocated by now: a device's free memory counts it, the host's (Linux's
        // MemAvailable, pages not yet touched) does not.
        const size_t weights = is_cpu(dev) ? model_->mapped_bytes : 0;
        const size_t cache = is_cpu(dev) ? cache_.bytes_needed(ggml_backend_dev_buffer_type(dev)) : 0;
        require_device_memory(dev, weights + cache + dev_bytes.second,
                              what + ": weights " + format_bytes(weights) + ", " + cache_what + " and compute buffers of " +
                              format_bytes(dev_bytes.second));
        total += dev_bytes.second;
    }
    return total;
}

attention_config engine::attention_cfg() const {
    attention_config attn;
    attn.group_size = params_.group_size;
    attn.window = params_.window;
    attn.path = path_;
    attn.n_threads = params_.n_threads;
    attn.ring_size = ring_size_;
    attn.n_ctx = params_.n_ctx;
    return attn;
}

// Members are released in reverse order of declaration: the cache's buffers, then the runner's
// backends (also when the constructor throws).
engine::~engine() = default;

void engine::truncate(int32_t n) {
    if (n < 0 || n > cache_.n_past) {
        throw std::invalid_argument("truncate(" + std::to_string(n) + "): the cache holds " + std::to_string(cache_.n_past) + " tokens");
    }
    if (ring_size_ > 0) {
        const int32_t need = selfextend_first_neighbor(n, params_.window);  // the window of the next query
        const int32_t have = std::min(ring_lo_, n);
        if (need < have) refill_ring(need, have);
        ring_lo_ = std::min(need, have);
    }
    cache_.n_past = n;
}

size_t engine::state_bytes(int32_t n) const {
    return 2 * (size_t) model_->hp.n_layer * (size_t) n * cache_.k[0]->nb[1];
}

void engine::read_state(int32_t n, uint8_t * dst) const {
    if (n < 0 || n > cache_.n_past) throw std::invalid_argument("read_state: the cache holds " + std::to_string(cache_.n_past) + " tokens");
    const size_t rows = (size_t) n * cache_.k[0]->nb[1];  // rows [0, n) are contiguous
    for (int il = 0; il < model_->hp.n_layer; ++il) {
        ggml_backend_tensor_get(cache_.k[il], dst, 0, rows);
        ggml_backend_tensor_get(cache_.v[il], dst + rows, 0, rows);
        dst += 2 * rows;
    }
}

void engine::write_state(int32_t n, const uint8_t * src, size_t size) {
    if (n < 0 || n > params_.n_ctx) {
        throw std::invalid_argument("a state of " + std::to_string(n) + " tokens does not fit in n_ctx=" + std::to_string(params_.n_ctx));
    }
    if (size != state_bytes(n)) {
        throw std::invalid_argument("a state of " + std::to_string(n) + " tokens holds " + std::to_string(state_bytes(n)) +
                                    " bytes of KV cache, not " + std::to_string(size));
    }
    const size_t rows = (size_t) n * cache_.k[0]->nb[1];
    for (int il = 0; il < model_->hp.n_layer; ++il) {
        ggml_backend_tensor_set(cache_.k[il], src, 0, rows);
        ggml_backend_tensor_set(cache_.v[il], src + rows, 0, rows);
        src += 2 * rows;
    }
    cache_.n_past = n;
    ring_lo_ = n;  // the ring holds none of these keys:
    truncate(n);   // rebuilt from the grouped keys
}

void engine::refill_ring(int32_t lo, int32_t hi) {
    drop_graph();  // its descriptors and buffers are about to be reused
    ggml_init_params ip = {graph_meta_.size(), graph_meta_.data(), /*no_alloc =*/ true};
    ggml_context_ptr ctx_holder(ggml_init(ip));
    ggml_context * ctx = ctx_holder.get();
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, llama_graph_max_nodes(*model_), false);
    ggml_tensor * pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, hi - lo);
    ggml_tensor * rows = ggml_new_tensor_1d(ctx, GGML_TYPE_I64, hi - lo);
    ggml_set_input(pos);
    ggml_set_input(rows);
    const rope_params rope = make_rope_params(*model_, &rope_override_);
    for (int il = 0; il < model_->hp.n_layer; ++il) {
        build_ring_refill(ctx, gf, cache_, il, lo, hi, pos, rows, rope, model_->hp.head_dim);
    }
    runner_->allocate(gf, "the ring refill");
    set_ring_refill_inputs(pos, rows, lo, hi, params_.group_size, ring_size_);
    runner_->compute(gf, "the ring refill");
}

void engine::set_n_threads(int32_t n_threads) {
    check_thread_count(n_threads);
    params_.n_threads = n_threads;
    threads_now_ = n_threads;
    runner_->set_n_threads(n_threads);
}

void engine::adapt_threads() {
    if (!params_.adaptive_threads) return;
    // Sampled at most every 20 ms: a decode step is ~10 ms, the look costs ~50 us.
    const auto now = std::chrono::steady_clock::now();
    if (now - threads_checked_ < std::chrono::milliseconds(20)) return;
    threads_checked_ = now;
    const int32_t n = threads_that_can_run(params_.n_threads);
    if (n != threads_now_) {
        threads_now_ = n;
        runner_->set_n_threads(n);
    }
}

void engine::eval_batch(const int32_t * tokens, int32_t n_tokens, int32_t n_outputs, float * logits_out,
                        const std::vector<std::string> * capture_names, std::vector<std::vector<float>> * captured) {
    const int32_t n_past = cache_.n_past;
    std::vector<ggml_tensor *> copies;
    const bool reuse = params_.reuse_graphs && graph_ && !capture_names && graph_n_outputs_ == n_outputs &&
                       attention_batch_fits(graph_in_.attn, n_past, n_tokens);
    if (!reuse) {
        drop_graph();
        ggml_init_params ip = {graph_meta_.size(), graph_meta_.data(), /*no_alloc =*/ true};
        graph_ctx_.reset(ggml_init(ip));
        ggml_context * ctx = graph_ctx_.get();
        ggml_cgraph * gf = build_llama_graph(ctx, *model_, cache_, attention_cfg(), rope_override_, n_past, n_tokens,
                                             n_outputs, graph_in_);
        for (const std::string & name : capture_names ? *capture_names : std::vector<std::string>()) {
            ggml_tensor * t = ggml_graph_get_tensor(gf, name.c_str());
            if (!t || t->type != GGML_TYPE_F32) {
                drop_graph();
                throw std::invalid_argument("capture: no float tensor '" + name + "' in the graph");
            }
            ggml_tensor * copy = ggml_cont(ctx, t);  // an output of its own: never overwritten
            ggml_set_output(copy);
            ggml_build_forward_expand(gf, copy);
            copies.push_back(copy);
        }
        try {
            // A capture graph, and the first graph after one, get a plan of their own (see allocate).
            runner_->allocate(gf, "a batch of " + std::to_string(n_tokens) + " tokens", capture_names || planned_capture_);
            planned_capture_ = capture_names != nullptr;
        } catch (...) {
            drop_graph();
            throw;
        }
        graph_ = gf;
        graph_n_outputs_ = n_outputs;
    }
    const llama_graph_inputs & in = graph_in_;
    ggml_backend_tensor_set(in.tokens, tokens, 0, (size_t) n_tokens * sizeof(int32_t));
    set_attention_batch_inputs(graph_in_.attn, n_past);
    // This batch's keys overwrite the ring rows of positions ring_size back (also if it is aborted).
    if (ring_size_ > 0) ring_lo_ = std::max(ring_lo_, n_past + n_tokens - ring_size_);

    adapt_threads();
    try {
        runner_->compute(graph_, "the graph of a batch");
    } catch (...) {
        if (capture_names) drop_graph();
        throw;
    }
    if (in.logits && logits_out) ggml_backend_tensor_get(in.logits, logits_out, 0, ggml_nbytes(in.logits));
    for (ggml_tensor * copy : copies) {
        captured->emplace_back(ggml_nelements(copy));
        ggml_backend_tensor_get(copy, captured->back().data(), 0, ggml_nbytes(copy));
    }
    if (capture_names) drop_graph();
    cache_.n_past += n_tokens;
}

std::vector<std::vector<float>> engine::capture(const std::vector<int32_t> & tokens, const std::vector<std::string> & names) {
    const int64_t n = (int64_t) tokens.size();
    if (n < 1 || n > params_.n_batch || cache_.n_past + n > params_.n_ctx) {
        throw std::invalid_argument("capture: 1 to n_batch tokens that fit in the cache");
    }
    for (int32_t t : tokens) {
        if (t < 0 || t >= model_->hp.n_vocab) throw std::invalid_argument("capture: token id outside the vocabulary");
    }
    // Each name adds a node: a few distinct ones fit the graph's room.
    if (names.size() > 16 || std::set<std::string>(names.begin(), names.end()).size() != names.size()) {
        throw std::invalid_argument("capture: at most 16 distinct tensor names");
    }
    std::vector<std::vector<float>> out;
    eval_batch(tokens.data(), (int32_t) n, 0, nullptr, &names, &out);
    return out;
}

std::vector<float> engine::eval(const std::vector<int32_t> & tokens, bool all_logits, const progress_fn & progress) {
    const int64_t n = (int64_t) tokens.size();
    const int32_t n_vocab = model_->hp.n_vocab;
    if (n == 0) throw std::invalid_argument("eval() needs at least one token");
    for (int64_t i = 0; i < n; ++i) {
        if (tokens[i] < 0 || tokens[i] >= n_vocab) {
            throw std::invalid_argument("token id " + std::to_string(tokens[i]) + " at index " + std::to_string(i) +
                                        " is outside the vocabulary [0, " + std::to_string(n_vocab) + ")");
        }
    }
    if (cache_.n_past + n > params_.n_ctx) {
        throw std::length_error(std::to_string(cache_.n_past) + " cached + " + std::to_string(n) +
                                " new tokens exceed the context size n_ctx=" + std::to_string(params_.n_ctx));
    }
    abort_ = false;
    std::vector<float> logits(all_logits ? (size_t) n * n_vocab : (size_t) n_vocab);
    for (int64_t done = 0; done < n;) {
        const int32_t nb = (int32_t) std::min<int64_t>(params_.n_batch, n - done);
        const bool last = done + nb == n;
        const int32_t n_out = all_logits ? nb : (last ? 1 : 0);
        float * dst = all_logits ? logits.data() + (size_t) done * n_vocab : (last ? logits.data() : nullptr);
        eval_batch(tokens.data() + done, nb, n_out, dst);
        done += nb;
        // Only the CPU backend looks at abort_ during a graph; other devices stop between batches.
        if (abort_ && done < n) throw eval_aborted("evaluation stopped");
        if (progress && !progress(done, n) && done < n) throw eval_aborted("evaluation stopped by the progress callback");
    }
    return logits;
}

}  // namespace pse
