// What this machine can give us now: memory, and cores that other processes leave idle.
// Linux overcommits: a too-large cache would be granted and then killed by the OOM killer while
// it is zeroed, so sizes are checked before anything is allocated.
#pragma once

#include <cstddef>
#include <stdexcept>
#include <string>

namespace pse {

// Raised (Python: pyselfextend.NotEnoughMemory, a MemoryError) before an allocation that cannot fit.
struct not_enough_memory : std::runtime_error {
    using std::runtime_error::runtime_error;
};

// Bytes available without swapping: MemAvailable on Linux, physical memory elsewhere; 0 if unknown.
size_t available_memory();

// "1.5 GiB", "300.0 MiB": sizes in messages.
std::string format_bytes(size_t bytes);

// Throws not_enough_memory naming `what` and both sizes when `bytes` exceed 90% of available_memory().
void require_memory(size_t bytes, const std::string & what);

// How many of n_threads compute threads can run at once now: n_threads, less the cores that other
// processes' runnable threads occupy (Linux: /proc/loadavg less this process's own running
// threads), at least 1. ggml's threads meet at a barrier after every operation, so one thread
// waiting for a core stalls them all: with two busy processes on two cores, two threads decode
// 20-35x slower than one. Elsewhere n_threads.
int32_t threads_that_can_run(int32_t n_threads);

// The compute thread counts this package accepts, 1 to 512: throws std::invalid_argument otherwise.
void check_thread_count(int64_t n_threads);

}  // namespace pse
