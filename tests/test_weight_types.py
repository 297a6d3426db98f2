"""Every GGUF weight type people download, on a real model: SmolLM2 requantized by libllama's own
``llama_model_quantize`` (as ``llama-quantize`` does), then run by this engine and by libllama."""
from __future__ import annotations

import numpy as np
import pytest

from pyselfextend import LocalModel, _engine, models

# (llama-quantize type, pure, the ggml types the file must then hold). SmolLM2's 576-wide rows do
# not fit the 256-value blocks of the K and IQ4_XS types, so those land only on ffn_down (1536
# wide) and the rest get llama.cpp's fallback; together the files cover every type below.
FILES = [
    ("f32", False, {"f32"}), ("f16", False, {"f16"}), ("bf16", False, {"bf16"}),
    ("q4_0", False, {"q4_0"}), ("q4_1", False, {"q4_1"}), ("q5_0", False, {"q5_0"}), ("q5_1", False, {"q5_1"}),
    ("q8_0", False, {"q8_0"}), ("q2_k", True, {"q2_K"}), ("q3_k_s", False, {"q3_K"}),
    ("q4_k_m", False, {"q4_K", "q6_K"}), ("q5_k_s", False, {"q5_K"}), ("iq4_xs", False, {"iq4_nl", "iq4_xs"}),
]


@pytest.fixture(scope="module")
def quantized(smollm_path):
    """Factory: the requantized file of a type, made once and kept beside the pulled models."""
    folder = models.models_dir() / "requantized"
    folder.mkdir(parents=True, exist_ok=True)

    def make(kind: str, pure: bool):
        path = folder / f"{smollm_path.stem}-{kind}{'-pure' if pure else ''}.gguf"
        if not path.exists():
            tmp = path.with_suffix(".part")
            _engine._quantize(str(smollm_path), str(tmp), kind, 2, pure=pure)
            tmp.replace(path)
        return path

    return make


@pytest.mark.model
@pytest.mark.parametrize("kind, pure, types", FILES, ids=[f[0] + ("-pure" if f[1] else "") for f in FILES])
def test_every_weight_type_matches_libllama(quantized, kind, pure, types):
    path = quantized(kind, pure)
    # The portable path: ordinary attention is ggml's flash attention, as in libllama.
    llm = LocalModel(path, n_ctx=256, n_threads=2, adaptive_threads=False, attention_path="portable")
    assert types <= set(llm.info["weight_types"]), llm.info["weight_types"]
    ids = llm.tokenize("The committee met on Tuesday to review the budget. After a long discussion about the "
                       "costs of the new library, the members agreed to postpone the vote until the spring, "
                       "when the final figures from the city would be known.")
    ours = llm.eval(ids, all_logits=True)
    # libllama without its repacked weights: the same arithmetic, so the same bits. (With them,
    # the default, Q4_0, Q4_K and IQ4 files differ by up to ~10% of the logit range, as llama.cpp
    # with flash attention on and off do; see the README.)
    ref = _engine.Reference(str(path), 256, 256, 2, True, repack=False).eval(ids, all_logits=True)
    assert np.array_equal(ours, ref)
    assert np.isfinite(ours).all() and ours.std() > 0.5  # real logits, not a degenerate model


@pytest.mark.model
def test_unknown_weight_type_is_named(smollm_path, tmp_path):
    with pytest.raises(ValueError, match="unknown weight type 'q3_q'.*q4_k_m"):
        _engine._quantize(str(smollm_path), str(tmp_path / "x.gguf"), "q3_q")
