"""What a run leaves in its folder besides checkpoints: the final model, `run_info.json` (resolved arguments, git
revision, hardware, metrics), `log_history.json` / `.csv`, `loss_curve.png`, `samples.txt` and the model card.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import Trainer, set_seed
from transformers.trainer_utils import TrainOutput

import hf_gpt
from training import data
from training.arguments import SHAKESPEARE_PROMPTS, DataArguments, LMTrainingArguments, ModelArguments, SampleArguments
from training.trainer import perplexity

logger = logging.getLogger(__name__)


def save_final_model(trainer: Trainer, tokenizer, out: Path) -> None:
    """Config, weights, generation config and tokenizer into the run folder root (`save_pretrained`)."""
    if not trainer.is_fsdp_enabled:
        trainer.save_model()
        return
    # FSDP2 swaps each module's class for a generated subclass; save_pretrained would record that class in
    # `auto_map` and copy torch's FSDP sources beside our code. Gather the weights and save a plain model.
    state = trainer.accelerator.get_state_dict(trainer.model)
    if trainer.is_world_process_zero():
        config = trainer.model.config
        plain = hf_gpt.GPTForCausalLM(config)
        plain.load_state_dict(state)
        plain.generation_config = trainer.model.generation_config
        plain.save_pretrained(out)
        tokenizer.save_pretrained(out)
    trainer.accelerator.wait_for_everyone()


def git_revision() -> str | None:
    """The commit of this checkout, with "-dirty" when files differ from it; None outside git."""
    repo = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, timeout=10)
        if rev.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=repo, capture_output=True, text=True, timeout=10)
        return rev.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.TimeoutExpired):
        return None


def hardware() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), torch {torch.__version__}"


def generate_samples(model, tokenizer, sargs: SampleArguments, prompts: list[str], seed: int) -> list[str]:
    """`num_samples` texts (prompt + continuation) sampled from the trained model, all in one batch (the prompts
    padded on the left): one forward a token for all of them, not one for each."""
    model.eval()
    set_seed(seed)
    n_positions = model.config.n_positions
    rows = []
    for i in range(sargs.num_samples):
        ids = tokenizer(prompts[i % len(prompts)], add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        rows.append(ids[-(n_positions - 1) :])
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in rows], device=model.device)
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in rows], device=model.device)
    with torch.no_grad():
        out = model.generate(
            input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=sargs.sample_temperature,
            top_k=sargs.sample_top_k,
            max_length=min(width + sargs.sample_max_new_tokens, n_positions),
            pad_token_id=pad,
        )
    # Each row without its left padding; a row that ended early is padded after its end, which decode drops.
    return [
        tokenizer.decode(row[width - len(ids) :], skip_special_tokens=True) for row, ids in zip(out, rows, strict=True)
    ]


def plot_loss_curve(history: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = sorted({h["step"]: h["eval_loss"] for h in history if "eval_loss" in h}.items())
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if train:
        ax.plot(*zip(*train, strict=True), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="validation loss", lw=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats per token)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_history(history: list[dict], out: Path) -> None:
    (out / "log_history.json").write_text(json.dumps(history, indent=1), encoding="utf-8")
    keys = list(dict.fromkeys(k for h in history for k in h))
    with (out / "log_history.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(history)


def _json_safe(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


def run_info(
    margs: ModelArguments,
    dargs: DataArguments,
    sargs: SampleArguments,
    targs: LMTrainingArguments,
    argv: list[str],
    *,
    dataset: str,
    dataset_id: str | None,
    tokenizer: str,
    num_parameters: int,
    world_size: int,
    precision: str,
) -> dict:
    """The run's record before training: every resolved argument, the git revision, the hardware, the command line
    and what main settled (data, tokenizer kind, model size, world size, precision); `final_metrics` adds the
    metrics at the end."""
    return {
        "model_args": asdict(margs),
        "data_args": asdict(dargs),
        "sample_args": asdict(sargs),
        "training_args": _json_safe(targs.to_dict()),
        "git_revision": git_revision(),
        "preset": margs.preset,
        "base_model": margs.model_name_or_path,
        "dataset": dataset,
        "dataset_id": dataset_id,
        "tokenizer": tokenizer,
        "num_parameters": num_parameters,
        "task": "causal-lm",
        "world_size": world_size,
        "precision": precision,
        "hardware": hardware(),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
    }


def write_run_info(info: dict, out: Path) -> None:
    (out / "run_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")


def report_written(out: Path, step: int) -> bool:
    """Whether the run folder holds the final model and the report of a run that ended at `step`. run_info.json
    gets its metrics last, after the model, samples, history and loss curve."""
    try:
        metrics = json.loads((out / "run_info.json").read_text(encoding="utf-8"))["metrics"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return metrics.get("global_step") == step and (out / "config.json").is_file()


def final_evaluation(trainer: Trainer, eval_ds, full_eval) -> dict:
    """The held-out split in full at the final step: the last evaluation logged if it was exactly that, else a new one."""
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    step = trainer.state.global_step
    in_full = eval_ds is full_eval or getattr(trainer, "full_eval_step", None) == step  # (see LMTrainer)
    if in_full and evals and evals[-1]["step"] == step:
        return evals[-1]
    return trainer.evaluate(eval_dataset=full_eval)


def final_metrics(
    trainer: Trainer,
    result: TrainOutput,
    last_eval: dict,
    block_size: int,
    world_size: int,
    validation_blocks: int,
    resumed_at: int = 0,
) -> dict:
    """run_info.json's metrics: the final validation loss and perplexity, step 0's, the training loss and tokens.
    `resumed_at` is the step training resumed from: the mean training loss is that of the steps trained since."""
    args, history, steps = trainer.args, trainer.state.log_history, trainer.state.global_step
    tokens_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * world_size * block_size
    losses = [h["loss"] for h in history if "loss" in h]
    return {
        "eval_loss": last_eval["eval_loss"],
        "perplexity": perplexity(last_eval["eval_loss"]),
        "eval_loss_step0": next((h["eval_loss"] for h in history if "eval_loss" in h and h["step"] == 0), None),
        "train_loss": losses[-1] if losses else result.training_loss,
        "train_loss_mean": result.training_loss if steps > resumed_at else None,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_tokens": steps * tokens_per_step,
        "global_step": steps,
        "validation_tokens": validation_blocks * block_size,
        "wall_time_s": None,
    }


def write_report(trainer: Trainer, tokenizer, sargs: SampleArguments, info: dict, out: Path, started: float) -> None:
    """On process 0: samples from the saved model, the log history, the loss curve, run_info.json with the metrics,
    the model card, and a summary on stdout."""
    prompts = sargs.sample_prompts or (SHAKESPEARE_PROMPTS if info["dataset"] == data.SHAKESPEARE_NAME else [""])
    samples = []
    if sargs.num_samples:
        # From the saved folder: it is what users load, and under FSDP the trained module is sharded.
        saved = hf_gpt.GPTForCausalLM.from_pretrained(out).to(trainer.args.device)
        samples = generate_samples(saved, tokenizer, sargs, prompts, trainer.args.seed)
    info["samples"] = samples
    sep = "\n" + "-" * 72 + "\n"
    (out / "samples.txt").write_text(sep.join(samples) + "\n", encoding="utf-8")
    history = trainer.state.log_history
    write_history(history, out)
    title = f"{info['dataset']}: {info['num_parameters'] / 1e6:.2f}M parameters, {info['tokenizer']} tokens"
    plot_loss_curve(history, out / "loss_curve.png", title)
    m = info["metrics"]
    m["wall_time_s"] = round(time.time() - started, 1)
    write_run_info(info, out)
    try:
        from model_cards.generate import write_card
    except ImportError:
        logger.info("model_cards.generate is not available: no model card written.")
    else:
        try:
            write_card(out)
        except Exception as e:  # the card is a courtesy; the trained model is already saved
            logger.warning("Writing the model card failed: %s: %s", type(e).__name__, e)
    print(sep.join(["", *samples, ""]))
    step0 = f" (step 0: {m['eval_loss_step0']:.4f})" if m["eval_loss_step0"] is not None else ""
    print(
        f"validation loss {m['eval_loss']:.4f}{step0}, perplexity {m['perplexity']:.3f} per {info['tokenizer']} "
        f"token; {m['global_step']} steps, {m['train_tokens']:,} training tokens, {m['wall_time_s']:.0f} s wall.\n"
        f"Model, tokenizer and logs: {out}/"
    )
