#!/usr/bin/env bash
# Builds llama.cpp's own llama-bench from the same pinned source as the extension (the archive's
# sha256 is checked by third_party/llama_cpp.cmake), in build/llama-bench, and prints its path.
# `pyselfextend bench --llama-bench PATH` then runs it beside the other engines:
#     pyselfextend bench --depths 0,16k --llama-bench "$(bash scripts/build-llama-bench.sh)"
# A few minutes on two cores the first time (llama.cpp's common library comes with it).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
BUILD_DIR="${PYSELFEXTEND_LLAMA_BENCH_BUILD_DIR:-build/llama-bench}"
mkdir -p "$(dirname "$BUILD_DIR")"
GENERATOR=()
if command -v ninja > /dev/null; then GENERATOR=(-G Ninja); fi
cmake -S . -B "$BUILD_DIR" "${GENERATOR[@]}" -DCMAKE_BUILD_TYPE=Release -DPYSELFEXTEND_LLAMA_BENCH=ON \
    -DPython_EXECUTABLE="$PY" -Dpybind11_DIR="$("$PY" -m pybind11 --cmakedir)" > "$BUILD_DIR.log" 2>&1 ||
    { echo "build-llama-bench: configure failed; see $BUILD_DIR.log" >&2; exit 1; }
cmake --build "$BUILD_DIR" --target llama-bench >> "$BUILD_DIR.log" 2>&1 ||
    { echo "build-llama-bench: build failed; see $BUILD_DIR.log" >&2; exit 1; }
BIN="$(find "$BUILD_DIR" -type f -name llama-bench -perm -u+x | head -n 1)"
[ -n "$BIN" ] || { echo "build-llama-bench: no llama-bench binary under $BUILD_DIR" >&2; exit 1; }
echo "$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
