#!/usr/bin/env bash
# Build the llama.cpp peer (vendored in the llama-cpp-python sdist) once, outside the repo.
# Usage: benchmarks/build_peer.sh [VERSION]   -> prints the bin path on its last line.
set -euo pipefail

VERSION="${1:-0.3.36}"  # newest llama-cpp-python on PyPI when pinned (2026-11-26)
ROOT="${ORTLLM_PEER_ROOT:-$HOME/.cache/ortllm/peer}"
DEST="$ROOT/llama.cpp-$VERSION"
BIN="$DEST/bin"
TARGETS=(llama-bench llama-server llama-quantize llama-perplexity)
PIP="${PIP:-$(dirname "$0")/../.venv/bin/pip}"
[ -x "$PIP" ] || PIP="python3 -m pip"

echo "llama-cpp-python version: $VERSION"

# x86 extensions on only where this CPU has them (a build with one it lacks dies with SIGILL: AVX-VNNI
# on this AMD EPYC; AMX on Xeons that advertise it inside VMs that fault on it, so AMX stays off).
has() { grep -qw "$1" /proc/cpuinfo 2>/dev/null && echo ON || echo OFF; }
FLAGS=(-DGGML_NATIVE=OFF -DGGML_AVX512="$(has avx512f)" -DGGML_AVX512_VNNI="$(has avx512_vnni)"
  -DGGML_AVX512_BF16="$(has avx512_bf16)" -DGGML_AVX512_VBMI="$(has avx512vbmi)" -DGGML_AVX_VNNI="$(has avx_vnni)"
  -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF -DLLAMA_CURL=OFF -DCMAKE_BUILD_TYPE=Release)
echo "cmake flags: ${FLAGS[*]}"

built=1
for t in "${TARGETS[@]}"; do [ -x "$BIN/$t" ] || built=0; done
[ "$(cat "$BIN/FLAGS" 2>/dev/null)" = "${FLAGS[*]}" ] || built=0  # built for other flags: rebuild
if [ "$built" = 1 ] && [ -f "$BIN/convert_hf_to_gguf.py" ] && [ -d "$BIN/conversion" ] && [ -d "$BIN/pydeps" ]; then
  echo "already built"
  echo "$BIN"
  exit 0
fi

# Build tools come from Debian.
missing=()
for tool in cmake g++ make; do command -v "$tool" >/dev/null || missing+=("$tool"); done
if [ "${#missing[@]}" -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  $SUDO apt-get update -q && $SUDO apt-get install -y -q cmake g++ make
fi

mkdir -p "$ROOT/src"
SDIST_DIR="$ROOT/src/sdist-$VERSION"
if ! ls "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz >/dev/null 2>&1; then
  mkdir -p "$SDIST_DIR"
  # --no-binary on the package only: with :all: pip also builds scikit-build-core's own build deps from source.
  $PIP download --no-deps --no-binary llama-cpp-python --dest "$SDIST_DIR" "llama-cpp-python==$VERSION"
fi
SRC="$ROOT/src/llama_cpp_python-$VERSION"
[ -d "$SRC" ] || tar -xzf "$SDIST_DIR"/llama_cpp_python-"$VERSION".tar.gz -C "$ROOT/src"
LLAMA="$SRC/vendor/llama.cpp"

# GGML_NATIVE=OFF: -march=native enables AMX where advertised, which some VMs fault on (SIGILL).
cmake -S "$LLAMA" -B "$LLAMA/build" "${FLAGS[@]}" -DBUILD_SHARED_LIBS=OFF
cmake --build "$LLAMA/build" -j "${JOBS:-2}" --target "${TARGETS[@]}"

mkdir -p "$BIN"
for t in "${TARGETS[@]}"; do cp "$LLAMA/build/bin/$t" "$BIN/"; done
cp "$LLAMA/convert_hf_to_gguf.py" "$BIN/"
# the converter imports its per-architecture `conversion` package and gguf-py from its own folder
rm -rf "$BIN/gguf-py" "$BIN/conversion"
cp -r "$LLAMA/gguf-py" "$BIN/gguf-py"
[ -d "$LLAMA/conversion" ] && cp -r "$LLAMA/conversion" "$BIN/conversion"
# the converter's one import ortllm's environment lacks, kept beside it (PYTHONPATH=gguf-py:pydeps)
rm -rf "$BIN/pydeps"
$PIP install -q --no-deps --target "$BIN/pydeps" "sentencepiece>=0.1.98,<0.3.0"
"$BIN/llama-bench" --help >/dev/null 2>&1 || { echo "built llama-bench does not run" >&2; exit 1; }
echo "${FLAGS[*]}" >"$BIN/FLAGS"
echo "$BIN"
