// qwen2: Qwen2 and Qwen2.5. As llama, with biases on the Q/K/V projections and RoPE on the two
// halves of each head (NEOX).
#include "model_arch.h"

namespace pse {

static void load_layer(const tensor_finder & t, const llama_hparams & hp, const std::string & p, llama_layer & L) {
    load_separate_attention(t, hp, p, L, /*biases_required =*/ true);
    load_swiglu(t, hp, p, L);
}

extern const model_arch arch_qwen2 = {"qwen2", GGML_ROPE_TYPE_NEOX, load_layer, project_separate_qkv,
                                      swiglu_feed_forward};

}  // namespace pse
