"""A small synthetic corpus and word-level tokenizer for the task tests (test_tasks, test_finetune, test_hpo).

Twelve "works", three per genre (two for training, one held out). Each line mixes words common to all
works with words of its genre and the work's own name, so the genre of a passage is learnable in a few
seconds by a tiny model; plays carry speaker names, as the real corpus does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import torch

COMMON = "the and of to my thou is not with his that me be what for".split()
GENRE_WORDS = {
    "comedy": "jest merry wedding fool laugh dance wit music".split(),
    "tragedy": "death blood grave murder woe poison dagger night".split(),
    "history": "king crown war england battle throne herald siege".split(),
    "poetry": "love beauty rose time verse summer eye heart".split(),
}
NAMES = "aldo brio cato dido egon faro gaia hugo ines juno kito lear".split()
SPEAKERS = ["FIRST LORD.", "SECOND LORD.", "SERVANT.", "QUEEN."]


@dataclass(frozen=True)
class ToyWork:
    key: str
    title: str
    genre: str
    text: str
    split: str


def _line(rng: random.Random, genre: str, name: str) -> str:
    words = rng.sample(COMMON, 4) + rng.sample(GENRE_WORDS[genre], 2) + [name]
    rng.shuffle(words)
    return " ".join(words).capitalize() + rng.choice([",", ";", ".", "!"])


def toy_works(lines_per_work: int = 120) -> list[ToyWork]:
    rng = random.Random(0)
    works = []
    for g, genre in enumerate(GENRE_WORDS):
        for k in range(3):
            name = NAMES[3 * g + k]
            lines = []
            for i in range(lines_per_work):
                if genre != "poetry" and i % 5 == 0:
                    lines.append(SPEAKERS[(i // 5) % len(SPEAKERS)])
                lines.append(_line(rng, genre, name))
            split = "validation" if k == 2 else "train"
            works.append(ToyWork(f"{genre}_{name}", f"The {name.title()}", genre, "\n".join(lines), split))
    return works


def toy_split() -> tuple[list[ToyWork], list[ToyWork]]:
    works = toy_works()
    return [w for w in works if w.split == "train"], [w for w in works if w.split == "validation"]


def toy_tokenizer():
    """A word-level tokenizer over the toy vocabulary, with GPT-2's end-of-text token (no pad token)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for ws in GENRE_WORDS.values() for w in ws} | set(COMMON) | set(NAMES))
    words += [w.capitalize() for w in words] + ["FIRST", "SECOND", "LORD", "SERVANT", "QUEEN"]
    vocab = {t: i for i, t in enumerate(["<unk>", *sorted(set(words)), ",", ";", ".", "!", "<|endoftext|>"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", unk_token="<unk>")


def save_toy_lm(folder: Path, seed: int = 0) -> Path:
    """A tiny random hf_gpt LM with the toy tokenizer, saved like a pretraining run's output folder."""
    from hf_gpt import GPTConfig, GPTForCausalLM

    tok = toy_tokenizer()
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    config.eos_token_id = config.bos_token_id = tok.eos_token_id
    GPTForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
