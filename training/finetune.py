"""`hf-gpt finetune`: GPT-1 style fine-tuning on the four task types, with transformers' `Trainer`.

    hf-gpt finetune --task classification --model_name_or_path runs/shakespeare      # offline Shakespeare task
    hf-gpt finetune --task entailment --dataset rte --model_name_or_path gpt2          # GLUE RTE (online)
    hf-gpt finetune --task similarity --from_scratch --model_name_or_path runs/shakespeare  # same shape, random init
    hf-gpt finetune config.yaml                                                        # the same flags from a file

The model is our task head on the shared transformer (`GPTForSequenceClassification`, or
`GPTForMultipleChoice`), loaded from an hf_gpt folder, a GPT-2 / OpenAI-GPT folder or a Hub id, or built
at random (`--from_scratch`, with the architecture of `--model_name_or_path` or of `--preset` / sizes).
Inputs are GPT-1's transformations (`hf_gpt.task_inputs`); the loss adds lambda (`--aux_lm_weight`) times
the language-model loss of the inputs. The defaults are GPT-1's recipe (sec. 4.1): lr 6.25e-5, batch 32,
3 epochs, linear decay with warmup over 0.2% of training, lambda 0.5, weight decay 0.01.

The run folder (`--output_dir`, default `runs/finetune-{task}-{dataset}`) holds the model and tokenizer
(`save_pretrained`), `run_info.json` (task, dataset, resolved arguments, git revision, metrics, the chance
level), `log_history.json`, and a model card when `model_cards` is installed.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import EvalPrediction, HfArgumentParser, PreTrainedTokenizerBase, Trainer, TrainingArguments, set_seed

from hf_gpt import GPTConfig, GPTForMultipleChoice, GPTForSequenceClassification
from hf_gpt.conversion import config_from_foreign, read_config_dict
from hf_gpt.task_inputs import TASK_TYPES, TaskCollator, TaskEncoder, add_task_tokens
from hf_gpt.tokenization import gpt2_tokenizer, load_tokenizer
from training.tasks import (
    DEFAULT_TRAIN_EXAMPLES,
    GENRES,
    HUB_TASKS,
    OFFLINE_NAMES,
    TaskSizes,
    chance_level,
    is_regression,
    load_task,
)

logger = logging.getLogger("hf_gpt.finetune")

# Label names of the offline tasks (the head's id2label).
OFFLINE_LABELS = {
    "classification": list(GENRES),
    "entailment": ["not_next", "next"],
    "similarity": ["different_work", "same_work"],
}


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "hf_gpt folder, GPT-2 / OpenAI-GPT folder, or Hub id (online)"}
    )
    from_scratch: bool = field(
        default=False,
        metadata={"help": "random weights: the architecture of --model_name_or_path, else of --preset and sizes"},
    )
    preset: str | None = field(default=None, metadata={"help": "GPTConfig preset for --from_scratch (e.g. gpt1)"})
    n_layer: int | None = field(default=None, metadata={"help": "override for --from_scratch"})
    n_embd: int | None = field(default=None, metadata={"help": "override for --from_scratch"})
    n_head: int | None = field(default=None, metadata={"help": "override for --from_scratch"})
    n_positions: int | None = field(default=None, metadata={"help": "override for --from_scratch"})
    aux_lm_weight: float = field(default=0.5, metadata={"help": "lambda of GPT-1's auxiliary LM loss (0: off)"})


@dataclass
class DataArguments:
    task: str = field(default=None, metadata={"help": "task type", "choices": TASK_TYPES})
    dataset: str = field(
        default="shakespeare",
        metadata={"help": f"'shakespeare' (offline, built from the corpus) or one of {sorted(HUB_TASKS)} (online)"},
    )
    max_length: int | None = field(
        default=None, metadata={"help": "longest input in tokens (default: the model's n_positions, at most 512)"}
    )
    truncate: bool = field(
        default=True, metadata={"help": "cut overlong contexts from the left (False: raise); answers are never cut"}
    )
    train_examples: int | None = field(
        default=None, metadata={"help": f"offline task: training examples to build (default {DEFAULT_TRAIN_EXAMPLES})"}
    )
    eval_examples: int = field(default=800, metadata={"help": "offline task: evaluation examples to build"})
    passage_lines: int = field(default=3, metadata={"help": "offline task: lines per passage"})
    max_train_samples: int | None = field(default=None, metadata={"help": "use only the first N training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "use only the first N evaluation rows"})

    def __post_init__(self) -> None:
        if self.task not in TASK_TYPES:
            raise ValueError(f"--task must be one of {TASK_TYPES}, got {self.task!r}")


@dataclass
class FinetuneTrainingArguments(TrainingArguments):
    """`TrainingArguments` with GPT-1's fine-tuning recipe (Radford et al. 2018, sec. 4.1) as defaults."""

    output_dir: str | None = field(
        default="runs/finetune-{task}-{dataset}", metadata={"help": "run folder; {task} and {dataset} are filled in"}
    )
    learning_rate: float = field(default=6.25e-5, metadata={"help": "GPT-1: 6.25e-5"})
    per_device_train_batch_size: int = field(default=32, metadata={"help": "GPT-1: 32"})
    per_device_eval_batch_size: int = field(default=64, metadata={"help": "evaluation batch size"})
    num_train_epochs: float = field(default=3.0, metadata={"help": "GPT-1: 3"})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "GPT-1: linear decay"})
    warmup_steps: float = field(
        default=0.002, metadata={"help": "GPT-1: warmup over 0.2%% of training (a fraction below 1)"}
    )
    weight_decay: float = field(default=0.01, metadata={"help": "GPT-1: L2 0.01 (here AdamW's decoupled decay)"})
    eval_strategy: str = field(default="epoch", metadata={"help": "evaluate after every epoch"})
    save_strategy: str = field(default="no", metadata={"help": "the final model is saved to the run folder"})
    logging_steps: float = field(default=10, metadata={"help": "log the training loss every N steps"})
    remove_unused_columns: bool = field(default=False, metadata={"help": "the encoded datasets hold only inputs"})


def parse_args(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, FinetuneTrainingArguments]:
    """Flags, or a single YAML / JSON file holding them."""
    parser = HfArgumentParser((ModelArguments, DataArguments, FinetuneTrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])
    return parser.parse_args_into_dataclasses(argv)


# --- metrics ------------------------------------------------------------------------------------------


def _ranks(x: np.ndarray) -> np.ndarray:
    """Ranks from 1, ties given their average rank (as Spearman's correlation wants)."""
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x), dtype=np.float64)
    ranks[order] = np.arange(1, len(x) + 1)
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a * a).sum() * (b * b).sum())
    return float((a * b).sum() / denom) if denom > 0 else 0.0


def _f1(pred: np.ndarray, labels: np.ndarray, cls: int) -> float:
    tp = np.sum((pred == cls) & (labels == cls))
    fp, fn = np.sum((pred == cls) & (labels != cls)), np.sum((pred != cls) & (labels == cls))
    return float(2 * tp / (2 * tp + fp + fn)) if tp + fp + fn else 0.0


def task_scores(task: str, logits: np.ndarray, labels: np.ndarray, regression: bool = False) -> dict[str, float]:
    """GPT-1's metrics for each task type: accuracy (+ F1: of class 1 for two classes, else macro) for
    classification, entailment and binary similarity; Pearson and Spearman for regression; accuracy for
    multiple choice."""
    if regression:
        pred = logits.reshape(-1).astype(np.float64)
        gold = labels.reshape(-1).astype(np.float64)
        return {"pearson": _pearson(pred, gold), "spearman": _pearson(_ranks(pred), _ranks(gold))}
    pred = logits.argmax(-1)
    scores = {"accuracy": float((pred == labels).mean())}
    if task != "multiple_choice":
        n = logits.shape[-1]
        scores["f1"] = _f1(pred, labels, 1) if n == 2 else float(np.mean([_f1(pred, labels, c) for c in range(n)]))
    return scores


def compute_metrics_fn(task: str, regression: bool) -> Callable[[EvalPrediction], dict[str, float]]:
    def compute_metrics(p: EvalPrediction) -> dict[str, float]:
        logits = p.predictions[0] if isinstance(p.predictions, tuple) else p.predictions
        return task_scores(task, np.asarray(logits), np.asarray(p.label_ids), regression)

    return compute_metrics


def primary_metric(task: str, regression: bool) -> str:
    return "pearson" if regression else "accuracy"


# --- model --------------------------------------------------------------------------------------------


def base_config(m: ModelArguments, vocab_size: int) -> GPTConfig:
    """The architecture: that of `model_name_or_path` (ours or GPT-2 / OpenAI-GPT), else preset + sizes."""
    sizes = {k: getattr(m, k) for k in ("n_layer", "n_embd", "n_head", "n_positions") if getattr(m, k) is not None}
    if m.model_name_or_path:
        if sizes or m.preset:
            raise ValueError("--preset / sizes describe a new architecture; drop them or --model_name_or_path")
        cfg = read_config_dict(m.model_name_or_path)
        if cfg is None:
            raise FileNotFoundError(f"{m.model_name_or_path} has no config.json")
        if cfg.get("model_type") == GPTConfig.model_type:
            return GPTConfig.from_pretrained(m.model_name_or_path)
        return config_from_foreign(cfg)
    if not m.from_scratch:
        raise ValueError("pass --model_name_or_path (a pretrained model) or --from_scratch")
    if m.preset:
        return GPTConfig.from_preset(m.preset, vocab_size=vocab_size, **sizes)
    return GPTConfig(vocab_size=vocab_size, **sizes)


def head_class(task: str) -> type:
    return GPTForMultipleChoice if task == "multiple_choice" else GPTForSequenceClassification


def build_model(
    m: ModelArguments, task: str, tokenizer: PreTrainedTokenizerBase, label_names: list[str] | None, regression: bool
) -> torch.nn.Module:
    """The task head, pretrained or random, with the task tokens added to its (tied) embeddings."""
    config = base_config(m, len(tokenizer))
    config.aux_lm_weight = m.aux_lm_weight
    if task != "multiple_choice":
        if regression:
            config.num_labels, config.problem_type = 1, "regression"
        else:
            config.id2label = dict(enumerate(label_names))
            config.label2id = {name: i for i, name in enumerate(label_names)}
            config.problem_type = "single_label_classification"
    cls = head_class(task)
    if m.from_scratch:
        model = cls(config)
    else:
        model = cls.from_pretrained(m.model_name_or_path, config=config)
    add_task_tokens(tokenizer, model)
    return model


def load_base_tokenizer(m: ModelArguments) -> PreTrainedTokenizerBase:
    if m.model_name_or_path:
        tok = load_tokenizer(m.model_name_or_path)
        if tok is not None:
            return tok
    return gpt2_tokenizer()


# --- data ---------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Everything a Trainer needs for one task, before a model exists (hyperparameter search reuses it)."""

    task: str
    regression: bool
    tokenizer: PreTrainedTokenizerBase
    train_dataset: Any
    eval_dataset: Any
    collator: TaskCollator
    label_names: list[str] | None
    max_length: int
    chance: dict[str, float]
    model_init: Callable[..., torch.nn.Module]


def task_sizes(d: DataArguments) -> TaskSizes:
    """The offline task's sizes the data arguments ask for (per-task default training-set size)."""
    train_n = d.train_examples or DEFAULT_TRAIN_EXAMPLES[d.task]
    return TaskSizes(train=train_n, eval=d.eval_examples, passage_lines=d.passage_lines)


def prepare(m: ModelArguments, d: DataArguments) -> Prepared:
    """Load the task's data and tokenizer, add the task tokens, and encode GPT-1's input transformations."""
    raw = load_task(d.task, d.dataset, task_sizes(d))
    if d.max_train_samples is not None:
        raw["train"] = raw["train"].select(range(min(d.max_train_samples, len(raw["train"]))))
    if d.max_eval_samples is not None:
        raw["validation"] = raw["validation"].select(range(min(d.max_eval_samples, len(raw["validation"]))))
    regression = is_regression(d.task, d.dataset)
    label_names = None
    if d.task != "multiple_choice" and not regression:
        label_names = OFFLINE_LABELS.get(d.task) if d.dataset == "shakespeare" else None
        if label_names is None:
            label_names = [f"LABEL_{i}" for i in range(max(list(raw["train"]["label"])) + 1)]

    tokenizer = load_base_tokenizer(m)
    ids = add_task_tokens(tokenizer)
    n_positions = base_config(m, len(tokenizer)).n_positions
    # Saved beside the fine-tuned model, the tokenizer says the model's context (GPT-2's says 1024).
    tokenizer.model_max_length = min(tokenizer.model_max_length, n_positions)
    max_length = d.max_length or min(n_positions, 512)
    if max_length > n_positions:
        raise ValueError(f"--max_length {max_length} exceeds the model's n_positions {n_positions}")
    encoder = TaskEncoder(tokenizer, max_length, truncate=d.truncate)

    def encode(split):
        drop = [c for c in split.column_names if c != "label"]
        # In memory: seconds of work, and no cache files for concurrent runs to race on.
        return split.map(lambda ex: encoder(d.task, ex), remove_columns=drop, keep_in_memory=True)

    return Prepared(
        task=d.task,
        regression=regression,
        tokenizer=tokenizer,
        train_dataset=encode(raw["train"]),
        eval_dataset=encode(raw["validation"]),
        collator=TaskCollator(ids.pad, regression=regression),
        label_names=label_names,
        max_length=max_length,
        chance=chance_level(d.task, raw["validation"]),
        model_init=lambda trial=None: build_model(m, d.task, tokenizer, label_names, regression),
    )


def make_trainer(p: Prepared, args: TrainingArguments, search: bool = False, **kwargs) -> Trainer:
    """A Trainer for `p`; with `search`, it builds a fresh model per run through `model_init`."""
    model_kw = {"model_init": kwargs.pop("model_init", p.model_init)} if search else {"model": p.model_init()}
    return Trainer(
        args=args,
        train_dataset=p.train_dataset,
        eval_dataset=p.eval_dataset,
        data_collator=p.collator,
        processing_class=p.tokenizer,
        compute_metrics=compute_metrics_fn(p.task, p.regression),
        **model_kw,
        **kwargs,
    )


# --- run folder ---------------------------------------------------------------------------------------


def git_revision() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=Path(__file__).parent,
                           capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
    return out.stdout.strip() + ("-dirty" if dirty else "")


def _jsonable(d: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(d, default=str))


def write_run_folder(
    trainer: Trainer,
    p: Prepared,
    m: ModelArguments,
    d: DataArguments,
    args: TrainingArguments,
    metrics: dict[str, Any],
) -> Path:
    out = Path(args.output_dir)
    trainer.save_model(str(out))  # save_pretrained + the tokenizer (processing_class)
    info = {
        "task": d.task,
        "dataset": f"shakespeare ({OFFLINE_NAMES[d.task]})" if d.dataset == "shakespeare" else d.dataset,
        "dataset_id": HUB_TASKS[d.dataset].path if d.dataset in HUB_TASKS else None,
        "base_model": None if m.from_scratch else m.model_name_or_path,
        "from_scratch": m.from_scratch,
        "preset": m.preset,
        "chance": p.chance,
        "metrics": metrics,
        "git_revision": git_revision(),
        "hardware": f"{platform.machine()} CPU, {torch.get_num_threads()} threads"
        if not torch.cuda.is_available()
        else torch.cuda.get_device_name(),
        "model_args": asdict(m),
        "data_args": asdict(d),
        "training_args": _jsonable(args.to_dict()),
    }
    (out / "run_info.json").write_text(json.dumps(info, indent=2) + "\n")
    (out / "log_history.json").write_text(json.dumps(trainer.state.log_history, indent=2) + "\n")
    try:
        from model_cards.generate import write_card
    except ImportError:
        logger.info("model_cards is not available: no card written")
    else:
        write_card(out)
    return out


def count_tokens(dataset) -> int:
    """Real (unpadded) tokens in an encoded dataset, all views / choices included."""
    return sum(len(s) for row in dataset["input_ids"] for s in (row if isinstance(row[0], list) else [row]))


def finetune(m: ModelArguments, d: DataArguments, args: FinetuneTrainingArguments) -> dict[str, Any]:
    """Fine-tune, evaluate, write the run folder; returns the final metrics (plus "chance")."""
    args.output_dir = args.output_dir.format(task=d.task, dataset=d.dataset)
    logger.info("resolved arguments: %s", json.dumps(_jsonable({**asdict(m), **asdict(d)})))
    logger.info("training arguments: %s; git revision %s", args.to_json_string(), git_revision())
    set_seed(args.seed)
    p = prepare(m, d)
    trainer = make_trainer(p, args)
    train_out = trainer.train()
    final = trainer.evaluate()
    task_keys = ("accuracy", "f1", "pearson", "spearman")
    metrics = {k.removeprefix("eval_"): v for k, v in final.items() if k.removeprefix("eval_") in task_keys}
    metrics.update(
        eval_loss=final.get("eval_loss"),
        train_loss=train_out.training_loss,
        train_runtime_s=train_out.metrics.get("train_runtime"),
        train_tokens=int(count_tokens(p.train_dataset) * args.num_train_epochs),
    )
    out = write_run_folder(trainer, p, m, d, args, metrics)
    logger.info("run folder: %s", out)
    return {**metrics, "chance": p.chance}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    m, d, args = parse_args(argv)
    result = finetune(m, d, args)
    print(json.dumps({"task": d.task, "dataset": d.dataset, "output_dir": args.output_dir, **result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
