"""`hf-gpt finetune` end to end on each task type (issue 4), on the toy corpus, in seconds each."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pytest
import torch
from tasks_toy import save_toy_lm, toy_split, toy_tokenizer
from transformers import AutoModelForMultipleChoice, AutoModelForSequenceClassification, AutoTokenizer

from hf_gpt import GPTForMultipleChoice, GPTForSequenceClassification
from hf_gpt.task_inputs import TaskCollator, TaskEncoder, add_task_tokens, task_token_ids
from training import finetune, tasks
from training.finetune import DataArguments, ModelArguments, build_model, parse_args, task_scores

SMALL = ["--train_examples", "64", "--eval_examples", "32", "--passage_lines", "2", "--max_length", "64"]
FAST = [
    "--per_device_train_batch_size",
    "16",
    "--num_train_epochs",
    "1",
    "--logging_steps",
    "1",
    "--disable_tqdm",
    "true",
    "--seed",
    "0",
]


@pytest.fixture
def toy_corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_GPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(tasks, "shakespeare_works", toy_split)


@pytest.fixture(scope="module")
def toy_lm(tmp_path_factory):
    return save_toy_lm(tmp_path_factory.mktemp("toy_lm"))


def rescore(run_dir, task: str) -> dict[str, float]:
    """Reload the run folder with the Auto classes and score its validation set again."""
    auto = AutoModelForMultipleChoice if task == "multiple_choice" else AutoModelForSequenceClassification
    model = auto.from_pretrained(run_dir).eval()
    tok = AutoTokenizer.from_pretrained(run_dir)
    info = json.loads((run_dir / "run_info.json").read_text())
    d = info["data_args"]
    sizes = tasks.TaskSizes(train=d["train_examples"], eval=d["eval_examples"], passage_lines=d["passage_lines"])
    rows = tasks.load_offline_task(task, sizes)["validation"]
    enc = TaskEncoder(tok, d["max_length"])
    batch = TaskCollator(task_token_ids(tok).pad)([{**enc(task, r), "label": r["label"]} for r in rows])
    with torch.no_grad():
        logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return task_scores(task, logits.numpy(), batch["labels"].numpy())


@pytest.mark.slow  # a Trainer run
@pytest.mark.parametrize("task", ["classification", "entailment", "similarity", "multiple_choice"])
def test_finetune_each_task_type_end_to_end(task, toy_corpus, toy_lm, tmp_path):
    out = tmp_path / "run"
    argv = ["--task", task, "--model_name_or_path", str(toy_lm), "--output_dir", str(out), *SMALL, *FAST]
    assert finetune.main(argv) == 0
    for name in ("config.json", "model.safetensors", "tokenizer.json", "run_info.json", "log_history.json"):
        assert (out / name).is_file(), name
    info = json.loads((out / "run_info.json").read_text())
    assert info["task"] == task and info["base_model"] == str(toy_lm) and not info["from_scratch"]
    expected = {"accuracy"} if task == "multiple_choice" else {"accuracy", "f1"}
    assert expected <= set(info["metrics"]) and info["chance"] == {
        "accuracy": 0.25 if task in ("classification", "multiple_choice") else 0.5
    }
    assert info["training_args"]["learning_rate"] == 6.25e-5 and info["model_args"]["aux_lm_weight"] == 0.5
    config = json.loads((out / "config.json").read_text())
    assert config["aux_lm_weight"] == 0.5 and config["vocab_size"] == len(toy_tokenizer()) + 3
    assert AutoTokenizer.from_pretrained(out).model_max_length == config["n_positions"] == 64  # saved beside it
    assert any("loss" in e for e in json.loads((out / "log_history.json").read_text()))
    # The folder reloads with the Auto classes and scores what the run reported.
    again = rescore(out, task)
    assert again["accuracy"] == pytest.approx(info["metrics"]["accuracy"], abs=1e-6)


@pytest.mark.slow  # a Trainer run
def test_classification_learns_the_genre_from_scratch(toy_corpus, tmp_path, monkeypatch):
    """On the toy corpus the genre shows in the words: a tiny model trained briefly must beat chance clearly."""
    argv = ["--task", "classification", "--from_scratch", "--n_layer", "1", "--n_embd", "32", "--n_head", "2"]
    argv += ["--n_positions", "64", "--output_dir", str(tmp_path / "run"), *SMALL[:-2], "--train_examples", "256"]
    argv += ["--learning_rate", "3e-3", "--num_train_epochs", "4", "--per_device_train_batch_size", "16"]
    argv += ["--disable_tqdm", "true", "--aux_lm_weight", "0"]
    tok = toy_tokenizer()
    monkeypatch.setattr(finetune, "load_base_tokenizer", lambda m: tok)  # the toy vocabulary, not GPT-2's 50,257
    finetune.main(argv)
    info = json.loads((tmp_path / "run" / "run_info.json").read_text())
    assert info["from_scratch"] and info["base_model"] is None
    assert info["metrics"]["accuracy"] > 0.6, info["metrics"]


def test_aux_lm_weight_changes_the_loss_and_from_scratch_keeps_the_architecture(toy_lm):
    tok = toy_tokenizer()
    add_task_tokens(tok)
    enc = TaskEncoder(tok, 64)
    batch = TaskCollator(task_token_ids(tok).pad)(
        [{"input_ids": enc.entailment("the king is dead", "long live the king"), "label": 1}] * 2
    )
    losses = {}
    for lam in (0.0, 0.5):
        torch.manual_seed(0)
        model = build_model(ModelArguments(str(toy_lm), aux_lm_weight=lam), "entailment", tok, ["no", "yes"], False)
        assert model.lm_head.weight is model.transformer.wte.weight
        losses[lam] = model.eval()(**batch).loss.item()
    assert losses[0.5] > losses[0.0] + 0.5  # lambda * the LM loss of a text the random LM cannot predict
    pretrained = build_model(ModelArguments(str(toy_lm)), "entailment", tok, ["no", "yes"], False)
    scratch = build_model(ModelArguments(str(toy_lm), from_scratch=True), "entailment", tok, ["no", "yes"], False)
    assert scratch.config.to_diff_dict() == pretrained.config.to_diff_dict()
    w_pre, w_new = pretrained.transformer.h[0].mlp.c_fc.weight, scratch.transformer.h[0].mlp.c_fc.weight
    assert w_pre.shape == w_new.shape and not torch.equal(w_pre, w_new)


def test_a_gpt2_checkpoint_is_a_base_model(tmp_path):
    """A folder written by transformers' GPT2LMHeadModel (plus its tokenizer) fine-tunes like ours."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = toy_tokenizer()
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=2))
    ref.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    m = ModelArguments(str(tmp_path))
    tok = finetune.load_base_tokenizer(m)
    model = build_model(m, "multiple_choice", tok, None, False)
    assert isinstance(model, GPTForMultipleChoice) and model.config.aux_lm_weight == 0.5
    n = ref.config.vocab_size
    torch.testing.assert_close(model.transformer.wte.weight[:n], ref.transformer.wte.weight)
    torch.testing.assert_close(model.transformer.h[1].mlp.c_fc.weight, ref.transformer.h[1].mlp.c_fc.weight.T)


@pytest.mark.slow  # a Trainer run
def test_regression_dataset_reports_pearson_and_spearman(toy_lm, tmp_path, monkeypatch):
    """The online path (an STS-B shaped dataset, mocked here) trains a regression head with correlations."""
    rng = np.random.default_rng(0)
    rows = [{"text_a": "the king", "text_b": "the queen", "label": float(rng.uniform(0, 5))} for _ in range(32)]
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(rows), "validation": datasets.Dataset.from_list(rows)}
    )
    monkeypatch.setattr(finetune, "load_task", lambda task, dataset, sizes: dd)
    out = tmp_path / "run"
    finetune.main(
        [
            "--task",
            "similarity",
            "--dataset",
            "stsb",
            "--model_name_or_path",
            str(toy_lm),
            "--output_dir",
            str(out),
            *FAST,
        ]
    )
    info = json.loads((out / "run_info.json").read_text())
    assert {"pearson", "spearman"} <= set(info["metrics"]) and info["dataset_id"] == "nyu-mll/glue"
    model = GPTForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.problem_type == "regression"


def test_task_scores():
    logits = np.array([[2.0, 1.0], [0.0, 3.0], [1.0, 0.0], [0.0, 1.0]])
    labels = np.array([0, 1, 1, 1])
    assert task_scores("entailment", logits, labels) == {"accuracy": 0.75, "f1": pytest.approx(0.8)}
    three = np.eye(3)[[0, 1, 2, 2]]  # predicts 0, 1, 2, 2
    s = task_scores("classification", three, np.array([0, 1, 1, 2]))
    assert s["accuracy"] == 0.75 and s["f1"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert task_scores("multiple_choice", logits, labels) == {"accuracy": 0.75}
    x = np.array([1.0, 2.0, 3.0, 4.0, 10.0])
    r = task_scores("similarity", x[:, None] ** 3, x, regression=True)
    assert r["spearman"] == pytest.approx(1.0) and 0.9 < r["pearson"] < 1.0
    ties = task_scores("similarity", np.array([1.0, 1.0, 2.0]), np.array([1.0, 2.0, 3.0]), regression=True)
    assert ties["spearman"] == pytest.approx(np.corrcoef([1.5, 1.5, 3.0], [1.0, 2.0, 3.0])[0, 1])


def test_arguments_from_a_yaml_file_and_gpt1_defaults(tmp_path):
    path = tmp_path / "ft.yaml"
    path.write_text("task: entailment\nmodel_name_or_path: some/folder\naux_lm_weight: 0.25\noutput_dir: out\n")
    m, d, args = parse_args([str(path)])
    assert (m.model_name_or_path, m.aux_lm_weight, d.task, args.output_dir) == (
        "some/folder",
        0.25,
        "entailment",
        "out",
    )
    assert (args.learning_rate, args.per_device_train_batch_size, args.num_train_epochs) == (6.25e-5, 32, 3.0)
    assert (args.lr_scheduler_type, args.warmup_steps) == ("linear", 0.002)
    with pytest.raises(ValueError, match="--task"):
        DataArguments(task="translation")


def test_transfer_table_from_run_folders(tmp_path):
    """training.transfer's table: mean (range) over seeds of each configuration, beside chance."""
    from training.transfer import markdown, summarize, variants

    assert list(variants([1e-3], [])) == ["pretrained", "pretrained_lr0.001", "scratch"]
    assert variants([], [1e-3])["scratch_lr0.001"] == ["--from_scratch", "--learning_rate", "0.001"]
    for name, scores in {"pretrained": [0.5, 0.6], "scratch": [0.3, 0.25]}.items():
        for seed, acc in enumerate(scores):
            run = tmp_path / f"multiple_choice-{name}-seed{seed}"
            run.mkdir()
            info = {"metrics": {"accuracy": acc}, "chance": {"accuracy": 0.25}}
            (run / "run_info.json").write_text(json.dumps(info))
    rows = summarize(tmp_path, ["multiple_choice"], ["pretrained", "scratch"], [0, 1])
    assert rows == [
        {
            "task": "multiple_choice",
            "offline_task": "next_line",
            "pretrained": [0.5, 0.6],
            "chance": 0.25,
            "scratch": [0.3, 0.25],
        }
    ]
    assert markdown(rows, ["pretrained", "scratch"]).splitlines()[2] == (
        "| multiple_choice (next_line) | 25.0 | 55.0 (50.0–60.0) | 27.5 (25.0–30.0) |"
    )


@pytest.mark.parametrize("module", ["training.finetune", "training.hpo"])
def test_help_renders(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).main(["--help"])
    assert exit_.value.code == 0 and "--aux_lm_weight" in capsys.readouterr().out
