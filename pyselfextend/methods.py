"""The long-context methods the evaluations compare, each defined once: how it is opened, how it
is asked for on the command line, what it is, and how a run's settings name it.

``open_method`` (in ``baselines``) opens a method from its ``options``; ``evaluate`` runs the
methods by name and writes each one's ``flags`` and ``note`` on the results page; ``passkey``
records ``label_of(plan)`` beside every trial.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Sequence


@dataclass(frozen=True)
class Method:
    """One way to run a model past its trained context."""

    name: str  #: as results files and pages name it
    options: Mapping[str, object] = field(default_factory=dict)  #: open_method's keyword arguments
    flags: str = ""  #: the same choice on the command line of ``passkey`` and ``perplexity``
    note: str = ""  #: what it is, for the results page


METHODS: Dict[str, Method] = {m.name: m for m in (
    Method("SelfExtend", {}, "",
           "this project: exact positions for keys within W tokens of the query, positions divided by G beyond, "
           "both in one softmax; G and W chosen for the length as `LocalModel` does"),
    Method("ordinary", {"selfextend": False}, " --no-selfextend",
           "plain attention with the model's own RoPE, no extension"),
    Method("llama.cpp grp-attn 4", {"grp_attn_n": 4}, " --grp-attn-n 4",
           "llama.cpp's passkey-example scheme run by libllama itself: before each 512-token prompt batch the "
           "cached positions of the previous batch are divided by 4, so only the current batch keeps exact "
           "positions (the positions are moved with `llama_memory_seq_add`: the pinned libllama's `seq_div` "
           "rotates the cached keys the wrong way)"),
    Method("YaRN", {"rope_scaling": "yarn"}, " --rope-scaling yarn",
           "plain attention with YaRN RoPE frequency scaling (ggml_rope_ext) by length / trained context"),
)}


def names_in(names: str, allowed: Sequence[str], what: str) -> List[str]:
    """The names of a comma-separated list (``"SelfExtend,ordinary"``), each one of ``allowed``;
    ValueError naming the first that is not (``what`` says what they are)."""
    chosen = [n.strip() for n in names.split(",")]
    for name in chosen:
        if name not in allowed:
            raise ValueError(f"unknown {what} {name!r}; choose from {', '.join(allowed)}")
    return chosen


def methods_named(names: str) -> List[Method]:
    """The methods of a comma-separated list of names (``"SelfExtend,ordinary"``)."""
    return [METHODS[name] for name in names_in(names, list(METHODS), "method")]


def label_of(plan: object) -> str:
    """What a model's plan (``LocalModel.plan`` or the group-attention baseline's) runs, with its own
    setting where the method has one: ``selfextend``, ``ordinary``, ``rope-yarn``,
    ``llama.cpp-grp-attn-4``."""
    if hasattr(plan, "grp_attn_n"):
        return f"llama.cpp-grp-attn-{plan.grp_attn_n}"
    if plan.rope_scaling != "none":
        return f"rope-{plan.rope_scaling}"
    return "selfextend" if plan.group_size > 1 else "ordinary"
