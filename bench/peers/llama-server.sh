#!/usr/bin/env bash
# Build llama.cpp's C++ `llama-server` from the llama.cpp sources inside the llama-cpp-python sdist (PyPI is
# reachable where GitHub may not be) and cache the binary, so every `bench/serve.py` run can include it.
#
#   bench/peers/llama-server.sh            # prints the binary's path (builds it once: 5-25 min)
#   LLAMA_CPP_PYTHON_VERSION=0.3.36 bench/peers/llama-server.sh
#
# The binary lands in ${OWNLLM_PEERS:-~/.cache/ownllm/peers}/llama-server-<version>/bin/llama-server.
set -euo pipefail

version="${LLAMA_CPP_PYTHON_VERSION:-0.3.36}"
root="${OWNLLM_PEERS:-$HOME/.cache/ownllm/peers}"
home="$root/llama-server-$version"
binary="$home/bin/llama-server"
if [[ -x "$binary" ]]; then
  echo "$binary"
  exit 0
fi
python="${PYTHON:-python3}"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "downloading the llama-cpp-python $version sdist" >&2
"$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work" >&2
tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
source_dir="$work/llama_cpp_python-$version/vendor/llama.cpp"
[[ -f "$source_dir/CMakeLists.txt" ]] || { echo "error: no llama.cpp sources in the sdist ($source_dir)" >&2; exit 2; }

flags=(-DCMAKE_BUILD_TYPE=Release -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
       -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=OFF)
if grep -qw amx_tile /proc/cpuinfo; then
  # GGML_NATIVE on AMX CPUs turns on the AMX backend, which is slower here than AVX-512 for these small models
  flags+=(-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_AVX512=ON)
else
  flags+=(-DGGML_NATIVE=ON)
fi
generator=()
command -v ninja >/dev/null && generator=(-G Ninja)
echo "building llama-server (cmake ${flags[*]})" >&2
cmake -S "$source_dir" -B "$work/build" "${generator[@]}" "${flags[@]}" >&2
cmake --build "$work/build" --target llama-server -j "$(nproc)" >&2
mkdir -p "$home/bin.tmp"
cp "$work/build/bin/llama-server" "$home/bin.tmp/"
rm -rf "$home/bin" && mv "$home/bin.tmp" "$home/bin"  # a half-copied binary is never taken for a built one
echo "$binary"
