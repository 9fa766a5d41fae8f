"""Sliding-window perplexity (issue 3): a hand-computed case, agreement with transformers' own loss and
models, and `hf-gpt eval-ppl` giving the same number for ours and for transformers' GPT-2."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import early, early_prepared, early_result, sharpen_attention
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel

from hf_gpt import GPTForCausalLM
from hf_gpt.perplexity import sliding_window_perplexity

TEXT = (
    "The quick brown fox jumps over the lazy dog. A language model assigns a probability to every sequence of "
    "tokens; its perplexity on a text is the exponential of the average negative log-likelihood per token. "
    "Fixed-length models cannot condition on more than their context, so a long text is scored in windows. "
    "With a stride smaller than the window, every scored token keeps at least some context from before. "
) * 6


class PositionalOracle(nn.Module):
    """For the sequence next = (current + 1) % V, puts logit i on the right next token at window position i
    and 0 on every other token, so P(right | window position i) = e^i / (e^i + V - 1)."""

    def __init__(self, vocab: int, n_positions: int) -> None:
        super().__init__()
        self.config = SimpleNamespace(n_positions=n_positions)
        self.vocab = vocab
        self.unused = nn.Parameter(torch.zeros(()))  # gives the function a device

    def forward(self, input_ids: torch.Tensor, logits_to_keep: int = 0) -> SimpleNamespace:
        B, T = input_ids.shape
        assert T <= self.config.n_positions
        logits = torch.zeros(B, T, self.vocab)
        position = torch.arange(T, dtype=torch.float32)[None, :, None].expand(B, T, 1)
        logits.scatter_(-1, ((input_ids + 1) % self.vocab)[..., None], position)
        return SimpleNamespace(logits=logits[:, -logits_to_keep:] if logits_to_keep else logits)


class OracleWithoutLogitsToKeep(PositionalOracle):
    def forward(self, input_ids: torch.Tensor) -> SimpleNamespace:  # the function must then slice itself
        return super().forward(input_ids)


def nll_at(position: int, vocab: int) -> float:
    return math.log(math.exp(position) + vocab - 1) - position


@pytest.mark.parametrize("oracle", [PositionalOracle, OracleWithoutLogitsToKeep])
@pytest.mark.parametrize(
    "stride, positions",
    [
        # 7 tokens, windows of 4. Each entry: the window position the scored token is predicted from.
        (4, [0, 1, 2, 0, 1]),  # windows [0,4) [4,7): the first token of each window has no context
        (2, [0, 1, 2, 1, 2, 1]),  # [0,4) then [2,6) scores 4,5; [4,7) scores 6
        (1, [0, 1, 2, 2, 2, 2]),  # every later token sees 3 tokens of context
    ],
)
def test_hand_computed(oracle, stride, positions):
    V = 5
    model = oracle(V, n_positions=4)
    result = sliding_window_perplexity(model, torch.arange(7) % V, stride=stride, max_length=4)
    expected = sum(nll_at(p, V) for p in positions) / len(positions)
    assert result.n_tokens == len(positions)
    assert result.nll == pytest.approx(expected, rel=1e-6)
    assert result.perplexity == pytest.approx(math.exp(expected), rel=1e-6)


def test_more_context_gives_lower_perplexity():
    model = PositionalOracle(11, n_positions=16)
    ids = torch.arange(100) % 11
    ppl = [sliding_window_perplexity(model, ids, stride=s, max_length=16).perplexity for s in (16, 8, 2)]
    assert ppl[0] > ppl[1] > ppl[2]


def test_uniform_model_has_perplexity_vocab_size():
    class Uniform(PositionalOracle):
        def forward(self, input_ids, logits_to_keep=0):
            return SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))

    result = sliding_window_perplexity(Uniform(50, n_positions=8), torch.randint(0, 50, (37,)), stride=3)
    assert result.perplexity == pytest.approx(50.0, rel=1e-6)
    assert result.n_tokens == 36 and result.max_length == 8


def test_arguments_are_checked():
    model = PositionalOracle(5, n_positions=8)
    with pytest.raises(ValueError, match="stride"):
        sliding_window_perplexity(model, torch.arange(20) % 5, stride=9, max_length=8)
    with pytest.raises(ValueError, match="longer than the model's context"):
        sliding_window_perplexity(model, torch.arange(20) % 5, stride=4, max_length=16)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        sliding_window_perplexity(model, torch.tensor([1]), stride=4)


def guide_perplexity(model, ids: torch.Tensor, stride: int, max_length: int) -> float:
    """The guide's loop on transformers' own `labels=` loss, with the scored tokens counted exactly."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, ids.numel(), stride):
        end = min(begin + max_length, ids.numel())
        trg_len = end - prev_end
        window = ids[begin:end][None]
        labels = window.clone()
        labels[:, :-trg_len] = -100
        n = (labels[:, 1:] != -100).sum().item()  # the loss shifts labels by one
        with torch.no_grad():
            nll += model(window, labels=labels).loss.item() * n
        count += n
        prev_end = end
        if end == ids.numel():
            break
    return math.exp(nll / count)


@pytest.mark.parametrize("family", ["gpt2", "gpt1"])
def test_ours_equals_transformers_at_two_strides(family, gpt2_ref, gpt1_ref):
    ref, folder = gpt2_ref if family == "gpt2" else gpt1_ref
    ours = GPTForCausalLM.from_pretrained(folder).eval()
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, ref.config.vocab_size, (300,), generator=g)
    max_length = ref.config.n_positions
    for stride in (max_length, max_length // 4):
        a = sliding_window_perplexity(ref, ids, stride=stride)
        b = sliding_window_perplexity(ours, ids, stride=stride)
        print(f"\n{family} stride {stride}: transformers ppl {a.perplexity:.6f}, ours {b.perplexity:.6f}")
        assert b.perplexity == pytest.approx(a.perplexity, rel=1e-4)
        assert b.n_tokens == a.n_tokens == (299 if stride < max_length else 300 - a.n_windows)
        assert a.perplexity == pytest.approx(guide_perplexity(ref, ids, stride, max_length), rel=1e-5)
    assert a.n_windows > 4


# ---------------------------------------------------------------- the command line


def eval_ppl(*args: str) -> dict:
    """`hf-gpt eval-ppl ARGS` as a command line; returns its JSON line."""
    proc = subprocess.run(
        [sys.executable, "-m", "hf_gpt.cli", "eval-ppl", *args],
        capture_output=True,
        text=True,
        env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("perplexity ")
    return json.loads(lines[-1])


@early("eval_ppl_runs")
def run_eval_ppl(work: Path):
    """Prepared: a tiny GPT-2 over the real GPT-2 vocabulary, saved by transformers without tokenizer files, and a
    text. Run in the background (conftest's `early`): `hf-gpt eval-ppl` at stride 32, for transformers' class and
    for ours (each a fresh interpreter)."""
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.1)).eval()
    sharpen_attention(ref)
    folder, text = work / "gpt2_50k", work / "text.txt"
    ref.save_pretrained(folder)
    text.write_text(TEXT, encoding="utf-8")

    def run() -> tuple[dict, dict]:
        args = [str(folder), str(text), "--stride", "32"]
        return eval_ppl(*args), eval_ppl(*args, "--hf-gpt")

    return (folder, text), run


@pytest.fixture(scope="module")
def gpt2_50k():
    return early_prepared("eval_ppl_runs")


@pytest.fixture(scope="module")
def eval_ppl_runs():
    return early_result("eval_ppl_runs")


@pytest.mark.slow
def test_eval_ppl_cli_same_for_ours_and_transformers(gpt2_50k, eval_ppl_runs, capsys):
    folder, text = gpt2_50k
    theirs, ours = eval_ppl_runs
    assert theirs["model_class"] == "GPT2LMHeadModel" and ours["model_class"] == "GPTForCausalLM"
    assert ours["perplexity"] == pytest.approx(theirs["perplexity"], rel=1e-4)
    assert ours["n_tokens"] == theirs["n_tokens"] > 300
    # A second stride, in-process (same code path, without paying for two more interpreter starts).
    from training.evaluate import main

    results = {}
    for flag in ([], ["--hf-gpt"]):
        assert main([str(folder), str(text), "--stride", "64", *flag]) == 0
        results[bool(flag)] = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    with capsys.disabled():  # the figures, for the record
        print(f"\neval-ppl stride 32: transformers {theirs['perplexity']:.6f}, ours {ours['perplexity']:.6f}")
        print(
            f"eval-ppl stride 64: transformers {results[False]['perplexity']:.6f}, ours {results[True]['perplexity']:.6f}"
        )
    assert results[True]["perplexity"] == pytest.approx(results[False]["perplexity"], rel=1e-4)
    assert results[True]["perplexity"] != pytest.approx(ours["perplexity"], rel=1e-6)  # the stride matters


def test_eval_ppl_cli_error_is_clear(tmp_path, capsys):
    """(In this process, through the same `hf_gpt.cli.main` the console script calls; the runs above are real
    processes.)"""
    from hf_gpt.cli import main

    text = tmp_path / "t.txt"
    text.write_text("hello")
    assert main(["eval-ppl", str(tmp_path / "missing"), str(text)]) == 1
    err = capsys.readouterr().err
    assert "hf-gpt eval-ppl: error:" in err and "Traceback" not in err
