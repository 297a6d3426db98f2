#include "vocab.h"

#include "gguf_model.h"
#include "llama.h"

#include <cstdio>
#include <stdexcept>

namespace pse {

static bool g_verbose = false;
// libllama reports why a load failed only through the log; a load collects its error lines here
// (per thread: loads may run on several threads at once) to put the reason in the exception.
static thread_local std::string * t_errors = nullptr;

static void log_callback(ggml_log_level level, const char * text, void *) {
    if (level == GGML_LOG_LEVEL_ERROR && t_errors) t_errors->append(text);
    if (g_verbose || level == GGML_LOG_LEVEL_ERROR) std::fputs(text, stderr);
}

// The first error line without its "function: " prefixes, e.g. "unknown pre-tokenizer type: 'x'".
static std::string first_reason(const std::string & log) {
    std::string line = log.substr(0, log.find('\n'));
    for (const char * prefix : {"llama_model_load: ", "error loading model: ", "error loading model vocabulary: "}) {
        const size_t at = line.find(prefix);
        if (at != std::string::npos) line = line.substr(at + std::string(prefix).size());
    }
    return line;
}

// libllama's tokenizer throws std::out_of_range (a byte with no token in an incomplete
// vocabulary) and others; they say what failed only together with the operation.
template <typename F>
static auto guarded(const char * what, F && f) -> decltype(f()) {
    try {
        return f();
    } catch (const std::exception & e) {
        throw std::runtime_error(std::string(what) + " failed (is the model's vocabulary incomplete?): " + printable(e.what()));
    }
}

void set_verbose_logging(bool verbose) {
    g_verbose = verbose;
    llama_log_set(log_callback, nullptr);
}

vocab::vocab(const std::string & path) {
    // libllama's loader asserts on some corrupt files: check what it reads before it reads it.
    check_vocab_file(path);
    llama_model_params p = llama_model_default_params();
    p.vocab_only = true;
    std::string errors;
    {
        struct collect {
            explicit collect(std::string * s) { t_errors = s; }
            ~collect() { t_errors = nullptr; }
        } during_load(&errors);
        model_ = llama_model_load_from_file(path.c_str(), p);
    }
    if (!model_) {
        const std::string reason = printable(first_reason(errors));
        throw std::invalid_argument(path + ": libllama could not load the vocabulary" + (reason.empty() ? "" : ": " + reason));
    }
    vocab_ = llama_model_get_vocab(model_);
}

vocab::~vocab() {
    if (model_) llama_model_free(model_);
}

void vocab::check_id(int32_t id) const {
    if (id < 0 || id >= n_vocab()) {
        throw std::invalid_argument("token id " + std::to_string(id) + " is outside the vocabulary [0, " +
                                    std::to_string(n_vocab()) + ")");
    }
}

std::vector<int32_t> vocab::tokenize(const std::string & text, bool add_special, bool parse_special) const {
    if (text.size() > (size_t) INT32_MAX / 2) throw std::length_error("text too long to tokenize");
    std::vector<llama_token> ids(text.size() + 8);
    int32_t n = guarded("tokenization", [&] {
        int32_t r = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                                   add_special, parse_special);
        if (r < 0) {
            ids.resize(-r);
            r = llama_tokenize(vocab_, text.data(), (int32_t) text.size(), ids.data(), (int32_t) ids.size(),
                               add_special, parse_special);
        }
        return r;
    });
    if (n < 0) throw std::runtime_error("tokenization failed");
    ids.resize(n);
    return std::vector<int32_t>(ids.begin(), ids.end());
}

std::string vocab::detokenize(const std::vector<int32_t> & ids, bool render_special) const {
    for (int32_t id : ids) check_id(id);
    std::string out(ids.size() * 8 + 16, '\0');
    int32_t n = guarded("detokenization", [&] {
        int32_t r = llama_detokenize(vocab_, ids.data(), (int32_t) ids.size(), out.data(), (int32_t) out.size(),
                                     /*remove_special =*/ false, render_special);
        if (r < 0) {
            out.resize(-r);
            r = llama_detokenize(vocab_, ids.data(), (int32_t) ids.size(), out.data(), (int32_t) out.size(), false,
                                 render_special);
        }
        return r;
    });
    if (n < 0) throw std::runtime_error("detokenization failed");
    out.resize(n);
    return out;
}

std::string vocab::token_to_piece(int32_t id, bool render_special) const {
    check_id(id);
    std::string out(32, '\0');
    int32_t n = guarded("token_to_piece", [&] {
        int32_t r = llama_token_to_piece(vocab_, id, out.data(), (int32_t) out.size(), 0, render_special);
        if (r < 0) {
            out.resize(-r);
            r = llama_token_to_piece(vocab_, id, out.data(), (int32_t) out.size(), 0, render_special);
        }
        return r;
    });
    out.resize(n < 0 ? 0 : n);
    return out;
}

bool vocab::is_eog(int32_t id) const { return id >= 0 && id < n_vocab() && llama_vocab_is_eog(vocab_, id); }
int32_t vocab::n_vocab() const { return llama_vocab_n_tokens(vocab_); }
int32_t vocab::bos() const { return llama_vocab_bos(vocab_); }
int32_t vocab::eos() const { return llama_vocab_eos(vocab_); }

std::string vocab::chat_template() const {
    const char * t = llama_model_chat_template(model_, nullptr);
    return t ? t : "";
}

std::string vocab::apply_chat_template(const std::vector<std::pair<std::string, std::string>> & messages,
                                       bool add_assistant, const std::string & template_override) const {
    const std::string tmpl = template_override.empty() ? chat_template() : template_override;
    if (tmpl.empty()) throw std::invalid_argument("the model has no chat template; give one (a built-in name such as 'chatml', or a template)");
    std::vector<llama_chat_message> chat;
    size_t total = 0;
    for (auto & m : messages) {
        chat.push_back({m.first.c_str(), m.second.c_str()});
        total += m.first.size() + m.second.size();
    }
    std::string buf(2 * total + 256, '\0');
    int32_t n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, buf.data(),
                                          (int32_t) buf.size());
    if (n > (int32_t) buf.size()) {
        buf.resize(n);
        n = llama_chat_apply_template(tmpl.c_str(), chat.data(), chat.size(), add_assistant, buf.data(),
                                      (int32_t) buf.size());
    }
    if (n < 0) throw std::invalid_argument("chat template not supported by llama.cpp's built-in templates");
    buf.resize(n);
    return buf;
}

}  // namespace pse
