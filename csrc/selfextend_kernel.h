// Fused SelfExtend attention on the CPU, as ggml custom ops (multi-threaded by ggml's thread pool).
//
// One pass over the keys with an online softmax: keys at distance >= W are scored against the
// grouped query, the last W keys against the neighbor query, and both land in one softmax. No
// score matrix is formed, and the arithmetic is that of ordinary attention. With W = 0 and no
// neighbor keys it is ordinary attention: every key scored against q_g (then the query at its own
// position, and the keys cached at theirs).
#pragma once

#include "ggml.h"

#include <cstdint>

namespace pse {

struct selfextend_op_params {
    int32_t n_past = 0;     // keys already cached before this batch (read when the graph runs)
    int32_t n_tokens = 0;   // queries in this batch (at positions n_past ..)
    int32_t window = 0;     // W: keys at distance < W are neighbors (0: none, ordinary attention)
    int32_t nb_lo = 0;      // first key position that may be a neighbor of a query in this batch
    int32_t ring_size = 0;  // k_nb is a ring: key j at row j % ring_size (0: row j - nb_lo)
    int32_t n_chunks = 1;   // key chunks per query; > 1 splits long key ranges across threads
    float scale = 1.0f;     // 1/sqrt(D)
};

// Chooses n_chunks so that a batch with few queries (decoding) still keeps every thread busy.
int32_t selfextend_choose_chunks(int32_t n_tokens, int32_t n_kv, int n_threads);

// q_n, q_g: [D, n_head, T] f32, rotated to the neighbor / grouped query positions.
// k, v:     [D, n_head_kv, >= n_past + T] views of the cache (f16, f32 or q8_0); k rotated to grouped
//           positions; rows from n_past + T on are not read.
// k_nb:     keys rotated to their own positions: [D, n_head_kv, ring_size] ring, or rows nb_lo.. ;
//           null when W = 0.
// Returns [D, n_head, T] f32. `params` must stay alive until the graph has been computed.
ggml_tensor * selfextend_attention_fused(ggml_context * ctx, ggml_tensor * q_n, ggml_tensor * q_g,
                                         ggml_tensor * k, ggml_tensor * v, ggml_tensor * k_nb,
                                         const selfextend_op_params * params);

}  // namespace pse
