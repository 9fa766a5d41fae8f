"""Plain-GPT-2 tools (issue 8): the export of `hf_gpt.conversion.export_to_transformers` / `hf-gpt export` loads
in vanilla transformers, in a Python that cannot import hf_gpt, with no custom code and the same logits and
greedy text; and its config holds what vLLM's native GPT-2 and llama.cpp's GPT-2 converter read.

vLLM and llama.cpp themselves are not run here (no GPU build, no llama.cpp checkout): README "Works with"
gives the commands. llama.cpp's `convert_hf_to_gguf.py` (class GPT2Model) reads `n_layer`, `n_ctx`,
`n_embd`, `n_head`, `layer_norm_epsilon` from config.json, always writes a 4 * n_embd MLP and GELU.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import early, early_prepared, early_result
from test_remote_code import run_isolated
from transformers import pipeline

from hf_gpt import GPTConfig, GPTForCausalLM, gpt2_tokenizer
from hf_gpt.conversion import export_to_transformers

PROMPT = "To be, or not to be"
IDS = [[2514, 307, 11, 393, 407, 284, 307, 11, 326, 318, 262, 1808]]  # GPT-2 ids of a Shakespeare line


@early("vanilla_run")
def run_vanilla_transformers(work: Path):
    """Prepared: our model and its plain export. Run in the background (conftest's `early`): vanilla transformers
    loads the export in an isolated Python and computes logits and greedy text."""
    torch.manual_seed(0)
    cfg = GPTConfig.from_preset("gpt2", n_positions=128, n_embd=32, n_layer=2, n_head=2, initializer_range=0.1)
    model = GPTForCausalLM(cfg).eval()
    with torch.no_grad():  # larger weights and peaked attention: greedy text varies with the context
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * model.config.n_embd] *= 6.0
    assert export_to_transformers(model, work / "plain") == "gpt2"

    def run() -> dict:
        result = run_isolated(
            """
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline
            model = AutoModelForCausalLM.from_pretrained({folder!r}).eval()  # no trust_remote_code
            RESULT["class"] = type(model).__module__ + "." + type(model).__name__
            with torch.no_grad():
                torch.save(model(torch.tensor({ids!r})).logits, {logits!r})
            pipe = pipeline("text-generation", model=model, tokenizer=AutoTokenizer.from_pretrained({folder!r}))
            RESULT["text"] = pipe({prompt!r}, max_new_tokens=20, do_sample=False)[0]["generated_text"]
            """,
            work,
            folder=str(work / "plain"),
            ids=IDS,
            logits=str(work / "logits.pt"),
            prompt=PROMPT,
        )
        result["logits"] = torch.load(work / "logits.pt", weights_only=True)
        return result

    return (model, work / "plain"), run


@pytest.fixture(scope="module")
def exported():
    """(our model, the plain folder `export_to_transformers` wrote)."""
    return early_prepared("vanilla_run")


@pytest.fixture(scope="module")
def vanilla_run():
    return early_result("vanilla_run")


@pytest.mark.slow  # vanilla transformers runs in a fresh interpreter
def test_export_loads_in_vanilla_transformers_with_same_outputs(exported, vanilla_run):
    model, _ = exported
    result = vanilla_run
    assert result["class"] == "transformers.models.gpt2.modeling_gpt2.GPT2LMHeadModel"
    with torch.no_grad():
        ours = model(torch.tensor(IDS)).logits
    err = (result["logits"] - ours).abs().max().item()
    assert err < 1e-5, f"GPT2LMHeadModel vs hf_gpt max abs logit difference {err}"
    text = pipeline("text-generation", model=model, tokenizer=gpt2_tokenizer())(
        PROMPT, max_new_tokens=20, do_sample=False
    )
    assert result["text"] == text[0]["generated_text"]
    assert len(set(result["text"].removeprefix(PROMPT).split())) > 3  # a varied continuation, not one token repeated


def test_export_has_what_vllm_and_llama_cpp_read(exported):
    _, folder = exported
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["model_type"] == "gpt2"
    assert "auto_map" not in cfg  # nothing to trust: no custom code
    assert cfg["n_inner"] in (None, 4 * cfg["n_embd"]) and cfg["activation_function"] == "gelu_new"
    for key in ("n_layer", "n_embd", "n_head", "layer_norm_epsilon", "n_positions", "vocab_size"):
        assert key in cfg
    assert (folder / "model.safetensors").exists()
    assert (folder / "tokenizer.json").exists() or (folder / "vocab.json").exists()

    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as f:
        shape = f.get_slice("transformer.h.0.attn.c_attn.weight").get_shape()
    assert shape == [cfg["n_embd"], 3 * cfg["n_embd"]]  # GPT-2's Conv1D layout (in, out), as the converters expect


def test_export_config_has_n_ctx_for_llama_cpp(exported):
    model, folder = exported
    assert json.loads((folder / "config.json").read_text()).get("n_ctx") == model.config.n_positions
