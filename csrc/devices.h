// Where a model runs: ggml's devices. The CPU always; a GPU in a build with Metal, Vulkan or CUDA
// (CMAKE_ARGS="-DGGML_VULKAN=ON" ...); llama.cpp RPC servers on other machines (or processes).
//
// A device is named by a spec: "auto" (the first GPU this build sees, else the CPU), "cpu", a
// backend's name ("vulkan", "metal", "cuda", ...) with an optional device index ("vulkan:1"), or
// "rpc:HOST:PORT[,HOST:PORT...]" (RPC servers; the model's layers are split among them).
#pragma once

#include "ggml-backend.h"

#include <cstddef>
#include <string>
#include <vector>

namespace pse {

struct device_info {
    std::string name;         // ggml's device name: "CPU", "Vulkan0", "RPC0", ...
    std::string spec;         // how to ask for it: "cpu", "vulkan:0", ...
    std::string description;  // the hardware: "AMD EPYC ...", "llvmpipe (LLVM 15.0.6, 256 bits)", ...
    std::string type;         // "cpu", "gpu", "igpu", "accel"
    size_t memory_free = 0, memory_total = 0;
};

// The devices this build can use now (RPC servers are not listed: they are named by address).
std::vector<device_info> available_devices();

// The devices a spec names, in order. Throws std::invalid_argument naming the problem: an unknown
// backend (with what this build offers, and the build flag that adds it), an index out of range,
// a malformed RPC address, an RPC server that cannot be reached or speaks another protocol
// version. Checked here because ggml's RPC client aborts the process on any of these.
std::vector<ggml_backend_dev_t> resolve_devices(const std::string & spec);

ggml_backend_dev_t cpu_device();
bool rpc_available();  // whether this build has ggml's RPC backend (-DGGML_RPC=ON)
bool is_cpu(ggml_backend_dev_t dev);
std::string device_spec(ggml_backend_dev_t dev);  // the spec that names dev ("cpu", "vulkan:0", "rpc:host:port")

// Throws not_enough_memory (host.h) when bytes exceed what dev has free: for the CPU, the host's
// available memory (require_memory); for another device, what ggml reports for it.
void require_device_memory(ggml_backend_dev_t dev, size_t bytes, const std::string & what);

// Serves this machine's CPU to RPC clients at HOST:PORT (as llama.cpp's rpc-server); returns only
// if the server cannot start. Throws std::invalid_argument for a bad endpoint or a build without
// the RPC backend.
void serve_rpc(const std::string & endpoint, int n_threads);

}  // namespace pse
