"""`--precision auto` (issue 18): bf16 autocast where the hardware has it and it pays for the model's width."""

from __future__ import annotations

import pytest

import hf_gpt
from training import arguments


def cpu_args(monkeypatch, features: set[str], *flags: str) -> arguments.LMTrainingArguments:
    """LMTrainingArguments parsed from `flags` on a CPU that reports `features` (amx_tile, avx512_bf16)."""
    monkeypatch.setattr(arguments, "_cpu_has", lambda name: name in features)
    monkeypatch.setattr(arguments.torch.accelerator, "is_available", lambda: False)
    return arguments.parse_args(["--report_to", "none", *flags])[3]


def config(n_embd: int) -> hf_gpt.GPTConfig:
    return hf_gpt.GPTConfig(vocab_size=65, n_positions=64, n_layer=2, n_head=4, n_embd=n_embd)


@pytest.mark.parametrize(
    ("features", "n_embd", "bf16"),
    [
        ({"avx512_bf16"}, 32, False),  # as fast in fp32
        ({"avx512_bf16"}, 128, True),  # the main job and nanoGPT's quick start: 0.6-0.7x the fp32 step
        ({"avx512_bf16"}, arguments.CPU_BF16_MIN_WIDTH - 4, False),
        ({"avx512_bf16"}, arguments.CPU_BF16_MIN_WIDTH, True),
        ({"avx512_bf16"}, 768, True),  # GPT-2 small
        ({"amx_tile", "avx512_bf16"}, 128, True),  # AMX: bf16 at every width
        (set(), 768, False),  # no native bf16
    ],
)
def test_auto_precision_on_cpu_follows_native_bf16_and_the_models_width(monkeypatch, features, n_embd, bf16):
    args = cpu_args(monkeypatch, features)
    args.choose_precision(config(n_embd))
    assert args.bf16 is bf16 and not args.fp16
    assert args.mixed_precision == ("bf16" if bf16 else "no")
    assert not args.precision_from_model


@pytest.mark.parametrize(("flags", "bf16"), [(["--precision", "fp32"], False), (["--precision", "bf16"], True)])
def test_explicit_precision_is_kept_whatever_the_width(monkeypatch, flags, bf16):
    args = cpu_args(monkeypatch, {"avx512_bf16"}, *flags)
    args.choose_precision(config(128 if bf16 else 768))
    assert args.bf16 is bf16
    assert args.mixed_precision == ("bf16" if bf16 else "no")


def test_bf16_flag_with_auto_precision_is_kept(monkeypatch):
    args = cpu_args(monkeypatch, {"avx512_bf16"}, "--bf16", "true")
    args.choose_precision(config(128))
    assert args.bf16 and args.mixed_precision == "bf16"
