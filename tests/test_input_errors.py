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
            "position_ids reaches 16, but the model has 16 positions",
        ),
        (
            dict(input_ids=torch.tensor([[1, 2]]), position_ids=torch.tensor([[-1, 0]])),
            ValueError,
            "position_ids holds -1",
        ),
        (dict(input_ids=torch.tensor([[1, 2]]), labels=torch.tensor([[1, 2, 3]])), ValueError, "labels has shape"),
        (dict(), ValueError, "exactly one of"),
    ],
)
def test_bad_input_is_a_clear_error(model, kwargs, exc, phrase):
    with pytest.raises(exc, match=phrase):
        model(**kwargs)


def test_generate_past_the_context_says_what_to_pass(model):
    """A 10-token prompt with max_new_tokens=20 on a 16-position model: the error names the context and the fix,
    not the tokenizer."""
    prompt = torch.arange(1, 11)[None]
    with pytest.raises(ValueError, match=r"longer than the model's context.*lower max_new_tokens") as caught:
        model.generate(prompt, max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert "tokenizer" not in str(caught.value)
    assert model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0).shape == (1, 16)  # fits
