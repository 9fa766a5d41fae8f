"""`hf-gpt`: one command line for the project's jobs. Each subcommand lives in its own module and
is imported only when used (importing the `hf_gpt` package itself imports torch and transformers)."""

from __future__ import annotations

import gc
import importlib
import sys

# subcommand -> ("module:function", one-line help). Each function takes the remaining argv list.
COMMANDS: dict[str, tuple[str, str]] = {
    "train": ("training.train_lm:main", "pretrain or fine-tune a causal LM with Trainer (default: Shakespeare)"),
    "finetune": ("training.finetune:main", "GPT-1 style task fine-tuning (classification, entailment, ...)"),
    "convert": ("hf_gpt.convert_cli:convert_main", "GPT-2 / GPT-1 checkpoint or Hub id -> hf_gpt folder"),
    "export": ("hf_gpt.convert_cli:export_main", "hf_gpt folder -> plain transformers GPT-2 / OpenAI-GPT folder"),
    "hpo": ("training.hpo:main", "grid / random search over fine-tuning hyperparameters (optuna)"),
    "transfer": ("training.transfer:main", "pretrained vs from-scratch fine-tuning on the four offline tasks"),
    "eval-ppl": ("training.evaluate:main", "sliding-window perplexity of a model on a text file"),
    "serve": ("hf_gpt.serve:main", "OpenAI-compatible server for a model folder, with continuous batching"),
    "bench": ("benchmarks.bench:main", "speed and memory against transformers' GPT-2"),
    "card": ("model_cards.generate:main", "write the model card (README.md) of a run folder"),
    "push": ("model_cards.push:main", "upload a run folder to the Hub (--dry-run lists the files)"),
}


def main(argv: list[str] | None = None, *, as_program: bool = False) -> int:
    """Run the subcommand `argv[0]` with the rest of `argv` (default: the command line); its exit status.

    `as_program` (the `hf-gpt` program itself, not a caller in a longer-lived process): the modules imported and the
    objects left at the end live until the process exits, so they are moved out of the garbage collector's sight
    (`gc.freeze`). Each full collection during the command, and those Python makes while it shuts down, would
    otherwise walk the hundreds of thousands of objects torch and transformers create on import: shutting down after
    `hf-gpt train` took 1.6-1.8 s without this and 0.1-0.3 s with it on the project's 2-core CPU.
    """
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: hf-gpt COMMAND [ARGS...]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nhf-gpt: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    target, _ = COMMANDS[argv[0]]
    module_name, func_name = target.split(":")
    func = getattr(importlib.import_module(module_name), func_name)
    if as_program:
        gc.freeze()
    result = func(argv[1:])
    if as_program:
        gc.freeze()
    return int(result or 0)


def run() -> None:
    """The `hf-gpt` program."""
    sys.exit(main(as_program=True))


if __name__ == "__main__":
    run()
