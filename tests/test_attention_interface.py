"""Attention, masks and caches through transformers' own interfaces (issue 16).

Every attention implementation the model offers on CPU against the written-out ("eager") one, on the three
architecture variants (GPT-2 pre-norm, GPT-1 post-norm without a final norm, GPT-3 alternating dense and banded
layers); continuous batching (the paged cache) against generate(); the kwargs path serving engines use; bf16
decoding against fp32; tensor parallelism under torchrun.
"""

from __future__ import annotations

import ast
import copy
import importlib.util
import inspect
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import early, early_prepared, early_result
from transformers import GenerationConfig
from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer, StaticCache
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from hf_gpt import GPTConfig, GPTForCausalLM, GPTForSequenceClassification, GPTModel, modeling_gpt

VARIANTS = {
    "gpt2": dict(),
    "gpt1": dict(norm_position="post", final_norm=False),
    "gpt3": dict(attention_pattern=["global", "local"], local_window=4),
}
CPU_IMPLEMENTATIONS = ["eager", "sdpa", "flex_attention"]


def params(implementations: list[str]) -> list:
    """Flex attention compiles its kernels through inductor (seconds warm, tens of seconds on a cold cache): slow."""
    return [pytest.param(i, marks=pytest.mark.slow) if i == "flex_attention" else i for i in implementations]


def peaked_model(variant: str, seed: int = 0, attn_scale: float = 4.0, **kw) -> GPTForCausalLM:
    """A small model whose attention is peaked (weights scaled up), so that a wrong mask changes the logits, and
    whose greedy continuations vary (not one token repeated, which any mask would give)."""
    torch.manual_seed(seed)
    settings = {"vocab_size": 96, "n_positions": 64, "n_embd": 64, "n_layer": 3, "n_head": 2}
    settings.update({"initializer_range": 0.3, **VARIANTS[variant], **kw})
    model = GPTForCausalLM(GPTConfig(**settings)).eval()
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_attn.weight.mul_(attn_scale)
    return model


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 96, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, :2] = 0
    return ids.masked_fill(mask == 0, 0), mask


def with_implementation(model: GPTForCausalLM, implementation: str) -> GPTForCausalLM:
    other = copy.deepcopy(model)
    other.set_attn_implementation(implementation)
    return other


def test_model_dispatches_like_transformers_models():
    """The flags and the one interface call that transformers and vLLM's transformers backend look for."""
    model = peaked_model("gpt3")
    assert GPTForCausalLM._supports_attention_backend and model.is_backend_compatible()
    assert model.config._attn_implementation == "sdpa"  # the default, as for transformers' models
    # "sdpa" is SDPA with faster CPU paths for this model alone (transformers' local override): other models keep
    # transformers' own function.
    assert modeling_gpt.ALL_ATTENTION_FUNCTIONS["sdpa"] is modeling_gpt.sdpa_or_written_out_attention
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is modeling_gpt.sdpa_attention_forward
    assert modeling_gpt.ALL_ATTENTION_FUNCTIONS["flex_attention"] is ALL_ATTENTION_FUNCTIONS["flex_attention"]
    assert GPTForCausalLM._can_set_attn_implementation()  # transformers' own reading of our source
    # vLLM finds the attention layer by a local name read from ALL_ATTENTION_FUNCTIONS and called exactly once,
    # with `scaling=self.<attribute>`.
    tree = ast.parse(textwrap.dedent(inspect.getsource(modeling_gpt.GPTAttention.forward)))
    names = {
        target.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign) and "ALL_ATTENTION_FUNCTIONS" in ast.unparse(node.value)
        for target in node.targets
    }
    calls = [
        n for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in names
    ]
    assert len(calls) == 1
    scaling = [kw.value for kw in calls[0].keywords if kw.arg == "scaling"]
    assert len(scaling) == 1 and ast.unparse(scaling[0]) == "self.scaling"
    assert model.transformer.h[0].attn.scaling == 32**-0.5
    # transformers' names for the GPT-3 pattern, which caches, masks and engines read
    assert model.config.layer_types == ["full_attention", "sliding_attention", "full_attention"]
    assert model.config.sliding_window == 4 and peaked_model("gpt2").config.sliding_window is None
    cache = DynamicCache(config=model.config)
    assert [isinstance(layer, DynamicSlidingWindowLayer) for layer in cache.layers] == [False, True, False]


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("implementation", params(CPU_IMPLEMENTATIONS[1:]))
def test_implementation_matches_eager(variant, implementation):
    """Left-padded forward (positions from the mask), then greedy decoding on a dynamic and on a static cache:
    the same logits (real tokens) and the same tokens as the written-out attention."""
    eager = with_implementation(peaked_model(variant), "eager")
    other = with_implementation(eager, implementation)
    assert other.config._attn_implementation == implementation
    ids, mask = left_padded_batch()
    with torch.no_grad():
        want, got = eager(ids, attention_mask=mask).logits, other(ids, attention_mask=mask).logits
    real = mask.bool()
    # (post-norm GPT-1 with these large weights amplifies rounding: 2e-5 of the scale was measured)
    torch.testing.assert_close(got[real], want[real], atol=5e-5 * want.abs().max(), rtol=0)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    if implementation == "flex_attention":
        # torch 2.13's CPU flex attention cannot compile a decoding step whose BlockMask holds padding or a band (a
        # C++ error in inductor's flex-decoding template), so flex decodes rows without padding through dense
        # layers here; a few steps, as it compiles anew for each key length on CPU.
        if variant == "gpt3":
            return
        ids, kw = ids[:, 5:], dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    reference = eager.generate(ids, **kw)
    new = reference[:, ids.shape[1] :]
    assert (new[:, 1:] != new[:, :-1]).any()  # not a constant run that any mask would give
    assert torch.equal(other.generate(ids, **kw), reference)
    if implementation != "flex_attention":
        assert torch.equal(other.generate(ids, cache_implementation="static", **kw), reference)


@pytest.mark.slow  # a second each: generate() per prompt, then the paged cache's batch
@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
def test_continuous_batching_gives_generate_tokens(variant, implementation):
    """transformers' continuous batching (`generate_batch`: the paged cache, "sdpa" or "paged|eager") gives each
    prompt the tokens generate() gives it alone, and leaves the model's implementation as it found it."""
    if (
        "kwargs"
        not in inspect.signature(
            importlib.import_module("transformers.generation.continuous_batching.cache").PagedAttentionCache.update
        ).parameters
    ):
        pytest.skip("this transformers' paged cache takes its indices another way (continuous batching: 5.24+)")
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = with_implementation(peaked_model(variant), implementation)
    prompts = [[5, 6, 7, 8, 9], [11, 12, 13], [20, 21, 22, 23, 24, 25, 26, 27, 28], [40]]
    want = [
        model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, pad_token_id=0)[0, len(p) :].tolist()
        for p in prompts
    ]
    config = GenerationConfig(max_new_tokens=12, do_sample=False, pad_token_id=0, eos_token_id=-1)
    paged = ContinuousBatchingConfig(page_size=16, num_blocks=16, max_batch_tokens=64)
    out = model.generate_batch(
        inputs=prompts, generation_config=config, continuous_batching_config=paged, progress_bar=False
    )
    got = [out[key].generated_tokens for key in sorted(out, key=lambda k: int(k.split("_")[-1]))]
    assert got == want
    assert model.config._attn_implementation == implementation


def test_kwargs_reach_the_attention_function():
    """Serving engines hand their per-layer state to their attention function through the forward's kwargs
    (vLLM's `attention_instances`, the paged cache's indices): from every head, through GPTModel and each block."""
    seen = []

    def recording(module, query, key, value, attention_mask, **kwargs):
        seen.append((module.layer_idx, kwargs.get("engine_state")))
        return modeling_gpt.sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register("recording", recording)  # as vLLM registers its own
    AttentionMaskInterface.register("recording", sdpa_mask)
    lm = peaked_model("gpt3")
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        want = lm(ids).logits
        lm.set_attn_implementation("recording")
        got = lm(ids, engine_state="lm").logits
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        classifier = GPTForSequenceClassification(lm.config)
        classifier.set_attn_implementation("recording")
        classifier(ids, engine_state="classifier")
        GPTModel(lm.config)(ids, engine_state="base")
    assert seen == [(i, name) for name in ("lm", "classifier", "base") for i in range(3)]


@pytest.mark.skipif(
    importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available(),
    reason="flash_attention_2 needs the flash_attn package and a GPU",
)
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_flash_attention_2_matches_eager(variant):
    eager = with_implementation(peaked_model(variant), "eager").to("cuda", torch.bfloat16)
    flash = with_implementation(eager, "flash_attention_2")
    ids, mask = (t.cuda() for t in left_padded_batch())
    with torch.no_grad():
        want, got = eager(ids, attention_mask=mask).logits, flash(ids, attention_mask=mask).logits
    real = mask.bool()
    assert (got[real].float() - want[real].float()).abs().max() < 3e-2 * want.float().abs().max()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(flash.generate(ids, **kw), eager.generate(ids, **kw))


def decisive_model(variant: str, ids: torch.Tensor, mask: torch.Tensor) -> GPTForCausalLM:
    """The first of a few seeded models whose fp32 greedy continuation of these rows has no near-tie: every step's
    best logit leads the next by at least 5% of the logits' scale, more than twice the bf16 error allowed below.
    (A random small model often has near-ties, where bf16 rounding may pick either token and both are right; a
    vocabulary of 16 leaves fewer close runners-up.)"""
    for seed in range(20):
        model = peaked_model(variant, seed=seed, attn_scale=1.0, initializer_range=0.1, vocab_size=16)
        kw = dict(attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
        out = model.generate(ids, output_scores=True, return_dict_in_generate=True, **kw)
        scores = torch.stack(out.scores)  # (steps, B, vocab)
        top = scores.topk(2).values
        if (top[..., 0] - top[..., 1]).min() > 0.05 * scores.abs().max():
            return model
    raise AssertionError("no seed gave a model without near-ties")


@pytest.mark.parametrize("implementation", params(CPU_IMPLEMENTATIONS))
def test_bf16_decoding_matches_fp32(implementation):
    """bf16 decoding (several left-padded rows on a cache, and one row through `one_row_matmuls`) against fp32:
    a decoding step's logits within 2e-2 of their scale, and the same greedy tokens."""
    ids, mask = left_padded_batch()
    ids, variant = ids % 16, "gpt3"
    if implementation == "flex_attention":  # (torch 2.13's CPU flex decoding: no padding, no band; see above)
        variant, ids, mask = "gpt2", ids[:, 5:], mask[:, 5:]
    fp32 = with_implementation(decisive_model(variant, ids, mask), implementation)
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    with torch.no_grad():
        for rows in (3, 1):  # several rows; one row
            step = {}
            nxt = fp32(ids[:rows], attention_mask=mask[:rows]).logits[:, -1].argmax(-1, keepdim=True)
            step_mask = torch.cat([mask[:rows], torch.ones_like(nxt)], dim=1)
            for name, model in (("fp32", fp32), ("bf16", bf16)):
                prefill = model(ids[:rows], attention_mask=mask[:rows], use_cache=True)
                cache = getattr(prefill, modeling_gpt._CACHE_FIELD)
                step[name] = model(nxt, attention_mask=step_mask, cache=cache).logits[:, -1].float()
            assert (step["bf16"] - step["fp32"]).abs().max() < 2e-2 * step["fp32"].abs().max()
            kw = dict(attention_mask=mask[:rows], max_new_tokens=6, do_sample=False, pad_token_id=0)
            assert torch.equal(bf16.generate(ids[:rows], **kw), fp32.generate(ids[:rows], **kw))


def test_returned_attentions_are_on_the_gradient_path():
    """With attention dropout active, the returned attentions are the (dropped, rescaled) probabilities the
    output was made from, as transformers' eager attention returns them: gradients reach them."""
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=2, n_head=2, attn_pdrop=0.3))
    model.train()
    out = model(torch.tensor([[1, 2, 3, 4, 5, 6]]), output_attentions=True)
    attentions = out.attentions
    for a in attentions:
        a.retain_grad()
    out.logits.sum().backward()
    for a in attentions:
        assert a.grad is not None and a.grad.abs().sum() > 0
        kept = a[a > 0]
        assert (a == 0).any() and (kept.sum() / a.shape[-2]).item() != pytest.approx(1.0)  # dropout ran


def test_packed_documents_into_a_static_cache():
    """Padding-free packed documents (position_ids restarting at 0, no mask) into a static cache longer than the
    input: each document sees only itself, as it does without a cache."""
    model = peaked_model("gpt3")
    docs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    ids = torch.tensor([sum(docs, [])])
    pos = torch.tensor([sum([list(range(len(d))) for d in docs], [])])
    with torch.no_grad():
        static = model(ids, position_ids=pos, cache=StaticCache(config=model.config, max_cache_len=32)).logits[0]
        start = 0
        for d in docs:
            alone = model(torch.tensor([d])).logits[0]
            torch.testing.assert_close(static[start : start + len(d)], alone, atol=2e-5, rtol=0)
            start += len(d)


TP_SCRIPT = """
import sys, torch
from hf_gpt import GPTForCausalLM
model = GPTForCausalLM.from_pretrained(sys.argv[1], tp_plan="auto").eval()
weight = model.transformer.h[0].attn.c_attn.weight
assert type(weight).__name__ == "DTensor", type(weight)  # really sharded
ids = torch.load(sys.argv[1] + "/ids.pt", weights_only=True)
with torch.no_grad():
    logits = model(ids).logits
if torch.distributed.get_rank() == 0:
    torch.save(logits, sys.argv[2])
"""


@early("tensor_parallel_run")
def run_tensor_parallel(work: Path):
    """Prepared: a GPT-3-layout model saved with the ids to score, and its single-process logits. Run in the
    background (conftest's `early`): `torchrun --nproc_per_node 2` of TP_SCRIPT on it. Returns (the single-process
    logits, the CompletedProcess, the file the sharded run's logits are saved in)."""
    model = peaked_model("gpt3", n_head=4)
    model.save_pretrained(work / "model")
    ids = torch.tensor([[5, 9, 3, 17, 22, 8, 1, 40], [7, 7, 2, 30, 11, 4, 6, 9]])
    torch.save(ids, work / "model" / "ids.pt")
    with torch.no_grad():
        want = model(ids).logits
    script = work / "tp.py"
    script.write_text(TP_SCRIPT)

    def run() -> subprocess.CompletedProcess:
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(script)]
        return subprocess.run(
            [*cmd, str(work / "model"), str(work / "out.pt")], capture_output=True, text=True, env=env, timeout=300
        )

    return (want, work / "out.pt"), run


@pytest.fixture(scope="module")
def tensor_parallel_run():
    return early_result("tensor_parallel_run")


@pytest.mark.slow  # torchrun and two worker processes
@pytest.mark.skipif(
    importlib.util.find_spec("transformers.distributed.tensor_parallel") is None, reason="no tensor parallelism"
)
def test_tensor_parallel_from_pretrained_matches_one_process(tensor_parallel_run):
    """`from_pretrained(folder, tp_plan="auto")` under `torchrun --nproc_per_node 2` on CPU (gloo): the blocks
    sharded by config.base_model_tp_plan give the single-process logits within 1e-5."""
    want, out = early_prepared("tensor_parallel_run")
    run = tensor_parallel_run
    assert run.returncode == 0, run.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    assert (got - want).abs().max() < 1e-5
    assert want.abs().max() > 1  # (not a degenerate model whose logits are all near 0)
