"""Checkpoints of a run folder: staged writing, integrity checks, and what `--resume_from_checkpoint` resumes.

Trainer writes each checkpoint into the hidden folder `STAGING` and `publish_checkpoint` renames it into place
once complete, so a killed run never leaves a half-written `checkpoint-N/`. `checkpoint_problem` reads every file
of a checkpoint; resuming skips broken ones with a warning (`last_usable_checkpoint`). `prepare_output_dir` picks
the checkpoint to resume, or refuses to mix a fresh run into a folder that holds an earlier one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from training.arguments import LMTrainingArguments

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


def checkpoint_step(folder: Path | str | None) -> int:
    """The optimizer step a checkpoint was saved at (its trainer_state.json's global_step); 0 for None."""
    if folder is None:
        return 0
    return int(json.loads((Path(folder) / "trainer_state.json").read_text(encoding="utf-8"))["global_step"])


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
