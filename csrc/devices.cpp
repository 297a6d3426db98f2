#include "devices.h"

#include "host.h"

#include "ggml-rpc.h"

#include <arpa/inet.h>
#include <netdb.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cstring>
#include <fcntl.h>
#include <mutex>
#include <set>
#include <stdexcept>

namespace pse {

namespace {

std::string lower(std::string s) {
    for (char & c : s) c = (char) std::tolower((unsigned char) c);
    return s;
}

const char * type_name(enum ggml_backend_dev_type t) {
    switch (t) {
        case GGML_BACKEND_DEVICE_TYPE_CPU: return "cpu";
        case GGML_BACKEND_DEVICE_TYPE_GPU: return "gpu";
        case GGML_BACKEND_DEVICE_TYPE_IGPU: return "igpu";
        case GGML_BACKEND_DEVICE_TYPE_ACCEL: return "accel";
        default: return "other";
    }
}

// The registry's short name as users write it: "vulkan", "metal", "cuda" ("MTL" is Metal's).
std::string backend_key(ggml_backend_reg_t reg) {
    const std::string name = lower(ggml_backend_reg_name(reg));
    return name == "mtl" ? "metal" : name;
}

bool is_rpc(ggml_backend_dev_t dev) {
    return std::string(ggml_backend_reg_name(ggml_backend_dev_backend_reg(dev))) == "RPC";
}

// Devices of a registry that are not accelerators (ggml's CPU "extra" devices such as AMX).
std::vector<ggml_backend_dev_t> devices_of(ggml_backend_reg_t reg) {
    std::vector<ggml_backend_dev_t> out;
    for (size_t i = 0; i < ggml_backend_reg_dev_count(reg); ++i) {
        ggml_backend_dev_t dev = ggml_backend_reg_dev_get(reg, i);
        if (ggml_backend_dev_type(dev) != GGML_BACKEND_DEVICE_TYPE_ACCEL) out.push_back(dev);
    }
    return out;
}

std::string offered() {
    std::string s = "auto";
    for (const device_info & d : available_devices()) s += ", " + d.spec;
    if (rpc_available()) s += ", rpc:HOST:PORT";
    return s;
}

// ggml's RPC backend and one of its functions, or a clean error when the build has none.
template <typename Fn>
Fn rpc_function(const char * name) {
    if (!rpc_available()) throw std::invalid_argument("this build has no RPC backend; rebuild with CMAKE_ARGS=\"-DGGML_RPC=ON\"");
    return (Fn) ggml_backend_reg_get_proc_address(ggml_backend_reg_by_name("RPC"), name);
}

// "HOST:PORT" -> host, port; throws on anything else.
void split_endpoint(const std::string & endpoint, std::string & host, int & port) {
    const size_t colon = endpoint.rfind(':');
    const std::string digits = colon == std::string::npos ? "" : endpoint.substr(colon + 1);
    host = colon == std::string::npos ? "" : endpoint.substr(0, colon);
    const bool numeric = !digits.empty() && digits.size() <= 5 &&
                         std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; });
    port = numeric ? std::stoi(digits) : 0;
    if (host.empty() || host.find(':') != std::string::npos || port < 1 || port > 65535) {
        throw std::invalid_argument("an RPC server's address must be HOST:PORT (port 1-65535), got '" + endpoint + "'");
    }
}

// Connects and exchanges ggml RPC's greeting (command 14 with 24 bytes of transport
// capabilities, all zero: no transport upgrade; the reply is the protocol version and the
// server's capabilities), so that ggml's client, which aborts on failure, only meets a server
// that answers. Throws std::invalid_argument saying what went wrong.
// Returns the server's numeric address, "IP:PORT".
std::string probe_rpc_server(const std::string & endpoint) {
    std::string host;
    int port = 0;
    split_endpoint(endpoint, host, port);
    addrinfo hints = {};
    hints.ai_family = AF_INET;  // ggml's RPC client connects over IPv4
    hints.ai_socktype = SOCK_STREAM;
    addrinfo * found = nullptr;
    if (getaddrinfo(host.c_str(), std::to_string(port).c_str(), &hints, &found) != 0 || !found) {
        throw std::invalid_argument("RPC server " + endpoint + ": cannot resolve host '" + host + "'");
    }
    char ip[INET_ADDRSTRLEN] = "";
    inet_ntop(AF_INET, &((const sockaddr_in *) found->ai_addr)->sin_addr, ip, sizeof(ip));
    const std::string address = std::string(ip) + ":" + std::to_string(port);
    const int fd = socket(found->ai_family, found->ai_socktype, found->ai_protocol);
    if (fd < 0) {
        freeaddrinfo(found);
        throw std::invalid_argument("RPC server " + endpoint + ": cannot open a socket");
    }
    const auto fail = [&](const std::string & why) {
        close(fd);
        throw std::invalid_argument("RPC server " + endpoint + ": " + why);
    };
    // Connect with a timeout: non-blocking, then wait.
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    int rc = connect(fd, found->ai_addr, found->ai_addrlen);
    freeaddrinfo(found);
    if (rc != 0 && errno == EINPROGRESS) {
        pollfd p = {fd, POLLOUT, 0};
        rc = poll(&p, 1, 5000) == 1 ? 0 : -1;
        int err = 0;
        socklen_t len = sizeof(err);
        if (rc == 0 && (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len) != 0 || err != 0)) {
            errno = err;
            rc = -1;
        } else if (rc != 0) {
            errno = ETIMEDOUT;
        }
    }
    if (rc != 0) fail(std::string("cannot connect (") + std::strerror(errno) + "); is an RPC server running there?");
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_NONBLOCK);
    timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));

    constexpr size_t caps = 24;
    uint8_t request[1 + 8 + caps] = {14};
    const uint64_t request_size = caps;
    std::memcpy(request + 1, &request_size, 8);
    uint8_t reply[8 + 4 + caps];
    size_t got = 0;
    if (send(fd, request, sizeof(request), MSG_NOSIGNAL) != (ssize_t) sizeof(request)) fail("cannot send a greeting");
    bool timed_out = false;
    while (got < sizeof(reply)) {
        const ssize_t n = recv(fd, reply + got, sizeof(reply) - got, 0);
        if (n < 0 && errno == EINTR) continue;
        timed_out = n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK);
        if (n <= 0) break;
        got += (size_t) n;
    }
    uint64_t reply_size = 0;
    std::memcpy(&reply_size, reply, 8);
    if (got == 0 && timed_out) {
        fail("no answer within 5 s: an RPC server serves one client at a time, so it may be busy with another "
             "(or it is not an RPC server)");
    }
    if (got != sizeof(reply) || reply_size != 4 + caps) {
        fail("no answer in ggml RPC's protocol " + std::to_string(RPC_PROTO_MAJOR_VERSION) +
             ".x (a different server, or an rpc-server of another llama.cpp version)");
    }
    const int major = reply[8], minor = reply[9], patch = reply[10];
    if (major != RPC_PROTO_MAJOR_VERSION || minor > RPC_PROTO_MINOR_VERSION) {
        fail("speaks RPC protocol " + std::to_string(major) + "." + std::to_string(minor) + "." + std::to_string(patch) +
             ", this build " + std::to_string(RPC_PROTO_MAJOR_VERSION) + "." + std::to_string(RPC_PROTO_MINOR_VERSION) +
             " (use an rpc-server from the same ggml version, or pyselfextend rpc-server)");
    }
    close(fd);
    return address;
}

// ggml's scheduler takes at most 16 backends, the CPU's among them.
constexpr size_t max_devices = 15;

std::vector<ggml_backend_dev_t> rpc_devices(const std::string & endpoints) {
    auto add_server = rpc_function<ggml_backend_reg_t (*)(const char *)>("ggml_backend_rpc_add_server");
    // Addresses this process has connected to: ggml keeps one connection per address while
    // anything of it (a model's weights, an engine) lives, and the server, serving one client at a
    // time, would not answer a second greeting while it does.
    static std::mutex mutex;
    static std::set<std::string> connected;
    std::lock_guard<std::mutex> lock(mutex);
    std::vector<ggml_backend_dev_t> out;
    std::set<std::string> named;
    size_t start = 0;
    while (start <= endpoints.size()) {
        const size_t comma = std::min(endpoints.find(',', start), endpoints.size());
        const std::string endpoint = endpoints.substr(start, comma - start);
        const std::string address = connected.count(endpoint) ? endpoint : probe_rpc_server(endpoint);
        if (!named.insert(address).second) throw std::invalid_argument("RPC server " + endpoint + " is named twice");
        // By its numeric address: ggml's client keys its connections by the text it is given, and
        // two names of one server would open two connections, the second waiting forever.
        ggml_backend_reg_t server = add_server(address.c_str());
        connected.insert(endpoint);
        connected.insert(address);
        if (!server || ggml_backend_reg_dev_count(server) == 0) {
            throw std::invalid_argument("RPC server " + endpoint + " offers no device");
        }
        for (ggml_backend_dev_t dev : devices_of(server)) out.push_back(dev);
        start = comma + 1;
    }
    if (out.size() > max_devices) {
        throw std::invalid_argument("the RPC servers offer " + std::to_string(out.size()) + " devices; at most " +
                                    std::to_string(max_devices) + " can be used together");
    }
    return out;
}

}  // namespace

ggml_backend_dev_t cpu_device() { return ggml_backend_dev_by_type(GGML_BACKEND_DEVICE_TYPE_CPU); }

bool rpc_available() { return ggml_backend_reg_by_name("RPC") != nullptr; }

bool is_cpu(ggml_backend_dev_t dev) { return ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_CPU; }

std::string device_spec(ggml_backend_dev_t dev) {
    if (is_cpu(dev)) return "cpu";
    if (is_rpc(dev)) return "rpc:" + std::string(ggml_backend_dev_description(dev));
    ggml_backend_reg_t reg = ggml_backend_dev_backend_reg(dev);
    const std::vector<ggml_backend_dev_t> devs = devices_of(reg);
    const size_t index = (size_t) (std::find(devs.begin(), devs.end(), dev) - devs.begin());
    return backend_key(reg) + ":" + std::to_string(index);
}

std::vector<device_info> available_devices() {
    std::vector<device_info> out;
    for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
        ggml_backend_dev_t dev = ggml_backend_dev_get(i);
        if (ggml_backend_dev_type(dev) == GGML_BACKEND_DEVICE_TYPE_ACCEL || is_rpc(dev)) continue;
        device_info d;
        d.name = ggml_backend_dev_name(dev);
        d.spec = device_spec(dev);
        d.description = ggml_backend_dev_description(dev);
        d.type = type_name(ggml_backend_dev_type(dev));
        ggml_backend_dev_memory(dev, &d.memory_free, &d.memory_total);
        out.push_back(d);
    }
    return out;
}

std::vector<ggml_backend_dev_t> resolve_devices(const std::string & spec_in) {
    const std::string spec = lower(spec_in);
    if (spec == "auto") {
        for (size_t i = 0; i < ggml_backend_dev_count(); ++i) {
            ggml_backend_dev_t dev = ggml_backend_dev_get(i);
            const enum ggml_backend_dev_type t = ggml_backend_dev_type(dev);
            if ((t == GGML_BACKEND_DEVICE_TYPE_GPU || t == GGML_BACKEND_DEVICE_TYPE_IGPU) && !is_rpc(dev)) return {dev};
        }
        return {cpu_device()};
    }
    if (spec == "cpu") return {cpu_device()};
    if (spec.rfind("rpc:", 0) == 0) return rpc_devices(spec_in.substr(4));

    const size_t colon = spec.find(':');
    const std::string key = spec.substr(0, colon);
    size_t index = 0;
    if (colon != std::string::npos) {
        const std::string digits = spec.substr(colon + 1);
        if (digits.empty() || digits.size() > 4 ||
            !std::all_of(digits.begin(), digits.end(), [](char c) { return c >= '0' && c <= '9'; })) {
            throw std::invalid_argument("device '" + spec_in + "': expected NAME or NAME:INDEX; this build offers " + offered());
        }
        index = (size_t) std::stoi(digits);
    }
    for (size_t i = 0; i < ggml_backend_reg_count(); ++i) {
        ggml_backend_reg_t reg = ggml_backend_reg_get(i);
        if (backend_key(reg) != key || key == "rpc") continue;
        const std::vector<ggml_backend_dev_t> devs = devices_of(reg);
        if (index >= devs.size()) {
            throw std::invalid_argument("device '" + spec_in + "': the " + ggml_backend_reg_name(reg) + " backend has " +
                                        std::to_string(devs.size()) + " device(s); this build offers " + offered());
        }
        return {devs[index]};
    }
    const bool known = key == "metal" || key == "vulkan" || key == "cuda" || key == "hip" || key == "sycl";
    std::string flag = key == "metal" ? "GGML_METAL" : key == "vulkan" ? "GGML_VULKAN" : key == "cuda" ? "GGML_CUDA"
                     : key == "hip" ? "GGML_HIP" : "GGML_SYCL";
    throw std::invalid_argument("device '" + spec_in + "' is not available in this build" +
                                (known ? " (rebuild with CMAKE_ARGS=\"-D" + flag + "=ON\")" : std::string()) +
                                "; it offers " + offered());
}

void require_device_memory(ggml_backend_dev_t dev, size_t bytes, const std::string & what) {
    if (is_cpu(dev)) return require_memory(bytes, what);
    size_t free = 0, total = 0;
    ggml_backend_dev_memory(dev, &free, &total);
    if (total > 0 && bytes > free) {
        throw not_enough_memory(what + " needs " + format_bytes(bytes) + ", but " + device_spec(dev) + " has " +
                                format_bytes(free) + " free");
    }
}

void serve_rpc(const std::string & endpoint, int n_threads) {
    std::string host;
    int port = 0;
    split_endpoint(endpoint, host, port);
    in_addr parsed;
    if (inet_pton(AF_INET, host.c_str(), &parsed) != 1) {
        throw std::invalid_argument("an RPC server listens on a numeric IPv4 address (127.0.0.1, 0.0.0.0, ...), not '" +
                                    host + "'");
    }
    auto start = rpc_function<void (*)(const char *, const char *, size_t, size_t, ggml_backend_dev_t *)>(
        "ggml_backend_rpc_start_server");
    ggml_backend_dev_t cpu = cpu_device();
    start(endpoint.c_str(), nullptr, (size_t) n_threads, 1, &cpu);  // returns only if it cannot listen
    throw std::runtime_error("cannot serve RPC at " + endpoint + " (is the port in use?)");
}

}  // namespace pse
