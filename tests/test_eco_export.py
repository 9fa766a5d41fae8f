"""torch.export and ONNX (issue 8): the LM forward on `input_ids` (dynamic batch and sequence length) exported
and run outside eager PyTorch, with the eager logits.

Paths, on torch 2.13 / onnxscript 0.7 / onnxruntime 1.32, all with dynamic batch and length, checked at a shape
other than the traced one: `torch.onnx.export(dynamo=True)`, transformers' `exporters.OnnxExporter` (both built on
torch.export, which tests/test_model_core.py checks alone, without onnx), and the older TorchScript
`torch.onnx.export(dynamo=False)`.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
from conftest import LogitsOnly

from hf_gpt import GPTConfig, GPTForCausalLM

# A skip mark rather than a module-level importorskip: the tests are still collected (and reported as skipped).
pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(name) is None for name in ("onnxruntime", "onnxscript")),
    reason="pip install -e '.[ecosystem]'",
)

ATOL = 1e-4


@pytest.fixture(scope="module")
def lm():
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=128, n_positions=64, n_embd=64, n_layer=2, n_head=4)).eval()
    with torch.no_grad():  # peaked attention, so a lost causal mask would change the logits
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * model.config.n_embd] *= 6.0
    return LogitsOnly(model).eval()


# Traced at one shape, checked at others (batch 1 too): the exported graph must not have frozen (B, T).
TRACE_IDS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
OTHER_IDS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(2))
ONE_ROW_IDS = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(3))


def dynamic_shapes():
    batch, seq = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=64)
    return {"input_ids": {0: batch, 1: seq}}


def max_err(run, lm) -> float:
    with torch.no_grad():
        return max(
            (torch.as_tensor(run(ids)) - lm(ids)).abs().max().item() for ids in (TRACE_IDS, OTHER_IDS, ONE_ROW_IDS)
        )


def onnxruntime_runner(path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda ids: session.run(["logits"], {"input_ids": ids.numpy()})[0]


@pytest.mark.slow  # TorchScript's trace and ONNX export
def test_onnx_torchscript_export_runs_in_onnxruntime(lm, tmp_path):
    path = tmp_path / "model.onnx"
    with pytest.warns(DeprecationWarning):  # torch deprecates the TorchScript exporter; it still works
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


@pytest.mark.slow  # torch.export, then onnxscript's translation and optimizer
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


@pytest.mark.slow  # torch.export, then onnxscript's translation and optimizer
def test_transformers_onnx_exporter_runs_in_onnxruntime(lm):
    from transformers.exporters import OnnxConfig, OnnxExporter

    exported = OnnxExporter().export(lm.model, {"input_ids": TRACE_IDS, "use_cache": False}, OnnxConfig(dynamic=True))

    def run(ids):  # runs in onnxruntime; transformers 5.17 returns the outputs as a tuple, later ones by name
        out = exported(input_ids=ids)
        return out["logits"] if isinstance(out, dict) else out[0]

    err = max_err(run, lm)
    assert err < ATOL, f"onnxruntime vs eager max abs logit difference {err}"
