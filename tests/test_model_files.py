"""Model files are untrusted input: a corrupt or hostile GGUF file, or one with a nonsensical
hyperparameter, must end in a Python exception that names the problem, never in a signal (ggml
abort, segfault), a hang or a giant allocation.

Part 1 is a bounded, seeded mutation fuzz of a tiny random model and of the real SmolLM2 file;
every mutated file is loaded in a child process so that a crash is caught and attributed to the
mutation. Part 2 writes otherwise valid tiny files with one bad hyperparameter each.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import random
import struct
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType as T

from pyselfextend import LocalModel, _engine
from tiny_gguf import VOCAB, TinySpec, write_tiny_model

# ---------------------------------------------------------------------------------------------
# A small GGUF layout parser: the byte offset and meaning of every field, so that mutations can
# aim at counts, lengths, types and values, and regions can be told apart.

_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class Slot:
    offset: int
    fmt: str   # struct format of the field
    kind: str  # version, count, strlen, vtype, int, float, ndims, dim, ttype, toff
    what: str  # the field, for failure messages


@dataclass
class Layout:
    slots: List[Slot]
    kv: Tuple[int, int]           # [start, end) of the key/value region
    tensor_info: Tuple[int, int]  # [start, end) of the tensor-info region
    data_offset: int
    data_end: int                 # end of the last tensor's bytes (its padding not included)


def parse_layout(buf: bytes) -> Layout:
    pos = 0
    slots: List[Slot] = []

    def take(fmt: str):
        nonlocal pos
        v = struct.unpack_from(fmt, buf, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def slot(fmt: str, kind: str, what: str, record: bool = True):
        if record:
            slots.append(Slot(pos, fmt, kind, what))
        return take(fmt)

    def string(what: str, record: bool = True) -> bytes:
        nonlocal pos
        n = slot("<Q", "strlen", what, record)
        s = bytes(buf[pos:pos + n])
        pos += n
        return s

    assert buf[:4] == b"GGUF"
    pos = 4
    slot("<I", "version", "version")
    n_tensors = slot("<Q", "count", "tensor count")
    n_kv = slot("<Q", "count", "key/value count")
    kv_start, alignment = pos, 32
    for _ in range(n_kv):
        key = string("key length").decode()
        vtype = slot("<I", "vtype", f"type of {key}")
        if vtype == _ARRAY:
            sub = slot("<I", "vtype", f"element type of {key}")
            n = slot("<Q", "count", f"length of {key}")
            for i in range(n):
                # The vocabularies hold ~50k strings: keep a sample of element slots, not all.
                record = i < 3 or i >= n - 2 or i % 4999 == 0
                if sub == _STRING:
                    string(f"length of {key}[{i}]", record)
                else:
                    slot(_SCALAR[sub], "float" if sub in (6, 12) else "int", f"{key}[{i}]", record)
        elif vtype == _STRING:
            string(f"length of {key}")
        else:
            v = slot(_SCALAR[vtype], "float" if vtype in (6, 12) else "int", key)
            if key == "general.alignment":
                alignment = v
    ti_start, data_end = pos, 0
    for _ in range(n_tensors):
        name = string("tensor name length").decode()
        nd = slot("<I", "ndims", f"n_dims of {name}")
        dims = [slot("<Q", "dim", f"dim {j} of {name}") for j in range(nd)]
        tt = slot("<I", "ttype", f"type of {name}")
        off = slot("<Q", "toff", f"offset of {name}")
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(tt)]
        data_end = max(data_end, off + math.prod(dims) // block * size)
    data_offset = -(-pos // alignment) * alignment
    return Layout(slots, (kv_start, ti_start), (ti_start, pos), data_offset, data_offset + data_end)


# ---------------------------------------------------------------------------------------------
# Mutations

_U64 = [0, 1, 2**31 - 1, 2**32, 2**62, 2**63 - 1, 2**64 - 1]
_EXTREMES = {
    "version": lambda o: [0, 1, 2, 4, 0xFFFF, 0x03000000, 2**32 - 1],
    "count": lambda o: [o - 1, o + 1, 1 << 30, *_U64],
    "strlen": lambda o: [o - 1, o + 1, 1 << 30, (1 << 30) + 1, 2**32 + o, *_U64],
    "vtype": lambda o: [v for v in range(14) if v != o] + [2**32 - 1, 2**31],
    "int": lambda o: [o + 1, o * 1000, -1, -(2**31), 2**31 - 1, 2**32 - 1, 2**63 - 1, *_U64],
    "float": lambda o: [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-45, 3e38, -o],
    "ndims": lambda o: [0, 1, 2, 3, 4, 5, 2**32 - 1],
    "dim": lambda o: [o + 1, o * 2, o // 2, -1, 2**31 - 1, *_U64],
    "ttype": lambda o: [t for t in (0, 1, 2, 3, 4, 8, 10, 24, 26, 28, 30, 31, 39, 42, 43, 1000) if t != o] + [2**32 - 1],
    "toff": lambda o: [o + 1, o + 32, o - 32, 2**40, *_U64],
}


def _pack(fmt: str, value) -> bytes:
    if fmt in ("<f", "<d"):
        return struct.pack(fmt, value)
    bits = 8 * struct.calcsize(fmt)
    return struct.pack(fmt.upper() if fmt[1].islower() else fmt, value & ((1 << bits) - 1))


@dataclass
class Case:
    what: str
    data: bytes                   # the mutated bytes: the whole file, or a prefix (see sparse_size)
    must_load: bool = False       # the unmutated control
    must_fail: bool = False       # truncated or bad magic: loading it would be a bug
    sparse_size: Optional[int] = None  # extend to this size with a hole (SmolLM: data region not copied)


def _set(data: bytes, slot: Slot, value) -> bytes:
    out = bytearray(data)
    out[slot.offset:slot.offset + struct.calcsize(slot.fmt)] = _pack(slot.fmt, value)
    return bytes(out)


def _structured(buf: bytes, slot: Slot, rng: random.Random) -> Tuple[str, bytes]:
    orig = struct.unpack_from(slot.fmt, buf, slot.offset)[0]
    value = rng.choice(_EXTREMES[slot.kind](orig))
    return f"{slot.what} ({slot.kind} @{slot.offset}) {orig!r} -> {value!r}", _set(buf, slot, value)


def _bytewise(buf: bytes, lo: int, hi: int, slots: List[Slot], rng: random.Random) -> Tuple[str, bytes]:
    out = bytearray(buf)
    edits = []
    for _ in range(rng.randint(1, 3)):
        # Half of the edits land in a structural field (counts, lengths, types), half anywhere.
        if slots and rng.random() < 0.5:
            s = rng.choice(slots)
            at = s.offset + rng.randrange(struct.calcsize(s.fmt))
        else:
            at = rng.randrange(lo, hi)
        op = rng.choice(["flip", "zero", "ff", "rand", "ff8"])
        if op == "flip":
            out[at] ^= 1 << rng.randrange(8)
        elif op == "ff8":
            out[at:at + 8] = b"\xff" * len(out[at:at + 8])
        else:
            out[at] = {"zero": 0, "ff": 0xFF, "rand": rng.randrange(256)}[op]
        edits.append(f"{op}@{at}")
    return "bytes " + ",".join(edits), bytes(out)


def _sweep(data: bytes, lay: Layout, region: str, slots: List[Slot]) -> List[Case]:
    """Every extreme value in every scalar metadata value (the hyperparameters and token ids), or
    in every field of the first and last tensor descriptions, plus element counts just at ggml's
    overflow limit (its parser accepts them and its tensor constructor asserts on them)."""
    if region == "kv":
        chosen = [s for s in slots if s.kind in ("int", "float") and "[" not in s.what]
    else:
        tensors: List[List[Slot]] = []  # each description starts with its name's length
        for s in slots:
            if s.kind == "strlen":
                tensors.append([])
            tensors[-1].append(s)
        chosen = tensors[0] + tensors[-1]
    cases = []
    for s in chosen:
        orig = struct.unpack_from(s.fmt, data, s.offset)[0]
        for v in _EXTREMES[s.kind](orig):
            cases.append(Case(f"{s.what} ({s.kind} @{s.offset}) {orig!r} -> {v!r}", _set(data, s, v)))
    if region == "kv":
        # Two tokens with the same text (libllama asserts its text-to-id map is as long as the list).
        toks = [s for s in slots if s.kind == "strlen" and s.what.startswith("length of tokenizer.ggml.tokens[")]
        size = {s.offset: struct.unpack_from("<Q", data, s.offset)[0] for s in toks}
        for a, b in itertools.combinations(toks, 2):
            n = size[a.offset]
            if size[b.offset] == n and data[a.offset + 8:a.offset + 8 + n] != data[b.offset + 8:b.offset + 8 + n]:
                out = bytearray(data)
                out[b.offset + 8:b.offset + 8 + n] = data[a.offset + 8:a.offset + 8 + n]
                cases.append(Case(f"{b.what[10:]} := the text of {a.what[10:]}", bytes(out)))
                break
    if region == "tensor_info":
        dims = [s for s in slots if s.kind == "dim"]
        for d0, d1 in zip(dims, dims[1:]):
            if d0.what.startswith("dim 0 of") and d1.what.startswith("dim 1 of"):
                ne0 = struct.unpack_from(d0.fmt, data, d0.offset)[0]
                for v in ((2**63 - 1) // ne0, (2**63 - 1) // ne0 + 1, 2**62 // ne0):
                    cases.append(Case(f"{d1.what} -> {v} ({ne0} x {v} elements)", _set(data, d1, v)))
    return cases


def make_cases(data: bytes, region: str, n: int, seed: str, full_size: Optional[int] = None,
               sweep: bool = False) -> List[Case]:
    """n seeded mutations of `data` in one region (with `sweep`, n more after a systematic pass).
    `data` is the whole file, or with full_size the header only (up to the data offset), the rest
    of the file being a hole."""
    lay = parse_layout(data)
    rng = random.Random(seed)
    cases = [Case("unmutated control", data, must_load=True)]
    if region == "header":
        for s in lay.slots[:3]:
            for v in _EXTREMES[s.kind](struct.unpack_from(s.fmt, data, s.offset)[0]):
                cases.append(Case(f"{s.what} -> {v}", _set(data, s, v), must_fail=s.kind == "count" and v >= 2**31))
        for i in range(4):
            out = bytearray(data)
            out[i] ^= 1 << rng.randrange(8)
            cases.append(Case(f"magic byte {i} flipped", bytes(out), must_fail=True))
        while len(cases) < n:
            cases.append(Case(*_bytewise(data, 4, 24, lay.slots[:3], rng)))
    elif region in ("kv", "tensor_info"):
        lo, hi = getattr(lay, region)
        slots = [s for s in lay.slots if lo <= s.offset < hi]
        if sweep:
            cases += _sweep(data, lay, region, slots)
        target = len(cases) + n
        while len(cases) < target:
            pick = _structured(data, rng.choice(slots), rng) if rng.random() < 0.6 else _bytewise(data, lo, hi, slots, rng)
            cases.append(Case(*pick))
    elif region == "truncate":
        end = lay.data_end if full_size is None else lay.data_offset
        cuts = {0, 3, 4, 7, 8, 15, 16, 23, 24, 25, lay.kv[1] - 1, lay.kv[1], lay.kv[1] + 1,
                lay.tensor_info[1] - 1, lay.tensor_info[1], lay.data_offset, lay.data_offset + 1, lay.data_end - 1}
        cuts |= {s.offset + d for s in rng.sample(lay.slots, min(12, len(lay.slots))) for d in (0, 1)}
        while len(cuts) < n:
            cuts.add(rng.randrange(0, end))
        for cut in sorted(c for c in cuts if c < end):
            cases.append(Case(f"truncated at byte {cut}", data[:cut], must_fail=True))
        if full_size is not None:
            # Cuts inside the tensor data of the big file: the header stays whole, the hole shortens.
            for frac in (0.0001, 0.3, 0.9, 0.999999):
                cut = lay.data_offset + int(frac * (full_size - lay.data_offset))
                cases.append(Case(f"truncated at byte {cut} (tensor data)", data, must_fail=True, sparse_size=cut))
    else:
        raise ValueError(region)
    for c in cases:  # a whole (mutated) header of the big file: the tensor data become a hole
        if full_size is not None and c.sparse_size is None and len(c.data) == len(data):
            c.sparse_size = full_size
    return cases


# ---------------------------------------------------------------------------------------------
# Loading in a child process

_AS_LIMIT = 4 << 30  # a giant malloc fails (MemoryError) instead of thrashing; the mmap counts too

# Every child: the address-space limit, then one JSON line per event, "load" before each file so
# that a death is blamed on the file being loaded.
_PROLOGUE = r"""
import json, resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

def report(**kw):
    print(json.dumps(kw), flush=True)

def each_file(load):
    for line in sys.stdin:
        path = line.rstrip("\n")
        report(event="load", path=path)
        try:
            report(event="ok", path=path, **load(path))
        except Exception as e:
            report(event="error", path=path, type=type(e).__name__, message=str(e))
"""

# What LocalModel(path, n_ctx=64, n_threads=1) does, then a little tokenizing and a short eval.
_CHILD = _PROLOGUE + r"""
from pyselfextend import LocalModel

def load(path):
    llm = LocalModel(path, n_ctx=64, n_threads=1)
    n = llm.n_vocab
    ids = llm.tokenize("Hello world, 42 \u00e4\u20ac!")
    llm.detokenize(ids + [n - 1])
    logits = llm.eval([i % n for i in (1, 2, 3)])
    assert logits.shape == (n,), logits.shape
    return {"n_vocab": n}

each_file(load)
"""

_ALLOWED = {"ValueError", "FileNotFoundError", "RuntimeError"}


def load_in_children(paths: List[str], timeout: float, child: str = _CHILD) -> Dict[str, dict]:
    """Loads each file in a child; a child that dies or hangs is blamed on the file it announced
    last, and a fresh child carries on with the files after it."""
    results: Dict[str, dict] = {}
    todo = list(paths)
    # GGML_NO_BACKTRACE: an abort would otherwise run gdb for a backtrace (slow, and noise).
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "GGML_NO_BACKTRACE": "1"}
    while todo:
        hung = False
        try:
            proc = subprocess.run([sys.executable, "-c", child, str(_AS_LIMIT)], input="\n".join(todo) + "\n",
                                  capture_output=True, text=True, errors="replace", timeout=timeout, env=env)
            out, err, rc = proc.stdout, proc.stderr, proc.returncode
        except subprocess.TimeoutExpired as e:
            dec = lambda b: b.decode(errors="replace") if isinstance(b, bytes) else (b or "")  # noqa: E731
            out, err, rc, hung = dec(e.stdout), dec(e.stderr), None, True
        last = None
        for line in out.splitlines():
            if not line.startswith("{"):
                continue
            ev = json.loads(line)
            if ev["event"] == "load":
                last = ev["path"]
            else:
                results[ev["path"]] = ev
                last = None
        if last is None:
            if rc == 0:
                break
            # Died or hung before or between files (e.g. at import): blame the next one.
            last = next((p for p in todo if p not in results), None)
            if last is None:
                break
            results[last] = {"event": "child died outside a load", "returncode": rc, "stderr": err[-1500:]}
        else:
            results[last] = {"event": "hang" if hung else "signal", "returncode": rc, "stderr": err[-1500:]}
        todo = todo[todo.index(last) + 1:]
    return results


def misbehaved(cases: List[Case], paths: List[str], results: Dict[str, dict]) -> List[str]:
    """What went wrong: a signal, hang, disallowed exception, empty message, a broken file that
    loaded, or a control that did not."""
    bad = []
    for c, p in zip(cases, paths):
        r = results.get(p, {"event": "no result"})
        ev = r["event"]
        if ev == "ok":
            if c.must_fail:
                bad.append(f"{c.what}: loaded, but the file is broken")
        elif ev == "error":
            if c.must_load:
                bad.append(f"{c.what}: control failed to load: {r['type']}: {r['message']}")
            elif r["type"] not in _ALLOWED or not r["message"].strip():
                bad.append(f"{c.what}: {r['type']}: {r['message']!r}")
        else:
            bad.append(f"{c.what}: {ev} (return code {r.get('returncode')})\n    stderr: {r.get('stderr', '')[-600:]}")
    return bad


def run_cases(cases: List[Case], workdir: Path, timeout: float = 60.0) -> None:
    paths = []
    for i, c in enumerate(cases):
        p = workdir / f"case{i:04d}.gguf"
        with open(p, "wb") as f:
            f.write(c.data)
            if c.sparse_size is not None:
                f.truncate(c.sparse_size)  # a hole: no disk blocks, reads as zeros
        paths.append(str(p))
    try:
        results = load_in_children(paths, timeout)
    finally:
        for p in paths:
            os.unlink(p)
    bad = misbehaved(cases, paths, results)
    assert not bad, f"{len(bad)} of {len(cases)} mutated files misbehaved:\n" + "\n".join(bad[:40])


# ---------------------------------------------------------------------------------------------
# Part 1: the fuzz

_FUZZ_SPEC = dict(n_embd=64, n_head=2, n_head_kv=1, n_ff=128, weight_type="q8_0")  # ~100 kB: full copies are cheap
_TINY_COUNTS = {"header": 60, "kv": 300, "tensor_info": 250, "truncate": 120}  # kv, tensor_info: after the sweep
_SMOLLM_COUNTS = {"header": 30, "kv": 40, "tensor_info": 40, "truncate": 30}


@pytest.mark.parametrize("region", list(_TINY_COUNTS))
def test_fuzz_tiny_model(tiny_model, tmp_path, region):
    data = tiny_model(**_FUZZ_SPEC).read_bytes()
    run_cases(make_cases(data, region, _TINY_COUNTS[region], f"tiny-{region}", sweep=True), tmp_path)


@pytest.mark.model
@pytest.mark.parametrize("region", list(_SMOLLM_COUNTS))
def test_fuzz_smollm(smollm_path, tmp_path, region):
    with open(smollm_path, "rb") as f:
        head = f.read(4 << 20)
    # Only the header (metadata and tensor infos) is copied and mutated; the 96 MB of tensor data
    # become a hole that reads as zeros, which is all a crash test needs of the weights.
    head = head[:parse_layout(head).data_offset]
    cases = make_cases(head, region, _SMOLLM_COUNTS[region], f"smollm-{region}", full_size=os.path.getsize(smollm_path))
    run_cases(cases, tmp_path)


# The harness itself: a death, a hang and a disallowed exception are each blamed on their file,
# the files after them still run, and the address-space limit turns a giant allocation into an
# error. A fake loader stands in for the engine.
_FAKE_CHILD = _PROLOGUE + r"""
import os, signal, time

def load(path):
    name = os.path.basename(path)
    if name.startswith("abort"):
        os.abort()
    if name.startswith("segv"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("hang"):
        time.sleep(60)
    if name.startswith("typeerror"):
        raise TypeError("not a loader error")
    if name.startswith("huge"):
        bytearray(8 << 30)  # 8 GB: beyond the 4 GB limit whatever the machine has
    if name.startswith("bad"):
        raise ValueError(f"{path}: refused")
    return {}

each_file(load)
"""


def test_child_harness_blames_the_right_file(tmp_path):
    names = ["ok1", "abort", "ok2", "segv", "bad", "typeerror", "huge", "hang", "ok3"]
    paths = [str(tmp_path / n) for n in names]
    results = load_in_children(paths, timeout=3.0, child=_FAKE_CHILD)
    got = {Path(p).name: (r["event"], r.get("type"), r.get("returncode")) for p, r in results.items()}
    assert got == {
        "ok1": ("ok", None, None), "abort": ("signal", None, -6), "ok2": ("ok", None, None),
        "segv": ("signal", None, -11), "bad": ("error", "ValueError", None),
        "typeerror": ("error", "TypeError", None), "huge": ("error", "MemoryError", None),
        "hang": ("hang", None, None), "ok3": ("ok", None, None),
    }
    cases = [Case(n, b"", must_fail=n == "ok3") for n in names]
    bad = misbehaved(cases, paths, results)
    assert [b.split(":")[0] for b in bad] == ["abort", "segv", "typeerror", "huge", "hang", "ok3"]


# ---------------------------------------------------------------------------------------------
# Part 2: hyperparameters. Each file is valid but for one metadata value; loading it must raise
# the named exception with a message naming the key, and the process carries on.

_SPEC = TinySpec(n_embd=64, n_head=2, n_head_kv=1, n_ff=128, weight_type="q8_0")
N_VOCAB = len(VOCAB)


@pytest.fixture(scope="module")
def survivor(tmp_path_factory):
    """A model loaded before the bad files: it must still work after each refusal."""
    return LocalModel(write_tiny_model(tmp_path_factory.mktemp("ok") / "ok.gguf", _SPEC), n_ctx=64, n_threads=1)


def assert_refused(survivor, path, pattern: str, exc=ValueError, vocab_too: bool = False) -> None:
    with pytest.raises(exc, match=pattern) as info:
        LocalModel(path, n_ctx=64, n_threads=1)
    assert str(info.value).startswith(str(path) + ": "), str(info.value)  # "path: what is wrong"
    if vocab_too:  # the tokenizer alone checks what libllama's vocabulary loader reads
        with pytest.raises(exc, match=pattern):
            _engine.Vocab(str(path))
    survivor.reset()
    logits = survivor.eval([1, 5, 9])
    assert logits.shape == (N_VOCAB,) and np.isfinite(logits).all()


def bad_file(tmp_path, name="bad.gguf", spec=_SPEC, **kwargs) -> Path:
    return write_tiny_model(tmp_path / name, spec, **kwargs)


def test_tiny_base_file_loads(tmp_path, survivor):
    # The files below differ from this one only by what each test changes.
    llm = LocalModel(bad_file(tmp_path, kv={"tokenizer.ggml.eot_token_id": 2, "llama.vocab_size": N_VOCAB,
                                            "llama.attention.key_length": 32, "llama.attention.value_length": 32,
                                            "llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 0.0}),
                     n_ctx=64, n_threads=1)
    assert llm.n_vocab == N_VOCAB
    survivor.reset()
    assert np.allclose(llm.eval([1, 5, 9]), survivor.eval([1, 5, 9]), atol=1e-5)  # same weights, same output


_F = T.FLOAT32
_FLOAT_CASES = [
    # (key, value, what the message must say)
    ("llama.attention.layer_norm_rms_epsilon", v, "layer_norm_rms_epsilon' = .* must be in \\(0, 1\\)")
    for v in (-1.0, 0.0, math.nan, math.inf, -math.inf, 1.0, -1e-5)
] + [
    ("llama.rope.freq_base", v, "rope.freq_base' = .* must be finite and > 0") for v in (0.0, -10000.0, math.nan, math.inf)
] + [
    ("llama.rope.freq_base", (T.FLOAT64, 1e300), "rope.freq_base' = 1e\\+300"),  # overflows a float
    ("llama.rope.scaling.factor", math.nan, "rope.scaling.factor' = nan"),
    ("llama.rope.scaling.factor", math.inf, "rope.scaling.factor' = inf"),
    ("llama.rope.scaling.factor", -2.0, "rope.scaling.factor' = -2"),
    ("llama.rope.scaling.factor", 1e-40, "rope.scaling.factor' = .* must be finite and >= 1"),
    ("llama.rope.scale_linear", math.nan, "rope.scale_linear' = nan"),  # the older key
    # Floats must be floats (llama.cpp reads them as float32 too).
    ("llama.attention.layer_norm_rms_epsilon", "1e-5", "layer_norm_rms_epsilon' must be a float, not str"),
    ("llama.rope.freq_base", 10000, "rope.freq_base' must be a float, not u32"),
]


@pytest.mark.parametrize("key, value, message", _FLOAT_CASES, ids=lambda x: str(x)[:40])
def test_bad_float_hyperparameter(tmp_path, survivor, key, value, message):
    assert_refused(survivor, bad_file(tmp_path, kv={key: value}), message)


_COUNTS = {
    # key: (the file's value, the largest accepted)
    "llama.context_length": (256, 1 << 24),
    "llama.embedding_length": (64, 1 << 20),
    "llama.block_count": (2, 4096),
    "llama.feed_forward_length": (128, 1 << 22),
    "llama.attention.head_count": (2, 4096),
    "llama.attention.head_count_kv": (1, 2),
    "llama.attention.key_length": (32, 512),
    "llama.attention.value_length": (32, 512),
    "llama.rope.dimension_count": (32, 512),
    "llama.vocab_size": (N_VOCAB, 2**31 - 1),
}


@pytest.mark.parametrize("key", list(_COUNTS))
@pytest.mark.parametrize("value", [0, -1, "max+1", 2**31 - 1, 2**32 + 32, 2**64 - 1], ids=str)
def test_count_out_of_range(tmp_path, survivor, key, value):
    top = _COUNTS[key][1]
    if value == "max+1":
        value = top + 1
    elif value == 2**31 - 1 and top == 2**31 - 1:
        value = 2**31 - 2  # in range for vocab_size: a mismatch instead
    v = (T.UINT64, value) if value >= 2**32 else value  # negative values are written as INT32
    message = f"'{key}' = {value if value < 2**63 else 2**63 - 1} is out of range \\[\\d+, {top}\\]"
    if key == "llama.vocab_size" and value == 2**31 - 2:
        message = "vocab_size' \\(2147483646\\) does not match token_embd.weight's 320 rows"
    assert_refused(survivor, bad_file(tmp_path, kv={key: v}), message)


@pytest.mark.parametrize("kv, message", [
    # Counts that are in range but inconsistent.
    ({"llama.attention.head_count": 4, "llama.attention.head_count_kv": 3},
     "head_count' \\(4\\) is not a multiple of 'llama.attention.head_count_kv' \\(3\\)"),
    ({"llama.attention.head_count": 3}, "embedding_length' \\(64\\) is not a multiple of 'llama.attention.head_count' \\(3\\)"),
    ({"llama.attention.head_count": 4, "llama.rope.dimension_count": 16}, "tensor 'blk.0.attn_k.weight' has shape \\[64,32,1,1\\], expected \\[64,16\\]"),
    ({"llama.attention.key_length": 33}, "unsupported head size 33"),
    ({"llama.attention.key_length": 16, "llama.rope.dimension_count": 16}, "tensor 'blk.0.attn_q.weight' has shape"),
    ({"llama.attention.value_length": 16}, "value_length' \\(16\\) differs from the key length \\(32\\)"),
    ({"llama.attention.key_length": 64, "llama.attention.value_length": 32}, "value_length' \\(32\\) differs from the key length \\(64\\)"),
    ({"llama.rope.dimension_count": 16}, "rope.dimension_count' \\(16\\) differs from the head size \\(32\\): partial RoPE"),
    ({"llama.vocab_size": 100}, "vocab_size' \\(100\\) does not match token_embd.weight's 320 rows"),
    ({"llama.feed_forward_length": 64}, "tensor 'blk.0.ffn_gate.weight' has shape"),
    ({"llama.embedding_length": 32, "llama.attention.key_length": 32}, "tensor 'token_embd.weight' has shape"),
    # Metadata of the wrong type, or features this loader does not have.
    ({"llama.context_length": "256"}, "'llama.context_length' must be an integer, not str"),
    ({"llama.block_count": 2.0}, "'llama.block_count' must be an integer, not f32"),
    ({"llama.context_length": None}, "missing metadata key 'llama.context_length'"),
    ({"general.architecture": 7}, "'general.architecture' must be a string, not u32"),
    ({"llama.rope.scaling.type": "yarn"}, "unsupported RoPE scaling type 'yarn'"),
    ({"llama.rope.scaling.type": 1}, "'llama.rope.scaling.type' must be a string, not u32"),
    ({"llama.expert_count": 8}, "mixture-of-experts models"),
    ({"split.count": (T.UINT16, 2)}, "split GGUF files"),
])
def test_inconsistent_hyperparameters(tmp_path, survivor, kv, message):
    assert_refused(survivor, bad_file(tmp_path, kv=kv), message)


@pytest.mark.parametrize("kv, scaled", [
    ({"llama.rope.scaling.factor": 4.0}, True),  # no type: linear, as llama.cpp reads it
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}, True),
    ({"llama.rope.scale_linear": 4.0}, True),  # the older key
    ({"llama.rope.scaling.type": "none", "llama.rope.scaling.factor": 4.0}, False),
    ({"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 0.0}, False),  # 0: no scaling
], ids=["factor", "linear", "scale_linear", "none", "zero"])
def test_rope_scaling_metadata_as_llama_cpp(tmp_path, kv, scaled):
    # The valid scaling metadata means what it means to llama.cpp: same logits as its forward pass.
    path = str(bad_file(tmp_path, kv=kv))
    base = str(bad_file(tmp_path, "base.gguf"))
    prompt = np.random.default_rng(2).integers(3, N_VOCAB, size=96).tolist()
    ours = _engine.Engine(_engine.Model(path), 128, 64, 1).eval(prompt, all_logits=True)
    ref = _engine.Reference(path, 128, 64, 1, True).eval(prompt, all_logits=True)
    unscaled = _engine.Engine(_engine.Model(base), 128, 64, 1).eval(prompt, all_logits=True)
    assert np.abs(ours - ref).max() / np.abs(ref).max() < 1e-2
    assert (np.abs(ours - unscaled).max() > 1e-3) == scaled


def test_block_count_smaller_than_the_file(tmp_path, survivor):
    # Every tensor must be used by the graph, as llama.cpp checks.
    assert_refused(survivor, bad_file(tmp_path, kv={"llama.block_count": 1}),
                   "unused tensor 'blk.1.attn_norm.weight': the llama graph \\(llama.block_count = 1\\) does not use it")


def test_block_count_larger_than_the_file(tmp_path, survivor):
    assert_refused(survivor, bad_file(tmp_path, kv={"llama.block_count": 3}), "missing tensor 'blk.2.attn_norm.weight'")


def test_tensor_the_graph_does_not_know(tmp_path, survivor):
    extra = {"blk.0.attn_rot_embd": np.zeros(16, dtype=np.float32)}
    assert_refused(survivor, bad_file(tmp_path, extra_tensors=extra), "unused tensor 'blk.0.attn_rot_embd'")


_TOKEN_ID_KEYS = [
    "bos_token_id", "eos_token_id", "unknown_token_id", "seperator_token_id", "padding_token_id", "cls_token_id",
    "mask_token_id", "eot_token_id", "eom_token_id", "fim_pre_token_id", "fim_suf_token_id", "fim_mid_token_id",
    "fim_pad_token_id", "fim_rep_token_id", "fim_sep_token_id", "prefix_token_id", "suffix_token_id",
    "middle_token_id",
]


@pytest.mark.parametrize("key", _TOKEN_ID_KEYS)
@pytest.mark.parametrize("value", [N_VOCAB, 2**31 - 1, 2**32 - 1, -1], ids=str)
def test_special_token_out_of_range(tmp_path, survivor, key, value):
    key = "tokenizer.ggml." + key
    # libllama would silently fall back to a default token; the file is refused instead.
    v = (T.UINT32, value) if value >= 0 else (T.INT32, value)
    assert_refused(survivor, bad_file(tmp_path, kv={key: v}),
                   f"'{key}' = {value} is not a token id \\(the vocabulary has {N_VOCAB} tokens\\)", vocab_too=True)


def test_special_tokens_in_range_load(tmp_path):
    kv = {"tokenizer.ggml." + k: i % N_VOCAB for i, k in enumerate(_TOKEN_ID_KEYS)}
    kv["tokenizer.ggml.eos_token_id"] = N_VOCAB - 1
    path = bad_file(tmp_path, kv=kv)
    LocalModel(path, n_ctx=64, n_threads=1)
    vocab = _engine.Vocab(str(path))
    assert vocab.eos == N_VOCAB - 1 and vocab.bos == 0


@pytest.mark.parametrize("kv, message", [
    ({"tokenizer.ggml.bos_token_id": (T.INT32, 1)}, "'tokenizer.ggml.bos_token_id' must be a uint32 .*, not i32"),
    ({"tokenizer.ggml.eos_token_id": "2"}, "'tokenizer.ggml.eos_token_id' must be an integer, not str"),
    # The token list and the arrays that run parallel to it.
    ({"tokenizer.ggml.tokens": VOCAB[:-1]}, "'tokenizer.ggml.tokens' has 319 tokens but token_embd.weight has 320 rows"),
    ({"tokenizer.ggml.tokens": VOCAB + ["extra"]}, "has 321 tokens but token_embd.weight has 320 rows"),
    ({"tokenizer.ggml.tokens": None}, "missing metadata key 'tokenizer.ggml.tokens'"),
    ({"tokenizer.ggml.tokens": list(range(N_VOCAB))}, "'tokenizer.ggml.tokens' must be an array of strings"),
    ({"tokenizer.ggml.tokens": VOCAB[:10] + [VOCAB[4]] + VOCAB[11:]}, "lists token '<0x01>' twice \\(ids 4 and 10\\)"),
    ({"tokenizer.ggml.scores": [0.0] * (N_VOCAB - 1)}, "'tokenizer.ggml.scores' has 319 entries but tokenizer.ggml.tokens has 320"),
    ({"tokenizer.ggml.scores": ["a"] * N_VOCAB}, "'tokenizer.ggml.scores' must be an array of f32"),
    ({"tokenizer.ggml.token_type": (T.ARRAY, (T.INT32, [1] * (N_VOCAB + 1)))}, "'tokenizer.ggml.token_type' has 321 entries"),
    ({"tokenizer.ggml.token_type": [1.0] * N_VOCAB}, "'tokenizer.ggml.token_type' must be an array of i32"),
    ({"tokenizer.ggml.model": "rwkv"}, "unsupported tokenizer model 'rwkv'"),
    ({"tokenizer.ggml.model": "none"}, "unsupported tokenizer model 'none'"),
    ({"tokenizer.ggml.model": None}, "missing metadata key 'tokenizer.ggml.model'"),
    ({"tokenizer.ggml.model": "gpt2"}, "missing metadata key 'tokenizer.ggml.merges'"),
    ({"tokenizer.ggml.merges": [1, 2]}, "'tokenizer.ggml.merges' must be an array of strings"),
    ({"tokenizer.ggml.add_bos_token": 1}, "'tokenizer.ggml.add_bos_token' must be a bool, not u32"),
    ({"tokenizer.ggml.pre": 3}, "'tokenizer.ggml.pre' must be a string, not u32"),
    ({"tokenizer.chat_template": (T.STRING, b"{{ \xff }}")}, "'tokenizer.chat_template' is not valid UTF-8"),
])
def test_bad_vocabulary_metadata(tmp_path, survivor, kv, message):
    assert_refused(survivor, bad_file(tmp_path, kv=kv), message, vocab_too=True)


def test_libllama_vocab_error_is_named(tmp_path, survivor):
    # What libllama itself refuses (after our checks) comes back with its reason, not only "failed".
    kv = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.merges": ["w 1"], "tokenizer.ggml.pre": "no-such-pre-tokenizer"}
    assert_refused(survivor, bad_file(tmp_path, kv=kv),
                   "could not load the vocabulary: .*no-such-pre-tokenizer", vocab_too=True)


def test_bytes_from_the_file_are_escaped_in_messages(tmp_path, survivor):
    # An error message quoting a corrupt name must still be a Python str (not a UnicodeDecodeError).
    assert_refused(survivor, bad_file(tmp_path, kv={"general.architecture": (T.STRING, b"ll\xffma\x01")}),
                   r"unsupported architecture 'll\\xFFma\\x01'")


def test_missing_byte_token_is_a_clean_error(tmp_path, survivor):
    # An SPM vocabulary without the byte token a text needs: libllama throws out_of_range from the
    # tokenizer; it arrives as RuntimeError, not IndexError.
    tokens = [t if t != "<0x41>" else "<0x41-gone>" for t in VOCAB]
    llm = LocalModel(bad_file(tmp_path, kv={"tokenizer.ggml.tokens": tokens}), n_ctx=64, n_threads=1)
    with pytest.raises(RuntimeError, match="tokenization failed"):
        llm.tokenize("A")
    assert llm.tokenize("w1", add_special=False) != []
