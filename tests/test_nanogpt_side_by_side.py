"""The nanoGPT side-by-side benchmark's parsing and table (issue 18); no nanoGPT, no training, no timing."""

from __future__ import annotations

import json

import pytest

from benchmarks import nanogpt_side_by_side as sbs

NANOGPT_LOG = """tokens per iteration will be: 768
found vocab_size = 65 (inside data/shakespeare_char/meta.pkl)
step 0: train loss 4.2874, val loss 4.2823
iter 0: loss 4.2649, time 1180.55ms, mfu -100.00%
iter 1: loss 4.1500, time 30.00ms, mfu -100.00%
iter 2: loss 4.0500, time 34.00ms, mfu -100.00%
step 250: train loss 1.9600, val loss 2.0700
saving checkpoint to out-bench
iter 250: loss 1.9000, time 500.00ms, mfu 0.05%
iter 251: loss 1.8900, time 32.00ms, mfu 0.05%
step 500: train loss 1.6000, val loss 1.8857
iter 500: loss 1.6000, time 400.00ms, mfu 0.05%
"""


def test_nanogpt_log_gives_step_times_without_evaluation_iterations_and_the_last_val_loss():
    r = sbs.parse_nanogpt_log(NANOGPT_LOG)
    assert r["steps"] == 6
    assert r["step_ms"] == pytest.approx((30 + 34 + 32) / 3)  # iterations 0, 250, 500 also timed evaluations
    assert r["step_ms_median"] == 32
    assert r["loop_s"] == pytest.approx((1180.55 + 30 + 34 + 500 + 32 + 400) / 1000)
    assert (r["val_loss"], r["val_loss_step"]) == (1.8857, 500)


def test_nanogpt_log_without_iterations_is_an_error():
    with pytest.raises(ValueError, match="nanoGPT's output"):
        sbs.parse_nanogpt_log("step 0: train loss 4.2, val loss 4.2\n")


def test_hf_gpt_run_step_time_leaves_out_the_evaluations_inside_training(tmp_path):
    history = [
        {"eval_loss": 4.2, "eval_runtime": 1.0, "step": 0},
        {"loss": 3.0, "step": 50},
        {"eval_loss": 2.0, "eval_runtime": 0.5, "step": 100},
        {"train_runtime": 10.0, "train_loss": 2.5, "step": 100},
        {"eval_loss": 1.9, "eval_runtime": 3.0, "step": 100},  # the final one on all held-out blocks
    ]
    (tmp_path / "log_history.json").write_text(json.dumps(history))
    metrics = {"global_step": 100, "train_runtime_s": 10.0, "eval_loss": 1.9}
    (tmp_path / "run_info.json").write_text(json.dumps({"metrics": metrics, "precision": "fp32"}))
    r = sbs.parse_hf_gpt_run(tmp_path)
    assert r["step_ms"] == pytest.approx(1000 * (10.0 - 1.5) / 100)
    assert (r["val_loss"], r["loop_s"], r["precision"]) == (1.9, 10.0, "fp32")


def test_table_pairs_each_run_with_nanogpts_run_of_the_same_repeat():
    def run(repeat, side, wall):
        return dict(
            repeat=repeat, side=side, wall_s=wall, loop_s=wall - 5, step_ms=30.0, val_loss=1.88, other_cpu_s=0.0
        )

    runs = [run(1, "nanoGPT", 80.0), run(1, "hf-gpt", 60.0), run(2, "hf-gpt", 70.0), run(2, "nanoGPT", 70.0)]
    text = sbs.table(runs)
    lines = text.splitlines()
    assert lines[0].startswith("| run | side | wall time (s)")
    assert "| 1 | hf-gpt | 60.0 |" in text and "| 0.75x |" in lines[3]
    assert "| 1.00x |" in lines[4]
    assert "| all | hf-gpt | 60.0-70.0 |" in text and "0.75-1.00x (median 0.88x)" in text
    assert "| all | nanoGPT | 70.0-80.0 |" in text
