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

# The pinned ggml needs Vulkan headers with VK_EXT_layer_settings (vk::LayerSettingEXT). Debian 12's
# (1.3.239) predate it and fail to compile ggml-vulkan.cpp; then the headers of Debian 13 (trixie)
# are unpacked into build-vulkan/vulkan-headers (headers only: nothing is installed, the
# system's Vulkan loader and drivers stay) from a private apt list that leaves the system's alone.
extra=""
if ! grep -q VK_EXT_layer_settings /usr/include/vulkan/vulkan_core.h; then
    headers="$PWD/build-vulkan/vulkan-headers"
    if [ ! -e "$headers/usr/include/vulkan/vulkan.hpp" ]; then
        echo "test-vulkan: the system's Vulkan headers are too old for ggml; fetching Debian trixie's" >&2
        apt_dir="$PWD/build-vulkan/apt"
        mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial" "$apt_dir/debs" "$headers"
        echo "deb http://deb.debian.org/debian trixie main" > "$apt_dir/sources.list"
        apt_opts=(-o Dir::Etc::sourcelist="$apt_dir/sources.list" -o Dir::Etc::sourceparts=- \
                  -o Dir::State::Lists="$apt_dir/lists" -o Dir::Cache="$apt_dir/cache" -o APT::Get::List-Cleanup=0)
        apt-get "${apt_opts[@]}" update -q >&2
        (cd "$apt_dir/debs" && apt-get "${apt_opts[@]}" download libvulkan-dev spirv-headers >&2)
        for deb in "$apt_dir"/debs/*.deb; do dpkg -x "$deb" "$headers"; done
    fi
    extra="-DVulkan_INCLUDE_DIR=$headers/usr/include -DSPIRV-Headers_DIR=$headers/usr/share/cmake/SPIRV-Headers"
fi

python3 -m venv .venv-vulkan
. .venv-vulkan/bin/activate
# ggml-vulkan skips CPU-type Vulkan devices such as lavapipe unless they are named.
export GGML_VK_VISIBLE_DEVICES="${GGML_VK_VISIBLE_DEVICES:-0}"
PYSELFEXTEND_BUILD_DIR=build-vulkan CMAKE_ARGS="-DGGML_VULKAN=ON $extra ${CMAKE_ARGS:-}" bash scripts/setup.sh
python -c 'import pyselfextend as p; print("test-vulkan: devices:", [(d["spec"], d["description"]) for d in p.devices()])' >&2
PYSELFEXTEND_TEST_DEVICE=vulkan python -m pytest -q tests/test_devices.py "$@"
