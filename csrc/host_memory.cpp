#include "host_memory.h"

#include <cstdio>
#include <cstring>
#include <unistd.h>

namespace pse {

size_t available_memory() {
#ifdef __linux__
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
        if (found) return (size_t) kib * 1024;
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

}  // namespace pse
