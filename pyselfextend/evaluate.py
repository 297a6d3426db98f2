"""pyselfextend evaluate: the whole long-context evaluation in one command, and its results page.

Runs on one model: the speed and memory benchmark against llama.cpp (first, while the run has
the machine to itself); passkey retrieval for SelfExtend and each baseline (ordinary attention,
llama.cpp's group attention, YaRN) at several lengths and key depths; and perplexity by position
over one long document for the same methods. With --second-model, passkey retrieval on a model of
another family too, SelfExtend against ordinary attention, past that model's trained context.
Writes results.json (after every step), perplexity.png and the page results.md into --out. With
the defaults, SmolLM2-135M on two cores takes about two hours; --resume continues an interrupted
run where it stopped (every finished passkey trial is kept).

The default document is the GNU Coding Standards (standards.info), English prose of about 60k
tokens, from Debian's gnu-standards package (apt-get download gnu-standards); --document takes
any UTF-8 text instead.
"""
from __future__ import annotations

import json
import math
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional

from .bench import batch_size, read_times, run_bench
from .methods import METHODS, Method
from .passkey import Cell

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
            version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else "unknown version"
            subprocess.run(["dpkg-deb", "-x", str(deb), tmp + "/x"], check=True, capture_output=True)
        except (OSError, subprocess.CalledProcessError, StopIteration) as e:
            raise RuntimeError("cannot fetch Debian's gnu-standards package (needs apt-get and dpkg-deb); "
                               f"pass --document FILE instead ({e})") from None
        raw = gzip.decompress((Path(tmp) / "x" / GNU_STANDARDS_MEMBER).read_bytes()).decode("utf-8", "replace")
    # Drop the Info navigation lines and separators; keep the prose.
    text = "\n".join(l for l in raw.split("\n") if not l.startswith("File: ") and "\x1f" not in l)
    dest.parent.mkdir(parents=True, exist_ok=True)
    dest.write_text(text, encoding="utf-8")
    dest.with_suffix(".version").write_text(version + "\n")
    return dest


def describe_gnu_standards(path: Path) -> str:
    version_file = path.with_suffix(".version")
    version = version_file.read_text().strip() if version_file.exists() else "unknown version"
    return (f"the GNU Coding Standards (`standards.info`, English prose) from Debian's `{GNU_STANDARDS_DEB}` package "
            f"{version}, fetched by `apt-get download {GNU_STANDARDS_DEB}` and unpacked by `pyselfextend evaluate` "
            f"into `{str(path).replace(str(Path.home()), '~')}` (Info navigation lines dropped)")


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


def _earlier_run(path: Path, model: str, threads: Optional[int]) -> Optional[Dict[str, object]]:
    """The results.json of an earlier run into the same folder, if it measured the same model with
    the same thread count (anything else cannot be resumed)."""
    if not path.exists():
        return None
    try:
        earlier = json.loads(path.read_text())
    except ValueError:
        raise ValueError(f"{path} is not a results file (invalid JSON); remove it or drop --resume") from None
    if earlier.get("model") != model or earlier.get("threads") != threads:
        raise ValueError(f"{path} measured {earlier.get('model')} with {earlier.get('threads')} threads, not {model} "
                         f"with {threads}: cannot resume it; choose another --out or drop --resume")
    return earlier


def _machines(earlier: Optional[Dict[str, object]]) -> str:
    """This machine, after the one(s) an earlier run that is resumed was measured on, if others."""
    machine = describe_machine()
    before = str((earlier or {}).get("machine") or "")
    return machine if not before or machine in before else f"{before}, then {machine}"


def run_command() -> Optional[str]:
    """The command line as the page shows it: --resume only continues the same run."""
    args = [a for a in sys.argv[1:] if a != "--resume"]
    return "pyselfextend " + " ".join(args) if args else None


def run_evaluation(model: str, out: Path, lengths: List[int], depths: List[float], ppl_ctx: int, bucket: int,
                   bench_depths: List[int], threads: Optional[int], document: Optional[Path],
                   methods: List[Method], bench: bool = True,
                   baseline_lengths: Optional[List[int]] = None, resume: bool = False,
                   second_model: Optional[str] = None, second_lengths: Optional[List[int]] = None) -> Dict[str, object]:
    """Runs everything and writes results.json (after every step), perplexity.png and results.md.

    With ``second_model`` (a model of another family), passkey retrieval on it too, SelfExtend
    against ordinary attention, at ``second_lengths`` (default: 1.25 and 1.5 times its trained
    context) and the same depths.

    Passkey runs SelfExtend at ``lengths`` and the baselines at ``baseline_lengths`` (default: the
    same; they must be the first of ``lengths``), all with the keys of seed 0, hence the same
    prompts at a given length and depth.

    With ``resume``, the steps that an earlier, interrupted run into ``out`` finished with the same
    settings (each passkey trial, each method's perplexity, the benchmark) are kept as they are and
    only the rest runs. ``minutes`` counts the time of every step kept."""
    from . import _engine
    from .baselines import open_method
    from .models import resolve_model
    from .passkey import passkey_keys
    from .perplexity import plot, summarize, token_nll
    from .progress import ProgressBar, log_line

    baseline_lengths = baseline_lengths or lengths
    if baseline_lengths != lengths[:len(baseline_lengths)]:
        raise ValueError(f"the baseline lengths {baseline_lengths} must be the first of the lengths {lengths}: keys are "
                         "drawn length by length, and every method must see the same prompts")
    log = log_line
    path = str(resolve_model(model))
    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "results.json"
    earlier = _earlier_run(results_file, path, threads) if resume else None
    today = time.strftime("%Y-%m-%d")
    first_day = str(earlier["date"])[:10] if earlier else today
    report: Dict[str, object] = {"model": path, "date": today if first_day == today else f"{first_day} to {today}",
                                 "threads": threads, "machine": _machines(earlier), "command": run_command(),
                                 "n_ctx_train": _engine.Model(path).n_ctx_train, "passkey": {}, "perplexity": {},
                                 "resumed": int(earlier.get("resumed", 0)) + 1 if earlier else 0}

    def save() -> None:
        seconds = [float(t["seconds"]) for ts in report["passkey"].values() for t in ts]
        seconds += [float(t["seconds"]) for ts in report.get("second_model", {}).get("passkey", {}).values() for t in ts]
        seconds += [float(p["seconds"]) for p in report["perplexity"].values()]
        seconds += [float(report["bench"]["seconds"])] if "bench" in report else []
        report["minutes"] = round(sum(seconds) / 60, 1)
        results_file.write_text(json.dumps(report, indent=2))

    # The benchmark first, while the run has the machine to itself: its numbers are the only ones
    # that other load would change, and a long run is the more likely to share the machine later.
    if bench:
        kept = (earlier or {}).get("bench")
        if (kept and "seconds" in kept and kept.get("repetitions") == BENCH_REPETITIONS
                and list(next(iter(kept["engines"].values()))["depths"]) == [str(d) for d in sorted(set(bench_depths))]):
            log("bench: kept from the earlier run")
        else:
            started = time.perf_counter()
            kept = run_bench(path, threads=threads, depths=bench_depths, repetitions=BENCH_REPETITIONS, log=log)
            kept["seconds"] = round(time.perf_counter() - started, 2)
            kept["machine"] = describe_machine()
        report["bench"] = kept
        save()

    keys = passkey_keys(0, lengths, depths, 1)
    _passkey_steps(report["passkey"], (earlier or {}).get("passkey", {}), path, methods, lengths, baseline_lengths,
                   depths, keys, threads, save)

    if second_model:
        # Another family at its own lengths past its own trained context: SelfExtend against
        # ordinary attention on the same prompts.
        second_path = str(resolve_model(second_model))
        second_train = _engine.Model(second_path).n_ctx_train
        second_lengths = second_lengths or [second_train * 5 // 4, second_train * 3 // 2]
        report["second_model"] = {"name": second_model, "model": second_path, "n_ctx_train": second_train,
                                  "passkey": {}}
        kept = (earlier or {}).get("second_model") or {}
        _passkey_steps(report["second_model"]["passkey"], kept.get("passkey", {}) if kept.get("model") == second_path
                       else {}, second_path, [METHODS["SelfExtend"], METHODS["ordinary"]], second_lengths,
                       second_lengths, depths, passkey_keys(0, second_lengths, depths, 1), threads, save)

    doc = document or fetch_gnu_standards(Path.home() / ".cache" / "pyselfextend" / "documents" / "gnu-standards.txt")
    report["document"] = str(doc) if document else describe_gnu_standards(doc)
    report["document_path"] = str(doc).replace(str(Path.home()), "~")
    # Every method reads the file's own tokenizer, so the document is tokenized once.
    ids = list(_engine.Vocab(path).tokenize(Path(doc).read_text(encoding="utf-8"), True, True))[:ppl_ctx]
    for method in methods:
        name = method.name
        kept = (earlier or {}).get("perplexity", {}).get(name)
        if (kept and "seconds" in kept and earlier.get("document_path") == report["document_path"]
                and kept["n_predicted"] == len(ids) - 1 and kept["buckets"][0]["n"] == min(bucket, len(ids) - 1)):
            log(f"perplexity: {name}: kept from the earlier run")
        else:
            started = time.perf_counter()
            llm = open_method(path, ppl_ctx, threads, **method.options)
            log(f"perplexity: {name}: {len(ids)} tokens")
            kept = summarize(token_nll(llm, ids, progress=ProgressBar(f"perplexity {name}")), bucket)
            kept["seconds"] = round(time.perf_counter() - started, 2)
            del llm
        report["perplexity"][name] = kept
        save()
    plot(report["perplexity"], int(report["n_ctx_train"]), str(out / "perplexity.png"))

    save()
    (out / "results.md").write_text(render_markdown(report))
    return report


def _passkey_steps(section: Dict[str, List[Dict[str, object]]], earlier: Dict[str, List[Dict[str, object]]],
                   path: str, methods: List[Method], lengths: List[int], baseline_lengths: List[int],
                   depths: List[float], keys: Dict[Cell, int], threads: Optional[int],
                   save: Callable[[], None]) -> None:
    """Each method's passkey trials into ``section`` (SelfExtend at ``lengths``, the others at
    ``baseline_lengths``), saved after every trial; the trials ``earlier`` finished with the same
    keys are kept, not run again."""
    from .passkey import run_passkey
    from .progress import log_line

    for method in methods:
        name = method.name
        section[name] = []
        for n in lengths if name == "SelfExtend" else baseline_lengths:
            before = list(section[name])
            asked = {(d, keys[(n, d, 0)]) for d in depths}
            done = [t for t in earlier.get(name, []) if t["target_length"] == n
                    and (float(t["depth"]), int(t["key"])) in asked]
            if len(done) == len(depths):
                log_line(f"passkey: {name} at {n}: kept from the earlier run")
            elif done:
                log_line(f"passkey: {name} at {n}: {len(done)} trials kept from the earlier run")

            def progress(results: List[Dict[str, object]]) -> None:
                section[name] = before + results
                save()

            section[name] = before + run_passkey(path, [n], depths, trials=1, n_threads=threads, log=log_line,
                                                 keys=keys, show_progress=True, done=done, on_trial=progress,
                                                 **method.options)
            save()


def _flags(name: str) -> str:
    """A method's flags on the command line (none for a name this version does not know)."""
    return METHODS[name].flags if name in METHODS else ""


def size_label(n: int) -> str:
    """16384 -> '16k' (a multiple of 1024), else the number."""
    return f"{n // 1024}k" if n % 1024 == 0 and n else str(n)


def _passkey_cell(trial: Dict[str, object]) -> str:
    if trial["ok"]:
        return "found"
    answer = " ".join(str(trial["answer"]).split())[:24].replace("|", "/").replace("`", "'")
    return f"missed: `{answer}`"


def _passkey_table(passkey: Dict[str, List[Dict[str, object]]], logprob: bool = False) -> List[str]:
    """One row per method and length, a cell per depth (with the key's log P when ``logprob``)."""
    depths = sorted({float(t["depth"]) for ts in passkey.values() for t in ts})
    lines = ["| method | tokens | settings | " + " | ".join(f"depth {d:g}" for d in depths) + " | found |",
             "| --- | --- | --- |" + " --- |" * (len(depths) + 1)]
    for name, trials in passkey.items():
        for n in sorted({int(t["target_length"]) for t in trials}):
            row = [t for t in trials if t["target_length"] == n]
            first = row[0]
            settings = (f"G={first['group_size']}, W={first['window']}" if first.get("method") == "selfextend"
                        else str(first.get("method", "")))
            cells = []
            for d in depths:
                ts = [t for t in row if float(t["depth"]) == d]
                cells.append("; ".join(_passkey_cell(t) + (f", log P {float(t['key_logprob']):.2f}" if logprob else "")
                                       for t in ts))
            lines.append(f"| {name} | {row[0]['length']} | {settings} | " + " | ".join(cells)
                         + f" | {sum(bool(t['ok']) for t in row)}/{len(row)} |")
    return lines


def _passkey_section(r: Dict[str, object], L: int, threads: str) -> List[str]:
    passkey: Dict[str, List[Dict[str, object]]] = r["passkey"]
    if not passkey:
        return []
    lines = ["## Passkey retrieval", "",
             "A random 5-digit key is hidden at a given depth of filler text (llama.cpp's passkey wording), "
             "then asked for; the model answers by greedy decoding (16 tokens) and a trial counts as found "
             "when the first number of the answer is the key. Keys come from seed 0, so every method sees "
             "the very same prompt at a given length and depth. One trial per cell.", ""] + _passkey_table(passkey)
    lines += ["", "Seconds per trial (prompt processing plus answer): " + "; ".join(
        f"{name} {min(t['seconds'] for t in ts):.0f}-{max(t['seconds'] for t in ts):.0f} s"
        for name, ts in passkey.items()) + "."]
    return lines + _passkey_commands(passkey, threads)


def _passkey_commands(passkey: Dict[str, List[Dict[str, object]]], threads: str, model: str = "") -> List[str]:
    """The same trials one method at a time, as ``pyselfextend passkey`` commands (``-m model`` when
    not the default model)."""
    depths = ",".join(f"{d:g}" for d in sorted({float(t["depth"]) for ts in passkey.values() for t in ts}))
    lines = ["", "The same runs one method at a time:", "", "```"]
    for name, trials in passkey.items():
        lengths = ",".join(size_label(n) for n in sorted({int(t["target_length"]) for t in trials}))
        lines.append(f"pyselfextend passkey{f' -m {model}' if model else ''} --lengths {lengths} --depths {depths} "
                     f"--seed 0{_flags(name)}{threads}")
    return lines + ["```", ""]


def _found(trials: List[Dict[str, object]]) -> str:
    """``k/n (95% lo-hi)``: how many trials were found, with the rate's Wilson interval."""
    from .stats import wilson_interval

    k = sum(bool(t["ok"]) for t in trials)
    lo, hi = wilson_interval(k, len(trials))
    return f"{k}/{len(trials)} (95% {lo:.0%}-{hi:.0%})"


def _paired_gain(passkey: Dict[str, List[Dict[str, object]]]) -> Optional[tuple]:
    """SelfExtend's log P(key) minus ordinary attention's, trial by trial on the same prompts: the
    mean, its 95% interval and the number of pairs (None without pairs)."""
    from .stats import mean_interval

    other = {(t["target_length"], t["depth"], t["key"]): float(t["key_logprob"]) for t in passkey.get("ordinary", [])}
    gains = [float(t["key_logprob"]) - other[(t["target_length"], t["depth"], t["key"])]
             for t in passkey.get("SelfExtend", []) if (t["target_length"], t["depth"], t["key"]) in other]
    return (*mean_interval(gains), len(gains)) if gains else None


def _second_model_section(r: Dict[str, object], threads: str) -> List[str]:
    second = r.get("second_model")
    if not second or not second["passkey"]:
        return []
    passkey = second["passkey"]
    lines = [f"## A second model family: {Path(str(second['model'])).name}", "",
             f"Its trained context is {second['n_ctx_train']} tokens. The same passkey test (seed 0, the same depths, "
             "its own tokenizer) at lengths past that, SelfExtend against ordinary attention on the same prompts; "
             "beside each answer the log-probability (nats) of the key's tokens right after the question, "
             "teacher-forced (0 is certainty, a random 5-digit number about -11.5).", ""] + _passkey_table(passkey, True)
    gain = _paired_gain(passkey)
    if gain:
        lines += ["", f"SelfExtend's log P(key) minus ordinary attention's, trial by trial: {gain[0]:+.2f} "
                      f"(95% {gain[1]:+.2f} to {gain[2]:+.2f}) over {gain[3]} trials."]
    return lines + _passkey_commands(passkey, threads, str(second.get("name") or second["model"]))


def _pooled(buckets: List[Dict[str, object]]) -> float:
    """The perplexity of the tokens of several buckets taken together."""
    n = sum(int(b["n"]) for b in buckets)
    return math.exp(sum(int(b["n"]) * math.log(float(b["ppl"])) for b in buckets) / n)


def _perplexity_goal(r: Dict[str, object], L: int) -> Dict[str, Dict[str, float]]:
    """For each method: the perplexity of positions (L/2, L] and each bucket past L against it."""
    goal = {}
    for n, summary in r.get("perplexity", {}).items():
        bs = summary["buckets"]
        ref = [b for b in bs if b["end"] <= L and b["start"] > L // 2]
        past = [b for b in bs if b["start"] > L]
        if ref and past:
            base = _pooled(ref)
            ratios = [float(b["ppl"]) / base for b in past]
            worst = max(range(len(past)), key=lambda i: ratios[i])
            goal[n] = {"base": base, "worst": ratios[worst], "worst_start": past[worst]["start"],
                       "worst_end": past[worst]["end"], "ratios": ratios}
    return goal


def _same_tokens(r: Dict[str, object], name: str, L: int) -> Optional[Dict[str, object]]:
    """``name``'s perplexity over ordinary attention's on the same tokens, bucket by bucket: the
    document's own ups and downs cancel out."""
    ppl = r.get("perplexity", {})
    if name not in ppl or "ordinary" not in ppl or name == "ordinary":
        return None
    pairs = list(zip(ppl[name]["buckets"], ppl["ordinary"]["buckets"]))
    inside = [float(a["ppl"]) / float(b["ppl"]) for a, b in pairs if a["end"] <= L]
    past = [float(a["ppl"]) / float(b["ppl"]) for a, b in pairs if a["start"] > L]
    if not inside or not past:
        return None
    return {"inside_min": min(inside), "inside_max": max(inside), "past": past}


def _perplexity_section(r: Dict[str, object], L: int, threads: str) -> List[str]:
    ppl = r.get("perplexity", {})
    if not ppl:
        return []
    names = list(ppl)
    n_tokens = ppl[names[0]]["n_predicted"] + 1
    lines = ["## Perplexity by position", "",
             f"One document of {n_tokens} tokens evaluated as a single sequence (batches of 512 tokens, "
             f"each token predicted from every token before it); perplexity per bucket of positions. "
             f"Document: {r.get('document')}.", "", "![perplexity by position](perplexity.png)", "",
             "| tokens | " + " | ".join(names) + " |", "| --- |" + " --- |" * len(names)]
    for i, b in enumerate(ppl[names[0]]["buckets"]):
        cells = [f"{ppl[n]['buckets'][i]['ppl']:.2f}" if i < len(ppl[n]["buckets"]) else "" for n in names]
        lines.append(f"| {b['start']}-{b['end']} | " + " | ".join(cells) + " |")
    lines.append("| all | " + " | ".join(f"{ppl[n]['ppl']:.2f}" for n in names) + " |")
    lines.append("")
    lines.append(f"Each bucket past the trained context against the perplexity of positions {L // 2 + 1}-{L} "
                 f"taken together (goal for SelfExtend: every bucket within 10%):")
    lines.append("")
    for n, g in _perplexity_goal(r, L).items():
        lines.append(f"- {n}: " + ", ".join(f"{x:.2f}x" for x in g["ratios"]) + f" of {g['base']:.2f}; worst "
                     f"{g['worst']:.2f}x at {g['worst_start']}-{g['worst_end']}, "
                     f"{'within' if g['worst'] <= 1.10 else 'outside'} 10%.")
    compared = [(n, _same_tokens(r, n, L)) for n in names]
    compared = [(n, c) for n, c in compared if c]
    if compared:
        lines += ["", "The text itself is easier or harder in places, which moves every curve alike. On the same "
                  "tokens, each method against ordinary attention:", ""]
        for n, c in compared:
            lines.append(f"- {n}: {c['inside_min']:.2f}x-{c['inside_max']:.2f}x within the trained context; "
                         "past it, bucket by bucket, " + ", ".join(f"{x:.2g}x" for x in c["past"]) + ".")
    ctx = size_label(n_tokens) if n_tokens in (16384, 8192, 32768) else str(n_tokens)
    lines += ["", "The same runs one method at a time (`--plot out.png` draws the curve):", "", "```"]
    for n in names:
        lines.append(f"pyselfextend perplexity -f {r.get('document_path', 'DOCUMENT')} --ctx {ctx} "
                     f"--bucket {size_label(ppl[n]['buckets'][0]['n'])}{_flags(n)}{threads}")
    return lines + ["```", ""]


def _bench_section(r: Dict[str, object], threads: str) -> List[str]:
    if "bench" not in r:
        return []
    b = r["bench"]
    engines = b["engines"]
    depths = list(next(iter(engines.values()))["depths"])
    roof = b.get("roofline")
    lines = ["## Speed and memory against llama.cpp", "",
             # said only where it differs from the page's header (a resumed run)
             (f"Measured on {b['date']} on {b['machine']}. "
              if b.get("machine") and (b["machine"], b["date"]) != (r["machine"], r["date"]) else "")
             + f"Tokens/s, prefill / decode: prefill is one batch of {b['n_prompt']} tokens after DEPTH cached "
             f"tokens, decode is {b['n_gen']} tokens one at a time after them; median of {b['repetitions']}. "
             "Every engine runs the same model file, thread count and tokens, in its own process. "
             "`selfextend` is pyselfextend as a user gets it for that context (SelfExtend "
             + ", ".join(f"G={e['group_size']}, W={e['window']}" for e in engines.values()
                         if e.get("group_size", 1) > 1)
             + "), `ordinary` is pyselfextend with SelfExtend off, `llama.cpp-fa` and `llama.cpp` are libllama "
             "from the pinned source with flash attention on and off.", "",
             "| depth | " + " | ".join(engines) + " | selfextend / better llama.cpp |",
             "| --- |" + " --- |" * (len(engines) + 1)]
    for d in depths:
        ratio = b.get("ratios", {}).get(d, {})
        rcell = (f"{ratio['prefill_vs_best_llama.cpp']:.2f}x / {ratio['decode_vs_best_llama.cpp']:.2f}x"
                 if "prefill_vs_best_llama.cpp" in ratio else "")
        lines.append(f"| {d} | " + " | ".join(f"{e['depths'][d]['prefill']:.1f} / {e['depths'][d]['decode']:.1f}"
                                              for e in engines.values()) + f" | {rcell} |")
    lines += ["", "Peak resident memory (RSS): " + ", ".join(
        f"{k} {v['peak_rss_bytes'] / 2**20:.0f} MiB" for k, v in engines.items()) + ".", ""]
    if roof and all("attention_gflops" in e["depths"][d] for e in engines.values() for d in depths):
        lines += [f"How far from the machine's limits: measured in the same run with the same threads, "
                  f"{roof['fma_gflops']:.0f} GFLOP/s of f32 multiply-add and {roof['read_gb_per_s']:.1f} GB/s of "
                  "memory reads. Attention GFLOP/s is the attention FLOPs of the prefill over its whole time (a "
                  "lower bound on the attention's own speed); cache GB/s is the K/V bytes a decoding step reads "
                  "over its whole time.", "",
                  "| depth | " + " | ".join(engines) + " |", "| --- |" + " --- |" * len(engines)]
        for d in depths:
            lines.append(f"| {d} | " + " | ".join(
                f"{e['depths'][d]['attention_gflops']:.1f} GFLOP/s, {e['depths'][d]['cache_gb_per_s']:.2f} GB/s"
                for e in engines.values()) + " |")
        lines.append("")
    reads = read_times(b)
    if reads:
        lines += [f"Time to read a document from empty (the fills before each depth, batches of "
                  f"{batch_size(int(b['n_prompt']))}): " + "; ".join(
                      f"{d} tokens " + ", ".join(f"{e} {sec:.1f} s" for e, sec in times.items())
                      + (f" (selfextend reads {ratio:.2f}x as fast as the faster llama.cpp)" if ratio else "")
                      for d, (times, ratio) in reads.items()) + ".", ""]
    lines += ["The same run alone:", "", "```",
              f"pyselfextend bench --depths {','.join(size_label(int(d)) if int(d) else '0' for d in depths)} "
              f"--repetitions {b['repetitions']}{threads}", "```", ""]
    return lines


def _key_place(trial: Dict[str, object]) -> str:
    """Where a SelfExtend trial's key sat for the question: read at its own position (within the
    window) or at a grouped one."""
    distance = round((1 - float(trial["depth"])) * int(trial["length"]))
    inside = distance < int(trial["window"])
    return (f"the key about {distance} tokens before the question, "
            + (f"within the window W={trial['window']}: read at its exact position" if inside
               else f"beyond the window W={trial['window']}: read at a grouped position"))


def _summary(r: Dict[str, object], L: int) -> List[str]:
    lines = ["## Summary", ""]
    se = r["passkey"].get("SelfExtend")
    if se:
        per, all_found = [], []
        for n in sorted({int(t["target_length"]) for t in se}):
            row = [t for t in se if t["target_length"] == n]
            found = sum(bool(t["ok"]) for t in row)
            per.append(f"{found}/{len(row)} at {row[0]['length']}")
            if found == len(row):
                all_found.append(int(row[0]["length"]))
        lines.append(f"- Passkey, SelfExtend: found {', '.join(per)} tokens. "
                     + (f"Every trial was found at {', '.join(map(str, all_found))} tokens (up to "
                        f"{max(all_found) / L:.1f}x the trained context)." if all_found
                        else "No length had every trial found."))
        missed = [t for t in se if not t["ok"]]
        if missed:
            lines.append("- Goal, every trial found: not met. Missed: " + "; ".join(
                f"depth {t['depth']:g} at {t['length']} tokens ({_key_place(t)})" for t in missed) + ".")
        else:
            lines.append("- Goal, every trial found: met.")
        for name, ts in r["passkey"].items():
            if name != "SelfExtend":
                lines.append(f"- Passkey, {name} on the same prompts: found {sum(bool(t['ok']) for t in ts)}"
                             f"/{len(ts)}.")
    second = r.get("second_model")
    if second and second["passkey"]:
        ts = [t for trials in second["passkey"].values() for t in trials]
        gain = _paired_gain(second["passkey"])
        lines.append(f"- Passkey on a second model family, {Path(str(second['model'])).name} (trained context "
                     f"{second['n_ctx_train']}), at {min(t['length'] for t in ts)}-{max(t['length'] for t in ts)} "
                     "tokens: " + ", ".join(f"{name} found {_found(trials)}" for name, trials in second["passkey"].items())
                     + (f"; log P(key) SelfExtend minus ordinary {gain[0]:+.2f} (95% {gain[1]:+.2f} to "
                        f"{gain[2]:+.2f})." if gain else "."))
    for n, g in _perplexity_goal(r, L).items():
        what = (f"worst bucket past {L} tokens ({g['worst_start']}-{g['worst_end']}) {g['worst']:.2f}x the "
                f"perplexity of positions {L // 2 + 1}-{L} ({g['base']:.2f})")
        if n == "SelfExtend":
            same = _same_tokens(r, n, L)
            lines.append(f"- Perplexity, {n}: {what}: {'meets' if g['worst'] <= 1.10 else 'misses'} the within-10% "
                         "goal" + (f"; on the same tokens {same['past'][0]:.2f}x ordinary attention's in the first "
                                   f"bucket past {L} and {same['past'][-1]:.2g}x in the last." if same else "."))
        else:
            lines.append(f"- Perplexity, {n}: {what}.")
    b = r.get("bench")
    if b and b.get("ratios"):
        depths = [d for d, q in b["ratios"].items() if d.isdigit() and "prefill_vs_best_llama.cpp" in q]
        rss = next((v for k, v in b["ratios"].items() if k.startswith("peak_rss")), None)
        if depths:
            lines.append("- Speed against the better llama.cpp (flash attention on or off), SelfExtend prefill / "
                         "decode: " + ", ".join(f"{b['ratios'][d]['prefill_vs_best_llama.cpp']:.2f}x / "
                                                f"{b['ratios'][d]['decode_vs_best_llama.cpp']:.2f}x at depth {d}"
                                                for d in depths)
                         + (f"; peak memory {rss:.2f}x llama.cpp's with flash attention." if rss else "."))
        reads = {d: ratio for d, (_, ratio) in read_times(b).items() if ratio}
        if reads:
            lines.append("- Reading a document from empty, SelfExtend's speed over the faster llama.cpp's: "
                         + ", ".join(f"{ratio:.2f}x at {d} tokens" for d, ratio in reads.items()) + ".")
    return lines + [""]


def render_markdown(r: Dict[str, object]) -> str:
    """The results page: every number comes from ``r`` (results.json)."""
    L = int(r.get("n_ctx_train", 0))
    threads = f" --threads {r['threads']}" if r.get("threads") else ""
    n = int(r.get("resumed", 0))
    resumed = f" (continued with `--resume` {'once' if n == 1 else f'{n} times'})" if n else ""
    lines = [f"# Long-context results: {Path(str(r['model'])).name}", "",
             f"Measured on {r['date']} on {r['machine']}, {r.get('threads') or 'all'} threads, in "
             f"{r.get('minutes', '?')} minutes{resumed}, by one command:", "", "```",
             r.get("command") or "pyselfextend evaluate --out docs", "```", "",
             f"The model's trained context is {L} tokens. Every number on this page comes from that run and is "
             "in `results.json` beside it; the page itself is written by the command.", ""]
    names = [n for n in list(r.get("passkey", {})) + list(r.get("perplexity", {})) if n in METHODS]
    if names:
        lines += ["Methods:", ""] + [f"- {n}: {METHODS[n].note}." for n in dict.fromkeys(names)] + [""]
    lines += _summary(r, L)
    lines += _passkey_section(r, L, threads)
    lines += _second_model_section(r, threads)
    lines += _perplexity_section(r, L, threads)
    lines += _bench_section(r, threads)
    return "\n".join(lines)
