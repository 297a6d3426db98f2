// llama: Llama 1/2/3.x (rope_freqs for Llama 3.1+ is the loader's), Mistral, SmolLM and other
// files that say "llama". Separate Q/K/V projections (biases allowed), SwiGLU, RoPE on adjacent pairs.
#include "model_arch.h"

namespace pse {

static void load_layer(const tensor_finder & t, const llama_hparams & hp, const std::string & p, llama_layer & L) {
    load_separate_attention(t, hp, p, L, /*biases_required =*/ false);
    load_swiglu(t, hp, p, L);
}

extern const model_arch arch_llama = {"llama", 0, load_layer, project_separate_qkv, swiglu_feed_forward};

}  // namespace pse
