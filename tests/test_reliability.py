"""Reliability of training (issue 7): a run killed twice (once in a save) resumes to the same result, broken
checkpoints are skipped, a non-finite loss stops the run without saving, and bad corpus files stop it with an error
that names them.

Tiny models (2 layers of 32, blocks of 32, fp32) so each run takes seconds; tolerances are stated where asserted.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainerCallback

import hf_gpt
from hf_gpt import cli
from training import arguments, checkpoints, data, train_lm
from training.trainer import LMTrainer, NonFiniteLossError

REPO = Path(__file__).resolve().parent.parent
TINY = ["--n_layer", "2", "--n_head", "2", "--n_embd", "32", "--block_size", "32", "--precision", "fp32"]
QUIET = ["--num_samples", "0", "--disable_tqdm", "true", "--report_to", "none"]
NO_EVAL = ["--eval_strategy", "no", "--eval_on_start", "false", "--max_eval_samples", "8"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("datasets_cache"))


def train(out: Path, *args: str, cache: str, callbacks=None) -> dict:
    assert train_lm.main(["--output_dir", str(out), "--data_cache_dir", cache, *args], callbacks=callbacks) == 0
    return json.loads((out / "run_info.json").read_text())


def logged_steps(out: Path) -> list[int]:
    """Steps of the training-loss records in logs.jsonl, in the order written (a resumed run appends)."""
    records = [json.loads(line) for line in (out / "logs.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if "loss" in r]


def last_logged_step(out: Path) -> int:
    """The newest step in logs.jsonl while a run writes it (a line being written is skipped)."""
    steps = [0]
    if (out / "logs.jsonl").exists():
        for line in (out / "logs.jsonl").read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (ValueError, KeyError):
                pass
    return max(steps)


def final_loss(out: Path) -> float:
    history = json.loads((out / "log_history.json").read_text())
    return [h["loss"] for h in history if "loss" in h][-1]


def max_weight_difference(a: Path, b: Path) -> float:
    wa, wb = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


# ---- killed and resumed -----------------------------------------------------------------------------


# `hf-gpt train` in a process that stops dead where a test kills it, chosen by $STALL: "step:N" after optimizer step
# N, "save" inside the first checkpoint save once the weights and optimizer are written (before the RNG and trainer
# states). It touches `stalled` there (the run folder, or the checkpoint's staging folder) and sleeps until killed.
STALLING_TRAIN = """
import os, sys, time
from pathlib import Path
from transformers import TrainerCallback
from training import train_lm
from training.trainer import LMTrainer

def stall(folder):
    Path(folder, "stalled").touch()
    time.sleep(600)

class StallAfterStep(TrainerCallback):
    def on_step_end(self, args, state, control, **kwargs):
        if os.environ["STALL"] == f"step:{state.global_step}":
            stall(args.output_dir)

if os.environ["STALL"] == "save":
    LMTrainer._save_rng_state = lambda self, output_dir: stall(output_dir)
sys.exit(train_lm.main(sys.argv[1:], callbacks=[StallAfterStep()]))
"""


def start_stalling_run(out: Path, stall: str, *args: str, cache: str) -> subprocess.Popen:
    cmd = [sys.executable, "-c", STALLING_TRAIN, "--output_dir", str(out), "--data_cache_dir", cache, *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE", "PYTHONPATH": str(REPO), "STALL": stall}
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill(proc: subprocess.Popen, when: Callable[[], bool]) -> None:
    """SIGKILL `proc` as soon as `when()` holds (polled every 10 ms); fails if the process ended before."""
    deadline = time.monotonic() + 300
    while not when() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    alive = proc.poll() is None
    os.kill(proc.pid, signal.SIGKILL)
    stderr = proc.communicate()[1]
    assert alive, f"the run ended before it could be killed (exit {proc.returncode}):\n{stderr[-3000:]}"
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.slow
def test_a_run_killed_twice_resumes_to_the_uninterrupted_result(tmp_path, text_file, cache):
    """Two real training processes are SIGKILLed: the first between checkpoints (saved every 10 steps), at step 25
    or soon after (it stalls at step 35 if the kill has not landed by then); the second, resumed from its newest
    checkpoint, inside the save of the next one, after the weights and optimizer are written. That checkpoint never
    appears (its files stay in the staging folder); resuming with `last` again takes the newest complete one, and
    the final loss and weights equal an uninterrupted run's. Dropout is on, so the restored RNG state matters.

    Tolerance: 1e-6 absolute on the final logged loss and on every weight (fp32, one thread both ways).
    """
    steps = 40
    common = [
        "--train_file", str(text_file), *TINY, "--dropout", "0.1", "--max_steps", str(steps), "--save_steps", "10",
        "--logging_steps", "1", "--per_device_train_batch_size", "4", *NO_EVAL, *QUIET,
    ]  # fmt: skip
    train(tmp_path / "straight", *common, cache=cache)  # also fills the datasets cache the subprocesses read

    run = tmp_path / "run"
    kill(start_stalling_run(run, "step:35", *common, cache=cache), lambda: last_logged_step(run) >= 25)
    assert not (run / "model.safetensors").exists() and not (run / "log_history.json").exists()
    start = int(checkpoints.checkpoint_folders(run)[0].name.split("-")[1])
    first = logged_steps(run)
    assert 20 <= start <= first[-1] < steps and first == list(range(1, first[-1] + 1))  # killed between checkpoints

    staged = run / checkpoints.STAGING / f"checkpoint-{start + 10}"
    resumed = start_stalling_run(run, "save", *common, "--resume_from_checkpoint", "last", cache=cache)
    kill(resumed, lambda: (staged / "stalled").exists())
    assert {"model.safetensors", "optimizer.pt"} <= {p.name for p in staged.iterdir()}
    assert not (staged / "trainer_state.json").exists() and not (run / f"checkpoint-{start + 10}").exists()
    assert checkpoints.resolve_resume("last", run) == run / f"checkpoint-{start}"
    second = logged_steps(run)[len(first) :]
    assert second == list(range(start + 1, start + 11))  # logged up to the step being saved

    train(run, *common, "--resume_from_checkpoint", "last", cache=cache)
    assert logged_steps(run)[len(first) + len(second) :] == list(range(start + 1, steps + 1))
    assert [p.name for p in checkpoints.checkpoint_folders(run)] == [f"checkpoint-{steps}", f"checkpoint-{steps - 10}"]
    assert not (run / checkpoints.STAGING).exists()  # what the killed save left was cleared
    a, b = final_loss(tmp_path / "straight"), final_loss(run)
    diff = max_weight_difference(tmp_path / "straight", run)
    print(f"\nkilled after step {first[-1]}, then in the save of step {start + 10}; resumed from step {start} "
          f"twice: final loss {b:.6f} vs uninterrupted {a:.6f}, largest weight difference {diff:.1e}")  # fmt: skip
    assert abs(a - b) < 1e-6 and diff < 1e-6


# ---- broken checkpoints -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, text_file, cache) -> tuple[Path, list[str]]:
    """(run folder stopped after 4 of 6 steps, holding checkpoint-2 and checkpoint-4; its arguments)."""
    common = [
        "--train_file", str(text_file), *TINY, "--max_steps", "6", "--save_steps", "2", "--logging_steps", "1",
        "--per_device_train_batch_size", "4", *NO_EVAL, *QUIET,
    ]  # fmt: skip
    out = tmp_path_factory.mktemp("stopped") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `one_thread` does for the tests, which start after this module's fixture
    try:
        train(out, *common, "--stop_after_steps", "4", cache=cache)
    finally:
        torch.set_num_threads(threads)
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-4", "checkpoint-2"]
    return out, common


def copy_run(stopped_run, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(stopped_run[0], out)
    return out


def test_resume_skips_a_truncated_checkpoint_with_a_warning(tmp_path, stopped_run, cache):
    out = copy_run(stopped_run, tmp_path)
    weights = out / "checkpoint-4" / "model.safetensors"
    with weights.open("r+b") as f:
        f.truncate(weights.stat().st_size // 2)
    with pytest.warns(UserWarning, match=r"Skipping .*checkpoint-4 on resume: model.safetensors is unreadable"):
        train(out, *stopped_run[1], "--resume_from_checkpoint", "last", cache=cache)
    assert logged_steps(out) == [1, 2, 3, 4, 3, 4, 5, 6]  # the resumed run started after step 2
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-6", "checkpoint-4"]
    assert checkpoints.checkpoint_problem(out / "checkpoint-4") is None  # the broken one was replaced


def test_a_save_that_dies_halfway_leaves_no_checkpoint_folder(tmp_path, stopped_run, cache, monkeypatch):
    """The crash lands after the weights and optimizer are written, before the RNG and trainer states: the
    checkpoint-6 folder never appears (its files stay in the staging folder), and resume takes checkpoint-4."""
    out = copy_run(stopped_run, tmp_path)

    def crash(self, output_dir):
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(LMTrainer, "_save_rng_state", crash)
    with pytest.raises(KeyboardInterrupt):
        train(out, *stopped_run[1], "--resume_from_checkpoint", "last", cache=cache)
    assert (out / checkpoints.STAGING / "checkpoint-6" / "model.safetensors").is_file()
    assert not (out / "checkpoint-6").exists()
    assert checkpoints.resolve_resume("last", out) == out / "checkpoint-4"


@pytest.mark.parametrize(
    "damage, reason",
    [
        (lambda c: (c / "trainer_state.json").unlink(), "no trainer_state.json"),
        (lambda c: (c / "optimizer.pt").write_bytes((c / "optimizer.pt").read_bytes()[:1000]), "optimizer.pt is truncated"),
        (lambda c: (c / "trainer_state.json").write_text('{"global_step": 4, "log_hi'), "trainer_state.json is unreadable"),
        (lambda c: save_file({k: v.fill_(float("nan")) for k, v in load_file(c / "model.safetensors").items()}, c / "model.safetensors"), "non-finite values"),
    ],
    ids=["no-trainer-state", "truncated-optimizer", "cut-json", "nan-weights"],
)  # fmt: skip
def test_checkpoint_problems_are_found_and_named(tmp_path, stopped_run, damage, reason):
    out = copy_run(stopped_run, tmp_path)
    assert checkpoints.checkpoint_problem(out / "checkpoint-4") is None
    damage(out / "checkpoint-4")
    assert reason in checkpoints.checkpoint_problem(out / "checkpoint-4")
    with pytest.warns(UserWarning, match=rf"checkpoint-4 on resume: .*{reason}"):
        assert checkpoints.resolve_resume(str(out), out) == out / "checkpoint-2"  # a run folder: its newest usable
    with pytest.raises(ValueError, match=rf"cannot resume from .*checkpoint-4: .*{reason}.*'last'"):
        checkpoints.resolve_resume(str(out / "checkpoint-4"), out)  # that one folder, asked for by name


def test_resume_without_a_usable_checkpoint_is_a_clear_error(tmp_path, stopped_run):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"nothing to resume in .*empty: it holds no checkpoint-N folder"):
        checkpoints.resolve_resume("last", empty)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoints.resolve_resume("last", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no such folder"):
        checkpoints.resolve_resume(str(tmp_path / "nowhere"), empty)
    out = copy_run(stopped_run, tmp_path)
    for ckpt in checkpoints.checkpoint_folders(out):
        (ckpt / "trainer_state.json").unlink()
    with pytest.warns(UserWarning), pytest.raises(FileNotFoundError, match="every checkpoint there is broken"):
        checkpoints.resolve_resume("last", out)


# ---- non-finite loss --------------------------------------------------------------------------------


class PoisonAfterSave(TrainerCallback):
    """Sets the token embeddings to nan right after the checkpoint of `step` is saved: the next loss is nan."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_save(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.get_input_embeddings().weight.fill_(float("nan"))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, text_file, cache):
    out = tmp_path / "run"
    args = [
        "--train_file", str(text_file), *TINY, "--max_steps", "8", "--save_steps", "2", "--logging_steps", "4",
        "--save_total_limit", "1", "--per_device_train_batch_size", "4", *NO_EVAL, *QUIET,
    ]  # fmt: skip
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at step 5: .*last good checkpoint is"):
        train(out, *args, cache=cache, callbacks=[PoisonAfterSave(4)])
    # Checked at every step, though logged every 4: nothing after step 4 was saved, and no final model.
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-4"]
    assert not (out / "model.safetensors").exists() and not (out / checkpoints.STAGING / "checkpoint-6").exists()
    assert checkpoints.checkpoint_problem(out / "checkpoint-4") is None
    model = hf_gpt.GPTForCausalLM.from_pretrained(out / "checkpoint-4")
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.isfinite(model(ids, labels=ids).loss)


def test_the_command_line_stops_with_the_message_when_the_loss_diverges(tmp_path, text_file, cache):
    """A learning rate of 1e30 (fp32): weights of ~1e30 after step 1 overflow in step 2's forward. `hf-gpt train`
    lets the error through, so the process exits non-zero with the message as its traceback's last line: the line
    `format_exception_only` gives (run in this process: starting one costs about 7 CPU seconds of imports)."""
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as error:
        cli.main([
            "train", "--output_dir", str(out), "--data_cache_dir", cache, "--train_file", str(text_file), *TINY,
            "--learning_rate", "1e30", "--lr_scheduler_type", "constant", "--warmup_steps", "0", "--max_grad_norm", "0",
            "--max_steps", "10", "--save_steps", "1", "--per_device_train_batch_size", "4", *NO_EVAL, *QUIET,
        ])  # fmt: skip
    message = traceback.format_exception_only(error.value)[-1]
    assert "NonFiniteLossError: The training loss became nan at step 2:" in message
    assert f"last good checkpoint is {out / 'checkpoint-1'}" in message and "--learning_rate (now 1e+30)" in message
    assert [p.name for p in checkpoints.checkpoint_folders(out)] == ["checkpoint-1"]


# ---- corpus errors ----------------------------------------------------------------------------------

CORPUS_ERRORS = {
    "missing": (None, FileNotFoundError, "Text file not found"),
    "empty": (b"", ValueError, r"empty \(0 bytes\)"),
    "blank": (b" \n\t\n", ValueError, "nothing left after whitespace cleaning"),
    "png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", ValueError, "not a text file: it starts like a PNG image"),
    "zip": (b"PK\x03\x04\x14\x00\x00\x00", ValueError, "starts like a zip archive"),
    "nul": (b"To be, or not\x00 to be", ValueError, "NUL byte at byte offset 13"),
    "latin1": ("Ye olde café\nna\u00efve\n".encode("latin-1"), ValueError, r"not valid UTF-8: byte offset 11 \(line 1\) holds e9 0a .*iconv -f WINDOWS-1252 -t UTF-8"),
    "utf16": ("To be".encode("utf-16"), ValueError, "UTF-16LE text, not UTF-8. Re-encode it as UTF-8: iconv -f UTF-16"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(CORPUS_ERRORS))
def test_a_bad_corpus_file_is_an_error_that_names_it(tmp_path, case):
    content, error, phrase = CORPUS_ERRORS[case]
    path = tmp_path / f"{case}.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=phrase) as info:
        data.read_text_files([path])
    assert str(path) in str(info.value)


def test_text_is_read_exactly_without_replacement(tmp_path):
    path = tmp_path / "bom.txt"
    path.write_bytes(b"\xef\xbb\xbfna\xc3\xafve caf\xc3\xa9 \xe2\x98\x83\n")
    assert data.read_text_file(path) == "naïve café ☃\n"  # the byte-order mark dropped, nothing replaced
    path.write_bytes(b"\xef\xbb\xbfab\xff")
    with pytest.raises(ValueError, match="byte offset 5"):  # offsets count the mark's 3 bytes
        data.read_text_file(path)


def test_a_non_utf8_file_stops_the_command_before_training(tmp_path, cache):
    path = tmp_path / "notes.txt"
    path.write_bytes(b"Thou art more lovely and more temperate.\n" * 50 + b"\x93quoted\x94\n")
    with pytest.raises(ValueError, match=r"notes.txt is not valid UTF-8: byte offset 2050"):
        train(tmp_path / "run", "--train_file", str(path), *TINY, *QUIET, cache=cache)
    assert not (tmp_path / "run" / "run_info.json").exists()


def test_block_size_beyond_the_model_positions_is_an_error(tmp_path):
    tok = data.char_tokenizer(["abc"])
    base = tmp_path / "base"
    hf_gpt.GPTForCausalLM(hf_gpt.GPTConfig(vocab_size=len(tok), n_positions=16, n_embd=8, n_layer=1, n_head=2)).save_pretrained(base)  # fmt: skip
    margs = arguments.ModelArguments(model_name_or_path=str(base))
    with pytest.raises(ValueError, match="--block_size 32 exceeds the checkpoint's n_positions 16"):
        train_lm.build_model(margs, 32, tok)
    with pytest.raises(ValueError, match="--block_size 2048 exceeds preset gpt2's n_positions 1024"):
        train_lm.build_model(arguments.ModelArguments(preset="gpt2"), 2048, tok)
