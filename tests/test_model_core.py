"""Model core (issue 2): parity with transformers' GPT-2 / OpenAI-GPT, caches, masks, variants, presets."""

from __future__ import annotations

import copy
import importlib.util
import warnings

import pytest
import torch
from conftest import LogitsOnly
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    DynamicCache,
    StaticCache,
    pipeline,
)

from hf_gpt import PRESETS, GPTConfig, GPTForCausalLM, GPTModel, modeling_gpt
from hf_gpt.interface import layer_masks
from hf_gpt.modeling_gpt import _CACHE_FIELD

ATOL = 1e-5


def tiny_config(**kw) -> GPTConfig:
    base = dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=3, n_head=4)
    base.update(kw)
    return GPTConfig(**base)


def tiny_model(seed: int = 0, **kw) -> GPTForCausalLM:
    torch.manual_seed(seed)
    model = GPTForCausalLM(tiny_config(**kw)).eval()
    with torch.no_grad():  # peaked attention, so mask and position bugs show
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * model.config.n_embd] *= 6.0
    return model


# ---------------------------------------------------------------- parity with transformers


@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_logits_and_loss_match_transformers(family, gpt2_ref, gpt1_ref):
    ref, folder = gpt2_ref if family == "gpt2" else gpt1_ref
    ours = GPTForCausalLM.from_pretrained(folder).eval()
    assert ours.config.norm_position == ("pre" if family == "gpt2" else "post")
    torch.manual_seed(3)
    ids = torch.randint(0, ref.config.vocab_size, (3, 40))
    with torch.no_grad():
        a = ref(ids, labels=ids)
        b = ours(ids, labels=ids)
    err = (a.logits - b.logits).abs().max().item()
    assert err < ATOL, f"max abs logit error {err}"
    assert a.logits.abs().max() > 1.0  # the comparison is not between two near-zero tensors
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)
    assert ours.lm_head.weight.data_ptr() == ours.transformer.wte.weight.data_ptr()


@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_greedy_generation_matches_transformers(family, gpt2_ref, gpt1_ref):
    ref, folder = gpt2_ref if family == "gpt2" else gpt1_ref
    ours = GPTForCausalLM.from_pretrained(folder).eval()
    prompt = torch.tensor([[5, 17, 33, 2]])
    kw = dict(max_new_tokens=30, do_sample=False, pad_token_id=0)
    expected = ref.generate(prompt, **kw)
    got = ours.generate(prompt, **kw)
    assert got.shape[1] == prompt.shape[1] + 30
    assert torch.equal(expected, got)
    assert len(set(got[0, 4:].tolist())) > 1  # not a degenerate constant continuation


def test_token_type_ids_match_transformers_in_forward_and_generate(gpt2_ref):
    """GPT-2 adds the token embedding of `token_type_ids`; the LM passes them on (it once dropped them, and
    generate() refused them as unused)."""
    ref, folder = gpt2_ref
    ours = GPTForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([[5, 17, 33, 2, 9], [8, 40, 3, 11, 6]])
    types = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    with torch.no_grad():
        a = ref(ids, token_type_ids=types).logits
        b = ours(ids, token_type_ids=types).logits
        plain = ours(ids).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert not torch.allclose(b, plain, atol=1e-3)  # the types change the result
    kw = dict(token_type_ids=types, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ref.generate(ids, **kw), ours.generate(ids, **kw))


STRATEGIES = {
    "beam search": dict(num_beams=3, num_return_sequences=2),
    "sampling, top-k": dict(do_sample=True, top_k=20),
    "static cache, beams": dict(cache_implementation="static", num_beams=2),
    "repetition penalty, no-repeat n-grams": dict(repetition_penalty=1.3, no_repeat_ngram_size=2),
    "prompt lookup": dict(prompt_lookup_num_tokens=3),
    "assisted by itself": dict(assistant_model=True),
}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_generation_strategies_match_transformers(strategy, gpt2_ref):
    """generate()'s other decoding loops (beam reordering of the cache, speculative rollback of the cache,
    sampling, logits processors) give transformers' tokens, on a left-padded batch where they allow one."""
    ref, folder = gpt2_ref
    ours = GPTForCausalLM.from_pretrained(folder).eval()
    kw = dict(STRATEGIES[strategy], max_new_tokens=12, min_new_tokens=12, pad_token_id=0)
    kw.setdefault("do_sample", False)
    ids = torch.randint(1, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(8))
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # left padding
    if strategy in ("prompt lookup", "assisted by itself"):  # these loops take one row
        ids, mask = ids[:1], mask[:1]
    outs = []
    for model in (ref, ours):
        if strategy == "assisted by itself":
            kw["assistant_model"] = model
        torch.manual_seed(5)
        outs.append(model.generate(ids, attention_mask=mask, **kw))
    assert outs[0].shape[1] == ids.shape[1] + 12
    assert torch.equal(outs[0], outs[1])


def test_pipeline_greedy_matches_transformers(tmp_path_factory, gpt2_tok):
    from conftest import make_gpt2

    # Untrained: forty steps over a 50,257-token vocabulary cost 8 s and leave the continuation more repetitive.
    ref, folder = make_gpt2(tmp_path_factory, train_steps=0, vocab_size=50257, n_embd=32, n_layer=2, n_head=2)
    ours = GPTForCausalLM.from_pretrained(folder)
    kw = dict(max_new_tokens=30, do_sample=False)
    a = pipeline("text-generation", model=ref, tokenizer=gpt2_tok)("Hello, I'm a language model,", **kw)
    b = pipeline("text-generation", model=ours, tokenizer=gpt2_tok)("Hello, I'm a language model,", **kw)
    assert a[0]["generated_text"] == b[0]["generated_text"]
    continuation = gpt2_tok(a[0]["generated_text"]).input_ids[8:]
    assert len(set(continuation)) > 5  # a varied continuation, so that a wrong token would show


def test_hidden_states_and_attentions_match_transformers(gpt2_ref):
    ref, folder = gpt2_ref
    ours = GPTForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ref_eager = copy.deepcopy(ref)
    ref_eager.config._attn_implementation = "eager"
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        a = ref_eager(ids, output_hidden_states=True, output_attentions=True)
        b = ours(ids, output_hidden_states=True, output_attentions=True)
    assert len(a.hidden_states) == len(b.hidden_states) == 4
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)
    assert len(b.attentions) == 3 and b.attentions[0].shape == (2, 4, 12, 12)
    for x, y in zip(a.attentions, b.attentions, strict=True):
        torch.testing.assert_close(x, y, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- caches, masks, positions


def test_cached_generation_equals_uncached():
    model = tiny_model()
    prompt = torch.tensor([[1, 2, 3, 4, 5]])
    cached = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=20, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
    # And step by step by hand: logits of the last position with a cache == full recompute.
    ids = cached[:, :15]
    with torch.no_grad():
        full = model(ids).logits[:, -1]
        cache = DynamicCache(config=model.config)
        model(ids[:, :10], cache=cache)
        step = model(ids[:, 10:], cache=cache).logits[:, -1]
    torch.testing.assert_close(full, step, atol=ATOL, rtol=0)


def test_past_key_values_is_the_deprecated_name_of_cache():
    """transformers 5.24 renamed `past_key_values` to `cache` and its models warn about the old name: ours too,
    with the same result. On older transformers `past_key_values` is the current name, so no warning."""
    model = tiny_model()
    ids = torch.tensor([[5, 17, 33, 2]])
    with torch.no_grad():
        cache = getattr(model(ids[:, :3], use_cache=True), _CACHE_FIELD)
        new = model(ids[:, 3:], cache=copy.deepcopy(cache)).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            old = model(ids[:, 3:], past_key_values=copy.deepcopy(cache)).logits
            base = model.transformer(ids[:, 3:], past_key_values=copy.deepcopy(cache)).last_hidden_state
    torch.testing.assert_close(old, new)
    torch.testing.assert_close(model.lm_head(base), new)
    warned = [w for w in caught if "`past_key_values` is deprecated" in str(w.message)]
    assert len(warned) == (2 if _CACHE_FIELD == "cache" else 0)  # once per call, not twice through the LM


def test_static_cache_equals_dynamic():
    model = tiny_model()
    prompt = torch.tensor([[7, 8, 9], [3, 2, 1]])
    kw = dict(max_new_tokens=15, do_sample=False, pad_token_id=0)
    dynamic = model.generate(prompt, **kw)
    static = model.generate(prompt, cache_implementation="static", **kw)
    assert torch.equal(dynamic, static)
    # A StaticCache passed by hand too.
    with torch.no_grad():
        cache = StaticCache(config=model.config, max_cache_len=32)
        a = model(prompt, cache=cache).logits
        b = model(prompt).logits
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)


@pytest.mark.slow  # dynamo traces the model twice
def test_static_cache_steps_trace_without_graph_breaks():
    """`_can_compile_fullgraph`: a prefill and a decoding step on a static cache, with the position_ids that
    generate() passes and no mask, trace as one graph (the packed-documents check once branched on the
    static cache's tensor length). backend="eager" only traces, so this takes seconds."""
    torch._dynamo.reset()
    model = tiny_model()
    assert type(model)._can_compile_fullgraph
    step = torch.compile(model, fullgraph=True, backend="eager", dynamic=False)
    prompt = torch.tensor([[7, 8, 9], [3, 2, 1]])
    with torch.no_grad():
        expected = model(torch.cat([prompt, prompt[:, :1]], 1)).logits
        cache = StaticCache(config=model.config, max_cache_len=16)
        a = step(prompt, position_ids=torch.arange(3)[None].expand(2, -1), cache=cache).logits
        b = step(prompt[:, :1], position_ids=torch.full((2, 1), 3), cache=cache).logits
    torch.testing.assert_close(torch.cat([a, b], 1), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["global", "local"])
def test_left_padded_batch_equals_rows_alone(kind):
    model = tiny_model(attention_pattern=[kind], local_window=4)
    rows = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    with torch.no_grad():
        batched = model(ids, attention_mask=mask).logits
    for i, r in enumerate(rows):
        with torch.no_grad():
            alone = model(torch.tensor([r])).logits[0]
        torch.testing.assert_close(batched[i, width - len(r) :], alone, atol=ATOL, rtol=0)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(torch.tensor([r]), max_new_tokens=10, do_sample=False, pad_token_id=0)
        assert gen[i, width:].tolist() == alone[0, len(r) :].tolist()


def test_right_padding_leaves_real_tokens_unchanged():
    """A right-padded batch, then one more token per row on the cache (as lm-eval-style scorers and servers continue
    right-padded prompts): the new token must skip the padding between it and its row's real tokens, and take the
    position after the last real one. (The prompt's own logits cannot tell: under causal attention real tokens never
    see padding to their right, so that half passes even if the mask is ignored; the continuation and a hole in the
    middle of a row are what the mask decides.)"""
    model = tiny_model()
    rows = [[5, 6, 7, 8, 9], [12, 13, 14]]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    nxt = torch.tensor([[40], [41]])
    with torch.no_grad():
        prefill = model(ids, attention_mask=mask, use_cache=True)
        cache = getattr(prefill, _CACHE_FIELD)
        step = model(nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), cache=cache).logits[:, -1]
        unmasked = model(torch.cat([ids, nxt], 1)).logits[:, -1]  # what ignoring the mask would give
        for i, r in enumerate(rows):
            alone = model(torch.tensor([r + nxt[i].tolist()])).logits[0]
            torch.testing.assert_close(prefill.logits[i, : len(r)], alone[:-1], atol=ATOL, rtol=0)
            torch.testing.assert_close(step[i], alone[-1], atol=ATOL, rtol=0)
        assert (unmasked[1] - step[1]).abs().max() > 0.1  # the padded row's check can fail
        # A masked-out token in the middle of a row: the later tokens see neither it nor its position.
        holed = model(torch.tensor([[5, 6, 99, 7, 8]]), attention_mask=torch.tensor([[1, 1, 0, 1, 1]])).logits[0]
        plain = model(torch.tensor([[5, 6, 7, 8]])).logits[0]
    torch.testing.assert_close(holed[[0, 1, 3, 4]], plain, atol=ATOL, rtol=0)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_full_4d_mask_shares_a_prefix(attn):
    """A caller's own (B, 1, T, Tk) mask, as transformers' models take it: three continuations of one prefix
    packed in a row, each last token seeing only the prefix and itself, give the logits of the rows run apart.
    Both forms: bool (True = may attend) and additive floats (0 / large negative). Also after a cached prefix."""
    model = tiny_model()
    model.config._attn_implementation = attn
    rows = torch.tensor([[10, 11, 12, 13], [10, 11, 12, 14], [10, 11, 12, 15]])
    shared = torch.tensor([[10, 11, 12, 13, 14, 15]])
    pos = torch.tensor([[0, 1, 2, 3, 3, 3]])
    allowed = torch.ones(6, 6, dtype=torch.bool).tril()
    allowed[4:, 3:] = torch.eye(6, dtype=torch.bool)[4:, 3:]  # 14 and 15 see the prefix and themselves
    additive = (~allowed).float() * torch.finfo(torch.float32).min
    with torch.no_grad():
        expected = model(rows).logits[:, -1]  # (3, vocab)
        for mask in (allowed, additive):
            got = model(shared, attention_mask=mask[None, None], position_ids=pos).logits[0, 3:]
            torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
        prefix = getattr(model(shared[:, :3], use_cache=True), _CACHE_FIELD)
        got = model(shared[:, 3:], attention_mask=allowed[None, None, 3:], position_ids=pos[:, 3:], cache=prefix)
    torch.testing.assert_close(got.logits[0], expected, atol=ATOL, rtol=0)


def test_explicit_position_ids_are_used():
    model = tiny_model()
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        default = model(ids).logits
        same = model(ids, position_ids=torch.tensor([[0, 1, 2]])).logits
        shifted = model(ids, position_ids=torch.tensor([[10, 11, 12]])).logits
    torch.testing.assert_close(default, same)
    assert (default - shifted).abs().max() > 1e-3


@pytest.mark.parametrize("pattern", [["global"], ["global", "local"]])
def test_sdpa_equals_eager(pattern):
    torch.manual_seed(0)
    cfg = tiny_config(attention_pattern=pattern, local_window=5)
    sdpa = GPTForCausalLM(cfg).eval()
    eager = copy.deepcopy(sdpa)
    eager.config._attn_implementation = "eager"
    sdpa.config._attn_implementation = "sdpa"
    ids = torch.randint(0, 128, (2, 20))
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        for m in (None, mask):
            # (padding's own outputs are never used, and differ: SDPA gives 0 where nothing is visible)
            real = (m if m is not None else torch.ones_like(ids)).bool()
            torch.testing.assert_close(
                sdpa(ids, attention_mask=m).logits[real],
                eager(ids, attention_mask=m).logits[real],
                atol=ATOL,
                rtol=1e-4,
            )


def test_set_attn_implementation_switches_at_runtime():
    """`model.set_attn_implementation` takes effect (transformers refused it, guessing from our source), and
    attention weights come back only from the written-out path the switch selects."""
    model = tiny_model()
    ids = torch.tensor([[5, 17, 33, 2, 9]])
    with torch.no_grad():
        sdpa = model(ids).logits
        model.set_attn_implementation("eager")
        assert model.config._attn_implementation == "eager"
        assert all(block.attn.config._attn_implementation == "eager" for block in model.transformer.h)
        calls = []
        model.transformer.h[0].attn.register_forward_hook(lambda m, i, o: calls.append(o[1]))
        eager = model(ids).logits
    assert calls[0] is not None  # the eager path ran (it alone makes the probabilities)
    torch.testing.assert_close(eager, sdpa, atol=ATOL, rtol=0)
    model.set_attn_implementation("sdpa")
    assert model.config._attn_implementation == "sdpa"
    if importlib.util.find_spec("flash_attn") is None:
        with pytest.raises(ImportError, match="FlashAttention2"):
            model.set_attn_implementation("flash_attention_2")  # not installed here, and said so


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(0)
    model = GPTForCausalLM(tiny_config(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)).train()
    ids = torch.randint(0, 128, (2, 16))

    def grads(m):
        m.zero_grad()
        m(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in m.named_parameters()}

    plain = grads(model)
    model.gradient_checkpointing_enable()
    assert all(block.gradient_checkpointing for block in model.transformer.h)
    ckpt = grads(model)
    for name in plain:
        torch.testing.assert_close(plain[name], ckpt[name], atol=1e-6, rtol=1e-5)


def test_logits_to_keep_and_ignored_labels():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        full = model(ids).logits
        last = model(ids, logits_to_keep=1).logits
        labels = ids.clone()
        labels[:, :5] = -100
        masked = model(ids, labels=labels).loss
    assert last.shape == (2, 1, 128)
    torch.testing.assert_close(last[:, 0], full[:, -1])
    logp = torch.log_softmax(full[:, 4:-1], dim=-1)
    manual = -logp.gather(-1, ids[:, 5:, None]).mean()
    torch.testing.assert_close(masked, manual, atol=1e-5, rtol=0)


def test_loss_uses_num_items_in_batch():
    """Trainer passes num_items_in_batch through **kwargs so accumulated gradients are scaled exactly."""
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 10))
    with torch.no_grad():
        mean = model(ids, labels=ids).loss
        summed = model(ids, labels=ids, num_items_in_batch=torch.tensor(1)).loss
    torch.testing.assert_close(summed, mean * 2 * 9, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- variants


@pytest.mark.parametrize("impl", ["sdpa", "eager", pytest.param("flex_attention", marks=pytest.mark.slow)])
def test_local_attention_equals_masked_reference(impl):
    """A "local" layer sees only the last `local_window` positions: compare with attention written out here, for
    each implementation (flex attention compiles its kernel: seconds)."""
    torch.manual_seed(0)
    cfg = tiny_config(n_layer=1, attention_pattern=["local"], local_window=3, resid_pdrop=0.0, attn_pdrop=0.0)
    model = GPTModel(cfg).eval()
    attn = model.h[0].attn
    x = torch.randn(2, 10, 64)
    T = x.shape[1]
    q, k, v = (x @ attn.c_attn.weight.T + attn.c_attn.bias).split(64, dim=-1)
    heads = lambda t: t.view(2, T, 4, 16).transpose(1, 2)  # noqa: E731
    scores = heads(q) @ heads(k).transpose(-1, -2) / 4.0
    i, j = torch.arange(T)[:, None], torch.arange(T)[None, :]
    allowed = (j <= i) & (i - j < 3)
    scores = scores.masked_fill(~allowed, float("-inf"))
    ref = (scores.softmax(-1) @ heads(v)).transpose(1, 2).reshape(2, T, 64) @ attn.c_proj.weight.T + attn.c_proj.bias
    assert model.config.sliding_window == 3 and model.config.layer_types == ["sliding_attention"]
    # The band as transformers' masking_utils draws it from `sliding_window`, for the implementation.
    model.config._attn_implementation = impl
    mask = layer_masks(model.config, x, None, None, 0, torch.arange(T)[None])["sliding_attention"]
    with torch.no_grad():  # (flex attention has no backward on CPU)
        got, _ = attn(x, mask)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
    dense = tiny_config(n_layer=1, attention_pattern=["global"])
    model_dense = GPTModel(dense).eval()
    model_dense.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (
            model_dense(inputs_embeds=x).last_hidden_state - model(inputs_embeds=x).last_hidden_state
        ).abs().max() > 1e-4


def test_attention_pattern_alternates():
    cfg = GPTConfig.from_preset("gpt3-small", n_layer=4)
    kinds = [cfg.layer_attention(i) for i in range(4)]
    assert kinds == ["global", "local", "global", "local"]
    model = GPTModel(tiny_config(n_layer=4, attention_pattern=["global", "local"]))
    assert [b.attn.layer_type for b in model.h] == ["full_attention", "sliding_attention"] * 2
    assert [b.attn.sliding_window for b in model.h] == [None, 256, None, 256]


def test_local_attention_cached_generation_matches_uncached():
    model = tiny_model(attention_pattern=["global", "local"], local_window=4)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    a = model.generate(prompt, max_new_tokens=12, do_sample=False, pad_token_id=0)
    b = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(a, b)


def test_post_norm_has_no_final_layernorm():
    m = GPTModel(tiny_config(norm_position="post", final_norm=False))
    assert isinstance(m.ln_f, torch.nn.Identity)
    assert not any("ln_f" in n for n, _ in m.named_parameters())


# ---------------------------------------------------------------- save / load / auto classes / pipelines


def test_save_and_auto_load_roundtrip(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    cfg = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(cfg, GPTConfig) and cfg.hidden_size == 64 and cfg.num_hidden_layers == 3
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded, GPTForCausalLM)
    base = AutoModel.from_pretrained(tmp_path)
    assert isinstance(base, GPTModel)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, loaded(ids).logits)
        assert torch.equal(model.transformer(ids).last_hidden_state, base(ids).last_hidden_state)
    import json

    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"].endswith("GPTForCausalLM")
    assert (tmp_path / "modeling_gpt.py").exists() and (tmp_path / "configuration_gpt.py").exists()


def test_feature_extraction_pipeline_returns_hidden_states(gpt2_tok):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).eval()
    pipe = pipeline("feature-extraction", model=model, tokenizer=gpt2_tok)
    text = "To be, or not to be"
    feats = torch.tensor(pipe(text))[0]
    ids = gpt2_tok(text, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(ids).last_hidden_state[0]
    assert feats.shape == expected.shape == (ids.shape[1], 32)
    torch.testing.assert_close(feats, expected, atol=ATOL, rtol=0)


# ---------------------------------------------------------------- config and presets

GPT2_RELEASED = {"gpt2": 124_439_808, "gpt2-medium": 354_823_168, "gpt2-large": 774_030_080, "gpt2-xl": 1_557_611_200}


def count_params(preset: str) -> int:
    with torch.device("meta"):
        model = GPTForCausalLM(GPTConfig.from_preset(preset))
    return sum(p.numel() for p in model.parameters())  # tied weights are listed once


@pytest.mark.parametrize("preset", list(GPT2_RELEASED))
def test_gpt2_preset_counts_equal_released_checkpoints(preset):
    assert count_params(preset) == GPT2_RELEASED[preset]


def test_gpt1_preset_count():
    assert count_params("gpt1") == 116_534_784


# Brown et al. 2020, "Language Models are Few-Shot Learners", Table 2.1, as printed: model name, n_params,
# n_layers, d_model, n_heads, d_head. All have n_ctx 2048 (the table's caption) and GPT-2's 50,257-token BPE (sec. 2.1).
GPT3_TABLE_2_1 = [
    ("GPT-3 Small", 125e6, 12, 768, 12, 64),
    ("GPT-3 Medium", 350e6, 24, 1024, 16, 64),
    ("GPT-3 Large", 760e6, 24, 1536, 16, 96),
    ("GPT-3 XL", 1.3e9, 24, 2048, 24, 128),
    ("GPT-3 2.7B", 2.7e9, 32, 2560, 32, 80),
    ("GPT-3 6.7B", 6.7e9, 32, 4096, 32, 128),
    ("GPT-3 13B", 13.0e9, 40, 5140, 40, 128),
    ("GPT-3 175B", 175.0e9, 96, 12288, 96, 128),
]
GPT3_PRESET = {
    "GPT-3 Small": "gpt3-small",
    "GPT-3 Medium": "gpt3-medium",
    "GPT-3 Large": "gpt3-large",
    "GPT-3 XL": "gpt3-xl",
    "GPT-3 2.7B": "gpt3-2.7b",
    "GPT-3 6.7B": "gpt3-6.7b",
    "GPT-3 13B": "gpt3-13b",
    "GPT-3 175B": "gpt3-175b",
}
# Two rows contradict themselves (n_heads x d_head != d_model); there a preset must keep two of the three figures:
# XL keeps d_model and d_head (2048 / 128 = 16 heads, not 24), 13B keeps n_heads and d_head (40 x 128 = 5120, as
# 5140 is not divisible by 40).
GPT3_SELF_CONTRADICTING = {"GPT-3 XL": dict(n_head=16), "GPT-3 13B": dict(n_embd=5120)}


def gpt3_param_count(vocab: int, n_ctx: int, d: int, n_layers: int) -> int:
    """Token and position embeddings, per block two LayerNorms (4d), q/k/v (3d^2 + 3d), the attention output
    (d^2 + d) and the MLP (8d^2 + 5d), a final LayerNorm (2d); the output head shares the token embedding."""
    return vocab * d + n_ctx * d + n_layers * (12 * d * d + 13 * d) + 2 * d


@pytest.mark.parametrize(
    "row",
    # (175B: a second to build its 96 blocks on the meta device)
    [pytest.param(r, marks=[pytest.mark.slow] if r[0] == "GPT-3 175B" else []) for r in GPT3_TABLE_2_1],
    ids=[r[0] for r in GPT3_TABLE_2_1],
)
def test_gpt3_presets_follow_table_2_1(row):
    name, n_params, n_layers, d_model, n_heads, d_head = row
    cfg = GPTConfig.from_preset(GPT3_PRESET[name])
    expected = dict(n_layer=n_layers, n_embd=d_model, n_head=n_heads, n_positions=2048, vocab_size=50257)
    assert (n_heads * d_head == d_model) == (name not in GPT3_SELF_CONTRADICTING)
    expected.update(GPT3_SELF_CONTRADICTING.get(name, {}))
    assert {key: getattr(cfg, key) for key in expected} == expected
    assert cfg.n_embd // cfg.n_head == d_head
    assert [cfg.layer_attention(i) for i in range(4)] == ["global", "local", "global", "local"]  # sec. 2.1
    n = count_params(GPT3_PRESET[name])
    assert n == gpt3_param_count(50257, 2048, cfg.n_embd, n_layers)  # the model holds what the table describes
    # The paper rounds to two or three figures (and Medium's 350M is 355.9M by this count): 2% covers every row.
    assert abs(n - n_params) / n_params < 0.02, (name, n)


def test_presets_cover_every_published_size():
    assert sorted(p for p in PRESETS if p.startswith("gpt3")) == sorted(GPT3_PRESET.values())
    assert {"gpt1", "gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"} <= set(PRESETS)


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (dict(n_embd=100, n_head=12), "divisible by n_head"),
        (dict(activation_function="gelu_fast_typo"), "activation_function"),
        (dict(n_layer=0), "n_layer must be a positive integer"),
        (dict(vocab_size=-5), "vocab_size must be a positive integer"),
        (dict(n_positions=1.5), "n_positions must be a positive integer"),
        (dict(norm_position="middle"), "norm_position"),
        (dict(attention_pattern=["dense"]), "attention_pattern"),
        (dict(local_window=0), "local_window"),
        (dict(attn_pdrop=1.5), "attn_pdrop"),
        (dict(n_inner=-1), "n_inner"),
    ],
)
def test_config_validation(kwargs, phrase):
    with pytest.raises(ValueError, match=phrase):
        GPTConfig(**kwargs)


def test_unknown_preset_lists_known_ones():
    with pytest.raises(ValueError, match="gpt2-medium"):
        GPTConfig.from_preset("gpt5")


def test_standard_names_and_aliases():
    cfg = GPTConfig(hidden_size=96, num_hidden_layers=2, num_attention_heads=3, max_position_embeddings=40)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_positions) == (96, 2, 3, 40)
    assert cfg.hidden_size == 96 and cfg.max_position_embeddings == 40
    again = GPTConfig.from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()
    # An alias and a GPT-2 name together: validated once both are applied (768 default width % 10 != 0)
    assert GPTConfig(hidden_size=100, n_head=10).n_embd == 100


def test_too_long_input_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="n_positions"):
        model(torch.zeros(1, 65, dtype=torch.long))


def test_packed_position_ids_keep_documents_apart():
    """Padding-free packing: position_ids restart at 0 per document and no mask is given; each
    document's logits must equal the document run alone."""
    model = tiny_model()
    docs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    ids = torch.tensor([sum(docs, [])])
    pos = torch.tensor([sum([list(range(len(d))) for d in docs], [])])
    with torch.no_grad():
        packed = model(ids, position_ids=pos).logits[0]
        # Into a static cache longer than the batch too (the document mask once failed to broadcast to it).
        static = model(ids, position_ids=pos, cache=StaticCache(config=model.config, max_cache_len=32)).logits[0]
        torch.testing.assert_close(static, packed, atol=ATOL, rtol=0)
        start = 0
        for d in docs:
            alone = model(torch.tensor([d])).logits[0]
            torch.testing.assert_close(packed[start : start + len(d)], alone, atol=ATOL, rtol=0)
            start += len(d)


# ---------------------------------------------------------------- the training loss path


@pytest.mark.parametrize("chunk_rows, block_chunks", [(1000, 1), (3, 1), (3, 2), (4, 100)])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("vocab_multiple", [1, 48])
def test_training_loss_without_logits_equals_the_logits_path(
    monkeypatch, chunk_rows, block_chunks, autocast, vocab_multiple
):
    """In train mode with labels the loss comes from the hidden states a chunk of rows at a time, its gradient
    kept for blocks of chunks (`LinearCrossEntropy`); loss and every gradient must equal the usual logits path,
    with ignored labels and `num_items_in_batch`, however the rows split into chunks and blocks, and with the
    vocabulary padded with zero rows as on a GPU (128 tokens padded to 144)."""
    import hf_gpt.ops as ops

    vocab = 128
    padded = -(-vocab // vocab_multiple) * vocab_multiple
    monkeypatch.setattr(ops, "_vocab_multiple", lambda device: vocab_multiple)
    monkeypatch.setattr(ops, "LOSS_CHUNK_ELEMENTS", chunk_rows * padded)
    monkeypatch.setattr(ops, "GRAD_BLOCK_ELEMENTS", block_chunks * chunk_rows * padded)
    model = tiny_model(seed=5, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # train forward == eval forward
    ids = torch.randint(0, vocab, (3, 11), generator=torch.Generator().manual_seed(6))
    labels = ids.masked_fill(torch.rand(ids.shape, generator=torch.Generator().manual_seed(7)) < 0.3, -100)

    def loss_and_grads(train: bool, **kw):
        model.train(train)
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(ids, labels=labels, **kw)
        assert (out.logits is None) == train  # the fast path really ran, or really did not
        out.loss.backward()
        return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    # (PEFT's LoRA wrapper passes output_attentions=None, output_hidden_states=None with every call.)
    for kw in ({}, {"num_items_in_batch": torch.tensor(17)}, {"output_attentions": None, "output_hidden_states": None}):
        fast, fast_grads = loss_and_grads(True, **kw)
        slow, slow_grads = loss_and_grads(False, **kw)
        # bf16: both paths round the same matmuls, but in different orders and chunks.
        atol, rtol = (2e-2, 2e-2) if autocast else (1e-6, 1e-5)
        torch.testing.assert_close(fast, slow, atol=atol, rtol=rtol)
        assert fast_grads.keys() == slow_grads.keys() and len(fast_grads) == len(list(model.parameters()))
        for name in slow_grads:
            scale = slow_grads[name].abs().max()
            torch.testing.assert_close(fast_grads[name], slow_grads[name], atol=atol * scale, rtol=rtol, msg=name)


@pytest.mark.slow  # dynamo traces a training step in fp32 and bf16
def test_compiled_training_step_is_one_graph_with_the_eager_gradients(monkeypatch):
    """`torch.compile(model)` / `Trainer(torch_compile=True)`: a training step with labels (the loss without
    logits, vocabulary padding asked for as on a GPU) traces as one graph and gives eager's loss and gradients.
    A graph break here once sent the loss out of the compiled graph on a GPU (345k instead of 384k tokens/s)."""
    import hf_gpt.ops as ops

    monkeypatch.setattr(ops, "_vocab_multiple", lambda device: 48)  # 100 tokens: padded to 144 in eager
    torch._dynamo.reset()
    model = tiny_model(seed=3, vocab_size=100, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(4))
    labels = ids.masked_fill(ids % 5 == 0, -100)

    def loss_and_grads(run, bf16: bool):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = run(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(20)).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    compiled_model = torch.compile(model, fullgraph=True, backend="eager")
    # fp32: the traced graph runs the same kernels as eager, only its backward is regrouped by AOTAutograd, so
    # gradients agree to 1e-6 of their scale (measured: loss exact, gradients within 8.6e-7 of their max).
    # bf16: the same, with bf16 roundings in a different order: 1e-2 on the loss, 2e-2 on gradients.
    for bf16, tol in ((False, 1e-6), (True, 2e-2)):
        eager, eager_grads = loss_and_grads(model, bf16)
        compiled, compiled_grads = loss_and_grads(compiled_model, bf16)
        say = lambda m, bf16=bf16: f"bf16={bf16}: {m}"  # noqa: E731
        torch.testing.assert_close(compiled, eager, atol=tol / 2, rtol=tol / 2, msg=say)
        for a, b in zip(compiled_grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b, atol=tol * b.abs().max(), rtol=tol, msg=say)


@pytest.mark.slow  # two Trainer runs, one traced by dynamo
def test_trainer_with_torch_compile_gives_the_eager_losses(tmp_path):
    """`Trainer(torch_compile=True)` trains the compiled model (backend "eager" here: it only traces) to the same
    per-step losses as the plain one."""
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    def losses(compiled: bool) -> list[float]:
        model = tiny_model(seed=8, vocab_size=100, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
        ids = torch.randint(0, 100, (16, 16), generator=torch.Generator().manual_seed(9)).tolist()
        args = TrainingArguments(
            output_dir=str(tmp_path / str(compiled)),
            per_device_train_batch_size=4,
            max_steps=4,
            logging_steps=1,
            report_to=[],
            save_strategy="no",
            use_cpu=True,
            torch_compile=compiled,
            torch_compile_backend="eager" if compiled else None,
        )
        trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_dict({"input_ids": ids, "labels": ids}))
        trainer.train()
        if compiled:
            assert isinstance(trainer.model_wrapped, torch._dynamo.eval_frame.OptimizedModule)  # it did compile
        return [h["loss"] for h in trainer.state.log_history if "loss" in h]

    torch._dynamo.reset()
    eager, compiled = losses(False), losses(True)
    assert len(eager) == 4 and compiled == pytest.approx(eager, rel=1e-5)


# ---------------------------------------------------------------- speed paths against the plain computation


def test_linear_equals_f_linear_with_gradients():
    """`ops.linear` gives F.linear's output and gradients: training products (through oneDNN on AMD CPUs), a
    gradient of a gradient, torch.func.vmap, bf16, and single rows split over threads (odd sizes, no bias)."""
    import torch.nn.functional as F

    from hf_gpt import ops

    torch.manual_seed(0)
    x = torch.randn(3, 5, 48, requires_grad=True)
    w = torch.randn(41, 48, requires_grad=True)
    b = torch.randn(41, requires_grad=True)
    out = ops.linear(x, w, b, training=True)
    assert ("OneDNN" in type(out.grad_fn).__name__) == ops._ONEDNN_FP32  # the path this machine takes
    assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))  # eval mode, even with gradients: the BLAS
    ref = F.linear(x, w, b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g = torch.randn_like(ref)
    got = torch.autograd.grad(out, (x, w, b), g)
    want = torch.autograd.grad(ref, (x, w, b), g)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-4, rtol=1e-5)
    # gradient of a gradient (create_graph): backward must use differentiable ops then
    (gx,) = torch.autograd.grad(ops.linear(x, w, b, training=True).pow(2).sum(), x, create_graph=True)
    (gx_ref,) = torch.autograd.grad(F.linear(x, w, b).pow(2).sum(), x, create_graph=True)
    torch.testing.assert_close(torch.autograd.grad(gx.sum(), w)[0], torch.autograd.grad(gx_ref.sum(), w)[0])
    with torch.no_grad():
        assert torch.equal(ops.linear(x, w, b), F.linear(x, w, b))  # inference keeps the BLAS's bits
        torch.testing.assert_close(torch.func.vmap(lambda r: ops.linear(r, w, b))(x), ref, atol=1e-5, rtol=1e-5)
        xb, wb = x.bfloat16(), w.bfloat16()
        assert torch.equal(ops.linear(xb, wb), F.linear(xb, wb))
        row = x[:1, :1]  # (1, 1, 48): a decoding step at batch 1
        for parts in (2, 3, 4):  # 41 outputs: blocks of 20/13/10 rows and a remainder
            for bias in (b, None):
                split = ops._one_row_on_all_threads(row, w, bias, parts)
                torch.testing.assert_close(split, F.linear(row, w, bias), atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(ops.linear(row, w, b), F.linear(row, w, b), atol=1e-5, rtol=1e-6)
    layer = ops.Linear(48, 41)
    assert isinstance(layer, torch.nn.Linear)
    torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), atol=1e-5, rtol=1e-5)


def test_one_row_products_split_over_threads_only_for_large_weights(monkeypatch):
    """A single row's fp32 product is split over the threads only for weights of at least
    ONE_ROW_SPLIT_MIN_ELEMENTS (for smaller ones the split's fixed cost exceeds its gain); both equal F.linear."""
    import torch.nn.functional as F

    from hf_gpt import ops

    split_weights = []
    real = ops._one_row_on_all_threads
    monkeypatch.setattr(
        ops, "_one_row_on_all_threads", lambda x, w, b, n: split_weights.append(w.shape) or real(x, w, b, n)
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        row = torch.randn(1, 1, 512)
        small, large = torch.randn(64, 512), torch.randn(ops.ONE_ROW_SPLIT_MIN_ELEMENTS // 512 + 3, 512)
        with torch.no_grad():
            for w in (small, large):
                torch.testing.assert_close(ops.linear(row, w), F.linear(row, w), atol=1e-4, rtol=1e-5)
    finally:
        torch.set_num_threads(threads)
    assert split_weights == [large.shape]


def test_eval_forward_with_gradients_gives_the_inference_logits():
    """Only training products take oneDNN's fp32 kernels (on AMD CPUs): an eval-mode forward that autograd
    records (saliency, a hand-written loss) gives the same bits as under no_grad, and so transformers' parity."""
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        plain = model(ids).logits
    recorded = model(ids).logits
    assert recorded.requires_grad and torch.equal(recorded, plain)


def test_one_row_matmuls_turns_onednn_off_only_for_one_row_low_precision_cpu_steps():
    from hf_gpt.ops import one_row_matmuls

    one, two = torch.zeros(1, 1, dtype=torch.long), torch.zeros(2, 1, dtype=torch.long)
    assert torch.backends.mkldnn.enabled
    with one_row_matmuls(one, torch.bfloat16):
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled
    for tokens, dtype in ((two, torch.bfloat16), (one, torch.float32), (None, torch.bfloat16)):
        with one_row_matmuls(tokens, dtype):
            assert torch.backends.mkldnn.enabled
    with torch.backends.mkldnn.flags(enabled=False):  # the user's own choice is left as it is
        with one_row_matmuls(one, torch.bfloat16):
            assert not torch.backends.mkldnn.enabled
        assert not torch.backends.mkldnn.enabled
    assert torch.backends.mkldnn.enabled


def test_one_row_matmuls_keeps_onednn_off_until_the_last_overlapping_step_ends():
    """Two decoding threads whose one-row steps overlap: the first to finish must not turn oneDNN back on under
    the other (the flag is process-wide)."""
    import threading

    from hf_gpt.ops import one_row_matmuls

    one = torch.zeros(1, 1, dtype=torch.long)
    a_in, a_out, b_in = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with one_row_matmuls(one, torch.bfloat16):
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():
        a_in.wait(10)
        with one_row_matmuls(one, torch.bfloat16):
            b_in.set()
            a_out.wait(10)
            seen["after the first ended"] = torch.backends.mkldnn.enabled

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert seen == {"after the first ended": False}
    assert torch.backends.mkldnn.enabled


def test_dropout_drops_a_fraction_p_and_scales_the_rest():
    from hf_gpt import ops

    layer = ops.Dropout(0.2).train()
    assert isinstance(layer, torch.nn.Dropout)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.rand(400, 500, dtype=dtype) + 1.0  # no zeros of its own
        x.requires_grad_(True)
        torch.manual_seed(0)
        y = layer(x)
        assert y.dtype == dtype
        dropped = y == 0
        assert abs(dropped.float().mean().item() - 0.2) < 0.005  # 200k draws: 5 standard deviations
        scale = torch.tensor(1 / 0.8, dtype=dtype)  # (bf16 rounds the scale, as F.dropout does)
        assert torch.equal(y[~dropped], x[~dropped] * scale)
        (grad,) = torch.autograd.grad(y.sum(), x)
        assert torch.equal(grad, (~dropped).to(dtype) * scale)
        torch.manual_seed(0)
        assert torch.equal(layer(x), y)  # the draw follows torch's seed (gradient checkpointing replays it)
    assert torch.equal(layer.eval()(x), x)


@pytest.mark.parametrize("output_attentions", [False, True])
def test_training_attention_with_dropout_equals_the_plain_computation(output_attentions):
    """The written-out training attention (scale on q, mask added in place, dropout drawn with torch.rand and
    its 1/(1-p) applied to the output, dropped probabilities rebuilt in backward) against the textbook
    formula with the same dropout draw: output, returned weights and every gradient."""
    import math

    torch.manual_seed(0)
    cfg = tiny_config(n_layer=1, attn_pdrop=0.25, resid_pdrop=0.0)
    attn = modeling_gpt.GPTAttention(cfg, 0).train()
    x = torch.randn(2, 9, cfg.n_embd, requires_grad=True)
    torch.manual_seed(1)
    out, weights = attn(x, None, None, output_attentions)  # no mask: causal
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (x, *attn.parameters()), g)

    torch.manual_seed(1)
    B, T, C, nh = 2, 9, cfg.n_embd, cfg.n_head
    q, k, v = attn.c_attn(x).split(C, dim=2)
    q, k, v = (t.view(B, T, nh, C // nh).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / math.sqrt(C // nh)
    scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    dropped = probs * (torch.rand(probs.shape) >= cfg.attn_pdrop) / (1 - cfg.attn_pdrop)
    ref = attn.c_proj((dropped @ v).transpose(1, 2).reshape(B, T, C))
    want = torch.autograd.grad(ref, (x, *attn.parameters()), g)

    assert 0 < (dropped == 0).float().mean() - (probs == 0).float().mean() < 0.5  # dropout really ran
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if output_attentions:
        torch.testing.assert_close(weights, dropped, atol=1e-6, rtol=1e-5)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- return_dict


@pytest.mark.parametrize("cls_name", [name for name in modeling_gpt.__all__ if name != "GPTPreTrainedModel"])
def test_return_dict_false_gives_the_same_outputs_as_a_tuple(cls_name):
    """transformers' contract (and its own test suite's `test_model_outputs_equivalence`): `return_dict=False`,
    or `config.return_dict = False`, returns the ModelOutput's `to_tuple()`."""
    import hf_gpt

    torch.manual_seed(0)
    model = getattr(hf_gpt, cls_name)(tiny_config(num_labels=3, pad_token_id=0)).eval()
    ids = torch.randint(1, 128, (2, 3, 6) if cls_name == "GPTForMultipleChoice" else (2, 6))
    kw = dict(output_hidden_states=True)
    with torch.no_grad():
        as_dict = model(ids, **kw)
        as_tuple = model(ids, return_dict=False, **kw)
        model.config.return_dict = False
        from_config = model(ids, **kw)
    assert not isinstance(as_dict, tuple) and isinstance(as_tuple, tuple) and isinstance(from_config, tuple)
    expected = as_dict.to_tuple()
    for got in (as_tuple, from_config):
        for a, b in zip(got, expected, strict=True):
            if isinstance(a, torch.Tensor):
                assert torch.equal(a, b)
            elif isinstance(a, tuple):  # hidden states
                assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_torch_jit_trace_with_tuple_outputs():
    model = tiny_model(return_dict=False, use_cache=False)  # a tracer takes tensors and tuples only
    ids = torch.randint(0, 128, (2, 9))
    # (check_trace off: its second trace reports a differing graph; the outputs on other ids are compared below.)
    traced = torch.jit.trace(model, (ids,), check_trace=False)
    other = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        assert torch.allclose(traced(other)[0], model(other)[0], atol=1e-5)


@pytest.mark.slow  # torch.export traces the model
def test_torch_export_matches_eager():
    """`torch.export` (what ONNX, ExecuTorch and AOTInductor build on; tests/test_eco_export.py takes it on to
    onnxruntime) of the LM forward on input_ids, with dynamic batch and length: traced at one shape, it gives the eager
    logits at others, batch 1 too (a graph that froze (B, T) would fail or differ)."""

    lm = LogitsOnly(tiny_model(n_layer=2)).eval()
    g = torch.Generator().manual_seed(1)
    trace_ids, *other_ids = (torch.randint(0, 128, shape, generator=g) for shape in ((2, 16), (3, 11), (1, 7)))
    batch, seq = torch.export.Dim("batch", min=1, max=32), torch.export.Dim("seq", min=2, max=64)
    program = torch.export.export(lm, (trace_ids,), dynamic_shapes={"input_ids": {0: batch, 1: seq}})
    with torch.no_grad():
        for ids in (trace_ids, *other_ids):
            err = (program.module()(ids) - lm(ids)).abs().max().item()
            assert err < 1e-5, f"exported vs eager at {tuple(ids.shape)}: max abs logit difference {err}"
