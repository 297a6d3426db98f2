#include "gguf_model.h"

#include "ggml-cpu.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <map>
#include <stdexcept>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace pse {

namespace {

[[noreturn]] void fail(const std::string & path, const std::string & what) {
    throw std::invalid_argument(path + ": " + what);
}

// Integer metadata may be stored as any integer width; accept all of them.
bool get_int(const gguf_context * g, const std::string & key, int64_t & out) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return false;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8:  out = gguf_get_val_u8 (g, id); return true;
        case GGUF_TYPE_INT8:   out = gguf_get_val_i8 (g, id); return true;
        case GGUF_TYPE_UINT16: out = gguf_get_val_u16(g, id); return true;
        case GGUF_TYPE_INT16:  out = gguf_get_val_i16(g, id); return true;
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(g, id); return true;
        case GGUF_TYPE_INT32:  out = gguf_get_val_i32(g, id); return true;
        case GGUF_TYPE_UINT64: out = (int64_t) gguf_get_val_u64(g, id); return true;
        case GGUF_TYPE_INT64:  out = gguf_get_val_i64(g, id); return true;
        default: return false;
    }
}

bool get_float(const gguf_context * g, const std::string & key, float & out) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return false;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: out = gguf_get_val_f32(g, id); return true;
        case GGUF_TYPE_FLOAT64: out = (float) gguf_get_val_f64(g, id); return true;
        default: return false;
    }
}

std::string get_str(const gguf_context * g, const std::string & key) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) return "";
    return gguf_get_val_str(g, id);
}

int32_t require_int(const std::string & path, const gguf_context * g, const std::string & key,
                    int64_t lo, int64_t hi) {
    int64_t v = 0;
    if (!get_int(g, key, v)) fail(path, "missing or non-integer metadata key '" + key + "'");
    if (v < lo || v > hi) {
        fail(path, "metadata '" + key + "' = " + std::to_string(v) + " is out of range [" +
                   std::to_string(lo) + ", " + std::to_string(hi) + "]");
    }
    return (int32_t) v;
}

// Architectures whose forward pass is the llama graph (Mistral GGUFs use "llama" too).
const char * const k_supported_arch[] = {"llama"};

}  // namespace

gguf_model::~gguf_model() {
    if (weights) ggml_backend_buffer_free(weights);
    if (mapping) munmap(mapping, file_size);
    if (ctx) ggml_free(ctx);
    if (gguf) gguf_free(gguf);
}

int64_t gguf_model::n_params() const {
    int64_t n = 0;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) n += ggml_nelements(t);
    return n;
}

std::vector<std::string> gguf_model::weight_types() const {
    std::map<std::string, int64_t> count;
    for (ggml_tensor * t = ggml_get_first_tensor(ctx); t; t = ggml_get_next_tensor(ctx, t)) {
        count[ggml_type_name(t->type)] += ggml_nelements(t);
    }
    std::vector<std::pair<int64_t, std::string>> v;
    for (auto & kv : count) v.push_back({-kv.second, kv.first});
    std::sort(v.begin(), v.end());
    std::vector<std::string> out;
    for (auto & p : v) out.push_back(p.second);
    return out;
}

std::unique_ptr<gguf_model> load_gguf_model(const std::string & path) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) fail(path, "no such file");
    if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");

    {
        // gguf_init_from_file says little about a non-GGUF file; check the magic ourselves.
        FILE * f = std::fopen(path.c_str(), "rb");
        if (!f) fail(path, std::string("cannot open: ") + std::strerror(errno));
        char magic[4] = {0, 0, 0, 0};
        const size_t n = std::fread(magic, 1, 4, f);
        std::fclose(f);
        if (n != 4 || std::memcmp(magic, "GGUF", 4) != 0) fail(path, "not a GGUF file (bad magic)");
    }

    auto m = std::make_unique<gguf_model>();
    m->path = path;
    m->file_size = (size_t) st.st_size;

    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ &m->ctx};
    m->gguf = gguf_init_from_file(path.c_str(), params);
    if (!m->gguf) fail(path, "corrupt or truncated GGUF header");

    const gguf_context * g = m->gguf;
    llama_hparams & hp = m->hp;
    hp.arch = get_str(g, "general.architecture");
    hp.name = get_str(g, "general.name");
    if (hp.arch.empty()) fail(path, "no general.architecture in metadata");
    bool supported = false;
    for (const char * a : k_supported_arch) supported |= hp.arch == a;
    if (!supported) fail(path, "unsupported architecture '" + hp.arch + "' (supported: llama)");

    const std::string a = hp.arch + ".";
    hp.n_ctx_train = require_int(path, g, a + "context_length", 1, 1 << 24);
    hp.n_embd      = require_int(path, g, a + "embedding_length", 1, 1 << 20);
    hp.n_layer     = require_int(path, g, a + "block_count", 1, 4096);
    hp.n_ff        = require_int(path, g, a + "feed_forward_length", 1, 1 << 22);
    hp.n_head      = require_int(path, g, a + "attention.head_count", 1, 4096);
    int64_t v = 0;
    hp.n_head_kv = get_int(g, a + "attention.head_count_kv", v) ? (int32_t) v : hp.n_head;
    if (hp.n_head_kv < 1 || hp.n_head % hp.n_head_kv != 0) {
        fail(path, "attention.head_count (" + std::to_string(hp.n_head) + ") is not a multiple of head_count_kv (" +
                   std::to_string(hp.n_head_kv) + ")");
    }
    if (hp.n_embd % hp.n_head != 0 && !get_int(g, a + "attention.key_length", v)) {
        fail(path, "embedding_length is not a multiple of head_count");
    }
    hp.head_dim = get_int(g, a + "attention.key_length", v) ? (int32_t) v : hp.n_embd / hp.n_head;
    hp.n_rot    = get_int(g, a + "rope.dimension_count", v) ? (int32_t) v : hp.head_dim;
    if (hp.n_rot != hp.head_dim) fail(path, "partial RoPE (rope.dimension_count != head size) is not supported");
    if (hp.head_dim % 2 != 0 || hp.head_dim > 512) fail(path, "unsupported head size " + std::to_string(hp.head_dim));
    get_float(g, a + "rope.freq_base", hp.rope_freq_base);
    get_float(g, a + "attention.layer_norm_rms_epsilon", hp.rms_eps);
    {
        const std::string type = get_str(g, a + "rope.scaling.type");
        float factor = 0.0f;
        if (type == "linear" && get_float(g, a + "rope.scaling.factor", factor) && factor > 0.0f) {
            hp.rope_freq_scale = 1.0f / factor;
        } else if (!type.empty() && type != "none" && type != "linear") {
            fail(path, "unsupported RoPE scaling type '" + type + "'");
        }
    }
    hp.rope_mode = 0;  // llama: adjacent pairs

    // Tensor data: types the CPU backend can compute, and all of it inside the file.
    const size_t data_offset = gguf_get_data_offset(g);
    const int64_t n_tensors = gguf_get_n_tensors(g);
    for (int64_t i = 0; i < n_tensors; ++i) {
        const char * name = gguf_get_tensor_name(g, i);
        const ggml_type type = gguf_get_tensor_type(g, i);
        // vec_dot is what the CPU backend's matrix multiplication needs of a weight type.
        if ((int) type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size(type) == 0 || ggml_type_size(type) == 0 ||
            ggml_get_type_traits_cpu(type)->vec_dot == nullptr) {
            fail(path, std::string("tensor '") + name + "' has an unsupported type (" + ggml_type_name(type) + ")");
        }
        const size_t end = data_offset + gguf_get_tensor_offset(g, i) + gguf_get_tensor_size(g, i);
        if (end > m->file_size) {
            fail(path, "file is truncated: tensor '" + std::string(name) + "' ends at byte " + std::to_string(end) +
                       " but the file has " + std::to_string(m->file_size));
        }
    }

    // Find and shape-check the tensors of the llama graph.
    auto get = [&](const std::string & name, std::vector<int64_t> ne, bool required) -> ggml_tensor * {
        ggml_tensor * t = ggml_get_tensor(m->ctx, name.c_str());
        if (!t) {
            if (required) fail(path, "missing tensor '" + name + "'");
            return nullptr;
        }
        for (size_t d = 0; d < GGML_MAX_DIMS; ++d) {
            const int64_t want = d < ne.size() ? ne[d] : 1;
            if (t->ne[d] != want) {
                std::string got, exp;
                for (int k = 0; k < GGML_MAX_DIMS; ++k) got += (k ? "," : "") + std::to_string(t->ne[k]);
                for (size_t k = 0; k < ne.size(); ++k) exp += (k ? "," : "") + std::to_string(ne[k]);
                fail(path, "tensor '" + name + "' has shape [" + got + "], expected [" + exp + "]");
            }
        }
        return t;
    };

    const int64_t n_embd = hp.n_embd, n_q = (int64_t) hp.head_dim * hp.n_head;
    const int64_t n_kv = (int64_t) hp.head_dim * hp.n_head_kv;
    {
        ggml_tensor * te = ggml_get_tensor(m->ctx, "token_embd.weight");
        if (!te) fail(path, "missing tensor 'token_embd.weight'");
        hp.n_vocab = (int32_t) te->ne[1];
        int64_t nv = 0;
        if (get_int(g, a + "vocab_size", nv) && nv != hp.n_vocab) {
            fail(path, "vocab_size " + std::to_string(nv) + " does not match token_embd rows " + std::to_string(hp.n_vocab));
        }
    }
    m->token_embd  = get("token_embd.weight", {n_embd, hp.n_vocab}, true);
    m->output_norm = get("output_norm.weight", {n_embd}, true);
    m->output      = get("output.weight", {n_embd, hp.n_vocab}, false);
    if (!m->output) m->output = m->token_embd;  // tied embeddings
    m->rope_freqs  = get("rope_freqs.weight", {hp.n_rot / 2}, false);
    if (m->rope_freqs && m->rope_freqs->type != GGML_TYPE_F32) fail(path, "rope_freqs must be F32");

    m->layers.resize(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        llama_layer & L = m->layers[il];
        L.attn_norm = get(p + "attn_norm.weight", {n_embd}, true);
        L.wq = get(p + "attn_q.weight", {n_embd, n_q}, true);
        L.wk = get(p + "attn_k.weight", {n_embd, n_kv}, true);
        L.wv = get(p + "attn_v.weight", {n_embd, n_kv}, true);
        L.wo = get(p + "attn_output.weight", {n_q, n_embd}, true);
        L.bq = get(p + "attn_q.bias", {n_q}, false);
        L.bk = get(p + "attn_k.bias", {n_kv}, false);
        L.bv = get(p + "attn_v.bias", {n_kv}, false);
        L.bo = get(p + "attn_output.bias", {n_embd}, false);
        L.ffn_norm = get(p + "ffn_norm.weight", {n_embd}, true);
        L.ffn_gate = get(p + "ffn_gate.weight", {n_embd, hp.n_ff}, true);
        L.ffn_up   = get(p + "ffn_up.weight", {n_embd, hp.n_ff}, true);
        L.ffn_down = get(p + "ffn_down.weight", {hp.n_ff, n_embd}, true);
        for (ggml_tensor * t : {L.attn_norm, L.ffn_norm, L.bq, L.bk, L.bv, L.bo}) {
            if (t && t->type != GGML_TYPE_F32) fail(path, std::string("tensor '") + t->name + "' must be F32");
        }
    }
    if (m->output_norm->type != GGML_TYPE_F32) fail(path, "tensor 'output_norm.weight' must be F32");

    // Map the file and point every tensor at its bytes: the page cache holds the weights once.
    const int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
    void * addr = mmap(nullptr, m->file_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (addr == MAP_FAILED) fail(path, std::string("mmap failed: ") + std::strerror(errno));
    m->mapping = addr;
    // ggml never writes to weight buffers; the cast drops const only to satisfy the buffer API.
    m->weights = ggml_backend_cpu_buffer_from_ptr(addr, m->file_size);
    ggml_backend_buffer_set_usage(m->weights, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    for (int64_t i = 0; i < n_tensors; ++i) {
        ggml_tensor * t = ggml_get_tensor(m->ctx, gguf_get_tensor_name(g, i));
        char * data = (char *) addr + data_offset + gguf_get_tensor_offset(g, i);
        if (ggml_backend_tensor_alloc(m->weights, t, data) != GGML_STATUS_SUCCESS) {
            fail(path, std::string("cannot place tensor '") + t->name + "'");
        }
    }
    return m;
}

}  // namespace pse
