"""Speed and memory helpers `modeling_gpt.py` uses behind its standard interface (issue 5).

- `causal_lm_loss` / `LinearCrossEntropy`: the training loss straight from the final hidden states, without
  keeping (B, T, vocab) logits.
- `recompute_in_backward`: rebuild a cheap elementwise result in backward instead of storing it.
- `one_row_matmuls`: PyTorch's own matmul kernels for one-row CPU decoding steps.

Each is checked against the plain computation in tests/test_model_core.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


@contextmanager
def one_row_matmuls(tokens: torch.Tensor | None) -> Iterator[None]:
    """On CPU, while the forward holds a single token (decoding at batch 1), use PyTorch's own matmul kernels
    instead of oneDNN's: for one row, its bf16 matrix-vector kernel streams the weights about twice as fast
    (measured on the project's machine; fp32 goes through the same BLAS either way, bit for bit). For more
    rows oneDNN is the faster one, so it stays."""
    # (`is_compiling` first: a traced graph must not branch on the number of rows)
    one_row = (
        not torch.compiler.is_compiling()
        and tokens is not None
        and tokens.device.type == "cpu"
        and tokens.shape[:2].numel() == 1
    )
    if not one_row or not torch.backends.mkldnn.enabled:
        yield
        return
    torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = True


@contextmanager
def recompute_in_backward(out: torch.Tensor, recompute: Callable[[], torch.Tensor]) -> Iterator[None]:
    """Ops run inside that keep `out` (or a view of it) for backward keep the recipe `recompute` instead,
    and call it when backward needs `out`. For cheap elementwise results whose inputs backward keeps
    anyway (the MLP's activation, the dropped-out attention probabilities): the block then stores one
    (B, T, 4C) or (B, nh, T, Tk) tensor less."""
    if not out.requires_grad or torch.compiler.is_compiling():
        yield
        return
    key = (out.data_ptr(), out.numel())  # not `out` itself, which must be free to go

    def pack(t: torch.Tensor):
        return (recompute, t.shape) if (t.data_ptr(), t.numel()) == key else t

    def unpack(t):
        return t[0]().view(t[1]) if isinstance(t, tuple) else t

    with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
        yield


# `LinearCrossEntropy` makes fp32 logits LOSS_CHUNK_ELEMENTS at a time (64 MiB), and keeps their gradient for
# up to GRAD_BLOCK_ELEMENTS logits (256 MiB in bf16) before turning it into the gradients of h and weight.
LOSS_CHUNK_ELEMENTS = 2**24
GRAD_BLOCK_ELEMENTS = 2**27


class LinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `h @ weight.T` against `targets`, without keeping (N, vocab) fp32 logits.

    The training loss of a 50k-token vocabulary is dominated by memory, not arithmetic: the usual path
    keeps (N, vocab) logits, their fp32 copy, the log-softmax and its gradient, several hundred MB at
    GPT-2 small, and makes a few full passes over each. Here a chunk of rows' fp32 log-softmax lives only
    while its loss and its gradient (softmax - one-hot, as in any cross-entropy backward) are computed. The
    gradient is kept in the matmul dtype, as autocast's backward would have it, for a block of rows, and
    turned into the gradients of `h` and `weight` with one matmul each per block (a whole CPU batch is one
    block: large matmuls run fastest). All of it happens in forward; backward only scales the results.
    """

    @staticmethod
    def forward(ctx, h, weight, targets, denominator, compute_dtype, ignore_index=-100):
        # h (N, C), weight (V, C), targets (N,) with `ignore_index` for positions without a target.
        needs_grad_h, needs_grad_w = ctx.needs_input_grad[:2]
        with torch.autocast(h.device.type, enabled=False):
            x, w = h.to(compute_dtype), weight.to(compute_dtype)
            N, V = x.shape[0], w.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            grad_h = torch.empty_like(x) if needs_grad_h else None
            grad_w = None
            chunk = max(1, LOSS_CHUNK_ELEMENTS // V)  # rows of fp32 logits at a time
            block = chunk * max(1, GRAD_BLOCK_ELEMENTS // (chunk * V))  # rows of logit gradients at a time
            for b in range(0, N, block):
                grad_logits = None  # (n, V): d loss_sum / d logits of this block's rows
                if needs_grad_h or needs_grad_w:
                    grad_logits = torch.empty(min(block, N - b), V, dtype=compute_dtype, device=x.device)
                for c in range(b, min(b + block, N), chunk):
                    logp = torch.log_softmax(x[c : c + chunk] @ w.T, dim=-1, dtype=torch.float32)  # (n, V)
                    tc = targets[c : c + chunk]
                    ignored = tc == ignore_index
                    tc = tc.masked_fill(ignored, 0)
                    total -= logp.gather(1, tc[:, None]).squeeze(1).masked_fill(ignored, 0.0).sum()
                    if grad_logits is not None:
                        grad = logp.exp_()  # d(-log p_target)/d(logits) = softmax - one-hot
                        grad[torch.arange(len(tc), device=x.device), tc] -= 1.0
                        grad.masked_fill_(ignored[:, None], 0.0)  # (boolean indexing would sync a GPU)
                        grad_logits[c - b : c - b + chunk] = grad
                if needs_grad_h:
                    torch.mm(grad_logits, w, out=grad_h[b : b + block])  # (n, C)
                if needs_grad_w:
                    part = grad_logits.T @ x[b : b + block]  # (V, C)
                    grad_w = part if grad_w is None else grad_w.float() + part  # summed in fp32 over blocks
        ctx.save_for_backward(grad_h, grad_w, denominator)
        ctx.dtypes = h.dtype, weight.dtype
        return total / denominator

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, denominator = ctx.saved_tensors
        scale = grad_loss / denominator
        h_dtype, w_dtype = ctx.dtypes
        # Cast up first, then scaled in place: no second copy of a (vocab, C) gradient. (Where no cast is needed
        # that scales the saved tensor; a second backward through the graph then fails autograd's version check
        # rather than using scaled gradients.)
        grad_h = grad_h.to(h_dtype).mul_(scale) if grad_h is not None else None
        grad_w = grad_w.to(w_dtype).mul_(scale) if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None


def causal_lm_loss(
    h: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """Next-token loss from the final hidden states (B, T, C), without materialising (B, T, vocab) logits.

    Same value as transformers' `ForCausalLMLoss` on `h @ weight.T`: labels are shifted by one, `ignore_index`
    is skipped, the mean is over counted targets, or the sum over `num_items_in_batch` when given.
    """
    targets = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)  # (B*T,): token t predicts t+1
    if num_items_in_batch is None:
        denominator = (targets != ignore_index).sum()
    else:
        denominator = torch.as_tensor(num_items_in_batch, device=h.device)
    compute_dtype = torch.get_autocast_dtype(h.device.type) if torch.is_autocast_enabled(h.device.type) else h.dtype
    return LinearCrossEntropy.apply(h.flatten(0, 1), weight, targets, denominator, compute_dtype, ignore_index)
