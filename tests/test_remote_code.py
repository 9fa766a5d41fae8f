"""Remote code (issue 6): a folder saved by hf_gpt, copied elsewhere, loads with `trust_remote_code=True` in
a Python that cannot import hf_gpt, and gives exactly the in-process model's outputs.

The subprocess runs with `python -I` (no PYTHONPATH, no user site, no cwd on sys.path) in an empty
directory, and drops the editable-install finder that would otherwise still find hf_gpt; it checks that
`hf_gpt` cannot be found, that no file of the hf_gpt package is ever imported, and that no socket opens.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import early, early_result
from test_cards import make_run_folder
from transformers import pipeline

import hf_gpt
from model_cards.generate import write_card

pytestmark = pytest.mark.slow  # each test reads the results of a fresh interpreter (several seconds)

HF_GPT_DIR = str(Path(hf_gpt.__file__).resolve().parent)
PROMPT = "ROMEO:"
IDS = [[464, 2068, 7586, 21831, 11687, 625, 262, 16931, 3290, 13]]  # GPT-2 ids of an ordinary sentence

# Runs first in the subprocess: make hf_gpt unimportable, forbid sockets, then hand over to the test script.
BOOTSTRAP = textwrap.dedent(
    """
    import importlib, importlib.util, json, os, socket, sys
    HF_GPT_DIR = {hf_gpt_dir!r}
    # The editable install puts a finder on sys.meta_path (from a .pth file); a plain install would put a
    # directory on sys.path. Remove both.
    sys.meta_path[:] = [f for f in sys.meta_path if not type(f).__module__.startswith("__editable__")
                        and not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path[:] = [p for p in sys.path if os.path.realpath(os.path.join(p or ".", "hf_gpt")) != HF_GPT_DIR]
    sys.path_importer_cache.clear()
    assert importlib.util.find_spec("hf_gpt") is None, "hf_gpt is still importable"
    try:
        import hf_gpt
    except ModuleNotFoundError:
        pass
    else:
        raise AssertionError("import hf_gpt succeeded")

    def _no_network(*args, **kwargs):
        raise AssertionError("network access attempted")

    socket.socket.connect = socket.create_connection = _no_network

    # transformers asks "Do you wish to run the custom code?" through input() when trust_remote_code is
    # missing somewhere; record the question instead of waiting for an answer.
    PROMPTS = []

    def _no_prompt(question=""):
        PROMPTS.append(str(question)[:200])
        raise EOFError

    import builtins
    builtins.input = _no_prompt

    import torch
    torch.set_num_threads({threads})

    def hf_gpt_files_loaded():
        return sorted(name for name, module in list(sys.modules.items())
                      if os.path.realpath(getattr(module, "__file__", None) or "").startswith(HF_GPT_DIR + os.sep))
    """
)


def run_isolated(script: str, workdir: Path, **values) -> dict:
    """Run BOOTSTRAP + script in a clean interpreter; the script leaves its results in RESULT (a dict)."""
    empty = workdir / "cwd"
    empty.mkdir()
    code = BOOTSTRAP.format(hf_gpt_dir=HF_GPT_DIR, threads=torch.get_num_threads())
    code += "\nRESULT = {}\n" + textwrap.dedent(script).format(**values)
    code += "\nRESULT['hf_gpt_files_loaded'] = hf_gpt_files_loaded()\nRESULT['prompts'] = PROMPTS\n"
    code += "print('RESULT=' + json.dumps(RESULT))\n"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env.update(
        HF_HOME=str(workdir / "hf_home"),  # remote code is copied into a fresh modules cache
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
    )
    proc = subprocess.run(
        [sys.executable, "-I", "-c", code],
        cwd=empty,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT=")][-1]
    result = json.loads(line.removeprefix("RESULT="))
    assert result.pop("hf_gpt_files_loaded") == []
    assert result.pop("prompts") == []  # nothing asked for trust interactively
    return result


def publish(head: str, work: Path) -> tuple[torch.nn.Module, Path]:
    """Save a run folder with hf_gpt, write its card, and copy it where a Hub user's download would land."""
    run = work / f"run-{head}"
    run.mkdir()
    model = make_run_folder(run, head=head)
    write_card(run)
    folder = work / f"downloaded-gpt-{head}"
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("checkpoint-*", "runs"))
    return model, folder


def usage_code(folder: Path) -> str:
    """The card's "How to use" code, pointed at `folder`."""
    card = (folder / "README.md").read_text(encoding="utf-8")
    code = re.search(r"## How to use.*?```python\n(.*?)```", card, flags=re.DOTALL).group(1)
    code, n = re.subn(r'^model_id = ".*"', f"model_id = {str(folder)!r}", code, flags=re.MULTILINE)
    assert n == 1
    return code


@early("published")
def load_published_folders(work: Path):
    """Prepared: a language model and an entailment head, each published with its card. Run in the background
    (conftest's `early`): both loaded through the Auto classes in one clean interpreter (a second would only repeat
    its seconds of imports). The result: (the language model, the head, the subprocess's RESULT, the tensors it
    saved)."""
    user = work / "user"
    user.mkdir()
    model, folder = publish("causal", user)
    head, head_folder = publish("entailment", user)
    out_file = work / "outputs.pt"
    script = """
        import contextlib, io
        from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification, pipeline
        folder = {folder!r}
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
        base = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        ids = torch.tensor({ids!r})
        with torch.no_grad():
            torch.save({{"logits": model(ids).logits, "hidden": base(ids).last_hidden_state}}, {out_file!r})
        RESULT["classes"] = [type(model).__module__, type(model).__name__, type(base).__name__]
        generator = pipeline("text-generation", model=folder, trust_remote_code=True)
        RESULT["text"] = generator({prompt!r}, max_new_tokens=12, do_sample=False)[0]["generated_text"]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec({snippet!r}, {{}})
        RESULT["snippet_output"] = printed.getvalue()

        head = AutoModelForSequenceClassification.from_pretrained({head_folder!r}, trust_remote_code=True).eval()
        with torch.no_grad():
            RESULT["head_logits"] = head(torch.tensor({ids!r})).logits.tolist()
        RESULT["head_class"] = type(head).__module__ + "." + type(head).__name__
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            exec({head_snippet!r}, {{}})
        RESULT["head_snippet_output"] = printed.getvalue()
        """
    values = dict(
        folder=str(folder),
        head_folder=str(head_folder),
        ids=IDS,
        out_file=str(out_file),
        prompt=PROMPT,
        snippet=usage_code(folder),
        head_snippet=usage_code(head_folder),
    )

    def run() -> tuple:
        result = run_isolated(script, work, **values)
        return model, head, result, torch.load(out_file, weights_only=True)

    return None, run


@pytest.fixture(scope="module")
def published():
    return early_result("published")


@pytest.fixture(scope="module")
def causal(published):
    model, _, result, outputs = published
    return model, result, outputs


def greedy_in_process(model, prompt: str, max_new_tokens: int) -> str:
    tok = hf_gpt.gpt2_tokenizer(model_max_length=64)
    generator = pipeline("text-generation", model=model, tokenizer=tok)
    return generator(prompt, max_new_tokens=max_new_tokens, do_sample=False)[0]["generated_text"]


def test_remote_classes_come_from_the_folder(causal):
    _, result, _ = causal
    module, name, base_name = result["classes"]
    assert module.startswith("transformers_modules.") and module.endswith(".modeling_gpt")
    assert (name, base_name) == ("GPTForCausalLM", "GPTModel")


def test_remote_logits_equal_in_process(causal):
    model, _, outputs = causal
    ids = torch.tensor(IDS)
    with torch.no_grad():
        assert torch.equal(outputs["logits"], model(ids).logits)
        assert torch.equal(outputs["hidden"], model.transformer(ids).last_hidden_state)  # AutoModel


def test_remote_pipeline_text_equals_in_process(causal):
    model, result, _ = causal
    expected = greedy_in_process(model, PROMPT, 12)
    assert len(expected) > len(PROMPT)
    assert result["text"] == expected


def test_card_usage_code_runs_without_hf_gpt(causal):
    model, result, _ = causal
    # Its first print is the greedy pipeline output (40 new tokens); the sampled continuation follows.
    assert result["snippet_output"].startswith(greedy_in_process(model, PROMPT, 40) + "\n")


def test_task_head_loads_through_its_auto_class(published):
    _, model, result, _ = published
    assert result["head_class"].startswith("transformers_modules.") and result["head_class"].endswith(
        "modeling_gpt.GPTForSequenceClassification"
    )
    with torch.no_grad():
        expected = model(torch.tensor(IDS)).logits
    assert torch.equal(torch.tensor(result["head_logits"]), expected)  # float32 -> float -> float32 is exact
    # The card's usage code classifies its example and prints a label name.
    with torch.no_grad():
        tok = hf_gpt.gpt2_tokenizer(model_max_length=64)
        label = model.config.id2label[int(model(**tok(PROMPT, return_tensors="pt")).logits.argmax(-1))]
    assert result["head_snippet_output"] == label + "\n"
