"""vLLM serving our own folders (issue 17): runs `tools/vllm_check.py` when vllm is importable, else skips.

vLLM is not part of the project's install (it brings its own transformers); `bash tools/vllm_check.sh` builds it
in a separate env and runs the same check there. Measured figures are in the README's serving section.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "vllm_check.py"


# Skipped at the test, not with a module-level importorskip: the test is still collected, so that `pytest
# tests/test_vllm.py` without vllm reports one skipped test (exit status 0) rather than none collected (status 5).
@pytest.mark.slow  # minutes: vLLM starts its engine for three models, offline and as a server
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed (tools/vllm_check.sh)")
def test_vllm_tokens_equal_generate(tmp_path):
    """GPT-1, GPT-2 and GPT-3 layouts saved by save_pretrained: vLLM's transformers backend, offline and through
    its OpenAI-compatible server, gives the greedy tokens our generate() gives (fp32)."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "0-1"}
    subprocess.run([sys.executable, str(TOOL), "make", str(tmp_path)], check=True, env=env, timeout=600)
    run = subprocess.run(
        [sys.executable, str(TOOL), "check", str(tmp_path)], capture_output=True, text=True, env=env, timeout=3600
    )
    assert run.returncode == 0 and "all tokens equal" in run.stdout, run.stdout + run.stderr[-3000:]
