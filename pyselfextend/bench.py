"""``pyselfextend bench``: prefill and decode speed and peak memory against llama.cpp, in one run.

Every engine gets the same model file, thread count and random tokens. Each engine runs in its own
process, so that its peak resident memory (RSS) is its own, and the engines take turns: each
repetition measures every engine once, in a rotating order, so that a slow spell of the machine
falls on all of them alike. At each depth d the cache is first filled to d tokens (once, timed
apart: depths are visited in increasing order and each fill continues the last, so the fills
add up to the time to read a document from empty); prefill is one batch of --n-prompt tokens
after them, decode is --n-gen single tokens after them; each is repeated and the median reported.

Engines:
  selfextend     pyselfextend as a user gets it for a context of (deepest depth + prefill) tokens:
                 SelfExtend with the default group size and window once that exceeds the
                 model's trained context, ordinary attention below it
  ordinary       pyselfextend with SelfExtend off (ordinary attention, the same fused kernel)
  llama.cpp-fa   llama.cpp (libllama from the pinned source), flash attention on
  llama.cpp      llama.cpp, flash attention off
  llama-bench-fa, llama-bench
                 with --llama-bench PATH: llama.cpp's own benchmark program, flash attention on and off,
                 run after the others (it keeps its own loop, so it cannot take turns); it fills the
                 cache itself, untimed, and its figure is the median of its repetitions. It runs
                 libllama with the same settings as the llama.cpp engines (batch, threads, weight
                 repacking); what differs is when it runs, so it has ratios of its own
Ratios are pyselfextend (selfextend) / llama.cpp, against the faster llama.cpp engine at each
depth: above 1 means pyselfextend is faster or, for memory, uses more.

With several cache types (--cache-type f16,q8_0) every engine runs once per type, all taking turns
in the same run: a table per type, then each later type against the first, engine by engine
(speed and peak memory), so that a quantized cache is compared with f16 on the same machine state.

Beside tokens/s: the machine's limits, measured after the engines (f32 multiply-add GFLOP/s and
memory read GB/s with the same threads), attention GFLOP/s (the attention FLOPs of the prefill over its whole
time: a lower bound on the attention's own speed) and cache GB/s (the K/V bytes a decoding step
reads over its whole time).
"""
from __future__ import annotations

import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from .progress import log_line

ENGINES = ["selfextend", "ordinary", "llama.cpp-fa", "llama.cpp"]
LLAMA_BENCH_ENGINES = ["llama-bench-fa", "llama-bench"]


def _ours(engines: Sequence[str]) -> str:
    """The engine the ratios are of: selfextend, or ordinary in a run without it."""
    return "selfextend" if "selfextend" in engines else "ordinary"


def _llamas(engines: Sequence[str]) -> List[str]:
    """The llama.cpp engines that took turns with ours: the ratios are against the faster."""
    return [e for e in ("llama.cpp-fa", "llama.cpp") if e in engines]


def batch_size(n_prompt: int) -> int:
    """The batch every engine fills its cache and prefills with: 512 tokens, or the whole prompt
    in one batch if it is longer."""
    return max(512, n_prompt)


class _Worker:
    """One engine in a process of its own, measuring on request (``python -m pyselfextend.bench --worker``).

    The driver keeps every engine's process alive and asks them in turn, so that a slow spell of
    this machine (other load, frequency changes) falls on every engine alike rather than on
    whichever ran then; each process's peak RSS stays its own.
    """

    def __init__(self, label: str, engine: str, path: str, threads: int, cache_type: str, n_ctx: int, n_prompt: int,
                 n_gen: int):
        self.label, self.engine = label, engine
        cmd = [sys.executable, "-m", "pyselfextend.bench", "--worker", engine, path, str(threads), cache_type,
               str(n_ctx), str(n_prompt), str(n_gen)]
        self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                      env=os.environ.copy())
        self.info = self._reply()  # {"shape", and "group_size", "window" for selfextend} once the model is loaded

    def _reply(self) -> Dict:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"bench worker for {self.engine} failed (exit {code})")
        return json.loads(line)

    def ask(self, op: str, depth: int = 0) -> Dict:
        try:
            self._proc.stdin.write(json.dumps({"op": op, "depth": depth}) + "\n")
            self._proc.stdin.flush()
        except BrokenPipeError:
            pass  # it has exited; _reply says how
        return self._reply()

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.kill()
        self._proc.wait()


def _serve_worker(engine: str, path: str, threads: int, cache_type: str, n_ctx: int, n_prompt: int, n_gen: int) -> None:
    """The worker side of _Worker: one JSON line per request on stdin, one answer on stdout."""
    from . import _engine
    from .context import plan_context

    n_batch = batch_size(n_prompt)
    model = _engine.Model(path)
    info: Dict = {}
    if engine == "selfextend":
        plan = plan_context(n_ctx, model.n_ctx_train)
        info = {"group_size": plan.group_size, "window": plan.window}
        # A fixed thread count, as llama.cpp's: no adapting to other load during a measurement.
        eng = _engine.Engine(model, n_ctx, n_batch, threads, cache_type, plan.group_size, plan.window,
                             adaptive_threads=False)
    elif engine == "ordinary":
        eng = _engine.Engine(model, n_ctx, n_batch, threads, cache_type, adaptive_threads=False)
    else:
        eng = _engine.Reference(path, n_ctx, n_batch, threads, engine == "llama.cpp-fa", cache_type=cache_type)
    rng = np.random.default_rng(1234)  # the same tokens for every engine
    fill = rng.integers(0, model.n_vocab, size=n_ctx).tolist()
    prompt = rng.integers(0, model.n_vocab, size=n_prompt).tolist()
    gen = rng.integers(0, model.n_vocab, size=n_gen).tolist()

    def answer(obj: Dict) -> None:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    answer({**info, "shape": {k: getattr(model, k) for k in ("n_layer", "n_head", "n_head_kv", "head_dim")}})
    for line in sys.stdin:
        req = json.loads(line)
        op, depth = req["op"], int(req["depth"])
        if op == "done":
            answer({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024})  # Linux: KiB
            return
        if op == "fill":  # continues from the cache's current length; timed apart from prefill and decode
            eng.truncate(min(eng.n_past, depth))
            t0 = time.perf_counter()
            for start in range(eng.n_past, depth, n_batch):
                eng.eval(fill[start:min(depth, start + n_batch)])
                print(f"  {engine}: filling to depth {depth}: {min(depth, start + n_batch)}", file=sys.stderr,
                      flush=True)
            answer({"seconds": time.perf_counter() - t0})
            continue
        eng.truncate(depth)
        t = time.perf_counter()
        if op == "prefill":
            eng.eval(prompt)
            rate = n_prompt / (time.perf_counter() - t)
        else:
            for tok in gen:
                eng.eval([tok])
            rate = n_gen / (time.perf_counter() - t)
        eng.truncate(depth)
        answer({"tokens_per_second": rate})


def _measure(engines: List[Tuple[str, str, str]], path: str, threads: int, depths: List[int], n_prompt: int,
             n_gen: int, reps: int, log: Callable[[str], None]) -> Dict[str, Dict]:
    """Every engine (label, engine, cache type) through every depth, the repetitions interleaved
    across engines; results by label."""
    n_ctx = max(depths) + max(n_prompt, n_gen) + 16
    workers: List[_Worker] = []
    try:
        for label, e, cache_type in engines:  # one at a time: loading is heavy
            workers.append(_Worker(label, e, path, threads, cache_type, n_ctx, n_prompt, n_gen))
        out = {w.label: {"engine": w.engine, **w.info, "depths": {}} for w in workers}
        for depth in depths:
            for w in workers:
                out[w.label]["depths"][str(depth)] = {"prefill": [], "decode": [],
                                                      "fill_seconds": w.ask("fill", depth)["seconds"]}
            for rep in range(reps):
                order = workers[rep % len(workers):] + workers[:rep % len(workers)]  # no engine always first
                for kind in ("prefill", "decode"):
                    for w in order:
                        out[w.label]["depths"][str(depth)][kind].append(w.ask(kind, depth)["tokens_per_second"])
            for w in workers:
                m = out[w.label]["depths"][str(depth)]
                log(f"  {w.label}: depth {depth}: prefill {statistics.median(m['prefill']):.1f} t/s, decode "
                    f"{statistics.median(m['decode']):.1f} t/s")
        for w in workers:
            out[w.label]["peak_rss_bytes"] = w.ask("done")["peak_rss_bytes"]
        return out
    finally:
        for w in workers:
            w.close()


def _run_llama_bench(binary: str, path: str, threads: int, cache_type: str, depths: List[int], n_prompt: int,
                     n_gen: int, reps: int, flash_attn: List[bool], log: Callable[[str], None]) -> Dict[str, Dict]:
    """llama.cpp's llama-bench with the same settings; results shaped as _measure's."""
    n_batch = batch_size(n_prompt)
    cmd = [binary, "-m", path, "-p", str(n_prompt), "-n", str(n_gen), "-d", ",".join(map(str, depths)),
           "-t", str(threads), "-b", str(n_batch), "-ub", str(n_batch), "-ctk", cache_type, "-ctv", cache_type,
           "-fa", ",".join("1" if fa else "0" for fa in flash_attn), "-r", str(reps), "-o", "json", "--progress"]
    log("bench: " + " ".join(cmd))
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)  # its progress goes to our stderr
    except OSError as e:
        raise ValueError(f"cannot run llama-bench {binary!r}: {e}") from None
    if r.returncode != 0:
        raise RuntimeError(f"llama-bench failed (exit {r.returncode})")
    out: Dict[str, Dict] = {}
    for test in json.loads(r.stdout):
        engine = "llama-bench-fa" if int(test["flash_attn"]) == 1 else "llama-bench"
        kind = "prefill" if int(test["n_prompt"]) > 0 else "decode"
        e = out.setdefault(engine, {"engine": engine, "peak_rss_bytes": None, "depths": {}})
        e["depths"].setdefault(str(test["n_depth"]), {"prefill": [], "decode": []})[kind] = list(test["samples_ts"])
    return out


def attention_flops(shape: Dict[str, int], depth: int, n_prompt: int) -> float:
    """FLOPs of attention scores and weighted values for n_prompt queries after depth cached tokens:
    2 multiply-adds per head dimension for each (query head, visible key) pair, in every layer."""
    keys = n_prompt * depth + n_prompt * (n_prompt + 1) / 2  # query t sees depth + t + 1 keys
    return 4.0 * shape["head_dim"] * shape["n_head"] * shape["n_layer"] * keys


def cache_bytes_read(shape: Dict[str, int], cache_type: str, depth: int, n_gen: int) -> float:
    """Bytes of K and V rows one decoding step reads, averaged over n_gen steps after depth tokens."""
    from . import _engine

    per_token = 2 * shape["n_layer"] * shape["n_head_kv"] * shape["head_dim"] * _engine.cache_bytes_per_value(cache_type)
    return per_token * (depth + (n_gen + 1) / 2)


def run_bench(model: Optional[str] = None, *, threads: Optional[int] = None,
              cache_type: Union[str, Sequence[str]] = "f16", depths: Sequence[int] = (0,), n_prompt: int = 512,
              n_gen: int = 128, repetitions: int = 3, engines: Optional[Sequence[str]] = None,
              llama_bench: Optional[str] = None, log: Callable[[str], None] = log_line) -> Dict[str, object]:
    """Measures the engines (default: all that run the cache type) on ``model`` (a GGUF file or
    catalogue name; default: the default model) and returns the report that ``--json`` prints:
    per engine and depth the median tokens/s of prefill and decode, attention GFLOP/s, cache GB/s
    and time to read from empty, peak RSS, the machine's roofline, and the ratios against llama.cpp.
    Progress goes to ``log``.

    With several cache types (``["f16", "q8_0"]``) every engine runs with each, all taking turns
    in one run; the report then has one such report per type (``by_cache_type``) and each later
    type's speeds and memory against the first's, engine by engine (``against_first``)."""
    from . import _engine
    from .model import _default_threads
    from .models import resolve_model

    path = str(resolve_model(model))
    threads = threads or _default_threads()
    depths = sorted(set(depths))
    cache_types = [cache_type] if isinstance(cache_type, str) else list(dict.fromkeys(cache_type))
    if not cache_types:
        raise ValueError("no cache type to measure")
    for e in engines or ():
        if e not in ENGINES:
            raise ValueError(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    runs: List[Tuple[str, str, str]] = []  # (label, engine, cache type)
    for ct in cache_types:
        chosen = list(engines) if engines is not None else list(ENGINES)
        # asked of every type before any engine starts: it raises for a type the engines do not run
        needs_flash_attn = _engine.reference_needs_flash_attn(ct)
        if "llama.cpp" in chosen and needs_flash_attn:
            chosen.remove("llama.cpp")
            log(f"bench: llama.cpp runs a {ct} KV cache only with flash attention: engine llama.cpp left out")
        if not chosen:
            raise ValueError(f"no engine of {', '.join(engines or ())} runs a {ct} cache")
        runs += [(e if len(cache_types) == 1 else f"{e} {ct}", e, ct) for e in chosen]
    log(f"bench: {path}, {threads} threads, {', '.join(cache_types)} cache, prefill {n_prompt}, decode {n_gen}, "
        f"depths {depths}, {repetitions} repetitions, engines {', '.join(label for label, _, _ in runs)}")

    measured = _measure(runs, path, threads, depths, n_prompt, n_gen, repetitions, log)
    results = {ct: {e: measured[label] for label, e, c in runs if c == ct} for ct in cache_types}
    if llama_bench:
        shape = next(iter(measured.values()))["shape"]
        for ct in cache_types:
            flash = [True] if _engine.reference_needs_flash_attn(ct) else [True, False]
            for e, r in _run_llama_bench(llama_bench, path, threads, ct, depths, n_prompt, n_gen,
                                         repetitions, flash, log).items():
                results[ct][e] = {**r, "shape": shape}
    # The machine's limits last, once nothing else of ours runs: its 512 MiB buffer, touched before
    # the engines' processes were forked, would count in their peak memory.
    roof = _engine.roofline(threads)
    log(f"bench: this machine with {threads} threads: {roof['fma_gflops']:.0f} GFLOP/s f32 multiply-add, "
        f"{roof['read_gb_per_s']:.1f} GB/s memory reads")
    reports = {ct: _report(results[ct], path=path, threads=threads, cache_type=ct, depths=depths,
                           n_prompt=n_prompt, n_gen=n_gen, repetitions=repetitions, roof=roof)
               for ct in cache_types}
    if len(cache_types) == 1:
        return reports[cache_types[0]]
    first = reports[cache_types[0]]["engines"]
    against: Dict[str, Dict] = {}
    for ct in cache_types[1:]:
        for e, r in reports[ct]["engines"].items():
            if e not in first:
                continue
            entry = {"depths": {d: {k: m[k] / first[e]["depths"][d][k] for k in ("prefill", "decode")}
                                for d, m in r["depths"].items()}}
            if r["peak_rss_bytes"] and first[e]["peak_rss_bytes"]:
                entry["peak_rss"] = r["peak_rss_bytes"] / first[e]["peak_rss_bytes"]
            against.setdefault(ct, {})[e] = entry
    return {"model": path, "threads": threads, "cache_types": cache_types, "n_prompt": n_prompt, "n_gen": n_gen,
            "repetitions": repetitions, "date": time.strftime("%Y-%m-%d"), "roofline": roof,
            "by_cache_type": reports, "against_first": against}


def _report(results: Dict[str, Dict], *, path: str, threads: int, cache_type: str, depths: List[int], n_prompt: int,
            n_gen: int, repetitions: int, roof: Dict[str, float]) -> Dict[str, object]:
    """One cache type's report: medians, attention GFLOP/s, cache GB/s, read times and ratios."""
    report = {"model": path, "threads": threads, "cache_type": cache_type, "n_prompt": n_prompt, "n_gen": n_gen,
              "repetitions": repetitions, "date": time.strftime("%Y-%m-%d"), "roofline": roof, "engines": {},
              "ratios": {}}
    for e, r in results.items():
        depth_report = {}
        read_seconds = 0.0
        for d, v in sorted(r["depths"].items(), key=lambda dv: int(dv[0])):
            m = {k: statistics.median(v[k]) for k in ("prefill", "decode")}
            if "fill_seconds" in v:  # the fills continue one another: their sum reads the document from empty
                read_seconds += v["fill_seconds"]
                m["read_seconds"] = read_seconds
            # Attention's share of the work, at the whole step's speed: a lower bound on how fast
            # attention itself ran, to set beside the machine's limits.
            m["attention_gflops"] = attention_flops(r["shape"], int(d), n_prompt) * m["prefill"] / n_prompt / 1e9
            m["cache_gb_per_s"] = cache_bytes_read(r["shape"], cache_type, int(d), n_gen) * m["decode"] / 1e9
            depth_report[d] = m
        report["engines"][e] = {
            "peak_rss_bytes": r["peak_rss_bytes"],
            **({"group_size": r["group_size"], "window": r["window"]} if "group_size" in r else {}),
            "depths": depth_report,
        }
    base = _ours(results)
    # The ratios' baseline is the faster llama.cpp engine that took turns with ours; llama-bench,
    # which runs at another time, gets ratios of its own.
    llamas = _llamas(results)
    llama_benches = [e for e in LLAMA_BENCH_ENGINES if e in results]
    if base in results and (llamas or llama_benches):
        for d in map(str, depths):
            ours = report["engines"][base]["depths"][d]
            ratios = {}
            for k in ("prefill", "decode"):
                if llamas:
                    ratios[f"{k}_vs_best_llama.cpp"] = ours[k] / max(report["engines"][e]["depths"][d][k] for e in llamas)
                if "llama.cpp-fa" in results:
                    ratios[f"{k}_vs_llama.cpp-fa"] = ours[k] / report["engines"]["llama.cpp-fa"]["depths"][d][k]
                if llama_benches:
                    ratios[f"{k}_vs_best_llama-bench"] = ours[k] / max(report["engines"][e]["depths"][d][k]
                                                                        for e in llama_benches)
            report["ratios"][d] = ratios
        if llamas:  # llama-bench's memory is not measured
            report["ratios"]["peak_rss_vs_" + llamas[0]] = results[base]["peak_rss_bytes"] / results[llamas[0]]["peak_rss_bytes"]
    return report


def read_times(report: Dict[str, object]) -> Dict[str, Tuple[Dict[str, float], Optional[float]]]:
    """A single-type report's times to read a document from empty: for each depth past 0, the
    seconds of each engine that timed its fills (llama-bench does not), and how many times as fast
    as the faster llama.cpp ours read it (None without both)."""
    engines: Dict[str, Dict] = report["engines"]
    out = {}
    for d in next(iter(engines.values()))["depths"]:
        reads = {e: r["depths"][d]["read_seconds"] for e, r in engines.items() if "read_seconds" in r["depths"][d]}
        if int(d) > 0 and reads:
            llamas, ours = [reads[e] for e in _llamas(reads)], reads.get(_ours(reads))
            out[d] = (reads, min(llamas) / ours if llamas and ours else None)
    return out


def format_report(report: Dict[str, object]) -> str:
    """``run_bench``'s report as the table ``pyselfextend bench`` prints; with several cache
    types, a table per type and then each later type against the first, engine by engine."""
    if "by_cache_type" in report:
        types = report["cache_types"]
        lines = [format_report(report["by_cache_type"][ct]) for ct in types]
        for ct, engines in report["against_first"].items():
            lines.append(f"{ct} cache / {types[0]} cache, same run (prefill / decode; peak RSS):")
            for e, r in engines.items():
                lines.append(f"  {e:<14} " + ", ".join(f"{d}: {m['prefill']:.2f}x / {m['decode']:.2f}x"
                                                      for d, m in r["depths"].items())
                             + (f"; peak RSS {r['peak_rss']:.2f}x" if "peak_rss" in r else ""))
        return "\n".join(lines)
    roof, threads = report["roofline"], report["threads"]
    engines: Dict[str, Dict] = report["engines"]
    depths = list(next(iter(engines.values()))["depths"])
    base = _ours(engines)
    lines = [f"model {report['model']}",
             f"{threads} threads, {report['cache_type']} KV cache; median of {report['repetitions']}; prefill = "
             f"{report['n_prompt']} tokens in one batch after DEPTH cached tokens, decode = {report['n_gen']} tokens one "
             "at a time after them; tokens/s",
             f"machine limits with {threads} threads: {roof['fma_gflops']:.0f} GFLOP/s (f32 multiply-add), "
             f"{roof['read_gb_per_s']:.1f} GB/s (memory reads); attention GFLOP/s = attention FLOPs of the prefill / its "
             "time, cache GB/s = K/V bytes a decoding step reads / its time",
             f"{'depth':>7}  {'engine':<14} {'prefill':>9} {'decode':>9} {'attn GFLOP/s':>13} {'cache GB/s':>11}"]
    for d in depths:
        for e, r in engines.items():
            m = r["depths"][d]
            lines.append(f"{d:>7}  {e:<14} {m['prefill']:>9.1f} {m['decode']:>9.1f} {m['attention_gflops']:>13.1f} "
                         f"{m['cache_gb_per_s']:>11.2f}")
        for key, label in (("vs_best_llama.cpp", "/ best llama"), ("vs_llama.cpp-fa", "/ llama FA on"),
                           ("vs_best_llama-bench", "/ llama-bench")):
            r = report["ratios"].get(d, {})
            if f"prefill_{key}" in r:
                lines.append(f"{d:>7}  {base + ' ' + label:<14} {r[f'prefill_{key}']:>8.2f}x {r[f'decode_{key}']:>8.2f}x")
    lines.append("peak RSS: " + ", ".join(f"{e} {r['peak_rss_bytes'] / 2**20:.0f} MiB" for e, r in engines.items()
                                          if r["peak_rss_bytes"] is not None))
    for d, (reads, speedup) in read_times(report).items():
        lines.append(f"time to read {d} tokens from empty (batches of {batch_size(int(report['n_prompt']))}): "
                     + ", ".join(f"{e} {sec:.1f} s" for e, sec in reads.items())
                     + (f" ({base} reads {speedup:.2f}x as fast as the faster llama.cpp)" if speedup else ""))
    for e, r in engines.items():
        if "group_size" in r and r["group_size"] > 1:
            lines.append(f"{e}: group_size={r['group_size']} window={r['window']}")
    return "\n".join(lines)


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "--worker":
    _, _, engine, path, threads, cache_type, n_ctx, n_prompt, n_gen = sys.argv
    try:
        _serve_worker(engine, path, int(threads), cache_type, int(n_ctx), int(n_prompt), int(n_gen))
    except (ValueError, MemoryError, RuntimeError, OSError) as e:  # said once, by the parent's error line
        print(f"pyselfextend bench: {engine}: {e}", file=sys.stderr)
        sys.exit(1)
