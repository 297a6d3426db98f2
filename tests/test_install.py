"""Installing as Python users do: `pip install .` with build isolation and empty caches in a fresh
virtual environment, then the installed command runs the model; and the sdist `python -m build`
makes carries every file of the tree, so that a wheel built from it is built from the same sources.

One full build of ggml and libllama: a few minutes. Deselect with `-m "not slow"`.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from pyselfextend import LocalModel

REPO = Path(__file__).resolve().parent.parent
PROMPT = "The three primary colours are"


def _source_tree(dest: Path) -> Path:
    """The files a clean clone would have, plus uncommitted ones git does not ignore."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


def _run(cmd, env, cwd=None):
    r = subprocess.run([str(c) for c in cmd], env=env, cwd=cwd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return r.stdout


def _venv(path: Path, env) -> Path:
    _run([sys.executable, "-m", "venv", path], env)
    return path / "bin"


def _generate(bin_dir: Path, env) -> str:
    _run([bin_dir / "pyselfextend", "pull"], env)  # the default model, already in the cache: only checked
    return _run([bin_dir / "pyselfextend", "generate", "--prompt", PROMPT, "--max-tokens", "16", "--temperature",
                 "0", "--ctx", "512", "--threads", "2"], env, cwd=bin_dir)


@pytest.mark.slow
@pytest.mark.model
def test_pip_install_works_in_a_fresh_venv_and_the_sdist_is_whole(tmp_path, smollm_path):
    src = _source_tree(tmp_path / "src")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYSELFEXTEND_LLAMA_CPP_DIR", "VIRTUAL_ENV"))}
    env.update(PIP_NO_CACHE_DIR="1", PYSELFEXTEND_DOWNLOAD_CACHE=str(tmp_path / "downloads"),
               PYSELFEXTEND_MODELS=str(smollm_path.parent))
    expected = LocalModel(smollm_path, n_ctx=512, n_threads=2).generate(PROMPT, max_tokens=16, temperature=0)
    assert expected.strip()

    # 1. pip install . (isolated build, nothing cached), then the command from that venv.
    pip_venv = _venv(tmp_path / "venv-pip", env)
    _run([pip_venv / "python", "-m", "pip", "install", "--disable-pip-version-check", "-q", src], env)
    assert (tmp_path / "downloads").is_dir(), "the build did not fetch the pinned llama.cpp source itself"
    assert _generate(pip_venv, env).rstrip("\n") == expected

    # 2. python -m build --sdist (no compiling): it must carry every file of the tree. (Building a
    # wheel from it as well would be a second full build: minutes of CI for what this checks.)
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", tmp_path / "dist", src], env, cwd=tmp_path)
    sdists = list((tmp_path / "dist").glob("pyselfextend-*.tar.gz"))
    assert len(sdists) == 1
    with tarfile.open(sdists[0]) as tar:
        packed = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    tree = {str(p.relative_to(src)) for p in src.rglob("*") if p.is_file()}
    assert tree - packed == set(), "files of the tree missing from the sdist"
    assert {"CMakeLists.txt", "third_party/llama_cpp.cmake", "csrc/models/qwen2.cpp", "models/catalogue.json"} <= packed
