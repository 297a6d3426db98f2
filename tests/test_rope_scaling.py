"""The tuning-free RoPE baselines (linear position interpolation, YaRN) through ggml_rope_ext."""
from __future__ import annotations

import numpy as np
import pytest

from pyselfextend import LocalModel, _engine
from pyselfextend.context import plan_context


def test_factor_one_is_ordinary_attention_and_scaling_changes_it(tiny_model):
    path = tiny_model()
    ids = np.random.default_rng(0).integers(3, 320, size=200).tolist()
    with pytest.warns(UserWarning):
        ordinary = LocalModel(path, n_ctx=512, selfextend=False, n_threads=1).eval(ids)
    same = LocalModel(path, n_ctx=512, rope_scaling="linear", rope_factor=1.0, n_threads=1).eval(ids)
    linear = LocalModel(path, n_ctx=512, rope_scaling="linear", n_threads=1)
    yarn = LocalModel(path, n_ctx=512, rope_scaling="yarn", n_threads=1)
    assert np.array_equal(same, ordinary)
    assert linear.plan.rope_factor == 2.0 and "linear RoPE scaling" in linear.plan.describe()
    out_linear, out_yarn = linear.eval(ids), yarn.eval(ids)
    assert np.abs(out_linear - ordinary).max() > 1e-2 and np.abs(out_yarn - out_linear).max() > 1e-2


def test_scaling_options_are_checked(tiny_model):
    with pytest.raises(ValueError, match="cannot be combined with rope_scaling"):
        plan_context(1024, 256, 4, None, rope_scaling="yarn")
    with pytest.raises(ValueError, match="rope_factor must be >= 1"):
        plan_context(1024, 256, rope_scaling="linear", rope_factor=0.5)
    with pytest.raises(ValueError, match="rope_scaling must be"):
        plan_context(1024, 256, rope_scaling="ntk")
    with pytest.raises(ValueError, match="needs rope_scaling"):
        plan_context(1024, 256, rope_factor=2.0)
    m = _engine.Model(str(tiny_model()))
    with pytest.raises(ValueError, match="alternative to SelfExtend"):
        _engine.Engine(m, 512, 64, 1, "f16", 4, 32, "auto", "linear", 2.0)
    with pytest.raises(ValueError, match="rope_scaling must be"):
        _engine.Engine(m, 512, 64, 1, "f16", 1, 0, "auto", "ntk", 2.0)
