"""Hyperparameter search (issue 4): a 2x2 grid through Trainer.hyperparameter_search(backend="optuna"),
end to end, writing its results table."""

from __future__ import annotations

import csv
import importlib.util
import json

import pytest
from tasks_toy import save_toy_lm, toy_split

from training import hpo, tasks

# Slow: four fine-tuning runs. (A skip mark rather than a module-level importorskip: the test is still collected,
# and reported as skipped.)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("optuna") is None, reason="pip install -e '.[dev]'"),
]


def test_grid_search_runs_every_combination_and_writes_the_table(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_GPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "shakespeare_works", toy_split)
    lm = save_toy_lm(tmp_path / "lm")
    out = tmp_path / "search"
    argv = ["--task", "entailment", "--model_name_or_path", str(lm), "--output_dir", str(out)]
    argv += ["--train_examples", "32", "--eval_examples", "16", "--passage_lines", "2", "--max_length", "64"]
    argv += ["--learning_rates", "1e-4", "1e-3", "--aux_lm_weights", "0", "0.5", "--batch_sizes", "16", "--epochs", "1"]
    argv += ["--disable_tqdm", "true"]
    assert hpo.main(argv) == 0

    with open(out / "hpo_results.csv") as f:
        rows = list(csv.DictReader(f))
    grid = {(float(r["learning_rate"]), float(r["aux_lm_weight"])) for r in rows}
    assert grid == {(1e-4, 0.0), (1e-4, 0.5), (1e-3, 0.0), (1e-3, 0.5)}
    assert all(r["state"] == "COMPLETE" and r["per_device_train_batch_size"] == "16" for r in rows)
    for r in rows:
        assert 0.0 <= float(r["eval_accuracy"]) <= 1.0 and float(r["eval_loss"]) > 0
    # lambda reached the model: with the same seed and learning rate, the evaluation loss (which includes
    # lambda times the LM loss) differs between lambda 0 and 0.5.
    loss = {(float(r["learning_rate"]), float(r["aux_lm_weight"])): float(r["eval_loss"]) for r in rows}
    assert loss[(1e-4, 0.5)] > loss[(1e-4, 0.0)] + 0.5

    table = (out / "hpo_results.md").read_text().splitlines()
    assert table[0].startswith("| trial | state | learning_rate") and len(table) == 2 + 4
    best = json.loads((out / "hpo_best.json").read_text())
    assert best["objective"] == "eval_accuracy"
    assert best["best"]["eval_accuracy"] == max(float(r["eval_accuracy"]) for r in rows)
