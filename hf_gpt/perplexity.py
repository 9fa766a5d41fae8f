"""Sliding-window perplexity of a causal LM, as in transformers' guide "Perplexity of fixed-length models".

A text longer than the model's context is scored in windows of `max_length` tokens that start every
`stride` tokens. Each window scores only the tokens no earlier window scored (its last `trg_len`
tokens); the ones before them are context. With `stride == max_length` the windows do not overlap
and each token sees only the context inside its own window; a smaller stride gives every scored
token at least `max_length - stride` tokens of context, which is closer to the true, fully
conditioned likelihood (and slower).

One difference from the guide's code: it weights each window's mean loss by `trg_len - 1`,
which is the number of scored tokens only when windows do not overlap (the first token of a window
has no prediction). Here the negative log-likelihoods are summed token by token and counted exactly,
in float64.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    n_tokens: int  # tokens scored: all but the first when windows overlap, all but each window's first otherwise
    n_windows: int
    stride: int
    max_length: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def context_length(model: nn.Module) -> int:
    """The longest input `model` takes: `config.n_positions` (GPT-2 names) or `max_position_embeddings`."""
    cfg = model.config
    for name in ("n_positions", "max_position_embeddings", "n_ctx"):
        if isinstance(getattr(cfg, name, None), int):
            return getattr(cfg, name)
    raise ValueError(f"{type(model).__name__}'s config gives no context length; pass max_length.")


@torch.no_grad()
def sliding_window_perplexity(
    model: nn.Module,
    input_ids: torch.Tensor,
    stride: int,
    max_length: int | None = None,
    progress: bool = False,
) -> PerplexityResult:
    """Perplexity of one token sequence under any causal LM (ours or transformers') whose forward takes
    `input_ids` (1, T) and returns `.logits` (1, T, vocab).

    Args:
        model: the language model; evaluated in eval mode (restored afterwards).
        input_ids: (N,) or (1, N) token ids of the whole text.
        stride: how far each window starts after the previous one; 1 <= stride <= max_length.
        max_length: window length (default: the model's context length).
        progress: log one line per window.
    """
    ids = input_ids.reshape(-1)  # (N,)
    N = ids.numel()
    max_length = max_length or context_length(model)
    if N < 2:
        raise ValueError(f"Perplexity needs at least 2 tokens, got {N}.")
    try:
        limit = context_length(model)
    except ValueError:
        limit = None  # a model that does not say; trust the caller
    if limit is not None and max_length > limit:
        raise ValueError(f"max_length {max_length} is longer than the model's context ({limit} positions).")
    if not 1 <= stride <= max_length:
        raise ValueError(f"stride must be between 1 and max_length ({max_length}), got {stride}.")
    # Only the logits of scored positions are needed: the LM head is a large share of the cost.
    keep_logits = "logits_to_keep" in inspect.signature(model.forward).parameters
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum, n_scored, n_windows, prev_end = 0.0, 0, 0, 0
    try:
        for begin in range(0, N, stride):
            end = min(begin + max_length, N)
            trg_len = end - prev_end  # tokens no earlier window scored; the rest of the window is context
            window = ids[begin:end][None].to(device)  # (1, L)
            L = end - begin
            first = max(L - trg_len, 1)  # first scored position in the window; position 0 has no prediction
            n_pred = L - first  # predictions come from positions first-1 .. L-2
            if keep_logits:
                logits = model(window, logits_to_keep=n_pred + 1).logits[0, :-1]  # (n_pred, vocab)
            else:
                logits = model(window).logits[0, first - 1 : L - 1]  # (n_pred, vocab)
            logp = torch.log_softmax(logits.float(), dim=-1)
            targets = window[0, first:L]  # (n_pred,)
            nll_sum += -logp.gather(-1, targets[:, None]).double().sum().item()
            n_scored += n_pred
            n_windows += 1
            prev_end = end
            if progress:
                logger.info(
                    "window %d: tokens %d-%d, running ppl %.4f", n_windows, begin, end, math.exp(nll_sum / n_scored)
                )
            if end == N:
                break
    finally:
        model.train(was_training)
    nll = nll_sum / n_scored
    return PerplexityResult(math.exp(nll), nll, n_scored, n_windows, stride, max_length)


__all__ = ["PerplexityResult", "sliding_window_perplexity", "context_length"]
