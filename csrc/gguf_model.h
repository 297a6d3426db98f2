// GGUF file -> hyperparameters and weight tensors, memory-mapped (no copy of the weights).
#pragma once

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpp.h"
#include "gguf.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace pse {

// Hyperparameters of a llama-family model, read from GGUF metadata.
struct llama_hparams {
    std::string arch;          // general.architecture
    std::string name;          // general.name (may be empty)
    int32_t n_vocab     = 0;
    int32_t n_ctx_train = 0;   // <arch>.context_length: the L of SelfExtend
    int32_t n_embd      = 0;
    int32_t n_layer     = 0;
    int32_t n_head      = 0;
    int32_t n_head_kv   = 0;
    int32_t n_ff        = 0;
    int32_t head_dim    = 0;   // D
    int32_t n_rot       = 0;   // rotated dimensions (== head_dim for llama)
    int32_t rope_mode   = 0;   // 0: adjacent pairs (llama), GGML_ROPE_TYPE_NEOX: halves (qwen2, qwen3, phi3)
    float   rope_freq_base  = 10000.0f;
    float   rope_freq_scale = 1.0f;  // linear RoPE scaling baked into the file (1/factor)
    float   rms_eps         = 1e-5f;
};

// A layer's tensors; which of them a file has depends on its architecture (models/*.cpp).
struct llama_layer {
    ggml_tensor * attn_norm = nullptr;
    ggml_tensor * wq = nullptr, * wk = nullptr, * wv = nullptr, * wo = nullptr;
    ggml_tensor * bq = nullptr, * bk = nullptr, * bv = nullptr, * bo = nullptr;  // biases (qwen2; optional in llama)
    ggml_tensor * wqkv = nullptr, * bqkv = nullptr;                                // fused Q/K/V (phi3)
    ggml_tensor * attn_q_norm = nullptr, * attn_k_norm = nullptr;                  // per-head Q/K norms (qwen3)
    ggml_tensor * ffn_norm = nullptr;
    ggml_tensor * ffn_gate = nullptr, * ffn_up = nullptr, * ffn_down = nullptr;  // phi3: ffn_up is gate and up
};

struct model_arch;

// A loaded model. On the CPU, weight tensors point into the mmapped file through a CPU backend
// buffer; on another device, its layers' tensors are copies in that device's memory.
struct gguf_model {
    std::string path;
    size_t file_size = 0;
    llama_hparams hp;
    const model_arch * arch = nullptr;  // what differs between architectures (models/model_arch.h)

    gguf_context * gguf = nullptr;      // metadata
    ggml_context * ctx  = nullptr;      // tensor descriptors (no data of its own)
    void * mapping      = nullptr;      // the whole file, read-only
    ggml_backend_buffer_t weights = nullptr;  // the mapping, as a CPU buffer
    size_t mapped_bytes = 0;                   // of the tensors used from the mapping (the rest are copies)
    // Where each layer runs: devices[layer_device[il]]. The CPU alone, or the devices the model was
    // loaded for (several RPC servers split the layers); token_embd stays in the mapping, as
    // llama.cpp keeps its input layer on the CPU, and output goes to the last device.
    std::vector<ggml_backend_dev_t> devices;
    std::vector<int> layer_device;
    std::vector<ggml_backend_buffer_ptr> device_weights;  // one per device that holds weights
    ggml_context_ptr extra_ctx;                            // a tied output's own descriptor (off the CPU)

    ggml_tensor * token_embd  = nullptr;
    ggml_tensor * output_norm = nullptr;
    ggml_tensor * output      = nullptr;  // == token_embd when embeddings are tied
    ggml_tensor * rope_freqs  = nullptr;  // optional per-dimension frequency factors (llama 3)
    std::vector<llama_layer> layers;

    bool on_cpu() const;  // every layer on the CPU
    int64_t n_params() const;
    std::vector<std::string> weight_types() const;  // distinct ggml type names, most common first

    gguf_model() = default;
    gguf_model(const gguf_model &) = delete;
    gguf_model & operator=(const gguf_model &) = delete;
    ~gguf_model();
};

// Opens and validates a GGUF file. Throws std::invalid_argument with a message "path: problem"
// (missing file, not GGUF, truncated or corrupt header, unsupported architecture or tensor type,
// bad shape, unused tensor, out-of-range hyperparameter or token id, inconsistent vocabulary)
// before anything reaches a ggml assert. devices (devices.h; empty: the CPU) is where the layers
// run; copying to a device that lacks the memory throws not_enough_memory.
std::unique_ptr<gguf_model> load_gguf_model(const std::string & path,
                                            const std::vector<ggml_backend_dev_t> & devices = {});

// What libllama's vocabulary loader reads, checked so that it cannot abort on a bad file: the GGUF
// structure (as above) and the tokenizer metadata (tokenizer model, token list, scores, types,
// merges, special token ids). Throws std::invalid_argument like load_gguf_model.
void check_vocab_file(const std::string & path);

// Text from a file made safe to become a Python str: bytes that are not valid UTF-8 (and control
// characters) as \xNN escapes.
std::string printable(const std::string & s);
bool is_valid_utf8(const std::string & s);

}  // namespace pse
