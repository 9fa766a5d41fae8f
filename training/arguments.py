"""The arguments of `hf-gpt train`: four dataclasses read by `HfArgumentParser`, and the checks on them.

`ModelArguments` (what to train: a checkpoint, a preset or sizes; the tokenizer), `DataArguments` (the corpus and
its blocks), `SampleArguments` (the samples generated at the end) and `LMTrainingArguments` (transformers'
`TrainingArguments` with the main job's defaults, `--precision`, `--stop_after_steps`). `parse_args` reads them
from the command line or from one YAML / JSON file.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import HfArgumentParser, TrainingArguments

import hf_gpt
from hf_gpt.configuration_gpt import ACTIVATIONS
from training import data

# The main job's model: 3 layers of 128, 4 heads, over 128 characters (0.62M parameters; see README, "Main job").
# Depth barely moves this budget's loss, and each layer is a quarter of a 4-layer step. Validation loss after the
# main job's 800 steps (lr 6e-3, one thread): 4 layers 1.7493 / 1.7496 / 1.7464 (seeds 1337 / 1 / 2); 3 layers
# 1.7501 / 1.7462 / 1.7580; 2 layers 1.7502 / 1.9119 (seed 1 left the loss plateau near 2.45 some 200 steps later);
# 1 layer 1.7598. Shorter schedules lose more than the time they save: 3 layers, 700 steps 1.7945; 1,000 steps of
# 16 blocks 1.7702, 1,200 of 12 1.7805.
DEFAULT_SIZES = dict(n_layer=3, n_head=4, n_embd=128)
SHAKESPEARE_PROMPTS = ["ROMEO.\n", "KING HENRY.\n", "First Citizen.\n"]

# `--precision auto` on a CPU with AVX512-BF16 but no AMX: bf16 autocast only for models at least this wide. A narrow
# model's matmuls are small, so bf16 gains little on them, while autocast's casts of every activation cost as much
# per element at any width. Whole training steps (forward, backward, clipping, fused AdamW), fp32 against bf16
# autocast, side by side on the project's 2-core AMD EPYC (Zen 4), 4 layers, since bf16 training attention is
# written out (5e4ffa6): width 32 14.2 vs 14.3 ms (12 x 64 tokens); 64 18.2 vs 17.2 ms; 128 (nanoGPT's quick start)
# 44.4 vs 31.0 ms, and 161.8 vs 96.8 ms at 24 x 128 (the main job); 256 132.5 vs 80.3 ms; GPT-2 small (768)
# 1.4-1.7x faster in bf16 (`hf-gpt bench`). AMX computes bf16 several times faster than fp32 (not measured here):
# CPUs with it keep bf16 at every width.
CPU_BF16_MIN_WIDTH = 64

# The default learning rate: SMALL_MODEL_LR for models trained from scratch at most SMALL_MODEL_MAX_WIDTH wide (the main
# job's model is 128), LEARNING_RATE (the earlier default for all) for wider ones and for fine-tuning. The main job's
# earlier 4-layer model after 800 steps (seeds 1337 / 1 / 2, one thread): validation loss 1.7493 / 1.7496 / 1.7464
# at 6e-3, 1.7558 at 8e-3, 1.7575 / 1.7747 at 5e-3, 1.7835 at 4e-3; 1,200 steps at 2e-3 reached 1.7909 (at 4e-3
# 1.6603); 700 steps at 5e-3 1.8007; 600 steps at 6e-3 1.8486, at 1e-2 it stalled at 2.49. Wider models want less:
# 6 layers of 256 with a 4,096-token BPE, after 300 steps: 5.2576 at 2e-3 against 5.7159 at 6e-3 (docs/training.md).
SMALL_MODEL_LR = 6e-3
SMALL_MODEL_MAX_WIDTH = 128
LEARNING_RATE = 2e-3

# The activation of a model trained from scratch without a --preset: the exact (erf) GELU rather than GPT-2's tanh
# approximation (`gelu_new`), which PyTorch's CPU build computes slowly: forward and backward of 768 x 512 fp32 values
# take 0.38 ms exact against 0.88 ms tanh on the project's CPU, where the tanh form was 11% of a small model's step
# (docs/speed.md).
# Both export to the plain GPT-2 format (transformers and vLLM read `activation_function`); llama.cpp's GPT-2 graph
# computes the tanh form whatever the config says.
SCRATCH_ACTIVATION = "gelu"


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
    activation_function: str | None = field(
        default=None,
        metadata={
            "help": f"MLP activation, one of {', '.join(ACTIVATIONS)}. Default from scratch: "
            f"'{SCRATCH_ACTIVATION}' (exact GELU, as nanoGPT's), or a --preset's own (GPT-2's tanh 'gelu_new')."
        },
    )
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
    learning_rate: float | None = field(
        default=None,
        metadata={
            "help": f"Peak learning rate. Default {SMALL_MODEL_LR:g} for a model trained from scratch at most "
            f"{SMALL_MODEL_MAX_WIDTH} wide (the main job's), {LEARNING_RATE:g} for wider ones and for fine-tuning."
        },
    )
    # The main job's schedule; every one can be overridden on the command line.
    max_steps: int = 800
    per_device_train_batch_size: int = 24
    per_device_eval_batch_size: int = 32
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
        # The default learning rate is settled by `choose_learning_rate` once the model is built.
        self.learning_rate_from_model = self.learning_rate is None
        if self.learning_rate is None:
            self.learning_rate = SMALL_MODEL_LR
        # 'auto' on a CPU whose bf16 pays only for wide models is settled by `choose_precision` once the model
        # is built (fp32 until then).
        self.precision_from_model = False
        if self.precision == "auto" and not (self.bf16 or self.fp16):
            self.precision_from_model = accelerator is None and native_bf16(None) and not _cpu_has("amx_tile")
            self.bf16 = native_bf16(accelerator) and not self.precision_from_model
        elif self.precision != "auto":
            self.bf16, self.fp16 = self.precision == "bf16", self.precision == "fp16"
        super().__post_init__()

    def choose_learning_rate(self, config: hf_gpt.GPTConfig, from_scratch: bool) -> None:
        """Settle a learning rate not given: `SMALL_MODEL_LR` for a model trained from scratch at most
        `SMALL_MODEL_MAX_WIDTH` wide, `LEARNING_RATE` otherwise."""
        if self.learning_rate_from_model:
            small = from_scratch and config.n_embd <= SMALL_MODEL_MAX_WIDTH
            self.learning_rate = SMALL_MODEL_LR if small else LEARNING_RATE
            self.learning_rate_from_model = False

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
