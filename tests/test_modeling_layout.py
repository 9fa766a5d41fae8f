"""modeling_gpt.py's layout (issue 19): transformers' order, input checks first, one shared path for the task heads."""

from __future__ import annotations

import ast
import inspect
import textwrap

import pytest
import torch

from hf_gpt import (
    GPTConfig,
    GPTForMultipleChoice,
    GPTForSequenceClassification,
    GPTModel,
    modeling_gpt,
)


def tiny(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, pad_token_id=0, **kw)


def test_file_reads_in_transformers_order():
    tree = ast.parse(inspect.getsource(modeling_gpt))
    classes = [node.name for node in tree.body if isinstance(node, ast.ClassDef)]
    assert classes[:6] == ["GPTAttention", "GPTMLP", "GPTBlock", "GPTPreTrainedModel", "GPTModel", "GPTForCausalLM"]
    heads = [name for name in modeling_gpt.__all__ if name not in classes[:6]]
    assert classes[6:] == ["GPTHeadModel", *heads]
    assert isinstance(tree.body[-1], ast.Assign) and tree.body[-1].targets[0].id == "__all__"


def test_model_forward_checks_its_inputs_first():
    """Only the config and the cache argument (`cache` or its old name) come before `check_inputs`."""
    body = ast.parse(textwrap.dedent(inspect.getsource(GPTModel.forward))).body[0].body[1:]  # (after the docstring)
    assert [ast.unparse(node).split("(")[0] for node in body[:3]] == [
        "cfg = self.config",
        "cache = cache_argument",
        "check_inputs",
    ]


def test_heads_run_the_transformer_through_one_method():
    for cls in modeling_gpt.GPTHeadModel.__subclasses__():
        source = inspect.getsource(cls.forward)
        assert "self.transformer(" not in source and "self._features(" in source, cls.__name__


@pytest.mark.parametrize(
    "ids, phrase",
    [
        (torch.tensor([1, 2, 3]), r"input_ids has shape \(3,\); expected \(batch, tokens\)"),
        (torch.ones(2, 3, 4, dtype=torch.long), r"input_ids has shape \(2, 3, 4\)"),
    ],
)
def test_token_ids_of_the_wrong_rank_are_a_clear_error(ids, phrase):
    with pytest.raises(ValueError, match=phrase):
        GPTModel(tiny())(ids)


def test_sequence_classification_one_view_equals_plain_rows_and_embeds_equal_ids():
    torch.manual_seed(0)
    model = GPTForSequenceClassification(tiny(num_labels=3)).eval()
    ids = torch.randint(1, 64, (2, 2, 6))
    with torch.no_grad():
        plain = model(ids[:, 0]).logits
        one_view = model(ids[:, :1]).logits  # (B, 1, T)
        views = model(ids).logits
        embeds = model(inputs_embeds=model.transformer.wte(ids)).logits  # (B, V, T, C)
    torch.testing.assert_close(one_view, plain)
    torch.testing.assert_close(embeds, views)


def test_multiple_choice_pools_mc_token_ids_and_takes_embeds():
    torch.manual_seed(0)
    model = GPTForMultipleChoice(tiny(aux_lm_weight=0.5)).eval()
    ids = torch.randint(1, 64, (2, 3, 6))
    at = torch.tensor([[5, 2, 4], [1, 5, 3]])
    with torch.no_grad():
        out = model(ids, mc_token_ids=at, labels=torch.tensor([0, 2]))
        h = model.transformer(ids.flatten(0, 1)).last_hidden_state.view(2, 3, 6, -1)
        expected = model.multiple_choice_head(h[torch.arange(2)[:, None], torch.arange(3), at]).squeeze(-1)
        embeds = model(inputs_embeds=model.transformer.wte(ids), mc_token_ids=at).logits
    torch.testing.assert_close(out.logits, expected)
    torch.testing.assert_close(embeds, out.logits)
    assert out.loss > torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 2]))  # the auxiliary LM loss


def test_packed_qkv_tensor_parallel_style_is_registered():
    tp = pytest.importorskip("transformers.distributed.tensor_parallel")
    assert "packed_colwise_qkv" in tp.ALL_PARALLEL_STYLES


def test_multiple_choice_without_a_choices_dim_is_a_clear_error():
    with pytest.raises(ValueError, match=r"one row per choice, \(B, K, T\); got shape \(2, 6\)"):
        GPTForMultipleChoice(tiny())(torch.randint(1, 64, (2, 6)))
