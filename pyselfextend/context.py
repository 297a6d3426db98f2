"""Choosing SelfExtend's group size G and neighbor window W for a requested context length.

See ``shared/SELFEXTEND.md``: with trained context L, SelfExtend reaches ``(L - W) * G + W``
tokens. Given a target T the default is W = L/4 (rounded down to a multiple of G) and the smallest
G that reaches T; G and W may also be given, and are then checked. `pyselfextend sweep` measured
that rule against others on SmolLM2 (docs/sweep.md): none retrieved planted facts significantly
better, and at every length and window a larger G raised the perplexity past L. The rules themselves (the
reach, the ranges of G and W) are the engine's (csrc/attention.cpp), asked here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from . import _engine


@dataclass(frozen=True)
class ContextPlan:
    """How attention is configured for a context of ``n_ctx`` tokens."""

    n_ctx: int
    n_ctx_train: int
    group_size: int      # G; 1 means ordinary attention
    window: int          # W; 0 when G == 1
    selfextend: bool     # False when the user turned SelfExtend off
    rope_scaling: str = "none"  # baseline extension with ordinary attention: "linear" or "yarn"
    rope_factor: float = 1.0
    reason: str = ""     # why these G and W, in one line (``info --ctx`` shows it)

    @property
    def usable_length(self) -> Optional[int]:
        """Longest sequence kept within the trained context, or None for ordinary attention."""
        if self.group_size == 1:
            return self.n_ctx_train if self.selfextend else None
        return usable_length(self.n_ctx_train, self.group_size, self.window)

    def describe(self) -> str:
        if self.rope_scaling != "none":
            return (f"ordinary attention with {self.rope_scaling} RoPE scaling, factor {self.rope_factor:g}, "
                    f"n_ctx={self.n_ctx} (trained context {self.n_ctx_train})")
        if not self.selfextend:
            past = " (past the trained context of %d: expect degraded output)" % self.n_ctx_train \
                if self.n_ctx > self.n_ctx_train else ""
            return f"ordinary attention, n_ctx={self.n_ctx}{past}"
        if self.group_size == 1:
            return f"ordinary attention (n_ctx={self.n_ctx} is within the trained context {self.n_ctx_train})"
        return (f"SelfExtend group_size={self.group_size} window={self.window}: usable length "
                f"{self.usable_length} tokens (trained context {self.n_ctx_train}), n_ctx={self.n_ctx}")


def usable_length(n_ctx_train: int, group_size: int, window: int) -> int:
    """``(L - W) * G + W``: the longest sequence SelfExtend with (G, W) keeps within L."""
    return int(_engine.selfextend_usable_length(n_ctx_train, group_size, window))


def _check_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value


def plan_context(n_ctx: int, n_ctx_train: int, group_size: Optional[int] = None, window: Optional[int] = None,
                 selfextend: bool = True, rope_scaling: Optional[str] = None,
                 rope_factor: Optional[float] = None) -> ContextPlan:
    """Picks (or checks) G and W so that SelfExtend covers ``n_ctx`` tokens.

    Raises ValueError naming the problem: G < 1, W outside [1, L), G/W given with SelfExtend off,
    or a (G, W) whose usable length is below ``n_ctx``.
    """
    L = n_ctx_train
    if rope_scaling not in (None, "none"):
        # The tuning-free RoPE baselines replace SelfExtend: ordinary attention, scaled positions.
        if rope_scaling not in ("linear", "yarn"):
            raise ValueError(f"rope_scaling must be 'linear' or 'yarn', got {rope_scaling!r}")
        if group_size is not None or window is not None:
            raise ValueError("group_size/window cannot be combined with rope_scaling")
        factor = rope_factor if rope_factor is not None else max(1.0, n_ctx / L)
        if not factor >= 1.0:
            raise ValueError(f"rope_factor must be >= 1, got {factor}")
        why = "the factor given" if rope_factor is not None else "factor n_ctx / trained context"
        return ContextPlan(n_ctx, L, 1, 0, False, rope_scaling, float(factor), f"RoPE scaling baseline, {why}")
    if rope_factor is not None:
        raise ValueError("rope_factor needs rope_scaling ('linear' or 'yarn')")
    if not selfextend:
        if group_size is not None or window is not None:
            raise ValueError("group_size/window cannot be combined with selfextend=False")
        return ContextPlan(n_ctx, L, 1, 0, False, reason="SelfExtend turned off")
    # The given values alone first (the defaults below divide by L - W); n_ctx=0: no reach yet.
    _engine.check_selfextend(0, L, 1 if group_size is None else _check_int("group_size", group_size),
                             0 if window is None else _check_int("window", window))

    reason = "group_size and window given"
    if group_size is None:
        if window is None and n_ctx <= L:
            return ContextPlan(n_ctx, L, 1, 0, True, reason="within the trained context: ordinary attention is exact")
        w = window if window is not None else L // 4
        group_size = max(1, -(-(n_ctx - w) // (L - w)))  # smallest G with (L - W) * G + W >= n_ctx
        if window is None:
            if group_size > w:  # W is a multiple of G: a group wider than the window leaves none
                raise ValueError(
                    f"n_ctx={n_ctx} is too far past the trained context {L} for SelfExtend's default window "
                    f"W={w}: it needs group_size={group_size} > W; the default window reaches at most "
                    f"{usable_length(L, w, w)} tokens (give group_size and window to choose otherwise)")
            window = w - w % group_size if group_size > 1 else w
            reason = (f"W = L/4 = {w} rounded down to a multiple of G, and the smallest G that reaches n_ctx: in "
                      "the sweep (docs/sweep.md) no other rule retrieved better, and larger G read the text worse")
        else:
            reason = "window given, and the smallest G that reaches n_ctx"
    elif window is None:
        w = L // 4
        if 1 < group_size and w < group_size:
            raise ValueError(f"group_size={group_size} is wider than the default window W={w} (a quarter of the "
                             f"trained context {L}); give a window as well")
        window = w - w % group_size if group_size > 1 else 0
        reason = f"group_size given, W = L/4 = {w} rounded down to a multiple of G"
    if group_size == 1:
        if n_ctx > L:
            raise ValueError(f"group_size=1 cannot reach n_ctx={n_ctx}: the trained context is {L}")
        return ContextPlan(n_ctx, L, 1, 0, True, reason="group_size=1: ordinary attention")
    _engine.check_selfextend(n_ctx, L, group_size, window)
    return ContextPlan(n_ctx, L, group_size, window, True, reason=reason)
