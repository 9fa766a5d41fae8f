"""Checkpoints in and out (issue 3): every file format of transformers' GPT-2 / OpenAI-GPT into hf_gpt with
the same logits and greedy tokens, clear errors for broken folders, and export back to the plain format
that vanilla transformers loads bit-exactly."""

from __future__ import annotations

import copy
import json
import os
import shutil

import pytest
import torch
from conftest import sharpen_attention
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OpenAIGPTConfig,
    OpenAIGPTLMHeadModel,
)

from hf_gpt import GPTConfig, GPTForCausalLM, GPTModel
from hf_gpt.conversion import CheckpointError, config_from_foreign, export_to_transformers, plain_format

ATOL = 1e-5
FORMATS = ["safetensors", "sharded-safetensors", "bin", "sharded-bin", "legacy-bin"]


def write_checkpoint(ref: torch.nn.Module, folder, fmt: str) -> None:
    """Save `ref` as transformers would in `fmt`. "legacy-bin" mimics the original Hub files: a bare-model
    state dict (no `transformer.` prefix) with the old `attn.bias` / `attn.masked_bias` mask buffers."""
    os.makedirs(folder)
    if fmt == "safetensors":
        ref.save_pretrained(folder)
        return
    if fmt == "sharded-safetensors":
        ref.save_pretrained(folder, max_shard_size="100KB")
        assert os.path.exists(os.path.join(folder, "model.safetensors.index.json"))
        return
    ref.config.save_pretrained(folder)
    state = {k: v.clone() for k, v in ref.state_dict().items()}
    if fmt == "bin":
        torch.save(state, os.path.join(folder, "pytorch_model.bin"))
    elif fmt == "sharded-bin":
        keys = sorted(state)
        shards = {"pytorch_model-00001-of-00002.bin": keys[::2], "pytorch_model-00002-of-00002.bin": keys[1::2]}
        weight_map = {}
        for name, shard_keys in shards.items():
            torch.save({k: state[k] for k in shard_keys}, os.path.join(folder, name))
            weight_map.update(dict.fromkeys(shard_keys, name))
        with open(os.path.join(folder, "pytorch_model.bin.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    elif fmt == "legacy-bin":
        bare = {k.removeprefix("transformer."): v for k, v in state.items() if k != "lm_head.weight"}
        n_pos = ref.config.n_positions
        for i in range(ref.config.n_layer):
            bare[f"h.{i}.attn.bias"] = torch.ones(n_pos, n_pos).tril()[None, None]
            bare[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(bare, os.path.join(folder, "pytorch_model.bin"))
    else:
        raise ValueError(fmt)


def greedy(model: torch.nn.Module, prompt: torch.Tensor, n: int = 30) -> torch.Tensor:
    return model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)


@pytest.fixture(scope="module")
def refs(gpt2_ref, gpt1_ref):
    return {"gpt2": gpt2_ref, "gpt1": gpt1_ref}


# ---------------------------------------------------------------- in: every file format, both families


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_every_format_loads_with_same_logits_and_tokens(family, fmt, refs, tmp_path):
    ref, _ = refs[family]
    folder = tmp_path / fmt
    write_checkpoint(ref, folder, fmt)
    ours = GPTForCausalLM.from_pretrained(folder).eval()
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()  # the head is tied
    torch.manual_seed(5)
    ids = torch.randint(0, ref.config.vocab_size, (2, 24))
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids).logits
    assert (expected - got).abs().max().item() < ATOL
    assert expected.abs().max() > 1.0
    prompt = torch.tensor([[5, 17, 33, 2]])
    a, b = greedy(ref, prompt), greedy(ours, prompt)
    assert b.shape[1] == 34 and torch.equal(a, b)
    assert len(set(b[0, 4:].tolist())) > 1
    # The bare model loads the same checkpoint (GPT-2 base prefix) with the same hidden states.
    base = GPTModel.from_pretrained(folder).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            base(ids).last_hidden_state, ref.transformer(ids).last_hidden_state, atol=ATOL, rtol=0
        )


def test_weights_land_exactly(gpt2_ref):
    """Conv1D (in, out) becomes Linear (out, in) bit for bit; nothing is recomputed."""
    ref, folder = gpt2_ref
    ours = GPTForCausalLM.from_pretrained(folder)
    theirs, mine = ref.transformer.h[1], ours.transformer.h[1]
    assert torch.equal(theirs.attn.c_attn.weight.t(), mine.attn.c_attn.weight)
    assert torch.equal(theirs.mlp.c_proj.weight.t(), mine.mlp.c_proj.weight)
    assert torch.equal(theirs.ln_2.bias, mine.ln_2.bias)
    assert torch.equal(ref.transformer.wpe.weight, ours.transformer.wpe.weight)


def test_dtype_argument_and_checkpoint_dtype(gpt2_ref, tmp_path):
    ref, folder = gpt2_ref
    assert GPTForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).dtype == torch.bfloat16
    half = tmp_path / "bf16"
    copy.deepcopy(ref).to(torch.bfloat16).save_pretrained(half)
    # With no dtype argument, ours follows the checkpoint the way transformers' own class does.
    assert GPTForCausalLM.from_pretrained(half).dtype == GPT2LMHeadModel.from_pretrained(half).dtype
    # Older configs name the field torch_dtype.
    old = config_from_foreign({"model_type": "gpt2", "n_embd": 64, "n_head": 4, "torch_dtype": "bfloat16"})
    assert old.dtype == torch.bfloat16


# ---------------------------------------------------------------- in: broken folders give clear errors


@pytest.fixture
def gpt2_copy(gpt2_ref, tmp_path):
    _, folder = gpt2_ref
    dst = tmp_path / "copy"
    shutil.copytree(folder, dst)
    return dst


def test_pickled_code_is_refused_not_run(gpt2_copy, tmp_path):
    marker = tmp_path / "payload-ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    (gpt2_copy / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": Payload()}, gpt2_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="Refusing to load .*pickled objects other than tensors"):
        GPTForCausalLM.from_pretrained(gpt2_copy)
    assert not marker.exists()


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(fmt, gpt2_ref, tmp_path):
    ref, _ = gpt2_ref
    folder = tmp_path / "t"
    write_checkpoint(ref, folder, fmt)
    file = folder / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = file.read_bytes()
    file.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        GPTForCausalLM.from_pretrained(folder)


def test_shapes_that_do_not_fit_the_config(gpt2_copy):
    cfg = json.loads((gpt2_copy / "config.json").read_text())
    cfg["n_embd"] = 32  # the weights are 64 wide
    (gpt2_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(
        CheckpointError,
        match=r"(?s)do not match its config .*transformer.wte.weight: checkpoint \(128, 64\), config \(128, 32\)",
    ):
        GPTForCausalLM.from_pretrained(gpt2_copy)


def test_missing_weights(gpt2_ref, tmp_path):
    ref, _ = gpt2_ref
    folder = tmp_path / "m"
    write_checkpoint(ref, folder, "bin")
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    del state["transformer.h.2.mlp.c_fc.weight"]
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="lacks 1 of the .* transformer.h.2.mlp.c_fc.weight"):
        GPTForCausalLM.from_pretrained(folder)


def test_missing_shard(gpt2_ref, tmp_path):
    ref, _ = gpt2_ref
    folder = tmp_path / "s"
    write_checkpoint(ref, folder, "sharded-safetensors")
    next(folder.glob("model-00002-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="names shard 'model-00002-.*which is missing"):
        GPTForCausalLM.from_pretrained(folder)


@pytest.mark.parametrize("arch", ["bert", "llama"])
def test_other_architectures_are_named(arch, tmp_path):
    if arch == "bert":
        model = BertModel(
            BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        )
    else:
        model = LlamaForCausalLM(
            LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
        )
    model.save_pretrained(tmp_path)
    with pytest.raises(
        CheckpointError,
        match=f"holds a '{arch}' .*checkpoint; hf_gpt loads model_type 'hf_gpt', 'gpt2' or 'openai-gpt'",
    ):
        GPTForCausalLM.from_pretrained(tmp_path)


# ---------------------------------------------------------------- out: export to the plain format


def load_vanilla(folder, cls):
    model, info = cls.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys, no errors
    return model.eval()


@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_round_trip_is_bit_exact(family, refs, tmp_path):
    """transformers' model -> ours -> exported -> vanilla transformers: identical weights and logits."""
    ref, folder = refs[family]
    cls = GPT2LMHeadModel if family == "gpt2" else OpenAIGPTLMHeadModel
    ours = GPTForCausalLM.from_pretrained(folder).eval()
    assert export_to_transformers(ours, tmp_path / "out") == ("gpt2" if family == "gpt2" else "openai-gpt")
    back = load_vanilla(tmp_path / "out", cls)
    assert type(AutoModelForCausalLM.from_pretrained(tmp_path / "out")) is cls  # no custom code involved
    a, b = ref.state_dict(), back.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    original = json.loads((folder / "config.json").read_text())  # as transformers' save_pretrained wrote it
    assert exported.keys() == original.keys() | {"n_ctx"}  # n_ctx as in OpenAI's configs, for llama.cpp
    assert exported["n_ctx"] == exported["n_positions"] == ref.config.n_positions
    assert exported["model_type"] == ref.config.model_type and exported["architectures"] == original["architectures"]
    ids = torch.randint(0, ref.config.vocab_size, (2, 20))
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, back(ids).logits)
        assert (ours(ids).logits - back(ids).logits).abs().max() < ATOL
    assert (tmp_path / "out" / "generation_config.json").exists()


@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_model_trained_here_exports(family, tmp_path):
    """A model made with hf_gpt (untied head, bf16 on the way out, sharded) comes out loadable and equal."""
    preset = (
        dict(norm_position="pre", final_norm=True)
        if family == "gpt2"
        else dict(norm_position="post", final_norm=False, activation_function="relu")
    )
    cfg = GPTConfig(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=2, tie_word_embeddings=False, **preset)
    torch.manual_seed(0)
    ours = GPTForCausalLM(cfg).eval()
    assert ours.lm_head.weight.data_ptr() != ours.transformer.wte.weight.data_ptr()
    cls = GPT2LMHeadModel if family == "gpt2" else OpenAIGPTLMHeadModel
    export_to_transformers(ours, tmp_path / "f32", max_shard_size="20KB")
    assert (tmp_path / "f32" / "model.safetensors.index.json").exists()
    back = load_vanilla(tmp_path / "f32", cls)
    assert torch.equal(back.lm_head.weight, ours.lm_head.weight)
    ids = torch.randint(0, 96, (2, 16))
    with torch.no_grad():
        assert (ours(ids).logits - back(ids).logits).abs().max() < ATOL
    shutil.copytree(tmp_path / "f32", tmp_path / "bf16")  # an earlier, sharded export in the same folder
    export_to_transformers(ours, tmp_path / "bf16", dtype=torch.bfloat16)
    assert sorted(p.name for p in (tmp_path / "bf16").glob("model*")) == ["model.safetensors"]
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    assert load_vanilla(tmp_path / "bf16", cls).dtype == torch.bfloat16


def test_bare_model_exports_with_tied_head(tmp_path):
    torch.manual_seed(0)
    base = GPTModel(GPTConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2)).eval()
    export_to_transformers(base, tmp_path)
    back = load_vanilla(tmp_path, GPT2LMHeadModel)
    ids = torch.randint(0, 64, (1, 12))
    with torch.no_grad():
        torch.testing.assert_close(
            back.transformer(ids).last_hidden_state, base(ids).last_hidden_state, atol=ATOL, rtol=0
        )
    assert torch.equal(back.lm_head.weight, base.wte.weight)


def test_task_heads_are_not_exported_as_language_models(tmp_path):
    from hf_gpt import GPTForSequenceClassification

    model = GPTForSequenceClassification(GPTConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ValueError, match="writes language models; got GPTForSequenceClassification"):
        export_to_transformers(model, tmp_path / "out")


def test_export_writes_gpt2_tokenizer(tmp_path):
    torch.manual_seed(0)
    ours = GPTForCausalLM(GPTConfig(vocab_size=50257, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    export_to_transformers(ours, tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    assert tok("Hello, I'm a language model,").input_ids == [15496, 11, 314, 1101, 257, 3303, 2746, 11]


def test_band_as_wide_as_the_context_exports():
    """A "local" layer whose window covers every position attends densely: GPT-2 expresses it."""
    cfg = GPTConfig(
        n_positions=64, attention_pattern=["global", "local"], local_window=64, n_layer=2, n_embd=32, n_head=2
    )
    assert plain_format(cfg) == "gpt2"


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (dict(attention_pattern=["global", "local"], local_window=16), "local attention"),
        (dict(norm_position="post", final_norm=True), "neither GPT-2 .* nor GPT-1"),
        (dict(norm_position="pre", final_norm=False), "neither GPT-2 .* nor GPT-1"),
        (dict(norm_position="post", final_norm=False, activation_function="gelu"), "no OpenAIGPTConfig.afn equivalent"),
        (dict(norm_position="post", final_norm=False, n_inner=48), "always 4 \\* n_embd"),
    ],
)
def test_export_refuses_what_the_plain_format_cannot_express(kwargs, phrase, tmp_path):
    cfg = GPTConfig(vocab_size=64, n_positions=64, n_embd=32, n_layer=2, n_head=2, **kwargs)
    with pytest.raises(ValueError, match=phrase):
        export_to_transformers(GPTForCausalLM(cfg), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_gpt3_preset_is_refused():
    with pytest.raises(ValueError, match="local attention"):
        plain_format(GPTConfig.from_preset("gpt3-small"))


# ---------------------------------------------------------------- full size: GPT-2 124M and GPT-1 117M


def full_size(cls, config, tmp_path_factory, name):
    torch.manual_seed(0)
    ref = cls(config).eval()
    sharpen_attention(ref, factor=3.0)
    folder = tmp_path_factory.mktemp(name)
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="module")
def gpt2_124m(tmp_path_factory):
    return full_size(GPT2LMHeadModel, GPT2Config(), tmp_path_factory, "gpt2_124m")


@pytest.fixture(scope="module")
def gpt1_117m(tmp_path_factory):
    return full_size(OpenAIGPTLMHeadModel, OpenAIGPTConfig(), tmp_path_factory, "gpt1_117m")


@pytest.mark.slow
@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_full_size_parity_and_round_trip(family, request, tmp_path):
    ref, folder = request.getfixturevalue("gpt2_124m" if family == "gpt2" else "gpt1_117m")
    ours = GPTForCausalLM.from_pretrained(folder).eval()
    n = sum(p.numel() for p in ours.parameters())
    assert n == (124_439_808 if family == "gpt2" else 116_534_784)
    ids = (
        torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11, 290, 314, 588, 284, 2193, 546, 1243, 13]])
        % ref.config.vocab_size
    )
    with torch.no_grad():
        expected, got = ref(ids).logits, ours(ids).logits
    err = (expected - got).abs().max().item()
    print(f"\n{family} full size ({n:,} parameters): max abs logit error {err:.3e}")
    assert err < ATOL
    a, b = greedy(ref, ids[:, :8]), greedy(ours, ids[:, :8])
    assert torch.equal(a, b)
    # And back out: the plain folder holds the very same tensors.
    cls = type(ref)
    export_to_transformers(ours, tmp_path / "out", tokenizer=None)
    back = load_vanilla(tmp_path / "out", cls)
    sa, sb = ref.state_dict(), back.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ---------------------------------------------------------------- the Hub (online only)

offline = os.environ.get("HF_HUB_OFFLINE", "0") == "1"


@pytest.mark.hub
@pytest.mark.skipif(offline, reason="needs the Hugging Face Hub (HF_HUB_OFFLINE=1)")
@pytest.mark.parametrize(
    "hub_id, cls", [("openai-community/gpt2", GPT2LMHeadModel), ("openai-community/openai-gpt", OpenAIGPTLMHeadModel)]
)
def test_hub_ids_load_with_same_logits(hub_id, cls):
    ref = cls.from_pretrained(hub_id).eval()
    ours = GPTForCausalLM.from_pretrained(hub_id).eval()
    ids = torch.tensor([[15496, 11, 314, 1101, 257, 3303, 2746, 11]])
    with torch.no_grad():
        assert (ref(ids).logits - ours(ids).logits).abs().max() < ATOL
    assert torch.equal(greedy(ref, ids), greedy(ours, ids))
