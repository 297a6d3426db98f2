#include "host.h"

#include <stdexcept>
#include <string>

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <dirent.h>
#include <sched.h>
#include <string>
#include <unistd.h>

namespace pse {

#ifdef __linux__
// A cgroup v2 memory limit (a container's) less what the group already uses, or 0 if none.
static size_t cgroup_memory_left() {
    unsigned long long max = 0, current = 0;
    bool limited = false;
    if (FILE * f = std::fopen("/sys/fs/cgroup/memory.max", "r")) {
        limited = std::fscanf(f, "%llu", &max) == 1;  // "max" (no limit) does not parse
        std::fclose(f);
    }
    if (!limited) return 0;
    if (FILE * f = std::fopen("/sys/fs/cgroup/memory.current", "r")) {
        if (std::fscanf(f, "%llu", &current) != 1) current = 0;
        std::fclose(f);
    }
    return max > current ? (size_t) (max - current) : 1;
}
#endif

size_t available_memory() {
#ifdef __linux__
    const size_t cgroup = cgroup_memory_left();
    if (FILE * f = std::fopen("/proc/meminfo", "r")) {
        char line[256];
        unsigned long long kib = 0;
        bool found = false;
        while (std::fgets(line, sizeof line, f)) {
            if (std::sscanf(line, "MemAvailable: %llu kB", &kib) == 1) {
                found = true;
                break;
            }
        }
        std::fclose(f);
        if (found) return cgroup ? std::min(cgroup, (size_t) kib * 1024) : (size_t) kib * 1024;
    }
#endif
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGESIZE);
    return pages > 0 && page > 0 ? (size_t) pages * (size_t) page : 0;
}

std::string format_bytes(size_t bytes) {
    char buf[64];
    const double b = (double) bytes;
    if (b >= 1024.0 * 1024 * 1024) std::snprintf(buf, sizeof buf, "%.1f GiB", b / (1024.0 * 1024 * 1024));
    else std::snprintf(buf, sizeof buf, "%.1f MiB", b / (1024.0 * 1024));
    return buf;
}

void require_memory(size_t bytes, const std::string & what) {
    // A tenth stays free for the rest of the process and the system.
    const size_t avail = available_memory();
    if (avail != 0 && bytes > avail / 10 * 9) {
        throw not_enough_memory(what + " needs " + format_bytes(bytes) + " of memory, but this machine has " +
                                format_bytes(avail) + " available (of which pyselfextend uses at most 90%)");
    }
}

int32_t threads_that_can_run(int32_t n_threads) {
#ifdef __linux__
    if (n_threads <= 1) return 1;
    int running = 0;  // runnable threads on the machine, this one included
    if (FILE * f = std::fopen("/proc/loadavg", "r")) {
        double a, b, c;
        const int got = std::fscanf(f, "%lf %lf %lf %d/", &a, &b, &c, &running);
        std::fclose(f);
        if (got != 4) return n_threads;
    } else {
        return n_threads;
    }
    int ours = 0;  // of those, this process's (ggml's workers may still be spinning)
    if (DIR * d = opendir("/proc/self/task")) {
        while (dirent * e = readdir(d)) {
            if (e->d_name[0] == '.') continue;
            const std::string stat = std::string("/proc/self/task/") + e->d_name + "/stat";
            if (FILE * f = std::fopen(stat.c_str(), "r")) {
                char buf[512];
                const size_t n = std::fread(buf, 1, sizeof buf - 1, f);
                std::fclose(f);
                buf[n] = 0;
                const char * close = std::strrchr(buf, ')');  // the state follows the (name)
                if (close && close[1] == ' ' && close[2] == 'R') ++ours;
            }
        }
        closedir(d);
    }
    // The cores this process may run on (its affinity mask), not the machine's.
    cpu_set_t set;
    const long cores = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set) : sysconf(_SC_NPROCESSORS_ONLN);
    const int others = std::max(0, running - std::max(ours, 1));
    return std::max<int32_t>(1, std::min<int32_t>(n_threads, (int32_t) (cores - others)));
#else
    return n_threads;
#endif
}

void check_thread_count(int64_t n_threads) {
    if (n_threads < 1 || n_threads > 512) {
        throw std::invalid_argument("n_threads must be in [1, 512], got " + std::to_string(n_threads));
    }
}

}  // namespace pse
