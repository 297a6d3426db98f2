#!/usr/bin/env bash
# Builds pyselfextend with ggml's Vulkan backend and runs the device tests on it.
#
# Without a GPU, Vulkan runs on lavapipe, Mesa's CPU driver: the same ggml-backend path Metal and
# CUDA take (device buffers, shaders, the scheduler's CPU fallback), with Vulkan's own numerics.
# It is an emulation: correctness, not speed, is the point.
#
# The build lives apart from the CPU build: its own virtual environment (.venv-vulkan) and build
# directory (build-vulkan). Debian/Ubuntu packages it needs are installed with apt-get when
# missing: mesa-vulkan-drivers (lavapipe), libvulkan-dev, glslc, spirv-headers.
#
# Usage: bash scripts/test-vulkan.sh [pytest arguments]
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v glslc >/dev/null || need+=(glslc)
[ -e /usr/include/vulkan/vulkan.h ] || need+=(libvulkan-dev)
[ -d /usr/share/cmake/SPIRV-Headers ] || need+=(spirv-headers)
ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || need+=(mesa-vulkan-drivers)
if [ ${#need[@]} -gt 0 ]; then
    echo "test-vulkan: installing ${need[*]}" >&2
    SUDO=$([ "$(id -u)" = 0 ] && echo "" || echo sudo)
    $SUDO apt-get install -y -q "${need[@]}" >&2
fi

python3 -m venv .venv-vulkan
. .venv-vulkan/bin/activate
# ggml-vulkan skips CPU-type Vulkan devices such as lavapipe unless they are named.
export GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}"
PYSELFEXTEND_BUILD_DIR=build-vulkan CMAKE_ARGS="-DGGML_VULKAN=ON ${CMAKE_ARGS:-}" bash scripts/setup.sh
python -c 'import pyselfextend as p; print("test-vulkan: devices:", [(d["spec"], d["description"]) for d in p.devices()])' >&2
PYSELFEXTEND_TEST_DEVICE=vulkan python -m pytest -q tests/test_devices.py "$@"
