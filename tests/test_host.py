"""What the engine asks of the machine: idle cores (threads adapt to other load)."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from pyselfextend import _engine


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="one core: one thread whatever the load")
def test_threads_step_aside_while_other_processes_keep_every_core_busy():
    cores = len(os.sched_getaffinity(0))
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(cores)]
    try:
        time.sleep(1.0)
        samples = []
        for _ in range(20):
            samples.append(_engine._threads_that_can_run(cores))
            time.sleep(0.05)
    finally:
        for p in busy:
            p.kill()
            p.wait()
    # Every core is taken by another process: one thread (never zero), whatever was asked for.
    assert min(samples) >= 1 and sorted(samples)[len(samples) // 2] == 1, samples
    assert _engine._threads_that_can_run(1) == 1
