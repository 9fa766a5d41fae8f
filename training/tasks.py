"""Task datasets for GPT-1's four task types: offline ones built from the Shakespeare corpus, and the
standard `datasets` names (GLUE SST-2 / RTE / MNLI / STS-B, SWAG, RACE) when online.

Offline tasks (`--dataset shakespeare`). Every example comes from whole works of one side of the
corpus's train / validation split (`training.data`), so the fine-tuned model is scored on works it never
saw, neither in pretraining nor in fine-tuning. A *passage* is `passage_lines` consecutive non-empty lines
of a work (speaker names and stage directions included, as printed); a *verse line* is a non-empty line
of text that is neither a speaker name, a heading nor a stage direction.

- classification (`genre`): the genre (comedy, tragedy, history, poetry) of a passage. Passages are
  drawn equally from each genre, and evenly over the works of a genre. Chance: the share of the
  commonest genre in the evaluation set.
- entailment (`follows`): a passage and a verse line; 1 if the line is the one that comes next, 0 if it is a
  verse line from elsewhere in the same work (at least `min_distance` lines away). Each passage appears
  once with its true next line and once with a distractor, so neither the passage nor the line alone
  tells the answer. Chance: 50%.
- similarity (`same_work`): two non-overlapping passages; 1 if both come from the same work, 0 if from two
  different works of the same split. Half of the pairs are positive. Both orders are encoded and summed
  by the head (GPT-1 sec. 3.3). Chance: 50%.
- multiple choice (`next_line`): a passage and four verse lines, the true next line and three from elsewhere
  in the same work (at least `min_distance` lines away), in random order. Chance: 25%.

Columns follow `hf_gpt.task_inputs.TASK_COLUMNS`; each row also names its work(s). Built datasets are
cached with `save_to_disk` under the corpus cache (`$HF_GPT_CACHE/tasks/...`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import datasets

logger = logging.getLogger(__name__)

TASK_TYPES = ("classification", "entailment", "similarity", "multiple_choice")
GENRES = ("comedy", "tragedy", "history", "poetry")
OFFLINE_NAMES = {  # the task each type is instantiated as on the Shakespeare corpus
    "classification": "genre",
    "entailment": "follows",
    "similarity": "same_work",
    "multiple_choice": "next_line",
}
BUILD_VERSION = 1  # bump when the builders change, so stale caches are not reused
# Default training-set sizes: similarity and multiple choice read 2 and 4 sequences per example.
DEFAULT_TRAIN_EXAMPLES = {"classification": 4000, "entailment": 4000, "similarity": 2000, "multiple_choice": 2000}


class Work(Protocol):
    """What a task needs of a work (`training.data.Work` has it): a unique key, its genre and its text."""

    key: str
    genre: str
    text: str


@dataclass(frozen=True)
class TaskSizes:
    """How many examples to build and how long a passage is (in non-empty lines)."""

    train: int = 4000
    eval: int = 800
    passage_lines: int = 3
    min_distance: int = 40  # distractor lines lie at least this many lines away from the true one
    seed: int = 0


_SPEAKER = re.compile(r"^[A-Z][A-Z0-9 ,.'&\-]*\.?$")  # "MACBETH.", "FIRST WITCH.", "ACT I.", "SCENE II."
_DIRECTION = re.compile(r"^(\[|\(|ACT\b|SCENE\b|Enter\b|Exit\b|Exeunt\b|Re-enter\b|Flourish\b|Alarum|Sennet\b|Manet\b)")


def is_verse(line: str) -> bool:
    """A line of the work's text proper: not a speaker name, heading, or stage direction."""
    s = line.strip()
    return len(s) >= 12 and any(c.islower() for c in s) and not _SPEAKER.match(s) and not _DIRECTION.match(s)


def work_lines(work: Work) -> list[str]:
    return [line.rstrip() for line in work.text.splitlines() if line.strip()]


class _Lines:
    """A work's non-empty lines and the indices of the verse lines that have a full passage before them."""

    def __init__(self, work: Work, passage_lines: int) -> None:
        self.work, self.n = work, passage_lines
        self.lines = work_lines(work)
        self.verse = [i for i in range(passage_lines, len(self.lines)) if is_verse(self.lines[i])]
        if len(self.lines) < 2 * passage_lines or not self.verse:
            raise ValueError(f"{work.key!r} is too short for passages of {passage_lines} lines")

    def passage(self, start: int) -> str:
        return "\n".join(self.lines[start : start + self.n])

    def random_start(self, rng: random.Random) -> int:
        return rng.randrange(len(self.lines) - self.n + 1)

    def next_line_and_distractors(self, k: int, dist: int, rng: random.Random) -> tuple[int, list[str]]:
        """A verse line `i` and `k` different verse lines of the same work at least `dist` lines away from it
        and unlike it (rejection sampling: nearly always done in `k` draws)."""
        for _ in range(100):
            i = rng.choice(self.verse)
            out: list[str] = []
            for _ in range(20 * k):
                j = rng.choice(self.verse)
                cand = self.lines[j]
                if abs(j - i) >= dist and cand.strip() != self.lines[i].strip() and cand not in out:
                    out.append(cand)
                    if len(out) == k:
                        return i, out
        raise ValueError(f"{self.work.key!r}: no {k} verse lines {dist} lines away from another; too short")


def _spread(works: Sequence[_Lines], n: int, rng: random.Random) -> list[_Lines]:
    """`n` work picks, as even over `works` as possible (each work n // len or one more), shuffled."""
    picks = [works[i % len(works)] for i in range(n)]
    rng.shuffle(picks)
    return picks


def build_classification(works: Sequence[_Lines], n: int, sizes: TaskSizes, rng: random.Random) -> list[dict]:
    by_genre = {g: [w for w in works if w.work.genre == g] for g in GENRES}
    present = [g for g in GENRES if by_genre[g]]
    genres = [present[i % len(present)] for i in range(n)]  # equal numbers per genre
    picks = {g: _spread(by_genre[g], genres.count(g), rng) for g in present}
    out = []
    for genre in genres:
        w = picks[genre].pop()
        out.append({"text": w.passage(w.random_start(rng)), "label": GENRES.index(genre), "work": w.work.key})
    rng.shuffle(out)
    return out


def build_entailment(works: Sequence[_Lines], n: int, sizes: TaskSizes, rng: random.Random) -> list[dict]:
    out = []
    for w in _spread(works, (n + 1) // 2, rng):
        i, (other,) = w.next_line_and_distractors(1, sizes.min_distance, rng)
        premise = w.passage(i - w.n)
        out.append({"premise": premise, "hypothesis": w.lines[i], "label": 1, "work": w.work.key})
        out.append({"premise": premise, "hypothesis": other, "label": 0, "work": w.work.key})
    rng.shuffle(out)
    return out[:n]


def build_similarity(works: Sequence[_Lines], n: int, sizes: TaskSizes, rng: random.Random) -> list[dict]:
    if len(works) < 2:
        raise ValueError("the similarity task needs at least two works")
    out = []
    for k, w in enumerate(_spread(works, n, rng)):
        a = w.random_start(rng)
        if k % 2 == 0:  # positive: another passage of the same work, not overlapping (far away if it can be)
            far = max(w.n, min(sizes.min_distance, len(w.lines) // 3))
            other, b = w, a
            while abs(b - a) < far:
                b = w.random_start(rng)
        else:
            other = rng.choice([x for x in works if x is not w])
            b = other.random_start(rng)
        row = {"text_a": w.passage(a), "text_b": other.passage(b), "label": int(other is w)}
        out.append({**row, "work_a": w.work.key, "work_b": other.work.key})
    rng.shuffle(out)
    return out


def build_multiple_choice(works: Sequence[_Lines], n: int, sizes: TaskSizes, rng: random.Random) -> list[dict]:
    out = []
    for w in _spread(works, n, rng):
        i, choices = w.next_line_and_distractors(3, sizes.min_distance, rng)
        label = rng.randrange(4)
        choices.insert(label, w.lines[i])
        out.append({"context": w.passage(i - w.n), "choices": choices, "label": label, "work": w.work.key})
    return out


BUILDERS: dict[str, Callable[[Sequence[_Lines], int, TaskSizes, random.Random], list[dict]]] = {
    "classification": build_classification,
    "entailment": build_entailment,
    "similarity": build_similarity,
    "multiple_choice": build_multiple_choice,
}


def build_offline_task(
    task: str, train_works: Sequence[Work], eval_works: Sequence[Work], sizes: TaskSizes = TaskSizes()
) -> datasets.DatasetDict:
    """The offline `task` as a DatasetDict with "train" (from `train_works`) and "validation" (from `eval_works`)."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task type {task!r}; choose one of {TASK_TYPES}")
    overlap = {w.key for w in train_works} & {w.key for w in eval_works}
    if overlap:
        raise ValueError(f"works on both sides of the split: {sorted(overlap)}")
    out = {}
    for i, (split, works, n) in enumerate(
        [("train", train_works, sizes.train), ("validation", eval_works, sizes.eval)]
    ):
        rng = random.Random(f"{task}-{sizes.seed}-{i}")
        rows = BUILDERS[task]([_Lines(w, sizes.passage_lines) for w in works], n, sizes, rng)
        out[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(out)


def chance_level(task: str, eval_set: datasets.Dataset) -> dict[str, float]:
    """The score of the best constant guess on `eval_set` (the majority class; 1/K for multiple choice)."""
    if task == "multiple_choice":
        return {"accuracy": 1.0 / len(eval_set[0]["choices"])}
    labels = list(eval_set["label"])
    if isinstance(labels[0], float):  # regression: a constant prediction has no correlation
        return {"pearson": 0.0, "spearman": 0.0}
    counts = {y: labels.count(y) for y in set(labels)}
    return {"accuracy": max(counts.values()) / len(labels)}


# --- the Shakespeare corpus ---------------------------------------------------------------------------


def shakespeare_works() -> tuple[list[Work], list[Work]]:
    """(train works, validation works) of the default corpus, split by whole work (`training.data`)."""
    from training import data

    corpus = data.shakespeare_corpus()
    return corpus["train"], corpus["validation"]


def load_offline_task(task: str, sizes: TaskSizes = TaskSizes()) -> datasets.DatasetDict:
    """The offline task on the Shakespeare corpus, built once and cached on disk (keyed by the sizes, the
    split and the works' text)."""
    if task not in BUILDERS:
        raise ValueError(f"unknown task type {task!r}; choose one of {TASK_TYPES}")
    train_works, eval_works = shakespeare_works()
    h = hashlib.sha1(json.dumps({"task": task, "v": BUILD_VERSION, **asdict(sizes)}, sort_keys=True).encode())
    for split, works in (("train", train_works), ("eval", eval_works)):
        for w in works:
            h.update(f"{split}:{w.key}:{w.genre}:".encode() + hashlib.sha1(w.text.encode()).digest())
    from training.data import cache_root

    folder = cache_root() / "tasks" / f"{OFFLINE_NAMES[task]}-{h.hexdigest()[:12]}"
    if (folder / "dataset_dict.json").exists():
        return datasets.load_from_disk(str(folder))
    dd = build_offline_task(task, train_works, eval_works, sizes)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    dd.save_to_disk(str(tmp))
    try:
        os.replace(tmp, folder)  # atomic: a concurrent reader never sees a half-written cache
    except OSError:  # another process built the same folder first; theirs and ours are identical
        shutil.rmtree(tmp, ignore_errors=True)
        return datasets.load_from_disk(str(folder))
    logger.info("built %s (%s) into %s", task, OFFLINE_NAMES[task], folder)
    return dd


# --- standard datasets (online) -----------------------------------------------------------------------


@dataclass(frozen=True)
class HubTask:
    """Where a standard dataset lives and how its rows map onto our columns."""

    task: str
    path: str
    config: str | None
    eval_split: str
    to_row: Callable[[dict[str, Any]], dict[str, Any]]
    regression: bool = False


def _swag_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "context": r["sent1"],
        "choices": [f"{r['sent2']} {r[f'ending{k}']}" for k in range(4)],
        "label": r["label"],
    }


def _race_row(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "context": f"{r['article']}\n{r['question']}",
        "choices": list(r["options"]),
        "label": "ABCD".index(r["answer"]),
    }


HUB_TASKS = {
    "sst2": HubTask("classification", "nyu-mll/glue", "sst2", "validation", lambda r: {"text": r["sentence"], "label": r["label"]}),
    "rte": HubTask("entailment", "nyu-mll/glue", "rte", "validation",
                   lambda r: {"premise": r["sentence1"], "hypothesis": r["sentence2"], "label": r["label"]}),
    "mnli": HubTask("entailment", "nyu-mll/glue", "mnli", "validation_matched",
                    lambda r: {"premise": r["premise"], "hypothesis": r["hypothesis"], "label": r["label"]}),
    "stsb": HubTask("similarity", "nyu-mll/glue", "stsb", "validation",
                    lambda r: {"text_a": r["sentence1"], "text_b": r["sentence2"], "label": float(r["label"])},
                    regression=True),
    "mrpc": HubTask("similarity", "nyu-mll/glue", "mrpc", "validation",
                    lambda r: {"text_a": r["sentence1"], "text_b": r["sentence2"], "label": r["label"]}),
    "swag": HubTask("multiple_choice", "allenai/swag", "regular", "validation", _swag_row),
    "race": HubTask("multiple_choice", "ehovy/race", "all", "validation", _race_row),
}  # fmt: skip


def map_hub_rows(spec: HubTask, raw: datasets.DatasetDict) -> datasets.DatasetDict:
    """Rename a standard dataset's columns to ours (train + the spec's eval split as "validation")."""
    splits = {"train": raw["train"], "validation": raw[spec.eval_split]}
    return datasets.DatasetDict(
        {name: ds.map(spec.to_row, remove_columns=ds.column_names) for name, ds in splits.items()}
    )


def load_task(task: str, dataset: str = "shakespeare", sizes: TaskSizes = TaskSizes()) -> datasets.DatasetDict:
    """`dataset` "shakespeare" builds the offline task; a `HUB_TASKS` name loads it with `datasets` (online)."""
    if dataset == "shakespeare":
        return load_offline_task(task, sizes)
    if dataset not in HUB_TASKS:
        raise ValueError(f"unknown dataset {dataset!r}: use 'shakespeare' or one of {sorted(HUB_TASKS)}")
    spec = HUB_TASKS[dataset]
    if spec.task != task:
        raise ValueError(f"{dataset} is a {spec.task} dataset, not {task}")
    return map_hub_rows(spec, datasets.load_dataset(spec.path, spec.config))


def is_regression(task: str, dataset: str) -> bool:
    return dataset in HUB_TASKS and HUB_TASKS[dataset].regression


__all__ = [
    "TASK_TYPES",
    "GENRES",
    "OFFLINE_NAMES",
    "TaskSizes",
    "HubTask",
    "HUB_TASKS",
    "is_verse",
    "build_offline_task",
    "load_offline_task",
    "load_task",
    "map_hub_rows",
    "chance_level",
    "is_regression",
]
