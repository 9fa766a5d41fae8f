"""Property-based tests (issue 7): random small configs and inputs, bounded example counts for CI."""

from __future__ import annotations

import copy

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_gpt import GPTConfig, GPTForCausalLM

ATOL = 1e-5
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


@st.composite
def models(draw):
    n_head = draw(st.sampled_from([1, 2, 4]))
    cfg = GPTConfig(
        vocab_size=draw(st.integers(8, 64)),
        n_positions=32,
        n_embd=n_head * draw(st.sampled_from([4, 8])),
        n_layer=draw(st.integers(1, 3)),
        n_head=n_head,
        norm_position=draw(st.sampled_from(["pre", "post"])),
        final_norm=draw(st.booleans()),
        attention_pattern=draw(st.sampled_from([["global"], ["global", "local"], ["local"]])),
        local_window=draw(st.integers(1, 6)),
        activation_function=draw(st.sampled_from(["gelu_new", "gelu", "relu", "silu"])),
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = GPTForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked attention so that mask mistakes show
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * cfg.n_embd] *= 4.0
    return model


def random_ids(draw, vocab: int, n: int) -> list[int]:
    return draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))


@SETTINGS
@given(data=st.data())
def test_cached_decoding_equals_uncached(data):
    model = data.draw(models())
    prompt = torch.tensor([random_ids(data.draw, model.config.vocab_size, data.draw(st.integers(1, 8)))])
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(prompt, **kw), model.generate(prompt, use_cache=False, **kw))


@SETTINGS
@given(data=st.data())
def test_left_padded_batch_equals_rows_alone(data):
    model = data.draw(models())
    V = model.config.vocab_size
    lengths = data.draw(st.lists(st.integers(1, 10), min_size=2, max_size=3))
    rows = [random_ids(data.draw, V, n) for n in lengths]
    width = max(lengths)
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r])).logits[0]
            torch.testing.assert_close(batched[i, width - len(r) :], alone, atol=ATOL, rtol=0)


@SETTINGS
@given(data=st.data())
def test_sdpa_equals_eager(data):
    model = data.draw(models())
    eager = copy.deepcopy(model)
    eager.config._attn_implementation = "eager"
    model.config._attn_implementation = "sdpa"
    n = data.draw(st.integers(1, 16))
    ids = torch.tensor([random_ids(data.draw, model.config.vocab_size, n)])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, eager(ids).logits, atol=ATOL, rtol=1e-4)


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_save_then_load_is_exact(tmp_path_factory, data):
    model = data.draw(models())
    folder = tmp_path_factory.mktemp("prop_save")
    model.save_pretrained(folder)
    loaded = GPTForCausalLM.from_pretrained(folder).eval()
    drop = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert drop(loaded.config.to_dict()) == drop(model.config.to_dict())
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.tensor([[1, 2, 3]]) % model.config.vocab_size
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)


@st.composite
def gpt2_expressible_models(draw):
    """Configs that transformers' GPT-2 computes exactly: pre-norm, a final LayerNorm, dense attention (a local
    window as wide as the context is dense too), any activation GPT-2's ACT2FN knows, tied or untied head."""
    n_head = draw(st.sampled_from([1, 2, 4]))
    n_embd = n_head * draw(st.sampled_from([4, 8]))
    cfg = GPTConfig(
        vocab_size=draw(st.integers(8, 64)),
        n_positions=16,
        n_embd=n_embd,
        n_layer=draw(st.integers(1, 3)),
        n_head=n_head,
        n_inner=draw(st.sampled_from([None, 2 * n_embd, 3 * n_embd])),
        attention_pattern=draw(st.sampled_from([["global"], ["global", "local"]])),
        local_window=16,
        activation_function=draw(st.sampled_from(["gelu_new", "gelu", "relu"])),
        tie_word_embeddings=draw(st.booleans()),
    )
    torch.manual_seed(draw(st.integers(0, 2**16)))
    model = GPTForCausalLM(cfg).eval()
    with torch.no_grad():  # peaked attention, and LayerNorm gains/shifts away from 1/0, so a mix-up shows
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * cfg.n_embd] *= 4.0
        for name, p in model.named_parameters():
            if ".ln_" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


@settings(
    max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
@given(data=st.data())
def test_export_then_import_is_exact(tmp_path_factory, data):
    """Ours -> `export_to_transformers` -> transformers' GPT2LMHeadModel, and back into ours: the same logits
    (GPT-2's Conv1D computes in another order: 1e-5 absolute, fp32) and exactly the same weights."""
    from transformers import GPT2LMHeadModel

    from hf_gpt.conversion import export_to_transformers

    model = data.draw(gpt2_expressible_models())
    folder = tmp_path_factory.mktemp("prop_export")
    assert export_to_transformers(model, folder, tokenizer=None) == "gpt2"
    theirs = GPT2LMHeadModel.from_pretrained(folder).eval()
    back = GPTForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([random_ids(data.draw, model.config.vocab_size, data.draw(st.integers(1, 16)))])
    with torch.no_grad():
        want = model(ids).logits
        torch.testing.assert_close(theirs(ids).logits, want, atol=ATOL, rtol=0)
        torch.testing.assert_close(back(ids).logits, want, atol=ATOL, rtol=0)
    ours, again = model.state_dict(), back.state_dict()
    assert ours.keys() == again.keys()
    for name in ours:
        assert torch.equal(ours[name], again[name]), name
    assert back.config.tie_word_embeddings == model.config.tie_word_embeddings
