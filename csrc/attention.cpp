#include "attention.h"

#include <cmath>
#include <vector>

namespace pse {

attention_batch make_attention_batch(ggml_context * ctx, int32_t n_past, int32_t n_tokens) {
    attention_batch b;
    b.n_past = n_past;
    b.n_tokens = n_tokens;
    b.pos = ggml_new_tensor_1d(ctx, GGML_TYPE_I32, n_tokens);
    ggml_set_name(b.pos, "inp_pos");
    ggml_set_input(b.pos);
    b.mask = ggml_new_tensor_2d(ctx, GGML_TYPE_F16, n_past + n_tokens, n_tokens);
    ggml_set_name(b.mask, "inp_kq_mask");
    ggml_set_input(b.mask);
    return b;
}

void set_attention_batch_inputs(const attention_batch & b) {
    std::vector<int32_t> pos(b.n_tokens);
    for (int32_t i = 0; i < b.n_tokens; ++i) pos[i] = b.n_past + i;
    ggml_backend_tensor_set(b.pos, pos.data(), 0, pos.size() * sizeof(int32_t));

    // Causal: query n_past+i sees keys 0 .. n_past+i.
    const int32_t n_kv = b.n_past + b.n_tokens;
    const ggml_fp16_t zero = ggml_fp32_to_fp16(0.0f), neg_inf = ggml_fp32_to_fp16(-INFINITY);
    std::vector<ggml_fp16_t> mask((size_t) n_kv * b.n_tokens);
    for (int32_t i = 0; i < b.n_tokens; ++i) {
        ggml_fp16_t * row = mask.data() + (size_t) i * n_kv;
        const int32_t last = b.n_past + i;
        for (int32_t j = 0; j < n_kv; ++j) row[j] = j <= last ? zero : neg_inf;
    }
    ggml_backend_tensor_set(b.mask, mask.data(), 0, mask.size() * sizeof(ggml_fp16_t));
}

ggml_tensor * build_attention(ggml_context * ctx, ggml_cgraph * gf, kv_cache & cache, int il,
                              const attention_batch & b, const rope_params & rope,
                              ggml_tensor * q, ggml_tensor * k, ggml_tensor * v, float kq_scale) {
    const int64_t head_dim = q->ne[0], n_head = q->ne[1], n_head_kv = k->ne[1];
    const int32_t n_tokens = b.n_tokens, n_kv = b.n_past + b.n_tokens;

    q = ggml_rope_ext(ctx, q, b.pos, rope.freq_factors, rope.n_rot, rope.mode, rope.n_ctx_orig,
                      rope.freq_base, rope.freq_scale, 0.0f, 1.0f, 32.0f, 1.0f);
    k = ggml_rope_ext(ctx, k, b.pos, rope.freq_factors, rope.n_rot, rope.mode, rope.n_ctx_orig,
                      rope.freq_base, rope.freq_scale, 0.0f, 1.0f, 32.0f, 1.0f);

    // Append this batch's rows to the cache; the copies are expanded first so they run before
    // the attention below reads the cache.
    ggml_tensor * ck = cache.k[il], * cv = cache.v[il];
    ggml_tensor * k_dst = ggml_view_2d(ctx, ck, cache.n_embd_kv, n_tokens, ck->nb[1], (size_t) b.n_past * ck->nb[1]);
    ggml_tensor * v_dst = ggml_view_2d(ctx, cv, cache.n_embd_kv, n_tokens, cv->nb[1], (size_t) b.n_past * cv->nb[1]);
    ggml_build_forward_expand(gf, ggml_cpy(ctx, ggml_reshape_2d(ctx, k, cache.n_embd_kv, n_tokens), k_dst));
    ggml_build_forward_expand(gf, ggml_cpy(ctx, v, v_dst));

    const size_t row_head = ggml_row_size(ck->type, head_dim);
    ggml_tensor * kk = ggml_view_3d(ctx, ck, head_dim, n_head_kv, n_kv, row_head, ck->nb[1], 0);
    ggml_tensor * vv = ggml_view_3d(ctx, cv, head_dim, n_head_kv, n_kv, row_head, cv->nb[1], 0);
    kk = ggml_permute(ctx, kk, 0, 2, 1, 3);          // [D, n_kv, n_head_kv]
    vv = ggml_permute(ctx, vv, 0, 2, 1, 3);
    q  = ggml_permute(ctx, q, 0, 2, 1, 3);           // [D, n_tokens, n_head]

    ggml_tensor * out = ggml_flash_attn_ext(ctx, q, kk, vv, b.mask, kq_scale, 0.0f, 0.0f);
    ggml_prec_set_acc(out, GGML_PREC_F32);
    return ggml_reshape_2d(ctx, out, head_dim * n_head, n_tokens);  // out is [D, n_head, n_tokens]
}

}  // namespace pse
