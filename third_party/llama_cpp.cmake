# Obtains the pinned llama.cpp / ggml source and adds its ggml and llama targets.
#
# The source is never committed. It comes from the llama-cpp-python sdist on PyPI, which carries
# llama.cpp under vendor/llama.cpp; the archive is checked against a pinned sha256 and unpacked in
# the build tree. Downloads are cached in PYSELFEXTEND_DOWNLOAD_CACHE (default ~/.cache/pyselfextend).
#
# Override: -DPYSELFEXTEND_LLAMA_CPP_DIR=/path/to/llama.cpp (or the environment variable of the same
# name) builds against a local checkout instead.

set(PYSELFEXTEND_LLAMA_CPP_PYPI_NAME    "llama-cpp-python")
set(PYSELFEXTEND_LLAMA_CPP_PYPI_VERSION "0.3.36")
set(PYSELFEXTEND_LLAMA_CPP_SHA256 "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e")

set(PYSELFEXTEND_LLAMA_CPP_DIR "$ENV{PYSELFEXTEND_LLAMA_CPP_DIR}" CACHE PATH
    "Local llama.cpp checkout to build against instead of the pinned sdist")

if (NOT PYSELFEXTEND_LLAMA_CPP_DIR)
    if (DEFINED ENV{PYSELFEXTEND_DOWNLOAD_CACHE})
        set(_cache "$ENV{PYSELFEXTEND_DOWNLOAD_CACHE}")
    else()
        set(_cache "$ENV{HOME}/.cache/pyselfextend/downloads")
    endif()
    set(_archive "${_cache}/llama_cpp_python-${PYSELFEXTEND_LLAMA_CPP_PYPI_VERSION}.tar.gz")

    set(_have FALSE)
    if (EXISTS "${_archive}")
        file(SHA256 "${_archive}" _sum)
        if (_sum STREQUAL PYSELFEXTEND_LLAMA_CPP_SHA256)
            set(_have TRUE)
        else()
            message(WARNING "pyselfextend: cached ${_archive} has the wrong sha256; fetching it again")
            file(REMOVE "${_archive}")
        endif()
    endif()

    if (NOT _have)
        find_package(Python COMPONENTS Interpreter REQUIRED)
        message(STATUS "pyselfextend: downloading ${PYSELFEXTEND_LLAMA_CPP_PYPI_NAME}==${PYSELFEXTEND_LLAMA_CPP_PYPI_VERSION} sdist")
        # --no-build-isolation: pip only reads the sdist's metadata; without it pip would first build
        # the sdist's own build requirements (cmake among them) from source.
        execute_process(
            COMMAND "${Python_EXECUTABLE}" -m pip download --no-deps --no-binary :all: --no-build-isolation
                    --disable-pip-version-check -d "${_cache}"
                    "${PYSELFEXTEND_LLAMA_CPP_PYPI_NAME}==${PYSELFEXTEND_LLAMA_CPP_PYPI_VERSION}"
            RESULT_VARIABLE _rc)
        if (NOT _rc EQUAL 0 OR NOT EXISTS "${_archive}")
            message(FATAL_ERROR "pyselfextend: could not download the llama.cpp source package "
                    "(${PYSELFEXTEND_LLAMA_CPP_PYPI_NAME}==${PYSELFEXTEND_LLAMA_CPP_PYPI_VERSION}). "
                    "Set PYSELFEXTEND_LLAMA_CPP_DIR to a local llama.cpp checkout to build offline.")
        endif()
        file(SHA256 "${_archive}" _sum)
        if (NOT _sum STREQUAL PYSELFEXTEND_LLAMA_CPP_SHA256)
            file(REMOVE "${_archive}")
            message(FATAL_ERROR "pyselfextend: sha256 mismatch for ${_archive}: got ${_sum}, "
                    "expected ${PYSELFEXTEND_LLAMA_CPP_SHA256}")
        endif()
    endif()

    set(_unpacked "${CMAKE_BINARY_DIR}/_deps/llama_cpp_python-${PYSELFEXTEND_LLAMA_CPP_PYPI_VERSION}")
    set(_stamp "${_unpacked}/.sha256")
    set(_stamped "")
    if (EXISTS "${_stamp}")
        file(READ "${_stamp}" _stamped)
    endif()
    if (NOT _stamped STREQUAL PYSELFEXTEND_LLAMA_CPP_SHA256)
        message(STATUS "pyselfextend: unpacking ${_archive}")
        file(REMOVE_RECURSE "${_unpacked}")
        file(ARCHIVE_EXTRACT INPUT "${_archive}" DESTINATION "${CMAKE_BINARY_DIR}/_deps"
             PATTERNS "llama_cpp_python-${PYSELFEXTEND_LLAMA_CPP_PYPI_VERSION}/vendor/llama.cpp")
        file(WRITE "${_stamp}" "${PYSELFEXTEND_LLAMA_CPP_SHA256}")
    endif()
    set(PYSELFEXTEND_LLAMA_CPP_SOURCE "${_unpacked}/vendor/llama.cpp")
else()
    set(PYSELFEXTEND_LLAMA_CPP_SOURCE "${PYSELFEXTEND_LLAMA_CPP_DIR}")
endif()

if (NOT EXISTS "${PYSELFEXTEND_LLAMA_CPP_SOURCE}/ggml/include/ggml.h")
    message(FATAL_ERROR "pyselfextend: ${PYSELFEXTEND_LLAMA_CPP_SOURCE} is not a llama.cpp source tree")
endif()
message(STATUS "pyselfextend: llama.cpp source: ${PYSELFEXTEND_LLAMA_CPP_SOURCE}")

# Static ggml and libllama, compiled position-independent and with hidden symbols so that they live
# inside our extension module and clash with no other copy of ggml in the same process.
set(BUILD_SHARED_LIBS OFF CACHE BOOL "" FORCE)
set(CMAKE_POSITION_INDEPENDENT_CODE ON)
set(CMAKE_C_VISIBILITY_PRESET hidden)
set(CMAKE_CXX_VISIBILITY_PRESET hidden)
set(CMAKE_VISIBILITY_INLINES_HIDDEN ON)
foreach(_opt LLAMA_BUILD_TESTS LLAMA_BUILD_TOOLS LLAMA_BUILD_EXAMPLES
             LLAMA_BUILD_SERVER LLAMA_BUILD_APP LLAMA_OPENSSL LLAMA_CURL GGML_BACKEND_DL)
    set(${_opt} OFF CACHE BOOL "" FORCE)
endforeach()
# llama.cpp's own benchmark, the baseline its users know: -DPYSELFEXTEND_LLAMA_BENCH=ON defines the
# target llama-bench (scripts/build-llama-bench.sh builds it; `pyselfextend bench --llama-bench`
# runs it). It needs llama.cpp's common library, which nothing else here uses.
option(PYSELFEXTEND_LLAMA_BENCH "Define llama.cpp's llama-bench target from the pinned source" OFF)
set(LLAMA_BUILD_COMMON ${PYSELFEXTEND_LLAMA_BENCH} CACHE BOOL "" FORCE)
# x86: build for the AVX2/FMA/F16C baseline rather than -march=native. Native builds on CPUs that
# report AMX pick ggml's AMX kernels, which crash where the OS or hypervisor does not grant AMX
# state (seen on this project's CI machines). -DGGML_NATIVE=ON restores native tuning.
if (CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64" AND NOT DEFINED CACHE{GGML_NATIVE})
    set(GGML_NATIVE OFF CACHE BOOL "" FORCE)
    foreach(_isa GGML_SSE42 GGML_AVX GGML_AVX2 GGML_FMA GGML_F16C GGML_BMI2)
        set(${_isa} ON CACHE BOOL "" FORCE)
    endforeach()
endif()
# ggml's RPC backend is small and needs nothing but sockets: every build can use llama.cpp RPC
# servers as devices (and serve as one), and CI has a non-CPU backend to test.
if (NOT DEFINED CACHE{GGML_RPC})
    set(GGML_RPC ON CACHE BOOL "" FORCE)
endif()
# ggml's own options (GGML_NATIVE, GGML_METAL, GGML_CUDA, GGML_VULKAN, ...) pass through untouched:
# -DGGML_CUDA=ON on the command line or in CMAKE_ARGS reaches ggml as it would reach llama.cpp.

add_subdirectory("${PYSELFEXTEND_LLAMA_CPP_SOURCE}" "${CMAKE_BINARY_DIR}/_deps/llama.cpp-build" EXCLUDE_FROM_ALL)
if (PYSELFEXTEND_LLAMA_BENCH)
    find_package(Threads REQUIRED)
    add_subdirectory("${PYSELFEXTEND_LLAMA_CPP_SOURCE}/tools/llama-bench" "${CMAKE_BINARY_DIR}/_deps/llama-bench-build"
                     EXCLUDE_FROM_ALL)
endif()
