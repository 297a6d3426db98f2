"""Writes small random llama-architecture GGUF files with the `gguf` package, for fast tests."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q


@dataclass(frozen=True)
class TinySpec:
    n_embd: int = 128
    n_head: int = 2
    n_head_kv: int = 1
    n_layer: int = 2
    n_ff: int = 256
    n_ctx_train: int = 256
    weight_type: str = "f32"        # f32, f16, q8_0, q4_0
    tied_embeddings: bool = True
    arch: str = "llama"             # llama, qwen2 (Q/K/V biases), qwen3 (Q/K norms), phi3 (fused Q/K/V, gate/up)
    seed: int = 0

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


N_WORDS = 61
VOCAB = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + [f"\u2581w{i}" for i in range(N_WORDS)]

_TYPES = {"f32": None, "f16": None, "q8_0": Q.Q8_0, "q4_0": Q.Q4_0}


def _add_matrix(w: gguf.GGUFWriter, name: str, data: np.ndarray, weight_type: str) -> None:
    if weight_type == "f32":
        w.add_tensor(name, data.astype(np.float32))
    elif weight_type == "f16":
        w.add_tensor(name, data.astype(np.float16))
    else:
        qtype = _TYPES[weight_type]
        w.add_tensor(name, gguf.quants.quantize(data.astype(np.float32), qtype), raw_dtype=qtype)


def _kv_value(value: Any):
    """(value, type, sub_type) for a metadata value: a (GGUFValueType, value) pair is written as that
    type; otherwise the type follows the Python value (negative ints as INT32, others as UINT32)."""
    T = gguf.GGUFValueType
    if isinstance(value, tuple):
        vtype, v = value
        if vtype == T.ARRAY:
            sub, items = v
            return list(items), T.ARRAY, sub
        return v, vtype, None
    if isinstance(value, bool):
        return value, T.BOOL, None
    if isinstance(value, int):
        if value < 0:
            return value, (T.INT32 if value >= -2**31 else T.INT64), None
        return value, (T.UINT32 if value < 2**32 else T.UINT64), None
    if isinstance(value, float):
        return value, T.FLOAT32, None
    if isinstance(value, str):
        return value, T.STRING, None
    if isinstance(value, (list, tuple)):
        items = list(value)
        sub = _kv_value(items[0])[1] if items else T.INT32
        return items, T.ARRAY, sub
    raise TypeError(f"no GGUF type for {value!r}")


def write_tiny_model(path: Path, spec: TinySpec = TinySpec(),
                     override: Optional[Dict[str, np.ndarray]] = None,
                     kv: Optional[Dict[str, Any]] = None,
                     extra_tensors: Optional[Dict[str, np.ndarray]] = None) -> Path:
    """A random model with an SPM vocabulary of byte tokens; `override` replaces named tensors
    (written as given; None leaves one out), to build malformed files. `kv` sets metadata keys after the normal ones
    (None removes a key; see _kv_value for types) and `extra_tensors` adds tensors the graph does not
    know, so that otherwise valid files can carry one bad hyperparameter."""
    rng = np.random.default_rng(spec.seed)
    w = gguf.GGUFWriter(str(path), spec.arch)
    w.add_name(f"tiny-{spec.weight_type}")
    w.add_context_length(spec.n_ctx_train)
    w.add_embedding_length(spec.n_embd)
    w.add_block_count(spec.n_layer)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_tokenizer_model("llama")
    w.add_token_list(VOCAB)
    w.add_token_scores([0.0] * 3 + [0.0] * 256 + [-float(i) for i in range(N_WORDS)])
    w.add_token_types([2, 3, 3] + [6] * 256 + [1] * N_WORDS)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)

    n_vocab, E, F = len(VOCAB), spec.n_embd, spec.n_ff
    n_q, n_kv = spec.head_dim * spec.n_head, spec.head_dim * spec.n_head_kv
    override = override or {}

    # An override of None leaves the tensor out.
    def matrix(name: str, rows: int, cols: int, scale: float) -> None:
        if name in override:
            if override[name] is not None:
                w.add_tensor(name, override[name])
        else:
            _add_matrix(w, name, rng.standard_normal((rows, cols)) * scale, spec.weight_type)

    def f32_vector(name: str, values: np.ndarray) -> None:
        if name not in override:
            w.add_tensor(name, values.astype(np.float32))
        elif override[name] is not None:
            w.add_tensor(name, override[name])

    def vector(name: str, n: int) -> None:
        f32_vector(name, 1.0 + 0.1 * rng.standard_normal(n))

    def bias(name: str, n: int) -> None:
        f32_vector(name, 0.5 * rng.standard_normal(n))

    matrix("token_embd.weight", n_vocab, E, 1.0)
    vector("output_norm.weight", E)
    if not spec.tied_embeddings:
        matrix("output.weight", n_vocab, E, 1.0 / np.sqrt(E))

    # Each architecture's layer tensors, as llama.cpp's converter writes them.
    for il in range(spec.n_layer):
        p = f"blk.{il}."
        vector(p + "attn_norm.weight", E)
        if spec.arch == "phi3":  # one fused Q/K/V projection: Q rows, then K, then V
            matrix(p + "attn_qkv.weight", n_q + 2 * n_kv, E, 1.0 / np.sqrt(E))
        else:
            matrix(p + "attn_q.weight", n_q, E, 1.0 / np.sqrt(E))
            matrix(p + "attn_k.weight", n_kv, E, 1.0 / np.sqrt(E))
            matrix(p + "attn_v.weight", n_kv, E, 1.0 / np.sqrt(E))
        if spec.arch == "qwen2":
            bias(p + "attn_q.bias", n_q)
            bias(p + "attn_k.bias", n_kv)
            bias(p + "attn_v.bias", n_kv)
        if spec.arch == "qwen3":
            vector(p + "attn_q_norm.weight", spec.head_dim)
            vector(p + "attn_k_norm.weight", spec.head_dim)
        matrix(p + "attn_output.weight", E, n_q, 1.0 / np.sqrt(n_q))
        vector(p + "ffn_norm.weight", E)
        if spec.arch == "phi3":  # one fused projection: gate rows, then up
            matrix(p + "ffn_up.weight", 2 * F, E, 1.0 / np.sqrt(E))
        else:
            matrix(p + "ffn_gate.weight", F, E, 1.0 / np.sqrt(E))
            matrix(p + "ffn_up.weight", F, E, 1.0 / np.sqrt(E))
        matrix(p + "ffn_down.weight", E, F, 1.0 / np.sqrt(F))
    for name, data in (extra_tensors or {}).items():
        w.add_tensor(name, data)
    for key, value in (kv or {}).items():
        if value is None:
            w.kv_data[0].pop(key, None)
        else:
            v, vtype, sub = _kv_value(value)
            w.kv_data[0][key] = gguf.GGUFValue(value=v, type=vtype, sub_type=sub)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
