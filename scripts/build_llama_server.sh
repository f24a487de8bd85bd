#!/usr/bin/env bash
# Build llama.cpp's `llama-server` (an OpenAI-compatible server that is not ours) for the upstream tests.
#
# The source comes from PyPI only: the llama-cpp-python sdist vendors the whole llama.cpp tree
# (vendor/llama.cpp: the server, convert_hf_to_gguf.py, gguf-py). Only the `llama-server` target is built
# (not the Python binding, whose full source build is what ran for 20+ minutes here), portable
# (GGML_NATIVE=OFF: CI machines differ), static, without curl. Everything goes to a cache outside the
# repository, so a rerun with the tree already built prints its path and does nothing else:
#
#   ${XDG_CACHE_HOME:-$HOME/.cache}/ownllm/llama-server-<version>/
#       bin/llama-server    the server
#       src/                the vendored llama.cpp tree (scripts/hf_to_gguf.py runs its converter)
#       pylib/              the converter's own Python dependencies (not the project's environment)
#
# Usage: scripts/build_llama_server.sh            (JOBS=n for parallel compile jobs, default: all cores)
# Measured on the shared 2-core box (docs/BENCHMARKS.md): see "llama-server build".
set -euo pipefail

VERSION=0.3.16   # llama-cpp-python; its vendor/llama.cpp is llama.cpp commit 4227c9b. Keep in step with
                 # scripts/hf_to_gguf.py's LLAMA_CPP_VERSION.
SHA256=34ed0f9bd9431af045bb63d9324ae620ad0536653740e9bb163a2e1fcb973be6
# The converter imports mistral-common at its top (llama.cpp's requirements-convert_hf_to_gguf.txt); these
# are it and the packages that import needs that the project's environment does not have.
CONVERTER_DEPS=(mistral-common==1.8.3 pydantic-extra-types==2.10.5 pycountry==24.6.1 tiktoken==0.9.0
                sentencepiece==0.2.0)
PY="${PYTHON:-$(command -v python3)}"
if [ -z "${PYTHON:-}" ] && [ -x "$(dirname "$0")/../.venv/bin/python" ]; then PY="$(dirname "$0")/../.venv/bin/python"; fi

DEST="${XDG_CACHE_HOME:-$HOME/.cache}/ownllm/llama-server-$VERSION"
if [ -x "$DEST/bin/llama-server" ] && [ -f "$DEST/.complete" ]; then
    echo "$DEST/bin/llama-server"
    exit 0
fi
for tool in cmake g++; do
    command -v "$tool" >/dev/null || { echo "build_llama_server: $tool is missing (apt-get install cmake g++)" >&2; exit 1; }
done
GEN=(); command -v ninja >/dev/null && GEN=(-G Ninja)

WORK="$(mktemp -d "${TMPDIR:-/tmp}/llama-server-build.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
start=$(date +%s)
echo "[llama-server] downloading llama-cpp-python==$VERSION (sdist) from PyPI" >&2
"$PY" -m pip download -q --no-binary :all: --no-deps "llama-cpp-python==$VERSION" -d "$WORK" >&2
SDIST="$WORK/llama_cpp_python-$VERSION.tar.gz"
echo "$SHA256  $SDIST" | sha256sum -c --quiet - || { echo "build_llama_server: checksum mismatch for $SDIST" >&2; exit 1; }
tar -xzf "$SDIST" -C "$WORK"

rm -rf "$DEST" && mkdir -p "$DEST/bin"
mv "$WORK/llama_cpp_python-$VERSION/vendor/llama.cpp" "$DEST/src"
echo "[llama-server] configuring" >&2
cmake -S "$DEST/src" -B "$WORK/build" "${GEN[@]}" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_SERVER=ON \
    -DGGML_OPENMP=OFF >"$WORK/cmake.log" 2>&1 || { cat "$WORK/cmake.log" >&2; exit 1; }
echo "[llama-server] building the llama-server target (${JOBS:-$(nproc)} jobs; progress [n/N] below)" >&2
cmake --build "$WORK/build" --target llama-server -j "${JOBS:-$(nproc)}" >&2
cp "$WORK/build/bin/llama-server" "$DEST/bin/llama-server"
echo "[llama-server] installing the converter's Python dependencies into $DEST/pylib" >&2
"$PY" -m pip install -q --no-deps --target "$DEST/pylib" "${CONVERTER_DEPS[@]}" >&2
echo "$VERSION built in $(( $(date +%s) - start )) s" > "$DEST/.complete"
echo "[llama-server] $(cat "$DEST/.complete")" >&2
echo "$DEST/bin/llama-server"
