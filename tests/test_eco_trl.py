"""TRL (issue 8): `SFTTrainer` with packing trains GPTForCausalLM on padding-free batches.

TRL's default packing ("bfd") is padding-free: each batch is one row holding every document, with
`position_ids` restarting at 0 per document and no `attention_mask`. The model reads those restarts as
document boundaries (block-diagonal causal attention), so the packed loss must equal the loss of the
same documents padded into a batch.
"""

from __future__ import annotations

import copy
import importlib.util

import pytest
import torch

from hf_gpt import GPTConfig, GPTForCausalLM, gpt2_tokenizer

# A skip mark rather than a module-level importorskip: the tests are still collected (and reported as skipped).
pytestmark = pytest.mark.skipif(importlib.util.find_spec("trl") is None, reason="pip install -e '.[ecosystem]'")

LINES = [
    "To be, or not to be, that is the question:",
    "All the world's a stage, and all the men and women merely players;",
    "Now is the winter of our discontent",
    "Friends, Romans, countrymen, lend me your ears;",
    "But, soft! what light through yonder window breaks?",
    "The course of true love never did run smooth.",
    "If music be the food of love, play on;",
    "Shall I compare thee to a summer's day?",
]


def sft_trainer(model, packing: bool, out):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(
        output_dir=str(out),
        packing=packing,
        max_length=64,
        per_device_train_batch_size=len(LINES),  # one batch holds every line
        max_steps=4,
        learning_rate=3e-3,
        logging_steps=1,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    return SFTTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict({"text": LINES}), processing_class=gpt2_tokenizer()
    )


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    # Weights 10x GPT-2's initial scale: the next-token distribution then depends on the context enough that
    # attending across a document boundary moves the loss by ~0.2 (at 0.02 it barely moves it).
    cfg = GPTConfig(
        vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return GPTForCausalLM(cfg)


@pytest.mark.slow  # SFTTrainer's set-up (tokenizing, packing)
def test_packed_batches_are_padding_free(model, tmp_path):
    batch = next(iter(sft_trainer(copy.deepcopy(model), True, tmp_path).get_train_dataloader()))
    assert "attention_mask" not in batch
    ids, pos = batch["input_ids"], batch["position_ids"]
    assert ids.shape[0] == 1 and pos.shape == ids.shape
    assert int((pos[0] == 0).sum()) == len(LINES)  # one restart per document
    # Longer than the model's 64 positions: only restarting positions make that legal.
    assert ids.shape[1] > model.config.n_positions


@pytest.mark.slow  # two SFTTrainer set-ups (tokenizing, packing)
def test_packed_loss_equals_padded_loss(model, tmp_path):
    packed = sft_trainer(copy.deepcopy(model), True, tmp_path / "packed")
    padded = sft_trainer(copy.deepcopy(model), False, tmp_path / "padded")
    pb = next(iter(packed.get_train_dataloader()))
    qb = next(iter(padded.get_train_dataloader()))
    assert "attention_mask" in qb and qb["input_ids"].shape[0] == len(LINES)
    packed.model.eval()
    padded.model.eval()
    with torch.no_grad():
        packed_loss = packed.compute_loss(packed.model, dict(pb)).item()  # TRL's own loss path
        padded_loss = padded.compute_loss(padded.model, dict(qb)).item()
        own_padded = model.eval()(**{k: qb[k] for k in ("input_ids", "attention_mask", "labels")}).loss.item()
        # The same packed row with documents allowed to see each other (an all-ones mask turns packing off).
        leaky = model(
            pb["input_ids"],
            position_ids=pb["position_ids"],
            attention_mask=torch.ones_like(pb["input_ids"]),
            labels=pb["labels"],
        ).loss.item()
    assert abs(packed_loss - padded_loss) < 1e-5, (packed_loss, padded_loss)
    assert abs(padded_loss - own_padded) < 1e-5
    assert abs(leaky - packed_loss) > 0.05  # the comparison would catch attention across documents


@pytest.mark.slow  # SFTTrainer trains four steps
def test_sft_trainer_trains_with_packing(model, tmp_path):
    trainer = sft_trainer(copy.deepcopy(model), True, tmp_path)
    before = trainer.model.transformer.h[0].attn.c_attn.weight.detach().clone()
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses
    assert not torch.equal(before, trainer.model.transformer.h[0].attn.c_attn.weight)
