"""``pyselfextend bench``: prefill and decode speed against llama.cpp, in one run.

Every engine gets the same model file, thread count and random tokens, and the measurements are
interleaved (engine after engine, repetition after repetition) so that drift in a noisy machine's
speed hits all of them alike. At each depth d the cache is first filled with d tokens (untimed);
prefill is one batch of --n-prompt tokens after them, decode is --n-gen single tokens after them.
llama.cpp runs twice, flash attention on and off; pyselfextend is compared with the better of the
two. The ratios are pyselfextend / llama.cpp: above 1 means pyselfextend is faster.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Dict, List

import numpy as np

from . import _engine
from .cli import parse_size
from .model import _default_threads
from .models import resolve_model


def _depths(text: str) -> List[int]:
    out = []
    for part in text.split(","):
        part = part.strip()
        out.append(0 if part == "0" else parse_size(part))
    return out


def run_bench(args: argparse.Namespace) -> int:
    path = str(resolve_model(args.model))
    threads = args.threads or _default_threads()
    depths = _depths(args.depths)
    n_prompt, n_gen, reps = args.n_prompt, args.n_gen, args.repetitions
    n_batch = max(512, n_prompt)
    n_ctx = max(depths) + max(n_prompt, n_gen) + 16

    _engine.set_verbose(bool(args.verbose))
    model = _engine.Model(path)
    engines = {
        "pyselfextend": _engine.Engine(model, n_ctx, n_batch, threads, "f16"),
        "llama.cpp FA on": _engine.Reference(path, n_ctx, n_batch, threads, True),
        "llama.cpp FA off": _engine.Reference(path, n_ctx, n_batch, threads, False),
    }
    rng = np.random.default_rng(1234)
    n_vocab = model.n_vocab
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    log(f"bench: {path}, {threads} threads, prefill {n_prompt}, decode {n_gen}, depths {depths}, {reps} repetitions")

    results: Dict[int, Dict[str, Dict[str, List[float]]]] = {}
    for depth in depths:
        fill = rng.integers(0, n_vocab, size=depth).tolist()
        prompt = rng.integers(0, n_vocab, size=n_prompt).tolist()
        gen = rng.integers(0, n_vocab, size=n_gen).tolist()
        per = results[depth] = {name: {"prefill": [], "decode": []} for name in engines}
        for name, eng in engines.items():
            eng.reset()
            if depth:
                log(f"  depth {depth}: filling the cache of {name}")
                eng.eval(fill)
        for rep in range(reps):
            for name, eng in engines.items():
                eng.truncate(depth)
                t = time.perf_counter()
                eng.eval(prompt)
                per[name]["prefill"].append(n_prompt / (time.perf_counter() - t))
                eng.truncate(depth)
                t = time.perf_counter()
                for tok in gen:
                    eng.eval([tok])
                per[name]["decode"].append(n_gen / (time.perf_counter() - t))
            log(f"  depth {depth}: repetition {rep + 1}/{reps} done")

    report = {"model": path, "threads": threads, "n_prompt": n_prompt, "n_gen": n_gen, "repetitions": reps,
              "depths": []}
    for depth, per in results.items():
        med = {name: {k: statistics.median(v) for k, v in m.items()} for name, m in per.items()}
        ours = med["pyselfextend"]
        best = {k: max(med["llama.cpp FA on"][k], med["llama.cpp FA off"][k]) for k in ("prefill", "decode")}
        report["depths"].append({"depth": depth, "tokens_per_second": med,
                                 "ratio_vs_best_llama_cpp": {k: ours[k] / best[k] for k in best}})
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"model {path}\nthreads {threads}; median of {reps}; prefill = {n_prompt} tokens in one batch, "
          f"decode = {n_gen} tokens one at a time; tokens/s")
    print(f"{'depth':>7}  {'engine':<18} {'prefill':>9} {'decode':>9}")
    for d in report["depths"]:
        for name, m in d["tokens_per_second"].items():
            print(f"{d['depth']:>7}  {name:<18} {m['prefill']:>9.1f} {m['decode']:>9.1f}")
        r = d["ratio_vs_best_llama_cpp"]
        print(f"{d['depth']:>7}  {'ratio vs best':<18} {r['prefill']:>8.2f}x {r['decode']:>8.2f}x")
    return 0
