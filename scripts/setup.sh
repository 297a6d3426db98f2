#!/usr/bin/env bash
# Installs what building and testing pyselfextend needs, then builds it in place (editable).
# Safe to re-run: the build directory (build/) is kept, so a rebuild only recompiles changes.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
"$PY" -m pip install --disable-pip-version-check -q \
    "scikit-build-core>=0.10" "pybind11>=2.12" "cmake>=3.21" ninja "numpy>=1.23" "pytest>=7" "gguf>=0.10" \
    "matplotlib>=3.5"  # the plot extra, so that the tests cover --plot and evaluate
# --no-build-isolation: build with the tools just installed, so the persistent build/ directory
# sees the same compiler tool paths every time and stays valid.
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation -e . 1>&2
