"""GPT-1's transfer experiment on our data: `python -m training.transfer --lm_dir runs/<main job>`.

For each offline Shakespeare task (`training.tasks`) it fine-tunes (a) the pretrained language model in
`--lm_dir` and (b) the same architecture, with the same tokenizer, from random weights on the task alone
(GPT-1 Table 5, "Transformer w/o pre-training"), with GPT-1's recipe; `--scratch_learning_rates` and
`--pretrained_learning_rates` add runs at other learning rates, since the recipe's 6.25e-5 was chosen for
a 117M-parameter pretrained model, not for a small one nor for training from random weights.
Every configuration runs with each of `--seeds`; the table gives the mean and the range of the validation
metric (accuracy) beside the chance level, and is written to `transfer_results.md` / `.json` in `--out`.
Each run is an ordinary `hf-gpt finetune` run folder under `--out`. Extra flags after `--` go to every
fine-tuning run (e.g. `-- --bf16 true`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from statistics import mean
from typing import Any

from training.finetune import parse_args, task_sizes
from training.tasks import OFFLINE_NAMES, TASK_TYPES, load_offline_task

logger = logging.getLogger("hf_gpt.transfer")
RECIPE_LR = 6.25e-5


def variants(pretrained_lrs: list[float], scratch_lrs: list[float]) -> dict[str, list[str]]:
    """Name -> fine-tuning flags of each configuration compared (GPT-1's learning rate always included)."""
    out = {}
    for start, lrs, flags in (("pretrained", pretrained_lrs, []), ("scratch", scratch_lrs, ["--from_scratch"])):
        for lr in [RECIPE_LR, *[x for x in lrs if x != RECIPE_LR]]:
            name = start if lr == RECIPE_LR else f"{start}_lr{lr:g}"
            out[name] = [*flags, "--learning_rate", str(lr)]
    return out


def run_one(lm_dir: str, out: Path, task: str, variant: str, flags: list[str], seed: int, extra: list[str]) -> Path:
    run_dir = out / f"{task}-{variant}-seed{seed}"
    if (run_dir / "run_info.json").exists():
        return run_dir  # done by an earlier, interrupted call
    cmd = [sys.executable, "-m", "training.finetune", "--task", task, "--model_name_or_path", lm_dir]
    cmd += [*flags, "--seed", str(seed), "--output_dir", str(run_dir), "--disable_tqdm", "true", *extra]
    log = out / f"{run_dir.name}.log"
    with open(log, "w") as f:
        result = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {result.returncode}); see {log}")
    return run_dir


def summarize(out: Path, tasks: list[str], names: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    """One row per task: chance, and per configuration the scores of its seeds (from their run_info.json)."""
    rows = []
    for task in tasks:
        row: dict[str, Any] = {"task": task, "offline_task": OFFLINE_NAMES[task]}
        for name in names:
            infos = [json.loads((out / f"{task}-{name}-seed{s}" / "run_info.json").read_text()) for s in seeds]
            row[name] = [i["metrics"]["accuracy"] for i in infos]
            row["chance"] = infos[0]["chance"]["accuracy"]
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], names: list[str]) -> str:
    def cell(scores: list[float]) -> str:
        s = f"{100 * mean(scores):.1f}"
        return s + (f" ({100 * min(scores):.1f}–{100 * max(scores):.1f})" if len(scores) > 1 else "")

    head = ["task (offline)", "chance", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [f"{r['task']} ({r['offline_task']})", f"{100 * r['chance']:.1f}", *[cell(r[n]) for n in names]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(prog="python -m training.transfer", description=__doc__.split("\n\n")[0])
    p.add_argument("--lm_dir", required=True, help="the pretrained LM's folder (the main job's run folder)")
    p.add_argument("--out", default="runs/transfer", help="folder of the fine-tuning runs and the table")
    p.add_argument("--tasks", nargs="+", default=list(TASK_TYPES), choices=TASK_TYPES)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--pretrained_learning_rates", nargs="*", type=float, default=[], help="besides 6.25e-5")
    p.add_argument("--scratch_learning_rates", nargs="*", type=float, default=[1e-3], help="besides 6.25e-5")
    p.add_argument("--jobs", type=int, default=1, help="fine-tuning runs at a time")
    a = p.parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    configs = variants(a.pretrained_learning_rates, a.scratch_learning_rates)
    for task in a.tasks:  # build each offline task once, before the runs start side by side
        _, d, _ = parse_args(["--task", task, "--output_dir", str(out), *extra])
        load_offline_task(task, task_sizes(d))
    jobs = [(t, n, f, s) for t in a.tasks for n, f in configs.items() for s in a.seeds]
    with ThreadPoolExecutor(a.jobs) as pool:
        for run_dir in pool.map(lambda j: run_one(a.lm_dir, out, *j, extra), jobs):
            logger.info("done: %s", run_dir)
    rows = summarize(out, a.tasks, list(configs), a.seeds)
    table = markdown(rows, list(configs))
    (out / "transfer_results.md").write_text(table)
    (out / "transfer_results.json").write_text(json.dumps({"lm_dir": a.lm_dir, "extra": extra, "rows": rows}, indent=2))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
