"""pyselfextend sweep: SelfExtend's G and W chosen from evidence.

Retrieval and perplexity over a grid of G and W at several lengths, with ordinary attention,
YaRN and llama.cpp's group attention as references, on one model.

The task is a long natural document (by default the GNU Coding Standards, as ``evaluate`` reads)
with short facts planted in it, each about a different thing and with a 5-digit answer ("the
ferry to the island leaves from pier number 48213"), about one per 2k tokens. Every setting reads
the same document once, up to the longest length it can reach. At each length n it stops a few
dozen tokens short of n (room for a question and its answer) and asks about every fact planted
so far: the question is appended to what is cached, answered greedily, scored, and dropped
again, so a question costs a few dozen tokens, not a new prompt. Every setting therefore answers the very same prompts at a given length. A trial
counts as found when the answer's first number is the fact's; it is also scored by the
log-probability of the answer's tokens right after the question (teacher-forced), which
separates settings that find alike. Perplexity past the trained context comes from the same
reading of the document, for free.

Writes sweep.json after every reading (``--resume`` continues an interrupted run), sweep.png (heat
maps; needs matplotlib) and the page sweep.md into --out.
"""
from __future__ import annotations

import json
import math
import random
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from .evaluate import size_label
from .methods import names_in

# (statement, question): the statement is planted with its number, the question ends just before it.
FACTS: Tuple[Tuple[str, str], ...] = (
    ("the spare key to the print room is kept in locker {key}",
     "In which locker is the spare key to the print room kept? Answer: in locker"),
    ("the wifi password of the library is {key}",
     "What is the wifi password of the library? Answer: the wifi password of the library is"),
    ("the ferry to the island leaves from pier number {key}",
     "From which pier number does the ferry to the island leave? Answer: from pier number"),
    ("the night guard's badge number is {key}",
     "What is the night guard's badge number? Answer: the night guard's badge number is"),
    ("the red bicycle is registered under the number {key}",
     "Under which number is the red bicycle registered? Answer: under the number"),
    ("the safe in the basement opens with the combination {key}",
     "Which combination opens the safe in the basement? Answer: the combination"),
    ("the botanist's parcel has the tracking number {key}",
     "What tracking number does the botanist's parcel have? Answer: the tracking number"),
    ("the old lighthouse was given the inventory number {key}",
     "Which inventory number was the old lighthouse given? Answer: the inventory number"),
    ("the choir rehearses in hall number {key}",
     "In which hall number does the choir rehearse? Answer: in hall number"),
    ("the recipe for plum cake is filed as card {key}",
     "As which card is the recipe for plum cake filed? Answer: as card"),
    ("the telescope on the roof is booked under reference {key}",
     "Under which reference is the telescope on the roof booked? Answer: under reference"),
    ("the door code of the captain's cabin is {key}",
     "What is the door code of the captain's cabin? Answer: the door code of the captain's cabin is"),
    ("the blue tram stops at platform number {key}",
     "At which platform number does the blue tram stop? Answer: at platform number"),
    ("the violin in the museum is catalogued as item {key}",
     "As which item is the violin in the museum catalogued? Answer: as item"),
    ("the beekeeper's licence number is {key}",
     "What is the beekeeper's licence number? Answer: the beekeeper's licence number is"),
    ("the map of the northern caves is stored in drawer {key}",
     "In which drawer is the map of the northern caves stored? Answer: in drawer"),
)
STATEMENT = " (Added to this copy: {fact}.)"
QUESTION = "\n\nQuestion: {question}"
ANSWER_TOKENS = 8  # greedy answer length: a 5-digit number and a little more
FACT_SPACING = 2048  # about one fact per this many tokens
REFERENCES = ("YaRN", "llama.cpp grp-attn", "ordinary")  #: the reference families a sweep can read


@dataclass(frozen=True)
class Fact:
    """One planted fact: where it sits in the document (token positions) and its answer."""

    index: int  #: into FACTS
    key: int
    start: int  #: first token of the statement
    end: int  #: one past its last token


@dataclass
class Layout:
    """The document as every setting reads it: token ids with the facts planted, and the lengths
    at which it stops, ``allowance`` tokens short (room for the longest question and answer),
    to ask about the facts before."""

    ids: List[int]
    facts: List[Fact]
    lengths: List[int]
    seed: int
    allowance: int

    def text_end(self, length: int) -> int:
        """How much of the document a prompt of ``length`` tokens holds before its question."""
        return length - self.allowance

    def check_batches(self, n_batch: int) -> None:
        """Raises ValueError unless, at every length, the text after the last whole batch and the
        longest question fit one batch: then a question goes in as a fresh prompt of text and
        question would, and the reading can go back to the end of the whole batches afterwards."""
        for n in self.lengths:
            rest = self.text_end(n) % n_batch
            if rest + self.allowance > n_batch:
                raise ValueError(f"length {n} leaves {rest} tokens after its last whole batch of {n_batch}; with "
                                 f"{self.allowance} for a question they do not fit one batch: choose lengths that are "
                                 "multiples of the batch size")

    def asked_at(self, length: int) -> List[Fact]:
        return [f for f in self.facts if f.end <= self.text_end(length)]

    def fingerprint(self) -> Dict[str, object]:
        return {"seed": self.seed, "lengths": self.lengths, "n_tokens": len(self.ids), "allowance": self.allowance,
                "facts": [[f.index, f.key, f.start] for f in self.facts]}


def sentence_ends(llm, doc_ids: Sequence[int]) -> List[int]:
    """Indices i such that a sentence ends with token i - 1 and token i starts with a space or a
    newline: where a statement can go between two sentences."""
    ends = []
    for i in range(1, len(doc_ids)):
        before = llm.detokenize(doc_ids[i - 1:i])
        if before.endswith((".", "!", "?")):
            # the pair, since a tokenizer may drop the leading space of a text's first piece
            after = llm.detokenize(doc_ids[i - 1:i + 1])[len(before):]
            if after[:1] in (" ", "\n"):
                ends.append(i)
    return ends


def build_layout(llm, document: str, lengths: Sequence[int], seed: int = 0, spacing: int = FACT_SPACING) -> Layout:
    """Plants facts in ``document`` (about one per ``spacing`` tokens, at random places of the
    stretches between consecutive lengths, so that each length asks about facts at every depth)
    and returns the token ids up to the longest length. The facts, their order and their numbers
    come from ``seed``."""
    return build_layouts(llm, document, lengths, [seed], spacing)[0]


def build_layouts(llm, document: str, lengths: Sequence[int], seeds: Sequence[int],
                  spacing: int = FACT_SPACING) -> List[Layout]:
    """``build_layout`` for each of ``seeds``, tokenizing the document and finding its sentence
    ends once."""
    lengths = sorted(set(int(n) for n in lengths))
    # room for the longest question and answer, in this model's tokens
    allowance = max(len(q) + max(len(a), ANSWER_TOKENS)
                    for q, a in (question_ids(llm, Fact(i, 99999, 0, 0)) for i in range(len(FACTS))))
    allowance = -(-allowance // 16) * 16
    if not lengths or lengths[0] <= 2 * allowance:
        raise ValueError(f"lengths must be above {2 * allowance} tokens, got {lengths}")
    doc_ids = llm.tokenize(document, add_special=False)
    bos = llm.tokenize("", add_special=True)
    ends = sentence_ends(llm, doc_ids)
    if not ends:
        raise ValueError("the document has no sentence end followed by a space or newline to plant a fact at")
    return [_plant(llm, doc_ids, bos, ends, lengths, seed, spacing, allowance) for seed in seeds]


def _plant(llm, doc_ids: List[int], bos: List[int], ends: List[int], lengths: List[int], seed: int, spacing: int,
           allowance: int) -> Layout:
    rng = random.Random(seed)
    # Target positions in the finished text, per stretch between lengths.
    targets, lo = [], len(bos)
    for n in lengths:
        hi = n - allowance
        k = max(1, round((hi - lo) / spacing))
        targets += [lo + (i + rng.uniform(0.15, 0.85)) * (hi - lo) / k for i in range(k)]
        lo = hi
    if len(targets) > len(FACTS):
        raise ValueError(f"lengths up to {lengths[-1]} need {len(targets)} facts, one per {spacing} tokens; there are "
                         f"{len(FACTS)}: plant them farther apart (a larger spacing)")
    order = rng.sample(range(len(FACTS)), len(targets))
    keys = rng.sample(range(10000, 100000), len(targets))
    ids, facts, used = list(bos), [], 0
    for target, index, key in zip(targets, order, keys):
        statement = llm.tokenize(STATEMENT.format(fact=FACTS[index][0].format(key=key)), add_special=False)
        # the sentence end nearest the target, after the previous fact
        want = used + round(target - len(ids))
        at = min((e for e in ends if e > used), key=lambda e: abs(e - want), default=None)
        if at is None:
            raise ValueError(f"the document has about {len(doc_ids)} tokens, too few for length {lengths[-1]}")
        ids += doc_ids[used:at]
        facts.append(Fact(index, key, len(ids), len(ids) + len(statement)))
        ids += statement
        used = at
    ids += doc_ids[used:used + max(0, lengths[-1] - len(ids))]
    if len(ids) < lengths[-1] - allowance:
        raise ValueError(f"the document has about {len(doc_ids)} tokens, too few for length {lengths[-1]}")
    return Layout(ids[:lengths[-1]], facts, lengths, seed, allowance)


def question_ids(llm, fact: Fact) -> Tuple[List[int], List[int]]:
    """The question's tokens as appended to the document, and the answer's tokens as the model
    would write them after it."""
    from .passkey import answer_ids

    question = QUESTION.format(question=FACTS[fact.index][1])
    return llm.tokenize(question, add_special=False), answer_ids(llm, question, llm.tokenize(question),
                                                                 f" {fact.key}")


def ask(llm, fact: Fact, text: Sequence[int] = ()) -> Tuple[Dict[str, object], np.ndarray]:
    """Appends ``text`` (the end of the document, if not cached yet) and a question about
    ``fact`` to the cache in one evaluation, answers greedily, scores the answer teacher-forced,
    and drops the question and answer again. Returns the trial and the logits of ``text``'s
    tokens (rows: one per token of ``text``)."""
    from .passkey import forced_logprob

    q, answer = question_ids(llm, fact)
    rows = np.asarray(llm.eval(list(text) + q, all_logits=True))
    end_of_text = llm.n_past - len(q)
    first = rows[-1]
    generated, logits = [], first
    for step in range(ANSWER_TOKENS):
        token = int(np.argmax(logits))
        if llm.is_eog(token):
            break
        generated.append(token)
        if step + 1 < ANSWER_TOKENS:
            logits = llm.eval([token])
    llm.truncate(end_of_text + len(q))
    logprob = forced_logprob(llm, first, answer)
    llm.truncate(end_of_text)
    said = llm.detokenize(generated)
    number = re.search(r"\d+", said)
    return ({"fact": fact.index, "key": fact.key, "position": fact.start, "answer": said,
             "ok": bool(number) and number.group(0) == str(fact.key), "key_logprob": round(logprob, 4)},
            rows[:len(text)])


def read_and_ask(llm, layout: Layout, lengths: Sequence[int],
                 progress: Optional[Callable[[int, int], object]] = None) -> Dict[str, object]:
    """Reads the document up to the longest of ``lengths``, keeping each token's negative
    log-likelihood, and at each length asks about the facts planted before it.

    The document goes in whole batches of ``llm.n_batch`` from the start. At a length, the text
    left over after the last whole batch goes in one batch with the first question, exactly as
    a prompt of text and question would be batched (llama.cpp's group attention divides
    positions batch by batch, so this matters to it); afterwards the cache goes back to the end
    of the last whole batch and the document is read on."""
    from .perplexity import target_log_probs

    ids, B = layout.ids, llm.n_batch
    lengths = sorted(lengths)
    stop = layout.text_end(lengths[-1])
    nll = np.full(stop, np.nan)  # nll[i]: of ids[i + 1] given ids[:i + 1]

    def keep(start: int, rows: np.ndarray) -> None:
        n = min(len(rows), len(ids) - 1 - start, stop - start)
        if n > 0:
            nll[start:start + n] = -target_log_probs(rows[:n], ids[start + 1:start + 1 + n])

    layout.check_batches(B)
    llm.reset()
    pos, trials = 0, []
    for n in lengths:
        end_of_text = layout.text_end(n)
        while pos + B <= end_of_text:
            keep(pos, llm.eval(ids[pos:pos + B], all_logits=True))
            pos += B
            if progress is not None:
                progress(pos, stop)
        facts = layout.asked_at(n)
        for i, fact in enumerate(facts):
            trial, rows = ask(llm, fact, ids[pos:end_of_text] if i == 0 else ())
            if i == 0:
                keep(pos, rows)
            trial.update(length=n, distance=end_of_text - fact.start)
            trials.append(trial)
        if not facts and n == lengths[-1] and pos < end_of_text:
            keep(pos, llm.eval(ids[pos:end_of_text], all_logits=True))
        if n != lengths[-1]:
            llm.truncate(pos)
        if progress is not None:
            progress(end_of_text, stop)
    return {"trials": trials, "nll": nll}


@dataclass(frozen=True)
class Setting:
    """One reading of the document: a method with its options, asked at ``lengths``."""

    label: str  #: unique in a sweep: "G=4 W=2048", "llama.cpp grp-attn-n 4", "YaRN 16k", "ordinary"
    family: str  #: "SelfExtend" or the reference's name in methods.METHODS
    options: Mapping[str, object] = field(default_factory=dict)  #: open_method's keyword arguments
    lengths: Tuple[int, ...] = ()
    group_size: int = 1
    window: int = 0


def references_named(names: str) -> Tuple[str, ...]:
    """The reference families of a comma-separated list (``"ordinary,YaRN"``); ``"none"`` is none."""
    return () if names.strip() == "none" else tuple(names_in(names, REFERENCES, "reference"))


def sweep_settings(n_ctx_train: int, lengths: Sequence[int], groups: Sequence[int], windows: Sequence[int],
                   references: Sequence[str] = REFERENCES, n_batch: int = 512) -> List[Setting]:
    """Every (G, W) of the grid at the lengths it reaches (W rounded down to a multiple of G, as
    ``plan_context`` does), then the ``references`` (families of ``REFERENCES``): YaRN (its factor
    set by each length), llama.cpp's group attention with n = 2, 4, 8 at the lengths it reaches
    (all but the last batch divided by n, so n * (L - n_batch) + n_batch tokens), ordinary
    attention."""
    from .context import plan_context

    L = n_ctx_train
    lengths = sorted(set(int(n) for n in lengths))
    settings = []
    for g in sorted(set(groups)):
        for w in sorted(set(windows)):
            w = w - w % g
            reach = []
            for n in lengths:
                try:
                    plan_context(n, L, g, w)
                    reach.append(n)
                except ValueError:
                    pass
            if reach and g > 1:
                settings.append(Setting(f"G={g} W={w}", "SelfExtend", {"group_size": g, "window": w}, tuple(reach),
                                        g, w))
    if "YaRN" in references:
        settings += [Setting(f"YaRN {size_label(n)}", "YaRN", {"rope_scaling": "yarn"}, (n,)) for n in lengths]
    if "llama.cpp grp-attn" in references:
        for n in (2, 4, 8):
            reach = tuple(m for m in lengths if m <= n * (L - n_batch) + n_batch)
            if reach:
                settings.append(Setting(f"llama.cpp grp-attn-n {n}", "llama.cpp grp-attn",
                                        {"grp_attn_n": n}, reach))
    if "ordinary" in references:  # last: it has long collapsed at these lengths
        settings.append(Setting("ordinary", "ordinary", {"selfextend": False}, tuple(lengths)))
    return settings


def run_sweep(model: str, out: Path, *, lengths: Sequence[int], groups: Sequence[int],
              windows: Optional[Sequence[int]] = None,
              references: Sequence[str] = REFERENCES, replicates: int = 1, threads: Optional[int] = None,
              document: Optional[Path] = None, resume: bool = False, spacing: int = FACT_SPACING, n_batch: int = 512,
              verbose: bool = False, log: Callable[[str], None] = lambda msg: None) -> Dict[str, object]:
    """Runs every setting on ``replicates`` layouts (seeds 0, 1, ...), writing ``out``/sweep.json
    after each reading, then sweep.md and sweep.png. ``windows`` defaults to L/8, L/4 and L/2 of
    the model's trained context L. With ``resume``, readings an earlier run into ``out`` finished
    with the same model, threads, batch size, document and layouts are kept."""
    import hashlib

    from . import _engine
    from .baselines import open_method
    from .evaluate import run_command, describe_gnu_standards, describe_machine, fetch_gnu_standards
    from .models import resolve_model
    from .progress import ProgressBar

    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    path = str(resolve_model(model))
    L = _engine.Model(path).n_ctx_train
    windows = list(windows) if windows else [L // 8, L // 4, L // 2]
    settings = sweep_settings(L, lengths, groups, windows, references, n_batch)
    if not any(s.family == "SelfExtend" for s in settings):
        raise ValueError(f"no (G, W) of the grid reaches any of the lengths {list(lengths)} "
                         f"(trained context {L})")
    doc = document or fetch_gnu_standards(Path.home() / ".cache" / "pyselfextend" / "documents" / "gnu-standards.txt")
    text = Path(doc).read_text(encoding="utf-8")
    digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    # The layouts need only the tokenizer: a small ordinary-attention model gives it.
    tokenizer = open_method(path, 512, threads, selfextend=False)
    layouts = build_layouts(tokenizer, text, lengths, range(replicates), spacing)
    del tokenizer
    for layout in layouts:
        layout.check_batches(n_batch)

    out.mkdir(parents=True, exist_ok=True)
    results_file = out / "sweep.json"
    report: Dict[str, object] = {
        "model": path, "n_ctx_train": L, "threads": threads, "n_batch": n_batch, "document_sha256": digest,
        "machine": describe_machine(),
        "document": str(doc) if document else describe_gnu_standards(Path(doc)), "command": run_command(),
        "layouts": [lay.fingerprint() for lay in layouts], "spacing": spacing, "date": time.strftime("%Y-%m-%d"),
        "grid": {"lengths": sorted(set(lengths)), "groups": sorted(set(groups)), "windows": sorted(set(windows))},
        "readings": []}
    kept: Dict[Tuple[str, int], Dict[str, object]] = {}
    if resume and results_file.exists():
        earlier = json.loads(results_file.read_text())
        differ = [k for k in ("model", "n_ctx_train", "threads", "n_batch", "document_sha256")
                  if earlier.get(k) != report[k]]
        if differ:
            raise ValueError(f"{results_file} was measured with another {', '.join(differ)}: cannot resume it; choose "
                             "another --out or drop --resume")
        earlier_layouts = earlier.get("layouts", [])
        for r in earlier.get("readings", []):
            seed = int(r["seed"])
            if seed < len(layouts) and seed < len(earlier_layouts) and earlier_layouts[seed] == report["layouts"][seed]:
                kept[(r["label"], seed)] = r
        if earlier.get("date", "")[:10] != report["date"]:
            report["date"] = f"{earlier['date'][:10]} to {report['date']}"

    def save() -> None:
        report["minutes"] = round(sum(float(r["seconds"]) for r in report["readings"]) / 60, 1)
        results_file.write_text(json.dumps(report, indent=1))

    todo = [(s, lay) for lay in layouts for s in settings]
    for i, (setting, layout) in enumerate(todo, 1):
        earlier = kept.get((setting.label, layout.seed))
        if earlier and [int(n) for n in earlier["lengths"]] == list(setting.lengths):
            log(f"sweep: {i}/{len(todo)} {setting.label}, layout {layout.seed}: kept from the earlier run")
            report["readings"].append(earlier)
            continue
        started = time.perf_counter()
        llm = open_method(path, max(setting.lengths), threads, n_batch, verbose=verbose, **setting.options)
        log(f"sweep: {i}/{len(todo)} {setting.label}, layout {layout.seed}, to {max(setting.lengths)} tokens: "
            f"{llm.plan.describe()}")
        got = read_and_ask(llm, layout, setting.lengths, progress=ProgressBar(f"{setting.label}"))
        del llm
        ppl = {}
        for n in setting.lengths:
            past = got["nll"][L:layout.text_end(n)]
            past = past[~np.isnan(past)]
            ppl[str(n)] = float(math.exp(past.mean())) if len(past) else None
        reading = {"label": setting.label, "family": setting.family, "seed": layout.seed,
                   "group_size": setting.group_size, "window": setting.window, "lengths": list(setting.lengths),
                   "ppl_past_L": ppl, "trials": got["trials"], "seconds": round(time.perf_counter() - started, 1)}
        report["readings"].append(reading)
        found = sum(t["ok"] for t in got["trials"])
        log(f"sweep: {setting.label}: found {found}/{len(got['trials'])}, mean log P "
            f"{np.mean([t['key_logprob'] for t in got['trials']]):.2f}, perplexity past L "
            + ", ".join(f"{size_label(int(n))} {p:.2f}" for n, p in ppl.items() if p) + f" ({reading['seconds']:.0f} s)")
        save()
    save()
    (out / "sweep.md").write_text(render_markdown(report, plot_file=_heat_maps(report, out / "sweep.png")))
    return report


@dataclass
class Cell:
    """Everything measured for one setting at one length, over all layouts."""

    trials: List[Dict[str, object]]
    ppl: List[float]

    @property
    def found(self) -> int:
        return sum(bool(t["ok"]) for t in self.trials)

    def logprob(self) -> Tuple[float, float, float]:
        from .stats import mean_interval

        return mean_interval([float(t["key_logprob"]) for t in self.trials])

    def perplexity(self) -> Optional[float]:
        return float(np.mean(self.ppl)) if self.ppl else None


def cells(report: Mapping[str, object]) -> Dict[Tuple[str, int], Cell]:
    """(setting label, length) -> its trials and perplexities, over every layout; only cells with
    questions (a length too short for any planted fact has none)."""
    out: Dict[Tuple[str, int], Cell] = {}
    for r in report["readings"]:
        for n in r["lengths"]:
            cell = out.setdefault((r["label"], int(n)), Cell([], []))
            cell.trials += [t for t in r["trials"] if int(t["length"]) == int(n)]
            if r["ppl_past_L"].get(str(n)) is not None:
                cell.ppl.append(float(r["ppl_past_L"][str(n)]))
    return {k: c for k, c in out.items() if c.trials}


def _grid_values(report: Mapping[str, object], by: Mapping[Tuple[str, int], Cell], length: int,
                 value: Callable[[Cell], object]):
    """The grid's G (rows) and W as asked (columns), and value(cell) by (G, W) at ``length``. A
    reading's W is the asked one rounded down to a multiple of G."""
    groups = [int(g) for g in report["grid"]["groups"] if int(g) > 1]
    windows = [int(w) for w in report["grid"]["windows"]]
    values = {}
    for r in report["readings"]:
        g, key = int(r["group_size"]), (r["label"], length)
        if r["family"] == "SelfExtend" and key in by:
            asked = next(w for w in windows if w - w % g == int(r["window"]))
            values[(g, asked)] = value(by[key])
    return groups, windows, values


def _labels(report: Mapping[str, object], selfextend: Optional[bool] = None) -> List[str]:
    """The settings the sweep read, in reading order: SelfExtend's, the references', or all."""
    return list(dict.fromkeys(r["label"] for r in report["readings"]
                              if selfextend is None or (r["family"] == "SelfExtend") == selfextend))


def _heat_maps(report: Mapping[str, object], path: Path) -> Optional[str]:
    """sweep.png: per length, the mean log-probability of the answers and the perplexity past L
    over G x W. None without matplotlib or for a single SelfExtend setting (the page then has the
    tables alone)."""
    if len(_labels(report, selfextend=True)) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    lengths = sorted({int(n) for r in report["readings"] if r["family"] == "SelfExtend" for n in r["lengths"]})
    metrics = [("mean log P(answer), nats", lambda c: c.logprob()[0], "viridis"),
               ("perplexity past L", lambda c: c.perplexity(), "viridis_r")]
    fig, axes = plt.subplots(len(metrics), len(lengths), figsize=(3.6 * len(lengths), 3.2 * len(metrics)),
                             squeeze=False)
    by = cells(report)
    for j, n in enumerate(lengths):
        for i, (title, value, cmap) in enumerate(metrics):
            groups, cols, values = _grid_values(report, by, n, value)
            grid = np.full((len(groups), len(cols)), np.nan)
            for (g, w), v in values.items():
                if v is not None:
                    grid[groups.index(g), cols.index(w)] = v
            ax = axes[i][j]
            ax.imshow(grid, cmap=cmap, aspect="auto")
            for (a, b), v in np.ndenumerate(grid):
                if not np.isnan(v):
                    ax.text(b, a, f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}", ha="center", va="center",
                            color="white", fontsize=8)
            ax.set_xticks(range(len(cols)), [str(c) for c in cols])
            ax.set_yticks(range(len(groups)), [str(g) for g in groups])
            ax.set_xlabel("W")
            ax.set_ylabel("G")
            ax.set_title(f"{size_label(n)}: {title}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def best_settings(report: Mapping[str, object]) -> Dict[int, str]:
    """Per length, the SelfExtend setting with the highest mean log-probability of the answers."""
    best: Dict[int, Tuple[float, str]] = {}
    for (label, n), cell in cells(report).items():
        if label.startswith("G=") and cell.trials:
            score = cell.logprob()[0]
            if n not in best or score > best[n][0]:
                best[n] = (score, label)
    return {n: label for n, (score, label) in sorted(best.items())}


def _question(trial: Mapping[str, object], seed: int) -> Tuple[int, int, int]:
    return seed, int(trial["length"]), int(trial["fact"])


def candidate_rules(report: Mapping[str, object]) -> Dict[str, Dict[int, str]]:
    """Rules that choose (G, W) from the length, as the grid can answer them: rule -> {length:
    setting label}. "W = w, smallest G": for each W of the grid the smallest G of the grid that
    reaches the length (with W = L/4 this is ``plan_context``'s default where that G is in the
    grid); "G = g, W = L/4": one group size at every length it reaches."""
    L = int(report["n_ctx_train"])
    have = set(cells(report))
    groups = sorted(int(g) for g in report["grid"]["groups"])
    lengths = sorted({int(n) for r in report["readings"] if r["family"] == "SelfExtend" for n in r["lengths"]})
    rules: Dict[str, Dict[int, str]] = {}
    for w in sorted(int(w) for w in report["grid"]["windows"]):
        name = f"W = {w}" + (f" (L/{L // w})" if L % w == 0 else "") + ", smallest G that reaches"
        rules[name] = {}
        for n in lengths:
            g = next((g for g in groups if (f"G={g} W={w - w % g}", n) in have), None)
            if g is not None:
                rules[name][n] = f"G={g} W={w - w % g}"
    quarter = L // 4
    for g in groups:
        picked = {n: f"G={g} W={quarter - quarter % g}" for n in lengths if (f"G={g} W={quarter - quarter % g}", n) in have}
        if picked:
            rules[f"G = {g}, W = L/4"] = picked
    return {name: picked for name, picked in rules.items() if picked}


def paired_difference(report: Mapping[str, object], a: Mapping[int, str], b: Mapping[int, str]):
    """Mean log P of rule ``a`` minus rule ``b`` over the questions both were asked (the same
    prompts, so paired), with its 95% interval and the number of facts; None without pairs.

    A fact asked at several lengths is one unit: its differences are averaged first, since they
    come from the same planted sentence (and the same reading), and are not independent."""
    from .stats import mean_interval

    scores: Dict[Tuple[str, Tuple[int, int, int]], float] = {}
    for r in report["readings"]:
        for t in r["trials"]:
            scores[(r["label"], _question(t, int(r["seed"])))] = float(t["key_logprob"])
    per_fact: Dict[Tuple[int, int], List[float]] = {}
    for n in sorted(set(a) & set(b)):
        for (label, q), v in scores.items():
            if label == a[n] and q[1] == n and (b[n], q) in scores:
                per_fact.setdefault((q[0], q[2]), []).append(v - scores[(b[n], q)])
    if not per_fact:
        return None
    mean, lo, hi = mean_interval([float(np.mean(d)) for d in per_fact.values()])
    return mean, lo, hi, len(per_fact)


def default_rule(report: Mapping[str, object]) -> Dict[int, str]:
    """What ``plan_context`` picks at each length of the sweep where the grid measured it."""
    from .context import plan_context

    L = int(report["n_ctx_train"])
    lengths = sorted({int(n) for r in report["readings"] if r["family"] == "SelfExtend" for n in r["lengths"]})
    have = set(cells(report))
    picked = {}
    for n in lengths:
        try:
            plan = plan_context(n, L)
        except ValueError:  # past the default window's reach
            continue
        if (f"G={plan.group_size} W={plan.window}", n) in have:
            picked[n] = f"G={plan.group_size} W={plan.window}"
    return picked


def _rules_section(report: Mapping[str, object]) -> List[str]:
    by = cells(report)
    default = default_rule(report)
    rules = candidate_rules(report)
    lengths = sorted(default)
    lines = ["## Rules for choosing G and W", "",
             "Each rule picks one cell per length. The difference from the default (`plan_context`: "
             + ", ".join(f"{default[n]} at {size_label(n)}" for n in lengths)
             + ") is taken question by question, since every setting answered the same prompts; its 95% "
             "interval (Student's t) says whether the rule is really better (above 0) or worse.", "",
             "| rule | " + " | ".join(size_label(n) for n in lengths) + " | mean log P | found | minus the default "
             "(95% interval, facts) |", "| --- |" + " --- |" * (len(lengths) + 3)]
    for name, picked in rules.items():
        trials = [t for n, label in picked.items() for t in by[(label, n)].trials]
        diff = paired_difference(report, picked, default)
        dtext = "" if diff is None else f"{diff[0]:+.2f} ({diff[1]:+.2f} to {diff[2]:+.2f}, {diff[3]})"
        lines.append(f"| {name} | " + " | ".join(picked.get(n, "out of reach") for n in lengths)
                     + f" | {np.mean([float(t['key_logprob']) for t in trials]):.2f} | "
                     f"{sum(bool(t['ok']) for t in trials)}/{len(trials)} | {dtext} |")
    return lines + [""]


def _questions_section(report: Mapping[str, object], most: int = 4) -> List[str]:
    """Every question with each setting's score and answer, for a sweep of at most ``most``
    settings (a bigger one keeps them in sweep.json): how retrieval goes with the fact's depth."""
    labels = _labels(report)
    if len(labels) > most:
        return []
    allowance = int(report["layouts"][0]["allowance"])
    answers: Dict[Tuple[int, int, int, int], Dict[str, Mapping[str, object]]] = {}
    for r in report["readings"]:
        for t in r["trials"]:
            answers.setdefault((int(t["length"]), int(r["seed"]), int(t["position"]), int(t["fact"])), {})[
                r["label"]] = t
    lines = ["## Question by question", "",
             "Depth is where the fact sits in the text before the question (0 its start, 1 its end); each setting's "
             "log P of the answer, and its greedy answer when it missed.", "",
             "| length | layout | depth | right answer | " + " | ".join(labels) + " |", "| --- |" + " --- |" * (3 + len(labels))]
    for (n, seed, position, _), by_label in sorted(answers.items()):
        key = next(iter(by_label.values()))["key"]
        row = [size_label(n), str(seed), f"{position / (n - allowance):.2f}", str(key)]
        for label in labels:
            t = by_label.get(label)
            if t is None:
                row.append("")
            else:
                said = " ".join(str(t["answer"]).split()).replace("|", "/").replace("`", "'")
                row.append(f"{float(t['key_logprob']):.2f} " + ("found" if t["ok"] else f"missed: `{said}`"))
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def _cell_text(cell: Cell) -> str:
    mean, lo, hi = cell.logprob()
    ppl = cell.perplexity()
    return (f"{mean:.2f} ({lo:.2f} to {hi:.2f}); {cell.found}/{len(cell.trials)}"
            + (f"; {_ppl(ppl)}" if ppl is not None else ""))


def _ppl(value: float) -> str:
    return f"{value:.2f}" if value < 1000 else f"{value:.3g}"


def render_markdown(report: Mapping[str, object], plot_file: Optional[str] = None) -> str:
    """The sweep's page: every number comes from ``report`` (sweep.json)."""
    from .methods import METHODS
    from .stats import wilson_interval

    L = int(report["n_ctx_train"])
    by = cells(report)
    lengths = sorted({int(n) for r in report["readings"] for n in r["lengths"]})
    n_layouts = len(report["layouts"])
    allowance = int(report["layouts"][0]["allowance"])
    per_length = {n: next(sum(int(t["length"]) == n for t in r["trials"]) for r in report["readings"]
                          if n in r["lengths"] and r["seed"] == 0) for n in lengths}
    grid, others = _labels(report, selfextend=True), _labels(report, selfextend=False)
    title = ("Choosing G and W" if len(grid) > 1 else
             f"SelfExtend ({', '.join(grid)}) against {', '.join(others) or 'nothing'}")
    lines = [f"# {title}: a sweep on {Path(str(report['model'])).name}", "",
             f"Measured on {report['date']} on {report['machine']}, {report.get('threads') or 'all'} threads, "
             f"in {report.get('minutes', '?')} minutes of model time, by one command:", "", "```",
             report.get("command") or "pyselfextend sweep --out docs", "```", "",
             f"The model's trained context L is {L} tokens. Every number here is in `sweep.json` beside this page, "
             "which the command writes.", "",
             "## The task", "",
             f"One long document, {report['document']}, with short facts planted in it, about one every "
             f"{report.get('spacing', FACT_SPACING)} tokens, each about a different thing and with a 5-digit answer (for example: "
             f"\"{STATEMENT.format(fact=FACTS[2][0].format(key=48213)).strip()}\"). Each setting reads the "
             f"document once; at each length n it stops {allowance} tokens short of n and asks about every fact "
             "planted so far, one question at a time (the question is appended to the cached document and "
             "dropped after the answer). So every setting answers the very same prompts at a given length: "
             + ", ".join(f"{per_length[n]} question{'s' * (per_length[n] != 1)} at {size_label(n)}" for n in lengths)
             + (f", for each of {n_layouts} layouts (facts, places and numbers drawn from seeds 0-{n_layouts - 1})"
                if n_layouts > 1 else "") + ".", "",
             "Each cell gives: the mean log-probability (nats) of the answer's tokens right after the question "
             "(teacher-forced; 0 is certainty, a random 5-digit number is about -11.5) with its 95% interval "
             "(Student's t); how many answers were right (greedy decoding, first number of the answer); and the "
             f"perplexity of the document's tokens past L (positions {L + 1} to n - {allowance}), from the same "
             "reading.", ""]
    if plot_file:
        lines += [f"![heat maps]({plot_file})", ""]

    lines += ["## Summary", ""]
    best = best_settings(report)
    default = default_rule(report)
    for n in lengths:
        if n not in best:
            continue
        b = by[(best[n], n)]
        mean, lo, hi = b.logprob()
        text = f"- {size_label(n)}: best {best[n]}, log P {mean:.2f} ({lo:.2f} to {hi:.2f}), found {b.found}/{len(b.trials)}"
        if default.get(n) == best[n]:
            text += " (the default)"
        elif n in default:
            d = by[(default[n], n)]
            diff = paired_difference(report, {n: best[n]}, {n: default[n]})
            text += (f"; the default ({default[n]}) {d.logprob()[0]:.2f}, found {d.found}/{len(d.trials)}; best minus "
                     f"default, question by question, {diff[0]:+.2f} ({diff[1]:+.2f} to {diff[2]:+.2f})")
        refs = [(label, c) for (label, m), c in by.items() if m == n and not label.startswith("G=")]
        if refs:
            label, c = max(refs, key=lambda lc: lc[1].logprob()[0])
            rm, rlo, rhi = c.logprob()
            text += f"; best reference {label}: {rm:.2f} ({rlo:.2f} to {rhi:.2f}), found {c.found}/{len(c.trials)}"
        lines.append(text + ".")
    if len(grid) > 1:
        lines += ["", "The best cell of a length is chosen on the very questions it is then scored on, so its lead "
                  "over the default is optimistic; the rules below, fixed before looking, are the fairer comparison.",
                  ""]
        if default:
            lines += _rules_section(report)
    else:
        lines.append("")

    for n in lengths:
        groups, cols, values = _grid_values(report, by, n, lambda c: c)
        lines += [f"## {size_label(n)} tokens", ""]
        if values:
            lines += ["SelfExtend, G down, W across: mean log P (95% interval); found; perplexity past L.", "",
                      "| G \\ W | " + " | ".join(str(c) for c in cols) + " |", "| --- |" + " --- |" * len(cols)]
            for g in groups:
                row = ["out of reach" for _ in cols]
                for (gg, w), cell in values.items():
                    if gg == g:
                        row[cols.index(w)] = _cell_text(cell)
                lines.append(f"| {g} | " + " | ".join(row) + " |")
        else:
            lines.append("No SelfExtend setting of the grid reaches this length.")
        refs = [(label, c) for (label, m), c in by.items() if m == n and not label.startswith("G=")]
        if refs:
            mine = default.get(n)
            lines += ["", "References on the same prompts" + (f", and SelfExtend's default ({mine}) minus each, "
                                                                "question by question" if mine else "") + ":", "",
                      "| method | log P (95% interval) | found (95%) | perplexity past L |"
                      + (" default minus this (95%) |" if mine else ""),
                      "| --- | --- | --- | --- |" + (" --- |" if mine else "")]
            for label, c in refs:
                mean, lo, hi = c.logprob()
                flo, fhi = wilson_interval(c.found, len(c.trials))
                ppl = c.perplexity()
                row = (f"| {label} | {mean:.2f} ({lo:.2f} to {hi:.2f}) | {c.found}/{len(c.trials)} "
                       f"({flo:.0%}-{fhi:.0%}) | {'' if ppl is None else _ppl(ppl)} |")
                if mine:
                    d = paired_difference(report, {n: mine}, {n: label})
                    row += f" {d[0]:+.2f} ({d[1]:+.2f} to {d[2]:+.2f}) |" if d else " |"
                lines.append(row)
        lines.append("")
    lines += _questions_section(report)
    families = sorted({r["family"] for r in report["readings"]})
    lines += ["Methods:", "", "- SelfExtend: this project, with the G and W of its row and column (W rounded down to a "
              "multiple of G, as `plan_context` does)."]
    lines += [f"- {f}: {METHODS[f].note}." for f in families if f in METHODS and f != "SelfExtend"]
    if "llama.cpp grp-attn" in families:
        lines.append("- llama.cpp grp-attn-n n: llama.cpp's group attention as on the results page, with n = 2, 4 "
                     "or 8 (all but the last batch divided by n, it reaches n (L - 512) + 512 tokens with 512-token batches).")
    return "\n".join(lines) + "\n"
