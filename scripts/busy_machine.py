"""Decode speed on a machine that is doing other work: 300 single-token evals of the default
model, with 0, 1 and 2 other busy processes, threads adapting to the load or fixed. A benchmark,
not a test: its times depend on the machine.

    python scripts/busy_machine.py [--threads 2] [--steps 300]
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time

from pyselfextend import LocalModel


def decode_seconds(llm: LocalModel, steps: int) -> float:
    llm.reset()
    started = time.perf_counter()
    for token in range(1000, 1000 + steps):
        llm.eval([token])
    return time.perf_counter() - started


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=300)
    args = p.parse_args()
    models = {adaptive: LocalModel(n_ctx=args.steps + 16, n_batch=1, n_threads=args.threads,
                                   adaptive_threads=adaptive) for adaptive in (True, False)}
    print(f"{args.steps} decode steps, {args.threads} threads; seconds")
    print(f"{'busy processes':>14}  {'adaptive':>9}  {'fixed':>9}")
    for busy in (0, 1, 2):
        others = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
        try:
            time.sleep(0.5)
            times = {adaptive: decode_seconds(llm, args.steps) for adaptive, llm in models.items()}
        finally:
            for other in others:
                other.kill()
                other.wait()
        print(f"{busy:>14}  {times[True]:>9.2f}  {times[False]:>9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
