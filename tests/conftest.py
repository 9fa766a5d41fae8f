"""Shared fixtures: reference checkpoints made here with transformers' own GPT-2 / OpenAI-GPT classes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch

# Tests never reach the Hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One thread: the models here are tiny, and two OpenMP threads on a busy 2-core machine spin-wait for each other
# (measured: GPT-1 reference's 40 training steps, 0.9 s on one thread, 14 s on two). Tests of the multi-threaded
# paths set their thread count themselves.
torch.set_num_threads(1)


def sharpen_attention(model: torch.nn.Module, factor: float = 6.0) -> None:
    """Scale the query and key projections so attention is peaked: random 0.02-std weights give nearly
    uniform attention, under which a wrong mask or position barely moves the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("attn.c_attn.weight"):
                C = p.shape[0]  # Conv1D (in, out): the first 2*C output columns are q and k
                p[:, : 2 * C] *= factor
            elif name.endswith("attn.c_attn.bias"):
                p.normal_(0.0, 0.5)


def train_briefly(model: torch.nn.Module, vocab_size: int, steps: int = 40, seq: int = 24) -> None:
    """A few Adam steps on sequences that follow a fixed random permutation (next = perm[current]),
    so the model makes confident, varied predictions that depend on the context."""
    g = torch.Generator().manual_seed(1234)
    perm = torch.randperm(vocab_size, generator=g)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        ids = torch.empty(8, seq, dtype=torch.long)
        ids[:, 0] = torch.randint(0, vocab_size, (8,), generator=g)
        for t in range(1, seq):
            ids[:, t] = perm[ids[:, t - 1]]
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def make_gpt2(tmp_path_factory, train_steps: int = 40, **overrides):
    """A seeded transformers GPT-2 with peaked attention, trained `train_steps` steps (see `train_briefly`), saved."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    kwargs = dict(vocab_size=128, n_positions=64, n_embd=64, n_layer=3, n_head=4, initializer_range=0.1)
    kwargs.update(overrides)
    kwargs.setdefault("bos_token_id", kwargs["vocab_size"] - 1)
    kwargs.setdefault("eos_token_id", kwargs["vocab_size"] - 1)
    ref = GPT2LMHeadModel(GPT2Config(**kwargs)).eval()
    sharpen_attention(ref)
    if train_steps:
        train_briefly(ref, kwargs["vocab_size"], steps=train_steps)
    folder = tmp_path_factory.mktemp("gpt2_ref")
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="session")
def gpt2_ref(tmp_path_factory):
    """(transformers GPT2LMHeadModel, folder it saved) at a tiny shape with peaked attention."""
    return make_gpt2(tmp_path_factory)


@pytest.fixture(scope="session")
def gpt1_ref(tmp_path_factory):
    """(transformers OpenAIGPTLMHeadModel, folder it saved) at a tiny shape with peaked attention."""
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel

    torch.manual_seed(1)
    ref = OpenAIGPTLMHeadModel(
        OpenAIGPTConfig(vocab_size=120, n_positions=48, n_embd=64, n_layer=3, n_head=4, initializer_range=0.1)
    ).eval()
    sharpen_attention(ref)
    train_briefly(ref, 120)
    folder = tmp_path_factory.mktemp("gpt1_ref")
    ref.save_pretrained(folder)
    return ref, folder


@pytest.fixture(scope="session")
def gpt2_tok():
    from hf_gpt.tokenization import gpt2_tokenizer

    return gpt2_tokenizer()


# ---------------------------------------------------------------- training runs


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine two OpenMP threads that spin-wait
    for each other run these models ~40x slower (measured: 8 ms vs 360 ms per forward)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """About 17 kB of simple, learnable English, made here (tests never read shared/data)."""
    rng = random.Random(0)
    who = ["the king", "my lord", "the queen", "a fool", "good Romeo", "fair Juliet", "the duke", "this man"]
    does = ["speaks of", "loves", "hates", "calls for", "waits on", "follows", "mocks", "fears"]
    what = ["the crown", "his sword", "the night", "her honour", "the sea", "my heart", "the moon", "thy name"]
    lines = []
    for i in range(600):
        lines.append(f"{rng.choice(who).capitalize()} {rng.choice(does)} {rng.choice(what)}.")
        if i % 4 == 3:
            lines.append("")
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n".join(lines))
    return path
