#include "gguf_model.h"
#include "models/model_arch.h"


#include "devices.h"
#include "host.h"

#include "ggml-alloc.h"
#include "ggml-cpu.h"

#include <algorithm>
#include <cerrno>
#include <cfloat>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <map>
#include <set>
#include <stdexcept>
#include <unordered_map>

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

namespace pse {

namespace {

// One UTF-8 sequence at s[i]: its length, or 0 if the bytes there are not valid (strict, as
// Python's decoder: no overlong forms, no surrogates, nothing above U+10FFFF).
size_t utf8_length(const std::string & s, size_t i) {
    const unsigned char c = s[i];
    if (c < 0x80) return 1;
    size_t n = c >= 0xC2 && c <= 0xDF ? 2 : c >= 0xE0 && c <= 0xEF ? 3 : c >= 0xF0 && c <= 0xF4 ? 4 : 0;
    if (n == 0 || i + n > s.size()) return 0;
    for (size_t k = 1; k < n; ++k) {
        if (((unsigned char) s[i + k] & 0xC0) != 0x80) return 0;
    }
    const unsigned char c1 = s[i + 1];
    if ((c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 >= 0xA0) || (c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 >= 0x90)) {
        return 0;
    }
    return n;
}

}  // namespace

bool is_valid_utf8(const std::string & s) {
    for (size_t i = 0; i < s.size();) {
        const size_t n = utf8_length(s, i);
        if (n == 0) return false;
        i += n;
    }
    return true;
}

std::string printable(const std::string & s) {
    std::string out;
    out.reserve(s.size());
    for (size_t i = 0; i < s.size();) {
        const size_t n = utf8_length(s, i);
        const unsigned char c = s[i];
        if (n == 0 || (n == 1 && (c < 0x20 || c == 0x7F) && c != '\n')) {
            char buf[8];
            std::snprintf(buf, sizeof buf, "\\x%02X", c);
            out += buf;
            i += 1;
        } else {
            out.append(s, i, n);
            i += n;
        }
    }
    return out;
}

namespace {

// Messages become Python str: any bytes from the file in them are escaped to valid UTF-8.
[[noreturn]] void fail(const std::string & path, const std::string & what) {
    throw std::invalid_argument(printable(path + ": " + what));
}

// A name or text from the file, quoted for a message, and cut short: it may be a gigabyte long.
std::string q(const std::string & s) {
    return "'" + (s.size() > 80 ? s.substr(0, 77) + "..." : s) + "'";
}

std::string str(uint64_t v) { return std::to_string(v); }

// ---------------------------------------------------------------------------------------------
// The file, mapped read-only. The structure check reads the header from the mapping, and the
// weights stay in it.

struct mapped_file {
    void * addr = nullptr;
    size_t size = 0;
    mapped_file() = default;
    mapped_file(const mapped_file &) = delete;
    mapped_file & operator=(const mapped_file &) = delete;
    ~mapped_file() { if (addr) munmap(addr, size); }
    const uint8_t * bytes() const { return (const uint8_t *) addr; }
};

void map_file(const std::string & path, mapped_file & out) {
    struct stat st {};
    if (stat(path.c_str(), &st) != 0) fail(path, "no such file");
    // A FIFO or device would block or stream: only a regular file has the random access GGUF needs.
    if (!S_ISREG(st.st_mode)) fail(path, "not a regular file");
    const int fd = open(path.c_str(), O_RDONLY);
    if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
    char magic[4] = {0, 0, 0, 0};
    const ssize_t n = pread(fd, magic, 4, 0);
    if (n != 4 || std::memcmp(magic, "GGUF", 4) != 0) {
        close(fd);
        fail(path, "not a GGUF file (bad magic)");
    }
    void * addr = mmap(nullptr, (size_t) st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (addr == MAP_FAILED) fail(path, std::string("mmap failed: ") + std::strerror(errno));
    out.addr = addr;
    out.size = (size_t) st.st_size;
}

// ---------------------------------------------------------------------------------------------
// Structure check of the raw header, before ggml's own parser sees it. ggml's parser rejects most
// corruption, but some shapes it accepts make ggml_new_tensor abort (a zero dimension followed by
// huge ones, an element count of exactly INT64_MAX), and its messages do not say what is wrong.

// ggml's parser refuses longer strings and arrays; so do we, with a message.
constexpr uint64_t k_max_gguf_length = 1ull << 30;
// No tensor of a model that fits in memory comes near this; it keeps every size computation exact.
constexpr uint64_t k_max_tensor_elements = 1ull << 53;

size_t gguf_scalar_size(uint32_t type) {
    switch (type) {
        case GGUF_TYPE_UINT8: case GGUF_TYPE_INT8: case GGUF_TYPE_BOOL: return 1;
        case GGUF_TYPE_UINT16: case GGUF_TYPE_INT16: return 2;
        case GGUF_TYPE_UINT32: case GGUF_TYPE_INT32: case GGUF_TYPE_FLOAT32: return 4;
        case GGUF_TYPE_UINT64: case GGUF_TYPE_INT64: case GGUF_TYPE_FLOAT64: return 8;
        default: return 0;  // string, array, or not a type
    }
}

class header_reader {
public:
    header_reader(const std::string & path, const uint8_t * data, size_t size) : path_(path), data_(data), size_(size) {}

    size_t pos() const { return pos_; }
    uint64_t left() const { return size_ - pos_; }

    // `what` and `owner` name the field in messages ("the type" of "key 'general.name'").
    template <typename T> T get(const char * what, const std::string & owner) {
        if (left() < sizeof(T)) past_end(what, owner);
        T v;
        std::memcpy(&v, data_ + pos_, sizeof(T));
        pos_ += sizeof(T);
        return v;
    }

    std::string string(const char * what, const std::string & owner) {
        const size_t at = pos_;
        const uint64_t n = string_length(what, owner);
        std::string s((const char *) data_ + at + 8, (size_t) n);
        pos_ += n;
        return s;
    }

    void skip_string(const char * what, const std::string & owner) { pos_ += string_length(what, owner); }

    void skip(uint64_t n) { pos_ += n; }  // callers check n <= left()

    [[noreturn]] void corrupt(const std::string & what) const { fail(path_, "corrupt GGUF header: " + what); }

    [[noreturn]] void past_end(const std::string & what, const std::string & owner) const {
        fail(path_, "truncated or corrupt GGUF header: " + what + (owner.empty() ? "" : " of " + owner) + " at byte " +
                        str(pos_) + " runs past the end of the file (" + str(size_) + " bytes)");
    }

private:
    uint64_t string_length(const char * what, const std::string & owner) {
        const uint64_t n = get<uint64_t>(what, owner);
        if (n > k_max_gguf_length) {
            pos_ -= 8;
            corrupt(std::string(what) + (owner.empty() ? "" : " of " + owner) + " at byte " + str(pos_) +
                    " claims a length of " + str(n) + " bytes");
        }
        if (n > left()) {
            pos_ -= 8;
            past_end(std::string(what) + " (" + str(n) + " bytes)", owner);
        }
        return n;
    }

    const std::string & path_;
    const uint8_t * data_;
    size_t size_;
    size_t pos_ = 0;
};

void check_gguf_structure(const std::string & path, const uint8_t * data, size_t size) {
    header_reader r(path, data, size);
    const std::string none;
    r.skip(4);  // the magic, checked when the file was opened
    const uint32_t version = r.get<uint32_t>("the GGUF version", none);
    if (version != 2 && version != 3) {
        fail(path, "unsupported GGUF version " + str(version) + " (versions 2 and 3 are supported" +
                       ((version & 0xFFFF) == 0 ? "; is the file big-endian?)" : ")"));
    }
    const int64_t n_tensors = r.get<int64_t>("the tensor count", none);
    const int64_t n_kv = r.get<int64_t>("the key/value count", none);
    // A key/value pair takes at least 14 bytes and a tensor description 24: larger counts cannot
    // be right, and refusing them early keeps the loops below short.
    if (n_kv < 0 || (uint64_t) n_kv > r.left() / 14) {
        r.corrupt("the key/value count " + std::to_string(n_kv) + " does not fit in a file of " + str(size) + " bytes");
    }
    if (n_tensors < 0 || (uint64_t) n_tensors > r.left() / 24) {
        r.corrupt("the tensor count " + std::to_string(n_tensors) + " does not fit in a file of " + str(size) + " bytes");
    }

    uint64_t alignment = 32;  // GGUF's default
    for (int64_t i = 0; i < n_kv; ++i) {
        const std::string key = r.string("the name", "key/value pair #" + std::to_string(i));
        if (key.empty()) r.corrupt("key/value pair #" + std::to_string(i) + " has an empty name");
        const std::string owner = "key " + q(key);
        uint32_t type = r.get<uint32_t>("the type", owner);
        uint64_t count = 1;
        const bool is_array = type == GGUF_TYPE_ARRAY;
        if (is_array) {
            type = r.get<uint32_t>("the element type", owner);
            count = r.get<uint64_t>("the length", owner);
            if (count > k_max_gguf_length) r.corrupt(owner + " claims an array of " + str(count) + " elements");
        }
        if (type == GGUF_TYPE_STRING) {
            if (count > r.left() / 8) r.past_end("an array of " + str(count) + " strings", owner);
            for (uint64_t j = 0; j < count; ++j) r.skip_string("a string", owner);
            continue;
        }
        const size_t es = gguf_scalar_size(type);
        if (es == 0) r.corrupt(owner + " has an invalid " + (is_array ? "element " : "") + "type " + str(type));
        if (count > r.left() / es) r.past_end("the value (" + str(count) + " x " + str(es) + " bytes)", owner);
        if (key == "general.alignment") {
            uint32_t a = 0;
            if (!is_array && type == GGUF_TYPE_UINT32) std::memcpy(&a, data + r.pos(), 4);
            if (a == 0 || (a & (a - 1)) != 0) r.corrupt("general.alignment must be a power of two (uint32)");
            alignment = a;
        }
        r.skip(count * es);
    }

    struct span { std::string name; uint64_t offset, nbytes; };
    std::vector<span> spans;  // grows with what is read: a corrupt count must not reserve gigabytes
    for (int64_t i = 0; i < n_tensors; ++i) {
        std::string name = r.string("the name", "tensor #" + std::to_string(i));
        const std::string owner = "tensor #" + std::to_string(i) + " " + q(name);
        if (name.size() >= GGML_MAX_NAME) r.corrupt(owner + " has a name longer than " + str(GGML_MAX_NAME - 1) + " bytes");
        const uint32_t n_dims = r.get<uint32_t>("the dimension count", owner);
        if (n_dims > GGML_MAX_DIMS) r.corrupt(owner + " has " + str(n_dims) + " dimensions (at most " + str(GGML_MAX_DIMS) + ")");
        int64_t ne[GGML_MAX_DIMS] = {1, 1, 1, 1};
        uint64_t n_elements = 1;
        for (uint32_t d = 0; d < n_dims; ++d) {
            ne[d] = r.get<int64_t>("a dimension", owner);
            // ggml's parser lets an empty dimension hide an overflowing one, which the tensor
            // constructor then asserts on; a llama weight has no empty dimension anyway.
            if (ne[d] < 1) r.corrupt(owner + " has dimension " + str(d) + " = " + std::to_string(ne[d]));
            if ((uint64_t) ne[d] > k_max_tensor_elements / n_elements) r.corrupt(owner + " has an impossible number of elements");
            n_elements *= (uint64_t) ne[d];
        }
        const int32_t type = r.get<int32_t>("the type", owner);
        if (type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size((ggml_type) type) == 0 ||
            ggml_type_size((ggml_type) type) == 0) {
            r.corrupt(owner + " has an invalid tensor type " + std::to_string(type));
        }
        const int64_t blck = ggml_blck_size((ggml_type) type);
        if (ne[0] % blck != 0) {
            r.corrupt(owner + " has rows of " + std::to_string(ne[0]) + " elements, not a multiple of the " +
                      ggml_type_name((ggml_type) type) + " block size " + std::to_string(blck));
        }
        const uint64_t offset = r.get<uint64_t>("the data offset", owner);
        spans.push_back({std::move(name), offset, n_elements / (uint64_t) blck * ggml_type_size((ggml_type) type)});
    }
    if (n_tensors == 0) return;
    const uint64_t data_offset = (r.pos() + alignment - 1) / alignment * alignment;
    if (data_offset > size) {
        fail(path, "file is truncated: the tensor data would start at byte " + str(data_offset) + " but the file has " +
                       str(size) + " bytes");
    }
    const uint64_t room = size - data_offset;
    for (const span & t : spans) {
        if (t.offset > room || t.nbytes > room - t.offset) {
            fail(path, "file is truncated: tensor " + q(t.name) + " (" + str(t.nbytes) + " bytes at data offset " +
                           str(t.offset) + ") runs past the end of the file (" + str(size) + " bytes)");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Metadata

const char * type_name_of(const gguf_context * g, int64_t id) {
    const gguf_type t = gguf_get_kv_type(g, id);
    if (t != GGUF_TYPE_ARRAY) return gguf_type_name(t);
    return "array";
}

// Integer metadata may be stored as any integer width; accept all of them.
bool get_int(const gguf_context * g, int64_t id, int64_t & out) {
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_UINT8:  out = gguf_get_val_u8 (g, id); return true;
        case GGUF_TYPE_INT8:   out = gguf_get_val_i8 (g, id); return true;
        case GGUF_TYPE_UINT16: out = gguf_get_val_u16(g, id); return true;
        case GGUF_TYPE_INT16:  out = gguf_get_val_i16(g, id); return true;
        case GGUF_TYPE_UINT32: out = gguf_get_val_u32(g, id); return true;
        case GGUF_TYPE_INT32:  out = gguf_get_val_i32(g, id); return true;
        case GGUF_TYPE_UINT64: {
            const uint64_t v = gguf_get_val_u64(g, id);
            out = v > (uint64_t) INT64_MAX ? INT64_MAX : (int64_t) v;  // saturate: still out of any range
            return true;
        }
        case GGUF_TYPE_INT64:  out = gguf_get_val_i64(g, id); return true;
        default: return false;
    }
}

std::string get_str(const gguf_context * g, const std::string & key) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0 || gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) return "";
    return gguf_get_val_str(g, id);
}

// An integer key in [lo, hi]: `fallback` when absent (or an error when required).
int64_t int_key(const std::string & path, const gguf_context * g, const std::string & key, int64_t lo, int64_t hi,
                bool required, int64_t fallback = 0) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) {
        if (required) fail(path, "missing metadata key '" + key + "'");
        return fallback;
    }
    int64_t v = 0;
    if (!get_int(g, id, v)) fail(path, "metadata '" + key + "' must be an integer, not " + type_name_of(g, id));
    if (v < lo || v > hi) {
        fail(path, "metadata '" + key + "' = " + std::to_string(v) + " is out of range [" + std::to_string(lo) + ", " +
                   std::to_string(hi) + "]");
    }
    return v;
}

// A float key's value (NaN and infinities included), `fallback` when absent.
double float_value(const std::string & path, const gguf_context * g, const std::string & key, double fallback) {
    const int64_t id = gguf_find_key(g, key.c_str());
    if (id < 0) return fallback;
    switch (gguf_get_kv_type(g, id)) {
        case GGUF_TYPE_FLOAT32: return gguf_get_val_f32(g, id);
        case GGUF_TYPE_FLOAT64: return gguf_get_val_f64(g, id);
        default: fail(path, "metadata '" + key + "' must be a float, not " + type_name_of(g, id));
    }
}

[[noreturn]] void bad_float(const std::string & path, const std::string & key, double v, const char * range) {
    char buf[64];
    std::snprintf(buf, sizeof buf, "%g", v);
    fail(path, "metadata '" + key + "' = " + buf + " is invalid: it must be " + range);
}

// A float key strictly inside (lo, hi), `fallback` when absent. NaN fails both comparisons and
// the bounds are finite or +inf, so infinities fail too.
float float_key(const std::string & path, const gguf_context * g, const std::string & key, double lo, double hi,
                float fallback, const char * range) {
    const double v = float_value(path, g, key, fallback);
    if (!(v > lo && v < hi)) bad_float(path, key, v, range);
    return (float) v;
}

// Tokenizer models whose libllama vocabulary this package uses (SentencePiece and GPT-2 BPE: what
// llama-architecture files carry); the others have load paths this package does not exercise.
const char * const k_supported_tokenizers[] = {"llama", "gpt2"};

// Every special-token key libllama reads (seperator is GGUF's spelling).
const char * const k_token_id_keys[] = {
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id", "tokenizer.ggml.unknown_token_id", "tokenizer.ggml.seperator_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.cls_token_id", "tokenizer.ggml.mask_token_id",
    "tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.fim_mid_token_id",
    "tokenizer.ggml.fim_pad_token_id", "tokenizer.ggml.fim_rep_token_id", "tokenizer.ggml.fim_sep_token_id",
    "tokenizer.ggml.prefix_token_id", "tokenizer.ggml.suffix_token_id", "tokenizer.ggml.middle_token_id",
};

// Flags libllama reads as bools (it throws on another type; this says which key).
const char * const k_tokenizer_bool_keys[] = {
    "tokenizer.ggml.add_bos_token", "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_sep_token",
    "tokenizer.ggml.add_space_prefix", "tokenizer.ggml.remove_extra_whitespaces",
};

// n_rows: rows of token_embd.weight, or -1 for a vocabulary-only file.
void check_vocab_metadata(const std::string & path, const gguf_context * g, int64_t n_rows) {
    const int64_t model_id = gguf_find_key(g, "tokenizer.ggml.model");
    if (model_id < 0) fail(path, "missing metadata key 'tokenizer.ggml.model' (the file has no tokenizer)");
    if (gguf_get_kv_type(g, model_id) != GGUF_TYPE_STRING) {
        fail(path, std::string("metadata 'tokenizer.ggml.model' must be a string, not ") + type_name_of(g, model_id));
    }
    const std::string model = gguf_get_val_str(g, model_id);
    bool supported = false;
    for (const char * t : k_supported_tokenizers) supported |= model == t;
    if (!supported) fail(path, "unsupported tokenizer model " + q(model) + " in 'tokenizer.ggml.model' (supported: llama, gpt2)");
    for (const char * key : {"tokenizer.ggml.pre", "tokenizer.chat_template"}) {
        const int64_t id = gguf_find_key(g, key);
        if (id >= 0 && gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) {
            fail(path, std::string("metadata '") + key + "' must be a string, not " + type_name_of(g, id));
        }
    }
    // The chat template reaches Python as str, and chat() feeds it to the template engine.
    if (!is_valid_utf8(get_str(g, "tokenizer.chat_template"))) fail(path, "metadata 'tokenizer.chat_template' is not valid UTF-8");
    for (const char * key : k_tokenizer_bool_keys) {
        const int64_t id = gguf_find_key(g, key);
        if (id >= 0 && gguf_get_kv_type(g, id) != GGUF_TYPE_BOOL) {
            fail(path, std::string("metadata '") + key + "' must be a bool, not " + type_name_of(g, id));
        }
    }

    // The token list, and the arrays that run parallel to it.
    const int64_t tokens_id = gguf_find_key(g, "tokenizer.ggml.tokens");
    if (tokens_id < 0) fail(path, "missing metadata key 'tokenizer.ggml.tokens' (the token list)");
    if (gguf_get_kv_type(g, tokens_id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, tokens_id) != GGUF_TYPE_STRING) {
        fail(path, "metadata 'tokenizer.ggml.tokens' must be an array of strings");
    }
    const size_t n_tokens = gguf_get_arr_n(g, tokens_id);
    if (n_tokens == 0 || n_tokens > (size_t) INT32_MAX) {
        fail(path, "metadata 'tokenizer.ggml.tokens' has " + str(n_tokens) + " tokens");
    }
    if (n_rows >= 0 && (int64_t) n_tokens != n_rows) {
        fail(path, "metadata 'tokenizer.ggml.tokens' has " + str(n_tokens) + " tokens but token_embd.weight has " +
                       std::to_string(n_rows) + " rows");
    }
    struct parallel { const char * key; gguf_type a, b; };
    for (const parallel & p : {parallel{"tokenizer.ggml.scores", GGUF_TYPE_FLOAT32, GGUF_TYPE_INT32},
                               parallel{"tokenizer.ggml.token_type", GGUF_TYPE_INT32, GGUF_TYPE_INT32}}) {
        const int64_t id = gguf_find_key(g, p.key);
        if (id < 0) continue;
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_ARRAY ||
            (gguf_get_arr_type(g, id) != p.a && gguf_get_arr_type(g, id) != p.b)) {
            fail(path, std::string("metadata '") + p.key + "' must be an array of " + gguf_type_name(p.a));
        }
        if (gguf_get_arr_n(g, id) != n_tokens) {
            fail(path, std::string("metadata '") + p.key + "' has " + str(gguf_get_arr_n(g, id)) +
                           " entries but tokenizer.ggml.tokens has " + str(n_tokens));
        }
    }
    const int64_t merges_id = gguf_find_key(g, "tokenizer.ggml.merges");
    if (merges_id >= 0 &&
        (gguf_get_kv_type(g, merges_id) != GGUF_TYPE_ARRAY || gguf_get_arr_type(g, merges_id) != GGUF_TYPE_STRING)) {
        fail(path, "metadata 'tokenizer.ggml.merges' must be an array of strings");
    }
    if (model == "gpt2" && merges_id < 0) fail(path, "missing metadata key 'tokenizer.ggml.merges' (a gpt2 tokenizer needs it)");

    // libllama maps text to id and asserts the map is as long as the list: a repeated token aborts
    // it. An empty token stands for "[EMPTY_<id>]" there, so it is counted that way here.
    {
        std::unordered_map<std::string, size_t> seen;
        seen.reserve(n_tokens);
        for (size_t i = 0; i < n_tokens; ++i) {
            std::string text = gguf_get_arr_str(g, tokens_id, i);
            if (text.empty()) text = "[EMPTY_" + std::to_string(i) + "]";
            auto ins = seen.emplace(std::move(text), i);
            if (!ins.second) {
                fail(path, "metadata 'tokenizer.ggml.tokens' lists token " + q(ins.first->first) + " twice (ids " +
                               str(ins.first->second) + " and " + str(i) + ")");
            }
        }
    }

    // libllama silently replaces an out-of-range special token with a default; a file that names a
    // token it does not have is broken, and generation would stop (or not) at the wrong token.
    for (const char * key : k_token_id_keys) {
        const int64_t id = gguf_find_key(g, key);
        if (id < 0) continue;
        int64_t v = 0;
        if (!get_int(g, id, v)) fail(path, std::string("metadata '") + key + "' must be an integer, not " + type_name_of(g, id));
        if (v < 0 || v >= (int64_t) n_tokens) {
            fail(path, std::string("metadata '") + key + "' = " + std::to_string(v) +
                           " is not a token id (the vocabulary has " + str(n_tokens) + " tokens)");
        }
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_UINT32) {
            fail(path, std::string("metadata '") + key + "' must be a uint32 (as libllama reads it), not " + type_name_of(g, id));
        }
    }
}

}  // namespace

void check_vocab_file(const std::string & path) {
    mapped_file file;
    map_file(path, file);
    check_gguf_structure(path, file.bytes(), file.size);
    ggml_context * ctx = nullptr;
    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ &ctx};
    gguf_context * g = gguf_init_from_file(path.c_str(), params);
    if (!g) fail(path, "corrupt or truncated GGUF header");
    try {
        ggml_tensor * te = ggml_get_tensor(ctx, "token_embd.weight");
        check_vocab_metadata(path, g, te ? te->ne[1] : -1);
    } catch (...) {
        ggml_free(ctx);
        gguf_free(g);
        throw;
    }
    ggml_free(ctx);
    gguf_free(g);
}

gguf_model::~gguf_model() {
    if (weights) ggml_backend_buffer_free(weights);
    if (mapping) munmap(mapping, file_size);
    if (ctx) ggml_free(ctx);
    if (gguf) gguf_free(gguf);
}

bool gguf_model::on_cpu() const { return devices.size() == 1 && is_cpu(devices[0]); }

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

// Whether dev can run the operation that uses weight w (a matrix multiplication, or the
// elementwise product/sum of a norm or bias), as llama.cpp asks before placing a weight.
static bool device_runs_weight(ggml_backend_dev_t dev, ggml_tensor * w) {
    ggml_init_params ip = {ggml_tensor_overhead() * 4, nullptr, /*no_alloc =*/ true};
    ggml_context_ptr ctx(ggml_init(ip));
    ggml_tensor * x = ggml_new_tensor_2d(ctx.get(), GGML_TYPE_F32, w->ne[0], 512);
    ggml_tensor * op = w->ne[1] > 1 ? ggml_mul_mat(ctx.get(), w, x) : ggml_mul(ctx.get(), x, w);
    return ggml_backend_dev_supports_op(dev, op);
}

// Points every tensor at its bytes in the mapping (the page cache holds the weights once) or, for
// a layer that runs on another device, copies it into that device's buffer.
static void place_weights(gguf_model & m, std::vector<ggml_backend_dev_t> devices, size_t data_offset) {
    if (devices.empty()) devices = {cpu_device()};
    m.devices = devices;
    m.layer_device.resize(m.hp.n_layer);
    // Layers split evenly among the devices, in order.
    for (int il = 0; il < m.hp.n_layer; ++il) m.layer_device[il] = (int) ((int64_t) il * devices.size() / m.hp.n_layer);
    std::unordered_map<const ggml_tensor *, int> where;  // tensor -> device index; absent: the mapping
    if (!m.on_cpu()) {
        const auto put = [&](ggml_tensor * t, int d) {
            if (t && (is_cpu(devices[d]) || device_runs_weight(devices[d], t))) where[t] = d;
        };
        for (int il = 0; il < m.hp.n_layer; ++il) {
            const llama_layer & L = m.layers[il];
            for (ggml_tensor * t : {L.attn_norm, L.wq, L.wk, L.wv, L.wo, L.bq, L.bk, L.bv, L.bo, L.wqkv, L.bqkv,
                                    L.attn_q_norm, L.attn_k_norm, L.ffn_norm, L.ffn_gate, L.ffn_up, L.ffn_down}) {
                put(t, m.layer_device[il]);
            }
        }
        const int last = (int) devices.size() - 1;
        if (m.output == m.token_embd && device_runs_weight(devices[last], m.token_embd)) {
            // Tied embeddings: the output head gets a descriptor of its own, so that it can run on
            // the device while the embedding lookup reads the mapping.
            ggml_init_params ip = {ggml_tensor_overhead(), nullptr, /*no_alloc =*/ true};
            m.extra_ctx.reset(ggml_init(ip));
            m.output = ggml_dup_tensor(m.extra_ctx.get(), m.token_embd);
            ggml_set_name(m.output, "output.weight");
        }
        put(m.output_norm, last);
        put(m.output, last);
        put(m.rope_freqs, 0);
    }

    const gguf_context * g = m.gguf;
    const auto file_bytes = [&](const ggml_tensor * t) {
        const int64_t id = gguf_find_tensor(g, t == m.output && m.extra_ctx ? m.token_embd->name : t->name);
        return (const char *) m.mapping + data_offset + gguf_get_tensor_offset(g, id);
    };
    m.weights = ggml_backend_cpu_buffer_from_ptr(m.mapping, m.file_size);
    ggml_backend_buffer_set_usage(m.weights, GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
    m.mapped_bytes = 0;
    for (ggml_tensor * t = ggml_get_first_tensor(m.ctx); t; t = ggml_get_next_tensor(m.ctx, t)) {
        if (where.count(t)) continue;
        m.mapped_bytes += ggml_nbytes(t);
        // ggml never writes to weight buffers; the cast drops const only to satisfy the buffer API.
        if (ggml_backend_tensor_alloc(m.weights, t, (void *) file_bytes(t)) != GGML_STATUS_SUCCESS) {
            fail(m.path, std::string("cannot place tensor '") + t->name + "'");
        }
    }
    std::vector<ggml_tensor *> copied;  // in the file's order
    for (ggml_tensor * t = ggml_get_first_tensor(m.ctx); t; t = ggml_get_next_tensor(m.ctx, t)) {
        if (where.count(t)) copied.push_back(t);
    }
    if (m.extra_ctx && where.count(m.output)) copied.push_back(m.output);
    for (size_t d = 0; d < devices.size(); ++d) {
        ggml_backend_buffer_type_t buft = ggml_backend_dev_buffer_type(devices[d]);
        const size_t align = ggml_backend_buft_get_alignment(buft);
        size_t bytes = 0;
        for (ggml_tensor * t : copied) {
            if (where[t] == (int) d) bytes += GGML_PAD(ggml_backend_buft_get_alloc_size(buft, t), align);
        }
        if (bytes == 0) continue;
        require_device_memory(devices[d], bytes, "the weights of " + m.path + " on " + device_spec(devices[d]));
        ggml_backend_buffer_ptr buf(ggml_backend_buft_alloc_buffer(buft, bytes));
        if (!buf) throw not_enough_memory("cannot allocate " + format_bytes(bytes) + " for the weights on " + device_spec(devices[d]));
        ggml_backend_buffer_set_usage(buf.get(), GGML_BACKEND_BUFFER_USAGE_WEIGHTS);
        ggml_tallocr alloc = ggml_tallocr_new(buf.get());
        for (ggml_tensor * t : copied) {
            if (where[t] != (int) d) continue;
            if (ggml_tallocr_alloc(&alloc, t) != GGML_STATUS_SUCCESS) fail(m.path, std::string("cannot place tensor '") + t->name + "'");
            ggml_backend_tensor_set(t, file_bytes(t), 0, ggml_nbytes(t));
        }
        m.device_weights.push_back(std::move(buf));
    }
}

std::unique_ptr<gguf_model> load_gguf_model(const std::string & path, const std::vector<ggml_backend_dev_t> & devices) {
    auto m = std::make_unique<gguf_model>();
    m->path = path;
    {
        mapped_file file;
        map_file(path, file);
        check_gguf_structure(path, file.bytes(), file.size);
        m->mapping = file.addr;  // the model owns the mapping from here on
        m->file_size = file.size;
        file.addr = nullptr;
    }

    gguf_init_params params = {/*no_alloc =*/ true, /*ctx =*/ &m->ctx};
    m->gguf = gguf_init_from_file(path.c_str(), params);
    if (!m->gguf) fail(path, "corrupt or truncated GGUF header");

    const gguf_context * g = m->gguf;
    llama_hparams & hp = m->hp;
    {
        const int64_t id = gguf_find_key(g, "general.architecture");
        if (id < 0) fail(path, "no general.architecture in metadata");
        if (gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) {
            fail(path, std::string("metadata 'general.architecture' must be a string, not ") + type_name_of(g, id));
        }
        hp.arch = gguf_get_val_str(g, id);
    }
    // Shown by info(): text, not bytes, and not the whole of a corrupt string.
    hp.name = printable(get_str(g, "general.name").substr(0, 256));
    m->arch = find_model_arch(hp.arch);
    if (!m->arch) fail(path, "unsupported architecture " + q(hp.arch) + " (supported: " + supported_model_archs() + ")");
    // This loader maps one file and runs dense FFNs: name what it cannot load rather than report a
    // missing tensor.
    if (int_key(path, g, "split.count", 0, 65535, false, 1) > 1) fail(path, "split GGUF files (split.count > 1) are not supported");

    const std::string a = hp.arch + ".";
    if (int_key(path, g, a + "expert_count", 0, 1 << 16, false, 0) > 0) {
        fail(path, "mixture-of-experts models (" + a + "expert_count > 0) are not supported");
    }
    hp.n_ctx_train = (int32_t) int_key(path, g, a + "context_length", 1, 1 << 24, true);
    hp.n_embd      = (int32_t) int_key(path, g, a + "embedding_length", 1, 1 << 20, true);
    hp.n_layer     = (int32_t) int_key(path, g, a + "block_count", 1, 4096, true);
    hp.n_ff        = (int32_t) int_key(path, g, a + "feed_forward_length", 1, 1 << 22, true);
    hp.n_head      = (int32_t) int_key(path, g, a + "attention.head_count", 1, 4096, true);
    hp.n_head_kv   = (int32_t) int_key(path, g, a + "attention.head_count_kv", 1, hp.n_head, false, hp.n_head);
    if (hp.n_head % hp.n_head_kv != 0) {
        fail(path, "metadata '" + a + "attention.head_count' (" + std::to_string(hp.n_head) +
                   ") is not a multiple of '" + a + "attention.head_count_kv' (" + std::to_string(hp.n_head_kv) + ")");
    }
    const bool has_key_length = gguf_find_key(g, (a + "attention.key_length").c_str()) >= 0;
    if (!has_key_length && hp.n_embd % hp.n_head != 0) {
        fail(path, "metadata '" + a + "embedding_length' (" + std::to_string(hp.n_embd) + ") is not a multiple of '" + a +
                   "attention.head_count' (" + std::to_string(hp.n_head) + ")");
    }
    // Head sizes: even (RoPE rotates pairs), at most 512 (the attention kernels' limit).
    hp.head_dim = (int32_t) int_key(path, g, a + "attention.key_length", 2, 512, false, hp.n_embd / hp.n_head);
    if (hp.head_dim % 2 != 0 || hp.head_dim > 512 || hp.head_dim < 2) {
        fail(path, "unsupported head size " + std::to_string(hp.head_dim) + " (even, 2 to 512)");
    }
    // The cache and the attention keep one head size for keys and values.
    const int64_t value_length = int_key(path, g, a + "attention.value_length", 1, 512, false, hp.head_dim);
    if (value_length != hp.head_dim) {
        fail(path, "metadata '" + a + "attention.value_length' (" + std::to_string(value_length) +
                   ") differs from the key length (" + std::to_string(hp.head_dim) + "): not supported");
    }
    hp.n_rot = (int32_t) int_key(path, g, a + "rope.dimension_count", 1, 512, false, hp.head_dim);
    if (hp.n_rot != hp.head_dim) {
        fail(path, "metadata '" + a + "rope.dimension_count' (" + std::to_string(hp.n_rot) +
                   ") differs from the head size (" + std::to_string(hp.head_dim) + "): partial RoPE is not supported");
    }
    hp.rope_freq_base = float_key(path, g, a + "rope.freq_base", 0.0, FLT_MAX, 10000.0f, "finite and > 0");
    // llama.cpp requires the key and accepts any value; ggml aborts on eps < 0 or NaN, and eps = 0
    // divides by zero on an all-zero row.
    hp.rms_eps = float_key(path, g, a + "attention.layer_norm_rms_epsilon", 0.0, 1.0, 1e-5f, "in (0, 1)");
    {
        const std::string type_key = a + "rope.scaling.type";
        const int64_t id = gguf_find_key(g, type_key.c_str());
        if (id >= 0 && gguf_get_kv_type(g, id) != GGUF_TYPE_STRING) {
            fail(path, "metadata '" + type_key + "' must be a string, not " + type_name_of(g, id));
        }
        const std::string type = get_str(g, type_key);
        if (!type.empty() && type != "none" && type != "linear") {
            fail(path, "unsupported RoPE scaling type " + q(type) + " in '" + type_key + "' (supported: none, linear)");
        }
        // As llama.cpp: the factor (or the older rope.scale_linear) applies unless the type is
        // "none", and 0 means no scaling.
        const std::string factor_key = gguf_find_key(g, (a + "rope.scaling.factor").c_str()) >= 0
                                           ? a + "rope.scaling.factor" : a + "rope.scale_linear";
        const double factor = float_value(path, g, factor_key, 0.0);
        // A factor below 1 would shrink the context (no model does); an infinite one, or a tiny one
        // whose inverse overflows, would make every rotation NaN.
        if (!(factor == 0.0 || (factor >= 1.0 && factor <= FLT_MAX))) {
            bad_float(path, factor_key, factor, "finite and >= 1 (or 0: no scaling)");
        }
        hp.rope_freq_scale = type == "none" || factor == 0.0 ? 1.0f : (float) (1.0 / factor);
    }
    hp.rope_mode = m->arch->rope_mode;
    if (m->arch->unsupported) {
        const std::string why = m->arch->unsupported(g, hp);
        if (!why.empty()) fail(path, why);
    }

    // Tensor types the CPU backend can compute; the structure check placed every tensor inside
    // the file.
    const size_t data_offset = gguf_get_data_offset(g);
    const int64_t n_tensors = gguf_get_n_tensors(g);
    for (int64_t i = 0; i < n_tensors; ++i) {
        const char * name = gguf_get_tensor_name(g, i);
        const ggml_type type = gguf_get_tensor_type(g, i);
        // vec_dot is what the CPU backend's matrix multiplication needs of a weight type.
        if ((int) type < 0 || type >= GGML_TYPE_COUNT || ggml_blck_size(type) == 0 || ggml_type_size(type) == 0 ||
            ggml_get_type_traits_cpu(type)->vec_dot == nullptr) {
            fail(path, "tensor " + q(name) + " has an unsupported type (" + ggml_type_name(type) + ")");
        }
        const uint64_t offset = gguf_get_tensor_offset(g, i), size = gguf_get_tensor_size(g, i);
        if (data_offset > m->file_size || offset > m->file_size - data_offset ||
            size > m->file_size - data_offset - offset) {
            fail(path, "file is truncated: tensor " + q(name) + " runs past the end of the file (" +
                       str(m->file_size) + " bytes)");
        }
    }

    // Find and shape-check the tensors: the ones every architecture has here, a layer's own in
    // its architecture's load_layer.
    std::set<const ggml_tensor *> used;
    auto get = [&](const std::string & name, const std::vector<int64_t> & ne, bool required) -> ggml_tensor * {
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
        used.insert(t);
        return t;
    };

    const int64_t n_embd = hp.n_embd;
    {
        ggml_tensor * te = ggml_get_tensor(m->ctx, "token_embd.weight");
        if (!te) fail(path, "missing tensor 'token_embd.weight'");
        // Token ids are int32 throughout (ggml_get_rows, libllama).
        if (te->ne[1] < 1 || te->ne[1] > INT32_MAX) {
            fail(path, "tensor 'token_embd.weight' has " + std::to_string(te->ne[1]) + " rows: not a vocabulary size");
        }
        hp.n_vocab = (int32_t) te->ne[1];
        const int64_t nv = int_key(path, g, a + "vocab_size", 1, INT32_MAX, false, hp.n_vocab);
        if (nv != hp.n_vocab) {
            fail(path, "metadata '" + a + "vocab_size' (" + std::to_string(nv) + ") does not match token_embd.weight's " +
                       std::to_string(hp.n_vocab) + " rows");
        }
    }
    m->token_embd  = get("token_embd.weight", {n_embd, hp.n_vocab}, true);
    m->output_norm = get("output_norm.weight", {n_embd}, true);
    m->output      = get("output.weight", {n_embd, hp.n_vocab}, false);
    if (!m->output) m->output = m->token_embd;  // tied embeddings
    m->rope_freqs  = get("rope_freqs.weight", {hp.n_rot / 2}, false);
    if (m->rope_freqs && m->rope_freqs->type != GGML_TYPE_F32) fail(path, "rope_freqs must be F32");

    const tensor_finder finder{get};
    m->layers.resize(hp.n_layer);
    for (int il = 0; il < hp.n_layer; ++il) {
        const std::string p = "blk." + std::to_string(il) + ".";
        llama_layer & L = m->layers[il];
        L.attn_norm = get(p + "attn_norm.weight", {n_embd}, true);
        L.ffn_norm = get(p + "ffn_norm.weight", {n_embd}, true);
        m->arch->load_layer(finder, hp, p, L);
        for (ggml_tensor * t : {L.attn_norm, L.ffn_norm, L.bq, L.bk, L.bv, L.bo, L.bqkv, L.attn_q_norm, L.attn_k_norm}) {
            if (t && t->type != GGML_TYPE_F32) fail(path, std::string("tensor '") + t->name + "' must be F32");
        }
    }
    if (m->output_norm->type != GGML_TYPE_F32) fail(path, "tensor 'output_norm.weight' must be F32");
    // As llama.cpp: a tensor the graph does not use means the metadata and the weights disagree
    // (block_count too small, another architecture's layout), so the file is refused.
    for (ggml_tensor * t = ggml_get_first_tensor(m->ctx); t; t = ggml_get_next_tensor(m->ctx, t)) {
        if (!used.count(t)) {
            fail(path, "unused tensor " + q(t->name) + ": the " + hp.arch + " graph (" + a + "block_count = " +
                       std::to_string(hp.n_layer) + ") does not use it");
        }
    }

    check_vocab_metadata(path, g, hp.n_vocab);

    place_weights(*m, devices, data_offset);
    return m;
}

}  // namespace pse
