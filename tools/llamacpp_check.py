"""Our generate() against llama.cpp on an `hf-gpt export` folder; driven by tools/llamacpp_check.sh.

    python tools/llamacpp_check.py make WORK    # project env: hf_gpt model + tokenizer, reference tokens/logits
    python tools/llamacpp_check.py check WORK   # llama env: WORK/model-f32.gguf through llama_cpp, compared

The two halves run in different Pythons (the llama env has no hf_gpt), so imports are inside each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

PROMPTS = ["To be, or not to be, that is the question:", "Hello, world! 1 + 1 = 2.", "The quick brown fox"]
NEW_TOKENS = 16
LOGIT_TOLERANCE = 5e-3  # measured 1.8e-3: llama.cpp's CPU GELU runs in fp16 (emulated in torch: 1.6e-3)


def make(work: Path) -> None:
    import numpy as np
    import torch

    from hf_gpt import GPTConfig, GPTForCausalLM, gpt2_tokenizer

    torch.manual_seed(0)
    config = GPTConfig(n_positions=128, n_embd=64, n_layer=2, n_head=2, initializer_range=0.1)
    GPTForCausalLM(config).save_pretrained(work / "hf_gpt_model")
    tokenizer = gpt2_tokenizer(model_max_length=config.n_positions)
    tokenizer.save_pretrained(work / "hf_gpt_model")

    model = GPTForCausalLM.from_pretrained(work / "hf_gpt_model").eval()  # what `hf-gpt export` reads
    reference, logits = [], []
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            logits.append(model(ids).logits[0, -1].float().numpy())
            out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
        if out.shape[1] - ids.shape[1] != NEW_TOKENS:  # stopped at <|endoftext|>: pick another seed or prompt
            raise SystemExit(f"our generate() stopped early on {prompt!r}")
        reference.append({"prompt": prompt, "ids": ids[0].tolist(), "tokens": out[0, ids.shape[1] :].tolist()})
    (work / "reference.json").write_text(json.dumps(reference))
    np.save(work / "reference_logits.npy", np.stack(logits))
    print(f"reference: {len(PROMPTS)} prompts x {NEW_TOKENS} greedy tokens from our generate() -> {work}")


def check(work: Path) -> int:
    import llama_cpp
    import numpy as np

    reference = json.loads((work / "reference.json").read_text())
    ref_logits = np.load(work / "reference_logits.npy")
    llm = llama_cpp.Llama(str(work / "model-f32.gguf"), n_ctx=128, n_threads=2, logits_all=False, verbose=False)

    failures, matched, total, max_diff = 0, 0, 0, 0.0
    print(f"{'prompt':<44} {'ids equal':>9} {'tokens equal':>12} {'max |dlogit|':>12}")
    for i, ref in enumerate(reference):
        ids = ref["ids"]
        ids_equal = llm.tokenize(ref["prompt"].encode(), add_bos=False) == ids
        # First step's logits: llm.scores is stale with logits_all=False in 0.3.36, so read the context's.
        llm.reset()
        llm.eval(ids)
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).copy()
        diff = float(np.abs(logits - ref_logits[i]).max())
        # Greedy from the same ids (not llama.cpp's tokenization), 16 new tokens.
        generator = llm.generate(ids, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True)
        tokens = [next(generator) for _ in range(NEW_TOKENS)]
        same = sum(a == b for a, b in zip(tokens, ref["tokens"], strict=True))
        matched, total, max_diff = matched + same, total + NEW_TOKENS, max(max_diff, diff)
        ok = ids_equal and tokens == ref["tokens"] and diff <= LOGIT_TOLERANCE
        failures += not ok
        print(f"{ref['prompt'][:44]!r:<44} {ids_equal!s:>9} {f'{same}/{NEW_TOKENS}':>12} {diff:>12.1e}")
        if tokens != ref["tokens"]:
            print(f"  ours:      {ref['tokens']}\n  llama.cpp: {tokens}")
    print(
        f"llama.cpp {llama_cpp.__version__}: greedy tokens equal {matched}/{total}, "
        f"max |logit difference| {max_diff:.1e} (logits up to {np.abs(ref_logits).max():.1f}, tolerance "
        f"{LOGIT_TOLERANCE:g}): {'PASS' if not failures else 'FAIL'}"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("make", "check"):
        sys.exit(__doc__)
    step, folder = sys.argv[1], Path(sys.argv[2])
    sys.exit(make(folder) if step == "make" else check(folder))
