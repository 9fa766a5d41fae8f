"""Hyperparameter search for GPT-1 style fine-tuning: `python -m training.hpo` (flags as `hf-gpt finetune`,
plus the search's own).

    python -m training.hpo --task classification --model_name_or_path runs/shakespeare \\
        --learning_rates 6.25e-5 1.25e-4 --batch_sizes 16 32 --epochs 3 --aux_lm_weights 0 0.5

Runs `Trainer.hyperparameter_search(backend="optuna")`: `--search grid` visits every combination of the
lists (optuna's `GridSampler`), `--search random` draws `--n_trials` combinations (`RandomSampler`). Each
trial fine-tunes a fresh model (`model_init`) and is scored on the validation split by the task's main
metric (accuracy, or Pearson for regression). The run folder gets `hpo_results.csv` and `hpo_results.md`
(one row per trial: its hyperparameters and every validation metric) and `hpo_best.json`.
"""

from __future__ import annotations

import csv
import itertools
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import HfArgumentParser

from training.finetune import (
    DataArguments,
    FinetuneTrainingArguments,
    ModelArguments,
    git_revision,
    make_trainer,
    prepare,
    primary_metric,
)

logger = logging.getLogger("hf_gpt.hpo")

# Search-space name -> the TrainingArguments field it sets (lambda is a model setting, applied in model_init).
TRAINING_KNOBS = {
    "learning_rate": "learning_rates",
    "per_device_train_batch_size": "batch_sizes",
    "num_train_epochs": "epochs",
}


@dataclass
class SearchArguments:
    search: str = field(default="grid", metadata={"help": "grid or random", "choices": ("grid", "random")})
    learning_rates: list[float] = field(default_factory=lambda: [6.25e-5, 1.25e-4, 2.5e-4])
    batch_sizes: list[int] = field(default_factory=lambda: [16, 32])
    epochs: list[float] = field(default_factory=lambda: [3.0])
    aux_lm_weights: list[float] = field(default_factory=lambda: [0.0, 0.5])
    n_trials: int | None = field(default=None, metadata={"help": "random search: trials (grid: every combination)"})
    search_seed: int = field(default=0, metadata={"help": "seed of the sampler"})

    def space(self) -> dict[str, list]:
        space = {name: list(getattr(self, attr)) for name, attr in TRAINING_KNOBS.items()}
        space["aux_lm_weight"] = list(self.aux_lm_weights)
        for name, values in space.items():
            if not values:
                raise ValueError(f"the search space for {name} is empty")
        return space


def run_search(
    m: ModelArguments, d: DataArguments, args: FinetuneTrainingArguments, s: SearchArguments
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Run the search; returns (one row per trial, the best row) and writes the results table."""
    import optuna

    args.output_dir = args.output_dir.format(task=d.task, dataset=d.dataset)
    space = s.space()
    n_grid = math.prod(len(v) for v in space.values())
    n_trials = n_grid if s.search == "grid" else (s.n_trials or 8)
    sampler = (
        optuna.samplers.GridSampler(space, seed=s.search_seed)
        if s.search == "grid"
        else optuna.samplers.RandomSampler(seed=s.search_seed)
    )
    p = prepare(m, d)
    metric = primary_metric(p.task, p.regression)
    current: dict[str, Any] = {}

    def suggest(trial, name: str):
        return trial.suggest_categorical(name, space[name])

    def model_init(trial=None):
        if trial is not None:  # lambda lives in the model's config, so it is drawn here
            m.aux_lm_weight = suggest(trial, "aux_lm_weight")
            current["trial"] = trial
        return p.model_init()

    def hp_space(trial) -> dict[str, Any]:
        return {name: suggest(trial, name) for name in TRAINING_KNOBS}

    def compute_objective(metrics: dict[str, float]) -> float:
        trial = current.get("trial")
        if trial is not None:  # keep every metric of the latest evaluation with the trial
            for key, value in metrics.items():
                if isinstance(value, (int, float)):
                    trial.set_user_attr(key, value)
        return metrics[f"eval_{metric}"]

    base_lambda = m.aux_lm_weight
    storage = optuna.storages.InMemoryStorage()
    trainer = make_trainer(p, args, search=True, model_init=model_init)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    trainer.hyperparameter_search(
        hp_space=hp_space,
        compute_objective=compute_objective,
        n_trials=n_trials,
        direction="maximize",
        backend="optuna",
        sampler=sampler,
        pruner=optuna.pruners.NopPruner(),  # a grid is run to the end; no trial is cut short
        storage=storage,
        study_name="hpo",
    )
    m.aux_lm_weight = base_lambda
    study = optuna.load_study(study_name="hpo", storage=storage)
    rows = trial_rows(study, list(space), metric)
    best = max((r for r in rows if r["state"] == "COMPLETE"), key=lambda r: r[f"eval_{metric}"])
    out = Path(args.output_dir)
    write_results(out, rows)
    info = {
        "task": d.task,
        "dataset": d.dataset,
        "search": s.search,
        "space": space,
        "objective": f"eval_{metric}",
        "chance": p.chance,
        "best": best,
        "git_revision": git_revision(),
        "model_args": asdict(m),
        "data_args": asdict(d),
    }
    (out / "hpo_best.json").write_text(json.dumps(info, indent=2, default=str) + "\n")
    return rows, best


def trial_rows(study, params: list[str], metric: str) -> list[dict[str, Any]]:
    """One dict per trial: number, state, its hyperparameters, then its validation metrics."""
    metric_keys: list[str] = []
    for t in study.trials:  # the validation metrics; speeds are left out (they vary with the machine's load)
        metric_keys += [k for k in t.user_attrs if k not in metric_keys and not k.endswith(("_runtime", "_second"))]
    rows = []
    for t in sorted(study.trials, key=lambda t: t.number):
        seconds = (t.datetime_complete - t.datetime_start).total_seconds() if t.datetime_complete else None
        row = {"trial": t.number, "state": t.state.name, **{p: t.params.get(p) for p in params}}
        row.update({k: t.user_attrs.get(k) for k in metric_keys})
        row["seconds"] = round(seconds, 1) if seconds is not None else None
        rows.append(row)
    return rows


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def write_results(out: Path, rows: list[dict[str, Any]]) -> None:
    """`hpo_results.csv` and the same table as Markdown, `hpo_results.md`."""
    out.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(itertools.chain.from_iterable(rows)))
    with open(out / "hpo_results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    (out / "hpo_results.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneTrainingArguments, SearchArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        m, d, args, s = parser.parse_yaml_file(argv[0])
    else:
        m, d, args, s = parser.parse_args_into_dataclasses(argv)
    rows, best = run_search(m, d, args, s)
    print((Path(args.output_dir) / "hpo_results.md").read_text())
    print(json.dumps({"best": best}, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
