"""``pyselfextend evaluate``: the whole long-context evaluation in one command, and its results page.

Runs, on one model: passkey retrieval for SelfExtend and each baseline (ordinary attention,
llama.cpp's group attention, YaRN) at several lengths and key depths; perplexity by position over
one long document for the same methods; and the speed/memory benchmark against llama.cpp. Writes
``results.json``, ``perplexity.png`` and a Markdown page (``results.md``) into ``--out``.

The default document is the GNU Coding Standards (``standards.info``), English prose of about 45k
tokens, from Debian's ``gnu-standards`` package (``apt-get download gnu-standards``); ``--document``
takes any UTF-8 text instead.
"""
from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

GNU_STANDARDS_DEB = "gnu-standards"
GNU_STANDARDS_MEMBER = "usr/share/info/standards.info.gz"


def fetch_gnu_standards(dest: Path) -> Path:
    """Downloads Debian's gnu-standards package and extracts standards.info as plain text."""
    import gzip

    if dest.exists():
        return dest
    with tempfile.TemporaryDirectory() as tmp:
        try:
            download = ["apt-get", "download", GNU_STANDARDS_DEB]
            if subprocess.run(download, cwd=tmp, capture_output=True).returncode != 0:
                # A fresh machine may have no package lists yet; fetch them once and retry.
                subprocess.run(["apt-get", "update"], check=True, capture_output=True)
                subprocess.run(download, cwd=tmp, check=True, capture_output=True)
            deb = next(Path(tmp).glob("*.deb"))
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as e:
            raise RuntimeError("cannot fetch Debian's gnu-standards package (needs apt-get and dpkg-deb); "
                               f"pass --document FILE instead ({e})") from None
        raw = gzip.decompress((Path(tmp) / "x" / GNU_STANDARDS_MEMBER).read_bytes()).decode("utf-8", "replace")
    # Drop the Info navigation lines and separators; keep the prose.
    text = "\n".join(l for l in raw.split("\n") if not l.startswith("File: ") and "\x1f" not in l)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    return dest


METHODS = {
    "SelfExtend": {},
    "ordinary": {"selfextend": False},
    "llama.cpp grp-attn 4": {"grp_attn_n": 4},
    "YaRN": {"rope_scaling": "yarn"},
}


def _open(path: str, n_ctx: int, threads: Optional[int], method: Dict[str, object]):
    if "grp_attn_n" in method:
        from .baselines import LlamaCppGroupAttention

        llm = LlamaCppGroupAttention(path, n_ctx, int(method["grp_attn_n"]), threads)
        llm.n_ctx_train = llm.plan.n_ctx_train
        return llm
    import warnings

    from .model import LocalModel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ordinary attention past L warns; here that is the point
        return LocalModel(path, n_ctx=n_ctx, n_threads=threads, **method)


BENCH_REPETITIONS = 2  # median of two: the bench fills each engine's cache to the deepest depth once


def describe_machine() -> str:
    """CPU model, core count and memory, for the results page."""
    import os

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        mem_kb = next(int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                      if l.startswith("MemTotal"))
        return f"{cpu}, {os.cpu_count()} cores, {mem_kb / 2**20:.0f} GiB, {platform.system()} {platform.machine()}"
    except (OSError, StopIteration, ValueError):
        return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.machine()}"


def run_evaluation(model: str, out: Path, lengths: List[int], depths: List[float], ppl_ctx: int, bucket: int,
                   bench_depths: str, threads: Optional[int], document: Optional[Path],
                   methods: List[str], bench: bool = True,
                   baseline_lengths: Optional[List[int]] = None) -> Dict[str, object]:
    """Runs everything and writes results.json (after every step), perplexity.png and results.md.

    Passkey runs SelfExtend at ``lengths`` and the baselines at ``baseline_lengths`` (default: the
    same), all with the same seed, hence the same keys and prompts at a given length and depth."""
    from .models import resolve_model
    from .passkey import run_passkey
    from .perplexity import plot, summarize, token_nll
    from .progress import ProgressBar

    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    path = str(resolve_model(model))
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    report: Dict[str, object] = {"model": path, "date": time.strftime("%Y-%m-%d"), "threads": threads,
                                 "machine": describe_machine(),
                                 "command": "pyselfextend " + " ".join(sys.argv[1:]) if sys.argv[1:] else None,
                                 "passkey": {}, "perplexity": {}}
    for name in methods:
        spec = METHODS[name]
        kwargs = {k: v for k, v in spec.items()}
        at = lengths if name == "SelfExtend" or baseline_lengths is None else baseline_lengths
        results = run_passkey(path, at, depths, trials=1, seed=0, n_threads=threads, log=log,
                              selfextend=kwargs.get("selfextend", True), rope_scaling=kwargs.get("rope_scaling"),
                              grp_attn_n=kwargs.get("grp_attn_n"), show_progress=True)
        report["passkey"][name] = results
        (out / "results.json").write_text(json.dumps(report, indent=2))

    doc = document or fetch_gnu_standards(Path.home() / ".cache" / "pyselfextend" / "documents" / "gnu-standards.txt")
    text = Path(doc).read_text(encoding="utf-8")
    report["document"] = str(doc) if document else "GNU Coding Standards, Debian package gnu-standards"
    for name in methods:
        llm = _open(path, ppl_ctx, threads, METHODS[name])
        ids = llm.tokenize(text)[:ppl_ctx]
        log(f"perplexity: {name}: {len(ids)} tokens")
        report["perplexity"][name] = summarize(token_nll(llm, ids, progress=ProgressBar(f"perplexity {name}")), bucket)
        report["n_ctx_train"] = llm.n_ctx_train
        (out / "results.json").write_text(json.dumps(report, indent=2))
    plot(report["perplexity"], int(report["n_ctx_train"]), str(out / "perplexity.png"))

    if bench:
        cmd = [sys.executable, "-m", "pyselfextend", "bench", "--model", path, "--depths", bench_depths, "--json",
               "--repetitions", str(BENCH_REPETITIONS)]
        if threads:
            cmd += ["--threads", str(threads)]
        report["bench"] = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
    report["minutes"] = round((time.time() - started) / 60, 1)
    (out / "results.json").write_text(json.dumps(report, indent=2))
    (out / "results.md").write_text(render_markdown(report))
    return report


def render_markdown(r: Dict[str, object]) -> str:
    """The results page: every number comes from ``r`` (results.json)."""
    from .passkey import format_table

    L = int(r.get("n_ctx_train", 0))
    lines = [f"# Long-context results: {Path(str(r['model'])).name}", "",
             f"Measured {r['date']} on {r['machine']}, {r.get('threads') or 'all'} threads, by "
             f"`pyselfextend evaluate` ({r.get('minutes', '?')} minutes). Trained context: {L} tokens.", "",
             "## Passkey retrieval (correct / trials, greedy decoding)", ""]
    for name, results in r["passkey"].items():
        lines += [f"**{name}**", "", "```", format_table(results), "```", ""]
    lines += ["## Perplexity by position", "", f"Document: {r.get('document')}.", "",
              "![perplexity by position](perplexity.png)", ""]
    names = list(r["perplexity"])
    if names:
        buckets = r["perplexity"][names[0]]["buckets"]
        lines.append("| tokens | " + " | ".join(names) + " |")
        lines.append("| --- |" + " --- |" * len(names))
        for i, b in enumerate(buckets):
            cells = [f"{r['perplexity'][n]['buckets'][i]['ppl']:.2f}" if i < len(r['perplexity'][n]['buckets'])
                     else "" for n in names]
            lines.append(f"| {b['start']}-{b['end']} | " + " | ".join(cells) + " |")
        lines.append("")
        # the goal: buckets past L within 10% of the bucket just before L
        for n in names:
            bs = r["perplexity"][n]["buckets"]
            ref = [b for b in bs if b["end"] <= L and b["start"] > L // 2]
            past = [b for b in bs if b["start"] > L]
            if ref and past:
                base = sum(b["ppl"] for b in ref) / len(ref)
                worst = max(b["ppl"] / base for b in past)
                lines.append(f"- {n}: worst bucket past {L} is {worst:.2f}x the mean of the {L // 2}-{L} buckets "
                             f"({'within' if worst <= 1.10 else 'outside'} the 10% goal).")
        lines.append("")
    if "bench" in r:
        b = r["bench"]
        lines += ["## Speed and memory against llama.cpp", "", "Tokens/s, prefill / decode:", "",
                  "| depth | " + " | ".join(b["engines"]) + " |", "| --- |" + " --- |" * len(b["engines"])]
        depths = list(next(iter(b["engines"].values()))["depths"])
        for d in depths:
            lines.append(f"| {d} | " + " | ".join(f"{e['depths'][d]['prefill']:.1f} / {e['depths'][d]['decode']:.1f}"
                                                  for e in b["engines"].values()) + " |")
        lines += ["", "Peak RSS: " + ", ".join(f"{k} {v['peak_rss_bytes'] / 2**20:.0f} MiB"
                                              for k, v in b["engines"].items()) + ".", ""]
    lines += ["Reproduce: `pyselfextend evaluate --out docs/` (see `pyselfextend evaluate --help`).", ""]
    return "\n".join(lines)
