"""GPT-1's input transformations (issue 4): task tokens, per-task sequences, truncation rules, padding."""

from __future__ import annotations

import pytest
import torch
from tasks_toy import toy_tokenizer
from transformers import AutoTokenizer

from hf_gpt import GPTConfig, GPTForMultipleChoice, GPTForSequenceClassification
from hf_gpt.task_inputs import (
    DELIMITER,
    EXTRACT,
    START,
    TaskCollator,
    TaskEncoder,
    add_task_tokens,
    task_token_ids,
)


@pytest.fixture
def tok():
    t = toy_tokenizer()
    add_task_tokens(t)
    return t


def words(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def test_add_task_tokens_resizes_and_keeps_the_head_tied(tmp_path):
    tok = toy_tokenizer()
    n = len(tok)
    model = GPTForSequenceClassification(GPTConfig(vocab_size=n, n_positions=32, n_embd=16, n_layer=1, n_head=2))
    ids = add_task_tokens(tok, model)
    assert len(tok) == n + 3 and (ids.start, ids.delimiter, ids.extract) == (n, n + 1, n + 2)
    assert ids.pad == tok.eos_token_id == model.config.pad_token_id  # no pad token before: end-of-text pads
    assert model.transformer.wte.weight.shape[0] == n + 3 == model.config.vocab_size
    assert model.lm_head.weight is model.transformer.wte.weight
    assert add_task_tokens(tok, model) == ids and len(tok) == n + 3  # idempotent
    # The special tokens are single ids inside text and survive save / load.
    assert words(tok, f"{START}king{DELIMITER}queen{EXTRACT}")[::2] == [ids.start, ids.delimiter, ids.extract]
    tok.save_pretrained(tmp_path)
    assert task_token_ids(AutoTokenizer.from_pretrained(tmp_path)) == ids
    with pytest.raises(ValueError, match="add_task_tokens"):
        task_token_ids(toy_tokenizer())


def test_the_four_transformations(tok):
    ids = task_token_ids(tok)
    s, d, e = ids.start, ids.delimiter, ids.extract
    enc = TaskEncoder(tok, max_length=64)
    a, b = "the king is dead", "long live the king"
    assert enc.classification(a) == [s, *words(tok, a), e]
    assert enc.entailment(a, b) == [s, *words(tok, a), d, *words(tok, b), e]
    assert enc.similarity(a, b) == [
        [s, *words(tok, a), d, *words(tok, b), e],
        [s, *words(tok, b), d, *words(tok, a), e],
    ]
    mc = enc.multiple_choice(a, ["long live", "the queen"])
    assert mc == [[s, *words(tok, a), d, *words(tok, x), e] for x in ("long live", "the queen")]
    row = {"context": a, "choices": ["long live", "the queen"], "label": 1}
    assert enc("multiple_choice", row) == {"input_ids": mc}


def test_truncation_cuts_the_context_from_the_left_and_never_the_answer(tok):
    ids = task_token_ids(tok)
    premise = "the king and the queen of england with thou"  # 9 words
    hyp = "long live"
    enc = TaskEncoder(tok, max_length=8)
    out = enc.entailment(premise, hyp)
    assert len(out) == 8
    assert out == [ids.start, *words(tok, premise)[-3:], ids.delimiter, *words(tok, hyp), ids.extract]
    assert enc.classification(premise)[1:-1] == words(tok, premise)[-6:]
    mc = enc.multiple_choice(premise, ["long", "long live the"])  # context fits the longest answer
    assert [len(x) for x in mc] == [6, 8] and mc[0][1:3] == mc[1][1:3] == words(tok, premise)[-2:]
    with pytest.raises(ValueError, match="hypothesis alone"):
        enc.entailment(premise, "the king and the queen")  # the answer is never cut
    with pytest.raises(ValueError, match="truncate"):
        TaskEncoder(tok, max_length=8, truncate=False).entailment(premise, hyp)


def test_similarity_truncation_is_longest_first(tok):
    enc = TaskEncoder(tok, max_length=11)  # 8 tokens for the two passages
    long, short = "the king and the queen of england with", "long live"
    a_view, b_view = enc.similarity(long, short)
    assert len(a_view) == len(b_view) == 11
    assert a_view[1:7] == words(tok, long)[-6:] and a_view[8:10] == words(tok, short)  # the short one is whole
    even = enc.similarity(long, long)[0]
    assert even[1:5] == even[6:10] == words(tok, long)[-4:]


def test_collator_pads_and_heads_pool_each_rows_extract_token(tok):
    """Right padding plus the head's last-real-token pooling: a padded batch gives each example's own logits."""
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=len(tok), n_positions=32, n_embd=16, n_layer=2, n_head=2, pad_token_id=0)
    enc = TaskEncoder(tok, max_length=32)
    collate = TaskCollator(task_token_ids(tok).pad)

    model = GPTForSequenceClassification(config).eval()
    rows = [
        {"input_ids": enc.similarity(a, b), "label": y}
        for a, b, y in [("the king", "long live the queen", 1), ("woe", "the grave", 0)]
    ]
    batch = collate(rows)
    assert batch["input_ids"].shape == (2, 2, 9) and batch["labels"].dtype == torch.long
    assert batch["attention_mask"][1].sum(-1).tolist() == [6, 6]
    with torch.no_grad():
        together = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
        alone = torch.cat([model(torch.tensor([r["input_ids"]])).logits for r in rows])
    torch.testing.assert_close(together, alone)

    mc_model = GPTForMultipleChoice(config).eval()
    rows = [{"input_ids": enc.multiple_choice("the king", ["long live", "woe", "the grave is cold"]), "label": 2}]
    batch = collate(rows * 2)
    assert batch["input_ids"].shape == (2, 3, 9)
    with torch.no_grad():
        logits = mc_model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        first = mc_model(torch.tensor([rows[0]["input_ids"][0]])[:, None]).logits
    torch.testing.assert_close(logits[:, :1], first.expand(2, 1))
    assert TaskCollator(0, regression=True)([{"input_ids": [1, 2], "label": 0.5}])["labels"].dtype == torch.float
