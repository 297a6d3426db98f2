"""Time to the first answer token in long-document Q&A: a first question about a document, a
second question in the same session (prefix reuse), and a question after load_state in a new
process. A benchmark, not a test: its times depend on the machine.

    python scripts/qa_latency.py --ctx 16k --doc-tokens 12k [--document FILE] [--threads N]
    python scripts/qa_latency.py --server --ctx 8k --doc-tokens 4k

With --server the two questions go through `pyselfextend serve` and the openai client (streamed
completions), started on a free loopback port: the same reuse, seen through the HTTP API.

The document defaults to the evaluation's (the GNU Coding Standards, see `pyselfextend evaluate`).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pyselfextend import LocalModel
from pyselfextend.cli import parse_size
from pyselfextend.evaluate import fetch_gnu_standards
from pyselfextend.progress import ProgressBar

QUESTIONS = ["\n\nQuestion: What does this document say about writing error messages?\nAnswer:",
             "\n\nQuestion: How should a program handle the --version option?\nAnswer:"]


def first_token_seconds(llm: LocalModel, prompt: str) -> float:
    started = time.perf_counter()
    stream = llm.generate(prompt, max_tokens=8, temperature=0, stream=True, progress=ProgressBar("reading"))
    next(stream, None)
    elapsed = time.perf_counter() - started
    for _ in stream:  # finish the answer, as a user would read it
        pass
    return elapsed


def server_first_tokens(args: argparse.Namespace, doc: str) -> list:
    """Time to the first streamed piece of each question, through a real server and client."""
    import socket

    import httpx
    import openai

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "pyselfextend", "serve", "--port", str(port), "--ctx", str(args.ctx)]
    cmd += (["--threads", str(args.threads)] if args.threads else []) + (["--model", args.model] if args.model else [])
    server = subprocess.Popen(cmd)
    try:
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
            if server.poll() is not None:
                raise RuntimeError("the server did not start")
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", timeout=3600)
        model = client.models.list().data[0].id
        out = []
        for question in QUESTIONS:
            started = time.perf_counter()
            stream = client.completions.create(model=model, prompt=doc + question, max_tokens=8, temperature=0,
                                               stream=True, stream_options={"include_usage": True})
            first = None
            for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.perf_counter() - started
                if chunk.usage:
                    out.append((first, chunk.usage.prompt_tokens, chunk.usage.prompt_tokens_details.cached_tokens))
        return out
    finally:
        server.terminate()
        server.wait(60)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ctx", type=parse_size, default=16384)
    p.add_argument("--doc-tokens", type=parse_size, default=12288)
    p.add_argument("--document")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--server", action="store_true", help="ask through `pyselfextend serve` and the openai client")
    p.add_argument("--after-load", nargs=2, metavar=("STATE", "DOCUMENT"), help=argparse.SUPPRESS)  # the new process
    args = p.parse_args()

    if args.after_load:
        llm = LocalModel(args.model, n_ctx=args.ctx, n_threads=args.threads)
        started = time.perf_counter()
        llm.load_state(args.after_load[0])
        load = time.perf_counter() - started
        doc = Path(args.after_load[1]).read_text()
        print(json.dumps({"load_state": load, "first_token": first_token_seconds(llm, doc + QUESTIONS[1])}))
        return 0

    path = Path(args.document) if args.document else fetch_gnu_standards(
        Path.home() / ".cache" / "pyselfextend" / "documents" / "gnu-standards.txt")
    llm = LocalModel(args.model, n_ctx=args.ctx, n_threads=args.threads)
    doc = llm.detokenize(llm.tokenize(path.read_text(), add_special=False)[: args.doc_tokens])
    n_doc = len(llm.tokenize(doc))
    print(f"{llm.plan.describe()}; document {n_doc} tokens; {llm.n_threads} threads", file=sys.stderr)
    if args.server:
        del llm  # the server loads its own
        (first, n1, c1), (second, n2, c2) = server_first_tokens(args, doc)
        print(f"through the server: document {n_doc} tokens, n_ctx {args.ctx}")
        print(f"first question, time to first token:   {first:8.2f} s ({n1} prompt tokens, {c1} cached)")
        print(f"second question:                       {second:8.2f} s ({n2} prompt tokens, {c2} cached; "
              f"{second / first:.1%} of the first)")
        return 0
    first = first_token_seconds(llm, doc + QUESTIONS[0])
    second = first_token_seconds(llm, doc + QUESTIONS[1])
    with tempfile.TemporaryDirectory() as tmp:
        state, doc_file = Path(tmp) / "doc.state", Path(tmp) / "doc.txt"
        llm.prefill(llm.tokenize(doc))
        started = time.perf_counter()
        llm.save_state(state)
        save = time.perf_counter() - started
        doc_file.write_text(doc)
        cmd = [sys.executable, __file__, "--ctx", str(args.ctx), "--after-load", str(state), str(doc_file)]
        cmd += ["--threads", str(llm.n_threads)] + (["--model", args.model] if args.model else [])
        after = json.loads(subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True).stdout)
        size = os.path.getsize(state)
    print(f"document: {n_doc} tokens, n_ctx {args.ctx}, {llm.plan.describe().split(':')[0]}, {llm.n_threads} threads")
    print(f"first question, time to first token:             {first:8.2f} s")
    print(f"second question, same session:                   {second:8.2f} s ({second / first:.1%} of the first)")
    print(f"question in a new process after load_state:      {after['first_token']:8.2f} s "
          f"({after['first_token'] / first:.1%} of the first; load_state took {after['load_state']:.2f} s)")
    print(f"state file: {size / 2**20:.0f} MiB, written in {save:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
