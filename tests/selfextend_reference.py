"""SelfExtend attention evaluated in float64 straight from the formula in shared/SELFEXTEND.md."""
from __future__ import annotations

import numpy as np


def rope(x: np.ndarray, pos: np.ndarray, base: float = 10000.0, neox: bool = False) -> np.ndarray:
    """RoPE: dimension pairs rotated by pos * base^(-2i/D). The pairs are (2i, 2i+1) in llama
    ("normal") mode and (i, i + D/2) in NEOX mode (qwen2, qwen3, phi3). x: [n, heads, D]."""
    D = x.shape[-1]
    theta = base ** (-np.arange(0, D, 2, dtype=np.float64) / D)
    angle = pos[:, None].astype(np.float64) * theta[None, :]
    c, s = np.cos(angle)[:, None, :], np.sin(angle)[:, None, :]
    first, second = (np.s_[..., : D // 2], np.s_[..., D // 2:]) if neox else (np.s_[..., 0::2], np.s_[..., 1::2])
    x0, x1 = x[first], x[second]
    out = np.empty_like(x)
    out[first] = x0 * c - x1 * s
    out[second] = x0 * s + x1 * c
    return out


def selfextend_attention(q: np.ndarray, k: np.ndarray, v: np.ndarray, G: int, W: int, neox: bool = False) -> np.ndarray:
    """q: [n, H, D], k, v: [n, Hkv, D] (not rotated). Returns [n, H, D]. G=1 is ordinary attention."""
    q, k, v = (a.astype(np.float64) for a in (q, k, v))
    n, H, D = q.shape
    rep = H // k.shape[1]
    i = np.arange(n)
    if G == 1:
        W = n + 1  # every key is a neighbor
    P = i // G + W - W // G
    q_nb, q_grp = rope(q, i, neox=neox), rope(q, P, neox=neox)
    k_nb, k_grp = (np.repeat(a, rep, axis=1) for a in (rope(k, i, neox=neox), rope(k, i // G, neox=neox)))
    vv = np.repeat(v, rep, axis=1)
    s_nb = np.einsum("ihd,jhd->hij", q_nb, k_nb)
    s_grp = np.einsum("ihd,jhd->hij", q_grp, k_grp)
    dist = i[:, None] - i[None, :]
    s = np.where(dist < W, s_nb, s_grp) / np.sqrt(D)
    s = np.where(dist >= 0, s, -np.inf)
    p = np.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    return np.einsum("hij,jhd->ihd", p, vv)
