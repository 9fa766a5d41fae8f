"""`hf-gpt eval-ppl MODEL FILE --stride N`: sliding-window perplexity of a causal LM on a text file.

MODEL is an hf_gpt folder, a folder written by transformers' GPT-2 / OpenAI-GPT classes, or a Hub id
(online only). By default it loads with `AutoModelForCausalLM`, so a GPT-2 folder is scored by
transformers' own GPT2LMHeadModel and an hf_gpt folder by ours; `--hf-gpt` loads any of them into
hf_gpt's GPTForCausalLM. The tokenizer comes from MODEL's folder, else the offline GPT-2 tokenizer.
The algorithm is `hf_gpt.perplexity.sliding_window_perplexity`. Prints one readable line and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
logger = logging.getLogger("hf_gpt.eval_ppl")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="hf-gpt eval-ppl", description=__doc__.split("\n\n")[0])
    p.add_argument("model", metavar="MODEL", help="hf_gpt or GPT-2 / OpenAI-GPT folder, or Hub id")
    p.add_argument("file", metavar="FILE", type=Path, help="UTF-8 text file, scored as one sequence")
    p.add_argument("--stride", type=int, help="tokens between window starts (default: half the window)")
    p.add_argument("--max-length", type=int, help="window length (default: the model's context, n_positions)")
    p.add_argument("--dtype", choices=list(DTYPES), default="float32", help="weights' dtype (default float32)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--hf-gpt", action="store_true", help="load MODEL into hf_gpt's GPTForCausalLM, converting it")
    p.add_argument("--progress", action="store_true", help="log the running perplexity after every window")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    logger.info("eval-ppl arguments: %s", json.dumps({k: str(v) for k, v in vars(args).items()}))
    try:
        result, model_class = evaluate(args)
    except (ValueError, OSError) as e:  # the user's input, not a bug: no traceback
        print(f"hf-gpt eval-ppl: error: {e}", file=sys.stderr)
        return 1
    print(
        f"perplexity {result.perplexity:.4f} ({model_class}; {result.n_tokens} tokens, {result.n_windows} windows "
        f"of {result.max_length}, stride {result.stride})"
    )
    print(json.dumps({"model": args.model, "file": str(args.file), "model_class": model_class, **result.to_dict()}))
    return 0


def evaluate(args: argparse.Namespace):
    """(PerplexityResult, name of the model class that computed it) for parsed arguments."""
    from transformers import AutoModelForCausalLM

    import hf_gpt  # registers our classes with AutoModelForCausalLM
    from hf_gpt.perplexity import context_length, sliding_window_perplexity
    from hf_gpt.tokenization import load_tokenizer

    text = args.file.read_text(encoding="utf-8")
    loader = hf_gpt.GPTForCausalLM if args.hf_gpt else AutoModelForCausalLM
    model = loader.from_pretrained(args.model, dtype=DTYPES[args.dtype]).to(args.device)
    tokenizer = load_tokenizer(args.model, model.config)
    if tokenizer is None:
        raise ValueError(
            f"{args.model} has no tokenizer and its vocabulary ({model.config.vocab_size}) is not GPT-2's."
        )
    tokenizer.model_max_length = sys.maxsize  # the whole file is one sequence; the windows do the cropping
    ids = torch.tensor(tokenizer(text)["input_ids"])
    max_length = args.max_length or context_length(model)
    stride = args.stride or max(1, max_length // 2)
    logger.info("%s: %d tokens, %s on %s", args.file, ids.numel(), type(model).__name__, args.device)
    start = time.perf_counter()
    result = sliding_window_perplexity(model, ids, stride=stride, max_length=max_length, progress=args.progress)
    logger.info("done in %.1fs", time.perf_counter() - start)
    return result, type(model).__name__


if __name__ == "__main__":
    sys.exit(main())
