"""The pyselfextend command."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import default_sigint

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
    assert info["rope_mode"] == "normal" and info["weight_types"] == ["f32"]
    info = json.loads(run("info", str(tiny_model(arch="qwen2", weight_type="q8_0")), "--json").stdout)
    assert info["architecture"] == "qwen2" and info["rope_mode"] == "neox" and info["weight_types"] == ["q8_0", "f32"]


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
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint)
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
    assert info["choice"].startswith("W = L/4 = 64 rounded down to a multiple of G, and the smallest G")
    r = run("info", str(tiny_model()), "--ctx", "1k", "-G", "8", "-W", "32", "--json")
    info = json.loads(r.stdout)
    assert (info["group_size"], info["window"], info["usable_length"]) == (8, 32, (256 - 32) * 8 + 32)
    assert info["plan"] == "SelfExtend group_size=8 window=32: usable length 1824 tokens (trained context 256), n_ctx=1024"
    assert info["choice"] == "group_size and window given"
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


def run_bytes(*args, env=None, input=None):
    """run() with byte arguments and stdin, for text that is not UTF-8."""
    return subprocess.run([sys.executable.encode(), b"-m", b"pyselfextend", *args], capture_output=True,
                          env={**os.environ, **(env or {})}, input=input, timeout=600)


@pytest.mark.parametrize("args, message", [
    (["passkey", "--lengths", "abc"], "not a size: 'abc'"),
    (["passkey", "--lengths", "0"], "size must be positive"),
    (["passkey", "--lengths", "4k,,8k"], "empty item"),
    (["passkey", "--depths", "0.5,deep"], "not a fraction: 'deep'"),
    (["passkey", "--depths", "1.5"], "fractions must be in [0, 1]"),
    (["evaluate", "--lengths", "12k,abc"], "not a size: 'abc'"),
    (["evaluate", "--depths", "x"], "not a fraction: 'x'"),
    (["evaluate", "--bench-depths", "0,4q"], "not a size: '4q'"),
    (["bench", "--depths", "abc"], "not a size: 'abc'"),
    (["generate", "--ctx", "12kk"], "not a size"),
])
def test_bad_list_and_size_options_are_usage_errors(args, message):
    r = run(*args)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr


def test_contexts_that_cannot_be_held_are_clear_errors(tiny_model):
    m = str(tiny_model())
    r = run("generate", "-m", m, "--prompt", "w1", "--ctx", "3000m", "--no-selfextend")
    assert r.returncode == 1 and "n_ctx = 3145728000 is out of range" in r.stderr and "Traceback" not in r.stderr
    r = run("generate", "-m", m, "--prompt", "w1", "--ctx", "2000m", "--no-selfextend")
    assert r.returncode == 1 and "GiB of memory, but this machine has" in r.stderr and "Traceback" not in r.stderr
    for engine, said in (("selfextend", "too far past the trained context"), ("ordinary", "GiB of memory"),
                         ("llama.cpp", "llama.cpp with n_ctx=2097152528 needs")):
        r = run("bench", "-m", m, "--depths", "2000m", "--engines", engine, "-r", "1")
        assert r.returncode == 1 and said in r.stderr and "Traceback" not in r.stderr, r.stderr
    r = run("generate", "-m", m, "--prompt", "w1 w2", "--ctx", "64", "--batch", "1000000", "--max-tokens", "2",
            "--seed", "-1")
    assert r.returncode == 0, r.stderr
    assert "memory" in r.stderr and "KV cache" in r.stderr  # the memory a context needs, said up front


def test_text_that_is_not_utf8_is_a_clear_error(tiny_model, tmp_path):
    m = str(tiny_model()).encode()
    for cmd in (b"generate", b"chat"):
        r = run_bytes(cmd, b"-m", m, b"--prompt", b"caf\xe9 w1")
        assert r.returncode == 1 and b"--prompt is not UTF-8 text: byte 0xe9 at offset 3" in r.stderr, r.stderr
        r = run_bytes(cmd, b"-m", m, input=b"w1 w2 \xff\xfe")
        assert r.returncode == 1 and b"stdin is not UTF-8 text: byte 0xff at offset 6" in r.stderr, r.stderr
    bad = tmp_path / "latin1.txt"
    bad.write_bytes(b"na\xefve")
    for cmd in ([b"generate", b"--prompt-file"], [b"perplexity", b"--file"]):
        r = run_bytes(*cmd, str(bad).encode(), b"-m", m)
        assert r.returncode == 1 and b"is not UTF-8 text: byte 0xef at offset 2" in r.stderr, r.stderr
        assert b"Traceback" not in r.stderr


def test_out_of_range_attention_settings_and_system_text_are_clear_errors(tiny_model):
    m = str(tiny_model())
    r = run("generate", "-m", m, "--prompt", "w1", "--ctx", "64", "--group-size", "3000000000", "--window", "16")
    assert r.returncode == 1 and "group_size = 3000000000 is out of range" in r.stderr and "Traceback" not in r.stderr
    r = run_bytes(b"chat", b"-m", m.encode(), b"--prompt", b"w1", b"--system", b"caf\xe9", b"--chat-template", b"chatml")
    assert r.returncode == 1 and b"--system is not UTF-8 text: byte 0xe9 at offset 3" in r.stderr, r.stderr


def test_chat_without_a_template_says_which_option_to_use(tiny_model):
    r = run("chat", "-m", str(tiny_model()), "--prompt", "w1 w2", "--max-tokens", "2")
    assert r.returncode == 1 and "--chat-template" in r.stderr and "Traceback" not in r.stderr
    r = run("chat", "-m", str(tiny_model()), "--prompt", "w1 w2", "--max-tokens", "2", "--chat-template", "chatml")
    assert r.returncode == 0, r.stderr


def test_models_directory_that_is_a_file(tmp_path):
    f = tmp_path / "models"
    f.write_text("not a directory")
    r = run("generate", "--prompt", "hi", env={"PYSELFEXTEND_MODELS": str(f)})
    assert r.returncode == 1 and f"PYSELFEXTEND_MODELS={f} is a file, not a directory" in r.stderr
    assert "Traceback" not in r.stderr


def test_cache_type_option(tiny_model):
    model = str(tiny_model(n_embd=128, n_head=2, n_head_kv=1))  # head size 64: whole q8_0 blocks
    kv = {}
    for cache in ("f16", "q8_0"):
        r = run("generate", "-m", model, "-p", "hi", "--ctx", "64k", "--no-selfextend", "-n", "4", "--temp", "0",
                "--cache-type", cache)
        assert r.returncode == 0, r.stderr
        line = next(x for x in r.stderr.splitlines() if "KV cache" in x)
        kv[cache] = float(line.split("KV cache ")[1].split(" MiB")[0])
    assert kv["q8_0"] / kv["f16"] == pytest.approx(8.5 / 16, rel=0.05)
    r = run("generate", "-m", model, "-p", "hi", "--cache-type", "q4_0")
    assert r.returncode == 1 and "cache_type must be 'f16', 'f32' or 'q8_0', got 'q4_0'" in r.stderr
    assert "Traceback" not in r.stderr
