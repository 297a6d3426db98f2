#!/usr/bin/env bash
# Installs what building and testing pyselfextend needs, then builds it in place (editable).
# Run it inside a virtual environment (the README's commands make one in .venv).
# Safe to re-run: the build directory (build/) is kept, so a rebuild only recompiles changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3 || true)}"
if [ -z "$PY" ]; then
    echo "setup: no python or python3 on PATH; install Python 3.9 or newer" >&2
    exit 1
fi
# A distribution's own Python (Debian, Ubuntu, Homebrew) refuses pip installs outside a virtual
# environment ("externally-managed-environment"): say what to do instead of letting pip fail.
if "$PY" -c 'import sys, sysconfig, os; sys.exit(0 if sys.prefix == sys.base_prefix and os.path.exists(os.path.join(sysconfig.get_paths()["stdlib"], "EXTERNALLY-MANAGED")) else 1)'; then
    echo "setup: $PY is managed by the system's package manager; use a virtual environment:" >&2
    echo "    python3 -m venv .venv && . .venv/bin/activate && bash scripts/setup.sh" >&2
    exit 1
fi
echo "setup: installing build and test requirements" >&2
# Beyond building: the plot extra (the tests cover --plot), build (the install check), pexpect
# (the terminal chat test), the server extra and the real OpenAI client its tests use.
"$PY" -m pip install --disable-pip-version-check -q \
    "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.21" ninja "numpy>=1.23" "pytest>=7" "gguf>=0.10" \
    "matplotlib>=3.5" "build>=1.0" "pexpect>=4.8" \
    "starlette>=0.37" "uvicorn>=0.29" "openai>=1.30" "httpx>=0.27"
# PYSELFEXTEND_BUILD_DIR: another build directory (scripts/test-vulkan.sh keeps a Vulkan build apart).
BUILD_DIR="${PYSELFEXTEND_BUILD_DIR:-build}"
if [ ! -d "$BUILD_DIR" ]; then
    echo "setup: building pyselfextend; the first build fetches the pinned llama.cpp source and compiles" \
         "ggml and libllama: a few minutes on two cores" >&2
else
    echo "setup: building pyselfextend (only what changed)" >&2
fi
# --no-build-isolation: build with the tools just installed, so that the persistent build
# directory sees the same compiler tool paths every time and stays valid.
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation \
    --config-settings=build-dir="$BUILD_DIR/{cache_tag}" -e . 1>&2
echo "setup: done ($("$PY" -c 'import pyselfextend; print("pyselfextend", pyselfextend.__version__)'))" >&2
