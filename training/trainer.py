"""`LMTrainer`, transformers' `Trainer` with what `hf-gpt train` adds, and its two callbacks.

LMTrainer decays matrices only (nanoGPT's rule), logs perplexity next to every evaluation loss, writes checkpoints
aside and renames them into place (see `training.checkpoints`), stops with `NonFiniteLossError` at the first nan or
inf training loss, before anything is saved from that state, and, resumed at its last step, trains no step more.
`JsonlLogger` appends every log record to `logs.jsonl` as it happens; `StopAfter` ends training early as if
interrupted (`--stop_after_steps`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from training.checkpoints import STAGING, last_usable_checkpoint, publish_checkpoint

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became nan or inf; raised before anything is saved from that state."""


class LMTrainer(Trainer):
    """Trainer with nanoGPT's weight-decay rule, perplexity next to every evaluation loss, checkpoints that appear
    only complete (written aside, then renamed), and a stop with `NonFiniteLossError` when the loss is not finite."""

    _staging = False  # True while Trainer writes a checkpoint: `_get_output_dir` then points into STAGING
    # The whole held-out split, when the evaluations during training use fewer blocks (--max_eval_samples): the
    # evaluation Trainer runs at the step training ends uses it, as the report would right after; `full_eval_step`
    # records that step. (An evaluation in its place, not after it: each evaluation draws a seed from torch's RNG,
    # and a run resumed from that step's checkpoint must continue as the uninterrupted run.)
    full_eval_dataset = None
    full_eval_step: int | None = None

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        if eval_dataset is None and self.full_eval_dataset is not None and self.control.should_training_stop:
            self.full_eval_step = self.state.global_step
            eval_dataset = self.full_eval_dataset
        return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix)

    def get_decay_parameter_names(self, model: torch.nn.Module) -> list[str]:
        # Decay every parameter with two or more dimensions (the matmul weights and the embeddings, tied
        # with the LM head) and none of the vectors (biases, LayerNorm gains and shifts), as nanoGPT does.
        # The shapes are read from the unwrapped model: FSDP flattens the parameters it shards.
        matrices = {n for n, p in self.accelerator.unwrap_model(model).named_parameters() if p.dim() >= 2}
        prefixes = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.", "module.")

        def plain(name: str) -> str:
            for prefix in prefixes:
                name = name.replace(prefix, "")
            return name

        decay = [n for n, _ in model.named_parameters() if plain(n) in matrices]
        logger.info(
            "Weight decay on %d of %d parameter tensors (those with 2+ dims)", len(decay), len(list(model.parameters()))
        )
        return decay

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for key in [k for k in logs if k.endswith("eval_loss")]:
            logs[key.removesuffix("loss") + "perplexity"] = perplexity(logs[key])
        super().log(logs, start_time)

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        # Every micro-batch's loss, checked before the optimizer step and before any save. Trainer's own
        # `logging_nan_inf_filter` would instead log the mean of earlier losses and train on. The losses of all
        # processes are gathered so that every process stops at the same step instead of waiting for the others.
        losses = self.accelerator.gather(loss.detach().reshape(1)) if self.args.world_size > 1 else loss.reshape(1)
        bad = losses[~torch.isfinite(losses)]
        if bad.numel():
            raise NonFiniteLossError(self._nonfinite_message(bad[0].item()))
        return loss

    def _nonfinite_message(self, value: float) -> str:
        step = self.state.global_step + 1  # the optimizer step this micro-batch belongs to (1-based, as logged)
        good = last_usable_checkpoint(Path(self.args.output_dir), warn=False)
        where = (
            f"the last good checkpoint is {good} (every tensor in it finite); nothing was saved after it"
            if good is not None
            else "no checkpoint was saved before it"
        )
        a = self.args
        return (
            f"The training loss became {value} at step {step}: training stopped, {where}. Resuming repeats the "
            f"same steps, so change the recipe: a lower --learning_rate (now {a.learning_rate:g}), more "
            f"--warmup_steps (now {a.warmup_steps:g}) or gradient clipping (--max_grad_norm, now {a.max_grad_norm:g})"
            + (", or --precision bf16 / fp32 instead of fp16 (overflow)" if a.fp16 else "")
            + (f"; or start afresh from its weights with --model_name_or_path {good}." if good is not None else ".")
        )

    def final_step(self) -> int:
        """The optimizer step this training ends at: --max_steps (or the steps --num_train_epochs make of the
        data), or that of a `StopAfter` callback if it comes first."""
        steps = self.args.max_steps
        if steps <= 0:
            steps = self.set_initial_training_values(self.args, self.get_train_dataloader())[-1]
        return min([steps, *(cb.steps for cb in self.callback_handler.callbacks if isinstance(cb, StopAfter))])

    def _run_epoch(self, *args, **kwargs) -> None:
        # Trainer looks for the end of training only after an optimizer step: resumed from a checkpoint that is at
        # (or past) the last step, it would train one step more, save it and report new final metrics. Train none.
        if self.state.global_step >= self.state.max_steps or self.control.should_training_stop:
            self.control.should_training_stop = True
            return
        super()._run_epoch(*args, **kwargs)

    def _get_output_dir(self, trial) -> str:
        run_dir = super()._get_output_dir(trial)
        return os.path.join(run_dir, STAGING) if self._staging else run_dir

    def _save_checkpoint(self, model, trial) -> None:
        # Trainer writes checkpoint-N file by file; a run killed halfway would leave a folder that looks like a
        # checkpoint. So it writes into STAGING/checkpoint-N, and the folder is renamed into place once every
        # process has written its part.
        run_dir = Path(self._get_output_dir(trial))
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staged, final = run_dir / STAGING / name, run_dir / name
        if self.args.should_save:
            shutil.rmtree(staged.parent, ignore_errors=True)  # what a killed save left there
        self.accelerator.wait_for_everyone()
        self._staging = True
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging = False
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            best = self.state.best_model_checkpoint
            if best is not None and Path(best).parent == staged.parent:  # record the final path, not the staged one
                self.state.best_model_checkpoint = str(run_dir / Path(best).name)
                self.state.save_to_json(str(staged / "trainer_state.json"))
            publish_checkpoint(staged, final)
            rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=True,
            )
        self.accelerator.wait_for_everyone()


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss < 700 else float("inf")


class JsonlLogger(TrainerCallback):
    """Appends every log record (train loss, learning rate, eval loss, ...) to `logs.jsonl` as it happens."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


class StopAfter(TrainerCallback):
    """Ends training after `steps` optimizer steps, after that step's checkpoint is saved."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:  # resumed at or past that step: train none
            control.should_training_stop = True
        return control

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control
