"""torch.export and ONNX (issue 8): the LM forward on `input_ids` (dynamic batch and sequence length) exported
and run outside eager PyTorch, with the eager logits.

Paths, on torch 2.13 / onnxscript 0.7 / onnxruntime 1.32:
- `torch.onnx.export(..., dynamo=False)` (TorchScript tracing, deprecated in torch but still shipped): works.
- `torch.export.export`, `torch.onnx.export(..., dynamo=True)` and transformers' `exporters.OnnxExporter`
  (all built on torch.export): fail on two spots in `modeling_gpt.py`, marked xfail below until the model
  changes (README "Works with" gives the change).
"""

from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from hf_gpt import GPTConfig, GPTForCausalLM

pytest.importorskip("onnxruntime", reason="pip install -e '.[ecosystem]'")
pytest.importorskip("onnxscript", reason="pip install -e '.[ecosystem]'")

ATOL = 1e-4
# Why the torch.export-based paths fail today. GPTModel.forward fills in position_ids itself and then tests
# `position_ids is not None` to look for packed documents, so a plain forward runs the data-dependent
# `if starts[:, 1:].any()` (a value, not a shape: torch.export cannot trace it). With that fixed, the next
# stop is AttentionMasks.get keying its cache on the key length, a SymInt under dynamic shapes (unhashable).
EXPORT_BLOCKED = (
    "modeling_gpt.GPTModel.forward: data-dependent `if starts[:, 1:].any()` runs even when the caller gave no "
    "position_ids; then AttentionMasks.get hashes a SymInt key length. See README 'Works with'."
)


class LogitsOnly(torch.nn.Module):
    """input_ids (B, T) -> logits (B, T, vocab): the forward an exported LM serves."""

    def __init__(self, model: GPTForCausalLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    with torch.no_grad():  # peaked attention, so a lost causal mask would change the logits
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * model.config.n_embd] *= 6.0
    return LogitsOnly(model).eval()


# Traced at one shape, checked at another: the exported graph must not have frozen (B, T).
TRACE_IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
OTHER_IDS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(2))


def dynamic_shapes():
    batch, seq = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=64)
    return {"input_ids": {0: batch, 1: seq}}


def max_err(run, lm) -> float:
    with torch.no_grad():
        return max((torch.as_tensor(run(ids)) - lm(ids)).abs().max().item() for ids in (TRACE_IDS, OTHER_IDS))


def onnxruntime_runner(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda ids: session.run(["logits"], {"input_ids": ids.numpy()})[0]


def test_onnx_torchscript_export_runs_in_onnxruntime(lm, tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.warns(DeprecationWarning):  # torch says so; this is the path that works today
        torch.onnx.export(
            lm,
            (TRACE_IDS,),
            str(path),
            dynamo=False,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_axes={"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}},
        )
    err = max_err(onnxruntime_runner(path), lm)
    assert err < ATOL, f"onnxruntime vs eager max abs logit difference {err}"


@pytest.mark.xfail(strict=True, raises=GuardOnDataDependentSymNode, reason=EXPORT_BLOCKED)
def test_torch_export_matches_eager(lm):
    program = torch.export.export(lm, (TRACE_IDS,), dynamic_shapes=dynamic_shapes())
    err = max_err(program.module(), lm)
    assert err < 1e-5, f"exported vs eager max abs logit difference {err}"


@pytest.mark.xfail(strict=True, raises=torch.onnx.OnnxExporterError, reason=EXPORT_BLOCKED)
def test_onnx_dynamo_export_runs_in_onnxruntime(lm, tmp_path):
    program = torch.onnx.export(
        lm,
        (TRACE_IDS,),
        dynamo=True,
        dynamic_shapes=dynamic_shapes(),
        input_names=["input_ids"],
        output_names=["logits"],
    )
    program.save(str(tmp_path / "model.onnx"))
    err = max_err(onnxruntime_runner(tmp_path / "model.onnx"), lm)
    assert err < ATOL, f"onnxruntime vs eager max abs logit difference {err}"


@pytest.mark.xfail(strict=True, raises=GuardOnDataDependentSymNode, reason=EXPORT_BLOCKED)
def test_transformers_onnx_exporter_runs_in_onnxruntime(lm):
    from transformers.exporters import OnnxConfig, OnnxExporter

    exported = OnnxExporter().export(lm.model, {"input_ids": TRACE_IDS, "use_cache": False}, OnnxConfig(dynamic=True))
    err = max_err(lambda ids: exported(input_ids=ids)["logits"], lm)  # runs in onnxruntime
    assert err < ATOL, f"onnxruntime vs eager max abs logit difference {err}"
