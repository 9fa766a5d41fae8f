"""`hf-gpt convert` (GPT-2 / GPT-1 checkpoint -> hf_gpt folder) and `hf-gpt export` (hf_gpt -> plain GPT-2 / GPT-1).

Both read the whole checkpoint and check it before writing anything, write into a temporary sibling
of DST, and rename it to DST only when everything is written: an error leaves no partial DST behind.
Errors a user can cause (no checkpoint, another architecture, a truncated file, weights that do not
fit the config, a model the plain format cannot express) print one message and exit with status 1.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .conversion import (
    FOREIGN_MODEL_TYPES,
    CheckpointError,
    export_to_transformers,
    load_checkpoint,
    plain_format,
    read_config_dict,
)
from .tokenization import load_tokenizer, save_beside_model

logger = logging.getLogger("hf_gpt.convert")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _parser(prog: str, description: str, src_help: str, dst_help: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("src", metavar="SRC", help=src_help)
    p.add_argument("dst", metavar="DST", help=dst_help)
    p.add_argument("--dtype", choices=list(DTYPES), help="cast the weights (default: keep the checkpoint's dtype)")
    p.add_argument(
        "--max-shard-size", default="5GB", help="split the safetensors weights above this size (default 5GB)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--quiet", action="store_true", help="print only errors and the final line")
    return p


def _log_to_stderr(quiet: bool) -> logging.Handler:
    """Our progress lines on stderr while a command runs; other libraries keep their defaults."""
    from transformers.utils import logging as hf_logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    package_logger = logging.getLogger("hf_gpt")
    package_logger.addHandler(handler)
    package_logger.setLevel(logging.WARNING if quiet else logging.INFO)
    if quiet:
        hf_logging.disable_progress_bar()
    return handler


def _check_paths(src: str, dst: str, overwrite: bool) -> Path:
    if src.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(src)):
        raise CheckpointError(f"{src}: no such folder.")
    out = Path(dst).expanduser().absolute()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"{dst} exists and is not a folder.")
    return out


def write_atomically(dst: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp)` on a fresh temporary sibling of `dst`, then move it to `dst` (replacing it)."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.tmp-", dir=dst.parent))
    try:
        # mkdtemp makes its folder owner-only; give DST an ordinary new folder's permissions (so that, say, a
        # server running as another user can read an export), as os.makedirs would under the current umask.
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o777 & ~umask)
        write(tmp)
        if dst.exists():
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _run(prog: str, main: Callable[[argparse.Namespace], str], args: argparse.Namespace) -> int:
    handler = _log_to_stderr(args.quiet)
    try:
        print(main(args))
    except (CheckpointError, ValueError, OSError) as e:  # the user's input, not a bug: no traceback
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 1
    finally:
        logging.getLogger("hf_gpt").removeHandler(handler)
    return 0


# What both commands carry over: the language model. A task head would be silently dropped.
LANGUAGE_MODELS = {
    "GPTForCausalLM",
    "GPTModel",
    "GPT2LMHeadModel",
    "GPT2Model",
    "OpenAIGPTLMHeadModel",
    "OpenAIGPTModel",
}


def _load(src: str, accept: tuple[str, ...], dtype: torch.dtype | None):
    """(GPTForCausalLM, source model_type, tokenizer or None) from any checkpoint `load_checkpoint` reads."""
    from .modeling_gpt import GPTForCausalLM

    start = time.perf_counter()
    logger.info("reading %s", src)
    cfg = read_config_dict(src) or {}
    architectures = set(cfg.get("architectures") or [])
    if cfg.get("model_type") in accept and architectures - LANGUAGE_MODELS:
        raise CheckpointError(
            f"{src} holds a {', '.join(sorted(architectures))}; this command converts language models "
            f"({', '.join(sorted(LANGUAGE_MODELS))}) and would drop its task head. Load task models in Python "
            "instead, e.g. hf_gpt.GPTForSequenceClassification.from_pretrained(SRC)."
        )
    config, state, model_type = load_checkpoint(src, accept=accept)
    size = sum(t.nbytes for t in state.values())
    logger.info(
        "read %d tensors (%.1f MB) of a %s checkpoint in %.1fs",
        len(state),
        size / 1e6,
        model_type,
        time.perf_counter() - start,
    )
    model = GPTForCausalLM.from_pretrained(None, config=config, state_dict=state, dtype=dtype)
    del state
    return model.eval(), model_type, load_tokenizer(src, config)


def _convert(args: argparse.Namespace) -> str:
    dst = _check_paths(args.src, args.dst, args.overwrite)
    model, model_type, tokenizer = _load(args.src, FOREIGN_MODEL_TYPES, DTYPES.get(args.dtype))

    def write(folder: Path) -> None:
        logger.info("writing %s", args.dst)
        model.save_pretrained(folder, max_shard_size=args.max_shard_size)
        if tokenizer is not None:
            save_beside_model(tokenizer, model.config, folder)
        else:
            logger.warning(
                "no tokenizer in %s and vocab_size %d is not GPT-2's: none written", args.src, model.config.vocab_size
            )

    write_atomically(dst, write)
    n = sum(p.numel() for p in model.parameters())
    return (
        f"wrote {args.dst}: GPTForCausalLM ({n:,} parameters, {str(model.dtype).removeprefix('torch.')}) from a "
        f"{model_type} checkpoint; load it with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)"
    )


def _export(args: argparse.Namespace) -> str:
    dst = _check_paths(args.src, args.dst, args.overwrite)
    model, model_type, tokenizer = _load(args.src, ("hf_gpt", *FOREIGN_MODEL_TYPES), None)
    family = plain_format(model.config)  # refuses, before anything is written, what the format cannot express
    if family == "gpt2" and model.config.activation_function not in ("gelu_new", "gelu_pytorch_tanh"):
        logger.warning(
            "%s uses activation_function=%r: transformers and vLLM compute it as the config says, but llama.cpp's "
            "GPT-2 graph always computes GPT-2's tanh GELU, so a GGUF made from this export would compute something "
            "else (train with --activation_function gelu_new for llama.cpp)",
            args.src,
            model.config.activation_function,
        )
    dtype = DTYPES.get(args.dtype)

    def write(folder: Path) -> None:
        logger.info("writing %s as a plain %s folder", args.dst, family)
        export_to_transformers(
            model, folder, dtype=dtype, tokenizer=tokenizer or "auto", max_shard_size=args.max_shard_size
        )

    write_atomically(dst, write)
    cls = "GPT2LMHeadModel" if family == "gpt2" else "OpenAIGPTLMHeadModel"
    return (
        f"wrote {args.dst}: a plain {family} checkpoint ({cls}) from a {model_type} checkpoint; no custom code needed"
    )


def convert_main(argv: list[str] | None = None) -> int:
    """`hf-gpt convert SRC DST`: a GPT-2 / OpenAI-GPT checkpoint (folder or Hub id) as an hf_gpt folder."""
    args = _parser(
        "hf-gpt convert",
        "Convert a GPT-2 or OpenAI-GPT (GPT-1) checkpoint into an hf_gpt folder, loadable with "
        "AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True) even where hf_gpt is not installed.",
        "GPT-2 / OpenAI-GPT checkpoint: a folder written by transformers, or a Hub id such as gpt2 (online only)",
        "output folder (hf_gpt format, with the tokenizer)",
    ).parse_args(argv)
    return _run("hf-gpt convert", _convert, args)


def export_main(argv: list[str] | None = None) -> int:
    """`hf-gpt export SRC DST`: an hf_gpt folder as a plain transformers GPT-2 / OpenAI-GPT folder."""
    args = _parser(
        "hf-gpt export",
        "Export an hf_gpt model (GPT-2 or GPT-1 variant) as a plain transformers GPT-2 / OpenAI-GPT folder that "
        "GPT2LMHeadModel, vLLM or llama.cpp's converter read with no custom code.",
        "hf_gpt folder (or any checkpoint hf-gpt convert reads)",
        "output folder (plain GPT-2 / OpenAI-GPT format)",
    ).parse_args(argv)
    return _run("hf-gpt export", _export, args)


if __name__ == "__main__":
    sys.exit(convert_main())
