"""The pyselfextend command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pyselfextend import LocalModel
from pyselfextend.cli import parse_size


def run(*args, env=None, input=None):
    return subprocess.run([sys.executable, "-m", "pyselfextend", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=600)


def test_parse_size():
    assert parse_size("16k") == 16384 and parse_size("4096") == 4096 and parse_size("1M") == 1 << 20
    for bad in ("", "k", "-3", "1.5k", "0"):
        with pytest.raises(Exception):
            parse_size(bad)


def test_help_reads_like_a_man_page():
    out = run("--help").stdout
    for word in ("pull", "info", "generate", "chat", "bench", "examples:", "PYSELFEXTEND_MODELS"):
        assert word in out
    gen = run("generate", "--help").stdout
    for flag in ("--prompt", "--prompt-file", "--ctx", "--max-tokens", "--temperature", "--seed", "--threads"):
        assert flag in gen


def test_missing_default_model_says_how_to_pull(tmp_path):
    r = run("generate", "--prompt", "hi", env={"PYSELFEXTEND_MODELS": str(tmp_path)})
    assert r.returncode == 1
    assert "pyselfextend pull" in r.stderr and "Traceback" not in r.stderr


def test_bad_file_is_a_clean_error(tmp_path):
    p = tmp_path / "x.gguf"
    p.write_bytes(b"GGUF" + b"\0" * 10)
    r = run("generate", "--model", str(p), "--prompt", "hi")
    assert r.returncode == 1 and "error" in r.stderr and "Traceback" not in r.stderr


def test_info_on_a_tiny_model(tiny_model):
    r = run("info", str(tiny_model()), "--json")
    info = json.loads(r.stdout)
    assert info["architecture"] == "llama" and info["n_ctx_train"] == 256 and info["n_layer"] == 2


@pytest.mark.model
def test_generate_prints_only_the_text(smollm_path):
    prompt = "The three primary colours are"
    r = run("generate", "--model", str(smollm_path), "--prompt", prompt, "--max-tokens", "24",
            "--temperature", "0", "--threads", "2", "--ctx", "1k")
    assert r.returncode == 0, r.stderr
    expected = LocalModel(smollm_path, n_ctx=1024, n_threads=2).generate(prompt, max_tokens=24, temperature=0)
    assert r.stdout == expected + "\n"


@pytest.mark.model
def test_prompt_from_stdin_and_file(smollm_path, tmp_path):
    f = tmp_path / "prompt.txt"
    f.write_text("Water boils at")
    a = run("generate", "-m", str(smollm_path), "-f", str(f), "-n", "8", "--temperature", "0")
    b = run("generate", "-m", str(smollm_path), "-n", "8", "--temperature", "0", input="Water boils at")
    assert a.returncode == b.returncode == 0 and a.stdout == b.stdout and a.stdout.strip()


@pytest.mark.model
def test_ctrl_c_during_prefill_stops_cleanly(smollm_path, tmp_path):
    import signal
    import time

    f = tmp_path / "long.txt"
    f.write_text("The grass is green. The sky is blue. " * 700)  # about 6,000 tokens: many batches of 64
    proc = subprocess.Popen([sys.executable, "-m", "pyselfextend", "generate", "-m", str(smollm_path), "-f", str(f),
                             "--ctx", "8k", "--batch", "64", "-n", "4", "-t", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    assert proc.poll() is None, "prefill finished before it could be interrupted"
    t = time.monotonic()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert time.monotonic() - t < 20  # stops after the running batch, not at the end of the prompt


def test_selfextend_options(tiny_model):
    r = run("info", str(tiny_model()), "--ctx", "1k", "--json")
    info = json.loads(r.stdout)
    assert info["attention"] == "selfextend" and info["group_size"] > 1 and info["usable_length"] >= 1024
    r = run("info", str(tiny_model()), "--ctx", "1k", "-G", "8", "-W", "32", "--json")
    info = json.loads(r.stdout)
    assert (info["group_size"], info["window"], info["usable_length"]) == (8, 32, (256 - 32) * 8 + 32)
    r = run("generate", "-m", str(tiny_model()), "-p", "hi", "--ctx", "1k", "--no-selfextend", "-G", "2")
    assert r.returncode == 1 and "--no-selfextend" in r.stderr
    r = run("info", str(tiny_model()), "--ctx", "100k", "-G", "2", "-W", "32")
    assert r.returncode == 1 and "reaches" in r.stderr


def test_baseline_flags_are_one_method_each(tiny_model, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text("w1 w2 w3 w4 w5 " * 100)
    r = run("perplexity", "-m", str(tiny_model()), "-f", str(doc), "--ctx", "300", "--grp-attn-n", "4", "-G", "2")
    assert r.returncode == 1 and "--grp-attn-n cannot be combined" in r.stderr and "Traceback" not in r.stderr
    # Ordinary attention past the trained context says so once, in its own words, without a Python warning.
    r = run("perplexity", "-m", str(tiny_model()), "-f", str(doc), "--ctx", "600", "--no-selfextend", "-t", "1")
    assert r.returncode == 0, r.stderr
    assert "expect degraded output" in r.stderr and "Warning" not in r.stderr
