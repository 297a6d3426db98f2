"""Perplexity of one long document evaluated as a single sequence, overall and per position bucket,
so that what happens past the trained context is visible."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional

import numpy as np


def target_log_probs(logits: np.ndarray, targets) -> np.ndarray:
    """log P(targets[t]) under each row of ``logits`` (one row per target), in float64."""
    logits = np.asarray(logits, dtype=np.float64)
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return logits[np.arange(len(logits)), np.asarray(targets)] - log_z


def token_nll(llm, ids: List[int], progress: Optional[Callable[[int, int], object]] = None) -> np.ndarray:
    """Negative log-likelihood (nats) of ids[1:], each given all the tokens before it.

    Evaluated batch by batch (logits of a whole 16k-token document at once would take gigabytes).
    """
    if len(ids) < 2:
        raise ValueError("perplexity needs at least 2 tokens")
    llm.reset()
    nll = np.empty(len(ids) - 1, dtype=np.float64)
    step = llm.n_batch
    for start in range(0, len(ids) - 1, step):
        chunk = ids[start:min(start + step, len(ids) - 1)]
        logits = llm.eval(chunk, all_logits=True)  # row t predicts ids[start + t + 1]
        nll[start:start + len(chunk)] = -target_log_probs(logits, ids[start + 1:start + 1 + len(chunk)])
        if progress is not None:
            progress(start + len(chunk), len(ids) - 1)
    return nll


def summarize(nll: np.ndarray, bucket: int) -> Dict[str, object]:
    """Overall perplexity and one per bucket of ``bucket`` predicted positions."""
    buckets = []
    for lo in range(0, len(nll), bucket):
        part = nll[lo:lo + bucket]
        # position of the predicted token: lo + 1 .. ; buckets are labelled by token positions
        buckets.append({"start": lo + 1, "end": lo + len(part), "n": int(len(part)),
                        "ppl": float(math.exp(part.mean()))})
    return {"n_predicted": int(len(nll)), "ppl": float(math.exp(nll.mean())), "buckets": buckets}


def plot(curves: Dict[str, Dict[str, object]], n_ctx_train: int, path: str) -> None:
    """Draws perplexity per bucket for each labelled result (needs matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RuntimeError("--plot needs matplotlib: pip install 'pyselfextend[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, summary in curves.items():
        xs = [(b["start"] + b["end"]) / 2 for b in summary["buckets"]]
        ax.plot(xs, [b["ppl"] for b in summary["buckets"]], marker="o", label=label)
    ax.axvline(n_ctx_train, color="grey", linestyle="--", label=f"trained context ({n_ctx_train})")
    ax.set_xlabel("token position")
    ax.set_ylabel("perplexity")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
