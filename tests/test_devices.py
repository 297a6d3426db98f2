"""Devices other than the CPU, through ggml's scheduler: llama.cpp RPC servers (real
``pyselfextend rpc-server`` processes on loopback ports) on every run, and the device named by
$PYSELFEXTEND_TEST_DEVICE (scripts/test-vulkan.sh sets ``vulkan``) when it is set.

On an RPC server the layers run on the server's CPU backend with the same thread count, so the
logits must equal the CPU run's bit for bit when the CPU run takes the portable path too (ggml's
flash attention for ordinary attention, standard ggml ops for SelfExtend). Another device has
numerics of its own: its bounds are the measured ones given in DEVICE_BOUNDS.
"""
from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

from conftest import free_port
from pyselfextend import LocalModel, _engine, devices
from selfextend_reference import selfextend_attention

THREADS = 2
TEST_DEVICE = os.environ.get("PYSELFEXTEND_TEST_DEVICE")
# Measured bounds for a device that is not an RPC server (scripts/test-vulkan.sh's run, see the
# README): the largest logit difference as a fraction of the CPU logits' range, and the share of
# positions whose argmax agrees.
# Vulkan on lavapipe, 2026-11-27: 3.7% of the range and 94.2% of positions (ordinary), 2.6% and 94.4%
# (SelfExtend).
DEVICE_BOUNDS: Dict[str, Dict[str, float]] = {"vulkan": {"logits": 0.05, "argmax": 0.93, "formula": 2e-3}}



class RpcServer:
    """``python -m pyselfextend rpc-server`` on a free loopback port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.spec = f"rpc:127.0.0.1:{self.port}"
        self.log_path = log_dir / f"rpc-{self.port}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "pyselfextend", "rpc-server", "--port", str(self.port),
                                          "--threads", str(THREADS)], stdout=log, stderr=subprocess.STDOUT,
                                         preexec_fn=_end_with_parent)
        deadline = time.monotonic() + 60
        while True:
            assert self.proc.poll() is None, f"rpc-server exited:\n{self.log_path.read_text()}"
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"rpc-server did not listen:\n{self.log_path.read_text()}"
                time.sleep(0.1)



def _end_with_parent() -> None:
    """preexec_fn: the server gets SIGTERM when the test process ends. It must outlive every model
    that holds memory on it: ggml's RPC client aborts the process when a server it still has
    buffers on is gone (also while freeing them at exit), and a failed test's traceback keeps its
    models alive until the very end."""
    ctypes.CDLL(None).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@pytest.fixture(scope="session")
def rpc_servers(tmp_path_factory) -> List[RpcServer]:
    if not _engine.rpc_available():
        pytest.skip("this build has no RPC backend")
    return [RpcServer(tmp_path_factory.mktemp("rpc")) for _ in range(2)]


@pytest.fixture(scope="module", params=["rpc"] + ([TEST_DEVICE] if TEST_DEVICE else []))
def device(request, rpc_servers) -> str:
    """A device spec to test: one RPC server, and $PYSELFEXTEND_TEST_DEVICE when set."""
    return rpc_servers[0].spec if request.param == "rpc" else request.param


def _exact(spec: str) -> bool:
    return spec.startswith("rpc:")


def _document(model: LocalModel, n: int) -> List[int]:
    text = (Path(__file__).parent.parent / "README.md").read_text()
    ids = model.tokenize(text)
    while len(ids) < n:
        ids += ids
    return ids[:n]


def _compare(spec: str, got: np.ndarray, want: np.ndarray) -> None:
    if _exact(spec):
        np.testing.assert_array_equal(got, want)
        return
    bounds = DEVICE_BOUNDS[spec.split(":")[0]]
    spread = float(want.max() - want.min())
    assert float(np.abs(got - want).max()) <= bounds["logits"] * spread
    assert float((got.argmax(-1) == want.argmax(-1)).mean()) >= bounds["argmax"]


def test_the_cpu_is_always_listed():
    cpu = [d for d in devices() if d["spec"] == "cpu"]
    assert len(cpu) == 1 and cpu[0]["type"] == "cpu" and cpu[0]["memory_total"] > 0


@pytest.mark.model
@pytest.mark.parametrize("selfextend", [False, True], ids=["ordinary", "selfextend"])
def test_logits_over_1000_tokens_match_the_cpu(smollm_path, device, selfextend):
    # SelfExtend at G=4, W=256 from token 256 on: most of the 1,000 keys are grouped. The CPU run
    # takes the portable path too, so that an RPC server must match it exactly.
    opts = dict(n_ctx=2048, n_batch=256, n_threads=THREADS, adaptive_threads=False, attention_path="portable")
    if selfextend:
        opts.update(group_size=4, window=256)
    else:
        opts.update(selfextend=False)
    cpu = LocalModel(smollm_path, device="cpu", **opts)
    ids = _document(cpu, 1000)
    want = cpu.eval(ids, all_logits=True)
    on_device = LocalModel(smollm_path, device=device, **opts)
    assert on_device.devices == [device] if _exact(device) else on_device.devices[0].startswith(device)
    _compare(device, on_device.eval(ids, all_logits=True), want)


@pytest.mark.parametrize("cache", ["f32", "f16"])
@pytest.mark.parametrize("G,W", [(1, 0), (2, 24), (4, 37)])
def test_portable_selfextend_on_the_device_matches_the_float64_formula(device, cache, G, W):
    rng = np.random.default_rng(G * 100 + W)
    n, H, Hkv, D = 160, 4, 2, 64
    q, k, v = (rng.standard_normal((n, h, D)).astype(np.float32) for h in (H, Hkv, Hkv))
    out = _engine._attention_probe(q, k, v, G, W, 32, cache, "portable", decode_tail=8, device=device)
    want = selfextend_attention(q, k, v, G, W)
    err = float(np.abs(out - want).max() / np.abs(want).max())
    bound = 1e-5 if cache == "f32" and _exact(device) else DEVICE_BOUNDS.get(device.split(":")[0], {}).get("formula", 2e-3)
    assert err <= bound, err


@pytest.mark.model
def test_generate_and_chat_end_to_end(smollm_path, device):
    opts = dict(n_ctx=4096, n_threads=THREADS, adaptive_threads=False, group_size=2, window=1024)
    cpu = LocalModel(smollm_path, device="cpu", attention_path="portable", **opts)
    on_device = LocalModel(smollm_path, device=device, **opts)
    prompt = "The three primary colours are"
    text = on_device.generate(prompt, max_tokens=24, temperature=0)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    answer = on_device.chat(messages, max_tokens=24, temperature=0)
    if _exact(device):
        assert text == cpu.generate(prompt, max_tokens=24, temperature=0)
        assert answer == cpu.chat(messages, max_tokens=24, temperature=0)
    assert "red" in text and "Paris" in answer


@pytest.mark.model
def test_two_rpc_servers_split_the_layers(smollm_path, rpc_servers):
    spec = "rpc:" + ",".join(s.spec[4:] for s in rpc_servers)
    opts = dict(n_ctx=1024, n_batch=128, n_threads=THREADS, adaptive_threads=False, selfextend=False,
                attention_path="portable")
    split = LocalModel(smollm_path, device=spec, **opts)
    assert split.devices == [s.spec for s in rpc_servers]
    cpu = LocalModel(smollm_path, device="cpu", **opts)
    ids = _document(cpu, 300)
    np.testing.assert_array_equal(split.eval(ids, all_logits=True), cpu.eval(ids, all_logits=True))
    # Both servers hold state: the KV cache of their layers, read back through the saved state.
    state = split._engine.read_state(300)
    assert state == cpu._engine.read_state(300)


@pytest.mark.model
def test_captured_tensors_and_the_next_batch_on_a_server_equal_the_cpus(smollm_path, rpc_servers):
    # A capture graph gets an allocation plan of its own; on a device the inputs are copied there,
    # so a plan made the wrong way would leave them uninitialised.
    spec = rpc_servers[0].spec
    results = []
    for device in (spec, "cpu"):
        model = _engine.Model(str(smollm_path), device)
        eng = _engine.Engine(model, 512, 64, THREADS, "f16", attention_path="portable", adaptive_threads=False)
        captured = eng._capture(list(range(10, 74)), ["q-3", "kqv_out-3"])
        results.append(captured + [eng.eval(list(range(80, 90)), all_logits=True)])
        del eng, model
    for got, want in zip(*results):
        np.testing.assert_array_equal(got, want)


@pytest.mark.model
def test_one_server_by_two_names_is_refused(smollm_path, rpc_servers):
    # ggml would open a second connection, which the server (one client at a time) never answers.
    with pytest.raises(ValueError, match="is named twice"):
        LocalModel(smollm_path, device=f"{rpc_servers[0].spec},localhost:{rpc_servers[0].port}", n_ctx=256)


@pytest.mark.model
def test_the_fused_kernel_is_refused_off_the_cpu(smollm_path, rpc_servers):
    with pytest.raises(ValueError, match="fused.*CPU only"):
        LocalModel(smollm_path, device=rpc_servers[0].spec, n_ctx=16384, attention_path="fused")


@pytest.mark.parametrize("spec,message", [
    ("tpu", "device 'tpu' is not available in this build; it offers auto, cpu"),
    ("cpu:x", "expected NAME or NAME:INDEX"),
    ("rpc:localhost", r"HOST:PORT \(port 1-65535\), got 'localhost'"),
    ("rpc:127.0.0.1:0", r"HOST:PORT"),
    ("rpc:127.0.0.1:99999", r"HOST:PORT"),
    ("rpc:no-such-host.invalid:50052", "cannot resolve host"),
])
def test_bad_device_names_are_clean_errors(tiny_model, spec, message):
    with pytest.raises(ValueError, match=message):
        LocalModel(tiny_model(), device=spec, n_ctx=64)


def test_an_rpc_address_where_nothing_listens_is_a_clean_error(tiny_model):
    with pytest.raises(ValueError, match=r"cannot connect \(Connection refused\)"):
        LocalModel(tiny_model(), device=f"rpc:127.0.0.1:{free_port()}", n_ctx=64)


@pytest.mark.parametrize("reply", [b"", b"HTTP/1.1 400 Bad Request\r\n\r\n" * 4])
def test_a_server_that_is_not_an_rpc_server_is_a_clean_error(tiny_model, reply):
    # ggml's own client aborts the process here; the probe must stop it first.
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def answer_once():
        conn, _ = listener.accept()
        conn.recv(64)
        conn.sendall(reply)
        conn.close()

    threading.Thread(target=answer_once, daemon=True).start()
    try:
        with pytest.raises(ValueError, match="no answer in ggml RPC's protocol"):
            LocalModel(tiny_model(), device=f"rpc:127.0.0.1:{listener.getsockname()[1]}", n_ctx=64)
    finally:
        listener.close()


@pytest.mark.skipif(any(d["spec"].startswith("vulkan") for d in devices()), reason="a Vulkan build")
def test_a_backend_missing_from_the_build_says_how_to_add_it(tiny_model):
    with pytest.raises(ValueError, match=r'rebuild with CMAKE_ARGS="-DGGML_VULKAN=ON"'):
        LocalModel(tiny_model(), device="vulkan", n_ctx=64)


def test_cli_lists_devices_and_refuses_a_port_in_use(rpc_servers):
    out = subprocess.run([sys.executable, "-m", "pyselfextend", "info", "--devices"], capture_output=True, text=True,
                         check=True).stdout
    assert any(line.startswith("cpu ") for line in out.splitlines()) and "rpc:HOST:PORT" in out
    taken = subprocess.run([sys.executable, "-m", "pyselfextend", "rpc-server", "--port", str(rpc_servers[0].port)],
                           capture_output=True, text=True, timeout=60)
    assert taken.returncode == 1
    assert f"cannot serve RPC at 127.0.0.1:{rpc_servers[0].port} (is the port in use?)" in taken.stderr
    named = subprocess.run([sys.executable, "-m", "pyselfextend", "rpc-server", "--host", "localhost"],
                           capture_output=True, text=True, timeout=60)
    assert named.returncode == 1 and "numeric IPv4 address" in named.stderr
