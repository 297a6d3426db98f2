// This machine's limits, measured: how fast its cores multiply-add and how fast they read memory.
// `pyselfextend bench` reports every engine's attention against them (how far from the limit).
#pragma once

#include <cstdint>

namespace pse {

struct roofline {
    double fma_gflops = 0;       // f32 multiply-adds, counted as 2 FLOP each, over all threads
    double read_gb_per_s = 0;    // streaming reads of a buffer far larger than the caches
    int32_t n_threads = 0;
};

// Measures both with n_threads threads (about a second): the best of a few repetitions, since the
// machine may be busy with other work.
roofline measure_roofline(int64_t n_threads);

}  // namespace pse
