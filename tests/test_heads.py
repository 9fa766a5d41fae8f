"""Task heads (issue 4): same logits as transformers' GPT-2 heads on the same weights, and GPT-1's extras."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers import (
    AutoModelForMultipleChoice,
    AutoModelForQuestionAnswering,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from hf_gpt import (
    GPTConfig,
    GPTForCausalLM,
    GPTForMultipleChoice,
    GPTForQuestionAnswering,
    GPTForSequenceClassification,
    GPTForTokenClassification,
)

ATOL = 1e-5
PAD = 0


def reference_head(cls_name: str, gpt2_ref, folder, **config_overrides):
    """transformers' head `cls_name` with the base weights of the shared reference LM, saved to `folder`."""
    ref, _ = gpt2_ref
    config = ref.config.__class__.from_dict({**ref.config.to_dict(), "pad_token_id": PAD, **config_overrides})
    torch.manual_seed(5)
    head = getattr(transformers, cls_name)(config).eval()
    missing, unexpected = head.load_state_dict(ref.state_dict(), strict=False)
    assert not [k for k in missing if k.startswith("transformer.")]
    with torch.no_grad():  # give the random head enough scale that differences show
        for name, p in head.named_parameters():
            if not name.startswith("transformer.") and not name.startswith("lm_head"):
                p.normal_(0, 0.5)
    head.save_pretrained(folder)
    return head


def padded_batch():
    ids = torch.tensor([[5, 9, 14, 3, 22, 7], [8, 1, 30, 2, PAD, PAD]])
    mask = (torch.arange(6)[None] < torch.tensor([[6], [4]])).long()
    return ids, mask


def test_sequence_classification_matches_gpt2(gpt2_ref, tmp_path):
    ref = reference_head("GPT2ForSequenceClassification", gpt2_ref, tmp_path, num_labels=3)
    ours = GPTForSequenceClassification.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
        b = ours(ids, attention_mask=mask, labels=torch.tensor([0, 2]))
        c = ours(ids).logits  # pad_token_id alone finds the last real token too
    assert b.logits.shape == (2, 3)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)
    torch.testing.assert_close(c, b.logits, atol=ATOL, rtol=0)


def test_token_classification_matches_gpt2(gpt2_ref, tmp_path):
    ref = reference_head("GPT2ForTokenClassification", gpt2_ref, tmp_path, num_labels=5)
    ours = GPTForTokenClassification.from_pretrained(tmp_path).eval()
    ids, _ = padded_batch()
    labels = torch.randint(0, 5, ids.shape)
    with torch.no_grad():
        a, b = ref(ids, labels=labels), ours(ids, labels=labels)
    torch.testing.assert_close(a.logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)


def test_question_answering_matches_gpt2(gpt2_ref, tmp_path):
    ref = reference_head("GPT2ForQuestionAnswering", gpt2_ref, tmp_path)
    ours = GPTForQuestionAnswering.from_pretrained(tmp_path).eval()
    ids, _ = padded_batch()
    kw = dict(start_positions=torch.tensor([1, 2]), end_positions=torch.tensor([3, 3]))
    with torch.no_grad():
        a, b = ref(ids, **kw), ours(ids, **kw)
    torch.testing.assert_close(a.start_logits, b.start_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.end_logits, b.end_logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.loss, b.loss, atol=ATOL, rtol=0)


def test_multiple_choice_matches_gpt2_double_heads(gpt2_ref, tmp_path):
    ref = reference_head("GPT2DoubleHeadsModel", gpt2_ref, tmp_path)
    ours = GPTForMultipleChoice.from_pretrained(tmp_path).eval()
    torch.manual_seed(0)
    ids = torch.randint(1, 128, (2, 4, 7))  # (B, K choices, T)
    mc_token_ids = torch.tensor([[6, 6, 5, 6], [4, 6, 6, 3]])
    labels = torch.tensor([1, 3])
    with torch.no_grad():
        a = ref(ids, mc_token_ids=mc_token_ids, mc_labels=labels)
        b = ours(ids, mc_token_ids=mc_token_ids, labels=labels)
    assert b.logits.shape == (2, 4)
    torch.testing.assert_close(a.mc_logits, b.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(a.mc_loss, b.loss, atol=ATOL, rtol=0)
    # Without mc_token_ids the last real token (from the mask) is scored.
    mask = (torch.arange(7)[None, None] <= mc_token_ids[..., None]).long()
    with torch.no_grad():
        c = ours(ids, attention_mask=mask).logits
    torch.testing.assert_close(c, b.logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize(
    "cls_name, ours_cls, field",
    [
        ("GPT2ForSequenceClassification", GPTForSequenceClassification, "logits"),
        ("GPT2ForTokenClassification", GPTForTokenClassification, "logits"),
        ("GPT2ForQuestionAnswering", GPTForQuestionAnswering, "start_logits"),
        ("GPT2DoubleHeadsModel", GPTForMultipleChoice, "mc_logits"),
    ],
)
def test_heads_use_token_type_ids_as_gpt2(cls_name, ours_cls, field, gpt2_ref, tmp_path):
    """Every head hands `token_type_ids` to the transformer, as GPT-2's do (they were once silently dropped)."""
    ref = reference_head(cls_name, gpt2_ref, tmp_path, num_labels=3)
    ours = ours_cls.from_pretrained(tmp_path).eval()
    ids, mask = padded_batch()
    types = torch.tensor([[0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    kw = {}
    if ours_cls is GPTForMultipleChoice:  # (B, K, T): the same rows as K = 2 choices, each scored at its last token
        ids, mask, types = (t[:, None].repeat(1, 2, 1) for t in (ids, mask, types))
        kw["mc_token_ids"] = mask.sum(-1) - 1
    with torch.no_grad():
        a = ref(ids, attention_mask=mask, token_type_ids=types, **kw)[field]
        b = ours(ids, attention_mask=mask, token_type_ids=types, **kw)[field.removeprefix("mc_")]
        plain = ours(ids, attention_mask=mask, **kw)[field.removeprefix("mc_")]
    if b.shape[:2] == mask.shape:  # one output per token: those of padding tokens are unspecified
        a, b, plain = a[mask.bool()], b[mask.bool()], plain[mask.bool()]
    torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    assert not torch.allclose(b, plain, atol=1e-3)  # the types change the result


def tiny(**kw) -> GPTConfig:
    return GPTConfig(vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, pad_token_id=0, **kw)


@pytest.mark.parametrize(
    "problem_type, num_labels, labels",
    [
        ("regression", 1, torch.tensor([0.5, -1.0])),
        ("single_label_classification", 3, torch.tensor([2, 0])),
        ("multi_label_classification", 3, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]])),
    ],
)
def test_sequence_classification_problem_types(problem_type, num_labels, labels):
    torch.manual_seed(0)
    model = GPTForSequenceClassification(tiny(num_labels=num_labels, problem_type=problem_type)).eval()
    ids = torch.randint(1, 64, (2, 5))
    out = model(ids, labels=labels)
    logits = out.logits
    if problem_type == "regression":
        expected = torch.nn.functional.mse_loss(logits.squeeze(-1), labels)
    elif problem_type == "single_label_classification":
        expected = torch.nn.functional.cross_entropy(logits, labels)
    else:
        expected = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
    torch.testing.assert_close(out.loss, expected)


def test_similarity_views_are_summed():
    """GPT-1 similarity: both orders encoded, pooled representations added before the head."""
    torch.manual_seed(0)
    model = GPTForSequenceClassification(tiny(num_labels=1)).eval()
    a = torch.tensor([[3, 4, 5, 6]])
    b = torch.tensor([[6, 5, 7, 3]])
    with torch.no_grad():
        both = model(torch.stack([a, b], dim=1)).logits  # (1, 2 views, T)
        h_a = model.transformer(a).last_hidden_state[:, -1]
        h_b = model.transformer(b).last_hidden_state[:, -1]
    torch.testing.assert_close(both, model.score(h_a + h_b))


def test_auxiliary_lm_loss_is_added_with_weight():
    torch.manual_seed(0)
    base = GPTForSequenceClassification(tiny(num_labels=2)).eval()
    aux = GPTForSequenceClassification(tiny(num_labels=2, aux_lm_weight=0.5)).eval()
    aux.load_state_dict(base.state_dict())
    lm = GPTForCausalLM(tiny()).eval()
    lm.load_state_dict(base.state_dict(), strict=False)
    ids, mask = torch.tensor([[5, 6, 7, 8], [9, 10, 0, 0]]), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    labels = torch.tensor([0, 1])
    with torch.no_grad():
        plain = base(ids, attention_mask=mask, labels=labels).loss
        total = aux(ids, attention_mask=mask, labels=labels).loss
        lm_loss = lm(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
    torch.testing.assert_close(total, plain + 0.5 * lm_loss)
    assert aux.lm_head.weight is aux.transformer.wte.weight


@pytest.mark.parametrize(
    "auto_class, model_class",
    [
        (AutoModelForSequenceClassification, GPTForSequenceClassification),
        (AutoModelForMultipleChoice, GPTForMultipleChoice),
        (AutoModelForTokenClassification, GPTForTokenClassification),
        (AutoModelForQuestionAnswering, GPTForQuestionAnswering),
    ],
)
def test_heads_are_registered_and_load_base_from_lm(auto_class, model_class, tmp_path):
    torch.manual_seed(0)
    lm = GPTForCausalLM(tiny())
    lm.save_pretrained(tmp_path)
    head = auto_class.from_pretrained(tmp_path)
    assert isinstance(head, model_class)
    assert torch.equal(head.transformer.wte.weight, lm.transformer.wte.weight)
    assert torch.equal(head.transformer.h[1].mlp.c_fc.weight, lm.transformer.h[1].mlp.c_fc.weight)
