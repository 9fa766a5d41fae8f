"""Sentence embeddings from an hf_gpt model: the mean of the last hidden states over each text's tokens.

A causal model's last hidden state at token t has seen only tokens 0..t; averaging over all tokens gives
one vector per text that depends on all of it. The vectors are as good as the model's representations:
a language model trained only on next-token prediction gives usable but not tuned similarities.

Example:

    >>> from hf_gpt import GPTModel, gpt2_tokenizer
    >>> from hf_gpt.embeddings import embed
    >>> model = GPTModel.from_pretrained("path/to/folder")  # a GPTForCausalLM or task model works too
    >>> vectors = embed(model, gpt2_tokenizer(), ["To be, or not to be", "All the world's a stage"])
    >>> vectors.shape  # (2, n_embd), unit length: vectors @ vectors.T are cosine similarities
    torch.Size([2, 768])

`pipeline("feature-extraction", model=folder)` gives the per-token states these are the mean of.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from transformers import PreTrainedModel, PreTrainedTokenizerBase


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over the real tokens: hidden (B, T, C), attention_mask (B, T) with 1 for real tokens -> (B, C)."""
    if attention_mask is None:
        return hidden.mean(dim=1)
    weights = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


@torch.no_grad()
def embed(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    texts: str | Sequence[str],
    batch_size: int = 32,
    max_length: int | None = None,
    normalize: bool = True,
) -> torch.Tensor:
    """Mean-pooled embeddings of `texts`, (N, n_embd) float32 on the model's device (1-D for a single string).

    Args:
        model: a `GPTModel`, or any hf_gpt model with one inside (`GPTForCausalLM`, task heads); its
            `base_model` is run in eval mode (the caller's mode is restored).
        tokenizer: the model's tokenizer; no pad token is needed.
        texts: one string or a list of them.
        batch_size: texts per forward pass; texts of similar length are batched together.
        max_length: keep the first `max_length` tokens of each text (default and ceiling: `n_positions`).
        normalize: scale each vector to unit length, so dot products are cosine similarities.
    """
    single = isinstance(texts, str)
    texts = [texts] if single else list(texts)
    base = model.base_model
    limit = base.config.n_positions if max_length is None else min(max_length, base.config.n_positions)
    ids = tokenizer(texts, add_special_tokens=False, truncation=True, max_length=limit)["input_ids"]
    empty = [i for i, row in enumerate(ids) if not row]
    if empty:
        raise ValueError(f"texts {empty[:10]} have no tokens; an embedding needs at least one.")

    device = next(base.parameters()).device
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))  # similar lengths together: little padding
    out = torch.empty(len(ids), base.config.n_embd, dtype=torch.float32, device=device)
    was_training = base.training
    base.eval()
    try:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            T = max(len(ids[i]) for i in rows)
            input_ids = torch.zeros(len(rows), T, dtype=torch.long, device=device)  # right-padded with id 0
            mask = torch.zeros(len(rows), T, dtype=torch.long, device=device)
            for r, i in enumerate(rows):
                input_ids[r, : len(ids[i])] = torch.tensor(ids[i], device=device)
                mask[r, : len(ids[i])] = 1
            hidden = base(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, T, C)
            out[rows] = mean_pool(hidden.float(), mask)
    finally:
        base.train(was_training)
    if normalize:
        out = F.normalize(out, dim=-1)
    return out[0] if single else out


__all__ = ["embed", "mean_pool"]
