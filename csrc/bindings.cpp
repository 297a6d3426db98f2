// pyselfextend._engine: the C++ engine as a Python extension. Compute runs without the GIL.
#include "devices.h"
#include "engine.h"
#include "host.h"
#include "reference.h"
#include "roofline.h"
#include "vocab.h"

#include "ggml-cpu.h"

#include <pybind11/functional.h>
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cmath>
#include <optional>

namespace py = pybind11;
using namespace pse;

namespace {

py::array_t<float> to_array(std::vector<float> && v, int64_t rows, int64_t cols) {
    auto * heap = new std::vector<float>(std::move(v));
    py::capsule owner(heap, [](void * p) { delete (std::vector<float> *) p; });
    if (rows < 0) return py::array_t<float>({cols}, heap->data(), owner);
    return py::array_t<float>({rows, cols}, heap->data(), owner);
}

std::vector<int32_t> to_tokens(const py::handle & obj) {
    std::vector<int32_t> out;
    for (py::handle h : obj) {
        const long long v = py::cast<long long>(h);
        if (v < INT32_MIN || v > INT32_MAX) throw std::invalid_argument("token id " + std::to_string(v) + " out of range");
        out.push_back((int32_t) v);
    }
    return out;
}

// Python ints are unbounded: say which option is out of the engine's int32 range instead of
// pybind11's "incompatible function arguments". The engine checks the rest of each rule.
int32_t narrow(const char * name, int64_t value) {
    if (value < INT32_MIN || value > INT32_MAX) {
        throw std::invalid_argument(std::string(name) + " = " + std::to_string(value) + " is out of range");
    }
    return (int32_t) value;
}

// Runs an eval without the GIL; a Python progress callback is called with the GIL held, and an
// exception it raises (KeyboardInterrupt included) stops the eval and is re-raised here.
template <typename Eval>
py::array_t<float> eval_released(Eval && run, int32_t n_vocab, int64_t n, bool all_logits, py::object progress) {
    std::optional<py::error_already_set> callback_error;
    progress_fn fn;
    if (!progress.is_none()) {
        fn = [&](int64_t done, int64_t total) -> bool {
            py::gil_scoped_acquire gil;
            try {
                py::object r = progress(done, total);
                return r.is_none() || r.cast<bool>();
            } catch (py::error_already_set & e) {
                callback_error.emplace(std::move(e));
                return false;
            }
        };
    }
    std::vector<float> logits;
    {
        py::gil_scoped_release release;
        try {
            logits = run(fn);
        } catch (const eval_aborted &) {
            if (!callback_error) throw;
        }
    }
    if (callback_error) throw std::move(*callback_error);
    return to_array(std::move(logits), all_logits ? n : -1, n_vocab);
}

// Runs the attention seam alone on given q, k, v ([n, heads, D] float32, not rotated): the
// production path (cache writes, neighbor rotation, fused kernel or portable ops), in batches of
// n_batch, one layer. For tests against an independent evaluation of the formula.
py::array_t<float> attention_probe(py::array_t<float, py::array::c_style | py::array::forcecast> q,
                                   py::array_t<float, py::array::c_style | py::array::forcecast> k,
                                   py::array_t<float, py::array::c_style | py::array::forcecast> v, int32_t group_size,
                                   int32_t window, int32_t n_batch, const std::string & cache_type,
                                   const std::string & path, float freq_base, int32_t n_threads,
                                   int32_t decode_tail, const std::string & rope_mode, const std::string & device) {
    if (q.ndim() != 3 || k.ndim() != 3 || v.ndim() != 3) throw std::invalid_argument("q, k, v must be [n, heads, D]");
    const int32_t n = (int32_t) q.shape(0), n_head = (int32_t) q.shape(1), D = (int32_t) q.shape(2);
    const int32_t n_head_kv = (int32_t) k.shape(1);
    if (k.shape(0) != n || v.shape(0) != n || v.shape(1) != n_head_kv || k.shape(2) != D || v.shape(2) != D ||
        n_head % n_head_kv != 0 || D % 8 != 0 || n < 1 || n_batch < 1 || group_size < 1 || (group_size > 1 && window < 1) ||
        (rope_mode != "normal" && rope_mode != "neox")) {
        throw std::invalid_argument("attention_probe: inconsistent shapes or parameters");
    }
    llama_hparams hp;
    hp.n_layer = 1;
    hp.n_head = n_head;
    hp.n_head_kv = n_head_kv;
    hp.head_dim = D;
    const std::vector<ggml_backend_dev_t> devices = resolve_devices(device);
    if (path == "fused" && !is_cpu(devices[0])) throw std::invalid_argument("attention_probe: the fused kernel runs on the CPU only");
    graph_runner runner(devices, n_threads, 1024, nullptr);
    std::vector<float> result((size_t) n * n_head * D);
    {
        kv_cache cache;
        const attention_path apath = path == "portable" ? attention_path::portable : attention_path::fused;
        cache.init(hp, n, kv_cache::type_from_name(cache_type), selfextend_ring_size(group_size, window, apath, n_batch),
                   {ggml_backend_dev_buffer_type(devices[0])});
        require_device_memory(devices[0], cache.bytes_needed(), "attention_probe's cache");
        cache.allocate();
        cache.zero();
        std::vector<uint8_t> meta(ggml_tensor_overhead() * 256 + ggml_graph_overhead());
        rope_params rope;
        rope.n_rot = D;
        rope.n_ctx_orig = n;
        rope.freq_base = freq_base;
        rope.mode = rope_mode == "neox" ? GGML_ROPE_TYPE_NEOX : 0;
        attention_config cfg;
        cfg.group_size = group_size;
        cfg.window = window;
        cfg.path = apath;
        cfg.n_threads = n_threads;
        cfg.kq_scale = 1.0f / std::sqrt((float) D);
        cfg.ring_size = cache.ring_size;
        cfg.n_ctx = n;
        for (int32_t done = 0; done < n;) {
            // The last decode_tail tokens go one at a time, as in generation.
            const int32_t T = done >= n - decode_tail ? 1 : std::min(n_batch, n - decode_tail - done);
            ggml_init_params ip = {meta.size(), meta.data(), true};
            ggml_context_ptr ctx_holder(ggml_init(ip));
            ggml_context * ctx = ctx_holder.get();
            ggml_cgraph * gf = ggml_new_graph(ctx);
            ggml_tensor * tq = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, n_head, T);
            ggml_tensor * tk = ggml_new_tensor_3d(ctx, GGML_TYPE_F32, D, n_head_kv, T);
            ggml_tensor * tv = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, (int64_t) D * n_head_kv, T);
            for (ggml_tensor * t : {tq, tk, tv}) ggml_set_input(t);
            attention_batch batch;
            make_attention_batch(batch, ctx, cfg, n_head_kv, done, T);
            ggml_tensor * out = build_attention(ctx, gf, cache, 0, batch, rope, tq, tk, tv, cfg.kq_scale);
            ggml_set_output(out);
            ggml_build_forward_expand(gf, out);
            runner.check_placement(gf, "attention_probe");
            runner.allocate(gf, "attention_probe");
            ggml_backend_tensor_set(tq, q.data() + (size_t) done * n_head * D, 0, ggml_nbytes(tq));
            ggml_backend_tensor_set(tk, k.data() + (size_t) done * n_head_kv * D, 0, ggml_nbytes(tk));
            ggml_backend_tensor_set(tv, v.data() + (size_t) done * n_head_kv * D, 0, ggml_nbytes(tv));
            set_attention_batch_inputs(batch, done);
            runner.compute(gf, "attention_probe");
            ggml_backend_tensor_get(out, result.data() + (size_t) done * n_head * D, 0, ggml_nbytes(out));
            cache.n_past += T;
            done += T;
        }
    }
    auto arr = to_array(std::move(result), n, (int64_t) n_head * D);
    return arr.reshape({(py::ssize_t) n, (py::ssize_t) n_head, (py::ssize_t) D});
}

}  // namespace

PYBIND11_MODULE(_engine, m) {
    m.doc() = "pyselfextend's C++ engine (GGUF llama-family inference on ggml).";
    py::register_exception<eval_aborted>(m, "EvalAborted", PyExc_RuntimeError);
    py::register_exception<not_enough_memory>(m, "NotEnoughMemory", PyExc_MemoryError);
    m.attr("__version__") = PYSELFEXTEND_VERSION;
    m.def("set_verbose", &set_verbose_logging, py::arg("verbose"),
          "Show all libllama/ggml log messages on stderr (default: errors only).");
    set_verbose_logging(false);

    py::class_<gguf_model, std::shared_ptr<gguf_model>>(m, "Model", "A GGUF model file, validated and memory-mapped.")
        .def(py::init([](const std::string & path, const std::string & device) {
                 return std::shared_ptr<gguf_model>(load_gguf_model(path, resolve_devices(device)));
             }),
             py::arg("path"), py::arg("device") = "cpu", py::call_guard<py::gil_scoped_release>(),
             "Loads path for device (devices.h: 'auto', 'cpu', 'vulkan', 'vulkan:1', 'rpc:HOST:PORT,...').")
        .def_property_readonly("devices", [](const gguf_model & g) {
            std::vector<std::string> out;
            for (ggml_backend_dev_t d : g.devices) out.push_back(device_spec(d));
            return out;
        }, "Where the layers run, in order (several RPC servers split them evenly).")
        .def_property_readonly("path", [](const gguf_model & g) { return g.path; })
        .def_property_readonly("arch", [](const gguf_model & g) { return g.hp.arch; })
        .def_property_readonly("name", [](const gguf_model & g) { return g.hp.name; })
        .def_property_readonly("n_vocab", [](const gguf_model & g) { return g.hp.n_vocab; })
        .def_property_readonly("n_ctx_train", [](const gguf_model & g) { return g.hp.n_ctx_train; })
        .def_property_readonly("n_embd", [](const gguf_model & g) { return g.hp.n_embd; })
        .def_property_readonly("n_layer", [](const gguf_model & g) { return g.hp.n_layer; })
        .def_property_readonly("n_head", [](const gguf_model & g) { return g.hp.n_head; })
        .def_property_readonly("n_head_kv", [](const gguf_model & g) { return g.hp.n_head_kv; })
        .def_property_readonly("head_dim", [](const gguf_model & g) { return g.hp.head_dim; })
        .def_property_readonly("n_ff", [](const gguf_model & g) { return g.hp.n_ff; })
        .def_property_readonly("rope_freq_base", [](const gguf_model & g) { return g.hp.rope_freq_base; })
        .def_property_readonly("rope_mode", [](const gguf_model & g) {
            return std::string(g.hp.rope_mode == GGML_ROPE_TYPE_NEOX ? "neox" : "normal");
        })
        .def_property_readonly("file_size", [](const gguf_model & g) { return g.file_size; })
        .def_property_readonly("n_params", &gguf_model::n_params)
        .def_property_readonly("weight_types", &gguf_model::weight_types);

    py::class_<engine>(m, "Engine", "A model with its KV cache and CPU compute threads.")
        .def(py::init([](std::shared_ptr<gguf_model> model, int64_t n_ctx, int64_t n_batch, int64_t n_threads,
                         const std::string & cache_type, int64_t group_size, int64_t window, const std::string & path,
                         const std::string & rope_scaling, float rope_factor, bool adaptive_threads, bool reuse_graphs) {
                 engine_params p;
                 using rs = engine_params::rope_scaling;
                 if (rope_scaling != "none" && rope_scaling != "linear" && rope_scaling != "yarn") {
                     throw std::invalid_argument("rope_scaling must be 'none', 'linear' or 'yarn', got '" + rope_scaling + "'");
                 }
                 p.scaling = rope_scaling == "linear" ? rs::linear : rope_scaling == "yarn" ? rs::yarn : rs::none;
                 p.rope_factor = rope_factor;
                 p.group_size = narrow("group_size", group_size);
                 p.window = narrow("window", window);
                 using pc = engine_params::path_choice;
                 if (path != "auto" && path != "fused" && path != "portable") {
                     throw std::invalid_argument("attention_path must be 'auto', 'fused' or 'portable', got '" + path + "'");
                 }
                 p.path = path == "auto" ? pc::automatic : path == "fused" ? pc::fused : pc::portable;
                 p.n_ctx = narrow("n_ctx", n_ctx);
                 p.n_batch = narrow("n_batch", n_batch);
                 p.n_threads = narrow("n_threads", n_threads);
                 p.cache_type = kv_cache::type_from_name(cache_type);
                 p.adaptive_threads = adaptive_threads;
                 p.reuse_graphs = reuse_graphs;
                 return new engine(std::move(model), p);
             }),
             py::arg("model"), py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"), py::arg("cache_type") = "f16",
             py::arg("group_size") = 1, py::arg("window") = 0, py::arg("attention_path") = "auto",
             py::arg("rope_scaling") = "none", py::arg("rope_factor") = 1.0f, py::arg("adaptive_threads") = true,
             py::arg("reuse_graphs") = true)
        .def("eval",
             [](engine & e, py::object tokens, bool all_logits, py::object progress) {
                 std::vector<int32_t> ids = to_tokens(tokens);
                 const int64_t n = (int64_t) ids.size();
                 return eval_released([&](const progress_fn & fn) { return e.eval(ids, all_logits, fn); },
                                      e.model().hp.n_vocab, n, all_logits, progress);
             },
             py::arg("tokens"), py::arg("all_logits") = false, py::arg("progress") = py::none())
        .def("reset", &engine::reset)
        .def("truncate", [](engine & e, int64_t n) { e.truncate(narrow("n", n)); }, py::arg("n"))
        .def("read_state",
             [](const engine & e, int64_t n64) {
                 const int32_t n = narrow("n", n64);
                 if (n < 0 || n > e.n_past()) {
                     throw std::invalid_argument("read_state(" + std::to_string(n) + "): the cache holds " +
                                                 std::to_string(e.n_past()) + " tokens");
                 }
                 py::bytes out(nullptr, e.state_bytes(n));  // filled in place: states are hundreds of MB
                 uint8_t * dst = (uint8_t *) PyBytes_AsString(out.ptr());
                 {
                     py::gil_scoped_release release;  // the new bytes object is not shared yet
                     e.read_state(n, dst);
                 }
                 return out;
             },
             py::arg("n"), "The first n cached tokens' K and V rows, every layer.")
        .def("write_state",
             [](engine & e, int32_t n, py::buffer data) {
                 py::buffer_info info = data.request();
                 py::gil_scoped_release release;
                 e.write_state(n, (const uint8_t *) info.ptr, (size_t) (info.size * info.itemsize));
             },
             py::arg("n"), py::arg("data"), "Replaces the cache with n tokens' K and V rows (from read_state).")
        .def("abort", &engine::abort)
        .def("_capture",
             [](engine & e, py::object tokens, const std::vector<std::string> & names) {
                 std::vector<int32_t> ids = to_tokens(tokens);
                 std::vector<std::vector<float>> got;
                 {
                     py::gil_scoped_release release;
                     got = e.capture(ids, names);
                 }
                 py::list out;
                 for (auto & v : got) out.append(py::array_t<float>((py::ssize_t) v.size(), v.data()));
                 return out;
             },
             py::arg("tokens"), py::arg("names"),
             "Test hook: appends tokens as one batch; copies of the named graph tensors (q-L, k-L, v-L, kqv_out-L).")
        .def("set_n_threads", &engine::set_n_threads)
        .def_property_readonly("n_past", &engine::n_past)
        .def_property_readonly("n_ctx", [](const engine & e) { return e.params().n_ctx; })
        .def_property_readonly("n_batch", [](const engine & e) { return e.params().n_batch; })
        .def_property_readonly("cache_bytes", &engine::cache_bytes)
        .def_property_readonly("compute_bytes", &engine::compute_bytes)
        .def_property_readonly("group_size", [](const engine & e) { return e.params().group_size; })
        .def_property_readonly("window", [](const engine & e) { return e.params().window; });
    m.def("_attention_probe", &attention_probe, py::arg("q"), py::arg("k"), py::arg("v"), py::arg("group_size"),
          py::arg("window"), py::arg("n_batch"), py::arg("cache_type") = "f32", py::arg("attention_path") = "fused",
          py::arg("freq_base") = 10000.0f, py::arg("n_threads") = 2, py::arg("decode_tail") = 0,
          py::arg("rope_mode") = "normal", py::arg("device") = "cpu", py::call_guard<py::gil_scoped_release>(),
          "Test hook: the attention seam alone, over q, k, v of shape [n, heads, D] (not rotated).");
    m.def("_quantize", &quantize_model, py::arg("src"), py::arg("dst"), py::arg("type"), py::arg("n_threads") = 2,
          py::arg("pure") = false, py::call_guard<py::gil_scoped_release>(),
          "Test hook: src requantized to a weight type by libllama's llama_model_quantize, written to dst.");
    m.attr("_quantize_types") = quantize_types();
    m.def("_threads_that_can_run", &threads_that_can_run, py::arg("n_threads"),
          "Test hook: compute threads that can run now, of n_threads (fewer while other processes keep cores busy).");
    m.def("check_selfextend",
          [](int64_t n_ctx, int64_t n_ctx_train, int64_t group_size, int64_t window) {
              check_selfextend(narrow("n_ctx", n_ctx), narrow("n_ctx_train", n_ctx_train),
                               narrow("group_size", group_size), narrow("window", window));
          },
          py::arg("n_ctx"), py::arg("n_ctx_train"), py::arg("group_size"), py::arg("window"),
          "Raises ValueError when SelfExtend cannot run with these (see attention.h).");
    m.def("selfextend_usable_length", &selfextend_usable_length, py::arg("n_ctx_train"), py::arg("group_size"),
          py::arg("window"), "(L - W) * G + W: the longest sequence SelfExtend keeps within the trained context L.");

    py::class_<vocab>(m, "Vocab", "The model's tokenizer and chat template, through libllama.")
        .def(py::init<const std::string &>(), py::arg("path"), py::call_guard<py::gil_scoped_release>())
        .def("tokenize", &vocab::tokenize, py::arg("text"), py::arg("add_special"), py::arg("parse_special"))
        .def("detokenize", [](const vocab & v, py::object ids, bool render_special) {
                 return py::bytes(v.detokenize(to_tokens(ids), render_special));
             }, py::arg("ids"), py::arg("render_special") = false)
        .def("token_to_piece", [](const vocab & v, int32_t id, bool render_special) {
                 return py::bytes(v.token_to_piece(id, render_special));
             }, py::arg("id"), py::arg("render_special") = false)
        .def("is_eog", &vocab::is_eog)
        .def_property_readonly("n_vocab", &vocab::n_vocab)
        .def_property_readonly("bos", &vocab::bos)
        .def_property_readonly("eos", &vocab::eos)
        .def_property_readonly("chat_template", &vocab::chat_template)
        .def("apply_chat_template", &vocab::apply_chat_template, py::arg("messages"), py::arg("add_assistant"),
             py::arg("template_override") = "");

    m.def("devices", [] {
              py::list out;
              for (const device_info & d : available_devices()) {
                  py::dict e;
                  e["name"] = d.name;
                  e["spec"] = d.spec;
                  e["description"] = d.description;
                  e["type"] = d.type;
                  e["memory_free"] = d.memory_free;
                  e["memory_total"] = d.memory_total;
                  out.append(e);
              }
              return out;
          }, "The devices this build can run on now (dicts: name, spec, description, type, memory_free, memory_total).");
    m.def("rpc_available", &rpc_available,
          "Whether this build has ggml's RPC backend (CMAKE_ARGS=\"-DGGML_RPC=ON\").");
    m.def("serve_rpc", &serve_rpc, py::arg("endpoint"), py::arg("n_threads"), py::call_guard<py::gil_scoped_release>(),
          "Serves this machine's CPU to ggml RPC clients at HOST:PORT until the process ends.");

    m.def("roofline", [](int64_t n_threads) {
              roofline r;
              {
                  py::gil_scoped_release released;
                  r = measure_roofline(n_threads);  // checks the thread count
              }
              py::dict d;
              d["fma_gflops"] = r.fma_gflops;
              d["read_gb_per_s"] = r.read_gb_per_s;
              d["n_threads"] = r.n_threads;
              return d;
          }, py::arg("n_threads"),
          "This machine's limits, measured with n_threads threads (about a second): f32 multiply-add "
          "throughput (fma_gflops) and streaming memory reads (read_gb_per_s).");
    m.def("cache_bytes_per_value", [](const std::string & cache_type) {
              const ggml_type t = kv_cache::type_from_name(cache_type);
              return (double) ggml_type_size(t) / (double) ggml_blck_size(t);
          }, py::arg("cache_type"), "Bytes one cached K or V value takes in a cache of this type (q8_0: 34/32).");
    m.def("reference_needs_flash_attn", &reference_needs_flash_attn, py::arg("cache_type"),
          "Whether llama.cpp runs a KV cache of this type only with flash attention on.");

    py::class_<reference_model>(m, "Reference", "llama.cpp's own forward pass, for parity tests and benchmarks.")
        .def(py::init<const std::string &, int32_t, int32_t, int32_t, bool, int32_t, bool, const std::string &>(),
             py::arg("path"), py::arg("n_ctx"), py::arg("n_batch"), py::arg("n_threads"), py::arg("flash_attn") = true,
             py::arg("grp_attn_n") = 1, py::arg("repack") = true, py::arg("cache_type") = "f16",
             py::call_guard<py::gil_scoped_release>())
        .def("eval",
             [](reference_model & r, py::object tokens, bool all_logits) {
                 std::vector<int32_t> ids = to_tokens(tokens);
                 const int64_t n = (int64_t) ids.size();
                 return eval_released([&](const progress_fn &) { return r.eval(ids, all_logits); }, r.n_vocab(), n,
                                      all_logits, py::none());
             },
             py::arg("tokens"), py::arg("all_logits") = false)
        .def("reset", &reference_model::reset)
        .def("truncate", &reference_model::truncate, py::arg("n"))
        .def_property_readonly("n_past", &reference_model::n_past);
}
