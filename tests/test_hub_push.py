"""`hf-gpt push` (issue 6): the dry run lists exactly the files huggingface_hub would upload, with their
sizes, validates the card, and touches neither the network nor the folder; the real push calls
`create_repo` + `upload_folder` with the training leftovers ignored (against a recording fake HfApi)."""

from __future__ import annotations

import re
import socket

import pytest
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS
from test_cards import make_run_folder

import model_cards.push as push
from hf_gpt.cli import main as hf_gpt_main
from model_cards.generate import MARKER
from model_cards.push import IGNORE_PATTERNS, PushRefused, push_folder, upload_plan

# Besides the model code files (configuration_gpt.py, modeling_gpt.py and what they import relatively,
# whatever save_pretrained copied into the folder).
PUBLISHED_DATA = {
    "README.md",
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "tokenizer.json",
    "tokenizer_config.json",
    "run_info.json",
    "log_history.json",
    "loss_curve.png",
}


@pytest.fixture
def no_network(monkeypatch):
    """Every socket connection and every HfApi fails loudly."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(push, "HfApi", refuse)


@pytest.fixture
def run_folder(tmp_path):
    folder = tmp_path / "tiny-gpt"
    folder.mkdir()
    make_run_folder(folder)
    return folder


def published(folder) -> set[str]:
    code = {p.name for p in folder.glob("*.py")}
    assert {"configuration_gpt.py", "modeling_gpt.py"} <= code
    return PUBLISHED_DATA | code


def snapshot(folder):
    return {
        p.relative_to(folder).as_posix(): (p.stat().st_size, p.read_bytes()) for p in folder.rglob("*") if p.is_file()
    }


def listed_files(output: str) -> dict[str, int]:
    rows = re.findall(r"^\s*([\d,]+)  (\S+)$", output, flags=re.MULTILINE)
    return {path: int(size.replace(",", "")) for size, path in rows}


def test_dry_run_lists_exact_files_and_touches_nothing(run_folder, no_network, capsys):
    before = snapshot(run_folder)
    assert hf_gpt_main(["push", str(run_folder), "me/tiny-gpt", "--dry-run"]) == 0
    out = capsys.readouterr().out
    listed = listed_files(out)
    total = listed.pop("total")
    assert set(listed) == published(run_folder)  # no checkpoint-*/, runs/, training_args.bin
    assert total == sum(listed.values())
    for name in published(run_folder) - {"README.md", "loss_curve.png"}:  # staged files aside, sizes are the folder's
        assert listed[name] == before[name][0], name
    assert listed["loss_curve.png"] > 5000 and listed["README.md"] > 2000  # staged: rendered, not yet written
    assert "card: valid (perplexity=" in out and "dry run: nothing was uploaded" in out
    assert snapshot(run_folder) == before  # the folder is left as it was


def test_plan_is_what_upload_folder_selects(run_folder, monkeypatch):
    """Our listing against huggingface_hub's own selection for upload_folder (its README check, which calls
    the Hub, stubbed)."""
    monkeypatch.setattr(HfApi, "_validate_yaml", lambda self, **kwargs: None)
    ops = HfApi()._prepare_upload_folder_additions(
        run_folder, "", ignore_patterns=list(IGNORE_PATTERNS) + DEFAULT_IGNORE_PATTERNS
    )
    assert sorted(op.path_in_repo for op in ops) == [path for path, _ in upload_plan(run_folder)]


class RecordingHfApi:
    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("init", token))

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        from huggingface_hub import RepoUrl

        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def test_push_creates_repo_and_uploads_with_ignores(run_folder, no_network, monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(push, "HfApi", RecordingHfApi)
    plan = push_folder(run_folder, "me/tiny-gpt", private=True, token="tok")
    init, create, upload = RecordingHfApi.calls
    assert init == ("init", "tok")
    assert create == ("create_repo", "me/tiny-gpt", {"private": True, "exist_ok": True})
    kwargs = upload[1]
    assert kwargs["repo_id"] == "me/tiny-gpt" and kwargs["folder_path"] == run_folder
    assert set(IGNORE_PATTERNS) <= set(kwargs["ignore_patterns"])
    assert {path for path, _ in plan.files} == published(run_folder)
    # The card was refreshed in the folder with the repo id before the upload.
    card = ModelCard.load(run_folder / "README.md")
    assert card.data.model_name == "tiny-gpt" and 'model_id = "me/tiny-gpt"' in card.text
    assert (run_folder / "loss_curve.png").is_file()


def test_push_refuses_a_broken_folder(run_folder, no_network, capsys):
    (run_folder / "model.safetensors").unlink()
    with pytest.raises(PushRefused, match="no model weights"):
        push_folder(run_folder, "me/tiny-gpt")
    assert hf_gpt_main(["push", str(run_folder), "me/tiny-gpt", "--dry-run"]) == 1
    assert "error: no model weights" in capsys.readouterr().out


def test_hand_edited_card_is_kept_and_validated(run_folder, no_network, capsys):
    from model_cards.generate import write_card

    readme = write_card(run_folder)  # a generated card, edited by hand and stripped of the marker line ...
    edited = "\n".join(line for line in readme.read_text().splitlines() if MARKER not in line) + "\nHand-written.\n"
    readme.write_text(edited)
    assert hf_gpt_main(["push", str(run_folder), "me/tiny-gpt", "--dry-run"]) == 0
    assert listed_files(capsys.readouterr().out)["README.md"] == len(edited.encode())  # ... is not regenerated
    readme.write_text(edited.replace("library_name: transformers\n", ""))
    with pytest.raises(PushRefused, match="library_name"):
        push_folder(run_folder, "me/tiny-gpt", dry_run=True)
