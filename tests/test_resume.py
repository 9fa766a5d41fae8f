"""Resuming `hf-gpt train` (issue 19): a stopped run resumes to the uninterrupted result with dropout on, a finished
run resumed changes nothing, raising --max_steps continues it, and one killed before its report gets the report
without another step.

All runs share one recipe (2 layers of 32, blocks of 32, fp32, dropout 0.1) whose learning rate warms up over six
steps and then stays constant: the schedule does not depend on --max_steps, so a 4-step run continued to 8 steps
must equal an 8-step run, while a resumed run that skipped the scheduler's state would differ in its steps 5 and 6.
Tolerance: 1e-6 absolute on losses and weights (fp32, one thread).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import hf_gpt
from training import train_lm
from training.arguments import parse_args
from training.trainer import LMTrainer, StopAfter

TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--precision", "fp32"]
QUIET = ["--num_samples", "1", "--sample_max_new_tokens", "4", "--disable_tqdm", "true", "--report_to", "none"]
SCHEDULE = ["--lr_scheduler_type", "constant_with_warmup", "--warmup_steps", "6", "--learning_rate", "1e-2"]

pytestmark = pytest.mark.usefixtures("one_thread")


def train(out: Path, *args: str) -> dict:
    assert train_lm.main(["--output_dir", str(out), *args]) == 0
    return json.loads((out / "run_info.json").read_text())


def train_losses(out: Path) -> dict[int, float]:
    return {h["step"]: h["loss"] for h in json.loads((out / "log_history.json").read_text()) if "loss" in h}


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under `folder`: its bytes and modification time (ns)."""
    return {
        str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def test_the_last_step_counts_epochs_and_stop_after(tmp_path):
    """What "finished" compares a checkpoint's step with: --max_steps, else the steps --num_train_epochs make of the
    data (10 blocks in batches of 4: 3 steps an epoch), and a `StopAfter` step when it comes first."""
    model = hf_gpt.GPTForCausalLM(hf_gpt.GPTConfig(vocab_size=16, n_positions=8, n_embd=8, n_layer=1, n_head=2))
    blocks = Dataset.from_dict({"input_ids": [[1] * 8] * 10, "labels": [[1] * 8] * 10})

    def last_step(*flags: str, callbacks=()) -> int:
        flags = ["--output_dir", str(tmp_path), "--eval_strategy", "no", "--per_device_train_batch_size", "4", *flags]
        args = parse_args(["--report_to", "none", *flags])[3]
        return LMTrainer(model=model, args=args, train_dataset=blocks, callbacks=list(callbacks)).final_step()

    assert last_step("--max_steps", "7") == 7
    assert last_step("--max_steps", "-1", "--num_train_epochs", "2") == 6
    assert last_step("--max_steps", "-1", "--num_train_epochs", "1.5") == 5  # ceil(1.5 * 3), as Trainer counts
    assert last_step("--max_steps", "7", callbacks=[StopAfter(4)]) == 4


@pytest.fixture(scope="module")
def runs(tmp_path_factory, text_file) -> dict:
    """The shared runs: 8 steps straight; 8 steps without dropout; 4 of 8 steps then stopped (a copy kept) and
    resumed; and a run that finished at --max_steps 4."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread` does for the tests, which start later: the same sums in the same order
    try:
        return _shared_runs(tmp_path_factory.mktemp("resume"), text_file)
    finally:
        torch.set_num_threads(threads)


def _shared_runs(root: Path, text_file: Path) -> dict:
    cache = str(root / "datasets_cache")
    common = [
        "--train_file", str(text_file), "--data_cache_dir", cache, *TINY, "--dropout", "0.1", *SCHEDULE,
        "--save_steps", "4", "--logging_steps", "1", "--eval_steps", "4", "--max_eval_samples", "8",
        "--per_device_train_batch_size", "4", *QUIET,
    ]  # fmt: skip
    eight = [*common, "--max_steps", "8"]
    train(root / "straight", *eight)
    train(root / "no_dropout", *eight, "--dropout", "0")
    stopped = train(root / "split", *eight, "--stop_after_steps", "4")
    assert stopped["metrics"]["global_step"] == 4 and (root / "split" / "checkpoint-4").is_dir()
    shutil.copytree(root / "split", root / "stopped")
    with pytest.raises(FileExistsError, match="resume_from_checkpoint"):
        train(root / "split", *eight)  # not mixed into the earlier run by accident
    resumed = train(root / "split", *eight, "--resume_from_checkpoint", "last")
    assert resumed["metrics"]["global_step"] == 8
    train(root / "four", *common, "--max_steps", "4")
    return {"root": root, "common": common, "eight": eight}


@pytest.mark.slow
def test_a_stopped_run_resumes_to_the_uninterrupted_result_with_dropout_on(runs):
    """Stopped after 4 of 8 steps and resumed from checkpoint-4: the same losses and weights as 8 steps in one go.
    Dropout is on, so the restored RNG state matters: the losses differ from those of the same run without it."""
    root = runs["root"]
    straight, split, no_dropout = (train_losses(root / name) for name in ("straight", "split", "no_dropout"))
    assert sorted(split) == list(range(1, 9))  # history restored from the checkpoint, then continued
    for step in range(1, 9):
        assert abs(split[step] - straight[step]) < 1e-6, step
        assert abs(no_dropout[step] - straight[step]) > 1e-4, step  # dropout acts at every step
    assert max_weight_difference(root / "straight", root / "split") < 1e-6
    assert max_weight_difference(root / "straight", root / "no_dropout") > 1e-4


@pytest.mark.slow
def test_resuming_a_finished_run_changes_nothing(runs, tmp_path, capsys):
    """A run that reached --max_steps (or --stop_after_steps), resumed with the same arguments: no step 5, no
    checkpoint-5, not one file rewritten; a message says why. (Trainer alone would train step 5 and report anew.)"""
    for name, extra in [("four", ["--max_steps", "4"]), ("stopped", ["--max_steps", "8", "--stop_after_steps", "4"])]:
        out = tmp_path / name
        shutil.copytree(runs["root"] / name, out)
        before = snapshot(out)
        capsys.readouterr()
        train(out, *runs["common"], *extra, "--resume_from_checkpoint", "last")
        assert snapshot(out) == before, name
        assert "Nothing to do: " in capsys.readouterr().err


@pytest.mark.slow
def test_raising_max_steps_continues_a_finished_run(runs, tmp_path):
    """The run that finished at --max_steps 4, resumed with --max_steps 8: steps 5-8 are trained, and the losses and
    weights equal the 8-step run's (the schedule does not depend on --max_steps here)."""
    out = tmp_path / "four"
    shutil.copytree(runs["root"] / "four", out)
    info = train(out, *runs["eight"], "--resume_from_checkpoint", "last")
    assert info["metrics"]["global_step"] == 8 and sorted(p.name for p in out.glob("checkpoint-*")) == [
        "checkpoint-4",
        "checkpoint-8",
    ]
    straight, continued = train_losses(runs["root"] / "straight"), train_losses(out)
    assert sorted(continued) == list(range(1, 9))
    for step in range(1, 9):
        assert abs(continued[step] - straight[step]) < 1e-6, step
    assert max_weight_difference(runs["root"] / "straight", out) < 1e-6


@pytest.mark.slow
def test_a_finished_run_killed_before_its_report_gets_it_without_training(runs, tmp_path):
    """Killed after its last checkpoint but before the final model and run_info.json's metrics were written: resumed,
    it trains no step, and writes the final model (checkpoint-4's weights) and the same metrics as the finished run."""
    done = runs["root"] / "four"
    out = tmp_path / "four"
    shutil.copytree(done, out)
    info = json.loads((out / "run_info.json").read_text())
    del info["metrics"], info["samples"]  # run_info.json as written before training
    (out / "run_info.json").write_text(json.dumps(info))
    (out / "model.safetensors").unlink()
    logged = (out / "logs.jsonl").read_text()

    resumed = train(out, *runs["common"], "--max_steps", "4", "--resume_from_checkpoint", "last")
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-4"]
    new_records = [json.loads(line) for line in (out / "logs.jsonl").read_text()[len(logged) :].splitlines()]
    assert not [r for r in new_records if "loss" in r or r["step"] != 4]  # no step trained, nothing logged after 4
    assert max_weight_difference(out / "checkpoint-4", out) == 0 and max_weight_difference(done, out) == 0
    want = json.loads((done / "run_info.json").read_text())["metrics"]
    got = resumed["metrics"]
    assert got["global_step"] == 4 and got["train_loss"] == want["train_loss"] and got["train_loss_mean"] is None
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], abs=1e-6)
    assert resumed["samples"] == json.loads((done / "run_info.json").read_text())["samples"]
