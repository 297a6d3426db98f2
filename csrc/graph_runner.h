// Runs graphs on a model's devices through ggml's scheduler: a backend per device, then the CPU's,
// which takes the operations a device cannot run and the graph inputs. Every allocation and
// computation is checked here.
#pragma once

#include "ggml-backend.h"
#include "ggml-cpp.h"

#include <atomic>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace pse {

// Thrown when a progress callback or abort() stopped an eval. The cache then holds the batches
// that completed, so the caller may reset() or keep going.
struct eval_aborted : std::runtime_error {
    using std::runtime_error::runtime_error;
};

class graph_runner {
public:
    // devices: where the model's layers run (their order is the scheduler's priority). abort_flag,
    // when set, stops a CPU computation between operations (other devices stop between graphs).
    graph_runner(const std::vector<ggml_backend_dev_t> & devices, int n_threads, size_t graph_size,
                 std::atomic<bool> * abort_flag);

    std::vector<ggml_backend_dev_t> devices() const;        // with the CPU last
    void set_n_threads(int n_threads);

    // Throws std::invalid_argument when a tensor the graph writes to or reads in place (the KV
    // cache, a weight) lives on a device that cannot run the operation: ggml's scheduler would
    // abort. what names the setting at fault in the message.
    void check_placement(ggml_cgraph * gf, const std::string & what) const;
    // Each device's compute buffer bytes for gf, measured without allocating.
    std::vector<std::pair<ggml_backend_dev_t, size_t>> measure(ggml_cgraph * gf) const;
    // Allocates gf's tensors (the previous graph's are gone). Throws std::runtime_error. ggml keeps
    // the last allocation plan for any graph with as many nodes and leafs whose tensors fit it, as
    // if it were the same graph; new_plan makes a plan for gf itself (for a graph of another
    // structure, such as one with extra outputs, that may have the same counts).
    void allocate(ggml_cgraph * gf, const std::string & what, bool new_plan = false);
    // Computes an allocated graph; throws eval_aborted when stopped, std::runtime_error on failure.
    void compute(ggml_cgraph * gf, const std::string & what);

private:
    std::vector<ggml_backend_ptr> backends_;  // the devices', then the CPU's
    std::vector<ggml_backend_dev_t> devices_;
    ggml_backend_t cpu_ = nullptr;
    size_t graph_size_ = 0;
    ggml_backend_sched_ptr sched_;

    ggml_backend_sched_ptr new_sched() const;
};

}  // namespace pse
