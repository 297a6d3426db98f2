from __future__ import annotations

import signal
import socket
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny_gguf import TinySpec, write_tiny_model  # noqa: E402

from pyselfextend import models  # noqa: E402


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for servers the tests start)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_sigint() -> None:
    """preexec_fn for children a test interrupts: Ctrl-C as in a terminal. A test run started in
    the background (`cmd &` in a script, nohup) passes on SIGINT ignored, and Python then never
    raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    """The real default model (SmolLM2-135M-Instruct Q4_1), pulled into the cache on first use."""
    path = models.model_path()
    if not path.exists():
        models.pull()
    return path


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    """The second real model (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, qwen2), pulled on first use."""
    path = models.model_path("qwen2.5-coder-0.5b")
    if not path.exists():
        models.pull("qwen2.5-coder-0.5b")
    return path


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """Factory: tiny_model(**TinySpec fields) -> path of a random tiny GGUF model (cached per spec)."""
    made = {}

    def make(**kwargs) -> Path:
        spec = TinySpec(**kwargs)
        if spec not in made:
            made[spec] = write_tiny_model(tmp_path_factory.mktemp("tiny") / "model.gguf", spec)
        return made[spec]

    return make
