#include "graph_runner.h"

#include "devices.h"

#include "ggml-cpu.h"

#include <algorithm>

namespace pse {

graph_runner::graph_runner(const std::vector<ggml_backend_dev_t> & devices, int n_threads, size_t graph_size,
                           std::atomic<bool> * abort_flag)
    : graph_size_(graph_size) {
    for (ggml_backend_dev_t dev : devices) {
        if (is_cpu(dev) || std::find(devices_.begin(), devices_.end(), dev) != devices_.end()) continue;
        ggml_backend_ptr b(ggml_backend_dev_init(dev, nullptr));
        if (!b) throw std::runtime_error("cannot initialise device " + device_spec(dev));
        backends_.push_back(std::move(b));
        devices_.push_back(dev);
    }
    ggml_backend_ptr cpu(ggml_backend_cpu_init());
    if (!cpu) throw std::runtime_error("cannot initialise the ggml CPU backend");
    cpu_ = cpu.get();
    backends_.push_back(std::move(cpu));
    devices_.push_back(cpu_device());
    ggml_backend_cpu_set_n_threads(cpu_, n_threads);
    if (abort_flag) {
        ggml_backend_cpu_set_abort_callback(cpu_, [](void * data) { return ((std::atomic<bool> *) data)->load(); },
                                            abort_flag);
    }
    sched_ = new_sched();
}

ggml_backend_sched_ptr graph_runner::new_sched() const {
    std::vector<ggml_backend_t> bs;
    for (const ggml_backend_ptr & b : backends_) bs.push_back(b.get());
    ggml_backend_sched_ptr s(ggml_backend_sched_new(bs.data(), nullptr, (int) bs.size(), graph_size_,
                                                    /*parallel =*/ false, /*op_offload =*/ false));
    if (!s) throw std::runtime_error("cannot create ggml's scheduler");
    return s;
}

std::vector<ggml_backend_dev_t> graph_runner::devices() const { return devices_; }

void graph_runner::set_n_threads(int n_threads) { ggml_backend_cpu_set_n_threads(cpu_, n_threads); }

void graph_runner::check_placement(ggml_cgraph * gf, const std::string & what) const {
    for (int i = 0; i < ggml_graph_n_nodes(gf); ++i) {
        ggml_tensor * node = ggml_graph_node(gf, i);
        // As the scheduler decides: a tensor that already has memory (or views some) runs on a
        // backend that can use that memory and run the operation, or nowhere.
        ggml_backend_buffer_t buf = node->view_src ? node->view_src->buffer : node->buffer;
        if (!buf) continue;
        bool ok = false;
        for (const ggml_backend_ptr & b : backends_) {
            ok = ok || (ggml_backend_supports_buft(b.get(), ggml_backend_buffer_get_type(buf)) &&
                        ggml_backend_supports_op(b.get(), node));
        }
        if (!ok) {
            throw std::invalid_argument(what + ": the device holding '" + std::string(node->view_src ? node->view_src->name : node->name) +
                                        "' (" + ggml_backend_buffer_name(buf) + ") cannot run " + ggml_op_desc(node) +
                                        " on it");
        }
    }
}

std::vector<std::pair<ggml_backend_dev_t, size_t>> graph_runner::measure(ggml_cgraph * gf) const {
    // A scheduler of its own: after a size-only reserve, an allocator believes its (never
    // allocated) buffers fit any graph of the same shape.
    ggml_backend_sched_ptr s = new_sched();
    std::vector<size_t> sizes(backends_.size());
    ggml_backend_sched_reserve_size(s.get(), gf, sizes.data());
    std::vector<std::pair<ggml_backend_dev_t, size_t>> out;
    for (size_t i = 0; i < devices_.size(); ++i) out.push_back({devices_[i], sizes[i]});
    return out;
}

void graph_runner::allocate(ggml_cgraph * gf, const std::string & what, bool new_plan) {
    // A new plan comes from a new scheduler: reserving with gf and then allocating it would split
    // it twice, and the second split would lose the copies between devices the first one made.
    if (new_plan) sched_ = new_sched();
    else ggml_backend_sched_reset(sched_.get());
    if (!ggml_backend_sched_alloc_graph(sched_.get(), gf)) {
        sched_ = new_sched();  // a failed allocation leaves a plan that a later graph would trust
        throw std::runtime_error("cannot allocate compute buffers for " + what);
    }
}

void graph_runner::compute(ggml_cgraph * gf, const std::string & what) {
    const ggml_status status = ggml_backend_sched_graph_compute(sched_.get(), gf);
    if (status == GGML_STATUS_ABORTED) throw eval_aborted("evaluation stopped");
    if (status != GGML_STATUS_SUCCESS) {
        throw std::runtime_error(what + " failed (" + ggml_status_to_string(status) + ")");
    }
}

}  // namespace pse
