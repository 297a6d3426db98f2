#include "roofline.h"

#include "host.h"

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

namespace pse {

namespace {

// Eight f32 lanes in GCC/Clang's vector extension: AVX2 registers on x86 (this file is built with
// the kernel's instruction set), two NEON registers on ARM.
typedef float v8f __attribute__((vector_size(32)));

double seconds_since(std::chrono::steady_clock::time_point t0) {
    return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Runs fn(thread index) on n threads at once and returns the wall time.
template <typename Fn>
double run_threads(int32_t n, Fn fn) {
    std::vector<std::thread> threads;
    const auto t0 = std::chrono::steady_clock::now();
    for (int32_t i = 0; i < n; ++i) threads.emplace_back(fn, i);
    for (std::thread & t : threads) t.join();
    return seconds_since(t0);
}

// 12 independent multiply-add chains: enough to cover the FMA latency on two FMA units (x86) or
// four (Apple M-series cores keep more in flight, so this may read low there).
float fma_chains(int64_t iterations, float seed) {
    v8f a[12];
    for (int i = 0; i < 12; ++i) a[i] = v8f{} + seed * (float) (i + 1);
    const v8f x = v8f{} + 0.999999f, y = v8f{} + 1e-7f;
    for (int64_t n = 0; n < iterations; ++n) {
#pragma GCC unroll 12
        for (int i = 0; i < 12; ++i) a[i] = a[i] * x + y;
    }
    v8f s = a[0];
    for (int i = 1; i < 12; ++i) s += a[i];
    return s[0] + s[7];
}

float read_sum(const v8f * p, size_t n) {
    v8f s0{}, s1{}, s2{}, s3{};
    for (size_t i = 0; i + 4 <= n; i += 4) {
        s0 += p[i];
        s1 += p[i + 1];
        s2 += p[i + 2];
        s3 += p[i + 3];
    }
    const v8f s = (s0 + s1) + (s2 + s3);
    return s[0] + s[7];
}

}  // namespace

roofline measure_roofline(int64_t n_threads_arg) {
    check_thread_count(n_threads_arg);  // 1 to 512: the narrowing below is safe
    const int32_t n_threads = (int32_t) n_threads_arg;
    roofline r;
    r.n_threads = n_threads;
    std::vector<float> sink(n_threads);  // results are kept, so the loops are not optimized away

    const int64_t iterations = 20'000'000;  // about 0.1 s per thread at 3 GHz
    for (int rep = 0; rep < 3; ++rep) {
        const double t = run_threads(n_threads, [&](int32_t i) { sink[i] += fma_chains(iterations, 1e-3f * (i + 1)); });
        r.fma_gflops = std::max(r.fma_gflops, (double) n_threads * iterations * 12 * 8 * 2 / t / 1e9);
    }

    // 512 MiB: well past any last-level cache. Touched once first, so that page faults are not timed.
    const size_t bytes = (size_t) 512 << 20;
    require_memory(bytes, "the memory bandwidth measurement");
    std::unique_ptr<v8f[]> buf(new v8f[bytes / sizeof(v8f)]);
    const size_t n = bytes / sizeof(v8f), per_thread = n / n_threads;
    run_threads(n_threads, [&](int32_t i) { std::memset((void *) (buf.get() + i * per_thread), 0, per_thread * sizeof(v8f)); });
    for (int rep = 0; rep < 3; ++rep) {
        const double t = run_threads(n_threads, [&](int32_t i) { sink[i] += read_sum(buf.get() + i * per_thread, per_thread); });
        r.read_gb_per_s = std::max(r.read_gb_per_s, (double) per_thread * n_threads * sizeof(v8f) / t / 1e9);
    }
    volatile float keep = 0;
    for (float s : sink) keep = keep + s;
    return r;
}

}  // namespace pse
