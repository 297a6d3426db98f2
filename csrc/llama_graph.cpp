#include "llama_graph.h"

#include "models/model_arch.h"

#include <cmath>

namespace pse {

size_t llama_graph_max_nodes(const gguf_model & model) { return 256 + 64 * (size_t) model.hp.n_layer; }

rope_params make_rope_params(const gguf_model & model, const engine_rope_override * override) {
    const llama_hparams & hp = model.hp;
    rope_params rope;
    rope.n_rot = hp.n_rot;
    rope.mode = hp.rope_mode;
    rope.n_ctx_orig = hp.n_ctx_train;
    rope.freq_base = hp.rope_freq_base;
    rope.freq_scale = hp.rope_freq_scale;
    rope.freq_factors = model.rope_freqs;
    if (override) {
        rope.freq_scale *= override->freq_scale_mul;
        rope.ext_factor = override->ext_factor;
    }
    return rope;
}

ggml_cgraph * build_llama_graph(ggml_context * ctx, const gguf_model & model, kv_cache & cache,
                                const attention_config & attn, const engine_rope_override & rope_override, int32_t n_past, int32_t n_tokens, int32_t n_outputs,
                                llama_graph_inputs & in) {
    const llama_hparams & hp = model.hp;
    ggml_cgraph * gf = ggml_new_graph_custom(ctx, llama_graph_max_nodes(model), false);

    in.tokens = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tokens);
    ggml_set_name(in.tokens, "inp_tokens");
    ggml_set_input(in.tokens);

    const rope_params rope = make_rope_params(model, &rope_override);
    const float kq_scale = 1.0f / std::sqrt((float) hp.head_dim);
    attention_config cfg = attn;
    cfg.kq_scale = kq_scale;
    make_attention_batch(in.attn, ctx, cfg, hp.n_head_kv, n_past, n_tokens);

    ggml_tensor * x = ggml_get_rows(ctx, model.token_embd, in.tokens);  // [n_embd, n_tokens]

    for (int il = 0; il < hp.n_layer; ++il) {
        const llama_layer & L = model.layers[il];

        ggml_tensor * cur = rms_norm(ctx, x, L.attn_norm, hp.rms_eps);
        ggml_format_name(cur, "attn_norm-%d", il);
        const qkv_tensors p = model.arch->project_qkv(ctx, hp, L, cur);
        ggml_format_name(p.q, "q-%d", il);
        ggml_format_name(p.k, "k-%d", il);
        ggml_format_name(p.v, "v-%d", il);

        cur = build_attention(ctx, gf, cache, il, in.attn, rope, p.q, p.k, p.v, kq_scale);
        ggml_format_name(cur, "kqv_out-%d", il);
        cur = ggml_mul_mat(ctx, L.wo, cur);
        if (L.bo) cur = ggml_add(ctx, cur, L.bo);
        ggml_format_name(cur, "attn_out-%d", il);

        if (il == hp.n_layer - 1 && n_outputs < n_tokens) {
            // Only the rows whose logits are wanted go through the last FFN and the output head.
            const int32_t n_keep = n_outputs > 0 ? n_outputs : 1;
            const size_t off = (size_t) (n_tokens - n_keep);
            cur = ggml_view_2d(ctx, cur, cur->ne[0], n_keep, cur->nb[1], off * cur->nb[1]);
            x   = ggml_view_2d(ctx, x, x->ne[0], n_keep, x->nb[1], off * x->nb[1]);
        }
        x = ggml_add(ctx, cur, x);
        ggml_format_name(x, "ffn_inp-%d", il);

        cur = rms_norm(ctx, x, L.ffn_norm, hp.rms_eps);
        ggml_format_name(cur, "ffn_norm-%d", il);
        cur = model.arch->feed_forward(ctx, L, cur);
        ggml_format_name(cur, "ffn_out-%d", il);
        x = ggml_add(ctx, cur, x);
        ggml_format_name(x, "l_out-%d", il);
    }

    if (n_outputs == 0) {
        // The cache writes are already in the graph; the last hidden state is not needed.
        in.logits = nullptr;
        ggml_build_forward_expand(gf, x);
        return gf;
    }
    x = rms_norm(ctx, x, model.output_norm, hp.rms_eps);
    in.logits = ggml_mul_mat(ctx, model.output, x);
    ggml_set_name(in.logits, "logits");
    ggml_set_output(in.logits);
    ggml_build_forward_expand(gf, in.logits);
    return gf;
}

}  // namespace pse
