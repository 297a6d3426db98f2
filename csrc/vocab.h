// Tokenizer and chat template, taken from the GGUF file through libllama's vocabulary code, so that
// token ids are exactly llama.cpp's.
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

struct llama_model;
struct llama_vocab;

namespace pse {

class vocab {
public:
    explicit vocab(const std::string & path);  // loads only the vocabulary, not the weights
    ~vocab();
    vocab(const vocab &) = delete;
    vocab & operator=(const vocab &) = delete;

    std::vector<int32_t> tokenize(const std::string & text, bool add_special, bool parse_special) const;
    std::string detokenize(const std::vector<int32_t> & ids, bool render_special) const;
    std::string token_to_piece(int32_t id, bool render_special) const;  // raw bytes, may be partial UTF-8
    bool is_eog(int32_t id) const;
    int32_t n_vocab() const;
    int32_t bos() const;
    int32_t eos() const;
    std::string chat_template() const;  // empty when the file has none
    // Formats messages (role, content) with the file's template, or the named built-in template.
    std::string apply_chat_template(const std::vector<std::pair<std::string, std::string>> & messages,
                                    bool add_assistant, const std::string & template_override) const;

private:
    llama_model * model_ = nullptr;
    const llama_vocab * vocab_ = nullptr;
    void check_id(int32_t id) const;
};

// Routes libllama/ggml log messages: only errors unless verbose.
void set_verbose_logging(bool verbose);

}  // namespace pse
