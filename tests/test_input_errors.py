"""Bad input raises a clear exception at the model boundary (issue 7, model side)."""

from __future__ import annotations

import pytest
import torch

from hf_gpt import GPTConfig, GPTForCausalLM


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return GPTForCausalLM(GPTConfig(vocab_size=50, n_positions=16, n_embd=32, n_layer=1, n_head=2)).eval()


@pytest.mark.parametrize(
    "kwargs, exc, phrase",
    [
        (dict(input_ids=torch.tensor([[1, 50]])), ValueError, r"input_ids holds 50, outside \[0, 49\]"),
        (dict(input_ids=torch.tensor([[-1, 3]])), ValueError, r"input_ids holds -1"),
        (dict(input_ids=torch.zeros(1, 17, dtype=torch.long)), ValueError, "longer than the model's 16 positions"),
        (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), ValueError, "Empty input"),
        (dict(input_ids=torch.tensor([[1.0, 2.0]])), TypeError, "must be an integer tensor"),
        (
            dict(input_ids=torch.tensor([[1, 2]]), attention_mask=torch.ones(1, 3)),
            ValueError,
            "attention_mask has shape",
        ),
        (
            dict(input_ids=torch.tensor([[1, 2]]), position_ids=torch.tensor([[0, 1, 2]])),
            ValueError,
            "position_ids has shape",
        ),
        (
            dict(input_ids=torch.tensor([[1, 2]]), position_ids=torch.tensor([[0, 16]])),
            ValueError,
            "position_ids holds 16",
        ),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), ValueError, "labels has shape"),
        (dict(), ValueError, "exactly one of"),
    ],
)
def test_bad_input_is_a_clear_error(model, kwargs, exc, phrase):
    with pytest.raises(exc, match=phrase):
        model(**kwargs)
