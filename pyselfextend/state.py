"""Saved model state: the cached tokens and their KV cache in one file, to skip a long prefill.

Layout (little-endian):

    b"PSESTATE"                 magic
    u32 format version         FORMAT_VERSION
    u64 header length, header  JSON: the settings that must match, token count, KV bytes, metadata
    i32 x n_tokens             the cached token ids
    KV bytes                   per layer, K rows then V rows of the first n_tokens positions
    32 bytes                   sha256 of everything before

The settings are the model file's identity (its size and a hash of its first 16 MiB, which hold
the GGUF header), n_ctx, cache type, SelfExtend's group size and window, and RoPE scaling: a cache
computed under other settings would give silently wrong output, so loading refuses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Dict, List, Tuple, Union

import numpy as np

MAGIC = b"PSESTATE"
FORMAT_VERSION = 1
_IDENTITY_BYTES = 16 << 20
_CHUNK = 16 << 20

PathLike = Union[str, "os.PathLike[str]"]


class StateMismatch(ValueError):
    """A saved state was made with other settings (model, n_ctx, cache type, G, W, ...)."""


class CorruptState(ValueError):
    """A saved state file is truncated, damaged or not a state file."""


def is_state_file(path: PathLike) -> bool:
    """Whether ``path`` starts like a state file (to tell one from a file that must not be replaced)."""
    with open(path, "rb") as f:
        return f.read(len(MAGIC)) == MAGIC


def read_metadata(path: PathLike) -> Dict[str, object]:
    """The metadata saved with a state, from its header alone (unchecked: load_state checks)."""
    with open(path, "rb") as f:
        head = f.read(len(MAGIC) + 12)
        if len(head) < len(MAGIC) + 12 or not head.startswith(MAGIC):
            raise CorruptState(f"{path}: not a pyselfextend state file")
        header_len = struct.unpack_from("<Q", head, len(MAGIC) + 4)[0]
        try:
            metadata = json.loads(f.read(min(header_len, 1 << 30))).get("metadata", {})
        except (ValueError, AttributeError) as e:
            raise CorruptState(f"{path}: unreadable header ({e})") from None
    return metadata if isinstance(metadata, dict) else {}


def model_identity(path: PathLike) -> Dict[str, object]:
    """The model file's size and the sha256 of its first 16 MiB (the GGUF header and more)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(_IDENTITY_BYTES))
    return {"size": os.path.getsize(path), "sha256_head": h.hexdigest()}


def write_state(path: PathLike, settings: Dict[str, object], tokens: List[int], kv: bytes,
                metadata: Dict[str, object]) -> None:
    """Writes a state file atomically: into a temporary file beside ``path``, flushed to disk,
    then renamed over it; on any failure the temporary file is removed."""
    path = Path(path)
    header = json.dumps({"settings": settings, "n_tokens": len(tokens), "kv_bytes": len(kv),
                         "metadata": metadata}).encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            h = hashlib.sha256()
            view = memoryview(kv)
            parts = [MAGIC + struct.pack("<IQ", FORMAT_VERSION, len(header)), header,
                     np.asarray(tokens, dtype="<i4").tobytes()]
            parts += [view[i:i + _CHUNK] for i in range(0, len(view), _CHUNK)]
            for part in parts:
                h.update(part)
                f.write(part)
            f.write(h.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def read_state(path: PathLike, settings: Dict[str, object]) -> Tuple[List[int], bytes, Dict[str, object]]:
    """Reads and checks a state file against this model's ``settings``.

    Returns (tokens, KV bytes, metadata). Raises StateMismatch naming every setting that
    differs, CorruptState for a damaged or truncated file, FileNotFoundError if it is missing.
    """
    path = Path(path)
    data = path.read_bytes()
    fixed = len(MAGIC) + 12
    if len(data) < fixed + 32 or not data.startswith(MAGIC):
        raise CorruptState(f"{path}: not a pyselfextend state file")
    if hashlib.sha256(memoryview(data)[:-32]).digest() != data[-32:]:
        raise CorruptState(f"{path}: checksum mismatch: the file is truncated or damaged")
    version, header_len = struct.unpack_from("<IQ", data, len(MAGIC))
    if version != FORMAT_VERSION:
        raise StateMismatch(f"{path}: state format version {version}; this pyselfextend reads version {FORMAT_VERSION}")
    try:
        header = json.loads(data[fixed:fixed + header_len])
        n_tokens, kv_bytes = header["n_tokens"], header["kv_bytes"]
        saved, metadata = header["settings"], header.get("metadata", {})
        if not (isinstance(n_tokens, int) and isinstance(kv_bytes, int) and isinstance(saved, dict)
                and isinstance(metadata, dict) and 0 <= n_tokens and 0 <= kv_bytes):
            raise ValueError("fields of the wrong type or sign")
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptState(f"{path}: unreadable header ({e})") from None
    differ = [f"{k}: saved {saved.get(k)!r}, this model {v!r}" for k, v in settings.items() if saved.get(k) != v]
    if differ:
        raise StateMismatch(f"{path} was saved with other settings: " + "; ".join(differ))
    start = fixed + header_len
    if start + 4 * n_tokens + kv_bytes + 32 != len(data):
        raise CorruptState(f"{path}: sizes in the header do not match the file")
    tokens = np.frombuffer(data, dtype="<i4", count=n_tokens, offset=start).tolist()
    n_vocab = settings.get("n_vocab")
    if isinstance(n_vocab, int) and any(not 0 <= t < n_vocab for t in tokens):
        raise CorruptState(f"{path}: token ids outside the vocabulary")
    kv = memoryview(data)[start + 4 * n_tokens:start + 4 * n_tokens + kv_bytes]
    return tokens, kv, metadata
