"""`hf-gpt push RUN_DIR REPO_ID`: upload a run folder to the Hugging Face Hub.

Before anything leaves the machine the folder is made Hub-ready (`write_card`: the card, refreshed with
the repo id while it is ours, the loss curve, a complete `auto_map`), checked (`check_folder`,
`validate_card`) and listed. `--dry-run` stops there: it stages what it would write in a temporary
folder, prints exactly the files `upload_folder` would send with their sizes, and makes no network call.
The upload itself is `HfApi.create_repo` + `HfApi.upload_folder`, with training leftovers ignored.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, constants
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .checks import check_folder, validate_card
from .generate import MARKER, write_card

logger = logging.getLogger(__name__)

# Run-folder files that are not part of the published model: Trainer checkpoints (with optimizer and
# scheduler states), TensorBoard/W&B logs, pickled training arguments (they may hold a token), caches.
IGNORE_PATTERNS = (
    "checkpoint-*/",
    ".checkpoint-staging/",  # a checkpoint being written (training/train_lm.py), or left by a killed run
    "runs/",
    "wandb/",
    "*.pt",
    "*.pth",
    "*.ckpt",
    "training_args.bin",
    "__pycache__/",
    "*.pyc",
    ".ipynb_checkpoints/",
)


@dataclass
class PushPlan:
    """What `push_folder` would upload (or did), and what it found wrong."""

    folder: Path
    repo_id: str
    files: list[tuple[str, int]] = field(default_factory=list)  # (path in repo, size in bytes)
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    results: list[str] = field(default_factory=list)  # the card's model-index, as huggingface_hub reads it

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self.files)

    def report(self) -> str:
        lines = [
            f"{len(self.files)} files, {self.total_bytes:,} bytes, from {self.folder} to {constants.ENDPOINT}/{self.repo_id}:"
        ]
        lines += [f"{size:>14,}  {path}" for path, size in self.files]
        lines.append(f"{self.total_bytes:>14,}  total")
        if not any(e.startswith("README.md") for e in self.errors):
            results = "; ".join(self.results) if self.results else "no model-index"
            lines.append(f"card: valid ({results})")
        lines += [f"warning: {w}" for w in self.warnings]
        lines += [f"error: {e}" for e in self.errors]
        return "\n".join(lines)


class PushRefused(ValueError):
    """The folder or its card has errors; nothing was uploaded."""

    def __init__(self, plan: PushPlan) -> None:
        super().__init__("; ".join(plan.errors))
        self.plan = plan


def upload_plan(run_dir: str | Path, overlay: str | Path | None = None) -> list[tuple[str, Path]]:
    """(path in repo, file) for every file `upload_folder(run_dir, ignore_patterns=IGNORE_PATTERNS)` sends,
    selected the way huggingface_hub selects them; files in `overlay` replace or join the folder's."""
    folder = Path(run_dir).expanduser().resolve()
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.glob("**/*")) if p.is_file()}
    if overlay is not None:
        overlay = Path(overlay).resolve()
        files.update({p.relative_to(overlay).as_posix(): p for p in sorted(overlay.glob("**/*")) if p.is_file()})
    kept = filter_repo_objects(files, ignore_patterns=list(IGNORE_PATTERNS) + DEFAULT_IGNORE_PATTERNS)
    return [(path, files[path]) for path in sorted(kept)]


def _is_ours(readme: Path) -> bool:
    return not readme.is_file() or MARKER in readme.read_text("utf-8")


def _plan(folder: Path, repo_id: str, overlay: Path | None) -> PushPlan:
    plan = PushPlan(folder=folder.resolve(), repo_id=repo_id)
    plan.files = [(path, file.stat().st_size) for path, file in upload_plan(folder, overlay)]
    plan.errors, plan.warnings = check_folder(folder, overlay)
    readme = (
        overlay / "README.md" if overlay is not None and (overlay / "README.md").is_file() else folder / "README.md"
    )
    if not readme.is_file():
        plan.errors.append("README.md: the folder has no model card")
        return plan
    text = readme.read_text("utf-8")
    problems = validate_card(text, folder, overlay)
    plan.errors += [f"README.md: {p}" for p in problems]
    if not problems:
        card = ModelCard(text)
        plan.results = [f"{r.metric_type}={r.metric_value}" for r in card.data.eval_results or []]
    return plan


def push_folder(
    run_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    dry_run: bool = False,
    commit_message: str | None = None,
    refresh_card: bool = True,
) -> PushPlan:
    """Upload a run folder to the Hub repo `repo_id` (created if needed) and return what was sent.

    The card (README.md) is regenerated with the repo id unless it was edited by hand (it no longer
    carries the generator's marker line) or `refresh_card=False`. With `dry_run=True` nothing is written
    to the folder and nothing touches the network. Raises `PushRefused` when the folder or card has errors.
    """
    folder = Path(run_dir)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json: not a save_pretrained folder")
    with tempfile.TemporaryDirectory(prefix="hf-gpt-push-") as staging:
        overlay = Path(staging) if dry_run else None
        if refresh_card and _is_ours(folder / "README.md"):
            write_card(folder, repo_id=repo_id, out_dir=overlay)
        plan = _plan(folder, repo_id, overlay)
    if plan.errors:
        raise PushRefused(plan)
    if dry_run:
        return plan
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=True if private else None, exist_ok=True)
    logger.info("uploading %d files (%d bytes) to %s", len(plan.files), plan.total_bytes, repo_url)
    api.upload_folder(
        repo_id=repo_url.repo_id,
        folder_path=folder,
        ignore_patterns=list(IGNORE_PATTERNS),
        commit_message=commit_message or f"Upload {folder.resolve().name} with hf-gpt push",
    )
    return plan


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="hf-gpt push", description="Upload a run folder (model, tokenizer, code, card) to the Hugging Face Hub."
    )
    parser.add_argument("run_dir", help="folder written by save_pretrained / the training script")
    parser.add_argument("repo_id", help="Hub repo id, e.g. your-name/shakespeare-gpt")
    parser.add_argument("--dry-run", action="store_true", help="list the files and check the card; no network")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", help="Hub token (default: HF_TOKEN or the cached `hf auth login`)")
    parser.add_argument("--commit-message", help="commit message of the upload")
    parser.add_argument("--keep-card", action="store_true", help="upload README.md as it is, without refreshing it")
    args = parser.parse_args(argv)
    try:
        plan = push_folder(
            args.run_dir,
            args.repo_id,
            private=args.private,
            token=args.token,
            dry_run=args.dry_run,
            commit_message=args.commit_message,
            refresh_card=not args.keep_card,
        )
    except PushRefused as refused:
        print(refused.plan.report())
        print("nothing was uploaded", file=sys.stderr)
        return 1
    except FileNotFoundError as error:
        print(f"hf-gpt push: {error}", file=sys.stderr)
        return 2
    print(plan.report())
    if args.dry_run:
        print("dry run: nothing was uploaded and no network call was made")
    else:
        print(f"uploaded to {constants.ENDPOINT}/{args.repo_id}")
    return 0


__all__ = ["push_folder", "upload_plan", "PushPlan", "PushRefused", "IGNORE_PATTERNS", "main"]
