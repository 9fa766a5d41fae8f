"""Model cards (issue 6): the generated README.md parses with huggingface_hub, its metadata and model-index
read back, it describes the model's family with the papers' figures, and its loss plot is really there.

`make_run_folder` fabricates what the training script leaves behind (a tiny model saved with
save_pretrained, tokenizer, run_info.json, log_history.json, a checkpoint); the Hub tests use it too.
"""

from __future__ import annotations

import atexit
import copy
import json
import math
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from huggingface_hub.repocard_data import model_index_to_eval_results

import hf_gpt
from hf_gpt import GPTConfig, GPTForCausalLM, GPTForSequenceClassification
from model_cards.checks import check_folder, complete_auto_map, registered_auto_map, validate_card
from model_cards.generate import build_card, detect_family, write_card

SECRET = "hf_not_a_real_token_0123456789"


_TEMPLATES: dict[tuple, tuple[Path, torch.nn.Module]] = {}


def make_run_folder(
    folder: Path,
    *,
    head: str = "causal",
    run_info: bool = True,
    log_history: bool = True,
    tokenizer: bool = True,
    seed: int = 0,
) -> torch.nn.Module:
    """A run folder as `training/train_lm.py` writes it, around a tiny GPT-2-shaped model; returns the model.

    Written once per set of arguments and copied into `folder` after that (a test that changes its folder changes
    only its copy); the model returned is a copy too."""
    key = (head, run_info, log_history, tokenizer, seed)
    if key not in _TEMPLATES:
        template = Path(tempfile.mkdtemp(prefix="hf_gpt-run-folder-"))
        atexit.register(shutil.rmtree, template, ignore_errors=True)
        model = write_run_folder(
            template, head=head, run_info=run_info, log_history=log_history, tokenizer=tokenizer, seed=seed
        )
        _TEMPLATES[key] = (template, model)
    template, model = _TEMPLATES[key]
    shutil.copytree(template, folder, dirs_exist_ok=True)
    return copy.deepcopy(model)


def write_run_folder(
    folder: Path, *, head: str, run_info: bool, log_history: bool, tokenizer: bool, seed: int
) -> torch.nn.Module:
    torch.manual_seed(seed)
    # GPT-2's vocabulary, so that the offline GPT-2 tokenizer fits; weights large enough that outputs are peaked.
    config = GPTConfig(n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.2)
    if head == "causal":
        model = GPTForCausalLM(config).eval()
    else:
        config.num_labels = 3
        config.id2label = {0: "entailment", 1: "neutral", 2: "contradiction"}
        config.label2id = {v: k for k, v in config.id2label.items()}
        config.pad_token_id = config.eos_token_id
        model = GPTForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    if tokenizer:
        hf_gpt.gpt2_tokenizer(model_max_length=64).save_pretrained(folder)
    if run_info:
        info = {
            "model_args": {"preset": None, "n_layer": 2, "n_embd": 32, "n_head": 2},
            "data_args": {"block_size": 64, "dataset": "shakespeare"},
            "training_args": {
                "learning_rate": 0.00123,
                "per_device_train_batch_size": 8,
                "gradient_accumulation_steps": 2,
                "max_steps": 30,
                "seed": 1337,
                "hub_token": SECRET,
            },
            "git_revision": "0123abc",
            "preset": None,
            "base_model": None,
            "dataset": "Shakespeare (Open Shakespeare)",
            "dataset_id": None,
            "tokenizer": "gpt2",
            "num_parameters": model.num_parameters(),
            "task": "causal-lm",
            "metrics": {
                "eval_loss": 4.8123,
                "perplexity": math.exp(4.8123),
                "train_loss": 5.5,
                "train_runtime_s": 83.0,
                "train_tokens": 30720,
                "eval_loss_step0": 10.9,
            },
            "hardware": "2 CPU cores (test machine)",
            "samples": ["ROMEO: a sample the run wrote"],
        }
        if head != "causal":
            info.update(
                task="entailment", base_model="openai-community/gpt2", dataset="SNLI", dataset_id="stanfordnlp/snli"
            )
            info["metrics"] = {"eval_loss": 0.61, "accuracy": 0.75, "train_runtime_s": 12.0}
            info["chance"] = {"accuracy": 0.34}
        (folder / "run_info.json").write_text(json.dumps(info), encoding="utf-8")
    if log_history:
        history = [{"step": s, "loss": 10.0 - 0.15 * s, "learning_rate": 1e-3} for s in range(1, 31)]
        history += [{"step": s, "eval_loss": 9.0 - 0.14 * s} for s in (10, 20, 30)]
        (folder / "log_history.json").write_text(json.dumps(history), encoding="utf-8")
    # Trainer leftovers that must never be published.
    (folder / "checkpoint-10").mkdir()
    (folder / "checkpoint-10" / "optimizer.pt").write_bytes(b"\0" * 64)
    (folder / "checkpoint-10" / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / ".checkpoint-staging" / "checkpoint-12").mkdir(parents=True)  # a save cut short by a kill
    (folder / ".checkpoint-staging" / "checkpoint-12" / "model.safetensors").write_bytes(b"\0" * 64)
    (folder / "runs").mkdir()
    (folder / "runs" / "events.out.tfevents").write_bytes(b"\0" * 16)
    (folder / "training_args.bin").write_bytes(b"\0" * 16)
    return model


@pytest.fixture
def run_folder(tmp_path):
    folder = tmp_path / "tiny-shakespeare-gpt"
    folder.mkdir()
    model = make_run_folder(folder)
    return folder, model


@pytest.fixture(scope="module")
def carded(tmp_path_factory):
    """(run folder with its card written, the model, what write_card returned), for the tests that only read it:
    rendering a card takes most of a second."""
    folder = tmp_path_factory.mktemp("carded") / "tiny-shakespeare-gpt"
    folder.mkdir()
    model = make_run_folder(folder)
    return folder, model, write_card(folder)


def card_of(folder: Path) -> tuple[str, ModelCard]:
    text = (folder / "README.md").read_text(encoding="utf-8")
    return text, ModelCard.load(folder / "README.md")


def test_card_metadata_parses_and_model_index_reads_back(carded):
    folder, _, written = carded
    assert written == folder / "README.md"
    text, card = card_of(folder)
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["license"] == "mit"
    assert data["pipeline_tag"] == "text-generation"
    assert {"hf_gpt", "gpt2-style", "custom_code"} <= set(data["tags"])
    assert "base_model" not in data and "datasets" not in data  # trained from scratch on a local corpus
    name, results = model_index_to_eval_results(data["model-index"])
    assert name == "tiny-shakespeare-gpt"
    by_metric = {r.metric_type: r for r in results}
    assert by_metric["perplexity"].metric_value == pytest.approx(math.exp(4.8123), abs=1e-3)
    assert by_metric["loss"].metric_value == pytest.approx(4.8123)
    assert {r.task_type for r in results} == {"text-generation"}
    assert {r.dataset_split for r in results} == {"validation"}
    assert {r.dataset_name for r in results} == {"Shakespeare (Open Shakespeare)"}
    assert validate_card(text, folder) == []


def test_card_describes_model_training_and_evaluation(carded):
    folder, model, _ = carded
    text, card = card_of(folder)
    for heading in (
        "## Model details",
        "## Intended uses and limitations",
        "## Training data",
        "## Training procedure",
        "## Evaluation",
        "## How to use",
        "## Citation",
    ):
        assert heading in text
    assert f"{model.num_parameters():,}" in text  # exact parameter count
    assert "| Layers | 2 |" in text and "| Width (d_model) | 32 |" in text and "| Attention heads | 2 x 16 |" in text
    assert "| learning_rate | 0.00123 |" in text and "| seed | 1337 |" in text
    assert "2 CPU cores (test machine)" in text and "83 s" in text and "`0123abc`" in text
    assert f"{math.exp(4.8123):.4g}" in text  # perplexity in the evaluation table
    assert "ROMEO: a sample the run wrote" in text
    assert "trust_remote_code=True" in text and "pin `revision=`" in text
    assert SECRET not in text  # credentials in the recorded arguments are redacted
    assert "Language Models are Unsupervised Multitask Learners" in text  # GPT-2 family: its paper


def test_loss_curve_rendered_from_log_history_and_referenced(run_folder):
    folder, _ = run_folder
    assert not (folder / "loss_curve.png").exists()
    write_card(folder)
    png = folder / "loss_curve.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    text, _ = card_of(folder)
    assert "![Training and validation loss](loss_curve.png)" in text
    # The link is checked: with the image gone, the card no longer validates.
    png.unlink()
    assert any("loss_curve.png" in p for p in validate_card(text, folder))


def test_existing_loss_curve_is_kept(run_folder):
    folder, _ = run_folder
    (folder / "loss_curve.png").write_bytes(b"\x89PNG\r\n\x1a\nthe training script's own plot")
    write_card(folder)
    assert (folder / "loss_curve.png").read_bytes().endswith(b"own plot")
    assert "](loss_curve.png)" in card_of(folder)[0]


def test_no_loss_data_means_no_image_reference(tmp_path):
    make_run_folder(tmp_path, log_history=False)
    write_card(tmp_path)
    text, _ = card_of(tmp_path)
    assert not (tmp_path / "loss_curve.png").exists()
    assert "![" not in text and "No loss curve" in text
    assert validate_card(text, tmp_path) == []


def test_bare_save_pretrained_folder_gets_a_card(tmp_path):
    model = make_run_folder(tmp_path, run_info=False, log_history=False, tokenizer=False)
    write_card(tmp_path)
    text, card = card_of(tmp_path)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.eval_results is None  # no metrics, no model-index
    assert f"{model.num_parameters():,}" in text  # counted from config.json on the meta device
    assert "no `run_info.json`" in text
    assert "This folder has no tokenizer files" in text
    assert validate_card(text, tmp_path) == []


PAPER_FIGURES = {
    # preset: (family, text the family's section must carry, the preset's bold row in the paper's table)
    "gpt1": ("gpt1", ["Improving Language Understanding", "BooksCorpus", "post-norm"], "**GPT** | **117M** | **12**"),
    "gpt2-medium": ("gpt2", ["Unsupervised Multitask Learners", "WebText", "Table 2"], "**GPT-2 medium** | **345M**"),
    "gpt3-xl": ("gpt3", ["Few-Shot Learners", "locally banded", "Table 2.1"], "**GPT-3 XL** | **1.3B** | **24**"),
}


@pytest.mark.parametrize("preset", sorted(PAPER_FIGURES))
def test_family_cards_carry_the_papers_figures(tmp_path, preset):
    family, phrases, bold_row = PAPER_FIGURES[preset]
    # The preset's design at a tiny size; only config.json is needed for a card.
    config = GPTConfig.from_preset(preset, n_layer=2, n_embd=64, n_head=2, vocab_size=100)
    config.architectures = ["GPTForCausalLM"]
    config.save_pretrained(tmp_path)
    assert detect_family(config.to_dict()) == family  # from the flags alone
    (tmp_path / "run_info.json").write_text(json.dumps({"preset": preset, "dataset": "x"}), encoding="utf-8")
    text = str(build_card(tmp_path))
    for phrase in phrases:
        assert phrase in text
    assert bold_row in text
    n = GPTForCausalLM(config).num_parameters()
    assert f"{n:,}" in text
    if family == "gpt1":
        assert "after each residual add (post-norm), no final LayerNorm" in text
    if family == "gpt3":
        assert "local layers see the last 256 tokens" in text and "| Context length | 2048 |" in text
    assert validate_card(text) == []


def test_fine_tuned_head_card(tmp_path):
    make_run_folder(tmp_path, head="entailment")
    write_card(tmp_path)
    text, card = card_of(tmp_path)
    data = card.data.to_dict()
    assert data["pipeline_tag"] == "text-classification"
    assert data["base_model"] == "openai-community/gpt2"
    assert data["datasets"] == ["stanfordnlp/snli"]
    assert "entailment" in data["tags"]
    _, results = model_index_to_eval_results(data["model-index"])
    accuracy = [r for r in results if r.metric_type == "accuracy"]
    assert len(accuracy) == 1 and accuracy[0].metric_value == 0.75
    assert accuracy[0].task_type == "text-classification" and accuracy[0].dataset_type == "stanfordnlp/snli"
    assert "AutoModelForSequenceClassification.from_pretrained(model_id, trust_remote_code=True)" in text
    assert "`entailment`, `neutral`, `contradiction`" in text
    assert "fine-tuned from `openai-community/gpt2`" in text
    assert "| Accuracy | 0.7500 |" in text and "| Accuracy of the best constant guess | 0.3400 |" in text
    assert validate_card(text, tmp_path) == []


def test_multiple_choice_card_and_its_usage_code(tmp_path):
    from hf_gpt import GPTForMultipleChoice

    torch.manual_seed(0)
    config = GPTConfig(n_positions=64, n_embd=32, n_layer=2, n_head=2, pad_token_id=50256)
    GPTForMultipleChoice(config).save_pretrained(tmp_path)
    hf_gpt.gpt2_tokenizer(model_max_length=64).save_pretrained(tmp_path)
    info = {
        "task": "multiple_choice",
        "dataset": "who speaks",
        "metrics": {"accuracy": 0.5},
        "chance": {"accuracy": 0.25},
    }
    (tmp_path / "run_info.json").write_text(json.dumps(info))
    text = write_card(tmp_path).read_text()
    data = ModelCard(text).data.to_dict()
    assert "pipeline_tag" not in data  # "multiple-choice" is not a tag models may carry on the Hub
    _, results = model_index_to_eval_results(data["model-index"])
    assert [(r.task_type, r.metric_type, r.metric_value) for r in results] == [("multiple-choice", "accuracy", 0.5)]
    assert validate_card(text, tmp_path) == []
    code = re.search(r"```python\n(.*?)```", text, flags=re.DOTALL).group(1)
    code = code.replace(f'model_id = "{tmp_path.name}"', f"model_id = {str(tmp_path)!r}")
    printed = []
    exec(code, {"print": printed.append})  # scores the example's two choices
    assert printed in ([0], [1])


@pytest.mark.parametrize("base", ["absolute", "runs/pretrained"])
def test_local_base_model_stays_out_of_metadata(tmp_path, monkeypatch, base):
    """A base model that is a local folder is not a Hub id: neither an absolute path nor a sibling run
    named relative to where training ran (the card may be regenerated from another directory)."""
    (tmp_path / "runs" / "pretrained").mkdir(parents=True)
    folder = tmp_path / "runs" / "finetuned"
    folder.mkdir()
    make_run_folder(folder, head="entailment")
    base = str(tmp_path / "runs" / "pretrained") if base == "absolute" else base
    info = json.loads((folder / "run_info.json").read_text())
    info["base_model"] = base
    (folder / "run_info.json").write_text(json.dumps(info))
    monkeypatch.chdir(tmp_path / "runs" / "pretrained")
    card = build_card(folder)
    assert card.data.base_model is None
    assert f"fine-tuned from `{base}`" in str(card)


def test_card_is_deterministic(run_folder):
    folder, _ = run_folder
    assert str(build_card(folder, repo_id="me/x")) == str(build_card(folder, repo_id="me/x"))


def test_hf_gpt_card_command(run_folder, capsys):
    from hf_gpt.cli import main

    folder, _ = run_folder
    assert main(["card", str(folder), "--stdout", "--repo-id", "me/shakespeare"]) == 0
    printed = capsys.readouterr().out
    assert 'model_id = "me/shakespeare"' in printed and not (folder / "README.md").exists()
    assert main(["card", str(folder), "--license", "apache-2.0"]) == 0
    assert ModelCard.load(folder / "README.md").data.license == "apache-2.0"


@pytest.mark.parametrize(
    "mutate, problem",
    [
        (lambda t: t.split("---\n", 2)[2], "no YAML metadata"),
        (lambda t: t.replace("library_name: transformers", "library_name: timm"), "library_name"),
        (lambda t: t.replace("license: mit\n", ""), "license"),
        (lambda t: t.replace("pipeline_tag: text-generation", "pipeline_tag: text-to-image"), "pipeline_tag"),
        (lambda t: re.sub(r"\n    metrics:\n(    - .*\n|      .*\n)+", "\n", t, count=1), "does not parse"),
        (lambda t: t.replace("value: 4.8123", "value: .nan"), "has value nan"),
    ],
)
def test_validate_card_catches_broken_cards(carded, mutate, problem):
    folder, _, _ = carded
    text = (folder / "README.md").read_text()
    broken = mutate(text)
    assert broken != text
    assert any(problem in p for p in validate_card(broken, folder)), validate_card(broken, folder)


def test_save_pretrained_writes_auto_map_for_every_registered_class(run_folder):
    folder, _ = run_folder
    registered = registered_auto_map()
    assert {"AutoConfig", "AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification"} <= set(registered)
    config = json.loads((folder / "config.json").read_text())
    assert config["auto_map"] == registered
    assert {"configuration_gpt.py", "modeling_gpt.py"} <= {p.name for p in folder.glob("*.py")}
    assert check_folder(folder) == ([], [])


def test_complete_auto_map_repairs_an_incomplete_folder(run_folder):
    folder, _ = run_folder
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_gpt.GPTConfig"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_gpt.py").unlink()
    errors, _ = check_folder(folder)
    assert any("no entry for GPTForCausalLM" in e for e in errors)
    added = complete_auto_map(folder)
    assert {"AutoModel", "AutoModelForCausalLM"} <= set(added)
    assert json.loads((folder / "config.json").read_text())["auto_map"] == registered_auto_map()
    assert (folder / "modeling_gpt.py").is_file()
    assert check_folder(folder)[0] == []


def test_check_folder_rejects_code_that_imports_hf_gpt(run_folder):
    folder, _ = run_folder
    code = folder / "modeling_gpt.py"
    code.write_text("from hf_gpt.configuration_gpt import GPTConfig\n" + code.read_text())
    errors, _ = check_folder(folder)
    assert errors == ["modeling_gpt.py imports hf_gpt, which a Hub user does not have"]
