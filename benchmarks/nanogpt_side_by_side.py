"""nanoGPT's CPU quick start against `hf-gpt train` given the same recipe, both in one run (issue 18).

nanoGPT's README trains a baby character-level GPT on tiny-shakespeare on a laptop CPU with

    python data/shakespeare_char/prepare.py
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

This script runs exactly that in a copy of a nanoGPT checkout you give it (nanoGPT is not on PyPI and none
of its code is in this repository), on the text you give it (default: nanoGPT's own `input.txt` name for
tiny-shakespeare, `--text`), with nanoGPT's own `prepare.py` (its character vocabulary, the last 10% held
out). Then `hf-gpt train` with the same recipe and nothing else (`HF_GPT_RECIPE`): the same text, the same
10% held out, a character vocabulary of its own, 4 x 4 x 128, block 64, batch 12, 2,000 steps, lr 1e-3 with
100 warmup steps and cosine decay to 1e-4, beta2 0.99, weight decay 0.1, clipping 1.0, no dropout.

Wall time is each side's whole command, end to end, from a cold start: nanoGPT's `prepare.py` plus its
`train.py` (9 evaluations of 20 batches on both splits, a checkpoint whenever validation improves);
`hf-gpt train` with an empty data cache (its own data preparation, evaluations, checkpoints, final
evaluation on the whole held-out text, samples, saving). Step time is the mean time of a training step
outside evaluations: nanoGPT's logged iteration times without the evaluation iterations; for hf-gpt,
Trainer's training time less its evaluations, over the steps (so its five checkpoint saves count). The
runs alternate A B B A ... so that a shared machine's drifts hit both sides; the table gives each run and
the range of the ratios. nanoGPT's validation loss is its own estimate (20 random batches of 12 blocks),
hf-gpt's the loss on every held-out block.

    python -m benchmarks.nanogpt_side_by_side --nanogpt ~/src/nanoGPT --text tinyshakespeare.txt --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
NANOGPT_ARGS = (
    "config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1 --block_size=64 "
    "--batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0"
).split()
EVAL_INTERVAL = 250  # config/train_shakespeare_char.py
HF_GPT_RECIPE = [
    "--validation_split_percentage", "10", "--tokenizer", "char",
    "--n_layer", "4", "--n_head", "4", "--n_embd", "128", "--block_size", "64",
    "--per_device_train_batch_size", "12", "--max_steps", "2000",
    "--learning_rate", "1e-3", "--warmup_steps", "100",
    "--lr_scheduler_type", "cosine_with_min_lr", "--lr_scheduler_kwargs", '{"min_lr": 1e-4}',
    "--adam_beta2", "0.99", "--weight_decay", "0.1", "--max_grad_norm", "1.0", "--max_eval_samples", "240",
]  # fmt: skip
_ITER = re.compile(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", re.M)
_EVAL = re.compile(r"^step (\d+): train loss ([\d.]+), val loss ([\d.]+)", re.M)


def parse_nanogpt_log(log: str) -> dict:
    """Step times and the last validation loss from nanoGPT's train.py output (log_interval 1)."""
    iters = [(int(i), float(ms)) for i, _, ms in _ITER.findall(log)]
    evals = [(int(s), float(v)) for s, _, v in _EVAL.findall(log)]
    if not iters or not evals:
        raise ValueError("no 'iter N: ... time X ms' or 'step N: ... val loss' lines in nanoGPT's output")
    # An iteration whose number is a multiple of the evaluation interval also timed that evaluation.
    plain = [ms for i, ms in iters if i % EVAL_INTERVAL != 0]
    return {
        "steps": len(iters),
        "loop_s": sum(ms for _, ms in iters) / 1000,
        "step_ms": statistics.fmean(plain),
        "step_ms_median": statistics.median(plain),
        "val_loss": evals[-1][1],
        "val_loss_step": evals[-1][0],
    }


def parse_hf_gpt_run(run_dir: Path) -> dict:
    """Step time and validation loss from the run folder `hf-gpt train` wrote."""
    info = json.loads((run_dir / "run_info.json").read_text())
    history = json.loads((run_dir / "log_history.json").read_text())
    m = info["metrics"]
    steps = m["global_step"]
    # The evaluations Trainer ran inside train(): those logged before its closing "train_runtime" record (the
    # final one on the whole held-out text comes after it).
    end = next(i for i, h in enumerate(history) if "train_runtime" in h)
    in_loop = [h for h in history[:end] if "eval_runtime" in h]
    loop_s = m["train_runtime_s"]
    return {
        "steps": steps,
        "loop_s": loop_s,
        "step_ms": 1000 * (loop_s - sum(h["eval_runtime"] for h in in_loop)) / steps,
        "step_ms_median": None,
        "val_loss": m["eval_loss"],
        "val_loss_step": steps,
        "precision": info["precision"],
    }


def prepare_nanogpt(checkout: Path, text: Path, work: Path) -> Path:
    """A copy of the checkout's Python files and configs in `work`, with the text as its shakespeare_char input."""
    dest = work / "nanoGPT"
    shutil.copytree(checkout, dest, ignore=shutil.ignore_patterns(".git", "*.bin", "*.pkl", "out*", "assets"))
    for name in ("train.bin", "val.bin", "meta.pkl"):
        (dest / "data" / "shakespeare_char" / name).unlink(missing_ok=True)
    shutil.copyfile(text, dest / "data" / "shakespeare_char" / "input.txt")
    return dest


def _busy_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (/proc/stat), to tell how much of a run's time
    the machine spent on other work; 0 where /proc/stat is missing."""
    try:
        fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except OSError:
        return 0.0
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def timed(cmd: list[str], **kwargs) -> tuple[subprocess.CompletedProcess, float, float]:
    """(the finished process, its wall seconds, CPU seconds that other processes took meanwhile)."""
    busy, mine = _busy_s(), _children_s()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    wall = time.perf_counter() - start
    return proc, wall, max(0.0, (_busy_s() - busy) - (_children_s() - mine))


def run_nanogpt(folder: Path, env: dict) -> dict:
    for name in ("train.bin", "val.bin", "meta.pkl"):
        (folder / "data" / "shakespeare_char" / name).unlink(missing_ok=True)
    shutil.rmtree(folder / "out-bench", ignore_errors=True)
    prep, prep_s, prep_other = timed([sys.executable, "data/shakespeare_char/prepare.py"], cwd=folder, env=env)
    if prep.returncode:
        raise RuntimeError(f"nanoGPT's prepare.py failed:\n{prep.stdout}\n{prep.stderr}")
    cmd = [sys.executable, "train.py", *NANOGPT_ARGS, "--out_dir=out-bench"]
    train, train_s, other = timed(cmd, cwd=folder, env=env)
    if train.returncode:
        raise RuntimeError(f"nanoGPT's train.py failed:\n{train.stdout[-3000:]}\n{train.stderr[-3000:]}")
    return {"wall_s": prep_s + train_s, "other_cpu_s": prep_other + other, **parse_nanogpt_log(train.stdout)}


def run_hf_gpt(text: Path, work: Path, env: dict, extra: list[str]) -> dict:
    run_dir, cache = work / "hf-gpt-run", work / "hf-gpt-cache"
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)  # each run prepares its data, as nanoGPT's prepare.py does
    env = {**env, "HF_GPT_CACHE": str(cache)}
    cmd = [sys.executable, "-m", "hf_gpt.cli", "train", "--train_file", str(text), *HF_GPT_RECIPE]
    cmd += ["--output_dir", str(run_dir), *extra]
    proc, wall, other = timed(cmd, cwd=REPO, env=env)
    if proc.returncode:
        raise RuntimeError(f"hf-gpt train failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return {"wall_s": wall, "other_cpu_s": other, **parse_hf_gpt_run(run_dir)}


def _range(values: list[float], fmt: str) -> str:
    lo, hi = min(values), max(values)
    return format(lo, fmt) if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}-{hi:{fmt}}"


def table(runs: list[dict]) -> str:
    """Markdown: one row per run, then one per side with ranges and the ratio hf-gpt / nanoGPT of each pair."""
    lines = [
        "| run | side | wall time (s) | training loop (s) | step (ms, mean) | validation loss | wall / nanoGPT's "
        "| other processes' CPU (s) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    pairs: dict[int, dict] = {}
    for r in runs:
        pairs.setdefault(r["repeat"], {})[r["side"]] = r
    for r in runs:
        ref = pairs[r["repeat"]].get("nanoGPT")
        ratio = f"{r['wall_s'] / ref['wall_s']:.2f}x" if ref and r["side"] != "nanoGPT" else ""
        lines.append(
            f"| {r['repeat']} | {r['side']} | {r['wall_s']:.1f} | {r['loop_s']:.1f} | {r['step_ms']:.1f} | "
            f"{r['val_loss']:.4f} | {ratio} | {r.get('other_cpu_s', 0):.1f} |"
        )
    for side in dict.fromkeys(r["side"] for r in runs):
        mine = [r for r in runs if r["side"] == side]
        ratios = [
            r["wall_s"] / pairs[r["repeat"]]["nanoGPT"]["wall_s"]
            for r in mine
            if side != "nanoGPT" and "nanoGPT" in pairs[r["repeat"]]
        ]
        ratio = f"{_range(ratios, '.2f')}x (median {statistics.median(ratios):.2f}x)" if ratios else ""
        lines.append(
            f"| all | {side} | {_range([r['wall_s'] for r in mine], '.1f')} | "
            f"{_range([r['loop_s'] for r in mine], '.1f')} | {_range([r['step_ms'] for r in mine], '.1f')} | "
            f"{_range([r['val_loss'] for r in mine], '.4f')} | {ratio} | "
            f"{_range([r.get('other_cpu_s', 0) for r in mine], '.1f')} |"
        )
    return "\n".join(lines)


def machine() -> str:
    omp = os.environ.get("OMP_WAIT_POLICY", "default")
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY {omp}"
    )


def git_head(folder: Path) -> str | None:
    out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=folder, capture_output=True, text=True)
    return out.stdout.strip() or None if out.returncode == 0 else None


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nanogpt", type=Path, required=True, help="A nanoGPT checkout (github.com/karpathy/nanoGPT).")
    p.add_argument("--text", type=Path, default=REPO.parent / "shared" / "data" / "tinyshakespeare.txt")
    p.add_argument("--repeats", type=int, default=3, help="Runs of each side, alternating A B B A ...")
    p.add_argument("--sides", default="nanoGPT,hf-gpt", help="Comma-separated: nanoGPT, hf-gpt.")
    p.add_argument("--hf-gpt-args", default="", help="Extra `hf-gpt train` arguments (for experiments).")
    p.add_argument("--json", type=Path, help="Also write every run's figures here.")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not (args.nanogpt / "train.py").is_file():
        raise SystemExit(f"{args.nanogpt} is not a nanoGPT checkout (no train.py)")
    if not args.text.is_file():
        raise SystemExit(f"No text at {args.text}; pass --text (tiny-shakespeare's input.txt)")
    sides = args.sides.split(",")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    header = {
        "command": "python -m benchmarks.nanogpt_side_by_side " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": machine(),
        "hf_gpt_commit": git_head(REPO),
        "nanogpt_commit": git_head(args.nanogpt),
    }
    print("\n".join(f"# {k}: {v}" for k, v in header.items()), flush=True)
    runs = []
    with tempfile.TemporaryDirectory(prefix="nanogpt-side-by-side-") as tmp:
        work = Path(tmp)
        nano = prepare_nanogpt(args.nanogpt, args.text, work) if "nanoGPT" in sides else None
        for repeat in range(1, args.repeats + 1):
            order = sides if repeat % 2 else sides[::-1]
            for side in order:
                if side == "nanoGPT":
                    r = run_nanogpt(nano, env)
                else:
                    r = run_hf_gpt(args.text, work, env, args.hf_gpt_args.split())
                runs.append({"repeat": repeat, "side": side, **r})
                print(
                    f"# run {repeat} {side}: {r['wall_s']:.1f} s wall, {r['step_ms']:.1f} ms/step, "
                    f"val loss {r['val_loss']:.4f}, other processes {r['other_cpu_s']:.1f} CPU s",
                    flush=True,
                )
    print(table(runs))
    if args.json:
        args.json.write_text(json.dumps({**header, "runs": runs}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
