#!/usr/bin/env bash
# llama.cpp, for real (issue 17, part 3): an `hf-gpt export` folder through llama.cpp.
#
#   bash tools/llamacpp_check.sh [WORK_DIR]
#
# 1. Builds llama-cpp-python in its own venv (LLAMACPP_ENV, default .llamacpp-env/, git-ignored).
#    It compiles llama.cpp: 12-21 minutes on 2 cores, done once, so this is not run in CI or pytest.
# 2. In the project's env (PROJECT_PY, default .venv/bin/python): a small GPT-2 style model, `hf-gpt export`,
#    and our generate()'s greedy tokens and first-step logits for three prompts.
# 3. convert_hf_to_gguf.py from the sdist's vendor/llama.cpp, f32, with the llama env's python.
# 4. In the llama env: llama_cpp.Llama greedy tokens, tokenizer ids and logits against ours; non-zero on a mismatch.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
LLAMA_ENV=${LLAMACPP_ENV:-.llamacpp-env}
PROJECT_PY=${PROJECT_PY:-.venv/bin/python}
WORK=${1:-$LLAMA_ENV/work}
SRC=$LLAMA_ENV/llama_cpp_python-$VERSION
PY=$LLAMA_ENV/bin/python

if ! "$PY" -c "import llama_cpp, gguf, torch, transformers" 2>/dev/null; then
    [ -x "$PY" ] || python3 -m venv "$LLAMA_ENV"
    "$PY" -m pip install -q --upgrade pip
    SDIST=$LLAMA_ENV/llama_cpp_python-$VERSION.tar.gz
    [ -f "$SDIST" ] || "$PY" -m pip download -q --no-binary :all: --no-deps -d "$LLAMA_ENV" "llama-cpp-python==$VERSION"
    [ -d "$SRC" ] || tar xzf "$SDIST" -C "$LLAMA_ENV"
    start=$(date +%s)
    CMAKE_BUILD_PARALLEL_LEVEL=$(nproc) nice -n 10 "$PY" -m pip install -q "$SDIST"
    echo "built llama-cpp-python $VERSION in $(( $(date +%s) - start )) s"
    # What convert_hf_to_gguf.py needs (its requirements file pins torch 2.11 from download.pytorch.org:
    # take the CPU torch the project uses instead, and the transformers it pins).
    "$PY" -m pip install -q torch==2.13.0 "transformers==4.57.6" "sentencepiece>=0.1.98,<0.3.0" \
        "protobuf>=4.21.0,<5.0.0" "$SRC/vendor/llama.cpp/gguf-py"
fi

mkdir -p "$WORK"
"$PROJECT_PY" tools/llamacpp_check.py make "$WORK"
"$(dirname "$PROJECT_PY")/hf-gpt" export "$WORK/hf_gpt_model" "$WORK/plain_gpt2"
"$PY" "$SRC/vendor/llama.cpp/convert_hf_to_gguf.py" "$WORK/plain_gpt2" --outtype f32 --outfile "$WORK/model-f32.gguf"
"$PY" tools/llamacpp_check.py check "$WORK"
