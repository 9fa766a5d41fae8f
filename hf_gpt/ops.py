"""Speed and memory helpers `modeling_gpt.py` uses behind its standard interface (issue 5).

- `causal_lm_loss` / `LinearCrossEntropy`: the training loss straight from the final hidden states, without
  keeping (B, T, vocab) logits.
- `recompute_in_backward`: rebuild a cheap elementwise result in backward instead of storing it.
- `one_row_matmuls`: PyTorch's own matmul kernels for one-row low-precision CPU decoding steps.
- `Linear` / `linear`: `nn.Linear` / `F.linear`, with faster kernels for fp32 training products and one-row products on CPU.
- `Dropout`: `nn.Dropout` with a faster mask on CPU.

Each is checked against the plain computation in tests/test_model_core.py.
"""

from __future__ import annotations

import platform
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

_ONE_ROW_LOCK = threading.Lock()
_one_row_steps = 0  # one-row steps in flight, in any thread, while oneDNN is off for them


@contextmanager
def one_row_matmuls(tokens: torch.Tensor | None, dtype: torch.dtype) -> Iterator[None]:
    """On CPU, while a low-precision (bf16, fp16) forward holds a single token (decoding at batch 1), use
    PyTorch's own matmul kernels instead of oneDNN's: for one row, its bf16 matrix-vector kernel streams the
    weights about twice as fast (measured on the project's machine). For more rows, and in fp32 (see
    `linear`), oneDNN is the faster one, so it stays.

    PyTorch chooses between the two by one process-wide flag (`torch.backends.mkldnn.enabled`), so oneDNN is off
    for every thread while any thread runs such a step: the flag goes back on when the last of them ends (not
    when the first does), and a flag the user turned off stays off."""
    global _one_row_steps
    # (`is_compiling` first: a traced graph must not branch on the number of rows)
    one_row = (
        not torch.compiler.is_compiling()
        and dtype in (torch.bfloat16, torch.float16)
        and tokens is not None
        and tokens.device.type == "cpu"
        and tokens.shape[:2].numel() == 1
    )
    if not one_row:
        yield
        return
    with _ONE_ROW_LOCK:
        ours = _one_row_steps > 0 or torch.backends.mkldnn.enabled  # else the user turned oneDNN off: leave it
        if ours:
            _one_row_steps += 1
            torch.backends.mkldnn.enabled = False
    try:
        yield
    finally:
        if ours:
            with _ONE_ROW_LOCK:
                _one_row_steps -= 1
                if _one_row_steps == 0:
                    torch.backends.mkldnn.enabled = True


def _x86_vendor() -> str:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return ""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), "")
    except OSError:
        return ""


# On AMD CPUs oneDNN's fp32 matmul beats the BLAS that `F.linear` calls (MKL, not tuned for them) at the shapes of
# a GPT-2 training step (measured on the project's AMD EPYC): 15-20% on the block projections and their input
# gradients, 1.45x on the LM head's 50257 columns. It rounds differently from MKL (logits about 1e-6 apart), so
# it is used only for training (train mode, autograd recording): inference keeps the BLAS transformers uses.
# On Intel CPUs MKL is the tuned path and stays; elsewhere `F.linear` as usual.
_ONEDNN_FP32 = torch.backends.mkldnn.is_available() and _x86_vendor() == "AuthenticAMD"


def _plain_fp32_cpu(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """fp32 CPU product of plain tensors outside autocast, tracing and torch.func transforms (quantised or
    distributed weights and compiled graphs keep `F.linear`)."""
    return (
        x.dtype == weight.dtype == torch.float32  # (first: the cheapest test, and false for every bf16 product)
        and not torch.compiler.is_compiling()
        and not torch.jit.is_tracing()
        and x.device.type == "cpu"
        and type(weight) in (torch.Tensor, nn.Parameter)
        and type(x) in (torch.Tensor, nn.Parameter)
        and x.numel() > 0
        and not torch.is_autocast_enabled("cpu")
        and not torch._C._are_functorch_transforms_active()
    )


def _onednn_fp32_on() -> bool:
    """Whether fp32 training products go through oneDNN on this machine now (see `_ONEDNN_FP32`)."""
    return _ONEDNN_FP32 and torch.backends.mkldnn.enabled


def onednn_fp32(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether a training product `x @ weight.T` goes through oneDNN."""
    return _onednn_fp32_on() and _plain_fp32_cpu(x, weight)


def _onednn_matmul(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")  # x @ weight.T + bias


class _OneDNNLinear(torch.autograd.Function):
    """`F.linear` in fp32 through oneDNN; backward: the input's gradient through oneDNN too, the weight's through
    the BLAS (faster there for these shapes). Under `create_graph` backward uses differentiable ops."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _onednn_matmul(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        grad_x = grad_w = grad_b = None
        if need_x:
            twice = torch.is_grad_enabled()  # a gradient of this gradient will be asked for
            grad_x = grad @ weight if twice else _onednn_matmul(grad, weight.T)
        rows = grad.reshape(-1, grad.shape[-1])  # (N, out)
        if need_w:
            grad_w = rows.T @ x.reshape(-1, x.shape[-1])  # (out, in)
        if need_b and ctx.has_bias:
            grad_b = rows.sum(0)
        return grad_x, grad_w, grad_b


def _one_row_on_all_threads(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, parts: int):
    """`F.linear` of a single row as `parts` row blocks of `weight` in one batched matmul. MKL runs a one-row
    fp32 product on one thread, reading the weights at about 14 GB/s; as a batched matmul the blocks run on all
    threads (23 GB/s on the project's 2 cores) and each output is the same dot product (bit for bit there)."""
    out_features, in_features = weight.shape
    n = out_features - out_features % parts  # rows split evenly; the rest (odd vocabularies) separately
    blocks = weight[:n].view(parts, n // parts, in_features).transpose(1, 2)  # (parts, in, n / parts)
    row = x.reshape(1, 1, in_features).expand(parts, 1, in_features)
    if bias is None:
        y = torch.bmm(row, blocks).view(n)
    else:
        y = torch.baddbmm(bias[:n].view(parts, 1, n // parts), row, blocks).view(n)
    if n < out_features:
        rest = F.linear(x.reshape(in_features), weight[n:], None if bias is None else bias[n:])
        y = torch.cat([y, rest])
    return y.view(*x.shape[:-1], out_features)


# The one-row split pays a fixed cost (waking the other threads: about 15 us here with OpenMP's default wait
# policy, about 90 us with OMP_WAIT_POLICY=PASSIVE), repaid only by weights that take long to stream. Streamed from
# memory, 768 x 768 (2.2 MiB fp32) is about even under PASSIVE and 40% faster by default, 2304 x 768 30% / 45%
# faster. Smaller weights (models of width 256 and under) keep F.linear: with the split for every size, a 12-layer
# width-32 model decoded at half transformers' speed under PASSIVE.
ONE_ROW_SPLIT_MIN_ELEMENTS = 2**19


def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, training: bool = False
) -> torch.Tensor:
    """`F.linear(x, weight, bias)`, faster in two fp32 CPU cases: products of a module in training mode that
    autograd records, through oneDNN on AMD CPUs (see `_ONEDNN_FP32`); and a single row (decoding at batch 1)
    times a large weight on all threads (`_one_row_on_all_threads`). Everything else, eval-mode forwards with
    gradients included, is `F.linear` and matches transformers' GPT-2 as before."""
    if not _plain_fp32_cpu(x, weight):  # (first: compiled graphs must not see the checks below)
        return F.linear(x, weight, bias)
    recorded = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if training and recorded and _onednn_fp32_on():  # (`_plain_fp32_cpu` held above)
        return _OneDNNLinear.apply(x, weight, bias)
    parts = torch.get_num_threads()
    if not recorded and parts > 1 and x.shape[:-1].numel() == 1 and weight.numel() >= ONE_ROW_SPLIT_MIN_ELEMENTS:
        return _one_row_on_all_threads(x, weight, bias, parts)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    """`nn.Linear` (same parameters, state dict and initialisation; PEFT, quantisers and hooks treat it as one)
    whose product is `linear`'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias, self.training)


class Dropout(nn.Dropout):
    """`nn.Dropout`; in training on CPU its mask is drawn with `torch.rand` and kept as the scaled multiplier
    (0 or 1/(1-p)), as F.dropout keeps it: a (4, 256, 768) forward + backward takes 3.2 ms instead of 5.7 ms
    there, most of it `bernoulli_`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x  # what F.dropout returns in eval mode, without its call (25 per decoding step of GPT-2 small)
        cpu_training = x.device.type == "cpu" and not torch.compiler.is_compiling()
        if not cpu_training or self.inplace or not 0.0 < self.p < 1.0:
            return super().forward(x)
        keep = torch.rand(x.shape, device=x.device).ge_(self.p).to(x.dtype).mul_(1 / (1 - self.p))
        return x * keep


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


# `LinearCrossEntropy` makes fp32 logits LOSS_CHUNK_ELEMENTS at a time on CPU (16 MiB: under glibc's 32 MiB
# ceiling for mmap-ed blocks, so each chunk reuses the freed memory of the one before instead of faulting in fresh
# pages, 4% of an fp32 GPT-2 step on the project's VM) and GPU_LOSS_CHUNK_ELEMENTS at a time elsewhere (512 MiB:
# a GPU runs a handful of large kernels far faster than hundreds of small ones; 83-row chunks of GPT-2's
# vocabulary made the loss a few thousand kernel launches per step). It keeps their gradient for up to
# GRAD_BLOCK_ELEMENTS logits (256 MiB in bf16) before turning it into the gradients of h and weight.
LOSS_CHUNK_ELEMENTS = 2**22
GPU_LOSS_CHUNK_ELEMENTS = 2**27
GRAD_BLOCK_ELEMENTS = 2**27


def _vocab_multiple(device: torch.device) -> int:
    """The loss pads the vocabulary to a multiple of this, with zero rows of the weight. On a GPU, matmuls whose
    rows are not a multiple of 16 bytes apart miss the fast kernels: with GPT-2's 50257 tokens (odd), the loss's
    three vocabulary-sized matmuls ran 31 ms of a 16 x 1024 bf16 step on an H200 in old (sm75) kernels, 6x their
    share of the step's FLOPs. On CPU the padded copy of an fp32 weight would cost more than it saves."""
    return 1 if device.type == "cpu" else 64


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
            # (Vp, C): zero rows, whose logits are cut off again. Not in compiled graphs, where the padded rows'
            # gradient write below cannot be traced (a non-contiguous `out=`): the loss then ran outside the graph
            # and a compiled GPT-2 step fell from 384k to 345k tokens/s (16 x 1024, H200).
            pad = -V % _vocab_multiple(x.device)
            if pad and not torch.compiler.is_compiling():
                w = F.pad(w, (0, 0, 0, pad))
            Vp = w.shape[0]
            total = torch.zeros((), dtype=torch.float32, device=x.device)
            grad_h = torch.empty_like(x) if needs_grad_h else None
            grad_w = None
            per_chunk = LOSS_CHUNK_ELEMENTS if x.device.type == "cpu" else GPU_LOSS_CHUNK_ELEMENTS
            chunk = max(1, per_chunk // Vp)  # rows of fp32 logits at a time
            block = chunk * max(1, GRAD_BLOCK_ELEMENTS // (chunk * Vp))  # rows of logit gradients at a time
            onednn = onednn_fp32(x, w)
            # fp32 log-softmax, written straight into the gradient's rows where those are fp32 (and unpadded) too
            fp32_rows = (needs_grad_h or needs_grad_w) and compute_dtype == torch.float32 and Vp == V
            for b in range(0, N, block):
                grad_logits = None  # (n, Vp): d loss_sum / d logits of this block's rows, 0 in the padding
                if needs_grad_h or needs_grad_w:
                    grad_logits = torch.empty(min(block, N - b), Vp, dtype=compute_dtype, device=x.device)
                    grad_logits[:, V:] = 0  # (not whatever the memory held: NaN times a zero row is NaN)
                for c in range(b, min(b + block, N), chunk):
                    rows = x[c : c + chunk]
                    logits = (_onednn_matmul(rows, w) if onednn else rows @ w.T)[:, :V]
                    into = grad_logits[c - b : c - b + chunk] if fp32_rows else None
                    logp = torch.log_softmax(logits, dim=-1, dtype=torch.float32, out=into)  # (n, V)
                    tc = targets[c : c + chunk]
                    ignored = tc == ignore_index
                    tc = tc.masked_fill(ignored, 0)
                    total -= logp.gather(1, tc[:, None]).squeeze(1).masked_fill(ignored, 0.0).sum()
                    if grad_logits is not None:
                        grad = logp.exp_()  # d(-log p_target)/d(logits) = softmax - one-hot
                        grad[torch.arange(len(tc), device=x.device), tc] -= 1.0
                        # Rows without a target get no gradient (a mask, not boolean indexing, which syncs a GPU).
                        if fp32_rows:
                            grad.masked_fill_(ignored[:, None], 0.0)
                        else:  # zeroed in the same pass that casts them into the block's gradient
                            keep = (~ignored).to(grad.dtype)[:, None]
                            torch.mul(grad, keep, out=grad_logits[c - b : c - b + chunk, :V])
                if needs_grad_h:
                    torch.mm(grad_logits, w, out=grad_h[b : b + block])  # (n, C)
                if needs_grad_w:
                    part = grad_logits.T @ x[b : b + block]  # (Vp, C)
                    grad_w = part if grad_w is None else grad_w.float() + part  # summed in fp32 over blocks
            grad_w = grad_w[:V] if grad_w is not None else None
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
