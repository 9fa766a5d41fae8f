"""GPT-1's input transformations (Radford et al. 2018, sec. 3.3 and Figure 1), on the tokenizer side.

Every task becomes one or more token sequences that the pretrained model reads left to right, framed
by three tokens learned during fine-tuning: start `s`, delimiter `$` and extract `e` (the head reads
the final hidden state at `e`):

    classification   s text e                                   input_ids (B, T)
    entailment       s premise $ hypothesis e                   input_ids (B, T)
    similarity       s a $ b e  and  s b $ a e (both orders)    input_ids (B, 2, T): the head adds the two
    multiple choice  s context $ answer_k e  for each k         input_ids (B, K, T): softmax over the K

Truncation never touches the part that is judged (the hypothesis, the answer): when a sequence would
exceed `max_length`, the *context* (the classified text, the premise, the multiple-choice context) is cut
from the left, keeping the tokens nearest the delimiter / extract token. Similarity has no context and
no answer, so the longer passage is cut from the left until the pair fits ("longest first"). With
`truncate=False` an overlong example raises instead, and an answer that cannot fit even with an empty
context always raises.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

TASK_TYPES = ("classification", "entailment", "similarity", "multiple_choice")

# GPT-1's released code calls them _start_, _delimiter_ and _classify_; these follow GPT-2's <|...|> style.
START, DELIMITER, EXTRACT = "<|start|>", "<|delim|>", "<|extract|>"
TASK_TOKENS = (START, DELIMITER, EXTRACT)

# The columns each task type reads from a `datasets` row (see `training/tasks.py`).
TASK_COLUMNS = {
    "classification": ("text",),
    "entailment": ("premise", "hypothesis"),
    "similarity": ("text_a", "text_b"),
    "multiple_choice": ("context", "choices"),
}


@dataclass(frozen=True)
class TaskTokenIds:
    start: int
    delimiter: int
    extract: int
    pad: int


def add_task_tokens(tokenizer: PreTrainedTokenizerBase, model: PreTrainedModel | None = None) -> TaskTokenIds:
    """Add the start / delimiter / extract tokens (and a pad token if there is none) to `tokenizer`, and
    resize `model`'s embeddings to match. Idempotent: a tokenizer that has them already is unchanged.

    The new rows of the (tied) embedding are initialised by transformers' mean resizing; the LM head stays
    tied to the input embedding, so GPT-1's auxiliary LM loss also learns to predict the new tokens.
    """
    missing = [t for t in TASK_TOKENS if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        # GPT-2 has no pad token; padding is always masked out, so reusing end-of-text is the usual choice.
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
    ids = task_token_ids(tokenizer)
    if model is not None:
        if model.get_input_embeddings().num_embeddings < len(tokenizer):
            model.resize_token_embeddings(len(tokenizer))
        model.config.pad_token_id = ids.pad
        out = model.get_output_embeddings()
        if (
            model.config.tie_word_embeddings
            and out is not None
            and out.weight is not model.get_input_embeddings().weight
        ):
            raise RuntimeError("resizing the embeddings untied the LM head from the input embedding")
    return ids


def task_token_ids(tokenizer: PreTrainedTokenizerBase) -> TaskTokenIds:
    """The ids of the task tokens; raises if `add_task_tokens` has not been applied to this tokenizer."""
    vocab = tokenizer.get_vocab()
    missing = [t for t in TASK_TOKENS if t not in vocab]
    if missing or tokenizer.pad_token_id is None:
        raise ValueError(f"tokenizer lacks the task tokens {missing or ['pad']}: call add_task_tokens(tokenizer) first")
    return TaskTokenIds(vocab[START], vocab[DELIMITER], vocab[EXTRACT], tokenizer.pad_token_id)


class TaskEncoder:
    """Turns task examples into GPT-1's token sequences (lists of ids, unpadded; `TaskCollator` pads).

    Args:
        tokenizer: a tokenizer on which `add_task_tokens` has been called.
        max_length: the longest sequence produced (at most the model's `n_positions`).
        truncate: cut the context from the left when too long (see the module docstring); False raises.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int, truncate: bool = True) -> None:
        self.tokenizer = tokenizer
        self.ids = task_token_ids(tokenizer)
        if max_length < 4:
            raise ValueError(f"max_length must leave room for text and the task tokens, got {max_length}")
        self.max_length = max_length
        self.truncate = truncate

    def _tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fit_context(self, context: list[int], budget: int, what: str, kept: str) -> list[int]:
        """The last `budget` tokens of `context`, or an error naming what did not fit."""
        if budget < 1:
            raise ValueError(
                f"the {kept} alone needs more than max_length={self.max_length} tokens; nothing is truncated"
            )
        if len(context) <= budget:
            return context
        if not self.truncate:
            raise ValueError(
                f"the {what} has {len(context)} tokens but only {budget} fit in max_length={self.max_length} "
                "(pass truncate=True to cut it from the left)"
            )
        return context[len(context) - budget :]

    def classification(self, text: str) -> list[int]:
        """`s text e`."""
        s, e = self.ids.start, self.ids.extract
        body = self._fit_context(self._tokens(text), self.max_length - 2, "text", "task tokens")
        return [s, *body, e]

    def entailment(self, premise: str, hypothesis: str) -> list[int]:
        """`s premise $ hypothesis e`; only the premise is ever cut."""
        hyp = self._tokens(hypothesis)
        prem = self._fit_context(self._tokens(premise), self.max_length - 3 - len(hyp), "premise", "hypothesis")
        return [self.ids.start, *prem, self.ids.delimiter, *hyp, self.ids.extract]

    def similarity(self, text_a: str, text_b: str) -> list[list[int]]:
        """`[s a $ b e, s b $ a e]`: GPT-1 has no inherent order for a pair, so it reads both."""
        a, b = self._tokens(text_a), self._tokens(text_b)
        budget = self.max_length - 3
        if len(a) + len(b) > budget:
            if not self.truncate:
                raise ValueError(f"the pair has {len(a) + len(b)} tokens but only {budget} fit (pass truncate=True)")
            # Longest first: the longer passage loses tokens until it is no longer the longer one, then both
            # lose in turn; so the shorter keeps min(its length, half the budget) and the longer the rest.
            keep_short = min(len(a), len(b), budget // 2)
            keep_a, keep_b = (
                (budget - keep_short, keep_short) if len(a) >= len(b) else (keep_short, budget - keep_short)
            )
            a, b = a[len(a) - keep_a :], b[len(b) - keep_b :]
        s, d, e = self.ids.start, self.ids.delimiter, self.ids.extract
        return [[s, *a, d, *b, e], [s, *b, d, *a, e]]

    def multiple_choice(self, context: str, choices: Sequence[str]) -> list[list[int]]:
        """`s context $ answer_k e` for each choice; every choice sees the same (possibly cut) context."""
        answers = [self._tokens(c) for c in choices]
        longest = max(len(a) for a in answers)
        ctx = self._fit_context(self._tokens(context), self.max_length - 3 - longest, "context", "longest answer")
        s, d, e = self.ids.start, self.ids.delimiter, self.ids.extract
        return [[s, *ctx, d, *a, e] for a in answers]

    def __call__(self, task: str, example: dict[str, Any]) -> dict[str, Any]:
        """Encode one `datasets` row of `task` (columns as in `TASK_COLUMNS`) into {"input_ids": ...}."""
        if task not in TASK_TYPES:
            raise ValueError(f"unknown task type {task!r}; choose one of {TASK_TYPES}")
        method = getattr(self, task)
        return {"input_ids": method(*(example[c] for c in TASK_COLUMNS[task]))}


class TaskCollator:
    """Pads a list of encoded examples into tensors (right padding; the heads pool the last real token).

    Rows of `input_ids` may be flat (classification, entailment) or nested per view/choice (similarity,
    multiple choice); all sequences in the batch are padded to the longest. Labels become `long` for
    classification and `float` for regression (`regression=True`).
    """

    def __init__(self, pad_token_id: int, regression: bool = False) -> None:
        self.pad_token_id = pad_token_id
        self.regression = regression

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        rows = [f["input_ids"] for f in features]
        nested = isinstance(rows[0][0], list)
        seqs = [s for r in rows for s in r] if nested else rows
        T = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), T), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), T), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        if nested:
            K = len(rows[0])
            if any(len(r) != K for r in rows):
                raise ValueError("every example in a batch needs the same number of views / choices")
            ids, mask = ids.view(len(rows), K, T), mask.view(len(rows), K, T)  # (B, K, T)
        batch = {"input_ids": ids, "attention_mask": mask}
        if "label" in features[0] or "labels" in features[0]:
            labels = [f["labels"] if "labels" in f else f["label"] for f in features]
            batch["labels"] = torch.tensor(labels, dtype=torch.float if self.regression else torch.long)
        return batch


__all__ = [
    "TASK_TYPES",
    "TASK_COLUMNS",
    "TASK_TOKENS",
    "START",
    "DELIMITER",
    "EXTRACT",
    "TaskTokenIds",
    "add_task_tokens",
    "task_token_ids",
    "TaskEncoder",
    "TaskCollator",
]
