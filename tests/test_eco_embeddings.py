"""Feature extraction and sentence embeddings (issue 8): `pipeline("feature-extraction")` on a saved folder, and
`hf_gpt.embeddings.embed`, the mean of those features over each text's tokens."""

from __future__ import annotations

import pytest
import torch
from transformers import pipeline

from hf_gpt import GPTConfig, GPTForCausalLM, GPTModel, gpt2_tokenizer
from hf_gpt.embeddings import embed, mean_pool

ATOL = 1e-5
TEXTS = [
    "To be, or not to be, that is the question:",
    "Now is the winter of our discontent",
    "All the world's a stage, and all the men and women merely players; they have their exits and their entrances",
    "Good night, good night! parting is such sweet sorrow",
]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """(GPTForCausalLM, folder it was saved in with its tokenizer)."""
    torch.manual_seed(0)
    model = GPTForCausalLM(GPTConfig(vocab_size=50257, n_positions=48, n_embd=32, n_layer=2, n_head=2)).eval()
    with torch.no_grad():  # peaked attention, so padding or position mistakes would show
        for block in model.transformer.h:
            block.attn.c_attn.weight[: 2 * model.config.n_embd] *= 6.0
    folder = tmp_path_factory.mktemp("embeddings")
    model.save_pretrained(folder)
    gpt2_tokenizer(model_max_length=48).save_pretrained(folder)
    return model, folder


def test_feature_extraction_pipeline_from_folder(saved):
    model, folder = saved
    pipe = pipeline("feature-extraction", model=str(folder), trust_remote_code=True)
    assert isinstance(pipe.model, GPTModel)
    tok = gpt2_tokenizer()
    for text in TEXTS[:2]:
        feats = torch.tensor(pipe(text))[0]  # (T, C)
        ids = tok(text, return_tensors="pt").input_ids
        with torch.no_grad():
            expected = model.transformer(ids).last_hidden_state[0]
        assert feats.shape == expected.shape == (ids.shape[1], 32)
        torch.testing.assert_close(feats, expected, atol=ATOL, rtol=0)
        # The helper's embedding is the mean of exactly these features.
        torch.testing.assert_close(embed(model, tok, text, normalize=False), feats.mean(0), atol=ATOL, rtol=0)


def test_batched_embeddings_equal_each_text_alone(saved):
    model, _ = saved
    tok = gpt2_tokenizer()
    batched = embed(model, tok, TEXTS, batch_size=3)  # different lengths, padded, reordered by length
    alone = torch.stack([embed(model, tok, t) for t in TEXTS])
    assert batched.shape == (len(TEXTS), 32)
    torch.testing.assert_close(batched, alone, atol=ATOL, rtol=0)
    torch.testing.assert_close(batched.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-6, rtol=0)
    # The LM and its base model give the same vectors, and the caller's training mode is left alone.
    model.transformer.train()
    torch.testing.assert_close(embed(model.transformer, tok, TEXTS), batched, atol=ATOL, rtol=0)
    assert model.transformer.training
    model.eval()
    # Different texts give different vectors (a constant embedding would pass the checks above).
    sims = batched @ batched.T
    assert sims.fill_diagonal_(0).abs().max() < 0.999


def test_mean_pool_ignores_padding():
    h = torch.randn(2, 5, 3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    pooled = mean_pool(h, mask)
    torch.testing.assert_close(pooled[0], h[0, :3].mean(0))
    torch.testing.assert_close(pooled[1], h[1].mean(0))
    torch.testing.assert_close(mean_pool(h), h.mean(1))


def test_long_text_is_truncated_and_empty_text_refused(saved):
    model, _ = saved
    tok = gpt2_tokenizer()
    long_text = " ".join(TEXTS * 4)  # well over the model's 48 positions
    assert len(tok(long_text).input_ids) > 48
    first_48 = tok.decode(tok(long_text).input_ids[:48])
    torch.testing.assert_close(embed(model, tok, long_text), embed(model, tok, first_48), atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"texts \[1\] have no tokens"):
        embed(model, tok, ["fine", ""])
